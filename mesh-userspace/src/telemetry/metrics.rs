//! The Prometheus registry: Istio's TCP metrics (same names and labels, so existing dashboards
//! and Kiali work) and mesh's own health as `mesh_*`.
#![forbid(unsafe_code)]
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Labels of the TCP metrics. Every value is a name from configuration or "unknown": label
/// cardinality is bounded by the number of services and workloads.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` of a pod on this node.
    pub source_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// Istio's: `mutual_tls` for connections carried by HBONE tunnels, `none` for what the
    /// kernel saw arrive in plaintext, `unknown` for what it saw leave.
    pub connection_security_policy: String,
}

/// Labels of the HTTP metrics of the outbound proxy; bounded like `TcpLabels` (status codes
/// and response flags are small sets).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub response_code: String,
    /// Envoy's: "-" none, "NR" no route, "UH" no healthy upstream, "UF" upstream connection
    /// failure, "UT" upstream timeout.
    pub response_flags: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub destination_service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// `outbound`: this agent opened the tunnel; `inbound`: it took it.
    pub direction: String,
}

impl DirectionLabels {
    pub fn outbound() -> Self {
        Self { direction: "outbound".into() }
    }

    pub fn inbound() -> Self {
        Self { direction: "inbound".into() }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: String,
    /// A short fixed name (`wrong_identity`, `expired_certificate`, `not_tls`...).
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `allow` or `deny`.
    pub decision: String,
    /// The AuthorizationPolicy that decided (`namespace/name`), or `none`.
    pub policy: String,
    /// `destination` or `source`.
    pub reporter: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StrictLabels {
    /// The pod (`namespace/name`) the SYN was for.
    pub destination_workload: String,
    /// The PeerAuthentication that made the port STRICT.
    pub policy: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyClosedLabels {
    /// `authorization` or `peer_authentication`.
    pub check: String,
    /// The policy (`namespace/name`) that denies the connection now, or `none`.
    pub policy: String,
}

/// Authorization decisions.
#[derive(Debug, Clone, Default)]
pub struct AuthzMetrics {
    pub decisions: Family<AuthzLabels, Counter>,
    /// Connections no agent is in (between pods of a node, plaintext) closed because a policy
    /// change denies them.
    pub closed: Family<PolicyClosedLabels, Counter>,
}

/// HBONE tunnels (mTLS between agents), by direction.
#[derive(Debug, Clone, Default)]
pub struct HboneMetrics {
    pub refused: Family<RefusalLabels, Counter>,
    pub streams_open: Family<DirectionLabels, Gauge>,
    pub connections_open: Family<DirectionLabels, Gauge>,
}

pub struct Metrics {
    registry: Registry,
    pub hbone: HboneMetrics,
    pub authz: AuthzMetrics,
    /// Plaintext connection attempts the kernel dropped at STRICT pods.
    pub strict_dropped: Family<StrictLabels, Counter>,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub sent_bytes: Family<TcpLabels, Counter>,
    pub received_bytes: Family<TcpLabels, Counter>,
    pub map_entries: Family<MapLabels, Gauge>,
    /// Totals of the kernel's per-CPU drop counters, set at scrape time.
    pub dropped: Family<DropLabels, Gauge>,
    pub requests: Family<HttpLabels, Counter>,
    pub request_duration: Family<HttpLabels, Histogram>,
    pub retries: Family<RetryLabels, Counter>,
    pub ejections: Family<RetryLabels, Counter>,
    /// The control plane: files read, store and kernel generations, refused origins.
    pub config_file_reads: Counter,
    pub config_generation: Gauge,
    pub kernel_generation: Gauge,
    pub config_rejected: Gauge,
    pub config_rejected_objects: Gauge,
    /// Access log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// Connections the outbound proxy closed at once because it was full.
    pub proxy_refused: Counter,
    /// Client connections the outbound proxy holds open now.
    pub proxy_open: Gauge,
    /// Spans not exported: the queue was full or the collector refused them.
    pub spans_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let sent_bytes = Family::<TcpLabels, Counter>::default();
        let received_bytes = Family::<TcpLabels, Counter>::default();
        let map_entries = Family::<MapLabels, Gauge>::default();
        let dropped = Family::<DropLabels, Gauge>::default();
        // prometheus-client appends `_total` to counters.
        registry.register("istio_tcp_connections_opened", "TCP connections opened", opened.clone());
        registry.register("istio_tcp_connections_closed", "TCP connections closed", closed.clone());
        registry.register("istio_tcp_sent_bytes", "Bytes sent in responses (server to client)", sent_bytes.clone());
        registry.register("istio_tcp_received_bytes", "Bytes received in requests (client to server)", received_bytes.clone());
        registry.register("mesh_map_entries", "Entries in each pinned map", map_entries.clone());
        registry.register(
            "mesh_kernel_dropped_records",
            "Records the kernel could not keep: reason=events (ring buffer full), conns (connection map full), revnat (a live UDP socket's reverse translation evicted)",
            dropped.clone(),
        );
        let requests = Family::<HttpLabels, Counter>::default();
        // Istio's buckets, in milliseconds.
        let request_duration = Family::<HttpLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
                600000.0, 1800000.0, 3600000.0,
            ])
        });
        registry.register("istio_requests", "HTTP requests through the outbound proxy", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "HTTP request duration through the outbound proxy",
            request_duration.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register("mesh_retries", "Requests the outbound proxy retried", retries.clone());
        let ejections = Family::<RetryLabels, Counter>::default();
        registry.register("mesh_endpoint_ejections", "Endpoints ejected after consecutive failures", ejections.clone());
        let config_file_reads = Counter::default();
        registry.register(
            "mesh_config_file_reads",
            "Configuration files read (each read is of a file that changed)",
            config_file_reads.clone(),
        );
        let config_generation = Gauge::default();
        registry.register("mesh_config_generation", "Generation of the configuration the agent holds", config_generation.clone());
        let kernel_generation = Gauge::default();
        registry.register("mesh_kernel_sync_generation", "Generation of the configuration the kernel maps hold", kernel_generation.clone());
        let config_rejected = Gauge::default();
        registry.register(
            "mesh_config_rejected_sources",
            "Configuration sources (a file, or one API object) whose newest content was refused; their last good objects serve",
            config_rejected.clone(),
        );
        let config_rejected_objects = Gauge::default();
        registry.register(
            "mesh_config_rejected_objects",
            "Objects whose newest version was refused (a file refused whole counts each object named in its errors)",
            config_rejected_objects.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "mesh_access_log_dropped",
            "Access log lines dropped because the writer fell behind (requests never wait for it)",
            access_log_dropped.clone(),
        );
        let proxy_refused = Counter::default();
        registry.register(
            "mesh_proxy_connections_refused",
            "Connections the outbound proxy closed on arrival because it held its maximum (see the agent's open-file limit)",
            proxy_refused.clone(),
        );
        let proxy_open = Gauge::default();
        registry.register("mesh_proxy_connections_open", "Client connections the outbound proxy holds open now", proxy_open.clone());
        let spans_dropped = Counter::default();
        registry.register(
            "mesh_trace_spans_dropped",
            "Spans not exported: the queue was full (requests never wait for it) or the collector did not take them",
            spans_dropped.clone(),
        );
        let hbone = HboneMetrics::default();
        registry.register("mesh_hbone_refused", "HBONE tunnels refused, by direction and reason", hbone.refused.clone());
        registry.register(
            "mesh_hbone_streams_open",
            "HBONE tunnel streams open now (one per proxied connection)",
            hbone.streams_open.clone(),
        );
        registry.register(
            "mesh_hbone_connections_open",
            "TLS connections between agents carrying HBONE streams, open now",
            hbone.connections_open.clone(),
        );
        let authz = AuthzMetrics::default();
        registry.register(
            "mesh_authz_decisions",
            "Authorization decisions on connections, by decision, the AuthorizationPolicy that made it (or none) and where (destination or source)",
            authz.decisions.clone(),
        );
        registry.register(
            "mesh_policy_closed",
            "Established connections between pods of this node or from plaintext callers, closed by the agent because a policy change denies them, by check and policy (tunnel streams: mesh_hbone_refused_total{reason=\"policy_closed\"})",
            authz.closed.clone(),
        );
        let strict_dropped = Family::<StrictLabels, Counter>::default();
        registry.register(
            "mesh_strict_dropped",
            "Plaintext connection attempts (SYNs) the kernel dropped at pods whose PeerAuthentication is STRICT, by pod and policy",
            strict_dropped.clone(),
        );
        // The agent's own CPU, memory and descriptors, read at each scrape, under the names
        // every Prometheus client library uses (dashboards and alerts expect them).
        registry.register_collector(Box::new(ProcessCollector));
        Self {
            registry,
            hbone,
            authz,
            strict_dropped,
            spans_dropped,
            access_log_dropped,
            proxy_refused,
            proxy_open,
            config_file_reads,
            config_generation,
            kernel_generation,
            config_rejected,
            config_rejected_objects,
            opened,
            closed,
            sent_bytes,
            received_bytes,
            map_entries,
            dropped,
            requests,
            request_duration,
            retries,
            ejections,
        }
    }
}

