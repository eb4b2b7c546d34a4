//! Codec tests for `replblk_proto::nbd`: round-trips, incomplete input,
//! malformed input and "arbitrary bytes never panic".
//!
//! Cursor-based decoders (`decode(&mut Cursor)`) must return `Ok(None)` and
//! leave the cursor where it was when the input is a strict prefix of a
//! valid encoding. Whole-buffer decoders (`decode_data`, `decode_export_name`)
//! get the complete option data, so short input is an error for them.

use std::fmt::Debug;
use std::io::Cursor;

use bytes::{BufMut, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use replblk_proto::nbd::{
    client_flags, cmd, decode_export_name, encode_option_reply, info, ClientFlags, Command,
    ExportNameReply, InfoReply, InfoRequest, OptionHeader, OptionReplyHeader, Request, ServerEntry,
    ServerGreeting, SimpleReply, IHAVEOPT, MAX_STRING, NBDMAGIC, OPTION_REPLY_MAGIC, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
};
use replblk_proto::DecodeError;

type CursorDecoder<T> = fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Runs `encode` against a fresh buffer and returns the bytes it appended.
fn encoded(encode: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(&mut buf);
    buf.to_vec()
}

/// Decodes `bytes` from position 0 and returns the result with the cursor
/// position afterwards.
fn decode_with<T>(
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    bytes: &[u8],
) -> (Result<Option<T>, DecodeError>, u64) {
    let mut cur = Cursor::new(bytes);
    let res = decode(&mut cur);
    (res, cur.position())
}

/// Asserts that `bytes` decodes to `value` and consumes exactly
/// `bytes.len()` bytes, also when more bytes follow and when the cursor does
/// not start at zero.
fn check_cursor_round_trip<T: PartialEq + Debug>(
    value: &T,
    bytes: &[u8],
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    lead: &[u8],
    trailing: &[u8],
) -> Result<(), TestCaseError> {
    let (res, pos) = decode_with(&decode, bytes);
    prop_assert_eq!(res.as_ref().map(Option::as_ref), Ok(Some(value)));
    prop_assert_eq!(pos, bytes.len() as u64);

    let mut framed = lead.to_vec();
    framed.extend_from_slice(bytes);
    framed.extend_from_slice(trailing);
    let mut cur = Cursor::new(framed.as_slice());
    cur.set_position(lead.len() as u64);
    let res = decode(&mut cur);
    prop_assert_eq!(res.as_ref().map(Option::as_ref), Ok(Some(value)));
    prop_assert_eq!(cur.position(), (lead.len() + bytes.len()) as u64);
    Ok(())
}

/// Asserts that every strict prefix of `bytes` decodes to `Ok(None)` and
/// leaves the cursor where it was (also when it does not start at zero).
fn check_prefixes_incomplete<T: Debug>(
    bytes: &[u8],
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    lead: &[u8],
) -> Result<(), TestCaseError> {
    for cut in 0..bytes.len() {
        let mut framed = lead.to_vec();
        framed.extend_from_slice(&bytes[..cut]);
        let mut cur = Cursor::new(framed.as_slice());
        cur.set_position(lead.len() as u64);
        let res = decode(&mut cur);
        prop_assert!(
            matches!(res, Ok(None)),
            "prefix of {} of {} bytes gave {:?}",
            cut,
            bytes.len(),
            res
        );
        prop_assert_eq!(cur.position(), lead.len() as u64, "prefix of {} bytes", cut);
    }
    Ok(())
}

/// Checks what a cursor decoder did with arbitrary input: `Ok(None)` leaves
/// the cursor untouched and only happens when fewer than `len` bytes are
/// there, `Ok(Some)` consumes exactly `len` bytes and re-encodes to them.
fn check_arbitrary_cursor<T: Debug + PartialEq>(
    bytes: &[u8],
    start: usize,
    len: usize,
    decode: impl Fn(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>,
    encode: impl Fn(&T, &mut BytesMut),
) -> Result<(), TestCaseError> {
    let start = start.min(bytes.len());
    let mut cur = Cursor::new(bytes);
    cur.set_position(start as u64);
    match decode(&mut cur) {
        Ok(None) => {
            prop_assert!(bytes.len() - start < len);
            prop_assert_eq!(cur.position(), start as u64);
        }
        Ok(Some(value)) => {
            prop_assert_eq!(cur.position(), (start + len) as u64);
            let again = encoded(|b| encode(&value, b));
            prop_assert_eq!(again.as_slice(), &bytes[start..start + len]);
        }
        Err(_) => prop_assert!(bytes.len() - start >= len),
    }
    Ok(())
}

fn bad_utf8() -> Vec<u8> {
    // A lone continuation byte and an overlong encoding of '/'.
    vec![b'o', b'k', 0x80, 0xc0, 0xaf]
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Valid UTF-8 of at most `MAX_STRING` bytes: arbitrary characters (up to 4
/// bytes each, so 1024 of them stay under the limit) or long ASCII runs that
/// reach the limit exactly.
fn wire_string() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => vec(any::<char>(), 0..=MAX_STRING / 4).prop_map(String::from_iter),
        1 => vec(0x20u8..0x7f, 0..=MAX_STRING)
            .prop_map(|b| String::from_utf8(b).expect("ASCII is UTF-8")),
        1 => Just("x".repeat(MAX_STRING)),
        1 => Just(String::new()),
    ]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        Just(Command::Read),
        Just(Command::Write),
        Just(Command::Disc),
        Just(Command::Flush),
        Just(Command::Trim),
        Just(Command::Cache),
        Just(Command::WriteZeroes),
        // Codes this crate names map to the named variants, so `Other`
        // only round-trips for the rest.
        (cmd::WRITE_ZEROES + 1..=u16::MAX).prop_map(Command::Other),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    (
        any::<u16>(),
        command(),
        any::<u64>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(flags, command, cookie, offset, length)| Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
}

fn simple_reply() -> impl Strategy<Value = SimpleReply> {
    (any::<u32>(), any::<u64>()).prop_map(|(error, cookie)| SimpleReply { error, cookie })
}

fn option_header() -> impl Strategy<Value = OptionHeader> {
    (any::<u32>(), any::<u32>()).prop_map(|(option, length)| OptionHeader { option, length })
}

fn option_reply_header() -> impl Strategy<Value = OptionReplyHeader> {
    (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(option, reply_type, length)| {
        OptionReplyHeader {
            option,
            reply_type,
            length,
        }
    })
}

fn info_request() -> impl Strategy<Value = InfoRequest> {
    (wire_string(), vec(any::<u16>(), 0..64))
        .prop_map(|(name, requests)| InfoRequest { name, requests })
}

fn server_entry() -> impl Strategy<Value = ServerEntry> {
    (wire_string(), wire_string()).prop_map(|(name, description)| ServerEntry { name, description })
}

fn info_reply() -> impl Strategy<Value = InfoReply> {
    prop_oneof![
        (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| InfoReply::Export { size, flags }),
        wire_string().prop_map(InfoReply::Name),
        wire_string().prop_map(InfoReply::Description),
        (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
            InfoReply::BlockSize {
                minimum,
                preferred,
                maximum,
            }
        }),
        // Known kinds decode to their own variants, so `Unknown` only
        // round-trips for the others.
        (info::BLOCK_SIZE + 1..=u16::MAX, vec(any::<u8>(), 0..256))
            .prop_map(|(kind, data)| InfoReply::Unknown { kind, data }),
    ]
}

fn export_name_reply() -> impl Strategy<Value = ExportNameReply> {
    (any::<u64>(), any::<u16>()).prop_map(|(size, flags)| ExportNameReply { size, flags })
}

/// Bytes placed before and after a value, to check decoders neither look
/// behind the cursor nor consume past their own encoding.
fn framing() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    (vec(any::<u8>(), 0..8), vec(any::<u8>(), 0..8))
}

// ---------------------------------------------------------------------------
// Round-trips and incomplete input, cursor-based decoders
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn server_greeting_round_trips(flags in any::<u16>(), (lead, trail) in framing()) {
        let value = ServerGreeting { flags };
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), ServerGreeting::LEN);
        check_cursor_round_trip(&value, &bytes, ServerGreeting::decode, &lead, &trail)?;
    }

    #[test]
    fn every_strict_prefix_of_a_server_greeting_is_incomplete(
        flags in any::<u16>(),
        (lead, _) in framing(),
    ) {
        let bytes = encoded(|b| ServerGreeting { flags }.encode(b));
        check_prefixes_incomplete(&bytes, ServerGreeting::decode, &lead)?;
    }

    #[test]
    fn client_flags_with_known_bits_round_trip(
        flags in 0..=client_flags::KNOWN,
        (lead, trail) in framing(),
    ) {
        let value = ClientFlags(flags);
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), ClientFlags::LEN);
        check_cursor_round_trip(
            &value,
            &bytes,
            ClientFlags::decode,
            &lead,
            &trail,
        )?;
        prop_assert_eq!(value.no_zeroes(), flags & client_flags::NO_ZEROES != 0);
    }

    #[test]
    fn every_strict_prefix_of_client_flags_is_incomplete(
        flags in any::<u32>(),
        (lead, _) in framing(),
    ) {
        // Even flags with unknown bits are only judged once all four bytes
        // are there.
        let bytes = flags.to_be_bytes();
        check_prefixes_incomplete(&bytes, ClientFlags::decode, &lead)?;
    }

    #[test]
    fn option_header_round_trips(value in option_header(), (lead, trail) in framing()) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), OptionHeader::LEN);
        check_cursor_round_trip(&value, &bytes, OptionHeader::decode, &lead, &trail)?;
    }

    #[test]
    fn every_strict_prefix_of_an_option_header_is_incomplete(
        value in option_header(),
        (lead, _) in framing(),
    ) {
        let bytes = encoded(|b| value.encode(b));
        check_prefixes_incomplete(&bytes, OptionHeader::decode, &lead)?;
    }

    #[test]
    fn option_reply_header_round_trips(
        value in option_reply_header(),
        (lead, trail) in framing(),
    ) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), OptionReplyHeader::LEN);
        check_cursor_round_trip(&value, &bytes, OptionReplyHeader::decode, &lead, &trail)?;
        prop_assert_eq!(value.is_error(), value.reply_type & (1 << 31) != 0);
    }

    #[test]
    fn every_strict_prefix_of_an_option_reply_header_is_incomplete(
        value in option_reply_header(),
        (lead, _) in framing(),
    ) {
        let bytes = encoded(|b| value.encode(b));
        check_prefixes_incomplete(&bytes, OptionReplyHeader::decode, &lead)?;
    }

    #[test]
    fn encode_option_reply_writes_a_header_whose_length_matches_the_data(
        option in any::<u32>(),
        reply_type in any::<u32>(),
        data in vec(any::<u8>(), 0..512),
    ) {
        let bytes = encoded(|b| encode_option_reply(b, option, reply_type, &data));
        let mut cur = Cursor::new(bytes.as_slice());
        let header = OptionReplyHeader::decode(&mut cur);
        prop_assert_eq!(
            header,
            Ok(Some(OptionReplyHeader { option, reply_type, length: data.len() as u32 }))
        );
        prop_assert_eq!(&bytes[OptionReplyHeader::LEN..], data.as_slice());
    }

    #[test]
    fn export_name_reply_round_trips_with_and_without_zeroes(
        value in export_name_reply(),
        no_zeroes in any::<bool>(),
        (lead, trail) in framing(),
    ) {
        let bytes = encoded(|b| value.encode(b, no_zeroes));
        let expected_len = if no_zeroes {
            ExportNameReply::LEN
        } else {
            ExportNameReply::LEN + ExportNameReply::ZEROES
        };
        prop_assert_eq!(bytes.len(), expected_len);
        prop_assert!(bytes[ExportNameReply::LEN..].iter().all(|&b| b == 0));
        check_cursor_round_trip(
            &value,
            &bytes,
            |c| ExportNameReply::decode(c, no_zeroes),
            &lead,
            &trail,
        )?;
    }

    #[test]
    fn every_strict_prefix_of_an_export_name_reply_is_incomplete(
        value in export_name_reply(),
        no_zeroes in any::<bool>(),
        (lead, _) in framing(),
    ) {
        let bytes = encoded(|b| value.encode(b, no_zeroes));
        check_prefixes_incomplete(&bytes, |c| ExportNameReply::decode(c, no_zeroes), &lead)?;
    }

    #[test]
    fn request_round_trips_for_every_command(value in request(), (lead, trail) in framing()) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), Request::LEN);
        check_cursor_round_trip(&value, &bytes, Request::decode, &lead, &trail)?;
    }

    #[test]
    fn every_strict_prefix_of_a_request_is_incomplete(value in request(), (lead, _) in framing()) {
        let bytes = encoded(|b| value.encode(b));
        check_prefixes_incomplete(&bytes, Request::decode, &lead)?;
    }

    #[test]
    fn command_codes_survive_from_wire_and_to_wire(code in any::<u16>()) {
        prop_assert_eq!(Command::from_wire(code).to_wire(), code);
    }

    #[test]
    fn simple_reply_round_trips(value in simple_reply(), (lead, trail) in framing()) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), SimpleReply::LEN);
        prop_assert_eq!(bytes.as_slice(), &value.to_bytes()[..]);
        check_cursor_round_trip(&value, &bytes, SimpleReply::decode, &lead, &trail)?;
    }

    #[test]
    fn every_strict_prefix_of_a_simple_reply_is_incomplete(
        value in simple_reply(),
        (lead, _) in framing(),
    ) {
        let bytes = encoded(|b| value.encode(b));
        check_prefixes_incomplete(&bytes, SimpleReply::decode, &lead)?;
    }
}

