//! Traces: the proxy's spans (one per request, one per attempt, OpenTelemetry HTTP semantic
//! conventions) exported over OTLP/HTTP (protobuf) to a collector; Jaeger, Zipkin and Tempo
//! ingest OTLP. W3C trace context decides: a sampled parent is traced, an unsampled one is
//! not, a request without one starts a trace sampled at `--trace-sampling`.
//!
//! Never in a request's way: spans go to a bounded batch (dropped and counted when it is
//! full), a thread of its own takes them (at 512, or a second after the first) and posts them.
#![forbid(unsafe_code)]
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, ToSocketAddrs as _},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::metrics::counter::Counter;

use super::batch::Batch;

const QUEUE: usize = 4096;
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);
const POST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request's place in its trace: the trace, the span it continues (the client's), whether
/// it is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub parent: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// From a `traceparent` header (version 00; malformed or all-zero ids are ignored), or a new
    /// trace sampled with probability `ratio`.
    pub fn from_header(value: Option<&str>, ratio: f64) -> Self {
        value.and_then(parse_traceparent).unwrap_or_else(|| TraceContext {
            trace_id: random_id(),
            parent: None,
            sampled: ratio > 0.0 && fastrand::f64() < ratio,
        })
    }

    /// `traceparent` for a request sent on with `span` as its parent.
    pub fn header(&self, span: [u8; 8]) -> String {
        format!("00-{}-{}-{}", hex(&self.trace_id), hex(&span), if self.sampled { "01" } else { "00" })
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

fn parse_traceparent(value: &str) -> Option<TraceContext> {
    let parts: Vec<&str> = value.trim().split('-').collect();
    let [version, trace, parent, flags] = parts.as_slice() else { return None };
    let lower_hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    if !(lower_hex(version, 2) && *version != "ff" && lower_hex(trace, 32) && lower_hex(parent, 16) && lower_hex(flags, 2)) {
        return None;
    }
    let trace_id: [u8; 16] = unhex(trace)?;
    let parent_id: [u8; 8] = unhex(parent)?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceContext { trace_id, parent: Some(parent_id), sampled: flags & 1 == 1 })
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// A random non-zero id.
pub fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let mut id = [0u8; N];
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
        if id != [0u8; N] {
            return id;
        }
    }
}

/// OTLP span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

/// One finished span.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// OpenTelemetry's span status: an error, or unset.
    pub error: bool,
}

/// Where spans go (`--otlp-traces`), and how often traces without a parent are sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceConfig {
    /// `http://host:port/path` of an OTLP/HTTP traces endpoint (usually `/v1/traces`).
    pub endpoint: Option<String>,
    pub sampling: f64,
}

pub struct Tracer {
    queue: Option<Arc<Batch<Span>>>,
    sampling: f64,
    dropped: Counter,
}

#[derive(Debug, thiserror::Error)]
#[error("OTLP endpoint {0:?}: {1}")]
pub struct EndpointError(pub String, pub &'static str);

impl Tracer {
    pub fn off() -> Self {
        Self { queue: None, sampling: 0.0, dropped: Counter::default() }
    }

    /// Starts the exporter thread for `config.endpoint` (none: tracing off, but trace context
    /// still flows). `dropped` counts spans the queue had no room for, or the collector refused.
    pub fn start(config: &TraceConfig, dropped: Counter) -> Result<Self, EndpointError> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(Self { queue: None, sampling: 0.0, dropped });
        };
        let target = Endpoint::parse(endpoint)?;
        let queue = Arc::new(Batch::new(BATCH, QUEUE, FLUSH_EVERY));
        let (taken, counter) = (queue.clone(), dropped.clone());
        std::thread::Builder::new()
            .name("mesh-traces".into())
            .spawn(move || export(&taken, target, counter))
            .map_err(|_| EndpointError(endpoint.clone(), "cannot start the exporter thread"))?;
        Ok(Self { queue: Some(queue), sampling: config.sampling, dropped })
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    pub fn sampling(&self) -> f64 {
        self.sampling
    }

    /// Queues a finished span; never blocks.
    pub fn record(&self, span: Span) {
        let Some(queue) = &self.queue else { return };
        if !queue.push(span) {
            self.dropped.inc();
        }
    }
}

impl Drop for Tracer {
    /// The exporter posts what is queued, then ends.
    fn drop(&mut self) {
        if let Some(queue) = &self.queue {
            queue.close();
        }
    }
}

/// An `http://host:port/path` URL, resolved when posting.
#[derive(Debug, Clone)]
struct Endpoint {
    host_port: String,
    host: String,
    path: String,
}

