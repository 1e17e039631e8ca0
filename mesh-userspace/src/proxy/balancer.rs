//! Endpoint choice for the proxy: power of two choices over peak-EWMA latency weighted by
//! in-flight requests (Linkerd's balancer), so the fastest endpoints take most traffic, and
//! outlier ejection: N consecutive failures take an endpoint out for a backoff that grows
//! exponentially (with jitter); once it is over, live traffic probes it again. Never more than
//! `max_ejected_share` of a Service's endpoints are out at once.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Latency assumed for an endpoint with no sample yet (Linkerd's default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// Decay of the latency average.
const DECAY: Duration = Duration::from_secs(10);
const MAX_EJECTION: Duration = Duration::from_secs(300);

pub use crate::state::model::EjectionPolicy;

#[derive(Debug)]
struct EndpointStats {
    ewma_ns: f64,
    /// Whether `ewma_ns` is still the default guess rather than a measurement.
    measured: bool,
    last_sample: Instant,
    in_flight: u32,
    consecutive_failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl EndpointStats {
    fn new(now: Instant) -> Self {
        Self {
            ewma_ns: DEFAULT_RTT.as_nanos() as f64,
            measured: false,
            last_sample: now,
            in_flight: 0,
            consecutive_failures: 0,
            ejections: 0,
            ejected_until: None,
        }
    }

    /// The latency estimate decays while no sample arrives (as in tower's PeakEwma), so an
    /// endpoint that looked slow, or was just readmitted, is tried again in time.
    fn cost(&self, now: Instant) -> f64 {
        let idle = now.saturating_duration_since(self.last_sample).as_secs_f64();
        self.ewma_ns * (-idle / DECAY.as_secs_f64()).exp() * f64::from(self.in_flight + 1)
    }

    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| now < t)
    }
}

/// What `finish` learned, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    Ejected,
}

#[derive(Debug, Default)]
pub struct Balancer {
    stats: Mutex<HashMap<SocketAddr, EndpointStats>>,
}

impl Balancer {
    /// Forgets endpoints not in `live` (gone from the Service), so statistics do not pile up.
    pub fn retain(&self, live: &[SocketAddr]) {
        let live: std::collections::HashSet<&SocketAddr> = live.iter().collect();
        self.stats.lock().expect("balancer lock").retain(|e, _| live.contains(e));
    }

    /// Picks among `candidates` (never empty): ejected endpoints are left out unless that
    /// would leave none; of two random ones, the cheaper. The endpoint counts one more request
    /// in flight until the returned guard is finished or dropped (a client that goes away
    /// drops it), so no way out of a request leaves the count raised.
    pub fn pick(self: &Arc<Self>, candidates: &[SocketAddr]) -> InFlight {
        self.pick_within(candidates, None).expect("no cap, a pick")
    }

    /// `pick`, among the endpoints with fewer than `max_in_flight` requests in flight (the
    /// circuit breaker); None when every one has its maximum.
    pub fn pick_within(self: &Arc<Self>, candidates: &[SocketAddr], max_in_flight: Option<u32>) -> Option<InFlight> {
        let endpoint = self.choose(candidates, max_in_flight)?;
        Some(InFlight { balancer: self.clone(), endpoint, started: Instant::now(), finished: false })
    }

    fn choose(&self, candidates: &[SocketAddr], max_in_flight: Option<u32>) -> Option<SocketAddr> {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock");
        let open: Vec<SocketAddr>;
        let candidates = match max_in_flight {
            None => candidates,
            Some(max) => {
                open = candidates.iter().copied().filter(|e| stats.get(e).is_none_or(|s| s.in_flight < max)).collect();
                if open.is_empty() {
                    return None;
                }
                &open
            }
        };
        let eligible: Vec<SocketAddr> = candidates.iter().copied().filter(|e| !stats.get(e).is_some_and(|s| s.ejected(now))).collect();
        let pool = if eligible.is_empty() { candidates } else { &eligible };
        let chosen = if pool.len() == 1 {
            pool[0]
        } else {
            let a = fastrand::usize(..pool.len());
            let mut b = fastrand::usize(..pool.len() - 1);
            if b >= a {
                b += 1;
            }
            // An endpoint never measured is assumed as fast as the best measured one, so new
            // and readmitted endpoints are explored at once instead of waiting for the default
            // guess to decay; its in-flight count still keeps a burst off it.
            let measured =
                pool.iter().filter_map(|e| stats.get(e).filter(|s| s.measured)).map(|s| s.cost(now) / f64::from(s.in_flight + 1));
            let baseline = measured.fold(f64::INFINITY, f64::min);
            let baseline = if baseline.is_finite() { baseline } else { DEFAULT_RTT.as_nanos() as f64 };
            let cost = |e: &SocketAddr| match stats.get(e) {
                Some(s) if s.measured => s.cost(now),
                Some(s) => baseline * f64::from(s.in_flight + 1),
                None => baseline,
            };
            if cost(&pool[a]) <= cost(&pool[b]) { pool[a] } else { pool[b] }
        };
        stats.entry(chosen).or_insert_with(|| EndpointStats::new(now)).in_flight += 1;
        Some(chosen)
    }

