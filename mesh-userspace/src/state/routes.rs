//! Gateway API HTTPRoutes attached to Services (GAMMA: a parentRef of kind Service), validated
//! into the form the proxy matches requests against.
//!
//! Only what the spec makes a Route's own business is rejected here (a bad regex, a path that
//! does not start with "/", a weight out of range): the whole configuration is then refused.
//! References to Services that do not exist are accepted, as the spec says: requests routed to
//! them get a 500.
use std::{fmt, time::Duration};

use gateway_api::experimental::{
    grpcroutes::GrpcRoute,
    httproutes::{
        HttpRoute, HttpRouteRules, HttpRouteRulesMatches, HttpRouteRulesMatchesHeadersType, HttpRouteRulesMatchesPathType,
        HttpRouteRulesMatchesQueryParamsType,
    },
};

use super::model::{FieldError, ObjectKey, field_error as err};

/// A compiled regular expression, compared by its pattern.
#[derive(Clone)]
pub struct Pattern(pub regex::Regex);

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/{}/", self.0.as_str())
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for Pattern {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: "/foo" matches "/foo" and "/foo/bar", not "/foobar". Stored without a
    /// trailing slash ("/" stays "/").
    Prefix(String),
    RegularExpression(Pattern),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    Exact(String),
    RegularExpression(Pattern),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::RegularExpression(p) => p.0.is_match(value),
        }
    }
}

/// One `matches[]` entry: every condition must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MatchSpec {
    pub path: PathMatch,
    pub method: Option<String>,
    /// Header names lower-cased (HTTP header names are case-insensitive).
    pub headers: Vec<(String, ValueMatch)>,
    pub query: Vec<(String, ValueMatch)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRefSpec {
    pub service: ObjectKey,
    pub port: Option<u16>,
    /// 0 takes no traffic.
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetrySpec {
    pub codes: Vec<u16>,
    pub attempts: Option<u32>,
    pub backoff: Option<Duration>,
}

/// Header edits of a RequestHeaderModifier or ResponseHeaderModifier filter.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeaderEdits {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    Full(String),
    /// Replaces the matched PathPrefix.
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterSpec {
    RequestHeaders(HeaderEdits),
    ResponseHeaders(HeaderEdits),
    Redirect { scheme: Option<String>, hostname: Option<String>, path: Option<PathModifier>, port: Option<u16>, status: u16 },
    Rewrite { hostname: Option<String>, path: Option<PathModifier> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    /// Never empty: a rule without matches matches every request (prefix "/").
    pub matches: Vec<MatchSpec>,
    pub backends: Vec<BackendRefSpec>,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<RetrySpec>,
    pub filters: Vec<FilterSpec>,
}

/// A validated HTTPRoute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub key: ObjectKey,
    /// `metadata.creationTimestamp` (RFC 3339), the first tie-breaker between routes.
    pub created: Option<String>,
    /// The Services it attaches to.
    pub parents: Vec<ObjectKey>,
    pub rules: Vec<RuleSpec>,
}

/// Regular expressions match the whole value, as Envoy-based implementations do.
fn pattern(value: &str, field: &str) -> Result<Pattern, FieldError> {
    regex::Regex::new(&format!("^(?:{value})$")).map(Pattern).map_err(|e| err(field, format!("not a valid regular expression: {e}")))
}

fn duration(value: &str, field: &str) -> Result<Duration, FieldError> {
    value
        .parse::<gateway_api::Duration>()
        .map(|d| Duration::from_millis(d.as_millis() as u64))
        .map_err(|e| err(field, format!("not a Gateway API duration (like 10s or 500ms): {e}")))
}

/// Validates an HTTPRoute whose key is `key`. A route with no Service parent is not for mesh:
/// `Ok(None)`.
pub fn validate(route: HttpRoute, key: ObjectKey, created: Option<String>) -> Result<Option<RouteSpec>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let parents =
        service_parents(route.spec.parent_refs.unwrap_or_default().into_iter().map(|p| (p.kind, p.group, p.namespace, p.name)), &key);
    let mut rules = Vec::new();
    for (i, rule) in route.spec.rules.unwrap_or_default().into_iter().enumerate() {
        match validate_rule(rule, &format!("spec.rules[{i}]"), &key) {
            Ok(rule) => rules.push(rule),
            Err(mut e) => errors.append(&mut e),
        }
    }
    finish_route(key, created, parents, rules, errors)
}

