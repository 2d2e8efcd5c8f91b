//! The service catalog's data: one entry per node, owned and versioned by
//! that node, and the messages of the sync protocol.
//!
//! Merging keeps, per node, the entry with the highest `(version, content)`:
//! a join-semilattice, so merges commute, associate and are idempotent, and
//! an older version never replaces a newer one.
//!
//! Who may publish an entry is not decided here but by the transport: full
//! entries only ever travel from their owner over a connection whose
//! certificate names it (see `docs/catalog.md`); gossip carries only
//! `(node, version)` notices that make peers fetch from the owner.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::identity::validate_name;

/// Most services one node may host.
pub const MAX_SERVICES_PER_NODE: usize = 4096;
/// Services per sync frame.
pub const SERVICES_PER_FRAME: usize = 128;
/// Hard cap on one sync frame.
pub const MAX_SYNC_FRAME: usize = 1 << 20;
/// Most nodes listed in one digest frame.
pub const MAX_DIGEST: usize = 100_000;

/// The health an owner reports for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Checks pass (or there is no check).
    Passing,
    /// Checks fail.
    Critical,
}

impl Health {
    /// Lower-case name used by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passing => "passing",
            Self::Critical => "critical",
        }
    }
}

/// What an instance speaks; the agent calls it in that protocol whatever
/// its caller spoke.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2 without TLS, prior knowledge.
    H2c,
    /// gRPC: HTTP/2 without TLS, with gRPC's deadline and status handling.
    Grpc,
    /// Any TCP protocol, carried as bytes: reached through an upstream
    /// listener, not the HTTP proxy.
    Tcp,
}

impl Protocol {
    /// Every accepted spelling, for error messages.
    pub const NAMES: &'static str = "http1 (or http), h2c, grpc, tcp";

    /// Lower-case name used by the API and the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
            Self::Grpc => "grpc",
            Self::Tcp => "tcp",
        }
    }

    /// Parses `http1` (also `http`), `h2c`, `grpc` or `tcp`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "http1" | "http" => Some(Self::Http1),
            "h2c" => Some(Self::H2c),
            "grpc" => Some(Self::Grpc),
            "tcp" => Some(Self::Tcp),
            _ => None,
        }
    }

    /// Whether the instance is called over HTTP/2.
    pub fn is_h2(self) -> bool {
        matches!(self, Self::H2c | Self::Grpc)
    }
}

/// One instance of a service, as its node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// Unique on its node.
    pub id: String,
    /// Service name (what clients ask for).
    pub name: String,
    /// Where the owning agent reaches it (IP or host name).
    pub address: String,
    /// Its port.
    pub port: u16,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// Free-form version label.
    pub version: String,
    /// Relative share of traffic.
    pub weight: u32,
    /// How the proxy picks the hash key: `header:NAME`, `cookie:NAME`,
    /// `query:NAME`, `path` or `source-ip`.
    pub hash_policy: String,
    /// Owner-reported health.
    pub health: Health,
    /// What the instance speaks.
    pub protocol: Protocol,
}

/// Why an instance or entry is not acceptable. `field` names the bad field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidService {
    /// The offending field.
    pub field: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn invalid<T>(field: &'static str, problem: impl Into<String>) -> Result<T, InvalidService> {
    Err(InvalidService {
        field,
        problem: problem.into(),
    })
}

/// Checks a service name (the DNS-label rules of node names).
pub fn validate_service_name(name: &str) -> Result<(), InvalidService> {
    validate_name(name).or_else(|e| invalid("name", e.reason))
}

/// Checks an instance id: 1–128 of `A-Z a-z 0-9 - _ . :`.
pub fn validate_instance_id(id: &str) -> Result<(), InvalidService> {
    if id.is_empty() || id.len() > 128 {
        return invalid("id", "must be 1 to 128 characters");
    }
    if id == "." || id == ".." {
        return invalid("id", "\".\" and \"..\" are not instance ids");
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        return invalid("id", "only letters, digits and - _ . : are allowed");
    }
    Ok(())
}

/// Checks a hash policy string.
pub fn validate_hash_policy(policy: &str) -> Result<(), InvalidService> {
    let ok = match policy.split_once(':') {
        Some(("header" | "cookie" | "query", name)) => {
            !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b';' && b != b'=')
        }
        Some(_) => false,
        None => matches!(policy, "path" | "source-ip"),
    };
    if ok {
        Ok(())
    } else {
        invalid(
            "hash_policy",
            format!("{policy:?} is not header:NAME, cookie:NAME, query:NAME, path or source-ip"),
        )
    }
}

