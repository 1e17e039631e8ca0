//! State to maps: computes the map entries a set of balanced services needs, diffs them against
//! what the kernel holds, and applies only the difference, in an order that keeps every
//! intermediate state valid for a program reading concurrently:
//!
//! 1. new backends, Maglev tables and slots (nothing points at them yet);
//! 2. service values (the new backend count makes new slots reachable, hides dropped ones);
//! 3. frontends (a new VIP becomes live only once its service is complete);
//! 4. removals, from the frontends down, so no entry is deleted while another still names it.
//!
//! Ids are reused across restarts: they are recovered from the pinned maps (frontend → service
//! id, (service id, address) → backend id, slot positions), so an agent that adopts pinned state
//! rewrites nothing that did not change.
pub mod maglev;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use mesh_common::{
    Addr, BackendValue, FrontendKey, MAGLEV_TABLE_SIZE, ServiceValue, SlotKey, service_flags, sizes,
};

use crate::state::{Algorithm, LbService};

/// The service-state maps' content, as the kernel sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapImage {
    pub frontends: BTreeMap<FrontendKey, u32>,
    pub services: BTreeMap<u32, ServiceValue>,
    pub slots: BTreeMap<SlotKey, u32>,
    pub backends: BTreeMap<u32, BackendValue>,
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub names: BTreeMap<u32, String>,
}

/// One map write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, BackendValue),
    PutMaglev(u32, Vec<u32>),
    PutSlot(SlotKey, u32),
    PutService(u32, ServiceValue),
    PutName(u32, String),
    PutFrontend(FrontendKey, u32),
    DelFrontend(FrontendKey),
    DelService(u32),
    DelName(u32),
    DelMaglev(u32),
    DelSlot(SlotKey),
    DelBackend(u32),
}

impl MapImage {
    pub fn apply(&mut self, op: &Op) {
        match op.clone() {
            Op::PutBackend(id, v) => drop(self.backends.insert(id, v)),
            Op::PutMaglev(id, t) => drop(self.maglev.insert(id, t)),
            Op::PutSlot(k, v) => drop(self.slots.insert(k, v)),
            Op::PutService(id, v) => drop(self.services.insert(id, v)),
            Op::PutName(id, n) => drop(self.names.insert(id, n)),
            Op::PutFrontend(k, v) => drop(self.frontends.insert(k, v)),
            Op::DelFrontend(k) => drop(self.frontends.remove(&k)),
            Op::DelService(id) => drop(self.services.remove(&id)),
            Op::DelName(id) => drop(self.names.remove(&id)),
            Op::DelMaglev(id) => drop(self.maglev.remove(&id)),
            Op::DelSlot(k) => drop(self.slots.remove(&k)),
            Op::DelBackend(id) => drop(self.backends.remove(&id)),
        }
    }

    /// Total entries, for the occupancy check and leak assertions.
    pub fn len(&self) -> usize {
        self.frontends.len()
            + self.services.len()
            + self.slots.len()
            + self.backends.len()
            + self.maglev.len()
            + self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{address}/{protocol} is claimed by both {first} and {second}")]
    FrontendConflict {
        address: SocketAddr,
        protocol: String,
        first: String,
        second: String,
    },
    #[error("{map} would need {needed} entries but holds at most {max}")]
    Capacity { map: &'static str, needed: usize, max: u32 },
}

pub fn addr_of(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => Addr::from_ip4_word(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            Addr(std::array::from_fn(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])))
        }
    }
}

pub fn ip_of(addr: &Addr) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in addr.0.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) if addr.is_v4_mapped() => IpAddr::V4(Ipv4Addr::from(v4.octets())),
        _ => IpAddr::V6(v6),
    }
}

pub fn frontend_key(addr: SocketAddr, proto: u8) -> FrontendKey {
    FrontendKey { addr: addr_of(addr.ip()), port_be: addr.port().to_be(), proto, _pad: 0 }
}

pub fn backend_socket_addr(b: &BackendValue) -> SocketAddr {
    SocketAddr::new(ip_of(&b.addr), u16::from_be(b.port_be))
}

/// Hands out ids above every id in use, so a just-freed id is not reused at once (the kernel
/// may still remember it for session affinity).
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        let used: BTreeSet<u32> = used.into_iter().collect();
        let next = used.last().map_or(1, |m| m.saturating_add(1));
        Self { used, next }
    }

    fn take(&mut self, id: u32) {
        self.used.insert(id);
    }

    fn alloc(&mut self) -> u32 {
        while self.next == 0 || self.used.contains(&self.next) {
            self.next = self.next.wrapping_add(1);
        }
        let id = self.next;
        self.used.insert(id);
        self.next = self.next.wrapping_add(1);
        id
    }
}

