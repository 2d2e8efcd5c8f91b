//! TCP services through upstream listeners: half-close, bulk transfer,
//! concurrency, failover, bad input, and real Redis.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// The tests of this file run one at a time: each starts agents, servers
/// and up to a thousand connections, which is enough for 2 cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A loopback listener with room for a burst of a thousand connects in
/// its accept queue (the default 128 would drop some of them).
fn listen() -> Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind("127.0.0.1:0".parse()?)?;
    Ok(socket.listen(4096)?)
}

/// An echo server on a tokio runtime: greets each connection with
/// `NAME\n`, echoes every byte, and shuts its side once the client has.
async fn echo_server(name: &'static str) -> Result<SocketAddr> {
    let listener = listen()?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// `len` bytes of a fixed pseudo-random stream (xorshift), in chunks.
fn stream_chunk(state: &mut u64, buf: &mut [u8]) {
    for b in buf.iter_mut() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *b = (*state >> 24) as u8;
    }
}

/// A server that sends `len` bytes of the fixed stream to each
/// connection, then closes.
async fn source_server(len: u64) -> Result<SocketAddr> {
    let listener = listen()?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut state = 0x9E37_79B9_7F4A_7C15u64;
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    stream_chunk(&mut state, &mut buf[..n]);
                    if stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn sha256_of_stream(len: u64) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        stream_chunk(&mut state, &mut buf[..n]);
        ctx.update(&buf[..n]);
        left -= n as u64;
    }
    ctx.finish().as_ref().to_vec()
}

fn register_tcp(agent: &Agent, id: &str, service: &str, port: u16) -> Result<()> {
    let body = format!(
        r#"{{"name": "{service}", "port": {port}, "protocol": "tcp", "check": {{"tcp": true, "interval": "1s"}}}}"#
    );
    let (status, text) = agent.register(id, &body)?;
    ensure!(status == 200, "register {id}: {status} {text}");
    Ok(())
}

fn put_upstream(agent: &Agent, service: &str, body: &str) -> Result<(u16, String)> {
    http(
        agent.admin,
        "PUT",
        &format!("/v1/agent/upstreams/{service}"),
        Some(body),
    )
}

