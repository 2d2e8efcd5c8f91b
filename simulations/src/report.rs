//! What a run measured, as data (serialised to `summary.json`) and as the
//! summary table printed on stdout.

use std::fmt::Write as _;
use std::time::Duration;

use gossamer_membership::SwimConfig;
use serde::Serialize;

use crate::catalog::SPREAD_FRACTIONS;
use crate::metrics::{Counters, DETECTION_FRACTIONS, Sample, mean};
use crate::sim::{Sim, name};

/// Seconds, rounded to the millisecond (so the JSON reads cleanly).
pub fn secs(d: Duration) -> f64 {
    (d.as_nanos() / 1_000_000) as f64 / 1000.0
}

fn opt_secs(d: Option<Duration>) -> Option<f64> {
    d.map(secs)
}

/// Rounds to 3 decimals.
fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The parameters of a whole invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Params {
    /// Scenario name.
    pub scenario: String,
    /// Nodes simulated.
    pub nodes: usize,
    /// Seed.
    pub seed: u64,
    /// Datagram loss probability (the loss scenario sweeps its own).
    pub loss: f64,
    /// Mean one-way latency, milliseconds.
    pub latency_ms: f64,
    /// Length of the measured phase, seconds of virtual time.
    pub duration_s: f64,
    /// SWIM timing used by every node.
    pub swim: SwimConfig,
}

/// The whole output of one invocation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Parameters.
    pub params: Params,
    /// One run per loss level for `loss`, one run otherwise.
    pub runs: Vec<RunReport>,
}

/// Time to agreement from a reference point.
#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    /// What the times are measured from.
    pub reference: String,
    /// When that was (virtual seconds).
    pub reference_s: f64,
    /// Seconds from the reference until every running node saw exactly
    /// the running nodes.
    pub membership_after_s: Option<f64>,
    /// Seconds from the reference until membership and catalogs agreed
    /// everywhere.
    pub full_after_s: Option<f64>,
    /// Wrong (observer, member) pairs just before the disturbance (left
    /// over from forming), for scenarios with one.
    pub wrong_pairs_before: Option<u64>,
    /// Seconds from the reference until membership was back to that many
    /// wrong pairs (or fewer) and catalogs agreed (100 ms resolution).
    pub back_to_before_after_s: Option<f64>,
    /// Whether everything agreed at the end of the run.
    pub agreed_at_end: bool,
    /// Running nodes with a wrong membership view at the end.
    pub wrong_views_at_end: usize,
    /// Running nodes with an outdated catalog at the end.
    pub outdated_catalogs_at_end: usize,
    /// Up to 10 wrong (observer, member) pairs at the end, as
    /// `"n10 holds n7 as #0, runs #2"` (`#0`: not active / not running).
    pub wrong_pairs_at_end: Vec<String>,
    /// Running nodes whose own member table (`Membership::members`)
    /// differs from the view the simulator derived from events; 0 confirms
    /// the agreement figures.
    pub members_check_mismatches: usize,
}

/// One crashed node.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionRow {
    /// Its name.
    pub victim: String,
    /// When it crashed.
    pub crashed_s: f64,
    /// Running nodes that held it active when it crashed.
    pub observers: usize,
    /// Seconds from the crash to the first datagram carrying a suspicion.
    pub first_suspicion_s: Option<f64>,
    /// Seconds until 50 % of observers declared it down.
    pub down_p50_s: Option<f64>,
    /// Seconds until 99 %.
    pub down_p99_s: Option<f64>,
    /// Seconds until all.
    pub down_p100_s: Option<f64>,
}

/// Means (and worst cases) over the crashed nodes.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionSummary {
    /// Crashed nodes.
    pub victims: usize,
    /// Mean seconds to first suspicion.
    pub first_suspicion_mean_s: Option<f64>,
    /// That, in probe periods (SWIM's expectation is about 1.58).
    pub first_suspicion_probe_periods: Option<f64>,
    /// Worst seconds to first suspicion.
    pub first_suspicion_max_s: Option<f64>,
    /// Mean seconds to down at 50 / 99 / 100 % of observers.
    pub down_mean_s: [Option<f64>; 3],
    /// Worst seconds to down at 50 / 99 / 100 % of observers.
    pub down_max_s: [Option<f64>; 3],
}

