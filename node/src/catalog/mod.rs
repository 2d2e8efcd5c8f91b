//! The catalog task: owns this node's registrations, health, and its copy
//! of every node's entry; fetches entries from their owners when gossip or
//! anti-entropy says they changed.
//!
//! Inputs: registrations from the admin API, health results, catalog
//! notices from the membership task, digests from sync streams, and the
//! membership snapshot (a member that appears or restarts is fetched at
//! once). Output: a `watch` of the merged catalog for the API, the metrics
//! and the proxy.

pub mod health;
pub mod registry;
pub mod sync;
pub mod view;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gossamer_membership::catalog::{Catalog, Health, MAX_SERVICES_PER_NODE, NodeEntry};
use gossamer_transport::Transport;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::agent::swim::{Command, Snapshot};
use crate::store::Store;
use registry::{SavedServices, ServiceSpec};

const SERVICES_FILE: &str = "services.json";

/// Catalog timing (`[catalog]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogConfig {
    /// How often to compare digests with a random peer.
    #[serde(with = "gossamer_membership::duration")]
    pub anti_entropy_interval: Duration,
    /// How long entries of down or departed nodes are kept (shown
    /// `unavailable`) before they are dropped.
    #[serde(with = "gossamer_membership::duration")]
    pub purge_after: Duration,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            anti_entropy_interval: Duration::from_secs(5),
            purge_after: Duration::from_secs(15 * 60),
        }
    }
}

/// Sync and health counters.
#[derive(Debug, Default)]
pub struct CatalogCounters {
    /// Fetches that succeeded / failed.
    pub fetch_ok: AtomicU64,
    /// Fetches that failed.
    pub fetch_err: AtomicU64,
    /// Digest exchanges that succeeded.
    pub digest_ok: AtomicU64,
    /// Digest exchanges that failed.
    pub digest_err: AtomicU64,
    /// Microseconds spent in syncs we started.
    pub sync_micros: AtomicU64,
    /// Sync frame bytes received.
    pub bytes_in: AtomicU64,
    /// Sync frame bytes sent.
    pub bytes_out: AtomicU64,
    /// Health checks that passed.
    pub checks_pass: AtomicU64,
    /// Health checks that failed.
    pub checks_fail: AtomicU64,
}

impl CatalogCounters {
    fn sync_bytes(&self, rx: u64, tx: u64) {
        self.bytes_in.fetch_add(rx, Ordering::Relaxed);
        self.bytes_out.fetch_add(tx, Ordering::Relaxed);
    }

    fn sync_done(&self, kind: &str, ok: bool, took: Duration) {
        let c = match (kind, ok) {
            ("fetch", true) => &self.fetch_ok,
            ("fetch", false) => &self.fetch_err,
            (_, true) => &self.digest_ok,
            (_, false) => &self.digest_err,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.sync_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    fn check(&self, passed: bool) {
        let c = if passed {
            &self.checks_pass
        } else {
            &self.checks_fail
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// What sync servers and the API read without asking the task.
#[derive(Debug)]
pub struct Shared {
    /// This node's own entry.
    pub local: watch::Receiver<Arc<NodeEntry>>,
    /// Digest of everything we hold.
    pub digest: watch::Receiver<Arc<Vec<(String, u64)>>>,
    /// The merged catalog.
    pub catalog: watch::Receiver<Arc<Catalog>>,
    /// Counters.
    pub counters: Arc<CatalogCounters>,
}

/// Why a registration change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// No such local service.
    #[error("no service with id {0:?} is registered on this node")]
    NotFound(String),
    /// Defined in the config file; change it there.
    #[error("service {0:?} comes from the config file; change it there")]
    ConfigOwned(String),
    /// Too many services on this node.
    #[error("this node already hosts {MAX_SERVICES_PER_NODE} services")]
    TooMany,
    /// Could not persist; nothing changed.
    #[error("could not save the registration, nothing changed: {0}")]
    Persist(String),
    /// The catalog task is gone (agent shutting down).
    #[error("the agent is shutting down")]
    Closed,
}

/// Inputs of the catalog task.
#[derive(Debug)]
pub enum Input {
    /// Add or replace a runtime registration.
    Register {
        /// The registration.
        spec: ServiceSpec,
        /// Answer: the new entry version.
        reply: oneshot::Sender<Result<u64, RegisterError>>,
    },
    /// Remove a runtime registration.
    Deregister {
        /// Instance id.
        id: String,
        /// Answer: the new entry version.
        reply: oneshot::Sender<Result<u64, RegisterError>>,
    },
    /// A health check changed state (or reported its first result).
    Health {
        /// Instance id.
        id: String,
        /// New health.
        health: Health,
    },
    /// Gossip says `node` is at `version`.
    Notice {
        /// Owner.
        node: String,
        /// Version.
        version: u64,
    },
    /// A fetch finished.
    Fetched {
        /// Owner.
        node: String,
        /// The entry, or why not.
        result: Result<NodeEntry, String>,
    },
    /// A peer's digest (from an exchange either side started).
    Digest {
        /// The peer.
        from: String,
        /// Its digest.
        digest: Vec<(String, u64)>,
    },
}

/// Cheap handle for the API.
#[derive(Debug, Clone)]
pub struct CatalogHandle {
    tx: mpsc::Sender<Input>,
    /// Read side.
    pub shared: Arc<Shared>,
}

impl CatalogHandle {
    /// Registers (or replaces) a runtime service; returns the entry version.
    pub async fn register(&self, spec: ServiceSpec) -> Result<u64, RegisterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Register { spec, reply })
            .await
            .map_err(|_| RegisterError::Closed)?;
        rx.await.map_err(|_| RegisterError::Closed)?
    }

    /// Removes a runtime service; returns the entry version.
    pub async fn deregister(&self, id: String) -> Result<u64, RegisterError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Input::Deregister { id, reply })
            .await
            .map_err(|_| RegisterError::Closed)?;
        rx.await.map_err(|_| RegisterError::Closed)?
    }

