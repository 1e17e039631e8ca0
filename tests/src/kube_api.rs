//! A Kubernetes API server double for `mesh agent --source kubernetes`: the real wire protocol
//! over HTTPS (a CA of the test's own, a bearer token), in the calling thread's network
//! namespace, with the behaviour a watcher must survive:
//!
//! - lists with `resourceVersion`, `limit` and `continue` (pages), `fieldSelector`
//!   (`spec.nodeName=`, `metadata.name=`, `metadata.namespace=`);
//! - watches as chunked JSON lines from a resourceVersion, with `BOOKMARK`s when asked, ended by
//!   `timeoutSeconds`; a resourceVersion older than the kept history gets the `ERROR` event
//!   with a 410 `Expired` Status, as kube-apiserver sends it;
//! - create, get, replace (optimistic concurrency: a stale `resourceVersion` is 409), merge
//!   patch (also of the `status` subresource) and delete, for any resource;
//! - resources that do not exist (a CRD not installed) answer 404;
//! - `restart()` drops every connection and watch, `compact()` forgets the history (the next
//!   resumed watch gets 410), `set_down(true)` refuses connections until `set_down(false)`.
//!
//! Objects are JSON values; a resource is `api/v1/services` or
//! `apis/discovery.k8s.io/v1/endpointslices` (the plural is the lower-case kind + "s", or
//! "ies" for a kind ending in "y").
use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The bearer token the kubeconfig carries; anything else is 401.
const TOKEN: &str = "mesh-test-token";
/// Watch events kept for resuming watches (a real API server keeps about five minutes).
const HISTORY: usize = 100_000;

type Key = (String, String, String); // resource, namespace ("" when cluster-scoped), name

#[derive(Default)]
struct Inner {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, resource, type, object), oldest first.
    history: VecDeque<(u64, String, &'static str, Value)>,
    /// Watches from a resourceVersion below this are 410.
    oldest: u64,
    /// Resources that answer 404 (their CRD is not installed).
    missing: HashSet<String>,
    /// Resources that answer 403 (RBAC does not grant them).
    forbidden: HashSet<String>,
    /// `METHOD path?query` of every request, in order.
    requests: Vec<String>,
    /// Watches answered 410 Gone, by resource.
    expired: Vec<String>,
    /// Tokens a TokenReview knows: token → the user it names.
    tokens: BTreeMap<String, Value>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// The newest resourceVersion: watches wake on it.
    head: watch::Sender<u64>,
    /// Bumped by restart(): connections of an older epoch close.
    epoch: watch::Sender<u64>,
    down: watch::Sender<bool>,
    /// Whether the port accepts connections (follows `down`).
    listening: watch::Sender<bool>,
}

