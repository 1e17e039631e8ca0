//! mesh-bench: the load generator and server of `cargo xtask bench l4`.
//!
//! ```text
//! mesh-bench serve ADDR              server for every mode below, until killed (crr on
//!                                    ADDR's port + 1)
//! mesh-bench rr ADDR SIZE SECS       one connection, SIZE-byte request/response round trips
//! mesh-bench bulk ADDR CHUNK SECS    one connection, CHUNK-byte writes, server counts
//! mesh-bench crr ADDR SECS           connect + close (abortive), as fast as possible
//! ```
//! Clients print one JSON object.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use serde_json::json;

const RR: u8 = b'R';
const BULK: u8 = b'B';

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    let addr = || -> SocketAddr { arg(1).parse().unwrap_or_else(|_| usage()) };
    let num = |i: usize| -> u64 { arg(i).parse().unwrap_or_else(|_| usage()) };
    match arg(0) {
        "serve" => serve(addr()),
        "rr" => rr(addr(), num(2) as usize, Duration::from_secs_f64(num(3) as f64)),
        "bulk" => bulk(addr(), num(2) as usize, Duration::from_secs(num(3))),
        "crr" => crr(addr(), Duration::from_secs(num(2))),
        _ => usage(),
    }
}

fn usage() -> ! {
    eprintln!("usage: see the header of tests/src/bin/mesh-bench.rs");
    std::process::exit(2)
}

fn serve(addr: SocketAddr) {
    let listener = listen(addr);
    // Connection-rate clients get a listener of their own that only accepts and closes, so
    // the server never falls behind and overflows its accept queue (which would stall
    // clients for a one-second SYN retransmit and measure that instead of the datapath).
    let crr_addr = SocketAddr::new(addr.ip(), addr.port() + 1);
    let crr = listen(crr_addr);
    std::thread::spawn(move || {
        for stream in crr.incoming() {
            drop(stream);
        }
    });
    println!("{}", json!({ "serving": addr.to_string(), "connect_close": crr_addr.to_string() }));
    std::io::stdout().flush().unwrap();
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream = stream;
            let _ = stream.set_nodelay(true);
            let mut mode = [0u8; 1];
            if stream.read_exact(&mut mode).is_err() {
                return;
            }
            match mode[0] {
                RR => echo(stream),
                BULK => sink(stream),
                _ => {}
            }
        });
    }
}

/// A listener with a deep accept queue (std's is 128).
fn listen(addr: SocketAddr) -> TcpListener {
    use std::os::fd::AsRawFd as _;
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    // SAFETY: listen(2) again on a listening socket only resizes its queue.
    unsafe { libc::listen(listener.as_raw_fd(), 4096) };
    listener
}

/// RR: a 4-byte size, then echo messages of that size until EOF.
fn echo(mut stream: TcpStream) {
    let mut size = [0u8; 4];
    if stream.read_exact(&mut size).is_err() {
        return;
    }
    let mut buf = vec![0u8; u32::from_le_bytes(size) as usize];
    while stream.read_exact(&mut buf).is_ok() {
        if stream.write_all(&buf).is_err() {
            return;
        }
    }
}

/// BULK: read to EOF, answer with the byte count.
fn sink(mut stream: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let _ = stream.write_all(&total.to_le_bytes());
}

fn connect(addr: SocketAddr, mode: u8) -> TcpStream {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_nodelay(true).unwrap();
    stream.write_all(&[mode]).unwrap();
    stream
}

fn rr(addr: SocketAddr, size: usize, secs: Duration) {
    let mut stream = connect(addr, RR);
    stream.write_all(&(size as u32).to_le_bytes()).unwrap();
    let out = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut latencies = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        stream.write_all(&out).unwrap();
        stream.read_exact(&mut back).unwrap();
        latencies.push(t.elapsed().as_nanos() as u64);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)] as f64 / 1000.0;
    println!(
        "{}",
        json!({
            "ops": latencies.len(),
            "elapsed_s": elapsed,
            "ops_per_s": latencies.len() as f64 / elapsed,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
            "mean_us": elapsed * 1e6 / latencies.len() as f64
        })
    );
}

fn bulk(addr: SocketAddr, chunk: usize, secs: Duration) {
    let mut stream = connect(addr, BULK);
    let buf = vec![9u8; chunk];
    let start = Instant::now();
    let mut writes = 0u64;
    while start.elapsed() < secs {
        stream.write_all(&buf).unwrap();
        writes += 1;
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut total = [0u8; 8];
    stream.read_exact(&mut total).unwrap();
    let elapsed = start.elapsed().as_secs_f64();
    println!("{}", json!({ "ops": writes, "elapsed_s": elapsed, "bytes_per_s": u64::from_le_bytes(total) as f64 / elapsed }));
}

fn crr(addr: SocketAddr, secs: Duration) {
    // The server's connect+close listener is on the next port.
    let addr = SocketAddr::new(addr.ip(), addr.port() + 1);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr} after {n}: {e}"));
        abortive_close(stream);
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("{}", json!({ "ops": n, "elapsed_s": elapsed, "ops_per_s": n as f64 / elapsed }));
}

/// Close with SO_LINGER 0 (a RST, no TIME_WAIT): tens of thousands of TIME_WAIT sockets from
/// earlier trials would otherwise make the ephemeral port search, not mesh, the bottleneck.
fn abortive_close(stream: TcpStream) {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket and option buffer.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
