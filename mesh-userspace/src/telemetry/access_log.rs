//! The proxy's access log: one JSON line per request, written by a thread of its own from a
//! bounded batch. A request never waits for the log: when the batch is full (a slow disk, a
//! stalled stdout reader) the line is dropped and counted in `mesh_access_log_dropped_total`.
#![forbid(unsafe_code)]
use std::{io::Write, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration, time::SystemTime};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::batch::Batch;

/// Bytes of lines waiting for the writer at most (some 10,000 lines).
const QUEUE_BYTES: usize = 4 << 20;
/// The writer is woken early once this much is waiting.
const WRITE_AT: usize = 64 << 10;
/// A line is on disk at most this long after its request ended (Envoy flushes its access
/// logs every second by default).
const LINGER: Duration = Duration::from_millis(100);

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

/// One request, as logged (borrowed: building a line allocates nothing of its own).
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When the request arrived, RFC 3339 in UTC.
    pub start_time: Rfc3339,
    pub source_address: SocketAddr,
    /// `namespace/name` of the client's workload, when its address is an endpoint's.
    pub source_workload: Option<Shown<'a>>,
    pub destination_service: Option<Shown<'a>>,
    pub destination_workload: Option<Shown<'a>>,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub protocol: &'static str,
    pub response_code: u16,
    pub response_flags: &'a str,
    pub attempts: u32,
    pub upstream_host: Option<SocketAddr>,
    pub duration_ms: f64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub trace_id: Option<Shown<'a>>,
}

/// A value logged as its `Display` text, written straight into the line.
#[derive(Clone, Copy)]
pub struct Shown<'a>(pub &'a (dyn std::fmt::Display + Sync));

impl std::fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0.to_string())
    }
}

impl Serialize for Shown<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self.0)
    }
}

/// A time logged as RFC 3339 with milliseconds, UTC.
#[derive(Debug, Clone, Copy)]
pub struct Rfc3339(pub SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = self.0.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let (secs, millis) = (since.as_secs(), since.subsec_millis());
        let (days, rem) = (secs / 86_400, secs % 86_400);
        let (y, m, d) = civil_from_days(days as i64);
        write!(f, "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
    }
}

impl Serialize for Rfc3339 {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

pub struct AccessLog {
    /// Lines, serialized straight into the batch the writer takes.
    lines: Option<Arc<Batch<u8>>>,
    dropped: Counter,
}

impl AccessLog {
    pub fn off() -> Self {
        Self { lines: None, dropped: Counter::default() }
    }

    /// Opens `target` (a file is appended to) and starts the writer thread. `dropped` counts
    /// the lines the batch had no room for.
    pub fn open(target: &Target, dropped: Counter) -> std::io::Result<Self> {
        let writer: Box<dyn Write + Send> = match target {
            Target::Off => return Ok(Self { lines: None, dropped }),
            Target::Stdout => Box::new(std::io::stdout()),
            Target::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        Self::writing_to(writer, dropped)
    }

    fn writing_to(writer: Box<dyn Write + Send>, dropped: Counter) -> std::io::Result<Self> {
        let lines = Arc::new(Batch::new(WRITE_AT, QUEUE_BYTES, LINGER));
        let taken = lines.clone();
        std::thread::Builder::new().name("mesh-access-log".into()).spawn(move || write_lines(&taken, writer))?;
        Ok(Self { lines: Some(lines), dropped })
    }

    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Queues `entry`; never blocks.
    pub fn log(&self, entry: &Entry) {
        let Some(lines) = &self.lines else { return };
        let queued = lines.push_with(|buf| {
            let start = buf.len();
            if serde_json::to_writer(&mut *buf, entry).is_ok() {
                buf.push(b'\n');
            } else {
                buf.truncate(start);
            }
        });
        if !queued {
            self.dropped.inc();
        }
    }
}

impl Drop for AccessLog {
    /// The writer writes what is queued, then ends.
    fn drop(&mut self) {
        if let Some(lines) = &self.lines {
            lines.close();
        }
    }
}

/// Writes the lines a batch at a time (one write per batch), until the log is dropped.
fn write_lines(lines: &Batch<u8>, mut out: Box<dyn Write + Send>) {
    let mut taken = Vec::new();
    while lines.take(&mut taken) {
        if out.write_all(&taken).and_then(|()| out.flush()).is_err() {
            tracing::warn!("writing the access log failed; lines are lost until it works again");
        }
    }
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
        let rfc3339 = |t| Rfc3339(t).to_string();
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
        let log = AccessLog::writing_to(Box::new(Stuck), Counter::default()).unwrap();
        let entry = Entry {
            start_time: Rfc3339(SystemTime::now()),
            source_address: "10.0.0.1:1234".parse().unwrap(),
            source_workload: None,
            destination_service: None,
            destination_workload: None,
            method: "GET",
            authority: "web",
            path: "/",
            protocol: "HTTP/1.1",
            response_code: 200,
            response_flags: "-",
            attempts: 1,
            upstream_host: None,
            duration_ms: 1.0,
            bytes_received: 0,
            bytes_sent: 0,
            trace_id: None,
        };
        let line = serde_json::to_string(&entry).unwrap().len() + 1;
        let room = QUEUE_BYTES / line + 1;
        // The writer takes what is queued once and is stuck writing it; the batch takes
        // QUEUE_BYTES more; the rest is dropped, and logging returned every time.
        for _ in 0..3 * room {
            log.log(&entry);
        }
        assert!(log.dropped.get() >= room as u64 / 2, "{} dropped of {}", log.dropped.get(), 3 * room);
    }
}
