//! Soak and chaos harness: a 5-agent mesh on loopback carries continuous
//! mixed traffic (HTTP/1.1, h2c, WebSocket) through the proxies of n1 and n2
//! while a seeded schedule kills agents, partitions them, registers and
//! deregisters services and kills upstreams. Invariants are checked while it
//! runs and at the end; the report is printed as tables (and written as JSON
//! with a time series when `GOSSAMER_SOAK_OUT` is set). What each invariant
//! means: `docs/reliability.md`.
//!
//! Ignored by default: it runs for the whole duration.
//!
//! ```text
//! # CI's 3-minute version
//! GOSSAMER_SOAK_SECS=180 cargo test -p gossamer-node --test soak -- --ignored --nocapture
//! # the default run: 30 minutes
//! cargo test -p gossamer-node --test soak -- --ignored --nocapture
//! # another chaos schedule, keeping report.json, timeseries.csv and failures.csv
//! # (a relative GOSSAMER_SOAK_OUT is taken from the workspace root), then a plot
//! GOSSAMER_SOAK_SECS=180 GOSSAMER_SOAK_SEED=7 GOSSAMER_SOAK_OUT=target/soak \
//!     cargo test -p gossamer-node --test soak -- --ignored --nocapture
//! python3 examples/soak/plot.py target/soak/timeseries.csv target/soak/soak.svg
//! ```
//!
//! `GOSSAMER_SOAK_KEEP_LOGS=1` also copies every agent log (JSON lines) to
//! `$GOSSAMER_SOAK_OUT/logs`; a failed run always keeps them (in a
//! `gossamer-soak-<unix time>` folder of the temp dir when OUT is unset).
//!
//! Adding a traffic kind (gRPC, say) is one struct implementing [`Traffic`]
//! and one line in [`KINDS`]; the traffic streams, counters, failover windows,
//! report and CSV columns follow from that list.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};
use support::{Agent, AgentOptions, DemoService, Pki, open_fds, wait_health, wait_states};

// ---------------------------------------------------------------------------
// Parameters

/// Run length when `GOSSAMER_SOAK_SECS` is unset.
const DEFAULT_SECS: u64 = 1800;
/// Seed when `GOSSAMER_SOAK_SEED` is unset.
const DEFAULT_SEED: u64 = 1;
/// Requests per second of each traffic kind, over both proxies together.
const RATE_PER_KIND: f64 = 50.0;
/// Distinct hash keys per (kind, proxy): enough to reach every instance.
const KEYS: u64 = 4096;
/// Time-series bucket and RSS / fd sampling period.
const BUCKET: f64 = 5.0;
/// Seconds after each disruptive action, and after its undo, during which
/// failed requests are expected (detection plus retry).
const FAILOVER_WINDOW: f64 = 10.0;
/// Largest share of requests allowed to fail outside failover windows.
const MAX_OUTSIDE_RATIO: f64 = 0.001;
/// Catalogs must agree this long after a disturbance ends.
const CONVERGE_LIMIT: f64 = 10.0;
/// How long convergence is waited for (to report how late it was).
const CONVERGE_GIVE_UP: Duration = Duration::from_secs(30);
/// A registration older than this must be in n1's and n2's catalogs at
/// every sample (the continuous check; all live agents are checked after
/// every heal and restart, and at the end).
const VISIBLE_AFTER: f64 = 10.0;
/// Largest RSS / fd growth from the warm-up level to the end level.
const MAX_GROWTH: f64 = 0.10;
/// The warm-up is this share of the run.
const WARM_UP: f64 = 0.2;
/// Nominal time between chaos actions, and its seeded jitter (±).
const ACTION_GAP: f64 = 15.0;
const ACTION_JITTER: f64 = 1.0;
/// No chaos in the first seconds (traffic settles) ...
const CHAOS_LEAD: f64 = 10.0;
/// ... nor in the last ones (the last undo, its window and convergence end
/// well before the end level of RSS and fds is measured).
const CHAOS_TAIL: f64 = 40.0;
/// How long a killed agent or upstream stays down, and a partition lasts.
const AGENT_DOWN: f64 = 5.0;
const UPSTREAM_DOWN: f64 = 5.0;
const PARTITION_HOLD: f64 = 10.0;
/// An `extra-K` registration is deregistered this many action gaps later.
const EXTRA_LIFETIME_GAPS: f64 = 2.0;

/// The agents; n1 and n2 carry the traffic and are never killed.
const NODES: [&str; 5] = ["n1", "n2", "n3", "n4", "n5"];
/// Agents that may be killed.
const KILLABLE: [&str; 3] = ["n3", "n4", "n5"];
/// `web` instances and the agent hosting each (local path on n1, remote
/// paths everywhere else; n2 and n5 host none).
const WEB: [(&str, &str); 3] = [("web-1", "n1"), ("web-3", "n3"), ("web-4", "n4")];
/// grpcio `echo` instances (protocol `grpc`) and their agents.
const GRPC: [(&str, &str); 2] = [("echo-1", "n1"), ("echo-4", "n4")];

/// Log lines that contain "panicked" or are JSON with `"level":"ERROR"` fail
/// the run unless they contain one of these substrings. Each entry must say
/// why the line is expected under this chaos. Deliberately empty: no such
/// line has been seen in a run yet.
const LOG_ALLOW: &[(&str, &str)] = &[];

// ---------------------------------------------------------------------------
// Configuration, clock, PRNG

#[derive(Debug, Clone)]
struct Config {
    secs: f64,
    seed: u64,
    out: Option<PathBuf>,
}

impl Config {
    fn from_env() -> Result<Self> {
        let number = |var: &str, default: u64| -> Result<u64> {
            match std::env::var(var) {
                Ok(v) => v
                    .trim()
                    .parse()
                    .with_context(|| format!("{var}: expected a whole number, got {v:?}")),
                Err(_) => Ok(default),
            }
        };
        let secs = number("GOSSAMER_SOAK_SECS", DEFAULT_SECS)?;
        ensure!(
            secs >= 60,
            "GOSSAMER_SOAK_SECS: at least 60 (chaos needs room)"
        );
        let seed = number("GOSSAMER_SOAK_SEED", DEFAULT_SEED)?;
        let out = std::env::var_os("GOSSAMER_SOAK_OUT").map(|p| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
            }
        });
        Ok(Self {
            secs: secs as f64,
            seed,
            out,
        })
    }
}

/// Seconds since the traffic started.
#[derive(Debug, Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn now(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    fn sleep_until(&self, t: f64) {
        let left = t - self.now();
        if left > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(left));
        }
    }
}

/// SplitMix64: small, seeded, the same sequence on every machine.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed ^ 0x5EED_5EED_5EED_5EED)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * (hi - lo)
    }
}

// ---------------------------------------------------------------------------
// Traffic

/// One kind of traffic. An instance lives in one worker thread (so it may
/// keep a runtime or a connection) and makes one request per `call`,
/// through the proxy at `proxy`, to service `web` with hash key `key`.
/// `Ok` names the instance that answered (`x-served-by`); `Err` is the
/// failure as text.
trait Traffic {
    fn call(&mut self, proxy: SocketAddr, key: &str, seq: u64) -> Result<String, String>;
}

/// A traffic kind: its name (report rows, CSV columns) and how a driver
/// thread makes its instance.
struct Kind {
    name: &'static str,
    make: fn() -> Result<Box<dyn Traffic>, String>,
}

/// Every kind of traffic the soak sends. One more kind = one more line.
const KINDS: &[Kind] = &[
    Kind {
        name: "http1",
        make: || Ok(Box::new(Http1)),
    },
    Kind {
        name: "h2c",
        make: || H2c::new().map(|t| Box::new(t) as Box<dyn Traffic>),
    },
    Kind {
        name: "websocket",
        make: || Ok(Box::new(WebSocket)),
    },
    Kind {
        name: "grpc",
        make: || Grpc::new().map(|t| Box::new(t) as Box<dyn Traffic>),
    },
];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Above the proxy's 15 s request timeout, so the proxy's answer is seen.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn connect(proxy: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect_timeout(&proxy, CONNECT_TIMEOUT)
        .map_err(|e| format!("connect {proxy}: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
        .and_then(|()| s.set_nodelay(true))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(s)
}

/// Reads a response head byte by byte (so nothing after it is consumed).
fn read_head(s: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        match s.read(&mut byte) {
            Ok(0) if head.is_empty() => return Err("connection closed before a response".into()),
            Ok(0) => return Err("connection closed inside the response head".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("reading the response head: {e}")),
        }
    }
    String::from_utf8(head).map_err(|_| "response head is not UTF-8".into())
}

fn status_of(head: &str) -> Result<u16, String> {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {:?}", head.lines().next().unwrap_or("")))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A failed answer as text: status and the first line of the body.
fn answer_error(status: u16, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line: String = text
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    format!("{status}: {line}")
}

/// HTTP/1.1, one request per connection, written by hand.
struct Http1;

impl Traffic for Http1 {
    fn call(&mut self, proxy: SocketAddr, key: &str, seq: u64) -> Result<String, String> {
        let mut s = connect(proxy)?;
        write!(
            s,
            "GET /soak/http1?seq={seq} HTTP/1.1\r\nHost: web\r\nx-hash-key: {key}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("sending the request: {e}"))?;
        let mut response = Vec::new();
        (&mut s)
            .take(1 << 20)
            .read_to_end(&mut response)
            .map_err(|e| format!("reading the response: {e}"))?;
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| {
                if response.is_empty() {
                    "connection closed before a response".to_owned()
                } else {
                    "no complete response head".to_owned()
                }
            })?;
        let head = String::from_utf8_lossy(&response[..split]).into_owned();
        let body = &response[split + 4..];
        let status = status_of(&head)?;
        if status != 200 {
            return Err(answer_error(status, body));
        }
        let served = header(&head, "x-served-by").ok_or("200 without x-served-by")?;
        if !String::from_utf8_lossy(body).contains("\"instance\"") {
            return Err(format!("200 from {served} with an unexpected body"));
        }
        Ok(served.to_owned())
    }
}

type H2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>;

/// h2c with prior knowledge (hyper's HTTP/2-only client connection). Like
/// a real HTTP/2 client, every worker shares one long-lived connection per
/// proxy (requests are multiplexed on it), reopened when it closes; it is
/// driven by one small runtime for the whole test.
struct H2c {
    shared: &'static H2Shared,
}

struct H2Shared {
    rt: tokio::runtime::Runtime,
    conns: Mutex<std::collections::HashMap<SocketAddr, H2Sender>>,
}

static H2: std::sync::OnceLock<Result<H2Shared, String>> = std::sync::OnceLock::new();

impl H2c {
    fn new() -> Result<Self, String> {
        let shared = H2.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map(|rt| H2Shared {
                    rt,
                    conns: Mutex::new(Default::default()),
                })
                .map_err(|e| format!("tokio runtime: {e}"))
        });
        match shared {
            Ok(shared) => Ok(Self { shared }),
            Err(e) => Err(e.clone()),
        }
    }
}

