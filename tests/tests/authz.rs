//! Authorization between nodes: the two-node topology of the mTLS tests (front on node A, web
//! on node B behind Service web 10.96.0.10:80), plus a second caller on node A, `other` in
//! namespace lab. Node B's agent decides on each tunnel by Istio's AuthorizationPolicies from
//! its configuration directory; `mesh authz check` explains the decision from its live state.
use std::process::Command;

use mesh_tests::*;

const VIP: &str = "10.96.0.10:80";

/// Namespace lab (enrolled) and its pod other-0 (service account other, 10.200.2.2) on node A.
fn other_pod(cgroup: &TestCgroup) -> String {
    format!(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: lab, labels: {{mesh.dev/dataplane: enabled}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: other-0, namespace: lab, uid: u-other, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
         spec: {{nodeName: node-a, serviceAccountName: other}}\nstatus: {{podIP: 10.200.2.2, hostIP: 10.200.0.1}}\n",
        under_mount(cgroup)
    )
}

/// A connection whose SYN was dropped: it timed out (nothing refused it).
fn timed_out(answer: &serde_json::Value) -> bool {
    names(answer).is_empty() && answer["errors"].as_object().is_some_and(|e| e.contains_key("TimedOut"))
}

/// The flow log's lines of `event`, oldest first.
fn flow_events(flow_log: &std::path::Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(flow_log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["event"] == event)
        .collect()
}

fn policy(name: &str, spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{spec}\n")
}

/// How many of `n` connections through the Service got the backend's answer.
fn answered(caller: &TestCgroup, n: usize) -> u64 {
    let answer = caller.probe(&["tcp", VIP, &n.to_string()]);
    names(&answer).iter().filter(|(name, _)| name == "web").map(|(_, count)| count).sum()
}

/// `mesh authz check` against an agent's admin API: (exit code, output).
fn authz_check(agent: &Agent, args: &[&str]) -> (i32, String) {
    let out = Command::new(mesh_bin())
        .args(["authz", "check", "--admin-addr", agent.admin_addr()])
        .args(args)
        .output()
        .expect("mesh authz check");
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Waits until node B's agent decides `from` -> web:8080 as `decision` (its files were read).
fn wait_decision(agent: &Agent, from: &str, decision: &str) {
    wait_until(
        || authz_check(agent, &["--from", from, "--to", "shop/web:80"]).1.contains(&format!("{} ", decision.to_uppercase())),
        || format!("{from} -> web to be {decision}: {}\n{}", authz_check(agent, &["--from", from, "--to", "shop/web:80"]).1, agent.log()),
    );
}

#[test]
fn destination_agents_enforce_istio_authorization_policies_on_the_verified_identity() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("authz") else { return };
        let other = nodes.cgroup_a.child("other");
        let yaml = format!("{}{}", nodes.yaml(), other_pod(&other));
        let agent_b = nodes.agent_b(&yaml, &[]);
        let agent_a = nodes.agent_a(&yaml, &[]);
        let _backend = nodes.serve_on_b(probe_bin(), &["serve", "web", "10.200.1.2:8080"]);
        let front = &nodes.client;
        let decided = |decision: &str, policy: &str| {
            agent_b.metric("mesh_authz_decisions_total", &[("decision", decision), ("policy", policy), ("reporter", "destination")])
        };

        // No policy: everyone in.
        assert_eq!(answered(front, 3), 3, "{}", agent_a.log());
        assert_eq!(answered(&other, 3), 3);
        let (code, text) = authz_check(&agent_b, &["--from", "shop/front", "--to", "shop/web:80"]);
        assert_eq!(code, 0, "{text}");
        assert!(text.contains("ALLOW") && text.contains("shop/web-0") && text.contains("10.200.1.2:8080"), "{text}");
        assert!(text.contains("no AuthorizationPolicy selects"), "{text}");
        assert_eq!(decided("allow", "none"), 6.0, "{}", agent_b.metrics());

        // An ALLOW selecting web: only what it names gets in.
        let allow_front = policy(
            "allow-front",
            "  selector: {matchLabels: {app: web}}\n  rules:\n  - from:\n    - source: {principals: [td/ns/shop/sa/front]}\n",
        );
        agent_b.write_file("policy.yaml", &allow_front);
        wait_decision(&agent_b, "lab/other", "deny");
        assert_eq!(answered(front, 3), 3);
        assert_eq!(answered(&other, 3), 0, "other is denied by default once an ALLOW selects web");
        assert_eq!(decided("allow", "shop/allow-front"), 3.0, "{}", agent_b.metrics());
        assert_eq!(decided("deny", "none"), 3.0, "{}", agent_b.metrics());
        assert_eq!(agent_b.metric("mesh_hbone_refused_total", &[("direction", "inbound"), ("reason", "policy_denied")]), 3.0);
        let (code, text) = authz_check(&agent_b, &["--from", "lab/other", "--to", "shop/web:80"]);
        assert_eq!(code, 1, "a denial exits 1: {text}");
        assert!(text.contains("DENY") && text.contains("no rule of theirs matches"), "{text}");
        let (_, text) = authz_check(&agent_b, &["--from", "shop/front", "--to", "10.200.1.2:8080", "--json"]);
        assert!(text.contains("\"policy\": \"shop/allow-front\"") && text.contains("\"rule\": 0"), "{text}");

        // A DENY comes before any ALLOW: front, still allowed by allow-front, is refused.
        let deny_shop = policy(
            "deny-shop",
            "  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [shop]}\n    to:\n    - operation: {ports: ['8080']}\n",
        );
        agent_b.write_file("policy.yaml", &format!("{allow_front}---\n{deny_shop}"));
        wait_decision(&agent_b, "shop/front", "deny");
        assert_eq!(answered(front, 2), 0);
        assert_eq!(decided("deny", "shop/deny-shop"), 2.0, "{}", agent_b.metrics());

        // Not-forms and address blocks: everyone not from lab, and anyone from front's address.
        let by_address = policy(
            "by-address",
            "  selector: {matchLabels: {app: web}}\n  rules:\n  - from:\n    - source: {notNamespaces: [lab]}\n  - from:\n    - source: {ipBlocks: [10.200.2.2/32]}\n    to:\n    - operation: {notPorts: ['9090']}\n",
        );
        agent_b.write_file("policy.yaml", &by_address);
        wait_decision(&agent_b, "shop/front", "allow");
        assert_eq!(answered(front, 2), 2, "front is not in lab");
        assert_eq!(answered(&other, 2), 2, "other is in lab, but its pod address is allowed (rule 1)");
        let (_, text) = authz_check(&agent_b, &["--from", "lab/other", "--to", "shop/web:80", "--source-ip", "10.200.2.2"]);
        assert!(text.contains("rules[1]"), "{text}");
        let (code, _) = authz_check(&agent_b, &["--from", "lab/other", "--to", "shop/web:80", "--source-ip", "10.200.2.9"]);
        assert_eq!(code, 1, "another address of lab is denied");

        // A policy change closes a live connection it now denies.
        let mut held = other.hold(VIP);
        assert_eq!(held.send("one")["answer"], "web:one");
        agent_b.write_file("policy.yaml", &allow_front);
        wait_until(
            || agent_b.metric("mesh_hbone_refused_total", &[("direction", "inbound"), ("reason", "policy_closed")]) == 1.0,
            || format!("the live stream of other to be closed:\n{}", agent_b.log()),
        );
        assert!(held.send("two").get("error").is_some(), "the held connection is closed");
        assert_eq!(answered(front, 1), 1, "front's own connections stay allowed");

        // A malformed policy in a file of its own is refused alone, naming file and field; the
        // good one keeps deciding.
        agent_b.write_file("zz-bad.yaml", &policy("typo", "  action: ALOW\n"));
        wait_until(
            || agent_b.log().contains("zz-bad.yaml: AuthorizationPolicy shop/typo: spec.action"),
            || format!("the refusal in the log:\n{}", agent_b.log()),
        );
        assert_eq!(agent_b.metric("mesh_config_rejected_objects", &[]), 1.0, "{}", agent_b.metrics());
        assert_eq!(answered(front, 1), 1);
        assert_eq!(answered(&other, 1), 0);

        agent_a.stop();
        agent_b.stop();
    });
}

