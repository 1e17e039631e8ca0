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
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, http::uri::PathAndQuery, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use super::{
    admission::{Gate, TokenBucket},
    authorize::RequestAuthz,
    balancer::Balancer,
    connect::{Connector, Overflow, Upstream},
    filters::{apply_edits, modify_path, redirect_response},
    hbone::Tunnels,
    http::{Body, ClientBody, Outcome, RequestTrace, Tracked, connections_overflow, reply, strip_hop_by_hop},
    retry::{Attempts, MAX_REPLAY_BODY, RetryBudget, body_length, endpoint_uri, parse_grpc_timeout},
    router::{RequestParts, Router, pick_backend},
    tunnel::{MeshConnector, TunnelOrigins},
};
use crate::{
    ebpf::maps::OrigDstMap,
    identity::Identity,
    server::{self, Activity, Lifecycle, Limits, Slots},
    state::{
        ObjectKey, Protocol, ServiceView, Snapshot,
        model::{AppProtocol, CircuitBreakers, EjectionPolicy},
        routes::FilterSpec,
    },
    telemetry::{
        Telemetry,
        access_log::{AccessLog, Entry, Rfc3339, Shown},
        traces::{self, Kind, Span, TraceContext, Tracer},
    },
};

/// How long a request may take when its route names no timeout (Envoy's route default): a
/// backend that never answers must not hold a client, a connection and an endpoint's
/// in-flight count forever. `timeouts.request: 0s` on a route turns it off (streams).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Once draining, how long a connection that has not started a request yet may take to send
/// its first one (clients send it as soon as they connect; this only bounds a silent one).
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);

/// How often the proxy looks whether a peak of connections has passed, and how high a peak
/// must have been to be worth giving memory back after.
const TRIM_CHECK: Duration = Duration::from_secs(2);
const TRIM_AFTER_PEAK: usize = 256;

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
    /// The Service's key, shared by its requests (not cloned per request).
    key: Arc<ObjectKey>,
    view: Arc<ServiceView>,
    /// The endpoints of each port, computed when the view changes.
    endpoints: Arc<PortEndpoints>,
    router: Arc<Router>,
    budget: Arc<RetryBudget>,
    balancer: Arc<Balancer>,
    rate_limit: Option<Arc<TokenBucket>>,
    gate: Arc<Gate>,
    /// Pooled connections to the Service's endpoints, against its connection limits.
    upstream: Arc<Upstream>,
    /// The same per enrolled caller's identity, for endpoints reached through tunnels (the
    /// tunnel is the caller's: its connections are not shared with other callers).
    tunneled: HashMap<Identity, Arc<Upstream>>,
}

/// A Service's endpoints by frontend port (None: the first port that has any), as routes
/// name backends.
#[derive(Default)]
struct PortEndpoints(Vec<(Option<u16>, Arc<[SocketAddr]>)>);

impl PortEndpoints {
    fn of(view: &ServiceView) -> Self {
        let mut ports: Vec<Option<u16>> = view.ports.iter().map(|p| Some(p.frontend.port())).collect();
        ports.dedup();
        ports.push(None);
        Self(ports.into_iter().map(|port| (port, Arc::from(view.endpoints(port)))).collect())
    }

    /// Endpoints of `port` (the Service's first port when None); empty when it has none.
    fn get(&self, port: Option<u16>) -> Arc<[SocketAddr]> {
        self.0.iter().find(|(p, _)| *p == port).map_or_else(|| Arc::from([]), |(_, e)| e.clone())
    }
}

/// A Service's state for one request.
struct ServiceState {
    key: Arc<ObjectKey>,
    view: Arc<ServiceView>,
    endpoints: Arc<PortEndpoints>,
    router: Arc<Router>,
    budget: Arc<RetryBudget>,
    balancer: Arc<Balancer>,
    policy: EjectionPolicy,
    rate_limit: Option<Arc<TokenBucket>>,
    gate: Arc<Gate>,
    breakers: CircuitBreakers,
    upstream: Arc<Upstream>,
}

