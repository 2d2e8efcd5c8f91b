//! Two and three transports on loopback: datagrams, streams, identity checks.

use std::time::Duration;

use bytes::Bytes;
use gossamer_transport::frame::{read_frame, write_frame};
use gossamer_transport::pki::{self, PemPair};
use gossamer_transport::revocation;
use gossamer_transport::{Inbound, MeshIdentity, Stats, Transport, TransportConfig};
use tokio::sync::mpsc::Receiver;

fn identity(dir: &std::path::Path, ca: &PemPair, name: &str) -> MeshIdentity {
    let node = pki::issue_node_cert(ca, name, "test.mesh").unwrap();
    let ca_p = dir.join(format!("{name}-ca.pem"));
    let cert_p = dir.join(format!("{name}.pem"));
    let key_p = dir.join(format!("{name}.key"));
    std::fs::write(&ca_p, &ca.cert).unwrap();
    std::fs::write(&cert_p, &node.cert).unwrap();
    std::fs::write(&key_p, &node.key).unwrap();
    MeshIdentity::load(&ca_p, &cert_p, &key_p, Some(name)).unwrap()
}

fn start(id: MeshIdentity) -> (Transport, Receiver<Inbound>, Receiver<Inbound>) {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (t, r) = Transport::bind(id, TransportConfig::default(), socket).unwrap();
    (t, r.datagrams, r.streams)
}

async fn next_datagram(rx: &mut Receiver<Inbound>) -> (String, Bytes) {
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => panic!("no datagram within 10 s"),
            item = rx.recv() => match item.expect("transport alive") {
                Inbound::Datagram { from, data } => return (from, data),
                Inbound::Stream { .. } => continue,
            }
        }
    }
}

