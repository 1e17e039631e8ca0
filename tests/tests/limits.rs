//! The agent under pressure and facing other users: its file descriptors run out, its proxy
//! fills up, an unprivileged process asks it to stop.
use std::{io::BufRead as _, process::Stdio, time::Duration};

use mesh_tests::*;

const VIP: &str = "10.96.0.10:80";

fn config() -> String {
    let web = ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")]).render();
    format!(
        "{web}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n  - backendRefs: [{{name: web, port: 80}}]\n"
    )
}

/// CPU seconds the process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The share of one core the process used over `window` of wall time.
fn cpu_share(pid: u32, window: Duration) -> f64 {
    let (cpu, wall) = (cpu_seconds(pid), std::time::Instant::now());
    std::thread::sleep(window);
    (cpu_seconds(pid) - cpu) / wall.elapsed().as_secs_f64()
}

/// The most CPU an agent that is waiting, not spinning, may use, given what it used idle in
/// the same run: a loop retrying accept takes a whole core; periodic work (slow under
/// emulation) is already in `idle`.
fn not_spinning(idle: f64) -> f64 {
    2.0 * idle + 0.15
}

/// `n` idle connections to the VIP from the cgroup, held until the returned file is created.
fn hold_idle(cgroup: &TestCgroup, n: usize) -> (std::process::Child, std::path::PathBuf) {
    let stop = std::env::temp_dir().join(unique_name("idle-stop"));
    let mut holder = cgroup
        .command(probe_bin())
        .args(["hold-idle", VIP, &n.to_string(), stop.to_str().unwrap()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let held: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(held["held"].as_u64(), Some(n as u64), "{held}");
    (holder, stop)
}

fn release(holder: (std::process::Child, std::path::PathBuf)) {
    let (mut child, stop) = holder;
    std::fs::write(&stop, b"").unwrap();
    child.wait().unwrap();
    let _ = std::fs::remove_file(&stop);
}

fn proxied_ok(cgroup: &TestCgroup) -> bool {
    names(&cgroup.probe(&["get", VIP, "/", "1"])) == vec![("b1".to_owned(), 1)]
}

#[test]
fn a_full_proxy_leaves_readiness_and_metrics_answering() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("limits-full");
        // 384 files: the proxy may hold (384 - 256) / 2 = 64 connections.
        let agent = Agent::start(AgentSpec { nofile: Some(384), ..AgentSpec::new(&config(), &cgroup) });
        assert!(proxied_ok(&cgroup), "{}", agent.log());
        let idle = cpu_share(agent.pid(), Duration::from_secs(2));
        // More connections than the agent has descriptors.
        let holder = hold_idle(&cgroup, 400);
        // The proxy is full and refuses more, but the agent's own endpoints answer.
        assert_eq!(agent.readiness().0, 200, "{}", agent.log());
        assert!(agent.metrics().contains("mesh_config_generation"));
        let share = cpu_share(agent.pid(), Duration::from_secs(2));
        assert!(share <= not_spinning(idle), "the agent used {share:.2} of a core while full, {idle:.2} idle");
        release(holder);
        wait_until(|| proxied_ok(&cgroup), || agent.log());
        agent.stop();
    });
}

#[test]
fn running_out_of_file_descriptors_is_logged_and_waited_out() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("limits-fds");
        let agent = Agent::start(AgentSpec::new(&config(), &cgroup));
        assert!(proxied_ok(&cgroup), "{}", agent.log());
        let idle = cpu_share(agent.pid(), Duration::from_secs(2));
        // Lower the limit under the running agent: its proxy's cap no longer protects it.
        let limit = (agent.open_fds() + 40) as u64;
        let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
        // SAFETY: valid rlimit buffer; the pid is our child's.
        let set = unsafe { libc::prlimit(agent.pid() as i32, libc::RLIMIT_NOFILE, &rlimit, std::ptr::null_mut()) };
        assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
        let holder = hold_idle(&cgroup, 100);
        wait_until(|| agent.log().contains("cannot accept connections"), || agent.log());
        // Waiting, not spinning on accept.
        let share = cpu_share(agent.pid(), Duration::from_secs(2));
        assert!(share <= not_spinning(idle), "the agent used {share:.2} of a core while out of descriptors, {idle:.2} idle");
        release(holder);
        wait_until(|| proxied_ok(&cgroup), || agent.log());
        assert!(agent.log().contains("accepting connections again"), "{}", agent.log());
        agent.stop();
    });
}

#[test]
fn only_the_agents_user_may_stop_it() {
    use std::os::unix::process::CommandExt as _;
    in_netns(|| {
        let cgroup = TestCgroup::new("limits-quit");
        let mut agent = Agent::start(AgentSpec::new(&config(), &cgroup));
        // Asks from another user, or from a process in a mount namespace of its own (what a
        // host-network pod running as root is: another container, the same network).
        let quit = |uid: Option<u32>, other_container: bool| {
            let mut cmd = std::process::Command::new(probe_bin());
            cmd.args(["raw", agent.admin_addr(), "quit"]);
            if let Some(uid) = uid {
                cmd.uid(uid).gid(uid);
            }
            if other_container {
                // SAFETY: only async-signal-safe calls between fork and exec.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::unshare(libc::CLONE_NEWNS) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            let out = cmd.output().expect("mesh-probe");
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
        };
        let nobody = quit(Some(65534), false);
        assert!(nobody["status"].as_str().is_some_and(|s| s.starts_with("HTTP/1.1 403")), "{nobody}");
        let root_elsewhere = quit(None, true);
        assert!(root_elsewhere["status"].as_str().is_some_and(|s| s.starts_with("HTTP/1.1 403")), "{root_elsewhere}");
        assert!(agent.log().contains("runs in another container"), "{}", agent.log());
        assert_eq!(agent.readiness().0, 200, "still running");
        let root = quit(None, false);
        assert!(root["status"].as_str().is_some_and(|s| s.starts_with("HTTP/1.1 200")), "{root}");
        let log = agent.log_path();
        wait_until(|| agent.exited(), || std::fs::read_to_string(&log).unwrap_or_default());
        agent.stop();
    });
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

#[test]
fn memory_comes_back_after_thousands_of_connections_close() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("limits-rss");
        let agent = Agent::start(AgentSpec::new(&config(), &cgroup));
        assert!(proxied_ok(&cgroup), "{}", agent.log());
        let idle = rss_kib(agent.pid());
        let holder = hold_idle(&cgroup, 3000);
        // Every connection accepted (the proxy counts them open).
        let busy = rss_kib(agent.pid());
        release(holder);
        // Back within 10% of idle, once the proxy has seen them close (it looks every 2 s).
        wait_until_for(
            Duration::from_secs(60),
            || rss_kib(agent.pid()) * 10 <= idle * 11,
            || format!("RSS {} KiB after the connections closed; {idle} KiB idle, {busy} KiB with them open", rss_kib(agent.pid())),
        );
        agent.stop();
    });
}
