//! The CLI's contract: exit codes and one-line errors for bad configuration.

use std::time::Duration;

use anyhow::Result;
mod support;

use support::{Agent, AgentOptions, Pki, gossamer, wait_states};

fn agent_exit(args: &[&str]) -> (i32, String) {
    let out = gossamer(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn bad_configuration_exits_64_with_one_line() -> Result<()> {
    let pki = Pki::new()?;
    let (cert, key) = pki.issue("n1")?;
    let (other_cert, other_key) = pki.issue("n2")?;
    let rogue = Pki::new()?;
    let (rogue_cert, rogue_key) = rogue.issue("n1")?;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let ca = pki.ca();
    let ca = ca.to_str().unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "name = \"n1\"\nport = 7946\n")?;
    // Values that are only read when a request comes are still parsed, and
    // refused, at start.
    let typed = [
        (
            "[proxy.service.web]\nrequest_timeout = \"fast\"\n",
            "proxy.service.web.request_timeout",
        ),
        ("[proxy]\nlisten = \"nowhere\"\n", "proxy.listen"),
        (
            "[[service]]\nname = \"web\"\nport = 8080\nhash_policy = \"header:a(b\"\n",
            "service[0].hash_policy",
        ),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (text, needle))| {
        let path = dir.path().join(format!("typed-{i}.toml"));
        std::fs::write(&path, text).map(|()| (path, needle))
    })
    .collect::<std::io::Result<Vec<_>>>()?;

    let base = |cert: &str, key: &str| -> Vec<String> {
        [
            "agent",
            "--bind",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--data-dir",
            data,
            "--ca",
            ca,
            "--cert",
            cert,
            "--key",
            key,
        ]
        .map(String::from)
        .to_vec()
    };
    let mut cases: Vec<(Vec<String>, &str)> = vec![
        (
            [
                base(&s(&cert), &s(&key)),
                vec!["--config".into(), s(&bad_toml)],
            ]
            .concat(),
            "port",
        ),
        (
            base(&s(&cert), &s(&key))
                .into_iter()
                .map(|a| {
                    if a == "127.0.0.1:0" {
                        "not-an-address".into()
                    } else {
                        a
                    }
                })
                .collect(),
            "bind",
        ),
        (
            [
                base(&s(&cert), &s(&key)),
                vec!["--config".into(), "/nonexistent/g.toml".into()],
            ]
            .concat(),
            "/nonexistent/g.toml",
        ),
        (base("/nonexistent/n1.pem", &s(&key)), "/nonexistent/n1.pem"),
        (
            base(&s(&rogue_cert), &s(&rogue_key)),
            "not signed by the mesh CA",
        ),
        (
            [
                base(&s(&other_cert), &s(&other_key)),
                vec!["--name".into(), "n1".into()],
            ]
            .concat(),
            "issued to \"n2\"",
        ),
        (
            [
                base(&s(&cert), &s(&key)),
                vec!["--seed".into(), "no-port".into()],
            ]
            .concat(),
            "seed",
        ),
        (
            vec!["agent".into(), "--no-such-flag".into()],
            "--no-such-flag",
        ),
    ];
    for (path, needle) in &typed {
        cases.push((
            [base(&s(&cert), &s(&key)), vec!["--config".into(), s(path)]].concat(),
            needle,
        ));
    }
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stderr) = agent_exit(&args);
        assert_eq!(code, 64, "{args:?} -> {code}: {stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: {stderr:?} should mention {needle:?}"
        );
        if !args.contains(&"--no-such-flag") {
            assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
        }
    }
    Ok(())
}

