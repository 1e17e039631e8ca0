//! Istio's AuthorizationPolicy and PeerAuthentication, validated into the form decisions are
//! made from, and Istio's rules for matching one: a rule matches when its `from`, `to` and
//! `when` all match; a list matches when any entry does; a field with its `not` form matches
//! when a value is listed and no `not` value is.
//!
//! What a connection carries is all that an L4 decision can see. An ALLOW rule that needs a
//! request attribute (method, path, host, a request principal, a request `when` key) does not
//! match a connection, and a DENY rule that does matches it on its other parts: a policy written
//! for requests fails closed where only connections are seen, as ztunnel's does.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::model::{FieldError, ObjectKey, field_error as err};
use crate::sources::istio;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Matches are logged; the decision is the other policies'.
    Audit,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        }
    }
}

/// An AuthorizationPolicy, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySpec {
    pub key: ObjectKey,
    /// None: every workload of its namespace (of the mesh, in the root namespace).
    pub selector: Option<BTreeMap<String, String>>,
    pub action: Action,
    pub rules: Vec<RuleSpec>,
}

impl PolicySpec {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        selects(self.selector.as_ref(), labels)
    }

    /// Whether a rule needs what only a request carries.
    pub fn has_l7(&self) -> bool {
        self.rules.iter().any(RuleSpec::has_l7)
    }

    /// The ports its rules name (`ports`, `notPorts`, `destination.port`): decisions on other
    /// ports are all alike.
    pub fn named_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.rules.iter().flat_map(|r| {
            let ops = r.to.iter().flatten().flat_map(|o| o.ports.any_of.iter().chain(o.ports.none_of.iter()).flatten().copied());
            let conditions = r.when.iter().flat_map(|c| match c {
                ConditionSpec::DestinationPort(f) => f.any_of.iter().chain(f.none_of.iter()).flatten().copied().collect::<Vec<_>>(),
                _ => Vec::new(),
            });
            ops.chain(conditions)
        })
    }

    /// The address blocks its rules match senders against (`ipBlocks`, `notIpBlocks`,
    /// `source.ip`): decisions on a sender without identity differ only between them.
    pub fn sender_blocks(&self) -> impl Iterator<Item = IpBlock> + '_ {
        self.rules.iter().flat_map(|r| {
            let sources = r.from.iter().flatten().map(|s| &s.ip_blocks);
            let conditions = r.when.iter().filter_map(|c| match c {
                ConditionSpec::SourceIp(f) => Some(f),
                _ => None,
            });
            sources.chain(conditions).flat_map(|f| f.any_of.iter().chain(f.none_of.iter()).flatten().copied())
        })
    }

    /// Whether a rule looks at the destination's address (decisions differ pod by pod).
    pub fn uses_destination_ip(&self) -> bool {
        self.rules.iter().flat_map(|r| &r.when).any(|c| matches!(c, ConditionSpec::DestinationIp(_)))
    }

    /// The first rule that matches, by index.
    pub fn matching_rule(&self, attrs: &Attributes<'_>) -> Option<usize> {
        self.rules.iter().position(|r| r.matches(attrs, self.action))
    }
}

/// A string pattern as Istio writes them: exact, `prefix*`, `*suffix`, or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pattern {
    fn parse(text: &str) -> Self {
        if text == "*" {
            Pattern::Any
        } else if let Some(rest) = text.strip_prefix('*') {
            Pattern::Suffix(rest.into())
        } else if let Some(rest) = text.strip_suffix('*') {
            Pattern::Prefix(rest.into())
        } else {
            Pattern::Exact(text.into())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == &**s,
            Pattern::Prefix(s) => value.starts_with(&**s),
            Pattern::Suffix(s) => value.ends_with(&**s),
        }
    }

    fn matches_ignoring_case(&self, value: &str) -> bool {
        let lower = |s: &str| s.to_ascii_lowercase();
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value.eq_ignore_ascii_case(s),
            Pattern::Prefix(s) => lower(value).starts_with(&lower(s)),
            Pattern::Suffix(s) => lower(value).ends_with(&lower(s)),
        }
    }
}

/// An address block (`10.0.0.0/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpBlock {
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?} is not an address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| format!("{text:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 address is its IPv4 address.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// One field and its `not` form: matches when a value is listed (or nothing is) and no `not`
/// value is.
#[derive(Debug, Clone, PartialEq)]
pub struct Field<T> {
    pub any_of: Option<Vec<T>>,
    pub none_of: Option<Vec<T>>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self { any_of: None, none_of: None }
    }
}

