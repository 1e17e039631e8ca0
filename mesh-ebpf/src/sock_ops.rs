//! sock_ops: per-connection counters for every TCP connection of the attached cgroup.
//!
//! Byte counts are payload only: the kernel's counters also include the SYN and each FIN
//! (one sequence number each), which the program subtracts; which FINs a socket has seen
//! follows from its TCP state, so state changes short of TCP_CLOSE cost no map access.
//!
//! A connection takes an entry in the live-connection table (`crate::conns`) when it is
//! established (the agent reads the table to count openings), and sends a CLOSED record with
//! its final counters when it reaches TCP_CLOSE, at which point the entry is freed: the table
//! never holds dead connections. A socket balanced by connect4/6 already has an entry
//! (holding the Service address); from the SYN on, a close at any point frees it. Counters
//! come from the kernel's tcp_sock; between those two events they are refreshed from RTT
//! samples, at most once a second per connection, so the per-ACK cost is a timestamp compare.
//!
//! Kernel quirks: `remote_port` holds the port in network byte order in its upper 16 bits
//! (little-endian), `local_port` is in host byte order; `srtt_us` is the kernel's value,
//! scaled by 8.
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB, BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_CLOSE_WAIT, BPF_TCP_CLOSING, BPF_TCP_FIN_WAIT1,
        BPF_TCP_FIN_WAIT2, BPF_TCP_LAST_ACK, bpf_sock_ops,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::sock_ops,
    programs::SockOpsContext,
};
use mesh_common::{
    AGENT_WORKLOAD, Addr, ConnEvent, ConnValue, FlowKey, PeerKey, RevNatValue, SockKey, TunnelOriginal, conn_event, conn_phase, direction,
    drop_counters, sizes, trusted,
};

