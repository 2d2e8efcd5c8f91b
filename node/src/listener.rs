//! HTTP listeners with the limits every listener exposed to clients needs:
//! a cap on open connections, a header-read timeout (a partial request
//! head, or one byte a second, cannot hold a connection), an idle
//! keep-alive timeout, and a graceful close on shutdown.
//!
//! The proxy and the admin API each get their own listener and cap, so a
//! flood of connections to one never starves the other: `/health` keeps
//! answering while the proxy refuses connections.
//!
//! hyper's own `header_read_timeout` also closes idle keep-alive
//! connections after that time (its timer runs while waiting for the next
//! head), which would make the two timeouts one. Here each connection has
//! a watchdog instead: a head is "being read" from the first byte that
//! arrives while no request is open until hyper hands the request over.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::observe::access::Logged;
use crate::tasks::Tasks;

/// How long a connection asked to close gracefully may take to finish.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// `[limits]` in the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Time allowed from the first byte of a request head to its end.
    #[serde(with = "gossamer_membership::duration")]
    pub header_read_timeout: Duration,
    /// A connection with no request open for this long is closed.
    #[serde(with = "gossamer_membership::duration")]
    pub idle_timeout: Duration,
    /// Most open connections on the proxy listener (lowered to fit the
    /// process's open-file limit).
    pub proxy_max_connections: usize,
    /// Most open connections on the admin listener.
    pub admin_max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            proxy_max_connections: 10_000,
            admin_max_connections: 256,
        }
    }
}

impl LimitsConfig {
    /// Checks values; returns `key: problem`.
    pub fn validate(&self) -> Result<(), String> {
        if self.header_read_timeout.is_zero() {
            return Err("limits.header_read_timeout: must be positive".into());
        }
        if self.idle_timeout.is_zero() {
            return Err("limits.idle_timeout: must be positive".into());
        }
        if self.proxy_max_connections == 0 {
            return Err("limits.proxy_max_connections: must be at least 1".into());
        }
        if self.admin_max_connections == 0 {
            return Err("limits.admin_max_connections: must be at least 1".into());
        }
        Ok(())
    }

    /// The limits of one listener.
    pub fn for_listener(&self, max_connections: usize) -> Limits {
        Limits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections,
        }
    }
}

/// The limits one listener enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`LimitsConfig::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`LimitsConfig::idle_timeout`].
    pub idle_timeout: Duration,
    /// Most open connections.
    pub max_connections: usize,
}

/// The process's soft limit on open files, from `/proc/self/limits`.
pub fn open_file_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `listener` (`proxy` or `admin`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// Which listener.
    pub listener: &'static str,
}

/// `listener`, `reason` (`header_timeout` or `idle`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// Which listener.
    pub listener: &'static str,
    /// Why the agent closed it.
    pub reason: &'static str,
}

/// Connection metrics of every listener.
#[derive(Debug, Clone)]
pub struct ListenerMetrics {
    open: Family<ListenerLabel, Gauge>,
    refused: Family<ListenerLabel, Counter>,
    closed: Family<CloseLabels, Counter>,
}

impl ListenerMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            open: Family::default(),
            refused: Family::default(),
            closed: Family::default(),
        };
        registry.register(
            "gossamer_listener_connections",
            "Open client connections per listener",
            m.open.clone(),
        );
        registry.register(
            "gossamer_listener_refused",
            "Connections closed at once because the listener was at its cap",
            m.refused.clone(),
        );
        registry.register(
            "gossamer_listener_closed",
            "Connections the agent closed, by reason",
            m.closed.clone(),
        );
        m
    }
}

impl ListenerMetrics {
    /// Open connections on `listener` now.
    pub fn open(&self, listener: &'static str) -> i64 {
        self.open.get_or_create(&ListenerLabel { listener }).get()
    }
}

/// Milliseconds on a monotonic clock, to a kernel tick (never 0, so 0 can
/// mean "unset"): read twice a request, for timeouts of seconds.
fn now_ms() -> u64 {
    gossamer_transport::clock::coarse_ms()
}