/// The ops that take the kernel from `current` to `desired`, in a safe order.
pub fn plan(current: &MapImage, desired: &[LbService]) -> Result<Vec<Op>, PlanError> {
    let mut target = MapImage::default();
    let mut claimed: BTreeMap<FrontendKey, &LbService> = BTreeMap::new();
    let mut service_ids = IdAllocator::new(current.services.keys().copied());
    let mut backend_ids = IdAllocator::new(current.backends.keys().copied());

    // Service ids of frontends we keep.
    let mut planned: Vec<(u32, &LbService, FrontendKey)> = Vec::new();
    let mut kept_ids = BTreeSet::new();
    for svc in desired {
        let key = frontend_key(svc.frontend, svc.key.protocol.ip_proto());
        if let Some(first) = claimed.insert(key, svc) {
            return Err(PlanError::FrontendConflict {
                address: svc.frontend,
                protocol: svc.key.protocol.to_string(),
                first: first.key.to_string(),
                second: svc.key.to_string(),
            });
        }
        let sid = match current.frontends.get(&key) {
            Some(&sid) if current.services.contains_key(&sid) && kept_ids.insert(sid) => sid,
            _ => 0,
        };
        planned.push((sid, svc, key));
    }
    for (sid, _, _) in planned.iter_mut() {
        if *sid == 0 {
            *sid = service_ids.alloc();
        } else {
            service_ids.take(*sid);
        }
    }

    for (sid, svc, fkey) in &planned {
        let sid = *sid;
        // Backend ids: reuse the ones this service already has for the same address.
        let existing: BTreeMap<SocketAddr, u32> = current
            .backends
            .iter()
            .filter(|(_, b)| b.service_id == sid)
            .map(|(&id, b)| (backend_socket_addr(b), id))
            .collect();
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let id = match existing.get(&b.addr) {
                Some(&id) => id,
                None => backend_ids.alloc(),
            };
            target.backends.insert(
                id,
                BackendValue { addr: addr_of(b.addr.ip()), port_be: b.addr.port().to_be(), _pad: 0, service_id: sid },
            );
            ids.push(id);
        }

        for (slot, id) in assign_slots(current, sid, &ids).into_iter().enumerate() {
            target.slots.insert(SlotKey { service_id: sid, slot: slot as u32 }, id);
        }

        let maglev = svc.algorithm == Algorithm::Maglev;
        if maglev && !ids.is_empty() {
            let addrs: Vec<SocketAddr> = svc.backends.iter().map(|b| b.addr).collect();
            let table = maglev::table(&addrs, MAGLEV_TABLE_SIZE).into_iter().map(|i| ids[i as usize]).collect();
            target.maglev.insert(sid, table);
        }
        let mut flags = 0;
        if maglev {
            flags |= service_flags::MAGLEV;
        }
        if svc.affinity_timeout_s.is_some() {
            flags |= service_flags::AFFINITY;
        }
        if svc.l7 {
            flags |= service_flags::L7;
        }
        target.services.insert(
            sid,
            ServiceValue {
                backend_count: ids.len() as u32,
                flags,
                affinity_timeout_s: svc.affinity_timeout_s.unwrap_or(0),
                _pad: 0,
            },
        );
        target.names.insert(sid, svc.key.to_string());
        target.frontends.insert(*fkey, sid);
    }

    check_capacity(&target)?;
    Ok(diff(current, &target))
}

/// Slot positions for `ids`: a backend keeps its slot when it can, so that only the slots
/// that really change are written.
fn assign_slots(current: &MapImage, sid: u32, ids: &[u32]) -> Vec<u32> {
    let n = ids.len();
    let wanted: BTreeSet<u32> = ids.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = vec![None; n];
    let mut placed = BTreeSet::new();
    for (key, &id) in current.slots.range(SlotKey { service_id: sid, slot: 0 }..=SlotKey { service_id: sid, slot: u32::MAX }) {
        let slot = key.slot as usize;
        if slot < n && wanted.contains(&id) && placed.insert(id) {
            slots[slot] = Some(id);
        }
    }
    let mut rest = ids.iter().filter(|id| !placed.contains(id));
    slots.into_iter().map(|s| s.or_else(|| rest.next().copied()).expect("as many ids as slots")).collect()
}

fn check_capacity(target: &MapImage) -> Result<(), PlanError> {
    let checks = [
        (mesh_common::map_names::FRONTENDS, target.frontends.len(), sizes::MAX_FRONTENDS),
        (mesh_common::map_names::SERVICES, target.services.len(), sizes::MAX_SERVICES),
        (mesh_common::map_names::SLOTS, target.slots.len(), sizes::MAX_SLOTS),
        (mesh_common::map_names::BACKENDS, target.backends.len(), sizes::MAX_BACKENDS),
        (mesh_common::map_names::MAGLEV, target.maglev.len(), sizes::MAX_MAGLEV),
    ];
    for (map, needed, max) in checks {
        if needed > max as usize {
            return Err(PlanError::Capacity { map, needed, max });
        }
    }
    Ok(())
}