#[test]
fn members_command_prints_the_table() -> Result<()> {
    let pki = Pki::new()?;
    let a = Agent::start(&pki, "n1", AgentOptions::default())?;
    let b = Agent::start(
        &pki,
        "n2",
        AgentOptions {
            seeds: vec![a.seed()],
            ..Default::default()
        },
    )?;
    wait_states(
        &[&a, &b],
        &[("n1", "alive"), ("n2", "alive")],
        Duration::from_secs(15),
    )?;
    let admin = a.admin.to_string();
    let out = gossamer(&["members", "--admin", &admin]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout)?;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("n2 ") && l.contains("alive")),
        "{table}"
    );
    let out = gossamer(&["members", "--admin", &admin, "--json"]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(rows.as_array().map(Vec::len), Some(2));
    for key in ["name", "addr", "state", "incarnation"] {
        assert!(rows[0].get(key).is_some(), "missing {key}");
    }
    let out = gossamer(&["health", "--admin", &admin]);
    assert!(out.status.success());
    // An agent that is not there: a clear error, non-zero exit.
    let out = gossamer(&["members", "--admin", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
    Ok(())
}

#[test]
fn ca_and_cert_refuse_to_overwrite() -> Result<()> {
    let pki = Pki::new()?;
    let ca_dir = pki.dir.path().join("ca");
    let out = gossamer(&["ca", "init", "--dir", ca_dir.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    let out = gossamer(&[
        "cert",
        "issue",
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--name",
        "bad name",
        "--out",
        "/tmp",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid node name"));
    Ok(())
}

#[test]
fn demo_runs_end_to_end() -> Result<()> {
    let out = std::process::Command::new(support::binary())
        .args(["demo", "--keys", "300"])
        .env_remove("RUST_LOG")
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("same instance for every key from every agent"),
        "{stdout}"
    );
    assert!(stdout.contains("keys returned"), "{stdout}");
    assert!(stdout.contains("canary by document"), "{stdout}");
    assert!(
        stdout.contains("all 3 replaced under traffic; 0 of"),
        "{stdout}"
    );
    assert!(stdout.contains("n2 cut off by every peer"), "{stdout}");
    assert!(
        stdout.contains("n3 serves shop.local/api from a signed ingress document"),
        "{stdout}"
    );
    assert!(stderr.contains("[6/10]"), "progress shown: {stderr}");
    Ok(())
}

#[test]
fn certificates_carry_a_lifetime() -> Result<()> {
    let pki = Pki::new()?;
    let ca = pki.dir.path().join("ca");
    let out_dir = pki.dir.path().join("short");
    let issue = |name: &str, ttl: &str| {
        gossamer(&[
            "cert",
            "issue",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--name",
            name,
            "--service",
            "*",
            "--ttl",
            ttl,
            "--out",
            out_dir.to_str().unwrap(),
        ])
    };
    // Bad lifetimes are refused.
    let out = issue("n9", "soon");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("soon"));
    // Two days: the agent starts, but warns in its log, in /ready and in
    // its metric.
    let out = issue("n1", "2d");
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid until"));
    let cert = out_dir.join("n1.pem");
    let key = out_dir.join("n1.key");
    let agent = Agent::start_with(&pki, "n1", &pki.ca(), &cert, &key, AgentOptions::default())?;
    let (_, body) = agent.get("/ready")?;
    let ready: serde_json::Value = serde_json::from_str(&body)?;
    let warning = ready["warnings"][0].as_str().unwrap_or_default().to_owned();
    assert!(warning.contains("expires in 47h"), "{body}");
    let left = agent.metric("gossamer_cert_expiry_seconds").unwrap_or(0.0);
    assert!((47.0 * 3600.0..48.0 * 3600.0).contains(&left), "{left}");
    assert!(agent.log().contains("expires in 47h"), "no warning logged");
    // One second: expired by the time the agent starts, which it refuses
    // to do, saying why.
    let out = issue("n2", "1s");
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(2100));
    let out = support::agent_once(
        &pki,
        "n2",
        &out_dir.join("n2.pem"),
        &out_dir.join("n2.key"),
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("n2.pem expired at"), "{stderr}");
    Ok(())
}