// ---------------------------------------------------------------------------
// Round-trips, whole-buffer decoders
// ---------------------------------------------------------------------------

proptest! {
    #[test]
    fn info_request_round_trips(value in info_request()) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), 4 + value.name.len() + 2 + 2 * value.requests.len());
        prop_assert_eq!(InfoRequest::decode_data(&bytes), Ok(value));
    }

    #[test]
    fn export_name_round_trips(name in wire_string()) {
        prop_assert_eq!(decode_export_name(name.as_bytes()), Ok(name.clone()));
    }

    #[test]
    fn server_entry_round_trips(value in server_entry()) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(bytes.len(), 4 + value.name.len() + value.description.len());
        prop_assert_eq!(ServerEntry::decode_data(&bytes), Ok(value));
    }

    #[test]
    fn info_reply_round_trips_for_every_variant(value in info_reply()) {
        let bytes = encoded(|b| value.encode(b));
        prop_assert_eq!(InfoReply::decode_data(&bytes), Ok(value));
    }

    #[test]
    fn info_request_with_a_truncated_body_is_rejected(
        value in info_request(),
        cut in any::<prop::sample::Index>(),
    ) {
        // The option data length is known up front, so missing bytes are a
        // length error rather than "incomplete".
        let bytes = encoded(|b| value.encode(b));
        let cut = cut.index(bytes.len());
        let res = InfoRequest::decode_data(&bytes[..cut]);
        prop_assert!(matches!(res, Err(DecodeError::LengthMismatch { .. })), "{:?}", res);
    }

    #[test]
    fn info_request_with_trailing_bytes_is_rejected(
        value in info_request(),
        extra in vec(any::<u8>(), 1..8),
    ) {
        let mut bytes = encoded(|b| value.encode(b));
        bytes.extend_from_slice(&extra);
        let res = InfoRequest::decode_data(&bytes);
        prop_assert!(matches!(res, Err(DecodeError::LengthMismatch { .. })), "{:?}", res);
    }

    #[test]
    fn server_entry_cut_inside_its_name_is_rejected(
        value in server_entry(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = encoded(|b| value.encode(b));
        let cut = cut.index(4 + value.name.len());
        let res = ServerEntry::decode_data(&bytes[..cut]);
        prop_assert!(matches!(res, Err(DecodeError::LengthMismatch { .. })), "{:?}", res);
    }
}

