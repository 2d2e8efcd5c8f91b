//! `compare`: the three experiments `tests/sim_vs_real.rs` also runs on
//! real agents on loopback, so the simulator's timings can be checked
//! against real processes.
//!
//! On one formed cluster, one experiment after the other:
//! 1. **kills**: a non-seed node crashes; once every observer declared it
//!    `down` it restarts (a new generation) and the next experiment waits
//!    until every view is right again. Measured: seconds from the crash to
//!    `down` at each observer.
//! 2. **changes**: one node changes its catalog entry. Measured: seconds
//!    until each other node holds the new entry.
//! 3. **partitions**: two random halves are cut apart for `--split`; one
//!    node on each side changes its catalog entry a quarter, half and three
//!    quarters of the way through; then the network heals. Measured:
//!    seconds from the heal until every view is right (every running node
//!    holds every other active at its current generation) and every
//!    catalog is current.
//!
//! Each experiment starts at a random instant 0–1 s after the previous one
//! settled, so it falls at a random phase of the nodes' probe and gossip
//! timers, as it does against real processes. [`Samples::figures`] turns
//! the raw times into the figures both sides print, with the same
//! arithmetic for both.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use rand::RngExt;
use serde::Serialize;

use crate::metrics::{mean, percentile};
use crate::report::secs;
use crate::scenario::{Options, SEEDS, form, new_sim, pick};
use crate::sim::{Action, Sim};

/// How long the simulation steps before looking at the measurements again
/// (the measurements themselves come from events, at full resolution).
const STEP: Duration = Duration::from_millis(50);
/// Quiet time after an experiment settled, before the next one.
const SETTLE: Duration = Duration::from_secs(2);
/// Longest wait for every observer to declare a crashed node down.
const DETECT_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for a restarted node to be seen right everywhere.
const REJOIN_LIMIT: Duration = Duration::from_secs(120);
/// Longest wait for a catalog change to reach every node.
const SPREAD_LIMIT: Duration = Duration::from_secs(30);

/// The raw times of every experiment, in seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Samples {
    /// Per kill: seconds from the crash until each observer declared the
    /// victim down, sorted.
    pub kills: Vec<Vec<f64>>,
    /// Per catalog change: seconds from the change until each other node
    /// held it, sorted.
    pub changes: Vec<Vec<f64>>,
    /// Per partition: seconds from the heal until every view was right and
    /// every catalog current.
    pub heals: Vec<f64>,
    /// Per partition: seconds from the heal until every view was right
    /// (catalogs aside).
    pub heals_membership: Vec<f64>,
}

/// The figures compared between the simulator and real agents.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Kills measured.
    pub kills: usize,
    /// Seconds to `down` at the median observer, mean over kills.
    pub down_median_s: Option<f64>,
    /// Seconds to `down` at the last observer, mean over kills.
    pub down_last_s: Option<f64>,
    /// Seconds to `down` at the last observer of the slowest kill.
    pub down_worst_s: Option<f64>,
    /// Catalog changes measured.
    pub changes: usize,
    /// Seconds until half the other nodes held a change, mean over changes.
    pub change_half_s: Option<f64>,
    /// Seconds until every other node held a change, mean over changes.
    pub change_all_s: Option<f64>,
    /// Partitions measured.
    pub partitions: usize,
    /// Seconds from the heal to full agreement, mean over partitions.
    pub heal_s: Option<f64>,
    /// The same, median (nearest rank) over partitions: the distribution
    /// has a long tail (a pair of nodes that missed an identity renewal
    /// waits for a member sync), so a few partitions give a noisy mean.
    pub heal_median_s: Option<f64>,
    /// Seconds from the heal to the slowest full agreement.
    pub heal_worst_s: Option<f64>,
    /// Seconds from the heal until membership alone agreed, mean.
    pub heal_membership_s: Option<f64>,
}

/// One line of the comparison table.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// What the figure is.
    pub name: &'static str,
    /// Its value in seconds.
    pub value: Option<f64>,
    /// Whether the two sides are expected to agree on it within the
    /// tolerance (the others are shown for context: worst cases of a few
    /// samples, intermediate points).
    pub checked: bool,
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: &[f64]) -> Option<f64> {
    percentile(&sorted(v.to_vec()), 0.5)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().max_by(f64::total_cmp)
}