/// One catalog change.
#[derive(Debug, Clone, Serialize)]
pub struct SpreadRow {
    /// The owner's name.
    pub owner: String,
    /// The version published.
    pub version: u64,
    /// When.
    pub published_s: f64,
    /// Nodes that should get it.
    pub population: usize,
    /// Seconds until 50 / 99 / 99.9 / 100 % received the notice.
    pub notice_s: [Option<f64>; 4],
    /// Seconds until 50 / 99 / 99.9 / 100 % held the entry (notice, then
    /// one fetch round trip to the owner).
    pub fetched_s: [Option<f64>; 4],
}

/// Means and worst cases over the catalog changes of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SpreadSummary {
    /// Changes published.
    pub changes: usize,
    /// Mean seconds until 50 / 99 / 99.9 / 100 % had the notice (over the
    /// changes that reached that fraction).
    pub notice_mean_s: [Option<f64>; 4],
    /// Worst seconds, same fractions.
    pub notice_max_s: [Option<f64>; 4],
    /// Mean seconds until 50 / 99 / 99.9 / 100 % held the entry.
    pub fetched_mean_s: [Option<f64>; 4],
    /// Worst seconds, same fractions.
    pub fetched_max_s: [Option<f64>; 4],
    /// Changes that never reached everyone in the run.
    pub incomplete: usize,
    /// Mean time to 99.9 % of nodes having the notice, in gossip intervals.
    pub notice_p999_rounds: Option<f64>,
}

/// Failure-detector accuracy.
#[derive(Debug, Clone, Serialize)]
pub struct Failures {
    /// `down` events about running, reachable nodes.
    pub false_downs: u64,
    /// Those whose subject was a slow node.
    pub false_downs_of_slow_nodes: u64,
    /// Those whose subject was a healthy node.
    pub false_downs_of_healthy_nodes: u64,
    /// Running node-hours in the measured phase.
    pub node_hours: f64,
    /// False downs per node-hour.
    pub false_downs_per_node_hour: f64,
    /// `down` events between partitioned nodes (expected).
    pub partition_downs: u64,
    /// Suspicions of running nodes (each suspected incarnation once),
    /// partitions aside.
    pub false_suspicions: u64,
    /// Those whose subject was a slow node.
    pub false_suspicions_of_slow_nodes: u64,
    /// False suspicions per node-hour.
    pub false_suspicions_per_node_hour: f64,
    /// Suspicions of processes that were gone.
    pub true_suspicions: u64,
    /// Suspicions caused by a partition (not counted as false).
    pub partition_suspicions: u64,
    /// `down` events about nodes that were really gone.
    pub true_downs: u64,
    /// `left` events seen by observers.
    pub left_events: u64,
    /// `down` events about nodes that had left gracefully.
    pub downs_after_leave: u64,
    /// Identity renewals (the node learned or was told it was down).
    pub rejoins: u64,
    /// Renewals of nodes nobody had declared down (a refuted suspicion
    /// still ends in `TurnUndead` with foca 2.0).
    pub rejoins_without_down: u64,
    /// Process starts in the phase.
    pub starts: u64,
    /// Crashes.
    pub crashes: u64,
    /// Graceful leaves.
    pub leaves: u64,
    /// Stalls.
    pub stalls: u64,
}

