//! Node identity: what a member is called, where it listens and which
//! generation of it is running.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The longest node name accepted anywhere (it must also fit a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// A member's identity in the SWIM protocol.
///
/// Two identities with the same `name` are the same node; foca resolves
/// conflicts between them by `generation`, so a restarted (or rejoining) node
/// takes a higher generation and wins over its stale self.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId {
    /// Unique node name; also the name in the node's certificate.
    pub name: String,
    /// The QUIC address peers reach this node on.
    pub addr: SocketAddr,
    /// Renewed on every start and every rejoin after being declared down.
    pub generation: u64,
}

impl NodeId {
    /// Builds an identity, checking the name.
    pub fn new(
        name: impl Into<String>,
        addr: SocketAddr,
        generation: u64,
    ) -> Result<Self, InvalidName> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self {
            name,
            addr,
            generation,
        })
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.addr, self.generation)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// foca's conflict key for a [`NodeId`]: its name, held inline.
///
/// foca compares the keys of every known member on each update it applies,
/// so the key must be cheap to produce: a copy of at most
/// [`MAX_NAME_LEN`] bytes, with no allocation. Every name that enters a
/// `NodeId` through [`NodeId::new`] or the wire codec is validated, so it
/// fits; a longer one (only possible by writing the public field directly)
/// is keyed by its first `MAX_NAME_LEN` bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NameKey {
    len: u8,
    bytes: [u8; MAX_NAME_LEN],
}

impl NameKey {
    /// The key of `name`.
    pub fn new(name: &str) -> Self {
        let name = name.as_bytes();
        let len = name.len().min(MAX_NAME_LEN);
        let mut bytes = [0; MAX_NAME_LEN];
        bytes[..len].copy_from_slice(&name[..len]);
        Self {
            len: len as u8,
            bytes,
        }
    }

    /// The name (the bytes are ASCII, as validated).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or("")
    }
}

impl fmt::Debug for NameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl foca::Identity for NodeId {
    // Conflicts are by name: one name is one node, whatever its address.
    type Addr = NameKey;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> NameKey {
        NameKey::new(&self.name)
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A node name that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid node name {name:?}: {reason}")]
pub struct InvalidName {
    /// The rejected name.
    pub name: String,
    /// Why it was rejected.
    pub reason: &'static str,
}

/// Checks that `name` is a usable node name: 1 to 63 characters of ASCII
/// letters, digits and `-`, not starting or ending with `-` (a DNS label, so
/// it can name a certificate).
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let fail = |reason| {
        Err(InvalidName {
            name: name.to_owned(),
            reason,
        })
    };
    if name.is_empty() {
        return fail("it is empty");
    }
    if name.len() > MAX_NAME_LEN {
        return fail("it is longer than 63 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return fail("only ASCII letters, digits and '-' are allowed");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return fail("it may not start or end with '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity;

    #[test]
    fn names() {
        assert!(validate_name("n1").is_ok());
        assert!(validate_name("web-a-01").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("-a").is_err());
        assert!(validate_name("a_b").is_err());
        assert!(validate_name("a.b").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
    }

    #[test]
    fn renew_wins_conflict() {
        let id = NodeId::new("n1", "127.0.0.1:1".parse().unwrap(), 7).unwrap();
        let renewed = id.renew().unwrap();
        assert_eq!(renewed.addr(), id.addr());
        assert!(renewed.win_addr_conflict(&id));
        assert!(!id.win_addr_conflict(&renewed));
    }

    #[test]
    fn name_keys() {
        let a = NodeId::new("n1", "127.0.0.1:1".parse().unwrap(), 1).unwrap();
        let b = NodeId::new("n1", "127.0.0.2:2".parse().unwrap(), 2).unwrap();
        let c = NodeId::new("n10", "127.0.0.1:1".parse().unwrap(), 1).unwrap();
        assert_eq!(a.addr(), b.addr());
        assert_ne!(a.addr(), c.addr());
        assert_eq!(c.addr().as_str(), "n10");
        let long = "a".repeat(MAX_NAME_LEN);
        assert_eq!(NameKey::new(&long).as_str(), long);
    }
}
