//! The L7 path, for the Services that need it. `router`: Gateway API HTTPRoute matching with
//! the spec's precedence, and weighted backend choice. (Capture, the HTTP proxy itself, retries
//! and endpoint balancing build on it.)
pub mod balancer;
pub mod outbound;
pub mod router;
