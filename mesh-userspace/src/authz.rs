//! Authorization decisions from the snapshot's AuthorizationPolicies, in Istio's order: a
//! matching DENY denies; with no ALLOW policy selecting the workload, allow; a matching ALLOW
//! allows; otherwise deny. AUDIT policies that match are logged and counted, nothing more.
//!
//! Which policies apply to a workload (those of its namespace and of the root namespace whose
//! selector matches its labels) is worked out once per workload and policy set and cached, so
//! a decision costs the applicable rules only, whatever the number of policies.
#![forbid(unsafe_code)]
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use serde::Serialize;

use crate::{
    identity::Identity,
    state::{
        ObjectKey, Protocol, Snapshot,
        model::{PodSpec, Workload},
        policy::{Action, Attributes, Peer, Policies, PolicySpec, Request},
    },
    telemetry::metrics::{AuthzLabels, AuthzMetrics},
};

/// Istio's default root namespace: its policies apply to every namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Why a decision went the way it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// No ALLOW or DENY policy selects the workload.
    NoPolicy,
    DenyMatched,
    AllowMatched,
    /// ALLOW policies select the workload and none matched.
    NoAllowMatched,
    /// No workload is known at the destination.
    UnknownDestination,
}

/// A decision and what made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The policy that matched (None for `NoPolicy` and `NoAllowMatched`).
    pub policy: Option<ObjectKey>,
    /// Its rule, by index in `spec.rules`.
    pub rule: Option<usize>,
    /// AUDIT policies that matched.
    pub audited: Vec<ObjectKey>,
}

impl Decision {
    /// Denied: the destination is no workload known here.
    pub fn unknown_destination() -> Self {
        Decision { allowed: false, reason: Reason::UnknownDestination, policy: None, rule: None, audited: Vec::new() }
    }

    pub fn verdict(&self) -> &'static str {
        if self.allowed { "allow" } else { "deny" }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = |f: &mut fmt::Formatter<'_>| match (&self.policy, self.rule) {
            (Some(p), Some(r)) => write!(f, "AuthorizationPolicy {p} rules[{r}]"),
            (Some(p), None) => write!(f, "AuthorizationPolicy {p}"),
            _ => Ok(()),
        };
        match self.reason {
            Reason::NoPolicy => f.write_str("allowed: no AuthorizationPolicy selects the destination"),
            Reason::DenyMatched => {
                f.write_str("denied by ")?;
                by(f)
            }
            Reason::AllowMatched => {
                f.write_str("allowed by ")?;
                by(f)
            }
            Reason::NoAllowMatched => f.write_str("denied: ALLOW policies select the destination and no rule of theirs matches"),
            Reason::UnknownDestination => f.write_str("denied: the destination is no known workload"),
        }
    }
}

/// The policies that select one workload, by action.
#[derive(Debug, Default)]
pub struct Applicable {
    pub deny: Vec<Arc<PolicySpec>>,
    pub allow: Vec<Arc<PolicySpec>>,
    pub audit: Vec<Arc<PolicySpec>>,
}

impl Applicable {
    /// The policies that decide (DENY, then ALLOW); AUDIT only logs.
    pub fn deciding(&self) -> impl Iterator<Item = &Arc<PolicySpec>> {
        self.deny.iter().chain(&self.allow)
    }

    pub fn of(policies: &Policies, root_namespace: &str, namespace: &str, labels: &std::collections::BTreeMap<String, String>) -> Self {
        let mut applicable = Applicable::default();
        let mut namespaces = vec![namespace];
        if namespace != root_namespace {
            namespaces.push(root_namespace);
        }
        for p in namespaces.into_iter().filter_map(|ns| policies.authorization.get(ns)).flatten() {
            if p.selects(labels) {
                match p.action {
                    Action::Deny => applicable.deny.push(p.clone()),
                    Action::Allow => applicable.allow.push(p.clone()),
                    Action::Audit => applicable.audit.push(p.clone()),
                }
            }
        }
        applicable
    }

    /// Whether any ALLOW or DENY policy selects the workload.
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    pub fn decide(&self, attrs: &Attributes<'_>) -> Decision {
        let first = |list: &[Arc<PolicySpec>]| list.iter().find_map(|p| p.matching_rule(attrs).map(|r| (p.key.clone(), r)));
        let audited = self.audit.iter().filter(|p| p.matching_rule(attrs).is_some()).map(|p| p.key.clone()).collect();
        let (allowed, reason, matched) = if let Some(hit) = first(&self.deny) {
            (false, Reason::DenyMatched, Some(hit))
        } else if self.allow.is_empty() {
            (true, Reason::NoPolicy, None)
        } else if let Some(hit) = first(&self.allow) {
            (true, Reason::AllowMatched, Some(hit))
        } else {
            (false, Reason::NoAllowMatched, None)
        };
        let (policy, rule) = matched.map_or((None, None), |(p, r)| (Some(p), Some(r)));
        Decision { allowed, reason, policy, rule, audited }
    }
}

