//! Monitoring as users run it: a real Prometheus (Debian's) scrapes a running agent with the
//! job of deploy/monitoring/prometheus.yaml, its relabeling fed what Kubernetes service
//! discovery would give for a pod of deploy/daemonset.yaml (Debian builds Prometheus without
//! Kubernetes discovery, so the target is static and the pod's metadata comes from the
//! manifest); `promtool check metrics` passes on the exposition; and every query of
//! deploy/monitoring/grafana-dashboard.json is valid PromQL whose metrics and labels exist.
//! Host only: the kernel VMs have no Prometheus.
use std::{
    collections::BTreeSet,
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use mesh_tests::{Agent, AgentSpec, Backend, Endpoint, ServiceYaml, TestCgroup, http_get, in_netns, unique_name, wait_until_for};

const PROMETHEUS_CONFIG: &str = include_str!("../../deploy/monitoring/prometheus.yaml");
const DASHBOARD: &str = include_str!("../../deploy/monitoring/grafana-dashboard.json");
const DAEMONSET: &str = include_str!("../../deploy/daemonset.yaml");

/// An L7 Service (`web`, HTTPRoute) and an L4 one (`api`) on one backend, and an L7 one whose
/// endpoints, one answering 500 (`flaky`, retried: retries and an ejection to count).
fn services() -> String {
    let route = |name: &str, retry: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: test}}\n\
             spec:\n  parentRefs: [{{kind: Service, name: {name}}}]\n  rules:\n  - backendRefs: [{{name: {name}, port: 80}}]\n{retry}"
        )
    };
    let web = ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")]).render();
    let mut api = ServiceYaml::web(vec![Endpoint::ready("127.0.0.11")]);
    (api.name, api.cluster_ip) = ("api", "10.96.0.20");
    // Two endpoints: the only one would never be ejected.
    let mut flaky = ServiceYaml::web(vec![Endpoint::ready("127.0.0.12"), Endpoint::ready("127.0.0.13")]);
    (flaky.name, flaky.cluster_ip) = ("flaky", "10.96.0.30");
    format!(
        "{web}---\n{}---\n{}---\n{}---\n{}",
        api.render(),
        flaky.render(),
        route("web", ""),
        route("flaky", "    retry: {codes: [500], attempts: 1, backoff: 1ms}\n")
    )
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// An instant query against Prometheus's HTTP API: the JSON answer.
fn query(prometheus: &str, promql: &str) -> serde_json::Value {
    let (code, body) = http_get(prometheus, &format!("/api/v1/query?query={}", percent_encode(promql))).expect("query Prometheus");
    assert!(code == 200 || code == 400 || code == 422, "{code}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The scrape job of deploy/monitoring/prometheus.yaml with a static target in place of
/// Kubernetes discovery: the labels discovery would give a pod of the DaemonSet.
fn scrape_config(metrics_port: u16) -> String {
    let mut config: serde_yaml::Value = serde_yaml::from_str(PROMETHEUS_CONFIG).expect("prometheus.yaml");
    let daemonset: serde_yaml::Value = serde_yaml::from_str(DAEMONSET).expect("daemonset.yaml");
    let template = &daemonset["spec"]["template"]["metadata"];
    let annotation = |name: &str| template["annotations"][name].as_str().unwrap_or_else(|| panic!("annotation {name}")).to_owned();
    // The DaemonSet names the port; this agent's is another (tests run many at once).
    assert_eq!(annotation("prometheus.io/port"), "15020");
    let mut labels = serde_yaml::Mapping::new();
    for (key, value) in [
        ("__meta_kubernetes_pod_annotation_prometheus_io_scrape", annotation("prometheus.io/scrape")),
        ("__meta_kubernetes_pod_annotation_prometheus_io_path", annotation("prometheus.io/path")),
        ("__meta_kubernetes_pod_annotation_prometheus_io_port", metrics_port.to_string()),
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name", template["labels"]["app.kubernetes.io/name"].as_str().unwrap().to_owned()),
        ("__meta_kubernetes_pod_ip", "127.0.0.1".to_owned()),
        ("__meta_kubernetes_pod_node_name", "node-a".to_owned()),
        ("__meta_kubernetes_pod_name", "mesh-abcde".to_owned()),
    ] {
        labels.insert(key.into(), value.into());
    }
    let job = &mut config["scrape_configs"][0];
    assert_eq!(job["job_name"], "mesh");
    let job = job.as_mapping_mut().unwrap();
    assert!(job.remove("kubernetes_sd_configs").is_some(), "the job discovers pods");
    let mut group = serde_yaml::Mapping::new();
    group.insert("targets".into(), vec!["discovered-pod:0"].into());
    group.insert("labels".into(), labels.into());
    job.insert("static_configs".into(), vec![serde_yaml::Value::Mapping(group)].into());
    job.insert("scrape_interval".into(), "1s".into());
    serde_yaml::to_string(&config).unwrap()
}

/// The metric names a PromQL expression reads (mesh's, Istio's and process metrics).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for prefix in ["istio_", "mesh_", "process_"] {
        for (at, _) in expr.match_indices(prefix) {
            if at > 0 && expr.as_bytes()[at - 1].is_ascii_alphanumeric() {
                continue;
            }
            let name: String = expr[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            found.insert(name);
        }
    }
    found
}

/// The label names an expression groups by or matches on.
fn labels_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in expr.match_indices("by (") {
        let list = &expr[at + 4..];
        let list = &list[..list.find(')').unwrap()];
        found.extend(list.split(',').map(|l| l.trim().to_owned()));
    }
    for (at, _) in expr.match_indices('{') {
        let inside = &expr[at + 1..];
        let inside = &inside[..inside.find('}').unwrap()];
        for matcher in inside.split(',') {
            let name: String = matcher.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// The exposition's sample lines of `metric`.
fn samples<'a>(exposition: &'a str, metric: &str) -> Vec<&'a str> {
    exposition.lines().filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))).collect()
}

