//! Replication bookkeeping for signed configuration documents: which
//! versions this node holds, which it still wants and from whom, and what
//! to compare with a peer.
//!
//! A document is named by its kind and name and stamped with its version
//! and the digest of its signed bytes. A higher stamp wins: the version
//! first, then, for two documents written with the same version on both
//! sides of a partition, the higher digest, so every node picks the same
//! one. Documents are signed by an operator, so any node that holds one
//! can hand it out: a notice names the node that published it, and a
//! digest exchange names the peer that holds it; fetches try those.
//!
//! Like [`crate::replica`], this module only decides; the bodies, their
//! signatures and their storage live with the caller.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// Document fetches one node runs at once.
pub const DOC_FETCHES_AT_ONCE: usize = 4;
/// The most documents a mesh holds (tombstones included).
pub const MAX_DOCS: usize = 10_000;
/// Holders remembered per wanted document.
const MAX_HOLDERS: usize = 8;

/// Kind and name of a document.
pub type DocKey = (String, String);

/// Which of two documents with the same key wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocStamp {
    /// Assigned by the operator's tooling; higher wins.
    pub version: u64,
    /// SHA-256 of the signed bytes; breaks a tie between versions.
    pub digest: [u8; 32],
}

impl DocStamp {
    /// The digest in hex, for logs and the API.
    pub fn digest_hex(&self) -> String {
        self.digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// One entry of a document list: what a node holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocRef {
    /// The document's kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// Which version.
    pub stamp: DocStamp,
}

/// A fingerprint of a set of documents, given in key order: two nodes with
/// the same one hold the same documents.
pub fn summary_of<'a>(docs: impl Iterator<Item = (&'a DocKey, &'a DocStamp)>) -> u128 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for ((kind, name), stamp) in docs {
        h.update(&(kind.len() as u32).to_le_bytes());
        h.update(kind.as_bytes());
        h.update(&(name.len() as u32).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&stamp.version.to_le_bytes());
        h.update(&stamp.digest);
    }
    h.digest128()
}

/// What the document replica wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocAction {
    /// Fetch the document from `from`; report with
    /// [`DocReplica::fetched`].
    Fetch {
        /// Kind and name.
        key: DocKey,
        /// The stamp wanted (at least).
        stamp: DocStamp,
        /// A node that should hold it.
        from: String,
    },
    /// Tell the mesh that this node holds `stamp` of `key` (it learned it
    /// from a digest, so gossip may never have carried it).
    Announce {
        /// Kind and name.
        key: DocKey,
        /// The stamp.
        stamp: DocStamp,
    },
}

#[derive(Debug, Clone)]
struct Want {
    stamp: DocStamp,
    /// Nodes said to hold it, most recent last.
    holders: Vec<String>,
    /// Holders tried since the last round.
    tried: HashSet<String>,
    /// Learned from a digest rather than a notice.
    from_digest: bool,
}

/// One node's document replication state.
#[derive(Debug, Default)]
pub struct DocReplica {
    held: BTreeMap<DocKey, DocStamp>,
    wanted: BTreeMap<DocKey, Want>,
    fetching: HashSet<DocKey>,
    /// Whether this node has compared lists with a peer and fetched what
    /// it lacked at least once since it started.
    synced_once: bool,
    /// A comparison with a peer is done, and its fetches are pending.
    awaiting_first: bool,
}

impl DocReplica {
    /// Nothing held yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The stamp held for `key`.
    pub fn held(&self, key: &DocKey) -> Option<DocStamp> {
        self.held.get(key).copied()
    }

    /// Documents held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Documents wanted but not yet held.
    pub fn wanted(&self) -> usize {
        self.wanted.len()
    }

    /// Whether this node has caught up with a peer since it started: it
    /// compared lists with one and holds everything that peer had.
    pub fn synced(&self) -> bool {
        self.synced_once
    }

    /// Marks the node caught up without a peer (it is alone in the mesh).
    pub fn set_synced(&mut self) {
        self.synced_once = true;
    }

    /// Everything held, in key order.
    pub fn list(&self) -> Vec<DocRef> {
        self.held
            .iter()
            .map(|((kind, name), stamp)| DocRef {
                kind: kind.clone(),
                name: name.clone(),
                stamp: *stamp,
            })
            .collect()
    }

    /// A fingerprint of everything held: two nodes with the same one hold
    /// the same documents.
    pub fn summary(&self) -> u128 {
        summary_of(self.held.iter())
    }

