//! L4 between nodes, in mutual TLS: the kernel sends an enrolled pod's TCP connection to an
//! enrolled pod of another node here (the tunnel listener, `mesh_tunnel`), with where it was
//! going and who dialled it (`mesh_tunorig`); it goes on as an HBONE tunnel to the destination
//! node's agent, as the dialling pod's identity, to the destination pod's. Bytes are spliced
//! both ways, half-close included. The other half is `hbone::Inbound`, fed the node's enrolled
//! workloads from the store by `SnapshotWorkloads`.
use std::{future::Future, io, net::SocketAddr, pin::Pin, sync::Arc};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};

use super::{
    connect::{CONNECT_TIMEOUT, Conn, Connector},
    hbone::{self, LocalWorkloads, Refusal, Route, Tunnels},
};
use crate::{
    authz::{Ask, Authorizer, Caller, Decision, Reporter},
    ebpf::maps::{TunnelOriginalMap, TunnelTarget},
    identity::Identity,
    server::{self, Lifecycle, Slots},
    state::{Snapshot, model::Workload},
    telemetry::{Telemetry, identity::TunnelEnds},
};

/// Where a connection at the tunnel listener was going: the kernel's record in production.
pub trait TunnelOrigins: Send + Sync + 'static {
    /// `peer`'s record (taken: asked once per connection).
    fn take(&self, peer: SocketAddr) -> Option<TunnelTarget>;
}

impl TunnelOrigins for TunnelOriginalMap {
    fn take(&self, peer: SocketAddr) -> Option<TunnelTarget> {
        TunnelOriginalMap::take(self, peer)
    }
}

/// The tunnel listener's side: kernel records in, tunnels out.
pub struct TunnelOutbound {
    origins: Box<dyn TunnelOrigins>,
    tunnels: Arc<Tunnels>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    telemetry: Arc<Telemetry>,
    trust_domain: String,
    /// The port peer agents take tunnels on.
    hbone_port: u16,
    /// This agent's HBONE listener.
    local_node: Option<SocketAddr>,
}

impl TunnelOutbound {
    pub fn new(
        origins: Box<dyn TunnelOrigins>,
        tunnels: Arc<Tunnels>,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        telemetry: Arc<Telemetry>,
        trust_domain: String,
    ) -> Self {
        Self { origins, tunnels, snapshot, telemetry, trust_domain, hbone_port: hbone::PORT, local_node: None }
    }

    /// Peer agents take tunnels on `port` (tests run several "nodes" on one address).
    pub fn with_hbone_port(mut self, port: u16) -> Self {
        self.hbone_port = port;
        self
    }

    /// This agent's own HBONE listener, for pods of this node (STRICT ones are tunneled).
    pub fn with_local_node(mut self, addr: SocketAddr) -> Self {
        self.local_node = Some(addr);
        self
    }

    /// The tunnel for a connection from `peer`: who dialled (the kernel's number for the pod),
    /// to which pod, and through which node; with both pods and the Service for telemetry.
    fn route(&self, peer: SocketAddr) -> Result<Planned, Refusal> {
        let target = self.origins.take(peer).ok_or_else(|| Refusal {
            reason: "no_original_destination",
            detail: format!("the kernel recorded no destination for {peer}"),
        })?;
        let source_pod = self.telemetry.workload_by_kernel_id(target.workload).filter(|w| w.enrolled);
        let source = source_pod.as_ref().and_then(|w| w.identity(&self.trust_domain)).ok_or_else(|| Refusal {
            reason: "unknown_source",
            detail: format!("pod number {} is no enrolled pod of this node", target.workload),
        })?;
        let snapshot = self.snapshot.borrow().clone();
        // A pod of another node, through its agent; or one of this node (STRICT), through ours.
        let (peer_pod, node) = match snapshot.peers.get(&target.pod.ip()).filter(|w| w.enrolled) {
            Some(w) => (Some(w.clone()), w.spec.host_ip.map(|ip| SocketAddr::new(ip, self.hbone_port))),
            None => {
                let here = snapshot.pods_by_ip.get(&target.pod.ip()).filter(|w| w.enrolled).cloned();
                let node = here.as_ref().and(self.local_node);
                (here, node)
            }
        };
        let (destination, node) = peer_pod
            .as_ref()
            .and_then(|w| Some((w.identity(&self.trust_domain)?, node?)))
            .ok_or_else(|| Refusal { reason: "unknown_destination", detail: format!("{} is no enrolled pod known here", target.pod) })?;
        // Host-network pods share the node's address: not theirs to forward.
        let source_addr = source_pod.as_ref().filter(|w| !w.spec.host_network).and_then(|w| w.spec.ips.first().copied());
        Ok(Planned {
            route: Route { source, destination, node, target: target.pod, source_addr, l7_checked: false },
            source_pod,
            peer_pod,
            service_id: target.service_id,
        })
    }

