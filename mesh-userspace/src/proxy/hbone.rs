//! HBONE, as Istio ambient's ztunnel speaks it: a connection between workloads of two nodes is
//! an HTTP/2 CONNECT stream (`:authority` = the destination pod's IP:port) inside TLS 1.3 with
//! both workloads' certificates, from the source node's agent to the destination node's agent
//! on :15008. Streams of one source identity to one destination identity on one node share a
//! TLS connection (`Tunnels`' pool); the destination agent (`Inbound`) verifies the peer,
//! checks that the destination is a workload it serves with the identity it was asked for,
//! connects to it and splices bytes both ways, half-close included.
//!
//! The destination agent is where authorization is enforced: each CONNECT is decided on the
//! verified peer identity (`LocalWorkloads::authorize`), and `Inbound::review` closes the
//! live streams a policy change now denies.
//!
//! Which certificate the destination agent presents: the one of the identity the client asks
//! for by server name (`Identity::server_name`), since one agent holds a certificate per
//! identity of its node and the `:authority` comes only after the handshake.
use std::{
    collections::HashMap,
    convert::Infallible,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use http_body_util::Empty;
use hyper::{
    Method, Request, Response, StatusCode, body::Bytes, client::conn::http2 as client_h2, server::conn::http2 as server_h2,
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};

use super::connect::AgentDialer;
use crate::{
    authz::Decision,
    identity::{Identity, certs::Certificates},
    server::{self, Lifecycle, Slots},
    telemetry::metrics::{DirectionLabels, HboneMetrics, RefusalLabels},
    tls,
};

/// The port agents take HBONE tunnels on.
pub const PORT: u16 = 15008;
/// TCP connect plus TLS handshake to a peer agent, and a client's handshake at ours.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one tunnel connection carries at once; past it the pool opens another.
pub const MAX_STREAMS: u32 = 100;
/// A connection with no stream for this long is closed (either side).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// HTTP/2 windows: a stream can have this much in flight (the default 64 KiB would hold a
/// bulk transfer to one window per round trip).
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_FRAME: u32 = 1024 * 1024;
/// Request headers of a CONNECT, at most.
const MAX_HEADER_BYTES: u32 = 16 * 1024;
/// How often the same refusal reason is logged at warn (the counter has every one).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Why a tunnel was refused: a bounded reason for the metric, and the detail for the log.
#[derive(Debug, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Refusal {
    pub reason: &'static str,
    pub detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    /// A TLS failure, named by rustls' error when it has one.
    fn tls(error: io::Error, what: &str) -> Self {
        let reason = match error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(e) => tls::refusal_reason(e),
            // The peer closed mid-handshake: it refused us (it logs and counts why).
            None if error.kind() == io::ErrorKind::UnexpectedEof => "refused_by_peer",
            None => "tls_error",
        };
        Self::new(reason, format!("{what}: {error}"))
    }
}

/// Counts refusals and logs each reason at most once a minute at warn.
struct Refusals {
    metrics: HboneMetrics,
    direction: &'static str,
    logged: Mutex<HashMap<&'static str, tokio::time::Instant>>,
}

impl Refusals {
    fn record(&self, refusal: &Refusal, peer: SocketAddr) {
        self.metrics.refused.get_or_create(&RefusalLabels { direction: self.direction.into(), reason: refusal.reason.into() }).inc();
        let now = tokio::time::Instant::now();
        let mut logged = self.logged.lock().expect("not poisoned");
        let due = logged.get(refusal.reason).is_none_or(|at| now.duration_since(*at) >= REFUSAL_LOG_EVERY);
        if due {
            logged.insert(refusal.reason, now);
            tracing::warn!(direction = self.direction, %peer, reason = refusal.reason, detail = %refusal.detail, "HBONE tunnel refused (further refusals for this reason are counted in mesh_hbone_refused_total and logged at debug for a minute)");
        } else {
            tracing::debug!(direction = self.direction, %peer, reason = refusal.reason, detail = %refusal.detail, "HBONE tunnel refused");
        }
    }
}

/// A gauge raised while this lives.
struct Held(Gauge);

impl Held {
    fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.dec();
    }
}

