#![no_main]

//! The fixed-size handshake and reply headers: server greeting, client
//! flags, option reply header, export-name reply (with and without the 124
//! zero bytes) and the simple reply. Every decoder sees the same input.

use libfuzzer_sys::fuzz_target;
use replblk_fuzz::check_cursor;
use replblk_proto::nbd::{
    ClientFlags, ExportNameReply, OptionReplyHeader, ServerGreeting, SimpleReply,
};

fuzz_target!(|data: &[u8]| {
    check_cursor(
        data,
        ServerGreeting::LEN,
        ServerGreeting::LEN,
        ServerGreeting::decode,
        |v, b| v.encode(b),
    );
    check_cursor(
        data,
        ClientFlags::LEN,
        ClientFlags::LEN,
        ClientFlags::decode,
        |v, b| v.encode(b),
    );
    check_cursor(
        data,
        OptionReplyHeader::LEN,
        OptionReplyHeader::LEN,
        OptionReplyHeader::decode,
        |v, b| v.encode(b),
    );
    check_cursor(
        data,
        ExportNameReply::LEN,
        ExportNameReply::LEN,
        |c| ExportNameReply::decode(c, true),
        |v, b| v.encode(b, true),
    );
    // The decoder skips the padding without looking at it, so only the
    // size and flags are compared.
    check_cursor(
        data,
        ExportNameReply::LEN + ExportNameReply::ZEROES,
        ExportNameReply::LEN,
        |c| ExportNameReply::decode(c, false),
        |v, b| v.encode(b, false),
    );
    check_cursor(
        data,
        SimpleReply::LEN,
        SimpleReply::LEN,
        SimpleReply::decode,
        |v, b| v.encode(b),
    );
    if let Ok(Some(reply)) = SimpleReply::decode(&mut std::io::Cursor::new(data)) {
        assert_eq!(&reply.to_bytes()[..], &data[..SimpleReply::LEN]);
    }
});
