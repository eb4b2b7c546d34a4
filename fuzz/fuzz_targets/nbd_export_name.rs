#![no_main]

use bytes::BufMut;
use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_whole;
use replblk_proto::nbd::decode_export_name;

fuzz_target!(|data: &[u8]| {
    check_whole(data, decode_export_name, |name, b| {
        b.put_slice(name.as_bytes())
    });
});
