//! `cargo xtask test --kernels 5.10,6.1,6.12|all`: the privileged integration tests on each
//! supported kernel, booted under QEMU, the way aya's own CI proves its programs load on old
//! kernels. The same eBPF object as production is tested (checked byte for byte); only the
//! userspace binaries are rebuilt, statically (musl), so they run in a busybox initramfs.
mod fetch;
mod initramfs;
mod vm;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::bootstrap::{self, HOST_TOOLCHAIN, cargo, workspace_root};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Debian packages the matrix needs on the host.
const HOST_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "binutils", "xz-utils"];

/// One supported kernel series and the Debian package that provides it (`kernels/pins.txt`).
#[derive(Clone, Debug)]
pub struct Pin {
    pub series: String,
    pub mirror: String,
    pub suite: String,
    pub package: String,
}

pub fn run(selection: &str) -> anyhow::Result<()> {
    let pins = select(&load_pins()?, selection)?;
    bootstrap::apt_install_missing(HOST_PACKAGES)?;
    let cache = workspace_root().join("target/kernels");

    let started = Instant::now();
    let binaries = build_static()?;
    let kernels = pins.iter().map(|pin| Ok((pin, fetch::kernel(pin, &pins, &cache)?))).collect::<anyhow::Result<Vec<_>>>()?;
    let modules: Vec<&Path> = kernels.iter().map(|(_, k)| k.modules.as_path()).collect();
    let initramfs = initramfs::pack(&cache.join("initramfs"), &binaries, &modules)?;
    let images: Vec<(&Pin, PathBuf)> = kernels.into_iter().map(|(pin, k)| (pin, k.image)).collect();
    let accel = vm::Accel::detect(&images[0].1, &initramfs);
    println!("[kernels] QEMU with {accel}; binaries and images ready in {:.0?}", started.elapsed());

    let mut outcomes = Vec::new();
    for (pin, image) in images {
        outcomes.push(vm::boot(pin, &image, &initramfs, &accel, &cache.join(&pin.series))?);
    }

    println!("\n[kernels] summary");
    for o in &outcomes {
        println!("  {}", o.summary());
    }
    let (passed, failed, skipped) = outcomes.iter().fold((0, 0, 0), |(p, f, s), o| {
        let (op, of, os) = o.counts();
        (p + op, f + of, s + os)
    });
    println!("total: {passed} passed, {failed} failed, {skipped} skipped");
    if outcomes.iter().any(|o| !o.ok()) {
        bail!("the kernel matrix failed (console logs under {})", cache.display());
    }
    Ok(())
}

fn pins_file() -> PathBuf {
    workspace_root().join("xtask/kernels/pins.txt")
}