#[tokio::test]
async fn datagrams_streams_and_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let (a, mut a_rx, _a_streams) = start(identity(dir.path(), &ca, "a"));
    let (b, mut b_rx, mut b_streams) = start(identity(dir.path(), &ca, "b"));
    let b_addr = b.local_addr().unwrap();

    // A seed dial learns the peer's name from its certificate.
    assert_eq!(a.connect_seed(b_addr).await.unwrap(), "b");

    a.send_datagram("b", b_addr, Bytes::from_static(b"ping"));
    assert_eq!(
        next_datagram(&mut b_rx).await,
        ("a".into(), Bytes::from_static(b"ping"))
    );
    // The reply reuses the cached connection the other way.
    b.send_datagram("a", a.local_addr().unwrap(), Bytes::from_static(b"ack"));
    assert_eq!(
        next_datagram(&mut a_rx).await,
        ("b".into(), Bytes::from_static(b"ack"))
    );

    // Larger than any QUIC datagram: goes on a uni stream.
    let big = Bytes::from(vec![7u8; 20_000]);
    a.send_datagram("b", b_addr, big.clone());
    assert_eq!(next_datagram(&mut b_rx).await.1, big);

    // A bi-stream with frames both ways.
    let (mut send, mut recv) = a.open_bi("b", b_addr).await.unwrap();
    write_frame(&mut send, b"hello").await.unwrap();
    let Some(Inbound::Stream {
        from,
        send: mut bs,
        recv: mut br,
    }) = b_streams.recv().await
    else {
        panic!("expected a stream");
    };
    assert_eq!(from, "a");
    assert_eq!(
        read_frame(&mut br, 1024).await.unwrap().unwrap(),
        &b"hello"[..]
    );
    write_frame(&mut bs, b"world").await.unwrap();
    bs.finish().unwrap();
    assert_eq!(
        read_frame(&mut recv, 1024).await.unwrap().unwrap(),
        &b"world"[..]
    );
    assert!(read_frame(&mut recv, 1024).await.unwrap().is_none());

    // Oversized frames are refused before allocation.
    let (mut send2, _recv2) = a.open_bi("b", b_addr).await.unwrap();
    write_frame(&mut send2, &[0u8; 2048]).await.unwrap();
    let Some(Inbound::Stream { recv: mut br2, .. }) = b_streams.recv().await else {
        panic!("expected a stream");
    };
    assert!(read_frame(&mut br2, 1024).await.is_err());

    // Dialing b's address while expecting another name is refused.
    let err = a.open_bi("c", b_addr).await.unwrap_err();
    assert!(
        err.to_string().contains("handshake") || err.to_string().contains("refused"),
        "{err}"
    );

    // Fault injection drops traffic both ways.
    b.block(["a".to_string()]);
    a.send_datagram("b", b_addr, Bytes::from_static(b"dropped"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Stats::get(&b.stats().fault_drops) >= 1);
    b.unblock_all();
    a.send_datagram("b", b_addr, Bytes::from_static(b"after"));
    assert_eq!(
        next_datagram(&mut b_rx).await.1,
        Bytes::from_static(b"after")
    );

    a.close(Duration::from_secs(1)).await;
    b.close(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn foreign_ca_is_refused_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let rogue_ca = pki::generate_ca("test.mesh").unwrap();
    let (a, mut a_rx, _a_streams) = start(identity(dir.path(), &ca, "a"));
    let (rogue, _rx, _rogue_streams) = start(identity(dir.path(), &rogue_ca, "r"));
    let a_addr = a.local_addr().unwrap();

    assert!(rogue.connect_seed(a_addr).await.is_err());
    assert!(a.connect_seed(rogue.local_addr().unwrap()).await.is_err());
    rogue.send_datagram("a", a_addr, Bytes::from_static(b"let me in"));

    // Both sides count the failed handshakes; nothing is delivered.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Stats::get(&a.stats().handshake_failures) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "handshake failures not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(Stats::get(&rogue.stats().handshake_failures) >= 1);
    assert!(a_rx.try_recv().is_err());
}

/// Polls `cond` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test]
async fn idle_connections_close_and_reconnect_by_resuming() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let (a, _a_rx, _a_streams) = start(identity(dir.path(), &ca, "a"));
    let (b, mut b_rx, mut b_streams) = start(identity(dir.path(), &ca, "b"));
    let b_addr = b.local_addr().unwrap();

    a.send_datagram("b", b_addr, Bytes::from_static(b"one"));
    assert_eq!(next_datagram(&mut b_rx).await.0, "a");
    assert_eq!(Stats::get(&b.stats().resumed), 0);

    // A held stream keeps its connection whatever the cache is told.
    let (mut tx, rx) = a.open_bi("b", b_addr).await.unwrap();
    write_frame(&mut tx, b"hold").await.unwrap();
    let Some(Inbound::Stream {
        send: b_send,
        recv: b_recv,
        ..
    }) = b_streams.recv().await
    else {
        panic!("no stream");
    };
    let links = a.links();
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].streams, 1);
    a.close_idle(&links);
    assert_eq!(a.connections(), 1, "a connection with a stream was closed");

    // Once both halves on both sides are gone, it may close; the peer
    // sees the close too.
    drop((tx, rx, b_send, b_recv));
    let links = a.links();
    assert_eq!(links[0].streams, 0);
    a.close_idle(&links);
    eventually("both sides drop the closed connection", || {
        a.connections() == 0 && b.connections() == 0
    })
    .await;
    assert_eq!(Stats::get(&a.stats().idle_closed), 1);

    // The next datagram dials again, resuming the TLS session; the
    // certificate's name still reaches the receiver.
    a.send_datagram("b", b_addr, Bytes::from_static(b"two"));
    assert_eq!(
        next_datagram(&mut b_rx).await,
        ("a".into(), Bytes::from_static(b"two"))
    );
    assert_eq!(Stats::get(&b.stats().resumed), 1);
    assert_eq!(Stats::get(&a.stats().handshakes_out), 2);
}

