//! Stream halves that tell the connection cache they are in use.
//!
//! A connection carrying a stream must not be closed as idle, however long
//! the stream stays quiet (a WebSocket, a gRPC watch). Both halves of a
//! stream hold one [`Lease`] on their connection's [`Activity`]; the count
//! drops when the last half is dropped. They dereference to quinn's halves,
//! so every quinn method is there.

use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::clock::coarse_ms;

/// Use of one connection, shared by the cache and the streams on it.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// `epoch` on [`coarse_ms`]'s clock.
    epoch_ms: u64,
    /// Milliseconds since `epoch` of the last datagram or stream event, to
    /// a kernel tick: it is read on every stream, and only idleness of
    /// seconds depends on it.
    last: AtomicU64,
    /// Streams open now.
    streams: AtomicUsize,
    /// The concurrent bidirectional streams the peer may open now.
    pub(crate) bidi_limit: AtomicU32,
    /// Streams the peer opened since `counted_since` (see
    /// [`Activity::opened_quickly`]).
    opened: AtomicU32,
    /// When `opened` started counting, on [`coarse_ms`]'s clock.
    counted_since: AtomicU64,
}

impl Activity {
    pub(crate) fn new(epoch: Instant, bidi_limit: u32) -> Arc<Self> {
        let since = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let this = Arc::new(Self {
            epoch,
            epoch_ms: coarse_ms().saturating_sub(since),
            last: AtomicU64::new(0),
            streams: AtomicUsize::new(0),
            bidi_limit: AtomicU32::new(bidi_limit),
            opened: AtomicU32::new(0),
            counted_since: AtomicU64::new(coarse_ms()),
        });
        this.touch();
        this
    }

    pub(crate) fn touch(&self) {
        let ms = coarse_ms().saturating_sub(self.epoch_ms);
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    /// When it was last used.
    pub(crate) fn last(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    pub(crate) fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Counts a stream the peer opened; true when it has opened `limit`
    /// streams within `within_ms`, one after another or at once. The count
    /// starts again either way.
    pub(crate) fn opened_quickly(&self, limit: u32, within_ms: u64) -> bool {
        if self.opened.fetch_add(1, Ordering::Relaxed) + 1 < limit {
            return false;
        }
        self.opened.store(0, Ordering::Relaxed);
        let now = coarse_ms();
        let since = self.counted_since.swap(now, Ordering::Relaxed);
        now.saturating_sub(since) < within_ms
    }
}

/// One stream's hold on its connection.
#[derive(Debug)]
pub(crate) struct Lease(Arc<Activity>);

impl Lease {
    /// Counts a new stream; returns the lease and how many are open now.
    pub(crate) fn take(activity: &Arc<Activity>) -> (Arc<Self>, usize) {
        let open = activity.streams.fetch_add(1, Ordering::Relaxed) + 1;
        activity.touch();
        (Arc::new(Self(activity.clone())), open)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// The sending half of a bidirectional stream.
#[derive(Debug)]
pub struct SendStream {
    inner: quinn::SendStream,
    _lease: Arc<Lease>,
}

/// The receiving half of a bidirectional stream.
#[derive(Debug)]
pub struct RecvStream {
    inner: quinn::RecvStream,
    _lease: Arc<Lease>,
}

pub(crate) fn leased(
    (send, recv): (quinn::SendStream, quinn::RecvStream),
    lease: Arc<Lease>,
) -> (SendStream, RecvStream) {
    (
        SendStream {
            inner: send,
            _lease: lease.clone(),
        },
        RecvStream {
            inner: recv,
            _lease: lease,
        },
    )
}

impl Deref for SendStream {
    type Target = quinn::SendStream;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for SendStream {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Deref for RecvStream {
    type Target = quinn::RecvStream;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for RecvStream {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.inner), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.inner), cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allowance_opened_within_the_window_counts_as_busy_and_the_count_starts_again() {
        let activity = Activity::new(Instant::now(), 4);
        let quick: Vec<bool> = (0..8).map(|_| activity.opened_quickly(4, 60_000)).collect();
        assert_eq!(
            quick,
            [false, false, false, true, false, false, false, true]
        );
        // A window no count can finish within: never busy, however many.
        assert!((0..12).all(|_| !activity.opened_quickly(4, 0)));
    }
}
