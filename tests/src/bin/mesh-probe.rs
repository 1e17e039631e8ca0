//! mesh-probe: the client and backend used by the integration tests and the demo.
//!
//! ```text
//! mesh-probe serve NAME ADDR...        TCP and UDP backends answering with NAME (HTTP too)
//! mesh-probe tcp ADDR COUNT [FROM]     COUNT connections (from FROM); JSON tally of backend names/errors
//! mesh-probe http ADDR COUNT           the same with HTTP GET requests
//! mesh-probe get ADDR PATH COUNT [H:V,..] GET PATH (with headers); tally bodies/statuses
//! mesh-probe udp ADDR COUNT            COUNT datagrams from one unconnected socket; checks
//!                                      every reply comes from ADDR
//! mesh-probe udp-connected ADDR COUNT  connected UDP socket; checks getpeername() == ADDR
//! mesh-probe peer ADDR                 connect; print getpeername() and the backend's name
//! mesh-probe hold ADDR [FROM]          connect (from the local address FROM), print the backend's name, then echo stdin
//!                                      lines through the connection until stdin closes
//! mesh-probe loop ADDR STOPFILE        connect repeatedly until STOPFILE exists
//! mesh-probe serve-h2 NAME ADDR        HTTP/2 (h2c) server: body "NAME HTTP/2.0 <grpc-timeout|->"
//! mesh-probe get-h2 ADDR PATH COUNT [H:V,..]  the same as get, over HTTP/2 prior knowledge
//! mesh-probe hold-many ADDR N STOPFILE  N connections at once, a keep-alive GET on each;
//!                                      prints a line, holds them until STOPFILE exists
//! mesh-probe http-loop ADDR STOPFILE   HTTP GETs, a connection each, until STOPFILE exists;
//!                                      prints the answers and errors
//! mesh-probe hold-idle ADDR N STOPFILE  N connections that send nothing; prints a line, then
//!                                      holds them until STOPFILE exists
//! mesh-probe raw ADDR KIND             send a raw request (garbage, huge-header, quit) and
//!                                      print the status line that comes back
//! mesh-probe upgrade ADDR             GET with Upgrade, then a line through the upgraded stream
//! mesh-probe echo-serve ADDR           per connection: read to EOF, send it all back, close
//! mesh-probe echo-check ADDR SIZE...   per SIZE: send SIZE random bytes (SIZE:TEXT: TEXT
//!                                      repeated), half-close, check the echo is identical
//! mesh-probe abort-serve ADDR N        per connection: read N bytes, then close (unread
//!                                      data makes that a reset)
//! mesh-probe send-until-error ADDR N   send up to N bytes; report how it ended
//! ```
//! Every client command prints one JSON object on stdout.
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    time::Duration,
};

use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(3);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| -> &str { args.get(i).map(String::as_str).unwrap_or_else(|| usage()) };
    let addr = || -> SocketAddr { arg(1).parse().unwrap_or_else(|_| usage()) };
    let count = || -> usize { arg(2).parse().unwrap_or_else(|_| usage()) };
    match arg(0) {
        "serve" => serve(arg(1), &args[2..]),
        "tcp" => match args.get(3).map(|from| from.parse().unwrap_or_else(|_| usage())) {
            Some(from) => tally(count(), |_| tcp_name_from(addr(), from)),
            None => tally(count(), |_| tcp_name(addr())),
        },
        "http" => tally(count(), |_| http_get(addr(), "/", &[])),
        "get" => {
            let n: usize = arg(3).parse().unwrap_or_else(|_| usage());
            let headers: Vec<(&str, &str)> =
                args.get(4).map(|h| h.split(',').filter_map(|kv| kv.split_once(':')).collect()).unwrap_or_default();
            tally(n, |_| http_get(addr(), arg(2), &headers))
        }
        "udp" => udp(addr(), count()),
        "udp-connected" => udp_connected(addr(), count()),
        "peer" => peer(addr()),
        "hold" => hold(addr(), args.get(2).map(|from| from.parse().unwrap_or_else(|_| usage()))),
        "loop" => connect_loop(addr(), Path::new(arg(2))),
        "http-loop" => http_loop(addr(), Path::new(arg(2))),
        "serve-h2" => h2::serve(arg(1), arg(2).parse().unwrap_or_else(|_| usage())),
        "get-h2" => {
            let n: usize = arg(3).parse().unwrap_or_else(|_| usage());
            let headers: Vec<(String, String)> = args
                .get(4)
                .map(|h| h.split(',').filter_map(|kv| kv.split_once(':')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
                .unwrap_or_default();
            h2::get(addr(), arg(2), n, &headers)
        }
        "upgrade" => upgrade(addr()),
        "raw" => raw(addr(), arg(2)),
        "hold-many" => hold_many(addr(), count(), Path::new(arg(3))),
        "hold-idle" => hold_idle(addr(), count(), Path::new(arg(3))),
        "echo-serve" => echo_serve(addr()),
        "echo-check" => echo_check(addr(), &args[2..]),
        "abort-serve" => abort_serve(addr(), count()),
        "send-until-error" => send_until_error(addr(), count()),
        "wait-connect" => wait_connect(addr(), count()),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: see the header of tests/src/bin/mesh-probe.rs");
    std::process::exit(2)
}

fn error_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::ETIMEDOUT) | Some(libc::EAGAIN) => "ETIMEDOUT".into(),
        Some(libc::EPIPE) => "EPIPE".into(),
        Some(libc::ECONNRESET) => "ECONNRESET".into(),
        _ => format!("{:?}", e.kind()),
    }
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