#[test]
fn prometheus_scrapes_the_agent_and_every_dashboard_query_finds_its_metrics() {
    in_netns(|| {
        let _backend = Backend::start("b1", &["127.0.0.11:8080"]);
        let _failing = Backend::start("status500", &["127.0.0.12:8080"]);
        let _healthy = Backend::start("b3", &["127.0.0.13:8080"]);
        let cgroup = TestCgroup::new("monitoring");
        let agent = Agent::start(AgentSpec::new(&services(), &cgroup));
        let answer = cgroup.probe(&["get", "10.96.0.10:80", "/", "20"]);
        assert_eq!(mesh_tests::names(&answer), [("b1".to_owned(), 20)], "{answer}");
        let answer = cgroup.probe(&["tcp", "10.96.0.20:80", "5"]);
        assert_eq!(mesh_tests::names(&answer), [("b1".to_owned(), 5)], "{answer}");
        // Failing requests, each retried once, until the endpoint is ejected.
        wait_until_for(
            Duration::from_secs(30),
            || {
                cgroup.probe(&["get", "10.96.0.30:80", "/", "2"]);
                agent.metrics().contains("mesh_endpoint_ejections_total{")
            },
            || agent.metrics(),
        );
        // The kernel's connection records reach the metrics within a scan.
        wait_until_for(
            Duration::from_secs(30),
            || agent.metrics().contains("istio_tcp_connections_closed_total{") && agent.metrics().contains("istio_requests_total{"),
            || agent.metrics(),
        );
        let exposition = agent.metrics();

        // promtool's lint: names, types, help, suffixes.
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool (Debian's prometheus package)");
        promtool.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
        let checked = promtool.wait_with_output().unwrap();
        let problems = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
        // One lint is deliberate: Istio's histogram is in milliseconds, and its name is what
        // Istio's dashboards and Kiali query.
        let istio_unit = "istio_request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"";
        let others: Vec<&str> = problems.lines().filter(|l| !l.trim().is_empty() && l.trim() != istio_unit).collect();
        assert!(others.is_empty(), "promtool check metrics: {problems}");

        // A real Prometheus scrapes it with the shipped job's relabeling.
        let dir = std::env::temp_dir().join(unique_name("prometheus"));
        std::fs::create_dir_all(&dir).unwrap();
        let metrics_port: u16 = agent.metrics_addr().rsplit_once(':').unwrap().1.parse().unwrap();
        std::fs::write(dir.join("prometheus.yml"), scrape_config(metrics_port)).unwrap();
        let web = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let mut prometheus = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian's prometheus package)");
        let log = || std::fs::read_to_string(dir.join("log")).unwrap_or_default();
        let scraped = || {
            http_get(&web, "/-/ready").is_ok_and(|(c, _)| c == 200)
                && query(&web, r#"up{job="mesh", node="node-a", pod="mesh-abcde"}"#)["data"]["result"][0]["value"][1] == "1"
                && query(&web, "count(istio_requests_total)")["data"]["result"][0]["value"][1].as_str().is_some_and(|n| n != "0")
        };
        wait_until_for(Duration::from_secs(60), scraped, || {
            format!("{}\n{}", query(&web, "up"), log().lines().rev().take(20).collect::<Vec<_>>().join("\n"))
        });
        // Two scrapes at least, so that rate() has something to say.
        wait_until_for(
            Duration::from_secs(30),
            || {
                query(&web, "count_over_time(up[1m])")["data"]["result"][0]["value"][1]
                    .as_str()
                    .is_some_and(|n| n.parse::<u32>().unwrap_or(0) >= 2)
            },
            || format!("{}", query(&web, "count_over_time(up[1m])")),
        );

        // Every dashboard query: valid PromQL, and its metrics and labels are in the exposition.
        let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("grafana-dashboard.json");
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push((panel["title"].as_str().unwrap().to_owned(), target["expr"].as_str().unwrap().to_owned()));
            }
        }
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(definition) = variable["definition"].as_str() {
                // label_values(metric, label): the metric and the label must exist.
                let inner = definition.trim_start_matches("label_values(").trim_end_matches(')');
                let (metric, label) = inner.split_once(',').unwrap();
                exprs.push((format!("variable {}", variable["name"]), format!("sum by ({}) ({metric})", label.trim())));
            }
        }
        assert!(exprs.len() >= 15, "{exprs:?}");
        let mut without_data = Vec::new();
        for (panel, expr) in &exprs {
            let promql = expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$service", ".*").replace("$job", ".*");
            let answer = query(&web, &promql);
            assert_eq!(answer["status"], "success", "{panel}: {promql}: {answer}");
            if answer["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                without_data.push(format!("{panel}: {promql}"));
            }
            let metrics = metrics_in(expr);
            assert!(!metrics.is_empty(), "{panel}: {expr} reads no metric");
            for metric in &metrics {
                // A histogram's TYPE names the family; a counter's, in this format, its samples.
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| metric.strip_suffix(s)).unwrap_or(metric);
                assert!(exposition.contains(&format!("# TYPE {family} ")), "{panel}: {metric} is not exported");
            }
            for label in labels_in(expr) {
                if matches!(label.as_str(), "job" | "instance" | "le") {
                    continue; // Prometheus's own, and the histogram's
                }
                let carried = metrics.iter().any(|m| samples(&exposition, m).iter().any(|s| s.contains(&format!("{label}=\""))));
                let declared_only = metrics.iter().all(|m| samples(&exposition, m).is_empty());
                assert!(carried || declared_only, "{panel}: no sample of {metrics:?} has the label {label}");
            }
        }
        // Every query has something to show for this traffic.
        assert_eq!(without_data, Vec::<String>::new(), "queries without data");

        let _ = prometheus.kill();
        let _ = prometheus.wait();
        let _ = std::fs::remove_dir_all(&dir);
        agent.stop();
    });
}
