#![no_main]

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_cursor;
use replblk_proto::nbd::Request;

fuzz_target!(|data: &[u8]| {
    check_cursor(data, Request::LEN, Request::LEN, Request::decode, |v, b| {
        v.encode(b)
    });
});
