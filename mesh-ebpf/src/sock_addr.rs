//! cgroup sock_addr hooks: socket-level load balancing.
//!
//! `connect4|6` and `sendmsg4|6` rewrite a Service address (VIP:port) to one of its backends
//! before the kernel routes anything, so a balanced flow costs one map walk per connection (per
//! datagram for unconnected UDP) and nothing per packet. `getpeername4|6` and `recvmsg4|6` undo
//! the rewrite for the application, which keeps seeing the VIP it dialled. A TCP socket keeps
//! what it dialled in its live-connection entry (`crate::conns`), which sock_ops fills in and
//! frees; UDP sockets keep it in the `mesh_revnat` LRU, indexed by socket (`mesh_revnat_idx`)
//! so that `sock_release` frees a socket's entries with it.
//!
//! Kernel quirks (all seen on 5.10 to 6.18):
//! - Context fields are written with single 4-byte volatile stores; LLVM may merge two adjacent
//!   stores into one 8-byte store, which the verifier rejects for `bpf_sock_addr`.
//! - `user_port` holds the port in network byte order in its low 16 bits.
//! - recvmsg hooks must return 1; returning 0 is rejected at load time.
//! - `bpf_set_retval` (to pick an errno) only exists from 5.18 on, so a TCP connect to a service
//!   with no usable endpoint is sent to the loopback port 0 instead, where nothing can listen:
//!   the caller gets ECONNREFUSED at once, as from kube-proxy's REJECT rule. UDP is rejected
//!   with EPERM (a sendmsg to port 0 would be EINVAL).
//!
//! Logging (aya-log) is off unless the agent runs with `--bpf-log`: the level is a load-time
//! constant, so the verifier removes disabled log statements and the hot path pays nothing.
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_TCP_CLOSE, bpf_sock_addr},
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie,
        bpf_ktime_get_ns,
    },
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use aya_log_ebpf::{debug, trace};
use mesh_common::{
    AGENT_WORKLOAD, Addr, AffinityKey, AffinityValue, AuthzKey, BackendValue, ConnEvent, ConnValue, FrontendKey, IPPROTO_TCP, IPPROTO_UDP,
    MAGLEV_TABLE_SIZE, NO_CLASS, REVNAT_INDEX_LEN, RevNatIndex, RevNatKey, RevNatPeer, RevNatValue, ServiceValue, SlotKey, TunnelOriginal,
    WorkloadValue, conn_event, conn_phase, direction, drop_counters, service_flags, sizes, workload_flags,
};

use crate::{
    conns,
    maps::{
        AFFINITY, AUTHZ, AUTHZ_CLASSES, AUTHZ_PASSED, BACKENDS, EVENTS, FRONTENDS, MAGLEV, PROXY, REVNAT, REVNAT_INDEX, SERVICES, SLOTS,
        TUNNEL, TUNNEL_PENDING, TUNNELED, WORKLOADS, count_drop,
    },
};

