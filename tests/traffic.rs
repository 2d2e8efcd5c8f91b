//! Traffic policy from route documents, through real agents: a sticky
//! 90/10 split that every agent agrees on, weights that move only the keys
//! they must, header matches, injected aborts and delays, circuit
//! breakers, retries and mirroring.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use support::{
    Agent, AgentOptions, DemoService, Pki, config_apply, http, mesh, poll, wait_doc_version,
    wait_health, wait_states,
};

/// One request through a proxy: (status, x-served-by, headers and body).
fn request(
    proxy: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, String)> {
    let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status: u16 = response.split(' ').nth(1).context("no status")?.parse()?;
    let served = response
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-served-by")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    Ok((status, served, response))
}

fn apply(
    agent: &Agent,
    dir: &Path,
    op: &(PathBuf, PathBuf),
    name: &str,
    toml: &str,
) -> Result<u64> {
    let file = dir.join(name);
    std::fs::write(&file, toml)?;
    let out = config_apply(agent, &file, op);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "config apply: {text}");
    let (_, body) = agent.get("/v1/config/route/web")?;
    let v: Value = serde_json::from_str(&body)?;
    v["version"].as_u64().context("no version")
}

fn wait_version(agents: &[Agent], version: u64) -> Result<Duration> {
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_doc_version(&refs, "route", "web", version)
}

/// The arm (`v1`/`v2`) each of `keys` takes through `agent`'s proxy.
fn arms_of(agent: &Agent, keys: std::ops::Range<u32>) -> Result<HashMap<u32, String>> {
    let mut out = HashMap::new();
    for k in keys {
        let key = format!("user-{k}");
        let (status, served, _) = request(agent.proxy, "/", &[("x-user-id", &key)])?;
        ensure!(status == 200, "key {key}: {status}");
        out.insert(k, served);
    }
    Ok(out)
}

fn share(arms: &HashMap<u32, String>, arm: &str) -> f64 {
    arms.values().filter(|a| a.as_str() == arm).count() as f64 / arms.len() as f64
}

const SPLIT: &str = r#"
[[route]]
name = "web"
sticky = "header:x-user-id"
backends = [
  { subset = { version = "v1" }, weight = WEIGHT1 },
  { subset = { version = "v2" }, weight = WEIGHT2 },
]
[[route.rule]]
match = { headers = [{ name = "x-canary", exact = "1" }] }
backends = [{ subset = { version = "v2" }, weight = 1 }]
request_headers = { set = { x-route = "canary" } }
[[route.rule]]
match = { path = { prefix = "/flaky" } }
fault = { abort = { status = 503, percent = 10 } }
[[route.rule]]
match = { path = { prefix = "/delayed" } }
fault = { delay = { fixed = "200ms", percent = 100 } }
"#;