// ---------------------------------------------------------------------------
// Malformed input: bad magic
// ---------------------------------------------------------------------------

fn wrong_u64(magic: u64) -> impl Strategy<Value = u64> {
    any::<u64>().prop_filter("must differ from the magic", move |m| *m != magic)
}

fn wrong_u32(magic: u32) -> impl Strategy<Value = u32> {
    any::<u32>().prop_filter("must differ from the magic", move |m| *m != magic)
}

proptest! {
    #[test]
    fn server_greeting_with_bad_nbdmagic_is_rejected(magic in wrong_u64(NBDMAGIC)) {
        let mut bytes = encoded(|b| ServerGreeting { flags: 3 }.encode(b));
        bytes[..8].copy_from_slice(&magic.to_be_bytes());
        let (res, _) = decode_with(ServerGreeting::decode, &bytes);
        prop_assert_eq!(res, Err(DecodeError::BadMagic { expected: NBDMAGIC, got: magic }));
    }

    #[test]
    fn server_greeting_with_bad_ihaveopt_is_rejected(magic in wrong_u64(IHAVEOPT)) {
        let mut bytes = encoded(|b| ServerGreeting { flags: 3 }.encode(b));
        bytes[8..16].copy_from_slice(&magic.to_be_bytes());
        let (res, _) = decode_with(ServerGreeting::decode, &bytes);
        prop_assert_eq!(res, Err(DecodeError::BadMagic { expected: IHAVEOPT, got: magic }));
    }

    #[test]
    fn option_header_with_bad_magic_is_rejected(magic in wrong_u64(IHAVEOPT)) {
        let mut bytes = encoded(|b| OptionHeader { option: 7, length: 0 }.encode(b));
        bytes[..8].copy_from_slice(&magic.to_be_bytes());
        let (res, _) = decode_with(OptionHeader::decode, &bytes);
        prop_assert_eq!(res, Err(DecodeError::BadMagic { expected: IHAVEOPT, got: magic }));
    }

    #[test]
    fn option_reply_header_with_bad_magic_is_rejected(magic in wrong_u64(OPTION_REPLY_MAGIC)) {
        let header = OptionReplyHeader { option: 7, reply_type: 1, length: 0 };
        let mut bytes = encoded(|b| header.encode(b));
        bytes[..8].copy_from_slice(&magic.to_be_bytes());
        let (res, _) = decode_with(OptionReplyHeader::decode, &bytes);
        prop_assert_eq!(
            res,
            Err(DecodeError::BadMagic { expected: OPTION_REPLY_MAGIC, got: magic })
        );
    }

    #[test]
    fn request_with_bad_magic_is_rejected(magic in wrong_u32(REQUEST_MAGIC), value in request()) {
        let mut bytes = encoded(|b| value.encode(b));
        bytes[..4].copy_from_slice(&magic.to_be_bytes());
        let (res, _) = decode_with(Request::decode, &bytes);
        prop_assert_eq!(
            res,
            Err(DecodeError::BadMagic { expected: REQUEST_MAGIC.into(), got: magic.into() })
        );
    }

    #[test]
    fn simple_reply_with_bad_magic_is_rejected(
        magic in wrong_u32(SIMPLE_REPLY_MAGIC),
        value in simple_reply(),
    ) {
        let mut bytes = encoded(|b| value.encode(b));
        bytes[..4].copy_from_slice(&magic.to_be_bytes());
        let (res, _) = decode_with(SimpleReply::decode, &bytes);
        prop_assert_eq!(
            res,
            Err(DecodeError::BadMagic { expected: SIMPLE_REPLY_MAGIC.into(), got: magic.into() })
        );
    }

    #[test]
    fn client_flags_with_unknown_bits_are_rejected(
        flags in any::<u32>().prop_filter("needs an unknown bit", |f| f & !client_flags::KNOWN != 0),
    ) {
        let (res, _) = decode_with(ClientFlags::decode, &flags.to_be_bytes());
        prop_assert!(
            matches!(res, Err(DecodeError::Invalid { what: "client flags", .. })),
            "{:?}",
            res
        );
    }
}

