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
#![forbid(unsafe_code)]
pub mod authz;
pub mod maglev;
pub mod tunnels;
pub mod worker;
pub mod workloads;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::SocketAddr,
};

use mesh_common::{BackendValue, FrontendKey, MAGLEV_TABLE_SIZE, ServiceValue, SlotKey, service_flags, sizes};

pub use crate::ebpf::image::{MapImage, Op, ServiceRow, addr_of, backend_socket_addr, frontend_key, ip_of};

use crate::state::{Algorithm, LbService, LbServiceKey, ObjectKey, Snapshot};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{address}/{protocol} is claimed by both {first} and {second}")]
    FrontendConflict { address: SocketAddr, protocol: String, first: String, second: String },
    #[error("{map} would need {} entries during the change ({now} now, {new} new before old ones are removed) but holds at most {max}", now + new)]
    Capacity { map: &'static str, now: usize, new: usize, max: u32 },
}

/// Hands out ids above every id in use, so a just-freed id is not reused at once (the kernel
/// may still remember it for session affinity).
#[derive(Debug, Default)]
struct IdAllocator {
    used: HashSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        let used: HashSet<u32> = used.into_iter().collect();
        let next = used.iter().max().map_or(1, |m| m.saturating_add(1));
        Self { used, next }
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

    fn release(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// A sync writing more entries than this rebuilds the map image compactly.
const COMPACT_AFTER_OPS: usize = 4096;

/// What the kernel holds for one balanced service port.
#[derive(Debug, Clone)]
struct Owned {
    sid: u32,
    frontend: FrontendKey,
    /// Every backend entry of the service (their addresses are in the map image).
    backends: Vec<u32>,
}

/// The order ops are applied in: every write before the frontend that makes it reachable,
/// removals from the frontend down (see the module doc).
fn phase(op: &Op) -> u8 {
    match op {
        Op::PutBackend(..) => 0,
        Op::PutMaglev(..) => 1,
        Op::PutSlot(..) => 2,
        Op::PutService(..) => 3,
        Op::PutName(..) => 4,
        Op::PutFrontend(..) => 5,
        Op::DelFrontend(_) => 6,
        Op::DelService(_) => 7,
        Op::DelName(_) => 8,
        Op::DelMaglev(_) => 9,
        Op::DelSlot(_) => 10,
        Op::DelBackend(_) => 11,
    }
}

/// Plans against `current` (and nothing else): the kernel image and who owns what in it.
struct Planner<'a> {
    current: &'a MapImage,
    owned: &'a mut HashMap<LbServiceKey, Owned>,
    ids: &'a mut imbl::HashMap<u32, ObjectKey>,
    service_ids: &'a mut IdAllocator,
    backend_ids: &'a mut IdAllocator,
    ops: Vec<Op>,
}

impl Planner<'_> {
    /// The ops that make the kernel hold `desired` for `key` (None: nothing).
    fn service(&mut self, key: &LbServiceKey, desired: Option<&LbService>) {
        let current = self.current;
        let Some(svc) = desired else {
            let Some(old) = self.owned.remove(key) else { return };
            if current.frontends.get(&old.frontend) == Some(&old.sid) {
                self.ops.push(Op::DelFrontend(old.frontend));
            }
            self.delete_service(old.sid);
            for id in &old.backends {
                self.ops.push(Op::DelBackend(*id));
            }
            self.ids.remove(&old.sid);
            return;
        };
        let fkey = frontend_key(svc.frontend, svc.key.protocol.ip_proto());
        let mut owned = match self.owned.remove(key) {
            Some(owned) => owned,
            None => Owned { sid: self.service_ids.alloc(), frontend: fkey, backends: Vec::new() },
        };
        let sid = owned.sid;
        if owned.frontend != fkey {
            if current.frontends.get(&owned.frontend) == Some(&sid) {
                self.ops.push(Op::DelFrontend(owned.frontend));
            }
            owned.frontend = fkey;
        }

        // Backends: a surviving address keeps its id.
        let mut by_addr: HashMap<SocketAddr, u32> =
            owned.backends.iter().filter_map(|id| current.backends.get(id).map(|b| (backend_socket_addr(b), *id))).collect();
        let mut ids = Vec::with_capacity(svc.backends.len());
        for b in &svc.backends {
            let id = by_addr.remove(&b.addr).unwrap_or_else(|| self.backend_ids.alloc());
            let value = BackendValue { addr: addr_of(b.addr.ip()), port_be: b.addr.port().to_be(), _pad: 0, service_id: sid };
            if current.backends.get(&id) != Some(&value) {
                self.ops.push(Op::PutBackend(id, value));
            }
            ids.push(id);
        }
        for id in by_addr.into_values() {
            self.ops.push(Op::DelBackend(id));
        }
        owned.backends = ids.clone();

        let slot_range = SlotKey { service_id: sid, slot: 0 }..=SlotKey { service_id: sid, slot: u32::MAX };
        for (slot, id) in assign_slots(current, sid, &ids).into_iter().enumerate() {
            let key = SlotKey { service_id: sid, slot: slot as u32 };
            if current.slots.get(&key) != Some(&id) {
                self.ops.push(Op::PutSlot(key, id));
            }
        }
        for key in current.slots.range(slot_range).map(|(k, _)| *k).filter(|k| k.slot as usize >= ids.len()) {
            self.ops.push(Op::DelSlot(key));
        }

        let maglev = svc.algorithm == Algorithm::Maglev;
        if maglev && !ids.is_empty() {
            let addrs: Vec<SocketAddr> = svc.backends.iter().map(|b| b.addr).collect();
            let table: Vec<u32> = maglev::table(&addrs, MAGLEV_TABLE_SIZE).into_iter().map(|i| ids[i as usize]).collect();
            if current.maglev.get(&sid) != Some(&table) {
                self.ops.push(Op::PutMaglev(sid, table));
            }
        } else if current.maglev.contains_key(&sid) {
            self.ops.push(Op::DelMaglev(sid));
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
        let value =
            ServiceValue { backend_count: ids.len() as u32, flags, affinity_timeout_s: svc.affinity_timeout_s.unwrap_or(0), _pad: 0 };
        if current.services.get(&sid) != Some(&value) {
            self.ops.push(Op::PutService(sid, value));
        }
        let name = svc.key.to_string();
        if current.names.get(&sid) != Some(&name) {
            self.ops.push(Op::PutName(sid, name));
        }
        if current.frontends.get(&fkey) != Some(&sid) {
            self.ops.push(Op::PutFrontend(fkey, sid));
        }
        if self.ids.get(&sid) != Some(&svc.key.service) {
            self.ids.insert(sid, svc.key.service.clone());
        }
        self.owned.insert(key.clone(), owned);
    }

    fn delete_service(&mut self, sid: u32) {
        let current = self.current;
        if current.services.contains_key(&sid) {
            self.ops.push(Op::DelService(sid));
        }
        if current.names.contains_key(&sid) {
            self.ops.push(Op::DelName(sid));
        }
        if current.maglev.contains_key(&sid) {
            self.ops.push(Op::DelMaglev(sid));
        }
        let range = SlotKey { service_id: sid, slot: 0 }..=SlotKey { service_id: sid, slot: u32::MAX };
        for key in current.slots.range(range) {
            self.ops.push(Op::DelSlot(*key.0));
        }
    }

    /// The planned ops in a safe order. A frontend another service takes over in the same
    /// plan is not deleted.
    fn finish(self) -> Vec<Op> {
        let mut ops = self.ops;
        let taken: HashSet<FrontendKey> =
            ops.iter().filter_map(|op| if let Op::PutFrontend(k, _) = op { Some(*k) } else { None }).collect();
        ops.retain(|op| !matches!(op, Op::DelFrontend(k) if taken.contains(k)));
        ops.sort_by_key(phase);
        ops
    }
}

/// Slot positions for `ids`: a backend keeps its slot when it can, so that only the slots
/// that really change are written.
fn assign_slots(current: &MapImage, sid: u32, ids: &[u32]) -> Vec<u32> {
    let n = ids.len();
    let wanted: HashSet<u32> = ids.iter().copied().collect();
    let mut slots: Vec<Option<u32>> = vec![None; n];
    let mut placed = HashSet::new();
    for (key, &id) in current.slots.range(SlotKey { service_id: sid, slot: 0 }..=SlotKey { service_id: sid, slot: u32::MAX }) {
        let slot = key.slot as usize;
        if slot < n && wanted.contains(&id) && placed.insert(id) {
            slots[slot] = Some(id);
        }
    }
    let mut rest = ids.iter().filter(|id| !placed.contains(id));
    slots.into_iter().map(|s| s.or_else(|| rest.next().copied()).expect("as many ids as slots")).collect()
}

/// Every map's size at its fullest while `ops` are applied in order (writes come before
/// removals, so old and new entries coexist for a moment), against its capacity.
fn check_capacity(current: &MapImage, ops: &[Op]) -> Result<(), PlanError> {
    let mut added: BTreeMap<&'static str, usize> = BTreeMap::new();
    for op in ops {
        let (map, new) = match op {
            Op::PutFrontend(k, _) => (mesh_common::map_names::FRONTENDS, !current.frontends.contains_key(k)),
            Op::PutService(k, _) => (mesh_common::map_names::SERVICES, !current.services.contains_key(k)),
            Op::PutSlot(k, _) => (mesh_common::map_names::SLOTS, !current.slots.contains_key(k)),
            Op::PutBackend(k, _) => (mesh_common::map_names::BACKENDS, !current.backends.contains_key(k)),
            Op::PutMaglev(k, _) => (mesh_common::map_names::MAGLEV, !current.maglev.contains_key(k)),
            _ => continue,
        };
        if new {
            *added.entry(map).or_default() += 1;
        }
    }
    let maps = [
        (mesh_common::map_names::FRONTENDS, current.frontends.len(), sizes::MAX_FRONTENDS),
        (mesh_common::map_names::SERVICES, current.services.len(), sizes::MAX_SERVICES),
        (mesh_common::map_names::SLOTS, current.slots.len(), sizes::MAX_SLOTS),
        (mesh_common::map_names::BACKENDS, current.backends.len(), sizes::MAX_BACKENDS),
        (mesh_common::map_names::MAGLEV, current.maglev.len(), sizes::MAX_MAGLEV),
    ];
    for (map, now, max) in maps {
        let new = added.get(map).copied().unwrap_or(0);
        if now + new > max as usize {
            return Err(PlanError::Capacity { map, now, new, max });
        }
    }
    Ok(())
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

/// Keeps a datapath in line with the desired services, remembering what it holds and which
/// entries belong to which balanced service, so that a change to one service plans and writes
/// that service only.
pub struct Reconciler<D> {
    datapath: D,
    current: MapImage,
    owned: HashMap<LbServiceKey, Owned>,
    /// Kernel service id -> the Service, for telemetry labels (shared, O(1) to clone).
    ids: imbl::HashMap<u32, ObjectKey>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// The next sync must compare everything (at start, and after a failed write).
    needs_full: bool,
}

impl<D: crate::ebpf::Datapath> Reconciler<D> {
    /// Starts from what the datapath holds now (empty, or adopted pinned state).
    pub fn new(datapath: D) -> Result<Self, SyncError> {
        let current = datapath.read_image()?;
        Ok(Self {
            datapath,
            current,
            owned: HashMap::new(),
            ids: imbl::HashMap::new(),
            service_ids: IdAllocator::default(),
            backend_ids: IdAllocator::default(),
            needs_full: true,
        })
    }

    /// Makes the kernel hold exactly `desired` (every balanced service), comparing everything:
    /// at start, to adopt what a previous agent left, and after a failure.
    pub fn reconcile(&mut self, desired: &[LbService]) -> Result<SyncStats, SyncError> {
        self.reconcile_all(desired.iter())
    }

    fn reconcile_all<'a>(&mut self, desired: impl Iterator<Item = &'a LbService> + Clone) -> Result<SyncStats, SyncError> {
        self.needs_full = true;
        let ops = self.plan_all(desired).inspect_err(|_| self.restart_from_kernel())?;
        self.apply(&ops)
    }

    /// Applies the changes of `changed` balanced services, as `snapshot` has them; the first
    /// call (or the first after a failure) compares everything instead.
    pub fn sync(&mut self, snapshot: &Snapshot, changed: impl IntoIterator<Item = LbServiceKey>) -> Result<SyncStats, SyncError> {
        if self.needs_full {
            let all: Vec<&LbService> = snapshot.balanced.values().map(|s| &**s).collect();
            return self.reconcile_all(all.into_iter());
        }
        let mut planner = Planner {
            current: &self.current,
            owned: &mut self.owned,
            ids: &mut self.ids,
            service_ids: &mut self.service_ids,
            backend_ids: &mut self.backend_ids,
            ops: Vec::new(),
        };
        // The store never gives two services one frontend; a frontend that moves from one
        // service to another within the change is handled by `finish`.
        for key in changed {
            let desired = snapshot.balanced.get(&key).map(|s| &**s);
            planner.service(&key, desired);
        }
        let ops = planner.finish();
        if let Err(e) = check_capacity(&self.current, &ops) {
            self.restart_from_kernel();
            return Err(e.into());
        }
        self.apply(&ops)
    }

    /// Plans the whole desired state against the whole kernel image: ids of what exists are
    /// recovered (frontend -> service id, (service id, address) -> backend id) so that adopted
    /// state is rewritten only where it differs, and entries nothing owns are removed.
    fn plan_all<'a>(&mut self, desired: impl Iterator<Item = &'a LbService> + Clone) -> Result<Vec<Op>, PlanError> {
        let current = &self.current;
        let mut by_sid: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&id, b) in &current.backends {
            by_sid.entry(b.service_id).or_default().push(id);
        }
        self.owned.clear();
        self.ids = imbl::HashMap::new();
        self.service_ids = IdAllocator::new(current.services.keys().copied().chain(current.frontends.values().copied()));
        self.backend_ids = IdAllocator::new(current.backends.keys().copied());
        let mut claimed: BTreeMap<FrontendKey, &LbService> = BTreeMap::new();
        let mut taken = HashSet::new();
        for svc in desired.clone() {
            let fkey = frontend_key(svc.frontend, svc.key.protocol.ip_proto());
            if let Some(first) = claimed.insert(fkey, svc) {
                return Err(PlanError::FrontendConflict {
                    address: svc.frontend,
                    protocol: svc.key.protocol.to_string(),
                    first: first.key.to_string(),
                    second: svc.key.to_string(),
                });
            }
            if let Some(&sid) = current.frontends.get(&fkey)
                && current.services.contains_key(&sid)
                && taken.insert(sid)
            {
                let backends = by_sid.remove(&sid).unwrap_or_default();
                self.owned.insert(svc.key.clone(), Owned { sid, frontend: fkey, backends });
            }
        }
        let mut planner = Planner {
            current,
            owned: &mut self.owned,
            ids: &mut self.ids,
            service_ids: &mut self.service_ids,
            backend_ids: &mut self.backend_ids,
            ops: Vec::new(),
        };
        for svc in desired {
            planner.service(&svc.key, Some(svc));
        }
        // What no desired service owns goes.
        let sids: HashSet<u32> = planner.owned.values().map(|o| o.sid).collect();
        let backends: HashSet<u32> = planner.owned.values().flat_map(|o| o.backends.iter().copied()).collect();
        for (fkey, sid) in &current.frontends {
            if !claimed.contains_key(fkey) || !sids.contains(sid) {
                planner.ops.push(Op::DelFrontend(*fkey));
            }
        }
        let orphans: BTreeSet<u32> = current
            .services
            .keys()
            .chain(current.names.keys())
            .chain(current.maglev.keys())
            .chain(current.slots.keys().map(|k| &k.service_id))
            .filter(|sid| !sids.contains(sid))
            .copied()
            .collect();
        for sid in orphans {
            planner.delete_service(sid);
        }
        for id in current.backends.keys().filter(|id| !backends.contains(id)) {
            planner.ops.push(Op::DelBackend(*id));
        }
        let mut ops = planner.finish();
        ops.dedup();
        check_capacity(current, &ops)?;
        Ok(ops)
    }

    /// Forgets what was planned and starts the next sync from the kernel's own state.
    fn restart_from_kernel(&mut self) {
        self.needs_full = true;
        if let Ok(image) = self.datapath.read_image() {
            self.current = image;
        }
    }

    fn apply(&mut self, ops: &[Op]) -> Result<SyncStats, SyncError> {
        let mut stats = SyncStats::default();
        for op in ops {
            if let Err(e) = self.datapath.apply(op) {
                // Every prefix of the plan is a valid state; the next attempt plans from the
                // truth and removes what this one left behind.
                self.restart_from_kernel();
                return Err(e.into());
            }
            self.current.apply(op);
            match op {
                Op::DelService(id) => self.service_ids.release(*id),
                Op::DelBackend(id) => self.backend_ids.release(*id),
                _ => {}
            }
            if phase(op) >= 6 {
                stats.deletes += 1;
            } else {
                stats.writes += 1;
            }
        }
        self.needs_full = false;
        if ops.len() > COMPACT_AFTER_OPS {
            self.current.compact();
        }
        Ok(stats)
    }

    /// What the kernel holds, as last written (no map reads).
    pub fn image(&self) -> &MapImage {
        &self.current
    }

    /// Kernel service id -> Service, for everything synced.
    pub fn service_ids(&self) -> imbl::HashMap<u32, ObjectKey> {
        self.ids.clone()
    }

    /// The kernel's view, read back from the datapath.
    pub fn kernel_image(&self) -> Result<MapImage, SyncError> {
        Ok(self.datapath.read_image()?)
    }

    pub fn datapath(&self) -> &D {
        &self.datapath
    }
}

/// The ops that take the kernel from `current` to exactly `desired`, in a safe order.
pub fn plan(current: &MapImage, desired: &[LbService]) -> Result<Vec<Op>, PlanError> {
    let mut r = Reconciler {
        datapath: crate::ebpf::fake::FakeDatapath::default(),
        current: current.clone(),
        owned: HashMap::new(),
        ids: imbl::HashMap::new(),
        service_ids: IdAllocator::default(),
        backend_ids: IdAllocator::default(),
        needs_full: true,
    };
    r.plan_all(desired.iter())
}

#[cfg(test)]
mod tests;
