//! The state store: the one place where objects from every source become the state this node
//! serves. It validates each object, keeps compact per-Service indexes (a Service's slices and
//! routes, who claims which address) and publishes immutable, generation-numbered `Snapshot`s.
//!
//! A change costs O(what it touches): a slice update recomputes the one Service it belongs to;
//! a snapshot is made of persistent maps (`imbl`), so publishing one shares everything that did
//! not change and costs O(1). Consumers (kernel sync, proxy, telemetry) hold snapshots and never
//! lock the store.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{
    model::{AppProtocol, Enrollment, NodeContext, ObjectKey, PodSpec, Protocol, ServiceSpec, SliceSpec, Workload, workload_of_pod},
    policy::{PeerAuthSpec, Policies, PolicySpec},
    routes::RouteSpec,
    services::{LbService, LbServiceKey, balanced},
    validate::{self, Valid},
};
use crate::sources::{ApiObject, Change, ConfigError, ConfigErrors, Kind, Origin, RouteVerdict};

/// A Service as consumers see it: its spec, the routes attached to it, its balanced ports.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    pub spec: Arc<ServiceSpec>,
    /// HTTPRoutes and GRPCRoutes whose parent is this Service, by kind and key.
    pub routes: Vec<Arc<RouteSpec>>,
    /// One per port and cluster IP, sorted by key.
    pub ports: Vec<Arc<LbService>>,
}

impl ServiceView {
    /// What `port` (the first port when None) speaks.
    pub fn app_protocol(&self, port: Option<u16>) -> AppProtocol {
        self.spec.ports.iter().find(|p| port.is_none_or(|n| p.port == n)).map_or(AppProtocol::Unknown, |p| p.app_protocol)
    }

    /// Endpoints of `port` (the Service's first port when None), IPv4 first.
    pub fn endpoints(&self, port: Option<u16>) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .filter(|s| port.is_none_or(|p| s.frontend.port() == p))
            .map(|s| s.backends.iter().map(|b| b.addr).collect::<Vec<_>>())
            .find(|b| !b.is_empty())
            .unwrap_or_default()
    }
}

/// What this node serves, at one generation. Cloning is O(1).
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Counts applied batches; 0 before the first.
    pub generation: u64,
    pub services: imbl::OrdMap<ObjectKey, Arc<ServiceView>>,
    /// Every balanced service port, for the kernel.
    pub balanced: imbl::OrdMap<LbServiceKey, Arc<LbService>>,
    /// (frontend, protocol) -> the balanced service there: the proxy's original destination.
    pub frontends: imbl::HashMap<(SocketAddr, Protocol), Arc<LbService>>,
    /// Endpoint address -> its workload (namespace, workload name), for telemetry.
    pub workloads: imbl::HashMap<IpAddr, ObjectKey>,
    /// The pods on this node.
    pub pods: imbl::OrdMap<ObjectKey, Arc<Workload>>,
    /// Pod address -> the pod (host-network pods have the node's addresses: not here).
    pub pods_by_ip: imbl::HashMap<IpAddr, Arc<Workload>>,
    /// Pods of other nodes by address (not host-network ones): where tunnels go.
    pub peers: imbl::HashMap<IpAddr, Arc<Workload>>,
    /// AuthorizationPolicies and PeerAuthentications: a new `Arc` when one changed.
    pub policies: Arc<Policies>,
}

/// What one applied batch changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    /// Balanced service ports added, changed or removed: what the kernel must be told.
    pub balanced: Vec<LbServiceKey>,
    /// Services recomputed.
    pub services: usize,
}

type RouteId = (Kind, ObjectKey);

#[derive(Debug)]
pub struct Store {
    node: NodeContext,
    services: HashMap<ObjectKey, Arc<ServiceSpec>>,
    slices: HashMap<ObjectKey, SliceSpec>,
    routes: HashMap<RouteId, Arc<RouteSpec>>,
    /// Service -> its slices.
    slices_of: HashMap<ObjectKey, BTreeSet<ObjectKey>>,
    /// Service -> the routes attached to it.
    routes_of: HashMap<ObjectKey, BTreeSet<RouteId>>,
    /// Who defined each object (a second definition elsewhere is an error).
    owners: HashMap<(Kind, ObjectKey), Origin>,
    /// (address, port, protocol) -> the Service that has it.
    claims: HashMap<(IpAddr, u16, Protocol), ObjectKey>,
    /// Endpoint address -> (workload, how many slices name it).
    workload_refs: HashMap<IpAddr, (ObjectKey, u32)>,
    pods: HashMap<ObjectKey, Arc<PodSpec>>,
    /// Namespaces labelled `mesh.dev/dataplane: enabled`.
    enrolled_namespaces: BTreeSet<String>,
    authorization: BTreeMap<ObjectKey, Arc<PolicySpec>>,
    peer_authentication: BTreeMap<ObjectKey, Arc<PeerAuthSpec>>,
    snapshot: Snapshot,
}