/// Let the syscall go on (with the address as the program left it).
const PROCEED: i32 = 1;
/// Fail the syscall with EPERM.
const REJECT: i32 = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    balance(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    balance(&ctx, Family::V6, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    balance(&ctx, Family::V4, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    balance(&ctx, Family::V6, false)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx, Family::V4);
    PROCEED
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx, Family::V6);
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeer4(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx, Family::V4);
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeer6(ctx: SockAddrContext) -> i32 {
    restore_service_address(&ctx, Family::V6);
    PROCEED
}

/// Rewrite a Service address to a backend. `connect` is true for connect(), false for an
/// unconnected sendmsg(), which only UDP reaches.
#[inline(always)]
fn balance(ctx: &SockAddrContext, family: Family, connect: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands sock_addr programs a valid context for their whole run.
    let proto = unsafe { read_volatile(addr_of!((*sa).protocol)) } as u8;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return PROCEED;
    }
    let vip = read_user_addr(sa, family);
    let vport_be = read_user_port(sa);
    let key = FrontendKey { addr: vip, port_be: vport_be, proto, _pad: 0 };
    // SAFETY: map values are plain integers; a concurrent update can at worst make us read a
    // value from just before or after it, which the agent's update order makes harmless.
    let Some(frontend) = (unsafe { FRONTENDS.get(&key) }) else {
        // Not a Service: maybe a pod under policy, or an enrolled pod of another node, dialled
        // by its address.
        if proto == IPPROTO_TCP && connect {
            let caller = WorkloadValue::default();
            if !authorized(ctx, caller, vip, vport_be, vip, vport_be, 0) {
                return REJECT;
            }
            return tunnel_if_enrolled(ctx, family, vip, vport_be, vip, vport_be, 0, caller);
        }
        return PROCEED;
    };
    let service_id = frontend.service_id;
    let Some(service) = (unsafe { SERVICES.get(&service_id) }) else {
        // The agent writes a service before its frontends and removes it after them, so this
        // is a torn read during an update; leave the address alone.
        return PROCEED;
    };

    // The dialling pod, for TCP connects (its connections record it).
    // A plain value (id 0: none), not an Option: the kernels before 6.2 refuse reading an
    // Option's payload that the compiler left unwritten on the None path ("invalid read from
    // stack"), where it passes the Option on.
    let caller = if proto == IPPROTO_TCP && connect { calling_workload().unwrap_or_default() } else { WorkloadValue::default() };
    // A pod that is not enrolled is balanced at L4 even to an L7 Service: the proxy is for
    // enrolled workloads (and for processes in no known pod, as on a standalone host).
    let caller_enrolled = caller.id == 0 || caller.flags & workload_flags::ENROLLED != 0;
    let (baddr, bport_be) = if service.flags & service_flags::L7 != 0 && proto == IPPROTO_TCP && caller_enrolled {
        // L7-managed: to the agent's proxy, which reads the Service address back from
        // mesh_l7orig (filled by sock_ops once the connection is established).
        match PROXY.get(0) {
            Some(proxy) if proxy.port_be != 0 && (family == Family::V6 || proxy.addr.is_v4_mapped()) => (proxy.addr, proxy.port_be),
            _ => return refuse(sa, family, proto, connect),
        }
    } else {
        let Some(backend) = pick_backend(ctx, service_id, service) else {
            debug!(ctx, "service {}: no usable endpoint, refused", service_id);
            return refuse(sa, family, proto, connect);
        };
        // An IPv4 socket can only reach an IPv4 backend; the agent never pairs families
        // wrongly, but the verifier-checked program must not trust that.
        if family == Family::V4 && !backend.addr.is_v4_mapped() {
            return refuse(sa, family, proto, connect);
        }
        // Where the destination's policies would refuse the caller: refused here, at once.
        if proto == IPPROTO_TCP && connect && !authorized(ctx, caller, backend.addr, backend.port_be, vip, vport_be, service_id) {
            return REJECT;
        }
        // An enrolled pod's connection to an enrolled pod of another node: through the
        // tunnel, to the backend picked here.
        if proto == IPPROTO_TCP && connect && caller.id != 0 && caller.flags & workload_flags::ENROLLED != 0 {
            // SAFETY: plain-integer value.
            if unsafe { TUNNELED.get(&backend.addr) }.is_some() {
                return tunnel_if_enrolled(ctx, family, vip, vport_be, backend.addr, backend.port_be, service_id, caller);
            }
        }
        (backend.addr, backend.port_be)
    };
    write_user_addr(sa, family, &baddr);
    write_user_port(sa, bport_be);
    trace!(ctx, "service {}: to backend port {}", service_id, u16::from_be(bport_be));

    // Remember what the socket dialled, for getpeername() and recvmsg().
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if proto == IPPROTO_TCP {
        remember_dial(cookie, vip, vport_be, baddr, bport_be, service_id, caller.id);
        return PROCEED;
    }
    let rev_key = RevNatKey { cookie, addr: baddr, port_be: bport_be, _pad16: 0, _pad32: 0 };
    let rev_value = RevNatValue { addr: vip, port_be: vport_be, _pad16: 0, service_id };
    // SAFETY: plain-integer value.
    let known = unsafe { REVNAT.get(&rev_key) }.is_some();
    // A full LRU map evicts its oldest entry; failure here only loses the reverse translation.
    let _ = REVNAT.insert(&rev_key, &rev_value, 0);
    if !known {
        index_reverse_translation(cookie, baddr, bport_be);
    }
    PROCEED
}

