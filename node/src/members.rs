//! What the rest of the agent sees of the membership, and what it may ask
//! of it. The mesh task ([`crate::mesh`]) publishes a [`Snapshot`] and takes
//! [`Command`]s; everyone else (catalog view, proxy, admin API, metrics)
//! depends on these types only.

use std::collections::BTreeMap;
use std::sync::Arc;

use gossamer_membership::lifeguard::HealthStats;
use gossamer_membership::{MemberState, MemberView, NodeId};
use tokio::sync::oneshot;

/// Requests to the mesh task.
#[derive(Debug)]
pub enum Command {
    /// Leave the mesh; replies once the leave notices are on the wire.
    Leave(oneshot::Sender<()>),
    /// A configuration document was applied here: announce it.
    PublishDoc(
        gossamer_membership::docs::DocKey,
        gossamer_membership::docs::DocStamp,
    ),
}

/// The membership as of the last change.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// This node.
    pub local: NodeId,
    /// This node's SWIM incarnation.
    pub local_incarnation: u16,
    /// Whether this node has left.
    pub left: bool,
    /// Other members, sorted by name (shared between snapshots while
    /// unchanged).
    pub members: Arc<Vec<MemberView>>,
    /// Active members besides us.
    pub active: usize,
    /// Whether we ever had another active member.
    pub joined: bool,
    /// Whether dialing the seeds reached this node itself (alone, it is the
    /// mesh).
    pub self_seed: bool,
    /// Bytes of new gossip broadcast items received.
    pub broadcast_bytes: u64,
    /// "You are down" messages held back because the member had refuted
    /// the suspicion.
    pub held_down_notices: u64,
    /// Local health score (0 = healthy; see
    /// [`gossamer_membership::lifeguard`]).
    pub health_score: u8,
    /// What the failure detector counted.
    pub health: HealthStats,
    /// How long a suspect has to refute before it is declared down, now.
    pub suspicion_timeout_ms: u64,
    /// Whether this node has caught up with the mesh's configuration
    /// documents since it started (or is the mesh).
    pub docs_synced: bool,
    /// Documents announced but not yet fetched.
    pub docs_wanted: usize,
    /// Peers refused because their certificate is revoked: name → serial
    /// (hex). They take no traffic whatever SWIM says.
    pub revoked: Arc<BTreeMap<String, String>>,
}

impl Snapshot {
    /// Before the mesh task has run.
    pub fn empty(local: NodeId) -> Self {
        Self {
            local,
            local_incarnation: 0,
            left: false,
            members: Arc::default(),
            active: 0,
            joined: false,
            self_seed: false,
            broadcast_bytes: 0,
            held_down_notices: 0,
            health_score: 0,
            health: HealthStats::default(),
            suspicion_timeout_ms: 0,
            docs_synced: false,
            docs_wanted: 0,
            revoked: Arc::default(),
        }
    }

    /// Members per state, this node included.
    pub fn count(&self, state: MemberState) -> usize {
        let local = if self.left {
            MemberState::Left
        } else {
            MemberState::Alive
        };
        self.members.iter().filter(|m| m.state == state).count() + usize::from(local == state)
    }

    /// Whether `node` can take traffic: this node unless it left, others
    /// while alive or suspect and not revoked.
    pub fn is_available(&self, node: &str) -> bool {
        if node == self.local.name {
            return !self.left;
        }
        if self.revoked.contains_key(node) {
            return false;
        }
        self.members
            .iter()
            .any(|m| m.id.name == node && m.state.is_active())
    }
}
