//! The kernel balances real connections: programs attached to a child cgroup, real sockets,
//! each test in its own network namespace with only loopback.
use mesh_tests::*;

const VIP: &str = "10.96.0.10:80";

fn three_backends() -> [Backend; 3] {
    [Backend::start("b1", &["127.0.0.11:8080"]), Backend::start("b2", &["127.0.0.12:8080"]), Backend::start("b3", &["127.0.0.13:8080"])]
}

fn service(endpoints: Vec<Endpoint<'_>>) -> ServiceYaml<'_> {
    ServiceYaml::web(endpoints)
}

fn ready3() -> Vec<Endpoint<'static>> {
    vec![Endpoint::ready("127.0.0.11"), Endpoint::ready("127.0.0.12"), Endpoint::ready("127.0.0.13")]
}

#[test]
fn tcp_connections_spread_uniformly_over_three_backends() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("spread");
        let agent = Agent::start(AgentSpec::new(&service(ready3()).render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "600"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        let counts = names(&answer);
        assert_eq!(counts.len(), 3, "all three backends should be used: {answer}");
        // Binomial(600, 1/3): mean 200, sd 11.5; 140..260 is over 5 sd either way.
        for (name, n) in &counts {
            assert!((140..=260).contains(n), "{name} got {n} of 600: {answer}");
        }
        agent.stop();
    });
}

#[test]
fn getpeername_shows_the_vip_not_the_backend() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("peer");
        let agent = Agent::start(AgentSpec::new(&service(ready3()).render(), &cgroup));
        for _ in 0..5 {
            let answer = cgroup.probe(&["peer", VIP]);
            assert_eq!(answer["peer"], VIP, "{answer}");
            assert!(answer["name"].as_str().is_some_and(|n| n.starts_with('b')), "{answer}");
        }
        agent.stop();
    });
}

#[test]
fn traffic_from_outside_the_cgroup_is_untouched() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("outside");
        let agent = Agent::start(AgentSpec::new(&service(ready3()).render(), &cgroup));
        // Not in the cgroup: the VIP is not translated and has no route in this namespace.
        let answer = probe_outside(&["tcp", VIP, "3"]);
        assert_eq!(answer["errors"]["ENETUNREACH"], 3, "{answer}");
        // In the cgroup, an address that is no Service goes where it was sent.
        let answer = cgroup.probe(&["tcp", "127.0.0.12:8080", "20"]);
        assert_eq!(names(&answer), vec![("b2".to_owned(), 20)], "{answer}");
        agent.stop();
    });
}

#[test]
fn no_usable_endpoint_refuses_at_once() {
    in_netns(|| {
        let cgroup = TestCgroup::new("refuse");
        let not_ready = Endpoint { ready: false, serving: false, ..Endpoint::ready("127.0.0.11") };
        let agent = Agent::start(AgentSpec::new(&service(vec![not_ready]).render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "5"]);
        // Refused, not timed out (the probe's connect timeout is 3 s).
        assert_eq!(answer["errors"]["ECONNREFUSED"], 5, "{answer}");
        agent.stop();
    });
}

#[test]
fn terminating_serving_endpoints_are_a_fallback_only() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("terminating");
        let serving_terminating = Endpoint { ready: false, serving: true, terminating: true, ..Endpoint::ready("127.0.0.11") };
        let not_serving = Endpoint { ready: false, serving: false, terminating: true, ..Endpoint::ready("127.0.0.12") };
        let agent = Agent::start(AgentSpec::new(&service(vec![serving_terminating, not_serving]).render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "30"]);
        assert_eq!(names(&answer), vec![("b1".to_owned(), 30)], "only the serving one: {answer}");

        // Once a ready endpoint exists, the terminating one gets nothing.
        agent.write_config(&service(vec![serving_terminating, not_serving, Endpoint::ready("127.0.0.13")]).render());
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        let answer = cgroup.probe(&["tcp", VIP, "30"]);
        assert_eq!(names(&answer), vec![("b3".to_owned(), 30)], "{answer}");
        agent.stop();
    });
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("local");
        let mut svc = service(vec![
            Endpoint { node: "node-a", ..Endpoint::ready("127.0.0.11") },
            Endpoint { node: "node-b", ..Endpoint::ready("127.0.0.12") },
            Endpoint { node: "node-a", ..Endpoint::ready("127.0.0.13") },
        ]);
        svc.extra_spec = "  internalTrafficPolicy: Local";
        let agent = Agent::start(AgentSpec { node: "node-a", ..AgentSpec::new(&svc.render(), &cgroup) });
        let answer = cgroup.probe(&["tcp", VIP, "60"]);
        assert_eq!(backend_names(&answer), ["b1", "b3"], "node-b's endpoint must not be used: {answer}");
        agent.stop();
    });
}

