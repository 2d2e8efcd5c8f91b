//! Turns changes of the membership, the catalog and the documents into
//! events, by comparing each new view with the last one. What the agent
//! holds when it starts is its starting point, not a burst of events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use gossamer_membership::catalog::Catalog;
use gossamer_membership::core::MemberState;
use tokio::sync::watch;

use super::{Event, Events, Kind};
use crate::catalog::view::{self, Effective};
use crate::documents::Documents;
use crate::members::Snapshot;

type InstanceKey<'a> = (&'a str, &'a str, &'a str); // service, node, id

/// Every instance's effective health, by service, node and id.
fn effective<'a>(
    catalog: &'a Catalog,
    snapshot: &Snapshot,
) -> BTreeMap<InstanceKey<'a>, Effective> {
    let mut out = BTreeMap::new();
    for entry in catalog.entries() {
        let available = snapshot.is_available(&entry.node);
        for s in &entry.services {
            let key = (s.name.as_str(), entry.node.as_str(), s.id.as_str());
            out.insert(key, view::effective(available, s.health));
        }
    }
    out
}

#[derive(Debug, Default)]
struct Seen {
    members: HashMap<String, (MemberState, u64)>,
    revoked: BTreeSet<String>,
    /// The catalog and membership last compared.
    last_view: Option<(Arc<Catalog>, Arc<Snapshot>)>,
    documents: HashMap<(String, String), (u64, bool)>,
    refusals: BTreeSet<(u64, String, String, u64)>,
}

fn health_name(h: Effective) -> &'static str {
    match h {
        Effective::Passing => "passing",
        Effective::Critical => "critical",
        Effective::Unavailable => "unavailable",
    }
}

fn member_action(state: MemberState) -> &'static str {
    match state {
        MemberState::Alive => "up",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
        MemberState::Left => "left",
    }
}

impl Seen {
    /// Members: what changed since the last snapshot.
    fn members(&mut self, snapshot: &Snapshot, out: &mut Vec<Event>) {
        for m in snapshot.members.iter() {
            let now = (m.state, m.id.generation);
            let before = self.members.insert(m.id.name.clone(), now);
            let action = match before {
                None => Some(member_action(m.state)),
                Some((state, _)) if state != m.state => Some(member_action(m.state)),
                Some((_, generation)) if generation != m.id.generation => Some("renewed"),
                Some(_) => None,
            };
            if let Some(action) = action {
                let mut e = Event::new(Kind::Member, action);
                e.node = Some(m.id.name.clone());
                e.from = before.map(|(s, _)| s.as_str().to_owned());
                e.to = Some(m.state.as_str().to_owned());
                out.push(e);
            }
        }
        for (name, serial) in snapshot.revoked.iter() {
            if self.revoked.insert(name.clone()) {
                let mut e = Event::new(Kind::Member, "revoked");
                e.node = Some(name.clone());
                e.reason = Some(format!("certificate {serial} revoked"));
                out.push(e);
            }
        }
        self.revoked.retain(|n| snapshot.revoked.contains_key(n));
    }

    /// Instances: registered, deregistered and health changes (effective
    /// health, so an instance whose node went down becomes unavailable).
    /// The last catalog and membership are kept rather than a copy of
    /// every instance: their entries are shared with the agent's own.
    fn instances(
        &mut self,
        catalog: &Arc<Catalog>,
        snapshot: &Arc<Snapshot>,
        out: &mut Vec<Event>,
    ) {
        let now = effective(catalog, snapshot);
        let before = match &self.last_view {
            Some((c, m)) => effective(c, m),
            None => BTreeMap::new(),
        };
        let event = |kind, action: &str, (service, node, id): InstanceKey<'_>| {
            let mut e = Event::new(kind, action);
            e.service = Some(service.to_owned());
            e.node = Some(node.to_owned());
            e.instance = Some(id.to_owned());
            e
        };
        for (key, health) in &now {
            match before.get(key) {
                None => {
                    let mut e = event(Kind::Service, "registered", *key);
                    e.to = Some(health_name(*health).into());
                    out.push(e);
                }
                Some(was) if was != health => {
                    let mut e = event(Kind::Health, "changed", *key);
                    e.from = Some(health_name(*was).into());
                    e.to = Some(health_name(*health).into());
                    out.push(e);
                }
                Some(_) => {}
            }
        }
        for key in before.keys() {
            if !now.contains_key(key) {
                out.push(event(Kind::Service, "deregistered", *key));
            }
        }
        self.last_view = Some((catalog.clone(), snapshot.clone()));
    }

    /// Documents applied or deleted, and refusals.
    fn documents(&mut self, docs: &Documents, out: &mut Vec<Event>) {
        for held in docs.all() {
            let env = &held.envelope;
            let key = (env.kind.clone(), env.name.clone());
            let now = (held.stamp.version, env.deleted);
            if self.documents.insert(key, now) != Some(now) {
                let mut e = Event::new(
                    Kind::Config,
                    if env.deleted { "deleted" } else { "applied" },
                );
                e.document = Some(format!("{}/{}", env.kind, env.name));
                e.version = Some(held.stamp.version);
                e.reason = Some(format!("signed by {}", held.signer));
                out.push(e);
            }
        }
        let refusals = docs.refusals();
        let kept: BTreeSet<_> = refusals
            .iter()
            .map(|r| (r.at_ms, r.kind.clone(), r.name.clone(), r.version))
            .collect();
        for r in &refusals {
            if !self
                .refusals
                .contains(&(r.at_ms, r.kind.clone(), r.name.clone(), r.version))
            {
                let mut e = Event::new(Kind::Config, "refused");
                e.document = Some(format!("{}/{}", r.kind, r.name));
                e.version = Some(r.version);
                e.reason = Some(r.error.clone());
                out.push(e);
            }
        }
        self.refusals = kept;
    }
}

