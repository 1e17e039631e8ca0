//! `mesh agent`: wires the datapath, the source, the store and its consumers, and the admin
//! servers, and takes them down in order on SIGTERM.
//!
//! ```text
//! source ──updates──► store ──snapshots──► kernel sync (thread "mesh-sync")
//! (files or the               ├───────► proxy (per-Service state across snapshots)
//!  Kubernetes API)            └───────► telemetry (workload names)
//! ```
mod feed;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use hyper::{Method, StatusCode};
use tokio::{signal::unix::SignalKind, sync::watch};

use mesh_common::drop_counters;

use crate::{
    admin,
    authz::{self, Authorizer},
    ebpf::{
        Datapath as _, loader,
        maps::{AuthzMaps, OrigDstMap, PinnedMaps, TrustedMap, TunnelOriginalMap, TunneledMap, WorkloadMap},
    },
    handoff, host,
    proxy::{
        self,
        connect::{AgentConnector, AgentDialer},
        hbone::{Inbound, Tunnels},
        outbound::{Outbound, TunnelConfig},
        tunnel::{SnapshotWorkloads, TunnelOutbound},
    },
    server::{Lifecycle, Limits},
    sources::{ConfigErrors, Origin, file::FileSource, kube::KubeSource},
    state::{NodeContext, Snapshot, Store},
    sync::{
        Reconciler,
        worker::{self, SyncFeed, SyncReport},
    },
    telemetry::{
        self, FlowLog, Telemetry,
        access_log::{self, AccessLog},
        metrics::{DropLabels, MapLabels},
        traces::{self, Tracer},
    },
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub source: SourceOptions,
    /// None: the cgroup v2 root.
    pub cgroup: Option<PathBuf>,
    pub node: NodeContext,
    pub bpffs: PathBuf,
    pub admin_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub keep_datapath: bool,
    pub programs: loader::ProgramOptions,
    /// Prometheus `/metrics`.
    pub metrics_addr: SocketAddr,
    pub flow_log: FlowLog,
    /// The outbound proxy for L7 Services (connections are sent here by the kernel).
    pub outbound_addr: SocketAddr,
    /// For proxied requests whose route sets no timeout; zero for none.
    pub default_request_timeout: Duration,
    pub access_log: access_log::Target,
    pub traces: traces::TraceConfig,
    /// How long proxied connections may take to finish when the agent stops.
    pub drain_timeout: Duration,
    /// Take the listeners (and then the pin directory) of an agent running on the same pin
    /// directory, which then drains and exits: a restart that refuses no connection.
    pub take_over: bool,
    /// Of workload principals (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`).
    pub trust_domain: String,
    /// Whose AuthorizationPolicies and PeerAuthentications apply to every namespace.
    pub root_namespace: String,
    /// The kubelet's cgroup (under the cgroup v2 mount): its probes are let into pods under
    /// policy and STRICT ports, as in Istio. None: probes are callers without identity.
    pub kubelet_cgroup: Option<PathBuf>,
    /// mTLS between nodes (HBONE); None: off.
    pub mtls: Option<MtlsOptions>,
}

/// Workload certificates and HBONE tunnels.
#[derive(Debug, Clone)]
pub struct MtlsOptions {
    /// Who signs the workloads' certificates.
    pub signer: SignerSource,
    pub cert_lifetime: Duration,
    /// Where the kernel sends enrolled pods' connections to enrolled pods of other nodes.
    pub tunnel_addr: SocketAddr,
    /// Where peer agents' tunnels arrive (its port is every agent's).
    pub hbone_addr: SocketAddr,
}

/// Who signs workload certificates.
#[derive(Debug, Clone)]
pub enum SignerSource {
    /// The CA directory of `mesh ca init` (standalone: this node holds the root key).
    Files(PathBuf),
    /// The central signer (`mesh ca serve`), trusted by `root`, proving itself as `identity`;
    /// the agent proves itself with the token in `token_file`.
    Remote { addr: String, root: PathBuf, identity: crate::identity::Identity, token_file: PathBuf },
}

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum SourceOptions {
    /// YAML files (a file or a directory), watched. `removal_quiet`: how long a file must stay
    /// the same before objects removed from it are removed.
    Files { config: PathBuf, removal_quiet: Duration },
    /// The Kubernetes API, from this kubeconfig or else the in-cluster service account; the
    /// Lease electing the agent that writes route status and Events is in `lease_namespace`.
    Kubernetes { kubeconfig: Option<PathBuf>, lease_namespace: String },
}

impl std::fmt::Display for SourceOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceOptions::Files { config, .. } => write!(f, "{}", config.display()),
            SourceOptions::Kubernetes { .. } => f.write_str("the Kubernetes API"),
        }
    }
}

