//! The Kubernetes API source: a kube-rs watcher per kind, turned into per-object changes.
//!
//! - Objects are read as `DynamicObject`s and made typed here, one at a time, so an object that
//!   does not parse (a wrong field type) is refused alone: a typed list would fail whole.
//! - Only keys are kept (to find what a re-list no longer has), not objects: the store holds
//!   the compact form of what it needs.
//! - The first list is delivered a page at a time (the kernel is told nothing before every kind
//!   has been listed once); a re-list (after 410 Gone) as one `Update::Each` once complete, an
//!   atomic swap. What a list no longer has is removed only once it is complete, and an API
//!   server that is away removes nothing: the kernel keeps serving the last good state.
//! - A kind whose resource does not exist (Gateway API CRDs not installed) counts as empty and
//!   is looked for again with the watcher's backoff; it never holds readiness back.
#![forbid(unsafe_code)]
mod lease;
pub mod writeback;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    path::{Path, PathBuf},
    time::Duration,
};

use futures_util::StreamExt as _;
use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::DynamicObject,
    core::ApiResource,
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{ApiObject, Change, ConfigError, ConfigErrors, Kind, Object, Origin, Update};

/// Why the API source could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {0}: {1}")]
    Kubeconfig(PathBuf, #[source] kube::config::KubeconfigError),
    #[error("no Kubernetes configuration (in-cluster service account or KUBECONFIG): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("making the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// Watch events waiting for the source's reader; watchers wait when it is full.
const EVENT_QUEUE: usize = 256;
/// A watch is re-opened by the server every 290 s (kube's default); a connection silent for
/// longer than this is dead (an API server gone without a FIN).
const READ_TIMEOUT: Duration = Duration::from_secs(330);

/// Listed objects handed to the store together (kube-rs lists pages of 500).
const LIST_BATCH: usize = 500;

/// The kinds watched, in the order their first lists are awaited.
const KINDS: [Kind; 8] = [
    Kind::Service,
    Kind::EndpointSlice,
    Kind::HttpRoute,
    Kind::GrpcRoute,
    Kind::Pod,
    Kind::Namespace,
    Kind::AuthorizationPolicy,
    Kind::PeerAuthentication,
];

/// A client from `kubeconfig`, or inferred: in-cluster service account, then `KUBECONFIG` or
/// ~/.kube/config.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|e| KubeError::Kubeconfig(path.into(), e))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| KubeError::Kubeconfig(path.into(), e))?
        }
        None => kube::Config::infer().await.map_err(KubeError::Infer)?,
    };
    config.read_timeout = Some(READ_TIMEOUT);
    Client::try_from(config).map_err(KubeError::Client)
}

fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::HttpRoute => ApiResource::erase::<HttpRoute>(&()),
        Kind::GrpcRoute => ApiResource::erase::<GrpcRoute>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::AuthorizationPolicy => istio_resource("AuthorizationPolicy", "authorizationpolicies"),
        Kind::PeerAuthentication => istio_resource("PeerAuthentication", "peerauthentications"),
    }
}

/// Istio's kinds have no generated Rust resource: named here.
fn istio_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: super::istio::GROUP.into(),
        version: super::istio::VERSION.into(),
        api_version: format!("{}/{}", super::istio::GROUP, super::istio::VERSION),
        kind: kind.into(),
        plural: plural.into(),
    }
}

type Key = (String, String);

/// What one kind's watcher has delivered.
#[derive(Default)]
struct KindState {
    /// Objects the store was told of (accepted or refused): a re-list removes the others.
    known: HashSet<Key>,
    /// A list in progress: what it has returned so far.
    listing: Option<Listing>,
    /// Its first list is complete (or its resource does not exist).
    synced: bool,
    /// The watch is failing; said once, and once more when it recovers.
    failing: bool,
    /// The API server has no such resource (a CRD not installed); said once.
    absent: bool,
}

#[derive(Default)]
struct Listing {
    changes: Vec<Change>,
    unreadable: Vec<(Origin, ConfigErrors)>,
    seen: HashSet<Key>,
}

type WatchItem = Result<watcher::Event<DynamicObject>, watcher::Error>;

