//! The pinned service maps, opened from the pin directory: the agent writes through them, and
//! `mesh services` reads them while the agent is down.
#![forbid(unsafe_code)]
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, AuthzKey, AuthzSourceKey, AuthzVerdict, BackendValue, FlowKey, FrontendKey, FrontendValue,
    MAGLEV_TABLE_SIZE, MaglevTable, PeerKey, RevNatIndex, RevNatKey, RevNatValue, ServiceName, ServiceValue, SlotKey, SlotValue, StrictKey,
    StrictValue, TunnelOriginal, WorkloadValue, map_names,
};

use super::image::{MapImage, Op, addr_of, ip_of};
use super::{Datapath, DatapathError, conn_table::ConnTable};

pub struct PinnedMaps {
    frontends: HashMap<MapData, FrontendKey, FrontendValue>,
    services: HashMap<MapData, u32, ServiceValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    names: HashMap<MapData, u32, ServiceName>,
    /// Kernel-written; the agent only sweeps out the entries of deleted services.
    affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    /// Kernel-written; read for occupancy.
    conns: ConnTable,
    /// Kernel-written (UDP connect, sendmsg); read for occupancy.
    revnat: HashMap<MapData, RevNatKey, RevNatValue>,
    /// Kernel-written: each UDP socket's revnat keys, freed at release; read for occupancy.
    revnat_index: HashMap<MapData, u64, RevNatIndex>,
    drops: PerCpuArray<MapData, u64>,
}

pub(super) fn open_map(dir: &Path, name: &str) -> Result<Map, DatapathError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| DatapathError::Open { path: path.clone(), source })?;
    Map::from_map_data(data).map_err(|source| DatapathError::Open { path, source })
}

fn open_hash<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let map = open_map(dir, name)?;
    HashMap::try_from(map).map_err(|source| DatapathError::Open { path: dir.join(name), source })
}

/// Number of entries of a pinned hash map, for leak checks and gauges.
pub fn count_entries<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> Result<usize, DatapathError> {
    let map: HashMap<MapData, K, V> = open_hash(dir, name)?;
    Ok(map.keys().filter(Result::is_ok).count())
}

impl PinnedMaps {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self {
            frontends: open_hash(dir, map_names::FRONTENDS)?,
            services: open_hash(dir, map_names::SERVICES)?,
            slots: open_hash(dir, map_names::SLOTS)?,
            backends: open_hash(dir, map_names::BACKENDS)?,
            maglev: open_hash(dir, map_names::MAGLEV)?,
            names: open_hash(dir, map_names::NAMES)?,
            affinity: open_hash(dir, map_names::AFFINITY)?,
            conns: ConnTable::open(dir).map_err(DatapathError::ConnTable)?,
            revnat: open_hash(dir, map_names::REVNAT)?,
            revnat_index: open_hash(dir, map_names::REVNAT_INDEX)?,
            drops: PerCpuArray::try_from(open_map(dir, map_names::DROPS)?)
                .map_err(|source| DatapathError::Open { path: dir.join(map_names::DROPS), source })?,
        })
    }

    pub fn pin_path(dir: &Path, name: &str) -> PathBuf {
        dir.join(name)
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, op, source }
}

/// Deleting an entry that is already gone is fine: the state we wanted is there.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

fn name_value(name: &str) -> ServiceName {
    let mut bytes = [0u8; 128];
    let n = name.len().min(127);
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    ServiceName { bytes }
}

fn name_string(v: &ServiceName) -> String {
    let end = v.bytes.iter().position(|&b| b == 0).unwrap_or(v.bytes.len());
    String::from_utf8_lossy(&v.bytes[..end]).into_owned()
}

impl PinnedMaps {
    /// Removes the session-affinity entries of a deleted service, so that the LRU map holds
    /// only live clients (and a reused service id starts clean).
    fn forget_affinity(&mut self, service_id: u32) -> Result<(), DatapathError> {
        let stale: Vec<AffinityKey> = self.affinity.keys().filter_map(Result::ok).filter(|k| k.service_id == service_id).collect();
        for key in stale {
            ignore_missing(self.affinity.remove(&key)).map_err(map_err(map_names::AFFINITY, "delete"))?;
        }
        Ok(())
    }

