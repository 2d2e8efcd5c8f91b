//! Wiring of one agent: identity, sockets, the mesh and catalog tasks, the
//! data plane and the admin API, and graceful shutdown. This module imports
//! everything it wires; nothing but `main` and the demo imports it.
//!
//! Every task the agent starts, down to per-connection, per-stream and
//! health-check tasks, runs on one [`Tasks`]; shutdown is one path (see
//! [`run`]).

use std::future::Future;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use gossamer_membership::NodeId;
use gossamer_membership::driver::{Driver, JoinPlan};
use gossamer_transport::{Inbound, Transport, TransportConfig};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::catalog::registry::AgentListeners;
use crate::catalog::{CatalogHandle, CatalogTask};
use crate::config::AgentConfig;
use crate::members::Command;
use crate::mesh::{self, MeshInbox, MeshTask};
use crate::metrics::{Counters, Metrics};
use crate::proxy::Proxy;
use crate::store::{SavedState, Store, unix_millis};
use crate::tasks::Tasks;

/// How long shutdown waits for peers to acknowledge the close.
const CLOSE_DEADLINE: Duration = Duration::from_secs(2);
/// Time given to the leave notices to reach the wire before closing.
const LEAVE_GRACE: Duration = Duration::from_millis(300);

/// Errors that stop the agent from starting. All are the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Identity files are missing, unreadable or invalid.
    #[error(transparent)]
    Identity(#[from] gossamer_transport::PkiError),
    /// The data dir is unusable.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A socket could not be bound.
    #[error("{key}: cannot bind {addr}: {source}")]
    Bind {
        /// Which setting.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The transport could not start.
    #[error(transparent)]
    Transport(#[from] gossamer_transport::TransportError),
    /// Bad SWIM settings.
    #[error(transparent)]
    Membership(#[from] gossamer_membership::MembershipError),
    /// A configured service cannot be registered.
    #[error("{0}")]
    Service(String),
    /// A configured upstream listener cannot start.
    #[error("upstream {service}: {source}")]
    Upstream {
        /// Its service.
        service: String,
        /// Why.
        source: crate::upstreams::UpstreamError,
    },
    /// The config file registers a service the certificate does not name.
    #[error(
        "service {id:?} ({service}): this node's certificate lets it host {hosts}, not {service:?}; issue it with `gossamer cert issue --service {service}` (or --service '*')"
    )]
    NotInCertificate {
        /// The registration's id.
        id: String,
        /// Its service.
        service: String,
        /// What the certificate allows.
        hosts: gossamer_transport::pki::Hosts,
    },
}

/// The sockets an agent serves on, bound before anything else starts.
#[derive(Debug)]
pub struct Sockets {
    /// QUIC/UDP.
    pub udp: UdpSocket,
    /// Admin API.
    pub admin: TcpListener,
    /// Outbound proxy for local applications.
    pub proxy: TcpListener,
    /// Gateway listeners (none unless configured).
    pub ingress: crate::gateway::serve::Bound,
}

impl Sockets {
    /// Binds both sockets from the configuration.
    pub async fn bind(config: &AgentConfig) -> Result<Self, StartError> {
        let udp = UdpSocket::bind(config.bind).map_err(|source| StartError::Bind {
            key: "bind",
            addr: config.bind,
            source,
        })?;
        let admin = TcpListener::bind(config.admin)
            .await
            .map_err(|source| StartError::Bind {
                key: "admin",
                addr: config.admin,
                source,
            })?;
        let proxy = TcpListener::bind(config.proxy.listen)
            .await
            .map_err(|source| StartError::Bind {
                key: "proxy",
                addr: config.proxy.listen,
                source,
            })?;
        let ingress = crate::gateway::serve::Bound::bind(&config.ingress)
            .await
            .map_err(|(addr, source)| StartError::Bind {
                key: "ingress",
                addr,
                source,
            })?;
        Ok(Self {
            udp,
            admin,
            proxy,
            ingress,
        })
    }
}

/// `agent.json` in the data dir: where a running agent can be reached.
#[derive(Debug, Serialize)]
struct AgentInfo<'a> {
    name: &'a str,
    pid: u32,
    quic: SocketAddr,
    advertise: SocketAddr,
    admin: SocketAddr,
    proxy: SocketAddr,
    generation: u64,
}

