//! TLS between agents: TLS 1.3 only, both sides with workload certificates, ALPN h2, and the
//! SPIFFE checks rustls leaves to us (it verifies chains and DNS/IP names, not URI SANs).
//!
//! A client verifies that the server's chain ends at a trusted root and that its identity is
//! the one it meant to reach; a server verifies the client's chain and that its identity is
//! in the trust domain (policy on who may talk to whom comes after, on that identity).
//! Refusals keep their reason, and `refusal_reason` names it for metrics and logs.
#![forbid(unsafe_code)]
use std::sync::Arc;

use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore, ServerConfig,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::SingleCertAndKey,
};

use crate::identity::{Identity, certs::WorkloadCert};

pub const ALPN_H2: &[u8] = b"h2";

/// Why a peer's certificate was refused (beyond rustls' own chain checks).
#[derive(Debug, thiserror::Error)]
pub enum SpiffeError {
    #[error("the certificate has no SPIFFE URI SAN")]
    NoIdentity,
    #[error("the certificate has {0} URI SANs, a workload certificate has one")]
    ManyIdentities(usize),
    #[error("the certificate's identity: {0}")]
    BadIdentity(#[from] crate::identity::IdentityError),
    #[error("{got} is not in the trust domain {want:?}")]
    WrongTrustDomain { got: Box<Identity>, want: String },
    #[error("the peer is {got}, not {want}")]
    WrongIdentity { got: Box<Identity>, want: Box<Identity> },
    #[error("the certificate does not parse: {0}")]
    Parse(String),
}

fn refuse(e: SpiffeError) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The identity in a certificate: its one URI SAN.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, SpiffeError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| SpiffeError::Parse(e.to_string()))?;
    let san = parsed.subject_alternative_name().map_err(|e| SpiffeError::Parse(e.to_string()))?.ok_or(SpiffeError::NoIdentity)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(SpiffeError::NoIdentity),
        [uri] => Ok(Identity::parse(uri)?),
        many => Err(SpiffeError::ManyIdentities(many.len())),
    }
}

/// A short, bounded name for why a handshake failed, for metric labels.
pub fn refusal_reason(error: &Error) -> &'static str {
    match error {
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired_certificate",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => "certificate_not_valid_yet",
            CertificateError::UnknownIssuer | CertificateError::BadSignature | CertificateError::Revoked => "untrusted_certificate",
            CertificateError::Other(OtherError(e)) => match e.downcast_ref::<SpiffeError>() {
                Some(SpiffeError::WrongTrustDomain { .. }) => "wrong_trust_domain",
                Some(SpiffeError::WrongIdentity { .. }) => "wrong_identity",
                Some(_) => "no_identity",
                None => "bad_certificate",
            },
            _ => "bad_certificate",
        },
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::AlertReceived(_) => "refused_by_peer",
        Error::InvalidMessage(_) | Error::InappropriateHandshakeMessage { .. } | Error::InappropriateMessage { .. } => "not_tls",
        Error::PeerIncompatible(_) => "incompatible_tls",
        _ => "tls_error",
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks a server: its chain to `roots`, and that it is `expected`.
#[derive(Debug)]
struct ServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algorithms.all)?;
        let got = identity_of(end_entity).map_err(refuse)?;
        if got != self.expected {
            return Err(refuse(SpiffeError::WrongIdentity { got: Box::new(got), want: Box::new(self.expected.clone()) }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        // Never reached: the configs allow TLS 1.3 only.
        Err(Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Checks a client: its chain to the roots (webpki's client verifier), and that its identity
/// is in `trust_domain`.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client has one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let got = identity_of(end_entity).map_err(refuse)?;
        if got.trust_domain != self.trust_domain {
            return Err(refuse(SpiffeError::WrongTrustDomain { got: Box::new(got), want: self.trust_domain.clone() }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A TLS 1.3 client that accepts only `expected` (chained to `roots`), presenting `own` if given.
fn client(own: Option<&WorkloadCert>, roots: Arc<RootCertStore>, expected: Identity, alpn: &[u8]) -> Result<ClientConfig, ConfigError> {
    let provider = provider();
    let verifier = ServerVerifier { roots, expected, algorithms: provider.signature_verification_algorithms };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match own {
        Some(own) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(own.certified.clone()))),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    // Sessions are not resumed: every connection proves the identities afresh.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// The client side of a tunnel from `own`'s workload to `expected`.
pub fn client_config(own: &WorkloadCert, roots: Arc<RootCertStore>, expected: Identity) -> Result<ClientConfig, ConfigError> {
    client(Some(own), roots, expected, ALPN_H2)
}

/// A client with no certificate of its own that checks the server is `expected` (the agent
/// asking the central signer, which authenticates it by its token).
pub fn server_only_client_config(roots: Arc<RootCertStore>, expected: Identity) -> Result<ClientConfig, ConfigError> {
    client(None, roots, expected, b"http/1.1")
}

/// The server side of a tunnel into `own`'s workload, for clients of `trust_domain`.
pub fn server_config(own: &WorkloadCert, roots: Arc<RootCertStore>, trust_domain: &str) -> Result<ServerConfig, ConfigError> {
    let provider = provider();
    let inner = WebPkiClientVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let verifier = ClientVerifier { inner, trust_domain: trust_domain.to_owned() };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(own.certified.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The verified identity of a connection's peer.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<Identity, SpiffeError> {
    identity_of(certs.and_then(<[_]>::first).ok_or(SpiffeError::NoIdentity)?)
}

#[cfg(test)]
mod tests;
