//! `mesh check`: can this host run mesh? Each row is a real probe (the programs are loaded and
//! attached to a scratch cgroup, then removed), not a guess from the kernel version.
#![forbid(unsafe_code)]
use std::{fs, path::Path};

use aya::EbpfLoader;
use mesh_common::program_names;
use serde::Serialize;

use crate::{ebpf::PROGRAMS, host};

pub const MIN_KERNEL: (u32, u32) = (5, 10);

#[derive(Debug, Clone, Serialize)]
pub struct CheckRow {
    pub check: String,
    pub ok: bool,
    /// A missing optional feature is reported, but mesh runs without it.
    pub optional: bool,
    pub detail: String,
}

fn row(check: impl Into<String>, result: Result<String, String>) -> CheckRow {
    match result {
        Ok(detail) => CheckRow { check: check.into(), ok: true, optional: false, detail },
        Err(detail) => CheckRow { check: check.into(), ok: false, optional: false, detail },
    }
}

pub fn run_checks() -> Vec<CheckRow> {
    let mut rows = Vec::new();
    rows.push(row(
        format!("kernel >= {}.{}", MIN_KERNEL.0, MIN_KERNEL.1),
        match host::kernel_version() {
            Ok((a, b, c)) if (a, b) >= MIN_KERNEL => Ok(format!("{a}.{b}.{c}")),
            Ok((a, b, c)) => Err(format!("{a}.{b}.{c} is too old")),
            Err(e) => Err(e.to_string()),
        },
    ));
    rows.push(row(
        "BTF",
        if Path::new("/sys/kernel/btf/vmlinux").exists() {
            Ok("/sys/kernel/btf/vmlinux".into())
        } else {
            Err("/sys/kernel/btf/vmlinux missing (CONFIG_DEBUG_INFO_BTF)".into())
        },
    ));
    let cgroup_root = host::cgroup2_root();
    rows.push(row("cgroup v2", cgroup_root.as_ref().map(|p| p.display().to_string()).map_err(|e| e.to_string())));
    let scratch_pins = Path::new("/sys/fs/bpf").join(format!("mesh-check-{}", std::process::id()));
    let bpffs = host::ensure_bpffs_dir(&scratch_pins);
    rows.push(row("bpffs", bpffs.as_ref().map(|()| "/sys/fs/bpf".to_owned()).map_err(|e| e.to_string())));
    for (name, cap) in [("CAP_BPF", host::CAP_BPF), ("CAP_NET_ADMIN", host::CAP_NET_ADMIN), ("CAP_SYS_ADMIN", host::CAP_SYS_ADMIN)] {
        rows.push(row(
            name,
            match host::has_capability(cap) {
                Ok(true) => Ok("effective".into()),
                Ok(false) => Err("not in the effective set".into()),
                Err(e) => Err(e.to_string()),
            },
        ));
    }
    match (&cgroup_root, &bpffs) {
        (Ok(root), Ok(())) => rows.extend(probe_programs(root, &scratch_pins)),
        _ => rows.push(row("programs", Err("skipped: needs cgroup v2 and bpffs".into()))),
    }
    let _ = crate::ebpf::loader::teardown(&scratch_pins);
    rows
}

/// Loads every program and attaches it to a scratch cgroup, then removes both.
fn probe_programs(cgroup_root: &Path, pins: &Path) -> Vec<CheckRow> {
    let scratch = cgroup_root.join(format!("mesh-check-{}", std::process::id()));
    let mut rows = Vec::new();
    let result = (|| -> Result<(), String> {
        fs::create_dir_all(&scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
        let cgroup = fs::File::open(&scratch).map_err(|e| e.to_string())?;
        let mut ebpf = EbpfLoader::new().default_map_pin_directory(pins).load(PROGRAMS).map_err(|e| format!("loading: {e}"))?;
        for name in program_names::ALL {
            let attached = crate::ebpf::loader::load_program(&mut ebpf, name)
                .and_then(|()| crate::ebpf::loader::attach_or_adopt(&mut ebpf, name, pins, &cgroup))
                .map(|()| "loads and attaches".to_owned())
                .map_err(|e| format!("{e:#}"));
            rows.push(row(format!("program {name}"), attached));
        }
        let redirection = crate::ebpf::loader::attach_redirection(&mut ebpf, pins, &cgroup)
            .map(|()| "available (--sockmap true)".to_owned())
            .map_err(|e| format!("unavailable, needs 5.15+: {e:#}"));
        rows.push(CheckRow { optional: true, ..row("same-node redirection", redirection) });
        // Unpinning the links detaches the programs from the scratch cgroup.
        drop(ebpf);
        let _ = crate::ebpf::loader::teardown(pins);
        Ok(())
    })();
    if let Err(e) = result {
        rows.push(row("programs", Err(e)));
    }
    let _ = fs::remove_dir(&scratch);
    rows
}

pub fn print_table(rows: &[CheckRow]) {
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(5).max(5);
    println!("{:width$}  {:6}  DETAIL", "CHECK", "STATUS");
    for r in rows {
        let status = match (r.ok, r.optional) {
            (true, _) => "ok",
            (false, true) => "warn",
            (false, false) => "FAIL",
        };
        // Verifier logs run to many lines; the first says what is wrong.
        println!("{:width$}  {:6}  {}", r.check, status, r.detail.lines().next().unwrap_or_default());
    }
}
