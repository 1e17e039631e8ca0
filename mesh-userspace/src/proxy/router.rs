//! Which HTTPRoute rule a request takes, for one Service.
//!
//! Gateway API precedence, across every rule of every route attached to the Service:
//! 1. an Exact path match, then the longest PathPrefix (RegularExpression paths, whose rank the
//!    spec leaves to implementations, come after all prefixes);
//! 2. a method match; 3. the most header matches; 4. the most query parameter matches;
//! 5. the oldest route (creationTimestamp), then namespace/name alphabetically;
//! 6. rule order within the route, then match order within the rule.
//!
//! Candidates are sorted by that order once per configuration; a request takes the first
//! candidate it satisfies.
use std::{cmp::Reverse, sync::Arc};

use crate::state::{
    ObjectKey,
    routes::{BackendRefSpec, MatchSpec, PathMatch, RouteSpec, RuleSpec},
};

/// What a request looks like to the router.
#[derive(Debug, Clone, Default)]
pub struct RequestParts<'a> {
    pub method: &'a str,
    /// Without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: Vec<(&'a str, &'a str)>,
}

/// The rule a request matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Matched<'r> {
    pub route: &'r ObjectKey,
    pub rule_index: usize,
    pub rule: &'r RuleSpec,
    /// The match that held (ReplacePrefixMatch needs its prefix).
    pub matched: &'r MatchSpec,
}

/// A (route, rule, match) triple, by index.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    route: usize,
    rule: usize,
    matched: usize,
}

/// The routes of one Service, in precedence order. Built once per configuration change (the
/// agent keeps one per Service), used for every request.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Arc<RouteSpec>>,
    candidates: Vec<Candidate>,
}

impl Router {
    /// A Service's routes (its `ServiceView::routes`).
    pub fn new(routes: Vec<Arc<RouteSpec>>) -> Self {
        let mut candidates: Vec<Candidate> = routes
            .iter()
            .enumerate()
            .flat_map(|(route, spec)| {
                spec.rules
                    .iter()
                    .enumerate()
                    .flat_map(move |(rule, r)| (0..r.matches.len()).map(move |matched| Candidate { route, rule, matched }))
            })
            .collect();
        // Stable sort: candidates equal in every key keep rule and match order.
        candidates.sort_by_key(|c| {
            let route = &routes[c.route];
            let m = &route.rules[c.rule].matches[c.matched];
            let (kind, length) = match &m.path {
                PathMatch::Exact(p) => (2, p.len()),
                PathMatch::Prefix(p) => (1, p.len()),
                PathMatch::RegularExpression(_) => (0, 0),
            };
            (
                Reverse(kind),
                Reverse(length),
                Reverse(m.method.is_some()),
                Reverse(m.headers.len()),
                Reverse(m.query.len()),
                // No timestamp sorts last: such a route is treated as the newest.
                (route.created.is_none(), route.created.clone()),
                route.key.clone(),
                c.rule,
            )
        });
        Self { routes, candidates }
    }

    /// The rule for `request`, or None (the proxy answers 404).
    pub fn route(&self, request: &RequestParts<'_>) -> Option<Matched<'_>> {
        self.candidates.iter().find_map(|c| {
            let route = &self.routes[c.route];
            let rule = &route.rules[c.rule];
            let m = &rule.matches[c.matched];
            matches(m, request).then_some(Matched { route: &route.key, rule_index: c.rule, rule, matched: m })
        })
    }
}

fn matches(m: &MatchSpec, r: &RequestParts<'_>) -> bool {
    let path_ok = match &m.path {
        PathMatch::Exact(p) => r.path == p,
        PathMatch::Prefix(p) => {
            p == "/" || r.path == p || (r.path.starts_with(p.as_str()) && r.path.as_bytes().get(p.len()) == Some(&b'/'))
        }
        PathMatch::RegularExpression(re) => re.0.is_match(r.path),
    };
    path_ok
        && m.method.as_deref().is_none_or(|want| want == r.method)
        && m.headers.iter().all(|(name, value)| r.headers.iter().any(|(n, v)| n.eq_ignore_ascii_case(name) && value.matches(v)))
        && m.query.iter().all(|(name, value)| {
            // The first value of a repeated parameter counts, as the spec recommends.
            query_pairs(r.query).find(|(n, _)| n == name).is_some_and(|(_, v)| value.matches(v))
        })
}

fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query.unwrap_or_default().split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Picks a backend by weight with `random` in `0..u32::MAX`; None when every weight is 0 (the
/// proxy answers 500, as the spec asks).
pub fn pick_backend(backends: &[BackendRefSpec], random: u32) -> Option<&BackendRefSpec> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = u64::from(random) % total;
    for b in backends {
        if point < u64::from(b.weight) {
            return Some(b);
        }
        point -= u64::from(b.weight);
    }
    None
}

#[cfg(test)]
mod tests;
