//! The contract between mesh's kernel programs (mesh-ebpf) and its agent (mesh-userspace).
//!
//! Every map is named here with its size and its `#[repr(C)]` key and value, padded explicitly so
//! that the kernel and the agent agree byte for byte. Services are chained maps, as in Cilium:
//!
//! ```text
//! FRONTENDS (vip, port, proto) ──► service id ──► SERVICES (backend count, flags)
//!                                     │
//!                                     ├─► SLOTS (service id, slot) ──► backend id ──► BACKENDS
//!                                     └─► MAGLEV (service id) ──► [backend id; MAGLEV_TABLE_SIZE]
//! ```
//!
//! so an endpoint change touches a few entries, never the whole table.
#![no_std]

/// Bumped whenever a key or value below changes layout. The agent compares it with the pinned
/// `mesh_meta` map to tell a restart (adopt the pinned maps) from an upgrade (rebuild them).
pub const LAYOUT_VERSION: u32 = 5;

/// Map names: also their file names under the pin directory. The kernel limits them to 15 bytes.
pub mod map_names {
    pub const FRONTENDS: &str = "mesh_frontends";
    pub const SERVICES: &str = "mesh_services";
    pub const SLOTS: &str = "mesh_slots";
    pub const BACKENDS: &str = "mesh_backends";
    pub const MAGLEV: &str = "mesh_maglev";
    pub const AFFINITY: &str = "mesh_affinity";
    pub const REVNAT: &str = "mesh_revnat";
    /// Socket cookie → the backends its `mesh_revnat` entries are for (`RevNatIndex`), so that
    /// they are freed when the socket is (cgroup/sock_release).
    pub const REVNAT_INDEX: &str = "mesh_revnat_idx";
    pub const META: &str = "mesh_meta";
    /// Service names by id, for `mesh services` while the agent is down. Never read by the
    /// kernel programs.
    pub const NAMES: &str = "mesh_names";
    /// Live TCP connections of the attached cgroup: an array of `ConnValue` slots indexed by
    /// socket cookie (see `conn_slot`), mmap-able so readers need no syscall per slot.
    pub const CONNS: &str = "mesh_conns";
    /// Connections whose slot another connection holds, by socket cookie.
    pub const CONNS_OVERFLOW: &str = "mesh_conns_ovfl";
    /// Ring buffer of connection open/close records (`ConnEvent`).
    pub const EVENTS: &str = "mesh_events";
    /// Per-CPU counters of what the kernel had to drop (`drop_counters`).
    pub const DROPS: &str = "mesh_drops";
    /// Same-node redirection: local TCP sockets of the cgroup by `SockKey` (sk_msg target).
    pub const SOCKHASH: &str = "mesh_sockhash";
    /// `SockKey` → socket cookie, so sk_msg can count redirected bytes per connection.
    pub const SOCK_COOKIES: &str = "mesh_sockcook";
    /// Slot 0: where L7 Services' connections are sent (the agent's outbound listener).
    pub const PROXY: &str = "mesh_proxy";
    /// Client (address, port) of a captured connection → the Service address it dialled.
    pub const L7_ORIGINAL: &str = "mesh_l7orig";
    /// The pods of this node by the cgroup id of their pod cgroup (`WorkloadValue`): which pod
    /// a socket belongs to. Written by the agent.
    pub const WORKLOADS: &str = "mesh_workloads";
    /// Slot 0: the agent's tunnel listener, where enrolled pods' TCP connections to enrolled
    /// pods of other nodes are sent, to be carried over HBONE (mTLS). Port 0: none.
    pub const TUNNEL: &str = "mesh_tunnel";
    /// Addresses of enrolled pods of other nodes (value: 0, reserved): an enrolled pod's TCP
    /// connection to one (dialled, or the backend a Service picked) goes to `TUNNEL`.
    pub const TUNNELED: &str = "mesh_tunneled";
    /// Socket cookie → where a connection sent to the tunnel listener was going
    /// (`TunnelOriginal`), from connect() until sock_ops moves it to `TUNNEL_ORIGINAL`.
    pub const TUNNEL_PENDING: &str = "mesh_tunpend";
    /// Client (address, port) of a connection at the tunnel listener → `TunnelOriginal`; while
    /// tunnels are on, also of connections captured for the L7 proxy (which learns the calling
    /// pod from it, to tunnel its requests as that pod).
    pub const TUNNEL_ORIGINAL: &str = "mesh_tunorig";
    /// Pods selected by an AuthorizationPolicy, by address → their policy class (pods whose
    /// selecting policies are the same share one). Pods not here are not refused early.
    pub const AUTHZ_CLASSES: &str = "mesh_authz_cls";
    /// (calling pod, policy class, port) → `AuthzVerdict`: what the destination would decide,
    /// so that connect() fails at once (EPERM) where it would be refused.
    pub const AUTHZ: &str = "mesh_authz";
    /// LPM trie, (policy class, port, sender address prefix) -> `AuthzVerdict`: for the classes
    /// whose policies look at the sender's address (`ipBlocks`, `source.ip`), the verdict of a
    /// sender without identity by its address, which the ingress filter asks before `AUTHZ`.
    pub const AUTHZ_SOURCES: &str = "mesh_authz_src";
    /// Socket cookie -> the calling pod, for a connect() to a pod under policy that was let
    /// through: sock_ops moves it into `TRUSTED` once the socket's ports are known.
    pub const AUTHZ_PASSED: &str = "mesh_authzok";
    /// (pod address, port) -> `StrictValue`: PeerAuthentication STRICT (or a port's exception
    /// to it) for this node's enrolled pods; port 0 for the pod's other ports.
    pub const STRICT: &str = "mesh_strict";
    /// Connections about to reach a pod of this node whose SYN the ingress filter lets in
    /// without asking again (`FlowKey` -> `trusted::*`): the agent's own (registered before
    /// it connects), and those connect4/6 already let through.
    pub const TRUSTED: &str = "mesh_trusted";

