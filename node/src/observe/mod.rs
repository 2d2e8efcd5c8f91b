//! Observability beyond the Prometheus counters.
//!
//! - [`access`]: one JSON access-log line per request or TCP connection.
//! - [`tap`]: the live stream of requests (`GET /v1/tap`).
//! - [`trace`]: W3C trace context and OTLP span export.
//! - [`stats`]: golden signals over a window (`gossamer stat`, `top`).

pub mod access;
pub mod stats;
pub mod tap;
pub mod trace;
