//! `cargo xtask test`: unit tests, the privileged integration suite, then a check that the run
//! left nothing behind (pins, cgroups, attached programs, processes).
use std::{
    fs,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{
    bootstrap::{self, cargo, target_bin},
    image, manifests,
};

pub fn run() -> anyhow::Result<()> {
    // SAFETY: plain geteuid(2).
    if unsafe { libc::geteuid() } != 0 {
        bail!("the integration tests attach eBPF programs and make network namespaces: run as root");
    }
    bootstrap::build(false)?;

    let mut total = Tally::default();
    println!("[test] unit tests");
    let python = bootstrap::test_python()?;
    let unit = cargo_test(
        cargo().args(["test", "-p", "mesh-common", "-p", "mesh-userspace", "-p", "xtask"]).env("MESH_OTEL_PYTHON", &python),
        &mut total,
    );

    // The shipped image, for the container test (it runs it under podman with the
    // DaemonSet's pod spec); Prometheus for the monitoring test; tcpdump for the mTLS test's
    // look at the wire between nodes.
    bootstrap::apt_install_missing(&["podman", "runc", "skopeo", "prometheus", "tcpdump"])?;
    let (image, _, _) = image::run()?;

    println!("[test] privileged integration tests (real programs, cgroups, sockets, network namespaces, the image under podman)");
    let integration = cargo_test(
        cargo()
            .args(["test", "-p", "mesh-tests"])
            .env("MESH_BIN", target_bin("mesh"))
            .env("MESH_PROBE_BIN", target_bin("mesh-probe"))
            .env("MESH_PYTHON", &python)
            .env("MESH_IMAGE", image),
        &mut total,
    );

    println!(
        "[test] manifests: kubectl kustomize deploy/, then Kubernetes {} schemas and the Gateway API CRDs",
        manifests::KUBERNETES_VERSIONS.join(" and ")
    );
    let checked = manifests::check();
    match &checked {
        Ok(report) => {
            println!("[test] manifests: {} objects valid, {} refused", report.passed, report.failed.len());
            for failure in &report.failed {
                println!("[test] manifests: {failure}");
            }
            total.passed += report.passed;
            total.failed += report.failed.len() as u64;
        }
        Err(e) => {
            println!("[test] manifests: could not be checked: {e:#}");
            total.failed += 1;
        }
    }

    println!("[test] leak check");
    let leaks = leftovers();
    if leaks.is_empty() {
        println!("[test] nothing left behind");
    } else {
        println!("[test] the suite left things behind:\n- {}", leaks.join("\n- "));
        total.failed += 1;
    }
    println!("total: {} passed, {} failed, {} skipped", total.passed, total.failed, total.ignored);
    unit?;
    integration?;
    if !checked.is_ok_and(|r| r.failed.is_empty()) {
        bail!("manifests refused");
    }
    if !leaks.is_empty() {
        bail!("leaks found");
    }
    Ok(())
}

/// Test counts summed over cargo's `test result:` lines.
#[derive(Default)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Runs a `cargo test`, passing its output through and adding up its results.
fn cargo_test(cmd: &mut Command, total: &mut Tally) -> anyhow::Result<()> {
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("{cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ").strip_suffix(word))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            total.passed += count("passed");
            total.failed += count("failed");
            total.ignored += count("ignored");
        }
    }
    let s = child.wait()?;
    if !s.success() {
        total.failed = total.failed.max(1);
        bail!("{cmd:?} failed with {s}");
    }
    Ok(())
}

/// What a test run must not leave: test pins, test cgroups, mesh processes.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    let prefixes = ["mesh-test-", "mesh-check-", "mesh-demo-"];
    let has_prefix = |name: &str| prefixes.iter().any(|p| name.starts_with(p));
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten() {
            if has_prefix(&e.file_name().to_string_lossy()) {
                found.push(format!("pin directory {}", e.path().display()));
            }
        }
    }
    let cgroup_root = mesh_tests::cgroup2_root();
    for e in fs::read_dir(&cgroup_root).into_iter().flatten().flatten() {
        if has_prefix(&e.file_name().to_string_lossy()) {
            found.push(format!("cgroup {}", e.path().display()));
        }
    }
    // Containers the container test ran (podman may be absent where it never ran).
    if let Ok(out) = Command::new("podman").args(["ps", "--all", "--format", "{{.Names}}"]).output() {
        for name in String::from_utf8_lossy(&out.stdout).lines().filter(|n| has_prefix(n)) {
            found.push(format!("podman container {name}"));
        }
    }
    for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if matches!(comm.trim(), "mesh" | "mesh-probe") {
            found.push(format!("process {} ({})", e.file_name().to_string_lossy(), comm.trim()));
        }
    }
    found
}
