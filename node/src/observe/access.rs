//! Access logs: one JSON line per HTTP request (proxy, gateway and upstream
//! listeners) or TCP connection, written by a task of its own so a slow
//! disk never holds a request: lines are queued, and if the queue is full
//! they are dropped and counted (`gossamer_access_log_dropped_total`).
//!
//! ```toml
//! [access_log]
//! enabled = true
//! path = "-"          # stdout; or a file, appended to
//! sample = 1.0        # the share of requests logged
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};

use tracing::warn;

use crate::proxy::body::ProxyBody;

/// Bytes of lines waiting for the writer at most; past it lines are
/// dropped (and counted) rather than held.
const PENDING: usize = 8 << 20;
/// How long the writer lets lines gather before writing them: one write
/// and one wake-up per batch, not per request.
const BATCH: Duration = Duration::from_millis(50);

/// `[access_log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessLogConfig {
    /// Whether to log at all.
    pub enabled: bool,
    /// `-` for stdout, else a file appended to.
    pub path: PathBuf,
    /// The share of requests logged, 0 to 1.
    pub sample: f64,
}

impl Default for AccessLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            path: PathBuf::from("-"),
            sample: 1.0,
        }
    }
}

impl AccessLogConfig {
    /// Checks values; returns `access_log.key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample) {
            return Err("access_log.sample: a share from 0 to 1".into());
        }
        if self.enabled && self.path.as_os_str() != "-" {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .map_err(|e| format!("access_log.path: {}: {e}", self.path.display()))?;
        }
        Ok(())
    }
}

/// Where lines go; cheap to clone. Requests serialize their line straight
/// into a shared buffer; a thread of its own takes the whole buffer every
/// [`BATCH`] and writes it, so a slow disk never holds a request, and a
/// busy proxy pays one write and one wake-up per batch.
#[derive(Debug, Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
    sample: f64,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Vec<u8>>,
    /// Signalled when lines arrive in an empty buffer.
    arrived: Condvar,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer; `None` when logging is off.
    pub fn start(
        config: &AccessLogConfig,
        dropped: Counter,
        tasks: &crate::tasks::Tasks,
    ) -> Result<Option<Self>, String> {
        if !config.enabled || config.sample == 0.0 {
            return Ok(None);
        }
        let out: Box<dyn Write + Send> = if config.path.as_os_str() == "-" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&config.path)
                    .map_err(|e| format!("access_log.path: {}: {e}", config.path.display()))?,
            )
        };
        let shared = Arc::new(Shared {
            pending: Mutex::new(Vec::with_capacity(64 * 1024)),
            arrived: Condvar::new(),
            dropped,
        });
        let writer = shared.clone();
        let stop = tasks.clone();
        tasks.spawn(async move {
            let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = stopped.clone();
            let wake = writer.clone();
            let thread = tokio::task::spawn_blocking(move || write_lines(&writer, out, &flag));
            stop.stopped().await;
            stopped.store(true, std::sync::atomic::Ordering::Release);
            wake.arrived.notify_one();
            let _ = thread.await;
        });
        Ok(Some(Self {
            shared,
            sample: config.sample,
        }))
    }

    /// Whether this request is one of the sampled ones.
    pub fn sampled(&self) -> bool {
        self.sample >= 1.0 || rand::random::<f64>() < self.sample
    }

    /// Adds one record's line.
    pub fn emit(&self, record: &Record) {
        let mut pending = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if pending.len() >= PENDING {
            drop(pending);
            self.shared.dropped.inc();
            return;
        }
        let was_empty = pending.is_empty();
        record.write_line(&mut pending);
        drop(pending);
        if was_empty {
            self.shared.arrived.notify_one();
        }
    }
}

