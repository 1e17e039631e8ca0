//! `mesh agent --source kubernetes` against a Kubernetes API server double (real HTTPS list and
//! watch protocol, tests/src/kube_api.rs): objects reach the kernel and real connections, a bad
//! object is refused alone, and the agent survives the API server going away, restarting and
//! answering 410 Gone, without ever serving less than the last good state.
use std::process::Command;

use mesh_tests::{
    kube_api::{self, KubeApi},
    *,
};

const VIP: &str = "10.96.0.10:80";
const SERVICES: &str = "api/v1/services";
const HTTPROUTES: &str = "apis/gateway.networking.k8s.io/v1/httproutes";
const GRPCROUTES: &str = "apis/gateway.networking.k8s.io/v1/grpcroutes";
const EVENTS: &str = "apis/events.k8s.io/v1/events";
const LEASES: &str = "apis/coordination.k8s.io/v1/leases";

fn agent_for(api: &KubeApi, cgroup: &TestCgroup, wait_ready: bool) -> Agent {
    let mut spec = AgentSpec::new("", cgroup);
    spec.kubeconfig = Some(api.kubeconfig.clone());
    spec.wait_ready = wait_ready;
    Agent::start(spec)
}

/// Every request the agent made is one deploy/rbac.yaml grants (built in: the kernel VMs have
/// no source tree).
fn assert_rbac_grants_every_request(api: &KubeApi) {
    const RBAC: &str = include_str!("../../deploy/rbac.yaml");
    assert_eq!(kube_api::rbac_denials(&api.requests(), RBAC), Vec::<String>::new());
}

fn backends() -> [Backend; 3] {
    [Backend::start("b1", &["127.0.0.11:8080"]), Backend::start("b2", &["127.0.0.12:8080"]), Backend::start("b3", &["127.0.0.13:8080"])]
}

