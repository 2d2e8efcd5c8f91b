//! TCP services through the mesh: an upstream listener's connections are
//! carried as bytes on a QUIC bi-stream to the node that owns the chosen
//! instance, which connects to it.
//!
//! After the stream kind byte [`STREAM_TCP`]:
//! 1. caller → owner: one [`TcpHead`] frame (service and instance);
//! 2. owner → caller: one [`TcpAnswer`] frame, once the instance accepted
//!    the connection (or why it could not be reached or was refused);
//! 3. then raw bytes both ways. A FIN in either direction is passed on as a
//!    FIN (half-close); an error or reset on either side resets the other.
//!
//! No byte of the client's is read before an instance has accepted, so a
//! failed connect moves on to the next instance in hash order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gossamer_membership::catalog::Protocol;
use gossamer_transport::frame::{read_frame, write_frame};
use gossamer_transport::{RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::debug;

use super::Proxy;
use super::authz::Caller;
use super::dispatch::denial;
use super::metrics::{InstanceLabels, ServiceLabel, TcpBytesLabels, TcpLabels};
use super::routes::{Backend, ServiceRoute};
use crate::balance::rendezvous::hash_key;
use crate::observe::access;

/// First byte of a TCP stream.
pub const STREAM_TCP: u8 = 5;
/// Cap on a head or an answer.
const MAX_HEAD: usize = 4096;
/// Read buffer per direction.
const CHUNK: usize = 64 * 1024;
/// Instances tried for one connection at most.
const MAX_TRIES: usize = 3;

/// What the caller asks the owner to connect to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpHead {
    /// Service name.
    pub service: String,
    /// Instance id on the owner.
    pub instance: String,
}

/// The owner's answer: empty when connected, else why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpAnswer {
    /// Why the connection was not made (`None`: it was).
    pub refused: Option<String>,
}

/// How an upstream listener spreads connections over instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Spread {
    /// Consistent hash of the client's IP address.
    #[default]
    Client,
    /// The instance with the fewest open connections from this agent.
    None,
}

