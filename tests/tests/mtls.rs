//! mTLS between nodes: two "nodes" (the test's network namespace and one more, joined by a veth
//! pair), an agent on each with its own cgroup subtree and pin directory, "pods" as processes
//! in child cgroups. An enrolled pod on node A reaches an enrolled pod on node B through a
//! Service VIP and by its address; the bytes arrive intact both ways, and the wire between the
//! nodes carries TLS records on :15008 and nothing else (tcpdump's capture, read here).
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use mesh_tests::*;

const MARKER: &str = "mesh-plaintext-marker-7f3a;";
const SENTINEL_PORT: &str = "9";
/// Node B's pod: web, at its address.
const SERVER: &str = "10.200.1.2:8080";

/// tcpdump on an interface, writing a pcap file, until stopped.
struct Capture {
    child: Child,
    path: PathBuf,
}

impl Capture {
    fn start(interface: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.pcap", unique_name("capture")));
        let mut child = Command::new("tcpdump")
            .args(["-i", interface, "-s", "0", "-U", "-w"])
            .arg(&path)
            .args(["tcp", "or", "udp", "port", SENTINEL_PORT])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump (cargo xtask test installs it)");
        // It says so once the capture runs.
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut line = String::new();
        while !line.contains("listening on") {
            line.clear();
            assert!(stderr.read_line(&mut line).expect("tcpdump stderr") > 0, "tcpdump exited before capturing");
        }
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Self { child, path }
    }

