//! Reads `--config PATH` (a YAML file, or every *.yaml/*.yml/*.json file of a directory) and
//! watches it. Directories may be ConfigMap mounts, whose files are symlinks swapped atomically
//! through a hidden `..data` directory, so the whole directory is watched, not single files.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::state::{Catalog, ConfigError, catalog::ConfigErrors};

/// Reads the sources under `path`, in name order.
pub fn read_sources(path: &Path) -> Result<Vec<(PathBuf, String)>, ConfigErrors> {
    let io_error = |file: &Path, e: std::io::Error| {
        ConfigErrors(vec![ConfigError {
            file: file.to_owned(),
            object: String::new(),
            field: String::new(),
            message: format!("cannot read: {e}"),
        }])
    };
    let meta = fs::metadata(path).map_err(|e| io_error(path, e))?;
    let files = if meta.is_dir() {
        let mut files = Vec::new();
        for entry in fs::read_dir(path).map_err(|e| io_error(path, e))? {
            let entry = entry.map_err(|e| io_error(path, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let wanted = !name.starts_with('.')
                && (name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json"));
            if wanted && entry.path().is_file() {
                files.push(entry.path());
            }
        }
        files.sort();
        files
    } else {
        vec![path.to_owned()]
    };
    files
        .into_iter()
        .map(|f| fs::read_to_string(&f).map(|text| (f.clone(), text)).map_err(|e| io_error(&f, e)))
        .collect()
}

/// Reads and validates everything under `path` as one catalog.
pub fn load_catalog(path: &Path) -> Result<Catalog, ConfigErrors> {
    let sources = read_sources(path)?;
    Catalog::from_sources(sources.iter().map(|(p, t)| (p.as_path(), t.as_str())))
}

/// Sends `()` whenever something under `path` may have changed, coalescing bursts (an editor's
/// write-rename-chmod) into one notification. Dropping the returned watcher stops it.
pub fn watch(path: &Path, debounce: Duration) -> notify::Result<(notify::RecommendedWatcher, mpsc::Receiver<()>)> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Our own reads raise access events; only changes matter.
        if let Ok(event) = event
            && !matches!(event.kind, notify::EventKind::Access(_))
        {
            let _ = raw_tx.send(());
        }
    })?;
    // Watch the directory holding a file: editors and ConfigMaps replace files by rename,
    // which a watch on the file itself would lose.
    let dir = if path.is_dir() { path.to_owned() } else { path.parent().map(Path::to_owned).unwrap_or_else(|| ".".into()) };
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            tokio::time::sleep(debounce).await;
            while raw_rx.try_recv().is_ok() {}
            if tx.send(()).await.is_err() {
                break;
            }
        }
    });
    Ok((watcher, rx))
}
