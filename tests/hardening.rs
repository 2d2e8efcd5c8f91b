//! The data plane against broken and hostile clients, HTTP details real
//! clients depend on, the instance's protocol, and the admin API's guards.
//! Every test here failed before the fix it covers.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use support::{Agent, AgentOptions, DemoService, Pki, Upstream, gossamer, http, poll, wait_health};

/// One agent hosting `web` (a demo service), with `config` as its file.
fn one_agent(config: &str) -> Result<(Pki, Agent, DemoService)> {
    let pki = Pki::new()?;
    let path = pki.dir.path().join("agent.toml");
    std::fs::write(&path, config)?;
    let agent = Agent::start(
        &pki,
        "n1",
        AgentOptions {
            config: Some(path),
            ..Default::default()
        },
    )?;
    let web = DemoService::start("web-1", None)?;
    let (status, text) = agent.register(
        "web-1",
        &format!(r#"{{"name": "web", "port": {}}}"#, web.addr.port()),
    )?;
    ensure!(status == 200, "register: {text}");
    wait_health(
        &[&agent],
        "web",
        "web-1",
        Some("passing"),
        Duration::from_secs(10),
    )?;
    Ok((pki, agent, web))
}

/// Sends raw bytes and reads whatever comes back until the server closes
/// or `wait` passes.
fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(wait))?;
    s.write_all(bytes)?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn status_of(response: &str) -> Option<u16> {
    response.split(' ').nth(1)?.parse().ok()
}

