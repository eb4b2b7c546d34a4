#![no_main]

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_whole;
use replblk_proto::nbd::InfoRequest;

fuzz_target!(|data: &[u8]| {
    check_whole(data, InfoRequest::decode_data, |v, b| v.encode(b));
});
