//! Footprint of an idle mesh: agent RSS and gossip bytes per second.
//!
//! Not part of CI's fast path (it samples for tens of seconds). Run with a
//! release binary:
//!
//! ```text
//! cargo build --release -p gossamer-node
//! GOSSAMER_BIN=target/release/gossamer cargo test -p gossamer-node --test footprint -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use anyhow::Result;
mod support;

use support::{Agent, AgentOptions, Pki, wait_states};

#[test]
#[ignore = "samples for ~40 s; run by hand (see the file header)"]
fn idle_five_node_mesh() -> Result<()> {
    const N: usize = 5;
    let pki = Pki::new()?;
    let start = Instant::now();
    let first = Agent::start(&pki, "n1", AgentOptions::default())?;
    let opts = AgentOptions {
        seeds: vec![first.seed()],
        ..Default::default()
    };
    let mut agents = vec![first];
    for i in 2..=N {
        agents.push(Agent::start(&pki, &format!("n{i}"), opts.clone())?);
    }
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let expected: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "alive")).collect();
    let refs: Vec<&Agent> = agents.iter().collect();
    let took = wait_states(&refs, &expected, Duration::from_secs(30))?;
    println!(
        "join: all {N} alive everywhere {took:?} after the last agent started ({:?} from the first)",
        start.elapsed()
    );

    // Let start-up traffic settle, then measure a steady-state window.
    std::thread::sleep(Duration::from_secs(10));
    let bytes = |a: &Agent| {
        a.metric("gossamer_swim_bytes_total{direction=\"out\"}")
            .unwrap_or(0.0)
            + a.metric("gossamer_swim_bytes_total{direction=\"in\"}")
                .unwrap_or(0.0)
    };
    let udp = |a: &Agent| {
        a.metric("gossamer_transport_udp_bytes_total{direction=\"out\"}")
            .unwrap_or(0.0)
            + a.metric("gossamer_transport_udp_bytes_total{direction=\"in\"}")
                .unwrap_or(0.0)
    };
    let before: Vec<(f64, f64)> = agents.iter().map(|a| (bytes(a), udp(a))).collect();
    let window = Duration::from_secs(30);
    std::thread::sleep(window);
    for (a, (b0, u0)) in agents.iter().zip(before) {
        let secs = window.as_secs_f64();
        println!(
            "{}: rss {} KiB, gossip {:.0} B/s SWIM payload, {:.0} B/s UDP on the wire (in + out)",
            a.name,
            a.rss_kib().unwrap_or(0),
            (bytes(a) - b0) / secs,
            (udp(a) - u0) / secs,
        );
    }
    Ok(())
}
