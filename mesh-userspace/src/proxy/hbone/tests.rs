//! Tunnels between two in-process agents over loopback, with real TLS, HTTP/2 and sockets.
use std::{collections::HashMap, future::Future, path::Path, pin::Pin};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::identity::ca::{self, CaError, FileSigner, Signed, Signer};

fn identity(sa: &str) -> Identity {
    Identity::new("td", "shop", sa).unwrap()
}

/// The node's workloads by address, and the sources a "policy" denies (changeable).
struct Workloads {
    at: HashMap<IpAddr, Identity>,
    denied: Arc<Mutex<Vec<Identity>>>,
}

impl Workloads {
    fn new(at: HashMap<IpAddr, Identity>) -> Self {
        Self { at, denied: Arc::default() }
    }
}

impl LocalWorkloads for Workloads {
    fn identity_at(&self, ip: IpAddr) -> Option<Identity> {
        self.at.get(&ip).cloned()
    }

    fn serves(&self, identity: &Identity) -> bool {
        self.at.values().any(|i| i == identity)
    }

    fn authorize(&self, source: &Identity, _: Option<IpAddr>, _: SocketAddr, _: bool) -> Decision {
        let mut decision = Decision::unknown_destination();
        decision.allowed = !self.denied.lock().unwrap().contains(source);
        decision
    }
}

/// Signs with one CA, trusts another's roots too: a client whose certificate the server
/// cannot trust, though it trusts the server.
struct SignsWithOther {
    signs: FileSigner,
    trusts: Vec<FileSigner>,
}

impl Signer for SignsWithOther {
    fn sign(
        &self,
        identity: &Identity,
        csr: Vec<u8>,
        lifetime: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Signed, CaError>> + Send + '_>> {
        self.signs.sign(identity, csr, lifetime)
    }

    fn trust_roots(&self) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, CaError> {
        Ok(self.trusts.iter().flat_map(|t| t.trust_roots().unwrap()).collect())
    }
}

fn ca(dir: &Path) -> FileSigner {
    ca::init(dir, "td", Duration::from_secs(3600)).unwrap();
    FileSigner::new(dir).unwrap()
}

/// A "pod": reads everything up to EOF, then answers with what it read, reversed, and closes.
async fn reversing_pod() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                stream.read_to_end(&mut got).await.unwrap();
                got.reverse();
                stream.write_all(&got).await.unwrap();
                stream.shutdown().await.unwrap();
            });
        }
    });
    addr
}

struct Agent {
    addr: SocketAddr,
    inbound: Arc<Inbound>,
    metrics: HboneMetrics,
    carried: tokio::sync::mpsc::UnboundedReceiver<(Carried, u64, u64)>,
    _drain: tokio::sync::watch::Sender<bool>,
}

async fn destination_agent(signer: Arc<dyn Signer>, workloads: Workloads) -> Agent {
    destination_agent_with(signer, workloads, 1024).await
}

async fn destination_agent_with(signer: Arc<dyn Signer>, workloads: Workloads, max_connections: usize) -> Agent {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = HboneMetrics::default();
    let (tx, carried) = tokio::sync::mpsc::unbounded_channel();
    let certs = Certificates::new(signer, Duration::from_secs(3600));
    let inbound = Inbound::new(certs, "td".into(), Arc::new(workloads), metrics.clone()).on_carried(Box::new(move |c| {
        let (tx, c) = (tx.clone(), c.clone());
        Box::new(move |from, to| {
            let _ = tx.send((c, from, to));
        })
    }));
    let inbound = Arc::new(inbound);
    let (ready, drain) = (tokio::sync::watch::channel(true).1, tokio::sync::watch::channel(false));
    let lifecycle = Lifecycle { ready, drain: drain.1, drain_timeout: Duration::from_secs(5) };
    tokio::spawn(serve(inbound.clone(), listener, max_connections, lifecycle));
    Agent { addr, inbound, metrics, carried, _drain: drain.0 }
}

fn refused(metrics: &HboneMetrics, direction: &str, reason: &str) -> u64 {
    metrics.refused.get_or_create(&RefusalLabels { direction: direction.into(), reason: reason.into() }).get()
}

fn open(family: &Family<DirectionLabels, Gauge>, direction: DirectionLabels) -> i64 {
    family.get_or_create(&direction).get()
}

use prometheus_client::metrics::family::Family;

