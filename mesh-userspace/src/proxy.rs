//! The L7 path, for the Services that need it, in layers as linkerd2-proxy and ztunnel have
//! them, each a file:
//!
//! 1. `outbound`: the listener (15001) and the original destination (`OrigDst`: the kernel's
//!    record in production, a fake in tests); per-Service state carried across snapshots.
//! 2. `router` + `filters`: Gateway API route matching with the spec's precedence, weighted
//!    backend choice, header edits, rewrites, redirects, trace context.
//! 3. `authorize`: the endpoints' AuthorizationPolicies, with the request's method, path and
//!    host (403); `admission`: the called Service's local rate limit, the backend Service's
//!    circuit breaker; `retry`: deadlines (route timeouts, grpc-timeout), retries on another
//!    endpoint, budgets.
//! 4. `balancer`: P2C over peak-EWMA latency, outlier ejection.
//! 5. `connect`: connections to endpoints behind a `Connector` (plain TCP; an mTLS HBONE tunnel
//!    is another one), pooled.
//!
//! `hbone` (the HBONE tunnels and the inbound side on 15008, where the destination agent
//! decides on each stream) and `tunnel` (the tunnel listener for the kernel's redirected
//! connections) go beside `outbound`.
#![forbid(unsafe_code)]
pub mod admission;
pub mod authorize;
pub mod balancer;
pub mod connect;
pub mod filters;
pub mod hbone;
pub mod http;
pub mod outbound;
pub mod retry;
pub mod router;
pub mod tunnel;