fn load_pins() -> anyhow::Result<Vec<Pin>> {
    let path = pins_file();
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_pins(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_pins(text: &str) -> anyhow::Result<Vec<Pin>> {
    let mut pins = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [series, mirror, suite, package] = fields[..] else {
            bail!("line {}: want `series mirror suite package`, got {line:?}", n + 1);
        };
        pins.push(Pin { series: series.into(), mirror: mirror.into(), suite: suite.into(), package: package.into() });
    }
    Ok(pins)
}

/// `all`, or a comma-separated list of series that must all be pinned.
fn select(pins: &[Pin], selection: &str) -> anyhow::Result<Vec<Pin>> {
    if selection == "all" {
        return Ok(pins.to_vec());
    }
    selection
        .split(',')
        .map(|want| {
            let want = want.trim();
            pins.iter().find(|p| p.series == want).cloned().with_context(|| {
                let known: Vec<&str> = pins.iter().map(|p| p.series.as_str()).collect();
                format!("kernel {want:?} is not pinned in {} (pinned: {}, or `all`)", pins_file().display(), known.join(", "))
            })
        })
        .collect()
}

/// Integration test files that need what the VMs' busybox initramfs lacks.
const HOST_ONLY: &[(&str, &str)] = &[
    ("container", "it runs the agent's image under podman, which the VMs do not have"),
    ("monitoring", "it runs Prometheus and promtool, which the VMs do not have"),
    ("signer", "its clients are Python's urllib and openssl, which the VMs do not have"),
];

/// The static binaries that go into the VM.
pub struct StaticBinaries {
    pub mesh: PathBuf,
    pub probe: PathBuf,
    /// The integration test binaries (tests/tests/*.rs), by test file name.
    pub tests: Vec<(String, PathBuf)>,
}

fn build_static() -> anyhow::Result<StaticBinaries> {
    bootstrap::rust_target(HOST_TOOLCHAIN, MUSL_TARGET)?;
    println!("[kernels] building the agent and the integration tests for {MUSL_TARGET} (static)");
    let mesh_build = cargo_json(cargo().args(["build", "--target", MUSL_TARGET, "-p", "mesh-userspace", "--bin", "mesh"]))?;
    let test_build = cargo_json(cargo().args(["test", "--no-run", "--target", MUSL_TARGET, "-p", "mesh-tests", "--tests"]))?;
    // The host build the rest of the suite tests, to compare the embedded kernel programs.
    let host_build = cargo_json(cargo().args(["build", "-p", "mesh-userspace", "--bin", "mesh"]))?;
    same_kernel_programs(&host_build, &mesh_build)?;

    let mesh = bin_executable(&mesh_build, "mesh").context("cargo reported no `mesh` executable")?;
    let probe = bin_executable(&test_build, "mesh-probe").context("cargo reported no `mesh-probe` executable")?;
    let mut tests: Vec<(String, PathBuf)> = test_build
        .iter()
        .filter(|m| m["target"]["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "test")))
        .filter_map(|m| Some((m["target"]["name"].as_str()?.to_owned(), PathBuf::from(m["executable"].as_str()?))))
        .collect();
    tests.sort();
    tests.retain(|(name, _)| match HOST_ONLY.iter().find(|(host_only, _)| host_only == name) {
        Some((_, why)) => {
            println!("[kernels] {name}: not in the VMs ({why}); cargo xtask test runs it on the host");
            false
        }
        None => true,
    });
    if tests.is_empty() {
        bail!("cargo reported no integration test executables for mesh-tests");
    }
    Ok(StaticBinaries { mesh, probe, tests })
}

/// The program binary `name` among cargo's artifact messages. `cargo test` also builds each
/// bin as a test harness under the same name (profile.test): not that one.
fn bin_executable(messages: &[Value], name: &str) -> Option<PathBuf> {
    messages.iter().find_map(|m| {
        let target = &m["target"];
        let is = target["name"] == name
            && target["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "bin"))
            && m["profile"]["test"] == false;
        if is { m["executable"].as_str().map(PathBuf::from) } else { None }
    })
}

/// Runs cargo with JSON messages and returns the artifact and build-script messages.
fn cargo_json(cmd: &mut std::process::Command) -> anyhow::Result<Vec<Value>> {
    cmd.args(["--message-format", "json-render-diagnostics"]).stdout(std::process::Stdio::piped());
    let out = cmd.spawn().with_context(|| format!("{cmd:?}"))?.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?} failed with {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| matches!(m["reason"].as_str(), Some("compiler-artifact" | "build-script-executed")))
        .collect())
}

/// The kernel programs embedded in the static `mesh` must be byte-identical to the host
/// build's: the matrix proves the production object loads, not a look-alike.
fn same_kernel_programs(host: &[Value], musl: &[Value]) -> anyhow::Result<()> {
    let object = |messages: &[Value]| -> anyhow::Result<PathBuf> {
        let package = messages
            .iter()
            .find(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "mesh")
            .map(|m| &m["package_id"])
            .context("cargo reported no `mesh` artifact")?;
        let out_dir = messages
            .iter()
            .find(|m| m["reason"] == "build-script-executed" && m["package_id"] == *package)
            .and_then(|m| m["out_dir"].as_str())
            .context("cargo reported no build-script output for mesh-userspace")?;
        Ok(Path::new(out_dir).join("mesh-ebpf"))
    };
    let (host, musl) = (object(host)?, object(musl)?);
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    if read(&host)? != read(&musl)? {
        bail!("the static build's kernel programs ({}) differ from the host build's ({})", musl.display(), host.display());
    }
    println!("[kernels] kernel programs: byte-identical to the host build ({})", host.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_select() {
        let pins = parse_pins("# c\n5.10 http://m/debian bullseye linux-image-a\n\n6.1 http://m/debian bookworm linux-image-b\n").unwrap();
        assert_eq!(pins.len(), 2);
        assert_eq!(pins[1].package, "linux-image-b");
        assert_eq!(select(&pins, "6.1").unwrap()[0].suite, "bookworm");
        assert_eq!(select(&pins, "all").unwrap().len(), 2);
        let err = select(&pins, "5.10,4.19").unwrap_err().to_string();
        assert!(err.contains("\"4.19\"") && err.contains("5.10, 6.1"), "{err}");
        assert!(parse_pins("5.10 only-two").unwrap_err().to_string().contains("line 1"));
    }

    #[test]
    fn the_probe_is_the_program_not_its_test_harness() {
        let artifact = |test: bool, exe: &str| serde_json::json!({"reason": "compiler-artifact", "target": {"name": "mesh-probe", "kind": ["bin"]}, "profile": {"test": test}, "executable": exe});
        // A fresh clone's build order: the harness first.
        let messages = [artifact(true, "/t/deps/mesh_probe-abc"), artifact(false, "/t/mesh-probe")];
        assert_eq!(bin_executable(&messages, "mesh-probe"), Some(PathBuf::from("/t/mesh-probe")));
        assert_eq!(bin_executable(&messages[..1], "mesh-probe"), None);
    }
}