use crate::{
    conns,
    maps::{
        AUTHZ_PASSED, EVENTS, L7_ORIGINAL, PROXY, SOCK_COOKIES, SOCKHASH, TRUSTED, TUNNEL, TUNNEL_ORIGINAL, TUNNEL_PENDING, count_drop,
    },
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// Refresh live counters from RTT samples at most this often.
const REFRESH_NS: u64 = 1_000_000_000;
/// Which FINs a socket has seen (they take a sequence number each, like the SYN, and so
/// count in the kernel's byte counters).
const FIN_SENT: u8 = 1;
const FIN_RECEIVED: u8 = 2;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => syn_leaving(&ctx),
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

/// The SYN of a connect()ed socket is about to leave. If connect4/6 gave the socket an entry,
/// it can no longer be left behind by a connect() that failed early: ask for the state
/// callbacks, whose TCP_CLOSE frees it however the attempt ends. Only the slot is looked at
/// (no hash lookup for sockets without an entry); an entry in the overflow map stays DIALED
/// until establishment, or until the agent sweeps it.
#[inline(always)]
fn syn_leaving(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    vouch_for(ctx, cookie);
    let Some(slot) = conns::own_slot(cookie) else { return };
    // SAFETY: an entry of this socket's, whose callbacks are serialised.
    if unsafe { (*slot).phase } != conn_phase::DIALED {
        return;
    }
    conns::publish(slot, conn_phase::CONNECTING);
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// A connection connect4/6 let through to a pod under policy (`mesh_authzok`): its flow goes
/// into `mesh_trusted`, so that the pod's ingress filter, if the pod is on this node, lets its
/// SYN in without taking it for a caller it cannot vouch for. The agent's entries are kept.
#[inline(always)]
fn vouch_for(ctx: &SockOpsContext, cookie: u64) {
    // SAFETY: plain-integer value.
    let Some(caller) = (unsafe { AUTHZ_PASSED.get(&cookie) }).copied() else { return };
    let _ = AUTHZ_PASSED.remove(&cookie);
    let (local, remote, local_port, remote_port_be) = endpoints(ctx);
    let flow = FlowKey { source: local, destination: remote, source_port: local_port, destination_port: u16::from_be(remote_port_be) };
    // The agent's and the kubelet's own: STRICT lets them in too.
    let who = if caller == AGENT_WORKLOAD { trusted::AGENT } else { trusted::CHECKED };
    let _ = TRUSTED.insert(&flow, &who, BPF_NOEXIST as u64);
}

#[inline(always)]
fn established(ctx: &SockOpsContext, dir: u8) {
    let ops = ctx.ops;
    let (local, remote, local_port, remote_port_be) = endpoints(ctx);
    let cookie = cookie(ctx);
    let start = now();
    let Some(entry) = conns::claim(cookie, start) else {
        count_drop(drop_counters::CONNS);
        return;
    };
    let remote_port = u16::from_be(remote_port_be);
    // SAFETY: an entry from `claim`, written only by this socket's callbacks (serialised by
    // the socket lock) and, for the byte counts of redirected data, by sk_msg.
    unsafe {
        // Balanced by connect4/6 to the backend it is now connected to? Then the entry holds
        // the Service address; anything else in it is a previous occupant's.
        let phase = (*entry).phase;
        let dialed = (phase == conn_phase::DIALED || phase == conn_phase::CONNECTING)
            && dir == direction::OUTBOUND
            && (*entry).remote == remote
            && (*entry).remote_port == remote_port;
        let (service_addr, service_port, service_id, workload) = if dialed {
            ((*entry).service_addr, (*entry).service_port, (*entry).service_id, (*entry).workload)
        } else {
            (Addr::default(), 0, 0, 0)
        };
        *entry = ConnValue {
            cookie,
            start_ns: start,
            local,
            remote,
            service_addr,
            local_port,
            remote_port,
            service_port,
            service_id,
            workload,
            direction: dir,
            // A full socket in this callback.
            acked_at_start: (*ops).bytes_acked as u32,
            ..ConnValue::default()
        };
        read_counters(ops, &mut *entry, 0, start);
        conns::publish(entry, conn_phase::ESTABLISHED);
        // Captured for the proxy? Tell it which Service the client dialled.
        if service_port != 0
            && let Some(proxy) = PROXY.get(0)
            && proxy.port_be == remote_port_be
            && proxy.addr == remote
        {
            let peer = PeerKey { addr: local, port: local_port, _pad16: 0, _pad32: 0 };
            let original = RevNatValue { addr: service_addr, port_be: service_port.to_be(), _pad16: 0, service_id };
            let _ = L7_ORIGINAL.insert(&peer, &original, 0);
            // Tunnels on: the proxy sends the caller's requests through them as the caller's
            // identity, so it learns the calling pod here too.
            if let Some(tunnel) = TUNNEL.get(0)
                && tunnel.port_be != 0
            {
                let caller =
                    TunnelOriginal { addr: service_addr, port_be: service_port.to_be(), _pad16: 0, service_id, workload, _pad32: 0 };
                let _ = TUNNEL_ORIGINAL.insert(&peer, &caller, 0);
            }
        } else if let Some(tunnel) = TUNNEL.get(0)
            && tunnel.port_be == remote_port_be
            && tunnel.addr == remote
            && let Some(original) = TUNNEL_PENDING.get(&cookie)
        {
            // Sent to the tunnel listener: now that the client port is known, file where it
            // was going under it, for the listener to find.
            let original = *original;
            let peer = PeerKey { addr: local, port: local_port, _pad16: 0, _pad32: 0 };
            let _ = TUNNEL_ORIGINAL.insert(&peer, &original, 0);
            let _ = TUNNEL_PENDING.remove(&cookie);
        }
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

/// At TCP_CLOSE, sends the final record and frees the entry. Other state changes cost no map
/// access: the FINs a socket has seen follow from the state it is in (or left).
#[inline(always)]
fn state_changed(ctx: &SockOpsContext) {
    if ctx.arg(1) == BPF_TCP_FIN_WAIT2 {
        // Remember where the receive side was: see `rcv_nxt_at_fin_wait2`.
        if let Some(entry) = conns::find(cookie(ctx)) {
            // SAFETY: an entry from `find`; see `established`.
            unsafe { (*entry).rcv_nxt_at_fin_wait2 = (*ctx.ops).rcv_nxt };
        }
        return;
    }
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return;
    }
    let old = ctx.arg(0);
    let cookie = cookie(ctx);
    let Some(entry) = conns::find(cookie) else { return };
    // SAFETY: an entry from `find`; see `established`.
    unsafe {
        if (*entry).phase == conn_phase::ESTABLISHED {
            // The full socket leaves FIN_WAIT2 for TIME_WAIT (seen here as CLOSE) when the
            // peer's FIN arrives, but also, closed by its owner, as soon as its own FIN is
            // acknowledged (tcp_rcv_state_process hands it to a timewait socket, which takes
            // the peer's FIN later): the FIN was received if rcv_nxt moved since FIN_WAIT2.
            // (Data received after FIN_WAIT2 and no FIN before the close would count one
            // byte short.)
            let fins = if old == BPF_TCP_FIN_WAIT2 {
                if (*ctx.ops).rcv_nxt != (*entry).rcv_nxt_at_fin_wait2 { FIN_SENT | FIN_RECEIVED } else { FIN_SENT }
            } else {
                fins_in(old)
            };
            let at = now();
            read_counters(ctx.ops, &mut *entry, fins, at);
            emit(conn_event::CLOSED, at, &*entry);
        }
    }
    conns::release(cookie, entry);
}

/// The FINs a full socket in TCP state `state` has sent and received.
#[inline(always)]
fn fins_in(state: u32) -> u8 {
    match state {
        BPF_TCP_FIN_WAIT1 | BPF_TCP_FIN_WAIT2 => FIN_SENT,
        BPF_TCP_CLOSE_WAIT => FIN_RECEIVED,
        BPF_TCP_CLOSING | BPF_TCP_LAST_ACK => FIN_SENT | FIN_RECEIVED,
        _ => 0,
    }
}

#[inline(always)]
fn refresh_live(ctx: &SockOpsContext) {
    let cookie = cookie(ctx);
    let Some(entry) = conns::find(cookie) else { return };
    let at = now();
    // SAFETY: an entry from `find`; see `established`.
    unsafe {
        if (*entry).phase == conn_phase::ESTABLISHED && at.wrapping_sub((*entry).updated_ns) >= REFRESH_NS {
            read_counters(ctx.ops, &mut *entry, fins_in((*ctx.ops).state), at);
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
    // SAFETY: the context is valid for the program's run; these fields are readable for full
    // sockets, which every callback handled here has.
    unsafe {
        // Payload only: the kernel's counters also count the SYN and FINs, one each.
        let mut acked = (*ops).bytes_acked.saturating_sub(conn.acked_at_start as u64);
        if fins & FIN_SENT != 0 && (*ops).snd_una == (*ops).snd_nxt {
            acked = acked.saturating_sub(1);
        }
        let mut received = (*ops).bytes_received;
        if fins & FIN_RECEIVED != 0 {
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
fn emit(kind: u32, at_ns: u64, conn: &ConnValue) {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count_drop(drop_counters::EVENTS);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: an exclusive, aligned reservation of size_of::<ConnEvent>() bytes.
    unsafe {
        (*event).kind = kind;
        (*event).detail = 0;
        (*event).at_ns = at_ns;
        (*event).conn = *conn;
    }
    // Wake the agent only once a quarter of the ring has filled (it also drains on a short
    // timer): a wakeup per record costs a context switch per connection end, which at tens of
    // thousands of connections a second took a fifth of the connection rate.
    let flags =
        if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= (sizes::EVENTS_BYTES / 4) as u64 { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    entry.submit(flags as u64);
}
