//! The agent's life cycle: restarts that keep the datapath, bad configuration, the CLI.
use mesh_tests::*;
use std::process::Command;

const VIP: &str = "10.96.0.10:80";

fn web(endpoints: Vec<Endpoint<'_>>) -> String {
    ServiceYaml::web(endpoints).render()
}

#[test]
fn restart_with_keep_datapath_loses_no_connection() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let _b2 = Backend::start("b2", &["127.0.0.12:8080"]);
        let cgroup = TestCgroup::new("restart");
        let yaml = web(vec![Endpoint::ready("127.0.0.11"), Endpoint::ready("127.0.0.12")]);
        let first = Agent::start(AgentSpec { keep_datapath: true, ..AgentSpec::new(&yaml, &cgroup) });
        let bpffs = first.bpffs.clone();
        let _pins = PinsGuard(bpffs.clone());

        let stop_file = std::env::temp_dir().join(unique_name("stop"));
        let client = cgroup
            .command(probe_bin())
            .args(["loop", VIP, stop_file.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn loop client");

        std::thread::sleep(std::time::Duration::from_millis(200));
        first.stop();
        assert!(bpffs.join("mesh_frontends").exists(), "--keep-datapath keeps the maps pinned");
        // While no agent runs, the kernel keeps balancing, and `mesh services` reads the pins.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let services = run(Command::new(mesh_bin()).args(["services", "--json", "--bpffs", bpffs.to_str().unwrap()]));
        let services: Value = serde_json::from_str(&services).expect("json");
        assert_eq!(services[0]["frontend"], VIP, "{services}");
        assert_eq!(services[0]["backends"].as_array().map(Vec::len), Some(2), "{services}");

        let second = Agent::start(AgentSpec { bpffs: Some(bpffs.clone()), ..AgentSpec::new(&yaml, &cgroup) });
        assert!(second.log().contains("Adopted"), "second agent adopts the pinned datapath:\n{}", second.log());
        std::thread::sleep(std::time::Duration::from_millis(200));
        std::fs::write(&stop_file, b"").expect("stop file");
        let out = client.wait_with_output().expect("client");
        let _ = std::fs::remove_file(&stop_file);
        let result: Value = serde_json::from_slice(&out.stdout).expect("client json");
        assert_eq!(error_count(&result), 0, "no connection may fail across the restart: {result}");
        assert!(result["ok"].as_u64().unwrap_or(0) > 50, "the client kept connecting: {result}");
        second.stop();
        assert!(!bpffs.exists(), "the last agent, without --keep-datapath, removes every pin");
    });
}

#[test]
fn a_restart_with_take_over_refuses_no_l7_request() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("take-over");
        // An L7 Service: its connections go to the agent's proxy, which is what restarts.
        let yaml = format!(
            "{}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: web, namespace: test}}\n\
             spec:\n  parentRefs: [{{kind: Service, name: web, port: 80}}]\n  rules:\n  - backendRefs: [{{name: web, port: 80}}]\n",
            web(vec![Endpoint::ready("127.0.0.11")])
        );
        // keep_datapath only so that stopping it later does not expect the pins gone: a
        // handed-over agent leaves the datapath to its successor either way.
        let mut first = Agent::start(AgentSpec { keep_datapath: true, ..AgentSpec::new(&yaml, &cgroup) });
        let bpffs = first.bpffs.clone();
        let _pins = PinsGuard(bpffs.clone());
        assert_eq!(names(&cgroup.probe(&["get", VIP, "/", "1"])), vec![("b1".to_owned(), 1)], "{}", first.log());

        let stop_file = std::env::temp_dir().join(unique_name("stop"));
        let client = cgroup
            .command(probe_bin())
            .args(["http-loop", VIP, stop_file.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the request loop");
        std::thread::sleep(std::time::Duration::from_millis(300));
        let second =
            Agent::start(AgentSpec { bpffs: Some(bpffs.clone()), extra_args: vec!["--take-over"], ..AgentSpec::new(&yaml, &cgroup) });
        // The first one leaves of itself once it has drained.
        let log = first.log_path();
        // (It serves until the new one serves, then drains: a slow start makes this long.)
        wait_until_for(std::time::Duration::from_secs(120), || first.exited(), || std::fs::read_to_string(&log).unwrap_or_default());
        assert!(first.log().contains("a new agent took the listeners"), "{}", first.log());
        assert!(first.log().contains("successor=Serving"), "the old agent stopped when the new one served: {}", first.log());
        assert!(second.log().contains("took over the listeners"), "{}", second.log());
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::fs::write(&stop_file, b"").expect("stop file");
        let out = client.wait_with_output().expect("client");
        let _ = std::fs::remove_file(&stop_file);
        let result: Value = serde_json::from_slice(&out.stdout).expect("client json");
        assert_eq!(result["errors"], serde_json::json!({}), "no request may fail across the restart: {result}");
        let answered = result["names"]["b1"].as_u64().unwrap_or(0);
        assert_eq!(result["names"].as_object().map(|n| n.len()), Some(1), "every answer from the backend: {result}");
        assert!(answered > 20, "the client kept asking: {result}");
        first.stop();
        assert!(bpffs.join("mesh_frontends").exists(), "the datapath stayed for the successor");
        assert_eq!(names(&cgroup.probe(&["get", VIP, "/", "3"])), vec![("b1".to_owned(), 3)], "{}", second.log());
        second.stop();
    });
}

