//! AuthorizationPolicies into the kernel, so that a connect() the destination would refuse
//! fails at once with EPERM (and for pods of this node, whose connections to each other never
//! reach an agent, it is where policy is enforced).
//!
//! Pods (of any node) selected by ALLOW or DENY policies get a class: pods with the same
//! selecting policies share one, so verdicts are per class, not per pod. For each calling pod
//! of this node (and "no pod", 0), each class and each port the class's policies name, the
//! verdict is decided here as the destination would decide it; ports they do not name share
//! the verdict of port 0. Only what differs from "allowed" is written: a caller with no verdict
//! is let through, and the destination decides.
//!
//! A sender without identity (calling pod 0) is decided by its address where the class's
//! policies look at addresses: `mesh_authz_src` holds its verdict per address block and port,
//! for the ingress filter.
//!
//! PeerAuthentication: this node's enrolled pods that are STRICT on some port get entries in
//! `mesh_strict` (port 0 for the pod's mode, other ports where they differ), for the ingress
//! filter to drop SYNs that are not the agent's.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use mesh_common::{AUTHZ_SOURCE_FIXED_BITS, AuthzKey, AuthzSourceKey, AuthzVerdict, NO_CLASS, StrictKey, StrictValue};
use tokio::sync::watch;

use crate::{
    authz::{Applicable, Ask, Authorizer, Caller},
    ebpf::{
        loader::IngressSwitch,
        maps::{AuthzMaps, SenderBlock},
    },
    state::{
        ObjectKey, Snapshot,
        model::Workload,
        policy::{IpBlock, MtlsMode, PodMtls, Policies},
    },
    telemetry::Telemetry,
};

pub mod review;
use review::ConnectionReview;

const RETRY: Duration = Duration::from_secs(2);

/// What makes a class: the policies that decide (sorted), and the pod's address when one of
/// them looks at it.
type ClassKey = (Vec<ObjectKey>, Option<IpAddr>);

/// Numbers that stay with what they name while it exists (a policy, a class), so that a change
/// rewrites only the entries it touches.
#[derive(Debug)]
struct Numbers<K> {
    of: HashMap<K, u32>,
    next: u32,
}

impl<K: std::hash::Hash + Eq + Clone> Numbers<K> {
    fn new() -> Self {
        Self { of: HashMap::new(), next: 1 }
    }

    fn get(&mut self, key: &K) -> u32 {
        if let Some(n) = self.of.get(key) {
            return *n;
        }
        let n = self.next;
        self.next = self.next.checked_add(1).unwrap_or(1);
        self.of.insert(key.clone(), n);
        n
    }

    /// Forgets the keys not in `live`.
    fn retain(&mut self, live: &std::collections::HashSet<K>) {
        self.of.retain(|k, _| live.contains(k));
    }
}

/// The maps' wanted contents.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub classes: BTreeMap<IpAddr, u32>,
    pub verdicts: BTreeMap<AuthzKey, AuthzVerdict>,
    /// For classes whose policies look at senders' addresses: a sender without identity's
    /// verdict per address block (the longest match decides), per port (0: the others).
    pub senders: BTreeMap<SenderBlock, AuthzVerdict>,
    /// This node's enrolled pods' STRICT ports (port 0: the pod's other ports) and exceptions.
    pub strict: BTreeMap<StrictKey, StrictValue>,
}

/// An address range as IPv6 numbers (IPv4 as IPv4-mapped), inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Range {
    start: u128,
    end: u128,
    /// Prefix length over the 128 bits.
    bits: u8,
}

impl Range {
    fn of(block: IpBlock) -> Self {
        Self::at(block.addr, if block.addr.is_ipv4() { 96 + block.prefix } else { block.prefix })
    }

    /// The block of `bits` (over the 128) holding `ip`.
    fn at(ip: IpAddr, bits: u8) -> Self {
        let host = u128::MAX.checked_shr(u32::from(bits)).unwrap_or(0);
        let net = Self::number(ip) & !host;
        Self { start: net, end: net | host, bits }
    }

