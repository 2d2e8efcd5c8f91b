//! The one task that owns the membership core.
//!
//! Inputs arrive on channels (datagrams from the transport, commands from the
//! join loop and the admin API) or from the timer queue; outputs are sent on
//! the transport right away. Everyone else reads the published [`Snapshot`].

use std::sync::Arc;
use std::time::Duration;

use gossamer_membership::sync::{SYNC_AFTER_RENEWAL, interval_for};
use gossamer_membership::{Event, MemberState, MemberView, Membership, MembershipError, NodeId};
use gossamer_transport::{Inbound, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::sync::SyncInput;
use crate::metrics::Counters;
use crate::store::{SavedMember, SavedState, Store};

/// Requests to the membership task.
#[derive(Debug)]
pub enum Command {
    /// Ask a peer to let us in.
    Announce(NodeId),
    /// Leave the mesh; replies once the leave notices are on the wire.
    Leave(oneshot::Sender<()>),
    /// Announce our catalog entry's new version.
    PublishCatalog(u64),
}

/// What the rest of the agent sees of the membership.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// This node.
    pub local: NodeId,
    /// This node's SWIM incarnation.
    pub local_incarnation: u16,
    /// Whether this node has left.
    pub left: bool,
    /// Other members, sorted by name.
    pub members: Vec<MemberView>,
    /// Active members besides us.
    pub active: usize,
    /// Whether we ever had another active member.
    pub joined: bool,
    /// Bytes of new gossip broadcast items received.
    pub broadcast_bytes: u64,
    /// "You are down" messages held back because the member had refuted
    /// the suspicion.
    pub held_down_notices: u64,
}

impl Snapshot {
    /// Members per state, this node included.
    pub fn count(&self, state: MemberState) -> usize {
        let local = if self.left {
            MemberState::Left
        } else {
            MemberState::Alive
        };
        self.members.iter().filter(|m| m.state == state).count() + usize::from(local == state)
    }
}

/// How often the snapshot is refreshed even without events (suspicion is
/// not an event, but the API should show it).
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);
/// How often changed members are written to the data dir at most.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// The membership task's state.
pub struct SwimTask {
    core: Membership,
    transport: Transport,
    inbound: mpsc::Receiver<Inbound>,
    commands: mpsc::Receiver<Command>,
    catalog: Option<mpsc::Sender<crate::catalog::Input>>,
    epoch: Instant,
    snapshot: watch::Sender<Arc<Snapshot>>,
    counters: Arc<Counters>,
    store: Store,
    joined: bool,
    dirty: bool,
    last_save: Instant,
    sync_in: mpsc::Receiver<SyncInput>,
    sync_tx: mpsc::Sender<SyncInput>,
    sync_base: Duration,
    next_sync: Instant,
    /// A one-off sync outside the periodic schedule, and whether news from
    /// it is gossiped on (see [`SYNC_AFTER_RENEWAL`]).
    extra_sync: Option<(Instant, bool)>,
}

impl std::fmt::Debug for SwimTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwimTask")
            .field("core", &self.core)
            .finish_non_exhaustive()
    }
}

impl SwimTask {
    /// Wires the task; run it with [`SwimTask::run`].
    pub fn new(
        core: Membership,
        transport: Transport,
        inbound: mpsc::Receiver<Inbound>,
        commands: mpsc::Receiver<Command>,
        counters: Arc<Counters>,
        store: Store,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (snapshot, rx) = watch::channel(Arc::new(Snapshot {
            local: core.identity().clone(),
            local_incarnation: 0,
            left: false,
            members: Vec::new(),
            active: 0,
            joined: false,
            broadcast_bytes: 0,
            held_down_notices: 0,
        }));
        let now = Instant::now();
        let (sync_tx, sync_in) = mpsc::channel(64);
        let sync_base = core.config().sync_interval;
        let task = Self {
            core,
            transport,
            inbound,
            commands,
            catalog: None,
            epoch: now,
            snapshot,
            counters,
            store,
            joined: false,
            dirty: false,
            last_save: now,
            sync_in,
            sync_tx,
            sync_base,
            // A sync follows the join (see `Event::Connected`); periodic
            // ones start at a random point of the first interval.
            next_sync: now + sync_base.mul_f64(rand::random::<f64>()),
            extra_sync: None,
        };
        (task, rx)
    }

    /// Where inbound sync streams hand their requests.
    pub fn sync_sender(&self) -> mpsc::Sender<SyncInput> {
        self.sync_tx.clone()
    }

