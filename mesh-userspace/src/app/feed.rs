//! The source side of the agent: the source chosen on the command line feeds the store, and
//! each applied change goes to the consumers (kernel sync, proxy, telemetry) as a snapshot; what
//! became of API objects goes back to the source, which tells their owners.
use std::{sync::Arc, time::SystemTime};

use tokio::sync::watch;

use super::Agent;
use crate::{
    sources::{Change, ConfigErrors, Kind, Origin, Outcome, Source, Update, file::FileSource, kube::KubeSource},
    state::{Snapshot, Store},
    sync::worker::SyncFeed,
};

/// The source chosen on the command line.
pub(super) enum AnySource {
    Files(FileSource),
    Kube(KubeSource),
}

impl Source for AnySource {
    async fn next(&mut self) -> Option<Update> {
        match self {
            AnySource::Files(s) => s.next().await,
            AnySource::Kube(s) => s.next().await,
        }
    }

    fn ack(&mut self, accepted: bool) {
        match self {
            AnySource::Files(s) => s.ack(accepted),
            AnySource::Kube(s) => s.ack(accepted),
        }
    }

    fn outcome(&mut self, outcome: Outcome) {
        match self {
            AnySource::Files(s) => s.outcome(outcome),
            AnySource::Kube(s) => s.outcome(outcome),
        }
    }
}

/// Feeds the store from the source, and the consumers from the store, until the source ends.
pub(super) async fn run_source<S: Source>(
    agent: Arc<Agent>,
    mut source: S,
    store: Store,
    feed: Arc<SyncFeed>,
    snapshots: watch::Sender<Arc<Snapshot>>,
) {
    let mut consumer = Consumer { agent, store, feed, snapshots, read_all: false, outcome: None };
    while let Some(update) = source.next().await {
        match update {
            Update::Batch { origin, changes } => {
                let started = std::time::Instant::now();
                let count = changes.len();
                match consumer.store.apply(changes) {
                    Ok(applied) => {
                        source.ack(true);
                        consumer.publish(&applied.balanced, applied.generation);
                        consumer.agent.status.lock().expect("status lock").rejected.remove(&origin);
                        tracing::info!(
                            %origin,
                            objects = count,
                            services_recomputed = applied.services,
                            balanced_changed = applied.balanced.len(),
                            elapsed_us = started.elapsed().as_micros() as u64,
                            generation = applied.generation,
                            "configuration applied"
                        );
                    }
                    Err(errors) => {
                        source.ack(false);
                        consumer.agent.reject(origin, &errors);
                    }
                }
            }
            Update::Each { changes, unreadable } => {
                // Most changes are endpoints that move: they change no route and no refusal.
                if consumer.apply_each(changes, unreadable)
                    && let Some(outcome) = consumer.outcome_changed()
                {
                    source.outcome(outcome);
                }
            }
            Update::Unreadable { origin, errors } => consumer.agent.reject(origin, &errors),
            Update::Synced => consumer.synced(),
            Update::Waiting(reason) => consumer.agent.status.lock().expect("status lock").waiting = reason,
        }
    }
}

/// The store and what it feeds.
struct Consumer {
    agent: Arc<Agent>,
    store: Store,
    feed: Arc<SyncFeed>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// The kernel is told nothing until the source has delivered everything once: its first
    /// sync compares everything and removes what the configuration lacks, so syncing a
    /// half-read configuration would take down, for a moment, adopted Services not yet read.
    read_all: bool,
    /// What the source was last told of its objects.
    outcome: Option<Outcome>,
}

impl Consumer {
    /// Hands the store's new snapshot to every consumer.
    fn publish(&self, balanced: &[crate::state::LbServiceKey], generation: u64) {
        let snapshot = self.store.snapshot();
        self.agent.telemetry.set_workloads(snapshot.workloads.clone(), snapshot.pods_by_ip.clone());
        if self.read_all {
            self.feed.publish(snapshot.clone(), balanced.iter().cloned());
        }
        let _ = self.snapshots.send(snapshot.clone());
        let mut status = self.agent.status.lock().expect("status lock");
        status.generation = generation;
        status.services = snapshot.balanced.len();
        status.last_applied = Some(SystemTime::now());
    }

