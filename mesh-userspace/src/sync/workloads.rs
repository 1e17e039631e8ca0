//! This node's pods into `mesh_workloads`: each pod's cgroup id (found under the node's cgroup
//! tree for either kubelet driver, or named by the pod's `mesh.dev/cgroup` annotation) with the
//! agent's number for the pod, which the kernel records on the connections the pod dials.
//! kubelet makes a pod's cgroup when it starts the pod, which may be after the API says the
//! pod exists: pods whose cgroup is missing are looked for again every `RETRY`. The agent's own
//! cgroup is there too, flagged, so the kernel never captures or refuses its connections.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use mesh_common::{AGENT_WORKLOAD, KUBELET_WORKLOAD, WorkloadValue, workload_flags};
use tokio::sync::watch;

use crate::{
    ebpf::maps::WorkloadMap,
    host::{self, PodCgroup},
    state::{ObjectKey, Snapshot, model::Workload},
    telemetry::Telemetry,
};

const RETRY: Duration = Duration::from_secs(2);

/// A pod, by key and uid (a pod re-created under the same name is another pod).
type PodId = (ObjectKey, String);

pub struct WorkloadSync {
    map: WorkloadMap,
    /// The agent's own cgroup: its connections are never captured or refused.
    own: Option<PodCgroup>,
    /// The kubelet's cgroup, whose probes reach pods as the agent's connections do.
    kubelet: Option<PathBuf>,
    /// Where kubelet's pod cgroups are looked for (the attached cgroup: the node's root).
    root: PathBuf,
    /// The cgroup v2 mount, for `mesh.dev/cgroup` paths.
    mount: Option<PathBuf>,
    ids: HashMap<PodId, u32>,
    next_id: u32,
    found: HashMap<PodId, PodCgroup>,
}

impl WorkloadSync {
    pub fn new(map: WorkloadMap, root: PathBuf) -> Self {
        let mount = host::cgroup2_root().ok();
        let own = mount.as_deref().and_then(host::own_cgroup);
        Self { map, own, kubelet: None, root, mount, ids: HashMap::new(), next_id: 1, found: HashMap::new() }
    }

    /// The kubelet's cgroup (a path under the cgroup v2 mount): looked for at each sync.
    pub fn with_kubelet(mut self, path: Option<PathBuf>) -> Self {
        self.kubelet = path;
        self
    }

    fn cgroup_of(&mut self, id: &PodId, pod: &Workload) -> Option<PodCgroup> {
        // A cgroup found before is kept while its directory is still there.
        if let Some(known) = self.found.get(id)
            && host::cgroup_at(&known.path).as_ref() == Some(known)
        {
            return Some(known.clone());
        }
        let found = host::locate_pod_cgroup(&self.root, self.mount.as_deref(), pod.spec.cgroup.as_deref(), &pod.spec.uid);
        match &found {
            Some(c) => self.found.insert(id.clone(), c.clone()),
            None => self.found.remove(id),
        };
        found
    }

    /// Writes the map for `snapshot`; returns the pods by kernel number, and whether to try
    /// again (a pod's cgroup is still missing, or the map could not be written).
    fn apply(&mut self, snapshot: &Snapshot) -> (imbl::HashMap<u32, Arc<Workload>>, bool) {
        let mut wanted = BTreeMap::new();
        let mut by_id = imbl::HashMap::new();
        let mut missing = false;
        let present: std::collections::HashSet<PodId> = snapshot.pods.values().map(|p| (p.spec.key.clone(), p.spec.uid.clone())).collect();
        self.ids.retain(|id, _| present.contains(id));
        self.found.retain(|id, _| present.contains(id));
        for pod in snapshot.pods.values() {
            let id = (pod.spec.key.clone(), pod.spec.uid.clone());
            let number = *self.ids.entry(id.clone()).or_insert_with(|| {
                let n = self.next_id;
                self.next_id = self.next_id.checked_add(1).unwrap_or(1);
                n
            });
            by_id.insert(number, pod.clone());
            match self.cgroup_of(&id, pod) {
                Some(cgroup) => {
                    let flags = if pod.enrolled { workload_flags::ENROLLED } else { 0 };
                    wanted.insert(cgroup.id, WorkloadValue { id: number, flags });
                }
                None => missing = true,
            }
        }
        if let Some(own) = &self.own {
            wanted.insert(own.id, WorkloadValue { id: AGENT_WORKLOAD, flags: workload_flags::AGENT });
        }
        let kubelet = self.kubelet.as_ref().and_then(|p| {
            let under_mount = p.strip_prefix("/").unwrap_or(p);
            host::cgroup_at(&self.mount.as_deref()?.join(under_mount))
        });
        if let Some(kubelet) = kubelet {
            wanted.entry(kubelet.id).or_insert(WorkloadValue { id: KUBELET_WORKLOAD, flags: workload_flags::AGENT });
        }
        match self.map.sync(&wanted) {
            Ok((0, 0)) => {}
            Ok((written, removed)) => tracing::debug!(written, removed, pods = wanted.len(), "workloads synced to the kernel"),
            Err(e) => {
                tracing::warn!("writing mesh_workloads: {e}; trying again");
                missing = true;
            }
        }
        (by_id, missing)
    }
}

/// Keeps `mesh_workloads` in line with the store's pods until the snapshots end. Most snapshots
/// change no pod (an endpoint moved): those cost nothing here.
pub async fn run(
    mut sync: WorkloadSync,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    telemetry: Arc<Telemetry>,
    numbered: watch::Sender<imbl::HashMap<u32, Arc<Workload>>>,
) {
    let mut done: Option<imbl::OrdMap<ObjectKey, Arc<Workload>>> = None;
    let mut retry = false;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let pods_changed = done.as_ref().is_none_or(|pods| !pods.ptr_eq(&snapshot.pods));
        if pods_changed || retry {
            let (by_id, again) = sync.apply(&snapshot);
            telemetry.set_workload_ids(by_id.clone());
            numbered.send_if_modified(|old| {
                let changed = *old != by_id;
                *old = by_id;
                changed
            });
            (done, retry) = (Some(snapshot.pods.clone()), again);
        }
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if retry => {}
        }
    }
}
