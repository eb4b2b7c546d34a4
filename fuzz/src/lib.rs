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
