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
    net::IpAddr,
    sync::{Arc, Mutex},
};

use serde::Serialize;

use crate::{
    identity::Identity,
    state::{
        ObjectKey,
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
}

impl<'a> Ask<'a> {
    fn attributes(&self) -> Attributes<'a> {
        Attributes {
            source: self.caller.map(Caller::peer),
            source_ip: self.source_ip,
            destination_ip: self.destination_ip,
            port: self.port,
            request: self.request,
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

#[cfg(test)]
mod tests;
