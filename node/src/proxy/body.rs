//! Bodies that stream between HTTP and QUIC without buffering whole.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use gossamer_transport::{RecvStream, SendStream};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame as HttpFrame, Incoming, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;

use super::wire::{self, CHUNK, Frame, FrameDecoder};

/// Error type of proxied bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy hands to hyper, both ways.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

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

/// Reads body frames from a QUIC stream as an HTTP body. A reader task
/// decodes frames into a small channel, which gives backpressure.
pub fn from_quic(mut recv: RecvStream, counter: Counter) -> ProxyBody {
    let (tx, rx) = mpsc::channel::<Result<HttpFrame<Bytes>, BoxError>>(4);
    tokio::spawn(async move {
        let mut decoder = FrameDecoder::default();
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    decoder.extend(&chunk.bytes);
                    loop {
                        match decoder.next_frame() {
                            Ok(Some(Frame::Data(data))) => {
                                counter.inc_by(data.len() as u64);
                                if tx.send(Ok(HttpFrame::data(data))).await.is_err() {
                                    let _ = recv.stop(0u32.into());
                                    return;
                                }
                            }
                            Ok(Some(Frame::Trailers(t))) => {
                                let _ = tx
                                    .send(Ok(HttpFrame::trailers(wire::headers_from_wire(&t))))
                                    .await;
                            }
                            Ok(None) => break,
                            Err(e) => {
                                let _ = tx.send(Err(e.into())).await;
                                let _ = recv.stop(1u32.into());
                                return;
                            }
                        }
                    }
                }
                Ok(None) => {
                    if decoder.buffered() > 0 {
                        let _ = tx.send(Err("stream ended inside a frame".into())).await;
                    }
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            }
        }
    });
    ChannelBody { rx }.boxed_unsync()
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

/// Writes an HTTP body to a QUIC stream as frames, then finishes it.
pub async fn to_quic<B>(
    mut body: B,
    send: &mut SendStream,
    counter: &Counter,
) -> Result<(), BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(mut data) => {
                counter.inc_by(data.len() as u64);
                while !data.is_empty() {
                    let piece = data.split_to(data.len().min(CHUNK));
                    send.write_all(&wire::encode_frame(&Frame::Data(piece))?)
                        .await?;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let t = wire::headers_to_wire(&trailers, false);
                    send.write_all(&wire::encode_frame(&Frame::Trailers(t))?)
                        .await?;
                }
            }
        }
    }
    send.finish()?;
    Ok(())
}

/// A request body that can be handed to a second attempt as long as the
/// first one never read from it (a connect failure, say). It also tells
/// whether the *client* broke it (a malformed chunk, a disconnect), so that
/// a client's mistake is never charged to the instance.
#[derive(Clone)]
#[allow(missing_debug_implementations)]
pub struct Replayable {
    slot: Arc<Mutex<Option<Incoming>>>,
    touched: Arc<AtomicBool>,
    state: Arc<AtomicU8>,
    end_stream: bool,
}

const READING: u8 = 0;
const COMPLETE: u8 = 1;
const CLIENT_FAILED: u8 = 2;

impl Replayable {
    /// Wraps a request body.
    pub fn new(body: Incoming) -> Self {
        let end_stream = body.is_end_stream();
        Self {
            slot: Arc::new(Mutex::new(Some(body))),
            touched: Arc::new(AtomicBool::new(false)),
            state: Arc::new(AtomicU8::new(if end_stream { COMPLETE } else { READING })),
            end_stream,
        }
    }

    /// Whether another attempt can still send the whole body.
    pub fn replayable(&self) -> bool {
        self.end_stream || !self.touched.load(Ordering::Relaxed)
    }

    /// Whether the request has no body at all.
    pub fn is_empty(&self) -> bool {
        self.end_stream
    }

    /// Whether reading the client's body failed (its fault, not the
    /// instance's).
    pub fn client_failed(&self) -> bool {
        self.state.load(Ordering::Relaxed) == CLIENT_FAILED
    }

    /// Whether the client has sent its whole body.
    pub fn complete(&self) -> bool {
        self.state.load(Ordering::Relaxed) == COMPLETE
    }

    /// A body for one attempt.
    pub fn attempt(&self) -> ProxyBody {
        Attempt { body: self.clone() }.boxed_unsync()
    }
}

struct Attempt {
    body: Replayable,
}

impl Body for Attempt {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<HttpFrame<Bytes>, BoxError>>> {
        let mut slot = self.body.slot.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inner) = slot.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => {
                self.body.touched.store(true, Ordering::Relaxed);
                if inner.is_end_stream() {
                    self.body.state.store(COMPLETE, Ordering::Relaxed);
                }
            }
            Poll::Ready(None) => self.body.state.store(COMPLETE, Ordering::Relaxed),
            Poll::Ready(Some(Err(_))) => self.body.state.store(CLIENT_FAILED, Ordering::Relaxed),
            Poll::Pending => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.end_stream
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.body.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.as_ref().map(Body::size_hint).unwrap_or_default()
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
