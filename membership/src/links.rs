//! Which peer connections to keep open: the connection cache's policy,
//! shared by the agent (which closes real QUIC connections) and the
//! simulator (which charges a handshake for every connection it opens).
//!
//! SWIM talks to every member in turn, and gossip to random ones, so an
//! agent that kept every connection it ever made would hold one per member:
//! memory and keep-alive traffic growing with the cluster. Instead a
//! connection that carries no stream and has moved no datagram for
//! [`LinkPolicy::idle`] is closed, and above [`LinkPolicy::max_links`] the
//! least recently used idle ones go first. A connection with a stream in
//! flight (a proxied request, a sync) is never closed here. What an agent
//! holds is then set by how many distinct peers it talks to per idle period
//! (about two a second in a quiet mesh: the member it probes and the one
//! probing it), up to `max_links`; reconnecting costs a resumed TLS
//! handshake. The default idle period (300 s) is long enough that a quiet
//! agent of a few hundred keeps a connection to every member it probes: a
//! connection without streams costs about 5 KB and one keep-alive every
//! 30 s, far less than the handshake a 30 s period made nearly every probe
//! pay at 200 agents (docs/operations.md, "Sizing").

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A second connection to the same peer (both dialed at once) is closed
/// once it has been idle this long.
const DUPLICATE_IDLE: Duration = Duration::from_secs(2);

/// The connection cache's limits (`[peer_links]` in the agent's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkPolicy {
    /// Close a connection without streams after this long without traffic.
    #[serde(with = "crate::duration")]
    pub idle: Duration,
    /// Above this many connections, close idle ones (least recently used
    /// first) even before `idle`.
    pub max_links: usize,
}

impl Default for LinkPolicy {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(300),
            max_links: 256,
        }
    }
}

/// What the policy needs to know about one open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link<K> {
    /// The caller's handle for the connection.
    pub key: K,
    /// When a datagram or stream last moved on it (the caller's clock).
    pub last_active: Duration,
    /// Streams open on it now.
    pub streams: usize,
    /// Whether it is the connection new traffic to its peer uses (the
    /// other one of a pair dialed at once is not).
    pub primary: bool,
}

impl LinkPolicy {
    /// Checks values; returns `key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.idle < Duration::from_secs(1) {
            return Err("peer_links.idle: must be at least 1s".into());
        }
        if self.idle > Duration::from_secs(24 * 3600) {
            return Err("peer_links.idle: must be at most 24h".into());
        }
        if self.max_links == 0 {
            return Err("peer_links.max_links: must be at least 1".into());
        }
        Ok(())
    }

    /// Appends to `out` the keys of the connections to close now. `links`
    /// is reordered.
    pub fn to_close<K: Copy>(&self, now: Duration, links: &mut [Link<K>], out: &mut Vec<K>) {
        let idle = |l: &Link<K>| {
            let limit = if l.primary { self.idle } else { DUPLICATE_IDLE };
            l.streams == 0 && now.saturating_sub(l.last_active) >= limit
        };
        // Idle ones to the front, the rest (kept so far) behind them.
        links.sort_by_key(|l| (!idle(l), l.last_active));
        let closed = links.iter().take_while(|l| idle(l)).count();
        out.extend(links[..closed].iter().map(|l| l.key));
        let kept = &mut links[closed..];
        let Some(excess) = kept.len().checked_sub(self.max_links).filter(|&e| e > 0) else {
            return;
        };
        // Over the cap: the least recently used ones without streams go too
        // (they are already in order of last use).
        out.extend(
            kept.iter()
                .filter(|l| l.streams == 0)
                .take(excess)
                .map(|l| l.key),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(key: u32, last_active: u64, streams: usize) -> Link<u32> {
        Link {
            key,
            last_active: Duration::from_secs(last_active),
            streams,
            primary: true,
        }
    }

    fn close(policy: LinkPolicy, now: u64, mut links: Vec<Link<u32>>) -> Vec<u32> {
        let mut out = Vec::new();
        policy.to_close(Duration::from_secs(now), &mut links, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn idle_connections_close_busy_ones_stay() {
        let p = LinkPolicy {
            idle: Duration::from_secs(10),
            max_links: 100,
        };
        let links = vec![link(1, 0, 0), link(2, 6, 0), link(3, 0, 1), link(4, 15, 0)];
        assert_eq!(close(p, 15, links), vec![1]);
    }

    #[test]
    fn a_duplicate_closes_after_a_short_idle() {
        let p = LinkPolicy::default();
        let mut dup = link(2, 10, 0);
        dup.primary = false;
        assert_eq!(close(p, 11, vec![link(1, 10, 0), dup]), Vec::<u32>::new());
        assert_eq!(close(p, 12, vec![link(1, 10, 0), dup]), vec![2]);
    }

    #[test]
    fn over_the_cap_the_least_recently_used_idle_ones_go() {
        let p = LinkPolicy {
            idle: Duration::from_secs(60),
            max_links: 2,
        };
        // Four open, none idle for 60 s: two must go, the oldest without
        // streams (3 has a stream, so 1 and 2).
        let links = vec![link(1, 1, 0), link(2, 2, 0), link(3, 0, 2), link(4, 9, 0)];
        assert_eq!(close(p, 10, links), vec![1, 2]);
    }

    #[test]
    fn streams_are_never_cut_even_over_the_cap() {
        let p = LinkPolicy {
            idle: Duration::from_secs(1),
            max_links: 1,
        };
        let links = vec![link(1, 0, 1), link(2, 0, 1), link(3, 0, 0)];
        assert_eq!(close(p, 10, links), vec![3]);
    }
}
