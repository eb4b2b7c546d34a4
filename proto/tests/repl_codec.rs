//! Codec tests for `replblk_proto::repl`, the replication protocol between
//! two `repld` peers: frame and header round-trips, incomplete input,
//! malformed input per field, arbitrary bytes, the Write crc32c, peer
//! authentication and version negotiation.
//!
//! `Frame::decode` and `FrameHeader::decode` are cursor decoders: a strict
//! prefix of a valid encoding is `Ok(None)` with the cursor left where it
//! was. `Frame::decode_body` gets a whole body (its length is in the
//! header), so a short body is an error there.
//!
//! The byte layouts pinned by the `*_has_the_documented_layout` tests are
//! the tables of `proto/PROTOCOL.md`; change both together.

use std::fmt::Debug;
use std::io::Cursor;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use replblk_proto::repl::{
    auth_mac, auth_verify, csum_alg, data_flags, kind, negotiate_version, state_flags, BitmapChunk,
    BitmapEncoding, Frame, FrameHeader, Hello, RefuseCode, StateFrame, WriteFrame, WriteRef,
    CHALLENGE_LEN, DIGEST_LEN, HEADER_VERSION, MAC_LEN, MAGIC, MAX_BITMAP_CHUNK_BITS, MAX_BODY,
    MAX_CSUMS, MAX_DISK, MAX_MESSAGE, MAX_NAME, MAX_READ_LEN, MAX_ROLE, MAX_VERIFY_LEN,
    PROTOCOL_MAX, PROTOCOL_MIN,
};
use replblk_proto::DecodeError;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs `encode` against a fresh buffer and returns the bytes it appended.
fn encoded(encode: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(&mut buf);
    buf.to_vec()
}

fn frame_bytes(frame: &Frame) -> Vec<u8> {
    encoded(|b| frame.encode(b))
}

/// A frame with a well-formed header in front of an arbitrary body.
fn raw_frame(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut bytes = encoded(|b| {
        FrameHeader {
            kind,
            length: body.len() as u32,
        }
        .encode(b)
    });
    bytes.extend_from_slice(body);
    bytes
}

/// Decodes `bytes` from position 0 and returns the result with the cursor
/// position afterwards.
fn decode_with<T>(
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    bytes: &[u8],
) -> (Result<Option<T>, DecodeError>, u64) {
    let mut cur = Cursor::new(bytes);
    let res = decode(&mut cur);
    (res, cur.position())
}

/// Decodes a body of `kind` both ways, whole frame and `decode_body`, checks
/// that they agree and returns the result.
fn decode_raw(kind: u16, body: &[u8]) -> Result<Frame, DecodeError> {
    let direct = Frame::decode_body(kind, body);
    let (framed, _) = decode_with(Frame::decode, &raw_frame(kind, body));
    let framed = framed.map(|f| f.expect("a whole frame is never incomplete"));
    assert_eq!(framed, direct, "Frame::decode and decode_body disagree");
    direct
}

/// Asserts that `bytes` decodes to `value` and consumes exactly
/// `bytes.len()` bytes, also when more bytes follow and when the cursor does
/// not start at zero.
fn check_cursor_round_trip<T: PartialEq + Debug>(
    value: &T,
    bytes: &[u8],
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    lead: &[u8],
    trailing: &[u8],
) -> Result<(), TestCaseError> {
    let (res, pos) = decode_with(&decode, bytes);
    prop_assert_eq!(res.as_ref().map(Option::as_ref), Ok(Some(value)));
    prop_assert_eq!(pos, bytes.len() as u64);

    let mut framed = lead.to_vec();
    framed.extend_from_slice(bytes);
    framed.extend_from_slice(trailing);
    let mut cur = Cursor::new(framed.as_slice());
    cur.set_position(lead.len() as u64);
    let res = decode(&mut cur);
    prop_assert_eq!(res.as_ref().map(Option::as_ref), Ok(Some(value)));
    prop_assert_eq!(cur.position(), (lead.len() + bytes.len()) as u64);
    Ok(())
}

/// Asserts that every strict prefix of `bytes` decodes to `Ok(None)` and
/// leaves the cursor where it was (also when it does not start at zero).
fn check_prefixes_incomplete<T: Debug>(
    bytes: &[u8],
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    lead: &[u8],
) -> Result<(), TestCaseError> {
    let mut framed = lead.to_vec();
    framed.extend_from_slice(bytes);
    for cut in 0..bytes.len() {
        let mut cur = Cursor::new(&framed[..lead.len() + cut]);
        cur.set_position(lead.len() as u64);
        let res = decode(&mut cur);
        prop_assert!(
            matches!(res, Ok(None)),
            "prefix of {} of {} bytes gave {:?}",
            cut,
            bytes.len(),
            res
        );
        prop_assert_eq!(cur.position(), lead.len() as u64, "prefix of {} bytes", cut);
    }
    Ok(())
}

/// Checks what `Frame::decode` did with arbitrary input starting at
/// `start`: `Ok(None)` leaves the cursor untouched and only happens while
/// the header or the body it announces is incomplete; `Ok(Some)` consumed
/// exactly one header and its body, which re-encode to the same bytes;
/// `Err` only once a whole header is there.
fn check_arbitrary_frame(bytes: &[u8], start: usize) -> Result<(), TestCaseError> {
    let start = start.min(bytes.len());
    let rest = &bytes[start..];
    let header = FrameHeader::decode(&mut Cursor::new(rest));
    let mut cur = Cursor::new(bytes);
    cur.set_position(start as u64);
    match Frame::decode(&mut cur) {
        Ok(None) => {
            prop_assert_eq!(cur.position(), start as u64);
            match header {
                Ok(None) => prop_assert!(rest.len() < FrameHeader::LEN),
                Ok(Some(h)) => {
                    prop_assert!(rest.len() < FrameHeader::LEN + h.length as usize)
                }
                Err(e) => prop_assert!(false, "header error {:?} but frame incomplete", e),
            }
        }
        Ok(Some(frame)) => {
            let h = header
                .expect("a decoded frame has a valid header")
                .expect("a decoded frame has a whole header");
            let len = FrameHeader::LEN + h.length as usize;
            prop_assert_eq!(cur.position(), (start + len) as u64);
            prop_assert_eq!(frame.kind(), h.kind);
            let again = frame_bytes(&frame);
            prop_assert_eq!(again.as_slice(), &rest[..len]);
        }
        Err(_) => prop_assert!(rest.len() >= FrameHeader::LEN),
    }
    Ok(())
}

fn bad_utf8() -> Vec<u8> {
    // A lone continuation byte and an overlong encoding of '/'.
    vec![b'o', b'k', 0x80, 0xc0, 0xaf]
}

/// A `u16` length followed by the bytes, as on the wire.
fn wire_str(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// A Hello body built field by field, so each field can be malformed.
fn hello_body(versions: (u16, u16), node: &[u8], peer: &[u8], resource: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u16(versions.0);
    b.put_u16(versions.1);
    b.put_u64(0);
    b.put_slice(&wire_str(node));
    b.put_slice(&wire_str(peer));
    b.put_slice(&wire_str(resource));
    b.put_u64(1 << 30);
    b.put_slice(&[0x5a; CHALLENGE_LEN]);
    b.put_slice(&[1, 2]);
    b.to_vec()
}

fn trim_body(offset: u64, length: u64, flags: u32) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(1);
    b.put_u64(offset);
    b.put_u64(length);
    b.put_u32(flags);
    b.to_vec()
}

fn write_body(offset: u64, flags: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(1);
    b.put_u64(offset);
    b.put_u32(flags);
    b.put_u32(0);
    b.put_slice(payload);
    b.to_vec()
}

fn sample_hello() -> Hello {
    Hello {
        min_version: 1,
        max_version: 1,
        features: 0,
        node: "alpha".into(),
        peer: "beta".into(),
        resource: "r0".into(),
        size: 1 << 30,
        challenge: [7; CHALLENGE_LEN],
        after_sb: [0, 0],
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Valid UTF-8 of at most `max` bytes: arbitrary characters (up to 4 bytes
/// each, so `max / 4` of them stay under the limit), long ASCII runs, the
/// limit exactly, or nothing.
fn wire_string(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(any::<char>(), 0..=max / 4).prop_map(String::from_iter),
        1 => vec(0x20u8..0x7f, 0..=max)
            .prop_map(|b| String::from_utf8(b).expect("ASCII is UTF-8")),
        1 => Just("x".repeat(max)),
        1 => Just(String::new()),
    ]
}

fn name() -> impl Strategy<Value = String> {
    wire_string(MAX_NAME)
}

fn version_range() -> impl Strategy<Value = (u16, u16)> {
    (any::<u16>(), any::<u16>()).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        version_range(),
        any::<u64>(),
        name(),
        name(),
        name(),
        any::<u64>(),
        any::<[u8; CHALLENGE_LEN]>(),
        any::<[u8; 2]>(),
    )
        .prop_map(
            |(
                (min_version, max_version),
                features,
                node,
                peer,
                resource,
                size,
                challenge,
                after_sb,
            )| Hello {
                min_version,
                max_version,
                features,
                node,
                peer,
                resource,
                size,
                challenge,
                after_sb,
            },
        )
}

fn refuse_code() -> impl Strategy<Value = RefuseCode> {
    // Codes with a name decode to the named variant, so `Other(1..=8)`
    // never round-trips; building codes from the wire avoids it.
    prop_oneof![
        (0u16..10).prop_map(RefuseCode::from_wire),
        any::<u16>().prop_map(RefuseCode::from_wire),
    ]
}

/// Flags valid on `Write` and `Trim`.
fn write_flags() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), Just(data_flags::FUA)]
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        8 => vec(any::<u8>(), 0..512),
        1 => vec(any::<u8>(), 4096..=8192),
    ]
    .prop_map(Bytes::from)
}

