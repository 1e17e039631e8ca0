//! sk_msg: same-node redirection, part two. A sendmsg() on a socket of the sockhash whose peer
//! is in the sockhash too (both ends local and in the attached cgroup) moves the payload
//! straight into the peer's receive queue, past TCP/IP. Anything else takes the normal path.
//!
//! The redirected bytes never reach TCP's counters, so they are counted here, in the
//! connection entries of both ends (`redirected_sent`/`redirected_received`).
//!
//! Kernel quirks: `bpf_msg_redirect_hash` returns SK_DROP when the peer is not in the map; the
//! program must still return SK_PASS then, or the message is dropped. `remote_port` is in
//! network byte order in the upper 16 bits, `local_port` in host order.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::generated::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::{Addr, SockKey};

use crate::{
    conns,
    maps::{SOCK_COOKIES, SOCKHASH},
};

const AF_INET: u32 = 2;

#[sk_msg]
pub fn mesh_redirect(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    // Every address field is loaded, then the family picks: with a load per branch, LLVM
    // merges the branches into one load at a computed context offset, which the verifier
    // rejects.
    // SAFETY: the context is valid for the program's run; single 4-byte loads.
    let key = unsafe {
        let v4 =
            (Addr::from_ip4_word(read_volatile(addr_of!((*md).local_ip4))), Addr::from_ip4_word(read_volatile(addr_of!((*md).remote_ip4))));
        let v6 = (
            Addr([
                read_volatile(addr_of!((*md).local_ip6[0])),
                read_volatile(addr_of!((*md).local_ip6[1])),
                read_volatile(addr_of!((*md).local_ip6[2])),
                read_volatile(addr_of!((*md).local_ip6[3])),
            ]),
            Addr([
                read_volatile(addr_of!((*md).remote_ip6[0])),
                read_volatile(addr_of!((*md).remote_ip6[1])),
                read_volatile(addr_of!((*md).remote_ip6[2])),
                read_volatile(addr_of!((*md).remote_ip6[3])),
            ]),
        );
        let (local, remote) = if read_volatile(addr_of!((*md).family)) == AF_INET { v4 } else { v6 };
        let raw = read_volatile(addr_of!((*md).remote_port));
        let remote_port_be = if raw >> 16 != 0 { (raw >> 16) as u16 } else { raw as u16 };
        SockKey {
            netns: bpf_get_netns_cookie(ctx.as_ptr()),
            local,
            remote,
            local_port: read_volatile(addr_of!((*md).local_port)) as u16,
            remote_port: u16::from_be(remote_port_be),
            _pad: 0,
        }
    };
    let mut peer = key.peer();
    if SOCKHASH.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(&key, &peer, ctx.size() as u64);
    }
    SK_PASS
}

/// Adds `bytes` to the sender's `redirected_sent` and the receiver's `redirected_received`.
/// Plain adds: each field has one writer (a socket's sends are serialised by its lock).
#[inline(always)]
fn count(sender: &SockKey, receiver: &SockKey, bytes: u64) {
    // SAFETY: plain-integer values; pointers from successful lookups.
    unsafe {
        if let Some(cookie) = SOCK_COOKIES.get(sender)
            && let Some(conn) = conns::find(*cookie)
        {
            (*conn).redirected_sent += bytes;
        }
        if let Some(cookie) = SOCK_COOKIES.get(receiver)
            && let Some(conn) = conns::find(*cookie)
        {
            (*conn).redirected_received += bytes;
        }
    }
}