    /// The kernel's drop counters (`drop_counters::*`), summed over CPUs.
    pub fn drops(&self, index: u32) -> u64 {
        self.drops.get(&index, 0).map(|per_cpu| per_cpu.iter().sum()).unwrap_or(0)
    }

    /// Entries of the maps the kernel writes (affinity, connections, UDP reverse translation).
    pub fn kernel_occupancy(&self) -> Result<Vec<(&'static str, usize)>, DatapathError> {
        let conns = self.conns.occupancy().map_err(DatapathError::ConnTable)?;
        Ok(vec![
            (map_names::AFFINITY, self.affinity.keys().filter(Result::is_ok).count()),
            (map_names::CONNS, conns.slots),
            (map_names::CONNS_OVERFLOW, conns.overflow),
            (map_names::REVNAT, self.revnat.keys().filter(Result::is_ok).count()),
            (map_names::REVNAT_INDEX, self.revnat_index.keys().filter(Result::is_ok).count()),
        ])
    }

    /// Entries per map, for `/config_dump` and leak checks: the service maps as read back,
    /// then the ones the kernel writes.
    pub fn occupancy(&self) -> Result<std::collections::BTreeMap<&'static str, usize>, DatapathError> {
        Ok(self.read_image()?.entries().into_iter().chain(self.kernel_occupancy()?).collect())
    }
}

impl Datapath for PinnedMaps {
    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        use map_names as n;
        match op {
            Op::PutBackend(id, v) => self.backends.insert(id, v, 0).map_err(map_err(n::BACKENDS, "insert")),
            Op::PutMaglev(id, table) => {
                let mut value = MaglevTable { backend_ids: [0; MAGLEV_TABLE_SIZE] };
                value.backend_ids.copy_from_slice(table);
                self.maglev.insert(id, &value, 0).map_err(map_err(n::MAGLEV, "insert"))
            }
            Op::PutSlot(k, id) => self.slots.insert(k, &SlotValue { backend_id: *id }, 0).map_err(map_err(n::SLOTS, "insert")),
            Op::PutService(id, v) => self.services.insert(id, v, 0).map_err(map_err(n::SERVICES, "insert")),
            Op::PutName(id, name) => self.names.insert(id, &name_value(name), 0).map_err(map_err(n::NAMES, "insert")),
            Op::PutFrontend(k, id) => {
                self.frontends.insert(k, &FrontendValue { service_id: *id }, 0).map_err(map_err(n::FRONTENDS, "insert"))
            }
            Op::DelFrontend(k) => ignore_missing(self.frontends.remove(k)).map_err(map_err(n::FRONTENDS, "delete")),
            Op::DelService(id) => {
                ignore_missing(self.services.remove(id)).map_err(map_err(n::SERVICES, "delete"))?;
                self.forget_affinity(*id)
            }
            Op::DelName(id) => ignore_missing(self.names.remove(id)).map_err(map_err(n::NAMES, "delete")),
            Op::DelMaglev(id) => ignore_missing(self.maglev.remove(id)).map_err(map_err(n::MAGLEV, "delete")),
            Op::DelSlot(k) => ignore_missing(self.slots.remove(k)).map_err(map_err(n::SLOTS, "delete")),
            Op::DelBackend(id) => ignore_missing(self.backends.remove(id)).map_err(map_err(n::BACKENDS, "delete")),
        }
    }

    fn read_image(&self) -> Result<MapImage, DatapathError> {
        use map_names as n;
        let mut image = MapImage::default();
        for entry in self.frontends.iter() {
            let (k, v) = entry.map_err(map_err(n::FRONTENDS, "read"))?;
            image.frontends.insert(k, v.service_id);
        }
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(map_err(n::SERVICES, "read"))?;
            image.services.insert(k, v);
        }
        for entry in self.slots.iter() {
            let (k, v) = entry.map_err(map_err(n::SLOTS, "read"))?;
            image.slots.insert(k, v.backend_id);
        }
        for entry in self.backends.iter() {
            let (k, v) = entry.map_err(map_err(n::BACKENDS, "read"))?;
            image.backends.insert(k, v);
        }
        for entry in self.maglev.iter() {
            let (k, v) = entry.map_err(map_err(n::MAGLEV, "read"))?;
            image.maglev.insert(k, v.backend_ids.to_vec());
        }
        for entry in self.names.iter() {
            let (k, v) = entry.map_err(map_err(n::NAMES, "read"))?;
            image.names.insert(k, name_string(&v));
        }
        Ok(image)
    }
}