fn web(addresses: &[&'static str]) -> String {
    ServiceYaml::web(addresses.iter().map(|a| Endpoint::ready(a)).collect()).render()
}

/// `web` on .11, `web-v2` (10.96.0.12) on .12, and the HTTPRoute `split` sending `/v2` of
/// `web` to `web-v2`.
fn apply_web_and_split(api: &KubeApi) {
    api.apply_yaml(&web(&["127.0.0.11"]));
    let mut v2 = ServiceYaml::web(vec![Endpoint::ready("127.0.0.12")]);
    v2.name = "web-v2";
    v2.cluster_ip = "10.96.0.12";
    api.apply_yaml(&v2.render());
    api.apply_yaml(&route("split", &["web-v2"], "{type: PathPrefix, value: /v2}"));
}

/// A second Service, `test/api` at 10.96.0.20:80, on the same backends.
fn api_service(addresses: &[&'static str]) -> String {
    let mut s = ServiceYaml::web(addresses.iter().map(|a| Endpoint::ready(a)).collect());
    s.name = "api";
    s.cluster_ip = "10.96.0.20";
    s.render()
}

#[test]
fn services_and_endpoint_slices_from_the_api_reach_the_kernel_and_follow_every_change() {
    in_netns(|| {
        let _backends = backends();
        // The Gateway API CRDs are not installed: no routes, and the agent serves anyway.
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11", "127.0.0.12"]));
        let cgroup = TestCgroup::new("kube-crud");
        let agent = agent_for(&api, &cgroup, true);
        agent.wait_backends(VIP, &["127.0.0.11:8080", "127.0.0.12:8080"]);
        let answer = cgroup.probe(&["tcp", VIP, "40"]);
        assert_eq!(error_count(&answer), 0, "{answer}");
        assert_eq!(backend_names(&answer), ["b1", "b2"], "{answer}");
        let log = agent.log();
        assert!(log.contains("no HTTPRoute resource"), "the missing CRD is said: {log}");
        let (code, body) = agent.readiness();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("from the Kubernetes API"), "{body}");

        // An endpoint added, then one removed: each a watch event.
        api.apply_yaml(&web(&["127.0.0.11", "127.0.0.12", "127.0.0.13"]));
        agent.wait_backends(VIP, &["127.0.0.11:8080", "127.0.0.12:8080", "127.0.0.13:8080"]);
        api.apply_yaml(&web(&["127.0.0.13"]));
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        let answer = cgroup.probe(&["tcp", VIP, "10"]);
        assert_eq!(backend_names(&answer), ["b3"], "{answer}");

        // Deleted: the VIP is no longer balanced (no route in this namespace).
        assert!(api.delete("v1", "Service", "test", "web"));
        wait_until(|| agent.kernel_backends(VIP).is_none(), || format!("{VIP} still in the kernel: {:?}", agent.kernel_backends(VIP)));
        let answer = cgroup.probe(&["tcp", VIP, "2"]);
        assert_eq!(error_count(&answer), 2, "{answer}");
        // Everything the agent asked for, deploy/rbac.yaml grants (and it took the Lease).
        assert_rbac_grants_every_request(&api);
        assert!(api.get(LEASES, "mesh-system", "mesh-status-writer").is_some(), "{:?}", api.requests());
        agent.stop();
    });
}

#[test]
fn a_bad_object_is_refused_alone_and_the_rest_applies() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        // Does not parse (a port is a string): the list carrying it must not fail whole.
        let bad = api_service(&["127.0.0.12"]).replace("port: 80\n", "port: eighty\n");
        api.apply_yaml(&bad);
        // Parses but is invalid (a cluster IP that is not an address).
        let mut invalid = ServiceYaml::web(vec![Endpoint::ready("127.0.0.13")]);
        invalid.name = "broken";
        invalid.cluster_ip = "10.96.0.300";
        api.apply_yaml(&invalid.render());
        let cgroup = TestCgroup::new("kube-bad");
        let agent = agent_for(&api, &cgroup, true);
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        let (code, body) = agent.readiness();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("Service test/api: spec.ports[0].port"), "the refused object and field are named: {body}");
        assert!(body.contains("Service test/broken: spec.clusterIP"), "{body}");
        assert_eq!(agent.metric("mesh_config_rejected_objects", &[]), 2.0);
        assert!(agent.kernel_backends("10.96.0.20:80").is_none(), "the refused Service is not served");
        // Where kubectl describe looks: a Warning Event on each refused object, with the field.
        let events_of = |name: &str| -> Vec<Value> {
            api.list(EVENTS).into_iter().filter(|e| e["regarding"]["name"] == name && e["regarding"]["kind"] == "Service").collect()
        };
        wait_until(|| events_of("api").len() == 1 && events_of("broken").len() == 1, || format!("{:#?}", api.list(EVENTS)));
        let event = &events_of("api")[0];
        assert_eq!(event["type"], "Warning", "{event}");
        assert_eq!(event["reason"], "Rejected", "{event}");
        assert_eq!(event["reportingController"], "mesh-agent", "{event}");
        assert_eq!(event["reportingInstance"], "node-a", "{event}");
        assert!(event["note"].as_str().is_some_and(|n| n.contains("spec.ports[0].port")), "{event}");
        assert_eq!(event["regarding"]["uid"], api.get(SERVICES, "test", "api").unwrap()["metadata"]["uid"], "{event}");
        // The same refusal again (the object rewritten as it was): not written again. Refusals
        // are written in order: once a later one is, the repeat has been passed over.
        let writes_before = api.requests().iter().filter(|r| r.contains("/events")).count();
        api.apply_yaml(&bad);
        let mut later = ServiceYaml::web(vec![]);
        later.name = "later";
        later.cluster_ip = "10.96.0.301";
        api.apply_yaml(&later.render());
        wait_until(|| events_of("later").len() == 1, || format!("{:#?}", api.list(EVENTS)));
        assert_eq!(events_of("api").len(), 1);
        let writes_after = api.requests().iter().filter(|r| r.contains("/events")).count();
        assert_eq!(writes_after, writes_before + 1, "only the later refusal was written: {:?}", api.requests());

        // Fixed: it applies, and its refusal is gone; the invalid ones stay refused.
        api.apply_yaml(&api_service(&["127.0.0.12"]));
        agent.wait_backends("10.96.0.20:80", &["127.0.0.12:8080"]);
        wait_until(|| agent.metric("mesh_config_rejected_objects", &[]) == 2.0, || agent.readiness().1);
        // A good object made bad: refused, and its last good version keeps serving.
        api.apply_yaml(&web(&["127.0.0.11"]).replace("port: 80\n", "port: -1\n"));
        wait_until(|| agent.readiness().1.contains("Service test/web:"), || agent.readiness().1);
        assert_eq!(agent.kernel_backends(VIP), Some(vec!["127.0.0.11:8080".to_owned()]));
        // Deleting the refused object clears its refusal.
        assert!(api.delete("v1", "Service", "test", "broken"));
        wait_until(|| !agent.readiness().1.contains("test/broken"), || agent.readiness().1);
        agent.stop();
    });
}

