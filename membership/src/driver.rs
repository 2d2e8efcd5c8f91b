//! The agent's membership policy around the SWIM core, without I/O.
//!
//! [`Membership`] is SWIM itself. Around it, an agent needs policy: join
//! through the seeds and the members it remembers, retrying with backoff
//! while alone; swap whole member lists on join, periodically and some
//! seconds after an identity renewal; fetch catalog entries when gossip or
//! anti-entropy says they changed; compare digests with a random peer;
//! forget nodes that stay down; close connections to dead processes. The
//! [`Driver`] owns the core and that policy, so the agent and the simulator
//! run the same decisions: the agent's tasks only carry bytes.
//!
//! Like the core, it is driven from outside: every input carries `now`;
//! after each one, drain [`Driver::poll_action`] (what to send, dial,
//! fetch, close) and [`Driver::poll_event`] (membership changes, for logs
//! and views), and call [`Driver::handle_timeout`] at
//! [`Driver::poll_timeout`]. Randomness comes from the seed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::codec::CodecError;
use crate::config::SwimConfig;
use crate::core::{Event, Membership, MembershipError, Transmit};
use crate::docs::{DocAction, DocKey, DocRef, DocReplica, DocStamp};
use crate::identity::NodeId;
use crate::replica::{Digest, NEWER_MEMBER_WAIT, Replica, ReplicaAction, ReplicaConfig};
use crate::sync::{SYNC_AFTER_RENEWAL, SyncPayload, interval_for};

/// The first retry of a join that found nobody.
pub const JOIN_FIRST_RETRY: Duration = Duration::from_millis(500);
/// Join retries back off up to this.
pub const JOIN_MAX_RETRY: Duration = Duration::from_secs(10);
/// A newcomer's first member-list swap goes to one of this many oldest
/// active members (by generation). A random member is often another
/// newcomer that does not know everyone yet: at 150 agents started over
/// 10 s, a join swap that drew one returned 42 members of 150, and the
/// newcomer missed 19 of them for 10 s, until a catalog digest named them.
/// The oldest members have heard every join since theirs; more than one
/// keeps a mass restart from landing every swap on one node.
pub const JOIN_SYNC_OLDEST: usize = 3;
/// A name a repair swap did not teach is not the reason for another one
/// before this (see [`Driver::handle_digest`]).
pub const REPAIR_RETRY: Duration = Duration::from_secs(60);

/// What the driver wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a SWIM datagram.
    Send(Transmit),
    /// Resolve and dial every seed; report each that answers with
    /// [`Driver::handle_seed`] (or [`Driver::handle_self_seed`]).
    DialSeeds {
        /// 1 for the first attempt since the node was last alone.
        attempt: u32,
    },
    /// Swap member lists with `peer`: send `payload`, hand the answer to
    /// [`Driver::handle_sync_answer`] with `gossip`.
    SyncMembers {
        /// The peer.
        peer: NodeId,
        /// Our encoded view.
        payload: Vec<u8>,
        /// Whether news in the answer is gossiped on.
        gossip: bool,
    },
    /// Fetch `node`'s catalog entry from `node`; report with
    /// [`Driver::handle_fetched`].
    Fetch {
        /// The owner.
        node: String,
        /// Where it is.
        addr: SocketAddr,
    },
    /// Swap catalog digests with `peer`; hand its digest to
    /// [`Driver::handle_digest`].
    ExchangeDigest {
        /// The peer.
        peer: String,
        /// Where it is.
        addr: SocketAddr,
        /// Ours.
        digest: Digest,
    },
    /// Drop `node`'s catalog entry (down for `purge_after`).
    Purge {
        /// The owner.
        node: String,
    },
    /// Close every connection to `peer`: it was declared down (a member
    /// that leaves closes its own, once its requests are answered).
    Disconnect {
        /// The member.
        peer: String,
    },
    /// `peer` restarted as this identity: close connections to the older
    /// process (requests on them would wait for their timeout).
    DisconnectStale {
        /// Its new identity.
        peer: NodeId,
    },
    /// Fetch document `key` (at least `stamp`) from `from`; check it and
    /// report with [`Driver::handle_doc_fetched`].
    FetchDoc {
        /// Kind and name.
        key: DocKey,
        /// The stamp wanted.
        stamp: DocStamp,
        /// A node said to hold it.
        from: String,
        /// Where it is.
        addr: SocketAddr,
    },
    /// Compare document lists with `peer`: send our summary; if it differs,
    /// hand its list to [`Driver::handle_doc_list`] (and send it ours),
    /// else call [`Driver::handle_docs_same`].
    ExchangeDocs {
        /// The peer.
        peer: String,
        /// Where it is.
        addr: SocketAddr,
        /// [`DocReplica::summary`] of ours.
        summary: u128,
    },
}

/// Where a node joins through.
#[derive(Debug, Clone, Default)]
pub struct JoinPlan {
    /// Whether seeds are configured (the caller resolves and dials them).
    pub has_seeds: bool,
    /// Members remembered from the last run (generation unknown: 0).
    pub saved: Vec<NodeId>,
}

/// A member-list swap due at some time.
#[derive(Debug, Clone, Copy)]
struct OneOffSync {
    at: Duration,
    gossip: bool,
    /// With one of the [`JOIN_SYNC_OLDEST`] oldest members rather than any.
    oldest: bool,
}

/// An anti-entropy round due at `at` with one of `with` (members this
/// node held down when it renewed its identity), or any member.
#[derive(Debug, Clone)]
struct CatchUp {
    at: Duration,
    with: Vec<String>,
}

/// A name a catalog digest gave that this node has not heard of.
#[derive(Debug, Clone)]
struct Unheard {
    /// When it was first named (later, once a swap did not teach it).
    since: Duration,
    /// The peer whose digest named it first.
    from: String,
}

/// The join loop's state while the node is alone.
#[derive(Debug, Clone, Copy)]
struct Joining {
    at: Duration,
    delay: Duration,
    attempt: u32,
}

/// Counters of the driver's own decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Join attempts (each announces and dials the seeds).
    pub join_attempts: u64,
    /// Member-list swaps started.
    pub member_syncs: u64,
    /// Member lists too large to encode (the sync was skipped).
    pub sync_too_large: u64,
    /// Anti-entropy rounds.
    pub anti_entropy_rounds: u64,
    /// Member-list swaps started because a peer's digest named a node this
    /// one had never heard of (see [`Driver::handle_digest`]).
    pub repair_syncs: u64,
}

/// The membership core plus the agent's policy around it.
#[derive(Debug)]
pub struct Driver {
    core: Membership,
    replica: Replica,
    docs: DocReplica,
    /// Compare document lists with a peer at the next chance (just joined).
    docs_exchange_due: bool,
    doc_scratch: Vec<DocAction>,
    rng: StdRng,
    plan: JoinPlan,
    joining: Option<Joining>,
    joined: bool,
    self_seed: bool,
    next_sync: Duration,
    extra_sync: Option<OneOffSync>,
    next_anti_entropy: Duration,
    /// An extra anti-entropy round soon after this node renewed its
    /// identity (see [`Driver::handle_timeout`]).
    catch_up: Option<CatchUp>,
    /// Names digests gave that this node has not heard of (see
    /// [`Driver::handle_digest`]).
    unheard: HashMap<String, Unheard>,
    last_repair: Option<Duration>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    scratch: Vec<ReplicaAction>,
    stats: DriverStats,
}

