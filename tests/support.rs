//! Harness for multi-process tests: a mesh CA, real `gossamer agent`
//! processes on loopback with port 0, and polling helpers.
//!
//! Included by every test file with `mod support;`. The binary is the one
//! cargo built for this test run; `GOSSAMER_BIN` overrides it (relative
//! paths are taken from the workspace root).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Path of the `gossamer` binary under test.
pub fn binary() -> PathBuf {
    match std::env::var_os("GOSSAMER_BIN") {
        Some(p) => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_gossamer")),
    }
}

/// Runs `gossamer` with arguments and returns its output.
pub fn gossamer(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run gossamer")
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after
/// `deadline` with `what` and the last thing `check` saw.
pub fn poll<T>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> std::result::Result<T, String>,
) -> Result<(T, Duration)> {
    let start = Instant::now();
    let mut last;
    loop {
        match check() {
            Ok(v) => return Ok((v, start.elapsed())),
            Err(seen) => last = seen,
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}; last seen: {last}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A mesh CA in a temp dir, issuing certificates with the real CLI.
#[derive(Debug)]
pub struct Pki {
    /// Root of everything this test writes.
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// `gossamer ca init`.
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = dir.path().join("ca");
        let out = gossamer(&["ca", "init", "--dir", ca.to_str().unwrap()]);
        if !out.status.success() {
            bail!("ca init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(Self { dir })
    }

    /// CA certificate path.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca/ca.pem")
    }

    /// `gossamer cert issue` for node `name`, allowed to host any service;
    /// returns (cert, key).
    pub fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        self.issue_as("--name", "certs", name, &["*"])
    }

    /// `gossamer cert issue` for node `name`, allowed to host `services`
    /// only (into `certs-<name>`, apart from [`Pki::issue`]'s).
    pub fn issue_hosting(&self, name: &str, services: &[&str]) -> Result<(PathBuf, PathBuf)> {
        self.issue_as("--name", &format!("certs-{name}"), name, services)
    }

    /// `gossamer cert issue --operator NAME`; returns (cert, key).
    pub fn issue_operator(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        self.issue_as("--operator", "operators", name, &[])
    }

    /// `gossamer cert issue FLAG NAME [--service S]... --out DIR/SUBDIR`,
    /// once per name.
    fn issue_as(
        &self,
        flag: &str,
        subdir: &str,
        name: &str,
        services: &[&str],
    ) -> Result<(PathBuf, PathBuf)> {
        let out_dir = self.dir.path().join(subdir);
        let cert = out_dir.join(format!("{name}.pem"));
        if !cert.exists() {
            let ca = self.dir.path().join("ca");
            let mut args = vec![
                "cert",
                "issue",
                "--ca-dir",
                ca.to_str().unwrap(),
                flag,
                name,
                "--out",
                out_dir.to_str().unwrap(),
            ];
            for s in services {
                args.extend(["--service", s]);
            }
            let out = gossamer(&args);
            if !out.status.success() {
                bail!(
                    "cert issue {flag} {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok((cert, out_dir.join(format!("{name}.key"))))
    }

    /// `gossamer cert issue --name NAME --out DIR/SUBDIR` plus `extra`
    /// arguments, whatever is there already: the command's output.
    pub fn issue_into(&self, name: &str, subdir: &str, extra: &[&str]) -> Output {
        let ca = self.dir.path().join("ca");
        let out = self.dir.path().join(subdir);
        let mut args = vec![
            "cert",
            "issue",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        gossamer(&args)
    }

    /// A fresh data dir for `name`.
    pub fn data_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("data").join(name)
    }
}

/// A running `gossamer agent`.
#[derive(Debug)]
pub struct Agent {
    /// Node name.
    pub name: String,
    /// Its data dir.
    pub data_dir: PathBuf,
    /// Bound QUIC address.
    pub quic: SocketAddr,
    /// Bound admin address.
    pub admin: SocketAddr,
    /// Bound outbound proxy address.
    pub proxy: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
}

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Seeds (`--seed`).
    pub seeds: Vec<String>,
    /// Extra arguments.
    pub extra: Vec<String>,
    /// Use this data dir instead of a fresh one.
    pub data_dir: Option<PathBuf>,
    /// Use this config file.
    pub config: Option<PathBuf>,
    /// Listen on these ports instead of port 0 (see [`Ports::free`]).
    pub ports: Option<Ports>,
}

/// Explicit loopback ports for every listener of an agent, so a restarted
/// agent comes back on the same addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// QUIC (UDP).
    pub quic: u16,
    /// Admin API (TCP).
    pub admin: u16,
    /// Outbound proxy (TCP).
    pub proxy: u16,
}

/// `N` distinct loopback TCP ports the kernel reports free right now:
/// all are held until every one is picked, so none repeats (another
/// process could still take one before it is used).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&held) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// One loopback TCP port the kernel reports free right now.
pub fn free_port() -> Result<u16> {
    Ok(free_ports::<1>()?[0])
}

impl Ports {
    /// Three ports the kernel reports free right now (bound to port 0 and
    /// released; another process could still take one before the agent
    /// binds it).
    pub fn free() -> Result<Self> {
        let quic = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let admin = std::net::TcpListener::bind("127.0.0.1:0")?;
        let proxy = std::net::TcpListener::bind("127.0.0.1:0")?;
        Ok(Self {
            quic: quic.local_addr()?.port(),
            admin: admin.local_addr()?.port(),
            proxy: proxy.local_addr()?.port(),
        })
    }
}

impl Agent {
    /// Starts `name` with certificates from `pki` and waits until its
    /// `agent.json` shows the bound addresses.
    pub fn start(pki: &Pki, name: &str, opts: AgentOptions) -> Result<Self> {
        let (cert, key) = pki.issue(name)?;
        Self::start_with(pki, name, &pki.ca(), &cert, &key, opts)
    }

    /// Starts an agent with explicit identity files.
    pub fn start_with(
        pki: &Pki,
        name: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
        opts: AgentOptions,
    ) -> Result<Self> {
        let data_dir = opts.data_dir.clone().unwrap_or_else(|| pki.data_dir(name));
        std::fs::create_dir_all(&data_dir)?;
        let info = data_dir.join("agent.json");
        let _ = std::fs::remove_file(&info);
        let log = pki.dir.path().join(format!(
            "{name}-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos()
        ));
        let port = |p: fn(&Ports) -> u16| format!("127.0.0.1:{}", opts.ports.as_ref().map_or(0, p));
        let mut cmd = Command::new(binary());
        cmd.args(["agent", "--name", name])
            .args([
                "--bind",
                &port(|p| p.quic),
                "--admin",
                &port(|p| p.admin),
                "--proxy",
                &port(|p| p.proxy),
            ])
            .arg("--ca")
            .arg(ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--log-level", "debug", "--log-format", "json"]);
        for seed in &opts.seeds {
            cmd.args(["--seed", seed]);
        }
        if let Some(c) = &opts.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&opts.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?);
        let mut child = cmd.spawn().context("spawn gossamer agent")?;
        let started = poll(
            &format!("{name} to write agent.json"),
            Duration::from_secs(30),
            || {
                if let Ok(Some(status)) = child.try_wait() {
                    return Ok(Err(format!("exited with {status}")));
                }
                let text = std::fs::read_to_string(&info).map_err(|e| e.to_string())?;
                serde_json::from_str::<Value>(&text)
                    .map(Ok)
                    .map_err(|e| e.to_string())
            },
        );
        let v = match started {
            Ok((Ok(v), _)) => v,
            Ok((Err(exit), _)) => bail!(
                "{name} {exit}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            Err(e) => {
                let _ = child.kill();
                bail!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default())
            }
        };
        let addr = |k: &str| -> Result<SocketAddr> {
            v[k].as_str()
                .with_context(|| format!("agent.json lacks {k}"))?
                .parse()
                .context("bad address")
        };
        Ok(Self {
            name: name.to_owned(),
            data_dir,
            quic: addr("quic")?,
            admin: addr("admin")?,
            proxy: addr("proxy")?,
            child: Some(child),
            log,
        })
    }

    /// The QUIC address as a seed argument.
    pub fn seed(&self) -> String {
        self.quic.to_string()
    }

    /// `GET path` on the admin API: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http(self.admin, "GET", path, None)
    }

    /// `GET /v1/members` as (name, state) pairs.
    pub fn members(&self) -> Result<Vec<(String, String)>> {
        let (status, body) = self.get("/v1/members")?;
        if status != 200 {
            bail!("/v1/members answered {status}: {body}");
        }
        let rows: Vec<Value> = serde_json::from_str(&body)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap_or_default().to_owned(),
                    r["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }

    /// The state this agent reports for `name`, if listed.
    pub fn state_of(&self, name: &str) -> Option<String> {
        self.members()
            .ok()?
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
    }

    /// One Prometheus sample (`name{labels}` exactly as printed), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").ok()?;
        body.lines().find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == series).then(|| v.parse().ok())?
        })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM and waits up to `deadline` for the exit status.
    pub fn terminate(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        let mut child = self.child.take().context("not running")?;
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        let (status, _) = poll("agent to exit", deadline, || match child.try_wait() {
            Ok(Some(s)) => Ok(s),
            _ => Err("still running".into()),
        })
        .inspect_err(|_| {
            let _ = child.kill();
        })?;
        Ok(status)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls until every agent in `observers` reports each `(name, state)`.
pub fn wait_states(
    observers: &[&Agent],
    expected: &[(&str, &str)],
    deadline: Duration,
) -> Result<Duration> {
    let (_, took) = poll("member states", deadline, || {
        for a in observers {
            let members = a.members().map_err(|e| format!("{}: {e}", a.name))?;
            for (name, state) in expected {
                let seen = members
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, s)| s.as_str());
                if seen != Some(*state) {
                    return Err(format!("{} sees {name} as {seen:?}: {members:?}", a.name));
                }
            }
        }
        Ok(())
    })?;
    Ok(took)
}

