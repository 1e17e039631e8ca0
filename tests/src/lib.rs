//! Helpers for mesh's privileged integration tests: network namespaces with only loopback,
//! child cgroups, backends, the agent and the probe client, each an RAII guard that cleans up
//! and checks it left nothing behind.
//!
//! Network safety: every test body runs in a fresh network namespace holding only `lo`, so a
//! Service VIP (10.96.x.x) the kernel fails to translate has no route and fails locally.
use std::{
    ffi::CString,
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

pub use serde_json::Value;

pub mod kube_api;

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

/// A name unique to this test process: `mesh-test-<pid>-<n>-<label>`.
pub fn unique_name(label: &str) -> String {
    format!("mesh-test-{}-{}-{label}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// The `mesh` binary: $MESH_BIN, or target/<profile>/mesh next to this test binary.
pub fn mesh_bin() -> PathBuf {
    bin_path("MESH_BIN", "mesh")
}

pub fn probe_bin() -> PathBuf {
    bin_path("MESH_PROBE_BIN", "mesh-probe")
}

fn bin_path(var: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(var) {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/debug/deps/<test> -> target/debug/<name>
    let path = exe.parent().and_then(Path::parent).expect("target dir").join(name);
    assert!(path.exists(), "{} not built (run `cargo xtask test`, or set {var})", path.display());
    path
}

/// Runs `f` on a thread of its own in a new network namespace with only loopback up. Processes
/// spawned from `f` inherit the namespace; it disappears when they and the thread are gone.
pub fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_root();
            // SAFETY: unshare affects only this thread's namespaces.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            run(Command::new("ip").args(["link", "set", "lo", "up"]));
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

pub fn assert_root() {
    // SAFETY: no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the integration tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)");
}

/// Runs a command to completion, panicking with its output on failure.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The cgroup v2 mount point, from mountinfo.
pub fn cgroup2_root() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            if post.split(' ').next()? != "cgroup2" {
                return None;
            }
            pre.split(' ').nth(4).map(PathBuf::from)
        })
        .expect("no cgroup2 mount")
}

/// A child cgroup; processes started with `TestCgroup::command` run inside it. Dropping it
/// kills what is left inside and removes it.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(label: &str) -> Self {
        let path = cgroup2_root().join(unique_name(label));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A cgroup inside this one (a pod's, below the attached cgroup), removed when dropped.
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self { path }
    }

    /// A command whose process joins this cgroup before it execs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let procs = CString::new(self.path.join("cgroup.procs").into_os_string().into_encoded_bytes()).expect("path");
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if n != 1 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
            });
        }
        cmd
    }

    /// Runs `mesh-probe ARGS` inside the cgroup and parses its JSON answer.
    pub fn probe(&self, args: &[&str]) -> Value {
        parse_probe(self.command(probe_bin()).args(args))
    }

    /// One connection to `addr` from inside the cgroup, open until `HeldConnection::close`.
    pub fn hold(&self, addr: &str) -> HeldConnection {
        self.hold_with(&["hold", addr])
    }

    /// Like `hold`, from the local address `from` (a pod's address: in these tests pods share
    /// one namespace, whose sockets take any of its addresses).
    pub fn hold_from(&self, addr: &str, from: &str) -> HeldConnection {
        self.hold_with(&["hold", addr, from])
    }

    fn hold_with(&self, args: &[&str]) -> HeldConnection {
        let mut child = self.command(probe_bin()).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("mesh-probe hold");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        HeldConnection { child, stdin, stdout }
    }

    fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for pid in self.pids() {
                // SAFETY: plain kill(2).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                // A test may remove its cgroup itself.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => {
                    if !std::thread::panicking() {
                        panic!("cgroup {} leaked: {e}", self.path.display());
                    }
                    return;
                }
            }
        }
    }
}

/// Runs `mesh-probe ARGS` outside any test cgroup.
/// A connection held open by `mesh-probe hold`.
pub struct HeldConnection {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    stdout: BufReader<std::process::ChildStdout>,
}

