//! Deadlines, retries and the retry budget: the layer between routing and balancing. A request
//! is retried on another endpoint only when that is safe, there is time left and the backend
//! Service's budget allows it.
use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::BodyExt;
use hyper::{
    Request, Response, StatusCode,
    body::Bytes,
    header::HeaderValue,
    http::uri::{Authority, PathAndQuery, Scheme},
};

use super::{
    balancer::{Balancer, EjectionPolicy, InFlight, Verdict},
    connect::{Overflow, Upstream},
    filters::apply_edits,
    http::{Body, End, Outcome, RequestTrace, Tracked, connections_overflow, fqdn, reply, strip_hop_by_hop},
};
use crate::{
    state::{
        ObjectKey,
        model::RetryBudgetPolicy,
        routes::{FilterSpec, RuleSpec},
    },
    telemetry::{Telemetry, metrics::RetryLabels, traces::Tracer},
};

/// The body length a request announces: Some(0) for none, None when chunked (unknown).
pub fn body_length(headers: &hyper::HeaderMap) -> Option<u64> {
    if headers.contains_key(hyper::header::TRANSFER_ENCODING) {
        return None;
    }
    match headers.get(hyper::header::CONTENT_LENGTH) {
        None => Some(0),
        Some(v) => v.to_str().ok()?.parse().ok(),
    }
}

/// `http://<endpoint><target>`: the absolute URI the pooled client takes (its authority picks
/// the pool), built from parts: the target is shared with the client's request, not copied.
pub fn endpoint_uri(endpoint: SocketAddr, target: &PathAndQuery) -> Option<hyper::Uri> {
    let authority = Authority::from_maybe_shared(Bytes::from(endpoint.to_string())).ok()?;
    hyper::Uri::builder().scheme(Scheme::HTTP).authority(authority).path_and_query(target.clone()).build().ok()
}

/// Bodies up to this size are buffered so that the request can be retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;
const DEFAULT_RETRIES: u32 = 2;
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Linkerd-style retry budget: over a 10 s window, retries may add at most `ratio` of the
/// requests plus `min_per_second`, so a failing backend cannot multiply its load.
pub struct RetryBudget {
    policy: RetryBudgetPolicy,
    window: Mutex<(Instant, u64, u64)>,
}

impl RetryBudget {
    pub fn new(policy: RetryBudgetPolicy) -> Self {
        Self { policy, window: Mutex::new((Instant::now(), 0, 0)) }
    }

    fn current(&self) -> std::sync::MutexGuard<'_, (Instant, u64, u64)> {
        let mut w = self.window.lock().expect("budget lock");
        if w.0.elapsed() >= BUDGET_WINDOW {
            *w = (Instant::now(), 0, 0);
        }
        w
    }

    pub fn record_request(&self) {
        self.current().1 += 1;
    }

    /// Takes one retry from the budget, if there is one.
    pub fn try_retry(&self) -> bool {
        let mut w = self.current();
        let allowed = self.policy.ratio * w.1 as f64 + self.policy.min_per_second * BUDGET_WINDOW.as_secs_f64();
        if (w.2 as f64) < allowed {
            w.2 += 1;
            true
        } else {
            false
        }
    }
}

/// gRPC's `grpc-timeout`: up to 8 digits and a unit (H, M, S, m milli, u micro, n nano).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// One request's way through the retry layer, for one backend Service.
pub struct Attempts<'a> {
    pub upstream: &'a Upstream,
    pub telemetry: &'a Arc<Telemetry>,
    pub service: &'a Arc<ObjectKey>,
    pub budget: &'a RetryBudget,
    pub balancer: &'a Arc<Balancer>,
    pub policy: EjectionPolicy,
    /// The circuit breaker's requests in flight per endpoint.
    pub max_per_endpoint: Option<u32>,
    pub tracer: &'a Arc<Tracer>,
    /// The request's trace: each attempt is a span under it.
    pub trace: RequestTrace,
}

