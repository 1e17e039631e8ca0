//! sock_ops: per-connection counters for every TCP connection of the attached cgroup.
//!
//! A connection gets an entry in `mesh_conns` (keyed by socket cookie) and an OPENED record
//! when it is established, and a CLOSED record with its final counters when it reaches
//! TCP_CLOSE, at which point the entry is deleted: the map never holds dead connections.
//! Counters come from the kernel's tcp_sock; between those two events they are refreshed from
//! RTT samples, at most once a second per connection, so the per-ACK cost is a timestamp
//! compare.
//!
//! Kernel quirks: `remote_port` holds the port in network byte order in its upper 16 bits
//! (little-endian), `local_port` is in host byte order; `srtt_us` is the kernel's value,
//! scaled by 8.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
        bpf_sock_ops,
    },
    helpers::generated::{bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{Addr, ConnEvent, ConnValue, RevNatKey, conn_event, direction, drop_counters};

use crate::maps::{CONNS, EVENTS, REVNAT, count_drop};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Refresh live counters from RTT samples at most this often.
const REFRESH_NS: u64 = 1_000_000_000;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => established(&ctx, direction::OUTBOUND),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => established(&ctx, direction::INBOUND),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(&ctx),
        BPF_SOCK_OPS_RTT_CB => refresh_live(&ctx),
        _ => {}
    }
    1
}

#[inline(always)]
fn cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper valid for sock_ops programs.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: helper valid everywhere.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn established(ctx: &SockOpsContext, dir: u8) {
    let ops = ctx.ops;
    let (local, remote) = if ctx.family() == AF_INET {
        (Addr::from_ip4_word(ctx.local_ip4()), Addr::from_ip4_word(ctx.remote_ip4()))
    } else {
        // One constant-offset load per word: the verifier rejects loads through a context
        // pointer with a computed offset, which a copy of the whole array compiles to.
        // SAFETY: valid context for the program's run.
        unsafe {
            (
                Addr([
                    read_volatile(addr_of!((*ops).local_ip6[0])),
                    read_volatile(addr_of!((*ops).local_ip6[1])),
                    read_volatile(addr_of!((*ops).local_ip6[2])),
                    read_volatile(addr_of!((*ops).local_ip6[3])),
                ]),
                Addr([
                    read_volatile(addr_of!((*ops).remote_ip6[0])),
                    read_volatile(addr_of!((*ops).remote_ip6[1])),
                    read_volatile(addr_of!((*ops).remote_ip6[2])),
                    read_volatile(addr_of!((*ops).remote_ip6[3])),
                ]),
            )
        }
    };
    let raw = ctx.remote_port();
    let remote_port_be = if raw >> 16 != 0 { (raw >> 16) as u16 } else { raw as u16 };
    let cookie = cookie(ctx);
    let start = now();
    let mut conn = ConnValue {
        start_ns: start,
        local,
        remote,
        local_port: ctx.local_port() as u16,
        remote_port: u16::from_be(remote_port_be),
        direction: dir,
        ..ConnValue::default()
    };
    if dir == direction::OUTBOUND {
        // Balanced by connect4/6? Then revnat knows the Service address and id.
        let key = RevNatKey { cookie, addr: remote, port_be: remote_port_be, _pad16: 0, _pad32: 0 };
        // SAFETY: plain-integer value.
        if let Some(original) = unsafe { REVNAT.get(&key) } {
            conn.service_addr = original.addr;
            conn.service_port = u16::from_be(original.port_be);
            conn.service_id = original.service_id;
        }
    }
    read_counters(ops, &mut conn, start);
    if CONNS.insert(&cookie, &conn, 0).is_err() {
        count_drop(drop_counters::CONNS);
        return;
    }
    emit(conn_event::OPENED, cookie, start, &conn);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(conn) = CONNS.get_ptr_mut(&cookie) else { return };
    let at = now();
    // SAFETY: pointer from a successful lookup, used before the entry is deleted; counters are
    // updated in place to keep the stack small (the verifier allows 512 bytes).
    unsafe {
        read_counters(ctx.ops, &mut *conn, at);
        emit(conn_event::CLOSED, cookie, at, &*conn);
    }
    let _ = CONNS.remove(&cookie);
}

#[inline(always)]
fn refresh_live(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(conn) = CONNS.get_ptr_mut(&cookie) else { return };
    let at = now();
    // SAFETY: pointer from a successful lookup; only this socket's callbacks write it, and
    // they run under the socket lock.
    unsafe {
        if at.wrapping_sub((*conn).updated_ns) >= REFRESH_NS {
            read_counters(ctx.ops, &mut *conn, at);
        }
    }
}

#[inline(always)]
fn read_counters(ops: *mut bpf_sock_ops, conn: &mut ConnValue, at: u64) {
    // SAFETY: the context is valid for the program's run; these fields are readable for full
    // sockets, which every callback handled here has.
    unsafe {
        conn.bytes_sent = (*ops).bytes_acked;
        conn.bytes_received = (*ops).bytes_received;
        conn.segs_in = (*ops).segs_in;
        conn.segs_out = (*ops).segs_out;
        conn.retransmits = (*ops).total_retrans;
        conn.srtt_us = (*ops).srtt_us >> 3;
    }
    conn.updated_ns = at;
}

/// Writes a record straight into the ring buffer (no stack copy of the event).
#[inline(always)]
fn emit(kind: u32, cookie: u64, at_ns: u64, conn: &ConnValue) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count_drop(drop_counters::EVENTS);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: an exclusive, aligned reservation of size_of::<ConnEvent>() bytes.
    unsafe {
        (*event).kind = kind;
        (*event)._pad = 0;
        (*event).cookie = cookie;
        (*event).at_ns = at_ns;
        (*event).conn = *conn;
    }
    entry.submit(0);
}
