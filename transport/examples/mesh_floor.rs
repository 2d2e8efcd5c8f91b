//! What the mesh hop costs with nothing else on it: two processes, each one
//! endpoint of the agents' QUIC transport (mutual TLS, the agents' own
//! configuration), and no HTTP, no routing and no TCP leg.
//!
//! An agent does all of this and more on every request, so these figures
//! are floors for the data plane's goals (docs/benchmarks.md, "The mesh
//! hop's floor"):
//! - **requests at a fixed rate**: 1 KiB each way, as a proxied `GET /1k`
//!   carries, each on a new bidirectional stream (as the agents carry a
//!   request) and then on streams kept open between requests; the figures
//!   are the latency from the pacing tick to the answer's end, and each
//!   process's CPU per second (vCPU) and per request;
//! - **bulk**: one stream carrying `--bulk-mib` MiB from the server to the
//!   client, against the same bytes over a loopback TCP connection between
//!   the same two processes (plain copies, no encryption).
//!
//! Run it as the bench runs the agents, both processes on one core:
//!
//! ```text
//! cargo build --release -p gossamer-transport --example mesh_floor
//! taskset -c 1 target/release/examples/mesh_floor --pacer-cpu 0
//! ```
//!
//! Options: `--rates 1000,2000`, `--seconds N` (10), `--bulk-mib N`
//! (1024), `--rounds N` (3, bulk transfers per kind), `--pacer-cpu LIST`
//! (moves the pacing thread to those CPUs with `taskset`, as the bench
//! runs its load generator on CPU 0: `--pacer-cpu 0`), `--loopback-mtu N`
//! (the agent's `loopback_mtu`, 16384 by default). The server is this
//! program again, started with `--serve DIR`; it ends when its stdin
//! closes.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gossamer_transport::pki::{PemPair, generate_ca, issue_node_cert};
use gossamer_transport::{
    Inbound, MeshIdentity, RecvStream, SendStream, Transport, TransportConfig,
};

/// Errors end the measurement with a message.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TRUST_DOMAIN: &str = "floor.mesh";
/// A request and an answer: the bench's `/1k` body.
const MESSAGE: usize = 1024;
/// The bulk sender's write size.
const CHUNK: usize = 64 * 1024;
/// Requests warming both processes before anything is measured.
const WARM: usize = 2_000;

/// A request is MESSAGE bytes; its first byte says what it asks for.
const ASK_ANSWER: u8 = b'r';
const ASK_BULK: u8 = b'b';

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn number(name: &str, default: u64) -> Result<u64> {
    match arg(name) {
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} takes a positive number, not {v:?}").into()),
        None => Ok(default),
    }
}

/// CPU time a process has used, in nanoseconds, over its threads but
/// `except`.
fn cpu_ns(pid: u32, except: Option<&str>) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        if except.is_some_and(|tid| task.file_name() == tid) {
            continue;
        }
        let path = task.path().join("schedstat");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // the thread ended between listing and reading
        };
        total += text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or_else(|| format!("cannot parse {}", path.display()))?;
    }
    Ok(total)
}

fn identity(dir: &Path, name: &str) -> Result<MeshIdentity> {
    Ok(MeshIdentity::load(
        &dir.join("ca.pem"),
        &dir.join(format!("{name}.pem")),
        &dir.join(format!("{name}.key")),
        Some(name),
    )?)
}

fn write_identity(dir: &Path, ca: &PemPair, name: &str) -> Result<()> {
    let pair = issue_node_cert(ca, name, TRUST_DOMAIN)?;
    std::fs::write(dir.join(format!("{name}.pem")), &pair.cert)?;
    std::fs::write(dir.join(format!("{name}.key")), &pair.key)?;
    Ok(())
}

/// An endpoint as an agent binds it; `--loopback-mtu` as in the agent's
/// config file.
fn bind(id: MeshIdentity) -> Result<(Transport, gossamer_transport::Receivers)> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    let defaults = TransportConfig::default();
    let loopback_mtu = number("--loopback-mtu", defaults.loopback_mtu.into())?;
    let config = TransportConfig {
        loopback_mtu: u16::try_from(loopback_mtu).map_err(|_| "--loopback-mtu is at most 65535")?,
        ..defaults
    };
    Ok(Transport::bind(id, config, socket)?)
}

