//! Route matching against the Gateway API precedence rules, as tables.
use std::path::Path;

use super::*;
use crate::state::Store;

fn load(file: &str, yaml: &str) -> Result<Store, crate::sources::ConfigErrors> {
    crate::state::store::load(Path::new(file), yaml, crate::state::NodeContext { node: "node-a".into(), zone: None })
}

fn catalog(yaml: &str) -> Store {
    load("routes.yaml", yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// The router of `service`: every route attached to it.
fn for_service(store: &Store, service: &ObjectKey) -> Router {
    Router::new(store.routes().filter(|r| r.parents.contains(service)).cloned().collect())
}

/// An HTTPRoute attached to Service default/web.
fn route(name: &str, created: &str, rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: default, creationTimestamp: \"{created}\"}}\n\
         spec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n{rules}---\n"
    )
}

fn req<'a>(method: &'a str, target: &'a str, headers: &[(&'a str, &'a str)]) -> RequestParts<'a> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    RequestParts { method, path, query, headers: headers.to_vec() }
}

/// "route#rule" of the match, or "404".
fn routed(router: &Router, r: &RequestParts<'_>) -> String {
    router.route(r).map_or_else(|| "404".to_owned(), |m| format!("{}#{}", m.route.name, m.rule_index))
}

const WEB: fn() -> ObjectKey = || ObjectKey { namespace: "default".into(), name: "web".into() };

#[test]
fn path_precedence_exact_then_longest_prefix_then_regex() {
    let yaml = route(
        "paths",
        "2024-01-01T00:00:00Z",
        "  - matches: [{path: {type: PathPrefix, value: /}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /api}}]\n\
         \x20 - matches: [{path: {type: PathPrefix, value: /api/v2/}}]\n\
         \x20 - matches: [{path: {type: Exact, value: /api/v2/health}}]\n\
         \x20 - matches: [{path: {type: RegularExpression, value: \"/api/v[0-9]+/items/[0-9]+\"}}]\n",
    );
    let c = catalog(&yaml);
    let router = for_service(&c, &WEB());
    for (target, want) in [
        ("/", "paths#0"),
        ("/apix", "paths#0"),
        ("/api", "paths#1"),
        ("/api/v1/items/7", "paths#1"), // a prefix beats a regex
        ("/api/v2", "paths#2"),         // "/api/v2/" is stored as "/api/v2"
        ("/api/v2/items/7", "paths#2"),
        ("/api/v2/health", "paths#3"),
        ("/api/v2/health/x", "paths#2"),
    ] {
        assert_eq!(routed(&router, &req("GET", target, &[])), want, "for {target}");
    }
}

#[test]
fn regex_rules_apply_where_no_prefix_does() {
    let yaml = route(
        "re",
        "2024-01-01T00:00:00Z",
        "  - matches: [{path: {type: RegularExpression, value: \"/items/[0-9]+\"}}]\n\
         \x20 - matches: [{path: {type: Exact, value: /other}}]\n",
    );
    let c = catalog(&yaml);
    let router = for_service(&c, &WEB());
    assert_eq!(routed(&router, &req("GET", "/items/42", &[])), "re#0");
    assert_eq!(routed(&router, &req("GET", "/items/42/x", &[])), "404", "regexes match the whole path");
    assert_eq!(routed(&router, &req("GET", "/items/abc", &[])), "404");
}

#[test]
fn method_then_headers_then_query_break_path_ties() {
    let yaml = route(
        "ties",
        "2024-01-01T00:00:00Z",
        "  - matches: [{path: {value: /x}}]\n\
         \x20 - matches: [{path: {value: /x}, queryParams: [{name: v, value: \"2\"}]}]\n\
         \x20 - matches: [{path: {value: /x}, headers: [{name: env, value: canary}]}]\n\
         \x20 - matches: [{path: {value: /x}, headers: [{name: env, value: canary}, {name: team, type: RegularExpression, value: \"a.*\"}]}]\n\
         \x20 - matches: [{path: {value: /x}, method: POST}]\n",
    );
    let c = catalog(&yaml);
    let router = for_service(&c, &WEB());
    for (method, target, headers, want) in [
        ("GET", "/x", vec![], "ties#0"),
        ("GET", "/x?v=2", vec![], "ties#1"),
        ("GET", "/x?v=3", vec![], "ties#0"),
        ("GET", "/x?v=2", vec![("Env", "canary")], "ties#2"), // header names are case-insensitive
        ("GET", "/x", vec![("env", "canary"), ("team", "alpha")], "ties#3"),
        ("GET", "/x", vec![("env", "canary"), ("team", "beta")], "ties#2"),
        ("POST", "/x", vec![("env", "canary"), ("team", "alpha")], "ties#4"), // method beats headers
    ] {
        assert_eq!(routed(&router, &req(method, target, &headers)), want, "{method} {target} {headers:?}");
    }
}

#[test]
fn equal_matches_go_to_the_oldest_route_then_by_name_then_rule_order() {
    let rules = "  - matches: [{path: {value: /same}}]\n  - matches: [{path: {value: /same}}]\n";
    let yaml = [
        route("b-newer", "2024-06-01T00:00:00Z", rules),
        route("z-older", "2024-01-01T00:00:00Z", rules),
        route("a-older", "2024-01-01T00:00:00Z", rules),
    ]
    .concat();
    let c = catalog(&yaml);
    let router = for_service(&c, &WEB());
    assert_eq!(routed(&router, &req("GET", "/same", &[])), "a-older#0");
}

