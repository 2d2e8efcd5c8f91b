//! The request path: pick an instance by consistent hash, call it on this
//! node (pooled HTTP client) or on its owner (a QUIC proxy stream), within
//! the timeouts, retrying and failing over as the policy and the retry
//! budget allow, with outlier ejection. The outbound listener feeds it
//! requests from local applications and the inbound server uses its
//! client for the owner's last hop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gossamer_membership::catalog::Protocol;
use gossamer_transport::Transport;
use gossamer_transport::frame::read_frame;
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{debug, warn};

use super::authz::{Authz, AuthzTable, Caller, Decision};
use super::body::{self, Counting, ProxyBody, Replayable};
use super::config::ProxyConfig;
use super::error::{
    AttemptError, DENIED, ERROR_HEADER, MESSAGE_HEADER, NO_RESPONSE, OTHER, UNREACHABLE,
    local_response,
};
use super::external::Externals;
use super::hop;
use super::metrics::AuthzLabels;
use super::metrics::{InstanceLabels, ProxyMetrics, RouteLabels, ServiceLabel};
use super::outlier::{EjectionPolicy, Outliers, RetryBudget, Verdict};
use super::policy::{Policies, Policy, RetryPolicy};
use super::pool::{Answer, Pool, PoolError};
use super::routes::{Backend, Routes, ServiceRoute};
use super::upgrade::bridge;
use super::wire::{self, ResponseHead};
use crate::catalog::Shared;
use crate::documents::Documents;
use crate::documents::route::RouteSpec;
use crate::members::Snapshot;
use crate::tasks::Tasks;

type H2Client = super::body::HttpClient;

/// Shared state of the data plane. Cheap to clone through `Arc`.
#[derive(Debug)]
pub struct Proxy {
    pub(super) config: ProxyConfig,
    pub(super) transport: Transport,
    routes: watch::Receiver<Arc<Routes>>,
    /// Authorization documents in force.
    authz: watch::Receiver<Arc<AuthzTable>>,
    /// Read by the inbound server: which instances this node hosts.
    pub(super) catalog: Arc<Shared>,
    outliers: Outliers,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    /// Connections to this node's HTTP/1.1 instances.
    pool: Arc<Pool>,
    /// Clients for this node's HTTP/2 instances, by connect timeout.
    h2_clients: Mutex<HashMap<Duration, H2Client>>,
    inflight: Mutex<HashMap<String, usize>>,
    /// Requests in flight per service under a route's circuit breaker.
    breakers: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// Connection slots per service under a route's circuit breaker.
    slots: Mutex<HashMap<String, Arc<Slots>>>,
    /// Mirror copies in flight from this agent.
    pub(super) mirrors: Arc<AtomicUsize>,
    /// Upgraded connections' bridges run here, so shutdown ends them.
    tasks: Tasks,
    /// Metric families.
    pub metrics: ProxyMetrics,
    /// Where access-log lines go, when they are on.
    access: std::sync::OnceLock<crate::observe::access::AccessLog>,
    /// The live tap.
    tap: crate::observe::tap::Tap,
    /// Where spans go, when tracing is on.
    tracer: std::sync::OnceLock<crate::observe::trace::Tracer>,
    /// Golden signals per service.
    stats: Arc<crate::observe::stats::Stats>,
    /// This node's name, shared by the access-log records.
    node_text: crate::observe::access::Text,
    /// The agent's event stream (ejections and restorations go there).
    pub events: Arc<crate::events::Events>,
}

impl Proxy {
    /// Builds the proxy and starts the task that keeps its routes current.
    pub fn new(
        config: ProxyConfig,
        transport: Transport,
        catalog: Arc<Shared>,
        members: watch::Receiver<Arc<Snapshot>>,
        documents: Arc<Documents>,
        metrics: ProxyMetrics,
        tasks: Tasks,
    ) -> Arc<Self> {
        let (tx, rx) = watch::channel(Arc::new(Routes::default()));
        let (authz_tx, authz) = watch::channel(Arc::new(compile_authz(&documents)));
        tasks.spawn(keep_routes(
            catalog.catalog.clone(),
            members,
            documents,
            tx,
            authz_tx,
        ));
        // As many idle connections per instance as one peer may have
        // requests open on a QUIC connection: with fewer, a burst past the
        // cap closed connections as answers came back and opened new ones
        // for the next requests.
        let streams = gossamer_transport::TransportConfig::default().max_streams;
        let pool = Pool::new(config.upstream_idle_timeout, streams as usize, &tasks);
        Arc::new(Self {
            tasks,
            pool,
            config,
            node_text: Arc::<str>::from(transport.name()).into(),
            transport,
            routes: rx,
            authz,
            catalog,
            outliers: Outliers::default(),
            budgets: Mutex::new(HashMap::new()),
            h2_clients: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            breakers: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            access: std::sync::OnceLock::new(),
            tap: crate::observe::tap::Tap::default(),
            tracer: std::sync::OnceLock::new(),
            stats: Arc::default(),
            events: Arc::default(),
            mirrors: Arc::default(),
            metrics,
        })
    }