impl Spread {
    /// Parses `client` or `none`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "client" => Some(Self::Client),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Whether a service's instances speak TCP (then the HTTP proxy refuses
/// it, and an upstream listener carries bytes).
pub fn speaks_tcp(route: &ServiceRoute) -> bool {
    route.tcp
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    gossamer_membership::codec::encode_large(value, MAX_HEAD).unwrap_or_default()
}

/// Why a connection could not be made to one instance.
#[derive(Debug)]
struct Failed(String);

/// One client connection accepted by an upstream listener for `route`:
/// reach an instance (hash order, up to [`MAX_TRIES`]), then carry bytes
/// until both sides are done. A client that cannot be served is reset.
pub async fn serve_client(
    proxy: Arc<Proxy>,
    route: Arc<ServiceRoute>,
    spread: Spread,
    client: TcpStream,
    peer: SocketAddr,
) {
    let _ = client.set_nodelay(true);
    let service = route.name.clone();
    let started = Instant::now();
    let wall = std::time::SystemTime::now();
    let mut tried: Vec<usize> = Vec::new();
    let mut errors: Vec<String> = Vec::new();
    let hash = hash_key(peer.ip().to_string().as_bytes());
    let connect_timeout = proxy
        .config
        .timeouts(&service, &http::HeaderMap::new())
        .connect;
    while tried.len() < MAX_TRIES {
        let pick = match spread {
            Spread::Client => proxy.pick(&route, hash, &tried),
            Spread::None => least_loaded(&proxy, &route, &tried),
        };
        let Some(i) = pick else { break };
        tried.push(i);
        let backend = &route.backends[i];
        match tokio::time::timeout(connect_timeout, reach(&proxy, &route, backend)).await {
            Ok(Ok(upstream)) => {
                proxy
                    .metrics
                    .tcp_connect
                    .get_or_create(&ServiceLabel {
                        service: service.clone(),
                    })
                    .observe(started.elapsed().as_secs_f64());
                count(&proxy, &service, &backend.key, "opened");
                let labels = InstanceLabels {
                    service: service.clone(),
                    instance: backend.key.to_string(),
                };
                let active = proxy.metrics.tcp_active.get_or_create(&labels).clone();
                active.inc();
                let bytes = |direction: &str| {
                    proxy
                        .metrics
                        .tcp_bytes
                        .get_or_create(&TcpBytesLabels {
                            service: service.clone(),
                            instance: backend.key.to_string(),
                            direction: direction.to_owned(),
                        })
                        .clone()
                };
                let mine: Pair = Default::default();
                let counters = (
                    (bytes("sent"), mine.0.clone()),
                    (bytes("received"), mine.1.clone()),
                );
                let idle = proxy.config.tcp_idle_timeout;
                let outcome = match upstream {
                    Upstream::Local(stream) => {
                        let (ur, uw) = stream.into_split();
                        carry(client, ur, uw, idle, counters).await
                    }
                    Upstream::Remote(send, recv) => carry(client, recv, send, idle, counters).await,
                };
                active.dec();
                if let Err(e) = &outcome {
                    debug!(%service, instance = %backend.key, %peer, error = %e, "tcp connection ended by an error");
                }
                if let Some(sinks) = access::Sinks::for_request(&proxy, false) {
                    sinks.emit(Box::new(access::Record {
                        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                        bytes_in: Some(mine.0.get()),
                        bytes_out: mine.1.get(),
                        instance: Some(backend.key.clone().into()),
                        node: Some(backend.node.clone().into()),
                        retries: (tried.len() - 1) as u32,
                        flags: if outcome.is_err() {
                            vec!["DC"]
                        } else {
                            Vec::new()
                        },
                        ..tcp_record(&proxy, &service, peer, wall)
                    }));
                }
                return;
            }
            Ok(Err(Failed(e))) => {
                proxy.failed(&route, backend);
                errors.push(format!("{}: {e}", backend.key));
            }
            Err(_) => {
                proxy.failed(&route, backend);
                errors.push(format!(
                    "{}: not reached within {connect_timeout:?}",
                    backend.key
                ));
            }
        }
    }
    count(&proxy, &service, "none", "failed");
    debug!(%service, %peer, errors = ?errors, "tcp connection refused: no instance reached");
    if let Some(sinks) = access::Sinks::for_request(&proxy, false) {
        sinks.emit(Box::new(access::Record {
            duration_ms: started.elapsed().as_secs_f64() * 1000.0,
            flags: vec![if tried.is_empty() { "UH" } else { "UF" }],
            retries: tried.len().saturating_sub(1) as u32,
            ..tcp_record(&proxy, &service, peer, wall)
        }));
    }
    let _ = client.set_zero_linger();
}

/// An access-log record of one TCP connection through an upstream listener.
fn tcp_record(
    proxy: &Proxy,
    service: &str,
    peer: SocketAddr,
    start: std::time::SystemTime,
) -> access::Record {
    access::Record {
        start: access::Timestamp(start),
        listener: "upstream",
        protocol: "tcp",
        source_node: proxy.node_text(),
        client: access::Peer::Addr(peer),
        service: Some(service.into()),
        ..access::Record::default()
    }
}

/// Counts a connection an upstream listener could not serve at all (its
/// service has no instance known).
pub fn refused(proxy: &Proxy, service: &str) {
    count(proxy, service, "none", "failed");
}

fn count(proxy: &Proxy, service: &str, instance: &str, outcome: &str) {
    proxy
        .metrics
        .tcp_connections
        .get_or_create(&TcpLabels {
            service: service.to_owned(),
            instance: instance.to_owned(),
            outcome: outcome.to_owned(),
        })
        .inc();
}

/// The usable instance with the fewest connections open from here.
fn least_loaded(proxy: &Proxy, route: &ServiceRoute, exclude: &[usize]) -> Option<usize> {
    (0..route.backends.len())
        .filter(|&i| !exclude.contains(&i) && proxy.usable(route, i))
        .min_by_key(|&i| {
            let b = &route.backends[i];
            proxy
                .metrics
                .tcp_active
                .get_or_create(&InstanceLabels {
                    service: route.name.clone(),
                    instance: b.key.to_string(),
                })
                .get()
        })
}

/// A connection to an instance: direct, or through its owner.
enum Upstream {
    Local(TcpStream),
    Remote(SendStream, RecvStream),
}

async fn reach(proxy: &Proxy, route: &ServiceRoute, backend: &Backend) -> Result<Upstream, Failed> {
    if backend.protocol != Protocol::Tcp {
        return Err(Failed(format!(
            "it speaks {}, not tcp",
            backend.protocol.as_str()
        )));
    }
    if backend.local {
        // This node's own instance: the same authorization as a call from
        // another node, with this node as the caller.
        let identity = proxy.transport.identity();
        let caller = Caller {
            node: proxy.transport.name(),
            hosts: &identity.hosts,
        };
        let verdict = proxy.authorize_stream(&route.name, caller);
        if !verdict.allowed {
            return Err(Failed(denial(&route.name, &verdict)));
        }
        return connect(&backend.address, backend.port)
            .await
            .map(Upstream::Local);
    }
    let addr = backend
        .owner_addr
        .ok_or_else(|| Failed(format!("no address for node {}", backend.node)))?;
    let (mut send, mut recv) = proxy
        .transport
        .open_bi(&backend.node, addr)
        .await
        .map_err(|e| Failed(format!("node {}: {e}", backend.node)))?;
    let head = encode(&TcpHead {
        service: route.name.clone(),
        instance: backend.id.clone(),
    });
    send.write_all(&[STREAM_TCP])
        .await
        .map_err(|e| Failed(format!("node {}: {e}", backend.node)))?;
    write_frame(&mut send, &head)
        .await
        .map_err(|e| Failed(format!("node {}: {e}", backend.node)))?;
    let answer = read_frame(&mut recv, MAX_HEAD)
        .await
        .map_err(|e| Failed(format!("node {}: {e}", backend.node)))?
        .ok_or_else(|| Failed(format!("node {} closed the stream", backend.node)))?;
    let answer: TcpAnswer = gossamer_membership::codec::decode_large(&answer, MAX_HEAD)
        .map_err(|e| Failed(format!("node {}: bad answer: {e}", backend.node)))?;
    match answer.refused {
        None => Ok(Upstream::Remote(send, recv)),
        Some(why) => Err(Failed(why)),
    }
}

async fn connect(address: &str, port: u16) -> Result<TcpStream, Failed> {
    let stream = TcpStream::connect((address, port))
        .await
        .map_err(|e| Failed(format!("cannot connect to {address}:{port}: {e}")))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A TCP stream from node `from`: connect to the local instance it names
/// (if `from` may), answer, then carry bytes.
pub async fn serve_stream(
    from: String,
    mut send: SendStream,
    mut recv: RecvStream,
    proxy: Arc<Proxy>,
) {
    let head =
        match tokio::time::timeout(Duration::from_secs(5), read_frame(&mut recv, MAX_HEAD)).await {
            Ok(Ok(Some(frame))) => {
                gossamer_membership::codec::decode_large::<TcpHead>(&frame, MAX_HEAD)
            }
            _ => {
                let _ = send.reset(1u32.into());
                return;
            }
        };
    let refuse = |why: String| TcpAnswer { refused: Some(why) };
    let Ok(head) = head else {
        let _ = write_frame(&mut send, &encode(&refuse("bad head".into()))).await;
        let _ = send.finish();
        return;
    };
    let local = proxy.catalog.local.borrow().clone();
    let instance = local
        .services
        .iter()
        .find(|s| s.id == head.instance && s.name == head.service && s.protocol == Protocol::Tcp)
        .cloned();
    let hosts = proxy
        .transport
        .peer_hosts(&from)
        .unwrap_or_else(|| Arc::new(gossamer_transport::pki::Hosts::Only(Vec::new())));
    let result = match instance {
        None => Err(format!(
            "no tcp instance {:?} of {:?} on node {}",
            head.instance, head.service, local.node
        )),
        Some(instance) => {
            let verdict = proxy.authorize_stream(
                &head.service,
                Caller {
                    node: &from,
                    hosts: &hosts,
                },
            );
            if verdict.allowed {
                let timeout = proxy
                    .config
                    .timeouts(&head.service, &http::HeaderMap::new())
                    .connect;
                match tokio::time::timeout(timeout, connect(&instance.address, instance.port)).await
                {
                    Ok(r) => r.map_err(|Failed(e)| e),
                    Err(_) => Err(format!(
                        "{}:{} did not accept within {timeout:?}",
                        instance.address, instance.port
                    )),
                }
            } else {
                Err(denial(&head.service, &verdict))
            }
        }
    };
    match result {
        Ok(stream) => {
            if write_frame(&mut send, &encode(&TcpAnswer { refused: None }))
                .await
                .is_err()
            {
                return;
            }
            let (r, w) = stream.into_split();
            let idle = proxy.config.tcp_idle_timeout;
            let counters = Default::default();
            if let Err(e) = carry_streams(recv, send, r, w, idle, counters).await {
                debug!(service = %head.service, %from, error = %e, "tcp stream ended by an error");
            }
        }
        Err(why) => {
            let _ = recv.stop(0u32.into());
            let _ = write_frame(&mut send, &encode(&refuse(why))).await;
            let _ = send.finish();
        }
    }
}

/// Bytes each way (sent: client to instance, received), each counted in
/// two counters: the instance's metric and the connection's own total.
type Counters = (Pair, Pair);
type Pair = (
    prometheus_client::metrics::counter::Counter,
    prometheus_client::metrics::counter::Counter,
);

/// Carries bytes between a client TCP connection and an upstream until
/// both directions are done; on an error the client is reset.
async fn carry<R, W>(
    client: TcpStream,
    up_r: R,
    up_w: W,
    idle: Duration,
    counters: Counters,
) -> std::io::Result<()>
where
    R: Source,
    W: Sink,
{
    let (cr, cw) = client.into_split();
    carry_streams(cr, cw, up_r, up_w, idle, counters).await
}

/// What a half does when the connection fails: reset rather than end
/// cleanly, so the other side sees the failure.
pub trait Abort {
    /// Reset.
    fn abort(&mut self);
}

impl Abort for tokio::net::tcp::OwnedWriteHalf {
    fn abort(&mut self) {
        // Zero linger: closing sends a reset (and never blocks).
        let _ = self.as_ref().set_zero_linger();
    }
}

impl Abort for tokio::net::tcp::OwnedReadHalf {
    fn abort(&mut self) {}
}

impl Abort for SendStream {
    fn abort(&mut self) {
        let _ = self.reset(2u32.into());
    }
}

impl Abort for RecvStream {
    fn abort(&mut self) {
        let _ = self.stop(2u32.into());
    }
}

/// Copies `a_r` → `b_w` and `b_r` → `a_w` at once. An end of stream is
/// passed on as a shutdown of the other side's write half (half-close);
/// the connection is done when both directions are. An error in either
/// direction, or no byte either way for `idle`, aborts all four halves.
async fn carry_streams<AR, AW, BR, BW>(
    mut a_r: AR,
    mut a_w: AW,
    mut b_r: BR,
    mut b_w: BW,
    idle: Duration,
    counters: Counters,
) -> std::io::Result<()>
where
    AR: Source,
    AW: Sink,
    BR: Source,
    BW: Sink,
{
    let epoch = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (sent, received) = counters;
    let forward = pump(&mut a_r, &mut b_w, &sent, &touch);
    let backward = pump(&mut b_r, &mut a_w, &received, &touch);
    let watchdog = async {
        loop {
            let quiet = epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    };
    let both = async { tokio::try_join!(forward, backward).map(drop) };
    let outcome = tokio::select! {
        r = both => r,
        () = watchdog => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("idle for {idle:?}"))),
    };
    if outcome.is_err() {
        a_r.abort();
        a_w.abort();
        b_r.abort();
        b_w.abort();
    }
    outcome
}

/// Copies until end of stream, then shuts `to` down for writing. Chunks
/// move as [`Bytes`]: a QUIC stream hands over its received chunks and
/// takes the ones to send without another copy.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    bytes: &Pair,
    touch: &impl Fn(),
) -> std::io::Result<()>
where
    R: Source,
    W: Sink,
{
    let mut buf = BytesMut::new();
    loop {
        let Some(chunk) = from.next_chunk(&mut buf).await? else {
            return to.close().await;
        };
        let n = chunk.len() as u64;
        to.put(chunk).await?;
        bytes.0.inc_by(n);
        bytes.1.inc_by(n);
        touch();
    }
}

