//! The endpoint's UDP socket, as quinn sees it: quinn-udp's own, receiving
//! into fewer of quinn's buffers at a time.
//!
//! quinn's endpoint keeps one receive buffer for its life: 32 slots (one
//! per datagram `recvmmsg` may return) of the largest payload times the
//! most segments GRO may join, 32 MiB at the 16 KiB loopback payload. It
//! is zeroed memory the kernel only maps as datagrams are written into it,
//! and a GRO batch is at most 64 KiB, so each slot a burst ever reached
//! keeps up to 64 KiB resident from then on: up to 2 MiB per agent after
//! a burst or a bulk transfer, against about 6 MiB of heap for all else.
//! Receiving into the first [`RECV_SLOTS`] slots caps that at 512 KiB. A
//! backlog larger than that is read by the next `recvmmsg`, in the same
//! turn of the endpoint's loop.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

/// Slots of quinn's receive buffer one `recvmmsg` fills, at most.
pub const RECV_SLOTS: usize = 8;

/// quinn-udp's socket for the runtime, receiving into at most
/// [`RECV_SLOTS`] buffers a call.
pub struct Socket(Arc<dyn AsyncUdpSocket>);

impl Socket {
    /// Wraps the runtime's socket.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>) -> Arc<Self> {
        Arc::new(Self(inner))
    }
}

impl fmt::Debug for Socket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Socket").field(&self.0).finish()
    }
}

impl AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = bufs.len().min(meta.len()).min(RECV_SLOTS);
        self.0.poll_recv(cx, &mut bufs[..n], &mut meta[..n])
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_backlog_is_read_a_few_slots_at_a_time_and_whole() {
        let runtime = quinn::default_runtime().expect("tokio runtime");
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = std_socket.local_addr().unwrap();
        let socket = Socket::new(runtime.wrap_udp_socket(std_socket).unwrap());
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
}
