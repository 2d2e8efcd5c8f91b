//! The scenarios: what happens to the cluster, and when.
//!
//! Every scenario but `join` first forms the cluster (all nodes join
//! through the seeds) and waits until every node sees every other; the
//! measured phase of `--duration` seconds starts there. Times below are
//! relative to that point.
//!
//! - `join`: the cluster forming is the measurement; once every view is
//!   right (or 30 s after the join window at the latest), a node publishes
//!   a catalog change every 5 s until the end.
//! - `crash`: at +1 s, `--kill` nodes (default 1 %, at least 1) crash; they
//!   restart with a new generation halfway through the phase.
//! - `partition`: at +1 s the nodes split into two random halves for
//!   `--split` seconds; a quarter, half and three quarters of the way
//!   through, one node on each side publishes a catalog change; then the
//!   network heals. If not every node agrees by the end of the phase, the
//!   run goes on until they do (at most `--settle-limit` after the heal).
//! - `loss`: the cluster forms and runs under each loss level (0, 1, 2, 5,
//!   10, 15, 20 %, or only `--loss` if given), with a catalog change every
//!   5 s.
//! - `slow`: 5 % of the nodes (at least 1) stall for 0.5–2 s, then run for
//!   0–5 s, again and again until 10 s before the end (the Lifeguard
//!   experiment); catalog changes every 5 s.
//! - `churn`: every second 0.5 % of the nodes (at least 1) leave gracefully
//!   and come back 2–10 s later with a new generation, until a third of the
//!   phase (at most 20 s) is left; catalog changes every 5 s.
//! - `compare`: kills, catalog changes and partitions one after the other
//!   on one cluster, to set against real agents ([`crate::compare`]).
//! - `formation`: nodes started back to back on one machine with finite
//!   CPU and connection costs, until every node lists every other alive
//!   ([`crate::formation`]).
//!
//! Every scenario can also run its nodes on machines with finite CPU and
//! connections ([`run_on`], `--machines`).

use std::time::Duration;

use gossamer_membership::SwimConfig;
use rand::RngExt;
use serde::Serialize;

use crate::net::NetParams;
use crate::report::{Params, Phases, Report, RunReport};
use crate::sim::{Action, HostConfig, Sim, SimConfig};

/// Seed nodes, as in a typical deployment.
pub const SEEDS: usize = 3;
/// Time-series resolution.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The agent's default anti-entropy period.
const ANTI_ENTROPY_EVERY: Duration = Duration::from_secs(5);
/// How often a node changes its catalog entry in the steady scenarios.
const PUBLISH_EVERY: Duration = Duration::from_secs(5);
/// `join` starts publishing at most this long after the join window.
const PUBLISH_AFTER_JOIN_S: u64 = 30;
/// Loss levels of the `loss` sweep.
pub const LOSS_LEVELS: [f64; 7] = [0.0, 0.01, 0.02, 0.05, 0.10, 0.15, 0.20];

/// Which experiment to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// N nodes join through 3 seeds.
    Join,
    /// Kill k nodes, detect them, restart them.
    Crash,
    /// Split in two, change catalogs on both sides, heal.
    Partition,
    /// Sweep datagram loss from 0 to 20 %.
    Loss,
    /// 5 % of nodes stall 0.5–2 s at random (Lifeguard's experiment).
    Slow,
    /// Nodes leave and join continuously.
    Churn,
    /// Kills, catalog changes and partitions one after the other, measured
    /// as `tests/sim_vs_real.rs` measures real agents (see [`crate::compare`]).
    Compare,
    /// N agents started back to back on one machine with finite CPU and
    /// real connection costs: how long until they form (see
    /// [`crate::formation`]).
    Formation,
}

