//! The bottom layer: a connection to one endpoint, behind the `Connector` trait, and the
//! pooled HTTP clients built on it. Plain TCP today; an mTLS HBONE tunnel (an HTTP/2 CONNECT
//! stream to the destination node's agent) is another `Connector`, and nothing above changes.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{body::Bytes, rt::ReadBufCursor};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use tokio::io::{AsyncRead, AsyncWrite};

/// Opens connections to endpoints.
pub trait Connector: Send + Sync + 'static {
    /// A byte stream to `endpoint`, ready for HTTP.
    fn connect(&self, endpoint: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;
}

/// An endpoint that neither accepts nor refuses (SYNs dropped) is given up on after this
/// (Envoy's default connect timeout), and the attempt counts as a connect failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pooled connections to endpoints unused for this long are closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Plain TCP, without Nagle's algorithm: a proxy forwards small writes at once, and Nagle's
/// wait for an ACK (delayed on the other side) shows as milliseconds of tail latency.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(&self, endpoint: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>> {
        Box::pin(async move {
            let connecting = tokio::net::TcpStream::connect(endpoint);
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer to connect within {CONNECT_TIMEOUT:?}")))??;
            stream.set_nodelay(true)?;
            Ok(Conn::new(stream))
        })
    }
}

/// Any byte stream a `Connector` opens.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection as the HTTP clients take it.
pub struct Conn(TokioIo<Pin<Box<dyn Stream>>>);

impl Conn {
    pub fn new(stream: impl Stream) -> Self {
        Self(TokioIo::new(Box::pin(stream)))
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl Connection for Conn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// hyper's client asks a `tower::Service<Uri>`; the proxy's URIs name the endpoint.
#[derive(Clone)]
pub struct ConnectService(Arc<dyn Connector>);

impl tower_service::Service<hyper::Uri> for ConnectService {
    type Response = Conn;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let endpoint = uri.authority().and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        match endpoint {
            Some(endpoint) => self.0.connect(endpoint),
            None => Box::pin(std::future::ready(Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not an endpoint: {uri}"))))),
        }
    }
}

pub type Body = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// Pooled connections to endpoints: HTTP/1.1, and HTTP/2 with prior knowledge (h2c) for
/// requests that came in over HTTP/2 (gRPC).
pub struct Upstream {
    http1: Client<ConnectService, Body>,
    http2: Client<ConnectService, Body>,
}

impl Upstream {
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        let service = ConnectService(connector);
        Self {
            http1: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build(service.clone()),
            http2: Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .timer(TokioTimer::new())
                .http2_only(true)
                .build(service),
        }
    }

    /// Sends `request` (its URI names the endpoint) in the HTTP version it came in with.
    pub fn request(&self, request: hyper::Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        let client = if request.version() == hyper::Version::HTTP_2 { &self.http2 } else { &self.http1 };
        client.request(request)
    }
}
