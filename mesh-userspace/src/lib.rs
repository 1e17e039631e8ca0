//! mesh's node agent as a library, so integration tests and tools can drive its parts.
pub mod admin;
pub mod app;
pub mod authz;
pub mod check;
pub mod cli;
pub mod ebpf;
pub mod handoff;
pub mod host;
pub mod identity;
pub mod proxy;
pub mod server;
pub mod signer;
pub mod sources;
pub mod state;
pub mod sync;
pub mod telemetry;
pub mod tls;