#[test]
fn the_api_server_going_away_restarting_and_answering_410_loses_nothing_and_a_relist_removes_what_went() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        api.apply_yaml(&api_service(&["127.0.0.12"]));
        let cgroup = TestCgroup::new("kube-away");
        let agent = agent_for(&api, &cgroup, true);
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        agent.wait_backends("10.96.0.20:80", &["127.0.0.12:8080"]);
        let lists_before = api.lists_of(SERVICES);
        assert_eq!(api.expired_watches(SERVICES), 0);

        // A restart: watches are cut and resumed from their resourceVersion, no re-list.
        api.restart();
        api.apply_yaml(&web(&["127.0.0.13"]));
        agent.wait_backends(VIP, &["127.0.0.13:8080"]);
        assert_eq!(api.lists_of(SERVICES), lists_before, "resumed, not re-listed: {:?}", api.requests());

        // Away: the kernel keeps serving everything it had.
        api.set_down(true);
        assert!(api.delete("v1", "Service", "test", "api"));
        assert!(api.delete("discovery.k8s.io/v1", "EndpointSlice", "test", "api-1"));
        api.apply_yaml(&web(&["127.0.0.11", "127.0.0.12"]));
        // The history is gone too: resuming gets 410 Gone, and only a re-list can catch up.
        api.compact();
        let answer = cgroup.probe(&["tcp", "10.96.0.20:80", "5"]);
        assert_eq!(backend_names(&answer), ["b2"], "served while the API server is away: {answer}");
        assert!(agent.readiness().0 == 200, "{}", agent.readiness().1);

        api.set_down(false);
        agent.wait_backends(VIP, &["127.0.0.11:8080", "127.0.0.12:8080"]);
        wait_until(|| agent.kernel_backends("10.96.0.20:80").is_none(), || format!("{:?}", agent.kernel_backends("10.96.0.20:80")));
        assert!(api.lists_of(SERVICES) > lists_before, "a re-list after 410: {:?}", api.requests());
        assert_eq!(api.expired_watches(SERVICES), 1, "resuming after the compaction was 410 Gone: {:?}", api.requests());
        let log = agent.log();
        assert!(log.contains("watching Services failed") && log.contains("watching Services again"), "{log}");
        agent.stop();
    });
}

#[test]
fn an_api_server_away_at_start_holds_readiness_until_everything_is_listed() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[GRPCROUTES]);
        api.set_down(true);
        api.apply_yaml(&web(&["127.0.0.11"]));
        let cgroup = TestCgroup::new("kube-late");
        let agent = agent_for(&api, &cgroup, false);
        let (code, body) = agent.readiness();
        assert_eq!(code, 503, "nothing listed yet: {body}");
        // Alive all the same: a restart would not bring the API server back.
        assert_eq!(agent.liveness(), (200, "alive\n".to_owned()));
        api.set_down(false);
        wait_until(|| agent.readiness().0 == 200, || agent.readiness().1);
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        agent.stop();
    });
}

#[test]
fn lists_are_read_page_by_page() {
    in_netns(|| {
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        // 1,200 Services: three pages of kube-rs's 500.
        for i in 0..1200u32 {
            let mut s = ServiceYaml::web(vec![]);
            let name = format!("svc-{i}");
            let ip = format!("10.96.{}.{}", 10 + i / 200, 1 + i % 200);
            s.name = &name;
            s.cluster_ip = &ip;
            api.apply_yaml(&s.render());
        }
        let cgroup = TestCgroup::new("kube-pages");
        let agent = agent_for(&api, &cgroup, true);
        let pages = api.requests().iter().filter(|r| r.starts_with(&format!("GET /{SERVICES}?")) && r.contains("continue=")).count();
        assert!(pages >= 2, "{:?}", api.requests());
        let dump = agent.config_dump();
        let services = dump["services"].as_array().map_or(0, Vec::len);
        assert_eq!(services, 1200, "every page applied");
        agent.stop();
    });
}

fn route(name: &str, backends: &[&str], path: &str) -> String {
    let refs: Vec<String> = backends.iter().map(|b| format!("{{name: {b}, port: 80}}")).collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: test}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n  \
         - matches: [{{path: {path}}}]\n    backendRefs: [{}]\n",
        refs.join(", ")
    )
}

