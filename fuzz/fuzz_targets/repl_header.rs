#![no_main]

//! `FrameHeader::decode`: the fixed 12-byte header of every replication
//! frame.

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_cursor;
use replblk_proto::repl::FrameHeader;

fuzz_target!(|data: &[u8]| {
    check_cursor(
        data,
        FrameHeader::LEN,
        FrameHeader::LEN,
        FrameHeader::decode,
        |v, b| v.encode(b),
    );
});
