use std::{collections::BTreeMap, path::Path, sync::Arc};

use super::*;
use crate::state::{NodeContext, model::Enrollment, store};

fn policies(yaml: &str) -> Arc<Policies> {
    let node = NodeContext { node: "n".into(), zone: None };
    store::load(Path::new("policies.yaml"), yaml, node).unwrap().snapshot().policies.clone()
}

fn workload(namespace: &str, labels: &[(&str, &str)]) -> Workload {
    let spec = PodSpec {
        key: ObjectKey::new(namespace, "httpbin-7d4f8b9c6-x2x9k"),
        uid: "u".into(),
        workload: "httpbin".into(),
        service_account: "httpbin".into(),
        labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>(),
        ips: vec!["10.1.0.5".parse().unwrap()],
        host_network: false,
        qos: None,
        enrollment: Enrollment::Enabled,
        local: true,
        host_ip: None,
        cgroup: None,
    };
    Workload { spec: Arc::new(spec), enrolled: true }
}

/// One of Istio's documented examples and the decision its documentation gives.
struct Case {
    name: &'static str,
    policies: &'static str,
    /// The destination's namespace and labels.
    to: (&'static str, &'static [(&'static str, &'static str)]),
    /// The caller's namespace and service account; None for plaintext.
    from: Option<(&'static str, &'static str)>,
    source_ip: &'static str,
    port: u16,
    /// Method, path, host; None for a TCP connection.
    request: Option<(&'static str, &'static str, &'static str)>,
    allowed: bool,
    /// The policy that decided, if one did.
    by: Option<&'static str>,
}

const HTTPBIN: (&str, &[(&str, &str)]) = ("foo", &[("app", "httpbin"), ("version", "v1")]);
const TCP_ECHO: (&str, &[(&str, &str)]) = ("foo", &[("app", "tcp-echo")]);

const ALLOW_NOTHING: &str =
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: foo}\nspec: {}\n";

const DENY_ALL: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}\n";

const ALLOW_ALL: &str =
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: foo}\nspec: {rules: [{}]}\n";

/// The reference page's first example (its JWT `when` left out).
const HTTPBIN_READ: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/sleep]}
    - source: {namespaces: [test]}
    to:
    - operation: {methods: [GET], paths: [/info*]}
    - operation: {methods: [POST], paths: [/data]}
";

/// The reference page's DENY example: requests not from namespace foo.
const DENY_OTHER_NAMESPACES: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-deny, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: DENY
  rules:
  - from:
    - source: {notNamespaces: [foo]}
";

/// The TCP task: ports 9000 and 9001 allowed.
const TCP_PORTS: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: ALLOW
  rules:
  - to:
    - operation: {ports: ['9000', '9001']}
";

/// The TCP task's second step: an HTTP-only field in an ALLOW rule never matches TCP.
const TCP_ALLOW_WITH_METHODS: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: ALLOW
  rules:
  - to:
    - operation: {methods: [GET], ports: ['9000']}
";

/// The TCP task's third step: in a DENY rule the HTTP-only field is ignored for TCP.
const TCP_DENY_WITH_METHODS: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: DENY
  rules:
  - to:
    - operation: {methods: [GET], ports: ['9000']}
";

/// The ingress task's address allow-list.
const IP_ALLOW_LIST: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ingress-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - from:
    - source: {ipBlocks: [1.2.3.4, 5.6.7.0/24]}
";

/// Mesh-wide, in the root namespace: allow nothing.
const ROOT_ALLOW_NOTHING: &str =
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: istio-system}\nspec: {}\n";

/// The explicit-deny task: deny GET on /headers... and allow GET from anyone.
const DENY_BEFORE_ALLOW: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to:
    - operation: {methods: [GET]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules:
  - to:
    - operation: {methods: [GET, POST]}
";

/// Authenticated callers only: `principals: ["*"]` needs mTLS.
const ANY_PRINCIPAL: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: require-mtls, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ['*']}
";

/// Deny every port but 8080.
const NOT_PORTS: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-8080, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {notPorts: ['8080']}
";

/// Service accounts by prefix; a policy of another namespace does not apply here.
const PREFIX_AND_OTHER_NAMESPACE: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: from-foo-clients, namespace: foo}
spec:
  action: ALLOW
  rules:
  - from:
    - source: {principals: ['cluster.local/ns/foo/sa/client-*']}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: bar}
