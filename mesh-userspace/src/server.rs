//! Accepting connections, for every listener of the agent (the outbound proxy, readiness,
//! metrics, admin): the limits a server facing slow, idle or hostile clients needs, in one
//! place.
//!
//! - `accept` never spins: when the process runs out of file descriptors (or the kernel of
//!   memory), it logs once per stretch, backs off (5 ms doubling to 1 s) and tries again;
//!   errors that concern one connection only are skipped.
//! - `Slots` caps open connections per listener; a connection over the cap is closed at once.
//! - `Activity` closes a connection with no request in flight for `Limits::idle_timeout`
//!   (both HTTP versions), as Envoy's idle timeout does: bytes that are no request (HTTP/2
//!   PINGs, a HEADERS frame trickled forever) do not keep it open. hyper's header read
//!   timeout bounds a client that trickles an HTTP/1.1 request head (hyper also starts it
//!   while a keep-alive connection waits for its next request).
#![forbid(unsafe_code)]
use std::{
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use hyper_util::{
    rt::{TokioExecutor, TokioTimer},
    server::conn::auto,
};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use tokio::{
    net::{TcpListener, TcpStream},
    // The runtime's clock, so that tests can run it paused.
    time::Instant,
};

/// When a listener starts and stops serving.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// Accept only once this is true.
    pub ready: tokio::sync::watch::Receiver<bool>,
    /// Stop accepting and drain once this is true.
    pub drain: tokio::sync::watch::Receiver<bool>,
    /// How long open connections may take to finish once draining.
    pub drain_timeout: Duration,
}

/// What one listener allows each client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most; more are closed as they arrive.
    pub max_connections: usize,
    /// A request head (HTTP/1.1) must arrive whole within this, counted from when the
    /// connection starts waiting for it.
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    /// Request line and headers (HTTP/1.1), or the header list (HTTP/2), at most: 431 above.
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_streams: u32,
}

impl Limits {
    /// The outbound proxy: Envoy's header size limit (60 KiB), hyper's header timeout (30 s).
    pub const PROXY: Limits = Limits {
        max_connections: 16_384,
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(300),
        max_header_bytes: 60 * 1024,
        max_streams: 100,
    };

    /// Readiness, metrics and admin: few clients, small requests.
    pub const ADMIN: Limits = Limits {
        max_connections: 128,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_header_bytes: 16 * 1024,
        max_streams: 16,
    };

