//! Custom broadcasts piggybacked on SWIM traffic.
//!
//! Each item is one kind byte and a bincode body. foca calls
//! [`GossipHandler::receive_item`] for every item it sees (our own included);
//! returning a key means "new to me, pass it on".

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::docs::{DocStamp, MAX_DOCS};
use crate::identity::{NodeId, validate_name};

const KIND_LEAVE: u8 = 1;
const KIND_CATALOG: u8 = 2;
const KIND_DOC: u8 = 3;
/// Longest document kind or name accepted in a notice.
const MAX_DOC_NAME: usize = 128;
/// Notices held for the driver before the oldest are dropped (the
/// anti-entropy sync catches up on anything dropped).
const MAX_PENDING_NOTICES: usize = 65_536;

/// A node announcing that it leaves on purpose (so peers show it `left`, not
/// `down`). It carries the generation so a later restart is not mistaken for
/// the departed one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leave {
    /// The departing node.
    pub name: String,
    /// Which generation of it departs.
    pub generation: u64,
}

impl Leave {
    /// The broadcast bytes for this item.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![KIND_LEAVE];
        out.extend(codec::encode(self)?);
        Ok(out)
    }
}

/// "Node `node` now publishes catalog version `version`": peers that hold
/// an older entry fetch the new one from the node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogNotice {
    /// The owner of the entry.
    pub node: String,
    /// Its new version.
    pub version: u64,
}

impl CatalogNotice {
    /// The broadcast bytes for this item.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![KIND_CATALOG];
        out.extend(codec::encode(self)?);
        Ok(out)
    }
}

/// "`holder` holds document (`kind`, `name`) at `stamp`": peers with an
/// older one fetch it from the holder (or from whoever else has it; the
/// operator's signature makes any copy trustworthy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocNotice {
    /// The document's kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Its version and digest.
    pub stamp: DocStamp,
    /// A node that holds it.
    pub holder: String,
}

impl DocNotice {
    /// The broadcast bytes for this item.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = vec![KIND_DOC];
        out.extend(codec::encode(self)?);
        Ok(out)
    }
}

/// The dedup key of a broadcast: a newer item for the same key replaces the
/// older one in foca's retransmission queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GossipKey {
    /// A [`Leave`] by this node name.
    Leave(String),
    /// A [`CatalogNotice`] about this node's entry.
    Catalog(String),
    /// A [`DocNotice`] about this document (kind, name).
    Doc(String, String),
}

impl foca::Invalidates for GossipKey {
    fn invalidates(&self, other: &Self) -> bool {
        self == other
    }
}

/// State learned from broadcasts, shared between foca's handler and the
/// membership core (both live on the same task; the lock is never contended).
#[derive(Debug, Default)]
pub(crate) struct GossipState {
    /// Highest departed generation per node name.
    pub(crate) left: HashMap<String, u64>,
    /// Highest catalog version announced per node.
    pub(crate) catalog: HashMap<String, u64>,
    /// Notices about other nodes not yet handed to the driver.
    pub(crate) notices: std::collections::VecDeque<CatalogNotice>,
    /// Highest document stamp announced per (kind, name).
    pub(crate) docs: HashMap<(String, String), DocStamp>,
    /// Document notices from others not yet handed to the driver.
    pub(crate) doc_notices: std::collections::VecDeque<DocNotice>,
    /// Bytes of custom broadcast items received (new ones only).
    pub(crate) broadcast_bytes: u64,
}

impl GossipState {
    pub(crate) fn has_left(&self, id: &NodeId) -> bool {
        self.left.get(&id.name) == Some(&id.generation)
    }

    /// Records that `id` left (learned other than by its leave notice).
    pub(crate) fn note_left(&mut self, id: &NodeId) {
        let known = self.left.entry(id.name.clone()).or_insert(0);
        *known = (*known).max(id.generation);
    }
}

fn whole<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, CodecError> {
    let (value, used): (T, usize) = codec::decode(body)?;
    if used != body.len() {
        return Err(CodecError::TrailingBytes(body.len() - used));
    }
    Ok(value)
}

/// foca's `BroadcastHandler` for Gossamer's items.
#[derive(Debug, Clone, Default)]
pub(crate) struct GossipHandler {
    state: Arc<Mutex<GossipState>>,
    local: String,
}

impl GossipHandler {
    pub(crate) fn new(local: String) -> Self {
        Self {
            state: Arc::default(),
            local,
        }
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, GossipState> {
        // The state holds plain maps that are valid after any panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl foca::BroadcastHandler<NodeId> for GossipHandler {
    type Key = GossipKey;
    type Error = CodecError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeId>,
    ) -> Result<Option<GossipKey>, CodecError> {
        let (&kind, body) = data.split_first().ok_or(CodecError::Truncated)?;
        match kind {
            KIND_LEAVE => {
                let leave: Leave = whole(body)?;
                validate_name(&leave.name)?;
                let mut state = self.state();
                let known = state.left.entry(leave.name.clone()).or_insert(0);
                if *known >= leave.generation && *known != 0 {
                    return Ok(None);
                }
                *known = leave.generation;
                state.broadcast_bytes += data.len() as u64;
                Ok(Some(GossipKey::Leave(leave.name)))
            }
            KIND_CATALOG => {
                let notice: CatalogNotice = whole(body)?;
                validate_name(&notice.node)?;
                let mut state = self.state();
                let known = state.catalog.entry(notice.node.clone()).or_insert(0);
                if *known >= notice.version && *known != 0 {
                    return Ok(None);
                }
                *known = notice.version;
                state.broadcast_bytes += data.len() as u64;
                let key = GossipKey::Catalog(notice.node.clone());
                if notice.node != self.local {
                    if state.notices.len() >= MAX_PENDING_NOTICES {
                        state.notices.pop_front();
                    }
                    state.notices.push_back(notice);
                }
                Ok(Some(key))
            }
            KIND_DOC => {
                let notice: DocNotice = whole(body)?;
                validate_name(&notice.holder)?;
                if notice.kind.len() > MAX_DOC_NAME || notice.name.len() > MAX_DOC_NAME {
                    return Err(CodecError::TooLarge {
                        len: notice.kind.len().max(notice.name.len()),
                        max: MAX_DOC_NAME,
                    });
                }
                let mut state = self.state();
                let doc = (notice.kind.clone(), notice.name.clone());
                if state
                    .docs
                    .get(&doc)
                    .is_some_and(|known| *known >= notice.stamp)
                {
                    return Ok(None);
                }
                if !state.docs.contains_key(&doc) && state.docs.len() >= MAX_DOCS {
                    return Ok(None);
                }
                state.docs.insert(doc.clone(), notice.stamp);
                state.broadcast_bytes += data.len() as u64;
                if notice.holder != self.local {
                    if state.doc_notices.len() >= MAX_PENDING_NOTICES {
                        state.doc_notices.pop_front();
                    }
                    state.doc_notices.push_back(notice);
                }
                Ok(Some(GossipKey::Doc(doc.0, doc.1)))
            }
            other => Err(CodecError::BadMagic(other)),
        }
    }
}