impl Driver {
    /// A driver for `identity` started at `now`, with randomness from
    /// `seed`. A node with seeds or saved members starts joining at once.
    pub fn new(
        identity: NodeId,
        swim: &SwimConfig,
        replica: ReplicaConfig,
        plan: JoinPlan,
        seed: u64,
        now: Duration,
    ) -> Result<Self, MembershipError> {
        let mut rng = StdRng::seed_from_u64(seed);
        let core = Membership::new(identity.clone(), swim, rng.random())?;
        // Periodic swaps and digest rounds start at a random point of their
        // first interval, so nodes started together do not act in step.
        let next_sync = now + swim.sync_interval.mul_f64(rng.random::<f64>());
        let next_anti_entropy = now + replica.anti_entropy_interval.mul_f64(rng.random::<f64>());
        let joining = (plan.has_seeds || !plan.saved.is_empty()).then_some(Joining {
            at: now,
            delay: JOIN_FIRST_RETRY,
            attempt: 0,
        });
        let mut docs = DocReplica::new();
        if joining.is_none() {
            // A new mesh: nobody to catch up with.
            docs.set_synced();
        }
        Ok(Self {
            core,
            replica: Replica::new(identity.name, replica),
            docs,
            docs_exchange_due: false,
            doc_scratch: Vec::new(),
            rng,
            plan,
            joining,
            joined: false,
            self_seed: false,
            next_sync,
            extra_sync: None,
            next_anti_entropy,
            catch_up: None,
            unheard: HashMap::new(),
            last_repair: None,
            actions: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::new(),
            stats: DriverStats::default(),
        })
    }

    /// The SWIM core (read-only: members, identity, counters).
    pub fn core(&self) -> &Membership {
        &self.core
    }

    /// Replication state (read-only).
    pub fn replica(&self) -> &Replica {
        &self.replica
    }

    /// Document replication state (read-only).
    pub fn docs(&self) -> &DocReplica {
        &self.docs
    }

    /// This node applied document `key` at `stamp` (from the operator, or
    /// loaded from disk when `announce` is false): hold it and tell the
    /// mesh.
    pub fn publish_doc(
        &mut self,
        now: Duration,
        key: DocKey,
        stamp: DocStamp,
        announce: bool,
    ) -> Result<(), MembershipError> {
        self.docs.hold(key.clone(), stamp);
        let result = if announce {
            self.core.publish_doc(now, &key, stamp)
        } else {
            Ok(())
        };
        self.pump(now);
        result
    }

    /// A fetch of document `key` from `from` ended: `got` is the stamp now
    /// held (checked and stored), or `None` if the fetch failed or the
    /// document was refused.
    pub fn handle_doc_fetched(
        &mut self,
        now: Duration,
        key: &DocKey,
        from: &str,
        got: Option<DocStamp>,
    ) {
        let mut out = std::mem::take(&mut self.doc_scratch);
        self.docs.fetched(key, from, got, &mut out);
        self.take_docs(now, &mut out);
        self.doc_scratch = out;
        self.pump(now);
    }

    /// A peer's document list, from an exchange either side started.
    pub fn handle_doc_list(&mut self, now: Duration, peer: &str, list: &[DocRef]) {
        let mut out = std::mem::take(&mut self.doc_scratch);
        self.docs.list_from(peer, list, &mut out);
        self.take_docs(now, &mut out);
        self.doc_scratch = out;
        self.pump(now);
    }

    /// A peer's document summary matched ours.
    pub fn handle_docs_same(&mut self) {
        self.docs.same_as_peer();
    }

    /// Whether this node ever had another active member.
    pub fn joined(&self) -> bool {
        self.joined
    }

    /// Whether dialing the seeds reached this node itself.
    pub fn is_self_seed(&self) -> bool {
        self.self_seed
    }

