//! The discrete-event engine: virtual time, one event queue, and the real
//! membership cores wired to the simulated network.
//!
//! Events are ordered by `(time, sequence)`: the sequence number is taken
//! when an event is scheduled, so events at the same instant run in the
//! order they were created and a run depends on nothing but its seed. Each
//! node runs the agent's own [`Driver`] (the SWIM core and all the policy
//! around it: joins, member syncs, catalog replication) exactly as the
//! agent does: datagrams in through `handle_datagram` with the sender's
//! name (what mTLS would prove), timers through `poll_timeout` /
//! `handle_timeout`, and after every input its actions are carried out on
//! the simulated network. Nothing here decides what a node does; it only
//! moves bytes and measures.
//!
//! With a [`HostConfig`], nodes also live on machines with finite CPU and
//! talk over connections: every input waits for its machine to spend the
//! CPU it costs before the driver sees it, what the driver sends leaves
//! once the sending is paid for, and a message to a peer without a link
//! waits for a handshake ([`crate::cpu`], [`crate::conns`]). Without one,
//! work is free and instant and every pair is always connected.
//!
//! # Layout
//! - this file: [`Sim`], its configuration and public API, and the run
//!   loop.
//! - `queue`: events, their `(time, sequence)` order, and dispatch to the
//!   handlers below.
//! - `io`: datagrams and timers into each driver, its actions out.
//! - `stream`: stream messages (catalog fetches and digests, member
//!   syncs).
//! - `host`: [`HostConfig`]; CPU costs of inputs and outputs, finished
//!   CPU jobs, and sends routed over links.
//! - `dials`: handshakes in flight, failed dials, the link sweep.
//! - `lifecycle`: scenario actions; start, stop, crash, leave, stall.
//! - `observe`: beliefs, suspicions and downs against ground truth,
//!   agreement over time, samples.

mod dials;
mod host;
mod io;
mod lifecycle;
mod observe;
mod queue;
mod stream;
#[cfg(test)]
mod tests;

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use gossamer_membership::SwimConfig;
use gossamer_membership::core::MemberState;
use gossamer_membership::driver::Driver;
use rand::SeedableRng;
use rand::rngs::StdRng;

use self::host::{Host, Out};
use self::queue::{Ev, Queue};
use crate::catalog::Catalogs;
use crate::conns::{Conns, LinkStats};
use crate::cpu::{Cpu, Waits};
use crate::metrics::{Counters, Detection, Sample};
use crate::net::{NetParams, Network};
use crate::progress::Progress;
use crate::view::{Views, gen_of};

pub use self::host::HostConfig;

/// Events between two looks at the progress bar.
const PROGRESS_EVERY: u64 = 4096;

/// Everything a simulation is built from.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Nodes in the pool (not all need to run).
    pub nodes: usize,
    /// The seed every random choice derives from.
    pub seed: u64,
    /// SWIM timing, the agent's own configuration type.
    pub swim: SwimConfig,
    /// Latency and loss.
    pub net: NetParams,
    /// How many nodes (`n0`, `n1`, ...) serve as seeds.
    pub seeds: usize,
    /// Time-series resolution.
    pub sample_every: Duration,
    /// The catalog's anti-entropy period (the agent's default is 5 s).
    pub anti_entropy_every: Duration,
    /// Machines, CPU costs and connections; `None`: each node alone on a
    /// machine with unlimited CPU, always connected to every peer.
    pub host: Option<HostConfig>,
}

/// Something a scenario makes happen at a given virtual time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a node's process (a restart takes a higher generation) and
    /// join through the members it saved when it stopped, and the seeds.
    Start(usize),
    /// Kill these processes at once, without a word to anyone.
    Crash(Vec<usize>),
    /// Leave gracefully, then stop.
    Leave(usize),
    /// Freeze a process: it handles nothing until the stall ends, then
    /// everything that queued up.
    Stall {
        /// The node.
        node: usize,
        /// For how long.
        length: Duration,
    },
    /// Split the network: `groups[node]` is the node's side.
    Split(Vec<u8>),
    /// Reconnect every side.
    Heal,
    /// The node changes its catalog entry (bumps its version).
    Publish(usize),
}