    /// This node now holds `stamp` of `key` (applied locally, loaded from
    /// disk, or fetched and checked). Older stamps are ignored.
    pub fn hold(&mut self, key: DocKey, stamp: DocStamp) {
        if self.wanted.get(&key).is_some_and(|w| w.stamp <= stamp) {
            self.wanted.remove(&key);
        }
        let held = self.held.entry(key).or_insert(stamp);
        *held = (*held).max(stamp);
    }

    /// Someone says `from` holds `stamp` of `key`: want it if it beats what
    /// is held. `from_digest` is true when it came from a list exchange
    /// rather than a notice.
    pub fn offer(
        &mut self,
        key: DocKey,
        stamp: DocStamp,
        from: &str,
        from_digest: bool,
        out: &mut Vec<DocAction>,
    ) {
        if self.held(&key).is_some_and(|h| h >= stamp) {
            return;
        }
        if !self.held.contains_key(&key) && self.held.len() + self.wanted.len() >= MAX_DOCS {
            return;
        }
        let want = self.wanted.entry(key.clone()).or_insert_with(|| Want {
            stamp,
            holders: Vec::new(),
            tried: HashSet::new(),
            from_digest,
        });
        if stamp > want.stamp {
            want.stamp = stamp;
            want.holders.clear();
            want.tried.clear();
            want.from_digest = from_digest;
        } else if stamp < want.stamp {
            return;
        }
        want.from_digest &= from_digest;
        want.holders.retain(|h| h != from);
        want.holders.push(from.to_owned());
        if want.holders.len() > MAX_HOLDERS {
            want.holders.remove(0);
        }
        self.fetch_queued(out);
    }

    /// A peer's whole list: want whatever it holds newer. Completes the
    /// first sync once everything wanted from it has arrived.
    pub fn list_from(&mut self, peer: &str, list: &[DocRef], out: &mut Vec<DocAction>) {
        for d in list {
            self.offer((d.kind.clone(), d.name.clone()), d.stamp, peer, true, out);
        }
        self.note_compared();
    }

    /// A peer's summary matched ours.
    pub fn same_as_peer(&mut self) {
        self.note_compared();
    }

    fn note_compared(&mut self) {
        if self.wanted.is_empty() {
            self.synced_once = true;
        } else if !self.synced_once {
            self.awaiting_first = true;
        }
    }

    /// A fetch of `key` from `from` ended: with the stamp of the document
    /// now held, or `None` if it failed or was refused. Another holder is
    /// tried at once; when none is left, the next round tries again.
    pub fn fetched(
        &mut self,
        key: &DocKey,
        from: &str,
        got: Option<DocStamp>,
        out: &mut Vec<DocAction>,
    ) {
        self.fetching.remove(key);
        if let Some(stamp) = got {
            let news = self.held(key).is_none_or(|h| h < stamp);
            let announce = news
                && self
                    .wanted
                    .get(key)
                    .is_some_and(|w| w.from_digest && w.stamp <= stamp);
            self.hold(key.clone(), stamp);
            if let Some(w) = self.wanted.get_mut(key) {
                // It had an older one: ask someone else.
                w.tried.insert(from.to_owned());
            }
            // A document learned by comparing lists after the first sync
            // may be one gossip never carried (written on the other side of
            // a partition): pass it on.
            if self.synced_once && announce {
                out.push(DocAction::Announce {
                    key: key.clone(),
                    stamp,
                });
            }
        } else if let Some(w) = self.wanted.get_mut(key) {
            w.tried.insert(from.to_owned());
        }
        if self.awaiting_first && self.wanted.is_empty() {
            self.awaiting_first = false;
            self.synced_once = true;
        }
        self.fetch_queued(out);
    }

    /// A member left or went down: it no longer holds anything for us.
    pub fn member_gone(&mut self, node: &str) {
        for w in self.wanted.values_mut() {
            w.holders.retain(|h| h != node);
        }
    }

    /// An anti-entropy round: holders that failed may be tried again.
    pub fn round(&mut self, out: &mut Vec<DocAction>) {
        for w in self.wanted.values_mut() {
            w.tried.clear();
        }
        // Wants nobody can serve any more are dropped; a list exchange
        // finds them again if they still exist somewhere.
        self.wanted.retain(|_, w| !w.holders.is_empty());
        if self.awaiting_first && self.wanted.is_empty() {
            self.awaiting_first = false;
            self.synced_once = true;
        }
        self.fetch_queued(out);
    }

