//! Access logs through real agents: n1 calls `web` on n2 and writes one
//! JSON line per request (and per TCP connection) to a file.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use support::{Agent, AgentOptions, DemoService, Pki, poll, wait_health};

/// One request through `proxy`: the status.
fn call(proxy: SocketAddr, head: &str) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(head.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.split(' ').nth(1).context("no status")?.parse()?)
}

/// The access-log lines written so far.
fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Polls until a line with this request id is written.
fn line_for(path: &std::path::Path, id: &str) -> Result<Value> {
    let (line, _) = poll(
        &format!("the access-log line of {id}"),
        Duration::from_secs(10),
        || {
            lines(path)
                .into_iter()
                .find(|v| v["request_id"] == id)
                .ok_or_else(|| format!("{} lines so far", lines(path).len()))
        },
    )?;
    Ok(line)
}

#[test]
fn access_log_lines_carry_status_flags_retries_and_ids() -> Result<()> {
    let pki = Pki::new()?;
    let dir = pki.dir.path().to_owned();
    let web = DemoService::start("web-live", None)?;
    // An instance with no health check stays listed while nothing listens:
    // requests hashed to it fail to connect and are retried elsewhere.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let n2_config = dir.join("n2.toml");
    std::fs::write(
        &n2_config,
        format!(
            "[[service]]\nid = \"live\"\nname = \"web\"\nport = {}\n\n[[service]]\nid = \"dead\"\nname = \"web\"\nport = {dead}\n",
            web.addr.port()
        ),
    )?;
    let n2 = Agent::start(
        &pki,
        "n2",
        AgentOptions {
            config: Some(n2_config),
            ..Default::default()
        },
    )?;
    let log = dir.join("access.log");
    let n1_config = dir.join("n1.toml");
    std::fs::write(
        &n1_config,
        format!(
            "[access_log]\nenabled = true\npath = {:?}\nsample = 1.0\n",
            log
        ),
    )?;
    let n1 = Agent::start(
        &pki,
        "n1",
        AgentOptions {
            seeds: vec![n2.seed()],
            config: Some(n1_config),
            ..Default::default()
        },
    )?;
    wait_health(
        &[&n1],
        "web",
        "dead",
        Some("passing"),
        Duration::from_secs(30),
    )?;
    wait_health(
        &[&n1],
        "web",
        "live",
        Some("passing"),
        Duration::from_secs(30),
    )?;

    // A plain request, with the client's request id and trace context.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let status = call(
        n1.proxy,
        &format!(
            "GET /hello?x=1 HTTP/1.1\r\nHost: web\r\nx-request-id: plain-1\r\n\
             traceparent: 00-{trace}-00f067aa0ba902b7-01\r\nConnection: close\r\n\r\n"
        ),
    )?;
    let v = line_for(&log, "plain-1")?;
    ensure!(
        v["status"] == status && v["method"] == "GET" && v["path"] == "/hello",
        "{v}"
    );
    ensure!(
        v["listener"] == "proxy" && v["protocol"] == "HTTP/1.1" && v["service"] == "web",
        "{v}"
    );
    ensure!(v["trace_id"] == trace && v["source_node"] == "n1", "{v}");
    ensure!(
        v["node"] == "n2" && v["flags"].as_array().is_some_and(|f| f.is_empty()),
        "{v}"
    );
    ensure!(
        v["bytes_out"].as_u64() > Some(0) && v["duration_ms"].as_f64() > Some(0.0),
        "{v}"
    );
    ensure!(
        v["start"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z') && s.len() == 24),
        "{v}"
    );

    // An unknown service: 503 with the no-route flag.
    let status = call(
        n1.proxy,
        "GET / HTTP/1.1\r\nHost: nosuch\r\nx-request-id: unknown-1\r\nConnection: close\r\n\r\n",
    )?;
    let v = line_for(&log, "unknown-1")?;
    ensure!(
        status == 503 && v["status"] == 503 && v["flags"] == serde_json::json!(["NR"]),
        "{v}"
    );

    // Keys hashed to the dead instance are retried on the live one.
    let mut retried = None;
    for i in 0..200 {
        let id = format!("key-{i}");
        let status = call(
            n1.proxy,
            &format!(
                "GET / HTTP/1.1\r\nHost: web\r\nx-hash-key: {id}\r\nx-request-id: {id}\r\nConnection: close\r\n\r\n"
            ),
        )?;
        ensure!(status == 200, "{id}: {status}");
        let v = line_for(&log, &id)?;
        if v["retries"].as_u64() > Some(0) {
            retried = Some(v);
            break;
        }
    }
    let v = retried.context("no request was retried")?;
    ensure!(v["status"] == 200 && v["instance"] == "n2/live", "{v}");
    Ok(())
}