/// `mesh_l7orig`: where each connection the kernel sent to the proxy was going, by the
/// client's address (written by sock_ops once the connection is established).
pub struct OrigDstMap {
    map: std::sync::Mutex<HashMap<MapData, PeerKey, RevNatValue>>,
}

impl OrigDstMap {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self { map: std::sync::Mutex::new(open_hash(dir, map_names::L7_ORIGINAL)?) })
    }

    /// The address `peer` dialled; the entry is consumed.
    pub fn take(&self, peer: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        let key = PeerKey { addr: addr_of(peer.ip()), port: peer.port(), _pad16: 0, _pad32: 0 };
        let mut map = self.map.lock().expect("l7orig lock");
        let value = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(std::net::SocketAddr::new(ip_of(&value.addr), u16::from_be(value.port_be)))
    }
}

/// Where a connection the kernel sent to the tunnel listener was going, and who dialled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TunnelTarget {
    /// The pod (a Service's backend as the kernel picked it, or the pod dialled).
    pub pod: std::net::SocketAddr,
    /// The Service's id in the kernel maps; 0 for a pod dialled by address.
    pub service_id: u32,
    /// The agent's number for the dialling pod (`mesh_workloads`).
    pub workload: u32,
}

/// `mesh_tunorig`: `TunnelTarget`s by the client's address (moved there by sock_ops once the
/// connection is established).
pub struct TunnelOriginalMap {
    map: std::sync::Mutex<HashMap<MapData, PeerKey, TunnelOriginal>>,
}

impl TunnelOriginalMap {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self { map: std::sync::Mutex::new(open_hash(dir, map_names::TUNNEL_ORIGINAL)?) })
    }

    /// Where `peer`'s connection was going; the entry is consumed.
    pub fn take(&self, peer: std::net::SocketAddr) -> Option<TunnelTarget> {
        let key = PeerKey { addr: addr_of(peer.ip()), port: peer.port(), _pad16: 0, _pad32: 0 };
        let mut map = self.map.lock().expect("tunorig lock");
        let value = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(TunnelTarget {
            pod: std::net::SocketAddr::new(ip_of(&value.addr), u16::from_be(value.port_be)),
            service_id: value.service_id,
            workload: value.workload,
        })
    }
}

/// `mesh_tunneled`: the addresses of enrolled pods of other nodes.
pub struct TunneledMap {
    map: HashMap<MapData, Addr, u32>,
}

impl TunneledMap {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self { map: open_hash(dir, map_names::TUNNELED)? })
    }

    pub fn addresses(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.map.keys().filter_map(Result::ok).map(|a| ip_of(&a)).collect()
    }

    /// Makes the map hold exactly `wanted`, writing only what differs; returns (added,
    /// removed). Additions first: a pod that stays enrolled is never missing in between.
    pub fn sync(&mut self, wanted: &std::collections::BTreeSet<std::net::IpAddr>) -> Result<(usize, usize), DatapathError> {
        let present = self.addresses();
        let mut added = 0;
        for ip in wanted.difference(&present) {
            self.map.insert(&addr_of(*ip), &0, 0).map_err(map_err(map_names::TUNNELED, "update"))?;
            added += 1;
        }
        let mut removed = 0;
        for ip in present.difference(wanted) {
            ignore_missing(self.map.remove(&addr_of(*ip))).map_err(map_err(map_names::TUNNELED, "delete"))?;
            removed += 1;
        }
        Ok((added, removed))
    }
}

/// `mesh_workloads`: this node's pods by the id of their pod cgroup, for the kernel programs
/// to tell which pod a socket belongs to.
pub struct WorkloadMap {
    map: HashMap<MapData, u64, WorkloadValue>,
}

