//! Planning and applying map changes, against the in-memory datapath.
use std::net::SocketAddr;

use super::*;
use crate::{
    ebpf::fake::FakeDatapath,
    state::{BackendSpec, Family, LbServiceKey, ObjectKey, Protocol},
};

fn lb(name: &str, vip: &str, backends: &[&str], algorithm: Algorithm) -> LbService {
    LbService {
        key: LbServiceKey {
            service: ObjectKey { namespace: "ns".into(), name: name.into() },
            port_name: String::new(),
            protocol: Protocol::Tcp,
            family: Family::V4,
        },
        frontend: vip.parse().unwrap(),
        algorithm,
        affinity_timeout_s: None,
        l7: false,
        backends: backends.iter().map(|b| BackendSpec { addr: b.parse().unwrap() }).collect(),
    }
}

fn rows(image: &MapImage) -> Vec<(String, Vec<SocketAddr>)> {
    image.service_rows().into_iter().map(|r| (r.frontend.to_string(), r.backends)).collect()
}

fn addrs(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

#[test]
fn a_fresh_plan_builds_the_chain_and_a_second_is_empty() {
    let desired = [lb("a", "10.96.0.1:80", &["10.0.0.1:8080", "10.0.0.2:8080"], Algorithm::Random)];
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    let stats = r.reconcile(&desired).unwrap();
    // 2 backends, 2 slots, 1 service, 1 name, 1 frontend.
    assert_eq!(stats, SyncStats { writes: 7, deletes: 0 });
    assert_eq!(rows(&r.kernel_image().unwrap()), [("10.96.0.1:80".into(), addrs(&["10.0.0.1:8080", "10.0.0.2:8080"]))]);
    assert_eq!(r.reconcile(&desired).unwrap(), SyncStats::default(), "nothing changed, nothing written");
}

#[test]
fn writes_come_before_the_frontend_and_deletes_after_it() {
    let ops = plan(&MapImage::default(), &[lb("a", "10.96.0.1:80", &["10.0.0.1:8080"], Algorithm::Random)]).unwrap();
    let pos = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).unwrap();
    assert!(pos(&|o| matches!(o, Op::PutBackend(..))) < pos(&|o| matches!(o, Op::PutSlot(..))));
    assert!(pos(&|o| matches!(o, Op::PutSlot(..))) < pos(&|o| matches!(o, Op::PutService(..))));
    assert!(pos(&|o| matches!(o, Op::PutService(..))) < pos(&|o| matches!(o, Op::PutFrontend(..))));

    let current = {
        let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
        r.reconcile(&[lb("a", "10.96.0.1:80", &["10.0.0.1:8080"], Algorithm::Random)]).unwrap();
        r.kernel_image().unwrap()
    };
    let ops = plan(&current, &[]).unwrap();
    assert!(matches!(ops[0], Op::DelFrontend(_)), "the frontend goes first: {ops:?}");
    assert!(matches!(ops.last(), Some(Op::DelBackend(_))), "backends go last: {ops:?}");
}

