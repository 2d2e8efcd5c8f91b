//! The routing table: for every service, its instances in a deterministic
//! order with a consistent-hash table over them, rebuilt when the catalog
//! or the membership changes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use gossamer_membership::MemberState;
use gossamer_membership::catalog::{Catalog, Protocol};
use http::HeaderName;

use crate::agent::swim::Snapshot;
use crate::balance::rendezvous::Table;
use crate::catalog::view;

/// How a request's hash key is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashPolicy {
    /// A request header's value.
    Header(HeaderName),
    /// A cookie's value.
    Cookie(String),
    /// A query parameter's value.
    Query(String),
    /// The request path.
    Path,
    /// The client's IP address.
    SourceIp,
}

impl HashPolicy {
    /// Parses `header:NAME`, `cookie:NAME`, `query:NAME`, `path`, `source-ip`;
    /// anything else falls back to the default header.
    pub fn parse(text: &str) -> Self {
        match text.split_once(':') {
            Some(("header", name)) => HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map(Self::Header)
                .unwrap_or_else(|_| Self::default()),
            Some(("cookie", name)) => Self::Cookie(name.to_owned()),
            Some(("query", name)) => Self::Query(name.to_owned()),
            _ if text == "path" => Self::Path,
            _ if text == "source-ip" => Self::SourceIp,
            _ => Self::default(),
        }
    }
}

impl Default for HashPolicy {
    fn default() -> Self {
        Self::Header(HeaderName::from_static("x-hash-key"))
    }
}

/// One instance as the proxy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Owning node.
    pub node: String,
    /// Instance id.
    pub id: String,
    /// `node/id`: the key for ejection state and metrics.
    pub key: String,
    /// Address on the owning node.
    pub address: String,
    /// Port on the owning node.
    pub port: u16,
    /// Relative weight.
    pub weight: u32,
    /// Passing and owner alive.
    pub usable: bool,
    /// Owned by this node (called directly).
    pub local: bool,
    /// The owner's QUIC address.
    pub owner_addr: Option<SocketAddr>,
    /// What the instance speaks.
    pub protocol: Protocol,
}

/// A service's instances and its hash table.
#[derive(Debug)]
pub struct ServiceRoute {
    /// Service name.
    pub name: String,
    /// Hash policy (from the first instance in order).
    pub policy: HashPolicy,
    /// Instances sorted by (node, id).
    pub backends: Vec<Backend>,
    /// Keys of all backends, for ejection caps.
    pub keys: Vec<String>,
    signature: Vec<(String, u32)>,
    table: OnceLock<Arc<Table>>,
}

impl ServiceRoute {
    /// The hash table, built on first use (tables take memory; services
    /// this node never calls never get one).
    pub fn table(&self) -> &Arc<Table> {
        self.table
            .get_or_init(|| Arc::new(Table::build(&self.signature)))
    }
}

/// Every service's route.
#[derive(Debug, Default)]
pub struct Routes {
    /// By service name.
    pub services: HashMap<String, Arc<ServiceRoute>>,
}

impl Routes {
    /// Builds routes from the catalog and membership, reusing the tables of
    /// `previous` whose instance sets did not change (health changes never
    /// rebuild a table: unusable instances are skipped at lookup).
    pub fn build(catalog: &Catalog, members: &Snapshot, previous: &Routes) -> Self {
        let addrs: HashMap<&str, SocketAddr> = members
            .members
            .iter()
            .map(|m| (m.id.name.as_str(), m.id.addr))
            .collect();
        // A suspected node may be gone: new requests avoid it until it
        // refutes (its keys come back) or is declared down.
        let suspect: HashSet<&str> = members
            .members
            .iter()
            .filter(|m| m.state == MemberState::Suspect)
            .map(|m| m.id.name.as_str())
            .collect();
        let mut services = HashMap::new();
        for (name, mut instances) in view::services(catalog, members) {
            instances.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
            let backends: Vec<Backend> = instances
                .iter()
                .map(|i| Backend {
                    key: format!("{}/{}", i.node, i.id),
                    node: i.node.clone(),
                    id: i.id.clone(),
                    address: i.address.clone(),
                    port: i.port,
                    weight: i.weight,
                    usable: i.health == view::Effective::Passing
                        && !suspect.contains(i.node.as_str()),
                    local: i.node == members.local.name,
                    owner_addr: addrs.get(i.node.as_str()).copied(),
                    protocol: Protocol::parse(i.protocol).unwrap_or_default(),
                })
                .collect();
            let signature: Vec<(String, u32)> =
                backends.iter().map(|b| (b.key.clone(), b.weight)).collect();
            let policy = instances
                .first()
                .map(|i| HashPolicy::parse(&i.hash_policy))
                .unwrap_or_default();
            let table = OnceLock::new();
            if let Some(old) = previous.services.get(&name)
                && old.signature == signature
                && let Some(t) = old.table.get()
            {
                let _ = table.set(t.clone());
            }
            let keys = backends.iter().map(|b| b.key.clone()).collect();
            services.insert(
                name.clone(),
                Arc::new(ServiceRoute {
                    name,
                    policy,
                    backends,
                    keys,
                    signature,
                    table,
                }),
            );
        }
        Self { services }
    }
}