impl HeldConnection {
    /// Sends `line` through the connection; the backend's JSON answer.
    pub fn send(&mut self, line: &str) -> Value {
        writeln!(self.stdin.as_mut().expect("open"), "{line}").expect("write to mesh-probe hold");
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).expect("read from mesh-probe hold");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer:?}"))
    }

    /// Closes the connection and waits for the probe to exit.
    pub fn close(mut self) {
        drop(self.stdin.take());
        self.child.wait().expect("mesh-probe hold exits");
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn probe_outside(args: &[&str]) -> Value {
    parse_probe(Command::new(probe_bin()).args(args))
}

/// Runs a mesh-probe command line and parses its JSON answer.
pub fn parse_probe(cmd: &mut Command) -> Value {
    let out = run(cmd);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("probe output {out:?}: {e}"))
}

/// `mesh-probe serve NAME ADDR...` backends; killed on drop.
pub struct Backend {
    child: Child,
}

impl Backend {
    pub fn start(name: &str, addrs: &[&str]) -> Self {
        Self::spawn(Command::new(probe_bin()), name, addrs)
    }

    /// A backend whose sockets belong to `cgroup` (a server on a meshed node).
    pub fn start_in(cgroup: &TestCgroup, name: &str, addrs: &[&str]) -> Self {
        Self::spawn(cgroup.command(probe_bin()), name, addrs)
    }

    fn spawn(mut cmd: Command, name: &str, addrs: &[&str]) -> Self {
        Self::spawn_raw(cmd.arg("serve").arg(name).args(addrs))
    }

    /// Any server that prints a line containing "serving" once it listens.
    pub fn spawn_raw(cmd: &mut Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().expect("stdout")).read_line(&mut line).expect("server ready line");
        assert!(line.contains("serving"), "{cmd:?} did not start: {line:?}");
        Self { child }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start an agent.
pub struct AgentSpec<'a> {
    pub yaml: &'a str,
    pub cgroup: &'a TestCgroup,
    pub node: &'a str,
    pub zone: Option<&'a str>,
    pub keep_datapath: bool,
    /// Reuse this pin directory (to adopt a previous agent's datapath).
    pub bpffs: Option<PathBuf>,
    pub extra_args: Vec<&'a str>,
    /// Wait for readiness 200 (true) or only for the readiness endpoint to answer (false).
    pub wait_ready: bool,
    /// Admin on this port, metrics on +20, readiness on +21 (two agents in one namespace).
    pub port_base: u16,
    /// Read this configuration path instead of writing `yaml` to a directory of its own.
    pub config_path: Option<PathBuf>,
    /// Start the agent with this limit of open files (soft and hard).
    pub nofile: Option<u64>,
    /// The proxy's address, instead of 127.0.0.1 at `port_base + 1`.
    pub outbound_addr: Option<&'a str>,
    /// `--source kubernetes` with this kubeconfig (`yaml` is then unused).
    pub kubeconfig: Option<PathBuf>,
    /// Run in the network namespace of this process (another "node"), not the caller's.
    pub netns_of: Option<u32>,
    /// The address of the admin, metrics and readiness listeners, instead of 127.0.0.1 (an
    /// agent in another namespace is reached on its node address).
    pub listen_ip: Option<&'a str>,
}

impl<'a> AgentSpec<'a> {
    pub fn new(yaml: &'a str, cgroup: &'a TestCgroup) -> Self {
        Self {
            yaml,
            cgroup,
            node: "node-a",
            zone: None,
            keep_datapath: false,
            bpffs: None,
            extra_args: Vec::new(),
            wait_ready: true,
            port_base: 15000,
            config_path: None,
            nofile: None,
            outbound_addr: None,
            kubeconfig: None,
            netns_of: None,
            listen_ip: None,
        }
    }
}

