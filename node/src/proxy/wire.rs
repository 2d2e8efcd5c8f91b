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

use super::hop;

/// First byte of a proxied-request stream.
pub const STREAM_PROXY: u8 = 2;
/// Cap on an encoded request or response head.
pub const MAX_HEAD: usize = 256 * 1024;
/// Cap on one body frame.
pub const MAX_FRAME: usize = 1 << 20;
/// Size of data frames we send.
pub const CHUNK: usize = 64 * 1024;

/// What the caller asks the owner to do, as the owner decodes it.
#[derive(Debug, Clone, PartialEq)]
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
    /// End-to-end headers (pairs the owner cannot use are dropped).
    pub headers: HeaderMap,
    /// Whether this is an upgrade request.
    pub upgrade: bool,
    /// The request has no body: the owner sends none either.
    pub end_stream: bool,
}

/// A request head as the caller sends it, borrowed from the request it
/// forwards.
#[derive(Debug, Clone, Copy)]
pub struct OutgoingRequest<'a> {
    /// Target service name.
    pub service: &'a str,
    /// Target instance id on the owner.
    pub instance: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Path and query.
    pub path: &'a str,
    /// See [`RequestHead::version`].
    pub version: u8,
    /// The request's headers; only the end-to-end ones are sent.
    pub headers: &'a HeaderMap,
    /// Whether this is an upgrade request (its upgrade headers go too).
    pub upgrade: bool,
    /// The request has no body.
    pub end_stream: bool,
}

impl OutgoingRequest<'_> {
    /// What opens a proxy stream: [`STREAM_PROXY`], then the head frame.
    pub fn encode_opening(&self) -> Result<Bytes, CodecError> {
        let mut w = HeadWriter::new(Some(STREAM_PROXY));
        w.bytes(self.service.as_bytes());
        w.bytes(self.instance.as_bytes());
        w.bytes(self.method.as_bytes());
        w.bytes(self.path.as_bytes());
        w.0.put_u8(self.version);
        w.headers(self.headers, self.upgrade);
        w.bool(self.upgrade);
        w.bool(self.end_stream);
        w.finish()
    }
}

/// The owner's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseHead {
    /// HTTP status.
    pub status: u16,
    /// End-to-end headers.
    pub headers: HeaderMap,
    /// The response has no body at all: the caller must end the stream
    /// with the headers (a gRPC trailers-only answer is HEADERS with
    /// END_STREAM, and clients read an extra empty DATA frame as an error).
    pub end_stream: bool,
}

impl ResponseHead {
    /// The head frame; only the end-to-end headers are sent (and the
    /// upgrade headers when `keep_upgrade`).
    pub fn encode(&self, keep_upgrade: bool) -> Result<Bytes, CodecError> {
        encode_response(self.status, &self.headers, keep_upgrade, self.end_stream)
    }
}

/// A response head frame from borrowed parts; see [`ResponseHead::encode`].
pub fn encode_response(
    status: u16,
    headers: &HeaderMap,
    keep_upgrade: bool,
    end_stream: bool,
) -> Result<Bytes, CodecError> {
    let mut w = HeadWriter::new(None);
    w.varint(u64::from(status));
    w.headers(headers, keep_upgrade);
    w.bool(end_stream);
    w.finish()
}

// The heads are written and read by hand. The bytes are what bincode's
// standard configuration makes of the same fields in the same order
// (lengths and integers as varints, u8 and bool as one byte), the format
// agents spoke when these were serde structs, so both kinds of agent
// understand each other; the tests check it. Through serde, every header
// byte was a call of its own.

/// Builds one length-prefixed head frame.
struct HeadWriter(BytesMut, usize);

impl HeadWriter {
    fn new(kind: Option<u8>) -> Self {
        let mut out = BytesMut::with_capacity(512);
        if let Some(kind) = kind {
            out.put_u8(kind);
        }
        let at = out.len();
        out.put_u32(0); // the length, once known
        Self(out, at)
    }

