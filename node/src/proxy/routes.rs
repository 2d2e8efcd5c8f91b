//! The routing table: for every service, its instances in a deterministic
//! order with a consistent-hash table over them, rebuilt when the catalog
//! or the membership changes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use gossamer_membership::MemberState;
use gossamer_membership::catalog::{Catalog, InvalidService, Protocol, validate_hash_policy};
use http::HeaderName;

use super::policy::Policies;
use crate::balance::rendezvous::{Scorer, Table};
use crate::catalog::view;
use crate::members::Snapshot;

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
    /// Parses `header:NAME`, `cookie:NAME`, `query:NAME`, `path` or
    /// `source-ip`. The one parser of hash policies: registrations and
    /// `[[service]]` blocks are refused when it fails, so a policy is never
    /// silently replaced by the default.
    pub fn parse(text: &str) -> Result<Self, InvalidService> {
        // The catalog checks the same grammar on every entry it accepts,
        // including other nodes'; this adds what the grammar cannot see.
        validate_hash_policy(text)?;
        let invalid = |problem: String| InvalidService {
            field: "hash_policy",
            problem,
        };
        match text.split_once(':') {
            Some(("header", name)) => HeaderName::from_bytes(name.as_bytes())
                .map(Self::Header)
                .map_err(|_| invalid(format!("{text:?}: {name:?} is not a header name"))),
            Some(("cookie", name)) => Ok(Self::Cookie(name.to_owned())),
            Some(("query", name)) => Ok(Self::Query(name.to_owned())),
            None if text == "path" => Ok(Self::Path),
            None if text == "source-ip" => Ok(Self::SourceIp),
            _ => Err(invalid(format!("{text:?} is not a hash policy"))),
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
    pub node: Arc<str>,
    /// Instance id.
    pub id: String,
    /// `node/id`: the key for ejection state and metrics.
    pub key: Arc<str>,
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
    /// Its tags (route subsets select by them).
    pub tags: Vec<String>,
    /// Its version label (route subsets select by it).
    pub version: String,
    /// An endpoint outside the mesh (an `external` document's).
    pub external: Option<Arc<super::external::ExternalTarget>>,
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
    pub keys: Vec<Arc<str>>,
    /// Whether an instance registered `protocol = "tcp"`: then the service
    /// is reached through upstream listeners, not the HTTP proxy.
    pub tcp: bool,
    signature: Vec<(Arc<str>, u32)>,
    hashed: Arc<Hashed>,
}

/// A route's consistent hashing: its scorer, and the table once built.
/// Tables are built (or updated from the previous one) on a blocking
/// thread, never on a request's path; until one is ready, lookups score
/// the key's slot directly in O(n), which gives the slot's first choice:
/// the table's answer except on the few slots balancing moved.
#[derive(Debug)]
struct Hashed {
    scorer: Scorer,
    table: OnceLock<Arc<Table>>,
    building: AtomicBool,
}

impl Hashed {
    fn new(signature: &[(Arc<str>, u32)]) -> Self {
        Self {
            scorer: Scorer::new(
                &signature
                    .iter()
                    .map(|(k, w)| (&**k, *w))
                    .collect::<Vec<_>>(),
            ),
            table: OnceLock::new(),
            building: AtomicBool::new(false),
        }
    }

    /// Builds the table in the background (once), from `from` (the
    /// previous table and its scorer) when it can be updated in place.
    fn build(self: &Arc<Self>, from: Option<(Arc<Table>, Arc<Hashed>)>) {
        if self.table.get().is_some() || self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let work = move || {
            let table = from
                .and_then(|(table, old)| table.updated(&old.scorer, &this.scorer))
                .unwrap_or_else(|| Table::from_scorer(&this.scorer));
            let _ = this.table.set(Arc::new(table));
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }
}

/// How a route answers lookups now: its table, or direct scoring while the
/// table is being built.
#[derive(Debug, Clone, Copy)]
pub enum Hashing<'a> {
    /// The built table: one array read.
    Table(&'a Table),
    /// The key's slot scored over every backend.
    Direct(&'a Scorer),
}

impl Hashing<'_> {
    /// The backend a key hash maps to.
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        match self {
            Self::Table(t) => t.lookup(hash),
            Self::Direct(s) => s.lookup(hash),
        }
    }

    /// The first backend in hash order from the key's slot that `usable`
    /// accepts.
    pub fn lookup_usable(&self, hash: u64, usable: impl FnMut(usize) -> bool) -> Option<usize> {
        match self {
            Self::Table(t) => t.lookup_usable(hash, usable),
            Self::Direct(s) => s.lookup_usable(hash, usable),
        }
    }
}

impl ServiceRoute {
    /// How to look keys up: the table when built, else direct scoring (and
    /// the table starts building in the background: services this node
    /// never calls never get one).
    pub fn table(&self) -> Hashing<'_> {
        match self.hashed.table.get() {
            Some(t) => Hashing::Table(t),
            None => {
                self.hashed.build(None);
                Hashing::Direct(&self.hashed.scorer)
            }
        }
    }

    /// Whether the table is built (tests and benchmarks).
    pub fn table_ready(&self) -> bool {
        self.hashed.table.get().is_some()
    }
}

