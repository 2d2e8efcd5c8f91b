//! Catalog replication bookkeeping: which entry versions this node holds,
//! which it still wants, which fetches are under way, when to compare
//! digests, and when to forget a node that stays down.
//!
//! Entries themselves live with the caller (the agent's catalog, the
//! simulator's version table); this module only decides what to fetch from
//! whom. Entries are only ever fetched from their owner, so a version here
//! is what the owner itself said.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Catalog timing (`[catalog]` in the agent's config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicaConfig {
    /// How often to compare digests with a random peer (and retry fetches
    /// that failed).
    #[serde(with = "crate::duration")]
    pub anti_entropy_interval: Duration,
    /// How long entries of down or departed nodes are kept (shown
    /// `unavailable`) before they are dropped.
    #[serde(with = "crate::duration")]
    pub purge_after: Duration,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            anti_entropy_interval: Duration::from_secs(5),
            purge_after: Duration::from_secs(15 * 60),
        }
    }
}

/// Catalog fetches one node runs at once; the rest wait for a free slot.
/// A node that joins a mesh of n wants n entries, each from its owner: all
/// at once, they would queue up as n handshakes in front of the SWIM
/// probes that need a connection too, and a probe that waits that long
/// fails. The transport's own limit on concurrent dials is 8, so half of
/// it always stays free for membership traffic.
pub const FETCHES_AT_ONCE: usize = 4;

/// How long a member waits, at most, for a newer member it has just heard
/// of to make contact before it dials that member for its entry (it waits
/// a random 1/2 to 1 of this).
///
/// When a node joins a mesh of n, every member hears of it within about a
/// second and wants its entry, while the newcomer wants theirs. If every
/// member dialed the newcomer at once, the newcomer would take n inbound
/// handshakes in that second on top of its own n outbound ones, with its
/// probe answers queued behind them: on a busy machine that is how a
/// newcomer gets declared down. Instead the older side of each pair
/// waits: the newcomer fetches from each member in turn (a few at a time),
/// and the member it fetches from takes that contact as its cue and
/// fetches back over the same connection. Only a member the newcomer has
/// not reached by the deadline dials, and those dials are spread over the
/// second half of the window. One handshake per pair instead of two, and
/// no burst at the newcomer.
pub const NEWER_MEMBER_WAIT: Duration = Duration::from_secs(4);

/// `(owner, version)` for every entry a node holds, sorted by owner.
pub type Digest = Vec<(String, u64)>;

/// What the replica wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaAction {
    /// Fetch `node`'s entry from `node` itself.
    Fetch {
        /// The owner.
        node: String,
        /// Where it is.
        addr: SocketAddr,
    },
    /// Swap digests with `peer`.
    Digest {
        /// The peer.
        peer: String,
        /// Where it is.
        addr: SocketAddr,
        /// Ours.
        digest: Digest,
    },
    /// Drop `node`'s entry: it has been down for `purge_after`.
    Purge {
        /// The owner.
        node: String,
    },
}

/// One node's replication state.
#[derive(Debug)]
pub struct Replica {
    local: String,
    config: ReplicaConfig,
    local_version: u64,
    held: HashMap<String, u64>,
    wanted: HashMap<String, u64>,
    fetching: HashSet<String>,
    /// Wanted entries of newer members whose contact this node waits for
    /// (see [`NEWER_MEMBER_WAIT`]), with the deadline after which it dials.
    waiting: HashMap<String, Duration>,
    /// Peers not known as members yet that opened a stream to this node,
    /// and when: a newcomer's fetch can arrive before the gossip of its
    /// join, and then there is no need to wait for it (see
    /// [`Replica::contact`]). Forgotten after [`NEWER_MEMBER_WAIT`].
    met: HashMap<String, Duration>,
    /// Active members: generation and address.
    active: BTreeMap<String, (u64, SocketAddr)>,
    down_since: HashMap<String, Duration>,
}