/// An upsert that passed validation, waiting for the rest of its batch.
struct Checked {
    origin: Origin,
    kind: Kind,
    key: ObjectKey,
    valid: Valid,
}

impl Store {
    pub fn new(node: NodeContext) -> Self {
        Self {
            node,
            services: HashMap::new(),
            slices: HashMap::new(),
            routes: HashMap::new(),
            slices_of: HashMap::new(),
            routes_of: HashMap::new(),
            owners: HashMap::new(),
            claims: HashMap::new(),
            workload_refs: HashMap::new(),
            pods: HashMap::new(),
            enrolled_namespaces: BTreeSet::new(),
            authorization: BTreeMap::new(),
            peer_authentication: BTreeMap::new(),
            snapshot: Snapshot::default(),
        }
    }

    /// The current state, shared.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(self.snapshot.clone())
    }

    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// Objects held, by kind: (Services, EndpointSlices, routes).
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.services.len(), self.slices.len(), self.routes.len())
    }

    /// Validates every change of the batch and applies them all, or none (the errors name
    /// origin, object and field). Deletes of objects the store does not hold are ignored.
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<Applied, ConfigErrors> {
        let mut errors = Vec::new();
        let mut checked = Vec::new();
        let mut deletes = Vec::new();
        let mut in_batch: BTreeMap<(Kind, ObjectKey), Origin> = BTreeMap::new();
        let deleted: BTreeSet<(Kind, ObjectKey)> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Delete { kind, namespace, name, .. } => Some((*kind, ObjectKey::new(namespace.clone(), name.clone()))),
                Change::Upsert { .. } => None,
            })
            .collect();
        for change in changes {
            match change {
                Change::Upsert { origin, object } => {
                    let (namespace, name) = object.key();
                    let key = ObjectKey::new(namespace, name);
                    let kind = object.kind();
                    let described = if key.name.is_empty() { format!("{kind} (no name)") } else { format!("{kind} {key}") };
                    let mut error = |field: &str, message: String| {
                        errors.push(ConfigError { origin: origin.clone(), object: described.clone(), field: field.to_owned(), message })
                    };
                    if let Some(other) = in_batch.insert((kind, key.clone()), origin.clone()) {
                        error("metadata.name", format!("defined twice (also in {other})"));
                        continue;
                    }
                    if let Some(owner) = self.owners.get(&(kind, key.clone()))
                        && *owner != origin
                        && !deleted.contains(&(kind, key.clone()))
                    {
                        error("metadata.name", format!("defined twice (also in {owner})"));
                        continue;
                    }
                    match validate::object(&object, &key, &self.node) {
                        Ok(valid) => checked.push(Checked { origin, kind, key, valid }),
                        Err(field_errors) => {
                            for e in field_errors {
                                error(&e.field, e.message);
                            }
                        }
                    }
                }
                Change::Delete { kind, namespace, name, .. } => deletes.push((kind, ObjectKey::new(namespace, name))),
            }
        }
        self.check_claims(&checked, &deletes, &mut errors);
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }

        // Everything is valid: apply, collecting the Services whose result may change.
        let mut dirty = BTreeSet::new();
        for (kind, key) in deletes {
            self.remove(kind, &key, &mut dirty);
        }
        for c in checked {
            self.remove(c.kind, &c.key, &mut dirty);
            self.insert(c, &mut dirty);
        }
        if dirty.remove(&policy_marker()) {
            self.publish_policies();
        }
        let mut applied = Applied { services: dirty.len(), ..Default::default() };
        for service in dirty {
            self.recompute(&service, &mut applied.balanced);
        }
        self.snapshot.generation += 1;
        applied.generation = self.snapshot.generation;
        Ok(applied)
    }

    /// Two Services may not share an address, port and protocol: checked against the store
    /// and within the batch, counting the batch's own deletes and replacements.
    fn check_claims(&self, checked: &[Checked], deletes: &[(Kind, ObjectKey)], errors: &mut Vec<ConfigError>) {
        let touched: BTreeSet<&ObjectKey> = checked
            .iter()
            .filter(|c| c.kind == Kind::Service)
            .map(|c| &c.key)
            .chain(deletes.iter().filter(|(k, _)| *k == Kind::Service).map(|(_, key)| key))
            .collect();
        let mut batch_claims: HashMap<(IpAddr, u16, Protocol), &ObjectKey> = HashMap::new();
        for c in checked {
            let Valid::Service(spec) = &c.valid else { continue };
            for claim in claims_of(spec) {
                let other = match batch_claims.insert(claim, &c.key) {
                    Some(other) if *other != c.key => Some(other.clone()),
                    _ => self.claims.get(&claim).filter(|owner| !touched.contains(owner) && **owner != c.key).cloned(),
                };
                if let Some(other) = other {
                    errors.push(ConfigError {
                        origin: c.origin.clone(),
                        object: format!("Service {}", c.key),
                        field: "spec.clusterIPs".into(),
                        message: format!("{}:{}/{} is already the address of Service {other}", claim.0, claim.1, claim.2),
                    });
                }
            }
        }
    }

    fn remove(&mut self, kind: Kind, key: &ObjectKey, dirty: &mut BTreeSet<ObjectKey>) {
        self.owners.remove(&(kind, key.clone()));
        match kind {
            Kind::Service => {
                if let Some(spec) = self.services.remove(key) {
                    for claim in claims_of(&spec) {
                        self.claims.remove(&claim);
                    }
                    dirty.insert(key.clone());
                }
            }
            Kind::EndpointSlice => {
                if let Some(slice) = self.slices.remove(key) {
                    if let Some(set) = self.slices_of.get_mut(&slice.service) {
                        set.remove(key);
                        if set.is_empty() {
                            self.slices_of.remove(&slice.service);
                        }
                    }
                    for ep in &slice.endpoints {
                        if ep.workload().is_some() {
                            self.forget_workload(ep.addr);
                        }
                    }
                    dirty.insert(slice.service);
                }
            }
            Kind::Pod => {
                if let Some(pod) = self.pods.remove(key) {
                    self.unpublish_pod(&pod);
                }
            }
            Kind::Namespace => {
                if self.enrolled_namespaces.remove(&key.name) {
                    self.publish_pods_of(&key.name);
                }
            }
            Kind::AuthorizationPolicy => {
                if self.authorization.remove(key).is_some() {
                    dirty.insert(policy_marker());
                }
            }
            Kind::PeerAuthentication => {
                if self.peer_authentication.remove(key).is_some() {
                    dirty.insert(policy_marker());
                }
            }
            Kind::HttpRoute | Kind::GrpcRoute => {
                let id = (kind, key.clone());
                if let Some(route) = self.routes.remove(&id) {
                    for parent in &route.parents {
                        if let Some(set) = self.routes_of.get_mut(parent) {
                            set.remove(&id);
                            if set.is_empty() {
                                self.routes_of.remove(parent);
                            }
                        }
                        dirty.insert(parent.clone());
                    }
                }
            }
        }
    }

    fn insert(&mut self, c: Checked, dirty: &mut BTreeSet<ObjectKey>) {
        self.owners.insert((c.kind, c.key.clone()), c.origin);
        match c.valid {
            Valid::Service(spec) => {
                for claim in claims_of(&spec) {
                    self.claims.insert(claim, c.key.clone());
                }
                self.services.insert(c.key.clone(), Arc::new(spec));
                dirty.insert(c.key);
            }
            Valid::Slice(slice) => {
                for ep in &slice.endpoints {
                    if let Some(pod) = ep.workload() {
                        let workload = ObjectKey::new(slice.key.namespace.clone(), workload_of_pod(pod));
                        self.remember_workload(ep.addr, workload);
                    }
                }
                self.slices_of.entry(slice.service.clone()).or_default().insert(c.key.clone());
                dirty.insert(slice.service.clone());
                self.slices.insert(c.key, slice);
            }
            Valid::Route(route) => {
                let id = (c.kind, c.key);
                for parent in &route.parents {
                    self.routes_of.entry(parent.clone()).or_default().insert(id.clone());
                    dirty.insert(parent.clone());
                }
                self.routes.insert(id, Arc::new(route));
            }
            Valid::Pod(pod) => {
                // A pod that moved between this node and others (a new object under the same
                // name) leaves its old place first.
                if let Some(old) = self.pods.insert(c.key.clone(), Arc::new(pod)) {
                    self.unpublish_pod(&old);
                }
                self.publish_pod(&c.key);
            }
            Valid::Namespace(enrolled) => {
                let changed = if enrolled {
                    self.enrolled_namespaces.insert(c.key.name.clone())
                } else {
                    self.enrolled_namespaces.remove(&c.key.name)
                };
                if changed {
                    self.publish_pods_of(&c.key.name);
                }
            }
            Valid::Policy(policy) => {
                self.authorization.insert(c.key, Arc::new(policy));
                dirty.insert(policy_marker());
            }
            Valid::PeerAuth(pa) => {
                self.peer_authentication.insert(c.key, Arc::new(pa));
                dirty.insert(policy_marker());
            }
            Valid::Ignored => {}
        }
    }

    /// Rebuilds the snapshot's policies by namespace (O(policies), on a policy change only).
    fn publish_policies(&mut self) {
        let mut policies = Policies::default();
        for (key, p) in &self.authorization {
            policies.authorization.entry(key.namespace.clone()).or_default().push(p.clone());
        }
        for (key, p) in &self.peer_authentication {
            policies.peer_authentication.entry(key.namespace.clone()).or_default().push(p.clone());
        }
        self.snapshot.policies = Arc::new(policies);
    }

    /// Puts a pod, with its enrollment as of now, into the snapshot.
    fn publish_pod(&mut self, key: &ObjectKey) {
        let Some(spec) = self.pods.get(key) else { return };
        let enrolled = match spec.enrollment {
            Enrollment::Enabled => true,
            Enrollment::Disabled => false,
            Enrollment::Inherit => self.enrolled_namespaces.contains(&key.namespace),
        };
        let workload = Arc::new(Workload { spec: spec.clone(), enrolled });
        if !spec.local {
            if !spec.host_network {
                for ip in &spec.ips {
                    self.snapshot.peers.insert(*ip, workload.clone());
                }
            }
            return;
        }
        if !spec.host_network {
            for ip in &spec.ips {
                self.snapshot.pods_by_ip.insert(*ip, workload.clone());
            }
        }
        self.snapshot.pods.insert(key.clone(), workload);
    }

    /// Takes a pod out of the snapshot (the store's own record is the caller's).
    fn unpublish_pod(&mut self, pod: &PodSpec) {
        let by_ip = if pod.local {
            self.snapshot.pods.remove(&pod.key);
            &mut self.snapshot.pods_by_ip
        } else {
            &mut self.snapshot.peers
        };
        for ip in &pod.ips {
            if by_ip.get(ip).is_some_and(|w| w.spec.key == pod.key) {
                by_ip.remove(ip);
            }
        }
    }

    fn publish_pods_of(&mut self, namespace: &str) {
        let keys: Vec<ObjectKey> = self.pods.keys().filter(|k| k.namespace == namespace).cloned().collect();
        for key in keys {
            self.publish_pod(&key);
        }
    }

    fn remember_workload(&mut self, addr: IpAddr, workload: ObjectKey) {
        let entry = self.workload_refs.entry(addr).or_insert_with(|| (workload.clone(), 0));
        entry.1 += 1;
        if entry.0 != workload || entry.1 == 1 {
            entry.0 = workload.clone();
            self.snapshot.workloads.insert(addr, workload);
        }
    }

    fn forget_workload(&mut self, addr: IpAddr) {
        if let Some(entry) = self.workload_refs.get_mut(&addr) {
            entry.1 -= 1;
            if entry.1 == 0 {
                self.workload_refs.remove(&addr);
                self.snapshot.workloads.remove(&addr);
            }
        }
    }

    /// Recomputes one Service into the snapshot; records the balanced ports that changed.
    fn recompute(&mut self, key: &ObjectKey, changed: &mut Vec<LbServiceKey>) {
        let old = self.snapshot.services.get(key).cloned();
        let Some(spec) = self.services.get(key) else {
            if let Some(old) = old {
                for port in &old.ports {
                    self.snapshot.balanced.remove(&port.key);
                    self.snapshot.frontends.remove(&(port.frontend, port.key.protocol));
                    changed.push(port.key.clone());
                }
                self.snapshot.services.remove(key);
            }
            return;
        };
        let slices: Vec<&SliceSpec> = self.slices_of.get(key).into_iter().flatten().filter_map(|s| self.slices.get(s)).collect();
        let routes: Vec<Arc<RouteSpec>> =
            self.routes_of.get(key).into_iter().flatten().filter_map(|r| self.routes.get(r).cloned()).collect();
        let fresh = balanced(spec, &slices, !routes.is_empty(), &self.node);

        let old_ports: BTreeMap<&LbServiceKey, &Arc<LbService>> = old.iter().flat_map(|o| o.ports.iter()).map(|p| (&p.key, p)).collect();
        let mut ports = Vec::with_capacity(fresh.len());
        let mut kept = BTreeSet::new();
        for lb in fresh {
            match old_ports.get(&lb.key) {
                Some(prev) if ***prev == lb => ports.push(Arc::clone(prev)),
                prev => {
                    if let Some(prev) = prev {
                        self.snapshot.frontends.remove(&(prev.frontend, prev.key.protocol));
                    }
                    changed.push(lb.key.clone());
                    let lb = Arc::new(lb);
                    self.snapshot.balanced.insert(lb.key.clone(), lb.clone());
                    ports.push(lb);
                }
            }
            kept.insert(ports.last().expect("just pushed").key.clone());
        }
        for (port_key, prev) in &old_ports {
            if !kept.contains(*port_key) {
                self.snapshot.balanced.remove(*port_key);
                self.snapshot.frontends.remove(&(prev.frontend, prev.key.protocol));
                changed.push((*port_key).clone());
            }
        }
        for port in &ports {
            self.snapshot.frontends.insert((port.frontend, port.key.protocol), Arc::clone(port));
        }
        let view = ServiceView { spec: Arc::clone(spec), routes, ports };
        if old.as_deref() != Some(&view) {
            self.snapshot.services.insert(key.clone(), Arc::new(view));
        }
    }
}