/// db-0 (shop/db, app=db) on node A at 10.200.2.9, an address of node A's loopback.
fn db_pod(cgroup: &TestCgroup) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: db-0, namespace: shop, uid: u-db, labels: {{app: db}}, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
         spec: {{nodeName: node-a, serviceAccountName: db}}\nstatus: {{podIP: 10.200.2.9, hostIP: 10.200.0.1}}\n",
        under_mount(cgroup)
    )
}

#[test]
fn the_source_refuses_with_eperm_at_connect_says_why_and_enforces_between_pods_of_its_node() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("authz-src") else { return };
        run(Command::new("ip").args(["addr", "add", "10.200.2.9/32", "dev", "lo"]));
        let (other, db) = (nodes.cgroup_a.child("other"), nodes.cgroup_a.child("db"));
        let yaml = format!("{}{}{}", nodes.yaml(), other_pod(&other), db_pod(&db));
        let flow_log = std::env::temp_dir().join(format!("{}.jsonl", unique_name("flows")));
        let flow_arg = flow_log.display().to_string();
        let agent_b = nodes.agent_b(&yaml, &[]);
        let agent_a = nodes.agent_a(&yaml, &["--flow-log", &flow_arg]);
        let _web = nodes.serve_on_b(probe_bin(), &["serve", "web", "10.200.1.2:8080"]);
        let _db = Backend::start_in(&db, "db", &["10.200.2.9:5432"]);
        let front = &nodes.client;
        let tcp = |caller: &TestCgroup, addr: &str| caller.probe(&["tcp", addr, "2"]);
        assert_eq!(names(&tcp(&other, VIP)), [("web".to_owned(), 2)], "{}", agent_a.log());
        assert_eq!(names(&tcp(&other, "10.200.2.9:5432")), [("db".to_owned(), 2)]);

        // web takes front only; db takes shop's pods and refuses lab on its port.
        let policies = format!(
            "{}---\n{}---\n{}",
            policy(
                "web-from-front",
                "  selector: {matchLabels: {app: web}}\n  rules:\n  - from:\n    - source: {principals: [td/ns/shop/sa/front]}\n"
            ),
            policy(
                "db-not-lab",
                "  selector: {matchLabels: {app: db}}\n  action: DENY\n  rules:\n  - from:\n    - source: {namespaces: [lab]}\n    to:\n    - operation: {ports: ['5432']}\n"
            ),
            policy("db-from-shop", "  selector: {matchLabels: {app: db}}\n  rules:\n  - from:\n    - source: {namespaces: [shop]}\n"),
        );
        agent_b.write_file("policy.yaml", &policies);
        agent_a.write_file("policy.yaml", &policies);
        let refused = |answer: &serde_json::Value| answer["errors"]["EPERM"].as_u64() == Some(2);
        wait_until(|| refused(&tcp(&other, VIP)), || format!("other -> web refused at connect:\n{}", agent_a.log()));
        // (Until node A had the policy, node B refused other's tunnels itself.)
        let destination_denials = || agent_b.metric("mesh_authz_decisions_total", &[("decision", "deny"), ("reporter", "destination")]);
        let before = destination_denials();
        assert!(refused(&tcp(&other, VIP)));
        assert!(refused(&tcp(&other, "10.200.2.9:5432")), "same node: other -> db refused at connect");
        assert_eq!(names(&tcp(front, VIP)), [("web".to_owned(), 2)]);
        assert_eq!(names(&tcp(front, "10.200.2.9:5432")), [("db".to_owned(), 2)], "front is not in lab");
        assert_eq!(destination_denials(), before, "refused at the source: node B never saw them\n{}", agent_b.metrics());
        // A process in no pod has no identity the kernel can vouch for: its SYNs to pods under
        // an ALLOW policy are dropped at their ingress (here on node A, and on node B).
        let outside = probe_outside(&["tcp", "10.200.2.9:5432", "1"]);
        assert!(timed_out(&outside), "{outside}");
        let outside = probe_outside(&["tcp", "10.200.1.2:8080", "1"]);
        assert!(timed_out(&outside), "{outside}");

        // The reason, in the flow log and the source's decision counter.
        let line_for = |destination: &str| flow_events(&flow_log, "tcp_denied").into_iter().find(|l| l["destination"] == destination);
        wait_until(|| line_for("10.200.2.9:5432").is_some(), || "the refusal in the flow log".into());
        let line = line_for("10.200.2.9:5432").unwrap();
        assert_eq!(line["source_pod"], "lab/other-0", "{line}");
        assert_eq!(line["policy"], "shop/db-not-lab", "{line}");
        assert_eq!(line["errno"], "EPERM", "{line}");
        let line = line_for("10.200.1.2:8080").expect("web's refusal too");
        assert_eq!(line["destination_service"], VIP, "{line}");
        assert!(line["reason"].as_str().unwrap().contains("no ALLOW policy"), "{line}");
        wait_until(
            || {
                agent_a.metric("mesh_authz_decisions_total", &[("decision", "deny"), ("policy", "shop/db-not-lab"), ("reporter", "source")])
                    >= 2.0
            },
            || agent_a.metrics(),
        );
        let dropped = flow_events(&flow_log, "tcp_dropped").into_iter().next().expect("the outside caller's drop in node A's flow log");
        assert_eq!(
            (dropped["check"].as_str(), dropped["destination"].as_str()),
            (Some("authorization"), Some("10.200.2.9:5432")),
            "{dropped}"
        );

        // The policy goes: connections go through again.
        agent_a.remove_file("policy.yaml");
        wait_until(|| names(&tcp(&other, "10.200.2.9:5432")) == [("db".to_owned(), 2)], || agent_a.log());
        agent_a.stop();
        agent_b.stop();
        let _ = std::fs::remove_file(&flow_log);
    });
}