impl ServiceInstance {
    /// The default hash policy.
    pub const DEFAULT_HASH_POLICY: &'static str = "header:x-hash-key";

    /// Checks every field.
    pub fn validate(&self) -> Result<(), InvalidService> {
        validate_instance_id(&self.id)?;
        validate_service_name(&self.name)?;
        if self.address.is_empty()
            || self.address.len() > 253
            || !self
                .address
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        {
            return invalid(
                "address",
                format!("{:?} is not an IP address or host name", self.address),
            );
        }
        if self.port == 0 {
            return invalid("port", "must be 1 to 65535");
        }
        if self.tags.len() > 64 {
            return invalid("tags", "at most 64 tags");
        }
        if self.tags.iter().any(|t| t.is_empty() || t.len() > 128) {
            return invalid("tags", "each tag must be 1 to 128 characters");
        }
        if self.version.len() > 64 {
            return invalid("version", "at most 64 characters");
        }
        if !(1..=10_000).contains(&self.weight) {
            return invalid("weight", "must be 1 to 10000");
        }
        validate_hash_policy(&self.hash_policy)
    }
}

/// Everything one node publishes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The owner: the only node that may change this entry.
    pub node: String,
    /// Grows with every change the owner makes (kept across restarts).
    pub version: u64,
    /// Instances, sorted by id, ids unique.
    pub services: Vec<ServiceInstance>,
}

impl NodeEntry {
    /// Checks the entry (names, sizes, order, every instance).
    pub fn validate(&self) -> Result<(), InvalidService> {
        validate_name(&self.node).or_else(|e| invalid("node", e.reason))?;
        if self.services.len() > MAX_SERVICES_PER_NODE {
            return invalid(
                "services",
                format!("more than {MAX_SERVICES_PER_NODE} on one node"),
            );
        }
        for pair in self.services.windows(2) {
            if pair[0].id >= pair[1].id {
                return invalid("id", "ids must be unique and sorted");
            }
        }
        self.services.iter().try_for_each(ServiceInstance::validate)
    }
}

/// Per-node entries, merged by highest `(version, content)`.
///
/// Entries are shared: a clone of the catalog (every change publishes
/// one) copies a pointer per node, not every instance, and the owner's
/// published entry is the catalog's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    entries: BTreeMap<String, Arc<NodeEntry>>,
}

impl Catalog {
    /// An empty catalog.
    pub fn new() -> Self {
        Self::default()
    }

    /// Merges one entry; returns whether the catalog changed.
    pub fn merge(&mut self, entry: impl Into<Arc<NodeEntry>>) -> bool {
        let entry = entry.into();
        match self.entries.get(&entry.node) {
            Some(current) if (current.version, &**current) >= (entry.version, &*entry) => false,
            _ => {
                self.entries.insert(entry.node.clone(), entry);
                true
            }
        }
    }

    /// Merges every entry of `other`.
    pub fn merge_all(&mut self, other: &Catalog) -> bool {
        let mut changed = false;
        for e in other.entries.values() {
            changed |= self.merge(e.clone());
        }
        changed
    }

    /// The entry of `node`.
    pub fn get(&self, node: &str) -> Option<&NodeEntry> {
        self.entries.get(node).map(|e| &**e)
    }

    /// Drops the entry of `node` (purge after it has been down long enough).
    pub fn remove(&mut self, node: &str) -> Option<Arc<NodeEntry>> {
        self.entries.remove(node)
    }

    /// All entries, by node name.
    pub fn entries(&self) -> impl Iterator<Item = &NodeEntry> {
        self.entries.values().map(|e| &**e)
    }

    /// Number of nodes with an entry.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no node has an entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// `node -> version` for every entry.
    pub fn digest(&self) -> Vec<(String, u64)> {
        self.entries
            .values()
            .map(|e| (e.node.clone(), e.version))
            .collect()
    }

    /// Nodes for which `theirs` lists a newer version than we hold.
    pub fn newer_in(&self, theirs: &[(String, u64)]) -> Vec<String> {
        theirs
            .iter()
            .filter(|(node, v)| self.entries.get(node).is_none_or(|e| e.version < *v))
            .map(|(node, _)| node.clone())
            .collect()
    }
}