/// Stands in the dirty set for "a policy changed": no Service has an empty namespace.
fn policy_marker() -> ObjectKey {
    ObjectKey::new("", "")
}

/// The (address, port, protocol) triples a Service takes.
fn claims_of(spec: &ServiceSpec) -> impl Iterator<Item = (IpAddr, u16, Protocol)> + '_ {
    spec.cluster_ips.iter().flat_map(|ip| spec.ports.iter().map(|p| (*ip, p.port, p.protocol)))
}

/// A store holding the objects of one YAML text, as if read from `origin` (tests, `mesh config
/// validate`).
pub fn load(origin: &std::path::Path, text: &str, node: NodeContext) -> Result<Store, ConfigErrors> {
    let objects = crate::sources::file::parse(origin, text)?;
    let origin = Origin::File(origin.into());
    let mut store = Store::new(node);
    store.apply(objects.into_iter().map(|object| Change::Upsert { origin: origin.clone(), object }).collect())?;
    Ok(store)
}

impl Store {
    /// Validated objects, for tests and tools.
    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceSpec> {
        self.services.get(key).map(|s| &**s)
    }

    pub fn slice(&self, key: &ObjectKey) -> Option<&SliceSpec> {
        self.slices.get(key)
    }

    pub fn routes(&self) -> impl Iterator<Item = &Arc<RouteSpec>> {
        self.routes.values()
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.services.values().map(|s| &**s)
    }

    pub fn slices(&self) -> impl Iterator<Item = &SliceSpec> {
        self.slices.values()
    }
}

impl Store {
    /// Every route the store holds (HTTPRoutes and GRPCRoutes whose parent is a Service), with
    /// what its status should say.
    pub fn route_verdicts(&self) -> BTreeMap<ApiObject, RouteVerdict> {
        let named = |k: &ObjectKey| (k.namespace.clone(), k.name.clone());
        self.routes
            .iter()
            .map(|((kind, key), route)| {
                let parents = route.parents.iter().map(|p| (named(p), self.services.contains_key(p))).collect();
                let mut unresolved: Vec<(String, String)> = route
                    .rules
                    .iter()
                    .flat_map(|r| &r.backends)
                    .filter(|b| !self.services.contains_key(&b.service))
                    .map(|b| named(&b.service))
                    .collect();
                unresolved.sort();
                unresolved.dedup();
                let object = ApiObject { kind: *kind, namespace: key.namespace.clone(), name: key.name.clone() };
                (object, RouteVerdict { parents, unresolved })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
