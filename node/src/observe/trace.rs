//! Distributed traces: W3C Trace Context on every request through the
//! mesh, and spans exported by OTLP over HTTP/protobuf.
//!
//! The calling agent continues the `traceparent` its client sent (or starts
//! a trace when there is none, sampled at `sample`), records a client span
//! and sends the request on with that span as parent. The destination
//! agent records a server span under it and hands the instance a
//! `traceparent` naming the server span. `tracestate` travels untouched.
//! The sampled flag decides whether spans are recorded; a caller's choice
//! is honoured either way.
//!
//! Spans queue for an exporter task that posts batches to the collector;
//! when the queue is full spans are dropped and counted, so a slow or dead
//! collector never holds or fails a request.
//!
//! ```toml
//! [tracing]
//! endpoint = "http://127.0.0.1:4318/v1/traces"
//! sample = 0.01
//! ```

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::access::Record;
use crate::proxy::body::{self, HttpsClient};

/// Spans waiting for the exporter at most.
/// W3C Trace Context headers.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

const QUEUE: usize = 4096;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How long a span may wait for a fuller batch.
const FLUSH: Duration = Duration::from_secs(1);
/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Tries per batch before its spans are dropped.
const EXPORT_ATTEMPTS: u32 = 3;
/// Wait before the second try (twice that before the third).
const RETRY_AFTER: Duration = Duration::from_millis(500);

/// `[tracing]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// The collector's OTLP/HTTP traces URL (`http://host:4318/v1/traces`);
    /// tracing is off without one.
    pub endpoint: Option<String>,
    /// The share of new traces sampled, 0 to 1. A caller's sampled flag
    /// wins for traces that arrive with one.
    pub sample: f64,
    /// `service.name` of this agent's spans.
    pub service_name: String,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            sample: 0.01,
            service_name: "gossamer".into(),
        }
    }
}

impl TraceConfig {
    /// Checks values; returns `tracing.key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.sample) {
            return Err("tracing.sample: a share from 0 to 1".into());
        }
        if let Some(url) = &self.endpoint {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| format!("tracing.endpoint: {url:?}: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err(format!(
                    "tracing.endpoint: {url:?}: an http:// or https:// URL, as http://127.0.0.1:4318/v1/traces"
                ));
            }
        }
        Ok(())
    }
}

/// What `traceparent` carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Context {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub parent: [u8; 8],
    /// Bit 0: sampled.
    pub flags: u8,
}

fn hex_into(out: &mut [u8], text: &[u8]) -> Option<()> {
    // Lower case only, as the spec writes them.
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    if text.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

impl Context {
    /// Parses a `traceparent` value; `None` when it is malformed (then a
    /// new trace starts, as the spec says).
    pub fn parse(value: &str) -> Option<Self> {
        let b = value.as_bytes();
        // Nearly every header is version 00 written exactly as the spec
        // writes it: read that by position, without splitting.
        if b.len() == 55 && b.starts_with(b"00-") && b[35] == b'-' && b[52] == b'-' {
            let mut ctx = Self {
                trace_id: [0; 16],
                parent: [0; 8],
                flags: 0,
            };
            hex_into(&mut ctx.trace_id, &b[3..35])?;
            hex_into(&mut ctx.parent, &b[36..52])?;
            let mut f = [0u8; 1];
            hex_into(&mut f, &b[53..])?;
            ctx.flags = f[0];
            return (ctx.trace_id != [0; 16] && ctx.parent != [0; 8]).then_some(ctx);
        }
        let mut parts = value.trim().split('-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four fields; later versions may add more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let mut v = [0u8; 1];
        hex_into(&mut v, version.as_bytes())?;
        let mut ctx = Self {
            trace_id: [0; 16],
            parent: [0; 8],
            flags: 0,
        };
        hex_into(&mut ctx.trace_id, trace.as_bytes())?;
        hex_into(&mut ctx.parent, parent.as_bytes())?;
        let mut f = [0u8; 1];
        hex_into(&mut f, flags.as_bytes())?;
        ctx.flags = f[0];
        (ctx.trace_id != [0; 16] && ctx.parent != [0; 8]).then_some(ctx)
    }

    /// Whether the caller sampled it.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

/// `traceparent` for `span` in `trace` (written without a format string:
/// it is made for every request).
pub fn traceparent(trace_id: &[u8; 16], span: &[u8; 8], flags: u8) -> HeaderValue {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    fn hex_to(out: &mut [u8], bytes: &[u8]) {
        for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 15)];
        }
    }
    let mut out = [b'-'; 55];
    out[..2].copy_from_slice(b"00");
    hex_to(&mut out[3..35], trace_id);
    hex_to(&mut out[36..52], span);
    out[53] = b'0';
    out[54] = if flags & 1 == 1 { b'1' } else { b'0' };
    HeaderValue::from_bytes(&out).expect("hex is a valid header")
}