impl WorkloadMap {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self { map: open_hash(dir, map_names::WORKLOADS)? })
    }

    /// Every entry: (cgroup id, value).
    pub fn entries(&self) -> Vec<(u64, WorkloadValue)> {
        self.map.iter().filter_map(Result::ok).collect()
    }

    /// Makes the map hold exactly `wanted`, writing only what differs; returns (written,
    /// removed).
    pub fn sync(&mut self, wanted: &std::collections::BTreeMap<u64, WorkloadValue>) -> Result<(usize, usize), DatapathError> {
        let present: std::collections::BTreeMap<u64, WorkloadValue> = self.entries().into_iter().collect();
        let mut removed = 0;
        for cgroup in present.keys().filter(|k| !wanted.contains_key(k)) {
            ignore_missing(self.map.remove(cgroup)).map_err(map_err(map_names::WORKLOADS, "delete"))?;
            removed += 1;
        }
        let mut written = 0;
        for (cgroup, value) in wanted.iter().filter(|(k, v)| present.get(k) != Some(v)) {
            self.map.insert(cgroup, value, 0).map_err(map_err(map_names::WORKLOADS, "update"))?;
            written += 1;
        }
        Ok((written, removed))
    }
}

/// `mesh_authz_cls` and `mesh_authz`: which pods are under policy (by class), and the verdict
/// for each calling pod of this node, class and port, for the kernel to refuse connect()s early.
/// The agent keeps what it wrote and writes only differences.
pub struct AuthzMaps {
    classes: HashMap<MapData, Addr, u32>,
    verdicts: HashMap<MapData, AuthzKey, AuthzVerdict>,
    senders: LpmTrie<MapData, AuthzSourceKey, AuthzVerdict>,
    strict: HashMap<MapData, StrictKey, StrictValue>,
    written_classes: std::collections::BTreeMap<std::net::IpAddr, u32>,
    written_verdicts: std::collections::BTreeMap<AuthzKey, AuthzVerdict>,
    written_senders: std::collections::BTreeMap<SenderBlock, AuthzVerdict>,
    written_strict: std::collections::BTreeMap<StrictKey, StrictValue>,
}

/// A `mesh_authz_src` entry's key: (prefix length, key data).
pub type SenderBlock = (u32, AuthzSourceKey);

