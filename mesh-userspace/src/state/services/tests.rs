//! kube-proxy's endpoint rules, one node at a time.
use std::path::Path;

use super::*;
use crate::state::model::NodeContext;

fn node(zone: Option<&str>) -> NodeContext {
    NodeContext { node: "node-a".into(), zone: zone.map(Into::into) }
}

/// `(address, ready, serving, terminating, node, zone hint)`
type Ep<'a> = (&'a str, bool, bool, bool, &'a str, Option<&'a str>);

fn catalog(spec_extra: &str, endpoints: &[Ep<'_>]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: ns}}\nspec:\n  clusterIPs: [10.96.0.10, \"fd00::10\"]\n  ports:\n  - {{name: http, port: 80}}\n  - {{name: dns, port: 53, protocol: UDP}}\n{spec_extra}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: ns\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: 8080}}\n- {{name: dns, port: 5353, protocol: UDP}}\nendpoints:\n"
    );
    for (addr, ready, serving, terminating, node, hint) in endpoints {
        y.push_str(&format!(
            "- addresses: [{addr}]\n  conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}\n  nodeName: {node}\n"
        ));
        if let Some(h) = hint {
            y.push_str(&format!("  hints: {{forZones: [{{name: {h}}}]}}\n"));
        }
    }
    y
}

/// The balanced services of `yaml` as `node` sees them.
fn desired_services(yaml: &str, node: &NodeContext) -> Vec<LbService> {
    let store = crate::state::store::load(Path::new("t.yaml"), yaml, node.clone()).expect("valid");
    store.snapshot().balanced.values().map(|s| (**s).clone()).collect()
}

/// Backends of the IPv4 http port.
fn http_backends(c: &str, n: &NodeContext) -> Vec<String> {
    let services = desired_services(c, n);
    let svc = services.iter().find(|s| s.key.port_name == "http" && s.key.family == Family::V4).expect("http/v4");
    svc.backends.iter().map(|b| b.addr.to_string()).collect()
}

const R: (bool, bool, bool) = (true, true, false);

fn ep<'a>(addr: &'a str, (ready, serving, terminating): (bool, bool, bool), node: &'a str, hint: Option<&'a str>) -> Ep<'a> {
    (addr, ready, serving, terminating, node, hint)
}

#[test]
fn one_balanced_service_per_port_and_family_with_ports_resolved_by_name() {
    let c = catalog("", &[ep("10.0.0.1", R, "node-a", None)]);
    let services = desired_services(&c, &node(None));
    let keys: Vec<String> = services.iter().map(|s| format!("{} -> {}", s.key, s.frontend)).collect();
    assert_eq!(
        keys,
        [
            "ns/web:dns/UDP (IPv4) -> 10.96.0.10:53",
            "ns/web:dns/UDP (IPv6) -> [fd00::10]:53",
            "ns/web:http/TCP (IPv4) -> 10.96.0.10:80",
            "ns/web:http/TCP (IPv6) -> [fd00::10]:80",
        ]
    );
    assert_eq!(services[0].backends[0].addr.to_string(), "10.0.0.1:5353");
    assert_eq!(services[2].backends[0].addr.to_string(), "10.0.0.1:8080");
    // No IPv6 slice: the IPv6 frontends exist and refuse.
    assert!(services[1].backends.is_empty() && services[3].backends.is_empty());
}

#[test]
fn only_ready_endpoints_when_any_is_ready() {
    let c = catalog(
        "",
        &[
            ep("10.0.0.1", R, "node-a", None),
            ep("10.0.0.2", (false, false, false), "node-a", None),
            ep("10.0.0.3", (false, true, true), "node-a", None),
        ],
    );
    assert_eq!(http_backends(&c, &node(None)), ["10.0.0.1:8080"]);
}

#[test]
fn serving_terminating_endpoints_are_the_fallback() {
    let c = catalog("", &[ep("10.0.0.2", (false, false, true), "node-a", None), ep("10.0.0.3", (false, true, true), "node-a", None)]);
    assert_eq!(http_backends(&c, &node(None)), ["10.0.0.3:8080"]);
}

#[test]
fn local_policy_uses_this_node_and_its_own_fallback() {
    let extra = "  internalTrafficPolicy: Local";
    let c = catalog(extra, &[ep("10.0.0.1", R, "node-b", None), ep("10.0.0.2", R, "node-a", None)]);
    assert_eq!(http_backends(&c, &node(None)), ["10.0.0.2:8080"]);
    // No ready local endpoint: a local serving-terminating one, never a remote ready one.
    let c = catalog(extra, &[ep("10.0.0.1", R, "node-b", None), ep("10.0.0.2", (false, true, true), "node-a", None)]);
    assert_eq!(http_backends(&c, &node(None)), ["10.0.0.2:8080"]);
    let c = catalog(extra, &[ep("10.0.0.1", R, "node-b", None)]);
    assert!(http_backends(&c, &node(None)).is_empty());
}

#[test]
fn prefer_close_uses_zone_hints_only_when_every_ready_endpoint_has_them() {
    let extra = "  trafficDistribution: PreferClose";
    let hinted = [ep("10.0.0.1", R, "node-a", Some("z1")), ep("10.0.0.2", R, "node-b", Some("z2"))];
    assert_eq!(http_backends(&catalog(extra, &hinted), &node(Some("z2"))), ["10.0.0.2:8080"]);
    // Without PreferClose the hints are ignored.
    assert_eq!(http_backends(&catalog("", &hinted), &node(Some("z2"))).len(), 2);
    // One ready endpoint without hints: topology is off.
    let partial = [ep("10.0.0.1", R, "node-a", Some("z1")), ep("10.0.0.2", R, "node-b", None)];
    assert_eq!(http_backends(&catalog(extra, &partial), &node(Some("z1"))).len(), 2);
    // No endpoint for our zone, or no zone known: everything.
    assert_eq!(http_backends(&catalog(extra, &hinted), &node(Some("z9"))).len(), 2);
    assert_eq!(http_backends(&catalog(extra, &hinted), &node(None)).len(), 2);
}

#[test]
fn an_address_in_two_slices_counts_once() {
    let y = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.1], conditions: {ready: false}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: b, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 80}]\nendpoints: [{addresses: [10.0.0.1]}]\n";
    let services = desired_services(y, &node(None));
    assert_eq!(services[0].backends.len(), 1, "{services:?}");
}