fn new_span_id() -> [u8; 8] {
    loop {
        let id = fast_random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

thread_local! {
    /// wyrand's state, seeded once per thread from the OS-seeded generator.
    static WYRAND: std::cell::Cell<u64> = std::cell::Cell::new(rand::random());
}

/// 64 random bits for ids and sampling, from a per-thread wyrand: ids must
/// be unique and unpredictable enough to spread, not secret, and the
/// cryptographic generator cost more than the rest of starting a trace.
fn fast_random() -> u64 {
    WYRAND.with(|state| {
        let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    })
}

/// Whether a new trace is sampled at `share` (0 to 1).
fn sample(share: f64) -> bool {
    // 53 random bits as a float in [0, 1).
    share >= 1.0 || ((fast_random() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) < share
}

/// Which side of a call a span records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The calling agent.
    Client,
    /// The destination agent.
    Server,
}

/// The ids of a span being recorded; it travels on the access record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpanIds {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// Its parent, when the trace began before this agent.
    pub parent: Option<[u8; 8]>,
    /// Client or server.
    pub kind: Kind,
    /// When it began.
    pub start: SystemTime,
    /// `tracestate`, passed on as is.
    pub state: Option<String>,
}

/// The trace half of the agent: decides, rewrites headers and exports.
#[derive(Debug, Clone)]
pub struct Tracer {
    tx: mpsc::Sender<Span>,
    sample: f64,
    /// Spans dropped because the exporter fell behind.
    dropped: Counter,
}

/// A finished span.
#[derive(Debug, Clone)]
pub struct Span {
    ids: SpanIds,
    name: String,
    end: SystemTime,
    error: bool,
    attributes: Vec<(&'static str, Value)>,
}

/// An attribute value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Str(String),
    /// A number.
    Int(i64),
}

/// Export counters.
#[derive(Debug, Clone, Default)]
pub struct TraceMetrics {
    /// Spans sent to the collector.
    pub exported: Counter,
    /// Spans dropped: queue full or the collector refused them.
    pub dropped: Counter,
    /// Export requests that failed.
    pub failures: Counter,
}

impl TraceMetrics {
    /// Registers the counters.
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self::default();
        registry.register(
            "gossamer_trace_spans_exported",
            "Spans accepted by the OTLP collector",
            m.exported.clone(),
        );
        registry.register(
            "gossamer_trace_spans_dropped",
            "Spans dropped: the export queue was full or the collector refused them",
            m.dropped.clone(),
        );
        registry.register(
            "gossamer_trace_export_failures",
            "OTLP export requests that failed",
            m.failures.clone(),
        );
        m
    }
}

