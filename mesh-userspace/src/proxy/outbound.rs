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
    state::{Catalog, LbService, catalog::ObjectKey},
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
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
        head.uri = match format!("http://{endpoint}{path}").parse() {
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
            Ok(response) => response.map(BodyExt::boxed),
            Err(e) => {
                outcome.flags = "UF";
                reply(StatusCode::BAD_GATEWAY, &format!("upstream {endpoint}: {e}\n"))
            }
        }
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