/// Offsets biased towards the ends of the range, so the overflow check is
/// exercised right at its boundary.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u64..1 << 20).prop_map(|o| o * 512),
        (0u64..16).prop_map(|d| u64::MAX - d),
    ]
}

fn write_frame() -> impl Strategy<Value = WriteFrame> {
    (
        any::<u64>(),
        offset(),
        write_flags(),
        payload(),
        any::<bool>(),
        any::<u32>(),
    )
        .prop_map(|(seq, offset, flags, payload, honest, crc)| {
            let offset = offset.min(u64::MAX - payload.len() as u64);
            let mut w = WriteFrame::new(seq, offset, flags, payload);
            if !honest {
                // The codec carries whatever crc the sender put there.
                w.crc = crc;
            }
            w
        })
}

/// `(seq, offset, length)` of a range that does not overflow.
fn range() -> impl Strategy<Value = (u64, u64, u64)> {
    (any::<u64>(), offset(), offset()).prop_map(|(seq, offset, length)| {
        let length = length.min(u64::MAX - offset);
        (seq, offset, length)
    })
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        hello().prop_map(Frame::Hello),
        any::<[u8; MAC_LEN]>().prop_map(|mac| Frame::Auth { mac }),
        Just(Frame::AuthOk),
        (refuse_code(), wire_string(MAX_MESSAGE))
            .prop_map(|(code, message)| Frame::Refuse { code, message }),
        write_frame().prop_map(Frame::Write),
        (range(), write_flags()).prop_map(|((seq, offset, length), flags)| Frame::Trim {
            seq,
            offset,
            length,
            flags,
        }),
        (range(), 0..=data_flags::KNOWN).prop_map(|((seq, offset, length), flags)| {
            Frame::WriteZeroes {
                seq,
                offset,
                length,
                flags,
            }
        }),
        any::<u64>().prop_map(|seq| Frame::Barrier { seq }),
        (any::<u64>(), any::<u32>()).prop_map(|(seq, status)| Frame::Ack { seq, status }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        state_frame().prop_map(Frame::State),
        any::<u64>().prop_map(|current| Frame::SyncDone { current }),
        (
            any::<u64>(),
            0u64..u64::MAX / 2,
            9u32..21,
            1u32..(MAX_CSUMS * 8)
        )
            .prop_map(|(id, offset, shift, length)| Frame::CsumQuery {
                id,
                offset,
                length: (u64::from(length).min(u64::from(MAX_CSUMS) << shift))
                    .min(u64::from(u32::MAX)) as u32,
                block: 1 << shift,
                alg: csum_alg::XXH3_128,
            }),
        (any::<u64>(), vec(any::<u128>(), 0..300)).prop_map(|(id, digests)| {
            Frame::CsumReply {
                id,
                alg: csum_alg::XXH3_128,
                digests,
            }
        }),
        bitmap_chunk().prop_map(Frame::Bitmap),
        verify_request(),
        verify_reply(),
        (offset(), offset()).prop_map(|(offset, length)| Frame::OutOfSync {
            offset,
            length: length.min(u64::MAX - offset),
        }),
        (any::<u64>(), 0u64..u64::MAX / 2, 1u32..=MAX_READ_LEN)
            .prop_map(|(id, offset, length)| Frame::ReadRequest { id, offset, length }),
        (any::<u64>(), vec(any::<u8>(), 0..5000)).prop_map(|(id, data)| Frame::ReadReply {
            id,
            status: 0,
            data
        }),
        (any::<u64>(), 1u32..200).prop_map(|(id, status)| Frame::ReadReply {
            id,
            status,
            data: Vec::new()
        }),
        Just(Frame::Invalidate),
    ]
}

/// A bitmap of `bits` bits in raw form: random, runs of ones, or empty.
fn bitmap_bytes() -> impl Strategy<Value = (Vec<u8>, u64)> {
    (1u64..5000, any::<u64>(), 0u8..3).prop_map(|(bits, seed, kind)| {
        let mut bytes = vec![0u8; bits.div_ceil(8) as usize];
        let mut x = seed | 1;
        let mut b = 0;
        while b < bits {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let run = match kind {
                0 => 1,
                1 => x % 300 + 1,
                _ => bits,
            };
            let on = kind != 2 && x & 1 == 1;
            for i in b..(b + run).min(bits) {
                if on {
                    bytes[(i / 8) as usize] |= 1 << (i % 8);
                }
            }
            b += run;
        }
        (bytes, bits)
    })
}

fn bitmap_chunk() -> impl Strategy<Value = BitmapChunk> {
    (bitmap_bytes(), 1u64..2000, any::<prop::sample::Index>()).prop_map(
        |((bytes, bits), chunk, pick)| {
            let chunks = BitmapChunk::split(&bytes, bits, chunk);
            chunks[pick.index(chunks.len())].clone()
        },
    )
}

fn verify_request() -> impl Strategy<Value = Frame> {
    (any::<u64>(), offset(), 1..=MAX_VERIFY_LEN, 9u32..=20).prop_map(
        |(id, offset, length, shift)| Frame::VerifyRequest {
            id,
            offset: offset.min(u64::MAX - u64::from(length)),
            length,
            block: 1 << shift,
        },
    )
}

fn verify_reply() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), vec(any::<[u8; DIGEST_LEN]>(), 0..70)).prop_map(|(id, digests)| {
            Frame::VerifyReply {
                id,
                status: 0,
                digests,
            }
        }),
        (any::<u64>(), 1u32..).prop_map(|(id, status)| Frame::VerifyReply {
            id,
            status,
            digests: Vec::new(),
        }),
    ]
}

fn state_frame() -> impl Strategy<Value = StateFrame> {
    (
        0..=MAX_ROLE,
        0..=MAX_DISK,
        0..=state_flags::KNOWN,
        any::<u32>(),
        any::<[u64; 6]>(),
    )
        .prop_map(|(role, disk, state_flags, md_flags, u)| StateFrame {
            role,
            disk,
            state_flags,
            md_flags,
            current: u[0],
            bitmap: u[1],
            history: [u[2], u[3]],
            dirty_bits: u[4],
            token: u[5],
        })
}

/// Bytes placed before and after a value, to check decoders neither look
/// behind the cursor nor consume past their own encoding.
fn framing() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (vec(any::<u8>(), 0..8), vec(any::<u8>(), 0..16))
}

const KNOWN_KINDS: [u16; 22] = [
    kind::READ_REQUEST,
    kind::READ_REPLY,
    kind::CSUM_QUERY,
    kind::CSUM_REPLY,
    kind::BITMAP,
    kind::VERIFY_REQUEST,
    kind::VERIFY_REPLY,
    kind::OUT_OF_SYNC,
    kind::INVALIDATE,
    kind::STATE,
    kind::SYNC_DONE,
    kind::HELLO,
    kind::AUTH,
    kind::AUTH_OK,
    kind::REFUSE,
    kind::WRITE,
    kind::TRIM,
    kind::WRITE_ZEROES,
    kind::BARRIER,
    kind::ACK,
    kind::PING,
    kind::PONG,
];

fn unknown_kind() -> impl Strategy<Value = u16> {
    prop_oneof![0u16..64, any::<u16>()]
        .prop_filter("must not be a known kind", |k| !KNOWN_KINDS.contains(k))
}

// ---------------------------------------------------------------------------
// Round-trips and incomplete input
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn every_frame_variant_round_trips_and_consumes_exactly_its_bytes(
        frame in frame(),
        (lead, trail) in framing(),
    ) {
        let bytes = frame_bytes(&frame);
        check_cursor_round_trip(&frame, &bytes, Frame::decode, &lead, &trail)?;
    }

    #[test]
    fn every_frame_starts_with_a_header_announcing_its_kind_and_body_length(frame in frame()) {
        let bytes = frame_bytes(&frame);
        prop_assert_eq!(&bytes[..4], b"RBLK");
        let (header, pos) = decode_with(FrameHeader::decode, &bytes);
        prop_assert_eq!(pos, FrameHeader::LEN as u64);
        prop_assert_eq!(
            header,
            Ok(Some(FrameHeader {
                kind: frame.kind(),
                length: (bytes.len() - FrameHeader::LEN) as u32,
            }))
        );
        let body = &bytes[FrameHeader::LEN..];
        prop_assert_eq!(Frame::decode_body(frame.kind(), body), Ok(frame));
    }

    #[test]
    fn every_strict_prefix_of_a_frame_is_incomplete(frame in frame(), (lead, _) in framing()) {
        let bytes = frame_bytes(&frame);
        check_prefixes_incomplete(&bytes, Frame::decode, &lead)?;
    }

    #[test]
    fn consecutive_frames_decode_one_after_another(frames in vec(frame(), 1..6)) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(frame_bytes(f));
        }
        let mut cur = Cursor::new(stream.as_slice());
        for f in &frames {
            prop_assert_eq!(Frame::decode(&mut cur), Ok(Some(f.clone())));
        }
        prop_assert_eq!(cur.position(), stream.len() as u64);
        prop_assert_eq!(Frame::decode(&mut cur), Ok(None));
    }

    #[test]
    fn frame_header_round_trips(
        kind in any::<u16>(),
        length in prop_oneof![0..=MAX_BODY, Just(MAX_BODY)],
        (lead, trail) in framing(),
    ) {
        let header = FrameHeader { kind, length };
        let bytes = encoded(|b| header.encode(b));
        prop_assert_eq!(bytes.len(), FrameHeader::LEN);
        check_cursor_round_trip(&header, &bytes, FrameHeader::decode, &lead, &trail)?;
    }

    #[test]
    fn every_strict_prefix_of_a_frame_header_is_incomplete(
        kind in any::<u16>(),
        length in any::<u32>(),
        magic in any::<u32>(),
        (lead, _) in framing(),
    ) {
        // Even a bad magic or an oversized length is only judged once the
        // whole header is there.
        let mut bytes = encoded(|b| FrameHeader { kind, length }.encode(b));
        bytes[..4].copy_from_slice(&magic.to_be_bytes());
        check_prefixes_incomplete(&bytes, FrameHeader::decode, &lead)?;
    }

    #[test]
    fn refuse_codes_survive_from_wire_and_to_wire(code in any::<u16>()) {
        prop_assert_eq!(RefuseCode::from_wire(code).to_wire(), code);
    }
}

