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
    /// Signalled when lines arrive in an empty buffer, and at the stop.
    arrived: Condvar,
    /// Set (under `pending`'s lock) when the agent stops.
    stopped: std::sync::atomic::AtomicBool,
    dropped: Counter,
}

/// Tells the writer to write what is left and end, when dropped.
#[derive(Debug)]
struct StopWriter(Arc<Shared>);

impl Drop for StopWriter {
    fn drop(&mut self) {
        let pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        // Under the lock, so the writer cannot miss it between its check
        // and its wait.
        self.0
            .stopped
            .store(true, std::sync::atomic::Ordering::Release);
        drop(pending);
        self.0.arrived.notify_one();
    }
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
            stopped: std::sync::atomic::AtomicBool::new(false),
            dropped,
        });
        let writer = shared.clone();
        let (done, ended) = tokio::sync::oneshot::channel::<()>();
        // A thread of its own rather than the runtime's blocking pool: the
        // pool drops work it has not started when the runtime ends, and
        // lines would go with it.
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                write_lines(&writer, out);
                let _ = done.send(());
            })
            .map_err(|e| format!("access_log: cannot start its writer: {e}"))?;
        // The guard tells the writer to finish when the agent stops, or if
        // this task is dropped before that (as the runtime ends).
        let guard = StopWriter(shared.clone());
        let stop = tasks.clone();
        // Not cut short by the stop: the agent waits for the last lines.
        tasks.spawn_until(
            async move {
                let guard = guard;
                stop.stopped().await;
                drop(guard);
                let _ = ended.await;
            },
            tokio_util::sync::CancellationToken::new(),
        );
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
fn write_lines(shared: &Shared, out: Box<dyn Write + Send>) {
    use std::sync::atomic::Ordering;
    let mut out = out;
    let mut batch = Vec::with_capacity(64 * 1024);
    let mut warned = false;
    loop {
        let stopping = {
            let mut pending = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            while pending.is_empty() && !shared.stopped.load(Ordering::Acquire) {
                pending = shared
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(|e| e.into_inner());
            }
            shared.stopped.load(Ordering::Acquire)
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
    pub method: Option<Text>,
    /// The Host the client asked for.
    pub authority: Option<Text>,
    pub path: Option<Text>,
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
    pub source_node: Text,
    /// The client's address.
    pub client: Peer,
    pub service: Option<Text>,
    pub instance: Option<Text>,
    /// The node that owns the instance.
    pub node: Option<Text>,
    pub retries: u32,
    /// Route document rule (`0`, `1`, `default`) and arm, when one applied.
    pub route_rule: Option<Text>,
    pub route_arm: Option<Text>,
    /// Set when authorization refused the request.
    pub authz: Option<Text>,
    /// The gateway route that matched.
    pub ingress_route: Option<Text>,
    pub request_id: Option<Text>,
    /// From `traceparent`.
    pub trace_id: Option<TraceId>,
    /// The request's headers, kept only for the tap (never logged).
    #[serde(skip)]
    pub headers: Option<http::HeaderMap>,
    /// The span this request records, when it is traced and sampled.
    #[serde(skip)]
    pub span: Option<super::trace::SpanIds>,
}

/// Text a record holds, shared rather than copied where it can be: a
/// static name, a shared or owned string, or a piece of the request
/// itself (its method, a header value, the URI's path or authority).
/// Every request that is logged makes a dozen of these, so none of them
/// allocates for a request's own text.
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
    Method(http::Method),
    /// Checked to be visible ASCII when made.
    Header(http::HeaderValue),
    Path(http::uri::PathAndQuery),
    Authority(http::uri::Authority),
}

impl Text {
    /// A name known at compile time.
    pub const fn from_static(s: &'static str) -> Self {
        Self(Repr::Static(s))
    }

    /// A request's method.
    pub fn method(m: &http::Method) -> Self {
        Self(Repr::Method(m.clone()))
    }

    /// A header's value, if it is text (visible ASCII).
    pub fn header(v: &http::HeaderValue) -> Option<Self> {
        v.to_str().ok()?;
        Some(Self(Repr::Header(v.clone())))
    }

    /// The path of `uri` (without its query).
    pub fn path(uri: &http::Uri) -> Self {
        match uri.path_and_query() {
            Some(pq) if !uri.path().is_empty() => Self(Repr::Path(pq.clone())),
            _ => Self::from_static(""),
        }
    }

    /// A URI's authority.
    pub fn authority(a: &http::uri::Authority) -> Self {
        Self(Repr::Authority(a.clone()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Static(s) => s,
            Repr::Shared(s) => s,
            Repr::Owned(s) => s,
            Repr::Method(m) => m.as_str(),
            Repr::Header(v) => v.to_str().unwrap_or_default(),
            Repr::Path(p) => p.path(),
            Repr::Authority(a) => a.as_str(),
        }
    }

    /// Its bytes: for a header, without checking them again.
    fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Header(v) => v.as_bytes(),
            _ => self.as_str().as_bytes(),
        }
    }
}