/// The Services among a route's `parentRefs` (kind, group, namespace, name).
fn service_parents(
    refs: impl Iterator<Item = (Option<String>, Option<String>, Option<String>, String)>,
    key: &ObjectKey,
) -> Vec<ObjectKey> {
    refs.filter(|(kind, group, _, _)| kind.as_deref() == Some("Service") && matches!(group.as_deref(), Some("") | Some("core") | None))
        .map(|(_, _, namespace, name)| ObjectKey { namespace: namespace.unwrap_or_else(|| key.namespace.clone()), name })
        .collect()
}

/// A route of no Service is not for mesh (`Ok(None)`); one with no rules gets the spec's
/// default: match everything, no backends (so 500s).
fn finish_route(
    key: ObjectKey,
    created: Option<String>,
    parents: Vec<ObjectKey>,
    mut rules: Vec<RuleSpec>,
    errors: Vec<FieldError>,
) -> Result<Option<RouteSpec>, Vec<FieldError>> {
    if !errors.is_empty() {
        return Err(errors);
    }
    if parents.is_empty() {
        return Ok(None);
    }
    if rules.is_empty() {
        rules.push(RuleSpec {
            matches: vec![catch_all()],
            backends: Vec::new(),
            request_timeout: None,
            backend_timeout: None,
            retry: None,
            filters: Vec::new(),
        });
    }
    Ok(Some(RouteSpec { key, created, parents, rules }))
}

/// A backendRef of either route kind.
struct BackendRef {
    kind: Option<String>,
    namespace: Option<String>,
    name: String,
    port: Option<i32>,
    weight: Option<i32>,
    has_filters: bool,
}

fn backend_refs(refs: impl Iterator<Item = BackendRef>, field: &str, key: &ObjectKey, errors: &mut Vec<FieldError>) -> Vec<BackendRefSpec> {
    let mut backends = Vec::new();
    for (j, b) in refs.enumerate() {
        let f = format!("{field}.backendRefs[{j}]");
        if b.kind.as_deref().is_some_and(|k| k != "Service") {
            errors.push(err(format!("{f}.kind"), "mesh routes to Services only"));
            continue;
        }
        let weight = match b.weight.unwrap_or(1) {
            w @ 0..=1_000_000 => w as u32,
            w => {
                errors.push(err(format!("{f}.weight"), format!("must be between 0 and 1000000, got {w}")));
                continue;
            }
        };
        let port = match b.port {
            None => None,
            Some(p @ 1..=65535) => Some(p as u16),
            Some(p) => {
                errors.push(err(format!("{f}.port"), format!("must be between 1 and 65535, got {p}")));
                continue;
            }
        };
        if b.has_filters {
            errors.push(err(format!("{f}.filters"), "filters on a backendRef are not supported yet; put them on the rule"));
            continue;
        }
        backends.push(BackendRefSpec {
            service: ObjectKey { namespace: b.namespace.unwrap_or_else(|| key.namespace.clone()), name: b.name },
            port,
            weight,
        });
    }
    backends
}

fn catch_all() -> MatchSpec {
    MatchSpec { path: PathMatch::Prefix("/".into()), method: None, headers: Vec::new(), query: Vec::new() }
}