impl Metrics {
    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        prometheus_text(&out)
    }
}

/// Prometheus's text format (0.0.4), from the OpenMetrics text prometheus-client writes: what
/// `/metrics` serves as `text/plain`, the format every scraper and promtool read. In it a
/// counter's HELP and TYPE name its samples (`x_total`; OpenMetrics names the family `x`, and
/// a text/plain reader then takes the samples for untyped), and the OpenMetrics-only lines
/// (`# UNIT`, `# EOF`) have no place.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        openmetrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) && !name.ends_with("_total") { "_total" } else { "" };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_exposition_is_prometheus_text_with_counters_named_by_their_samples() {
        let metrics = super::Metrics::default();
        metrics.retries.get_or_create(&super::RetryLabels { destination_service: "web.test.svc.cluster.local".into() }).inc();
        let text = metrics.encode();
        assert!(text.contains("# HELP mesh_retries_total Requests the outbound proxy retried"), "{text}");
        assert!(text.contains("# TYPE mesh_retries_total counter\n"), "{text}");
        assert!(text.contains("mesh_retries_total{destination_service=\"web.test.svc.cluster.local\"} 1\n"), "{text}");
        assert!(text.contains("# TYPE mesh_config_generation gauge\n"), "gauges keep their name: {text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n") && text.contains("process_resident_memory_bytes "), "{text}");
    }
}