/// First frame of a catalog sync stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "Here is my digest; send me yours."
    Digest(Vec<(String, u64)>),
    /// "Send me your own entry."
    Fetch,
}

/// Frames the serving side answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// The server's digest.
    Digest(Vec<(String, u64)>),
    /// Start of the server's own entry; `count` services follow in
    /// [`SyncResponse::Services`] frames.
    EntryHead {
        /// Owner (the server).
        node: String,
        /// Entry version.
        version: u64,
        /// Number of services to follow.
        count: u32,
    },
    /// A chunk of services.
    Services(Vec<ServiceInstance>),
}

/// Encodes a sync message for one frame.
pub fn encode_sync<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    codec::encode_large(msg, MAX_SYNC_FRAME)
}

/// Decodes a whole sync frame (trailing bytes are an error).
pub fn decode_sync<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, CodecError> {
    codec::decode_large(frame, MAX_SYNC_FRAME)
}

/// The frames that carry `entry` (head, then service chunks).
pub fn entry_frames(entry: &NodeEntry) -> Result<Vec<Vec<u8>>, CodecError> {
    let mut frames = vec![encode_sync(&SyncResponse::EntryHead {
        node: entry.node.clone(),
        version: entry.version,
        count: entry.services.len() as u32,
    })?];
    for chunk in entry.services.chunks(SERVICES_PER_FRAME) {
        frames.push(encode_sync(&SyncResponse::Services(chunk.to_vec()))?);
    }
    Ok(frames)
}

/// Reassembles an entry from frames, checking sizes as it goes.
#[derive(Debug)]
pub struct EntryAssembler {
    node: String,
    version: u64,
    expected: usize,
    services: Vec<ServiceInstance>,
}

