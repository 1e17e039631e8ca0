//! The live connection table, read from the pinned `mesh_conns` map, so that it works while
//! the agent is down.
use std::{net::SocketAddr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use mesh_common::{ConnValue, direction, map_names};
use serde::Serialize;

use crate::sync::ip_of;

/// One connection, from the point of view of the socket in the attached cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct ConnRow {
    pub cookie: u64,
    /// "outbound" (this side connected) or "inbound" (this side accepted).
    pub direction: &'static str,
    /// The client.
    pub source: SocketAddr,
    /// The server: the backend for balanced connections.
    pub destination: SocketAddr,
    /// The Service address the client dialled, when mesh balanced the connection.
    pub service_address: Option<SocketAddr>,
    pub service_id: u32,
    /// Payload bytes from this socket (TCP, plus same-node redirected).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Of those, the bytes that went socket to socket (same-node redirection).
    pub redirected_sent: u64,
    pub redirected_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    pub retransmits: u32,
    pub srtt_us: u32,
    /// Seconds since establishment (at `now_ns`).
    pub age_s: f64,
}

impl ConnRow {
    pub fn new(cookie: u64, c: &ConnValue, now_ns: u64) -> Self {
        let local = SocketAddr::new(ip_of(&c.local), c.local_port);
        let remote = SocketAddr::new(ip_of(&c.remote), c.remote_port);
        let outbound = c.direction == direction::OUTBOUND;
        let (source, destination) = if outbound { (local, remote) } else { (remote, local) };
        Self {
            cookie,
            direction: if outbound { "outbound" } else { "inbound" },
            source,
            destination,
            service_address: (c.service_id != 0).then(|| SocketAddr::new(ip_of(&c.service_addr), c.service_port)),
            service_id: c.service_id,
            bytes_sent: c.bytes_sent + c.redirected_sent,
            bytes_received: c.bytes_received + c.redirected_received,
            redirected_sent: c.redirected_sent,
            redirected_received: c.redirected_received,
            segs_in: c.segs_in,
            segs_out: c.segs_out,
            retransmits: c.retransmits,
            srtt_us: c.srtt_us,
            age_s: now_ns.saturating_sub(c.start_ns) as f64 / 1e9,
        }
    }
}

/// `bpf_ktime_get_ns()`'s clock, read from userspace.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Every tracked connection, by cookie.
pub fn read(pin_dir: &Path) -> Result<Vec<(u64, ConnValue)>, String> {
    let path = pin_dir.join(map_names::CONNS);
    let data = MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let map = Map::from_map_data(data).map_err(|e| format!("{}: {e}", path.display()))?;
    let conns: HashMap<MapData, u64, ConnValue> = HashMap::try_from(map).map_err(|e| format!("{}: {e}", path.display()))?;
    // Entries can vanish between listing a key and reading it: skip those.
    Ok(conns.iter().filter_map(Result::ok).collect())
}

/// The table, oldest first.
pub fn rows(pin_dir: &Path) -> Result<Vec<ConnRow>, String> {
    let now = monotonic_ns();
    let mut rows: Vec<ConnRow> = read(pin_dir)?.iter().map(|(cookie, c)| ConnRow::new(*cookie, c, now)).collect();
    rows.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
    Ok(rows)
}

pub fn print_table(rows: &[ConnRow]) {
    println!(
        "{:<8} {:<24} {:<24} {:<24} {:>12} {:>12} {:>9} {:>8}",
        "DIR", "SOURCE", "SERVICE", "DESTINATION", "SENT", "RECEIVED", "RTT", "AGE"
    );
    for r in rows {
        println!(
            "{:<8} {:<24} {:<24} {:<24} {:>12} {:>12} {:>7}us {:>7.1}s",
            r.direction,
            r.source.to_string(),
            r.service_address.map_or_else(|| "-".to_owned(), |a| a.to_string()),
            r.destination.to_string(),
            r.bytes_sent,
            r.bytes_received,
            r.srtt_us,
            r.age_s
        );
    }
}