    /// Counters of the driver's decisions.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// The next thing to do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The next membership event. Catalog notices come out too, for
    /// whoever measures their spread; the driver has already acted on them.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Driver::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.core.has_left() {
            return None;
        }
        [
            self.core.poll_timeout(),
            self.joining.map(|j| j.at),
            Some(self.next_sync),
            self.extra_sync.map(|s| s.at),
            Some(self.next_anti_entropy),
            self.catch_up.as_ref().map(|c| c.at),
            self.replica.next_wait(),
            self.next_repair(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Runs everything due at `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        if self.core.has_left() {
            return;
        }
        self.core.handle_timeout(now);
        self.pump(now);
        if self.joining.is_some_and(|j| j.at <= now) {
            self.join_attempt(now);
        }
        if self.next_sync <= now {
            let interval =
                interval_for(self.core.config().sync_interval, self.core.num_active() + 1);
            // Jitter (0.5..1.5 of the interval) keeps nodes from syncing in step.
            self.next_sync = now + interval.mul_f64(0.5 + self.rng.random::<f64>());
            self.start_sync(true);
        }
        if let Some(sync) = self.extra_sync.filter(|s| s.at <= now) {
            self.extra_sync = None;
            let peer = sync.oldest.then(|| self.one_of_the_oldest()).flatten();
            self.start_sync_with(peer, sync.gossip);
        }
        if self.next_anti_entropy <= now {
            self.next_anti_entropy = now + self.replica.config().anti_entropy_interval;
            self.anti_entropy(now, None);
        }
        if let Some(catch_up) = self.catch_up.take_if(|c| c.at <= now) {
            // After a heal, the changes made on the other side while it
            // was cut off are news here, but their catalog notices were
            // gossiped before the sides could hear each other. One digest
            // swap with a member from the other side brings every entry
            // that side changed, a few seconds before the regular rounds
            // would happen to pick such a member.
            let with: Vec<&String> = catch_up
                .with
                .iter()
                .filter(|n| self.replica.addr(n).is_some())
                .collect();
            let peer =
                (!with.is_empty()).then(|| with[self.rng.random_range(0..with.len())].clone());
            self.anti_entropy(now, peer);
        }
        self.repair_due(now);
        if self.replica.next_wait().is_some_and(|at| at <= now) {
            let mut out = std::mem::take(&mut self.scratch);
            self.replica.release_waiting(now, &mut out);
            self.take_replica(&mut out);
            self.scratch = out;
        }
        self.pump(now);
    }

    /// One SWIM datagram from the peer whose certificate names `certified`.
    pub fn handle_datagram(
        &mut self,
        now: Duration,
        certified: &str,
        data: &[u8],
    ) -> Result<(), MembershipError> {
        let result = self.core.handle_datagram(now, certified, data);
        self.pump(now);
        // After the pump: the datagram may be how this node heard of the
        // sender, and it proves a connection from it.
        if self.replica.is_waiting() {
            self.contact(now, certified);
        }
        result
    }

    /// The peer whose certificate names `certified` opened a stream to this
    /// node (a catalog fetch, say): a connection from it is open.
    pub fn handle_contact(&mut self, now: Duration, certified: &str) {
        self.contact(now, certified);
        self.pump(now);
    }

    fn contact(&mut self, now: Duration, peer: &str) {
        let mut out = std::mem::take(&mut self.scratch);
        self.replica.contact(now, peer, &mut out);
        self.take_replica(&mut out);
        self.scratch = out;
    }

    /// Until when to wait for `member` to make contact before fetching its
    /// entry: only a member newer than this node is waited for (a later
    /// start has a higher generation; ties go by name), so of each pair
    /// exactly one side dials (see [`NEWER_MEMBER_WAIT`]).
    fn wait_for(&mut self, now: Duration, member: &NodeId) -> Option<Duration> {
        let local = self.core.identity();
        ((member.generation, &member.name) > (local.generation, &local.name))
            .then(|| now + NEWER_MEMBER_WAIT.mul_f64(0.5 + 0.5 * self.rng.random::<f64>()))
    }

    /// A seed answered: its certificate names `name`.
    pub fn handle_seed(&mut self, now: Duration, name: String, addr: SocketAddr) {
        if let Ok(id) = NodeId::new(name, addr, 0) {
            // An announce that cannot be built is retried next attempt.
            let _ = self.core.announce(now, id);
        }
        self.pump(now);
    }

    /// Dialing a seed reached this very node: alone, it is the mesh.
    pub fn handle_self_seed(&mut self) {
        self.self_seed = true;
        self.docs.set_synced();
    }

    /// Announces to one member (the admin API's join).
    pub fn announce(&mut self, now: Duration, dst: NodeId) -> Result<(), MembershipError> {
        let result = self.core.announce(now, dst);
        self.pump(now);
        result
    }

    /// A peer started a member-list swap: returns our view as it was
    /// before taking in theirs (what the peer needs), then merges theirs
    /// and gossips its news on.
    pub fn handle_sync_request(
        &mut self,
        now: Duration,
        theirs: SyncPayload,
    ) -> Result<Vec<u8>, CodecError> {
        let ours = self.core.sync_payload().encode();
        self.core.merge_sync(now, theirs, true);
        self.pump(now);
        ours
    }

    /// The answer to a swap this node started.
    pub fn handle_sync_answer(
        &mut self,
        now: Duration,
        theirs: SyncPayload,
        gossip: bool,
    ) -> usize {
        let taken = self.core.merge_sync(now, theirs, gossip);
        self.pump(now);
        taken
    }

    /// This node's catalog entry is now at `version`: announce it.
    pub fn publish_catalog(&mut self, now: Duration, version: u64) -> Result<(), MembershipError> {
        self.replica.set_local_version(version);
        let result = self.core.publish_catalog(now, version);
        self.pump(now);
        result
    }

    /// A fetch of `node`'s entry ended with its version, or failed.
    pub fn handle_fetched(&mut self, now: Duration, node: &str, version: Option<u64>) {
        let mut out = std::mem::take(&mut self.scratch);
        self.replica.fetched(node, version, &mut out);
        self.take_replica(&mut out);
        self.scratch = out;
        self.pump(now);
    }

    /// A catalog digest from peer `from`, from a swap either side started.
    ///
    /// The digest also repairs membership. SWIM piggybacks each update a
    /// bounded number of times, so in a large or busy mesh a node can miss
    /// a join and not hear of the member until the periodic swap, whose
    /// interval grows with the mesh (three minutes at 1,000 nodes). A
    /// digest names every node its sender holds an entry for; a name this
    /// node has still not heard of an anti-entropy interval after a digest
    /// first named it is such a miss, and swapping member lists with the
    /// sender (or, if it is not known either, a random member) repairs
    /// it. The interval is timed, not waited out until the next digest
    /// (which made a repair take up to three intervals). At most one such
    /// swap per anti-entropy interval, and one per name a minute, so a
    /// name nobody lists as a member cannot make a node swap again and
    /// again.
    pub fn handle_digest(&mut self, now: Duration, from: &str, digest: &[(String, u64)]) {
        let mut out = std::mem::take(&mut self.scratch);
        self.replica.contact(now, from, &mut out);
        self.replica.digest_from(digest, &mut out);
        self.take_replica(&mut out);
        self.scratch = out;
        self.repair_membership(now, from, digest);
        self.pump(now);
    }

    fn repair_membership(&mut self, now: Duration, from: &str, digest: &[(String, u64)]) {
        let local = self.core.identity().name.as_str();
        let names: Vec<&str> = digest
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| *n != local && !self.replica.knows(n) && !self.unheard.contains_key(*n))
            .collect();
        if !names.is_empty() && !self.core.has_left() {
            let members = self.core.members();
            let known: HashSet<&str> = members.iter().map(|m| m.id.name.as_str()).collect();
            // A join in progress is named by some digests before its
            // gossip arrives; only a name still unheard an interval after
            // it was first named is a miss ([`Driver::repair_due`]).
            for n in names.into_iter().filter(|n| !known.contains(n)) {
                let first = Unheard {
                    since: now,
                    from: from.to_owned(),
                };
                self.unheard.insert(n.to_owned(), first);
            }
        }
        self.repair_due(now);
    }

    /// When the next unheard name falls due for a repair swap.
    fn next_repair(&self) -> Option<Duration> {
        let gap = self.replica.config().anti_entropy_interval;
        let due = self.unheard.values().map(|u| u.since + gap).min()?;
        Some(self.last_repair.map_or(due, |at| due.max(at + gap)))
    }

    /// Swaps member lists with whoever first named a name that is still
    /// unheard an anti-entropy interval later.
    fn repair_due(&mut self, now: Duration) {
        if self.next_repair().is_none_or(|at| at > now) || self.core.has_left() {
            return;
        }
        let gap = self.replica.config().anti_entropy_interval;
        let members = self.core.members();
        let known: HashSet<&str> = members.iter().map(|m| m.id.name.as_str()).collect();
        let replica = &self.replica;
        self.unheard.retain(|n, u| {
            !known.contains(n.as_str()) && !replica.knows(n) && now < u.since + 2 * REPAIR_RETRY
        });
        let mut from = None;
        for u in self.unheard.values_mut().filter(|u| u.since + gap <= now) {
            from.get_or_insert_with(|| u.from.clone());
            // Not the reason for another swap before REPAIR_RETRY.
            u.since = now + REPAIR_RETRY - gap;
        }
        let Some(from) = from else {
            return;
        };
        self.last_repair = Some(now);
        self.stats.repair_syncs += 1;
        let peer = members
            .into_iter()
            .find(|m| m.id.name == from && m.state.is_active())
            .map(|m| m.id);
        // What the swap teaches this node is news to nobody else.
        self.start_sync_with(peer, false);
    }

    /// Leaves the mesh: peers hear it at once; the driver goes quiet.
    pub fn leave(&mut self, now: Duration) -> Result<(), MembershipError> {
        let result = self.core.leave(now);
        self.joining = None;
        self.extra_sync = None;
        self.catch_up = None;
        self.pump(now);
        result
    }

    /// foca does not put this node's renewed identity in its updates, and
    /// members that hold the old one down do not take the new one from
    /// message headers: it spreads only when someone announces to the old
    /// one (every `announce_down_interval`, to a few down members) or this
    /// node announces. So announce at once to a few members known active
    /// before the renewal (the receiver gossips the newcomer on), and rejoin
    /// through the seeds if foca's renewal left no member.
    fn announce_after_renewal(&mut self, now: Duration) {
        const FANOUT: usize = 3;
        // Peers fetch a renewed member's entry only if this notice says it
        // moved on while the member was away (see `Replica::member_active`).
        let version = self.replica.local_version();
        if version > 0 {
            let _ = self.core.publish_catalog(now, version);
        }
        let known: Vec<(String, SocketAddr)> = self
            .replica
            .active()
            .map(|(n, a)| (n.clone(), *a))
            .collect();
        for _ in 0..FANOUT.min(known.len()) {
            let (name, addr) = known[self.rng.random_range(0..known.len())].clone();
            if let Ok(id) = NodeId::new(name, addr, 0) {
                let _ = self.core.announce(now, id);
            }
        }
        if self.core.num_active() == 0 {
            self.start_joining(now);
        }
        while let Some(t) = self.core.poll_transmit() {
            self.actions.push_back(Action::Send(t));
        }
    }

    /// Starts the join loop at `now` (first retry delay), unless it runs
    /// already, the node left, or there is nobody to join through.
    fn start_joining(&mut self, now: Duration) {
        if !self.core.has_left()
            && self.joining.is_none()
            && (self.plan.has_seeds || !self.plan.saved.is_empty())
        {
            self.joining = Some(Joining {
                at: now,
                delay: JOIN_FIRST_RETRY,
                attempt: 0,
            });
        }
    }

    fn join_attempt(&mut self, now: Duration) {
        let Some(mut joining) = self.joining else {
            return;
        };
        if self.core.num_active() > 0 {
            self.joining = None;
            return;
        }
        joining.attempt += 1;
        self.stats.join_attempts += 1;
        // Members saved from the last run first: announcing is cheap and
        // needs no dial; then the seeds.
        for member in self.plan.saved.clone() {
            let _ = self.core.announce(now, member);
        }
        if self.plan.has_seeds {
            self.actions.push_back(Action::DialSeeds {
                attempt: joining.attempt,
            });
        }
        joining.at = now + joining.delay;
        joining.delay = (joining.delay * 2).min(JOIN_MAX_RETRY);
        self.joining = Some(joining);
    }

    /// One of the [`JOIN_SYNC_OLDEST`] active members with the lowest
    /// generations, at random.
    fn one_of_the_oldest(&mut self) -> Option<NodeId> {
        let mut active = self.active_ids();
        active.sort_by_key(|id| id.generation);
        active.truncate(JOIN_SYNC_OLDEST);
        (!active.is_empty()).then(|| active.swap_remove(self.rng.random_range(0..active.len())))
    }

    /// The identities of the active members.
    fn active_ids(&self) -> Vec<NodeId> {
        self.core
            .members()
            .into_iter()
            .filter(|m| m.state.is_active())
            .map(|m| m.id)
            .collect()
    }

    /// Swaps member lists with one random active member.
    fn start_sync(&mut self, gossip: bool) {
        self.start_sync_with(None, gossip);
    }

    /// Swaps member lists with `peer`, or one random active member.
    fn start_sync_with(&mut self, peer: Option<NodeId>, gossip: bool) {
        if self.core.has_left() {
            return;
        }
        let peer = match peer {
            Some(peer) => peer,
            None => {
                let active = self.active_ids();
                if active.is_empty() {
                    return;
                }
                active[self.rng.random_range(0..active.len())].clone()
            }
        };
        match self.core.sync_payload().encode() {
            Ok(payload) => {
                self.stats.member_syncs += 1;
                self.actions.push_back(Action::SyncMembers {
                    peer,
                    payload,
                    gossip,
                });
            }
            Err(_) => self.stats.sync_too_large += 1,
        }
    }

    /// An anti-entropy round with `with` if it is an active member, or a
    /// random one.
    fn anti_entropy(&mut self, now: Duration, with: Option<String>) {
        self.stats.anti_entropy_rounds += 1;
        let count = self.replica.active().count();
        let peer = match with.and_then(|n| self.replica.addr(&n).map(|a| (n, a))) {
            Some(peer) => Some(peer),
            None => (count > 0)
                .then(|| self.rng.random_range(0..count))
                .and_then(|i| self.replica.active().nth(i))
                .map(|(n, a)| (n.clone(), *a)),
        };
        let mut out = std::mem::take(&mut self.scratch);
        self.replica.round(now, peer.clone(), &mut out);
        self.take_replica(&mut out);
        self.scratch = out;
        let mut docs = std::mem::take(&mut self.doc_scratch);
        self.docs.round(&mut docs);
        self.take_docs(now, &mut docs);
        self.doc_scratch = docs;
        if let Some((peer, addr)) = peer {
            self.docs_exchange_due = false;
            self.actions.push_back(Action::ExchangeDocs {
                peer,
                addr,
                summary: self.docs.summary(),
            });
        }
    }

    /// Turns the document replica's decisions into actions. A holder
    /// without a known address counts as a failed fetch.
    fn take_docs(&mut self, now: Duration, out: &mut Vec<DocAction>) {
        let mut more = Vec::new();
        while !out.is_empty() {
            for a in out.drain(..) {
                match a {
                    DocAction::Fetch { key, stamp, from } => match self.replica.addr(&from) {
                        Some(addr) => self.actions.push_back(Action::FetchDoc {
                            key,
                            stamp,
                            from,
                            addr,
                        }),
                        None => self.docs.fetched(&key, &from, None, &mut more),
                    },
                    DocAction::Announce { key, stamp } => {
                        let _ = self.core.publish_doc(now, &key, stamp);
                    }
                }
            }
            std::mem::swap(out, &mut more);
        }
    }

    fn take_replica(&mut self, out: &mut Vec<ReplicaAction>) {
        for a in out.drain(..) {
            self.actions.push_back(match a {
                ReplicaAction::Fetch { node, addr } => Action::Fetch { node, addr },
                ReplicaAction::Digest { peer, addr, digest } => {
                    Action::ExchangeDigest { peer, addr, digest }
                }
                ReplicaAction::Purge { node } => Action::Purge { node },
            });
        }
    }

    /// Moves the core's output into actions and events, reacting to the
    /// events that carry policy.
    fn pump(&mut self, now: Duration) {
        while let Some(t) = self.core.poll_transmit() {
            self.actions.push_back(Action::Send(t));
        }
        let mut out = std::mem::take(&mut self.scratch);
        let mut lingering = false;
        let mut rejoined = false;
        while let Some(event) = self.core.poll_event() {
            match &event {
                Event::MemberUp(id) => {
                    let wait = self.wait_for(now, id);
                    self.replica
                        .member_active(&id.name, id.generation, id.addr, wait, &mut out);
                }
                Event::MemberDown(id) => {
                    self.replica.member_inactive(now, &id.name);
                    self.docs.member_gone(&id.name);
                    self.actions.push_back(Action::Disconnect {
                        peer: id.name.clone(),
                    });
                }
                Event::MemberLeft(id) => {
                    // No disconnect: a node that leaves still finishes the
                    // requests it holds, then closes its connections itself.
                    // New requests already go elsewhere.
                    self.replica.member_inactive(now, &id.name);
                    self.docs.member_gone(&id.name);
                }
                Event::MemberRenamed { new, .. } => {
                    self.replica
                        .member_active(&new.name, new.generation, new.addr, None, &mut out);
                    self.actions
                        .push_back(Action::DisconnectStale { peer: new.clone() });
                }
                Event::Rejoined(_) => {
                    rejoined = true;
                    if self.catch_up.is_none() {
                        let with = self
                            .core
                            .members()
                            .into_iter()
                            .filter(|m| !m.state.is_active())
                            .map(|m| m.id.name)
                            .collect();
                        let gap = self.replica.config().anti_entropy_interval;
                        self.catch_up = Some(CatchUp {
                            at: now + gap.mul_f64(0.1 + 0.2 * self.rng.random::<f64>()),
                            with,
                        });
                    }
                    // Declared down, probably while cut off: once the
                    // rejoin has spread, swap lists once more to pick up
                    // what was missed meanwhile.
                    if self.extra_sync.is_none() {
                        let delay = SYNC_AFTER_RENEWAL.mul_f64(0.5 + self.rng.random::<f64>());
                        self.extra_sync = Some(OneOffSync {
                            at: now + delay,
                            gossip: true,
                            oldest: false,
                        });
                    }
                }
                Event::Connected => {
                    if !self.joined {
                        // Learn every member at once rather than one
                        // update at a time; that news is news to nobody.
                        self.joined = true;
                        self.extra_sync = Some(OneOffSync {
                            at: now,
                            gossip: false,
                            oldest: true,
                        });
                        // And every document, before the node says ready.
                        self.docs_exchange_due = true;
                    }
                    self.joining = None;
                }
                Event::Isolated => self.start_joining(now),
                Event::CatalogNotice { node, version } => {
                    self.replica.notice(node, *version, &mut out);
                }
                Event::DocNotice { key, stamp, holder } => {
                    let mut docs = std::mem::take(&mut self.doc_scratch);
                    self.docs
                        .offer(key.clone(), *stamp, holder, false, &mut docs);
                    self.take_docs(now, &mut docs);
                    self.doc_scratch = docs;
                }
                Event::SuspicionLingers(_) => lingering = true,
            }
            self.events.push_back(event);
        }
        self.take_replica(&mut out);
        self.scratch = out;
        if self.docs_exchange_due {
            let count = self.replica.active().count();
            if count > 0 {
                let i = self.rng.random_range(0..count);
                if let Some((peer, addr)) = self.replica.active().nth(i) {
                    self.actions.push_back(Action::ExchangeDocs {
                        peer: peer.clone(),
                        addr: *addr,
                        summary: self.docs.summary(),
                    });
                }
                self.docs_exchange_due = false;
            }
        }
        if lingering {
            // This node missed a verdict or a refutation: a swap with a
            // peer brings whichever it was.
            self.start_sync(true);
        }
        if rejoined {
            self.announce_after_renewal(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::MemberState;
    use bytes::Bytes;

    /// A lossless in-memory mesh of drivers on manual time, doing every
    /// action at once (streams included) the way the agent would.
    struct Mesh {
        nodes: Vec<Option<Driver>>,
        now: Duration,
        cut: Vec<usize>,
        /// A frozen node: datagrams to it wait, its timers do not fire.
        stalled: Option<usize>,
        backlog: Vec<(String, usize, Bytes)>,
        /// `versions[i]`: node i's own entry version.
        versions: Vec<u64>,
        dials: usize,
        purged: Vec<(usize, String)>,
        /// Catalog fetches in the order they were made: (fetcher, owner).
        fetches: Vec<(usize, usize)>,
        /// (receiver, sender) of every datagram, fetch and digest delivered.
        heard: std::collections::BTreeSet<(usize, usize)>,
        /// Fetches made before the owner had reached the fetcher.
        uncontacted: Vec<(usize, usize)>,
        /// `(from, to)`: datagrams and fetches from `from` to `to` are lost.
        mute: Option<(usize, usize)>,
        /// When each fetch was made: (time, fetcher, owner).
        fetch_times: Vec<(Duration, usize, usize)>,
    }

    fn id(i: usize, generation: u64) -> NodeId {
        NodeId::new(
            format!("n{i}"),
            ([10, 0, 0, i as u8], 7946).into(),
            generation,
        )
        .unwrap()
    }

    impl Mesh {
        fn new(n: usize, replica: ReplicaConfig) -> Self {
            Self::with_swim(n, replica, &SwimConfig::default())
        }

        fn with_swim(n: usize, replica: ReplicaConfig, swim: &SwimConfig) -> Self {
            let nodes = (0..n)
                .map(|i| {
                    let plan = JoinPlan {
                        has_seeds: i != 0,
                        saved: Vec::new(),
                    };
                    let d = Driver::new(
                        id(i, 1),
                        swim,
                        replica.clone(),
                        plan,
                        i as u64,
                        Duration::ZERO,
                    );
                    Some(d.unwrap())
                })
                .collect();
            Self {
                nodes,
                now: Duration::ZERO,
                cut: Vec::new(),
                stalled: None,
                backlog: Vec::new(),
                versions: vec![0; n],
                dials: 0,
                purged: Vec::new(),
                fetches: Vec::new(),
                heard: std::collections::BTreeSet::new(),
                uncontacted: Vec::new(),
                mute: None,
                fetch_times: Vec::new(),
            }
        }

        fn index(name: &str) -> usize {
            name[1..].parse().unwrap()
        }

        fn reachable(&self, a: usize, b: usize) -> bool {
            !self.cut.contains(&a) && !self.cut.contains(&b) && self.nodes[b].is_some()
        }

        fn act(&mut self, i: usize) -> bool {
            let mut moved = false;
            loop {
                let Some(action) = self.nodes[i].as_mut().and_then(Driver::poll_action) else {
                    return moved;
                };
                moved = true;
                let now = self.now;
                let me = format!("n{i}");
                match action {
                    Action::Send(t) => {
                        let j = Self::index(&t.to.name);
                        if self.stalled == Some(j) {
                            self.backlog.push((me, j, t.data));
                        } else if self.reachable(i, j) && self.mute != Some((i, j)) {
                            self.heard.insert((j, i));
                            let _ = self.nodes[j]
                                .as_mut()
                                .unwrap()
                                .handle_datagram(now, &me, &t.data);
                        }
                    }
                    Action::DialSeeds { .. } => {
                        self.dials += 1;
                        if self.reachable(i, 0) {
                            let addr = id(0, 0).addr;
                            self.nodes[i]
                                .as_mut()
                                .unwrap()
                                .handle_seed(now, "n0".into(), addr);
                        }
                    }
                    Action::SyncMembers {
                        peer,
                        payload,
                        gossip,
                    } => {
                        let j = Self::index(&peer.name);
                        if self.reachable(i, j) {
                            let theirs = SyncPayload::decode(&payload).unwrap();
                            let answer = self.nodes[j]
                                .as_mut()
                                .unwrap()
                                .handle_sync_request(now, theirs)
                                .unwrap();
                            let answer = SyncPayload::decode(&answer).unwrap();
                            self.nodes[i]
                                .as_mut()
                                .unwrap()
                                .handle_sync_answer(now, answer, gossip);
                        }
                    }
                    Action::Fetch { node, .. } => {
                        let j = Self::index(&node);
                        let version = (self.reachable(i, j) && self.mute != Some((i, j)))
                            .then(|| self.versions[j]);
                        self.fetches.push((i, j));
                        self.fetch_times.push((now, i, j));
                        if !self.heard.contains(&(i, j)) {
                            self.uncontacted.push((i, j));
                        }
                        self.nodes[i]
                            .as_mut()
                            .unwrap()
                            .handle_fetched(now, &node, version);
                        if version.is_some() {
                            self.heard.insert((j, i));
                            // As the agent: the owner takes the fetch as a contact.
                            self.nodes[j].as_mut().unwrap().handle_contact(now, &me);
                        }
                    }
                    Action::ExchangeDigest { peer, digest, .. } => {
                        let j = Self::index(&peer);
                        if self.reachable(i, j) {
                            self.heard.extend([(j, i), (i, j)]);
                            let peer_node = self.nodes[j].as_mut().unwrap();
                            let theirs = peer_node.replica().digest();
                            peer_node.handle_digest(now, &me, &digest);
                            self.nodes[i]
                                .as_mut()
                                .unwrap()
                                .handle_digest(now, &peer, &theirs);
                        }
                    }
                    Action::Purge { node } => self.purged.push((i, node)),
                    Action::Disconnect { .. } | Action::DisconnectStale { .. } => {}
                    Action::FetchDoc { key, from, .. } => {
                        let j = Self::index(&from);
                        // The agent checks and stores the copy; what it then
                        // holds is the higher of the two.
                        let got = if self.reachable(i, j) {
                            let theirs = self.nodes[j].as_ref().unwrap().docs().held(&key);
                            let ours = self.nodes[i].as_ref().unwrap().docs().held(&key);
                            theirs.map(|t| ours.map_or(t, |o| o.max(t)))
                        } else {
                            None
                        };
                        self.nodes[i]
                            .as_mut()
                            .unwrap()
                            .handle_doc_fetched(now, &key, &from, got);
                    }
                    Action::ExchangeDocs { peer, summary, .. } => {
                        let j = Self::index(&peer);
                        if self.reachable(i, j) {
                            let theirs = self.nodes[j].as_ref().unwrap().docs();
                            if theirs.summary() == summary {
                                self.nodes[i].as_mut().unwrap().handle_docs_same();
                            } else {
                                let their_list = theirs.list();
                                let our_list = self.nodes[i].as_ref().unwrap().docs().list();
                                self.nodes[j]
                                    .as_mut()
                                    .unwrap()
                                    .handle_doc_list(now, &me, &our_list);
                                self.nodes[i].as_mut().unwrap().handle_doc_list(
                                    now,
                                    &peer,
                                    &their_list,
                                );
                            }
                        }
                    }
                }
            }
        }

        fn settle(&mut self) {
            for _ in 0..10_000 {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    moved |= self.act(i);
                }
                if !moved {
                    return;
                }
            }
            panic!("actions never settle");
        }

        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(10);
                let now = self.now;
                for (i, node) in self.nodes.iter_mut().enumerate() {
                    let Some(node) = node.as_mut().filter(|_| self.stalled != Some(i)) else {
                        continue;
                    };
                    if node.poll_timeout().is_some_and(|t| t <= now) {
                        node.handle_timeout(now);
                    }
                }
                self.settle();
            }
        }

        /// Freezes `i` for `length`, then it handles what queued up.
        fn stall(&mut self, i: usize, length: Duration) {
            self.stalled = Some(i);
            self.run_for(length);
            self.stalled = None;
            let now = self.now;
            for (from, to, data) in std::mem::take(&mut self.backlog) {
                let _ = self.nodes[to]
                    .as_mut()
                    .unwrap()
                    .handle_datagram(now, &from, &data);
            }
            self.settle();
        }

        fn node(&self, i: usize) -> &Driver {
            self.nodes[i].as_ref().unwrap()
        }

        fn alive(&self, i: usize) -> usize {
            self.node(i)
                .core()
                .members()
                .iter()
                .filter(|m| m.state == MemberState::Alive)
                .count()
        }

        fn publish(&mut self, i: usize) {
            self.versions[i] += 1;
            let (now, v) = (self.now, self.versions[i]);
            self.nodes[i]
                .as_mut()
                .unwrap()
                .publish_catalog(now, v)
                .unwrap();
            self.settle();
        }
    }

    #[test]
    fn nodes_join_through_the_seed_and_stop_dialing() {
        let mut mesh = Mesh::new(6, ReplicaConfig::default());
        mesh.run_for(Duration::from_secs(3));
        for i in 0..6 {
            assert_eq!(mesh.alive(i), 5, "node {i}");
            assert!(mesh.node(i).joined());
        }
        assert_eq!(mesh.dials, 5, "one dial each: the first attempt worked");
        mesh.run_for(Duration::from_secs(20));
        assert_eq!(mesh.dials, 5);
    }

    #[test]
    fn a_newcomers_first_swap_goes_to_one_of_the_oldest_members() {
        use crate::sync::{SyncMember, SyncState};
        // Ten members; n3, n7 and n8 have the lowest generations.
        let generations = [50, 40, 60, 5, 70, 80, 90, 3, 4, 30];
        let members: Vec<SyncMember> = (0..10)
            .map(|i| SyncMember {
                id: id(i, generations[i]),
                incarnation: 0,
                state: SyncState::Alive,
            })
            .collect();
        let mut chosen = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let plan = JoinPlan {
                has_seeds: true,
                saved: Vec::new(),
            };
            let mut d = Driver::new(
                id(20, 100),
                &SwimConfig::default(),
                ReplicaConfig::default(),
                plan,
                seed,
                Duration::ZERO,
            )
            .unwrap();
            let now = Duration::from_millis(10);
            d.handle_sync_answer(
                now,
                SyncPayload {
                    members: members.clone(),
                },
                false,
            );
            assert!(d.joined());
            d.handle_timeout(now);
            let peers: Vec<String> = std::iter::from_fn(|| d.poll_action())
                .filter_map(|a| match a {
                    Action::SyncMembers { peer, .. } => Some(peer.name),
                    _ => None,
                })
                .collect();
            assert_eq!(peers.len(), 1, "one join swap: {peers:?}");
            chosen.insert(peers[0].clone());
        }
        let oldest: std::collections::BTreeSet<String> =
            ["n3", "n7", "n8"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            chosen, oldest,
            "spread over the three oldest, and only them"
        );
    }

    #[test]
    fn join_retries_back_off_while_the_seed_is_away() {
        let mut mesh = Mesh::new(2, ReplicaConfig::default());
        mesh.cut = vec![0];
        mesh.run_for(Duration::from_secs(8));
        // Attempts at 0, 0.5, 1.5, 3.5, 7.5 s.
        assert_eq!(mesh.dials, 5);
        assert_eq!(mesh.node(1).stats().join_attempts, 5);
        mesh.cut.clear();
        mesh.run_for(Duration::from_secs(10));
        assert_eq!(mesh.alive(1), 1, "joined on the attempt at 15.5 s");
    }

    #[test]
    fn a_digest_naming_an_unheard_node_starts_a_swap_with_its_sender() {
        use crate::sync::{SyncMember, SyncState};
        let swaps = |d: &mut Driver| -> Vec<(String, bool)> {
            std::iter::from_fn(|| d.poll_action())
                .filter_map(|a| match a {
                    Action::SyncMembers { peer, gossip, .. } => Some((peer.name, gossip)),
                    _ => None,
                })
                .collect()
        };
        let secs = Duration::from_secs;
        let plan = JoinPlan::default();
        let swim = SwimConfig::default();
        let mut d =
            Driver::new(id(0, 1), &swim, ReplicaConfig::default(), plan, 7, secs(0)).unwrap();
        let n1 = SyncMember {
            id: id(1, 1),
            incarnation: 0,
            state: SyncState::Alive,
        };
        d.handle_sync_answer(secs(0), SyncPayload { members: vec![n1] }, false);
        swaps(&mut d);
        // Names n0 has heard of: nothing to repair.
        d.handle_digest(secs(1), "n1", &[("n0".into(), 0), ("n1".into(), 3)]);
        assert!(swaps(&mut d).is_empty());
        // n1 holds entries of n2 and n3, whose joins n0 has not heard of
        // yet: not a miss until an anti-entropy interval (5 s) later.
        let n1_holds = [("n1".into(), 3), ("n2".into(), 1), ("n3".into(), 1)];
        d.handle_digest(secs(1), "n1", &n1_holds);
        d.handle_digest(secs(4), "n1", &[("n2".into(), 1), ("n4".into(), 1)]);
        assert!(swaps(&mut d).is_empty());
        // Still unheard: one swap with n1 for both n2 and n3, without
        // gossiping what n0 learns.
        d.handle_digest(secs(6), "n1", &[("n2".into(), 1)]);
        assert_eq!(swaps(&mut d), vec![("n1".to_owned(), false)]);
        assert_eq!(d.stats().repair_syncs, 1);
        // At most one repair per interval: n4 is due at 9 s, but waits.
        d.handle_digest(secs(9), "n1", &[("n4".into(), 1)]);
        assert!(swaps(&mut d).is_empty());
        d.handle_digest(secs(11), "n1", &[("n4".into(), 1)]);
        assert_eq!(swaps(&mut d), vec![("n1".to_owned(), false)]);
        // A name a swap did not teach waits a minute.
        d.handle_digest(secs(20), "n1", &[("n2".into(), 1)]);
        assert!(swaps(&mut d).is_empty());
        d.handle_digest(secs(70), "n1", &[("n2".into(), 1)]);
        assert_eq!(swaps(&mut d), vec![("n1".to_owned(), false)]);
        // n4's minute is up too (at 71 s, after the 70 s swap's interval).
        d.handle_digest(secs(80), "n9", &[("n5".into(), 1)]);
        assert_eq!(swaps(&mut d), vec![("n1".to_owned(), false)]);
        // First named by a sender n0 does not know either: a random
        // member (n1).
        d.handle_digest(secs(85), "n9", &[("n5".into(), 1)]);
        assert_eq!(swaps(&mut d), vec![("n1".to_owned(), false)]);
        assert_eq!(d.stats().repair_syncs, 5);
    }

    #[test]
    fn a_missed_join_is_repaired_when_due_without_waiting_for_another_digest() {
        use crate::sync::{SyncMember, SyncState};
        let ms = Duration::from_millis;
        // A short interval, so that n1 (which never answers here) is
        // still alive when n2 falls due.
        let replica = ReplicaConfig {
            anti_entropy_interval: ms(1000),
            ..ReplicaConfig::default()
        };
        let mut d = Driver::new(
            id(0, 1),
            &SwimConfig::default(),
            replica,
            JoinPlan::default(),
            7,
            ms(0),
        )
        .unwrap();
        let n1 = SyncMember {
            id: id(1, 1),
            incarnation: 0,
            state: SyncState::Alive,
        };
        d.handle_sync_answer(ms(0), SyncPayload { members: vec![n1] }, false);
        while d.poll_action().is_some() {}
        d.handle_digest(ms(100), "n1", &[("n2".into(), 1)]);
        assert_eq!(d.poll_timeout(), Some(ms(0)), "the join's swap is due");
        // No digest comes after this one: the timer alone repairs.
        let mut repairs = Vec::new();
        let mut now = ms(100);
        while now < ms(1500) {
            now += ms(50);
            let before = d.stats().repair_syncs;
            d.handle_timeout(now);
            while let Some(a) = d.poll_action() {
                if let Action::SyncMembers { peer, gossip, .. } = a
                    && d.stats().repair_syncs > before
                {
                    repairs.push((now, peer.name, gossip));
                }
            }
        }
        assert_eq!(repairs, vec![(ms(1100), "n1".to_owned(), false)]);
    }

    #[test]
    fn catalog_changes_reach_everyone_by_gossip_and_fetch() {
        let mut mesh = Mesh::new(8, ReplicaConfig::default());
        mesh.run_for(Duration::from_secs(3));
        mesh.publish(3);
        mesh.publish(3);
        mesh.run_for(Duration::from_secs(2));
        for i in (0..8).filter(|&i| i != 3) {
            assert_eq!(mesh.node(i).replica().held("n3"), 2, "node {i}");
        }
    }

    #[test]
    fn joining_makes_one_fetch_per_ordered_pair_and_leaves_nothing_waiting() {
        // Equal generations: the later name counts as newer.
        let n = 6;
        let mut mesh = Mesh::new(n, ReplicaConfig::default());
        mesh.versions = vec![1; n];
        mesh.run_for(Duration::from_secs(3));
        assert_eq!(
            mesh.fetches.len(),
            n * (n - 1),
            "one fetch per ordered pair"
        );
        let older_first: Vec<_> = mesh.uncontacted.iter().filter(|(i, j)| i < j).collect();
        assert!(
            older_first.is_empty(),
            "older members dialed newer ones they had not heard from: {older_first:?}"
        );
        assert!(
            mesh.uncontacted.iter().any(|(i, j)| i > j),
            "newer members do not wait: {:?}",
            mesh.uncontacted
        );
        for i in 0..n {
            assert_eq!(mesh.node(i).replica().wanted(), 0, "n{i}");
            assert!(!mesh.node(i).replica().is_waiting(), "n{i}");
        }
    }

    #[test]
    fn an_older_member_waits_for_the_newer_one_then_dials_at_its_deadline() {
        let mut mesh = Mesh::new(3, ReplicaConfig::default());
        mesh.versions = vec![1; 3];
        // n2 (newest) cannot reach n1: n1 hears of it only through n0.
        mesh.mute = Some((2, 1));
        mesh.run_for(Duration::from_secs(8));
        let first = |a: usize, b: usize| {
            mesh.fetch_times
                .iter()
                .find(|(_, i, j)| (*i, *j) == (a, b))
                .map(|(t, _, _)| *t)
        };
        let n0_got_n2 = first(0, 2).expect("n0 fetched n2");
        let n1_got_n2 = first(1, 2).expect("n1 fetched n2 at its deadline");
        assert!(
            n1_got_n2 >= n0_got_n2 + NEWER_MEMBER_WAIT / 2,
            "n1 dialed n2 at {n1_got_n2:?}, n0 (contacted) at {n0_got_n2:?}"
        );
        assert_eq!(mesh.node(1).replica().held("n2"), 1);
    }

    #[test]
    fn anti_entropy_repairs_a_change_made_while_cut_off() {
        let replica = ReplicaConfig {
            anti_entropy_interval: Duration::from_secs(1),
            ..ReplicaConfig::default()
        };
        let mut mesh = Mesh::new(4, replica);
        mesh.run_for(Duration::from_secs(3));
        // n2 changes its entry while nobody hears it, and comes back
        // before anyone suspects it: only digests can tell the others.
        mesh.cut = vec![2];
        mesh.publish(2);
        mesh.run_for(Duration::from_millis(200));
        mesh.cut.clear();
        // The notice went out while cut: lost. Drain its retransmissions.
        mesh.run_for(Duration::from_secs(5));
        for i in [0, 1, 3] {
            assert_eq!(mesh.node(i).replica().held("n2"), 1, "node {i}");
        }
    }

    #[test]
    fn crashed_node_is_disconnected_and_purged_after_the_window() {
        let replica = ReplicaConfig {
            anti_entropy_interval: Duration::from_secs(1),
            purge_after: Duration::from_secs(20),
        };
        let mut mesh = Mesh::new(4, replica);
        mesh.run_for(Duration::from_secs(3));
        mesh.publish(3);
        mesh.nodes[3] = None;
        mesh.run_for(Duration::from_secs(12));
        assert!(mesh.purged.is_empty());
        assert_eq!(mesh.alive(0), 2);
        mesh.run_for(Duration::from_secs(20));
        let mut purged: Vec<usize> = mesh
            .purged
            .iter()
            .filter(|(_, n)| n == "n3")
            .map(|(i, _)| *i)
            .collect();
        purged.sort();
        assert_eq!(purged, vec![0, 1, 2]);
    }

    #[test]
    fn a_stall_shorter_than_the_grace_raises_no_suspicion() {
        // Stalls of 1.5 s: a probe that catches one gets no ack within its
        // 1 s round, but the 800 ms grace covers the rest.
        let refutes = |swim: &SwimConfig| {
            let mut mesh = Mesh::with_swim(3, ReplicaConfig::default(), swim);
            mesh.run_for(Duration::from_secs(3));
            for _ in 0..20 {
                mesh.stall(1, Duration::from_millis(1_500));
                mesh.run_for(Duration::from_secs(3));
            }
            let late: u64 = (0..3)
                .map(|i| mesh.node(i).core().health_stats().late_acks)
                .sum();
            (mesh.node(1).core().health_stats().refuted, late)
        };
        let (refuted, late) = refutes(&SwimConfig::default());
        assert_eq!(refuted, 0, "never suspected");
        assert!(late > 0, "some probe was answered in its grace");
        let plain = SwimConfig {
            late_ack_grace: Duration::ZERO,
            ..SwimConfig::default()
        };
        let (refuted, _) = refutes(&plain);
        assert!(refuted > 0, "plain SWIM suspects a stalled node");
    }

    #[test]
    fn same_seed_same_run() {
        let run = || {
            let mut mesh = Mesh::new(5, ReplicaConfig::default());
            mesh.run_for(Duration::from_secs(4));
            mesh.publish(2);
            mesh.run_for(Duration::from_secs(2));
            (0..5)
                .map(|i| {
                    (
                        mesh.node(i).core().members(),
                        mesh.node(i).replica().digest(),
                    )
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    fn doc_stamp(version: u64, d: u8) -> DocStamp {
        DocStamp {
            version,
            digest: [d; 32],
        }
    }

    #[test]
    fn documents_spread_reach_joiners_and_agree_after_a_partition() {
        let mut mesh = Mesh::new(6, ReplicaConfig::default());
        // n5 stays out at first: it joins later.
        let late = mesh.nodes[5].take();
        mesh.run_for(Duration::from_secs(10));
        let key: DocKey = ("route".into(), "web".into());
        let now = mesh.now;
        mesh.nodes[2]
            .as_mut()
            .unwrap()
            .publish_doc(now, key.clone(), doc_stamp(1, 1), true)
            .unwrap();
        mesh.run_for(Duration::from_secs(2));
        for i in 0..5 {
            let d = mesh.nodes[i].as_ref().unwrap();
            assert_eq!(d.docs().held(&key), Some(doc_stamp(1, 1)), "n{i}");
            assert!(d.docs().synced(), "n{i}");
        }

        // A joiner catches up before it says it is synced.
        mesh.nodes[5] = late;
        for _ in 0..200 {
            mesh.run_for(Duration::from_millis(100));
            if mesh.nodes[5].as_ref().unwrap().docs().synced() {
                break;
            }
        }
        let joiner = mesh.nodes[5].as_ref().unwrap();
        assert!(joiner.docs().synced());
        assert_eq!(joiner.docs().held(&key), Some(doc_stamp(1, 1)));

        // Both sides of a cut write version 2; after the heal every node
        // holds the higher digest.
        mesh.cut = vec![0, 1];
        let now = mesh.now;
        mesh.nodes[0]
            .as_mut()
            .unwrap()
            .publish_doc(now, key.clone(), doc_stamp(2, 9), true)
            .unwrap();
        mesh.nodes[3]
            .as_mut()
            .unwrap()
            .publish_doc(now, key.clone(), doc_stamp(2, 4), true)
            .unwrap();
        mesh.run_for(Duration::from_secs(3));
        mesh.cut.clear();
        mesh.run_for(Duration::from_secs(30));
        for (i, d) in mesh.nodes.iter().enumerate() {
            let d = d.as_ref().unwrap();
            assert_eq!(d.docs().held(&key), Some(doc_stamp(2, 9)), "n{i}");
        }
    }
}
