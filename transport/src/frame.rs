//! Length-prefixed frames on QUIC streams, with a hard size cap checked
//! before any allocation.

use crate::stream::{RecvStream, SendStream};
use bytes::Bytes;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame over the cap.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Cap applied.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] quinn::ReadExactError),
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] quinn::WriteError),
}

/// Writes one frame: a 4-byte big-endian length, then the bytes.
pub async fn write_frame(send: &mut SendStream, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len() as u64,
        max: u32::MAX as usize,
    })?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(payload).await?;
    Ok(())
}

/// Reads one frame of at most `max` bytes; `Ok(None)` on a clean end of
/// stream before a frame starts.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Bytes>, FrameError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len);
    if len as usize > max {
        return Err(FrameError::TooLarge {
            len: len.into(),
            max,
        });
    }
    let mut buf = vec![0u8; len as usize];
    match recv.read_exact(&mut buf).await {
        Ok(()) => Ok(Some(buf.into())),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(FrameError::Truncated),
        Err(e) => Err(e.into()),
    }
}
