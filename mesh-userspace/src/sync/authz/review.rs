//! Connections established before a policy change that the change now denies, closed. Tunnel
//! streams are the HBONE server's to review; these are the connections no agent is in: between
//! pods of this node, and plaintext from elsewhere to this node's pods. The kernel decided them
//! at connect() (or at their SYN) by the maps as they were; each accepted connection of a pod
//! under policy is decided again by the new plan, as the kernel would decide it now, and the
//! refused ones are closed in the pod's network namespace (the caller gets a reset).
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use mesh_common::{AGENT_WORKLOAD, Addr, AuthzKey, ConnValue, KUBELET_WORKLOAD, NO_CLASS, StrictKey, direction};

use super::Plan;
use crate::{
    ebpf::{
        conn_table::ConnTable,
        image::{addr_of, ip_of},
    },
    host::{self, sock_diag},
    state::{Snapshot, model::Workload},
    telemetry::Telemetry,
};

/// Which check refuses a connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// An AuthorizationPolicy (the policy's number, 0 when no ALLOW policy matched).
    Authorization,
    /// Plaintext to a port a PeerAuthentication made STRICT.
    Strict,
}

impl Check {
    pub fn name(self) -> &'static str {
        match self {
            Check::Authorization => "authorization",
            Check::Strict => "peer_authentication",
        }
    }
}

/// A connection to close, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The destination pod's (accepted) end.
    pub conn: ConnValue,
    pub check: Check,
    /// The policy's number (`AuthzPlanner::policy_numbers` or `peer_authentication_numbers`).
    pub policy: u32,
}

/// Who dialled an accepted connection, by its remote address: a pod's sockets have the pod's
/// address in its own network namespace.
#[derive(Debug, Default)]
pub struct Dialers {
    /// This node's pods by address: their kernel number, None while they have none yet.
    pods: HashMap<IpAddr, Option<u32>>,
    /// The node's own addresses: the agent (tunnel streams, the L7 proxy), the kubelet and host
    /// processes connect from them, and cannot be told apart after the fact.
    node: HashSet<IpAddr>,
}

/// A dialler as the kernel's maps know it.
enum Dialer {
    /// A pod of this node (its number), or 0: no pod (plaintext from elsewhere).
    Known(u32),
    /// Not decided again: the node itself, or a pod the kernel does not know yet.
    Skip,
}

impl Dialers {
    pub fn new(snapshot: &Snapshot, callers: &imbl::HashMap<u32, Arc<Workload>>, node: HashSet<IpAddr>) -> Self {
        let mut pods = HashMap::new();
        for pod in snapshot.pods.values().filter(|p| !p.spec.host_network) {
            for ip in &pod.spec.ips {
                pods.insert(*ip, None);
            }
        }
        for (number, pod) in callers.iter().filter(|(_, p)| !p.spec.host_network) {
            for ip in &pod.spec.ips {
                pods.insert(*ip, Some(*number));
            }
        }
        Self { pods, node }
    }

    fn of(&self, ip: IpAddr) -> Dialer {
        // Pods first: in a test's single namespace, pods' addresses are the node's too.
        match self.pods.get(&ip) {
            Some(Some(number)) => Dialer::Known(*number),
            Some(None) => Dialer::Skip,
            None if self.node.contains(&ip) || ip.is_loopback() => Dialer::Skip,
            None => Dialer::Known(0),
        }
    }
}

/// The accepted connections of `conns` that `plan` refuses, as the kernel would refuse them
/// now: at connect() (authorization) or at the SYN (STRICT).
pub fn to_cut(plan: &Plan, conns: &[ConnValue], dialers: &Dialers) -> Vec<Cut> {
    // The dialling ends on this node that the kernel knows the pod of (balanced by
    // connect4/6), by their 4-tuple: surer than an address.
    let dialled_by: HashMap<(Addr, u16, Addr, u16), u32> = conns
        .iter()
        .filter(|c| c.direction == direction::OUTBOUND && c.workload != 0)
        .map(|c| ((c.local, c.local_port, c.remote, c.remote_port), c.workload))
        .collect();
    let mut out = Vec::new();
    for conn in conns.iter().filter(|c| c.direction == direction::INBOUND) {
        let pod = ip_of(&conn.local);
        let addr = addr_of(pod);
        let strict = plan
            .strict
            .get(&StrictKey { addr, port: conn.local_port, _pad16: 0 })
            .or_else(|| plan.strict.get(&StrictKey { addr, port: 0, _pad16: 0 }))
            .filter(|s| s.strict != 0);
        let class = plan.classes.get(&pod).copied().filter(|c| *c != NO_CLASS);
        if strict.is_none() && class.is_none() {
            continue;
        }
        let dialer = match dialled_by.get(&(conn.remote, conn.remote_port, conn.local, conn.local_port)) {
            // The agent's and the kubelet's: never refused.
            Some(&(AGENT_WORKLOAD | KUBELET_WORKLOAD)) => Dialer::Skip,
            Some(workload) => Dialer::Known(*workload),
            None => dialers.of(ip_of(&conn.remote)),
        };
        let Dialer::Known(caller) = dialer else { continue };
        if let Some(strict) = strict {
            out.push(Cut { conn: *conn, check: Check::Strict, policy: strict.policy });
            continue;
        }
        let Some(class) = class else { continue };
        let key = |port| AuthzKey { workload: caller, class, port, _pad16: 0 };
        // A sender without identity is decided by its address where the policies look at it.
        let by_sender = (caller == 0).then(|| plan.sender_verdict(class, conn.local_port, ip_of(&conn.remote))).flatten();
        let verdict = by_sender.as_ref().or_else(|| plan.verdicts.get(&key(conn.local_port))).or_else(|| plan.verdicts.get(&key(0)));
        if let Some(verdict) = verdict.filter(|v| v.allow == 0) {
            out.push(Cut { conn: *conn, check: Check::Authorization, policy: verdict.policy });
        }
    }
    out
}