impl<T> Field<T> {
    fn is_set(&self) -> bool {
        self.any_of.is_some() || self.none_of.is_some()
    }

    fn matches(&self, hit: impl Fn(&T) -> bool) -> bool {
        self.any_of.as_ref().is_none_or(|v| v.iter().any(&hit)) && self.none_of.as_ref().is_none_or(|v| !v.iter().any(&hit))
    }
}

/// `from.source`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SourceSpec {
    /// `trust-domain/ns/<ns>/sa/<sa>`, as Istio writes principals.
    pub principals: Field<Pattern>,
    pub namespaces: Field<Pattern>,
    /// `<ns>/<sa>`.
    pub service_accounts: Field<Pattern>,
    pub ip_blocks: Field<IpBlock>,
    /// JWT principals: a request attribute mesh does not read (no JWT validation): as unseen,
    /// even in a request.
    pub request_principals: bool,
}

/// `to.operation`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OperationSpec {
    pub ports: Field<u16>,
    pub hosts: Field<Pattern>,
    pub methods: Field<Pattern>,
    pub paths: Field<Pattern>,
}

/// A `when` condition on a key mesh reads from a connection; others are request attributes.
#[derive(Debug, Clone, PartialEq)]
pub enum ConditionSpec {
    SourceIp(Field<IpBlock>),
    SourceNamespace(Field<Pattern>),
    SourcePrincipal(Field<Pattern>),
    DestinationIp(Field<IpBlock>),
    DestinationPort(Field<u16>),
    /// `request.*`: seen in requests only.
    Request,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleSpec {
    pub from: Option<Vec<SourceSpec>>,
    pub to: Option<Vec<OperationSpec>>,
    pub when: Vec<ConditionSpec>,
}

impl RuleSpec {
    pub fn has_l7(&self) -> bool {
        self.from.iter().flatten().any(|s| s.request_principals)
            || self.to.iter().flatten().any(|o| o.hosts.is_set() || o.methods.is_set() || o.paths.is_set())
            || self.when.iter().any(|c| matches!(c, ConditionSpec::Request))
    }

    fn matches(&self, attrs: &Attributes<'_>, action: Action) -> bool {
        // Where a request attribute is asked for and none is seen: an ALLOW rule does not
        // match; a DENY (or AUDIT) rule matches on its other parts. Requests the source's
        // proxy checked: the other way round (it applied those parts itself).
        let unseen = (action != Action::Allow) != attrs.l7_checked;
        let l7 = attrs.request.as_ref();
        let from = self.from.as_ref().is_none_or(|sources| sources.iter().any(|s| s.matches(attrs, unseen)));
        let to = self.to.as_ref().is_none_or(|ops| {
            ops.iter().any(|o| {
                o.ports.matches(|p| *p == attrs.port)
                    && match l7 {
                        Some(r) => {
                            o.hosts.matches(|h| h.matches_ignoring_case(r.host))
                                && o.methods.matches(|m| m.matches(r.method))
                                && o.paths.matches(|p| p.matches(r.path))
                        }
                        None => unseen || !(o.hosts.is_set() || o.methods.is_set() || o.paths.is_set()),
                    }
            })
        });
        let when = self.when.iter().all(|c| match c {
            ConditionSpec::SourceIp(f) => attrs.source_ip.map_or(f.any_of.is_none(), |ip| f.matches(|b| b.contains(ip))),
            ConditionSpec::SourceNamespace(f) => attrs.source.map_or(f.any_of.is_none(), |s| f.matches(|p| p.matches(s.namespace))),
            ConditionSpec::SourcePrincipal(f) => attrs.source.map_or(f.any_of.is_none(), |s| f.matches(|p| p.matches(s.principal))),
            ConditionSpec::DestinationIp(f) => f.matches(|b| b.contains(attrs.destination_ip)),
            ConditionSpec::DestinationPort(f) => f.matches(|p| *p == attrs.port),
            // Request headers and claims are never read here: as unseen, even in a request.
            ConditionSpec::Request => unseen,
        });
        from && to && when
    }
}

impl SourceSpec {
    fn matches(&self, attrs: &Attributes<'_>, unseen: bool) -> bool {
        // Identity fields need a peer with one: a plaintext peer matches no listed value, not
        // even `*`.
        // Without one (plaintext), a listed value cannot match and a `not` value is not there,
        // as Envoy's RBAC has it: `notNamespaces` matches a plaintext peer.
        fn identity<'a>(f: &Field<Pattern>, source: Option<Peer<'a>>, of: fn(Peer<'a>) -> &'a str) -> bool {
            source.map_or(f.any_of.is_none(), |s| f.matches(|p| p.matches(of(s))))
        }
        let source = attrs.source;
        identity(&self.principals, source, |s| s.principal)
            && identity(&self.namespaces, source, |s| s.namespace)
            && identity(&self.service_accounts, source, |s| s.service_account)
            && attrs.source_ip.map_or(self.ip_blocks.any_of.is_none(), |ip| self.ip_blocks.matches(|b| b.contains(ip)))
            && (!self.request_principals || unseen)
    }
}

/// A verified peer, as policies name it.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// `cluster.local/ns/default/sa/sleep` (no `spiffe://`).
    pub principal: &'a str,
    pub namespace: &'a str,
    /// `<ns>/<sa>`.
    pub service_account: &'a str,
}

