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
    path::Path,
    sync::{Arc, Mutex, RwLock},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use mesh_common::{PeerKey, RevNatValue, map_names};
use tokio::{net::TcpListener, sync::watch};

use super::router::{RequestParts, Router, pick_backend};
use crate::{
    state::{
        Catalog, LbService,
        catalog::ObjectKey,
        routes::{FilterSpec, HeaderEdits, MatchSpec, PathMatch, PathModifier},
    },
    sync::addr_of,
    telemetry::{Telemetry, identity::Named},
};

type Body = BoxBody<Bytes, hyper::Error>;

/// What the proxy needs of the configuration; replaced whole on every applied change.
#[derive(Default)]
pub struct L7State {
    pub catalog: Catalog,
    /// This node's usable endpoints per Service port.
    pub services: Vec<LbService>,
    /// Kernel service id → the Service.
    pub by_id: HashMap<u32, ObjectKey>,
}

impl L7State {
    /// Endpoints of `service` on `port` (its only port when None), IPv4 first.
    fn endpoints(&self, service: &ObjectKey, port: Option<u16>) -> Vec<SocketAddr> {
        self.services
            .iter()
            .filter(|s| s.key.service == *service && port.is_none_or(|p| s.frontend.port() == p))
            .map(|s| s.backends.iter().map(|b| b.addr).collect::<Vec<_>>())
            .find(|b| !b.is_empty())
            .unwrap_or_default()
    }
}

pub struct Outbound {
    pub state: RwLock<Arc<L7State>>,
    telemetry: Arc<Telemetry>,
    original: Mutex<BpfHashMap<MapData, PeerKey, RevNatValue>>,
    client: Client<HttpConnector, hyper::body::Incoming>,
}

impl Outbound {
    pub fn new(pin_dir: &Path, telemetry: Arc<Telemetry>) -> Result<Self, String> {
        let path = pin_dir.join(map_names::L7_ORIGINAL);
        let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let map = Map::from_map_data(data).map_err(|e| format!("{}: {e}", path.display()))?;
        let original = BpfHashMap::try_from(map).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            state: RwLock::new(Arc::new(L7State::default())),
            telemetry,
            original: Mutex::new(original),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The Service a captured client dialled (the entry is consumed).
    fn original_service(&self, peer: SocketAddr) -> Option<u32> {
        let key = PeerKey { addr: addr_of(peer.ip()), port: peer.port(), _pad16: 0, _pad32: 0 };
        let mut map = self.original.lock().expect("l7orig lock");
        let value = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(value.service_id)
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

    async fn forward(&self, service: Option<ObjectKey>, req: Request<hyper::body::Incoming>, outcome: &mut Outcome) -> Response<Body> {
        let Some(service) = service else {
            return reply(StatusCode::BAD_REQUEST, "not a connection captured by mesh\n");
        };
        let state = self.state.read().expect("l7 state lock").clone();
        let headers: Vec<(&str, &str)> =
            req.headers().iter().filter_map(|(n, v)| Some((n.as_str(), v.to_str().ok()?))).collect();
        let parts = RequestParts { method: req.method().as_str(), path: req.uri().path(), query: req.uri().query(), headers };
        let router = Router::for_service(&state.catalog, &service);
        let Some(matched) = router.route(&parts) else {
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
        let endpoints = state.endpoints(&backend.service, backend.port);
        if endpoints.is_empty() {
            outcome.flags = "UH";
            return reply(StatusCode::SERVICE_UNAVAILABLE, "no usable endpoint\n");
        }
        let endpoint = endpoints[fastrand::usize(..endpoints.len())];
        outcome.endpoint = Some(endpoint);
        let timeout = matched.rule.request_timeout.filter(|t| !t.is_zero());
        drop(parts);

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
        let query = head.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
        head.uri = match format!("http://{endpoint}{path}{query}").parse() {
            Ok(uri) => uri,
            Err(_) => return reply(StatusCode::BAD_REQUEST, "bad request target\n"),
        };
        let upstream = self.client.request(Request::from_parts(head, body));
        let response = match timeout {
            Some(t) => match tokio::time::timeout(t, upstream).await {
                Ok(r) => r,
                Err(_) => {
                    outcome.flags = "UT";
                    return reply(StatusCode::GATEWAY_TIMEOUT, "request timeout\n");
                }
            },
            None => upstream.await,
        };
        match response {
            Ok(mut response) => {
                for filter in filters {
                    if let FilterSpec::ResponseHeaders(edits) = filter {
                        apply_edits(response.headers_mut(), edits);
                    }
                }
                response.map(BodyExt::boxed)
            }
            Err(e) => {
                outcome.flags = "UF";
                reply(StatusCode::BAD_GATEWAY, &format!("upstream {endpoint}: {e}\n"))
            }
        }
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
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let service_id = outbound.original_service(peer);
                let service = service_id.and_then(|id| outbound.state.read().expect("l7 state lock").by_id.get(&id).cloned());
                let outbound = outbound.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let outbound = outbound.clone();
                        let service = service.clone();
                        async move { Ok::<_, Infallible>(outbound.handle(service, req).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).with_upgrades().await;
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}
