//! `cargo xtask bench mtls`: a client pod on node A and a server pod on node B (two network
//! namespaces joined by veth), through both nodes' agents (HBONE: HTTP/2 CONNECT in mutual TLS),
//! against Envoy configured for mTLS between two Envoys (a client-side Envoy originating TLS
//! with the client's certificate over HTTP/2, a server-side Envoy terminating it, as Istio's
//! sidecars do), and direct (plain, no proxy), in one run. The client (wrk, oha) and the server
//! (nginx) share CPU 0; the proxies of both nodes share CPU 1, one core for the two hops.
//!
//! Rows: requests/s over keep-alive connections, its ratio to direct, p50/p99, the proxies' CPU
//! (both hops together) per request and their RSS; then latency at a fixed rate; then new
//! connections per second (a connection per request); then the agents' memory per 1,000 idle
//! tunneled connections.
use std::{fs, path::Path, process::Command, time::Duration};

use mesh_tests::{Agent, AgentSpec, NodeB, TestCgroup, in_netns, openssl_cert, two_node_config};
use serde_json::{Value, json};

use super::l7::{Proc, fixed_rate, load, nginx_conf, oha, spawn, tools, usage};
use crate::bootstrap::{dist_bin, workspace_root};

const SERVER: &str = "10.200.1.2:8080";
const VIP: &str = "10.96.0.10:80";
const ENVOY_A: &str = "127.0.0.2:10000";
const ENVOY_B: &str = "10.200.0.2:15009";
const IDLE_TUNNELS: usize = 1000;

pub fn run() -> anyhow::Result<()> {
    let envoy = tools()?;
    let oha = oha()?;
    // SAFETY: single-threaded at this point.
    unsafe {
        std::env::set_var("MESH_BIN", dist_bin("mesh"));
        std::env::set_var("MESH_PROBE_BIN", dist_bin("mesh-probe"));
    }
    let dir = workspace_root().join("target/bench/mtls");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let report = in_netns(|| measure(&envoy, &oha, &dir));
    let path = workspace_root().join("target/bench/mtls.json");
    fs::write(&path, serde_json::to_string_pretty(&report?)?)?;
    println!("\n[bench mtls] results written to {}", path.display());
    Ok(())
}

/// A `common_tls_context` block (and its key) for a YAML position `indent` spaces deep: TLS 1.3,
/// ALPN h2, this side's certificate, the peer checked against the root and its SPIFFE id.
fn tls_context(indent: usize, cert: &str, key: &str, root: &str, peer: &str) -> String {
    let (child, grandchild) = (" ".repeat(indent + 2), " ".repeat(indent + 4));
    format!(
        "common_tls_context:\n{child}tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}\n{child}alpn_protocols: [h2]\n\
         {child}tls_certificates: [{{certificate_chain: {{filename: {cert}}}, private_key: {{filename: {key}}}}}]\n\
         {child}validation_context:\n{grandchild}trusted_ca: {{filename: {root}}}\n\
         {grandchild}match_typed_subject_alt_names: [{{san_type: URI, matcher: {{exact: \"{peer}\"}}}}]"
    )
}

/// The client-side Envoy: plain HTTP in, mTLS (HTTP/2) to the server-side Envoy.
fn envoy_a(dir: &Path, ca: &Path, root: &str) -> anyhow::Result<std::path::PathBuf> {
    let (cert, key) = openssl_cert(ca, "spiffe://cluster.local/ns/shop/sa/front");
    let (host, port) = ENVOY_A.split_once(':').expect("addr");
    let (bhost, bport) = ENVOY_B.split_once(':').expect("addr");
    let tls = tls_context(8, &cert, &key, root, "spiffe://cluster.local/ns/shop/sa/web");
    let conf = format!(
        r#"static_resources:
  listeners:
  - address: {{socket_address: {{address: {host}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: front
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: web}}}}]}}]
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: web
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: web.shop.svc
        {tls}
    load_assignment:
      cluster_name: web
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {bhost}, port_value: {bport}}}}}}}}}]}}]
"#
    );
    let path = dir.join("envoy-a.yaml");
    fs::write(&path, conf)?;
    Ok(path)
}

/// The server-side Envoy: mTLS in (client certificate required), plain HTTP/1.1 to the pod.
fn envoy_b(dir: &Path, ca: &Path, root: &str) -> anyhow::Result<std::path::PathBuf> {
    let (cert, key) = openssl_cert(ca, "spiffe://cluster.local/ns/shop/sa/web");
    let (host, port) = ENVOY_B.split_once(':').expect("addr");
    let (bhost, bport) = SERVER.split_once(':').expect("addr");
    let tls = tls_context(10, &cert, &key, root, "spiffe://cluster.local/ns/shop/sa/front");
    let conf = format!(
        r#"static_resources:
  listeners:
  - address: {{socket_address: {{address: {host}, port_value: {port}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: web
          codec_type: AUTO
          route_config:
            virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: pod}}}}]}}]
          http_filters: [{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]
  clusters:
  - name: pod
    type: STATIC
    load_assignment:
      cluster_name: pod
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {bhost}, port_value: {bport}}}}}}}}}]}}]
"#
    );
    let path = dir.join("envoy-b.yaml");
    fs::write(&path, conf)?;
    Ok(path)
}