/// One simulated machine: the process that runs on it, if any.
#[derive(Debug, Default)]
struct Node {
    driver: Option<Driver>,
    /// Bumped at every start and stop, so events meant for an earlier
    /// process are recognised and dropped.
    life: u32,
    /// The generation of the running (or last) process.
    generation: u64,
    /// When that generation began (process start or identity renewal).
    generation_since: Duration,
    /// The timer deadline an event is queued for.
    timer_at: Option<Duration>,
    /// When the current stall ends.
    stalled_until: Option<Duration>,
    /// Events that arrived during a stall.
    backlog: VecDeque<Ev>,
    /// Whether some node declared the running generation down.
    declared_down: bool,
    /// The generation that last left gracefully (`0`: none).
    left_generation: u64,
    /// Members it held active when it last stopped: the agent saves them
    /// and announces to them on restart.
    saved: Vec<usize>,
    /// Its own catalog version (kept on disk across restarts).
    catalog_version: u64,
    slow: bool,
    /// The process is starting: its CPU for that is queued, its driver
    /// not there yet (with a [`HostConfig`] whose `process_start_us` is
    /// positive only).
    booting: bool,
    /// What the driver sent since the last input, before the CPU for it is
    /// spent (with a [`HostConfig`] only).
    outbox: Vec<Out>,
}

/// A simulation: nodes, network, event queue and measurements.
#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    now: Duration,
    queue: Queue,
    nodes: Vec<Node>,
    names: Vec<String>,
    seeds: Vec<usize>,
    net: Network,
    rng: StdRng,
    views: Views,
    catalogs: Catalogs,
    counters: Counters,
    accounted_to: Duration,
    samples: Vec<Sample>,
    last_sample: Counters,
    detections: Vec<Detection>,
    /// Detections still waiting for their first suspicion.
    watching: usize,
    /// Suspicions seen on the wire, as (member, generation, incarnation).
    suspected: HashSet<(usize, u64, u16)>,
    /// Transitions of "every node agrees on membership".
    membership_log: Vec<(Duration, bool)>,
    /// Transitions of "membership and catalogs agree everywhere".
    agreement_log: Vec<(Duration, bool)>,
    events: u64,
    progress: Progress,
    host: Option<Host>,
}

/// The address node `i` listens on: 10.x.y.z, one per node.
fn address(i: usize) -> SocketAddr {
    let i = u32::try_from(i).unwrap_or(u32::MAX) & 0x00ff_ffff;
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000 | i), 7946))
}

/// Node `i`'s name.
pub fn name(i: usize) -> String {
    format!("n{i}")
}

/// The node index of a name built by [`name`].
fn index_of(name: &str) -> Option<usize> {
    name.strip_prefix('n')?.parse().ok()
}

