//! The one task that owns the membership [`Driver`], and the I/O it asks
//! for.
//!
//! The driver (in `gossamer-membership`, shared with the simulator) decides
//! everything: when to announce, whom to swap member lists with, which
//! catalog entries to fetch from whom, when to compare digests, what to
//! purge and which connections to close. This task only feeds it
//! (datagrams, timers, results of the streams it asked for) and carries
//! out its actions on the transport, spawning one short task per stream.
//! Everyone else reads the published [`Snapshot`].
//!
//! # Layout
//! - [`join`]: dialing the seeds (their names come from their certificates).
//! - [`links`]: closing connections the cache no longer needs.
//! - [`sync`]: the member-list swap on QUIC streams.

pub mod join;
pub mod links;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use gossamer_membership::catalog::NodeEntry;
use gossamer_membership::docs::{DocKey, DocRef, DocStamp};
use gossamer_membership::driver::{Action, Driver};
use gossamer_membership::sync::SyncPayload;
use gossamer_membership::{Event, MembershipError, NodeId};
use gossamer_transport::{Inbound, Transport};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::catalog::{self, CatalogCounters};
use crate::documents::{self, Documents, Outcome, Source};
use crate::members::{Command, Snapshot};
use crate::metrics::Counters;
use crate::store::{SavedMember, SavedState, Store, unix_millis};
use crate::tasks::Tasks;

/// Results of the I/O the driver asked for, and requests from peers.
#[derive(Debug)]
pub enum Input {
    /// A seed answered; its certificate names it `name`.
    SeedReached {
        /// Its name.
        name: String,
        /// Where it answered.
        addr: std::net::SocketAddr,
    },
    /// Dialing a seed reached this node itself.
    SelfSeed,
    /// A peer sent its member list: merge it and answer with ours.
    SyncRequest {
        /// The peer (from its certificate).
        from: String,
        /// Its view.
        payload: SyncPayload,
        /// Where our encoded view goes.
        reply: oneshot::Sender<Vec<u8>>,
    },
    /// The answer to a swap this node started.
    SyncAnswer {
        /// Its view.
        payload: SyncPayload,
        /// Whether news in it is gossiped on.
        gossip: bool,
    },
    /// A fetch of `node`'s entry ended with this version, or failed.
    Fetched {
        /// The owner.
        node: String,
        /// The version fetched.
        version: Option<u64>,
    },
    /// A peer's catalog digest: the peer, its digest.
    PeerDigest(String, Vec<(String, u64)>),
    /// A document fetch ended: the stamp now held, or `None`.
    DocFetched {
        /// Kind and name.
        key: DocKey,
        /// Who it was fetched from.
        from: String,
        /// What is held now.
        got: Option<DocStamp>,
    },
    /// A comparison of document lists found them the same.
    DocsSame,
    /// A peer's document list (from a comparison either side started).
    DocList {
        /// The peer.
        peer: String,
        /// What it holds.
        list: Vec<DocRef>,
    },
}

/// How often the snapshot is refreshed even without events (suspicion is
/// not an event, but the API should show it).
const SNAPSHOT_EVERY: Duration = Duration::from_millis(200);
/// How often changed members are written to the data dir at most.
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// What the mesh task is wired to.
#[derive(Debug)]
pub struct Wiring {
    /// The transport (datagrams out, streams opened).
    pub transport: Transport,
    /// Datagrams in.
    pub datagrams: mpsc::Receiver<Inbound>,
    /// Requests from the admin API and shutdown.
    pub commands: mpsc::Receiver<Command>,
    /// Seeds as configured (`host:port`), resolved at every join attempt.
    pub seeds: Vec<String>,
    /// This node's catalog entry: every new version is announced.
    pub local_entry: watch::Receiver<Arc<NodeEntry>>,
    /// Where fetched entries and purges go.
    pub catalog: mpsc::Sender<catalog::Input>,
    /// Catalog sync counters.
    pub catalog_counters: Arc<CatalogCounters>,
    /// Membership counters.
    pub counters: Arc<Counters>,
    /// Members are saved here for the next start.
    pub store: Store,
    /// Configuration documents.
    pub documents: Arc<Documents>,
    /// Where the stream tasks run.
    pub tasks: Tasks,
}