/// A running `mesh agent`, in the calling thread's network namespace, with its own config
/// directory and pin directory.
pub struct Agent {
    child: Option<Child>,
    admin: String,
    readiness: String,
    metrics: String,
    pub bpffs: PathBuf,
    pub config_dir: PathBuf,
    pub keep_datapath: bool,
    log: PathBuf,
}

impl Agent {
    pub fn start(spec: AgentSpec<'_>) -> Self {
        let name = unique_name("agent");
        let bpffs = spec.bpffs.unwrap_or_else(|| PathBuf::from("/sys/fs/bpf").join(&name));
        let config_dir = std::env::temp_dir().join(&name);
        fs::create_dir_all(&config_dir).expect("config dir");
        let log = config_dir.with_extension("log");
        let ip = spec.listen_ip.unwrap_or("127.0.0.1");
        let port = |offset: u16| format!("{ip}:{}", spec.port_base + offset);
        let mut agent = Self {
            child: None,
            admin: port(0),
            readiness: port(21),
            metrics: port(20),
            bpffs,
            config_dir,
            keep_datapath: spec.keep_datapath,
            log,
        };
        let mut cmd = match spec.netns_of {
            Some(pid) => {
                let mut cmd = Command::new("nsenter");
                cmd.args(["-t", &pid.to_string(), "-n", "--"]).arg(mesh_bin());
                cmd
            }
            None => Command::new(mesh_bin()),
        };
        cmd.arg("agent");
        match (spec.kubeconfig, spec.config_path) {
            (Some(kubeconfig), _) => cmd.args(["--source", "kubernetes", "--kubeconfig"]).arg(kubeconfig),
            (None, Some(path)) => cmd.arg("--config").arg(path),
            (None, None) => {
                agent.write_config(spec.yaml);
                cmd.arg("--config").arg(&agent.config_dir)
            }
        };
        cmd.arg("--cgroup")
            .arg(&spec.cgroup.path)
            .arg("--bpffs")
            .arg(&agent.bpffs)
            .args(["--node", spec.node])
            .args(["--admin-addr", &agent.admin, "--readiness-addr", &agent.readiness, "--metrics-addr", &agent.metrics])
            .arg("--outbound-addr")
            .arg(spec.outbound_addr.map_or_else(|| format!("127.0.0.1:{}", spec.port_base + 1), str::to_owned))
            .stdout(Stdio::null())
            .stderr(fs::File::create(&agent.log).expect("log file"));
        if let Some(zone) = spec.zone {
            cmd.args(["--zone", zone]);
        }
        if spec.keep_datapath {
            cmd.arg("--keep-datapath");
        }
        cmd.args(&spec.extra_args);
        if let Some(n) = spec.nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
                });
            }
        }
        agent.child = Some(cmd.spawn().expect("spawn mesh agent"));
        agent.wait_ready(spec.wait_ready);
        agent
    }

    /// Replaces the configuration atomically (write, then rename), as a ConfigMap update does.
    pub fn write_config(&self, yaml: &str) {
        self.write_file("services.yaml", yaml);
    }

    /// Writes (or replaces) one more file of the configuration directory atomically.
    pub fn write_file(&self, name: &str, yaml: &str) {
        let tmp = self.config_dir.join(format!(".{name}.tmp"));
        fs::write(&tmp, yaml).expect("write config");
        fs::rename(&tmp, self.config_dir.join(name)).expect("rename config");
    }

    /// Removes a file of the configuration directory.
    pub fn remove_file(&self, name: &str) {
        fs::remove_file(self.config_dir.join(name)).expect("remove config file");
    }

    pub fn log_path(&self) -> PathBuf {
        self.log.clone()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self, ready: bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            match http_get(&self.readiness, "/healthz/ready") {
                Ok((200, _)) => return,
                Ok(_) if !ready => return,
                _ => {}
            }
            assert!(Instant::now() < deadline, "agent not ready after 60s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where the admin API is served.
    pub fn admin_addr(&self) -> &str {
        &self.admin
    }

    /// Whether the agent process has exited (of itself).
    pub fn exited(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// Where `/metrics` is served.
    pub fn metrics_addr(&self) -> &str {
        &self.metrics
    }

    pub fn config_dump(&self) -> Value {
        let (code, body) = http_get(&self.admin, "/config_dump").expect("GET /config_dump");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("config_dump JSON")
    }

    pub fn readiness(&self) -> (u16, String) {
        http_get(&self.readiness, "/healthz/ready").expect("GET /healthz/ready")
    }

    /// `/healthz/live`, the DaemonSet's livenessProbe.
    pub fn liveness(&self) -> (u16, String) {
        http_get(&self.readiness, "/healthz/live").expect("GET /healthz/live")
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running agent").id()
    }

    /// The agent's open file descriptors.
    pub fn open_fds(&self) -> usize {
        let pid = self.child.as_ref().expect("running agent").id();
        fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
    }

    /// The Prometheus text of `/metrics`.
    pub fn metrics(&self) -> String {
        let (code, body) = http_get(&self.metrics, "/metrics").expect("GET /metrics");
        assert_eq!(code, 200, "{body}");
        body
    }

    /// Sum of the samples of `name` whose labels contain every `key="value"` of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics(), name, labels)
    }

    /// Entries per map, as `/config_dump` reports them.
    pub fn map_entries(&self) -> Value {
        self.config_dump()["map_entries"].clone()
    }

    /// Backends (sorted) the kernel holds for the service frontend `vip`.
    pub fn kernel_backends(&self, frontend: &str) -> Option<Vec<String>> {
        let dump = self.config_dump();
        let svc = dump["services"].as_array()?.iter().find(|s| s["frontend"] == frontend)?;
        let mut b: Vec<String> = svc["backends"].as_array()?.iter().map(|b| b.as_str().unwrap_or_default().to_owned()).collect();
        b.sort();
        Some(b)
    }

    /// Waits until the kernel's backends for `frontend` are `expected`.
    pub fn wait_backends(&self, frontend: &str, expected: &[&str]) {
        let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        expected.sort();
        wait_until(
            || self.kernel_backends(frontend).as_ref() == Some(&expected),
            || format!("backends of {frontend} are {:?}, want {expected:?}\n{}", self.kernel_backends(frontend), self.log()),
        );
    }

    /// SIGTERM and wait. Without --keep-datapath, asserts the pins are gone.
    pub fn stop(mut self) {
        self.terminate();
        if !self.keep_datapath {
            assert!(!self.bpffs.exists(), "agent left pins behind in {}", self.bpffs.display());
        }
    }

    fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let status = child.wait().expect("wait agent");
            assert!(status.success() || std::thread::panicking(), "agent exited with {status}:\n{}", self.log());
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failed test must not leave a kept datapath behind either.
        if !self.keep_datapath || std::thread::panicking() {
            remove_pins(&self.bpffs);
        }
        let _ = fs::remove_dir_all(&self.config_dir);
        let _ = fs::remove_file(&self.log);
    }
}