/// A minimal HTTP/1.1 client (one request per connection).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status: u16 = response
        .split(' ')
        .nth(1)
        .context("no status line")?
        .parse()
        .context("bad status")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A tiny HTTP server for tests: answers every request with the current
/// status (settable) and a body naming itself. Stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Upstream {
    /// Starts on a free loopback port.
    pub fn start(name: &str) -> Result<Self> {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let status = Arc::new(AtomicU16::new(200));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, name) = (status.clone(), stop.clone(), name.to_owned());
        std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = conn.read(&mut buf);
                        let code = st.load(Ordering::Relaxed);
                        let body = format!("{name}\n");
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self { addr, status, stop })
    }

    /// Sets the status every later request gets.
    pub fn set_status(&self, code: u16) {
        self.status
            .store(code, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Agent {
    /// `PUT /v1/agent/services/{id}` with a JSON body; returns the status.
    pub fn register(&self, id: &str, body: &str) -> Result<(u16, String)> {
        http(
            self.admin,
            "PUT",
            &format!("/v1/agent/services/{id}"),
            Some(body),
        )
    }

    /// `DELETE /v1/agent/services/{id}`.
    pub fn deregister(&self, id: &str) -> Result<(u16, String)> {
        http(
            self.admin,
            "DELETE",
            &format!("/v1/agent/services/{id}"),
            None,
        )
    }

    /// `GET /v1/catalog` parsed.
    pub fn catalog(&self) -> Result<Value> {
        let (status, body) = self.get("/v1/catalog")?;
        if status != 200 {
            bail!("/v1/catalog answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The health of instance `id` of `service` as this agent reports it.
    pub fn instance_health(&self, service: &str, id: &str) -> Option<String> {
        let c = self.catalog().ok()?;
        c["services"][service]
            .as_array()?
            .iter()
            .find(|i| i["id"] == id)
            .and_then(|i| i["health"].as_str().map(str::to_owned))
    }

    /// `node -> version` of every catalog entry this agent holds.
    pub fn node_versions(&self) -> Option<Vec<(String, u64)>> {
        let c = self.catalog().ok()?;
        let mut v: Vec<(String, u64)> = c["nodes"]
            .as_object()?
            .iter()
            .map(|(n, e)| (n.clone(), e["version"].as_u64().unwrap_or(0)))
            .collect();
        v.sort();
        Some(v)
    }

    /// `POST` or `DELETE /v1/debug/partition`.
    pub fn partition(&self, peers: Option<&[&str]>) -> Result<u16> {
        let (status, _) = match peers {
            Some(p) => {
                let body = serde_json::json!({ "peers": p }).to_string();
                http(self.admin, "POST", "/v1/debug/partition", Some(&body))?
            }
            None => http(self.admin, "DELETE", "/v1/debug/partition", None)?,
        };
        Ok(status)
    }
}

/// `n` agents (`n1`, then `n2`… seeded by it) with `extra` arguments, all
/// listing each other alive.
pub fn mesh(pki: &Pki, n: usize, extra: &[&str]) -> Result<Vec<Agent>> {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let first = Agent::start(
        pki,
        "n1",
        AgentOptions {
            extra: extra.clone(),
            ..Default::default()
        },
    )?;
    let opts = AgentOptions {
        seeds: vec![first.seed()],
        extra,
        ..Default::default()
    };
    let mut agents = vec![first];
    for i in 2..=n {
        agents.push(Agent::start(pki, &format!("n{i}"), opts.clone())?);
    }
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    let alive: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "alive")).collect();
    wait_states(
        &agents.iter().collect::<Vec<_>>(),
        &alive,
        Duration::from_secs(20),
    )?;
    Ok(agents)
}

/// `gossamer config apply FILE` against `agent`, signed by `operator`
/// (cert, key): the command's output.
pub fn config_apply(agent: &Agent, file: &Path, operator: &(PathBuf, PathBuf)) -> Output {
    gossamer(&[
        "config",
        "apply",
        file.to_str().unwrap(),
        "--operator-cert",
        operator.0.to_str().unwrap(),
        "--operator-key",
        operator.1.to_str().unwrap(),
        "--admin",
        &agent.admin.to_string(),
    ])
}

/// Polls until `agent`'s `/ready` answers 200 (joined and caught up on
/// configuration documents); returns how long that took.
pub fn wait_ready(agent: &Agent, deadline: Duration) -> Result<Duration> {
    let (_, took) = poll(&format!("{} ready", agent.name), deadline, || {
        match agent.get("/ready") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })?;
    Ok(took)
}

/// Polls until every agent reports `id` of `service` with `health`
/// (`None`: not listed at all).
pub fn wait_health(
    agents: &[&Agent],
    service: &str,
    id: &str,
    health: Option<&str>,
    deadline: Duration,
) -> Result<Duration> {
    let (_, took) = poll(
        &format!("{service}/{id} to be {health:?} everywhere"),
        deadline,
        || {
            for a in agents {
                let seen = a.instance_health(service, id);
                if seen.as_deref() != health {
                    return Err(format!("{} sees {seen:?}", a.name));
                }
            }
            Ok(())
        },
    )?;
    Ok(took)
}

/// A `gossamer demo-service` process on a free loopback port.
#[derive(Debug)]
pub struct DemoService {
    /// Its name (what it answers with).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

impl DemoService {
    /// Starts one on `addr`, or (None) on a free port. A free port can be
    /// taken by another test between the check and the service's bind: if
    /// the service exits before it listens, it starts again on another.
    pub fn start(name: &str, addr: Option<SocketAddr>) -> Result<Self> {
        let mut tries = 0;
        loop {
            tries += 1;
            let at = match addr {
                Some(a) => a,
                None => std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?,
            };
            let mut child = Command::new(binary())
                .args(["demo-service", "--listen", &at.to_string(), "--name", name])
                .env_remove("RUST_LOG")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let listening = poll(
                &format!("{name} to listen"),
                Duration::from_secs(30),
                || {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Ok(Err(status));
                    }
                    TcpStream::connect(at)
                        .map(|_| Ok(()))
                        .map_err(|e| e.to_string())
                },
            )?;
            match listening.0 {
                Ok(()) => {
                    return Ok(Self {
                        name: name.to_owned(),
                        addr: at,
                        child,
                    });
                }
                Err(status) if addr.is_none() && tries < 5 => {
                    eprintln!("{name} exited ({status}) before listening on {at}; another port");
                }
                Err(status) => bail!("{name} exited ({status}) before listening on {at}"),
            }
        }
    }

    /// Stops it (kill -9).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for DemoService {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request through an agent's proxy: (status, x-served-by or body).
pub fn via_proxy(proxy: SocketAddr, service: &str, key: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&proxy, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {service}\r\nx-hash-key: {key}\r\nConnection: close\r\n\r\n"
    )?;
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
        .unwrap_or_else(|| {
            response
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.trim().to_owned())
                .unwrap_or_default()
        });
    Ok((status, served))
}

// ---------------------------------------------------------------------------
// Helpers added for tests/soak.rs (appended; nothing above changes).

impl Agent {
    /// Path of this agent's log file (its stderr: JSON lines). It stays on
    /// disk after the agent is killed, until the `Pki` temp dir is dropped.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Whether the process is still running: a killed or exited agent (even
    /// one not yet reaped) has no resident set in /proc.
    pub fn running(&self) -> bool {
        self.child.is_some() && self.rss_kib().is_some()
    }
}

/// Number of open file descriptors of process `pid` (entries of /proc/PID/fd).
pub fn open_fds(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|dir| dir.count())
}

/// A file of `tests/grpc/`.
pub fn grpc_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/grpc")
        .join(name)
}

