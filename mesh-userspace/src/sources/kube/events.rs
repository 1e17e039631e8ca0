//! Kubernetes Events on refused objects: where a kubectl user looks (`kubectl describe`,
//! `kubectl get events`). kube-runtime's recorder aggregates repeats into an event series;
//! on top of it, one object's same refusal is written at most once a minute, and the queue is
//! bounded: a flood of bad objects costs the API server a bounded number of writes, and the
//! agent's log and readiness still say everything.
use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::DynamicObject,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::{sync::mpsc, task::JoinHandle};

use super::api_resource;
use crate::sources::ApiObject;

/// Refusals waiting to be written; more are dropped (and counted in the log).
const QUEUE: usize = 256;
/// The same refusal of the same object is written again at most this often.
const REPEAT_EVERY: Duration = Duration::from_secs(60);
/// The API's limit on an Event's note.
const NOTE_MAX: usize = 1024;

pub struct Events {
    tx: mpsc::Sender<(ApiObject, String)>,
    dropped: u64,
    task: JoinHandle<()>,
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Events {
    /// Writes as `mesh-agent`, instance `node`.
    pub fn new(client: Client, node: String) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(write(client, node, rx));
        Self { tx, dropped: 0, task }
    }

    /// Queues a Warning event `Rejected` on `object`; never waits.
    pub fn refused(&mut self, object: &ApiObject, note: String) {
        if self.tx.try_send((object.clone(), note)).is_err() {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = self.dropped,
                    "too many refusals to write as Kubernetes Events; the log and readiness have them all"
                );
            }
        }
    }
}

async fn write(client: Client, node: String, mut rx: mpsc::Receiver<(ApiObject, String)>) {
    let recorder = Recorder::new(client.clone(), Reporter { controller: "mesh-agent".into(), instance: Some(node) });
    let mut written: HashMap<(ApiObject, String), Instant> = HashMap::new();
    while let Some((object, note)) = rx.recv().await {
        let key = (object, note);
        if written.get(&key).is_some_and(|at| at.elapsed() < REPEAT_EVERY) {
            continue;
        }
        if written.len() >= QUEUE {
            written.retain(|_, at| at.elapsed() < REPEAT_EVERY);
        }
        let (object, note) = &key;
        let resource = api_resource(object.kind);
        // The uid ties the Event to this object (kubectl describe matches on it).
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &object.namespace, &resource);
        let uid = match api.get_opt(&object.name).await {
            Ok(Some(current)) => current.metadata.uid,
            Ok(None) => continue, // deleted meanwhile
            Err(e) => {
                tracing::debug!(%object, error = %e, "reading the refused object for its uid");
                None
            }
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(resource.api_version.clone()),
            kind: Some(resource.kind.clone()),
            namespace: Some(object.namespace.clone()),
            name: Some(object.name.clone()),
            uid,
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "Rejected".into(),
            note: Some(truncate(note, NOTE_MAX)),
            action: "Apply".into(),
            secondary: None,
        };
        match recorder.publish(&event, &reference).await {
            Ok(()) => {
                written.insert(key, Instant::now());
            }
            Err(e) => tracing::warn!(%object, error = %e, "writing a Kubernetes Event"),
        }
    }
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}
