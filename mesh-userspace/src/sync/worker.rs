//! The kernel sync on a thread of its own: it never runs on the proxy's runtime, and nothing
//! waits for it but readiness.
//!
//! The store hands over each snapshot with the balanced services it changed. The hand-over
//! is a work queue as Kubernetes controllers have: a set of keys, so a burst of changes to one
//! Service is written once, and its size is bounded by the number of services.
use std::{
    collections::HashSet,
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{Reconciler, SyncStats};
use crate::{
    ebpf::Datapath,
    state::{LbServiceKey, ObjectKey, Snapshot},
};

/// What the sync thread last did, for readiness, metrics and telemetry labels.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// The store generation the kernel holds.
    pub generation: u64,
    /// Successful syncs so far.
    pub runs: u64,
    pub last: SyncStats,
    pub last_elapsed_us: u64,
    /// The last attempt failed: why (the kernel keeps its last good state meanwhile).
    pub error: Option<String>,
    /// Entries per service map, as written.
    pub entries: Vec<(&'static str, usize)>,
    /// Kernel service id -> Service.
    pub service_ids: imbl::HashMap<u32, ObjectKey>,
}

#[derive(Default)]
struct Pending {
    latest: Option<Arc<Snapshot>>,
    keys: HashSet<LbServiceKey>,
    stop: bool,
}

/// The hand-over from the store to the sync thread.
#[derive(Default)]
pub struct SyncFeed {
    pending: Mutex<Pending>,
    wake: Condvar,
}

impl SyncFeed {
    /// Queues `changed` to be synced as `snapshot` (or a newer one) has them.
    pub fn publish(&self, snapshot: Arc<Snapshot>, changed: impl IntoIterator<Item = LbServiceKey>) {
        let mut pending = self.pending.lock().expect("sync feed lock");
        pending.latest = Some(snapshot);
        pending.keys.extend(changed);
        self.wake.notify_one();
    }

    pub fn stop(&self) {
        self.pending.lock().expect("sync feed lock").stop = true;
        self.wake.notify_one();
    }

    /// The next snapshot and the keys changed since the last take; None once stopped. With
    /// `retry`, gives `retry.0` back after `retry.1` if nothing newer came.
    fn take(&self, retry: Option<(&Arc<Snapshot>, Duration)>) -> Option<(Arc<Snapshot>, HashSet<LbServiceKey>)> {
        let deadline = retry.map(|(_, after)| Instant::now() + after);
        let mut pending = self.pending.lock().expect("sync feed lock");
        loop {
            if pending.stop {
                return None;
            }
            if let Some(snapshot) = pending.latest.take() {
                return Some((snapshot, std::mem::take(&mut pending.keys)));
            }
            match (deadline, retry) {
                (Some(deadline), Some((snapshot, _))) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Some((snapshot.clone(), HashSet::new()));
                    }
                    pending = self.wake.wait_timeout(pending, left).expect("sync feed lock").0;
                }
                _ => pending = self.wake.wait(pending).expect("sync feed lock"),
            }
        }
    }
}

/// A sync this big (a start, a large change) leaves megabytes of freed plans behind.
const BIG_SYNC: usize = 10_000;

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// Starts the sync thread; it ends after `feed.stop()`.
pub fn spawn<D: Datapath + Send + 'static>(
    mut reconciler: Reconciler<D>,
    feed: Arc<SyncFeed>,
    report: watch::Sender<SyncReport>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("mesh-sync".into()).spawn(move || {
        // After a failure the whole state is compared again (the reconciler knows), after a
        // growing pause, until it succeeds or a newer snapshot comes.
        let mut failed: Option<(Arc<Snapshot>, Duration)> = None;
        while let Some((snapshot, keys)) = feed.take(failed.as_ref().map(|(s, d)| (s, *d))) {
            let started = Instant::now();
            let result = reconciler.sync(&snapshot, keys.iter().cloned());
            let elapsed_us = started.elapsed().as_micros() as u64;
            report.send_modify(|r| match result {
                Ok(stats) => {
                    if stats != SyncStats::default() || r.error.is_some() {
                        tracing::info!(
                            generation = snapshot.generation,
                            services = keys.len(),
                            writes = stats.writes,
                            deletes = stats.deletes,
                            elapsed_us,
                            "kernel maps synced"
                        );
                    }
                    r.generation = snapshot.generation;
                    r.runs += 1;
                    r.last = stats;
                    r.last_elapsed_us = elapsed_us;
                    r.error = None;
                    r.entries = reconciler.image().entries();
                    r.service_ids = reconciler.service_ids();
                    failed = None;
                    if stats.writes + stats.deletes > BIG_SYNC {
                        crate::host::release_free_memory();
                    }
                }
                Err(e) => {
                    tracing::error!(generation = snapshot.generation, "kernel sync failed; the kernel keeps its last good state: {e}");
                    r.error = Some(e.to_string());
                    let pause = failed.as_ref().map_or(RETRY_MIN, |(_, d)| (*d * 2).min(RETRY_MAX));
                    failed = Some((snapshot.clone(), pause));
                }
            });
        }
    })
}
