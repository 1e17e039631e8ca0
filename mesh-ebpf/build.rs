//! Rebuild the kernel programs when bpf-linker changes: it is the program's real linker, but cargo
//! does not know it.
use which::which;

fn main() {
    if let Ok(linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