/// Removes a pin directory when dropped: for tests that keep a datapath across agents.
pub struct PinsGuard(pub PathBuf);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        remove_pins(&self.0);
    }
}

/// Removes a pin directory and everything in it (link pins detach their programs).
pub fn remove_pins(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// A minimal HTTP/1.1 GET: (status, body).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let code = response.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// `names` of a probe answer as (name, count) pairs.
pub fn names(answer: &Value) -> Vec<(String, u64)> {
    answer["names"].as_object().map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect()).unwrap_or_default()
}

/// Sum of the samples of `name` in Prometheus text whose labels include all of `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The backend names of a probe answer, sorted.
pub fn backend_names(answer: &Value) -> Vec<String> {
    names(answer).into_iter().map(|(n, _)| n).collect()
}

/// Polls `done` every 10 ms for up to 5 s; panics with `what()` if it never holds.
pub fn wait_until(done: impl FnMut() -> bool, what: impl Fn() -> String) {
    wait_until_for(Duration::from_secs(5), done, what)
}

/// `wait_until` with a longer limit, for what happens only after a timer of the agent's own.
pub fn wait_until_for(limit: Duration, mut done: impl FnMut() -> bool, what: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "gave up after {limit:?}: {}", what());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Total errors in a probe answer.
pub fn error_count(answer: &Value) -> u64 {
    answer["errors"].as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0)
}

