//! The data plane end to end: real agents, real demo services, requests
//! through the agents' outbound proxies.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use support::{
    Agent, AgentOptions, DemoService, Pki, Upstream, poll, via_proxy, wait_health, wait_states,
};

/// Three agents, each hosting one instance of `web` (a demo service).
struct Mesh {
    _pki: Pki,
    agents: Vec<Agent>,
    services: Vec<DemoService>,
}

fn mesh_with_web(config: Option<&str>) -> Result<Mesh> {
    let pki = Pki::new()?;
    let config_path = match config {
        Some(text) => {
            let p = pki.dir.path().join("agent.toml");
            std::fs::write(&p, text)?;
            Some(p)
        }
        None => None,
    };
    let mut agents: Vec<Agent> = Vec::new();
    for i in 1..=3 {
        let seeds = agents.first().map(|a| vec![a.seed()]).unwrap_or_default();
        agents.push(Agent::start(
            &pki,
            &format!("n{i}"),
            AgentOptions {
                seeds,
                config: config_path.clone(),
                // n1 runs on one thread (a current-thread runtime), the
                // others on the default pool: both serve each other.
                extra: if i == 1 {
                    vec!["--threads".into(), "1".into()]
                } else {
                    Vec::new()
                },
                ..Default::default()
            },
        )?);
    }
    let names = ["n1", "n2", "n3"];
    let alive: Vec<(&str, &str)> = names.iter().map(|n| (*n, "alive")).collect();
    let refs: Vec<&Agent> = agents.iter().collect();
    wait_states(&refs, &alive, Duration::from_secs(15))?;
    let mut services = Vec::new();
    for (i, a) in agents.iter().enumerate() {
        let svc = DemoService::start(&format!("web-{}", i + 1), None)?;
        let body = format!(
            r#"{{"name": "web", "port": {}, "check": {{"http": "/health", "interval": "1s", "timeout": "500ms", "rise": 1, "fall": 1}}}}"#,
            svc.addr.port()
        );
        let (status, text) = a.register(&format!("web-{}", i + 1), &body)?;
        anyhow::ensure!(status == 200, "register: {text}");
        services.push(svc);
    }
    for i in 1..=3 {
        wait_health(
            &refs,
            "web",
            &format!("web-{i}"),
            Some("passing"),
            Duration::from_secs(10),
        )?;
    }
    Ok(Mesh {
        _pki: pki,
        agents,
        services,
    })
}

fn mapping(agent: &Agent, keys: &[String]) -> Result<Vec<String>> {
    keys.iter()
        .map(|k| {
            let (status, served) = via_proxy(agent.proxy, "web", k, "/")?;
            anyhow::ensure!(status == 200, "{k}: {status} {served}");
            Ok(served)
        })
        .collect()
}

#[test]
fn keys_stick_everywhere_balance_and_fail_over() -> Result<()> {
    let mut mesh = mesh_with_web(None)?;
    let keys: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    let first = mapping(&mesh.agents[0], &keys)?;
    for a in &mesh.agents[1..] {
        assert_eq!(
            mapping(a, &keys)?,
            first,
            "{} maps keys differently",
            a.name
        );
    }
    let mut load: HashMap<&str, usize> = HashMap::new();
    for s in &first {
        *load.entry(s.as_str()).or_default() += 1;
    }
    let max = *load.values().max().unwrap() as f64;
    let balance = max / (1000.0 / 3.0);
    eprintln!("1,000 keys: {load:?}, max/avg {balance:.3}");
    assert_eq!(load.len(), 3);
    assert!(balance <= 1.2, "max/avg {balance}");
    // The admin API agrees with the proxy.
    let (_, route) = mesh.agents[1].get("/v1/route?service=web&key=user-7")?;
    assert!(
        route.contains(&format!("\"instance\": \"{}\"", first[7])),
        "{route}"
    );

    // Stop web-3: requests keep succeeding while the mesh notices.
    mesh.services[2].stop();
    let started = Instant::now();
    let mut failed = 0usize;
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(4) {
        for k in keys.iter().step_by(50) {
            sent += 1;
            let (status, _) = via_proxy(mesh.agents[0].proxy, "web", k, "/")?;
            if status != 200 {
                failed += 1;
            }
        }
    }
    eprintln!("while web-3 stopped: {failed} of {sent} requests failed");
    assert_eq!(failed, 0, "failover should hide the stopped instance");
    let after = mapping(&mesh.agents[1], &keys)?;
    let survivors: Vec<usize> = (0..keys.len()).filter(|&i| first[i] != "web-3").collect();
    let stayed = survivors.iter().filter(|&&i| after[i] == first[i]).count();
    let share = stayed as f64 / survivors.len() as f64;
    eprintln!(
        "keys of surviving instances that stayed: {stayed}/{} ({:.1} %)",
        survivors.len(),
        share * 100.0
    );
    assert!(share >= 0.99);
    assert!(after.iter().all(|s| s != "web-3"));

    // Bring it back on the same port: its keys return.
    let addr = mesh.services[2].addr;
    mesh.services[2] = DemoService::start("web-3", Some(addr))?;
    let refs: Vec<&Agent> = mesh.agents.iter().collect();
    wait_health(
        &refs,
        "web",
        "web-3",
        Some("passing"),
        Duration::from_secs(10),
    )?;
    poll("web-3's keys to return", Duration::from_secs(10), || {
        let now = mapping(&mesh.agents[2], &keys).map_err(|e| e.to_string())?;
        if now == first {
            Ok(())
        } else {
            Err("mapping differs".into())
        }
    })?;
    Ok(())
}

