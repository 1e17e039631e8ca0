//! sock_ops: per-connection counters for every TCP connection of the attached cgroup.
//!
//! Byte counts are payload only: the kernel's counters also include the SYN and each FIN
//! (one sequence number each), which the program subtracts; which FINs a socket has seen
//! follows from its TCP state, so state changes short of TCP_CLOSE cost no map access.
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
        BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1, BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK,
        BPF_ANY, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{
    Addr, ConnEvent, ConnValue, PeerKey, RevNatKey, SockKey, conn_event, direction, drop_counters, fin,
    sizes,
};

use crate::maps::{CONNS, EVENTS, L7_ORIGINAL, PROXY, REVNAT, SOCK_COOKIES, SOCKHASH, count_drop};

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
        BPF_SOCK_OPS_STATE_CB => state_changed(&ctx),
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
    let (local, remote, local_port, remote_port_be) = endpoints(ctx);
    let cookie = cookie(ctx);
    let start = now();
    let mut conn = ConnValue {
        start_ns: start,
        local,
        remote,
        local_port,
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
            // Captured for the proxy? Tell it which Service the client dialled.
            if let Some(proxy) = PROXY.get(0)
                && proxy.port_be == remote_port_be
                && proxy.addr == remote
            {
                let peer = PeerKey { addr: local, port: local_port, _pad16: 0, _pad32: 0 };
                let _ = L7_ORIGINAL.insert(&peer, original, 0);
            }
        }
    }
    // SAFETY: valid context; a full socket in this callback.
    conn.acked_at_start = unsafe { (*ops).bytes_acked } as u32;
    read_counters(ops, &mut conn, 0, start);
    if CONNS.insert(&cookie, &conn, 0).is_err() {
        count_drop(drop_counters::CONNS);
        return;
    }
    emit(conn_event::OPENED, cookie, start, &conn);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

/// At TCP_CLOSE, sends the final record and forgets the connection. Other state changes cost
/// no map access: the FINs a socket has seen follow from the state it is in (or left).
#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let old = ctx.arg(0);
    let cookie = cookie(ctx);
    let Some(conn) = CONNS.get_ptr_mut(&cookie) else { return };
    // The full socket leaves FIN_WAIT2 for TIME_WAIT (seen here as CLOSE) when the peer's FIN
    // arrives; a FIN_WAIT2 timeout would also get here, off by one.
    let fins = if old == BPF_TCP_FIN_WAIT2 { fin::SENT | fin::RECEIVED } else { fins_in(old) };
    let at = now();
    // SAFETY: pointer from a successful lookup; this socket's callbacks run under its lock.
    // Counters are updated in place to keep the stack small (the verifier allows 512 bytes).
    unsafe {
        read_counters(ctx.ops, &mut *conn, fins, at);
        emit(conn_event::CLOSED, cookie, at, &*conn);
        // The reverse translation dies with the socket too: left to the LRU, the map would sit
        // full and every connect() would pay for an eviction.
        if (*conn).service_port != 0 {
            let key = RevNatKey { cookie, addr: (*conn).remote, port_be: (*conn).remote_port.to_be(), _pad16: 0, _pad32: 0 };
            let _ = REVNAT.remove(&key);
        }
    }
    let _ = CONNS.remove(&cookie);
}

/// The FINs a full socket in TCP state `state` has sent and received.
#[inline(always)]
fn fins_in(state: u32) -> u8 {
    match state {
        BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 => fin::SENT,
        BPF_TCP_CLOSE_WAIT => fin::RECEIVED,
        BPF_TCP_CLOSING | BPF_TCP_LAST_ACK => fin::SENT | fin::RECEIVED,
        _ => 0,
    }
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
            read_counters(ctx.ops, &mut *conn, fins_in((*ctx.ops).state), at);
        }
    }
}

/// (local address, remote address, local port in host order, remote port in network order).
#[inline(always)]
fn endpoints(ctx: &SockOpsContext) -> (Addr, Addr, u16, u16) {
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
    (local, remote, ctx.local_port() as u16, remote_port_be)
}

/// Same-node redirection, part one: established sockets of the cgroup go into the sockhash
/// (where the sk_msg program finds a connection's peer) and their cookies into
/// `mesh_sockcook`; at close the cookie entry goes (the kernel drops the sockhash entry
/// itself). Loaded only with redirection on; needs bpf_get_netns_cookie in sock_ops (5.15+).
#[sock_ops]
pub fn mesh_sockmap(ctx: SockOpsContext) -> u32 {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    let op = ctx.op();
    let established = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    let closing = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
    if !established && !closing {
        return 1;
    }
    let (local, remote, local_port, remote_port_be) = endpoints(&ctx);
    let mut key = SockKey {
        // SAFETY: helper valid for sock_ops programs from 5.15 on.
        netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        local,
        remote,
        local_port,
        remote_port: u16::from_be(remote_port_be),
        _pad: 0,
    };
    if closing {
        let _ = SOCK_COOKIES.remove(&key);
        return 1;
    }
    let cookie = cookie(&ctx);
    // SAFETY: the context is a valid bpf_sock_ops for the program's run.
    if SOCKHASH.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64).is_ok() {
        let _ = SOCK_COOKIES.insert(&key, &cookie, 0);
    }
    // The close callback needs the state flag (mesh_sockops sets it too).
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    1
}

#[inline(always)]
fn read_counters(ops: *mut bpf_sock_ops, conn: &mut ConnValue, fins: u8, at: u64) {
    conn.fins = fins;
    // SAFETY: the context is valid for the program's run; these fields are readable for full
    // sockets, which every callback handled here has.
    unsafe {
        // Payload only: the kernel's counters also count the SYN and FINs, one each.
        let mut acked = (*ops).bytes_acked.saturating_sub(conn.acked_at_start as u64);
        if conn.fins & fin::SENT != 0 && (*ops).snd_una == (*ops).snd_nxt {
            acked = acked.saturating_sub(1);
        }
        let mut received = (*ops).bytes_received;
        if conn.fins & fin::RECEIVED != 0 {
            received = received.saturating_sub(1);
        }
        conn.bytes_sent = acked;
        conn.bytes_received = received;
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
    // Wake the agent only once a quarter of the ring has filled (it also drains on a short
    // timer): a wakeup per record costs a context switch per connection end, which at tens of
    // thousands of connections a second took a fifth of the connection rate.
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= (sizes::EVENTS_BYTES / 4) as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(flags as u64);
}