/// mesh's entry of a route's `status.parents`, as (condition type, status, reason) triples.
fn mesh_conditions(api: &KubeApi, name: &str) -> Vec<(String, String, String)> {
    let Some(route) = api.get(HTTPROUTES, "test", name) else { return Vec::new() };
    let parents = route["status"]["parents"].as_array().cloned().unwrap_or_default();
    let Some(ours) = parents.iter().find(|p| p["controllerName"] == "mesh.dev/agent") else { return Vec::new() };
    assert_eq!(ours["parentRef"]["name"], "web", "{route}");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    ours["conditions"].as_array().into_iter().flatten().map(|c| (text(&c["type"]), text(&c["status"]), text(&c["reason"]))).collect()
}

fn triples(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    list.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect()
}

#[test]
fn route_status_is_written_by_the_lease_holder_only_and_keeps_other_controllers_entries() {
    in_netns(|| {
        let api = KubeApi::start(&[GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        api.apply_yaml(&route("split", &["web", "web-v2"], "{type: PathPrefix, value: /v2}"));
        // Another implementation's entry, which mesh must leave alone.
        let mut with_other = api.get(HTTPROUTES, "test", "split").unwrap();
        with_other["status"] = serde_json::json!({"parents": [{"controllerName": "example.com/other", "parentRef": {"kind": "Service", "name": "web"},
            "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]});
        api.apply(with_other);
        // Another agent holds the Lease and renews it.
        api.apply(serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "mesh-status-writer", "namespace": "mesh-system"},
            "spec": {"holderIdentity": "node-b-1", "leaseDurationSeconds": 3600, "renewTime": "2026-12-03T00:00:00.000000Z"}}));
        let cgroup = TestCgroup::new("kube-status");
        let agent = agent_for(&api, &cgroup, true);
        wait_until(|| agent.log().contains("another agent writes route status"), || agent.log());
        assert_eq!(mesh_conditions(&api, "split"), vec![], "not the holder: writes nothing");
        assert!(!api.requests().iter().any(|r| r.contains("/status")), "{:?}", api.requests());

        // The holder goes away (its Lease deleted): this agent takes it and writes.
        assert!(api.delete("coordination.k8s.io/v1", "Lease", "mesh-system", "mesh-status-writer"));
        let wait = std::time::Duration::from_secs(30);
        wait_until_for(wait, || !mesh_conditions(&api, "split").is_empty(), || format!("{:?}", api.requests()));
        assert_eq!(
            mesh_conditions(&api, "split"),
            triples(&[("Accepted", "True", "Accepted"), ("ResolvedRefs", "False", "BackendNotFound")])
        );
        let status = &api.get(HTTPROUTES, "test", "split").unwrap()["status"];
        assert!(status.to_string().contains("test/web-v2"), "names the missing backend: {status}");
        assert!(status["parents"].as_array().unwrap().iter().any(|p| p["controllerName"] == "example.com/other"), "{status}");

        // The missing backend appears: resolved.
        let mut v2 = ServiceYaml::web(vec![Endpoint::ready("127.0.0.12")]);
        v2.name = "web-v2";
        v2.cluster_ip = "10.96.0.12";
        api.apply_yaml(&v2.render());
        wait_until(
            || mesh_conditions(&api, "split") == triples(&[("Accepted", "True", "Accepted"), ("ResolvedRefs", "True", "ResolvedRefs")]),
            || format!("{:?}", mesh_conditions(&api, "split")),
        );
        // A route mesh refuses (a regular expression that does not compile) says why.
        api.apply_yaml(&route("bad", &["web"], "{type: RegularExpression, value: \"(\"}"));
        wait_until(
            || mesh_conditions(&api, "bad") == triples(&[("Accepted", "False", "UnsupportedValue"), ("ResolvedRefs", "False", "Invalid")]),
            || format!("{:?}\n{}", mesh_conditions(&api, "bad"), agent.log()),
        );
        let status = &api.get(HTTPROUTES, "test", "bad").unwrap()["status"];
        assert!(status.to_string().contains("regular expression"), "{status}");
        assert_rbac_grants_every_request(&api);
        agent.stop();
    });
}

#[test]
fn the_rbac_check_refuses_what_a_role_does_not_grant() {
    let rbac = "kind: ClusterRole\nrules:\n- apiGroups: [\"\"]\n  resources: [services]\n  verbs: [list]\n---\n\
                kind: Role\nmetadata: {namespace: ns}\nrules:\n- apiGroups: [coordination.k8s.io]\n  resources: [leases]\n  resourceNames: [a]\n  verbs: [get]\n";
    let requests: Vec<String> = [
        "GET /api/v1/services?limit=500",
        "GET /api/v1/services?watch=true",
        "GET /apis/coordination.k8s.io/v1/namespaces/ns/leases/a",
        "GET /apis/coordination.k8s.io/v1/namespaces/ns/leases/b",
        "GET /apis/coordination.k8s.io/v1/namespaces/other/leases/a",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let denied = kube_api::rbac_denials(&requests, rbac);
    assert_eq!(denied.len(), 3, "{denied:#?}");
    for refused in ["services?watch=true", "leases/b", "namespaces/other/leases/a"] {
        assert!(denied.iter().any(|d| d.contains(refused)), "{refused} should be refused: {denied:#?}");
    }
}

fn pod(name: &str, node: &str, uid: &str, ip: &str, qos: &str, labels: &str) -> Value {
    serde_json::from_str(&format!(
        r#"{{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "{name}", "namespace": "test", "uid": "{uid}", "labels": {{{labels}}}}},
            "spec": {{"nodeName": "{node}", "serviceAccountName": "web-sa", "containers": [{{"name": "app", "image": "nginx"}}]}},
            "status": {{"phase": "Running", "podIP": "{ip}", "podIPs": [{{"ip": "{ip}"}}], "qosClass": "{qos}"}}}}"#
    ))
    .expect("pod json")
}

/// Makes the cgroup directories of `path` (relative to `root`), and removes them, deepest
/// first, when dropped.
struct PodCgroupDirs(Vec<std::path::PathBuf>);

impl PodCgroupDirs {
    fn make(root: &std::path::Path, path: &str) -> Self {
        let mut made = Vec::new();
        let mut at = root.to_path_buf();
        for part in path.split('/') {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at).unwrap_or_else(|e| panic!("mkdir {}: {e}", at.display()));
                made.push(at.clone());
            }
        }
        Self(made)
    }

    fn id(&self) -> u64 {
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(self.0.last().expect("made")).expect("stat"))
    }
}

