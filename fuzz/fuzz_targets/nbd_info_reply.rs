#![no_main]

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_whole;
use replblk_proto::nbd::InfoReply;

fuzz_target!(|data: &[u8]| {
    check_whole(data, InfoReply::decode_data, |v, b| v.encode(b));
});