impl Default for Text {
    fn default() -> Self {
        Self::from_static("")
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Text {}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(Repr::Owned(s.to_owned()))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(Repr::Owned(s))
    }
}

impl From<Arc<str>> for Text {
    fn from(s: Arc<str>) -> Self {
        Self(Repr::Shared(s))
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A W3C trace id, written as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId(pub [u8; 16]);

impl TraceId {
    fn hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 15)];
        }
        out
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hex digits are ASCII.
        f.write_str(std::str::from_utf8(&self.hex()).unwrap_or_default())
    }
}

impl Serialize for TraceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Record {
    /// Appends the record as one JSON line (the same object its
    /// `Serialize` gives, with times in ms to the microsecond), written by
    /// hand: on a busy proxy every request pays for this line, and a
    /// generic serializer spent more on it than the rest of the log.
    pub fn write_line(&self, out: &mut Vec<u8>) {
        /// A key after the first, with its comma and colon.
        macro_rules! key {
            ($k:literal) => {
                concat!(",\"", $k, "\":").as_bytes()
            };
        }
        out.reserve(512);
        out.extend_from_slice(b"{\"start\":");
        self.start.write_quoted(out);
        millis(out, key!("duration_ms"), Some(self.duration_ms));
        // Names the agent chose itself need no escaping.
        plain(out, key!("listener"), self.listener.as_bytes());
        plain(out, key!("protocol"), self.protocol.as_bytes());
        text(out, key!("method"), self.method.as_ref());
        text(out, key!("authority"), self.authority.as_ref());
        text(out, key!("path"), self.path.as_ref());
        uint(out, key!("status"), Some(u64::from(self.status)));
        out.extend_from_slice(key!("flags"));
        out.push(b'[');
        for (i, flag) in self.flags.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, flag.as_bytes());
        }
        out.push(b']');
        uint(out, key!("bytes_in"), self.bytes_in);
        uint(out, key!("bytes_out"), Some(self.bytes_out));
        millis(out, key!("upstream_ms"), self.upstream_ms);
        text(out, key!("source_node"), Some(&self.source_node));
        out.extend_from_slice(key!("client"));
        self.client.write(out);
        text(out, key!("service"), self.service.as_ref());
        text(out, key!("instance"), self.instance.as_ref());
        text(out, key!("node"), self.node.as_ref());
        uint(out, key!("retries"), Some(u64::from(self.retries)));
        text(out, key!("route_rule"), self.route_rule.as_ref());
        text(out, key!("route_arm"), self.route_arm.as_ref());
        text(out, key!("authz"), self.authz.as_ref());
        text(out, key!("ingress_route"), self.ingress_route.as_ref());
        text(out, key!("request_id"), self.request_id.as_ref());
        match &self.trace_id {
            Some(id) => plain(out, key!("trace_id"), &id.hex()),
            None => out.extend_from_slice(b",\"trace_id\":null"),
        }
        out.extend_from_slice(b"}\n");
    }
}