pub struct KubeApi {
    pub addr: SocketAddr,
    /// A kubeconfig for this server (CA, token), for `--kubeconfig`.
    pub kubeconfig: PathBuf,
    dir: PathBuf,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl KubeApi {
    /// Starts on 127.0.0.1 (an ephemeral port) of the calling thread's network namespace.
    /// `missing`: resources that do not exist, e.g. `apis/gateway.networking.k8s.io/v1/httproutes`.
    pub fn start(missing: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("kube-api"));
        std::fs::create_dir_all(&dir).expect("kube-api dir");
        let (ca_pem, server_config) = tls();
        std::fs::write(dir.join("ca.pem"), ca_pem).expect("write ca");
        // Bound here: the socket belongs to this thread's network namespace.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind kube-api");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{addr}\n    certificate-authority: {}\n\
                 users:\n- name: agent\n  user:\n    token: {TOKEN}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\n\
                 current-context: test\n",
                dir.join("ca.pem").display()
            ),
        )
        .expect("write kubeconfig");
        let inner = Inner { missing: missing.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            head: watch::Sender::new(0),
            epoch: watch::Sender::new(0),
            down: watch::Sender::new(false),
            listening: watch::Sender::new(true),
        });
        // Its threads are made by this one: they inherit the network namespace.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
        runtime.spawn(accept_loop(listener, addr, acceptor, shared.clone()));
        Self { addr, kubeconfig, dir, shared, runtime: Some(runtime) }
    }

    /// Makes a TokenReview of `token` answer `username`, bound to a pod on `node` when given
    /// (the `authentication.kubernetes.io/node-name` extra of kubelet's projected tokens).
    pub fn add_token(&self, token: &str, username: &str, node: Option<&str>) {
        let extra = node.map_or_else(|| json!({}), |n| json!({"authentication.kubernetes.io/node-name": [n]}));
        self.shared.inner.lock().unwrap().tokens.insert(token.to_owned(), json!({"username": username, "extra": extra}));
    }

    /// A directory as kubelet mounts a pod's service account at
    /// /var/run/secrets/kubernetes.io/serviceaccount (token, ca.crt, namespace): with
    /// KUBERNETES_SERVICE_HOST and _PORT set to this server, an agent in a container finds it
    /// as it would in a cluster.
    pub fn service_account(&self, namespace: &str) -> PathBuf {
        let dir = self.dir.join("serviceaccount");
        std::fs::create_dir_all(&dir).expect("serviceaccount dir");
        std::fs::write(dir.join("token"), TOKEN).expect("token");
        std::fs::copy(self.dir.join("ca.pem"), dir.join("ca.crt")).expect("ca.crt");
        std::fs::write(dir.join("namespace"), namespace).expect("namespace");
        dir
    }

    /// Creates or replaces `object` (its apiVersion, kind, namespace and name say where).
    pub fn apply(&self, object: Value) -> u64 {
        let resource = resource_of(&object);
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_owned();
        let mut inner = self.shared.inner.lock().unwrap();
        let exists = inner.objects.contains_key(&(resource.clone(), namespace.clone(), name.clone()));
        let rv = store(&mut inner, (resource, namespace, name), object, if exists { "MODIFIED" } else { "ADDED" });
        drop(inner);
        self.shared.head.send_replace(rv);
        rv
    }

    /// Creates or replaces every object of a multi-document YAML text.
    pub fn apply_yaml(&self, yaml: &str) {
        use serde::Deserialize as _;
        for document in serde_yaml::Deserializer::from_str(yaml) {
            let object = Value::deserialize(document).expect("YAML object");
            if !object.is_null() {
                self.apply(object);
            }
        }
    }

    /// Deletes an object; false when there was none.
    pub fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) -> bool {
        let resource = resource_of(&json!({"apiVersion": api_version, "kind": kind}));
        let mut inner = self.shared.inner.lock().unwrap();
        let Some(rv) = remove(&mut inner, &(resource, namespace.to_owned(), name.to_owned())) else { return false };
        drop(inner);
        self.shared.head.send_replace(rv);
        true
    }

    /// An object as stored (for status and Events the agent wrote).
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared.inner.lock().unwrap().objects.get(&(resource.to_owned(), namespace.to_owned(), name.to_owned())).cloned()
    }

    /// Every object of `resource`.
    pub fn list(&self, resource: &str) -> Vec<Value> {
        let inner = self.shared.inner.lock().unwrap();
        inner.objects.iter().filter(|((r, _, _), _)| r == resource).map(|(_, v)| v.clone()).collect()
    }

    /// Requests served so far, `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        self.shared.inner.lock().unwrap().requests.clone()
    }

    /// Lists (not watches) of `resource` served so far.
    pub fn lists_of(&self, resource: &str) -> usize {
        let path = format!("GET /{resource}");
        self.requests().iter().filter(|r| r.split('?').next() == Some(path.as_str()) && !r.contains("watch=")).count()
    }

    /// Watches of `resource` answered 410 Gone so far.
    pub fn expired_watches(&self, resource: &str) -> usize {
        self.shared.inner.lock().unwrap().expired.iter().filter(|r| *r == resource).count()
    }

    /// Drops every connection and watch (clients reconnect and resume).
    pub fn restart(&self) {
        self.shared.epoch.send_modify(|e| *e += 1);
    }

    /// Forgets the watch history: resuming from any earlier resourceVersion is 410 Gone.
    pub fn compact(&self) {
        let mut inner = self.shared.inner.lock().unwrap();
        inner.history.clear();
        inner.oldest = inner.rv + 1;
    }

    /// Down: new connections are refused, then open ones closed. Up again: served as before.
    /// Returns once the port is in that state.
    pub fn set_down(&self, down: bool) {
        self.shared.down.send_replace(down);
        let mut listening = self.shared.listening.subscribe();
        self.runtime.as_ref().expect("running").block_on(listening.wait_for(|l| *l != down)).expect("accept loop");
        if down {
            self.restart();
        }
    }

    /// Makes a resource answer 403 Forbidden (RBAC not granting it) or not.
    pub fn set_forbidden(&self, resource: &str, forbidden: bool) {
        toggle(&mut self.shared.inner.lock().unwrap().forbidden, resource, forbidden);
    }

    /// Makes a resource exist (a CRD installed) or not.
    pub fn set_missing(&self, resource: &str, missing: bool) {
        toggle(&mut self.shared.inner.lock().unwrap().missing, resource, missing);
    }
}