fn validate_rule(rule: HttpRouteRules, field: &str, key: &ObjectKey) -> Result<RuleSpec, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut matches = Vec::new();
    for (j, m) in rule.matches.unwrap_or_default().into_iter().enumerate() {
        match validate_match(m, &format!("{field}.matches[{j}]")) {
            Ok(m) => matches.push(m),
            Err(e) => errors.push(e),
        }
    }
    if matches.is_empty() {
        matches.push(catch_all());
    }
    let refs = rule.backend_refs.unwrap_or_default().into_iter().map(|b| BackendRef {
        kind: b.kind,
        namespace: b.namespace,
        name: b.name,
        port: b.port,
        weight: b.weight,
        has_filters: b.filters.is_some_and(|f| !f.is_empty()),
    });
    let backends = backend_refs(refs, field, key, &mut errors);
    let (mut request_timeout, mut backend_timeout) = (None, None);
    if let Some(t) = rule.timeouts {
        if let Some(v) = t.request {
            match duration(&v, &format!("{field}.timeouts.request")) {
                Ok(d) => request_timeout = Some(d),
                Err(e) => errors.push(e),
            }
        }
        if let Some(v) = t.backend_request {
            match duration(&v, &format!("{field}.timeouts.backendRequest")) {
                Ok(d) => backend_timeout = Some(d),
                Err(e) => errors.push(e),
            }
        }
        if let (Some(r), Some(b)) = (request_timeout, backend_timeout)
            && b > r
            && !r.is_zero()
        {
            errors.push(err(format!("{field}.timeouts.backendRequest"), "must not be longer than timeouts.request"));
        }
    }
    let mut retry = None;
    if let Some(r) = rule.retry {
        let mut spec = RetrySpec::default();
        for (j, code) in r.codes.unwrap_or_default().into_iter().enumerate() {
            match code {
                c @ 500..=599 => spec.codes.push(c as u16),
                c => errors.push(err(format!("{field}.retry.codes[{j}]"), format!("must be a 5xx status code, got {c}"))),
            }
        }
        match r.attempts {
            None => {}
            Some(a @ 0..=100) => spec.attempts = Some(a as u32),
            Some(a) => errors.push(err(format!("{field}.retry.attempts"), format!("must be between 0 and 100, got {a}"))),
        }
        if let Some(b) = r.backoff {
            match duration(&b, &format!("{field}.retry.backoff")) {
                Ok(d) => spec.backoff = Some(d),
                Err(e) => errors.push(e),
            }
        }
        retry = Some(spec);
    }
    let mut filters = Vec::new();
    for (j, f) in rule.filters.unwrap_or_default().into_iter().enumerate() {
        match validate_filter(f, &format!("{field}.filters[{j}]"), &matches) {
            Ok(f) => filters.push(f),
            Err(e) => errors.push(e),
        }
    }
    if filters.iter().any(|f| matches!(f, FilterSpec::Redirect { .. })) && filters.iter().any(|f| matches!(f, FilterSpec::Rewrite { .. })) {
        errors.push(err(format!("{field}.filters"), "RequestRedirect and URLRewrite cannot be used together"));
    }
    if errors.is_empty() { Ok(RuleSpec { matches, backends, request_timeout, backend_timeout, retry, filters }) } else { Err(errors) }
}

fn validate_match(m: HttpRouteRulesMatches, field: &str) -> Result<MatchSpec, FieldError> {
    let path = match m.path {
        None => PathMatch::Prefix("/".into()),
        Some(p) => {
            let value = p.value.unwrap_or_else(|| "/".into());
            let f = format!("{field}.path.value");
            match p.r#type.unwrap_or(HttpRouteRulesMatchesPathType::PathPrefix) {
                HttpRouteRulesMatchesPathType::RegularExpression => PathMatch::RegularExpression(pattern(&value, &f)?),
                kind => {
                    if !value.starts_with('/') {
                        return Err(err(f, format!("must start with \"/\", got {value:?}")));
                    }
                    if value.contains("//") || value.contains('?') || value.contains('#') {
                        return Err(err(f, format!("must be a plain path (no \"//\", \"?\" or \"#\"), got {value:?}")));
                    }
                    if kind == HttpRouteRulesMatchesPathType::Exact {
                        PathMatch::Exact(value)
                    } else {
                        let trimmed = value.trim_end_matches('/');
                        PathMatch::Prefix(if trimmed.is_empty() { "/".into() } else { trimmed.to_owned() })
                    }
                }
            }
        }
    };
    let mut headers = Vec::new();
    for (k, h) in m.headers.unwrap_or_default().into_iter().enumerate() {
        let f = format!("{field}.headers[{k}].value");
        let value = match h.r#type {
            Some(HttpRouteRulesMatchesHeadersType::RegularExpression) => ValueMatch::RegularExpression(pattern(&h.value, &f)?),
            _ => ValueMatch::Exact(h.value),
        };
        headers.push((h.name.to_ascii_lowercase(), value));
    }
    let mut query = Vec::new();
    for (k, q) in m.query_params.unwrap_or_default().into_iter().enumerate() {
        let f = format!("{field}.queryParams[{k}].value");
        let value = match q.r#type {
            Some(HttpRouteRulesMatchesQueryParamsType::RegularExpression) => ValueMatch::RegularExpression(pattern(&q.value, &f)?),
            _ => ValueMatch::Exact(q.value),
        };
        query.push((q.name, value));
    }
    let method = m.method.map(|method| serde_json::to_value(&method).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default());
    Ok(MatchSpec { path, method, headers, query })
}

fn edits(set: Vec<(String, String)>, add: Vec<(String, String)>, remove: Vec<String>) -> HeaderEdits {
    let lower = |v: Vec<(String, String)>| v.into_iter().map(|(n, v)| (n.to_ascii_lowercase(), v)).collect();
    HeaderEdits { set: lower(set), add: lower(add), remove: remove.into_iter().map(|n| n.to_ascii_lowercase()).collect() }
}