    /// Records how a request to `endpoint` ended; `candidates` are the Service's endpoints, to
    /// keep ejections under the policy's share.
    fn finish(&self, endpoint: SocketAddr, latency: Duration, failed: bool, candidates: &[SocketAddr], policy: &EjectionPolicy) -> Verdict {
        let now = Instant::now();
        let mut stats = self.stats.lock().expect("balancer lock");
        let ejected_now = candidates.iter().filter(|e| stats.get(e).is_some_and(|s| s.ejected(now))).count();
        let s = stats.entry(endpoint).or_insert_with(|| EndpointStats::new(now));
        s.in_flight = s.in_flight.saturating_sub(1);
        // Peak EWMA: jumps up to a slower sample at once, decays towards faster ones.
        let sample = latency.as_nanos() as f64;
        if !s.measured || sample > s.ewma_ns {
            s.measured = true;
            s.ewma_ns = sample;
        } else {
            let w = (-(now - s.last_sample).as_secs_f64() / DECAY.as_secs_f64()).exp();
            s.ewma_ns = s.ewma_ns * w + sample * (1.0 - w);
        }
        s.last_sample = now;
        if !failed {
            s.consecutive_failures = 0;
            return Verdict::Fine;
        }
        s.consecutive_failures += 1;
        let share_after = (ejected_now + 1) as f64 / candidates.len().max(1) as f64;
        if s.consecutive_failures < policy.consecutive_failures || s.ejected(now) || share_after > policy.max_ejected_share {
            return Verdict::Fine;
        }
        s.ejections += 1;
        s.consecutive_failures = 0;
        let backoff = policy.base_ejection.saturating_mul(1 << (s.ejections - 1).min(16)).min(MAX_EJECTION);
        // Up to 10% jitter, so endpoints ejected together do not return together.
        let jitter = backoff.mul_f64(fastrand::f64() * 0.1);
        s.ejected_until = Some(now + backoff + jitter);
        Verdict::Ejected
    }
}

/// A request on its way to an endpoint the balancer picked (until its response has ended).
#[derive(Debug)]
pub struct InFlight {
    balancer: Arc<Balancer>,
    endpoint: SocketAddr,
    started: Instant,
    finished: bool,
}

impl InFlight {
    pub fn endpoint(&self) -> SocketAddr {
        self.endpoint
    }

    /// The request ended: its latency is a sample, a failure counts toward ejection.
    pub fn finish(mut self, failed: bool, candidates: &[SocketAddr], policy: &EjectionPolicy) -> Verdict {
        self.finished = true;
        self.balancer.finish(self.endpoint, self.started.elapsed(), failed, candidates, policy)
    }
}

impl Drop for InFlight {
    /// Abandoned (the client went away, or the request was never the endpoint's fault): no
    /// latency sample and no failure, only the in-flight count goes down.
    fn drop(&mut self) {
        if !self.finished {
            let mut stats = self.balancer.stats.lock().expect("balancer lock");
            if let Some(s) = stats.get_mut(&self.endpoint) {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> Vec<SocketAddr> {
        vec!["10.0.0.1:80".parse().unwrap(), "10.0.0.2:80".parse().unwrap()]
    }

    #[test]
    fn the_faster_endpoint_takes_most_requests() {
        let b = Arc::new(Balancer::default());
        let (slow, fast) = (addrs()[0], addrs()[1]);
        let mut picks = HashMap::new();
        for _ in 0..200 {
            let e = b.pick(&addrs()).endpoint();
            *picks.entry(e).or_insert(0) += 1;
            let latency = if e == slow { Duration::from_millis(50) } else { Duration::from_millis(1) };
            b.finish(e, latency, false, &addrs(), &EjectionPolicy::default());
        }
        assert!(picks[&fast] >= 190, "{picks:?}");
    }

    #[test]
    fn consecutive_failures_eject_within_the_share() {
        let b = Arc::new(Balancer::default());
        let policy = EjectionPolicy { consecutive_failures: 3, base_ejection: Duration::from_secs(60), max_ejected_share: 0.5 };
        let (bad, good) = (addrs()[0], addrs()[1]);
        let verdicts: Vec<Verdict> = (0..3).map(|_| b.finish(bad, Duration::from_millis(1), true, &addrs(), &policy)).collect();
        assert_eq!(verdicts, [Verdict::Fine, Verdict::Fine, Verdict::Ejected]);
        assert!((0..50).all(|_| {
            let e = b.pick(&addrs());
            let endpoint = e.endpoint();
            e.finish(false, &addrs(), &policy);
            endpoint == good
        }));
        // The other one failing too would eject more than half: it stays in.
        let more: Vec<Verdict> = (0..3).map(|_| b.finish(good, Duration::from_millis(1), true, &addrs(), &policy)).collect();
        assert_eq!(more, [Verdict::Fine, Verdict::Fine, Verdict::Fine]);
    }

    #[test]
    fn an_abandoned_request_does_not_keep_its_endpoint_busy() {
        let b = Arc::new(Balancer::default());
        let (slow, fast) = (addrs()[0], addrs()[1]);
        // 60 requests to the slow endpoint, abandoned (their clients gave up)...
        for _ in 0..60 {
            drop(b.pick(&[slow]));
        }
        assert!(b.stats.lock().unwrap().values().all(|s| s.in_flight == 0));
        // ...do not keep it out: with nothing measured, the two share the picks.
        let mut picks: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..100 {
            *picks.entry(b.pick(&addrs()).endpoint()).or_default() += 1;
        }
        assert!(picks.get(&slow).copied().unwrap_or(0) >= 20 && picks.get(&fast).copied().unwrap_or(0) >= 20, "{picks:?}");
    }
}