/// A Service and one EndpointSlice, in Kubernetes' own YAML.
pub struct ServiceYaml<'a> {
    pub name: &'a str,
    pub cluster_ip: &'a str,
    pub port: u16,
    pub protocol: &'a str,
    pub extra_spec: &'a str,
    pub annotations: &'a str,
    /// (address, ready, serving, terminating, node, zone hint)
    pub endpoints: Vec<Endpoint<'a>>,
    pub target_port: u16,
}

#[derive(Clone, Copy)]
pub struct Endpoint<'a> {
    pub address: &'a str,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: &'a str,
    pub zone_hint: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    pub fn ready(address: &'a str) -> Self {
        Self { address, ready: true, serving: true, terminating: false, node: "node-a", zone_hint: None }
    }
}

impl<'a> ServiceYaml<'a> {
    /// The tests' usual Service: `test/web`, TCP 10.96.0.10:80 to target port 8080.
    pub fn web(endpoints: Vec<Endpoint<'a>>) -> Self {
        Self {
            name: "web",
            cluster_ip: "10.96.0.10",
            port: 80,
            protocol: "TCP",
            extra_spec: "",
            annotations: "",
            endpoints,
            target_port: 8080,
        }
    }

    pub fn render(&self) -> String {
        let family = if self.cluster_ip.contains(':') { "IPv6" } else { "IPv4" };
        let mut y = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {n}\n  namespace: test\n  annotations: {{{a}}}\nspec:\n  clusterIP: \"{ip}\"\n  ports:\n  - name: main\n    port: {p}\n    protocol: {proto}\n    targetPort: {tp}\n{extra}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {n}-1\n  namespace: test\n  labels:\n    kubernetes.io/service-name: {n}\naddressType: {family}\nports:\n- name: main\n  port: {tp}\n  protocol: {proto}\nendpoints:\n",
            n = self.name,
            a = self.annotations,
            ip = self.cluster_ip,
            p = self.port,
            tp = self.target_port,
            proto = self.protocol,
            extra = self.extra_spec,
        );
        for e in &self.endpoints {
            y.push_str(&format!(
                "- addresses: [\"{}\"]\n  conditions: {{ready: {}, serving: {}, terminating: {}}}\n  nodeName: {}\n",
                e.address, e.ready, e.serving, e.terminating, e.node
            ));
            if let Some(zone) = e.zone_hint {
                y.push_str(&format!("  hints:\n    forZones:\n    - name: {zone}\n"));
            }
        }
        y
    }
}

/// Node B: a network namespace joined to the caller's (node A) by a veth pair, `mesh-nb` on
/// A's side. Node A is 10.200.0.1, node B 10.200.0.2; B's pod has 10.200.1.2 (routed through
/// B). Gone when dropped. Used by the mTLS tests and `cargo xtask bench mtls`.
pub struct NodeB {
    holder: Child,
}

