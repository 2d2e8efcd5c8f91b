//! Bodies that stream between HTTP and QUIC without buffering whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use gossamer_transport::{RecvStream, SendStream};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame as HttpFrame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::wire::{self, CHUNK, Frame, FrameDecoder};

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy hands to hyper, both ways.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The HTTP client over plain TCP: B's HTTP/2 upstreams, health checks,
/// the CLI and the demo all use this one type, so hyper's client code
/// exists once in the binary for it.
pub type HttpClient = Client<HttpConnector, ProxyBody>;
/// The HTTP client over TLS (external services, trace export).
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, ProxyBody>;

/// An [`HttpClient`] with hyper's defaults.
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A body that is empty.
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Reads body frames from a QUIC stream as an HTTP body, decoding them
/// as hyper polls for the next one: no task or channel in between, so a
/// frame already received goes out in the same write as the head, and
/// quinn's flow control is the backpressure. Dropped before the end, it
/// stops the stream.
pub fn from_quic(recv: RecvStream, counter: Counter) -> ProxyBody {
    QuicBody {
        recv,
        decoder: FrameDecoder::default(),
        counter,
        done: false,
    }
    .boxed_unsync()
}

struct QuicBody {
    recv: RecvStream,
    decoder: FrameDecoder,
    counter: Counter,
    /// The stream ended or failed: nothing more to read or stop.
    done: bool,
}

impl QuicBody {
    fn fail(&mut self, e: BoxError, code: u32) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        self.done = true;
        let _ = self.recv.stop(code.into());
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for QuicBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            match this.decoder.next_frame() {
                Ok(Some(Frame::Data(data))) => {
                    this.counter.inc_by(data.len() as u64);
                    return Poll::Ready(Some(Ok(HttpFrame::data(data))));
                }
                Ok(Some(Frame::Trailers(t))) => {
                    return Poll::Ready(Some(Ok(HttpFrame::trailers(wire::headers_from_wire(&t)))));
                }
                Ok(None) => {}
                Err(e) => return this.fail(e.into(), 1),
            }
            if this.done {
                return Poll::Ready(None);
            }
            let read = std::pin::pin!(this.recv.read_chunk(CHUNK, true));
            match std::task::ready!(read.poll(cx)) {
                Ok(Some(chunk)) => this.decoder.push(chunk.bytes),
                Ok(None) => {
                    this.done = true;
                    if this.decoder.buffered() > 0 {
                        return Poll::Ready(Some(Err("stream ended inside a frame".into())));
                    }
                    return Poll::Ready(None);
                }
                Err(e) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.decoder.buffered() == 0
    }
}

impl Drop for QuicBody {
    fn drop(&mut self) {
        // hyper stops polling once a body's declared length is written,
        // so the stream's end is usually received but not yet read.
        if !self.done {
            let _ = end_read(&mut self.recv);
        }
    }
}

/// Done with reading `recv`: reads its end if that has arrived with
/// nothing before it, else stops it. quinn sends a STOP_SENDING even for
/// a stream whose data has all arrived, and the peer acknowledges it at
/// once: two packets for nothing on every request without a body.
/// `true` if the stream had ended.
pub fn end_read(recv: &mut RecvStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let ended = {
        let read = std::pin::pin!(recv.read_chunk(CHUNK, true));
        matches!(read.poll(&mut cx), Poll::Ready(Ok(None)))
    };
    if !ended {
        let _ = recv.stop(0u32.into());
    }
    ended
}

/// A body fed by a channel of frames.
pub fn from_channel(rx: mpsc::Receiver<Result<HttpFrame<Bytes>, BoxError>>) -> ProxyBody {
    ChannelBody { rx }.boxed_unsync()
}

struct ChannelBody {
    rx: mpsc::Receiver<Result<HttpFrame<Bytes>, BoxError>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// How long a response head waits for its body's first bytes, when the
/// body's length is known and they are not in yet.
pub const HEAD_WAITS_FOR_BODY: std::time::Duration = std::time::Duration::from_millis(1);

/// Writes an HTTP body to a QUIC stream as frames, then finishes it.
pub async fn to_quic<B>(body: B, send: &mut SendStream, counter: &Counter) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    send_body(None, None, body, send, counter).await
}

