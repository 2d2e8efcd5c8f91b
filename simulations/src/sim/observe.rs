//! Measurement: what each node believes (from its driver's events),
//! suspicions and downs judged against ground truth, agreement over time,
//! and the time series.

use gossamer_membership::{Event, codec};

use super::queue::Ev;
use super::{Sim, index_of};
use crate::metrics::Sample;
use crate::view::gen_of;

impl Sim {
    pub(super) fn account(&mut self) {
        let span = self.now.saturating_sub(self.accounted_to);
        self.counters.node_nanos += span.as_nanos() * self.views.live() as u128;
        self.accounted_to = self.now;
    }

    pub(super) fn log_agreement(&mut self) {
        let m = self.views.agreed();
        if self.membership_log.last().is_some_and(|(_, ok)| *ok != m) {
            self.membership_log.push((self.now, m));
        }
        let all = m && self.catalogs.agreed();
        if self.agreement_log.last().is_some_and(|(_, ok)| *ok != all) {
            self.agreement_log.push((self.now, all));
        }
    }

    /// Counts suspicions as they go on the wire: each (member, generation,
    /// incarnation) once, when the first datagram carrying it is sent.
    pub(super) fn watch_suspicions(&mut self, data: &[u8]) {
        for (id, incarnation) in codec::suspicions(data) {
            let Some(y) = index_of(&id.name).filter(|&y| y < self.nodes.len()) else {
                continue;
            };
            if !self.suspected.insert((y, id.generation, incarnation)) {
                continue;
            }
            if self.views.truth(y) == gen_of(id.generation) {
                if self.lived_through_split(y) {
                    self.counters.partition_suspicions += 1;
                    continue;
                }
                self.counters.false_suspicions += 1;
                if self.nodes[y].slow {
                    self.counters.false_suspicions_of_slow += 1;
                }
            } else {
                self.counters.true_suspicions += 1;
            }
            if self.watching > 0 {
                for d in &mut self.detections {
                    if d.first_suspicion.is_none() && d.victim == y && d.generation == id.generation
                    {
                        d.first_suspicion = Some(self.now);
                        self.watching -= 1;
                    }
                }
            }
        }
    }

    /// Records what node `x` now believes; the driver already acted on it.
    pub(super) fn on_event(&mut self, x: usize, event: Event) {
        let now = self.now;
        match event {
            Event::MemberUp(id) => {
                if let Some(y) = index_of(&id.name) {
                    self.views.set_belief(x, y, gen_of(id.generation));
                }
            }
            Event::MemberDown(id) => {
                if let Some(y) = index_of(&id.name) {
                    self.views.set_belief(x, y, 0);
                    self.on_down(x, y, id.generation);
                }
            }
            Event::MemberLeft(id) => {
                if let Some(y) = index_of(&id.name) {
                    self.views.set_belief(x, y, 0);
                    self.counters.lefts += 1;
                }
            }
            Event::MemberRenamed { new, .. } => {
                if let Some(y) = index_of(&new.name)
                    && self.views.belief(x, y) != 0
                {
                    self.views.set_belief(x, y, gen_of(new.generation));
                }
            }
            Event::Rejoined(id) => {
                self.counters.rejoins += 1;
                let node = &mut self.nodes[x];
                if !node.declared_down {
                    self.counters.rejoins_without_down += 1;
                }
                node.declared_down = false;
                node.generation = id.generation;
                node.generation_since = now;
                self.views.renew(x, gen_of(id.generation));
            }
            Event::Connected
            | Event::Isolated
            | Event::SuspicionLingers(_)
            | Event::DocNotice { .. } => {}
            Event::CatalogNotice { node, version } => {
                if let Some(y) = self.index(&node) {
                    self.catalogs.notice(x, y, version, now);
                }
            }
        }
    }

    fn on_down(&mut self, x: usize, y: usize, generation: u64) {
        if y >= self.nodes.len() {
            return;
        }
        let life = self.nodes[x].life;
        for d in &mut self.detections {
            if d.victim == y && d.generation == generation {
                d.observe(x, life, self.now);
            }
        }
        let running = self.views.truth(y);
        if running == 0 || running != gen_of(generation) {
            self.counters.true_downs += 1;
            if self.nodes[y].left_generation == generation {
                self.counters.downs_after_leave += 1;
            }
            return;
        }
        self.nodes[y].declared_down = true;
        if self.lived_through_split(y) {
            self.counters.partition_downs += 1;
        } else {
            self.counters.false_downs += 1;
            if self.nodes[y].slow {
                self.counters.false_downs_of_slow += 1;
            }
        }
    }

    /// Whether `y`'s running identity lived through a partition that is in
    /// force or healed recently: verdicts about it are then the partition's
    /// doing, as long as such verdicts can still be arriving (three
    /// suspicion windows after the heal).
    fn lived_through_split(&self, y: usize) -> bool {
        let s = &self.config.swim;
        let suspicion = s.suspicion_timeout_for(self.views.live());
        let window = (s.probe_period + s.probe_rtt + s.late_ack_grace + suspicion) * 3;
        self.net
            .split_within(self.now, window)
            .is_some_and(|healed| self.nodes[y].generation_since < healed)
    }

    pub(super) fn on_sample(&mut self) {
        let c = self.counters;
        let d = c.since(&self.last_sample);
        self.last_sample = c;
        self.samples.push(Sample {
            at: self.now,
            live: self.views.live(),
            view_ok: self.views.agreeing(),
            catalog_ok: self.catalogs.agreeing(),
            membership_mismatch: self.views.total_mismatch(),
            catalog_mismatch: self.catalogs.total_mismatch(),
            datagrams: d.datagrams,
            bytes: d.bytes,
            false_downs: c.false_downs,
            stalled: self
                .nodes
                .iter()
                .filter(|n| n.stalled_until.is_some())
                .count(),
        });
        let next = self.now + self.config.sample_every;
        self.queue.push(next, Ev::Sample);
    }
}