/// The server: answers each stream, and sends the TCP reference's bytes to
/// each TCP connection. Prints its QUIC and TCP addresses, then runs until
/// its stdin closes.
fn serve(dir: &Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (transport, mut rx) = bind(identity(dir, "server")?)?;
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{} {}", transport.local_addr()?, tcp.local_addr()?);
        std::io::stdout().flush()?;
        let answer = Bytes::from(vec![7u8; MESSAGE]);
        let zeros = Bytes::from(vec![0u8; CHUNK]);
        let streams = tokio::spawn({
            let zeros = zeros.clone();
            async move {
                while let Some(item) = rx.streams.recv().await {
                    let Inbound::Stream {
                        mut send, mut recv, ..
                    } = item
                    else {
                        continue;
                    };
                    let (answer, zeros) = (answer.clone(), zeros.clone());
                    tokio::spawn(async move {
                        // Requests of MESSAGE bytes each, until the client
                        // finishes its side.
                        let mut request = vec![0u8; MESSAGE];
                        while recv.read_exact(&mut request).await.is_ok() {
                            match request[0] {
                                ASK_ANSWER => {
                                    if send.write_chunk(answer.clone()).await.is_err() {
                                        return;
                                    }
                                }
                                ASK_BULK => {
                                    let total =
                                        u64::from_be_bytes(request[1..9].try_into().unwrap());
                                    let mut sent = 0;
                                    while sent < total {
                                        let n = (total - sent).min(CHUNK as u64) as usize;
                                        if send.write_chunk(zeros.slice(..n)).await.is_err() {
                                            return;
                                        }
                                        sent += n as u64;
                                    }
                                }
                                _ => return,
                            }
                        }
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    });
                }
            }
        });
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut conn, _)) = tcp.accept().await {
                let zeros = zeros.clone();
                tokio::spawn(async move {
                    let mut total = [0u8; 8];
                    if conn.read_exact(&mut total).await.is_err() {
                        return;
                    }
                    let mut left = u64::from_be_bytes(total);
                    while left > 0 {
                        let n = left.min(CHUNK as u64) as usize;
                        if conn.write_all(&zeros[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                });
            }
        });
        // The parent closes our stdin when it is done (or dies).
        tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
        streams.abort();
        transport.close(Duration::from_secs(1)).await;
        Result::Ok(())
    })
}

/// The server process, stopped when dropped.
struct Server {
    child: Child,
    quic: SocketAddr,
    tcp: SocketAddr,
}