spec: {action: DENY, rules: [{}]}
";

/// A condition on request headers mesh does not read: a DENY with it fails closed, an ALLOW
/// never matches, even for requests.
const HEADER_CONDITIONS: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-by-header, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {ports: ['8000']}
    when:
    - key: request.headers[x-debug]
      values: ['1']
";

/// AUDIT changes nothing.
const AUDIT_ONLY: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-posts, namespace: foo}
spec:
  action: AUDIT
  rules:
  - to:
    - operation: {ports: ['8000']}
";

fn cases() -> Vec<Case> {
    let c = |name, policies, to, from, source_ip, port, request, allowed, by| Case {
        name,
        policies,
        to,
        from,
        source_ip,
        port,
        request,
        allowed,
        by,
    };
    let sleep = Some(("default", "sleep"));
    let get = |path| Some(("GET", path, "httpbin.foo"));
    vec![
        c("no policy: allow", "", HTTPBIN, sleep, "10.1.1.1", 8000, None, true, None),
        c("allow-nothing denies", ALLOW_NOTHING, HTTPBIN, sleep, "10.1.1.1", 8000, None, false, None),
        c("deny-all denies", DENY_ALL, HTTPBIN, sleep, "10.1.1.1", 8000, get("/"), false, Some("foo/deny-all")),
        c("allow-all allows", ALLOW_ALL, HTTPBIN, sleep, "10.1.1.1", 8000, None, true, Some("foo/allow-all")),
        c("reference: GET /info from sleep", HTTPBIN_READ, HTTPBIN, sleep, "10.1.1.1", 8000, get("/info/x"), true, Some("foo/httpbin")),
        c(
            "reference: POST /data from test",
            HTTPBIN_READ,
            HTTPBIN,
            Some(("test", "any")),
            "10.1.1.1",
            8000,
            Some(("POST", "/data", "h")),
            true,
            Some("foo/httpbin"),
        ),
        c("reference: POST /info is not listed", HTTPBIN_READ, HTTPBIN, sleep, "10.1.1.1", 8000, Some(("POST", "/info", "h")), false, None),
        c(
            "reference: GET /info from another namespace",
            HTTPBIN_READ,
            HTTPBIN,
            Some(("other", "sleep")),
            "10.1.1.1",
            8000,
            get("/info"),
            false,
            None,
        ),
        c(
            "reference: a version-2 pod is not selected",
            HTTPBIN_READ,
            ("foo", &[("app", "httpbin"), ("version", "v2")]),
            Some(("other", "x")),
            "10.1.1.1",
            8000,
            None,
            true,
            None,
        ),
        c("reference: its L7 rules never allow a TCP connection", HTTPBIN_READ, HTTPBIN, sleep, "10.1.1.1", 8000, None, false, None),
        c(
            "deny: from another namespace",
            DENY_OTHER_NAMESPACES,
            HTTPBIN,
            Some(("bar", "sleep")),
            "10.1.1.1",
            8000,
            None,
            false,
            Some("foo/httpbin-deny"),
        ),
        c("deny: from foo is allowed", DENY_OTHER_NAMESPACES, HTTPBIN, Some(("foo", "sleep")), "10.1.1.1", 8000, None, true, None),
        c(
            "deny: plaintext has no namespace, so notNamespaces denies it",
            DENY_OTHER_NAMESPACES,
            HTTPBIN,
            None,
            "10.1.1.1",
            8000,
            None,
            false,
            Some("foo/httpbin-deny"),
        ),
        c("tcp: port 9000 allowed", TCP_PORTS, TCP_ECHO, sleep, "10.1.1.1", 9000, None, true, Some("foo/tcp-policy")),
        c("tcp: port 9002 denied", TCP_PORTS, TCP_ECHO, sleep, "10.1.1.1", 9002, None, false, None),
        c("tcp: ALLOW with methods never matches TCP", TCP_ALLOW_WITH_METHODS, TCP_ECHO, sleep, "10.1.1.1", 9000, None, false, None),
        c(
            "tcp: DENY with methods denies the port",
            TCP_DENY_WITH_METHODS,
            TCP_ECHO,
            sleep,
            "10.1.1.1",
            9000,
            None,
            false,
            Some("foo/tcp-policy"),
        ),
        c("tcp: DENY with methods leaves other ports", TCP_DENY_WITH_METHODS, TCP_ECHO, sleep, "10.1.1.1", 9001, None, true, None),
        c("ipBlocks: in the /24", IP_ALLOW_LIST, HTTPBIN, None, "5.6.7.8", 8000, None, true, Some("foo/ingress-policy")),
        c("ipBlocks: the one address", IP_ALLOW_LIST, HTTPBIN, sleep, "1.2.3.4", 8000, None, true, Some("foo/ingress-policy")),
        c("ipBlocks: elsewhere", IP_ALLOW_LIST, HTTPBIN, sleep, "9.9.9.9", 8000, None, false, None),
        c("root namespace applies to every namespace", ROOT_ALLOW_NOTHING, HTTPBIN, sleep, "10.1.1.1", 8000, None, false, None),
        c("DENY before ALLOW", DENY_BEFORE_ALLOW, HTTPBIN, sleep, "10.1.1.1", 8000, get("/headers"), false, Some("foo/deny-method-get")),
        c(
            "the ALLOW takes what DENY leaves",
            DENY_BEFORE_ALLOW,
            HTTPBIN,
            sleep,
            "10.1.1.1",
            8000,
            Some(("POST", "/", "h")),
            true,
            Some("foo/allow-all-get"),
        ),
        c("principals * allows any mTLS peer", ANY_PRINCIPAL, HTTPBIN, sleep, "10.1.1.1", 8000, None, true, Some("foo/require-mtls")),
        c("principals * refuses plaintext", ANY_PRINCIPAL, HTTPBIN, None, "10.1.1.1", 8000, None, false, None),
        c("notPorts: 8080 passes", NOT_PORTS, HTTPBIN, sleep, "10.1.1.1", 8080, None, true, None),
        c("notPorts: 9090 denied", NOT_PORTS, HTTPBIN, sleep, "10.1.1.1", 9090, None, false, Some("foo/only-8080")),
        c(
            "principal prefix matches",
            PREFIX_AND_OTHER_NAMESPACE,
            HTTPBIN,
            Some(("foo", "client-a")),
            "10.1.1.1",
            80,
            None,
            true,
            Some("foo/from-foo-clients"),
        ),
        c(
            "principal prefix does not match",
            PREFIX_AND_OTHER_NAMESPACE,
            HTTPBIN,
            Some(("foo", "server")),
            "10.1.1.1",
            80,
            None,
            false,
            None,
        ),
        c("AUDIT alone allows", AUDIT_ONLY, HTTPBIN, sleep, "10.1.1.1", 8000, None, true, None),
        c(
            "an unread request condition: DENY fails closed on requests",
            HEADER_CONDITIONS,
            HTTPBIN,
            sleep,
            "10.1.1.1",
            8000,
            get("/"),
            false,
            Some("foo/deny-by-header"),
        ),
        c("an unread request condition: other ports untouched", HEADER_CONDITIONS, HTTPBIN, sleep, "10.1.1.1", 9000, get("/"), true, None),
    ]
}

