//! cgroup_skb/ingress: the last word on who may open a connection to a pod of this node.
//!
//! Only SYNs are looked at (a segment of no connection is answered with a reset by TCP anyway),
//! and only those to a pod that is STRICT (`mesh_strict`) or under an AuthorizationPolicy
//! (`mesh_authz_cls`); everything else returns at the first lookup.
//! - STRICT: only the agent's own connections come in (it terminated mTLS and decided, or it is
//!   the L7 proxy); it registers each in `mesh_trusted` before it connects.
//! - Authorization: a connection that connect4/6 on this node already let through (registered
//!   by sock_ops as its SYN left) comes in; any other sender is a caller the kernel cannot vouch
//!   for: it gets the verdict of "no pod" (`AuthzKey::workload` 0), as a plaintext peer: by its
//!   address (`mesh_authz_src`) where the pod's policies look at senders' addresses.
//!
//! A dropped SYN is recorded in `mesh_events` (`INGRESS_DROPPED`); the sender retries its SYN
//! and times out, as with a firewall's DROP.
//!
//! The IP header starts the packet (cgroup skb programs see no link layer). IPv6 extension
//! headers before TCP are not walked: such SYNs pass (none of the kernel's own connections send
//! them).
use aya_ebpf::{
    bindings::BPF_RB_NO_WAKEUP, helpers::generated::bpf_ktime_get_ns, macros::cgroup_skb, maps::lpm_trie::Key, programs::SkBuffContext,
};
use mesh_common::{
    AUTHZ_SOURCE_FIXED_BITS, Addr, AuthzKey, AuthzSourceKey, AuthzVerdict, ConnEvent, ConnValue, FlowKey, IPPROTO_TCP, NO_CLASS, StrictKey,
    V4_MAPPED_WORD, conn_event, direction, drop_counters, ingress_drop, trusted,
};

use crate::maps::{AUTHZ, AUTHZ_CLASSES, AUTHZ_SOURCES, EVENTS, STRICT, TRUSTED, count_drop};

const PASS: i32 = 1;
const DROP: i32 = 0;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[cgroup_skb(ingress)]
pub fn mesh_ingress(ctx: SkBuffContext) -> i32 {
    match syn_of(&ctx) {
        Some(flow) => admit(&flow),
        None => PASS,
    }
}

/// The flow of a SYN (without ACK), or None for anything else.
#[inline(always)]
fn syn_of(ctx: &SkBuffContext) -> Option<FlowKey> {
    let first: u8 = ctx.load(0).ok()?;
    let (source, destination, tcp) = match first >> 4 {
        4 => {
            if ctx.load::<u8>(9).ok()? != IPPROTO_TCP {
                return None;
            }
            let header = usize::from(first & 0x0f) * 4;
            let word = |at: usize| ctx.load::<u32>(at).ok();
            (Addr([0, 0, V4_MAPPED_WORD, word(12)?]), Addr([0, 0, V4_MAPPED_WORD, word(16)?]), header)
        }
        6 => {
            if ctx.load::<u8>(6).ok()? != IPPROTO_TCP {
                return None;
            }
            let addr = |at: usize| -> Option<Addr> {
                Some(Addr([ctx.load(at).ok()?, ctx.load(at + 4).ok()?, ctx.load(at + 8).ok()?, ctx.load(at + 12).ok()?]))
            };
            (addr(8)?, addr(24)?, 40)
        }
        _ => return None,
    };
    if tcp > 60 {
        return None;
    }
    let flags: u8 = ctx.load(tcp + 13).ok()?;
    if flags & TCP_SYN == 0 || flags & TCP_ACK != 0 {
        return None;
    }
    let source_port = u16::from_be(ctx.load(tcp).ok()?);
    let destination_port = u16::from_be(ctx.load(tcp + 2).ok()?);
    Some(FlowKey { source, destination, source_port, destination_port })
}

#[inline(always)]
fn admit(flow: &FlowKey) -> i32 {
    let pod = flow.destination;
    // SAFETY: plain-integer values.
    let strict = unsafe {
        STRICT
            .get(&StrictKey { addr: pod, port: flow.destination_port, _pad16: 0 })
            .or_else(|| STRICT.get(&StrictKey { addr: pod, port: 0, _pad16: 0 }))
            .copied()
    };
    let class = unsafe { AUTHZ_CLASSES.get(&pod) }.copied().filter(|c| *c != NO_CLASS);
    if strict.is_none_or(|s| s.strict == 0) && class.is_none() {
        return PASS;
    }
    // SAFETY: plain-integer value.
    let registered = unsafe { TRUSTED.get(flow) }.copied();
    if let Some(s) = strict
        && s.strict != 0
        && registered != Some(trusted::AGENT)
    {
        return dropped(flow, ingress_drop::STRICT, s.policy);
    }
    let Some(class) = class else { return PASS };
    if registered.is_some() {
        return PASS;
    }
    // Policies that look at the sender's address decide by it (its port's blocks, else the
    // other ports').
    if let Some(verdict) = by_sender(class, flow.destination_port, flow.source).or_else(|| by_sender(class, 0, flow.source)) {
        return if verdict.allow != 0 { PASS } else { dropped(flow, ingress_drop::AUTHZ, verdict.policy) };
    }
    let mut key = AuthzKey { workload: 0, class, port: flow.destination_port, _pad16: 0 };
    // SAFETY: plain-integer values.
    let verdict = match unsafe { AUTHZ.get(&key) } {
        Some(v) => *v,
        None => {
            key.port = 0;
            match unsafe { AUTHZ.get(&key) } {
                Some(v) => *v,
                None => return PASS,
            }
        }
    };
    if verdict.allow != 0 { PASS } else { dropped(flow, ingress_drop::AUTHZ, verdict.policy) }
}

/// The verdict for a sender without identity at `sender`, where the class's policies look at
/// senders' addresses (`mesh_authz_src`).
#[inline(always)]
fn by_sender(class: u32, port: u16, sender: Addr) -> Option<AuthzVerdict> {
    let data = AuthzSourceKey { class_be: class.to_be(), port_be: port.to_be(), _pad16: 0, sender };
    let key = Key::new(AUTHZ_SOURCE_FIXED_BITS + 128, data);
    // SAFETY: plain-integer value.
    AUTHZ_SOURCES.get(&key).copied()
}

/// Records the drop (`INGRESS_DROPPED`) and drops.
#[inline(always)]
fn dropped(flow: &FlowKey, check: u32, policy: u32) -> i32 {
    let Some(mut entry) = EVENTS.reserve::<ConnEvent>(0) else {
        count_drop(drop_counters::EVENTS);
        return DROP;
    };
    // SAFETY: helper valid everywhere.
    let now = unsafe { bpf_ktime_get_ns() };
    let event = entry.as_mut_ptr();
    // SAFETY: an exclusive, aligned reservation of size_of::<ConnEvent>() bytes.
    unsafe {
        (*event).kind = conn_event::INGRESS_DROPPED;
        (*event).detail = policy;
        (*event).at_ns = now;
        (*event).conn = ConnValue {
            start_ns: now,
            local: flow.destination,
            remote: flow.source,
            local_port: flow.destination_port,
            remote_port: flow.source_port,
            service_id: check,
            direction: direction::INBOUND,
            ..ConnValue::default()
        };
    }
    entry.submit(BPF_RB_NO_WAKEUP as u64);
    DROP
}
