//! Observability beyond the Prometheus counters.
//!
//! - [`access`]: one JSON access-log line per request or TCP connection.

pub mod access;
