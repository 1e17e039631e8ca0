//! The bottom layer: a connection to one endpoint, behind the `Connector` trait, and the
//! pooled HTTP clients built on it. Plain TCP today; an mTLS HBONE tunnel (an HTTP/2 CONNECT
//! stream to the destination node's agent) is another `Connector`, and nothing above changes.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
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
        Box::pin(within_connect_timeout(tokio::net::TcpStream::connect(endpoint)))
    }
}

/// The agent's own connections to pods of its node: each is registered in `mesh_trusted`
/// (source and destination, addresses and ports) before its SYN leaves, so that the pod's
/// ingress filter lets it in where PeerAuthentication is STRICT, and unregistered once
/// connected. The source port is bound first to know it; the source address is the one the
/// routes pick (asked of a UDP socket, which sends nothing), remembered per destination.
pub struct AgentDialer {
    trusted: Option<Arc<crate::ebpf::maps::TrustedMap>>,
    /// Which addresses are pods of this node (the others are dialled plainly).
    local_pods: Box<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>,
    sources: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, std::net::IpAddr>>,
}

/// Destinations whose source address is remembered, at most (then forgotten and asked again).
const MAX_REMEMBERED_SOURCES: usize = 65_536;

impl AgentDialer {
    /// Dials plainly, registering nothing (no datapath: tests, tools).
    pub fn plain() -> Self {
        Self { trusted: None, local_pods: Box::new(|_| false), sources: Default::default() }
    }

    pub fn new(trusted: Arc<crate::ebpf::maps::TrustedMap>, local_pods: impl Fn(std::net::IpAddr) -> bool + Send + Sync + 'static) -> Self {
        Self { trusted: Some(trusted), local_pods: Box::new(local_pods), sources: Default::default() }
    }

    pub async fn connect(&self, target: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let Some(trusted) = self.trusted.as_ref().filter(|_| (self.local_pods)(target.ip())) else {
            return tokio::net::TcpStream::connect(target).await;
        };
        let source = self.source_for(target)?;
        let socket = if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(SocketAddr::new(source, 0))?;
        let local = socket.local_addr()?;
        let flow = mesh_common::FlowKey {
            source: crate::ebpf::image::addr_of(local.ip()),
            destination: crate::ebpf::image::addr_of(target.ip()),
            source_port: local.port(),
            destination_port: target.port(),
        };
        trusted.register(&flow).map_err(io::Error::other)?;
        let connected = socket.connect(target).await;
        // Its SYN has been let in (or never will be): the entry has done its work.
        trusted.unregister(&flow);
        connected
    }

    fn source_for(&self, target: SocketAddr) -> io::Result<std::net::IpAddr> {
        let mut sources = self.sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(source) = sources.get(&target.ip()) {
            return Ok(*source);
        }
        let unspecified: SocketAddr = if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        let probe = std::net::UdpSocket::bind(unspecified)?;
        probe.connect(target)?;
        let source = probe.local_addr()?.ip();
        if sources.len() >= MAX_REMEMBERED_SOURCES {
            sources.clear();
        }
        sources.insert(target.ip(), source);
        Ok(source)
    }
}

/// Plain TCP as `TcpConnector`, through an `AgentDialer` (the L7 proxy's connections to
/// endpoints that are pods of this node are the agent's own).
pub struct AgentConnector(pub Arc<AgentDialer>);

impl Connector for AgentConnector {
    fn connect(&self, endpoint: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>> {
        let dialer = self.0.clone();
        Box::pin(async move { within_connect_timeout(dialer.connect(endpoint)).await })
    }
}

/// A connection from `connecting`, given up on after `CONNECT_TIMEOUT`, without Nagle.
async fn within_connect_timeout(connecting: impl Future<Output = io::Result<tokio::net::TcpStream>>) -> io::Result<Conn> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer to connect within {CONNECT_TIMEOUT:?}")))??;
    stream.set_nodelay(true)?;
    Ok(Conn::new(stream))
}

/// The connections of one backend Service against its circuit breakers (`max-connections`,
/// `max-pending-requests`; 0: no limit). The limits can change under live connections.
#[derive(Debug, Default)]
pub struct ConnectionLimit {
    open: AtomicU32,
    waiting: AtomicU32,
    max_open: AtomicU32,
    max_waiting: AtomicU32,
    /// Woken when a connection closes.
    closed: tokio::sync::Notify,
}

