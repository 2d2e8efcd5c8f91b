//! The wire codec: every SWIM datagram starts with a two-byte versioned
//! header, then bincode (serde) with hard size limits.
//!
//! This is the only module that knows the encoding, so swapping bincode for
//! another format touches this file alone.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bytes::{Buf, BufMut};
use foca::{Header, Member};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::identity::{NodeId, validate_name};

/// First byte of every Gossamer SWIM datagram.
pub const MAGIC: u8 = 0x47;
/// Wire version; bumped on any incompatible change.
pub const VERSION: u8 = 2;
/// Hard cap on one datagram, checked before decoding anything.
pub const MAX_DATAGRAM: usize = 64 * 1024;
/// Hard cap on a single encoded value (a header or a member).
const MAX_VALUE: usize = 1024;

type Config = Configuration<LittleEndian, Varint, Limit<MAX_VALUE>>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_VALUE>()
}

/// Why bytes could not be decoded (or a value encoded).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Fewer bytes than a header needs.
    #[error("truncated input")]
    Truncated,
    /// The first byte is not ours.
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    /// Another wire version.
    #[error("unsupported wire version {0}")]
    UnsupportedVersion(u8),
    /// Over a size cap.
    #[error("{len} bytes is over the {max}-byte limit")]
    TooLarge {
        /// Size seen.
        len: usize,
        /// Limit applied.
        max: usize,
    },
    /// bincode refused the bytes.
    #[error("malformed payload: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// bincode could not encode the value.
    #[error("cannot encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// Decoded, but a node name in it is not valid.
    #[error(transparent)]
    InvalidName(#[from] crate::identity::InvalidName),
    /// Bytes left over after a complete value.
    #[error("{0} trailing bytes after the value")]
    TrailingBytes(usize),
    /// The output buffer has no room for the value.
    #[error("no room in the output buffer")]
    NoSpace,
}

/// Encodes `value` with the size-capped configuration.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(value, config())?)
}

/// Decodes one `T` from the front of `bytes`, returning it and the number of
/// bytes used. Never reads past `bytes` and never allocates more than the cap.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    Ok(bincode::serde::decode_from_slice(bytes, config())?)
}

type LargeConfig = Configuration<LittleEndian, Varint, Limit<{ crate::catalog::MAX_SYNC_FRAME }>>;

fn large_config() -> LargeConfig {
    bincode::config::standard().with_limit::<{ crate::catalog::MAX_SYNC_FRAME }>()
}

/// Encodes a stream frame payload (catalog sync), refusing anything over `max`.
pub fn encode_large<T: Serialize>(value: &T, max: usize) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, large_config())?;
    if bytes.len() > max {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    Ok(bytes)
}

/// Decodes a whole stream frame payload; trailing bytes are an error.
pub fn decode_large<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, CodecError> {
    if bytes.len() > max {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, large_config())?;
    if used != bytes.len() {
        return Err(CodecError::TrailingBytes(bytes.len() - used));
    }
    Ok(value)
}

fn put(value: &impl Serialize, mut buf: impl BufMut) -> Result<(), CodecError> {
    let bytes = encode(value)?;
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError::NoSpace);
    }
    buf.put_slice(&bytes);
    Ok(())
}

fn take<T: DeserializeOwned>(mut buf: impl Buf) -> Result<T, CodecError> {
    // foca hands us contiguous slices; a chunked Buf would only be read up
    // to its first chunk, which then fails cleanly as truncated input.
    let (value, used) = decode(buf.chunk())?;
    buf.advance(used);
    Ok(value)
}

/// Reads the versioned header of a datagram without touching the rest: used
/// to check who claims to have sent it before foca sees it.
pub fn peek_header(datagram: &[u8]) -> Result<Header<NodeId>, CodecError> {
    if datagram.len() > MAX_DATAGRAM {
        return Err(CodecError::TooLarge {
            len: datagram.len(),
            max: MAX_DATAGRAM,
        });
    }
    WireCodec.decode_header_inner(datagram)
}

