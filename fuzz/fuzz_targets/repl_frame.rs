#![no_main]

//! `Frame::decode` on arbitrary bytes: it must never panic, return
//! `Ok(None)` (cursor unmoved) exactly while the header or the body it
//! announces is incomplete, and whatever decodes must re-encode to exactly
//! the bytes it consumed. The same bytes, read as a 2-byte kind followed
//! by a body, also go through `Frame::decode_body`, so the body decoders
//! are reached without the fuzzer first having to find the magic.

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::{check_repl_body, check_repl_frame};

fuzz_target!(|data: &[u8]| {
    check_repl_frame(data);
    if let [hi, lo, body @ ..] = data {
        check_repl_body(u16::from_be_bytes([*hi, *lo]), body);
    }
});
