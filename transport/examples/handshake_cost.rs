//! Measures the CPU the transport spends per operation, for the simulator's
//! CPU model (`gossamer-sim --costs`): a full mutual-TLS QUIC handshake, a
//! reconnection to a peer seen before, a datagram, and a stream exchange.
//!
//! Every endpoint runs in this one process, on one thread (a current-thread
//! runtime), so the CPU both sides of each operation spend is the thread's
//! CPU time across the operation (read from `/proc/self/task/*/schedstat`,
//! nanosecond resolution). Certificates and endpoints are made before the
//! clock starts; only the operations are measured.
//!
//! ```text
//! nice -n 19 cargo run --release -p gossamer-transport --example handshake_cost > costs.toml
//! nice -n 19 cargo run --release -p gossamer-sim -- formation --costs costs.toml
//! ```
//!
//! Options: `--handshakes N` (default 200), `--datagrams N` (default 20000),
//! `--streams N` (default 2000). stdout is the cost file (TOML, CPU
//! microseconds per operation and side); stderr shows the raw figures.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use gossamer_transport::pki::{generate_ca, issue_node_cert};
use gossamer_transport::{Inbound, MeshIdentity, Receivers, Transport, TransportConfig};

/// Errors end the measurement with a message.
type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const TRUST_DOMAIN: &str = "cost.mesh";
/// A SWIM datagram of typical size (probe or ack with a few updates).
const DATAGRAM_BYTES: usize = 200;
/// A stream request or answer of typical size (a catalog entry).
const STREAM_BYTES: usize = 300;
/// Operations in flight at once (the CPU total does not depend on it).
const BATCH: usize = 16;

/// CPU time this process has used, in nanoseconds, over all its threads.
fn cpu_ns() -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path().join("schedstat");
        // A thread may end between listing and reading.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("cannot parse {}", path.display()))?;
        total += ns;
    }
    Ok(total)
}

fn identity(dir: &Path, ca: &gossamer_transport::pki::PemPair, name: &str) -> Result<MeshIdentity> {
    let pair = issue_node_cert(ca, name, TRUST_DOMAIN)?;
    let cert = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pair.cert)?;
    std::fs::write(&key, &pair.key)?;
    Ok(MeshIdentity::load(
        &dir.join("ca.pem"),
        &cert,
        &key,
        Some(name),
    )?)
}

fn bind(id: MeshIdentity) -> Result<(Transport, Receivers)> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    Ok(Transport::bind(id, TransportConfig::default(), socket)?)
}

