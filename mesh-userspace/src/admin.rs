//! The agent's HTTP endpoints: readiness (`/healthz/ready`, on all interfaces for kubelet) and
//! the admin API (`/config_dump`, `/quitquitquit`, on localhost only). Small and apart from the
//! data path: they share only the agent's status behind a lock.
#![forbid(unsafe_code)]
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

/// Answers one request. Kept synchronous: every admin answer is computed from memory or maps.
pub type Handler = Arc<dyn Fn(&Method, &str) -> (StatusCode, String) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("binding {0}: {1}")]
pub struct BindError(pub SocketAddr, #[source] pub std::io::Error);

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|e| BindError(addr, e))
}

/// Serves `handler` on `listener` until `shutdown` turns true.
pub async fn serve(listener: TcpListener, handler: Handler, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (status, body) = handler(req.method(), req.uri().path());
                        let content_type = if body.starts_with('{') || body.starts_with('[') { "application/json" } else { "text/plain; charset=utf-8" };
                        let response = Response::builder()
                            .status(status)
                            .header("content-type", content_type)
                            .body(Full::new(Bytes::from(body)))
                            .expect("static response parts are valid");
                        async move { Ok::<_, Infallible>(response) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}
