//! Files written to `--out`: the JSON summary, CSV time series and tables,
//! and SVG plots. Everything here derives from the report alone, so the
//! same seed writes the same bytes.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::plot::{Chart, Series};
use crate::report::{Report, RunReport, secs};

/// Most individual curves drawn on one chart.
const MAX_CURVES: usize = 10;

/// Writes every output file into `dir` (created if needed) and returns
/// their paths, in a fixed order.
pub fn write_all(report: &Report, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut files: Vec<(&str, String)> = vec![
        ("summary.json", summary_json(report)?),
        ("timeseries.csv", timeseries_csv(report)),
        ("dissemination.csv", dissemination_csv(report)),
        ("convergence.svg", convergence_chart(report).to_svg()),
        ("dissemination.svg", dissemination_chart(report).to_svg()),
    ];
    if report.runs.iter().any(|r| !r.detection.is_empty()) {
        files.push(("detection.csv", detection_csv(report)));
        files.push(("detection.svg", detection_chart(report).to_svg()));
    }
    if report.runs.len() > 1 {
        files.push(("sweep.svg", sweep_chart(report).to_svg()));
        files.push((
            "sweep-dissemination.svg",
            sweep_spread_chart(report).to_svg(),
        ));
    }
    let mut paths = Vec::new();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::write(&path, body).with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    Ok(paths)
}

/// The JSON summary (pretty-printed, newline-terminated).
pub fn summary_json(report: &Report) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(report)?;
    s.push('\n');
    Ok(s)
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |x| format!("{x:.3}"))
}

/// One row per sample and run.
pub fn timeseries_csv(report: &Report) -> String {
    let mut out = String::from(
        "run,time_s,live,view_ok_pct,catalog_ok_pct,membership_mismatch,catalog_mismatch,datagrams_per_node_s,bytes_per_node_s,false_downs,stalled\n",
    );
    for run in &report.runs {
        let mut prev_at = None;
        for s in &run.samples {
            let interval = prev_at.map_or(0.0, |p| secs(s.at - p));
            prev_at = Some(s.at);
            let per = |x: u64| {
                if s.live == 0 || interval == 0.0 {
                    0.0
                } else {
                    x as f64 / s.live as f64 / interval
                }
            };
            let _ = writeln!(
                out,
                "{},{:.3},{},{:.3},{:.3},{},{},{:.3},{:.1},{},{}",
                run.label,
                secs(s.at),
                s.live,
                pct(s.view_ok, s.live),
                pct(s.catalog_ok, s.live),
                s.membership_mismatch,
                s.catalog_mismatch,
                per(s.datagrams),
                per(s.bytes),
                s.false_downs,
                s.stalled
            );
        }
    }
    out
}