    /// The maps that hold service state, which the agent owns and reconciles.
    pub const SERVICE_STATE: [&str; 6] = [FRONTENDS, SERVICES, SLOTS, BACKENDS, MAGLEV, NAMES];
    /// Every map the programs declare, pinned.
    pub const ALL: [&str; 29] = [
        FRONTENDS,
        SERVICES,
        SLOTS,
        BACKENDS,
        MAGLEV,
        AFFINITY,
        REVNAT,
        REVNAT_INDEX,
        META,
        NAMES,
        CONNS,
        CONNS_OVERFLOW,
        EVENTS,
        DROPS,
        SOCKHASH,
        SOCK_COOKIES,
        PROXY,
        L7_ORIGINAL,
        WORKLOADS,
        TUNNEL,
        TUNNELED,
        TUNNEL_PENDING,
        TUNNEL_ORIGINAL,
        AUTHZ_CLASSES,
        AUTHZ,
        AUTHZ_SOURCES,
        AUTHZ_PASSED,
        STRICT,
        TRUSTED,
    ];
}

/// Program names (the kernel's 15-byte limit applies here too), in attach order.
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    pub const GETPEERNAME4: &str = "mesh_getpeer4";
    pub const GETPEERNAME6: &str = "mesh_getpeer6";
    /// sock_ops: per-connection counters. Named apart from its section ("sockops"): aya
    /// confuses a function and a section of the same name.
    pub const SOCKOPS: &str = "mesh_sockops";
    /// cgroup/sock_release: frees a UDP socket's reverse translations with the socket.
    pub const SOCK_RELEASE: &str = "mesh_sock_rel";

    /// sock_ops: puts local sockets into the sockhash for same-node redirection (5.15+: it
    /// keys sockets by network namespace cookie).
    pub const SOCKMAP: &str = "mesh_sockmap";
    /// sk_msg on the sockhash: moves payload socket to socket past TCP/IP (5.15+).
    pub const REDIRECT: &str = "mesh_redirect";
    /// The optional same-node redirection programs, in attach order (sk_msg first, so that
    /// sockets inserted by sock_ops get it).
    pub const REDIRECTION: [&str; 2] = [REDIRECT, SOCKMAP];

    /// cgroup_skb/ingress: drops the SYNs PeerAuthentication STRICT or authorization refuses
    /// (plaintext from anything but the agent, and callers the kernel cannot vouch for).
    pub const INGRESS: &str = "mesh_ingress";
    /// Attached only while a pod of the node is STRICT or under policy: it runs for every
    /// packet a socket of the cgroup receives, which nothing else in mesh does.
    pub const ON_DEMAND: [&str; 1] = [INGRESS];

    /// The programs always attached to the cgroup, in attach order.
    pub const ALL: [&str; 10] =
        [CONNECT4, CONNECT6, SENDMSG4, SENDMSG6, RECVMSG4, RECVMSG6, GETPEERNAME4, GETPEERNAME6, SOCKOPS, SOCK_RELEASE];
}