#[tokio::test]
async fn a_busy_connection_is_allowed_more_streams() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let (a, _a_rx, _a_streams) = start(identity(dir.path(), &ca, "a"));
    let (b, _b_rx, mut b_streams) = start(identity(dir.path(), &ca, "b"));
    let b_addr = b.local_addr().unwrap();
    let initial = TransportConfig::default().initial_streams as usize;

    // Three times the first allowance, all held open at once: opening
    // them only completes if the receiver raises the allowance.
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        while held.len() < 3 * initial {
            match b_streams.recv().await {
                Some(Inbound::Stream { send, recv, .. }) => held.push((send, recv)),
                Some(Inbound::Datagram { .. }) => {}
                None => break,
            }
        }
        held
    });
    let mut open = Vec::new();
    for i in 0..3 * initial {
        let (mut tx, rx) = tokio::time::timeout(Duration::from_secs(10), a.open_bi("b", b_addr))
            .await
            .unwrap_or_else(|_| panic!("stream {i} not allowed within 10 s"))
            .unwrap();
        // A stream reaches the peer with its first bytes.
        write_frame(&mut tx, b"x").await.unwrap();
        open.push((tx, rx));
    }
    let held = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.len(), 3 * initial);
    assert_eq!(a.links()[0].streams, 3 * initial);
}

#[tokio::test]
async fn streams_opened_one_at_a_time_at_a_steady_rate_grow_the_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let (a, _a_rx, _a_streams) = start(identity(dir.path(), &ca, "a"));
    let (b, _b_rx, mut b_streams) = start(identity(dir.path(), &ca, "b"));
    let b_addr = b.local_addr().unwrap();
    // The receiver answers each stream and closes it, as an agent answers
    // a proxied request.
    tokio::spawn(async move {
        while let Some(item) = b_streams.recv().await {
            if let Inbound::Stream {
                mut send, mut recv, ..
            } = item
            {
                tokio::spawn(async move {
                    if recv.read_to_end(1024).await.is_ok() {
                        let _ = send.write_all(b"answer").await;
                        let _ = send.finish();
                    }
                });
            }
        }
    });

    // Never more than one open: only the rate can make the allowance grow.
    const STREAMS: u64 = 2_000;
    for i in 0..STREAMS {
        let (mut tx, mut rx) =
            tokio::time::timeout(Duration::from_secs(10), a.open_bi("b", b_addr))
                .await
                .unwrap_or_else(|_| panic!("stream {i} not allowed within 10 s"))
                .unwrap();
        tx.write_all(b"request").await.unwrap();
        tx.finish().unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(1024))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer, b"answer");
    }
    // quinn grants streams in a MAX_STREAMS frame each time an eighth of
    // the allowance has closed: at the first allowance (32) that would be
    // one frame every 5 streams, 400 here; grown to 1,024, one every 129.
    let sent = b.connection_stats("a").unwrap().frame_tx.max_streams_bidi;
    assert!(
        sent < STREAMS / 20,
        "{sent} MAX_STREAMS frames for {STREAMS} streams: the allowance did not grow"
    );
}

