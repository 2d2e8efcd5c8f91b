//! The QUIC endpoint: one UDP socket, one cached connection per peer.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{Connection, ConnectionError, Endpoint, SendDatagramError, VarInt};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, trace};

use crate::pki::{self, MeshIdentity};
use crate::revocation::{self, Revocations};
use crate::stats::Stats;
use crate::stream::{self, Activity, Lease, RecvStream, SendStream};
use crate::tls;

/// The largest UDP payload accepted from a peer on another host (quinn's
/// path MTU discovery stops at 1,452 bytes there).
const MAX_UDP_PAYLOAD: u16 = 1500;
/// Where quinn's path MTU discovery stops by default.
const REMOTE_MTU: u16 = 1452;
/// Where every QUIC connection starts.
const INITIAL_MTU: u16 = 1200;

/// Ack-eliciting packets a peer may receive before it must acknowledge
/// them (QUIC's ACK frequency extension; quinn's default asks for every
/// second one). Agents that predate it simply keep the default.
const ACK_THRESHOLD: u32 = 9;
/// A connection whose peer opens its whole stream allowance within this
/// long gets a larger one (see `Transport::grow_streams`).
const BUSY_WINDOW: Duration = Duration::from_secs(10);
/// Close code for a connection the cache let go (idle, or over its cap).
const CLOSED_IDLE: u32 = 5;
/// Close code for a connection whose peer's certificate was revoked.
const CLOSED_REVOKED: u32 = 6;

/// Tunables of the transport.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// A connection without traffic for this long is closed by QUIC. This is
    /// only the backstop for a peer that vanished: the cache closes idle
    /// connections itself ([`Transport::close_idle`]), so keep this above
    /// the cache's idle time.
    pub idle_timeout: Duration,
    /// How long a dial (handshake included) may take.
    pub connect_timeout: Duration,
    /// The largest datagram accepted over the uni-stream fallback.
    pub max_datagram: usize,
    /// Inbound datagrams and streams queued for the agent before dropping.
    pub inbound_queue: usize,
    /// Datagrams held per peer while its connection is being made.
    pub pending_per_peer: usize,
    /// A connection carrying a stream gets a keep-alive (an empty datagram)
    /// once it has been silent this long, so that a quiet stream (a
    /// WebSocket, a gRPC watch) outlives `idle_timeout`; see
    /// [`Transport::keep_streams_alive`]. Connections without streams get
    /// none: at 200 peers, QUIC keep-alives on every cached connection
    /// made up most of an idle agent's wake-ups.
    pub keep_alive: Duration,
    /// Concurrent streams a peer may open on a new connection. Each one
    /// allowed costs memory up front, and most connections only carry
    /// SWIM, so this starts small and doubles (up to `max_streams`) while
    /// more than half are in use, or each time the peer opens a whole
    /// allowance within 10 s.
    pub initial_streams: u32,
    /// The most concurrent streams a peer may open on one connection.
    pub max_streams: u32,
    /// Handshakes this node starts at once; more dials wait their turn, so
    /// a join or a heal cannot make it dial every member at the same time.
    pub dials_at_once: usize,
    /// TLS sessions kept for resumption (one per peer recently talked to).
    pub resumable_sessions: usize,
    /// The UDP receive buffer asked of the kernel, in bytes. The kernel's
    /// usual default (208 KiB) holds about 90 packets: an agent that
    /// loses the CPU for a few milliseconds while its peers are busy (a
    /// join storm, a heal, many agents on few cores) overflows it, and
    /// the kernel drops what comes next. Lost SWIM datagrams are not
    /// resent, so a drop there can be a missed join or a false suspicion.
    /// The kernel caps the size at `net.core.rmem_max`; the memory is
    /// only used while packets wait.
    pub udp_receive_buffer: usize,
    /// The UDP payload sent on a connection to a peer on this host (a
    /// loopback address, whose path takes 64 KiB), after one probe at
    /// that size. Eleven times fewer packets than at Ethernet's 1,452
    /// bytes is that much less of quinn's per-packet work (framing,
    /// acknowledgements, a seal and an open) in a bulk transfer. Such
    /// connections send without segmentation offload: quinn keeps a send
    /// buffer per connection as large as its largest burst (one packet
    /// without offload, ten with it), and the kernel refuses an offloaded
    /// burst over 64 KiB. Peers on other hosts keep quinn's defaults
    /// (discovery up to 1,452 bytes, offload on); at 1,452 or less, so do
    /// peers on this host.
    pub loopback_mtu: u16,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(330),
            connect_timeout: Duration::from_secs(5),
            max_datagram: 64 * 1024,
            inbound_queue: 4096,
            pending_per_peer: 32,
            keep_alive: Duration::from_secs(30),
            initial_streams: 32,
            max_streams: 1024,
            dials_at_once: 8,
            resumable_sessions: 1024,
            udp_receive_buffer: 4 << 20,
            loopback_mtu: 16 * 1024,
        }
    }
}

/// Something a peer sent us. `from` is the node name in its certificate.
#[derive(Debug)]
pub enum Inbound {
    /// A datagram (SWIM).
    Datagram {
        /// Certified sender.
        from: String,
        /// Payload.
        data: Bytes,
    },
    /// A bidirectional stream the peer opened.
    Stream {
        /// Certified sender.
        from: String,
        /// Our sending half.
        send: SendStream,
        /// Our receiving half.
        recv: RecvStream,
    },
}