/// Sends a TCP connect() to the agent's tunnel listener when `pod` is an enrolled pod of
/// another node (`mesh_tunneled`) and the caller an enrolled pod of this one (`caller`, or
/// looked up when its id is 0). The socket keeps `dialled` for getpeername(); the listener learns
/// `pod` and the caller from `mesh_tunorig`. No tunnel listener while the map says tunnel:
/// refused (fail closed: the bytes would cross nodes in plaintext).
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "kernel helper, inlined")]
fn tunnel_if_enrolled(
    ctx: &SockAddrContext,
    family: Family,
    dialled: Addr,
    dialled_port_be: u16,
    pod: Addr,
    pod_port_be: u16,
    service_id: u32,
    caller: WorkloadValue,
) -> i32 {
    // SAFETY: plain-integer value. Looked up first: most connections go nowhere near it.
    if unsafe { TUNNELED.get(&pod) }.is_none() {
        return PROCEED;
    }
    let caller = if caller.id != 0 { caller } else { calling_workload().unwrap_or_default() };
    if caller.id == 0 || caller.flags & workload_flags::ENROLLED == 0 {
        return PROCEED;
    }
    let sa = ctx.sock_addr;
    let (addr, port_be) = match TUNNEL.get(0) {
        Some(t) if t.port_be != 0 && (family == Family::V6 || t.addr.is_v4_mapped()) => (t.addr, t.port_be),
        _ => return refuse(sa, family, IPPROTO_TCP, true),
    };
    write_user_addr(sa, family, &addr);
    write_user_port(sa, port_be);
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = TunnelOriginal { addr: pod, port_be: pod_port_be, _pad16: 0, service_id, workload: caller.id, _pad32: 0 };
    // A full LRU evicts its oldest entry: at worst a connection the listener cannot place.
    let _ = TUNNEL_PENDING.insert(&cookie, &original, 0);
    remember_dial(cookie, dialled, dialled_port_be, addr, port_be, service_id, caller.id);
    trace!(ctx, "to the tunnel listener, for port {}", u16::from_be(pod_port_be));
    PROCEED
}

/// Whether the policies of the pod at `pod` let the caller (`caller`, or looked up when its id
/// is 0) connect to `pod_port_be`, as the agent worked them out into `mesh_authz`. A refusal
/// is recorded in `mesh_events` (the flow log and the source's decision metric read it). Pods
/// that no policy selects, and the agent itself, are let through without a second lookup.
#[inline(always)]
fn authorized(
    ctx: &SockAddrContext,
    caller: WorkloadValue,
    pod: Addr,
    pod_port_be: u16,
    dialled: Addr,
    dialled_port_be: u16,
    service_id: u32,
) -> bool {
    // SAFETY: plain-integer values. Looked up first: most pods are under no policy.
    let Some(class) = (unsafe { AUTHZ_CLASSES.get(&pod) }) else { return true };
    let caller = if caller.id != 0 { caller } else { calling_workload().unwrap_or_default() };
    if caller.flags & workload_flags::AGENT != 0 {
        // The agent, or the kubelet (its probes): let through, and into STRICT ports.
        // SAFETY: helper valid for sock_addr programs.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = AUTHZ_PASSED.insert(&cookie, &AGENT_WORKLOAD, 0);
        return true;
    }
    if *class == NO_CLASS {
        // STRICT only: the ingress filter decides.
        return true;
    }
    let mut key = AuthzKey { workload: caller.id, class: *class, port: u16::from_be(pod_port_be), _pad16: 0 };
    // The port's own verdict, else the class's verdict for ports its policies do not name.
    let verdict = unsafe { AUTHZ.get(&key) }.copied().or_else(|| {
        key.port = 0;
        unsafe { AUTHZ.get(&key) }.copied()
    });
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // No verdict for this caller: the destination decides.
    if verdict.is_none_or(|v| v.allow != 0) {
        // A pod of this node, let through: once its SYN leaves, sock_ops tells the
        // destination's ingress filter (if the pod is on this node) not to ask again.
        if caller.id != 0 {
            let _ = AUTHZ_PASSED.insert(&cookie, &caller.id, 0);
        }
        return true;
    }
    let Some(verdict) = verdict else { return true };
    // SAFETY: helper valid everywhere.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count_drop(drop_counters::EVENTS);
        return false;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: an exclusive, aligned reservation of size_of::<ConnEvent>() bytes.
    unsafe {
        (*event).kind = conn_event::DENIED;
        (*event).detail = verdict.policy;
        (*event).at_ns = now;
        (*event).conn = ConnValue {
            cookie,
            start_ns: now,
            remote: pod,
            remote_port: u16::from_be(pod_port_be),
            service_addr: dialled,
            service_port: if service_id != 0 { u16::from_be(dialled_port_be) } else { 0 },
            service_id,
            workload: caller.id,
            direction: direction::OUTBOUND,
            ..ConnValue::default()
        };
    }
    entry.submit(0);
    debug!(ctx, "connect to port {} refused by policy {}", u16::from_be(pod_port_be), verdict.policy);
    false
}