    /// Stops the capture once it holds everything sent before (a sentinel datagram sent
    /// now has reached the file: tcpdump drops what it has not read when interrupted), and
    /// reads its segments.
    fn stop(mut self) -> Vec<Segment> {
        let sentinel = unique_name("sentinel");
        let socket = std::net::UdpSocket::bind("10.200.0.1:0").expect("udp");
        wait_until(
            || {
                let _ = socket.send_to(sentinel.as_bytes(), format!("10.200.0.2:{SENTINEL_PORT}"));
                std::fs::read(&self.path).is_ok_and(|pcap| contains(&pcap, sentinel.as_bytes()))
            },
            || "the capture to take the sentinel datagram".into(),
        );
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        segments(&std::fs::read(&self.path).expect("pcap"))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A TCP segment with payload, as captured.
struct Segment {
    from_port: u16,
    to_port: u16,
    payload: Vec<u8>,
}

/// The TCP segments with payload of a pcap file of Ethernet frames (IPv4).
fn segments(pcap: &[u8]) -> Vec<Segment> {
    assert!(pcap.len() >= 24 && pcap[..4] == [0xd4, 0xc3, 0xb2, 0xa1], "a little-endian pcap file");
    let mut found = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let captured = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let frame = &pcap[at + 16..(at + 16 + captured).min(pcap.len())];
        at += 16 + captured;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let (header, total) = (usize::from(ip[0] & 0x0f) * 4, usize::from(u16::from_be_bytes([ip[2], ip[3]])));
        if ip[9] != 6 || total > ip.len() || header + 20 > total {
            continue;
        }
        let tcp = &ip[header..total];
        let offset = usize::from(tcp[12] >> 4) * 4;
        if offset < tcp.len() {
            found.push(Segment {
                from_port: u16::from_be_bytes([tcp[0], tcp[1]]),
                to_port: u16::from_be_bytes([tcp[2], tcp[3]]),
                payload: tcp[offset..].to_vec(),
            });
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Whether a byte stream is a sequence of TLS records (a truncated last one allowed).
fn tls_records(stream: &[u8]) -> Result<usize, String> {
    let mut at = 0;
    let mut records = 0;
    while at + 5 <= stream.len() {
        let (kind, version, len) =
            (stream[at], u16::from_be_bytes([stream[at + 1], stream[at + 2]]), u16::from_be_bytes([stream[at + 3], stream[at + 4]]));
        if !(0x14..=0x17).contains(&kind) || !matches!(version, 0x0301 | 0x0303) {
            return Err(format!("not a TLS record at byte {at}: {:02x?}", &stream[at..(at + 8).min(stream.len())]));
        }
        at += 5 + usize::from(len);
        records += 1;
    }
    Ok(records)
}

fn echo_ok(answer: &Value) -> bool {
    answer["results"].as_array().is_some_and(|r| !r.is_empty() && r.iter().all(|x| x["ok"] == true))
}

#[test]
fn enrolled_pods_on_two_nodes_talk_through_mutual_tls_and_the_wire_carries_only_tls() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("mtls") else { return };
        let (client, yaml) = (&nodes.client, nodes.yaml());
        let agent_b = nodes.agent_b(&yaml, &[]);
        let agent_a = nodes.agent_a(&yaml, &[]);
        let _backend = nodes.serve_on_b(probe_bin(), &["echo-serve", "10.200.1.2:8080"]);

        // Through the Service and by the pod's address, a marked payload, captured between
        // the nodes.
        let capture = Capture::start("mesh-nb");
        let marked = format!("65536:{MARKER}");
        let via_vip = client.probe(&["echo-check", "10.96.0.10:80", "1", &marked]);
        assert!(echo_ok(&via_vip), "through the VIP: {via_vip}\nnode A:\n{}\nnode B:\n{}", agent_a.log(), agent_b.log());
        let direct = client.probe(&["echo-check", "10.200.1.2:8080", &marked]);
        assert!(echo_ok(&direct), "to the pod's address: {direct}\n{}", agent_a.log());
        let segments = capture.stop();

        let stray: Vec<String> = segments
            .iter()
            .filter(|s| s.from_port != 15008 && s.to_port != 15008)
            .map(|s| format!("{} -> {}", s.from_port, s.to_port))
            .collect();
        assert!(stray.is_empty(), "payload crossed between the nodes outside the tunnel port: {stray:?}");
        let all: Vec<u8> = segments.iter().flat_map(|s| s.payload.iter().copied()).collect();
        assert!(all.len() > 2 * 65536, "the tunnel carried the payloads ({} bytes captured)", all.len());
        assert!(!contains(&all, MARKER.as_bytes()), "the marker crossed in plaintext");
        for toward_b in [true, false] {
            let stream: Vec<u8> =
                segments.iter().filter(|s| (s.to_port == 15008) == toward_b).flat_map(|s| s.payload.iter().copied()).collect();
            let records = tls_records(&stream).unwrap_or_else(|e| panic!("toward node B: {toward_b}: {e}"));
            assert!(records > 2, "toward node B: {toward_b}: {records} TLS records");
        }

        // Control: a process in no pod (not enrolled) dials the pod directly, in plaintext,
        // and the capture sees the marker: the check above could have failed.
        let capture = Capture::start("mesh-nb");
        let plain = probe_outside(&["echo-check", "10.200.1.2:8080", &format!("4096:{MARKER}")]);
        assert!(echo_ok(&plain), "{plain}");
        let segments = capture.stop();
        let all: Vec<u8> = segments.iter().flat_map(|s| s.payload.clone()).collect();
        let ports: Vec<(u16, u16, usize)> = segments.iter().map(|s| (s.from_port, s.to_port, s.payload.len())).collect();
        assert!(contains(&all, MARKER.as_bytes()), "a plaintext connection shows its marker in the capture: {ports:?}");

        // Large transfers both ways, half-closed, through the pooled tunnel connection.
        let big = client.probe(&["echo-check", "10.96.0.10:80", "1", "1048576", "67108864"]);
        assert!(echo_ok(&big), "{big}\n{}", agent_a.log());
        assert_eq!(agent_a.metric("mesh_hbone_connections_open", &[("direction", "outbound")]), 1.0, "one pooled connection");
        assert_eq!(agent_b.metric("mesh_hbone_connections_open", &[("direction", "inbound")]), 1.0);
        for agent in [&agent_a, &agent_b] {
            assert_eq!(agent.metric("mesh_hbone_refused_total", &[]), 0.0, "nothing refused:\n{}", agent.metrics());
        }

        // Istio's TCP metrics at both ends, with both principals and mutual_tls: five
        // connections through the Service and one to the pod's address.
        let mtls = [
            ("source_principal", "spiffe://td/ns/shop/sa/front"),
            ("destination_principal", "spiffe://td/ns/shop/sa/web"),
            ("connection_security_policy", "mutual_tls"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| [&mtls[..], extra].concat();
        let source = with(&[("reporter", "source"), ("source_workload", "front"), ("destination_workload", "web")]);
        let via_service = with(&[("reporter", "source"), ("destination_service", "web.shop.svc.cluster.local")]);
        let destination = with(&[("reporter", "destination"), ("source_workload", "front"), ("destination_workload", "web")]);
        let closed = "istio_tcp_connections_closed_total";
        wait_until(
            || agent_a.metric(closed, &source) == 6.0 && agent_b.metric(closed, &destination) == 6.0,
            || format!("node A:\n{}\nnode B:\n{}", agent_a.metrics(), agent_b.metrics()),
        );
        assert_eq!(agent_a.metric(closed, &via_service), 5.0, "{}", agent_a.metrics());
        let total = (1 + 65536 + 65536 + 1 + 1048576 + 67108864) as f64;
        for (agent, labels) in [(&agent_a, &source), (&agent_b, &destination)] {
            for bytes in ["istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"] {
                assert_eq!(agent.metric(bytes, labels), total, "{bytes}:\n{}", agent.metrics());
            }
        }
        // The kernel's record of the pod's connection to the tunnel listener is not counted
        // again without the principals.
        assert_eq!(
            agent_a.metric(closed, &[("reporter", "source"), ("connection_security_policy", "unknown")]),
            0.0,
            "{}",
            agent_a.metrics()
        );

        agent_a.stop();
        agent_b.stop();
    });
}

/// The independent HBONE peer (tests/python/hbone_peer.py), written out for `python` in
/// `inside` (removed with it).
fn python_peer(inside: &Path) -> (PathBuf, PathBuf) {
    let python = std::env::var_os("MESH_PYTHON")
        .map(PathBuf::from)
        .expect("MESH_PYTHON: a Python with the h2 package (cargo xtask test sets it up)");
    let script = inside.join("hbone_peer.py");
    std::fs::write(&script, include_str!("../python/hbone_peer.py")).expect("write the peer");
    (python, script)
}

/// A CA directory of openssl's making (root-cert.pem, root-key.pem), not mesh's, made in
/// `inside` (removed with it).
fn openssl_root(inside: &Path) -> PathBuf {
    let dir = inside.join(unique_name("other-root"));
    std::fs::create_dir(&dir).expect("mkdir");
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=another root", "-days", "1"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", "-keyout"])
        .arg(dir.join("root-key.pem"))
        .arg("-out")
        .arg(dir.join("root-cert.pem")));
    dir
}

