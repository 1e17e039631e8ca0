//! L4 telemetry from the kernel's connection records: metrics, flow log, `mesh conns`.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use mesh_tests::*;

const VIP: &str = "10.96.0.10:80";
const SERVICE: (&str, &str) = ("destination_service", "web.test.svc.cluster.local");

fn ready3() -> Vec<Endpoint<'static>> {
    vec![Endpoint::ready("127.0.0.11"), Endpoint::ready("127.0.0.12"), Endpoint::ready("127.0.0.13")]
}

fn three_backends() -> [Backend; 3] {
    [Backend::start("b1", &["127.0.0.11:8080"]), Backend::start("b2", &["127.0.0.12:8080"]), Backend::start("b3", &["127.0.0.13:8080"])]
}

#[test]
fn istio_tcp_metrics_count_connections_and_bytes_exactly() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("metrics");
        let agent = Agent::start(AgentSpec::new(&ServiceYaml::web(ready3()).render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "50"]);
        assert_eq!(error_count(&answer), 0, "{answer}");

        let source = [("reporter", "source"), SERVICE];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &source) == 50.0, || agent.metrics());
        assert_eq!(agent.metric("istio_tcp_connections_opened_total", &source), 50.0);
        // Each connection: request "hello\n" (6 bytes), response "bN:hello\n" (9 bytes).
        assert_eq!(agent.metric("istio_tcp_received_bytes_total", &source), 50.0 * 6.0, "{}", agent.metrics());
        assert_eq!(agent.metric("istio_tcp_sent_bytes_total", &source), 50.0 * 9.0, "{}", agent.metrics());
        // Workloads come from the EndpointSlice; the backends have no targetRef here.
        assert_eq!(agent.metric("istio_tcp_connections_closed_total", &[("destination_workload", "unknown")]), 50.0);
        assert_eq!(agent.metric("mesh_kernel_dropped_records", &[("reason", "events")]), 0.0);

        // Traffic to no Service is counted too, as destination_service="unknown".
        cgroup.probe(&["tcp", "127.0.0.12:8080", "4"]);
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &[("destination_service", "unknown")]) == 4.0, || agent.metrics());
        agent.stop();
    });
}

/// A client that closes first while the server keeps its end open: the client's FIN is
/// acknowledged alone, and the kernel hands the closed socket to a timewait socket before the
/// server's FIN arrives. The received bytes must not lose one for a FIN never received.
#[test]
fn bytes_are_exact_when_the_client_closes_first_and_its_fin_is_acknowledged_alone() {
    in_netns(|| {
        let _backend = Backend::start("linger500", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("linger");
        let agent = Agent::start(AgentSpec::new(&ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")]).render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "3"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        let source = [("reporter", "source"), SERVICE];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &source) == 3.0, || agent.metrics());
        // Response "linger500:hello\n": 16 bytes each.
        assert_eq!(agent.metric("istio_tcp_sent_bytes_total", &source), 3.0 * 16.0, "{}", agent.metrics());
        assert_eq!(agent.metric("istio_tcp_received_bytes_total", &source), 3.0 * 6.0, "{}", agent.metrics());
        agent.stop();
    });
}

/// Openings are counted from the live-connection table (no record per establishment): a
/// long-lived connection shows up within a scan, and its close does not count it again.
#[test]
fn a_connection_is_counted_as_opened_while_it_lives_and_only_once() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("opened");
        let agent = Agent::start(AgentSpec::new(&ServiceYaml::web(ready3()).render(), &cgroup));
        let mut held = cgroup.hold(VIP);
        held.send("one");
        let source = [("reporter", "source"), SERVICE];
        wait_until(|| agent.metric("istio_tcp_connections_opened_total", &source) == 1.0, || agent.metrics());
        assert_eq!(agent.metric("istio_tcp_connections_closed_total", &source), 0.0, "{}", agent.metrics());
        held.send("two");
        held.close();
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &source) == 1.0, || agent.metrics());
        assert_eq!(agent.metric("istio_tcp_connections_opened_total", &source), 1.0, "{}", agent.metrics());
        // "one\n" and "two\n" out, "bN:one\n" and "bN:two\n" back, each byte counted once.
        assert_eq!(agent.metric("istio_tcp_received_bytes_total", &source), 8.0, "{}", agent.metrics());
        assert_eq!(agent.metric("istio_tcp_sent_bytes_total", &source), 14.0, "{}", agent.metrics());
        agent.stop();
    });
}

