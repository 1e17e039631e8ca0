//! Per-object validation: a typed object in, its compact validated form out, or every problem
//! with the field it is in. One object at a time, so the Kubernetes source can reject a bad
//! object alone; relations between objects (duplicates, two Services on one address) are the
//! store's business.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    model::{
        Algorithm, AppProtocol, CircuitBreakers, EjectionPolicy, EndpointExtra, EndpointSpec, Enrollment, Family, FieldError, NodeContext,
        ObjectKey, PodSpec, Protocol, QosClass, RateLimitPolicy, RetryBudgetPolicy, ServicePortSpec, ServiceSpec, SlicePortSpec, SliceSpec,
        field_error as err,
    },
    routes::{self, RouteSpec},
};
use crate::sources::{CGROUP_ANNOTATION, Object};

/// The annotation that makes a Service L7-managed without an HTTPRoute.
pub const L7_ANNOTATION: &str = "mesh.dev/l7";
/// The annotation that picks the balancing algorithm of a Service.
pub const LB_ALGORITHM_ANNOTATION: &str = "mesh.dev/lb-algorithm";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// An object, validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Valid {
    Service(ServiceSpec),
    Slice(SliceSpec),
    Route(RouteSpec),
    Pod(PodSpec),
    /// A namespace and whether it is enrolled (`mesh.dev/dataplane: enabled`).
    Namespace(bool),
    Policy(super::policy::PolicySpec),
    PeerAuth(super::policy::PeerAuthSpec),
    /// Valid, but nothing for mesh (an FQDN slice, a route of no Service).
    Ignored,
}

/// Validates one object whose key is `key`.
pub fn object(object: &Object, key: &ObjectKey, node: &NodeContext) -> Result<Valid, Vec<FieldError>> {
    if key.name.is_empty() {
        return Err(vec![err("metadata.name", format!("a {} needs a name", object.kind()))]);
    }
    match object {
        Object::Service(s) => service(s, key).map(Valid::Service),
        Object::EndpointSlice(s) => Ok(slice(s, key, node)?.map_or(Valid::Ignored, Valid::Slice)),
        Object::HttpRoute(r) => {
            let created = created(object);
            Ok(routes::validate((**r).clone(), key.clone(), created)?.map_or(Valid::Ignored, Valid::Route))
        }
        Object::GrpcRoute(r) => {
            let created = created(object);
            Ok(routes::validate_grpc((**r).clone(), key.clone(), created)?.map_or(Valid::Ignored, Valid::Route))
        }
        Object::Pod(p) => Ok(pod(p, key, node)?.map_or(Valid::Ignored, Valid::Pod)),
        Object::Namespace(n) => Ok(Valid::Namespace(enrollment(n.metadata.labels.as_ref(), "metadata.labels")? == Enrollment::Enabled)),
        Object::AuthorizationPolicy(p) => super::policy::authorization(p, key).map(Valid::Policy),
        Object::PeerAuthentication(p) => super::policy::peer_authentication(p, key).map(Valid::PeerAuth),
    }
}

/// The label that enrolls a pod or a namespace: `enabled` or `disabled`.
pub const DATAPLANE_LABEL: &str = "mesh.dev/dataplane";

fn enrollment(labels: Option<&std::collections::BTreeMap<String, String>>, field: &str) -> Result<Enrollment, Vec<FieldError>> {
    match labels.and_then(|l| l.get(DATAPLANE_LABEL)).map(String::as_str) {
        None => Ok(Enrollment::Inherit),
        Some("enabled") => Ok(Enrollment::Enabled),
        Some("disabled") => Ok(Enrollment::Disabled),
        Some(other) => Err(vec![err(format!("{field}[{DATAPLANE_LABEL:?}]"), format!("must be enabled or disabled, got {other:?}"))]),
    }
}