/// Remembers that the socket has a `mesh_revnat` entry for this backend, so that sock_release
/// frees it with the socket. Without that, the entries of closed sockets fill the LRU, which
/// then evicts those of live ones (an idle socket's reply would show the backend's address).
/// Entries past `REVNAT_INDEX_LEN` backends per socket are not indexed: they age out.
#[inline(always)]
fn index_reverse_translation(cookie: u64, addr: Addr, port_be: u16) {
    let peer = RevNatPeer { addr, port_be, _pad16: 0 };
    match REVNAT_INDEX.get_ptr_mut(&cookie) {
        Some(index) => {
            // SAFETY: pointer from a successful lookup. Two sends racing on one socket can
            // lose an index entry; that entry then ages out like an unindexed one.
            let n = unsafe { (*index).count } as usize;
            if n < REVNAT_INDEX_LEN {
                unsafe {
                    (*index).peers[n] = peer;
                    (*index).count = n as u32 + 1;
                }
            }
        }
        None => {
            let mut index = RevNatIndex::default();
            index.peers[0] = peer;
            index.count = 1;
            let _ = REVNAT_INDEX.insert(&cookie, &index, 0);
        }
    }
}

/// The pod of the calling process: its cgroup, or the nearest ancestor that is a pod's cgroup
/// in `mesh_workloads` (a container's cgroup sits below its pod's).
#[inline(always)]
fn calling_workload() -> Option<WorkloadValue> {
    // SAFETY: helpers valid for cgroup sock_addr programs (5.7+).
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map values are plain integers.
    if let Some(w) = unsafe { WORKLOADS.get(&own) } {
        return Some(*w);
    }
    let mut level = sizes::MAX_POD_CGROUP_LEVEL;
    while level > 0 {
        // SAFETY: as above; an ancestor level deeper than the cgroup is 0, found in no entry.
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor != 0
            && let Some(w) = unsafe { WORKLOADS.get(&ancestor) }
        {
            return Some(*w);
        }
        level -= 1;
    }
    None
}

/// A TCP socket's dial, in a DIALED entry of the live-connection table, which sock_ops turns
/// into the connection's entry once it is established.
#[inline(always)]
fn remember_dial(cookie: u64, vip: Addr, vport_be: u16, baddr: Addr, bport_be: u16, service_id: u32, workload: u32) {
    // SAFETY: helper valid everywhere.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(entry) = conns::claim(cookie, now) else {
        // Only the reverse translation is lost: getpeername() shows the backend.
        count_drop(drop_counters::CONNS);
        return;
    };
    // SAFETY: an entry from `claim`; this socket's hooks are serialised by its lock.
    unsafe {
        *entry = ConnValue {
            cookie,
            start_ns: now,
            remote: baddr,
            remote_port: u16::from_be(bport_be),
            service_addr: vip,
            service_port: u16::from_be(vport_be),
            service_id,
            workload,
            ..ConnValue::default()
        };
    }
    conns::publish(entry, conn_phase::DIALED);
}

/// Undo `balance` for getpeername() and recvmsg(): show the VIP instead of the backend.
#[inline(always)]
fn restore_service_address(ctx: &SockAddrContext, family: Family) {
    let sa = ctx.sock_addr;
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let (addr, port_be) = (read_user_addr(sa, family), read_user_port(sa));
    // SAFETY: the context is valid for the program's run.
    let proto = unsafe { read_volatile(addr_of!((*sa).protocol)) } as u8;
    let original = if proto == IPPROTO_TCP {
        // getpeername() fails on a closed socket before this hook; accept() does not, and
        // returns sockets its peer already reset. Those were never balanced (accepted), and
        // have freed their entry: skip the lookup that would miss.
        // SAFETY: the context's socket is valid for the program's run.
        if unsafe { read_volatile(addr_of!((*(*sa).__bindgen_anon_1.sk).state)) } == BPF_TCP_CLOSE {
            return;
        }
        let Some(entry) = conns::find(cookie) else { return };
        // SAFETY: an entry from `find`: plain integers, whole fields written by this socket.
        let conn = unsafe { &*entry };
        if conn.service_port == 0 || conn.remote != addr || conn.remote_port != u16::from_be(port_be) {
            return;
        }
        (conn.service_addr, conn.service_port.to_be())
    } else {
        let key = RevNatKey { cookie, addr, port_be, _pad16: 0, _pad32: 0 };
        // SAFETY: plain-integer value, see `balance`.
        let Some(original) = (unsafe { REVNAT.get(&key) }) else {
            if was_evicted(cookie, addr, port_be) {
                count_drop(drop_counters::REVNAT);
            }
            return;
        };
        (original.addr, original.port_be)
    };
    let (addr, port_be) = original;
    if family == Family::V4 && !addr.is_v4_mapped() {
        return;
    }
    write_user_addr(sa, family, &addr);
    write_user_port(sa, port_be);
}

