//! `cargo xtask image`: the agent's OCI image, built without a container engine. One layer
//! holds the static (musl) `mesh` binary of the shipped build (profile `dist`) on an empty base;
//! the image is written as an OCI image layout in one tar archive, which `podman load`,
//! `docker load`, `skopeo` and `kind load image-archive` take.
//!
//! Same inputs, same digest: every tar header is fixed (owner root, a fixed time), entries are
//! sorted, gzip carries no timestamp or name, and the binary is built with the checkout's,
//! cargo's and rustup's paths remapped, so two checkouts of one commit give the same image.
//!
//! The image's name and tag live in one place, deploy/kustomization.yaml's `images:`
//! (`kubectl apply -k deploy/` puts them into the DaemonSet).
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::bootstrap::{self, HOST_TOOLCHAIN, cargo, workspace_root};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the binary lives in the image.
pub const BINARY_PATH: &str = "usr/local/bin/mesh";
/// Every file's time in the image (SOURCE_DATE_EPOCH overrides it): 2026-01-01T00:00:00Z.
const DEFAULT_EPOCH: u64 = 1_767_225_600;

/// The image's reference, as deploy/kustomization.yaml names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// The name the manifests use (`image: mesh`).
    pub placeholder: String,
    pub name: String,
    pub tag: String,
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

/// Reads the one `images:` entry of a kustomization (`name`, `newName`, `newTag`).
pub fn reference(kustomization: &str) -> anyhow::Result<Reference> {
    let mut in_images = false;
    let (mut placeholder, mut name, mut tag) = (None, None, None);
    for line in kustomization.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || trimmed.is_empty() {
            continue;
        }
        if !line.starts_with(' ') && !line.starts_with('-') {
            in_images = trimmed == "images:";
            continue;
        }
        if !in_images {
            continue;
        }
        let field = trimmed.trim_start_matches("- ");
        let Some((key, value)) = field.split_once(':') else { continue };
        let value = value.trim().trim_matches('"').to_owned();
        match key.trim() {
            "name" => placeholder = Some(value),
            "newName" => name = Some(value),
            "newTag" => tag = Some(value),
            _ => {}
        }
    }
    match (placeholder, name, tag) {
        (Some(placeholder), Some(name), Some(tag)) => Ok(Reference { placeholder, name, tag }),
        _ => bail!("deploy/kustomization.yaml: `images:` needs one entry with name, newName and newTag"),
    }
}

/// The image reference of deploy/kustomization.yaml; deploy/mtls (a component, whose
/// resources the including kustomization does not rename) must say the same.
pub fn kustomization_reference() -> anyhow::Result<Reference> {
    let read = |relative: &str| -> anyhow::Result<Reference> {
        let path = workspace_root().join(relative);
        let text = fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        reference(&text).with_context(|| path.display().to_string())
    };
    let base = read("deploy/kustomization.yaml")?;
    let mtls = read("deploy/mtls/kustomization.yaml")?;
    anyhow::ensure!(
        mtls == base,
        "deploy/mtls/kustomization.yaml names the image {mtls}, deploy/kustomization.yaml {base}: make them the same"
    );
    Ok(base)
}

/// Where `cargo xtask image` writes the archive.
pub fn archive_path() -> PathBuf {
    workspace_root().join("target/image/mesh.oci.tar")
}

/// Builds the static binary and writes the image archive; returns (archive, reference,
/// manifest digest).
pub fn run() -> anyhow::Result<(PathBuf, Reference, String)> {
    let reference = kustomization_reference()?;
    let binary = build_static()?;
    let bytes = fs::read(&binary).with_context(|| binary.display().to_string())?;
    let archive = archive_path();
    fs::create_dir_all(archive.parent().expect("target/image"))?;
    let digest = write_archive(&archive, &bytes, &reference, epoch()?)?;
    println!("[image] {reference} ({digest}) -> {}", archive.display());
    println!("[image] load it with: podman load -i {0} | docker load -i {0} | kind load image-archive {0}", archive.display());
    Ok((archive, reference, digest))
}

fn epoch() -> anyhow::Result<u64> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => v.parse().with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
        Err(_) => Ok(DEFAULT_EPOCH),
    }
}