// ---------------------------------------------------------------------------------------------
// The source side.

/// Where a tunnel goes: from `source`'s workload to `destination` (its identity) at `target`
/// (the pod's address), through the agent at `node`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub source: Identity,
    pub destination: Identity,
    pub node: SocketAddr,
    pub target: SocketAddr,
    /// The source pod's address, sent as `Forwarded: for=` (as ztunnel does) for the
    /// destination's telemetry and ipBlocks.
    pub source_addr: Option<IpAddr>,
    /// The stream carries the L7 proxy's requests, each already decided on by the source's
    /// AuthorizationPolicy check (sent as `mesh-l7: checked`).
    pub l7_checked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    source: Identity,
    destination: Identity,
    node: SocketAddr,
}

struct Pooled {
    send: client_h2::SendRequest<Empty<Bytes>>,
    streams: Arc<AtomicU32>,
    /// The client certificate's expiry: no new streams on a connection past it.
    expires_at: SystemTime,
}

/// Opens tunnels, pooling their connections.
pub struct Tunnels {
    certs: Arc<Certificates>,
    pool: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    metrics: HboneMetrics,
    refusals: Refusals,
}

impl Tunnels {
    pub fn new(certs: Arc<Certificates>, metrics: HboneMetrics) -> Self {
        let refusals = Refusals { metrics: metrics.clone(), direction: "outbound", logged: Mutex::default() };
        Self { certs, pool: Mutex::default(), metrics, refusals }
    }

    /// Counts and logs a refusal made before a tunnel was tried (no route for it).
    pub fn record_refusal(&self, refusal: &Refusal, peer: SocketAddr) {
        self.refusals.record(refusal, peer);
    }

    /// A byte stream to `route.target`, through a pooled or a new connection.
    pub async fn open(&self, route: &Route) -> Result<Tunnel, Refusal> {
        let opened = self.open_inner(route).await;
        if let Err(refusal) = &opened {
            self.refusals.record(refusal, route.node);
        }
        opened
    }

