//! Validates a set of YAML sources as a whole into a `Catalog`. Any error rejects the whole
//! set, so the caller keeps serving the last good one; every error names the file, the object
//! and the field.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;

use super::{
    objects::{self, IntOrString},
    routes::{self, RouteSpec},
    services::{Algorithm, Family, Protocol},
};

/// The annotation that makes a Service L7-managed without an HTTPRoute.
pub const L7_ANNOTATION: &str = "mesh.dev/l7";
/// The annotation that picks the balancing algorithm of a Service.
pub const LB_ALGORITHM_ANNOTATION: &str = "mesh.dev/lb-algorithm";
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// kube-proxy's default `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i64 = 86_400;

/// One problem in one field of one object of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// `Service default/web`, or `document 3` when the object has no name yet.
    pub object: String,
    /// `spec.ports[0].port`; empty for a file-level problem.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if !self.object.is_empty() {
            write!(f, ": {}", self.object)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// All the problems found in a set of sources.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

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

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePortSpec {
    /// "" for the single unnamed port.
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
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
    /// `mesh.dev/retry-budget-ratio` (default 0.2) and `mesh.dev/retry-budget-min-per-second`
    /// (default 10): retries to this Service may add at most ratio x requests + min per second.
    pub retry_budget_ratio: f64,
    pub retry_budget_min_per_second: f64,
    /// `mesh.dev/outlier-consecutive-failures` (5), `mesh.dev/outlier-base-ejection-ms`
    /// (10000), `mesh.dev/outlier-max-ejected-percent` (50).
    pub outlier: crate::proxy::balancer::EjectionPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// `hints.forZones`, `None` when the endpoint has no hints.
    pub zone_hints: Option<BTreeSet<String>>,
    /// `targetRef.name` (the pod), for telemetry.
    pub workload: Option<String>,
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
    pub service: String,
    pub family: Family,
    pub endpoints: Vec<EndpointSpec>,
    pub ports: Vec<SlicePortSpec>,
}

/// Every Service, EndpointSlice and (Service-attached) HTTPRoute of a configuration,
/// validated as a whole.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    pub services: BTreeMap<ObjectKey, ServiceSpec>,
    pub slices: BTreeMap<ObjectKey, SliceSpec>,
    pub routes: BTreeMap<ObjectKey, RouteSpec>,
}

