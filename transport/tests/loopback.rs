//! Two and three transports on loopback: datagrams, streams, identity checks.

use std::time::Duration;

use bytes::Bytes;
use gossamer_transport::frame::{read_frame, write_frame};
use gossamer_transport::pki::{self, PemPair};
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
