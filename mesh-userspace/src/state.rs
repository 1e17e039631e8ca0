//! Service state: Kubernetes objects as read from a source, validated, and turned into the
//! load-balanced services this node serves.
//!
//! `objects` holds the wire types (Service, EndpointSlice as Kubernetes writes them), `catalog`
//! validates a set of them as a whole, and `services` computes, for one node and zone, which
//! endpoints each Service port may use, following kube-proxy's rules.
pub mod catalog;
pub mod objects;
pub mod routes;
pub mod services;

pub use catalog::{Catalog, ConfigError};
pub use services::{
    Algorithm, BackendSpec, Family, LbService, LbServiceKey, NodeContext, Protocol, desired_services,
};