/// Who is asking, as decisions need it.
#[derive(Debug, Clone)]
pub struct Caller {
    principal: String,
    namespace: String,
    service_account: String,
}

impl Caller {
    pub fn of(identity: &Identity) -> Self {
        Self {
            principal: format!("{}/ns/{}/sa/{}", identity.trust_domain, identity.namespace, identity.service_account),
            namespace: identity.namespace.clone(),
            service_account: format!("{}/{}", identity.namespace, identity.service_account),
        }
    }

    /// `trust-domain/ns/<ns>/sa/<sa>`, as policies write it.
    pub fn principal(&self) -> String {
        self.principal.clone()
    }

    pub fn peer(&self) -> Peer<'_> {
        Peer { principal: &self.principal, namespace: &self.namespace, service_account: &self.service_account }
    }
}

/// A connection (or request) to decide on.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub caller: Option<&'a Caller>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    pub port: u16,
    pub request: Option<Request<'a>>,
    /// The source's proxy checked the requests (see `Attributes::l7_checked`).
    pub l7_checked: bool,
}

impl<'a> Ask<'a> {
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            source: self.caller.map(Caller::peer),
            source_ip: self.source_ip,
            destination_ip: self.destination_ip,
            port: self.port,
            request: self.request,
            l7_checked: self.l7_checked,
        }
    }
}

/// Where a decision is made, for the metric's `reporter` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// The agent in front of the destination workload.
    Destination,
    /// The caller's agent, refusing early.
    Source,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Destination => "destination",
            Reporter::Source => "source",
        }
    }
}

/// Decides with a per-workload cache of applicable policies, and counts decisions.
pub struct Authorizer {
    root_namespace: String,
    metrics: AuthzMetrics,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    /// The policy set the entries were made from.
    policies: Option<Arc<Policies>>,
    /// Pod -> (the spec the entry was made for, its policies).
    by_pod: HashMap<ObjectKey, (Arc<PodSpec>, Arc<Applicable>)>,
}

/// Bound on cached workloads: a node runs a few hundred pods; peers decided on at the source
/// are cached too, and a cluster may have many.
const CACHE_CAPACITY: usize = 16_384;

impl Authorizer {
    pub fn new(root_namespace: impl Into<String>, metrics: AuthzMetrics) -> Self {
        Self { root_namespace: root_namespace.into(), metrics, cache: Mutex::default() }
    }

    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// The policies that select `workload`, from `policies` (cached).
    pub fn applicable(&self, policies: &Arc<Policies>, workload: &Workload) -> Arc<Applicable> {
        let spec = &workload.spec;
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !cache.policies.as_ref().is_some_and(|p| Arc::ptr_eq(p, policies)) {
            cache.policies = Some(policies.clone());
            cache.by_pod.clear();
        }
        if let Some((cached_spec, applicable)) = cache.by_pod.get(&spec.key)
            && Arc::ptr_eq(cached_spec, spec)
        {
            return applicable.clone();
        }
        let applicable = Arc::new(Applicable::of(policies, &self.root_namespace, &spec.key.namespace, &spec.labels));
        if cache.by_pod.len() >= CACHE_CAPACITY {
            cache.by_pod.clear();
        }
        cache.by_pod.insert(spec.key.clone(), (spec.clone(), applicable.clone()));
        applicable
    }

    /// Decides on `ask` to `workload`, counting the decision as `reporter`'s.
    pub fn decide(&self, policies: &Arc<Policies>, workload: &Workload, ask: &Ask<'_>, reporter: Reporter) -> Decision {
        let decision = self.applicable(policies, workload).decide(&ask.attributes());
        self.count(&decision, reporter);
        for audited in &decision.audited {
            tracing::info!(policy = %audited, destination = %workload.spec.key, port = ask.port, caller = ?ask.caller.map(|c| &c.principal), decision = decision.verdict(), "AUDIT policy matched");
        }
        decision
    }

    fn count(&self, decision: &Decision, reporter: Reporter) {
        let policy = decision.policy.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string);
        let labels = AuthzLabels { decision: decision.verdict().into(), policy, reporter: reporter.as_str().into() };
        self.metrics.decisions.get_or_create(&labels).inc();
    }
}

/// Why `check` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{0}")]
    BadQuery(String),
    #[error("{0}")]
    NotFound(String),
}

