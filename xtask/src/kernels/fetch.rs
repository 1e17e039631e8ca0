//! Kernel images from Debian's packages, fetched with apt under a private APT_CONFIG (its own
//! sources, lists and cache under target/kernels/apt) so the host's apt setup is untouched.
//! The image and the few modules the tests need (`MODULES`) are kept, cached by package name.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, bail};

use super::Pin;
use crate::bootstrap::run;

/// Modules Debian builds as such that the tests need, in load order: socket diagnostics, with
/// which the agent closes connections a policy change denies (`SOCK_DESTROY`).
pub const MODULES: &[&str] = &["inet_diag", "tcp_diag"];

/// A kernel as the VM boots it.
pub struct Kernel {
    pub image: PathBuf,
    /// `MODULES` as `<release>/<name>.ko` (uncompressed, for busybox's insmod), under this.
    pub modules: PathBuf,
}

/// The cached kernel for `pin`, fetched first if the cache does not hold this package.
pub fn kernel(pin: &Pin, all: &[Pin], cache: &Path) -> anyhow::Result<Kernel> {
    let dir = cache.join(&pin.series);
    let image = dir.join("vmlinuz");
    let modules = dir.join("modules");
    let stamp = dir.join("package");
    if image.exists() && modules.exists() && fs::read_to_string(&stamp).is_ok_and(|p| p.trim() == pin.package) {
        println!("[kernels] {}: {} (cached)", pin.series, pin.package);
        return Ok(Kernel { image, modules });
    }
    println!("[kernels] {}: fetching {} from {} {}", pin.series, pin.package, pin.mirror, pin.suite);
    fs::create_dir_all(&dir)?;
    let apt = PrivateApt::new(&cache.join("apt"), all)?;
    apt.update()?;
    let deb = apt.download(pin, &dir)?;

    // dpkg-deb | tar, taking only ./boot/vmlinuz-* and the modules (under ./lib/modules or,
    // from trixie, ./usr/lib/modules; xz-compressed from trixie).
    let unpack = dir.join("unpack");
    let _ = fs::remove_dir_all(&unpack);
    fs::create_dir_all(&unpack)?;
    let mut script = "dpkg-deb --fsys-tarfile \"$1\" | tar -x -C \"$2\" --wildcards --wildcards-match-slash './boot/vmlinuz-*'".to_owned();
    for name in MODULES {
        script.push_str(&format!(" '*/kernel/net/ipv4/{name}.ko*'"));
    }
    run(Command::new("sh").args(["-c", &script, "sh"]).arg(&deb).arg(&unpack))?;
    let found = fs::read_dir(unpack.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .with_context(|| format!("{} holds no /boot/vmlinuz-*", deb.display()))?;
    let _ = fs::remove_dir_all(&modules);
    for name in MODULES {
        let module = find_module(&unpack, name)?.with_context(|| format!("{} holds no {name}.ko", deb.display()))?;
        // .../modules/<release>/kernel/net/ipv4/<name>.ko[.xz]
        let release = module
            .ancestors()
            .find(|a| a.parent().is_some_and(|p| p.ends_with("modules")))
            .and_then(|a| a.file_name())
            .with_context(|| format!("no release in {}", module.display()))?;
        let into = modules.join(release);
        fs::create_dir_all(&into)?;
        let target = into.join(format!("{name}.ko"));
        if module.extension().is_some_and(|e| e == "xz") {
            let out = Command::new("xz").arg("-dc").arg(&module).output().context("running xz")?;
            if !out.status.success() {
                bail!("xz -d {}: {}", module.display(), String::from_utf8_lossy(&out.stderr));
            }
            fs::write(&target, out.stdout)?;
        } else {
            fs::rename(&module, &target)?;
        }
    }
    fs::rename(&found, &image)?;
    fs::write(&stamp, &pin.package)?;
    fs::remove_dir_all(&unpack)?;
    fs::remove_file(&deb)?;
    Ok(Kernel { image, modules })
}

/// The file of module `name` (`name.ko` or `name.ko.xz`) under `dir`.
fn find_module(dir: &Path, name: &str) -> anyhow::Result<Option<PathBuf>> {
    let wanted = [format!("{name}.ko"), format!("{name}.ko.xz")];
    for entry in fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            if let Some(found) = find_module(&path, name)? {
                return Ok(Some(found));
            }
        } else if wanted.iter().any(|w| entry.file_name() == w.as_str()) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

struct PrivateApt {
    config: PathBuf,
}

impl PrivateApt {
    fn new(root: &Path, pins: &[Pin]) -> anyhow::Result<Self> {
        for sub in ["lists/partial", "archives/partial", "sources.list.d", "preferences.d"] {
            fs::create_dir_all(root.join(sub))?;
        }
        let mut sources = String::new();
        for pin in pins {
            let line = format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {} {} main\n", pin.mirror, pin.suite);
            if !sources.contains(&line) {
                sources.push_str(&line);
            }
        }
        fs::write(root.join("sources.list"), sources)?;
        fs::write(root.join("status"), "")?;
        let r = root.display();
        let config = format!(
            "Dir::State \"{r}\";\nDir::State::Lists \"{r}/lists\";\nDir::State::status \"{r}/status\";\n\
             Dir::Cache \"{r}\";\nDir::Cache::Archives \"{r}/archives\";\n\
             Dir::Etc::SourceList \"{r}/sources.list\";\nDir::Etc::SourceParts \"{r}/sources.list.d\";\n\
             Dir::Etc::Preferences \"{r}/preferences\";\nDir::Etc::PreferencesParts \"{r}/preferences.d\";\n\
             APT::Architecture \"amd64\";\nAcquire::Languages \"none\";\nAPT::Sandbox::User \"root\";\n"
        );
        let path = root.join("apt.conf");
        fs::write(&path, config)?;
        Ok(Self { config: path })
    }

    fn apt(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("APT_CONFIG", &self.config);
        cmd
    }

    /// `apt-get update`, once per run.
    fn update(&self) -> anyhow::Result<()> {
        static UPDATED: AtomicBool = AtomicBool::new(false);
        if !UPDATED.load(Ordering::Relaxed) {
            run(self.apt("apt-get").args(["update", "-qq"]))?;
            UPDATED.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    fn download(&self, pin: &Pin, dir: &Path) -> anyhow::Result<PathBuf> {
        let out = self.apt("apt-get").args(["download", "-qq", &pin.package]).current_dir(dir).output()?;
        if !out.status.success() {
            let pattern = format!("^linux-image-{}\\.[0-9.+a-z-]*-amd64-unsigned$", regex_escape(&pin.series));
            let search = self.apt("apt-cache").args(["search", "--names-only", &pattern]).output()?;
            let available: Vec<String> = String::from_utf8_lossy(&search.stdout)
                .lines()
                .filter_map(|l| l.split_once(' ').map(|(name, _)| name.to_owned()))
                .collect();
            bail!(
                "kernel {}: apt cannot fetch {} ({}). Debian's indexes now offer: {}. Pin one of them in {}",
                pin.series,
                pin.package,
                String::from_utf8_lossy(&out.stderr).trim(),
                if available.is_empty() { "nothing for this series".into() } else { available.join(", ") },
                super::pins_file().display()
            );
        }
        fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {} left no .deb in {}", pin.package, dir.display()))
    }
}

fn regex_escape(s: &str) -> String {
    s.replace('.', "\\.")
}
