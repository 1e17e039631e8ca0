//! The outbound proxy (:15001): connections to L7-managed Services arrive here instead of at a
//! backend (connect4/6 sent them). The Service the client dialled is read back from the kernel
//! (`mesh_l7orig`, by the client's address and port), each request is routed by the Service's
//! HTTPRoutes and sent to an endpoint of the chosen backend Service over pooled connections.
//!
//! The proxy's own upstream connections go to endpoint addresses, never to Service VIPs, so
//! the kernel never captures them again.
use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};

use super::{
    balancer::{Balancer, Verdict},
    router::{RequestParts, Router, pick_backend},
};
use crate::{
    ebpf::maps::OrigDstMap,
    state::{
        ObjectKey, Protocol, ServiceView, Snapshot,
        model::{EjectionPolicy, RetryBudgetPolicy},
        routes::{FilterSpec, HeaderEdits, MatchSpec, PathMatch, PathModifier},
    },
    telemetry::{Telemetry, identity::Named, metrics::RetryLabels},
};

/// Where a captured connection was going: the proxy asks this for every accepted connection.
/// In production the kernel recorded it (`mesh_l7orig`); tests give a fake.
pub trait OrigDst: Send + Sync {
    /// The address `peer` dialled (taken: asked once per connection).
    fn take(&self, peer: SocketAddr) -> Option<SocketAddr>;
}

impl OrigDst for OrigDstMap {
    fn take(&self, peer: SocketAddr) -> Option<SocketAddr> {
        OrigDstMap::take(self, peer)
    }
}

/// What the proxy keeps per backend Service across snapshots: the compiled routes (rebuilt
/// when the Service's view changes) and the runtime state that must outlive configuration
/// changes (balancer statistics and ejections, the retry budget). Pruned when the Service goes.
struct PerService {
    view: Arc<ServiceView>,
    router: Arc<Router>,
    budget: Arc<RetryBudget>,
    balancer: Arc<Balancer>,
}

type Body = BoxBody<Bytes, hyper::Error>;

pub struct Outbound {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    telemetry: Arc<Telemetry>,
    orig_dst: Box<dyn OrigDst>,
    client: Client<HttpConnector, Body>,
    /// HTTP/2 with prior knowledge (h2c), for requests that came in over HTTP/2 (gRPC).
    h2_client: Client<HttpConnector, Body>,
    per_service: Mutex<HashMap<ObjectKey, PerService>>,
}

impl Outbound {
    pub fn new(orig_dst: Box<dyn OrigDst>, snapshot: watch::Receiver<Arc<Snapshot>>, telemetry: Arc<Telemetry>) -> Self {
        Self {
            snapshot,
            telemetry,
            orig_dst,
            client: Client::builder(TokioExecutor::new()).build(connector()),
            h2_client: Client::builder(TokioExecutor::new()).http2_only(true).build(connector()),
            per_service: Mutex::new(HashMap::new()),
        }
    }

    /// The Service a captured client dialled.
    fn original_service(&self, peer: SocketAddr) -> Option<ObjectKey> {
        let dialled = self.orig_dst.take(peer)?;
        let snapshot = self.snapshot.borrow().clone();
        snapshot.frontends.get(&(dialled, Protocol::Tcp)).map(|k| k.service.clone())
    }

    /// Drops the runtime state of Services that are gone; called on every new snapshot.
    fn prune(&self, snapshot: &Snapshot) {
        self.per_service.lock().expect("per-service lock").retain(|service, _| snapshot.services.contains_key(service));
    }

    /// Proxies one request and counts it.
    async fn handle(self: Arc<Self>, service: Option<ObjectKey>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let started = std::time::Instant::now();
        let mut outcome = Outcome { backend: None, endpoint: None, flags: "-" };
        let response = self.forward(service, req, &mut outcome).await;
        let backend = outcome.backend.map(|k| Named { name: k.name, namespace: k.namespace });
        self.telemetry.record_request(
            backend.as_ref(),
            outcome.endpoint.map(|e| e.ip()),
            response.status().as_u16(),
            outcome.flags,
            started.elapsed().as_secs_f64() * 1000.0,
        );
        response
    }

