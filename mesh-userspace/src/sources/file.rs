//! `--config PATH`: a YAML file, or every *.yaml/*.yml/*.json file of a directory, watched.
//!
//! Each file is parsed into typed objects and diffed against what the store accepted from it
//! last; only the difference goes out, as one all-or-nothing batch per file. Only files that
//! changed are read again (the watch names them), so one edit costs one file.
//!
//! Files are written in ways that look, for a moment, like deletions: a truncating writer
//! leaves an empty file, a slow one half a file. So:
//! - an empty file keeps its objects until it has content again or is deleted (deleting the
//!   file is how its objects go);
//! - additions and changes apply at once, but removing objects from a file that still exists
//!   waits until the file has been quiet for `quiet` and reads the same twice.
//!
//! The watch covers the directory holding the config path too, so a config directory deleted
//! and re-created, a re-pointed symlink or a ConfigMap's `..data` swap is seen and re-read.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    hash::{Hash as _, Hasher as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize as _;
use tokio::{sync::Notify, time::Instant};

use super::{Change, ConfigError, ConfigErrors, Kind, Object, Origin, Source, Update};

type ObjectId = (Kind, String, String);

/// Parses one file's text into typed objects. Kinds other than those mesh reads are skipped:
/// standalone YAML often holds the Deployments too.
pub fn parse(file: &Path, text: &str) -> Result<Vec<Object>, ConfigErrors> {
    Ok(parse_hashed(file, text, &BTreeMap::new())?.into_iter().filter_map(|p| p.object).collect())
}

/// One document of a file.
struct Parsed {
    id: ObjectId,
    /// Of the document: what the source keeps to tell a changed object from an unchanged one
    /// without keeping the object itself.
    hash: u64,
    /// None when `known` had this object with this hash: unchanged, not converted again.
    object: Option<Object>,
}

/// `parse`, with hashes; objects whose document hash is in `known` are not converted again (a
/// change of one object in a big file converts one object).
fn parse_hashed(file: &Path, text: &str, known: &BTreeMap<ObjectId, u64>) -> Result<Vec<Parsed>, ConfigErrors> {
    let mut ctx = Parse { origin: Origin::File(file.into()), known, objects: Vec::new(), errors: Vec::new() };
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let object = format!("document {}", index + 1);
        match serde_yaml::Value::deserialize(doc) {
            Ok(value) => ctx.document(value, object),
            Err(e) => {
                ctx.error(object, "", format!("not valid YAML: {e}"));
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        }
    }
    if ctx.errors.is_empty() { Ok(ctx.objects) } else { Err(ConfigErrors(ctx.errors)) }
}

struct Parse<'a> {
    origin: Origin,
    known: &'a BTreeMap<ObjectId, u64>,
    objects: Vec<Parsed>,
    errors: Vec<ConfigError>,
}