fn peer_authentication(name: &str, namespace: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

#[test]
fn strict_peer_authentication_drops_plaintext_in_the_kernel_and_permissive_lets_it_in() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("strict") else { return };
        run(Command::new("ip").args(["addr", "add", "10.200.2.9/32", "dev", "lo"]));
        let db = nodes.cgroup_a.child("db");
        // Node B's kubelet, and a host process of node B in no pod.
        let (kubelet, host) = (nodes.cgroup_b.child("kubelet"), nodes.cgroup_b.child("host"));
        let yaml = format!("{}{}", nodes.yaml(), db_pod(&db));
        let flow_log = std::env::temp_dir().join(format!("{}.jsonl", unique_name("flows")));
        let flow_arg = flow_log.display().to_string();
        let kubelet_arg = under_mount(&kubelet);
        let agent_b = nodes.agent_b(&yaml, &["--flow-log", &flow_arg, "--kubelet-cgroup", &kubelet_arg]);
        let agent_a = nodes.agent_a(&yaml, &[]);
        let _web = nodes.serve_on_b(probe_bin(), &["serve", "web", "10.200.1.2:8080"]);
        let _db = Backend::start_in(&db, "db", &["10.200.2.9:5432"]);
        let front = &nodes.client;
        let plain = |addr: &str| probe_outside(&["tcp", addr, "1"]);
        let answered_by = |answer: &serde_json::Value, name: &str| names(answer) == [(name.to_owned(), 1)];
        assert!(answered_by(&plain("10.200.1.2:8080"), "web"), "no PeerAuthentication: plaintext is accepted");
        // The ingress filter runs for every packet: attached only while a pod needs it.
        let filtering = |agent: &Agent| agent.bpffs.join("link_mesh_ingress").exists();
        assert!(!filtering(&agent_b), "no policy, no filter");

        // STRICT in namespace shop, on both nodes.
        let strict = peer_authentication("strict", "shop", "{mtls: {mode: STRICT}}");
        agent_a.write_file("peer.yaml", &strict);
        agent_b.write_file("peer.yaml", &strict);
        // A dropped SYN: the connect times out (nothing refuses it).
        wait_until(|| timed_out(&plain("10.200.1.2:8080")), || format!("plaintext to web dropped:\n{}", agent_b.log()));
        assert!(filtering(&agent_b), "STRICT: the filter is attached");
        let held = agent_b.config_dump()["authorization"]["strict"].clone();
        assert_eq!(
            held,
            serde_json::json!([{"address": "10.200.1.2", "port": null, "mode": "STRICT"}]),
            "/config_dump shows what the kernel holds"
        );
        let to_db = plain("10.200.2.9:5432");
        assert!(timed_out(&to_db), "plaintext to db (node A) dropped too: {to_db}");
        // Enrolled callers come in through the tunnel: web on the other node, db through
        // node A's own agent.
        assert!(answered_by(&front.probe(&["tcp", VIP, "1"]), "web"), "{}", agent_a.log());
        assert!(answered_by(&front.probe(&["tcp", "10.200.2.9:5432", "1"]), "db"), "{}", agent_a.log());
        // The kubelet's probes come in plain, as in Istio; another host process does not.
        let from_node_b =
            |cgroup: &TestCgroup| parse_probe(nodes.node_b.command(cgroup, probe_bin()).args(["tcp", "10.200.1.2:8080", "1"]));
        assert!(answered_by(&from_node_b(&kubelet), "web"), "the kubelet's probe: {}", agent_b.log());
        let from_host = from_node_b(&host);
        assert!(timed_out(&from_host), "a host process in no pod: {from_host}");
        wait_until(
            || agent_b.metric("mesh_strict_dropped_total", &[("destination_workload", "shop/web"), ("policy", "shop/strict")]) >= 1.0,
            || agent_b.metrics(),
        );
        let dropped = flow_events(&flow_log, "tcp_dropped").into_iter().next().expect("the drop in node B's flow log");
        assert_eq!(dropped["check"], "peer_authentication", "{dropped}");
        assert_eq!(dropped["destination"], "10.200.1.2:8080", "{dropped}");
        assert_eq!(dropped["destination_workload"], "shop/web", "{dropped}");

        // PERMISSIVE: plaintext is accepted again.
        let permissive = peer_authentication("strict", "shop", "{mtls: {mode: PERMISSIVE}}");
        agent_a.write_file("peer.yaml", &permissive);
        agent_b.write_file("peer.yaml", &permissive);
        wait_until(|| answered_by(&plain("10.200.1.2:8080"), "web"), || agent_b.log());
        wait_until(|| !filtering(&agent_b), || format!("the filter detached once nothing needs it:\n{}", agent_b.log()));
        assert!(answered_by(&plain("10.200.2.9:5432"), "db"));
        assert!(answered_by(&front.probe(&["tcp", VIP, "1"]), "web"));
        agent_a.stop();
        agent_b.stop();
        let _ = std::fs::remove_file(&flow_log);
    });
}

