//! The `mesh` command line.
#![forbid(unsafe_code)]
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{app, check, ebpf::Datapath as _, ebpf::maps::PinnedMaps, host, state::NodeContext};

/// Off until `cargo xtask bench l4` shows redirection pays on this kind of machine (see the
/// README's benchmark section).
const SOCKMAP_DEFAULT: bool = false;

#[derive(Debug, Parser)]
#[command(name = "mesh", version, about = "eBPF-accelerated, sidecarless service mesh")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start")]
enum Command {
    /// Run the node agent: load the kernel programs and keep them in line with the config.
    Agent(AgentArgs),
    /// Preflight: can this host run mesh? Exits non-zero naming what is missing.
    Check {
        #[arg(long)]
        json: bool,
    },
    /// Print the services the kernel balances, read from the pinned maps.
    Services {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = host::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Print live TCP connections of the attached cgroup, read from the pinned maps.
    Conns {
        #[arg(long)]
        json: bool,
        /// Redraw every second until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value = host::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Print the attached kernel programs: ids, sizes, and how often they ran and for how
    /// long (the datapath's CPU cost), read through the pinned links.
    Programs {
        #[arg(long)]
        json: bool,
        /// Turn the kernel's BPF run-time statistics on for SECS seconds and show what ran.
        #[arg(long, value_name = "SECS")]
        sample: Option<f64>,
        #[arg(long, default_value = host::DEFAULT_BPFFS_DIR)]
        bpffs: PathBuf,
    },
    /// Authorization: what the running agent's policies decide.
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// The certificate authority of workload identities.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Write a new root (P-256) and its key (mode 0600) into DIR for `mesh agent --ca-dir DIR`.
    /// Refuses to overwrite a CA. To rotate: move the old root-cert.pem to trust-bundle.pem,
    /// init a new root beside it, and remove the bundle once no certificate of the old root lives.
    Init {
        dir: PathBuf,
        #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
        trust_domain: String,
        /// How long the root is valid.
        #[arg(long, default_value = "3650d", value_name = "DURATION", value_parser = parse_root_lifetime)]
        lifetime: std::time::Duration,
    },
    /// The central signer for Kubernetes: signs an agent's request for an identity only if a
    /// pod of that identity runs on the agent's node (checked with a TokenReview and the pods).
    Serve {
        /// The CA directory (the root's key lives only here).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
        trust_domain: String,
        /// The signer's own identity (agents check it): default spiffe://<trust domain>/ns/mesh-system/sa/mesh-ca.
        #[arg(long, value_name = "SPIFFE ID")]
        identity: Option<String>,
        /// The agents' service account, `namespace/name` (repeat for more).
        #[arg(long = "agent-service-account", default_value = "mesh-system/mesh", value_name = "NS/NAME")]
        agents: Vec<String>,
        /// The kubeconfig to use (default: the pod's service account).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
    },
}

fn parse_root_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let days = s.strip_suffix('d').and_then(|d| d.parse::<u64>().ok()).filter(|d| (1..=36_500).contains(d));
    days.map(|d| std::time::Duration::from_secs(d * 86_400)).ok_or_else(|| format!("{s:?}: a number of days from 1d to 36500d"))
}

#[derive(Debug, Subcommand)]
enum AuthzCommand {
    /// Print the decision for a caller and each workload behind a Service or pod, and the
    /// policy and rule that made it, from the running agent's live state (its admin API).
    /// Exits 0 when every workload allows, 1 when one denies.
    Check {
        /// The caller's identity, NAMESPACE/SERVICEACCOUNT; without it, a plaintext caller.
        #[arg(long, value_name = "NS/SA")]
        from: Option<String>,
        /// A Service or pod (NAMESPACE/NAME) or a pod address, and the port: `default/web:80`,
        /// `10.1.0.5:8080`, `[fd00::5]:8080`.
        #[arg(long, value_name = "TARGET:PORT")]
        to: String,
        /// A request's method, path and host, for rules that need them (L7 Services).
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[arg(long)]
        host: Option<String>,
        /// The caller's address, for ipBlocks.
        #[arg(long, value_name = "IP")]
        source_ip: Option<std::net::IpAddr>,
        #[arg(long)]
        json: bool,
        /// The agent's admin API.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin_addr: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a YAML file or directory as the agent would, without applying it.
    Validate { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    Files,
    Kubernetes,
}

#[derive(Debug, clap::Args)]
struct AgentArgs {
    /// Where Services, EndpointSlices and routes come from: YAML files (`--config`) or the
    /// Kubernetes API server (the DaemonSet's choice).
    #[arg(long, value_enum, default_value = "files")]
    source: SourceKind,
    /// With `--source files`: a multi-document YAML file, or a directory of them, holding v1
    /// Services, discovery.k8s.io/v1 EndpointSlices and Gateway API routes. Watched for changes.
    #[arg(long, required_if_eq("source", "files"))]
    config: Option<PathBuf>,
    /// With `--source kubernetes`: the kubeconfig to use (default: the pod's service account,
    /// then KUBECONFIG or ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The trust domain of workload identities: `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, default_value = "cluster.local", value_name = "DOMAIN")]
    trust_domain: String,
    /// The namespace whose AuthorizationPolicies and PeerAuthentications apply mesh-wide
    /// (Istio's root namespace).
    #[arg(long, default_value = crate::authz::DEFAULT_ROOT_NAMESPACE, value_name = "NAMESPACE")]
    root_namespace: String,
    /// The kubelet's cgroup, under the cgroup v2 mount: its probes reach pods under policy and
    /// STRICT ports in plaintext, as Istio lets them. "" for none (probes are then callers
    /// without identity).
    #[arg(long, default_value = "system.slice/kubelet.service", value_name = "PATH")]
    kubelet_cgroup: PathBuf,
    /// With `--source kubernetes`: the namespace of the Lease that picks the one agent writing
    /// route status and Events (the agent's own namespace).
    #[arg(long, default_value = "mesh-system", value_name = "NAMESPACE")]
    lease_namespace: String,
    /// The cgroup v2 directory to attach to (default: the cgroup v2 root).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// This node's name, for internalTrafficPolicy: Local (default: the hostname).
    #[arg(long)]
    node: Option<String>,
    /// This node's zone, for trafficDistribution: PreferClose.
    #[arg(long)]
    zone: Option<String>,
    /// Where programs' links and maps are pinned.
    #[arg(long, default_value = host::DEFAULT_BPFFS_DIR)]
    bpffs: PathBuf,
    /// Admin API (/config_dump), localhost only by default.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Readiness probe (/healthz/ready). Localhost by default: the agent runs with the node's
    /// network, and kubelet probes it there (`httpGet.host: 127.0.0.1`).
    #[arg(long, default_value = "127.0.0.1:15021")]
    readiness_addr: SocketAddr,
    /// On exit, leave programs attached and maps pinned so traffic keeps flowing; the next
    /// agent adopts them.
    #[arg(long)]
    keep_datapath: bool,
    /// The outbound proxy: connections to L7 Services (an HTTPRoute attaches, or
    /// mesh.dev/l7: "true") are sent here. On Kubernetes use an address pods can reach.
    #[arg(long, default_value = "127.0.0.1:15001")]
    outbound_addr: SocketAddr,
    /// Prometheus metrics (/metrics), on every interface for Prometheus to scrape; the same
    /// connection limits and timeouts as every listener apply.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Write a JSON line per closed connection to this file, or `-` for stdout.
    #[arg(long, default_value = "off")]
    flow_log: crate::telemetry::FlowLog,
    /// Same-node redirection: payload between two local sockets of the cgroup goes socket to
    /// socket past TCP/IP (sockhash + sk_msg, kernel 5.15+).
    #[arg(long, action = clap::ArgAction::Set, default_value_t = SOCKMAP_DEFAULT)]
    sockmap: bool,
    /// Threads of the agent's runtime (proxy, admin, telemetry).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    worker_threads: u16,
    /// Log level of the kernel programs (their records join this log). Off costs nothing.
    #[arg(long, value_enum, default_value = "off")]
    bpf_log: crate::ebpf::loader::BpfLogLevel,
    /// Slots of the live-connection table in use (a power of two): fewer only to test the
    /// overflow map.
    #[arg(long, hide = true, default_value_t = mesh_common::sizes::CONN_SLOTS, value_parser = parse_conn_slots)]
    conn_slots: u32,
    /// How long a config file must stay the same before objects removed from it are removed
    /// (a writer may be half-way through it).
    #[arg(long, hide = true, default_value_t = 500)]
    removal_quiet_ms: u64,
    /// Export the proxy's spans (one per request, one per attempt) to this OTLP/HTTP traces
    /// endpoint, e.g. `http://otel-collector.observability:4318/v1/traces`. Off by default.
    #[arg(long, value_name = "URL")]
    otlp_traces: Option<String>,
    /// The share of requests without a sampled or unsampled parent (`traceparent`) that start a
    /// traced trace; a parent's decision is always followed.
    #[arg(long, default_value_t = 0.01, value_name = "RATIO", value_parser = parse_ratio)]
    trace_sampling: f64,
    /// One JSON line per proxied request: a file (appended to) or `-` for stdout. Off by
    /// default; lines the writer cannot keep up with are dropped and counted, never waited for.
    #[arg(long, default_value = "off", value_name = "FILE|-")]
    access_log: crate::telemetry::access_log::Target,
    /// Restart without refusing a connection: take the listening sockets of the agent running
    /// on the same --bpffs, then its pin directory (it leaves the datapath to this one, serves
    /// until this one serves, then drains and exits).
    #[arg(long)]
    take_over: bool,
    /// On SIGTERM (or when a new agent takes over), how long proxied connections may take to
    /// finish their requests in flight before they are cut.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    drain_timeout_ms: u64,
    /// mTLS between nodes: sign workload certificates from this CA directory (`mesh ca init`)
    /// and carry enrolled pods' connections to enrolled pods of other nodes over HBONE.
    #[arg(long, value_name = "DIR", conflicts_with = "ca_addr")]
    ca_dir: Option<PathBuf>,
    /// mTLS between nodes, with certificates from the central signer (`mesh ca serve`) at
    /// HOST:PORT instead of a CA directory; needs --ca-root.
    #[arg(long, value_name = "HOST:PORT", requires = "ca_root")]
    ca_addr: Option<String>,
    /// With --ca-addr: the root certificate (PEM) the signer's certificate chains to.
    #[arg(long, value_name = "FILE")]
    ca_root: Option<PathBuf>,
    /// With --ca-addr: the signer's identity, checked on its certificate.
    #[arg(long, value_name = "SPIFFE ID")]
    ca_identity: Option<String>,
    /// With --ca-addr: the service account token sent to the signer (read at each request:
    /// kubelet rotates it).
    #[arg(long, value_name = "FILE", default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token")]
    ca_token_file: PathBuf,
    /// Lifetime of workload certificates (renewed at half-life): 24h by default, 10s to 90d.
    #[arg(long, default_value = "24h", value_name = "DURATION", value_parser = parse_lifetime)]
    cert_lifetime: std::time::Duration,
    /// With --ca-dir: where the kernel sends tunneled connections (an address pods can reach).
    #[arg(long, default_value = "127.0.0.1:15002")]
    tunnel_addr: SocketAddr,
    /// With --ca-dir: where peer agents' HBONE tunnels arrive; every agent uses the same port.
    #[arg(long, default_value = "0.0.0.0:15008")]
    hbone_addr: SocketAddr,
    /// How long a proxied request may take when its HTTPRoute rule sets no `timeouts.request`
    /// (0: no limit). A route's own timeout, `0s` included, always wins.
    #[arg(long, default_value_t = 15_000, value_name = "MS")]
    default_request_timeout_ms: u64,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("must be a number from 0 to 1, got {s:?}")),
    }
}

/// `90s`, `30m`, `24h`, `7d`: between 10 seconds (for tests) and 90 days.
fn parse_lifetime(s: &str) -> Result<std::time::Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d)"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let lifetime = std::time::Duration::from_secs(seconds);
    let (min, max) = (crate::identity::ca::MIN_LIFETIME, crate::identity::ca::MAX_LIFETIME);
    if (min..=max).contains(&lifetime) { Ok(lifetime) } else { Err(format!("{s:?}: must be between {min:?} and {max:?}")) }
}

