#![no_main]

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_cursor;
use replblk_proto::nbd::OptionHeader;

fuzz_target!(|data: &[u8]| {
    check_cursor(
        data,
        OptionHeader::LEN,
        OptionHeader::LEN,
        OptionHeader::decode,
        |v, b| v.encode(b),
    );
});
