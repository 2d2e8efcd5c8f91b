//! Gateways: any agent can take traffic from outside the mesh.
//!
//! A gateway listener (`[ingress]` in the config, or `--ingress ADDR`)
//! terminates TLS with public certificates chosen by SNI, or serves plain
//! HTTP. Its routes come from the signed `ingress` documents, so every
//! gateway in the mesh serves the same routes with no server behind them.
//! A routed request then goes over the mesh as usual: the destination's
//! route document, retries, outlier ejection and authorization all apply.
//!
//! # Layout
//! - [`config`]: `[ingress]`, typed when the config file loads.
//! - [`table`]: the routes of every `ingress` document, host and path
//!   matching, path normalisation.
//! - [`limit`]: per-client and per-route token buckets.
//! - [`tls`]: certificates by SNI, reloaded when their files change.
//! - [`serve`]: the listeners and the edge of the request path.

pub mod config;
pub mod limit;
pub mod serve;
pub mod table;
pub mod tls;

pub use config::IngressConfig;