fn raw_request(proxy: std::net::SocketAddr, head: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(proxy)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(head.as_bytes())?;
    Ok(s)
}

fn read_head(s: &mut TcpStream) -> Result<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte)?;
        head.push(byte[0]);
    }
    let text = String::from_utf8(head)?;
    let status = text.split(' ').nth(1).context("status")?.parse()?;
    Ok((status, text))
}

/// UDP datagrams all agents have sent so far.
fn datagrams_out(agents: &[Agent]) -> Result<f64> {
    agents
        .iter()
        .map(|a| {
            a.metric(r#"gossamer_transport_udp_datagrams_total{direction="out"}"#)
                .context("no datagram counter")
        })
        .sum()
}

#[test]
fn a_request_without_a_body_sends_no_stop_sending() -> Result<()> {
    let mesh = mesh_with_web(None)?;
    let key = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| via_proxy(mesh.agents[0].proxy, "web", k, "/").is_ok_and(|(_, s)| s != "web-1"))
        .context("no remote key")?;
    const N: usize = 300;
    let before = datagrams_out(&mesh.agents)?;
    for _ in 0..N {
        let (status, _) = via_proxy(mesh.agents[0].proxy, "web", &key, "/")?;
        anyhow::ensure!(status == 200);
    }
    let per_request = (datagrams_out(&mesh.agents)? - before) / N as f64;
    // Measured: 3.0 a request (the request; the response; one more from
    // the owner, not yet accounted for); 4.1 when the owner stopped the
    // finished request stream (a STOP_SENDING packet). Gossip adds a few.
    anyhow::ensure!(
        per_request < 3.5,
        "{per_request:.2} datagrams a request, expected about 3"
    );
    Ok(())
}

#[test]
fn large_bodies_streaming_and_upgrades_through_two_agents() -> Result<()> {
    let mesh = mesh_with_web(None)?;
    // A key that n1 sends to another node, so two agents are on the path.
    let key = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| via_proxy(mesh.agents[0].proxy, "web", k, "/").is_ok_and(|(_, s)| s != "web-1"))
        .context("no remote key")?;
    let proxy = mesh.agents[0].proxy;
    const SIZE: usize = 100 * 1024 * 1024;

    // 100 MB upload.
    let started = Instant::now();
    let mut s = raw_request(
        proxy,
        &format!(
            "POST /upload HTTP/1.1\r\nHost: web\r\nx-hash-key: {key}\r\nContent-Length: {SIZE}\r\nConnection: close\r\n\r\n"
        ),
    )?;
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..100 {
        s.write_all(&chunk)?;
    }
    let mut response = String::new();
    s.read_to_string(&mut response)?;
    assert!(
        response.contains(&format!("\"bytes\": {SIZE}")),
        "{response}"
    );
    eprintln!("100 MB upload through two agents: {:?}", started.elapsed());

    // 100 MB download.
    let started = Instant::now();
    let mut s = raw_request(
        proxy,
        &format!(
            "GET /download?bytes={SIZE} HTTP/1.1\r\nHost: web\r\nx-hash-key: {key}\r\nConnection: close\r\n\r\n"
        ),
    )?;
    let (status, _) = read_head(&mut s)?;
    assert_eq!(status, 200);
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, SIZE);
    eprintln!(
        "100 MB download through two agents: {:?}",
        started.elapsed()
    );

    // WebSocket-style upgrades, to the remote instance and to the local one.
    upgrade_echo(proxy, &key)?;
    let local = (0..100)
        .map(|i| format!("k{i}"))
        .find(|k| via_proxy(proxy, "web", k, "/").is_ok_and(|(_, s)| s == "web-1"))
        .context("no local key")?;
    upgrade_echo(proxy, &local)?;

    // h2c streaming (gRPC-style): chunks echo back as they are sent, then trailers.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(h2c_echo(proxy, &key))?;
    Ok(())
}