impl Replica {
    /// The state of `local`, holding nothing yet.
    pub fn new(local: String, config: ReplicaConfig) -> Self {
        Self {
            local,
            config,
            local_version: 0,
            held: HashMap::new(),
            wanted: HashMap::new(),
            fetching: HashSet::new(),
            waiting: HashMap::new(),
            met: HashMap::new(),
            active: BTreeMap::new(),
            down_since: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Our own entry is now at `version`.
    pub fn set_local_version(&mut self, version: u64) {
        self.local_version = self.local_version.max(version);
    }

    /// The version of this node's own entry (0 before the first).
    pub fn local_version(&self) -> u64 {
        self.local_version
    }

    /// What this node holds, its own entry included.
    pub fn digest(&self) -> Digest {
        let mut d: Digest = self
            .held
            .iter()
            .map(|(n, v)| (n.clone(), *v))
            .chain(std::iter::once((self.local.clone(), self.local_version)))
            .collect();
        d.sort();
        d
    }

    /// The version of `node`'s entry held here (0 if none).
    pub fn held(&self, node: &str) -> u64 {
        self.held.get(node).copied().unwrap_or(0)
    }

    /// Entries wanted but not yet held.
    pub fn wanted(&self) -> usize {
        self.wanted.len()
    }

    /// Active members as the replica knows them, for peer choice.
    pub fn active(&self) -> impl Iterator<Item = (&String, &SocketAddr)> {
        self.active.iter().map(|(n, (_, a))| (n, a))
    }

    /// Whether this node has heard of `node`: active, down, or its entry
    /// held.
    pub fn knows(&self, node: &str) -> bool {
        self.active.contains_key(node)
            || self.held.contains_key(node)
            || self.down_since.contains_key(node)
    }

    /// The address of active member `node`.
    pub fn addr(&self, node: &str) -> Option<SocketAddr> {
        self.active.get(node).map(|(_, a)| *a)
    }

    /// `node` (generation, address) is active. A member whose entry this
    /// node has never held has it fetched at once. One that comes back
    /// under a new generation (restarted, or renewed after being declared
    /// down) is not: its entry is fetched when its version moves past the
    /// one held, as its own notice or a digest says. A process announces
    /// its version when it starts and again after a renewal, and versions
    /// grow across restarts, so a restart with new services is still
    /// fetched; a false `down`, which changes nothing, costs no fetch at
    /// every peer at once.
    ///
    /// With `wait_until`, a first fetch is not started before then unless
    /// `node` makes contact first ([`Replica::contact`]); the caller passes
    /// it for members newer than this node (see [`NEWER_MEMBER_WAIT`]).
    pub fn member_active(
        &mut self,
        node: &str,
        generation: u64,
        addr: SocketAddr,
        wait_until: Option<Duration>,
        out: &mut Vec<ReplicaAction>,
    ) {
        if node == self.local {
            return;
        }
        self.down_since.remove(node);
        let fresh = self
            .active
            .insert(node.to_owned(), (generation, addr))
            .is_none_or(|(g, _)| g != generation);
        if fresh && self.held(node) == 0 {
            self.wanted.entry(node.to_owned()).or_insert(0);
            let met = self.met.remove(node).is_some();
            if let Some(at) = wait_until.filter(|_| !met) {
                self.waiting.entry(node.to_owned()).or_insert(at);
            }
            self.fetch(node, out);
        } else if self.wanted.contains_key(node) {
            // Wanted while it was away: its address may be new.
            self.fetch(node, out);
        }
    }

    /// `node` reached this node at `now` (a datagram or a stream of its
    /// own): a connection to it is open, so a fetch that waited for that
    /// starts. A peer not yet known as a member is remembered for a while,
    /// so that its entry is fetched at once when its join arrives.
    pub fn contact(&mut self, now: Duration, node: &str, out: &mut Vec<ReplicaAction>) {
        if self.waiting.remove(node).is_some() {
            self.fetch(node, out);
        } else if node != self.local && !self.active.contains_key(node) {
            self.met.insert(node.to_owned(), now);
        }
    }

    /// Whether any fetch waits for a contact (a cheap check before
    /// [`Replica::contact`] on every datagram: a datagram's sender is
    /// always a member by then, so there is nothing to remember).
    pub fn is_waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// When the earliest waiting fetch is due.
    pub fn next_wait(&self) -> Option<Duration> {
        self.waiting.values().min().copied()
    }

    /// Starts the waiting fetches due at `now`.
    pub fn release_waiting(&mut self, now: Duration, out: &mut Vec<ReplicaAction>) {
        let mut due: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(n, _)| n.clone())
            .collect();
        // In owner order, as queued fetches start: runs repeat exactly.
        due.sort_unstable();
        for node in due {
            self.waiting.remove(&node);
            self.fetch(&node, out);
        }
    }

    /// `node` is down or left at `now`: its entry stays (shown unavailable)
    /// until `purge_after`.
    pub fn member_inactive(&mut self, now: Duration, node: &str) {
        if node == self.local {
            return;
        }
        self.active.remove(node);
        self.down_since.entry(node.to_owned()).or_insert(now);
    }

    /// Gossip says `node`'s entry is at `version`.
    pub fn notice(&mut self, node: &str, version: u64, out: &mut Vec<ReplicaAction>) {
        if node == self.local || self.held(node) >= version {
            return;
        }
        let w = self.wanted.entry(node.to_owned()).or_insert(0);
        *w = (*w).max(version);
        self.fetch(node, out);
    }

    /// A peer's digest: want whatever it holds newer.
    pub fn digest_from(&mut self, digest: &[(String, u64)], out: &mut Vec<ReplicaAction>) {
        for (node, version) in digest {
            self.notice(node, *version, out);
        }
    }

    /// A fetch of `node`'s entry ended: with the version it returned, or
    /// `None` if it failed (retried at the next anti-entropy round); the
    /// next queued fetch starts either way.
    pub fn fetched(&mut self, node: &str, version: Option<u64>, out: &mut Vec<ReplicaAction>) {
        self.fetching.remove(node);
        let failed = version.is_none();
        self.record(node, version);
        // A failed fetch waits for the next round rather than starting
        // again at once.
        self.fetch_queued(failed.then_some(node), out);
    }

    fn record(&mut self, node: &str, version: Option<u64>) {
        let Some(version) = version else {
            return;
        };
        if self.wanted.get(node).is_some_and(|w| *w <= version) {
            self.wanted.remove(node);
        }
        let held = self.held.entry(node.to_owned()).or_insert(0);
        *held = (*held).max(version);
    }

    /// An anti-entropy round at `now`: retry wanted fetches, purge nodes
    /// down for too long, and swap digests with `peer` (picked by the
    /// caller among [`Replica::active`]).
    pub fn round(
        &mut self,
        now: Duration,
        peer: Option<(String, SocketAddr)>,
        out: &mut Vec<ReplicaAction>,
    ) {
        self.fetch_queued(None, out);
        self.met
            .retain(|_, at| now.saturating_sub(*at) < NEWER_MEMBER_WAIT);
        let purge: Vec<String> = self
            .down_since
            .iter()
            .filter(|(_, since)| now.saturating_sub(**since) >= self.config.purge_after)
            .map(|(n, _)| n.clone())
            .collect();
        for node in purge {
            self.down_since.remove(&node);
            self.wanted.remove(&node);
            self.waiting.remove(&node);
            self.held.remove(&node);
            out.push(ReplicaAction::Purge { node });
        }
        if let Some((peer, addr)) = peer {
            out.push(ReplicaAction::Digest {
                peer,
                addr,
                digest: self.digest(),
            });
        }
    }

    /// Starts fetches of wanted entries while fewer than
    /// [`FETCHES_AT_ONCE`] run, in owner order.
    fn fetch_queued(&mut self, except: Option<&str>, out: &mut Vec<ReplicaAction>) {
        let free = FETCHES_AT_ONCE.saturating_sub(self.fetching.len());
        if free == 0 {
            return;
        }
        let mut queued: Vec<&String> = self
            .wanted
            .keys()
            .filter(|n| {
                Some(n.as_str()) != except
                    && !self.fetching.contains(*n)
                    && !self.waiting.contains_key(*n)
                    && self.active.contains_key(*n)
            })
            .collect();
        queued.sort_unstable();
        let next: Vec<String> = queued.into_iter().take(free).cloned().collect();
        for node in next {
            self.fetch(&node, out);
        }
    }

    fn fetch(&mut self, node: &str, out: &mut Vec<ReplicaAction>) {
        let Some((_, addr)) = self.active.get(node).copied() else {
            return;
        };
        if self.waiting.contains_key(node) {
            // Stays wanted: it starts on contact or at the deadline.
            return;
        }
        if self.fetching.len() >= FETCHES_AT_ONCE {
            // Queued: it starts when a running fetch ends.
            return;
        }
        if self.fetching.insert(node.to_owned()) {
            out.push(ReplicaAction::Fetch {
                node: node.to_owned(),
                addr,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        ([10, 0, 0, i], 7946).into()
    }

    fn replica() -> Replica {
        Replica::new("a".into(), ReplicaConfig::default())
    }

    #[test]
    fn new_member_is_fetched_once_until_the_fetch_ends() {
        let mut r = replica();
        let mut out = Vec::new();
        r.member_active("b", 1, addr(2), None, &mut out);
        r.notice("b", 5, &mut out);
        assert_eq!(
            out,
            vec![ReplicaAction::Fetch {
                node: "b".into(),
                addr: addr(2)
            }]
        );
        out.clear();
        r.fetched("b", Some(3), &mut out);
        assert_eq!(r.held("b"), 3);
        assert_eq!(r.wanted(), 1, "version 5 is still wanted");
        assert_eq!(out.len(), 1, "fetched again: {out:?}");
        out.clear();
        r.round(Duration::from_secs(5), None, &mut out);
        assert!(out.is_empty(), "already under way: {out:?}");
        r.fetched("b", Some(5), &mut out);
        assert_eq!(r.wanted(), 0);
    }

    #[test]
    fn notices_of_inactive_or_older_entries_fetch_nothing() {
        let mut r = replica();
        let mut out = Vec::new();
        r.notice("b", 2, &mut out);
        assert!(out.is_empty(), "b is not active");
        r.member_active("b", 1, addr(2), None, &mut out);
        r.fetched("b", Some(4), &mut out);
        out.clear();
        r.notice("b", 3, &mut out);
        r.notice("a", 9, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn restart_refetches_and_down_nodes_are_purged_after_the_window() {
        let mut r = replica();
        let mut out = Vec::new();
        r.member_active("b", 1, addr(2), None, &mut out);
        r.fetched("b", Some(1), &mut out);
        out.clear();
        r.member_active("b", 1, addr(2), None, &mut out);
        assert!(out.is_empty(), "same generation: nothing new");
        r.member_active("b", 2, addr(2), None, &mut out);
        assert!(out.is_empty(), "renewed: waits for a newer version");
        r.notice("b", 2, &mut out);
        assert_eq!(out.len(), 1, "restarted with a newer entry");
        r.fetched("b", Some(2), &mut out);
        r.member_inactive(Duration::from_secs(10), "b");
        out.clear();
        r.round(
            Duration::from_secs(10) + r.config().purge_after / 2,
            None,
            &mut out,
        );
        assert!(out.is_empty());
        r.round(
            Duration::from_secs(10) + r.config().purge_after,
            None,
            &mut out,
        );
        assert_eq!(out, vec![ReplicaAction::Purge { node: "b".into() }]);
        assert_eq!(r.held("b"), 0);
    }

    #[test]
    fn digest_includes_our_own_entry_and_drives_fetches() {
        let mut r = replica();
        r.set_local_version(7);
        let mut out = Vec::new();
        r.member_active("c", 1, addr(3), None, &mut out);
        r.fetched("c", Some(1), &mut out);
        assert_eq!(r.digest(), vec![("a".into(), 7), ("c".into(), 1)]);
        out.clear();
        r.digest_from(&[("c".into(), 4), ("a".into(), 99)], &mut out);
        assert_eq!(
            out,
            vec![ReplicaAction::Fetch {
                node: "c".into(),
                addr: addr(3)
            }]
        );
    }

    #[test]
    fn a_newer_member_is_fetched_on_its_contact_or_at_the_deadline() {
        let mut r = replica();
        let mut out = Vec::new();
        let t = Duration::from_secs;
        r.member_active("b", 1, addr(2), Some(t(4)), &mut out);
        r.member_active("c", 1, addr(3), Some(t(3)), &mut out);
        r.notice("b", 2, &mut out);
        r.digest_from(&[("c".into(), 5)], &mut out);
        assert!(out.is_empty(), "both wait: {out:?}");
        assert_eq!(r.next_wait(), Some(t(3)));
        r.round(t(1), None, &mut out);
        assert!(out.is_empty(), "a round does not start them: {out:?}");
        r.contact(t(1), "b", &mut out);
        assert_eq!(
            out,
            vec![ReplicaAction::Fetch {
                node: "b".into(),
                addr: addr(2)
            }],
            "b made contact"
        );
        out.clear();
        r.contact(t(1), "b", &mut out);
        assert!(out.is_empty(), "already under way: {out:?}");
        r.release_waiting(t(2), &mut out);
        assert!(out.is_empty(), "c is not due yet: {out:?}");
        r.release_waiting(t(3), &mut out);
        assert_eq!(
            out,
            vec![ReplicaAction::Fetch {
                node: "c".into(),
                addr: addr(3)
            }],
            "c's deadline passed"
        );
        assert!(!r.is_waiting());
        assert_eq!(r.wanted(), 2, "both still wanted until fetched");
    }

    #[test]
    fn a_newcomer_that_fetched_before_its_join_arrived_is_not_waited_for() {
        let mut r = replica();
        let mut out = Vec::new();
        let t = Duration::from_secs;
        r.contact(t(1), "d", &mut out);
        r.contact(t(1), "e", &mut out);
        assert!(out.is_empty());
        r.member_active("d", 1, addr(4), Some(t(5)), &mut out);
        assert_eq!(
            out,
            vec![ReplicaAction::Fetch {
                node: "d".into(),
                addr: addr(4)
            }],
            "d already reached us: no wait"
        );
        out.clear();
        r.round(t(1) + NEWER_MEMBER_WAIT, None, &mut out);
        r.member_active("e", 1, addr(5), Some(t(9)), &mut out);
        assert!(out.is_empty(), "e's contact was too long ago: {out:?}");
        assert!(r.is_waiting());
    }

    #[test]
    fn fetches_run_a_few_at_a_time_and_failures_wait_for_the_round() {
        let mut r = replica();
        let mut out = Vec::new();
        for i in 0..10u8 {
            r.member_active(&format!("n{i}"), 1, addr(i + 10), None, &mut out);
        }
        let started = |out: &[ReplicaAction]| -> Vec<String> {
            out.iter()
                .filter_map(|a| match a {
                    ReplicaAction::Fetch { node, .. } => Some(node.clone()),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(started(&out), ["n0", "n1", "n2", "n3"]);
        out.clear();
        r.fetched("n0", Some(1), &mut out);
        assert_eq!(started(&out), ["n4"], "a finished fetch frees a slot");
        out.clear();
        r.fetched("n1", None, &mut out);
        assert_eq!(
            started(&out),
            ["n5"],
            "the failed one is not retried at once"
        );
        out.clear();
        r.fetched("n2", Some(1), &mut out);
        assert_eq!(started(&out), ["n1"], "it queues again like the rest");
        assert_eq!(r.wanted(), 8);
    }
}
