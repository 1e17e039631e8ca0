//! Writes back where Kubernetes users look: route status (`Accepted`, `ResolvedRefs` for each
//! parent Service, under mesh's controller name) and Warning Events on refused objects.
//! Every agent reaches the same verdicts, so one writes: the holder of a Lease. It writes what
//! changed since it last wrote (all of it when it becomes the holder), at most `MAX_WRITES` a
//! round; what failed is tried again the next round. An object's same refusal is not written
//! again, and one that comes back within a minute is not written again either.
use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant},
};

use kube::{
    Api, Client,
    api::{DynamicObject, PostParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::{Value, json};
use tokio::{sync::watch, task::JoinHandle};

use super::{api_resource, lease::Lease};
use crate::sources::{ApiObject, Kind, Outcome, RouteVerdict};

/// The `controllerName` of mesh's entries in route status.
pub const CONTROLLER: &str = "mesh.dev/agent";
/// The Lease, in the agent's namespace.
const LEASE: &str = "mesh-status-writer";
/// A refusal that went and came back within this is not written again.
const REPEAT_AFTER: Duration = Duration::from_secs(60);
/// Writes in one round; the rest wait for the next (a round per change or per lease renewal).
const MAX_WRITES: usize = 100;
/// The API's limit on an Event's note.
const NOTE_MAX: usize = 1024;

pub struct Writeback {
    outcome: watch::Sender<Outcome>,
    task: JoinHandle<()>,
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Writeback {
    /// Starts competing for the lease in `namespace` as this `node`'s agent.
    pub fn new(client: Client, node: String, namespace: String) -> Self {
        let outcome = watch::Sender::new(Outcome::default());
        let task = tokio::spawn(run(client, node, namespace, outcome.subscribe()));
        Self { outcome, task }
    }

    /// The newest outcome; never waits.
    pub fn publish(&self, outcome: Outcome) {
        self.outcome.send_replace(outcome);
    }
}

/// What a route's status says.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RouteState {
    Accepted(RouteVerdict),
    Refused(String),
}

async fn run(client: Client, node: String, namespace: String, mut outcome: watch::Receiver<Outcome>) {
    let identity = format!("{node}-{:08x}", fastrand::u32(..));
    let mut lease = Lease::new(client.clone(), &namespace, LEASE, identity);
    let recorder = Recorder::new(client.clone(), Reporter { controller: "mesh-agent".into(), instance: Some(node) });
    let mut routes_written: HashMap<ApiObject, RouteState> = HashMap::new();
    let mut events_written: HashMap<ApiObject, (String, Instant)> = HashMap::new();
    let (mut leader, mut holder_said, mut failing) = (false, None::<String>, false);
    let mut renew = tokio::time::interval(super::lease::RENEW_EVERY);
    loop {
        tokio::select! {
            _ = renew.tick() => {
                match lease.hold().await {
                    Ok(holder) => {
                        if holder_said.as_ref() != Some(&holder) {
                            if holder == lease.identity() {
                                tracing::info!(lease = %format!("{namespace}/{LEASE}"), "this agent writes route status and Events now");
                            } else {
                                tracing::info!(lease = %format!("{namespace}/{LEASE}"), %holder, "another agent writes route status and Events");
                            }
                            holder_said = Some(holder.clone());
                        }
                        leader = holder == lease.identity();
                        failing = false;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(lease = %format!("{namespace}/{LEASE}"), error = %e, "reading the status writer's Lease; retrying");
                        }
                        (leader, failing) = (false, true);
                    }
                }
                if !leader {
                    // Whoever holds it writes; when this agent holds it again, it writes all.
                    routes_written.clear();
                }
            }
            changed = outcome.changed() => if changed.is_err() { return },
        }
        if !leader {
            continue;
        }
        let current = outcome.borrow_and_update().clone();
        let mut budget = MAX_WRITES;
        write_routes(&client, &current, &mut routes_written, &mut budget).await;
        write_events(&client, &recorder, &current.refused, &mut events_written, &mut budget).await;
    }
}

async fn write_routes(client: &Client, outcome: &Outcome, written: &mut HashMap<ApiObject, RouteState>, budget: &mut usize) {
    let mut wanted: BTreeMap<&ApiObject, RouteState> =
        outcome.routes.iter().map(|(object, verdict)| (object, RouteState::Accepted(verdict.clone()))).collect();
    for (object, note) in &outcome.refused {
        if matches!(object.kind, Kind::HttpRoute | Kind::GrpcRoute) {
            wanted.insert(object, RouteState::Refused(note.clone()));
        }
    }
    written.retain(|object, _| wanted.contains_key(object));
    for (object, state) in wanted {
        if written.get(object) == Some(&state) || *budget == 0 {
            continue;
        }
        *budget -= 1;
        match write_route_status(client, object, &state).await {
            Ok(()) => {
                written.insert(object.clone(), state);
            }
            Err(e) => tracing::warn!(%object, error = %e, "writing route status; trying again later"),
        }
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str, generation: Option<i64>) -> Value {
    json!({
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "observedGeneration": generation.unwrap_or(0),
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    })
}

fn parent_ref(namespace: &str, name: &str) -> Value {
    json!({"group": "", "kind": "Service", "namespace": namespace, "name": name})
}

/// Reads the route, replaces mesh's entries of `status.parents` (others' stay), and writes
/// the status back if it changed (the resourceVersion read guards against a concurrent write).
async fn write_route_status(client: &Client, object: &ApiObject, state: &RouteState) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &object.namespace, &api_resource(object.kind));
    let Some(mut route) = api.get_opt(&object.name).await? else { return Ok(()) };
    let generation = route.metadata.generation;
    let ours: Vec<Value> = match state {
        RouteState::Accepted(verdict) => verdict
            .parents
            .iter()
            .map(|((namespace, name), exists)| {
                let accepted = if *exists {
                    condition("Accepted", true, "Accepted", "mesh routes requests to this Service", generation)
                } else {
                    condition("Accepted", false, "NoMatchingParent", &format!("Service {namespace}/{name} does not exist"), generation)
                };
                let resolved = if verdict.unresolved.is_empty() {
                    condition("ResolvedRefs", true, "ResolvedRefs", "every backend Service exists", generation)
                } else {
                    let missing: Vec<String> = verdict.unresolved.iter().map(|(n, s)| format!("{n}/{s}")).collect();
                    condition(
                        "ResolvedRefs",
                        false,
                        "BackendNotFound",
                        &format!("backend Services not found: {}", missing.join(", ")),
                        generation,
                    )
                };
                json!({"parentRef": parent_ref(namespace, name), "controllerName": CONTROLLER, "conditions": [accepted, resolved]})
            })
            .collect(),
        RouteState::Refused(note) => route.data["spec"]["parentRefs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["kind"] == "Service" && p["group"].as_str().is_none_or(|g| g.is_empty() || g == "core"))
            .map(|p| {
                let namespace = p["namespace"].as_str().unwrap_or(&object.namespace);
                let name = p["name"].as_str().unwrap_or_default();
                let accepted = condition("Accepted", false, "UnsupportedValue", &truncate(note, NOTE_MAX), generation);
                let resolved = condition("ResolvedRefs", false, "Invalid", "the route was not accepted", generation);
                json!({"parentRef": parent_ref(namespace, name), "controllerName": CONTROLLER, "conditions": [accepted, resolved]})
            })
            .collect(),
    };
    let existing: Vec<Value> = route.data["status"]["parents"].as_array().cloned().unwrap_or_default();
    let mut parents: Vec<Value> = existing.iter().filter(|p| p["controllerName"] != CONTROLLER).cloned().collect();
    for mut entry in ours {
        // A condition whose status did not change keeps its transition time.
        let before = existing.iter().find(|p| p["controllerName"] == CONTROLLER && p["parentRef"] == entry["parentRef"]);
        if let (Some(before), Some(conditions)) = (before, entry["conditions"].as_array_mut()) {
            for c in conditions {
                let old =
                    before["conditions"].as_array().into_iter().flatten().find(|o| o["type"] == c["type"] && o["status"] == c["status"]);
                if let Some(old) = old {
                    c["lastTransitionTime"] = old["lastTransitionTime"].clone();
                }
            }
        }
        parents.push(entry);
    }
    if parents == existing {
        return Ok(());
    }
    if !route.data["status"].is_object() {
        route.data["status"] = json!({});
    }
    route.data["status"]["parents"] = Value::Array(parents);
    api.replace_status(&object.name, &PostParams::default(), &route).await?;
    Ok(())
}

async fn write_events(
    client: &Client,
    recorder: &Recorder,
    refused: &BTreeMap<ApiObject, String>,
    written: &mut HashMap<ApiObject, (String, Instant)>,
    budget: &mut usize,
) {
    written.retain(|object, (_, at)| refused.contains_key(object) || at.elapsed() < REPEAT_AFTER);
    for (object, note) in refused {
        if written.get(object).is_some_and(|(said, _)| said == note) || *budget == 0 {
            continue;
        }
        *budget -= 1;
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
            note: Some(truncate(&format!("mesh does not serve it: {note}"), NOTE_MAX)),
            action: "Apply".into(),
            secondary: None,
        };
        match recorder.publish(&event, &reference).await {
            Ok(()) => {
                written.insert(object.clone(), (note.clone(), Instant::now()));
            }
            Err(e) => tracing::warn!(%object, error = %e, "writing a Kubernetes Event; trying again later"),
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
