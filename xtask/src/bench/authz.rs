//! `cargo xtask bench authz`: what an authorization decision costs the destination agent per
//! connection with 1,000 AuthorizationPolicies, against none, in thread CPU time (the
//! `authz` bench target of mesh-userspace, built optimised). The kernel's share (the verdict
//! lookups at connect(), the SYN filter) is in `cargo xtask bench l4`'s datapath figures.
use std::fs;

use anyhow::Context as _;
use serde_json::{Value, json};

use crate::bootstrap::{cargo, workspace_root};

/// The per-connection target at the destination, with 1,000 policies.
const TARGET_NS: f64 = 1_000.0;

pub fn run() -> anyhow::Result<()> {
    let out = cargo().args(["bench", "-q", "-p", "mesh-userspace", "--bench", "authz"]).output().context("cargo bench")?;
    anyhow::ensure!(out.status.success(), "the authz bench failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().rev().find(|l| l.starts_with('{')).context("the bench printed no JSON")?;
    let cases: Value = serde_json::from_str(line)?;
    let ns = |case: &str| cases[case]["ns_per_decision"].as_f64().unwrap_or(f64::NAN);
    println!("{:<10} {:>14}  what", "case", "ns/decision");
    for (case, what) in [
        ("none", "no policy (baseline: the caller's names, the cache, the metric)"),
        ("spread", "1,000 policies in 100 namespaces; one selects the destination"),
        ("crowded", "1,000 policies all selecting the destination; the last allows (worst case)"),
        ("cold", "spread, right after a policy change (once per pod and change)"),
    ] {
        println!("{case:<10} {:>14.0}  {what}", ns(case));
    }
    let spread = ns("spread");
    println!(
        "\ntarget: under {TARGET_NS:.0} ns per connection at the destination with 1,000 policies: {spread:.0} ns ({})",
        if spread < TARGET_NS { "met" } else { "NOT met" }
    );
    let dir = workspace_root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let path = dir.join("authz.json");
    fs::write(&path, serde_json::to_string_pretty(&json!({ "suite": "authz", "target_ns": TARGET_NS, "cases": cases }))?)?;
    println!("[bench] results written to {}", path.display());
    Ok(())
}