impl Catalog {
    /// Parses and validates `(file, text)` sources. Kinds other than Service and EndpointSlice
    /// are skipped: standalone YAML often holds the Deployments too.
    pub fn from_sources<'a>(
        sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
    ) -> Result<Self, ConfigErrors> {
        let mut catalog = Catalog::default();
        let mut errors = Vec::new();
        // Where each object was defined, to name both files of a duplicate.
        let mut seen: BTreeMap<(&'static str, ObjectKey), PathBuf> = BTreeMap::new();
        for (file, text) in sources {
            for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let object = format!("document {}", index + 1);
                let value = match serde_yaml::Value::deserialize(doc) {
                    Ok(value) => value,
                    Err(e) => {
                        errors.push(ConfigError {
                            file: file.to_owned(),
                            object,
                            field: String::new(),
                            message: format!("not valid YAML: {e}"),
                        });
                        // The YAML stream cannot be resynchronised after a syntax error.
                        break;
                    }
                };
                let mut ctx = DocContext {
                    file,
                    object,
                    errors: &mut errors,
                };
                catalog.add_document(value, &mut ctx, &mut seen);
            }
        }
        if errors.is_empty() {
            Ok(catalog)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    fn add_document(
        &mut self,
        value: serde_yaml::Value,
        ctx: &mut DocContext<'_>,
        seen: &mut BTreeMap<(&'static str, ObjectKey), PathBuf>,
    ) {
        if value.is_null() {
            return; // an empty document, e.g. after a trailing `---`
        }
        let Some(type_meta) = ctx.parse::<objects::TypeMeta>(value.clone()) else {
            return;
        };
        let (Some(api_version), Some(kind)) = (type_meta.api_version, type_meta.kind) else {
            ctx.error("", "every object needs apiVersion and kind");
            return;
        };
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => {
                if let Some(service) = ctx.parse::<objects::Service>(value)
                    && let Some(spec) = validate_service(service, ctx)
                {
                    if let Some(prev) = seen.insert(("Service", spec.key.clone()), ctx.file.to_owned()) {
                        ctx.error("metadata.name", &format!("defined twice (also in {})", prev.display()));
                    }
                    self.services.insert(spec.key.clone(), spec);
                }
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                if let Some(slice) = ctx.parse::<objects::EndpointSlice>(value)
                    && let Some(spec) = validate_slice(slice, ctx)
                    && let Some(spec) = spec
                {
                    if let Some(prev) = seen.insert(("EndpointSlice", spec.key.clone()), ctx.file.to_owned()) {
                        ctx.error("metadata.name", &format!("defined twice (also in {})", prev.display()));
                    }
                    self.slices.insert(spec.key.clone(), spec);
                }
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                self.add_route("HTTPRoute", value, ctx, seen);
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2", "GRPCRoute") => {
                // A GRPCRoute is an HTTPRoute over gRPC's paths (/service/method): translated,
                // it takes the same validation, router and proxy.
                let Some(meta) = ctx.parse::<objects::Metadata>(value.clone()) else { return };
                if ctx.name_object("GRPCRoute", &meta.metadata).is_none() {
                    return;
                }
                match routes::grpc_as_http(value) {
                    Ok(value) => self.add_route("GRPCRoute", value, ctx, seen),
                    Err(e) => ctx.error(&e.field, &e.message),
                }
            }
            (_, "List" | "ServiceList" | "EndpointSliceList" | "HTTPRouteList" | "GRPCRouteList") => {
                // `kubectl get -o yaml` wraps objects in a List.
                let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
                let list_object = ctx.object.clone();
                for (i, item) in items.into_iter().enumerate() {
                    ctx.object = format!("{list_object} items[{i}]");
                    self.add_document(item, ctx, seen);
                }
            }
            (_, "Service" | "EndpointSlice") => {
                ctx.error("apiVersion", &format!("{kind} must be {}, got {api_version:?}", if kind == "Service" { "v1" } else { "discovery.k8s.io/v1" }));
            }
            _ => tracing::debug!(file = %ctx.file.display(), %kind, "skipping object of a kind mesh does not use"),
        }
    }
}

impl Catalog {
    fn add_route(
        &mut self,
        kind: &'static str,
        value: serde_yaml::Value,
        ctx: &mut DocContext<'_>,
        seen: &mut BTreeMap<(&'static str, ObjectKey), PathBuf>,
    ) {
        let Some(meta) = ctx.parse::<objects::Metadata>(value.clone()) else { return };
        let Some(key) = ctx.name_object(kind, &meta.metadata) else { return };
        // The generated type checks apiVersion; HTTPRoute v1beta1 is field-compatible.
        let mut value = value;
        if let Some(map) = value.as_mapping_mut() {
            map.insert("apiVersion".into(), "gateway.networking.k8s.io/v1".into());
        }
        let Some(route) = ctx.parse::<gateway_api::experimental::httproutes::HttpRoute>(value) else { return };
        match routes::validate(route, key.clone(), meta.metadata.creation_timestamp) {
            Ok(Some(spec)) => {
                if let Some(prev) = seen.insert((kind, key.clone()), ctx.file.to_owned()) {
                    ctx.error("metadata.name", &format!("defined twice (also in {})", prev.display()));
                }
                self.routes.insert(key, spec);
            }
            Ok(None) => tracing::debug!(route = %key, kind, "route has no Service parent; not for mesh"),
            Err(errors) => {
                for e in errors {
                    ctx.error(&e.field, &e.message);
                }
            }
        }
    }
}

/// Where errors go while one document is validated.
struct DocContext<'a> {
    file: &'a Path,
    object: String,
    errors: &'a mut Vec<ConfigError>,
}

impl DocContext<'_> {
    fn error(&mut self, field: &str, message: &str) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            object: self.object.clone(),
            field: field.to_owned(),
            message: message.to_owned(),
        });
    }

    /// Deserializes a document, naming the field of a type error.
    fn parse<T: serde::de::DeserializeOwned>(&mut self, value: serde_yaml::Value) -> Option<T> {
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => Some(v),
            Err(e) => {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                self.error(&field, &e.into_inner().to_string());
                None
            }
        }
    }

    /// Names the object once metadata is known: `Service default/web`.
    fn name_object(&mut self, kind: &str, meta: &objects::ObjectMeta) -> Option<ObjectKey> {
        let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
            self.error("metadata.name", &format!("a {kind} needs a name"));
            return None;
        };
        let namespace = meta.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let key = ObjectKey { namespace, name };
        self.object = format!("{kind} {key}");
        Some(key)
    }
}