/// What the watchdog knows about one connection.
#[derive(Debug)]
struct ConnState {
    /// Requests handed to the service whose response has not ended.
    open: AtomicU32,
    /// When the last request ended (or the connection opened).
    idle_since: AtomicU64,
    /// When the first byte of a head arrived; 0 when no head is pending.
    head_since: AtomicU64,
    /// Whether any byte was read yet (the first read tells h1 from h2).
    seen: AtomicBool,
    /// HTTP/2 has no "partial head" to time out; only idleness counts.
    h2: AtomicBool,
    /// Wakes the watchdog when a head starts whose deadline comes before
    /// the watchdog's next look (`armed`): the first head after an idle
    /// spell, whose watchdog sleeps until the idle deadline.
    head_started: tokio::sync::Notify,
    /// When the watchdog looks next ([`now_ms`]). While requests come, it
    /// looks at least once a header timeout, so a head that starts then
    /// needs no wake-up: its deadline is after the next look, which sleeps
    /// until it. `u64::MAX` until a watchdog arms it.
    armed: AtomicU64,
    /// The header timeout in milliseconds (`u64::MAX`: none).
    head_timeout_ms: u64,
    /// How many times the connection's task has polled hyper's connection
    /// ([`Counted`]): an HTTP/2 connection's writes wait for the next poll
    /// ([`Watched`]).
    polls: AtomicU64,
}