/// Traffic of one phase.
#[derive(Debug, Clone, Serialize)]
pub struct Traffic {
    /// Phase length, seconds.
    pub seconds: f64,
    /// SWIM datagrams sent per running node per second.
    pub datagrams_per_node_s: f64,
    /// SWIM bytes sent per running node per second.
    pub bytes_per_node_s: f64,
    /// Stream messages (catalog fetches, answers, digests, member syncs)
    /// per node per second.
    pub stream_messages_per_node_s: f64,
    /// Member sync payload bytes sent per node per second.
    pub sync_bytes_per_node_s: f64,
    /// Datagrams lost to random loss.
    pub lost: u64,
    /// Datagrams dropped by a partition.
    pub cut: u64,
}

impl Traffic {
    fn of(c: &Counters, seconds: f64) -> Self {
        let ns = c.node_seconds();
        let per = |x: u64| if ns > 0.0 { r3(x as f64 / ns) } else { 0.0 };
        Self {
            seconds: r3(seconds),
            datagrams_per_node_s: per(c.datagrams),
            bytes_per_node_s: per(c.bytes),
            stream_messages_per_node_s: per(c.stream_messages),
            sync_bytes_per_node_s: per(c.sync_bytes),
            lost: c.lost,
            cut: c.cut,
        }
    }
}

/// A labelled instant for the plots (crash, split, heal...).
#[derive(Debug, Clone, Serialize)]
pub struct Marker {
    /// Virtual seconds.
    pub at_s: f64,
    /// What happened.
    pub label: String,
}

/// How the cluster formed, from the time series (100 ms resolution).
#[derive(Debug, Clone, Serialize)]
pub struct Formation {
    /// When every node had started.
    pub last_start_s: f64,
    /// First sample with every node running and 50 % of them holding a
    /// complete, correct view.
    pub nodes_right_50_s: Option<f64>,
    /// Same, 99 % of the nodes.
    pub nodes_right_99_s: Option<f64>,
    /// First sample with 99.9 % of (observer, member) pairs right.
    pub pairs_right_999_s: Option<f64>,
    /// Share of (observer, member) pairs right when forming ended.
    pub pairs_right_after_forming: f64,
}

/// Everything one simulated run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The run's name (the scenario, or the loss level).
    pub label: String,
    /// Datagram loss in this run.
    pub loss: f64,
    /// Nodes in this run.
    pub nodes: usize,
    /// When every node first agreed on membership after the cluster was
    /// started (virtual seconds), if it did.
    pub joined_s: Option<f64>,
    /// Milestones of the cluster forming.
    pub formation: Formation,
    /// Start of the measured phase.
    pub phase_start_s: f64,
    /// End of the run.
    pub end_s: f64,
    /// Agreement after the scenario's disturbance.
    pub convergence: Convergence,
    /// Crash detection, per crashed node.
    pub detection: Vec<DetectionRow>,
    /// Crash detection, summarised.
    pub detection_summary: Option<DetectionSummary>,
    /// Failure-detector accuracy in the measured phase.
    pub failures: Failures,
    /// Every catalog change.
    pub dissemination: Vec<SpreadRow>,
    /// Catalog changes, summarised.
    pub dissemination_summary: Option<SpreadSummary>,
    /// Traffic while the cluster formed.
    pub traffic_join: Traffic,
    /// Traffic in the measured phase.
    pub traffic_phase: Traffic,
    /// Instants worth marking on plots.
    pub markers: Vec<Marker>,
    /// The time series (written to CSV, not to the JSON).
    #[serde(skip)]
    pub samples: Vec<Sample>,
    /// Arrival offsets (seconds after publish) of each change's notices,
    /// with the population, for the dissemination plot.
    #[serde(skip)]
    pub spread_curves: Vec<(String, Vec<f64>, usize)>,
    /// Down offsets (seconds after the crash) per victim, with the
    /// observer count, for the detection plot.
    #[serde(skip)]
    pub detection_curves: Vec<(String, Vec<f64>, usize)>,
}

