//! `cargo xtask bench l4`: what the kernel datapath costs, as ratios against a baseline in the
//! same run. In a network namespace of its own, one client and one server pinned to their own
//! core; variants interleaved trial by trial so drift hits all alike; medians reported.
//!
//! - direct: client and server outside the mesh cgroup (no program runs);
//! - meshed: both in the cgroup, the client dials the server's own address (sock_ops counts
//!   the connection on both ends, the agent turns the records into metrics);
//! - vip: both in the cgroup, the client dials the Service VIP (socket LB on top of meshed);
//! - sockmap: as vip, in a second cgroup whose agent runs with --sockmap true (same-node
//!   redirection past TCP/IP).
//!
//! vip/meshed is what socket-level balancing costs (the targets); vip/direct is the whole
//! mesh, per-connection telemetry included.
use std::{collections::BTreeMap, fs, process::Command};

use anyhow::Context as _;
use mesh_tests::{Agent, AgentSpec, Backend, TestCgroup, in_netns};
use serde_json::{Value, json};

use crate::bootstrap::{release_bin, workspace_root};

const TRIALS: usize = 9;
const SECS: &str = "1";
const DIRECT: &str = "127.0.0.31:7000";
const MESHED: &str = "127.0.0.32:7000";
const VIP: &str = "10.96.0.50:7000";
const REDIRECTED: &str = "127.0.0.33:7000";
const VIP_REDIRECTED: &str = "10.96.0.51:7000";

struct Case {
    name: &'static str,
    args: &'static [&'static str],
    /// The JSON field compared.
    metric: &'static str,
    unit: &'static str,
    higher_is_better: bool,
}

const CASES: &[Case] = &[
    Case { name: "rr 1B", args: &["rr", "1", SECS], metric: "ops_per_s", unit: "round trips/s", higher_is_better: true },
    Case { name: "rr 1B p50", args: &["rr", "1", SECS], metric: "p50_us", unit: "us", higher_is_better: false },
    Case { name: "rr 1KiB", args: &["rr", "1024", SECS], metric: "ops_per_s", unit: "round trips/s", higher_is_better: true },
    // Bulk swings most on a shared VM: longer trials.
    Case { name: "bulk 64KiB", args: &["bulk", "65536", "3"], metric: "bytes_per_s", unit: "MiB/s", higher_is_better: true },
    Case { name: "connect+close", args: &["crr", SECS], metric: "ops_per_s", unit: "conns/s", higher_is_better: true },
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Direct,
    Meshed,
    Vip,
    Sockmap,
}

const VARIANTS: [Variant; 4] = [Variant::Direct, Variant::Meshed, Variant::Vip, Variant::Sockmap];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Meshed => "meshed",
            Variant::Vip => "vip",
            Variant::Sockmap => "sockmap",
        }
    }
}

mod l7;