#[test]
fn route_documents_split_match_inject_and_limit() -> Result<()> {
    let pki = Pki::new()?;
    let alice = pki.issue_operator("alice")?;
    let first = Agent::start(&pki, "n1", AgentOptions::default())?;
    let opts = AgentOptions {
        seeds: vec![first.seed()],
        ..Default::default()
    };
    let agents = vec![
        first,
        Agent::start(&pki, "n2", opts.clone())?,
        Agent::start(&pki, "n3", opts)?,
    ];
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_states(
        &refs,
        &[("n1", "alive"), ("n2", "alive"), ("n3", "alive")],
        Duration::from_secs(15),
    )?;
    let mut services = Vec::new();
    for (i, version) in ["v1", "v2"].iter().enumerate() {
        let svc = DemoService::start(version, None)?;
        let body = format!(
            r#"{{"name": "web", "port": {}, "version": "{version}"}}"#,
            svc.addr.port()
        );
        let (status, text) = agents[i].register(version, &body)?;
        ensure!(status == 200, "register: {text}");
        services.push(svc);
    }
    for id in ["v1", "v2"] {
        wait_health(&refs, "web", id, Some("passing"), Duration::from_secs(10))?;
    }
    let dir = pki.dir.path();

    // 90/10, sticky by user: every agent sends each key to the same arm.
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "split.toml",
        &SPLIT.replace("WEIGHT1", "90").replace("WEIGHT2", "10"),
    )?;
    let took = wait_version(&agents, v)?;
    eprintln!("route version {v} in force on all 3 agents after {took:?}");
    let per_agent: Vec<HashMap<u32, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = agents
            .iter()
            .map(|a| s.spawn(move || arms_of(a, 0..10_000)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect::<Result<_>>()
    })?;
    for (a, arms) in agents.iter().zip(&per_agent) {
        let v2 = share(arms, "v2");
        eprintln!(
            "{}: v2 share {:.2} % (e.g. {:?})",
            a.name,
            100.0 * v2,
            arms.get(&0)
        );
        ensure!((v2 - 0.10).abs() <= 0.02, "{}: v2 share {v2}", a.name);
        ensure!(
            arms == &per_agent[0],
            "{} disagrees with n1 on some key's arm",
            a.name
        );
    }

    // The explain API says what the proxy did.
    for k in [0u32, 1, 2, 3] {
        let (_, body) = agents[1].get(&format!("/v1/route?service=web&key=user-{k}"))?;
        let v: Value = serde_json::from_str(&body)?;
        ensure!(v["rule"] == "default", "{body}");
        ensure!(
            v["arm"] == format!("web/version={}", per_agent[0][&k]),
            "{body}"
        );
    }
    let (_, body) = agents[1].get("/v1/route?service=web&key=u&header=x-canary:1")?;
    let v: Value = serde_json::from_str(&body)?;
    ensure!(
        v["rule"] == "0" && v["arm"] == "web/version=v2" && v["instance"] == "v2",
        "{body}"
    );

    // 50/50: only keys that must move do, and only towards v2.
    let v = apply(
        &agents[1],
        dir,
        &alice,
        "split.toml",
        &SPLIT.replace("WEIGHT1", "50").replace("WEIGHT2", "50"),
    )?;
    let took = wait_version(&agents, v)?;
    eprintln!("weights 50/50 in force on all 3 agents after {took:?}");
    let after = arms_of(&agents[2], 0..10_000)?;
    let v2 = share(&after, "v2");
    ensure!((v2 - 0.50).abs() <= 0.02, "v2 share after the change {v2}");
    let back = (0..10_000u32)
        .filter(|k| per_agent[0][k] == "v2" && after[k] == "v1")
        .count();
    let moved = (0..10_000u32)
        .filter(|k| per_agent[0][k] != after[k])
        .count();
    eprintln!("{moved} of 10000 keys moved arm, {back} of them back to v1");
    ensure!(back == 0, "{back} keys moved from v2 to v1");

    // The header match always reaches v2, and its header edit arrives.
    for k in 0..200 {
        let (status, served, text) = request(
            agents[0].proxy,
            "/",
            &[("x-canary", "1"), ("x-user-id", &format!("c{k}"))],
        )?;
        ensure!(
            status == 200 && served == "v2",
            "canary request {k}: {status} {served}"
        );
        ensure!(
            text.contains("\"x-route\":\"canary\""),
            "edit missing: {text}"
        );
    }

    // 10 % aborts.
    let aborted = (0..2_000)
        .map(|k| {
            request(
                agents[1].proxy,
                "/flaky",
                &[("x-user-id", &format!("f{k}"))],
            )
        })
        .collect::<Result<Vec<_>>>()?
        .iter()
        .filter(|(status, _, text)| {
            *status == 503 && text.contains("fault injected by route web rule 1")
        })
        .count();
    let share = aborted as f64 / 2_000.0;
    eprintln!("aborted {:.1} % of /flaky", 100.0 * share);
    // Each request is aborted at random with p = 0.1: over 2,000 the
    // share's standard deviation is 0.67 points, so ±3 points (4.5σ) fails
    // a wrong probability, not an unlucky run (±2 failed about one run in
    // 400).
    ensure!((share - 0.10).abs() <= 0.03, "abort share {share}");

    // A 200 ms delay: never less, and about that much more than without.
    let mean = |path: &str| -> Result<f64> {
        let mut total = 0.0;
        for k in 0..20 {
            let t = Instant::now();
            let (status, _, _) =
                request(agents[2].proxy, path, &[("x-user-id", &format!("d{k}"))])?;
            ensure!(status == 200, "{path}: {status}");
            total += t.elapsed().as_secs_f64();
        }
        Ok(total / 20.0)
    };
    let (plain, delayed) = (mean("/")?, mean("/delayed")?);
    eprintln!(
        "mean latency {:.1} ms plain, {:.1} ms delayed",
        plain * 1e3,
        delayed * 1e3
    );
    ensure!(
        delayed - plain >= 0.19,
        "the delay added {:.1} ms",
        (delayed - plain) * 1e3
    );

    // A circuit breaker of 50 under 200 concurrent slow requests.
    for svc in &services {
        stats(svc, true)?;
    }
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "breaker.toml",
        "[[route]]\nname = \"web\"\ncircuit_breaker = { max_requests = 50 }\n",
    )?;
    wait_version(&agents, v)?;
    let results: Vec<(u16, String, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|k| {
                let proxy = agents[0].proxy;
                s.spawn(move || {
                    let t = Instant::now();
                    request(proxy, "/slow?ms=3000", &[("x-user-id", &format!("b{k}"))])
                        .map(|(status, _, text)| (status, text, t.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("no panic"))
            .collect::<Result<_>>()
    })?;
    let overloaded: Vec<_> = results
        .iter()
        .filter(|(s, text, _)| {
            *s == 503
                && text
                    .to_ascii_lowercase()
                    .contains("x-gossamer-error: overloaded web")
        })
        .collect();
    let served = results.iter().filter(|(s, _, _)| *s == 200).count();
    let mut times: Vec<u128> = results
        .iter()
        .filter(|(s, _, _)| *s == 200)
        .map(|(_, _, t)| t.as_millis())
        .collect();
    times.sort();
    eprintln!(
        "{} overloaded, {served} served; served took {:?} ms",
        overloaded.len(),
        times.iter().step_by(10).collect::<Vec<_>>()
    );
    ensure!(
        overloaded.len() == 150 && served == 50,
        "{} overloaded, {served} served",
        overloaded.len()
    );
    ensure!(
        overloaded
            .iter()
            .all(|(_, _, t)| *t < Duration::from_secs(2)),
        "503s must be fast"
    );
    // What the instances saw: their peaks of requests in flight add up to
    // at least the mesh's peak, so a sum of 50 proves it never exceeded 50.
    let peaks = services
        .iter()
        .map(|svc| Ok(stats(svc, false)?.2))
        .collect::<Result<Vec<u64>>>()?;
    eprintln!("upstream peaks in flight: {peaks:?}");
    ensure!(
        peaks.iter().sum::<u64>() <= 50,
        "the upstream saw {peaks:?} requests at once"
    );
    drop(services);
    Ok(())
}

/// A demo service's counts: (requests, in flight, peak in flight), zeroed
/// afterwards if `reset`.
fn stats(svc: &DemoService, reset: bool) -> Result<(u64, u64, u64)> {
    let (status, body) = http(svc.addr, "GET", "/admin/stats", None)?;
    ensure!(
        status == 200,
        "{}: /admin/stats answered {status}",
        svc.name
    );
    let v: Value = serde_json::from_str(&body)?;
    let n = |k: &str| v[k].as_u64().context("no count");
    let out = (n("requests")?, n("in_flight")?, n("max_in_flight")?);
    if reset {
        http(svc.addr, "POST", "/admin/stats/reset", None)?;
    }
    Ok(out)
}

/// Sets a demo service's fault: every request waits `delay_ms`, then gets
/// `status` (0: its normal answer).
fn fault(svc: &DemoService, status: u16, delay_ms: u64) -> Result<()> {
    let (code, body) = http(
        svc.addr,
        "POST",
        &format!("/admin/fault?status={status}&delay_ms={delay_ms}"),
        None,
    )?;
    ensure!(code == 200, "{}: {body}", svc.name);
    Ok(())
}

/// `n` requests with distinct keys through `proxy`, `at_once` at a time:
/// (status, x-served-by, time) of each.
fn burst(
    proxy: SocketAddr,
    path: &str,
    hash_key: &str,
    n: usize,
    at_once: usize,
) -> Result<Vec<(u16, String, Duration)>> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(at_once) {
        let part: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|k| {
                    s.spawn(move || {
                        let t = Instant::now();
                        let key = format!("k{k}");
                        request(
                            proxy,
                            path,
                            &[("x-user-id", &key), ("x-hash-key", hash_key)],
                        )
                        .map(|(status, served, _)| (status, served, t.elapsed()))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect::<Result<Vec<_>>>()
        })?;
        out.extend(part);
    }
    Ok(out)
}

/// `POST /upload` of `n` bytes to web through `proxy`; checks that all
/// arrived and returns the instance that took them.
fn upload(proxy: SocketAddr, hash_key: &str, n: usize) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "POST /upload HTTP/1.1\r\nHost: web\r\nx-hash-key: {hash_key}\r\nConnection: close\r\nContent-Length: {n}\r\n\r\n{}",
        "x".repeat(n)
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    ensure!(
        response.starts_with("HTTP/1.1 200") && response.contains(&format!("\"bytes\": {n}")),
        "{response}"
    );
    let served = response
        .lines()
        .find_map(|l| l.strip_prefix("x-served-by: "))
        .context("no x-served-by")?;
    Ok(served.trim().to_owned())
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

#[test]
fn route_retries_mirrors_and_connection_limits() -> Result<()> {
    let pki = Pki::new()?;
    let alice = pki.issue_operator("alice")?;
    // No outlier ejection here: each phase below must reach the faulty
    // instance to show what the route does about it. Every request comes
    // from one address, so all go to one instance first, and the retry
    // budget must allow a retry for each.
    let config = pki.dir.path().join("agent.toml");
    std::fs::write(&config, "[proxy]\neject_after = 1000\nretry_budget = 1.0\n")?;
    let agents = mesh(&pki, 2, &["--config", config.to_str().context("path")?])?;
    let refs: Vec<&Agent> = agents.iter().collect();
    // web: instance a on n1, b on n2; shadow (the mirror) on n2.
    let mut services = Vec::new();
    for (i, (id, service)) in [("a", "web"), ("b", "web"), ("s", "shadow")]
        .iter()
        .enumerate()
    {
        let svc = DemoService::start(id, None)?;
        let body = format!(r#"{{"name": "{service}", "port": {}}}"#, svc.addr.port());
        let (status, text) = agents[i.min(1)].register(id, &body)?;
        ensure!(status == 200, "register: {text}");
        wait_health(&refs, service, id, Some("passing"), Duration::from_secs(10))?;
        services.push(svc);
    }
    let (a, b, shadow) = (&services[0], &services[1], &services[2]);
    let dir = pki.dir.path();
    let proxy = agents[0].proxy;
    // Requests carry a hash key that maps to a, so a is tried first.
    let to_a = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            agents[0]
                .get(&format!("/v1/route?service=web&key={k}"))
                .is_ok_and(|(_, body)| body.contains("\"instance\": \"a\""))
        })
        .context("no key maps to a")?;
    let retries = || agents[0].metric("gossamer_proxy_retries_total{service=\"web\"}");

    // Retries on 5xx: a answers 503 to everything, yet every request is
    // served, by b on a retry.
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "retry.toml",
        "[[route]]\nname = \"web\"\nretries = { attempts = 3, on = [\"5xx\"] }\n",
    )?;
    wait_version(&agents, v)?;
    fault(a, 503, 0)?;
    let before = retries().unwrap_or(0.0);
    let results = burst(proxy, "/", &to_a, 100, 10)?;
    let failed: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    let (hit_a, _, _) = stats(a, true)?;
    let retried = retries().unwrap_or(0.0) - before;
    eprintln!(
        "retry on 5xx: {} of 100 failed; a answered 503 {hit_a} times; {retried} retries",
        failed.len()
    );
    ensure!(failed.is_empty(), "failed despite retries: {failed:?}");
    ensure!(hit_a >= 1 && retried >= 1.0, "a was never tried");
    // A body is sent again on the retry.
    for _ in 0..5 {
        let served = upload(proxy, &to_a, 20_000)?;
        ensure!(served == "b", "upload served by {served}");
    }
    ensure!(stats(a, true)?.0 == 5, "the uploads did not try a first");

    // Per-try timeout: a hangs for 3 s; each attempt gets 300 ms, then b
    // answers.
    fault(a, 0, 3000)?;
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "retry.toml",
        "[[route]]\nname = \"web\"\ntimeout = \"10s\"\nretries = { attempts = 2, on = [\"gateway-error\"], per_try_timeout = \"300ms\" }\n",
    )?;
    wait_version(&agents, v)?;
    stats(a, true)?;
    let results = burst(proxy, "/", &to_a, 40, 10)?;
    let (hit_a, _, _) = stats(a, true)?;
    let slowest = results.iter().map(|r| r.2).max().unwrap_or_default();
    eprintln!(
        "per-try timeout: statuses {:?}, a tried {hit_a} times, slowest {slowest:?}",
        results
            .iter()
            .map(|r| r.0)
            .collect::<std::collections::BTreeSet<_>>()
    );
    ensure!(
        results.iter().all(|r| r.0 == 200 && r.1 == "b"),
        "{results:?}"
    );
    ensure!(hit_a >= 1, "a was never tried");
    ensure!(
        slowest < Duration::from_millis(2500),
        "an attempt waited longer than its per-try timeout: {slowest:?}"
    );
    fault(a, 0, 0)?;

    // Mirroring: half the requests are copied to a slow shadow; the main
    // path's latency does not change.
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "mirror.toml",
        "[[route]]\nname = \"web\"\n",
    )?;
    wait_version(&agents, v)?;
    let plain = median(
        burst(proxy, "/", &to_a, 300, 1)?
            .into_iter()
            .map(|r| r.2)
            .collect(),
    );
    fault(shadow, 0, 300)?;
    stats(shadow, true)?;
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "mirror.toml",
        "[[route]]\nname = \"web\"\n[[route.rule]]\nmirror = { service = \"shadow\", percent = 50 }\n",
    )?;
    wait_version(&agents, v)?;
    let mirrored = burst(proxy, "/", &to_a, 1000, 1)?;
    ensure!(
        mirrored.iter().all(|r| r.0 == 200),
        "a mirrored request failed"
    );
    let with_mirror = median(mirrored.into_iter().map(|r| r.2).collect());
    let mirrored = |outcome: &str| {
        agents[0]
            .metric(&format!(
                "gossamer_route_mirrored_total{{service=\"web\",mirror=\"shadow\",outcome=\"{outcome}\"}}"
            ))
            .unwrap_or(0.0) as u64
    };
    let sent = || mirrored("sent");
    let (copies, _) = poll("the mirror to catch up", Duration::from_secs(30), || {
        let (n, in_flight, _) = stats(shadow, false).map_err(|e| e.to_string())?;
        (in_flight == 0 && n == sent())
            .then_some(n)
            .ok_or(format!("{n} copies arrived, {} sent", sent()))
    })?;
    // A copy past the cap on copies in flight is dropped and counted; on
    // a fast machine the slow shadow can hold that many.
    let drawn = copies + mirrored("overflow");
    eprintln!(
        "mirror: {drawn} of 1000 drawn, {copies} copied; median {:?} without a mirror, {:?} with",
        plain, with_mirror
    );
    ensure!(
        (400..=600).contains(&drawn),
        "{drawn} copies of 1000 drawn at 50 %"
    );
    // The first 256 copies (the cap) always find room.
    ensure!(
        copies >= drawn.min(256),
        "only {copies} of {drawn} copies were sent"
    );
    ensure!(
        with_mirror < plain + Duration::from_millis(30),
        "the mirror slowed the main path: {with_mirror:?} against {plain:?}"
    );
    // A request with a body is copied with it.
    stats(shadow, true)?;
    fault(shadow, 0, 0)?;
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "mirror.toml",
        "[[route]]\nname = \"web\"\n[[route.rule]]\nmirror = { service = \"shadow\", percent = 100 }\n",
    )?;
    wait_version(&agents, v)?;
    for _ in 0..5 {
        upload(proxy, &to_a, 3000)?;
    }
    poll("5 uploads mirrored", Duration::from_secs(10), || {
        let (n, _, _) = stats(shadow, false).map_err(|e| e.to_string())?;
        (n == 5).then_some(()).ok_or(format!("{n}"))
    })?;

    // max_connections 10, max_pending 20: of 60 slow requests at once, 10
    // run, 20 wait their turn, 30 are refused at once.
    for svc in [a, b] {
        stats(svc, true)?;
    }
    let v = apply(
        &agents[0],
        dir,
        &alice,
        "limits.toml",
        "[[route]]\nname = \"web\"\ncircuit_breaker = { max_connections = 10, max_pending = 20 }\n",
    )?;
    wait_version(&agents, v)?;
    let results = burst(proxy, "/slow?ms=1000", &to_a, 60, 60)?;
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    let served = results.iter().filter(|r| r.0 == 200).count();
    let peaks = [stats(a, false)?.2, stats(b, false)?.2];
    eprintln!(
        "connection limit: {served} served, {} refused, upstream peaks {peaks:?}",
        refused.len()
    );
    ensure!(
        served == 30 && refused.len() == 30,
        "{served} served, {} refused",
        refused.len()
    );
    ensure!(
        refused.iter().all(|r| r.2 < Duration::from_millis(900)),
        "refusals must be fast"
    );
    ensure!(peaks.iter().sum::<u64>() <= 10, "upstream peaks {peaks:?}");
    Ok(())
}