/// Phase boundaries and counters a scenario hands to [`RunReport::build`].
#[derive(Debug, Clone)]
pub struct Phases {
    /// The run's name.
    pub label: String,
    /// Loss in this run.
    pub loss: f64,
    /// When the cluster first agreed after start.
    pub joined: Option<Duration>,
    /// When the last node started.
    pub last_start: Duration,
    /// Share of (observer, member) pairs right when forming ended.
    pub pairs_right_after_forming: f64,
    /// Counters when forming ended (agreement or the limit).
    pub at_formed: Counters,
    /// When forming ended.
    pub formed_at: Duration,
    /// Counters at the start of the measured phase.
    pub at_phase_start: Counters,
    /// When the measured phase started.
    pub phase_start: Duration,
    /// What convergence is measured from.
    pub reference: (String, Duration),
    /// When the scenario's disturbance began, if it has one (the baseline
    /// is the last sample before it).
    pub disturbed_at: Option<Duration>,
    /// Instants to mark on plots.
    pub markers: Vec<(Duration, String)>,
    /// Whether catalog changes spread through a connected cluster (so
    /// their times say something about gossip rounds).
    pub connected_spread: bool,
}

fn summarize_fractions(rows: &[[Option<f64>; 4]]) -> ([Option<f64>; 4], [Option<f64>; 4]) {
    let mut means = [None; 4];
    let mut maxes = [None; 4];
    for i in 0..4 {
        let v: Vec<f64> = rows.iter().filter_map(|r| r[i]).collect();
        means[i] = mean(&v).map(r3);
        maxes[i] = v.iter().copied().reduce(f64::max);
    }
    (means, maxes)
}

fn pairs_right(s: &Sample) -> f64 {
    let pairs = s.live as f64 * (s.live.saturating_sub(1)) as f64;
    if pairs == 0.0 {
        1.0
    } else {
        1.0 - s.membership_mismatch as f64 / pairs
    }
}

fn formation(samples: &[Sample], nodes: usize, phases: &Phases) -> Formation {
    let (last_start, phase) = (phases.last_start, phases.formed_at);
    let forming: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at <= phase && s.live == nodes)
        .collect();
    // Forming can end between two samples; if it ended with every view
    // right, that instant meets every threshold not met by a sample before.
    let all_right = phases.pairs_right_after_forming >= 1.0;
    let first = |ok: &dyn Fn(&Sample) -> bool| {
        forming
            .iter()
            .find(|s| ok(s))
            .map(|s| secs(s.at))
            .or_else(|| all_right.then(|| secs(phase)))
    };
    Formation {
        last_start_s: secs(last_start),
        nodes_right_50_s: first(&|s| s.view_ok * 2 >= s.live),
        nodes_right_99_s: first(&|s| s.view_ok * 100 >= s.live * 99),
        pairs_right_999_s: first(&|s| pairs_right(s) >= 0.999),
        pairs_right_after_forming: (phases.pairs_right_after_forming * 1e6).round() / 1e6,
    }
}

