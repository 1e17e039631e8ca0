//! `cargo xtask bench control-plane`: how the agent copes with a big cluster's worth of
//! Services (release build, in a network namespace of its own).
//!
//! 10,000 Services and 100,000 endpoints in EndpointSlices of 100, in 100 files of 100 Services;
//! then the same objects through the Kubernetes API source (the tests' API server double, in
//! this process).
//! Measured: cold start to ready (the kernel holds everything), one endpoint change from the
//! file's rename to the kernel using it, a Service added the same way, `/metrics` scrape times
//! (also while a change is applied), and the agent's RSS. "The kernel uses it" is observed from
//! a process in the attached cgroup that connects every 100 us: to a Service whose only
//! endpoint turns ready, or to the VIP of a Service that did not exist.
//!
//! For whoever chases memory: `MESH_BENCH_BIN` runs the agent through a wrapper (e.g. a script
//! that execs heaptrack on the release binary), `MESH_BENCH_SMAPS=1` keeps its mappings.
use std::{
    fs,
    path::Path,
    process::Stdio,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use mesh_tests::{Agent, AgentSpec, Backend, TestCgroup, http_get, in_netns, kube_api::KubeApi};
use serde_json::{Value, json};

use crate::bootstrap::{dist_bin, workspace_root};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 100_000;
const SLICE: usize = 100;
const PER_FILE: usize = 100;
/// The listener the timed changes point at.
const TARGET: &str = "127.0.0.50";
const CHANGES: usize = 5;

fn vip(i: usize) -> String {
    format!("10.96.{}.{}", i / 250, i % 250 + 1)
}

fn service_yaml(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\nspec:\n  clusterIP: {}\n  ports: [{{name: http, port: 80}}]\n---\n",
        vip(i)
    )
}

/// Slice `j` of Service `i`: `SLICE` endpoints (pod addresses in 10.128/9, never dialled).
fn slice_yaml(i: usize, j: usize, endpoints: &[String]) -> String {
    let mut y = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-{j}\n  namespace: bench\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for e in endpoints {
        y.push_str(&format!("- addresses: [\"{e}\"]\n  conditions: {{ready: true}}\n  nodeName: node-a\n"));
    }
    y.push_str("---\n");
    y
}

fn endpoint(n: usize) -> String {
    format!("10.{}.{}.{}", 128 + n / 65_536, (n / 256) % 256, n % 256)
}

/// The text of file `f`; Service 0 of each file is a probe: its one slice holds one endpoint,
/// `TARGET`, ready or not.
fn file_text(f: usize, probe_ready: bool) -> String {
    let slices = ENDPOINTS / SLICE;
    let mut text = String::new();
    for i in f * PER_FILE..(f + 1) * PER_FILE {
        text.push_str(&service_yaml(i));
        if i % PER_FILE == 0 {
            text.push_str(&probe_slice(i, probe_ready));
        }
        // Slices spread over the Services, one Service in SERVICES / slices: slice k belongs to
        // Service k * SERVICES / slices + 1 (never a probe Service, whose one endpoint must be
        // the only one: a connect then reaches it at the first try).
        let stride = SERVICES / slices;
        if i % stride == 1 {
            let k = i / stride;
            let endpoints: Vec<String> = (k * SLICE..(k + 1) * SLICE).map(endpoint).collect();
            text.push_str(&slice_yaml(i, k, &endpoints));
        }
    }
    text
}