/// A Python with grpcio (`tests/grpc/python.sh` installs it in a venv
/// under target/ when needed), or why there is none, naming the package.
pub fn grpc_python() -> std::result::Result<String, String> {
    let out = Command::new("bash")
        .arg(grpc_script("python.sh"))
        .output()
        .map_err(|e| format!("bash: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The grpcio echo server of `tests/grpc/grpc_echo.py` on a free loopback
/// port; killed when dropped.
#[derive(Debug)]
pub struct GrpcServer {
    child: Child,
    /// Where it listens.
    pub port: u16,
}

impl GrpcServer {
    /// Starts one with `python` (from [`grpc_python`]).
    pub fn start(python: &str) -> Result<Self> {
        use std::io::BufRead;
        let mut child = Command::new(python)
            .arg(grpc_script("grpc_echo.py"))
            .args(["serve", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start the grpcio server")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .with_context(|| format!("unexpected grpcio server output {line:?}"))?;
        Ok(Self { child, port })
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `gossamer agent` in the foreground as `name` with these identity
/// files and a fresh data dir, on port 0 everywhere, plus `extra`
/// arguments: for an agent expected to refuse to start. Returns its output.
pub fn agent_once(pki: &Pki, name: &str, cert: &Path, key: &Path, extra: &[&str]) -> Output {
    let data = pki.data_dir(&format!("{name}-once"));
    let ca = pki.ca();
    let mut args = vec![
        "agent",
        "--name",
        name,
        "--bind",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--proxy",
        "127.0.0.1:0",
        "--ca",
        ca.to_str().unwrap(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    gossamer(&args)
}

/// Polls until every agent holds `version` of document `kind name`;
/// returns how long that took.
pub fn wait_doc_version(
    agents: &[&Agent],
    kind: &str,
    name: &str,
    version: u64,
) -> Result<Duration> {
    let path = format!("/v1/config/{kind}/{name}");
    let (_, took) = poll(
        &format!("{kind} {name} version {version} everywhere"),
        Duration::from_secs(10),
        || {
            let held: Vec<Option<u64>> = agents
                .iter()
                .map(|a| {
                    let (_, b) = a.get(&path).ok()?;
                    serde_json::from_str::<Value>(&b).ok()?["version"].as_u64()
                })
                .collect();
            held.iter()
                .all(|v| *v == Some(version))
                .then_some(())
                .ok_or(format!("{held:?}"))
        },
    )?;
    Ok(took)
}

/// Installs Debian packages if a command is missing; `Err` names what could
/// not be had.
pub fn ensure_installed(command: &str, package: &str) -> std::result::Result<(), String> {
    let present = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present(command) {
        return Ok(());
    }
    let _ = Command::new("apt-get").args(["update", "-qq"]).output();
    let installed = Command::new("apt-get")
        .args(["install", "-y", "-qq", package])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output();
    if present(command) {
        return Ok(());
    }
    Err(format!(
        "{command} is missing and `apt-get install {package}` did not provide it ({:?})",
        installed.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
    ))
}
