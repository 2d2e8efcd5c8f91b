//! What the rest of the agent sees of the membership, and what it may ask
//! of it. The mesh task ([`crate::mesh`]) publishes a [`Snapshot`] and takes
//! [`Command`]s; everyone else (catalog view, proxy, admin API, metrics)
//! depends on these types only.

use std::collections::BTreeMap;
use std::sync::Arc;

use gossamer_membership::lifeguard::HealthStats;
use gossamer_membership::{MemberState, MemberView, NodeId};
use tokio::sync::{oneshot, watch};

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

    /// Whether `other` says the same about who is in the mesh and who can
    /// take traffic: this node, whether it left, the members and their
    /// states, and the revoked peers. The failure detector's counters and
    /// gossip figures, which move every probe period, are left out: what
    /// is built from the members (routes, events) is rebuilt only when
    /// this is false.
    pub fn same_members(&self, other: &Snapshot) -> bool {
        self.local == other.local
            && self.left == other.left
            && (Arc::ptr_eq(&self.members, &other.members) || self.members == other.members)
            && (Arc::ptr_eq(&self.revoked, &other.revoked) || self.revoked == other.revoked)
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

/// Waits until the membership changes in a way routes and events depend on
/// ([`Snapshot::same_members`]), and leaves the new snapshot in `current`.
/// The snapshot is republished every probe period with new failure-detector
/// counters; rebuilding every route for those took 7–15 ms a second with a
/// 1,000-service catalog, and requests on the same thread waited for it.
/// Cancel-safe: it changes `current` only when it returns.
pub async fn changed(
    members: &mut watch::Receiver<Arc<Snapshot>>,
    current: &mut Arc<Snapshot>,
) -> Result<(), watch::error::RecvError> {
    loop {
        members.changed().await?;
        let next = members.borrow_and_update().clone();
        if !next.same_members(current) {
            *current = next;
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId::new(name, "127.0.0.1:7946".parse().unwrap(), 1).unwrap()
    }

    fn with_b(state: MemberState) -> Snapshot {
        let mut s = Snapshot::empty(id("a"));
        s.members = Arc::new(vec![MemberView {
            id: id("b"),
            incarnation: 0,
            state,
        }]);
        s
    }

    #[test]
    fn counters_are_not_a_membership_change() {
        let before = with_b(MemberState::Alive);
        let mut after = before.clone();
        after.health_score = 3;
        after.broadcast_bytes += 100;
        after.suspicion_timeout_ms = 5_000;
        after.docs_wanted = 2;
        assert!(after.same_members(&before));
        // Equal lists in different allocations are the same too.
        after.members = Arc::new((*before.members).clone());
        assert!(after.same_members(&before));

        assert!(!with_b(MemberState::Suspect).same_members(&before));
        let mut left = before.clone();
        left.left = true;
        assert!(!left.same_members(&before));
        let mut revoked = before.clone();
        revoked.revoked = Arc::new(BTreeMap::from([("b".into(), "01".into())]));
        assert!(!revoked.same_members(&before));
    }

    #[tokio::test]
    async fn changed_skips_counter_only_snapshots() {
        let (tx, mut rx) = watch::channel(Arc::new(with_b(MemberState::Alive)));
        let mut current = rx.borrow_and_update().clone();
        for score in 1..=5 {
            let mut s = (*current).clone();
            s.health_score = score;
            tx.send_replace(Arc::new(s));
        }
        let waited = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            changed(&mut rx, &mut current),
        )
        .await;
        assert!(waited.is_err(), "counters alone must not wake the caller");
        tx.send_replace(Arc::new(with_b(MemberState::Down)));
        changed(&mut rx, &mut current).await.unwrap();
        assert_eq!(current.members[0].state, MemberState::Down);
        drop(tx);
        assert!(changed(&mut rx, &mut current).await.is_err());
    }
}