fn toggle(set: &mut HashSet<String>, resource: &str, member: bool) {
    if member {
        set.insert(resource.to_owned());
    } else {
        set.remove(resource);
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn tls() -> (String, rustls::ServerConfig) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "mesh-test kube-api CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key")).expect("ca cert");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, &ca).expect("server cert");
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("tls versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone(), ca.der().clone()], key_der)
        .expect("server config");
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca.pem(), config)
}

async fn accept_loop(listener: std::net::TcpListener, addr: SocketAddr, acceptor: tokio_rustls::TlsAcceptor, shared: Arc<Shared>) {
    let mut listener = Some(tokio::net::TcpListener::from_std(listener).expect("listener"));
    let mut down = shared.down.subscribe();
    loop {
        let Some(l) = &listener else {
            // Down: the port refuses connections until the server is up again.
            let _ = down.wait_for(|d| !*d).await;
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_reuseaddr(true).expect("reuseaddr");
            socket.bind(addr).expect("bind kube-api again");
            listener = Some(socket.listen(128).expect("listen"));
            shared.listening.send_replace(true);
            continue;
        };
        tokio::select! {
            accepted = l.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (acceptor, shared) = (acceptor.clone(), shared.clone());
                // The epoch as of the accept, not as of the task's first poll: a connection
                // accepted just before a restart (or going down) must be cut by it, not outlive it
                // because its task started after the bump.
                let mut epoch = shared.epoch.subscribe();
                epoch.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| serve(shared.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = epoch.changed() => {}
                    }
                });
            }
            _ = down.wait_for(|d| *d) => {
                listener = None;
                shared.listening.send_replace(false);
            }
        }
    }
}

/// A response body: whole, or a watch's stream of lines.
enum Body {
    Full(Full<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full).poll_frame(cx),
            Body::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(hyper::body::Frame::data(b)))),
        }
    }
}

