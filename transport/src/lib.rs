//! Gossamer's node-to-node transport: QUIC with mutual TLS from the mesh CA.
//!
//! One [`Transport`] per agent binds one UDP port. Every peer gets at most one
//! cached connection, made on first use from either side. On it travel SWIM
//! datagrams (as QUIC datagrams, or on a uni stream when too big for the
//! path) and bidirectional streams for the catalog sync and proxied requests.
//! Both sides of every connection verify the peer's certificate against the
//! mesh CA; the node name in the certificate is what every inbound item is
//! attributed to ([`Inbound`]), so a peer cannot speak for another.
//!
//! # Layout
//! - [`clock`]: a cheap clock, to a few milliseconds, for per-request
//!   bookkeeping.
//! - [`pki`]: the mesh CA, node certificates, and loading a [`MeshIdentity`].
//! - [`revocation`]: CRLs from the mesh CA and the revoked serials in force.
//! - [`sign`]: signatures by operator certificates (configuration documents).
//! - [`tls`]: rustls client and server configuration.
//! - [`endpoint`]: the [`Transport`] and its connection cache.
//! - [`stream`]: stream halves that keep their connection open while held.
//! - [`frame`]: size-capped length-prefixed frames on streams.
//! - [`stats`]: counters for metrics.

pub mod clock;
pub mod endpoint;
pub mod frame;
pub mod pki;
pub mod revocation;
pub mod sign;
pub mod socket;
pub mod stats;
pub mod stream;
pub mod tls;

pub use crate::endpoint::{
    Inbound, LinkInfo, Receivers, Transport, TransportConfig, TransportError, UdpTotals,
};
pub use crate::pki::{MeshIdentity, PkiError};
pub use crate::stats::Stats;
pub use crate::stream::{RecvStream, SendStream};