    fn varint(&mut self, v: u64) {
        match v {
            0..=250 => self.0.put_u8(v as u8),
            251..=0xffff => {
                self.0.put_u8(VARINT_U16);
                self.0.put_u16_le(v as u16);
            }
            0x1_0000..=0xffff_ffff => {
                self.0.put_u8(VARINT_U32);
                self.0.put_u32_le(v as u32);
            }
            _ => {
                self.0.put_u8(VARINT_U64);
                self.0.put_u64_le(v);
            }
        }
    }

    fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.0.put_slice(b);
    }

    fn bool(&mut self, b: bool) {
        self.0.put_u8(u8::from(b));
    }

    fn headers(&mut self, map: &HeaderMap, keep_upgrade: bool) {
        // One pass: the count goes in a byte written first and filled in
        // after, which holds up to 250 (a varint's one-byte range).
        let at = self.0.len();
        self.0.put_u8(0);
        let mut count = 0u64;
        for (name, value) in hop::end_to_end(map, keep_upgrade) {
            self.bytes(name.as_str().as_bytes());
            self.bytes(value.as_bytes());
            count += 1;
        }
        if count <= 250 {
            self.0[at] = count as u8;
        } else {
            let pairs = self.0.split_off(at + 1);
            self.0.truncate(at);
            self.varint(count);
            self.0.extend_from_slice(&pairs);
        }
    }

    fn finish(mut self) -> Result<Bytes, CodecError> {
        let len = self.0.len() - self.1 - 4;
        if len > MAX_HEAD {
            return Err(CodecError::TooLarge { len, max: MAX_HEAD });
        }
        self.0[self.1..self.1 + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(self.0.freeze())
    }
}

const VARINT_U16: u8 = 251;
const VARINT_U32: u8 = 252;
const VARINT_U64: u8 = 253;

/// Why a head frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// Over [`MAX_HEAD`].
    #[error("head of {0} bytes is over the limit")]
    TooLarge(usize),
    /// It ends inside a field.
    #[error("head truncated")]
    Truncated,
    /// A field that cannot be what it claims.
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    /// Bytes after the last field.
    #[error("{0} bytes after the head")]
    Trailing(usize),
}

/// Reads one head frame's payload; every length is checked against what
/// is left, so a forged length cannot make it allocate.
struct HeadReader {
    buf: Bytes,
    at: usize,
}

impl HeadReader {
    fn new(payload: Bytes) -> Result<Self, HeadError> {
        if payload.len() > MAX_HEAD {
            return Err(HeadError::TooLarge(payload.len()));
        }
        Ok(Self {
            buf: payload,
            at: 0,
        })
    }

    fn take(&mut self, n: usize) -> Result<&[u8], HeadError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(HeadError::Truncated)?;
        let out = &self.buf[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, HeadError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, HeadError> {
        Ok(match self.u8()? {
            b @ 0..=250 => u64::from(b),
            VARINT_U16 => u64::from(u16::from_le_bytes(
                self.take(2)?.try_into().expect("2 bytes"),
            )),
            VARINT_U32 => u64::from(u32::from_le_bytes(
                self.take(4)?.try_into().expect("4 bytes"),
            )),
            VARINT_U64 => u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")),
            _ => return Err(HeadError::Malformed("integer")),
        })
    }

    /// A length, which cannot exceed the bytes left.
    fn len(&mut self) -> Result<usize, HeadError> {
        let len = self.varint()?;
        usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.buf.len() - self.at)
            .ok_or(HeadError::Truncated)
    }

    /// A length-prefixed byte string, sharing the frame's buffer.
    fn bytes(&mut self) -> Result<Bytes, HeadError> {
        let len = self.len()?;
        let out = self.buf.slice(self.at..self.at + len);
        self.at += len;
        Ok(out)
    }

    fn string(&mut self) -> Result<String, HeadError> {
        let len = self.len()?;
        let text =
            std::str::from_utf8(self.take(len)?).map_err(|_| HeadError::Malformed("text"))?;
        Ok(text.to_owned())
    }

