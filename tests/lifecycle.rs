//! Certificates over a running mesh's life: rotation under traffic with no
//! failed request, and revocation that cuts a node off from every peer.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use support::*;

/// Issues a fresh certificate for `name` into `subdir` and puts it in
/// place of the one the agent runs with (`cert`, `key`), each by an
/// atomic rename. Returns the new serial.
fn replace_cert(pki: &Pki, name: &str, subdir: &str, cert: &Path, key: &Path) -> Result<String> {
    let out = pki.dir.path().join(subdir);
    let issued = pki.issue_into(name, subdir, &["--service", "*"]);
    ensure!(
        issued.status.success(),
        "cert issue: {}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let stdout = String::from_utf8_lossy(&issued.stdout).into_owned();
    let serial = stdout
        .split("serial ")
        .nth(1)
        .map(|s| s.trim().to_owned())
        .with_context(|| format!("no serial in {stdout:?}"))?;
    for (from, to) in [
        (out.join(format!("{name}.key")), key),
        (out.join(format!("{name}.pem")), cert),
    ] {
        let tmp = to.with_extension("new");
        std::fs::copy(&from, &tmp)?;
        std::fs::rename(&tmp, to)?;
    }
    Ok(serial)
}

fn serial_of(agent: &Agent) -> Option<String> {
    let (_, body) = agent.get("/v1/agent").ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["certificate"]["serial"].as_str().map(str::to_owned)
}

/// `gossamer loadgen` through `proxy` for `secs` at `rate`, in the
/// background; its JSON report comes from [`finish`].
fn loadgen(proxy: std::net::SocketAddr, rate: u32, secs: u32) -> Result<std::process::Child> {
    Ok(Command::new(binary())
        .args([
            "loadgen",
            "--proxy",
            &proxy.to_string(),
            "--service",
            "web",
            "--rate",
            &rate.to_string(),
            "--duration",
            &secs.to_string(),
            "--json",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?)
}

fn finish(child: std::process::Child) -> Result<Value> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "loadgen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Three `web` instances on n3, n4 and n5, passing everywhere.
fn web_on(agents: &[Agent], owners: &[usize]) -> Result<Vec<DemoService>> {
    let refs: Vec<&Agent> = agents.iter().collect();
    let mut services = Vec::new();
    for &i in owners {
        let id = format!("web-{}", agents[i].name);
        let svc = DemoService::start(&id, None)?;
        let body = format!(r#"{{"name": "web", "port": {}}}"#, svc.addr.port());
        let (status, text) = agents[i].register(&id, &body)?;
        ensure!(status == 200, "register {id}: {text}");
        services.push(svc);
    }
    for &i in owners {
        let id = format!("web-{}", agents[i].name);
        wait_health(&refs, "web", &id, Some("passing"), Duration::from_secs(20))?;
    }
    Ok(services)
}

#[test]
fn rolling_rotation_under_load_fails_no_request() -> Result<()> {
    let pki = Pki::new()?;
    let agents = mesh(&pki, 5, &[])?;
    let _web = web_on(&agents, &[2, 3, 4])?;

    // 200 req/s in all, through two proxies, while every agent in turn
    // gets a new certificate: three by SIGHUP, two by noticing the files.
    let secs = 30;
    let loads = [
        loadgen(agents[0].proxy, 100, secs)?,
        loadgen(agents[1].proxy, 100, secs)?,
    ];
    std::thread::sleep(Duration::from_secs(2));
    for (i, agent) in agents.iter().enumerate() {
        let old = serial_of(agent).context("no serial")?;
        let (cert, key) = pki.issue(&agent.name)?;
        let new = replace_cert(&pki, &agent.name, &format!("rotated-{i}"), &cert, &key)?;
        ensure!(new != old, "the same serial twice");
        if i % 2 == 0 {
            let killed = Command::new("kill")
                .args(["-HUP", &agent.pid().to_string()])
                .status()?;
            ensure!(killed.success(), "kill -HUP");
        }
        poll(
            &format!("{} to use its new certificate", agent.name),
            Duration::from_secs(20),
            || match serial_of(agent) {
                Some(s) if s == new => Ok(()),
                other => Err(format!("serial {other:?}")),
            },
        )?;
        std::thread::sleep(Duration::from_secs(2));
    }
    let mut total = 0;
    for load in loads {
        let report = finish(load)?;
        let (sent, ok, failed) = (
            report["sent"].as_u64().unwrap_or(0),
            report["ok"].as_u64().unwrap_or(0),
            report["failed"].as_u64().unwrap_or(0),
        );
        ensure!(
            failed == 0,
            "{failed} requests failed during the rotation: {report}"
        );
        ensure!(ok == sent, "{report}");
        total += sent;
    }
    // The generator paces itself; a loaded machine may send a little less.
    ensure!(
        total >= 200 * u64::from(secs) / 2,
        "only {total} requests sent"
    );
    for agent in &agents {
        ensure!(
            agent.metric(r#"gossamer_cert_reloads_total{outcome="ok"}"#) == Some(1.0),
            "{}: {:?}",
            agent.name,
            agent.metric(r#"gossamer_cert_reloads_total{outcome="ok"}"#)
        );
    }

    // A fresh node's handshakes see the new certificates, and all five
    // still take it in.
    let n6 = Agent::start(
        &pki,
        "n6",
        AgentOptions {
            seeds: vec![agents[4].seed()],
            ..Default::default()
        },
    )?;
    let mut all: Vec<&Agent> = agents.iter().collect();
    all.push(&n6);
    let alive: Vec<(&str, &str)> = ["n1", "n2", "n3", "n4", "n5", "n6"]
        .iter()
        .map(|n| (*n, "alive"))
        .collect();
    wait_states(&all, &alive, Duration::from_secs(30))?;

    // Files that do not belong together are refused, and the certificate
    // in use stays.
    let (cert, _) = pki.issue(&agents[0].name)?;
    let before = serial_of(&agents[0]);
    std::fs::write(&cert, "not a certificate")?;
    Command::new("kill")
        .args(["-HUP", &agents[0].pid().to_string()])
        .status()?;
    poll(
        "the refusal to be counted",
        Duration::from_secs(20),
        || match agents[0].metric(r#"gossamer_cert_reloads_total{outcome="failed"}"#) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    ensure!(serial_of(&agents[0]) == before);
    ensure!(agents[0].log().contains("new certificate files refused"));
    Ok(())
}

#[test]
fn a_revoked_node_is_cut_off_within_seconds_and_traffic_fails_over() -> Result<()> {
    let pki = Pki::new()?;
    let ops = pki.issue_operator("ops")?;
    let agents = mesh(&pki, 5, &[])?;
    let _web = web_on(&agents, &[2, 3, 4])?;
    let load = loadgen(agents[0].proxy, 50, 25)?;
    std::thread::sleep(Duration::from_secs(3));

    let ca = pki.dir.path().join("ca");
    let revoked = gossamer(&[
        "cert",
        "revoke",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--name",
        "n3",
    ]);
    ensure!(
        revoked.status.success(),
        "cert revoke: {}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let crl = ca.join("crl.pem");
    let applied = config_apply(&agents[1], &crl, &ops);
    ensure!(
        applied.status.success(),
        "config apply: {}",
        String::from_utf8_lossy(&applied.stderr)
    );

    // All four others show n3 revoked and hold no connection to it within
    // 5 s of the apply (what they gossip does not count: n3's own view).
    let others: Vec<&Agent> = agents.iter().filter(|a| a.name != "n3").collect();
    let (_, took) = poll("n3 revoked everywhere", Duration::from_secs(20), || {
        for a in &others {
            let state = a.state_of("n3");
            if state.as_deref() != Some("revoked") {
                return Err(format!("{} sees n3 {state:?}", a.name));
            }
        }
        Ok(())
    })?;
    ensure!(took <= Duration::from_secs(5), "revocation took {took:?}");
    let n3 = &agents[2];
    poll(
        "n3 to lose every connection",
        Duration::from_secs(10),
        || match n3.metric("gossamer_transport_connections") {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    let (_, members) = agents[0].get("/v1/members")?;
    ensure!(members.contains("is revoked"), "{members}");

    // Traffic through n1 goes to n4 and n5 only once n3 is revoked: the
    // requests in flight when it was cut off may fail, none after.
    let report = finish(load)?;
    let served = |who: &str| {
        report["by_instance"].as_object().is_some_and(|m| {
            m.iter()
                .any(|(k, v)| k.contains(who) && v.as_u64() > Some(0))
        })
    };
    ensure!(served("web-n4") && served("web-n5"), "{report}");
    let after = via_proxy_many(&agents[0], 40)?;
    ensure!(
        after.iter().all(|who| !who.contains("web-n3")),
        "n3 still served: {after:?}"
    );

    // n3 is told why, either by the revocation list reaching it before
    // it was cut off or by its peers' refusals.
    poll("n3 to log why", Duration::from_secs(20), || {
        let log = n3.log();
        (log.contains("own certificate is revoked") || log.contains("a certificate is revoked"))
            .then_some(())
            .ok_or_else(|| "nothing yet".to_owned())
    })?;
    Ok(())
}

/// `n` requests for `web` through `agent`'s proxy, with distinct keys:
/// who answered each (`x-served-by`).
fn via_proxy_many(agent: &Agent, n: usize) -> Result<Vec<String>> {
    let mut who = Vec::new();
    for i in 0..n {
        let (status, served) = via_proxy(agent.proxy, "web", &format!("k{i}"), "/")?;
        if status != 200 {
            bail!("request {i}: {status} {served}");
        }
        who.push(served);
    }
    Ok(who)
}

#[test]
fn a_peer_whose_certificate_expired_cannot_join() -> Result<()> {
    let pki = Pki::new()?;
    let n1 = Agent::start(&pki, "n1", AgentOptions::default())?;
    // n2's certificate lasts 8 s: it joins, then runs on past the end.
    let short = pki.dir.path().join("short");
    let issued = pki.issue_into("n2", "short", &["--ttl", "8s"]);
    ensure!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    let n2 = Agent::start_with(
        &pki,
        "n2",
        &pki.ca(),
        &short.join("n2.pem"),
        &short.join("n2.key"),
        AgentOptions {
            seeds: vec![n1.seed()],
            ..Default::default()
        },
    )?;
    wait_states(
        &[&n1, &n2],
        &[("n1", "alive"), ("n2", "alive")],
        Duration::from_secs(10),
    )?;
    poll(
        "n2's certificate to expire",
        Duration::from_secs(20),
        || match n2.metric("gossamer_cert_expiry_seconds") {
            Some(left) if left < -1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;

    // A new node that knows only n2 cannot join through it: its handshake
    // refuses n2's certificate, and says why.
    let n3 = Agent::start(
        &pki,
        "n3",
        AgentOptions {
            seeds: vec![n2.seed()],
            ..Default::default()
        },
    )?;
    poll(
        "n3 to refuse n2's certificate",
        Duration::from_secs(20),
        || {
            n3.log()
                .contains("a certificate has expired")
                .then_some(())
                .ok_or_else(|| "nothing logged yet".to_owned())
        },
    )?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(
        n3.state_of("n2").is_none() && n3.state_of("n1").is_none(),
        "n3 joined through an expired certificate: {:?}",
        n3.members()?
    );
    Ok(())
}