#[test]
fn request_with_a_reply_magic_is_rejected() {
    // A peer that echoes replies back must not be taken for a client.
    let mut bytes = encoded(|b| {
        Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 512,
        }
        .encode(b)
    });
    bytes[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    let (res, _) = decode_with(Request::decode, &bytes);
    assert_eq!(
        res,
        Err(DecodeError::BadMagic {
            expected: REQUEST_MAGIC.into(),
            got: SIMPLE_REPLY_MAGIC.into(),
        })
    );
}

#[test]
fn client_flags_with_the_lowest_unknown_bit_are_rejected_with_that_bit_named() {
    let (res, _) = decode_with(ClientFlags::decode, &[0, 0, 0, 0b111]);
    match res {
        Err(DecodeError::Invalid { what, detail }) => {
            assert_eq!(what, "client flags");
            assert!(detail.contains("0x4"), "detail was {detail:?}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Malformed input: InfoRequest (NBD_OPT_INFO / NBD_OPT_GO data)
// ---------------------------------------------------------------------------

fn info_request_bytes(
    name: &[u8],
    declared_name_len: u32,
    count: u16,
    requests: &[u16],
) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u32(declared_name_len);
    b.put_slice(name);
    b.put_u16(count);
    for r in requests {
        b.put_u16(*r);
    }
    b.to_vec()
}

#[test]
fn info_request_shorter_than_its_name_length_field_is_rejected() {
    for len in 0..4u64 {
        let data = vec![0u8; len as usize];
        assert_eq!(
            InfoRequest::decode_data(&data),
            Err(DecodeError::LengthMismatch {
                what: "NBD_OPT_GO/INFO data",
                declared: 4,
                actual: len,
            })
        );
    }
}

#[test]
fn info_request_with_name_length_larger_than_data_is_rejected() {
    let data = info_request_bytes(b"disk", 10, 0, &[]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_OPT_GO/INFO export name",
            declared: 10,
            // 4 name bytes + 2 count bytes follow the length; 2 are reserved
            // for the count.
            actual: 4,
        })
    );
}

#[test]
fn info_request_missing_its_request_count_is_rejected() {
    let mut data = info_request_bytes(b"disk", 4, 0, &[]);
    data.truncate(4 + 4 + 1);
    assert!(matches!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_OPT_GO/INFO export name",
            ..
        })
    ));
}

