use std::path::Path;

use super::*;
use crate::{
    state::{NodeContext, store},
    telemetry::metrics::AuthzMetrics,
};

/// front-0 (shop/front) and other-0 (lab/other) on this node; web-0 (shop/web, app=web) on
/// node-b and db-0 (shop/db, app=db) here; all enrolled.
const PODS: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh.dev/dataplane: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: lab, labels: {mesh.dev/dataplane: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: front-0, namespace: shop, uid: u1}
spec: {nodeName: node-a, serviceAccountName: front}
status: {podIP: 10.1.0.1, hostIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: other-0, namespace: lab, uid: u2}
spec: {nodeName: node-a, serviceAccountName: other}
status: {podIP: 10.1.0.2, hostIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, uid: u3, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: web}
status: {podIP: 10.2.0.1, hostIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, uid: u4, labels: {app: db}}
spec: {nodeName: node-a, serviceAccountName: db}
status: {podIP: 10.1.0.9, hostIP: 10.0.0.1}
";

const POLICIES: &str = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-from-front, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from:
    - source: {principals: [td/ns/shop/sa/front]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-port, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules:
  - to:
    - operation: {ports: ['5432']}
";

fn plan_of(yaml: &str) -> (Plan, HashMap<u32, ObjectKey>, imbl::HashMap<u32, Arc<Workload>>) {
    let node = NodeContext { node: "node-a".into(), zone: None };
    let snapshot = store::load(Path::new("t.yaml"), yaml, node).unwrap().snapshot();
    let callers: imbl::HashMap<u32, Arc<Workload>> =
        snapshot.pods.values().filter(|w| w.spec.key.name != "db-0").enumerate().map(|(i, w)| (i as u32 + 1, w.clone())).collect();
    let mut planner = AuthzPlanner::new(Arc::new(Authorizer::new("istio-system", AuthzMetrics::default())), "td".into());
    let plan = planner.plan(&snapshot, &callers);
    (plan, planner.policy_numbers(), callers)
}

fn number_of(callers: &imbl::HashMap<u32, Arc<Workload>>, name: &str) -> u32 {
    callers.iter().find(|(_, w)| w.spec.key.name == name).map(|(n, _)| *n).unwrap()
}

#[test]
fn no_policy_writes_nothing() {
    let (plan, _, _) = plan_of(PODS);
    assert_eq!(plan, Plan::default());
}

#[test]
fn selected_pods_get_classes_and_only_refusals_and_exceptions_are_written() {
    let (plan, numbers, callers) = plan_of(&format!("{PODS}{POLICIES}"));
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(plan.classes.keys().copied().collect::<Vec<_>>(), [ip("10.1.0.9"), ip("10.2.0.1")], "db and web are under policy");
    let (web, db) = (plan.classes[&ip("10.2.0.1")], plan.classes[&ip("10.1.0.9")]);
    assert_ne!(web, db);
    let (front, other) = (number_of(&callers, "front-0"), number_of(&callers, "other-0"));
    let verdict = |workload: u32, class: u32, port: u16| plan.verdicts.get(&AuthzKey { workload, class, port, _pad16: 0 }).copied();
    // web: only front is allowed, on any port; other and "no pod" are refused everywhere.
    assert_eq!(verdict(front, web, 0), None, "allowed: nothing written");
    assert_eq!(verdict(other, web, 0), Some(AuthzVerdict { allow: 0, policy: 0 }), "no ALLOW matched: no policy named");
    assert_eq!(verdict(0, web, 0), Some(AuthzVerdict { allow: 0, policy: 0 }));
    // db: everyone is refused port 5432 only, by db-port.
    let denied = verdict(front, db, 5432).expect("port 5432 refused");
    assert_eq!((denied.allow, numbers[&denied.policy].to_string().as_str()), (0, "shop/db-port"));
    assert_eq!(verdict(front, db, 0), None, "other ports are allowed");
    assert_eq!(plan.verdicts.len(), 2 + 3, "web: other and no-pod; db: 5432 for each of three callers");
}

#[test]
fn a_port_refused_by_another_policy_than_the_rest_names_its_own() {
    let more = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-shop, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from:
    - source: {namespaces: [shop]}
";
    // other (lab): refused on every port of db, on 5432 by db-port's DENY, elsewhere by no
    // ALLOW matching.
    let (plan, numbers, callers) = plan_of(&format!("{PODS}{POLICIES}{more}"));
    let db = plan.classes[&"10.1.0.9".parse().unwrap()];
    let other = number_of(&callers, "other-0");
    let verdict = |port: u16| plan.verdicts[&AuthzKey { workload: other, class: db, port, _pad16: 0 }];
    assert_eq!(verdict(0), AuthzVerdict { allow: 0, policy: 0 });
    assert_eq!(numbers[&verdict(5432).policy].to_string(), "shop/db-port");
}

#[test]
fn an_exception_port_is_written_where_the_rest_is_refused() {
    let allow_one_port = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-8080, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - to:
    - operation: {ports: ['8080']}
";
    let (plan, _, callers) = plan_of(&format!("{PODS}{allow_one_port}"));
    let web = plan.classes[&"10.2.0.1".parse().unwrap()];
    let front = number_of(&callers, "front-0");
    let verdict = |port: u16| plan.verdicts.get(&AuthzKey { workload: front, class: web, port, _pad16: 0 }).map(|v| v.allow);
    assert_eq!(verdict(0), Some(0), "ports but 8080 refused");
    assert_eq!(verdict(8080), Some(1), "8080 allowed, an exception to port 0's refusal");
}

mod review {
    use std::collections::HashSet;

    use mesh_common::{ConnValue, direction};

    use super::*;
    use crate::{
        ebpf::image::addr_of,
        sync::authz::review::{Check, Dialers, to_cut},
    };

    /// An accepted connection of this node (`direction`), `from` -> `to`.
    fn conn(cookie: u64, from: &str, to: &str, dir: u8) -> ConnValue {
        let (from, to): (std::net::SocketAddr, std::net::SocketAddr) = (from.parse().unwrap(), to.parse().unwrap());
        ConnValue {
            cookie,
            local: addr_of(to.ip()),
            local_port: to.port(),
            remote: addr_of(from.ip()),
            remote_port: from.port(),
            direction: dir,
            ..ConnValue::default()
        }
    }

    /// The connections cut: (cookie, check, the policy's name).
    fn cuts_for(yaml: &str, conns: &[ConnValue]) -> Vec<(u64, Check, String)> {
        let node = NodeContext { node: "node-a".into(), zone: None };
        let snapshot = store::load(Path::new("t.yaml"), yaml, node).unwrap().snapshot();
        let callers: imbl::HashMap<u32, Arc<Workload>> =
            snapshot.pods.values().enumerate().map(|(i, w)| (i as u32 + 1, w.clone())).collect();
        let mut planner = AuthzPlanner::new(Arc::new(Authorizer::new("istio-system", AuthzMetrics::default())), "td".into());
        let plan = planner.plan(&snapshot, &callers);
        let node_addresses: HashSet<IpAddr> = ["10.0.0.1".parse().unwrap()].into();
        let dialers = Dialers::new(&snapshot, &callers, node_addresses);
        let (authz, peer) = (planner.policy_numbers(), planner.peer_authentication_numbers());
        to_cut(&plan, conns, &dialers)
            .into_iter()
            .map(|c| {
                let names = if c.check == Check::Strict { &peer } else { &authz };
                (c.conn.cookie, c.check, names.get(&c.policy).map_or("none".into(), ToString::to_string))
            })
            .collect()
    }

    #[test]
    fn accepted_connections_the_plan_refuses_are_cut_as_the_kernel_would_refuse_them_now() {
        let conns = [
            conn(1, "10.1.0.1:40000", "10.1.0.9:5432", direction::INBOUND), // front -> db:5432: DENY db-port
            conn(2, "10.1.0.1:40001", "10.1.0.9:80", direction::INBOUND),   // front -> db:80: allowed
            conn(3, "10.0.0.1:40002", "10.1.0.9:5432", direction::INBOUND), // the node (agent, kubelet): not decided
            conn(4, "10.7.7.7:40003", "10.1.0.9:5432", direction::INBOUND), // no pod: denied too
            conn(5, "10.1.0.1:40000", "10.1.0.9:5432", direction::OUTBOUND), // the caller's end: not the one cut
            conn(6, "10.1.0.2:40004", "10.1.0.1:8080", direction::INBOUND), // other -> front: front under no policy
        ];
        let cuts = cuts_for(&format!("{PODS}{POLICIES}"), &conns);
        assert_eq!(cuts, [(1, Check::Authorization, "shop/db-port".to_owned()), (4, Check::Authorization, "shop/db-port".to_owned())]);
        // No policy: nothing is cut.
        assert_eq!(cuts_for(PODS, &conns), []);
    }

    #[test]
    fn plaintext_to_a_strict_port_is_cut_except_from_the_node() {
        let strict = "
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}, selector: {matchLabels: {app: db}}, portLevelMtls: {'8080': {mode: PERMISSIVE}}}
";
        let conns = [
            conn(1, "10.1.0.2:40000", "10.1.0.9:5432", direction::INBOUND), // other -> db: plaintext
            conn(2, "10.0.0.1:40001", "10.1.0.9:5432", direction::INBOUND), // the agent's delivery
            conn(3, "10.1.0.2:40002", "10.1.0.9:8080", direction::INBOUND), // a PERMISSIVE port
        ];
        let cuts = cuts_for(&format!("{PODS}{strict}"), &conns);
        assert_eq!(cuts, [(1, Check::Strict, "shop/strict".to_owned())]);
    }
}