    async fn handle(&self, mut client: TcpStream, peer: SocketAddr) {
        let Planned { route, source_pod, peer_pod, service_id } = match self.route(peer) {
            Ok(planned) => planned,
            Err(refusal) => {
                tracing::debug!(%peer, %refusal, "tunnel listener: connection closed");
                self.tunnels.record_refusal(&refusal, peer);
                return reset(client);
            }
        };
        let mut tunnel = match self.tunnels.open(&route).await {
            Ok(tunnel) => tunnel,
            Err(_) => return reset(client),
        };
        let (source_principal, destination_principal) = (route.source.to_string(), route.destination.to_string());
        let series = self.telemetry.tunnel_opened(
            "source",
            TunnelEnds {
                source: source_pod.as_deref(),
                source_principal: &source_principal,
                destination: peer_pod.as_deref(),
                destination_principal: &destination_principal,
                service_id,
            },
        );
        let (from_client, to_client) = tokio::io::copy_bidirectional(&mut client, &mut tunnel).await.unwrap_or_else(|e| {
            tracing::debug!(%peer, target = %route.target, error = %e, "tunneled connection ended with an error");
            (0, 0)
        });
        series.closed(from_client, to_client);
    }
}

/// A tunnel to open, and who it is for.
struct Planned {
    route: Route,
    source_pod: Option<Arc<Workload>>,
    peer_pod: Option<Arc<Workload>>,
    service_id: u32,
}

/// Closes with a reset: the client learns at once that its connection failed (a FIN would
/// look like the server's orderly close).
fn reset(stream: TcpStream) {
    let _ = socket_linger_zero(&stream);
    drop(stream);
}

fn socket_linger_zero(stream: &TcpStream) -> std::io::Result<()> {
    #[expect(deprecated, reason = "a zero linger is the point here: the close must be a reset")]
    stream.set_linger(Some(std::time::Duration::ZERO))
}