#[test]
fn info_request_with_name_longer_than_4096_bytes_is_rejected() {
    let name = vec![b'a'; MAX_STRING + 1];
    let data = info_request_bytes(&name, name.len() as u32, 0, &[]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::TooLong {
            what: "export name",
            len: MAX_STRING as u64 + 1,
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn info_request_with_huge_declared_name_length_is_rejected_before_reading() {
    let data = info_request_bytes(b"", u32::MAX, 0, &[]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::TooLong {
            what: "export name",
            len: u32::MAX.into(),
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn info_request_with_name_of_exactly_4096_bytes_is_accepted() {
    let name = "n".repeat(MAX_STRING);
    let data = info_request_bytes(name.as_bytes(), MAX_STRING as u32, 1, &[info::BLOCK_SIZE]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Ok(InfoRequest {
            name,
            requests: vec![info::BLOCK_SIZE],
        })
    );
}

#[test]
fn info_request_with_non_utf8_name_is_rejected() {
    let name = bad_utf8();
    let data = info_request_bytes(&name, name.len() as u32, 0, &[]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::NotUtf8("export name"))
    );
}

#[test]
fn info_request_with_more_requests_declared_than_present_is_rejected() {
    let data = info_request_bytes(b"disk", 4, 3, &[info::NAME, info::BLOCK_SIZE]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_OPT_GO/INFO information requests",
            declared: 6,
            actual: 4,
        })
    );
}

#[test]
fn info_request_with_fewer_requests_declared_than_present_is_rejected() {
    let data = info_request_bytes(b"disk", 4, 1, &[info::NAME, info::BLOCK_SIZE]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_OPT_GO/INFO information requests",
            declared: 2,
            actual: 4,
        })
    );
}

#[test]
fn info_request_with_an_odd_trailing_byte_is_rejected() {
    let mut data = info_request_bytes(b"disk", 4, 1, &[info::NAME]);
    data.push(0);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_OPT_GO/INFO information requests",
            declared: 2,
            actual: 3,
        })
    );
}