    fn holds(&self, ip: IpAddr) -> bool {
        (self.start..=self.end).contains(&Self::number(ip))
    }

    /// An address as an IPv6 number (IPv4 as IPv4-mapped).
    fn number(ip: IpAddr) -> u128 {
        u128::from(match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        })
    }

    fn ip(at: u128) -> IpAddr {
        let v6 = std::net::Ipv6Addr::from(at);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }

    /// An address of this range in none of `deeper` (ranges inside it), if there is one: the
    /// addresses whose longest match is this range.
    fn free_address(&self, ranges: &[Range]) -> Option<IpAddr> {
        let mut inside: Vec<&Range> = ranges.iter().filter(|r| r.bits > self.bits && r.start >= self.start && r.end <= self.end).collect();
        inside.sort();
        let mut cursor = self.start;
        for r in inside {
            if r.start > cursor {
                return Some(Self::ip(cursor));
            }
            cursor = cursor.max(r.end.checked_add(1)?);
        }
        (cursor <= self.end).then(|| Self::ip(cursor))
    }
}

impl Plan {
    /// A sender's verdict by its address, as the ingress filter looks it up: the port's
    /// blocks, else the other ports'; the longest block that holds the address.
    pub fn sender_verdict(&self, class: u32, port: u16, sender: IpAddr) -> Option<AuthzVerdict> {
        let lookup = |port: u16| {
            self.senders
                .iter()
                .filter(|((_, k), _)| k.class_be == class.to_be() && k.port_be == port.to_be())
                .filter(|((prefix, k), _)| {
                    let bits = u8::try_from(prefix - AUTHZ_SOURCE_FIXED_BITS).unwrap_or(128);
                    Range::at(crate::ebpf::image::ip_of(&k.sender), bits).holds(sender)
                })
                .max_by_key(|((prefix, _), _)| *prefix)
                .map(|(_, v)| *v)
        };
        lookup(port).or_else(|| lookup(0))
    }

    /// Whether a connection this plan refuses could have been let through by `old`: a verdict
    /// that refuses where `old`'s let through, a pod whose class changed, or a STRICT entry
    /// `old` did not have. Only then are established connections worth deciding again.
    pub fn refuses_more_than(&self, old: &Plan) -> bool {
        let refuses = |plan: &Plan, key: &AuthzKey| {
            let verdict = plan.verdicts.get(key).or_else(|| plan.verdicts.get(&AuthzKey { port: 0, ..*key }));
            verdict.is_some_and(|v| v.allow == 0)
        };
        let verdicts = self.verdicts.keys().chain(old.verdicts.keys()).any(|k| refuses(self, k) && !refuses(old, k));
        let classes = self.classes.iter().any(|(ip, class)| old.classes.get(ip) != Some(class));
        // Only dropping a STRICT entry loosens: any other difference may refuse more.
        let strict = self.strict.iter().any(|(k, v)| old.strict.get(k) != Some(v))
            || old.strict.iter().any(|(k, v)| v.strict == 0 && !self.strict.contains_key(k));
        // Any change of a block's verdict is taken as stricter: rare, and a review is only a scan.
        let senders = self.senders != old.senders;
        verdicts || classes || strict || senders
    }
}

pub struct AuthzPlanner {
    authorizer: Arc<Authorizer>,
    trust_domain: String,
    policies: Numbers<ObjectKey>,
    peer_authentications: Numbers<ObjectKey>,
    classes: Numbers<ClassKey>,
}

impl AuthzPlanner {
    pub fn new(authorizer: Arc<Authorizer>, trust_domain: String) -> Self {
        Self { authorizer, trust_domain, policies: Numbers::new(), peer_authentications: Numbers::new(), classes: Numbers::new() }
    }

    /// The AuthorizationPolicy a kernel verdict names, by its number.
    pub fn policy_numbers(&self) -> HashMap<u32, ObjectKey> {
        self.policies.of.iter().map(|(k, n)| (*n, k.clone())).collect()
    }

