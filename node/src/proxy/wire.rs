//! The proxy protocol on a QUIC bi-stream.
//!
//! After the stream kind byte [`STREAM_PROXY`]:
//! 1. caller → owner: one [`RequestHead`] frame (4-byte length, bincode,
//!    capped at [`MAX_HEAD`]);
//! 2. caller → owner: the request body as [`Frame`]s, then FIN;
//! 3. owner → caller: one [`ResponseHead`] frame, then the response body as
//!    frames (data, then optional trailers), then FIN.
//!
//! For an HTTP upgrade (WebSocket), once a `101` head has been sent both
//! directions carry raw bytes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use gossamer_membership::codec::{self, CodecError};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use super::hop;

/// First byte of a proxied-request stream.
pub const STREAM_PROXY: u8 = 2;
/// Cap on an encoded request or response head.
pub const MAX_HEAD: usize = 256 * 1024;
/// Cap on one body frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Size of data frames we send.
pub const CHUNK: usize = 64 * 1024;

/// What the caller asks the owner to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Target service name.
    pub service: String,
    /// Target instance id on the owner.
    pub instance: String,
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// 1 for HTTP/1.x, 2 for HTTP/2; see [`hop::version_to_wire`].
    pub version: u8,
    /// End-to-end headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Whether this is an upgrade request.
    pub upgrade: bool,
    /// The request has no body: the owner sends none either.
    pub end_stream: bool,
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status.
    pub status: u16,
    /// End-to-end headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The response has no body at all: the caller must end the stream
    /// with the headers (a gRPC trailers-only answer is HEADERS with
    /// END_STREAM, and clients read an extra empty DATA frame as an error).
    pub end_stream: bool,
}

/// A body frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Body bytes.
    Data(Bytes),
    /// Trailers (gRPC status and friends).
    Trailers(Vec<(String, Vec<u8>)>),
}

const TYPE_DATA: u8 = 0;
const TYPE_TRAILERS: u8 = 1;

/// Encodes a head (request or response) as a length-prefixed frame.
pub fn encode_head<T: Serialize>(head: &T) -> Result<Bytes, CodecError> {
    let body = codec::encode_large(head, MAX_HEAD)?;
    let mut out = BytesMut::with_capacity(4 + body.len());
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    Ok(out.freeze())
}

/// Decodes a head frame's payload.
pub fn decode_head<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    codec::decode_large(payload, MAX_HEAD)
}

/// Encodes a body frame: type byte, 4-byte length, payload.
pub fn encode_frame(frame: &Frame) -> Result<Bytes, CodecError> {
    match frame {
        Frame::Data(data) => {
            let mut out = BytesMut::with_capacity(5 + data.len());
            out.put_u8(TYPE_DATA);
            out.put_u32(data.len() as u32);
            out.put_slice(data);
            Ok(out.freeze())
        }
        Frame::Trailers(t) => {
            let body = codec::encode_large(t, MAX_HEAD)?;
            let mut out = BytesMut::with_capacity(5 + body.len());
            out.put_u8(TYPE_TRAILERS);
            out.put_u32(body.len() as u32);
            out.put_slice(&body);
            Ok(out.freeze())
        }
    }
}

/// Incremental decoder of body frames from a byte stream.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
}

/// A malformed body frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Unknown frame type.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Over the cap.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Undecodable trailers.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl FrameDecoder {
    /// Feeds bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let kind = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        let cap = if kind == TYPE_DATA {
            MAX_FRAME
        } else {
            MAX_HEAD
        };
        if len > cap {
            return Err(FrameError::TooLarge(len));
        }
        if kind != TYPE_DATA && kind != TYPE_TRAILERS {
            return Err(FrameError::UnknownType(kind));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(match kind {
            TYPE_DATA => Frame::Data(payload),
            _ => Frame::Trailers(codec::decode_large(&payload, MAX_HEAD)?),
        }))
    }
}

/// The end-to-end headers of a map as wire pairs; see [`hop::end_to_end`].
pub fn headers_to_wire(map: &HeaderMap, keep_upgrade: bool) -> Vec<(String, Vec<u8>)> {
    hop::end_to_end(map, keep_upgrade)
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// Wire pairs back into a map; invalid names or values are skipped.
pub fn headers_from_wire(pairs: &[(String, Vec<u8>)]) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(n, v);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_in_pieces() {
        let frames = vec![
            Frame::Data(Bytes::from_static(b"hello")),
            Frame::Data(Bytes::from(vec![7u8; 100_000])),
            Frame::Trailers(vec![("grpc-status".into(), b"0".to_vec())]),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&encode_frame(f).unwrap());
        }
        let mut dec = FrameDecoder::default();
        let mut out = Vec::new();
        for chunk in wire.chunks(777) {
            dec.extend(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn rejects_oversized_and_unknown() {
        let mut dec = FrameDecoder::default();
        dec.extend(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(dec.next_frame().is_err());
        let mut dec = FrameDecoder::default();
        dec.extend(&[9, 0, 0, 0, 1, 0]);
        assert!(dec.next_frame().is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut map = HeaderMap::new();
        map.insert("connection", "keep-alive, x-private".parse().unwrap());
        map.insert("x-private", "1".parse().unwrap());
        map.insert("traceparent", "00-abc-def-01".parse().unwrap());
        map.insert("transfer-encoding", "chunked".parse().unwrap());
        map.insert("te", "gzip".parse().unwrap());
        let wire = headers_to_wire(&map, false);
        assert_eq!(
            wire,
            vec![("traceparent".to_string(), b"00-abc-def-01".to_vec())]
        );
    }

    #[test]
    fn te_trailers_is_forwarded() {
        let mut map = HeaderMap::new();
        map.insert("te", "trailers".parse().unwrap());
        map.insert("content-type", "application/grpc".parse().unwrap());
        let wire = headers_to_wire(&map, false);
        assert!(
            wire.contains(&("te".to_string(), b"trailers".to_vec())),
            "{wire:?}"
        );
    }

    proptest! {
        #[test]
        fn decoder_survives_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::default();
            dec.extend(&bytes);
            for _ in 0..64 {
                match dec.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let _ = decode_head::<RequestHead>(&bytes);
            let _ = decode_head::<ResponseHead>(&bytes);
        }
    }
}