/// Map capacities.
pub mod sizes {
    /// (VIP, port, protocol) triples; one per Service port and cluster IP.
    pub const MAX_FRONTENDS: u32 = 65_536;
    pub const MAX_SERVICES: u32 = 65_536;
    /// Backends over all services; a backend entry is per (service, endpoint address, port).
    pub const MAX_BACKENDS: u32 = 262_144;
    pub const MAX_SLOTS: u32 = 262_144;
    /// Services that use Maglev (each holds one table).
    pub const MAX_MAGLEV: u32 = 1_024;
    pub const MAX_AFFINITY: u32 = 131_072;
    /// Reverse translations of UDP sockets (LRU: a socket that closed ages out). TCP keeps
    /// its own in `mesh_conns`.
    pub const MAX_REVNAT: u32 = 65_536;
    /// UDP sockets whose reverse translations are freed with them; beyond this many at once,
    /// a socket's entries age out of `mesh_revnat` instead.
    pub const MAX_REVNAT_INDEX: u32 = 16_384;
    /// Slots of the live-connection table, a power of two: a connection's slot is its socket
    /// cookie modulo this. Allocated up front (17 MiB): a connection takes its slot with two
    /// stores, where a hash map insert allocates and locks.
    pub const CONN_SLOTS: u32 = 131_072;
    const _: () = assert!(CONN_SLOTS.is_power_of_two());
    /// Connections whose slot was taken (or the agent's capture table); allocated on insert.
    pub const MAX_CONNS: u32 = 262_144;
    /// Bytes of the connection event ring buffer (about 26,000 records: over a second of
    /// connection churn at full speed between the agent's drains).
    pub const EVENTS_BYTES: u32 = 4 << 20;
    /// Local sockets eligible for redirection.
    pub const MAX_SOCKHASH: u32 = 65_536;
    /// Pods of one node (kubelet's default limit is 110).
    pub const MAX_WORKLOADS: u32 = 4_096;
    /// Enrolled pods of other nodes (`mesh_tunneled`, allocated on insert).
    pub const MAX_TUNNELED: u32 = 262_144;
    /// Connections on their way to the tunnel listener, and there before it takes them.
    pub const MAX_TUNNEL_ORIGINALS: u32 = 65_536;
    /// Pods (of any node) selected by an AuthorizationPolicy (allocated on insert).
    pub const MAX_AUTHZ_CLASSES: u32 = 262_144;
    /// Verdicts: calling pods of this node x policy classes x the ports their policies name.
    pub const MAX_AUTHZ: u32 = 262_144;
    /// Address blocks of the classes whose policies look at senders' addresses, per port.
    pub const MAX_AUTHZ_SOURCES: u32 = 65_536;
    /// Connections let through by connect4/6 on their way to a pod under policy, before their
    /// SYN leaves (LRU).
    pub const MAX_AUTHZ_PASSED: u32 = 16_384;
    /// (pod, port) STRICT entries of this node's pods.
    pub const MAX_STRICT: u32 = 65_536;
    /// Connections between their registration and their SYN's arrival (LRU: one whose SYN
    /// never came ages out).
    pub const MAX_TRUSTED: u32 = 65_536;
    /// How deep below the cgroup v2 root a pod's cgroup may sit (kind's systemd layout puts
    /// it at level 4, a container's cgroup one below).
    pub const MAX_POD_CGROUP_LEVEL: i32 = 7;
}