    async fn open_inner(&self, route: &Route) -> Result<Tunnel, Refusal> {
        let key = PoolKey { source: route.source.clone(), destination: route.destination.clone(), node: route.node };
        let (mut send, streams) = match self.pooled(&key) {
            Some(found) => found,
            None => self.connect(&key).await?,
        };
        let counted = StreamCount::new(streams, self.metrics.streams_open.get_or_create(&DirectionLabels::outbound()).clone());
        let mut request = Request::builder().method(Method::CONNECT).uri(route.target.to_string());
        if let Some(addr) = route.source_addr {
            request = request.header(hyper::header::FORWARDED, forwarded_for(addr));
        }
        if route.l7_checked {
            request = request.header(L7_HEADER, "checked");
        }
        let request = request.body(Empty::new()).map_err(|e| Refusal::new("bad_request", e.to_string()))?;
        let response =
            send.send_request(request).await.map_err(|e| Refusal::new("tunnel_failed", format!("CONNECT to {}: {e}", route.node)))?;
        if response.status() != StatusCode::OK {
            let why = response.headers().get(REASON_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            return Err(Refusal::new(
                "refused_by_peer",
                format!("{} answered {} for {}: {why}", route.node, response.status(), route.target),
            ));
        }
        let upgraded = hyper::upgrade::on(response).await.map_err(|e| Refusal::new("tunnel_failed", e.to_string()))?;
        Ok(Tunnel { io: TokioIo::new(upgraded), _counted: counted })
    }

    /// A live pooled connection with room for a stream (the stream is counted on it).
    fn pooled(&self, key: &PoolKey) -> Option<(client_h2::SendRequest<Empty<Bytes>>, Arc<AtomicU32>)> {
        let mut pool = self.pool.lock().expect("not poisoned");
        let connections = pool.get_mut(key)?;
        let now = SystemTime::now();
        connections.retain(|c| !c.send.is_closed() && c.expires_at > now);
        let found = connections
            .iter()
            .find(|c| c.streams.try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS).then_some(n + 1)).is_ok());
        let found = found.map(|c| (c.send.clone(), c.streams.clone()));
        if connections.is_empty() {
            pool.remove(key);
        }
        found
    }

    /// A new connection to `key.node` as `key.source`, pooled, with one stream counted.
    async fn connect(&self, key: &PoolKey) -> Result<(client_h2::SendRequest<Empty<Bytes>>, Arc<AtomicU32>), Refusal> {
        let own = self.certs.fetch(&key.source).await.map_err(|e| Refusal::new("no_certificate", e.to_string()))?;
        let roots = self.certs.roots().map_err(|e| Refusal::new("no_certificate", e.to_string()))?;
        let config = tls::client_config(&own, roots, key.destination.clone()).map_err(|e| Refusal::new("tls_error", e.to_string()))?;
        let server_name = rustls::pki_types::ServerName::try_from(key.destination.server_name())
            .map_err(|e| Refusal::new("bad_request", format!("server name for {}: {e}", key.destination)))?;
        let handshake = async {
            let tcp = TcpStream::connect(key.node).await.map_err(|e| Refusal::new("connect_failed", format!("{}: {e}", key.node)))?;
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .map_err(|e| Refusal::tls(e, &format!("TLS with {} as {}", key.node, key.destination)))
        };
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| Refusal::new("connect_timeout", format!("{}: no handshake within {HANDSHAKE_TIMEOUT:?}", key.node)))??;
        let (send, connection) = client_h2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Refusal::new("tunnel_failed", format!("HTTP/2 with {}: {e}", key.node)))?;
        let streams = Arc::new(AtomicU32::new(1));
        let open = Held::new(self.metrics.connections_open.get_or_create(&DirectionLabels::outbound()).clone());
        let idle = streams.clone();
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(connection);
            loop {
                tokio::select! {
                    _ = connection.as_mut() => return,
                    () = tokio::time::sleep(IDLE_TIMEOUT) => if idle.load(Ordering::Acquire) == 0 { return },
                }
            }
        });
        let mut pool = self.pool.lock().expect("not poisoned");
        // New connections are rare next to streams: the moment to forget closed ones of every
        // key, so that routes no longer used do not keep entries.
        let now = SystemTime::now();
        pool.retain(|_, connections| {
            connections.retain(|c| !c.send.is_closed() && c.expires_at > now);
            !connections.is_empty()
        });
        pool.entry(key.clone()).or_default().push(Pooled { send: send.clone(), streams: streams.clone(), expires_at: own.expires_at });
        Ok((send, streams))
    }
}

/// One stream counted on its connection and in the gauge, until dropped.
struct StreamCount {
    on_connection: Arc<AtomicU32>,
    _open: Held,
}