/// Writes a response's encoded `head`, then its body as [`to_quic`] does.
///
/// An instance often writes its head and its body in two writes (nginx: a
/// `writev`, then a `sendfile`), and the agent may read between them. The
/// head then left in a packet of its own, and the caller's agent woke and
/// wrote to its client twice for the one answer. So a head whose body has
/// a known length waits for the body's first bytes, up to
/// [`HEAD_WAITS_FOR_BODY`], and leaves with them. A body without a length
/// (chunked, or read to the connection's close, as event streams are) does
/// not hold its head back.
pub async fn head_then_body<B>(
    head: Bytes,
    mut body: B,
    send: &mut SendStream,
    counter: &Counter,
) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() || body.size_hint().exact().is_none() {
        send.write_chunk(head).await?;
        return send_body(None, None, body, send, counter).await;
    }
    // Polled before the timer is set: a body already read costs no timer.
    match tokio::time::timeout(HEAD_WAITS_FOR_BODY, body.frame()).await {
        Ok(Some(Ok(first))) => send_body(Some(head), Some(first), body, send, counter).await,
        Ok(Some(Err(e))) => {
            // The caller hears the head, then the stream's reset.
            send.write_chunk(head).await?;
            Err(e.into())
        }
        Ok(None) | Err(_) => {
            send.write_chunk(head).await?;
            send_body(None, None, body, send, counter).await
        }
    }
}

/// The body's frames, then the stream's end; `head`, if given, is not yet
/// written and leaves with the first data, and `first` is a frame already
/// read from `body`.
async fn send_body<B>(
    mut head: Option<Bytes>,
    mut first: Option<HttpFrame<Bytes>>,
    mut body: B,
    send: &mut SendStream,
    counter: &Counter,
) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    // A body that knows it has ended (its declared length all read) is
    // not polled for its end: that can take one more wake-up, and the
    // stream's end would then leave in a packet of its own.
    while first.is_some() || !body.is_end_stream() {
        let frame = match first.take() {
            Some(frame) => frame,
            None => match body.frame().await {
                Some(frame) => frame.map_err(Into::into)?,
                None => break,
            },
        };
        match frame.into_data() {
            Ok(mut data) => {
                counter.inc_by(data.len() as u64);
                while !data.is_empty() {
                    // The header, then the data as it is: quinn queues
                    // both (and a head still waiting) without copying.
                    let piece = data.split_to(data.len().min(CHUNK));
                    let header = wire::data_header(piece.len());
                    match head.take() {
                        Some(h) => send.write_all_chunks(&mut [h, header, piece]).await?,
                        None => send.write_all_chunks(&mut [header, piece]).await?,
                    }
                }
            }
            Err(frame) => {
                if let Some(h) = head.take() {
                    send.write_chunk(h).await?;
                }
                if let Ok(trailers) = frame.into_trailers() {
                    let t = wire::headers_to_wire(&trailers, false);
                    send.write_all(&wire::encode_frame(&Frame::Trailers(t))?)
                        .await?;
                }
            }
        }
    }
    if let Some(h) = head {
        send.write_chunk(h).await?;
    }
    send.finish()?;
    Ok(())
}

/// How much of a request body is kept so that a retry (or a mirror) can
/// send it again. A longer body streams through once and is not retried.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// A request body that later attempts can send again: the frames one
/// attempt reads are kept (up to [`REPLAY_LIMIT`] bytes) and replayed to
/// the next. It also tells whether the *client* broke it (a malformed
/// chunk, a disconnect), so that a client's mistake is never charged to
/// the instance. A new attempt supersedes the older ones, whose bodies
/// then fail rather than steal frames from it.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Replayable {
    /// One allocation for the kept frames and the state: made for every
    /// proxied request.
    shared: Arc<Shared>,
    end_stream: bool,
    /// The whole body's length, when known.
    length: Option<u64>,
}

struct Shared {
    replay: Mutex<Replay>,
    state: AtomicU8,
}

struct Replay {
    /// The client's body, while it has more to give.
    incoming: Option<Incoming>,
    /// What attempts read so far, in order; emptied on overflow.
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// More than [`REPLAY_LIMIT`] was read: no attempt can resend it.
    overflow: bool,
    /// Frames read from `incoming` so far.
    read: usize,
    /// The newest attempt; older ones are superseded.
    generation: u32,
    /// Most body bytes the client may send (a gateway's cap).
    limit: u64,
    /// Body bytes read so far.
    total: u64,
}

#[derive(Clone)]
enum Kept {
    Data(Bytes),
    Trailers(http::HeaderMap),
}

const READING: u8 = 0;
const COMPLETE: u8 = 1;
const CLIENT_FAILED: u8 = 2;
const TOO_LARGE: u8 = 3;

impl Replayable {
    /// Wraps a request body.
    pub fn new(body: Incoming) -> Self {
        let end_stream = body.is_end_stream();
        let length = body.size_hint().exact();
        Self::with(Some(body), Vec::new(), end_stream, length)
    }

