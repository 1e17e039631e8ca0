//! YAML to catalog: what is accepted, and every rejection path with the error it names.
use std::path::Path;

use super::*;
use crate::{sources::ConfigErrors, state::Store};

fn node() -> NodeContext {
    NodeContext { node: "node-a".into(), zone: None }
}

fn load(text: &str) -> Result<Store, ConfigErrors> {
    crate::state::store::load(Path::new("svc.yaml"), text, node())
}

/// The single error of `text`, as displayed.
fn error(text: &str) -> String {
    let errors = load(text).expect_err("should be rejected");
    assert_eq!(errors.0.len(), 1, "{errors}");
    errors.0[0].to_string()
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - {name: http, port: 80, targetPort: 8080}\n";

fn service_with(spec_lines: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\nspec:\n{spec_lines}")
}

fn slice_with(body: &str) -> String {
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: shop\n  labels: {{kubernetes.io/service-name: web}}\n{body}")
}

#[test]
fn loads_the_shipped_example() {
    let text = include_str!("../../../../deploy/examples/web.yaml");
    let catalog = load(text).expect("example is valid");
    assert_eq!(catalog.services().count(), 1);
    let slice = catalog.slices().next().unwrap();
    assert_eq!(slice.endpoints.len(), 3);
    assert_eq!(slice.endpoints[0].workload.as_deref(), Some("web-0"));
}

#[test]
fn accepts_kubernetes_output_with_status_lists_and_other_kinds() {
    let text = format!(
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {{name: a, namespace: x, managedFields: [{{manager: kubectl}}]}}\n  spec: {{clusterIP: 10.96.1.1, ports: [{{port: 53, protocol: UDP}}]}}\n  status: {{loadBalancer: {{}}}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d}}\n---\n"
    );
    let catalog = load(&text).unwrap();
    let svc = catalog.services().next().unwrap();
    assert_eq!(svc.key.to_string(), "x/a");
    assert_eq!(svc.ports[0].protocol, Protocol::Udp);
    assert_eq!(svc.ports[0].name, "");
}

