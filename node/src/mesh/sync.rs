//! Push-pull membership sync on QUIC bi-streams.
//!
//! A stream starts with the kind byte [`STREAM_MEMBERS`]; the opener sends
//! one frame with its whole member list
//! ([`gossamer_membership::sync::SyncPayload`]), the other side merges it
//! and answers with its own, which the opener merges in turn. Both frames are
//! size-capped and decoded by the membership codec.

use std::time::Duration;

use gossamer_membership::NodeId;
use gossamer_membership::catalog::MAX_SYNC_FRAME;
use gossamer_membership::codec::CodecError;
use gossamer_membership::sync::SyncPayload;
use gossamer_transport::frame::{FrameError, read_frame, write_frame};
use gossamer_transport::{RecvStream, SendStream, Transport, TransportError};
use tokio::sync::{mpsc, oneshot};

use super::Input;
use tracing::debug;

/// First byte of a membership sync stream.
pub const STREAM_MEMBERS: u8 = 3;
/// Longest a whole exchange may take.
const SYNC_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncFailure {
    /// Could not reach the peer.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream broke or a frame was too large.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer's frame did not decode.
    #[error("bad member list: {0}")]
    Decode(#[from] CodecError),
    /// The stream ended without an answer.
    #[error("no answer")]
    NoAnswer,
    /// The mesh task did not answer.
    #[error("mesh task gone")]
    Busy,
    /// The exchange took too long.
    #[error("timed out")]
    Timeout,
}

/// Sends our encoded view to `peer` and returns theirs.
pub async fn exchange(
    transport: &Transport,
    peer: &NodeId,
    ours: Vec<u8>,
) -> Result<SyncPayload, SyncFailure> {
    tokio::time::timeout(SYNC_TIMEOUT, async {
        let (mut tx, mut rx) = transport.open_bi(&peer.name, peer.addr).await?;
        tx.write_all(&[STREAM_MEMBERS])
            .await
            .map_err(FrameError::from)?;
        write_frame(&mut tx, &ours).await?;
        let _ = tx.finish();
        let frame = read_frame(&mut rx, MAX_SYNC_FRAME)
            .await?
            .ok_or(SyncFailure::NoAnswer)?;
        Ok(SyncPayload::decode(&frame)?)
    })
    .await
    .unwrap_or(Err(SyncFailure::Timeout))
}

/// Serves one inbound sync stream (the kind byte already read).
pub async fn serve(
    from: String,
    mut tx: SendStream,
    mut rx: RecvStream,
    task: mpsc::Sender<Input>,
) {
    let result: Result<(), SyncFailure> = tokio::time::timeout(SYNC_TIMEOUT, async {
        let frame = read_frame(&mut rx, MAX_SYNC_FRAME)
            .await?
            .ok_or(SyncFailure::NoAnswer)?;
        let payload = SyncPayload::decode(&frame)?;
        let (reply, answer) = oneshot::channel();
        task.send(Input::SyncRequest {
            from: from.clone(),
            payload,
            reply,
        })
        .await
        .map_err(|_| SyncFailure::Busy)?;
        let ours = answer.await.map_err(|_| SyncFailure::Busy)?;
        write_frame(&mut tx, &ours).await?;
        let _ = tx.finish();
        Ok(())
    })
    .await
    .unwrap_or(Err(SyncFailure::Timeout));
    if let Err(e) = result {
        debug!(peer = %from, error = %e, "member sync stream failed");
    }
}