#[test]
fn tap_shows_requests_at_once_and_keeps_to_its_rate() -> Result<()> {
    use std::io::BufRead;
    let pki = Pki::new()?;
    let dir = pki.dir.path().to_owned();
    let web = DemoService::start("web-1", None)?;
    let config = dir.join("n1.toml");
    std::fs::write(
        &config,
        format!(
            "[[service]]\nid = \"web-1\"\nname = \"web\"\nport = {}\n",
            web.addr.port()
        ),
    )?;
    let n1 = Agent::start(
        &pki,
        "n1",
        AgentOptions {
            config: Some(config),
            ..Default::default()
        },
    )?;
    wait_health(
        &[&n1],
        "web",
        "web-1",
        Some("passing"),
        Duration::from_secs(30),
    )?;

    // A watcher, at 5 requests a second, showing one header's value.
    let mut watch = TcpStream::connect(n1.admin)?;
    watch.write_all(
        b"GET /v1/tap?service=web&max_rate=5&headers=x-user HTTP/1.1\r\nHost: admin\r\n\r\n",
    )?;
    let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Value)>();
    let reader = watch.try_clone()?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            // Chunk sizes are numbers too: only objects are events.
            if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line.trim())
                && tx.send((std::time::Instant::now(), v)).is_err()
            {
                return;
            }
        }
    });
    let (_, hello) = rx.recv_timeout(Duration::from_secs(10))?;
    ensure!(hello["tap"] == "started", "{hello}");

    // One request: it shows within a second, its secret header redacted.
    let sent = std::time::Instant::now();
    call(
        n1.proxy,
        "GET /one HTTP/1.1\r\nHost: web\r\nx-request-id: tap-1\r\nx-user: alice\r\n\
         authorization: Bearer secret\r\nConnection: close\r\n\r\n",
    )?;
    let (at, v) = rx.recv_timeout(Duration::from_secs(5))?;
    let delay = at.duration_since(sent);
    println!("tap: the request showed {delay:?} after it was sent");
    ensure!(
        v["request_id"] == "tap-1" && v["path"] == "/one" && v["status"] == 200,
        "{v}"
    );
    ensure!(delay < Duration::from_secs(1), "{delay:?}");
    ensure!(v["headers"]["x-user"] == "alice", "{v}");
    ensure!(v["headers"]["authorization"] == "[redacted]", "{v}");
    // Another service's requests are filtered out.
    call(
        n1.proxy,
        "GET / HTTP/1.1\r\nHost: nosuch\r\nConnection: close\r\n\r\n",
    )?;

    // 60 requests at once: at most the rate (with a second's burst) show.
    let burst = std::time::Instant::now();
    for i in 0..60 {
        call(
            n1.proxy,
            &format!(
                "GET /burst HTTP/1.1\r\nHost: web\r\nx-request-id: b-{i}\r\nConnection: close\r\n\r\n"
            ),
        )?;
    }
    std::thread::sleep(Duration::from_secs(3));
    let window = burst.elapsed().as_secs_f64();
    let mut shown = 0;
    let mut dropped = 0;
    while let Ok((_, v)) = rx.try_recv() {
        if v["service"] == "nosuch" {
            anyhow::bail!("the filter let another service through: {v}");
        }
        if let Some(n) = v["dropped"].as_u64() {
            dropped += n;
        } else if v["path"] == "/burst" {
            shown += 1;
        }
    }
    println!(
        "tap: of 60 requests in {window:.1} s at max_rate 5, {shown} shown, {dropped} counted as dropped"
    );
    // The bucket held at most 5 (less the one shown above) plus 5 a second.
    ensure!(
        shown as f64 <= 5.0 + 5.0 * window,
        "{shown} shown in {window:.1} s"
    );
    ensure!(
        shown >= 4 && dropped > 0,
        "{shown} shown, {dropped} dropped"
    );
    drop(watch);
    Ok(())
}
