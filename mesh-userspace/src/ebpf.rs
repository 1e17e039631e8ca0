//! The kernel side as the agent sees it: loading, attaching and pinning the programs
//! (`loader`), the pinned service maps behind the `Datapath` trait (`maps`), the live-connection
//! table (`conn_table`), the connection records (`events`), what the attached programs cost (`programs`), and an in-memory
//! `Datapath` for tests (`fake`).
pub mod conn_table;
pub mod events;
pub mod fake;
pub mod image;
pub mod loader;
pub mod maps;
pub mod programs;

use self::image::{MapImage, Op};

/// Embedded kernel programs, built by build.rs.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("map {map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening pinned map {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    ConnTable(String),
}

/// Where service state lives: the pinned maps, or a fake in tests.
pub trait Datapath {
    fn apply(&mut self, op: &Op) -> Result<(), DatapathError>;
    fn read_image(&self) -> Result<MapImage, DatapathError>;
}

/// An error with every cause behind it, `a: b: c`: aya's errors put the errno in a source, and
/// a message without it hides why (permission? missing pin?).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
