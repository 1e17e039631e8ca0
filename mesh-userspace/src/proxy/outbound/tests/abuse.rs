//! The proxy against slow, idle, greedy and malformed clients and against backends that hang.
//! Every wait is for an event (a close, an answer); `BOUND` is only the safety net that turns
//! "never" into a failure.
use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};

use super::*;

const BOUND: Duration = Duration::from_secs(30);

/// Limits small enough for a test to reach.
fn short() -> Limits {
    Limits { header_timeout: Duration::from_millis(300), idle_timeout: Duration::from_millis(300), ..Limits::PROXY }
}

/// Reads until the proxy closes the connection; what it sent.
async fn until_closed(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(BOUND, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    });
    read.await.expect("the proxy closes the connection");
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends raw bytes as one request and reads the status line of the answer.
async fn raw_status(proxy: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(BOUND, stream.read(&mut buf)).await.expect("an answer").unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_owned()
}

/// A backend on `addr` that hands each accepted connection to `serve`, on a task of its own.
async fn raw_backend<F, Fut>(addr: &str, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
    local
}

/// Service `web` at 10.96.0.10, routed to itself (L7), over `endpoints`.
fn web(endpoints: &[SocketAddr]) -> String {
    service("web", "10.96.0.10", endpoints, SELF_ROUTE)
}

/// A proxy for `yaml` whose clients dialled web's VIP; its telemetry to look at.
async fn web_proxy(yaml: &str, limits: Limits, default_timeout: Duration) -> (SocketAddr, watch::Sender<bool>, Arc<Telemetry>) {
    proxy_observed(yaml, "10.96.0.10:80", Arc::new(TcpConnector), limits, default_timeout, |o| o).await
}

/// A backend that answers every request with the headers it received, `name: value` a line.
async fn echo_headers(addr: &str) -> SocketAddr {
    raw_backend(addr, |stream| async move {
        let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
            let lines: String = req.headers().iter().map(|(n, v)| format!("{n}: {}\n", v.to_str().unwrap_or("?"))).collect();
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(lines))))
        });
        let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
    })
    .await
}

/// A backend that reads requests and never answers; reports each connection's end (EOF).
async fn silent(addr: &str) -> (SocketAddr, mpsc::UnboundedReceiver<&'static str>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let local = raw_backend(addr, move |mut stream| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx.send("closed");
                        return;
                    }
                    Ok(_) => {
                        let _ = tx.send("request");
                    }
                }
            }
        }
    })
    .await;
    (local, rx)
}

#[tokio::test]
async fn a_client_trickling_its_request_head_is_cut_off() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let (addr, _stop, _) = web_proxy(&web(&[v1]), short(), DEFAULT_REQUEST_TIMEOUT).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    // A header line every 50 ms, never the blank line that ends the head: always active,
    // never done.
    let trickle = tokio::spawn(async move {
        writer.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n").await?;
        for i in 0.. {
            tokio::time::sleep(Duration::from_millis(50)).await;
            writer.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes()).await?;
        }
        Ok::<_, std::io::Error>(())
    });
    // (Fails the test if the proxy never closes it.)
    until_closed(&mut reader).await;
    trickle.abort();
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let (addr, _stop, _) = web_proxy(&web(&[v1]), short(), DEFAULT_REQUEST_TIMEOUT).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    let conn = tokio::spawn(conn);
    let response = sender.send_request(Request::builder().uri("http://web/").body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    // Nothing more is asked: the proxy ends the connection.
    tokio::time::timeout(BOUND, conn).await.expect("the proxy closes an idle HTTP/2 connection").unwrap().ok();
}