#[test]
fn thousands_of_short_connections_leave_no_connection_entries() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("churn");
        let agent = Agent::start(AgentSpec::new(&ServiceYaml::web(ready3()).render(), &cgroup));
        let answer = cgroup.probe(&["tcp", VIP, "3000"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &[SERVICE]) == 3000.0, || agent.metrics());
        // Every close deleted its entries: nothing lingers for dead connections, neither the
        // connection record nor the reverse translation of the VIP.
        assert_eq!(agent.map_entries()["mesh_conns"], 0, "{}", agent.map_entries());
        assert_eq!(agent.map_entries()["mesh_revnat"], 0, "{}", agent.map_entries());
        assert_eq!(agent.metric("mesh_kernel_dropped_records", &[]), 0.0);
        agent.stop();
    });
}

#[test]
fn connects_that_fail_leave_no_connection_entries() {
    in_netns(|| {
        // One Service whose backend refuses (the SYN is answered with a reset), one whose
        // backend has no route in this namespace (connect() fails before any SYN leaves).
        let refused = ServiceYaml { name: "refused", cluster_ip: "10.96.0.20", ..ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")]) };
        let unroutable =
            ServiceYaml { name: "unroutable", cluster_ip: "10.96.0.21", ..ServiceYaml::web(vec![Endpoint::ready("10.1.2.3")]) };
        let yaml = format!("{}---\n{}", refused.render(), unroutable.render());
        let cgroup = TestCgroup::new("failed");
        let agent = Agent::start(AgentSpec::new(&yaml, &cgroup));
        let answer = cgroup.probe(&["tcp", "10.96.0.20:80", "200"]);
        assert_eq!(answer["errors"]["ECONNREFUSED"], 200, "{answer}");
        // The reset closes each socket, and its close frees what connect() took at once.
        assert_eq!(agent.map_entries()["mesh_conns"], 0, "{}", agent.map_entries());
        let answer = cgroup.probe(&["tcp", "10.96.0.21:80", "200"]);
        assert_eq!(answer["errors"]["ENETUNREACH"], 200, "{answer}");
        // No callback ever sees these sockets again: their slots are free for the taking once a
        // connect() cannot still be under way.
        wait_until(|| agent.map_entries()["mesh_conns"] == 0, || agent.map_entries().to_string());
        assert_eq!(agent.map_entries()["mesh_conns_ovfl"], 0, "{}", agent.map_entries());
        assert_eq!(agent.metric("istio_tcp_connections_opened_total", &[]), 0.0, "{}", agent.metrics());
        agent.stop();
    });
}

/// A connect() that failed before its SYN leaves its entry in the slot with nothing to free it:
/// the next connection needing that slot takes it once a second has passed.
#[test]
fn a_dial_that_never_sent_its_syn_gives_up_its_slot_after_a_second() {
    in_netns(|| {
        let _backends = three_backends();
        let unroutable =
            ServiceYaml { name: "unroutable", cluster_ip: "10.96.0.21", ..ServiceYaml::web(vec![Endpoint::ready("10.1.2.3")]) };
        let yaml = format!("{}---\n{}", ServiceYaml::web(ready3()).render(), unroutable.render());
        let cgroup = TestCgroup::new("deaddial");
        // One slot: every connection needs the slot the dead dial holds.
        let agent = Agent::start(AgentSpec { extra_args: vec!["--conn-slots", "1"], ..AgentSpec::new(&yaml, &cgroup) });
        let answer = cgroup.probe(&["tcp", "10.96.0.21:80", "1"]);
        assert_eq!(answer["errors"]["ENETUNREACH"], 1, "{answer}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let mut held = cgroup.hold(VIP);
        held.send("one");
        let entries = agent.map_entries();
        assert_eq!((entries["mesh_conns"].as_u64(), entries["mesh_conns_ovfl"].as_u64()), (Some(1), Some(0)), "{entries}");
        held.close();
        agent.stop();
    });
}

/// With one slot in use, all but one connection at a time live in the overflow map: they must
/// be counted, translated back and freed exactly like the others.
#[test]
fn connections_beyond_their_slot_are_tracked_in_the_overflow_map() {
    in_netns(|| {
        let cgroup = TestCgroup::new("overflow");
        // Backends in the cgroup too: both ends of every connection need an entry.
        let _backends = [
            Backend::start_in(&cgroup, "b1", &["127.0.0.11:8080"]),
            Backend::start_in(&cgroup, "b2", &["127.0.0.12:8080"]),
            Backend::start_in(&cgroup, "b3", &["127.0.0.13:8080"]),
        ];
        let yaml = ServiceYaml::web(ready3()).render();
        let agent = Agent::start(AgentSpec { extra_args: vec!["--conn-slots", "1"], ..AgentSpec::new(&yaml, &cgroup) });
        let mut held = cgroup.hold(VIP);
        held.send("one");

        let answer = cgroup.probe(&["tcp", VIP, "50"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        for _ in 0..3 {
            let answer = cgroup.probe(&["peer", VIP]);
            assert_eq!(answer["peer"], VIP, "{answer}");
        }
        let source = [("reporter", "source"), SERVICE];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &source) == 53.0, || agent.metrics());
        // Each connection: request "hello\n" (6 bytes), response "bN:hello\n" (9 bytes).
        assert_eq!(agent.metric("istio_tcp_received_bytes_total", &source), 53.0 * 6.0, "{}", agent.metrics());
        assert_eq!(agent.metric("istio_tcp_sent_bytes_total", &source), 53.0 * 9.0, "{}", agent.metrics());
        let destination = [("reporter", "destination")];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &destination) == 53.0, || agent.metrics());
        assert_eq!(agent.metric("istio_tcp_received_bytes_total", &destination), 53.0 * 6.0, "{}", agent.metrics());

        // Both ends of the held connection: one in the slot, one in the overflow map.
        let rows: Value =
            serde_json::from_str(&run(Command::new(mesh_bin()).args(["conns", "--json", "--bpffs", agent.bpffs.to_str().unwrap()])))
                .unwrap();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().any(|r| r["direction"] == "outbound" && r["service_address"] == VIP), "{rows:?}");
        assert!(rows.iter().any(|r| r["direction"] == "inbound"), "{rows:?}");
        assert_eq!(agent.map_entries()["mesh_conns"], 1, "{}", agent.map_entries());
        assert_eq!(agent.map_entries()["mesh_conns_ovfl"], 1, "{}", agent.map_entries());

        held.close();
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &source) == 54.0, || agent.metrics());
        wait_until(|| agent.map_entries()["mesh_conns_ovfl"] == 0, || agent.map_entries().to_string());
        assert_eq!(agent.map_entries()["mesh_conns"], 0, "{}", agent.map_entries());
        agent.stop();
    });
}

