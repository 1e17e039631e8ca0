//! The certificate authority: a root key and certificate in a directory (`mesh ca init`, or
//! the user's own), and the `Signer` that turns a workload's certificate request into a
//! short-lived certificate for the identity the caller vouches for.
//!
//! The directory holds `root-cert.pem` (the signing root), `root-key.pem` (its key, mode 0600)
//! and, optionally, `trust-bundle.pem`: more roots to trust, for a root rotation (put the old
//! root there while certificates it signed are still alive; remove it to stop trusting them).
//! The files are read again whenever they change, so a rotation needs no restart.
use std::{
    future::Future,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};

use super::Identity;

pub const ROOT_CERT: &str = "root-cert.pem";
pub const ROOT_KEY: &str = "root-key.pem";
pub const TRUST_BUNDLE: &str = "trust-bundle.pem";

/// Workload certificates start this much before they are signed: clocks of nodes differ.
const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// Shortest and longest workload certificate lifetimes a signer issues.
pub const MIN_LIFETIME: Duration = Duration::from_secs(10);
pub const MAX_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("reading {0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    #[error("writing {0}: {1}")]
    Write(PathBuf, #[source] io::Error),
    #[error("{0}: {1}")]
    Pem(PathBuf, String),
    #[error("{0} already exists: a CA is there (remove it first to make a new one)")]
    Exists(PathBuf),
    #[error("the certificate request: {0}")]
    Request(String),
    #[error("signing: {0}")]
    Sign(String),
}

/// Issues workload certificates.
pub trait Signer: Send + Sync + 'static {
    /// A certificate for `identity` over the public key of `csr` (DER PKCS#10, P-256), valid
    /// for `lifetime`. Only the key is taken from the request: the identity is the caller's.
    fn sign(
        &self,
        identity: &Identity,
        csr: Vec<u8>,
        lifetime: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Signed, CaError>> + Send + '_>>;

    /// The roots to trust peers by, now (cheap: asked for every TLS handshake).
    fn trust_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError>;
}

/// A signed certificate, and the roots to trust peers by (as of signing).
#[derive(Debug, Clone)]
pub struct Signed {
    /// Leaf first, then intermediates (none for a root that signs directly).
    pub chain: Vec<CertificateDer<'static>>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Writes a new root (P-256, `lifetime`) into `dir`; refuses to overwrite one.
pub fn init(dir: &Path, trust_domain: &str, lifetime: Duration) -> Result<(), CaError> {
    super::check_trust_domain(trust_domain).map_err(|e| CaError::Sign(e.to_string()))?;
    let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CaError::Exists(path.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| CaError::Write(dir.to_owned(), e))?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(e.to_string()))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "mesh");
    params.distinguished_name.push(DnType::CommonName, format!("mesh root CA for {trust_domain}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key).map_err(|e| CaError::Sign(e.to_string()))?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    std::fs::write(&cert_path, cert.pem()).map_err(|e| CaError::Write(cert_path, e))?;
    Ok(())
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| CaError::Write(path.to_owned(), e))?;
    file.write_all(contents).map_err(|e| CaError::Write(path.to_owned(), e))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    fastrand::fill(&mut bytes);
    // Positive, and no leading zero byte to be stripped.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// The CA as loaded from its directory.
struct Loaded {
    /// What the files were when read: modification times and sizes.
    stamp: Vec<Option<(SystemTime, u64)>>,
    issuer: Arc<Issuer<'static, KeyPair>>,
    roots: Vec<CertificateDer<'static>>,
}

/// Signs from a CA directory, reading it again when its files change.
pub struct FileSigner {
    dir: PathBuf,
    loaded: Mutex<Option<Arc<Loaded>>>,
}

impl FileSigner {
    /// Loads `dir` now, so that a missing or broken CA is an error at start.
    pub fn new(dir: &Path) -> Result<Self, CaError> {
        let signer = Self { dir: dir.to_owned(), loaded: Mutex::new(None) };
        signer.current()?;
        Ok(signer)
    }

    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [ROOT_CERT, ROOT_KEY, TRUST_BUNDLE]
            .iter()
            .map(|f| std::fs::metadata(self.dir.join(f)).ok().and_then(|m| Some((m.modified().ok()?, m.len()))))
            .collect()
    }

    fn current(&self) -> Result<Arc<Loaded>, CaError> {
        let stamp = self.stamp();
        let mut loaded = self.loaded.lock().expect("not poisoned");
        if let Some(l) = loaded.as_ref().filter(|l| l.stamp == stamp) {
            return Ok(l.clone());
        }
        let fresh = Arc::new(self.load(stamp)?);
        *loaded = Some(fresh.clone());
        Ok(fresh)
    }

    fn load(&self, stamp: Vec<Option<(SystemTime, u64)>>) -> Result<Loaded, CaError> {
        let read = |name: &str| {
            let path = self.dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| CaError::Read(path, e))
        };
        let cert_path = self.dir.join(ROOT_CERT);
        let root = read_certs(&cert_path, &read(ROOT_CERT)?)?.into_iter().next().expect("read_certs returns at least one");
        let key_path = self.dir.join(ROOT_KEY);
        let key = KeyPair::from_pem(&read(ROOT_KEY)?).map_err(|e| CaError::Pem(key_path.clone(), format!("not a private key: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_der(&root, key).map_err(|e| CaError::Pem(cert_path.clone(), format!("not a CA certificate: {e}")))?;
        let mut roots = vec![root.clone()];
        let bundle_path = self.dir.join(TRUST_BUNDLE);
        match std::fs::read_to_string(&bundle_path) {
            Ok(text) => roots.extend(read_certs(&bundle_path, &text)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(CaError::Read(bundle_path, e)),
        }
        Ok(Loaded { stamp, issuer: Arc::new(issuer), roots })
    }

    fn sign_now(&self, identity: &Identity, csr: &[u8], lifetime: Duration) -> Result<Signed, CaError> {
        let ca = self.current()?;
        let leaf = sign_leaf(&ca.issuer, identity, csr, lifetime, SystemTime::now())?;
        Ok(Signed { chain: vec![leaf], roots: ca.roots.clone() })
    }
}

impl Signer for FileSigner {
    fn sign(
        &self,
        identity: &Identity,
        csr: Vec<u8>,
        lifetime: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Signed, CaError>> + Send + '_>> {
        let signed = self.sign_now(identity, &csr, lifetime);
        Box::pin(std::future::ready(signed))
    }

    fn trust_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        Ok(self.current()?.roots.clone())
    }
}

fn read_certs(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| CaError::Pem(path.to_owned(), format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(CaError::Pem(path.to_owned(), "holds no certificate".into()));
    }
    Ok(certs)
}

/// A workload certificate: the request's key, the caller's identity as the one URI SAN,
/// client and server use, `lifetime` from `now` (backdated for clock skew).
pub fn sign_leaf(
    issuer: &Issuer<'_, KeyPair>,
    identity: &Identity,
    csr: &[u8],
    lifetime: Duration,
    now: SystemTime,
) -> Result<CertificateDer<'static>, CaError> {
    if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
        return Err(CaError::Request(format!("lifetime {lifetime:?} is outside {MIN_LIFETIME:?}..={MAX_LIFETIME:?}")));
    }
    let request = CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr))
        .map_err(|e| CaError::Request(format!("not a valid signed PKCS#10 request: {e}")))?;
    if request.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::Request("the key must be ECDSA P-256".into()));
    }
    let mut params = CertificateParams::default();
    // No subject: the identity is the SAN (marked critical for that reason).
    params.distinguished_name = DistinguishedName::new();
    let uri = identity.to_string().try_into().map_err(|e| CaError::Request(format!("identity {identity}: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + lifetime).into();
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&request.public_key, issuer).map_err(|e| CaError::Sign(e.to_string()))?;
    Ok(cert.der().clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(identity_claimed: &str) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let params = CertificateParams::new(vec![identity_claimed.to_owned()]).unwrap();
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn init_writes_a_root_once_with_a_private_key_and_the_signer_uses_the_callers_identity() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "cluster.local", Duration::from_secs(3600)).unwrap();
        let mode = std::fs::metadata(dir.path().join(ROOT_KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the root key is the owner's only");
        assert!(matches!(init(dir.path(), "cluster.local", Duration::from_secs(3600)), Err(CaError::Exists(_))));

        let signer = FileSigner::new(dir.path()).unwrap();
        let identity = Identity::new("cluster.local", "shop", "web").unwrap();
        // The request claims another name: only its key is taken.
        let (_, csr) = request("evil.example.com");
        let signed = signer.sign_now(&identity, &csr, Duration::from_secs(60)).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.chain[0]).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = san.value.general_names.iter().map(|n| n.to_string()).collect();
        assert_eq!(names, ["URI(spiffe://cluster.local/ns/shop/sa/web)"]);
        assert!(san.critical, "no subject, so the SAN is critical");
        assert_eq!(signed.roots.len(), 1);
    }

    #[test]
    fn broken_requests_and_ca_files_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(FileSigner::new(dir.path()), Err(CaError::Read(p, _)) if p.ends_with(ROOT_CERT)));
        init(dir.path(), "td", Duration::from_secs(3600)).unwrap();
        let signer = FileSigner::new(dir.path()).unwrap();
        let identity = Identity::new("td", "a", "b").unwrap();
        let (_, mut csr) = request("x");
        let last = csr.len() - 1;
        csr[last] ^= 1;
        assert!(matches!(signer.sign_now(&identity, &csr, Duration::from_secs(60)), Err(CaError::Request(_))), "bad signature");
        let (_, csr) = request("x");
        assert!(matches!(signer.sign_now(&identity, &csr, Duration::from_secs(1)), Err(CaError::Request(_))), "too short");

        std::fs::write(dir.path().join(TRUST_BUNDLE), "garbage").unwrap();
        let error = signer.sign_now(&identity, &csr, Duration::from_secs(60)).unwrap_err();
        assert!(error.to_string().contains(TRUST_BUNDLE), "{error}");
    }
}
