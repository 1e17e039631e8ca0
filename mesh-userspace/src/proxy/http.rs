//! What every layer of the proxy shares: the body type, a plain reply, and what happened to a
//! request (for its metric labels).
use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use http_body_util::{BodyExt, Full};
use hyper::{
    HeaderMap, Response, StatusCode,
    body::{Bytes, Frame, Incoming, SizeHint},
    header::{self, HeaderName},
};

pub use super::connect::Body;
use crate::state::ObjectKey;
use crate::telemetry::traces::{Kind, Span, TraceContext, Tracer, Value, random_id};

/// What happened to a request, for its metric labels and access log line.
#[derive(Default)]
pub struct Outcome {
    pub backend: Option<Arc<ObjectKey>>,
    pub endpoint: Option<SocketAddr>,
    /// Envoy-style response flags, "-" for none.
    pub flags: &'static str,
    /// Endpoints tried.
    pub attempts: u32,
    /// The request's trace context and its own span id.
    pub trace: Option<RequestTrace>,
    /// Request body bytes buffered (replayable bodies).
    pub request_bytes: u64,
    /// A streamed request body, counted as it goes.
    pub streamed: Option<Arc<ClientBodyState>>,
    /// The backend's circuit breaker let it in; released with the outcome, at the response's
    /// end.
    pub admitted: Option<super::admission::Pass>,
}

impl Outcome {
    pub fn new() -> Self {
        Self { flags: "-", ..Self::default() }
    }

    pub fn bytes_received(&self) -> u64 {
        self.request_bytes + self.streamed.as_ref().map_or(0, |s| s.bytes.load(Ordering::Relaxed))
    }
}

pub fn reply(status: StatusCode, text: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(text.to_owned())).map_err(|never: Infallible| match never {}).boxed();
    Response::builder().status(status).body(body).expect("static response parts are valid")
}

/// The answer to a request refused by its backend Service's connection limit (circuit
/// breaker): 503, flag UO.
pub fn connections_overflow(outcome: &mut Outcome) -> Response<Body> {
    outcome.flags = "UO";
    reply(StatusCode::SERVICE_UNAVAILABLE, "circuit breaker open: too many connections to the service\n")
}

/// Istio's `destination_service` of a Service: `name.namespace.svc.cluster.local`.
pub fn fqdn(service: &ObjectKey) -> String {
    crate::telemetry::identity::service_fqdn(Some(service))
}

/// The client's request body as it streams to an endpoint, noting whether reading it failed
/// (malformed chunking, a client that went away): that failure is the client's.
pub struct ClientBody {
    inner: Incoming,
    state: Arc<ClientBodyState>,
}

/// What a streamed request body did.
#[derive(Debug, Default)]
pub struct ClientBodyState {
    pub failed: AtomicBool,
    pub bytes: AtomicU64,
}

impl ClientBody {
    pub fn new(inner: Incoming) -> (Self, Arc<ClientBodyState>) {
        let state = Arc::new(ClientBodyState::default());
        (Self { inner, state: state.clone() }, state)
    }
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => self.state.failed.store(true, Ordering::Release),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.state.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Headers that concern one connection only (RFC 9110 7.6.1), never forwarded: `Connection`
/// and every header it names, `Keep-Alive`, `Proxy-Connection`, `Proxy-Authorization` and
/// `Proxy-Authenticate` (meant for this hop), `Transfer-Encoding` (each hop frames its own
/// body), `TE` except `trailers` (gRPC needs it end to end), `Upgrade` unless the request is an
/// upgrade being passed through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    let tokens = |headers: &HeaderMap| -> Vec<HeaderName> {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrading && n == header::UPGRADE))
            .collect()
    };
    // Most messages say only `keep-alive` or `close` (removed below anyway): no list to make.
    let only_usual = headers.get_all(header::CONNECTION).iter().all(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').all(|t| t.trim().eq_ignore_ascii_case("keep-alive") || t.trim().eq_ignore_ascii_case("close")))
    });
    if !only_usual {
        for name in tokens(headers) {
            headers.remove(name);
        }
    }
    for name in ["keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate"] {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if !upgrading {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers"))));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, header::HeaderValue::from_static("trailers"));
    }
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Every byte reached the client.
    Complete,
    /// The endpoint cut it short or reset it.
    UpstreamError,
    /// Dropped before the end: the client went away.
    Abandoned,
}