impl NodeB {
    pub fn new() -> Option<Self> {
        let veth = Command::new("ip").args(["link", "add", "mesh-nb", "type", "veth"]).output().expect("ip");
        if !veth.status.success() {
            println!("SKIP: this kernel cannot make a veth pair: {}", String::from_utf8_lossy(&veth.stderr).trim());
            return None;
        }
        let holder = Command::new("unshare").args(["-n", "sleep", "1000"]).spawn().expect("unshare");
        let pid = holder.id().to_string();
        run(Command::new("ip").args(["addr", "add", "10.200.0.1/24", "dev", "mesh-nb"]));
        run(Command::new("ip").args(["link", "set", "mesh-nb", "up"]));
        // Until unshare has made its namespace, the holder is still in ours, and moving veth0
        // "into" it would succeed and change nothing.
        wait_until(|| in_other_netns(holder.id()), || "unshare to make node B's namespace".into());
        run(Command::new("ip").args(["link", "set", "veth0", "netns", &pid]));
        for args in [
            ["ip", "addr", "add", "10.200.0.2/24", "dev", "veth0"].as_slice(),
            &["ip", "link", "set", "veth0", "up"],
            &["ip", "link", "set", "lo", "up"],
            &["ip", "addr", "add", "10.200.1.2/32", "dev", "lo"],
        ] {
            run(Command::new("nsenter").args(["-t", &pid, "-n"]).args(args));
        }
        run(Command::new("ip").args(["route", "add", "10.200.1.0/24", "via", "10.200.0.2"]));
        Some(Self { holder })
    }

    pub fn pid(&self) -> u32 {
        self.holder.id()
    }

    /// A command run in node B's namespace and in `cgroup`.
    pub fn command(&self, cgroup: &TestCgroup, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = cgroup.command("nsenter");
        cmd.args(["-t", &self.pid().to_string(), "-n", "--"]).arg(program);
        cmd
    }
}

