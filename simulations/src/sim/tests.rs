use super::*;
use crate::cpu::Costs;

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
    let mut idle_closes = 0;
    for x in 0..6 {
        let s = sim.link_stats(x).unwrap();
        // One full handshake per pair and direction at most: the
        // session is kept for every later one.
        assert!(s.dialled_full <= 5, "node {x}: {s:?}");
        assert!(s.dialled_resumed > 0, "node {x}: {s:?}");
        // Closing closes both sides, and whichever side's sweep comes
        // first counts it, so a node may never be the one that closed.
        idle_closes += s.idle_closes;
    }
    // 15 pairs, idle for 1.5 s again and again over 30 s.
    assert!(idle_closes >= 15, "{idle_closes}");
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
