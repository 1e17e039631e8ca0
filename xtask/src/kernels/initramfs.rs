//! The VM's whole root file system: busybox, the static agent, probe and test binaries (debug
//! info stripped, they are the bulk), each kernel's few modules under /lib/modules/<release>
//! (init.sh loads those of the running kernel), and `kernels/init.sh` as PID 1, packed as a
//! newc cpio.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::StaticBinaries;
use crate::bootstrap::run;

const INIT: &str = include_str!("../../kernels/init.sh");
/// Debian's busybox-static.
const BUSYBOX: &str = "/bin/busybox";

pub fn pack(dir: &Path, binaries: &StaticBinaries, modules: &[&Path]) -> anyhow::Result<PathBuf> {
    let root = dir.join("root");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(root.join("bin"))?;
    fs::create_dir_all(root.join("tests"))?;

    let ldd = Command::new("ldd").arg(BUSYBOX).output()?;
    if ldd.status.success() && !String::from_utf8_lossy(&ldd.stdout).contains("not a dynamic") {
        bail!("{BUSYBOX} is dynamically linked; the VM needs Debian's busybox-static");
    }
    fs::copy(BUSYBOX, root.join("bin/busybox")).with_context(|| format!("copying {BUSYBOX}"))?;
    strip_into(&binaries.mesh, &root.join("bin/mesh"))?;
    strip_into(&binaries.probe, &root.join("bin/mesh-probe"))?;
    for (name, path) in &binaries.tests {
        strip_into(path, &root.join("tests").join(name))?;
    }
    // Each kernel's `<release>/<name>.ko`.
    for tree in modules {
        for release in fs::read_dir(tree)?.flatten() {
            let into = root.join("lib/modules").join(release.file_name());
            fs::create_dir_all(&into)?;
            for module in fs::read_dir(release.path())?.flatten() {
                fs::copy(module.path(), into.join(module.file_name()))?;
            }
        }
    }
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let archive = dir.join("initramfs.cpio");
    let script = "cd \"$1\" && find . | cpio -o -H newc -R 0:0 --quiet > \"$2\"";
    run(Command::new("sh").args(["-c", script, "sh"]).arg(&root).arg(&archive))?;
    let size = fs::metadata(&archive)?.len();
    println!("[kernels] initramfs: {} ({} MiB, {} test binaries)", archive.display(), size >> 20, binaries.tests.len());
    Ok(archive)
}

fn strip_into(from: &Path, to: &Path) -> anyhow::Result<()> {
    run(Command::new("strip").arg("--strip-debug").arg("-o").arg(to).arg(from))
}