fn parse_protocol(value: Option<&str>, field: &str, ctx: &mut DocContext<'_>) -> Option<Protocol> {
    match value.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        "SCTP" => Some(Protocol::Sctp),
        other => {
            ctx.error(field, &format!("protocol must be TCP, UDP or SCTP, got {other:?}"));
            None
        }
    }
}

fn parse_port(value: i64, field: &str, ctx: &mut DocContext<'_>) -> Option<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Some(port),
        _ => {
            ctx.error(field, &format!("must be between 1 and 65535, got {value}"));
            None
        }
    }
}

fn validate_service(service: objects::Service, ctx: &mut DocContext<'_>) -> Option<ServiceSpec> {
    let key = ctx.name_object("Service", &service.metadata)?;
    let errors_before = ctx.errors.len();
    let spec = service.spec;

    let algorithm = match service.metadata.annotations.get(LB_ALGORITHM_ANNOTATION).map(String::as_str) {
        None | Some("random") => Algorithm::Random,
        Some("maglev") => Algorithm::Maglev,
        Some(other) => {
            ctx.error(
                &format!("metadata.annotations[{LB_ALGORITHM_ANNOTATION:?}]"),
                &format!("must be \"random\" or \"maglev\", got {other:?}"),
            );
            Algorithm::Random
        }
    };

    let l7 = match service.metadata.annotations.get(L7_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            ctx.error(&format!("metadata.annotations[{L7_ANNOTATION:?}]"), &format!("must be \"true\" or \"false\", got {other:?}"));
            false
        }
    };

    let mut budget = |name: &str, default: f64, max: f64| -> f64 {
        match service.metadata.annotations.get(name) {
            None => default,
            Some(v) => match v.parse::<f64>() {
                Ok(x) if (0.0..=max).contains(&x) => x,
                _ => {
                    ctx.error(&format!("metadata.annotations[{name:?}]"), &format!("must be a number from 0 to {max}, got {v:?}"));
                    default
                }
            },
        }
    };
    let retry_budget_ratio = budget("mesh.dev/retry-budget-ratio", 0.2, 1.0);
    let retry_budget_min_per_second = budget("mesh.dev/retry-budget-min-per-second", 10.0, 1_000_000.0);
    let outlier = crate::proxy::balancer::EjectionPolicy {
        consecutive_failures: budget("mesh.dev/outlier-consecutive-failures", 5.0, 1000.0).max(1.0) as u32,
        base_ejection: std::time::Duration::from_millis(budget("mesh.dev/outlier-base-ejection-ms", 10_000.0, 3_600_000.0) as u64),
        max_ejected_share: budget("mesh.dev/outlier-max-ejected-percent", 50.0, 100.0) / 100.0,
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
            Err(_) => ctx.error(&field, &format!("not an IP address: {ip:?}")),
        }
    }
    if cluster_ips.len() > 1 && cluster_ips[0].is_ipv4() == cluster_ips[1].is_ipv4() {
        ctx.error("spec.clusterIPs", "a dual-stack Service has one IPv4 and one IPv6 address");
    }

    let raw_ports = spec.ports.unwrap_or_default();
    let mut ports = Vec::new();
    let mut names = BTreeSet::new();
    for (i, port) in raw_ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        let name = port.name.clone().unwrap_or_default();
        if raw_ports.len() > 1 && name.is_empty() {
            ctx.error(&format!("{field}.name"), "must be set when a Service has more than one port");
        }
        if !names.insert(name.clone()) && !name.is_empty() {
            ctx.error(&format!("{field}.name"), &format!("duplicate port name {name:?}"));
        }
        let protocol = parse_protocol(port.protocol.as_deref(), &format!("{field}.protocol"), ctx);
        let number = parse_port(port.port, &format!("{field}.port"), ctx);
        if let Some(IntOrString::Int(target)) = port.target_port {
            parse_port(target, &format!("{field}.targetPort"), ctx);
        }
        if let (Some(protocol), Some(port)) = (protocol, number) {
            ports.push(ServicePortSpec { name, protocol, port });
        }
    }

    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .and_then(|c| c.client_ip)
                .and_then(|c| c.timeout_seconds);
            match timeout {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t @ 1..=MAX_AFFINITY_TIMEOUT_S) => Some(t as u32),
                Some(t) => {
                    ctx.error(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        &format!("must be between 1 and {MAX_AFFINITY_TIMEOUT_S}, got {t}"),
                    );
                    None
                }
            }
        }
        Some(other) => {
            ctx.error("spec.sessionAffinity", &format!("must be None or ClientIP, got {other:?}"));
            None
        }
    };

    let node_local = match spec.internal_traffic_policy.as_deref() {
        None | Some("Cluster") => false,
        Some("Local") => true,
        Some(other) => {
            ctx.error("spec.internalTrafficPolicy", &format!("must be Cluster or Local, got {other:?}"));
            false
        }
    };
    let prefer_same_zone = match spec.traffic_distribution.as_deref() {
        None => false,
        Some("PreferClose" | "PreferSameZone") => true,
        Some(other) => {
            ctx.error(
                "spec.trafficDistribution",
                &format!("must be PreferClose or PreferSameZone, got {other:?}"),
            );
            false
        }
    };

    (ctx.errors.len() == errors_before).then_some(ServiceSpec {
        key,
        cluster_ips,
        ports,
        affinity_timeout_s,
        node_local,
        prefer_same_zone,
        algorithm,
        l7,
        retry_budget_ratio,
        retry_budget_min_per_second,
        outlier,
    })
}