/// A pod of this node (or of no node: standalone files describe this host's), or of another
/// node (where tunnels to it go: its `status.hostIP`).
fn pod(pod: &Pod, key: &ObjectKey, node: &NodeContext) -> Result<Option<PodSpec>, Vec<FieldError>> {
    let spec = pod.spec.as_ref();
    let local = spec.and_then(|s| s.node_name.as_deref()).is_none_or(|n| n.is_empty() || n == node.node);
    let mut errors = Vec::new();
    let status = pod.status.as_ref();
    let host_ip = match status.and_then(|s| s.host_ip.as_deref()).filter(|ip| !ip.is_empty()) {
        None => None,
        Some(ip) => match ip.parse::<IpAddr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                errors.push(err("status.hostIP", format!("not an IP address: {ip:?}")));
                None
            }
        },
    };
    let mut ips = Vec::new();
    let listed: Vec<(String, String)> = match status.and_then(|s| s.pod_ips.as_ref()) {
        Some(list) => list.iter().enumerate().map(|(i, p)| (format!("status.podIPs[{i}].ip"), p.ip.clone())).collect(),
        None => status.and_then(|s| s.pod_ip.clone()).map(|ip| vec![("status.podIP".to_owned(), ip)]).unwrap_or_default(),
    };
    for (field, ip) in listed {
        match ip.parse::<IpAddr>() {
            Ok(ip) => ips.push(ip),
            Err(_) => errors.push(err(field, format!("not an IP address: {ip:?}"))),
        }
    }
    let qos = match status.and_then(|s| s.qos_class.as_deref()) {
        None => None,
        Some("Guaranteed") => Some(QosClass::Guaranteed),
        Some("Burstable") => Some(QosClass::Burstable),
        Some("BestEffort") => Some(QosClass::BestEffort),
        Some(other) => {
            errors.push(err("status.qosClass", format!("must be Guaranteed, Burstable or BestEffort, got {other:?}")));
            None
        }
    };
    let enrollment = enrollment(pod.metadata.labels.as_ref(), "metadata.labels").unwrap_or_else(|mut e| {
        errors.append(&mut e);
        Enrollment::Inherit
    });
    let cgroup = pod.metadata.annotations.as_ref().and_then(|a| a.get(CGROUP_ANNOTATION)).map(std::path::PathBuf::from);
    if let Some(path) = &cgroup
        && (!path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir))
    {
        errors.push(err(
            format!("metadata.annotations[{CGROUP_ANNOTATION:?}]"),
            format!("must be an absolute path without \"..\", got {path:?}"),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Some(PodSpec {
        key: key.clone(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        workload: super::model::workload_of_pod(&key.name),
        service_account: spec.and_then(|s| s.service_account_name.clone()).filter(|s| !s.is_empty()).unwrap_or_else(|| "default".into()),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        qos,
        enrollment,
        local,
        host_ip,
        cgroup,
    }))
}

/// `metadata.creationTimestamp` in RFC 3339, the first tie-breaker between routes.
fn created(object: &Object) -> Option<String> {
    object.metadata().creation_timestamp.as_ref().map(|t| t.0.to_string())
}

fn protocol(value: Option<&str>, field: &str, errors: &mut Vec<FieldError>) -> Option<Protocol> {
    match value.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        other => {
            errors.push(err(field, format!("protocol must be TCP, UDP or SCTP, got {other:?}")));
            None
        }
    }
}

fn port(value: i32, field: &str, errors: &mut Vec<FieldError>) -> Option<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            errors.push(err(field, format!("must be between 1 and 65535, got {value}")));
            None
        }
    }
}