/// Connects, sends `msg`, shuts the write side, then reads the greeting
/// and everything echoed: (greeting, echo).
async fn echo_once(addr: SocketAddr, msg: &[u8]) -> Result<(String, Vec<u8>)> {
    let stream = TcpStream::connect(addr).await?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    w.write_all(msg).await?;
    w.shutdown().await?;
    let mut greeting = String::new();
    r.read_line(&mut greeting).await?;
    let mut back = Vec::new();
    r.read_to_end(&mut back).await?;
    Ok((greeting.trim().to_owned(), back))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

#[test]
fn tcp_upstreams_carry_bytes_half_close_bulk_and_many_connections() -> Result<()> {
    let _serial = one_at_a_time();
    let rt = runtime()?;
    let pki = Pki::new()?;
    let agents = mesh(&pki, 2, &[])?;
    let refs: Vec<&Agent> = agents.iter().collect();
    let echo = rt.block_on(echo_server("echo-1"))?;
    const BULK: u64 = 1 << 30;
    let source = rt.block_on(source_server(BULK))?;
    register_tcp(&agents[1], "echo-1", "echo", echo.port())?;
    register_tcp(&agents[1], "bulk-1", "bulk", source.port())?;
    wait_health(
        &refs,
        "echo",
        "echo-1",
        Some("passing"),
        Duration::from_secs(20),
    )?;
    wait_health(
        &refs,
        "bulk",
        "bulk-1",
        Some("passing"),
        Duration::from_secs(20),
    )?;

    // Bad input is refused with a clear error, and nothing changes.
    let port = free_port()?;
    let (status, text) = put_upstream(
        &agents[0],
        "nosuch",
        &format!(r#"{{"listen": "127.0.0.1:{port}"}}"#),
    )?;
    ensure!(
        status == 404 && text.contains("no instance of service"),
        "{status} {text}"
    );
    let (status, text) = put_upstream(
        &agents[0],
        "echo",
        &format!(r#"{{"listen": "{}"}}"#, agents[0].admin),
    )?;
    ensure!(
        status == 400 && text.contains("cannot listen on"),
        "{status} {text}"
    );
    let (status, text) = put_upstream(
        &agents[0],
        "echo",
        &format!(r#"{{"listen": "127.0.0.1:{port}", "hash": "ring"}}"#),
    )?;
    ensure!(status == 400 && text.contains("hash"), "{status} {text}");
    let (status, text) =
        agents[1].register("bad", r#"{"name": "echo", "port": 9, "protocol": "tcpx"}"#)?;
    ensure!(status == 400 && text.contains("tcp"), "{status} {text}");
    let (_, list) = agents[0].get("/v1/agent/upstreams")?;
    ensure!(list.trim() == "[]", "{list}");

    // The HTTP proxy refuses a TCP service, saying why.
    let (status, text) = via_proxy(agents[0].proxy, "echo", "k", "/")?;
    ensure!(status == 502, "{status} {text}");

    // An upstream listener for each service on n1.
    let up_echo: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (status, text) =
        put_upstream(&agents[0], "echo", &format!(r#"{{"listen": "{up_echo}"}}"#))?;
    ensure!(status == 200, "{status} {text}");
    let up_bulk: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let (status, text) = put_upstream(
        &agents[0],
        "bulk",
        &format!(r#"{{"listen": "{up_bulk}", "hash": "none"}}"#),
    )?;
    ensure!(status == 200, "{status} {text}");

    // Half-close: the client shuts its write side and still gets the
    // whole echo.
    let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (greeting, back) = rt.block_on(echo_once(up_echo, &msg))?;
    ensure!(greeting == "echo-1", "{greeting}");
    ensure!(
        back == msg,
        "echo of {} bytes came back as {}",
        msg.len(),
        back.len()
    );

    // 1 GiB arrives intact.
    let started = Instant::now();
    let got = rt.block_on(async {
        let mut stream = TcpStream::connect(up_bulk).await?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
            total += n as u64;
        }
        anyhow::Ok((total, ctx.finish().as_ref().to_vec()))
    })?;
    let took = started.elapsed();
    ensure!(got.0 == BULK, "{} of {BULK} bytes arrived", got.0);
    ensure!(got.1 == sha256_of_stream(BULK), "the 1 GiB arrived altered");
    eprintln!(
        "1 GiB through the mesh in {:.1} s ({:.0} MB/s, debug build)",
        took.as_secs_f64(),
        BULK as f64 / 1e6 / took.as_secs_f64()
    );

    // 1,000 connections open at once, each echoing its own message.
    let results = rt.block_on(async {
        let mut open = Vec::new();
        for i in 0..1000u32 {
            open.push(tokio::spawn(async move {
                let msg = format!("connection {i}\n");
                let (_, back) = echo_once(up_echo, msg.as_bytes()).await?;
                ensure!(back == msg.as_bytes(), "connection {i}: {back:?}");
                anyhow::Ok(())
            }));
        }
        let mut failed = Vec::new();
        for (i, task) in open.into_iter().enumerate() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("{i}: {e}")),
                Err(e) => failed.push(format!("{i}: {e}")),
            }
        }
        failed
    });
    ensure!(
        results.is_empty(),
        "{} of 1000 failed: {:?}",
        results.len(),
        &results[..results.len().min(5)]
    );
    let opened = agents[0]
        .metric(r#"gossamer_tcp_connections_total{service="echo",instance="n2/echo-1",outcome="opened"}"#)
        .unwrap_or(0.0);
    ensure!(opened >= 1001.0, "{opened}");

    // The upstreams survive a restart of n1 (runtime ones are saved), and
    // deleting one stops its listener.
    let (status, text) = http(agents[0].admin, "DELETE", "/v1/agent/upstreams/bulk", None)?;
    ensure!(status == 200, "{status} {text}");
    ensure!(
        std::net::TcpStream::connect(up_bulk).is_err(),
        "bulk's listener still accepts"
    );
    let (_, list) = agents[0].get("/v1/agent/upstreams")?;
    ensure!(
        list.contains("\"echo\"") && !list.contains("\"bulk\""),
        "{list}"
    );
    let saved = std::fs::read_to_string(agents[0].data_dir.join("upstreams.json"))?;
    ensure!(saved.contains("echo") && !saved.contains("bulk"), "{saved}");
    Ok(())
}

#[test]
fn a_tcp_client_is_reset_when_its_owner_dies_and_reconnects_elsewhere() -> Result<()> {
    let _serial = one_at_a_time();
    let rt = runtime()?;
    let pki = Pki::new()?;
    let mut agents = mesh(&pki, 3, &[])?;
    let e2 = rt.block_on(echo_server("echo-n2"))?;
    let e3 = rt.block_on(echo_server("echo-n3"))?;
    register_tcp(&agents[1], "echo-n2", "echo", e2.port())?;
    register_tcp(&agents[2], "echo-n3", "echo", e3.port())?;
    for id in ["echo-n2", "echo-n3"] {
        let refs: Vec<&Agent> = agents.iter().collect();
        wait_health(&refs, "echo", id, Some("passing"), Duration::from_secs(20))?;
    }
    let up: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let (status, text) = put_upstream(&agents[0], "echo", &format!(r#"{{"listen": "{up}"}}"#))?;
    ensure!(status == 200, "{status} {text}");

    // An open connection, mid-stream.
    let (owner, mut conn) = rt.block_on(async {
        let stream = TcpStream::connect(up).await?;
        let mut r = BufReader::new(stream);
        let mut greeting = String::new();
        r.read_line(&mut greeting).await?;
        r.get_mut().write_all(b"ping\n").await?;
        let mut line = String::new();
        r.read_line(&mut line).await?;
        ensure!(line == "ping\n", "{line:?}");
        anyhow::Ok((greeting.trim().to_owned(), r))
    })?;
    let (dying, survivor) = match owner.as_str() {
        "echo-n2" => (1, "echo-n3"),
        "echo-n3" => (2, "echo-n2"),
        other => bail!("greeted by {other:?}"),
    };
    let killed = Instant::now();
    agents[dying].kill();

    // The client sees its connection end with an error (a reset) once the
    // owner is declared down, not hang.
    let ended = rt.block_on(async {
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf)).await
    });
    match ended {
        Ok(Err(_)) | Ok(Ok(0)) => {}
        Ok(Ok(n)) => bail!("read {n} bytes from a dead owner"),
        Err(_) => bail!("the connection to the dead owner hung for 30 s"),
    }
    let reset_after = killed.elapsed();

    // New connections reach the other instance.
    let (greeting, took) = poll(
        "a new connection to reach the survivor",
        Duration::from_secs(30),
        || match rt.block_on(echo_once(up, b"again")) {
            Ok((g, back)) if g == survivor && back == b"again" => Ok(g),
            other => Err(format!("{other:?}")),
        },
    )?;
    eprintln!(
        "owner killed: client reset after {:.1} s, new connections on {greeting} {:.1} s later",
        reset_after.as_secs_f64(),
        took.as_secs_f64()
    );
    Ok(())
}

/// `redis-benchmark -q -n 20000` against `port`: (requests per second per
/// test, the whole output).
fn redis_benchmark(port: u16) -> Result<(Vec<(String, f64)>, String)> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-q", "-n", "20000"])
        .output()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "redis-benchmark failed: {text}");
    let mut rates = Vec::new();
    for line in text.split(['\n', '\r']) {
        // "SET: 41237.11 requests per second, p50=0.607 msec"
        if let Some((name, rest)) = line.split_once(": ")
            && let Some(rate) = rest.split(" requests per second").next()
            && let Ok(rate) = rate.trim().parse::<f64>()
        {
            rates.push((name.trim().to_owned(), rate));
        }
    }
    Ok((rates, text))
}

#[test]
fn redis_through_the_mesh() -> Result<()> {
    let _serial = one_at_a_time();
    for (command, package) in [
        ("redis-server", "redis-server"),
        ("redis-cli", "redis-tools"),
    ] {
        if let Err(why) = ensure_installed(command, package) {
            eprintln!("SKIPPED redis_through_the_mesh: {why} (install Debian's {package})");
            return Ok(());
        }
    }
    let pki = Pki::new()?;
    let agents = mesh(&pki, 2, &[])?;
    let redis_port = free_port()?;
    let dir = pki.dir.path().join("redis");
    std::fs::create_dir_all(&dir)?;
    let mut redis = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&dir)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start redis-server")?;
    let result = (|| -> Result<()> {
        register_tcp(&agents[1], "redis-1", "redis", redis_port)?;
        let refs: Vec<&Agent> = agents.iter().collect();
        wait_health(
            &refs,
            "redis",
            "redis-1",
            Some("passing"),
            Duration::from_secs(20),
        )?;
        let up = free_port()?;
        let (status, text) = put_upstream(
            &agents[0],
            "redis",
            &format!(r#"{{"listen": "127.0.0.1:{up}"}}"#),
        )?;
        ensure!(status == 200, "{status} {text}");

        let cli = |args: &[&str]| -> Result<String> {
            let out = Command::new("redis-cli")
                .args(["-p", &up.to_string()])
                .args(args)
                .output()?;
            ensure!(
                out.status.success(),
                "redis-cli {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        ensure!(cli(&["ping"])? == "PONG");
        ensure!(cli(&["set", "mesh", "gossamer"])? == "OK");
        ensure!(cli(&["get", "mesh"])? == "gossamer");

        let (through, text) = redis_benchmark(up)?;
        ensure!(!through.is_empty(), "no rates in {text}");
        ensure!(!text.to_lowercase().contains("error"), "{text}");
        let (direct, _) = redis_benchmark(redis_port)?;
        eprintln!(
            "redis-benchmark -q -n 20000, requests/s (debug build agents): test, direct, through the mesh"
        );
        for (name, rate) in &through {
            let d = direct
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0.0, |(_, r)| *r);
            eprintln!("  {name:<40} {d:>10.0} {rate:>10.0}");
        }
        Ok(())
    })();
    let _ = redis.kill();
    let _ = redis.wait();
    result
}

#[test]
fn upstreams_from_the_config_file_serve_http_and_obey_l4_authz() -> Result<()> {
    let _serial = one_at_a_time();
    let rt = runtime()?;
    let pki = Pki::new()?;
    let ops = pki.issue_operator("ops")?;
    let first = Agent::start(&pki, "n1", AgentOptions::default())?;
    let web = DemoService::start("web-n2", None)?;
    let echo = rt.block_on(echo_server("echo-n2"))?;
    let [up_web, up_echo] = free_ports()?;

    // n2 hosts web (HTTP) and echo (TCP); n1's config file dials both
    // through upstream listeners.
    let n2_config = pki.dir.path().join("n2.toml");
    std::fs::write(
        &n2_config,
        format!(
            "[[service]]\nid = \"web-n2\"\nname = \"web\"\nport = {}\n\n[[service]]\nid = \"echo-n2\"\nname = \"echo\"\nport = {}\nprotocol = \"tcp\"\ncheck = {{ tcp = true, interval = \"1s\" }}\n",
            web.addr.port(),
            echo.port()
        ),
    )?;
    let n2 = Agent::start(
        &pki,
        "n2",
        AgentOptions {
            seeds: vec![first.seed()],
            config: Some(n2_config),
            ..Default::default()
        },
    )?;
    drop(first);
    let n1_config = pki.dir.path().join("n1.toml");
    std::fs::write(
        &n1_config,
        format!(
            "[[upstream]]\nservice = \"web\"\nlisten = \"127.0.0.1:{up_web}\"\n\n[[upstream]]\nservice = \"echo\"\nlisten = \"127.0.0.1:{up_echo}\"\nhash = \"none\"\n"
        ),
    )?;
    let n1 = Agent::start(
        &pki,
        "n1",
        AgentOptions {
            seeds: vec![n2.seed()],
            config: Some(n1_config.clone()),
            ..Default::default()
        },
    )?;
    let refs = [&n1, &n2];
    wait_health(
        &refs,
        "echo",
        "echo-n2",
        Some("passing"),
        Duration::from_secs(20),
    )?;
    wait_health(
        &refs,
        "web",
        "web-n2",
        Some("passing"),
        Duration::from_secs(20),
    )?;

    // HTTP with no Host header at all (HTTP/1.0), and with a wrong one:
    // the listener serves web whatever the request names.
    for request in [
        "GET /hello HTTP/1.0\r\n\r\n".to_owned(),
        "GET /hello HTTP/1.1\r\nHost: elsewhere.example\r\nConnection: close\r\n\r\n".to_owned(),
    ] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", up_web))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(request.as_bytes())?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        ensure!(
            answer.starts_with("HTTP/1.") && answer.contains(" 200 "),
            "{answer}"
        );
        ensure!(answer.contains("web-n2"), "{answer}");
    }
    let (_, list) = n1.get("/v1/agent/upstreams")?;
    ensure!(list.contains("\"source\": \"config\""), "{list}");
    let (status, text) = http(n1.admin, "DELETE", "/v1/agent/upstreams/web", None)?;
    ensure!(
        status == 409 && text.contains("config file"),
        "{status} {text}"
    );

    // An L4 rule (no http block) denying n1 cuts its TCP connections; an
    // L7 rule says nothing about TCP.
    let up: SocketAddr = format!("127.0.0.1:{up_echo}").parse()?;
    ensure!(rt.block_on(echo_once(up, b"before"))?.1 == b"before");
    let doc = pki.dir.path().join("authz-echo.toml");
    std::fs::write(
        &doc,
        "[[authz]]\nname = \"echo\"\ndefault = \"allow\"\n[[authz.rule]]\nfrom = { nodes = [\"n1\"] }\naction = \"allow\"\nhttp = { paths = [{ prefix = \"/\" }] }\n[[authz.rule]]\nfrom = { nodes = [\"n1\"] }\naction = \"deny\"\n",
    )?;
    let applied = config_apply(&n1, &doc, &ops);
    ensure!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    wait_doc_version(&refs, "authz", "echo", 1)?;
    let denied = rt.block_on(echo_once(up, b"after"));
    ensure!(
        denied.as_ref().map_or(true, |(_, back)| back.is_empty()),
        "a denied connection echoed: {denied:?}"
    );
    let denials = n2
        .metric(r#"gossamer_authz_decisions_total{service="echo",rule="rule 1",decision="deny"}"#)
        .unwrap_or(0.0);
    ensure!(denials >= 1.0, "{denials}");
    drop(n1);

    // Config-file mistakes stop the agent with a clear error.
    let (cert, key) = pki.issue("n3")?;
    for (text, expect) in [
        (
            format!(
                "[[upstream]]\nservice = \"web\"\nlisten = \"{}\"\n",
                n2.admin
            ),
            "cannot listen on",
        ),
        (
            "[[upstream]]\nservice = \"web\"\nlisten = \"127.0.0.1:1\"\nhash = \"ring\"\n"
                .to_owned(),
            "upstream[0].hash",
        ),
        (
            "[[upstream]]\nservice = \"web\"\nlisten = \"nowhere\"\n".to_owned(),
            "upstream[0].listen",
        ),
        (
            "[[service]]\nname = \"db\"\nport = 5432\nprotocol = \"postgres\"\n".to_owned(),
            "tcp",
        ),
    ] {
        let file = pki.dir.path().join("bad.toml");
        std::fs::write(&file, &text)?;
        let out = agent_once(
            &pki,
            "n3",
            &cert,
            &key,
            &["--config", file.to_str().unwrap()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains(expect),
            "{text}: {stderr}"
        );
    }
    Ok(())
}