impl Parse<'_> {
    fn error(&mut self, object: String, field: &str, message: String) {
        self.errors.push(ConfigError { origin: self.origin.clone(), object, field: field.to_owned(), message });
    }

    fn document(&mut self, mut value: serde_yaml::Value, object: String) {
        if value.is_null() {
            return; // an empty document, e.g. after a trailing `---`
        }
        let text = |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let (Some(api_version), Some(kind)) = (text(&value, "apiVersion"), text(&value, "kind")) else {
            return self.error(object, "", "every object needs apiVersion and kind".into());
        };
        // Name the object as soon as its metadata says who it is.
        let meta = value.get("metadata");
        let name = meta.and_then(|m| text(m, "name")).unwrap_or_default();
        let namespace = meta.and_then(|m| text(m, "namespace")).filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
        let named = if name.is_empty() { object.clone() } else { format!("{kind} {namespace}/{name}") };
        let id = |k: Kind| (k, namespace.clone(), name.clone());
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "Service") => self.typed(value, id(Kind::Service), named, |o| Object::Service(Arc::new(o))),
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                self.typed(value, id(Kind::EndpointSlice), named, |o| Object::EndpointSlice(Arc::new(o)))
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
                // v1beta1 is field-compatible; the generated type accepts v1 only.
                set_api_version(&mut value, "gateway.networking.k8s.io/v1");
                self.typed(value, id(Kind::HttpRoute), named, |o| Object::HttpRoute(Arc::new(o)))
            }
            ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1alpha2", "GRPCRoute") => {
                set_api_version(&mut value, "gateway.networking.k8s.io/v1");
                self.typed(value, id(Kind::GrpcRoute), named, |o| Object::GrpcRoute(Arc::new(o)))
            }
            ("v1", "Pod") => self.typed(value, id(Kind::Pod), named, |o| Object::Pod(Arc::new(o))),
            ("v1", "Namespace") => self.typed(value, id(Kind::Namespace), named, |o| Object::Namespace(Arc::new(o))),
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                self.typed(value, id(Kind::AuthorizationPolicy), named, |o| Object::AuthorizationPolicy(Arc::new(o)))
            }
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "PeerAuthentication") => {
                self.typed(value, id(Kind::PeerAuthentication), named, |o| Object::PeerAuthentication(Arc::new(o)))
            }
            (
                _,
                "List"
                | "ServiceList"
                | "EndpointSliceList"
                | "HTTPRouteList"
                | "GRPCRouteList"
                | "PodList"
                | "NamespaceList"
                | "AuthorizationPolicyList"
                | "PeerAuthenticationList",
            ) => {
                // `kubectl get -o yaml` wraps objects in a List.
                let items = value.get("items").and_then(|v| v.as_sequence()).cloned().unwrap_or_default();
                for (i, item) in items.into_iter().enumerate() {
                    self.document(item, format!("{object} items[{i}]"));
                }
            }
            (_, "Service" | "EndpointSlice" | "AuthorizationPolicy" | "PeerAuthentication") => {
                let want = match kind.as_str() {
                    "Service" => "v1",
                    "EndpointSlice" => "discovery.k8s.io/v1",
                    _ => "security.istio.io/v1",
                };
                self.error(named, "apiVersion", format!("{kind} must be {want}, got {api_version:?}"));
            }
            _ => tracing::debug!(origin = %self.origin, %kind, "skipping object of a kind mesh does not use"),
        }
    }

    /// Deserializes a document as `T`, naming the field of a type error.
    fn typed<T: serde::de::DeserializeOwned>(
        &mut self,
        value: serde_yaml::Value,
        id: ObjectId,
        named: String,
        wrap: impl FnOnce(T) -> Object,
    ) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut hasher);
        let hash = hasher.finish();
        if !id.2.is_empty() && self.objects.iter().any(|p| p.id == id) {
            return self.error(named, "metadata.name", "defined twice in this file".into());
        }
        if !id.2.is_empty() && self.known.get(&id) == Some(&hash) {
            self.objects.push(Parsed { id, hash, object: None });
            return;
        }
        match serde_path_to_error::deserialize::<_, T>(value) {
            Ok(v) => self.objects.push(Parsed { id, hash, object: Some(wrap(v)) }),
            Err(e) => {
                let field = e.path().to_string();
                let field = if field == "." { String::new() } else { field };
                self.error(named, &field, e.into_inner().to_string());
            }
        }
    }
}

fn set_api_version(value: &mut serde_yaml::Value, version: &str) {
    if let Some(map) = value.as_mapping_mut() {
        map.insert("apiVersion".into(), version.into());
    }
}

/// The files `path` stands for, in name order.
pub fn list_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !fs::metadata(path)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in fs::read_dir(path)? {
        let entry = entry?;
        if is_config_file(&entry.path()) && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

fn is_config_file(path: &Path) -> bool {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy()) else { return false };
    !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"))
}

/// Every object under `path`, parsed (for `mesh config validate`).
pub fn load(path: &Path) -> Result<Vec<(PathBuf, Vec<Object>)>, ConfigErrors> {
    let files = list_files(path).map_err(|e| unreadable(path, &e))?;
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        match fs::read_to_string(&file).map_err(|e| unreadable(&file, &e)).and_then(|text| parse(&file, &text)) {
            Ok(objects) => out.push((file, objects)),
            Err(mut e) => errors.append(&mut e.0),
        }
    }
    if errors.is_empty() { Ok(out) } else { Err(ConfigErrors(errors)) }
}