/// Established TCP connections whose local or remote port is `port`.
fn established(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of = |a: &str| {
                a.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if f.len() > 3
                && f[3] == "01"
                && (port_of(f[1]) == Some(port) || port_of(f[2]) == Some(port))
            {
                n += 1;
            }
        }
    }
    n
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn http_details_that_real_clients_depend_on() -> Result<()> {
    let (_pki, agent, web) = one_agent("")?;
    let p = agent.proxy;
    let wait = Duration::from_secs(10);

    // Two Host headers: 400, and nothing reaches the service.
    let r = raw(
        p,
        b"GET / HTTP/1.1\r\nHost: web\r\nHost: other\r\nConnection: close\r\n\r\n",
        wait,
    )?;
    ensure!(status_of(&r) == Some(400), "two Host headers: {r}");
    ensure!(r.contains("more than one Host header"), "{r}");

    // An absolute-form URI: the service sees a Host that matches the URI.
    let r = raw(
        p,
        b"GET http://web.mesh/abs HTTP/1.1\r\nHost: something-else\r\nConnection: close\r\n\r\n",
        wait,
    )?;
    ensure!(status_of(&r) == Some(200), "absolute form: {r}");
    ensure!(
        r.contains(r#""host":"web.mesh""#) || r.contains(r#""host": "web.mesh""#),
        "Host not rewritten: {r}"
    );

    // A 10 KB Host is refused without echoing it back.
    let long = "a".repeat(10_000);
    let r = raw(
        p,
        format!("GET / HTTP/1.1\r\nHost: {long}\r\nConnection: close\r\n\r\n").as_bytes(),
        wait,
    )?;
    ensure!(
        status_of(&r) == Some(400),
        "long Host: {}",
        &r[..r.len().min(200)]
    );
    ensure!(
        r.len() < 1024,
        "the answer echoes the Host: {} bytes",
        r.len()
    );

    // A malformed chunked body is the client's fault: 400, never 502, and
    // it never counts against the instance (5 failures would eject it).
    for _ in 0..8 {
        let r = raw(
            p,
            b"POST /upload HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            wait,
        )?;
        ensure!(status_of(&r) == Some(400), "malformed chunked body: {r}");
    }
    // Clients that hang up mid-body: not the instance's fault either.
    for _ in 0..8 {
        let mut s = TcpStream::connect(p)?;
        s.write_all(
            b"POST /upload HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\npartial",
        )?;
        std::thread::sleep(Duration::from_millis(50));
        drop(s);
    }
    let ejections = agent
        .metric("gossamer_proxy_ejections_total")
        .unwrap_or(0.0);
    ensure!(
        ejections == 0.0,
        "a healthy instance was ejected for client mistakes"
    );
    let (status, _) = support::via_proxy(p, "web", "k", "/")?;
    ensure!(status == 200, "web no longer served: {status}");

    // Clients that go away before the response head leak no in-flight count.
    for _ in 0..20 {
        let mut s = TcpStream::connect(p)?;
        s.write_all(b"GET /slow?ms=2000 HTTP/1.1\r\nHost: web\r\n\r\n")?;
        std::thread::sleep(Duration::from_millis(20));
        drop(s);
    }
    poll(
        "active streams back to 0",
        Duration::from_secs(10),
        || match agent.metric("gossamer_proxy_active_streams") {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    drop(web);
    Ok(())
}

#[test]
fn hostile_connections_are_capped_and_timed_out() -> Result<()> {
    let (_pki, agent, web) = one_agent(
        "[limits]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nproxy_max_connections = 50\n\n[proxy]\nupstream_idle_timeout = \"1s\"\n",
    )?;
    let p = agent.proxy;

    // A partial head and a one-byte-a-second sender are both cut off.
    let started = Instant::now();
    let mut partial = TcpStream::connect(p)?;
    partial.write_all(b"GET / HTTP/1.1\r\nHost: we")?;
    let slow = std::thread::spawn(move || -> Duration {
        let started = Instant::now();
        let Ok(mut s) = TcpStream::connect(p) else {
            return Duration::ZERO;
        };
        for b in b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if started.elapsed() > Duration::from_secs(20) {
                break;
            }
        }
        started.elapsed()
    });
    partial.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 64];
    let n = partial.read(&mut buf).unwrap_or(0);
    ensure!(n == 0, "a partial head got an answer");
    let took = started.elapsed();
    ensure!(took < Duration::from_secs(5), "partial head held {took:?}");
    let slow_took = slow.join().expect("thread");
    ensure!(
        slow_took < Duration::from_secs(8),
        "slow sender held {slow_took:?}"
    );

    // Idle connections over the cap are refused, /health still answers,
    // and once the idle ones are closed the proxy serves again.
    let idle: Vec<TcpStream> = (0..120)
        .filter_map(|_| TcpStream::connect(p).ok())
        .collect();
    let (status, _) = http(agent.admin, "GET", "/health", None)?;
    ensure!(status == 200, "/health: {status}");
    poll("refusals counted", Duration::from_secs(5), || {
        match agent.metric("gossamer_listener_refused_total{listener=\"proxy\"}") {
            Some(v) if v >= 50.0 => Ok(v),
            other => Err(format!("{other:?}")),
        }
    })?;
    poll(
        "idle connections closed",
        Duration::from_secs(15),
        || match agent.metric("gossamer_listener_connections{listener=\"proxy\"}") {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )?;
    drop(idle);
    let (status, _) = support::via_proxy(p, "web", "k", "/")?;
    ensure!(status == 200, "proxy after the flood: {status}");

    // The pooled upstream connection is reaped after upstream_idle_timeout.
    poll(
        "upstream pool reaped",
        Duration::from_secs(10),
        || match established(web.addr.port()) {
            0 => Ok(()),
            n => Err(format!("{n} connections to the instance")),
        },
    )?;

    // The admin listener has its own timeouts.
    let mut a = TcpStream::connect(agent.admin)?;
    a.write_all(b"GET /health HTTP/1.1\r\n")?;
    a.set_read_timeout(Some(Duration::from_secs(10)))?;
    let started = Instant::now();
    let _ = a.read(&mut buf);
    ensure!(
        started.elapsed() < Duration::from_secs(5),
        "admin partial head held"
    );
    Ok(())
}

#[test]
fn h2c_callers_reach_http1_only_instances() -> Result<()> {
    let pki = Pki::new()?;
    let agent = Agent::start(&pki, "n1", AgentOptions::default())?;
    let h1 = Upstream::start("h1-only")?;
    let (status, text) = agent.register(
        "old-1",
        &format!(r#"{{"name": "old", "port": {}}}"#, h1.addr.port()),
    )?;
    ensure!(status == 200, "{text}");
    wait_health(
        &[&agent],
        "old",
        "old-1",
        Some("passing"),
        Duration::from_secs(10),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt.block_on(h2c_get(agent.proxy, "old"))?;
    ensure!(
        status == 200,
        "h2c to an HTTP/1.1 instance: {status} {body}"
    );
    ensure!(body.contains("h1-only"), "{body}");

    // Declared h2c but speaking HTTP/1.1: a 502 that names the instance and
    // its protocol, not the node.
    let (status, text) = agent.register(
        "wrong-1",
        &format!(
            r#"{{"name": "wrong", "port": {}, "protocol": "h2c"}}"#,
            h1.addr.port()
        ),
    )?;
    ensure!(status == 200, "{text}");
    wait_health(
        &[&agent],
        "wrong",
        "wrong-1",
        Some("passing"),
        Duration::from_secs(10),
    )?;
    let (status, body) = rt.block_on(h2c_get(agent.proxy, "wrong"))?;
    ensure!(status == 502, "{status} {body}");
    ensure!(
        body.contains("n1/wrong-1") && body.contains("protocol h2c"),
        "{body}"
    );

    let (status, text) =
        agent.register("bad-1", r#"{"name": "bad", "port": 1, "protocol": "h3"}"#)?;
    ensure!(
        status == 400 && text.contains("protocol"),
        "{status} {text}"
    );
    Ok(())
}

/// One h2c request with prior knowledge, `:authority` naming the service.
async fn h2c_get(proxy: SocketAddr, service: &str) -> Result<(u16, String)> {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(proxy).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{service}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .context("no answer")??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Relays every connection to `to`, like a service that calls the mesh
/// with the headers it was given (so a loop forms if it is registered as
/// the service it calls).
fn relay(to: SocketAddr, stop: Arc<AtomicBool>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((a, _)) => {
                    let _ = a.set_nonblocking(false);
                    let Ok(b) = TcpStream::connect(to) else {
                        continue;
                    };
                    let (mut a2, mut b2) =
                        (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
                    let (mut a, mut b) = (a, b);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut a, &mut b);
                        let _ = b.shutdown(std::net::Shutdown::Write);
                    });
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut b2, &mut a2);
                        let _ = a2.shutdown(std::net::Shutdown::Write);
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    Ok(addr)
}

#[test]
fn loops_and_self_registration_are_refused() -> Result<()> {
    let pki = Pki::new()?;
    let config = pki.dir.path().join("agent.toml");
    let [gateway, upstream] = support::free_ports::<2>()?;
    // Short idle timeouts, so the connections each hop pooled are reaped.
    std::fs::write(
        &config,
        format!(
            "[limits]\nidle_timeout = \"2s\"\n[proxy]\nupstream_idle_timeout = \"1s\"\n\
             [[upstream]]\nservice = \"db\"\nlisten = \"127.0.0.1:{upstream}\"\n\
             [[ingress.listener]]\nlisten = \"127.0.0.1:{gateway}\"\n"
        ),
    )?;
    let agent = Agent::start(
        &pki,
        "n1",
        AgentOptions {
            config: Some(config),
            ..Default::default()
        },
    )?;
    for (what, port) in [
        ("admin", agent.admin.port()),
        ("proxy", agent.proxy.port()),
        ("gateway", gateway),
        ("upstream", upstream),
    ] {
        for address in ["127.0.0.1", "localhost", "0.0.0.0"] {
            let (status, text) = agent.register(
                "self-1",
                &format!(r#"{{"name": "self", "port": {port}, "address": "{address}"}}"#),
            )?;
            ensure!(
                status == 400 && text.contains("own"),
                "{what} at {address}: {status} {text}"
            );
        }
    }

    // The QUIC listener is UDP: a TCP service may have its port number.
    let (status, text) = agent.register(
        "beside-quic-1",
        &format!(
            r#"{{"name": "beside-quic", "port": {}}}"#,
            agent.quic.port()
        ),
    )?;
    ensure!(
        status == 200,
        "a TCP service on the QUIC port's number: {status} {text}"
    );
    agent.deregister("beside-quic-1")?;

    let stop = Arc::new(AtomicBool::new(false));
    let relay = relay(agent.proxy, stop.clone())?;
    let (status, text) = agent.register(
        "loop-1",
        &format!(r#"{{"name": "loop", "port": {}}}"#, relay.port()),
    )?;
    ensure!(status == 200, "{text}");
    wait_health(
        &[&agent],
        "loop",
        "loop-1",
        Some("passing"),
        Duration::from_secs(10),
    )?;
    let before = open_fds(agent.pid());
    let r = raw(
        agent.proxy,
        b"GET / HTTP/1.1\r\nHost: loop\r\nConnection: close\r\n\r\n",
        Duration::from_secs(20),
    )?;
    ensure!(status_of(&r) == Some(508), "loop: {r}");
    ensure!(r.contains("request loop"), "{r}");
    stop.store(true, Ordering::Relaxed);
    poll("descriptors released", Duration::from_secs(15), || {
        let now = open_fds(agent.pid());
        if now <= before + 4 {
            Ok(())
        } else {
            Err(format!("{before} before, {now} now"))
        }
    })?;
    Ok(())
}

#[test]
fn admin_writes_need_json_and_the_token() -> Result<()> {
    let pki = Pki::new()?;
    let token = pki.dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-admin-token-0123456789\n")?;
    let agent = Agent::start(
        &pki,
        "n1",
        AgentOptions {
            extra: vec!["--admin-token-file".into(), token.display().to_string()],
            ..Default::default()
        },
    )?;
    let body = r#"{"name": "web", "port": 8080}"#;
    let put = |headers: &str, id: &str| -> Result<u16> {
        let r = raw(
            agent.admin,
            format!(
                "PUT /v1/agent/services/{id} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
            Duration::from_secs(10),
        )?;
        status_of(&r).with_context(|| format!("no status: {r}"))
    };
    let auth = "Authorization: Bearer s3cret-admin-token-0123456789\r\n";
    ensure!(
        put("Content-Type: application/json\r\n", "web-1")? == 401,
        "no token"
    );
    ensure!(
        put(
            "Content-Type: application/json\r\nAuthorization: Bearer wrong\r\n",
            "web-1"
        )? == 401,
        "wrong token"
    );
    ensure!(
        put(&format!("{auth}Content-Type: text/plain\r\n"), "web-1")? == 415,
        "not JSON"
    );
    ensure!(put(auth, "web-1")? == 415, "no content type");
    ensure!(
        put(&format!("{auth}Content-Type: application/json\r\n"), ".")? == 400,
        "id ."
    );
    ensure!(
        put(&format!("{auth}Content-Type: application/json\r\n"), "..")? == 400,
        "id .."
    );
    ensure!(
        put(
            &format!("{auth}Content-Type: application/json; charset=utf-8\r\n"),
            "web-1"
        )? == 200,
        "good write"
    );
    let (status, _) = agent.get("/v1/agent/services")?;
    ensure!(status == 200, "reads need no token");

    // The CLI sends the token from the file.
    let admin = agent.admin.to_string();
    let out = gossamer(&["leave", "--admin", &admin]);
    ensure!(!out.status.success(), "leave without the token worked");
    let out = gossamer(&[
        "leave",
        "--admin",
        &admin,
        "--admin-token-file",
        &token.display().to_string(),
    ]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `bin` on the PATH, installing Debian's `package` when missing; why not
/// when it cannot be had.
fn ensure_tool(bin: &str, package: &str) -> std::result::Result<(), String> {
    let found = || {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {bin}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if found() {
        return Ok(());
    }
    let install = format!(
        "(apt-get install -y -qq {package} || (apt-get update -qq && apt-get install -y -qq {package})) >/dev/null 2>&1"
    );
    let _ = std::process::Command::new("sh")
        .args(["-c", &install])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    if found() {
        Ok(())
    } else {
        Err(format!(
            "{bin} not found and Debian's {package} could not be installed"
        ))
    }
}

#[test]
fn curl_and_nghttp2_clients() -> Result<()> {
    let (_pki, agent, _web) = one_agent("")?;
    let p = agent.proxy.to_string();
    if let Err(why) = ensure_tool("curl", "curl") {
        eprintln!("SKIPPED curl_and_nghttp2_clients: {why}");
        return Ok(());
    }
    // The documented proxy form: curl reads the lower-case variable.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-m", "10", "http://web.mesh/via-proxy"])
        .env("http_proxy", format!("http://{p}"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "curl via http_proxy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("web-1") && text.contains("web.mesh"),
        "{text}"
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-m",
            "10",
            "--http2-prior-knowledge",
            "-H",
            "Host: web",
        ])
        .arg(format!("http://{p}/h2"))
        .output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("web-1"),
        "curl h2c: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    if let Err(why) = ensure_tool("h2load", "nghttp2-client") {
        eprintln!("SKIPPED the nghttp2 part of curl_and_nghttp2_clients: {why}");
        return Ok(());
    }
    // 2,000 h2c requests, 10 connections, 10 streams each, to an instance
    // that the agent calls over HTTP/1.1.
    let out = std::process::Command::new("h2load")
        .args([
            "-n",
            "2000",
            "-c",
            "10",
            "-m",
            "10",
            "-H",
            ":authority: web",
        ])
        .arg(format!("http://{p}/"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "h2load: {text}"
    );
    let out = std::process::Command::new("nghttp")
        .args(["-H", ":authority: web.mesh"])
        .arg(format!("http://{p}/nghttp"))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("/nghttp"),
        "nghttp: {text}"
    );
    Ok(())
}

#[test]
fn a_failed_upgrade_is_not_retried_as_a_plain_request() -> Result<()> {
    let (_pki, agent, _web) = one_agent("")?;
    // A second instance whose port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let (status, text) = agent.register(
        "web-dead",
        &format!(r#"{{"name": "web", "port": {closed}}}"#),
    )?;
    ensure!(status == 200, "{text}");
    wait_health(
        &[&agent],
        "web",
        "web-dead",
        Some("passing"),
        Duration::from_secs(10),
    )?;
    let key = (0..1000)
        .map(|i| format!("k{i}"))
        .find(|k| {
            agent
                .get(&format!("/v1/route?service=web&key={k}"))
                .is_ok_and(|(_, body)| body.contains("\"web-dead\""))
        })
        .context("no key maps to web-dead")?;
    let r = raw(
        agent.proxy,
        format!(
            "GET /ws HTTP/1.1\r\nHost: web\r\nx-hash-key: {key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
        Duration::from_secs(10),
    )?;
    ensure!(
        status_of(&r) == Some(502),
        "an upgrade whose instance is down: {r}"
    );
    Ok(())
}