/// `process_*` metrics of this process, from /proc/self at scrape time.
#[derive(Debug)]
struct ProcessCollector;

/// From /proc/self/stat: (utime+stime ticks, starttime ticks since boot).
fn self_stat() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field 3 (state) is fields[0]: utime is field 14, stime 15, starttime 22.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)? + field(15)?, field(22)?))
}

/// A line of /proc/self/status or /proc/self/limits, by its start: the first number after it.
fn proc_number(file: &str, key: &str) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

fn boot_time() -> Option<u64> {
    proc_number("/proc/stat", "btime ")
}

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use prometheus_client::{
            encoding::EncodeMetric,
            metrics::{counter::ConstCounter, gauge::ConstGauge},
        };
        let ticks = crate::host::clock_ticks() as f64;
        if let Some((cpu, start)) = self_stat() {
            let cpu = ConstCounter::new(cpu as f64 / ticks);
            cpu.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                cpu.metric_type(),
            )?)?;
            if let Some(boot) = boot_time() {
                let start = ConstGauge::new(boot as f64 + start as f64 / ticks);
                start.encode(encoder.encode_descriptor(
                    "process_start_time_seconds",
                    "Start time of the process since the Unix epoch, in seconds",
                    None,
                    start.metric_type(),
                )?)?;
            }
        }
        if let Some(kib) = proc_number("/proc/self/status", "VmRSS:") {
            let rss = ConstGauge::new(kib as i64 * 1024);
            rss.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                None,
                rss.metric_type(),
            )?)?;
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            let open = ConstGauge::new(fds.count() as i64);
            open.encode(encoder.encode_descriptor("process_open_fds", "Open file descriptors", None, open.metric_type())?)?;
        }
        if let Some(max) = proc_number("/proc/self/limits", "Max open files") {
            let max = ConstGauge::new(max as i64);
            max.encode(encoder.encode_descriptor("process_max_fds", "The open file descriptor limit", None, max.metric_type())?)?;
        }
        Ok(())
    }
}