/// Accepts at the tunnel listener until `lifecycle.drain`; then lets open connections finish
/// for the drain timeout.
pub async fn serve(outbound: Arc<TunnelOutbound>, listener: TcpListener, max_connections: usize, lifecycle: Lifecycle) {
    let Lifecycle { mut ready, mut drain, drain_timeout } = lifecycle;
    tokio::select! {
        _ = ready.wait_for(|r| *r) => {}
        _ = drain.wait_for(|d| *d) => return,
    }
    let slots = Slots::new(max_connections, Default::default(), Default::default());
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            (stream, peer) = server::accept(&listener, "tunnel") => {
                let Some(slot) = slots.take() else {
                    tracing::debug!(%peer, max = max_connections, "tunnel listener full; connection reset");
                    reset(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let outbound = outbound.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    outbound.handle(stream, peer).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = drain.wait_for(|d| *d) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain_timeout, async { while connections.join_next().await.is_some() {} }).await.is_err() {
        tracing::warn!(connections = connections.len(), "drain timeout: the remaining tunneled connections are cut");
        connections.abort_all();
    }
}

/// The L7 proxy's connections for one enrolled caller: through a tunnel (as the caller's
/// identity) to an endpoint that is an enrolled pod of another node, plain otherwise.
pub struct MeshConnector {
    pub tunnels: Arc<Tunnels>,
    pub source: Identity,
    pub source_addr: Option<std::net::IpAddr>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub trust_domain: String,
    pub hbone_port: u16,
    pub plain: Arc<dyn Connector>,
}

impl Connector for MeshConnector {
    fn connect(&self, endpoint: SocketAddr) -> Pin<Box<dyn Future<Output = io::Result<Conn>> + Send>> {
        let peer = {
            let snapshot = self.snapshot.borrow();
            snapshot.peers.get(&endpoint.ip()).filter(|w| w.enrolled).and_then(|w| Some((w.identity(&self.trust_domain)?, w.spec.host_ip?)))
        };
        let Some((destination, node)) = peer else { return self.plain.connect(endpoint) };
        let route = Route {
            source: self.source.clone(),
            destination,
            node: SocketAddr::new(node, self.hbone_port),
            target: endpoint,
            source_addr: self.source_addr,
            // The L7 proxy decides on each request before it is sent.
            l7_checked: true,
        };
        let tunnels = self.tunnels.clone();
        Box::pin(async move {
            let tunnel = tokio::time::timeout(CONNECT_TIMEOUT, tunnels.open(&route))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no tunnel to {endpoint} within {CONNECT_TIMEOUT:?}")))?
                .map_err(|refusal| io::Error::new(io::ErrorKind::ConnectionRefused, refusal))?;
            Ok(Conn::new(tunnel))
        })
    }
}

/// What the inbound side reports of each tunnel: Istio's TCP metrics as the destination, with
/// the source's proven principal, its workload when the `Forwarded` address is a pod of that
/// identity, and the node's own pod.
pub fn inbound_reporter(snapshot: watch::Receiver<Arc<Snapshot>>, telemetry: Arc<Telemetry>) -> hbone::OnCarried {
    Box::new(move |carried| {
        let snapshot = snapshot.borrow().clone();
        let trust_domain = &carried.source.trust_domain;
        let source_pod = carried
            .forwarded_for
            .and_then(|ip| snapshot.peers.get(&ip))
            .filter(|w| w.identity(trust_domain).as_ref() == Some(&carried.source))
            .cloned();
        let destination_pod = snapshot.pods_by_ip.get(&carried.target.ip()).cloned();
        let (source_principal, destination_principal) = (carried.source.to_string(), carried.destination.to_string());
        let series = telemetry.tunnel_opened(
            "destination",
            TunnelEnds {
                source: source_pod.as_deref(),
                source_principal: &source_principal,
                destination: destination_pod.as_deref(),
                destination_principal: &destination_principal,
                service_id: 0,
            },
        );
        Box::new(move |from_source, to_source| series.closed(from_source, to_source))
    })
}

/// This node's enrolled workloads, from the store's newest snapshot.
pub struct SnapshotWorkloads {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    trust_domain: String,
    authorizer: Arc<Authorizer>,
}

impl SnapshotWorkloads {
    pub fn new(snapshot: watch::Receiver<Arc<Snapshot>>, trust_domain: String, authorizer: Arc<Authorizer>) -> Self {
        Self { snapshot, trust_domain, authorizer }
    }

    /// The identities of the node's enrolled workloads now.
    pub fn identities(snapshot: &Snapshot, trust_domain: &str) -> std::collections::BTreeSet<Identity> {
        snapshot.pods.values().filter(|w| w.enrolled).filter_map(|w| w.identity(trust_domain)).collect()
    }
}

impl LocalWorkloads for SnapshotWorkloads {
    fn identity_at(&self, ip: std::net::IpAddr) -> Option<Identity> {
        let snapshot = self.snapshot.borrow();
        snapshot.pods_by_ip.get(&ip).filter(|w| w.enrolled).and_then(|w| w.identity(&self.trust_domain))
    }

    fn serves(&self, identity: &Identity) -> bool {
        let snapshot = self.snapshot.borrow();
        identity.trust_domain == self.trust_domain
            && snapshot
                .pods
                .values()
                .any(|w| w.enrolled && w.spec.key.namespace == identity.namespace && w.spec.service_account == identity.service_account)
    }

    fn authorize(&self, source: &Identity, source_ip: Option<std::net::IpAddr>, target: SocketAddr, l7_checked: bool) -> Decision {
        let snapshot = self.snapshot.borrow().clone();
        let caller = Caller::of(source);
        let ask = Ask { caller: Some(&caller), source_ip, destination_ip: target.ip(), port: target.port(), request: None, l7_checked };
        match snapshot.pods_by_ip.get(&target.ip()) {
            Some(workload) => self.authorizer.decide(&snapshot.policies, workload, &ask, Reporter::Destination),
            // Not reached: the CONNECT target was checked to be a workload of this node.
            None => Decision::unknown_destination(),
        }
    }
}
