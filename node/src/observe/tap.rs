//! Live tap: `GET /v1/tap` streams the requests this agent carries as
//! NDJSON while they happen, filtered, at a capped rate, with header
//! values redacted unless the watcher lists them. Nothing is recorded for
//! the tap while nobody watches.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use super::access::Record;

/// Events buffered per watcher before the slowest misses some.
const BUFFER: usize = 1024;
/// Default and highest rate of events per watcher.
pub const DEFAULT_RATE: f64 = 100.0;
/// The highest `max_rate` a watcher may ask for.
pub const MAX_RATE: f64 = 1000.0;

/// The tap of one agent; cheap to clone.
#[derive(Debug, Clone)]
pub struct Tap {
    tx: broadcast::Sender<Arc<Record>>,
    watchers: Arc<AtomicUsize>,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BUFFER).0,
            watchers: Arc::default(),
        }
    }
}

impl Tap {
    /// Whether anyone watches (records are made only then).
    pub fn watching(&self) -> bool {
        self.watchers.load(Ordering::Relaxed) > 0
    }

    /// Hands a finished request to the watchers.
    pub fn send(&self, record: Record) {
        let _ = self.tx.send(Arc::new(record));
    }

    fn subscribe(&self) -> (broadcast::Receiver<Arc<Record>>, Watcher) {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        (self.tx.subscribe(), Watcher(self.watchers.clone()))
    }
}

struct Watcher(Arc<AtomicUsize>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a watcher asked for (`?service=&path=&method=&status=&max_rate=&headers=`).
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    /// Destination service.
    pub service: Option<String>,
    /// Path prefix.
    pub path: Option<String>,
    /// Method (any case).
    pub method: Option<String>,
    /// A status (`503`) or a class (`5xx`).
    pub status: Option<String>,
    /// Events per second at most.
    pub max_rate: f64,
    /// Header names whose values are shown (lower case); others redacted.
    pub headers: Vec<String>,
}

impl Filter {
    /// Parses a query string; an error names the parameter.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut f = Self {
            service: None,
            path: None,
            method: None,
            status: None,
            max_rate: DEFAULT_RATE,
            headers: Vec::new(),
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v);
            match k {
                "service" => f.service = Some(v),
                "path" => f.path = Some(v),
                "method" => f.method = Some(v.to_ascii_uppercase()),
                "status" => {
                    let ok = (v.len() == 3 && v.bytes().all(|b| b.is_ascii_digit()))
                        || (v.len() == 3 && v.as_bytes()[0].is_ascii_digit() && &v[1..] == "xx");
                    if !ok {
                        return Err(format!(
                            "status: {v:?} is not a status (503) or class (5xx)"
                        ));
                    }
                    f.status = Some(v);
                }
                "max_rate" => {
                    let rate: f64 = v
                        .parse()
                        .map_err(|_| format!("max_rate: {v:?} is not a number"))?;
                    if !(rate > 0.0 && rate <= MAX_RATE) {
                        return Err(format!(
                            "max_rate: between 0 and {MAX_RATE} events a second"
                        ));
                    }
                    f.max_rate = rate;
                }
                "headers" => {
                    f.headers = v
                        .split(',')
                        .filter(|h| !h.is_empty())
                        .map(str::to_ascii_lowercase)
                        .collect();
                }
                other => {
                    return Err(format!(
                        "unknown parameter {other:?} (service, path, method, status, max_rate, headers)"
                    ));
                }
            }
        }
        Ok(f)
    }

    fn admits(&self, r: &Record) -> bool {
        let status = r.status.to_string();
        self.service
            .as_ref()
            .is_none_or(|s| r.service.as_deref() == Some(s.as_str()))
            && self
                .path
                .as_ref()
                .is_none_or(|p| r.path.as_ref().is_some_and(|rp| rp.starts_with(p.as_str())))
            && self
                .method
                .as_ref()
                .is_none_or(|m| r.method.as_deref() == Some(m.as_str()))
            && self.status.as_ref().is_none_or(|s| {
                if s.ends_with("xx") {
                    status.as_bytes().first() == s.as_bytes().first()
                } else {
                    *s == status
                }
            })
    }

    /// The event as a JSON line, headers redacted unless listed.
    fn line(&self, r: &Record) -> Bytes {
        let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
        if let (Value::Object(map), Some(headers)) = (&mut v, &r.headers) {
            let shown: serde_json::Map<String, Value> = headers
                .iter()
                .map(|(k, val)| {
                    let value = if self.headers.iter().any(|h| h == k.as_str()) {
                        Value::String(String::from_utf8_lossy(val.as_bytes()).into_owned())
                    } else {
                        Value::String("[redacted]".into())
                    };
                    (k.as_str().to_owned(), value)
                })
                .collect();
            map.insert("headers".into(), Value::Object(shown));
        }
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

fn decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            x => out.push(x),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The streamed body of one watcher: lines from a forwarding task.
#[derive(Debug)]
pub struct Stream {
    rx: mpsc::Receiver<Bytes>,
}

impl Stream {
    /// A body of the chunks sent on the other end of `rx`.
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        Self { rx }
    }
}

