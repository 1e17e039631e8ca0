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

pub struct Metrics {
    registry: Registry,
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
        Self {
            registry,
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
        out
    }
}