#[test]
fn info_request_with_maximum_request_count_and_no_requests_is_rejected() {
    let data = info_request_bytes(b"", 0, u16::MAX, &[]);
    assert_eq!(
        InfoRequest::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_OPT_GO/INFO information requests",
            declared: 2 * u64::from(u16::MAX),
            actual: 0,
        })
    );
}

// ---------------------------------------------------------------------------
// Malformed input: export names (NBD_OPT_EXPORT_NAME data)
// ---------------------------------------------------------------------------

#[test]
fn export_name_longer_than_4096_bytes_is_rejected() {
    let name = vec![b'a'; MAX_STRING + 1];
    assert_eq!(
        decode_export_name(&name),
        Err(DecodeError::TooLong {
            what: "export name",
            len: MAX_STRING as u64 + 1,
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn export_name_that_is_not_utf8_is_rejected() {
    assert_eq!(
        decode_export_name(&bad_utf8()),
        Err(DecodeError::NotUtf8("export name"))
    );
}

#[test]
fn empty_export_name_is_accepted() {
    assert_eq!(decode_export_name(b""), Ok(String::new()));
}

// ---------------------------------------------------------------------------
// Malformed input: ServerEntry (NBD_REP_SERVER data)
// ---------------------------------------------------------------------------

fn server_entry_bytes(declared_name_len: u32, rest: &[u8]) -> Vec<u8> {
    let mut b = declared_name_len.to_be_bytes().to_vec();
    b.extend_from_slice(rest);
    b
}

#[test]
fn server_entry_shorter_than_its_name_length_field_is_rejected() {
    for len in 0..4u64 {
        let data = vec![0u8; len as usize];
        assert_eq!(
            ServerEntry::decode_data(&data),
            Err(DecodeError::LengthMismatch {
                what: "NBD_REP_SERVER data",
                declared: 4,
                actual: len,
            })
        );
    }
}

#[test]
fn server_entry_with_name_length_larger_than_data_is_rejected() {
    let data = server_entry_bytes(5, b"disk");
    assert_eq!(
        ServerEntry::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_REP_SERVER name",
            declared: 5,
            actual: 4,
        })
    );
}

#[test]
fn server_entry_with_huge_declared_name_length_is_rejected() {
    let data = server_entry_bytes(u32::MAX, b"disk");
    assert_eq!(
        ServerEntry::decode_data(&data),
        Err(DecodeError::LengthMismatch {
            what: "NBD_REP_SERVER name",
            declared: u32::MAX.into(),
            actual: 4,
        })
    );
}

#[test]
fn server_entry_with_name_longer_than_4096_bytes_is_rejected() {
    let name = vec![b'a'; MAX_STRING + 1];
    let data = server_entry_bytes(name.len() as u32, &name);
    assert_eq!(
        ServerEntry::decode_data(&data),
        Err(DecodeError::TooLong {
            what: "export name",
            len: MAX_STRING as u64 + 1,
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn server_entry_with_description_longer_than_4096_bytes_is_rejected() {
    let data = server_entry_bytes(0, &vec![b'd'; MAX_STRING + 1]);
    assert_eq!(
        ServerEntry::decode_data(&data),
        Err(DecodeError::TooLong {
            what: "export description",
            len: MAX_STRING as u64 + 1,
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn server_entry_with_non_utf8_name_is_rejected() {
    let name = bad_utf8();
    let data = server_entry_bytes(name.len() as u32, &name);
    assert_eq!(
        ServerEntry::decode_data(&data),
        Err(DecodeError::NotUtf8("export name"))
    );
}

#[test]
fn server_entry_with_non_utf8_description_is_rejected() {
    let mut rest = b"disk".to_vec();
    rest.extend_from_slice(&bad_utf8());
    let data = server_entry_bytes(4, &rest);
    assert_eq!(
        ServerEntry::decode_data(&data),
        Err(DecodeError::NotUtf8("export description"))
    );
}

#[test]
fn server_entry_with_only_a_zero_name_length_is_an_empty_entry() {
    assert_eq!(
        ServerEntry::decode_data(&[0, 0, 0, 0]),
        Ok(ServerEntry {
            name: String::new(),
            description: String::new(),
        })
    );
}

// ---------------------------------------------------------------------------
// Malformed input: InfoReply (NBD_REP_INFO data)
// ---------------------------------------------------------------------------

fn info_reply_bytes(kind: u16, body_len: usize) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend((0..body_len).map(|i| i as u8));
    b
}

#[test]
fn info_reply_shorter_than_its_type_field_is_rejected() {
    for len in 0..2u64 {
        let data = vec![0u8; len as usize];
        assert_eq!(
            InfoReply::decode_data(&data),
            Err(DecodeError::LengthMismatch {
                what: "NBD_REP_INFO data",
                declared: 2,
                actual: len,
            })
        );
    }
}

#[test]
fn info_reply_export_of_the_wrong_length_is_rejected() {
    for body in [0usize, 1, 9, 11, 64] {
        let data = info_reply_bytes(info::EXPORT, body);
        assert_eq!(
            InfoReply::decode_data(&data),
            Err(DecodeError::LengthMismatch {
                what: "NBD_REP_INFO data",
                declared: 12,
                actual: data.len() as u64,
            }),
            "body of {body} bytes"
        );
    }
}

#[test]
fn info_reply_block_size_of_the_wrong_length_is_rejected() {
    for body in [0usize, 4, 8, 11, 13, 64] {
        let data = info_reply_bytes(info::BLOCK_SIZE, body);
        assert_eq!(
            InfoReply::decode_data(&data),
            Err(DecodeError::LengthMismatch {
                what: "NBD_REP_INFO data",
                declared: 14,
                actual: data.len() as u64,
            }),
            "body of {body} bytes"
        );
    }
}

#[test]
fn info_reply_name_longer_than_4096_bytes_is_rejected() {
    let mut data = info::NAME.to_be_bytes().to_vec();
    data.extend_from_slice(&[b'a'; MAX_STRING + 1]);
    assert_eq!(
        InfoReply::decode_data(&data),
        Err(DecodeError::TooLong {
            what: "export name",
            len: MAX_STRING as u64 + 1,
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn info_reply_description_longer_than_4096_bytes_is_rejected() {
    let mut data = info::DESCRIPTION.to_be_bytes().to_vec();
    data.extend_from_slice(&[b'd'; MAX_STRING + 1]);
    assert_eq!(
        InfoReply::decode_data(&data),
        Err(DecodeError::TooLong {
            what: "export description",
            len: MAX_STRING as u64 + 1,
            max: MAX_STRING as u64,
        })
    );
}

#[test]
fn info_reply_name_that_is_not_utf8_is_rejected() {
    let mut data = info::NAME.to_be_bytes().to_vec();
    data.extend_from_slice(&bad_utf8());
    assert_eq!(
        InfoReply::decode_data(&data),
        Err(DecodeError::NotUtf8("export name"))
    );
}

#[test]
fn info_reply_description_that_is_not_utf8_is_rejected() {
    let mut data = info::DESCRIPTION.to_be_bytes().to_vec();
    data.extend_from_slice(&bad_utf8());
    assert_eq!(
        InfoReply::decode_data(&data),
        Err(DecodeError::NotUtf8("export description"))
    );
}

#[test]
fn info_reply_of_an_unknown_type_keeps_its_bytes() {
    let data = info_reply_bytes(0xbeef, 5);
    assert_eq!(
        InfoReply::decode_data(&data),
        Ok(InfoReply::Unknown {
            kind: 0xbeef,
            data: vec![0, 1, 2, 3, 4],
        })
    );
}

// ---------------------------------------------------------------------------
// Arbitrary bytes never panic
// ---------------------------------------------------------------------------

/// Arbitrary bytes, sometimes led by a valid magic or a plausible length so
/// the decoders get past their first check.
fn arbitrary_input() -> impl Strategy<Value = Vec<u8>> {
    let with_prefix = |prefix: Vec<u8>| {
        vec(any::<u8>(), 0..64).prop_map(move |tail| {
            let mut v = prefix.clone();
            v.extend(tail);
            v
        })
    };
    let mut greeting = NBDMAGIC.to_be_bytes().to_vec();
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    prop_oneof![
        4 => vec(any::<u8>(), 0..256),
        1 => vec(any::<u8>(), 0..(2 * MAX_STRING + 64)),
        1 => with_prefix(greeting),
        1 => with_prefix(IHAVEOPT.to_be_bytes().to_vec()),
        1 => with_prefix(OPTION_REPLY_MAGIC.to_be_bytes().to_vec()),
        1 => with_prefix(REQUEST_MAGIC.to_be_bytes().to_vec()),
        1 => with_prefix(SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec()),
        // Small name lengths, so name/count checks are reached.
        2 => (0u32..40).prop_flat_map(move |n| with_prefix(n.to_be_bytes().to_vec())),
        // Small info types, so every InfoReply arm is reached.
        2 => (0u16..6).prop_flat_map(move |k| with_prefix(k.to_be_bytes().to_vec())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(
        bytes in arbitrary_input(),
        start in 0usize..8,
    ) {
        check_arbitrary_cursor(&bytes, start, ServerGreeting::LEN, ServerGreeting::decode,
            |v, b| v.encode(b))?;
        check_arbitrary_cursor(&bytes, start, ClientFlags::LEN,
            ClientFlags::decode, |v, b| v.encode(b))?;
        check_arbitrary_cursor(&bytes, start, OptionHeader::LEN, OptionHeader::decode,
            |v, b| v.encode(b))?;
        check_arbitrary_cursor(&bytes, start, OptionReplyHeader::LEN, OptionReplyHeader::decode,
            |v, b| v.encode(b))?;
        check_arbitrary_cursor(&bytes, start, Request::LEN, Request::decode,
            |v, b| v.encode(b))?;
        check_arbitrary_cursor(&bytes, start, SimpleReply::LEN, SimpleReply::decode,
            |v, b| v.encode(b))?;
        check_arbitrary_cursor(&bytes, start, ExportNameReply::LEN,
            |c| ExportNameReply::decode(c, true), |v, b| v.encode(b, true))?;
        // With zeroes the decoder skips the padding without checking it, so
        // only the header part is compared.
        let with_zeroes = ExportNameReply::LEN + ExportNameReply::ZEROES;
        let (res, pos) = decode_with(|c| ExportNameReply::decode(c, false), &bytes);
        match res {
            Ok(None) => prop_assert!(bytes.len() < with_zeroes && pos == 0),
            Ok(Some(v)) => {
                prop_assert_eq!(pos, with_zeroes as u64);
                let again = encoded(|b| v.encode(b, true));
                prop_assert_eq!(again.as_slice(), &bytes[..ExportNameReply::LEN]);
            }
            Err(e) => prop_assert!(false, "ExportNameReply cannot fail, got {:?}", e),
        }

        // Whole-buffer decoders: whatever they accept must re-encode to the
        // exact input.
        if let Ok(v) = InfoRequest::decode_data(&bytes) {
            prop_assert_eq!(encoded(|b| v.encode(b)), bytes.clone());
        }
        if let Ok(name) = decode_export_name(&bytes) {
            prop_assert_eq!(name.as_bytes(), bytes.as_slice());
        }
        if let Ok(v) = ServerEntry::decode_data(&bytes) {
            prop_assert_eq!(encoded(|b| v.encode(b)), bytes.clone());
        }
        if let Ok(v) = InfoReply::decode_data(&bytes) {
            prop_assert_eq!(encoded(|b| v.encode(b)), bytes.clone());
        }
    }

    #[test]
    fn cursor_decoders_never_panic_when_the_cursor_is_past_the_end(
        bytes in vec(any::<u8>(), 0..32),
        past in 0u64..64,
    ) {
        let pos = bytes.len() as u64 + past;
        let decoders: [(&str, CursorDecoder<()>); 7] = [
            ("greeting", |c| ServerGreeting::decode(c).map(|o| o.map(drop))),
            ("client flags", |c| ClientFlags::decode(c).map(|o| o.map(drop))),
            ("option header", |c| OptionHeader::decode(c).map(|o| o.map(drop))),
            ("option reply header", |c| OptionReplyHeader::decode(c).map(|o| o.map(drop))),
            ("request", |c| Request::decode(c).map(|o| o.map(drop))),
            ("simple reply", |c| SimpleReply::decode(c).map(|o| o.map(drop))),
            ("export name reply", |c| ExportNameReply::decode(c, false).map(|o| o.map(drop))),
        ];
        for (what, decode) in decoders {
            let mut cur = Cursor::new(bytes.as_slice());
            cur.set_position(pos);
            let res = decode(&mut cur);
            prop_assert_eq!(res, Ok(None), "{}", what);
            prop_assert_eq!(cur.position(), pos, "{}", what);
        }
    }
}