impl ConnState {
    /// A connection's state; `header_read_timeout` decides when a head that
    /// starts must wake the watchdog (`None`: no watchdog).
    fn new(header_read_timeout: Option<Duration>) -> Self {
        Self {
            open: AtomicU32::new(0),
            idle_since: AtomicU64::new(now_ms()),
            head_since: AtomicU64::new(0),
            seen: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            head_started: tokio::sync::Notify::new(),
            armed: AtomicU64::new(u64::MAX),
            head_timeout_ms: header_read_timeout.map_or(u64::MAX, |t| t.as_millis() as u64),
            polls: AtomicU64::new(0),
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        if !self.seen.load(Ordering::Relaxed) {
            self.seen.store(true, Ordering::Relaxed);
            if bytes.starts_with(b"PRI * HTTP/2") {
                self.h2.store(true, Ordering::Relaxed);
            }
        }
        if self.open.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
        {
            let now = now_ms();
            self.head_since.store(now, Ordering::Relaxed);
            if now.saturating_add(self.head_timeout_ms) < self.armed.load(Ordering::Relaxed) {
                self.head_started.notify_one();
            }
        }
    }

    /// Records when the watchdog, about to sleep for `wait`, looks next.
    fn arm(&self, wait: Duration) {
        let at = now_ms().saturating_add(wait.as_millis() as u64);
        self.armed.store(at, Ordering::Relaxed);
    }

    /// The next instant worth looking at, and what is wrong now if anything.
    fn check(&self, limits: &Limits) -> (Option<Closing>, Duration) {
        let now = now_ms();
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 {
            let deadline = head + limits.header_read_timeout.as_millis() as u64;
            return if now >= deadline {
                (Some(Closing::HeaderTimeout), Duration::ZERO)
            } else {
                (None, Duration::from_millis(deadline - now))
            };
        }
        if self.open.load(Ordering::Relaxed) > 0 {
            // Looking again within a header timeout lets the heads of the
            // requests that follow start without waking the watchdog.
            return (None, limits.idle_timeout.min(limits.header_read_timeout));
        }
        let deadline =
            self.idle_since.load(Ordering::Relaxed) + limits.idle_timeout.as_millis() as u64;
        if now >= deadline {
            (Some(Closing::Idle), Duration::ZERO)
        } else {
            // A head that starts wakes the watchdog (`head_started`).
            (None, Duration::from_millis(deadline - now))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    HeaderTimeout,
    Idle,
}

/// Marks one request open from the moment hyper hands it over until its
/// response body is dropped (finished, failed or abandoned), so no path
/// (a client that goes away included) leaves the count wrong.
#[derive(Debug)]
struct OpenRequest(Arc<ConnState>);

impl OpenRequest {
    fn new(state: Arc<ConnState>) -> Self {
        state.open.fetch_add(1, Ordering::Relaxed);
        state.head_since.store(0, Ordering::Relaxed);
        Self(state)
    }
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        self.0.idle_since.store(now_ms(), Ordering::Relaxed);
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that holds its request open until it is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _open: Option<OpenRequest>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The client's socket (or TLS session), telling the watchdog when bytes
/// arrive, and holding an HTTP/2 connection's writes until the next poll of
/// its task.
///
/// Why hold them: h2 writes a DATA frame of 256 bytes or more from the
/// body's own buffer and must flush it before it queues the next frame, and
/// a response's HEADERS are often flushed before its body has arrived. So
/// without this each response cost the client's connection one to three
/// writes, and each write on loopback is the sender's and the receiver's
/// TCP work. Held, everything the connection's streams answered in one turn
/// of the runtime goes out in one write: the first flush with bytes held
/// wakes the task again instead of writing, and the flush of that later
/// poll (h2 flushes on every poll) writes them. HTTP/1.1 writes through: it
/// writes a whole response at once.
#[derive(Debug)]
struct Watched<S> {
    stream: S,
    state: Arc<ConnState>,
    /// HTTP/2 bytes accepted but not yet written.
    held: Vec<u8>,
    /// The poll ([`ConnState::polls`]) in which `held` was last found
    /// waiting: they are written at the first flush of a later poll.
    held_since: Option<u64>,
}

/// Most bytes an HTTP/2 connection holds; a write that would pass it goes
/// out at once, with what is held before it.
const HOLD_MAX: usize = 64 * 1024;

/// Writes this large go out at once (with what is held before them): a
/// bulk body's frames, which gain nothing from waiting and would cost a
/// copy.
const WRITE_THROUGH: usize = 4 * 1024;

impl<S> Watched<S> {
    fn new(stream: S, state: Arc<ConnState>) -> Self {
        Self {
            stream,
            state,
            held: Vec::new(),
            held_since: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> Watched<S> {
    /// Whether writes are held: on HTTP/2 connections.
    fn holds(&self) -> bool {
        self.state.h2.load(Ordering::Relaxed)
    }

    /// Writes out what is held.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut done = 0;
        let result = loop {
            if done == self.held.len() {
                break Poll::Ready(Ok(()));
            }
            match Pin::new(&mut self.stream).poll_write(cx, &self.held[done..]) {
                Poll::Ready(Ok(0)) => break Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => done += n,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Pending => break Poll::Pending,
            }
        };
        self.written(done);
        result
    }

    /// Drops the first `n` held bytes, which the socket took.
    fn written(&mut self, n: usize) {
        self.held.drain(..n);
        if self.held.is_empty() {
            self.held_since = None;
            // An idle connection keeps no large buffer.
            if self.held.capacity() > 16 * 1024 {
                self.held = Vec::new();
            }
        }
    }

    /// Holds `bufs` when they are small and fit; else writes them, after
    /// what is held, in one write.
    fn poll_hold(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len < WRITE_THROUGH && self.held.len() + len <= HOLD_MAX {
            self.held.reserve(len);
            for b in bufs {
                self.held.extend_from_slice(b);
            }
            return Poll::Ready(Ok(len));
        }
        loop {
            if self.held.is_empty() {
                return Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
            }
            let mut slices = [std::io::IoSlice::new(&[]); 4];
            slices[0] = std::io::IoSlice::new(&self.held);
            let n = bufs.len().min(3);
            slices[1..=n].copy_from_slice(&bufs[..n]);
            let written = std::task::ready!(
                Pin::new(&mut self.stream).poll_write_vectored(cx, &slices[..=n])
            )?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            let held = self.held.len();
            self.written(written.min(held));
            if written > held {
                return Poll::Ready(Ok(written - held));
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled
            && buf.filled().len() > before
        {
            self.state.on_read(&buf.filled()[before..]);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.holds() {
            return self.poll_hold(cx, &[std::io::IoSlice::new(buf)]);
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.holds() {
            return self.poll_hold(cx, bufs);
        }
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.held.is_empty() {
            let poll = self.state.polls.load(Ordering::Relaxed);
            match self.held_since {
                // Held since an earlier poll: the streams had their turn.
                Some(since) if since != poll => std::task::ready!(self.poll_release(cx))?,
                Some(_) => return Poll::Ready(Ok(())),
                None => {
                    self.held_since = Some(poll);
                    cx.waker().wake_by_ref();
                    return Poll::Ready(Ok(()));
                }
            }
        }
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_release(cx))?;
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Polls a connection, counting its polls in [`ConnState::polls`].
struct Counted<'a, F> {
    conn: Pin<&'a mut F>,
    state: &'a ConnState,
}

impl<F: Future> Future for Counted<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.state.polls.fetch_add(1, Ordering::Relaxed);
        self.conn.as_mut().poll(cx)
    }
}

/// Counts an open connection for as long as it lives.
/// A connection's place under its listener's cap, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    count: Arc<AtomicUsize>,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.gauge.dec();
    }
}

/// Serves HTTP/1.1 and h2c (with upgrades) on `listener` until `tasks`
/// drain (connections run on `tasks` too), calling `handler` for every request with the client's address.
pub async fn serve(
    listener: TcpListener,
    name: &'static str,
    limits: Limits,
    metrics: ListenerMetrics,
    tasks: Tasks,
    handler: Handler,
) {
    let mut acceptor = Acceptor::new(name, limits, metrics, tasks);
    while let Some((stream, peer, slot)) = acceptor.accept(&listener).await {
        acceptor.serve_http(stream, peer, slot, handler.clone());
    }
}

/// A client's byte stream: a TCP socket or a TLS session over one.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Stream for S {}

/// Gives a request's URI and header values bytes of their own: one copy,
/// the size of what they hold, into one allocation.
///
/// hyper parses a head in place, so its URI and header values are slices
/// of the connection's read buffer (of an HTTP/2 frame's, likewise). The
/// proxy keeps a request's head until its response is back (a retry sends
/// it again), and all that time the whole buffer stays shared: an HTTP/1.1
/// connection, reading on for the next request, cannot reuse it and takes
/// a new one of 8 KiB or more for each request. After this copy the
/// buffer is the connection's alone again.
fn own_head(uri: &mut Uri, headers: &mut HeaderMap) {
    let authority = uri.authority().map_or("", Authority::as_str);
    let path = uri.path_and_query().map_or("", PathAndQuery::as_str);
    let values: usize = headers.values().map(|v| v.len()).sum();
    let mut buf = BytesMut::with_capacity(authority.len() + path.len() + values);
    buf.extend_from_slice(authority.as_bytes());
    buf.extend_from_slice(path.as_bytes());
    for v in headers.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf = buf.freeze();
    let mut at = 0;
    let mut next = |len: usize| {
        at += len;
        buf.slice(at - len..at)
    };
    let owned_authority = next(authority.len());
    let owned_path = next(path.len());
    for v in headers.values_mut() {
        let sensitive = v.is_sensitive();
        let Ok(mut owned) = HeaderValue::from_maybe_shared(next(v.len())) else {
            continue;
        };
        owned.set_sensitive(sensitive);
        *v = owned;
    }
    let mut parts = uri.clone().into_parts();
    if parts.authority.is_some()
        && let Ok(a) = Authority::from_maybe_shared(owned_authority)
    {
        parts.authority = Some(a);
    }
    if parts.path_and_query.is_some()
        && let Ok(p) = PathAndQuery::from_maybe_shared(owned_path)
    {
        parts.path_and_query = Some(p);
    }
    // The parts of a valid URI, with the same text, make it again.
    if let Ok(owned) = Uri::from_parts(parts) {
        *uri = owned;
    }
}

/// What a listener answers a request with.
pub type Reply = Pin<Box<dyn Future<Output = Response<Logged>> + Send>>;

/// A listener's request handler, shared by its connections.
///
/// Every listener in the binary (the proxy, the upstream listeners, the
/// gateways, the admin API, the demo's services) serves through this one
/// type, a boxed stream and one response body, so hyper's HTTP/1.1 and
/// HTTP/2 server code exists once in the binary rather than once per
/// listener and stream type.
pub type Handler = Arc<dyn Fn(Request<Incoming>, SocketAddr) -> Reply + Send + Sync>;

/// `f` as a [`Handler`].
pub fn handler<F, R>(f: F) -> Handler
where
    F: Fn(Request<Incoming>, SocketAddr) -> R + Send + Sync + 'static,
    R: Future<Output = Response<Logged>> + Send + 'static,
{
    // Boxed: the request path's future is several kilobytes, and HTTP/2
    // spawns a task per stream that would copy it whole at every move.
    Arc::new(move |req, peer| crate::tasks::boxed(|| f(req, peer)))
}

/// Serves HTTP/1.1 and HTTP/2 on one connection until it ends, without a
/// listener's limits (the demo's services).
pub async fn serve_connection(stream: impl Stream + 'static, peer: SocketAddr, handler: Handler) {
    let state = Arc::new(ConnState::new(None));
    let io: Box<dyn Stream> = Box::new(Watched::new(stream, state.clone()));
    let service = Service {
        handler,
        peer,
        state: state.clone(),
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    if let Err(e) = (Counted {
        conn,
        state: &state,
    })
    .await
    {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The hyper service of every listener: calls the handler and marks the
/// request open until its response body is dropped.
#[derive(Clone)]
struct Service {
    handler: Handler,
    peer: SocketAddr,
    state: Arc<ConnState>,
}

impl hyper::service::Service<Request<Incoming>> for Service {
    type Response = Response<Tracked<Logged>>;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, req: Request<Incoming>) -> Answer {
        let open = OpenRequest::new(self.state.clone());
        let (mut parts, body) = req.into_parts();
        own_head(&mut parts.uri, &mut parts.headers);
        let req = Request::from_parts(parts, body);
        Answer {
            response: (self.handler)(req, self.peer),
            open: Some(open),
        }
    }
}

/// A response on its way, holding its request open.
struct Answer {
    response: Reply,
    open: Option<OpenRequest>,
}

impl Future for Answer {
    type Output = Result<Response<Tracked<Logged>>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let response = std::task::ready!(self.response.as_mut().poll(cx));
        let open = self.open.take();
        Poll::Ready(Ok(response.map(|inner| Tracked { inner, _open: open })))
    }
}

/// Accepts connections under a listener's cap, counted in its metrics,
/// and serves HTTP on those it is asked to.
#[allow(missing_debug_implementations)] // hyper's builder has no Debug
#[derive(Clone)]
pub struct Acceptor {
    name: &'static str,
    limits: Limits,
    metrics: ListenerMetrics,
    tasks: Tasks,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    count: Arc<AtomicUsize>,
    gauge: Gauge,
    refused: Counter,
    last_warning: Option<Instant>,
}

impl Acceptor {
    /// An acceptor for the listener called `name` in metrics and logs.
    pub fn new(name: &'static str, limits: Limits, metrics: ListenerMetrics, tasks: Tasks) -> Self {
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let label = ListenerLabel { listener: name };
        let gauge = metrics.open.get_or_create(&label).clone();
        let refused = metrics.refused.get_or_create(&label).clone();
        Self {
            name,
            limits,
            metrics,
            tasks,
            builder,
            count: Arc::new(AtomicUsize::new(0)),
            gauge,
            refused,
            last_warning: None,
        }
    }

    /// The next connection under the cap (those over it are closed at
    /// once), with the slot it holds until dropped; `None` once the agent
    /// drains.
    pub async fn accept(
        &mut self,
        listener: &TcpListener,
    ) -> Option<(TcpStream, SocketAddr, Slot)> {
        let name = self.name;
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, typically: back off instead of spinning.
                        debug!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                () = self.tasks.draining() => return None,
            };
            if self.count.fetch_add(1, Ordering::Relaxed) >= self.limits.max_connections {
                self.count.fetch_sub(1, Ordering::Relaxed);
                self.refused.inc();
                if self
                    .last_warning
                    .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                {
                    warn!(
                        listener = name, %peer, max_connections = self.limits.max_connections,
                        "connection refused: the listener is at its connection cap"
                    );
                    self.last_warning = Some(Instant::now());
                }
                drop(stream);
                continue;
            }
            self.gauge.inc();
            let slot = Slot {
                count: self.count.clone(),
                gauge: self.gauge.clone(),
            };
            let _ = stream.set_nodelay(true);
            return Some((stream, peer, slot));
        }
    }

    /// Runs `work` on the agent's tasks (e.g. a TLS handshake before
    /// [`Self::serve_http`]).
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(work);
    }

    /// Serves HTTP/1.1 and HTTP/2 (with upgrades) on one accepted
    /// connection (plain TCP or a TLS session), on the agent's tasks, with
    /// the listener's timeouts.
    pub fn serve_http(
        &self,
        stream: impl Stream + 'static,
        peer: SocketAddr,
        slot: Slot,
        handler: Handler,
    ) {
        let name = self.name;
        let limits = self.limits;
        let state = Arc::new(ConnState::new(Some(limits.header_read_timeout)));
        let io: Box<dyn Stream> = Box::new(Watched::new(stream, state.clone()));
        let io = TokioIo::new(io);
        let service = Service {
            handler,
            peer,
            state: state.clone(),
        };
        let builder = self.builder.clone();
        let metrics = self.metrics.clone();
        let conn_tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            let tasks = conn_tasks;
            let _slot = slot;
            let conn = builder.serve_connection_with_upgrades(io, service);
            tokio::pin!(conn);
            let mut closing: Option<Instant> = None;
            let mut stopping = tasks.is_draining();
            loop {
                let (verdict, wait) = state.check(&limits);
                let wait = match closing {
                    Some(t) => CLOSE_GRACE.saturating_sub(t.elapsed()),
                    None => wait,
                };
                let reason = match verdict {
                    _ if closing.is_some() && wait.is_zero() => break,
                    Some(Closing::HeaderTimeout) => {
                        debug!(listener = name, %peer, "request head not received in time; closing");
                        metrics
                            .closed
                            .get_or_create(&CloseLabels {
                                listener: name,
                                reason: "header_timeout",
                            })
                            .inc();
                        break;
                    }
                    Some(Closing::Idle) if closing.is_none() => Some("idle"),
                    _ if stopping && closing.is_none() => Some("shutdown"),
                    _ => None,
                };
                if let Some(reason) = reason {
                    if reason == "idle" {
                        metrics
                            .closed
                            .get_or_create(&CloseLabels {
                                listener: name,
                                reason,
                            })
                            .inc();
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = Some(Instant::now());
                    continue;
                }
                let wait = wait.max(Duration::from_millis(5));
                state.arm(wait);
                tokio::select! {
                    result = Counted { conn: conn.as_mut(), state: &state } => {
                        if let Err(e) = result {
                            debug!(listener = name, %peer, error = %e, "connection ended with an error");
                        }
                        break;
                    }
                    () = tokio::time::sleep(wait) => {}
                    () = state.head_started.notified() => {}
                    () = tasks.draining(), if !stopping => stopping = true,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_millis(20),
            idle_timeout: Duration::from_millis(40),
            max_connections: 1,
        }
    }

    #[test]
    fn partial_head_times_out_and_requests_reset_it() {
        let s = Arc::new(ConnState::new(Some(limits().header_read_timeout)));
        assert_eq!(s.check(&limits()).0, None);
        s.on_read(b"GET / HT");
        assert_eq!(s.check(&limits()).0, None, "not yet");
        // The clock is a kernel tick's (up to 10 ms): sleep past that too.
        std::thread::sleep(Duration::from_millis(45));
        assert_eq!(s.check(&limits()).0, Some(Closing::HeaderTimeout));
        let open = OpenRequest::new(s.clone());
        assert_eq!(s.check(&limits()).0, None, "a request is open");
        s.on_read(b"more body");
        assert_eq!(
            s.head_since.load(Ordering::Relaxed),
            0,
            "body bytes are no head"
        );
        drop(open);
        assert_eq!(s.open.load(Ordering::Relaxed), 0);
        assert_eq!(s.check(&limits()).0, None, "idle only just now");
        std::thread::sleep(Duration::from_millis(70));
        assert_eq!(s.check(&limits()).0, Some(Closing::Idle));
    }

    #[tokio::test]
    async fn a_head_wakes_the_watchdog_only_when_it_would_look_too_late() {
        let l = limits();
        let woken = |s: &Arc<ConnState>| {
            let s = s.clone();
            async move {
                tokio::time::timeout(Duration::from_millis(20), s.head_started.notified())
                    .await
                    .is_ok()
            }
        };
        let s = Arc::new(ConnState::new(Some(l.header_read_timeout)));
        // Idle: the watchdog sleeps until the idle deadline, which comes
        // after the head's.
        s.arm(l.idle_timeout * 10);
        s.on_read(b"GET / HTTP/1.1\r\n");
        assert!(woken(&s).await, "the first head after an idle spell");
        // While a request is open the watchdog looks again within a header
        // timeout, so the next head needs no wake-up.
        let open = OpenRequest::new(s.clone());
        let (verdict, wait) = s.check(&l);
        assert_eq!(verdict, None);
        assert!(wait <= l.header_read_timeout, "{wait:?}");
        s.arm(wait);
        drop(open);
        s.on_read(b"GET / HTTP/1.1\r\n");
        assert!(
            !woken(&s).await,
            "a head while the watchdog looks soon anyway"
        );
        assert_ne!(s.head_since.load(Ordering::Relaxed), 0, "the head is timed");
    }

    #[test]
    fn h2_connections_only_time_out_when_idle() {
        let s = Arc::new(ConnState::new(Some(limits().header_read_timeout)));
        s.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        s.on_read(b"settings");
        assert_eq!(s.head_since.load(Ordering::Relaxed), 0);
        assert_eq!(s.check(&limits()).0, None);
    }

    #[test]
    fn a_head_keeps_no_part_of_the_read_buffer() {
        // A head as hyper leaves it: every part a slice of one buffer.
        let read = {
            let mut b = BytesMut::with_capacity(8192);
            b.extend_from_slice(b"example.com:8080/a/b?c=d\"quoted\"secret");
            b.freeze()
        };
        let part = |a: usize, b: usize| read.slice(a..b);
        let mut uri = Uri::from_parts({
            let mut p = http::uri::Parts::default();
            p.scheme = Some(http::uri::Scheme::HTTP);
            p.authority = Some(Authority::from_maybe_shared(part(0, 16)).unwrap());
            p.path_and_query = Some(PathAndQuery::from_maybe_shared(part(16, 24)).unwrap());
            p
        })
        .unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            "etag",
            HeaderValue::from_maybe_shared(part(24, 32)).unwrap(),
        );
        let mut secret = HeaderValue::from_maybe_shared(part(32, 38)).unwrap();
        secret.set_sensitive(true);
        headers.append("authorization", secret);
        headers.append("etag", HeaderValue::from_static("w"));
        let mut read = read;
        assert!(!read.is_unique(), "shared before");

        own_head(&mut uri, &mut headers);

        assert!(read.is_unique(), "no part of the buffer is left shared");
        read.clear();
        assert_eq!(uri.to_string(), "http://example.com:8080/a/b?c=d");
        assert_eq!(uri.query(), Some("c=d"));
        let etags: Vec<_> = headers.get_all("etag").iter().collect();
        assert_eq!(etags, ["\"quoted\"", "w"]);
        assert_eq!(headers["authorization"], "secret");
        assert!(headers["authorization"].is_sensitive());

        // An origin-form URI, as HTTP/1.1 sends: no authority made up.
        let mut uri: Uri = "/x?y".parse().unwrap();
        own_head(&mut uri, &mut HeaderMap::new());
        assert_eq!(uri, "/x?y");
        assert!(uri.authority().is_none());

        // CONNECT's authority-form: no path made up either.
        let mut uri: Uri = "example.com:443".parse().unwrap();
        own_head(&mut uri, &mut HeaderMap::new());
        assert_eq!(
            uri.authority().map(Authority::as_str),
            Some("example.com:443")
        );
        assert!(uri.path_and_query().is_none());
    }
}

#[cfg(test)]
mod held_writes {
    use super::*;
    use std::io::IoSlice;
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Each write a [`Recorder`] was given.
    type Writes = Arc<Mutex<Vec<Vec<u8>>>>;

    /// A socket that records each write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Writes,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn watched(h2: bool) -> (Watched<Recorder>, Writes, Arc<ConnState>) {
        let state = Arc::new(ConnState::new(None));
        state.h2.store(h2, Ordering::Relaxed);
        let recorder = Recorder::default();
        let writes = recorder.writes.clone();
        (Watched::new(recorder, state.clone()), writes, state)
    }

    /// Writes `bytes`; what the wrapper says it accepted.
    fn write(w: Pin<&mut Watched<Recorder>>, bytes: &[u8]) -> usize {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match w.poll_write(&mut cx, bytes) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("a write to a recorder returned {other:?}"),
        }
    }

    #[test]
    fn an_h2_connections_writes_in_one_poll_go_out_together_at_the_next() {
        let (mut w, writes, state) = watched(true);
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut w = Pin::new(&mut w);
        let vectored = [IoSlice::new(b"head"), IoSlice::new(b"er")];
        assert!(matches!(
            w.as_mut().poll_write_vectored(&mut cx, &vectored),
            Poll::Ready(Ok(6))
        ));
        assert!(matches!(
            w.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(write(w.as_mut(), b"+body"), 5);
        assert!(matches!(
            w.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert!(
            writes.lock().unwrap().is_empty(),
            "nothing is written in the poll that wrote"
        );
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            1,
            "the task is woken once to write them"
        );
        state.polls.fetch_add(1, Ordering::Relaxed);
        assert!(matches!(
            w.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(*writes.lock().unwrap(), vec![b"header+body".to_vec()]);
        // Nothing held: a flush writes nothing and wakes nobody.
        assert!(matches!(
            w.as_mut().poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(writes.lock().unwrap().len(), 1);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        // Held bytes are written before the connection shuts down.
        assert_eq!(write(w.as_mut(), b"goaway"), 6);
        assert!(matches!(
            w.as_mut().poll_shutdown(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(writes.lock().unwrap().last().unwrap(), b"goaway");
    }

    #[test]
    fn large_writes_and_writes_past_the_cap_go_out_at_once_after_what_is_held() {
        let (mut w, writes, _) = watched(true);
        let mut w = Pin::new(&mut w);
        assert_eq!(write(w.as_mut(), b"small"), 5);
        // The recorder writes one slice at a time, as a TLS session does:
        // what is held goes first, then the large write itself.
        let big = vec![7u8; WRITE_THROUGH];
        assert_eq!(write(w.as_mut(), &big), big.len());
        assert_eq!(
            *writes.lock().unwrap(),
            vec![b"small".to_vec(), big.clone()]
        );
        // Small writes up to the cap are held; the one past it goes out.
        let small = vec![1u8; WRITE_THROUGH - 1];
        let mut accepted = 0;
        while accepted + small.len() <= HOLD_MAX {
            assert_eq!(write(w.as_mut(), &small), small.len());
            accepted += small.len();
        }
        assert_eq!(writes.lock().unwrap().len(), 2);
        assert_eq!(write(w.as_mut(), &small), small.len());
        let writes = writes.lock().unwrap();
        assert_eq!(writes.len(), 4);
        assert_eq!(writes[2].len(), accepted);
        assert_eq!(writes[3], small);
        assert!(w.held.is_empty());
    }

    #[test]
    fn http1_writes_go_straight_through() {
        let (mut w, writes, _) = watched(false);
        let mut w = Pin::new(&mut w);
        assert_eq!(write(w.as_mut(), b"HTTP/1.1 200 OK\r\n"), 17);
        assert_eq!(writes.lock().unwrap().len(), 1);
    }
}