impl RunReport {
    /// Collects the figures of a finished simulation.
    pub fn build(sim: &mut Sim, phases: Phases) -> Self {
        let now = sim.now();
        let counters = sim.counters();
        let phase = counters.since(&phases.at_phase_start);
        let join = phases.at_formed;
        let swim = sim.config().swim.clone();

        let formation = formation(sim.samples(), sim.config().nodes, &phases);
        let (reference, reference_at) = phases.reference.clone();
        let membership = sim.agreed_since(reference_at, false);
        let full = sim.agreed_since(reference_at, true);
        let samples = sim.samples();
        let wrong_pairs_before = phases.disturbed_at.and_then(|at| {
            samples
                .iter()
                .rev()
                .find(|s| s.at < at)
                .map(|s| s.membership_mismatch)
        });
        let back_to_before = wrong_pairs_before.and_then(|before| {
            samples
                .iter()
                .find(|s| {
                    s.at >= reference_at
                        && s.membership_mismatch <= before
                        && s.catalog_mismatch == 0
                })
                .map(|s| secs(s.at - reference_at))
        });
        let views = sim.views();
        let catalogs = sim.catalogs();
        let convergence = Convergence {
            wrong_pairs_before,
            back_to_before_after_s: back_to_before,
            reference,
            reference_s: secs(reference_at),
            membership_after_s: opt_secs(membership.map(|t| t - reference_at)),
            full_after_s: opt_secs(full.map(|t| t - reference_at)),
            agreed_at_end: views.agreed() && catalogs.agreed(),
            wrong_views_at_end: views.live() - views.agreeing(),
            outdated_catalogs_at_end: views.live() - catalogs.agreeing(),
            wrong_pairs_at_end: views
                .wrong_pairs(10)
                .into_iter()
                .map(|(x, y, b, t)| format!("{} holds {} as #{b}, runs #{t}", name(x), name(y)))
                .collect(),
            members_check_mismatches: sim.verify_views(),
        };

        let detection: Vec<DetectionRow> = sim
            .detections()
            .iter()
            .map(|d| DetectionRow {
                victim: name(d.victim),
                crashed_s: secs(d.crashed_at),
                observers: d.observers,
                first_suspicion_s: opt_secs(d.suspicion_after()),
                down_p50_s: opt_secs(d.time_to(DETECTION_FRACTIONS[0])),
                down_p99_s: opt_secs(d.time_to(DETECTION_FRACTIONS[1])),
                down_p100_s: opt_secs(d.time_to(DETECTION_FRACTIONS[2])),
            })
            .collect();
        let detection_summary = (!detection.is_empty()).then(|| {
            let sus: Vec<f64> = detection
                .iter()
                .filter_map(|d| d.first_suspicion_s)
                .collect();
            let downs: Vec<[Option<f64>; 4]> = detection
                .iter()
                .map(|d| [d.down_p50_s, d.down_p99_s, d.down_p100_s, None])
                .collect();
            let (m, x) = summarize_fractions(&downs);
            let sus_mean = mean(&sus).map(r3);
            DetectionSummary {
                victims: detection.len(),
                first_suspicion_mean_s: sus_mean,
                first_suspicion_probe_periods: sus_mean
                    .map(|s| r3(s / swim.probe_period.as_secs_f64())),
                first_suspicion_max_s: sus.iter().copied().reduce(f64::max),
                down_mean_s: [m[0], m[1], m[2]],
                down_max_s: [x[0], x[1], x[2]],
            }
        });
        let detection_curves = sim
            .detections()
            .iter()
            .map(|d| {
                let offsets = d
                    .downs
                    .iter()
                    .map(|t| secs(t.saturating_sub(d.crashed_at)))
                    .collect();
                (name(d.victim), offsets, d.observers)
            })
            .collect();

        let spreads = catalogs.spreads();
        let dissemination: Vec<SpreadRow> = spreads
            .iter()
            .map(|s| SpreadRow {
                owner: name(s.owner),
                version: s.version,
                published_s: secs(s.published_at),
                population: s.population,
                notice_s: SPREAD_FRACTIONS.map(|f| opt_secs(s.time_to(f, false))),
                fetched_s: SPREAD_FRACTIONS.map(|f| opt_secs(s.time_to(f, true))),
            })
            .collect();
        let dissemination_summary = (!dissemination.is_empty()).then(|| {
            let notices: Vec<_> = dissemination.iter().map(|r| r.notice_s).collect();
            let fetched: Vec<_> = dissemination.iter().map(|r| r.fetched_s).collect();
            let (notice_mean_s, notice_max_s) = summarize_fractions(&notices);
            let (fetched_mean_s, fetched_max_s) = summarize_fractions(&fetched);
            SpreadSummary {
                changes: dissemination.len(),
                notice_mean_s,
                notice_max_s,
                fetched_mean_s,
                fetched_max_s,
                incomplete: dissemination
                    .iter()
                    .filter(|r| r.fetched_s[3].is_none())
                    .count(),
                notice_p999_rounds: notice_mean_s[2]
                    .filter(|_| phases.connected_spread)
                    .map(|s| r3(s / swim.gossip_interval.as_secs_f64())),
            }
        });
        let spread_curves = spreads
            .iter()
            .map(|s| {
                let offsets = s
                    .notices
                    .iter()
                    .map(|t| secs(t.saturating_sub(s.published_at)))
                    .collect();
                (
                    format!("{} v{}", name(s.owner), s.version),
                    offsets,
                    s.population,
                )
            })
            .collect();

        let node_hours = phase.node_seconds() / 3600.0;
        let failures = Failures {
            false_downs: phase.false_downs,
            false_downs_of_slow_nodes: phase.false_downs_of_slow,
            false_downs_of_healthy_nodes: phase.false_downs - phase.false_downs_of_slow,
            node_hours: r3(node_hours),
            false_downs_per_node_hour: if node_hours > 0.0 {
                r3(phase.false_downs as f64 / node_hours)
            } else {
                0.0
            },
            partition_downs: phase.partition_downs,
            false_suspicions: phase.false_suspicions,
            false_suspicions_of_slow_nodes: phase.false_suspicions_of_slow,
            false_suspicions_per_node_hour: if node_hours > 0.0 {
                r3(phase.false_suspicions as f64 / node_hours)
            } else {
                0.0
            },
            true_suspicions: phase.true_suspicions,
            partition_suspicions: phase.partition_suspicions,
            true_downs: phase.true_downs,
            left_events: phase.lefts,
            downs_after_leave: phase.downs_after_leave,
            rejoins: phase.rejoins,
            rejoins_without_down: phase.rejoins_without_down,
            starts: phase.starts,
            crashes: phase.crashes,
            leaves: phase.leaves,
            stalls: phase.stalls,
        };

        Self {
            label: phases.label,
            loss: phases.loss,
            nodes: sim.config().nodes,
            joined_s: opt_secs(phases.joined),
            formation,
            phase_start_s: secs(phases.phase_start),
            end_s: secs(now),
            convergence,
            detection,
            detection_summary,
            failures,
            dissemination,
            dissemination_summary,
            traffic_join: Traffic::of(&join, secs(phases.formed_at)),
            traffic_phase: Traffic::of(&phase, secs(now - phases.phase_start)),
            markers: phases
                .markers
                .into_iter()
                .map(|(t, label)| Marker {
                    at_s: secs(t),
                    label,
                })
                .collect(),
            samples: sim.samples().to_vec(),
            spread_curves,
            detection_curves,
        }
    }