    fn bool(&mut self) -> Result<bool, HeadError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(HeadError::Malformed("bool")),
        }
    }

    /// Header pairs; pairs that are not a valid name and value are
    /// skipped, as the owner's HTTP client would refuse them.
    fn headers(&mut self) -> Result<HeaderMap, HeadError> {
        let count = self.len()?; // each pair takes at least two bytes
        let mut map = HeaderMap::with_capacity(count.min(64));
        for _ in 0..count {
            let name = self.bytes()?;
            let value = self.bytes()?;
            if let (Ok(n), Ok(v)) = (header_name(&name), HeaderValue::from_maybe_shared(value)) {
                map.try_append(n, v)
                    .map_err(|_| HeadError::Malformed("too many headers"))?;
            }
        }
        Ok(map)
    }

    fn end(self) -> Result<(), HeadError> {
        match self.buf.len() - self.at {
            0 => Ok(()),
            n => Err(HeadError::Trailing(n)),
        }
    }
}

/// Header names that no standard lists but that cross nearly every hop
/// (trace context, request ids, forwarding, gRPC's): taken from here, not
/// copied out of every head that carries them.
mod common {
    use http::HeaderName;
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
    pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
    pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
    pub const GRPC_ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
    pub const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");
}

/// A header name read off the wire.
fn header_name(bytes: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    use common::*;
    // A match on the bytes: a length test and one comparison at most.
    Ok(match bytes {
        b"traceparent" => TRACEPARENT,
        b"tracestate" => TRACESTATE,
        b"x-request-id" => REQUEST_ID,
        b"x-forwarded-for" => FORWARDED_FOR,
        b"x-forwarded-proto" => FORWARDED_PROTO,
        b"grpc-status" => GRPC_STATUS,
        b"grpc-message" => GRPC_MESSAGE,
        b"grpc-timeout" => GRPC_TIMEOUT,
        b"grpc-encoding" => GRPC_ENCODING,
        b"grpc-accept-encoding" => GRPC_ACCEPT_ENCODING,
        _ => return HeaderName::from_bytes(bytes),
    })
}

impl RequestHead {
    /// Decodes a request head frame's payload.
    pub fn decode(payload: Bytes) -> Result<Self, HeadError> {
        let mut r = HeadReader::new(payload)?;
        let head = Self {
            service: r.string()?,
            instance: r.string()?,
            method: r.string()?,
            path: r.string()?,
            version: r.u8()?,
            headers: r.headers()?,
            upgrade: r.bool()?,
            end_stream: r.bool()?,
        };
        r.end()?;
        Ok(head)
    }
}

impl ResponseHead {
    /// Decodes a response head frame's payload.
    pub fn decode(payload: Bytes) -> Result<Self, HeadError> {
        let mut r = HeadReader::new(payload)?;
        let status = u16::try_from(r.varint()?).map_err(|_| HeadError::Malformed("status"))?;
        let head = Self {
            status,
            headers: r.headers()?,
            end_stream: r.bool()?,
        };
        r.end()?;
        Ok(head)
    }
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

/// Incremental decoder of body frames from a byte stream. A frame that
/// arrives whole inside one chunk read from the stream is handed on as a
/// slice of it (no copy); one spread over several chunks is gathered into
/// a buffer sized once from its header (one copy). Whole frames go on,
/// not pieces: writing 64 KiB at a time to the client was faster than
/// passing on each packet's worth.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    /// A frame header, or a whole frame, being gathered.
    buf: BytesMut,
    /// Input not yet decoded.
    input: Bytes,
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
    /// Feeds a chunk read from the stream; call [`Self::next_frame`] until
    /// it returns `None` before feeding the next.
    pub fn push(&mut self, chunk: Bytes) {
        debug_assert!(self.input.is_empty(), "the last chunk was not drained");
        self.input = chunk;
    }