impl StreamCount {
    /// Takes over a stream already counted on its connection.
    fn new(on_connection: Arc<AtomicU32>, gauge: Gauge) -> Self {
        Self { on_connection, _open: Held::new(gauge) }
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.on_connection.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A tunnel's byte stream. Shutting down its write side ends the HTTP/2 stream (the far end
/// reads EOF); reading EOF means the far end did.
pub struct Tunnel {
    io: TokioIo<hyper::upgrade::Upgraded>,
    _counted: StreamCount,
}

impl AsyncRead for Tunnel {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tunnel {
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

/// RFC 7239's `for=` (IPv6 quoted and bracketed).
fn forwarded_for(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The address in a `Forwarded` header's first `for=`, if it is one.
fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    let for_ = first.split(';').find_map(|pair| pair.trim().strip_prefix("for=").or_else(|| pair.trim().strip_prefix("For=")))?;
    let bare = for_.trim_matches('"').trim_start_matches('[');
    let bare = bare.split(']').next()?;
    bare.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The destination side.

/// A refused CONNECT says why in this response header.
pub const REASON_HEADER: &str = "mesh-refusal";
/// A CONNECT of the source's L7 proxy, whose requests it checked against policy, says so.
pub const L7_HEADER: &str = "mesh-l7";

/// The enrolled workloads of this node, as the inbound side needs them.
pub trait LocalWorkloads: Send + Sync + 'static {
    /// The identity of the enrolled workload at `ip`.
    fn identity_at(&self, ip: IpAddr) -> Option<Identity>;
    /// Whether an enrolled workload of this node has `identity`.
    fn serves(&self, identity: &Identity) -> bool;
    /// Whether `source` (from `source_ip`, as far as known) may reach `target`, by this
    /// node's AuthorizationPolicies; counted as the destination's decision. `l7_checked`: the
    /// source's proxy decided on each request (`Attributes::l7_checked`).
    fn authorize(&self, source: &Identity, source_ip: Option<IpAddr>, target: SocketAddr, l7_checked: bool) -> Decision;
}

/// A stream being carried, as a policy change looks at it again.
struct Live {
    source: Identity,
    source_ip: Option<IpAddr>,
    target: SocketAddr,
    l7_checked: bool,
    close: Arc<tokio::sync::Notify>,
}

/// A tunnel the inbound side carries, as telemetry sees it.
#[derive(Debug, Clone)]
pub struct Carried {
    pub peer: SocketAddr,
    /// Proven by TLS.
    pub source: Identity,
    pub destination: Identity,
    pub target: SocketAddr,
    /// The source pod's address as the peer says (`Forwarded`): for labels only.
    pub forwarded_for: Option<IpAddr>,
}

/// Told of each tunnel when it opens; the closure it returns gets the bytes (from the
/// source, to the source) when it closes.
pub type OnCarried = Box<dyn Fn(&Carried) -> Box<dyn FnOnce(u64, u64) + Send> + Send + Sync>;

/// Takes tunnels on :15008 for this node's enrolled workloads.
pub struct Inbound {
    certs: Arc<Certificates>,
    trust_domain: String,
    workloads: Arc<dyn LocalWorkloads>,
    metrics: HboneMetrics,
    refusals: Refusals,
    on_carried: OnCarried,
    /// Streams open now, by a number of their own.
    live: Mutex<HashMap<u64, Live>>,
    next_stream: std::sync::atomic::AtomicU64,
    /// Connects to the workloads (registered, for STRICT ports to let them in).
    dialer: Arc<AgentDialer>,
}

impl Inbound {
    pub fn new(certs: Arc<Certificates>, trust_domain: String, workloads: Arc<dyn LocalWorkloads>, metrics: HboneMetrics) -> Self {
        let refusals = Refusals { metrics: metrics.clone(), direction: "inbound", logged: Mutex::default() };
        Self {
            certs,
            trust_domain,
            workloads,
            metrics,
            refusals,
            on_carried: Box::new(|_| Box::new(|_, _| {})),
            live: Mutex::default(),
            next_stream: 0.into(),
            dialer: Arc::new(AgentDialer::plain()),
        }
    }

    /// Connects to workloads through `dialer`.
    pub fn with_dialer(mut self, dialer: Arc<AgentDialer>) -> Self {
        self.dialer = dialer;
        self
    }

    /// Decides again on every stream open now (after a policy or workload change) and closes
    /// those now denied; returns how many it closed.
    pub fn review(&self) -> usize {
        let live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut closed = 0;
        for stream in live.values() {
            let decision = self.workloads.authorize(&stream.source, stream.source_ip, stream.target, stream.l7_checked);
            if !decision.allowed {
                let refusal = Refusal::new("policy_closed", format!("{} to {}: {decision}", stream.source, stream.target));
                self.refusals.record(&refusal, stream.target);
                stream.close.notify_one();
                closed += 1;
            }
        }
        closed
    }

    /// Streams open now.
    pub fn live_streams(&self) -> usize {
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    /// Tells `report` of each tunnel as it opens, and its closure as it closes.
    pub fn on_carried(mut self, report: OnCarried) -> Self {
        self.on_carried = report;
        self
    }

    /// TLS as the identity the client asked for, verifying the client.
    async fn handshake(&self, tcp: TcpStream) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Identity, Identity), Refusal> {
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
            .await
            .map_err(|e| Refusal::tls(e, "reading the TLS client hello"))?;
        let asked = start.client_hello().server_name().map(str::to_owned);
        let Some(local) = asked.as_deref().and_then(|name| Identity::from_server_name(name, &self.trust_domain)) else {
            return Err(Refusal::new(
                "unknown_destination",
                format!("server name {asked:?} names no identity of trust domain {}", self.trust_domain),
            ));
        };
        if !self.workloads.serves(&local) {
            return Err(Refusal::new("unknown_destination", format!("no enrolled workload of this node is {local}")));
        }
        let own = self.certs.fetch(&local).await.map_err(|e| Refusal::new("no_certificate", e.to_string()))?;
        let roots = self.certs.roots().map_err(|e| Refusal::new("no_certificate", e.to_string()))?;
        let config = tls::server_config(&own, roots, &self.trust_domain).map_err(|e| Refusal::new("tls_error", e.to_string()))?;
        let stream = start.into_stream(Arc::new(config)).await.map_err(|e| Refusal::tls(e, "TLS handshake"))?;
        let source = tls::peer_identity(stream.get_ref().1.peer_certificates()).map_err(|e| Refusal::new("no_identity", e.to_string()))?;
        Ok((stream, local, source))
    }

    /// One CONNECT: checks the destination, connects to it, answers, and splices.
    async fn connect(
        self: &Arc<Self>,
        request: Request<hyper::body::Incoming>,
        peer: SocketAddr,
        local: &Identity,
        source: &Identity,
    ) -> Response<Empty<Bytes>> {
        let refuse = |status: StatusCode, refusal: Refusal| {
            self.refusals.record(&refusal, peer);
            let mut response = Response::new(Empty::new());
            *response.status_mut() = status;
            if let Ok(value) = hyper::header::HeaderValue::from_str(&refusal.to_string()) {
                response.headers_mut().insert(REASON_HEADER, value);
            }
            response
        };
        if request.method() != Method::CONNECT {
            return refuse(StatusCode::METHOD_NOT_ALLOWED, Refusal::new("bad_request", format!("{} instead of CONNECT", request.method())));
        }
        let authority = request.uri().authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        let Ok(target) = authority.parse::<SocketAddr>() else {
            return refuse(StatusCode::BAD_REQUEST, Refusal::new("bad_request", format!("authority {authority:?} is not IP:port")));
        };
        match self.workloads.identity_at(target.ip()) {
            Some(identity) if identity == *local => {}
            Some(identity) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    Refusal::new("unknown_destination", format!("{target} is {identity}, not {local} the tunnel was opened to")),
                );
            }
            None => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    Refusal::new("unknown_destination", format!("{target} is no enrolled workload of this node")),
                );
            }
        }
        let forwarded_for = request.headers().get(hyper::header::FORWARDED).and_then(|v| v.to_str().ok()).and_then(parse_forwarded_for);
        // The source pod's address as its agent says (it holds the pod's identity too), else
        // the agent's.
        let source_ip = forwarded_for.or(Some(peer.ip()));
        let l7_checked = request.headers().get(L7_HEADER).is_some_and(|v| v == "checked");
        let decision = self.workloads.authorize(source, source_ip, target, l7_checked);
        if !decision.allowed {
            return refuse(StatusCode::FORBIDDEN, Refusal::new("policy_denied", format!("{source} to {target}: {decision}")));
        }
        let connected = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.dialer.connect(target)).await;
        let upstream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return refuse(StatusCode::SERVICE_UNAVAILABLE, Refusal::new("destination_unreachable", format!("{target}: {e}")));
            }
            Err(_) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Refusal::new("destination_unreachable", format!("{target}: no answer within {HANDSHAKE_TIMEOUT:?}")),
                );
            }
        };
        let _ = upstream.set_nodelay(true);
        let carried = Carried { peer, source: source.clone(), destination: local.clone(), target, forwarded_for };
        let closed = (self.on_carried)(&carried);
        let open = Held::new(self.metrics.streams_open.get_or_create(&DirectionLabels::inbound()).clone());
        let close = Arc::new(tokio::sync::Notify::new());
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let live = Live { source: source.clone(), source_ip, target, l7_checked, close: close.clone() };
        self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(id, live);
        let inbound = self.clone();
        tokio::spawn(async move {
            let _open = open;
            let _live = Unlisted { inbound: &inbound, id };
            let Ok(upgraded) = hyper::upgrade::on(request).await else { return closed(0, 0) };
            let mut tunnel = Counting { inner: TokioIo::new(upgraded), read: 0, written: 0 };
            let mut upstream = upstream;
            tokio::select! {
                result = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream) => if let Err(e) = result {
                    tracing::debug!(%peer, %target, error = %e, "tunnel ended with an error");
                },
                // A policy now denies it: both ends are dropped (the stream reset, the
                // workload's connection closed).
                () = close.notified() => tracing::info!(%peer, %target, "tunnel stream closed: a policy change denies it"),
            }
            closed(tunnel.read, tunnel.written);
        });
        Response::new(Empty::new())
    }
}