/// Publishes events for changes until the agent stops.
pub async fn run(
    events: Arc<Events>,
    mut members: watch::Receiver<Arc<Snapshot>>,
    mut catalog: watch::Receiver<Arc<Catalog>>,
    documents: Arc<Documents>,
    tasks: crate::tasks::Tasks,
) {
    let mut doc_changes = documents.subscribe();
    let mut refusals = documents.subscribe_refusals();
    let mut seen = Seen::default();
    let mut ignored = Vec::new();
    // The starting point: no events for what is already there.
    let mut snapshot = members.borrow_and_update().clone();
    {
        let cat = catalog.borrow_and_update().clone();
        seen.members(&snapshot, &mut ignored);
        seen.instances(&cat, &snapshot, &mut ignored);
        doc_changes.mark_unchanged();
        refusals.mark_unchanged();
        seen.documents(&documents, &mut ignored);
    }
    loop {
        let mut out = Vec::new();
        tokio::select! {
            changed = crate::members::changed(&mut members, &mut snapshot) => {
                if changed.is_err() { return; }
                seen.members(&snapshot, &mut out);
                // Availability decides effective health too.
                seen.instances(&catalog.borrow().clone(), &snapshot, &mut out);
            }
            changed = catalog.changed() => {
                if changed.is_err() { return; }
                let cat = catalog.borrow_and_update().clone();
                seen.instances(&cat, &snapshot, &mut out);
            }
            changed = doc_changes.changed() => {
                if changed.is_err() { return; }
                seen.documents(&documents, &mut out);
            }
            changed = refusals.changed() => {
                if changed.is_err() { return; }
                seen.documents(&documents, &mut out);
            }
            () = tasks.stopped() => return,
        }
        for event in out {
            events.publish(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use gossamer_membership::catalog::{Health, NodeEntry, ServiceInstance};
    use gossamer_membership::{MemberView, NodeId};

    use super::*;

    fn instance(id: &str, health: Health) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            name: "web".into(),
            address: "127.0.0.1".into(),
            port: 8080,
            tags: Vec::new(),
            version: String::new(),
            weight: 100,
            hash_policy: String::new(),
            health,
            protocol: Default::default(),
        }
    }

    fn catalog(version: u64, services: Vec<ServiceInstance>) -> Arc<Catalog> {
        let mut c = Catalog::new();
        c.merge(NodeEntry {
            node: "b".into(),
            version,
            services,
        });
        Arc::new(c)
    }

    fn members(b: MemberState) -> Arc<Snapshot> {
        let id = |name| NodeId::new(name, "127.0.0.1:7946".parse().unwrap(), 1).unwrap();
        let mut s = Snapshot::empty(id("a"));
        s.members = Arc::new(vec![MemberView {
            id: id("b"),
            incarnation: 0,
            state: b,
        }]);
        Arc::new(s)
    }

    fn seen(events: &[Event]) -> Vec<(String, String, Option<String>)> {
        let name = |e: &Event| {
            serde_json::to_value(e).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        events
            .iter()
            .map(|e| (name(e), e.instance.clone().unwrap(), e.to.clone()))
            .collect()
    }

    #[test]
    fn instances_are_compared_with_the_last_catalog_and_membership() {
        let mut s = Seen::default();
        let mut out = Vec::new();
        let alive = members(MemberState::Alive);
        let first = catalog(
            1,
            vec![
                instance("w1", Health::Passing),
                instance("w2", Health::Passing),
            ],
        );
        s.instances(&first, &alive, &mut out);
        assert_eq!(out.len(), 2, "the first view registers everything");
        out.clear();
        s.instances(&first, &alive, &mut out);
        assert!(out.is_empty(), "no change, no event: {out:?}");

        let second = catalog(
            2,
            vec![
                instance("w1", Health::Critical),
                instance("w3", Health::Passing),
            ],
        );
        s.instances(&second, &alive, &mut out);
        assert_eq!(
            seen(&out),
            [
                ("health".into(), "w1".into(), Some("critical".into())),
                ("service".into(), "w3".into(), Some("passing".into())),
                ("service".into(), "w2".into(), None),
            ]
        );
        assert_eq!(out[2].action, "deregistered");
        out.clear();

        s.instances(&second, &members(MemberState::Down), &mut out);
        assert_eq!(
            seen(&out),
            [
                ("health".into(), "w1".into(), Some("unavailable".into())),
                ("health".into(), "w3".into(), Some("unavailable".into())),
            ]
        );
    }
}
