//! The catalog as the API and the proxy see it: every instance with its
//! effective health, which is `unavailable` when its node is not alive.

use std::collections::BTreeMap;

use gossamer_membership::catalog::{Catalog, Health};
use serde::Serialize;

use crate::members::Snapshot;

/// Effective health of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effective {
    /// Owner alive, checks pass.
    Passing,
    /// Owner alive, checks fail.
    Critical,
    /// Owner down, departed or unknown.
    Unavailable,
}

/// One instance, as `GET /v1/catalog` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstanceView {
    /// Instance id.
    pub id: String,
    /// Owning node.
    pub node: String,
    /// Address on the owning node.
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Version label.
    pub version: String,
    /// Weight.
    pub weight: u32,
    /// Hash policy.
    pub hash_policy: String,
    /// What the instance speaks.
    pub protocol: &'static str,
    /// Effective health.
    pub health: Effective,
}

/// An instance's health as callers see it: unavailable while its node is.
pub fn effective(available: bool, health: Health) -> Effective {
    match (available, health) {
        (false, _) => Effective::Unavailable,
        (true, Health::Passing) => Effective::Passing,
        (true, Health::Critical) => Effective::Critical,
    }
}

/// Every service with its instances, sorted by node then id.
pub fn services(catalog: &Catalog, members: &Snapshot) -> BTreeMap<String, Vec<InstanceView>> {
    let mut out: BTreeMap<String, Vec<InstanceView>> = BTreeMap::new();
    for entry in catalog.entries() {
        let available = members.is_available(&entry.node);
        for s in &entry.services {
            let health = effective(available, s.health);
            out.entry(s.name.clone()).or_default().push(InstanceView {
                id: s.id.clone(),
                node: entry.node.clone(),
                address: s.address.clone(),
                port: s.port,
                tags: s.tags.clone(),
                version: s.version.clone(),
                weight: s.weight,
                hash_policy: s.hash_policy.clone(),
                protocol: s.protocol.as_str(),
                health,
            });
        }
    }
    out
}