/// An upgrade through the proxy: raw bytes both ways after 101, and the
/// client's half-close reaches the echoing instance, whose close comes back.
fn upgrade_echo(proxy: std::net::SocketAddr, key: &str) -> Result<()> {
    let mut s = raw_request(
        proxy,
        &format!(
            "GET /chat HTTP/1.1\r\nHost: web\r\nx-hash-key: {key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        ),
    )?;
    let (status, head) = read_head(&mut s)?;
    assert_eq!(status, 101, "{key}: {head}");
    for msg in ["hello", "mesh", "bye"] {
        s.write_all(msg.as_bytes())?;
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back)?;
        assert_eq!(back, msg.as_bytes(), "{key}");
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .with_context(|| format!("{key}: the close did not come back"))?;
    assert!(rest.is_empty(), "{key}: {rest:?}");
    Ok(())
}

async fn h2c_echo(proxy: std::net::SocketAddr, key: &str) -> Result<()> {
    use bytes::Bytes;
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let stream = tokio::net::TcpStream::connect(proxy).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let body = http_body_util::StreamBody::new(futures_stream(rx));
    let req = http::Request::post("http://web/echo")
        .header("x-hash-key", key)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)?;
    let response = sender.send_request(req).await?;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    for i in 0..5 {
        let msg = Bytes::from(format!("message {i}"));
        tx.send(Ok(Frame::data(msg.clone()))).await?;
        // Each message comes back before the next is sent: truly streamed.
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await?
            .context("stream ended")??;
        assert_eq!(frame.into_data().ok(), Some(msg));
    }
    drop(tx);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        if let Ok(t) = frame?.into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.context("no trailers")?;
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    Ok(())
}

