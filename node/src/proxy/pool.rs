//! Connections to this node's HTTP/1.1 instances, kept open between
//! requests. A connection carries one request at a time: a request takes
//! an idle one that is still open (the most recently used first) or opens
//! a new one, and the answer's body gives it back when it ends. The
//! request's own task speaks HTTP/1.1 on it ([`h1`](super::h1)): no task
//! per connection, no channel between them, no URI to format and parse.
//! Upgrade requests (WebSocket) go through hyper on a connection of their
//! own, which the upgrade then keeps.
//!
//! A sweep every second closes connections idle past `idle_timeout`, and
//! half of those a burst left behind: the ones no request needed since the
//! last sweep (the fewest idle at any moment of the second), the longest
//! idle first, while two or more are spare. After a burst of 640
//! concurrent requests the pool is back to a spare connection or two in
//! about ten seconds instead of holding every one (and its buffers) for the
//! whole idle timeout; under steady load the spare ones are kept. With no
//! idle connection left the sweep sleeps until one comes back, so an agent
//! that proxies nothing does not wake for it.
//!
//! HTTP/2 instances multiplex every request on one connection and go
//! through hyper-util's client instead (see `dispatch`).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use super::body::{BoxError, ProxyBody};
use super::h1::{self, Conn, Outgoing};
use crate::tasks::Tasks;

/// How often the pool is swept: expired connections are closed, and half
/// of each instance's spare ones.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why a request did not get an answer.
#[derive(Debug)]
pub(super) enum PoolError {
    /// No connection: the cause.
    Connect(String),
    /// The request went out (or may have) and no answer came back.
    Request(String),
}

/// Idle HTTP/1.1 connections by instance address.
#[derive(Debug)]
pub(super) struct Pool {
    idle_timeout: Duration,
    max_idle: usize,
    /// By port, then address: no key to build for a lookup.
    slots: Mutex<HashMap<u16, Vec<Slot>>>,
    /// The sweep found nothing idle and waits for `woken`. Read and
    /// written with `slots` locked.
    asleep: AtomicBool,
    woken: Arc<Notify>,
}

