//! Documents on QUIC bi-streams.
//!
//! A stream starts with the kind byte [`STREAM_DOCS`], then one
//! [`DocRequest`] frame:
//! - `Fetch(kind, name)`: the server answers with the envelope it holds, or
//!   `Missing`. Any holder may answer: the receiver checks the operator's
//!   signature, not who sent it.
//! - `Compare(summary)`: the server answers `Same`, or its whole list; the
//!   opener then sends its own list back, so both sides learn what the
//!   other holds newer in one exchange.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gossamer_membership::codec;
use gossamer_membership::docs::{DocKey, DocRef, MAX_DOCS};
use gossamer_transport::frame::{FrameError, read_frame, write_frame};
use gossamer_transport::{RecvStream, SendStream, Transport, TransportError};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::debug;

use super::Documents;
use super::envelope::{Envelope, MAX_ENVELOPE};

/// First byte of a document stream.
pub const STREAM_DOCS: u8 = 4;
/// Largest frame: a list of every document.
const MAX_FRAME: usize = 2 * 1024 * 1024;
/// Longest a whole exchange may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What the opener asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocRequest {
    /// Send me this document.
    Fetch(String, String),
    /// Here is the summary of what I hold.
    Compare(u128),
    /// Here is my list (after your `List`).
    List(Vec<DocRef>),
}

/// What the server answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DocResponse {
    /// The encoded envelope.
    Envelope(Vec<u8>),
    /// Not held here.
    Missing,
    /// Same summary.
    Same,
    /// What I hold.
    List(Vec<DocRef>),
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum DocSyncError {
    /// Could not reach the peer.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The stream broke or a frame was bad.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Undecodable or unexpected message.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Too slow.
    #[error("timed out")]
    Timeout,
}

/// What a comparison found.
#[derive(Debug)]
pub enum Compared {
    /// The peer holds the same.
    Same,
    /// The peer's list.
    List(Vec<DocRef>),
}

fn decode<T: serde::de::DeserializeOwned>(frame: &[u8]) -> Result<T, DocSyncError> {
    codec::decode_large(frame, MAX_FRAME).map_err(|e| DocSyncError::Protocol(e.to_string()))
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, DocSyncError> {
    codec::encode_large(value, MAX_FRAME).map_err(|e| DocSyncError::Protocol(e.to_string()))
}

fn checked_list(list: Vec<DocRef>) -> Result<Vec<DocRef>, DocSyncError> {
    if list.len() > MAX_DOCS {
        return Err(DocSyncError::Protocol(format!(
            "a list of {} documents is over the {MAX_DOCS} limit",
            list.len()
        )));
    }
    Ok(list)
}

async fn next(rx: &mut RecvStream) -> Result<bytes::Bytes, DocSyncError> {
    read_frame(rx, MAX_FRAME)
        .await?
        .ok_or_else(|| DocSyncError::Protocol("stream ended early".into()))
}

async fn open(
    transport: &Transport,
    peer: &str,
    addr: SocketAddr,
) -> Result<(SendStream, RecvStream), DocSyncError> {
    let (mut tx, rx) = transport.open_bi(peer, addr).await?;
    tx.write_all(&[STREAM_DOCS])
        .await
        .map_err(FrameError::from)?;
    Ok((tx, rx))
}

/// Fetches document `key` from `peer`: the envelope, not yet checked, or
/// `None` if the peer does not hold it.
pub async fn fetch(
    transport: &Transport,
    peer: &str,
    addr: SocketAddr,
    key: &DocKey,
) -> Result<Option<Envelope>, DocSyncError> {
    tokio::time::timeout(TIMEOUT, async {
        let (mut tx, mut rx) = open(transport, peer, addr).await?;
        write_frame(
            &mut tx,
            &encode(&DocRequest::Fetch(key.0.clone(), key.1.clone()))?,
        )
        .await?;
        let _ = tx.finish();
        match decode(&next(&mut rx).await?)? {
            DocResponse::Envelope(bytes) => {
                if bytes.len() > MAX_ENVELOPE {
                    return Err(DocSyncError::Protocol(
                        "envelope over the size limit".into(),
                    ));
                }
                let env =
                    Envelope::decode(&bytes).map_err(|e| DocSyncError::Protocol(e.to_string()))?;
                if (&env.kind, &env.name) != (&key.0, &key.1) {
                    return Err(DocSyncError::Protocol(format!(
                        "asked for {} {}, got {} {}",
                        key.0, key.1, env.kind, env.name
                    )));
                }
                Ok(Some(env))
            }
            DocResponse::Missing => Ok(None),
            other => Err(DocSyncError::Protocol(format!("unexpected {other:?}"))),
        }
    })
    .await
    .unwrap_or(Err(DocSyncError::Timeout))
}

/// Compares with `peer`. When the lists differ, ours is sent back too.
pub async fn compare(
    transport: &Transport,
    peer: &str,
    addr: SocketAddr,
    docs: &Documents,
) -> Result<Compared, DocSyncError> {
    tokio::time::timeout(TIMEOUT, async {
        let (mut tx, mut rx) = open(transport, peer, addr).await?;
        write_frame(&mut tx, &encode(&DocRequest::Compare(docs.summary()))?).await?;
        match decode(&next(&mut rx).await?)? {
            DocResponse::Same => {
                let _ = tx.finish();
                Ok(Compared::Same)
            }
            DocResponse::List(theirs) => {
                write_frame(&mut tx, &encode(&DocRequest::List(docs.list()))?).await?;
                let _ = tx.finish();
                Ok(Compared::List(checked_list(theirs)?))
            }
            other => Err(DocSyncError::Protocol(format!("unexpected {other:?}"))),
        }
    })
    .await
    .unwrap_or(Err(DocSyncError::Timeout))
}

/// Serves one inbound document stream (the kind byte already read). A
/// peer's list goes to `lists` for the driver.
pub async fn serve(
    from: String,
    mut tx: SendStream,
    mut rx: RecvStream,
    docs: Arc<Documents>,
    lists: mpsc::Sender<(String, Vec<DocRef>)>,
) {
    let result: Result<(), DocSyncError> = tokio::time::timeout(TIMEOUT, async {
        match decode::<DocRequest>(&next(&mut rx).await?)? {
            DocRequest::Fetch(kind, name) => {
                let answer = match docs.encoded(&(kind, name)) {
                    Some(bytes) => DocResponse::Envelope(bytes),
                    None => DocResponse::Missing,
                };
                write_frame(&mut tx, &encode(&answer)?).await?;
            }
            DocRequest::Compare(theirs) => {
                if theirs == docs.summary() {
                    write_frame(&mut tx, &encode(&DocResponse::Same)?).await?;
                } else {
                    write_frame(&mut tx, &encode(&DocResponse::List(docs.list()))?).await?;
                    if let DocRequest::List(list) = decode(&next(&mut rx).await?)? {
                        let _ = lists.send((from.clone(), checked_list(list)?)).await;
                    }
                }
            }
            DocRequest::List(_) => {
                return Err(DocSyncError::Protocol("a list before a comparison".into()));
            }
        }
        let _ = tx.finish();
        Ok(())
    })
    .await
    .unwrap_or(Err(DocSyncError::Timeout));
    if let Err(e) = result {
        debug!(peer = %from, error = %e, "document stream failed");
    }
}