/// A protocol violation in a sync stream.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Undecodable frame.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// Frames in the wrong order or count.
    #[error("sync protocol violation: {0}")]
    Protocol(&'static str),
    /// The entry is not valid.
    #[error("invalid entry: {0}")]
    Invalid(#[from] InvalidService),
}

impl EntryAssembler {
    /// Starts from an `EntryHead` frame.
    pub fn start(head: SyncResponse) -> Result<Self, SyncError> {
        let SyncResponse::EntryHead {
            node,
            version,
            count,
        } = head
        else {
            return Err(SyncError::Protocol("expected an entry head"));
        };
        let expected = count as usize;
        if expected > MAX_SERVICES_PER_NODE {
            return Err(SyncError::Protocol("too many services"));
        }
        Ok(Self {
            node,
            version,
            expected,
            services: Vec::new(),
        })
    }

    /// Whether every announced service has arrived.
    pub fn is_complete(&self) -> bool {
        self.services.len() == self.expected
    }

    /// Adds a `Services` frame.
    pub fn push(&mut self, frame: SyncResponse) -> Result<(), SyncError> {
        let SyncResponse::Services(chunk) = frame else {
            return Err(SyncError::Protocol("expected services"));
        };
        if chunk.is_empty() || self.services.len() + chunk.len() > self.expected {
            return Err(SyncError::Protocol("more services than announced"));
        }
        self.services.extend(chunk);
        Ok(())
    }

    /// The validated entry.
    pub fn finish(self) -> Result<NodeEntry, SyncError> {
        if !self.is_complete() {
            return Err(SyncError::Protocol("fewer services than announced"));
        }
        let entry = NodeEntry {
            node: self.node,
            version: self.version,
            services: self.services,
        };
        entry.validate()?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn instance(id: &str, port: u16) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            name: "web".into(),
            address: "127.0.0.1".into(),
            port,
            tags: vec!["a".into()],
            version: "1".into(),
            weight: 1,
            hash_policy: ServiceInstance::DEFAULT_HASH_POLICY.into(),
            health: Health::Passing,
            protocol: Protocol::Http1,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = instance("web-1", 80);
        ok.validate().unwrap();
        let mut bad = ok.clone();
        bad.port = 0;
        assert_eq!(bad.validate().unwrap_err().field, "port");
        let mut bad = ok.clone();
        bad.name = "Web Server".into();
        assert_eq!(bad.validate().unwrap_err().field, "name");
        let mut bad = ok.clone();
        bad.hash_policy = "header:".into();
        assert_eq!(bad.validate().unwrap_err().field, "hash_policy");
        let mut bad = ok.clone();
        bad.weight = 0;
        assert_eq!(bad.validate().unwrap_err().field, "weight");
        for p in ["path", "source-ip", "cookie:sid", "query:user"] {
            validate_hash_policy(p).unwrap();
        }
    }

    #[test]
    fn entry_round_trips_through_frames() {
        let services: Vec<_> = (0..300)
            .map(|i| instance(&format!("web-{i:03}"), 1000 + i))
            .collect();
        let entry = NodeEntry {
            node: "n1".into(),
            version: 9,
            services,
        };
        let frames = entry_frames(&entry).unwrap();
        assert_eq!(frames.len(), 1 + 300usize.div_ceil(SERVICES_PER_FRAME));
        let mut asm = EntryAssembler::start(decode_sync(&frames[0]).unwrap()).unwrap();
        for f in &frames[1..] {
            asm.push(decode_sync(f).unwrap()).unwrap();
        }
        assert_eq!(asm.finish().unwrap(), entry);
    }

    #[test]
    fn assembler_rejects_lies() {
        let head = SyncResponse::EntryHead {
            node: "n1".into(),
            version: 1,
            count: 1,
        };
        let mut asm = EntryAssembler::start(head.clone()).unwrap();
        assert!(
            asm.push(SyncResponse::Services(vec![
                instance("a", 1),
                instance("b", 2)
            ]))
            .is_err()
        );
        let asm = EntryAssembler::start(head).unwrap();
        assert!(asm.finish().is_err());
        assert!(
            EntryAssembler::start(SyncResponse::EntryHead {
                node: "n1".into(),
                version: 1,
                count: u32::MAX,
            })
            .is_err()
        );
        assert!(decode_sync::<SyncResponse>(&[0xff; 64]).is_err());
    }

    #[test]
    fn older_never_overwrites_newer() {
        let mut c = Catalog::new();
        let new = NodeEntry {
            node: "n1".into(),
            version: 5,
            services: vec![instance("a", 1)],
        };
        let old = NodeEntry {
            node: "n1".into(),
            version: 4,
            services: vec![],
        };
        assert!(c.merge(new.clone()));
        assert!(!c.merge(old));
        assert_eq!(c.get("n1"), Some(&new));
        assert_eq!(
            c.newer_in(&[("n1".into(), 5), ("n2".into(), 1)]),
            vec!["n2".to_string()]
        );
    }

    fn arb_entry() -> impl Strategy<Value = NodeEntry> {
        (
            0u8..4,
            0u64..6,
            proptest::collection::btree_set(0u16..5, 0..3),
        )
            .prop_map(|(n, v, ports)| NodeEntry {
                node: format!("n{n}"),
                version: v,
                services: ports
                    .into_iter()
                    .map(|p| instance(&format!("s{p}"), p + 1))
                    .collect(),
            })
    }

    fn catalog(entries: &[NodeEntry]) -> Catalog {
        let mut c = Catalog::new();
        for e in entries {
            c.merge(e.clone());
        }
        c
    }

    proptest! {
        #[test]
        fn merge_is_a_semilattice(
            a in proptest::collection::vec(arb_entry(), 0..6),
            b in proptest::collection::vec(arb_entry(), 0..6),
            c in proptest::collection::vec(arb_entry(), 0..6),
        ) {
            let (ca, cb, cc) = (catalog(&a), catalog(&b), catalog(&c));
            // commutative
            let mut ab = ca.clone(); ab.merge_all(&cb);
            let mut ba = cb.clone(); ba.merge_all(&ca);
            prop_assert_eq!(&ab, &ba);
            // associative
            let mut ab_c = ab.clone(); ab_c.merge_all(&cc);
            let mut bc = cb.clone(); bc.merge_all(&cc);
            let mut a_bc = ca.clone(); a_bc.merge_all(&bc);
            prop_assert_eq!(&ab_c, &a_bc);
            // idempotent
            let mut aa = ca.clone();
            prop_assert!(!aa.merge_all(&ca));
            prop_assert_eq!(&aa, &ca);
            // monotonic: versions never go down
            for e in ca.entries() {
                prop_assert!(ab.get(&e.node).unwrap().version >= e.version);
            }
        }

        #[test]
        fn sync_decoders_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode_sync::<SyncRequest>(&bytes);
            let _ = decode_sync::<SyncResponse>(&bytes);
        }
    }
}