pub fn run(suite: &str) -> anyhow::Result<()> {
    if suite == "l7" {
        // SAFETY: plain geteuid(2).
        anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the benchmark attaches eBPF programs: run as root");
        return l7::run();
    }
    anyhow::ensure!(suite == "l4", "unknown benchmark {suite:?}: try `l4` or `l7`");
    // SAFETY: plain geteuid(2).
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the benchmark attaches eBPF programs: run as root");
    // SAFETY: single-threaded at this point.
    unsafe {
        std::env::set_var("MESH_BIN", release_bin("mesh"));
        std::env::set_var("MESH_PROBE_BIN", release_bin("mesh-probe"));
    }
    let results = in_netns(measure);
    let report = report(&results);
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join("l4.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?).with_context(|| path.display().to_string())?;
    println!("\n[bench] results written to {}", path.display());
    Ok(())
}

/// (case, variant) → one value per trial.
type Results = BTreeMap<(&'static str, Variant), Vec<f64>>;

fn measure() -> Results {
    let cgroup = TestCgroup::new("bench");
    let bench = release_bin("mesh-bench");
    let _direct = Backend::spawn_raw(Command::new("taskset").args(["-c", "1"]).arg(&bench).args(["serve", DIRECT]));
    let _meshed = Backend::spawn_raw(cgroup.command("taskset").args(["-c", "1"]).arg(&bench).args(["serve", MESHED]));
    let agent = Agent::start(AgentSpec::new(&bench_service("bench", "10.96.0.50", "127.0.0.32"), &cgroup));
    let redirect_cgroup = TestCgroup::new("bench-sockmap");
    let _redirected = Backend::spawn_raw(redirect_cgroup.command("taskset").args(["-c", "1"]).arg(&bench).args(["serve", REDIRECTED]));
    let redirected_service = bench_service("bench-sockmap", "10.96.0.51", "127.0.0.33");
    let redirect_agent = Agent::start(AgentSpec {
        extra_args: vec!["--sockmap", "true"],
        port_base: 16000,
        ..AgentSpec::new(&redirected_service, &redirect_cgroup)
    });
    println!("[bench] {TRIALS} trials of {SECS}s per case and variant; client on CPU 0, server on CPU 1");

    let mut results = Results::new();
    for case in CASES {
        for trial in 0..TRIALS {
            for variant in VARIANTS {
                let (mut cmd, target) = match variant {
                    Variant::Direct => (Command::new("taskset"), DIRECT),
                    Variant::Meshed => (cgroup.command("taskset"), MESHED),
                    Variant::Vip => (cgroup.command("taskset"), VIP),
                    Variant::Sockmap => (redirect_cgroup.command("taskset"), VIP_REDIRECTED),
                };
                cmd.args(["-c", "0"]).arg(&bench).arg(case.args[0]).arg(target).args(&case.args[1..]);
                let out = mesh_tests::run(&mut cmd);
                let value: Value = serde_json::from_str(out.trim()).expect("bench JSON");
                let v = value[case.metric].as_f64().expect("metric");
                results.entry((case.name, variant)).or_default().push(v);
            }
            print!("\r[bench] {:<14} trial {}/{TRIALS}", case.name, trial + 1);
            let _ = std::io::Write::flush(&mut std::io::stdout());
        }
        println!();
    }
    agent.stop();
    redirect_agent.stop();
    results
}

/// A Service with the bench server's two ports (7000, and 7001 for connect+close).
fn bench_service(name: &str, vip: &str, backend: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
         spec: {{clusterIP: {vip}, ports: [{{name: main, port: 7000}}, {{name: crr, port: 7001}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: {name}, namespace: bench, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: main, port: 7000}}, {{name: crr, port: 7001}}]\n\
         endpoints: [{{addresses: [{backend}]}}]\n"
    )
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(results: &Results) -> Value {
    println!(
        "\n{:<14} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>10}  unit",
        "case", "direct", "meshed", "vip", "sockmap", "vip/meshed", "vip/direct", "sockmap/vip"
    );
    let mut cases = serde_json::Map::new();
    for case in CASES {
        let scale = if case.unit == "MiB/s" { 1.0 / (1024.0 * 1024.0) } else { 1.0 };
        let value = |v: Variant| median(&results[&(case.name, v)]) * scale;
        // Ratios are medians of per-trial ratios: the variants of one trial ran back to back,
        // so drift of the machine (a VM's neighbours) cancels out. Above 1 is better than the
        // baseline, whichever way the metric points.
        let ratio = |a: Variant, b: Variant| {
            let pairs: Vec<f64> = results[&(case.name, a)]
                .iter()
                .zip(&results[&(case.name, b)])
                .map(|(x, y)| if case.higher_is_better { x / y } else { y / x })
                .collect();
            median(&pairs)
        };
        let (direct, meshed, vip, sockmap) =
            (value(Variant::Direct), value(Variant::Meshed), value(Variant::Vip), value(Variant::Sockmap));
        let (vip_meshed, vip_direct, sockmap_vip) =
            (ratio(Variant::Vip, Variant::Meshed), ratio(Variant::Vip, Variant::Direct), ratio(Variant::Sockmap, Variant::Vip));
        println!(
            "{:<14} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>10.3} {:>10.3} {:>10.3}  {}",
            case.name, direct, meshed, vip, sockmap, vip_meshed, vip_direct, sockmap_vip, case.unit
        );
        let trials: serde_json::Map<String, Value> =
            VARIANTS.iter().map(|v| (v.name().to_owned(), json!(results[&(case.name, *v)]))).collect();
        cases.insert(
            case.name.to_owned(),
            json!({
                "unit": case.unit,
                "higher_is_better": case.higher_is_better,
                "direct": direct,
                "meshed": meshed,
                "vip": vip,
                "sockmap": sockmap,
                "vip_vs_meshed": vip_meshed,
                "sockmap_vs_vip": sockmap_vip,
                "vip_vs_direct": vip_direct,
                "trials": trials,
            }),
        );
    }
    println!("\ntargets (vip/meshed): >= 0.97 for round trips and bulk, >= 0.95 for connect+close");
    println!("sockmap pays if sockmap/vip >= 1.30 for rr 1B p50 (30% lower latency) and >= 1.0 for bulk");
    json!({ "suite": "l4", "trials": TRIALS, "seconds_per_trial": SECS, "cases": cases })
}