#[test]
fn routes_of_other_services_and_gateways_do_not_apply() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: gw, namespace: default}\n\
                spec: {parentRefs: [{name: my-gateway}], rules: [{matches: [{path: {value: /}}]}]}\n---\n\
                apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: other, namespace: default}\n\
                spec: {parentRefs: [{kind: Service, name: other}], rules: [{matches: [{path: {value: /}}]}]}\n";
    let c = catalog(yaml);
    assert_eq!(c.routes().count(), 1, "the Gateway route is not mesh's");
    let router = for_service(&c, &WEB());
    assert_eq!(routed(&router, &req("GET", "/", &[])), "404");
}

#[test]
fn weights_split_traffic_and_zero_weights_take_none() {
    let b = |name: &str, weight| BackendRefSpec {
        service: ObjectKey { namespace: "default".into(), name: name.into() },
        port: Some(80),
        weight,
    };
    let backends = [b("prod", 90), b("canary", 10), b("off", 0)];
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..1000u32 {
        let picked = pick_backend(&backends, i.wrapping_mul(2_654_435_761)).unwrap();
        *counts.entry(picked.service.name.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("off"), None);
    assert!((850..=950).contains(&counts["prod"]), "{counts:?}");
    assert_eq!(pick_backend(&[b("off", 0)], 7), None);
}

#[test]
fn bad_routes_are_rejected_naming_the_field() {
    let cases = [
        (
            "  - matches: [{path: {type: RegularExpression, value: \"(\"}}]\n",
            "spec.rules[0].matches[0].path.value: not a valid regular expression",
        ),
        ("  - matches: [{path: {value: api}}]\n", "spec.rules[0].matches[0].path.value: must start with \"/\""),
        (
            "  - matches: [{headers: [{name: x, type: RegularExpression, value: \"[\"}]}]\n",
            "spec.rules[0].matches[0].headers[0].value: not a valid regular expression",
        ),
        ("  - backendRefs: [{name: web, port: 80, weight: -1}]\n", "spec.rules[0].backendRefs[0].weight: must be between 0 and 1000000"),
        ("  - timeouts: {request: soon}\n", "spec.rules[0].timeouts.request: not a Gateway API duration"),
        (
            "  - timeouts: {request: 1s, backendRequest: 2s}\n",
            "spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request",
        ),
        ("  - retry: {codes: [404]}\n", "spec.rules[0].retry.codes[0]: must be a 5xx status code"),
    ];
    for (rules, want) in cases {
        let errors = load("r.yaml", route("bad", "2024-01-01T00:00:00Z", rules).as_str()).expect_err(rules).to_string();
        assert!(errors.starts_with(&format!("r.yaml: HTTPRoute default/bad: {want}")), "{errors}\nwanted {want}");
    }
}

#[test]
fn timeouts_and_retry_are_kept() {
    let c = catalog(&route(
        "t",
        "2024-01-01T00:00:00Z",
        "  - timeouts: {request: 10s, backendRequest: 500ms}\n    retry: {codes: [502, 503], attempts: 3, backoff: 100ms}\n    backendRefs: [{name: web, port: 80}]\n",
    ));
    let rule = &c.routes().next().unwrap().rules[0];
    assert_eq!(rule.request_timeout, Some(std::time::Duration::from_secs(10)));
    assert_eq!(rule.backend_timeout, Some(std::time::Duration::from_millis(500)));
    let retry = rule.retry.as_ref().unwrap();
    assert_eq!(
        (retry.codes.clone(), retry.attempts, retry.backoff),
        (vec![502, 503], Some(3), Some(std::time::Duration::from_millis(100)))
    );
    assert_eq!(rule.backends[0].weight, 1, "weight defaults to 1");
}

#[test]
fn grpc_routes_match_service_and_method_in_the_spec_order() {
    let yaml = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: default}\n\
                spec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n\
                \x20 - matches: [{method: {method: Hello}}]\n\
                \x20 - matches: [{method: {service: pkg.Greeter}}]\n\
                \x20 - matches: [{method: {service: pkg.Greeter, method: Hello}}]\n\
                \x20 - matches: [{method: {type: RegularExpression, service: \"pkg\\\\..*\", method: \"Get.*\"}}]\n";
    let c = catalog(yaml);
    let router = for_service(&c, &WEB());
    for (path, want) in [
        ("/pkg.Greeter/Hello", "g#2"),
        ("/pkg.Greeter/Bye", "g#1"),
        ("/other.Svc/Hello", "g#0"),
        ("/pkg.Store/GetItem", "g#3"),
        ("/other.Svc/Bye", "404"),
    ] {
        assert_eq!(routed(&router, &req("POST", path, &[])), want, "{path}");
    }
    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: default}\n\
               spec: {parentRefs: [{kind: Service, name: web}], rules: [{matches: [{method: {type: Exact}}]}]}\n";
    let e = load("g.yaml", bad).unwrap_err().to_string();
    assert_eq!(e, "g.yaml: GRPCRoute default/g: spec.rules[0].matches[0].method: needs service, method or both");
}