/// What a request adds to a connection.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub host: &'a str,
}

/// What a decision is made of.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// None for plaintext.
    pub source: Option<Peer<'a>>,
    pub source_ip: Option<IpAddr>,
    pub destination_ip: IpAddr,
    /// The destination workload's port.
    pub port: u16,
    /// None: a connection (L4).
    pub request: Option<Request<'a>>,
    /// A connection whose requests the source's agent (its L7 proxy) has already decided on,
    /// request by request: what rules ask of requests counts as checked there (an ALLOW's
    /// request fields as met, a DENY's as not), and the rest is decided here.
    pub l7_checked: bool,
}

/// PeerAuthentication's `mtls.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the wider policy.
    Unset,
    Disable,
    Permissive,
    Strict,
}

impl MtlsMode {
    fn parse(text: Option<&str>) -> Result<Self, String> {
        Ok(match text.unwrap_or("UNSET") {
            "UNSET" => MtlsMode::Unset,
            "DISABLE" => MtlsMode::Disable,
            "PERMISSIVE" => MtlsMode::Permissive,
            "STRICT" => MtlsMode::Strict,
            other => return Err(format!("must be UNSET, DISABLE, PERMISSIVE or STRICT, got {other:?}")),
        })
    }
}

/// A PeerAuthentication, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerAuthSpec {
    pub key: ObjectKey,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub ports: BTreeMap<u16, MtlsMode>,
}

impl PeerAuthSpec {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        selects(self.selector.as_ref(), labels)
    }
}

/// Every policy the store holds, by namespace; rebuilt (O(policies)) when one changes, shared
/// by snapshots otherwise, so a consumer sees a change as a new `Arc`.
#[derive(Debug, Default, Clone)]
pub struct Policies {
    pub authorization: BTreeMap<String, Vec<Arc<PolicySpec>>>,
    pub peer_authentication: BTreeMap<String, Vec<Arc<PeerAuthSpec>>>,
}

impl Policies {
    pub fn is_empty(&self) -> bool {
        self.authorization.is_empty() && self.peer_authentication.is_empty()
    }

    pub fn len(&self) -> usize {
        self.authorization.values().map(Vec::len).sum()
    }
}

/// Whether `labels` have every label of `selector` (None: every workload of the namespace).
fn selects(selector: Option<&BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|want| want.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn selector(s: Option<&istio::WorkloadSelector>) -> Option<BTreeMap<String, String>> {
    s.map(|s| s.match_labels.clone()).filter(|labels| !labels.is_empty())
}

/// Validates an AuthorizationPolicy; every problem names its field.
pub fn authorization(policy: &istio::AuthorizationPolicy, key: &ObjectKey) -> Result<PolicySpec, Vec<FieldError>> {
    let spec = &policy.spec;
    let mut errors = Vec::new();
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        let field = if spec.target_ref.is_some() { "spec.targetRef" } else { "spec.targetRefs" };
        errors.push(err(
            field,
            "waypoint and gateway policies are not supported (mesh has no waypoints): select workloads with spec.selector",
        ));
    }
    let action = match spec.action.as_deref().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => Action::Audit,
        "CUSTOM" => {
            errors.push(err("spec.action", "CUSTOM (an external authorizer) is not supported"));
            Action::Deny
        }
        other => {
            errors.push(err("spec.action", format!("must be ALLOW, DENY or AUDIT, got {other:?}")));
            Action::Deny
        }
    };
    if spec.provider.is_some() {
        errors.push(err("spec.provider", "only with action CUSTOM, which is not supported"));
    }
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        rules.push(RuleSpec {
            from: rule.from.as_ref().map(|from| {
                from.iter().enumerate().map(|(j, f)| source(f.source.as_ref(), &format!("{at}.from[{j}].source"), &mut errors)).collect()
            }),
            to: rule.to.as_ref().map(|to| {
                to.iter()
                    .enumerate()
                    .map(|(j, t)| operation(t.operation.as_ref(), &format!("{at}.to[{j}].operation"), &mut errors))
                    .collect()
            }),
            when: rule
                .when
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(j, c)| condition(c, &format!("{at}.when[{j}]"), &mut errors))
                .collect(),
        });
    }
    if errors.is_empty() {
        Ok(PolicySpec { key: key.clone(), selector: selector(spec.selector.as_ref()), action, rules })
    } else {
        Err(errors)
    }
}

