//! Upstream listeners: a local port per destination service, which an
//! application dials as if the service were local. A TCP service's
//! connections are carried as bytes ([`crate::proxy::tcp`]); an HTTP
//! service's requests go through the HTTP proxy path as if their Host
//! header named it. Which one is decided per connection, from what the
//! catalog says the service speaks.
//!
//! `[[upstream]]` blocks in the config file are fixed; the admin API adds
//! and removes others at runtime, saved in the data dir like runtime
//! service registrations.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gossamer_membership::catalog::validate_service_name;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::listener::{Acceptor, Limits, ListenerMetrics};
use crate::proxy::Proxy;
use crate::proxy::tcp::{self, Spread};
use crate::store::Store;
use crate::tasks::Tasks;

/// Runtime upstreams, saved across restarts.
pub const FILE: &str = "upstreams.json";
/// Most upstream listeners per agent.
pub const MAX_UPSTREAMS: usize = 256;

/// One upstream listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSpec {
    /// The destination service.
    pub service: String,
    /// Where the application dials.
    pub listen: SocketAddr,
    /// How TCP connections spread: `client` (consistent hash of the
    /// client's address) or `none` (fewest open connections).
    #[serde(default)]
    pub hash: Spread,
}

/// Why an upstream was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// A field is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The config file owns it.
    #[error("the upstream for {0:?} comes from the config file; change it there")]
    ConfigOwned(String),
    /// No node registers the service.
    #[error(
        "no instance of service {0:?} is known to the mesh; register it first (an upstream listener needs a service to reach)"
    )]
    UnknownService(String),
    /// Binding failed (port in use, say).
    #[error("cannot listen on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// None to delete.
    #[error("no upstream listener for {0:?}")]
    NotFound(String),
    /// Over [`MAX_UPSTREAMS`].
    #[error("this agent already runs {MAX_UPSTREAMS} upstream listeners")]
    TooMany,
}

impl UpstreamSpec {
    /// Reads `{"service"?, "listen", "hash"?}`; `service` comes from the
    /// URL when given. Unknown fields are errors.
    pub fn from_json(service: Option<&str>, value: &Value) -> Result<Self, UpstreamError> {
        let invalid = |m: String| UpstreamError::Invalid(m);
        let Value::Object(fields) = value else {
            return Err(invalid("expected an object with listen".into()));
        };
        if let Some(other) = fields
            .keys()
            .find(|k| !matches!(k.as_str(), "service" | "listen" | "hash"))
        {
            return Err(invalid(format!(
                "unknown field {other:?} (known: service, listen, hash)"
            )));
        }
        let named = fields.get("service").and_then(Value::as_str);
        let service = match (service, named) {
            (Some(s), Some(n)) if s != n => {
                return Err(invalid(format!(
                    "service: {n:?} in the body, {s:?} in the URL"
                )));
            }
            (Some(s), _) | (None, Some(s)) => s.to_owned(),
            (None, None) => return Err(invalid("service: required (a service name)".into())),
        };
        validate_service_name(&service).map_err(|e| invalid(format!("service: {}", e.problem)))?;
        let listen = fields
            .get("listen")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("listen: required (IP:PORT, e.g. 127.0.0.1:15432)".into()))?;
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| invalid(format!("listen: {listen:?} is not an IP:PORT address")))?;
        if listen.port() == 0 {
            return Err(invalid("listen: give a port (applications dial it)".into()));
        }
        let hash = match fields.get("hash") {
            None => Spread::default(),
            Some(Value::String(h)) => Spread::parse(h)
                .ok_or_else(|| invalid(format!("hash: {h:?} is not client or none")))?,
            Some(other) => return Err(invalid(format!("hash: {other} is not client or none"))),
        };
        Ok(Self {
            service,
            listen,
            hash,
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    upstreams: Vec<UpstreamSpec>,
}

struct Running {
    spec: UpstreamSpec,
    spread: Arc<Mutex<Spread>>,
    stop: CancellationToken,
    /// Cancelled once the listener's socket is closed.
    closed: CancellationToken,
    from_config: bool,
}

/// The upstream listeners of this agent.
pub struct Upstreams {
    proxy: Arc<Proxy>,
    store: Store,
    limits: Limits,
    metrics: ListenerMetrics,
    tasks: Tasks,
    running: Mutex<BTreeMap<String, Running>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams").finish_non_exhaustive()
    }
}

impl Upstreams {
    /// Starts the config file's upstreams (a failure stops the agent from
    /// starting) and the saved runtime ones (a failure is logged and the
    /// upstream dropped).
    pub async fn start(
        proxy: Arc<Proxy>,
        store: Store,
        config: &[UpstreamSpec],
        limits: Limits,
        metrics: ListenerMetrics,
        tasks: Tasks,
    ) -> Result<Arc<Self>, UpstreamError> {
        let this = Arc::new(Self {
            proxy,
            store,
            limits,
            metrics,
            tasks,
            running: Mutex::new(BTreeMap::new()),
        });
        for spec in config {
            this.launch(spec.clone(), true).await?;
        }
        let saved: Saved = this.store.read_json(FILE).unwrap_or_else(|e| {
            warn!(error = %e, "{FILE} unreadable; starting without runtime upstreams");
            Saved::default()
        });
        for spec in saved.upstreams {
            if this.running().contains_key(&spec.service) {
                warn!(service = %spec.service, "saved upstream shadowed by the config file");
                continue;
            }
            if let Err(e) = this.launch(spec.clone(), false).await {
                warn!(service = %spec.service, error = %e, "saved upstream not restored");
            }
        }
        this.save();
        Ok(this)
    }