#[test]
fn prefer_close_keeps_traffic_in_the_zone() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("zone");
        let mut svc = service(vec![
            Endpoint { zone_hint: Some("zone-1"), ..Endpoint::ready("127.0.0.11") },
            Endpoint { zone_hint: Some("zone-2"), ..Endpoint::ready("127.0.0.12") },
            Endpoint { zone_hint: Some("zone-2"), ..Endpoint::ready("127.0.0.13") },
        ]);
        svc.extra_spec = "  trafficDistribution: PreferClose";
        let agent = Agent::start(AgentSpec { zone: Some("zone-2"), ..AgentSpec::new(&svc.render(), &cgroup) });
        let answer = cgroup.probe(&["tcp", VIP, "60"]);
        assert_eq!(backend_names(&answer), ["b2", "b3"], "zone-2's endpoints only: {answer}");
        agent.stop();
    });
}

#[test]
fn session_affinity_keeps_a_client_on_one_backend() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("affinity");
        let mut svc = service(ready3());
        svc.extra_spec = "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 60";
        let agent = Agent::start(AgentSpec::new(&svc.render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "60"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        assert_eq!(names(&answer).len(), 1, "one client, one backend: {answer}");
        // Across processes too: the client is the network namespace (the pod).
        let again = cgroup.probe(&["tcp", VIP, "20"]);
        assert_eq!(names(&again)[0].0, names(&answer)[0].0, "{again}");
        assert_eq!(agent.map_entries()["mesh_affinity"], 1, "one client remembered");

        // Deleting the Service deletes every entry of it, the remembered client included.
        agent.write_config("# no services\n");
        wait_until(
            || agent.map_entries().as_object().unwrap().values().all(|n| n == 0),
            || format!("entries left: {}", agent.map_entries()),
        );
        agent.stop();
    });
}

#[test]
fn maglev_is_consistent_and_survives_other_backends_leaving() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("maglev");
        let mut svc = service(ready3());
        svc.annotations = "mesh.dev/lb-algorithm: maglev";
        let agent = Agent::start(AgentSpec::new(&svc.render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "40"]);
        let got = names(&answer);
        assert_eq!(got.len(), 1, "Maglev maps one client to one backend: {answer}");
        let chosen = got[0].0.clone();
        let chosen_ip = format!("127.0.0.1{}", &chosen[1..]);
        // Remove another backend: this client must stay where it is.
        let removed = ["127.0.0.11", "127.0.0.12", "127.0.0.13"].into_iter().find(|ip| *ip != chosen_ip).unwrap();
        let keep: Vec<Endpoint<'_>> = ready3().into_iter().filter(|e| e.address != removed).collect();
        let left: Vec<String> = keep.iter().map(|e| format!("{}:8080", e.address)).collect();
        agent.write_config(&ServiceYaml { endpoints: keep, ..svc }.render());
        agent.wait_backends(VIP, &left.iter().map(String::as_str).collect::<Vec<_>>());
        let after = cgroup.probe(&["tcp", VIP, "40"]);
        assert_eq!(names(&after), vec![(chosen, 40)], "{after}");
        agent.stop();
    });
}

#[test]
fn ipv6_services_balance_and_show_the_vip() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["[::1]:8081"]);
        let _b2 = Backend::start("b2", &["[::1]:8082"]);
        let cgroup = TestCgroup::new("ipv6");
        // Two IPv6 Services whose endpoints are ::1 on different ports.
        let yaml = format!(
            "{}\n---\n{}",
            ServiceYaml { name: "v6a", cluster_ip: "fd00:96::10", target_port: 8081, ..ServiceYaml::web(vec![Endpoint::ready("::1")]) }
                .render(),
            ServiceYaml { name: "v6b", cluster_ip: "fd00:96::11", target_port: 8082, ..ServiceYaml::web(vec![Endpoint::ready("::1")]) }
                .render(),
        );
        let agent = Agent::start(AgentSpec::new(&yaml, &cgroup));
        let a = cgroup.probe(&["tcp", "[fd00:96::10]:80", "10"]);
        assert_eq!(names(&a), vec![("b1".to_owned(), 10)], "{a}");
        let b = cgroup.probe(&["peer", "[fd00:96::11]:80"]);
        assert_eq!(b["peer"], "[fd00:96::11]:80", "{b}");
        assert_eq!(b["name"], "b2", "{b}");
        agent.stop();
    });
}

