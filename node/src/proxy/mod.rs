//! The data plane: local applications call services through the agent's
//! outbound listener; the agent picks an instance by consistent hashing and
//! calls it directly (local) or over a QUIC stream to its node (remote),
//! with timeouts, retries within a budget, outlier ejection and failover.
//!
//! # Layout
//! - [`dispatch`]: [`Proxy`] and the request path (pick, call local or
//!   remote, retry, fail over); the only `impl Proxy`.
//! - [`outbound`]: the listener for local apps, feeding the request path.
//! - [`inbound`]: serving proxy streams from other nodes.
//! - [`external`]: egress to APIs outside the mesh (`external` documents).
//! - [`tcp`]: TCP services: upstream listeners' connections as bytes on
//!   QUIC streams.
//! - [`config`]: `[proxy]`, typed when the config file loads.
//! - [`routes`]: the routing table built from the catalog, hash policies.
//! - [`policy`]: route documents compiled: rules, sticky splits, faults.
//! - [`authz`]: authz documents compiled: who may call a service.
//! - [`hop`]: hop-by-hop headers, HTTP versions and the hop count.
//! - [`upgrade`]: recognising and bridging HTTP upgrades (WebSocket).
//! - [`error`]: answers the mesh makes itself and how they are marked.
//! - [`wire`]: the proxy protocol on QUIC streams.
//! - [`body`]: streaming bodies between HTTP and QUIC.
//! - `pool`: connections to this node's HTTP/1.1 instances.
//! - `h1`: HTTP/1.1 on those connections, spoken by the request's task.
//! - [`outlier`]: ejection and the retry budget.
//! - [`metrics`]: per service and instance metrics.

pub mod authz;
pub mod body;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod external;
mod h1;
pub mod hop;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod outlier;
pub mod policy;
mod pool;
pub mod routes;
pub mod tcp;
pub mod upgrade;
pub mod wire;

pub use config::{ProxyConfig, ServiceOverride};
pub use dispatch::Proxy;