/// The suspicions a datagram carries: `(member, incarnation)` of every
/// piggybacked update in state `Suspect`. Stops quietly at the first
/// record that does not decode (foca would refuse the datagram anyway).
pub fn suspicions(datagram: &[u8]) -> Vec<(NodeId, u16)> {
    use foca::Codec as _;
    let mut buf = datagram;
    if datagram.len() > MAX_DATAGRAM {
        return Vec::new();
    }
    let Ok(header) = WireCodec.decode_header_inner(&mut buf) else {
        return Vec::new();
    };
    if matches!(header.message, foca::Message::Broadcast) || buf.remaining() < 2 {
        return Vec::new();
    }
    let count = buf.get_u16();
    let mut out = Vec::new();
    for _ in 0..count {
        match WireCodec.decode_member(&mut buf) {
            Ok(m) if m.state() == foca::State::Suspect => {
                out.push((m.id().clone(), m.incarnation()));
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    out
}

/// Gossamer's `foca::Codec`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WireCodec;

impl WireCodec {
    fn decode_header_inner(&self, mut buf: impl Buf) -> Result<Header<NodeId>, CodecError> {
        if buf.remaining() < 2 {
            return Err(CodecError::Truncated);
        }
        let magic = buf.get_u8();
        if magic != MAGIC {
            return Err(CodecError::BadMagic(magic));
        }
        let version = buf.get_u8();
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion(version));
        }
        let header: Header<NodeId> = take(&mut buf)?;
        validate_name(&header.src.name)?;
        validate_name(&header.dst.name)?;
        if let foca::Message::PingReq { target: id, .. }
        | foca::Message::IndirectPing { origin: id, .. }
        | foca::Message::IndirectAck { target: id, .. }
        | foca::Message::ForwardedAck { origin: id, .. } = &header.message
        {
            validate_name(&id.name)?;
        }
        Ok(header)
    }
}

impl foca::Codec<NodeId> for WireCodec {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        mut buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        if buf.remaining_mut() < 2 {
            return Err(CodecError::NoSpace);
        }
        buf.put_u8(MAGIC);
        buf.put_u8(VERSION);
        put(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeId>, Self::Error> {
        self.decode_header_inner(buf)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeId>, Self::Error> {
        let member: Member<NodeId> = take(buf)?;
        validate_name(&member.id().name)?;
        Ok(member)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::{Codec, Message, State};
    use proptest::prelude::*;

    fn id(name: &str, port: u16, generation: u64) -> NodeId {
        NodeId::new(name, ([127, 0, 0, 1], port).into(), generation).unwrap()
    }

    fn header(message: Message<NodeId>) -> Header<NodeId> {
        Header {
            src: id("a", 1, 1),
            src_incarnation: 3,
            dst: id("b", 2, 9),
            message,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = header(Message::PingReq {
            target: id("c", 3, 4),
            probe_number: 8,
        });
        let mut buf = Vec::new();
        WireCodec.encode_header(&h, &mut buf).unwrap();
        assert_eq!(&buf[..2], &[MAGIC, VERSION]);
        assert_eq!(peek_header(&buf).unwrap(), h);
        let mut slice = &buf[..];
        assert_eq!(WireCodec.decode_header(&mut slice).unwrap(), h);
        assert!(slice.is_empty(), "the whole header is consumed");
    }

    #[test]
    fn rejects_bad_framing() {
        let mut buf = Vec::new();
        WireCodec
            .encode_header(&header(Message::Ping(1)), &mut buf)
            .unwrap();
        assert!(matches!(peek_header(&[]), Err(CodecError::Truncated)));
        assert!(matches!(peek_header(&[MAGIC]), Err(CodecError::Truncated)));
        let mut bad = buf.clone();
        bad[0] = 0;
        assert!(matches!(peek_header(&bad), Err(CodecError::BadMagic(0))));
        bad = buf.clone();
        bad[1] = 99;
        assert!(matches!(
            peek_header(&bad),
            Err(CodecError::UnsupportedVersion(99))
        ));
        for cut in 2..buf.len() {
            assert!(peek_header(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let huge = vec![MAGIC; MAX_DATAGRAM + 1];
        assert!(matches!(
            peek_header(&huge),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn rejects_invalid_names_on_the_wire() {
        let mut h = header(Message::Ping(1));
        h.src.name = "not a name".into();
        let mut buf = Vec::new();
        WireCodec.encode_header(&h, &mut buf).unwrap();
        assert!(matches!(peek_header(&buf), Err(CodecError::InvalidName(_))));
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // A varint string length of u64::MAX must be refused by the limit.
        let mut buf = vec![MAGIC, VERSION, 0xff];
        buf.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(peek_header(&buf).is_err());
    }

    #[test]
    fn encode_refuses_a_full_buffer() {
        let mut storage = Vec::new();
        let limited = (&mut storage).limit(10);
        assert!(matches!(
            WireCodec.encode_member(&Member::new(id("abc", 1, 1), 0, State::Alive), limited),
            Err(CodecError::NoSpace)
        ));
        assert!(storage.is_empty());
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9-]{0,20}[a-z0-9]"
    }

    fn arb_id() -> impl Strategy<Value = NodeId> {
        (arb_name(), any::<[u8; 4]>(), any::<u16>(), any::<u64>())
            .prop_map(|(n, ip, port, g)| NodeId::new(n, (ip, port).into(), g).unwrap())
    }

    proptest! {
        #[test]
        fn member_round_trip(id in arb_id(), inc in any::<u16>(), st in 0u8..3) {
            let state = [State::Alive, State::Suspect, State::Down][st as usize];
            let m = Member::new(id, inc, state);
            let mut buf = Vec::new();
            WireCodec.encode_member(&m, &mut buf).unwrap();
            let mut slice = &buf[..];
            prop_assert_eq!(WireCodec.decode_member(&mut slice).unwrap(), m);
            prop_assert!(slice.is_empty());
        }

        #[test]
        fn header_round_trip_any(src in arb_id(), dst in arb_id(), inc in any::<u16>(), n in any::<u8>()) {
            let h = Header { src, src_incarnation: inc, dst, message: Message::Ack(n) };
            let mut buf = Vec::new();
            WireCodec.encode_header(&h, &mut buf).unwrap();
            prop_assert_eq!(peek_header(&buf).unwrap(), h);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = peek_header(&bytes);
            let _ = WireCodec.decode_member(&bytes[..]);
            let mut framed = vec![MAGIC, VERSION];
            framed.extend_from_slice(&bytes);
            let _ = peek_header(&framed);
        }
    }
}