/// The queues a transport delivers into.
#[derive(Debug)]
pub struct Receivers {
    /// Datagrams ([`Inbound::Datagram`]).
    pub datagrams: mpsc::Receiver<Inbound>,
    /// Bidirectional streams ([`Inbound::Stream`]).
    pub streams: mpsc::Receiver<Inbound>,
}

/// Why a connection or stream could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The endpoint could not start a connection.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: quinn::ConnectError,
    },
    /// The handshake failed.
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// Where.
        addr: SocketAddr,
        /// Why.
        source: ConnectionError,
    },
    /// No answer in time.
    #[error("no answer from {0} in time")]
    Timeout(SocketAddr),
    /// The peer's certificate is not acceptable.
    #[error("peer at {addr} refused: {reason}")]
    Identity {
        /// Where.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// We dialed ourselves (a seed list that includes this node).
    #[error("{0} is this node")]
    SelfConnection(SocketAddr),
    /// Traffic to this peer is cut by fault injection.
    #[error("traffic to {0} is blocked by fault injection")]
    Blocked(String),
    /// Opening a stream failed.
    #[error("stream to {peer} failed: {source}")]
    Stream {
        /// Peer name.
        peer: String,
        /// Why.
        source: ConnectionError,
    },
    /// Socket setup failed.
    #[error("cannot start the QUIC endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// TLS setup failed.
    #[error("TLS configuration: {0}")]
    Tls(String),
}

/// A connection and its use.
#[derive(Clone)]
struct Cached {
    conn: Connection,
    activity: Arc<Activity>,
    /// The services the peer's certificate lets it host.
    hosts: Arc<pki::Hosts>,
}

enum Slot {
    Ready(Cached),
    Dialing(Vec<Bytes>),
}

/// An open connection, duplicates included.
struct Live {
    cached: Cached,
    peer: String,
    established: Instant,
    /// The serial number of the peer's certificate.
    serial: Vec<u8>,
}

/// UDP traffic of all connections, open and closed, since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpTotals {
    /// Bytes received, QUIC and TLS overhead included.
    pub bytes_in: u64,
    /// Bytes sent, QUIC and TLS overhead included.
    pub bytes_out: u64,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Datagrams sent (a segmentation-offload batch counts each segment).
    pub datagrams_out: u64,
}

/// One open connection, as the cache policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    /// Handle for [`Transport::close_idle`].
    pub id: usize,
    /// The peer's node name.
    pub peer: String,
    /// When a datagram or stream last moved on it, on [`Transport::clock`].
    pub last_active: Duration,
    /// Streams open on it.
    pub streams: usize,
    /// Whether new traffic to the peer uses it.
    pub primary: bool,
}

struct Inner {
    endpoint: Endpoint,
    /// This node's name (fixed: a new certificate must carry it too).
    name: String,
    trust_domain: String,
    /// The certificate in use; replaced by [`Transport::reload_identity`].
    identity: RwLock<Arc<MeshIdentity>>,
    /// What new connections use (follows the identity).
    quic_configs: RwLock<QuicConfigs>,
    quic: Quic,
    revoked: Arc<Revocations>,
    config: TransportConfig,
    epoch: Instant,
    peers: Mutex<HashMap<String, Slot>>,
    /// Every open connection, duplicates included.
    live: Mutex<HashMap<usize, Live>>,
    dials: Semaphore,
    inbound: mpsc::Sender<Inbound>,
    streams: mpsc::Sender<Inbound>,
    blocked: RwLock<HashSet<String>>,
    /// The socket's receive buffer as the kernel reported it.
    udp_receive_buffer: usize,
    stats: Stats,
}