/// A workload certificate of openssl's making that expired in 2020 (`openssl ca` sets any
/// validity period), signed by the CA in `ca`.
fn openssl_expired_cert(ca: &Path, uri: &str) -> (String, String) {
    let dir = ca.join(unique_name("expired"));
    std::fs::create_dir(&dir).expect("mkdir");
    let (key, csr, ext) = openssl_request(&dir, uri);
    let (cert, config) = (dir.join("cert.pem"), dir.join("ca.cnf"));
    std::fs::write(dir.join("index.txt"), "").expect("index");
    std::fs::write(dir.join("serial"), "1000\n").expect("serial");
    std::fs::write(
        &config,
        format!(
            "[ca]\ndefault_ca = old\n[old]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\ndefault_md = sha256\npolicy = any\n[any]\norganizationName = optional\n",
            d = dir.display()
        ),
    )
    .expect("config");
    run(Command::new("openssl")
        .args(["ca", "-batch", "-notext", "-config"])
        .arg(&config)
        .arg("-cert")
        .arg(ca.join("root-cert.pem"))
        .arg("-keyfile")
        .arg(ca.join("root-key.pem"))
        .args(["-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-extfile"])
        .arg(&ext)
        .arg("-in")
        .arg(&csr)
        .arg("-out")
        .arg(&cert));
    (cert.display().to_string(), key.display().to_string())
}