/// Runs an agent on bound sockets until `shutdown` resolves or the admin API
/// asks it to leave; then leaves the mesh and closes cleanly.
pub async fn run(
    config: AgentConfig,
    sockets: Sockets,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let store = Store::open(&config.data_dir)?;
    let identity = crate::identity::load(&config.tls, config.name.as_deref(), &config.data_dir)?;
    let name = identity.name.clone();
    let hosts = identity.hosts.clone();
    if let Some(warning) = crate::admin::cert_warning(identity.not_after) {
        tracing::warn!("{warning}");
    }
    if let Some(spec) = config.services.iter().find(|s| !hosts.allows(&s.name)) {
        return Err(StartError::NotInCertificate {
            id: spec.id.clone(),
            service: spec.name.clone(),
            hosts,
        });
    }
    let bound = sockets
        .udp
        .local_addr()
        .map_err(|source| StartError::Bind {
            key: "bind",
            addr: config.bind,
            source,
        })?;
    let admin_addr = sockets
        .admin
        .local_addr()
        .map_err(|source| StartError::Bind {
            key: "admin",
            addr: config.admin,
            source,
        })?;
    let proxy_addr = sockets
        .proxy
        .local_addr()
        .map_err(|source| StartError::Bind {
            key: "proxy",
            addr: config.proxy.listen,
            source,
        })?;
    let advertise = config
        .advertise
        .unwrap_or_else(|| advertise_for(bound, &config.seeds));
    // The QUIC listener is not among them: it is UDP, and services are
    // reached over TCP, so a service may use the same port number.
    let mut own = vec![("admin API", admin_addr), ("proxy", proxy_addr)];
    own.extend(
        sockets
            .ingress
            .addresses()
            .into_iter()
            .map(|a| ("gateway", a)),
    );
    let listeners = AgentListeners(own);
    // Upstream listeners too: a service at one would have each connection
    // to it proxied back to it. The admin API checks the live ones.
    let mut at_start = listeners.clone();
    at_start
        .0
        .extend(config.upstreams.iter().map(|u| ("upstream", u.listen)));
    for (i, spec) in config.services.iter().enumerate() {
        at_start
            .check(spec)
            .map_err(|e| StartError::Service(format!("service[{i}].{}: {}", e.field, e.problem)))?;
    }

    // A generation that beats every earlier run of this node, even when the
    // data dir was lost (then wall-clock milliseconds win).
    let saved = store.load_state();
    let generation = (saved.generation + 1).max(unix_millis());
    store.save_state(&SavedState {
        generation,
        members: saved.members.clone(),
    })?;

    // QUIC's idle timeout only backs up the cache, which closes idle
    // connections itself: it must not fire first.
    let transport_config = TransportConfig {
        idle_timeout: TransportConfig::default()
            .idle_timeout
            .max(config.peer_links.idle + std::time::Duration::from_secs(30)),
        loopback_mtu: config.loopback_mtu,
        ..TransportConfig::default()
    };
    let documents = Arc::new(crate::documents::Documents::open(
        &config.data_dir,
        identity.ca_cert.clone(),
        identity.trust_domain.clone(),
    )?);
    let (transport, queues) = Transport::bind(identity, transport_config, sockets.udp)?;
    // Revocations held from earlier runs are in force before any peer.
    transport.set_revoked(crate::certs::revoked_serials(&documents));
    let local = NodeId::new(name.clone(), advertise, generation)
        .expect("the certificate name was validated");
    if config.seeds.is_empty() && saved.members.is_empty() {
        info!("no seeds configured: starting a new mesh; others join through this node");
    }
    let plan = JoinPlan {
        has_seeds: !config.seeds.is_empty(),
        saved: mesh::saved_members(&saved, &name),
    };
    let epoch = tokio::time::Instant::now();
    let mut driver = Driver::new(
        local,
        &config.swim,
        config.catalog.clone(),
        plan,
        rand::random(),
        std::time::Duration::ZERO,
    )?;
    for (key, stamp) in documents.stamps() {
        driver.publish_doc(std::time::Duration::ZERO, key, stamp, false)?;
    }

    let tasks = Tasks::new();
    let counters = Arc::new(Counters::default());
    let (hosts_tx, hosts_rx) = tokio::sync::watch::channel(hosts);
    let (command_tx, command_rx) = mpsc::channel(256);
    let (catalog_task, catalog) = CatalogTask::new(
        name.clone(),
        config.services.clone(),
        store.clone(),
        tasks.clone(),
        hosts_rx,
    );
    let (mesh_task, snapshot, inbox) = MeshTask::new(
        driver,
        epoch,
        mesh::Wiring {
            transport: transport.clone(),
            datagrams: queues.datagrams,
            commands: command_rx,
            seeds: config.seeds.clone(),
            local_entry: catalog.shared.local.clone(),
            catalog: catalog.sender(),
            catalog_counters: catalog.shared.counters.clone(),
            counters: counters.clone(),
            store: store.clone(),
            documents: documents.clone(),
            tasks: tasks.clone(),
        },
    );
    tasks.spawn(mesh_task.run());
    tasks.spawn(mesh::links::tend(transport.clone(), config.peer_links));
    tasks.spawn(catalog_task.run());
    tasks.spawn(crate::memory::give_back());
    tasks.spawn(crate::certs::warn_before_expiry(
        transport.clone(),
        tasks.clone(),
    ));
    tasks.spawn(crate::certs::keep_identity(
        transport.clone(),
        crate::certs::Files::of(&config.tls, &name, &config.data_dir),
        hosts_tx,
        counters.clone(),
        tasks.clone(),
    ));
    tasks.spawn(crate::certs::keep_revocations(
        transport.clone(),
        documents.clone(),
        tasks.clone(),
    ));
    let (metrics, proxy_metrics, listener_metrics, gateway_metrics) = Metrics::new(
        transport.clone(),
        counters,
        snapshot.clone(),
        catalog.shared.clone(),
        documents.clone(),
    );
    let proxy = Proxy::new(
        config.proxy.clone(),
        transport.clone(),
        catalog.shared.clone(),
        snapshot.clone(),
        documents.clone(),
        proxy_metrics,
        tasks.clone(),
    );
    if let Some(log) = crate::observe::access::AccessLog::start(
        &config.access_log,
        proxy.metrics.access_log_dropped.clone(),
        &tasks,
    )
    .map_err(StartError::Service)?
    {
        proxy.set_access_log(log);
    }
    if let Some(tracer) = crate::observe::trace::Tracer::start(
        &config.tracing,
        &name,
        proxy.metrics.trace.clone(),
        &tasks,
    )
    .map_err(StartError::Service)?
    {
        proxy.set_tracer(tracer);
    }
    tasks.spawn(crate::events::source::run(
        proxy.events.clone(),
        snapshot.clone(),
        catalog.shared.catalog.clone(),
        documents.clone(),
        tasks.clone(),
    ));
    for handler in config.watches.clone() {
        let (tx, rx) = mpsc::channel(1024);
        let mut followed =
            crate::events::follow(proxy.events.clone(), None, handler.filter.clone());
        let stop = tasks.clone();
        tasks.spawn(async move {
            loop {
                let next = tokio::select! {
                    next = followed.recv() => next,
                    () = stop.stopped() => return,
                };
                match next {
                    None => return,
                    Some(None) => {}
                    Some(Some(event)) => {
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        tasks.spawn(async move {
            handler
                .run(rx, |event, folded, outcome| {
                    crate::events::watch::log_outcome(&handler, event, folded, outcome);
                })
                .await;
        });
    }
    tasks.spawn(dispatch_streams(
        queues.streams,
        catalog.clone(),
        proxy.clone(),
        documents.clone(),
        inbox,
        tasks.clone(),
    ));

    let (proxy_cap, admin_cap) = connection_caps(&config.limits);
    let upstreams = crate::upstreams::Upstreams::start(
        proxy.clone(),
        store.clone(),
        &config.upstreams,
        config.limits.for_listener(proxy_cap),
        listener_metrics.clone(),
        tasks.clone(),
    )
    .await
    .map_err(|source| StartError::Upstream {
        service: match &source {
            crate::upstreams::UpstreamError::Bind { addr, .. } => config
                .upstreams
                .iter()
                .find(|u| u.listen == *addr)
                .map_or_else(String::new, |u| u.service.clone()),
            _ => String::new(),
        },
        source,
    })?;
    let leave = Arc::new(Notify::new());
    let admin_state = Arc::new(AdminState {
        documents: documents.clone(),
        commands: command_tx.clone(),
        snapshot: snapshot.clone(),
        metrics,
        proxy: proxy.clone(),
        catalog: catalog.clone(),
        transport: transport.clone(),
        fault_injection: config.fault_injection,
        has_seeds: !config.seeds.is_empty(),
        leave: leave.clone(),
        token: config.admin_token.clone(),
        listeners: listeners.clone(),
        upstreams,
    });
    let in_flight = proxy.metrics.active.clone();
    sockets
        .ingress
        .serve(
            config.ingress.clone(),
            proxy.clone(),
            documents.clone(),
            gateway_metrics,
            listener_metrics.clone(),
            tasks.clone(),
        )
        .map_err(|e| StartError::Service(format!("ingress: {e}")))?;
    tasks.spawn(crate::proxy::outbound::serve(
        sockets.proxy,
        proxy,
        config.limits.for_listener(proxy_cap),
        listener_metrics.clone(),
        tasks.clone(),
    ));
    tasks.spawn(admin::serve(
        sockets.admin,
        admin_state,
        config.limits.for_listener(admin_cap),
        listener_metrics.clone(),
        tasks.clone(),
    ));

    let info = AgentInfo {
        name: &name,
        pid: std::process::id(),
        quic: bound,
        advertise,
        admin: admin_addr,
        proxy: proxy_addr,
        generation,
    };
    store.write_atomic(
        "agent.json",
        &serde_json::to_vec_pretty(&info).expect("serializable"),
    )?;
    info!(
        node = %name, quic = %bound, %advertise, admin = %admin_addr, proxy = %proxy_addr, generation,
        seeds = ?config.seeds, data_dir = %store.dir().display(), "agent started"
    );

    tokio::select! {
        () = shutdown => info!("shutting down: leaving the mesh"),
        () = leave.notified() => info!("leave requested through the admin API"),
    }

    // 1. Stop accepting: the listeners close, and open connections are
    //    asked to close once their requests are answered.
    tasks.begin_drain();
    // 2. Leave: peers hear it at once and fail new requests over to other
    //    instances; requests already here still finish.
    let (done_tx, done_rx) = oneshot::channel();
    if command_tx.send(Command::Leave(done_tx)).await.is_ok() {
        let _ = tokio::time::timeout(CLOSE_DEADLINE, done_rx).await;
    }
    tokio::time::sleep(LEAVE_GRACE).await;
    // 3. Let requests in flight finish, within the grace period.
    let grace = config.proxy.shutdown_grace;
    let drained = tokio::time::timeout(grace, async {
        while in_flight.get() > 0 || listener_metrics.open("proxy") > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    if drained.is_err() {
        warn!(
            in_flight = in_flight.get(),
            ?grace,
            "requests still in flight at the end of shutdown_grace are cut"
        );
    }
    // 4. Stop every task and wait for them, then close the endpoint.
    drop(command_tx);
    let running = tasks.stop_and_wait(CLOSE_DEADLINE).await;
    if running > 0 {
        warn!(running, "some tasks did not stop in time");
    }
    transport.close(CLOSE_DEADLINE).await;
    store.remove("agent.json");
    info!("stopped");
    Ok(())
}

/// Descriptors kept for everything but client connections: the data dir,
/// health checks, the UDP socket, logs.
const RESERVED_FDS: u64 = 128;

/// The proxy and admin connection caps, lowered so that both listeners at
/// their caps (a proxied connection may hold a second descriptor for its
/// pooled upstream connection) still fit the open-file limit: running out
/// of descriptors would stop every listener, `/health` included.
fn connection_caps(limits: &crate::listener::LimitsConfig) -> (usize, usize) {
    let Some(nofile) = crate::listener::open_file_limit() else {
        return (limits.proxy_max_connections, limits.admin_max_connections);
    };
    let budget = nofile.saturating_sub(RESERVED_FDS).max(64);
    let admin = limits
        .admin_max_connections
        .min((budget / 8).max(8) as usize);
    let proxy_budget = ((budget - admin as u64) / 2).max(16) as usize;
    let proxy = limits.proxy_max_connections.min(proxy_budget);
    if proxy < limits.proxy_max_connections {
        warn!(
            open_file_limit = nofile,
            configured = limits.proxy_max_connections,
            proxy_max_connections = proxy,
            "proxy connection cap lowered to fit the open-file limit (raise it with `ulimit -n` or LimitNOFILE=)"
        );
    }
    (proxy, admin)
}

/// How long a peer may take to say what a new stream is for.
const STREAM_KIND_TIMEOUT: Duration = Duration::from_secs(5);

/// Routes inbound streams by their first byte; unknown kinds are refused
/// at once so the opener gets an error rather than a hang.
async fn dispatch_streams(
    mut streams: mpsc::Receiver<Inbound>,
    catalog: CatalogHandle,
    proxy: Arc<Proxy>,
    documents: Arc<crate::documents::Documents>,
    inbox: MeshInbox,
    tasks: Tasks,
) {
    loop {
        let item = tokio::select! {
            item = streams.recv() => item,
            () = tasks.stopped() => return,
        };
        let Some(Inbound::Stream {
            from,
            mut send,
            mut recv,
        }) = item
        else {
            if item.is_none() {
                return;
            }
            continue;
        };
        let catalog = catalog.clone();
        let proxy = proxy.clone();
        let inbox = inbox.clone();
        let documents = documents.clone();
        // Each kind's future is boxed, and built in its box: the task is
        // spawned per stream, and the largest of them (a proxied request)
        // would otherwise be copied whole, for every kind, at every move.
        tasks.spawn(async move {
                let mut kind = [0u8; 1];
                let read =
                    tokio::time::timeout(STREAM_KIND_TIMEOUT, recv.read_exact(&mut kind)).await;
                match (read, kind[0]) {
                    (Ok(Ok(())), crate::proxy::wire::STREAM_PROXY) => {
                        crate::tasks::boxed(|| crate::proxy::inbound::serve(from, send, recv, proxy)).await;
                    }
                    (Ok(Ok(())), crate::proxy::tcp::STREAM_TCP) => {
                        crate::tasks::boxed(|| crate::proxy::tcp::serve_stream(from, send, recv, proxy)).await;
                    }
                    (Ok(Ok(())), mesh::sync::STREAM_MEMBERS) => {
                        crate::tasks::boxed(|| mesh::sync::serve(from, send, recv, inbox.sync)).await;
                    }
                    (Ok(Ok(())), crate::catalog::sync::STREAM_CATALOG) => {
                        crate::tasks::boxed(|| crate::catalog::sync::serve(
                            from,
                            send,
                            recv,
                            catalog.shared.clone(),
                            inbox.catalog,
                        ))
                        .await;
                    }
                    (Ok(Ok(())), crate::observe::stats::STREAM_STATS) => {
                        crate::tasks::boxed(|| crate::observe::stats::serve(from, send, recv, proxy.stats().clone())).await;
                    }
                    (Ok(Ok(())), crate::documents::sync::STREAM_DOCS) => {
                        crate::tasks::boxed(|| crate::documents::sync::serve(from, send, recv, documents, inbox.doc_lists))
                            .await;
                    }
                    _ => {
                        tracing::debug!(peer = %from, kind = kind[0], "unknown or silent stream refused");
                        let _ = send.reset(0u32.into());
                        let _ = recv.stop(0u32.into());
                    }
                }
        });
    }
}

/// The address peers should use when none is configured: the bound one,
/// or if bound to every interface, the local address that routes to the
/// first seed (learned without sending anything), else loopback.
fn advertise_for(bound: SocketAddr, seeds: &[String]) -> SocketAddr {
    if !bound.ip().is_unspecified() {
        return bound;
    }
    let routed = seeds.iter().find_map(|seed| {
        use std::net::ToSocketAddrs;
        let target = seed.to_socket_addrs().ok()?.next()?;
        let probe = UdpSocket::bind((bound.ip(), 0)).ok()?;
        probe.connect(target).ok()?;
        probe.local_addr().ok().map(|a| a.ip())
    });
    let ip = routed.unwrap_or_else(|| {
        if bound.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        }
    });
    SocketAddr::new(ip, bound.port())
}