/// The node's QUIC transport. Cheap to clone.
#[derive(Clone)]
pub struct Transport(Arc<Inner>);

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("name", &self.0.name)
            .field("local_addr", &self.0.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Asks the kernel for a UDP receive buffer of `want` bytes and returns
/// the size it reports. Less than asked is logged, not an error: the
/// socket works, it only drops sooner under bursts.
fn size_receive_buffer(socket: &std::net::UdpSocket, want: usize) -> usize {
    let sock = socket2::SockRef::from(socket);
    let before = sock.recv_buffer_size().unwrap_or(0);
    if want <= before {
        return before;
    }
    if let Err(e) = sock.set_recv_buffer_size(want) {
        debug!(error = %e, "UDP receive buffer not resized");
        return before;
    }
    // Linux reports twice what it grants (the other half is bookkeeping)
    // and grants at most `net.core.rmem_max`.
    let got = sock.recv_buffer_size().unwrap_or(0);
    if got < want {
        info!(
            asked = want,
            granted = got,
            "UDP receive buffer smaller than asked (raise net.core.rmem_max); bursts may drop SWIM datagrams"
        );
    } else {
        debug!(granted = got, "UDP receive buffer");
    }
    got
}

impl Transport {
    /// Starts the endpoint on an already bound UDP socket. Returns the
    /// transport and the queues of what peers send: datagrams (for the
    /// membership task) and streams (for whoever serves them), kept apart so
    /// a busy stream consumer never delays SWIM and the other way round.
    pub fn bind(
        identity: MeshIdentity,
        config: TransportConfig,
        socket: std::net::UdpSocket,
    ) -> Result<(Self, Receivers), TransportError> {
        let quic = Quic::new(&config)?;

        let stats = Stats::default();
        let revoked = Arc::new(Revocations::default());
        let (server, configs) = quic_configs(&identity, &quic, &stats, &config, &revoked)?;

        let udp_receive_buffer = size_receive_buffer(&socket, config.udp_receive_buffer);
        let runtime = quinn::default_runtime()
            .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        // Also what peers are told they may send, and what the receive
        // buffer is sized from: quinn's own default (64 KiB) wasted memory
        // where no path takes more than 1,500 bytes.
        endpoint_config
            .max_udp_payload_size(MAX_UDP_PAYLOAD.max(config.loopback_mtu))
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let socket = crate::socket::Socket::new(socket)?;
        let endpoint =
            Endpoint::new_with_abstract_socket(endpoint_config, Some(server), socket, runtime)?;

        let (tx, rx) = mpsc::channel(config.inbound_queue);
        let (streams_tx, streams_rx) = mpsc::channel(config.inbound_queue);
        let inner = Arc::new(Inner {
            endpoint,
            name: identity.name.clone(),
            trust_domain: identity.trust_domain.clone(),
            identity: RwLock::new(Arc::new(identity)),
            quic_configs: RwLock::new(configs),
            quic,
            revoked,
            dials: Semaphore::new(config.dials_at_once.max(1)),
            config,
            epoch: Instant::now(),
            peers: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            inbound: tx,
            streams: streams_tx,
            blocked: RwLock::new(HashSet::new()),
            udp_receive_buffer,
            stats,
        });
        let this = Self(inner);
        tokio::spawn(this.clone().accept_loop());
        Ok((
            this,
            Receivers {
                datagrams: rx,
                streams: streams_rx,
            },
        ))
    }

    /// The UDP socket's receive buffer, as the kernel reported it after
    /// [`TransportConfig::udp_receive_buffer`] was asked for.
    pub fn udp_receive_buffer(&self) -> usize {
        self.0.udp_receive_buffer
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.endpoint.local_addr()
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.0.stats
    }

    /// UDP datagrams and bytes on the wire by all connections so far.
    pub fn udp_totals(&self) -> UdpTotals {
        let stats = &self.0.stats;
        let mut t = UdpTotals {
            bytes_in: Stats::get(&stats.udp_in_closed),
            bytes_out: Stats::get(&stats.udp_out_closed),
            datagrams_in: Stats::get(&stats.datagrams_in_closed),
            datagrams_out: Stats::get(&stats.datagrams_out_closed),
        };
        let live = self.0.live.lock().unwrap_or_else(|e| e.into_inner());
        for l in live.values() {
            let s = l.cached.conn.stats();
            t.bytes_in += s.udp_rx.bytes;
            t.bytes_out += s.udp_tx.bytes;
            t.datagrams_in += s.udp_rx.datagrams;
            t.datagrams_out += s.udp_tx.datagrams;
        }
        t
    }

    /// Open connections, duplicates included (two peers may dial each
    /// other at once; both connections live until one idles out).
    pub fn connections(&self) -> usize {
        self.live().len()
    }

    /// The transport's clock: time since it started.
    pub fn clock(&self) -> Duration {
        self.0.epoch.elapsed()
    }

    /// Every open connection and its use, for the cache policy.
    pub fn links(&self) -> Vec<LinkInfo> {
        let primary: HashSet<usize> = self
            .peers()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(c.conn.stable_id()),
                Slot::Dialing(_) => None,
            })
            .collect();
        self.live()
            .iter()
            .map(|(&id, l)| LinkInfo {
                id,
                peer: l.peer.clone(),
                last_active: l.cached.activity.last().duration_since(self.0.epoch),
                streams: l.cached.activity.streams(),
                primary: primary.contains(&id),
            })
            .collect()
    }

    /// The largest UDP payload the connection to `peer` sends now, as path
    /// MTU discovery found it (see [`TransportConfig::loopback_mtu`]).
    pub fn path_mtu(&self, peer: &str) -> Option<u16> {
        Some(self.connection_stats(peer)?.path.current_mtu)
    }

    /// quinn's counters for the connection to `peer` (packets, frames by
    /// type, path), if one is up.
    pub fn connection_stats(&self, peer: &str) -> Option<quinn::ConnectionStats> {
        match self.peers().get(peer)? {
            Slot::Ready(c) => Some(c.conn.stats()),
            Slot::Dialing(_) => None,
        }
    }

    /// Closes these connections (from [`Transport::links`]) unless a stream
    /// opened or traffic moved on them since. The next datagram or stream
    /// to their peer dials again (a resumed TLS handshake).
    pub fn close_idle(&self, links: &[LinkInfo]) {
        let closing: Vec<(String, Connection)> = {
            let live = self.live();
            links
                .iter()
                .filter_map(|info| {
                    let l = live.get(&info.id)?;
                    let a = &l.cached.activity;
                    let still = a.streams() == 0
                        && a.last().duration_since(self.0.epoch) <= info.last_active;
                    still.then(|| (l.peer.clone(), l.cached.conn.clone()))
                })
                .collect()
        };
        for (peer, conn) in closing {
            self.forget(&peer, &conn);
            trace!(%peer, "closing an idle connection");
            Stats::add(&self.0.stats.idle_closed, 1);
            conn.close(CLOSED_IDLE.into(), b"idle");
        }
    }

    /// Sends a keep-alive on every connection that carries a stream and has
    /// been silent for [`TransportConfig::keep_alive`]. Call it about once a
    /// second.
    pub fn keep_streams_alive(&self) {
        let quiet: Vec<Cached> = {
            let since = Instant::now()
                .checked_sub(self.0.config.keep_alive)
                .unwrap_or(self.0.epoch);
            self.live()
                .values()
                .filter(|l| l.cached.activity.streams() > 0 && l.cached.activity.last() < since)
                .map(|l| l.cached.clone())
                .collect()
        };
        for cached in quiet {
            cached.activity.touch();
            if cached.conn.send_datagram(Bytes::new()).is_ok() {
                Stats::add(&self.0.stats.keep_alives, 1);
            }
        }
    }

    /// Names of peers with an open connection.
    pub fn connected_peers(&self) -> Vec<String> {
        let peers = self.peers();
        let mut out: Vec<String> = peers
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready(c) if c.conn.close_reason().is_none()))
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }

    /// Sends a datagram to node `name` at `addr`, dialing it if needed. Never
    /// blocks: if no connection is ready the datagram waits (bounded) for
    /// the dial, and is dropped if it fails.
    pub fn send_datagram(&self, name: &str, addr: SocketAddr, data: Bytes) {
        if self.is_blocked(name) {
            Stats::add(&self.0.stats.fault_drops, 1);
            return;
        }
        let mut peers = self.peers();
        match peers.get_mut(name) {
            Some(Slot::Ready(cached)) => {
                let cached = cached.clone();
                drop(peers);
                self.send_on(name, addr, &cached, data);
            }
            Some(Slot::Dialing(pending)) => {
                if pending.len() < self.0.config.pending_per_peer {
                    pending.push(data);
                } else {
                    Stats::add(&self.0.stats.outbound_dropped, 1);
                }
            }
            None => {
                peers.insert(name.to_owned(), Slot::Dialing(vec![data]));
                drop(peers);
                let this = self.clone();
                let name = name.to_owned();
                tokio::spawn(async move {
                    if let Err(e) = this.dial(addr, Some(&name)).await {
                        debug!(peer = %name, %addr, error = %e, "dial failed");
                        let mut peers = this.peers();
                        if let Some(Slot::Dialing(pending)) = peers.remove(&name) {
                            Stats::add(&this.0.stats.outbound_dropped, pending.len() as u64);
                        }
                    }
                });
            }
        }
    }

    fn send_on(&self, name: &str, addr: SocketAddr, cached: &Cached, data: Bytes) {
        let conn = &cached.conn;
        cached.activity.touch();
        let len = data.len() as u64;
        let fits = conn
            .max_datagram_size()
            .is_some_and(|max| data.len() <= max);
        if fits {
            match conn.send_datagram(data.clone()) {
                Ok(()) => {
                    Stats::add(&self.0.stats.datagrams_out, 1);
                    Stats::add(&self.0.stats.bytes_out, len);
                }
                Err(SendDatagramError::ConnectionLost(_)) => {
                    self.forget(name, conn);
                    self.send_datagram(name, addr, data);
                }
                Err(e) => {
                    debug!(peer = name, error = %e, "datagram not sent");
                    Stats::add(&self.0.stats.outbound_dropped, 1);
                }
            }
            return;
        }
        // Too big for one QUIC datagram on this path: carry it on a uni
        // stream instead (ordered and reliable, which SWIM does not mind).
        let conn = conn.clone();
        let stats = self.clone();
        tokio::spawn(async move {
            let sent = async {
                let mut send = conn.open_uni().await.ok()?;
                send.write_all(&data).await.ok()?;
                send.finish().ok()
            }
            .await;
            if sent.is_some() {
                Stats::add(&stats.0.stats.datagrams_out, 1);
                Stats::add(&stats.0.stats.bytes_out, len);
            } else {
                Stats::add(&stats.0.stats.outbound_dropped, 1);
            }
        });
    }

    /// Dials a seed whose name we do not know: the certificate must come
    /// from our CA; its name is returned.
    pub async fn connect_seed(&self, addr: SocketAddr) -> Result<String, TransportError> {
        let conn = self.dial(addr, None).await?;
        pki::node_identity(
            &peer_cert(&conn.conn).ok_or_else(|| TransportError::Identity {
                addr,
                reason: "no certificate".into(),
            })?,
        )
        .map(|(_, name)| name)
        .ok_or(TransportError::Identity {
            addr,
            reason: "no node name in certificate".into(),
        })
    }

    /// Opens a bidirectional stream to node `name` at `addr`.
    pub async fn open_bi(
        &self,
        name: &str,
        addr: SocketAddr,
    ) -> Result<(SendStream, RecvStream), TransportError> {
        if self.is_blocked(name) {
            Stats::add(&self.0.stats.fault_drops, 1);
            return Err(TransportError::Blocked(name.to_owned()));
        }
        let ready = match self.peers().get(name) {
            Some(Slot::Ready(c)) if c.conn.close_reason().is_none() => Some(c.clone()),
            _ => None,
        };
        let cached = match ready {
            Some(c) => c,
            None => self.dial(addr, Some(name)).await?,
        };
        // Leased before the stream exists, so the cache cannot close the
        // connection while we wait for the peer's stream credit.
        let (lease, _) = Lease::take(&cached.activity);
        let halves = cached
            .conn
            .open_bi()
            .await
            .map_err(|source| TransportError::Stream {
                peer: name.to_owned(),
                source,
            })?;
        Ok(stream::leased(halves, lease))
    }

    /// The certificate in use.
    pub fn identity(&self) -> Arc<MeshIdentity> {
        self.0
            .identity
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The services this node's own certificate lets it host.
    pub fn hosts(&self) -> pki::Hosts {
        self.identity().hosts.clone()
    }

    /// When this node's own certificate expires.
    pub fn cert_not_after(&self) -> std::time::SystemTime {
        self.identity().not_after
    }

    /// Switches to a new certificate and key (rotation). New handshakes,
    /// both ways, present it; connections already open stay up with the
    /// certificate they were made with. The new certificate must name
    /// this node in the same trust domain.
    pub fn reload_identity(&self, identity: MeshIdentity) -> Result<(), TransportError> {
        if identity.name != self.0.name || identity.trust_domain != self.0.trust_domain {
            return Err(TransportError::Tls(format!(
                "the new certificate is for {} in {}, not {} in {}",
                identity.name, identity.trust_domain, self.0.name, self.0.trust_domain
            )));
        }
        let (server, configs) = quic_configs(
            &identity,
            &self.0.quic,
            &self.0.stats,
            &self.0.config,
            &self.0.revoked,
        )?;
        self.0.endpoint.set_server_config(Some(server));
        *self
            .0
            .quic_configs
            .write()
            .unwrap_or_else(|e| e.into_inner()) = configs;
        *self.0.identity.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(identity);
        Stats::add(&self.0.stats.cert_reloads, 1);
        Ok(())
    }

    /// The revoked certificates in force, and the peers refused for one.
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.0.revoked
    }

    /// Puts a new set of revoked serial numbers in force: handshakes with
    /// them are refused from now on, and connections already open with one
    /// are closed at once. Returns the peers cut off.
    pub fn set_revoked(&self, serials: HashSet<Vec<u8>>) -> Vec<String> {
        if !self.0.revoked.set(serials) {
            return Vec::new();
        }
        let cut: Vec<(String, Vec<u8>, Connection)> = self
            .live()
            .values()
            .filter(|l| self.0.revoked.contains(&l.serial))
            .map(|l| (l.peer.clone(), l.serial.clone(), l.cached.conn.clone()))
            .collect();
        let mut names = Vec::new();
        for (peer, serial, conn) in cut {
            self.0.revoked.note(&peer, &serial);
            self.forget(&peer, &conn);
            conn.close(CLOSED_REVOKED.into(), b"certificate revoked");
            Stats::add(&self.0.stats.revocation_cutoffs, 1);
            if !names.contains(&peer) {
                names.push(peer);
            }
        }
        names
    }

    /// The serial number (hex) of the certificate `name` presented on the
    /// connection to it now open.
    pub fn peer_serial(&self, name: &str) -> Option<String> {
        let id = match self.peers().get(name) {
            Some(Slot::Ready(c)) if c.conn.close_reason().is_none() => c.conn.stable_id(),
            _ => return None,
        };
        self.live()
            .get(&id)
            .map(|l| revocation::serial_hex(&l.serial))
    }

    /// The services the certificate of `name` lets it host, as proved on
    /// the connection to it now open (`None`: no connection).
    pub fn peer_hosts(&self, name: &str) -> Option<Arc<pki::Hosts>> {
        match self.peers().get(name) {
            Some(Slot::Ready(c)) if c.conn.close_reason().is_none() => Some(c.hosts.clone()),
            _ => None,
        }
    }

    /// Closes the connections to `name` that carry streams (SWIM declared
    /// it down): requests in flight on them fail at once instead of
    /// waiting for a timeout. A connection carrying only SWIM stays: if the
    /// verdict was wrong (this node was starved of CPU, say), the peer's
    /// refutation arrives on it without a new handshake; if it was right,
    /// the connection idles out like any other.
    pub fn disconnect(&self, name: &str) {
        let busy: Vec<Connection> = self
            .live()
            .values()
            .filter(|l| l.peer == name && l.cached.activity.streams() > 0)
            .map(|l| l.cached.conn.clone())
            .collect();
        for conn in busy {
            self.forget(name, &conn);
            conn.close(3u32.into(), b"peer declared down");
        }
    }

    /// Closes the connections with `name` established more than `age` ago:
    /// those of a process that has since restarted (its successor's
    /// connections are younger). Streams in flight on them fail at once,
    /// so callers fail over instead of waiting for a dead process.
    pub fn disconnect_older_than(&self, name: &str, age: Duration) {
        let Some(cutoff) = Instant::now().checked_sub(age) else {
            return;
        };
        let stale: Vec<Connection> = self
            .live()
            .values()
            .filter(|l| l.established < cutoff && l.peer == name)
            .map(|l| l.cached.conn.clone())
            .collect();
        for conn in stale {
            self.forget(name, &conn);
            debug!(peer = %name, "closing a connection to the process before a restart");
            conn.close(4u32.into(), b"peer restarted");
        }
    }

    /// Cuts (fault injection) all traffic to and from these peers.
    pub fn block(&self, names: impl IntoIterator<Item = String>) {
        self.0
            .blocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .extend(names);
    }

    /// Restores traffic to every peer.
    pub fn unblock_all(&self) {
        self.0
            .blocked
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Peers currently cut off by fault injection.
    pub fn blocked(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .0
            .blocked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        v.sort();
        v
    }

    fn is_blocked(&self, name: &str) -> bool {
        self.0
            .blocked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(name)
    }

    /// Closes every connection and waits (up to `deadline`) for the peers to
    /// acknowledge.
    pub async fn close(&self, deadline: Duration) {
        self.0.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(deadline, self.0.endpoint.wait_idle()).await;
    }

    fn peers(&self) -> MutexGuard<'_, HashMap<String, Slot>> {
        // The map stays consistent across a panic in a holder.
        self.0.peers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> MutexGuard<'_, HashMap<usize, Live>> {
        self.0.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, name: &str, conn: &Connection) {
        let mut peers = self.peers();
        if matches!(peers.get(name), Some(Slot::Ready(c)) if c.conn.stable_id() == conn.stable_id())
        {
            peers.remove(name);
        }
    }

    async fn dial(
        &self,
        addr: SocketAddr,
        expected: Option<&str>,
    ) -> Result<Cached, TransportError> {
        let server_name = expected.unwrap_or(tls::SEED_SERVER_NAME);
        // Waiting for a turn counts against the connect timeout: a dial
        // that cannot start in time fails like one that cannot finish.
        let handshake = async {
            let _turn = self.0.dials.acquire().await;
            let client = self.quic_configs().client(addr).clone();
            self.0
                .endpoint
                .connect_with(client, addr, server_name)
                .map_err(|source| TransportError::Connect { addr, source })?
                .await
                .map_err(|source| {
                    Stats::add(&self.0.stats.handshake_failures, 1);
                    warn_if_expired(addr, &source);
                    TransportError::Handshake { addr, source }
                })
        };
        let conn = match tokio::time::timeout(self.0.config.connect_timeout, handshake).await {
            Ok(Ok(conn)) => {
                Stats::add(&self.0.stats.handshakes_out, 1);
                conn
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(TransportError::Timeout(addr)),
        };
        let (_, cached) = self.register(conn, expected)?;
        Ok(cached)
    }

    fn quic_configs(&self) -> std::sync::RwLockReadGuard<'_, QuicConfigs> {
        self.0
            .quic_configs
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn accept_loop(self) {
        while let Some(incoming) = self.0.endpoint.accept().await {
            let this = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let connecting = match this.quic_configs().server_local(remote) {
                    Some(local) => incoming.accept_with(local),
                    None => incoming.accept(),
                };
                match async { connecting?.await }.await {
                    Ok(conn) => {
                        Stats::add(&this.0.stats.handshakes_in, 1);
                        if let Err(e) = this.register(conn, None) {
                            debug!(%remote, error = %e, "inbound connection refused");
                        }
                    }
                    Err(e) => {
                        Stats::add(&this.0.stats.handshake_failures, 1);
                        warn_if_expired(remote, &e);
                        debug!(%remote, error = %e, "inbound handshake failed");
                    }
                }
            });
        }
    }

    /// Checks a fresh connection's certificate and caches it under the
    /// node name it proves.
    fn register(
        &self,
        conn: Connection,
        expected: Option<&str>,
    ) -> Result<(String, Cached), TransportError> {
        let addr = conn.remote_address();
        let refuse = |reason: String| {
            Stats::add(&self.0.stats.identity_rejections, 1);
            conn.close(1u32.into(), b"identity refused");
            Err(TransportError::Identity { addr, reason })
        };
        let cert = peer_cert(&conn);
        let Some((domain, name)) = cert.as_ref().and_then(pki::node_identity) else {
            return refuse("certificate carries no node identity".into());
        };
        let hosts = Arc::new(
            cert.as_ref()
                .map_or(pki::Hosts::Only(Vec::new()), pki::node_hosts),
        );
        if domain != self.0.trust_domain {
            return refuse(format!("trust domain {domain:?} is not ours"));
        }
        if let Some(expected) = expected
            && expected != name
        {
            return refuse(format!(
                "dialed {expected:?} but the certificate names {name:?}"
            ));
        }
        let serial = cert
            .as_ref()
            .and_then(revocation::serial_of)
            .unwrap_or_default();
        if self.0.revoked.contains(&serial) {
            // A resumed session skips the verifiers: this is where a
            // revoked certificate from a session ticket is caught.
            self.0.revoked.note(&name, &serial);
            Stats::add(&self.0.stats.identity_rejections, 1);
            conn.close(CLOSED_REVOKED.into(), b"certificate revoked");
            return Err(TransportError::Identity {
                addr,
                reason: format!(
                    "{name}'s certificate (serial {}) is revoked",
                    revocation::serial_hex(&serial)
                ),
            });
        }
        self.0.revoked.clear(&name);
        if name == self.0.name {
            conn.close(0u32.into(), b"self");
            return Err(TransportError::SelfConnection(addr));
        }
        if self.is_blocked(&name) {
            Stats::add(&self.0.stats.fault_drops, 1);
            conn.close(2u32.into(), b"blocked");
            return Err(TransportError::Blocked(name));
        }
        let cached = Cached {
            conn: conn.clone(),
            activity: Activity::new(self.0.epoch, self.0.config.initial_streams),
            hosts,
        };
        self.live().insert(
            conn.stable_id(),
            Live {
                cached: cached.clone(),
                peer: name.clone(),
                established: Instant::now(),
                serial,
            },
        );
        let previous = self
            .peers()
            .insert(name.clone(), Slot::Ready(cached.clone()));
        if let Some(Slot::Dialing(pending)) = previous {
            for data in pending {
                self.send_on(&name, addr, &cached, data);
            }
        }
        trace!(peer = %name, %addr, "connection ready");
        tokio::spawn(self.clone().drive(name.clone(), cached.clone()));
        Ok((name, cached))
    }

    /// Reads everything a peer sends on one connection until it closes.
    async fn drive(self, name: String, cached: Cached) {
        let Cached { conn, activity, .. } = &cached;
        loop {
            let inbound = tokio::select! {
                d = conn.read_datagram() => match d {
                    Ok(data) => {
                        activity.touch();
                        if data.is_empty() {
                            // A keep-alive: it has done its work.
                            continue;
                        }
                        Inbound::Datagram { from: name.clone(), data }
                    }
                    Err(_) => break,
                },
                u = conn.accept_uni() => match u {
                    Ok(mut recv) => {
                        let this = self.clone();
                        let name = name.clone();
                        tokio::spawn(async move {
                            match recv.read_to_end(this.0.config.max_datagram).await {
                                Ok(data) => this.deliver(Inbound::Datagram { from: name, data: data.into() }),
                                Err(e) => debug!(peer = %name, error = %e, "bad uni stream"),
                            }
                        });
                        continue;
                    }
                    Err(_) => break,
                },
                b = conn.accept_bi() => match b {
                    Ok(halves) => {
                        let (lease, open) = Lease::take(activity);
                        self.grow_streams(conn, activity, open);
                        let (send, recv) = stream::leased(halves, lease);
                        Inbound::Stream { from: name.clone(), send, recv }
                    }
                    Err(_) => break,
                },
            };
            self.deliver(inbound);
        }
        self.forget(&name, conn);
        self.live().remove(&conn.stable_id());
        let s = conn.stats();
        Stats::add(&self.0.stats.udp_in_closed, s.udp_rx.bytes);
        Stats::add(&self.0.stats.udp_out_closed, s.udp_tx.bytes);
        Stats::add(&self.0.stats.datagrams_in_closed, s.udp_rx.datagrams);
        Stats::add(&self.0.stats.datagrams_out_closed, s.udp_tx.datagrams);
        trace!(peer = %name, reason = ?conn.close_reason(), "connection closed");
    }

    /// Doubles the peer's stream allowance once more than half of it is in
    /// use, so a connection carrying real traffic is not held to the small
    /// first allowance; or once the peer has opened a whole allowance of
    /// streams within [`BUSY_WINDOW`], even one at a time. quinn grants
    /// more streams in a MAX_STREAMS frame each time an eighth of the
    /// allowance has closed, and at a steady rate that frame leaves in a
    /// packet of its own and wakes the peer: at 32 streams, one request in
    /// five on a data-plane connection; at 1,024, one in 129. Only busy
    /// connections grow, so a quiet one (SWIM and catalog exchanges) keeps
    /// the small allowance and the memory quinn holds for it.
    fn grow_streams(&self, conn: &Connection, activity: &Activity, open: usize) {
        let limit = activity
            .bidi_limit
            .load(std::sync::atomic::Ordering::Relaxed);
        if limit >= self.0.config.max_streams {
            return;
        }
        let busy = activity.opened_quickly(limit, BUSY_WINDOW.as_millis() as u64);
        if open * 2 <= limit as usize && !busy {
            return;
        }
        let grown = limit.saturating_mul(2).min(self.0.config.max_streams);
        activity
            .bidi_limit
            .store(grown, std::sync::atomic::Ordering::Relaxed);
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(grown));
    }

    fn deliver(&self, inbound: Inbound) {
        let from = match &inbound {
            Inbound::Datagram { from, .. } | Inbound::Stream { from, .. } => from,
        };
        if self.is_blocked(from) {
            Stats::add(&self.0.stats.fault_drops, 1);
            return;
        }
        if let Inbound::Datagram { data, .. } = &inbound {
            Stats::add(&self.0.stats.datagrams_in, 1);
            Stats::add(&self.0.stats.bytes_in, data.len() as u64);
        }
        let queue = match &inbound {
            Inbound::Datagram { .. } => &self.0.inbound,
            Inbound::Stream { .. } => &self.0.streams,
        };
        if queue.try_send(inbound).is_err() {
            Stats::add(&self.0.stats.inbound_dropped, 1);
        }
    }
}