/// `mesh` for musl, profile `dist`, with the paths that would differ between checkouts and
/// machines remapped (they end up in panic messages, and in the kernel programs' BTF line
/// info). Every rustc call of the build takes the remapping through a wrapper: aya-build sets
/// the kernel programs' flags itself, and passes RUSTC_WRAPPER through. In a target directory
/// of its own, so that the other builds' fingerprints stay as they are.
fn build_static() -> anyhow::Result<PathBuf> {
    bootstrap::rust_target(HOST_TOOLCHAIN, MUSL_TARGET)?;
    let root = workspace_root();
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()));
    let cargo_home = std::env::var("CARGO_HOME").map(PathBuf::from).unwrap_or_else(|_| home.join(".cargo"));
    let rustup_home = std::env::var("RUSTUP_HOME").map(PathBuf::from).unwrap_or_else(|_| home.join(".rustup"));
    let target_dir = root.join("target/image-build");
    fs::create_dir_all(&target_dir)?;
    let wrapper = target_dir.join("rustc-remap");
    let remap = [(&root, "/mesh"), (&cargo_home, "/cargo"), (&rustup_home, "/rustup")]
        .iter()
        .map(|(from, to)| format!("--remap-path-prefix={}={to}", from.display()))
        .collect::<Vec<_>>()
        .join(" ");
    fs::write(
        &wrapper,
        format!("#!/bin/sh\n# cargo xtask image: every rustc call with the build's paths remapped.\nexec \"$@\" {remap}\n"),
    )?;
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755))?;
    println!("[image] building the static agent ({MUSL_TARGET}, profile dist)");
    let status = cargo()
        .args(["build", "--profile", "dist", "--target", MUSL_TARGET, "-p", "mesh-userspace", "--bin", "mesh", "--target-dir"])
        .arg(&target_dir)
        .env("RUSTC_WRAPPER", &wrapper)
        .status()
        .context("cargo build")?;
    if !status.success() {
        bail!("building the static agent failed ({status})");
    }
    let binary = target_dir.join(MUSL_TARGET).join("dist/mesh");
    anyhow::ensure!(binary.exists(), "cargo built no {}", binary.display());
    Ok(binary)
}

/// The image as an OCI layout in a tar archive at `out`; returns the manifest's digest.
pub fn write_archive(out: &Path, binary: &[u8], reference: &Reference, epoch: u64) -> anyhow::Result<String> {
    // The layer: the binary and the directories above it, as a container runtime unpacks them.
    let mut layer = Tar::new(epoch);
    layer.dir("usr/");
    layer.dir("usr/local/");
    layer.dir("usr/local/bin/");
    layer.file(BINARY_PATH, 0o755, binary);
    let layer_tar = layer.finish();
    let diff_id = sha256(&layer_tar);
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    gz.write_all(&layer_tar)?;
    let layer_gz = gz.finish()?;
    drop(layer_tar);

    let created = rfc3339(epoch)?;
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": [format!("/{BINARY_PATH}")],
            "Cmd": ["agent"],
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "Labels": {
                "org.opencontainers.image.title": "mesh",
                "org.opencontainers.image.description": "mesh agent: eBPF-accelerated, sidecarless service mesh",
                "org.opencontainers.image.version": reference.tag,
            },
        },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created": created, "created_by": "cargo xtask image" }],
    });
    let config = serde_json::to_vec(&config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer_gz), "size": layer_gz.len() }],
        "annotations": { "org.opencontainers.image.ref.name": reference.tag },
    });
    let manifest = serde_json::to_vec(&manifest)?;
    let manifest_digest = sha256(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                // containerd (kind load) reads the full name, OCI tools the tag.
                "io.containerd.image.name": reference.to_string(),
                "org.opencontainers.image.ref.name": reference.tag,
            },
        }],
    });
    let blob = |data: &[u8]| format!("blobs/sha256/{}", hex_of(data));
    // docker load reads manifest.json (as `docker save` writes it beside the OCI layout).
    let docker = json!([{ "Config": blob(&config), "RepoTags": [reference.to_string()], "Layers": [blob(&layer_gz)] }]);

    let mut archive = Tar::new(epoch);
    archive.dir("blobs/");
    archive.dir("blobs/sha256/");
    let mut blobs = [(blob(&config), &config), (blob(&layer_gz), &layer_gz), (blob(&manifest), &manifest)];
    blobs.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, data) in blobs {
        archive.file(&path, 0o644, data);
    }
    archive.file("index.json", 0o644, &serde_json::to_vec(&index)?);
    archive.file("manifest.json", 0o644, &serde_json::to_vec(&docker)?);
    archive.file("oci-layout", 0o644, br#"{"imageLayoutVersion":"1.0.0"}"#);
    fs::write(out, archive.finish()).with_context(|| out.display().to_string())?;
    Ok(manifest_digest)
}

fn hex_of(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex_of(data))
}

