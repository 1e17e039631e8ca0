//! L4 telemetry from the kernel's connection records: Istio-compatible Prometheus metrics, a
//! JSON flow log of closed connections, and the live connection table behind `mesh conns`.
//!
//! The kernel writes a CLOSED record per connection to a ring buffer, and the agent reads the
//! live-connection table every SCAN_INTERVAL: a connection is counted as opened when it is
//! first seen (by a scan, or in its close record, whichever comes first), and its bytes grow
//! with each scan, as Istio's do, and end exact at close. No record at establishment: it cost
//! a fifth of the kernel's per-connection time, for an opened count at most SCAN_INTERVAL
//! earlier.
pub mod access_log;
pub mod batch;
pub mod conns;
pub mod identity;
pub mod metrics;
pub mod traces;

use std::{
    collections::HashMap,
    io::Write,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use mesh_common::{ConnEvent, ConnValue, conn_event};
use prometheus_client::metrics::counter::Counter;

use self::{conns::ConnRow, identity::Identities, metrics::Metrics};
use crate::ebpf::{conn_table::ConnTable, events::EventRing, image::ip_of};

/// How often the live-connection table is read (openings and byte counters).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(2);
/// How often the ring buffer is drained without being woken: the kernel wakes the agent only
/// when a quarter of the ring is full, so that records are read in batches.
pub const DRAIN_INTERVAL: Duration = Duration::from_millis(100);

/// Where closed-connection records go, one JSON object a line: off, stdout or a file, as
/// the access log.
pub use access_log::Target as FlowLog;

/// A live connection already counted as opened, with the bytes counted so far (only the
/// difference is added).
#[derive(Debug, Default, Clone, Copy)]
struct Reported {
    sent: u64,
    received: u64,
    /// The last scan that saw it live.
    seen_in_scan: u64,
}

#[derive(Debug, Default)]
struct PolicyNumbers {
    authorization: std::collections::HashMap<u32, crate::state::ObjectKey>,
    peer_authentication: std::collections::HashMap<u32, crate::state::ObjectKey>,
}

pub struct Telemetry {
    pub metrics: Metrics,
    identities: RwLock<Identities>,
    /// Counters resolved per (direction, service, client, server): the labels of a connection
    /// are computed once per peer pair, not per record.
    series: Mutex<FastMap<SeriesKey, Arc<Series>>>,
    /// The same for proxied requests, per (backend Service, client, endpoint, code, flags):
    /// twelve label values are built and hashed once per combination, not per request.
    http_series: Mutex<HttpSeriesCache>,
    reported: Mutex<FastMap<u64, Reported>>,
    scans: std::sync::atomic::AtomicU64,
    flow_log: Mutex<Option<Box<dyn Write + Send>>>,
    /// The tunnel listener: the kernel's records of connections to it are the tunnel's to
    /// report (with both principals), not counted twice.
    tunnel_listener: RwLock<Option<mesh_common::Addr>>,
    tunnel_port: std::sync::atomic::AtomicU16,
    /// AuthorizationPolicies and PeerAuthentications by the numbers the kernel's refusal
    /// records carry.
    policy_numbers: RwLock<PolicyNumbers>,
}

/// A tunneled connection's counters, from its opening to its close.
pub struct TunnelSeries(Arc<Series>);

impl TunnelSeries {
    /// Counts the close, with the bytes from the client and back (Istio's received and sent).
    pub fn closed(self, from_client: u64, to_client: u64) {
        self.0.received.inc_by(from_client);
        self.0.sent.inc_by(to_client);
        self.0.closed.inc();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    direction: u8,
    service_id: u32,
    /// The dialling pod, as the kernel recorded it.
    workload: u32,
    local: mesh_common::Addr,
    remote: mesh_common::Addr,
}

/// The counters of one label set (prometheus-client counters share their value when cloned).
struct Series {
    labels: metrics::TcpLabels,
    opened: Counter,
    closed: Counter,
    sent: Counter,
    received: Counter,
}

/// A request's labels but the Service's, which keys the outer map (looked up by reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct HttpKey {
    client: std::net::IpAddr,
    endpoint: Option<std::net::IpAddr>,
    code: u16,
    flags: &'static str,
}

/// The request counter and latency histogram of one label set.
struct HttpSeries {
    requests: Counter,
    duration: prometheus_client::metrics::histogram::Histogram,
}

#[derive(Default)]
struct HttpSeriesCache {
    by_service: FastMap<identity::Named, FastMap<HttpKey, HttpSeries>>,
    /// Requests that reached no Service (no route, not captured).
    no_service: FastMap<HttpKey, HttpSeries>,
    len: usize,
}

/// Keyed by cookies and addresses the kernel wrote: no need for SipHash's flood resistance on
/// a path that runs for every closed connection.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Past this many cached series the cache starts over (peer pairs are unbounded in theory).
const MAX_CACHED_SERIES: usize = 65_536;

impl Telemetry {
    pub fn new(flow_log: &FlowLog) -> std::io::Result<Self> {
        let writer: Option<Box<dyn Write + Send>> = match flow_log {
            FlowLog::Off => None,
            FlowLog::Stdout => Some(Box::new(std::io::stdout())),
            FlowLog::File(path) => {
                Some(Box::new(std::io::LineWriter::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)))
            }
        };
        Ok(Self {
            metrics: Metrics::default(),
            identities: RwLock::new(Identities::default()),
            series: Mutex::new(FastMap::default()),
            http_series: Mutex::new(HttpSeriesCache::default()),
            reported: Mutex::new(FastMap::default()),
            scans: std::sync::atomic::AtomicU64::new(0),
            tunnel_listener: RwLock::new(None),
            tunnel_port: std::sync::atomic::AtomicU16::new(0),
            policy_numbers: RwLock::default(),
            flow_log: Mutex::new(writer),
        })
    }

    /// Counts one proxied request.
    pub fn record_request(
        &self,
        service: Option<&identity::Named>,
        client: std::net::IpAddr,
        endpoint: Option<std::net::IpAddr>,
        code: u16,
        flags: &'static str,
        millis: f64,
    ) {
        let key = HttpKey { client, endpoint, code, flags };
        let mut cache = self.http_series.lock().expect("http series lock");
        let cached = match service {
            Some(s) => cache.by_service.get(s).and_then(|m| m.get(&key)),
            None => cache.no_service.get(&key),
        };
        if let Some(series) = cached {
            series.requests.inc();
            series.duration.observe(millis);
            return;
        }
        if cache.len >= MAX_CACHED_SERIES {
            *cache = HttpSeriesCache::default();
        }
        // Under the cache's lock: a change of identities clears the cache after it is made,
        // so no series with labels from before the change outlives it.
        let labels = self.http_labels(service, key);
        let series = HttpSeries {
            requests: self.metrics.requests.get_or_create(&labels).clone(),
            duration: self.metrics.request_duration.get_or_create(&labels).clone(),
        };
        series.requests.inc();
        series.duration.observe(millis);
        cache.len += 1;
        match service {
            Some(s) => cache.by_service.entry(s.clone()).or_default().insert(key, series),
            None => cache.no_service.insert(key, series),
        };
    }

    fn http_labels(&self, service: Option<&identity::Named>, key: HttpKey) -> metrics::HttpLabels {
        let identities = self.identities.read().expect("identities lock");
        let source = identities.who(key.client);
        let destination = key.endpoint.map(|ip| identities.who(ip));
        let workload = destination.as_ref().and_then(|d| d.workload.as_ref());
        let (name, namespace) = (identity::name_or_unknown, identity::namespace_or_unknown);
        metrics::HttpLabels {
            reporter: "source".into(),
            source_workload: name(source.workload.as_ref()),
            source_workload_namespace: namespace(source.workload.as_ref()),
            source_principal: source.principal_or_unknown(),
            destination_service: identity::service_fqdn(service),
            destination_service_name: name(service),
            destination_service_namespace: namespace(service),
            destination_workload: name(workload),
            destination_workload_namespace: namespace(workload),
            destination_principal: destination.map_or_else(|| "unknown".to_owned(), |d| d.principal_or_unknown()),
            response_code: key.code.to_string(),
            response_flags: key.flags.to_owned(),
        }
    }

    /// Cached label sets are computed again after identities changed.
    fn forget_series(&self) {
        self.series.lock().expect("series lock").clear();
        *self.http_series.lock().expect("http series lock") = HttpSeriesCache::default();
    }

    /// The workload at `ip`: a pod of this node, or a Service's endpoint.
    pub fn workload_of(&self, ip: std::net::IpAddr) -> Option<identity::Named> {
        self.identities.read().expect("identities lock").who(ip).workload
    }

    /// The trust domain of principals (`spiffe://<trust domain>/ns/.../sa/...`).
    pub fn set_trust_domain(&self, trust_domain: &str) {
        self.identities.write().expect("identities lock").trust_domain = trust_domain.to_owned();
        self.forget_series();
    }

    /// Workloads by address, from the store's snapshot; labels computed before are computed
    /// again when they changed.
    pub fn set_workloads(
        &self,
        workloads: imbl::HashMap<std::net::IpAddr, identity::Named>,
        pods: imbl::HashMap<std::net::IpAddr, std::sync::Arc<crate::state::model::Workload>>,
    ) {
        // Called for every applied change; most change neither: the proxy's readers are not
        // held up by a write lock then.
        let unchanged = |i: &identity::Identities| i.workloads.ptr_eq(&workloads) && i.pods.ptr_eq(&pods);
        if unchanged(&self.identities.read().expect("identities lock")) {
            return;
        }
        let mut identities = self.identities.write().expect("identities lock");
        (identities.workloads, identities.pods) = (workloads, pods);
        drop(identities);
        self.forget_series();
    }

    /// Pods by the number the kernel records on their connections, from the workload sync.
    pub fn set_workload_ids(&self, pods: imbl::HashMap<u32, std::sync::Arc<crate::state::model::Workload>>) {
        let mut identities = self.identities.write().expect("identities lock");
        if identities.by_kernel_id == pods {
            return;
        }
        identities.by_kernel_id = pods;
        drop(identities);
        self.forget_series();
    }

    /// The pod the kernel numbered `id` (`mesh_workloads`).
    pub fn workload_by_kernel_id(&self, id: u32) -> Option<std::sync::Arc<crate::state::model::Workload>> {
        self.identities.read().expect("identities lock").by_kernel_id.get(&id).cloned()
    }

    /// Services by kernel id, from the kernel sync.
    pub fn set_service_ids(&self, services: imbl::HashMap<u32, identity::Named>) {
        self.identities.write().expect("identities lock").services = services;
        self.forget_series();
    }

    fn series(&self, conn: &ConnValue) -> Arc<Series> {
        let key = SeriesKey {
            direction: conn.direction,
            service_id: conn.service_id,
            workload: conn.workload,
            local: conn.local,
            remote: conn.remote,
        };
        let mut cache = self.series.lock().expect("series lock");
        if let Some(series) = cache.get(&key) {
            return series.clone();
        }
        if cache.len() >= MAX_CACHED_SERIES {
            cache.clear();
        }
        let labels = self.identities.read().expect("identities lock").labels(conn);
        let m = &self.metrics;
        let series = Arc::new(Series {
            opened: m.opened.get_or_create(&labels).clone(),
            closed: m.closed.get_or_create(&labels).clone(),
            sent: m.sent_bytes.get_or_create(&labels).clone(),
            received: m.received_bytes.get_or_create(&labels).clone(),
            labels,
        });
        cache.insert(key, series.clone());
        series
    }

    /// Where the tunnel listener is (connections to it are reported by the tunnel).
    pub fn set_tunnel_listener(&self, addr: std::net::SocketAddr) {
        *self.tunnel_listener.write().expect("tunnel lock") = Some(crate::ebpf::image::addr_of(addr.ip()));
        self.tunnel_port.store(addr.port(), std::sync::atomic::Ordering::Relaxed);
    }

    fn to_tunnel(&self, conn: &ConnValue) -> bool {
        conn.direction == mesh_common::direction::OUTBOUND
            && conn.remote_port == self.tunnel_port.load(std::sync::atomic::Ordering::Relaxed)
            && *self.tunnel_listener.read().expect("tunnel lock") == Some(conn.remote)
    }

    /// Counts a tunneled connection as opened, under `labels` (see `Identities::tunnel_labels`).
    pub fn tunnel_opened(&self, reporter: &str, ends: identity::TunnelEnds<'_>) -> TunnelSeries {
        let labels = self.identities.read().expect("identities lock").tunnel_labels(reporter, ends);
        let m = &self.metrics;
        let series = Series {
            opened: m.opened.get_or_create(&labels).clone(),
            closed: m.closed.get_or_create(&labels).clone(),
            sent: m.sent_bytes.get_or_create(&labels).clone(),
            received: m.received_bytes.get_or_create(&labels).clone(),
            labels,
        };
        series.opened.inc();
        TunnelSeries(Arc::new(series))
    }

    /// Policies by the numbers `sync::authz` gave them.
    pub fn set_policy_numbers(
        &self,
        authorization: std::collections::HashMap<u32, crate::state::ObjectKey>,
        peer_authentication: std::collections::HashMap<u32, crate::state::ObjectKey>,
    ) {
        *self.policy_numbers.write().expect("policy numbers lock") = PolicyNumbers { authorization, peer_authentication };
    }

    fn policy_name(&self, number: u32, peer_authentication: bool) -> String {
        let numbers = self.policy_numbers.read().expect("policy numbers lock");
        let table = if peer_authentication { &numbers.peer_authentication } else { &numbers.authorization };
        match number {
            0 => "none".to_owned(),
            n => table.get(&n).map_or_else(|| format!("#{n}"), ToString::to_string),
        }
    }

    /// Folds one kernel record into the metrics (and the flow log).
    pub fn record(&self, event: &ConnEvent) {
        if event.kind == conn_event::DENIED {
            return self.record_denial(event);
        }
        if event.kind == conn_event::INGRESS_DROPPED {
            return self.record_ingress_drop(event);
        }
        if event.kind != conn_event::CLOSED {
            return;
        }
        if self.to_tunnel(&event.conn) {
            // The tunnel counts it; the flow log still has its line.
            let labels = self.identities.read().expect("identities lock").labels(&event.conn);
            return self.write_flow(event, &labels);
        }
        let series = self.series(&event.conn);
        self.count(&event.conn, &series, None);
        series.closed.inc();
        self.write_flow(event, &series.labels);
    }

    /// Counts a connection as opened if it is new to us, and the bytes it moved since they
    /// were last counted. `scan`: the scan that sees it live; None for its close record.
    fn count(&self, conn: &ConnValue, series: &Series, scan: Option<u64>) {
        let cookie = conn.cookie;
        let mut reported = self.reported.lock().expect("reported lock");
        let before = match scan {
            None => reported.remove(&cookie),
            Some(_) => reported.get(&cookie).copied(),
        };
        if before.is_none() {
            series.opened.inc();
        }
        let before = before.unwrap_or_default();
        // Istio's point of view: "sent" is the response (server to client), "received" the
        // request, whichever side reports.
        let (sent, received) = istio_bytes(conn);
        series.sent.inc_by(sent.saturating_sub(before.sent));
        series.received.inc_by(received.saturating_sub(before.received));
        if let Some(seen_in_scan) = scan {
            reported.insert(cookie, Reported { sent, received, seen_in_scan });
        }
    }

    /// Counts the openings and bytes of live connections (see SCAN_INTERVAL). A connection
    /// missing from two scans in a row whose close record never came (the ring was full) is
    /// forgotten, so that lost records cannot grow the agent's memory.
    pub fn scan_live(&self, table: &ConnTable) {
        let scan = self.scans.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let live = match table.established() {
            Ok(live) => live,
            Err(e) => {
                // Openings and live bytes wait for the next scan; close records still count.
                tracing::warn!("reading the live-connection table: {e}");
                return;
            }
        };
        for conn in live.into_iter().filter(|c| !self.to_tunnel(c)) {
            let series = self.series(&conn);
            self.count(&conn, &series, Some(scan));
        }
        self.reported.lock().expect("reported lock").retain(|_, r| r.seen_in_scan + 2 > scan);
    }

    /// A connect() the kernel refused by policy: the source's decision, counted and logged.
    fn record_denial(&self, event: &ConnEvent) {
        let policy = self.policy_name(event.detail, false);
        let labels = metrics::AuthzLabels { decision: "deny".into(), policy: policy.clone(), reporter: "source".into() };
        self.metrics.authz.decisions.get_or_create(&labels).inc();
        let conn = &event.conn;
        let caller = self.workload_by_kernel_id(conn.workload).map(|w| w.spec.key.to_string());
        let destination = self.workload_of(ip_of(&conn.remote)).map(|w| w.to_string());
        let reason = if event.detail == 0 {
            "no ALLOW policy of the destination matches".to_owned()
        } else {
            format!("AuthorizationPolicy {policy}")
        };
        tracing::debug!(caller = caller.as_deref().unwrap_or("-"), destination = %ip_of(&conn.remote), port = conn.remote_port, %reason, "connect refused by policy (EPERM)");
        self.write_flow_line(|| {
            serde_json::json!({
            "event": "tcp_denied",
            "reporter": "source",
            "source_pod": caller,
            "destination": format!("{}", std::net::SocketAddr::new(ip_of(&conn.remote), conn.remote_port)),
            "destination_workload": destination,
            "destination_service": (conn.service_id != 0).then(|| format!("{}", std::net::SocketAddr::new(ip_of(&conn.service_addr), conn.service_port))),
            "policy": policy,
            "reason": reason,
            "errno": "EPERM",
            })
        });
    }

    /// A SYN the ingress filter dropped: plaintext to a STRICT pod, or a caller the kernel could
    /// not vouch for that authorization refuses. Counted as the destination's, and logged.
    fn record_ingress_drop(&self, event: &ConnEvent) {
        let conn = &event.conn;
        let strict = conn.service_id == mesh_common::ingress_drop::STRICT;
        let policy = self.policy_name(event.detail, strict);
        let pod = self.workload_of(ip_of(&conn.local)).map(|w| w.to_string());
        if strict {
            let labels =
                metrics::StrictLabels { destination_workload: pod.clone().unwrap_or_else(|| "unknown".into()), policy: policy.clone() };
            self.metrics.strict_dropped.get_or_create(&labels).inc();
        } else {
            let labels = metrics::AuthzLabels { decision: "deny".into(), policy: policy.clone(), reporter: "destination".into() };
            self.metrics.authz.decisions.get_or_create(&labels).inc();
        }
        let (check, reason) = if strict {
            ("peer_authentication", format!("plaintext to a STRICT port (PeerAuthentication {policy})"))
        } else if event.detail == 0 {
            ("authorization", "a caller without a verified identity: no ALLOW policy of the destination matches".to_owned())
        } else {
            ("authorization", format!("a caller without a verified identity: AuthorizationPolicy {policy}"))
        };
        self.write_flow_line(|| {
            serde_json::json!({
            "event": "tcp_dropped",
            "reporter": "destination",
            "check": check,
            "source": format!("{}", std::net::SocketAddr::new(ip_of(&conn.remote), conn.remote_port)),
            "destination": format!("{}", std::net::SocketAddr::new(ip_of(&conn.local), conn.local_port)),
            "destination_workload": pod,
            "policy": policy,
            "reason": reason,
            })
        });
    }

    /// A connection established before a policy change that now denies it, closed by the agent
    /// (`sync::authz::review`). `policy` is a number of the table `peer_authentication` says.
    pub fn record_policy_close(&self, conn: &mesh_common::ConnValue, check: &str, policy: u32, peer_authentication: bool) {
        let policy = self.policy_name(policy, peer_authentication);
        let labels = metrics::PolicyClosedLabels { check: check.to_owned(), policy: policy.clone() };
        self.metrics.authz.closed.get_or_create(&labels).inc();
        let source = std::net::SocketAddr::new(ip_of(&conn.remote), conn.remote_port);
        let destination = std::net::SocketAddr::new(ip_of(&conn.local), conn.local_port);
        tracing::info!(%source, %destination, check, %policy, "closed a connection the policy now denies");
        self.write_flow_line(|| {
            serde_json::json!({
            "event": "tcp_policy_closed",
            "reporter": "destination",
            "check": check,
            "source": source.to_string(),
            "source_workload": self.workload_of(source.ip()).map(|w| w.to_string()),
            "destination": destination.to_string(),
            "destination_workload": self.workload_of(destination.ip()).map(|w| w.to_string()),
            "policy": policy,
            })
        });
    }

    fn write_flow(&self, event: &ConnEvent, labels: &metrics::TcpLabels) {
        self.write_flow_line(|| {
            serde_json::json!({
                "event": "tcp_close",
                "reporter": labels.reporter,
                "source_workload": labels.source_workload,
                "destination_service": labels.destination_service,
                "destination_workload": labels.destination_workload,
                "connection": ConnRow::new(&event.conn, event.at_ns),
            })
        });
    }

    /// Writes one flow log line, built only while the flow log is on; a failed write turns it
    /// off.
    fn write_flow_line(&self, line: impl FnOnce() -> serde_json::Value) {
        let mut flow_log = self.flow_log.lock().expect("flow log lock");
        let Some(writer) = flow_log.as_mut() else { return };
        if writeln!(writer, "{}", line()).is_err() {
            tracing::warn!("flow log write failed; disabling the flow log");
            *flow_log = None;
        }
    }
}