/// A 64-bit mix (SplitMix64's finaliser) to derive independent seeds.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Sim {
    /// A simulation of `config.nodes` stopped nodes.
    pub fn new(config: SimConfig) -> anyhow::Result<Self> {
        config
            .swim
            .validate()
            .context("invalid SWIM configuration")?;
        anyhow::ensure!(config.nodes >= 1, "at least one node is needed");
        anyhow::ensure!(
            config.nodes <= 0x00ff_ffff,
            "at most 16,777,215 nodes (one 10/8 address each)"
        );
        anyhow::ensure!(
            !config.sample_every.is_zero(),
            "sample period must be positive"
        );
        let n = config.nodes;
        if let Some(h) = &config.host {
            anyhow::ensure!(h.machines >= 1, "at least one machine is needed");
            anyhow::ensure!(h.cores >= 1, "at least one core per machine is needed");
            h.costs.validate()?;
        }
        let host = config.host.clone().map(|config| Host {
            cpu: Cpu::new(n, config.machines, config.cores),
            conns: Conns::new(n),
            config,
        });
        let mut sim = Self {
            now: Duration::ZERO,
            queue: Queue::default(),
            nodes: (0..n).map(|_| Node::default()).collect(),
            names: (0..n).map(name).collect(),
            seeds: (0..config.seeds.clamp(1, n)).collect(),
            net: Network::new(config.net, mix(config.seed, 1)),
            rng: StdRng::seed_from_u64(mix(config.seed, 2)),
            views: Views::new(n),
            catalogs: Catalogs::new(n),
            counters: Counters::default(),
            accounted_to: Duration::ZERO,
            samples: Vec::new(),
            last_sample: Counters::default(),
            detections: Vec::new(),
            watching: 0,
            suspected: HashSet::new(),
            membership_log: vec![(Duration::ZERO, true)],
            agreement_log: vec![(Duration::ZERO, true)],
            events: 0,
            progress: Progress::disabled(),
            host,
            config,
        };
        sim.queue.push(Duration::ZERO, Ev::Sample);
        Ok(sim)
    }

    /// Draws a progress bar on stderr from now on.
    pub fn show_progress(&mut self) {
        self.progress = Progress::stderr();
    }

    /// Current virtual time.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The seed nodes.
    pub fn seeds(&self) -> &[usize] {
        &self.seeds
    }

    /// The scenario's RNG (independent of the network's and the cores').
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    /// Ground truth and beliefs.
    pub fn views(&self) -> &Views {
        &self.views
    }

    /// Catalog versions and spreads.
    pub fn catalogs(&self) -> &Catalogs {
        &self.catalogs
    }

    /// Crash detections.
    pub fn detections(&self) -> &[Detection] {
        &self.detections
    }

    /// The time series so far.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// Whether node `x` runs.
    pub fn is_live(&self, x: usize) -> bool {
        self.nodes[x].driver.is_some()
    }

    /// Indices of the running nodes.
    pub fn live_nodes(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&x| self.is_live(x)).collect()
    }

    /// Marks `x` as a slow node (its false downs are counted apart).
    pub fn set_slow(&mut self, x: usize) {
        self.nodes[x].slow = true;
    }

    /// Whether membership and catalogs agree everywhere right now.
    pub fn agreed(&self) -> bool {
        self.views.agreed() && self.catalogs.agreed()
    }

    /// Counters, with running time accounted up to now.
    pub fn counters(&mut self) -> Counters {
        self.account();
        self.counters
    }

    /// Schedules `action` at `at` (not before now).
    pub fn schedule(&mut self, at: Duration, action: Action) {
        let at = at.max(self.now);
        self.queue.push(at, Ev::Action(action));
    }

    /// The first instant at or after `from` when every node agreed, on
    /// membership alone (`catalogs == false`) or on membership and
    /// catalogs.
    pub fn agreed_since(&self, from: Duration, catalogs: bool) -> Option<Duration> {
        let log = if catalogs {
            &self.agreement_log
        } else {
            &self.membership_log
        };
        let before = log.iter().rev().find(|(t, _)| *t <= from);
        if before.is_some_and(|(_, ok)| *ok) {
            return Some(from);
        }
        log.iter().find(|(t, ok)| *t > from && *ok).map(|(t, _)| *t)
    }

    /// Runs every event up to and including `end`, then sets the clock to
    /// `end`.
    pub fn run_until(&mut self, label: &str, end: Duration) {
        self.run(label, end, None);
    }

    /// Runs until at least `min_live` nodes run and membership and catalogs
    /// agree everywhere, or until `end`. Returns when they agreed.
    pub fn run_until_agreed(
        &mut self,
        label: &str,
        end: Duration,
        min_live: usize,
    ) -> Option<Duration> {
        if self.agreed() && self.views.live() >= min_live {
            return Some(self.now);
        }
        self.run(label, end, Some((min_live, true)))
    }

    /// Runs until at least `min_live` nodes run and every node lists every
    /// other running node alive (catalogs aside), or until `end`. Returns
    /// when they did.
    pub fn run_until_members_agree(
        &mut self,
        label: &str,
        end: Duration,
        min_live: usize,
    ) -> Option<Duration> {
        if self.views.agreed() && self.views.live() >= min_live {
            return Some(self.now);
        }
        self.run(label, end, Some((min_live, false)))
    }

    /// Handshakes and links of node `x` (with a [`HostConfig`]).
    pub fn link_stats(&self, x: usize) -> Option<LinkStats> {
        self.host.as_ref().map(|h| h.conns.stats(x))
    }

    /// Links node `x` holds open now (with a [`HostConfig`]).
    pub fn links_open(&self, x: usize) -> usize {
        self.host.as_ref().map_or(0, |h| h.conns.links(x))
    }

    /// CPU time spent on node `x`'s work so far (with a [`HostConfig`]).
    pub fn cpu_used(&self, x: usize) -> Duration {
        self.host.as_ref().map_or(Duration::ZERO, |h| h.cpu.used(x))
    }

    /// Core-seconds every machine together was busy, up to now.
    pub fn busy_core_seconds(&mut self) -> f64 {
        let now = self.now;
        self.host.as_mut().map_or(0.0, |h| {
            (0..h.cpu.machines())
                .map(|m| h.cpu.busy_core_seconds(m, now))
                .sum()
        })
    }

    /// How long inputs waited for CPU (with a [`HostConfig`]).
    pub fn cpu_waits(&self) -> Option<Waits> {
        self.host.as_ref().map(|h| h.cpu.waits())
    }

    fn run(
        &mut self,
        label: &str,
        end: Duration,
        stop_when: Option<(usize, bool)>,
    ) -> Option<Duration> {
        self.progress.phase(label, self.now, end);
        let mut agreed_at = None;
        while let Some((at, ev)) = self.queue.pop_until(end) {
            self.now = at;
            self.dispatch(ev);
            self.log_agreement();
            self.events += 1;
            if self.events.is_multiple_of(PROGRESS_EVERY) && self.progress.due(self.now) {
                self.progress.update(self.now, self.views.live());
            }
            if let Some((min, catalogs)) = stop_when
                && self.views.live() >= min
                && self.views.agreed()
                && (!catalogs || self.catalogs.agreed())
            {
                agreed_at = Some(self.now);
                break;
            }
        }
        if agreed_at.is_none() {
            self.now = self.now.max(end);
        }
        self.account();
        self.progress.finish(self.now, self.views.live());
        agreed_at
    }

    /// Pairs of running nodes `(x, y)` where `x` holds `y` suspect: what
    /// the agent's `/v1/members` lists as `suspect` rather than `alive`.
    /// Costs O(N² log N).
    pub fn suspect_pairs(&self) -> usize {
        self.nodes
            .iter()
            .filter_map(|n| n.driver.as_ref())
            .map(|d| {
                d.core()
                    .members()
                    .iter()
                    .filter(|m| m.state == MemberState::Suspect)
                    .count()
            })
            .sum()
    }

    /// Checks the event-derived views against each core's own member table
    /// ([`gossamer_membership::Membership::members`]): returns how many
    /// running nodes disagree with what the events said. Costs
    /// O(N² log N); meant for the end of a run.
    pub fn verify_views(&self) -> usize {
        let mut wrong = 0;
        for (x, node) in self.nodes.iter().enumerate() {
            let Some(driver) = node.driver.as_ref() else {
                continue;
            };
            let mut from_core = vec![0; self.nodes.len()];
            for m in driver.core().members() {
                if m.state.is_active()
                    && let Some(y) = index_of(&m.id.name)
                    && y < from_core.len()
                {
                    from_core[y] = gen_of(m.id.generation);
                }
            }
            if (0..self.nodes.len()).any(|y| y != x && from_core[y] != self.views.belief(x, y)) {
                wrong += 1;
            }
        }
        wrong
    }
}