/// One connection: send a line, read the backend's `NAME:line` answer.
fn tcp_name(addr: SocketAddr) -> std::io::Result<String> {
    name_over(connect(addr)?)
}

/// `tcp_name` from the local address `from` (its port 0: any).
fn tcp_name_from(addr: SocketAddr, from: SocketAddr) -> std::io::Result<String> {
    name_over(connect_from(addr, from)?)
}

fn name_over(mut stream: TcpStream) -> std::io::Result<String> {
    stream.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line.trim().split(':').next().unwrap_or_default().to_owned())
}

/// One HTTP/1.1 GET: the body (a backend's name) on 200, else "HTTP <status>".
fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> std::io::Result<String> {
    let mut stream = connect(addr)?;
    let extra: String = headers.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response.split(' ').nth(1).unwrap_or_default().to_owned();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    Ok(if status == "200" { body.trim().to_owned() } else { format!("HTTP {status}") })
}

fn tally(count: usize, mut one: impl FnMut(usize) -> std::io::Result<String>) {
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..count {
        match one(i) {
            Ok(name) => *names.entry(name).or_default() += 1,
            Err(e) => *errors.entry(error_name(&e)).or_default() += 1,
        }
    }
    println!("{}", json!({ "names": names, "errors": errors }));
}

fn udp(addr: SocketAddr, count: usize) {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut sources: BTreeMap<String, usize> = BTreeMap::new();
    let mut buf = [0u8; 512];
    for _ in 0..count {
        let reply = socket.send_to(b"hello", addr).and_then(|_| socket.recv_from(&mut buf));
        match reply {
            Ok((n, from)) => {
                *sources.entry(from.to_string()).or_default() += 1;
                let text = String::from_utf8_lossy(&buf[..n]);
                *names.entry(text.split(':').next().unwrap_or_default().to_owned()).or_default() += 1;
            }
            Err(e) => *errors.entry(error_name(&e)).or_default() += 1,
        }
    }
    println!("{}", json!({ "names": names, "errors": errors, "sources": sources }));
}

fn udp_connected(addr: SocketAddr, count: usize) {
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let socket = UdpSocket::bind(bind).expect("bind");
    socket.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    let result = socket.connect(addr).and_then(|()| {
        let peer = socket.peer_addr()?;
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut buf = [0u8; 512];
        for _ in 0..count {
            socket.send(b"hello")?;
            let n = socket.recv(&mut buf)?;
            let text = String::from_utf8_lossy(&buf[..n]);
            *names.entry(text.split(':').next().unwrap_or_default().to_owned()).or_default() += 1;
        }
        Ok((peer, names))
    });
    match result {
        Ok((peer, names)) => println!("{}", json!({ "peer": peer.to_string(), "names": names })),
        Err(e) => println!("{}", json!({ "error": error_name(&e) })),
    }
}