fn parse_conn_slots(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    let max = mesh_common::sizes::CONN_SLOTS;
    if n.is_power_of_two() && n <= max { Ok(n) } else { Err(format!("a power of two up to {max}")) }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "localhost".into())
}

pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Kernel records (target mesh_ebpf) exist only with --bpf-log, which sets their level.
            tracing_subscriber::EnvFilter::try_from_env("MESH_LOG").unwrap_or_else(|_| "info,mesh_ebpf=trace".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Agent(args) => {
            let opts = app::AgentOptions {
                source: match (args.source, args.config) {
                    (SourceKind::Files, Some(config)) => {
                        app::SourceOptions::Files { config, removal_quiet: std::time::Duration::from_millis(args.removal_quiet_ms) }
                    }
                    (SourceKind::Files, None) => anyhow::bail!("--source files needs --config PATH"),
                    (SourceKind::Kubernetes, _) => {
                        app::SourceOptions::Kubernetes { kubeconfig: args.kubeconfig, lease_namespace: args.lease_namespace }
                    }
                },
                cgroup: args.cgroup,
                node: NodeContext { node: args.node.unwrap_or_else(hostname), zone: args.zone },
                bpffs: args.bpffs,
                admin_addr: args.admin_addr,
                readiness_addr: args.readiness_addr,
                keep_datapath: args.keep_datapath,
                programs: crate::ebpf::loader::ProgramOptions {
                    log_level: args.bpf_log,
                    redirection: args.sockmap,
                    conn_slots: args.conn_slots,
                },
                metrics_addr: args.metrics_addr,
                flow_log: args.flow_log,
                outbound_addr: args.outbound_addr,
                default_request_timeout: std::time::Duration::from_millis(args.default_request_timeout_ms),
                access_log: args.access_log,
                traces: crate::telemetry::traces::TraceConfig { endpoint: args.otlp_traces, sampling: args.trace_sampling },
                drain_timeout: std::time::Duration::from_millis(args.drain_timeout_ms),
                take_over: args.take_over,
                trust_domain: args.trust_domain.clone(),
                root_namespace: args.root_namespace,
                kubelet_cgroup: Some(args.kubelet_cgroup).filter(|p| !p.as_os_str().is_empty()),
                mtls: {
                    let signer = match (args.ca_dir, args.ca_addr) {
                        (Some(dir), _) => Some(app::SignerSource::Files(dir)),
                        (None, Some(addr)) => {
                            let identity = match &args.ca_identity {
                                Some(id) => crate::identity::Identity::parse(id)?,
                                None => crate::identity::Identity::new(&args.trust_domain, "mesh-system", "mesh-ca")?,
                            };
                            let root = args.ca_root.clone().expect("clap requires --ca-root with --ca-addr");
                            Some(app::SignerSource::Remote { addr, root, identity, token_file: args.ca_token_file })
                        }
                        (None, None) => None,
                    };
                    signer.map(|signer| app::MtlsOptions {
                        signer,
                        cert_lifetime: args.cert_lifetime,
                        tunnel_addr: args.tunnel_addr,
                        hbone_addr: args.hbone_addr,
                    })
                },
            };
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(usize::from(args.worker_threads)).enable_all().build()?;
            runtime.block_on(app::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { json } => {
            let rows = check::run_checks();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                check::print_table(&rows);
            }
            let missing: Vec<&str> = rows.iter().filter(|r| !r.ok && !r.optional).map(|r| r.check.as_str()).collect();
            if missing.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!("missing: {}", missing.join(", "));
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Services { json, bpffs } => {
            let maps = PinnedMaps::open(&bpffs).map_err(|e| pins_error(&bpffs, &crate::ebpf::error_chain(&e)))?;
            let rows = maps.read_image()?.service_rows();
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<40} {:<28} {:<5} {:<7} BACKENDS", "SERVICE", "FRONTEND", "PROTO", "LB");
                for r in rows {
                    let backends: Vec<String> = r.backends.iter().map(ToString::to_string).collect();
                    let lb = match (r.l7, r.affinity_timeout_s) {
                        (true, _) => "l7".to_owned(),
                        (false, Some(_)) => format!("{}+aff", r.algorithm),
                        (false, None) => r.algorithm.to_owned(),
                    };
                    println!(
                        "{:<40} {:<28} {:<5} {:<7} {}",
                        r.name,
                        r.frontend.to_string(),
                        r.protocol,
                        lb,
                        if backends.is_empty() { "(none: refused)".into() } else { backends.join(",") }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Programs { json, sample, bpffs } => {
            let window = sample.map(Duration::from_secs_f64);
            let rows = match window {
                Some(w) => crate::ebpf::programs::sample(&bpffs, w),
                None => crate::ebpf::programs::attached(&bpffs),
            }
            .map_err(|e| pins_error(&bpffs, &crate::ebpf::error_chain(&e)))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                crate::ebpf::programs::print_table(&rows, window);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Conns { json, watch, bpffs } => loop {
            let rows = crate::telemetry::conns::rows(&bpffs).map_err(|e| pins_error(&bpffs, &e))?;
            if watch {
                print!("\x1b[2J\x1b[H");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                crate::telemetry::conns::print_table(&rows);
            }
            if !watch {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(Duration::from_secs(1));
        },
        Command::Ca { command: CaCommand::Serve { ca_dir, listen, trust_domain, identity, agents, kubeconfig } } => {
            let identity = match identity {
                Some(id) => crate::identity::Identity::parse(&id)?,
                None => crate::identity::Identity::new(&trust_domain, "mesh-system", "mesh-ca")?,
            };
            let opts = crate::signer::SignerOptions { ca_dir, listen, trust_domain, identity, agents };
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(async move {
                let client = crate::sources::kube::client(kubeconfig.as_deref()).await?;
                crate::signer::serve(opts, client).await?;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca { command: CaCommand::Init { dir, trust_domain, lifetime } } => {
            crate::identity::ca::init(&dir, &trust_domain, lifetime)?;
            println!(
                "{}: a new root for trust domain {trust_domain}; its key is {} (keep it there, readable only by the agent)",
                dir.join(crate::identity::ca::ROOT_CERT).display(),
                dir.join(crate::identity::ca::ROOT_KEY).display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Authz { command: AuthzCommand::Check { from, to, method, path, host, source_ip, json, admin_addr } } => {
            let (target, port) = to
                .rsplit_once(':')
                .and_then(|(t, p)| Some((t.trim_start_matches('[').trim_end_matches(']'), p.parse::<u16>().ok()?)))
                .ok_or_else(|| anyhow::anyhow!("--to {to:?}: expected NAMESPACE/NAME:PORT or ADDRESS:PORT"))?;
            let mut query = form_urlencoded::Serializer::new(String::new());
            query.append_pair("to", target).append_pair("port", &port.to_string());
            for (key, value) in
                [("from", from), ("method", method), ("path", path), ("host", host), ("source_ip", source_ip.map(|i| i.to_string()))]
            {
                if let Some(value) = value {
                    query.append_pair(key, &value);
                }
            }
            let body = admin_get(admin_addr, &format!("/authz?{}", query.finish()))?;
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            let decisions = answer["decisions"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                println!(
                    "from {} to {}:{} (policies of generation {})",
                    answer["from"].as_str().unwrap_or("?"),
                    target,
                    port,
                    answer["generation"]
                );
                for d in &decisions {
                    let text = |k: &str| d[k].as_str().unwrap_or("-").to_owned();
                    println!("{:<6} {:<40} {:<22} {}", text("decision").to_uppercase(), text("pod"), text("address"), text("explanation"));
                }
            }
            let denied = decisions.iter().any(|d| d["decision"] != "allow");
            Ok(if denied { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Config { command: ConfigCommand::Validate { path } } => match validate_config(&path) {
            Ok((services, slices, routes)) => {
                println!("{}: {services} Services, {slices} EndpointSlices, {routes} routes: valid", path.display());
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                eprintln!("{errors}");
                Ok(ExitCode::FAILURE)
            }
        },
    }
}

/// GETs `path` from the agent's admin API: the body of a 200, or the agent's own words.
fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let timeout = Duration::from_secs(10);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| anyhow::anyhow!("the agent's admin API at {addr}: {e} (is the agent running? --admin-addr)"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.take(16 * 1024 * 1024).read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("{addr}: not an HTTP answer"))?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    if status != "200" {
        anyhow::bail!("the agent answered {status}: {}", body.trim());
    }
    Ok(body)
}

/// The body of a chunked HTTP/1.1 answer.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else { break };
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

/// What the agent would accept from `path`: every file parsed and applied to a fresh store,
/// one file at a time, as the agent does.
fn validate_config(path: &std::path::Path) -> Result<(usize, usize, usize), crate::sources::ConfigErrors> {
    use crate::sources::{Change, ConfigErrors, Origin};
    let files = crate::sources::file::load(path)?;
    let mut store = crate::state::Store::new(crate::state::NodeContext { node: String::new(), zone: None });
    let mut errors = Vec::new();
    for (file, objects) in files {
        let origin = Origin::File(file.into());
        let changes = objects.into_iter().map(|object| Change::Upsert { origin: origin.clone(), object }).collect();
        if let Err(mut e) = store.apply(changes) {
            errors.append(&mut e.0);
        }
    }
    if errors.is_empty() { Ok(store.counts()) } else { Err(ConfigErrors(errors)) }
}

/// Why the pinned state under `bpffs` could not be read, said so that the cause is clear: a
/// permission problem names the errno and what is needed; only a missing pin suggests that no
/// agent runs.
fn pins_error(bpffs: &std::path::Path, error: &dyn std::fmt::Display) -> anyhow::Error {
    let text = error.to_string();
    let denied = ["Permission denied", "Operation not permitted", "os error 1)", "os error 13)"];
    if denied.iter().any(|d| text.contains(d)) {
        anyhow::anyhow!(
            "{text}\nreading mesh's pinned maps under {} needs root (CAP_BPF and CAP_SYS_ADMIN): run it with sudo",
            bpffs.display()
        )
    } else {
        anyhow::anyhow!("{text}\nis an agent running (or was it stopped with --keep-datapath) with --bpffs {}?", bpffs.display())
    }
}