#[test]
fn the_flow_log_has_one_line_per_closed_connection() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("flowlog");
        let log = std::env::temp_dir().join(unique_name("flows.jsonl"));
        let log_arg = log.to_str().unwrap().to_owned();
        let yaml = ServiceYaml::web(ready3()).render();
        let agent = Agent::start(AgentSpec { extra_args: vec!["--flow-log", &log_arg], ..AgentSpec::new(&yaml, &cgroup) });
        cgroup.probe(&["tcp", VIP, "20"]);
        let lines = || std::fs::read_to_string(&log).unwrap_or_default();
        wait_until(|| lines().lines().count() == 20, lines);
        for line in lines().lines() {
            let flow: Value = serde_json::from_str(line).expect("JSON line");
            assert_eq!(flow["event"], "tcp_close");
            assert_eq!(flow["destination_service"], SERVICE.1);
            assert_eq!(flow["connection"]["service_address"], VIP, "{flow}");
            assert_eq!(flow["connection"]["bytes_sent"], 6, "{flow}");
            assert_eq!(flow["connection"]["bytes_received"], 9, "{flow}");
        }
        agent.stop();
        let _ = std::fs::remove_file(&log);
    });
}

#[test]
fn mesh_conns_shows_live_connections_even_without_the_agent() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("conns");
        let yaml = ServiceYaml::web(ready3()).render();
        let agent = Agent::start(AgentSpec { keep_datapath: true, ..AgentSpec::new(&yaml, &cgroup) });
        let bpffs = agent.bpffs.clone();
        let _pins = PinsGuard(bpffs.clone());
        let mut held = cgroup.hold(VIP);
        let first = held.send("one");
        let backend = format!("127.0.0.1{}:8080", &first["answer"].as_str().unwrap()[1..2]);
        agent.stop();

        let conns = || -> Value {
            serde_json::from_str(&run(Command::new(mesh_bin()).args(["conns", "--json", "--bpffs", bpffs.to_str().unwrap()]))).unwrap()
        };
        let rows = conns();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(rows[0]["direction"], "outbound");
        assert_eq!(rows[0]["service_address"], VIP);
        assert_eq!(rows[0]["destination"], backend);
        // Counters refresh from RTT samples at most once a second.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        held.send("two");
        wait_until(|| conns()[0]["bytes_sent"].as_u64() == Some(8), || conns().to_string());
        held.close();
    });
}

