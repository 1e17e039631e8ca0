//! What every layer of the proxy shares: the body type, a plain reply, and what happened to a
//! request (for its metric labels).
use std::{convert::Infallible, net::SocketAddr};

use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode, body::Bytes};

pub use super::connect::Body;
use crate::state::ObjectKey;

/// What happened to a request, for its metric labels.
pub struct Outcome {
    pub backend: Option<ObjectKey>,
    pub endpoint: Option<SocketAddr>,
    pub flags: &'static str,
}

pub fn reply(status: StatusCode, text: &str) -> Response<Body> {
    let body = Full::new(Bytes::from(text.to_owned())).map_err(|never: Infallible| match never {}).boxed();
    Response::builder().status(status).body(body).expect("static response parts are valid")
}

/// Istio's `destination_service` of a Service: `name.namespace.svc.cluster.local`.
pub fn fqdn(service: &ObjectKey) -> String {
    crate::telemetry::identity::service_fqdn(Some(service))
}