    async fn forward(&self, service: Option<ObjectKey>, mut req: Request<hyper::body::Incoming>, outcome: &mut Outcome) -> Response<Body> {
        let started = Instant::now();
        let Some(service) = service else {
            return reply(StatusCode::BAD_REQUEST, "not a connection captured by mesh\n");
        };
        let router = self.service_state(&service).map(|s| s.0);
        let headers: Vec<(&str, &str)> =
            req.headers().iter().filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))).collect();
        let parts = RequestParts { method: req.method().as_str(), path: req.uri().path(), query: req.uri().query(), headers };
        let Some(matched) = router.as_ref().and_then(|r| r.route(&parts)) else {
            outcome.flags = "NR";
            return reply(StatusCode::NOT_FOUND, "no route\n");
        };
        let filters = &matched.rule.filters;
        if let Some(redirect) = filters.iter().find(|f| matches!(f, FilterSpec::Redirect { .. })) {
            return redirect_response(redirect, &req, matched.matched);
        }
        let Some(backend) = pick_backend(&matched.rule.backends, fastrand::u32(..)) else {
            outcome.flags = "NR";
            return reply(StatusCode::INTERNAL_SERVER_ERROR, "route has no backend with weight\n");
        };
        outcome.backend = Some(backend.service.clone());
        let endpoints = self.snapshot.borrow().services.get(&backend.service).map(|v| v.endpoints(backend.port)).unwrap_or_default();
        if endpoints.is_empty() {
            outcome.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no usable endpoint\n");
        }
        // The route's request timeout, or the client's own grpc-timeout if sooner.
        let grpc = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let deadline = [matched.rule.request_timeout.filter(|t| !t.is_zero()), grpc].into_iter().flatten().min().map(|t| started + t);
        drop(parts);

        let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut head, body) = req.into_parts();
        let mut path = head.uri.path().to_owned();
        for filter in filters {
            match filter {
                FilterSpec::RequestHeaders(edits) => apply_edits(&mut head.headers, edits),
                FilterSpec::Rewrite { hostname, path: modifier } => {
                    if let Some(host) = hostname.as_deref().and_then(|h| h.parse().ok()) {
                        head.headers.insert(hyper::header::HOST, host);
                    }
                    if let Some(modifier) = modifier {
                        path = modify_path(&path, matched.matched, modifier);
                    }
                }
                _ => {}
            }
        }
        propagate_trace(&mut head.headers);
        let query = head.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        let target = format!("{path}{query}");

        if let Some(client_side) = upgrade {
            return self.upgrade(head, body, &target, &endpoints, client_side, outcome).await;
        }

        // A request is replayed (retried) only when its body is known small: buffered whole.
        let replayable = match body_length(&head.headers) {
            Some(n) if n <= MAX_REPLAY_BODY => match http_body_util::Limited::new(body, MAX_REPLAY_BODY as usize).collect().await {
                Ok(collected) => Some(collected.to_bytes()),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "request body shorter or longer than its Content-Length\n"),
            },
            _ => {
                // Streamed as it comes: one attempt.
                let mut stream_body = Some(body.boxed());
                return self
                    .attempts(&head, &target, &endpoints, matched.rule, deadline, filters, outcome, &backend.service, |_| {
                        stream_body.take()
                    })
                    .await;
            }
        };
        let bytes = replayable.unwrap_or_default();
        self.attempts(&head, &target, &endpoints, matched.rule, deadline, filters, outcome, &backend.service, |_| {
            Some(Full::new(bytes.clone()).map_err(|never: Infallible| match never {}).boxed())
        })
        .await
    }

    /// Sends the request, retrying on another endpoint in the safe cases: the body can be
    /// replayed (`next_body` gives it again), the failure happened before a response (connect
    /// failure, reset) or the response code is one the route's `retry` names, the deadline
    /// leaves room, and the backend Service's retry budget allows it.
    #[expect(clippy::too_many_arguments, reason = "one request's context, used once")]
    async fn attempts(
        &self,
        head: &hyper::http::request::Parts,
        target: &str,
        endpoints: &[SocketAddr],
        rule: &crate::state::routes::RuleSpec,
        deadline: Option<Instant>,
        filters: &[FilterSpec],
        outcome: &mut Outcome,
        service: &ObjectKey,
        mut next_body: impl FnMut(usize) -> Option<Body>,
    ) -> Response<Body> {
        let codes: &[u16] = rule.retry.as_ref().map_or(&[], |r| r.codes.as_slice());
        // Without a `retry` block, only a failure before any response is retried, once.
        let max_retries = rule.retry.as_ref().map_or(1, |r| r.attempts.unwrap_or(DEFAULT_RETRIES));
        let backoff = rule.retry.as_ref().and_then(|r| r.backoff).unwrap_or(DEFAULT_BACKOFF);
        let Some((_, budget, balancer, policy)) = self.service_state(service) else {
            outcome.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no usable endpoint\n");
        };
        budget.record_request();
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0;
        loop {
            // A deadline already passed fails at once: no attempt can meet it.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                outcome.flags = "UT";
                return reply(StatusCode::GATEWAY_TIMEOUT, "deadline exceeded\n");
            }
            let fresh: Vec<SocketAddr> = endpoints.iter().copied().filter(|e| !tried.contains(e)).collect();
            let pool = if fresh.is_empty() { endpoints } else { &fresh };
            let endpoint = balancer.pick(pool);
            tried.push(endpoint);
            outcome.endpoint = Some(endpoint);
            let now = Instant::now();
            // Every way out of this attempt reports to the balancer (in-flight counts, latency,
            // failures for ejection).
            let finish = |failed: bool| {
                if balancer.finish(endpoint, now.elapsed(), failed, endpoints, &policy) == Verdict::Ejected {
                    tracing::warn!(%endpoint, service = %service, "endpoint ejected after consecutive failures");
                    self.telemetry.metrics.ejections.get_or_create(&RetryLabels { destination_service: fqdn(service) }).inc();
                }
            };
            let Some(body) = next_body(attempt) else {
                finish(false);
                return reply(StatusCode::BAD_GATEWAY, "request body already sent\n");
            };
            let Ok(uri) = format!("http://{endpoint}{target}").parse::<hyper::Uri>() else {
                finish(false);
                return reply(StatusCode::BAD_REQUEST, "bad request target\n");
            };
            let mut request = Request::new(body);
            *request.version_mut() = head.version;
            *request.method_mut() = head.method.clone();
            *request.uri_mut() = uri;
            *request.headers_mut() = head.headers.clone();
            let limit = [rule.backend_timeout.filter(|t| !t.is_zero()).map(|t| now + t), deadline].into_iter().flatten().min();
            let client = if head.version == hyper::Version::HTTP_2 { &self.h2_client } else { &self.client };
            let sent = client.request(request);
            let result = match limit {
                Some(limit) => match tokio::time::timeout_at(limit.into(), sent).await {
                    Ok(r) => r,
                    Err(_) => {
                        finish(true);
                        outcome.flags = "UT";
                        return reply(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n");
                    }
                },
                None => sent.await,
            };
            finish(result.as_ref().map_or(true, |r| r.status().is_server_error()));
            let failed = match result {
                Ok(mut response) if !codes.contains(&response.status().as_u16()) => {
                    outcome.flags = "-";
                    for filter in filters {
                        if let FilterSpec::ResponseHeaders(edits) = filter {
                            apply_edits(response.headers_mut(), edits);
                        }
                    }
                    return response.map(BodyExt::boxed);
                }
                Ok(response) => response.map(BodyExt::boxed),
                Err(e) => {
                    outcome.flags = "UF";
                    reply(StatusCode::BAD_GATEWAY, &format!("upstream {endpoint}: {e}\n"))
                }
            };
            let time_left = deadline.is_none_or(|d| d.saturating_duration_since(Instant::now()) > backoff);
            if attempt >= max_retries as usize || !time_left || !budget.try_retry() {
                return failed;
            }
            attempt += 1;
            self.telemetry.metrics.retries.get_or_create(&RetryLabels { destination_service: fqdn(service) }).inc();
            tokio::time::sleep(backoff).await;
        }
    }

    /// Upgrade (WebSocket and the like): one attempt; on 101 both connections are spliced and
    /// bytes pass through untouched until either side closes.
    async fn upgrade(
        &self,
        head: hyper::http::request::Parts,
        body: hyper::body::Incoming,
        target: &str,
        endpoints: &[SocketAddr],
        client_side: hyper::upgrade::OnUpgrade,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let endpoint = endpoints[fastrand::usize(..endpoints.len())];
        outcome.endpoint = Some(endpoint);
        let Ok(uri) = format!("http://{endpoint}{target}").parse::<hyper::Uri>() else {
            return reply(StatusCode::BAD_REQUEST, "bad request target\n");
        };
        let mut request = Request::from_parts(head, body.boxed());
        *request.uri_mut() = uri;
        let mut response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
                outcome.flags = "UF";
                return reply(StatusCode::BAD_GATEWAY, &format!("upstream {endpoint}: {e}\n"));
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_side = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(client), Ok(upstream)) = (client_side.await, upstream_side.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
                }
            });
        }
        response.map(BodyExt::boxed)
    }

    /// A Service's routes, retry budget, balancer and ejection policy, carried across
    /// snapshots: the router is rebuilt when the Service's view changes, the budget when its
    /// policy changes, the balancer forgets endpoints that are gone. None: no such Service.
    fn service_state(&self, service: &ObjectKey) -> Option<(Arc<Router>, Arc<RetryBudget>, Arc<Balancer>, EjectionPolicy)> {
        let view = self.snapshot.borrow().services.get(service).cloned()?;
        let mut per_service = self.per_service.lock().expect("per-service lock");
        let entry = per_service.entry(service.clone()).or_insert_with(|| PerService {
            view: view.clone(),
            router: Arc::new(Router::new(view.routes.clone())),
            budget: Arc::new(RetryBudget::new(view.spec.retry_budget)),
            balancer: Arc::new(Balancer::default()),
        });
        if !Arc::ptr_eq(&entry.view, &view) {
            if entry.view.routes != view.routes {
                entry.router = Arc::new(Router::new(view.routes.clone()));
            }
            if entry.view.spec.retry_budget != view.spec.retry_budget {
                entry.budget = Arc::new(RetryBudget::new(view.spec.retry_budget));
            }
            let live: Vec<SocketAddr> = view.ports.iter().flat_map(|p| p.backends.iter().map(|b| b.addr)).collect();
            entry.balancer.retain(&live);
            entry.view = view.clone();
        }
        Some((entry.router.clone(), entry.budget.clone(), entry.balancer.clone(), view.spec.outlier))
    }
}