/// The writer: waits for lines, lets a batch gather, writes it; writes
/// what is left when the agent stops.
fn write_lines(
    shared: &Shared,
    out: Box<dyn Write + Send>,
    stopped: &std::sync::atomic::AtomicBool,
) {
    let mut out = out;
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut warned = false;
    loop {
        let stopping = {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            while pending.is_empty() && !stopped.load(std::sync::atomic::Ordering::Acquire) {
                pending = shared
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            stopped.load(std::sync::atomic::Ordering::Acquire)
        };
        if !stopping {
            std::thread::sleep(BATCH);
        }
        std::mem::swap(
            &mut batch,
            &mut *shared.pending.lock().unwrap_or_else(|e| e.into_inner()),
        );
        if !batch.is_empty() {
            match out.write_all(&batch).and_then(|()| out.flush()) {
                Ok(()) => warned = false,
                Err(e) if !warned => {
                    warn!(error = %e, "access log write failed; lines are lost until it works again");
                    warned = true;
                }
                Err(_) => {}
            }
            batch.clear();
            // A burst's big buffer is not kept for good.
            batch.shrink_to(1 << 20);
        }
        if stopping {
            return;
        }
    }
}

/// One access-log line. Absent values are `null`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    /// When the request (or connection) began, RFC 3339 UTC.
    pub start: Timestamp,
    /// From its start until its response ended, ms.
    pub duration_ms: f64,
    /// `proxy`, `gateway` or `upstream`.
    pub listener: &'static str,
    /// `HTTP/1.1`, `HTTP/2` or `tcp`.
    pub protocol: &'static str,
    pub method: Option<String>,
    /// The Host the client asked for.
    pub authority: Option<String>,
    pub path: Option<String>,
    /// HTTP status (0 for a TCP connection).
    pub status: u16,
    /// Why the mesh answered or cut it itself (see [`flags_for`]).
    pub flags: Vec<&'static str>,
    /// Request body bytes (from Content-Length), or bytes client to instance.
    pub bytes_in: Option<u64>,
    /// Response body bytes sent, or bytes instance to client.
    pub bytes_out: u64,
    /// Time until the instance's answer began, ms.
    pub upstream_ms: Option<f64>,
    /// This agent.
    pub source_node: String,
    /// The client's address.
    pub client: Peer,
    pub service: Option<String>,
    pub instance: Option<String>,
    /// The node that owns the instance.
    pub node: Option<String>,
    pub retries: u32,
    /// Route document rule (`0`, `1`, `default`) and arm, when one applied.
    pub route_rule: Option<String>,
    pub route_arm: Option<String>,
    /// Set when authorization refused the request.
    pub authz: Option<String>,
    /// The gateway route that matched.
    pub ingress_route: Option<String>,
    pub request_id: Option<String>,
    /// From `traceparent`.
    pub trace_id: Option<String>,
    /// The request's headers, kept only for the tap (never logged).
    #[serde(skip)]
    pub headers: Option<http::HeaderMap>,
    /// The span this request records, when it is traced and sampled.
    #[serde(skip)]
    pub span: Option<super::trace::SpanIds>,
}

impl Record {
    /// Appends the record as one JSON line (the same object its
    /// `Serialize` gives, with times in ms to the microsecond), written by
    /// hand: on a busy proxy every request pays for this line, and a
    /// generic serializer spent more on it than the rest of the log.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let mut w = JsonLine::open(out);
        w.raw("start", |o| self.start.write_quoted(o));
        w.millis("duration_ms", Some(self.duration_ms));
        w.str("listener", Some(self.listener));
        w.str("protocol", Some(self.protocol));
        w.str("method", self.method.as_deref());
        w.str("authority", self.authority.as_deref());
        w.str("path", self.path.as_deref());
        w.uint("status", Some(u64::from(self.status)));
        w.raw("flags", |o| {
            o.push(b'[');
            for (i, flag) in self.flags.iter().enumerate() {
                if i > 0 {
                    o.push(b',');
                }
                json_str(o, flag);
            }
            o.push(b']');
        });
        w.uint("bytes_in", self.bytes_in);
        w.uint("bytes_out", Some(self.bytes_out));
        w.millis("upstream_ms", self.upstream_ms);
        w.str("source_node", Some(&self.source_node));
        w.raw("client", |o| self.client.write(o));
        w.str("service", self.service.as_deref());
        w.str("instance", self.instance.as_deref());
        w.str("node", self.node.as_deref());
        w.uint("retries", Some(u64::from(self.retries)));
        w.str("route_rule", self.route_rule.as_deref());
        w.str("route_arm", self.route_arm.as_deref());
        w.str("authz", self.authz.as_deref());
        w.str("ingress_route", self.ingress_route.as_deref());
        w.str("request_id", self.request_id.as_deref());
        w.str("trace_id", self.trace_id.as_deref());
        w.close();
    }
}

