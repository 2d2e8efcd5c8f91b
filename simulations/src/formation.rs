//! `formation`: N agents started back to back on one machine, as
//! `bench/scale.py` starts real ones, with the CPU and connection models
//! on: how long after the last start until every node lists every other
//! alive, how many handshakes that took, and whether it got there at all.
//!
//! Node `i` starts at `i / rate` seconds (the seeds `n0`..`n2` first).
//! The run stops when every running node lists every other alive, or
//! `limit` after the last start (then the cluster did not converge: the
//! collapse real agents showed, CPU spent on handshakes and on probes
//! answered too late, false downs, renewed identities and new dials). If
//! it formed, the cluster runs `idle` seconds more to measure the CPU a
//! formed, quiet cluster uses.

use std::fmt::Write as _;
use std::time::Duration;

use gossamer_membership::SwimConfig;
use serde::Serialize;

use crate::cpu::Costs;
use crate::net::NetParams;
use crate::scenario::SEEDS;
use crate::sim::{Action, HostConfig, Sim, SimConfig};

/// What to run.
#[derive(Debug, Clone)]
pub struct FormationOptions {
    /// Nodes.
    pub nodes: usize,
    /// Seed of every random choice.
    pub seed: u64,
    /// Mean one-way latency (loopback: ~0.1 ms).
    pub latency: Duration,
    /// Starts per second.
    pub rate: f64,
    /// SWIM timing.
    pub swim: SwimConfig,
    /// Machines, cores, costs and link policy.
    pub host: HostConfig,
    /// Give up this long after the last start.
    pub limit: Duration,
    /// After forming, wait this long before the quiet window (as
    /// `bench/scale.py --settle` does).
    pub settle: Duration,
    /// After forming and settling, measure a quiet cluster for this long.
    pub idle: Duration,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// What happened.
#[derive(Debug, Clone, Serialize)]
pub struct FormationReport {
    /// Nodes.
    pub nodes: usize,
    /// Machines they ran on.
    pub machines: usize,
    /// Cores per machine.
    pub cores: u32,
    /// Starts per second.
    pub rate_per_s: f64,
    /// The seed.
    pub seed: u64,
    /// The CPU costs used.
    pub costs: Costs,
    /// When the last node started.
    pub last_start_s: f64,
    /// Whether every node listed every other alive within the limit.
    pub converged: bool,
    /// How long after the last start that happened (every node lists
    /// every other alive, none suspect).
    pub formed_after_last_start_s: Option<f64>,
    /// When every node first held every other active (alive or suspect),
    /// after the last start: formation as figures before `suspect` was
    /// told apart were taken.
    pub active_after_last_start_s: Option<f64>,
    /// When 99 % of the pairs `(x, y)` first agreed (`x` holds `y` active
    /// with its running generation), after the last start: the bulk of
    /// formation, without its slowest pairs.
    pub bulk_after_last_start_s: Option<f64>,
    /// Until formation (or the limit): handshakes per node, either side.
    pub handshakes_per_node: f64,
    /// Of which this node dialed.
    pub dialled_per_node: f64,
    /// Of which this node accepted.
    pub accepted_per_node: f64,
    /// Full handshakes per node (either side).
    pub full_per_node: f64,
    /// Resumed handshakes per node (either side).
    pub resumed_per_node: f64,
    /// The most handshakes any node took part in.
    pub max_handshakes: u64,
    /// Dials that timed out, all nodes.
    pub failed_dials: u64,
    /// Datagrams dropped while their link was being made.
    pub dial_drops: u64,
    /// Suspicions and downs of running nodes.
    pub false_suspicions: u64,
    /// Running nodes declared down.
    pub false_downs: u64,
    /// Identities renewed after being declared down.
    pub rejoins: u64,
    /// Share of the machines' cores busy from the first start to
    /// formation (or the limit).
    pub cpu_busy_share: f64,
    /// CPU seconds per node until formation.
    pub cpu_s_per_node: f64,
    /// CPU seconds of all nodes together until formation (what
    /// `bench/scale.py` reports as CPU to form).
    pub cpu_s_total: f64,
    /// Mean time an input waited for CPU, in milliseconds.
    pub mean_wait_ms: f64,
    /// The longest wait.
    pub max_wait_ms: f64,
    /// SWIM datagrams sent per node until formation.
    pub datagrams_per_node: f64,
    /// Links held at formation: mean per node.
    pub links_mean: f64,
    /// Most links any node held at once.
    pub links_peak: usize,
    /// CPU per node in the quiet window after formation, in percent of a
    /// core.
    pub idle_cpu_percent_per_node: Option<f64>,
    /// Handshakes per node in that window.
    pub idle_handshakes_per_node: Option<f64>,
    /// The same per minute.
    pub idle_handshakes_per_minute: Option<f64>,
    /// Handshakes per node from the start to the end of that window.
    pub handshakes_at_idle_end_per_node: Option<f64>,
    /// Links held at the end of that window: mean per node.
    pub idle_links_mean: Option<f64>,
}

/// The resolution of the formation figures.
const STEP: Duration = Duration::from_millis(50);

/// The share of pairs for the bulk of formation.
const BULK: f64 = 0.99;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// Runs the scenario.
pub fn run(opts: &FormationOptions) -> anyhow::Result<FormationReport> {
    anyhow::ensure!(
        opts.nodes > SEEDS,
        "need more than {SEEDS} nodes (the seeds)"
    );
    anyhow::ensure!(
        opts.rate.is_finite() && opts.rate > 0.0,
        "--rate must be a positive number of starts per second"
    );
    let n = opts.nodes;
    let mut sim = Sim::new(SimConfig {
        nodes: n,
        seed: opts.seed,
        swim: opts.swim.clone(),
        net: NetParams {
            latency: opts.latency,
            loss: 0.0,
        },
        seeds: SEEDS,
        sample_every: Duration::from_secs(1),
        anti_entropy_every: Duration::from_secs(5),
        host: Some(opts.host.clone()),
    })?;
    if opts.progress {
        sim.show_progress();
    }
    let start_at = |i: usize| Duration::from_secs_f64(i as f64 / opts.rate);
    for i in 0..n {
        sim.schedule(start_at(i), Action::Start(i));
    }
    let last_start = start_at(n - 1);
    let end = last_start + opts.limit;
    // As `bench/scale.py` estimates it: formed is the moment every node
    // lists every other running node alive, not suspect (the script takes
    // the middle of its poll bracket; here it is looked for every 50 ms).
    // Also when 99 % of the pairs first agreed.
    let mut active_at = None;
    let mut bulk_at = None;
    let mut t = last_start;
    let formed = loop {
        sim.run_until("forming", t);
        let all = sim.views().live() >= n;
        if all && bulk_at.is_none() && sim.views().pairs_right() >= BULK {
            bulk_at = Some(t);
        }
        if all && sim.views().agreed() {
            active_at.get_or_insert(t);
            if sim.suspect_pairs() == 0 {
                break Some(t);
            }
        }
        if t >= end {
            break None;
        }
        t = (t + STEP).min(end);
    };
    let until = sim.now();
    let counters = sim.counters();
    let stats: Vec<_> = (0..n).filter_map(|x| sim.link_stats(x)).collect();
    let per_node = |f: &dyn Fn(&crate::conns::LinkStats) -> u64| {
        stats.iter().map(f).sum::<u64>() as f64 / n as f64
    };
    let machines = opts.host.machines;
    let cores = f64::from(opts.host.cores) * machines as f64;
    let busy = sim.busy_core_seconds();
    let cpu_total: f64 = (0..n).map(|x| secs(sim.cpu_used(x))).sum();
    let waits = sim.cpu_waits().unwrap_or_default();
    let links_mean = (0..n).map(|x| sim.links_open(x)).sum::<usize>() as f64 / n as f64;
    let mut report = FormationReport {
        nodes: n,
        machines,
        cores: opts.host.cores,
        rate_per_s: opts.rate,
        seed: opts.seed,
        costs: opts.host.costs,
        last_start_s: secs(last_start),
        converged: formed.is_some(),
        formed_after_last_start_s: formed.map(|t| secs(t.saturating_sub(last_start))),
        active_after_last_start_s: active_at.map(|t| secs(t.saturating_sub(last_start))),
        bulk_after_last_start_s: bulk_at.map(|t| secs(t.saturating_sub(last_start))),
        handshakes_per_node: per_node(&|s| s.handshakes()),
        dialled_per_node: per_node(&|s| s.dialled_full + s.dialled_resumed),
        accepted_per_node: per_node(&|s| s.accepted_full + s.accepted_resumed),
        full_per_node: per_node(&|s| s.dialled_full + s.accepted_full),
        resumed_per_node: per_node(&|s| s.dialled_resumed + s.accepted_resumed),
        max_handshakes: stats.iter().map(|s| s.handshakes()).max().unwrap_or(0),
        failed_dials: stats.iter().map(|s| s.failed).sum(),
        dial_drops: counters.dial_drops,
        false_suspicions: counters.false_suspicions,
        false_downs: counters.false_downs,
        rejoins: counters.rejoins,
        cpu_busy_share: if until.is_zero() {
            0.0
        } else {
            busy / (cores * secs(until))
        },
        cpu_s_per_node: cpu_total / n as f64,
        cpu_s_total: cpu_total,
        mean_wait_ms: if waits.jobs == 0 {
            0.0
        } else {
            secs(waits.total) * 1e3 / waits.jobs as f64
        },
        max_wait_ms: secs(waits.max) * 1e3,
        datagrams_per_node: counters.datagrams as f64 / n as f64,
        links_mean,
        links_peak: stats.iter().map(|s| s.peak_links).max().unwrap_or(0),
        idle_cpu_percent_per_node: None,
        idle_handshakes_per_node: None,
        idle_handshakes_per_minute: None,
        handshakes_at_idle_end_per_node: None,
        idle_links_mean: None,
    };
    if formed.is_some() && !opts.idle.is_zero() {
        let from = until + opts.settle;
        sim.run_until("settling", from);
        let before_cpu: f64 = (0..n).map(|x| secs(sim.cpu_used(x))).sum();
        let before_hs = (0..n)
            .filter_map(|x| sim.link_stats(x))
            .map(|s| s.handshakes())
            .sum::<u64>() as f64
            / n as f64;
        sim.run_until("quiet", from + opts.idle);
        let after_cpu: f64 = (0..n).map(|x| secs(sim.cpu_used(x))).sum();
        let after: Vec<_> = (0..n).filter_map(|x| sim.link_stats(x)).collect();
        let after_hs = after.iter().map(|s| s.handshakes()).sum::<u64>() as f64 / n as f64;
        report.idle_cpu_percent_per_node =
            Some((after_cpu - before_cpu) / n as f64 / secs(opts.idle) * 100.0);
        report.idle_handshakes_per_node = Some(after_hs - before_hs);
        report.idle_handshakes_per_minute = Some((after_hs - before_hs) * 60.0 / secs(opts.idle));
        report.handshakes_at_idle_end_per_node = Some(after_hs);
        report.idle_links_mean =
            Some((0..n).map(|x| sim.links_open(x)).sum::<usize>() as f64 / n as f64);
    }
    Ok(report)
}

impl FormationReport {
    /// The stdout summary.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "formation: {} nodes started at {:.0}/s on {} machine(s) of {} core(s), seed {}",
            self.nodes, self.rate_per_s, self.machines, self.cores, self.seed
        );
        let c = &self.costs;
        let _ = writeln!(
            s,
            "  costs (us): handshake full {:.0} resumed {:.0} per side, datagram send {:.1} recv {:.1}, \
             stream message {:.1}, sync member {:.1}, timer {:.1}; agent: start {:.0}, per input {:.1}, \
             per stream message {:.1}, background {:.0} + {:.1} per member per s",
            c.handshake_full_us,
            c.handshake_resumed_us,
            c.datagram_send_us,
            c.datagram_recv_us,
            c.stream_message_us,
            c.sync_member_us,
            c.timer_us,
            c.process_start_us,
            c.agent_input_us,
            c.agent_stream_us,
            c.background_us_per_s,
            c.member_us_per_s
        );
        let _ = writeln!(s, "  last start            {:>8.2} s", self.last_start_s);
        match self.formed_after_last_start_s {
            Some(t) => {
                let _ = writeln!(
                    s,
                    "  formed after it       {t:>8.2} s (converged; 99 % of pairs after {:.2} s, all active, suspects included, after {:.2} s)",
                    self.bulk_after_last_start_s.unwrap_or(t),
                    self.active_after_last_start_s.unwrap_or(t)
                );
            }
            None => {
                let _ = writeln!(s, "  formed after it            - (did NOT converge)");
            }
        }
        let _ = writeln!(
            s,
            "  handshakes per node   {:>8.1} ({:.1} dialed, {:.1} accepted; {:.1} full, {:.1} resumed; max {})",
            self.handshakes_per_node,
            self.dialled_per_node,
            self.accepted_per_node,
            self.full_per_node,
            self.resumed_per_node,
            self.max_handshakes
        );
        let _ = writeln!(
            s,
            "  failed dials          {:>8} (datagrams dropped while dialing: {})",
            self.failed_dials, self.dial_drops
        );
        let _ = writeln!(
            s,
            "  false suspicions      {:>8}   false downs {}   renewals {}",
            self.false_suspicions, self.false_downs, self.rejoins
        );
        let _ = writeln!(
            s,
            "  CPU busy              {:>8.1} % of the cores; {:.1} CPU s in all, {:.3} per node; input wait mean {:.1} ms, max {:.0} ms",
            self.cpu_busy_share * 100.0,
            self.cpu_s_total,
            self.cpu_s_per_node,
            self.mean_wait_ms,
            self.max_wait_ms
        );
        let _ = writeln!(
            s,
            "  datagrams per node    {:>8.0}   links per node {:.1} (peak {})",
            self.datagrams_per_node, self.links_mean, self.links_peak
        );
        if let (Some(cpu), Some(hs), Some(rate), Some(total), Some(links)) = (
            self.idle_cpu_percent_per_node,
            self.idle_handshakes_per_node,
            self.idle_handshakes_per_minute,
            self.handshakes_at_idle_end_per_node,
            self.idle_links_mean,
        ) {
            let _ = writeln!(
                s,
                "  quiet after forming   {cpu:>8.2} % CPU per node, {hs:.1} handshakes per node ({rate:.1} a minute; \
                 {total:.1} since the start), {links:.1} links per node"
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(nodes: usize, cores: u32) -> FormationOptions {
        FormationOptions {
            nodes,
            seed: 5,
            latency: Duration::from_micros(100),
            rate: 50.0,
            swim: SwimConfig::default(),
            host: HostConfig::new(1, cores),
            limit: Duration::from_secs(120),
            settle: Duration::from_secs(1),
            idle: Duration::from_secs(5),
            progress: false,
        }
    }

    #[test]
    fn a_small_cluster_forms_on_one_machine_and_counts_its_handshakes() {
        let r = run(&opts(12, 2)).unwrap();
        assert!(r.converged, "{}", r.render());
        // Every node dials or accepts at least the seeds.
        assert!(r.handshakes_per_node >= 2.0, "{}", r.render());
        assert!(r.full_per_node > 0.0);
        assert!(r.cpu_busy_share > 0.0 && r.cpu_busy_share < 1.0);
        assert!(r.idle_cpu_percent_per_node.unwrap() > 0.0);
        let again = run(&opts(12, 2)).unwrap();
        assert_eq!(r.render(), again.render(), "same seed, same run");
    }

    #[test]
    fn the_agents_own_costs_show_in_forming_and_when_quiet() {
        let mut bare = opts(12, 2);
        let c = &mut bare.host.costs;
        c.process_start_us = 0.0;
        c.agent_input_us = 0.0;
        c.agent_stream_us = 0.0;
        c.background_us_per_s = 0.0;
        c.member_us_per_s = 0.0;
        let bare = run(&bare).unwrap();
        let mut heavy = opts(12, 2);
        heavy.host.costs.process_start_us = 200_000.0;
        heavy.host.costs.background_us_per_s = 10_000.0;
        heavy.host.costs.member_us_per_s = 0.0;
        let heavy = run(&heavy).unwrap();
        assert!(heavy.converged, "{}", heavy.render());
        // Starting 12 processes at 0.2 CPU-s each on 2 cores takes 1.2 s,
        // more than the 0.22 s over which they are started.
        assert!(
            heavy.formed_after_last_start_s.unwrap()
                > bare.formed_after_last_start_s.unwrap() + 0.5,
            "{}\n{}",
            bare.render(),
            heavy.render()
        );
        assert!(heavy.cpu_s_total > bare.cpu_s_total + 12.0 * 0.2);
        // 10 ms a second is 1 % of a core, on top of the traffic.
        let quiet = heavy.idle_cpu_percent_per_node.unwrap();
        assert!((1.0..1.5).contains(&quiet), "{}", heavy.render());
        assert!(
            bare.idle_cpu_percent_per_node.unwrap() < 0.2,
            "{}",
            bare.render()
        );
    }

    #[test]
    fn expensive_handshakes_on_one_core_slow_forming_down() {
        let fast = run(&opts(12, 2)).unwrap();
        let mut slow = opts(12, 1);
        slow.host.costs.handshake_full_us = 50_000.0;
        slow.host.costs.handshake_resumed_us = 50_000.0;
        let slow = run(&slow).unwrap();
        assert!(slow.converged, "{}", slow.render());
        assert!(
            slow.formed_after_last_start_s.unwrap() > fast.formed_after_last_start_s.unwrap(),
            "{}\n{}",
            fast.render(),
            slow.render()
        );
        assert!(slow.mean_wait_ms > fast.mean_wait_ms);
    }
}