/// The mesh task's state.
pub struct MeshTask {
    driver: Driver,
    wiring: Wiring,
    epoch: Instant,
    io_tx: mpsc::Sender<Input>,
    io_rx: mpsc::Receiver<Input>,
    catalog_rx: mpsc::Receiver<(String, CatalogNews)>,
    doc_lists_rx: mpsc::Receiver<(String, Vec<DocRef>)>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The core's members fingerprint when the member list was last built.
    members_fingerprint: u64,
    /// The revoked peers last published, and the generation they are of.
    revoked: (u64, Arc<std::collections::BTreeMap<String, String>>),
    dirty: bool,
    last_save: Instant,
    logged_join: bool,
}

impl std::fmt::Debug for MeshTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTask")
            .field("driver", &self.driver)
            .finish_non_exhaustive()
    }
}

/// What a peer's catalog stream tells the mesh task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogNews {
    /// The peer sent its digest.
    Digest(Vec<(String, u64)>),
    /// The peer fetched this node's entry: a connection from it is open
    /// (see [`Driver::handle_contact`]).
    Fetched,
}

/// Where peers' requests reach the mesh task.
#[derive(Debug, Clone)]
pub struct MeshInbox {
    /// Member-list swaps.
    pub sync: mpsc::Sender<Input>,
    /// Catalog digests and fetches from peers.
    pub catalog: mpsc::Sender<(String, CatalogNews)>,
    /// Document lists a peer sent us.
    pub doc_lists: mpsc::Sender<(String, Vec<DocRef>)>,
}