#[tokio::test]
async fn only_connections_with_a_quiet_stream_get_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let config = TransportConfig {
        idle_timeout: Duration::from_millis(800),
        keep_alive: Duration::from_millis(200),
        ..TransportConfig::default()
    };
    let bind = |name: &str| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        Transport::bind(identity(dir.path(), &ca, name), config.clone(), socket).unwrap()
    };
    let (a, _a_queues) = bind("a");
    let (b, mut b_queues) = bind("b");
    let b_addr = b.local_addr().unwrap();

    // A quiet stream: nothing moves on it for three idle timeouts, but the
    // keep-alives (sent by whoever tends the cache) hold the connection.
    let (mut tx, rx) = a.open_bi("b", b_addr).await.unwrap();
    write_frame(&mut tx, b"watch").await.unwrap();
    let Some(Inbound::Stream { send, recv, .. }) = b_queues.streams.recv().await else {
        panic!("no stream");
    };
    for _ in 0..24 {
        a.keep_streams_alive();
        b.keep_streams_alive();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(a.connections(), 1, "the connection with a stream timed out");
    let sent = Stats::get(&a.stats().keep_alives) + Stats::get(&b.stats().keep_alives);
    assert!(
        sent >= 4,
        "{sent} keep-alives in 2.4 s at one per 200 ms of quiet"
    );
    // Keep-alives are not datagrams for the agent.
    assert!(b_queues.datagrams.try_recv().is_err());

    // Without a stream there are none: QUIC's idle timeout ends it.
    drop((tx, rx, send, recv));
    let before = Stats::get(&a.stats().keep_alives);
    for _ in 0..30 {
        a.keep_streams_alive();
        b.keep_streams_alive();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(Stats::get(&a.stats().keep_alives), before);
    eventually("an idle connection without streams times out", || {
        a.connections() == 0 && b.connections() == 0
    })
    .await;
}

fn serial_hex_of(cert: &rustls_pki_types::CertificateDer<'_>) -> String {
    revocation::serial_hex(&revocation::serial_of(cert).unwrap())
}

#[tokio::test]
async fn a_new_certificate_serves_new_handshakes_and_old_connections_stay() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let (a, _a_rx, mut a_streams) = start(identity(dir.path(), &ca, "a"));
    let (b, _b_rx, _b_streams) = start(identity(dir.path(), &ca, "b"));
    let (c, _c_rx, _c_streams) = start(identity(dir.path(), &ca, "c"));
    let a_addr = a.local_addr().unwrap();
    let old_serial = serial_hex_of(&a.identity().chain[0]);

    // b opens a stream to a, made with a's first certificate.
    let (mut tx, mut rx) = b.open_bi("a", a_addr).await.unwrap();
    write_frame(&mut tx, b"before").await.unwrap();
    let Some(Inbound::Stream {
        send: mut a_send,
        recv: mut a_recv,
        ..
    }) = a_streams.recv().await
    else {
        panic!("no stream");
    };
    assert_eq!(
        &read_frame(&mut a_recv, 64).await.unwrap().unwrap()[..],
        b"before"
    );
    assert_eq!(b.peer_serial("a").unwrap(), old_serial);

    // a switches to a new certificate.
    let next = pki::issue_node_cert(&ca, "a", "test.mesh").unwrap();
    std::fs::write(dir.path().join("a.pem"), &next.cert).unwrap();
    std::fs::write(dir.path().join("a.key"), &next.key).unwrap();
    let id = MeshIdentity::load(
        &dir.path().join("a-ca.pem"),
        &dir.path().join("a.pem"),
        &dir.path().join("a.key"),
        Some("a"),
    )
    .unwrap();
    a.reload_identity(id).unwrap();
    let new_serial = serial_hex_of(&a.identity().chain[0]);
    assert_ne!(new_serial, old_serial);

    // A new handshake sees the new certificate.
    assert_eq!(c.connect_seed(a_addr).await.unwrap(), "a");
    assert_eq!(c.peer_serial("a").unwrap(), new_serial);

    // The old connection still carries the stream, both ways.
    write_frame(&mut tx, b"after").await.unwrap();
    assert_eq!(
        &read_frame(&mut a_recv, 64).await.unwrap().unwrap()[..],
        b"after"
    );
    write_frame(&mut a_send, b"reply").await.unwrap();
    assert_eq!(
        &read_frame(&mut rx, 64).await.unwrap().unwrap()[..],
        b"reply"
    );
    assert_eq!(b.peer_serial("a").unwrap(), old_serial);

    // A certificate for another node is refused, and nothing changes.
    assert!(a.reload_identity(identity(dir.path(), &ca, "z")).is_err());
    assert_eq!(serial_hex_of(&a.identity().chain[0]), new_serial);
}

#[tokio::test]
async fn a_revoked_certificate_is_cut_off_and_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let (a, _a_rx, _a_streams) = start(identity(dir.path(), &ca, "a"));
    let (b, mut b_rx, _b_streams) = start(identity(dir.path(), &ca, "b"));
    let a_addr = a.local_addr().unwrap();
    let b_addr = b.local_addr().unwrap();
    let b_serial = revocation::serial_of(&b.identity().chain[0]).unwrap();

    a.send_datagram("b", b_addr, Bytes::from_static(b"hello"));
    assert_eq!(next_datagram(&mut b_rx).await.0, "a");
    assert_eq!(a.connections(), 1);

    // a learns that b's certificate is revoked: the open connection closes
    // at once, b is named, and no new handshake gets through either way.
    let cut = a.set_revoked([b_serial.clone()].into_iter().collect());
    assert_eq!(cut, vec!["b".to_owned()]);
    assert_eq!(
        a.revocations().peers().get("b"),
        Some(&revocation::serial_hex(&b_serial))
    );
    eventually("both sides drop the revoked connection", || {
        a.connections() == 0 && b.connections() == 0
    })
    .await;
    // In TLS 1.3 the client is done before the server has checked its
    // certificate, so b may see its dial succeed; a refuses it right after.
    let failures = Stats::get(&a.stats().handshake_failures);
    let _ = b.connect_seed(a_addr).await;
    eventually("a refuses b's handshake", || {
        Stats::get(&a.stats().handshake_failures) > failures && b.connections() == 0
    })
    .await;
    assert!(a.connect_seed(b_addr).await.is_err());
    // b resuming a session skips the verifiers; the transport still refuses.
    a.send_datagram("b", b_addr, Bytes::from_static(b"again"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b_rx.try_recv().is_err());
    assert_eq!(a.connections(), 0);

    // Lifting the revocation lets b back in.
    a.set_revoked(Default::default());
    assert!(a.revocations().peers().is_empty());
    assert_eq!(a.connect_seed(b_addr).await.unwrap(), "b");
}