#[tokio::test]
async fn an_http2_connection_kept_busy_with_pings_but_no_request_is_closed() {
    // Bytes that are not requests (PINGs here; a HEADERS frame trickled forever is the same)
    // must not hold a connection open: idle means no request in flight, as in Envoy.
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let (addr, _stop, _) = web_proxy(&web(&[v1]), short(), DEFAULT_REQUEST_TIMEOUT).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let pinging = tokio::spawn(async move {
        // The preface, an empty SETTINGS frame, then a PING every third of the idle timeout
        // for as long as the connection takes them.
        let _ = writer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let _ = writer.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
        while writer.write_all(&[0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // (Fails the test if the proxy never closes it.)
    until_closed(&mut reader).await;
    pinging.abort();
}

#[tokio::test]
async fn a_full_listener_closes_new_connections_until_one_frees() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let limits = Limits { max_connections: 2, ..Limits::PROXY };
    let (addr, _stop, _) = web_proxy(&web(&[v1]), limits, DEFAULT_REQUEST_TIMEOUT).await;
    // Two kept-alive connections, each known to the proxy (it answered on them).
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        let conn = tokio::spawn(conn);
        let response =
            sender.send_request(Request::builder().uri("/").header("host", "web").body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
        held.push((sender, conn));
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    assert_eq!(until_closed(&mut third).await, "", "a connection over the cap is closed unanswered");
    // One closes; a new connection is served once the proxy has seen it go.
    let (sender, conn) = held.remove(0);
    drop(sender);
    conn.abort();
    let served = tokio::time::timeout(BOUND, async {
        loop {
            let stream = TcpStream::connect(addr).await.unwrap();
            if let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                tokio::spawn(conn);
                let request = Request::builder().uri("/").header("host", "web").body(Empty::<Bytes>::new()).unwrap();
                if sender.send_request(request).await.is_ok_and(|r| r.status() == 200) {
                    return;
                }
            }
            tokio::task::yield_now().await;
        }
    });
    served.await.expect("a slot frees when a connection closes");
}

#[tokio::test]
async fn a_request_head_over_60_kib_is_refused_with_431() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let (addr, _stop, _) = web_proxy(&web(&[v1]), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let big = "a".repeat(100 * 1024);
    let status = raw_status(addr, format!("GET / HTTP/1.1\r\nHost: web\r\nX-Big: {big}\r\n\r\n").as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
    // A head under the limit still passes.
    let fine = "a".repeat(30 * 1024);
    let status = raw_status(addr, format!("GET / HTTP/1.1\r\nHost: web\r\nX-Big: {fine}\r\n\r\n").as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test]
async fn a_request_with_two_host_headers_is_refused() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    let (addr, _stop, _) = web_proxy(&web(&[v1]), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let status = raw_status(addr, b"GET / HTTP/1.1\r\nHost: web\r\nHost: evil\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");
}

#[tokio::test]
async fn hop_by_hop_headers_stay_on_their_hop() {
    let echo = echo_headers("127.0.0.1:0").await;
    let (addr, _stop, _) = web_proxy(&web(&[echo]), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let (code, seen) = get(
        addr,
        &[
            ("connection", "x-secret, keep-alive"),
            ("x-secret", "for this hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers, deflate"),
            ("x-kept", "yes"),
        ],
    )
    .await;
    assert_eq!(code, 200);
    let lines: Vec<&str> = seen.lines().collect();
    assert!(lines.contains(&"x-kept: yes") && lines.contains(&"te: trailers"), "{seen}");
    for gone in ["x-secret", "keep-alive", "proxy-authorization", "proxy-connection"] {
        assert!(!lines.iter().any(|l| l.starts_with(&format!("{gone}:"))), "{gone} reached the backend:\n{seen}");
    }
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_fault_not_the_endpoints() {
    let a = backend("127.0.0.31:0", "a", false).await;
    let b = backend(&format!("127.0.0.32:{}", a.port()), "b", false).await;
    let (addr, _stop, _) = web_proxy(&web(&[a, b]), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    // A chunk size that is no number: the client's error, answered 400 every time.
    for _ in 0..12 {
        let status = raw_status(addr, b"POST / HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").await;
        assert!(status.starts_with("HTTP/1.1 400"), "{status}");
    }
    // Neither endpoint was ejected for it: both still take requests.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let (code, body) = get(addr, &[]).await;
        assert_eq!(code, 200);
        seen.insert(body);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "one endpoint stopped getting requests: {seen:?}");
}

#[tokio::test]
async fn a_backend_that_never_answers_gets_a_504_by_default() {
    let (hung, _events) = silent("127.0.0.1:0").await;
    let (addr, _stop, _) = web_proxy(&web(&[hung]), Limits::PROXY, Duration::from_millis(300)).await;
    let answered = tokio::time::timeout(BOUND, get(addr, &[])).await.expect("answered without a route timeout");
    assert_eq!(answered.0, 504);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_upstream_request() {
    let (hung, mut events) = silent("127.0.0.1:0").await;
    let (addr, _stop, _) = web_proxy(&web(&[hung]), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await.unwrap();
    let first = tokio::time::timeout(BOUND, events.recv()).await.expect("the request reached the backend");
    assert_eq!(first, Some("request"));
    drop(client);
    let next = tokio::time::timeout(BOUND, events.recv()).await.expect("the upstream connection is closed");
    assert_eq!(next, Some("closed"));
}

/// A backend that promises 100 bytes, sends 5 and closes.
async fn cut_short(addr: &str) -> SocketAddr {
    raw_backend(addr, |mut stream| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort").await;
    })
    .await
}

/// A GET whose body may break: (status, body or "CUT").
async fn get_lossy(proxy: SocketAddr) -> (u16, String) {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let request = Request::builder().uri("/").header("host", "web").body(Empty::<Bytes>::new()).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let code = response.status().as_u16();
    match response.into_body().collect().await {
        Ok(body) => (code, String::from_utf8_lossy(&body.to_bytes()).into_owned()),
        Err(_) => (code, "CUT".into()),
    }
}

#[tokio::test]
async fn a_response_cut_short_is_flagged_and_counts_against_its_endpoint() {
    let good = backend("127.0.0.41:0", "good", false).await;
    let cut = cut_short(&format!("127.0.0.42:{}", good.port())).await;
    let yaml = web(&[good, cut]);
    let (addr, _stop, telemetry) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    // Requests go on until the endpoint that cuts its responses short is ejected (five in a
    // row by default): a cut response is a failure, not a 200 like any other.
    let mut cuts = 0;
    let ejected = tokio::time::timeout(BOUND, async {
        loop {
            if get_lossy(addr).await.1 == "CUT" {
                cuts += 1;
            }
            if telemetry.metrics.encode().lines().any(|l| l.starts_with("mesh_endpoint_ejections_total{") && !l.ends_with(" 0")) {
                return;
            }
        }
    });
    ejected.await.expect("the endpoint cutting responses short is ejected");
    assert!(cuts >= 5, "{cuts} cut responses");
    for _ in 0..20 {
        assert_eq!(get_lossy(addr).await, (200, "good".into()));
    }
    // Each cut response is counted with Envoy's UC flag (upstream connection termination).
    let metrics = telemetry.metrics.encode();
    let flagged: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_flags=\"UC\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(flagged, f64::from(cuts), "{metrics}");
}

/// `service`, with annotations on the Service.
fn annotated(endpoints: &[SocketAddr], annotations: &str) -> String {
    web(endpoints).replacen(
        "metadata: {name: web, namespace: ns}",
        &format!("metadata: {{name: web, namespace: ns, annotations: {{{annotations}}}}}"),
        1,
    )
}

fn flagged(telemetry: &Telemetry, flag: &str) -> f64 {
    telemetry
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&format!("response_flags=\"{flag}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_local_rate_limit_answers_429_with_retry_after() {
    let v1 = backend("127.0.0.1:0", "v1", false).await;
    // One request a minute, two saved: the third in a row is over, whatever the machine's speed.
    let yaml = annotated(&[v1], "mesh.dev/rate-limit-rps: \"0.0166\", mesh.dev/rate-limit-burst: \"2\"");
    let (addr, _stop, telemetry) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    assert_eq!(get(addr, &[]).await.0, 200);
    assert_eq!(get(addr, &[]).await.0, 200);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n").await.unwrap();
    let answer = until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    let retry_after: u64 = answer
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no retry-after: {answer}"));
    assert!((1..=61).contains(&retry_after), "{retry_after}");
    assert_eq!(flagged(&telemetry, "RL"), 1.0);
}

#[tokio::test]
async fn circuit_breakers_answer_503_at_once_when_full() {
    let (a, _a_events) = silent("127.0.0.61:0").await;
    let (b, _b_events) = silent(&format!("127.0.0.62:{}", a.port())).await;
    // Per Service: one request in flight at most.
    let yaml = annotated(&[a, b], "mesh.dev/max-requests: \"1\"");
    let (addr, _stop, telemetry) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await.unwrap();
    // The first is in flight (its endpoint never answers); the second is refused at once.
    let refused = tokio::time::timeout(BOUND, async {
        loop {
            let (code, _) = get(addr, &[]).await;
            if code == 503 {
                return;
            }
        }
    });
    refused.await.expect("a 503 while the first request is in flight");
    assert!(flagged(&telemetry, "UO") >= 1.0);
    // The first leaves (its client goes away): the Service takes requests again (they hang
    // too, so a request that is not refused at once is one that was let in).
    drop(first);
    let let_in = tokio::time::timeout(BOUND, async {
        loop {
            if tokio::time::timeout(Duration::from_millis(200), get(addr, &[])).await.is_err() {
                return;
            }
        }
    });
    let_in.await.expect("let in once the first request has gone");

    // Per endpoint: one each; two requests fill both endpoints, a third is refused.
    let yaml = annotated(&[a, b], "mesh.dev/max-requests-per-endpoint: \"1\"");
    let (addr, _stop, telemetry) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await.unwrap();
        held.push(s);
    }
    let refused = tokio::time::timeout(BOUND, async {
        loop {
            if get(addr, &[]).await.0 == 503 {
                return;
            }
        }
    });
    refused.await.expect("a 503 once both endpoints have a request in flight");
    assert!(flagged(&telemetry, "UO") >= 1.0);
}

/// A keep-alive backend that holds its first request until `answer` turns true and answers
/// every other at once; says when a request arrived, and counts the connections it accepted.
async fn holding_backend() -> (SocketAddr, mpsc::UnboundedReceiver<()>, watch::Sender<bool>, Arc<std::sync::atomic::AtomicUsize>) {
    let (arrived_tx, arrived) = mpsc::unbounded_channel();
    let (answer_tx, answer) = watch::channel(false);
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let counted = connections.clone();
    let addr = raw_backend("127.0.0.1:0", move |mut stream| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let (arrived_tx, mut answer, first) = (arrived_tx.clone(), answer.clone(), first.clone());
        async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
                while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    head.drain(..end + 4);
                    let _ = arrived_tx.send(());
                    if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                        let _ = answer.wait_for(|a| *a).await;
                    }
                    if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                        return;
                    }
                }
            }
        }
    })
    .await;
    (addr, arrived, answer_tx, connections)
}

#[tokio::test]
async fn at_its_connection_limit_a_service_lets_one_request_wait_and_refuses_the_next() {
    let (backend, mut arrived, answer, connections) = holding_backend().await;
    let yaml = annotated(&[backend], "mesh.dev/max-connections: \"1\", mesh.dev/max-pending-requests: \"1\"");
    let (addr, _stop, telemetry) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    // The first request holds the Service's only connection.
    let first = tokio::spawn(get_lossy(addr));
    tokio::time::timeout(BOUND, arrived.recv()).await.expect("the first request reaches the backend");
    // Two more, with no idle connection: one may wait for it, the other is refused at once
    // (which one depends on which the proxy reads first).
    let (second, third) = (tokio::spawn(get_lossy(addr)), tokio::spawn(get_lossy(addr)));
    let refused = tokio::time::timeout(BOUND, async {
        while flagged(&telemetry, "UO") < 1.0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    refused.await.expect("one of them is refused while the other waits");
    answer.send_replace(true);
    assert_eq!(tokio::time::timeout(BOUND, first).await.unwrap().unwrap(), (200, "ok".into()));
    let mut codes =
        vec![tokio::time::timeout(BOUND, second).await.unwrap().unwrap().0, tokio::time::timeout(BOUND, third).await.unwrap().unwrap().0];
    codes.sort();
    assert_eq!(codes, vec![200, 503], "the waiting one is served on the connection the first left idle");
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1, "never a second connection");
    assert_eq!(flagged(&telemetry, "UO"), 1.0);
}

#[tokio::test]
async fn at_its_connection_limit_without_pending_requests_a_service_refuses_at_once() {
    let (backend, mut arrived, answer, connections) = holding_backend().await;
    let yaml = annotated(&[backend], "mesh.dev/max-connections: \"1\"");
    let (addr, _stop, telemetry) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let first = tokio::spawn(get_lossy(addr));
    tokio::time::timeout(BOUND, arrived.recv()).await.expect("the first request reaches the backend");
    let (code, body) = tokio::time::timeout(BOUND, get_lossy(addr)).await.expect("refused at once, not queued");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    answer.send_replace(true);
    assert_eq!(tokio::time::timeout(BOUND, first).await.unwrap().unwrap(), (200, "ok".into()));
    // The connection is idle again: the next request takes it.
    assert_eq!(tokio::time::timeout(BOUND, get_lossy(addr)).await.unwrap(), (200, "ok".into()));
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(flagged(&telemetry, "UO"), 1.0, "refused by the breaker, not blamed on the endpoint");
}

#[tokio::test]
async fn a_connection_limit_set_by_a_new_configuration_applies_to_the_next_request() {
    let (backend, mut arrived, answer, connections) = holding_backend().await;
    let running = start(&web(&[backend]), "10.96.0.10:80", Arc::new(TcpConnector), Limits::PROXY, |o| o, true).await;
    // Without a limit, the first request opens a connection (and is held on it).
    let first = tokio::spawn(get_lossy(running.addr));
    tokio::time::timeout(BOUND, arrived.recv()).await.expect("the first request reaches the backend");
    // The Service's annotations change under it: one connection at most, none may wait.
    running.apply(&annotated(&[backend], "mesh.dev/max-connections: \"1\""));
    let (code, body) = tokio::time::timeout(BOUND, get_lossy(running.addr)).await.expect("refused at once");
    assert_eq!(code, 503, "the new limit counts the connection already open: {body}");
    answer.send_replace(true);
    assert_eq!(tokio::time::timeout(BOUND, first).await.unwrap().unwrap(), (200, "ok".into()));
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_streamed_response_quiet_for_longer_than_the_idle_timeout_is_not_cut() {
    // A backend that answers half its body, pauses for three idle timeouts, then the rest.
    let slow = raw_backend("127.0.0.1:0", |mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        let _ = stream.write_all(b"5\r\nworld\r\n0\r\n\r\n").await;
    })
    .await;
    let (addr, _stop, _) = web_proxy(&web(&[slow]), short(), DEFAULT_REQUEST_TIMEOUT).await;
    assert_eq!(get_lossy(addr).await, (200, "helloworld".into()));
}

#[tokio::test]
async fn the_proxy_accepts_once_ready_and_lets_requests_in_flight_finish_when_draining() {
    // A backend that says when a request arrived and answers once told to.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel();
    let (answer_tx, answer) = watch::channel(false);
    let backend_addr = raw_backend("127.0.0.1:0", move |mut stream| {
        let (arrived_tx, mut answer) = (arrived_tx.clone(), answer.clone());
        async move {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = arrived_tx.send(());
            let _ = answer.wait_for(|a| *a).await;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate").await;
        }
    })
    .await;
    let running = start(&web(&[backend_addr]), "10.96.0.10:80", Arc::new(TcpConnector), Limits::PROXY, |o| o, false).await;
    let client = tokio::spawn(get_lossy(running.addr));
    // Not ready (the configuration is not read yet): the connection waits, nothing reaches
    // the backend.
    assert!(tokio::time::timeout(Duration::from_millis(300), arrived.recv()).await.is_err(), "served before ready");
    running.ready.send_replace(true);
    tokio::time::timeout(BOUND, arrived.recv()).await.expect("served once ready");
    // Draining: new connections are refused at once, the request in flight goes on.
    running.stop.send_replace(true);
    let refused = tokio::time::timeout(BOUND, async {
        while TcpStream::connect(running.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    });
    refused.await.expect("the listener closes when draining starts");
    assert!(!running.served.is_finished(), "the drain waits for the request in flight");
    answer_tx.send_replace(true);
    assert_eq!(client.await.unwrap(), (200, "late".into()));
    tokio::time::timeout(BOUND, running.served).await.expect("the drain ends with its last request").unwrap();
}

#[tokio::test]
async fn a_connection_accepted_just_before_the_drain_gets_its_first_request_answered() {
    // What a restart with --take-over met: the old agent had accepted a connection whose
    // request it had not read when it began to drain, and closed it unread (a reset).
    let backend = raw_backend("127.0.0.1:0", |mut stream| async move {
        let mut buf = [0u8; 4096];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    })
    .await;
    let running = start(&web(&[backend]), "10.96.0.10:80", Arc::new(TcpConnector), Limits::PROXY, |o| o, true).await;
    let mut stream = TcpStream::connect(running.addr).await.unwrap();
    let open = running.telemetry.metrics.proxy_open.clone();
    tokio::time::timeout(BOUND, async {
        while open.get() != 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the proxy accepts the connection");
    running.stop.send_replace(true);
    let refused = tokio::time::timeout(BOUND, async {
        while TcpStream::connect(running.addr).await.is_ok() {
            tokio::task::yield_now().await;
        }
    });
    refused.await.expect("the listener closes when draining starts");
    // Let the connection's task see the drain before the request arrives.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    stream.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await.unwrap();
    let answer = until_closed(&mut stream).await.to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "answered, not closed unread: {answer:?}");
    assert!(answer.contains("connection: close"), "and told to go elsewhere next: {answer:?}");
    tokio::time::timeout(BOUND, running.served).await.expect("the drain ends with it").unwrap();
    assert_eq!(open.get(), 0, "no connection left open");
}

#[tokio::test]
async fn the_http_version_toward_endpoints_is_the_ports_not_the_clients() {
    // An HTTP/2 client, an HTTP/1.1 backend (appProtocol unsaid): HTTP/1.1 upstream, the
    // request's authority as its Host.
    let echo = echo_headers("127.0.0.1:0").await;
    let (addr, _stop, _) = web_proxy(&web(&[echo]), Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let response = sender.send_request(Request::builder().uri("http://web.ns:80/x").body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(seen.lines().any(|l| l == "host: web.ns:80"), "{seen}");

    // An HTTP/1.1 client, a backend that speaks only HTTP/2 and whose port says so.
    let h2_only = raw_backend("127.0.0.1:0", |stream| async move {
        let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("{:?}", req.version())))))
        });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
    .await;
    let yaml =
        web(&[h2_only]).replacen("ports: [{name: http, port: 80}]", "ports: [{name: http, port: 80, appProtocol: kubernetes.io/h2c}]", 1);
    assert!(yaml.contains("appProtocol"));
    let (addr, _stop, _) = web_proxy(&yaml, Limits::PROXY, DEFAULT_REQUEST_TIMEOUT).await;
    assert_eq!(get(addr, &[]).await, (200, "HTTP/2.0".into()));
}