fn respond(code: StatusCode, body: &Value) -> Response<Body> {
    let mut text = serde_json::to_vec(body).expect("json");
    text.push(b'\n');
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::Full(Full::new(Bytes::from(text))))
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    respond(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// Where a request goes: the resource, the namespace (None: all), the name, a subresource.
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match *segments.first()? {
        "api" if segments.len() >= 3 => (segments[..2].join("/"), &segments[2..]),
        "apis" if segments.len() >= 4 => (segments[..3].join("/"), &segments[3..]),
        _ => return None,
    };
    let string = |s: &&str| s.to_string();
    let (namespace, rest) = match rest {
        ["namespaces", ns, tail @ ..] if !tail.is_empty() => (Some(ns.to_string()), tail),
        _ => (None, rest),
    };
    Some(Target {
        resource: format!("{prefix}/{}", rest.first()?),
        namespace,
        name: rest.get(1).map(string),
        subresource: rest.get(2).map(string),
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri().query().unwrap_or("").split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), percent_decode(v))).collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `spec.nodeName=a,metadata.name=b`: every term must hold.
fn selected(object: &Value, selector: Option<&String>) -> bool {
    selector.is_none_or(|s| {
        s.split(',').filter(|t| !t.is_empty()).all(|term| {
            let (field, value, equal) = match term.split_once("!=") {
                Some((f, v)) => (f, v, false),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((f, v)) => (f, v, true),
                    None => return false,
                },
            };
            let pointer = format!("/{}", field.replace('.', "/"));
            (object.pointer(&pointer).and_then(Value::as_str).unwrap_or("") == value) == equal
        })
    })
}

fn resource_of(object: &Value) -> String {
    let api_version = object["apiVersion"].as_str().expect("apiVersion");
    let kind = object["kind"].as_str().expect("kind");
    let prefix = if api_version.contains('/') { format!("apis/{api_version}") } else { format!("api/{api_version}") };
    let kind = kind.to_lowercase();
    // English plurals, as CRDs spell them: AuthorizationPolicy -> authorizationpolicies.
    match kind.strip_suffix('y') {
        Some(stem) => format!("{prefix}/{stem}ies"),
        None => format!("{prefix}/{kind}s"),
    }
}

/// Stores `object` at a new resourceVersion and records the event.
fn store(inner: &mut Inner, key: Key, mut object: Value, event: &'static str) -> u64 {
    inner.rv += 1;
    let rv = inner.rv;
    let meta = &mut object["metadata"];
    meta["resourceVersion"] = json!(rv.to_string());
    if meta.get("uid").is_none() {
        meta["uid"] = json!(format!("uid-{rv}"));
    }
    if meta.get("creationTimestamp").is_none() {
        meta["creationTimestamp"] = json!("2026-12-03T00:00:00Z");
    }
    inner.history.push_back((rv, key.0.clone(), event, object.clone()));
    if inner.history.len() > HISTORY {
        let (dropped, ..) = inner.history.pop_front().expect("non-empty");
        inner.oldest = dropped + 1;
    }
    inner.objects.insert(key, object);
    rv
}

fn remove(inner: &mut Inner, key: &Key) -> Option<u64> {
    let mut object = inner.objects.remove(key)?;
    inner.rv += 1;
    let rv = inner.rv;
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    inner.history.push_back((rv, key.0.clone(), "DELETED", object));
    Some(rv)
}

fn list_kind(resource: &str) -> String {
    // The kind is not stored per resource; the items carry theirs.
    let plural = resource.rsplit('/').next().unwrap_or("");
    format!("{}List", plural.trim_end_matches('s'))
}

fn api_version_of(resource: &str) -> String {
    let parts: Vec<&str> = resource.split('/').collect();
    parts[1..parts.len() - 1].join("/")
}

