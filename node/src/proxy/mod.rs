//! The data plane: local applications call services through the agent's
//! outbound listener; the agent picks an instance by consistent hashing and
//! calls it directly (local) or over a QUIC stream to its node (remote),
//! with timeouts, retries within a budget, outlier ejection and failover.
//!
//! # Layout
//! - [`routes`]: the routing table built from the catalog.
//! - [`outbound`]: the listener for local apps and the per-request path.
//! - [`inbound`]: serving proxy streams from other nodes.
//! - [`wire`]: the proxy protocol on QUIC streams.
//! - [`body`]: streaming bodies between HTTP and QUIC.
//! - [`outlier`]: ejection and the retry budget.
//! - [`metrics`]: per service and instance metrics.

pub mod body;
pub mod inbound;
pub mod metrics;
pub mod outbound;
pub mod outlier;
pub mod routes;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gossamer_transport::Transport;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::agent::swim::Snapshot;
use crate::catalog::Shared;
use body::ProxyBody;
use metrics::ProxyMetrics;
use outlier::{EjectionPolicy, Outliers, RetryBudget};
use routes::{Routes, ServiceRoute};

/// `[proxy]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Outbound listener for local applications (`--proxy`).
    pub listen: String,
    /// Time allowed until the response head arrives.
    #[serde(with = "gossamer_membership::duration")]
    pub request_timeout: Duration,
    /// Time allowed to reach an instance (local connect or QUIC stream).
    #[serde(with = "gossamer_membership::duration")]
    pub connect_timeout: Duration,
    /// Most retries of one request.
    pub max_retries: u32,
    /// Retries allowed per request over a 10 s window (0.2 = 20 % extra load).
    pub retry_budget: f64,
    /// Consecutive failures that eject an instance.
    pub eject_after: u32,
    /// First ejection; doubles for each ejection in a row.
    #[serde(with = "gossamer_membership::duration")]
    pub eject_base: Duration,
    /// Longest ejection.
    #[serde(with = "gossamer_membership::duration")]
    pub eject_max: Duration,
    /// Largest share of a service's instances ejected at once.
    pub eject_max_share: f64,
    /// Bounded-load mode: no instance above (1 + ε) × the average in-flight
    /// load; unset = plain consistent hashing.
    pub bounded_load: Option<f64>,
    /// Pooled connections to local instances unused for this long are
    /// closed.
    #[serde(with = "gossamer_membership::duration")]
    pub upstream_idle_timeout: Duration,
    /// On shutdown, time given to requests in flight to finish after the
    /// agent stopped accepting and left the mesh.
    #[serde(with = "gossamer_membership::duration")]
    pub shutdown_grace: Duration,
    /// Per-service overrides, `[proxy.service.NAME]`.
    pub service: BTreeMap<String, ServiceOverride>,
}

/// Per-service timeouts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceOverride {
    /// Overrides `request_timeout`, e.g. `"2s"`.
    pub request_timeout: Option<String>,
    /// Overrides `connect_timeout`.
    pub connect_timeout: Option<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7948".into(),
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(2),
            max_retries: 2,
            retry_budget: 0.2,
            eject_after: 5,
            eject_base: Duration::from_secs(10),
            eject_max: Duration::from_secs(300),
            eject_max_share: 0.5,
            bounded_load: None,
            upstream_idle_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            service: BTreeMap::new(),
        }
    }
}

