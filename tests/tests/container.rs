//! The shipped image, run as the DaemonSet runs it: `cargo xtask image`'s archive loaded into
//! podman (a real OCI runtime) and started with deploy/daemonset.yaml's pod spec (its args and
//! env as kubelet expands them, its securityContext, host mounts and host network), against
//! the Kubernetes API double, in a network namespace of the test's own. Host only: the kernel
//! VMs have no container runtime (xtask's kernel matrix leaves this file out, saying so).
//!
//! One deviation from the pod spec, for the machine's sake: the agent is given `--cgroup` (a
//! test cgroup) instead of attaching at the node's cgroup root, and its bpffs is a directory
//! of the test's own.
use std::{path::PathBuf, process::Command, time::Duration};

use mesh_tests::{
    Backend, Endpoint, ServiceYaml, TestCgroup, cgroup2_root, http_get, in_netns, kube_api::KubeApi, names, remove_pins, unique_name,
    wait_until_for,
};
use serde_yaml::Value;

const DAEMONSET: &str = include_str!("../../deploy/daemonset.yaml");
const VIP: &str = "10.96.0.10:80";
/// Gateway API CRDs not installed: the agent must run without them.
const HTTPROUTES: &str = "apis/gateway.networking.k8s.io/v1/httproutes";
const GRPCROUTES: &str = "apis/gateway.networking.k8s.io/v1/grpcroutes";

fn image_archive() -> PathBuf {
    std::env::var_os("MESH_IMAGE").map(PathBuf::from).unwrap_or_else(|| {
        let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/image/mesh.oci.tar");
        assert!(built.exists(), "no image: run `cargo xtask image` (or set MESH_IMAGE to its archive)");
        built
    })
}

fn podman(args: &[&str]) -> std::process::Output {
    Command::new("podman").args(args).output().unwrap_or_else(|e| panic!("podman {args:?}: {e} (is podman installed?)"))
}

/// The agent container of the DaemonSet's pod template.
fn pod_spec() -> (Value, Value) {
    let daemonset: Value = serde_yaml::from_str(DAEMONSET).expect("deploy/daemonset.yaml");
    let pod = daemonset["spec"]["template"]["spec"].clone();
    let container =
        pod["containers"].as_sequence().and_then(|c| c.iter().find(|c| c["name"] == "agent")).cloned().expect("container agent");
    (pod, container)
}

/// `$(NAME)` references in `arg` expanded from `env`, as kubelet does.
fn expand(arg: &str, env: &[(String, String)]) -> String {
    env.iter().fold(arg.to_owned(), |arg, (name, value)| arg.replace(&format!("$({name})"), value))
}

/// Removes the container, the image and the pins when the test ends, passed or not.
struct Cleanup {
    container: String,
    image: Option<String>,
    bpffs: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", &self.container]);
        if let Some(image) = &self.image {
            let _ = podman(&["rmi", "--force", image]);
        }
        if self.bpffs.exists() {
            remove_pins(&self.bpffs.join("mesh"));
            let _ = std::fs::remove_dir(&self.bpffs);
        }
    }
}