#[derive(Debug)]
struct Slot {
    address: Arc<str>,
    /// The most recently given back last.
    idle: Vec<Idle>,
    /// The fewest idle connections since the last sweep: that many were
    /// not needed all that time.
    spare: usize,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// Where a connection out of the pool goes back.
#[derive(Debug)]
pub(super) struct Lease {
    pool: Weak<Pool>,
    address: Arc<str>,
    port: u16,
}

impl Lease {
    /// Returns `conn`, ready for another request, to the pool (if it is
    /// still there).
    pub(super) fn give_back(self, conn: Conn) {
        if let Some(pool) = self.pool.upgrade() {
            pool.give_back(self, conn);
        }
    }
}

impl Pool {
    /// Keeps up to `max_idle` idle connections per instance, each for at
    /// most `idle_timeout`; a task sweeps the pool while it lives.
    pub(super) fn new(idle_timeout: Duration, max_idle: usize, tasks: &Tasks) -> Arc<Self> {
        let pool = Arc::new(Self {
            idle_timeout,
            max_idle,
            slots: Mutex::new(HashMap::new()),
            asleep: AtomicBool::new(false),
            woken: Arc::new(Notify::new()),
        });
        let weak = Arc::downgrade(&pool);
        let woken = pool.woken.clone();
        let every = SWEEP_EVERY
            .min(idle_timeout / 2)
            .max(Duration::from_millis(1));
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                let idle = pool.sweep(Instant::now());
                drop(pool);
                if !idle {
                    // Until a connection comes back, or the pool is dropped.
                    woken.notified().await;
                    tick.reset();
                }
            }
        });
        pool
    }

    /// Sends `req` (origin-form, with its Host) to the instance at
    /// `address`:`port` on an idle connection, or on a new one opened
    /// within `connect_timeout`. The answer's body returns the connection
    /// to the pool when it ends. An `upgrade` request goes on a connection
    /// of its own, which a `101` answer hands to the upgrade.
    pub(super) async fn send(
        self: &Arc<Self>,
        address: &str,
        port: u16,
        req: Request<ProxyBody>,
        upgrade: bool,
        connect_timeout: Duration,
    ) -> Result<Response<Answer>, PoolError> {
        if upgrade {
            return self.send_upgrade(address, port, req, connect_timeout).await;
        }
        let (parts, body) = req.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let (head, outgoing) = h1::encode_head(&parts.method, path, &parts.headers, &body)
            .map_err(|e| PoolError::Request(e.to_string()))?;
        // Sent again, once, on a new connection when an idle one turns out
        // to have been closed by the instance before it answered: only
        // without a body, and only if sending it twice is harmless (the
        // instance may have read it before it closed).
        let again = outgoing == Outgoing::Length(0) && parts.method.is_idempotent();
        let mut body = Some(body);
        if let Some((conn, lease)) = self.take(address, port) {
            let sent = body.take().unwrap_or_else(super::body::empty);
            match h1::exchange(conn, head.clone(), sent, outgoing, &parts.method, lease).await {
                Ok(response) => return Ok(response.map(Answer::own)),
                Err(e) if e.closed_unanswered && again => {
                    debug!(error = %e, "idle upstream connection was closed; sending again");
                }
                Err(e) => return Err(PoolError::Request(e.to_string())),
            }
        }
        let conn = Conn::new(connect(address, port, connect_timeout).await?);
        let lease = Lease {
            pool: Arc::downgrade(self),
            address: self.address(address, port),
            port,
        };
        let sent = body.take().unwrap_or_else(super::body::empty);
        h1::exchange(conn, head, sent, outgoing, &parts.method, lease)
            .await
            .map(|response| response.map(Answer::own))
            .map_err(|e| PoolError::Request(e.to_string()))
    }

    /// An upgrade request, through hyper on a new connection.
    async fn send_upgrade(
        &self,
        address: &str,
        port: u16,
        req: Request<ProxyBody>,
        connect_timeout: Duration,
    ) -> Result<Response<Answer>, PoolError> {
        let stream = connect(address, port, connect_timeout).await?;
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream connection ended by an error");
            }
        });
        let response = sender
            .send_request(req)
            .await
            .map_err(|e| PoolError::Request(e.to_string()))?;
        Ok(Answer::unpooled(response))
    }

    /// The most recently used idle connection to `address`:`port` that is
    /// still open, and where it goes back. Closed and expired ones are
    /// dropped on the way.
    fn take(self: &Arc<Self>, address: &str, port: u16) -> Option<(Conn, Lease)> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .get_mut(&port)?
            .iter_mut()
            .find(|s| &*s.address == address)?;
        let now = Instant::now();
        while let Some(idle) = slot.idle.pop() {
            if now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_open() {
                slot.spare = slot.spare.min(slot.idle.len());
                let lease = Lease {
                    pool: Arc::downgrade(self),
                    address: slot.address.clone(),
                    port,
                };
                return Some((idle.conn, lease));
            }
        }
        slot.spare = 0;
        None
    }

    /// The shared name of `address`, its slot made if new.
    fn address(&self, address: &str, port: u16) -> Arc<str> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slot(&mut slots, address, port, || address.into())
            .address
            .clone()
    }

    fn give_back(&self, lease: Lease, conn: Conn) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // The sweep forgets instances with no idle connection, which
        // includes one whose connections are all out.
        let slot = slot(&mut slots, &lease.address, lease.port, || {
            lease.address.clone()
        });
        if slot.idle.len() < self.max_idle {
            slot.idle.push(Idle {
                conn,
                since: Instant::now(),
            });
            if self.asleep.load(Ordering::Relaxed) {
                self.asleep.store(false, Ordering::Relaxed);
                self.woken.notify_one();
            }
        }
    }

    /// Closes connections idle since before `now - idle_timeout`, or
    /// closed by their instance, then half of each instance's spare ones
    /// (rounded down: one spare stays), the longest idle first; forgets
    /// instances with none left. False when no connection is idle: the
    /// sweep then sleeps until one is given back.
    fn sweep(&self, now: Instant) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|_, list| {
            list.retain_mut(|slot| {
                slot.idle.retain(|idle| {
                    now.duration_since(idle.since) < self.idle_timeout && idle.conn.is_open()
                });
                let surplus = slot.spare.min(slot.idle.len()) / 2;
                if surplus > 0 {
                    // Oldest first: a connection is pushed when given back
                    // and taken from the end.
                    slot.idle.sort_unstable_by_key(|idle| idle.since);
                    slot.idle.drain(..surplus);
                }
                slot.spare = slot.idle.len();
                !slot.idle.is_empty()
            });
            !list.is_empty()
        });
        let idle = !slots.is_empty();
        self.asleep.store(!idle, Ordering::Relaxed);
        idle
    }

    /// Idle connections held open, all instances together.
    #[cfg(test)]
    pub(super) fn idle(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let open = |s: &Slot| s.idle.iter().filter(|i| i.conn.is_open()).count();
        slots.values().flatten().map(open).sum()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // A sleeping sweep wakes to find the pool gone and ends.
        self.woken.notify_one();
    }
}

