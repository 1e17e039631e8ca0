//! The live connection table as rows, read from the pinned maps (`ConnTable`), so that it
//! works while the agent is down.
#![forbid(unsafe_code)]
use std::{net::SocketAddr, path::Path};

use mesh_common::{ConnValue, direction};
use serde::Serialize;

use crate::{
    ebpf::conn_table::{ConnTable, monotonic_ns},
    ebpf::image::ip_of,
};

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
    pub fn new(c: &ConnValue, now_ns: u64) -> Self {
        let local = SocketAddr::new(ip_of(&c.local), c.local_port);
        let remote = SocketAddr::new(ip_of(&c.remote), c.remote_port);
        let outbound = c.direction == direction::OUTBOUND;
        let (source, destination) = if outbound { (local, remote) } else { (remote, local) };
        Self {
            cookie: c.cookie,
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

/// The table, oldest first.
pub fn rows(pin_dir: &Path) -> Result<Vec<ConnRow>, String> {
    let now = monotonic_ns();
    let mut rows: Vec<ConnRow> = ConnTable::open(pin_dir)?.established()?.iter().map(|c| ConnRow::new(c, now)).collect();
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