// ---------------------------------------------------------------------------
// Byte layouts (the tables of proto/PROTOCOL.md)
// ---------------------------------------------------------------------------

fn header(kind: u16, length: u32) -> Vec<u8> {
    let mut v = vec![0x52, 0x42, 0x4c, 0x4b, 0x00, 0x01];
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Encodes `frame`, compares it with the expected header and body, and
/// decodes the expected bytes back to `frame`.
fn check_layout(frame: &Frame, kind: u16, body: &[u8]) {
    let expected = concat(&[&header(kind, body.len() as u32), body]);
    assert_eq!(frame_bytes(frame), expected, "{frame:?}");
    assert_eq!(
        decode_with(Frame::decode, &expected),
        (Ok(Some(frame.clone())), expected.len() as u64)
    );
}

#[test]
fn protocol_constants_have_their_documented_values() {
    assert_eq!(MAGIC, 0x5242_4c4b);
    assert_eq!(MAGIC.to_be_bytes(), *b"RBLK");
    assert_eq!(HEADER_VERSION, 1);
    assert_eq!((PROTOCOL_MIN, PROTOCOL_MAX), (2, 2));
    assert_eq!(MAX_BODY, 33_554_496);
    assert_eq!(MAX_BODY, 32 * 1024 * 1024 + 64);
    assert_eq!((CHALLENGE_LEN, MAC_LEN), (32, 32));
    assert_eq!((MAX_NAME, MAX_MESSAGE), (255, 1024));
    assert_eq!(FrameHeader::LEN, 12);
    assert_eq!(WriteFrame::FIXED, 24);
    assert_eq!(StateFrame::LEN, 56);
    assert_eq!(
        (
            state_flags::DISCARD_MY_DATA,
            state_flags::REPLY,
            state_flags::PROMOTING,
            state_flags::ANSWER
        ),
        (1, 2, 4, 8)
    );
    assert_eq!((data_flags::FUA, data_flags::NO_HOLE), (1, 2));
    assert_eq!(data_flags::KNOWN, 3);
}

#[test]
fn frame_kinds_have_their_documented_numbers() {
    assert_eq!(
        KNOWN_KINDS,
        [53, 54, 22, 23, 48, 49, 50, 51, 52, 5, 21, 1, 2, 3, 4, 16, 17, 18, 19, 20, 32, 33],
        "CSUM_QUERY CSUM_REPLY BITMAP VERIFY_REQUEST VERIFY_REPLY OUT_OF_SYNC INVALIDATE STATE SYNC_DONE HELLO AUTH AUTH_OK REFUSE WRITE TRIM WRITE_ZEROES BARRIER ACK PING PONG"
    );
}

#[test]
fn refuse_codes_have_their_documented_numbers() {
    let named = [
        (RefuseCode::VersionMismatch, 1),
        (RefuseCode::UnknownResource, 2),
        (RefuseCode::WrongPeer, 3),
        (RefuseCode::SizeMismatch, 4),
        (RefuseCode::AuthFailed, 5),
        (RefuseCode::ProtocolError, 6),
        (RefuseCode::Busy, 7),
        (RefuseCode::ConfigMismatch, 8),
    ];
    for (code, wire) in named {
        assert_eq!(code.to_wire(), wire, "{code:?}");
        assert_eq!(RefuseCode::from_wire(wire), code);
    }
    assert_eq!(RefuseCode::from_wire(0), RefuseCode::Other(0));
    assert_eq!(RefuseCode::from_wire(9), RefuseCode::Other(9));
    assert_eq!(RefuseCode::from_wire(u16::MAX), RefuseCode::Other(u16::MAX));
}

#[test]
fn frame_header_has_the_documented_layout() {
    let bytes = encoded(|b| {
        FrameHeader {
            kind: 0x0102,
            length: 0x0304_0506,
        }
        .encode(b)
    });
    assert_eq!(
        bytes,
        [0x52, 0x42, 0x4c, 0x4b, 0x00, 0x01, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06]
    );
}

#[test]
fn hello_has_the_documented_layout() {
    let frame = Frame::Hello(Hello {
        min_version: 1,
        max_version: 3,
        features: 0x0102_0304_0506_0708,
        node: "a".into(),
        peer: "bc".into(),
        resource: "r0".into(),
        size: 0x1000,
        challenge: [0x11; CHALLENGE_LEN],
        after_sb: [2, 1],
    });
    let body = concat(&[
        &[0, 1, 0, 3],
        &[1, 2, 3, 4, 5, 6, 7, 8],
        &[0, 1, b'a'],
        &[0, 2, b'b', b'c'],
        &[0, 2, b'r', b'0'],
        &[0, 0, 0, 0, 0, 0, 0x10, 0],
        &[0x11; 32],
        &[2, 1],
    ]);
    // 60 fixed bytes plus the three names.
    assert_eq!(body.len(), 60 + 1 + 2 + 2);
    check_layout(&frame, 1, &body);
}

#[test]
fn auth_and_auth_ok_have_the_documented_layout() {
    check_layout(&Frame::Auth { mac: [0xaa; 32] }, 2, &[0xaa; 32]);
    check_layout(&Frame::AuthOk, 3, &[]);
}

#[test]
fn state_and_sync_done_have_the_documented_layout() {
    let frame = Frame::State(StateFrame {
        role: 1,
        disk: 4,
        state_flags: state_flags::REPLY,
        md_flags: 0x0102_0304,
        current: 0x1111_2222_3333_4444,
        bitmap: 5,
        history: [6, 7],
        dirty_bits: 8,
        token: 9,
    });
    let mut body = vec![1, 4, 0, 2, 1, 2, 3, 4];
    for v in [0x1111_2222_3333_4444u64, 5, 6, 7, 8, 9] {
        body.extend_from_slice(&v.to_be_bytes());
    }
    check_layout(&frame, 5, &body);
    check_layout(&Frame::SyncDone { current: 9 }, 21, &9u64.to_be_bytes());
}

#[test]
fn state_rejects_out_of_range_fields() {
    let good = [0u8; StateFrame::LEN];
    assert!(Frame::decode_body(kind::STATE, &good).is_ok());
    for (at, value) in [(0, MAX_ROLE + 1), (1, MAX_DISK + 1), (2, 0x80), (3, 0x10)] {
        let mut bad = good;
        bad[at] = value;
        assert!(
            Frame::decode_body(kind::STATE, &bad).is_err(),
            "byte {at} = {value} was accepted"
        );
    }
    assert!(Frame::decode_body(kind::STATE, &good[..StateFrame::LEN - 1]).is_err());
    assert!(Frame::decode_body(kind::SYNC_DONE, &[0; 7]).is_err());
}

#[test]
fn refuse_has_the_documented_layout() {
    let frame = Frame::Refuse {
        code: RefuseCode::AuthFailed,
        message: "no".into(),
    };
    check_layout(&frame, 4, &[0, 5, 0, 2, b'n', b'o']);
}

#[test]
fn write_has_the_documented_layout() {
    let frame = Frame::Write(WriteFrame::new(
        7,
        4096,
        data_flags::FUA,
        Bytes::from_static(b"abc"),
    ));
    let body = concat(&[
        &[0, 0, 0, 0, 0, 0, 0, 7],
        &[0, 0, 0, 0, 0, 0, 0x10, 0],
        &[0, 0, 0, 1],
        // crc32c("abc")
        &[0x36, 0x4b, 0x3f, 0xb7],
        b"abc",
    ]);
    check_layout(&frame, 16, &body);
}

#[test]
fn trim_and_write_zeroes_have_the_documented_layout() {
    let body = |flags: u8| {
        concat(&[
            &[0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0, 0, 0, 0, 0, 0, 0, 3],
            &[0, 0, 0, flags],
        ])
    };
    let trim = Frame::Trim {
        seq: 1,
        offset: 2,
        length: 3,
        flags: data_flags::FUA,
    };
    check_layout(&trim, 17, &body(1));
    let zeroes = Frame::WriteZeroes {
        seq: 1,
        offset: 2,
        length: 3,
        flags: data_flags::FUA | data_flags::NO_HOLE,
    };
    check_layout(&zeroes, 18, &body(3));
}

#[test]
fn barrier_ack_ping_and_pong_have_the_documented_layout() {
    let n = [1, 2, 3, 4, 5, 6, 7, 8];
    check_layout(
        &Frame::Barrier {
            seq: 0x0102_0304_0506_0708,
        },
        19,
        &n,
    );
    check_layout(
        &Frame::Ack {
            seq: 0x0102_0304_0506_0708,
            status: 5,
        },
        20,
        &concat(&[&n, &[0, 0, 0, 5]]),
    );
    check_layout(
        &Frame::Ping {
            nonce: 0x0102_0304_0506_0708,
        },
        32,
        &n,
    );
    check_layout(
        &Frame::Pong {
            nonce: 0x0102_0304_0506_0708,
        },
        33,
        &n,
    );
}

// ---------------------------------------------------------------------------
// Malformed input: the frame header
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn frame_with_a_bad_magic_is_rejected(
        magic in any::<u32>().prop_filter("must differ from the magic", |m| *m != MAGIC),
        frame in frame(),
    ) {
        let mut bytes = frame_bytes(&frame);
        bytes[..4].copy_from_slice(&magic.to_be_bytes());
        let expected = DecodeError::BadMagic { expected: MAGIC.into(), got: magic.into() };
        prop_assert_eq!(decode_with(Frame::decode, &bytes).0, Err(expected.clone()));
        prop_assert_eq!(decode_with(FrameHeader::decode, &bytes).0, Err(expected));
    }

    #[test]
    fn frame_with_a_bad_header_version_is_rejected(
        version in any::<u16>().prop_filter("must differ", |v| *v != HEADER_VERSION),
        frame in frame(),
    ) {
        let mut bytes = frame_bytes(&frame);
        bytes[4..6].copy_from_slice(&version.to_be_bytes());
        let (res, _) = decode_with(Frame::decode, &bytes);
        prop_assert!(
            matches!(res, Err(DecodeError::Invalid { what: "frame header version", .. })),
            "{:?}",
            res
        );
    }

    #[test]
    fn frame_whose_body_length_exceeds_max_body_is_rejected_before_the_body_arrives(
        length in MAX_BODY + 1..=u32::MAX,
        kind in any::<u16>(),
    ) {
        // Only the header is there: the length alone condemns the frame.
        let bytes = encoded(|b| FrameHeader { kind, length }.encode(b));
        let expected = DecodeError::TooLong {
            what: "frame body",
            len: length.into(),
            max: MAX_BODY.into(),
        };
        prop_assert_eq!(decode_with(FrameHeader::decode, &bytes).0, Err(expected.clone()));
        prop_assert_eq!(decode_with(Frame::decode, &bytes).0, Err(expected));
    }

    #[test]
    fn frame_of_an_unknown_kind_is_rejected(
        kind in unknown_kind(),
        body in vec(any::<u8>(), 0..64),
    ) {
        // The header itself carries any kind; only the frame decoder judges it.
        let bytes = raw_frame(kind, &body);
        let (header, _) = decode_with(FrameHeader::decode, &bytes);
        prop_assert_eq!(header, Ok(Some(FrameHeader { kind, length: body.len() as u32 })));
        let res = decode_raw(kind, &body);
        match res {
            Err(DecodeError::Invalid { what: "frame kind", detail }) => {
                prop_assert!(detail.contains(&kind.to_string()), "{}", detail);
            }
            other => prop_assert!(false, "expected an unknown kind error, got {:?}", other),
        }
    }

    #[test]
    fn frame_of_an_unknown_kind_is_only_judged_once_its_body_is_there(
        kind in unknown_kind(),
        body in vec(any::<u8>(), 1..64),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = raw_frame(kind, &body);
        let cut = FrameHeader::LEN + cut.index(body.len());
        prop_assert_eq!(decode_with(Frame::decode, &bytes[..cut]), (Ok(None), 0));
    }
}

