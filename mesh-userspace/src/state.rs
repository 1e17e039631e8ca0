//! The state store and what it is made of. Sources deliver typed objects; `validate` turns each
//! into its compact `model` form (`routes` for HTTPRoute/GRPCRoute); `store` indexes them per
//! Service, computes with `services` (kube-proxy's endpoint rules) what each Service port
//! balances over on this node, keeps the security `policy` objects, and publishes immutable
//! snapshots to the consumers.
#![forbid(unsafe_code)]
pub mod model;
pub mod policy;
pub mod routes;
pub mod services;
pub mod store;
pub mod validate;

pub use model::{Algorithm, Family, NodeContext, ObjectKey, Protocol};
pub use services::{BackendSpec, LbService, LbServiceKey};
pub use store::{Applied, ServiceView, Snapshot, Store};
