//! End-to-end checks of the simulator: determinism of every output byte,
//! agreement after a partition, and a small cluster forming.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gossamer_membership::SwimConfig;
use gossamer_sim::scenario::{Options, Scenario};

fn options(scenario: Scenario, nodes: usize) -> Options {
    Options {
        scenario,
        nodes,
        seed: 7,
        loss: None,
        latency: Duration::from_millis(1),
        duration: Duration::from_secs(30),
        swim: SwimConfig::default(),
        kill: None,
        split: Duration::from_secs(10),
        join_window: Duration::from_secs(2),
        form_limit: Duration::from_secs(120),
        settle_limit: Duration::from_secs(300),
        progress: false,
    }
}

/// Runs the binary and returns its stdout.
fn run_binary(args: &[&str], out: &Path) -> Vec<u8> {
    let output = Command::new(env!("CARGO_BIN_EXE_gossamer-sim"))
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--quiet")
        .output()
        .expect("gossamer-sim runs");
    assert!(
        output.status.success(),
        "gossamer-sim failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Every file in `dir`, sorted by name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn same_seed_gives_byte_identical_output() {
    let args = [
        "partition",
        "--nodes",
        "40",
        "--seed",
        "11",
        "--loss",
        "0.02",
        "--duration",
        "25",
        "--split",
        "8",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out_a = run_binary(&args, a.path());
    let out_b = run_binary(&args, b.path());
    assert!(!out_a.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out_a),
        String::from_utf8_lossy(&out_b),
        "stdout differs"
    );
    let (fa, fb) = (files(a.path()), files(b.path()));
    let names: Vec<&str> = fa.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "convergence.svg",
        "dissemination.csv",
        "dissemination.svg",
        "summary.json",
        "timeseries.csv",
    ] {
        assert!(names.contains(&expected), "{expected} missing: {names:?}");
    }
    assert_eq!(fa.len(), fb.len());
    for ((name_a, bytes_a), (name_b, bytes_b)) in fa.iter().zip(&fb) {
        assert_eq!(name_a, name_b);
        assert!(bytes_a == bytes_b, "{name_a} differs between two runs");
    }

    // A crash run writes its detection files too, also identically.
    let crash = ["crash", "--nodes", "30", "--seed", "5", "--duration", "20"];
    let (c, d) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    assert_eq!(run_binary(&crash, c.path()), run_binary(&crash, d.path()));
    let (fc, fd) = (files(c.path()), files(d.path()));
    assert!(fc.iter().any(|(n, _)| n == "detection.svg"));
    assert!(fc == fd, "crash outputs differ");

    // And another seed gives another run.
    let other = tempfile::tempdir().unwrap();
    let mut args_other = args;
    args_other[4] = "12";
    assert_ne!(run_binary(&args_other, other.path()), out_a);
}

#[test]
fn partition_ends_with_everyone_agreeing() {
    let report = gossamer_sim::run(&options(Scenario::Partition, 60)).unwrap();
    let run = &report.runs[0];
    let c = &run.convergence;
    assert!(c.agreed_at_end, "not agreed: {c:?}");
    assert!(c.full_after_s.is_some(), "no agreement time reported");
    assert_eq!(c.wrong_views_at_end, 0);
    assert_eq!(c.outdated_catalogs_at_end, 0);
    assert_eq!(c.members_check_mismatches, 0, "cores disagree with events");
    assert!(run.failures.partition_downs > 0, "the split was felt");
    assert_eq!(run.failures.false_downs, 0);
    // Catalog changes on both sides reached everyone.
    assert_eq!(run.dissemination.len(), 6);
    for d in &run.dissemination {
        assert!(d.fetched_s[3].is_some(), "change {d:?} did not reach all");
    }
    assert!(report.render().contains("converged: yes"));
}

#[test]
fn small_cluster_joins() {
    let mut opts = options(Scenario::Join, 50);
    opts.duration = Duration::from_secs(60);
    let report = gossamer_sim::run(&opts).unwrap();
    let run = &report.runs[0];
    let joined = run.joined_s.expect("the cluster formed");
    assert!(joined < 60.0);
    assert!(run.convergence.agreed_at_end);
    assert_eq!(run.convergence.members_check_mismatches, 0);
    assert_eq!(run.failures.false_downs, 0);
    let spread = run
        .dissemination_summary
        .as_ref()
        .expect("catalog changes after forming");
    assert_eq!(spread.incomplete, 0);
    assert!(spread.notice_mean_s[3].unwrap() < 2.0, "{spread:?}");
}

#[test]
fn crashed_node_is_detected_by_every_observer() {
    let report = gossamer_sim::run(&options(Scenario::Crash, 40)).unwrap();
    let run = &report.runs[0];
    let d = run.detection_summary.as_ref().expect("a node crashed");
    assert_eq!(d.victims, 1);
    let suspicion = d.first_suspicion_mean_s.expect("suspected");
    let all_down = d.down_mean_s[2].expect("declared down everywhere");
    assert!(suspicion < all_down);
    assert!(run.convergence.agreed_at_end, "restart rejoined");
}

#[test]
fn after_a_heal_catalogs_agree_soon_after_membership() {
    // As `gossamer-sim compare`: 24 nodes split in two for 20 s, with
    // catalog changes on both sides. Each side holds the other down and
    // renews its identity after the heal; the changes made across the
    // split then came only with the 5 s anti-entropy rounds (6.4-8.9 s
    // after the heal) until a renewed node started one round early with
    // a member from the other side.
    let mut opts = options(Scenario::Compare, 24);
    opts.latency = Duration::from_micros(100);
    opts.split = Duration::from_secs(20);
    let comparison = gossamer_sim::compare::run(&opts, 0, 4).unwrap();
    let s = &comparison.samples;
    assert_eq!(s.heals.len(), 4);
    for (all, members) in s.heals.iter().zip(&s.heals_membership) {
        assert!(
            *all <= members + 2.5,
            "catalogs {all} s after the heal, membership {members} s"
        );
    }
}