    /// Turns access logs on (once, at start).
    pub fn set_access_log(&self, log: crate::observe::access::AccessLog) {
        let _ = self.access.set(log);
    }

    /// The access log, when it is on.
    pub fn access_log(&self) -> Option<&crate::observe::access::AccessLog> {
        self.access.get()
    }

    /// The live tap.
    pub fn tap(&self) -> &crate::observe::tap::Tap {
        &self.tap
    }

    /// Whether anything reads what the request path learns about a
    /// request (access log, tap or tracing).
    pub fn observed(&self) -> bool {
        self.access.get().is_some() || self.tap.watching() || self.tracer.get().is_some()
    }

    /// Turns tracing on (once, at start).
    pub fn set_tracer(&self, tracer: crate::observe::trace::Tracer) {
        let _ = self.tracer.set(tracer);
    }

    /// The tracer, when tracing is on.
    pub fn tracer(&self) -> Option<&crate::observe::trace::Tracer> {
        self.tracer.get()
    }

    /// Golden signals per service.
    pub fn stats(&self) -> &Arc<crate::observe::stats::Stats> {
        &self.stats
    }

    /// This node's name, as access-log records hold it.
    pub fn node_text(&self) -> crate::observe::access::Text {
        self.node_text.clone()
    }

    /// The route of `service`, if the catalog has it.
    pub fn route(&self, service: &str) -> Option<Arc<ServiceRoute>> {
        self.routes.borrow().services.get(service).cloned()
    }