/// Why the agent could not start or stop cleanly; each keeps its cause (and errno).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("--config {0}: no such file or directory")]
    NoConfig(PathBuf),
    #[error("{0}")]
    Kube(#[from] crate::sources::kube::KubeError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Bind(#[from] admin::BindError),
    #[error("opening the flow log: {0}")]
    FlowLog(#[source] std::io::Error),
    #[error("opening the access log: {0}")]
    AccessLog(#[source] std::io::Error),
    #[error(transparent)]
    Traces(#[from] traces::EndpointError),
    #[error("taking over from the running agent: {0}")]
    Handoff(#[from] handoff::HandoffError),
    #[error("finding the cgroup v2 mount: {0}")]
    Cgroup(#[source] std::io::Error),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Datapath(#[from] crate::ebpf::DatapathError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error("starting the kernel sync thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("watching {0}: {1}")]
    Watch(PathBuf, #[source] notify::Error),
    #[error("the certificate authority: {0}")]
    Ca(#[from] crate::identity::ca::CaError),
    #[error("removing pins under {0}: {1}")]
    Teardown(PathBuf, #[source] std::io::Error),
    #[error("opening the connection table: {0}")]
    ConnTable(String),
}

/// How often the kernel-written maps are counted for `/metrics` (off the scrape path).
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// What the source side reports, for readiness and the admin API.
#[derive(Debug, Default)]
struct Status {
    /// The store's generation once the source had delivered everything the first time.
    synced_at: Option<u64>,
    generation: u64,
    /// Balanced service ports in the last snapshot.
    services: usize,
    last_applied: Option<SystemTime>,
    /// Origins whose newest content was refused, with why; their last good objects serve.
    rejected: BTreeMap<Origin, ConfigErrors>,
    /// The attached cgroup was removed: the datapath no longer sees any socket.
    cgroup_gone: bool,
    /// What the source still waits for before everything is read once (an API server's
    /// refusal, say).
    waiting: Option<String>,
}

struct Agent {
    opts: AgentOptions,
    cgroup: PathBuf,
    status: Mutex<Status>,
    /// Pinned state was adopted at start: it serves until the configuration is synced.
    adopted: bool,
    sync: watch::Receiver<SyncReport>,
    /// For `/config_dump` and the kernel-written gauges; never held while the kernel syncs.
    maps: Mutex<PinnedMaps>,
    /// Entries of the kernel-written maps, counted on a timer.
    kernel_entries: Mutex<Vec<(&'static str, usize)>>,
    /// Files the source has read, and how many of them `/metrics` has counted.
    file_reads: Mutex<(Arc<std::sync::atomic::AtomicU64>, u64)>,
    telemetry: Arc<Telemetry>,
    /// True once every configuration file has been read: the proxy accepts from then on.
    config_read: watch::Sender<bool>,
    /// The store's newest snapshot (for the pods in `/config_dump`).
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Workload certificates, with mTLS on.
    certs: Option<Arc<crate::identity::certs::Certificates>>,
    authorizer: Arc<Authorizer>,
}

impl Agent {
    fn metrics(&self, method: &Method, path: &str) -> (StatusCode, String) {
        if method != Method::GET || !matches!(path, "/metrics" | "/stats/prometheus") {
            return (StatusCode::NOT_FOUND, "GET /metrics\n".into());
        }
        let metrics = &self.telemetry.metrics;
        let service_maps = self.sync.borrow().entries.clone();
        let kernel_maps = self.kernel_entries.lock().expect("gauges lock").clone();
        for (map, n) in service_maps.into_iter().chain(kernel_maps) {
            metrics.map_entries.get_or_create(&MapLabels { map: map.to_owned() }).set(n as i64);
        }
        {
            let mut reads = self.file_reads.lock().expect("reads lock");
            let now = reads.0.load(std::sync::atomic::Ordering::Relaxed);
            metrics.config_file_reads.inc_by(now.saturating_sub(reads.1));
            reads.1 = now;
        }
        {
            let status = self.status.lock().expect("status lock");
            metrics.config_generation.set(status.generation as i64);
            metrics.config_rejected.set(status.rejected.len() as i64);
            let objects: usize = status.rejected.values().map(ConfigErrors::objects).sum();
            metrics.config_rejected_objects.set(objects as i64);
        }
        metrics.kernel_generation.set(self.sync.borrow().generation as i64);
        let maps = self.maps.lock().expect("maps lock");
        for (reason, index) in [("events", drop_counters::EVENTS), ("conns", drop_counters::CONNS), ("revnat", drop_counters::REVNAT)] {
            metrics.dropped.get_or_create(&DropLabels { reason: reason.to_owned() }).set(maps.drops(index) as i64);
        }
        drop(maps);
        (StatusCode::OK, metrics.encode())
    }

    /// Counts the maps the kernel writes (one syscall per entry for hash maps, so never on the
    /// scrape path).
    fn count_kernel_maps(&self) {
        let counted = self.maps.lock().expect("maps lock").kernel_occupancy();
        match counted {
            Ok(entries) => *self.kernel_entries.lock().expect("gauges lock") = entries,
            Err(e) => tracing::warn!("counting kernel map entries: {e}"),
        }
    }

    fn serving(&self) -> bool {
        let status = self.status.lock().expect("status lock");
        let report = self.sync.borrow();
        // Everything read so far was refused: nothing of this configuration serves.
        let nothing_accepted = status.generation == 0 && !status.rejected.is_empty();
        self.adopted || (!nothing_accepted && status.synced_at.is_some_and(|g| report.runs > 0 && report.generation >= g))
    }

    /// The workload certificates held: identity, serial, validity (RFC 3339).
    fn certificate_rows(&self) -> Vec<serde_json::Value> {
        let Some(certs) = &self.certs else { return Vec::new() };
        let when = |t: SystemTime| telemetry::access_log::Rfc3339(t).to_string();
        certs
            .current()
            .iter()
            .map(|c| {
                let serial = c
                    .certified
                    .end_entity_cert()
                    .ok()
                    .and_then(|der| x509_parser::parse_x509_certificate(der).ok().map(|(_, parsed)| parsed.raw_serial_as_string()));
                serde_json::json!({
                    "identity": c.identity.to_string(),
                    "serial": serial,
                    "issued": when(c.issued_at),
                    "expires": when(c.expires_at),
                })
            })
            .collect()
    }

    fn readiness(&self, _: &Method, path: &str) -> (StatusCode, String) {
        // Liveness is only that the agent answers: an API server away or a refused
        // configuration makes it unready, and restarting it would not help (kubelet's
        // livenessProbe restarts, readinessProbe only reports).
        if path == "/healthz/live" {
            return (StatusCode::OK, "alive\n".into());
        }
        if path != "/healthz/ready" {
            return (StatusCode::NOT_FOUND, "not found\n".into());
        }
        let serving = self.serving();
        let status = self.status.lock().expect("status lock");
        let report = self.sync.borrow().clone();
        let mut body = String::new();
        let code = if status.cgroup_gone {
            body.push_str(&format!("not ready: the attached cgroup {} was removed\n", self.cgroup.display()));
            StatusCode::SERVICE_UNAVAILABLE
        } else if serving {
            body.push_str(&format!(
                "ready: {} services from {} (generation {}, in the kernel: {})\n",
                status.services, self.opts.source, status.generation, report.generation
            ));
            StatusCode::OK
        } else {
            body.push_str("not ready: no valid configuration applied yet\n");
            if let Some(waiting) = &status.waiting {
                body.push_str(&format!("waiting for {waiting}\n"));
            }
            StatusCode::SERVICE_UNAVAILABLE
        };
        if let Some(error) = &report.error {
            body.push_str(&format!("the kernel maps could not be updated; they keep the last good state: {error}\n"));
        }
        if !status.rejected.is_empty() {
            if serving {
                body.push_str("the newest configuration was rejected; serving the last good one:\n");
            } else {
                body.push_str("the configuration was rejected:\n");
            }
            for errors in status.rejected.values() {
                body.push_str(&errors.to_string());
                body.push('\n');
            }
        }
        (code, body)
    }

    fn admin(&self, method: &Method, path: &str, query: &str, caller: &admin::Caller, quit: &watch::Sender<bool>) -> (StatusCode, String) {
        match (method, path) {
            (&Method::GET, "/config_dump") => {
                let maps = self.maps.lock().expect("maps lock");
                let read = maps
                    .read_image()
                    .map_err(|e| e.to_string())
                    .and_then(|image| maps.occupancy().map(|occupancy| (image, occupancy)).map_err(|e| e.to_string()));
                drop(maps);
                match read {
                    Ok((image, mut occupancy)) => {
                        // Pod cgroup id -> the agent's number for the pod, as the kernel holds it.
                        // (The agent's own entry is not a pod's.)
                        let in_kernel: std::collections::HashMap<u64, u32> = WorkloadMap::open(&self.opts.bpffs)
                            .map(|m| {
                                m.entries()
                                    .into_iter()
                                    .filter(|(_, v)| v.id != mesh_common::AGENT_WORKLOAD)
                                    .map(|(c, v)| (c, v.id))
                                    .collect()
                            })
                            .unwrap_or_default();
                        occupancy.insert(mesh_common::map_names::WORKLOADS, in_kernel.len());
                        let status = self.status.lock().expect("status lock");
                        let rejected: Vec<String> = status.rejected.values().map(ConfigErrors::to_string).collect();
                        let dump = serde_json::json!({
                            "node": self.opts.node.node,
                            "zone": self.opts.node.zone,
                            "config": self.opts.source.to_string(),
                            "bpffs": self.opts.bpffs,
                            "generation": status.generation,
                            "kernel_generation": self.sync.borrow().generation,
                            "rejected": if rejected.is_empty() { None } else { Some(rejected) },
                            "services": image.service_rows(),
                            "workloads": self.workload_rows(&in_kernel),
                            // Enrolled pods of other nodes the kernel sends through tunnels.
                            "tunneled": TunneledMap::open(&self.opts.bpffs).map(|m| m.addresses()).unwrap_or_default(),
                            "certificates": self.certificate_rows(),
                            "authorization": authorization_rows(&self.opts.bpffs),
                            "map_entries": occupancy,
                        });
                        (StatusCode::OK, serde_json::to_string_pretty(&dump).expect("json") + "\n")
                    }
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading maps: {e}\n")),
                }
            }
            (&Method::POST, "/quitquitquit") => {
                // Only the agent's own user in the agent's own container (its mount namespace;
                // on a host, the host's) may stop it: any process on the node, and any
                // host-network pod, can reach a loopback port, and such pods often run as root.
                let peer = host::tcp_peer(caller.local, caller.peer);
                if peer.map(|p| p.uid) != Some(host::effective_uid()) {
                    tracing::warn!(peer = %caller.peer, uid = ?peer.map(|p| p.uid), "/quitquitquit refused: not the agent's user");
                    return (StatusCode::FORBIDDEN, "only the agent's user may stop it\n".into());
                }
                if !peer.is_some_and(|p| host::socket_held_in_own_mount_namespace(p.inode)) {
                    tracing::warn!(peer = %caller.peer, "/quitquitquit refused: the caller runs in another container (mount namespace)");
                    return (StatusCode::FORBIDDEN, "only a process in the agent's own container may stop it\n".into());
                }
                tracing::info!(peer = %caller.peer, "stop asked by /quitquitquit");
                let _ = quit.send(true);
                (StatusCode::OK, "shutting down\n".into())
            }
            (&Method::GET, "/authz") => self.authz_check(query),
            _ => (StatusCode::NOT_FOUND, "endpoints: GET /config_dump, GET /authz, POST /quitquitquit\n".into()),
        }
    }

    /// `GET /authz?from=NS/SA&to=...&port=N`: see `authz::check`.
    fn authz_check(&self, query: &str) -> (StatusCode, String) {
        let snapshot = self.snapshots.borrow().clone();
        match authz::check(&self.authorizer, &snapshot, &self.opts.trust_domain, query) {
            Ok(answer) => (StatusCode::OK, serde_json::to_string_pretty(&answer).expect("json") + "\n"),
            Err(authz::CheckError::BadQuery(m)) => (StatusCode::BAD_REQUEST, m + "\n"),
            Err(authz::CheckError::NotFound(m)) => (StatusCode::NOT_FOUND, m + "\n"),
        }
    }

    /// This node's pods: who they are, their cgroup (found now: kubelet makes it when the pod
    /// starts, which may be after the API says the pod exists) and the kernel's number for them.
    fn workload_rows(&self, in_kernel: &std::collections::HashMap<u64, u32>) -> Vec<serde_json::Value> {
        let snapshot = self.snapshots.borrow().clone();
        let mount = host::cgroup2_root().ok();
        snapshot
            .pods
            .values()
            .map(|pod| {
                let spec = &pod.spec;
                let cgroup = host::locate_pod_cgroup(&self.cgroup, mount.as_deref(), spec.cgroup.as_deref(), &spec.uid);
                serde_json::json!({
                    "pod": spec.key.to_string(),
                    "uid": spec.uid,
                    "workload": spec.workload,
                    "service_account": spec.service_account,
                    "labels": spec.labels,
                    "principal": pod.principal(&self.opts.trust_domain),
                    "ips": spec.ips,
                    "host_network": spec.host_network,
                    "enrolled": pod.enrolled,
                    "kernel_id": cgroup.as_ref().and_then(|c| in_kernel.get(&c.id)),
                    "cgroup": cgroup.as_ref().map(|c| c.path.clone()),
                    "cgroup_id": cgroup.map(|c| c.id),
                })
            })
            .collect()
    }

    fn reject(&self, origin: Origin, errors: &ConfigErrors) {
        let mut status = self.status.lock().expect("status lock");
        for e in &errors.0 {
            tracing::error!("configuration rejected: {e}");
        }
        if status.generation > 0 || self.adopted {
            tracing::warn!(%origin, generation = status.generation, "still serving the last good configuration");
        }
        status.rejected.insert(origin, errors.clone());
    }
}

/// The listener for `addr`: the predecessor's, when it handed one over for this address,
/// otherwise a new one.
async fn bind_or_inherit(
    addr: SocketAddr,
    inherited: &mut Option<Vec<(SocketAddr, std::net::TcpListener)>>,
) -> Result<tokio::net::TcpListener, AgentError> {
    if let Some(sockets) = inherited.as_mut()
        && let Some(at) = sockets.iter().position(|(a, _)| *a == addr)
    {
        let (_, socket) = sockets.swap_remove(at);
        socket.set_nonblocking(true).map_err(handoff::HandoffError::Exchange)?;
        return Ok(tokio::net::TcpListener::from_std(socket).map_err(handoff::HandoffError::Exchange)?);
    }
    Ok(admin::bind(addr).await?)
}

/// Loads and attaches the datapath. A successor waits (up to 30 s) for its predecessor to let
/// go of the pin directory; anyone else fails at once if it is in use.
async fn load_when_free(opts: &AgentOptions, cgroup: &Path, successor: bool) -> Result<loader::Loaded, AgentError> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match loader::load_and_attach(&opts.bpffs, cgroup, opts.programs) {
            Err(loader::LoadError::InUse(_)) if successor && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// Offers `sockets` to the next agent; resolves when one took them. Never resolves when they
/// cannot be offered (the restart then is the old kind: the next agent binds anew).
async fn offer_listeners(bpffs: &Path, sockets: &[(SocketAddr, OwnedFd)]) -> std::io::Result<handoff::Successor> {
    let duplicates = || sockets.iter().filter_map(|(a, fd)| Some((*a, fd.try_clone().ok()?))).collect();
    // The predecessor's offer may linger for a moment after it handed over: up to 2 s.
    let mut offer = handoff::Offer::new(bpffs, duplicates());
    for _ in 0..100 {
        if offer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        offer = handoff::Offer::new(bpffs, duplicates());
    }
    match offer {
        Ok(offer) => offer.handed_over().await,
        Err(e) => {
            tracing::warn!(error = %e, "restarts cannot hand over the listeners");
            std::future::pending().await
        }
    }
}

/// How long a handed-over agent goes on serving while its successor starts.
const SUCCESSOR_START_LIMIT: Duration = Duration::from_secs(120);

/// Raises the soft limit of open files to the hard one (the proxy holds two descriptors per
/// proxied connection: use all the hard limit allows); returns the limit now in force.
fn raise_fd_limit() -> Option<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid rlimit buffers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return None;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    Some(limit.rlim_cur)
}

/// File descriptors kept for everything but proxied connections: maps, programs, the admin,
/// readiness and metrics listeners and their clients, config watches.
const RESERVED_FDS: u64 = 256;

/// The proxy's limits under an open-file limit of `nofile`: a proxied connection holds two
/// descriptors (the client's and the endpoint's), and the reserve stays free, so that readiness
/// and metrics answer even while the proxy is full.
fn proxy_limits(nofile: Option<u64>) -> Limits {
    let cap = nofile.map_or(Limits::PROXY.max_connections, |n| (n.saturating_sub(RESERVED_FDS) / 2).max(16) as usize);
    Limits { max_connections: cap.min(Limits::PROXY.max_connections), ..Limits::PROXY }
}

/// Watches the attached cgroup: removed, it takes every socket out of the datapath's sight.
async fn watch_cgroup(agent: Arc<Agent>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let gone = !agent.cgroup.exists();
        let mut status = agent.status.lock().expect("status lock");
        if gone && !status.cgroup_gone {
            tracing::error!(cgroup = %agent.cgroup.display(), "the attached cgroup was removed; no socket is balanced any more");
        }
        status.cgroup_gone = gone;
    }
}

pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    // Handlers first: a SIGTERM that arrives while starting up must still take the clean path.
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let proxy_limits = proxy_limits(raise_fd_limit());
    if let SourceOptions::Files { config, .. } = &opts.source
        && !config.exists()
    {
        return Err(AgentError::NoConfig(config.clone()));
    }
    // The source first: a bad config path or kubeconfig fails before anything is attached.
    // The API server itself may be away: the watchers retry.
    let (source, file_reads) = match &opts.source {
        SourceOptions::Files { config, removal_quiet } => {
            let files = FileSource::new(config, *removal_quiet).map_err(|e| AgentError::Watch(config.clone(), e))?;
            let reads = files.reads();
            (feed::AnySource::Files(files), reads)
        }
        SourceOptions::Kubernetes { kubeconfig, lease_namespace } => {
            let client = crate::sources::kube::client(kubeconfig.as_deref()).await?;
            (
                feed::AnySource::Kube(KubeSource::new(client, opts.node.node.clone(), lease_namespace.clone(), opts.mtls.is_some())),
                Arc::default(),
            )
        }
    };
    // --take-over: a running agent on the same pin directory hands over its listeners (a
    // restart): their sockets, with the connections waiting on them, change hands and are
    // never re-bound. Without it, a running agent makes this one fail (pin directory in use).
    let bpffs = opts.bpffs.clone();
    let taken = if opts.take_over {
        tokio::task::spawn_blocking(move || handoff::take(&bpffs))
            .await
            .map_err(|e| handoff::HandoffError::Exchange(std::io::Error::other(e)))??
    } else {
        None
    };
    let successor = taken.is_some();
    let (mut inherited, predecessor) = match taken {
        Some(taken) => (Some(taken.sockets), Some(taken.predecessor)),
        None => (None, None),
    };
    if successor {
        tracing::info!("took over the listeners of the running agent; it serves until this one does, then drains and leaves");
    }
    // Bind first: a port clash must fail before the datapath is touched.
    let admin_listener = bind_or_inherit(opts.admin_addr, &mut inherited).await?;
    let readiness_listener = bind_or_inherit(opts.readiness_addr, &mut inherited).await?;
    let metrics_listener = bind_or_inherit(opts.metrics_addr, &mut inherited).await?;
    let outbound_listener = bind_or_inherit(opts.outbound_addr, &mut inherited).await?;
    // mTLS: the CA is read before anything is attached (a missing one fails the start).
    let mtls = match &opts.mtls {
        Some(m) => {
            let signer: Arc<dyn crate::identity::ca::Signer> = match &m.signer {
                SignerSource::Files(dir) => Arc::new(crate::identity::ca::FileSigner::new(dir)?),
                SignerSource::Remote { addr, root, identity, token_file } => {
                    Arc::new(crate::signer::RemoteSigner::new(addr.clone(), identity.clone(), root, token_file.clone())?)
                }
            };
            let tunnel = bind_or_inherit(m.tunnel_addr, &mut inherited).await?;
            let hbone = bind_or_inherit(m.hbone_addr, &mut inherited).await?;
            Some((crate::identity::certs::Certificates::new(signer, m.cert_lifetime), tunnel, hbone))
        }
        None => None,
    };
    drop(inherited);
    let mtls_listeners = mtls.iter().flat_map(|(_, tunnel, hbone)| [tunnel, hbone]);
    let offered: Vec<_> = [&admin_listener, &readiness_listener, &metrics_listener, &outbound_listener]
        .into_iter()
        .chain(mtls_listeners)
        .filter_map(|l| handoff::duplicate(l).ok())
        .collect();
    let telemetry = Arc::new(Telemetry::new(&opts.flow_log).map_err(AgentError::FlowLog)?);
    telemetry.set_trust_domain(&opts.trust_domain);
    let access_log = AccessLog::open(&opts.access_log, telemetry.metrics.access_log_dropped.clone()).map_err(AgentError::AccessLog)?;
    let tracer = Tracer::start(&opts.traces, telemetry.metrics.spans_dropped.clone())?;
    let authorizer = Arc::new(Authorizer::new(opts.root_namespace.clone(), telemetry.metrics.authz.clone()));

    let cgroup = match &opts.cgroup {
        Some(c) => c.clone(),
        None => host::cgroup2_root().map_err(AgentError::Cgroup)?,
    };
    let mut loaded = load_when_free(&opts, &cgroup, successor).await?;
    if let Some(logger) = loaded.logger.take() {
        tokio::spawn(forward_kernel_logs(logger));
    }
    tracing::info!(
        start = ?loaded.start,
        cgroup = %cgroup.display(),
        bpffs = %opts.bpffs.display(),
        node = %opts.node.node,
        zone = opts.node.zone.as_deref().unwrap_or("-"),
        sockmap = loaded.redirecting,
        "datapath attached"
    );
    loader::set_proxy(&opts.bpffs, opts.outbound_addr)?;
    loader::set_tunnel(&opts.bpffs, opts.mtls.as_ref().map(|m| m.tunnel_addr))?;
    let reconciler = Reconciler::new(PinnedMaps::open(&opts.bpffs)?)?;
    let adopted = !reconciler.image().is_empty();
    let (report_tx, report_rx) = watch::channel(SyncReport::default());
    let feed = Arc::new(SyncFeed::default());
    let sync_thread = worker::spawn(reconciler, feed.clone(), report_tx).map_err(AgentError::Thread)?;

    let store = Store::new(opts.node.clone());
    let (snapshot_tx, snapshot_rx) = watch::channel(store.snapshot());
    let snapshot_rx_for_agent = snapshot_rx.clone();
    let orig_dst = OrigDstMap::open(&opts.bpffs)?;
    // Tunnels (mTLS on): the L7 proxy's and the tunnel listener's, one pool.
    let tunnels = match &mtls {
        Some((certs, _, hbone)) => Some(TunnelConfig {
            tunnels: Arc::new(Tunnels::new(certs.clone(), telemetry.metrics.hbone.clone())),
            trust_domain: opts.trust_domain.clone(),
            hbone_port: hbone.local_addr().map_or(proxy::hbone::PORT, |a| a.port()),
            callers: Arc::new(TunnelOriginalMap::open(&opts.bpffs)?),
        }),
        None => None,
    };
    // The agent's own connections to pods of this node are registered for their ingress
    // filter (STRICT ports let only these in).
    let dialer = {
        let snapshots = snapshot_rx.clone();
        Arc::new(AgentDialer::new(Arc::new(TrustedMap::open(&opts.bpffs)?), move |ip| snapshots.borrow().pods_by_ip.contains_key(&ip)))
    };
    let mut outbound = Outbound::new(Box::new(orig_dst), Arc::new(AgentConnector(dialer.clone())), snapshot_rx, telemetry.clone())
        .with_default_request_timeout(opts.default_request_timeout)
        .with_authorization(proxy::authorize::RequestAuthz::new(authorizer.clone()))
        .with_access_log(access_log)
        .with_tracer(tracer);
    if let Some(tunnels) = &tunnels {
        outbound = outbound.with_tunnels(tunnels.clone());
    }
    let outbound = Arc::new(outbound);
    let agent = Arc::new(Agent {
        opts: opts.clone(),
        cgroup: cgroup.clone(),
        status: Mutex::new(Status::default()),
        adopted,
        sync: report_rx.clone(),
        maps: Mutex::new(PinnedMaps::open(&opts.bpffs)?),
        kernel_entries: Mutex::new(Vec::new()),
        file_reads: Mutex::new((file_reads, 0)),
        telemetry: telemetry.clone(),
        config_read: watch::Sender::new(false),
        snapshots: snapshot_rx_for_agent,
        certs: mtls.as_ref().map(|(certs, _, _)| certs.clone()),
        authorizer: authorizer.clone(),
    });
    if adopted {
        tracing::info!("adopted pinned service state; it serves until the configuration is applied");
    }

    let source_task = tokio::spawn(feed::run_source(agent.clone(), source, store, feed.clone(), snapshot_tx));
    let ids_task = tokio::spawn({
        let (mut report, telemetry) = (report_rx, telemetry.clone());
        async move {
            while report.changed().await.is_ok() {
                let ids = report.borrow_and_update().service_ids.clone();
                telemetry.set_service_ids(ids);
            }
        }
    });
    let gauges_task = tokio::spawn({
        let agent = agent.clone();
        async move {
            let mut tick = tokio::time::interval(GAUGE_INTERVAL);
            loop {
                tick.tick().await;
                let agent = agent.clone();
                let _ = tokio::task::spawn_blocking(move || agent.count_kernel_maps()).await;
            }
        }
    });
    let cgroup_task = tokio::spawn(watch_cgroup(agent.clone()));
    let workload_sync = crate::sync::workloads::WorkloadSync::new(WorkloadMap::open(&opts.bpffs)?, cgroup.clone())
        .with_kubelet(opts.kubelet_cgroup.clone());
    let (numbered_tx, numbered_rx) = watch::channel(imbl::HashMap::new());
    let workloads_task = tokio::spawn(crate::sync::workloads::run(workload_sync, agent.snapshots.clone(), telemetry.clone(), numbered_tx));
    let authz_planner = crate::sync::authz::AuthzPlanner::new(authorizer.clone(), opts.trust_domain.clone());
    let authz_task = tokio::spawn(crate::sync::authz::run(
        AuthzMaps::open(&opts.bpffs)?,
        authz_planner,
        agent.snapshots.clone(),
        numbered_rx,
        telemetry.clone(),
        Some(loader::IngressSwitch::new(&opts.bpffs, &cgroup)),
        Some(crate::sync::authz::Closing {
            review: Arc::new(crate::sync::authz::review::ConnectionReview::new(
                crate::ebpf::conn_table::ConnTable::open(&opts.bpffs).map_err(AgentError::ConnTable)?,
                cgroup.clone(),
            )),
            config_read: agent.config_read.subscribe(),
        }),
    ));
    let telemetry_task = tokio::spawn(telemetry::run(telemetry.clone(), opts.bpffs.clone()));
    let mut tunneled = TunneledMap::open(&opts.bpffs)?;
    let tunnels_task = match &mtls {
        Some(_) => tokio::spawn(crate::sync::tunnels::run(tunneled, agent.snapshots.clone(), opts.root_namespace.clone())),
        None => {
            // mTLS off (now, or since the last agent): nothing is tunneled.
            if let Err(e) = tunneled.sync(&Default::default()) {
                tracing::warn!("clearing mesh_tunneled: {e}");
            }
            tokio::spawn(async {})
        }
    };

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let lifecycle = Lifecycle { ready: agent.config_read.subscribe(), drain: shutdown_rx.clone(), drain_timeout: opts.drain_timeout };
    let (quit_tx, mut quit_rx) = watch::channel(false);
    let readiness_handler: admin::Handler = {
        let agent = agent.clone();
        Arc::new(move |m, uri, _| agent.readiness(m, uri.path()))
    };
    let admin_handler: admin::Handler = {
        let agent = agent.clone();
        Arc::new(move |m, uri, caller| agent.admin(m, uri.path(), uri.query().unwrap_or_default(), caller, &quit_tx))
    };
    let metrics_handler: admin::Handler = {
        let agent = agent.clone();
        Arc::new(move |m, uri, _| agent.metrics(m, uri.path()))
    };
    let mut servers = vec![
        tokio::spawn(admin::serve("admin", admin_listener, admin_handler, shutdown_rx.clone())),
        tokio::spawn(admin::serve("readiness", readiness_listener, readiness_handler, shutdown_rx.clone())),
        tokio::spawn(admin::serve("metrics", metrics_listener, metrics_handler, shutdown_rx.clone())),
        tokio::spawn(proxy::outbound::serve(outbound, outbound_listener, proxy_limits, lifecycle.clone())),
    ];
    let mut certs_task = None;
    if let Some((certs, tunnel_listener, hbone_listener)) = mtls {
        let trust_domain = opts.trust_domain.clone();
        let hbone_metrics = telemetry.metrics.hbone.clone();
        let workloads = Arc::new(SnapshotWorkloads::new(agent.snapshots.clone(), trust_domain.clone(), authorizer.clone()));
        let inbound = Arc::new(
            Inbound::new(certs.clone(), trust_domain.clone(), workloads, hbone_metrics.clone())
                .with_dialer(dialer.clone())
                .on_carried(proxy::tunnel::inbound_reporter(agent.snapshots.clone(), telemetry.clone())),
        );
        servers.push(tokio::spawn(review_on_policy_change(inbound.clone(), agent.snapshots.clone())));
        if let Ok(addr) = tunnel_listener.local_addr() {
            telemetry.set_tunnel_listener(addr);
        }
        let tunnels = tunnels.expect("made with mtls");
        let tunnel = TunnelOutbound::new(
            Box::new(TunnelOriginalMap::open(&opts.bpffs)?),
            tunnels.tunnels.clone(),
            agent.snapshots.clone(),
            telemetry.clone(),
            trust_domain.clone(),
        )
        .with_hbone_port(tunnels.hbone_port)
        .with_local_node(own_hbone_address(&hbone_listener, tunnels.hbone_port));
        servers.push(tokio::spawn(proxy::hbone::serve(inbound, hbone_listener, proxy_limits.max_connections, lifecycle.clone())));
        servers.push(tokio::spawn(proxy::tunnel::serve(Arc::new(tunnel), tunnel_listener, proxy_limits.max_connections, lifecycle)));
        // Certificates of workloads that left the node are no longer renewed.
        let mut snapshots = agent.snapshots.clone();
        certs_task = Some(tokio::spawn(async move {
            while snapshots.changed().await.is_ok() {
                let enrolled = SnapshotWorkloads::identities(&snapshots.borrow_and_update(), &trust_domain);
                certs.retain(|identity| enrolled.contains(identity));
            }
        }));
    }
    drop(shutdown_rx);
    // Taken over: once this agent accepts (its configuration read), the predecessor may stop.
    if let Some(predecessor) = predecessor {
        let mut read = agent.config_read.subscribe();
        tokio::spawn(async move {
            if read.wait_for(|r| *r).await.is_ok() {
                tracing::info!("serving: the previous agent stops accepting now");
                predecessor.serving();
            }
        });
    }
    // The next agent on this pin directory takes the listeners from here.
    let handed_over = offer_listeners(&opts.bpffs, &offered);
    tokio::pin!(handed_over);
    tracing::info!(
        admin = %opts.admin_addr,
        readiness = %opts.readiness_addr,
        metrics = %opts.metrics_addr,
        outbound = %opts.outbound_addr,
        max_proxied_connections = proxy_limits.max_connections,
        "serving"
    );

    let mut successor = None;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM"),
        _ = sigint.recv() => tracing::info!("SIGINT"),
        _ = quit_rx.changed() => tracing::info!("/quitquitquit"),
        result = &mut handed_over => {
            successor = result.ok();
            if successor.is_some() {
                tracing::info!("a new agent took the listeners; stopping here and leaving the datapath to it");
            }
        }
    }
    let handed = successor.is_some();

    for task in [source_task, ids_task, gauges_task, cgroup_task, telemetry_task, workloads_task, tunnels_task, authz_task]
        .into_iter()
        .chain(certs_task)
    {
        task.abort();
    }
    feed.stop();
    let _ = tokio::task::spawn_blocking(move || sync_thread.join()).await;
    // Handed over: the successor waits for the pin directory; it is free before the drain.
    let mut lock = loaded.take_lock();
    if handed {
        drop(lock.take());
    }
    // Until the successor accepts, this agent goes on accepting and serving with what it knows.
    if let Some(successor) = successor {
        let state = successor.serving(SUCCESSOR_START_LIMIT).await;
        tracing::info!(successor = ?state, "the new agent serves (or will not); this one stops accepting");
    }
    // Stop accepting, let requests in flight finish (bounded by --drain-timeout-ms).
    let _ = shutdown_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    drop(agent);
    drop(loaded);
    if opts.keep_datapath || handed {
        tracing::info!(bpffs = %opts.bpffs.display(), "--keep-datapath: programs stay attached and maps pinned");
    } else {
        loader::teardown(&opts.bpffs).map_err(|e| AgentError::Teardown(opts.bpffs.clone(), e))?;
        tracing::info!("datapath detached and unpinned");
    }
    drop(lock);
    Ok(())
}

/// Copies the kernel programs' log records (aya-log's ring buffer) into the agent's log.
async fn forward_kernel_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns its ring buffer's descriptor, which stays open and the same for
    // as long as the AsyncFd owns the logger.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let Ok(mut fd) = registered else {
        tracing::warn!("cannot poll the kernel log ring buffer; --bpf-log has no effect");
        return;
    };
    while let Ok(mut ready) = fd.readable_mut().await {
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// What the kernel holds of the policies: the pods under AuthorizationPolicy by class, how
/// many verdicts, and the STRICT ports.
fn authorization_rows(bpffs: &std::path::Path) -> serde_json::Value {
    let Ok(maps) = AuthzMaps::open(bpffs) else { return serde_json::Value::Null };
    let strict: Vec<serde_json::Value> = maps
        .strict()
        .iter()
        .map(|(k, v)| {
            serde_json::json!({
                "address": crate::ebpf::image::ip_of(&k.addr).to_string(),
                "port": if k.port == 0 { None } else { Some(k.port) },
                "mode": if v.strict != 0 { "STRICT" } else { "PERMISSIVE" },
            })
        })
        .collect();
    serde_json::json!({
        "pods_under_policy": maps.classes().iter().map(|(ip, class)| serde_json::json!({"address": ip.to_string(), "class": class})).collect::<Vec<_>>(),
        "verdicts": maps.verdicts().len(),
        // Address blocks of classes whose policies look at senders' addresses.
        "sender_blocks": maps.senders().len(),
        "strict": strict,
        // Whether connections a policy change denies can be closed (else only new ones are
        // refused), and why not.
        "closes_established": crate::host::sock_diag::probe().map_or_else(|e| serde_json::json!(e.to_string()), |()| serde_json::json!(true)),
    })
}

/// Where this agent's own HBONE listener is reached from this node: its address, or loopback
/// when it listens on every address.
fn own_hbone_address(listener: &tokio::net::TcpListener, port: u16) -> std::net::SocketAddr {
    match listener.local_addr() {
        Ok(addr) if addr.ip().is_unspecified() => std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()),
        Ok(addr) => addr,
        Err(_) => std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port),
    }
}

/// Decides again on the HBONE streams open when the policies or this node's pods change (a
/// relabelled pod may now be selected), closing those now denied.
async fn review_on_policy_change(inbound: Arc<Inbound>, mut snapshots: watch::Receiver<Arc<Snapshot>>) {
    let mut seen = snapshots.borrow().clone();
    while snapshots.changed().await.is_ok() {
        let now = snapshots.borrow_and_update().clone();
        if Arc::ptr_eq(&now.policies, &seen.policies) && now.pods.ptr_eq(&seen.pods) {
            continue;
        }
        seen = now;
        let closed = inbound.review();
        if closed > 0 {
            tracing::info!(closed, "policy change: closed the tunnel streams it now denies");
        }
    }
}