impl Scenario {
    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Join => "join",
            Self::Crash => "crash",
            Self::Partition => "partition",
            Self::Loss => "loss",
            Self::Slow => "slow",
            Self::Churn => "churn",
            Self::Compare => "compare",
            Self::Formation => "formation",
        }
    }
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// The scenario.
    pub scenario: Scenario,
    /// Nodes.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Datagram loss (for `loss`: run only this level).
    pub loss: Option<f64>,
    /// Mean one-way latency.
    pub latency: Duration,
    /// The measured phase's length (for `join`, the whole run).
    pub duration: Duration,
    /// SWIM timing.
    pub swim: SwimConfig,
    /// Nodes to crash (`crash`); default 1 % of the nodes, at least 1.
    pub kill: Option<usize>,
    /// How long the partition lasts (`partition`).
    pub split: Duration,
    /// Nodes other than the seeds start at random instants in this window.
    pub join_window: Duration,
    /// How long to wait for the cluster to form before giving up.
    pub form_limit: Duration,
    /// `partition` runs past `duration` until every node agrees, for at most
    /// this long after the heal.
    pub settle_limit: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Options {
    /// Checks the combination.
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.nodes > SEEDS,
            "need more than {SEEDS} nodes (the seeds)"
        );
        if let Some(l) = self.loss {
            anyhow::ensure!((0.0..=1.0).contains(&l), "--loss is a probability, 0 to 1");
        }
        anyhow::ensure!(!self.duration.is_zero(), "--duration must be positive");
        if self.scenario == Scenario::Partition {
            anyhow::ensure!(
                self.split + Duration::from_secs(1) < self.duration,
                "--split must end before --duration"
            );
        }
        if let Some(k) = self.kill {
            anyhow::ensure!(
                (1..=self.nodes - SEEDS).contains(&k),
                "--kill must be between 1 and the number of non-seed nodes"
            );
        }
        Ok(())
    }
}

/// Runs the scenario and collects the report.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    run_on(opts, None)
}

/// Runs the scenario with its nodes on machines with finite CPU and
/// connections ([`HostConfig`]; `None`: as [`run`]).
pub fn run_on(opts: &Options, host: Option<&HostConfig>) -> anyhow::Result<Report> {
    opts.validate()?;
    let runs = match opts.scenario {
        Scenario::Loss => {
            let levels: Vec<f64> = opts.loss.map_or_else(|| LOSS_LEVELS.to_vec(), |l| vec![l]);
            levels
                .into_iter()
                .map(|l| loss_run(opts, host, l))
                .collect::<anyhow::Result<Vec<_>>>()?
        }
        Scenario::Join => vec![join(opts, host)?],
        Scenario::Crash => vec![crash(opts, host)?],
        Scenario::Partition => vec![partition(opts, host)?],
        Scenario::Slow => vec![slow(opts, host)?],
        Scenario::Churn => vec![churn(opts, host)?],
        Scenario::Compare => {
            anyhow::bail!("`compare` reports its own figures: run it with compare::run")
        }
        Scenario::Formation => {
            anyhow::bail!("`formation` reports its own figures: run it with formation::run")
        }
    };
    Ok(Report {
        params: Params {
            scenario: opts.scenario.name().to_owned(),
            nodes: opts.nodes,
            seed: opts.seed,
            loss: opts.loss.unwrap_or(0.0),
            latency_ms: opts.latency.as_secs_f64() * 1000.0,
            duration_s: opts.duration.as_secs_f64(),
            swim: opts.swim.clone(),
        },
        runs,
    })
}

pub(crate) fn new_sim(opts: &Options, loss: f64, host: Option<&HostConfig>) -> anyhow::Result<Sim> {
    let mut sim = Sim::new(SimConfig {
        nodes: opts.nodes,
        seed: opts.seed,
        swim: opts.swim.clone(),
        net: NetParams {
            latency: opts.latency,
            loss,
        },
        seeds: SEEDS,
        sample_every: SAMPLE_EVERY,
        anti_entropy_every: ANTI_ENTROPY_EVERY,
        host: host.cloned(),
    })?;
    if opts.progress {
        sim.show_progress();
    }
    Ok(sim)
}

/// How the cluster formed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Formed {
    /// When every node was running and every view was right.
    pub(crate) joined: Option<Duration>,
    /// When the last node started.
    last_start: Duration,
}