fn pct(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// One row per catalog change.
pub fn dissemination_csv(report: &Report) -> String {
    let mut out = String::from(
        "run,owner,version,published_s,population,notice_p50_s,notice_p99_s,notice_p999_s,notice_p100_s,fetched_p50_s,fetched_p99_s,fetched_p999_s,fetched_p100_s\n",
    );
    for run in &report.runs {
        for d in &run.dissemination {
            let _ = write!(
                out,
                "{},{},{},{:.3},{}",
                run.label, d.owner, d.version, d.published_s, d.population
            );
            for v in d.notice_s.iter().chain(d.fetched_s.iter()) {
                let _ = write!(out, ",{}", opt(*v));
            }
            out.push('\n');
        }
    }
    out
}

/// One row per crashed node.
pub fn detection_csv(report: &Report) -> String {
    let mut out = String::from(
        "run,victim,crashed_s,observers,first_suspicion_s,down_p50_s,down_p99_s,down_p100_s\n",
    );
    for run in &report.runs {
        for d in &run.detection {
            let _ = writeln!(
                out,
                "{},{},{:.3},{},{},{},{},{}",
                run.label,
                d.victim,
                d.crashed_s,
                d.observers,
                opt(d.first_suspicion_s),
                opt(d.down_p50_s),
                opt(d.down_p99_s),
                opt(d.down_p100_s)
            );
        }
    }
    out
}

fn title(report: &Report, what: &str) -> String {
    format!(
        "{what}: {} nodes, {} (seed {})",
        report.params.nodes, report.params.scenario, report.params.seed
    )
}

/// Share of running nodes with a right view (and an up-to-date catalog)
/// over time.
pub fn convergence_chart(report: &Report) -> Chart {
    let mut series = Vec::new();
    let single = report.runs.len() == 1;
    for run in &report.runs {
        let views = run
            .samples
            .iter()
            .map(|s| (secs(s.at), pct(s.view_ok, s.live)))
            .collect();
        if single {
            series.push(Series {
                name: "membership view right".into(),
                points: views,
            });
            series.push(Series {
                name: "catalog up to date".into(),
                points: run
                    .samples
                    .iter()
                    .map(|s| (secs(s.at), pct(s.catalog_ok, s.live)))
                    .collect(),
            });
        } else {
            series.push(Series {
                name: run.label.clone(),
                points: views,
            });
        }
    }
    let markers = if single {
        report.runs[0]
            .markers
            .iter()
            .map(|m| (m.at_s, m.label.clone()))
            .collect()
    } else {
        Vec::new()
    };
    // After a warm-up, show the measured phase (and 5 s before it).
    let x_range = (single && report.params.scenario != "join").then(|| {
        let run = &report.runs[0];
        ((run.phase_start_s - 5.0).max(0.0), run.end_s)
    });
    Chart {
        title: title(report, "Convergence"),
        x_label: "virtual time (s)".into(),
        y_label: "% of running nodes".into(),
        series,
        markers,
        x_range,
        y_range: Some((0.0, 100.0)),
        steps: false,
    }
}

/// A cumulative curve: % of `population` reached by each arrival offset.
fn cdf(offsets: &[f64], population: usize) -> Vec<(f64, f64)> {
    let mut pts = vec![(0.0, 0.0)];
    for (i, &t) in offsets.iter().enumerate() {
        pts.push((t, pct(i + 1, population)));
    }
    pts
}

/// The mean share of nodes holding a notice, against time since publish.
fn mean_cdf(run: &RunReport) -> Vec<(f64, f64)> {
    let curves = &run.spread_curves;
    let end = curves
        .iter()
        .filter_map(|(_, o, _)| o.last().copied())
        .fold(0.0, f64::max);
    let steps = 200;
    (0..=steps)
        .map(|i| {
            let t = end * f64::from(i) / f64::from(steps);
            let shares: Vec<f64> = curves
                .iter()
                .map(|(_, o, pop)| pct(o.partition_point(|&x| x <= t), *pop))
                .collect();
            (t, crate::metrics::mean(&shares).unwrap_or(0.0))
        })
        .collect()
}

/// How catalog notices spread, per change (one run) or on average (sweep).
pub fn dissemination_chart(report: &Report) -> Chart {
    let series = if report.runs.len() == 1 {
        report.runs[0]
            .spread_curves
            .iter()
            .take(MAX_CURVES)
            .map(|(name, offsets, pop)| Series {
                name: name.clone(),
                points: cdf(offsets, *pop),
            })
            .collect()
    } else {
        report
            .runs
            .iter()
            .filter(|r| !r.spread_curves.is_empty())
            .map(|r| Series {
                name: r.label.clone(),
                points: mean_cdf(r),
            })
            .collect()
    };
    Chart {
        title: title(report, "Catalog notice dissemination"),
        x_label: "time since publish (s)".into(),
        y_label: "% of nodes with the notice".into(),
        series,
        markers: Vec::new(),
        x_range: None,
        y_range: Some((0.0, 100.0)),
        steps: report.runs.len() == 1,
    }
}

/// Share of observers that declared each crashed node down.
pub fn detection_chart(report: &Report) -> Chart {
    let series = report
        .runs
        .iter()
        .flat_map(|r| r.detection_curves.iter())
        .take(MAX_CURVES)
        .map(|(name, offsets, observers)| Series {
            name: name.clone(),
            points: cdf(offsets, *observers),
        })
        .collect();
    Chart {
        title: title(report, "Crash detection"),
        x_label: "time since crash (s)".into(),
        y_label: "% of observers that declared it down".into(),
        series,
        markers: Vec::new(),
        x_range: None,
        y_range: Some((0.0, 100.0)),
        steps: true,
    }
}

/// Failure-detector mistakes against loss.
pub fn sweep_chart(report: &Report) -> Chart {
    let per_hour = |r: &RunReport, n: u64| {
        if r.failures.node_hours > 0.0 {
            n as f64 / r.failures.node_hours
        } else {
            0.0
        }
    };
    type Count = fn(&RunReport) -> u64;
    let counts: [(&str, Count); 3] = [
        ("false downs", |r| r.failures.false_downs),
        ("false suspicions", |r| r.failures.false_suspicions),
        ("identity renewals", |r| r.failures.rejoins),
    ];
    let series = counts
        .into_iter()
        .map(|(name, count)| Series {
            name: name.into(),
            points: report
                .runs
                .iter()
                .map(|r| (r.loss * 100.0, per_hour(r, count(r))))
                .collect(),
        })
        .collect();
    Chart {
        title: title(report, "Failure detector vs loss"),
        x_label: "datagram loss (%)".into(),
        y_label: "per node-hour".into(),
        series,
        markers: Vec::new(),
        x_range: None,
        y_range: None,
        steps: false,
    }
}

/// Catalog dissemination against loss.
pub fn sweep_spread_chart(report: &Report) -> Chart {
    let labels = ["50 %", "99 %", "99.9 %", "100 %"];
    let series = labels
        .iter()
        .enumerate()
        .map(|(i, l)| Series {
            name: format!("notice at {l}"),
            points: report
                .runs
                .iter()
                .filter_map(|r| {
                    let s = r.dissemination_summary.as_ref()?.notice_mean_s[i]?;
                    Some((r.loss * 100.0, s))
                })
                .collect(),
        })
        .collect();
    Chart {
        title: title(report, "Notice dissemination vs loss"),
        x_label: "datagram loss (%)".into(),
        y_label: "mean time (s)".into(),
        series,
        markers: Vec::new(),
        x_range: None,
        y_range: None,
        steps: false,
    }
}