/// The QUIC transport settings: one for peers on other hosts, one for
/// peers on this one (see [`TransportConfig::loopback_mtu`]).
struct Quic {
    remote: Arc<quinn::TransportConfig>,
    local: Arc<quinn::TransportConfig>,
}

impl Quic {
    fn new(config: &TransportConfig) -> Result<Self, TransportError> {
        let idle = config
            .idle_timeout
            .try_into()
            .map_err(|_| TransportError::Tls("idle timeout too large".into()))?;
        let settings = || {
            let mut quic = quinn::TransportConfig::default();
            quic.max_idle_timeout(Some(idle))
                .max_concurrent_bidi_streams(config.initial_streams.into())
                // Uni streams only carry SWIM datagrams too big for the path.
                .max_concurrent_uni_streams(8u32.into())
                .keep_alive_interval(None)
                .datagram_receive_buffer_size(Some(1 << 20))
                .datagram_send_buffer_size(1 << 20);
            // Request and response each end in a packet that carries the
            // other way's acknowledgements, so separate ACK packets are
            // mostly waste: ask the peer for one only after more than
            // `ACK_THRESHOLD` ack-eliciting packets (or its max_ack_delay,
            // 25 ms). A gap in packet numbers is still acknowledged at
            // once, so loss is noticed as soon as before.
            let mut acks = quinn::AckFrequencyConfig::default();
            acks.ack_eliciting_threshold(ACK_THRESHOLD.into());
            quic.ack_frequency_config(Some(acks));
            quic
        };
        let remote = Arc::new(settings());
        if config.loopback_mtu <= REMOTE_MTU {
            return Ok(Self {
                local: remote.clone(),
                remote,
            });
        }
        // A loopback path takes 64 KiB, so one probe at the bound is
        // enough: quinn's binary search up from 1,200 bytes sent about ten
        // probes of up to this size each way on every new connection, which
        // at 200 agents on one host cost 140 CPU-seconds more to form the
        // mesh. With a minimum change that large, the search goes straight
        // to the bound and stops there; if that probe is lost, the
        // connection keeps 1,200 bytes until the next search, 10 minutes
        // later. (Starting at the bound instead, with `initial_mtu`, made
        // every handshake on loopback time out with quinn 0.11.)
        let mut discovery = quinn::MtuDiscoveryConfig::default();
        discovery
            .upper_bound(config.loopback_mtu)
            .minimum_change(config.loopback_mtu - INITIAL_MTU);
        let mut local = settings();
        local
            .mtu_discovery_config(Some(discovery))
            .enable_segmentation_offload(false);
        Ok(Self {
            remote,
            local: Arc::new(local),
        })
    }
}