impl Drop for PodCgroupDirs {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

#[test]
fn pods_of_this_node_are_workloads_with_their_identity_and_cgroup_for_both_drivers() {
    in_netns(|| {
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        let (a, b, c) =
            ("aaaaaaaa-1111-2222-3333-444444444444", "bbbbbbbb-1111-2222-3333-444444444444", "cccccccc-1111-2222-3333-444444444444");
        api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "test", "labels": {"mesh.dev/dataplane": "enabled"}}}));
        // Its annotation points at another cgroup: from the API, that is not believed.
        let mut web_pod = pod("web-7d4f8b9c6-x2x9k", "node-a", a, "10.244.0.5", "Burstable", "");
        web_pod["metadata"]["annotations"] = serde_json::json!({"mesh.dev/cgroup": "/"});
        api.apply(web_pod);
        api.apply(pod("elsewhere", "node-b", b, "10.244.1.5", "Burstable", ""));
        api.apply(pod("batch-0", "node-a", c, "10.244.0.6", "BestEffort", r#""mesh.dev/dataplane": "disabled""#));
        let cgroup = TestCgroup::new("kube-pods");
        // kubelet's systemd driver for one pod, its cgroupfs driver for the other.
        let systemd = PodCgroupDirs::make(
            &cgroup.path,
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice", a.replace('-', "_")),
        );
        let cgroupfs = PodCgroupDirs::make(&cgroup.path, &format!("kubepods/besteffort/pod{c}"));
        let agent = agent_for(&api, &cgroup, true);
        let workloads = || agent.config_dump()["workloads"].as_array().cloned().unwrap_or_default();
        // Both in the kernel's map, by their cgroup ids, once found.
        wait_until(
            || workloads().len() == 2 && workloads().iter().all(|w| w["kernel_id"].is_u64()),
            || format!("{:#}", agent.config_dump()["workloads"]),
        );
        assert_eq!(agent.map_entries()["mesh_workloads"], 2);
        let rows = workloads();
        let web = rows.iter().find(|w| w["pod"] == "test/web-7d4f8b9c6-x2x9k").expect("web");
        assert_eq!(web["workload"], "web", "{web}");
        assert_eq!(web["principal"], "spiffe://cluster.local/ns/test/sa/web-sa", "{web}");
        assert_eq!(web["ips"], serde_json::json!(["10.244.0.5"]), "{web}");
        assert_eq!(web["enrolled"], true, "the namespace enrolls it: {web}");
        assert_eq!(web["cgroup_id"], systemd.id(), "{web}");
        let batch = rows.iter().find(|w| w["pod"] == "test/batch-0").expect("batch");
        assert_eq!(batch["enrolled"], false, "its own label opts out: {batch}");
        assert_eq!(batch["cgroup_id"], cgroupfs.id(), "{batch}");

        // The namespace label removed: the pod that inherits it leaves the mesh.
        api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "test"}}));
        wait_until(
            || workloads().iter().any(|w| w["pod"] == "test/web-7d4f8b9c6-x2x9k" && w["enrolled"] == false),
            || format!("{:#?}", workloads()),
        );
        // Deleted: gone.
        assert!(api.delete("v1", "Pod", "test", "batch-0"));
        wait_until(|| workloads().len() == 1, || format!("{:#?}", workloads()));
        // Only this node's pods were asked for.
        let pod_requests: Vec<String> = api.requests().into_iter().filter(|r| r.contains("/pods")).collect();
        assert!(
            !pod_requests.is_empty() && pod_requests.iter().all(|r| r.contains("fieldSelector=spec.nodeName%3Dnode-a")),
            "{pod_requests:?}"
        );
        assert_rbac_grants_every_request(&api);
        agent.stop();
        drop((systemd, cgroupfs));
    });
}