/// `epoch` as RFC 3339 (UTC, whole seconds), by GNU date.
fn rfc3339(epoch: u64) -> anyhow::Result<String> {
    let out =
        std::process::Command::new("date").args(["-u", "-d", &format!("@{epoch}"), "+%Y-%m-%dT%H:%M:%SZ"]).output().context("date")?;
    anyhow::ensure!(out.status.success(), "date -d @{epoch}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A POSIX ustar archive with fixed headers: owner root, one time for every entry.
struct Tar {
    out: Vec<u8>,
    mtime: u64,
}

impl Tar {
    fn new(mtime: u64) -> Self {
        Self { out: Vec::new(), mtime }
    }

    fn dir(&mut self, path: &str) {
        self.entry(path, 0o755, b'5', &[]);
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, mode, b'0', data);
    }

    fn entry(&mut self, path: &str, mode: u32, kind: u8, data: &[u8]) {
        assert!(path.len() < 100, "tar path too long for a plain ustar header: {path}");
        let mut header = [0u8; 512];
        header[..path.len()].copy_from_slice(path.as_bytes());
        let octal = |field: &mut [u8], value: u64| {
            let text = format!("{value:0width$o}", width = field.len() - 1);
            field[..text.len()].copy_from_slice(text.as_bytes());
        };
        octal(&mut header[100..108], u64::from(mode));
        octal(&mut header[108..116], 0); // uid
        octal(&mut header[116..124], 0); // gid
        octal(&mut header[124..136], data.len() as u64);
        octal(&mut header[136..148], self.mtime);
        header[156] = kind;
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[265..269].copy_from_slice(b"root");
        header[297..301].copy_from_slice(b"root");
        // The checksum is computed with its own field as spaces.
        header[148..156].copy_from_slice(b"        ");
        let sum: u64 = header.iter().map(|&b| u64::from(b)).sum();
        let text = format!("{sum:06o}\0 ");
        header[148..156].copy_from_slice(text.as_bytes());
        self.out.extend_from_slice(&header);
        self.out.extend_from_slice(data);
        self.out.resize(self.out.len().next_multiple_of(512), 0);
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.extend_from_slice(&[0u8; 1024]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> Reference {
        Reference { placeholder: "mesh".into(), name: "ghcr.io/mesh/mesh".into(), tag: "0.1.0".into() }
    }

    #[test]
    fn the_reference_is_read_from_the_kustomization() {
        let text = include_str!("../../deploy/kustomization.yaml");
        let found = super::reference(text).unwrap();
        assert_eq!(found.placeholder, "mesh");
        assert_eq!(found.tag, env!("CARGO_PKG_VERSION"), "the image tag follows the workspace version");
        assert!(super::reference("resources: [a.yaml]\n").is_err());
    }

    #[test]
    fn the_same_inputs_give_the_same_digest_and_the_archive_is_a_valid_layout() {
        let dir = std::env::temp_dir().join(format!("mesh-image-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let binary = b"\x7fELF not really, but bytes".repeat(1000);
        let (a, b) = (dir.join("a.tar"), dir.join("b.tar"));
        let first = write_archive(&a, &binary, &reference(), DEFAULT_EPOCH).unwrap();
        let second = write_archive(&b, &binary, &reference(), DEFAULT_EPOCH).unwrap();
        assert_eq!(first, second);
        assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap(), "byte for byte");
        let other = write_archive(&b, b"other bytes", &reference(), DEFAULT_EPOCH).unwrap();
        assert_ne!(first, other, "another binary, another image");

        // GNU tar reads it back: the layout's files, and the layer holds the binary.
        let list = std::process::Command::new("tar").arg("-tvf").arg(&a).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        for name in ["oci-layout", "index.json", "manifest.json", "blobs/sha256/"] {
            assert!(list.contains(name), "{name} missing:\n{list}");
        }
        assert!(list.contains("root/root") && list.contains("2026-01-01"), "fixed owner and time:\n{list}");
        let unpacked = dir.join("unpacked");
        fs::create_dir_all(&unpacked).unwrap();
        assert!(std::process::Command::new("tar").arg("-xf").arg(&a).arg("-C").arg(&unpacked).status().unwrap().success());
        let index: serde_json::Value = serde_json::from_slice(&fs::read(unpacked.join("index.json")).unwrap()).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
        assert_eq!(manifest_digest, first);
        let blob = |digest: &str| fs::read(unpacked.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&blob(manifest_digest)).unwrap();
        let layer = blob(manifest["layers"][0]["digest"].as_str().unwrap());
        assert_eq!(sha256(&layer), manifest["layers"][0]["digest"]);
        let layer_path = unpacked.join("layer.tar.gz");
        fs::write(&layer_path, &layer).unwrap();
        let listed = std::process::Command::new("tar").arg("-tzvf").arg(&layer_path).output().unwrap();
        let listed = String::from_utf8_lossy(&listed.stdout);
        let entry: Vec<&str> = listed.lines().find(|l| l.ends_with(BINARY_PATH)).unwrap_or_default().split_whitespace().collect();
        assert_eq!(entry.get(..3), Some(&["-rwxr-xr-x", "root/root", binary.len().to_string().as_str()][..]), "{listed}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(DEFAULT_EPOCH).unwrap(), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 + 3661).unwrap(), "2000-02-29T01:01:01Z");
    }
}
