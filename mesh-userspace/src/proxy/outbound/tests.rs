//! The proxy in process, without a kernel: a fake original destination, real sockets to
//! backends on loopback, the state from YAML through the store.
use std::{
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use http_body_util::Empty;
use hyper::body::Bytes;

use super::*;
use crate::{
    proxy::connect::{Conn, TcpConnector},
    server::Lifecycle,
    state::{NodeContext, store},
    telemetry::FlowLog,
    telemetry::access_log::Target,
    telemetry::traces::{TraceConfig, Tracer},
};

/// Every connection was going to this address.
struct AlwaysTo(SocketAddr);

impl OrigDst for AlwaysTo {
    fn take(&self, _: SocketAddr) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// An HTTP/1.1 backend answering its name; `reset`: close every connection unanswered.
async fn backend(addr: &str, name: &'static str, reset: bool) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.expect("bind backend");
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            if reset {
                drop(stream);
                continue;
            }
            tokio::spawn(async move {
                let svc = service_fn(move |_req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(name))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    local
}

fn service(name: &str, vip: &str, endpoints: &[SocketAddr], extra: &str) -> String {
    let port = endpoints.first().map_or(8080, |e| e.port());
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{clusterIP: {vip}, ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: ns, labels: {{kubernetes.io/service-name: {name}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints:\n"
    );
    for e in endpoints {
        y.push_str(&format!("- addresses: [\"{}\"]\n", e.ip()));
    }
    y.push_str("---\n");
    if !extra.is_empty() {
        y.push_str(extra);
        y.push_str("---\n");
    }
    y
}

/// A proxy for `yaml` whose every connection dialled `dialled`, on an ephemeral port.
async fn proxy(yaml: &str, dialled: &str, connector: Arc<dyn Connector>) -> (SocketAddr, watch::Sender<bool>) {
    let (addr, stop, _) = proxy_observed(yaml, dialled, connector, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT, |o| o).await;
    (addr, stop)
}

/// `proxy` with `limits`, a default request timeout and whatever `configure` adds; its
/// telemetry to look at.
async fn proxy_observed(
    yaml: &str,
    dialled: &str,
    connector: Arc<dyn Connector>,
    limits: Limits,
    default_timeout: Duration,
    configure: impl FnOnce(Outbound) -> Outbound,
) -> (SocketAddr, watch::Sender<bool>, Arc<Telemetry>) {
    let running = start(yaml, dialled, connector, limits, |o| configure(o.with_default_request_timeout(default_timeout)), true).await;
    (running.addr, running.stop, running.telemetry)
}

/// A proxy being served, with its life cycle in the test's hands.
struct Running {
    addr: SocketAddr,
    /// Send true to drain.
    stop: watch::Sender<bool>,
    /// Send true once "the configuration is read".
    ready: watch::Sender<bool>,
    telemetry: Arc<Telemetry>,
    /// `serve` itself: finished once drained.
    served: tokio::task::JoinHandle<()>,
    /// A new configuration for the proxy: `apply(yaml)`.
    config: watch::Sender<Arc<Snapshot>>,
}

impl Running {
    /// Gives the proxy the objects of `yaml` in place of its configuration.
    fn apply(&self, yaml: &str) {
        self.config.send_replace(snapshot_of(yaml));
    }
}

fn snapshot_of(yaml: &str) -> Arc<Snapshot> {
    let store = store::load(Path::new("t.yaml"), yaml, NodeContext { node: "n".into(), zone: None }).unwrap_or_else(|e| panic!("{e}"));
    store.snapshot()
}

async fn start(
    yaml: &str,
    dialled: &str,
    connector: Arc<dyn Connector>,
    limits: Limits,
    configure: impl FnOnce(Outbound) -> Outbound,
    ready_at_start: bool,
) -> Running {
    let (config, rx) = watch::channel(snapshot_of(yaml));
    let telemetry = Arc::new(Telemetry::new(&FlowLog::Off).unwrap());
    let outbound = Arc::new(configure(Outbound::new(Box::new(AlwaysTo(dialled.parse().unwrap())), connector, rx, telemetry.clone())));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, drain) = watch::channel(false);
    let (ready, ready_rx) = watch::channel(ready_at_start);
    let served =
        tokio::spawn(serve(outbound, listener, limits, Lifecycle { ready: ready_rx, drain, drain_timeout: Duration::from_secs(30) }));
    Running { addr, stop, ready, telemetry, served, config }
}

async fn get(proxy: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().uri("/").header("host", "web");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let response = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    let code = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Service `web`'s HTTPRoute to itself: its connections go to the proxy, every request to it.
const SELF_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: ns}\n\
    spec: {parentRefs: [{kind: Service, name: web}], rules: [{backendRefs: [{name: web, port: 80}]}]}\n";

/// Service `web` whose two endpoints share a port: `good_ip` answers "good", `bad_ip` resets
/// every connection before answering. Its YAML, and the good endpoint.
async fn good_and_resetting(good_ip: &str, bad_ip: &str) -> (String, SocketAddr) {
    let good = backend(&format!("{good_ip}:0"), "good", false).await;
    let bad = backend(&format!("{bad_ip}:{}", good.port()), "bad", true).await;
    (service("web", "10.96.0.10", &[good, bad], SELF_ROUTE), good)
}

const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: split, namespace: ns}\n\
    spec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n\
    \x20 - matches: [{headers: [{name: x-version, value: v2}]}]\n    backendRefs: [{name: web-v2, port: 80}]\n\
    \x20 - backendRefs: [{name: web, port: 80}]\n";

#[tokio::test]
async fn routes_by_header_to_the_chosen_service_without_a_kernel() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let v2 = backend("127.0.0.1:0", "v2", false).await;
    // Two Services, each with its backend on its own port.
    let yaml = format!("{}{}", service("web", "10.96.0.10", &[v1], ROUTE), service("web-v2", "10.96.0.11", &[v2], ""));
    let (addr, _stop) = proxy(&yaml, "10.96.0.10:80", Arc::new(TcpConnector)).await;
    assert_eq!(get(addr, &[]).await, (200, "v1".into()));
    assert_eq!(get(addr, &[("x-version", "v2")]).await, (200, "v2".into()));
}

#[tokio::test]
async fn a_connection_the_kernel_did_not_send_is_refused_politely() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let yaml = service("web", "10.96.0.10", &[v1], ROUTE);
    // The dialled address is no Service the proxy knows.
    let (addr, _stop) = proxy(&yaml, "10.96.9.9:80", Arc::new(TcpConnector)).await;
    assert_eq!(get(addr, &[]).await.0, 400);
}

#[tokio::test]
async fn a_reset_before_any_response_is_retried_on_another_endpoint() {
    let (yaml, _) = good_and_resetting("127.0.0.21", "127.0.0.22").await;
    let (addr, _stop) = proxy(&yaml, "10.96.0.10:80", Arc::new(TcpConnector)).await;
    for _ in 0..10 {
        assert_eq!(get(addr, &[]).await, (200, "good".into()));
    }
}

/// A connector that sends every connection to one place and counts them: the seam an HBONE
/// tunnel uses.
struct Diverted {
    to: SocketAddr,
    count: AtomicUsize,
}

impl Connector for Diverted {
    fn connect(&self, _endpoint: SocketAddr) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Conn>> + Send>> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let to = self.to;
        Box::pin(async move { Ok(Conn::new(tokio::net::TcpStream::connect(to).await?)) })
    }
}

#[tokio::test]
async fn upstream_connections_go_through_the_connector() {
    let tunnel = backend("127.0.0.1:0", "through the tunnel", false).await;
    // The endpoint itself does not exist: only the connector knows the way.
    let yaml = service("web", "10.96.0.10", &["127.0.0.99:9".parse().unwrap()], ROUTE);
    let connector = Arc::new(Diverted { to: tunnel, count: AtomicUsize::new(0) });
    let (addr, _stop) = proxy(&yaml, "10.96.0.10:80", connector.clone()).await;
    assert_eq!(get(addr, &[]).await, (200, "through the tunnel".into()));
    assert_eq!(connector.count.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn every_request_is_logged_once_its_response_has_ended() {
    let (yaml, good) = good_and_resetting("127.0.0.51", "127.0.0.52").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let log = AccessLog::open(&Target::File(path.clone()), Default::default()).unwrap();
    let (addr, _stop, _) =
        proxy_observed(&yaml, "10.96.0.10:80", Arc::new(TcpConnector), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT, |o| o.with_access_log(log))
            .await;
    // Until one request met the resetting endpoint first (and was retried): every line is
    // there, and one of them says two attempts.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let lines = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        for sent in 1.. {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let request = Request::builder()
                .method("POST")
                .uri("/items?x=1")
                .header("host", "web.ns")
                .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
                .body(Full::new(Bytes::from_static(b"hello")))
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            assert_eq!(response.status(), 200);
            response.into_body().collect().await.unwrap();
            // The line is written after the body has ended, by the log's own thread.
            loop {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
                if lines.len() == sent {
                    if lines.iter().any(|l| l["attempts"] == 2) {
                        return lines;
                    }
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
        unreachable!()
    })
    .await
    .expect("a retried request within 30 s");
    let line = lines.last().unwrap();
    assert_eq!(line["method"], "POST");
    assert_eq!(line["authority"], "web.ns");
    assert_eq!(line["path"], "/items");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["response_code"], 200);
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["attempts"], 2);
    assert_eq!(line["upstream_host"], good.to_string());
    assert_eq!(line["destination_service"], "ns/web");
    assert_eq!(line["bytes_received"], 5);
    assert_eq!(line["bytes_sent"], 4);
    assert_eq!(line["trace_id"], trace);
    assert!(line["start_time"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{line}");
    assert!(line["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{line}");
}

/// The OTLP receiver (tests/otlp/receiver.py, decoding with PyPI opentelemetry-proto): its
/// port, and its spans as they arrive. None, with the reason printed, without the Python that
/// has the package (`cargo xtask test` provides it in MESH_OTEL_PYTHON).
fn otlp_receiver() -> Option<(u16, std::process::Child, tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>)> {
    use std::io::BufRead as _;
    let Some(python) = std::env::var_os("MESH_OTEL_PYTHON") else {
        eprintln!("skipped: MESH_OTEL_PYTHON (a Python with opentelemetry-proto) is not set; `cargo xtask test` sets it");
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/otlp/receiver.py");
    let mut child =
        std::process::Command::new(python).arg(script).stdout(std::process::Stdio::piped()).spawn().expect("the OTLP receiver starts");
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let port: u16 = lines.next().expect("a port line").unwrap().trim().parse().expect("a port");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if tx.send(serde_json::from_str(&line).expect("a span as JSON")).is_err() {
                return;
            }
        }
    });
    Some((port, child, rx))
}

#[tokio::test]
async fn a_retried_request_is_one_trace_with_a_span_per_attempt_exported_over_otlp() {
    let Some((port, mut receiver, mut spans)) = otlp_receiver() else { return };
    let (yaml, _) = good_and_resetting("127.0.0.71", "127.0.0.72").await;
    let config = TraceConfig { endpoint: Some(format!("http://127.0.0.1:{port}/v1/traces")), sampling: 0.0 };
    let tracer = Tracer::start(&config, Default::default()).unwrap();
    let (addr, _stop, _) =
        proxy_observed(&yaml, "10.96.0.10:80", Arc::new(TcpConnector), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT, |o| o.with_tracer(tracer))
            .await;
    let parent = "00f067aa0ba902b7";
    // An unsampled parent: followed, nothing exported.
    let unsampled = format!("{:032x}", fastrand::u128(1..));
    assert_eq!(get(addr, &[("traceparent", &format!("00-{unsampled}-{parent}-00"))]).await.0, 200);
    // Sampled requests until one met the resetting endpoint first and was retried.
    let mut traces: std::collections::HashMap<String, Vec<serde_json::Value>> = std::collections::HashMap::new();
    let retried = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        loop {
            let trace = format!("{:032x}", fastrand::u128(1..));
            assert_eq!(get(addr, &[("traceparent", &format!("00-{trace}-{parent}-01"))]).await, (200, "good".into()));
            // Its spans: the request's comes when its response has ended, after its attempts'.
            loop {
                let span = spans.recv().await.expect("the receiver runs");
                let id = span["trace_id"].as_str().unwrap().to_owned();
                assert_ne!(id, unsampled, "an unsampled trace was exported: {span}");
                let done = span["kind"] == 2;
                traces.entry(id.clone()).or_default().push(span);
                if done && id == trace {
                    break;
                }
            }
            if traces[&trace].len() == 3 {
                return trace;
            }
        }
    })
    .await
    .expect("a retried request within 60 s");
    let spans = &traces[&retried];
    let request = spans.iter().find(|s| s["kind"] == 2).unwrap();
    let attempts: Vec<&serde_json::Value> = spans.iter().filter(|s| s["kind"] == 3).collect();
    assert_eq!(request["parent"], parent, "the request continues the client's span: {request}");
    assert_eq!(request["service"], "mesh");
    assert_eq!(request["attributes"]["http.request.method"], "GET");
    assert_eq!(request["attributes"]["http.response.status_code"], 200);
    assert_eq!(attempts.len(), 2, "{spans:?}");
    for attempt in &attempts {
        assert_eq!(attempt["parent"], request["span_id"], "attempts are children of the request: {attempt}");
        assert!(attempt["start"].as_u64() >= request["start"].as_u64() && attempt["end"].as_u64() <= request["end"].as_u64(), "{spans:?}");
    }
    let (first, second) = if attempts[0]["attributes"].get("http.request.resend_count").is_none() {
        (attempts[0], attempts[1])
    } else {
        (attempts[1], attempts[0])
    };
    assert_eq!(first["status"], 2, "the reset attempt is an error: {first}");
    assert_eq!(first["attributes"]["network.peer.address"], "127.0.0.72");
    assert_eq!(second["attributes"]["http.request.resend_count"], 1, "{second}");
    assert_eq!(second["attributes"]["http.response.status_code"], 200);
    assert_eq!(second["attributes"]["network.peer.address"], "127.0.0.71");
    let _ = receiver.kill();
    let _ = receiver.wait();
}

mod abuse;