impl ConnectionLimit {
    pub fn set(&self, max_open: Option<u32>, max_waiting: Option<u32>) {
        let max_open = max_open.unwrap_or(0);
        let before = self.max_open.swap(max_open, Ordering::AcqRel);
        self.max_waiting.store(max_waiting.unwrap_or(0), Ordering::Relaxed);
        if max_open != before {
            // A raised (or removed) limit may have room for requests that wait now.
            self.closed.notify_waiters();
        }
    }

    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Acquire)
    }

    fn try_open(&self) -> bool {
        let max = self.max_open.load(Ordering::Relaxed);
        self.open.try_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1)).is_ok()
    }

    /// A place for one more connection: at once, or after waiting (at most `max_waiting` wait
    /// at a time, each at most `CONNECT_TIMEOUT`) for one to close. Overflow otherwise.
    async fn take(self: &Arc<Self>) -> io::Result<OpenConnection> {
        if self.try_open() {
            return Ok(OpenConnection(self.clone()));
        }
        let max_waiting = self.max_waiting.load(Ordering::Relaxed);
        if self.waiting.try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max_waiting).then_some(n + 1)).is_err() {
            return Err(Overflow::error("every connection the Service allows is open, and no request may wait"));
        }
        let waited = tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                // Registered before looking again: a close in between is not missed.
                let closed = self.closed.notified();
                if self.try_open() {
                    return;
                }
                closed.await;
            }
        })
        .await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match waited {
            Ok(()) => Ok(OpenConnection(self.clone())),
            Err(_) => Err(Overflow::error("no connection to the Service closed while the request waited for one")),
        }
    }
}

/// One connection counted against a `ConnectionLimit`, until dropped (closed).
struct OpenConnection(Arc<ConnectionLimit>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.closed.notify_one();
    }
}

/// A connect refused by a Service's circuit breaker: the proxy's own doing (503, flag UO), not
/// the endpoint's.
#[derive(Debug)]
pub struct Overflow(&'static str);

impl std::fmt::Display for Overflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Overflow {}

impl Overflow {
    fn error(why: &'static str) -> io::Error {
        io::Error::other(Overflow(why))
    }

    /// Whether `error` (or what caused it) is a circuit breaker's refusal.
    pub fn caused(error: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(error);
        while let Some(e) = next {
            if e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()).is_some_and(|inner| inner.is::<Overflow>()) || e.is::<Overflow>() {
                return true;
            }
            next = e.source();
        }
        false
    }
}

/// A `Connector` whose connections count against a Service's `ConnectionLimit`.
struct Limited {
    inner: Arc<dyn Connector>,
    limit: Arc<ConnectionLimit>,
}

impl Connector for Limited {
    fn connect(&self, endpoint: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>> {
        let (inner, limit) = (self.inner.clone(), self.limit.clone());
        Box::pin(async move {
            let place = limit.take().await?;
            let conn = inner.connect(endpoint).await?;
            Ok(Conn { io: conn.io, _counted: Some(place) })
        })
    }
}

/// Any byte stream a `Connector` opens.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A connection as the HTTP clients take it (counted against its Service's limit while open).
pub struct Conn {
    io: TokioIo<Pin<Box<dyn Stream>>>,
    _counted: Option<OpenConnection>,
}

impl Conn {
    pub fn new(stream: impl Stream) -> Self {
        Self { io: TokioIo::new(Box::pin(stream)), _counted: None }
    }
}

impl hyper::rt::Read for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: ReadBufCursor<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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
/// requests that came in over HTTP/2 (gRPC). One per backend Service, as Envoy has a pool
/// per cluster: its connections count against the Service's limit.
pub struct Upstream {
    http1: Client<ConnectService, Body>,
    http2: Client<ConnectService, Body>,
    limit: Arc<ConnectionLimit>,
}

impl Upstream {
    pub fn new(connector: Arc<dyn Connector>) -> Self {
        Self::with_limit(connector, Arc::new(ConnectionLimit::default()))
    }

    /// An upstream whose connections count against `limit` (shared with the Service's other
    /// upstreams: one per source identity when requests go through tunnels).
    pub fn with_limit(connector: Arc<dyn Connector>, limit: Arc<ConnectionLimit>) -> Self {
        let service = ConnectService(Arc::new(Limited { inner: connector, limit: limit.clone() }));
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
            limit,
        }
    }

    /// The Service's connection limits, and what is open against them.
    pub fn limit(&self) -> &Arc<ConnectionLimit> {
        &self.limit
    }

    /// Sends `request` (its URI names the endpoint) in the HTTP version it came in with.
    pub fn request(&self, request: hyper::Request<Body>) -> hyper_util::client::legacy::ResponseFuture {
        let client = if request.version() == hyper::Version::HTTP_2 { &self.http2 } else { &self.http1 };
        client.request(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A paused clock: were a waiter not woken, the runtime would jump to its timeout and the
    // waiter would fail instead.
    #[tokio::test(start_paused = true)]
    async fn a_connection_limit_lets_waiters_in_when_a_connection_closes_or_the_limit_rises() {
        let limit = Arc::new(ConnectionLimit::default());
        limit.set(Some(1), Some(1));
        let first = limit.take().await.expect("room for one");
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.take().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        let refused = limit.take().await.err().expect("one waits already: the next is refused");
        assert!(Overflow::caused(&refused), "{refused}");
        drop(first);
        waiter.await.unwrap().expect("the waiter takes the closed connection's place");

        let _held = limit.take().await.expect("room again");
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.take().await.map(|_| ()) }
        });
        tokio::task::yield_now().await;
        limit.set(Some(2), Some(1));
        waiter.await.unwrap().expect("a raised limit lets the waiter in");
        assert_eq!(limit.open(), 1, "the waiter's connection, dropped, is no longer counted");
    }
}