#[test]
fn an_httproute_from_the_api_routes_requests_and_follows_its_updates_and_deletion() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[GRPCROUTES]);
        apply_web_and_split(&api);
        let cgroup = TestCgroup::new("kube-l7");
        let agent = agent_for(&api, &cgroup, true);
        let get = |path: &str| names(&cgroup.probe(&["get", VIP, path, "4"]));
        let all = |name: &str| vec![(name.to_owned(), 4)];
        assert_eq!(get("/v2/items"), all("b2"));
        assert_eq!(get("/"), all("HTTP 404"), "no rule matches: the route is the Service's whole L7 config");

        // Updated: the rule moves to /beta.
        api.apply_yaml(&route("split", &["web-v2"], "{type: PathPrefix, value: /beta}"));
        wait_until(|| get("/beta") == all("b2"), || format!("{:?}", get("/beta")));
        assert_eq!(get("/v2"), all("HTTP 404"));

        // Deleted: the Service is plain L4 again, to its own endpoint.
        assert!(api.delete("gateway.networking.k8s.io/v1", "HTTPRoute", "test", "split"));
        wait_until(|| get("/beta") == all("b1"), || format!("{:?}", get("/beta")));
        agent.stop();
    });
}

#[test]
fn of_two_agents_only_the_lease_holder_writes_events_and_status() {
    in_netns(|| {
        let api = KubeApi::start(&[GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        let (cgroup_a, cgroup_b) = (TestCgroup::new("kube-two-a"), TestCgroup::new("kube-two-b"));
        let start = |cgroup: &TestCgroup, node: &'static str, port_base: u16| {
            let mut spec = AgentSpec::new("", cgroup);
            (spec.kubeconfig, spec.node, spec.port_base) = (Some(api.kubeconfig.clone()), node, port_base);
            Agent::start(spec)
        };
        let (a, b) = (start(&cgroup_a, "node-a", 15000), start(&cgroup_b, "node-b", 16000));
        let says = |agent: &Agent, what: &str| agent.log().contains(what);
        wait_until(|| [&a, &b].iter().all(|x| says(x, "writes route status and Events")), || format!("{}\n---\n{}", a.log(), b.log()));
        let (holder, other) = if says(&a, "this agent writes") { ("node-a", &b) } else { ("node-b", &a) };
        assert!(says(other, "another agent writes"), "{}", other.log());
        // Both refuse the same bad route; one Event and one status entry are written.
        api.apply_yaml(&route("bad", &["web"], "{type: RegularExpression, value: \"(\"}"));
        wait_until(|| !mesh_conditions(&api, "bad").is_empty(), || format!("{:?}", api.requests()));
        wait_until(|| api.list(EVENTS).len() == 1, || format!("{:#?}", api.list(EVENTS)));
        let refused_by_both = || [&a, &b].iter().all(|x| x.readiness().1.contains("HTTPRoute test/bad"));
        wait_until(refused_by_both, || format!("{}\n{}", a.readiness().1, b.readiness().1));
        // A later refusal, once written, shows the earlier one was not written twice.
        api.apply_yaml(&route("bad2", &["web"], "{type: RegularExpression, value: \"[\"}"));
        wait_until(|| api.list(EVENTS).len() == 2, || format!("{:#?}", api.list(EVENTS)));
        for event in api.list(EVENTS) {
            assert_eq!(event["reportingInstance"], holder, "{event}");
        }
        let route = api.get(HTTPROUTES, "test", "bad").unwrap();
        assert_eq!(route["status"]["parents"].as_array().map(Vec::len), Some(1), "{route}");
        a.stop();
        b.stop();
    });
}

#[test]
fn an_agent_the_api_server_refuses_says_what_it_waits_for_and_serves_once_allowed() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        // RBAC without Services (a ClusterRole missing a rule).
        api.set_forbidden(SERVICES, true);
        let cgroup = TestCgroup::new("kube-forbidden");
        let agent = agent_for(&api, &cgroup, false);
        wait_until(|| agent.readiness().1.contains("waiting for the API server's Services"), || agent.readiness().1);
        let (code, body) = agent.readiness();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("forbidden"), "the API server's reason is passed on: {body}");
        api.set_forbidden(SERVICES, false);
        // kube-rs's backoff retries: once listed, ready and served.
        wait_until_for(std::time::Duration::from_secs(60), || agent.readiness().0 == 200, || agent.readiness().1);
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        agent.stop();
    });
}