/// The probe slice of Service `i`: one endpoint, `TARGET`, ready or not.
fn probe_slice(i: usize, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: s{i}-probe\n  namespace: bench\n  labels: {{kubernetes.io/service-name: s{i}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n- addresses: [\"{TARGET}\"]\n  conditions: {{ready: {ready}}}\n---\n"
    )
}

fn write_atomically(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    fs::write(&tmp, text)?;
    fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_nanos() as u64
}

/// Starts a process in the cgroup that connects to `addr` until it works; returns it.
fn waiter(cgroup: &TestCgroup, addr: &str) -> anyhow::Result<std::process::Child> {
    cgroup.command(dist_bin("mesh-probe")).args(["wait-connect", addr, "30000"]).stdout(Stdio::piped()).spawn().context("mesh-probe")
}

/// Milliseconds from `since_ns` until the waiter connected.
fn waited_ms(child: std::process::Child, since_ns: u64) -> anyhow::Result<f64> {
    let out = child.wait_with_output()?;
    let answer: Value = serde_json::from_slice(&out.stdout).context("mesh-probe output")?;
    let at = answer["connected_at_ns"].as_u64().with_context(|| format!("the change never reached the kernel: {answer}"))?;
    Ok(at.saturating_sub(since_ns) as f64 / 1e6)
}

fn rss_mib(pid: u32) -> f64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// `RssAnon` and `RssFile` of /proc/PID/status in MiB: the heap against the mapped binary.
fn rss_parts_mib(pid: u32) -> (f64, f64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> f64 {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0.0)
            / 1024.0
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn scrape_ms(addr: &str) -> f64 {
    let started = Instant::now();
    let _ = http_get(addr, "/metrics");
    started.elapsed().as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cpu_ms(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // utime and stime are fields 14 and 15 of stat: 12 and 13 after the command.
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    ticks * 1000.0 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Where the agent reads the objects: files in a directory, or the API server double.
enum Feed {
    Files(std::path::PathBuf),
    Api(KubeApi),
}

impl Feed {
    /// Writes file `name` (atomically), or creates/replaces its objects in the API.
    fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        match self {
            Feed::Files(dir) => write_atomically(dir, name, text),
            Feed::Api(api) => {
                api.apply_yaml(text);
                Ok(())
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Feed::Files(_) => "files",
            Feed::Api(_) => "kubernetes",
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    // SAFETY: set before any thread of ours reads the environment.
    unsafe {
        std::env::set_var("MESH_BIN", std::env::var_os("MESH_BENCH_BIN").unwrap_or_else(|| dist_bin("mesh").into()));
        std::env::set_var("MESH_PROBE_BIN", dist_bin("mesh-probe"));
    }
    let result = in_netns(|| -> anyhow::Result<Value> {
        let _target = Backend::start("target", &[&format!("{TARGET}:8080")]);
        let dir = std::env::temp_dir().join(mesh_tests::unique_name("bench-cp"));
        fs::create_dir_all(&dir)?;
        let files = measure(Feed::Files(dir.clone()));
        let _ = fs::remove_dir_all(&dir);
        // The Gateway API CRDs are installed (empty): the agent watches four kinds.
        let api = measure(Feed::Api(KubeApi::start(&[])));
        Ok(json!({ "suite": "control-plane", "files": files?, "kubernetes": api? }))
    })?;
    let out = workspace_root().join("target/bench");
    fs::create_dir_all(&out)?;
    let file = out.join("control-plane.json");
    fs::write(&file, serde_json::to_string_pretty(&result)?)?;
    println!("\n{}", serde_json::to_string_pretty(&result)?);
    println!("[bench control-plane] written to {}", file.display());
    Ok(())
}

/// Cold start, endpoint changes, Services added, scrapes and RSS, with the objects fed by `feed`.
fn measure(feed: Feed) -> anyhow::Result<Value> {
    let label = feed.name();
    let cgroup = TestCgroup::new("bench-cp");
    println!(
        "[bench control-plane] {label}: writing {SERVICES} Services, {ENDPOINTS} endpoints in slices of {SLICE}, {} batches",
        SERVICES / PER_FILE
    );
    let mut bytes = 0;
    for f in 0..SERVICES / PER_FILE {
        let text = file_text(f, false);
        bytes += text.len();
        feed.write(&format!("f{f:03}.yaml"), &text)?;
    }

    let started = Instant::now();
    let spec = match &feed {
        Feed::Files(dir) => AgentSpec { config_path: Some(dir.clone()), ..AgentSpec::new("", &cgroup) },
        Feed::Api(api) => AgentSpec { kubeconfig: Some(api.kubeconfig.clone()), ..AgentSpec::new("", &cgroup) },
    };
    let agent = Agent::start(spec);
    let ready_s = started.elapsed().as_secs_f64();
    let pid = agent.pid();
    let cpu_start_ms = cpu_ms(pid);
    println!("[bench control-plane] {label}: ready after {ready_s:.2} s ({:.0} ms CPU)", cpu_start_ms);
    let metrics = agent.metrics_addr().to_owned();
    let idle_scrapes: Vec<f64> = (0..5).map(|_| scrape_ms(&metrics)).collect();
    let backends = agent.metric("mesh_map_entries", &[("map", "mesh_backends")]);
    anyhow::ensure!(backends as usize >= ENDPOINTS, "the kernel holds {backends} backends after start, not {ENDPOINTS}");
    let rss_started = rss_mib(pid);

    // The agent's CPU rate with nothing changing (live-connection scans, gauges), to take
    // out of the change windows.
    let idle_cpu_before = cpu_ms(pid);
    std::thread::sleep(Duration::from_secs(2));
    let idle_cpu_ms_per_s = (cpu_ms(pid) - idle_cpu_before) / 2.0;

    // One endpoint changed: the probe Service of file f turns its endpoint ready (through the
    // API: the whole file's objects are written again, only the probe slice differs).
    let mut change_ms = Vec::new();
    let mut busy_scrapes = Vec::new();
    let mut change_cpu_ms = Vec::new();
    for f in 0..CHANGES {
        let vip = format!("{}:80", vip(f * PER_FILE));
        let child = waiter(&cgroup, &vip)?;
        std::thread::sleep(Duration::from_millis(200));
        let text = match &feed {
            Feed::Files(_) => file_text(f, true),
            Feed::Api(_) => probe_slice(f * PER_FILE, true),
        };
        let cpu_before = cpu_ms(pid);
        let t0 = now_ns();
        feed.write(&format!("f{f:03}.yaml"), &text)?;
        busy_scrapes.push(scrape_ms(&metrics));
        change_ms.push(waited_ms(child, t0)?);
        std::thread::sleep(Duration::from_millis(500));
        change_cpu_ms.push(cpu_ms(pid) - cpu_before);
    }
    println!("[bench control-plane] {label}: one endpoint change: {:?} ms", change_ms);

    // A Service added (a new file, or two new objects).
    let mut add_ms = Vec::new();
    for n in 0..CHANGES {
        let i = SERVICES + n;
        let child = waiter(&cgroup, &format!("{}:80", vip(i)))?;
        std::thread::sleep(Duration::from_millis(200));
        let text = format!("{}{}", service_yaml(i), probe_slice(i, true));
        let t0 = now_ns();
        feed.write(&format!("new{n}.yaml"), &text)?;
        add_ms.push(waited_ms(child, t0)?);
    }
    println!("[bench control-plane] {label}: a Service added: {:?} ms", add_ms);
    let rss = rss_mib(pid);
    let (rss_anon, rss_file) = rss_parts_mib(pid);
    if std::env::var_os("MESH_BENCH_SMAPS").is_some() {
        // Where the memory is, mapping by mapping, for whoever is chasing RSS.
        let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        fs::write(workspace_root().join(format!("target/bench/control-plane-{label}-smaps.txt")), smaps)?;
    }
    agent.stop();
    Ok(json!({
        "source": label,
        "services": SERVICES,
        "endpoints": ENDPOINTS,
        "slice_size": SLICE,
        "batches": SERVICES / PER_FILE,
        "config_mib": bytes as f64 / 1048576.0,
        "cold_start_s": ready_s,
        "cold_start_cpu_ms": cpu_start_ms,
        "endpoint_change_ms": { "median": median(change_ms.clone()), "max": change_ms.iter().copied().fold(0.0, f64::max), "all": change_ms },
        // CPU of the 0.5 s after a change, less the idle rate (10 ms ticks: a rough figure).
        "endpoint_change_cpu_ms": (median(change_cpu_ms) - idle_cpu_ms_per_s / 2.0).max(0.0),
        "idle_cpu_ms_per_s": idle_cpu_ms_per_s,
        "service_added_ms": { "median": median(add_ms.clone()), "all": add_ms },
        "scrape_ms": { "idle_median": median(idle_scrapes), "during_change_max": busy_scrapes.iter().copied().fold(0.0, f64::max) },
        "rss_mib": { "after_start": rss_started, "after_changes": rss, "anon": rss_anon, "file": rss_file },
        "kernel_backends": backends,
    }))
}