/// A connection half bytes are read from.
pub trait Source: Unpin + Abort {
    /// The next bytes (`None` at end of stream); `buf` is scratch space
    /// the caller keeps between calls.
    fn next_chunk(
        &mut self,
        buf: &mut BytesMut,
    ) -> impl Future<Output = std::io::Result<Option<Bytes>>> + Send;
}

/// A connection half bytes are written to.
pub trait Sink: Unpin + Abort {
    /// Writes all of `chunk`.
    fn put(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;
    /// Ends the stream for writing (half-close).
    fn close(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Reads what is there, up to about [`CHUNK`], into `buf` and cuts it off.
/// (QUIC hands over one chunk per packet; gathering them here keeps the
/// writes to a TCP socket few and large.)
async fn read_into<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut BytesMut,
) -> std::io::Result<Option<Bytes>> {
    // Reuses the buffer's storage once the chunks cut from it are gone.
    if buf.capacity() < CHUNK / 4 {
        buf.reserve(CHUNK);
    }
    match from.read_buf(buf).await? {
        0 => Ok(None),
        _ => Ok(Some(buf.split().freeze())),
    }
}

impl Source for tokio::net::tcp::OwnedReadHalf {
    async fn next_chunk(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
        read_into(self, buf).await
    }
}

impl Source for RecvStream {
    async fn next_chunk(&mut self, buf: &mut BytesMut) -> std::io::Result<Option<Bytes>> {
        read_into(self, buf).await
    }
}

impl Sink for tokio::net::tcp::OwnedWriteHalf {
    async fn put(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.write_all(&chunk).await
    }
    async fn close(&mut self) -> std::io::Result<()> {
        self.shutdown().await
    }
}

impl Sink for SendStream {
    async fn put(&mut self, chunk: Bytes) -> std::io::Result<()> {
        Ok(self.write_chunk(chunk).await?)
    }
    async fn close(&mut self) -> std::io::Result<()> {
        self.shutdown().await
    }
}