    /// Applies what it can: the whole set at once when all of it is valid (one generation),
    /// otherwise each change alone, so that a bad object is refused by itself. Returns whether
    /// the outcome may have changed: a refusal made or lifted, or a Service or route touched.
    fn apply_each(&mut self, changes: Vec<Change>, refused: Vec<(Origin, ConfigErrors)>) -> bool {
        let started = std::time::Instant::now();
        let count = changes.len();
        let mut outcome_touched = !refused.is_empty()
            || changes.iter().any(|c| {
                let kind = match c {
                    Change::Upsert { object, .. } => object.kind(),
                    Change::Delete { kind, .. } => *kind,
                };
                matches!(kind, Kind::Service | Kind::HttpRoute | Kind::GrpcRoute)
            });
        for (origin, errors) in &refused {
            self.agent.reject(origin.clone(), errors);
        }
        if changes.is_empty() {
            return outcome_touched;
        }
        let origins: Vec<Origin> = changes.iter().map(|c| c.origin().clone()).collect();
        let (mut balanced, mut accepted, mut generation) = (Vec::new(), Vec::new(), 0);
        match self.store.apply(changes.clone()) {
            Ok(applied) => {
                (balanced, accepted, generation) = (applied.balanced, origins, applied.generation);
            }
            Err(_) => {
                for change in changes {
                    let origin = change.origin().clone();
                    match self.store.apply(vec![change]) {
                        Ok(applied) => {
                            balanced.extend(applied.balanced);
                            generation = applied.generation;
                            accepted.push(origin);
                        }
                        Err(errors) => {
                            self.agent.reject(origin, &errors);
                            outcome_touched = true;
                        }
                    }
                }
            }
        }
        if accepted.is_empty() {
            return outcome_touched;
        }
        balanced.sort();
        balanced.dedup();
        self.publish(&balanced, generation);
        let mut status = self.agent.status.lock().expect("status lock");
        for origin in &accepted {
            outcome_touched |= status.rejected.remove(origin).is_some();
        }
        drop(status);
        // One line per list; single watch events are many, so they are debug.
        let level_info = count > 1;
        let elapsed_us = started.elapsed().as_micros() as u64;
        if level_info {
            tracing::info!(
                objects = count,
                accepted = accepted.len(),
                balanced_changed = balanced.len(),
                elapsed_us,
                generation,
                "objects applied"
            );
        } else {
            tracing::debug!(origin = %accepted[0], balanced_changed = balanced.len(), elapsed_us, generation, "object applied");
        }
        outcome_touched
    }

    /// What became of the API objects, when it differs from what was said last.
    fn outcome_changed(&mut self) -> Option<Outcome> {
        let status = self.agent.status.lock().expect("status lock");
        let refused = status
            .rejected
            .iter()
            .filter_map(|(origin, errors)| match origin {
                Origin::Api(object) => Some((object.clone(), errors.summary())),
                Origin::File(_) => None,
            })
            .collect();
        drop(status);
        let outcome = Outcome { routes: self.store.route_verdicts(), refused };
        if self.outcome.as_ref() == Some(&outcome) {
            return None;
        }
        self.outcome = Some(outcome.clone());
        Some(outcome)
    }

    /// The source has delivered everything once: the kernel may be told, readiness may follow.
    fn synced(&mut self) {
        self.read_all = true;
        self.agent.config_read.send_replace(true);
        let mut status = self.agent.status.lock().expect("status lock");
        status.synced_at = Some(status.generation);
        // The first sync compares everything, adopted state included.
        self.feed.publish(self.store.snapshot(), []);
        let (services, slices, routes) = self.store.counts();
        tracing::info!(services, slices, routes, generation = status.generation, "configuration read");
        // Reading everything once parsed far more than is kept: give the pages back.
        crate::host::release_free_memory();
    }
}
