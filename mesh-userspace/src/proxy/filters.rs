//! Gateway API filters: header edits, path rewrites, redirects (answered by the proxy
//! itself). Trace context is `telemetry::traces`.
use hyper::{Request, Response, StatusCode};

use super::http::{Body, reply};
use crate::state::routes::{FilterSpec, HeaderEdits, MatchSpec, PathMatch, PathModifier};

/// RequestHeaderModifier / ResponseHeaderModifier: set replaces, add appends, remove removes.
/// Invalid names or values are skipped (validation keeps them out in practice).
pub fn apply_edits(headers: &mut hyper::HeaderMap, edits: &HeaderEdits) {
    use hyper::header::{HeaderName, HeaderValue};
    let parse = |(n, v): &(String, String)| Some((n.parse::<HeaderName>().ok()?, v.parse::<HeaderValue>().ok()?));
    for (name, value) in edits.set.iter().filter_map(parse) {
        headers.insert(name, value);
    }
    for (name, value) in edits.add.iter().filter_map(parse) {
        headers.append(name, value);
    }
    for name in &edits.remove {
        headers.remove(name.as_str());
    }
}

/// ReplaceFullPath, or ReplacePrefixMatch of the matched prefix ("/foo/bar" with "/foo"
/// replaced by "/xyz" is "/xyz/bar", by "/" is "/bar").
pub fn modify_path(path: &str, matched: &MatchSpec, modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::Full(full) => full.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = match &matched.path {
                PathMatch::Prefix(p) if p != "/" => p.as_str(),
                _ => "",
            };
            let rest = path.strip_prefix(prefix).unwrap_or(path);
            let replacement = replacement.trim_end_matches('/');
            let joined = match (replacement.is_empty(), rest.is_empty() || rest.starts_with('/')) {
                (_, true) => format!("{replacement}{rest}"),
                (_, false) => format!("{replacement}/{rest}"),
            };
            if joined.is_empty() { "/".to_owned() } else { joined }
        }
    }
}

/// RequestRedirect: answered by the proxy itself, no backend involved.
pub fn redirect_response(filter: &FilterSpec, req: &Request<hyper::body::Incoming>, matched: &MatchSpec) -> Response<Body> {
    let FilterSpec::Redirect { scheme, hostname, path, port, status } = filter else {
        unreachable!("called with a RequestRedirect filter")
    };
    let request_host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or_default();
    let request_host = request_host.rsplit_once(':').map_or(request_host, |(h, _)| h);
    let host = hostname.as_deref().unwrap_or(request_host);
    let scheme = scheme.as_deref().unwrap_or("http");
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let new_path = path.as_ref().map_or_else(|| req.uri().path().to_owned(), |m| modify_path(req.uri().path(), matched, m));
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut response = reply(StatusCode::from_u16(*status).unwrap_or(StatusCode::FOUND), "");
    if let Ok(location) = format!("{scheme}://{host}{port}{new_path}{query}").parse() {
        response.headers_mut().insert(hyper::header::LOCATION, location);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(p: &str) -> MatchSpec {
        MatchSpec { path: PathMatch::Prefix(p.into()), method: None, headers: Vec::new(), query: Vec::new() }
    }

    #[test]
    fn prefix_rewrites_follow_the_spec_examples() {
        let full = PathModifier::Full("/new".into());
        assert_eq!(modify_path("/old/x", &prefix("/old"), &full), "/new");
        for (matched, path, replacement, want) in [
            ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo", "/foo/bar", "/", "/bar"),
            ("/foo", "/foo", "/", "/"),
            ("/", "/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
        ] {
            assert_eq!(
                modify_path(path, &prefix(matched), &PathModifier::Prefix(replacement.into())),
                want,
                "{path} {matched}->{replacement}"
            );
        }
    }

    #[test]
    fn header_edits_set_add_and_remove() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("x-a", "1".parse().unwrap());
        headers.insert("x-gone", "1".parse().unwrap());
        let edits = HeaderEdits {
            set: vec![("x-a".into(), "2".into())],
            add: vec![("x-b".into(), "3".into()), ("x-a".into(), "4".into())],
            remove: vec!["x-gone".into()],
        };
        apply_edits(&mut headers, &edits);
        let a: Vec<_> = headers.get_all("x-a").iter().map(|v| v.to_str().unwrap()).collect();
        assert_eq!(a, ["2", "4"]);
        assert_eq!(headers.get("x-b").unwrap(), "3");
        assert!(headers.get("x-gone").is_none());
    }
}
