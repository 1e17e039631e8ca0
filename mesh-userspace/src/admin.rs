//! The agent's HTTP endpoints: readiness (`/healthz/ready`, on the node's loopback, where
//! kubelet probes it), metrics (all interfaces, for Prometheus), and the admin API
//! (`/config_dump`, `/quitquitquit`, on localhost only). Small and
//! apart from the data path: they share only the agent's status behind a lock, and the same
//! connection limits as every listener (`server`).
#![forbid(unsafe_code)]
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use crate::server::{self, Activity, Limits, Slots};

/// Who is asking: the two ends of the connection.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Answers one request. Kept synchronous: every admin answer is computed from memory or maps.
pub type Handler = Arc<dyn Fn(&Method, &hyper::Uri, &Caller) -> (StatusCode, String) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("binding {0}: {1}")]
pub struct BindError(pub SocketAddr, #[source] pub std::io::Error);

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|e| BindError(addr, e))
}

/// Serves `handler` on `listener` until `shutdown` turns true.
pub async fn serve(name: &'static str, listener: TcpListener, handler: Handler, mut shutdown: watch::Receiver<bool>) {
    let limits = Limits::ADMIN;
    let slots = Slots::new(limits.max_connections, Default::default(), Default::default());
    let http = Arc::new(limits.http());
    loop {
        tokio::select! {
            (stream, peer) = server::accept(&listener, name) => {
                let Some(slot) = slots.take() else { continue };
                let Ok(local) = stream.local_addr() else { continue };
                let caller = Caller { peer, local };
                let (handler, http) = (handler.clone(), http.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let activity = Activity::new();
                    let in_flight = activity.clone();
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let busy = in_flight.busy();
                        let (status, body) = handler(req.method(), req.uri(), &caller);
                        let content_type = if body.starts_with('{') || body.starts_with('[') { "application/json" } else { "text/plain; charset=utf-8" };
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", content_type)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts are valid");
                        async move {
                            drop(busy);
                            Ok::<_, Infallible>(response)
                        }
                    });
                    tokio::select! {
                        _ = http.serve_connection(TokioIo::new(stream), service) => {}
                        _ = activity.idle_for(limits.idle_timeout) => {}
                    }
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}