#[test]
fn an_l7_rule_is_decided_per_request_by_the_proxy_and_the_destination_takes_what_it_let_through() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("authz-l7") else { return };
        let other = nodes.cgroup_a.child("other");
        // An HTTP Service the proxy handles (mesh.dev/l7), served by web-0 on node B.
        let yaml = format!(
            "{}{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop, annotations: {{mesh.dev/l7: \"true\"}}}}\n\
             spec: {{clusterIP: 10.96.0.11, ports: [{{name: http, port: 80, targetPort: 8081}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8081}}]\n\
             endpoints: [{{addresses: [10.200.1.2], nodeName: node-b, targetRef: {{kind: Pod, name: web-0, namespace: shop}}}}]\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: \"\", kind: Service, name: api, port: 80}}], rules: [{{backendRefs: [{{name: api, port: 80}}]}}]}}\n",
            nodes.yaml(),
            other_pod(&other)
        );
        let _backend = nodes.serve_on_b(probe_bin(), &["serve", "api-b", "10.200.1.2:8081"]);
        let agent_b = nodes.agent_b(&yaml, &[]);
        let agent_a = nodes.agent_a(&yaml, &[]);
        let front = &nodes.client;
        let get = |caller: &TestCgroup, path: &str| names(&caller.probe(&["get", "10.96.0.11:80", path, "1"]));
        let answer = |text: &str| vec![(text.to_owned(), 1)];
        assert_eq!(get(front, "/private"), answer("api-b"), "no policy: {}", agent_a.log());

        // front may GET /public*; nobody else anything.
        let read_only = policy(
            "public-reads",
            "  selector: {matchLabels: {app: web}}\n  rules:\n  - from:\n    - source: {principals: [td/ns/shop/sa/front]}\n    to:\n    - operation: {methods: [GET], paths: [/public*]}\n",
        );
        agent_a.write_file("policy.yaml", &read_only);
        agent_b.write_file("policy.yaml", &read_only);
        wait_until(|| get(front, "/private") == answer("HTTP 403"), || format!("GET /private refused:\n{}", agent_a.log()));
        assert_eq!(get(front, "/public/items"), answer("api-b"), "the destination takes what the proxy let through\n{}", agent_b.log());
        assert_eq!(get(&other, "/public/items"), answer("HTTP 403"), "other is not front");
        assert_eq!(
            agent_a.metric("mesh_authz_decisions_total", &[("decision", "deny"), ("policy", "none"), ("reporter", "source")]),
            2.0,
            "{}",
            agent_a.metrics()
        );
        assert_eq!(agent_a.metric("mesh_authz_decisions_total", &[("decision", "allow"), ("policy", "shop/public-reads")]), 1.0);
        assert_eq!(
            agent_b.metric("mesh_hbone_refused_total", &[("direction", "inbound"), ("reason", "policy_denied")]),
            0.0,
            "the destination refused nothing the proxy let through\n{}",
            agent_b.metrics()
        );

        // The same policy at L4, for a caller dialling web-0 directly: it names requests, which
        // a connection does not show, so the destination refuses (fail closed, as ztunnel).
        agent_a.remove_file("policy.yaml");
        let refused_at_b = || agent_b.metric("mesh_hbone_refused_total", &[("direction", "inbound"), ("reason", "policy_denied")]);
        wait_until(
            || {
                let direct = front.probe(&["tcp", "10.200.1.2:8081", "1"]);
                names(&direct).is_empty() && refused_at_b() >= 1.0
            },
            || format!("a direct connection refused by node B:\n{}", agent_b.log()),
        );
        agent_a.stop();
        agent_b.stop();
    });
}

