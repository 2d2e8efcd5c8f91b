//! A scenario's actions, and the life of each node's process: start (and
//! restart), stop, crash, graceful leave, stall, catalog change.

use std::time::Duration;

use gossamer_membership::driver::{Driver, JoinPlan};
use gossamer_membership::{NodeId, ReplicaConfig};

use super::dials::SWEEP_EVERY;
use super::host::Job;
use super::queue::Ev;
use super::{Action, Sim, address, mix};
use crate::metrics::Detection;
use crate::view::gen_of;

impl Sim {
    pub(super) fn on_action(&mut self, action: Action) {
        match action {
            Action::Start(x) => self.launch(x),
            Action::Crash(victims) => self.crash(&victims),
            Action::Leave(x) => self.leave(x),
            Action::Stall { node, length } => self.stall(node, length),
            Action::Split(groups) => self.net.split(groups),
            Action::Heal => self.net.heal(self.now),
            Action::Publish(x) => self.publish(x),
        }
    }

    /// Starts `x`'s process: at once, or once its machine has spent the
    /// CPU a process start costs (the node is not reachable meanwhile).
    fn launch(&mut self, x: usize) {
        let now = self.now;
        let node = &mut self.nodes[x];
        if node.driver.is_some() || node.booting {
            return;
        }
        let life = node.life;
        match self.host.as_mut() {
            Some(host) => match host.start_cost() {
                Some(cost) => {
                    node.booting = true;
                    host.cpu.submit(now, x, cost, Job::Boot(life), false);
                }
                None => self.start(x),
            },
            None => self.start(x),
        }
    }

    /// `x`'s process of life `life` has spent its start-up CPU.
    pub(super) fn booted(&mut self, x: usize, life: u32) {
        let node = &mut self.nodes[x];
        if !node.booting || node.life != life {
            return;
        }
        node.booting = false;
        self.start(x);
    }

    /// Kills a process that is still starting.
    fn cancel_boot(&mut self, x: usize) {
        let node = &mut self.nodes[x];
        if !node.booting {
            return;
        }
        node.booting = false;
        node.life += 1;
        if let Some(host) = self.host.as_mut() {
            host.cpu.stop(self.now, x);
        }
    }

    fn start(&mut self, x: usize) {
        let seed = self.config.seed;
        let now = self.now;
        let node = &mut self.nodes[x];
        if node.driver.is_some() {
            return;
        }
        // As the agent: a generation that beats every earlier run of this
        // node and, between nodes, orders starts (milliseconds of the
        // clock; the agent's are Unix milliseconds).
        let millis = u64::try_from(now.as_millis()).unwrap_or(u64::MAX);
        node.generation = (node.generation + 1).max(millis);
        node.life += 1;
        let id = NodeId::new(self.names[x].clone(), address(x), node.generation)
            .expect("simulator names are valid");
        // As the agent: join through the members saved from the last run
        // (their generations unknown) and the seeds.
        let plan = JoinPlan {
            has_seeds: !self.seeds.is_empty(),
            saved: node
                .saved
                .iter()
                .filter(|&&y| y != x)
                .map(|&y| NodeId::new(self.names[y].clone(), address(y), 0))
                .collect::<Result<_, _>>()
                .expect("simulator names are valid"),
        };
        let replica = ReplicaConfig {
            anti_entropy_interval: self.config.anti_entropy_every,
            ..ReplicaConfig::default()
        };
        let driver = Driver::new(
            id,
            &self.config.swim,
            replica,
            plan,
            mix(seed, mix(x as u64, node.generation)),
            now,
        )
        .expect("configuration validated in Sim::new");
        node.driver = Some(driver);
        node.timer_at = None;
        node.stalled_until = None;
        node.backlog.clear();
        node.declared_down = false;
        node.generation_since = now;
        let life = node.life;
        let generation = node.generation;
        self.account();
        self.counters.starts += 1;
        self.views.start(x, gen_of(generation));
        self.catalogs.start(x, life);
        if self.host.is_some() {
            // Each node's sweeps at its own phase of the second.
            let phase = mix(seed, mix(x as u64, u64::from(life))) % SWEEP_EVERY.as_nanos() as u64;
            self.queue.push(
                now + SWEEP_EVERY + Duration::from_nanos(phase),
                Ev::Sweep { node: x, life },
            );
        }
        self.flush(x);
    }

    fn stop(&mut self, x: usize) {
        let node = &mut self.nodes[x];
        if node.driver.take().is_none() {
            return;
        }
        node.life += 1;
        node.timer_at = None;
        node.stalled_until = None;
        node.backlog.clear();
        node.saved = self.views.active_of(x).collect();
        node.outbox.clear();
        if let Some(host) = self.host.as_mut() {
            host.cpu.stop(self.now, x);
            host.conns.reset(x);
        }
        self.account();
        self.views.stop(x);
        self.catalogs.stop(x);
    }

    fn crash(&mut self, victims: &[usize]) {
        let mut crashed = Vec::new();
        for &x in victims {
            self.cancel_boot(x);
            if self.is_live(x) {
                crashed.push((x, self.nodes[x].generation));
                self.stop(x);
                self.counters.crashes += 1;
            }
        }
        for (y, generation) in crashed {
            // Observers: running nodes that held this very process active.
            let lives: Vec<u32> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(x, n)| {
                    let holds = self.views.belief(x, y) == gen_of(generation);
                    if n.driver.is_some() && holds {
                        n.life
                    } else {
                        0
                    }
                })
                .collect();
            self.detections
                .push(Detection::new(y, generation, self.now, lives));
            self.watching += 1;
        }
    }

    fn leave(&mut self, x: usize) {
        let now = self.now;
        let Some(driver) = self.nodes[x].driver.as_mut() else {
            return;
        };
        // A failed leave still stops the process, as the agent does.
        let _ = driver.leave(now);
        self.nodes[x].left_generation = self.nodes[x].generation;
        self.flush(x);
        self.stop(x);
        self.counters.leaves += 1;
    }

    fn stall(&mut self, x: usize, length: Duration) {
        let node = &mut self.nodes[x];
        if node.driver.is_none() {
            return;
        }
        let until = self.now + length;
        if node.stalled_until.is_some_and(|u| u >= until) {
            return;
        }
        node.stalled_until = Some(until);
        let life = node.life;
        self.counters.stalls += 1;
        self.queue.push(
            until,
            Ev::StallEnd {
                node: x,
                life,
                at: until,
            },
        );
    }

    pub(super) fn on_stall_end(&mut self, x: usize, life: u32, at: Duration) {
        let node = &mut self.nodes[x];
        if node.life != life || node.stalled_until != Some(at) {
            return;
        }
        node.stalled_until = None;
        // Everything that queued up, in arrival order, all at once.
        let backlog = std::mem::take(&mut node.backlog);
        for ev in backlog {
            self.dispatch(ev);
        }
    }

    fn publish(&mut self, x: usize) {
        let now = self.now;
        let node = &mut self.nodes[x];
        let Some(driver) = node.driver.as_mut() else {
            return;
        };
        node.catalog_version += 1;
        let version = node.catalog_version;
        if driver.publish_catalog(now, version).is_ok() {
            self.catalogs.publish(x, version, now);
        }
        self.flush(x);
    }
}
