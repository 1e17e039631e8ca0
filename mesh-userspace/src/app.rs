//! `mesh agent`: wires the datapath, the config source, reconciliation and the admin servers,
//! and takes them down in order on SIGTERM.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use hyper::{Method, StatusCode};
use tokio::{signal::unix::SignalKind, sync::watch};

use mesh_common::drop_counters;

use crate::{
    admin,
    ebpf::{loader, maps::PinnedMaps},
    host, sources,
    proxy::{
        self,
        outbound::{L7State, Outbound},
    },
    state::{Catalog, LbService, NodeContext, catalog::ObjectKey, desired_services},
    sync::{MapImage, Reconciler, frontend_key},
    telemetry::{
        self, FlowLog, Telemetry,
        identity::{Identities, Named},
        metrics::{DropLabels, MapLabels},
    },
};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub config: PathBuf,
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
}

/// What readiness and the admin API report.
#[derive(Debug, Default)]
struct Status {
    /// A configuration has been applied (or adopted) and is serving.
    serving: bool,
    generation: u64,
    last_applied: Option<SystemTime>,
    services: usize,
    /// The newest configuration's problems, when it was rejected.
    rejected: Option<String>,
}

struct Agent {
    opts: AgentOptions,
    reconciler: Mutex<Reconciler<PinnedMaps>>,
    status: Mutex<Status>,
    /// The sources last applied or rejected, to skip events that changed nothing.
    last_sources: Mutex<Option<Vec<(PathBuf, String)>>>,
    telemetry: Arc<Telemetry>,
    outbound: Arc<Outbound>,
}

impl Agent {
    /// Reads the configuration and applies it whole, or not at all.
    fn reload(&self) {
        let started = std::time::Instant::now();
        let sources = match sources::file::read_sources(&self.opts.config) {
            Ok(sources) => sources,
            Err(e) => return self.reject(e.to_string()),
        };
        {
            // Watch events also fire for files we skip and for rewrites with equal content.
            let mut last = self.last_sources.lock().expect("sources lock");
            if last.as_ref() == Some(&sources) {
                tracing::debug!("configuration unchanged");
                return;
            }
            *last = Some(sources.clone());
        }
        let result = Catalog::from_sources(sources.iter().map(|(p, t)| (p.as_path(), t.as_str())))
            .map_err(|e| e.to_string())
            .and_then(|catalog| {
                let desired = desired_services(&catalog, &self.opts.node);
                let mut reconciler = self.reconciler.lock().expect("reconciler lock");
                let stats = reconciler.reconcile(&desired).map_err(|e| e.to_string())?;
                let by_id = service_ids(&desired, reconciler.image());
                self.update_identities(&catalog, &by_id);
                let services = desired.len();
                *self.outbound.state.write().expect("l7 state lock") = Arc::new(L7State::new(catalog, desired, by_id));
                Ok((services, stats))
            });
        let mut status = self.status.lock().expect("status lock");
        match result {
            Ok((services, stats)) => {
                status.serving = true;
                status.generation += 1;
                status.last_applied = Some(SystemTime::now());
                status.services = services;
                status.rejected = None;
                tracing::info!(
                    services,
                    writes = stats.writes,
                    deletes = stats.deletes,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    generation = status.generation,
                    "configuration applied"
                );
            }
            Err(errors) => {
                drop(status);
                self.reject(errors);
            }
        }
    }

    /// Names for the metric labels of connections to the services just applied.
    fn update_identities(&self, catalog: &Catalog, by_id: &HashMap<u32, ObjectKey>) {
        let services = by_id
            .iter()
            .map(|(sid, key)| (*sid, Named { name: key.name.clone(), namespace: key.namespace.clone() }))
            .collect();
        self.telemetry.set_identities(Identities { services, workloads: Identities::workloads_of(catalog) });
    }