impl AuthzMaps {
    /// Opens both maps and reads what they hold (left by an earlier agent).
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        let classes: HashMap<MapData, Addr, u32> = open_hash(dir, map_names::AUTHZ_CLASSES)?;
        let verdicts: HashMap<MapData, AuthzKey, AuthzVerdict> = open_hash(dir, map_names::AUTHZ)?;
        let strict: HashMap<MapData, StrictKey, StrictValue> = open_hash(dir, map_names::STRICT)?;
        let senders: LpmTrie<MapData, AuthzSourceKey, AuthzVerdict> = LpmTrie::try_from(open_map(dir, map_names::AUTHZ_SOURCES)?)
            .map_err(|source| DatapathError::Open { path: dir.join(map_names::AUTHZ_SOURCES), source })?;
        let written_classes = classes.iter().filter_map(Result::ok).map(|(a, c)| (ip_of(&a), c)).collect();
        let written_verdicts = verdicts.iter().filter_map(Result::ok).collect();
        let written_senders = senders.iter().filter_map(Result::ok).map(|(k, v)| ((k.prefix_len(), k.data()), v)).collect();
        let written_strict = strict.iter().filter_map(Result::ok).collect();
        Ok(Self { classes, verdicts, senders, strict, written_classes, written_verdicts, written_senders, written_strict })
    }

    pub fn senders(&self) -> &std::collections::BTreeMap<SenderBlock, AuthzVerdict> {
        &self.written_senders
    }

    pub fn strict(&self) -> &std::collections::BTreeMap<StrictKey, StrictValue> {
        &self.written_strict
    }

    pub fn classes(&self) -> &std::collections::BTreeMap<std::net::IpAddr, u32> {
        &self.written_classes
    }

    pub fn verdicts(&self) -> &std::collections::BTreeMap<AuthzKey, AuthzVerdict> {
        &self.written_verdicts
    }

    /// Makes the maps hold exactly `classes`, `verdicts`, `senders` and `strict`; returns how
    /// many entries were written or removed. Order: new verdicts (by caller and by sender),
    /// then classes, then what went: a pod's new class has its verdicts before the pod points
    /// at it.
    pub fn sync(
        &mut self,
        classes: &std::collections::BTreeMap<std::net::IpAddr, u32>,
        verdicts: &std::collections::BTreeMap<AuthzKey, AuthzVerdict>,
        senders: &std::collections::BTreeMap<SenderBlock, AuthzVerdict>,
        strict: &std::collections::BTreeMap<StrictKey, StrictValue>,
    ) -> Result<usize, DatapathError> {
        let mut changed = 0;
        for ((prefix, data), verdict) in senders {
            if self.written_senders.get(&(*prefix, *data)) != Some(verdict) {
                let key = aya::maps::lpm_trie::Key::new(*prefix, *data);
                self.senders.insert(&key, verdict, 0).map_err(map_err(map_names::AUTHZ_SOURCES, "update"))?;
                self.written_senders.insert((*prefix, *data), *verdict);
                changed += 1;
            }
        }
        // STRICT entries have no order to keep with the others: written, then the gone ones
        // removed (an exception port is written before its pod turns STRICT).
        let mut ports_first: Vec<(&StrictKey, &StrictValue)> = strict.iter().collect();
        ports_first.sort_by_key(|(k, _)| k.port == 0);
        for (key, value) in ports_first {
            if self.written_strict.get(key) != Some(value) {
                self.strict.insert(key, value, 0).map_err(map_err(map_names::STRICT, "update"))?;
                self.written_strict.insert(*key, *value);
                changed += 1;
            }
        }
        let gone: Vec<StrictKey> = self.written_strict.keys().filter(|k| !strict.contains_key(k)).copied().collect();
        for key in gone {
            ignore_missing(self.strict.remove(&key)).map_err(map_err(map_names::STRICT, "delete"))?;
            self.written_strict.remove(&key);
            changed += 1;
        }
        for (key, verdict) in verdicts {
            if self.written_verdicts.get(key) != Some(verdict) {
                self.verdicts.insert(key, verdict, 0).map_err(map_err(map_names::AUTHZ, "update"))?;
                self.written_verdicts.insert(*key, *verdict);
                changed += 1;
            }
        }
        for (ip, class) in classes {
            if self.written_classes.get(ip) != Some(class) {
                self.classes.insert(&addr_of(*ip), class, 0).map_err(map_err(map_names::AUTHZ_CLASSES, "update"))?;
                self.written_classes.insert(*ip, *class);
                changed += 1;
            }
        }
        let gone: Vec<std::net::IpAddr> = self.written_classes.keys().filter(|ip| !classes.contains_key(ip)).copied().collect();
        for ip in gone {
            ignore_missing(self.classes.remove(&addr_of(ip))).map_err(map_err(map_names::AUTHZ_CLASSES, "delete"))?;
            self.written_classes.remove(&ip);
            changed += 1;
        }
        let gone: Vec<AuthzKey> = self.written_verdicts.keys().filter(|k| !verdicts.contains_key(k)).copied().collect();
        for key in gone {
            ignore_missing(self.verdicts.remove(&key)).map_err(map_err(map_names::AUTHZ, "delete"))?;
            self.written_verdicts.remove(&key);
            changed += 1;
        }
        let gone: Vec<SenderBlock> = self.written_senders.keys().filter(|k| !senders.contains_key(k)).copied().collect();
        for (prefix, data) in gone {
            let key = aya::maps::lpm_trie::Key::new(prefix, data);
            ignore_missing(self.senders.remove(&key)).map_err(map_err(map_names::AUTHZ_SOURCES, "delete"))?;
            self.written_senders.remove(&(prefix, data));
            changed += 1;
        }
        Ok(changed)
    }
}

/// `mesh_trusted`: the agent registers each connection it makes to a pod of this node before
/// its SYN leaves, so that the pod's ingress filter (STRICT) lets it in.
pub struct TrustedMap {
    map: std::sync::Mutex<HashMap<MapData, FlowKey, u32>>,
}

impl TrustedMap {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        Ok(Self { map: std::sync::Mutex::new(open_hash(dir, map_names::TRUSTED)?) })
    }

    pub fn register(&self, flow: &FlowKey) -> Result<(), DatapathError> {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        map.insert(flow, &mesh_common::trusted::AGENT, 0).map_err(map_err(map_names::TRUSTED, "update"))
    }

    pub fn unregister(&self, flow: &FlowKey) {
        let mut map = self.map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = map.remove(flow);
    }
}