impl Traffic for H2c {
    fn call(&mut self, proxy: SocketAddr, key: &str, seq: u64) -> Result<String, String> {
        let sender = lock(&self.shared.conns)
            .get(&proxy)
            .filter(|s| !s.is_closed())
            .cloned();
        let key = key.to_owned();
        let (result, sender) = self.shared.rt.block_on(async move {
            match tokio::time::timeout(IO_TIMEOUT, h2c_get(sender, proxy, key, seq)).await {
                Ok(done) => done,
                Err(_) => (Err(format!("no answer within {IO_TIMEOUT:?}")), None),
            }
        });
        if let Some(s) = sender {
            let mut conns = lock(&self.shared.conns);
            if conns.get(&proxy).is_none_or(|c| c.is_closed()) {
                conns.insert(proxy, s);
            }
        }
        result
    }
}

/// `sender` if it is still usable, else a new h2c connection to `proxy`.
async fn h2_ready<B>(
    sender: Option<hyper::client::conn::http2::SendRequest<B>>,
    proxy: SocketAddr,
) -> Result<hyper::client::conn::http2::SendRequest<B>, String>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let mut sender = match sender {
        Some(s) if !s.is_closed() => s,
        _ => {
            let stream = tokio::net::TcpStream::connect(proxy)
                .await
                .map_err(|e| format!("connect {proxy}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (s, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await
                    .map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(conn);
            s
        }
    };
    sender
        .ready()
        .await
        .map_err(|e| format!("h2 connection: {e}"))?;
    Ok(sender)
}

async fn h2c_get(
    sender: Option<H2Sender>,
    proxy: SocketAddr,
    key: String,
    seq: u64,
) -> (Result<String, String>, Option<H2Sender>) {
    use http_body_util::BodyExt;

    let mut sender = match h2_ready(sender, proxy).await {
        Ok(s) => s,
        Err(e) => return (Err(e), None),
    };
    let req = http::Request::get(format!("http://web/soak/h2c?seq={seq}"))
        .header("x-hash-key", key)
        .body(http_body_util::Empty::new())
        .expect("valid request");
    let response = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return (Err(format!("h2 request: {e}")), None),
    };
    let status = response.status().as_u16();
    let served = response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match response.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return (Err(format!("{status}, then the body failed: {e}")), None),
    };
    let result = match (status, served) {
        (200, Some(s)) if String::from_utf8_lossy(&body).contains("\"instance\"") => Ok(s),
        (200, Some(s)) => Err(format!("200 from {s} with an unexpected body")),
        (200, None) => Err("200 without x-served-by".into()),
        _ => Err(answer_error(status, &body)),
    };
    (result, Some(sender))
}

type GrpcSender = hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// gRPC unary calls (`gossamer.test.Echo/Unary`) to the grpcio servers of
/// `echo` (registered with protocol `grpc`): gRPC framing over h2c, `te:
/// trailers`, a deadline, and success read from `grpc-status`. Like a gRPC
/// channel, all calls through one proxy share one connection.
struct Grpc {
    shared: &'static H2Shared,
}

static GRPC_CONNS: std::sync::OnceLock<Mutex<std::collections::HashMap<SocketAddr, GrpcSender>>> =
    std::sync::OnceLock::new();

impl Grpc {
    fn new() -> Result<Self, String> {
        Ok(Self {
            shared: H2c::new()?.shared,
        })
    }
}

impl Traffic for Grpc {
    fn call(&mut self, proxy: SocketAddr, key: &str, seq: u64) -> Result<String, String> {
        let conns = GRPC_CONNS.get_or_init(Default::default);
        let sender = lock(conns).get(&proxy).filter(|s| !s.is_closed()).cloned();
        let key = key.to_owned();
        let (result, sender) = self.shared.rt.block_on(async move {
            match tokio::time::timeout(IO_TIMEOUT, grpc_unary(sender, proxy, key, seq)).await {
                Ok(done) => done,
                Err(_) => (Err(format!("no answer within {IO_TIMEOUT:?}")), None),
            }
        });
        if let Some(s) = sender {
            let mut conns = lock(conns);
            if conns.get(&proxy).is_none_or(|c| c.is_closed()) {
                conns.insert(proxy, s);
            }
        }
        result
    }
}

async fn grpc_unary(
    sender: Option<GrpcSender>,
    proxy: SocketAddr,
    key: String,
    seq: u64,
) -> (Result<String, String>, Option<GrpcSender>) {
    use http_body_util::BodyExt;

    let mut sender = match h2_ready(sender, proxy).await {
        Ok(s) => s,
        Err(e) => return (Err(e), None),
    };
    let payload = format!("soak {seq}");
    let mut message = vec![0u8];
    message.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    message.extend_from_slice(payload.as_bytes());
    let req = http::Request::post("http://echo/gossamer.test.Echo/Unary")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "10S")
        .header("x-hash-key", key)
        .body(http_body_util::Full::new(bytes::Bytes::from(message)))
        .expect("valid request");
    let response = match sender.send_request(req).await {
        Ok(r) => r,
        Err(e) => return (Err(format!("h2 request: {e}")), None),
    };
    let status = response.status().as_u16();
    let head_status = response.headers().get("grpc-status").cloned();
    let head_message = response.headers().get("grpc-message").cloned();
    let collected = match response.into_body().collect().await {
        Ok(c) => c,
        Err(e) => return (Err(format!("{status}, then the body failed: {e}")), None),
    };
    let trailers = collected.trailers().cloned();
    let data = collected.to_bytes();
    let grpc_status = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status").cloned())
        .or(head_status);
    let grpc_message = trailers
        .as_ref()
        .and_then(|t| t.get("grpc-message").cloned())
        .or(head_message);
    let text = |v: Option<http::HeaderValue>| {
        v.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    let result = match (status, text(grpc_status).as_str()) {
        (200, "0") if data.len() == 5 + payload.len() && data[5..] == *payload.as_bytes() => {
            Ok("echo".to_owned())
        }
        (200, "0") => Err("grpc-status 0 with a wrong echo".into()),
        (200, "") => Err("no grpc-status".into()),
        (200, code) => Err(format!("grpc-status {code}: {}", text(grpc_message))),
        _ => Err(answer_error(status, &data)),
    };
    (result, Some(sender))
}

/// A WebSocket round trip: the upgrade handshake, one masked text frame,
/// and its echo (the demo service echoes raw bytes after 101, so the echo
/// is our own frame, still masked). Framing written by hand (RFC 6455).
struct WebSocket;

const WS_TEXT: u8 = 0x1;
const WS_CLOSE: u8 = 0x8;

impl Traffic for WebSocket {
    fn call(&mut self, proxy: SocketAddr, key: &str, seq: u64) -> Result<String, String> {
        let mut s = connect(proxy)?;
        let nonce: Vec<u8> = (0..16u64)
            .map(|i| (seq.wrapping_mul(0x9E37_79B9).wrapping_add(i * 37) >> 3) as u8)
            .collect();
        write!(
            s,
            "GET /soak/ws HTTP/1.1\r\nHost: web\r\nx-hash-key: {key}\r\nConnection: Upgrade\r\n\
             Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {}\r\n\r\n",
            base64(&nonce)
        )
        .map_err(|e| format!("sending the handshake: {e}"))?;
        let head = read_head(&mut s)?;
        let status = status_of(&head)?;
        if status != 101 {
            // The connection stays open (keep-alive): read the body by its
            // length, not to EOF.
            let len = header(&head, "content-length")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                .min(4096);
            let mut body = Vec::new();
            let _ = (&mut s).take(len).read_to_end(&mut body);
            return Err(match header(&head, "x-served-by") {
                // An instance answered, but not as an upgrade.
                Some(inst) => format!("{status} from {inst} instead of 101 (not upgraded)"),
                None => format!("{} (instead of 101)", answer_error(status, &body)),
            });
        }
        let served = header(&head, "x-served-by")
            .ok_or("101 without x-served-by")?
            .to_owned();
        let text = format!("soak {key} #{seq}");
        let mask = (seq as u32 ^ 0xA5C3_5A3C).to_be_bytes();
        s.write_all(&ws_frame(WS_TEXT, text.as_bytes(), mask))
            .map_err(|e| format!("sending a frame after 101 from {served}: {e}"))?;
        let (opcode, payload) =
            ws_read_frame(&mut s).map_err(|e| format!("echo from {served}: {e}"))?;
        if opcode != WS_TEXT || payload != text.as_bytes() {
            return Err(format!(
                "echo from {served}: opcode {opcode}, {:?}",
                String::from_utf8_lossy(&payload)
            ));
        }
        // Close politely (status 1000); the echo of it is not awaited.
        let _ = s.write_all(&ws_frame(WS_CLOSE, &1000u16.to_be_bytes(), mask));
        let _ = s.shutdown(std::net::Shutdown::Write);
        Ok(served)
    }
}

/// One final, masked frame.
fn ws_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Reads one final frame (masked or not): (opcode, unmasked payload).
fn ws_read_frame(s: &mut impl Read) -> Result<(u8, Vec<u8>), String> {
    let mut read = |buf: &mut [u8]| s.read_exact(buf).map_err(|e| e.to_string());
    let mut h = [0u8; 2];
    read(&mut h)?;
    if h[0] & 0x80 == 0 {
        return Err("fragmented frame".into());
    }
    let len = match h[1] & 0x7F {
        126 => {
            let mut b = [0u8; 2];
            read(&mut b)?;
            u16::from_be_bytes(b) as u64
        }
        127 => {
            let mut b = [0u8; 8];
            read(&mut b)?;
            u64::from_be_bytes(b)
        }
        n => n as u64,
    };
    if len > 1 << 20 {
        return Err(format!("frame of {len} bytes"));
    }
    let mut mask = [0u8; 4];
    if h[1] & 0x80 != 0 {
        read(&mut mask)?;
    }
    let mut payload = vec![0u8; len as usize];
    read(&mut payload)?;
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    Ok((h[0] & 0x0F, payload))
}

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// What one worker thread counted.
#[derive(Debug, Default)]
struct Counters {
    ok: u64,
    failed: u64,
    /// (ok, failed) per time-series bucket, by request start.
    buckets: Vec<(u64, u64)>,
    failures: Vec<Failure>,
    /// Answers per instance.
    served: BTreeMap<String, u64>,
    latencies_ms: Vec<f32>,
    /// The worker could not run at all (e.g. no runtime).
    fatal: Option<String>,
}