    fn metrics(&self, method: &Method, path: &str) -> (StatusCode, String) {
        if method != Method::GET || !matches!(path, "/metrics" | "/stats/prometheus") {
            return (StatusCode::NOT_FOUND, "GET /metrics\n".into());
        }
        let metrics = &self.telemetry.metrics;
        {
            let reconciler = self.reconciler.lock().expect("reconciler lock");
            let maps = reconciler.datapath();
            if let Ok(occupancy) = maps.occupancy() {
                for (map, n) in occupancy {
                    metrics.map_entries.get_or_create(&MapLabels { map: map.to_owned() }).set(n as i64);
                }
            }
            for (reason, index) in [("events", drop_counters::EVENTS), ("conns", drop_counters::CONNS)] {
                metrics.dropped.get_or_create(&DropLabels { reason: reason.to_owned() }).set(maps.drops(index) as i64);
            }
        }
        (StatusCode::OK, metrics.encode())
    }

    fn reject(&self, errors: String) {
        let mut status = self.status.lock().expect("status lock");
        for line in errors.lines() {
            tracing::error!("configuration rejected: {line}");
        }
        if status.serving {
            tracing::warn!(generation = status.generation, "still serving the last good configuration");
        }
        status.rejected = Some(errors);
    }

    fn readiness(&self, _: &Method, path: &str) -> (StatusCode, String) {
        if path != "/healthz/ready" {
            return (StatusCode::NOT_FOUND, "not found\n".into());
        }
        let status = self.status.lock().expect("status lock");
        let mut body = String::new();
        let code = if status.serving {
            body.push_str(&format!(
                "ready: {} services from {} (generation {})\n",
                status.services,
                self.opts.config.display(),
                status.generation
            ));
            StatusCode::OK
        } else {
            body.push_str("not ready: no valid configuration applied yet\n");
            StatusCode::SERVICE_UNAVAILABLE
        };
        if let Some(rejected) = &status.rejected {
            if status.serving {
                body.push_str("the newest configuration was rejected; serving the last good one:\n");
            } else {
                body.push_str("the configuration was rejected:\n");
            }
            body.push_str(rejected);
            body.push('\n');
        }
        (code, body)
    }

    fn admin(&self, method: &Method, path: &str, quit: &watch::Sender<bool>) -> (StatusCode, String) {
        match (method, path) {
            (&Method::GET, "/config_dump") => {
                let reconciler = self.reconciler.lock().expect("reconciler lock");
                let read = reconciler.kernel_image().map_err(|e| e.to_string()).and_then(|image| {
                    reconciler.datapath().occupancy().map(|occupancy| (image, occupancy)).map_err(|e| e.to_string())
                });
                drop(reconciler);
                match read {
                    Ok((image, occupancy)) => {
                        let status = self.status.lock().expect("status lock");
                        let dump = serde_json::json!({
                            "node": self.opts.node.node,
                            "zone": self.opts.node.zone,
                            "config": self.opts.config,
                            "bpffs": self.opts.bpffs,
                            "generation": status.generation,
                            "rejected": status.rejected,
                            "services": image.service_rows(),
                            "map_entries": occupancy,
                        });
                        (StatusCode::OK, serde_json::to_string_pretty(&dump).expect("json") + "\n")
                    }
                    Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("reading maps: {e}\n")),
                }
            }
            (&Method::POST, "/quitquitquit") => {
                let _ = quit.send(true);
                (StatusCode::OK, "shutting down\n".into())
            }
            _ => (StatusCode::NOT_FOUND, "endpoints: GET /config_dump, POST /quitquitquit\n".into()),
        }
    }
}

/// The proxy holds two descriptors per proxied connection: use all the hard limit allows.
fn raise_fd_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid rlimit buffers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Kernel service id → the Service, for every balanced service just applied.
fn service_ids(desired: &[LbService], image: &MapImage) -> HashMap<u32, ObjectKey> {
    desired
        .iter()
        .filter_map(|svc| {
            let sid = image.frontends.get(&frontend_key(svc.frontend, svc.key.protocol.ip_proto()))?;
            Some((*sid, svc.key.service.clone()))
        })
        .collect()
}