/// Writes one JSON object's fields in order, then `}` and a newline.
struct JsonLine<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> JsonLine<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn raw(&mut self, key: &str, value: impl FnOnce(&mut Vec<u8>)) {
        self.key(key);
        value(self.out);
    }

    fn str(&mut self, key: &str, value: Option<&str>) {
        self.key(key);
        match value {
            Some(v) => json_str(self.out, v),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    fn uint(&mut self, key: &str, value: Option<u64>) {
        self.key(key);
        match value {
            Some(v) => self
                .out
                .extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
            None => self.out.extend_from_slice(b"null"),
        }
    }

    /// Milliseconds with three decimals (microseconds).
    fn millis(&mut self, key: &str, value: Option<f64>) {
        self.key(key);
        let Some(ms) = value.filter(|v| v.is_finite() && *v >= 0.0) else {
            self.out.extend_from_slice(b"null");
            return;
        };
        let micros = (ms * 1000.0).round() as u64;
        self.out
            .extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
        let frac = (micros % 1000) as u16;
        self.out.extend_from_slice(&[
            b'.',
            b'0' + (frac / 100) as u8,
            b'0' + (frac / 10 % 10) as u8,
            b'0' + (frac % 10) as u8,
        ]);
    }

    fn close(self) {
        self.out.extend_from_slice(b"}\n");
    }
}

/// The bytes a JSON string cannot hold as they are.
const ESCAPED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// Appends `s` as a JSON string. Text that needs no escaping (nearly all
/// of it) is copied whole.
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if !bytes.iter().any(|b| ESCAPED[usize::from(*b)]) {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// What the request path learned about where a request went; put on the
/// response as an extension by the dispatcher.
#[derive(Debug, Clone, Default)]
pub struct Served {
    /// `node/id` of the instance that answered.
    pub instance: String,
    /// Its node.
    pub node: String,
    /// Attempts after the first.
    pub retries: u32,
    /// Until the answer began.
    pub upstream: Duration,
}

/// The route document's choice, as a response extension.
#[derive(Debug, Clone)]
pub struct RouteChoice {
    /// Rule index or `default`.
    pub rule: String,
    /// Arm label.
    pub arm: String,
}

/// Where one request's record goes: the access log (if it was sampled),
/// the tap (if anyone watches) and the tracer (if the request carries a
/// sampled span).
#[derive(Debug, Clone, Default)]
pub struct Sinks {
    /// The access log.
    pub log: Option<AccessLog>,
    /// The live tap.
    pub tap: Option<super::tap::Tap>,
    /// The span exporter.
    pub trace: Option<super::trace::Tracer>,
}

impl Sinks {
    /// The sinks for one new request; `None` when nothing wants it.
    /// `traced`: the request has a sampled span to export.
    pub fn for_request(proxy: &crate::proxy::Proxy, traced: bool) -> Option<Self> {
        let log = proxy.access_log().filter(|l| l.sampled()).cloned();
        let tap = proxy.tap().watching().then(|| proxy.tap().clone());
        let trace = proxy.tracer().filter(|_| traced).cloned();
        (log.is_some() || tap.is_some() || trace.is_some()).then_some(Self { log, tap, trace })
    }

    /// Writes the record out.
    pub fn emit(&self, mut record: Record) {
        if let (Some(tracer), Some(ids)) = (&self.trace, record.span.take()) {
            tracer.finish(ids, &record);
        }
        if let Some(log) = &self.log {
            log.emit(&record);
        }
        if let Some(tap) = &self.tap {
            tap.send(record);
        }
    }
}

/// A record with what the request itself tells.
pub fn begin<B>(
    req: &http::Request<B>,
    client: std::net::SocketAddr,
    listener: &'static str,
    source_node: &str,
) -> Record {
    let headers = req.headers();
    let text = |name: http::header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Record {
        start: Timestamp(SystemTime::now()),
        listener,
        protocol: crate::proxy::hop::protocol_name(req.version()),
        method: Some(req.method().as_str().to_owned()),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| text(http::header::HOST)),
        path: Some(req.uri().path().to_owned()),
        bytes_in: headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        source_node: source_node.to_owned(),
        client: Peer::Addr(client),
        request_id: text(REQUEST_ID),
        trace_id: trace_id(headers),
        ..Record::default()
    }
}

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Who called: the client's address (formatted only when a line is
/// written), or for a request from another agent, that node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A client connection's address.
    Addr(std::net::SocketAddr),
    /// The calling agent.
    Node(String),
}

