//! `gossamer demo`: a 3-node mesh on loopback in one process, with traffic,
//! a failure and a report.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::{Method, Request};
use http_body_util::BodyExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent::{self, Sockets};
use crate::catalog::registry::ServiceSpec;
use crate::client;
use crate::config::{AgentConfig, LogFormat, TlsSource};
use crate::proxy::body::{self, HttpClient};
use gossamer_transport::pki;

/// Options of `gossamer demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Keys sent through each agent.
    pub keys: usize,
    /// Leave the mesh running and print commands to try.
    pub keep_running: bool,
    /// Where to keep certificates and data (a temp dir by default).
    pub dir: Option<PathBuf>,
}

/// A demo failure: what did not hold.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DemoError(pub(super) String);

pub(super) fn fail<T>(msg: impl Into<String>) -> Result<T, DemoError> {
    Err(DemoError(msg.into()))
}

pub(super) struct Node {
    pub(super) name: String,
    pub(super) admin: SocketAddr,
    proxy: SocketAddr,
    service_addr: SocketAddr,
    service_stop: watch::Sender<bool>,
    service_task: JoinHandle<()>,
}

pub(super) type Http = HttpClient;

pub(super) async fn served_by(
    client: &Http,
    proxy: SocketAddr,
    key: &str,
) -> Result<String, String> {
    let req = Request::get(format!("http://{proxy}/"))
        .header(http::header::HOST, "web")
        .header("x-hash-key", key)
        .body(body::empty())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let by = resp
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(by)
    } else {
        Err(format!("status {status}"))
    }
}

async fn mapping(
    client: &Http,
    proxy: SocketAddr,
    keys: &[String],
) -> Result<Vec<String>, DemoError> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        out.push(
            served_by(client, proxy, k)
                .await
                .or_else(|e| fail(format!("request for key {k}: {e}")))?,
        );
    }
    Ok(out)
}

fn step(n: usize, total: usize, what: &str) -> Instant {
    eprint!("[{n}/{total}] {what} ... ");
    Instant::now()
}

fn done(started: Instant, detail: &str) {
    eprintln!(
        "ok ({:.1} s){}{detail}",
        started.elapsed().as_secs_f64(),
        if detail.is_empty() { "" } else { ": " }
    );
}