/// Whether the socket had a reverse translation for this peer that the LRU has evicted since.
#[inline(always)]
fn was_evicted(cookie: u64, addr: Addr, port_be: u16) -> bool {
    // SAFETY: plain-integer value.
    let Some(index) = (unsafe { REVNAT_INDEX.get(&cookie) }) else { return false };
    let mut i = 0;
    while i < REVNAT_INDEX_LEN {
        if (i as u32) < index.count && index.peers[i].addr == addr && index.peers[i].port_be == port_be {
            return true;
        }
        i += 1;
    }
    false
}

/// cgroup/sock_release: a UDP socket's reverse translations go with it.
#[cgroup_sock(sock_release)]
pub fn mesh_sock_rel(ctx: SockContext) -> i32 {
    // SAFETY: the context is valid for the program's run.
    let protocol = unsafe { read_volatile(addr_of!((*ctx.sock).protocol)) } as u8;
    if protocol != IPPROTO_UDP {
        return PROCEED;
    }
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-integer value; the socket is going, nothing else writes its index.
    let Some(index) = (unsafe { REVNAT_INDEX.get(&cookie) }) else { return PROCEED };
    let index = *index;
    let mut i = 0;
    while i < REVNAT_INDEX_LEN {
        if (i as u32) < index.count {
            let peer = index.peers[i];
            let key = RevNatKey { cookie, addr: peer.addr, port_be: peer.port_be, _pad16: 0, _pad32: 0 };
            let _ = REVNAT.remove(&key);
        }
        i += 1;
    }
    let _ = REVNAT_INDEX.remove(&cookie);
    PROCEED
}

/// No usable endpoint: fail fast, never hang.
#[inline(always)]
fn refuse(sa: *mut bpf_sock_addr, family: Family, proto: u8, connect: bool) -> i32 {
    if proto != IPPROTO_TCP || !connect {
        return REJECT;
    }
    let loopback = match family {
        Family::V4 => Addr::from_ip4_word(u32::from_ne_bytes([127, 0, 0, 1])),
        Family::V6 => Addr([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]),
    };
    write_user_addr(sa, family, &loopback);
    write_user_port(sa, 0);
    PROCEED
}

#[inline(always)]
fn pick_backend(ctx: &SockAddrContext, service_id: u32, service: &ServiceValue) -> Option<&'static BackendValue> {
    if service.backend_count == 0 {
        return None;
    }
    if service.flags & service_flags::AFFINITY == 0 {
        return pick_fresh(ctx, service_id, service);
    }

    // sessionAffinity: ClientIP. The client is its network namespace (see AffinityKey).
    // SAFETY: helpers valid for sock_addr programs (netns cookie: 5.7+).
    let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let now = unsafe { bpf_ktime_get_ns() };
    let key = AffinityKey { client, service_id, _pad: 0 };
    let timeout_ns = service.affinity_timeout_s as u64 * 1_000_000_000;
    if let Some(remembered) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup; concurrent writers store whole integers.
        let (backend_id, last_used) = unsafe { ((*remembered).backend_id, (*remembered).last_used_ns) };
        if now.wrapping_sub(last_used) <= timeout_ns {
            // SAFETY: plain-integer value.
            if let Some(backend) = unsafe { BACKENDS.get(&backend_id) } {
                // A backend id is only reused after its entry was deleted, and an entry names
                // its service, so a stale id cannot send us to another service's backend.
                if backend.service_id == service_id {
                    unsafe { write_volatile(addr_of_mut!((*remembered).last_used_ns), now) };
                    return Some(backend);
                }
            }
        }
    }
    let (backend_id, backend) = pick_fresh_with_id(ctx, service_id, service)?;
    let _ = AFFINITY.insert(&key, &AffinityValue { backend_id, _pad: 0, last_used_ns: now }, 0);
    Some(backend)
}