impl Samples {
    /// The figures, with the same arithmetic for simulated and real times:
    /// medians are nearest-rank, means are over experiments.
    pub fn figures(&self) -> Figures {
        let per_kill = |f: fn(&[f64]) -> Option<f64>| -> Vec<f64> {
            self.kills.iter().filter_map(|k| f(k)).collect()
        };
        let per_change = |fraction: f64| -> Vec<f64> {
            self.changes
                .iter()
                .filter_map(|c| percentile(&sorted(c.clone()), fraction))
                .collect()
        };
        Figures {
            kills: self.kills.len(),
            down_median_s: mean(&per_kill(median)),
            down_last_s: mean(&per_kill(max)),
            down_worst_s: max(&per_kill(max)),
            changes: self.changes.len(),
            change_half_s: mean(&per_change(0.5)),
            change_all_s: mean(&per_change(1.0)),
            partitions: self.heals.len(),
            heal_s: mean(&self.heals),
            heal_median_s: median(&self.heals),
            heal_worst_s: max(&self.heals),
            heal_membership_s: mean(&self.heals_membership),
        }
    }
}

impl Figures {
    /// The table's rows, in a fixed order.
    pub fn rows(&self) -> Vec<Row> {
        let row = |name, value, checked| Row {
            name,
            value,
            checked,
        };
        vec![
            row(
                "kill -9: down at the median observer (mean)",
                self.down_median_s,
                true,
            ),
            row(
                "kill -9: down at the last observer (mean)",
                self.down_last_s,
                true,
            ),
            row(
                "kill -9: down at the last observer (worst)",
                self.down_worst_s,
                false,
            ),
            row(
                "catalog change at half the nodes (mean)",
                self.change_half_s,
                false,
            ),
            row(
                "catalog change at every node (mean)",
                self.change_all_s,
                true,
            ),
            row(
                "heal: membership agrees (mean)",
                self.heal_membership_s,
                false,
            ),
            row(
                "heal: membership and catalogs agree (mean)",
                self.heal_s,
                true,
            ),
            row(
                "heal: membership and catalogs agree (median)",
                self.heal_median_s,
                true,
            ),
            row(
                "heal: membership and catalogs agree (worst)",
                self.heal_worst_s,
                false,
            ),
        ]
    }
}

/// What `compare` ran and what it measured.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// Nodes.
    pub nodes: usize,
    /// Seed.
    pub seed: u64,
    /// Mean one-way latency, milliseconds.
    pub latency_ms: f64,
    /// Datagram loss.
    pub loss: f64,
    /// Partition length, seconds.
    pub split_s: f64,
    /// Raw times.
    pub samples: Samples,
    /// The figures.
    pub figures: Figures,
}

impl Comparison {
    /// The figures as text for stdout (nothing from the wall clock).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "gossamer-sim compare: {} nodes, seed {}, latency {:.2} ms, loss {:.1} %, split {} s",
            self.nodes,
            self.seed,
            self.latency_ms,
            self.loss * 100.0,
            self.split_s
        );
        let f = &self.figures;
        let _ = writeln!(
            out,
            "{} kills, {} catalog changes, {} partitions",
            f.kills, f.changes, f.partitions
        );
        for r in f.rows() {
            let v = r
                .value
                .map_or_else(|| "-".to_owned(), |s| format!("{s:.3} s"));
            let _ = writeln!(out, "  {:<48} {v}", r.name);
        }
        out
    }
}

/// Runs the simulation until `done` holds, in steps, or fails after
/// `limit` of virtual time naming `what`.
fn run_while(
    sim: &mut Sim,
    what: &str,
    limit: Duration,
    done: impl Fn(&Sim) -> bool,
) -> anyhow::Result<()> {
    let end = sim.now() + limit;
    while !done(sim) {
        anyhow::ensure!(
            sim.now() < end,
            "{what}: not within {limit:?} (at {:?} of virtual time)",
            sim.now()
        );
        let next = sim.now() + STEP;
        sim.run_until(what, next);
    }
    Ok(())
}

/// A random instant in the next second: experiments start at a random
/// phase of the nodes' timers.
fn soon(sim: &mut Sim) -> Duration {
    sim.now() + Duration::from_micros(sim.rng().random_range(0..1_000_000))
}

fn settle(sim: &mut Sim) {
    let next = sim.now() + SETTLE;
    sim.run_until("settle", next);
}

fn kill(sim: &mut Sim, victim: usize, nodes: usize) -> anyhow::Result<Vec<f64>> {
    let index = sim.detections().len();
    let at = soon(sim);
    sim.schedule(at, Action::Crash(vec![victim]));
    run_while(
        sim,
        "every observer declares the victim down",
        DETECT_LIMIT,
        |s| {
            s.detections()
                .get(index)
                .is_some_and(|d| d.downs.len() >= d.observers)
        },
    )?;
    let d = &sim.detections()[index];
    let times = d
        .downs
        .iter()
        .map(|t| secs(t.saturating_sub(d.crashed_at)))
        .collect();
    let now = sim.now();
    sim.schedule(now, Action::Start(victim));
    sim.run_until_agreed("rejoin", now + REJOIN_LIMIT, nodes)
        .context("the restarted node was not seen right everywhere")?;
    settle(sim);
    Ok(sorted(times))
}

