//! The L7 proxy's authorization layer: each request to a Service is decided on with its
//! method, path and host against the AuthorizationPolicies of the Service's endpoints, and
//! answered 403 when refused (as Envoy's RBAC filter answers). The tunnel streams that then
//! carry the allowed requests say so (`mesh-l7: checked`), so the destination agent does not
//! refuse them for rules it cannot see requests for.
//!
//! Endpoints whose policies are the same are decided on once: the distinct policy sets of a
//! Service's endpoints are worked out once per snapshot and kept.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    authz::{Ask, Authorizer, Caller, Decision, Reporter},
    identity::Identity,
    state::{ObjectKey, Snapshot, model::Workload, policy::Request},
};

/// A Service's endpoints, one per distinct policy set (none: no policy selects any).
type Representatives = Arc<Vec<(Arc<Workload>, SocketAddr)>>;

pub struct RequestAuthz {
    authorizer: Arc<Authorizer>,
    /// Service -> (snapshot generation, its representatives).
    cache: Mutex<HashMap<ObjectKey, (u64, Representatives)>>,
}

/// Services whose representatives are kept, at most (then all are worked out again).
const MAX_CACHED_SERVICES: usize = 16_384;

impl RequestAuthz {
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer, cache: Mutex::default() }
    }

    /// The refusal of a request from `caller` (None: not an enrolled pod with mTLS on) to
    /// `service`, whose endpoints are `endpoints`; None when every endpoint's policies allow it.
    pub fn refusal(
        &self,
        snapshot: &Snapshot,
        service: &ObjectKey,
        endpoints: &[SocketAddr],
        caller: Option<&(Identity, Option<IpAddr>)>,
        request: Request<'_>,
    ) -> Option<Decision> {
        let representatives = self.representatives(snapshot, service, endpoints);
        if representatives.is_empty() {
            return None;
        }
        let calling = caller.map(|(identity, _)| Caller::of(identity));
        for (workload, endpoint) in representatives.iter() {
            let ask = Ask {
                caller: calling.as_ref(),
                source_ip: caller.and_then(|(_, ip)| *ip),
                destination_ip: endpoint.ip(),
                port: endpoint.port(),
                request: Some(request),
                l7_checked: false,
            };
            let decision = self.authorizer.decide(&snapshot.policies, workload, &ask, Reporter::Source);
            if !decision.allowed {
                return Some(decision);
            }
        }
        None
    }

    fn representatives(&self, snapshot: &Snapshot, service: &ObjectKey, endpoints: &[SocketAddr]) -> Representatives {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((generation, found)) = cache.get(service)
            && *generation == snapshot.generation
        {
            return found.clone();
        }
        // Endpoints with the same deciding policies are decided on once.
        let mut found: Vec<(Arc<Workload>, SocketAddr, Vec<ObjectKey>)> = Vec::new();
        for endpoint in endpoints {
            let Some(workload) = snapshot.pods_by_ip.get(&endpoint.ip()).or_else(|| snapshot.peers.get(&endpoint.ip())) else { continue };
            if !workload.enrolled {
                continue;
            }
            let applicable = self.authorizer.applicable(&snapshot.policies, workload);
            if applicable.is_empty() && applicable.audit.is_empty() {
                continue;
            }
            let keys: Vec<ObjectKey> = applicable.deciding().chain(&applicable.audit).map(|p| p.key.clone()).collect();
            if !found.iter().any(|(_, _, k)| *k == keys) {
                found.push((workload.clone(), *endpoint, keys));
            }
        }
        let found: Representatives = Arc::new(found.into_iter().map(|(w, e, _)| (w, e)).collect());
        if cache.len() >= MAX_CACHED_SERVICES {
            cache.clear();
        }
        cache.insert(service.clone(), (snapshot.generation, found.clone()));
        found
    }
}
