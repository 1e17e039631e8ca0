//! The maps, pinned by name under the agent's pin directory so that they outlive the agent.
//! Names, sizes and layouts come from mesh-common.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, AuthzKey, AuthzSourceKey, AuthzVerdict, BackendValue, ConnValue, FlowKey, FrontendKey, FrontendValue,
    MaglevTable, PeerKey, ProxyAddr, RevNatIndex, RevNatKey, RevNatValue, ServiceName, ServiceValue, SlotKey, SlotValue, SockKey,
    StrictKey, StrictValue, TunnelOriginal, WorkloadValue, drop_counters, sizes,
};

/// BPF_F_NO_PREALLOC: allocate entries on insert. Used for the large-valued Maglev map, which
/// would otherwise reserve max_entries x 64 KiB up front.
const NO_PREALLOC: u32 = 1;
/// BPF_F_MMAPABLE (5.5+): userspace can map an array and read it without a syscall per entry.
const MMAPABLE: u32 = 1 << 10;

#[map(name = "mesh_frontends")]
pub static FRONTENDS: HashMap<FrontendKey, FrontendValue> = HashMap::pinned(sizes::MAX_FRONTENDS, 0);

#[map(name = "mesh_services")]
pub static SERVICES: HashMap<u32, ServiceValue> = HashMap::pinned(sizes::MAX_SERVICES, 0);

#[map(name = "mesh_slots")]
pub static SLOTS: HashMap<SlotKey, SlotValue> = HashMap::pinned(sizes::MAX_SLOTS, 0);

#[map(name = "mesh_backends")]
pub static BACKENDS: HashMap<u32, BackendValue> = HashMap::pinned(sizes::MAX_BACKENDS, 0);

#[map(name = "mesh_maglev")]
pub static MAGLEV: HashMap<u32, MaglevTable> = HashMap::pinned(sizes::MAX_MAGLEV, NO_PREALLOC);

#[map(name = "mesh_affinity")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(sizes::MAX_AFFINITY, 0);

#[map(name = "mesh_revnat")]
pub static REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::pinned(sizes::MAX_REVNAT, 0);

/// Socket cookie → its `mesh_revnat` keys, for sock_release to free them.
#[map(name = "mesh_revnat_idx")]
pub static REVNAT_INDEX: LruHashMap<u64, RevNatIndex> = LruHashMap::pinned(sizes::MAX_REVNAT_INDEX, 0);

/// The pods of this node by their pod cgroup's id; the agent writes it.
#[map(name = "mesh_workloads")]
pub static WORKLOADS: HashMap<u64, WorkloadValue> = HashMap::pinned(sizes::MAX_WORKLOADS, 0);

/// Slot 0 holds the layout version the maps were created with (see `LAYOUT_VERSION`).
#[map(name = "mesh_meta")]
pub static META: Array<u32> = Array::pinned(1, 0);

/// Service names for `mesh services`; only the agent reads and writes it.
#[map(name = "mesh_names")]
pub static NAMES: HashMap<u32, ServiceName> = HashMap::pinned(sizes::MAX_SERVICES, 0);

/// Live connections, one slot per socket cookie modulo the size (see `crate::conns`).
#[map(name = "mesh_conns")]
pub static CONNS: Array<ConnValue> = Array::pinned(sizes::CONN_SLOTS, MMAPABLE);

/// Live connections whose slot another connection holds, by cookie; allocated on insert.
#[map(name = "mesh_conns_ovfl")]
pub static CONNS_OVERFLOW: HashMap<u64, ConnValue> = HashMap::pinned(sizes::MAX_CONNS, NO_PREALLOC);

/// Connection open/close records for the agent (5.8+).
#[map(name = "mesh_events")]
pub static EVENTS: RingBuf = RingBuf::pinned(sizes::EVENTS_BYTES, 0);

/// What had to be dropped, per CPU (no atomics needed; 5.10 has no fetch-add results).
#[map(name = "mesh_drops")]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::pinned(drop_counters::COUNT, 0);

/// Counts one drop of kind `index` (`drop_counters::*`).
#[inline(always)]
pub fn count_drop(index: u32) {
    if let Some(n) = DROPS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, touched only by this CPU with preemption off.
        unsafe { *n += 1 };
    }
}