#[test]
fn only_a_plan_that_refuses_more_is_worth_reviewing_connections_for() {
    let (none, _, _) = plan_of(PODS);
    let (policies, _, _) = plan_of(&format!("{PODS}{POLICIES}"));
    assert!(policies.refuses_more_than(&none), "policies where there were none");
    assert!(!none.refuses_more_than(&policies), "policies gone");
    assert!(!policies.refuses_more_than(&policies), "the same plan");
    // An exception (port 8080 allowed where the rest is refused) dropped refuses more.
    let key = AuthzKey { workload: 7, class: 1, port: 0, _pad16: 0 };
    let refused = AuthzVerdict { allow: 0, policy: 0 };
    let mut with_exception = Plan::default();
    with_exception.classes.insert("10.1.0.9".parse().unwrap(), 1);
    with_exception.verdicts.insert(key, refused);
    let mut without = Plan { classes: with_exception.classes.clone(), verdicts: with_exception.verdicts.clone(), ..Plan::default() };
    with_exception.verdicts.insert(AuthzKey { port: 8080, ..key }, AuthzVerdict { allow: 1, policy: 0 });
    assert!(without.refuses_more_than(&with_exception));
    assert!(!with_exception.refuses_more_than(&without));
    // A pod that moves into a class refuses more, even with the class's verdicts unchanged.
    without.classes.insert("10.1.0.10".parse().unwrap(), 1);
    assert!(without.refuses_more_than(&Plan {
        classes: with_exception.classes.clone(),
        verdicts: without.verdicts.clone(),
        ..Plan::default()
    }));
    // STRICT: a new entry refuses more, a dropped one does not; a dropped PERMISSIVE exception does.
    let strict_key = |port| StrictKey { addr: crate::ebpf::image::addr_of("10.1.0.9".parse().unwrap()), port, _pad16: 0 };
    let mut strict = Plan::default();
    strict.strict.insert(strict_key(0), StrictValue { strict: 1, policy: 1 });
    assert!(strict.refuses_more_than(&Plan::default()));
    assert!(!Plan::default().refuses_more_than(&strict));
    let mut exception = Plan { strict: strict.strict.clone(), ..Plan::default() };
    exception.strict.insert(strict_key(8080), StrictValue { strict: 0, policy: 2 });
    assert!(strict.refuses_more_than(&exception));
}