/// `program args` in node B's network namespace (no cgroup of the mesh's), on CPU `cpu`.
fn on_b(node_b: &NodeB, cpu: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.args(["-t", &node_b.pid().to_string(), "-n", "--", "taskset", "-c", cpu]);
    cmd
}

/// Connections per second with a connection per request (wrk, `Connection: close`).
fn connection_rate(target: &str, cgroup: Option<&TestCgroup>) -> f64 {
    let mut cmd = match cgroup {
        Some(c) => c.command("taskset"),
        None => Command::new("taskset"),
    };
    cmd.args(["-c", "0", "wrk", "-t", "1", "-c", "16", "-d", "5s", "-H", "Connection: close"]).arg(format!("http://{target}/"));
    let text = cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok()).unwrap_or(0.0)
}

/// Waits until the backend's answer comes through `target` (from `cgroup`): a proxy that
/// answers errors would make its numbers meaningless.
fn wait_serving(target: &str, cgroup: Option<&TestCgroup>) -> anyhow::Result<()> {
    let mut last = String::new();
    for _ in 0..200 {
        let mut cmd = match cgroup {
            Some(c) => c.command(dist_bin("mesh-probe")),
            None => Command::new(dist_bin("mesh-probe")),
        };
        let out = cmd.args(["http", target, "1"]).output()?;
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.contains("\"ok\"") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("{target} does not pass requests to the backend: {last}")
}

struct Row {
    via: &'static str,
    pids: Vec<u32>,
    target: &'static str,
    client: Option<TestCgroup>,
}

fn measure(envoy: &Path, oha: &Path, dir: &Path) -> anyhow::Result<Value> {
    let Some(node_b) = NodeB::new() else { anyhow::bail!("this kernel cannot make a veth pair") };
    let ca = dir.join("ca");
    let status = Command::new(dist_bin("mesh")).args(["ca", "init"]).arg(&ca).status()?;
    anyhow::ensure!(status.success(), "mesh ca init");
    let root = ca.join("root-cert.pem").display().to_string();
    let backend_conf = nginx_conf(dir, "backend", &format!(" server {{ listen {SERVER}; location / {{ return 200 \"ok\\n\"; }} }}"));
    let _backend = spawn(on_b(&node_b, "0").args(["nginx", "-c"]).arg(&backend_conf));

    let (cgroup_a, cgroup_b) = (TestCgroup::new("bench-mtls-a"), TestCgroup::new("bench-mtls-b"));
    let (client, server) = (cgroup_a.child("front"), cgroup_b.child("web"));
    let yaml = two_node_config(&client, &server);
    let ca_arg = ca.display().to_string();
    let args = vec!["--ca-dir", ca_arg.as_str(), "--worker-threads", "1"];
    let mut spec_b = AgentSpec::new(&yaml, &cgroup_b);
    (spec_b.node, spec_b.netns_of, spec_b.listen_ip, spec_b.extra_args) = ("node-b", Some(node_b.pid()), Some("10.200.0.2"), args.clone());
    let agent_b = Agent::start(spec_b);
    let agent_a = Agent::start(AgentSpec { extra_args: args, ..AgentSpec::new(&yaml, &cgroup_a) });
    for agent in [&agent_a, &agent_b] {
        let _ = Command::new("taskset").args(["-a", "-p", "-c", "1"]).arg(agent.pid().to_string()).output();
    }
    wait_serving(VIP, Some(&client))?;
    let idle_rss: Vec<f64> = [&agent_a, &agent_b].iter().map(|a| usage(a.pid()).0).collect();

    println!("[bench mtls] client pod on node A -> Service VIP -> pod on node B; proxies of both nodes on CPU 1");
    println!("{:<8} {:>10} {:>7} {:>9} {:>9} {:>11} {:>10}", "via", "req/s", "x dir", "p50 us", "p99 us", "cpu us/req", "RSS MiB");
    let mut rows = vec![
        Row { via: "direct", pids: vec![], target: SERVER, client: None },
        Row { via: "mesh", pids: vec![agent_a.pid(), agent_b.pid()], target: VIP, client: Some(client) },
    ];
    let mut results = Vec::new();
    let mut direct_rps = f64::NAN;
    let mut measure_row = |row: &Row, results: &mut Vec<Value>| {
        let before: f64 = row.pids.iter().map(|p| usage(*p).1).sum();
        let (rps, p50, p99) = load(false, row.target, row.client.as_ref());
        let after: f64 = row.pids.iter().map(|p| usage(*p).1).sum();
        let rss: f64 = row.pids.iter().map(|p| usage(*p).0).sum();
        let requests = rps * 5.0;
        let cpu_us = if row.pids.is_empty() { f64::NAN } else { (after - before) * 1e6 / requests };
        if row.via == "direct" {
            direct_rps = rps;
        }
        println!("{:<8} {rps:>10.0} {:>7.2} {p50:>9.0} {p99:>9.0} {cpu_us:>11.1} {rss:>10.1}", row.via, rps / direct_rps);
        results.push(json!({"via": row.via, "rps": rps, "x_direct": rps / direct_rps, "p50_us": p50, "p99_us": p99, "cpu_us_per_request": cpu_us, "rss_mib": rss}));
    };
    for row in &rows {
        measure_row(row, &mut results);
    }
    let mesh_client = rows.pop().and_then(|r| r.client).expect("mesh row");
    let fixed_mesh = fixed_rate(oha, VIP, Some(&mesh_client));
    let conns_mesh = connection_rate(VIP, Some(&mesh_client));
    let conns_direct = connection_rate(SERVER, None);

    // Idle tunneled connections: the agents' memory for each.
    let stop = dir.join("idle.stop");
    let mut idle = mesh_client.command(dist_bin("mesh-probe"));
    idle.args(["hold-idle", VIP, &IDLE_TUNNELS.to_string()]).arg(&stop);
    let mut holder = Proc(idle.stdout(std::process::Stdio::piped()).spawn()?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.0.stdout.as_mut().expect("stdout")), &mut line)?;
    std::thread::sleep(Duration::from_secs(1));
    let held_rss: Vec<f64> = [&agent_a, &agent_b].iter().map(|a| usage(a.pid()).0).collect();
    let streams = agent_a.metric("mesh_hbone_streams_open", &[("direction", "outbound")]);
    fs::write(&stop, "")?;
    let _ = holder.0.wait();
    let per_thousand: f64 = held_rss.iter().zip(&idle_rss).map(|(h, i)| h - i).sum::<f64>() * 1000.0 / IDLE_TUNNELS as f64;
    agent_a.stop();
    agent_b.stop();
    drop(mesh_client);

    // Envoy, both hops, on CPU 1.
    let envoy_a_conf = envoy_a(dir, &ca, &root)?;
    let envoy_b_conf = envoy_b(dir, &ca, &root)?;
    let envoy_b = spawn(
        on_b(&node_b, "1").arg(envoy).args(["--concurrency", "1", "--log-level", "error", "--base-id", "2", "-c"]).arg(&envoy_b_conf),
    );
    let envoy_a = spawn(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(envoy)
            .args(["--concurrency", "1", "--log-level", "error", "--base-id", "1", "-c"])
            .arg(&envoy_a_conf),
    );
    wait_serving(ENVOY_A, None)?;
    let envoy_row = Row { via: "envoy", pids: vec![envoy_a.0.id(), envoy_b.0.id()], target: ENVOY_A, client: None };
    measure_row(&envoy_row, &mut results);
    let fixed_envoy = fixed_rate(oha, ENVOY_A, None);
    let conns_envoy = connection_rate(ENVOY_A, None);
    drop((envoy_a, envoy_b));

    println!("\nlatency at a fixed rate (oha, corrected for coordinated omission):");
    println!("{:<8} {:>8} {:>9} {:>9} {:>10} {:>8}", "via", "req/s", "p50 us", "p99 us", "p99.9 us", "failed");
    let mut fixed = Vec::new();
    for (via, (rps, p50, p99, p999, failed)) in [("mesh", fixed_mesh), ("envoy", fixed_envoy)] {
        println!("{via:<8} {rps:>8.0} {p50:>9.0} {p99:>9.0} {p999:>10.0} {:>7.2}%", failed * 100.0);
        fixed.push(json!({"via": via, "rps": rps, "p50_us": p50, "p99_us": p99, "p999_us": p999, "failed": failed}));
    }
    println!("\nnew connections/s (a connection per request): direct {conns_direct:.0}, mesh {conns_mesh:.0}, envoy {conns_envoy:.0}");
    println!(
        "agents idle: {:.1} MiB (node A) + {:.1} MiB (node B); {IDLE_TUNNELS} idle tunneled connections ({streams} streams): +{per_thousand:.1} MiB per 1,000",
        idle_rss[0], idle_rss[1]
    );
    println!("targets: <= 20 cpu us/req for both hops; >= 1.5 x Envoy's req/s on one core; under 30 MiB idle");
    Ok(json!({
        "load": results,
        "fixed_rate": fixed,
        "connections_per_s": {"direct": conns_direct, "mesh": conns_mesh, "envoy": conns_envoy},
        "idle": {"agent_a_mib": idle_rss[0], "agent_b_mib": idle_rss[1], "per_1000_tunnels_mib": per_thousand, "streams": streams},
    }))
}
