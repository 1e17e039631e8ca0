//! The node's workload certificates, one per identity, minted on demand and renewed.
//!
//! The first ask for an identity starts its renewer: a key is made on the node (P-256, it
//! never leaves), its request signed, and the certificate renewed at half-life (less up to a
//! tenth of the lifetime at random, so that a node's certificates do not all renew at once).
//! While the signer is away the renewer backs off and the still-valid certificate keeps
//! serving; connections hold the certificate they started with, so a renewal drops none.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};
use tokio::sync::watch;

use super::{
    Identity,
    ca::{CaError, Signer},
};

/// Istio's default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error, Clone)]
pub enum CertError {
    #[error("no certificate for {identity} yet: {reason}")]
    Unavailable { identity: Identity, reason: Arc<str> },
    #[error("no trust roots: {0}")]
    NoRoots(Arc<str>),
}

/// A workload's certificate and key, as TLS uses them.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    pub certified: Arc<CertifiedKey>,
    /// By this node's clock.
    pub issued_at: SystemTime,
    pub expires_at: SystemTime,
}

impl WorkloadCert {
    fn valid_now(&self) -> bool {
        SystemTime::now() < self.expires_at
    }

    /// When to renew: half-life, less a random part of up to a tenth of the lifetime.
    fn renew_at(&self) -> SystemTime {
        let lifetime = self.expires_at.duration_since(self.issued_at).unwrap_or_default();
        self.issued_at + lifetime / 2 - lifetime.mul_f64(fastrand::f64() / 10.0)
    }
}

#[derive(Debug, Clone)]
enum Status {
    Pending,
    Ready(Arc<WorkloadCert>),
    /// No valid certificate, and why (the renewer keeps trying).
    Failed(Arc<str>),
}

struct Slot {
    status: watch::Receiver<Status>,
    renewer: tokio::task::AbortHandle,
}

/// The node's workload certificates.
pub struct Certificates {
    signer: Arc<dyn Signer>,
    lifetime: Duration,
    slots: Mutex<HashMap<Identity, Slot>>,
    roots: Mutex<Option<(Vec<CertificateDer<'static>>, Arc<RootCertStore>)>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").field("lifetime", &self.lifetime).field("identities", &self.identities()).finish()
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        for slot in self.slots.get_mut().expect("not poisoned").values() {
            slot.renewer.abort();
        }
    }
}

impl Certificates {
    pub fn new(signer: Arc<dyn Signer>, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self { signer, lifetime, slots: Mutex::new(HashMap::new()), roots: Mutex::new(None) })
    }

    /// `identity`'s certificate: the current one, or the first once it is signed.
    pub async fn fetch(self: &Arc<Self>, identity: &Identity) -> Result<Arc<WorkloadCert>, CertError> {
        let mut status = self.watch(identity);
        let seen = status.wait_for(|s| !matches!(s, Status::Pending)).await.map(|s| s.clone());
        match seen {
            Ok(Status::Ready(cert)) => Ok(cert),
            Ok(Status::Failed(reason)) => Err(CertError::Unavailable { identity: identity.clone(), reason }),
            Ok(Status::Pending) | Err(_) => {
                Err(CertError::Unavailable { identity: identity.clone(), reason: "its renewer stopped".into() })
            }
        }
    }

    /// Follows `identity`'s certificate (starting its renewer if none runs).
    pub fn subscribe(self: &Arc<Self>, identity: &Identity) -> watch::Receiver<Option<Arc<WorkloadCert>>> {
        let mut status = self.watch(identity);
        let (tx, rx) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                let cert = match &*status.borrow_and_update() {
                    Status::Ready(cert) => Some(cert.clone()),
                    _ => None,
                };
                if cert.is_some() && tx.send(cert).is_err() {
                    return;
                }
                tokio::select! {
                    changed = status.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }

    fn watch(self: &Arc<Self>, identity: &Identity) -> watch::Receiver<Status> {
        let mut slots = self.slots.lock().expect("not poisoned");
        if let Some(slot) = slots.get(identity) {
            return slot.status.clone();
        }
        let (tx, rx) = watch::channel(Status::Pending);
        let renewer = tokio::spawn(renew(self.signer.clone(), identity.clone(), self.lifetime, tx)).abort_handle();
        slots.insert(identity.clone(), Slot { status: rx.clone(), renewer });
        rx
    }

    /// Stops renewing the identities `keep` says no workload has any more.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        self.slots.lock().expect("not poisoned").retain(|identity, slot| {
            let kept = keep(identity);
            if !kept {
                slot.renewer.abort();
            }
            kept
        });
    }

    /// The certificates held now (for `/config_dump`).
    pub fn current(&self) -> Vec<Arc<WorkloadCert>> {
        let slots = self.slots.lock().expect("not poisoned");
        let mut held: Vec<Arc<WorkloadCert>> = slots
            .values()
            .filter_map(|slot| match &*slot.status.borrow() {
                Status::Ready(cert) => Some(cert.clone()),
                _ => None,
            })
            .collect();
        held.sort_by(|a, b| a.identity.cmp(&b.identity));
        held
    }

    /// The identities with a renewer.
    pub fn identities(&self) -> Vec<Identity> {
        self.slots.lock().expect("not poisoned").keys().cloned().collect()
    }

    /// The roots peers are verified by, as the signer says now.
    pub fn roots(&self) -> Result<Arc<RootCertStore>, CertError> {
        let now = self.signer.trust_roots().map_err(|e| CertError::NoRoots(e.to_string().into()))?;
        let mut cached = self.roots.lock().expect("not poisoned");
        if let Some((ders, store)) = cached.as_ref()
            && *ders == now
        {
            return Ok(store.clone());
        }
        let mut store = RootCertStore::empty();
        let (_, refused) = store.add_parsable_certificates(now.iter().cloned());
        if store.is_empty() {
            return Err(CertError::NoRoots(format!("none of the {} roots parse ({refused} refused)", now.len()).into()));
        }
        let store = Arc::new(store);
        *cached = Some((now, store.clone()));
        Ok(store)
    }
}

