//! The driver around foca: time in, effects out.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, Timer};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::codec::{self, CodecError, WireCodec};
use crate::config::{InvalidSwimConfig, SwimConfig};
use crate::gossip::{CatalogNotice, GossipHandler, Leave};
use crate::identity::NodeId;
use crate::lifeguard::{HealthStats, Lifeguard, Verdict};
use crate::sync::{SyncMember, SyncPayload, SyncState};

/// A member's state as the mesh sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Missed a probe; will be declared down unless it refutes.
    Suspect,
    /// Declared down after suspicion ran out.
    Down,
    /// Left on purpose.
    Left,
}

impl MemberState {
    /// Lower-case name used by the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Suspect => "suspect",
            Self::Down => "down",
            Self::Left => "left",
        }
    }

    /// Whether the member should receive traffic.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Alive | Self::Suspect)
    }
}

/// One row of the member table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Who.
    pub id: NodeId,
    /// SWIM incarnation (bumped by the member to refute suspicion).
    pub incarnation: u16,
    /// What we believe.
    pub state: MemberState,
}

/// Something that happened to the membership, for the driver to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member became active.
    MemberUp(NodeId),
    /// A member was declared down.
    MemberDown(NodeId),
    /// A member left on purpose.
    MemberLeft(NodeId),
    /// A member restarted or rejoined under a newer generation.
    MemberRenamed {
        /// The identity it had.
        old: NodeId,
        /// The identity it has now.
        new: NodeId,
    },
    /// This node was declared down and rejoined with a new generation.
    Rejoined(NodeId),
    /// This node knows at least one other active member.
    Connected,
    /// This node knows no active member any more.
    Isolated,
    /// A suspicion of this member, heard from another node, is still
    /// unresolved here after [`HEARD_SUSPICION_FACTOR`] suspicion timeouts:
    /// this node most likely missed the verdict or the refutation (see
    /// `Membership::time_suspicions`).
    SuspicionLingers(NodeId),
    /// A node announced a new catalog version.
    CatalogNotice {
        /// The owner.
        node: String,
        /// Its new version.
        version: u64,
    },
    /// Gossip says `holder` holds document `key` at `stamp`.
    DocNotice {
        /// Kind and name.
        key: crate::docs::DocKey,
        /// Version and digest.
        stamp: crate::docs::DocStamp,
        /// Who holds it.
        holder: String,
    },
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The destination member.
    pub to: NodeId,
    /// Encoded SWIM message.
    pub data: Bytes,
}