#[test]
fn servers_in_the_cgroup_report_inbound_connections_as_destination() {
    in_netns(|| {
        let cgroup = TestCgroup::new("inbound");
        let _server = Backend::start_in(&cgroup, "s1", &["127.0.0.21:9000"]);
        let agent = Agent::start(AgentSpec::new(&ServiceYaml::web(vec![]).render(), &cgroup));
        // The client is outside the cgroup: only the server's side is tracked.
        let answer = probe_outside(&["tcp", "127.0.0.21:9000", "10"]);
        assert_eq!(names(&answer), vec![("s1".to_owned(), 10)], "{answer}");
        let destination = [("reporter", "destination")];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &destination) == 10.0, || agent.metrics());
        assert_eq!(agent.metric("istio_tcp_connections_opened_total", &[("reporter", "source")]), 0.0);
        // Istio's sense: sent = response ("s1:hello\n"), received = request ("hello\n").
        assert_eq!(agent.metric("istio_tcp_sent_bytes_total", &destination), 10.0 * 9.0, "{}", agent.metrics());
        assert_eq!(agent.metric("istio_tcp_received_bytes_total", &destination), 10.0 * 6.0, "{}", agent.metrics());
        agent.stop();
    });
}

#[test]
fn mesh_programs_shows_what_the_datapath_ran_while_sampling() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("programs");
        let agent = Agent::start(AgentSpec::new(&ServiceYaml::web(ready3()).render(), &cgroup));
        let bpffs = agent.bpffs.to_str().unwrap().to_owned();
        let programs = || -> Vec<Value> {
            serde_json::from_str(&run(Command::new(mesh_bin()).args(["programs", "--json", "--bpffs", &bpffs]))).unwrap()
        };
        let row =
            |rows: &[Value], name: &str| rows.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no {name} in {rows:?}")).clone();

        // Listed without statistics: every attached program, with its id and machine code.
        let listed = programs();
        for name in ["mesh_connect4", "mesh_connect6", "mesh_sendmsg4", "mesh_recvmsg4", "mesh_getpeer4", "mesh_sockops"] {
            let r = row(&listed, name);
            assert!(r["id"].as_u64().unwrap() > 0 && r["jited_bytes"].as_u64().unwrap() > 0, "{r}");
        }

        // Sampling: exactly one connect4 run per connection made in the window.
        let mut sampler = Command::new(mesh_bin())
            .args(["programs", "--json", "--sample", "5", "--bpffs", &bpffs])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut started = String::new();
        BufReader::new(sampler.stderr.take().unwrap()).read_line(&mut started).unwrap();
        assert!(started.starts_with("sampling the datapath"), "{started}");
        assert_eq!(error_count(&cgroup.probe(&["tcp", VIP, "30"])), 0);
        let out = sampler.wait_with_output().unwrap();
        assert!(out.status.success());
        let sampled: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(row(&sampled, "mesh_connect4")["run_count"], 30, "{sampled:?}");
        let sockops = row(&sampled, "mesh_sockops");
        // Established and state changes of 30 client sockets, at least.
        assert!(sockops["run_count"].as_u64().unwrap() >= 60, "{sockops}");
        assert!(sockops["run_time_ns"].as_u64().unwrap() > 0, "{sockops}");

        // The statistics went off with the sampler: counts stand still (unless someone turned
        // them on for the whole machine).
        if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default().trim() == "0" {
            let before = row(&programs(), "mesh_connect4")["run_count"].clone();
            cgroup.probe(&["tcp", VIP, "5"]);
            assert_eq!(row(&programs(), "mesh_connect4")["run_count"], before);
        }
        agent.stop();
    });
}