/// Starts every node (seeds at once, the others at random instants in the
/// join window) and runs until all run and every view is right, or `limit`.
pub(crate) fn form(sim: &mut Sim, opts: &Options, limit: Duration) -> Formed {
    let window = u64::try_from(opts.join_window.as_nanos()).unwrap_or(u64::MAX);
    let mut last_start = Duration::ZERO;
    for x in 0..opts.nodes {
        let at = if x < SEEDS || window == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(sim.rng().random_range(0..window))
        };
        last_start = last_start.max(at);
        sim.schedule(at, Action::Start(x));
    }
    let joined = sim.run_until_agreed("forming", limit, opts.nodes);
    Formed { joined, last_start }
}

/// A formed cluster at the start of a scenario's measured phase.
struct Baseline {
    formed: Formed,
    /// When the phase starts: when the cluster formed (or at the limit).
    t0: Duration,
    counters: crate::metrics::Counters,
    pairs_right: f64,
}

impl Baseline {
    /// The report's phases for a scenario measured from `t0`.
    fn phases(
        &self,
        label: String,
        loss: f64,
        reference: (String, Duration),
        disturbed_at: Option<Duration>,
        markers: Vec<(Duration, String)>,
    ) -> Phases {
        Phases {
            label,
            loss,
            joined: self.formed.joined,
            last_start: self.formed.last_start,
            pairs_right_after_forming: self.pairs_right,
            at_formed: self.counters,
            formed_at: self.t0,
            at_phase_start: self.counters,
            phase_start: self.t0,
            reference,
            disturbed_at,
            markers,
            connected_spread: true,
        }
    }
}

/// Forms the cluster for a scenario with a measured phase after it.
fn form_then(sim: &mut Sim, opts: &Options) -> Baseline {
    let formed = form(sim, opts, opts.form_limit);
    Baseline {
        formed,
        t0: sim.now(),
        counters: sim.counters(),
        pairs_right: sim.views().pairs_right(),
    }
}