/// One node, no veth (so it runs on every kernel of the matrix): pods front (shop), other (lab)
/// and db (shop, app=db, 127.0.0.61, serving on 5432) in child cgroups of one agent's, mTLS off;
/// the agent writes a flow log and knows the kubelet's cgroup.
/// (Fields drop in order: the pods' cgroups before the node's.)
struct OneNode {
    front: TestCgroup,
    other: TestCgroup,
    kubelet: TestCgroup,
    agent: Agent,
    flow_log: std::path::PathBuf,
    _db: (Backend, TestCgroup),
    node: TestCgroup,
}

impl OneNode {
    fn start(name: &str) -> Self {
        let node = TestCgroup::new(name);
        let (front, other, db, kubelet) = (node.child("front"), node.child("other"), node.child("db"), node.child("kubelet"));
        let pod = |name: &str, namespace: &str, sa: &str, labels: &str, ip: &str, cgroup: &TestCgroup| {
            format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: u-{name}, labels: {{{labels}}}, annotations: {{mesh.dev/cgroup: \"{}\"}}}}\n\
                 spec: {{serviceAccountName: {sa}}}\nstatus: {{podIP: {ip}}}\n",
                under_mount(cgroup)
            )
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{mesh.dev/dataplane: enabled}}}}\n---\n\
             apiVersion: v1\nkind: Namespace\nmetadata: {{name: lab, labels: {{mesh.dev/dataplane: enabled}}}}\n{}{}{}",
            pod("front-0", "shop", "front", "app: front", "127.0.0.62", &front),
            pod("other-0", "lab", "other", "app: other", "127.0.0.63", &other),
            pod("db-0", "shop", "db", "app: db", "127.0.0.61", &db),
        );
        let kubelet_arg = under_mount(&kubelet);
        let flow_log = std::env::temp_dir().join(format!("{}.jsonl", unique_name("flows")));
        let flow_arg = flow_log.display().to_string();
        let agent = Agent::start(AgentSpec {
            extra_args: vec!["--kubelet-cgroup", &kubelet_arg, "--flow-log", &flow_arg],
            ..AgentSpec::new(&yaml, &node)
        });
        let db_backend = Backend::start_in(&db, "db", &["127.0.0.61:5432"]);
        Self { front, other, kubelet, agent, flow_log, _db: (db_backend, db), node }
    }

    fn stop(self) {
        self.agent.stop();
        let _ = std::fs::remove_file(&self.flow_log);
    }
}