    /// The PeerAuthentication a STRICT entry names, by its number.
    pub fn peer_authentication_numbers(&self) -> HashMap<u32, ObjectKey> {
        self.peer_authentications.of.iter().map(|(k, n)| (*n, k.clone())).collect()
    }

    /// STRICT entries of this node's enrolled pods.
    fn plan_strict(&mut self, snapshot: &Snapshot, plan: &mut Plan) {
        let root = self.authorizer.root_namespace().to_owned();
        let mut live = std::collections::HashSet::new();
        for pod in snapshot.pods.values().filter(|w| w.enrolled && !w.spec.host_network) {
            let mtls = PodMtls::of(&snapshot.policies, &root, &pod.spec.key.namespace, &pod.spec.labels);
            if !mtls.is_strict_anywhere() {
                continue;
            }
            let mut value = |(mode, key): &(MtlsMode, ObjectKey)| {
                live.insert(key.clone());
                StrictValue { strict: u32::from(*mode == MtlsMode::Strict), policy: self.peer_authentications.get(key) }
            };
            let base = mtls.mode.as_ref().map(&mut value);
            let ports: Vec<(u16, StrictValue)> = mtls.ports.iter().map(|(port, m)| (*port, value(m))).collect();
            for ip in &pod.spec.ips {
                // connect4/6 must see it, to let the agent's and kubelet's connections in.
                plan.classes.entry(*ip).or_insert(NO_CLASS);
                let addr = crate::ebpf::image::addr_of(*ip);
                if let Some(base) = base.filter(|b| b.strict != 0) {
                    plan.strict.insert(StrictKey { addr, port: 0, _pad16: 0 }, base);
                }
                for (port, v) in &ports {
                    plan.strict.insert(StrictKey { addr, port: *port, _pad16: 0 }, *v);
                }
            }
        }
        self.peer_authentications.retain(&live);
    }

    /// The maps' contents for `snapshot` and this node's calling pods (by kernel number).
    pub fn plan(&mut self, snapshot: &Snapshot, callers: &imbl::HashMap<u32, Arc<Workload>>) -> Plan {
        let policies = &snapshot.policies;
        let mut plan = Plan::default();
        // One representative pod per class: verdicts are the class's.
        let mut representatives: BTreeMap<u32, (Arc<Workload>, IpAddr, Arc<Applicable>)> = BTreeMap::new();
        let mut live_classes = std::collections::HashSet::new();
        let local = snapshot.pods.values().filter(|w| !w.spec.host_network).flat_map(|w| w.spec.ips.iter().map(move |ip| (*ip, w)));
        for (ip, workload) in local.chain(snapshot.peers.iter().map(|(ip, w)| (*ip, w))) {
            if !workload.enrolled {
                continue;
            }
            let applicable = self.authorizer.applicable(policies, workload);
            if applicable.is_empty() {
                continue;
            }
            let mut keys: Vec<ObjectKey> = applicable.deciding().map(|p| p.key.clone()).collect();
            keys.sort();
            let by_ip = applicable.deciding().any(|p| p.uses_destination_ip()).then_some(ip);
            let key = (keys, by_ip);
            let class = self.classes.get(&key);
            live_classes.insert(key);
            plan.classes.insert(ip, class);
            representatives.entry(class).or_insert_with(|| (workload.clone(), ip, applicable));
        }
        self.classes.retain(&live_classes);
        let live_policies: std::collections::HashSet<ObjectKey> =
            policies.authorization.values().flatten().map(|p| p.key.clone()).collect();
        self.policies.retain(&live_policies);

        let mut calling: Vec<(u32, Option<Caller>, Option<IpAddr>)> = vec![(0, None, None)];
        for (number, pod) in callers {
            let caller = pod.enrolled.then(|| pod.identity(&self.trust_domain)).flatten().map(|id| Caller::of(&id));
            let source_ip = (!pod.spec.host_network).then(|| pod.spec.ips.first().copied()).flatten();
            calling.push((*number, caller, source_ip));
        }
        for (class, (_, ip, applicable)) in &representatives {
            let named: BTreeSet<u16> = applicable.deciding().flat_map(|p| p.named_ports()).collect();
            // A port no policy of the class names stands for all of them.
            let other = (1..=u16::MAX).find(|p| !named.contains(p)).unwrap_or(1);
            // Policies that look at senders' addresses: a process in no pod is not refused at
            // connect() (decided without its address), the ingress filter decides it by address.
            let by_address = self.plan_senders(*class, *ip, applicable, &named, other, &mut plan);
            for (number, caller, source_ip) in calling.iter().filter(|(number, ..)| *number != 0 || !by_address) {
                let mut decide = |port: u16| {
                    let ask =
                        Ask { caller: caller.as_ref(), source_ip: *source_ip, destination_ip: *ip, port, request: None, l7_checked: false };
                    let decision = applicable.decide(&ask.attributes());
                    let policy = decision.policy.as_ref().map_or(0, |p| self.policies.get(p));
                    AuthzVerdict { allow: u32::from(decision.allowed), policy }
                };
                let fallback = decide(other);
                if fallback.allow == 0 {
                    plan.verdicts.insert(AuthzKey { workload: *number, class: *class, port: 0, _pad16: 0 }, fallback);
                }
                for port in &named {
                    let verdict = decide(*port);
                    // Written where it differs, if only in the policy that decided (the
                    // refusal names it).
                    if verdict != fallback {
                        plan.verdicts.insert(AuthzKey { workload: *number, class: *class, port: *port, _pad16: 0 }, verdict);
                    }
                }
            }
        }
        self.plan_strict(snapshot, &mut plan);
        plan
    }