fn patterns(values: Option<&Vec<String>>, field: &str, errors: &mut Vec<FieldError>) -> Option<Vec<Pattern>> {
    let values = values?;
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            errors.push(err(format!("{field}[{i}]"), "must not be empty"));
        } else if v.len() > 1 && v[1..v.len() - 1].contains('*') {
            errors.push(err(format!("{field}[{i}]"), format!("{v:?}: `*` may only begin or end a value")));
        }
    }
    Some(values.iter().map(|v| Pattern::parse(v)).collect())
}

fn blocks(values: Option<&Vec<String>>, field: &str, errors: &mut Vec<FieldError>) -> Option<Vec<IpBlock>> {
    let values = values?;
    Some(
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| IpBlock::parse(v).map_err(|e| errors.push(err(format!("{field}[{i}]"), e))).ok())
            .collect(),
    )
}

fn ports(values: Option<&Vec<String>>, field: &str, errors: &mut Vec<FieldError>) -> Option<Vec<u16>> {
    let values = values?;
    Some(
        values
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                v.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| errors.push(err(format!("{field}[{i}]"), format!("{v:?} is not a port (1-65535)"))))
                    .ok()
            })
            .collect(),
    )
}

fn source(s: Option<&istio::Source>, at: &str, errors: &mut Vec<FieldError>) -> SourceSpec {
    let Some(s) = s else { return SourceSpec::default() };
    let f = |name: &str| format!("{at}.{name}");
    if s.remote_ip_blocks.is_some() || s.not_remote_ip_blocks.is_some() {
        errors.push(err(f("remoteIpBlocks"), "needs X-Forwarded-For from a gateway, which mesh does not read: use ipBlocks"));
    }
    let principals = |v: Option<&Vec<String>>, name: &str, errors: &mut Vec<FieldError>| {
        let p = patterns(v, &f(name), errors);
        // Istio writes principals without the scheme; accept it and drop it.
        p.map(|p| {
            p.into_iter()
                .map(|p| match p {
                    Pattern::Exact(s) => Pattern::Exact(s.strip_prefix("spiffe://").unwrap_or(&s).into()),
                    Pattern::Prefix(s) => Pattern::Prefix(s.strip_prefix("spiffe://").unwrap_or(&s).into()),
                    other => other,
                })
                .collect()
        })
    };
    SourceSpec {
        principals: Field {
            any_of: principals(s.principals.as_ref(), "principals", errors),
            none_of: principals(s.not_principals.as_ref(), "notPrincipals", errors),
        },
        namespaces: Field {
            any_of: patterns(s.namespaces.as_ref(), &f("namespaces"), errors),
            none_of: patterns(s.not_namespaces.as_ref(), &f("notNamespaces"), errors),
        },
        service_accounts: Field {
            any_of: patterns(s.service_accounts.as_ref(), &f("serviceAccounts"), errors),
            none_of: patterns(s.not_service_accounts.as_ref(), &f("notServiceAccounts"), errors),
        },
        ip_blocks: Field {
            any_of: blocks(s.ip_blocks.as_ref(), &f("ipBlocks"), errors),
            none_of: blocks(s.not_ip_blocks.as_ref(), &f("notIpBlocks"), errors),
        },
        request_principals: s.request_principals.is_some() || s.not_request_principals.is_some(),
    }
}