#[inline(always)]
fn pick_fresh(ctx: &SockAddrContext, service_id: u32, service: &ServiceValue) -> Option<&'static BackendValue> {
    pick_fresh_with_id(ctx, service_id, service).map(|(_, backend)| backend)
}

/// Uniformly at random over the usable slots, or from the service's Maglev table.
#[inline(always)]
fn pick_fresh_with_id(ctx: &SockAddrContext, service_id: u32, service: &ServiceValue) -> Option<(u32, &'static BackendValue)> {
    let backend_id = if service.flags & service_flags::MAGLEV != 0 {
        // SAFETY: helper valid for sock_addr programs.
        let client = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let index = mix64(client ^ service_id as u64) % MAGLEV_TABLE_SIZE as u64;
        // The verifier does not learn bounds from a modulo. Hide the index from LLVM (a
        // volatile round trip through the stack) so it cannot drop the explicit bound check
        // the verifier needs before the index touches the map value.
        let index = unsafe { read_volatile(&index) };
        if index >= MAGLEV_TABLE_SIZE as u64 {
            return None;
        }
        // SAFETY: plain-integer value.
        let table = unsafe { MAGLEV.get(&service_id) }?;
        *table.backend_ids.get(index as usize)?
    } else {
        // SAFETY: helper valid everywhere. checked_rem: no panic path for the verifier to reject.
        let slot = unsafe { bpf_get_prandom_u32() }.checked_rem(service.backend_count)?;
        // SAFETY: plain-integer values.
        let picked = unsafe { SLOTS.get(&SlotKey { service_id, slot }) };
        // The agent shrinks a service by lowering its count before deleting the last slots;
        // a reader that saw the old count may miss a slot: slot 0 always exists then.
        let picked = picked.or_else(|| unsafe { SLOTS.get(&SlotKey { service_id, slot: 0 }) })?;
        picked.backend_id
    };
    // SAFETY: plain-integer value.
    let backend = unsafe { BACKENDS.get(&backend_id) }?;
    Some((backend_id, backend))
}

/// A 64-bit finalizer (from MurmurHash3): spreads netns cookies, which are small sequential
/// numbers, over the Maglev table.
#[inline(always)]
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[inline(always)]
fn read_user_addr(sa: *mut bpf_sock_addr, family: Family) -> Addr {
    // SAFETY: valid context; 4-byte reads of these fields are always allowed.
    unsafe {
        match family {
            Family::V4 => Addr::from_ip4_word(read_volatile(addr_of!((*sa).user_ip4))),
            Family::V6 => Addr([
                read_volatile(addr_of!((*sa).user_ip6[0])),
                read_volatile(addr_of!((*sa).user_ip6[1])),
                read_volatile(addr_of!((*sa).user_ip6[2])),
                read_volatile(addr_of!((*sa).user_ip6[3])),
            ]),
        }
    }
}

#[inline(always)]
fn write_user_addr(sa: *mut bpf_sock_addr, family: Family, addr: &Addr) {
    // SAFETY: valid context; each store is one 4-byte store (see the module comment).
    unsafe {
        match family {
            Family::V4 => write_volatile(addr_of_mut!((*sa).user_ip4), addr.ip4_word()),
            Family::V6 => {
                write_volatile(addr_of_mut!((*sa).user_ip6[0]), addr.0[0]);
                write_volatile(addr_of_mut!((*sa).user_ip6[1]), addr.0[1]);
                write_volatile(addr_of_mut!((*sa).user_ip6[2]), addr.0[2]);
                write_volatile(addr_of_mut!((*sa).user_ip6[3]), addr.0[3]);
            }
        }
    }
}

#[inline(always)]
fn read_user_port(sa: *mut bpf_sock_addr) -> u16 {
    // SAFETY: valid context.
    unsafe { read_volatile(addr_of!((*sa).user_port)) as u16 }
}

#[inline(always)]
fn write_user_port(sa: *mut bpf_sock_addr, port_be: u16) {
    // SAFETY: valid context.
    unsafe { write_volatile(addr_of_mut!((*sa).user_port), port_be as u32) }
}