impl Body for Stream {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|line| line.map(|l| Ok(Frame::data(l))))
    }
}

/// Starts streaming to one watcher; the stream (and its task) ends when
/// the client goes away, which the admin listener also makes happen when
/// the agent stops.
pub fn watch(tap: &Tap, filter: Filter) -> Stream {
    let (mut events, watcher) = tap.subscribe();
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let _watcher = watcher;
        // A token bucket: a second's worth of burst, refilled at the rate.
        let (rate, size) = (filter.max_rate, filter.max_rate.max(1.0));
        let (mut tokens, mut at) = (size, Instant::now());
        let mut over = 0u64;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Opening line, so a client sees the stream is live.
        let hello = serde_json::json!({"tap": "started", "max_rate": rate});
        if tx.send(Bytes::from(format!("{hello}\n"))).await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                () = tx.closed() => return,
                _ = tick.tick() => {
                    // Once a second, say how many were not shown.
                    if over > 0 {
                        let note = serde_json::json!({"dropped": over, "why": "over max_rate, or the watcher fell behind"});
                        if tx.send(Bytes::from(format!("{note}\n"))).await.is_err() {
                            return;
                        }
                        over = 0;
                    }
                    continue;
                }
            };
            let record = match event {
                Ok(r) => r,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    over += n;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if !filter.admits(&record) {
                continue;
            }
            let now = Instant::now();
            tokens = (tokens + now.duration_since(at).as_secs_f64() * rate).min(size);
            at = now;
            if tokens < 1.0 {
                over += 1;
            } else {
                tokens -= 1.0;
                if tx.send(filter.line(&record)).await.is_err() {
                    return;
                }
            }
        }
    });
    Stream { rx }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_match() {
        let f = Filter::parse(
            "service=web&path=/api&method=get&status=5xx&max_rate=10&headers=X-User,accept",
        )
        .unwrap();
        assert_eq!(f.method.as_deref(), Some("GET"));
        assert_eq!(f.headers, ["x-user", "accept"]);
        let r = Record {
            service: Some("web".into()),
            path: Some("/api/x".into()),
            method: Some("GET".into()),
            status: 503,
            ..Record::default()
        };
        assert!(f.admits(&r));
        assert!(!f.admits(&Record {
            status: 200,
            ..r.clone()
        }));
        assert!(!f.admits(&Record {
            service: Some("db".into()),
            ..r.clone()
        }));
        assert!(Filter::parse("status=5x").is_err());
        assert!(Filter::parse("max_rate=0").is_err());
        assert!(Filter::parse("max_rate=100000").is_err());
        assert!(Filter::parse("wat=1").unwrap_err().contains("wat"));
        assert_eq!(
            Filter::parse("path=%2Fa%20b").unwrap().path.as_deref(),
            Some("/a b")
        );
    }

    #[test]
    fn headers_are_redacted_unless_listed() {
        let f = Filter::parse("headers=x-user").unwrap();
        let mut h = http::HeaderMap::new();
        h.insert("x-user", "alice".parse().unwrap());
        h.insert("authorization", "Bearer secret".parse().unwrap());
        let r = Record {
            headers: Some(h),
            ..Record::default()
        };
        let line = String::from_utf8(f.line(&r).to_vec()).unwrap();
        assert!(line.contains("\"x-user\":\"alice\""), "{line}");
        assert!(line.contains("\"authorization\":\"[redacted]\""), "{line}");
        assert!(!line.contains("secret"), "{line}");
    }
}