/// `mesh authz check`, as the admin API's `GET /authz?from=NS/SA&to=NS/NAME|IP&port=N[&method=
/// &path=&host=&source_ip=]`: what the live policies decide for a caller (none: plaintext) and
/// each workload behind `to` (a Service's endpoints, or one pod), not counted as a decision.
pub fn check(authorizer: &Authorizer, snapshot: &Snapshot, trust_domain: &str, query: &str) -> Result<serde_json::Value, CheckError> {
    let params: HashMap<String, String> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let bad = |m: String| CheckError::BadQuery(m);
    let caller = match params.get("from").map(String::as_str) {
        None | Some("") => None,
        Some(from) => {
            let (ns, sa) = from.split_once('/').ok_or_else(|| bad(format!("--from {from:?}: expected NAMESPACE/SERVICEACCOUNT")))?;
            Some(Caller::of(&Identity::new(trust_domain, ns, sa).map_err(|e| bad(format!("--from {from:?}: {e}")))?))
        }
    };
    let to = params
        .get("to")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("--to is needed: a Service or pod (NAMESPACE/NAME) or an address".into()))?;
    let port = params.get("port").and_then(|p| p.parse::<u16>().ok()).ok_or_else(|| bad("a port is needed: --to NAME:PORT".into()))?;
    let source_ip = match params.get("source_ip").filter(|s| !s.is_empty()) {
        Some(ip) => Some(ip.parse().map_err(|_| bad(format!("--source-ip {ip:?} is not an address")))?),
        None => None,
    };
    let (method, path, host) = (params.get("method"), params.get("path"), params.get("host"));
    let request = (method.is_some() || path.is_some() || host.is_some()).then(|| Request {
        method: method.map_or("GET", String::as_str),
        path: path.map_or("/", String::as_str),
        host: host.map_or("", String::as_str),
    });
    let rows: Vec<serde_json::Value> = targets(snapshot, to, port)?
        .iter()
        .map(|(workload, target)| {
            let ask =
                Ask { caller: caller.as_ref(), source_ip, destination_ip: target.ip(), port: target.port(), request, l7_checked: false };
            let decision = authorizer.applicable(&snapshot.policies, workload).decide(&ask.attributes());
            serde_json::json!({
                "pod": workload.spec.key,
                "address": target.to_string(),
                "decision": decision.verdict(),
                "reason": decision.reason,
                "policy": decision.policy,
                "rule": decision.rule,
                "audited": decision.audited,
                "explanation": decision.to_string(),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "from": caller.as_ref().map_or_else(|| "plaintext (no identity)".to_owned(), Caller::principal),
        "to": to,
        "port": port,
        "root_namespace": authorizer.root_namespace(),
        "generation": snapshot.generation,
        "decisions": rows,
    }))
}

/// The workloads behind `to` and the address each is reached at: a Service's endpoints on its
/// port `port`, a pod (this node's or a peer's) by name, or a pod by address.
fn targets(snapshot: &Snapshot, to: &str, port: u16) -> Result<Vec<(Arc<Workload>, SocketAddr)>, CheckError> {
    let by_ip = |ip: &IpAddr| snapshot.pods_by_ip.get(ip).or_else(|| snapshot.peers.get(ip)).cloned();
    if let Ok(ip) = to.parse::<IpAddr>() {
        let workload = by_ip(&ip).ok_or_else(|| CheckError::NotFound(format!("no pod is known at {ip}")))?;
        return Ok(vec![(workload, SocketAddr::new(ip, port))]);
    }
    let (namespace, name) =
        to.split_once('/').ok_or_else(|| CheckError::BadQuery(format!("--to {to:?}: expected NAMESPACE/NAME or an address")))?;
    let key = ObjectKey::new(namespace, name);
    if let Some(service) = snapshot.services.get(&key) {
        let ports: Vec<_> = service.ports.iter().filter(|p| p.frontend.port() == port && p.key.protocol == Protocol::Tcp).collect();
        if ports.is_empty() {
            return Err(CheckError::NotFound(format!("Service {key} has no TCP port {port}")));
        }
        let mut found: Vec<(Arc<Workload>, SocketAddr)> = Vec::new();
        for backend in ports.iter().flat_map(|p| p.backends.iter()) {
            if let Some(workload) = by_ip(&backend.addr.ip())
                && !found.iter().any(|(_, a)| *a == backend.addr)
            {
                found.push((workload, backend.addr));
            }
        }
        if found.is_empty() {
            return Err(CheckError::NotFound(format!("Service {key} port {port} has no endpoint that is a known pod")));
        }
        return Ok(found);
    }
    let pod = snapshot.pods.get(&key).cloned().or_else(|| snapshot.peers.values().find(|w| w.spec.key == key).cloned());
    let pod = pod.ok_or_else(|| CheckError::NotFound(format!("{to} is no Service and no pod known here")))?;
    let ip = *pod.spec.ips.first().ok_or_else(|| CheckError::NotFound(format!("pod {key} has no address yet")))?;
    Ok(vec![(pod, SocketAddr::new(ip, port))])
}

#[cfg(test)]
mod tests;
