//! The validated, compact form of what sources deliver: the types every other part of the store
//! (and its consumers) speak. Nothing here knows where an object came from or how it is used.
use std::{fmt, net::IpAddr, time::Duration};

use serde::Serialize;

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

/// As `namespace/name`.
impl Serialize for ObjectKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    /// Accepted in configuration, not balanced: the socket hooks see TCP and UDP only.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    pub fn ip_proto(self) -> u8 {
        match self {
            Protocol::Tcp => mesh_common::IPPROTO_TCP,
            Protocol::Udp => mesh_common::IPPROTO_UDP,
            Protocol::Sctp => 132,
        }
    }

    pub fn from_ip_proto(proto: u8) -> Option<Self> {
        match proto {
            mesh_common::IPPROTO_TCP => Some(Protocol::Tcp),
            mesh_common::IPPROTO_UDP => Some(Protocol::Udp),
            132 => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Family {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    #[default]
    Random,
    Maglev,
}

/// Where this agent runs, for node-local and zone rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeContext {
    pub node: String,
    pub zone: Option<String>,
}

/// Linkerd-style retry budget of a Service: over a window, retries may add at most `ratio` of
/// the requests plus `min_per_second`. Set by `mesh.dev/retry-budget-*` annotations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetPolicy {
    pub ratio: f64,
    pub min_per_second: f64,
}

impl Default for RetryBudgetPolicy {
    fn default() -> Self {
        Self { ratio: 0.2, min_per_second: 10.0 }
    }
}

/// Outlier ejection knobs, from `mesh.dev/outlier-*` Service annotations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EjectionPolicy {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejected_share: f64,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self { consecutive_failures: 5, base_ejection: Duration::from_secs(10), max_ejected_share: 0.5 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// "" for the single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub app_protocol: AppProtocol,
}

/// What a Service port speaks over TCP, as its `appProtocol` (or, Istio's convention, its
/// name's prefix) says: the HTTP version the proxy uses toward its endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppProtocol {
    /// `kubernetes.io/h2c`, `grpc`, `http2`, `h2c`: HTTP/2 with prior knowledge.
    H2c,
    /// `http`, `kubernetes.io/http`: HTTP/1.1.
    Http1,
    /// Not said: HTTP/1.1, except gRPC requests (they need HTTP/2).
    #[default]
    Unknown,
}

impl AppProtocol {
    pub fn of_port(app_protocol: Option<&str>, name: &str) -> Self {
        let said = app_protocol.unwrap_or_else(|| name.split('-').next().unwrap_or_default());
        match said.to_ascii_lowercase().as_str() {
            "kubernetes.io/h2c" | "grpc" | "http2" | "h2c" => AppProtocol::H2c,
            "http" | "kubernetes.io/http" => AppProtocol::Http1,
            _ => AppProtocol::Unknown,
        }
    }
}

/// A Service, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub key: ObjectKey,
    /// Empty for headless and ExternalName services, which mesh does not balance.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePortSpec>,
    /// `Some(timeout)` for `sessionAffinity: ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local`.
    pub node_local: bool,
    /// `trafficDistribution: PreferClose` (or its newer name PreferSameZone).
    pub prefer_same_zone: bool,
    pub algorithm: Algorithm,
    /// `mesh.dev/l7: "true"`: proxied even without an HTTPRoute.
    pub l7: bool,
    pub retry_budget: RetryBudgetPolicy,
    pub outlier: EjectionPolicy,
    /// `mesh.dev/rate-limit-*`: requests to this Service through this node's proxy.
    pub rate_limit: Option<RateLimitPolicy>,
    /// `mesh.dev/max-requests*`, `max-connections`, `max-pending-requests`: what this Service,
    /// as a backend, takes at once.
    pub breakers: CircuitBreakers,
}

/// A local token bucket (Envoy's local rate limit): `per_second` tokens a second, up to
/// `burst` saved; a request takes one or is answered 429.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimitPolicy {
    pub per_second: f64,
    pub burst: f64,
}

/// Envoy's circuit breakers, per backend Service and this node's proxy: past them a request is
/// answered 503 (flag UO) at once instead of queueing on an overloaded backend. None: no limit
/// (Istio's default too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CircuitBreakers {
    /// Requests in flight to the Service (`mesh.dev/max-requests`).
    pub max_requests: Option<u32>,
    /// Requests in flight to one endpoint (`mesh.dev/max-requests-per-endpoint`): with HTTP/1.1,
    /// one connection each, so it also caps the connections to an endpoint.
    pub max_requests_per_endpoint: Option<u32>,
    /// Connections open to the Service's endpoints (`mesh.dev/max-connections`). A request
    /// that finds none idle and the maximum open waits for one to close (a pending request).
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection at once (`mesh.dev/max-pending-requests`; without it,
    /// none wait: at `max_connections` a request with no idle connection is refused).
    pub max_pending_requests: Option<u32>,
}