    fn with(
        incoming: Option<Incoming>,
        kept: Vec<Kept>,
        end_stream: bool,
        length: Option<u64>,
    ) -> Self {
        let complete = end_stream || incoming.is_none();
        let kept_bytes = kept
            .iter()
            .map(|k| match k {
                Kept::Data(d) => d.len(),
                Kept::Trailers(_) => 0,
            })
            .sum();
        Self {
            shared: Arc::new(Shared {
                replay: Mutex::new(Replay {
                    read: kept.len(),
                    incoming,
                    kept,
                    kept_bytes,
                    overflow: false,
                    generation: 0,
                    limit: u64::MAX,
                    total: 0,
                }),
                state: AtomicU8::new(if complete { COMPLETE } else { READING }),
            }),
            end_stream,
            length,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Replay> {
        self.shared.replay.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Caps the body at `limit` bytes: past it, reading fails and
    /// [`Self::too_large`] tells why.
    pub fn limited(self, limit: Option<u64>) -> Self {
        if let Some(limit) = limit {
            self.lock().limit = limit;
        }
        self
    }

    /// Whether the client sent more than the cap.
    pub fn too_large(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) == TOO_LARGE
    }

    /// Whether another attempt can still send the whole body.
    pub fn replayable(&self) -> bool {
        self.end_stream || !self.lock().overflow
    }

    /// Whether the request has no body at all.
    pub fn is_empty(&self) -> bool {
        self.end_stream
    }

    /// Whether reading the client's body failed (its fault, not the
    /// instance's).
    pub fn client_failed(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) == CLIENT_FAILED
    }

    /// Whether the client has sent its whole body.
    pub fn complete(&self) -> bool {
        self.shared.state.load(Ordering::Relaxed) == COMPLETE
    }

    /// A body for one attempt: what earlier attempts read, then the rest
    /// of the client's body. Earlier attempts' bodies stop here.
    pub fn attempt(&self) -> ProxyBody {
        let generation = {
            let mut r = self.lock();
            r.generation = r.generation.wrapping_add(1);
            r.generation
        };
        Attempt {
            body: self.clone(),
            generation,
            position: 0,
        }
        .boxed_unsync()
    }

    /// An independent copy of the whole body, if the client has sent all
    /// of it and it was short enough to keep (what a mirror sends).
    pub fn copy(&self) -> Option<Self> {
        if self.end_stream {
            return Some(Self::with(None, Vec::new(), true, Some(0)));
        }
        let r = self.lock();
        (self.complete() && !r.overflow && r.incoming.is_none())
            .then(|| Self::with(None, r.kept.clone(), false, self.length))
    }
}

struct Attempt {
    body: Replayable,
    generation: u32,
    /// Frames this attempt has sent.
    position: usize,
}

impl Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let mut r = this.body.lock();
        if r.generation != this.generation {
            return Poll::Ready(Some(Err("superseded by a retry".into())));
        }
        if this.position < r.read {
            if r.overflow {
                return Poll::Ready(Some(Err("request body too long to send again".into())));
            }
            let frame = match r.kept[this.position].clone() {
                Kept::Data(d) => HttpFrame::data(d),
                Kept::Trailers(t) => HttpFrame::trailers(t),
            };
            this.position += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        let Some(inner) = r.incoming.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                let end = inner.is_end_stream();
                if let Some(d) = frame.data_ref() {
                    r.total += d.len() as u64;
                    if r.total > r.limit {
                        let limit = r.limit;
                        r.incoming = None;
                        this.body.shared.state.store(TOO_LARGE, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(format!(
                            "request body larger than {limit} bytes"
                        )
                        .into())));
                    }
                }
                let kept = match frame.data_ref() {
                    Some(d) => Kept::Data(d.clone()),
                    None => Kept::Trailers(frame.trailers_ref().cloned().unwrap_or_default()),
                };
                r.read += 1;
                this.position += 1;
                if !r.overflow {
                    if let Kept::Data(d) = &kept {
                        r.kept_bytes += d.len();
                    }
                    if r.kept_bytes > REPLAY_LIMIT {
                        r.overflow = true;
                        r.kept = Vec::new();
                    } else {
                        r.kept.push(kept);
                    }
                }
                if end {
                    r.incoming = None;
                    this.body.shared.state.store(COMPLETE, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => {
                r.incoming = None;
                this.body.shared.state.store(COMPLETE, Ordering::Relaxed);
            }
            Poll::Ready(Some(Err(_))) => this
                .body
                .shared
                .state
                .store(CLIENT_FAILED, Ordering::Relaxed),
            Poll::Pending => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        if self.body.end_stream {
            return true;
        }
        let r = self.body.lock();
        r.generation == self.generation && self.position >= r.read && r.incoming.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.body.length {
            Some(n) if self.position == 0 => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// `body`, holding `guard` until it ends or is dropped (a circuit
/// breaker's count lasts as long as the response streams).
pub fn holding<G: Send + Unpin + 'static>(body: ProxyBody, guard: G) -> ProxyBody {
    Holding {
        inner: body,
        guard: Some(guard),
    }
    .boxed_unsync()
}

struct Holding<G> {
    inner: ProxyBody,
    guard: Option<G>,
}

impl<G: Send + Unpin + 'static> Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        // `Holding` is Unpin: both fields are.
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the data bytes of a body as they pass.
pub(crate) struct Counting<B> {
    inner: B,
    counter: Counter,
}

impl<B> Counting<B>
where
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Wraps `inner` into a proxy body.
    pub(crate) fn boxed(inner: B, counter: Counter) -> ProxyBody {
        Self { inner, counter }.boxed_unsync()
    }
}

impl<B> Body for Counting<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.counter.inc_by(data.len() as u64);
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use gossamer_transport::pki;
    use gossamer_transport::{Inbound, MeshIdentity, Transport, TransportConfig};

    use super::*;

    fn identity(dir: &std::path::Path, ca: &pki::PemPair, name: &str) -> MeshIdentity {
        let node = pki::issue_node_cert(ca, name, "test.mesh").unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(dir.join("ca.pem"), &ca.cert).unwrap();
        std::fs::write(&cert, &node.cert).unwrap();
        std::fs::write(&key, &node.key).unwrap();
        MeshIdentity::load(&dir.join("ca.pem"), &cert, &key, Some(name)).unwrap()
    }

    /// A body of `data` that arrives `after` its head, with its length
    /// known or not, as an instance's answer read from its connection.
    struct Late {
        data: Option<Bytes>,
        sleep: Pin<Box<tokio::time::Sleep>>,
        known: bool,
    }

    impl Body for Late {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
            std::task::ready!(self.sleep.as_mut().poll(cx));
            Poll::Ready(self.data.take().map(|d| Ok(HttpFrame::data(d))))
        }

        fn is_end_stream(&self) -> bool {
            self.data.is_none()
        }

        fn size_hint(&self) -> SizeHint {
            match (&self.data, self.known) {
                (Some(d), true) => SizeHint::with_exact(d.len() as u64),
                (None, _) => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            }
        }
    }