async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let line = format!("{} {}", req.method(), req.uri());
    shared.inner.lock().unwrap().requests.push(line);
    if req.headers().get("authorization").and_then(|v| v.to_str().ok()) != Some(&format!("Bearer {TOKEN}")) {
        return Ok(status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized"));
    }
    let Some(target) = parse_path(&path) else {
        return Ok(status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource"));
    };
    if shared.inner.lock().unwrap().missing.contains(&target.resource) {
        return Ok(status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource"));
    }
    if shared.inner.lock().unwrap().forbidden.contains(&target.resource) {
        let message = format!("{} is forbidden: User \"system:serviceaccount:mesh-system:mesh\" cannot access it", target.resource);
        return Ok(status(StatusCode::FORBIDDEN, "Forbidden", &message));
    }
    let params = query(&req);
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", "unreadable body")),
    };
    if method == Method::POST && target.resource == "apis/authentication.k8s.io/v1/tokenreviews" {
        return Ok(token_review(&shared, &body));
    }
    Ok(match (method, &target.name) {
        (Method::GET, None) if matches!(params.get("watch").map(String::as_str), Some("true" | "1")) => {
            watch_response(&shared, &target, &params)
        }
        (Method::GET, None) => list_response(&shared, &target, &params),
        (Method::GET, Some(name)) => {
            let key = (target.resource.clone(), target.namespace.clone().unwrap_or_default(), name.clone());
            match shared.inner.lock().unwrap().objects.get(&key) {
                Some(object) => respond(StatusCode::OK, object),
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{} \"{name}\" not found", target.resource)),
            }
        }
        (Method::POST, None) => write(&shared, &target, &body, Write::Create),
        (Method::PUT, Some(_)) => write(&shared, &target, &body, Write::Replace),
        (Method::PATCH, Some(_)) => write(&shared, &target, &body, Write::Patch),
        (Method::DELETE, Some(name)) => {
            let key = (target.resource.clone(), target.namespace.clone().unwrap_or_default(), name.clone());
            let mut inner = shared.inner.lock().unwrap();
            let object = inner.objects.get(&key).cloned();
            match remove(&mut inner, &key) {
                Some(rv) => {
                    drop(inner);
                    shared.head.send_replace(rv);
                    respond(StatusCode::OK, &object.unwrap_or_default())
                }
                None => status(StatusCode::NOT_FOUND, "NotFound", &format!("\"{name}\" not found")),
            }
        }
        _ => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "method not allowed"),
    })
}

/// A TokenReview, answered from the tokens `add_token` registered.
fn token_review(shared: &Shared, body: &[u8]) -> Response<Body> {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let answer = match shared.inner.lock().unwrap().tokens.get(token) {
        Some(user) => json!({"authenticated": true, "user": user}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    respond(
        StatusCode::CREATED,
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": review["spec"], "status": answer}),
    )
}

fn list_response(shared: &Shared, target: &Target, params: &BTreeMap<String, String>) -> Response<Body> {
    let inner = shared.inner.lock().unwrap();
    let limit = params.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    // A continue token: the resourceVersion of the first page and the last key served.
    let (list_rv, after) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((rv, key)) = token.split_once(';') else {
                return status(StatusCode::BAD_REQUEST, "BadRequest", "invalid continue token");
            };
            let rv: u64 = rv.parse().unwrap_or(0);
            if rv < inner.oldest {
                return status(StatusCode::GONE, "Expired", "the provided continue parameter is too old");
            }
            (rv, Some(key.to_owned()))
        }
        None => (inner.rv, None),
    };
    let mut items = Vec::new();
    let mut next = None;
    for ((resource, namespace, name), object) in &inner.objects {
        if *resource != target.resource || target.namespace.as_ref().is_some_and(|n| n != namespace) {
            continue;
        }
        let key = format!("{namespace}/{name}");
        if after.as_ref().is_some_and(|a| key.as_str() <= a.as_str()) || !selected(object, params.get("fieldSelector")) {
            continue;
        }
        if limit.is_some_and(|l| items.len() == l) {
            next = Some(format!("{list_rv};{}", items.last().map(|(k, _): &(String, Value)| k.clone()).unwrap_or_default()));
            break;
        }
        items.push((key, object.clone()));
    }
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let Some(token) = next {
        metadata["continue"] = json!(token);
    }
    respond(
        StatusCode::OK,
        &json!({
            "kind": list_kind(&target.resource),
            "apiVersion": api_version_of(&target.resource),
            "metadata": metadata,
            "items": items.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        }),
    )
}