impl Server {
    fn start(dir: &Path) -> Result<Self> {
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("--serve").arg(dir);
        if let Some(mtu) = arg("--loopback-mtu") {
            command.args(["--loopback-mtu", &mtu]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().ok_or("no stdout")?).read_line(&mut line)?;
        let mut addrs = line.split_whitespace();
        let (Some(quic), Some(tcp)) = (addrs.next(), addrs.next()) else {
            let _ = child.kill();
            return Err(format!("the server did not start (it printed {line:?})").into());
        };
        Ok(Self {
            quic: quic.parse()?,
            tcp: tcp.parse()?,
            child,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request of MESSAGE bytes: `kind`, then `arg`.
fn request(kind: u8, arg: u64) -> Bytes {
    let mut r = vec![0u8; MESSAGE];
    r[0] = kind;
    r[1..9].copy_from_slice(&arg.to_be_bytes());
    Bytes::from(r)
}

/// Streams kept open between requests, for the reused-stream runs.
type Idle = Arc<std::sync::Mutex<Vec<(SendStream, RecvStream)>>>;

/// One request and its answer: on a new stream, finished after it, or
/// (with `idle`) on a stream kept open for the next request.
async fn exchange(
    client: &Transport,
    server: SocketAddr,
    request: Bytes,
    idle: Option<&Idle>,
) -> Result<()> {
    if let Some(idle) = idle {
        let kept = idle.lock().unwrap().pop();
        let (mut send, mut recv) = match kept {
            Some(halves) => halves,
            None => client.open_bi("server", server).await?,
        };
        send.write_chunk(request).await?;
        let mut answer = [0u8; MESSAGE];
        recv.read_exact(&mut answer).await?;
        idle.lock().unwrap().push((send, recv));
        return Ok(());
    }
    let (mut send, mut recv) = client.open_bi("server", server).await?;
    send.write_chunk(request).await?;
    send.finish()?;
    let answer = recv.read_to_end(2 * MESSAGE).await?;
    if answer.len() != MESSAGE {
        return Err(format!("an answer of {} bytes", answer.len()).into());
    }
    Ok(())
}

struct RateFigures {
    done: usize,
    failed: usize,
    p50_ms: f64,
    p99_ms: f64,
    vcpu: [f64; 2],
}

/// The calling thread's id, as `/proc/PID/task` names it.
fn thread_id() -> Result<String> {
    let link = std::fs::read_link("/proc/thread-self")?;
    let tid = link
        .file_name()
        .ok_or("no thread id in /proc/thread-self")?;
    Ok(tid.to_string_lossy().into_owned())
}

/// Moves thread `tid` to `cpus` (a `taskset` list).
fn pin(tid: &str, cpus: &str) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-p", "-c", cpus, tid])
        .stdout(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "taskset -p -c {cpus} {tid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// `rate` requests a second for `seconds`. A thread of its own paces them
/// (as a load generator would, from outside the client's runtime): each
/// tick is a datagram on a Unix socket that wakes the client, as a
/// caller's request wakes an agent. Latency runs from the tick's send to
/// the answer's end; the pacing thread's own CPU is left out.
async fn at_rate(
    client: &Transport,
    server: &Server,
    rate: u64,
    seconds: u64,
    idle: Option<&Idle>,
) -> Result<RateFigures> {
    let request = request(ASK_ANSWER, 0);
    let pids = [std::process::id(), server.child.id()];
    let total = rate * seconds;
    let (ticks, wake) = std::os::unix::net::UnixDatagram::pair()?;
    wake.set_nonblocking(true)?;
    let wake = tokio::net::UnixDatagram::from_std(wake)?;
    let base = Instant::now();
    let cpu0 = [cpu_ns(pids[0], None)?, cpu_ns(pids[1], None)?];
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let pacer_cpu = arg("--pacer-cpu");
    let pacer = std::thread::spawn(move || -> Result<()> {
        let tid = thread_id()?;
        if let Some(cpu) = pacer_cpu {
            pin(&tid, &cpu)?;
        }
        tid_tx.send(tid)?;
        let period = Duration::from_secs_f64(1.0 / rate as f64);
        for i in 0..total {
            let due = period * i as u32;
            if let Some(wait) = due.checked_sub(base.elapsed()) {
                std::thread::sleep(wait);
            }
            ticks.send(&(base.elapsed().as_nanos() as u64).to_ne_bytes())?;
        }
        Ok(())
    });
    let pacer_tid = tid_rx
        .recv()
        .map_err(|_| "the pacing thread did not start")?;
    let (tx, mut results) = tokio::sync::mpsc::unbounded_channel();
    let mut tick = [0u8; 8];
    for _ in 0..total {
        wake.recv(&mut tick).await?;
        let sent = base + Duration::from_nanos(u64::from_ne_bytes(tick));
        let (client, request, tx) = (client.clone(), request.clone(), tx.clone());
        let (addr, idle) = (server.quic, idle.cloned());
        tokio::spawn(async move {
            let ok = exchange(&client, addr, request, idle.as_ref())
                .await
                .is_ok();
            let _ = tx.send((ok, sent.elapsed()));
        });
    }
    drop(tx);
    let mut latencies = Vec::with_capacity(total as usize);
    let mut failed = 0;
    while let Some((ok, took)) = results.recv().await {
        if ok {
            latencies.push(took);
        } else {
            failed += 1;
        }
    }
    let elapsed = base.elapsed().as_secs_f64();
    // The pacing thread's CPU is in neither reading: it started after the
    // first, and is skipped (or gone) in the second.
    let cpu1 = [cpu_ns(pids[0], Some(&pacer_tid))?, cpu_ns(pids[1], None)?];
    pacer.join().map_err(|_| "the pacing thread panicked")??;
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let used = [cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]];
    Ok(RateFigures {
        done: latencies.len(),
        failed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        vcpu: used.map(|ns| ns as f64 / 1e9 / elapsed),
    })
}

/// Seconds to receive `bytes` on one QUIC stream.
async fn bulk_quic(client: &Transport, server: SocketAddr, bytes: u64) -> Result<f64> {
    let start = Instant::now();
    let (mut send, mut recv) = client.open_bi("server", server).await?;
    send.write_chunk(request(ASK_BULK, bytes)).await?;
    send.finish()?;
    let mut got = 0u64;
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await? {
        got += chunk.bytes.len() as u64;
    }
    if got != bytes {
        return Err(format!("the bulk stream ended after {got} of {bytes} bytes").into());
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds to receive `bytes` on a loopback TCP connection.
async fn bulk_tcp(server: SocketAddr, bytes: u64) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let start = Instant::now();
    let mut conn = tokio::net::TcpStream::connect(server).await?;
    conn.write_all(&bytes.to_be_bytes()).await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < bytes {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            return Err(format!("the TCP reference ended after {got} of {bytes} bytes").into());
        }
        got += n as u64;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn measure(dir: &Path) -> Result<()> {
    let rates: Vec<u64> = arg("--rates")
        .unwrap_or_else(|| "1000,2000".into())
        .split(',')
        .map(|r| r.trim().parse().map_err(|_| format!("bad rate {r:?}")))
        .collect::<std::result::Result<_, _>>()?;
    let seconds = number("--seconds", 10)?.max(1);
    let bulk = number("--bulk-mib", 1024)?.max(1) << 20;
    let rounds = number("--rounds", 3)?.max(1);

    let server = Server::start(dir)?;
    let (client, _rx) = bind(identity(dir, "client")?)?;
    let client = Arc::new(client);
    let idle = Idle::default();
    for _ in 0..WARM {
        exchange(&client, server.quic, request(ASK_ANSWER, 0), None).await?;
        exchange(&client, server.quic, request(ASK_ANSWER, 0), Some(&idle)).await?;
    }
    println!("requests of 1 KiB each way, both processes on this CPU set:");
    for (&rate, reuse) in rates.iter().flat_map(|r| [(r, false), (r, true)]) {
        let f = at_rate(&client, &server, rate, seconds, reuse.then_some(&idle)).await?;
        println!(
            "  {rate} req/s for {seconds} s, {}: {} done, {} failed; p50 {:.3} ms, p99 {:.3} ms; \
             vCPU client {:.3}, server {:.3} ({:.1} / {:.1} us a request)",
            if reuse {
                "streams kept open"
            } else {
                "a new stream each"
            },
            f.done,
            f.failed,
            f.p50_ms,
            f.p99_ms,
            f.vcpu[0],
            f.vcpu[1],
            f.vcpu[0] * 1e6 / rate as f64,
            f.vcpu[1] * 1e6 / rate as f64,
        );
    }
    let mut quic = Vec::new();
    let mut tcp = Vec::new();
    for _ in 0..rounds {
        quic.push(bulk_quic(&client, server.quic, bulk).await?);
        tcp.push(bulk_tcp(server.tcp, bulk).await?);
    }
    let (quic, tcp) = (median(quic), median(tcp));
    let mb = |s: f64| bulk as f64 / s / 1e6;
    println!(
        "bulk, {} MiB, median of {rounds}: one QUIC stream {:.2} s ({:.0} MB/s), \
         loopback TCP {:.2} s ({:.0} MB/s); QUIC at {:.2}x TCP",
        bulk >> 20,
        quic,
        mb(quic),
        tcp,
        mb(tcp),
        tcp / quic
    );
    client.close(Duration::from_secs(1)).await;
    Ok(())
}

fn main() -> Result<()> {
    if let Some(dir) = arg("--serve") {
        return serve(Path::new(&dir));
    }
    let dir = tempfile::tempdir()?;
    let ca = generate_ca(TRUST_DOMAIN)?;
    std::fs::write(dir.path().join("ca.pem"), &ca.cert)?;
    write_identity(dir.path(), &ca, "server")?;
    write_identity(dir.path(), &ca, "client")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(dir.path()))
}