/// Indexes of the `mesh_drops` per-CPU array.
pub mod drop_counters {
    /// A connection record did not fit in the ring buffer (the agent was too slow or down).
    pub const EVENTS: u32 = 0;
    /// A new connection could not be tracked (its slot and `mesh_conns_ovfl` full).
    pub const CONNS: u32 = 1;
    /// A live UDP socket's reverse translation was evicted from `mesh_revnat` (seen when its
    /// reply arrives): the application saw the backend's address instead of the Service's.
    pub const REVNAT: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Entries in a Maglev lookup table. Prime, and well above 100 x the backends a table is meant
/// for, so each backend's share stays within about 1% of the ideal.
pub const MAGLEV_TABLE_SIZE: usize = 16_381;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// `ServiceValue::flags`
pub mod service_flags {
    /// `sessionAffinity: ClientIP`: reuse the client's last backend within the timeout.
    pub const AFFINITY: u32 = 1 << 0;
    /// `mesh.dev/lb-algorithm: maglev`: pick from the Maglev table instead of at random.
    pub const MAGLEV: u32 = 1 << 1;
    /// L7-managed (an HTTPRoute attaches, or `mesh.dev/l7: "true"`): TCP connections go to the
    /// agent's outbound listener (`mesh_proxy`) instead of a backend.
    pub const L7: u32 = 1 << 2;
}

/// An IPv4 or IPv6 address as four 32-bit words holding the address bytes in network order,
/// which is how `bpf_sock_addr` exposes `user_ip6` (and `user_ip4` as one word). IPv4 addresses
/// are stored IPv4-mapped (`::ffff:a.b.c.d`), so a dual-stack socket dialling a mapped address
/// finds the same entry as an IPv4 socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr(pub [u32; 4]);

/// The third word of an IPv4-mapped IPv6 address (bytes 00 00 ff ff).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

impl Addr {
    /// From `bpf_sock_addr::user_ip4` (network-order bytes in a native word).
    #[inline(always)]
    pub const fn from_ip4_word(ip4: u32) -> Self {
        Self([0, 0, V4_MAPPED_WORD, ip4])
    }

    #[inline(always)]
    pub const fn is_v4_mapped(&self) -> bool {
        self.0[0] == 0 && self.0[1] == 0 && self.0[2] == V4_MAPPED_WORD
    }

    /// The `user_ip4` word of an IPv4-mapped address.
    #[inline(always)]
    pub const fn ip4_word(&self) -> u32 {
        self.0[3]
    }
}

/// `mesh_frontends` key: a Service's cluster IP, port and protocol as a client dials it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Addr,
    /// Network byte order, as in `bpf_sock_addr::user_port`.
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// `mesh_frontends` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendValue {
    pub service_id: u32,
}

/// `mesh_services` value, keyed by service id (one per Service port and IP family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Usable backends in `mesh_slots` for this service: slots `0..backend_count`. Zero means
    /// the service has no usable endpoint and connections are refused.
    pub backend_count: u32,
    /// `service_flags`.
    pub flags: u32,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds`.
    pub affinity_timeout_s: u32,
    pub _pad: u32,
}

/// `mesh_slots` key: the n-th usable backend of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    pub slot: u32,
}

/// `mesh_slots` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotValue {
    pub backend_id: u32,
}

/// `mesh_backends` value, keyed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendValue {
    pub addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    pub _pad: u16,
    /// The service this backend serves; lets the kernel check that a remembered (affinity)
    /// backend still belongs to the service it is asked for.
    pub service_id: u32,
}

/// `mesh_names` value: `namespace/name:port/protocol (IPv4|IPv6)`, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ServiceName {
    pub bytes: [u8; 128],
}

/// `mesh_maglev` value, keyed by service id.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct MaglevTable {
    pub backend_ids: [u32; MAGLEV_TABLE_SIZE],
}

/// `mesh_affinity` key: a client of a `sessionAffinity: ClientIP` service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The client's network namespace cookie. At connect() time a socket has no source address
    /// yet; a pod is one network namespace, so this stands for the client IP.
    pub client: u64,
    pub service_id: u32,
    pub _pad: u32,
}

/// `mesh_affinity` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` of the last connection that used it.
    pub last_used_ns: u64,
}

/// `mesh_revnat` key: a socket (by cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: Addr,
    pub port_be: u16,
    pub _pad16: u16,
    pub _pad32: u32,
}