/// Mesh connections settle on AES-128-GCM, the cheapest of the TLS 1.3
/// suites per packet and per handshake (see `tls::provider`).
#[test]
fn mesh_handshakes_choose_aes_128_gcm() {
    use std::io::Cursor;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;

    use gossamer_transport::tls;
    use rustls::pki_types::ServerName;

    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let a = identity(dir.path(), &ca, "a");
    let b = identity(dir.path(), &ca, "b");
    let revoked = Arc::new(revocation::Revocations::default());
    let server = tls::server_config(&b, Arc::new(AtomicU64::new(0)), revoked.clone()).unwrap();
    let client = tls::client_config(&a, 8, revoked).unwrap();
    let name = ServerName::try_from(tls::SEED_SERVER_NAME).unwrap();
    let mut c =
        rustls::Connection::Client(rustls::ClientConnection::new(Arc::new(client), name).unwrap());
    let mut s =
        rustls::Connection::Server(rustls::ServerConnection::new(Arc::new(server)).unwrap());

    // Everything `from` has to send, read and processed by `to`.
    fn pass(from: &mut rustls::Connection, to: &mut rustls::Connection) {
        let mut wire = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut wire).unwrap();
        }
        let mut r = Cursor::new(wire);
        while (r.position() as usize) < r.get_ref().len() {
            to.read_tls(&mut r).unwrap();
            to.process_new_packets().unwrap();
        }
    }
    for _ in 0..10 {
        pass(&mut c, &mut s);
        pass(&mut s, &mut c);
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "handshake did not finish"
    );
    for suite in [c.negotiated_cipher_suite(), s.negotiated_cipher_suite()] {
        assert_eq!(
            suite.map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}

#[tokio::test]
async fn the_udp_receive_buffer_grows_to_what_the_kernel_allows() {
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let config = TransportConfig::default();
    let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let default = socket2::SockRef::from(&plain).recv_buffer_size().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let (t, _queues) =
        Transport::bind(identity(dir.path(), &ca, "a"), config.clone(), socket).unwrap();
    let granted = t.udp_receive_buffer();
    // Linux grants at most net.core.rmem_max and reports twice that.
    let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok());
    match cap {
        Some(cap) if cap >= config.udp_receive_buffer => {
            assert!(
                granted >= config.udp_receive_buffer,
                "{granted} < {}",
                config.udp_receive_buffer
            )
        }
        Some(cap) => assert!(
            granted >= default.max(cap),
            "{granted} < max({default}, {cap})"
        ),
        None => assert!(granted >= default, "{granted} < {default}"),
    }
}