    /// The input queue (for the membership task's notices and sync servers).
    pub fn sender(&self) -> mpsc::Sender<Input> {
        self.tx.clone()
    }
}

/// The task's state.
pub struct CatalogTask {
    name: String,
    config: CatalogConfig,
    transport: Transport,
    store: Store,
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    swim: mpsc::Sender<Command>,
    members: watch::Receiver<Arc<Snapshot>>,
    catalog: Catalog,
    version: u64,
    specs: BTreeMap<String, ServiceSpec>,
    config_ids: HashSet<String>,
    health: HashMap<String, Health>,
    checkers: HashMap<String, JoinHandle<()>>,
    active: HashMap<String, (u64, std::net::SocketAddr)>,
    fetching: HashSet<String>,
    wanted: HashMap<String, u64>,
    down_since: HashMap<String, Instant>,
    local_tx: watch::Sender<Arc<NodeEntry>>,
    digest_tx: watch::Sender<Arc<Vec<(String, u64)>>>,
    catalog_tx: watch::Sender<Arc<Catalog>>,
    counters: Arc<CatalogCounters>,
}

impl std::fmt::Debug for CatalogTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatalogTask")
            .field("name", &self.name)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl CatalogTask {
    /// Builds the task from config-file services and the saved runtime ones.
    pub fn new(
        name: String,
        config: CatalogConfig,
        config_services: Vec<ServiceSpec>,
        transport: Transport,
        store: Store,
        swim: mpsc::Sender<Command>,
        members: watch::Receiver<Arc<Snapshot>>,
    ) -> (Self, CatalogHandle) {
        let saved: SavedServices = store.read_json(SERVICES_FILE).unwrap_or_else(|e| {
            warn!(error = %e, "services.json unreadable; starting without runtime registrations");
            SavedServices::default()
        });
        let mut specs = BTreeMap::new();
        let mut config_ids = HashSet::new();
        for spec in config_services {
            config_ids.insert(spec.id.clone());
            specs.insert(spec.id.clone(), spec);
        }
        for spec in saved.services {
            if config_ids.contains(&spec.id) {
                warn!(id = %spec.id, "saved registration shadowed by the config file");
                continue;
            }
            specs.insert(spec.id.clone(), spec);
        }
        // A version above every earlier run's, even if the file was lost.
        let version = (saved.version + 1).max(crate::agent::unix_millis());
        let empty = Arc::new(NodeEntry {
            node: name.clone(),
            version: 0,
            services: Vec::new(),
        });
        let (local_tx, local_rx) = watch::channel(empty);
        let (digest_tx, digest_rx) = watch::channel(Arc::new(Vec::new()));
        let (catalog_tx, catalog_rx) = watch::channel(Arc::new(Catalog::new()));
        let counters = Arc::new(CatalogCounters::default());
        let (tx, rx) = mpsc::channel(1024);
        let handle = CatalogHandle {
            tx: tx.clone(),
            shared: Arc::new(Shared {
                local: local_rx,
                digest: digest_rx,
                catalog: catalog_rx,
                counters: counters.clone(),
            }),
        };
        let task = Self {
            name,
            config,
            transport,
            store,
            rx,
            tx,
            swim,
            members,
            catalog: Catalog::new(),
            version,
            specs,
            config_ids,
            health: HashMap::new(),
            checkers: HashMap::new(),
            active: HashMap::new(),
            fetching: HashSet::new(),
            wanted: HashMap::new(),
            down_since: HashMap::new(),
            local_tx,
            digest_tx,
            catalog_tx,
            counters,
        };
        (task, handle)
    }

    /// Runs until every input sender is gone.
    pub async fn run(mut self) {
        let ids: Vec<String> = self.specs.keys().cloned().collect();
        for id in ids {
            self.start_checker(&id);
        }
        self.publish_local(false);
        let mut tick = tokio::time::interval(self.config.anti_entropy_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                input = self.rx.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                changed = self.members.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.on_members();
                }
                _ = tick.tick() => self.anti_entropy(),
            }
        }
        for (_, h) in self.checkers.drain() {
            h.abort();
        }
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Register { spec, reply } => {
                let _ = reply.send(self.register(spec));
            }
            Input::Deregister { id, reply } => {
                let _ = reply.send(self.deregister(&id));
            }
            Input::Health { id, health } => {
                if self.specs.contains_key(&id) && self.health.get(&id) != Some(&health) {
                    self.health.insert(id, health);
                    self.publish_local(true);
                }
            }
            Input::Notice { node, version } => self.want(&node, version),
            Input::Fetched { node, result } => {
                self.fetching.remove(&node);
                match result {
                    Ok(entry) => {
                        if self.wanted.get(&node).is_some_and(|v| *v <= entry.version) {
                            self.wanted.remove(&node);
                        }
                        if self.catalog.merge(entry) {
                            self.publish_catalog();
                        }
                    }
                    Err(e) => {
                        debug!(peer = %node, error = %e, "fetch failed; retrying on the next sync round")
                    }
                }
            }
            Input::Digest { from, digest } => {
                for (node, version) in digest {
                    if node != self.name
                        && version > self.catalog.get(&node).map_or(0, |e| e.version)
                    {
                        debug!(peer = %from, owner = %node, version, "digest shows a newer entry");
                        self.want(&node, version);
                    }
                }
            }
        }
    }

    fn register(&mut self, spec: ServiceSpec) -> Result<u64, RegisterError> {
        if self.config_ids.contains(&spec.id) {
            return Err(RegisterError::ConfigOwned(spec.id));
        }
        if !self.specs.contains_key(&spec.id) && self.specs.len() >= MAX_SERVICES_PER_NODE {
            return Err(RegisterError::TooMany);
        }
        let id = spec.id.clone();
        let previous = self.specs.insert(id.clone(), spec);
        if let Err(e) = self.save(self.version + 1) {
            // Put things back: a failed write changes nothing.
            match previous {
                Some(p) => self.specs.insert(id, p),
                None => self.specs.remove(&id),
            };
            return Err(RegisterError::Persist(e.to_string()));
        }
        info!(service = %id, "registered");
        self.health.remove(&id);
        self.start_checker(&id);
        self.publish_local(true);
        Ok(self.version)
    }

    fn deregister(&mut self, id: &str) -> Result<u64, RegisterError> {
        if self.config_ids.contains(id) {
            return Err(RegisterError::ConfigOwned(id.to_owned()));
        }
        let Some(previous) = self.specs.remove(id) else {
            return Err(RegisterError::NotFound(id.to_owned()));
        };
        if let Err(e) = self.save(self.version + 1) {
            self.specs.insert(id.to_owned(), previous);
            return Err(RegisterError::Persist(e.to_string()));
        }
        info!(service = %id, "deregistered");
        if let Some(h) = self.checkers.remove(id) {
            h.abort();
        }
        self.health.remove(id);
        self.publish_local(true);
        Ok(self.version)
    }

    fn save(&self, version: u64) -> Result<(), crate::store::StoreError> {
        let saved = SavedServices {
            version,
            services: self
                .specs
                .values()
                .filter(|s| !self.config_ids.contains(&s.id))
                .cloned()
                .collect(),
        };
        self.store.write_json(SERVICES_FILE, &saved)
    }

    fn start_checker(&mut self, id: &str) {
        if let Some(h) = self.checkers.remove(id) {
            h.abort();
        }
        let Some(spec) = self.specs.get(id) else {
            return;
        };
        match &spec.check {
            Some(check) => {
                self.health.insert(id.to_owned(), Health::Critical);
                let handle = health::spawn(
                    id.to_owned(),
                    spec.address.clone(),
                    spec.port,
                    check.clone(),
                    self.tx.clone(),
                    self.counters.clone(),
                );
                self.checkers.insert(id.to_owned(), handle);
            }
            None => {
                self.health.insert(id.to_owned(), Health::Passing);
            }
        }
    }

    /// Rebuilds our entry; with `bump`, under a new version that is saved
    /// and announced.
    fn publish_local(&mut self, bump: bool) {
        if bump {
            self.version += 1;
        }
        if let Err(e) = self.save(self.version) {
            warn!(error = %e, "cannot save the catalog version");
        }
        let entry = NodeEntry {
            node: self.name.clone(),
            version: self.version,
            services: self
                .specs
                .values()
                .map(|s| s.instance(self.health.get(&s.id).copied().unwrap_or(Health::Critical)))
                .collect(),
        };
        self.local_tx.send_replace(Arc::new(entry.clone()));
        self.catalog.merge(entry);
        self.publish_catalog();
        if self
            .swim
            .try_send(Command::PublishCatalog(self.version))
            .is_err()
        {
            warn!("membership task busy; the catalog change will spread by anti-entropy");
        }
    }

    fn publish_catalog(&mut self) {
        self.digest_tx.send_replace(Arc::new(self.catalog.digest()));
        self.catalog_tx.send_replace(Arc::new(self.catalog.clone()));
    }

    fn want(&mut self, node: &str, version: u64) {
        if node == self.name || self.catalog.get(node).is_some_and(|e| e.version >= version) {
            return;
        }
        let w = self.wanted.entry(node.to_owned()).or_insert(0);
        *w = (*w).max(version);
        self.fetch(node);
    }

    fn fetch(&mut self, node: &str) {
        let Some((_, addr)) = self.active.get(node).copied() else {
            return;
        };
        if !self.fetching.insert(node.to_owned()) {
            return;
        }
        let transport = self.transport.clone();
        let tx = self.tx.clone();
        let counters = self.counters.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            let result = sync::fetch(&transport, &node, addr, &counters)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Input::Fetched { node, result }).await;
        });
    }

    fn on_members(&mut self) {
        let snapshot = self.members.borrow_and_update().clone();
        let now = Instant::now();
        let mut seen = HashSet::new();
        for m in &snapshot.members {
            let name = &m.id.name;
            seen.insert(name.clone());
            if m.state.is_active() {
                self.down_since.remove(name);
                let fresh = self
                    .active
                    .insert(name.clone(), (m.id.generation, m.id.addr))
                    .is_none_or(|(generation, _)| generation != m.id.generation);
                if fresh {
                    // New, restarted or back from a partition: fetch its
                    // entry from it (a full sync on join).
                    self.wanted.entry(name.clone()).or_insert(0);
                    self.fetch(name);
                }
            } else {
                self.active.remove(name);
                self.down_since.entry(name.clone()).or_insert(now);
            }
        }
        self.active.retain(|n, _| seen.contains(n));
        for node in self
            .catalog
            .entries()
            .map(|e| e.node.clone())
            .collect::<Vec<_>>()
        {
            if node != self.name && !seen.contains(&node) {
                self.down_since.entry(node).or_insert(now);
            }
        }
    }

    fn anti_entropy(&mut self) {
        // Retry fetches that failed or were missed.
        let wanted: Vec<String> = self.wanted.keys().cloned().collect();
        for node in wanted {
            if !self.active.contains_key(&node) {
                continue;
            }
            self.fetch(&node);
        }
        // Purge entries of nodes down for too long.
        let purge: Vec<String> = self
            .down_since
            .iter()
            .filter(|(_, since)| since.elapsed() >= self.config.purge_after)
            .map(|(n, _)| n.clone())
            .collect();
        let mut changed = false;
        for node in purge {
            self.down_since.remove(&node);
            self.wanted.remove(&node);
            if self.catalog.remove(&node).is_some() {
                info!(node = %node, "purged the catalog entry of a node down for too long");
                changed = true;
            }
        }
        if changed {
            self.publish_catalog();
        }
        // Compare digests with one random live peer.
        let peers: Vec<(&String, &(u64, std::net::SocketAddr))> = self.active.iter().collect();
        if peers.is_empty() {
            return;
        }
        let (peer, (_, addr)) = peers[rand::random_range(0..peers.len())];
        let (peer, addr) = (peer.clone(), *addr);
        let ours = self.catalog.digest();
        let transport = self.transport.clone();
        let tx = self.tx.clone();
        let counters = self.counters.clone();
        tokio::spawn(async move {
            match sync::exchange_digest(&transport, &peer, addr, ours, &counters).await {
                Ok(digest) => {
                    let _ = tx.send(Input::Digest { from: peer, digest }).await;
                }
                Err(e) => debug!(%peer, error = %e, "digest exchange failed"),
            }
        });
    }
}
