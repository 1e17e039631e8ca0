//! `mesh_events`: the ring buffer of connection records (sock_ops writes one when a connection
//! closes), as a typed handle.
use std::{
    os::fd::{AsRawFd, RawFd},
    path::Path,
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{ConnEvent, map_names};

use super::{DatapathError, maps::open_map};

pub struct EventRing(RingBuf<MapData>);

impl EventRing {
    pub fn open(dir: &Path) -> Result<Self, DatapathError> {
        let ring = RingBuf::try_from(open_map(dir, map_names::EVENTS)?)
            .map_err(|source| DatapathError::Open { path: dir.join(map_names::EVENTS), source })?;
        Ok(Self(ring))
    }

    /// Hands every waiting record to `each`, oldest first.
    pub fn drain(&mut self, mut each: impl FnMut(&ConnEvent)) {
        while let Some(item) = self.0.next() {
            if item.len() < size_of::<ConnEvent>() {
                continue;
            }
            // SAFETY: the kernel writes whole ConnEvents; read_unaligned copies one out.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ConnEvent>()) };
            each(&event);
        }
    }
}

/// For polling (tokio's AsyncFd): readable when records wait.
impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}