/// Mints and renews one identity's certificate until aborted or nobody listens.
async fn renew(signer: Arc<dyn Signer>, identity: Identity, lifetime: Duration, status: watch::Sender<Status>) {
    let mut backoff = FIRST_BACKOFF;
    let mut current: Option<Arc<WorkloadCert>> = None;
    let mut failing = false;
    loop {
        match mint(&*signer, &identity, lifetime).await {
            Ok(cert) => {
                if failing {
                    tracing::info!(%identity, "certificate signed again");
                }
                tracing::debug!(%identity, ?lifetime, "workload certificate signed");
                (failing, backoff) = (false, FIRST_BACKOFF);
                let cert = Arc::new(cert);
                let wait = cert.renew_at().duration_since(SystemTime::now()).unwrap_or_default();
                current = Some(cert.clone());
                if status.send(Status::Ready(cert)).is_err() {
                    return;
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(%identity, error = %e, "signing a workload certificate failed; retrying with backoff, the valid certificate (if any) keeps serving");
                }
                failing = true;
                match current.as_ref().filter(|c| c.valid_now()) {
                    Some(_) => {}
                    None => {
                        current = None;
                        if status.send(Status::Failed(e.to_string().into())).is_err() {
                            return;
                        }
                    }
                }
                // Never sleep past the current certificate's expiry without trying again.
                let until_expiry = current.as_ref().and_then(|c| c.expires_at.duration_since(SystemTime::now()).ok());
                tokio::time::sleep(until_expiry.map_or(backoff, |left| backoff.min(left))).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn mint(signer: &dyn Signer, identity: &Identity, lifetime: Duration) -> Result<WorkloadCert, CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| CaError::Sign(format!("making a key: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| CaError::Sign(format!("the request: {e}")))?;
    let issued_at = SystemTime::now();
    let signed = signer.sign(identity, csr.der().to_vec(), lifetime).await?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&der).map_err(|e| CaError::Sign(format!("the key: {e}")))?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        certified: Arc::new(CertifiedKey::new(signed.chain, signing)),
        issued_at,
        expires_at: issued_at + lifetime,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        pin::Pin,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use super::*;
    use crate::identity::ca::{FileSigner, Signed};

    /// A signer that can be taken away.
    struct Flaky {
        inner: FileSigner,
        down: AtomicBool,
        signed: AtomicUsize,
    }

    impl Signer for Flaky {
        fn sign(
            &self,
            identity: &Identity,
            csr: Vec<u8>,
            lifetime: Duration,
        ) -> Pin<Box<dyn Future<Output = Result<Signed, CaError>> + Send + '_>> {
            if self.down.load(Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(CaError::Sign("the signer is away".into()))));
            }
            self.signed.fetch_add(1, Ordering::SeqCst);
            self.inner.sign(identity, csr, lifetime)
        }

        fn trust_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
            self.inner.trust_roots()
        }
    }

    fn flaky(dir: &std::path::Path) -> Arc<Flaky> {
        crate::identity::ca::init(dir, "td", Duration::from_secs(3600)).unwrap();
        Arc::new(Flaky { inner: FileSigner::new(dir).unwrap(), down: AtomicBool::new(false), signed: AtomicUsize::new(0) })
    }

    #[tokio::test]
    async fn a_certificate_is_minted_once_for_concurrent_asks_and_renewed_before_half_life() {
        let dir = tempfile::tempdir().unwrap();
        let signer = flaky(dir.path());
        let certs = Certificates::new(signer.clone(), Duration::from_secs(10));
        let id = Identity::new("td", "shop", "web").unwrap();
        let (a, b) = tokio::join!(certs.fetch(&id), certs.fetch(&id));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(Arc::ptr_eq(&a, &b), "one certificate for both asks");
        assert_eq!(signer.signed.load(Ordering::SeqCst), 1);

        let mut following = certs.subscribe(&id);
        following.wait_for(|c| c.as_ref().is_some_and(|c| !Arc::ptr_eq(c, &a))).await.unwrap();
        let renewed = following.borrow().clone().unwrap();
        assert!(renewed.issued_at >= a.issued_at + Duration::from_secs(4), "renewed at 40-50% of its life");
        assert!(renewed.issued_at < a.expires_at, "before the old one expired");
    }

    #[tokio::test]
    async fn without_a_signer_a_new_identity_fails_with_the_reason_and_gets_one_when_it_is_back() {
        let dir = tempfile::tempdir().unwrap();
        let signer = flaky(dir.path());
        signer.down.store(true, Ordering::SeqCst);
        let certs = Certificates::new(signer.clone(), Duration::from_secs(3600));
        let id = Identity::new("td", "shop", "web").unwrap();
        let error = certs.fetch(&id).await.unwrap_err();
        assert!(error.to_string().contains("the signer is away"), "{error}");
        signer.down.store(false, Ordering::SeqCst);
        let mut following = certs.subscribe(&id);
        following.wait_for(Option::is_some).await.unwrap();
        certs.fetch(&id).await.expect("signed once the signer is back");

        certs.retain(|_| false);
        assert!(certs.identities().is_empty());
    }
}