impl MeshTask {
    /// Wires the task around `driver`, whose clock started at `epoch`; run
    /// it with [`MeshTask::run`].
    pub fn new(
        driver: Driver,
        epoch: Instant,
        wiring: Wiring,
    ) -> (Self, watch::Receiver<Arc<Snapshot>>, MeshInbox) {
        let (snapshot, rx) =
            watch::channel(Arc::new(Snapshot::empty(driver.core().identity().clone())));
        let (io_tx, io_rx) = mpsc::channel(1024);
        let (catalog_tx, catalog_rx) = mpsc::channel(64);
        let (doc_lists_tx, doc_lists_rx) = mpsc::channel(16);
        let inbox = MeshInbox {
            sync: io_tx.clone(),
            catalog: catalog_tx,
            doc_lists: doc_lists_tx,
        };
        let task = Self {
            driver,
            wiring,
            epoch,
            io_tx,
            io_rx,
            catalog_rx,
            doc_lists_rx,
            snapshot,
            members_fingerprint: 0,
            revoked: (0, Arc::default()),
            dirty: false,
            last_save: Instant::now(),
            logged_join: false,
        };
        (task, rx, inbox)
    }

    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Runs until the command channel closes.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        if !self.wiring.seeds.is_empty() || self.driver.poll_timeout().is_some() {
            debug!(seeds = ?self.wiring.seeds, "joining");
        }
        self.publish_local();
        self.carry_out();
        loop {
            let deadline = self
                .driver
                .poll_timeout()
                .map(|at| self.epoch + at)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                command = self.wiring.commands.recv() => match command {
                    Some(c) => self.on_command(c),
                    None => break,
                },
                Some(item) = self.wiring.datagrams.recv() => self.on_datagram(item),
                Some(input) = self.io_rx.recv() => self.on_input(input),
                Some((peer, news)) = self.catalog_rx.recv() => {
                    let now = self.now();
                    match news {
                        CatalogNews::Digest(digest) => self.on_digest(now, &peer, &digest),
                        CatalogNews::Fetched => self.driver.handle_contact(now, &peer),
                    }
                }
                Some((peer, list)) = self.doc_lists_rx.recv() => {
                    let now = self.now();
                    self.driver.handle_doc_list(now, &peer, &list);
                }
                changed = self.wiring.local_entry.changed() => {
                    if changed.is_ok() {
                        self.publish_local();
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    let now = self.now();
                    let repairs = self.driver.stats().repair_syncs;
                    self.driver.handle_timeout(now);
                    self.log_repair(repairs, None);
                }
                _ = tick.tick() => {
                    self.publish();
                    self.maybe_save(false);
                    continue;
                }
            }
            self.carry_out();
        }
        self.maybe_save(true);
    }

    fn publish_local(&mut self) {
        let version = self.wiring.local_entry.borrow_and_update().version;
        if version == 0 {
            return;
        }
        let now = self.now();
        if let Err(e) = self.driver.publish_catalog(now, version) {
            warn!(error = %e, "catalog notice not queued; the change will spread by anti-entropy");
        }
    }

    fn on_command(&mut self, command: Command) {
        let now = self.now();
        match command {
            Command::Leave(reply) => {
                // Save who we knew before leaving: that is what a restart
                // rejoins through.
                self.maybe_save(true);
                if let Err(e) = self.driver.leave(now) {
                    warn!(error = %e, "leave notice not sent");
                }
                self.carry_out();
                self.publish();
                let _ = reply.send(());
            }
            Command::PublishDoc(key, stamp) => {
                if let Err(e) = self.driver.publish_doc(now, key, stamp, true) {
                    warn!(error = %e, "document notice not queued; it will spread by anti-entropy");
                }
            }
        }
    }

    fn on_datagram(&mut self, item: Inbound) {
        let Inbound::Datagram { from, data } = item else {
            // The transport delivers streams on their own queue.
            return;
        };
        let now = self.now();
        if let Err(e) = self.driver.handle_datagram(now, &from, &data) {
            match &e {
                MembershipError::IdentityMismatch { .. } => {
                    self.wiring.counters.identity_mismatch()
                }
                MembershipError::Decode(_) => self.wiring.counters.decode_error(),
                _ => {}
            }
            debug!(peer = %from, len = data.len(), error = %e, "datagram dropped");
        }
    }

    /// A peer's catalog digest (see [`Driver::handle_digest`]).
    fn on_digest(&mut self, now: Duration, peer: &str, digest: &[(String, u64)]) {
        let repairs = self.driver.stats().repair_syncs;
        self.driver.handle_digest(now, peer, digest);
        self.log_repair(repairs, Some(peer));
    }

    /// Logs a repair swap the driver started since it counted `before`:
    /// on a digest (`digest_from` is its sender) or when a name fell due.
    fn log_repair(&self, before: u64, digest_from: Option<&str>) {
        if self.driver.stats().repair_syncs > before {
            info!(
                digest_from,
                "catalog digests name members this node never heard of; swapping member lists"
            );
        }
    }

    fn on_input(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::SeedReached { name, addr } => self.driver.handle_seed(now, name, addr),
            Input::SelfSeed => self.driver.handle_self_seed(),
            Input::SyncRequest {
                from,
                payload,
                reply,
            } => match self.driver.handle_sync_request(now, payload) {
                Ok(ours) => {
                    debug!(peer = %from, "member sync served");
                    let _ = reply.send(ours);
                }
                Err(e) => warn!(error = %e, "member list too large to sync"),
            },
            Input::SyncAnswer { payload, gossip } => {
                let taken = self.driver.handle_sync_answer(now, payload, gossip);
                debug!(members = taken, "member sync done");
            }
            Input::Fetched { node, version } => self.driver.handle_fetched(now, &node, version),
            Input::PeerDigest(peer, digest) => self.on_digest(now, &peer, &digest),
            Input::DocFetched { key, from, got } => {
                self.driver.handle_doc_fetched(now, &key, &from, got);
            }
            Input::DocsSame => self.driver.handle_docs_same(),
            Input::DocList { peer, list } => self.driver.handle_doc_list(now, &peer, &list),
        }
    }

    /// Carries out every action and takes in every event.
    fn carry_out(&mut self) {
        while let Some(action) = self.driver.poll_action() {
            self.act(action);
        }
        let mut changed = false;
        while let Some(event) = self.driver.poll_event() {
            if matches!(event, Event::Connected) && !self.logged_join {
                self.logged_join = true;
                info!("joined the mesh");
                continue;
            }
            changed |= log_event(&event);
        }
        if changed {
            self.dirty = true;
            self.publish();
        }
    }

    fn act(&mut self, action: Action) {
        let w = &self.wiring;
        match action {
            Action::Send(t) => w.transport.send_datagram(&t.to.name, t.to.addr, t.data),
            Action::DialSeeds { attempt } => {
                let seeds = w.seeds.clone();
                let transport = w.transport.clone();
                let tx = self.io_tx.clone();
                self.spawn(join::dial_seeds(seeds, attempt, transport, tx));
            }
            Action::SyncMembers {
                peer,
                payload,
                gossip,
            } => {
                let (transport, tx, counters) =
                    (w.transport.clone(), self.io_tx.clone(), w.counters.clone());
                self.spawn(async move {
                    match sync::exchange(&transport, &peer, payload).await {
                        Ok(payload) => {
                            counters.member_sync(true);
                            let _ = tx.send(Input::SyncAnswer { payload, gossip }).await;
                        }
                        Err(e) => {
                            counters.member_sync(false);
                            debug!(peer = %peer.name, error = %e, "member sync failed");
                        }
                    }
                });
            }
            Action::Fetch { node, addr } => {
                let (transport, tx, catalog, counters) = (
                    w.transport.clone(),
                    self.io_tx.clone(),
                    w.catalog.clone(),
                    w.catalog_counters.clone(),
                );
                self.spawn(async move {
                    let version = match catalog::sync::fetch(&transport, &node, addr, &counters).await {
                        Ok(entry) => {
                            let version = entry.version;
                            let _ = catalog.send(catalog::Input::Merge(entry)).await;
                            Some(version)
                        }
                        Err(e) => {
                            debug!(peer = %node, error = %e, "fetch failed; retried at the next anti-entropy round");
                            None
                        }
                    };
                    let _ = tx.send(Input::Fetched { node, version }).await;
                });
            }
            Action::ExchangeDigest { peer, addr, digest } => {
                let (transport, tx, counters) = (
                    w.transport.clone(),
                    self.io_tx.clone(),
                    w.catalog_counters.clone(),
                );
                self.spawn(async move {
                    match catalog::sync::exchange_digest(&transport, &peer, addr, digest, &counters)
                        .await
                    {
                        Ok(theirs) => {
                            let _ = tx.send(Input::PeerDigest(peer, theirs)).await;
                        }
                        Err(e) => debug!(%peer, error = %e, "digest exchange failed"),
                    }
                });
            }
            Action::Purge { node } => {
                info!(%node, "purging the catalog entry of a node down for too long");
                if w.catalog.try_send(catalog::Input::Purge(node)).is_err() {
                    warn!("catalog task busy; the purge waits for the next round");
                }
            }
            Action::FetchDoc {
                key,
                stamp,
                from,
                addr,
            } => {
                let (transport, tx, docs) =
                    (w.transport.clone(), self.io_tx.clone(), w.documents.clone());
                self.spawn(async move {
                    let got = match documents::sync::fetch(&transport, &from, addr, &key).await {
                        Ok(Some(env)) => match docs.apply(env, Source::Peer(from.clone())) {
                            Ok(Outcome::Applied { stamp, .. }) | Ok(Outcome::Kept(stamp)) => {
                                Some(stamp)
                            }
                            Err(_) => None,
                        },
                        Ok(None) => {
                            debug!(peer = %from, kind = %key.0, name = %key.1, "peer no longer holds the document");
                            None
                        }
                        Err(e) => {
                            debug!(peer = %from, kind = %key.0, name = %key.1, version = stamp.version, error = %e, "document fetch failed");
                            None
                        }
                    };
                    let _ = tx.send(Input::DocFetched { key, from, got }).await;
                });
            }
            Action::ExchangeDocs { peer, addr, .. } => {
                let (transport, tx, docs) =
                    (w.transport.clone(), self.io_tx.clone(), w.documents.clone());
                self.spawn(async move {
                    match documents::sync::compare(&transport, &peer, addr, &docs).await {
                        Ok(documents::sync::Compared::Same) => {
                            let _ = tx.send(Input::DocsSame).await;
                        }
                        Ok(documents::sync::Compared::List(list)) => {
                            let _ = tx.send(Input::DocList { peer, list }).await;
                        }
                        Err(e) => debug!(%peer, error = %e, "document comparison failed"),
                    }
                });
            }
            Action::Disconnect { peer } => w.transport.disconnect(&peer),
            Action::DisconnectStale { peer } => {
                // Generations of restarts are the start time in unix ms; a
                // renewal in the same process adds 1 to the old one, which
                // makes the age its whole life and closes nothing. The
                // margin covers clock skew.
                let age = unix_millis().saturating_sub(peer.generation);
                w.transport
                    .disconnect_older_than(&peer.name, Duration::from_millis(age + 500));
            }
        }
    }

    fn spawn(&self, io: impl std::future::Future<Output = ()> + Send + 'static) {
        self.wiring.tasks.spawn(io);
    }

    fn revoked(&mut self) -> Arc<std::collections::BTreeMap<String, String>> {
        let revocations = self.wiring.transport.revocations();
        let generation = revocations.generation();
        if generation != self.revoked.0 {
            self.revoked = (generation, Arc::new(revocations.peers()));
        }
        self.revoked.1.clone()
    }

    fn publish(&mut self) {
        let core = self.driver.core();
        // Rebuilding the member list is O(members) and allocates; it runs
        // five times a second, so only when the fingerprint moved.
        let fingerprint = core.members_fingerprint();
        let members = if fingerprint == self.members_fingerprint {
            self.snapshot.borrow().members.clone()
        } else {
            self.members_fingerprint = fingerprint;
            Arc::new(core.members())
        };
        let snapshot = Snapshot {
            local: core.identity().clone(),
            local_incarnation: core.incarnation(),
            left: core.has_left(),
            members,
            active: core.num_active(),
            joined: self.driver.joined(),
            self_seed: self.driver.is_self_seed(),
            broadcast_bytes: core.broadcast_bytes(),
            held_down_notices: core.suppressed_turn_undead(),
            health_score: core.health_score(),
            health: core.health_stats(),
            suspicion_timeout_ms: core.suspicion_timeout().as_millis() as u64,
            docs_synced: self.driver.docs().synced(),
            docs_wanted: self.driver.docs().wanted(),
            revoked: self.revoked(),
        };
        self.snapshot.send_if_modified(|current| {
            let same = **current == snapshot;
            if !same {
                *current = Arc::new(snapshot);
            }
            !same
        });
    }

    fn maybe_save(&mut self, force: bool) {
        let core = self.driver.core();
        if !self.dirty || (!force && self.last_save.elapsed() < SAVE_EVERY) || core.has_left() {
            return;
        }
        let members: Vec<SavedMember> = core
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
            generation: core.identity().generation,
            members,
        };
        match self.wiring.store.save_state(&state) {
            Ok(()) => {
                self.dirty = false;
                self.last_save = Instant::now();
            }
            Err(e) => warn!(error = %e, "cannot save members"),
        }
    }
}