/// Counts the datagrams and answers the streams that reach the server.
fn serve(mut rx: Receivers, datagrams: Arc<AtomicU64>) {
    tokio::spawn(async move {
        while let Some(item) = rx.datagrams.recv().await {
            if let Inbound::Datagram { .. } = item {
                datagrams.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    tokio::spawn(async move {
        while let Some(item) = rx.streams.recv().await {
            if let Inbound::Stream {
                mut send, mut recv, ..
            } = item
            {
                tokio::spawn(async move {
                    if recv.read_to_end(64 * 1024).await.is_ok() {
                        let _ = send.write_all(&[7u8; STREAM_BYTES]).await;
                        let _ = send.finish();
                    }
                });
            }
        }
    });
}

/// Waits until `done()` holds, for at most 30 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    for _ in 0..30_000 {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(format!("timed out waiting for {what}").into())
}

fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{name} takes a positive number").into()),
        None => Ok(default),
    }
}

struct Figures {
    full_pair_us: f64,
    /// `None` if the connections could not be closed to measure it.
    reconnect_pair_us: Option<f64>,
    datagram_pair_us: f64,
    stream_pair_us: f64,
}

async fn measure(
    dir: &Path,
    handshakes: usize,
    datagrams: usize,
    streams: usize,
) -> Result<Figures> {
    let ca = generate_ca(TRUST_DOMAIN)?;
    std::fs::write(dir.join("ca.pem"), &ca.cert)?;
    let (server, server_rx) = bind(identity(dir, &ca, "server")?)?;
    let addr: SocketAddr = server.local_addr()?;
    let arrived = Arc::new(AtomicU64::new(0));
    serve(server_rx, arrived.clone());
    // One client for datagrams and streams (and to warm every code path),
    // then one fresh client per measured handshake: a new endpoint holds no
    // TLS session, so its first handshake is a full one.
    let mut clients = Vec::with_capacity(handshakes + 1);
    for i in 0..=handshakes {
        clients.push(bind(identity(dir, &ca, &format!("c{i}"))?)?);
    }
    let (warm, _warm_rx) = clients.remove(0);
    let payload = Bytes::from(vec![1u8; DATAGRAM_BYTES]);
    warm.send_datagram("server", addr, payload.clone());
    until("the first datagram", || {
        arrived.load(Ordering::Relaxed) == 1
    })
    .await?;

    // Datagrams on an open connection: send and receive, both sides.
    let seen = arrived.load(Ordering::Relaxed);
    let start = cpu_ns()?;
    let mut sent = 0;
    while sent < datagrams {
        let n = BATCH.min(datagrams - sent);
        for _ in 0..n {
            warm.send_datagram("server", addr, payload.clone());
        }
        sent += n;
        let want = seen + sent as u64;
        // Loopback may drop a datagram under load: wait a little, not forever.
        let _ = until("datagrams", || arrived.load(Ordering::Relaxed) >= want).await;
    }
    let datagram_pair_us = (cpu_ns()? - start) as f64 / 1e3 / datagrams as f64;

    // Stream exchanges: open, request, answer, close.
    let start = cpu_ns()?;
    for _ in 0..streams {
        let (mut send, mut recv) = warm.open_bi("server", addr).await?;
        send.write_all(&[3u8; STREAM_BYTES]).await?;
        send.finish()?;
        recv.read_to_end(64 * 1024).await?;
    }
    let stream_pair_us = (cpu_ns()? - start) as f64 / 1e3 / streams as f64;

    // One datagram from every client, in batches: the CPU per client, less
    // the datagram's own cost (each one needs a handshake first).
    let round = |what: &'static str| {
        let (clients, arrived, payload) = (&clients, &arrived, &payload);
        async move {
            let start = cpu_ns()?;
            let base = arrived.load(Ordering::Relaxed);
            for (i, chunk) in clients.chunks(BATCH).enumerate() {
                for (c, _) in chunk {
                    c.send_datagram("server", addr, payload.clone());
                }
                let want = base + (i * BATCH + chunk.len()) as u64;
                until(what, || arrived.load(Ordering::Relaxed) >= want).await?;
            }
            Result::<f64>::Ok(
                (cpu_ns()? - start) as f64 / 1e3 / handshakes as f64 - datagram_pair_us,
            )
        }
    };
    let full_pair_us = round("handshakes").await?;

    // Reconnections: every client's cache lets its connection go, as it
    // does after `[peer_links] idle`, and the next datagram resumes.
    for (c, _) in &clients {
        c.close_idle(&c.links());
    }
    let closed = until("connections to close", || server.connections() <= 1)
        .await
        .is_ok();
    let mut reconnect_pair_us = None;
    if closed {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reconnect_pair_us = Some(round("reconnections").await?);
    }
    Ok(Figures {
        full_pair_us,
        reconnect_pair_us,
        datagram_pair_us,
        stream_pair_us,
    })
}

fn main() -> Result<()> {
    let handshakes = arg("--handshakes", 200)?.max(1);
    let datagrams = arg("--datagrams", 20_000)?.max(1);
    let streams = arg("--streams", 2_000)?.max(1);
    let dir = tempfile::tempdir()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let f = runtime.block_on(measure(dir.path(), handshakes, datagrams, streams))?;
    eprintln!(
        "CPU per operation, both sides together: full handshake {:.0} us, \
         reconnection {}, datagram {:.1} us, stream exchange {:.1} us \
         ({handshakes} handshakes, {datagrams} datagrams, {streams} streams)",
        f.full_pair_us,
        f.reconnect_pair_us.map_or_else(
            || "not measured (connections stayed open)".to_owned(),
            |r| format!("{r:.0} us")
        ),
        f.datagram_pair_us,
        f.stream_pair_us
    );
    if f.reconnect_pair_us
        .is_some_and(|r| r > 0.8 * f.full_pair_us)
    {
        eprintln!("reconnections cost about as much as full handshakes: no TLS resumption");
    }
    println!("# CPU microseconds per operation and side, measured by");
    println!("# transport/examples/handshake_cost.rs (release build, one thread).");
    println!("handshake_full_us = {:.1}", f.full_pair_us / 2.0);
    if let Some(r) = f.reconnect_pair_us {
        println!("handshake_resumed_us = {:.1}", r / 2.0);
    }
    println!("datagram_send_us = {:.2}", f.datagram_pair_us / 2.0);
    println!("datagram_recv_us = {:.2}", f.datagram_pair_us / 2.0);
    println!("stream_message_us = {:.2}", f.stream_pair_us / 4.0);
    Ok(())
}