pub(super) async fn wait_for(
    what: &str,
    deadline: Duration,
    mut check: impl AsyncFnMut() -> Result<(), String>,
) -> Result<(), DemoError> {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => return Ok(()),
            Err(seen) if start.elapsed() > deadline => {
                return fail(format!("timed out waiting for {what}: {seen}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn health_of(admin: SocketAddr, id: &str) -> Result<String, String> {
    let body = client::call(admin, None, Method::GET, "/v1/services/web", None)
        .await
        .map_err(|e| e.to_string())?;
    let list: Vec<serde_json::Value> = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    list.iter()
        .find(|i| i["id"] == id)
        .and_then(|i| i["health"].as_str().map(str::to_owned))
        .ok_or_else(|| format!("{id} not listed"))
}

fn node_config(
    dir: &Path,
    name: &str,
    seed: Option<SocketAddr>,
    service_port: u16,
) -> Result<AgentConfig, DemoError> {
    let args = crate::cli::AgentArgs {
        name: Some(name.into()),
        bind: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        proxy: Some("127.0.0.1:0".into()),
        seeds: seed.map(|s| vec![s.to_string()]).unwrap_or_default(),
        dev: true,
        data_dir: Some(dir.join(name)),
        ..Default::default()
    };
    let mut config = AgentConfig::from_args(&args).or_else(|e| fail(e.0))?;
    config.tls = TlsSource::Files {
        ca: dir.join("ca/ca.pem"),
        cert: dir.join(format!("certs/{name}.pem")),
        key: dir.join(format!("certs/{name}.key")),
    };
    config.log_format = LogFormat::Text;
    // web-3 runs the next version: the canary step sends a share of keys
    // to it.
    let version = if name == "n3" { "v2" } else { "v1" };
    let spec = serde_json::json!({
        "name": "web", "port": service_port, "version": version,
        "check": {"http": "/health", "interval": "1s", "timeout": "500ms", "rise": 1, "fall": 1},
    });
    if name == "n3" {
        config
            .ingress
            .listeners
            .push(crate::gateway::config::ListenerConfig {
                listen: "127.0.0.1:0".parse().expect("an address"),
                tls: Vec::new(),
                redirect_https_port: None,
            });
    }
    let id = format!("web-{}", &name[1..]);
    config.services =
        vec![ServiceSpec::from_json(Some(&id), &spec).or_else(|e| fail(e.to_string()))?];
    Ok(config)
}

/// Runs the demo; returns when it is over (or, with `keep_running`, on
/// `shutdown`).
pub async fn run(
    options: DemoOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    const STEPS: usize = 10;
    let temp;
    let dir = match &options.dir {
        Some(d) => d.clone(),
        None => {
            temp = tempdir()?;
            temp.clone()
        }
    };
    let t = step(1, STEPS, "making a mesh CA and 3 node certificates");
    let ca = crate::identity::ensure_ca(&dir.join("ca"), pki::DEFAULT_TRUST_DOMAIN)
        .or_else(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(dir.join("certs")).or_else(|e| fail(e.to_string()))?;
    for name in ["n1", "n2", "n3"] {
        let cert = dir.join(format!("certs/{name}.pem"));
        if !cert.exists() {
            let web = pki::Hosts::Only(vec!["web".into()]);
            let pair = pki::issue_node_cert_hosting(&ca, name, pki::DEFAULT_TRUST_DOMAIN, &web)
                .or_else(|e| fail(e.to_string()))?;
            pki::write_new(&dir.join(format!("certs/{name}.key")), &pair.key, true)
                .or_else(|e| fail(e.to_string()))?;
            pki::write_new(&cert, &pair.cert, false).or_else(|e| fail(e.to_string()))?;
        }
    }
    done(t, &dir.display().to_string());

    let t = step(
        2,
        STEPS,
        "starting 3 agents, each with one instance of `web`",
    );
    let (stop_all, stopped) = watch::channel(false);
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    let mut seed = None;
    let mut gateway = None;
    for i in 1..=3 {
        let name = format!("n{i}");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .or_else(|e| fail(e.to_string()))?;
        let service_addr = listener.local_addr().or_else(|e| fail(e.to_string()))?;
        let (service_stop, service_stopped) = watch::channel(false);
        let service_task = tokio::spawn(super::service::serve_until(
            listener,
            format!("web-{i}"),
            service_stopped,
        ));
        let config = node_config(&dir, &name, seed, service_addr.port())?;
        let sockets = Sockets::bind(&config)
            .await
            .or_else(|e| fail(e.to_string()))?;
        let quic = sockets.udp.local_addr().or_else(|e| fail(e.to_string()))?;
        let admin = sockets
            .admin
            .local_addr()
            .or_else(|e| fail(e.to_string()))?;
        let proxy = sockets
            .proxy
            .local_addr()
            .or_else(|e| fail(e.to_string()))?;
        if let Some(addr) = sockets.ingress.addresses().first() {
            gateway = Some(*addr);
        }
        seed.get_or_insert(quic);
        let mut stop = stopped.clone();
        agents.push(tokio::spawn(agent::run(config, sockets, async move {
            let _ = stop.changed().await;
        })));
        nodes.push(Node {
            name,
            admin,
            proxy,
            service_addr,
            service_stop,
            service_task,
        });
    }
    for n in &nodes {
        for id in ["web-1", "web-2", "web-3"] {
            wait_for(
                &format!("{} to see {id} passing", n.name),
                Duration::from_secs(20),
                async || match health_of(n.admin, id).await? {
                    h if h == "passing" => Ok(()),
                    h => Err(h),
                },
            )
            .await?;
        }
    }
    done(
        t,
        "all 3 agents list 3 members alive and 3 passing instances",
    );

    let http: Http = body::http_client();
    let keys: Vec<String> = (0..options.keys).map(|i| format!("user-{i}")).collect();
    let t = step(
        3,
        STEPS,
        &format!("sending {} keys through each agent's proxy", keys.len()),
    );
    let first = mapping(&http, nodes[0].proxy, &keys).await?;
    for n in &nodes[1..] {
        if mapping(&http, n.proxy, &keys).await? != first {
            return fail(format!("{} maps keys differently from n1", n.name));
        }
    }
    let mut load: HashMap<&str, usize> = HashMap::new();
    for s in &first {
        *load.entry(s).or_default() += 1;
    }
    let mut shares: Vec<_> = load.iter().map(|(k, v)| format!("{k} {v}")).collect();
    shares.sort();
    let max = *load.values().max().unwrap_or(&0) as f64;
    let balance = max / (keys.len() as f64 / 3.0);
    done(
        t,
        &format!(
            "every key answered by the same instance from all 3 agents; {}; max/avg {balance:.2}",
            shares.join(", ")
        ),
    );

    let t = step(4, STEPS, "stopping web-2 while traffic flows");
    let _ = nodes[1].service_stop.send(true);
    let (mut sent, mut failed) = (0usize, 0usize);
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        for k in keys.iter().step_by(10) {
            sent += 1;
            if served_by(&http, nodes[0].proxy, k).await.is_err() {
                failed += 1;
            }
        }
    }
    let after = mapping(&http, nodes[2].proxy, &keys).await?;
    let survivors: Vec<usize> = (0..keys.len()).filter(|&i| first[i] != "web-2").collect();
    let stayed = survivors.iter().filter(|&&i| after[i] == first[i]).count();
    let moved_from_2 = keys.len() - survivors.len();
    done(
        t,
        &format!(
            "{failed} of {sent} requests failed during the transition; {stayed}/{} keys of web-1 and web-3 stayed put; web-2's {moved_from_2} keys failed over",
            survivors.len()
        ),
    );
    if stayed * 100 < survivors.len() * 99 {
        return fail("more than 1 % of the surviving instances' keys moved");
    }

    let t = step(5, STEPS, "restarting web-2");
    let listener = TcpListener::bind(nodes[1].service_addr)
        .await
        .or_else(|e| fail(format!("rebinding web-2: {e}")))?;
    let (service_stop, service_stopped) = watch::channel(false);
    nodes[1].service_task.abort();
    nodes[1].service_task = tokio::spawn(super::service::serve_until(
        listener,
        "web-2".into(),
        service_stopped,
    ));
    nodes[1].service_stop = service_stop;
    wait_for(
        "web-2's keys to return",
        Duration::from_secs(20),
        async || match mapping(&http, nodes[0].proxy, &keys).await {
            Ok(m) if m == first => Ok(()),
            Ok(_) => Err("mapping differs".into()),
            Err(e) => Err(e.0),
        },
    )
    .await?;
    done(t, "its keys are back on it, everything else untouched");

    let t = step(
        6,
        STEPS,
        "a canary: a signed route document sends 10 % of keys to v2 (web-3)",
    );
    let canary = canary(&dir, &ca, &nodes, &http, &keys).await?;
    done(
        t,
        &format!(
            "in force on all 3 agents {} ms after it was applied at n1; {} of {} keys ({:.1} %) on v2, the same keys from every agent",
            canary.spread.as_millis(),
            canary.on_v2,
            keys.len(),
            100.0 * canary.on_v2 as f64 / keys.len() as f64
        ),
    );

    let t = step(
        7,
        STEPS,
        "replacing every agent's certificate while traffic flows",
    );
    let traffic = super::certs::Traffic::start(&http, nodes[0].proxy, &keys);
    let (noticed, replaced) = super::certs::rotate(&dir, &ca, &nodes).await?;
    let (rotation_sent, rotation_failed) = traffic.finish().await;
    done(
        t,
        &format!(
            "all 3 agents noticed their new files within {:.1} s and use them for new handshakes; {rotation_failed} of {rotation_sent} requests failed",
            noticed.as_secs_f64()
        ),
    );
    if rotation_failed > 0 {
        return fail(format!(
            "{rotation_failed} requests failed during the rotation"
        ));
    }

    let t = step(
        8,
        STEPS,
        "revoking n2's certificate (a CRL from the CA, spread as a document)",
    );
    let operator = (
        std::fs::read_to_string(&canary.cert).or_else(|e| fail(e.to_string()))?,
        std::fs::read_to_string(&canary.key).or_else(|e| fail(e.to_string()))?,
    );
    let traffic = super::certs::Traffic::start(&http, nodes[0].proxy, &keys);
    let revoked = super::certs::revoke(
        &dir,
        &ca,
        (&operator.0, &operator.1),
        &nodes,
        1,
        &replaced[1],
    )
    .await?;
    let (revoke_sent, revoke_failed) = traffic.finish().await;
    let after = mapping(&http, nodes[0].proxy, &keys).await?;
    if after.iter().any(|s| s == "web-2") {
        return fail("n2's instance still takes traffic after its revocation");
    }
    done(
        t,
        &format!(
            "n1 and n3 cut n2 off {} ms after the CRL was applied at n1; {revoke_failed} of {revoke_sent} requests failed while it happened; web-2's keys moved to web-1",
            revoked.cut_off.as_millis()
        ),
    );

    let t = step(
        9,
        STEPS,
        "a gateway: n3 serves an ingress route (a signed document applied at n1) to clients outside the mesh",
    );
    let signer = gossamer_transport::sign::OperatorSigner::from_pem(&operator.0, &operator.1)
        .or_else(|e| fail(e.to_string()))?;
    let gateway = gateway.ok_or_else(|| DemoError("n3 has no gateway listener".into()))?;
    let ingress = super::gateway::run(&http, nodes[0].admin, &signer, gateway).await?;
    if ingress.path != "/cart" || ingress.answered == 0 || ingress.limited == 0 {
        return fail(format!("the gateway step went wrong: {ingress:?}"));
    }
    done(
        t,
        &format!(
            "shop.local/api/cart reached web as {} {} ms after the document was applied; of 60 requests at once, {} answered and {} refused by the 20/s per-client limit",
            ingress.path,
            ingress.spread.as_millis(),
            ingress.answered,
            ingress.limited
        ),
    );

    // Golden signals of everything above, merged from all 3 agents.
    let signals = crate::client::call(
        nodes[0].admin,
        None,
        http::Method::GET,
        "/v1/stats?window=60s&service=web&mesh=true",
        None,
    )
    .await
    .ok()
    .and_then(|body| serde_json::from_slice::<serde_json::Value>(&body).ok())
    .and_then(|answer| {
        let rows = answer["rows"].as_array()?;
        let row = rows
            .iter()
            .find(|r| r["direction"] == "outbound" && r["route"].is_null())?;
        Some(format!(
            "{} requests to web in the last minute as counted by {} of the 3 agents (the revoked one cannot answer), {:.2} % answered without a 5xx, p50 {:.2} ms, p99 {:.2} ms",
            row["requests"],
            answer["nodes"].as_array()?.len(),
            row["success_rate"].as_f64()? * 100.0,
            row["p50_ms"].as_f64()?,
            row["p99_ms"].as_f64()?,
        ))
    })
    .unwrap_or_else(|| "not available".into());

    eprintln!("[10/{STEPS}] report");
    println!();
    println!(
        "Gossamer demo: 3 agents, 3 instances of `web`, {} keys per agent",
        keys.len()
    );
    println!(
        "  consistent hashing  same instance for every key from every agent; max/avg load {balance:.2}"
    );
    println!("  failover            {failed} failed of {sent} requests while web-2 was down");
    println!(
        "  minimal remapping   {stayed}/{} keys of healthy instances stayed put",
        survivors.len()
    );
    println!("  recovery            web-2's keys returned when it came back");
    println!(
        "  canary by document  10 % split in force on every agent after {} ms; {}/{} keys on v2, the same from every agent",
        canary.spread.as_millis(),
        canary.on_v2,
        keys.len()
    );
    println!(
        "  cert rotation       all 3 replaced under traffic; {rotation_failed} of {rotation_sent} requests failed"
    );
    println!(
        "  cert revocation     n2 cut off by every peer {} ms after the CRL was applied; {revoke_failed} of {revoke_sent} requests failed",
        revoked.cut_off.as_millis()
    );
    println!(
        "  gateway             n3 serves shop.local/api from a signed ingress document; a burst of 60: {} answered, {} rate-limited",
        ingress.answered, ingress.limited
    );
    println!("  golden signals      {signals}");
    println!();

    if options.keep_running {
        println!("The mesh keeps running (Ctrl-C to stop). Try:");
        for n in &nodes {
            println!(
                "  curl -H 'Host: web' -H 'x-hash-key: alice' http://{}/          # through {}",
                n.proxy, n.name
            );
        }
        println!(
            "  curl -H 'Host: shop.local' http://{gateway}/api/hello          # through n3's gateway"
        );
        println!("  curl http://{}/v1/catalog", nodes[0].admin);
        println!(
            "  curl 'http://{}/v1/route?service=web&key=alice'",
            nodes[0].admin
        );
        println!(
            "  gossamer members --admin {}          # n2 is revoked ({})",
            nodes[0].admin,
            revoked.crl.display()
        );
        println!("  gossamer services --admin {}", nodes[0].admin);
        println!(
            "  gossamer stat --mesh --admin {}          # req/s, success, p50/p90/p99 mesh-wide",
            nodes[0].admin
        );
        println!("  gossamer tap web --admin {}", nodes[0].admin);
        println!(
            "  gossamer watch --admin {} -- sh -c 'cat; echo'          # every event, as it happens",
            nodes[0].admin
        );
        println!(
            "  open http://{}/ui/          # the web console",
            nodes[0].admin
        );
        println!("  gossamer config get route web --admin {}", nodes[0].admin);
        println!(
            "  gossamer config apply {} --operator-cert {} --operator-key {} --admin {}   # after editing the weights",
            canary.file.display(),
            canary.cert.display(),
            canary.key.display(),
            nodes[0].admin
        );
        shutdown.await;
    }
    let _ = stop_all.send(true);
    for a in agents {
        let _ = tokio::time::timeout(Duration::from_secs(10), a).await;
    }
    for n in &nodes {
        let _ = n.service_stop.send(true);
    }
    if options.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// What the canary step did.
struct Canary {
    /// From applying the document at n1 until all 3 agents held it.
    spread: Duration,
    /// Keys that went to v2.
    on_v2: usize,
    /// The document, and the operator certificate and key that signed it.
    file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

const CANARY: &str = r#"# A canary: 10 % of users (by the x-hash-key header) go to v2, on every
# agent alike. Raise v2's weight and apply again to roll it out.
[[route]]
name = "web"
sticky = "header:x-hash-key"
backends = [
  { subset = { version = "v1" }, weight = 90 },
  { subset = { version = "v2" }, weight = 10 },
]
"#;

/// Signs document `kind name` with `body` as the version after the one
/// `admin`'s agent holds (a kept demo directory may hold one already) and
/// applies it there: (the version, when it was applied).
pub(super) async fn apply_document(
    admin: SocketAddr,
    signer: &gossamer_transport::sign::OperatorSigner,
    kind: &str,
    name: &str,
    body: &serde_json::Value,
) -> Result<(u64, Instant), DemoError> {
    let err = |e: &dyn std::fmt::Display| DemoError(e.to_string());
    let live = match client::call(
        admin,
        None,
        Method::GET,
        &format!("/v1/config/{kind}/{name}"),
        None,
    )
    .await
    {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b)
            .ok()
            .and_then(|v| v["version"].as_u64())
            .unwrap_or(0),
        Err(_) => 0,
    };
    let mut env = crate::documents::envelope::Envelope::new(kind, name, live + 1, Some(body))
        .map_err(|e| err(&e))?;
    env.sign(signer).map_err(|e| err(&e))?;
    let applied = Instant::now();
    let bytes = serde_json::to_vec(&env.to_json()).map_err(|e| err(&e))?;
    client::call(admin, None, Method::POST, "/v1/config", Some(bytes))
        .await
        .map_err(|e| err(&e))?;
    Ok((live + 1, applied))
}

/// Issues an operator certificate, signs the canary document with it and
/// applies it at n1; then checks every agent sends the same keys to v2.
async fn canary(
    dir: &Path,
    ca: &pki::PemPair,
    nodes: &[Node],
    http: &Http,
    keys: &[String],
) -> Result<Canary, DemoError> {
    let err = |e: &dyn std::fmt::Display| DemoError(e.to_string());
    let (cert, key) = (
        dir.join("operators/demo.pem"),
        dir.join("operators/demo.key"),
    );
    if !cert.exists() {
        std::fs::create_dir_all(dir.join("operators")).map_err(|e| err(&e))?;
        let pair =
            pki::issue_operator_cert(ca, "demo", pki::DEFAULT_TRUST_DOMAIN).map_err(|e| err(&e))?;
        pki::write_new(&key, &pair.key, true).map_err(|e| err(&e))?;
        pki::write_new(&cert, &pair.cert, false).map_err(|e| err(&e))?;
    }
    let file = dir.join("canary.toml");
    std::fs::write(&file, CANARY).map_err(|e| err(&e))?;
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| err(&e));
    let signer = gossamer_transport::sign::OperatorSigner::from_pem(&read(&cert)?, &read(&key)?)
        .map_err(|e| err(&e))?;
    let docs = crate::documents::envelope::parse_file("canary.toml", CANARY).or_else(fail)?;
    let (kind, name, body) = docs.into_iter().next().expect("one document");
    let (version, applied) = apply_document(nodes[0].admin, &signer, &kind, &name, &body).await?;
    for n in nodes {
        wait_for(
            &format!("{} to hold route web version {version}", n.name),
            Duration::from_secs(10),
            async || {
                let b = client::call(n.admin, None, Method::GET, "/v1/config/route/web", None)
                    .await
                    .map_err(|e| e.to_string())?;
                let v: serde_json::Value = serde_json::from_slice(&b).map_err(|e| e.to_string())?;
                (v["version"].as_u64() == Some(version))
                    .then_some(())
                    .ok_or_else(|| format!("version {}", v["version"]))
            },
        )
        .await?;
    }
    let spread = applied.elapsed();
    let first = mapping(http, nodes[0].proxy, keys).await?;
    for n in &nodes[1..] {
        if mapping(http, n.proxy, keys).await? != first {
            return fail(format!("{} splits keys differently from n1", n.name));
        }
    }
    let on_v2 = first.iter().filter(|s| *s == "web-3").count();
    let share = on_v2 as f64 / keys.len().max(1) as f64;
    if keys.len() >= 100 && !(0.04..=0.16).contains(&share) {
        return fail(format!(
            "{on_v2} of {} keys went to v2, not about 10 %",
            keys.len()
        ));
    }
    Ok(Canary {
        spread,
        on_v2,
        file,
        cert,
        key,
    })
}

fn tempdir() -> Result<PathBuf, DemoError> {
    let dir = std::env::temp_dir().join(format!("gossamer-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).or_else(|e| fail(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}
