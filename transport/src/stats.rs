//! Transport counters, read by the agent's `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters of one transport.
#[derive(Debug, Default)]
pub struct Stats {
    /// Datagrams received (including those carried on uni streams).
    pub datagrams_in: AtomicU64,
    /// Datagrams sent.
    pub datagrams_out: AtomicU64,
    /// Datagram payload bytes received.
    pub bytes_in: AtomicU64,
    /// Datagram payload bytes sent.
    pub bytes_out: AtomicU64,
    /// Handshakes completed on connections we dialed.
    pub handshakes_out: AtomicU64,
    /// Handshakes completed on connections peers dialed.
    pub handshakes_in: AtomicU64,
    /// Inbound handshakes that resumed an earlier TLS session (no
    /// certificate signatures to make or check).
    pub resumed: Arc<AtomicU64>,
    /// Connections the cache closed as idle.
    pub idle_closed: AtomicU64,
    /// Keep-alives sent on connections whose only traffic was a quiet
    /// stream.
    pub keep_alives: AtomicU64,
    /// Handshakes that failed (wrong CA, bad certificate, timeout, ...).
    pub handshake_failures: AtomicU64,
    /// Connections refused after the handshake: another trust domain, or a
    /// certificate for another node than the one dialed.
    pub identity_rejections: AtomicU64,
    /// Certificates put in use by [`crate::Transport::reload_identity`].
    pub cert_reloads: AtomicU64,
    /// Connections closed because the peer's certificate was revoked.
    pub revocation_cutoffs: AtomicU64,
    /// Inbound datagrams dropped because the agent was not keeping up.
    pub inbound_dropped: AtomicU64,
    /// Datagrams or streams dropped by fault injection.
    pub fault_drops: AtomicU64,
    /// Outbound datagrams dropped (no connection could be made, queue full).
    pub outbound_dropped: AtomicU64,
    /// UDP bytes received on connections that have since closed.
    pub(crate) udp_in_closed: AtomicU64,
    /// UDP bytes sent on connections that have since closed.
    pub(crate) udp_out_closed: AtomicU64,
    /// UDP datagrams received on connections that have since closed.
    pub(crate) datagrams_in_closed: AtomicU64,
    /// UDP datagrams sent on connections that have since closed.
    pub(crate) datagrams_out_closed: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
