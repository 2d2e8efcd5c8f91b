//! The catalog task: owns this node's registrations, health, and its copy
//! of every node's entry.
//!
//! Inputs: registrations from the admin API, health results, and entries
//! fetched (or purged) by the mesh task, whose driver decides what to fetch
//! from whom. Outputs: this node's own entry (the mesh task announces each
//! new version), and `watch`es of the merged catalog and its digest for the
//! API, the metrics, the proxy and sync streams.

pub mod health;
pub mod registry;
pub mod sync;
pub mod view;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gossamer_membership::catalog::{Catalog, Health, MAX_SERVICES_PER_NODE, NodeEntry};
use gossamer_transport::pki::Hosts;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::{Store, unix_millis};
use crate::tasks::Tasks;
use registry::{SavedServices, ServiceSpec};

const SERVICES_FILE: &str = "services.json";

/// Catalog timing (`[catalog]` in the config file).
pub type CatalogConfig = gossamer_membership::ReplicaConfig;

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
    /// Instances left out of fetched entries: their owner's certificate
    /// does not name their service.
    pub refused_instances: AtomicU64,
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
    /// The node's certificate does not name the service.
    #[error(
        "this node's certificate lets it host {hosts}, not {service:?}: issue it with `gossamer cert issue --service {service}` (or --service '*')"
    )]
    NotInCertificate {
        /// The service asked for.
        service: String,
        /// What the certificate allows.
        hosts: Hosts,
    },
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
    /// An entry fetched from its owner.
    Merge(NodeEntry),
    /// Drop a node's entry (down for too long).
    Purge(String),
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

    /// The input queue (for the mesh task's fetches and purges).
    pub fn sender(&self) -> mpsc::Sender<Input> {
        self.tx.clone()
    }
}

/// The task's state.
pub struct CatalogTask {
    name: String,
    store: Store,
    rx: mpsc::Receiver<Input>,
    tx: mpsc::Sender<Input>,
    catalog: Catalog,
    version: u64,
    specs: BTreeMap<String, ServiceSpec>,
    config_ids: HashSet<String>,
    health: HashMap<String, Health>,
    /// One cancellation per health checker (they run on `tasks`).
    checkers: HashMap<String, CancellationToken>,
    tasks: Tasks,
    local_tx: watch::Sender<Arc<NodeEntry>>,
    digest_tx: watch::Sender<Arc<Vec<(String, u64)>>>,
    catalog_tx: watch::Sender<Arc<Catalog>>,
    counters: Arc<CatalogCounters>,
    /// What this node's certificate lets it host (follows rotations).
    hosts: watch::Receiver<Hosts>,
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
    /// Health checkers run on `tasks`. The caller has checked that
    /// `hosts` (what the node's certificate names) allows every config-file
    /// service; a saved registration it does not allow is left out with a
    /// warning.
    pub fn new(
        name: String,
        config_services: Vec<ServiceSpec>,
        store: Store,
        tasks: Tasks,
        hosts: watch::Receiver<Hosts>,
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
            if !hosts.borrow().allows(&spec.name) {
                warn!(
                    id = %spec.id, service = %spec.name, certificate_allows = %*hosts.borrow(),
                    "saved registration not restored: this node's certificate does not name its service"
                );
                continue;
            }
            specs.insert(spec.id.clone(), spec);
        }
        // A version above every earlier run's, even if the file was lost.
        let version = (saved.version + 1).max(unix_millis());
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
            store,
            rx,
            tx,
            catalog: Catalog::new(),
            version,
            specs,
            config_ids,
            health: HashMap::new(),
            checkers: HashMap::new(),
            tasks,
            local_tx,
            digest_tx,
            catalog_tx,
            counters,
            hosts,
        };
        (task, handle)
    }

    /// Runs until shutdown is signalled (or every input sender is gone).
    pub async fn run(mut self) {
        let ids: Vec<String> = self.specs.keys().cloned().collect();
        for id in ids {
            self.start_checker(&id);
        }
        self.publish_local(false);
        loop {
            tokio::select! {
                input = self.rx.recv() => match input {
                    Some(input) => self.on_input(input),
                    None => break,
                },
                () = self.tasks.stopped() => break,
            }
        }
        for (_, c) in self.checkers.drain() {
            c.cancel();
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
            Input::Merge(entry) => {
                let (node, version) = (entry.node.clone(), entry.version);
                if node != self.name && self.catalog.merge(entry) {
                    debug!(%node, version, "catalog entry merged");
                    self.publish_catalog();
                }
            }
            Input::Purge(node) => {
                if node != self.name && self.catalog.remove(&node).is_some() {
                    self.publish_catalog();
                }
            }
        }
    }

    fn register(&mut self, spec: ServiceSpec) -> Result<u64, RegisterError> {
        if self.config_ids.contains(&spec.id) {
            return Err(RegisterError::ConfigOwned(spec.id));
        }
        if !self.hosts.borrow().allows(&spec.name) {
            return Err(RegisterError::NotInCertificate {
                service: spec.name,
                hosts: self.hosts.borrow().clone(),
            });
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
        if let Some(c) = self.checkers.remove(id) {
            c.cancel();
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
        if let Some(c) = self.checkers.remove(id) {
            c.cancel();
        }
        let Some(spec) = self.specs.get(id) else {
            return;
        };
        match &spec.check {
            Some(check) => {
                self.health.insert(id.to_owned(), Health::Critical);
                let cancel = self.tasks.child_token();
                health::spawn(
                    (id.to_owned(), spec.address.clone(), spec.port),
                    check.clone(),
                    self.tx.clone(),
                    self.counters.clone(),
                    &self.tasks,
                    cancel.clone(),
                );
                self.checkers.insert(id.to_owned(), cancel);
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
        let entry = Arc::new(entry);
        self.local_tx.send_replace(entry.clone());
        self.catalog.merge(entry);
        self.publish_catalog();
    }

    fn publish_catalog(&mut self) {
        self.digest_tx.send_replace(Arc::new(self.catalog.digest()));
        self.catalog_tx.send_replace(Arc::new(self.catalog.clone()));
    }
}