impl ProxyConfig {
    /// Checks values; returns `key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err("proxy.request_timeout / connect_timeout: must be positive".into());
        }
        if self.upstream_idle_timeout.is_zero() {
            return Err("proxy.upstream_idle_timeout: must be positive".into());
        }
        if !(0.0..=10.0).contains(&self.retry_budget) {
            return Err("proxy.retry_budget: must be between 0 and 10".into());
        }
        if self.eject_after == 0 {
            return Err("proxy.eject_after: must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.eject_max_share) {
            return Err("proxy.eject_max_share: must be between 0 and 1".into());
        }
        if self.bounded_load.is_some_and(|e| !(e > 0.0 && e <= 10.0)) {
            return Err("proxy.bounded_load: ε must be above 0 and at most 10".into());
        }
        for (name, o) in &self.service {
            for (key, value) in [
                ("request_timeout", &o.request_timeout),
                ("connect_timeout", &o.connect_timeout),
            ] {
                if let Some(v) = value {
                    match gossamer_membership::duration::parse(v) {
                        Ok(d) if !d.is_zero() => {}
                        Ok(_) => {
                            return Err(format!("proxy.service.{name}.{key}: must be positive"));
                        }
                        Err(e) => return Err(format!("proxy.service.{name}.{key}: {e}")),
                    }
                }
            }
        }
        Ok(())
    }

    /// The request and connect timeouts of one call. A gRPC caller's
    /// deadline (`grpc-timeout`) replaces the default request timeout, and
    /// a per-service `request_timeout` bounds it.
    fn timeouts(&self, service: &str, headers: &http::HeaderMap) -> Timeouts {
        let o = self.service.get(service);
        let parse =
            |v: Option<&String>| v.and_then(|v| gossamer_membership::duration::parse(v).ok());
        let configured = parse(o.and_then(|o| o.request_timeout.as_ref()));
        let (request, callers_deadline) = match (grpc_timeout(headers), configured) {
            (Some(deadline), Some(bound)) if bound < deadline => (bound, false),
            (Some(deadline), _) => (deadline, true),
            (None, configured) => (configured.unwrap_or(self.request_timeout), false),
        };
        Timeouts {
            request,
            connect: parse(o.and_then(|o| o.connect_timeout.as_ref()))
                .unwrap_or(self.connect_timeout),
            callers_deadline,
        }
    }
}

/// The time limits of one proxied call.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// Until the response head.
    request: Duration,
    /// To reach the instance.
    connect: Duration,
    /// `request` is the caller's own gRPC deadline: running out of it is
    /// no sign that the instance is unwell.
    callers_deadline: bool,
}

/// The caller's deadline from a `grpc-timeout` header: 1 to 8 digits and a
/// unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
    .filter(|d| !d.is_zero())
}

type HttpClient = Client<HttpConnector, ProxyBody>;

/// Shared state of the data plane. Cheap to clone through `Arc`.
#[derive(Debug)]
pub struct Proxy {
    config: ProxyConfig,
    transport: Transport,
    routes: watch::Receiver<Arc<Routes>>,
    catalog: Arc<Shared>,
    outliers: Outliers,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    clients: Mutex<HashMap<(Duration, bool), HttpClient>>,
    inflight: Mutex<HashMap<String, usize>>,
    /// Metric families.
    pub metrics: ProxyMetrics,
}

impl Proxy {
    /// Builds the proxy and starts the task that keeps its routes current.
    pub fn new(
        config: ProxyConfig,
        transport: Transport,
        catalog: Arc<Shared>,
        members: watch::Receiver<Arc<Snapshot>>,
        metrics: ProxyMetrics,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(Arc::new(Routes::default()));
        tokio::spawn(keep_routes(catalog.catalog.clone(), members, tx));
        Arc::new(Self {
            config,
            transport,
            routes: rx,
            catalog,
            outliers: Outliers::default(),
            budgets: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// The route of `service`, if the catalog has it.
    pub fn route(&self, service: &str) -> Option<Arc<ServiceRoute>> {
        self.routes.borrow().services.get(service).cloned()
    }

    fn policy(&self) -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: self.config.eject_after,
            base: self.config.eject_base,
            max: self.config.eject_max,
            max_share: self.config.eject_max_share,
        }
    }

    fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let mut b = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        b.entry(service.to_owned())
            .or_insert_with(|| Arc::new(RetryBudget::new(self.config.retry_budget, 10)))
            .clone()
    }

    fn client(&self, connect_timeout: Duration, h2: bool) -> HttpClient {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry((connect_timeout, h2))
            .or_insert_with(|| {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(connect_timeout));
                connector.set_nodelay(true);
                let mut builder = Client::builder(TokioExecutor::new());
                // Without a timer the pool never reaps idle connections.
                builder.pool_timer(TokioTimer::new());
                builder.pool_idle_timeout(self.config.upstream_idle_timeout);
                builder.pool_max_idle_per_host(256);
                if h2 {
                    builder.http2_only(true);
                }
                builder.build(connector)
            })
            .clone()
    }

    /// The instance a key hash goes to now: the first usable, non-ejected
    /// backend in hash order that is not in `exclude` (and, in bounded-load
    /// mode, not over its share of in-flight requests).
    pub fn pick(&self, route: &ServiceRoute, hash: u64, exclude: &[usize]) -> Option<usize> {
        let table = route.table();
        let now = Instant::now();
        let ok = |i: usize| {
            let b = &route.backends[i];
            b.usable && !exclude.contains(&i) && !self.outliers.is_ejected(&b.key, now)
        };
        let Some(epsilon) = self.config.bounded_load else {
            return table.lookup_usable(hash, ok);
        };
        let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let usable = (0..route.backends.len()).filter(|&i| ok(i)).count().max(1);
        let total: usize = route
            .keys
            .iter()
            .map(|k| inflight.get(k).copied().unwrap_or(0))
            .sum();
        let cap = ((total + 1) as f64 / usable as f64 * (1.0 + epsilon)).ceil() as usize;
        table
            .lookup_usable(hash, |i| {
                ok(i) && inflight.get(&route.backends[i].key).copied().unwrap_or(0) < cap
            })
            .or_else(|| table.lookup_usable(hash, ok))
    }

    /// Counts a request in flight to `key` until the guard drops, so a
    /// caller that goes away mid-request never leaves a count behind.
    fn begin<'a>(&'a self, key: &'a str) -> InFlight<'a> {
        self.metrics.active.inc();
        if self.config.bounded_load.is_some() {
            *self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.to_owned())
                .or_default() += 1;
        }
        InFlight { proxy: self, key }
    }
}