fn peer(addr: SocketAddr) {
    let result = connect(addr).and_then(|mut stream| {
        let peer = stream.peer_addr()?;
        stream.write_all(b"hello\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        Ok((peer, line.trim().split(':').next().unwrap_or_default().to_owned()))
    });
    match result {
        Ok((peer, name)) => println!("{}", json!({ "peer": peer.to_string(), "name": name })),
        Err(e) => println!("{}", json!({ "error": error_name(&e) })),
    }
}

/// Holds one connection open and relays stdin lines through it, printing each answer.
/// Like `connect`, from the local address `from` (a pod's own address, as its sockets have in
/// a pod's network namespace).
fn connect_from(addr: SocketAddr, from: SocketAddr) -> std::io::Result<TcpStream> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let stream = runtime.block_on(async {
        let socket = if from.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.bind(from)?;
        tokio::time::timeout(TIMEOUT, socket.connect(addr)).await.map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    })?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

fn hold(addr: SocketAddr, from: Option<SocketAddr>) {
    let stream = match from.map_or_else(|| connect(addr), |from| connect_from(addr, from)) {
        Ok(s) => s,
        Err(e) => {
            println!("{}", json!({ "error": error_name(&e) }));
            return;
        }
    };
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let mut answer = String::new();
        let ok = writer.write_all(format!("{line}\n").as_bytes()).and_then(|()| reader.read_line(&mut answer));
        match ok {
            Ok(n) if n > 0 => println!("{}", json!({ "answer": answer.trim() })),
            Ok(_) => println!("{}", json!({ "error": "EOF" })),
            Err(e) => println!("{}", json!({ "error": error_name(&e) })),
        }
        std::io::stdout().flush().expect("stdout");
    }
}

fn connect_loop(addr: SocketAddr, stop: &Path) {
    let (mut ok, mut errors) = (0usize, BTreeMap::<String, usize>::new());
    while !stop.exists() {
        match tcp_name(addr) {
            Ok(name) if !name.is_empty() => ok += 1,
            Ok(_) => *errors.entry("empty answer".into()).or_default() += 1,
            Err(e) => *errors.entry(error_name(&e)).or_default() += 1,
        }
    }
    println!("{}", json!({ "ok": ok, "errors": errors }));
}

fn http_loop(addr: SocketAddr, stop: &Path) {
    let (mut names, mut errors) = (BTreeMap::<String, usize>::new(), BTreeMap::<String, usize>::new());
    while !stop.exists() {
        match http_get(addr, "/", &[]) {
            Ok(name) => *names.entry(name).or_default() += 1,
            Err(e) => *errors.entry(error_name(&e)).or_default() += 1,
        }
    }
    println!("{}", json!({ "names": names, "errors": errors }));
}

/// TCP and UDP backends named NAME on every ADDR, until killed. TCP answers each line with
/// `NAME:line`, or an HTTP request with the body `NAME`; UDP answers `NAME:payload`.
fn serve(name: &str, addrs: &[String]) {
    let mut threads = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().unwrap_or_else(|_| usage());
        let tcp = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
        let tcp_name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            for stream in tcp.incoming().flatten() {
                let name = tcp_name.clone();
                std::thread::spawn(move || answer_tcp(&name, stream));
            }
        }));
        let udp_name = name.to_owned();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = udp.recv_from(&mut buf) {
                let reply = format!("{udp_name}:{}", String::from_utf8_lossy(&buf[..n]));
                let _ = udp.send_to(reply.as_bytes(), from);
            }
        }));
    }
    println!("{}", json!({ "serving": name }));
    std::io::stdout().flush().expect("stdout");
    for t in threads {
        let _ = t.join();
    }
}

fn answer_tcp(name: &str, stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut writer = stream;
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if line.starts_with("GET ") {
            // Read the headers, answer once, close. With x-probe-echo, the body also shows
            // the path and the x-mesh header the backend received.
            let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
            let (mut echo, mut echo_trace, mut x_mesh, mut trace) = (false, false, "-".to_owned(), "-".to_owned());
            let mut upgrade = false;
            let mut header = String::new();
            while reader.read_line(&mut header).unwrap_or(0) > 0 && header.trim() != "" {
                let lower = header.trim().to_ascii_lowercase();
                echo |= lower.starts_with("x-probe-echo:");
                upgrade |= lower.starts_with("upgrade:");
                echo_trace |= lower.starts_with("x-probe-echo: trace");
                if let Some(v) = lower.strip_prefix("x-mesh:") {
                    x_mesh = v.trim().to_owned();
                }
                if let Some(v) = lower.strip_prefix("traceparent:") {
                    trace = v.trim().to_owned();
                }
                header.clear();
            }
            let body = if echo {
                let trace = if echo_trace { format!(" {trace}") } else { String::new() };
                format!("{name} {path} {x_mesh}{trace}\n")
            } else {
                format!("{name}\n")
            };
            if upgrade {
                // Switch protocols, then answer lines like the plain TCP backend.
                let _ = write!(writer, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: probe\r\n\r\n");
                line.clear();
                continue;
            }
            // A backend named slowNN waits NN ms before answering.
            if let Some(ms) = name.strip_prefix("slow").and_then(|m| m.parse::<u64>().ok()) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            // A backend named statusNNN answers every request with that status.
            let status = name.strip_prefix("status").and_then(|c| c.parse::<u16>().ok()).unwrap_or(200);
            let _ = write!(writer, "HTTP/1.1 {status} Status\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            return;
        }
        if writer.write_all(format!("{name}:{}\n", line.trim()).as_bytes()).is_err() {
            return;
        }
        line.clear();
    }
    // A backend named lingerNN keeps the connection NN ms after the client's FIN: the FIN is
    // then acknowledged alone, before this side's own FIN.
    if let Some(ms) = name.strip_prefix("linger").and_then(|m| m.parse::<u64>().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so both ends can know the payload.
fn payload(size: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..size)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn echo_serve(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    println!("{}", json!({ "serving": addr.to_string() }));
    std::io::stdout().flush().expect("stdout");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let mut all = Vec::new();
            if stream.read_to_end(&mut all).is_ok() {
                let _ = stream.write_all(&all);
            }
        });
    }
}

