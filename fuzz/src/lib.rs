//! Checks shared by the fuzz targets in `fuzz_targets/`.

use std::fmt::Debug;
use std::io::Cursor;

use bytes::BytesMut;
use replblk_proto::DecodeError;

/// Runs `encode` against a fresh buffer and returns the bytes it appended.
pub fn encoded(encode: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(&mut buf);
    buf.to_vec()
}

/// Feeds `data` to a cursor-based decoder of a fixed-size value of `len`
/// bytes and checks the crate's conventions:
/// - `Ok(None)` only when fewer than `len` bytes are there, and the cursor
///   has not moved;
/// - `Ok(Some(v))` consumed exactly `len` bytes, and the first
///   `compare_len` of them are what `encode(v)` produces;
/// - `Err` only once `len` bytes are there.
pub fn check_cursor<T: Debug>(
    data: &[u8],
    len: usize,
    compare_len: usize,
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    encode: impl Fn(&T, &mut BytesMut),
) {
    let mut cur = Cursor::new(data);
    match decode(&mut cur) {
        Ok(None) => {
            assert!(data.len() < len, "incomplete with {} bytes", data.len());
            assert_eq!(cur.position(), 0, "incomplete input moved the cursor");
        }
        Ok(Some(value)) => {
            assert_eq!(
                cur.position(),
                len as u64,
                "{value:?} consumed the wrong length"
            );
            let again = encoded(|b| encode(&value, b));
            assert_eq!(&again[..compare_len], &data[..compare_len], "{value:?}");
        }
        Err(_) => assert!(data.len() >= len, "error before {len} bytes were there"),
    }
}

/// For whole-buffer decoders: whatever decodes must re-encode to exactly
/// the input.
pub fn check_whole<T: Debug>(
    data: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
    encode: impl Fn(&T, &mut BytesMut),
) {
    if let Ok(value) = decode(data) {
        let again = encoded(|b| encode(&value, b));
        assert_eq!(again.as_slice(), data, "{value:?}");
    }
}

/// `repl::Frame::decode` on arbitrary bytes:
/// - `Ok(None)` only while fewer than 12 bytes, or fewer than the header's
///   12 + `length`, are there, and the cursor has not moved;
/// - `Ok(Some(frame))` consumed exactly 12 + `length` bytes, which are
///   what `frame.encode` produces, and `decode_body` agrees;
/// - `Err` only once a whole header is there.
pub fn check_repl_frame(data: &[u8]) {
    use replblk_proto::repl::{Frame, FrameHeader};

    let header = FrameHeader::decode(&mut Cursor::new(data));
    let mut cur = Cursor::new(data);
    match Frame::decode(&mut cur) {
        Ok(None) => {
            assert_eq!(cur.position(), 0, "incomplete input moved the cursor");
            match header {
                Ok(None) => assert!(data.len() < FrameHeader::LEN),
                Ok(Some(h)) => assert!(
                    data.len() < FrameHeader::LEN + h.length as usize,
                    "incomplete with the whole body of {h:?} there"
                ),
                Err(e) => panic!("header error {e:?} but the frame is incomplete"),
            }
        }
        Ok(Some(frame)) => {
            let h = header
                .expect("a decoded frame has a valid header")
                .expect("a decoded frame has a whole header");
            let len = FrameHeader::LEN + h.length as usize;
            assert_eq!(
                cur.position(),
                len as u64,
                "{frame:?} consumed the wrong length"
            );
            assert_eq!(frame.kind(), h.kind, "{frame:?}");
            let again = encoded(|b| frame.encode(b));
            assert_eq!(again.as_slice(), &data[..len], "{frame:?}");
            assert_eq!(
                Frame::decode_body(h.kind, &data[FrameHeader::LEN..len]),
                Ok(frame)
            );
        }
        Err(_) => assert!(
            data.len() >= FrameHeader::LEN,
            "error before a whole header was there"
        ),
    }
}

/// `repl::Frame::decode_body` on an arbitrary body: whatever decodes has
/// that kind and re-encodes to the header plus exactly that body; for
/// `Write` bodies, the zero-copy `WriteRef::decode_body` gives the same
/// fields or the same error.
pub fn check_repl_body(kind: u16, body: &[u8]) {
    use replblk_proto::repl::{kind as kinds, Frame, FrameHeader, WriteRef};

    if kind == kinds::WRITE {
        // The zero-copy decoder must agree with the owning one.
        match (WriteRef::decode_body(body), Frame::decode_body(kind, body)) {
            (Ok(r), Ok(Frame::Write(w))) => {
                assert_eq!(
                    (r.seq, r.offset, r.flags, r.crc, r.payload),
                    (w.seq, w.offset, w.flags, w.crc, &w.payload[..])
                );
            }
            (Err(a), Err(b)) => assert_eq!(a, b),
            (a, b) => panic!("WriteRef gave {a:?}, Frame gave {b:?}"),
        }
    }
    if let Ok(frame) = Frame::decode_body(kind, body) {
        assert_eq!(frame.kind(), kind, "{frame:?}");
        let again = encoded(|b| frame.encode(b));
        let header = encoded(|b| {
            FrameHeader {
                kind,
                length: body.len() as u32,
            }
            .encode(b)
        });
        assert_eq!(&again[..FrameHeader::LEN], header.as_slice(), "{frame:?}");
        assert_eq!(&again[FrameHeader::LEN..], body, "{frame:?}");
    }
}