pub async fn run(opts: AgentOptions) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives while starting up must still take the clean path.
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    raise_fd_limit();
    // Bind first: a port clash must fail before the datapath is touched.
    let admin_listener = admin::bind(opts.admin_addr).await?;
    let readiness_listener = admin::bind(opts.readiness_addr).await?;
    let metrics_listener = admin::bind(opts.metrics_addr).await?;
    let outbound_listener = admin::bind(opts.outbound_addr).await?;
    let telemetry = Arc::new(Telemetry::new(&opts.flow_log).context("opening the flow log")?);

    let cgroup = match &opts.cgroup {
        Some(c) => c.clone(),
        None => host::cgroup2_root().context("finding the cgroup v2 mount")?,
    };
    let mut loaded = loader::load_and_attach(&opts.bpffs, &cgroup, opts.programs)?;
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
    let outbound = Arc::new(Outbound::new(&opts.bpffs, telemetry.clone()).map_err(anyhow::Error::msg)?);
    let maps = PinnedMaps::open(&opts.bpffs)?;
    let reconciler = Reconciler::new(maps)?;
    let adopted = !reconciler.kernel_image()?.is_empty();
    let agent = Arc::new(Agent {
        opts: opts.clone(),
        reconciler: Mutex::new(reconciler),
        status: Mutex::new(Status { serving: adopted, ..Default::default() }),
        last_sources: Mutex::new(None),
        telemetry: telemetry.clone(),
        outbound: outbound.clone(),
    });
    if adopted {
        tracing::info!("adopted pinned service state; it serves until the configuration is applied");
    }

    let (watcher, mut changes) = sources::file::watch(&opts.config, Duration::from_millis(20))
        .with_context(|| format!("watching {}", opts.config.display()))?;
    agent.reload();
    let telemetry_task = tokio::spawn(telemetry::run(telemetry, opts.bpffs.clone()));

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (quit_tx, mut quit_rx) = watch::channel(false);
    let readiness_handler: admin::Handler = {
        let agent = agent.clone();
        Arc::new(move |m, p| agent.readiness(m, p))
    };
    let admin_handler: admin::Handler = {
        let agent = agent.clone();
        Arc::new(move |m, p| agent.admin(m, p, &quit_tx))
    };
    let metrics_handler: admin::Handler = {
        let agent = agent.clone();
        Arc::new(move |m, p| agent.metrics(m, p))
    };
    let servers = [
        tokio::spawn(admin::serve(admin_listener, admin_handler, shutdown_rx.clone())),
        tokio::spawn(admin::serve(readiness_listener, readiness_handler, shutdown_rx.clone())),
        tokio::spawn(admin::serve(metrics_listener, metrics_handler, shutdown_rx.clone())),
        tokio::spawn(proxy::outbound::serve(outbound, outbound_listener, shutdown_rx)),
    ];
    tracing::info!(admin = %opts.admin_addr, readiness = %opts.readiness_addr, metrics = %opts.metrics_addr, "serving");

    loop {
        tokio::select! {
            Some(()) = changes.recv() => agent.reload(),
            _ = sigterm.recv() => { tracing::info!("SIGTERM"); break }
            _ = sigint.recv() => { tracing::info!("SIGINT"); break }
            _ = quit_rx.changed() => { tracing::info!("/quitquitquit"); break }
        }
    }

    drop(watcher);
    telemetry_task.abort();
    let _ = shutdown_tx.send(true);
    for server in servers {
        let _ = server.await;
    }
    drop(agent);
    drop(loaded);
    if opts.keep_datapath {
        tracing::info!(bpffs = %opts.bpffs.display(), "--keep-datapath: programs stay attached and maps pinned");
    } else {
        loader::teardown(&opts.bpffs).with_context(|| format!("removing pins under {}", opts.bpffs.display()))?;
        tracing::info!("datapath detached and unpinned");
    }
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