fn diff(current: &MapImage, target: &MapImage) -> Vec<Op> {
    fn puts<K: Ord + Clone, V: PartialEq + Clone>(
        cur: &BTreeMap<K, V>,
        tgt: &BTreeMap<K, V>,
        op: impl Fn(K, V) -> Op,
        out: &mut Vec<Op>,
    ) {
        for (k, v) in tgt {
            if cur.get(k) != Some(v) {
                out.push(op(k.clone(), v.clone()));
            }
        }
    }
    fn dels<K: Ord + Clone, V>(cur: &BTreeMap<K, V>, tgt: &BTreeMap<K, V>, op: impl Fn(K) -> Op, out: &mut Vec<Op>) {
        for k in cur.keys() {
            if !tgt.contains_key(k) {
                out.push(op(k.clone()));
            }
        }
    }
    let mut ops = Vec::new();
    puts(&current.backends, &target.backends, Op::PutBackend, &mut ops);
    puts(&current.maglev, &target.maglev, Op::PutMaglev, &mut ops);
    puts(&current.slots, &target.slots, Op::PutSlot, &mut ops);
    puts(&current.services, &target.services, Op::PutService, &mut ops);
    puts(&current.names, &target.names, Op::PutName, &mut ops);
    puts(&current.frontends, &target.frontends, Op::PutFrontend, &mut ops);
    dels(&current.frontends, &target.frontends, Op::DelFrontend, &mut ops);
    dels(&current.services, &target.services, Op::DelService, &mut ops);
    dels(&current.names, &target.names, Op::DelName, &mut ops);
    dels(&current.maglev, &target.maglev, Op::DelMaglev, &mut ops);
    dels(&current.slots, &target.slots, Op::DelSlot, &mut ops);
    dels(&current.backends, &target.backends, Op::DelBackend, &mut ops);
    ops
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("writing maps: {0}")]
    Datapath(#[from] crate::ebpf::DatapathError),
}

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    pub writes: usize,
    pub deletes: usize,
}

/// Keeps a datapath in line with the desired services, remembering what it holds.
pub struct Reconciler<D> {
    datapath: D,
    current: MapImage,
}

impl<D: crate::ebpf::Datapath> Reconciler<D> {
    /// Starts from what the datapath holds now (empty, or adopted pinned state).
    pub fn new(datapath: D) -> Result<Self, SyncError> {
        let current = datapath.read_image()?;
        Ok(Self { datapath, current })
    }

    pub fn reconcile(&mut self, desired: &[LbService]) -> Result<SyncStats, SyncError> {
        let ops = plan(&self.current, desired)?;
        let mut stats = SyncStats::default();
        for op in &ops {
            if let Err(e) = self.datapath.apply(op) {
                // Every prefix of the plan is a valid state; re-read what the kernel holds so
                // that the next attempt plans from the truth.
                if let Ok(image) = self.datapath.read_image() {
                    self.current = image;
                }
                return Err(e.into());
            }
            self.current.apply(op);
            match op {
                Op::DelFrontend(_) | Op::DelService(_) | Op::DelName(_) | Op::DelMaglev(_) | Op::DelSlot(_) | Op::DelBackend(_) => {
                    stats.deletes += 1
                }
                _ => stats.writes += 1,
            }
        }
        Ok(stats)
    }

    /// What the kernel holds, as last written (no map reads).
    pub fn image(&self) -> &MapImage {
        &self.current
    }

    /// The kernel's view, read back from the datapath.
    pub fn kernel_image(&self) -> Result<MapImage, SyncError> {
        Ok(self.datapath.read_image()?)
    }

    pub fn datapath(&self) -> &D {
        &self.datapath
    }
}

/// A service as the kernel holds it, for `/config_dump` and `mesh services`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ServiceRow {
    pub id: u32,
    pub name: String,
    pub frontend: SocketAddr,
    pub protocol: String,
    pub algorithm: &'static str,
    pub affinity_timeout_s: Option<u32>,
    /// Connections go to the agent's proxy (HTTPRoutes decide the backend).
    pub l7: bool,
    /// In slot order.
    pub backends: Vec<SocketAddr>,
}

impl MapImage {
    pub fn service_rows(&self) -> Vec<ServiceRow> {
        let mut rows: Vec<ServiceRow> = self
            .frontends
            .iter()
            .filter_map(|(key, &id)| {
                let svc = self.services.get(&id)?;
                let backends = (0..svc.backend_count)
                    .filter_map(|slot| self.slots.get(&SlotKey { service_id: id, slot }))
                    .filter_map(|bid| self.backends.get(bid))
                    .map(backend_socket_addr)
                    .collect();
                Some(ServiceRow {
                    id,
                    name: self.names.get(&id).cloned().unwrap_or_default(),
                    frontend: SocketAddr::new(ip_of(&key.addr), u16::from_be(key.port_be)),
                    protocol: crate::state::Protocol::from_ip_proto(key.proto)
                        .map_or_else(|| key.proto.to_string(), |p| p.to_string()),
                    algorithm: if svc.flags & service_flags::MAGLEV != 0 { "maglev" } else { "random" },
                    affinity_timeout_s: (svc.flags & service_flags::AFFINITY != 0).then_some(svc.affinity_timeout_s),
                    l7: svc.flags & service_flags::L7 != 0,
                    backends,
                })
            })
            .collect();
        rows.sort_by(|a, b| a.name.cmp(&b.name).then(a.frontend.cmp(&b.frontend)));
        rows
    }
}

#[cfg(test)]
mod tests;