#[test]
fn an_independent_hbone_peer_tunnels_into_mesh_and_mesh_tunnels_into_it() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("peer") else { return };
        let python = python_peer(&nodes.ca);
        let (client, yaml, root) = (&nodes.client, nodes.yaml(), nodes.root());
        let _backend = nodes.serve_on_b(probe_bin(), &["echo-serve", "10.200.1.2:8080"]);

        // The Python peer, as front, tunnels into node B's agent to web.
        let agent_b = nodes.agent_b(&yaml, &[]);
        let creds = openssl_cert(&nodes.ca, "spiffe://td/ns/shop/sa/front");
        let tunnel_in = |authority: &str| peer_client(&python, &root, &creds, authority, 1 << 20);
        let answer = tunnel_in("10.200.1.2:8080");
        assert_eq!(answer["status"], "200", "{answer}\n{}", agent_b.log());
        assert_eq!(answer["echo_ok"], true, "1 MiB there and back, half-closed: {answer}");
        // A destination that is none of node B's workloads: refused, with the reason counted.
        let answer = tunnel_in("10.200.1.9:8080");
        assert_eq!(answer["status"], "403", "{answer}");
        assert_eq!(agent_b.metric("mesh_hbone_refused_total", &[("direction", "inbound"), ("reason", "unknown_destination")]), 1.0);
        agent_b.stop();

        // Node A's agent tunnels front's connection into the Python peer, serving as web.
        let mut peer_server = nodes.peer_server(&python, "spiffe://td/ns/shop/sa/web");
        let mut peer_server = peer_server.stdout(Stdio::piped()).spawn().expect("python peer");
        let mut lines = BufReader::new(peer_server.stdout.take().expect("stdout")).lines();
        let first = lines.next().expect("a line").expect("stdout");
        assert!(first.contains("serving"), "{first}");
        let agent_a = nodes.agent_a(&yaml, &[]);
        let answer = client.probe(&["echo-check", "10.96.0.10:80", "65536"]);
        assert!(echo_ok(&answer), "{answer}\n{}", agent_a.log());
        let carried: Value = serde_json::from_str(&lines.next().expect("a line").expect("stdout")).expect("json");
        assert_eq!(
            carried,
            serde_json::json!({"peer": "spiffe://td/ns/shop/sa/front", "authority": "10.200.1.2:8080", "up": 65536, "down": 65536}),
            "the peer saw front's identity and the pod's address"
        );
        agent_a.stop();
        let _ = peer_server.kill();
        let _ = peer_server.wait();
    });
}

/// The Python peer as a client of node B's agent with (cert, key), to `authority`, sending `size` bytes: its
/// JSON answer.
fn peer_client(python: &(PathBuf, PathBuf), root: &str, (cert, key): &(String, String), authority: &str, size: usize) -> Value {
    let mut cmd = Command::new(&python.0);
    cmd.arg(&python.1).args(["client", "--cert", cert, "--key", key, "--ca", root, "--connect", "10.200.0.2:15008"]);
    cmd.args(["--server-name", "web.shop.sa.mesh.internal", "--expect-peer", "spiffe://td/ns/shop/sa/web", "--authority", authority]);
    parse_probe(cmd.args(["--size", &size.to_string()]))
}