fn operation(o: Option<&istio::Operation>, at: &str, errors: &mut Vec<FieldError>) -> OperationSpec {
    let Some(o) = o else { return OperationSpec::default() };
    let f = |name: &str| format!("{at}.{name}");
    OperationSpec {
        ports: Field { any_of: ports(o.ports.as_ref(), &f("ports"), errors), none_of: ports(o.not_ports.as_ref(), &f("notPorts"), errors) },
        hosts: Field {
            any_of: patterns(o.hosts.as_ref(), &f("hosts"), errors),
            none_of: patterns(o.not_hosts.as_ref(), &f("notHosts"), errors),
        },
        methods: Field {
            any_of: patterns(o.methods.as_ref(), &f("methods"), errors),
            none_of: patterns(o.not_methods.as_ref(), &f("notMethods"), errors),
        },
        paths: Field {
            any_of: patterns(o.paths.as_ref(), &f("paths"), errors),
            none_of: patterns(o.not_paths.as_ref(), &f("notPaths"), errors),
        },
    }
}

fn condition(c: &istio::Condition, at: &str, errors: &mut Vec<FieldError>) -> Option<ConditionSpec> {
    if c.values.is_none() && c.not_values.is_none() {
        errors.push(err(format!("{at}.values"), "a condition needs values or notValues"));
        return None;
    }
    let (values, not_values) = (c.values.as_ref(), c.not_values.as_ref());
    let vf = format!("{at}.values");
    let nf = format!("{at}.notValues");
    Some(match c.key.as_str() {
        "source.ip" => ConditionSpec::SourceIp(Field { any_of: blocks(values, &vf, errors), none_of: blocks(not_values, &nf, errors) }),
        "source.namespace" => {
            ConditionSpec::SourceNamespace(Field { any_of: patterns(values, &vf, errors), none_of: patterns(not_values, &nf, errors) })
        }
        "source.principal" => {
            ConditionSpec::SourcePrincipal(Field { any_of: patterns(values, &vf, errors), none_of: patterns(not_values, &nf, errors) })
        }
        "destination.ip" => {
            ConditionSpec::DestinationIp(Field { any_of: blocks(values, &vf, errors), none_of: blocks(not_values, &nf, errors) })
        }
        "destination.port" => {
            ConditionSpec::DestinationPort(Field { any_of: ports(values, &vf, errors), none_of: ports(not_values, &nf, errors) })
        }
        key if key.starts_with("request.") => ConditionSpec::Request,
        other => {
            errors.push(err(
                format!("{at}.key"),
                format!("{other:?} is not a condition key mesh reads (source.ip, source.namespace, source.principal, destination.ip, destination.port, request.*)"),
            ));
            return None;
        }
    })
}

/// Validates a PeerAuthentication.
pub fn peer_authentication(pa: &istio::PeerAuthentication, key: &ObjectKey) -> Result<PeerAuthSpec, Vec<FieldError>> {
    let spec = &pa.spec;
    let mut errors = Vec::new();
    let mode = MtlsMode::parse(spec.mtls.as_ref().and_then(|m| m.mode.as_deref())).unwrap_or_else(|e| {
        errors.push(err("spec.mtls.mode", e));
        MtlsMode::Unset
    });
    let selector = selector(spec.selector.as_ref());
    let mut ports = BTreeMap::new();
    if let Some(levels) = &spec.port_level_mtls {
        if selector.is_none() {
            errors.push(err("spec.portLevelMtls", "needs a spec.selector (Istio's rule: port modes are per workload)"));
        }
        for (port, m) in levels {
            let field = format!("spec.portLevelMtls[{port:?}]");
            match (port.parse::<u16>().ok().filter(|p| *p != 0), MtlsMode::parse(m.mode.as_deref())) {
                (Some(p), Ok(mode)) => {
                    ports.insert(p, mode);
                }
                (None, _) => errors.push(err(field, format!("{port:?} is not a port (1-65535)"))),
                (_, Err(e)) => errors.push(err(format!("{field}.mode"), e)),
            }
        }
    }
    if errors.is_empty() { Ok(PeerAuthSpec { key: key.clone(), selector, mode, ports }) } else { Err(errors) }
}

/// A pod's mutual TLS mode on its ports, by Istio's PeerAuthentication rules: the workload's
/// policy (in its namespace, selecting it; the first by name if several), then its namespace's
/// (no selector), then the mesh's (no selector, root namespace), then PERMISSIVE; UNSET at a
/// level defers to the next. Port-level modes come from the workload's policy. DISABLE accepts
/// plaintext as PERMISSIVE does (as in Istio ambient, where it cannot turn mTLS off).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodMtls {
    /// The mode of ports without one of their own, and the policy that set it (None: the
    /// default).
    pub mode: Option<(MtlsMode, ObjectKey)>,
    /// Ports whose mode differs from `mode`.
    pub ports: BTreeMap<u16, (MtlsMode, ObjectKey)>,
}