#[test]
fn removing_one_backend_touches_only_its_entries() {
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    r.reconcile(&[lb("a", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"], Algorithm::Random)]).unwrap();
    let before = r.kernel_image().unwrap();
    let logged = r.datapath().log.len();
    r.reconcile(&[lb("a", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.3:80"], Algorithm::Random)]).unwrap();
    let after = r.kernel_image().unwrap();
    let ops = &r.datapath().log[logged..];
    // Slot of 10.0.0.2 takes 10.0.0.3 (moved from the last slot), the count drops, the last
    // slot and the backend go: four writes, nothing else.
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert_eq!(after.backends.len(), 2);
    assert_eq!(after.slots.len(), 2);
    // Surviving backends keep their ids.
    let id_of = |img: &MapImage, a: &str| img.backends.iter().find(|(_, b)| backend_socket_addr(b).to_string() == a).map(|(i, _)| *i);
    assert_eq!(id_of(&before, "10.0.0.1:80"), id_of(&after, "10.0.0.1:80"));
    assert_eq!(id_of(&before, "10.0.0.3:80"), id_of(&after, "10.0.0.3:80"));
}

#[test]
fn an_adopted_image_needs_no_writes() {
    let desired = [
        lb("a", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.2:80"], Algorithm::Random),
        lb("b", "10.96.0.2:80", &["10.0.0.3:80"], Algorithm::Maglev),
    ];
    let mut first = Reconciler::new(FakeDatapath::default()).unwrap();
    first.reconcile(&desired).unwrap();
    // A new agent starts from what the kernel holds.
    let pinned = FakeDatapath { image: first.kernel_image().unwrap(), ..Default::default() };
    let mut second = Reconciler::new(pinned).unwrap();
    assert_eq!(second.reconcile(&desired).unwrap(), SyncStats::default());
}

#[test]
fn maglev_services_get_a_full_table_of_their_backend_ids() {
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    r.reconcile(&[lb("m", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.2:80"], Algorithm::Maglev)]).unwrap();
    let image = r.kernel_image().unwrap();
    let (sid, table) = image.maglev.iter().next().expect("a table");
    assert_eq!(table.len(), MAGLEV_TABLE_SIZE);
    assert!(table.iter().all(|id| image.backends.get(id).is_some_and(|b| b.service_id == *sid)));
    assert_ne!(image.services[sid].flags & service_flags::MAGLEV, 0);
    // Back to random: the table goes.
    r.reconcile(&[lb("m", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.2:80"], Algorithm::Random)]).unwrap();
    assert!(r.kernel_image().unwrap().maglev.is_empty());
}

#[test]
fn removing_every_service_leaves_empty_maps() {
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    r.reconcile(&[lb("m", "10.96.0.1:80", &["10.0.0.1:80"], Algorithm::Maglev)]).unwrap();
    r.reconcile(&[]).unwrap();
    assert!(r.kernel_image().unwrap().is_empty());
}

#[test]
fn two_services_on_one_frontend_are_a_conflict() {
    let err =
        plan(&MapImage::default(), &[lb("a", "10.96.0.1:80", &[], Algorithm::Random), lb("b", "10.96.0.1:80", &[], Algorithm::Random)])
            .unwrap_err();
    assert_eq!(err.to_string(), "10.96.0.1:80/TCP is claimed by both ns/a/TCP (IPv4) and ns/b/TCP (IPv4)");
}

#[test]
fn a_failed_write_leaves_a_consistent_state_and_the_next_attempt_finishes() {
    let mut r = Reconciler::new(FakeDatapath { fail_at: Some(3), ..Default::default() }).unwrap();
    let desired = [lb("a", "10.96.0.1:80", &["10.0.0.1:80", "10.0.0.2:80"], Algorithm::Random)];
    assert!(r.reconcile(&desired).is_err());
    // No frontend yet: the half-built service is unreachable.
    assert!(r.kernel_image().unwrap().frontends.is_empty());
    r.reconcile(&desired).unwrap();
    assert_eq!(rows(&r.kernel_image().unwrap()).len(), 1);
}

#[test]
fn addresses_round_trip_through_the_kernel_format() {
    for ip in ["10.96.0.1", "fd00::10", "::ffff:10.0.0.1", "127.0.0.1"] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let back = ip_of(&addr_of(ip));
        match ip {
            std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => assert!(back.is_ipv4()),
            _ => assert_eq!(back, ip),
        }
    }
}

/// A snapshot holding `services`.
fn snapshot(services: &[LbService]) -> Snapshot {
    let mut s = Snapshot::default();
    for svc in services {
        let svc = std::sync::Arc::new(svc.clone());
        s.frontends.insert((svc.frontend, svc.key.protocol), svc.clone());
        s.balanced.insert(svc.key.clone(), svc);
    }
    s
}

#[test]
fn an_incremental_sync_writes_only_the_changed_service() {
    let mut services: Vec<LbService> = (0..100)
        .map(|i| lb(&format!("s{i}"), &format!("10.96.0.{}:80", i + 1), &[&format!("10.0.0.{}:80", i + 1)], Algorithm::Random))
        .collect();
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    r.sync(&snapshot(&services), []).unwrap();
    let logged = r.datapath().log.len();
    services[42] = lb("s42", "10.96.0.43:80", &["10.0.0.43:80", "10.0.0.200:80"], Algorithm::Random);
    let stats = r.sync(&snapshot(&services), [services[42].key.clone()]).unwrap();
    // One backend, one slot, the count: three writes.
    assert_eq!(stats, SyncStats { writes: 3, deletes: 0 });
    assert_eq!(r.datapath().log.len() - logged, 3);
    // The same result as planning everything from scratch.
    assert!(plan(r.image(), &services).unwrap().is_empty());
}

#[test]
fn a_frontend_passed_from_one_service_to_another_in_one_change_stays_live() {
    let a = lb("a", "10.96.0.1:80", &["10.0.0.1:80"], Algorithm::Random);
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    r.sync(&snapshot(std::slice::from_ref(&a)), []).unwrap();
    // a moves to .2 and b takes .1: whatever order the keys come in, .1 ends up b's.
    let a2 = lb("a", "10.96.0.2:80", &["10.0.0.1:80"], Algorithm::Random);
    let b = lb("b", "10.96.0.1:80", &["10.0.0.9:80"], Algorithm::Random);
    r.sync(&snapshot(&[a2.clone(), b.clone()]), [b.key.clone(), a2.key.clone()]).unwrap();
    let rows = rows(&r.kernel_image().unwrap());
    // Rows by Service name: a, then b.
    assert_eq!(rows, [("10.96.0.2:80".into(), addrs(&["10.0.0.1:80"])), ("10.96.0.1:80".into(), addrs(&["10.0.0.9:80"]))]);
    assert!(r.datapath().log.iter().all(|op| !matches!(op, Op::DelFrontend(_))), "the frontend was never removed: {:?}", r.datapath().log);
}

#[test]
fn capacity_counts_old_and_new_entries_together() {
    // Every frontend readdressed at once: new ones are written before old ones go, so at the
    // peak the map holds both. Filling it to that point must be refused before any write.
    let n = sizes::MAX_FRONTENDS as usize / 2 + 1;
    let first: Vec<LbService> =
        (0..n).map(|i| lb(&format!("s{i}"), &format!("10.96.{}.{}:80", i / 250, i % 250 + 1), &[], Algorithm::Random)).collect();
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    r.sync(&snapshot(&first), []).unwrap();
    let moved: Vec<LbService> =
        (0..n).map(|i| lb(&format!("s{i}"), &format!("10.97.{}.{}:80", i / 250, i % 250 + 1), &[], Algorithm::Random)).collect();
    let logged = r.datapath().log.len();
    let err = r.sync(&snapshot(&moved), moved.iter().map(|s| s.key.clone())).unwrap_err().to_string();
    assert!(err.contains("during the change"), "{err}");
    assert_eq!(r.datapath().log.len(), logged, "nothing written");
}

#[test]
fn a_large_sync_compacts_the_image_without_changing_it() {
    // 30 services of 100 backends: over COMPACT_AFTER_OPS writes, so the image is rebuilt.
    let backends: Vec<String> = (0..100).map(|i| format!("10.0.{}.{}:8080", i / 200, i % 200 + 1)).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let names: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
    let vips: Vec<String> = (0..30).map(|i| format!("10.96.1.{}:80", i + 1)).collect();
    let mut desired: Vec<LbService> = names.iter().zip(&vips).map(|(n, v)| lb(n, v, &backends, Algorithm::Random)).collect();
    let mut r = Reconciler::new(FakeDatapath::default()).unwrap();
    let stats = r.reconcile(&desired).unwrap();
    assert!(stats.writes > COMPACT_AFTER_OPS, "{stats:?}");
    assert_eq!(r.image(), &r.kernel_image().unwrap(), "the compacted image is what the kernel holds");
    // Incremental work goes on from the compacted image: one backend fewer is one slot and one
    // backend deleted, the last slot rewritten at most.
    desired[0].backends.remove(0);
    let stats = r.reconcile(&desired).unwrap();
    assert!(stats.deletes == 2 && stats.writes <= 2, "{stats:?}");
    assert_eq!(r.image(), &r.kernel_image().unwrap());
}
