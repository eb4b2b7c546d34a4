#![no_main]

//! `meta::decode` on arbitrary bytes (a superblock slot read from a disk
//! that may hold anything): it must never panic, and a superblock that
//! decodes must survive `encode` then `decode` unchanged.

use libfuzzer_sys::fuzz_target;
use replblk::meta;

fuzz_target!(|data: &[u8]| {
    if let Ok(sb) = meta::decode(data) {
        let again = meta::decode(&meta::encode(&sb)).expect("a re-encoded superblock decodes");
        assert_eq!(format!("{sb:?}"), format!("{again:?}"));
    }
});