fn unreadable(file: &Path, e: &std::io::Error) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        origin: Origin::File(file.into()),
        object: String::new(),
        field: String::new(),
        message: format!("cannot read: {e}"),
    }])
}

fn hash_text(text: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// What the watch saw since it was last asked.
#[derive(Default)]
struct Seen {
    files: BTreeSet<PathBuf>,
    /// Something at or above the config path changed: list and compare every file.
    everything: bool,
}

/// What the store holds from one file: its objects by a hash of their document (the objects
/// themselves live in the store, compacted).
#[derive(Default)]
struct FileState {
    objects: BTreeMap<ObjectId, u64>,
    /// Hash of the text last handled (applied or rejected), to skip events that changed nothing.
    handled: Option<u64>,
    /// The store refused its last batch (retried after any other file's batch is accepted).
    rejected: bool,
    /// It could not be read or parsed (looked at again when it changes).
    broken: bool,
}

/// A batch handed out and not yet acknowledged: what the file holds once it is accepted.
struct InFlight {
    file: PathBuf,
    hash: u64,
    objects: BTreeMap<ObjectId, u64>,
}

pub struct FileSource {
    path: PathBuf,
    quiet: Duration,
    files: BTreeMap<PathBuf, FileState>,
    seen: Arc<Mutex<Seen>>,
    wake: Arc<Notify>,
    watcher: notify::RecommendedWatcher,
    /// The directory currently watched as the config directory (re-watched when replaced).
    watched_dir: Option<PathBuf>,
    /// Where a `--config` file symlink points, and the directory watched for it.
    target: Arc<Mutex<Option<PathBuf>>>,
    watched_target_dir: Option<PathBuf>,
    /// Files to look at, in order.
    queue: BTreeSet<PathBuf>,
    /// Removals waiting for the file to stay the same: file -> (hash of the text, when).
    removals: HashMap<PathBuf, (u64, Instant)>,
    in_flight: Option<InFlight>,
    /// The first pass over every file has been delivered.
    synced: bool,
    /// Files read so far (shared with whoever reports it).
    reads: Arc<std::sync::atomic::AtomicU64>,
}

impl FileSource {
    /// Watches `path`; nothing is read until the first `next()`.
    pub fn new(path: &Path, quiet: Duration) -> notify::Result<Self> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let wake = Arc::new(Notify::new());
        let config = path.to_owned();
        let target: Arc<Mutex<Option<PathBuf>>> = Arc::default();
        let (seen_cb, wake_cb, target_cb) = (seen.clone(), wake.clone(), target.clone());
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else {
                // Lost events (queue overflow): look at everything.
                seen_cb.lock().expect("watch lock").everything = true;
                wake_cb.notify_one();
                return;
            };
            // A file is read once its writer is done with it (closed after writing, renamed
            // into place, removed), not at every write: a file is not read half-written. Our
            // own reads raise access events, which do not count either.
            use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind};
            let settled = match event.kind {
                notify::EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
                notify::EventKind::Access(_) => false,
                notify::EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Metadata(_)) => false,
                // A new file is read once written and closed; a new symlink (a ConfigMap key
                // added) has nothing more coming.
                notify::EventKind::Create(CreateKind::File) => event.paths.iter().any(|p| p.is_symlink()),
                _ => true,
            };
            let mut seen = seen_cb.lock().expect("watch lock");
            let config_is_dir = config.is_dir();
            for p in &event.paths {
                if config_is_dir && p.parent() == Some(config.as_path()) {
                    if !settled {
                        continue;
                    }
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    if is_config_file(p) {
                        seen.files.insert(p.clone());
                    } else if name.starts_with("..") {
                        // A ConfigMap volume swapped its `..data` link: every file changed.
                        seen.everything = true;
                    }
                    // Other names (an editor's or a writer's temporary file) are followed by
                    // an event of the file they become.
                } else if *p == config {
                    // The directory or the file replaced or re-pointed, or the file written.
                    // (Not an access: listing the directory opens it, and must not start a
                    // rescan.) Looking at everything re-watches what the path now points to.
                    if settled {
                        seen.everything = true;
                    }
                } else if settled && target_cb.lock().expect("target lock").as_deref() == Some(p.as_path()) {
                    // The file a `--config` symlink points to, in a directory of its own.
                    seen.files.insert(config.clone());
                }
                // Anything else is a sibling of the config path (an editor's temporary file).
            }
            if event.need_rescan() {
                seen.everything = true;
            }
            drop(seen);
            wake_cb.notify_one();
        })?;
        watcher.watch(&watch_parent(path), RecursiveMode::NonRecursive)?;
        let mut source = Self {
            path: path.to_owned(),
            quiet,
            files: BTreeMap::new(),
            seen,
            wake,
            watcher,
            watched_dir: None,
            target,
            watched_target_dir: None,
            queue: BTreeSet::new(),
            removals: HashMap::new(),
            in_flight: None,
            synced: false,
            reads: Arc::default(),
        };
        source.queue_everything();
        Ok(source)
    }

    /// How many files have been read, as it grows.
    pub fn reads(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.reads.clone()
    }

    /// Watches the config directory, again if it was replaced.
    fn rewatch(&mut self) {
        if let Some(old) = self.watched_dir.take() {
            let _ = self.watcher.unwatch(&old);
        }
        if self.path.is_dir() {
            match self.watcher.watch(&self.path, RecursiveMode::NonRecursive) {
                Ok(()) => self.watched_dir = Some(self.path.clone()),
                Err(e) => tracing::warn!(path = %self.path.display(), "cannot watch the config directory: {e}"),
            }
        }
        // A file symlink: its target may live elsewhere, and be edited there.
        let target = (self.path.is_symlink() && self.path.is_file()).then(|| fs::canonicalize(&self.path).ok()).flatten();
        let target_dir = target.as_deref().and_then(Path::parent).map(Path::to_owned).filter(|d| *d != watch_parent(&self.path));
        if target_dir != self.watched_target_dir {
            if let Some(old) = self.watched_target_dir.take() {
                let _ = self.watcher.unwatch(&old);
            }
            if let Some(dir) = &target_dir {
                match self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                    Ok(()) => self.watched_target_dir = Some(dir.clone()),
                    Err(e) => tracing::warn!(path = %dir.display(), "cannot watch the directory of the config file's target: {e}"),
                }
            }
        }
        *self.target.lock().expect("target lock") = target;
    }

    /// Queues every file there is now and every file the store holds objects of.
    fn queue_everything(&mut self) {
        self.rewatch();
        match list_files(&self.path) {
            Ok(files) => self.queue.extend(files),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), "config path is gone; its objects are removed");
            }
            Err(e) => tracing::warn!(path = %self.path.display(), "cannot list the config path: {e}"),
        }
        self.queue.extend(self.files.keys().cloned());
    }

    /// Looks at one file; an update when the store must hear of it.
    fn look_at(&mut self, file: &Path, now: Instant) -> Option<Update> {
        let origin = Origin::File(file.into());
        let state = self.files.entry(file.to_owned()).or_default();
        self.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let text = match fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Deleted: its objects go.
                self.removals.remove(file);
                if state.objects.is_empty() && !state.rejected && !state.broken {
                    self.files.remove(file);
                    return None;
                }
                let changes = state.objects.keys().map(|id| delete(&origin, id)).collect();
                self.in_flight = Some(InFlight { file: file.to_owned(), hash: 0, objects: BTreeMap::new() });
                return Some(Update::Batch { origin, changes });
            }
            Err(e) => {
                state.broken = true;
                state.handled = None;
                return Some(Update::Unreadable { origin, errors: unreadable(file, &e) });
            }
        };
        let hash = hash_text(&text);
        let removal_due = self.removals.get(file).is_some_and(|(h, at)| *h == hash && *at <= now);
        if state.handled == Some(hash) && !removal_due {
            return None;
        }
        if text.trim().is_empty() && !state.objects.is_empty() {
            tracing::warn!(
                file = %file.display(),
                objects = state.objects.len(),
                "file is empty; its objects keep serving until it has content or is deleted"
            );
            state.handled = Some(hash);
            return None;
        }
        let parsed = match parse_hashed(file, &text, &state.objects) {
            Ok(parsed) => parsed,
            Err(errors) => {
                state.handled = Some(hash);
                state.broken = true;
                return Some(Update::Unreadable { origin, errors });
            }
        };
        // New and changed objects go to the store (unchanged ones were not even converted).
        let mut changes: Vec<Change> = Vec::new();
        let mut objects: BTreeMap<ObjectId, u64> = BTreeMap::new();
        for parsed in parsed {
            if let Some(object) = parsed.object {
                changes.push(Change::Upsert { origin: origin.clone(), object });
            }
            objects.insert(parsed.id, parsed.hash);
        }
        let removed: Vec<ObjectId> = state.objects.keys().filter(|id| !objects.contains_key(*id)).cloned().collect();
        if removed.is_empty() {
            if self.removals.remove(file).is_some() {
                tracing::info!(file = %file.display(), "the objects are back in the file; nothing is removed");
            }
        } else if removal_due {
            self.removals.remove(file);
            changes.extend(removed.iter().map(|id| delete(&origin, id)));
        } else {
            // Not yet: they keep serving until the file has been quiet and reads the same.
            if self.removals.get(file).is_none_or(|(h, _)| *h != hash) {
                tracing::info!(file = %file.display(), objects = removed.len(), "objects removed from the file; applying once it stays the same");
                self.removals.insert(file.to_owned(), (hash, now + self.quiet));
            }
            for id in removed {
                let kept = state.objects[&id];
                objects.insert(id, kept);
            }
        }
        if changes.is_empty() && !state.rejected && !state.broken {
            state.handled = Some(hash);
            return None;
        }
        self.in_flight = Some(InFlight { file: file.to_owned(), hash, objects });
        Some(Update::Batch { origin, changes })
    }
}