impl Default for Peer {
    fn default() -> Self {
        Self::Addr(std::net::SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

impl Peer {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            // An address needs no escaping.
            Self::Addr(addr) => {
                out.push(b'"');
                write_addr(out, *addr);
                out.push(b'"');
            }
            Self::Node(name) => json_str(out, name),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Addr(addr) => addr.fmt(f),
            Self::Node(name) => f.write_str(name),
        }
    }
}

impl Serialize for Peer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Appends `addr` as `ip:port`; IPv4 without the formatting machinery
/// (every logged request pays for this).
pub fn write_addr(out: &mut Vec<u8>, addr: std::net::SocketAddr) {
    if addr.is_ipv6() {
        use std::io::Write;
        let _ = write!(out, "{addr}");
        return;
    }
    write_ip(out, addr.ip());
    out.push(b':');
    out.extend_from_slice(itoa::Buffer::new().format(addr.port()).as_bytes());
}

/// Appends `ip` as text, the same text as its `Display`.
pub fn write_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    let std::net::IpAddr::V4(v4) = ip else {
        use std::io::Write;
        let _ = write!(out, "{ip}");
        return;
    };
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        out.extend_from_slice(digits.format(octet).as_bytes());
    }
}

/// Fills in what the answer tells and logs it when its body ends.
pub fn finish(
    mut record: Record,
    response: http::Response<ProxyBody>,
    started: Instant,
    log: &Sinks,
) -> http::Response<ProxyBody> {
    record.status = response.status().as_u16();
    let ext = response.extensions();
    let local = ext
        .get::<crate::proxy::error::LocalError>()
        .map(|e| e.0.as_str());
    record.flags = flags_for(record.status, local);
    if record.flags.contains(&"UAEX") {
        record.authz = local.map(str::to_owned);
    }
    if let Some(served) = ext.get::<Served>() {
        record.instance = Some(served.instance.clone());
        record.node = Some(served.node.clone());
        record.retries = served.retries;
        record.upstream_ms = Some(served.upstream.as_secs_f64() * 1000.0);
    }
    if let Some(choice) = ext.get::<RouteChoice>() {
        record.route_rule = Some(choice.rule.clone());
        record.route_arm = Some(choice.arm.clone());
    }
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    response.map(|body| Logged::wrap(body, record, started, log.clone(), length))
}

/// The flags of an answer: `NR` no route or unknown service, `UH` no
/// healthy instance, `UF` upstream connect failure, `UT` timeout, `UO`
/// overflow (circuit breaker), `RL` rate limited, `FI` fault injected,
/// `UAEX` denied by authz, `BL` body too large, `HL` headers too large,
/// `BP` bad path or request, `DC` downstream disconnect (added when the
/// client went away before the answer ended).
pub fn flags_for(status: u16, local: Option<&str>) -> Vec<&'static str> {
    let Some(message) = local else {
        return Vec::new();
    };
    let flag = match status {
        404 | 503 if message.starts_with("no route") || message.starts_with("unknown service") => {
            "NR"
        }
        503 if message.starts_with("no healthy instance") => "UH",
        503 if message.starts_with("overloaded") => "UO",
        429 => "RL",
        403 if message.starts_with("denied by authz") => "UAEX",
        413 => "BL",
        431 => "HL",
        504 | 408 => "UT",
        _ if message.starts_with("fault injected") => "FI",
        502 if message.contains("cannot connect") || message.contains("cannot reach") => "UF",
        400 => "BP",
        _ => "LR", // another answer the mesh made itself
    };
    vec![flag]
}