#[derive(Debug, Clone)]
struct Failure {
    /// Start of the request (s since traffic start) and its duration.
    t: f64,
    took: f64,
    kind: &'static str,
    proxy: &'static str,
    key: String,
    error: String,
}

/// One stream of traffic: `kind` through `proxy` at `rate` requests per
/// second until `end` (or `stop`), with keys `kind-proxy-N`. Open loop: a
/// dispatcher thread ticks at the rate and hands each request to an idle
/// worker thread, starting a new worker (up to `MAX_WORKERS`) when all are
/// busy, so requests that hang (up to the proxy's 15 s request timeout) never
/// hold the others back. A tick that finds `MAX_WORKERS` busy workers is
/// counted as skipped.
struct Stream {
    kind: &'static Kind,
    proxy_name: &'static str,
    proxy: SocketAddr,
    rate: f64,
    clock: Clock,
    end: f64,
    stop: Arc<AtomicBool>,
}

/// Most worker threads of one stream (normally 1 to 3 are busy; right after
/// an agent is killed every request to its instance hangs until the proxy's
/// request timeout, which takes a dozen).
const MAX_WORKERS: usize = 64;

/// How a stream went: ticks it could not send, and the most workers it had.
#[derive(Debug, Default)]
struct StreamStats {
    skipped: AtomicU64,
    workers: AtomicU64,
}