/// `mesh_revnat` value: the service address the socket dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatValue {
    pub addr: Addr,
    pub port_be: u16,
    pub _pad16: u16,
    /// The service the socket was balanced for, for the connection record.
    pub service_id: u32,
}

/// One backend a UDP socket sent to through a Service (`RevNatIndex`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatPeer {
    pub addr: Addr,
    pub port_be: u16,
    pub _pad16: u16,
}

/// How many backends of one UDP socket are remembered for freeing at release; entries for more
/// age out of the LRU.
pub const REVNAT_INDEX_LEN: usize = 4;

/// `mesh_revnat_idx` value: the `mesh_revnat` keys of one socket (with its cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatIndex {
    pub peers: [RevNatPeer; REVNAT_INDEX_LEN],
    pub count: u32,
    pub _pad: u32,
}

/// `mesh_workloads` value: a pod of this node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkloadValue {
    /// The agent's number for the pod (never 0), which connections record.
    pub id: u32,
    /// `workload_flags::*`
    pub flags: u32,
}

/// `WorkloadValue::flags`
pub mod workload_flags {
    /// Enrolled (`mesh.dev/dataplane: enabled` on the pod or its namespace).
    pub const ENROLLED: u32 = 1 << 0;
    /// The agent itself (its own cgroup), or the node's kubelet: their connections are never
    /// captured, tunneled or refused, and STRICT ports take them (kubelet's probes are plain).
    pub const AGENT: u32 = 1 << 1;
}

/// `WorkloadValue::id` of the agent's own cgroup (and, in `mesh_authzok`, of any caller with
/// the `AGENT` flag).
pub const AGENT_WORKLOAD: u32 = u32::MAX;
/// `WorkloadValue::id` of the kubelet's cgroup (its probes reach pods as the agent's do).
pub const KUBELET_WORKLOAD: u32 = u32::MAX - 1;
/// `mesh_authz_cls` value of a pod under no AuthorizationPolicy that is STRICT on a port: its
/// connect()s are looked at only to let the agent's and kubelet's into it.
pub const NO_CLASS: u32 = 0;

/// `mesh_authz` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzKey {
    /// The calling pod (`WorkloadValue::id`; 0: a process in no known pod).
    pub workload: u32,
    /// The destination's policy class (`mesh_authz_cls`).
    pub class: u32,
    /// Host byte order; 0: every port the class's policies do not name.
    pub port: u16,
    pub _pad16: u16,
}

/// `mesh_authz_src` key data (behind the LPM trie's prefix length): matched on the class and
/// port whole (`AUTHZ_SOURCE_FIXED_BITS`) and on a prefix of the sender's address. Every field
/// in network byte order, as the trie compares bytes from the first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthzSourceKey {
    pub class_be: u32,
    /// 0: every port the class's policies do not name.
    pub port_be: u16,
    pub _pad16: u16,
    /// IPv4 as IPv4-mapped IPv6.
    pub sender: Addr,
}

/// Bits of `AuthzSourceKey` before the sender's address: a prefix length is this plus the
/// address's (96 more for an IPv4 block).
pub const AUTHZ_SOURCE_FIXED_BITS: u32 = 64;

/// `mesh_strict` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StrictKey {
    pub addr: Addr,
    /// Host byte order; 0: the pod's ports without an entry of their own.
    pub port: u16,
    pub _pad16: u16,
}

/// `mesh_strict` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StrictValue {
    /// 1: STRICT; 0: plaintext accepted (a port's exception).
    pub strict: u32,
    /// The agent's number for the PeerAuthentication that decided.
    pub policy: u32,
}

/// `mesh_trusted` key: a TCP connection as its SYN carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub source: Addr,
    pub destination: Addr,
    /// Host byte order.
    pub source_port: u16,
    pub destination_port: u16,
}

/// `mesh_trusted` values.
pub mod trusted {
    /// The agent's own connection (after mTLS, or the L7 proxy's): STRICT lets it in.
    pub const AGENT: u32 = 1;
    /// A pod of this node that connect4/6 let through: authorization lets it in, STRICT not.
    pub const CHECKED: u32 = 2;
}

/// `mesh_authz` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AuthzVerdict {
    /// 1: allowed; 0: refused.
    pub allow: u32,
    /// The agent's number for the AuthorizationPolicy that decided (0: none did).
    pub policy: u32,
}