/// `Some(None)`: valid but not for mesh (an FQDN slice, or one of no Service).
fn validate_slice(slice: objects::EndpointSlice, ctx: &mut DocContext<'_>) -> Option<Option<SliceSpec>> {
    let key = ctx.name_object("EndpointSlice", &slice.metadata)?;
    let errors_before = ctx.errors.len();
    let family = match slice.address_type.as_deref() {
        Some("IPv4") => Some(Family::V4),
        Some("IPv6") => Some(Family::V6),
        Some("FQDN") => None,
        Some(other) => {
            ctx.error("addressType", &format!("must be IPv4, IPv6 or FQDN, got {other:?}"));
            return None;
        }
        None => {
            ctx.error("addressType", "required");
            return None;
        }
    };
    let service = slice.metadata.labels.get(SERVICE_NAME_LABEL).cloned();
    if service.is_none() {
        ctx.error(
            &format!("metadata.labels[{SERVICE_NAME_LABEL:?}]"),
            "required: it names the Service this slice belongs to",
        );
    }

    let mut ports = Vec::new();
    for (i, port) in slice.ports.unwrap_or_default().iter().enumerate() {
        let field = format!("ports[{i}]");
        let protocol = parse_protocol(port.protocol.as_deref(), &format!("{field}.protocol"), ctx);
        let number = match port.port {
            Some(p) => parse_port(p, &format!("{field}.port"), ctx),
            None => None, // a port with no number means "all ports", which kube-proxy skips
        };
        if let (Some(protocol), Some(port_number)) = (protocol, number) {
            ports.push(SlicePortSpec { name: port.name.clone().unwrap_or_default(), protocol, port: port_number });
        }
    }

    let mut endpoints = Vec::new();
    for (i, endpoint) in slice.endpoints.unwrap_or_default().into_iter().enumerate() {
        let field = format!("endpoints[{i}]");
        // kube-proxy uses the first address only: the others are the same pod.
        let Some(address) = endpoint.addresses.first() else {
            ctx.error(&format!("{field}.addresses"), "needs at least one address");
            continue;
        };
        let Some(family) = family else { continue };
        let addr = match address.parse::<IpAddr>() {
            Ok(addr) if addr.is_ipv4() == (family == Family::V4) => addr,
            Ok(_) => {
                ctx.error(&format!("{field}.addresses[0]"), &format!("{address} is not an {family} address, as addressType says"));
                continue;
            }
            Err(_) => {
                ctx.error(&format!("{field}.addresses[0]"), &format!("not an IP address: {address:?}"));
                continue;
            }
        };
        let ready = endpoint.conditions.ready.unwrap_or(true);
        endpoints.push(EndpointSpec {
            addr,
            ready,
            serving: endpoint.conditions.serving.unwrap_or(ready),
            terminating: endpoint.conditions.terminating.unwrap_or(false),
            node: endpoint.node_name,
            zone: endpoint.zone,
            zone_hints: endpoint
                .hints
                .and_then(|h| h.for_zones)
                .map(|zones| zones.into_iter().map(|z| z.name).collect()),
            workload: endpoint.target_ref.and_then(|r| r.name),
        });
    }

    if ctx.errors.len() != errors_before {
        return None;
    }
    let (Some(family), Some(service)) = (family, service) else {
        return Some(None);
    };
    Some(Some(SliceSpec { key, service, family, endpoints, ports }))
}

#[cfg(test)]
mod tests;