/// One endpoint of a slice: what kube-proxy's rules and telemetry need, nothing more. 32
/// bytes: a cluster holds one per endpoint, and most endpoints have neither zone hints nor
/// a pod name worth an allocation of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Whether `nodeName` is this agent's node (the name itself is not kept).
    pub local: bool,
    pub extra: Option<Box<EndpointExtra>>,
}

/// The rarer parts of an endpoint, boxed together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EndpointExtra {
    /// `hints.forZones`, `None` when the endpoint has no hints.
    pub zone_hints: Option<Box<[String]>>,
    /// `targetRef.name` (the pod), for telemetry.
    pub workload: Option<Box<str>>,
}

impl EndpointSpec {
    pub fn zone_hints(&self) -> Option<&[String]> {
        self.extra.as_ref()?.zone_hints.as_deref()
    }

    pub fn workload(&self) -> Option<&str> {
        self.extra.as_ref()?.workload.as_deref()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePortSpec {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An EndpointSlice, validated. FQDN slices are kept out (kube-proxy ignores them too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    pub key: ObjectKey,
    /// The Service it belongs to (its `kubernetes.io/service-name` label, same namespace).
    pub service: ObjectKey,
    pub family: Family,
    pub endpoints: Vec<EndpointSpec>,
    pub ports: Vec<SlicePortSpec>,
}

/// A pod's Kubernetes QoS class: where kubelet puts its cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

/// Whether a pod gets the L7 and (next) mTLS treatment: its own `mesh.dev/dataplane` label if
/// it has one, else its namespace's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Enrollment {
    Enabled,
    Disabled,
    /// The pod says nothing: its namespace decides.
    Inherit,
}

/// A pod, validated: who it is and where it runs. Pods of this node are the agent's to
/// enroll; pods of other nodes are where tunnels go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub key: ObjectKey,
    pub uid: String,
    /// The workload it belongs to (its name less the controllers' suffixes).
    pub workload: String,
    pub service_account: String,
    /// For policy selectors (next issues).
    pub labels: std::collections::BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    pub qos: Option<QosClass>,
    pub enrollment: Enrollment,
    /// On this agent's node (or on no node: standalone files describe this host's pods).
    pub local: bool,
    /// `status.hostIP`: where the pod's node, and its agent, are reached.
    pub host_ip: Option<IpAddr>,
    /// Standalone: the pod's cgroup, given by the `mesh.dev/cgroup` annotation (a path under
    /// the cgroup v2 mount); on Kubernetes, found from the uid and QoS class.
    pub cgroup: Option<std::path::PathBuf>,
}

/// A pod as consumers see it: its spec and whether it is enrolled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub spec: std::sync::Arc<PodSpec>,
    pub enrolled: bool,
}

impl Workload {
    /// The workload's identity in SPIFFE form, as Istio and ztunnel write it.
    pub fn principal(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.spec.key.namespace, self.spec.service_account)
    }

    /// The workload's identity (None when its names are not valid in one).
    pub fn identity(&self, trust_domain: &str) -> Option<crate::identity::Identity> {
        crate::identity::Identity::new(trust_domain, &self.spec.key.namespace, &self.spec.service_account).ok()
    }
}

/// A problem in one field of an object (the path is relative to the object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

pub fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError { field: field.into(), message: message.into() }
}

/// A pod's workload name, as Istio derives it without the pod object: a Deployment's pod
/// `web-7d4f8b9c6-x2x9k` is `web`, a StatefulSet's `db-0` is `db`; anything else is itself.
pub fn workload_of_pod(pod: &str) -> String {
    let parts: Vec<&str> = pod.split('-').collect();
    let alnum = |s: &str, lens: std::ops::RangeInclusive<usize>| {
        lens.contains(&s.len()) && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    };
    match parts.as_slice() {
        [head @ .., hash, id] if !head.is_empty() && alnum(hash, 6..=10) && alnum(id, 5..=5) => head.join("-"),
        [head @ .., ordinal] if !head.is_empty() && !ordinal.is_empty() && ordinal.chars().all(|c| c.is_ascii_digit()) => head.join("-"),
        _ => pod.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ports_protocol_comes_from_app_protocol_else_from_its_name() {
        assert_eq!(AppProtocol::of_port(Some("kubernetes.io/h2c"), "web"), AppProtocol::H2c);
        assert_eq!(AppProtocol::of_port(Some("kubernetes.io/http"), "grpc"), AppProtocol::Http1, "appProtocol wins");
        assert_eq!(AppProtocol::of_port(None, "grpc-api"), AppProtocol::H2c);
        assert_eq!(AppProtocol::of_port(None, "http-metrics"), AppProtocol::Http1);
        assert_eq!(AppProtocol::of_port(None, "web"), AppProtocol::Unknown);
        assert_eq!(AppProtocol::of_port(None, ""), AppProtocol::Unknown);
    }
}
