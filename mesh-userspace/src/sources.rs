//! Where configuration comes from. Every source speaks the same language: typed Kubernetes
//! objects (k8s-openapi, gateway-api, Istio's security kinds) as per-object upserts and deletes, in batches that the
//! store applies whole or not at all.
//!
//! - `file`: multi-document YAML files or a directory of them, watched; one file is one batch,
//!   so a file is all-or-nothing.
//! - `kube`: the Kubernetes API (watchers); each object is applied on its own merits, so a bad
//!   object is rejected alone.
#![forbid(unsafe_code)]
pub mod file;
pub mod istio;
pub mod kube;

use std::{fmt, path::Path, sync::Arc};

use gateway_api::experimental::{grpcroutes::GrpcRoute, httproutes::HttpRoute};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};

/// Standalone: the annotation giving a pod's cgroup (its path under the cgroup v2 mount, as in
/// /proc/PID/cgroup). Files only: the Kubernetes source drops it.
pub const CGROUP_ANNOTATION: &str = "mesh.dev/cgroup";

/// Where an object came from, for error messages and for ownership (a file owns its objects).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Origin {
    /// Shared by every object of the file.
    File(Arc<Path>),
    /// An API object: itself.
    Api(ApiObject),
}

/// An object of the Kubernetes API, by kind and key: `Service default/web`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiObject {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ApiObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "{}", path.display()),
            Origin::Api(object) => object.fmt(f),
        }
    }
}

/// The kinds mesh reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
    /// Pods on this node: the workloads whose sockets the agent sees.
    Pod,
    /// For the enrollment label of their pods.
    Namespace,
    /// Istio's `security.istio.io` kinds.
    AuthorizationPolicy,
    PeerAuthentication,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::PeerAuthentication => "PeerAuthentication",
        })
    }
}

/// One typed object, shared (a source may keep it to diff the next read against).
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
    Pod(Arc<Pod>),
    Namespace(Arc<Namespace>),
    AuthorizationPolicy(Arc<istio::AuthorizationPolicy>),
    PeerAuthentication(Arc<istio::PeerAuthentication>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
            Object::Pod(_) => Kind::Pod,
            Object::Namespace(_) => Kind::Namespace,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::HttpRoute(o) => &o.metadata,
            Object::GrpcRoute(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::AuthorizationPolicy(o) => &o.metadata,
            Object::PeerAuthentication(o) => &o.metadata,
        }
    }

    /// `(namespace or "default", name)`; the name may be empty (validation rejects that).
    pub fn key(&self) -> (String, String) {
        let meta = self.metadata();
        let namespace = meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        (namespace, meta.name.clone().unwrap_or_default())
    }
}

/// One change a source saw.
#[derive(Debug, Clone)]
pub enum Change {
    Upsert { origin: Origin, object: Object },
    Delete { origin: Origin, kind: Kind, namespace: String, name: String },
}

impl Change {
    pub fn origin(&self) -> &Origin {
        match self {
            Change::Upsert { origin, .. } | Change::Delete { origin, .. } => origin,
        }
    }
}

/// One problem in one field of one object from one origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    /// `Service default/web`, or `document 3` when the object has no name yet.
    pub object: String,
    /// `spec.ports[0].port`; empty for a problem of the whole object or file.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.origin)?;
        // An API object is its own origin: named once.
        if !self.object.is_empty() && !matches!(&self.origin, Origin::Api(o) if o.to_string() == self.object) {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All the problems found in a batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Field and message of each error, for a place that already names the object (an Event).
    pub fn summary(&self) -> String {
        self.0
            .iter()
            .map(|e| if e.field.is_empty() { e.message.clone() } else { format!("{}: {}", e.field, e.message) })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// How many objects the errors name (at least one: a whole file unreadable is one).
    pub fn objects(&self) -> usize {
        let named: std::collections::BTreeSet<(&Origin, &str)> = self.0.iter().map(|e| (&e.origin, e.object.as_str())).collect();
        named.len().max(1)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// What a source hands the store.
#[derive(Debug)]
pub enum Update {
    /// Apply these changes together, or none of them.
    Batch { origin: Origin, changes: Vec<Change> },
    /// Apply each change on its own: a bad one is refused alone (its origin says why) and the
    /// rest applies, in one generation. `unreadable` are objects that did not parse.
    Each { changes: Vec<Change>, unreadable: Vec<(Origin, ConfigErrors)> },
    /// The origin could not be read or parsed: nothing of it changes, and the reason is shown.
    Unreadable { origin: Origin, errors: ConfigErrors },
    /// Everything the source holds has been delivered once (readiness may follow).
    Synced,
    /// Before `Synced`: the newest failure the source is waiting out (an API server that
    /// refuses or cannot be reached), for readiness to say until everything is read once.
    Waiting(Option<String>),
}

/// What mesh says of one accepted route, for its status: each parent Service (namespace, name)
/// and whether it exists, and the backend Services that do not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteVerdict {
    pub parents: Vec<((String, String), bool)>,
    pub unresolved: Vec<(String, String)>,
}

/// What became of a source's API objects, whole, for writing back where users look (route
/// status, Events).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    pub routes: std::collections::BTreeMap<ApiObject, RouteVerdict>,
    /// Refused objects and why.
    pub refused: std::collections::BTreeMap<ApiObject, String>,
}

/// A source of configuration: yields updates until it ends.
pub trait Source: Send {
    /// The next update; None when the source has stopped for good.
    fn next(&mut self) -> impl std::future::Future<Output = Option<Update>> + Send;

    /// Whether the store accepted the last `Update::Batch`: a source that diffs against what
    /// the store holds (files) needs to know.
    fn ack(&mut self, _accepted: bool) {}

    /// What became of the source's objects, after a change that may have changed it: a source
    /// may tell their owners (the Kubernetes source writes route status and Events).
    fn outcome(&mut self, _outcome: Outcome) {}
}