/// Logs a membership event; returns whether the member table changed.
fn log_event(event: &Event) -> bool {
    match event {
        Event::MemberUp(id) => info!(member = %id.name, addr = %id.addr, "member up"),
        Event::MemberDown(id) => warn!(member = %id.name, addr = %id.addr, "member down"),
        Event::MemberLeft(id) => info!(member = %id.name, "member left"),
        Event::MemberRenamed { old, new } => {
            info!(member = %new.name, old = old.generation, new = new.generation, "member restarted");
        }
        Event::Rejoined(id) => warn!(
            generation = id.generation,
            "declared down by peers; rejoined"
        ),
        Event::Connected => info!("reconnected to the mesh"),
        Event::Isolated => warn!("no other member reachable"),
        Event::SuspicionLingers(id) => {
            debug!(member = %id.name, "a suspicion heard here is still unresolved; swapping member lists");
            return false;
        }
        Event::CatalogNotice { .. } | Event::DocNotice { .. } => return false,
    }
    true
}

/// The saved members to rejoin through, this node excepted (their
/// generations are not known: 0).
pub fn saved_members(saved: &SavedState, local: &str) -> Vec<NodeId> {
    saved
        .members
        .iter()
        .filter(|m| m.name != local)
        .filter_map(|m| NodeId::new(m.name.clone(), m.addr, 0).ok())
        .collect()
}