impl Stream {
    /// Starts the dispatcher (which starts the workers). Adds the workers'
    /// counters (all `MAX_WORKERS`, made up front) to `counters`.
    fn start(
        self,
        counters: &mut AllCounters,
    ) -> Result<(std::thread::JoinHandle<()>, Arc<StreamStats>)> {
        let slots: Vec<Arc<Mutex<Counters>>> = (0..MAX_WORKERS)
            .map(|_| Arc::new(Mutex::new(Counters::default())))
            .collect();
        counters.extend(
            slots
                .iter()
                .map(|c| (self.kind.name, self.proxy_name, c.clone())),
        );
        let stats = Arc::new(StreamStats::default());
        let st = stats.clone();
        let name = format!("{}-{}", self.kind.name, self.proxy_name);
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || self.dispatch(&slots, &st))?;
        Ok((handle, stats))
    }

    /// Bounded: ends at `end`; then dropping the sender stops the workers,
    /// each within its current request's timeouts, and they are joined.
    fn dispatch(&self, slots: &[Arc<Mutex<Counters>>], stats: &StreamStats) {
        use std::sync::mpsc::TrySendError;
        let (tx, rx) = std::sync::mpsc::sync_channel::<u64>(1);
        let rx = Arc::new(Mutex::new(rx));
        let mut workers = Vec::new();
        let period = 1.0 / self.rate;
        let mut next = 0.0;
        let mut seq = 0u64;
        loop {
            let now = self.clock.now();
            if now >= self.end || self.stop.load(Ordering::Relaxed) {
                break;
            }
            if now < next {
                std::thread::sleep(Duration::from_secs_f64((next - now).min(0.2)));
                continue;
            }
            next = (next + period).max(now - 1.0);
            seq += 1;
            let mut job = seq;
            // A few tries: a worker just started needs a moment to take the
            // waiting request.
            for attempt in 0..50 {
                match tx.try_send(job) {
                    Ok(()) => break,
                    Err(TrySendError::Full(j)) => {
                        job = j;
                        if attempt == 0 && workers.len() < MAX_WORKERS {
                            let (kind, proxy_name, proxy, clock) =
                                (self.kind, self.proxy_name, self.proxy, self.clock);
                            let (rx, c) = (rx.clone(), slots[workers.len()].clone());
                            let spawned = std::thread::Builder::new()
                                .name(format!("{}-{}-{}", kind.name, proxy_name, workers.len()))
                                .spawn(move || worker(kind, proxy_name, proxy, clock, &rx, &c));
                            match spawned {
                                Ok(h) => workers.push(h),
                                Err(e) => {
                                    lock(&slots[workers.len()]).fatal =
                                        Some(format!("spawning a worker: {e}"));
                                }
                            }
                            stats.workers.store(workers.len() as u64, Ordering::Relaxed);
                        }
                        if attempt == 49 {
                            stats.skipped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                    Err(TrySendError::Disconnected(_)) => return,
                }
            }
        }
        drop(tx);
        for w in workers {
            if w.join().is_err() {
                panic!(
                    "a {} worker via {} panicked",
                    self.kind.name, self.proxy_name
                );
            }
        }
    }
}

/// One worker: its own `Traffic` (so its own runtime and connection) and
/// its own counters; each call is bounded by the connect and I/O timeouts.
fn worker(
    kind: &'static Kind,
    proxy_name: &'static str,
    proxy: SocketAddr,
    clock: Clock,
    rx: &Mutex<std::sync::mpsc::Receiver<u64>>,
    counters: &Mutex<Counters>,
) {
    let mut traffic = match (kind.make)() {
        Ok(t) => t,
        Err(e) => {
            lock(counters).fatal = Some(e);
            return;
        }
    };
    loop {
        let next = lock(rx).recv_timeout(Duration::from_millis(200));
        let seq = match next {
            Ok(seq) => seq,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let key = format!("{}-{proxy_name}-{}", kind.name, seq % KEYS);
        let started = clock.now();
        let result = traffic.call(proxy, &key, seq);
        let took = clock.now() - started;
        let bucket = (started / BUCKET) as usize;
        let mut c = lock(counters);
        if c.buckets.len() <= bucket {
            c.buckets.resize(bucket + 1, (0, 0));
        }
        c.latencies_ms.push((took * 1000.0) as f32);
        match result {
            Ok(served) => {
                c.ok += 1;
                c.buckets[bucket].0 += 1;
                *c.served.entry(served).or_default() += 1;
            }
            Err(error) => {
                c.failed += 1;
                c.buckets[bucket].1 += 1;
                c.failures.push(Failure {
                    t: started,
                    took,
                    kind: kind.name,
                    proxy: proxy_name,
                    key,
                    error,
                });
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// Shared state of the run

#[derive(Debug, Clone)]
struct Event {
    t: f64,
    label: String,
    /// Disruptive actions and their undos open a failover window.
    opens_window: bool,
}

/// An acknowledged registration (the API answered 200).
#[derive(Debug, Clone)]
struct Registration {
    id: String,
    service: String,
    owner: String,
    acked: f64,
    /// A DELETE was sent (from then on its presence is not required).
    deregistering: Option<f64>,
    /// The DELETE answered 200 (from then on it must disappear).
    deregistered: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    t: f64,
    /// (rss KiB, open fds) of n1 and n2; 0 when unreadable.
    n1: (u64, u64),
    n2: (u64, u64),
}

#[derive(Debug, Default)]
struct Shared {
    events: Mutex<Vec<Event>>,
    registrations: Mutex<Vec<Registration>>,
    /// Invariant violations seen while running, with their time.
    violations: Mutex<Vec<String>>,
    samples: Mutex<Vec<Sample>>,
}

impl Shared {
    /// Records an event at `t`: for an action, the moment before its first
    /// call (a kill, a partition POST), so the window covers all its effects.
    fn event_at(&self, t: f64, label: impl Into<String>, opens_window: bool) -> f64 {
        let label = label.into();
        eprintln!("[{t:7.1}s] chaos: {label}");
        lock(&self.events).push(Event {
            t,
            label,
            opens_window,
        });
        t
    }

    fn violation(&self, clock: &Clock, what: String) {
        let t = clock.now();
        eprintln!("[{t:7.1}s] VIOLATION: {what}");
        lock(&self.violations).push(format!("t={t:.1}s {what}"));
    }
}

// ---------------------------------------------------------------------------
// The mesh

struct Mesh {
    /// n1, n2: shared with the sampler, never killed.
    core: Vec<Arc<Agent>>,
    /// n3, n4, n5: `None` while killed.
    churn: Vec<Option<Agent>>,
    /// web-1, web-3, web-4 (`None` while killed) and their fixed addresses.
    web: Vec<Option<DemoService>>,
    web_addrs: Vec<SocketAddr>,
    /// Logs of agents that were killed (scanned at the end).
    old_logs: Vec<PathBuf>,
    /// grpcio servers of `echo`; empty when grpcio cannot be had (then
    /// `grpc_skipped` says why and no gRPC traffic runs).
    grpc: Vec<support::GrpcServer>,
    grpc_skipped: Option<String>,
    /// Last: its temp dir (logs, data dirs) goes after every process.
    pki: Pki,
}

fn fault_injection() -> Vec<String> {
    vec!["--enable-fault-injection".to_owned()]
}

impl Mesh {
    fn start() -> Result<Self> {
        let pki = Pki::new()?;
        let n1 = Agent::start(
            &pki,
            "n1",
            AgentOptions {
                extra: fault_injection(),
                ..Default::default()
            },
        )?;
        let opts = AgentOptions {
            seeds: vec![n1.seed()],
            extra: fault_injection(),
            ..Default::default()
        };
        let n2 = Agent::start(&pki, "n2", opts.clone())?;
        let mut churn = Vec::new();
        for name in KILLABLE {
            churn.push(Some(Agent::start(&pki, name, opts.clone())?));
        }
        let mut mesh = Self {
            core: vec![Arc::new(n1), Arc::new(n2)],
            churn,
            web: Vec::new(),
            web_addrs: Vec::new(),
            old_logs: Vec::new(),
            grpc: Vec::new(),
            grpc_skipped: None,
            pki,
        };
        let alive: Vec<(&str, &str)> = NODES.iter().map(|n| (*n, "alive")).collect();
        let took = wait_states(&mesh.live(), &alive, Duration::from_secs(30))?;
        eprintln!("setup: 5 agents alive everywhere after {took:?}");
        for (id, node) in WEB {
            let svc = DemoService::start(id, None)?;
            let (status, body) = mesh
                .agent(node)
                .context("host")?
                .register(id, &web_body(svc.addr.port()))?;
            ensure!(status == 200, "registering {id} on {node}: {status} {body}");
            mesh.web_addrs.push(svc.addr);
            mesh.web.push(Some(svc));
        }
        for (id, _) in WEB {
            wait_health(
                &mesh.live(),
                "web",
                id,
                Some("passing"),
                Duration::from_secs(15),
            )?;
        }
        eprintln!("setup: web-1, web-3, web-4 passing on all 5 agents");
        match support::grpc_python() {
            Ok(python) => {
                for (id, node) in GRPC {
                    let server = support::GrpcServer::start(&python)?;
                    let body = json!({
                        "name": "echo",
                        "port": server.port,
                        "protocol": "grpc",
                        "check": {"tcp": true, "interval": "1s", "rise": 1, "fall": 2},
                    })
                    .to_string();
                    let (status, text) = mesh.agent(node).context("host")?.register(id, &body)?;
                    ensure!(status == 200, "registering {id} on {node}: {status} {text}");
                    mesh.grpc.push(server);
                }
                for (id, _) in GRPC {
                    wait_health(
                        &mesh.live(),
                        "echo",
                        id,
                        Some("passing"),
                        Duration::from_secs(15),
                    )?;
                }
                eprintln!("setup: grpcio echo-1, echo-4 passing on all 5 agents");
            }
            Err(why) => {
                eprintln!("SKIPPED gRPC traffic: {why}");
                mesh.grpc_skipped = Some(why);
            }
        }
        Ok(mesh)
    }

    fn live(&self) -> Vec<&Agent> {
        self.core
            .iter()
            .map(|a| &**a)
            .chain(self.churn.iter().flatten())
            .collect()
    }

    fn agent(&self, name: &str) -> Option<&Agent> {
        self.live().into_iter().find(|a| a.name == name)
    }

    fn churn_slot(name: &str) -> usize {
        KILLABLE.iter().position(|n| *n == name).expect("killable")
    }
}

/// The registration of a `web` instance: an http check on the demo
/// service's health path, every second, critical after 2 failures,
/// passing again after 1 pass.
fn web_body(port: u16) -> String {
    json!({
        "name": "web",
        "port": port,
        "check": {"http": "/health", "interval": "1s", "timeout": "1s", "rise": 1, "fall": 2},
    })
    .to_string()
}

/// Whether every agent holds the same `node -> version` map with an entry
/// for each of `expect`, and (if given) sees that `web` instance passing.
fn agreement(agents: &[&Agent], expect: &[&str], passing: Option<&str>) -> Result<(), String> {
    let mut first: Option<(&str, Vec<(String, u64)>)> = None;
    for a in agents {
        let v = a
            .node_versions()
            .ok_or_else(|| format!("{}: no catalog", a.name))?;
        if let Some(n) = expect.iter().find(|n| !v.iter().any(|(x, _)| x == *n)) {
            return Err(format!("{} holds no entry for {n}", a.name));
        }
        match &first {
            None => first = Some((&a.name, v)),
            Some((n0, v0)) if *v0 != v => {
                return Err(format!("{} holds {v:?}, {n0} {v0:?}", a.name));
            }
            Some(_) => {}
        }
        if let Some(id) = passing {
            let h = a.instance_health("web", id);
            if h.as_deref() != Some("passing") {
                return Err(format!("{} sees {id} {h:?}", a.name));
            }
        }
    }
    Ok(())
}

/// Polls `check` every 100 ms (for at most `CONVERGE_GIVE_UP`): the time
/// from `since` (when the disturbance ended) until it held, or the last
/// thing it saw.
fn poll_since(
    clock: &Clock,
    since: f64,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    let start = Instant::now();
    loop {
        let seen = check();
        match seen {
            Ok(()) => return Ok(clock.now() - since),
            Err(e) if start.elapsed() >= CONVERGE_GIVE_UP => {
                return Err(format!("not within {CONVERGE_GIVE_UP:?}: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Catalog convergence: [`agreement`] among `agents`, timed from `since`.
fn converge(
    agents: &[&Agent],
    passing: Option<&str>,
    clock: &Clock,
    since: f64,
) -> Result<f64, String> {
    poll_since(clock, since, || agreement(agents, &NODES, passing))
}

/// Membership convergence (reported, not an invariant): every agent lists
/// all five as alive, timed from `since`.
fn members_converge(agents: &[&Agent], clock: &Clock, since: f64) -> Result<f64, String> {
    let alive: Vec<(&str, &str)> = NODES.iter().map(|n| (*n, "alive")).collect();
    poll_since(clock, since, || {
        wait_states(agents, &alive, Duration::ZERO)
            .map(drop)
            .map_err(|e| format!("{e:#}"))
    })
}

/// Registrations that should be listed (acknowledged, no DELETE sent) but
/// are missing from an agent's catalog, and deregistered ones still listed.
fn registration_problems(
    agents: &[&Agent],
    regs: &[Registration],
    listed_since: f64,
    check_removed: bool,
) -> Vec<String> {
    let mut problems = Vec::new();
    for a in agents {
        let catalog = match a.catalog() {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("{}: catalog unreadable: {e}", a.name));
                continue;
            }
        };
        let listed = |r: &Registration| {
            catalog["services"][&r.service]
                .as_array()
                .is_some_and(|l| l.iter().any(|i| i["id"] == r.id && i["node"] == r.owner))
        };
        for r in regs {
            if r.deregistering.is_none() && r.acked <= listed_since && !listed(r) {
                problems.push(format!(
                    "{} lost {}/{} of {} (acknowledged at {:.1}s)",
                    a.name, r.service, r.id, r.owner, r.acked
                ));
            }
            if check_removed && r.deregistered.is_some() && listed(r) {
                problems.push(format!(
                    "{} still lists {}/{} of {}, deregistered at {:.1}s",
                    a.name,
                    r.service,
                    r.id,
                    r.owner,
                    r.deregistered.unwrap_or_default()
                ));
            }
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Sampler: RSS and fds of n1 and n2, the continuous registration check,
// liveness of n1 and n2, progress lines.

struct Sampler {
    core: Vec<Arc<Agent>>,
    clock: Clock,
    end: f64,
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    counters: Vec<(&'static str, Arc<Mutex<Counters>>)>,
}

impl Sampler {
    fn run(self) {
        let mut k = 0u64;
        loop {
            let t = k as f64 * BUCKET;
            if t > self.end || self.stop.load(Ordering::Relaxed) {
                break;
            }
            // Sleep in short steps so `stop` is honoured.
            while self.clock.now() < t && !self.stop.load(Ordering::Relaxed) {
                self.clock.sleep_until(t.min(self.clock.now() + 0.5));
            }
            let measure = |a: &Agent| {
                (
                    a.rss_kib().unwrap_or(0),
                    open_fds(a.pid()).unwrap_or(0) as u64,
                )
            };
            let sample = Sample {
                t: self.clock.now(),
                n1: measure(&self.core[0]),
                n2: measure(&self.core[1]),
            };
            lock(&self.shared.samples).push(sample);
            for a in &self.core {
                if !a.running() {
                    self.shared
                        .violation(&self.clock, format!("{} is not running", a.name));
                }
            }
            let regs = lock(&self.shared.registrations).clone();
            let refs: Vec<&Agent> = self.core.iter().map(|a| &**a).collect();
            let since = self.clock.now() - VISIBLE_AFTER;
            for p in registration_problems(&refs, &regs, since, false) {
                self.shared.violation(&self.clock, p);
            }
            if k.is_multiple_of(6) && k > 0 {
                self.progress(&sample);
            }
            k += 1;
        }
    }

    fn progress(&self, s: &Sample) {
        let mut line = format!("[{:7.1}s]", s.t);
        let mut totals: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (kind, c) in &self.counters {
            let c = lock(c);
            let e = totals.entry(kind).or_default();
            e.0 += c.ok;
            e.1 += c.failed;
        }
        for (kind, (ok, failed)) in totals {
            let _ = write!(line, " {kind} {ok} ok/{failed} failed,");
        }
        let _ = write!(
            line,
            " n1 {} KiB {} fds, n2 {} KiB {} fds",
            s.n1.0, s.n1.1, s.n2.0, s.n2.1
        );
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------
// Chaos

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionKind {
    KillAgent,
    Partition,
    Register,
    KillUpstream,
}

impl ActionKind {
    const ALL: [Self; 4] = [
        Self::KillAgent,
        Self::Partition,
        Self::Register,
        Self::KillUpstream,
    ];
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    at: f64,
    kind: ActionKind,
    /// Seeded choice of the target among the candidates at that time.
    pick: u64,
}

/// The schedule: every ~15 s (seeded jitter) from `CHAOS_LEAD` to
/// `secs - CHAOS_TAIL`, cycling through the four kinds in the order of
/// `ActionKind::ALL`, each with a seeded target. An agent kill comes first
/// (of an agent hosting instances), so even a short run's warm-up has the
/// heaviest disturbance in it.
fn plan(secs: f64, seed: u64) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let last = secs - CHAOS_TAIL;
    let mut t = CHAOS_LEAD;
    let mut out = Vec::new();
    while t <= last {
        out.push(Planned {
            at: t,
            kind: ActionKind::ALL[out.len() % ActionKind::ALL.len()],
            pick: rng.next_u64(),
        });
        t += ACTION_GAP + rng.between(-ACTION_JITTER, ACTION_JITTER);
    }
    out
}

/// What happened to one planned action.
#[derive(Debug, Clone)]
struct ActionRecord {
    n: usize,
    planned: f64,
    t: f64,
    what: String,
    /// When it was undone (restart, heal), if it has an undo.
    undone: Option<f64>,
    /// Time for the catalogs to agree after it ended.
    converged: Result<f64, String>,
    /// Time until every agent listed all five alive (kills and partitions).
    members: Option<Result<f64, String>>,
    /// Lost / resurrected registrations seen after it ended.
    problems: Vec<String>,
}

/// A convergence measurement after any disturbance (actions, and
/// deregistrations made outside them).
#[derive(Debug, Clone)]
struct Convergence {
    after: String,
    t: f64,
    took: Result<f64, String>,
}

struct Chaos<'a> {
    mesh: &'a mut Mesh,
    clock: Clock,
    shared: Arc<Shared>,
    /// (due time, registration id) of extras to deregister.
    due: Vec<(f64, String)>,
    extras: u32,
    gap: f64,
    records: Vec<ActionRecord>,
    convergence: Vec<Convergence>,
    /// The name of the partitioned agent while a partition holds.
    cut: Option<String>,
}

impl Chaos<'_> {
    /// Waits until `t`, deregistering due extras meanwhile (also while an
    /// agent is down or partitioned: that is the point).
    fn wait_until(&mut self, t: f64) {
        while self.clock.now() < t {
            self.deregister_due();
            self.clock.sleep_until(t.min(self.clock.now() + 0.1));
        }
    }

    fn deregister_due(&mut self) {
        let now = self.clock.now();
        let ready: Vec<String> = self
            .due
            .iter()
            .filter(|(at, _)| *at <= now)
            .map(|(_, id)| id.clone())
            .collect();
        for id in ready {
            let owner = lock(&self.shared.registrations)
                .iter()
                .find(|r| r.id == id)
                .map(|r| r.owner.clone());
            let Some(owner) = owner else { continue };
            // The owner is down: try again when it is back.
            let Some(agent) = self.mesh.agent(&owner) else {
                continue;
            };
            self.due.retain(|(_, d)| *d != id);
            let sent = self.clock.now();
            set_reg(&self.shared, &id, |r| r.deregistering = Some(sent));
            match agent.deregister(&id) {
                Ok((200, _)) => {
                    let t = self.shared.event_at(
                        self.clock.now(),
                        format!("deregister {id} on {owner}"),
                        false,
                    );
                    set_reg(&self.shared, &id, |r| r.deregistered = Some(t));
                    // Measured here unless a partition holds (its heal is).
                    if self.cut.is_none() {
                        let took = converge(&self.mesh.live(), None, &self.clock, t);
                        self.note_convergence(format!("deregister {id}"), t, took);
                    }
                }
                other => {
                    // Not removed: it must stay listed; try again later.
                    eprintln!("deregister {id} on {owner}: {other:?}");
                    set_reg(&self.shared, &id, |r| r.deregistering = None);
                    self.due.push((self.clock.now() + self.gap, id));
                }
            }
        }
    }

    fn note_convergence(&mut self, after: String, t: f64, took: Result<f64, String>) {
        match &took {
            Ok(s) if *s <= CONVERGE_LIMIT => {
                eprintln!(
                    "[{:7.1}s] catalogs agree {s:.2}s after {after}",
                    self.clock.now()
                )
            }
            Ok(s) => self.shared.violation(
                &self.clock,
                format!("catalogs agreed only {s:.2}s after {after}"),
            ),
            Err(e) => self
                .shared
                .violation(&self.clock, format!("catalogs disagree after {after}: {e}")),
        }
        self.convergence.push(Convergence { after, t, took });
    }

    /// After a disturbance that ended at `t`: catalog convergence (with
    /// `passing` seen passing everywhere, if given), membership convergence
    /// (if `members`), and the registration check on every live agent.
    fn settle(
        &mut self,
        r: &mut ActionRecord,
        after: &str,
        t: f64,
        passing: Option<&str>,
        members: bool,
    ) {
        let took = converge(&self.mesh.live(), passing, &self.clock, t);
        self.note_convergence(after.to_owned(), t, took.clone());
        r.converged = took;
        if members {
            let m = members_converge(&self.mesh.live(), &self.clock, t);
            match &m {
                Ok(s) => eprintln!(
                    "[{:7.1}s] all 5 alive everywhere {s:.2}s after {after}",
                    self.clock.now()
                ),
                Err(e) => eprintln!("[{:7.1}s] members after {after}: {e}", self.clock.now()),
            }
            r.members = Some(m);
        }
        let regs = lock(&self.shared.registrations).clone();
        let problems = registration_problems(&self.mesh.live(), &regs, f64::INFINITY, true);
        for p in &problems {
            self.shared
                .violation(&self.clock, format!("after {after}: {p}"));
        }
        r.problems = problems;
    }

    fn check_running(&mut self) {
        for (slot, name) in KILLABLE.iter().enumerate() {
            let dead = self.mesh.churn[slot].as_ref().is_some_and(|a| !a.running());
            if dead {
                self.shared
                    .violation(&self.clock, format!("{name} exited without being killed"));
                if let Some(mut a) = self.mesh.churn[slot].take() {
                    a.kill();
                    self.mesh.old_logs.push(a.log_path().to_owned());
                }
                self.restart_agent(name);
            }
        }
    }

    fn restart_agent(&mut self, name: &str) -> Option<f64> {
        let slot = Mesh::churn_slot(name);
        let seeds: Vec<String> = self.mesh.live().iter().map(|a| a.seed()).collect();
        let opts = AgentOptions {
            seeds,
            data_dir: Some(self.mesh.pki.data_dir(name)),
            extra: fault_injection(),
            ..Default::default()
        };
        let t = self.clock.now();
        match Agent::start(&self.mesh.pki, name, opts) {
            Ok(a) => {
                self.mesh.churn[slot] = Some(a);
                Some(self.shared.event_at(t, format!("restart {name}"), true))
            }
            Err(e) => {
                self.shared
                    .violation(&self.clock, format!("{name} did not restart: {e:#}"));
                None
            }
        }
    }

    fn run(&mut self, plan: &[Planned], last_start: f64) {
        for (n, p) in plan.iter().enumerate() {
            self.wait_until(p.at);
            if self.clock.now() > last_start {
                eprintln!("chaos: action {n} ({:?}) skipped: running late", p.kind);
                continue;
            }
            self.check_running();
            let record = match p.kind {
                ActionKind::KillAgent => self.kill_agent(n, p),
                ActionKind::Partition => self.partition(n, p),
                ActionKind::Register => self.register(n, p),
                ActionKind::KillUpstream => self.kill_upstream(n, p),
            };
            self.records.push(record);
        }
    }

    fn record(&self, n: usize, p: &Planned, t: f64, what: String) -> ActionRecord {
        ActionRecord {
            n,
            planned: p.at,
            t,
            what,
            undone: None,
            converged: Err("not measured".into()),
            members: None,
            problems: Vec::new(),
        }
    }

    fn kill_agent(&mut self, n: usize, p: &Planned) -> ActionRecord {
        // The first kill takes an agent that hosts instances: requests in
        // flight to it are the heaviest disturbance (each proxy holds them
        // until the restart closes the old connections, and the allocator
        // keeps that high-water mark, about 2 MB), and it must fall in the
        // warm-up so that the growth check measures creep, not that step.
        let hosts = |name: &&str| WEB.iter().any(|(_, node)| node == name);
        let candidates: Vec<&str> = KILLABLE
            .iter()
            .copied()
            .filter(|name| self.mesh.agent(name).is_some())
            .filter(|name| n > 0 || hosts(name))
            .collect();
        if candidates.is_empty() {
            return self.record(n, p, self.clock.now(), "kill: no candidate".into());
        }
        let name = candidates[p.pick as usize % candidates.len()];
        let slot = Mesh::churn_slot(name);
        let mut agent = self.mesh.churn[slot].take().expect("live");
        let t = self.clock.now();
        agent.kill();
        self.shared.event_at(t, format!("kill -9 {name}"), true);
        self.mesh.old_logs.push(agent.log_path().to_owned());
        drop(agent);
        let mut r = self.record(
            n,
            p,
            t,
            format!("kill -9 {name}, restart after {AGENT_DOWN:.0}s"),
        );
        self.wait_until(t + AGENT_DOWN);
        r.undone = self.restart_agent(name);
        if let Some(u) = r.undone {
            self.settle(&mut r, &format!("restart {name}"), u, None, true);
        }
        r
    }

    fn partition(&mut self, n: usize, p: &Planned) -> ActionRecord {
        let live: Vec<String> = self.mesh.live().iter().map(|a| a.name.clone()).collect();
        let name = live[p.pick as usize % live.len()].clone();
        let others: Vec<&str> = live
            .iter()
            .map(String::as_str)
            .filter(|o| *o != name)
            .collect();
        let mut errors = Vec::new();
        let t = self.clock.now();
        for a in self.mesh.live() {
            let peers: Vec<&str> = if a.name == name {
                others.clone()
            } else {
                vec![name.as_str()]
            };
            match a.partition(Some(peers.as_slice())) {
                Ok(200) => {}
                other => errors.push(format!("POST partition on {}: {other:?}", a.name)),
            }
        }
        self.cut = Some(name.clone());
        self.shared
            .event_at(t, format!("partition {name} from the others"), true);
        let mut r = self.record(
            n,
            p,
            t,
            format!("partition {name} for {PARTITION_HOLD:.0}s"),
        );
        self.wait_until(t + PARTITION_HOLD);
        let u = self.clock.now();
        for a in self.mesh.live() {
            match a.partition(None) {
                Ok(200) => {}
                other => errors.push(format!("DELETE partition on {}: {other:?}", a.name)),
            }
        }
        self.cut = None;
        self.shared.event_at(u, format!("heal {name}"), true);
        r.undone = Some(u);
        for e in errors {
            self.shared
                .violation(&self.clock, format!("fault injection: {e}"));
        }
        self.settle(&mut r, &format!("heal {name}"), u, None, true);
        r
    }

    fn register(&mut self, n: usize, p: &Planned) -> ActionRecord {
        self.extras += 1;
        let id = format!("extra-{}", self.extras);
        let live: Vec<String> = self.mesh.live().iter().map(|a| a.name.clone()).collect();
        let owner = live[p.pick as usize % live.len()].clone();
        let body =
            json!({"name": "extra", "port": 20_000 + self.extras, "tags": ["soak"]}).to_string();
        let answer = self.mesh.agent(&owner).expect("live").register(&id, &body);
        let t = self.clock.now();
        match answer {
            Ok((200, _)) => {
                lock(&self.shared.registrations).push(Registration {
                    id: id.clone(),
                    service: "extra".into(),
                    owner: owner.clone(),
                    acked: t,
                    deregistering: None,
                    deregistered: None,
                });
                self.shared
                    .event_at(t, format!("register {id} on {owner}"), false);
                self.due
                    .push((t + EXTRA_LIFETIME_GAPS * self.gap, id.clone()));
                let mut r = self.record(n, p, t, format!("register {id} on {owner}"));
                self.settle(&mut r, &format!("register {id}"), t, None, false);
                r
            }
            other => {
                // Not acknowledged, so not tracked; the harness reports it.
                self.shared.violation(
                    &self.clock,
                    format!("registering {id} on {owner} was refused: {other:?}"),
                );
                self.record(n, p, t, format!("register {id} on {owner}: refused"))
            }
        }
    }

    fn kill_upstream(&mut self, n: usize, p: &Planned) -> ActionRecord {
        let i = p.pick as usize % WEB.len();
        let (id, node) = WEB[i];
        let t = self.clock.now();
        if let Some(mut svc) = self.mesh.web[i].take() {
            svc.stop();
        }
        self.shared
            .event_at(t, format!("kill -9 upstream {id} (on {node})"), true);
        let mut r = self.record(
            n,
            p,
            t,
            format!("kill -9 {id}, restart after {UPSTREAM_DOWN:.0}s"),
        );
        self.wait_until(t + UPSTREAM_DOWN);
        let u = self.clock.now();
        match DemoService::start(id, Some(self.mesh.web_addrs[i])) {
            Ok(svc) => {
                self.mesh.web[i] = Some(svc);
                self.shared
                    .event_at(u, format!("restart upstream {id}"), true);
                r.undone = Some(u);
                self.settle(
                    &mut r,
                    &format!("restart upstream {id}"),
                    u,
                    Some(id),
                    false,
                );
            }
            Err(e) => self
                .shared
                .violation(&self.clock, format!("{id} did not restart: {e:#}")),
        }
        r
    }
}

fn set_reg(shared: &Shared, id: &str, f: impl FnOnce(&mut Registration)) {
    if let Some(r) = lock(&shared.registrations).iter_mut().find(|r| r.id == id) {
        f(r);
    }
}

// ---------------------------------------------------------------------------
// Logs

#[derive(Debug, Default)]
struct LogScan {
    files: usize,
    lines: u64,
    bytes: u64,
    /// Lines that fail the run: (file, line).
    findings: Vec<(String, String)>,
    /// Hits per allow-list entry.
    allowed: Vec<u64>,
}

fn scan_logs(paths: &[PathBuf]) -> LogScan {
    let mut scan = LogScan {
        allowed: vec![0; LOG_ALLOW.len()],
        ..Default::default()
    };
    for path in paths {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                scan.findings.push((name, format!("log unreadable: {e}")));
                continue;
            }
        };
        scan.files += 1;
        let mut reader = BufReader::new(file);
        let mut buf = Vec::new();
        // Bounded by the file's length.
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    scan.lines += 1;
                    scan.bytes += n as u64;
                }
                Err(e) => {
                    scan.findings
                        .push((name.clone(), format!("read error: {e}")));
                    break;
                }
            }
            let line = String::from_utf8_lossy(&buf);
            let panicked = line.contains("panicked");
            let error = line.contains("ERROR")
                && serde_json::from_str::<Value>(line.trim())
                    .is_ok_and(|v| v["level"].as_str() == Some("ERROR"));
            if !(panicked || error) {
                continue;
            }
            match LOG_ALLOW
                .iter()
                .position(|(needle, _)| line.contains(needle))
            {
                Some(i) => scan.allowed[i] += 1,
                None => scan
                    .findings
                    .push((name.clone(), line.trim().chars().take(600).collect())),
            }
        }
    }
    scan
}

// ---------------------------------------------------------------------------
// Report

#[derive(Debug, Clone, Default)]
struct KindReport {
    kind: &'static str,
    /// Ticks not sent: every worker of the stream was busy.
    skipped: u64,
    /// Most workers one stream of this kind needed.
    workers: u64,
    total: u64,
    ok: u64,
    failed: u64,
    in_window: u64,
    outside: u64,
    p50: f64,
    p99: f64,
    max: f64,
    served: BTreeMap<String, u64>,
}

impl KindReport {
    fn ratio(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.outside as f64 / self.total as f64
        }
    }
}

fn percentile(sorted: &[f32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64
}

/// Whether a request that ran over [t, t + took] overlaps a failover window.
fn in_window(windows: &[f64], t: f64, took: f64) -> bool {
    windows
        .iter()
        .any(|&w| t < w + FAILOVER_WINDOW && t + took >= w)
}

fn median(mut v: Vec<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m] as f64
    } else {
        (v[m - 1] + v[m]) as f64 / 2.0
    })
}

/// Warm-up level (median of the samples in the second half of the warm-up,
/// [0.1 T, 0.2 T]) and end level (median of the last 10 %, [0.9 T, T]).
struct Growth {
    what: String,
    warm: f64,
    end: f64,
}

impl Growth {
    fn ratio(&self) -> f64 {
        if self.warm > 0.0 {
            self.end / self.warm - 1.0
        } else {
            f64::INFINITY
        }
    }
}

fn growth(samples: &[Sample], secs: f64) -> Vec<Growth> {
    let level = |from: f64, to: f64, f: fn(&Sample) -> u64| {
        median(
            samples
                .iter()
                .filter(|s| s.t >= from && s.t <= to)
                .map(f)
                .collect(),
        )
        .unwrap_or(0.0)
    };
    type Series = (&'static str, fn(&Sample) -> u64);
    let series: [Series; 4] = [
        ("n1 rss KiB", |s| s.n1.0),
        ("n1 open fds", |s| s.n1.1),
        ("n2 rss KiB", |s| s.n2.0),
        ("n2 open fds", |s| s.n2.1),
    ];
    series
        .iter()
        .map(|(what, f)| Growth {
            what: (*what).to_owned(),
            warm: level(secs * WARM_UP / 2.0, secs * WARM_UP, *f),
            end: level(secs * 0.9, secs + BUCKET, *f),
        })
        .collect()
}

struct Invariant {
    name: &'static str,
    pass: bool,
    detail: String,
}

#[test]
#[ignore = "soak: runs GOSSAMER_SOAK_SECS (default 1800 s); see the file header"]
fn soak_under_chaos() -> Result<()> {
    let cfg = Config::from_env()?;
    let schedule = plan(cfg.secs, cfg.seed);
    eprintln!(
        "soak: {:.0} s, seed {}, {} chaos actions planned, output {:?}",
        cfg.secs,
        cfg.seed,
        schedule.len(),
        cfg.out
    );
    for p in &schedule {
        eprintln!("  planned {:7.1}s {:?}", p.at, p.kind);
    }
    let setup = Instant::now();
    let mut mesh = Mesh::start()?;
    let setup_took = setup.elapsed();

    let clock = Clock(Instant::now());
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let shared = Arc::new(Shared::default());
    for (id, node) in WEB {
        lock(&shared.registrations).push(Registration {
            id: id.into(),
            service: "web".into(),
            owner: node.into(),
            acked: 0.0,
            deregistering: None,
            deregistered: None,
        });
    }
    let stop = Arc::new(AtomicBool::new(false));

    // Traffic: one stream per (kind, proxy), half the kind's rate each.
    let mut counters: AllCounters = Vec::new();
    let mut streams: Vec<(&'static str, Arc<StreamStats>)> = Vec::new();
    let mut threads = Vec::new();
    for kind in KINDS {
        if kind.name == "grpc" && mesh.grpc_skipped.is_some() {
            continue;
        }
        for (proxy_name, agent) in [("n1", &mesh.core[0]), ("n2", &mesh.core[1])] {
            let stream = Stream {
                kind,
                proxy_name,
                proxy: agent.proxy,
                rate: RATE_PER_KIND / 2.0,
                clock,
                end: cfg.secs,
                stop: stop.clone(),
            };
            let (t, stats) = stream.start(&mut counters)?;
            threads.push(t);
            streams.push((kind.name, stats));
        }
    }
    let sampler = Sampler {
        core: mesh.core.clone(),
        clock,
        end: cfg.secs,
        stop: stop.clone(),
        shared: shared.clone(),
        counters: counters.iter().map(|(k, _, c)| (*k, c.clone())).collect(),
    };
    threads.push(
        std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || sampler.run())?,
    );

    // Chaos on this thread; a panic here still stops the other threads.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop_guard = StopOnDrop(stop.clone());
    let mut chaos = Chaos {
        mesh: &mut mesh,
        clock,
        shared: shared.clone(),
        due: Vec::new(),
        extras: 0,
        gap: ACTION_GAP,
        records: Vec::new(),
        convergence: Vec::new(),
        cut: None,
    };
    chaos.run(&schedule, cfg.secs - CHAOS_TAIL + 5.0);
    // Quiet tail: keep deregistering due extras until traffic ends.
    chaos.wait_until(cfg.secs - 15.0);
    chaos.check_running();
    let Chaos {
        records,
        mut convergence,
        ..
    } = chaos;
    clock.sleep_until(cfg.secs);
    drop(stop_guard);
    let mut thread_errors = Vec::new();
    for t in threads {
        let name = t.thread().name().unwrap_or("?").to_owned();
        if t.join().is_err() {
            thread_errors.push(format!("thread {name} panicked"));
        }
    }
    let ended = clock.now();

    // Final checks on the quiet mesh.
    let live = mesh.live();
    let final_took = converge(&live, None, &clock, clock.now());
    convergence.push(Convergence {
        after: "end of run".into(),
        t: ended,
        took: final_took.clone(),
    });
    let regs = lock(&shared.registrations).clone();
    let final_problems = registration_problems(&live, &regs, f64::INFINITY, true);
    let web_final: Vec<String> = WEB
        .iter()
        .flat_map(|(id, _)| {
            live.iter().filter_map(move |a| {
                let h = a.instance_health("web", id);
                (h.as_deref() != Some("passing")).then(|| format!("{} sees {id} {h:?}", a.name))
            })
        })
        .collect();
    let mut log_paths = mesh.old_logs.clone();
    log_paths.extend(live.iter().map(|a| a.log_path().to_owned()));
    let logs = scan_logs(&log_paths);

    // ---- Figures
    let events = lock(&shared.events).clone();
    let windows: Vec<f64> = events
        .iter()
        .filter(|e| e.opens_window)
        .map(|e| e.t)
        .collect();
    let mut kinds: Vec<KindReport> = Vec::new();
    let mut failures: Vec<Failure> = Vec::new();
    let mut fatal = Vec::new();
    for kind in KINDS {
        let mut r = KindReport {
            kind: kind.name,
            ..Default::default()
        };
        let mut lat = Vec::new();
        for (k, proxy, c) in &counters {
            if *k != kind.name {
                continue;
            }
            let c = lock(c);
            r.ok += c.ok;
            r.failed += c.failed;
            for (inst, n) in &c.served {
                *r.served.entry(inst.clone()).or_default() += n;
            }
            lat.extend_from_slice(&c.latencies_ms);
            for f in &c.failures {
                if in_window(&windows, f.t, f.took) {
                    r.in_window += 1;
                } else {
                    r.outside += 1;
                }
                failures.push(f.clone());
            }
            if let Some(e) = &c.fatal {
                fatal.push(format!("{} via {proxy}: {e}", kind.name));
            }
        }
        r.total = r.ok + r.failed;
        for (k, st) in &streams {
            if *k == kind.name {
                r.skipped += st.skipped.load(Ordering::Relaxed);
                r.workers = r.workers.max(st.workers.load(Ordering::Relaxed));
            }
        }
        lat.sort_by(f32::total_cmp);
        r.p50 = percentile(&lat, 0.5);
        r.p99 = percentile(&lat, 0.99);
        r.max = lat.last().copied().unwrap_or(0.0) as f64;
        kinds.push(r);
    }
    failures.sort_by(|a, b| a.t.total_cmp(&b.t));
    let samples = lock(&shared.samples).clone();
    let growths = growth(&samples, cfg.secs);
    let running_violations = lock(&shared.violations).clone();

    // ---- Invariants
    let mut inv = Vec::new();
    let outside_detail = kinds
        .iter()
        .map(|k| {
            format!(
                "{} {}/{} = {:.4} %",
                k.kind,
                k.outside,
                k.total,
                k.ratio() * 100.0
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    inv.push(Invariant {
        name: "failures outside failover windows <= 0.1 % (per kind)",
        pass: kinds
            .iter()
            .all(|k| k.total > 0 && k.ratio() <= MAX_OUTSIDE_RATIO)
            && fatal.is_empty(),
        detail: if fatal.is_empty() {
            outside_detail
        } else {
            format!("{outside_detail}; drivers that could not run: {fatal:?}")
        },
    });
    let mut lost: Vec<String> = running_violations
        .iter()
        .filter(|v| v.contains(" lost ") || v.contains("still lists"))
        .cloned()
        .collect();
    lost.extend(final_problems.iter().map(|p| format!("at the end: {p}")));
    inv.push(Invariant {
        name: "no acknowledged registration lost (nor a deregistered one back)",
        pass: lost.is_empty(),
        detail: if lost.is_empty() {
            format!(
                "{} registrations tracked ({} deregistered), checked on n1/n2 every {BUCKET:.0}s, \
                 on all live agents after every heal/restart and at the end",
                regs.len(),
                regs.iter().filter(|r| r.deregistered.is_some()).count()
            )
        } else {
            lost.join("; ")
        },
    });
    let late: Vec<String> = convergence
        .iter()
        .filter(|c| !matches!(c.took, Ok(s) if s <= CONVERGE_LIMIT))
        .map(|c| format!("{} at {:.1}s: {:?}", c.after, c.t, c.took))
        .collect();
    let worst = convergence
        .iter()
        .filter_map(|c| c.took.as_ref().ok())
        .fold(0.0f64, |a, &b| a.max(b));
    inv.push(Invariant {
        name: "catalogs agree within 10 s of every disturbance ending",
        pass: late.is_empty(),
        detail: if late.is_empty() {
            format!("{} measurements, slowest {worst:.2}s", convergence.len())
        } else {
            late.join("; ")
        },
    });
    let grown: Vec<String> = growths
        .iter()
        .filter(|g| g.ratio() > MAX_GROWTH)
        .map(|g| {
            format!(
                "{} {:.0} -> {:.0} ({:+.1} %)",
                g.what,
                g.warm,
                g.end,
                g.ratio() * 100.0
            )
        })
        .collect();
    inv.push(Invariant {
        name: "RSS and open fds of n1, n2 grow <= 10 % after warm-up",
        pass: grown.is_empty() && samples.len() >= 4,
        detail: if grown.is_empty() {
            growths
                .iter()
                .map(|g| format!("{} {:+.1} %", g.what, g.ratio() * 100.0))
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            grown.join("; ")
        },
    });
    inv.push(Invariant {
        name: "no panic and no ERROR line in any agent log (beyond the allow-list)",
        pass: logs.findings.is_empty(),
        detail: format!(
            "{} files, {} lines, {} findings",
            logs.files,
            logs.lines,
            logs.findings.len()
        ),
    });
    let mut harness: Vec<String> = running_violations
        .iter()
        .filter(|v| !(v.contains(" lost ") || v.contains("still lists") || v.contains("catalogs ")))
        .cloned()
        .collect();
    harness.extend(thread_errors);
    harness.extend(web_final.iter().map(|w| format!("at the end: {w}")));
    inv.push(Invariant {
        name: "agents and upstreams stay up unless killed, and come back",
        pass: harness.is_empty(),
        detail: if harness.is_empty() {
            "all 5 agents running, web-1/3/4 passing on all agents at the end".into()
        } else {
            harness.join("; ")
        },
    });

    // ---- Print
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n=== soak report: {:.0} s (ran {ended:.1} s), seed {}, {} chaos actions, setup {:.1} s ===",
        cfg.secs,
        cfg.seed,
        records.len(),
        setup_took.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "\ntraffic (in-window: the request's start..end overlaps a {FAILOVER_WINDOW:.0} s failover window; \
         skipped: ticks not sent, {MAX_WORKERS} workers of the stream busy; \
         workers: peak workers of one stream)"
    );
    let _ = writeln!(
        out,
        "{:<10} {:>8} {:>8} {:>7} {:>9} {:>8} {:>9} {:>8} {:>8} {:>9} {:>7} {:>7}  served by",
        "kind",
        "total",
        "ok",
        "failed",
        "in-window",
        "outside",
        "outside%",
        "p50 ms",
        "p99 ms",
        "max ms",
        "skipped",
        "workers"
    );
    for k in &kinds {
        let _ = writeln!(
            out,
            "{:<10} {:>8} {:>8} {:>7} {:>9} {:>8} {:>9.4} {:>8.1} {:>8.1} {:>9.1} {:>7} {:>7}  {:?}",
            k.kind,
            k.total,
            k.ok,
            k.failed,
            k.in_window,
            k.outside,
            k.ratio() * 100.0,
            k.p50,
            k.p99,
            k.max,
            k.skipped,
            k.workers,
            k.served
        );
    }
    let _ = writeln!(
        out,
        "\nchaos actions (converged: catalogs agree, from the undo or the registration; \
         members: all 5 alive everywhere, from the undo; both include process start-up)"
    );
    let _ = writeln!(
        out,
        "{:>3} {:>8} {:>8} {:<40} {:>8} {:>10} {:>8}  lost",
        "#", "planned", "at", "action", "undone", "converged", "members"
    );
    let secs_or = |r: &Result<f64, String>| match r {
        Ok(s) => format!("{s:.2}s"),
        Err(_) => "NO".into(),
    };
    for r in &records {
        let _ = writeln!(
            out,
            "{:>3} {:>7.1}s {:>7.1}s {:<40} {:>8} {:>10} {:>8}  {}",
            r.n,
            r.planned,
            r.t,
            r.what,
            r.undone.map(|u| format!("{u:.1}s")).unwrap_or("-".into()),
            secs_or(&r.converged),
            r.members.as_ref().map(secs_or).unwrap_or("-".into()),
            r.problems.len()
        );
    }
    let _ = writeln!(out, "\ncatalog convergence (limit {CONVERGE_LIMIT:.0} s)");
    for c in &convergence {
        let _ = writeln!(
            out,
            "  {:>7.1}s {:<34} {}",
            c.t,
            c.after,
            match &c.took {
                Ok(s) => format!("{s:.2}s"),
                Err(e) => format!("FAILED {e}"),
            }
        );
    }
    let _ = writeln!(
        out,
        "\nresources of n1 and n2 (warm-up level: median of [{:.0}s, {:.0}s]; end level: median of [{:.0}s, end])",
        cfg.secs * WARM_UP / 2.0,
        cfg.secs * WARM_UP,
        cfg.secs * 0.9
    );
    for g in &growths {
        let _ = writeln!(
            out,
            "  {:<12} warm-up {:>9.0}  end {:>9.0}  growth {:+6.1} %",
            g.what,
            g.warm,
            g.end,
            g.ratio() * 100.0
        );
    }
    let _ = writeln!(
        out,
        "  samples (t, n1 rss KiB, n1 fds, n2 rss KiB, n2 fds):"
    );
    for chunk in samples.chunks(4) {
        let row: Vec<String> = chunk
            .iter()
            .map(|s| {
                format!(
                    "{:>6.1}s {:>7} {:>4} {:>7} {:>4}",
                    s.t, s.n1.0, s.n1.1, s.n2.0, s.n2.1
                )
            })
            .collect();
        let _ = writeln!(out, "    {}", row.join(" | "));
    }
    let _ = writeln!(out, "\nregistrations");
    for r in &regs {
        let _ = writeln!(
            out,
            "  {:<10} {:<6} on {:<3} acked {:>7.1}s  {}",
            r.id,
            r.service,
            r.owner,
            r.acked,
            match r.deregistered {
                Some(t) => format!("deregistered {t:.1}s"),
                None => "registered".into(),
            }
        );
    }
    let _ = writeln!(
        out,
        "\nlogs: {} files, {} lines, {:.1} MiB; allow-list hits {:?}",
        logs.files,
        logs.lines,
        logs.bytes as f64 / (1 << 20) as f64,
        logs.allowed
    );
    for (file, line) in logs.findings.iter().take(50) {
        let _ = writeln!(out, "  {file}: {line}");
    }
    let outside: Vec<&Failure> = failures
        .iter()
        .filter(|f| !in_window(&windows, f.t, f.took))
        .collect();
    if !outside.is_empty() {
        let _ = writeln!(
            out,
            "\nfailures outside failover windows (first 30 of {})",
            outside.len()
        );
        for f in outside.iter().take(30) {
            let _ = writeln!(
                out,
                "  {:>7.2}s +{:.2}s {:<9} via {} key {}: {}",
                f.t, f.took, f.kind, f.proxy, f.key, f.error
            );
        }
    }
    let mut errors: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for f in &failures {
        let e = errors
            .entry(format!("{:<9} {}", f.kind, digits_to_hash(&f.error, 110)))
            .or_default();
        if in_window(&windows, f.t, f.took) {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(
            out,
            "\nall failures by text (numbers as #): in-window, outside"
        );
        for (e, (inside, outside)) in &errors {
            let _ = writeln!(out, "  {inside:>6} {outside:>6}  {e}");
        }
    }
    let _ = writeln!(out, "\ninvariants");
    for i in &inv {
        let _ = writeln!(
            out,
            "  [{}] {}\n         {}",
            if i.pass { "PASS" } else { "FAIL" },
            i.name,
            i.detail
        );
    }
    println!("{out}");

    // ---- Files
    if let Some(dir) = &cfg.out {
        std::fs::create_dir_all(dir)?;
        let report = json!({
            "duration_s": cfg.secs,
            "ran_s": ended,
            "seed": cfg.seed,
            "started_unix": started_unix,
            "setup_s": setup_took.as_secs_f64(),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "limits": {
                "failover_window_s": FAILOVER_WINDOW,
                "max_outside_ratio": MAX_OUTSIDE_RATIO,
                "converge_limit_s": CONVERGE_LIMIT,
                "max_growth": MAX_GROWTH,
                "warm_up_share": WARM_UP,
            },
            "traffic": kinds.iter().map(|k| (k.kind.to_owned(), json!({
                "total": k.total, "ok": k.ok, "failed": k.failed, "skipped_ticks": k.skipped, "peak_workers_per_stream": k.workers,
                "failed_in_window": k.in_window, "failed_outside_window": k.outside,
                "outside_ratio": k.ratio(),
                "p50_ms": k.p50, "p99_ms": k.p99, "max_ms": k.max,
                "served_by": k.served,
            }))).collect::<serde_json::Map<_, _>>(),
            "actions": records.iter().map(|r| json!({
                "n": r.n, "planned_s": r.planned, "t_s": r.t, "action": r.what,
                "undone_s": r.undone,
                "converged_s": r.converged.as_ref().ok(),
                "converge_error": r.converged.as_ref().err(),
                "members_alive_s": r.members.as_ref().and_then(|m| m.as_ref().ok()),
                "members_error": r.members.as_ref().and_then(|m| m.as_ref().err()),
                "problems": r.problems,
            })).collect::<Vec<_>>(),
            "events": events.iter().map(|e| json!({
                "t_s": e.t, "label": e.label, "opens_window": e.opens_window,
            })).collect::<Vec<_>>(),
            "convergence": convergence.iter().map(|c| json!({
                "after": c.after, "t_s": c.t,
                "took_s": c.took.as_ref().ok(), "error": c.took.as_ref().err(),
            })).collect::<Vec<_>>(),
            "resources": {
                "growth": growths.iter().map(|g| json!({
                    "series": g.what, "warm_up": g.warm, "end": g.end, "growth": g.ratio(),
                })).collect::<Vec<_>>(),
                "samples": samples.iter().map(|s| json!({
                    "t_s": s.t, "n1_rss_kib": s.n1.0, "n1_fds": s.n1.1,
                    "n2_rss_kib": s.n2.0, "n2_fds": s.n2.1,
                })).collect::<Vec<_>>(),
            },
            "registrations": regs.iter().map(|r| json!({
                "id": r.id, "service": r.service, "owner": r.owner, "acked_s": r.acked,
                "deregistered_s": r.deregistered,
            })).collect::<Vec<_>>(),
            "logs": {
                "files": logs.files, "lines": logs.lines, "bytes": logs.bytes,
                "findings": logs.findings.iter().map(|(f, l)| json!({"file": f, "line": l})).collect::<Vec<_>>(),
                "allow_list": LOG_ALLOW.iter().zip(&logs.allowed).map(|((needle, why), n)| json!({
                    "match": needle, "why": why, "hits": n,
                })).collect::<Vec<_>>(),
            },
            "violations_while_running": running_violations,
            "invariants": inv.iter().map(|i| json!({
                "name": i.name, "pass": i.pass, "detail": i.detail,
            })).collect::<Vec<_>>(),
            "pass": inv.iter().all(|i| i.pass),
        });
        std::fs::write(dir.join("report.txt"), &out)?;
        std::fs::write(
            dir.join("report.json"),
            serde_json::to_string_pretty(&report)? + "\n",
        )?;
        std::fs::write(
            dir.join("timeseries.csv"),
            timeseries(&counters, &samples, &events, cfg.secs),
        )?;
        let mut f = String::from("t_s,took_s,kind,proxy,key,in_window,error\n");
        for x in &failures {
            let _ = writeln!(
                f,
                "{:.3},{:.3},{},{},{},{},{}",
                x.t,
                x.took,
                x.kind,
                x.proxy,
                x.key,
                in_window(&windows, x.t, x.took),
                csv_field(&x.error)
            );
        }
        std::fs::write(dir.join("failures.csv"), f)?;
        eprintln!(
            "soak: report.json, timeseries.csv and failures.csv written to {}",
            dir.display()
        );
    }

    let failed: Vec<&str> = inv.iter().filter(|i| !i.pass).map(|i| i.name).collect();
    // Agent logs: copied to OUT/logs when asked or when the run failed (to
    // a folder in the temp dir if OUT is unset); otherwise they go with the
    // temp dir.
    if std::env::var_os("GOSSAMER_SOAK_KEEP_LOGS").is_some() || !failed.is_empty() {
        let dir = match &cfg.out {
            Some(d) => d.join("logs"),
            None => std::env::temp_dir().join(format!("gossamer-soak-{started_unix}")),
        };
        let copied = std::fs::create_dir_all(&dir).and_then(|()| {
            log_paths.iter().try_for_each(|p| {
                let name = p.file_name().unwrap_or_default();
                std::fs::copy(p, dir.join(name)).map(drop)
            })
        });
        match copied {
            Ok(()) => eprintln!(
                "soak: {} agent logs copied to {}",
                log_paths.len(),
                dir.display()
            ),
            Err(e) => eprintln!("soak: copying the agent logs to {}: {e}", dir.display()),
        }
    }
    ensure!(
        failed.is_empty(),
        "soak invariants failed: {failed:?} (report above)"
    );
    Ok(())
}

/// `text` with every run of digits as `#`, at most `max` characters.
fn digits_to_hash(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
        if out.len() >= max {
            break;
        }
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Every driver's counters: (kind, proxy, counters).
type AllCounters = Vec<(&'static str, &'static str, Arc<Mutex<Counters>>)>;

/// `t,<kind>_ok,<kind>_failed,...,n1_rss_kib,n1_fds,n2_rss_kib,n2_fds,action`,
/// one row per bucket: requests by start time, the sample taken at the
/// bucket's start, and the chaos events inside it (`<t>s <label>`, `; `
/// between two).
fn timeseries(counters: &AllCounters, samples: &[Sample], events: &[Event], secs: f64) -> String {
    let buckets = (secs / BUCKET).ceil() as usize;
    let mut out = String::from("t");
    for kind in KINDS {
        let _ = write!(out, ",{0}_ok,{0}_failed", kind.name);
    }
    out.push_str(",n1_rss_kib,n1_fds,n2_rss_kib,n2_fds,action\n");
    for b in 0..buckets {
        let t0 = b as f64 * BUCKET;
        let _ = write!(out, "{t0:.0}");
        for kind in KINDS {
            let (mut ok, mut failed) = (0, 0);
            for (k, _, c) in counters {
                if *k == kind.name
                    && let Some(&(o, f)) = lock(c).buckets.get(b)
                {
                    ok += o;
                    failed += f;
                }
            }
            let _ = write!(out, ",{ok},{failed}");
        }
        match samples
            .iter()
            .min_by(|a, b| (a.t - t0).abs().total_cmp(&(b.t - t0).abs()))
        {
            Some(s) => {
                let _ = write!(out, ",{},{},{},{}", s.n1.0, s.n1.1, s.n2.0, s.n2.1);
            }
            None => out.push_str(",,,,"),
        }
        let labels: Vec<String> = events
            .iter()
            .filter(|e| e.t >= t0 && e.t < t0 + BUCKET)
            .map(|e| format!("{:.1}s {}", e.t, e.label))
            .collect();
        let _ = writeln!(out, ",{}", csv_field(&labels.join("; ")));
    }
    out
}

#[test]
fn schedule_is_seeded_and_mixed() {
    // The 3-minute run gets at least 8 actions of every kind; the same seed
    // gives the same schedule, another seed another one.
    let a = plan(180.0, 1);
    assert!(a.len() >= 8, "{} actions", a.len());
    for k in ActionKind::ALL {
        assert!(a.iter().any(|p| p.kind == k), "{k:?} missing");
    }
    let same = plan(180.0, 1);
    assert!(
        a.iter()
            .zip(&same)
            .all(|(x, y)| x.kind == y.kind && x.pick == y.pick && x.at == y.at)
    );
    let other = plan(180.0, 2);
    assert!(a.iter().zip(&other).any(|(x, y)| x.pick != y.pick));
    assert!(
        a.windows(2)
            .all(|w| w[1].at - w[0].at >= ACTION_GAP - ACTION_JITTER)
    );
    assert!(plan(1800.0, 1).len() >= 100);
}

#[test]
fn websocket_framing_and_base64() {
    assert_eq!(base64(b"hello"), "aGVsbG8=");
    assert_eq!(base64(b"hi"), "aGk=");
    assert_eq!(base64(b"abc"), "YWJj");
    assert_eq!(base64(&[0u8; 16]).len(), 24);
    for len in [0usize, 5, 125, 126, 300, 70_000] {
        let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let frame = ws_frame(WS_TEXT, &payload, [1, 2, 3, 4]);
        let (op, back) = ws_read_frame(&mut &frame[..]).expect("parses");
        assert_eq!((op, back), (WS_TEXT, payload));
    }
    // An unmasked server frame.
    let (op, back) = ws_read_frame(&mut &[0x81u8, 2, b'o', b'k'][..]).expect("parses");
    assert_eq!((op, back.as_slice()), (WS_TEXT, &b"ok"[..]));
    assert!(in_window(&[10.0], 19.9, 0.0));
    assert!(!in_window(&[10.0], 20.0, 0.0));
    assert!(in_window(&[10.0], 9.0, 1.5));
    assert!(!in_window(&[10.0], 8.0, 1.5));
}