/// Why an input was refused. Nothing changed when this is returned, except
/// for `Protocol`, where foca may have applied part of a valid prefix.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The bytes did not decode.
    #[error("undecodable datagram: {0}")]
    Decode(#[from] CodecError),
    /// The datagram claims another sender than the authenticated peer.
    #[error("datagram from {certified} claims to be from {claimed}")]
    IdentityMismatch {
        /// Name in the SWIM header.
        claimed: String,
        /// Name in the peer's certificate.
        certified: String,
    },
    /// foca refused the message.
    #[error("SWIM protocol error: {0}")]
    Protocol(String),
    /// Bad timing configuration.
    #[error(transparent)]
    Config(#[from] InvalidSwimConfig),
}

type Swim = Foca<NodeId, WireCodec, StdRng, GossipHandler>;

/// A suspicion heard from another node (not from our own failed probe) and
/// still unresolved after this many suspicion timeouts is reported as
/// [`Event::SuspicionLingers`]; see `Membership::time_suspicions`.
pub const HEARD_SUSPICION_FACTOR: u32 = 2;

/// The sans-IO membership core.
///
/// The caller owns the clock: every input carries `now`, the time elapsed
/// since any fixed epoch the caller picks. After each input, drain
/// [`Membership::poll_transmit`] and [`Membership::poll_event`], and call
/// [`Membership::handle_timeout`] when [`Membership::poll_timeout`] says so.
pub struct Membership {
    swim: Swim,
    gossip: GossipHandler,
    runtime: AccumulatingRuntime<NodeId>,
    timers: BTreeMap<(Duration, u64), Timer<NodeId>>,
    timer_seq: u64,
    now: Duration,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    left: bool,
    incarnation: u16,
    /// The generation `incarnation` belongs to.
    incarnation_of: u64,
    config: SwimConfig,
    /// The `max_transmissions` foca runs with now.
    transmissions: u8,
    /// The suspicion timeout foca runs with now.
    suspicion_timeout: Duration,
    /// "You are down" messages not sent because the member is active.
    suppressed_turn_undead: u64,
    lifeguard: Lifeguard,
    /// Suspicions heard from others, watched until a deadline here.
    suspect_timers: HashSet<(NodeId, u16)>,
    suspect_watch: BTreeMap<(Duration, u64), (NodeId, u16)>,
    /// Jitters foca's periodic timers (see [`Membership::drain`]).
    jitter: StdRng,
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("identity", self.swim.identity())
            .field("members", &self.swim.num_members())
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// A core for `identity`, with randomness from `seed`.
    pub fn new(identity: NodeId, config: &SwimConfig, seed: u64) -> Result<Self, MembershipError> {
        let gossip = GossipHandler::new(identity.name.clone());
        let foca_config = config.to_foca_for(1)?;
        let transmissions = foca_config.max_transmissions.get();
        let suspicion_timeout = foca_config.suspect_to_down_after;
        let swim = Foca::with_custom_broadcast(
            identity,
            foca_config,
            StdRng::seed_from_u64(seed),
            WireCodec,
            gossip.clone(),
        );
        Ok(Self {
            swim,
            gossip,
            runtime: AccumulatingRuntime::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            now: Duration::ZERO,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            left: false,
            incarnation: 0,
            incarnation_of: 0,
            config: config.clone(),
            transmissions,
            suspicion_timeout,
            suppressed_turn_undead: 0,
            lifeguard: Lifeguard::new(config.max_health_score, config.late_ack_grace),
            suspect_timers: HashSet::new(),
            suspect_watch: BTreeMap::new(),
            jitter: StdRng::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c908),
        })
    }

    /// This node's current identity (its generation changes on rejoin).
    pub fn identity(&self) -> &NodeId {
        self.swim.identity()
    }

    /// The SWIM settings this core was built with.
    pub fn config(&self) -> &SwimConfig {
        &self.config
    }

    /// Number of active members, not counting this node.
    pub fn num_active(&self) -> usize {
        self.swim.num_members()
    }

    /// This node's SWIM incarnation, as last put on the wire.
    pub fn incarnation(&self) -> u16 {
        self.incarnation
    }

    /// Whether `leave` was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// Asks `dst` to let us in (join through a seed or a remembered member).
    pub fn announce(&mut self, now: Duration, dst: NodeId) -> Result<(), MembershipError> {
        self.advance(now);
        let result = self.swim.announce(dst, &mut self.runtime);
        self.drain();
        result.map_err(protocol)
    }

    /// Feeds one datagram received from the peer whose certificate names
    /// `certified`.
    pub fn handle_datagram(
        &mut self,
        now: Duration,
        certified: &str,
        data: &[u8],
    ) -> Result<(), MembershipError> {
        self.advance(now);
        let header = codec::peek_header(data)?;
        if header.src.name != certified {
            return Err(MembershipError::IdentityMismatch {
                claimed: header.src.name,
                certified: certified.to_owned(),
            });
        }
        self.lifeguard.on_receive(&header.src, &header.message);
        let result = self.swim.handle_data(data, &mut self.runtime);
        self.drain();
        if result.is_ok() {
            let heard = codec::suspicions(data);
            self.time_suspicions(heard);
        }
        result.map_err(protocol)
    }

    /// When [`Membership::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Duration> {
        let timer = self.timers.keys().next().map(|(at, _)| *at);
        let watch = self.suspect_watch.keys().next().map(|(at, _)| *at);
        timer.into_iter().chain(watch).min()
    }

    /// Fires every timer due at or before `now`.
    pub fn handle_timeout(&mut self, now: Duration) {
        self.advance(now);
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (key, timer) = entry.remove_entry();
            if matches!(timer, Timer::ProbeRandomMember(_))
                && let Verdict::Defer(grace) = self.lifeguard.on_round_end()
            {
                self.timers.insert((key.0 + grace, key.1), timer);
                continue;
            }
            // A timer can only fail on internal inconsistencies foca already
            // recovers from; the next probe round proceeds regardless.
            let _ = self.swim.handle_timer(timer, &mut self.runtime);
            self.drain();
        }
        while let Some(entry) = self.suspect_watch.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let (id, incarnation) = entry.remove();
            self.suspect_timers.remove(&(id.clone(), incarnation));
            let lingers = self.swim.iter_membership_state().any(|m| {
                m.id() == &id && m.state() == foca::State::Suspect && m.incarnation() == incarnation
            });
            if lingers {
                self.events.push_back(Event::SuspicionLingers(id));
            }
        }
    }

    /// Announces that this node's catalog entry is now at `version`; peers
    /// with an older one will fetch it from us.
    pub fn publish_catalog(&mut self, now: Duration, version: u64) -> Result<(), MembershipError> {
        self.advance(now);
        let notice = CatalogNotice {
            node: self.identity().name.clone(),
            version,
        };
        self.swim
            .add_broadcast(&notice.encode()?)
            .map_err(protocol)?;
        Ok(())
    }

    /// Announces that this node holds document `key` at `stamp`; peers with
    /// an older one will fetch it.
    pub fn publish_doc(
        &mut self,
        now: Duration,
        key: &crate::docs::DocKey,
        stamp: crate::docs::DocStamp,
    ) -> Result<(), MembershipError> {
        self.advance(now);
        let notice = crate::gossip::DocNotice {
            kind: key.0.clone(),
            name: key.1.clone(),
            stamp,
            holder: self.identity().name.clone(),
        };
        self.swim
            .add_broadcast(&notice.encode()?)
            .map_err(protocol)?;
        Ok(())
    }

    /// Bytes of new broadcast items (leave and catalog notices) received.
    pub fn broadcast_bytes(&self) -> u64 {
        self.gossip.state().broadcast_bytes
    }

    /// Leaves the cluster: tells peers we are going, on purpose.
    pub fn leave(&mut self, now: Duration) -> Result<(), MembershipError> {
        self.advance(now);
        if self.left {
            return Ok(());
        }
        let id = self.identity().clone();
        let leave = Leave {
            name: id.name,
            generation: id.generation,
        };
        self.swim
            .add_broadcast(&leave.encode()?)
            .map_err(protocol)?;
        // Push the item (and our down update) to everyone we know, not only
        // to the usual fanout, so peers learn of it at once.
        for _ in 0..self.swim.num_members().div_ceil(3).max(1) {
            let _ = self.swim.gossip(&mut self.runtime);
        }
        let result = self.swim.leave_cluster(&mut self.runtime);
        self.left = true;
        self.drain();
        self.timers.clear();
        self.suspect_timers.clear();
        self.suspect_watch.clear();
        result.map_err(protocol)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// The next membership event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Every known member (active, and down ones not yet forgotten), sorted
    /// by name.
    pub fn members(&self) -> Vec<MemberView> {
        let gossip = self.gossip.state();
        let mut out: Vec<MemberView> = self
            .swim
            .iter_membership_state()
            .map(|m| {
                let state = match m.state() {
                    foca::State::Alive => MemberState::Alive,
                    foca::State::Suspect => MemberState::Suspect,
                    foca::State::Down if gossip.has_left(m.id()) => MemberState::Left,
                    foca::State::Down => MemberState::Down,
                };
                MemberView {
                    id: m.id().clone(),
                    incarnation: m.incarnation(),
                    state,
                }
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// A summary of [`Membership::members`] that changes whenever it does
    /// (barring a 64-bit hash collision), computed without allocating, so
    /// a caller that refreshes a view of the members often can skip the
    /// rebuild when nothing changed.
    pub fn members_fingerprint(&self) -> u64 {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let gossip = self.gossip.state();
        // foca reorders its members as it probes them, so the per-member
        // hashes are combined in an order-independent way.
        self.swim
            .iter_membership_state()
            .map(|m| {
                let mut h = DefaultHasher::new();
                m.id().hash(&mut h);
                m.incarnation().hash(&mut h);
                (m.state() as u8).hash(&mut h);
                gossip.has_left(m.id()).hash(&mut h);
                h.finish()
            })
            .fold(self.swim.num_members() as u64, u64::wrapping_add)
    }

    /// This node's whole view, itself included, for a push-pull sync (see
    /// [`crate::sync`]).
    pub fn sync_payload(&self) -> SyncPayload {
        let gossip = self.gossip.state();
        let mut members: Vec<SyncMember> = self
            .swim
            .iter_membership_state()
            .map(|m| SyncMember {
                id: m.id().clone(),
                incarnation: m.incarnation(),
                state: match m.state() {
                    foca::State::Alive => SyncState::Alive,
                    foca::State::Suspect => SyncState::Suspect,
                    foca::State::Down if gossip.has_left(m.id()) => SyncState::Left,
                    foca::State::Down => SyncState::Down,
                },
            })
            .collect();
        if !self.left {
            members.push(SyncMember {
                id: self.identity().clone(),
                incarnation: self.incarnation,
                state: SyncState::Alive,
            });
        }
        SyncPayload { members }
    }

    /// Takes in a peer's view from a push-pull sync: unknown members are
    /// added, newer generations and states win as they do in gossip. With
    /// `gossip`, what was news to this node is gossiped on like any update
    /// (after a partition heals, one sync across the cut then spreads each
    /// side's view through the other); a node that just joined passes
    /// `false`, since what it learns is news to nobody else. Returns how
    /// many records were taken.
    pub fn merge_sync(&mut self, now: Duration, payload: SyncPayload, gossip: bool) -> usize {
        self.advance(now);
        if self.left {
            return 0;
        }
        let count = payload.members.len();
        {
            let mut gossip = self.gossip.state();
            for m in &payload.members {
                if m.state == SyncState::Left {
                    gossip.note_left(&m.id);
                }
            }
        }
        let suspects: Vec<(NodeId, u16)> = payload
            .members
            .iter()
            .filter(|m| m.state == SyncState::Suspect)
            .map(|m| (m.id.clone(), m.incarnation))
            .collect();
        for m in payload.members {
            let state = match m.state {
                SyncState::Alive => foca::State::Alive,
                SyncState::Suspect => foca::State::Suspect,
                SyncState::Down | SyncState::Left => foca::State::Down,
            };
            let update = foca::Member::new(m.id, m.incarnation, state);
            // One record at a time: foca stops a batch at the first record
            // it refuses, and one bad record must not hide the others.
            let _ = self
                .swim
                .apply_many(std::iter::once(update), gossip, &mut self.runtime);
        }
        self.drain();
        self.time_suspicions(suspects);
        count
    }

    /// foca declares a suspect down only on the node whose probe failed;
    /// a node that hears the suspicion waits for that node's verdict, and
    /// if it misses it (the update is piggybacked a bounded number of
    /// times), holds the member suspect until it happens to probe it or
    /// sync: 20+ s in the simulator. So every suspicion heard is watched
    /// for [`HEARD_SUSPICION_FACTOR`] suspicion timeouts; one still
    /// unresolved then comes out as [`Event::SuspicionLingers`] and the
    /// driver swaps member lists with a peer, which brings the verdict or
    /// the refutation. Declaring the member down here instead would be
    /// wrong whenever it was the refutation that was missed, and foca's
    /// "down" is final everywhere it spreads: the simulator counted 61
    /// false `down` in 25 node-hours at 20 % loss that way, and 1 without.
    fn time_suspicions(&mut self, heard: Vec<(NodeId, u16)>) {
        for (id, incarnation) in heard {
            if id.name == self.identity().name
                || self.suspect_timers.contains(&(id.clone(), incarnation))
            {
                continue;
            }
            let held = self.swim.iter_membership_state().any(|m| {
                m.id() == &id && m.state() == foca::State::Suspect && m.incarnation() == incarnation
            });
            if !held {
                continue;
            }
            self.suspect_timers.insert((id.clone(), incarnation));
            self.timer_seq += 1;
            let after = self.suspicion_timeout * HEARD_SUSPICION_FACTOR;
            self.suspect_watch
                .insert((self.now + after, self.timer_seq), (id, incarnation));
        }
    }

    fn advance(&mut self, now: Duration) {
        // Time never goes backwards inside the core.
        self.now = self.now.max(now);
    }

    fn drain(&mut self) {
        while let Some((to, data)) = self.runtime.to_send() {
            if let Ok(header) = codec::peek_header(&data) {
                if header.src.generation != self.incarnation_of {
                    // A new identity starts its incarnations afresh.
                    self.incarnation_of = header.src.generation;
                    self.incarnation = header.src_incarnation;
                } else if header.src_incarnation > self.incarnation {
                    // foca raises its incarnation only to refute a
                    // suspicion of this node.
                    self.lifeguard.on_refute();
                    self.incarnation = header.src_incarnation;
                }
                self.lifeguard.on_send(&to, &header.message);
                if matches!(header.message, foca::Message::TurnUndead) && self.holds_active(&to) {
                    // foca sends "you are down" when a suspicion timer
                    // expires, even if the member refuted the suspicion in
                    // the meantime (it is still active here); the receiver
                    // would renew its identity for nothing.
                    self.suppressed_turn_undead += 1;
                    continue;
                }
            }
            self.transmits.push_back(Transmit { to, data });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            let after = self.lifeguard.stretch(&timer, after);
            // foca restarts its periodic timers whenever the identity
            // changes, and after a partition heals most nodes renew at
            // nearly the same instant: left alone, their announcements to
            // down members (what first reaches across a healed cut) would
            // then fire in step, up to a whole period late on every node.
            let after = match timer {
                Timer::PeriodicAnnounce(_)
                | Timer::PeriodicAnnounceDown(_)
                | Timer::PeriodicGossip(_) => {
                    after.mul_f64(0.75 + 0.5 * self.jitter.random::<f64>())
                }
                _ => after,
            };
            self.timers
                .insert((self.now + after, self.timer_seq), timer);
        }
        while let Some(n) = self.runtime.to_notify() {
            let event = match n {
                OwnedNotification::MemberUp(id) => Event::MemberUp(id),
                OwnedNotification::MemberDown(id) => {
                    if self.gossip.state().has_left(&id) {
                        Event::MemberLeft(id)
                    } else {
                        Event::MemberDown(id)
                    }
                }
                OwnedNotification::Rename(old, new) => Event::MemberRenamed { old, new },
                OwnedNotification::Rejoin(id) => Event::Rejoined(id),
                OwnedNotification::Active => Event::Connected,
                OwnedNotification::Idle => Event::Isolated,
                OwnedNotification::Defunct => continue,
            };
            self.events.push_back(event);
        }
        self.scale_transmissions();
        let (notices, doc_notices) = {
            let mut state = self.gossip.state();
            let notices: Vec<CatalogNotice> = state.notices.drain(..).collect();
            let docs: Vec<crate::gossip::DocNotice> = state.doc_notices.drain(..).collect();
            (notices, docs)
        };
        for n in notices {
            self.events.push_back(Event::CatalogNotice {
                node: n.node,
                version: n.version,
            });
        }
        for n in doc_notices {
            self.events.push_back(Event::DocNotice {
                key: (n.kind, n.name),
                stamp: n.stamp,
                holder: n.holder,
            });
        }
    }
}

impl Membership {
    /// Keeps the number of transmissions per update in step with the
    /// cluster's size (see [`SwimConfig::transmissions_for`]).
    fn scale_transmissions(&mut self) {
        let nodes = self.swim.num_members() + 1;
        let want = self.config.transmissions_for(nodes);
        let timeout = self.config.suspicion_timeout_for(nodes);
        if want == self.transmissions && timeout == self.suspicion_timeout {
            return;
        }
        // Only max_transmissions and the suspicion timeout differ from the
        // running configuration, which foca accepts at any time.
        if let Ok(config) = self.config.to_foca_for(nodes)
            && self.swim.set_config(config).is_ok()
        {
            self.transmissions = want;
            self.suspicion_timeout = timeout;
        }
    }

    /// Whether foca holds exactly `id` as alive or suspect.
    fn holds_active(&self, id: &NodeId) -> bool {
        self.swim
            .iter_membership_state()
            .any(|m| m.id() == id && m.state() != foca::State::Down)
    }

    /// "You are down" messages held back because their member had refuted
    /// the suspicion (see [`Membership::drain`]).
    pub fn suppressed_turn_undead(&self) -> u64 {
        self.suppressed_turn_undead
    }

    /// How many times each update is currently sent on.
    pub fn transmissions(&self) -> u8 {
        self.transmissions
    }

    /// How long a member stays suspect before it is declared down, now.
    pub fn suspicion_timeout(&self) -> Duration {
        self.suspicion_timeout
    }

    /// The local health score (0 = healthy; see [`crate::lifeguard`]).
    pub fn health_score(&self) -> u8 {
        self.lifeguard.score()
    }

    /// What the failure detector counted.
    pub fn health_stats(&self) -> HealthStats {
        self.lifeguard.stats()
    }
}

fn protocol(e: foca::Error) -> MembershipError {
    MembershipError::Protocol(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lossless in-memory network on manual time.
    struct Net {
        nodes: Vec<Option<Membership>>,
        now: Duration,
        /// Nodes whose datagrams (in and out) are dropped.
        cut: Vec<usize>,
    }

    impl Net {
        fn new(n: usize) -> Self {
            Self::with_config(n, &SwimConfig::default())
        }

        fn with_config(n: usize, config: &SwimConfig) -> Self {
            let nodes = (0..n)
                .map(|i| {
                    let id = NodeId::new(format!("n{i}"), ([10, 0, 0, i as u8], 7946).into(), 1)
                        .unwrap();
                    Some(Membership::new(id, config, i as u64).unwrap())
                })
                .collect();
            Self {
                nodes,
                now: Duration::ZERO,
                cut: Vec::new(),
            }
        }

        fn id(&self, i: usize) -> NodeId {
            self.nodes[i].as_ref().unwrap().identity().clone()
        }

        fn index(&self, name: &str) -> usize {
            name[1..].parse().unwrap()
        }

        /// Delivers every pending datagram until the network is quiet.
        fn deliver(&mut self) {
            loop {
                let mut moved = false;
                for i in 0..self.nodes.len() {
                    let Some(node) = self.nodes[i].as_mut() else {
                        continue;
                    };
                    let from = node.identity().name.clone();
                    let out: Vec<_> = std::iter::from_fn(|| node.poll_transmit()).collect();
                    for t in out {
                        moved = true;
                        let j = self.index(&t.to.name);
                        if self.cut.contains(&i) || self.cut.contains(&j) {
                            continue;
                        }
                        if let Some(dst) = self.nodes[j].as_mut() {
                            let _ = dst.handle_datagram(self.now, &from, &t.data);
                        }
                    }
                }
                if !moved {
                    break;
                }
            }
        }

        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += Duration::from_millis(10);
                for node in self.nodes.iter_mut().flatten() {
                    node.handle_timeout(self.now);
                }
                self.deliver();
            }
        }

        fn view(&self, i: usize) -> Vec<(String, MemberState)> {
            self.nodes[i]
                .as_ref()
                .unwrap()
                .members()
                .into_iter()
                .map(|m| (m.id.name, m.state))
                .collect()
        }
    }

    fn joined(n: usize) -> Net {
        join(Net::new(n))
    }

    fn join(mut net: Net) -> Net {
        let n = net.nodes.len();
        let seed = net.id(0);
        for i in 1..n {
            let now = net.now;
            net.nodes[i]
                .as_mut()
                .unwrap()
                .announce(now, seed.clone())
                .unwrap();
        }
        net.deliver();
        net.run_for(Duration::from_secs(3));
        net
    }

    #[test]
    fn nodes_join_through_one_seed() {
        let net = joined(5);
        for i in 0..5 {
            let view = net.view(i);
            assert_eq!(view.len(), 4, "node {i} sees {view:?}");
            assert!(view.iter().all(|(_, s)| *s == MemberState::Alive));
        }
    }

    #[test]
    fn transmissions_follow_cluster_size() {
        let config = SwimConfig {
            max_transmissions: 2,
            retransmit_mult: 3,
            ..SwimConfig::default()
        };
        let lone = Membership::new(
            NodeId::new("a", ([10, 0, 0, 1], 1).into(), 1).unwrap(),
            &config,
            1,
        )
        .unwrap();
        assert_eq!(lone.transmissions(), 3);
        // 12 nodes: two digits.
        let mut net = join(Net::with_config(12, &config));
        for i in 0..12 {
            assert_eq!(
                net.nodes[i].as_ref().unwrap().transmissions(),
                6,
                "node {i}"
            );
        }
        // Down to 9 live members: back to one digit.
        for i in 9..12 {
            net.nodes[i] = None;
        }
        net.run_for(Duration::from_secs(15));
        assert_eq!(net.nodes[0].as_ref().unwrap().transmissions(), 3);
    }

    #[test]
    fn sync_joins_two_clusters_and_carries_leaves() {
        let mut net = Net::new(5);
        for (joiner, seed) in [(1, 0), (3, 2), (4, 2)] {
            let (now, dst) = (net.now, net.id(seed));
            net.nodes[joiner]
                .as_mut()
                .unwrap()
                .announce(now, dst)
                .unwrap();
        }
        net.deliver();
        net.run_for(Duration::from_secs(2));
        // n4 leaves its side; n2 keeps it as left.
        let now = net.now;
        net.nodes[4].as_mut().unwrap().leave(now).unwrap();
        net.deliver();
        net.nodes[4] = None;
        net.run_for(Duration::from_secs(1));
        assert_eq!(net.view(0).len(), 1, "{:?}", net.view(0));

        let from_2 = net.nodes[2].as_ref().unwrap().sync_payload();
        let from_0 = net.nodes[0].as_ref().unwrap().sync_payload();
        let now = net.now;
        assert_eq!(
            net.nodes[0].as_mut().unwrap().merge_sync(now, from_2, true),
            3
        );
        net.nodes[2].as_mut().unwrap().merge_sync(now, from_0, true);
        let view = net.view(0);
        assert!(
            view.contains(&("n2".into(), MemberState::Alive)),
            "{view:?}"
        );
        assert!(
            view.contains(&("n3".into(), MemberState::Alive)),
            "{view:?}"
        );
        assert!(view.contains(&("n4".into(), MemberState::Left)), "{view:?}");
        assert!(net.view(2).contains(&("n0".into(), MemberState::Alive)));
        // Gossip and probes take it from there: everyone sees everyone.
        net.run_for(Duration::from_secs(5));
        for i in 0..4 {
            let alive = net
                .view(i)
                .iter()
                .filter(|(_, s)| *s == MemberState::Alive)
                .count();
            assert_eq!(alive, 3, "node {i}: {:?}", net.view(i));
        }
    }

    #[test]
    fn refuted_suspicion_does_not_renew_the_suspect() {
        let mut net = joined(3);
        let generation = net.id(1).generation;
        // Cut n1 off long enough to be suspected, not declared down.
        net.cut = vec![1];
        net.run_for(Duration::from_millis(2_500));
        net.cut.clear();
        net.run_for(Duration::from_secs(10));
        let suppressed: u64 = net
            .nodes
            .iter()
            .flatten()
            .map(Membership::suppressed_turn_undead)
            .sum();
        assert!(
            suppressed > 0,
            "no suspicion timer expired after a refutation"
        );
        assert_eq!(net.id(1).generation, generation, "n1 renewed its identity");
        for i in [0, 2] {
            assert!(net.view(i).contains(&("n1".into(), MemberState::Alive)));
        }
    }

    #[test]
    fn members_fingerprint_moves_only_with_the_member_list() {
        let mut net = joined(5);
        let fp = |net: &Net| net.nodes[0].as_ref().unwrap().members_fingerprint();
        let before = fp(&net);
        // Probing reorders foca's members; the fingerprint must not care.
        net.run_for(Duration::from_secs(10));
        assert_eq!(fp(&net), before, "nothing changed");
        net.nodes[3] = None;
        net.run_for(Duration::from_secs(10));
        assert!(net.view(0).contains(&("n3".into(), MemberState::Down)));
        assert_ne!(fp(&net), before, "n3 went down");
    }

    #[test]
    fn crash_is_detected_as_down() {
        let mut net = joined(5);
        net.nodes[3] = None;
        net.run_for(Duration::from_secs(10));
        for i in [0, 1, 2, 4] {
            assert!(
                net.view(i).contains(&("n3".into(), MemberState::Down)),
                "node {i}: {:?}",
                net.view(i)
            );
        }
    }

    #[test]
    fn leave_is_seen_as_left_quickly() {
        let mut net = joined(5);
        let now = net.now;
        net.nodes[2].as_mut().unwrap().leave(now).unwrap();
        net.deliver();
        net.nodes[2] = None;
        net.run_for(Duration::from_secs(1));
        for i in [0, 1, 3, 4] {
            assert!(
                net.view(i).contains(&("n2".into(), MemberState::Left)),
                "node {i}: {:?}",
                net.view(i)
            );
        }
    }

    #[test]
    fn restart_with_newer_generation_replaces_old_self() {
        let mut net = joined(3);
        net.nodes[2] = None;
        net.run_for(Duration::from_secs(10));
        let id = NodeId::new("n2", ([10, 0, 0, 2], 7946).into(), 2).unwrap();
        let mut fresh = Membership::new(id, &SwimConfig::default(), 99).unwrap();
        fresh.announce(net.now, net.id(0)).unwrap();
        net.nodes[2] = Some(fresh);
        net.deliver();
        net.run_for(Duration::from_secs(3));
        for i in 0..3 {
            let view = net.view(i);
            assert!(
                view.iter().all(|(_, s)| *s == MemberState::Alive),
                "node {i}: {view:?}"
            );
            assert_eq!(view.len(), 2);
        }
    }

    #[test]
    fn spoofed_sender_is_refused() {
        let mut net = joined(2);
        let mut other = Net::new(3);
        let now = net.now;
        // n2 announces to n0 but the datagram arrives on a connection
        // certified as "n1".
        other.nodes[2]
            .as_mut()
            .unwrap()
            .announce(now, net.id(0))
            .unwrap();
        let t = other.nodes[2].as_mut().unwrap().poll_transmit().unwrap();
        let before = net.view(0);
        let err = net.nodes[0]
            .as_mut()
            .unwrap()
            .handle_datagram(now, "n1", &t.data)
            .unwrap_err();
        assert!(matches!(err, MembershipError::IdentityMismatch { .. }));
        assert_eq!(net.view(0), before, "nothing changed");
    }

    #[test]
    fn catalog_notice_reaches_everyone_once() {
        let mut net = joined(8);
        for node in net.nodes.iter_mut().flatten() {
            while node.poll_event().is_some() {}
        }
        let now = net.now;
        net.nodes[3]
            .as_mut()
            .unwrap()
            .publish_catalog(now, 7)
            .unwrap();
        net.run_for(Duration::from_secs(3));
        for (i, node) in net.nodes.iter_mut().enumerate() {
            let node = node.as_mut().unwrap();
            let notices: Vec<_> = std::iter::from_fn(|| node.poll_event())
                .filter(|e| matches!(e, Event::CatalogNotice { .. }))
                .collect();
            if i == 3 {
                assert!(notices.is_empty(), "no notice about ourselves");
            } else {
                assert_eq!(
                    notices,
                    vec![Event::CatalogNotice {
                        node: "n3".into(),
                        version: 7
                    }],
                    "node {i}"
                );
            }
        }
    }

    #[test]
    fn a_suspicion_heard_from_others_is_watched_here_too() {
        use foca::Codec as _;
        let mut net = joined(3);
        let (n1, n2) = (net.id(1), net.id(2));
        let n0 = net.nodes[0].as_mut().unwrap();
        let incarnation = n0
            .members()
            .iter()
            .find(|m| m.id == n2)
            .unwrap()
            .incarnation;
        // n1 tells n0 (and nobody else) that n2 is suspect; n2's "down"
        // never arrives.
        let mut data = Vec::new();
        let header = foca::Header {
            src: n1.clone(),
            src_incarnation: 0,
            dst: n0.identity().clone(),
            message: foca::Message::Gossip,
        };
        WireCodec.encode_header(&header, &mut data).unwrap();
        data.extend_from_slice(&1u16.to_be_bytes());
        let update = foca::Member::new(n2.clone(), incarnation, foca::State::Suspect);
        WireCodec.encode_member(&update, &mut data).unwrap();
        let now = net.now;
        n0.handle_datagram(now, &n1.name, &data).unwrap();
        assert!(
            n0.members()
                .iter()
                .any(|m| m.id == n2 && m.state == MemberState::Suspect)
        );
        while n0.poll_event().is_some() {}
        n0.handle_timeout(now + n0.suspicion_timeout());
        assert!(
            std::iter::from_fn(|| n0.poll_event())
                .all(|e| e != Event::SuspicionLingers(n2.clone())),
            "the prober's verdict is given time to arrive first"
        );
        n0.handle_timeout(now + n0.suspicion_timeout() * HEARD_SUSPICION_FACTOR);
        let events: Vec<Event> = std::iter::from_fn(|| n0.poll_event()).collect();
        assert!(
            events.contains(&Event::SuspicionLingers(n2.clone())),
            "n0 reports the suspicion it could not resolve: {events:?}"
        );
        assert!(
            !events.contains(&Event::MemberDown(n2.clone())),
            "and declares nothing on hearsay"
        );
    }

    #[test]
    fn same_seed_same_run() {
        let a = joined(6);
        let b = joined(6);
        for i in 0..6 {
            assert_eq!(a.view(i), b.view(i));
        }
    }
}