#[tokio::test]
async fn bytes_cross_both_ways_with_half_close_and_tunnels_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let signer: Arc<dyn Signer> = Arc::new(ca(dir.path()));
    let pod = reversing_pod().await;
    let mut agent = destination_agent(signer.clone(), Workloads::new([(pod.ip(), identity("web"))].into())).await;
    let metrics = HboneMetrics::default();
    let tunnels = Tunnels::new(Certificates::new(signer, Duration::from_secs(3600)), metrics.clone());
    let route = Route {
        source: identity("front"),
        destination: identity("web"),
        node: agent.addr,
        target: pod,
        source_addr: Some("10.9.8.7".parse().unwrap()),
        l7_checked: false,
    };

    for size in [1usize, 100_000, 8 << 20] {
        let sent: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let mut tunnel = tunnels.open(&route).await.unwrap();
        let (mut read, mut write) = tokio::io::split(&mut tunnel);
        let writer = async {
            write.write_all(&sent).await.unwrap();
            // Half-close: the pod answers only once it has read EOF.
            write.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = read.read_to_end(&mut got);
        let ((), read_result) = tokio::join!(writer, reader);
        read_result.unwrap();
        let mut want = sent.clone();
        want.reverse();
        assert!(got == want, "{size} bytes: got {} bytes back, not the reversed input", got.len());
        drop(tunnel);
        let (carried, from_source, to_source) = agent.carried.recv().await.unwrap();
        assert_eq!((from_source, to_source), (size as u64, size as u64));
        assert_eq!(carried.forwarded_for, Some("10.9.8.7".parse().unwrap()), "the source pod's address as sent");
        assert_eq!(carried.source, identity("front"), "the destination saw the source's proven identity");
        assert_eq!(carried.destination, identity("web"));
    }

    // Two at once ride one TLS connection.
    let (a, b) = (tunnels.open(&route).await.unwrap(), tunnels.open(&route).await.unwrap());
    assert_eq!(open(&metrics.connections_open, DirectionLabels::outbound()), 1);
    assert_eq!(open(&metrics.streams_open, DirectionLabels::outbound()), 2);
    assert_eq!(open(&agent.metrics.connections_open, DirectionLabels::inbound()), 1);
    drop((a, b));
    assert_eq!(open(&metrics.streams_open, DirectionLabels::outbound()), 0);
}

#[tokio::test]
async fn refusals_say_why_on_both_sides_and_count_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let signer: Arc<dyn Signer> = Arc::new(ca(dir.path()));
    let pod = reversing_pod().await;
    let agent = destination_agent(signer.clone(), Workloads::new([(pod.ip(), identity("web"))].into())).await;
    let metrics = HboneMetrics::default();
    let tunnels = Tunnels::new(Certificates::new(signer.clone(), Duration::from_secs(3600)), metrics.clone());

    // An identity the destination node does not serve.
    let to_db = Route {
        source: identity("front"),
        destination: identity("db"),
        node: agent.addr,
        target: pod,
        source_addr: None,
        l7_checked: false,
    };
    let refusal = tunnels.open(&to_db).await.err().unwrap();
    assert_eq!(refusal.reason, "refused_by_peer", "{refusal}");
    assert_eq!(refused(&agent.metrics, "inbound", "unknown_destination"), 1);

    // The right identity, but a destination address that is none of the node's workloads.
    let elsewhere = Route {
        source: identity("front"),
        destination: identity("web"),
        node: agent.addr,
        target: "127.0.0.2:80".parse().unwrap(),
        source_addr: None,
        l7_checked: false,
    };
    let refusal = tunnels.open(&elsewhere).await.err().unwrap();
    assert!(refusal.detail.contains("no enrolled workload"), "the peer's reason reaches the client: {refusal}");
    assert_eq!(refused(&agent.metrics, "inbound", "unknown_destination"), 2);

    // A client whose certificate comes from a root the destination does not trust.
    let other = tempfile::tempdir().unwrap();
    let forger = SignsWithOther {
        signs: ca(other.path()),
        trusts: vec![FileSigner::new(dir.path()).unwrap(), FileSigner::new(other.path()).unwrap()],
    };
    let forged = Tunnels::new(Certificates::new(Arc::new(forger), Duration::from_secs(3600)), HboneMetrics::default());
    let route = Route {
        source: identity("front"),
        destination: identity("web"),
        node: agent.addr,
        target: pod,
        source_addr: Some("10.9.8.7".parse().unwrap()),
        l7_checked: false,
    };
    assert!(forged.open(&route).await.is_err());
    assert_eq!(refused(&agent.metrics, "inbound", "untrusted_certificate"), 1);

    // Plaintext on the HBONE port.
    let mut plain = TcpStream::connect(agent.addr).await.unwrap();
    plain.write_all(b"CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let _ = plain.read_to_end(&mut rest).await;
    assert_eq!(refused(&agent.metrics, "inbound", "not_tls"), 1);

    // The good route still works after all that.
    let mut tunnel = tunnels.open(&route).await.unwrap();
    tunnel.write_all(b"ok").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut got = String::new();
    tunnel.read_to_string(&mut got).await.unwrap();
    assert_eq!(got, "ko");
}