/// Streams 8 MiB from `a` to `b` and checks every byte; returns each
/// side's counters for the connection (sender's, receiver's).
async fn bulk_transfer(
    config: TransportConfig,
) -> (quinn::ConnectionStats, quinn::ConnectionStats) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let bind = |name| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        Transport::bind(identity(dir.path(), &ca, name), config.clone(), socket).unwrap()
    };
    let (a, _a_queues) = bind("a");
    let (b, mut b_queues) = bind("b");
    let b_addr = b.local_addr().unwrap();
    let body: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();

    let (mut send, _recv) = a.open_bi("b", b_addr).await.unwrap();
    let writer = {
        let body = body.clone();
        tokio::spawn(async move {
            send.write_all(&body).await.unwrap();
            send.finish().unwrap();
            send
        })
    };
    let Some(Inbound::Stream { recv: mut br, .. }) = b_queues.streams.recv().await else {
        panic!("expected a stream");
    };
    let mut got = Vec::with_capacity(body.len());
    tokio::time::timeout(Duration::from_secs(60), br.read_to_end(&mut got))
        .await
        .expect("8 MiB within 60 s")
        .unwrap();
    assert!(got == body, "the stream delivered other bytes");
    let _send = writer.await.unwrap();
    let stats = (
        a.connection_stats("b").unwrap(),
        b.connection_stats("a").unwrap(),
    );
    assert_eq!(a.path_mtu("b"), Some(stats.0.path.current_mtu));
    a.close(Duration::from_secs(1)).await;
    b.close(Duration::from_secs(1)).await;
    stats
}

#[tokio::test]
async fn peers_on_this_host_send_large_packets_and_keep_them_under_load() {
    let config = TransportConfig::default();
    let (sender, receiver) = bulk_transfer(config.clone()).await;
    let (sender, receiver) = (sender.path.current_mtu, receiver.path.current_mtu);
    // Discovery ran up to the bound, and the burst did not make quinn
    // judge the path a black hole (which drops it to 1,200 bytes).
    assert!(sender > 1452 * 4, "sender's path MTU {sender}");
    assert!(sender <= config.loopback_mtu, "sender's path MTU {sender}");
    assert!(receiver > 1452, "receiver's path MTU {receiver}");
}

#[tokio::test]
async fn a_loopback_mtu_at_ethernets_size_keeps_quinns_defaults() {
    let config = TransportConfig {
        loopback_mtu: 1452,
        ..TransportConfig::default()
    };
    let (sender, receiver) = bulk_transfer(config).await;
    let (sender, receiver) = (sender.path.current_mtu, receiver.path.current_mtu);
    assert!(sender <= 1452, "sender's path MTU {sender}");
    assert!(receiver <= 1452, "receiver's path MTU {receiver}");
}

#[tokio::test]
async fn a_caller_acknowledges_answers_with_its_next_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = pki::generate_ca("test.mesh").unwrap();
    let bind = |name| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        Transport::bind(
            identity(dir.path(), &ca, name),
            TransportConfig::default(),
            socket,
        )
        .unwrap()
    };
    let (a, _a_queues) = bind("a");
    let (b, mut b_queues) = bind("b");
    let b_addr = b.local_addr().unwrap();
    // b answers each request in two packets, a millisecond apart.
    tokio::spawn(async move {
        while let Some(Inbound::Stream {
            mut send, mut recv, ..
        }) = b_queues.streams.recv().await
        {
            let mut request = Vec::new();
            recv.read_to_end(&mut request).await.unwrap();
            send.write_all(&[1; 500]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
            send.write_all(&[2; 500]).await.unwrap();
            send.finish().unwrap();
        }
    });
    let exchange = || async {
        let (mut send, mut recv) = a.open_bi("b", b_addr).await.unwrap();
        send.write_all(b"request").await.unwrap();
        send.finish().unwrap();
        let mut answer = Vec::new();
        recv.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer.len(), 1000);
    };
    exchange().await;
    let before = a.connection_stats("b").unwrap();
    const N: u64 = 100;
    for _ in 0..N {
        exchange().await;
    }
    let after = a.connection_stats("b").unwrap();
    // Each side asked the other for fewer acknowledgements (QUIC's ACK
    // frequency extension) ...
    assert!(after.frame_tx.ack_frequency >= 1, "{:?}", after.frame_tx);
    assert!(after.frame_rx.ack_frequency >= 1, "{:?}", after.frame_rx);
    // ... so the second packet of an answer no longer draws an ACK packet
    // of its own: the next request carries it.
    let sent = after.udp_tx.datagrams - before.udp_tx.datagrams;
    assert!(sent < N * 3 / 2, "{sent} packets for {N} requests");
    a.close(Duration::from_secs(1)).await;
    b.close(Duration::from_secs(1)).await;
}