/// Picks `k` distinct nodes among `pool`, in a seeded random order.
pub(crate) fn pick(sim: &mut Sim, pool: &[usize], k: usize) -> Vec<usize> {
    let mut v = pool.to_vec();
    // Fisher-Yates with the scenario's RNG.
    for i in (1..v.len()).rev() {
        let j = sim.rng().random_range(0..=i);
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

fn non_seeds(opts: &Options) -> Vec<usize> {
    (SEEDS..opts.nodes).collect()
}

/// Schedules a catalog change every [`PUBLISH_EVERY`] in `[from, to)` by a
/// random node of `pool`; the node must be running then.
fn schedule_publishes(sim: &mut Sim, pool: &[usize], from: Duration, to: Duration) {
    let mut at = from;
    while at < to {
        let i = sim.rng().random_range(0..pool.len());
        sim.schedule(at, Action::Publish(pool[i]));
        at += PUBLISH_EVERY;
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn join(opts: &Options, host: Option<&HostConfig>) -> anyhow::Result<RunReport> {
    let mut sim = new_sim(opts, opts.loss.unwrap_or(0.0), host)?;
    // Catalog changes start once every view is right, or 30 s after the
    // join window at the latest: in large clusters the last few pairs can
    // wait for a member sync, and dissemination is worth measuring anyway.
    let publish_by = (opts.join_window + secs(PUBLISH_AFTER_JOIN_S)).min(opts.duration);
    let formed = form(&mut sim, opts, publish_by);
    let formed_at = sim.now();
    let at_formed = sim.counters();
    let pairs_right_after_forming = sim.views().pairs_right();
    let mut markers = vec![(formed.last_start, "last node started".to_owned())];
    match formed.joined {
        Some(t) => markers.push((t, "all views right".to_owned())),
        None => markers.push((formed_at, "publishing starts".to_owned())),
    }
    // Only nodes that never stall or leave publish; all are steady here.
    let pool: Vec<usize> = (0..opts.nodes).collect();
    schedule_publishes(
        &mut sim,
        &pool,
        formed.joined.unwrap_or(formed_at) + secs(1),
        opts.duration.saturating_sub(secs(3)),
    );
    sim.run_until("steady", opts.duration);
    // Views may all become right after publishing started.
    let joined = formed.joined.or_else(|| {
        let t = sim.agreed_since(formed_at, false)?;
        markers.push((t, "all views right".to_owned()));
        Some(t)
    });
    Ok(RunReport::build(
        &mut sim,
        Phases {
            label: "join".to_owned(),
            loss: opts.loss.unwrap_or(0.0),
            joined,
            last_start: formed.last_start,
            pairs_right_after_forming,
            at_formed,
            formed_at,
            // Forming is what this scenario measures: its phase is the run.
            at_phase_start: crate::metrics::Counters::default(),
            phase_start: Duration::ZERO,
            reference: ("the last node started".to_owned(), formed.last_start),
            disturbed_at: None,
            markers,
            connected_spread: true,
        },
    ))
}

fn crash(opts: &Options, host: Option<&HostConfig>) -> anyhow::Result<RunReport> {
    let mut sim = new_sim(opts, opts.loss.unwrap_or(0.0), host)?;
    let base = form_then(&mut sim, opts);
    let t0 = base.t0;
    let k = opts.kill.unwrap_or((opts.nodes / 100).max(1));
    let victims = pick(&mut sim, &non_seeds(opts), k);
    let crash_at = t0 + secs(1);
    let restart_at = t0 + opts.duration / 2;
    sim.schedule(crash_at, Action::Crash(victims.clone()));
    for &v in &victims {
        sim.schedule(restart_at, Action::Start(v));
    }
    sim.run_until("crash", t0 + opts.duration);
    Ok(RunReport::build(
        &mut sim,
        base.phases(
            "crash".to_owned(),
            opts.loss.unwrap_or(0.0),
            ("the restart".to_owned(), restart_at),
            Some(crash_at),
            vec![
                (crash_at, format!("{k} crashed")),
                (restart_at, format!("{k} restarted")),
            ],
        ),
    ))
}

fn partition(opts: &Options, host: Option<&HostConfig>) -> anyhow::Result<RunReport> {
    let mut sim = new_sim(opts, opts.loss.unwrap_or(0.0), host)?;
    let base = form_then(&mut sim, opts);
    let t0 = base.t0;
    let all: Vec<usize> = (0..opts.nodes).collect();
    let order = pick(&mut sim, &all, opts.nodes);
    let half = opts.nodes / 2;
    let mut groups = vec![0u8; opts.nodes];
    for &x in &order[half..] {
        groups[x] = 1;
    }
    let split_at = t0 + secs(1);
    let heal_at = split_at + opts.split;
    sim.schedule(split_at, Action::Split(groups));
    let sides = [order[..half].to_vec(), order[half..].to_vec()];
    for q in 1..=3u32 {
        let at = split_at + opts.split * q / 4;
        for side in &sides {
            let i = sim.rng().random_range(0..side.len());
            sim.schedule(at, Action::Publish(side[i]));
        }
    }
    sim.schedule(heal_at, Action::Heal);
    sim.run_until("partition", t0 + opts.duration);
    // The scenario ends with agreement: if the phase was too short, keep
    // going until every node agrees (or the settle limit).
    if !sim.agreed() {
        sim.run_until_agreed("settling", heal_at + opts.settle_limit, 0);
    }
    Ok(RunReport::build(
        &mut sim,
        Phases {
            // The two sides gossip apart: times are not gossip rounds.
            connected_spread: false,
            ..base.phases(
                "partition".to_owned(),
                opts.loss.unwrap_or(0.0),
                ("the heal".to_owned(), heal_at),
                Some(split_at),
                vec![
                    (split_at, format!("split {half}/{}", opts.nodes - half)),
                    (heal_at, "heal".to_owned()),
                ],
            )
        },
    ))
}

fn loss_run(opts: &Options, host: Option<&HostConfig>, loss: f64) -> anyhow::Result<RunReport> {
    let mut sim = new_sim(opts, loss, host)?;
    let base = form_then(&mut sim, opts);
    let t0 = base.t0;
    let end = t0 + opts.duration;
    let pool: Vec<usize> = (0..opts.nodes).collect();
    schedule_publishes(&mut sim, &pool, t0 + secs(1), end.saturating_sub(secs(3)));
    sim.run_until(&format!("loss {:.0}%", loss * 100.0), end);
    Ok(RunReport::build(
        &mut sim,
        base.phases(
            format!("loss={:.0}%", loss * 100.0),
            loss,
            ("the last node started".to_owned(), base.formed.last_start),
            None,
            Vec::new(),
        ),
    ))
}

fn slow(opts: &Options, host: Option<&HostConfig>) -> anyhow::Result<RunReport> {
    let mut sim = new_sim(opts, opts.loss.unwrap_or(0.0), host)?;
    let base = form_then(&mut sim, opts);
    let t0 = base.t0;
    let end = t0 + opts.duration;
    let stop_stalls = end.saturating_sub(secs(10)).max(t0 + secs(1));
    let k = (opts.nodes * 5).div_ceil(100).max(1);
    let slow_nodes = pick(&mut sim, &non_seeds(opts), k);
    let mut last_stall_end = t0;
    for &x in &slow_nodes {
        sim.set_slow(x);
        let mut at = t0 + secs(1);
        loop {
            let length = Duration::from_millis(sim.rng().random_range(500..=2000));
            if at + length > stop_stalls {
                break;
            }
            sim.schedule(at, Action::Stall { node: x, length });
            last_stall_end = last_stall_end.max(at + length);
            at += length + Duration::from_millis(sim.rng().random_range(0..=5000));
        }
    }
    let steady: Vec<usize> = (0..opts.nodes)
        .filter(|x| !slow_nodes.contains(x))
        .collect();
    schedule_publishes(&mut sim, &steady, t0 + secs(1), end.saturating_sub(secs(3)));
    sim.run_until("slow", end);
    Ok(RunReport::build(
        &mut sim,
        base.phases(
            "slow".to_owned(),
            opts.loss.unwrap_or(0.0),
            ("the last stall".to_owned(), last_stall_end),
            Some(t0 + secs(1)),
            vec![
                (t0 + secs(1), format!("{k} nodes start stalling")),
                (last_stall_end, "last stall ends".to_owned()),
            ],
        ),
    ))
}

fn churn(opts: &Options, host: Option<&HostConfig>) -> anyhow::Result<RunReport> {
    let mut sim = new_sim(opts, opts.loss.unwrap_or(0.0), host)?;
    let base = form_then(&mut sim, opts);
    let t0 = base.t0;
    let end = t0 + opts.duration;
    let quiet = (opts.duration / 3).min(secs(20));
    let churn_end = end.saturating_sub(quiet);
    let per_second = (opts.nodes / 200).max(1);
    // Who is down when, so a node does not leave twice while away.
    let mut back_at = vec![Duration::ZERO; opts.nodes];
    let candidates = non_seeds(opts);
    let mut last_rejoin = t0;
    let mut at = t0 + secs(1);
    while at < churn_end {
        let present: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&x| back_at[x] <= at)
            .collect();
        for x in pick(&mut sim, &present, per_second) {
            let away = Duration::from_millis(sim.rng().random_range(2000..=10_000));
            sim.schedule(at, Action::Leave(x));
            sim.schedule(at + away, Action::Start(x));
            back_at[x] = at + away + Duration::from_millis(1);
            last_rejoin = last_rejoin.max(at + away);
        }
        at += secs(1);
    }
    // Seeds never leave, so they publish.
    let seeds: Vec<usize> = (0..SEEDS).collect();
    schedule_publishes(&mut sim, &seeds, t0 + secs(1), end.saturating_sub(secs(3)));
    sim.run_until("churn", end);
    Ok(RunReport::build(
        &mut sim,
        base.phases(
            "churn".to_owned(),
            opts.loss.unwrap_or(0.0),
            ("the last rejoin".to_owned(), last_rejoin),
            Some(t0 + secs(1)),
            vec![
                (t0 + secs(1), format!("churn starts ({per_second}/s)")),
                (churn_end, "churn stops".to_owned()),
                (last_rejoin, "last rejoin".to_owned()),
            ],
        ),
    ))
}