    /// An HTTP/1.1-or-HTTP/2 server with these limits.
    pub fn http(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            // A head that does not fit hyper's read buffer is answered 431.
            .max_buf_size(self.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(self.max_header_bytes as u32)
            .max_concurrent_streams(self.max_streams);
        builder
    }
}

/// How long `accept` waits after running out of a resource, growing while it lasts.
const BACKOFF_FIRST: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts the next connection. Errors of one connection (it was reset before being
/// accepted) are skipped; running out of file descriptors or memory is logged (once until
/// accepting works again) and waited out with a growing pause, never retried in a loop.
pub async fn accept(listener: &TcpListener, name: &'static str) -> (TcpStream, SocketAddr) {
    let mut backoff = BACKOFF_FIRST;
    let mut exhausted_since: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok(accepted) => {
                if let Some(since) = exhausted_since {
                    tracing::info!(listener = name, after_ms = since.elapsed().as_millis() as u64, "accepting connections again");
                }
                return accepted;
            }
            Err(e) if is_resource_exhaustion(&e) => {
                if exhausted_since.is_none() {
                    tracing::warn!(
                        listener = name,
                        error = %e,
                        "cannot accept connections: out of file descriptors or memory; waiting for some to close"
                    );
                    exhausted_since = Some(Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            Err(e) => tracing::debug!(listener = name, error = %e, "accept failed for one connection"),
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Open connections of one listener, up to a cap.
#[derive(Debug, Clone)]
pub struct Slots {
    /// Connections open now (a metric's gauge).
    open: Gauge,
    max: usize,
    /// Connections closed at once because the listener was full (a metric's counter).
    refused: Counter,
}

/// One open connection; frees its slot when dropped.
#[derive(Debug)]
pub struct Slot(Gauge);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Slots {
    /// At most `max` open connections, counted in `open`; each one refused counts in
    /// `refused`.
    pub fn new(max: usize, open: Gauge, refused: Counter) -> Self {
        Self { open, max, refused }
    }

    /// A slot, or None when `max` connections are open (the caller closes the connection).
    pub fn take(&self) -> Option<Slot> {
        let max = self.max as i64;
        let taken = self.open.inner().try_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).is_ok();
        if taken {
            Some(Slot(self.open.clone()))
        } else {
            self.refused.inc();
            None
        }
    }

    pub fn open(&self) -> usize {
        self.open.get().max(0) as usize
    }

    /// Resolves once no connection is open (looked at every 20 ms: only used while draining).
    pub async fn wait_empty(&self) {
        while self.open() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Connections closed at once because the listener was full.
    pub fn refused(&self) -> u64 {
        self.refused.get()
    }
}

/// A connection's activity: when its last request ended, and how many are in flight.
#[derive(Debug, Clone)]
pub struct Activity(Arc<ActivityInner>);

#[derive(Debug)]
struct ActivityInner {
    born: Instant,
    /// Milliseconds since `born` when the last request ended.
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Whether a request has started on this connection; `first_request` waits on `started`.
    has_started: AtomicBool,
    started: tokio::sync::Notify,
}

/// One request being served; the connection is not idle while it lives.
#[derive(Debug)]
pub struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(ActivityInner {
            born: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            has_started: AtomicBool::new(false),
            started: tokio::sync::Notify::new(),
        }))
    }
}

impl Activity {
    /// A connection just accepted: idle from now until its first request.
    pub fn new() -> Self {
        Self::default()
    }

    fn touch(&self) {
        self.0.last_ms.store(self.0.born.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Marks a request in flight until the returned guard drops.
    pub fn busy(&self) -> Busy {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.0.has_started.load(Ordering::Relaxed) && !self.0.has_started.swap(true, Ordering::AcqRel) {
            // Stores a permit if nobody waits yet: `first_request` cannot miss it.
            self.0.started.notify_one();
        }
        Busy(self.clone())
    }

    /// Resolves once the connection's first request has started (at once if it has).
    pub async fn first_request(&self) {
        if !self.0.has_started.load(Ordering::Acquire) {
            self.0.started.notified().await;
        }
    }

    /// Resolves once the connection has been idle (no request in flight) for `idle`. Wakes
    /// only when the earliest possible deadline passes, not on a tick.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.0.born + Duration::from_millis(self.0.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline && self.0.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            // Busy past the deadline: look again after another full period.
            let next = if Instant::now() >= deadline { Instant::now() + idle } else { deadline };
            tokio::time::sleep_until(next).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_refuse_over_the_cap_and_come_back_when_freed() {
        let slots = Slots::new(2, Gauge::default(), Counter::default());
        let a = slots.take().unwrap();
        let _b = slots.take().unwrap();
        assert!(slots.take().is_none());
        assert_eq!(slots.refused(), 1);
        drop(a);
        assert!(slots.take().is_some(), "a freed slot is taken again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_requests_in_flight() {
        let activity = Activity::new();
        let busy = activity.busy();
        let idle = tokio::spawn({
            let activity = activity.clone();
            async move { activity.idle_for(Duration::from_secs(10)).await }
        });
        // Paused clock: the runtime jumps from timer to timer. A minute with a request in
        // flight is not idle.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!idle.is_finished());
        drop(busy);
        tokio::time::timeout(Duration::from_secs(30), idle).await.expect("idle once the request ended").unwrap();
    }
}