impl ServiceRoute {
    /// A route over `backends`, reusing `previous`'s table if the instance
    /// set is the same, or updating it in the background when it changed.
    fn new(
        name: String,
        policy: HashPolicy,
        backends: Vec<Backend>,
        previous: Option<&ServiceRoute>,
    ) -> Self {
        // The backends' own keys, shared: a route holds each key once.
        let signature: Vec<(Arc<str>, u32)> =
            backends.iter().map(|b| (b.key.clone(), b.weight)).collect();
        let hashed = match previous {
            Some(old) if old.signature == signature => old.hashed.clone(),
            Some(old) => {
                let hashed = Arc::new(Hashed::new(&signature));
                if let Some(t) = old.hashed.table.get() {
                    hashed.build(Some((t.clone(), old.hashed.clone())));
                }
                hashed
            }
            None => Arc::new(Hashed::new(&signature)),
        };
        let keys = backends.iter().map(|b| b.key.clone()).collect();
        let tcp = backends.iter().any(|b| b.protocol == Protocol::Tcp);
        Self {
            name,
            policy,
            backends,
            keys,
            tcp,
            signature,
            hashed,
        }
    }
}

/// Every service's route.
#[derive(Debug, Default)]
pub struct Routes {
    /// By service name.
    pub services: HashMap<String, Arc<ServiceRoute>>,
    /// Route documents in force, by destination service.
    pub policies: Arc<Policies>,
    /// The instances of each arm with a subset, by arm label.
    pub subsets: HashMap<String, Arc<ServiceRoute>>,
}