/// One connection from `caller` to db: did db answer?
fn db_answers(caller: &TestCgroup) -> bool {
    names(&caller.probe(&["tcp", "127.0.0.61:5432", "1"])) == [("db".to_owned(), 1)]
}

const DB_FROM_SHOP: &str = "  selector: {matchLabels: {app: db}}\n  rules:\n  - from:\n    - source: {namespaces: [shop]}\n";
const SHOP_STRICT: &str =
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n";

#[test]
fn on_one_node_the_kernel_refuses_at_connect_filters_syns_and_lets_the_kubelet_in() {
    in_netns(|| {
        let one = OneNode::start("authz-node");
        let (agent, front, other, kubelet) = (&one.agent, &one.front, &one.other, &one.kubelet);
        let tcp = |caller: &TestCgroup| caller.probe(&["tcp", "127.0.0.61:5432", "1"]);
        let answered = |answer: &serde_json::Value| names(answer) == [("db".to_owned(), 1)];
        assert!(db_answers(other), "no policy");

        // db takes shop's pods only: other is refused at connect(), a process in no pod at the
        // SYN (it cannot be vouched for), front and the kubelet get in.
        agent.write_file("policy.yaml", &policy("db-from-shop", DB_FROM_SHOP));
        wait_until(|| tcp(other)["errors"]["EPERM"] == 1, || format!("other refused at connect:\n{}", agent.log()));
        assert!(db_answers(front), "front is in shop (vouched for by sock_ops)");
        assert!(db_answers(kubelet), "the kubelet's probe");
        let outside = probe_outside(&["tcp", "127.0.0.61:5432", "1"]);
        assert!(names(&outside).is_empty(), "a process outside the cgroup, in no pod: {outside}");

        // A policy that looks at senders' addresses: a sender without identity is decided by
        // its address at the SYN (the ingress filter's address blocks).
        let from_block = policy(
            "db-from-block",
            "  selector: {matchLabels: {app: db}}\n  rules:\n  - from:\n    - source: {ipBlocks: [127.0.0.100/32]}\n",
        );
        agent.write_file("policy.yaml", &format!("{}---\n{from_block}", policy("db-from-shop", DB_FROM_SHOP)));
        let outside_from = |source: &str| probe_outside(&["tcp", "127.0.0.61:5432", "1", source]);
        wait_until(|| answered(&outside_from("127.0.0.100:0")), || format!("127.0.0.100 let in by its block:\n{}", agent.log()));
        let blocks = agent.config_dump()["authorization"]["sender_blocks"].as_u64().unwrap_or(0);
        assert!(blocks >= 3, "db's block and the IPv4 and IPv6 rest, in /config_dump: {blocks}");
        let other_sender = outside_from("127.0.0.101:0");
        assert!(timed_out(&other_sender), "127.0.0.101 is in no block: {other_sender}");
        assert!(db_answers(front), "front is in shop");
        // A process in no pod on this node: connect() does not refuse what its address decides.
        let node_from = |source: &str| one.node.probe(&["tcp", "127.0.0.61:5432", "1", source]);
        assert!(answered(&node_from("127.0.0.100:0")), "{}", agent.log());
        let refused = node_from("127.0.0.101:0");
        assert!(timed_out(&refused), "dropped at the ingress by its address, not refused at connect(): {refused}");

        // STRICT without mTLS: only the agent's and the kubelet's connections come in.
        agent.write_file("policy.yaml", SHOP_STRICT);
        wait_until(|| timed_out(&tcp(front)), || format!("plaintext from front dropped:\n{}", agent.log()));
        assert!(db_answers(kubelet), "the kubelet's probe");
        wait_until(|| agent.metric("mesh_strict_dropped_total", &[("policy", "shop/strict")]) >= 1.0, || agent.metrics());
        agent.remove_file("policy.yaml");
        wait_until(|| db_answers(front), || agent.log());
        one.stop();
    });
}