    /// The bytes of the first STREAM frame the caller receives, and all of
    /// them, for a head and a 1 KiB body sent `after` it.
    async fn first_chunk(after: Duration, known: bool) -> (usize, usize) {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca("test.mesh").unwrap();
        let bind = |id| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            Transport::bind(id, TransportConfig::default(), socket).unwrap()
        };
        let (caller, _caller_q) = bind(identity(dir.path(), &ca, "caller"));
        let (owner, mut owner_q) = bind(identity(dir.path(), &ca, "owner"));
        let (mut send, mut recv) = caller
            .open_bi("owner", owner.local_addr().unwrap())
            .await
            .unwrap();
        send.write_all(b"request").await.unwrap();
        send.finish().unwrap();
        let Some(Inbound::Stream {
            send: mut answer, ..
        }) = owner_q.streams.recv().await
        else {
            panic!("no stream");
        };
        let body = Late {
            data: Some(Bytes::from(vec![b'x'; 1024])),
            sleep: Box::pin(tokio::time::sleep(after)),
            known,
        };
        let head = Bytes::from_static(b"a response head");
        let sent = tokio::spawn(async move {
            head_then_body(head, body, &mut answer, &Counter::default()).await
        });
        let first = recv.read_chunk(usize::MAX, true).await.unwrap().unwrap();
        let mut total = first.bytes.len();
        while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.unwrap() {
            total += chunk.bytes.len();
        }
        sent.await.unwrap().unwrap();
        (first.bytes.len(), total)
    }

    #[tokio::test]
    async fn a_head_waits_for_its_body_s_first_bytes_when_its_length_is_known() {
        let head = b"a response head".len();
        let (first, total) = first_chunk(Duration::from_micros(200), true).await;
        assert!(
            total > head + 1024,
            "the whole answer arrives ({total} bytes)"
        );
        assert_eq!(first, total, "head and body arrive together");
    }

    #[tokio::test]
    async fn a_head_waits_no_longer_than_its_limit_or_for_a_body_of_unknown_length() {
        let head = b"a response head".len();
        let late = HEAD_WAITS_FOR_BODY * 50;
        let (first, total) = first_chunk(late, true).await;
        assert_eq!(first, head, "the head leaves alone once the wait is over");
        assert!(total > head + 1024);
        let (first, _) = first_chunk(late, false).await;
        assert_eq!(
            first, head,
            "a body of unknown length does not hold its head"
        );
    }
}