/// (sent, received) in Istio's sense for a connection seen from either side.
fn istio_bytes(conn: &ConnValue) -> (u64, u64) {
    let out = conn.bytes_sent + conn.redirected_sent;
    let inn = conn.bytes_received + conn.redirected_received;
    if conn.direction == mesh_common::direction::OUTBOUND { (inn, out) } else { (out, inn) }
}

/// Reads connection records from the pinned ring buffer until the task is dropped, and scans
/// live connections every SCAN_INTERVAL (sweeping out dead dials as it goes).
pub async fn run(telemetry: Arc<Telemetry>, pin_dir: PathBuf) {
    let opened = EventRing::open(&pin_dir).map_err(|e| e.to_string()).and_then(|ring| Ok((ring, ConnTable::open(&pin_dir)?)));
    let (ring, mut table) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            tracing::error!("connection records unavailable: {e}");
            return;
        }
    };
    // SAFETY: the ring buffer owns its descriptor, open and unchanged while the AsyncFd owns it.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let Ok(mut ring) = registered else {
        tracing::error!("cannot poll the connection ring buffer");
        return;
    };
    let mut scan = tokio::time::interval(SCAN_INTERVAL);
    let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
    loop {
        tokio::select! {
            ready = ring.readable_mut() => {
                let Ok(mut ready) = ready else { return };
                drain(ready.get_inner_mut(), &telemetry);
                ready.clear_ready();
            }
            _ = drain_tick.tick() => drain(ring.get_mut(), &telemetry),
            _ = scan.tick() => {
                telemetry.scan_live(&table);
                let swept = table.sweep_dead_dials();
                if swept > 0 {
                    tracing::debug!(swept, "removed overflow entries of connects that never sent a SYN");
                }
            }
        }
    }
}