fn change(sim: &mut Sim, owner: usize) -> anyhow::Result<Vec<f64>> {
    let index = sim.catalogs().spreads().len();
    let at = soon(sim);
    sim.schedule(at, Action::Publish(owner));
    run_while(
        sim,
        "a catalog change reaches every node",
        SPREAD_LIMIT,
        |s| {
            s.catalogs()
                .spreads()
                .get(index)
                .is_some_and(|c| c.fetches.len() >= c.population)
        },
    )?;
    let c = &sim.catalogs().spreads()[index];
    let times = c
        .fetches
        .iter()
        .map(|t| secs(t.saturating_sub(c.published_at)))
        .collect();
    settle(sim);
    Ok(sorted(times))
}

/// Returns (seconds to full agreement, seconds to membership agreement)
/// after the heal.
fn partition(sim: &mut Sim, opts: &Options) -> anyhow::Result<(f64, f64)> {
    let all: Vec<usize> = (0..opts.nodes).collect();
    let order = pick(sim, &all, opts.nodes);
    let half = opts.nodes / 2;
    let mut groups = vec![0u8; opts.nodes];
    for &x in &order[half..] {
        groups[x] = 1;
    }
    let split_at = soon(sim);
    let heal_at = split_at + opts.split;
    sim.schedule(split_at, Action::Split(groups));
    for q in 1..=3u32 {
        for side in [&order[..half], &order[half..]] {
            let i = sim.rng().random_range(0..side.len());
            sim.schedule(split_at + opts.split * q / 4, Action::Publish(side[i]));
        }
    }
    sim.schedule(heal_at, Action::Heal);
    sim.run_until("partition", heal_at);
    let agreed = sim
        .run_until_agreed("heal", heal_at + opts.settle_limit, opts.nodes)
        .with_context(|| format!("no agreement within {:?} of the heal", opts.settle_limit))?;
    let members = sim
        .agreed_since(heal_at, false)
        .context("membership agreed after everything agreed")?;
    settle(sim);
    Ok((
        secs(agreed.saturating_sub(heal_at)),
        secs(members.saturating_sub(heal_at)),
    ))
}

/// Forms the cluster, then runs `repeat` kills, `repeat` catalog changes
/// and `partitions` partitions (see the module docs).
pub fn run(opts: &Options, repeat: usize, partitions: usize) -> anyhow::Result<Comparison> {
    opts.validate()?;
    anyhow::ensure!(opts.nodes >= 2 * 2, "compare needs at least 4 nodes");
    let loss = opts.loss.unwrap_or(0.0);
    let mut sim = new_sim(opts, loss, None)?;
    form(&mut sim, opts, opts.form_limit)
        .joined
        .with_context(|| format!("the cluster did not form within {:?}", opts.form_limit))?;
    settle(&mut sim);
    let mut samples = Samples::default();
    let non_seeds: Vec<usize> = (SEEDS..opts.nodes).collect();
    for _ in 0..repeat {
        let victim = pick(&mut sim, &non_seeds, 1)[0];
        samples.kills.push(kill(&mut sim, victim, opts.nodes)?);
    }
    for _ in 0..repeat {
        let owner = sim.rng().random_range(0..opts.nodes);
        samples.changes.push(change(&mut sim, owner)?);
    }
    for _ in 0..partitions {
        let (all, members) = partition(&mut sim, opts)?;
        samples.heals.push(all);
        samples.heals_membership.push(members);
    }
    let figures = samples.figures();
    Ok(Comparison {
        nodes: opts.nodes,
        seed: opts.seed,
        latency_ms: opts.latency.as_secs_f64() * 1000.0,
        loss,
        split_s: opts.split.as_secs_f64(),
        samples,
        figures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_use_nearest_rank_medians_and_means_over_experiments() {
        let s = Samples {
            kills: vec![vec![1.0, 2.0, 3.0], vec![3.0, 4.0, 5.0, 9.0]],
            changes: vec![vec![0.2, 0.4], vec![0.1, 0.3, 0.5, 0.6]],
            heals: vec![4.0, 6.0],
            heals_membership: vec![3.0, 5.0],
        };
        let f = s.figures();
        assert_eq!(f.down_median_s, Some(3.0)); // (2 + 4) / 2
        assert_eq!(f.down_last_s, Some(6.0)); // (3 + 9) / 2
        assert_eq!(f.down_worst_s, Some(9.0));
        assert_eq!(f.change_half_s, Some(0.25)); // (0.2 + 0.3) / 2
        assert_eq!(f.change_all_s, Some(0.5)); // (0.4 + 0.6) / 2
        assert_eq!(f.heal_s, Some(5.0));
        assert_eq!(f.heal_median_s, Some(4.0));
        assert_eq!(f.heal_worst_s, Some(6.0));
        assert_eq!(f.heal_membership_s, Some(4.0));
    }
}
