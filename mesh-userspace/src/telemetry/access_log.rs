//! The proxy's access log: one JSON line per request, written by a thread of its own from a
//! bounded queue. A request never waits for the log: when the queue is full (a slow disk, a
//! stalled stdout reader) the line is dropped and counted in `mesh_access_log_dropped_total`.
#![forbid(unsafe_code)]
use std::{
    io::Write,
    net::SocketAddr,
    path::PathBuf,
    sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    time::SystemTime,
};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines waiting for the writer at most.
const QUEUE: usize = 8192;

/// Where a log of JSON lines goes (`--access-log`, `--flow-log`): `off`, `-` (stdout) or a
/// file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Target {
    #[default]
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "" | "off" => Target::Off,
            "-" | "stdout" => Target::Stdout,
            path => Target::File(path.into()),
        })
    }
}

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When the request arrived, RFC 3339 in UTC.
    pub start_time: String,
    pub source_address: SocketAddr,
    /// `namespace/name` of the client's workload, when its address is an endpoint's.
    pub source_workload: Option<String>,
    pub destination_service: Option<String>,
    pub destination_workload: Option<String>,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub response_code: u16,
    pub response_flags: String,
    pub attempts: u32,
    pub upstream_host: Option<SocketAddr>,
    pub duration_ms: f64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub trace_id: Option<String>,
}

pub struct AccessLog {
    queue: Option<SyncSender<String>>,
    dropped: Counter,
}

impl AccessLog {
    pub fn off() -> Self {
        Self { queue: None, dropped: Counter::default() }
    }

    /// Opens `target` (a file is appended to) and starts the writer thread. `dropped` counts
    /// the lines the queue had no room for.
    pub fn open(target: &Target, dropped: Counter) -> std::io::Result<Self> {
        let writer: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self { queue: None, dropped }),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new().name("mesh-access-log".into()).spawn(move || write_lines(rx, writer))?;
        Ok(Self { queue: Some(tx), dropped })
    }

    pub fn enabled(&self) -> bool {
        self.queue.is_some()
    }

    /// Queues `entry`; never blocks.
    pub fn log(&self, entry: &Entry) {
        let Some(queue) = &self.queue else { return };
        let Ok(mut line) = serde_json::to_string(entry) else { return };
        line.push('\n');
        match queue.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// Writes lines as they come, flushing whenever the queue runs empty (a burst is one write
/// per buffer, a lone request is on disk at once).
fn write_lines(rx: Receiver<String>, writer: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, writer);
    while let Ok(line) = rx.recv() {
        let mut failed = out.write_all(line.as_bytes()).is_err();
        while let Ok(more) = rx.try_recv() {
            failed |= out.write_all(more.as_bytes()).is_err();
        }
        failed |= out.flush().is_err();
        if failed {
            tracing::warn!("writing the access log failed; lines are lost until it works again");
        }
    }
}

/// RFC 3339 with milliseconds, UTC, from the system clock.
pub fn rfc3339(at: SystemTime) -> String {
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let (secs, millis) = (since.as_secs(), since.subsec_millis());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        // 1795000000 s is 2026-11-18T11:06:40Z.
        assert_eq!(rfc3339(t), "2026-11-18T11:06:40.123Z");
        let leap = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // A writer that never finishes its first write holds the queue full.
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                std::thread::park();
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::spawn(move || write_lines(rx, Box::new(Stuck)));
        let log = AccessLog { queue: Some(tx), dropped: Counter::default() };
        let entry = Entry {
            start_time: rfc3339(SystemTime::now()),
            source_address: "10.0.0.1:1234".parse().unwrap(),
            source_workload: None,
            destination_service: None,
            destination_workload: None,
            method: "GET".into(),
            authority: "web".into(),
            path: "/".into(),
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-".into(),
            attempts: 1,
            upstream_host: None,
            duration_ms: 1.0,
            bytes_received: 0,
            bytes_sent: 0,
            trace_id: None,
        };
        for _ in 0..2 * QUEUE {
            log.log(&entry);
        }
        // The writer buffered a few hundred lines and is stuck writing them; the queue holds
        // QUEUE more; the rest were dropped, and logging returned every time.
        assert!(log.dropped.get() >= QUEUE as u64 / 2, "{}", log.dropped.get());
    }
}
