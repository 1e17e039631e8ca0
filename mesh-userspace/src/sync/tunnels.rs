//! The enrolled pods of other nodes into `mesh_tunneled`: the kernel sends an enrolled pod's
//! connections to them to the tunnel listener. Only pods whose node address is known can be
//! reached through their agent; the others are left to plain TCP. Enrolled pods of this node
//! that are STRICT on a port (PeerAuthentication) are tunneled too, through this node's own
//! agent: their ingress filter lets in the agent's connections only.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    ebpf::maps::TunneledMap,
    state::{Snapshot, policy::PodMtls},
};

const RETRY: Duration = Duration::from_secs(2);

/// The addresses to tunnel to, as of `snapshot` (`root_namespace`: of mesh-wide policies).
pub fn tunneled(snapshot: &Snapshot, root_namespace: &str) -> BTreeSet<IpAddr> {
    let peers = snapshot.peers.iter().filter(|(_, w)| w.enrolled && w.spec.host_ip.is_some()).map(|(ip, _)| *ip);
    let strict_here = snapshot
        .pods_by_ip
        .iter()
        .filter(|(_, w)| {
            w.enrolled && PodMtls::of(&snapshot.policies, root_namespace, &w.spec.key.namespace, &w.spec.labels).is_strict_anywhere()
        })
        .map(|(ip, _)| *ip);
    peers.chain(strict_here).collect()
}

/// Keeps `mesh_tunneled` in line with the store's peers, pods and policies until the snapshots
/// end (a snapshot that changed none of them costs three pointer comparisons).
pub async fn run(mut map: TunneledMap, mut snapshots: watch::Receiver<Arc<Snapshot>>, root_namespace: String) {
    let mut done: Option<Arc<Snapshot>> = None;
    let mut retry = false;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let same = done.as_ref().is_some_and(|d| {
            d.peers.ptr_eq(&snapshot.peers) && d.pods_by_ip.ptr_eq(&snapshot.pods_by_ip) && Arc::ptr_eq(&d.policies, &snapshot.policies)
        });
        if retry || !same {
            let wanted = tunneled(&snapshot, &root_namespace);
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
            done = Some(snapshot);
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if retry => {}
        }
    }
}