fn path_modifier(
    full: Option<String>,
    prefix: Option<String>,
    is_full: bool,
    field: &str,
    matches: &[MatchSpec],
) -> Result<PathModifier, FieldError> {
    if is_full {
        let value = full.ok_or_else(|| err(format!("{field}.replaceFullPath"), "required for ReplaceFullPath"))?;
        return Ok(PathModifier::Full(value));
    }
    let value = prefix.ok_or_else(|| err(format!("{field}.replacePrefixMatch"), "required for ReplacePrefixMatch"))?;
    if !matches.iter().all(|m| matches!(m.path, PathMatch::Prefix(_))) {
        return Err(err(format!("{field}.type"), "ReplacePrefixMatch needs every match of the rule to be a PathPrefix"));
    }
    Ok(PathModifier::Prefix(value))
}

fn validate_filter(
    f: gateway_api::experimental::httproutes::HttpRouteRulesFilters,
    field: &str,
    matches: &[MatchSpec],
) -> Result<FilterSpec, FieldError> {
    use gateway_api::experimental::httproutes::{
        HttpRouteRulesFiltersRequestRedirectPathType as RedirectPath, HttpRouteRulesFiltersRequestRedirectScheme as Scheme,
        HttpRouteRulesFiltersType as Type, HttpRouteRulesFiltersUrlRewritePathType as RewritePath,
    };
    let missing = |what: &str| err(format!("{field}.{what}"), format!("required for type {:?}", f.r#type));
    match f.r#type {
        Type::RequestHeaderModifier => {
            let m = f.request_header_modifier.clone().ok_or_else(|| missing("requestHeaderModifier"))?;
            Ok(FilterSpec::RequestHeaders(edits(
                m.set.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                m.add.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                m.remove.unwrap_or_default(),
            )))
        }
        Type::ResponseHeaderModifier => {
            let m = f.response_header_modifier.clone().ok_or_else(|| missing("responseHeaderModifier"))?;
            Ok(FilterSpec::ResponseHeaders(edits(
                m.set.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                m.add.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                m.remove.unwrap_or_default(),
            )))
        }
        Type::RequestRedirect => {
            let r = f.request_redirect.clone().ok_or_else(|| missing("requestRedirect"))?;
            let status = match r.status_code.unwrap_or(302) {
                s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                s => return Err(err(format!("{field}.requestRedirect.statusCode"), format!("must be 301, 302, 303, 307 or 308, got {s}"))),
            };
            let port = match r.port {
                None => None,
                Some(p @ 1..=65535) => Some(p as u16),
                Some(p) => return Err(err(format!("{field}.requestRedirect.port"), format!("must be between 1 and 65535, got {p}"))),
            };
            let path = match r.path {
                None => None,
                Some(p) => Some(path_modifier(
                    p.replace_full_path,
                    p.replace_prefix_match,
                    p.r#type == RedirectPath::ReplaceFullPath,
                    &format!("{field}.requestRedirect.path"),
                    matches,
                )?),
            };
            let scheme = r.scheme.map(|s| if s == Scheme::Https { "https" } else { "http" }.to_owned());
            Ok(FilterSpec::Redirect { scheme, hostname: r.hostname, path, port, status })
        }
        Type::UrlRewrite => {
            let r = f.url_rewrite.clone().ok_or_else(|| missing("urlRewrite"))?;
            let path = match r.path {
                None => None,
                Some(p) => Some(path_modifier(
                    p.replace_full_path,
                    p.replace_prefix_match,
                    p.r#type == RewritePath::ReplaceFullPath,
                    &format!("{field}.urlRewrite.path"),
                    matches,
                )?),
            };
            Ok(FilterSpec::Rewrite { hostname: r.hostname, path })
        }
        other => Err(err(format!("{field}.type"), format!("filter {other:?} is not supported"))),
    }
}

/// Validates a GRPCRoute into the same form as an HTTPRoute: a gRPC call is a POST to
/// `/service/method`, so a method match becomes a path match (both given: Exact; service only:
/// PathPrefix `/service`; method only or RegularExpression: a regex), which keeps the spec's
/// order (service and method, then service, then method). Headers, filters and backendRefs
/// mean the same as in an HTTPRoute.
pub fn validate_grpc(route: GrpcRoute, key: ObjectKey, created: Option<String>) -> Result<Option<RouteSpec>, Vec<FieldError>> {
    use gateway_api::experimental::grpcroutes::{
        GrpcRouteRulesFiltersType as Type, GrpcRouteRulesMatchesHeadersType, GrpcRouteRulesMatchesMethodType,
    };
    let mut errors = Vec::new();
    let parents =
        service_parents(route.spec.parent_refs.unwrap_or_default().into_iter().map(|p| (p.kind, p.group, p.namespace, p.name)), &key);
    let mut rules = Vec::new();
    for (i, rule) in route.spec.rules.unwrap_or_default().into_iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let mut matches = Vec::new();
        for (j, m) in rule.matches.unwrap_or_default().into_iter().enumerate() {
            let f = format!("{field}.matches[{j}]");
            let path = match m.method {
                None => PathMatch::Prefix("/".into()),
                Some(method) => {
                    let regex = method.r#type == Some(GrpcRouteRulesMatchesMethodType::RegularExpression);
                    match grpc_path(
                        regex,
                        method.service.filter(|s| !s.is_empty()),
                        method.method.filter(|s| !s.is_empty()),
                        &format!("{f}.method"),
                    ) {
                        Ok(path) => path,
                        Err(e) => {
                            errors.push(e);
                            continue;
                        }
                    }
                }
            };
            let mut headers = Vec::new();
            for (k, h) in m.headers.unwrap_or_default().into_iter().enumerate() {
                let value = match h.r#type {
                    Some(GrpcRouteRulesMatchesHeadersType::RegularExpression) => {
                        match pattern(&h.value, &format!("{f}.headers[{k}].value")) {
                            Ok(p) => ValueMatch::RegularExpression(p),
                            Err(e) => {
                                errors.push(e);
                                continue;
                            }
                        }
                    }
                    _ => ValueMatch::Exact(h.value),
                };
                headers.push((h.name.to_ascii_lowercase(), value));
            }
            matches.push(MatchSpec { path, method: None, headers, query: Vec::new() });
        }
        if matches.is_empty() {
            matches.push(catch_all());
        }
        let refs = rule.backend_refs.unwrap_or_default().into_iter().map(|b| BackendRef {
            kind: b.kind,
            namespace: b.namespace,
            name: b.name,
            port: b.port,
            weight: b.weight,
            has_filters: b.filters.is_some_and(|f| !f.is_empty()),
        });
        let backends = backend_refs(refs, &field, &key, &mut errors);
        let mut filters = Vec::new();
        for (j, f) in rule.filters.unwrap_or_default().into_iter().enumerate() {
            let ff = format!("{field}.filters[{j}]");
            match f.r#type {
                Type::RequestHeaderModifier => match f.request_header_modifier {
                    Some(m) => filters.push(FilterSpec::RequestHeaders(edits(
                        m.set.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                        m.add.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                        m.remove.unwrap_or_default(),
                    ))),
                    None => errors.push(err(format!("{ff}.requestHeaderModifier"), "required for type RequestHeaderModifier")),
                },
                Type::ResponseHeaderModifier => match f.response_header_modifier {
                    Some(m) => filters.push(FilterSpec::ResponseHeaders(edits(
                        m.set.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                        m.add.unwrap_or_default().into_iter().map(|h| (h.name, h.value)).collect(),
                        m.remove.unwrap_or_default(),
                    ))),
                    None => errors.push(err(format!("{ff}.responseHeaderModifier"), "required for type ResponseHeaderModifier")),
                },
                other => errors.push(err(format!("{ff}.type"), format!("filter {other:?} is not supported"))),
            }
        }
        rules.push(RuleSpec { matches, backends, request_timeout: None, backend_timeout: None, retry: None, filters });
    }
    finish_route(key, created, parents, rules, errors)
}

/// The path a gRPC method match stands for.
fn grpc_path(regex: bool, service: Option<String>, method: Option<String>, field: &str) -> Result<PathMatch, FieldError> {
    if !regex {
        for part in [&service, &method].into_iter().flatten() {
            if part.contains('/') {
                return Err(err(field, format!("{part:?} must not contain \"/\"")));
            }
        }
    }
    Ok(match (regex, service, method) {
        (_, None, None) => return Err(err(field, "needs service, method or both")),
        (false, Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
        (false, Some(s), None) => PathMatch::Prefix(format!("/{s}")),
        (false, None, Some(m)) => PathMatch::RegularExpression(pattern(&format!("/[^/]+/{}", regex::escape(&m)), field)?),
        (true, s, m) => PathMatch::RegularExpression(pattern(
            &format!("/(?:{})/(?:{})", s.as_deref().unwrap_or("[^/]+"), m.as_deref().unwrap_or("[^/]+")),
            field,
        )?),
    })
}