fn drain(ring: &mut EventRing, telemetry: &Telemetry) {
    ring.drain(|event| telemetry.record(event));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ObjectKey;

    /// The request counter of the series whose source workload is `workload`.
    fn requests_from(telemetry: &Telemetry, workload: &str) -> u64 {
        let labels = |source: &str| metrics::HttpLabels {
            reporter: "source".into(),
            source_workload: source.into(),
            source_workload_namespace: if source == "unknown" { "unknown".into() } else { "shop".into() },
            source_principal: "unknown".into(),
            destination_service: "web.shop.svc.cluster.local".into(),
            destination_service_name: "web".into(),
            destination_service_namespace: "shop".into(),
            destination_workload: "unknown".into(),
            destination_workload_namespace: "unknown".into(),
            destination_principal: "unknown".into(),
            response_code: "200".into(),
            response_flags: "-".into(),
        };
        telemetry.metrics.requests.get_or_create(&labels(workload)).get()
    }

    #[test]
    fn cached_request_labels_follow_a_change_of_identities() {
        let telemetry = Telemetry::new(&FlowLog::Off).unwrap();
        let web = ObjectKey::new("shop", "web");
        let client: std::net::IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..2 {
            telemetry.record_request(Some(&web), client, None, 200, "-", 1.0);
        }
        assert_eq!(requests_from(&telemetry, "unknown"), 2, "the same label set is counted twice");
        // The client's address becomes a known workload's: the next request says so.
        let workloads: imbl::HashMap<_, _> = [(client, ObjectKey::new("shop", "frontend"))].into_iter().collect();
        telemetry.set_workloads(workloads, imbl::HashMap::new());
        telemetry.record_request(Some(&web), client, None, 200, "-", 1.0);
        assert_eq!(requests_from(&telemetry, "frontend"), 1);
        assert_eq!(requests_from(&telemetry, "unknown"), 2, "the old series keeps its count");
    }
}