impl Tracer {
    /// Starts the exporter; `None` when tracing is off.
    pub fn start(
        config: &TraceConfig,
        node: &str,
        metrics: TraceMetrics,
        tasks: &crate::tasks::Tasks,
    ) -> Result<Option<Self>, String> {
        config.validate()?;
        let Some(endpoint) = &config.endpoint else {
            return Ok(None);
        };
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e| format!("tracing.endpoint: {e}"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = Resource {
            service: config.service_name.clone(),
            node: node.to_owned(),
        };
        tasks.spawn(export(rx, uri, resource, metrics.clone(), tasks.clone()));
        Ok(Some(Self {
            tx,
            sample: config.sample,
            dropped: metrics.dropped,
        }))
    }

    fn decide(&self, incoming: Option<Context>) -> ([u8; 16], Option<[u8; 8]>, u8) {
        match incoming {
            Some(c) => (c.trace_id, Some(c.parent), c.flags),
            None => {
                let mut trace = [0u8; 16];
                trace[..8].copy_from_slice(&fast_random().to_be_bytes());
                trace[8..].copy_from_slice(&fast_random().to_be_bytes());
                if trace == [0; 16] {
                    trace[15] = 1;
                }
                let sampled = sample(self.sample);
                (trace, None, u8::from(sampled))
            }
        }
    }

    /// Continues or starts the trace of a request leaving (client) or
    /// reaching (server) this agent: rewrites `traceparent` to name this
    /// agent's span, and returns the span to record when it is sampled.
    pub fn enter(&self, headers: &mut HeaderMap, kind: Kind) -> Option<SpanIds> {
        self.enter_trace(headers, kind).1
    }

    /// [`Tracer::enter`], also giving the trace's id (sampled or not), so
    /// that the access log need not read it back from the header.
    pub fn enter_trace(&self, headers: &mut HeaderMap, kind: Kind) -> ([u8; 16], Option<SpanIds>) {
        let incoming = headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(Context::parse);
        if let Some(c) = incoming
            && !c.sampled()
        {
            // The caller records nothing of this trace, and neither does
            // this agent: the header goes on as it came (the spec lets a
            // hop that records nothing pass it unchanged), unrewritten.
            return (c.trace_id, None);
        }
        let (trace_id, parent, flags) = self.decide(incoming);
        let span_id = new_span_id();
        headers.insert(TRACEPARENT, traceparent(&trace_id, &span_id, flags));
        if incoming.is_none() {
            // A tracestate without a valid traceparent belongs to no trace.
            headers.remove(TRACESTATE);
        }
        let span = (flags & 1 == 1).then(|| SpanIds {
            trace_id,
            span_id,
            parent,
            kind,
            start: SystemTime::now(),
            state: headers
                .get(TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        });
        (trace_id, span)
    }

    /// Queues the span of a finished request; never waits.
    pub fn finish(&self, ids: SpanIds, record: &Record) {
        let service = record.service.as_deref().unwrap_or("-");
        let method = record.method.as_deref().unwrap_or("TCP");
        let mut attributes = vec![
            (
                "gossamer.source_node",
                Value::Str(record.source_node.to_string()),
            ),
            ("gossamer.listener", Value::Str(record.listener.into())),
            ("network.protocol.name", Value::Str(record.protocol.into())),
            ("gossamer.retries", Value::Int(i64::from(record.retries))),
            ("gossamer.destination.service", Value::Str(service.into())),
        ];
        if record.status > 0 {
            attributes.push((
                "http.response.status_code",
                Value::Int(i64::from(record.status)),
            ));
        }
        let text = [
            ("http.request.method", &record.method),
            ("server.address", &record.authority),
            ("url.path", &record.path),
            ("client.address", &Some(record.client.to_string().into())),
            ("gossamer.destination.instance", &record.instance),
            ("gossamer.destination.node", &record.node),
            ("gossamer.route.rule", &record.route_rule),
            ("gossamer.route.arm", &record.route_arm),
            ("gossamer.authz", &record.authz),
            ("gossamer.ingress_route", &record.ingress_route),
            ("gossamer.request_id", &record.request_id),
        ];
        for (key, value) in text {
            if let Some(v) = value {
                attributes.push((key, Value::Str(v.to_string())));
            }
        }
        if !record.flags.is_empty() {
            attributes.push((
                "gossamer.response_flags",
                Value::Str(record.flags.join(",")),
            ));
        }
        let span = Span {
            name: format!("{method} {service}"),
            end: SystemTime::now(),
            error: record.status >= 500 || record.flags.iter().any(|f| *f != "DC" && *f != "RL"),
            ids,
            attributes,
        };
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

#[derive(Debug)]
struct Resource {
    service: String,
    node: String,
}

async fn export(
    mut rx: mpsc::Receiver<Span>,
    uri: http::Uri,
    resource: Resource,
    metrics: TraceMetrics,
    tasks: crate::tasks::Tasks,
) {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(crate::proxy::external::system_roots().iter().cloned());
    let tls = match rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_root_certificates(roots).with_no_client_auth(),
        Err(e) => {
            warn!(error = %e, "trace export off: no TLS configuration");
            return;
        }
    };
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: HttpsClient = Client::builder(TokioExecutor::new()).build(connector);
    let mut batch = Vec::with_capacity(BATCH);
    let mut warned = false;
    loop {
        let first = tokio::select! {
            span = rx.recv() => span,
            () = tasks.stopped() => None,
        };
        let Some(first) = first else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = Bytes::from(encode(&resource, &batch));
        let n = batch.len() as u64;
        batch.clear();
        // A collector that hiccups (a closed connection, a restart) gets
        // the batch again, twice, before its spans are dropped; spans that
        // arrive meanwhile wait in the queue.
        let mut why = String::new();
        let mut exported = false;
        for attempt in 0..EXPORT_ATTEMPTS {
            if attempt > 0 {
                tokio::select! {
                    () = tokio::time::sleep(RETRY_AFTER * attempt) => {}
                    () = tasks.stopped() => break,
                }
            }
            let request = http::Request::post(uri.clone())
                .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                .body(body::full(body.clone()))
                .expect("valid request");
            match tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    exported = true;
                    break;
                }
                // A collector that refuses the data will refuse it again.
                Ok(Ok(r)) if r.status().is_client_error() => {
                    why = format!("collector answered {}", r.status());
                    break;
                }
                Ok(Ok(r)) => why = format!("collector answered {}", r.status()),
                Ok(Err(e)) => why = e.to_string(),
                Err(_) => why = format!("no answer within {EXPORT_TIMEOUT:?}"),
            }
        }
        if exported {
            metrics.exported.inc_by(n);
            if warned {
                debug!("trace export works again");
                warned = false;
            }
        } else {
            metrics.failures.inc();
            metrics.dropped.inc_by(n);
            if !warned {
                warn!(endpoint = %uri, error = %why, spans = n, "trace export failed; spans are dropped until it works");
                warned = true;
            }
        }
    }
}

/// Protobuf wire encoding of the few OTLP messages sent.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, value: &[u8]) {
        key(out, field, 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }

    pub fn uint(out: &mut Vec<u8>, field: u32, value: u64) {
        key(out, field, 0);
        varint(out, value);
    }

    pub fn fixed64(out: &mut Vec<u8>, field: u32, value: u64) {
        key(out, field, 1);
        out.extend_from_slice(&value.to_le_bytes());
    }

    pub fn message(out: &mut Vec<u8>, field: u32, build: impl FnOnce(&mut Vec<u8>)) {
        let mut inner = Vec::new();
        build(&mut inner);
        bytes(out, field, &inner);
    }
}

fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    pb::message(out, field, |kv| {
        pb::bytes(kv, 1, key.as_bytes());
        pb::message(kv, 2, |any| match value {
            Value::Str(s) => pb::bytes(any, 1, s.as_bytes()),
            Value::Int(i) => pb::uint(any, 3, *i as u64),
        });
    });
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// An OTLP `ExportTraceServiceRequest` holding `spans`.
fn encode(resource: &Resource, spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::new();
    // ExportTraceServiceRequest.resource_spans = 1
    pb::message(&mut out, 1, |rs| {
        // ResourceSpans.resource = 1
        pb::message(rs, 1, |r| {
            key_value(r, 1, "service.name", &Value::Str(resource.service.clone()));
            key_value(
                r,
                1,
                "service.instance.id",
                &Value::Str(resource.node.clone()),
            );
        });
        // ResourceSpans.scope_spans = 2
        pb::message(rs, 2, |ss| {
            pb::message(ss, 1, |scope| {
                pb::bytes(scope, 1, b"gossamer");
                pb::bytes(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for span in spans {
                pb::message(ss, 2, |s| encode_span(s, span));
            }
        });
    });
    out
}

fn encode_span(s: &mut Vec<u8>, span: &Span) {
    let ids = &span.ids;
    pb::bytes(s, 1, &ids.trace_id);
    pb::bytes(s, 2, &ids.span_id);
    if let Some(state) = &ids.state {
        pb::bytes(s, 3, state.as_bytes());
    }
    if let Some(parent) = &ids.parent {
        pb::bytes(s, 4, parent);
    }
    pb::bytes(s, 5, span.name.as_bytes());
    // SpanKind: SERVER = 2, CLIENT = 3.
    pb::uint(s, 6, if ids.kind == Kind::Server { 2 } else { 3 });
    pb::fixed64(s, 7, nanos(ids.start));
    pb::fixed64(s, 8, nanos(span.end).max(nanos(ids.start)));
    for (k, v) in &span.attributes {
        key_value(s, 9, k, v);
    }
    // Status: code 2 = ERROR, 0 = UNSET.
    if span.error {
        pb::message(s, 15, |st| pb::uint(st, 3, 2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_written_like_the_spec() {
        let trace: [u8; 16] = *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36";
        let span: [u8; 8] = *b"\x00\xf0\x67\xaa\x0b\xa9\x02\xb7";
        assert_eq!(
            traceparent(&trace, &span, 1),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            traceparent(&trace, &span, 0x10),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
    }

    #[test]
    fn traceparent_parses_like_the_spec() {
        let c = Context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(hex(&c.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&c.parent), "00f067aa0ba902b7");
        assert!(c.sampled());
        assert!(
            !Context::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
                .unwrap()
                .sampled()
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-+1",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba90-b7-01",
        ] {
            assert_eq!(Context::parse(bad), None, "{bad}");
        }
        // Around the fast path, the same reading.
        assert!(
            Context::parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ").is_some()
        );
        // A later version may carry more fields.
        assert!(
            Context::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some()
        );
    }

    fn tracer(sample: f64) -> (Tracer, mpsc::Receiver<Span>) {
        let (tx, rx) = mpsc::channel(8);
        (
            Tracer {
                tx,
                sample,
                dropped: Counter::default(),
            },
            rx,
        )
    }

    #[test]
    fn an_incoming_trace_is_continued() {
        let (t, _rx) = tracer(0.0);
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        h.insert("tracestate", "vendor=x".parse().unwrap());
        let ids = t
            .enter(&mut h, Kind::Client)
            .expect("the caller sampled it");
        assert_eq!(hex(&ids.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            ids.parent.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert_eq!(ids.state.as_deref(), Some("vendor=x"));
        let sent = h["traceparent"].to_str().unwrap();
        assert_eq!(
            sent,
            format!(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-{}-01",
                hex(&ids.span_id)
            )
        );
        // Not sampled by the caller: passed on, not recorded.
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
                .parse()
                .unwrap(),
        );
        assert!(t.enter(&mut h, Kind::Client).is_none());
        assert_eq!(
            h["traceparent"],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        );
        assert_eq!(h["tracestate"], "vendor=x");
    }

    #[test]
    fn fast_ids_do_not_repeat() {
        let ids: std::collections::HashSet<[u8; 8]> = (0..100_000).map(|_| new_span_id()).collect();
        assert_eq!(ids.len(), 100_000);
        // Both halves of a trace id vary.
        let a = (fast_random(), fast_random());
        assert_ne!(a.0, a.1);
    }

    #[test]
    fn a_missing_trace_is_started_at_the_sample_rate() {
        let (all, _rx) = tracer(1.0);
        let mut h = HeaderMap::new();
        h.insert("tracestate", "orphan=1".parse().unwrap());
        let ids = all.enter(&mut h, Kind::Server).unwrap();
        assert_eq!(ids.parent, None);
        assert!(!h.contains_key("tracestate"));
        assert!(
            Context::parse(h["traceparent"].to_str().unwrap())
                .unwrap()
                .sampled()
        );
        let (none, _rx) = tracer(0.0);
        let mut h = HeaderMap::new();
        assert!(none.enter(&mut h, Kind::Client).is_none());
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn spans_encode_as_protobuf() {
        let (t, mut rx) = tracer(1.0);
        let mut h = HeaderMap::new();
        let ids = t.enter(&mut h, Kind::Client).unwrap();
        let record = Record {
            service: Some("web".into()),
            method: Some("GET".into()),
            status: 503,
            ..Record::default()
        };
        t.finish(ids.clone(), &record);
        let span = rx.try_recv().unwrap();
        assert_eq!(span.name, "GET web");
        assert!(span.error);
        let body = encode(
            &Resource {
                service: "gossamer".into(),
                node: "n1".into(),
            },
            &[span],
        );
        // Field 1, length-delimited; the span ids appear verbatim.
        assert_eq!(body[0], 0x0a);
        let find = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(find(&ids.trace_id));
        assert!(find(&ids.span_id));
        assert!(find(b"gossamer.destination.service"));
    }
}