/// Counts the bytes through a stream, for telemetry of streams however they end.
struct Counting<S> {
    inner: S,
    read: u64,
    written: u64,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Takes a stream off the live list when its task ends, however it ends.
struct Unlisted<'a> {
    inbound: &'a Inbound,
    id: u64,
}

impl Drop for Unlisted<'_> {
    fn drop(&mut self) {
        self.inbound.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.id);
    }
}

/// Serves tunnels on `listener` until `lifecycle.drain`: then accepts no more, sends GOAWAY on
/// every connection, and lets open streams finish for `drain_timeout`.
/// At most `max_connections` connections at once (handshakes included): more are closed as
/// they arrive and counted (`too_many_connections`).
pub async fn serve(inbound: Arc<Inbound>, listener: TcpListener, max_connections: usize, lifecycle: Lifecycle) {
    let Lifecycle { mut ready, mut drain, drain_timeout } = lifecycle;
    tokio::select! {
        _ = ready.wait_for(|r| *r) => {}
        _ = drain.wait_for(|d| *d) => return,
    }
    let refused = RefusalLabels { direction: "inbound".into(), reason: "too_many_connections".into() };
    let slots = Slots::new(
        max_connections,
        inbound.metrics.connections_open.get_or_create(&DirectionLabels::inbound()).clone(),
        inbound.metrics.refused.get_or_create(&refused).clone(),
    );
    let mut connections = tokio::task::JoinSet::new();
    let for_connections = drain.clone();
    loop {
        tokio::select! {
            (tcp, peer) = server::accept(&listener, "hbone") => {
                let Some(slot) = slots.take() else {
                    tracing::debug!(%peer, max = max_connections, "HBONE listener full; connection closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (inbound, mut draining) = (inbound.clone(), for_connections.clone());
                connections.spawn(async move {
                    let _slot = slot;
                    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, inbound.handshake(tcp)).await;
                    let (tls, local, source) = match handshake {
                        Ok(Ok(done)) => done,
                        Ok(Err(refusal)) => return inbound.refusals.record(&refusal, peer),
                        Err(_) => return inbound.refusals.record(&Refusal::new("handshake_timeout", format!("no TLS handshake within {HANDSHAKE_TIMEOUT:?}")), peer),
                    };
                    let service = {
                        let inbound = inbound.clone();
                        service_fn(move |request| {
                            let (inbound, local, source) = (inbound.clone(), local.clone(), source.clone());
                            async move { Ok::<_, Infallible>(inbound.connect(request, peer, &local, &source).await) }
                        })
                    };
                    let connection = server_h2::Builder::new(TokioExecutor::new())
                        .timer(TokioTimer::new())
                        .max_concurrent_streams(MAX_STREAMS)
                        .initial_stream_window_size(STREAM_WINDOW)
                        .initial_connection_window_size(CONNECTION_WINDOW)
                        .max_frame_size(MAX_FRAME)
                        .keep_alive_interval(Duration::from_secs(30))
                        .keep_alive_timeout(Duration::from_secs(10))
                        // CONNECT needs a few short headers; hyper's default allows 16 MiB.
                        .max_header_list_size(MAX_HEADER_BYTES)
                        .serve_connection(TokioIo::new(tls), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        _ = connection.as_mut() => return,
                        _ = draining.wait_for(|d| *d) => connection.as_mut().graceful_shutdown(),
                    }
                    let _ = connection.await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = drain.wait_for(|d| *d) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(connections = connections.len(), "drain timeout: the remaining HBONE connections are cut");
        connections.abort_all();
    }
}

#[cfg(test)]
mod tests;
