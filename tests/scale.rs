//! A 50-agent mesh on one machine: how fast a catalog change reaches every
//! agent, and what the agents cost in memory.
//!
//! Heavy (50 processes), so not in CI's fast path. Run with a release binary:
//!
//! ```text
//! cargo build --release -p gossamer-node
//! GOSSAMER_BIN=target/release/gossamer cargo test --release -p gossamer-node --test scale -- --ignored --nocapture
//! ```

mod support;

use std::time::{Duration, Instant};

use anyhow::Result;
use support::{Agent, AgentOptions, Pki, poll};

#[test]
#[ignore = "starts 50 agents; run by hand (see the file header)"]
fn fifty_agents_catalog_change() -> Result<()> {
    const N: usize = 50;
    let pki = Pki::new()?;
    let first = Agent::start(&pki, "n1", AgentOptions::default())?;
    let opts = AgentOptions {
        seeds: vec![first.seed()],
        ..Default::default()
    };
    let mut agents = vec![first];
    for i in 2..=N {
        agents.push(Agent::start(&pki, &format!("n{i}"), opts.clone())?);
    }
    let (_, took) = poll("all 50 see 50 alive", Duration::from_secs(60), || {
        for a in &agents {
            let alive = a
                .members()
                .map_err(|e| e.to_string())?
                .iter()
                .filter(|(_, s)| s == "alive")
                .count();
            if alive != N {
                return Err(format!("{} sees {alive} alive", a.name));
            }
        }
        Ok(())
    })?;
    println!("membership: all {N} agents list {N} alive after {took:?}");

    let mut times = Vec::new();
    for round in 0..5 {
        let owner = &agents[(round * 7 + 3) % N];
        let id = format!("svc-{round}");
        let start = Instant::now();
        let (status, body) = owner.register(&id, r#"{"name": "bench", "port": 9000}"#)?;
        assert_eq!(status, 200, "{body}");
        let mut pending: Vec<&Agent> = agents.iter().collect();
        while !pending.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "change did not spread"
            );
            pending.retain(|a| a.instance_health("bench", &id).as_deref() != Some("passing"));
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = start.elapsed();
        println!(
            "round {round}: registration on {} listed by all {N} after {took:?}",
            owner.name
        );
        times.push(took);
    }
    times.sort();
    println!(
        "catalog change to all {N}: median {:?}, max {:?}",
        times[2], times[4]
    );
    let mut rss: Vec<u64> = agents.iter().filter_map(Agent::rss_kib).collect();
    rss.sort();
    println!(
        "agent RSS over {} agents: min {} KiB, median {} KiB, max {} KiB",
        rss.len(),
        rss[0],
        rss[rss.len() / 2],
        rss[rss.len() - 1]
    );
    Ok(())
}