#[test]
fn refused_tunnels_are_counted_by_reason_and_a_root_is_trusted_only_while_its_files_say_so() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("refuse") else { return };
        let python = python_peer(&nodes.ca);
        let (client, yaml, root, ca) = (&nodes.client, nodes.yaml(), nodes.root(), &nodes.ca);
        let _backend = nodes.serve_on_b(probe_bin(), &["echo-serve", "10.200.1.2:8080"]);
        let agent_b = nodes.agent_b(&yaml, &[]);
        let refused = |reason: &str| agent_b.metric("mesh_hbone_refused_total", &[("direction", "inbound"), ("reason", reason)]);

        // Another trust domain, though signed by the trusted root.
        let answer = peer_client(&python, &root, &openssl_cert(ca, "spiffe://elsewhere/ns/shop/sa/front"), SERVER, 1000);
        assert!(answer["error"].is_string(), "{answer}");
        assert_eq!(refused("wrong_trust_domain"), 1.0, "{}", agent_b.metrics());

        // A certificate of the trusted root, for the right identity, that expired.
        let answer = peer_client(&python, &root, &openssl_expired_cert(ca, "spiffe://td/ns/shop/sa/front"), SERVER, 1000);
        assert!(answer["error"].is_string(), "{answer}");
        assert_eq!(refused("expired_certificate"), 1.0, "{}", agent_b.metrics());

        // A root nobody told node B to trust; then trusted beside the CA's own (a rotation's
        // overlap); then no longer (revoked): refused again, with nothing restarted.
        let other = openssl_root(ca);
        let stranger = openssl_cert(&other, "spiffe://td/ns/shop/sa/front");
        assert!(peer_client(&python, &root, &stranger, SERVER, 1000)["error"].is_string());
        assert_eq!(refused("untrusted_certificate"), 1.0);
        std::fs::copy(other.join("root-cert.pem"), ca.join("trust-bundle.pem")).expect("bundle");
        let answer = peer_client(&python, &root, &stranger, SERVER, 1000);
        assert_eq!((answer["status"].as_str(), answer["echo_ok"].as_bool()), (Some("200"), Some(true)), "{answer}");
        std::fs::remove_file(ca.join("trust-bundle.pem")).expect("revoke");
        assert!(peer_client(&python, &root, &stranger, SERVER, 1000)["error"].is_string());
        assert_eq!(refused("untrusted_certificate"), 2.0);

        // Plaintext on the HBONE port.
        let mut plain = std::net::TcpStream::connect("10.200.0.2:15008").expect("connect");
        std::io::Write::write_all(&mut plain, b"CONNECT 10.200.1.2:8080 HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
        let _ = std::io::Read::read_to_end(&mut plain, &mut Vec::new());
        assert_eq!(refused("not_tls"), 1.0);
        // The node's own workload still gets through after all that.
        let answer = peer_client(&python, &root, &openssl_cert(ca, "spiffe://td/ns/shop/sa/front"), SERVER, 1000);
        assert_eq!(answer["echo_ok"], true, "{answer}");
        agent_b.stop();

        // Node A's agent meets a "node B" whose certificate is not web's: it refuses, counts
        // why, and the pod's connection fails at once.
        let mut impostor = nodes.peer_server(&python, "spiffe://td/ns/shop/sa/db");
        let _impostor = Backend::spawn_raw(&mut impostor);
        let agent_a = nodes.agent_a(&yaml, &[]);
        let answer = client.probe(&["echo-check", "10.96.0.10:80", "100"]);
        assert!(!echo_ok(&answer), "{answer}");
        assert_eq!(agent_a.metric("mesh_hbone_refused_total", &[("direction", "outbound"), ("reason", "wrong_identity")]), 1.0);
        assert!(agent_a.log().contains("wrong_identity"), "logged with the reason:\n{}", agent_a.log());
        agent_a.stop();
    });
}

#[test]
fn certificates_renew_under_a_long_lived_tunnel_and_a_connection_loop_without_a_failure() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("rotate") else { return };
        let (client, yaml) = (&nodes.client, nodes.yaml());
        let _backend = nodes.serve_on_b(probe_bin(), &["serve", "web", "10.200.1.2:8080"]);
        // Ten-second certificates: renewed every four to five seconds.
        let agent_b = nodes.agent_b(&yaml, &["--cert-lifetime", "10s"]);
        let agent_a = nodes.agent_a(&yaml, &["--cert-lifetime", "10s"]);

        let mut held = client.hold("10.96.0.10:80");
        assert!(held.send("first")["answer"].is_string(), "the long-lived connection works");
        let certificate = |agent: &Agent| agent.config_dump()["certificates"][0].clone();
        let first = certificate(&agent_a);
        assert_eq!(first["identity"], "spiffe://td/ns/shop/sa/front", "{first}");
        let first_expiry = first["expires"].as_str().expect("expires").to_owned();
        // Until a certificate issued after the first one expired is in use: the pooled
        // connection made with the first one is then past its certificate's life.
        let (mut connections, mut lines) = (0, 0);
        wait_until_for(
            std::time::Duration::from_secs(60),
            || {
                let answer = held.send("again");
                assert!(answer["answer"].is_string(), "the held connection failed after {lines} lines: {answer}\n{}", agent_a.log());
                lines += 1;
                let tally = client.probe(&["tcp", "10.96.0.10:80", "1"]);
                assert_eq!(names(&tally), vec![("web".to_owned(), 1)], "connection {connections}: {tally}\n{}", agent_a.log());
                connections += 1;
                certificate(&agent_a)["issued"].as_str().is_some_and(|issued| issued > first_expiry.as_str())
            },
            || format!("no renewal past the first expiry: {}", agent_a.config_dump()["certificates"]),
        );
        assert_ne!(certificate(&agent_b)["serial"], serde_json::Value::Null);
        assert!(held.send("last")["answer"].is_string(), "the connection made before every renewal still works");
        held.close();
        for agent in [&agent_a, &agent_b] {
            assert_eq!(agent.metric("mesh_hbone_refused_total", &[]), 0.0, "nothing refused:\n{}", agent.metrics());
        }
        agent_a.stop();
        agent_b.stop();
    });
}

