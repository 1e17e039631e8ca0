//! Installs what the build needs, each step checked first so a ready machine costs a few
//! milliseconds: Debian's LLVM 22 (for bpf-linker), the Rust toolchain aya 0.16 needs, the
//! pinned eBPF nightly with rust-src, and bpf-linker built against LLVM 22. The nightly's LLVM
//! major must equal bpf-linker's, or linking fails with "Invalid record".
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Builds the workspace (aya 0.16 needs Rust >= 1.98).
pub const HOST_TOOLCHAIN: &str = "1.99.1";
/// Builds the kernel programs; LLVM 22.1. Keep in sync with mesh-userspace/build.rs.
pub const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
/// Debian packages: LLVM 22 for bpf-linker, iproute2 for the tests' network namespaces,
/// musl-tools for the static agent of the kernel VMs (ring's C, under the Kubernetes client's
/// TLS, is compiled with musl-gcc).
const APT_PACKAGES: &[&str] = &["llvm-22-dev", "iproute2", "musl-tools"];

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

fn step(n: usize, what: &str, status: &str) {
    println!("[bootstrap {n}/4] {what}: {status}");
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn stdout_of(cmd: &mut Command) -> String {
    cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Runs a command, failing with the command line if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

pub fn ensure() -> anyhow::Result<()> {
    apt_packages()?;
    // clippy and rustfmt: CI checks lints and formatting with the toolchain that builds.
    toolchain(2, HOST_TOOLCHAIN, &["clippy", "rustfmt"])?;
    toolchain(3, EBPF_TOOLCHAIN, &["rust-src"])?;
    bpf_linker()
}

fn apt_packages() -> anyhow::Result<()> {
    let missing = missing_packages(APT_PACKAGES);
    if missing.is_empty() {
        step(1, "Debian packages", "present");
        return Ok(());
    }
    step(1, "Debian packages", &format!("installing {}", missing.join(" ")));
    apt_install(&missing)
}

fn missing_packages<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", p])) != "install ok installed")
        .collect()
}

/// Installs those of `packages` that are missing, saying which.
pub fn apt_install_missing(packages: &[&str]) -> anyhow::Result<()> {
    let missing = missing_packages(packages);
    if !missing.is_empty() {
        println!("[bootstrap] installing {}", missing.join(" "));
        apt_install(&missing)?;
    }
    Ok(())
}

/// `apt-get install` of `packages`, after an index update.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn toolchain(n: usize, name: &str, components: &[&str]) -> anyhow::Result<()> {
    let installed = succeeds(Command::new("rustup").args(["run", name, "rustc", "--version"]));
    let have_components = installed && {
        let list = stdout_of(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", name]));
        components.iter().all(|c| list.lines().any(|l| l.starts_with(c)))
    };
    if have_components {
        step(n, &format!("Rust {name}"), "present");
        return Ok(());
    }
    step(n, &format!("Rust {name}"), "installing (minimal profile)");
    let mut cmd = Command::new("rustup");
    cmd.args(["toolchain", "install", name, "--profile", "minimal", "--no-self-update"]);
    for c in components {
        cmd.args(["--component", c]);
    }
    run(&mut cmd)
}

/// Adds a compilation target (its standard library) to a toolchain, once.
pub fn rust_target(toolchain: &str, target: &str) -> anyhow::Result<()> {
    let installed = stdout_of(Command::new("rustup").args(["target", "list", "--installed", "--toolchain", toolchain]));
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    println!("[bootstrap] adding {target} to Rust {toolchain}");
    run(Command::new("rustup").args(["target", "add", "--toolchain", toolchain, target]))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = stdout_of(Command::new("bpf-linker").arg("--version"));
    let path = stdout_of(Command::new("sh").args(["-c", "command -v bpf-linker"]));
    let llvm22 = !path.trim().is_empty() && stdout_of(Command::new("ldd").arg(path.trim())).contains("libLLVM.so.22");
    if version.contains(BPF_LINKER_VERSION) && llvm22 {
        step(4, "bpf-linker", &format!("{} (LLVM 22)", version.trim()));
        return Ok(());
    }
    step(4, "bpf-linker", &format!("building {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"));
    run(Command::new("rustup")
        .args(["run", HOST_TOOLCHAIN, "cargo", "install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22", "--force"])
        .env("LLVM_PREFIX", LLVM_PREFIX)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
}

/// `cargo` of the pinned host toolchain, in the workspace, with nothing of the outer cargo's
/// environment that would pick another toolchain.
pub fn cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", HOST_TOOLCHAIN, "cargo"])
        .current_dir(workspace_root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env_remove("RUSTC_WRAPPER");
    cmd
}

pub fn build(release: bool) -> anyhow::Result<()> {
    println!("[build] mesh (agent + kernel programs) and mesh-probe");
    let mut cmd = cargo();
    cmd.args(["build", "--bins", "-p", "mesh-userspace", "-p", "mesh-tests"]);
    if release {
        // The shipped build (profile `dist`: release with LTO; see Cargo.toml).
        cmd.args(["--profile", "dist"]);
    }
    run(&mut cmd)
}

pub fn target_bin(name: &str) -> PathBuf {
    workspace_root().join("target/debug").join(name)
}

/// A binary of the shipped build (profile `dist`).
pub fn dist_bin(name: &str) -> PathBuf {
    workspace_root().join("target/dist").join(name)
}

/// A Python with PyPI's opentelemetry-proto, in a venv under target/ (made once): the
/// OpenTelemetry project's own decoder for the proxy's OTLP export test.
/// A Python venv (target/test-venv) with the PyPI packages the tests read or speak with:
/// opentelemetry-proto (decodes exported spans), h2 (the independent HBONE peer).
pub fn test_python() -> anyhow::Result<PathBuf> {
    let venv = workspace_root().join("target/test-venv");
    let python = venv.join("bin/python");
    let has_packages = |python: &Path| {
        Command::new(python)
            .args(["-c", "import opentelemetry.proto.collector.trace.v1.trace_service_pb2, h2.connection"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has_packages(&python) {
        return Ok(python);
    }
    println!("[bootstrap] a Python venv with opentelemetry-proto and h2 (PyPI) in {}", venv.display());
    if !Command::new("python3").args(["-m", "venv"]).arg(&venv).status().is_ok_and(|s| s.success()) {
        apt_install_missing(&["python3-venv"])?;
        run(Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip")).args(["install", "-q", "opentelemetry-proto", "h2"]))?;
    anyhow::ensure!(has_packages(&python), "opentelemetry-proto and h2 installed, but {} cannot import them", python.display());
    Ok(python)
}