    fn fetch_queued(&mut self, out: &mut Vec<DocAction>) {
        if self.fetching.len() >= DOC_FETCHES_AT_ONCE {
            return;
        }
        let mut next = Vec::new();
        for (key, w) in &self.wanted {
            if self.fetching.len() + next.len() >= DOC_FETCHES_AT_ONCE {
                break;
            }
            if self.fetching.contains(key) {
                continue;
            }
            if let Some(from) = w.holders.iter().rev().find(|h| !w.tried.contains(*h)) {
                next.push((key.clone(), w.stamp, from.clone()));
            }
        }
        for (key, stamp, from) in next {
            self.fetching.insert(key.clone());
            out.push(DocAction::Fetch { key, stamp, from });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> DocKey {
        ("route".into(), name.into())
    }

    fn stamp(version: u64, d: u8) -> DocStamp {
        DocStamp {
            version,
            digest: [d; 32],
        }
    }

    fn fetches(out: &[DocAction]) -> Vec<(String, String)> {
        out.iter()
            .filter_map(|a| match a {
                DocAction::Fetch { key, from, .. } => Some((key.1.clone(), from.clone())),
                DocAction::Announce { .. } => None,
            })
            .collect()
    }

    #[test]
    fn higher_version_then_higher_digest_wins() {
        assert!(stamp(2, 0) > stamp(1, 9));
        assert!(stamp(2, 5) > stamp(2, 4));
        let mut r = DocReplica::new();
        r.hold(key("web"), stamp(2, 5));
        r.hold(key("web"), stamp(2, 4));
        r.hold(key("web"), stamp(1, 9));
        assert_eq!(r.held(&key("web")), Some(stamp(2, 5)), "no rollback");
        let mut out = Vec::new();
        r.offer(key("web"), stamp(2, 4), "b", false, &mut out);
        assert!(out.is_empty(), "a losing stamp is not wanted");
        r.offer(key("web"), stamp(2, 6), "b", false, &mut out);
        assert_eq!(fetches(&out), [("web".into(), "b".into())]);
    }

    #[test]
    fn a_failed_fetch_tries_another_holder_then_waits_for_the_round() {
        let mut r = DocReplica::new();
        let mut out = Vec::new();
        r.offer(key("web"), stamp(1, 1), "a", false, &mut out);
        r.offer(key("web"), stamp(1, 1), "b", false, &mut out);
        assert_eq!(fetches(&out), [("web".into(), "a".into())]);
        out.clear();
        r.fetched(&key("web"), "a", None, &mut out);
        assert_eq!(fetches(&out), [("web".into(), "b".into())]);
        out.clear();
        r.fetched(&key("web"), "b", None, &mut out);
        assert!(out.is_empty(), "everyone tried: {out:?}");
        r.round(&mut out);
        assert_eq!(fetches(&out), [("web".into(), "b".into())]);
        out.clear();
        r.fetched(&key("web"), "b", Some(stamp(1, 1)), &mut out);
        assert_eq!(r.wanted(), 0);
        assert!(out.is_empty(), "from a notice: nothing to announce");
    }

    #[test]
    fn first_sync_completes_when_the_peers_list_is_fetched() {
        let mut r = DocReplica::new();
        let mut out = Vec::new();
        let list: Vec<DocRef> = (0..6)
            .map(|i| DocRef {
                kind: "route".into(),
                name: format!("s{i}"),
                stamp: stamp(1, i),
            })
            .collect();
        r.list_from("peer", &list, &mut out);
        assert_eq!(fetches(&out).len(), DOC_FETCHES_AT_ONCE);
        assert!(!r.synced());
        for i in 0..6u8 {
            out.clear();
            r.fetched(&key(&format!("s{i}")), "peer", Some(stamp(1, i)), &mut out);
            assert!(
                !out.iter().any(|a| matches!(a, DocAction::Announce { .. })),
                "a joiner announces nothing"
            );
        }
        assert!(r.synced());
        assert_eq!(r.list(), list);

        // After that, a document found by comparing lists is announced.
        out.clear();
        r.list_from(
            "other",
            &[DocRef {
                kind: "route".into(),
                name: "s0".into(),
                stamp: stamp(2, 0),
            }],
            &mut out,
        );
        r.fetched(&key("s0"), "other", Some(stamp(2, 0)), &mut out);
        assert!(
            out.contains(&DocAction::Announce {
                key: key("s0"),
                stamp: stamp(2, 0)
            }),
            "{out:?}"
        );
    }

    #[test]
    fn summaries_differ_exactly_when_holdings_do() {
        let mut a = DocReplica::new();
        let mut b = DocReplica::new();
        assert_eq!(a.summary(), b.summary());
        a.hold(key("web"), stamp(1, 1));
        assert_ne!(a.summary(), b.summary());
        b.hold(key("web"), stamp(1, 2));
        assert_ne!(a.summary(), b.summary());
        a.hold(key("web"), stamp(1, 2));
        assert_eq!(a.summary(), b.summary());
    }
}