#[test]
fn a_gateway_api_crd_installed_later_is_picked_up() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        // The route is stored, but the API server answers 404 for HTTPRoutes until the CRD is
        // installed.
        apply_web_and_split(&api);
        let cgroup = TestCgroup::new("kube-crd-later");
        let agent = agent_for(&api, &cgroup, true);
        let get = || names(&cgroup.probe(&["get", VIP, "/v2", "4"]));
        assert_eq!(get(), vec![("b1".to_owned(), 4)], "no routes without the CRD: plain L4");
        api.set_missing(HTTPROUTES, false);
        // kube-rs's backoff looks again; then the route applies.
        wait_until_for(
            std::time::Duration::from_secs(60),
            || get() == vec![("b2".to_owned(), 4)],
            || format!("{:?}\n{}", get(), agent.log()),
        );
        assert!(agent.log().contains("the API server has the HTTPRoute resource now"), "{}", agent.log());
        agent.stop();
    });
}

#[test]
fn a_lease_whose_holder_stopped_renewing_is_taken_over_on_this_agents_own_clock() {
    in_netns(|| {
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        // Renewed long ago by the record's clock, 1 s lease: expiry is judged from when this
        // agent saw the record last change, so it first counts as held.
        api.apply(serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "mesh-status-writer", "namespace": "mesh-system"},
            "spec": {"holderIdentity": "node-b-1", "leaseDurationSeconds": 1, "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": 0}}));
        let cgroup = TestCgroup::new("kube-lease-expiry");
        let agent = agent_for(&api, &cgroup, true);
        let holder = || api.get(LEASES, "mesh-system", "mesh-status-writer").unwrap()["spec"].clone();
        // The Lease written and, just after it, the agent saying so in its log.
        let taken =
            || holder()["holderIdentity"].as_str().is_some_and(|h| h.starts_with("node-a-")) && agent.log().contains("this agent writes");
        wait_until_for(std::time::Duration::from_secs(30), taken, || format!("{}\n{}", holder(), agent.log()));
        let log = agent.log();
        let (other, this) = (log.find("another agent writes"), log.find("this agent writes"));
        assert!(other.is_some() && this.is_some() && other < this, "held first, taken once expired: {log}");
        assert_eq!(holder()["leaseTransitions"], 1, "{}", holder());
        agent.stop();
    });
}