fn service(service: &Service, key: &ObjectKey) -> Result<ServiceSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let empty = Default::default();
    let annotations = service.metadata.annotations.as_ref().unwrap_or(&empty);
    let spec = service.spec.clone().unwrap_or_default();

    let algorithm = match annotations.get(LB_ALGORITHM_ANNOTATION).map(String::as_str) {
        None | Some("random") => Algorithm::Random,
        Some("maglev") => Algorithm::Maglev,
        Some(other) => {
            errors.push(err(
                format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION:?}]"),
                format!("must be \"random\" or \"maglev\", got {other:?}"),
            ));
            Algorithm::Random
        }
    };
    let l7 = match annotations.get(L7_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            errors.push(err(format!("metadata.annotations[{L7_ANNOTATION:?}]"), format!("must be \"true\" or \"false\", got {other:?}")));
            false
        }
    };
    let mut number = |name: &str, default: f64, max: f64| -> f64 {
        match annotations.get(name) {
            None => default,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if (0.0..=max).contains(&x) => x,
                _ => {
                    errors.push(err(format!("metadata.annotations[{name:?}]"), format!("must be a number from 0 to {max}, got {v:?}")));
                    default
                }
            },
        }
    };
    // Defaults come from the policies' Default impls: they are written once.
    let (budget, outlier) = (RetryBudgetPolicy::default(), EjectionPolicy::default());
    let retry_budget = RetryBudgetPolicy {
        ratio: number("mesh.dev/retry-budget-ratio", budget.ratio, 1.0),
        min_per_second: number("mesh.dev/retry-budget-min-per-second", budget.min_per_second, 1_000_000.0),
    };
    let outlier = EjectionPolicy {
        consecutive_failures: number("mesh.dev/outlier-consecutive-failures", f64::from(outlier.consecutive_failures), 1000.0).max(1.0)
            as u32,
        base_ejection: std::time::Duration::from_millis(number(
            "mesh.dev/outlier-base-ejection-ms",
            outlier.base_ejection.as_millis() as f64,
            3_600_000.0,
        ) as u64),
        max_ejected_share: number("mesh.dev/outlier-max-ejected-percent", outlier.max_ejected_share * 100.0, 100.0) / 100.0,
    };
    let rate_limit = annotations.contains_key("mesh.dev/rate-limit-rps").then(|| {
        let per_second = number("mesh.dev/rate-limit-rps", 0.0, 1_000_000.0);
        // Without a burst, one second's worth (at least one request).
        RateLimitPolicy { per_second, burst: number("mesh.dev/rate-limit-burst", per_second.ceil().max(1.0), 1_000_000.0).max(1.0) }
    });
    let mut limit = |name: &str| annotations.contains_key(name).then(|| number(name, 0.0, f64::from(u32::MAX)).max(1.0) as u32);
    let breakers = CircuitBreakers {
        max_requests: limit("mesh.dev/max-requests"),
        max_requests_per_endpoint: limit("mesh.dev/max-requests-per-endpoint"),
        max_connections: limit("mesh.dev/max-connections"),
        max_pending_requests: limit("mesh.dev/max-pending-requests"),
    };

    // ExternalName services are DNS aliases, headless ones have no VIP: nothing to balance.
    let balanced = spec.type_.as_deref() != Some("ExternalName");
    let mut cluster_ips = Vec::new();
    let listed: Vec<(String, String)> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().enumerate().map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip.clone())).collect(),
        _ => spec.cluster_ip.iter().map(|ip| ("spec.clusterIP".to_owned(), ip.clone())).collect(),
    };
    for (field, ip) in listed {
        if ip.is_empty() || ip == "None" {
            continue;
        }
        match ip.parse::<IpAddr>() {
            Ok(ip) if balanced => cluster_ips.push(ip),
            Ok(_) => {}
            Err(_) => errors.push(err(field, format!("not an IP address: {ip:?}"))),
        }
    }
    if cluster_ips.len() > 1 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4() {
        errors.push(err("spec.clusterIPs", "a dual-stack Service has one IPv4 and one IPv6 address"));
    }

    let raw_ports = spec.ports.unwrap_or_default();
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, p) in raw_ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = p.name.clone().unwrap_or_default();
        if raw_ports.len() > 1 && name.is_empty() {
            errors.push(err(format!("{field}.name"), "must be set when a Service has more than one port"));
        }
        if !names.insert(name.clone()) && !name.is_empty() {
            errors.push(err(format!("{field}.name"), format!("duplicate port name {name:?}")));
        }
        let proto = protocol(p.protocol.as_deref(), &format!("{field}.protocol"), &mut errors);
        let number = port(p.port, &format!("{field}.port"), &mut errors);
        if let Some(IntOrString::Int(target)) = p.target_port {
            port(target, &format!("{field}.targetPort"), &mut errors);
        }
        if let (Some(protocol), Some(port)) = (proto, number) {
            let app_protocol = AppProtocol::of_port(p.app_protocol.as_deref(), &name);
            ports.push(ServicePortSpec { name, protocol, port, app_protocol });
        }
    }

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec.session_affinity_config.and_then(|c| c.client_ip).and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t @ 1..=MAX_AFFINITY_TIMEOUT_S) => Some(t as u32),
                Some(t) => {
                    errors.push(err(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("must be between 1 and {MAX_AFFINITY_TIMEOUT_S}, got {t}"),
                    ));
                    None
                }
            }
        }
        Some(other) => {
            errors.push(err("spec.sessionAffinity", format!("must be None or ClientIP, got {other:?}")));
            None
        }
    };
    let node_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            errors.push(err("spec.internalTrafficPolicy", format!("must be Cluster or Local, got {other:?}")));
            false
        }
    };
    let prefer_same_zone = match spec.traffic_distribution.as_deref() {
        None => false,
        Some("PreferClose" | "PreferSameZone") => true,
        Some(other) => {
            errors.push(err("spec.trafficDistribution", format!("must be PreferClose or PreferSameZone, got {other:?}")));
            false
        }
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    // Exact sizes: the store keeps one of these per Service for as long as it exists.
    cluster_ips.shrink_to_fit();
    ports.shrink_to_fit();
    Ok(ServiceSpec {
        key: key.clone(),
        cluster_ips,
        ports,
        affinity_timeout_s,
        node_local,
        prefer_same_zone,
        algorithm,
        l7,
        retry_budget,
        outlier,
        rate_limit,
        breakers,
    })
}

