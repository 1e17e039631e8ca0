//! One agent at a time writes what every agent would write the same (route status, Events):
//! the holder of a coordination.k8s.io Lease, as Kubernetes controllers elect a leader.
//! Expiry is judged by this agent's own clock from when it last saw the record change (as
//! client-go does), so clocks that disagree between nodes do not matter.
use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease as LeaseObject, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

/// How long a holder that stops renewing keeps the lease.
pub const DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and others look).
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What identifies a renewal: the holder and its renew time.
type Record = (Option<String>, Option<Timestamp>);

pub struct Lease {
    api: Api<LeaseObject>,
    name: String,
    identity: String,
    /// The record as last seen (holder, renew time), and when it was first seen so.
    seen: Option<(Record, Instant)>,
}

impl Lease {
    pub fn new(client: Client, namespace: &str, name: &str, identity: String) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_owned(), identity, seen: None }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Takes the lease when it is free or expired, renews it when it is ours. Returns the
    /// holder (this agent's identity when it holds it).
    pub async fn hold(&mut self) -> Result<String, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = LeaseObject {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(DURATION.as_secs() as i32),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(self.identity.clone()),
                // Another agent created it first.
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(String::new()),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let record: Record = (spec.holder_identity.clone(), spec.renew_time.as_ref().map(|t| t.0));
        if self.seen.as_ref().is_none_or(|(seen, _)| *seen != record) {
            self.seen = Some((record, Instant::now()));
        }
        let duration = spec.lease_duration_seconds.map_or(DURATION, |s| Duration::from_secs(s.max(1) as u64));
        let expired = self.seen.as_ref().is_some_and(|(_, since)| since.elapsed() > duration);
        let ours = holder == self.identity;
        if !ours && !holder.is_empty() && !expired {
            return Ok(holder);
        }
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(DURATION.as_secs() as i32);
        // The resourceVersion read makes this a compare-and-swap: of two agents, one wins.
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(self.identity.clone()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(holder),
            Err(e) => Err(e),
        }
    }
}
