//! The store: batches apply whole or not at all, a change recomputes only what it touches,
//! snapshots never change once published.
use std::{path::Path, sync::Arc};

use super::*;
use crate::sources::{Change, Origin, file::parse};

fn node() -> NodeContext {
    NodeContext { node: "node-a".into(), zone: None }
}

fn service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  clusterIP: {vip}\n  ports: [{{name: http, port: 80}}]\n---\n"
    )
}

fn slice(service: &str, name: &str, addrs: &[&str]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}\n  namespace: ns\n  labels: {{kubernetes.io/service-name: {service}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for a in addrs {
        y.push_str(&format!("- addresses: [\"{a}\"]\n  targetRef: {{kind: Pod, name: {service}-7d4f8b9c6-x2x9k}}\n"));
    }
    y.push_str("---\n");
    y
}

fn upserts(file: &str, yaml: &str) -> Vec<Change> {
    let origin = Origin::File(std::path::Path::new(file).into());
    parse(Path::new(file), yaml).unwrap().into_iter().map(|object| Change::Upsert { origin: origin.clone(), object }).collect()
}

fn backends(snapshot: &Snapshot, name: &str) -> Vec<String> {
    let view = &snapshot.services[&ObjectKey::new("ns", name)];
    view.ports[0].backends.iter().map(|b| b.addr.to_string()).collect()
}

/// A store with `n` Services, one slice of two endpoints each.
fn store_with(n: usize) -> Store {
    let mut store = Store::new(node());
    for i in 0..n {
        let yaml = format!(
            "{}{}",
            service(&format!("s{i}"), &format!("10.96.{}.{}", i / 250, i % 250 + 1)),
            slice(&format!("s{i}"), &format!("s{i}-a"), &[&format!("10.1.{}.{}", i / 250, i % 250 + 1), "10.2.0.1"])
        );
        store.apply(upserts(&format!("s{i}.yaml"), &yaml)).unwrap();
    }
    store
}

#[test]
fn one_endpoint_change_recomputes_one_service_and_shares_the_rest() {
    let mut store = store_with(50);
    let before = store.snapshot();
    let applied = store.apply(upserts("s7.yaml", &slice("s7", "s7-a", &["10.9.9.9"]))).unwrap();
    assert_eq!(applied.services, 1, "only the slice's Service is recomputed");
    assert_eq!(applied.balanced.len(), 1, "{:?}", applied.balanced);
    assert_eq!(applied.balanced[0].service, ObjectKey::new("ns", "s7"));
    let after = store.snapshot();
    assert_eq!(after.generation, before.generation + 1);
    assert_eq!(backends(&after, "s7"), ["10.9.9.9:8080"]);
    // The old snapshot is untouched, and what did not change is shared, not copied.
    assert_eq!(backends(&before, "s7"), ["10.1.0.8:8080", "10.2.0.1:8080"]);
    let key = ObjectKey::new("ns", "s8");
    assert!(Arc::ptr_eq(&before.services[&key], &after.services[&key]));
}

#[test]
fn a_batch_with_one_bad_object_applies_nothing() {
    let mut store = store_with(1);
    let before = store.snapshot();
    let bad = format!("{}{}", slice("s0", "s0-a", &["10.5.5.5"]), service("other", "10.96.0.300"));
    let errors = store.apply(upserts("s0.yaml", &bad)).unwrap_err().to_string();
    assert!(errors.contains("s0.yaml: Service ns/other: spec.clusterIP: not an IP address"), "{errors}");
    let after = store.snapshot();
    assert_eq!(after.generation, before.generation);
    assert_eq!(backends(&after, "s0"), backends(&before, "s0"), "the good slice of the batch did not apply either");
}

#[test]
fn two_services_on_one_address_are_refused_naming_both_but_a_swap_is_fine() {
    let mut store = store_with(2);
    let errors = store.apply(upserts("x.yaml", &service("x", "10.96.0.1"))).unwrap_err().to_string();
    assert_eq!(errors, "x.yaml: Service ns/x: spec.clusterIPs: 10.96.0.1:80/TCP is already the address of Service ns/s0");
    // s0 and s1 exchange addresses in one batch: no conflict.
    let swap = format!("{}{}", service("s0", "10.96.0.2"), service("s1", "10.96.0.1"));
    let origin_of_both = upserts("s0.yaml", &swap);
    let mut store2 = Store::new(node());
    store2.apply(upserts("s0.yaml", &format!("{}{}", service("s0", "10.96.0.1"), service("s1", "10.96.0.2")))).unwrap();
    store2.apply(origin_of_both).unwrap();
    let snap = store2.snapshot();
    assert_eq!(snap.services[&ObjectKey::new("ns", "s0")].ports[0].frontend.to_string(), "10.96.0.2:80");
    let holder = &snap.frontends[&("10.96.0.1:80".parse().unwrap(), Protocol::Tcp)];
    assert_eq!(holder.key.service, ObjectKey::new("ns", "s1"));
}

#[test]
fn deleting_a_service_removes_its_ports_and_frontends_and_its_workloads_go_with_the_slice() {
    let mut store = store_with(2);
    assert_eq!(store.snapshot().workloads[&"10.1.0.1".parse::<IpAddr>().unwrap()].name, "s0");
    let origin = Origin::File(std::path::Path::new("s0.yaml").into());
    let del = |kind, name: &str| Change::Delete { origin: origin.clone(), kind, namespace: "ns".into(), name: name.into() };
    let applied = store.apply(vec![del(Kind::Service, "s0"), del(Kind::EndpointSlice, "s0-a")]).unwrap();
    assert_eq!(applied.balanced.len(), 1);
    let snap = store.snapshot();
    assert!(!snap.services.contains_key(&ObjectKey::new("ns", "s0")));
    assert_eq!(snap.balanced.len(), 1);
    assert_eq!(snap.frontends.len(), 1);
    assert!(!snap.workloads.contains_key(&"10.1.0.1".parse::<IpAddr>().unwrap()));
    // 10.2.0.1 is named by s1's slice too: it stays.
    assert!(snap.workloads.contains_key(&"10.2.0.1".parse::<IpAddr>().unwrap()));
}

#[test]
fn a_route_makes_its_parent_l7_and_reaches_the_proxy_view() {
    let mut store = store_with(1);
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\nspec:\n  parentRefs: [{kind: Service, name: s0}]\n  rules: [{backendRefs: [{name: s0, port: 80}]}]\n";
    let applied = store.apply(upserts("r.yaml", route)).unwrap();
    assert_eq!(applied.services, 1);
    let snap = store.snapshot();
    let view = &snap.services[&ObjectKey::new("ns", "s0")];
    assert!(view.ports[0].l7);
    assert_eq!(view.routes.len(), 1);
    let origin = Origin::File(std::path::Path::new("r.yaml").into());
    store.apply(vec![Change::Delete { origin, kind: Kind::HttpRoute, namespace: "ns".into(), name: "r".into() }]).unwrap();
    assert!(!store.snapshot().services[&ObjectKey::new("ns", "s0")].ports[0].l7);
}

#[test]
fn an_object_moved_between_files_is_a_duplicate_until_the_old_file_lets_go() {
    let mut store = store_with(1);
    let moved = store.apply(upserts("new.yaml", &service("s0", "10.96.0.1"))).unwrap_err().to_string();
    assert!(moved.contains("defined twice (also in s0.yaml)"), "{moved}");
    let origin = Origin::File(std::path::Path::new("s0.yaml").into());
    store.apply(vec![Change::Delete { origin, kind: Kind::Service, namespace: "ns".into(), name: "s0".into() }]).unwrap();
    store.apply(upserts("new.yaml", &service("s0", "10.96.0.1"))).unwrap();
}

fn pod(name: &str, node: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns, uid: u-{name}, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, serviceAccountName: sa-{name}}}\nstatus: {{podIP: \"{ip}\", hostIP: \"10.200.0.2\"}}\n---\n"
    )
}