    /// Where catalog notices go.
    pub fn set_catalog(&mut self, catalog: mpsc::Sender<crate::catalog::Input>) {
        self.catalog = Some(catalog);
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Runs until the command channel closes.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = self
                .core
                .poll_timeout()
                .map(|at| self.epoch + at)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let extra_at = self.extra_sync.map_or(deadline, |(at, _)| at);
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some(item) = self.inbound.recv() => self.on_inbound(item),
                Some(input) = self.sync_in.recv() => self.on_sync(input),
                () = tokio::time::sleep_until(self.next_sync) => self.start_sync(true, true),
                () = tokio::time::sleep_until(extra_at), if self.extra_sync.is_some() => {
                    let gossip = self.extra_sync.take().is_some_and(|(_, g)| g);
                    self.start_sync(false, gossip);
                }
                () = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    self.core.handle_timeout(now);
                }
                _ = tick.tick() => {
                    self.publish();
                    self.maybe_save(false);
                    continue;
                }
            }
            self.flush();
        }
        self.maybe_save(true);
    }

    fn on_command(&mut self, command: Command) {
        let now = self.now();
        match command {
            Command::Announce(dst) => {
                if let Err(e) = self.core.announce(now, dst.clone()) {
                    debug!(peer = %dst, error = %e, "announce failed");
                }
            }
            Command::PublishCatalog(version) => {
                if let Err(e) = self.core.publish_catalog(now, version) {
                    warn!(error = %e, "catalog notice not queued");
                }
            }
            Command::Leave(reply) => {
                // Save who we knew before leaving: that is what a restart
                // rejoins through.
                self.maybe_save(true);
                if let Err(e) = self.core.leave(now) {
                    warn!(error = %e, "leave notice not sent");
                }
                self.flush();
                self.publish();
                let _ = reply.send(());
            }
        }
    }

    fn on_inbound(&mut self, item: Inbound) {
        match item {
            Inbound::Datagram { from, data } => {
                let now = self.now();
                if let Err(e) = self.core.handle_datagram(now, &from, &data) {
                    match &e {
                        MembershipError::IdentityMismatch { .. } => {
                            self.counters.identity_mismatch()
                        }
                        MembershipError::Decode(_) => self.counters.decode_error(),
                        _ => {}
                    }
                    debug!(peer = %from, len = data.len(), error = %e, "datagram dropped");
                }
            }
            Inbound::Stream { .. } => {
                // The transport delivers streams on their own queue.
            }
        }
    }

    /// Swaps member lists with one random active member (push-pull sync);
    /// a periodic sync also schedules the next one. With `gossip`, news in
    /// the answer is gossiped on.
    fn start_sync(&mut self, periodic: bool, gossip: bool) {
        let active: Vec<NodeId> = self
            .core
            .members()
            .into_iter()
            .filter(|m| m.state.is_active())
            .map(|m| m.id)
            .collect();
        // Jitter (0.5..1.5 of the interval) keeps nodes from syncing in step.
        if periodic {
            let interval = interval_for(self.sync_base, active.len() + 1);
            self.next_sync = Instant::now() + interval.mul_f64(0.5 + rand::random::<f64>());
        }
        if active.is_empty() || self.core.has_left() {
            return;
        }
        let peer = active[rand::random_range(0..active.len())].clone();
        let ours = match self.core.sync_payload().encode() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "member list too large to sync");
                return;
            }
        };
        let (transport, tx, counters) = (
            self.transport.clone(),
            self.sync_tx.clone(),
            self.counters.clone(),
        );
        tokio::spawn(async move {
            match super::sync::exchange(&transport, &peer, ours).await {
                Ok(payload) => {
                    counters.member_sync(true);
                    let from = peer.name;
                    let answer = SyncInput::Answer {
                        from,
                        payload,
                        gossip,
                    };
                    let _ = tx.send(answer).await;
                }
                Err(e) => {
                    counters.member_sync(false);
                    debug!(peer = %peer.name, error = %e, "member sync failed");
                }
            }
        });
    }

    fn on_sync(&mut self, input: SyncInput) {
        let now = self.now();
        match input {
            SyncInput::Request {
                from,
                payload,
                reply,
            } => {
                let ours = self.core.sync_payload().encode();
                let taken = self.core.merge_sync(now, payload, true);
                debug!(peer = %from, members = taken, "member sync served");
                match ours {
                    Ok(bytes) => {
                        let _ = reply.send(bytes);
                    }
                    Err(e) => warn!(error = %e, "member list too large to sync"),
                }
            }
            SyncInput::Answer {
                from,
                payload,
                gossip,
            } => {
                let taken = self.core.merge_sync(now, payload, gossip);
                debug!(peer = %from, members = taken, "member sync done");
            }
        }
    }

    fn flush(&mut self) {
        while let Some(t) = self.core.poll_transmit() {
            self.transport.send_datagram(&t.to.name, t.to.addr, t.data);
        }
        let mut changed = false;
        while let Some(event) = self.core.poll_event() {
            match &event {
                Event::MemberUp(id) => info!(member = %id.name, addr = %id.addr, "member up"),
                Event::MemberDown(id) => {
                    warn!(member = %id.name, addr = %id.addr, "member down");
                    self.transport.disconnect(&id.name);
                }
                Event::MemberLeft(id) => {
                    info!(member = %id.name, "member left");
                    self.transport.disconnect(&id.name);
                }
                Event::MemberRenamed { old, new } => {
                    info!(member = %new.name, old = old.generation, new = new.generation, "member restarted");
                    // Connections to the process before the restart are dead
                    // (requests on them would wait for their timeout).
                    // Generations of restarts are the start time in unix
                    // ms; a renewal in the same process adds 1 to the old
                    // one, which makes the age its whole life and closes
                    // nothing. The margin covers clock skew.
                    let age = crate::agent::unix_millis().saturating_sub(new.generation);
                    self.transport
                        .disconnect_older_than(&new.name, Duration::from_millis(age + 500));
                }
                Event::Rejoined(id) => {
                    warn!(
                        generation = id.generation,
                        "declared down by peers; rejoined"
                    );
                    // Probably cut off: once the rejoin has spread, swap
                    // lists once more to pick up what was missed meanwhile.
                    if self.extra_sync.is_none() {
                        let delay = SYNC_AFTER_RENEWAL.mul_f64(0.5 + rand::random::<f64>());
                        self.extra_sync = Some((Instant::now() + delay, true));
                    }
                }
                Event::Connected => {
                    if !self.joined {
                        info!("joined the mesh");
                        // Learn every member at once rather than one update
                        // at a time.
                        self.extra_sync = Some((Instant::now(), false));
                    }
                    self.joined = true;
                }
                Event::Isolated => warn!("no other member reachable"),
                Event::CatalogNotice { node, version } => {
                    let notice = crate::catalog::Input::Notice {
                        node: node.clone(),
                        version: *version,
                    };
                    if let Some(catalog) = &self.catalog
                        && catalog.try_send(notice).is_err()
                    {
                        debug!("catalog task busy; notice left to anti-entropy");
                    }
                    continue;
                }
            }
            changed = true;
        }
        if changed {
            self.dirty = true;
            self.publish();
        }
    }

    fn publish(&mut self) {
        let members = self.core.members();
        let active = self.core.num_active();
        let snapshot = Snapshot {
            local: self.core.identity().clone(),
            local_incarnation: self.core.incarnation(),
            left: self.core.has_left(),
            members,
            active,
            joined: self.joined,
            broadcast_bytes: self.core.broadcast_bytes(),
            held_down_notices: self.core.suppressed_turn_undead(),
        };
        self.snapshot.send_if_modified(|current| {
            let same = current.members == snapshot.members
                && current.local == snapshot.local
                && current.left == snapshot.left
                && current.joined == snapshot.joined
                && current.local_incarnation == snapshot.local_incarnation
                && current.broadcast_bytes == snapshot.broadcast_bytes
                && current.held_down_notices == snapshot.held_down_notices;
            if !same {
                *current = Arc::new(snapshot);
            }
            !same
        });
    }

    fn maybe_save(&mut self, force: bool) {
        if !self.dirty || (!force && self.last_save.elapsed() < SAVE_EVERY) || self.core.has_left()
        {
            return;
        }
        let members: Vec<SavedMember> = self
            .core
            .members()
            .into_iter()
            .filter(|m| m.state.is_active())
            .map(|m| SavedMember {
                name: m.id.name,
                addr: m.id.addr,
            })
            .collect();
        if members.is_empty() {
            // Keep the last useful list rather than forgetting everyone.
            return;
        }
        let state = SavedState {
            generation: self.core.identity().generation,
            members,
        };
        match self.store.save_state(&state) {
            Ok(()) => {
                self.dirty = false;
                self.last_save = Instant::now();
            }
            Err(e) => warn!(error = %e, "cannot save members"),
        }
    }
}