#[test]
fn the_image_runs_with_the_daemonsets_pod_spec_and_balances_a_cgroups_connections() {
    let (pod, container) = pod_spec();
    let name = unique_name("container");
    let bpffs = PathBuf::from("/sys/fs/bpf").join(&name);
    let mut cleanup = Cleanup { container: name.clone(), image: None, bpffs: bpffs.clone() };
    // The archive reads as both formats it claims: an OCI layout (podman, skopeo, containerd's
    // `kind load image-archive`) and `docker save`'s (docker load reads manifest.json).
    let archive = image_archive();
    for transport in ["oci-archive", "docker-archive"] {
        let out = Command::new("skopeo").args(["inspect", &format!("{transport}:{}", archive.display())]).output().expect("skopeo");
        assert!(out.status.success(), "skopeo inspect {transport}: {}", String::from_utf8_lossy(&out.stderr));
        let inspected: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(inspected["Architecture"], "amd64", "{transport}: {inspected}");
        assert_eq!(inspected["Labels"]["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"), "{transport}: {inspected}");
    }
    let loaded = podman(&["load", "--quiet", "--input", archive.to_str().unwrap()]);
    assert!(loaded.status.success(), "podman load: {}", String::from_utf8_lossy(&loaded.stderr));
    let image = String::from_utf8_lossy(&loaded.stdout).lines().find_map(|l| l.strip_prefix("Loaded image: ")).map(str::to_owned);
    let image = image.expect("podman load names the image");
    cleanup.image = Some(image.clone());

    in_netns(|| {
        let _backend = Backend::start("b1", &["127.0.0.11:8080"]);
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")]).render());
        let cgroup = TestCgroup::new("container");
        std::fs::create_dir_all(&bpffs).unwrap();

        // The pod's env as kubelet resolves it (fieldRefs: this "node").
        let mut env: Vec<(String, String)> = Vec::new();
        for var in container["env"].as_sequence().expect("env") {
            let key = var["name"].as_str().unwrap().to_owned();
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => "mesh-system".to_owned(),
                Some("spec.nodeName") => "node-a".to_owned(),
                Some("status.hostIP") => "127.0.0.1".to_owned(),
                Some(other) => panic!("a fieldRef this test does not resolve: {other}"),
                None => var["value"].as_str().expect("value").to_owned(),
            };
            env.push((key, value));
        }
        // What kubelet gives every pod: the API server's address.
        env.push(("KUBERNETES_SERVICE_HOST".into(), api.addr.ip().to_string()));
        env.push(("KUBERNETES_SERVICE_PORT".into(), api.addr.port().to_string()));

        let mut args: Vec<String> = vec!["run".into(), "--detach".into(), "--name".into(), name.clone()];
        // This machine's runc may not raise limits (no CAP_SYS_RESOURCE): keep the caller's.
        args.extend(["--runtime", "runc", "--ulimit", "nofile=1024:20000", "--ulimit", "nproc=1024:1024"].map(String::from));
        assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "the DaemonSet uses the node's network");
        args.extend(["--network".into(), "host".into()]);
        if container["securityContext"]["privileged"].as_bool() == Some(true) {
            args.push("--privileged".into());
        }
        if let Some(limit) = container["resources"]["limits"]["memory"].as_str() {
            args.extend(["--memory".into(), limit.trim_end_matches('i').to_lowercase()]);
        }
        // Volumes: each hostPath mounted where the container says, with its propagation.
        for mount in container["volumeMounts"].as_sequence().expect("volumeMounts") {
            let volume = pod["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == mount["name"]).expect("volume");
            let host = volume["hostPath"]["path"].as_str().expect("hostPath");
            let host = if host == "/sys/fs/bpf" { bpffs.to_str().unwrap().to_owned() } else { host.to_owned() };
            let mut options = vec![if mount["readOnly"].as_bool() == Some(true) { "ro" } else { "rw" }];
            if mount["mountPropagation"] == "Bidirectional" {
                options.push("rshared");
            }
            args.extend(["--volume".into(), format!("{host}:{}:{}", mount["mountPath"].as_str().unwrap(), options.join(","))]);
        }
        let account = api.service_account("mesh-system");
        args.extend(["--volume".into(), format!("{}:/var/run/secrets/kubernetes.io/serviceaccount:ro", account.display())]);
        for (key, value) in &env {
            args.extend(["--env".into(), format!("{key}={value}")]);
        }
        args.push(image.clone());
        for arg in container["args"].as_sequence().expect("args") {
            args.push(expand(arg.as_str().unwrap(), &env));
        }
        args.extend(["--cgroup".into(), cgroup.path.display().to_string()]);
        assert!(cgroup.path.starts_with(cgroup2_root()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = podman(&args);
        assert!(started.status.success(), "podman {args:?}: {}", String::from_utf8_lossy(&started.stderr));
        let logs = || String::from_utf8_lossy(&podman(&["logs", &name]).stderr).into_owned();

        // The probes kubelet would make, on the node's loopback.
        let ready = || http_get("127.0.0.1:15021", "/healthz/ready").is_ok_and(|(code, _)| code == 200);
        wait_until_for(Duration::from_secs(60), ready, || format!("{:?}\n{}", http_get("127.0.0.1:15021", "/healthz/ready"), logs()));
        assert_eq!(http_get("127.0.0.1:15021", "/healthz/live").unwrap().0, 200);
        let (code, metrics) = http_get("127.0.0.1:15020", "/metrics").unwrap();
        assert!(code == 200 && metrics.contains("mesh_config_generation"), "{metrics}");

        // A process of the test cgroup dials the Service's VIP: the kernel programs the
        // containerized agent attached send it to the endpoint.
        let answer = cgroup.probe(&["tcp", VIP, "5"]);
        assert_eq!(names(&answer), [("b1".to_owned(), 5)], "{answer}\n{}", logs());

        // Stopped as kubelet stops it (SIGTERM, then the grace period): it exits cleanly, and
        // with --keep-datapath the kernel keeps balancing without it.
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30).to_string();
        let stopped = podman(&["stop", "--time", &grace, &name]);
        assert!(stopped.status.success(), "podman stop: {}", String::from_utf8_lossy(&stopped.stderr));
        let exit = podman(&["inspect", "--format", "{{.State.ExitCode}}", &name]);
        assert_eq!(String::from_utf8_lossy(&exit.stdout).trim(), "0", "{}", logs());
        let answer = cgroup.probe(&["tcp", VIP, "2"]);
        assert_eq!(names(&answer), [("b1".to_owned(), 2)], "kept datapath: {answer}");

        // Nothing else is left: the container is gone once removed, and the pins with their
        // directory once the datapath is taken down.
        drop(podman(&["rm", &name]));
        let listed = podman(&["ps", "--all", "--quiet", "--filter", &format!("name={name}")]);
        assert!(String::from_utf8_lossy(&listed.stdout).trim().is_empty(), "container still listed");
        remove_pins(&bpffs.join("mesh"));
        let _ = std::fs::remove_dir(&bpffs);
        assert!(!bpffs.exists(), "bpffs directory left: {}", bpffs.display());
    });
}