/// `mesh_proxy` value: the agent's outbound listener. Port 0: no proxy running.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyAddr {
    pub addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    pub _pad16: u16,
    pub _pad32: u32,
}

/// Where a connection sent to the tunnel listener was going: the pod address and port (a
/// Service's backend as the kernel picked it, or the pod dialled), the Service (0: none), and
/// the dialling pod (`WorkloadValue::id`), whose identity the tunnel carries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelOriginal {
    pub addr: Addr,
    /// Network byte order.
    pub port_be: u16,
    pub _pad16: u16,
    pub service_id: u32,
    pub workload: u32,
    pub _pad32: u32,
}

/// `mesh_l7orig` key: the client end of a captured connection, as the proxy sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerKey {
    pub addr: Addr,
    /// Host byte order.
    pub port: u16,
    pub _pad16: u16,
    pub _pad32: u32,
}

/// `ConnValue::phase`: how far the connection got.
pub mod conn_phase {
    /// connect() sent the socket to a backend (the entry holds the Service address for
    /// getpeername()), but the SYN has not left: the connect() may have failed before it, in
    /// which case no callback ever frees the entry. Another connection may take its slot
    /// after `DIALED_TIMEOUT_NS`; the agent removes such entries from `mesh_conns_ovfl`.
    pub const DIALED: u8 = 1;
    /// The SYN left; a close from here on frees the entry.
    pub const CONNECTING: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    /// A connect() gets its SYN out or fails within the syscall. (TCP_FASTOPEN_CONNECT defers
    /// the SYN to the first write: a socket that waits longer may lose its slot, and with it
    /// the Service address in getpeername() and its metrics.)
    pub const DIALED_TIMEOUT_NS: u64 = 1_000_000_000;
}

/// `ConnValue::direction`
pub mod direction {
    /// This socket connect()ed (the client side).
    pub const OUTBOUND: u8 = 1;
    /// This socket was accept()ed (the server side).
    pub const INBOUND: u8 = 2;
}

/// `mesh_conns` slot (and `mesh_conns_ovfl` value): one TCP connection of the attached cgroup.
/// Counters are the kernel's own (tcp_sock), refreshed at most once a second from RTT samples,
/// and exact in the close record.
///
/// Readers of the mmap-ed slots copy a slot, then check that `cookie` and `phase` did not
/// change; the kernel stores `phase` last when it fills a slot and clears `cookie` to free it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnValue {
    /// The socket's cookie; 0 in a free slot.
    pub cookie: u64,
    /// `bpf_ktime_get_ns()` when the connection was established.
    pub start_ns: u64,
    pub updated_ns: u64,
    /// Payload bytes sent and acknowledged by the peer.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Payload bytes that bypassed TCP through same-node redirection (sk_msg).
    pub redirected_sent: u64,
    pub redirected_received: u64,
    pub local: Addr,
    pub remote: Addr,
    /// The Service address dialled (outbound connections balanced by mesh), else zero.
    pub service_addr: Addr,
    /// Ports in host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub service_port: u16,
    /// `direction::*` (0 before establishment)
    pub direction: u8,
    /// `conn_phase::*`
    pub phase: u8,
    pub segs_in: u32,
    pub segs_out: u32,
    pub retransmits: u32,
    /// Smoothed RTT in microseconds (the kernel keeps it x8; this is the real value).
    pub srtt_us: u32,
    /// The service id the connection was balanced for, 0 if none.
    pub service_id: u32,
    /// The kernel's `bytes_acked` at establishment: 1 for the SYN of a connect()ed socket, 0
    /// for an accept()ed one. Subtracted to count payload only.
    pub acked_at_start: u32,
    /// `rcv_nxt` when the socket entered FIN_WAIT2: at its close, a larger `rcv_nxt` says the
    /// peer's FIN was received (a closed socket whose FIN was acknowledged alone goes to
    /// TIME_WAIT without it).
    pub rcv_nxt_at_fin_wait2: u32,
    /// The pod (`WorkloadValue::id`) whose process dialled the connection, for connections
    /// balanced by connect4/6; 0 when not known.
    pub workload: u32,
}