#[test]
fn udp_request_reply_through_a_vip() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("udp");
        let mut svc = service(ready3());
        svc.protocol = "UDP";
        svc.port = 53;
        let agent = Agent::start(AgentSpec::new(&svc.render(), &cgroup));
        // Unconnected: every reply must appear to come from the VIP (recvmsg translation).
        let answer = cgroup.probe(&["udp", "10.96.0.10:53", "60"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        assert_eq!(answer["sources"], serde_json::json!({"10.96.0.10:53": 60}), "{answer}");
        assert!(names(&answer).len() >= 2, "datagrams are balanced: {answer}");
        // Connected, as resolvers do: getpeername shows the VIP, replies arrive.
        let connected = cgroup.probe(&["udp-connected", "10.96.0.10:53", "5"]);
        assert_eq!(connected["peer"], "10.96.0.10:53", "{connected}");
        assert_eq!(names(&connected).iter().map(|(_, n)| n).sum::<u64>(), 5, "{connected}");
        agent.stop();
    });
}

#[test]
fn udp_reverse_translations_go_with_their_socket() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("udp-release");
        let mut svc = service(ready3());
        svc.protocol = "UDP";
        svc.port = 53;
        let agent = Agent::start(AgentSpec::new(&svc.render(), &cgroup));
        let entries = |map: &str| agent.map_entries()[map].as_u64().unwrap_or(u64::MAX);
        // One-shot sockets, as short-lived clients open them, connected or not: nothing of
        // theirs stays behind (before, their entries filled the LRU until it evicted those of
        // live sockets, whose replies then showed the backend's address).
        for _ in 0..5 {
            let answer = cgroup.probe(&["udp", "10.96.0.10:53", "6"]);
            assert_eq!(error_count(&answer), 0, "{answer}");
            assert_eq!(answer["sources"], serde_json::json!({"10.96.0.10:53": 6}), "{answer}");
        }
        let connected = cgroup.probe(&["udp-connected", "10.96.0.10:53", "2"]);
        assert_eq!(connected["peer"], "10.96.0.10:53", "{connected}");
        wait_until(|| entries("mesh_revnat") == 0 && entries("mesh_revnat_idx") == 0, || format!("{}", agent.map_entries()));
        assert_eq!(agent.metric("mesh_kernel_dropped_records", &[("reason", "revnat")]), 0.0);
        agent.stop();
    });
}

#[test]
fn endpoint_removal_applies_to_new_connections_while_established_ones_continue() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("removal");
        let agent = Agent::start(AgentSpec::new(&service(ready3()).render(), &cgroup));

        // Hold a connection open, and learn which backend it reached.
        let mut held = cgroup.hold(VIP);
        let first = held.send("one");
        let held_backend = first["answer"].as_str().expect("answer").split(':').next().unwrap().to_owned();
        let held_ip = format!("127.0.0.1{}", &held_backend[1..]);

        // Remove that backend.
        let rest: Vec<Endpoint<'_>> = ready3().into_iter().filter(|e| e.address != held_ip).collect();
        let left: Vec<String> = rest.iter().map(|e| format!("{}:8080", e.address)).collect();
        agent.write_config(&service(rest).render());
        agent.wait_backends(VIP, &left.iter().map(String::as_str).collect::<Vec<_>>());

        let entries = agent.map_entries();
        assert_eq!((entries["mesh_backends"].as_u64(), entries["mesh_slots"].as_u64()), (Some(2), Some(2)), "{entries}");
        let answer = cgroup.probe(&["tcp", VIP, "100"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        assert!(names(&answer).iter().all(|(n, _)| *n != held_backend), "{held_backend} was removed: {answer}");
        // The established connection still talks to its backend.
        assert_eq!(held.send("two")["answer"], format!("{held_backend}:two"));
        held.close();
        agent.stop();
    });
}