#[test]
fn invalid_configuration_is_rejected_whole_and_the_last_good_one_keeps_serving() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("invalid");
        let good = web(vec![Endpoint::ready("127.0.0.11")]);
        let agent = Agent::start(AgentSpec::new(&good, &cgroup));
        let before = agent.config_dump()["services"].clone();

        // A valid new Service next to a broken one: neither may be applied.
        let bad = format!(
            "{good}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: other, namespace: test}}\nspec:\n  clusterIP: 10.96.0.20\n  ports:\n  - {{name: a, port: 70000}}\n"
        );
        agent.write_config(&bad);
        wait_until(|| agent.readiness().1.contains("rejected"), || format!("{:?}", agent.readiness()));
        let (code, body) = agent.readiness();
        assert_eq!(code, 200, "still ready, on the last good configuration: {body}");
        assert!(body.contains("Service test/other: spec.ports[0].port"), "names object and field: {body}");
        assert!(body.contains("services.yaml"), "names the file: {body}");
        assert_eq!(agent.config_dump()["services"], before, "nothing of the bad configuration applied");
        let answer = cgroup.probe(&["tcp", VIP, "10"]);
        assert_eq!(names(&answer), vec![("b1".to_owned(), 10)], "{answer}");
        assert!(agent.log().contains("configuration rejected"), "{}", agent.log());

        // Fixing it applies it.
        agent.write_config(&good.replace("127.0.0.11", "127.0.0.12"));
        agent.wait_backends(VIP, &["127.0.0.12:8080"]);
        assert!(!agent.readiness().1.contains("rejected"));
        agent.stop();
    });
}

#[test]
fn removing_every_service_leaves_no_map_entries() {
    in_netns(|| {
        let cgroup = TestCgroup::new("empty");
        let agent = Agent::start(AgentSpec::new(&web(vec![Endpoint::ready("127.0.0.11")]), &cgroup));
        agent.write_config("# nothing\n");
        wait_until(
            || agent.config_dump()["services"].as_array().map(Vec::len) == Some(0),
            || format!("services not removed: {}", agent.config_dump()),
        );
        let services = run(Command::new(mesh_bin()).args(["services", "--json", "--bpffs", agent.bpffs.to_str().unwrap()]));
        assert_eq!(services.trim(), "[]");
        agent.stop();
    });
}

#[test]
fn check_reports_every_program_attachable() {
    assert_root();
    let out = Command::new(mesh_bin()).args(["check", "--json"]).output().expect("mesh check");
    let rows: Value = serde_json::from_slice(&out.stdout).expect("json");
    let rows = rows.as_array().expect("rows");
    for program in ["mesh_connect4", "mesh_connect6", "mesh_sendmsg4", "mesh_recvmsg6", "mesh_getpeer4"] {
        let row = rows.iter().find(|r| r["check"] == format!("program {program}")).unwrap_or_else(|| panic!("no row for {program}"));
        assert_eq!(row["ok"], true, "{row}");
    }
    let redirection = rows.iter().find(|r| r["check"] == "same-node redirection").expect("redirection row");
    assert_eq!(redirection["optional"], true);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    if (version.next().unwrap(), version.next().unwrap()) >= (5, 15) {
        assert_eq!(redirection["ok"], true, "{redirection}");
    } else {
        // Older kernels: reported as missing, with the reason, and not a failure of the check.
        assert_eq!(redirection["ok"], false, "{redirection}");
        assert!(redirection["detail"].as_str().unwrap().contains("needs 5.15+"), "{redirection}");
    }
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Nothing left behind by the probe.
    let leftovers: Vec<_> = std::fs::read_dir(cgroup2_root())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("mesh-check-"))
        .collect();
    assert!(leftovers.is_empty(), "mesh check left cgroups behind");
}

