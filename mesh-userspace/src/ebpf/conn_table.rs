//! The pinned live-connection table, read from userspace: the `mesh_conns` slots, mapped into
//! memory for each read (one copy per slot, no syscall), and the `mesh_conns_ovfl` hash map.
//! Works while the agent is down. See `mesh_common::ConnValue` for how a slot is read safely
//! while the kernel writes it. The mapping is dropped after each read: the kernel maps every
//! page up front, and a mapping kept open would add the whole table to the agent's RSS.
use std::{
    os::fd::AsRawFd as _,
    path::Path,
    ptr::{NonNull, addr_of, read_volatile},
    sync::atomic::{Ordering, fence},
};

use aya::maps::{HashMap, Map, MapData};
use mesh_common::{ConnValue, conn_phase, map_names, sizes};

pub struct ConnTable {
    slots: MapData,
    overflow: HashMap<MapData, u64, ConnValue>,
}

/// How many entries are taken, for gauges and leak checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub slots: usize,
    pub overflow: usize,
}

impl ConnTable {
    pub fn open(pin_dir: &Path) -> Result<Self, String> {
        let slots_path = pin_dir.join(map_names::CONNS);
        let at = |e: &(dyn std::error::Error + 'static)| format!("{}: {}", slots_path.display(), super::error_chain(e));
        let slots = MapData::from_pin(&slots_path).map_err(|e| at(&e))?;
        let info = slots.info().map_err(|e| at(&e))?;
        if info.max_entries() != sizes::CONN_SLOTS || info.value_size() as usize != size_of::<ConnValue>() {
            return Err(format!(
                "{}: {} slots of {} bytes, expected {} of {} (pinned by another mesh version?)",
                slots_path.display(),
                info.max_entries(),
                info.value_size(),
                sizes::CONN_SLOTS,
                size_of::<ConnValue>()
            ));
        }

        let overflow_path = pin_dir.join(map_names::CONNS_OVERFLOW);
        let at = |e: &(dyn std::error::Error + 'static)| format!("{}: {}", overflow_path.display(), super::error_chain(e));
        let map = Map::from_map_data(MapData::from_pin(&overflow_path).map_err(|e| at(&e))?).map_err(|e| at(&e))?;
        let overflow = HashMap::try_from(map).map_err(|e| at(&e))?;
        Ok(Self { slots, overflow })
    }

    /// Copies of the taken slots.
    fn taken_slots(&self) -> Result<Vec<ConnValue>, String> {
        let mapping = SlotMapping::new(&self.slots).map_err(|e| format!("mapping {}: {e}", map_names::CONNS))?;
        Ok((0..mapping.len).filter_map(|i| mapping.read(i)).collect())
    }

    /// Every established connection.
    pub fn established(&self) -> Result<Vec<ConnValue>, String> {
        let mut out = self.taken_slots()?;
        // Entries can vanish between listing a key and reading it: skip those.
        out.extend(self.overflow.iter().filter_map(Result::ok).map(|(_, v)| v));
        out.retain(|c| c.phase == conn_phase::ESTABLISHED);
        Ok(out)
    }

    /// Entries in use. A slot left by a dial that failed before its SYN is free for the
    /// taking once `DIALED_TIMEOUT_NS` has passed, so it is not counted.
    pub fn occupancy(&self) -> Result<Occupancy, String> {
        let now = monotonic_ns();
        let dead_dial = |c: &ConnValue| c.phase == conn_phase::DIALED && now.saturating_sub(c.start_ns) > conn_phase::DIALED_TIMEOUT_NS;
        Ok(Occupancy {
            slots: self.taken_slots()?.iter().filter(|c| !dead_dial(c)).count(),
            overflow: self.overflow.keys().filter(Result::is_ok).count(),
        })
    }

    /// Removes overflow entries of dials that never became connections (a connect() that
    /// failed before its SYN leaves one behind; slots are simply taken over). Returns how many.
    pub fn sweep_dead_dials(&mut self) -> usize {
        let now = monotonic_ns();
        let dead: Vec<u64> = self
            .overflow
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.phase != conn_phase::ESTABLISHED && now.saturating_sub(c.start_ns) > UNESTABLISHED_TIMEOUT_NS)
            .map(|(cookie, _)| cookie)
            .collect();
        dead.iter().filter(|cookie| self.overflow.remove(cookie).is_ok()).count()
    }
}

/// `bpf_ktime_get_ns()`'s clock, read from userspace.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// An overflow entry not established after this long is a dial that failed before its SYN
/// (or whose SYN sat past any sane connect timeout).
const UNESTABLISHED_TIMEOUT_NS: u64 = 300 * 1_000_000_000;

/// `mesh_conns` mapped read-only.
struct SlotMapping {
    base: NonNull<ConnValue>,
    len: usize,
    bytes: usize,
}

// SAFETY: a read-only shared mapping; every read goes through `read_volatile`.
unsafe impl Send for SlotMapping {}
// SAFETY: as above.
unsafe impl Sync for SlotMapping {}

impl SlotMapping {
    fn new(data: &MapData) -> std::io::Result<Self> {
        use std::os::fd::AsFd as _;
        let len = sizes::CONN_SLOTS as usize;
        // SAFETY: plain sysconf(3).
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = (len * size_of::<ConnValue>()).div_ceil(page) * page;
        let fd = data.fd().as_fd().as_raw_fd();
        // SAFETY: a new shared read-only mapping of an mmap-able array of `len` values (checked
        // by the caller); the kernel keeps the map alive while it is mapped.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), bytes, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { base, len, bytes })
    }

    fn cookie(&self, i: usize) -> u64 {
        assert!(i < self.len);
        // SAFETY: in bounds of the mapping; an aligned 8-byte load.
        unsafe { read_volatile(addr_of!((*self.base.as_ptr().add(i)).cookie)) }
    }

    /// A consistent copy of slot `i`, if it holds a connection: the kernel writes `phase` last
    /// when it fills a slot and clears it first when it frees one, so an unchanged cookie and
    /// phase around the copy mean the copy is of one connection.
    fn read(&self, i: usize) -> Option<ConnValue> {
        let cookie = self.cookie(i);
        if cookie == 0 {
            return None;
        }
        // SAFETY: in bounds of the mapping; volatile loads of plain integers.
        unsafe {
            let slot = self.base.as_ptr().add(i);
            let phase = read_volatile(addr_of!((*slot).phase));
            fence(Ordering::Acquire);
            let copy = read_volatile(slot);
            fence(Ordering::Acquire);
            (self.cookie(i) == cookie && read_volatile(addr_of!((*slot).phase)) == phase && copy.cookie == cookie).then_some(copy)
        }
    }
}

impl Drop for SlotMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes) };
    }
}