/// `mesh_sockhash` and `mesh_sockcook` key: one end of a TCP connection, as seen by its own
/// socket. The peer's key swaps local and remote. The network namespace cookie keeps two pods
/// whose connections share a 4-tuple (both on 127.0.0.1, say) apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub netns: u64,
    pub local: Addr,
    pub remote: Addr,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u32,
}

impl SockKey {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub const fn peer(&self) -> Self {
        Self {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// `ConnEvent::kind`
pub mod conn_event {
    /// A connection reached TCP_CLOSE; the record holds its final counters. (1 was a record at
    /// establishment, no longer sent: the agent counts openings from the table.)
    pub const CLOSED: u32 = 2;
    /// A connect() refused by authorization policy (EPERM): `remote` is the pod it was for,
    /// `workload` the caller, `ConnEvent::detail` the policy's number.
    pub const DENIED: u32 = 3;
    /// A SYN the ingress filter dropped: `remote` is the sender, `local` the pod, `detail` the
    /// policy's number; `direction` INBOUND. `service_id` says which check: 1 STRICT, 2
    /// authorization (a caller the kernel could not vouch for).
    pub const INGRESS_DROPPED: u32 = 4;
}

/// `ConnEvent::conn.service_id` of an `INGRESS_DROPPED` record.
pub mod ingress_drop {
    pub const STRICT: u32 = 1;
    pub const AUTHZ: u32 = 2;
}

/// A record in `mesh_events`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    /// `conn_event::*`
    pub kind: u32,
    /// `DENIED`: the policy's number (`AuthzVerdict::policy`); else 0.
    pub detail: u32,
    /// `bpf_ktime_get_ns()` of the event.
    pub at_ns: u64,
    pub conn: ConnValue,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;

    // SAFETY: all of these are #[repr(C)], made only of integers, with explicit padding.
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for FrontendKey {}
    unsafe impl aya::Pod for FrontendValue {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for ServiceName {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for RevNatPeer {}
    unsafe impl aya::Pod for RevNatIndex {}
    unsafe impl aya::Pod for ConnValue {}
    unsafe impl aya::Pod for ConnEvent {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for ProxyAddr {}
    unsafe impl aya::Pod for PeerKey {}
    unsafe impl aya::Pod for WorkloadValue {}
    unsafe impl aya::Pod for TunnelOriginal {}
    unsafe impl aya::Pod for AuthzKey {}
    unsafe impl aya::Pod for AuthzVerdict {}
    unsafe impl aya::Pod for StrictKey {}
    unsafe impl aya::Pod for AuthzSourceKey {}
    unsafe impl aya::Pod for StrictValue {}
    unsafe impl aya::Pod for FlowKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<FrontendKey>(), 20);
        assert_eq!(size_of::<WorkloadValue>(), 8);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<SlotKey>(), 8);
        assert_eq!(size_of::<BackendValue>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 16);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<RevNatKey>(), 32);
        assert_eq!(size_of::<RevNatValue>(), 24);
        assert_eq!(size_of::<ConnValue>(), 144);
        assert_eq!(size_of::<ConnEvent>(), 160);
        assert_eq!(size_of::<RevNatPeer>(), 20);
        assert_eq!(size_of::<RevNatIndex>(), 88);
        assert_eq!(size_of::<SockKey>(), 48);
        assert_eq!(size_of::<TunnelOriginal>(), 32);
        assert_eq!(size_of::<AuthzKey>(), 12);
        assert_eq!(size_of::<AuthzVerdict>(), 8);
        assert_eq!(size_of::<StrictKey>(), 20);
        assert_eq!(size_of::<AuthzSourceKey>(), 24);
        assert_eq!(size_of::<StrictValue>(), 8);
        assert_eq!(size_of::<FlowKey>(), 36);
    }

    #[test]
    fn names_fit_the_kernel_limit() {
        for name in map_names::ALL.iter().chain(program_names::ALL.iter()).chain(program_names::ON_DEMAND.iter()) {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn ipv4_is_stored_mapped() {
        let a = Addr::from_ip4_word(u32::from_ne_bytes([10, 96, 0, 10]));
        assert!(a.is_v4_mapped());
        let bytes: [u8; 16] = unsafe { core::mem::transmute(a.0) };
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]);
    }
}
