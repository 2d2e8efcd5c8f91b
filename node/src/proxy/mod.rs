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
use hyper_util::rt::TokioExecutor;
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

    fn timeouts(&self, service: &str) -> (Duration, Duration) {
        let o = self.service.get(service);
        let parse = |v: Option<&String>, d| {
            v.and_then(|v| gossamer_membership::duration::parse(v).ok())
                .unwrap_or(d)
        };
        (
            parse(
                o.and_then(|o| o.request_timeout.as_ref()),
                self.request_timeout,
            ),
            parse(
                o.and_then(|o| o.connect_timeout.as_ref()),
                self.connect_timeout,
            ),
        )
    }
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
                builder.pool_idle_timeout(Duration::from_secs(60));
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

    fn begin(&self, key: &str) {
        self.metrics.active.inc();
        if self.config.bounded_load.is_some() {
            *self
                .inflight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.to_owned())
                .or_default() += 1;
        }
    }

    fn end(&self, key: &str) {
        self.metrics.active.dec();
        if self.config.bounded_load.is_some() {
            let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = m.get_mut(key) {
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

/// A response the proxy makes itself (errors), marked so clients can tell.
pub fn local_response(status: http::StatusCode, message: String) -> http::Response<ProxyBody> {
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("x-gossamer-error", "1")
        .body(body::full(Bytes::from(format!("gossamer: {message}\n"))))
        .expect("valid response")
}
