//! The catalog sync protocol on QUIC bi-streams.
//!
//! A stream starts with the kind byte [`STREAM_CATALOG`], then one
//! [`SyncRequest`] frame:
//! - `Fetch`: the server answers with its *own* entry (head frame, then
//!   service chunks). Entries are only ever fetched from their owner, whose
//!   certificate the transport has verified: that is what makes a node
//!   unable to publish another's entry.
//! - `Digest(ours)`: the server answers with its digest; both sides then
//!   fetch from the owners whatever the other knows newer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gossamer_membership::catalog::{
    EntryAssembler, MAX_SYNC_FRAME, NodeEntry, SyncError, SyncRequest, SyncResponse, decode_sync,
    encode_sync, entry_frames,
};
use gossamer_transport::frame::{read_frame, write_frame};
use gossamer_transport::{RecvStream, SendStream, Transport};
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

use gossamer_transport::pki::Hosts;
use tracing::{debug, warn};

use super::{CatalogCounters, Shared};
use crate::mesh::CatalogNews;

/// First byte of a catalog sync stream.
pub const STREAM_CATALOG: u8 = 1;
/// Longest a whole sync exchange may take.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncFailure {
    /// Could not reach the peer.
    #[error(transparent)]
    Transport(#[from] gossamer_transport::TransportError),
    /// The stream broke or a frame was bad.
    #[error(transparent)]
    Frame(#[from] gossamer_transport::frame::FrameError),
    /// The peer broke the protocol.
    #[error(transparent)]
    Protocol(#[from] SyncError),
    /// An entry came from someone other than its owner.
    #[error("{from} sent the entry of {owner}")]
    NotOwner {
        /// Who sent it.
        from: String,
        /// Whose entry it was.
        owner: String,
    },
    /// The exchange took too long.
    #[error("timed out")]
    Timeout,
}

async fn next(
    recv: &mut RecvStream,
    counters: &CatalogCounters,
) -> Result<SyncResponse, SyncFailure> {
    let frame = read_frame(recv, MAX_SYNC_FRAME)
        .await?
        .ok_or(SyncError::Protocol("stream ended early"))?;
    counters.sync_bytes(frame.len() as u64 + 4, 0);
    Ok(decode_sync(&frame).map_err(SyncError::from)?)
}

async fn send(
    send: &mut SendStream,
    payload: &[u8],
    counters: &CatalogCounters,
) -> Result<(), SyncFailure> {
    write_frame(send, payload).await?;
    counters.sync_bytes(0, payload.len() as u64 + 4);
    Ok(())
}

async fn open(
    transport: &Transport,
    peer: &str,
    addr: std::net::SocketAddr,
) -> Result<(SendStream, RecvStream), SyncFailure> {
    let (mut tx, rx) = transport.open_bi(peer, addr).await?;
    tx.write_all(&[STREAM_CATALOG])
        .await
        .map_err(gossamer_transport::frame::FrameError::from)?;
    Ok((tx, rx))
}

/// Fetches `owner`'s entry from `owner` itself.
pub async fn fetch(
    transport: &Transport,
    owner: &str,
    addr: std::net::SocketAddr,
    counters: &CatalogCounters,
) -> Result<NodeEntry, SyncFailure> {
    let started = Instant::now();
    let result = tokio::time::timeout(SYNC_TIMEOUT, async {
        let (mut tx, mut rx) = open(transport, owner, addr).await?;
        let req = encode_sync(&SyncRequest::Fetch).map_err(SyncError::from)?;
        send(&mut tx, &req, counters).await?;
        let _ = tx.finish();
        let mut asm = EntryAssembler::start(next(&mut rx, counters).await?)?;
        while !asm.is_complete() {
            asm.push(next(&mut rx, counters).await?)?;
        }
        let mut entry = asm.finish()?;
        if entry.node != owner {
            return Err(SyncFailure::NotOwner {
                from: owner.to_owned(),
                owner: entry.node,
            });
        }
        keep_certified(transport, &mut entry, counters);
        Ok(entry)
    })
    .await
    .unwrap_or(Err(SyncFailure::Timeout));
    counters.sync_done("fetch", result.is_ok(), started.elapsed());
    result
}

/// Leaves out of a fetched entry every instance whose service its owner's
/// certificate (as proved on the connection it came by) does not name, so
/// no node can publish, or take over, another's service; and counts them.
fn keep_certified(transport: &Transport, entry: &mut NodeEntry, counters: &CatalogCounters) {
    let hosts = transport
        .peer_hosts(&entry.node)
        .unwrap_or_else(|| Arc::new(Hosts::Only(Vec::new())));
    let mut refused = Vec::new();
    entry.services.retain(|s| {
        let ok = hosts.allows(&s.name);
        if !ok {
            refused.push(format!("{} ({})", s.name, s.id));
        }
        ok
    });
    if !refused.is_empty() {
        counters
            .refused_instances
            .fetch_add(refused.len() as u64, Ordering::Relaxed);
        warn!(
            node = %entry.node, version = entry.version, refused = ?refused, certificate_allows = %hosts,
            "catalog entry names services its owner's certificate does not: left out"
        );
    }
}

/// Exchanges digests with `peer`; returns theirs.
pub async fn exchange_digest(
    transport: &Transport,
    peer: &str,
    addr: std::net::SocketAddr,
    ours: Vec<(String, u64)>,
    counters: &CatalogCounters,
) -> Result<Vec<(String, u64)>, SyncFailure> {
    let started = Instant::now();
    let result = tokio::time::timeout(SYNC_TIMEOUT, async {
        let (mut tx, mut rx) = open(transport, peer, addr).await?;
        let req = encode_sync(&SyncRequest::Digest(ours)).map_err(SyncError::from)?;
        send(&mut tx, &req, counters).await?;
        let _ = tx.finish();
        match next(&mut rx, counters).await? {
            SyncResponse::Digest(theirs) => Ok(theirs),
            _ => Err(SyncError::Protocol("expected a digest").into()),
        }
    })
    .await
    .unwrap_or(Err(SyncFailure::Timeout));
    counters.sync_done("digest", result.is_ok(), started.elapsed());
    result
}

/// Serves one inbound sync stream (the kind byte already read).
pub async fn serve(
    from: String,
    mut tx: SendStream,
    mut rx: RecvStream,
    shared: Arc<Shared>,
    mesh: mpsc::Sender<(String, CatalogNews)>,
) {
    let counters = shared.counters.clone();
    let result: Result<(), SyncFailure> = tokio::time::timeout(SYNC_TIMEOUT, async {
        let frame = read_frame(&mut rx, MAX_SYNC_FRAME)
            .await?
            .ok_or(SyncError::Protocol("empty stream"))?;
        counters.sync_bytes(frame.len() as u64 + 4, 0);
        match decode_sync::<SyncRequest>(&frame).map_err(SyncError::from)? {
            SyncRequest::Fetch => {
                let local = shared.local.borrow().clone();
                for f in entry_frames(&local).map_err(SyncError::from)? {
                    send(&mut tx, &f, &counters).await?;
                }
                // A newer member fetching ours is the contact this node
                // may be waiting for to fetch back over the same
                // connection. Dropped if the mesh task is behind: the
                // fetch then starts at its deadline.
                let _ = mesh.try_send((from.clone(), CatalogNews::Fetched));
            }
            SyncRequest::Digest(theirs) => {
                let ours = shared.digest.borrow().clone();
                let reply =
                    encode_sync(&SyncResponse::Digest(ours.to_vec())).map_err(SyncError::from)?;
                send(&mut tx, &reply, &counters).await?;
                // The mesh task's driver decides what to fetch.
                let _ = mesh.send((from.clone(), CatalogNews::Digest(theirs))).await;
            }
        }
        let _ = tx.finish();
        Ok(())
    })
    .await
    .unwrap_or(Err(SyncFailure::Timeout));
    if let Err(e) = result {
        debug!(peer = %from, error = %e, "sync stream failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gossamer_membership::catalog::{Catalog, Health, Protocol, ServiceInstance};
    use gossamer_transport::pki::{self, MeshIdentity};
    use gossamer_transport::{Inbound, TransportConfig};
    use tokio::sync::watch;

    fn identity(
        dir: &std::path::Path,
        ca: &pki::PemPair,
        name: &str,
        hosts: &Hosts,
    ) -> MeshIdentity {
        let node = pki::issue_node_cert_hosting(ca, name, "test.mesh", hosts).unwrap();
        let (ca_p, cert_p, key_p) = (
            dir.join(format!("{name}-ca.pem")),
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&ca_p, &ca.cert).unwrap();
        std::fs::write(&cert_p, &node.cert).unwrap();
        std::fs::write(&key_p, &node.key).unwrap();
        MeshIdentity::load(&ca_p, &cert_p, &key_p, Some(name)).unwrap()
    }

    fn instance(id: &str, name: &str) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            name: name.into(),
            address: "127.0.0.1".into(),
            port: 8080,
            tags: Vec::new(),
            version: String::new(),
            weight: 1,
            hash_policy: "source-ip".into(),
            health: Health::Passing,
            protocol: Protocol::Http1,
        }
    }

    /// A node whose certificate names only `web` publishes `web` and `db`
    /// (as a modified agent could): the fetcher keeps `web`, leaves `db`
    /// out and counts it.
    #[tokio::test]
    async fn instances_the_owner_may_not_host_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let ca = pki::generate_ca("test.mesh").unwrap();
        let web_only = Hosts::Only(vec!["web".into()]);
        let bind = |id| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            Transport::bind(id, TransportConfig::default(), socket).unwrap()
        };
        let (owner, mut owner_q) = bind(identity(dir.path(), &ca, "owner", &web_only));
        let (fetcher, _fetcher_q) = bind(identity(dir.path(), &ca, "fetcher", &Hosts::Any));
        let entry = NodeEntry {
            node: "owner".into(),
            version: 7,
            services: vec![instance("db-1", "db"), instance("web-1", "web")],
        };
        let (_local_tx, local) = watch::channel(Arc::new(entry));
        let (_d, digest) = watch::channel(Arc::new(Vec::new()));
        let (_c, catalog) = watch::channel(Arc::new(Catalog::new()));
        let shared = Arc::new(Shared {
            local,
            digest,
            catalog,
            counters: Arc::default(),
        });
        tokio::spawn(async move {
            while let Some(Inbound::Stream {
                from,
                send,
                mut recv,
            }) = owner_q.streams.recv().await
            {
                let mut kind = [0u8; 1];
                recv.read_exact(&mut kind).await.unwrap();
                let (tx, _rx) = mpsc::channel(1);
                tokio::spawn(serve(from, send, recv, shared.clone(), tx));
            }
        });
        let counters = CatalogCounters::default();
        let got = fetch(&fetcher, "owner", owner.local_addr().unwrap(), &counters)
            .await
            .unwrap();
        let names: Vec<&str> = got.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["web"]);
        assert_eq!(got.version, 7);
        assert_eq!(counters.refused_instances.load(Ordering::Relaxed), 1);
    }
}
