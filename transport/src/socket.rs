//! The endpoint's UDP socket, as quinn sees it: quinn-udp's system calls
//! on a socket registered with tokio for reading only, receiving into few
//! of quinn's buffers at a time.
//!
//! **No wake-up for writing.** tokio's own UDP socket (quinn's default)
//! is registered for readable and writable events, and the kernel raises
//! a writable event each time a sent datagram's buffer is freed: on
//! loopback, just after every send. At a sidecar's rates that is one more
//! turn of the event loop (an `epoll_wait` that finds only that) for each
//! request. Writes here go straight to the socket; only when the kernel
//! says it would block does a copy of the descriptor register for
//! writable events, and only until the socket is writable again.
//!
//! **No empty read after a short one.** quinn reads until the socket has
//! nothing left, which is one `recvmmsg` that finds nothing after each
//! that found something. A read that filled fewer slots than it offered
//! emptied the socket's queue, so the socket's readiness is cleared then
//! (tokio keeps it if an event arrived since) and the next read waits for
//! the kernel's next event instead of asking.
//!
//! **A bounded receive.** quinn's endpoint keeps one receive buffer for
//! its life: 32 slots (one per datagram `recvmmsg` may return) of the
//! largest payload times the most segments GRO may join, 32 MiB at the
//! 16 KiB loopback payload. It is zeroed memory the kernel only maps as
//! datagrams are written into it, and a GRO batch is at most 64 KiB, so
//! each slot a burst ever reached keeps up to 64 KiB resident from then
//! on: up to 2 MiB per agent after a burst or a bulk transfer, against
//! about 6 MiB of heap for all else. Receiving into the first
//! [`RECV_SLOTS`] slots caps that at 512 KiB. A backlog larger than that
//! is read by the next `recvmmsg`, in the same turn of the endpoint's
//! loop.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// Slots of quinn's receive buffer one `recvmmsg` fills, at most.
pub const RECV_SLOTS: usize = 8;

/// A UDP socket for quinn's endpoint, registered with tokio for reading.
pub struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// The last send would have blocked, and no wait has seen the socket
    /// writable since.
    blocked: AtomicBool,
}