#[test]
fn with_mtls_on_other_nodes_enrolled_pods_from_the_api_are_tunneled_by_address() {
    in_netns(|| {
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply(serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "test", "labels": {"mesh.dev/dataplane": "enabled"}}}));
        let with_host = |mut pod: Value, host: &str| {
            pod["status"]["hostIP"] = host.into();
            pod
        };
        api.apply(with_host(pod("web-0", "node-b", "u-1", "10.244.1.5", "Burstable", ""), "192.168.0.2"));
        api.apply(with_host(
            pod("opted-out-0", "node-b", "u-2", "10.244.1.6", "Burstable", r#""mesh.dev/dataplane": "disabled""#),
            "192.168.0.2",
        ));
        api.apply(with_host(pod("here-0", "node-a", "u-3", "10.244.0.7", "Burstable", ""), "192.168.0.1"));
        let ca = std::env::temp_dir().join(unique_name("ca"));
        run(Command::new(mesh_bin()).args(["ca", "init"]).arg(&ca));
        let cgroup = TestCgroup::new("kube-peers");
        let mut spec = AgentSpec::new("", &cgroup);
        spec.kubeconfig = Some(api.kubeconfig.clone());
        let ca_arg = ca.display().to_string();
        spec.extra_args = vec!["--ca-dir", &ca_arg];
        let agent = Agent::start(spec);
        let tunneled = || agent.config_dump()["tunneled"].clone();
        // Only the enrolled pod of the other node: this node's pods and opted-out ones are not.
        wait_until(|| tunneled() == serde_json::json!(["10.244.1.5"]), || format!("{}", tunneled()));
        // It leaves the mesh: no longer tunneled.
        assert!(api.delete("v1", "Pod", "test", "web-0"));
        wait_until(|| tunneled() == serde_json::json!([]), || format!("{}", tunneled()));
        // Every node's pods were asked for (no field selector), as RBAC grants.
        let pod_requests: Vec<String> = api.requests().into_iter().filter(|r| r.contains("/pods")).collect();
        assert!(!pod_requests.is_empty() && pod_requests.iter().all(|r| !r.contains("fieldSelector")), "{pod_requests:?}");
        assert_rbac_grants_every_request(&api);
        agent.stop();
        let _ = std::fs::remove_dir_all(&ca);
    });
}

#[test]
fn authorization_policies_from_the_api_decide_and_a_bad_one_is_refused_alone_with_an_event() {
    in_netns(|| {
        let _backends = backends();
        let api = KubeApi::start(&[HTTPROUTES, GRPCROUTES]);
        api.apply_yaml(&web(&["127.0.0.11"]));
        let policy = |name: &str, spec: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: test}}\nspec: {spec}\n"
            )
        };
        api.apply_yaml(&policy("allow-front", "{rules: [{from: [{source: {principals: [cluster.local/ns/test/sa/front]}}]}]}"));
        api.apply_yaml(&policy("typo", "{action: ALOW}"));
        let cgroup = TestCgroup::new("kube-authz");
        let agent = agent_for(&api, &cgroup, true);
        agent.wait_backends(VIP, &["127.0.0.11:8080"]);
        let (_, body) = agent.readiness();
        assert!(body.contains("AuthorizationPolicy test/typo: spec.action"), "the refused policy and field are named: {body}");
        let events: Vec<Value> = api.list(EVENTS).into_iter().filter(|e| e["regarding"]["kind"] == "AuthorizationPolicy").collect();
        wait_until(
            || api.list(EVENTS).iter().any(|e| e["regarding"]["kind"] == "AuthorizationPolicy" && e["regarding"]["name"] == "typo"),
            || format!("{events:#?}"),
        );
        // The good one decides: the admin API explains it, for the pod behind the Service.
        api.apply_yaml(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: test, uid: u-web}\n\
             spec: {nodeName: node-a, serviceAccountName: web}\nstatus: {podIP: 127.0.0.11}\n",
        );
        let check = |from: &str| {
            let (code, body) = http_get(agent.admin_addr(), &format!("/authz?from={from}&to=test/web&port=80")).expect("admin");
            (code, serde_json::from_str::<Value>(&body).unwrap_or(Value::Null))
        };
        wait_until(|| check("test/front").0 == 200, || format!("{:?}", check("test/front")));
        let (_, allowed) = check("test/front");
        assert_eq!(allowed["decisions"][0]["decision"], "allow", "{allowed}");
        assert_eq!(allowed["decisions"][0]["policy"], "test/allow-front", "{allowed}");
        assert_eq!(allowed["decisions"][0]["pod"], "test/web-0", "{allowed}");
        let (_, denied) = check("test/other");
        assert_eq!(denied["decisions"][0]["decision"], "deny", "{denied}");
        assert_rbac_grants_every_request(&api);
        // Removed: gone from the store (the refusal of the bad one stays until it is fixed).
        assert!(api.delete("security.istio.io/v1", "AuthorizationPolicy", "test", "typo"));
        wait_until(|| !agent.readiness().1.contains("test/typo"), || agent.readiness().1);
        agent.stop();
    });
}
