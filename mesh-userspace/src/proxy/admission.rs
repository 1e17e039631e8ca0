//! Whether a request is let in at all, before any endpoint is tried: the local rate limit of
//! the Service the client called (a token bucket, answered 429) and the circuit breaker of
//! the backend Service (requests in flight, answered 503 UO). Both answer at once: an
//! overloaded backend is not made to queue more.
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::state::model::RateLimitPolicy;

/// Envoy's local rate limit: `per_second` tokens a second, at most `burst` saved.
#[derive(Debug)]
pub struct TokenBucket {
    policy: RateLimitPolicy,
    /// (tokens, when they were counted).
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(policy: RateLimitPolicy) -> Self {
        Self { policy, state: Mutex::new((policy.burst, Instant::now())) }
    }

    pub fn policy(&self) -> RateLimitPolicy {
        self.policy
    }

    /// Takes a token, or says how long until one is there (for `retry-after`).
    pub fn take(&self) -> Result<(), Duration> {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().expect("bucket lock");
        let elapsed = now.saturating_duration_since(state.1).as_secs_f64();
        state.0 = (state.0 + elapsed * self.policy.per_second).min(self.policy.burst);
        state.1 = now;
        if state.0 >= 1.0 {
            state.0 -= 1.0;
            return Ok(());
        }
        if self.policy.per_second <= 0.0 {
            return Err(Duration::from_secs(3600));
        }
        Err(Duration::from_secs_f64((1.0 - state.0) / self.policy.per_second))
    }
}

/// Requests in flight to a backend Service, against its `max-requests` (0: no limit). The
/// limit can change under live requests; the count carries over.
#[derive(Debug, Default)]
pub struct Gate {
    active: AtomicU32,
    max: AtomicU32,
}

/// A request let through a `Gate`; leaves it when dropped (with the response's end).
#[derive(Debug)]
pub struct Pass(Arc<Gate>);

impl Drop for Pass {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn set_max(&self, max: Option<u32>) {
        self.max.store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// A pass, or None when the Service already has its maximum in flight.
    pub fn enter(self: &Arc<Self>) -> Option<Pass> {
        let max = self.max.load(Ordering::Relaxed);
        let entered = self.active.try_update(Ordering::AcqRel, Ordering::Acquire, |n| (max == 0 || n < max).then_some(n + 1)).is_ok();
        entered.then(|| Pass(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let bucket = TokenBucket::new(RateLimitPolicy { per_second: 10.0, burst: 3.0 });
        let t0 = Instant::now();
        assert!((0..3).all(|_| bucket.take_at(t0).is_ok()));
        let wait = bucket.take_at(t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        // A tenth of a second later, one more.
        assert!(bucket.take_at(t0 + Duration::from_millis(100)).is_ok());
        assert!(bucket.take_at(t0 + Duration::from_millis(100)).is_err());
        // Long idle saves no more than the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take_at(later).is_ok()).count(), 3);
    }

    #[test]
    fn a_gate_lets_in_its_maximum_and_frees_a_place_per_pass_dropped() {
        let gate = Arc::new(Gate::default());
        gate.set_max(Some(2));
        let a = gate.enter().unwrap();
        let _b = gate.enter().unwrap();
        assert!(gate.enter().is_none());
        drop(a);
        assert!(gate.enter().is_some());
        gate.set_max(None);
        let many: Vec<Pass> = (0..100).filter_map(|_| gate.enter()).collect();
        assert_eq!(many.len(), 100);
    }
}