/// The slot for `address`:`port`, made (named by `name`) if new.
fn slot<'a>(
    slots: &'a mut HashMap<u16, Vec<Slot>>,
    address: &str,
    port: u16,
    name: impl FnOnce() -> Arc<str>,
) -> &'a mut Slot {
    let list = slots.entry(port).or_default();
    let i = match list.iter().position(|s| &*s.address == address) {
        Some(i) => i,
        None => {
            list.push(Slot {
                address: name(),
                idle: Vec::new(),
                spare: 0,
            });
            list.len() - 1
        }
    };
    &mut list[i]
}

/// Opens a connection to `address`:`port` within `timeout`.
async fn connect(address: &str, port: u16, timeout: Duration) -> Result<TcpStream, PoolError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect((address, port)))
        .await
        .map_err(|_| PoolError::Connect(format!("no connection within {timeout:?}")))?
        .map_err(|e| PoolError::Connect(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// An instance's answer body. Read to its end, on a connection of the
/// pool, it gives the connection back; dropped earlier, the connection
/// is closed with it.
#[derive(Debug)]
pub(super) struct Answer(Inner);

#[derive(Debug)]
enum Inner {
    /// On a pooled connection.
    Own(h1::Exchange),
    /// Through hyper: HTTP/2, and upgrade requests.
    Hyper(Incoming),
}

impl Answer {
    fn own(exchange: h1::Exchange) -> Self {
        Self(Inner::Own(exchange))
    }

    /// An answer on a connection kept elsewhere (HTTP/2, an upgrade).
    pub(super) fn unpooled(response: Response<Incoming>) -> Response<Self> {
        response.map(|inner| Self(Inner::Hyper(inner)))
    }
}

impl Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.0 {
            Inner::Own(x) => Pin::new(x).poll_frame(cx).map_err(Into::into),
            Inner::Hyper(x) => Pin::new(x).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Own(x) => x.is_end_stream(),
            Inner::Hyper(x) => x.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Own(x) => x.size_hint(),
            Inner::Hyper(x) => x.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::proxy::body;

    /// An HTTP/1.1 instance answering "hello" to every request, keeping
    /// connections open unless `close`; counts the connections it accepts.
    async fn instance(close: bool) -> (u16, Arc<AtomicUsize>) {
        let (port, accepted, _) = instance_closing(close, false).await;
        (port, accepted)
    }

    /// With `hang_up`, it closes each connection right after its first
    /// answer without saying so (as an instance's own idle timeout does).
    /// Also counts the connections open now.
    async fn instance_closing(
        close: bool,
        hang_up: bool,
    ) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (count, open_now) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let open = Open::new(&open_now);
                tokio::spawn(async move {
                    let _open = open;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let answer = if close {
                                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"
                            } else {
                                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"
                            };
                            if stream.write_all(answer.as_bytes()).await.is_err()
                                || close
                                || hang_up
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (port, accepted, open)
    }

    /// Counts a connection open while alive.
    struct Open(Arc<AtomicUsize>);

    impl Open {
        fn new(count: &Arc<AtomicUsize>) -> Self {
            count.fetch_add(1, Ordering::SeqCst);
            Self(count.clone())
        }
    }

    impl Drop for Open {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn get() -> Request<ProxyBody> {
        let mut req = Request::new(body::empty());
        *req.uri_mut() = http::Uri::from_static("/");
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("x"));
        req
    }

    /// How long the tests' pools keep an idle connection.
    const IDLE: Duration = Duration::from_secs(30);

    /// A pool keeping connections [`IDLE`], and the tasks its sweep runs in.
    fn pool(max_idle: usize) -> (Tasks, Arc<Pool>) {
        let tasks = Tasks::new();
        let pool = Pool::new(IDLE, max_idle, &tasks);
        (tasks, pool)
    }

    /// A GET to the instance on `port`, its answer not yet read.
    async fn send(pool: &Arc<Pool>, port: u16) -> Result<Response<Answer>, PoolError> {
        pool.send("127.0.0.1", port, get(), false, Duration::from_secs(5))
            .await
    }

    /// A GET to the instance on `port`, its answer read to its end.
    async fn call(pool: &Arc<Pool>, port: u16) -> Result<Bytes, PoolError> {
        let response = send(pool, port).await?;
        Ok(response.into_body().collect().await.unwrap().to_bytes())
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        let (_tasks, pool) = pool(8);
        let (port, accepted) = instance(false).await;
        for _ in 0..50 {
            assert_eq!(call(&pool, port).await.unwrap(), "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    /// With the connection's task on another thread, it may not have
    /// taken up the next request yet when the answer ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sequential_requests_reuse_connections_on_many_threads() {
        let (_tasks, pool) = pool(8);
        let (port, accepted) = instance(false).await;
        for _ in 0..500 {
            assert_eq!(call(&pool, port).await.unwrap(), "hello");
        }
        let opened = accepted.load(Ordering::SeqCst);
        assert!(
            opened <= 8,
            "{opened} connections for 500 requests in a row"
        );
    }

    #[tokio::test]
    async fn concurrent_requests_each_get_a_connection_and_at_most_max_idle_stay() {
        let (_tasks, pool) = pool(3);
        let (port, accepted) = instance(false).await;
        // Ten answers held unread at once need ten connections.
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(send(&pool, port).await.unwrap());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 10);
        for response in held {
            response.into_body().collect().await.unwrap();
        }
        assert_eq!(pool.idle(), 3);
        for _ in 0..10 {
            call(&pool, port).await.unwrap();
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            10,
            "the kept ones are reused"
        );
    }

    #[tokio::test]
    async fn a_connection_the_instance_closes_is_not_used_again() {
        let (_tasks, pool) = pool(8);
        let (port, accepted) = instance(true).await;
        for _ in 0..20 {
            assert_eq!(call(&pool, port).await.unwrap(), "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_not_used_again() {
        let (_tasks, pool) = pool(8);
        let (port, accepted, _) = instance_closing(false, true).await;
        for _ in 0..5 {
            assert_eq!(call(&pool, port).await.unwrap(), "hello");
            // Let the hang-up arrive while the connection sits idle.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
        assert_eq!(pool.idle(), 0, "closed connections are not kept");
    }

    #[tokio::test]
    async fn an_answer_dropped_unread_closes_its_connection() {
        let (_tasks, pool) = pool(8);
        let (port, accepted) = instance(false).await;
        let response = send(&pool, port).await.unwrap();
        drop(response);
        assert_eq!(pool.idle(), 0);
        call(&pool, port).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn idle_connections_expire() {
        let (_tasks, pool) = pool(8);
        let (port, accepted) = instance(false).await;
        call(&pool, port).await.unwrap();
        pool.sweep(Instant::now());
        assert_eq!(pool.idle(), 1, "not yet expired");
        pool.sweep(Instant::now() + IDLE);
        assert_eq!(pool.idle(), 0);
        call(&pool, port).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// `n` requests in flight at once to the instance on `port`, their
    /// answers then read, so that `n` connections go back to the pool.
    async fn burst(pool: &Arc<Pool>, port: u16, n: usize) {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(send(pool, port).await.unwrap());
        }
        for response in held {
            response.into_body().collect().await.unwrap();
        }
    }

    /// Polls until the instance has `n` connections open.
    async fn open_reaches(open: &AtomicUsize, n: usize) {
        for _ in 0..500 {
            if open.load(Ordering::SeqCst) == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} connections open, not {n}", open.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn each_sweep_closes_half_the_connections_a_burst_left_spare() {
        let (_tasks, pool) = pool(64);
        let (port, accepted, open) = instance_closing(false, false).await;
        burst(&pool, port, 16).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 16);
        let mut kept = Vec::new();
        for _ in 0..6 {
            pool.sweep(Instant::now());
            kept.push(pool.idle());
        }
        // All 16 were in use during the first second: none is spare yet.
        assert_eq!(kept, [16, 8, 4, 2, 1, 1]);
        open_reaches(&open, 1).await;
        // The one kept is reused; a second request at once opens one more.
        call(&pool, port).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 16);
        burst(&pool, port, 2).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 17);
    }

    #[tokio::test]
    async fn connections_needed_since_the_last_sweep_are_not_spare() {
        let (_tasks, pool) = pool(64);
        let (port, accepted, open) = instance_closing(false, false).await;
        burst(&pool, port, 16).await;
        pool.sweep(Instant::now());
        assert_eq!(pool.idle(), 16);
        // Ten at once: six stayed idle the whole second, three of them go.
        burst(&pool, port, 10).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 16, "all reused");
        pool.sweep(Instant::now());
        assert_eq!(pool.idle(), 13);
        open_reaches(&open, 13).await;
        // A steady trickle, one request at a time, keeps one in use.
        for _ in 0..4 {
            call(&pool, port).await.unwrap();
            pool.sweep(Instant::now());
        }
        assert_eq!(pool.idle(), 2, "13 - 6 - 3 - 1 - 1: one in use, one spare");
        assert_eq!(accepted.load(Ordering::SeqCst), 16);
    }

    #[tokio::test]
    async fn the_sweep_sleeps_while_nothing_is_idle_and_wakes_when_a_connection_comes_back() {
        let tasks = Tasks::new();
        // Swept every 200 ms.
        let pool = Pool::new(Duration::from_millis(400), 8, &tasks);
        let (port, _) = instance(false).await;
        // Nothing idle at the first sweep: it sleeps.
        tokio::time::sleep(Duration::from_millis(500)).await;
        call(&pool, port).await.unwrap();
        assert_eq!(pool.idle(), 1);
        // Woken by the connection's return, it closes it when it expires.
        for _ in 0..500 {
            if pool.idle() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the idle connection outlived its timeout by 5 s");
    }

    #[tokio::test]
    async fn a_connection_out_during_a_sweep_is_kept_when_it_comes_back() {
        let (_tasks, pool) = pool(8);
        let (port, accepted) = instance(false).await;
        let response = send(&pool, port).await.unwrap();
        // No idle connection: the sweep forgets the instance.
        pool.sweep(Instant::now());
        response.into_body().collect().await.unwrap();
        assert_eq!(pool.idle(), 1);
        call(&pool, port).await.unwrap();
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let (_tasks, pool) = pool(8);
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        match call(&pool, port).await {
            Err(PoolError::Connect(cause)) => assert!(cause.contains("refused"), "{cause}"),
            other => panic!("{other:?}"),
        }
    }
}