/// Watches Services, EndpointSlices, HTTPRoutes, GRPCRoutes and Namespaces, and the Pods of
/// this node.
pub struct KubeSource {
    watched: mpsc::Receiver<(Kind, WatchItem)>,
    kinds: HashMap<Kind, KindState>,
    ready: VecDeque<Update>,
    synced_sent: bool,
    /// What readiness was last told the source waits for.
    waiting: Option<String>,
    watchers: Vec<JoinHandle<()>>,
    writeback: writeback::Writeback,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

impl KubeSource {
    /// Starts the watchers (they connect in the background, with backoff). Route status and
    /// Events are written as this `node`'s agent, while it holds the Lease in `namespace`.
    ///
    /// Pods: this node's only, unless `all_pods` (mTLS: tunnels to other nodes' enrolled pods
    /// need their addresses, service accounts and nodes).
    pub fn new(client: Client, node: String, namespace: String, all_pods: bool) -> Self {
        let (tx, watched) = mpsc::channel(EVENT_QUEUE);
        let watchers = KINDS
            .into_iter()
            .map(|kind| {
                let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
                // Only this node's pods, unless tunnels need the others (their objects are
                // trimmed to a few fields as they arrive).
                let config = match kind {
                    Kind::Pod if !all_pods => watcher::Config::default().fields(&format!("spec.nodeName={node}")),
                    _ => watcher::Config::default(),
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
                    while let Some(item) = stream.next().await {
                        if tx.send((kind, item)).await.is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        Self {
            writeback: writeback::Writeback::new(client, node, namespace),
            watched,
            kinds: KINDS.into_iter().map(|k| (k, KindState::default())).collect(),
            ready: VecDeque::new(),
            synced_sent: false,
            waiting: None,
            watchers,
        }
    }

    fn handle(&mut self, kind: Kind, item: WatchItem) {
        let state = self.kinds.get_mut(&kind).expect("every kind has a state");
        let event = match item {
            Ok(event) => event,
            Err(e)
                if is_not_found(&e)
                    && matches!(kind, Kind::HttpRoute | Kind::GrpcRoute | Kind::AuthorizationPolicy | Kind::PeerAuthentication) =>
            {
                if !state.absent {
                    tracing::warn!(%kind, "the API server has no {kind} resource (CRD not installed?): none are served; looking again with backoff");
                }
                // An absent kind is an empty one: it does not hold readiness back.
                (state.absent, state.synced) = (true, true);
                self.maybe_synced();
                return;
            }
            Err(e) => {
                if !state.failing {
                    tracing::warn!(%kind, error = %e, "watching {kind}s failed; the last good state keeps serving while it retries with backoff");
                }
                state.failing = true;
                if !self.synced_sent {
                    // Readiness says what it waits for (RBAC missing, say), not just "not ready".
                    let reason = Some(format!("the API server's {kind}s: {e}"));
                    if self.waiting != reason {
                        self.waiting.clone_from(&reason);
                        self.ready.push_back(Update::Waiting(reason));
                    }
                }
                return;
            }
        };
        // `Init` only says a list is starting: it may fail yet.
        if !matches!(event, watcher::Event::Init) && std::mem::take(&mut state.failing) {
            tracing::info!(%kind, "watching {kind}s again");
        }
        if matches!(event, watcher::Event::InitDone) && std::mem::take(&mut state.absent) {
            tracing::info!(%kind, "the API server has the {kind} resource now");
        }
        match event {
            watcher::Event::Init => state.listing = Some(Listing::default()),
            watcher::Event::InitApply(object) => {
                let listing = state.listing.get_or_insert_with(Listing::default);
                let key = key_of(&object);
                listing.seen.insert(key);
                match typed(kind, object) {
                    Ok(change) => listing.changes.push(change),
                    Err(refused) => listing.unreadable.push(refused),
                }
                // The first list goes on a page at a time (nothing is served from it before
                // every kind is listed), so a big list is never held whole. A re-list is applied
                // whole once complete: an atomic swap of what changed while the agent was not
                // watching.
                if !state.synced && listing.changes.len() + listing.unreadable.len() >= LIST_BATCH {
                    let changes = std::mem::take(&mut listing.changes);
                    let unreadable = std::mem::take(&mut listing.unreadable);
                    self.ready.push_back(Update::Each { changes, unreadable });
                }
            }
            watcher::Event::InitDone => {
                let Listing { mut changes, unreadable, seen } = state.listing.take().unwrap_or_default();
                // Gone while the agent was not watching: removed now that the list is whole.
                for (namespace, name) in state.known.difference(&seen) {
                    let origin = origin(kind, namespace, name);
                    changes.push(Change::Delete { origin, kind, namespace: namespace.clone(), name: name.clone() });
                }
                tracing::info!(%kind, objects = seen.len(), removed = state.known.difference(&seen).count(), "listed {kind}s");
                state.known = seen;
                state.synced = true;
                self.ready.push_back(Update::Each { changes, unreadable });
                self.maybe_synced();
            }
            watcher::Event::Apply(object) => {
                state.known.insert(key_of(&object));
                let update = match typed(kind, object) {
                    Ok(change) => Update::Each { changes: vec![change], unreadable: Vec::new() },
                    Err(refused) => Update::Each { changes: Vec::new(), unreadable: vec![refused] },
                };
                self.ready.push_back(update);
            }
            watcher::Event::Delete(object) => {
                let (namespace, name) = key_of(&object);
                state.known.remove(&(namespace.clone(), name.clone()));
                let origin = origin(kind, &namespace, &name);
                self.ready
                    .push_back(Update::Each { changes: vec![Change::Delete { origin, kind, namespace, name }], unreadable: Vec::new() });
            }
        }
    }

    /// Once every kind has been listed, readiness may follow.
    fn maybe_synced(&mut self) {
        if !self.synced_sent && self.kinds.values().all(|s| s.synced) {
            self.synced_sent = true;
            self.ready.push_back(Update::Synced);
        }
    }
}

impl super::Source for KubeSource {
    async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(update) = self.ready.pop_front() {
                return Some(update);
            }
            let (kind, item) = self.watched.recv().await?;
            self.handle(kind, item);
        }
    }

    fn outcome(&mut self, outcome: super::Outcome) {
        self.writeback.publish(outcome);
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(status)) if status.code == 404)
}

fn key_of(object: &DynamicObject) -> Key {
    let namespace = object.metadata.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    (namespace, object.metadata.name.clone().unwrap_or_default())
}

/// An API object's origin: itself (`Service default/web`), so its refusal is its own.
pub fn origin(kind: Kind, namespace: &str, name: &str) -> Origin {
    Origin::Api(ApiObject { kind, namespace: namespace.to_owned(), name: name.to_owned() })
}

/// The typed object, with what mesh never reads (managed fields, the last applied
/// configuration, status) left out; or why it does not parse, naming the field.
fn typed(kind: Kind, mut object: DynamicObject) -> Result<Change, (Origin, ConfigErrors)> {
    let (namespace, name) = key_of(&object);
    let origin = origin(kind, &namespace, &name);
    object.metadata.managed_fields = None;
    if let Some(annotations) = object.metadata.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    if let Some(data) = object.data.as_object_mut() {
        match kind {
            Kind::Service => {
                data.remove("status");
            }
            // Of a pod mesh reads its node, service account, network mode, IPs and QoS class.
            // Its cgroup is found from its uid: a `mesh.dev/cgroup` annotation is for
            // standalone files only, since any pod's owner could point it at another's cgroup.
            Kind::Pod => {
                if let Some(annotations) = object.metadata.annotations.as_mut() {
                    annotations.remove(super::CGROUP_ANNOTATION);
                }
                if let Some(spec) = data.get_mut("spec").and_then(|s| s.as_object_mut()) {
                    spec.retain(|k, _| matches!(k.as_str(), "nodeName" | "serviceAccountName" | "hostNetwork"));
                    spec.insert("containers".into(), serde_json::Value::Array(Vec::new()));
                }
                if let Some(status) = data.get_mut("status").and_then(|s| s.as_object_mut()) {
                    status.retain(|k, _| matches!(k.as_str(), "podIP" | "podIPs" | "qosClass" | "phase" | "hostIP"));
                }
            }
            _ => {}
        }
    }
    fn parse<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(value).map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }
    let value = serde_json::to_value(&object).map_err(|e| (String::new(), e.to_string()));
    let parsed = value.and_then(|value| {
        Ok(match kind {
            Kind::Service => Object::Service(parse::<Service>(value)?.into()),
            Kind::EndpointSlice => Object::EndpointSlice(parse::<EndpointSlice>(value)?.into()),
            Kind::HttpRoute => Object::HttpRoute(parse::<HttpRoute>(value)?.into()),
            Kind::GrpcRoute => Object::GrpcRoute(parse::<GrpcRoute>(value)?.into()),
            Kind::Pod => Object::Pod(parse::<Pod>(value)?.into()),
            Kind::Namespace => Object::Namespace(parse::<Namespace>(value)?.into()),
            Kind::AuthorizationPolicy => Object::AuthorizationPolicy(parse::<super::istio::AuthorizationPolicy>(value)?.into()),
            Kind::PeerAuthentication => Object::PeerAuthentication(parse::<super::istio::PeerAuthentication>(value)?.into()),
        })
    });
    match parsed {
        Ok(object) => Ok(Change::Upsert { origin, object }),
        Err((field, message)) => {
            let field = if field == "." { String::new() } else { field };
            let error = ConfigError { origin: origin.clone(), object: String::new(), field, message };
            Err((origin, ConfigErrors(vec![error])))
        }
    }
}