    /// The line saying whether and when the cluster converged.
    pub fn converged_line(&self) -> String {
        let c = &self.convergence;
        match c.full_after_s {
            Some(after) => format!(
                "converged: yes, at t={:.3} s, {:.3} s after {} (membership after {}){}",
                c.reference_s + after,
                after,
                c.reference,
                fmt_s(c.membership_after_s),
                if c.agreed_at_end {
                    ""
                } else {
                    "; disagreement again at the end of the run"
                }
            ),
            None => {
                let mut line = format!(
                    "converged: NO, not within {:.3} s after {} ({} nodes with a wrong membership view, {} with an outdated catalog at t={:.3} s)",
                    self.end_s - c.reference_s,
                    c.reference,
                    c.wrong_views_at_end,
                    c.outdated_catalogs_at_end,
                    self.end_s
                );
                if let (Some(before), Some(after)) =
                    (c.wrong_pairs_before, c.back_to_before_after_s)
                {
                    let _ = write!(
                        line,
                        "; back to the {before} wrong pairs left from forming {after:.1} s after {}",
                        c.reference
                    );
                }
                line
            }
        }
    }
}

fn fmt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "never".to_owned(), |s| format!("{s:.3} s"))
}

fn fmt_at(v: Option<f64>) -> String {
    v.map_or_else(|| "never".to_owned(), |s| format!("at {s:.1} s"))
}