impl Attempts<'_> {
    /// Sends the request, retrying on another endpoint in the safe cases: the body can be
    /// replayed (`next_body` gives it again), the failure happened before a response (connect
    /// failure, reset) or the response code is one the route's `retry` names, the deadline
    /// leaves room, and the backend Service's retry budget allows it. `client_body_failed`
    /// tells a streamed body that broke on the client's side (malformed chunking, a client gone
    /// away) from an endpoint failure: the client gets 400 and the endpoint is not blamed.
    #[expect(clippy::too_many_arguments, reason = "one request's context, used once")]
    pub async fn send(
        &self,
        head: &hyper::http::request::Parts,
        target: &PathAndQuery,
        endpoints: &Arc<[SocketAddr]>,
        rule: &RuleSpec,
        deadline: Option<Instant>,
        filters: &[FilterSpec],
        outcome: &mut Outcome,
        client_body_failed: Option<&AtomicBool>,
        mut next_body: impl FnMut(usize) -> Option<Body>,
    ) -> Response<Body> {
        let codes: &[u16] = rule.retry.as_ref().map_or(&[], |r| r.codes.as_slice());
        // Without a `retry` block, only a failure before any response is retried, once.
        let max_retries = rule.retry.as_ref().map_or(1, |r| r.attempts.unwrap_or(DEFAULT_RETRIES));
        let backoff = rule.retry.as_ref().and_then(|r| r.backoff).unwrap_or(DEFAULT_BACKOFF);
        let (budget, balancer, service) = (self.budget, self.balancer, self.service);
        budget.record_request();
        // Endpoints that failed this request, left out of its next attempts while others remain.
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0;
        loop {
            // A deadline already passed fails at once: no attempt can meet it.
            if deadline.is_some_and(|d| Instant::now() >= d) {
                outcome.flags = "UT";
                return reply(StatusCode::GATEWAY_TIMEOUT, "deadline exceeded\n");
            }
            let fresh: Vec<SocketAddr> =
                if tried.is_empty() { Vec::new() } else { endpoints.iter().copied().filter(|e| !tried.contains(e)).collect() };
            let pool = if fresh.is_empty() { &endpoints[..] } else { &fresh };
            // Dropped on any way out that is not the endpoint's doing (client gone, body
            // already sent), the guard only takes back the in-flight count.
            let Some(picked) = balancer.pick_within(pool, self.max_per_endpoint) else {
                outcome.flags = "UO";
                return reply(StatusCode::SERVICE_UNAVAILABLE, "circuit breaker open: every endpoint has its maximum in flight\n");
            };
            let endpoint = picked.endpoint();
            outcome.endpoint = Some(endpoint);
            outcome.attempts += 1;
            let Some(body) = next_body(attempt) else {
                return reply(StatusCode::BAD_GATEWAY, "request body already sent\n");
            };
            let Some(uri) = endpoint_uri(endpoint, target) else {
                return reply(StatusCode::BAD_REQUEST, "bad request target\n");
            };
            let attempt_trace = self.trace.attempt(self.tracer, head.method.as_str(), endpoint, attempt as u32);
            let mut request = Request::new(body);
            *request.version_mut() = head.version;
            *request.method_mut() = head.method.clone();
            *request.uri_mut() = uri;
            *request.headers_mut() = head.headers.clone();
            if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(attempt_trace.header())) {
                request.headers_mut().insert("traceparent", value);
            }
            let now = Instant::now();
            let limit = [rule.backend_timeout.filter(|t| !t.is_zero()).map(|t| now + t), deadline].into_iter().flatten().min();
            let sent = self.upstream.request(request);
            let result = match limit {
                Some(limit) => match tokio::time::timeout_at(limit.into(), sent).await {
                    Ok(r) => r,
                    Err(_) => {
                        self.report(picked, true, endpoints);
                        attempt_trace.finish(None, true);
                        outcome.flags = "UT";
                        return reply(StatusCode::GATEWAY_TIMEOUT, "upstream timeout\n");
                    }
                },
                None => sent.await,
            };
            if result.is_err() && client_body_failed.is_some_and(|f| f.load(Ordering::Acquire)) {
                attempt_trace.finish(None, false);
                // Envoy's DPE: downstream protocol error.
                outcome.flags = "DPE";
                return reply(StatusCode::BAD_REQUEST, "malformed or incomplete request body\n");
            }
            let status_failed = result.as_ref().map_or(true, |r| r.status().is_server_error());
            let failed = match result {
                Ok(mut response) if !codes.contains(&response.status().as_u16()) => {
                    outcome.flags = "-";
                    let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                    strip_hop_by_hop(response.headers_mut(), upgraded);
                    for filter in filters {
                        if let FilterSpec::ResponseHeaders(edits) = filter {
                            apply_edits(response.headers_mut(), edits);
                        }
                    }
                    // The endpoint is judged when its response has ended: a body cut short is
                    // a failure, and the latency is the whole response's.
                    let report = self.reporter(endpoints);
                    let code = response.status().as_u16();
                    return response.map(|body| {
                        Tracked::wrap(body.boxed(), move |end, _| {
                            let failed = status_failed || end == End::UpstreamError;
                            report(picked, failed);
                            attempt_trace.finish(Some(code), failed);
                        })
                    });
                }
                Ok(mut response) => {
                    self.report(picked, status_failed, endpoints);
                    attempt_trace.finish(Some(response.status().as_u16()), status_failed);
                    strip_hop_by_hop(response.headers_mut(), false);
                    response.map(BodyExt::boxed)
                }
                Err(e) if Overflow::caused(&e) => {
                    // The Service's connection limit, not the endpoint: nobody is blamed (the
                    // guard only takes back the in-flight count), nothing retried.
                    drop(picked);
                    attempt_trace.finish(None, false);
                    return connections_overflow(outcome);
                }
                Err(e) => {
                    self.report(picked, true, endpoints);
                    attempt_trace.finish(None, true);
                    outcome.flags = "UF";
                    // The endpoint's address stays in the agent's log, not in a reply to a client.
                    tracing::debug!(%endpoint, service = %service, error = %e, "upstream request failed");
                    reply(StatusCode::BAD_GATEWAY, "upstream connect error or disconnect/reset before headers\n")
                }
            };
            let time_left = deadline.is_none_or(|d| d.saturating_duration_since(Instant::now()) > backoff);
            if attempt >= max_retries as usize || !time_left || !budget.try_retry() {
                return failed;
            }
            attempt += 1;
            tried.push(endpoint);
            self.telemetry.metrics.retries.get_or_create(&RetryLabels { destination_service: fqdn(service) }).inc();
            tokio::time::sleep(backoff).await;
        }
    }

    /// Tells the balancer how an attempt ended (latency, failure toward ejection).
    fn report(&self, picked: InFlight, failed: bool, endpoints: &Arc<[SocketAddr]>) {
        self.reporter(endpoints)(picked, failed);
    }

    /// `report`, owning what it needs, for when the response body ends.
    fn reporter(&self, endpoints: &Arc<[SocketAddr]>) -> impl FnOnce(InFlight, bool) + Send + Sync + 'static {
        let (telemetry, service, policy, endpoints) = (self.telemetry.clone(), self.service.clone(), self.policy, endpoints.clone());
        move |picked, failed| {
            let endpoint = picked.endpoint();
            if picked.finish(failed, &endpoints, &policy) == Verdict::Ejected {
                tracing::warn!(%endpoint, service = %service, "endpoint ejected after consecutive failures");
                telemetry.metrics.ejections.get_or_create(&RetryLabels { destination_service: fqdn(&service) }).inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "S", "10", "10x", "123456789S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
