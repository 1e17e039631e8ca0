//! The central signer for Kubernetes (`mesh ca serve`), and the agent's client of it.
//!
//! On Kubernetes no node holds the root key: agents send each workload's certificate request
//! to the signer with their service account token. The signer asks the API server who the
//! token belongs to (a TokenReview), accepts only the agents' service account, takes the node
//! the token is bound to (`authentication.kubernetes.io/node-name`, which kubelet's projected
//! tokens carry), and signs an identity only if a pod of that identity (namespace and service
//! account) runs on that node: istiod's node authorizer. A compromised node can mint only the
//! identities of its own pods.
//!
//! Wire: HTTPS (TLS 1.3, the signer's own SPIFFE certificate, which agents check against the
//! root they are given), `POST /v1/sign` with `Authorization: Bearer <token>` and
//! `{"identity", "csr" (base64 DER PKCS#10), "lifetime_seconds"}`; the answer is
//! `{"chain": [base64 DER...], "roots": [base64 DER...]}` or `{"error"}` with 400/401/403/503.
#![forbid(unsafe_code)]
use std::{
    future::Future,
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine as _;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::{
    identity::{
        Identity,
        ca::{CaError, FileSigner, Signed, Signer},
        certs::Certificates,
    },
    tls,
};

/// The extra field of a bound service account token that names its pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// Requests are small: a CSR and an identity.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// The signer's own certificate (renewed at half-life like any workload's).
const SERVING_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Connect, handshake and answer, from the agent's side.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
struct SignRequest {
    identity: String,
    csr: String,
    lifetime_seconds: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct SignResponse {
    chain: Vec<String>,
    roots: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorResponse {
    error: String,
}

/// `mesh ca serve`'s settings.
#[derive(Debug, Clone)]
pub struct SignerOptions {
    pub ca_dir: PathBuf,
    pub listen: SocketAddr,
    pub trust_domain: String,
    /// The signer's own identity, which agents expect (`spiffe://<td>/ns/mesh-system/sa/mesh-ca`).
    pub identity: Identity,
    /// Service accounts allowed to ask, as `namespace/name` (the agents').
    pub agents: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("--ca-dir: {0}")]
    Ca(#[from] CaError),
    #[error("the signer's own certificate: {0}")]
    Certificate(String),
    #[error("listening on {0}: {1}")]
    Bind(SocketAddr, #[source] io::Error),
}

/// Why a request was refused: the status and what the agent (and the log) are told.
struct Refused(StatusCode, String);

struct Service {
    /// The same CA the signer's own certificate comes from (loaded once, read again on change).
    signer: Arc<FileSigner>,
    client: kube::Client,
    trust_domain: String,
    agents: Vec<String>,
}

impl Service {
    async fn sign(&self, request: Request<hyper::body::Incoming>) -> Result<SignResponse, Refused> {
        if request.method() != Method::POST || request.uri().path() != "/v1/sign" {
            return Err(Refused(StatusCode::NOT_FOUND, "POST /v1/sign".into()));
        }
        let token = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .ok_or_else(|| Refused(StatusCode::UNAUTHORIZED, "no bearer token".into()))?;
        let body = Limited::new(request.into_body(), MAX_REQUEST_BYTES)
            .collect()
            .await
            .map_err(|e| Refused(StatusCode::BAD_REQUEST, format!("the request body: {e}")))?
            .to_bytes();
        let asked: SignRequest =
            serde_json::from_slice(&body).map_err(|e| Refused(StatusCode::BAD_REQUEST, format!("the request: {e}")))?;
        let identity = Identity::parse(&asked.identity).map_err(|e| Refused(StatusCode::BAD_REQUEST, e.to_string()))?;
        if identity.trust_domain != self.trust_domain {
            return Err(Refused(StatusCode::FORBIDDEN, format!("{identity} is not in trust domain {}", self.trust_domain)));
        }
        let csr = base64::engine::general_purpose::STANDARD
            .decode(&asked.csr)
            .map_err(|e| Refused(StatusCode::BAD_REQUEST, format!("csr: not base64: {e}")))?;
        let node = self.node_of(&token).await?;
        self.authorize(&identity, &node).await?;
        let signed = self
            .signer
            .sign(&identity, csr, Duration::from_secs(asked.lifetime_seconds))
            .await
            .map_err(|e| Refused(StatusCode::BAD_REQUEST, e.to_string()))?;
        tracing::info!(%identity, %node, "signed a workload certificate");
        let encode = |certs: &[CertificateDer<'_>]| certs.iter().map(|c| base64::engine::general_purpose::STANDARD.encode(c)).collect();
        Ok(SignResponse { chain: encode(&signed.chain), roots: encode(&signed.roots) })
    }

    /// The node the token's pod runs on, if the token is an agent's.
    async fn node_of(&self, token: &str) -> Result<String, Refused> {
        let review = TokenReview { spec: TokenReviewSpec { token: Some(token.to_owned()), ..Default::default() }, ..Default::default() };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let reviewed = api
            .create(&Default::default(), &review)
            .await
            .map_err(|e| Refused(StatusCode::SERVICE_UNAVAILABLE, format!("the API server's TokenReview: {e}")))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Refused(StatusCode::UNAUTHORIZED, format!("the token: {why}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let allowed =
            self.agents.iter().any(|a| a.split_once('/').is_some_and(|(ns, sa)| username == format!("system:serviceaccount:{ns}:{sa}")));
        if !allowed {
            return Err(Refused(
                StatusCode::FORBIDDEN,
                format!("{username} is not an agent's service account ({})", self.agents.join(", ")),
            ));
        }
        user.extra.and_then(|mut extra| extra.remove(NODE_NAME_EXTRA)).and_then(|nodes| nodes.into_iter().next()).ok_or_else(|| {
            Refused(StatusCode::FORBIDDEN, format!("{username}'s token is bound to no node (a projected token from kubelet is)"))
        })
    }

    /// Whether a pod with `identity` runs on `node`.
    async fn authorize(&self, identity: &Identity, node: &str) -> Result<(), Refused> {
        let pods: kube::Api<Pod> = kube::Api::namespaced(self.client.clone(), &identity.namespace);
        let listed = pods
            .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(|e| Refused(StatusCode::SERVICE_UNAVAILABLE, format!("the API server's pods: {e}")))?;
        let found = listed.items.iter().any(|pod| {
            let account = pod.spec.as_ref().and_then(|s| s.service_account_name.as_deref()).filter(|s| !s.is_empty()).unwrap_or("default");
            account == identity.service_account
        });
        if found {
            Ok(())
        } else {
            Err(Refused(
                StatusCode::FORBIDDEN,
                format!("no pod of namespace {} with service account {} runs on node {node}", identity.namespace, identity.service_account),
            ))
        }
    }
}

fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap_or_default())));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// Presents the signer's current certificate (renewed by `Certificates`).
#[derive(Debug)]
struct CurrentCert {
    certs: Arc<Certificates>,
    identity: Identity,
}

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.certs.current().into_iter().find(|c| c.identity == self.identity).map(|c| c.certified.clone())
    }
}

/// Runs `mesh ca serve` until the process ends.
pub async fn serve(opts: SignerOptions, client: kube::Client) -> Result<(), SignerError> {
    let ca = Arc::new(FileSigner::new(&opts.ca_dir)?);
    let certs = Certificates::new(ca.clone(), SERVING_LIFETIME);
    certs.fetch(&opts.identity).await.map_err(|e| SignerError::Certificate(e.to_string()))?;
    let resolver = Arc::new(CurrentCert { certs: certs.clone(), identity: opts.identity.clone() });
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| SignerError::Certificate(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let service = Arc::new(Service { signer: ca, client, trust_domain: opts.trust_domain, agents: opts.agents });
    let listener = tokio::net::TcpListener::bind(opts.listen).await.map_err(|e| SignerError::Bind(opts.listen, e))?;
    tracing::info!(listen = %opts.listen, identity = %opts.identity, "signing workload certificates");
    let slots = crate::server::Slots::new(1024, Default::default(), Default::default());
    loop {
        let (tcp, peer) = crate::server::accept(&listener, "signer").await;
        let Some(slot) = slots.take() else { continue };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Ok(tls)) = tokio::time::timeout(REQUEST_TIMEOUT, acceptor.accept(tcp)).await else { return };
            let handler = service_fn(move |request| {
                let service = service.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(match service.sign(request).await {
                        Ok(signed) => json_response(StatusCode::OK, &signed),
                        Err(Refused(status, error)) => {
                            tracing::warn!(%peer, %status, %error, "certificate request refused");
                            json_response(status, &ErrorResponse { error })
                        }
                    })
                }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(REQUEST_TIMEOUT)
                .serve_connection(TokioIo::new(tls), handler);
            let _ = tokio::time::timeout(Duration::from_secs(60), connection).await;
        });
    }
}

/// The agent's client of the central signer.
pub struct RemoteSigner {
    /// `host:port`.
    addr: String,
    /// The signer's identity, checked on its certificate.
    expected: Identity,
    /// The root the agent was given (the signer's certificate chains to it).
    configured_roots: Vec<CertificateDer<'static>>,
    /// The roots of the last answer (a rotation's overlap included).
    roots: Mutex<Option<Vec<CertificateDer<'static>>>>,
    token_file: PathBuf,
}

impl RemoteSigner {
    pub fn new(addr: String, expected: Identity, root_file: &std::path::Path, token_file: PathBuf) -> Result<Self, CaError> {
        let text = std::fs::read(root_file).map_err(|e| CaError::Read(root_file.to_owned(), e))?;
        use rustls::pki_types::pem::PemObject as _;
        let configured_roots: Vec<_> = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<_, _>>()
            .map_err(|e| CaError::Pem(root_file.to_owned(), format!("not PEM certificates: {e}")))?;
        if configured_roots.is_empty() {
            return Err(CaError::Pem(root_file.to_owned(), "holds no certificate".into()));
        }
        Ok(Self { addr, expected, configured_roots, roots: Mutex::new(None), token_file })
    }

    async fn request(&self, identity: &Identity, csr: &[u8], lifetime: Duration) -> Result<Signed, CaError> {
        let token = std::fs::read_to_string(&self.token_file).map_err(|e| CaError::Read(self.token_file.clone(), e))?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(self.configured_roots.iter().cloned());
        let config = tls::server_only_client_config(Arc::new(roots), self.expected.clone()).map_err(|e| CaError::Sign(e.to_string()))?;
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| CaError::Sign(format!("connecting to the signer {}: {e}", self.addr)))?;
        let name = rustls::pki_types::ServerName::try_from(self.expected.server_name()).map_err(|e| CaError::Sign(e.to_string()))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| CaError::Sign(format!("TLS with the signer {}: {e}", self.addr)))?;
        let (mut send, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| CaError::Sign(e.to_string()))?;
        tokio::spawn(connection);
        let body = SignRequest {
            identity: identity.to_string(),
            csr: base64::engine::general_purpose::STANDARD.encode(csr),
            lifetime_seconds: lifetime.as_secs(),
        };
        let request = Request::builder()
            .method(Method::POST)
            .uri("/v1/sign")
            .header(hyper::header::HOST, self.addr.as_str())
            .header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.trim()))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap_or_default())))
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let response = send.send_request(request).await.map_err(|e| CaError::Sign(format!("the signer {}: {e}", self.addr)))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), 1 << 20).collect().await.map_err(|e| CaError::Sign(e.to_string()))?.to_bytes();
        if status != StatusCode::OK {
            let why = serde_json::from_slice::<ErrorResponse>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(CaError::Sign(format!("the signer refused ({status}): {why}")));
        }
        let answer: SignResponse = serde_json::from_slice(&body).map_err(|e| CaError::Sign(format!("the signer's answer: {e}")))?;
        let decode = |list: Vec<String>| -> Result<Vec<CertificateDer<'static>>, CaError> {
            list.iter()
                .map(|b| {
                    base64::engine::general_purpose::STANDARD
                        .decode(b)
                        .map(CertificateDer::from)
                        .map_err(|e| CaError::Sign(format!("the signer's answer: {e}")))
                })
                .collect()
        };
        let signed = Signed { chain: decode(answer.chain)?, roots: decode(answer.roots)? };
        *self.roots.lock().expect("not poisoned") = Some(signed.roots.clone());
        Ok(signed)
    }
}

impl Signer for RemoteSigner {
    fn sign(
        &self,
        identity: &Identity,
        csr: Vec<u8>,
        lifetime: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Signed, CaError>> + Send + '_>> {
        let identity = identity.clone();
        Box::pin(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, self.request(&identity, &csr, lifetime))
                .await
                .map_err(|_| CaError::Sign(format!("the signer {} did not answer within {REQUEST_TIMEOUT:?}", self.addr)))?
        })
    }

    fn trust_roots(&self) -> Result<Vec<CertificateDer<'static>>, CaError> {
        Ok(self.roots.lock().expect("not poisoned").clone().unwrap_or_else(|| self.configured_roots.clone()))
    }
}