#[test]
fn forwarded_for_reads_back_both_families_and_ignores_garbage() {
    for ip in ["10.1.2.3", "2001:db8::7"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
    }
    assert_eq!(parse_forwarded_for("for=10.0.0.1;proto=https, for=10.0.0.2"), Some("10.0.0.1".parse().unwrap()));
    assert_eq!(parse_forwarded_for("for=_hidden"), None);
    assert_eq!(parse_forwarded_for("by=10.0.0.1"), None);
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_counted_and_slots_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let signer: Arc<dyn Signer> = Arc::new(ca(dir.path()));
    let pod = reversing_pod().await;
    let agent = destination_agent_with(signer.clone(), Workloads::new([(pod.ip(), identity("web"))].into()), 2).await;
    // Two clients that never say a word hold both places (their handshakes wait).
    let idle = [TcpStream::connect(agent.addr).await.unwrap(), TcpStream::connect(agent.addr).await.unwrap()];
    let slots_open = || open(&agent.metrics.connections_open, DirectionLabels::inbound());
    while slots_open() < 2 {
        tokio::task::yield_now().await;
    }
    let mut third = TcpStream::connect(agent.addr).await.unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(third.read(&mut byte).await.unwrap(), 0, "closed on arrival");
    assert_eq!(refused(&agent.metrics, "inbound", "too_many_connections"), 1);
    drop(idle);
    while slots_open() > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let tunnels = Tunnels::new(Certificates::new(signer, Duration::from_secs(3600)), HboneMetrics::default());
    let route = Route {
        source: identity("front"),
        destination: identity("web"),
        node: agent.addr,
        target: pod,
        source_addr: None,
        l7_checked: false,
    };
    let mut tunnel = tunnels.open(&route).await.expect("a place again once the idle clients left");
    tunnel.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_denied_source_is_refused_with_the_reason_and_a_policy_change_closes_live_streams() {
    let dir = tempfile::tempdir().unwrap();
    let signer: Arc<dyn Signer> = Arc::new(ca(dir.path()));
    let pod = reversing_pod().await;
    let workloads = Workloads::new([(pod.ip(), identity("web"))].into());
    let denied = workloads.denied.clone();
    denied.lock().unwrap().push(identity("mallory"));
    let mut agent = destination_agent(signer.clone(), workloads).await;
    let tunnels = Tunnels::new(Certificates::new(signer, Duration::from_secs(3600)), HboneMetrics::default());
    let route = |source: &str| Route {
        source: identity(source),
        destination: identity("web"),
        node: agent.addr,
        target: pod,
        source_addr: None,
        l7_checked: false,
    };

    let refusal = tunnels.open(&route("mallory")).await.err().expect("denied");
    assert!(refusal.detail.contains("403") && refusal.detail.contains("policy_denied"), "the peer says why: {refusal}");
    assert_eq!(refused(&agent.metrics, "inbound", "policy_denied"), 1);

    // A live stream, then a change that denies it: review closes it, the client sees the end.
    let mut tunnel = tunnels.open(&route("front")).await.unwrap();
    tunnel.write_all(b"half a request").await.unwrap();
    assert_eq!(agent.inbound.review(), 0, "still allowed: nothing closed");
    while agent.inbound.live_streams() == 0 {
        tokio::task::yield_now().await;
    }
    denied.lock().unwrap().push(identity("front"));
    assert_eq!(agent.inbound.review(), 1);
    let mut rest = Vec::new();
    let ended = tunnel.read_to_end(&mut rest).await;
    assert!(ended.is_err() || rest.is_empty(), "no answer comes: the stream was cut ({ended:?}, {rest:?})");
    let (carried, from_source, _) = agent.carried.recv().await.unwrap();
    assert_eq!(carried.source, identity("front"));
    assert!(from_source <= 14, "bytes counted up to the cut: {from_source}");
    assert_eq!(refused(&agent.metrics, "inbound", "policy_closed"), 1);
    while agent.inbound.live_streams() > 0 {
        tokio::task::yield_now().await;
    }
}