/// `traceparent`'s trace id, if the header is well formed.
pub fn trace_id(headers: &http::HeaderMap) -> Option<String> {
    // `vv-<32 hex>-...`
    let v = headers.get(super::trace::TRACEPARENT)?.as_bytes();
    let id = v.get(3..35)?;
    let valid = v[2] == b'-'
        && v.get(35) == Some(&b'-')
        && id.iter().all(u8::is_ascii_hexdigit)
        && id.iter().any(|b| *b != b'0');
    if !valid {
        return None;
    }
    let mut text = std::str::from_utf8(id).ok()?.to_owned();
    text.make_ascii_lowercase();
    Some(text)
}

/// A time that serializes as RFC 3339 UTC with milliseconds, formatted
/// only when written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp(pub SystemTime);

impl Default for Timestamp {
    fn default() -> Self {
        Self(UNIX_EPOCH)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (year, month, day, secs, millis) = civil(self.0);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        )
    }
}

impl Timestamp {
    /// Appends the time as a quoted RFC 3339 string, without going
    /// through the formatting machinery.
    fn write_quoted(&self, out: &mut Vec<u8>) {
        let (year, month, day, secs, millis) = civil(self.0);
        let two = |v: u64| [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8];
        let year = year.clamp(0, 9999) as u64;
        let [y0, y1] = two(year / 100);
        let [y2, y3] = two(year);
        let [mo0, mo1] = two(month as u64);
        let [d0, d1] = two(day as u64);
        let [h0, h1] = two(secs / 3600);
        let [mi0, mi1] = two(secs % 3600 / 60);
        let [s0, s1] = two(secs % 60);
        let ms = u64::from(millis);
        out.extend_from_slice(&[
            b'"',
            y0,
            y1,
            y2,
            y3,
            b'-',
            mo0,
            mo1,
            b'-',
            d0,
            d1,
            b'T',
            h0,
            h1,
            b':',
            mi0,
            mi1,
            b':',
            s0,
            s1,
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
            b'Z',
            b'"',
        ]);
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `SystemTime` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    Timestamp(t).to_string()
}

/// Year, month, day, seconds into the day and milliseconds of `t` (UTC).
fn civil(t: SystemTime) -> (i64, i64, i64, u64, u32) {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, rem, since.subsec_millis())
}

/// A response body that writes its request's line when it ends, or when
/// it is dropped first (then with the `DC` flag).
pub struct Logged {
    inner: ProxyBody,
    pending: Option<(Record, Instant, Sinks)>,
    bytes: u64,
    /// The body's length when known: a client may stop reading once it
    /// has that much, which is no disconnect.
    expected: Option<u64>,
}

impl std::fmt::Debug for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logged")
            .field("bytes", &self.bytes)
            .finish()
    }
}

impl Logged {
    /// Wraps `inner`; `started` is when the request began, `length` the
    /// answer's Content-Length.
    pub fn wrap(
        inner: ProxyBody,
        record: Record,
        started: Instant,
        log: Sinks,
        length: Option<u64>,
    ) -> ProxyBody {
        use http_body_util::BodyExt;
        if inner.is_end_stream() {
            let mut record = record;
            record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            log.emit(record);
            return inner;
        }
        let expected = length.or(inner.size_hint().exact());
        Self {
            inner,
            pending: Some((record, started, log)),
            bytes: 0,
            expected,
        }
        .boxed_unsync()
    }

    fn finish(&mut self, cut: bool) {
        if let Some((mut record, started, log)) = self.pending.take() {
            record.bytes_out = self.bytes;
            record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            if cut {
                record.flags.push("DC");
            }
            log.emit(record);
        }
    }
}