#[test]
fn defaults_match_kubernetes() {
    let catalog = load(&format!("{SERVICE}---\n{}", slice_with("addressType: IPv4\nendpoints:\n- addresses: [10.0.0.1]\nports:\n- {name: http, port: 8080}\n"))).unwrap();
    let svc = catalog.services().next().unwrap();
    assert_eq!(svc.affinity_timeout_s, None);
    assert!(!svc.node_local && !svc.prefer_same_zone);
    assert_eq!(svc.algorithm, Algorithm::Random);
    let ep = &catalog.slices().next().unwrap().endpoints[0];
    // Missing conditions: ready, and serving like ready, not terminating.
    assert!(ep.ready && ep.serving && !ep.terminating);
    let affinity = load(&service_with("  clusterIP: 10.96.0.10\n  sessionAffinity: ClientIP\n")).unwrap();
    assert_eq!(affinity.services().next().unwrap().affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
}

#[test]
fn headless_and_external_name_services_have_no_vip() {
    let headless = load(&service_with("  clusterIP: None\n  ports: [{port: 80}]\n")).unwrap();
    assert!(headless.services().next().unwrap().cluster_ips.is_empty());
    let external = load(&service_with("  type: ExternalName\n  externalName: example.com\n")).unwrap();
    assert!(external.services().next().unwrap().cluster_ips.is_empty());
}

#[test]
fn fqdn_slices_are_ignored() {
    let catalog = load(&slice_with("addressType: FQDN\nendpoints:\n- addresses: [example.com]\n")).unwrap();
    assert!(catalog.slices().next().is_none());
}

#[test]
fn rejects_broken_yaml_naming_the_file() {
    let e = error("apiVersion: v1\nkind: Service\nmetadata: {name: [\n");
    assert!(e.starts_with("svc.yaml: document 1: not valid YAML"), "{e}");
}

#[test]
fn rejects_objects_without_kind() {
    assert_eq!(error("metadata: {name: x}\n"), "svc.yaml: document 1: every object needs apiVersion and kind");
}

#[test]
fn rejects_wrong_api_version() {
    let e = error("apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\n");
    assert!(e.contains("apiVersion: EndpointSlice must be discovery.k8s.io/v1"), "{e}");
}

#[test]
fn rejects_a_nameless_service() {
    assert_eq!(error("apiVersion: v1\nkind: Service\nspec: {}\n"), "svc.yaml: Service (no name): metadata.name: a Service needs a name");
}

#[test]
fn rejects_type_errors_naming_the_field() {
    let e = error(&service_with("  ports:\n  - {name: a, port: eighty}\n"));
    assert!(e.starts_with("svc.yaml: Service shop/web: spec.ports[0].port:"), "{e}");
}

#[test]
fn rejects_bad_service_fields() {
    let cases = [
        ("  clusterIP: 10.96.0.300\n", "spec.clusterIP: not an IP address: \"10.96.0.300\""),
        ("  clusterIPs: [10.96.0.1, 10.96.0.2]\n", "spec.clusterIPs: a dual-stack Service has one IPv4 and one IPv6 address"),
        ("  ports: [{port: 0}]\n", "spec.ports[0].port: must be between 1 and 65535, got 0"),
        ("  ports: [{port: 70000}]\n", "spec.ports[0].port: must be between 1 and 65535, got 70000"),
        ("  ports: [{port: 80, targetPort: 0}]\n", "spec.ports[0].targetPort: must be between 1 and 65535, got 0"),
        ("  ports: [{port: 80, protocol: ICMP}]\n", "spec.ports[0].protocol: protocol must be TCP, UDP or SCTP, got \"ICMP\""),
        ("  ports: [{name: a, port: 80}, {port: 81}]\n", "spec.ports[1].name: must be set when a Service has more than one port"),
        ("  ports: [{name: a, port: 80}, {name: a, port: 81}]\n", "spec.ports[1].name: duplicate port name \"a\""),
        ("  sessionAffinity: Cookie\n", "spec.sessionAffinity: must be None or ClientIP, got \"Cookie\""),
        (
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: must be between 1 and 86400, got 86401",
        ),
        ("  internalTrafficPolicy: Nearby\n", "spec.internalTrafficPolicy: must be Cluster or Local, got \"Nearby\""),
        ("  trafficDistribution: Anywhere\n", "spec.trafficDistribution: must be PreferClose or PreferSameZone, got \"Anywhere\""),
    ];
    for (spec, want) in cases {
        assert_eq!(error(&service_with(spec)), format!("svc.yaml: Service shop/web: {want}"), "for {spec:?}");
    }
}

#[test]
fn rejects_an_unknown_balancing_algorithm() {
    let text = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations: {mesh.dev/lb-algorithm: round-robin}\nspec: {}\n";
    assert_eq!(
        error(text),
        "svc.yaml: Service default/web: metadata.annotations[\"mesh.dev/lb-algorithm\"]: must be \"random\" or \"maglev\", got \"round-robin\""
    );
}

#[test]
fn rejects_bad_slice_fields() {
    let cases = [
        ("addressType: IPv5\n", "addressType: must be IPv4, IPv6 or FQDN, got \"IPv5\""),
        ("endpoints: []\n", "addressType: required"),
        ("addressType: IPv4\nendpoints:\n- addresses: []\n", "endpoints[0].addresses: needs at least one address"),
        ("addressType: IPv4\nendpoints:\n- addresses: [fd00::1]\n", "endpoints[0].addresses[0]: fd00::1 is not an IPv4 address, as addressType says"),
        ("addressType: IPv6\nendpoints:\n- addresses: [pod-a]\n", "endpoints[0].addresses[0]: not an IP address: \"pod-a\""),
        ("addressType: IPv4\nports:\n- {name: http, port: 65536}\n", "ports[0].port: must be between 1 and 65535, got 65536"),
        ("addressType: IPv4\nports:\n- {name: http, port: 80, protocol: tcp}\n", "ports[0].protocol: protocol must be TCP, UDP or SCTP, got \"tcp\""),
    ];
    for (body, want) in cases {
        assert_eq!(error(&slice_with(body)), format!("svc.yaml: EndpointSlice shop/web-1: {want}"), "for {body:?}");
    }
    let unlabelled = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\n";
    assert!(error(unlabelled).contains("metadata.labels[\"kubernetes.io/service-name\"]: required"));
}

#[test]
fn rejects_duplicates_across_files_naming_both() {
    use crate::sources::{Change, Origin, file::parse};
    let mut store = Store::new(node());
    let changes = |file: &str| -> Vec<Change> {
        let origin = Origin::File(std::path::Path::new(file).into());
        parse(Path::new(file), SERVICE).unwrap().into_iter().map(|object| Change::Upsert { origin: origin.clone(), object }).collect()
    };
    store.apply(changes("a.yaml")).unwrap();
    let errors = store.apply(changes("b.yaml")).unwrap_err();
    assert_eq!(errors.to_string(), "b.yaml: Service shop/web: metadata.name: defined twice (also in a.yaml)");
}

#[test]
fn reports_every_error_not_just_the_first() {
    let text = format!("{}---\n{}", service_with("  ports: [{port: 0}]\n"), slice_with("addressType: IPv5\n"));
    assert_eq!(load(&text).unwrap_err().0.len(), 2);
}

#[test]
fn rejects_an_object_defined_twice_in_one_file() {
    let e = error(&format!("{SERVICE}---\n{SERVICE}"));
    assert_eq!(e, "svc.yaml: Service shop/web: metadata.name: defined twice in this file");
}