/// Closes what a new plan refuses, from the live connection table.
pub struct ConnectionReview {
    table: ConnTable,
    /// Where pods' cgroups are (the attached cgroup), and the cgroup v2 mount for annotated ones.
    root: PathBuf,
    mount: Option<PathBuf>,
}

impl ConnectionReview {
    pub fn new(table: ConnTable, root: PathBuf) -> Self {
        if let Err(why) = sock_diag::probe() {
            tracing::warn!("connections a policy change denies cannot be closed on this kernel: {why}; new ones are still refused");
        }
        Self { table, root, mount: host::cgroup2_root().ok() }
    }

    /// Decides this node's accepted connections again by `plan` and closes the refused ones;
    /// returns how many it closed. Blocking: reads the connection table, enters namespaces.
    /// Asks the kernel each time whether it can close sockets (as /config_dump does): a module
    /// loaded since start-up counts.
    pub fn run(&self, plan: &Plan, snapshot: &Snapshot, callers: &imbl::HashMap<u32, Arc<Workload>>, telemetry: &Telemetry) -> usize {
        if plan.classes.is_empty() && plan.strict.is_empty() {
            return 0;
        }
        if let Err(why) = sock_diag::probe() {
            tracing::debug!("not reviewing established connections: {why}");
            return 0;
        }
        let conns = match self.table.established() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("reading the connection table to review it against the new policy: {e}");
                return 0;
            }
        };
        let node = host::interface_addresses().unwrap_or_else(|e| {
            tracing::warn!("listing the node's addresses: {e}");
            HashSet::new()
        });
        let cuts = to_cut(plan, &conns, &Dialers::new(snapshot, callers, node));
        if cuts.is_empty() {
            return 0;
        }
        // By destination pod: one namespace entered per pod.
        let mut by_pod: HashMap<IpAddr, Vec<Cut>> = HashMap::new();
        for cut in cuts {
            by_pod.entry(ip_of(&cut.conn.local)).or_default().push(cut);
        }
        let mut closed = 0;
        for (ip, cuts) in by_pod {
            let Some(pod) = snapshot.pods.values().find(|p| !p.spec.host_network && p.spec.ips.contains(&ip)) else { continue };
            let netns = host::locate_pod_cgroup(&self.root, self.mount.as_deref(), pod.spec.cgroup.as_deref(), &pod.spec.uid)
                .and_then(|cgroup| host::netns_of_cgroup(&cgroup.path));
            let Some(netns) = netns else {
                tracing::warn!(pod = %pod.spec.key, "no process of the pod found to enter its network namespace: its connections the policy now denies stay open");
                continue;
            };
            let sockets = cuts
                .iter()
                .map(|c| sock_diag::TcpSocket {
                    local: SocketAddr::new(ip_of(&c.conn.local), c.conn.local_port),
                    remote: SocketAddr::new(ip_of(&c.conn.remote), c.conn.remote_port),
                    cookie: c.conn.cookie,
                })
                .collect();
            match sock_diag::destroy_in(&netns, sockets) {
                Ok(outcomes) => {
                    for (cut, outcome) in cuts.iter().zip(outcomes) {
                        if outcome == sock_diag::Outcome::Closed {
                            telemetry.record_policy_close(&cut.conn, cut.check.name(), cut.policy, cut.check == Check::Strict);
                            closed += 1;
                        }
                    }
                }
                Err(e) => tracing::warn!(pod = %pod.spec.key, "closing connections the policy now denies: {e}"),
            }
        }
        closed
    }
}