    /// A sender without identity's verdicts by address block, for a class whose policies
    /// look at senders' addresses (returns whether they do), on its `named` ports and `other`
    /// (port 0). Blocks nest or are apart, so the blocks holding an address are its longest
    /// match and those around it: each block's verdict is decided for an address of it in no
    /// deeper block (a block full of deeper ones gets none).
    fn plan_senders(
        &mut self,
        class: u32,
        ip: IpAddr,
        applicable: &Applicable,
        named: &BTreeSet<u16>,
        other: u16,
        plan: &mut Plan,
    ) -> bool {
        let mut ranges: Vec<Range> = applicable.deciding().flat_map(|p| p.sender_blocks()).map(Range::of).collect();
        if ranges.is_empty() {
            return false;
        }
        // Everything else: IPv4 (as mapped) and IPv6.
        ranges.push(Range { start: 0xffff_0000_0000, end: 0xffff_ffff_ffff, bits: 96 });
        ranges.push(Range { start: 0, end: u128::MAX, bits: 0 });
        ranges.sort();
        ranges.dedup();
        for (key_port, port) in std::iter::once((0, other)).chain(named.iter().map(|p| (*p, *p))) {
            for range in &ranges {
                let Some(sender) = range.free_address(&ranges) else { continue };
                let ask = Ask { caller: None, source_ip: Some(sender), destination_ip: ip, port, request: None, l7_checked: false };
                let decision = applicable.decide(&ask.attributes());
                let policy = decision.policy.as_ref().map_or(0, |p| self.policies.get(p));
                let key = AuthzSourceKey {
                    class_be: class.to_be(),
                    port_be: key_port.to_be(),
                    _pad16: 0,
                    sender: crate::ebpf::image::addr_of(Range::ip(range.start)),
                };
                let prefix = AUTHZ_SOURCE_FIXED_BITS + u32::from(range.bits);
                plan.senders.insert((prefix, key), AuthzVerdict { allow: u32::from(decision.allowed), policy });
            }
        }
        true
    }
}

/// Closes connections a change of plan refuses: the review, and whether the configuration has
/// been read (a plan made from part of it would not know every caller).
pub struct Closing {
    pub review: Arc<ConnectionReview>,
    pub config_read: watch::Receiver<bool>,
}