/// The outbound proxy: listener and original destination here; then routing and filters
/// (`router`, `filters`), deadlines, retries and budget (`retry`), endpoint choice
/// (`balancer`), and connections to endpoints behind a `Connector` (`connect`).
pub struct Outbound {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    telemetry: Arc<Telemetry>,
    orig_dst: Box<dyn OrigDst>,
    connector: Arc<dyn Connector>,
    /// Looked up twice per request: foldhash, not SipHash (keys are the agent's own Services).
    per_service: Mutex<HashMap<ObjectKey, PerService, foldhash::fast::RandomState>>,
    /// For routes that set no request timeout; None: no limit.
    default_request_timeout: Option<Duration>,
    access_log: Arc<AccessLog>,
    tracer: Arc<Tracer>,
    /// mTLS on: requests of enrolled pods to enrolled pods of other nodes go through tunnels.
    tunnels: Option<TunnelConfig>,
    /// Requests are decided on against their endpoints' AuthorizationPolicies.
    request_authz: Option<RequestAuthz>,
}

/// What the proxy needs to open tunnels for its callers.
#[derive(Clone)]
pub struct TunnelConfig {
    pub tunnels: Arc<Tunnels>,
    pub trust_domain: String,
    pub hbone_port: u16,
    /// The kernel's record of which pod dialled each captured connection.
    pub callers: Arc<dyn TunnelOrigins>,
}