impl Drop for NodeB {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Whether process `pid` is in another network namespace than the calling thread (whose own
/// may differ from the process's: `in_netns` unshares a thread).
pub fn in_other_netns(pid: u32) -> bool {
    let theirs = fs::read_link(format!("/proc/{pid}/ns/net"));
    let ours = fs::read_link("/proc/thread-self/ns/net");
    matches!((theirs, ours), (Ok(a), Ok(b)) if a != b)
}

/// The cgroup path as the `mesh.dev/cgroup` annotation takes it: under the cgroup2 mount.
pub fn under_mount(cgroup: &TestCgroup) -> String {
    Path::new("/").join(cgroup.path.strip_prefix(cgroup2_root()).expect("under the cgroup2 mount")).display().to_string()
}

/// The objects of the two-node mTLS tests and benchmark (both agents read the same; each sees
/// its own node's pods as its own): namespace shop enrolled, pod front-0 (service account
/// front) on node-a, pod web-0 (web, label app=web, 10.200.1.2) on node-b, Service web (10.96.0.10:80 ->
/// 8080).
pub fn two_node_config(client: &TestCgroup, server: &TestCgroup) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{mesh.dev/dataplane: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: front-0, namespace: shop, uid: u-front, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
         spec: {{nodeName: node-a, serviceAccountName: front}}\nstatus: {{podIP: 10.200.2.1, hostIP: 10.200.0.1}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: shop, uid: u-web, labels: {{app: web}}, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
         spec: {{nodeName: node-b, serviceAccountName: web}}\nstatus: {{podIP: 10.200.1.2, hostIP: 10.200.0.2}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{clusterIP: 10.96.0.10, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: 8080}}]\n\
         endpoints: [{{addresses: [10.200.1.2], nodeName: node-b, targetRef: {{kind: Pod, name: web-0, namespace: shop}}}}]\n",
        under_mount(client),
        under_mount(server)
    )
}

/// A P-256 key and certificate request made by openssl in `dir`, with the extensions a
/// workload certificate for `uri` has: (key, request, extensions file).
pub fn openssl_request(dir: &Path, uri: &str) -> (PathBuf, PathBuf, PathBuf) {
    let (key, csr, ext) = (dir.join("key.pem"), dir.join("req.csr"), dir.join("ext.cnf"));
    fs::write(
        &ext,
        format!("subjectAltName=critical,URI:{uri}\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n"),
    )
    .expect("ext");
    run(Command::new("openssl")
        .args(["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/O=openssl-peer", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    (key, csr, ext)
}

/// A workload certificate made with openssl from the CA's files (nothing of mesh's), kept in
/// the CA's directory (removed with it): (certificate, key) paths.
pub fn openssl_cert(ca: &Path, uri: &str) -> (String, String) {
    let dir = ca.join(unique_name("peer-cert"));
    fs::create_dir(&dir).expect("mkdir");
    let (key, csr, ext) = openssl_request(&dir, uri);
    let cert = dir.join("cert.pem");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-set_serial", "7", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca.join("root-cert.pem"))
        .arg("-CAkey")
        .arg(ca.join("root-key.pem"))
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    (cert.display().to_string(), key.display().to_string())
}

/// Two nodes sharing a CA (trust domain `td`), with a pod cgroup on each: front on node A,
/// web on node B. The CA directory goes when dropped.
pub struct TwoNodes {
    pub client: TestCgroup,
    pub server: TestCgroup,
    pub cgroup_a: TestCgroup,
    pub cgroup_b: TestCgroup,
    pub node_b: NodeB,
    pub ca: PathBuf,
}

impl TwoNodes {
    /// None (the test skips) where the kernel cannot make a veth pair.
    pub fn new(label: &str) -> Option<Self> {
        let node_b = NodeB::new()?;
        let ca = tempfile_dir("ca");
        run(Command::new(mesh_bin()).args(["ca", "init"]).arg(&ca).args(["--trust-domain", "td"]));
        let (cgroup_a, cgroup_b) = (TestCgroup::new(&format!("{label}-node-a")), TestCgroup::new(&format!("{label}-node-b")));
        let (client, server) = (cgroup_a.child("front"), cgroup_b.child("web"));
        Some(Self { client, server, cgroup_a, cgroup_b, node_b, ca })
    }

    pub fn yaml(&self) -> String {
        two_node_config(&self.client, &self.server)
    }

    pub fn root(&self) -> String {
        self.ca.join("root-cert.pem").display().to_string()
    }

    pub fn agent(&self, yaml: &str, on_b: bool, extra: &[&str]) -> Agent {
        let ca = self.ca.display().to_string();
        let mut args = vec!["--ca-dir", &ca, "--trust-domain", "td"];
        args.extend_from_slice(extra);
        let mut spec = AgentSpec::new(yaml, if on_b { &self.cgroup_b } else { &self.cgroup_a });
        spec.extra_args = args;
        if on_b {
            (spec.node, spec.netns_of, spec.listen_ip) = ("node-b", Some(self.node_b.pid()), Some("10.200.0.2"));
        }
        Agent::start(spec)
    }

    /// Node A's agent, mTLS on, reading `yaml`.
    pub fn agent_a(&self, yaml: &str, extra: &[&str]) -> Agent {
        self.agent(yaml, false, extra)
    }

    /// Node B's agent, in node B's namespace, its listeners on node B's address.
    pub fn agent_b(&self, yaml: &str, extra: &[&str]) -> Agent {
        self.agent(yaml, true, extra)
    }

    /// The Python HBONE peer as a server on node B's HBONE port, presenting an openssl
    /// certificate for `serving_as` and expecting front as its client.
    pub fn peer_server(&self, (python, script): &(PathBuf, PathBuf), serving_as: &str) -> Command {
        let (cert, key) = openssl_cert(&self.ca, serving_as);
        let mut cmd = self.node_b.command(&self.cgroup_b, python);
        cmd.arg(script).args(["server", "--cert", &cert, "--key", &key, "--ca", &self.root()]);
        cmd.args(["--listen", "10.200.0.2:15008", "--expect-peer", "spiffe://td/ns/shop/sa/front"]);
        cmd
    }

    /// A server process in web's cgroup on node B (it prints a "serving" line first).
    pub fn serve_on_b(&self, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Backend {
        Backend::spawn_raw(self.node_b.command(&self.server, program).args(args))
    }
}

impl Drop for TwoNodes {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.ca);
    }
}

/// A directory of its own under the temporary directory.
pub fn tempfile_dir(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique_name(label));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
