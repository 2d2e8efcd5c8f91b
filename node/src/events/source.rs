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

type InstanceKey = (String, String, String); // service, node, id

#[derive(Debug, Default)]
struct Seen {
    members: HashMap<String, (MemberState, u64)>,
    revoked: BTreeSet<String>,
    instances: BTreeMap<InstanceKey, Effective>,
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
    fn instances(&mut self, catalog: &Catalog, snapshot: &Snapshot, out: &mut Vec<Event>) {
        let mut now = BTreeMap::new();
        for (service, list) in view::services(catalog, snapshot) {
            for i in list {
                now.insert((service.clone(), i.node, i.id), i.health);
            }
        }
        let event = |kind, action: &str, key: &InstanceKey| {
            let mut e = Event::new(kind, action);
            e.service = Some(key.0.clone());
            e.node = Some(key.1.clone());
            e.instance = Some(key.2.clone());
            e
        };
        for (key, health) in &now {
            match self.instances.get(key) {
                None => {
                    let mut e = event(Kind::Service, "registered", key);
                    e.to = Some(health_name(*health).into());
                    out.push(e);
                }
                Some(before) if before != health => {
                    let mut e = event(Kind::Health, "changed", key);
                    e.from = Some(health_name(*before).into());
                    e.to = Some(health_name(*health).into());
                    out.push(e);
                }
                Some(_) => {}
            }
        }
        for key in self.instances.keys() {
            if !now.contains_key(key) {
                out.push(event(Kind::Service, "deregistered", key));
            }
        }
        self.instances = now;
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
