//! `cargo xtask demo`: three HTTP backends, an agent fed deploy/examples, hundreds of requests to
//! the Service VIP from a process in the attached cgroup, one endpoint removed, the spread
//! following. All in a network namespace of its own with only loopback, cleaned up after.
use std::{
    fs,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tests::{Agent, AgentSpec, Backend, TestCgroup, in_netns, names};

use crate::bootstrap::{target_bin, workspace_root};

const VIP: &str = "10.96.0.10:80";
const REQUESTS: &str = "300";

pub fn run() -> anyhow::Result<()> {
    // SAFETY: plain geteuid(2).
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "the demo attaches eBPF programs: run as root");
    // The helpers find the binaries through these.
    // SAFETY: single-threaded at this point.
    unsafe {
        std::env::set_var("MESH_BIN", target_bin("mesh"));
        std::env::set_var("MESH_PROBE_BIN", target_bin("mesh-probe"));
    }
    let example = fs::read_to_string(workspace_root().join("deploy/examples/web.yaml")).context("deploy/examples/web.yaml")?;
    in_netns(|| demo(&example));
    println!("\n[demo] done: agent stopped, pins removed, cgroup and namespace gone");
    Ok(())
}

fn demo(example: &str) {
    println!("[demo] in a fresh network namespace (loopback only): 3 backends web-0..2 on 127.0.0.11-13:8080");
    let _backends = [
        Backend::start("web-0", &["127.0.0.11:8080"]),
        Backend::start("web-1", &["127.0.0.12:8080"]),
        Backend::start("web-2", &["127.0.0.13:8080"]),
    ];
    let cgroup = TestCgroup::new("demo");
    println!("[demo] agent attached to cgroup {} with deploy/examples/web.yaml", cgroup.path.display());
    let agent = Agent::start(AgentSpec::new(example, &cgroup));
    print!("{}", mesh_tests::run(std::process::Command::new(target_bin("mesh")).args(["services", "--bpffs"]).arg(&agent.bpffs)));

    spread("before", &cgroup);

    println!("\n[demo] removing web-2 (127.0.0.13) from the EndpointSlice");
    let without_web2 = remove_endpoint(example, "127.0.0.13");
    let started = Instant::now();
    agent.write_config(&without_web2);
    agent.wait_backends(VIP, &["127.0.0.11:8080", "127.0.0.12:8080"]);
    println!("[demo] the kernel had the new endpoints {:.0?} after the file changed", started.elapsed());
    spread("after", &cgroup);

    let outside = mesh_tests::probe_outside(&["http", VIP, "1"]);
    println!("\n[demo] the same request from outside the cgroup is not balanced: {}", outside["errors"]);
    agent.stop();
    std::thread::sleep(Duration::from_millis(10));
}

fn spread(label: &str, cgroup: &TestCgroup) {
    let answer = cgroup.probe(&["http", VIP, REQUESTS]);
    println!("\n[demo] {REQUESTS} HTTP requests to http://{VIP}/ ({label}):");
    for (name, n) in names(&answer) {
        println!("  {name:<6} {n:>4} {}", "#".repeat((n / 4) as usize));
    }
    let errors = &answer["errors"];
    if errors.as_object().is_some_and(|e| !e.is_empty()) {
        println!("  errors: {errors}");
    }
}

/// The example YAML without the endpoint whose address is `address`.
fn remove_endpoint(yaml: &str, address: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in yaml.lines() {
        if line.starts_with("  - addresses:") {
            skipping = line.contains(address);
        } else if !line.starts_with("    ") {
            skipping = false;
        }
        if !skipping {
            out.push(line);
        }
    }
    out.join("\n") + "\n"
}
