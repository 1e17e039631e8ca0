//! Builds the kernel programs (mesh-ebpf) for the bpf target with the pinned eBPF toolchain, so
//! `cargo build` gives one `mesh` binary with the programs embedded. `cargo xtask` installs the
//! toolchain and bpf-linker first.
use anyhow::{Context as _, anyhow};

/// The nightly that builds the kernel programs. Its LLVM major must equal bpf-linker's (22).
/// Keep in sync with xtask's `EBPF_TOOLCHAIN`.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-01";

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf =
        metadata.packages.into_iter().find(|p| p.name.as_str() == "mesh-ebpf").ok_or_else(|| anyhow!("mesh-ebpf package not found"))?;
    let root = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("mesh-ebpf manifest has no parent"))?;
    let package = aya_build::Package { name: ebpf.name.as_str(), root_dir: root.as_str(), ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(EBPF_TOOLCHAIN))
}
