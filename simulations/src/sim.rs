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
use crate::conns::{Conns, LinkStats, Route};
use crate::cpu::{Costs, Cpu, Waits};
use crate::metrics::{Counters, Detection, Sample};
use crate::net::{NetParams, Network};
use crate::progress::Progress;
use crate::view::{Views, gen_of};
use gossamer_membership::links::LinkPolicy;

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

/// Where nodes run and what their work costs.
#[derive(Debug, Clone, PartialEq)]
pub struct HostConfig {
    /// Machines; node `i` runs on machine `i % machines`.
    pub machines: usize,
    /// Cores per machine.
    pub cores: u32,
    /// CPU per piece of work.
    pub costs: Costs,
    /// Which connections a node keeps (the agent's policy).
    pub links: LinkPolicy,
    /// A dial without an answer fails after this long (the transport's
    /// `connect_timeout`).
    pub connect_timeout: Duration,
}

impl HostConfig {
    /// `machines` machines of `cores` cores, default costs and policies.
    pub fn new(machines: usize, cores: u32) -> Self {
        Self {
            machines,
            cores,
            costs: Costs::default(),
            links: LinkPolicy::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// How often each node applies the link policy.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

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

/// Something a node sends, once the CPU to send it is spent.
#[derive(Debug)]
enum Out {
    Datagram {
        to: usize,
        data: Bytes,
    },
    Stream {
        to: usize,
        to_life: u32,
        msg: StreamMsg,
    },
    /// Dial a seed and tell the driver who answered.
    Seed {
        to: usize,
    },
}

impl Out {
    fn to(&self) -> usize {
        match self {
            Out::Datagram { to, .. } | Out::Stream { to, .. } | Out::Seed { to } => *to,
        }
    }
}

/// Work queued on a node's CPU.
#[derive(Debug)]
enum Job {
    /// Handle an input.
    Input(Ev),
    /// Send what handling produced.
    Transmit(Vec<Out>),
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
    /// A machine's job in service finishes (if `epoch` is still current).
    Cpu {
        machine: usize,
        epoch: u64,
    },
    /// A handshake's first flight reaches the peer (`to`).
    Dial {
        from: usize,
        from_life: u32,
        to: usize,
        to_life: u32,
        id: u64,
        resumed: bool,
        dialled_at: Duration,
    },
    /// The peer's answer reaches the dialer (`to`).
    DialAnswer {
        to: usize,
        to_life: u32,
        from: usize,
        from_life: u32,
        id: u64,
        resumed: bool,
    },
    /// A dial timed out.
    DialFailed {
        node: usize,
        life: u32,
        peer: usize,
        id: u64,
    },
    /// Time to apply the link policy.
    Sweep {
        node: usize,
        life: u32,
    },
}

impl Ev {
    /// The node whose process must handle this event, if any.
    fn target(&self) -> Option<usize> {
        match self {
            Ev::Datagram { to, .. }
            | Ev::Stream { to, .. }
            | Ev::Dial { to, .. }
            | Ev::DialAnswer { to, .. } => Some(*to),
            Ev::Timer { node, .. } => Some(*node),
            Ev::StallEnd { .. }
            | Ev::Sample
            | Ev::Action(_)
            | Ev::Cpu { .. }
            | Ev::DialFailed { .. }
            | Ev::Sweep { .. } => None,
        }
    }
}

/// The machines and connections of a run with a [`HostConfig`].
#[derive(Debug)]
struct Host {
    config: HostConfig,
    cpu: Cpu<Job>,
    conns: Conns<Out>,
}

impl Host {
    fn cost(&self, us: f64) -> Duration {
        Costs::time(us)
    }

    /// The CPU an input costs its receiver.
    fn input_cost(&self, ev: &Ev) -> Option<Duration> {
        let c = &self.config.costs;
        Some(match ev {
            Ev::Datagram { .. } => self.cost(c.datagram_recv_us),
            Ev::Timer { .. } => self.cost(c.timer_us),
            Ev::Stream { msg, .. } => self.cost(c.stream_message_us + sync_cost(c, msg)),
            Ev::Dial { resumed, .. } | Ev::DialAnswer { resumed, .. } => self.handshake(*resumed),
            _ => return None,
        })
    }

    fn handshake(&self, resumed: bool) -> Duration {
        let c = &self.config.costs;
        self.cost(if resumed {
            c.handshake_resumed_us
        } else {
            c.handshake_full_us
        })
    }

    /// The CPU sending costs.
    fn output_cost(&self, out: &Out) -> Duration {
        let c = &self.config.costs;
        match out {
            Out::Datagram { .. } => self.cost(c.datagram_send_us),
            Out::Stream { msg, .. } => self.cost(c.stream_message_us + sync_cost(c, msg)),
            // The dial's CPU is charged when its answer arrives.
            Out::Seed { .. } => Duration::ZERO,
        }
    }
}

/// The per-member part of a member sync frame's cost.
fn sync_cost(c: &Costs, msg: &StreamMsg) -> f64 {
    match msg {
        StreamMsg::Members { payload, .. } => {
            let members = SyncPayload::decode(payload).map_or(0, |p| p.members.len());
            c.sync_member_us * members as f64
        }
        _ => 0.0,
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
    /// What the driver sent since the last input, before the CPU for it is
    /// spent (with a [`HostConfig`] only).
    outbox: Vec<Out>,
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
            host,
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
        self.accept_event(ev);
        if let Some(host) = self.host.as_mut() {
            for w in host.cpu.wakes(self.now) {
                self.push(
                    w.at,
                    Ev::Cpu {
                        machine: w.machine,
                        epoch: w.epoch,
                    },
                );
            }
        }
    }

    /// Drops an event for a process that is gone, holds it during a stall,
    /// queues it for the CPU, or handles it now.
    fn accept_event(&mut self, ev: Ev) {
        if let Some(x) = ev.target() {
            let node = &mut self.nodes[x];
            let gone = match &ev {
                Ev::Dial { to_life, .. } => *to_life != node.life,
                _ => false,
            };
            if node.driver.is_none() || gone {
                match ev {
                    Ev::Datagram { .. } => self.counters.undeliverable += 1,
                    Ev::Stream { .. } => self.counters.stream_failures += 1,
                    Ev::Dial {
                        from,
                        from_life,
                        to,
                        id,
                        dialled_at,
                        ..
                    } => self.dial_lost(from, from_life, to, id, dialled_at),
                    _ => {}
                }
                return;
            }
            if node.stalled_until.is_some() {
                node.backlog.push_back(ev);
                return;
            }
            if let Some(host) = self.host.as_mut()
                && let Some(cost) = host.input_cost(&ev)
            {
                host.cpu.submit(self.now, x, cost, Job::Input(ev), false);
                return;
            }
        }
        self.handle(ev);
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Datagram { from, to, data } => self.on_datagram(from, to, &data),
            Ev::Timer { node, life, at } => self.on_timer(node, life, at),
            Ev::Stream { to, to_life, msg } => self.on_stream(to, to_life, msg),
            Ev::StallEnd { node, life, at } => self.on_stall_end(node, life, at),
            Ev::Sample => self.on_sample(),
            Ev::Action(action) => self.on_action(action),
            Ev::Cpu { machine, epoch } => self.on_cpu(machine, epoch),
            Ev::Dial {
                from,
                from_life,
                to,
                to_life,
                id,
                resumed,
                dialled_at,
            } => self.on_dial((from, from_life), (to, to_life), id, resumed, dialled_at),
            Ev::DialAnswer {
                to,
                to_life,
                from,
                from_life,
                id,
                ..
            } => self.on_dial_answer((to, to_life), (from, from_life), id),
            Ev::DialFailed {
                node,
                life,
                peer,
                id,
            } => self.on_dial_failed(node, life, peer, id),
            Ev::Sweep { node, life } => self.on_sweep(node, life),
        }
    }

    /// A machine finished a job: carry out what it was for.
    fn on_cpu(&mut self, machine: usize, epoch: u64) {
        let now = self.now;
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let Some((x, job)) = host.cpu.complete(now, machine, epoch) else {
            return;
        };
        match job {
            Job::Input(ev) => {
                self.handle(ev);
                // Replies sent without a flush (stream answers).
                self.submit_outbox(x);
            }
            Job::Transmit(outs) => {
                for out in outs {
                    self.release(x, out);
                }
            }
        }
        if let Some(host) = self.host.as_mut() {
            host.cpu.resume(now, x);
        }
    }

    /// Puts what `x` sends on its way: over its link to the peer, or into
    /// a dial.
    fn release(&mut self, x: usize, out: Out) {
        let now = self.now;
        let to = out.to();
        let (x_life, to_life) = (self.nodes[x].life, self.nodes[to].life);
        if let Out::Stream { to_life: meant, .. } = &out
            && *meant != to_life
        {
            // An answer to a process that is gone: it fails on arrival.
            self.deliver(x, out);
            return;
        }
        let datagram = matches!(out, Out::Datagram { .. });
        let Some(host) = self.host.as_mut() else {
            return;
        };
        match host
            .conns
            .route(now, (x, x_life), (to, to_life), out, datagram)
        {
            Route::Open(out) => self.deliver(x, out),
            Route::Queued => {}
            Route::Dropped(_) => self.counters.dial_drops += 1,
            Route::Dial { id, resumed } => {
                if self.nodes[to].driver.is_none() || self.net.separated(x, to) {
                    self.dial_lost(x, x_life, to, id, now);
                } else {
                    let at = now + self.net.stream_delay();
                    self.push(
                        at,
                        Ev::Dial {
                            from: x,
                            from_life: x_life,
                            to,
                            to_life,
                            id,
                            resumed,
                            dialled_at: now,
                        },
                    );
                }
            }
        }
    }

    /// Sends over an open link.
    fn deliver(&mut self, x: usize, out: Out) {
        match out {
            Out::Datagram { to, data } => self.net_datagram(x, to, data),
            Out::Stream { to, to_life, msg } => {
                if self.nodes[to].life != to_life || self.net.separated(x, to) {
                    self.counters.stream_failures += 1;
                    if let StreamMsg::Fetch { from, from_life } = msg {
                        self.fetch_failed(from, from_life, to);
                    }
                    return;
                }
                let at = self.now + self.net.stream_delay();
                self.push(at, Ev::Stream { to, to_life, msg });
            }
            Out::Seed { to } => {
                let (now, name) = (self.now, self.names[to].clone());
                if let Some(d) = self.nodes[x].driver.as_mut() {
                    d.handle_seed(now, name, address(to));
                }
                self.flush(x);
            }
        }
    }

    /// What waited in a dial that failed.
    fn undelivered(&mut self, x: usize, life: u32, out: Out) {
        match out {
            Out::Datagram { .. } => self.counters.dial_drops += 1,
            Out::Stream { to, msg, .. } => {
                self.counters.stream_failures += 1;
                if matches!(msg, StreamMsg::Fetch { .. }) {
                    self.fetch_failed(x, life, to);
                }
            }
            Out::Seed { .. } => {}
        }
    }

    /// `x`'s dial `id` to `to` gets no answer: it fails at the timeout.
    fn dial_lost(&mut self, x: usize, life: u32, to: usize, id: u64, dialled_at: Duration) {
        let Some(host) = self.host.as_ref() else {
            return;
        };
        let at = (dialled_at + host.config.connect_timeout).max(self.now);
        self.push(
            at,
            Ev::DialFailed {
                node: x,
                life,
                peer: to,
                id,
            },
        );
    }

    /// The peer `y` spent its handshake CPU: it holds the link and answers.
    fn on_dial(
        &mut self,
        (x, x_life): (usize, u32),
        (y, y_life): (usize, u32),
        id: u64,
        resumed: bool,
        dialled_at: Duration,
    ) {
        let now = self.now;
        if self.nodes[y].life != y_life || self.nodes[x].life != x_life {
            self.dial_lost(x, x_life, y, id, dialled_at);
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let waiting = host.conns.accept(now, y, (x, x_life), resumed);
        for out in waiting {
            self.deliver(y, out);
        }
        if self.net.separated(x, y) {
            self.dial_lost(x, x_life, y, id, dialled_at);
            return;
        }
        let at = now + self.net.stream_delay();
        self.push(
            at,
            Ev::DialAnswer {
                to: x,
                to_life: x_life,
                from: y,
                from_life: y_life,
                id,
                resumed,
            },
        );
    }

    /// The dialer spent its handshake CPU: the link is open both ways.
    fn on_dial_answer(&mut self, (x, x_life): (usize, u32), (y, y_life): (usize, u32), id: u64) {
        let now = self.now;
        if self.nodes[x].life != x_life {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let waiting = host.conns.established(now, x, (y, y_life), id);
        for out in waiting {
            self.deliver(x, out);
        }
    }

    fn on_dial_failed(&mut self, x: usize, life: u32, y: usize, id: u64) {
        if self.nodes[x].life != life {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        for out in host.conns.failed(x, y, id) {
            self.undelivered(x, life, out);
        }
    }

    /// Applies the link policy at `x`, and again a second later.
    fn on_sweep(&mut self, x: usize, life: u32) {
        let now = self.now;
        if self.nodes[x].life != life || self.nodes[x].driver.is_none() {
            return;
        }
        let Some(host) = self.host.as_mut() else {
            return;
        };
        let policy = host.config.links;
        for y in host.conns.sweep(now, x, &policy) {
            host.conns.close(x, life, y);
        }
        self.push(now + SWEEP_EVERY, Ev::Sweep { node: x, life });
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
        self.submit_outbox(x);
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

    /// Queues the sending of what `x` produced, right after the job in
    /// service: a process sends what it decided before its next input.
    fn submit_outbox(&mut self, x: usize) {
        if self.nodes[x].outbox.is_empty() {
            return;
        }
        if self.nodes[x]
            .driver
            .as_ref()
            .is_some_and(|d| d.core().has_left())
        {
            // Leave notices go before the process exits, whatever its
            // queue: the agent waits for them.
            for out in std::mem::take(&mut self.nodes[x].outbox) {
                self.release(x, out);
            }
            return;
        }
        if let Some(host) = self.host.as_mut() {
            let outs = std::mem::take(&mut self.nodes[x].outbox);
            let cost = outs.iter().map(|o| host.output_cost(o)).sum();
            host.cpu
                .submit(self.now, x, cost, Job::Transmit(outs), true);
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
                    } else if self.host.is_some() {
                        // A dial, answered (or not) a handshake later.
                        self.nodes[x].outbox.push(Out::Seed { to: y });
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
            DriverAction::Disconnect { peer } => {
                if let Some(y) = self.index(&peer)
                    && let Some(host) = self.host.as_mut()
                {
                    host.conns.close(x, life, y);
                }
            }
            DriverAction::DisconnectStale { peer } => {
                if let Some(y) = self.index(&peer.name)
                    && let Some(host) = self.host.as_mut()
                {
                    host.conns.close_stale(x, y, self.nodes[y].life);
                }
            }
            DriverAction::Purge { .. } => {}
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
        if self.host.is_some() {
            self.nodes[from]
                .outbox
                .push(Out::Datagram { to, data: t.data });
            return;
        }
        self.net_datagram(from, to, t.data);
    }

    /// A datagram on the wire: cut, lost, or delivered after a delay.
    fn net_datagram(&mut self, from: usize, to: usize, data: Bytes) {
        if self.net.separated(from, to) {
            self.counters.cut += 1;
            return;
        }
        if self.net.lost() {
            self.counters.lost += 1;
            return;
        }
        let at = self.now + self.net.delay();
        self.push(at, Ev::Datagram { from, to, data });
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
        if self.host.is_some() {
            // Each node's sweeps at its own phase of the second.
            let phase = mix(seed, mix(x as u64, u64::from(life))) % SWEEP_EVERY.as_nanos() as u64;
            self.push(
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
        if self.host.is_some() {
            self.nodes[from]
                .outbox
                .push(Out::Stream { to, to_life, msg });
            return true;
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
            host: None,
        }
    }

    /// `nodes` nodes on one machine with `cores` cores.
    fn hosted(nodes: usize, cores: u32, costs: Costs) -> SimConfig {
        let mut host = HostConfig::new(1, cores);
        host.costs = costs;
        SimConfig {
            host: Some(host),
            ..config(nodes)
        }
    }

    /// Starts `n` nodes at once and returns when every view was right.
    fn form(sim: &mut Sim, n: usize) -> Option<Duration> {
        for x in 0..n {
            sim.schedule(Duration::ZERO, Action::Start(x));
        }
        sim.run_until_members_agree("join", Duration::from_secs(60), n)
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

    #[test]
    fn a_machine_with_little_cpu_delays_handling() {
        let free = form(&mut Sim::new(config(8)).unwrap(), 8).unwrap();
        let cheap = form(&mut Sim::new(hosted(8, 2, Costs::default())).unwrap(), 8).unwrap();
        let costly = Costs {
            handshake_full_us: 100_000.0,
            datagram_recv_us: 2_000.0,
            ..Costs::default()
        };
        let mut sim = Sim::new(hosted(8, 1, costly)).unwrap();
        let slow = form(&mut sim, 8).unwrap();
        assert!(
            free < cheap,
            "handshakes take round trips: {free:?} {cheap:?}"
        );
        assert!(slow > cheap * 5, "{cheap:?} {slow:?}");
        let waits = sim.cpu_waits().unwrap();
        assert!(waits.max >= Duration::from_millis(100), "{waits:?}");
        assert_eq!(sim.verify_views(), 0);
    }

    #[test]
    fn idle_links_close_and_reconnecting_resumes() {
        let mut config = hosted(6, 2, Costs::default());
        if let Some(h) = config.host.as_mut() {
            h.links.idle = Duration::from_millis(1_500);
        }
        let mut sim = Sim::new(config).unwrap();
        let formed = form(&mut sim, 6).unwrap();
        sim.run_until("steady", formed + Duration::from_secs(30));
        for x in 0..6 {
            let s = sim.link_stats(x).unwrap();
            // One full handshake per pair and direction at most: the
            // session is kept for every later one.
            assert!(s.dialled_full <= 5, "node {x}: {s:?}");
            assert!(s.dialled_resumed > 0, "node {x}: {s:?}");
            assert!(s.idle_closes > 0, "node {x}: {s:?}");
        }
        assert!(sim.views().agreed());
    }

    #[test]
    fn a_restarted_peer_costs_a_full_handshake_and_runs_are_reproducible() {
        let run = || {
            let mut sim = Sim::new(hosted(6, 2, Costs::default())).unwrap();
            let formed = form(&mut sim, 6).unwrap();
            let before = sim.link_stats(0).unwrap();
            sim.schedule(formed + Duration::from_secs(1), Action::Crash(vec![5]));
            sim.schedule(formed + Duration::from_secs(20), Action::Start(5));
            sim.run_until("restart", formed + Duration::from_secs(40));
            assert!(sim.views().agreed());
            (
                before,
                sim.link_stats(0).unwrap(),
                sim.link_stats(5).unwrap(),
            )
        };
        let (before, after, restarted) = run();
        assert!(
            after.dialled_full + after.accepted_full > before.dialled_full + before.accepted_full,
            "{before:?} {after:?}"
        );
        assert!(restarted.handshakes() > 0);
        assert_eq!(run(), (before, after, restarted));
    }
}