/// Upstream connections without Nagle's algorithm: a proxy forwards small writes at once, and
/// Nagle's wait for an ACK (delayed on the other side) shows as milliseconds of tail latency.
fn connector() -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector
}

fn fqdn(service: &ObjectKey) -> String {
    crate::telemetry::identity::service_fqdn(Some(&Named { name: service.name.clone(), namespace: service.namespace.clone() }))
}

fn is_upgrade(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// The body length a request announces: Some(0) for none, None when chunked (unknown).
fn body_length(headers: &hyper::HeaderMap) -> Option<u64> {
    if headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        return None;
    }
    match headers.get(hyper::header::CONTENT_LENGTH) {
        None => Some(0),
        Some(v) => v.to_str().ok()?.parse().ok(),
    }
}

/// Bodies up to this size are buffered so that the request can be retried.
const MAX_REPLAY_BODY: u64 = 64 * 1024;
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Linkerd-style retry budget: over a 10 s window, retries may add at most `ratio` of the
/// requests plus `min_per_second`, so a failing backend cannot multiply its load.
pub struct RetryBudget {
    policy: RetryBudgetPolicy,
    window: Mutex<(Instant, u64, u64)>,
}

impl RetryBudget {
    pub fn new(policy: RetryBudgetPolicy) -> Self {
        Self { policy, window: Mutex::new((Instant::now(), 0, 0)) }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, (Instant, u64, u64)> {
        let mut w = self.window.lock().expect("budget lock");
        if w.0.elapsed() >= BUDGET_WINDOW {
            *w = (Instant::now(), 0, 0);
        }
        w
    }

    pub fn record_request(&self) {
        self.current().1 += 1;
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_retry(&self) -> bool {
        let mut w = self.current();
        let allowed = self.policy.ratio * w.1 as f64 + self.policy.min_per_second * BUDGET_WINDOW.as_secs_f64();
        if (w.2 as f64) < allowed {
            w.2 += 1;
            true
        } else {
            false
        }
    }
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m milli, u micro, n nano).
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// W3C trace context: a request without a valid `traceparent` starts a trace; one with it
/// keeps its trace id and flags and gets this hop's span as parent.
fn propagate_trace(headers: &mut hyper::HeaderMap) {
    let incoming = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    let (trace_id, flags) = incoming.unwrap_or_else(|| (format!("{:016x}{:016x}", fastrand::u64(1..), fastrand::u64(..)), "01".to_owned()));
    let span_id = format!("{:016x}", fastrand::u64(1..));
    if let Ok(value) = format!("00-{trace_id}-{span_id}-{flags}").parse() {
        headers.insert("traceparent", value);
    }
}

/// (trace id, flags) of a version-00 traceparent; None when malformed or all-zero.
fn parse_traceparent(value: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    match parts.as_slice() {
        [version, trace, parent, flags]
            if hex(version, 2) && *version != "ff" && hex(trace, 32) && hex(parent, 16) && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0') && parent.bytes().any(|b| b != b'0') =>
        {
            Some(((*trace).to_owned(), (*flags).to_owned()))
        }
        _ => None,
    }
}

/// RequestHeaderModifier / ResponseHeaderModifier: set replaces, add appends, remove removes.
/// Invalid names or values are skipped (validation keeps them out in practice).
fn apply_edits(headers: &mut hyper::HeaderMap, edits: &HeaderEdits) {
    use hyper::header::{HeaderName, HeaderValue};
    let parse = |(n, v): &(String, String)| Some((n.parse::<HeaderName>().ok()?, v.parse::<HeaderValue>().ok()?));
    for (name, value) in edits.set.iter().filter_map(parse) {
        headers.insert(name, value);
    }
    for (name, value) in edits.add.iter().filter_map(parse) {
        headers.append(name, value);
    }
    for name in &edits.remove {
        headers.remove(name.as_str());
    }
}

/// ReplaceFullPath, or ReplacePrefixMatch of the matched prefix ("/foo/bar" with "/foo"
/// replaced by "/xyz" is "/xyz/bar", by "/" is "/bar").
fn modify_path(path: &str, matched: &MatchSpec, modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::Full(full) => full.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = match &matched.path {
                PathMatch::Prefix(p) if p != "/" => p.as_str(),
                _ => "",
            };
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            let joined = match (replacement.is_empty(), rest.is_empty() || rest.starts_with('/')) {
                (_, true) => format!("{replacement}{rest}"),
                (_, false) => format!("{replacement}/{rest}"),
            };
            if joined.is_empty() { "/".to_owned() } else { joined }
        }
    }
}