fn fmt_fracs(v: &[Option<f64>]) -> String {
    v.iter()
        .map(|x| x.map_or_else(|| "-".to_owned(), |s| format!("{s:.3}")))
        .collect::<Vec<_>>()
        .join(" / ")
}

impl Report {
    /// The summary table for stdout. Contains nothing that depends on the
    /// wall clock.
    pub fn render(&self) -> String {
        let p = &self.params;
        let s = &p.swim;
        let mut out = String::new();
        let loss = if self.runs.len() > 1 {
            "loss swept".to_owned()
        } else {
            format!("loss {:.1} %", p.loss * 100.0)
        };
        let _ = writeln!(
            out,
            "gossamer-sim {}: {} nodes, seed {}, {loss}, latency {:.1} ms, phase {} s",
            p.scenario, p.nodes, p.seed, p.latency_ms, p.duration_s
        );
        let _ = writeln!(
            out,
            "SWIM: probe every {:?} (rtt {:?}, {} indirect, late-ack grace {:?}, health score up to {}), suspect->down {:?} at {} nodes, gossip every {:?} to {}, {} transmissions per update at {} nodes, {} B packets",
            s.probe_period,
            s.probe_rtt,
            s.indirect_probes,
            s.late_ack_grace,
            s.max_health_score,
            s.suspicion_timeout_for(p.nodes),
            p.nodes,
            s.gossip_interval,
            s.gossip_fanout,
            s.transmissions_for(p.nodes),
            p.nodes,
            s.max_packet_size
        );
        if self.runs.len() > 1 {
            self.render_sweep(&mut out);
        }
        for run in &self.runs {
            run.render(&mut out);
        }
        out
    }

    fn render_sweep(&self, out: &mut String) {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<10} {:>9} {:>6} {:>9} {:>9} {:>9} {:>13} {:>12} {:>9}",
            "run",
            "joined s",
            "downs",
            "downs/nh",
            "suspects",
            "renewals",
            "notice 99.9%",
            "datagrams/s",
            "bytes/s"
        );
        for r in &self.runs {
            let _ = writeln!(
                out,
                "{:<10} {:>9} {:>6} {:>9.3} {:>9} {:>9} {:>13} {:>12.2} {:>9.1}",
                r.label,
                r.joined_s
                    .map_or_else(|| "never".to_owned(), |s| format!("{s:.3}")),
                r.failures.false_downs,
                r.failures.false_downs_per_node_hour,
                r.failures.false_suspicions,
                r.failures.rejoins,
                r.dissemination_summary
                    .as_ref()
                    .and_then(|d| d.notice_mean_s[2])
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:.3}")),
                r.traffic_phase.datagrams_per_node_s,
                r.traffic_phase.bytes_per_node_s
            );
        }
    }
}