/// `key` and a string that needs no escaping.
fn plain(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    out.extend_from_slice(key);
    out.push(b'"');
    out.extend_from_slice(value);
    out.push(b'"');
}

/// `key` and a string or `null`.
fn text(out: &mut Vec<u8>, key: &[u8], value: Option<&Text>) {
    out.extend_from_slice(key);
    match value {
        Some(v) => json_str(out, v.as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

/// `key` and a number or `null`.
fn uint(out: &mut Vec<u8>, key: &[u8], value: Option<u64>) {
    out.extend_from_slice(key);
    match value {
        Some(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
}

/// `key` and milliseconds with three decimals (microseconds), or `null`.
fn millis(out: &mut Vec<u8>, key: &[u8], value: Option<f64>) {
    out.extend_from_slice(key);
    let Some(ms) = value.filter(|v| v.is_finite() && *v >= 0.0) else {
        out.extend_from_slice(b"null");
        return;
    };
    // Rounded to the nearest microsecond (`ms` is not negative here).
    let micros = (ms * 1000.0 + 0.5) as u64;
    out.extend_from_slice(itoa::Buffer::new().format(micros / 1000).as_bytes());
    let frac = (micros % 1000) as u16;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
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

/// Appends `bytes` (UTF-8) as a JSON string. Text that needs no escaping
/// (nearly all of it) is copied whole.
fn json_str(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
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
    pub instance: Arc<str>,
    /// Its node.
    pub node: Arc<str>,
    /// Attempts after the first.
    pub retries: u32,
    /// Until the answer began.
    pub upstream: Duration,
}

/// The route document's choice, as a response extension.
#[derive(Debug, Clone)]
pub struct RouteChoice {
    /// Rule index or `default`.
    pub rule: Text,
    /// Arm label.
    pub arm: Text,
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
    pub fn emit(&self, mut record: Box<Record>) {
        if let (Some(tracer), Some(ids)) = (&self.trace, record.span.take()) {
            tracer.finish(ids, &record);
        }
        if let Some(log) = &self.log {
            log.emit(&record);
        }
        if let Some(tap) = &self.tap {
            tap.send(*record);
        }
    }
}

/// A record with what the request itself tells; boxed, since it travels
/// with the request and then its response body. `trace`: the trace id
/// when the tracer already knows it, else it is read from `traceparent`.
pub fn begin<B>(
    req: &http::Request<B>,
    client: std::net::SocketAddr,
    listener: &'static str,
    source_node: Text,
    trace: Option<[u8; 16]>,
) -> Box<Record> {
    let headers = req.headers();
    Box::new(Record {
        start: Timestamp(SystemTime::now()),
        listener,
        protocol: crate::proxy::hop::protocol_name(req.version()),
        method: Some(Text::method(req.method())),
        authority: req
            .uri()
            .authority()
            .map(Text::authority)
            .or_else(|| headers.get(http::header::HOST).and_then(Text::header)),
        path: Some(Text::path(req.uri())),
        bytes_in: headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        source_node,
        client: Peer::Addr(client),
        request_id: headers.get(REQUEST_ID).and_then(Text::header),
        trace_id: trace.map(TraceId).or_else(|| trace_id(headers)),
        ..Record::default()
    })
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
            Self::Node(name) => json_str(out, name.as_bytes()),
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
    out.extend_from_slice(&IpText::new(ip));
}

/// An address's text in a buffer of its own: the same text as its
/// `Display`, IPv4 without the formatting machinery (every request pays
/// for this) and without an allocation.
#[derive(Debug, Clone, Copy)]
pub struct IpText {
    // 45 bytes hold any IPv6 text; Rust writes at most 39.
    text: [u8; 45],
    len: u8,
}

impl IpText {
    /// The text of `ip`.
    pub fn new(ip: std::net::IpAddr) -> Self {
        let mut text = [0u8; 45];
        let std::net::IpAddr::V4(v4) = ip else {
            use std::io::Write;
            let mut cursor = std::io::Cursor::new(&mut text[..]);
            let _ = write!(cursor, "{ip}");
            let len = u8::try_from(cursor.position()).unwrap_or(0);
            return Self { text, len };
        };
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                text[len] = b'.';
                len += 1;
            }
            if octet >= 100 {
                text[len] = b'0' + octet / 100;
                len += 1;
            }
            if octet >= 10 {
                text[len] = b'0' + octet / 10 % 10;
                len += 1;
            }
            text[len] = b'0' + octet % 10;
            len += 1;
        }
        // At most 15 bytes.
        Self {
            text,
            len: len as u8,
        }
    }
}

impl std::ops::Deref for IpText {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

/// Fills in what the answer tells and logs it when its body ends; the
/// body stays a [`Logged`], so a listener serving it pays no second box.
pub fn finish_logged(
    mut record: Box<Record>,
    mut response: http::Response<ProxyBody>,
    started: Instant,
    log: &Sinks,
) -> http::Response<Logged> {
    record.status = response.status().as_u16();
    let ext = response.extensions_mut();
    let local = ext
        .get::<crate::proxy::error::LocalError>()
        .map(|e| e.0.as_str());
    record.flags = flags_for(record.status, local);
    if record.flags.contains(&"UAEX") {
        record.authz = local.map(Text::from);
    }
    if let Some(served) = ext.remove::<Served>() {
        record.instance = Some(served.instance.into());
        record.node = Some(served.node.into());
        record.retries = served.retries;
        record.upstream_ms = Some(served.upstream.as_secs_f64() * 1000.0);
    }
    if let Some(choice) = ext.remove::<RouteChoice>() {
        record.route_rule = Some(choice.rule);
        record.route_arm = Some(choice.arm);
    }
    let length = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    response.map(|body| Logged::wrap(body, record, started, log.clone(), length))
}

/// [`finish_logged`] with the body boxed again, for callers that answer
/// with a [`ProxyBody`].
pub fn finish(
    record: Box<Record>,
    response: http::Response<ProxyBody>,
    started: Instant,
    log: &Sinks,
) -> http::Response<ProxyBody> {
    use http_body_util::BodyExt;
    finish_logged(record, response, started, log).map(|body| body.boxed_unsync())
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

/// Hex digits' values (either case); 0xff for other bytes.
const NIBBLE: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// `traceparent`'s trace id, if the header is well formed.
pub fn trace_id(headers: &http::HeaderMap) -> Option<TraceId> {
    // `vv-<32 hex>-...`
    let v = headers.get(super::trace::TRACEPARENT)?.as_bytes();
    let digits = v.get(3..35)?;
    if v[2] != b'-' || v.get(35) != Some(&b'-') {
        return None;
    }
    let mut id = [0u8; 16];
    for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
        if (hi | lo) > 15 {
            return None;
        }
        *byte = hi << 4 | lo;
    }
    (id != [0; 16]).then_some(TraceId(id))
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
    pending: Option<(Box<Record>, Instant, Sinks)>,
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
    /// A body that logs nothing.
    pub fn plain(inner: ProxyBody) -> Self {
        Self {
            inner,
            pending: None,
            bytes: 0,
            expected: None,
        }
    }

    /// The body inside, for one that logs nothing.
    pub fn into_inner(mut self) -> ProxyBody {
        debug_assert!(self.pending.is_none(), "a logged body unwrapped");
        std::mem::replace(&mut self.inner, crate::proxy::body::empty())
    }

    /// Wraps `inner`; `started` is when the request began, `length` the
    /// answer's Content-Length.
    pub fn wrap(
        inner: ProxyBody,
        record: Box<Record>,
        started: Instant,
        log: Sinks,
        length: Option<u64>,
    ) -> Self {
        if inner.is_end_stream() {
            let mut record = record;
            record.duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            log.emit(record);
            return Self::plain(inner);
        }
        let expected = length.or(inner.size_hint().exact());
        Self {
            inner,
            pending: Some((record, started, log)),
            bytes: 0,
            expected,
        }
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
        if self.pending.is_none() {
            return polled;
        }
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
        if self.pending.is_none() {
            return;
        }
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
            trace_id: Some(TraceId(
                *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36",
            )),
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
    fn records_take_their_text_from_the_request() {
        let req = http::Request::builder()
            .method("PATCH")
            .uri("/a/b?q=1")
            .header("host", "web:80")
            .header("x-request-id", "r\"1")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("content-length", "5")
            .body(())
            .unwrap();
        let client = "10.0.0.1:5".parse().unwrap();
        let r = begin(&req, client, "proxy", Text::from_static("n1"), None);
        assert_eq!(r.method.as_deref(), Some("PATCH"));
        assert_eq!(r.path.as_deref(), Some("/a/b"));
        assert_eq!(r.authority.as_deref(), Some("web:80"));
        assert_eq!(r.request_id.as_deref(), Some("r\"1"));
        assert_eq!(r.bytes_in, Some(5));
        let mut line = Vec::new();
        r.write_line(&mut line);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["request_id"], "r\"1");
        assert_eq!(v["path"], "/a/b");
        assert_eq!(v["source_node"], "n1");
        assert_eq!(v["client"], "10.0.0.1:5");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(v, serde_json::to_value(&r).unwrap());

        // An absolute URI's authority wins over Host; a value that is not
        // text is left out.
        let req = http::Request::get("http://api:8080/x")
            .header("host", "other")
            .header("x-request-id", &b"\xff"[..])
            .body(())
            .unwrap();
        let r = begin(&req, client, "proxy", Text::default(), None);
        assert_eq!(r.authority.as_deref(), Some("api:8080"));
        assert_eq!(r.path.as_deref(), Some("/x"));
        assert_eq!(r.request_id, None);
        assert_eq!(r.trace_id, None);
    }

    #[test]
    fn the_writer_ends_when_the_agent_stops() {
        // The agent's task set may drop the log's task as it stops (either
        // branch of its select can win), so this runs many times: a writer
        // left waiting keeps the runtime, and the process, from ending.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        for round in 0..24 {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let tasks = crate::tasks::Tasks::new();
            let config = AccessLogConfig {
                enabled: true,
                path: path.clone(),
                sample: 1.0,
            };
            let log = runtime
                .block_on(async { AccessLog::start(&config, Counter::default(), &tasks) })
                .unwrap()
                .unwrap();
            log.emit(&Record {
                retries: round,
                ..Record::default()
            });
            runtime.block_on(tasks.stop_and_wait(Duration::from_secs(5)));
            let (done, ended) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                drop(runtime);
                let _ = done.send(());
            });
            ended
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("round {round}: the runtime did not end"));
        }
        // Every round's line was written before its writer ended.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 24);
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
        for long in [
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:255.255.255.255",
        ] {
            let ip: std::net::IpAddr = long.parse().unwrap();
            assert_eq!(&*IpText::new(ip), ip.to_string().as_bytes());
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
        assert_eq!(trace_id(&http::HeaderMap::new()), None);
        let id = Some("4bf92f3577b34da6a3ce929d0e0e4736");
        for (value, expected) in [
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                id,
            ),
            // Upper case is read, and written back in lower case.
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                id,
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                None,
            ),
            ("00-xyz-00f067aa0ba902b7-01", None),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
                None,
            ),
        ] {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", value.parse().unwrap());
            let got = trace_id(&h).map(|id| id.to_string());
            assert_eq!(got.as_deref(), expected, "{value}");
        }
    }
}
