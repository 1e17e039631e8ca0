//! The live-connection table (`mesh_common::ConnValue`): a connection lives in its cookie's slot
//! of `mesh_conns`, or in `mesh_conns_ovfl` when another connection holds that slot.
//!
//! Why slots: taking one is two stores and freeing it one, where a hash map insert allocates,
//! takes a bucket lock and lands on a cold bucket of a multi-megabyte table (measured ~4x the
//! cost on the connect+close path). Cookies are handed out in sequence (in per-CPU batches), so
//! new connections also share cache lines and pages.
//!
//! Two sockets whose cookies share a slot (131,072 apart) that both take it in the same
//! instant on two CPUs can both see it free: 5.10 has no compare-and-swap. The later store
//! wins and the other connection goes untracked: no record, nothing left behind.
use core::{
    ptr::{addr_of, addr_of_mut, read_volatile, write_volatile},
    sync::atomic::{Ordering, compiler_fence},
};

use aya_ebpf::Global;
use mesh_common::{ConnValue, conn_phase, sizes};

use crate::maps::{CONNS, CONNS_OVERFLOW};

/// Slots in use minus one. A load-time constant (the verifier folds it): the agent lowers it
/// only when asked to (`--conn-slots`, for tests that need connections in the overflow map).
#[unsafe(no_mangle)]
static CONN_SLOT_MASK: Global<u32> = Global::new(sizes::CONN_SLOTS - 1);

/// The socket's slot, whoever holds it.
#[inline(always)]
fn slot_of(cookie: u64) -> Option<*mut ConnValue> {
    CONNS.get_ptr_mut(cookie as u32 & CONN_SLOT_MASK.load())
}

/// The socket's slot if the socket holds it: no hash lookup, for the callbacks that only
/// care about the common case.
#[inline(always)]
pub fn own_slot(cookie: u64) -> Option<*mut ConnValue> {
    let slot = slot_of(cookie)?;
    // SAFETY: a pointer into the array's value memory, valid for the program's run.
    (unsafe { read_volatile(addr_of!((*slot).cookie)) } == cookie).then_some(slot)
}

/// The entry of the socket with this cookie, if it has one.
#[inline(always)]
pub fn find(cookie: u64) -> Option<*mut ConnValue> {
    own_slot(cookie).or_else(|| CONNS_OVERFLOW.get_ptr_mut(&cookie))
}

/// The socket's entry if it has one, else a new one whose `cookie` is set and `phase` is 0:
/// the caller fills every other field, then calls `publish`. Looks in the overflow map only
/// when another connection holds the slot, so the common case costs no hash lookup. `None`
/// when the overflow map is full.
#[inline(always)]
pub fn claim(cookie: u64, now: u64) -> Option<*mut ConnValue> {
    let slot = slot_of(cookie)?;
    // SAFETY: as in `own_slot`.
    unsafe {
        let owner = read_volatile(addr_of!((*slot).cookie));
        if owner == cookie {
            return Some(slot);
        }
        let dead_dial = (*slot).phase == conn_phase::DIALED && now.wrapping_sub((*slot).start_ns) > conn_phase::DIALED_TIMEOUT_NS;
        if owner == 0 || dead_dial {
            // phase first: a reader that sees the new cookie must not take the old fields
            // for a connection.
            write_volatile(addr_of_mut!((*slot).phase), 0);
            write_volatile(addr_of_mut!((*slot).cookie), cookie);
            return Some(slot);
        }
    }
    if let Some(entry) = CONNS_OVERFLOW.get_ptr_mut(&cookie) {
        return Some(entry);
    }
    let blank = ConnValue { cookie, ..ConnValue::default() };
    CONNS_OVERFLOW.insert(&cookie, &blank, 0).ok()?;
    CONNS_OVERFLOW.get_ptr_mut(&cookie)
}

/// Makes a filled entry visible to readers as `phase`.
#[inline(always)]
pub fn publish(entry: *mut ConnValue, phase: u8) {
    compiler_fence(Ordering::Release);
    // SAFETY: an entry from `claim` or `find`.
    unsafe { write_volatile(addr_of_mut!((*entry).phase), phase) };
}

/// Frees the socket's entry (from `find`).
#[inline(always)]
pub fn release(cookie: u64, entry: *mut ConnValue) {
    // SAFETY: an entry from `find`.
    unsafe {
        if read_volatile(addr_of!((*entry).cookie)) != cookie {
            return;
        }
        if let Some(slot) = slot_of(cookie)
            && core::ptr::eq(slot, entry)
        {
            // Through `entry`: 5.10's verifier does not learn from the comparison that `slot`
            // is not null.
            write_volatile(addr_of_mut!((*entry).phase), 0);
            write_volatile(addr_of_mut!((*entry).cookie), 0);
            return;
        }
    }
    let _ = CONNS_OVERFLOW.remove(&cookie);
}