impl End {
    /// Envoy's response flag for a response that did not complete, if any: UC (upstream
    /// connection termination), DC (downstream connection termination).
    pub fn flag(self) -> Option<&'static str> {
        match self {
            End::Complete => None,
            End::UpstreamError => Some("UC"),
            End::Abandoned => Some("DC"),
        }
    }
}

type OnEnd = Box<dyn FnOnce(End, u64) + Send + Sync>;

/// A response body that reports how it ended, once, with the bytes it carried: what a
/// request's metrics, latency and endpoint health are recorded from (a response is not over at
/// its headers).
pub struct Tracked {
    inner: Body,
    bytes: u64,
    on_end: Option<OnEnd>,
}

impl Tracked {
    pub fn wrap(inner: Body, on_end: impl FnOnce(End, u64) + Send + Sync + 'static) -> Body {
        Tracked { inner, bytes: 0, on_end: Some(Box::new(on_end)) }.boxed()
    }

    fn end(&mut self, how: End) {
        if let Some(on_end) = self.on_end.take() {
            on_end(how, self.bytes);
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        match &polled {
            Poll::Ready(None) => self.end(End::Complete),
            Poll::Ready(Some(Err(_))) => self.end(End::UpstreamError),
            // hyper stops polling a body that says it is over.
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.end(End::Complete),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let how = if hyper::body::Body::is_end_stream(&self.inner) { End::Complete } else { End::Abandoned };
        self.end(how);
    }
}

/// A request's trace: the context it came with and the span that stands for it here.
#[derive(Debug, Clone, Copy)]
pub struct RequestTrace {
    pub context: TraceContext,
    pub span: [u8; 8],
    pub start: std::time::SystemTime,
}

impl RequestTrace {
    pub fn new(context: TraceContext) -> Self {
        Self { context, span: random_id(), start: std::time::SystemTime::now() }
    }

    /// A new span for one attempt, child of the request's: its id goes upstream in
    /// `traceparent`.
    pub fn attempt(&self, tracer: &Arc<Tracer>, method: &str, endpoint: SocketAddr, resend: u32) -> AttemptTrace {
        // What only a recorded span needs is kept only then (this runs for every attempt).
        let recorded = self.context.sampled && tracer.enabled();
        AttemptTrace {
            tracer: recorded.then(|| tracer.clone()),
            request: *self,
            span: random_id(),
            start: std::time::SystemTime::now(),
            method: if recorded { method.to_owned() } else { String::new() },
            endpoint,
            resend,
        }
    }
}

/// One attempt's span, recorded when the attempt ends (with its response's body, for the
/// last one).
pub struct AttemptTrace {
    /// None when the span is not recorded (unsampled, or tracing off).
    tracer: Option<Arc<Tracer>>,
    request: RequestTrace,
    pub span: [u8; 8],
    start: std::time::SystemTime,
    method: String,
    endpoint: SocketAddr,
    resend: u32,
}

impl AttemptTrace {
    /// `traceparent` for the attempt's request.
    pub fn header(&self) -> String {
        self.request.context.header(self.span)
    }

    /// Records the span (sampled traces, tracing on): `status` when a response came.
    pub fn finish(self, status: Option<u16>, failed: bool) {
        let Some(tracer) = self.tracer else { return };
        let mut attributes = vec![
            ("http.request.method", Value::Str(self.method.clone())),
            ("server.address", Value::Str(self.endpoint.ip().to_string())),
            ("server.port", Value::Int(i64::from(self.endpoint.port()))),
            ("network.peer.address", Value::Str(self.endpoint.ip().to_string())),
        ];
        if let Some(code) = status {
            attributes.push(("http.response.status_code", Value::Int(i64::from(code))));
        }
        if self.resend > 0 {
            attributes.push(("http.request.resend_count", Value::Int(i64::from(self.resend))));
        }
        if failed {
            attributes.push(("error.type", Value::Str(status.map_or_else(|| "connection".to_owned(), |c| c.to_string()))));
        }
        tracer.record(Span {
            trace_id: self.request.context.trace_id,
            span_id: self.span,
            parent: Some(self.request.span),
            name: self.method,
            kind: Kind::Client,
            start: self.start,
            end: std::time::SystemTime::now(),
            attributes,
            error: failed,
        });
    }
}