#[test]
fn frame_with_a_body_of_exactly_max_body_bytes_is_accepted() {
    let payload = Bytes::from(vec![0xa5; MAX_BODY as usize - WriteFrame::FIXED]);
    let frame = Frame::Write(WriteFrame::new(1, 0, 0, payload));
    let bytes = frame_bytes(&frame);
    assert_eq!(bytes.len(), FrameHeader::LEN + MAX_BODY as usize);
    assert_eq!(
        decode_with(Frame::decode, &bytes),
        (Ok(Some(frame)), bytes.len() as u64)
    );
}

#[test]
fn frame_header_with_version_zero_is_rejected_naming_both_versions() {
    let mut bytes = header(kind::PING, 8);
    bytes[4..6].copy_from_slice(&[0, 0]);
    match decode_with(FrameHeader::decode, &bytes).0 {
        Err(DecodeError::Invalid {
            what: "frame header version",
            detail,
        }) => assert_eq!(detail, "0, expected 1"),
        other => panic!("expected a version error, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Malformed input: fixed-length bodies
// ---------------------------------------------------------------------------

/// Kinds whose body has one valid length, with the name their errors use.
const FIXED_BODIES: [(u16, &str, usize); 8] = [
    (kind::AUTH, "Auth", MAC_LEN),
    (kind::AUTH_OK, "AuthOk", 0),
    (kind::TRIM, "Trim/WriteZeroes", 28),
    (kind::WRITE_ZEROES, "Trim/WriteZeroes", 28),
    (kind::BARRIER, "Barrier", 8),
    (kind::ACK, "Ack", 12),
    (kind::PING, "Ping", 8),
    (kind::PONG, "Pong", 8),
];

proptest! {
    #[test]
    fn fixed_length_frames_with_any_other_body_length_are_rejected(
        which in 0..FIXED_BODIES.len(),
        len in 0usize..80,
        fill in any::<u8>(),
    ) {
        let (kind, what, right) = FIXED_BODIES[which];
        prop_assume!(len != right);
        let res = decode_raw(kind, &vec![fill; len]);
        prop_assert_eq!(
            res,
            Err(DecodeError::LengthMismatch {
                what,
                declared: right as u64,
                actual: len as u64,
            })
        );
    }
}

#[test]
fn fixed_length_frames_one_byte_short_or_long_are_rejected() {
    for (kind, what, right) in FIXED_BODIES {
        let mut lens = vec![right + 1];
        if right > 0 {
            lens.push(right - 1);
        }
        for len in lens {
            assert_eq!(
                decode_raw(kind, &vec![0; len]),
                Err(DecodeError::LengthMismatch {
                    what,
                    declared: right as u64,
                    actual: len as u64,
                }),
                "kind {kind}, {len} bytes"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Malformed input: Hello
// ---------------------------------------------------------------------------

const HELLO_NAMES: [&str; 3] = ["Hello node name", "Hello peer name", "Hello resource name"];

/// A Hello body with `bad` as the name at position `which` (0 node, 1 peer,
/// 2 resource) and valid names elsewhere.
fn hello_with_name(which: usize, bad: &[u8]) -> Vec<u8> {
    let mut names: [&[u8]; 3] = [b"alpha", b"beta", b"r0"];
    names[which] = bad;
    hello_body((1, 1), names[0], names[1], names[2])
}

proptest! {
    #[test]
    fn hello_with_min_version_above_max_version_is_rejected(
        (lo, hi) in version_range().prop_filter("needs two versions", |(a, b)| a != b),
    ) {
        let res = decode_raw(kind::HELLO, &hello_body((hi, lo), b"alpha", b"beta", b"r0"));
        match res {
            Err(DecodeError::Invalid { what: "Hello version range", detail }) => {
                prop_assert_eq!(detail, format!("min {hi} > max {lo}"));
            }
            other => prop_assert!(false, "expected a version range error, got {:?}", other),
        }
    }

    #[test]
    fn hello_truncated_anywhere_is_rejected_as_a_length_mismatch(
        hello in hello(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = frame_bytes(&Frame::Hello(hello));
        let body = &bytes[FrameHeader::LEN..];
        let cut = cut.index(body.len());
        let res = decode_raw(kind::HELLO, &body[..cut]);
        prop_assert!(matches!(res, Err(DecodeError::LengthMismatch { .. })), "{:?}", res);
    }

    #[test]
    fn hello_with_trailing_bytes_is_rejected(
        hello in hello(),
        extra in vec(any::<u8>(), 1..16),
    ) {
        let bytes = frame_bytes(&Frame::Hello(hello));
        let mut body = bytes[FrameHeader::LEN..].to_vec();
        body.extend_from_slice(&extra);
        prop_assert_eq!(
            decode_raw(kind::HELLO, &body),
            Err(DecodeError::LengthMismatch {
                what: "Hello size, challenge and policies",
                declared: 42,
                actual: 42 + extra.len() as u64,
            })
        );
    }

    #[test]
    fn hello_with_a_declared_name_length_above_255_is_rejected_before_reading_it(
        which in 0usize..3,
        len in MAX_NAME as u16 + 1..=u16::MAX,
    ) {
        // Only the length field is there, not the name it announces.
        let mut body = hello_with_name(which, b"");
        let at = 12 + [0, 7, 13][which];
        body[at..at + 2].copy_from_slice(&len.to_be_bytes());
        prop_assert_eq!(
            decode_raw(kind::HELLO, &body),
            Err(DecodeError::TooLong {
                what: HELLO_NAMES[which],
                len: len.into(),
                max: MAX_NAME as u64,
            })
        );
    }
}

#[test]
fn hello_shorter_than_its_version_and_feature_fields_is_rejected() {
    for len in 0..12u64 {
        assert_eq!(
            decode_raw(kind::HELLO, &vec![0; len as usize]),
            Err(DecodeError::LengthMismatch {
                what: "Hello",
                declared: 12,
                actual: len,
            }),
            "{len} bytes"
        );
    }
}

#[test]
fn hello_with_any_name_of_256_bytes_is_rejected() {
    for (which, what) in HELLO_NAMES.into_iter().enumerate() {
        let body = hello_with_name(which, &[b'n'; MAX_NAME + 1]);
        assert_eq!(
            decode_raw(kind::HELLO, &body),
            Err(DecodeError::TooLong {
                what,
                len: MAX_NAME as u64 + 1,
                max: MAX_NAME as u64,
            })
        );
    }
}

#[test]
fn hello_with_names_of_exactly_255_bytes_is_accepted() {
    let long = "é".repeat(127) + "x";
    assert_eq!(long.len(), MAX_NAME);
    let body = hello_body((1, 2), long.as_bytes(), long.as_bytes(), long.as_bytes());
    match decode_raw(kind::HELLO, &body) {
        Ok(Frame::Hello(h)) => {
            assert_eq!(
                (h.node, h.peer, h.resource),
                (long.clone(), long.clone(), long)
            );
            assert_eq!((h.min_version, h.max_version), (1, 2));
        }
        other => panic!("expected a Hello, got {other:?}"),
    }
}

#[test]
fn hello_with_any_name_not_utf8_is_rejected() {
    for (which, what) in HELLO_NAMES.into_iter().enumerate() {
        let body = hello_with_name(which, &bad_utf8());
        assert_eq!(
            decode_raw(kind::HELLO, &body),
            Err(DecodeError::NotUtf8(what))
        );
    }
}

#[test]
fn hello_with_a_name_longer_than_the_rest_of_the_body_is_rejected() {
    // The node name claims 200 bytes; only the 5-byte name and the rest of
    // the body follow.
    let mut body = hello_with_name(0, b"alpha");
    body[12..14].copy_from_slice(&200u16.to_be_bytes());
    let actual = body.len() as u64 - 14;
    assert_eq!(
        decode_raw(kind::HELLO, &body),
        Err(DecodeError::LengthMismatch {
            what: "Hello node name",
            declared: 200,
            actual,
        })
    );
}

#[test]
fn hello_cut_inside_a_name_length_field_reports_the_bytes_present() {
    // Twelve fixed bytes, then one byte of the node name's length.
    let body = hello_with_name(0, b"alpha");
    assert_eq!(
        decode_raw(kind::HELLO, &body[..13]),
        Err(DecodeError::LengthMismatch {
            what: "Hello node name",
            declared: 2,
            actual: 1,
        })
    );
}

#[test]
fn hello_with_empty_names_and_a_single_version_is_accepted() {
    let body = hello_body((7, 7), b"", b"", b"");
    assert_eq!(body.len(), 60);
    assert_eq!(
        decode_raw(kind::HELLO, &body),
        Ok(Frame::Hello(Hello {
            min_version: 7,
            max_version: 7,
            features: 0,
            node: String::new(),
            peer: String::new(),
            resource: String::new(),
            size: 1 << 30,
            challenge: [0x5a; CHALLENGE_LEN],
            after_sb: [1, 2],
        }))
    );
}

// ---------------------------------------------------------------------------
// Malformed input: Refuse
// ---------------------------------------------------------------------------

fn refuse_body(code: u16, message: &[u8]) -> Vec<u8> {
    let mut v = code.to_be_bytes().to_vec();
    v.extend(wire_str(message));
    v
}

proptest! {
    #[test]
    fn refuse_with_trailing_bytes_is_rejected(
        code in any::<u16>(),
        message in wire_string(MAX_MESSAGE),
        extra in vec(any::<u8>(), 1..16),
    ) {
        let mut body = refuse_body(code, message.as_bytes());
        let used = body.len() as u64;
        body.extend_from_slice(&extra);
        prop_assert_eq!(
            decode_raw(kind::REFUSE, &body),
            Err(DecodeError::LengthMismatch {
                what: "Refuse",
                declared: used,
                actual: used + extra.len() as u64,
            })
        );
    }

    #[test]
    fn refuse_cut_inside_its_message_is_rejected(
        message in wire_string(MAX_MESSAGE).prop_filter("needs a message", |m| !m.is_empty()),
        cut in any::<prop::sample::Index>(),
    ) {
        let body = refuse_body(5, message.as_bytes());
        let cut = 4 + cut.index(message.len());
        prop_assert_eq!(
            decode_raw(kind::REFUSE, &body[..cut]),
            Err(DecodeError::LengthMismatch {
                what: "Refuse message",
                declared: message.len() as u64,
                actual: cut as u64 - 4,
            })
        );
    }

    #[test]
    fn refuse_messages_longer_than_1024_bytes_are_truncated_on_a_character_boundary(
        code in refuse_code(),
        message in vec(any::<char>(), MAX_MESSAGE + 1..1200).prop_map(String::from_iter),
    ) {
        let frame = Frame::Refuse { code, message: message.clone() };
        let (res, _) = decode_with(Frame::decode, &frame_bytes(&frame));
        match res {
            Ok(Some(Frame::Refuse { code: got, message: sent })) => {
                prop_assert_eq!(got, code);
                prop_assert!(sent.len() <= MAX_MESSAGE);
                prop_assert!(message.starts_with(&sent));
                // Nothing longer would have fitted.
                let next = message[sent.len()..].chars().next().expect("was truncated");
                prop_assert!(sent.len() + next.len_utf8() > MAX_MESSAGE);
            }
            other => prop_assert!(false, "expected a Refuse, got {:?}", other),
        }
    }
}

#[test]
fn refuse_shorter_than_its_code_is_rejected() {
    for len in 0..2u64 {
        assert_eq!(
            decode_raw(kind::REFUSE, &vec![0; len as usize]),
            Err(DecodeError::LengthMismatch {
                what: "Refuse",
                declared: 2,
                actual: len,
            })
        );
    }
}

#[test]
fn refuse_without_its_message_length_is_rejected_naming_the_bytes_present() {
    for len in 2..4u64 {
        assert_eq!(
            decode_raw(kind::REFUSE, &vec![0; len as usize]),
            Err(DecodeError::LengthMismatch {
                what: "Refuse message",
                declared: 2,
                actual: len - 2,
            })
        );
    }
}

#[test]
fn refuse_with_a_message_of_1025_bytes_is_rejected() {
    let body = refuse_body(6, &[b'm'; MAX_MESSAGE + 1]);
    assert_eq!(
        decode_raw(kind::REFUSE, &body),
        Err(DecodeError::TooLong {
            what: "Refuse message",
            len: MAX_MESSAGE as u64 + 1,
            max: MAX_MESSAGE as u64,
        })
    );
}

#[test]
fn refuse_with_a_message_of_exactly_1024_bytes_is_accepted() {
    let message = "m".repeat(MAX_MESSAGE);
    assert_eq!(
        decode_raw(kind::REFUSE, &refuse_body(4, message.as_bytes())),
        Ok(Frame::Refuse {
            code: RefuseCode::SizeMismatch,
            message,
        })
    );
}

#[test]
fn refuse_with_a_message_that_is_not_utf8_is_rejected() {
    assert_eq!(
        decode_raw(kind::REFUSE, &refuse_body(1, &bad_utf8())),
        Err(DecodeError::NotUtf8("Refuse message"))
    );
}

#[test]
fn refuse_with_an_unnamed_code_keeps_the_code() {
    assert_eq!(
        decode_raw(kind::REFUSE, &refuse_body(0xbeef, b"later")),
        Ok(Frame::Refuse {
            code: RefuseCode::Other(0xbeef),
            message: "later".into(),
        })
    );
}

#[test]
fn refuse_message_truncation_never_splits_a_character() {
    // 'x' then two-byte characters: byte 1024 falls inside one of them.
    let message = format!("x{}", "é".repeat(600));
    let frame = Frame::Refuse {
        code: RefuseCode::ProtocolError,
        message,
    };
    match decode_with(Frame::decode, &frame_bytes(&frame)).0 {
        Ok(Some(Frame::Refuse { message, .. })) => {
            assert_eq!(message.len(), 1023);
            assert_eq!(message, format!("x{}", "é".repeat(511)));
        }
        other => panic!("expected a Refuse, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Malformed input: data frames
// ---------------------------------------------------------------------------

fn unknown_flags() -> impl Strategy<Value = u32> {
    any::<u32>().prop_filter("needs an unknown bit", |f| f & !data_flags::KNOWN != 0)
}

proptest! {
    #[test]
    fn write_with_unknown_flag_bits_is_rejected(
        flags in unknown_flags(),
        payload in vec(any::<u8>(), 0..64),
    ) {
        let res = decode_raw(kind::WRITE, &write_body(0, flags, &payload));
        match res {
            Err(DecodeError::Invalid { what: "Write flags", detail }) => {
                let unknown = format!("{:#x}", flags & !data_flags::KNOWN);
                prop_assert!(detail.contains(&unknown), "{}", detail);
            }
            other => prop_assert!(false, "expected a flags error, got {:?}", other),
        }
    }

    #[test]
    fn trim_and_write_zeroes_with_unknown_flag_bits_are_rejected(
        zeroes in any::<bool>(),
        flags in unknown_flags(),
    ) {
        let kind = if zeroes { kind::WRITE_ZEROES } else { kind::TRIM };
        let res = decode_raw(kind, &trim_body(0, 4096, flags));
        prop_assert!(
            matches!(res, Err(DecodeError::Invalid { what: "Trim/WriteZeroes flags", .. })),
            "{:?}",
            res
        );
    }

    #[test]
    fn write_shorter_than_its_fixed_fields_is_rejected(len in 0usize..WriteFrame::FIXED) {
        prop_assert_eq!(
            decode_raw(kind::WRITE, &vec![0; len]),
            Err(DecodeError::LengthMismatch {
                what: "Write",
                declared: WriteFrame::FIXED as u64,
                actual: len as u64,
            })
        );
    }

    #[test]
    fn write_whose_range_overflows_u64_is_rejected(
        payload in vec(any::<u8>(), 1..64),
        over in 0u64..64,
    ) {
        // offset + payload length = u64::MAX + 1 + over.
        let offset = (u64::MAX - payload.len() as u64) + 1 + over.min(payload.len() as u64 - 1);
        let res = decode_raw(kind::WRITE, &write_body(offset, 0, &payload));
        prop_assert!(
            matches!(res, Err(DecodeError::Invalid { what: "Write range", .. })),
            "{:?}",
            res
        );
    }

    #[test]
    fn trim_and_write_zeroes_whose_range_overflows_u64_are_rejected(
        zeroes in any::<bool>(),
        length in 1u64..=u64::MAX,
        over in any::<u64>(),
    ) {
        let kind = if zeroes { kind::WRITE_ZEROES } else { kind::TRIM };
        // Any offset above u64::MAX - length overflows.
        let offset = u64::MAX - length + 1 + over % length;
        let res = decode_raw(kind, &trim_body(offset, length, 0));
        prop_assert!(
            matches!(res, Err(DecodeError::Invalid { what: "Trim/WriteZeroes range", .. })),
            "{:?}",
            res
        );
    }
}

#[test]
fn write_with_no_hole_is_rejected() {
    for flags in [data_flags::NO_HOLE, data_flags::NO_HOLE | data_flags::FUA] {
        match decode_raw(kind::WRITE, &write_body(0, flags, b"data")) {
            Err(DecodeError::Invalid {
                what: "Write flags",
                detail,
            }) => assert!(detail.contains("NO_HOLE"), "{detail}"),
            other => panic!("expected a NO_HOLE error, got {other:?}"),
        }
    }
}

#[test]
fn trim_with_no_hole_is_rejected() {
    for flags in [data_flags::NO_HOLE, data_flags::NO_HOLE | data_flags::FUA] {
        match decode_raw(kind::TRIM, &trim_body(0, 4096, flags)) {
            Err(DecodeError::Invalid {
                what: "Trim/WriteZeroes flags",
                detail,
            }) => assert!(detail.contains("NO_HOLE"), "{detail}"),
            other => panic!("expected a NO_HOLE error, got {other:?}"),
        }
    }
}

#[test]
fn write_zeroes_accepts_every_known_flag_combination() {
    for flags in 0..=data_flags::KNOWN {
        assert_eq!(
            decode_raw(kind::WRITE_ZEROES, &trim_body(512, 4096, flags)),
            Ok(Frame::WriteZeroes {
                seq: 1,
                offset: 512,
                length: 4096,
                flags,
            })
        );
    }
}

#[test]
fn data_frames_ending_exactly_at_u64_max_are_accepted() {
    let res = decode_raw(kind::WRITE, &write_body(u64::MAX - 3, 0, b"abc"));
    assert!(
        matches!(&res, Ok(Frame::Write(w)) if w.offset == u64::MAX - 3),
        "{res:?}"
    );
    for kind in [kind::TRIM, kind::WRITE_ZEROES] {
        let res = decode_raw(kind, &trim_body(u64::MAX - 4096, 4096, 0));
        assert!(res.is_ok(), "kind {kind}: {res:?}");
        let res = decode_raw(kind, &trim_body(u64::MAX, 0, 0));
        assert!(res.is_ok(), "kind {kind}, empty range: {res:?}");
    }
}

#[test]
fn write_with_only_its_fixed_fields_carries_an_empty_payload() {
    match decode_raw(kind::WRITE, &write_body(4096, data_flags::FUA, b"")) {
        Ok(Frame::Write(w)) => {
            assert!(w.payload.is_empty());
            assert_eq!((w.offset, w.flags), (4096, data_flags::FUA));
        }
        other => panic!("expected a Write, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// The Write crc32c
// ---------------------------------------------------------------------------

#[test]
fn write_crc_is_crc32c_castagnoli() {
    // The standard check value of CRC-32C.
    let w = WriteFrame::new(0, 0, 0, Bytes::from_static(b"123456789"));
    assert_eq!(w.crc, 0xe306_9283);
    assert!(w.crc_ok());
    assert_eq!(WriteFrame::new(0, 0, 0, Bytes::new()).crc, 0);
}

proptest! {
    /// The accelerated checksum against an independent implementation, at
    /// every length and alignment around its vector widths.
    #[test]
    fn crc32c_matches_an_independent_implementation(
        data in proptest::collection::vec(any::<u8>(), 0..70_000),
        skip in 0usize..64,
    ) {
        let data = &data[skip.min(data.len())..];
        prop_assert_eq!(replblk_proto::crc32c(data), crc32c::crc32c(data));
    }

    #[test]
    fn write_frame_new_carries_the_crc32c_of_its_payload(
        seq in any::<u64>(),
        offset in any::<u64>(),
        flags in write_flags(),
        payload in payload(),
    ) {
        let w = WriteFrame::new(seq, offset, flags, payload.clone());
        prop_assert_eq!(w.crc, crc32c::crc32c(&payload));
        prop_assert!(w.crc_ok());
        prop_assert_eq!((w.seq, w.offset, w.flags, w.payload), (seq, offset, flags, payload));
    }

    #[test]
    fn flipping_any_payload_bit_fails_the_crc_check(
        payload in vec(any::<u8>(), 1..1024),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let w = WriteFrame::new(1, 0, 0, Bytes::from(payload.clone()));
        let mut corrupt = payload;
        let at = at.index(corrupt.len());
        corrupt[at] ^= 1 << bit;
        let w = WriteFrame { payload: Bytes::from(corrupt), ..w };
        prop_assert!(!w.crc_ok());
    }

    #[test]
    fn flipping_any_crc_bit_fails_the_crc_check(payload in payload(), bit in 0u32..32) {
        let mut w = WriteFrame::new(1, 0, 0, payload);
        w.crc ^= 1 << bit;
        prop_assert!(!w.crc_ok());
    }

    #[test]
    fn write_with_a_wrong_crc_still_decodes_and_crc_ok_reports_it(
        payload in vec(any::<u8>(), 1..256),
        at in any::<prop::sample::Index>(),
    ) {
        // Checking the crc is the receiver's job, not the codec's: the frame
        // decodes and the receiver learns from `crc_ok`.
        let mut bytes = frame_bytes(&Frame::Write(WriteFrame::new(
            3,
            0,
            0,
            Bytes::from(payload.clone()),
        )));
        let at = FrameHeader::LEN + WriteFrame::FIXED + at.index(payload.len());
        bytes[at] ^= 0x01;
        match decode_with(Frame::decode, &bytes).0 {
            Ok(Some(Frame::Write(w))) => prop_assert!(!w.crc_ok()),
            other => prop_assert!(false, "expected a Write, got {:?}", other),
        }
    }
}

// ---------------------------------------------------------------------------
// Zero-copy Write: WriteRef and encode_head
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn write_ref_decodes_every_write_body_like_frame_decode_body(
        body in prop_oneof![
            write_frame().prop_map(|w| frame_bytes(&Frame::Write(w))[FrameHeader::LEN..].to_vec()),
            vec(any::<u8>(), 0..64),
        ],
    ) {
        let by_ref = WriteRef::decode_body(&body);
        let owned = Frame::decode_body(kind::WRITE, &body);
        match (by_ref, owned) {
            (Ok(r), Ok(Frame::Write(w))) => {
                prop_assert_eq!(
                    (r.seq, r.offset, r.flags, r.crc, r.payload),
                    (w.seq, w.offset, w.flags, w.crc, &w.payload[..])
                );
                prop_assert_eq!(r.crc_ok(), w.crc_ok());
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "WriteRef gave {:?}, Frame gave {:?}", a, b),
        }
    }

    #[test]
    fn encode_head_followed_by_the_payload_is_the_encoded_write(w in write_frame()) {
        let mut bytes = encoded(|b| {
            WriteRef::encode_head(b, w.seq, w.offset, w.flags, w.crc, w.payload.len())
        });
        prop_assert_eq!(bytes.len(), FrameHeader::LEN + WriteFrame::FIXED);
        bytes.extend_from_slice(&w.payload);
        prop_assert_eq!(bytes, frame_bytes(&Frame::Write(w)));
    }
}

// ---------------------------------------------------------------------------
// Peer authentication
// ---------------------------------------------------------------------------

fn secret() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![vec(any::<u8>(), 1..80), vec(any::<u8>(), 100..200)]
}

#[test]
fn auth_mac_is_hmac_sha256_over_the_documented_message() {
    // Computed independently (Python `hmac`) from the construction in
    // PROTOCOL.md: "replblk-peer-auth-v1" || u32 len(resource) || resource
    // || u32 len(responder) || responder || challenge.
    let challenge: [u8; CHALLENGE_LEN] = std::array::from_fn(|i| i as u8);
    let mac = auth_mac(b"correct horse battery staple", &challenge, "alpha", "r0")
        .expect("HMAC takes any key");
    let expected = "626efe37290b1581702c45268d6b00a868da0d9c2289dd9e61463230e2e53c95";
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, expected);
}

#[test]
fn a_mac_computed_by_one_node_does_not_verify_as_the_other_nodes_answer() {
    // Reflection: alpha answers a challenge; an attacker who sends that
    // answer back to alpha as "beta's" answer to the same challenge fails.
    let secret = b"s3cret";
    let challenge = [0x42; CHALLENGE_LEN];
    let alphas = auth_mac(secret, &challenge, "alpha", "r0").expect("HMAC takes any key");
    assert!(auth_verify(secret, &challenge, "alpha", "r0", &alphas));
    assert!(!auth_verify(secret, &challenge, "beta", "r0", &alphas));
}

#[test]
fn moving_bytes_between_resource_and_responder_name_changes_the_mac() {
    // The length prefixes keep ("ab", "c") and ("a", "bc") apart.
    let c = [9; CHALLENGE_LEN];
    let one = auth_mac(b"k", &c, "c", "ab").expect("HMAC takes any key");
    assert!(!auth_verify(b"k", &c, "bc", "a", &one));
    assert!(!auth_verify(b"k", &c, "ab", "c", &one));
}

#[test]
fn auth_mac_accepts_secrets_of_any_length() {
    let c = [1; CHALLENGE_LEN];
    for len in [0usize, 1, 32, 64, 65, 1000] {
        let secret = vec![0x33; len];
        let mac = auth_mac(&secret, &c, "alpha", "r0");
        assert!(mac.is_some(), "secret of {len} bytes");
        assert!(auth_verify(&secret, &c, "alpha", "r0", &mac.expect("some")));
    }
}

proptest! {
    #[test]
    fn auth_mac_verifies_with_auth_verify_for_the_same_inputs(
        secret in secret(),
        challenge in any::<[u8; CHALLENGE_LEN]>(),
        responder in name(),
        resource in name(),
    ) {
        let mac = auth_mac(&secret, &challenge, &responder, &resource).expect("HMAC takes any key");
        prop_assert!(auth_verify(&secret, &challenge, &responder, &resource, &mac));
        // Deterministic: the same inputs give the same MAC.
        prop_assert_eq!(auth_mac(&secret, &challenge, &responder, &resource), Some(mac));
    }

    #[test]
    fn auth_fails_for_a_different_secret(
        secret in secret(),
        other in secret(),
        challenge in any::<[u8; CHALLENGE_LEN]>(),
    ) {
        prop_assume!(secret != other);
        let mac = auth_mac(&secret, &challenge, "alpha", "r0").expect("HMAC takes any key");
        prop_assert!(!auth_verify(&other, &challenge, "alpha", "r0", &mac));
    }

    #[test]
    fn auth_fails_for_a_different_challenge(
        secret in secret(),
        challenge in any::<[u8; CHALLENGE_LEN]>(),
        at in 0..CHALLENGE_LEN,
        bit in 0u8..8,
    ) {
        let mac = auth_mac(&secret, &challenge, "alpha", "r0").expect("HMAC takes any key");
        let mut other = challenge;
        other[at] ^= 1 << bit;
        prop_assert!(!auth_verify(&secret, &other, "alpha", "r0", &mac));
    }

    #[test]
    fn auth_fails_for_a_different_responder_name(
        secret in secret(),
        challenge in any::<[u8; CHALLENGE_LEN]>(),
        a in name(),
        b in name(),
    ) {
        prop_assume!(a != b);
        let mac = auth_mac(&secret, &challenge, &a, "r0").expect("HMAC takes any key");
        prop_assert!(!auth_verify(&secret, &challenge, &b, "r0", &mac));
    }

    #[test]
    fn auth_fails_for_a_different_resource(
        secret in secret(),
        challenge in any::<[u8; CHALLENGE_LEN]>(),
        r in name(),
        s in name(),
    ) {
        prop_assume!(r != s);
        let mac = auth_mac(&secret, &challenge, "alpha", &r).expect("HMAC takes any key");
        prop_assert!(!auth_verify(&secret, &challenge, "alpha", &s, &mac));
    }

    #[test]
    fn auth_fails_for_a_mac_with_any_bit_flipped(
        secret in secret(),
        challenge in any::<[u8; CHALLENGE_LEN]>(),
        at in 0..MAC_LEN,
        bit in 0u8..8,
    ) {
        let mut mac = auth_mac(&secret, &challenge, "alpha", "r0").expect("HMAC takes any key");
        mac[at] ^= 1 << bit;
        prop_assert!(!auth_verify(&secret, &challenge, "alpha", "r0", &mac));
    }
}

// ---------------------------------------------------------------------------
// Version negotiation
// ---------------------------------------------------------------------------

#[test]
fn overlapping_version_ranges_agree_on_the_highest_common_version() {
    assert_eq!(negotiate_version((1, 3), (2, 5)), Some(3));
    assert_eq!(negotiate_version((2, 5), (1, 3)), Some(3));
    assert_eq!(negotiate_version((1, 10), (4, 6)), Some(6));
}

#[test]
fn disjoint_version_ranges_have_no_common_version() {
    assert_eq!(negotiate_version((1, 2), (3, 4)), None);
    assert_eq!(negotiate_version((3, 4), (1, 2)), None);
    assert_eq!(negotiate_version((0, 0), (u16::MAX, u16::MAX)), None);
}

#[test]
fn single_point_version_ranges_negotiate_that_version_or_nothing() {
    assert_eq!(negotiate_version((2, 2), (2, 2)), Some(2));
    assert_eq!(negotiate_version((2, 2), (1, 5)), Some(2));
    assert_eq!(negotiate_version((1, 5), (5, 5)), Some(5));
    assert_eq!(negotiate_version((6, 6), (1, 5)), None);
    // Ranges that only touch share their end point.
    assert_eq!(negotiate_version((1, 2), (2, 3)), Some(2));
}

#[test]
fn this_implementation_negotiates_its_highest_version_with_itself() {
    let ours = (PROTOCOL_MIN, PROTOCOL_MAX);
    assert_eq!(negotiate_version(ours, ours), Some(PROTOCOL_MAX));
}

proptest! {
    #[test]
    fn negotiation_picks_the_highest_version_in_both_ranges(
        a in version_range(),
        b in version_range(),
    ) {
        let got = negotiate_version(a, b);
        prop_assert_eq!(got, negotiate_version(b, a), "both sides must agree");
        let in_both = |v: u16| a.0 <= v && v <= a.1 && b.0 <= v && v <= b.1;
        let overlap = a.0.max(b.0) <= a.1.min(b.1);
        match got {
            Some(v) => {
                prop_assert!(in_both(v));
                prop_assert!(v == u16::MAX || !in_both(v + 1));
            }
            None => prop_assert!(!overlap),
        }
    }
}

// ---------------------------------------------------------------------------
// Arbitrary bytes never panic
// ---------------------------------------------------------------------------

/// Arbitrary bytes; a valid header of a known kind with a short random
/// body; or a valid frame with one byte changed, cut short or extended.
fn arbitrary_input() -> impl Strategy<Value = Vec<u8>> {
    let header_then_junk = (
        prop::sample::select(KNOWN_KINDS.to_vec()),
        0u32..80,
        vec(any::<u8>(), 0..100),
    )
        .prop_map(|(kind, length, tail)| {
            let mut v = encoded(|b| FrameHeader { kind, length }.encode(b));
            v.extend(tail);
            v
        });
    let mutated = (
        frame(),
        any::<prop::sample::Index>(),
        1u8..=255,
        vec(any::<u8>(), 0..8),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(frame, at, mask, extra, cut)| {
            let mut v = frame_bytes(&frame);
            let i = at.index(v.len());
            v[i] ^= mask;
            let keep = cut.index(v.len() + 1);
            v.truncate(keep.max(FrameHeader::LEN));
            v.extend(extra);
            v
        });
    prop_oneof![
        3 => vec(any::<u8>(), 0..256),
        3 => header_then_junk,
        4 => mutated,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_the_frame_decoder(
        bytes in arbitrary_input(),
        start in 0usize..4,
    ) {
        check_arbitrary_frame(&bytes, start)?;
        // The header decoder on its own follows the same rules.
        let mut cur = Cursor::new(bytes.as_slice());
        match FrameHeader::decode(&mut cur) {
            Ok(None) => prop_assert!(bytes.len() < FrameHeader::LEN && cur.position() == 0),
            Ok(Some(h)) => {
                prop_assert_eq!(cur.position(), FrameHeader::LEN as u64);
                let again = encoded(|b| h.encode(b));
                prop_assert_eq!(again.as_slice(), &bytes[..FrameHeader::LEN]);
            }
            Err(_) => prop_assert!(bytes.len() >= FrameHeader::LEN),
        }
    }

    #[test]
    fn arbitrary_bodies_of_every_kind_never_panic_and_re_encode_exactly(
        kind in prop_oneof![prop::sample::select(KNOWN_KINDS.to_vec()), any::<u16>()],
        body in prop_oneof![vec(any::<u8>(), 0..128), vec(any::<u8>(), 28..=28)],
    ) {
        if let Ok(frame) = Frame::decode_body(kind, &body) {
            prop_assert_eq!(frame.kind(), kind);
            prop_assert_eq!(&frame_bytes(&frame)[FrameHeader::LEN..], body.as_slice());
        }
    }

    #[test]
    fn decoders_never_panic_when_the_cursor_is_past_the_end(
        bytes in vec(any::<u8>(), 0..32),
        past in 0u64..64,
    ) {
        let pos = bytes.len() as u64 + past;
        let mut cur = Cursor::new(bytes.as_slice());
        cur.set_position(pos);
        prop_assert_eq!(Frame::decode(&mut cur), Ok(None));
        prop_assert_eq!(cur.position(), pos);
        prop_assert_eq!(FrameHeader::decode(&mut cur), Ok(None));
        prop_assert_eq!(cur.position(), pos);
    }
}

#[test]
fn sample_hello_round_trips_through_a_byte_at_a_time_reader() {
    // A reader that appends one byte at a time and retries sees Ok(None)
    // until the last byte, then the frame.
    let frame = Frame::Hello(sample_hello());
    let bytes = frame_bytes(&frame);
    let mut got = None;
    for end in 1..=bytes.len() {
        let mut cur = Cursor::new(&bytes[..end]);
        match Frame::decode(&mut cur) {
            Ok(None) => assert_eq!(cur.position(), 0),
            Ok(Some(f)) => {
                assert_eq!(end, bytes.len(), "decoded before the last byte");
                got = Some(f);
            }
            Err(e) => panic!("error after {end} bytes: {e}"),
        }
    }
    assert_eq!(got, Some(frame));
}

// ---------------------------------------------------------------------------
// Bitmap chunks, verify and invalidate frames
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn a_bitmap_split_into_chunks_and_merged_back_is_the_same_bitmap(
        (bytes, bits) in bitmap_bytes(),
        chunk in 1u64..3000,
    ) {
        let chunks = BitmapChunk::split(&bytes, bits, chunk);
        let mut out = vec![0u8; bits.div_ceil(8) as usize];
        let mut next = 0;
        for c in &chunks {
            prop_assert_eq!(c.start_bit, next);
            next += c.bits;
            // Every chunk survives the wire.
            let wire = frame_bytes(&Frame::Bitmap(c.clone()));
            let back = decode_raw(kind::BITMAP, &wire[FrameHeader::LEN..]);
            prop_assert_eq!(back, Ok(Frame::Bitmap(c.clone())));
            c.merge_into(&mut out).expect("same size");
        }
        prop_assert_eq!(next, bits);
        prop_assert_eq!(out, bytes);
    }
}

#[test]
fn a_sparse_bitmap_is_sent_as_runs_and_a_dense_random_one_raw() {
    let bits = 1u64 << 20;
    let mut bytes = vec![0u8; (bits / 8) as usize];
    bytes[1000] = 0x10;
    bytes[50_000..50_100].fill(0xff);
    let chunks = BitmapChunk::split(&bytes, bits, MAX_BITMAP_CHUNK_BITS);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].encoding, BitmapEncoding::Runs);
    assert!(chunks[0].data.len() < 16, "{} bytes", chunks[0].data.len());
    let alternating = vec![0x55u8; 4096];
    let chunks = BitmapChunk::split(&alternating, 4096 * 8, MAX_BITMAP_CHUNK_BITS);
    assert_eq!(chunks[0].encoding, BitmapEncoding::Raw);
    assert_eq!(chunks[0].data.len(), 4096);
}

fn bitmap_body(total: u64, start: u64, bits: u64, encoding: u8, data: &[u8]) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u64(total);
    b.put_u64(start);
    b.put_u64(bits);
    b.put_u8(encoding);
    b.put_slice(data);
    b.to_vec()
}

#[test]
fn hostile_bitmap_chunks_are_rejected_with_a_reason() {
    let invalid = |body: Vec<u8>| match decode_raw(kind::BITMAP, &body) {
        Err(DecodeError::Invalid { detail, .. }) => detail,
        Err(DecodeError::LengthMismatch { what, .. }) => what.to_string(),
        other => panic!("accepted: {other:?}"),
    };
    // Past the end, overflowing, empty, too large.
    assert!(invalid(bitmap_body(10, 8, 4, 0, &[0])).contains("past the end"));
    assert!(invalid(bitmap_body(u64::MAX, u64::MAX, 2, 0, &[0])).contains("past the end"));
    assert!(invalid(bitmap_body(10, 0, 0, 0, &[])).contains("0 bits"));
    let huge = MAX_BITMAP_CHUNK_BITS + 1;
    assert!(invalid(bitmap_body(u64::MAX, 0, huge, 1, &[1, 1])).contains("bits in one chunk"));
    // Unknown encoding; raw of the wrong length or with stray bits.
    assert!(invalid(bitmap_body(16, 0, 16, 7, &[0, 0])).contains("unknown encoding"));
    assert_eq!(invalid(bitmap_body(16, 0, 16, 0, &[0])), "Bitmap raw bits");
    assert!(invalid(bitmap_body(16, 0, 4, 0, &[0xf0])).contains("past the end of the chunk"));
    // Runs that do not add up, a zero run, a bad first value, a varint
    // that never ends or overflows.
    assert!(invalid(bitmap_body(100, 0, 100, 1, &[0, 50])).contains("cover 50 bits"));
    assert!(invalid(bitmap_body(100, 0, 100, 1, &[0, 100, 0])).contains("length 0"));
    assert!(invalid(bitmap_body(100, 0, 100, 1, &[2, 100])).contains("first value"));
    assert!(invalid(bitmap_body(100, 0, 100, 1, &[0, 0x80, 0x80])).contains("truncated"));
    let mut long = vec![0u8];
    long.extend_from_slice(&[0xff; 10]);
    long.push(1);
    assert!(invalid(bitmap_body(100, 0, 100, 1, &long)).contains("64 bits"));
    // Runs adding up past u64 never wrap around to the right count.
    let mut wrap = vec![1u8];
    for _ in 0..2 {
        wrap.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    }
    wrap.push(2);
    assert!(invalid(bitmap_body(u64::MAX, 0, 1, 1, &wrap)).contains("cover"));
}

#[test]
fn a_bitmap_chunk_for_another_size_is_refused_when_merged() {
    let chunk = BitmapChunk::split(&[0xff; 4], 32, 64).remove(0);
    let mut ours = vec![0u8; 8];
    assert!(chunk.merge_into(&mut ours).is_err());
    assert_eq!(ours, [0; 8]);
}

#[test]
fn verify_and_out_of_sync_frames_have_the_documented_layout() {
    check_layout(
        &Frame::VerifyRequest {
            id: 1,
            offset: 0x2000,
            length: 0x4_0000,
            block: 4096,
        },
        49,
        &concat(&[
            &[0, 0, 0, 0, 0, 0, 0, 1],
            &[0, 0, 0, 0, 0, 0, 0x20, 0],
            &[0, 4, 0, 0],
            &[0, 0, 0x10, 0],
        ]),
    );
    check_layout(
        &Frame::VerifyReply {
            id: 2,
            status: 0,
            digests: vec![[0xab; DIGEST_LEN]],
        },
        50,
        &concat(&[
            &[0, 0, 0, 0, 0, 0, 0, 2],
            &[0; 4],
            &[0, 0, 0, 1],
            &[0xab; 16],
        ]),
    );
    check_layout(
        &Frame::OutOfSync {
            offset: 4096,
            length: 8192,
        },
        51,
        &concat(&[&[0, 0, 0, 0, 0, 0, 0x10, 0], &[0, 0, 0, 0, 0, 0, 0x20, 0]]),
    );
    check_layout(&Frame::Invalidate, 52, &[]);
}

#[test]
fn malformed_verify_frames_are_rejected() {
    let req = |length: u32, block: u32, offset: u64| {
        let mut b = BytesMut::new();
        b.put_u64(1);
        b.put_u64(offset);
        b.put_u32(length);
        b.put_u32(block);
        decode_raw(kind::VERIFY_REQUEST, &b)
    };
    assert!(req(0, 4096, 0).is_err());
    assert!(req(MAX_VERIFY_LEN + 1, 4096, 0).is_err());
    assert!(req(4096, 4095, 0).is_err());
    assert!(req(4096, 256, 0).is_err());
    assert!(req(4096, 4096, u64::MAX - 10).is_err());
    assert!(req(4096, 4096, 0).is_ok());
    let reply = |status: u32, count: u32, digests: usize| {
        let mut b = BytesMut::new();
        b.put_u64(1);
        b.put_u32(status);
        b.put_u32(count);
        b.put_slice(&vec![0u8; digests * DIGEST_LEN]);
        decode_raw(kind::VERIFY_REPLY, &b)
    };
    assert!(reply(0, 2, 2).is_ok());
    assert!(reply(0, 3, 2).is_err(), "fewer digests than declared");
    assert!(reply(0, 1, 2).is_err(), "trailing bytes");
    assert!(reply(5, 1, 1).is_err(), "digests with a failure status");
    assert!(reply(0, u32::MAX, 0).is_err(), "a count past the limit");
    let mut b = BytesMut::new();
    b.put_u64(u64::MAX);
    b.put_u64(2);
    assert!(decode_raw(kind::OUT_OF_SYNC, &b).is_err());
    assert!(decode_raw(kind::INVALIDATE, &[0]).is_err());
}

#[test]
fn csum_frames_have_the_documented_layout_and_bad_ones_are_refused() {
    let q = Frame::CsumQuery {
        id: 7,
        offset: 1 << 20,
        length: 1 << 16,
        block: 4096,
        alg: csum_alg::XXH3_128,
    };
    let bytes = frame_bytes(&q);
    assert_eq!(bytes.len(), FrameHeader::LEN + 26);
    assert_eq!(&bytes[6..8], &kind::CSUM_QUERY.to_be_bytes());
    let body = &bytes[FrameHeader::LEN..];
    assert_eq!(&body[..8], &7u64.to_be_bytes());
    assert_eq!(&body[16..20], &(1u32 << 16).to_be_bytes());
    assert_eq!(&body[24..26], &1u16.to_be_bytes());
    assert_eq!(decode_raw(kind::CSUM_QUERY, body), Ok(q));
    let mut bad = body.to_vec();
    bad[24..26].copy_from_slice(&9u16.to_be_bytes());
    assert!(
        decode_raw(kind::CSUM_QUERY, &bad).is_err(),
        "unknown algorithm"
    );
    let mut bad = body.to_vec();
    bad[20..24].copy_from_slice(&4095u32.to_be_bytes());
    assert!(
        decode_raw(kind::CSUM_QUERY, &bad).is_err(),
        "odd block size"
    );
    let mut bad = body.to_vec();
    bad[16..20].copy_from_slice(&0u32.to_be_bytes());
    assert!(decode_raw(kind::CSUM_QUERY, &bad).is_err(), "empty range");
    let mut bad = body.to_vec();
    bad[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    assert!(
        decode_raw(kind::CSUM_QUERY, &bad).is_err(),
        "overflowing range"
    );

    let r = Frame::CsumReply {
        id: 7,
        alg: csum_alg::XXH3_128,
        digests: vec![1, u128::MAX],
    };
    let bytes = frame_bytes(&r);
    let body = &bytes[FrameHeader::LEN..];
    assert_eq!(body.len(), 14 + 32);
    assert_eq!(&body[10..14], &2u32.to_be_bytes());
    assert_eq!(decode_raw(kind::CSUM_REPLY, body), Ok(r));
    // A count that does not match the digests that follow.
    let mut bad = body.to_vec();
    bad[10..14].copy_from_slice(&3u32.to_be_bytes());
    assert!(decode_raw(kind::CSUM_REPLY, &bad).is_err());
    let mut bad = body[..14].to_vec();
    bad[10..14].copy_from_slice(&(MAX_CSUMS + 1).to_be_bytes());
    assert!(decode_raw(kind::CSUM_REPLY, &bad).is_err());
}

#[test]
fn read_frames_reject_bad_lengths_and_data_with_an_error() {
    let mut body = Vec::new();
    body.extend_from_slice(&7u64.to_be_bytes());
    body.extend_from_slice(&0u64.to_be_bytes());
    body.extend_from_slice(&0u32.to_be_bytes());
    assert!(
        decode_raw(kind::READ_REQUEST, &body).is_err(),
        "zero length"
    );
    body.truncate(16);
    body.extend_from_slice(&(MAX_READ_LEN + 1).to_be_bytes());
    assert!(decode_raw(kind::READ_REQUEST, &body).is_err(), "too long");
    body.truncate(16);
    body.extend_from_slice(&4096u32.to_be_bytes());
    assert!(decode_raw(kind::READ_REQUEST, &body).is_ok());
    body.push(0);
    assert!(
        decode_raw(kind::READ_REQUEST, &body).is_err(),
        "trailing byte"
    );
    let mut reply = Vec::new();
    reply.extend_from_slice(&7u64.to_be_bytes());
    reply.extend_from_slice(&5u32.to_be_bytes());
    assert!(
        decode_raw(kind::READ_REPLY, &reply).is_ok(),
        "an error, no data"
    );
    reply.push(1);
    assert!(
        decode_raw(kind::READ_REPLY, &reply).is_err(),
        "an error with data"
    );
    assert!(decode_raw(kind::READ_REPLY, &reply[..11]).is_err(), "short");
}