/// What new connections are made with; follows the node's identity.
struct QuicConfigs {
    client: quinn::ClientConfig,
    client_local: quinn::ClientConfig,
    /// For inbound connections from this host (the endpoint holds the
    /// one for everyone else).
    server_local: Option<Arc<quinn::ServerConfig>>,
}

impl QuicConfigs {
    fn client(&self, peer: SocketAddr) -> &quinn::ClientConfig {
        if is_local(peer) {
            &self.client_local
        } else {
            &self.client
        }
    }

    fn server_local(&self, peer: SocketAddr) -> Option<Arc<quinn::ServerConfig>> {
        self.server_local.clone().filter(|_| is_local(peer))
    }
}

fn is_local(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// The QUIC server configuration for `identity` (the endpoint's, for
/// peers on other hosts), and the rest.
fn quic_configs(
    identity: &MeshIdentity,
    quic: &Quic,
    stats: &Stats,
    config: &TransportConfig,
    revoked: &Arc<Revocations>,
) -> Result<(quinn::ServerConfig, QuicConfigs), TransportError> {
    let tls_err = |e: rustls::Error| TransportError::Tls(e.to_string());
    let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(
        tls::server_config(identity, stats.resumed.clone(), revoked.clone()).map_err(tls_err)?,
    )
    .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(quic.remote.clone());
    let server_local = (!Arc::ptr_eq(&quic.remote, &quic.local)).then(|| {
        let mut local = server.clone();
        local.transport_config(quic.local.clone());
        Arc::new(local)
    });

    let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(
        tls::client_config(identity, config.resumable_sessions, revoked.clone())
            .map_err(tls_err)?,
    )
    .map_err(|e| TransportError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(quic.remote.clone());
    let mut client_local = client.clone();
    client_local.transport_config(quic.local.clone());
    Ok((
        server,
        QuicConfigs {
            client,
            client_local,
            server_local,
        },
    ))
}

/// An expired or revoked certificate, ours as the peer saw it or the
/// peer's, is worth a warning: it will not fix itself. At most one every
/// 10 s, as a node cut off retries often.
fn warn_if_expired(addr: SocketAddr, error: &ConnectionError) {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let text = error.to_string();
    let what = if text.contains("xpired") {
        "a certificate has expired (issue a new one with `gossamer cert issue`)"
    } else if text.contains("evoked") {
        "a certificate is revoked (the mesh CA's revocation list names it)"
    } else {
        return;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(std::sync::atomic::Ordering::Relaxed);
    if now < last + 10
        || LAST
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_err()
    {
        return;
    }
    tracing::warn!(peer = %addr, error = %text, "handshake refused: {what}");
}

fn peer_cert(conn: &Connection) -> Option<rustls_pki_types::CertificateDer<'static>> {
    conn.peer_identity()?
        .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
        .ok()?
        .into_iter()
        .next()
}