    fn running(&self) -> MutexGuard<'_, BTreeMap<String, Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn launch(&self, spec: UpstreamSpec, from_config: bool) -> Result<(), UpstreamError> {
        if self.running().len() >= MAX_UPSTREAMS {
            return Err(UpstreamError::TooMany);
        }
        let listener = bind(spec.listen).map_err(|e| UpstreamError::Bind {
            addr: spec.listen,
            reason: e.to_string(),
        })?;
        let spread = Arc::new(Mutex::new(spec.hash));
        let stop = CancellationToken::new();
        let closed = CancellationToken::new();
        let acceptor = Acceptor::new(
            "upstream",
            self.limits,
            self.metrics.clone(),
            self.tasks.clone(),
        );
        let listening = run(
            listener,
            spec.service.clone(),
            spread.clone(),
            self.proxy.clone(),
            acceptor,
            stop.clone(),
            self.tasks.clone(),
        );
        let done = closed.clone();
        self.tasks.spawn(async move {
            listening.await;
            done.cancel();
        });
        info!(service = %spec.service, listen = %spec.listen, "upstream listener started");
        if let Some(old) = self.running().insert(
            spec.service.clone(),
            Running {
                spec,
                spread,
                stop,
                closed,
                from_config,
            },
        ) {
            old.stop.cancel();
        }
        Ok(())
    }

    /// Adds or changes a runtime upstream. A new address is bound before
    /// the old listener stops, so a failure changes nothing.
    pub async fn put(&self, spec: UpstreamSpec) -> Result<UpstreamSpec, UpstreamError> {
        let current = self
            .running()
            .get(&spec.service)
            .map(|r| (r.from_config, r.spec.listen, r.spread.clone()));
        match current {
            Some((true, _, _)) => return Err(UpstreamError::ConfigOwned(spec.service)),
            Some((false, listen, spread)) if listen == spec.listen => {
                *spread.lock().unwrap_or_else(|e| e.into_inner()) = spec.hash;
                if let Some(r) = self.running().get_mut(&spec.service) {
                    r.spec.hash = spec.hash;
                }
            }
            _ => {
                if self.proxy.route(&spec.service).is_none() {
                    return Err(UpstreamError::UnknownService(spec.service));
                }
                self.launch(spec.clone(), false).await?;
            }
        }
        self.save();
        Ok(spec)
    }

    /// Stops a runtime upstream's listener, returning once its port is
    /// closed (connections already open go on until they end).
    pub async fn delete(&self, service: &str) -> Result<(), UpstreamError> {
        let removed = {
            let mut running = self.running();
            match running.get(service) {
                None => return Err(UpstreamError::NotFound(service.to_owned())),
                Some(r) if r.from_config => {
                    return Err(UpstreamError::ConfigOwned(service.to_owned()));
                }
                Some(_) => running.remove(service),
            }
        };
        if let Some(r) = removed {
            r.stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), r.closed.cancelled()).await;
        }
        info!(%service, "upstream listener stopped");
        self.save();
        Ok(())
    }

    /// Every upstream: spec and whether the config file owns it.
    pub fn list(&self) -> Vec<(UpstreamSpec, bool)> {
        self.running()
            .values()
            .map(|r| (r.spec.clone(), r.from_config))
            .collect()
    }

    fn save(&self) {
        let saved = Saved {
            upstreams: self
                .running()
                .values()
                .filter(|r| !r.from_config)
                .map(|r| r.spec.clone())
                .collect(),
        };
        if let Err(e) = self.store.write_json(FILE, &saved) {
            warn!(error = %e, "runtime upstreams not saved; they will not survive a restart");
        }
    }
}

/// Connections waiting to be accepted, at most: a burst of clients
/// (a connection pool filling up) must not overflow the queue, whose
/// overflow leaves a client with a connection the listener never sees.
const BACKLOG: u32 = 4096;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts on one upstream listener until stopped or the agent drains;
/// the socket closes when this returns.
async fn run(
    listener: TcpListener,
    service: String,
    spread: Arc<Mutex<Spread>>,
    proxy: Arc<Proxy>,
    mut acceptor: Acceptor,
    stop: CancellationToken,
    tasks: Tasks,
) {
    loop {
        let accepted = tokio::select! {
            a = acceptor.accept(&listener) => a,
            () = stop.cancelled() => return,
        };
        let Some((stream, peer, slot)) = accepted else {
            return;
        };
        match proxy.route(&service) {
            Some(route) if tcp::speaks_tcp(&route) => {
                let spread = *spread.lock().unwrap_or_else(|e| e.into_inner());
                let proxy = proxy.clone();
                tasks.spawn(async move {
                    let _slot = slot;
                    tcp::serve_client(proxy, route, spread, stream, peer).await;
                });
            }
            Some(_) => {
                let (proxy, service) = (proxy.clone(), service.clone());
                let handler = crate::listener::handler(move |req, peer| {
                    crate::proxy::outbound::handle_for(proxy.clone(), req, peer, service.clone())
                });
                acceptor.serve_http(stream, peer, slot, handler);
            }
            None => {
                // Nothing to reach (and no way to know the protocol): the
                // application sees a reset, and the metric says why.
                tcp::refused(&proxy, &service);
                let _ = stream.set_zero_linger();
            }
        }
    }
}