/// RequestRedirect: answered by the proxy itself, no backend involved.
fn redirect_response(filter: &FilterSpec, req: &Request<hyper::body::Incoming>, matched: &MatchSpec) -> Response<Body> {
    let FilterSpec::Redirect { scheme, hostname, path, port, status } = filter else {
        unreachable!("called with a RequestRedirect filter")
    };
    let request_host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let request_host = request_host.rsplit_once(':').map_or(request_host, |(h, _)| h);
    let host = hostname.as_deref().unwrap_or(request_host);
    let scheme = scheme.as_deref().unwrap_or("http");
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let new_path = path.as_ref().map_or_else(|| req.uri().path().to_owned(), |m| modify_path(req.uri().path(), matched, m));
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut response = reply(StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND), "");
    if let Ok(location) = format!("{scheme}://{host}{port}{new_path}{query}").parse() {
        response.headers_mut().insert(hyper::header::LOCATION, location);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> MatchSpec {
        MatchSpec { path: PathMatch::Prefix(p.into()), method: None, headers: Vec::new(), query: Vec::new() }
    }

    #[test]
    fn prefix_rewrites_follow_the_spec_examples() {
        let full = PathModifier::Full("/new".into());
        assert_eq!(modify_path("/old/x", &prefix("/old"), &full), "/new");
        for (matched, path, replacement, want) in [
            ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo", "/foo/bar", "/", "/bar"),
            ("/foo", "/foo", "/", "/"),
            ("/", "/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
        ] {
            assert_eq!(modify_path(path, &prefix(matched), &PathModifier::Prefix(replacement.into())), want, "{path} {matched}->{replacement}");
        }
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "S", "10", "10x", "123456789S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn trace_context_continues_or_starts_a_trace() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse().unwrap());
        propagate_trace(&mut headers);
        let out = headers["traceparent"].to_str().unwrap().to_owned();
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && out.ends_with("-01"), "{out}");
        assert!(!out.contains("00f067aa0ba902b7"), "a new parent span: {out}");

        for bad in ["garbage", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"] {
            let mut headers = hyper::HeaderMap::new();
            headers.insert("traceparent", bad.parse().unwrap());
            propagate_trace(&mut headers);
            let out = headers["traceparent"].to_str().unwrap().to_owned();
            let old_trace = bad.get(3..35).unwrap_or(bad);
            assert!(parse_traceparent(&out).is_some() && !out.contains(old_trace), "{bad} -> {out}");
        }
    }

    #[test]
    fn header_edits_set_add_and_remove() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-a", "1".parse().unwrap());
        headers.insert("x-gone", "1".parse().unwrap());
        let edits = HeaderEdits {
            set: vec![("x-a".into(), "2".into())],
            add: vec![("x-b".into(), "3".into()), ("x-a".into(), "4".into())],
            remove: vec!["x-gone".into()],
        };
        apply_edits(&mut headers, &edits);
        let a: Vec<_> = headers.get_all("x-a").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(a, ["2", "4"]);
        assert_eq!(headers.get("x-b").unwrap(), "3");
        assert!(headers.get("x-gone").is_none());
    }
}

/// What happened to a request, for its metric labels.
struct Outcome {
    backend: Option<ObjectKey>,
    endpoint: Option<SocketAddr>,
    flags: &'static str,
}

fn reply(status: StatusCode, text: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(text.to_owned())).map_err(|never: Infallible| match never {}).boxed();
    Response::builder().status(status).body(body).expect("static response parts are valid")
}

/// Accepts captured connections until `shutdown` turns true.
pub async fn serve(outbound: Arc<Outbound>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let mut snapshots = outbound.snapshot.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let service = outbound.original_service(peer);
                let outbound = outbound.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let outbound = outbound.clone();
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(outbound.handle(service, req).await) }
                    });
                    // HTTP/1.1 or HTTP/2 with prior knowledge (h2c, gRPC), as the client speaks.
                    let _ = auto::Builder::new(TokioExecutor::new()).serve_connection_with_upgrades(TokioIo::new(stream), svc).await;
                });
            }
            Ok(()) = snapshots.changed() => {
                let snapshot = snapshots.borrow_and_update().clone();
                outbound.prune(&snapshot);
            }
            _ = shutdown.changed() => return,
        }
    }
}