#[test]
fn senders_without_identity_are_decided_by_address_block_where_policies_look_at_addresses() {
    // db takes 10.0.0.0/8 but not 10.9.0.0/16 (except 10.9.9.9) on every port, and shop's pods.
    let blocks = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-ten, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.9.0.0/16]}
  - from:
    - source: {ipBlocks: [10.9.9.9]}
  - from:
    - source: {namespaces: [shop]}
";
    let (plan, numbers, _) = plan_of(&format!("{PODS}{blocks}"));
    let db = plan.classes[&"10.1.0.9".parse().unwrap()];
    let verdict = |sender: &str| plan.sender_verdict(db, 5432, sender.parse().unwrap()).map(|v| v.allow);
    assert_eq!(verdict("10.200.0.1"), Some(1), "in 10/8");
    assert_eq!(verdict("10.9.1.1"), Some(0), "in the excluded /16");
    assert_eq!(verdict("10.9.9.9"), Some(1), "the one address let in");
    assert_eq!(verdict("192.168.0.1"), Some(0), "outside every block");
    assert_eq!(verdict("fd00::1"), Some(0), "IPv6, outside every block");
    assert_eq!(verdict("::ffff:10.1.2.3"), Some(1), "IPv4-mapped is IPv4");
    let refused = plan.sender_verdict(db, 5432, "192.168.0.1".parse().unwrap()).unwrap();
    assert_eq!(refused.policy, 0, "no ALLOW matched: no policy named");
    // Only classes whose policies look at addresses get blocks: web's (principals) has none.
    let (plan, _, _) = plan_of(&format!("{PODS}{POLICIES}{blocks}"));
    let web = plan.classes[&"10.2.0.1".parse().unwrap()];
    assert!(plan.senders.keys().all(|(_, k)| u32::from_be(k.class_be) != web));
    assert_eq!(plan.sender_verdict(web, 80, "10.200.0.1".parse().unwrap()), None);
    // The port a DENY names has blocks of its own: 5432 refused to everyone by db-port.
    let db = plan.classes[&"10.1.0.9".parse().unwrap()];
    let on_5432 = plan.sender_verdict(db, 5432, "10.200.0.1".parse().unwrap()).unwrap();
    assert_eq!((on_5432.allow, numbers.len()), (0, 1));
    assert_eq!(plan.sender_verdict(db, 80, "10.200.0.1".parse().unwrap()).map(|v| v.allow), Some(1));
}

#[test]
fn a_process_in_no_pod_is_left_to_the_ingress_filter_where_policies_look_at_addresses() {
    let blocks = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-from-node, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.1/32]}
";
    let (plan, _, callers) = plan_of(&format!("{PODS}{blocks}"));
    let db = plan.classes[&"10.1.0.9".parse().unwrap()];
    assert!(!plan.verdicts.keys().any(|k| k.workload == 0), "no refusal of a process in no pod at connect()");
    let other = number_of(&callers, "other-0");
    assert_eq!(plan.verdicts.get(&AuthzKey { workload: other, class: db, port: 0, _pad16: 0 }).map(|v| v.allow), Some(0), "pods still are");
    assert_eq!(plan.sender_verdict(db, 5432, "10.0.0.1".parse().unwrap()).map(|v| v.allow), Some(1), "the node's address, at the ingress");
}