impl Socket {
    /// Takes over `socket` (made non-blocking here); must be called
    /// within a tokio runtime.
    pub fn new(socket: std::net::UdpSocket) -> io::Result<Arc<Self>> {
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        let io = register(socket, Interest::READABLE)?;
        Ok(Arc::new(Self {
            io,
            state,
            blocked: AtomicBool::new(false),
        }))
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Socket")
            .field("local", &self.io.get_ref().local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.blocked.store(true, Ordering::Release);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len()).min(RECV_SLOTS);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            let read = guard.try_io(|io| {
                self.state
                    .recv(io.get_ref().into(), &mut bufs[..slots], &mut meta[..slots])
            });
            match read {
                Ok(Ok(n)) => {
                    if n < slots {
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                // An error the socket reports once (an ICMP error for an
                // earlier datagram, say) is not the endpoint's end: quinn
                // stops its endpoint on any error but a reset, so read on,
                // as quinn's own tokio socket does.
                Ok(Err(e)) => tracing::debug!(error = %e, "UDP receive failed; reading on"),
                // Nothing there after all: readiness cleared, wait again.
                Err(_would_block) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Registers `fd` with the runtime's reactor for `interest` alone.
#[allow(unsafe_code)]
fn register<T: AsRawFd>(fd: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `T` is a `UdpSocket` or an `OwnedFd` here. Each owns its
    // descriptor, keeps it open until it is dropped with the `AsyncFd`, and
    // returns that same descriptor from every `as_raw_fd`.
    Ok(unsafe { AsyncFd::register_with_interest(fd, interest) }?)
}

/// Tells quinn, for one connection or the endpoint, whether to send: at
/// once, unless the last send would have blocked. Then a copy of the
/// socket's descriptor is registered for writable events until one comes.
struct Writable {
    socket: Arc<Socket>,
    waiting: Option<Wait>,
}

/// What a blocked sender waits on.
enum Wait {
    /// A copy of the socket's descriptor, registered for writable events.
    Event(AsyncFd<OwnedFd>),
    /// A short sleep, when no copy could be made or registered (the
    /// process is out of descriptors, say): the sender tries again after
    /// it instead of failing its connection.
    Retry(Pin<Box<tokio::time::Sleep>>),
}

/// How long a blocked sender waits before trying again when the socket
/// cannot be watched for writable events.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(1);

impl Wait {
    fn new(socket: &Socket) -> Self {
        let watched = socket
            .io
            .get_ref()
            .as_fd()
            .try_clone_to_owned()
            .and_then(|copy| register(copy, Interest::WRITABLE));
        match watched {
            // Registering reports a socket already writable at once.
            Ok(fd) => Self::Event(fd),
            Err(e) => {
                tracing::debug!(error = %e, "cannot watch the UDP socket for writing; retrying the send shortly");
                Self::Retry(Box::pin(tokio::time::sleep(RETRY_AFTER)))
            }
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Self::Event(fd) => fd.poll_write_ready(cx).map_ok(|_writable| ()),
            Self::Retry(sleep) => sleep.as_mut().poll(cx).map(Ok),
        }
    }
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable")
            .field("waiting", &self.waiting.is_some())
            .finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.socket.blocked.load(Ordering::Acquire) {
            this.waiting = None;
            return Poll::Ready(Ok(()));
        }
        let waiting = this.waiting.get_or_insert_with(|| Wait::new(&this.socket));
        let waited = ready!(waiting.poll(cx));
        this.waiting = None;
        this.socket.blocked.store(false, Ordering::Release);
        Poll::Ready(waited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backlog_is_read_a_few_slots_at_a_time_and_whole() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = std_socket.local_addr().unwrap();
        let socket = Socket::new(std_socket).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Different sizes, so GRO cannot join them into fewer messages.
        let sent: Vec<Vec<u8>> = (0..3 * RECV_SLOTS)
            .map(|i| vec![i as u8; 100 + i])
            .collect();
        for d in &sent {
            sender.send_to(d, to).unwrap();
        }
        let mut storage = vec![[0u8; 2048]; 32];
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < sent.len() && tokio::time::Instant::now() < deadline {
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); 32];
            let n = std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta))
                .await
                .unwrap();
            assert!(n <= RECV_SLOTS, "{n} slots filled in one call");
            for (m, b) in meta.iter().zip(&bufs).take(n) {
                for d in b[..m.len].chunks(m.stride) {
                    got.push(d.to_vec());
                }
            }
        }
        assert_eq!(got, sent);
    }

    #[tokio::test]
    async fn each_datagram_after_a_short_read_wakes_the_reader() {
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = std_socket.local_addr().unwrap();
        let socket = Socket::new(std_socket).unwrap();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut storage = vec![[0u8; 2048]; RECV_SLOTS];
        for i in 0..200u32 {
            // One datagram at a time: every read is short and clears the
            // readiness, so only the kernel's next event can wake it.
            let sending = tokio::spawn({
                let sender = sender.try_clone().unwrap();
                async move {
                    tokio::task::yield_now().await;
                    sender.send_to(&i.to_be_bytes(), to).unwrap();
                }
            });
            let mut bufs: Vec<IoSliceMut<'_>> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = [RecvMeta::default(); RECV_SLOTS];
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .unwrap_or_else(|_| panic!("datagram {i} never woke the reader"))
            .unwrap();
            assert_eq!(n, 1);
            assert_eq!(&bufs[0][..meta[0].len], &i.to_be_bytes());
            sending.await.unwrap();
        }
    }

    #[tokio::test]
    async fn quinn_sends_at_once_and_waits_only_after_a_blocked_send() {
        let socket = Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let mut poller = socket.clone().create_io_poller();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(poller.as_mut().poll_writable(&mut cx).is_ready());
        // As after a send the kernel refused: the wait registers for
        // writable events and ends at the first.
        socket.blocked.store(true, Ordering::Release);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)),
        )
        .await
        .expect("a writable socket is reported writable")
        .unwrap();
        assert!(!socket.blocked.load(Ordering::Acquire));
        assert!(poller.as_mut().poll_writable(&mut cx).is_ready());
    }

    #[tokio::test]
    async fn a_sender_that_cannot_watch_the_socket_tries_again_after_a_pause() {
        let socket = Socket::new(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        // As when no descriptor could be spared for the writable events.
        let mut poller = Writable {
            socket: socket.clone(),
            waiting: Some(Wait::Retry(Box::pin(tokio::time::sleep(RETRY_AFTER)))),
        };
        socket.blocked.store(true, Ordering::Release);
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            std::future::poll_fn(|cx| Pin::new(&mut poller).poll_writable(cx)),
        )
        .await
        .expect("the pause ends")
        .unwrap();
        assert!(!socket.blocked.load(Ordering::Acquire));
        assert!(poller.waiting.is_none());
    }
}
