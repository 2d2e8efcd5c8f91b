//! Push-pull membership sync: two nodes swap their whole member lists.
//!
//! SWIM spreads each change by piggybacking it a bounded number of times, so
//! in a large cluster a few (observer, member) pairs can miss one and stay
//! wrong until the two happen to talk. A periodic exchange of full views with
//! a random peer repairs those, and lets a node that just joined learn every
//! member at once instead of one update at a time. foca takes the records
//! through [`foca::Foca::apply_many`], with the same rules as gossip: a newer
//! generation replaces an older one, `down` is final for an identity.
//!
//! The payload is size-capped and every name is validated, so a peer's bytes
//! can only ever add or refresh member records, as its SWIM datagrams can.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::MAX_SYNC_FRAME;
use crate::codec::{self, CodecError};
use crate::identity::{NodeId, validate_name};

/// A node that renews its identity (it was declared down, most likely while
/// cut off) syncs once more about this long after (±50 %), when the news of
/// its rejoin has spread, to pick up what it missed meanwhile.
pub const SYNC_AFTER_RENEWAL: Duration = Duration::from_secs(10);

/// Most members one sync payload may carry.
pub const MAX_SYNC_MEMBERS: usize = 50_000;

/// A member's state as carried in a sync payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncState {
    /// Alive.
    Alive,
    /// Suspected.
    Suspect,
    /// Declared down.
    Down,
    /// Left on purpose (a down member whose leave notice was seen).
    Left,
}

/// One member as the sender sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncMember {
    /// Its identity.
    pub id: NodeId,
    /// Its SWIM incarnation.
    pub incarnation: u16,
    /// Its state.
    pub state: SyncState,
}

/// A node's whole view, itself included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncPayload {
    /// Every member the sender holds.
    pub members: Vec<SyncMember>,
}

impl SyncPayload {
    /// Encodes the payload (at most [`MAX_SYNC_FRAME`] bytes).
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode_large(self, MAX_SYNC_FRAME)
    }

    /// Decodes and checks a payload from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, CodecError> {
        let payload: Self = codec::decode_large(bytes, MAX_SYNC_FRAME)?;
        if payload.members.len() > MAX_SYNC_MEMBERS {
            return Err(CodecError::TooLarge {
                len: payload.members.len(),
                max: MAX_SYNC_MEMBERS,
            });
        }
        for m in &payload.members {
            validate_name(&m.id.name)?;
        }
        Ok(payload)
    }
}

/// How often to sync with a random member in a cluster of `nodes`: `base`
/// up to 32 nodes, then growing with log2 of the size (one more `base` per
/// doubling), so each node's share of sync traffic grows like n·log n / n
/// rather than n.
pub fn interval_for(base: Duration, nodes: usize) -> Duration {
    let doublings = (nodes.max(1) as f64 / 32.0).log2().max(0.0);
    base.mul_f64(1.0 + doublings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, state: SyncState) -> SyncMember {
        SyncMember {
            id: NodeId::new(name, "10.0.0.1:7946".parse().unwrap(), 3).unwrap(),
            incarnation: 2,
            state,
        }
    }

    #[test]
    fn round_trip() {
        let p = SyncPayload {
            members: vec![
                member("a", SyncState::Alive),
                member("b", SyncState::Suspect),
                member("c", SyncState::Down),
                member("d", SyncState::Left),
            ],
        };
        assert_eq!(SyncPayload::decode(&p.encode().unwrap()).unwrap(), p);
    }

    #[test]
    fn bad_payloads_are_refused() {
        let mut bad = member("a", SyncState::Alive);
        bad.id.name = "not a name".into();
        let p = SyncPayload { members: vec![bad] };
        assert!(SyncPayload::decode(&p.encode().unwrap()).is_err());
        let good = SyncPayload {
            members: vec![member("a", SyncState::Alive)],
        }
        .encode()
        .unwrap();
        assert!(SyncPayload::decode(&good[..good.len() - 1]).is_err());
        let mut long = good.clone();
        long.push(0);
        assert!(SyncPayload::decode(&long).is_err());
        // A length prefix claiming a huge list fails without allocating it.
        assert!(SyncPayload::decode(&[0xfc, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }

    #[test]
    fn interval_grows_with_log_size() {
        let base = Duration::from_secs(30);
        assert_eq!(interval_for(base, 1), base);
        assert_eq!(interval_for(base, 32), base);
        assert_eq!(interval_for(base, 64), base * 2);
        assert_eq!(interval_for(base, 1024), base * 6);
    }
}