#[test]
fn istios_documented_examples_decide_as_its_documentation_says() {
    let mut failures = Vec::new();
    for case in cases() {
        let authorizer = Authorizer::new(DEFAULT_ROOT_NAMESPACE, AuthzMetrics::default());
        let policies = policies(case.policies);
        let workload = workload(case.to.0, case.to.1);
        let caller = case.from.map(|(ns, sa)| Caller::of(&Identity::new("cluster.local", ns, sa).unwrap()));
        let ask = Ask {
            caller: caller.as_ref(),
            source_ip: Some(case.source_ip.parse().unwrap()),
            destination_ip: "10.1.0.5".parse().unwrap(),
            port: case.port,
            request: case.request.map(|(method, path, host)| Request { method, path, host }),
            l7_checked: false,
        };
        let decision = authorizer.decide(&policies, &workload, &ask, Reporter::Destination);
        let by = decision.policy.as_ref().map(ToString::to_string);
        if decision.allowed != case.allowed || by.as_deref() != case.by {
            failures.push(format!("{}: got {decision} (policy {by:?}), want allowed={} by {:?}", case.name, case.allowed, case.by));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn audit_matches_are_reported_and_change_nothing() {
    let authorizer = Authorizer::new(DEFAULT_ROOT_NAMESPACE, AuthzMetrics::default());
    let ask =
        Ask { caller: None, source_ip: None, destination_ip: "10.1.0.5".parse().unwrap(), port: 8000, request: None, l7_checked: false };
    let decision = authorizer.decide(&policies(AUDIT_ONLY), &workload(HTTPBIN.0, HTTPBIN.1), &ask, Reporter::Destination);
    assert!(decision.allowed);
    assert_eq!(decision.audited, [ObjectKey::new("foo", "audit-posts")]);
}

#[test]
fn decisions_are_counted_by_decision_policy_and_reporter() {
    let metrics = AuthzMetrics::default();
    let authorizer = Authorizer::new(DEFAULT_ROOT_NAMESPACE, metrics.clone());
    let policies = policies(TCP_PORTS);
    let to = workload(TCP_ECHO.0, TCP_ECHO.1);
    for port in [9000, 9000, 9002] {
        let ask =
            Ask { caller: None, source_ip: None, destination_ip: "10.1.0.5".parse().unwrap(), port, request: None, l7_checked: false };
        authorizer.decide(&policies, &to, &ask, Reporter::Destination);
    }
    let count = |decision: &str, policy: &str| {
        let labels = AuthzLabels { decision: decision.into(), policy: policy.into(), reporter: "destination".into() };
        metrics.decisions.get_or_create(&labels).get()
    };
    assert_eq!(count("allow", "foo/tcp-policy"), 2);
    assert_eq!(count("deny", "none"), 1);
}

#[test]
fn the_applicable_set_is_cached_until_the_policies_or_the_pod_change() {
    let authorizer = Authorizer::new(DEFAULT_ROOT_NAMESPACE, AuthzMetrics::default());
    let first = policies(TCP_PORTS);
    let to = workload(TCP_ECHO.0, TCP_ECHO.1);
    let a = authorizer.applicable(&first, &to);
    assert!(Arc::ptr_eq(&a, &authorizer.applicable(&first, &to)), "same policies, same pod: cached");
    let relabelled = workload(TCP_ECHO.0, &[("app", "other")]);
    assert!(authorizer.applicable(&first, &relabelled).is_empty(), "a relabelled pod is looked at again");
    let second = policies(ALLOW_NOTHING);
    assert_eq!(authorizer.applicable(&second, &to).allow.len(), 1, "new policies are looked at");
}

#[test]
fn invalid_policies_name_the_field() {
    let node = NodeContext { node: "n".into(), zone: None };
    let bad = [
        ("spec: {action: CUSTOM}", "spec.action"),
        ("spec: {action: ALOW}", "spec.action"),
        ("spec: {rules: [{to: [{operation: {ports: ['http']}}]}]}", "spec.rules[0].to[0].operation.ports[0]"),
        ("spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "spec.rules[0].from[0].source.ipBlocks[0]"),
        ("spec: {rules: [{from: [{source: {principals: ['a*b']}}]}]}", "spec.rules[0].from[0].source.principals[0]"),
        ("spec: {rules: [{when: [{key: connection.sni, values: [x]}]}]}", "spec.rules[0].when[0].key"),
        ("spec: {targetRefs: [{kind: Service, name: x}]}", "spec.targetRefs"),
        ("spec: {rules: [{from: [{source: {principal: [x]}}]}]}", "spec.rules[0].from[0].source"),
    ];
    for (spec, field) in bad {
        let yaml = format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\n{spec}\n");
        let errors = store::load(Path::new("p.yaml"), &yaml, node.clone()).expect_err(spec);
        let text = errors.to_string();
        assert!(text.contains(field), "{spec}: {text}");
        assert!(text.contains("AuthorizationPolicy foo/p"), "{text}");
    }
    let bad_pa = [
        ("spec: {mtls: {mode: STRIC}}", "spec.mtls.mode"),
        ("spec: {portLevelMtls: {'8080': {mode: DISABLE}}}", "spec.portLevelMtls"),
        ("spec: {selector: {matchLabels: {a: b}}, portLevelMtls: {'0': {mode: DISABLE}}}", "spec.portLevelMtls[\"0\"]"),
    ];
    for (spec, field) in bad_pa {
        let yaml = format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: foo}}\n{spec}\n");
        let text = store::load(Path::new("p.yaml"), &yaml, node.clone()).expect_err(spec).to_string();
        assert!(text.contains(field), "{spec}: {text}");
    }
}