    /// Every route and route document, as of now.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.borrow().clone()
    }

    /// Admits one more request to `service` if fewer than `max` are in
    /// flight from this agent (a route document's circuit breaker).
    pub(super) fn admit(&self, service: &str, max: u32) -> Option<Admitted> {
        let counter = self
            .breakers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.to_owned())
            .or_default()
            .clone();
        let admitted = counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max as usize).then_some(n + 1)
            })
            .is_ok();
        // `then`, not `then_some`: a refused request must not build (and
        // drop, which releases) a guard it never took.
        admitted.then(|| Admitted(counter))
    }

    /// Takes one of `max` connection slots of `service` (a route
    /// document's `max_connections`). When all are busy the request waits
    /// for one, up to `wait`, if fewer than `max_pending` already wait;
    /// otherwise it is refused at once. The error says why.
    pub(super) async fn connection_slot(
        &self,
        service: &str,
        max: u32,
        max_pending: u32,
        wait: Duration,
    ) -> Result<OwnedSemaphorePermit, String> {
        let slots = {
            let mut all = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            let slots = all
                .entry(service.to_owned())
                .or_insert_with(|| Slots::new(max));
            // A new limit starts afresh; requests holding the old one's
            // slots finish on it.
            if slots.max != max {
                *slots = Slots::new(max);
            }
            slots.clone()
        };
        if let Ok(permit) = slots.permits.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let queued = slots
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pending as usize).then_some(n + 1)
            })
            .is_ok();
        if !queued {
            return Err(format!(
                "{max} connections busy and {max_pending} requests waiting"
            ));
        }
        let _waiting = Waiting(&slots.waiting);
        match tokio::time::timeout(wait, slots.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err("connection slots closed".into()),
            Err(_) => Err(format!("{max} connections busy: none free within {wait:?}")),
        }
    }

    /// The authorization documents in force.
    pub fn authz(&self) -> Arc<AuthzTable> {
        self.authz.borrow().clone()
    }

    /// Decides whether `caller` may send this request to `service`'s
    /// instance here; counts the decision and logs audited denials.
    pub(super) fn authorize(&self, service: &str, caller: Caller<'_>, parts: &Parts) -> Decision {
        let request = super::authz::Request {
            method: &parts.method,
            path: parts.uri.path(),
            headers: &parts.headers,
        };
        let verdict = self.authz.borrow().decide(service, caller, request);
        self.record_decision(service, caller, &verdict, &parts.method, parts.uri.path());
        verdict
    }

    /// [`Self::authorize`] for a TCP stream (L4 rules only).
    pub(super) fn authorize_stream(&self, service: &str, caller: Caller<'_>) -> Decision {
        let verdict = self.authz.borrow().decide_stream(service, caller);
        self.record_decision(service, caller, &verdict, &Method::CONNECT, "(tcp)");
        verdict
    }

    fn record_decision(
        &self,
        service: &str,
        caller: Caller<'_>,
        verdict: &Decision,
        method: &Method,
        path: &str,
    ) {
        if verdict.governed {
            self.metrics
                .authz
                .get_or_create(&AuthzLabels {
                    service: service.to_owned(),
                    rule: verdict.rule_label(),
                    decision: verdict.decision.to_owned(),
                })
                .inc();
        }
        match verdict.decision {
            "audit" => warn!(
                %service, caller = %caller.node, %method, %path,
                rule = %verdict.rule_label(), "authz audit: this request would be denied"
            ),
            "deny" => debug!(
                %service, caller = %caller.node, %method, %path,
                rule = %verdict.rule_label(), "authz denied"
            ),
            _ => {}
        }
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
        if let Some(budget) = b.get(service) {
            return budget.clone();
        }
        b.entry(service.to_owned())
            .or_insert_with(|| Arc::new(RetryBudget::new(self.config.retry_budget, 10)))
            .clone()
    }

    fn h2_client(&self, connect_timeout: Duration) -> H2Client {
        let mut clients = self.h2_clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(connect_timeout)
            .or_insert_with(|| {
                let mut connector = HttpConnector::new();
                connector.set_connect_timeout(Some(connect_timeout));
                connector.set_nodelay(true);
                let mut builder = Client::builder(TokioExecutor::new());
                // Without a timer the pool never reaps idle connections.
                builder.pool_timer(TokioTimer::new());
                builder.pool_idle_timeout(self.config.upstream_idle_timeout);
                builder.http2_only(true);
                builder.build(connector)
            })
            .clone()
    }

    /// The instance a key hash goes to now: the first usable, non-ejected
    /// backend in hash order that is not in `exclude` (and, in bounded-load
    /// mode, not over its share of in-flight requests).
    pub fn pick(&self, route: &ServiceRoute, hash: u64, exclude: &[usize]) -> Option<usize> {
        self.pick_at(route, hash, exclude, Instant::now())
    }

    /// [`Self::pick`] with ejections as they stand at `now`.
    fn pick_at(
        &self,
        route: &ServiceRoute,
        hash: u64,
        exclude: &[usize],
        now: Instant,
    ) -> Option<usize> {
        let table = route.table();
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
            .map(|k| inflight.get(&**k).copied().unwrap_or(0))
            .sum();
        let cap = ((total + 1) as f64 / usable as f64 * (1.0 + epsilon)).ceil() as usize;
        table
            .lookup_usable(hash, |i| {
                ok(i) && inflight.get(&*route.backends[i].key).copied().unwrap_or(0) < cap
            })
            .or_else(|| table.lookup_usable(hash, ok))
    }

    /// Whether backend `i` of `route` may take traffic now: passing, its
    /// owner alive, not ejected.
    pub(super) fn usable(&self, route: &ServiceRoute, i: usize) -> bool {
        let b = &route.backends[i];
        b.usable && !self.outliers.is_ejected(&b.key, Instant::now())
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

    /// Sends a request to the instance its key maps to, retrying and
    /// failing over as the agent's policy, or a route document's, allows.
    pub(super) async fn dispatch(
        &self,
        route: &ServiceRoute,
        hash: u64,
        parts: Parts,
        body: Replayable,
        mut on_upgrade: Option<OnUpgrade>,
        overrides: Overrides,
    ) -> Response<ProxyBody> {
        let service = &route.name;
        let mut timeouts = self.config.timeouts(service, &parts.headers);
        // A route document's timeout replaces the agent's own, unless the
        // caller's deadline is shorter still.
        if let Some(t) = overrides.timeout
            && (!timeouts.callers_deadline || t < timeouts.request)
        {
            timeouts.request = t;
            timeouts.callers_deadline = false;
        }
        let (request_timeout, connect_timeout) = (timeouts.request, timeouts.connect);
        // One reading of the clock serves the first attempt throughout.
        let mut now = Instant::now();
        let deadline = now + request_timeout;
        let retry = overrides.retries;
        let attempts = retry.map_or(self.config.max_retries + 1, |r| r.attempts) as usize;
        let budget = self.budget(service);
        budget.request(now);
        // The client side of an upgrade goes to the first attempt; a retry
        // would be a plain request, so upgrades are never retried.
        let upgrade = on_upgrade.is_some();
        // Instances tried, kept inline: a request tries one or a few.
        let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
        let mut made = 0usize;
        let mut last_error = None;
        loop {
            if made > 0 {
                now = Instant::now();
            }
            let mut picked = self.pick_at(route, hash, &tried, now);
            // A route's retries may go back to an instance already tried
            // once every usable one has been.
            if picked.is_none() && retry.is_some() && !tried.is_empty() {
                tried.clear();
                picked = self.pick_at(route, hash, &tried, now);
            }
            let Some(index) = picked else {
                self.count(service, "none", "5xx");
                return match last_error {
                    Some(e) => local_response(StatusCode::BAD_GATEWAY, format!("{service}: {e}")),
                    None => local_response(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("no healthy instance of {service:?}"),
                    ),
                };
            };
            tried.push(index);
            made += 1;
            let backend = &route.backends[index];
            let started = now;
            let left = deadline.saturating_duration_since(started);
            let per_try = retry.and_then(|r| r.per_try_timeout).filter(|t| *t < left);
            let in_flight = self.begin(&backend.key);
            let attempt = tokio::time::timeout(
                per_try.unwrap_or(left),
                self.attempt(
                    route,
                    backend,
                    &parts,
                    &body,
                    on_upgrade.take(),
                    connect_timeout,
                ),
            )
            .await;
            drop(in_flight);
            self.metrics
                .latency
                .get_or_create(&ServiceLabel {
                    service: service.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            // The client's own mistakes (a malformed body, hanging up
            // mid-upload, sending too slowly) are never the instance's.
            if body.too_large() {
                self.count(service, &backend.key, "4xx");
                return local_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "request body larger than this gateway accepts".into(),
                );
            }
            if body.client_failed() {
                self.count(service, &backend.key, "4xx");
                debug!(instance = %backend.key, "request body broken by the client");
                return local_response(
                    StatusCode::BAD_REQUEST,
                    "request body: malformed or cut short by the client".into(),
                );
            }
            let may_try_again = made < attempts && body.replayable() && !upgrade;
            // An attempt that got no answer: what went wrong, whether the
            // policy retries it, and the status to answer with if not.
            let (error, may_retry, status) = match attempt {
                Ok(Ok(response)) => {
                    let status = response.status();
                    if status.is_server_error() {
                        self.failed(route, backend);
                    } else {
                        if self.outliers.success(&backend.key) {
                            let mut event =
                                crate::events::Event::new(crate::events::Kind::Outlier, "restored");
                            event.service = Some(route.name.clone());
                            event.node = Some(backend.node.to_string());
                            event.instance = Some(backend.key.to_string());
                            self.events.publish(event);
                        }
                    }
                    self.count(service, &backend.key, class(status));
                    let retried = retry.is_some_and(|r| r.retries_status(status))
                        && may_try_again
                        && budget.try_retry();
                    if !retried {
                        let mut response = response;
                        if self.observed() {
                            response
                                .extensions_mut()
                                .insert(crate::observe::access::Served {
                                    instance: backend.key.clone(),
                                    node: backend.node.clone(),
                                    retries: made.saturating_sub(1) as u32,
                                    upstream: started.elapsed(),
                                });
                        }
                        return response;
                    }
                    debug!(instance = %backend.key, %status, "retrying after the answer");
                    self.retried(service);
                    continue;
                }
                Ok(Err(e)) => {
                    self.failed(route, backend);
                    self.count(service, &backend.key, "error");
                    let may_retry = match (&e, retry) {
                        (AttemptError::Connect(_), None) => true,
                        (AttemptError::NoResponse(_), None) => idempotent(&parts.method),
                        (AttemptError::Connect(_), Some(r)) => r.on_connect_failure,
                        (AttemptError::NoResponse(_), Some(r)) => r.on_reset,
                    };
                    (e, may_retry, StatusCode::BAD_GATEWAY)
                }
                Err(_) if !body.complete() => {
                    self.count(service, &backend.key, "4xx");
                    return local_response(
                        StatusCode::REQUEST_TIMEOUT,
                        format!("request body not received within {request_timeout:?}"),
                    );
                }
                Err(_) => {
                    if !timeouts.callers_deadline || per_try.is_some() {
                        self.failed(route, backend);
                    }
                    self.count(service, &backend.key, "5xx");
                    let Some(per_try) = per_try else {
                        return local_response(
                            StatusCode::GATEWAY_TIMEOUT,
                            format!("{} did not answer within {request_timeout:?}", backend.key),
                        );
                    };
                    let e = AttemptError::NoResponse(format!(
                        "{} did not answer within the route's per-try timeout ({per_try:?})",
                        backend.key
                    ));
                    let may_retry = retry.is_some_and(|r| r.retries_timeout());
                    (e, may_retry, StatusCode::GATEWAY_TIMEOUT)
                }
            };
            debug!(instance = %backend.key, error = %error, "attempt failed");
            if !(may_retry && may_try_again && budget.try_retry()) {
                return local_response(status, error.to_string());
            }
            last_error = Some(error);
            self.retried(service);
        }
    }

    fn retried(&self, service: &str) {
        self.metrics
            .retries
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts one request's outcome (`2xx`…`5xx`, or `error` for an
    /// attempt that got no answer).
    pub(super) fn count(&self, service: &str, instance: &str, class: &str) {
        self.metrics.count_request(service, instance, class);
    }

    /// Counts one request under a route document.
    pub(super) fn count_route(&self, service: &str, rule: &str, arm: &str) {
        self.metrics
            .routed
            .get_or_create(&RouteLabels {
                service: service.to_owned(),
                rule: rule.to_owned(),
                arm: arm.to_owned(),
            })
            .inc();
    }

    pub(super) fn failed(&self, route: &ServiceRoute, backend: &Backend) {
        if let Verdict::Ejected(time) =
            self.outliers
                .failure(&backend.key, &route.keys, &self.policy(), Instant::now())
        {
            warn!(instance = %backend.key, ejected_for = ?time, "instance ejected after consecutive failures");
            let mut event = crate::events::Event::new(crate::events::Kind::Outlier, "ejected");
            event.service = Some(route.name.clone());
            event.node = Some(backend.node.to_string());
            event.instance = Some(backend.key.to_string());
            event.reason = Some(format!(
                "consecutive failures; out of rotation for {time:?}"
            ));
            self.events.publish(event);
            self.metrics
                .ejections
                .get_or_create(&InstanceLabels {
                    service: route.name.clone(),
                    instance: backend.key.to_string(),
                })
                .inc();
        }
    }

    /// One try at one instance, wherever it runs.
    async fn attempt(
        &self,
        route: &ServiceRoute,
        backend: &Backend,
        parts: &Parts,
        body: &Replayable,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        if let Some(target) = &backend.external {
            let response = target.call(parts, body.attempt()).await?;
            return Ok(self.relay(route, response));
        }
        if backend.local {
            // This node calls its own instance: the same check as a call
            // from another node, with this node as the caller.
            let identity = self.transport.identity();
            let caller = Caller {
                node: self.transport.name(),
                hosts: &identity.hosts,
            };
            let verdict = self.authorize(&route.name, caller, parts);
            if !verdict.allowed {
                return Ok(denied(&route.name, &verdict));
            }
            self.call_local(route, backend, parts, body, on_upgrade, connect_timeout)
                .await
        } else {
            self.call_remote(route, backend, parts, body, on_upgrade, connect_timeout)
                .await
        }
    }

    /// Calls an instance on this node with the pooled client.
    async fn call_local(
        &self,
        route: &ServiceRoute,
        backend: &Backend,
        parts: &Parts,
        body: &Replayable,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        let upstream = Upstream {
            instance: &backend.key,
            address: &backend.address,
            port: backend.port,
            protocol: backend.protocol,
        };
        let mut response = self
            .call_upstream(
                &upstream,
                parts,
                body.attempt(),
                on_upgrade.is_some(),
                connect_timeout,
            )
            .await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = on_upgrade
        {
            let upstream = hyper::upgrade::on(&mut response);
            self.tasks.spawn(async move {
                match upstream.await {
                    Ok(io) => bridge(client_side, TokioIo::new(io)).await,
                    Err(e) => debug!(error = %e, "upstream upgrade failed"),
                }
            });
            let (mut head, _) = response.into_parts();
            hop::strip(&mut head.headers, true);
            return Ok(Response::from_parts(head, body::empty()));
        }
        Ok(self.relay(route, response))
    }

    /// An instance's answer on its way to the client: hop-by-hop headers
    /// dropped, body bytes counted.
    fn relay<B>(&self, route: &ServiceRoute, response: Response<B>) -> Response<ProxyBody>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
        B::Error: Into<body::BoxError>,
    {
        let counter = self.metrics.bytes(&route.name, "response");
        let (mut head, incoming) = response.into_parts();
        hop::strip(&mut head.headers, false);
        Response::from_parts(head, Counting::boxed(incoming, counter))
    }

    /// Calls an instance on another node over a proxy stream to its owner,
    /// whose [`inbound`](super::inbound) server makes the last hop.
    async fn call_remote(
        &self,
        route: &ServiceRoute,
        backend: &Backend,
        parts: &Parts,
        body: &Replayable,
        on_upgrade: Option<OnUpgrade>,
        connect_timeout: Duration,
    ) -> Result<Response<ProxyBody>, AttemptError> {
        let addr = backend.owner_addr.ok_or_else(|| {
            AttemptError::Connect(format!("no address for node {}", backend.node))
        })?;
        let (mut send, mut recv) =
            tokio::time::timeout(connect_timeout, self.transport.open_bi(&backend.node, addr))
                .await
                .map_err(|_| {
                    AttemptError::Connect(format!(
                        "node {} not reachable within {connect_timeout:?}",
                        backend.node
                    ))
                })?
                .map_err(|e| AttemptError::Connect(format!("node {}: {e}", backend.node)))?;
        let upgrade = on_upgrade.is_some();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let opening = wire::OutgoingRequest {
            service: &route.name,
            instance: &backend.id,
            method: parts.method.as_str(),
            path,
            version: hop::version_to_wire(parts.version),
            headers: &parts.headers,
            upgrade,
            end_stream: body.is_empty(),
        }
        .encode_opening()
        .map_err(|e| AttemptError::Connect(e.to_string()))?;
        // Handed over whole: quinn keeps the buffer instead of a copy.
        send.write_chunk(opening)
            .await
            .map_err(|e| AttemptError::NoResponse(format!("node {}: {e}", backend.node)))?;
        let mut send = Some(send);
        if !upgrade {
            let mut send = send.take().expect("present");
            if body.is_empty() {
                // The opening said so: nothing to send, and no task to send it.
                let _ = send.finish();
            } else {
                let counter = self.metrics.bytes(&route.name, "request");
                let body = body.attempt();
                tokio::spawn(async move {
                    if let Err(e) = body::to_quic(body, &mut send, &counter).await {
                        debug!(error = %e, "request body not fully sent");
                        let _ = send.reset(1u32.into());
                    }
                });
            }
        }
        let no_response =
            |e: String| AttemptError::NoResponse(format!("node {}: {e}", backend.node));
        let frame = read_frame(&mut recv, wire::MAX_HEAD)
            .await
            .map_err(|e| no_response(e.to_string()))?
            .ok_or_else(|| no_response("stream closed before the response".into()))?;
        let head = ResponseHead::decode(frame).map_err(|e| no_response(e.to_string()))?;
        let status = StatusCode::from_u16(head.status).map_err(|e| no_response(e.to_string()))?;
        let mut headers = head.headers;
        // The owner answered for its service: when nothing reached the
        // service (gone, refused) the request can go elsewhere. Its message
        // names the cause.
        let message = || {
            headers
                .get(MESSAGE_HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_else(|| format!("{} failed on its node", backend.key))
        };
        match headers.get(ERROR_HEADER).map(|v| v.as_bytes()) {
            Some(r) if r == UNREACHABLE.as_bytes() => {
                return Err(AttemptError::Connect(message()));
            }
            Some(r) if r == NO_RESPONSE.as_bytes() => {
                return Err(AttemptError::NoResponse(message()));
            }
            Some(r) if r == OTHER.as_bytes() => {
                let _ = recv.stop(0u32.into());
                return Ok(local_response(status, message()));
            }
            Some(r) if r == DENIED.as_bytes() => {
                let _ = recv.stop(0u32.into());
                let why = message();
                let mut response = local_response(status, why.clone());
                if let Ok(v) = http::HeaderValue::from_str(&why) {
                    response.headers_mut().insert(ERROR_HEADER, v);
                }
                return Ok(response);
            }
            _ => {}
        }
        headers.remove(MESSAGE_HEADER);
        let mut response = Response::builder().status(status);
        *response.headers_mut().expect("builder ok") = headers;
        if status == StatusCode::SWITCHING_PROTOCOLS
            && let (Some(client_side), Some(send)) = (on_upgrade, send)
        {
            self.tasks
                .spawn(bridge(client_side, tokio::io::join(recv, send)));
            return Ok(response.body(body::empty()).expect("valid"));
        }
        if head.end_stream {
            body::end_read(&mut recv);
            return Ok(response.body(body::empty()).expect("valid"));
        }
        let counter = self.metrics.bytes(&route.name, "response");
        Ok(response
            .body(body::from_quic(recv, counter))
            .expect("valid"))
    }

    /// Sends a request to a local instance on a pooled connection, in the
    /// instance's protocol whatever the caller spoke, and returns its
    /// response as is (the upgrade, if any, still pending on it). Errors
    /// name the instance, its protocol and the cause.
    pub(super) async fn call_upstream(
        &self,
        upstream: &Upstream<'_>,
        parts: &Parts,
        body: ProxyBody,
        upgrade: bool,
        connect_timeout: Duration,
    ) -> Result<Response<Answer>, AttemptError> {
        let Upstream {
            instance,
            address,
            port,
            protocol,
        } = *upstream;
        let what = || {
            format!(
                "{instance} at {address}:{port} (protocol {})",
                protocol.as_str()
            )
        };
        let h2 = protocol.is_h2();
        if upgrade && h2 {
            return Err(AttemptError::Connect(format!(
                "{instance} speaks {}: an HTTP/1.1 upgrade (WebSocket) cannot reach it",
                protocol.as_str()
            )));
        }
        let host = || {
            let host = if address.contains(':') {
                format!("[{address}]")
            } else {
                address.to_owned()
            };
            if port == 80 {
                host
            } else {
                format!("{host}:{port}")
            }
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.version_mut() = hop::version(h2);
        *req.headers_mut() = parts.headers.clone();
        hop::strip(req.headers_mut(), upgrade);
        if h2 {
            // HTTP/2 names the instance in the URI's authority, not Host.
            req.headers_mut().remove(http::header::HOST);
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            *req.uri_mut() = format!("http://{}{path}", host())
                .parse()
                .map_err(|e| AttemptError::Connect(format!("{instance}: bad request: {e}")))?;
            return self
                .h2_client(connect_timeout)
                .request(req)
                .await
                .map(Answer::unpooled)
                .map_err(|e| {
                    let cause = std::error::Error::source(&e)
                        .map(|s| format!("{e}: {s}"))
                        .unwrap_or_else(|| e.to_string());
                    if e.is_connect() {
                        AttemptError::Connect(format!("cannot connect to {}: {cause}", what()))
                    } else {
                        AttemptError::NoResponse(format!(
                            "{}: {cause} (does it speak HTTP/2 without TLS? register it with protocol \"http1\" if not)",
                            what()
                        ))
                    }
                });
        }
        // HTTP/1.1 sends the path alone, with the caller's Host.
        *req.uri_mut() = parts
            .uri
            .path_and_query()
            .map_or_else(|| http::Uri::from_static("/"), |path| path.clone().into());
        if !req.headers().contains_key(http::header::HOST)
            && let Ok(value) = http::HeaderValue::try_from(host())
        {
            req.headers_mut().insert(http::header::HOST, value);
        }
        self.pool
            .send(address, port, req, upgrade, connect_timeout)
            .await
            .map_err(|e| match e {
                PoolError::Connect(cause) => {
                    AttemptError::Connect(format!("cannot connect to {}: {cause}", what()))
                }
                PoolError::Request(e) => AttemptError::NoResponse(format!("{}: {e}", what())),
            })
    }
}

/// What a route document changes about one request's dispatch.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    /// The whole request's timeout.
    pub timeout: Option<Duration>,
    /// Retries, in place of the agent's own.
    pub retries: Option<RetryPolicy>,
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

/// A service's connection slots.
#[derive(Debug)]
pub(super) struct Slots {
    max: u32,
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Slots {
    fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max,
            permits: Arc::new(Semaphore::new(max as usize)),
            waiting: AtomicUsize::new(0),
        })
    }
}

/// One request waiting for a slot, until dropped (also when its caller
/// goes away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request counted against a circuit breaker until dropped.
#[derive(Debug)]
pub(super) struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The answer to a request the destination's authorization refused: 403,
/// with `x-gossamer-error: denied by authz SERVICE rule N` (or `default`).
pub(super) fn denied(service: &str, verdict: &Decision) -> Response<ProxyBody> {
    let why = denial(service, verdict);
    let mut response = local_response(StatusCode::FORBIDDEN, why.clone());
    if let Ok(v) = http::HeaderValue::from_str(&why) {
        response.headers_mut().insert(ERROR_HEADER, v);
    }
    response
}

/// `denied by authz SERVICE rule N` (or `default`).
pub(super) fn denial(service: &str, verdict: &Decision) -> String {
    format!("denied by authz {service} {}", verdict.rule_label())
}

/// Compiles the authz documents in force; like routes, one that no longer
/// compiles is skipped with a warning.
fn compile_authz(documents: &Documents) -> AuthzTable {
    let mut out = AuthzTable::default();
    for held in documents.all() {
        let env = &held.envelope;
        if env.kind != "authz" || env.deleted {
            continue;
        }
        let compiled = serde_json::from_str::<crate::documents::authz::AuthzSpec>(&env.body)
            .map_err(|e| e.to_string())
            .and_then(|spec| {
                if env.name == crate::documents::authz::MESH_DEFAULT {
                    spec.validate(&env.name)?;
                    out.mesh_default = spec.default;
                    return Ok(None);
                }
                Authz::compile(&env.name, env.version, &spec).map(Some)
            });
        match compiled {
            Ok(Some(a)) => {
                out.services.insert(env.name.clone(), Arc::new(a));
            }
            Ok(None) => {}
            Err(e) => {
                warn!(service = %env.name, version = env.version, error = %e, "authz document not applied")
            }
        }
    }
    out
}

/// Compiles the route documents in force. A document that no longer
/// compiles (it passed the same checks when it arrived) is skipped with a
/// warning rather than taking the service down.
fn compile_policies(documents: &Documents) -> Policies {
    let mut out = Policies::new();
    for held in documents.all() {
        let env = &held.envelope;
        if env.kind != "route" || env.deleted {
            continue;
        }
        let compiled = serde_json::from_str::<RouteSpec>(&env.body)
            .map_err(|e| e.to_string())
            .and_then(|spec| Policy::compile(&env.name, env.version, &spec));
        match compiled {
            Ok(p) => {
                out.insert(env.name.clone(), Arc::new(p));
            }
            Err(e) => {
                warn!(service = %env.name, version = env.version, error = %e, "route document not applied")
            }
        }
    }
    out
}

/// Rebuilds the routes whenever the catalog, the membership or a
/// configuration document changes.
async fn keep_routes(
    mut catalog: watch::Receiver<Arc<gossamer_membership::catalog::Catalog>>,
    mut members: watch::Receiver<Arc<Snapshot>>,
    documents: Arc<Documents>,
    tx: watch::Sender<Arc<Routes>>,
    authz: watch::Sender<Arc<AuthzTable>>,
) {
    let mut changes = documents.subscribe();
    let mut policies = Arc::new(compile_policies(&documents));
    let mut externals = Externals::build(&documents);
    let mut m = members.borrow_and_update().clone();
    loop {
        let c = catalog.borrow_and_update().clone();
        let previous = tx.borrow().clone();
        tx.send_replace(Arc::new(Routes::build(
            &c,
            &m,
            &previous,
            policies.clone(),
            &externals,
        )));
        tokio::select! {
            r = catalog.changed() => if r.is_err() { return },
            r = crate::members::changed(&mut members, &mut m) => if r.is_err() { return },
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                policies = Arc::new(compile_policies(&documents));
                externals = Externals::build(&documents);
                authz.send_replace(Arc::new(compile_authz(&documents)));
            }
        }
    }
}

/// A local instance to call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Upstream<'a> {
    /// `node/id`, for messages.
    pub instance: &'a str,
    /// Where it listens.
    pub address: &'a str,
    /// Its port.
    pub port: u16,
    /// What it speaks.
    pub protocol: Protocol,
}

fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