/// Local sockets for same-node redirection; the sk_msg program is attached to this map.
#[map(name = "mesh_sockhash")]
pub static SOCKHASH: SockHash<SockKey> = SockHash::pinned(sizes::MAX_SOCKHASH, 0);

/// Socket cookies by `SockKey`, so sk_msg (which has no cookie helper on older kernels) can
/// count redirected bytes in `mesh_conns`.
#[map(name = "mesh_sockcook")]
pub static SOCK_COOKIES: HashMap<SockKey, u64> = HashMap::pinned(sizes::MAX_SOCKHASH, 0);

/// The agent's outbound listener, for L7 Services.
#[map(name = "mesh_proxy")]
pub static PROXY: Array<ProxyAddr> = Array::pinned(1, 0);

/// Captured connections' Service addresses, by client end (LRU: entries of connections the
/// agent never saw close age out).
#[map(name = "mesh_l7orig")]
pub static L7_ORIGINAL: LruHashMap<PeerKey, RevNatValue> = LruHashMap::pinned(sizes::MAX_CONNS, 0);

/// The agent's tunnel listener, for connections between enrolled pods of different nodes.
#[map(name = "mesh_tunnel")]
pub static TUNNEL: Array<ProxyAddr> = Array::pinned(1, 0);

/// Enrolled pods of other nodes by address; the agent writes it.
#[map(name = "mesh_tunneled")]
pub static TUNNELED: HashMap<Addr, u32> = HashMap::pinned(sizes::MAX_TUNNELED, NO_PREALLOC);

/// Where a connection sent to the tunnel listener was going, by its socket's cookie, until
/// sock_ops knows its client port (LRU: a connect() that fails leaves its entry to age out).
#[map(name = "mesh_tunpend")]
pub static TUNNEL_PENDING: LruHashMap<u64, TunnelOriginal> = LruHashMap::pinned(sizes::MAX_TUNNEL_ORIGINALS, 0);

/// The same, by client end, for the agent to read when it accepts the connection.
#[map(name = "mesh_tunorig")]
pub static TUNNEL_ORIGINAL: LruHashMap<PeerKey, TunnelOriginal> = LruHashMap::pinned(sizes::MAX_TUNNEL_ORIGINALS, 0);

/// Pod address -> its policy class (see `mesh_common::map_names::AUTHZ_CLASSES`).
#[map(name = "mesh_authz_cls")]
pub static AUTHZ_CLASSES: HashMap<Addr, u32> = HashMap::pinned(sizes::MAX_AUTHZ_CLASSES, NO_PREALLOC);

/// (calling pod, class, port) -> verdict (see `mesh_common::map_names::AUTHZ`).
#[map(name = "mesh_authz")]
pub static AUTHZ: HashMap<AuthzKey, AuthzVerdict> = HashMap::pinned(sizes::MAX_AUTHZ, NO_PREALLOC);

/// (class, port, sender prefix) -> verdict (see `mesh_common::map_names::AUTHZ_SOURCES`).
/// LPM tries are always allocated on insert.
#[map(name = "mesh_authz_src")]
pub static AUTHZ_SOURCES: LpmTrie<AuthzSourceKey, AuthzVerdict> = LpmTrie::pinned(sizes::MAX_AUTHZ_SOURCES, 0);

/// Socket cookie -> calling pod, for sock_ops to register the connection in TRUSTED.
#[map(name = "mesh_authzok")]
pub static AUTHZ_PASSED: LruHashMap<u64, u32> = LruHashMap::pinned(sizes::MAX_AUTHZ_PASSED, 0);

/// (pod, port) -> STRICT or not (see `mesh_common::map_names::STRICT`).
#[map(name = "mesh_strict")]
pub static STRICT: HashMap<StrictKey, StrictValue> = HashMap::pinned(sizes::MAX_STRICT, NO_PREALLOC);

/// Connections the ingress filter lets in without asking (see `mesh_common::map_names::TRUSTED`).
#[map(name = "mesh_trusted")]
pub static TRUSTED: LruHashMap<FlowKey, u32> = LruHashMap::pinned(sizes::MAX_TRUSTED, 0);
