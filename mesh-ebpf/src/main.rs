//! mesh's kernel programs. One module per attach point; entry functions are thin and call
//! `try_*` functions. Built for the bpf target by mesh-userspace's build script; on the host this
//! compiles to an empty program so that `cargo check --workspace` works.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conns;
#[cfg(target_arch = "bpf")]
mod ingress;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod sk_msg;
#[cfg(target_arch = "bpf")]
mod sock_addr;
#[cfg(target_arch = "bpf")]
mod sock_ops;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no reachable panic; this only satisfies the compiler.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