#[test]
fn an_l7_service_on_another_node_is_reached_through_the_tunnel_under_its_http_routing() {
    in_netns(|| {
        let Some(nodes) = TwoNodes::new("l7") else { return };
        let client = &nodes.client;
        // The same pods, and an HTTP Service the proxy handles (mesh.dev/l7) with a route that
        // sends /v2 to it and nothing else.
        let yaml = format!(
            "{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop, annotations: {{mesh.dev/l7: \"true\"}}}}\n\
             spec: {{clusterIP: 10.96.0.11, ports: [{{name: http, port: 80, targetPort: 8081}}]}}\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: api-1, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8081}}]\n\
             endpoints: [{{addresses: [10.200.1.2], nodeName: node-b, targetRef: {{kind: Pod, name: web-0, namespace: shop}}}}]\n---\n\
             apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: api, namespace: shop}}\n\
             spec: {{parentRefs: [{{group: \"\", kind: Service, name: api, port: 80}}], rules: [{{matches: [{{path: {{type: PathPrefix, value: /v2}}}}], backendRefs: [{{name: api, port: 80}}]}}]}}\n",
            nodes.yaml()
        );
        let _backend = nodes.serve_on_b(probe_bin(), &["serve", "api-b", "10.200.1.2:8081"]);
        let agent_b = nodes.agent_b(&yaml, &[]);
        let agent_a = nodes.agent_a(&yaml, &[]);

        let capture = Capture::start("mesh-nb");
        let routed = client.probe(&["get", "10.96.0.11:80", "/v2/items", "3"]);
        assert_eq!(names(&routed), vec![("api-b".to_owned(), 3)], "{routed}\n{}", agent_a.log());
        let unrouted = client.probe(&["get", "10.96.0.11:80", "/other", "1"]);
        assert_eq!(names(&unrouted), vec![("HTTP 404".to_owned(), 1)], "the route still decides: {unrouted}");
        let segments = capture.stop();
        assert!(segments.iter().all(|s| s.from_port == 15008 || s.to_port == 15008), "only the tunnel between the nodes");
        assert!(!segments.is_empty());
        let all: Vec<u8> = segments.iter().flat_map(|s| s.payload.iter().copied()).collect();
        assert!(!contains(&all, b"/v2/items"), "the request line crossed in plaintext");

        // The endpoint's node reports the proxy's connection as the caller's, in mutual TLS.
        let destination = [
            ("reporter", "destination"),
            ("source_principal", "spiffe://td/ns/shop/sa/front"),
            ("destination_principal", "spiffe://td/ns/shop/sa/web"),
            ("connection_security_policy", "mutual_tls"),
        ];
        wait_until(|| agent_b.metric("istio_tcp_connections_opened_total", &destination) >= 1.0, || agent_b.metrics());
        assert_eq!(agent_a.metric("istio_requests_total", &[("response_code", "200")]), 3.0, "{}", agent_a.metrics());
        agent_a.stop();
        agent_b.stop();
    });
}