impl Outbound {
    pub fn new(
        orig_dst: Box<dyn OrigDst>,
        connector: Arc<dyn Connector>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            snapshot,
            telemetry,
            orig_dst,
            connector,
            per_service: Mutex::new(HashMap::default()),
            default_request_timeout: Some(DEFAULT_REQUEST_TIMEOUT),
            access_log: Arc::new(AccessLog::off()),
            tracer: Arc::new(Tracer::off()),
            tunnels: None,
            request_authz: None,
        }
    }

    /// Decides on each request against the endpoints' AuthorizationPolicies (403 when refused).
    pub fn with_authorization(mut self, authz: RequestAuthz) -> Self {
        self.request_authz = Some(authz);
        self
    }

    /// Sends enrolled callers' requests to enrolled pods of other nodes through tunnels.
    pub fn with_tunnels(mut self, tunnels: TunnelConfig) -> Self {
        self.tunnels = Some(tunnels);
        self
    }

    /// The identity of a captured connection's caller (asked once per connection), when
    /// tunnels are on and the kernel recorded an enrolled pod of this node as the dialler
    /// (with its address, for `Forwarded`, unless it shares the node's).
    fn tunnel_source(&self, peer: SocketAddr) -> Option<Arc<(Identity, Option<IpAddr>)>> {
        let config = self.tunnels.as_ref()?;
        let caller = config.callers.take(peer)?;
        let pod = self.telemetry.workload_by_kernel_id(caller.workload).filter(|w| w.enrolled)?;
        let addr = pod.spec.ips.first().copied().filter(|_| !pod.spec.host_network);
        Some(Arc::new((pod.identity(&config.trust_domain)?, addr)))
    }

    /// The Service's upstream for `source`'s requests: its connections go through tunnels
    /// where the endpoint is an enrolled pod of another node.
    fn tunneled_upstream(&self, service: &ObjectKey, (source, source_addr): &(Identity, Option<IpAddr>)) -> Option<Arc<Upstream>> {
        let config = self.tunnels.as_ref()?;
        let mut per_service = self.per_service.lock().expect("per-service lock");
        let entry = per_service.get_mut(service)?;
        let limit = entry.upstream.limit().clone();
        let upstream = entry.tunneled.entry(source.clone()).or_insert_with(|| {
            let connector = MeshConnector {
                tunnels: config.tunnels.clone(),
                source: source.clone(),
                source_addr: *source_addr,
                snapshot: self.snapshot.clone(),
                trust_domain: config.trust_domain.clone(),
                hbone_port: config.hbone_port,
                plain: self.connector.clone(),
            };
            Arc::new(Upstream::with_limit(Arc::new(connector), limit))
        });
        Some(upstream.clone())
    }

    /// Exports a span per request and per attempt through `tracer`.
    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.tracer = Arc::new(tracer);
        self
    }

    /// Logs every request to `log`.
    pub fn with_access_log(mut self, log: AccessLog) -> Self {
        self.access_log = Arc::new(log);
        self
    }

    /// The request timeout of routes that set none (zero: no limit).
    pub fn with_default_request_timeout(mut self, timeout: Duration) -> Self {
        self.default_request_timeout = (!timeout.is_zero()).then_some(timeout);
        self
    }

    /// The Service a captured client dialled.
    fn original_service(&self, peer: SocketAddr) -> Option<Arc<ObjectKey>> {
        let dialled = self.orig_dst.take(peer)?;
        let snapshot = self.snapshot.borrow().clone();
        snapshot.frontends.get(&(dialled, Protocol::Tcp)).map(|s| Arc::new(s.key.service.clone()))
    }

    /// Drops the runtime state of Services that are gone; called on every new snapshot.
    fn prune(&self, snapshot: &Snapshot) {
        self.per_service.lock().expect("per-service lock").retain(|service, _| snapshot.services.contains_key(service));
    }

    /// Proxies one request from `peer` and counts (and logs) it once its response has ended
    /// or was abandoned; `busy` keeps its connection from counting as idle until then (a
    /// streamed response may be quiet for a while).
    async fn handle(
        self: Arc<Self>,
        peer: SocketAddr,
        service: Option<Arc<ObjectKey>>,
        source: Option<Arc<(Identity, Option<IpAddr>)>>,
        req: Request<hyper::body::Incoming>,
        busy: server::Busy,
    ) -> Response<Body> {
        let started = std::time::Instant::now();
        let start_time = std::time::SystemTime::now();
        // What the access log and the request's span say of it, taken before it is consumed.
        let asked = (self.access_log.enabled() || self.tracer.enabled()).then(|| {
            let authority = req.uri().authority().map(|a| a.to_string());
            let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
            (req.method().to_string(), host.or(authority).unwrap_or_default(), req.uri().path().to_owned(), version_name(req.version()))
        });
        let mut outcome = Outcome::new();
        let response = self.forward(service, source.as_deref(), req, &mut outcome).await;
        let code = response.status().as_u16();
        let (telemetry, access_log, tracer) = (self.telemetry.clone(), self.access_log.clone(), self.tracer.clone());
        response.map(|body| {
            Tracked::wrap(body, move |end, bytes_sent| {
                drop(busy);
                let flags = end.flag().filter(|_| outcome.flags == "-").unwrap_or(outcome.flags);
                let millis = started.elapsed().as_secs_f64() * 1000.0;
                telemetry.record_request(outcome.backend.as_deref(), peer.ip(), outcome.endpoint.map(|e| e.ip()), code, flags, millis);
                let Some((method, authority, path, protocol)) = asked else { return };
                if let Some(trace) = outcome.trace.filter(|t| t.context.sampled && tracer.enabled()) {
                    tracer.record(request_span(&trace, &method, &authority, &path, peer, code, flags));
                }
                if access_log.enabled() {
                    let source_workload = telemetry.workload_of(peer.ip());
                    let destination_workload = outcome.endpoint.and_then(|e| telemetry.workload_of(e.ip()));
                    let trace_id = outcome.trace.map(|t| t.context.trace_id_hex());
                    access_log.log(&Entry {
                        start_time: Rfc3339(start_time),
                        source_address: peer,
                        source_workload: source_workload.as_ref().map(|w| Shown(w)),
                        destination_service: outcome.backend.as_deref().map(|s| Shown(s)),
                        destination_workload: destination_workload.as_ref().map(|w| Shown(w)),
                        method: &method,
                        authority: &authority,
                        path: &path,
                        protocol,
                        response_code: code,
                        response_flags: flags,
                        attempts: outcome.attempts,
                        upstream_host: outcome.endpoint,
                        duration_ms: millis,
                        bytes_received: outcome.bytes_received(),
                        bytes_sent,
                        trace_id: trace_id.as_ref().map(|t| Shown(t)),
                    });
                }
            })
        })
    }

    async fn forward(
        &self,
        service: Option<Arc<ObjectKey>>,
        source: Option<&(Identity, Option<IpAddr>)>,
        mut req: Request<hyper::body::Incoming>,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let started = Instant::now();
        let Some(service) = service else {
            return reply(StatusCode::BAD_REQUEST, "not a connection captured by mesh\n");
        };
        // RFC 9112 3.2: a request with more than one Host is answered 400 (which one would a
        // route, or the backend, believe?).
        if req.headers().get_all(hyper::header::HOST).iter().nth(1).is_some() {
            outcome.flags = "DPE";
            return reply(StatusCode::BAD_REQUEST, "more than one Host header\n");
        }
        // The request's place in its trace: every request that reaches routing is a span.
        let traceparent = req.headers().get("traceparent").and_then(|v| v.to_str().ok());
        let trace = RequestTrace::new(TraceContext::from_header(traceparent, self.tracer.sampling()));
        outcome.trace = Some(trace);
        let called = self.service_state(&service);
        // The called Service's local rate limit, before anything else is spent on the request.
        if let Some(Err(wait)) = called.as_ref().and_then(|s| s.rate_limit.as_ref()).map(|b| b.take()) {
            outcome.flags = "RL";
            let mut response = reply(StatusCode::TOO_MANY_REQUESTS, "local rate limit\n");
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response.headers_mut().insert(hyper::header::RETRY_AFTER, seconds.into());
            return response;
        }
        let router = called.map(|s| s.router);
        let headers: Vec<(&str, &str)> = req.headers().iter().filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))).collect();
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
        let Some(ServiceState { key, view, endpoints, budget, balancer, policy, gate, breakers, upstream, .. }) =
            self.service_state(&backend.service)
        else {
            outcome.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no usable endpoint\n");
        };
        outcome.backend = Some(key.clone());
        let upstream = source.and_then(|s| self.tunneled_upstream(&key, s)).unwrap_or(upstream);
        let endpoints = endpoints.get(backend.port);
        if endpoints.is_empty() {
            outcome.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no usable endpoint\n");
        }
        // The endpoints' AuthorizationPolicies, with what only a request shows.
        if let Some(authz) = &self.request_authz {
            let snapshot = self.snapshot.borrow().clone();
            let authority = req.uri().authority().map(|a| a.as_str());
            let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).or(authority).unwrap_or_default();
            let request = crate::state::policy::Request { method: req.method().as_str(), path: req.uri().path(), host };
            if let Some(refusal) = authz.refusal(&snapshot, &key, &endpoints, source, request) {
                tracing::debug!(service = %key, %refusal, "request refused by policy");
                // Envoy's RBAC filter's answer, word for word: clients and tests expect it.
                return reply(StatusCode::FORBIDDEN, "RBAC: access denied\n");
            }
        }
        // The route's request timeout (a default when it names none, none for "0s"), or the
        // client's own grpc-timeout if sooner.
        let grpc = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let route_timeout = match matched.rule.request_timeout {
            None => self.default_request_timeout,
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
        };
        let deadline = [route_timeout, grpc].into_iter().flatten().min().map(|t| started + t);
        drop(parts);

        let upgrade = is_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let (mut head, body) = req.into_parts();
        strip_hop_by_hop(&mut head.headers, upgrade.is_some());
        let mut rewritten_path: Option<String> = None;
        for filter in filters {
            match filter {
                FilterSpec::RequestHeaders(edits) => apply_edits(&mut head.headers, edits),
                FilterSpec::Rewrite { hostname, path: modifier } => {
                    if let Some(host) = hostname.as_deref().and_then(|h| h.parse().ok()) {
                        head.headers.insert(hyper::header::HOST, host);
                    }
                    if let Some(modifier) = modifier {
                        let path = rewritten_path.as_deref().unwrap_or(head.uri.path());
                        rewritten_path = Some(modify_path(path, matched.matched, modifier));
                    }
                }
                _ => {}
            }
        }
        speak_upstream(&mut head, view.app_protocol(backend.port));
        // The request target upstream: the client's own (shared, not copied) unless a filter
        // rewrote the path.
        let target = match rewritten_path {
            None => head.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")),
            Some(path) => {
                let query = head.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
                match PathAndQuery::try_from(format!("{path}{query}")) {
                    Ok(target) => target,
                    Err(_) => return reply(StatusCode::BAD_REQUEST, "bad request target\n"),
                }
            }
        };

        if let Some(client_side) = upgrade {
            // An upgrade is one attempt without a span of its own: the request's span is its
            // parent. (Other requests get a traceparent per attempt.)
            if let Ok(value) = trace.context.header(trace.span).parse() {
                head.headers.insert("traceparent", value);
            }
            return self.upgrade(&upstream, head, body, &target, &endpoints, client_side, outcome).await;
        }
        // The backend's circuit breaker: held until the response has ended (with `outcome`).
        let Some(pass) = gate.enter() else {
            outcome.flags = "UO";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "circuit breaker open: too many requests in flight\n");
        };
        outcome.admitted = Some(pass);
        let attempts = Attempts {
            upstream: &upstream,
            telemetry: &self.telemetry,
            service: &key,
            budget: &budget,
            balancer: &balancer,
            policy,
            max_per_endpoint: breakers.max_requests_per_endpoint,
            tracer: &self.tracer,
            trace,
        };

        // A request is replayed (retried) only when its body is known small: buffered whole.
        let replayable = match body_length(&head.headers) {
            Some(n) if n <= MAX_REPLAY_BODY => match http_body_util::Limited::new(body, MAX_REPLAY_BODY as usize).collect().await {
                Ok(collected) => Some(collected.to_bytes()),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "request body shorter or longer than its Content-Length\n"),
            },
            _ => {
                // Streamed as it comes: one attempt.
                let (body, client_body) = ClientBody::new(body);
                outcome.streamed = Some(client_body.clone());
                let mut stream_body = Some(body.boxed());
                return attempts
                    .send(&head, &target, &endpoints, matched.rule, deadline, filters, outcome, Some(&client_body.failed), |_| {
                        stream_body.take()
                    })
                    .await;
            }
        };
        let bytes = replayable.unwrap_or_default();
        outcome.request_bytes = bytes.len() as u64;
        attempts
            .send(&head, &target, &endpoints, matched.rule, deadline, filters, outcome, None, |_| {
                Some(Full::new(bytes.clone()).map_err(|never: Infallible| match never {}).boxed())
            })
            .await
    }

    /// Upgrade (WebSocket and the like): one attempt; on 101 both connections are spliced and
    /// bytes pass through untouched until either side closes.
    #[expect(clippy::too_many_arguments, reason = "one request's context, used once")]
    async fn upgrade(
        &self,
        upstream: &Upstream,
        head: hyper::http::request::Parts,
        body: hyper::body::Incoming,
        target: &PathAndQuery,
        endpoints: &[SocketAddr],
        client_side: hyper::upgrade::OnUpgrade,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let endpoint = endpoints[fastrand::usize(..endpoints.len())];
        outcome.endpoint = Some(endpoint);
        let Some(uri) = endpoint_uri(endpoint, target) else {
            return reply(StatusCode::BAD_REQUEST, "bad request target\n");
        };
        let mut request = Request::from_parts(head, body.boxed());
        *request.uri_mut() = uri;
        let mut response = match upstream.request(request).await {
            Ok(r) => r,
            Err(e) if Overflow::caused(&e) => return connections_overflow(outcome),
            Err(e) => {
                outcome.flags = "UF";
                tracing::debug!(%endpoint, error = %e, "upstream upgrade request failed");
                return reply(StatusCode::BAD_GATEWAY, "upstream connect error or disconnect/reset before headers\n");
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
    fn service_state(&self, service: &ObjectKey) -> Option<ServiceState> {
        let view = self.snapshot.borrow().services.get(service).cloned()?;
        let mut per_service = self.per_service.lock().expect("per-service lock");
        // Looked up before inserting: the key is cloned once per Service, not per request.
        let created = !per_service.contains_key(service);
        if created {
            per_service.insert(
                service.clone(),
                PerService {
                    key: Arc::new(service.clone()),
                    endpoints: Arc::new(PortEndpoints::of(&view)),
                    view: view.clone(),
                    router: Arc::new(Router::new(view.routes.clone())),
                    budget: Arc::new(RetryBudget::new(view.spec.retry_budget)),
                    balancer: Arc::new(Balancer::default()),
                    rate_limit: view.spec.rate_limit.map(|p| Arc::new(TokenBucket::new(p))),
                    gate: Arc::new(Gate::default()),
                    upstream: Arc::new(Upstream::new(self.connector.clone())),
                    tunneled: HashMap::new(),
                },
            );
        }
        let entry = per_service.get_mut(service).expect("inserted above");
        let changed = !Arc::ptr_eq(&entry.view, &view);
        if created || changed {
            // The breakers' limits follow the Service's annotations (live requests carry over).
            entry.gate.set_max(view.spec.breakers.max_requests);
            entry.upstream.limit().set(view.spec.breakers.max_connections, view.spec.breakers.max_pending_requests);
        }
        if changed {
            if entry.view.routes != view.routes {
                entry.router = Arc::new(Router::new(view.routes.clone()));
            }
            if entry.view.spec.retry_budget != view.spec.retry_budget {
                entry.budget = Arc::new(RetryBudget::new(view.spec.retry_budget));
            }
            if entry.rate_limit.as_ref().map(|b| b.policy()) != view.spec.rate_limit {
                entry.rate_limit = view.spec.rate_limit.map(|p| Arc::new(TokenBucket::new(p)));
            }
            let live: Vec<SocketAddr> = view.ports.iter().flat_map(|p| p.backends.iter().map(|b| b.addr)).collect();
            entry.balancer.retain(&live);
            entry.endpoints = Arc::new(PortEndpoints::of(&view));
            entry.view = view.clone();
        }
        Some(ServiceState {
            key: entry.key.clone(),
            endpoints: entry.endpoints.clone(),
            router: entry.router.clone(),
            budget: entry.budget.clone(),
            balancer: entry.balancer.clone(),
            policy: view.spec.outlier,
            rate_limit: entry.rate_limit.clone(),
            gate: entry.gate.clone(),
            breakers: view.spec.breakers,
            upstream: entry.upstream.clone(),
            view,
        })
    }
}

/// The HTTP version toward the endpoint is the backend port's (`appProtocol`), not the
/// client's: an HTTP/2 client may call an HTTP/1.1-only backend. Unsaid, HTTP/1.1, except for
/// gRPC, which only HTTP/2 carries. An HTTP/2 request's authority becomes the HTTP/1.1 Host.
fn speak_upstream(head: &mut hyper::http::request::Parts, app_protocol: AppProtocol) {
    let grpc =
        head.headers.get(hyper::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/grpc"));
    let h2 = match app_protocol {
        AppProtocol::H2c => true,
        AppProtocol::Http1 => false,
        AppProtocol::Unknown => grpc,
    };
    if h2 {
        head.version = hyper::Version::HTTP_2;
        return;
    }
    if head.version == hyper::Version::HTTP_2
        && !head.headers.contains_key(hyper::header::HOST)
        && let Some(host) = head.uri.authority().and_then(|a| a.as_str().parse().ok())
    {
        head.headers.insert(hyper::header::HOST, host);
    }
    head.version = hyper::Version::HTTP_11;
}

/// The span of a whole request (the server side of the proxy; attempts are its children).
fn request_span(trace: &RequestTrace, method: &str, authority: &str, path: &str, peer: SocketAddr, code: u16, flags: &str) -> Span {
    use traces::Value::{Int, Str};
    let mut attributes = vec![
        ("http.request.method", Str(method.to_owned())),
        ("url.path", Str(path.to_owned())),
        ("server.address", Str(authority.to_owned())),
        ("client.address", Str(peer.ip().to_string())),
        ("http.response.status_code", Int(i64::from(code))),
    ];
    if flags != "-" {
        attributes.push(("mesh.response_flags", Str(flags.to_owned())));
    }
    Span {
        trace_id: trace.context.trace_id,
        span_id: trace.span,
        parent: trace.context.parent,
        name: method.to_owned(),
        kind: Kind::Server,
        start: trace.start,
        end: std::time::SystemTime::now(),
        attributes,
        error: code >= 500,
    }
}

fn version_name(version: hyper::Version) -> &'static str {
    match version {
        hyper::Version::HTTP_2 => "HTTP/2",
        hyper::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

fn is_upgrade(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// Accepts captured connections until `shutdown` turns true, within `limits`.
/// Accepts nothing before `lifecycle.ready` (the configuration has been read whole: until then
/// a request would find no route; connections wait in the backlog), and drains when
/// `lifecycle.drain` turns true: no more accepts, every connection asked to finish (HTTP/1.1
/// `Connection: close` after its response in flight, HTTP/2 GOAWAY), returns once they have or
/// after `lifecycle.drain_timeout`.
pub async fn serve(outbound: Arc<Outbound>, listener: TcpListener, limits: Limits, lifecycle: Lifecycle) {
    let Lifecycle { mut ready, mut drain, drain_timeout } = lifecycle;
    tokio::select! {
        _ = ready.wait_for(|r| *r) => {}
        _ = drain.wait_for(|d| *d) => return,
    }
    let mut snapshots = outbound.snapshot.clone();
    let slots =
        Slots::new(limits.max_connections, outbound.telemetry.metrics.proxy_open.clone(), outbound.telemetry.metrics.proxy_refused.clone());
    // HTTP/1.1 or HTTP/2 with prior knowledge (h2c, gRPC), as the client speaks.
    let http = Arc::new(limits.http());
    let for_connections = drain.clone();
    // Thousands of connections come and go in bursts; their buffers, freed, stay with the
    // allocator. When most of a peak has closed, the free pages go back to the system.
    let mut peak = 0usize;
    let mut trim_check = tokio::time::interval(TRIM_CHECK);
    trim_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = trim_check.tick() => {
                let open = slots.open();
                if peak >= TRIM_AFTER_PEAK && open <= peak / 4 {
                    tracing::debug!(peak, open, "most connections of a peak closed; returning free memory");
                    peak = open;
                    tokio::task::spawn_blocking(crate::host::release_free_memory);
                }
            }
            (stream, peer) = server::accept(&listener, "outbound") => {
                let Some(slot) = slots.take() else {
                    tracing::debug!(%peer, max = limits.max_connections, "outbound listener full; connection closed");
                    continue;
                };
                peak = peak.max(slots.open());
                let _ = stream.set_nodelay(true);
                let service = outbound.original_service(peer);
                let source = outbound.tunnel_source(peer);
                let (outbound, http, mut draining) = (outbound.clone(), http.clone(), for_connections.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let activity = Activity::new();
                    let in_flight = activity.clone();
                    let svc = service_fn(move |req| {
                        let busy = in_flight.busy();
                        let outbound = outbound.clone();
                        let (service, source) = (service.clone(), source.clone());
                        async move { Ok::<_, Infallible>(outbound.handle(peer, service, source, req, busy).await) }
                    });
                    let connection = http.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::pin!(connection);
                    let (mut draining_seen, mut asked_to_finish) = (false, false);
                    loop {
                        tokio::select! {
                            _ = connection.as_mut() => return,
                            _ = activity.idle_for(limits.idle_timeout) => return,
                            _ = draining.wait_for(|d| *d), if !draining_seen => draining_seen = true,
                            // A connection accepted just before the drain may hold a request
                            // not read yet: asked to finish before hyper knows its HTTP
                            // version, it would be closed unread (a reset for the client).
                            // Its first request is answered (with `Connection: close` or a
                            // GOAWAY); a client that sends none is closed after the grace.
                            _ = tokio::time::timeout(FIRST_REQUEST_GRACE, activity.first_request()), if draining_seen && !asked_to_finish => {
                                asked_to_finish = true;
                                connection.as_mut().graceful_shutdown();
                            }
                        }
                    }
                });
            }
            Ok(()) = snapshots.changed() => {
                let snapshot = snapshots.borrow_and_update().clone();
                outbound.prune(&snapshot);
            }
            _ = drain.wait_for(|d| *d) => break,
        }
    }
    drop(listener);
    let open = slots.open();
    if open > 0 {
        tracing::info!(connections = open, timeout_ms = drain_timeout.as_millis() as u64, "draining proxied connections");
    }
    if tokio::time::timeout(drain_timeout, slots.wait_empty()).await.is_err() {
        tracing::warn!(connections = slots.open(), "drain timeout: the remaining proxied connections are cut");
    }
}

#[cfg(test)]
mod tests;