fn futures_stream<T>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_core::Stream<Item = T> {
    struct S<T>(tokio::sync::mpsc::Receiver<T>);
    impl<T> futures_core::Stream for S<T> {
        type Item = T;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
    S(rx)
}

#[test]
fn slow_instance_times_out_and_failing_instance_is_ejected() -> Result<()> {
    let config = r#"
[proxy]
eject_after = 3
eject_base = "2s"

[proxy.service.web]
request_timeout = "500ms"
"#;
    let mesh = mesh_with_web(Some(config))?;
    let a = &mesh.agents[0];
    let started = Instant::now();
    let (status, body) = via_proxy(a.proxy, "web", "slow", "/slow?ms=3000")?;
    let took = started.elapsed();
    assert_eq!(status, 504, "{body}");
    assert!(took < Duration::from_secs(3), "timed out after {took:?}");
    eprintln!("slow instance: 504 after {took:?}");

    // A flaky instance of another service answers 500 until told otherwise.
    let flaky = Upstream::start("flaky")?;
    let good = DemoService::start("good", None)?;
    let reg = |agent: &Agent, id: &str, port: u16| {
        agent.register(id, &format!(r#"{{"name": "api", "port": {port}}}"#))
    };
    // A hash policy the catalog's grammar allows but no request could
    // carry is refused at registration, not replaced by the default.
    let (status, body) = mesh.agents[1].register(
        "api-bad",
        r#"{"name": "api", "port": 1, "hash_policy": "header:a(b"}"#,
    )?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("hash_policy"), "{body}");
    assert_eq!(reg(&mesh.agents[1], "api-flaky", flaky.addr.port())?.0, 200);
    assert_eq!(reg(&mesh.agents[2], "api-good", good.addr.port())?.0, 200);
    let refs: Vec<&Agent> = mesh.agents.iter().collect();
    wait_health(
        &refs,
        "api",
        "api-good",
        Some("passing"),
        Duration::from_secs(5),
    )?;
    wait_health(
        &refs,
        "api",
        "api-flaky",
        Some("passing"),
        Duration::from_secs(5),
    )?;
    let key = (0..200)
        .map(|i| format!("f{i}"))
        .find(|k| {
            a.get(&format!("/v1/route?service=api&key={k}"))
                .is_ok_and(|(_, b)| b.contains("api-flaky"))
        })
        .context("no key for the flaky instance")?;
    flaky.set_status(500);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(via_proxy(a.proxy, "api", &key, "/")?.0);
    }
    assert_eq!(statuses, vec![500, 500, 500]);
    // Ejected: the key fails over to the good instance.
    let (status, served) = via_proxy(a.proxy, "api", &key, "/")?;
    assert_eq!((status, served.as_str()), (200, "good"));
    assert_eq!(
        a.metric("gossamer_proxy_ejections_total{service=\"api\",instance=\"n2/api-flaky\"}"),
        Some(1.0)
    );
    // Fixed, and back after the 2 s backoff.
    flaky.set_status(200);
    let (_, took) = poll(
        "the flaky instance to return",
        Duration::from_secs(10),
        || {
            let (status, served) =
                via_proxy(a.proxy, "api", &key, "/").map_err(|e| e.to_string())?;
            if status == 200 && served.contains("flaky") {
                Ok(())
            } else {
                Err(format!("{status} {served}"))
            }
        },
    )?;
    eprintln!("ejected instance back after {took:?}");
    Ok(())
}

/// SIGTERM under load: requests that started before it all succeed (the
/// leaving node finishes what it holds), and the callers' agents send new
/// requests elsewhere at once (the leave notice, not failure detection,
/// tells them).
#[test]
fn sigterm_under_load_fails_nothing_in_flight_and_callers_fail_over_at_once() -> Result<()> {
    let mut mesh = mesh_with_web(None)?;
    let caller = mesh.agents[0].proxy;
    let keys: Vec<String> = (0..60).map(|i| format!("k-{i}")).collect();
    let on_n2: Vec<String> = keys
        .iter()
        .zip(mapping(&mesh.agents[0], &keys)?)
        .filter(|(_, served)| served == "web-2")
        .map(|(k, _)| k.clone())
        .collect();
    anyhow::ensure!(on_n2.len() >= 5, "too few keys on n2: {}", on_n2.len());

    // Requests that take 1.5 s, half of them to the instance behind n2.
    let before: Vec<_> = keys
        .iter()
        .cloned()
        .map(|k| {
            std::thread::spawn(move || {
                let r = via_proxy(caller, "web", &k, "/slow?ms=1500");
                (k, r)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(400));
    let mut leaving = mesh.agents.remove(1);
    let terminated = std::thread::spawn(move || {
        let status = leaving.terminate(Duration::from_secs(20));
        (status, leaving.log())
    });
    // New requests right after the signal, for keys that mapped to n2.
    std::thread::sleep(Duration::from_millis(100));
    let after: Vec<_> = on_n2
        .iter()
        .cloned()
        .map(|k| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let r = via_proxy(caller, "web", &k, "/");
                (k, r, started.elapsed())
            })
        })
        .collect();

    let mut served_by_n2 = 0;
    for h in before {
        let (k, r) = h.join().expect("request thread");
        let (status, served) = r.with_context(|| format!("{k}: started before SIGTERM"))?;
        anyhow::ensure!(
            status == 200,
            "{k} started before SIGTERM got {status} ({served})"
        );
        served_by_n2 += usize::from(served == "web-2");
    }
    anyhow::ensure!(
        served_by_n2 >= 5,
        "only {served_by_n2} in-flight requests were on the leaving node"
    );
    let mut slowest = Duration::ZERO;
    for h in after {
        let (k, r, took) = h.join().expect("request thread");
        let (status, served) = r.with_context(|| format!("{k}: started after SIGTERM"))?;
        anyhow::ensure!(status == 200, "{k} after SIGTERM got {status} ({served})");
        slowest = slowest.max(took);
    }
    // Failure detection would take seconds; the leave takes a round trip.
    anyhow::ensure!(
        slowest < Duration::from_secs(2),
        "a request after SIGTERM took {slowest:?}"
    );
    // Once the leave has spread, nothing goes to n2 any more.
    let remapped = mapping(&mesh.agents[0], &on_n2)?;
    anyhow::ensure!(
        remapped.iter().all(|s| s != "web-2"),
        "n2 still gets traffic: {remapped:?}"
    );
    let (status, log) = terminated.join().expect("terminate thread");
    let status = status?;
    anyhow::ensure!(status.success(), "n2 exited with {status}: {log}");
    anyhow::ensure!(
        !log.contains("still in flight"),
        "n2 cut requests at the end of its grace: {log}"
    );
    Ok(())
}
