use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::identity::ca;

/// A CA of the test's own: its issuer and its roots.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub roots: Arc<RootCertStore>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        ca::init(dir.path(), "td", Duration::from_secs(3600)).unwrap();
        let cert = std::fs::read_to_string(dir.path().join(ca::ROOT_CERT)).unwrap();
        let key = KeyPair::from_pem(&std::fs::read_to_string(dir.path().join(ca::ROOT_KEY)).unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add_parsable_certificates(rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).map(Result::unwrap));
        Self { issuer: Issuer::from_ca_cert_pem(&cert, key).unwrap(), roots: Arc::new(roots), _dir: dir }
    }

    /// A certificate for `uri`'s identity signed at `signed` for `lifetime`.
    pub fn cert_at(&self, uri: &str, signed: SystemTime, lifetime: Duration) -> WorkloadCert {
        let identity = Identity::parse(uri).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).unwrap();
        let leaf = ca::sign_leaf(&self.issuer, &identity, csr.der(), lifetime, signed).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der).unwrap();
        WorkloadCert {
            identity,
            certified: Arc::new(rustls::sign::CertifiedKey::new(vec![leaf], signing)),
            issued_at: signed,
            expires_at: signed + lifetime,
        }
    }

    pub fn cert(&self, uri: &str) -> WorkloadCert {
        self.cert_at(uri, SystemTime::now(), Duration::from_secs(3600))
    }
}

/// One handshake over a socket pair: the client's and the server's outcome (the identity the
/// server saw, or the refusal reason).
async fn handshake(client: ClientConfig, server: ServerConfig) -> (Result<(), &'static str>, Result<Identity, &'static str>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let name = ServerName::try_from("web.shop.sa.mesh.internal").unwrap();
    let client = async move {
        let mut tls = connector.connect(name, a).await.map_err(reason)?;
        tls.write_all(b"ping").await.map_err(reason)?;
        let mut pong = [0u8; 4];
        tls.read_exact(&mut pong).await.map_err(reason)?;
        Ok(())
    };
    let server = async move {
        let mut tls = acceptor.accept(b).await.map_err(reason)?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates()).map_err(|_| "no_identity")?;
        let mut ping = [0u8; 4];
        tls.read_exact(&mut ping).await.map_err(reason)?;
        tls.write_all(b"pong").await.map_err(reason)?;
        tls.flush().await.map_err(reason)?;
        Ok(peer)
    };
    tokio::join!(client, server)
}

fn reason(e: std::io::Error) -> &'static str {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(tls) => refusal_reason(tls),
        None => "io",
    }
}

#[tokio::test]
async fn both_identities_are_proven_and_each_refusal_keeps_its_reason() {
    let ca = TestCa::new();
    let client = ca.cert("spiffe://td/ns/shop/sa/front");
    let server = ca.cert("spiffe://td/ns/shop/sa/web");
    let web = server.identity.clone();
    let client_config = |own: &WorkloadCert, expected: &Identity| super::client_config(own, ca.roots.clone(), expected.clone()).unwrap();
    let server_config = |own: &WorkloadCert| super::server_config(own, ca.roots.clone(), "td").unwrap();

    let (c, s) = handshake(client_config(&client, &web), server_config(&server)).await;
    assert_eq!(c, Ok(()));
    assert_eq!(s.unwrap().to_string(), "spiffe://td/ns/shop/sa/front", "the server sees the client's identity");

    // The server is not who the client meant.
    let db = Identity::parse("spiffe://td/ns/shop/sa/db").unwrap();
    let (c, _) = handshake(client_config(&client, &db), server_config(&server)).await;
    assert_eq!(c, Err("wrong_identity"));

    // A client of another trust domain, though signed by the same root.
    let stranger = ca.cert("spiffe://elsewhere/ns/shop/sa/front");
    let (_, s) = handshake(client_config(&stranger, &web), server_config(&server)).await;
    assert_eq!(s, Err("wrong_trust_domain"));

    // A client from a root the server does not trust, and a server the client does not.
    let other_ca = TestCa::new();
    let forged = other_ca.cert("spiffe://td/ns/shop/sa/front");
    let (_, s) = handshake(client_config(&forged, &web), server_config(&server)).await;
    assert_eq!(s, Err("untrusted_certificate"));
    let forged_server = other_ca.cert("spiffe://td/ns/shop/sa/web");
    let (c, _) = handshake(client_config(&client, &web), server_config(&forged_server)).await;
    assert_eq!(c, Err("untrusted_certificate"));

    // An expired client certificate.
    let expired = ca.cert_at("spiffe://td/ns/shop/sa/front", SystemTime::now() - Duration::from_secs(7200), Duration::from_secs(60));
    let (_, s) = handshake(client_config(&expired, &web), server_config(&server)).await;
    assert_eq!(s, Err("expired_certificate"));
}

#[tokio::test]
async fn plaintext_to_a_tls_server_is_refused_as_not_tls() {
    let ca = TestCa::new();
    let server = ca.cert("spiffe://td/ns/shop/sa/web");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(super::server_config(&server, ca.roots.clone(), "td").unwrap()));
    let (mut a, b) = tokio::io::duplex(4096);
    a.write_all(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n").await.unwrap();
    let Err(refused) = acceptor.accept(b).await else { panic!("a handshake from plaintext") };
    assert_eq!(reason(refused), "not_tls");
}