impl Endpoint {
    fn parse(url: &str) -> Result<Self, EndpointError> {
        let err = |why| EndpointError(url.to_owned(), why);
        let rest = url.strip_prefix("http://").ok_or_else(|| err("must start with http:// (OTLP/HTTP, protobuf)"))?;
        let (authority, path) = rest.split_once('/').map_or((rest, "/v1/traces".to_owned()), |(a, p)| (a, format!("/{p}")));
        if authority.is_empty() {
            return Err(err("names no host"));
        }
        let host_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_owned()
        } else {
            format!("{authority}:4318")
        };
        Ok(Self { host_port, host: authority.to_owned(), path })
    }

    fn addr(&self) -> std::io::Result<SocketAddr> {
        self.host_port.to_socket_addrs()?.next().ok_or_else(|| std::io::Error::other("the host resolves to no address"))
    }

    /// One POST; Ok when the collector answered 2xx.
    fn post(&self, body: &[u8]) -> std::io::Result<()> {
        let mut stream = TcpStream::connect_timeout(&self.addr()?, POST_TIMEOUT)?;
        stream.set_read_timeout(Some(POST_TIMEOUT))?;
        stream.set_write_timeout(Some(POST_TIMEOUT))?;
        write!(
            stream,
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.path,
            self.host,
            body.len()
        )?;
        stream.write_all(body)?;
        let mut head = [0u8; 12];
        stream.read_exact(&mut head)?;
        // "HTTP/1.1 200"
        match head.get(9) {
            Some(b'2') => Ok(()),
            _ => Err(std::io::Error::other(format!("the collector answered {}", String::from_utf8_lossy(&head)))),
        }
    }
}

fn export(queue: &Batch<Span>, endpoint: Endpoint, dropped: Counter) {
    // Who sends the spans, encoded once: the same in every batch.
    let resource = resource();
    let mut batch: Vec<Span> = Vec::with_capacity(BATCH);
    let mut last_warning: Option<Instant> = None;
    while queue.take(&mut batch) {
        // A burst may have queued more than a batch since the last take: posts of BATCH.
        for spans in batch.chunks(BATCH) {
            if let Err(e) = endpoint.post(&encode(&resource, spans)) {
                dropped.inc_by(spans.len() as u64);
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    tracing::warn!(endpoint = %endpoint.host_port, error = %e, spans = spans.len(), "exporting spans failed; they are dropped");
                    last_warning = Some(Instant::now());
                }
            }
        }
    }
}

// OTLP protobuf (opentelemetry-proto, collector/trace/v1), written by hand: a handful of
// messages, no code generator.

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    tag(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn message(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes_field(out, field, &inner);
}

fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    message(out, field, |kv| {
        bytes_field(kv, 1, key.as_bytes());
        message(kv, 2, |any| match value {
            Value::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Value::Int(i) => {
                tag(any, 3, 0);
                varint(any, *i as u64);
            }
        });
    });
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// This agent as an OTLP `Resource` (encoded): `service.name` and `host.name`.
fn resource() -> Vec<u8> {
    let mut resource = Vec::new();
    key_value(&mut resource, 1, "service.name", &Value::Str("mesh".into()));
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        key_value(&mut resource, 1, "host.name", &Value::Str(host.trim().to_owned()));
    }
    resource
}

/// An `ExportTraceServiceRequest` holding `spans`, from `resource` (encoded).
pub fn encode(resource: &[u8], spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::new();
    message(&mut out, 1, |resource_spans| {
        bytes_field(resource_spans, 1, resource);
        message(resource_spans, 2, |scope_spans| {
            message(scope_spans, 1, |scope| {
                bytes_field(scope, 1, b"mesh-proxy");
                bytes_field(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for span in spans {
                message(scope_spans, 2, |s| {
                    bytes_field(s, 1, &span.trace_id);
                    bytes_field(s, 2, &span.span_id);
                    if let Some(parent) = span.parent {
                        bytes_field(s, 4, &parent);
                    }
                    bytes_field(s, 5, span.name.as_bytes());
                    tag(s, 6, 0);
                    varint(s, span.kind as u64);
                    tag(s, 7, 1);
                    s.extend_from_slice(&unix_nanos(span.start).to_le_bytes());
                    tag(s, 8, 1);
                    s.extend_from_slice(&unix_nanos(span.end).to_le_bytes());
                    for (key, value) in &span.attributes {
                        key_value(s, 9, key, value);
                    }
                    if span.error {
                        // Status { code = STATUS_CODE_ERROR (2) }
                        message(s, 15, |status| {
                            tag(status, 3, 0);
                            varint(status, 2);
                        });
                    }
                });
            }
        });
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_continues_a_sampled_parent_and_samples_new_traces_by_ratio() {
        let ctx = TraceContext::from_header(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), 0.0);
        assert!(ctx.sampled);
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.parent, Some([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]));
        let child = ctx.header([1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(child, "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-01");
        // An unsampled parent stays unsampled, whatever the ratio.
        assert!(!TraceContext::from_header(Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"), 1.0).sampled);
        // Malformed or zero ids start a new trace.
        for bad in
            ["00-00000000000000000000000000000000-00f067aa0ba902b7-01", "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "junk"]
        {
            let ctx = TraceContext::from_header(Some(bad), 1.0);
            assert!(ctx.parent.is_none() && ctx.sampled, "{bad}");
        }
        assert!(!TraceContext::from_header(None, 0.0).sampled);
    }

    #[test]
    fn endpoints_must_be_plain_http_urls() {
        assert_eq!(Endpoint::parse("http://otel:4318/v1/traces").unwrap().host_port, "otel:4318");
        assert_eq!(Endpoint::parse("http://otel").unwrap().path, "/v1/traces");
        assert_eq!(Endpoint::parse("http://otel").unwrap().host_port, "otel:4318");
        assert!(Endpoint::parse("https://otel:4318").is_err());
        assert!(Endpoint::parse("http:///v1/traces").is_err());
    }
}