    /// Bytes of an unfinished frame: if the stream ends now, it ended
    /// inside a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() + self.input.len()
    }

    /// The next complete frame in what was fed, if any.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        // The usual case: a whole frame in the input, nothing gathered. It
        // is cut out of the input without touching `buf`, which would
        // allocate on its first use.
        if self.buf.is_empty() && self.input.len() >= 5 {
            let (kind, len) = frame_header(&self.input[..5])?;
            if self.input.len() - 5 >= len {
                self.input.advance(5);
                let payload = self.input.split_to(len);
                return frame(kind, payload).map(Some);
            }
        }
        // The header: type byte and length.
        if self.buf.len() < 5 {
            let n = (5 - self.buf.len()).min(self.input.len());
            self.buf.extend_from_slice(&self.input.split_to(n));
            if self.buf.len() < 5 {
                return Ok(None);
            }
        }
        let (kind, len) = frame_header(&self.buf[..5])?;
        let payload = if self.buf.len() == 5 && self.input.len() >= len {
            // The header was split, the payload is whole: a slice of it.
            self.input.split_to(len)
        } else {
            if self.buf.len() == 5 {
                self.buf.reserve(len);
            }
            let n = (5 + len - self.buf.len()).min(self.input.len());
            self.buf.extend_from_slice(&self.input.split_to(n));
            if self.buf.len() < 5 + len {
                return Ok(None);
            }
            self.buf.split_off(5).freeze()
        };
        self.buf.clear();
        frame(kind, payload).map(Some)
    }
}

/// A body frame's type and length, checked against the type's cap.
fn frame_header(header: &[u8]) -> Result<(u8, usize), FrameError> {
    let kind = header[0];
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let cap = match kind {
        TYPE_DATA => MAX_FRAME,
        TYPE_TRAILERS => MAX_HEAD,
        other => return Err(FrameError::UnknownType(other)),
    };
    if len > cap {
        return Err(FrameError::TooLarge(len));
    }
    Ok((kind, len))
}

/// A whole body frame of a type [`frame_header`] accepted.
fn frame(kind: u8, payload: Bytes) -> Result<Frame, FrameError> {
    Ok(match kind {
        TYPE_DATA => Frame::Data(payload),
        _ => Frame::Trailers(codec::decode_large(&payload, MAX_HEAD)?),
    })
}

