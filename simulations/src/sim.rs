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

use std::collections::{BinaryHeap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use gossamer_membership::codec;
use gossamer_membership::driver::{Action as DriverAction, Driver, JoinPlan};
use gossamer_membership::sync::SyncPayload;
use gossamer_membership::{Event, NodeId, ReplicaConfig, SwimConfig, Transmit};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::catalog::Catalogs;
use crate::metrics::{Counters, Detection, Sample};
use crate::net::{NetParams, Network};
use crate::progress::Progress;
use crate::view::{Views, gen_of};

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

#[derive(Debug)]
enum StreamMsg {
    /// "Send me your entry."
    Fetch { from: usize, from_life: u32 },
    /// The owner's answer.
    Entry { owner: usize, version: u64 },
    /// A fetch that could not reach the owner's process.
    FetchFailed { owner: usize },
    /// A catalog digest; the receiver answers with its own unless this is
    /// the answer.
    Digest {
        from: usize,
        from_life: u32,
        digest: Vec<(String, u64)>,
        answer: bool,
    },
    /// A push-pull member sync: the sender's encoded view; the receiver
    /// merges it and answers with its own unless this is the answer.
    Members {
        from: usize,
        from_life: u32,
        payload: Vec<u8>,
        answer: bool,
        /// Whether the initiator gossips news from the answer on.
        gossip: bool,
    },
}

#[derive(Debug)]
enum Ev {
    Datagram {
        from: usize,
        to: usize,
        data: Bytes,
    },
    Timer {
        node: usize,
        life: u32,
        at: Duration,
    },
    Stream {
        to: usize,
        to_life: u32,
        msg: StreamMsg,
    },
    StallEnd {
        node: usize,
        life: u32,
        at: Duration,
    },
    Sample,
    Action(Action),
}

impl Ev {
    /// The node whose process must handle this event, if any.
    fn target(&self) -> Option<usize> {
        match self {
            Ev::Datagram { to, .. } | Ev::Stream { to, .. } => Some(*to),
            Ev::Timer { node, .. } => Some(*node),
            Ev::StallEnd { .. } | Ev::Sample | Ev::Action(_) => None,
        }
    }
}

#[derive(Debug)]
struct Scheduled {
    at: Duration,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    /// Reversed: `BinaryHeap` pops the greatest, we want the earliest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
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
}

/// A simulation: nodes, network, event queue and measurements.
#[derive(Debug)]
pub struct Sim {
    config: SimConfig,
    now: Duration,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
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

/// Members (with their incarnation) that a datagram's piggybacked updates
/// mark `suspect`.
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
        let mut sim = Self {
            now: Duration::ZERO,
            queue: BinaryHeap::new(),
            seq: 0,
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
            config,
        };
        sim.push(Duration::ZERO, Ev::Sample);
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
        self.push(at, Ev::Action(action));
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
        self.run(label, end, Some(min_live))
    }

    fn run(&mut self, label: &str, end: Duration, stop_when: Option<usize>) -> Option<Duration> {
        self.progress.phase(label, self.now, end);
        let mut agreed_at = None;
        while let Some(top) = self.queue.peek() {
            if top.at > end {
                break;
            }
            let Some(Scheduled { at, ev, .. }) = self.queue.pop() else {
                break;
            };
            self.now = at;
            self.dispatch(ev);
            self.log_agreement();
            self.events += 1;
            if self.events.is_multiple_of(PROGRESS_EVERY) && self.progress.due(self.now) {
                self.progress.update(self.now, self.views.live());
            }
            if stop_when.is_some_and(|min| self.views.live() >= min) && self.agreed() {
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

    fn log_agreement(&mut self) {
        let m = self.views.agreed();
        if self.membership_log.last().is_some_and(|(_, ok)| *ok != m) {
            self.membership_log.push((self.now, m));
        }
        let all = m && self.catalogs.agreed();
        if self.agreement_log.last().is_some_and(|(_, ok)| *ok != all) {
            self.agreement_log.push((self.now, all));
        }
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn account(&mut self) {
        let span = self.now.saturating_sub(self.accounted_to);
        self.counters.node_nanos += span.as_nanos() * self.views.live() as u128;
        self.accounted_to = self.now;
    }

    fn dispatch(&mut self, ev: Ev) {
        if let Some(x) = ev.target() {
            let node = &mut self.nodes[x];
            if node.driver.is_none() {
                match ev {
                    Ev::Datagram { .. } => self.counters.undeliverable += 1,
                    Ev::Stream { .. } => self.counters.stream_failures += 1,
                    _ => {}
                }
                return;
            }
            if node.stalled_until.is_some() {
                node.backlog.push_back(ev);
                return;
            }
        }
        match ev {
            Ev::Datagram { from, to, data } => self.on_datagram(from, to, &data),
            Ev::Timer { node, life, at } => self.on_timer(node, life, at),
            Ev::Stream { to, to_life, msg } => self.on_stream(to, to_life, msg),
            Ev::StallEnd { node, life, at } => self.on_stall_end(node, life, at),
            Ev::Sample => self.on_sample(),
            Ev::Action(action) => self.on_action(action),
        }
    }

    fn on_action(&mut self, action: Action) {
        match action {
            Action::Start(x) => self.start(x),
            Action::Crash(victims) => self.crash(&victims),
            Action::Leave(x) => self.leave(x),
            Action::Stall { node, length } => self.stall(node, length),
            Action::Split(groups) => self.net.split(groups),
            Action::Heal => self.net.heal(self.now),
            Action::Publish(x) => self.publish(x),
        }
    }

    fn on_datagram(&mut self, from: usize, to: usize, data: &[u8]) {
        let now = self.now;
        let Some(driver) = self.nodes[to].driver.as_mut() else {
            return;
        };
        if driver
            .handle_datagram(now, &self.names[from], data)
            .is_err()
        {
            self.counters.refused += 1;
        }
        self.flush(to);
    }

    fn on_timer(&mut self, x: usize, life: u32, at: Duration) {
        let now = self.now;
        let node = &mut self.nodes[x];
        if node.life != life || node.timer_at != Some(at) {
            return;
        }
        node.timer_at = None;
        if let Some(driver) = node.driver.as_mut() {
            driver.handle_timeout(now);
        }
        self.flush(x);
    }

    /// Carries out a driver's actions, takes in its events, and queues its
    /// next timer.
    fn flush(&mut self, x: usize) {
        loop {
            let Some(driver) = self.nodes[x].driver.as_mut() else {
                return;
            };
            if let Some(action) = driver.poll_action() {
                self.carry_out(x, action);
            } else if let Some(event) = driver.poll_event() {
                self.on_event(x, event);
            } else {
                break;
            }
        }
        let now = self.now;
        let node = &mut self.nodes[x];
        let Some(driver) = node.driver.as_ref() else {
            return;
        };
        if let Some(at) = driver.poll_timeout()
            && node.timer_at.is_none_or(|t| at < t)
        {
            node.timer_at = Some(at);
            let life = node.life;
            self.push(at.max(now), Ev::Timer { node: x, life, at });
        }
    }

    /// Does what node `x`'s driver asked, the way the agent's I/O would.
    fn carry_out(&mut self, x: usize, action: DriverAction) {
        let life = self.nodes[x].life;
        match action {
            DriverAction::Send(t) => self.send(x, t),
            DriverAction::DialSeeds { .. } => {
                // A dial reaches a seed's process if it runs and is on our
                // side; its certificate names it.
                let now = self.now;
                for y in self.seeds.clone() {
                    if y == x {
                        if let Some(d) = self.nodes[x].driver.as_mut() {
                            d.handle_self_seed();
                        }
                    } else if self.is_live(y) && !self.net.separated(x, y) {
                        let name = self.names[y].clone();
                        if let Some(d) = self.nodes[x].driver.as_mut() {
                            d.handle_seed(now, name, address(y));
                        }
                    }
                }
            }
            DriverAction::SyncMembers {
                peer,
                payload,
                gossip,
            } => {
                if let Some(y) = self.index(&peer.name) {
                    self.counters.sync_bytes += payload.len() as u64;
                    let msg = StreamMsg::Members {
                        from: x,
                        from_life: life,
                        payload,
                        answer: false,
                        gossip,
                    };
                    self.stream(x, y, msg);
                }
            }
            DriverAction::Fetch { node, .. } => {
                let Some(y) = self.index(&node) else {
                    return;
                };
                if self.catalogs.slot(y).is_none() {
                    self.counters.empty_fetches += 1;
                }
                let msg = StreamMsg::Fetch {
                    from: x,
                    from_life: life,
                };
                if !self.stream(x, y, msg) {
                    self.fetch_failed(x, life, y);
                }
            }
            DriverAction::ExchangeDigest { peer, digest, .. } => {
                if let Some(y) = self.index(&peer) {
                    let msg = StreamMsg::Digest {
                        from: x,
                        from_life: life,
                        digest,
                        answer: false,
                    };
                    self.stream(x, y, msg);
                }
            }
            DriverAction::Purge { .. }
            | DriverAction::Disconnect { .. }
            | DriverAction::DisconnectStale { .. } => {}
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        index_of(name).filter(|&y| y < self.nodes.len())
    }

    fn send(&mut self, from: usize, t: Transmit) {
        self.counters.datagrams += 1;
        self.counters.bytes += t.data.len() as u64;
        self.watch_suspicions(&t.data);
        let Some(to) = index_of(&t.to.name).filter(|&i| i < self.nodes.len()) else {
            self.counters.undeliverable += 1;
            return;
        };
        if self.net.separated(from, to) {
            self.counters.cut += 1;
            return;
        }
        if self.net.lost() {
            self.counters.lost += 1;
            return;
        }
        let at = self.now + self.net.delay();
        self.push(
            at,
            Ev::Datagram {
                from,
                to,
                data: t.data,
            },
        );
    }

    /// Counts suspicions as they go on the wire: each (member, generation,
    /// incarnation) once, when the first datagram carrying it is sent.
    fn watch_suspicions(&mut self, data: &[u8]) {
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
    fn on_event(&mut self, x: usize, event: Event) {
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
            Event::Connected | Event::Isolated | Event::SuspicionLingers(_) => {}
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

    fn start(&mut self, x: usize) {
        let seed = self.config.seed;
        let now = self.now;
        let node = &mut self.nodes[x];
        if node.driver.is_some() {
            return;
        }
        node.generation += 1;
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
        self.account();
        self.views.stop(x);
        self.catalogs.stop(x);
    }

    fn crash(&mut self, victims: &[usize]) {
        let mut crashed = Vec::new();
        for &x in victims {
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
        self.push(
            until,
            Ev::StallEnd {
                node: x,
                life,
                at: until,
            },
        );
    }

    fn on_stall_end(&mut self, x: usize, life: u32, at: Duration) {
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

    /// Sends a stream message from `from` to the process now running on
    /// `to`; false if it cannot get there.
    fn stream(&mut self, from: usize, to: usize, msg: StreamMsg) -> bool {
        let to_life = self.nodes[to].life;
        self.stream_to_life(from, to, to_life, msg)
    }

    fn stream_to_life(&mut self, from: usize, to: usize, to_life: u32, msg: StreamMsg) -> bool {
        self.counters.stream_messages += 1;
        if self.nodes[to].driver.is_none() || self.net.separated(from, to) {
            self.counters.stream_failures += 1;
            return false;
        }
        let at = self.now + self.net.stream_delay();
        self.push(at, Ev::Stream { to, to_life, msg });
        true
    }

    /// `x`'s fetch from `owner` ends without an entry, a round trip later;
    /// like the agent's, every fetch ends one way or the other.
    fn fetch_failed(&mut self, x: usize, life: u32, owner: usize) {
        let at = self.now + self.net.stream_delay() * 2;
        let msg = StreamMsg::FetchFailed { owner };
        self.push(
            at,
            Ev::Stream {
                to: x,
                to_life: life,
                msg,
            },
        );
    }

    fn on_stream(&mut self, to: usize, to_life: u32, msg: StreamMsg) {
        if self.nodes[to].life != to_life {
            self.counters.stream_failures += 1;
            if let StreamMsg::Fetch { from, from_life } = msg {
                self.fetch_failed(from, from_life, to);
            }
            return;
        }
        let now = self.now;
        match msg {
            StreamMsg::Fetch { from, from_life } => {
                let version = self.nodes[to].catalog_version;
                let reply = StreamMsg::Entry { owner: to, version };
                if !self.stream_to_life(to, from, from_life, reply) {
                    self.fetch_failed(from, from_life, to);
                }
            }
            StreamMsg::Entry { owner, version } => {
                self.catalogs.fetched_entry(to, owner, version, now);
                let name = self.names[owner].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    d.handle_fetched(now, &name, Some(version));
                }
                self.flush(to);
            }
            StreamMsg::FetchFailed { owner } => {
                let name = self.names[owner].clone();
                if let Some(d) = self.nodes[to].driver.as_mut() {
                    d.handle_fetched(now, &name, None);
                }
                self.flush(to);
            }
            StreamMsg::Digest {
                from,
                from_life,
                digest,
                answer,
            } => {
                let Some(d) = self.nodes[to].driver.as_mut() else {
                    return;
                };
                let ours = (!answer).then(|| d.replica().digest());
                d.handle_digest(now, &digest);
                self.flush(to);
                if let Some(ours) = ours {
                    let reply = StreamMsg::Digest {
                        from: to,
                        from_life: to_life,
                        digest: ours,
                        answer: true,
                    };
                    self.stream_to_life(to, from, from_life, reply);
                }
            }
            StreamMsg::Members {
                from,
                from_life,
                payload,
                answer,
                gossip,
            } => self.on_members(to, from, from_life, &payload, answer, gossip),
        }
    }

    /// A member sync frame reached `to`: the answering side merges it and
    /// answers with the view it held before; the initiator merges the
    /// answer.
    fn on_members(
        &mut self,
        to: usize,
        from: usize,
        from_life: u32,
        payload: &[u8],
        answer: bool,
        gossip: bool,
    ) {
        let now = self.now;
        let Some(driver) = self.nodes[to].driver.as_mut() else {
            return;
        };
        let Ok(theirs) = SyncPayload::decode(payload) else {
            self.counters.refused += 1;
            return;
        };
        let ours = if answer {
            driver.handle_sync_answer(now, theirs, gossip);
            None
        } else {
            driver.handle_sync_request(now, theirs).ok()
        };
        self.flush(to);
        if let Some(ours) = ours {
            self.counters.sync_bytes += ours.len() as u64;
            let reply = StreamMsg::Members {
                from: to,
                from_life: self.nodes[to].life,
                payload: ours,
                answer: true,
                gossip,
            };
            self.stream_to_life(to, from, from_life, reply);
        }
    }

    fn on_sample(&mut self) {
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
        self.push(next, Ev::Sample);
    }

    /// Checks the event-derived views against each core's own member table
    /// ([`Membership::members`]): returns how many running nodes disagree
    /// with what the events said. Costs O(N² log N); meant for the end of
    /// a run.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(nodes: usize) -> SimConfig {
        SimConfig {
            nodes,
            seed: 3,
            swim: SwimConfig::default(),
            net: NetParams {
                latency: Duration::from_millis(1),
                loss: 0.0,
            },
            seeds: 3,
            sample_every: Duration::from_millis(100),
            anti_entropy_every: Duration::from_secs(5),
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(index_of(&name(1234)), Some(1234));
        assert_eq!(index_of("x1"), None);
        assert_ne!(address(1), address(2));
    }

    #[test]
    fn queue_pops_in_time_then_sequence_order() {
        let mut heap = BinaryHeap::new();
        for (at, seq) in [(5, 1), (1, 3), (1, 2), (3, 4)] {
            heap.push(Scheduled {
                at: Duration::from_millis(at),
                seq,
                ev: Ev::Sample,
            });
        }
        let order: Vec<(u128, u64)> = std::iter::from_fn(|| heap.pop())
            .map(|s| (s.at.as_millis(), s.seq))
            .collect();
        assert_eq!(order, vec![(1, 2), (1, 3), (3, 4), (5, 1)]);
    }

    #[test]
    fn small_cluster_joins_and_views_match_the_cores() {
        let mut sim = Sim::new(config(12)).unwrap();
        for x in 0..12 {
            sim.schedule(Duration::from_millis(10 * x as u64), Action::Start(x));
        }
        let at = sim.run_until_agreed("join", Duration::from_secs(30), 12);
        assert!(at.is_some(), "joined");
        assert_eq!(sim.views().live(), 12);
        assert_eq!(sim.verify_views(), 0);
    }

    #[test]
    fn crash_is_detected_and_first_suspicion_seen() {
        let mut sim = Sim::new(config(8)).unwrap();
        for x in 0..8 {
            sim.schedule(Duration::ZERO, Action::Start(x));
        }
        let joined = sim
            .run_until_agreed("join", Duration::from_secs(30), sim.config().nodes)
            .unwrap();
        sim.schedule(joined + Duration::from_secs(1), Action::Crash(vec![5]));
        sim.run_until("crash", joined + Duration::from_secs(20));
        let d = &sim.detections()[0];
        assert_eq!(d.observers, 7);
        assert!(d.suspicion_after().is_some());
        assert!(d.time_to(1.0).unwrap() > d.suspicion_after().unwrap());
        assert!(sim.views().agreed());
        assert_eq!(sim.verify_views(), 0);
    }

    #[test]
    fn stalled_node_catches_up() {
        let mut sim = Sim::new(config(6)).unwrap();
        for x in 0..6 {
            sim.schedule(Duration::ZERO, Action::Start(x));
        }
        let joined = sim
            .run_until_agreed("join", Duration::from_secs(30), sim.config().nodes)
            .unwrap();
        sim.schedule(
            joined,
            Action::Stall {
                node: 4,
                length: Duration::from_millis(800),
            },
        );
        sim.schedule(joined + Duration::from_millis(100), Action::Publish(1));
        sim.run_until("stall", joined + Duration::from_secs(10));
        let spread = &sim.catalogs().spreads()[0];
        assert_eq!(spread.notices.len(), 5);
        assert!(
            spread.time_to(1.0, false).unwrap() >= Duration::from_millis(700),
            "the stalled node learns after its stall"
        );
        assert!(sim.agreed());
    }
}
