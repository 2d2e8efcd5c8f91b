//! Observability beyond the Prometheus counters.
//!
//! - [`access`]: one JSON access-log line per request or TCP connection.
//! - [`tap`]: the live stream of requests (`GET /v1/tap`).

pub mod access;
pub mod tap;