/// The 5-byte header of a data frame of `len` bytes (sent ahead of the
/// data itself, which then needs no copy).
pub fn data_header(len: usize) -> Bytes {
    let mut out = BytesMut::with_capacity(5);
    out.put_u8(TYPE_DATA);
    out.put_u32(len as u32);
    out.freeze()
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
        for piece in [1, 4, 5, 6, 777, 65_536, wire.len()] {
            let mut dec = FrameDecoder::default();
            let (mut data, mut trailers) = (Vec::new(), Vec::new());
            for chunk in wire.chunks(piece) {
                dec.push(Bytes::copy_from_slice(chunk));
                while let Some(f) = dec.next_frame().unwrap() {
                    match f {
                        Frame::Data(d) => data.extend_from_slice(&d),
                        Frame::Trailers(t) => trailers.push(t),
                    }
                }
            }
            let mut want = b"hello".to_vec();
            want.extend_from_slice(&[7u8; 100_000]);
            assert_eq!(data, want, "pieces of {piece}");
            assert_eq!(
                trailers,
                vec![vec![("grpc-status".to_string(), b"0".to_vec())]]
            );
            assert_eq!(dec.buffered(), 0);
        }
    }

    #[test]
    fn data_goes_out_without_copying() {
        let mut chunk = data_header(8).to_vec();
        chunk.extend_from_slice(b"abcdefgh");
        let chunk = Bytes::from(chunk);
        let mut dec = FrameDecoder::default();
        dec.push(chunk.clone());
        let Some(Frame::Data(d)) = dec.next_frame().unwrap() else {
            panic!("a data frame");
        };
        assert_eq!(&d[..], b"abcdefgh");
        // The same memory as the chunk, and nothing gathered on the way.
        assert_eq!(d.as_ptr(), chunk[5..].as_ptr());
        assert_eq!(dec.buf.capacity(), 0, "a whole frame allocates nothing");
        // Cut inside the data: gathered, then handed on whole.
        let mut dec = FrameDecoder::default();
        dec.push(chunk.slice(..9));
        assert_eq!(dec.next_frame().unwrap(), None);
        assert_eq!(dec.buffered(), 9);
        dec.push(chunk.slice(9..));
        assert_eq!(
            dec.next_frame().unwrap(),
            Some(Frame::Data(Bytes::from_static(b"abcdefgh")))
        );
        assert_eq!(dec.next_frame().unwrap(), None);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn rejects_oversized_and_unknown() {
        let mut dec = FrameDecoder::default();
        dec.push(Bytes::from_static(&[0, 0xff, 0xff, 0xff, 0xff]));
        assert!(dec.next_frame().is_err());
        let mut dec = FrameDecoder::default();
        dec.push(Bytes::from_static(&[9, 0, 0, 0, 1, 0]));
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

    #[test]
    fn common_names_read_as_any_other() {
        let common = [
            "traceparent",
            "tracestate",
            "x-request-id",
            "x-forwarded-for",
            "x-forwarded-proto",
            "grpc-status",
            "grpc-message",
            "grpc-timeout",
            "grpc-encoding",
            "grpc-accept-encoding",
        ];
        for name in common.into_iter().chain(["x-other", "host", "te"]) {
            let ours = header_name(name.as_bytes()).unwrap();
            assert_eq!(ours, HeaderName::from_bytes(name.as_bytes()).unwrap());
            assert_eq!(ours.as_str(), name);
        }
        assert!(header_name(b"bad name").is_err());
        assert!(header_name(b"").is_err());
    }

    proptest! {
        #[test]
        fn decoder_survives_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut dec = FrameDecoder::default();
            dec.push(Bytes::copy_from_slice(&bytes));
            for _ in 0..64 {
                match dec.next_frame() {
                    Ok(Some(_)) => continue,
                    _ => break,
                }
            }
            let _ = RequestHead::decode(Bytes::from(bytes.clone()));
            let _ = ResponseHead::decode(Bytes::from(bytes));
        }

        #[test]
        fn request_heads_are_the_bytes_bincode_made(
            service in "[a-z-]{0,12}",
            path in "/[ -~]{0,300}",
            version in 1u8..=2,
            pairs in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,400}"), 0..40),
            upgrade in any::<bool>(),
            end_stream in any::<bool>(),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in &pairs {
                headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
            }
            let out = OutgoingRequest {
                service: &service, instance: "web-1", method: "PATCH", path: &path,
                version, headers: &headers, upgrade, end_stream,
            };
            let opening = out.encode_opening().unwrap();
            let old = SerdeRequestHead {
                service: service.clone(), instance: "web-1".into(), method: "PATCH".into(), path: path.clone(),
                version, headers: headers_to_wire(&headers, upgrade), upgrade, end_stream,
            };
            let bincode = codec::encode_large(&old, MAX_HEAD).unwrap();
            prop_assert_eq!(opening[0], STREAM_PROXY);
            prop_assert_eq!(&opening[1..5], &(bincode.len() as u32).to_be_bytes());
            prop_assert_eq!(&opening[5..], &bincode[..]);
            let back = RequestHead::decode(Bytes::from(bincode)).unwrap();
            prop_assert_eq!(back.service, service);
            prop_assert_eq!(back.path, path);
            prop_assert_eq!((back.version, back.upgrade, back.end_stream), (version, upgrade, end_stream));
            prop_assert_eq!(back.headers, hop::clean(&headers, upgrade));
        }

        #[test]
        fn response_heads_are_the_bytes_bincode_made(
            status in 100u16..=999,
            pairs in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", "[ -~]{0,300}"), 0..40),
            end_stream in any::<bool>(),
        ) {
            let mut headers = HeaderMap::new();
            for (name, value) in &pairs {
                headers.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
            }
            let head = ResponseHead { status, headers, end_stream };
            let frame = head.encode(false).unwrap();
            let old = SerdeResponseHead { status, headers: headers_to_wire(&head.headers, false), end_stream };
            let bincode = codec::encode_large(&old, MAX_HEAD).unwrap();
            prop_assert_eq!(&frame[4..], &bincode[..]);
            let back = ResponseHead::decode(Bytes::from(bincode)).unwrap();
            prop_assert_eq!(back, ResponseHead { status, headers: hop::clean(&head.headers, false), end_stream });
        }
    }

    #[test]
    fn header_counts_past_one_varint_byte_are_the_bytes_bincode_made() {
        // The count is written after the headers: 250 fits its first byte,
        // 251 does not. A listed header and the hop-by-hop ones are left
        // out of the count.
        for n in [249, 250, 251, 252, 300, 5_000] {
            let mut headers = HeaderMap::new();
            headers.append(
                "connection",
                HeaderValue::from_static("keep-alive, x-private"),
            );
            headers.append("x-private", HeaderValue::from_static("stays behind"));
            headers.append("keep-alive", HeaderValue::from_static("timeout=5"));
            for i in 0..n {
                let name = HeaderName::from_bytes(format!("x-h{i}").as_bytes()).unwrap();
                headers.append(name, HeaderValue::from(i));
            }
            let head = ResponseHead {
                status: 200,
                headers,
                end_stream: false,
            };
            let frame = head.encode(false).unwrap();
            let old = SerdeResponseHead {
                status: 200,
                headers: headers_to_wire(&head.headers, false),
                end_stream: false,
            };
            assert_eq!(old.headers.len(), n, "only the x-h headers are end-to-end");
            let bincode = codec::encode_large(&old, MAX_HEAD).unwrap();
            assert_eq!(&frame[4..], &bincode[..], "{n} headers");
            let back = ResponseHead::decode(Bytes::from(bincode)).unwrap();
            assert_eq!(back.headers.len(), n);
        }
    }

    /// The heads as serde structs, as agents encoded them with bincode
    /// before the hand-written codec; the wire format must not change.
    #[derive(serde::Serialize)]
    struct SerdeRequestHead {
        service: String,
        instance: String,
        method: String,
        path: String,
        version: u8,
        headers: Vec<(String, Vec<u8>)>,
        upgrade: bool,
        end_stream: bool,
    }

    #[derive(serde::Serialize)]
    struct SerdeResponseHead {
        status: u16,
        headers: Vec<(String, Vec<u8>)>,
        end_stream: bool,
    }

    #[test]
    fn forged_heads_are_refused_without_allocating() {
        // A header count of 2^32 with nothing behind it.
        let forged = Bytes::from_static(&[200, 252, 0, 0, 0, 1, 0]);
        assert!(matches!(
            ResponseHead::decode(forged),
            Err(HeadError::Truncated)
        ));
        // A value length past the end.
        let forged = Bytes::from_static(&[200, 1, 1, b'a', 253, 0, 0, 0, 0, 0, 0, 0, 128, 0]);
        assert!(matches!(
            ResponseHead::decode(forged),
            Err(HeadError::Truncated)
        ));
        // Bytes after the last field.
        let extra = Bytes::from_static(&[200, 0, 0, 9]);
        assert!(matches!(
            ResponseHead::decode(extra),
            Err(HeadError::Trailing(1))
        ));
        // A bool that is neither 0 nor 1.
        let bad = Bytes::from_static(&[200, 0, 2]);
        assert!(matches!(
            ResponseHead::decode(bad),
            Err(HeadError::Malformed("bool"))
        ));
        let huge = Bytes::from(vec![0u8; MAX_HEAD + 1]);
        assert!(matches!(
            RequestHead::decode(huge),
            Err(HeadError::TooLarge(_))
        ));
    }

    #[test]
    fn more_headers_than_a_map_holds_is_an_error_not_a_panic() {
        // 33,000 distinct names with empty values (6 bytes a pair, under
        // the cap): an http HeaderMap holds at most 32,768 names.
        let mut payload = vec![200, VARINT_U16];
        payload.extend_from_slice(&33_000u16.to_le_bytes());
        for i in 0..33_000u32 {
            let name = [0, 1, 2, 3].map(|d| b'a' + (i / 26u32.pow(d) % 26) as u8);
            payload.push(4);
            payload.extend_from_slice(&name);
            payload.push(0);
        }
        payload.push(0);
        assert!(matches!(
            ResponseHead::decode(Bytes::from(payload)),
            Err(HeadError::Malformed("too many headers"))
        ));
    }
}