impl PodMtls {
    pub fn of(policies: &Policies, root_namespace: &str, namespace: &str, labels: &BTreeMap<String, String>) -> Self {
        let in_namespace = policies.peer_authentication.get(namespace).map(Vec::as_slice).unwrap_or_default();
        let workload = in_namespace.iter().find(|p| p.selector.is_some() && p.selects(labels));
        let namespace_wide = in_namespace.iter().find(|p| p.selector.is_none());
        let mesh_wide = policies.peer_authentication.get(root_namespace).and_then(|list| list.iter().find(|p| p.selector.is_none()));
        let mode = [workload, namespace_wide, mesh_wide]
            .into_iter()
            .flatten()
            .find(|p| p.mode != MtlsMode::Unset)
            .map(|p| (effective(p.mode), p.key.clone()));
        let base = mode.as_ref().map_or(MtlsMode::Permissive, |(m, _)| *m);
        let ports = workload
            .map(|p| {
                p.ports
                    .iter()
                    .filter(|(_, m)| **m != MtlsMode::Unset && effective(**m) != base)
                    .map(|(port, m)| (*port, (effective(*m), p.key.clone())))
                    .collect()
            })
            .unwrap_or_default();
        Self { mode, ports }
    }

    pub fn is_strict_anywhere(&self) -> bool {
        self.mode.as_ref().is_some_and(|(m, _)| *m == MtlsMode::Strict) || self.ports.values().any(|(m, _)| *m == MtlsMode::Strict)
    }
}

fn effective(mode: MtlsMode) -> MtlsMode {
    if mode == MtlsMode::Disable { MtlsMode::Permissive } else { mode }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::state::{NodeContext, store};

    fn pa(namespace: &str, name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
        )
    }

    fn mtls_of(yaml: &str, namespace: &str, labels: &[(&str, &str)]) -> PodMtls {
        let snapshot = store::load(Path::new("pa.yaml"), yaml, NodeContext { node: "n".into(), zone: None }).unwrap().snapshot();
        let labels = labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        PodMtls::of(&snapshot.policies, "istio-system", namespace, &labels)
    }

    fn mode(m: &PodMtls) -> Option<(MtlsMode, String)> {
        m.mode.as_ref().map(|(mode, key)| (*mode, key.to_string()))
    }

    #[test]
    fn peer_authentication_resolves_workload_then_namespace_then_mesh_with_port_exceptions() {
        let mesh = pa("istio-system", "default", "{mtls: {mode: STRICT}}");
        let namespace = pa("shop", "ns", "{mtls: {mode: PERMISSIVE}}");
        let unset = pa("lab", "unset", "{mtls: {mode: UNSET}}");
        let workload = pa(
            "shop",
            "web",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {'8080': {mode: DISABLE}, '9090': {mode: STRICT}}}",
        );

        assert_eq!(mode(&mtls_of("", "shop", &[])), None, "nothing: PERMISSIVE by default");
        assert!(!mtls_of("", "shop", &[]).is_strict_anywhere());
        assert_eq!(mode(&mtls_of(&mesh, "shop", &[])), Some((MtlsMode::Strict, "istio-system/default".into())), "mesh-wide");
        let both = format!("{mesh}{namespace}");
        assert_eq!(mode(&mtls_of(&both, "shop", &[])), Some((MtlsMode::Permissive, "shop/ns".into())), "the namespace overrides");
        let with_unset = format!("{mesh}{unset}");
        assert_eq!(mode(&mtls_of(&with_unset, "lab", &[])), Some((MtlsMode::Strict, "istio-system/default".into())), "UNSET inherits");

        let all = format!("{mesh}{namespace}{workload}");
        let web = mtls_of(&all, "shop", &[("app", "web")]);
        assert_eq!(mode(&web), Some((MtlsMode::Strict, "shop/web".into())), "the workload's own policy first");
        assert_eq!(web.ports.get(&8080).map(|(m, _)| *m), Some(MtlsMode::Permissive), "DISABLE accepts plaintext, as PERMISSIVE");
        assert_eq!(web.ports.get(&9090), None, "a port with the pod's own mode is no exception");
        let other = mtls_of(&all, "shop", &[("app", "db")]);
        assert_eq!(mode(&other), Some((MtlsMode::Permissive, "shop/ns".into())), "not selected: the namespace's");
        assert!(other.ports.is_empty());
    }
}