/// For each size: a fresh connection, the payload sent from one thread while another reads
/// the echo (both directions in flight at once), a half-close after the last byte.
fn echo_check(addr: SocketAddr, sizes: &[String]) {
    let mut results = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        // SIZE, or SIZE:TEXT for TEXT repeated (a marker to look for on the wire).
        let (size, text) = size.split_once(':').map_or((size.as_str(), None), |(n, t)| (n, Some(t)));
        let size: usize = size.parse().unwrap_or_else(|_| usage());
        let sent = match text {
            Some(text) => text.bytes().cycle().take(size).collect(),
            None => payload(size, 0x5eed + i as u64),
        };
        let outcome = connect(addr).and_then(|stream| {
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut writer = stream.try_clone()?;
            let to_send = sent.clone();
            let sender = std::thread::spawn(move || -> std::io::Result<()> {
                writer.write_all(&to_send)?;
                writer.shutdown(std::net::Shutdown::Write)
            });
            let mut echoed = Vec::with_capacity(size);
            let mut reader = stream;
            reader.read_to_end(&mut echoed)?;
            sender.join().expect("sender thread")?;
            Ok(echoed)
        });
        results.push(match outcome {
            Ok(echoed) if echoed == sent => json!({ "size": size, "ok": true }),
            Ok(echoed) => {
                let first_diff = echoed.iter().zip(&sent).position(|(a, b)| a != b);
                json!({ "size": size, "ok": false, "echoed": echoed.len(), "first_difference": first_diff })
            }
            Err(e) => json!({ "size": size, "ok": false, "error": error_name(&e) }),
        });
    }
    println!("{}", json!({ "results": results }));
}

fn abort_serve(addr: SocketAddr, read_first: usize) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    println!("{}", json!({ "serving": addr.to_string() }));
    std::io::stdout().flush().expect("stdout");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut buf = vec![0u8; read_first];
            let mut stream = stream;
            let _ = stream.read_exact(&mut buf);
            // Dropping with unread data in the queue sends a reset.
        });
    }
}

fn send_until_error(addr: SocketAddr, total: usize) {
    let result = connect(addr).and_then(|mut stream| {
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let chunk = payload(64 * 1024, 7);
        let mut sent = 0usize;
        while sent < total {
            match stream.write(&chunk) {
                Ok(n) => sent += n,
                Err(e) => return Ok((sent, Some(e))),
            }
        }
        Ok((sent, None))
    });
    match result {
        Ok((sent, None)) => println!("{}", json!({ "sent": sent, "error": null })),
        Ok((sent, Some(e))) => println!("{}", json!({ "sent": sent, "error": error_name(&e) })),
        Err(e) => println!("{}", json!({ "sent": 0, "error": error_name(&e) })),
    }
}