impl Body for Logged {
    type Data = Bytes;
    type Error = crate::proxy::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(false);
                }
            }
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let whole = self.expected.is_some_and(|n| self.bytes >= n);
        self.finish(!whole);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_the_serialized_record() {
        let t = UNIX_EPOCH + Duration::from_micros(1_796_164_387_164_250);
        let full = Record {
            start: Timestamp(t),
            duration_ms: 12.3456,
            listener: "proxy",
            protocol: "HTTP/1.1",
            method: Some("GET".into()),
            authority: Some("web".into()),
            path: Some("/a \"quoted\" \\ path\n\t\u{1}\u{7f} é ✓".into()),
            status: 503,
            flags: vec!["UH", "DC"],
            bytes_in: Some(17),
            bytes_out: 1 << 40,
            upstream_ms: Some(0.0004),
            source_node: "n1".into(),
            client: Peer::Addr("127.0.0.1:5000".parse().unwrap()),
            service: Some("web".into()),
            instance: Some("n2/web-1".into()),
            node: Some("n2".into()),
            retries: 2,
            route_rule: Some("0".into()),
            route_arm: Some("v2".into()),
            authz: Some("denied by authz: rule 3".into()),
            ingress_route: Some("shop".into()),
            request_id: Some("r-1".into()),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            headers: None,
            span: None,
        };
        for record in [full, Record::default()] {
            let mut line = Vec::new();
            record.write_line(&mut line);
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
            let mut ours: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let mut theirs = serde_json::to_value(&record).unwrap();
            // Times in ms are written to the microsecond.
            for key in ["duration_ms", "upstream_ms"] {
                let (a, b) = (ours[key].take(), theirs[key].take());
                match (a.as_f64(), b.as_f64()) {
                    (Some(a), Some(b)) => assert!((a - b).abs() <= 0.0005, "{key}: {a} {b}"),
                    _ => assert_eq!(a, b, "{key}"),
                }
            }
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn addresses_as_text() {
        for addr in [
            "127.0.0.1:5000",
            "10.200.0.255:0",
            "[::1]:7948",
            "[fe80::1]:65535",
        ] {
            let addr: std::net::SocketAddr = addr.parse().unwrap();
            let mut text = Vec::new();
            write_addr(&mut text, addr);
            assert_eq!(text, addr.to_string().into_bytes());
            let mut ip = Vec::new();
            write_ip(&mut ip, addr.ip());
            assert_eq!(ip, addr.ip().to_string().into_bytes());
        }
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_164_387_164);
        assert_eq!(rfc3339(t), "2026-12-01T22:33:07.164Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn flags_name_the_cause() {
        assert_eq!(flags_for(200, None), Vec::<&str>::new());
        assert_eq!(flags_for(503, Some("unknown service \"x\"")), ["NR"]);
        assert_eq!(flags_for(404, Some("no route for host a path /")), ["NR"]);
        assert_eq!(
            flags_for(503, Some("no healthy instance of \"web\"")),
            ["UH"]
        );
        assert_eq!(flags_for(503, Some("overloaded web: 5 requests")), ["UO"]);
        assert_eq!(flags_for(429, Some("rate limit")), ["RL"]);
        assert_eq!(flags_for(403, Some("denied by authz db rule 1")), ["UAEX"]);
        assert_eq!(
            flags_for(500, Some("fault injected by route web rule 0")),
            ["FI"]
        );
        assert_eq!(flags_for(504, Some("web: timed out")), ["UT"]);
        assert_eq!(
            flags_for(502, Some("web: cannot connect to n1/web")),
            ["UF"]
        );
    }

    #[test]
    fn trace_ids_come_from_traceparent() {
        let mut h = http::HeaderMap::new();
        assert_eq!(trace_id(&h), None);
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            trace_id(&h).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        h.insert("traceparent", "00-xyz-00f067aa0ba902b7-01".parse().unwrap());
        assert_eq!(trace_id(&h), None);
    }
}
