//! What an authorization decision costs the destination agent per connection, with 1,000
//! AuthorizationPolicies loaded, against none (`cargo xtask bench authz` runs it optimised and
//! reads its JSON). CPU time of this thread, so neighbours on the machine move it little.
//!
//! Cases, each a connection from one caller to one pod:
//! - `none`: no policy at all (the baseline);
//! - `spread`: 1,000 policies over 100 namespaces, each selecting its own workload; the
//!   destination is selected by one ALLOW (the common case);
//! - `crowded`: the 1,000 policies all in the destination's namespace and all selecting it,
//!   the caller allowed by the last one (the worst case: every rule is tried);
//! - `cold`: `spread` right after a policy change (which policies select the pod is worked
//!   out again, once per pod and change).
use std::{hint::black_box, path::Path, sync::Arc, time::Duration};

use mesh::{
    authz::{Ask, Authorizer, Caller, Reporter},
    identity::Identity,
    state::{NodeContext, ObjectKey, store},
    telemetry::metrics::AuthzMetrics,
};

const POLICIES: usize = 1_000;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn pod(namespace: &str, name: &str, app: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: {name}, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: n, serviceAccountName: {app}}}\nstatus: {{podIP: {ip}}}\n---\n"
    )
}

fn policy(namespace: &str, name: &str, app: &str, principal: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  rules:\n  - from:\n    - source: {{principals: [{principal}]}}\n    to:\n    - operation: {{ports: ['8080', '9090']}}\n---\n"
    )
}

/// The destination (ns-0/web, app web) and 1,000 policies laid out as the case says.
fn objects(case: &str) -> String {
    let mut y = pod("ns-0", "web-0", "web", "10.1.0.1");
    for i in 0..POLICIES {
        y.push_str(&match case {
            "spread" if i == 0 => policy("ns-0", "p0", "web", "td/ns/client/sa/caller"),
            "spread" => policy(&format!("ns-{}", i % 100), &format!("p{i}"), &format!("app-{i}"), &format!("td/ns/client/sa/other-{i}")),
            "crowded" if i == POLICIES - 1 => policy("ns-0", &format!("p{i}"), "web", "td/ns/client/sa/caller"),
            "crowded" => policy("ns-0", &format!("p{i}"), "web", &format!("td/ns/client/sa/other-{i}")),
            _ => String::new(),
        });
    }
    y
}

/// (ns per decision, decisions allowed) over `n` connections.
fn run(case: &str, n: usize, cold: bool) -> (f64, usize) {
    let node = NodeContext { node: "n".into(), zone: None };
    let store_case = if case == "cold" { "spread" } else { case };
    let snapshot = store::load(Path::new("bench.yaml"), &objects(store_case), node).expect("bench objects").snapshot();
    let workload = snapshot.pods[&ObjectKey::new("ns-0", "web-0")].clone();
    let identity = Identity::new("td", "client", "caller").expect("identity");
    let mut allowed = 0;
    let mut spent = Duration::ZERO;
    let authorizer = Authorizer::new("istio-system", AuthzMetrics::default());
    for i in 0..n {
        // A policy change: a new set, whose applicable policies are worked out again.
        let policies = if cold { Arc::new((*snapshot.policies).clone()) } else { snapshot.policies.clone() };
        let started = thread_cpu();
        // Per connection: the caller's names, the decision, the metric.
        let caller = Caller::of(&identity);
        let ask = Ask {
            caller: Some(&caller),
            source_ip: Some("10.2.0.1".parse().expect("ip")),
            destination_ip: "10.1.0.1".parse().expect("ip"),
            port: if i % 2 == 0 { 8080 } else { 9090 },
            request: None,
            l7_checked: false,
        };
        let decision = authorizer.decide(black_box(&policies), black_box(&workload), &ask, Reporter::Destination);
        spent += thread_cpu() - started;
        allowed += usize::from(decision.allowed);
    }
    (spent.as_nanos() as f64 / n as f64, allowed)
}

fn main() {
    let mut results = serde_json::Map::new();
    for (case, n, cold) in [("none", 200_000, false), ("spread", 200_000, false), ("crowded", 20_000, false), ("cold", 2_000, true)] {
        let (ns, allowed) = run(case, n, cold);
        assert_eq!(allowed, n, "{case}: every connection is allowed (the caller is named by a policy, or none applies)");
        eprintln!("[bench] {case:<8} {ns:>10.0} ns per decision ({n} decisions)");
        results.insert(case.to_owned(), serde_json::json!({ "ns_per_decision": ns, "decisions": n }));
    }
    println!("{}", serde_json::Value::Object(results));
}
