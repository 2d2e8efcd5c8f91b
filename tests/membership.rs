//! Membership end to end: real `gossamer agent` processes on loopback.

use std::net::UdpSocket;
use std::time::Duration;

use anyhow::Result;
mod support;

use rand::{Rng, RngExt};
use support::{Agent, AgentOptions, Pki, poll, wait_ready, wait_states};

fn seeded(seed: &Agent) -> AgentOptions {
    AgentOptions {
        seeds: vec![seed.seed()],
        ..Default::default()
    }
}

fn start_mesh(pki: &Pki, n: usize) -> Result<Vec<Agent>> {
    let first = Agent::start(pki, "n1", AgentOptions::default())?;
    let opts = seeded(&first);
    let mut agents = vec![first];
    for i in 2..=n {
        agents.push(Agent::start(pki, &format!("n{i}"), opts.clone())?);
    }
    Ok(agents)
}

fn all_alive(agents: &[Agent]) -> Vec<(String, &'static str)> {
    agents.iter().map(|a| (a.name.clone(), "alive")).collect()
}

fn refs(agents: &[Agent]) -> Vec<&Agent> {
    agents.iter().collect()
}

fn expect<'a>(pairs: &'a [(String, &'a str)]) -> Vec<(&'a str, &'a str)> {
    pairs.iter().map(|(n, s)| (n.as_str(), *s)).collect()
}

#[test]
fn five_agents_join_detect_crash_and_leave() -> Result<()> {
    let pki = Pki::new()?;
    let mut agents = start_mesh(&pki, 5)?;

    let alive = all_alive(&agents);
    let took = wait_states(&refs(&agents), &expect(&alive), Duration::from_secs(15))?;
    eprintln!("5 agents all alive everywhere after {took:?}");
    for a in &agents {
        // Ready also means caught up on configuration documents: one
        // comparison with a peer after joining.
        let took = wait_ready(a, Duration::from_secs(15))?;
        eprintln!("{} ready {took:?} later", a.name);
        assert_eq!(a.get("/health")?.0, 200);
    }
    // Every agent that joined swapped member lists with a peer over QUIC
    // right after (push-pull sync); none failed.
    let synced = r#"gossamer_member_syncs_total{result="ok"}"#;
    let failed = r#"gossamer_member_syncs_total{result="error"}"#;
    for a in &agents[1..] {
        poll(
            &format!("{} member sync", a.name),
            Duration::from_secs(15),
            || match a.metric(synced) {
                Some(n) if n >= 1.0 => Ok(()),
                seen => Err(format!("{synced} = {seen:?}")),
            },
        )?;
        assert_eq!(a.metric(failed), Some(0.0), "{}", a.name);
    }

    // kill -9: every survivor lists it down (10 s with default timing).
    agents[2].kill();
    let survivors: Vec<&Agent> = agents.iter().filter(|a| a.name != "n3").collect();
    let took = wait_states(&survivors, &[("n3", "down")], Duration::from_secs(15))?;
    eprintln!("kill -9 of n3 seen as down everywhere after {took:?}");
    assert!(took < Duration::from_secs(10), "detection took {took:?}");

    // SIGTERM: left within 2 s, exit status 0.
    let status = agents[4].terminate(Duration::from_secs(10))?;
    assert!(status.success(), "exit status {status}");
    let survivors: Vec<&Agent> = agents
        .iter()
        .filter(|a| a.name != "n3" && a.name != "n5")
        .collect();
    let took = wait_states(&survivors, &[("n5", "left")], Duration::from_secs(10))?;
    eprintln!("SIGTERM of n5 seen as left everywhere after {took:?}");
    assert!(took < Duration::from_secs(2), "leave took {took:?}");
    Ok(())
}

#[test]
fn foreign_ca_never_joins_and_is_counted() -> Result<()> {
    let pki = Pki::new()?;
    let rogue_pki = Pki::new()?;
    let agents = start_mesh(&pki, 2)?;
    let alive = all_alive(&agents);
    wait_states(&refs(&agents), &expect(&alive), Duration::from_secs(15))?;

    let rogue = Agent::start(&rogue_pki, "rogue", seeded(&agents[0]))?;
    let failures = "gossamer_transport_handshake_failures_total";
    poll(
        "handshake failures counted",
        Duration::from_secs(15),
        || {
            let n = agents[0].metric(failures).unwrap_or(0.0);
            if n >= 1.0 {
                Ok(())
            } else {
                Err(format!("{failures} = {n}"))
            }
        },
    )?;
    // Give it every chance to sneak in, then check nobody lists it.
    std::thread::sleep(Duration::from_secs(3));
    for a in &agents {
        assert_eq!(a.state_of("rogue"), None, "{} lists the rogue", a.name);
    }
    assert!(rogue.members()?.iter().all(|(n, _)| n == "rogue"));
    assert!(rogue.metric(failures).unwrap_or(0.0) >= 1.0);
    assert_eq!(rogue.get("/ready")?.0, 503, "rogue never joins");
    Ok(())
}

#[test]
fn garbage_datagrams_do_not_hurt() -> Result<()> {
    let pki = Pki::new()?;
    let agents = start_mesh(&pki, 3)?;
    let alive = all_alive(&agents);
    wait_states(&refs(&agents), &expect(&alive), Duration::from_secs(15))?;

    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let mut rng = rand::rng();
    let mut buf = vec![0u8; 1500];
    for i in 0..10_000 {
        let len = rng.random_range(0..=1500);
        rng.fill_bytes(&mut buf[..len]);
        // Some look like QUIC long headers, to get past the first check.
        if i % 3 == 0 && len > 0 {
            buf[0] |= 0xc0;
        }
        let _ = socket.send_to(&buf[..len], agents[0].quic);
        if i % 500 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(agents[0].get("/health")?.0, 200);
    // The mesh stays intact (nobody was declared down by the noise).
    std::thread::sleep(Duration::from_secs(2));
    wait_states(&refs(&agents), &expect(&alive), Duration::from_secs(10))?;
    Ok(())
}

#[test]
fn restart_rejoins_through_saved_members_when_seed_is_down() -> Result<()> {
    let pki = Pki::new()?;
    let mut agents = start_mesh(&pki, 3)?;
    let alive = all_alive(&agents);
    wait_states(&refs(&agents), &expect(&alive), Duration::from_secs(15))?;
    // Let the member list reach the data dir.
    poll("members saved", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(agents[2].data_dir.join("state.json"))
            .map_err(|e| e.to_string())?;
        if text.contains("\"n2\"") {
            Ok(())
        } else {
            Err(text)
        }
    })?;

    let seed = agents[0].seed();
    let data_dir = agents[2].data_dir.clone();
    assert!(agents[2].terminate(Duration::from_secs(10))?.success());
    agents[0].kill();

    let restarted = Agent::start(
        &pki,
        "n3",
        AgentOptions {
            seeds: vec![seed],
            data_dir: Some(data_dir),
            ..Default::default()
        },
    )?;
    let took = wait_states(&[&agents[1]], &[("n3", "alive")], Duration::from_secs(20))?;
    wait_states(&[&restarted], &[("n2", "alive")], Duration::from_secs(10))?;
    eprintln!("n3 rejoined through its saved members after {took:?}");
    wait_ready(&restarted, Duration::from_secs(15))?;
    Ok(())
}