/// A request in flight to one instance; see [`Proxy::begin`].
#[derive(Debug)]
struct InFlight<'a> {
    proxy: &'a Proxy,
    key: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.proxy.metrics.active.dec();
        if self.proxy.config.bounded_load.is_some() {
            let mut m = self
                .proxy
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(self.key) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

/// Rebuilds the routes whenever the catalog or the membership changes.
async fn keep_routes(
    mut catalog: watch::Receiver<Arc<gossamer_membership::catalog::Catalog>>,
    mut members: watch::Receiver<Arc<Snapshot>>,
    tx: watch::Sender<Arc<Routes>>,
) {
    loop {
        let c = catalog.borrow_and_update().clone();
        let m = members.borrow_and_update().clone();
        let previous = tx.borrow().clone();
        tx.send_replace(Arc::new(Routes::build(&c, &m, &previous)));
        tokio::select! {
            r = catalog.changed() => if r.is_err() { return },
            r = members.changed() => if r.is_err() { return },
        }
    }
}

/// Marks answers the mesh made itself rather than a service; on the
/// owner-to-caller hop its value says why (see [`inbound`]).
pub const ERROR_HEADER: &str = "x-gossamer-error";
/// How many outbound listeners a request has passed; see [`MAX_HOPS`].
pub const HOPS_HEADER: &str = "x-gossamer-hops";
/// A request that passed this many outbound listeners is looping.
pub const MAX_HOPS: u32 = 8;

/// The message of an answer the proxy made itself, kept so it can be
/// re-shaped for gRPC callers.
#[derive(Debug, Clone)]
pub struct LocalError(pub String);

/// A response the proxy makes itself (errors), marked so clients can tell.
pub fn local_response(status: http::StatusCode, message: String) -> http::Response<ProxyBody> {
    let mut response = http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(ERROR_HEADER, "1")
        .body(body::full(Bytes::from(format!("gossamer: {message}\n"))))
        .expect("valid response");
    response.extensions_mut().insert(LocalError(message));
    response
}

/// Whether a request is gRPC (its content type says so).
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Re-shapes an answer the proxy made itself for a gRPC caller: gRPC
/// clients read the status from `grpc-status`, not from the HTTP status,
/// so the error goes there (a trailers-only answer) with its message, as
/// gRPC's HTTP-to-status mapping would have it.
pub fn grpc_error(response: http::Response<ProxyBody>) -> http::Response<ProxyBody> {
    let Some(LocalError(message)) = response.extensions().get::<LocalError>().cloned() else {
        return response;
    };
    let code = match response.status().as_u16() {
        400 => 13,       // INTERNAL: the request itself was broken
        403 => 7,        // PERMISSION_DENIED
        408 | 504 => 4,  // DEADLINE_EXCEEDED
        429 => 8,        // RESOURCE_EXHAUSTED
        502..=503 => 14, // UNAVAILABLE
        _ => 2,          // UNKNOWN
    };
    let encoded: String = message
        .bytes()
        .flat_map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                vec![b as char]
            } else {
                format!("%{b:02X}").chars().collect()
            }
        })
        .collect();
    let mut out = http::Response::builder()
        .status(http::StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header("grpc-status", code.to_string())
        .header(ERROR_HEADER, "1");
    if let Ok(v) = http::HeaderValue::from_str(&encoded) {
        out = out.header("grpc-message", v);
    }
    out.body(body::empty()).expect("valid response")
}