fn watch_response(shared: &Arc<Shared>, target: &Target, params: &BTreeMap<String, String>) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let from: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let bookmarks = params.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = Duration::from_secs(params.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(1800));
    let selector = params.get("fieldSelector").cloned();
    let (resource, namespace) = (target.resource.clone(), target.namespace.clone());
    let shared = shared.clone();
    tokio::spawn(async move {
        let line = |v: Value| {
            let mut b = serde_json::to_vec(&v).expect("json");
            b.push(b'\n');
            Bytes::from(b)
        };
        let mut head = shared.head.subscribe();
        let mut sent = from;
        // Whether the history still reaches back to `from`: checked once, as a watch starts.
        let expired = {
            let oldest = shared.inner.lock().unwrap().oldest;
            (from != 0 && from + 1 < oldest).then_some(oldest)
        };
        let expires = tokio::time::sleep(timeout);
        tokio::pin!(expires);
        let mut bookmark_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let batch: Result<Vec<Value>, u64> = {
                let inner = shared.inner.lock().unwrap();
                // Down: this watch's connection is being cut. A change made after going down
                // must not slip out on it before the cut lands (set_down marks down before it
                // returns, so a change made since is seen here with it).
                if *shared.down.borrow() {
                    return;
                }
                if let Some(oldest) = expired {
                    Err(oldest)
                } else {
                    let events = inner
                        .history
                        .iter()
                        .filter(|(rv, r, _, o)| {
                            *rv > sent
                                && *r == resource
                                && namespace.as_ref().is_none_or(|n| o["metadata"]["namespace"].as_str() == Some(n))
                                && selected(o, selector.as_ref())
                        })
                        .map(|(_, _, t, o)| json!({"type": t, "object": o}))
                        .collect();
                    sent = sent.max(inner.rv);
                    Ok(events)
                }
            };
            match batch {
                Err(oldest) => {
                    shared.inner.lock().unwrap().expired.push(resource.clone());
                    let message = format!("too old resource version: {from} ({oldest})");
                    let _ = tx
                        .send(line(json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": "Expired", "code": 410}})))
                        .await;
                    return;
                }
                Ok(events) => {
                    for event in events {
                        if tx.send(line(event)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                _ = bookmark_tick.tick(), if bookmarks => {
                    let bookmark = json!({"type": "BOOKMARK", "object": {"kind": list_kind(&resource).trim_end_matches("List"), "apiVersion": api_version_of(&resource), "metadata": {"resourceVersion": sent.to_string()}}});
                    if tx.send(line(bookmark)).await.is_err() {
                        return;
                    }
                }
                _ = &mut expires => return,
                _ = tx.closed() => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Body::Stream(rx))
        .expect("response")
}

enum Write {
    Create,
    Replace,
    Patch,
}

fn write(shared: &Shared, target: &Target, body: &[u8], how: Write) -> Response<Body> {
    let Ok(mut object) = serde_json::from_slice::<Value>(body) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "the body is not JSON");
    };
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut inner = shared.inner.lock().unwrap();
    let name = match &how {
        Write::Create => {
            let name = object["metadata"]["name"].as_str().map(str::to_owned).or_else(|| {
                let prefix = object["metadata"]["generateName"].as_str()?;
                Some(format!("{prefix}{}", inner.rv + 1))
            });
            let Some(name) = name else {
                return status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", "metadata.name: Required value");
            };
            if inner.objects.contains_key(&(target.resource.clone(), namespace.clone(), name.clone())) {
                return status(StatusCode::CONFLICT, "AlreadyExists", &format!("\"{name}\" already exists"));
            }
            object["metadata"]["name"] = json!(name);
            if !namespace.is_empty() {
                object["metadata"]["namespace"] = json!(namespace);
            }
            name
        }
        Write::Replace | Write::Patch => target.name.clone().expect("a name"),
    };
    let key = (target.resource.clone(), namespace, name.clone());
    let existing = inner.objects.get(&key).cloned();
    let event = match (&how, &existing) {
        (Write::Create, _) => "ADDED",
        (_, None) => return status(StatusCode::NOT_FOUND, "NotFound", &format!("\"{name}\" not found")),
        (Write::Replace, Some(current)) => {
            let given = object["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !given.is_empty() && Some(given) != current["metadata"]["resourceVersion"].as_str() {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest version and try again",
                );
            }
            if target.subresource.as_deref() == Some("status") {
                let mut whole = current.clone();
                whole["status"] = object["status"].take();
                object = whole;
            }
            "MODIFIED"
        }
        (Write::Patch, Some(current)) => {
            let mut whole = current.clone();
            if target.subresource.as_deref() == Some("status") {
                merge(&mut whole["status"], object["status"].take());
            } else {
                merge(&mut whole, object);
            }
            object = whole;
            "MODIFIED"
        }
    };
    let rv = store(&mut inner, key.clone(), object, event);
    let stored = inner.objects.get(&key).cloned();
    drop(inner);
    shared.head.send_replace(rv);
    respond(if matches!(how, Write::Create) { StatusCode::CREATED } else { StatusCode::OK }, &stored.unwrap_or_default())
}

/// JSON merge patch (RFC 7386): null removes, objects merge, everything else replaces.
fn merge(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = json!({});
            }
            let map = target.as_object_mut().expect("object");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(&k);
                } else {
                    merge(map.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other,
    }
}

/// The requests (as `KubeApi::requests` has them) that the ClusterRoles and Roles of an RBAC
/// manifest do not allow, each with why: how the tests hold deploy/rbac.yaml to what the agent
/// really does. Bindings are taken as given.
pub fn rbac_denials(requests: &[String], rbac_yaml: &str) -> Vec<String> {
    use serde::Deserialize as _;
    let roles: Vec<Value> = serde_yaml::Deserializer::from_str(rbac_yaml)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|d| matches!(d["kind"].as_str(), Some("ClusterRole" | "Role")))
        .collect();
    let strings = |v: &Value| -> Vec<String> { v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect() };
    let mut denied = Vec::new();
    for request in requests {
        let (method, uri) = request.split_once(' ').unwrap_or(("", ""));
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        let Some(target) = parse_path(path) else {
            denied.push(format!("{request}: not a resource path"));
            continue;
        };
        let mut parts = target.resource.split('/');
        let group = match parts.next() {
            Some("api") => String::new(),
            _ => parts.next().unwrap_or_default().to_owned(),
        };
        let plural = target.resource.rsplit('/').next().unwrap_or_default();
        let resource = match &target.subresource {
            Some(sub) => format!("{plural}/{sub}"),
            None => plural.to_owned(),
        };
        let verb = match (method, &target.name) {
            ("GET", Some(_)) => "get",
            ("GET", None) if query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1") => "watch",
            ("GET", None) => "list",
            ("POST", _) => "create",
            ("PUT", _) => "update",
            ("PATCH", _) => "patch",
            ("DELETE", _) => "delete",
            _ => "unknown",
        };
        let allowed = roles.iter().any(|role| {
            let scoped = role["kind"] == "Role";
            if scoped && target.namespace.as_deref() != role["metadata"]["namespace"].as_str() {
                return false;
            }
            role["rules"].as_array().into_iter().flatten().any(|rule| {
                let names = strings(&rule["resourceNames"]);
                let any = |list: Vec<String>, want: &str| list.iter().any(|x| x == want || x == "*");
                any(strings(&rule["apiGroups"]), &group)
                    && any(strings(&rule["resources"]), &resource)
                    && any(strings(&rule["verbs"]), verb)
                    && (names.is_empty() || target.name.as_ref().is_some_and(|n| names.contains(n)))
            })
        });
        if !allowed {
            denied.push(format!("{request}: `{verb}` on `{resource}` of group `{group}` is not granted"));
        }
    }
    denied.sort();
    denied.dedup();
    denied
}