/// The same node: connections held from before a policy change (the kernel path, no agent in
/// them) that it now denies are closed in the pod's namespace, counted and logged.
#[test]
fn on_one_node_connections_a_policy_change_denies_are_closed_counted_and_logged() {
    in_netns(|| {
        let one = OneNode::start("authz-close");
        let (agent, front, other) = (&one.agent, &one.front, &one.other);
        // Whether this kernel can close a socket on request (inet_diag with
        // CONFIG_INET_DIAG_DESTROY).
        let closes = agent.config_dump()["authorization"]["closes_established"].clone();
        if closes != true {
            println!("SKIP: this kernel cannot close sockets on request: {closes}");
            one.stop();
            return;
        }
        let closed = |check: &str, policy: &str| agent.metric("mesh_policy_closed_total", &[("check", check), ("policy", policy)]);
        let (mut held_other, mut held_front) =
            (other.hold_from("127.0.0.61:5432", "127.0.0.63:0"), front.hold_from("127.0.0.61:5432", "127.0.0.62:0"));
        assert_eq!(held_other.send("one")["answer"], "db:one");
        assert_eq!(held_front.send("one")["answer"], "db:one");

        // db takes shop's pods only: other's connection from before is closed, front's stays.
        agent.write_file("policy.yaml", &policy("db-from-shop", DB_FROM_SHOP));
        wait_until(
            || closed("authorization", "none") == 1.0,
            || format!("other's connection closed:\n{}\n{}", agent.metrics(), agent.log()),
        );
        let answer = held_other.send("two");
        assert!(answer["error"] == "ECONNRESET" || answer["error"] == "EOF", "other's connection was reset: {answer}");
        assert_eq!(held_front.send("two")["answer"], "db:two", "front's stays open");
        let line = flow_events(&one.flow_log, "tcp_policy_closed").into_iter().next().expect("the close in the flow log");
        assert_eq!(
            (line["source_workload"].as_str(), line["destination_workload"].as_str(), line["check"].as_str()),
            (Some("lab/other"), Some("shop/db"), Some("authorization")),
            "{line}"
        );

        // STRICT: front's plaintext connection from before is closed too.
        agent.write_file("policy.yaml", SHOP_STRICT);
        wait_until(|| closed("peer_authentication", "shop/strict") == 1.0, || format!("{}\n{}", agent.metrics(), agent.log()));
        assert!(held_front.send("three").get("error").is_some(), "front's plaintext connection was closed");
        one.stop();
    });
}