fn delete(origin: &Origin, (kind, namespace, name): &ObjectId) -> Change {
    Change::Delete { origin: origin.clone(), kind: *kind, namespace: namespace.clone(), name: name.clone() }
}

/// The directory whose entries include the config path itself.
fn watch_parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Events of one act (a rename is two) are taken together.
const DEBOUNCE: Duration = Duration::from_millis(1);

impl Source for FileSource {
    async fn next(&mut self) -> Option<Update> {
        assert!(self.in_flight.is_none(), "ack() the previous batch first");
        loop {
            while let Some(file) = self.queue.pop_first() {
                if let Some(update) = self.look_at(&file, Instant::now()) {
                    return Some(update);
                }
            }
            if !self.synced {
                self.synced = true;
                return Some(Update::Synced);
            }
            let now = Instant::now();
            let due: Vec<PathBuf> = self.removals.iter().filter(|(_, (_, at))| *at <= now).map(|(f, _)| f.clone()).collect();
            if !due.is_empty() {
                self.queue.extend(due);
                continue;
            }
            let next_removal = self.removals.values().map(|(_, at)| *at).min();
            let removal_timer = async {
                match next_removal {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = self.wake.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                    let seen = std::mem::take(&mut *self.seen.lock().expect("watch lock"));
                    if seen.everything {
                        self.queue_everything();
                    }
                    self.queue.extend(seen.files);
                }
                () = removal_timer => {}
            }
        }
    }

    fn ack(&mut self, accepted: bool) {
        let Some(done) = self.in_flight.take() else { return };
        let state = self.files.entry(done.file.clone()).or_default();
        state.handled = Some(done.hash);
        state.broken = false;
        if !accepted {
            state.rejected = true;
            return;
        }
        state.rejected = false;
        state.objects = done.objects;
        if state.objects.is_empty() && !done.file.exists() {
            self.files.remove(&done.file);
        }
        // An accepted change may resolve another file's rejection (an object that moved from
        // one file to another): look at those again.
        for (file, state) in self.files.iter_mut().filter(|(_, s)| s.rejected) {
            state.handled = None;
            self.queue.insert(file.clone());
        }
    }
}
