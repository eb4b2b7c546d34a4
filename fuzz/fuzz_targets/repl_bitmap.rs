#![no_main]

//! A peer's bitmap chunk, as the connect-time exchange receives it: the
//! first 2 bytes pick the receiver's bitmap size (in bits, up to 65535),
//! the rest is a `Bitmap` frame body. Decoding must never panic; a chunk
//! that decodes and matches the receiver's size must merge without
//! panicking, set bits only inside its own range, and re-encode to the
//! same body.

use libfuzzer_sys::fuzz_target;
use replblk_proto::repl::{kind, Frame};

fuzz_target!(|data: &[u8]| {
    let [hi, lo, body @ ..] = data else { return };
    let total = u64::from(u16::from_be_bytes([*hi, *lo]));
    let Ok(Frame::Bitmap(chunk)) = Frame::decode_body(kind::BITMAP, body) else {
        return;
    };
    let again = replblk_fuzz::encoded(|b| Frame::Bitmap(chunk.clone()).encode(b));
    assert_eq!(&again[12..], body);
    let mut out = vec![0u8; total.div_ceil(8) as usize];
    if chunk.merge_into(&mut out).is_ok() {
        assert_eq!(chunk.total_bits.div_ceil(8), out.len() as u64);
        for bit in 0..total {
            if out[(bit / 8) as usize] >> (bit % 8) & 1 == 1 {
                assert!(bit >= chunk.start_bit && bit < chunk.start_bit + chunk.bits);
            }
        }
    }
});
