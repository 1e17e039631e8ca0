//! Which endpoints each Service port may use on this node: kube-proxy's rules (ready endpoints,
//! terminating-but-serving ones as a fallback, `internalTrafficPolicy: Local`, topology hints
//! for `trafficDistribution: PreferClose`), applied here once per change so that the kernel only
//! ever picks from a ready-made list.
use std::{collections::BTreeMap, fmt, net::SocketAddr};

use serde::Serialize;

use super::model::{Algorithm, EndpointSpec, Family, NodeContext, ObjectKey, Protocol, ServiceSpec, SliceSpec};

/// One balanced service: a Service port of one IP family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbServiceKey {
    pub service: ObjectKey,
    pub port_name: String,
    pub protocol: Protocol,
    pub family: Family,
}

impl fmt::Display for LbServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.service)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{} ({})", self.protocol, self.family)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct BackendSpec {
    pub addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbService {
    pub key: LbServiceKey,
    pub frontend: SocketAddr,
    pub algorithm: Algorithm,
    pub affinity_timeout_s: Option<u32>,
    /// TCP connections go to the agent's proxy (an HTTPRoute attaches, or mesh.dev/l7).
    pub l7: bool,
    /// The endpoints this node may use, sorted; empty means connections are refused.
    pub backends: Vec<BackendSpec>,
}

/// The balanced services of one Service as seen from `node`, sorted by key: one per port and
/// cluster IP, from `slices` (the Service's own). `routed`: an HTTPRoute or GRPCRoute attaches.
pub fn balanced(service: &ServiceSpec, slices: &[&SliceSpec], routed: bool, node: &NodeContext) -> Vec<LbService> {
    let mut out = Vec::new();
    for port in &service.ports {
        if port.protocol == Protocol::Sctp {
            continue;
        }
        for vip in &service.cluster_ips {
            let family = Family::of(vip);
            let key = LbServiceKey { service: service.key.clone(), port_name: port.name.clone(), protocol: port.protocol, family };
            let candidates = candidates(slices, &key);
            let backends = usable(&candidates, service, node).into_iter().map(|(addr, _)| BackendSpec { addr }).collect();
            out.push(LbService {
                key,
                frontend: SocketAddr::new(*vip, port.port),
                algorithm: service.algorithm,
                l7: port.protocol == Protocol::Tcp && (service.l7 || routed),
                affinity_timeout_s: service.affinity_timeout_s,
                backends,
            });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Every endpoint of the service port, with the port number its slices give for the port's
/// name: the EndpointSlice controller has already resolved `targetPort`, named or not.
fn candidates<'a>(slices: &[&'a SliceSpec], key: &LbServiceKey) -> BTreeMap<SocketAddr, &'a EndpointSpec> {
    let mut out: BTreeMap<SocketAddr, &EndpointSpec> = BTreeMap::new();
    for slice in slices.iter().filter(|s| s.family == key.family) {
        let Some(port) = slice.ports.iter().find(|p| p.name == key.port_name && p.protocol == key.protocol) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let addr = SocketAddr::new(endpoint.addr, port.port);
            // The same address in two slices (a slice being replaced): the readier one wins.
            out.entry(addr)
                .and_modify(|prev| {
                    if endpoint.ready && !prev.ready {
                        *prev = endpoint;
                    }
                })
                .or_insert(endpoint);
        }
    }
    out
}

/// kube-proxy's CategorizeEndpoints, for one node.
fn usable<'a>(
    candidates: &BTreeMap<SocketAddr, &'a EndpointSpec>,
    service: &ServiceSpec,
    node: &NodeContext,
) -> Vec<(SocketAddr, &'a EndpointSpec)> {
    let pick = |f: &dyn Fn(&EndpointSpec) -> bool| -> Vec<(SocketAddr, &'a EndpointSpec)> {
        candidates.iter().filter(|(_, ep)| f(ep)).map(|(a, ep)| (*a, *ep)).collect()
    };
    let fallback = |ep: &EndpointSpec| ep.serving && ep.terminating;

    if service.node_local {
        let is_local = |ep: &EndpointSpec| ep.local;
        let ready = pick(&|ep| ep.ready && is_local(ep));
        return if ready.is_empty() { pick(&|ep| fallback(ep) && is_local(ep)) } else { ready };
    }

    let zone = node.zone.as_deref().filter(|_| service.prefer_same_zone && topology_usable(candidates, node));
    let in_zone = |ep: &EndpointSpec| match zone {
        None => true,
        Some(zone) => ep.zone_hints().is_some_and(|h| h.iter().any(|z| z == zone)),
    };
    let ready = pick(&|ep| ep.ready && in_zone(ep));
    if ready.is_empty() { pick(&fallback) } else { ready }
}

/// Zone hints are used only when every ready endpoint has them and one is for this zone;
/// otherwise a half-hinted slice could send all traffic to a few endpoints.
fn topology_usable(candidates: &BTreeMap<SocketAddr, &EndpointSpec>, node: &NodeContext) -> bool {
    let Some(zone) = node.zone.as_deref() else { return false };
    let mut has_zone = false;
    for ep in candidates.values().filter(|ep| ep.ready) {
        match ep.zone_hints() {
            Some(hints) if !hints.is_empty() => has_zone |= hints.iter().any(|z| z == zone),
            _ => return false,
        }
    }
    has_zone
}

#[cfg(test)]
mod tests;