impl RunReport {
    fn render(&self, out: &mut String) {
        let row = |out: &mut String, k: &str, v: String| {
            let _ = writeln!(out, "  {k:<44} {v}");
        };
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "run {} ({} nodes, loss {:.1} %)",
            self.label,
            self.nodes,
            self.loss * 100.0
        );
        row(
            out,
            "cluster formed (all views right)",
            self.joined_s.map_or_else(
                || "not within the run".to_owned(),
                |s| format!("at {s:.3} s"),
            ),
        );
        let fm = &self.formation;
        row(
            out,
            "views right at 50 % / 99 % of nodes",
            format!(
                "{} / {} (last start at {:.3} s)",
                fmt_at(fm.nodes_right_50_s),
                fmt_at(fm.nodes_right_99_s),
                fm.last_start_s
            ),
        );
        row(
            out,
            "99.9 % of (observer, member) pairs right",
            format!(
                "{}; {:.4} % right when forming ended",
                fmt_at(fm.pairs_right_999_s),
                fm.pairs_right_after_forming * 100.0
            ),
        );
        row(
            out,
            "measured phase",
            format!("{:.3} s -> {:.3} s", self.phase_start_s, self.end_s),
        );
        for m in &self.markers {
            row(
                out,
                &format!("event: {}", m.label),
                format!("at {:.3} s", m.at_s),
            );
        }
        if let Some(d) = &self.detection_summary {
            row(
                out,
                &format!("first suspicion, mean / max ({} crashed)", d.victims),
                format!(
                    "{} / {}  ({} probe periods)",
                    fmt_s(d.first_suspicion_mean_s),
                    fmt_s(d.first_suspicion_max_s),
                    d.first_suspicion_probe_periods
                        .map_or_else(|| "-".to_owned(), |p| format!("{p:.2}"))
                ),
            );
            row(
                out,
                "down at 50/99/100 % of observers, mean (s)",
                fmt_fracs(&d.down_mean_s),
            );
            row(
                out,
                "down at 50/99/100 % of observers, max (s)",
                fmt_fracs(&d.down_max_s),
            );
        }
        let f = &self.failures;
        row(
            out,
            "false downs (healthy / slow subjects)",
            format!(
                "{} ({} / {}), {:.3} per node-hour over {:.3} node-hours",
                f.false_downs,
                f.false_downs_of_healthy_nodes,
                f.false_downs_of_slow_nodes,
                f.false_downs_per_node_hour,
                f.node_hours
            ),
        );
        row(
            out,
            "false suspicions (of slow nodes)",
            format!(
                "{} ({}), {:.3} per node-hour",
                f.false_suspicions,
                f.false_suspicions_of_slow_nodes,
                f.false_suspicions_per_node_hour
            ),
        );
        row(
            out,
            "downs: of gone identities / from partition",
            format!("{} / {}", f.true_downs, f.partition_downs),
        );
        if f.partition_suspicions > 0 {
            row(
                out,
                "suspicions from partition",
                f.partition_suspicions.to_string(),
            );
        }
        if f.leaves > 0 {
            row(
                out,
                "graceful leaves seen as left / as down",
                format!("{} / {}", f.left_events, f.downs_after_leave),
            );
        }
        row(
            out,
            "starts / crashes / leaves / stalls",
            format!("{} / {} / {} / {}", f.starts, f.crashes, f.leaves, f.stalls),
        );
        row(
            out,
            "identity renewals (never declared down)",
            format!("{} ({})", f.rejoins, f.rejoins_without_down),
        );
        if let Some(d) = &self.dissemination_summary {
            row(
                out,
                &format!("notice at 50/99/99.9/100 %, mean of {} (s)", d.changes),
                fmt_fracs(&d.notice_mean_s),
            );
            row(
                out,
                "notice at 50/99/99.9/100 %, max (s)",
                fmt_fracs(&d.notice_max_s),
            );
            row(
                out,
                "entry fetched at 50/99/99.9/100 %, mean (s)",
                fmt_fracs(&d.fetched_mean_s),
            );
            row(
                out,
                "entry fetched at 50/99/99.9/100 %, max (s)",
                fmt_fracs(&d.fetched_max_s),
            );
            row(
                out,
                "notice at 99.9 %, in gossip rounds",
                d.notice_p999_rounds
                    .map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
            );
            if d.incomplete > 0 {
                row(
                    out,
                    "changes not held by everyone at the end",
                    d.incomplete.to_string(),
                );
            }
        }
        for (name, t) in [("join", &self.traffic_join), ("phase", &self.traffic_phase)] {
            row(
                out,
                &format!("traffic per node per second ({name})"),
                format!(
                    "{:.2} datagrams, {:.1} B, {:.3} stream msgs, {:.1} B member sync",
                    t.datagrams_per_node_s,
                    t.bytes_per_node_s,
                    t.stream_messages_per_node_s,
                    t.sync_bytes_per_node_s
                ),
            );
        }
        row(
            out,
            "views checked against members()",
            format!(
                "{} node(s) differ",
                self.convergence.members_check_mismatches
            ),
        );
        let _ = writeln!(out, "  {}", self.converged_line());
    }
}