/// `Ok(None)`: valid but not for mesh (an FQDN slice).
fn slice(slice: &EndpointSlice, key: &ObjectKey, node: &NodeContext) -> Result<Option<SliceSpec>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        "FQDN" => None,
        "" => return Err(vec![err("addressType", "required")]),
        other => return Err(vec![err("addressType", format!("must be IPv4, IPv6 or FQDN, got {other:?}"))]),
    };
    let service = slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).cloned();
    if service.is_none() {
        errors.push(err(format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"), "required: it names the Service this slice belongs to"));
    }

    let mut ports = Vec::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let field = format!("ports[{i}]");
        let proto = protocol(p.protocol.as_deref(), &format!("{field}.protocol"), &mut errors);
        // A port with no number means "all ports", which kube-proxy skips.
        let number = p.port.and_then(|n| port(n, &format!("{field}.port"), &mut errors));
        if let (Some(protocol), Some(port)) = (proto, number) {
            ports.push(SlicePortSpec { name: p.name.clone().unwrap_or_default(), protocol, port });
        }
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        let field = format!("endpoints[{i}]");
        // kube-proxy uses the first address only: the others are the same pod.
        let Some(address) = endpoint.addresses.first() else {
            errors.push(err(format!("{field}.addresses"), "needs at least one address"));
            continue;
        };
        let Some(family) = family else { continue };
        let addr = match address.parse::<IpAddr>() {
            Ok(addr) if addr.is_ipv4() == (family == Family::V4) => addr,
            Ok(_) => {
                errors.push(err(format!("{field}.addresses[0]"), format!("{address} is not an {family} address, as addressType says")));
                continue;
            }
            Err(_) => {
                errors.push(err(format!("{field}.addresses[0]"), format!("not an IP address: {address:?}")));
                continue;
            }
        };
        let conditions = endpoint.conditions.clone().unwrap_or_default();
        // Kubernetes semantics: a missing `ready` means ready, a missing `serving` the same as
        // `ready`, a missing `terminating` not terminating.
        let ready = conditions.ready.unwrap_or(true);
        let extra = EndpointExtra {
            zone_hints: endpoint
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .map(|zones| zones.iter().map(|z| z.name.clone()).collect()),
            workload: endpoint.target_ref.as_ref().and_then(|r| r.name.as_deref()).map(Box::from),
        };
        endpoints.push(EndpointSpec {
            addr,
            ready,
            serving: conditions.serving.unwrap_or(ready),
            terminating: conditions.terminating.unwrap_or(false),
            local: endpoint.node_name.as_deref() == Some(node.node.as_str()),
            extra: (extra != EndpointExtra::default()).then(|| Box::new(extra)),
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let (Some(family), Some(service)) = (family, service) else {
        return Ok(None);
    };
    Ok(Some(SliceSpec { key: key.clone(), service: ObjectKey::new(key.namespace.clone(), service), family, endpoints, ports }))
}
