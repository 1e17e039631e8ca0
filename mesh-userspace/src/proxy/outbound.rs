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
    time::Instant,
};

use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::{net::TcpListener, sync::watch};

use super::{
    balancer::Balancer,
    connect::{Connector, Upstream},
    filters::{apply_edits, modify_path, propagate_trace, redirect_response},
    http::{Body, Outcome, reply},
    retry::{Attempts, MAX_REPLAY_BODY, RetryBudget, body_length, parse_grpc_timeout},
    router::{RequestParts, Router, pick_backend},
};
use crate::{
    ebpf::maps::OrigDstMap,
    state::{ObjectKey, Protocol, ServiceView, Snapshot, model::EjectionPolicy, routes::FilterSpec},
    telemetry::Telemetry,
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

/// A backend Service's state for one request.
struct ServiceState {
    router: Arc<Router>,
    budget: Arc<RetryBudget>,
    balancer: Arc<Balancer>,
    policy: EjectionPolicy,
}

/// The outbound proxy: listener and original destination here; then routing and filters
/// (`router`, `filters`), deadlines, retries and budget (`retry`), endpoint choice
/// (`balancer`), and connections to endpoints behind a `Connector` (`connect`).
pub struct Outbound {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    telemetry: Arc<Telemetry>,
    orig_dst: Box<dyn OrigDst>,
    upstream: Upstream,
    per_service: Mutex<HashMap<ObjectKey, PerService>>,
}

impl Outbound {
    pub fn new(
        orig_dst: Box<dyn OrigDst>,
        connector: Arc<dyn Connector>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self { snapshot, telemetry, orig_dst, upstream: Upstream::new(connector), per_service: Mutex::new(HashMap::new()) }
    }

    /// The Service a captured client dialled.
    fn original_service(&self, peer: SocketAddr) -> Option<ObjectKey> {
        let dialled = self.orig_dst.take(peer)?;
        let snapshot = self.snapshot.borrow().clone();
        snapshot.frontends.get(&(dialled, Protocol::Tcp)).map(|s| s.key.service.clone())
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
        self.telemetry.record_request(
            outcome.backend.as_ref(),
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
        let router = self.service_state(&service).map(|s| s.router);
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
        let Some(ServiceState { budget, balancer, policy, .. }) = self.service_state(&backend.service) else {
            outcome.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no usable endpoint\n");
        };
        let attempts = Attempts {
            upstream: &self.upstream,
            telemetry: &self.telemetry,
            service: &backend.service,
            budget: &budget,
            balancer: &balancer,
            policy,
        };

        // A request is replayed (retried) only when its body is known small: buffered whole.
        let replayable = match body_length(&head.headers) {
            Some(n) if n <= MAX_REPLAY_BODY => match http_body_util::Limited::new(body, MAX_REPLAY_BODY as usize).collect().await {
                Ok(collected) => Some(collected.to_bytes()),
                Err(_) => return reply(StatusCode::BAD_REQUEST, "request body shorter or longer than its Content-Length\n"),
            },
            _ => {
                // Streamed as it comes: one attempt.
                let mut stream_body = Some(body.boxed());
                return attempts.send(&head, &target, &endpoints, matched.rule, deadline, filters, outcome, |_| stream_body.take()).await;
            }
        };
        let bytes = replayable.unwrap_or_default();
        attempts
            .send(&head, &target, &endpoints, matched.rule, deadline, filters, outcome, |_| {
                Some(Full::new(bytes.clone()).map_err(|never: Infallible| match never {}).boxed())
            })
            .await
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
        let mut response = match self.upstream.request(request).await {
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
    fn service_state(&self, service: &ObjectKey) -> Option<ServiceState> {
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
        Some(ServiceState {
            router: entry.router.clone(),
            budget: entry.budget.clone(),
            balancer: entry.balancer.clone(),
            policy: view.spec.outlier,
        })
    }
}

fn is_upgrade(headers: &hyper::HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
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

#[cfg(test)]
mod tests;