#[test]
fn config_validate_names_file_object_and_field() {
    let dir = std::env::temp_dir().join(unique_name("validate"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.yaml");
    std::fs::write(&file, "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.300\n")
        .unwrap();
    let out = Command::new(mesh_bin()).args(["config", "validate"]).arg(&file).output().expect("mesh config validate");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml: Service shop/web: spec.clusterIP: not an IP address"), "{err}");
}

#[test]
fn kernel_logging_is_off_by_default_and_reaches_the_agent_log_when_on() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("bpflog");
        let yaml = web(vec![Endpoint::ready("127.0.0.11")]);
        let record = "to backend port 8080";

        let quiet = Agent::start(AgentSpec::new(&yaml, &cgroup));
        cgroup.probe(&["tcp", VIP, "3"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!quiet.log().contains(record), "{}", quiet.log());
        quiet.stop();

        let verbose = Agent::start(AgentSpec { extra_args: vec!["--bpf-log", "trace"], ..AgentSpec::new(&yaml, &cgroup) });
        cgroup.probe(&["tcp", VIP, "3"]);
        wait_until(|| verbose.log().matches(record).count() >= 3, || format!("kernel records missing:\n{}", verbose.log()));
        verbose.stop();
    });
}

#[test]
fn restart_with_another_cgroup_moves_the_datapath_there() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let old = TestCgroup::new("old");
        let new = TestCgroup::new("new");
        let yaml = web(vec![Endpoint::ready("127.0.0.11")]);
        let first = Agent::start(AgentSpec { keep_datapath: true, ..AgentSpec::new(&yaml, &old) });
        let bpffs = first.bpffs.clone();
        let _pins = PinsGuard(bpffs.clone());
        first.stop();
        assert_eq!(names(&old.probe(&["tcp", VIP, "2"])), vec![("b1".to_owned(), 2)]);

        let second = Agent::start(AgentSpec { bpffs: Some(bpffs), ..AgentSpec::new(&yaml, &new) });
        assert!(second.log().contains("attached to another cgroup"), "{}", second.log());
        assert_eq!(names(&new.probe(&["tcp", VIP, "2"])), vec![("b1".to_owned(), 2)]);
        assert_eq!(old.probe(&["tcp", VIP, "1"])["errors"]["ENETUNREACH"], 1, "the old cgroup is no longer balanced");
        second.stop();
    });
}

#[test]
fn an_agent_started_on_a_bad_configuration_is_not_ready_until_it_is_fixed() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("unready");
        let bad = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: test}\nspec: {clusterIP: 10.96.0.10, sessionAffinity: Sticky}\n";
        let agent = Agent::start(AgentSpec { wait_ready: false, ..AgentSpec::new(bad, &cgroup) });
        // Readiness answers before the file is read: wait for the refusal to show.
        let refusal = "Service test/web: spec.sessionAffinity: must be None or ClientIP";
        wait_until(|| agent.readiness().1.contains(refusal), || format!("{:?}\n{}", agent.readiness(), agent.log()));
        let (code, body) = agent.readiness();
        assert_eq!(code, 503, "{body}");
        // Nothing is balanced yet: the VIP is unknown to the kernel.
        assert_eq!(cgroup.probe(&["tcp", VIP, "1"])["errors"]["ENETUNREACH"], 1);

        agent.write_config(&web(vec![Endpoint::ready("127.0.0.11")]));
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        assert_eq!(agent.readiness().0, 200);
        assert_eq!(names(&cgroup.probe(&["tcp", VIP, "3"])), vec![("b1".to_owned(), 3)]);
        agent.stop();
    });
}

#[test]
fn an_agent_that_cannot_attach_leaves_nothing_pinned() {
    in_netns(|| {
        // A directory that is not a cgroup: every program loads, the first attach fails.
        let not_a_cgroup = std::env::temp_dir().join(unique_name("not-a-cgroup"));
        std::fs::create_dir_all(&not_a_cgroup).expect("scratch dir");
        let bpffs = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("failed-start"));
        let _pins = PinsGuard(bpffs.clone());
        let out = Command::new(mesh_bin())
            .arg("agent")
            .args(["--config", "/dev/null", "--cgroup"])
            .arg(&not_a_cgroup)
            .arg("--bpffs")
            .arg(&bpffs)
            .args(["--admin-addr", "127.0.0.1:17000", "--readiness-addr", "127.0.0.1:17021"])
            .args(["--metrics-addr", "127.0.0.1:17020", "--outbound-addr", "127.0.0.1:17001"])
            .output()
            .expect("mesh agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started on a plain directory:\n{stderr}");
        assert!(stderr.contains("program mesh_connect4"), "the error names the program:\n{stderr}");
        assert!(!bpffs.exists(), "pins left behind: {:?}", std::fs::read_dir(&bpffs).map(|d| d.count()));
        let _ = std::fs::remove_dir(&not_a_cgroup);
    });
}

