//! The enrolled pods of other nodes into `mesh_tunneled`: the kernel sends an enrolled pod's
//! connections to them to the tunnel listener. Only pods whose node address is known can be
//! reached through their agent; the others are left to plain TCP.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{ebpf::maps::TunneledMap, state::Snapshot};

const RETRY: Duration = Duration::from_secs(2);

/// The addresses to tunnel to, as of `snapshot`.
pub fn tunneled(snapshot: &Snapshot) -> BTreeSet<IpAddr> {
    snapshot.peers.iter().filter(|(_, w)| w.enrolled && w.spec.host_ip.is_some()).map(|(ip, _)| *ip).collect()
}

/// Keeps `mesh_tunneled` in line with the store's peers until the snapshots end (a snapshot
/// that changed no peer costs a pointer comparison).
pub async fn run(mut map: TunneledMap, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    let mut done: Option<imbl::HashMap<IpAddr, Arc<crate::state::model::Workload>>> = None;
    let mut retry = false;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        if retry || done.as_ref().is_none_or(|peers| !peers.ptr_eq(&snapshot.peers)) {
            let wanted = tunneled(&snapshot);
            retry = match map.sync(&wanted) {
                Ok((0, 0)) => false,
                Ok((added, removed)) => {
                    tracing::debug!(added, removed, pods = wanted.len(), "tunneled pods synced to the kernel");
                    false
                }
                Err(e) => {
                    tracing::warn!("writing mesh_tunneled: {e}; trying again");
                    true
                }
            };
            done = Some(snapshot.peers.clone());
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if retry => {}
        }
    }
}
