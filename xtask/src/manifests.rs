//! The manifests users apply, checked as an API server would check them: `kubectl kustomize
//! deploy/` rendered, then every object of it and of deploy/examples validated strictly
//! (unknown fields are errors) against the Kubernetes 1.33 and 1.37 schemas (PyPI
//! `kubernetes-validate`), and every HTTPRoute and GRPCRoute against the Gateway API CRDs'
//! schemas (npm `@kubernetes-models/gateway-api`, generated from them).
//!
//! Each run also feeds both validators a broken object and requires a refusal: a validator
//! that stopped working cannot pass the manifests silently.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::bootstrap::{self, workspace_root};

pub const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const NODE_PACKAGES: &str =
    r#"{"private": true, "type": "module", "dependencies": {"@kubernetes-models/gateway-api": "2.0.0", "yaml": "2.9.1"}}"#;

/// What one check found, object by object.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: u64,
    pub failed: Vec<String>,
}

pub fn check() -> anyhow::Result<Report> {
    let dir = workspace_root().join("target/manifests");
    fs::create_dir_all(&dir)?;
    let rendered = dir.join("deploy.yaml");
    let out = Command::new("kubectl")
        .args(["kustomize", "deploy/"])
        .current_dir(workspace_root())
        .output()
        .context("kubectl (its built-in kustomize renders deploy/) is not installed: see https://kubernetes.io/docs/tasks/tools/")?;
    if !out.status.success() {
        bail!("kubectl kustomize deploy/ failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    fs::write(&rendered, &out.stdout)?;
    // deploy/ with its mTLS component on, as a user's kustomization includes it.
    let with_mtls = dir.join("with-mtls");
    fs::create_dir_all(&with_mtls)?;
    fs::write(
        with_mtls.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [../../../deploy]\ncomponents: [../../../deploy/mtls]\n",
    )?;
    let out = Command::new("kubectl").args(["kustomize"]).arg(&with_mtls).output()?;
    if !out.status.success() {
        bail!("kubectl kustomize with deploy/mtls failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rendered_mtls = dir.join("deploy-mtls.yaml");
    fs::write(&rendered_mtls, &out.stdout)?;
    let mut files = vec![rendered, rendered_mtls];
    files.extend(yaml_files(&workspace_root().join("deploy/examples"))?);

    let validate = kubernetes_validate()?;
    let node = gateway_validator()?;
    let mut report = Report::default();
    for version in KUBERNETES_VERSIONS {
        for file in &files {
            kubernetes_objects(&validate, version, file, &mut report)?;
        }
    }
    gateway_objects(&node, &files, &mut report)?;

    // The validators must refuse what is wrong, or their passes mean nothing.
    let broken = dir.join("broken.yaml");
    fs::write(
        &broken,
        "apiVersion: v1\nkind: Service\nmetadata: {name: x, namespace: y}\nspec: {ports: [{port: eighty}], clusterIPs: 10.0.0.1}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: x, namespace: y}\nspec: {rules: [{backendRefs: [{name: x, port: eighty}]}]}\n",
    )?;
    let mut control = Report::default();
    kubernetes_objects(&validate, KUBERNETES_VERSIONS[0], &broken, &mut control)?;
    gateway_objects(&node, std::slice::from_ref(&broken), &mut control)?;
    if control.failed.len() != 2 {
        report.failed.push(format!(
            "the validators did not refuse a broken Service and HTTPRoute (refused: {:?}): they cannot be trusted",
            control.failed
        ));
    }
    Ok(report)
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| dir.display().to_string())? {
        let path = entry?.path();
        if path.is_dir() {
            found.extend(yaml_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// kubernetes-validate in a venv of its own under target/.
fn kubernetes_validate() -> anyhow::Result<PathBuf> {
    let venv = workspace_root().join("target/validate-venv");
    let bin = venv.join("bin/kubernetes-validate");
    let installed =
        Command::new(venv.join("bin/pip")).args(["show", "-q", "kubernetes-validate"]).output().is_ok_and(|o| o.status.success())
            && Command::new(&bin).arg("--version").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("1.37.0"));
    if !installed {
        println!("[manifests] installing {KUBERNETES_VALIDATE} (PyPI) into {}", venv.display());
        if !Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success()) {
            bootstrap::apt_install_missing(&["python3-venv"])?;
            bootstrap::run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
        }
        bootstrap::run(Command::new(venv.join("bin/pip")).args(["install", "-q", KUBERNETES_VALIDATE]))?;
    }
    Ok(bin)
}

/// The Gateway API validator script with its npm packages, under target/.
fn gateway_validator() -> anyhow::Result<PathBuf> {
    let dir = workspace_root().join("target/validate-node");
    fs::create_dir_all(&dir)?;
    let script = dir.join("gateway-api.mjs");
    fs::copy(workspace_root().join("xtask/validate/gateway-api.mjs"), &script)?;
    let package = dir.join("package.json");
    let current = fs::read_to_string(&package).is_ok_and(|p| p == NODE_PACKAGES) && dir.join("node_modules/yaml").exists();
    if !current {
        if Command::new("npm").arg("--version").output().is_err() {
            bootstrap::apt_install_missing(&["nodejs", "npm"])?;
        }
        println!("[manifests] installing @kubernetes-models/gateway-api (npm) into {}", dir.display());
        fs::write(&package, NODE_PACKAGES)?;
        bootstrap::run(Command::new("npm").args(["install", "--silent", "--no-audit", "--no-fund"]).current_dir(&dir))?;
    }
    Ok(script)
}

/// Validates `file` against Kubernetes `version`: an object passes, fails, or (a Gateway API
/// kind) is left to the Gateway API check. Anything else without a schema fails.
fn kubernetes_objects(validate: &Path, version: &str, file: &Path, report: &mut Report) -> anyhow::Result<()> {
    let out = Command::new(validate).args(["--strict", "-k", version]).arg(file).output().context("kubernetes-validate")?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let mut failed_here = false;
    for line in text.lines() {
        if line.contains(" passed for resource ") {
            report.passed += 1;
        } else if line.contains("Couldn't find schema") && line.contains("gateway.networking.k8s.io") {
            // The Gateway API check below.
        } else if line.starts_with("ERROR") || line.starts_with("WARN") || line.contains("failed") {
            report.failed.push(format!("Kubernetes {version}: {line}"));
            failed_here = true;
        }
    }
    if !out.status.success() && !failed_here {
        report.failed.push(format!("Kubernetes {version}: {} ({}): {text}", file.display(), out.status));
    }
    Ok(())
}

fn gateway_objects(script: &Path, files: &[PathBuf], report: &mut Report) -> anyhow::Result<()> {
    let out = Command::new("node").arg(script).args(files).output().context("node")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut failed_here = false;
    for line in text.lines() {
        if line.starts_with("PASS ") {
            report.passed += 1;
        } else if let Some(failure) = line.strip_prefix("FAIL ") {
            report.failed.push(format!("Gateway API: {failure}"));
            failed_here = true;
        }
    }
    if !out.status.success() && !failed_here {
        report.failed.push(format!("the Gateway API check failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr)));
    }
    Ok(())
}

/// `cargo xtask manifests`: the check alone, its findings printed.
pub fn run() -> anyhow::Result<()> {
    let report = check()?;
    for failure in &report.failed {
        println!("[manifests] {failure}");
    }
    println!("[manifests] {} objects valid, {} refused", report.passed, report.failed.len());
    anyhow::ensure!(report.failed.is_empty(), "manifests refused");
    Ok(())
}
