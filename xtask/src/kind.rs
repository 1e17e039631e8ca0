//! `cargo xtask kind`: mesh end to end in a kind cluster, on a machine with Docker and kind.
//! Creates a cluster (a pinned node image; the nodes' kernel must be 5.10 or newer), loads the
//! image `cargo xtask image` builds, applies deploy/ and the example app, and checks from a
//! client pod: a Service VIP balanced over its endpoints (in the kernel, and through the proxy
//! for the routed Service), the HTTPRoute's header split,
//! the agents' metrics, and a rolling restart of the agents under a client connecting in a
//! loop without one failed connection. The cluster is deleted at the end, passed or failed
//! (`--keep` leaves it for a look).
//!
//! The steps that decide (preflight, kernel versions, answers counted) are functions with unit
//! tests; the commands themselves need Docker, which the machines this project is developed on
//! do not have.
use std::{
    collections::BTreeMap,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{bootstrap::workspace_root, image};

const CLUSTER: &str = "mesh-e2e";
/// kind v0.29's node image for Kubernetes 1.33.
const NODE_IMAGE: &str = "kindest/node:v1.33.1";
/// The Gateway API CRDs the example's HTTPRoute needs.
const GATEWAY_API_CRDS: &str = "https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.3.0/standard-install.yaml";
const CLIENT_IMAGE: &str = "curlimages/curl:8.11.1";
const NAMESPACE: &str = "mesh-demo";
const MIN_KERNEL: (u32, u32) = (5, 10);

/// Two nodes: the client and the echo pods spread over both.
const CLUSTER_CONFIG: &str = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n- role: worker\n";

/// What is missing on this machine for the kind test, each with how to get it.
pub fn missing_tools(found: impl Fn(&str) -> bool) -> Vec<&'static str> {
    [
        ("docker", "Docker (a running engine): https://docs.docker.com/engine/install/"),
        ("kind", "kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation"),
        ("kubectl", "kubectl: https://kubernetes.io/docs/tasks/tools/"),
    ]
    .into_iter()
    .filter(|(tool, _)| !found(tool))
    .map(|(_, how)| how)
    .collect()
}

/// The nodes whose kernel is older than 5.10 (or unreadable), from `kubectl get nodes`'
/// "name kernelVersion" lines.
pub fn old_kernels(nodes: &str) -> Vec<String> {
    nodes
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|line| {
            let version = line.split_whitespace().nth(1).unwrap_or("");
            let mut parts = version.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
            match (parts.next(), parts.next()) {
                (Some(major), Some(minor)) => (major, minor) < MIN_KERNEL,
                _ => true,
            }
        })
        .map(str::to_owned)
        .collect()
}

/// Answers counted by text (pod names from /hostname, or status codes).
pub fn tally(answers: &str) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for answer in answers.lines().map(str::trim).filter(|a| !a.is_empty()) {
        *counts.entry(answer.to_owned()).or_insert(0) += 1;
    }
    counts
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let on_path = |tool: &str| Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    let missing = missing_tools(on_path);
    if !missing.is_empty() {
        bail!("cargo xtask kind needs:\n- {}", missing.join("\n- "));
    }
    if !Command::new("docker").arg("info").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        bail!("cargo xtask kind needs a running Docker engine (`docker info` failed)");
    }
    let (archive, reference, _) = image::run()?;
    println!("[kind] creating cluster {CLUSTER} ({NODE_IMAGE}, two nodes)");
    let config = workspace_root().join("target/kind-config.yaml");
    std::fs::write(&config, CLUSTER_CONFIG)?;
    sh(Command::new("kind")
        .args(["create", "cluster", "--name", CLUSTER, "--image", NODE_IMAGE, "--wait", "120s", "--config"])
        .arg(&config))?;
    let outcome = checks(&archive, &reference);
    if keep {
        println!("[kind] cluster {CLUSTER} kept (--keep): `kind delete cluster --name {CLUSTER}` removes it");
    } else {
        println!("[kind] deleting cluster {CLUSTER}");
        sh(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))?;
    }
    outcome?;
    println!("[kind] all checks passed");
    Ok(())
}

fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("kubectl").arg("--context").arg(format!("kind-{CLUSTER}")).args(args).output().context("kubectl")?;
    if !out.status.success() {
        bail!("kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("{cmd:?}"))?;
    anyhow::ensure!(status.success(), "{cmd:?} failed ({status})");
    Ok(())
}

/// `command` in the client pod; its output.
fn in_client(command: &str) -> anyhow::Result<String> {
    kubectl(&["-n", NAMESPACE, "exec", "client", "--", "sh", "-c", command])
}

fn checks(archive: &std::path::Path, reference: &image::Reference) -> anyhow::Result<()> {
    let nodes =
        kubectl(&["get", "nodes", "-o", "jsonpath={range .items[*]}{.metadata.name} {.status.nodeInfo.kernelVersion}{\"\\n\"}{end}"])?;
    let old = old_kernels(&nodes);
    anyhow::ensure!(old.is_empty(), "nodes with a kernel older than 5.10: {old:?}");
    println!("[kind] nodes:\n{nodes}");

    println!("[kind] loading {reference}");
    sh(Command::new("kind").args(["load", "image-archive"]).arg(archive).args(["--name", CLUSTER]))?;
    kubectl(&["apply", "--server-side", "-f", GATEWAY_API_CRDS])?;
    kubectl(&["apply", "-k", &workspace_root().join("deploy").display().to_string()])?;
    kubectl(&["-n", "mesh-system", "rollout", "status", "daemonset/mesh", "--timeout=180s"])?;
    kubectl(&["apply", "-f", &workspace_root().join("deploy/examples/kubernetes").display().to_string()])?;
    for deployment in ["echo-v1", "echo-v2"] {
        kubectl(&["-n", NAMESPACE, "rollout", "status", &format!("deployment/{deployment}"), "--timeout=180s"])?;
    }
    kubectl(&["-n", NAMESPACE, "run", "client", "--image", CLIENT_IMAGE, "--restart=Never", "--command", "--", "sleep", "3600"])?;
    kubectl(&["-n", NAMESPACE, "wait", "pod/client", "--for=condition=Ready", "--timeout=120s"])?;
    let pods = |version: &str| -> anyhow::Result<Vec<String>> {
        let names = kubectl(&["-n", NAMESPACE, "get", "pods", "-l", &format!("app=echo,version={version}"), "-o", "name"])?;
        Ok(names.lines().map(|n| n.trim_start_matches("pod/").to_owned()).collect())
    };
    let (v1, v2) = (pods("v1")?, pods("v2")?);

    // L4: echo-v1 has no route, so the kernel balances its VIP at connect(): both pods answer.
    let l4 = tally(&in_client("for i in $(seq 40); do curl -s --max-time 5 http://echo-v1/hostname; echo; done")?);
    println!("[kind] 40 requests to echo-v1 (balanced in the kernel): {l4:?}");
    anyhow::ensure!(
        l4.keys().all(|p| v1.contains(p)) && v1.iter().all(|p| l4.get(p).copied().unwrap_or(0) >= 5),
        "echo-v1 not balanced over {v1:?}: {l4:?}"
    );
    // L7: through the node's proxy. Without the header every answer is a v1 pod, both of them.
    let plain = tally(&in_client("for i in $(seq 60); do curl -s --max-time 5 http://echo/hostname; echo; done")?);
    println!("[kind] 60 requests to echo: {plain:?}");
    anyhow::ensure!(plain.keys().all(|p| v1.contains(p)), "answers not from v1 pods {v1:?}: {plain:?}");
    anyhow::ensure!(v1.iter().all(|p| plain.get(p).copied().unwrap_or(0) >= 10), "v1 pods not balanced: {plain:?}");
    // The HTTPRoute's split: the header sends every request to v2.
    let split = tally(&in_client("for i in $(seq 20); do curl -s --max-time 5 -H 'x-version: v2' http://echo/hostname; echo; done")?);
    println!("[kind] 20 requests with x-version: v2: {split:?}");
    anyhow::ensure!(split.keys().all(|p| v2.contains(p)) && split.values().sum::<u32>() == 20, "answers not all from v2 {v2:?}: {split:?}");

    // The agents' metrics, from the node the client runs on.
    let host_ip = kubectl(&["-n", NAMESPACE, "get", "pod", "client", "-o", "jsonpath={.status.hostIP}"])?;
    let metrics = in_client(&format!("curl -s --max-time 5 http://{host_ip}:15020/metrics"))?;
    anyhow::ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains("destination_service=\"echo.mesh-demo.svc.cluster.local\"")),
        "no request metrics for echo on {host_ip}:\n{metrics}"
    );

    // A rolling restart of the agents under a client connecting in a loop: no failure.
    println!("[kind] restarting the agents while the client connects in a loop");
    // nohup: the loop outlives the exec session that starts it.
    in_client(
        "rm -f /tmp/codes; nohup sh -c 'for i in $(seq 900); do curl -s -o /dev/null -w \"%{http_code}\\n\" --max-time 3 http://echo/hostname || echo failed; sleep 0.1; done > /tmp/codes' > /dev/null 2>&1 &",
    )?;
    kubectl(&["-n", "mesh-system", "rollout", "restart", "daemonset/mesh"])?;
    kubectl(&["-n", "mesh-system", "rollout", "status", "daemonset/mesh", "--timeout=300s"])?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let codes = loop {
        let codes = tally(&in_client("cat /tmp/codes")?);
        if codes.values().sum::<u32>() >= 900 || Instant::now() > deadline {
            break codes;
        }
        sleep(Duration::from_secs(2));
    };
    println!("[kind] during the restart: {codes:?}");
    anyhow::ensure!(
        codes.keys().all(|c| c == "200") && codes.values().sum::<u32>() == 900,
        "failed requests during the restart: {codes:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_missing_is_named_with_where_to_get_it() {
        assert!(missing_tools(|_| true).is_empty());
        let missing = missing_tools(|tool| tool == "kubectl");
        assert_eq!(missing.len(), 2);
        assert!(missing[0].starts_with("Docker") && missing[1].starts_with("kind"), "{missing:?}");
    }

    #[test]
    fn nodes_below_5_10_are_refused() {
        let nodes = "mesh-e2e-control-plane 6.8.0-45-generic\nmesh-e2e-worker 5.10.0-33-cloud-amd64\n";
        assert!(old_kernels(nodes).is_empty());
        assert_eq!(old_kernels("a 5.4.0-150-generic\nb 6.1.0\n"), ["a 5.4.0-150-generic"]);
        assert_eq!(old_kernels("c \n"), ["c "], "an unreadable version is refused");
        assert_eq!(old_kernels("d 4.19.0\n"), ["d 4.19.0"]);
    }

    #[test]
    fn answers_are_counted() {
        let counts = tally("echo-v1-a\necho-v1-b\n\necho-v1-a\n");
        assert_eq!(counts, BTreeMap::from([("echo-v1-a".to_owned(), 2), ("echo-v1-b".to_owned(), 1)]));
    }

    #[test]
    fn the_example_and_the_agent_image_are_what_the_checks_expect() {
        let app = include_str!("../../deploy/examples/kubernetes/app.yaml");
        assert!(app.contains(&format!("namespace: {NAMESPACE}")) && app.contains("name: x-version, value: v2"));
        assert!(app.contains("args: [netexec, --http-port=8080]"), "/hostname comes from agnhost's netexec");
        let kustomization = include_str!("../../deploy/kustomization.yaml");
        let reference = image::reference(kustomization).unwrap();
        assert_eq!(reference.placeholder, "mesh");
    }
}