/// Keeps the maps in line with the policies, pods and calling pods until the snapshots end;
/// telemetry learns the policies' numbers (for the kernel's refusal records) after each change.
/// After a change of plan is in the maps, connections established before it that it refuses
/// are closed (`closing`).
pub async fn run(
    mut maps: AuthzMaps,
    mut planner: AuthzPlanner,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut callers: watch::Receiver<imbl::HashMap<u32, Arc<Workload>>>,
    telemetry: Arc<Telemetry>,
    ingress: Option<IngressSwitch>,
    closing: Option<Closing>,
) {
    type Seen =
        (Arc<Policies>, imbl::OrdMap<ObjectKey, Arc<Workload>>, imbl::HashMap<IpAddr, Arc<Workload>>, imbl::HashMap<u32, Arc<Workload>>);
    let mut seen: Option<Seen> = None;
    let mut retry = false;
    // The plan in the maps, once connections are reviewed (the configuration read).
    let mut enforced: Option<Arc<Plan>> = None;
    loop {
        let snapshot = snapshots.borrow_and_update().clone();
        let calling = callers.borrow_and_update().clone();
        let unchanged = seen.as_ref().is_some_and(|(policies, pods, peers, by_number)| {
            Arc::ptr_eq(policies, &snapshot.policies)
                && pods.ptr_eq(&snapshot.pods)
                && peers.ptr_eq(&snapshot.peers)
                && by_number.ptr_eq(&calling)
        });
        if !unchanged || retry {
            let plan = planner.plan(&snapshot, &calling);
            telemetry.set_policy_numbers(planner.policy_numbers(), planner.peer_authentication_numbers());
            // The ingress filter runs for every packet of the cgroup: attached only while a pod
            // of the node needs it, before its entries are written and after they are gone.
            let needed = !plan.classes.is_empty() || !plan.strict.is_empty();
            let switch = |on: bool| match ingress.as_ref().map(|i| i.set(on)) {
                Some(Ok(true)) => tracing::info!(attached = on, "the ingress filter (STRICT, authorization of plaintext callers)"),
                Some(Err(e)) => tracing::warn!("switching the ingress filter {}: {e}", if on { "on" } else { "off" }),
                _ => {}
            };
            if needed {
                switch(true);
            }
            retry = match maps.sync(&plan.classes, &plan.verdicts, &plan.senders, &plan.strict) {
                Ok(0) => false,
                Ok(changed) => {
                    tracing::debug!(
                        changed,
                        verdicts = plan.verdicts.len(),
                        pods = plan.classes.len(),
                        "authorization verdicts synced to the kernel"
                    );
                    false
                }
                Err(e) => {
                    tracing::warn!("writing the authorization maps: {e}; trying again");
                    true
                }
            };
            if !needed && !retry {
                switch(false);
            }
            // Every live connection is let through by `enforced` (decided again when it came in,
            // or let through by a plan no stricter): only a stricter plan is worth a review.
            if let Some(closing) = &closing
                && !retry
                && *closing.config_read.borrow()
            {
                let plan = Arc::new(plan);
                if enforced.as_ref().is_none_or(|old| plan.refuses_more_than(old)) {
                    let (review, new_plan, snapshot, calling, telemetry) =
                        (closing.review.clone(), plan.clone(), snapshot.clone(), calling.clone(), telemetry.clone());
                    let closed =
                        tokio::task::spawn_blocking(move || review.run(&new_plan, &snapshot, &calling, &telemetry)).await.unwrap_or(0);
                    if closed > 0 {
                        tracing::info!(
                            closed,
                            "policy change: closed the connections between pods and from plaintext callers it now denies"
                        );
                    }
                }
                enforced = Some(plan);
            }
            seen = Some((snapshot.policies.clone(), snapshot.pods.clone(), snapshot.peers.clone(), calling));
        }
        // Until the configuration is read, no plan is reviewed: wake when it is.
        let mut unread = closing.as_ref().filter(|c| !*c.config_read.borrow()).map(|c| c.config_read.clone());
        let read_now = async {
            match unread.as_mut() {
                Some(read) => drop(read.wait_for(|r| *r).await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { return },
            changed = callers.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(RETRY), if retry => {}
            () = read_now => retry = true,
        }
    }
}

#[cfg(test)]
mod tests;