#[test]
fn the_kernel_tells_which_pod_dialled_by_its_cgroup() {
    in_netns(|| {
        let _backends = three_backends();
        let cgroup = TestCgroup::new("pod-identity");
        // Two "pods" below the attached cgroup; the client runs in a container cgroup of the
        // first, as containers sit below their pod's cgroup.
        let pod = cgroup.child("pod-cli");
        let container = pod.child("container-1");
        let other = cgroup.child("pod-other");
        let mount = cgroup2_root();
        let under = |c: &TestCgroup| std::path::Path::new("/").join(c.path.strip_prefix(&mount).unwrap()).display().to_string();
        let pods = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: cli-7d4f8b9c6-x2x9k, namespace: tools, uid: u-1, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
             spec: {{serviceAccountName: ops, containers: []}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: other, namespace: tools, uid: u-2, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
             spec: {{containers: []}}\n---\n{}",
            under(&pod),
            under(&other),
            ServiceYaml::web(ready3()).render()
        );
        let agent = Agent::start(AgentSpec::new(&pods, &cgroup));
        let kernel_ids = || -> Vec<Value> {
            agent.config_dump()["workloads"].as_array().into_iter().flatten().map(|w| w["kernel_id"].clone()).collect()
        };
        wait_until(|| kernel_ids().iter().all(|id| id.is_u64()), || format!("{:#}", agent.config_dump()["workloads"]));

        let answer = parse_probe(container.command(probe_bin()).args(["tcp", VIP, "3"]));
        assert_eq!(error_count(&answer), 0, "{answer}");
        let from_cli = [
            ("reporter", "source"),
            ("source_workload", "cli"),
            ("source_workload_namespace", "tools"),
            ("source_principal", "spiffe://cluster.local/ns/tools/sa/ops"),
        ];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &from_cli) == 3.0, || agent.metrics());
        // From the attached cgroup itself (no pod's): no pod identity.
        let answer = cgroup.probe(&["tcp", VIP, "2"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        let unknown = [("reporter", "source"), ("source_principal", "unknown")];
        wait_until(|| agent.metric("istio_tcp_connections_closed_total", &unknown) == 2.0, || agent.metrics());

        // The pod deleted from the configuration: its entry leaves the kernel map.
        agent.write_config(&ServiceYaml::web(ready3()).render());
        wait_until(|| agent.map_entries()["mesh_workloads"] == 0, || format!("{}", agent.map_entries()));
        agent.stop();
        drop((container, pod, other));
    });
}