#[test]
fn the_cli_without_privileges_names_the_errno_and_does_not_blame_a_missing_agent() {
    in_netns(|| {
        let cgroup = TestCgroup::new("unprivileged");
        let agent = Agent::start(AgentSpec::new(&web(vec![Endpoint::ready("127.0.0.11")]), &cgroup));
        // A copy anyone may run: the build tree may not be reachable for `nobody`.
        let bin = std::env::temp_dir().join(unique_name("mesh-cli"));
        std::fs::copy(mesh_bin(), &bin).expect("copy mesh");
        for args in [&["services"][..], &["conns"][..]] {
            // As `nobody`: setuid away from root clears every capability.
            let out =
                std::os::unix::process::CommandExt::gid(std::os::unix::process::CommandExt::uid(&mut Command::new(&bin), 65534), 65534)
                    .args(args)
                    .args(["--bpffs", agent.bpffs.to_str().unwrap()])
                    .output()
                    .expect("mesh as nobody");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{args:?} worked without privileges:\n{stderr}");
            assert!(stderr.contains("Permission denied") || stderr.contains("not permitted"), "{args:?}: names the errno:\n{stderr}");
            assert!(stderr.contains("needs root"), "{args:?}:\n{stderr}");
            assert!(!stderr.contains("is an agent running"), "{args:?}: the agent is running; the cause is permissions:\n{stderr}");
        }
        let _ = std::fs::remove_file(&bin);
        agent.stop();
    });
}

#[test]
fn a_restart_reading_many_files_never_drops_an_adopted_service_meanwhile() {
    in_netns(|| {
        let _b1 = Backend::start("b1", &["127.0.0.11:8080"]);
        let cgroup = TestCgroup::new("restart-many");
        // The Service the client uses sorts last, after many files of other Services.
        let config_dir = std::env::temp_dir().join(unique_name("many-files"));
        std::fs::create_dir_all(&config_dir).expect("config dir");
        for i in 0..150 {
            let other = ServiceYaml {
                name: &format!("s{i}"),
                cluster_ip: &format!("10.96.1.{}", i + 1),
                ..ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")])
            }
            .render();
            std::fs::write(config_dir.join(format!("a{i:03}.yaml")), other).expect("other file");
        }
        std::fs::write(config_dir.join("z-web.yaml"), web(vec![Endpoint::ready("127.0.0.11")])).expect("web file");
        let first = Agent::start(AgentSpec { keep_datapath: true, config_path: Some(config_dir.clone()), ..AgentSpec::new("", &cgroup) });
        let bpffs = first.bpffs.clone();
        let _pins = PinsGuard(bpffs.clone());
        first.wait_backends(VIP, &["127.0.0.11:8080"]);
        first.stop();

        let stop_file = std::env::temp_dir().join(unique_name("stop"));
        let client = cgroup
            .command(probe_bin())
            .args(["loop", VIP, stop_file.to_str().unwrap()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("loop client");
        std::thread::sleep(std::time::Duration::from_millis(100));
        // The next agent adopts the pinned datapath and reads the 151 files one by one: the
        // kernel must keep serving what it has until everything is read.
        let second =
            Agent::start(AgentSpec { bpffs: Some(bpffs.clone()), config_path: Some(config_dir.clone()), ..AgentSpec::new("", &cgroup) });
        second.wait_backends(VIP, &["127.0.0.11:8080"]);
        std::thread::sleep(std::time::Duration::from_millis(100));
        std::fs::write(&stop_file, b"").expect("stop file");
        let out = client.wait_with_output().expect("client");
        let _ = std::fs::remove_file(&stop_file);
        let result: Value = serde_json::from_slice(&out.stdout).expect("client json");
        assert_eq!(error_count(&result), 0, "no connection may fail while the restarted agent reads its files: {result}");
        second.stop();
        let _ = std::fs::remove_dir_all(&config_dir);
    });
}