#[test]
fn pods_of_other_nodes_are_peers_by_address_with_their_node_and_enrollment() {
    let mut store = Store::new(node());
    let yaml = format!("{}{}", pod("here", "node-a", "10.1.0.1", ""), pod("there", "node-b", "10.1.1.1", "mesh.dev/dataplane: enabled"));
    store.apply(upserts("pods.yaml", &yaml)).unwrap();
    let snapshot = store.snapshot();
    assert_eq!(snapshot.pods.keys().map(|k| k.name.as_str()).collect::<Vec<_>>(), ["here"], "only this node's pods are enrolled here");
    let there = &snapshot.peers[&"10.1.1.1".parse::<IpAddr>().unwrap()];
    assert!(there.enrolled);
    assert_eq!(there.spec.host_ip, Some("10.200.0.2".parse().unwrap()));
    assert_eq!(there.identity("td").unwrap().to_string(), "spiffe://td/ns/ns/sa/sa-there");
    assert!(!snapshot.peers.contains_key(&"10.1.0.1".parse::<IpAddr>().unwrap()));

    // The pod moves to this node (a new object of the same name): a peer no longer.
    store
        .apply(upserts("pods.yaml", &format!("{}{}", pod("here", "node-a", "10.1.0.1", ""), pod("there", "node-a", "10.1.1.1", ""))))
        .unwrap();
    let snapshot = store.snapshot();
    assert!(snapshot.peers.is_empty(), "{:?}", snapshot.peers.keys().collect::<Vec<_>>());
    assert!(snapshot.pods_by_ip.contains_key(&"10.1.1.1".parse::<IpAddr>().unwrap()));
}