/// HTTP/2 with prior knowledge (h2c), as gRPC speaks it, on a small tokio runtime.
mod h2 {
    use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr};

    use http_body_util::{BodyExt as _, Empty, Full};
    use hyper::{Request, Response, body::Bytes, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::json;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    pub fn serve(name: &str, addr: SocketAddr) {
        let name = name.to_owned();
        runtime().block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            println!("{}", json!({ "serving": addr.to_string() }));
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let name = name.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let grpc = req.headers().get("grpc-timeout").and_then(|v| v.to_str().ok()).unwrap_or("-").to_owned();
                        let body = format!("{name} {:?} {grpc}", req.version());
                        async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }

    pub fn get(addr: SocketAddr, path: &str, count: usize, headers: &[(String, String)]) {
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let mut errors: BTreeMap<String, usize> = BTreeMap::new();
        runtime().block_on(async {
            for _ in 0..count {
                let result = async {
                    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::spawn(conn);
                    let mut request = Request::builder().uri(format!("http://{addr}{path}"));
                    for (k, v) in headers {
                        request = request.header(k.as_str(), v.as_str());
                    }
                    let response = sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()).await.map_err(|e| e.to_string())?;
                    let status = response.status().as_u16();
                    let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                    Ok::<_, String>(if status == 200 { String::from_utf8_lossy(&body).trim().to_owned() } else { format!("HTTP {status}") })
                }
                .await;
                match result {
                    Ok(name) => *names.entry(name).or_default() += 1,
                    Err(e) => *errors.entry(e).or_default() += 1,
                }
            }
        });
        println!("{}", json!({ "names": names, "errors": errors }));
    }
}

fn upgrade(addr: SocketAddr) {
    let result = connect(addr).and_then(|mut stream| {
        write!(stream, "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: probe\r\n\r\n")?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        let mut header = String::new();
        while reader.read_line(&mut header)? > 0 && header.trim() != "" {
            header.clear();
        }
        stream.write_all(b"through\n")?;
        let mut answer = String::new();
        reader.read_line(&mut answer)?;
        Ok((status.trim().to_owned(), answer.trim().to_owned()))
    });
    match result {
        Ok((status, answer)) => println!("{}", json!({ "status": status, "answer": answer })),
        Err(e) => println!("{}", json!({ "error": error_name(&e) })),
    }
}

/// `n` connections to `addr`, and how many could not be made.
fn connect_many(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut streams = Vec::with_capacity(n);
    let mut connect_errors = 0;
    for _ in 0..n {
        match connect(addr) {
            Ok(s) => streams.push(s),
            Err(_) => connect_errors += 1,
        }
    }
    (streams, connect_errors)
}

/// Holds on until `stop` exists.
fn until_exists(stop: &Path) {
    std::io::stdout().flush().expect("stdout");
    while !stop.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hold_many(addr: SocketAddr, n: usize, stop: &Path) {
    let (mut streams, connect_errors) = connect_many(addr, n);
    let mut ok = 0;
    for stream in &mut streams {
        let answered = (|| -> std::io::Result<bool> {
            write!(stream, "GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n")?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut status = String::new();
            reader.read_line(&mut status)?;
            Ok(status.contains(" 200 "))
        })();
        if answered.unwrap_or(false) {
            ok += 1;
        }
    }
    println!("{}", json!({ "held": streams.len(), "ok": ok, "connect_errors": connect_errors }));
    until_exists(stop);
}

fn hold_idle(addr: SocketAddr, n: usize, stop: &Path) {
    let (streams, connect_errors) = connect_many(addr, n);
    println!("{}", json!({ "held": streams.len(), "connect_errors": connect_errors }));
    until_exists(stop);
}

fn raw(addr: SocketAddr, kind: &str) {
    let request = match kind {
        "garbage" => "THIS IS NOT HTTP\r\n\r\n".to_owned(),
        "huge-header" => format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20)),
        "quit" => "POST /quitquitquit HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_owned(),
        _ => usage(),
    };
    let result = connect(addr).and_then(|mut stream| {
        // The server may answer and close before it has read everything: ignore write errors.
        let _ = stream.write_all(request.as_bytes());
        let mut status = String::new();
        BufReader::new(stream).read_line(&mut status)?;
        Ok(status.trim().to_owned())
    });
    match result {
        Ok(status) => println!("{}", json!({ "status": status })),
        Err(e) => println!("{}", json!({ "error": error_name(&e) })),
    }
}

/// Connects to `addr` every 100 us until it works (for at most `timeout_ms`), then prints when,
/// in wall-clock nanoseconds, so another process can time a change it made.
fn wait_connect(addr: SocketAddr, timeout_ms: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(timeout_ms as u64);
    loop {
        if std::net::TcpStream::connect(addr).is_ok() {
            let at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_nanos() as u64;
            println!("{}", json!({ "connected_at_ns": at }));
            return;
        }
        if std::time::Instant::now() >= deadline {
            println!("{}", json!({ "error": "timeout" }));
            return;
        }
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
}