impl Routes {
    /// Builds routes from the catalog and membership, reusing the tables of
    /// `previous` whose instance sets did not change (health changes never
    /// rebuild a table: unusable instances are skipped at lookup).
    pub fn build(
        catalog: &Catalog,
        members: &Snapshot,
        previous: &Routes,
        policies: Arc<Policies>,
        externals: &super::external::Externals,
    ) -> Self {
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
                    key: format!("{}/{}", i.node, i.id).into(),
                    node: i.node.as_str().into(),
                    id: i.id.clone(),
                    address: i.address.clone(),
                    port: i.port,
                    weight: i.weight,
                    usable: i.health == view::Effective::Passing
                        && !suspect.contains(i.node.as_str()),
                    local: i.node == members.local.name,
                    owner_addr: addrs.get(i.node.as_str()).copied(),
                    protocol: Protocol::parse(i.protocol).unwrap_or_default(),
                    tags: i.tags.clone(),
                    version: i.version.clone(),
                    external: None,
                })
                .collect();
            // Registrations are checked with the same parser; only an entry
            // from a node that checked less strictly can fail here, and the
            // default key beats dropping the service.
            let policy = instances
                .first()
                .and_then(|i| HashPolicy::parse(&i.hash_policy).ok())
                .unwrap_or_default();
            let route = ServiceRoute::new(
                name.clone(),
                policy,
                backends,
                previous.services.get(&name).map(|r| r.as_ref()),
            );
            services.insert(name, Arc::new(route));
        }
        // An external service's endpoints are its backends; a document
        // naming a mesh service wins over the catalog (it was written on
        // purpose).
        for (name, targets) in &externals.services {
            let backends: Vec<Backend> = targets
                .iter()
                .enumerate()
                .map(|(i, t)| Backend {
                    key: format!("external/{name}/{i}").into(),
                    node: "external".into(),
                    id: i.to_string(),
                    address: t.endpoint.host.clone(),
                    port: t.endpoint.port,
                    weight: 1,
                    usable: true,
                    local: false,
                    owner_addr: None,
                    protocol: Protocol::default(),
                    tags: Vec::new(),
                    version: String::new(),
                    external: Some(t.clone()),
                })
                .collect();
            let previous = previous
                .services
                .get(name)
                .filter(|r| r.backends.iter().all(|b| b.external.is_some()));
            let route = ServiceRoute::new(
                name.clone(),
                HashPolicy::default(),
                backends,
                previous.map(|r| r.as_ref()),
            );
            services.insert(name.clone(), Arc::new(route));
        }
        // Each arm with a subset gets its own table over its instances.
        let mut subsets = HashMap::new();
        for policy in policies.values() {
            let all_arms = policy
                .arms
                .iter()
                .chain(policy.rules.iter().flat_map(|r| r.arms.iter()));
            for arm in all_arms {
                let (Some(subset), Some(whole)) = (&arm.subset, services.get(&arm.service)) else {
                    continue;
                };
                if subsets.contains_key(&arm.label) {
                    continue;
                }
                let backends: Vec<Backend> = whole
                    .backends
                    .iter()
                    .filter(|b| subset.admits(&b.tags, &b.version))
                    .cloned()
                    .collect();
                let route = ServiceRoute::new(
                    arm.service.clone(),
                    whole.policy.clone(),
                    backends,
                    previous.subsets.get(&arm.label).map(|r| r.as_ref()),
                );
                subsets.insert(arm.label.clone(), Arc::new(route));
            }
        }
        Self {
            services,
            policies,
            subsets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_policies_parse() {
        for (text, want) in [
            (
                "header:X-User",
                HashPolicy::Header(HeaderName::from_static("x-user")),
            ),
            ("cookie:session", HashPolicy::Cookie("session".into())),
            ("query:id", HashPolicy::Query("id".into())),
            ("path", HashPolicy::Path),
            ("source-ip", HashPolicy::SourceIp),
        ] {
            assert_eq!(HashPolicy::parse(text), Ok(want), "{text}");
        }
        assert_eq!(
            HashPolicy::parse(gossamer_membership::catalog::ServiceInstance::DEFAULT_HASH_POLICY),
            Ok(HashPolicy::default())
        );
    }

    #[test]
    fn bad_hash_policies_are_refused_with_the_reason() {
        for (text, needle) in [
            ("random", "\"random\" is not header:NAME"),
            ("header:", "is not header:NAME"),
            ("path:x", "is not header:NAME"),
            // The grammar allows it; a header name does not.
            ("header:a(b", "\"a(b\" is not a header name"),
        ] {
            let e = HashPolicy::parse(text).unwrap_err();
            assert_eq!(e.field, "hash_policy", "{text}");
            assert!(e.to_string().starts_with("hash_policy: "), "{e}");
            assert!(e.problem.contains(needle), "{text}: {e}");
        }
    }
}
