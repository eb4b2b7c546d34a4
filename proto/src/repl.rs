//! The replication protocol between two `repld` peers: frame layout,
//! handshake messages, the data path and keepalive. `proto/PROTOCOL.md`
//! specifies the same thing in prose, byte by byte.
//!
//! Every frame is a 12-byte header (magic, layout version, kind, body
//! length) followed by the body. The body of a `Write` ends with the
//! payload, whose crc32c is in the frame so the receiver can verify it.

use std::io::Cursor;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::DecodeError;

/// "RBLK".
pub const MAGIC: u32 = 0x5242_4c4b;
/// Layout version of the frame header itself; bumped only if the header
/// changes (message semantics are negotiated with `Hello`).
pub const HEADER_VERSION: u16 = 1;
/// Protocol versions this implementation speaks.
pub const PROTOCOL_MIN: u16 = 2;
pub const PROTOCOL_MAX: u16 = 2;
/// Largest body accepted: a 32 MiB write plus its fixed fields.
pub const MAX_BODY: u32 = (32 << 20) + 64;
pub const CHALLENGE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Longest node or resource name.
pub const MAX_NAME: usize = 255;
/// Longest human-readable message in a `Refuse`.
pub const MAX_MESSAGE: usize = 1024;

/// Frame kinds.
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const AUTH: u16 = 2;
    pub const AUTH_OK: u16 = 3;
    pub const REFUSE: u16 = 4;
    pub const STATE: u16 = 5;
    pub const WRITE: u16 = 16;
    pub const TRIM: u16 = 17;
    pub const WRITE_ZEROES: u16 = 18;
    pub const BARRIER: u16 = 19;
    pub const ACK: u16 = 20;
    pub const SYNC_DONE: u16 = 21;
    pub const PING: u16 = 32;
    pub const PONG: u16 = 33;
    pub const BITMAP: u16 = 48;
    pub const VERIFY_REQUEST: u16 = 49;
    pub const VERIFY_REPLY: u16 = 50;
    pub const OUT_OF_SYNC: u16 = 51;
    pub const INVALIDATE: u16 = 52;
    pub const READ_REQUEST: u16 = 53;
    pub const READ_REPLY: u16 = 54;
    pub const CSUM_QUERY: u16 = 22;
    pub const CSUM_REPLY: u16 = 23;
}

/// Flags on data frames.
pub mod data_flags {
    /// Acknowledge only once the data is durable on the receiver.
    pub const FUA: u32 = 1 << 0;
    /// `WriteZeroes` only (rejected on `Write` and `Trim`): the receiver
    /// must not deallocate the range.
    pub const NO_HOLE: u32 = 1 << 1;
    pub const KNOWN: u32 = FUA | NO_HOLE;
}

/// Feature bits offered in `Hello`; the session uses the intersection.
pub mod features {
    pub const NONE: u64 = 0;
    /// The sender answers `CsumQuery` with `CsumReply` (checksum-based
    /// resync, `csum_alg::XXH3_128`).
    pub const CSUMS: u64 = 1 << 0;
    /// The sender answers `ReadRequest` with `ReadReply` (a Primary whose
    /// disk failed reads from its peer).
    pub const READS: u64 = 1 << 1;
    pub const KNOWN: u64 = CSUMS | READS;
}

/// Checksum algorithms of `CsumQuery`.
pub mod csum_alg {
    /// XXH3, 128-bit digest.
    pub const XXH3_128: u16 = 1;
    /// Bytes of one digest.
    pub const XXH3_128_LEN: usize = 16;
}

/// Most digests one `CsumReply` carries (and so most blocks one
/// `CsumQuery` asks for).
pub const MAX_CSUMS: u32 = 65536;

/// Bits of `StateFrame::state_flags`.
pub mod state_flags {
    /// The sender was told to discard its data if the pair is in split
    /// brain (`replctl connect --discard-my-data`).
    pub const DISCARD_MY_DATA: u16 = 1 << 0;
    /// The receiver must answer with its own `State`, carrying `ANSWER`
    /// and the same `token`.
    pub const REPLY: u16 = 1 << 1;
    /// The sender is being promoted: it waits for the answer to this
    /// frame before it becomes Primary.
    pub const PROMOTING: u16 = 1 << 2;
    /// This frame answers the receiver's `REPLY` request `token`.
    pub const ANSWER: u16 = 1 << 3;
    pub const KNOWN: u16 = DISCARD_MY_DATA | REPLY | PROMOTING | ANSWER;
}

/// Largest `StateFrame::role` value (0 Secondary, 1 Primary).
pub const MAX_ROLE: u8 = 1;
/// Largest `StateFrame::disk` value (0 Diskless, 1 Inconsistent,
/// 2 Outdated, 3 Consistent, 4 UpToDate).
pub const MAX_DISK: u8 = 4;

/// A node's role, disk state and generation identifiers, sent by both
/// sides right after `AuthOk` and again whenever they change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StateFrame {
    pub role: u8,
    pub disk: u8,
    pub state_flags: u16,
    /// The metadata flag bits (consistent, was primary, ...), as stored.
    pub md_flags: u32,
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
    /// Blocks the sender has marked out of sync for the receiver.
    pub dirty_bits: u64,
    /// Names a `REPLY` request; echoed in its `ANSWER` (0 otherwise).
    pub token: u64,
}

impl StateFrame {
    pub const LEN: usize = 56;
}

/// Why a peer refused the session (sent in `Refuse`, then the connection
/// is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    VersionMismatch,
    UnknownResource,
    WrongPeer,
    SizeMismatch,
    AuthFailed,
    ProtocolError,
    Busy,
    /// A setting both nodes must share differs (split-brain policies).
    ConfigMismatch,
    Other(u16),
}

impl RefuseCode {
    pub fn to_wire(self) -> u16 {
        match self {
            RefuseCode::VersionMismatch => 1,
            RefuseCode::UnknownResource => 2,
            RefuseCode::WrongPeer => 3,
            RefuseCode::SizeMismatch => 4,
            RefuseCode::AuthFailed => 5,
            RefuseCode::ProtocolError => 6,
            RefuseCode::Busy => 7,
            RefuseCode::ConfigMismatch => 8,
            RefuseCode::Other(c) => c,
        }
    }

    pub fn from_wire(code: u16) -> Self {
        match code {
            1 => RefuseCode::VersionMismatch,
            2 => RefuseCode::UnknownResource,
            3 => RefuseCode::WrongPeer,
            4 => RefuseCode::SizeMismatch,
            5 => RefuseCode::AuthFailed,
            6 => RefuseCode::ProtocolError,
            7 => RefuseCode::Busy,
            8 => RefuseCode::ConfigMismatch,
            c => RefuseCode::Other(c),
        }
    }
}

/// The fixed header in front of every frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u16,
    pub length: u32,
}

impl FrameHeader {
    pub const LEN: usize = 12;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(MAGIC);
        dst.put_u16(HEADER_VERSION);
        dst.put_u16(self.kind);
        dst.put_u32(self.length);
    }

    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        if src.remaining() < Self::LEN {
            return Ok(None);
        }
        let start = src.position();
        let magic = src.get_u32();
        if magic != MAGIC {
            src.set_position(start);
            return Err(DecodeError::BadMagic {
                expected: MAGIC as u64,
                got: magic as u64,
            });
        }
        let version = src.get_u16();
        if version != HEADER_VERSION {
            return Err(DecodeError::Invalid {
                what: "frame header version",
                detail: format!("{version}, expected {HEADER_VERSION}"),
            });
        }
        let kind = src.get_u16();
        let length = src.get_u32();
        if length > MAX_BODY {
            return Err(DecodeError::TooLong {
                what: "frame body",
                len: length as u64,
                max: MAX_BODY as u64,
            });
        }
        Ok(Some(FrameHeader { kind, length }))
    }
}

/// The first frame each side sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    pub features: u64,
    /// The sender's node name.
    pub node: String,
    /// The node name the sender expects to be talking to.
    pub peer: String,
    pub resource: String,
    /// Usable bytes of the sender's device.
    pub size: u64,
    /// Random bytes the receiver must answer with `Auth`.
    pub challenge: [u8; CHALLENGE_LEN],
    /// The sender's automatic split-brain policies (after-sb-0pri,
    /// after-sb-1pri), as codes the daemon defines; both nodes must use
    /// the same ones, or they could take opposite decisions.
    pub after_sb: [u8; 2],
}

/// A replicated write: header fields plus the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFrame {
    pub seq: u64,
    pub offset: u64,
    pub flags: u32,
    pub crc: u32,
    pub payload: Bytes,
}

impl WriteFrame {
    /// Builds a write frame, computing the payload's crc32c.
    pub fn new(seq: u64, offset: u64, flags: u32, payload: Bytes) -> Self {
        let crc = crate::crc32c(&payload);
        WriteFrame {
            seq,
            offset,
            flags,
            crc,
            payload,
        }
    }

    /// True when the payload matches the crc32c carried in the frame.
    pub fn crc_ok(&self) -> bool {
        crate::crc32c(&self.payload) == self.crc
    }

    pub const FIXED: usize = 24;
}

/// A `Write` frame body decoded in place, without copying the payload;
/// receivers on the hot path use this instead of [`Frame::decode_body`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRef<'a> {
    pub seq: u64,
    pub offset: u64,
    pub flags: u32,
    pub crc: u32,
    pub payload: &'a [u8],
}

impl<'a> WriteRef<'a> {
    /// Decodes the body of a frame whose header said `kind::WRITE`.
    pub fn decode_body(body: &'a [u8]) -> Result<WriteRef<'a>, DecodeError> {
        if body.len() < WriteFrame::FIXED {
            return Err(DecodeError::LengthMismatch {
                what: "Write",
                declared: WriteFrame::FIXED as u64,
                actual: body.len() as u64,
            });
        }
        let mut src = Cursor::new(body);
        let seq = src.get_u64();
        let offset = src.get_u64();
        let flags = check_flags(src.get_u32(), "Write flags")?;
        if flags & data_flags::NO_HOLE != 0 {
            return Err(DecodeError::Invalid {
                what: "Write flags",
                detail: "NO_HOLE applies to WriteZeroes only".into(),
            });
        }
        let crc = src.get_u32();
        let payload = &body[WriteFrame::FIXED..];
        if offset.checked_add(payload.len() as u64).is_none() {
            return Err(DecodeError::Invalid {
                what: "Write range",
                detail: format!("offset {offset} + {} overflows", payload.len()),
            });
        }
        Ok(WriteRef {
            seq,
            offset,
            flags,
            crc,
            payload,
        })
    }

    /// True when the payload matches the crc32c carried in the frame.
    pub fn crc_ok(&self) -> bool {
        crate::crc32c(self.payload) == self.crc
    }

    /// Appends the frame header and the fixed part of a Write whose
    /// payload of `payload_len` bytes the caller sends right after (so a
    /// sender need not copy the payload into the frame buffer).
    pub fn encode_head(
        dst: &mut BytesMut,
        seq: u64,
        offset: u64,
        flags: u32,
        crc: u32,
        payload_len: usize,
    ) {
        FrameHeader {
            kind: kind::WRITE,
            length: (WriteFrame::FIXED + payload_len) as u32,
        }
        .encode(dst);
        dst.put_u64(seq);
        dst.put_u64(offset);
        dst.put_u32(flags);
        dst.put_u32(crc);
    }
}

/// Every frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    /// HMAC-SHA256 answer to the peer's challenge (see [`auth_mac`]).
    Auth {
        mac: [u8; MAC_LEN],
    },
    /// The peer's `Auth` was verified.
    AuthOk,
    State(StateFrame),
    /// The sender made the receiver's data equal to its own generation
    /// `current`: the receiver adopts it and is UpToDate.
    SyncDone {
        current: u64,
    },
    /// The session is refused; the connection closes after this frame.
    Refuse {
        code: RefuseCode,
        message: String,
    },
    Write(WriteFrame),
    Trim {
        seq: u64,
        offset: u64,
        length: u64,
        flags: u32,
    },
    WriteZeroes {
        seq: u64,
        offset: u64,
        length: u64,
        flags: u32,
    },
    /// Acknowledged only after every earlier data frame is durable.
    Barrier {
        seq: u64,
    },
    /// Completion of the data frame or barrier `seq`; `status` 0 is
    /// success, otherwise an errno value from the receiver's storage.
    Ack {
        seq: u64,
        status: u32,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Part of the sender's out-of-sync bitmap (sent at connect when a
    /// resync follows, see [`BitmapChunk`]).
    Bitmap(BitmapChunk),
    /// Online verify: the receiver answers with the digests of the blocks
    /// of `[offset, offset + length)`, `block` bytes each.
    VerifyRequest {
        id: u64,
        offset: u64,
        length: u32,
        block: u32,
    },
    /// The answer to `VerifyRequest` `id`: one digest per block, or a
    /// non-zero `status` (an errno value, or [`VERIFY_BUSY`]) and none.
    VerifyReply {
        id: u64,
        status: u32,
        digests: Vec<[u8; DIGEST_LEN]>,
    },
    /// Online verify found `[offset, offset + length)` different: the
    /// receiver marks it out of sync too.
    OutOfSync {
        offset: u64,
        length: u64,
    },
    /// The sender asks the receiver to become a full sync target
    /// (`invalidate-remote`).
    Invalidate,
    /// Asks the receiver (a sync target) for the digests of its blocks of
    /// `block` bytes in `[offset, offset + length)`, taken after every
    /// data frame sent before this one is applied. Unsequenced; answered
    /// by `CsumReply` with the same `id`.
    CsumQuery {
        id: u64,
        offset: u64,
        length: u32,
        block: u32,
        alg: u16,
    },
    /// One digest per block of the query `id`, in order (the last block
    /// may be partial). Empty when the receiver could not read the range.
    CsumReply {
        id: u64,
        alg: u16,
        digests: Vec<u128>,
    },
    /// Asks the receiver for its bytes `[offset, offset + length)`, read
    /// after every data frame sent before this one is applied (a Primary
    /// whose disk failed). Unsequenced; answered by `ReadReply` with the
    /// same `id`. Only sent when both offered `features::READS`.
    ReadRequest {
        id: u64,
        offset: u64,
        length: u32,
    },
    /// The answer to `ReadRequest` `id`: the data (status 0), or an errno
    /// value and no data.
    ReadReply {
        id: u64,
        status: u32,
        data: Vec<u8>,
    },
}

/// Largest range one `ReadRequest` may ask for.
pub const MAX_READ_LEN: u32 = 1 << 20;

/// Bytes of a block digest in `VerifyReply`.
pub const DIGEST_LEN: usize = 16;
/// Largest range one `VerifyRequest` may ask for.
pub const MAX_VERIFY_LEN: u32 = 4 << 20;
/// Smallest block a `VerifyRequest` may ask digests of.
pub const MIN_VERIFY_BLOCK: u32 = 512;
/// `VerifyReply::status` when the range is busy with writes in flight:
/// ask again later.
pub const VERIFY_BUSY: u32 = u32::MAX;
/// Most bits one `Bitmap` frame covers (a 1 MiB raw body).
pub const MAX_BITMAP_CHUNK_BITS: u64 = 8 << 20;

/// How a [`BitmapChunk`] carries its bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapEncoding {
    /// `bits.div_ceil(8)` bytes, bit `i` of the chunk is bit `i % 8` of
    /// byte `i / 8`; bits past `bits` are zero.
    Raw,
    /// Run lengths: one byte giving the value (0 or 1) of the first run,
    /// then each run's length as a LEB128 varint (at least 1), the values
    /// alternating. The lengths add up to `bits` exactly.
    Runs,
}

/// A piece of a node's out-of-sync bitmap: bits `[start_bit, start_bit +
/// bits)` of a bitmap of `total_bits`. A whole bitmap is sent as chunks in
/// ascending order with no gap; the receiver knows from `total_bits` (which
/// must equal its own) when it has all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapChunk {
    pub total_bits: u64,
    pub start_bit: u64,
    pub bits: u64,
    pub encoding: BitmapEncoding,
    pub data: Bytes,
}

impl BitmapChunk {
    /// Fixed fields before `data`.
    pub const FIXED: usize = 25;

    /// Splits a bitmap (`bytes` in the form of [`BitmapEncoding::Raw`],
    /// `total_bits` long) into chunks of at most `chunk_bits` bits, each
    /// encoded as runs when that is smaller, else raw.
    pub fn split(bytes: &[u8], total_bits: u64, chunk_bits: u64) -> Vec<BitmapChunk> {
        let chunk_bits = chunk_bits.clamp(8, MAX_BITMAP_CHUNK_BITS) & !7;
        let bit = |i: u64| {
            bytes
                .get((i / 8) as usize)
                .is_some_and(|b| b >> (i % 8) & 1 == 1)
        };
        let mut out = Vec::new();
        let mut start = 0u64;
        while start < total_bits {
            let bits = chunk_bits.min(total_bits - start);
            let raw_len = bits.div_ceil(8) as usize;
            let mut runs = BytesMut::new();
            let mut value = bit(start);
            runs.put_u8(u8::from(value));
            let mut run = 0u64;
            let mut i = start;
            // Whole bytes at a time where the run continues through them.
            while i < start + bits && runs.len() <= raw_len {
                let rest = start + bits - i;
                let full = if value { 0xff } else { 0 };
                if i.is_multiple_of(8) && rest >= 8 && bytes.get((i / 8) as usize) == Some(&full) {
                    run += 8;
                    i += 8;
                    continue;
                }
                if bit(i) == value {
                    run += 1;
                } else {
                    put_varint(&mut runs, run);
                    value = !value;
                    run = 1;
                }
                i += 1;
            }
            put_varint(&mut runs, run);
            let (encoding, data) = if i >= start + bits && runs.len() < raw_len {
                (BitmapEncoding::Runs, runs.freeze())
            } else {
                let mut raw = vec![0u8; raw_len];
                for k in 0..bits {
                    if bit(start + k) {
                        raw[(k / 8) as usize] |= 1 << (k % 8);
                    }
                }
                (BitmapEncoding::Raw, Bytes::from(raw))
            };
            out.push(BitmapChunk {
                total_bits,
                start_bit: start,
                bits,
                encoding,
                data,
            });
            start += bits;
        }
        out
    }

    /// Sets in `out` (the raw form of a bitmap of `total_bits`) every bit
    /// this chunk has set. `out` must be `total_bits.div_ceil(8)` long; a
    /// chunk for another size is an error.
    pub fn merge_into(&self, out: &mut [u8]) -> Result<(), DecodeError> {
        if out.len() as u64 != self.total_bits.div_ceil(8) {
            return Err(DecodeError::Invalid {
                what: "Bitmap",
                detail: format!(
                    "the peer's bitmap has {} bits, ours {} bytes",
                    self.total_bits,
                    out.len()
                ),
            });
        }
        let mut set = |from: u64, n: u64| {
            for i in from..from + n {
                out[(i / 8) as usize] |= 1 << (i % 8);
            }
        };
        match self.encoding {
            BitmapEncoding::Raw => {
                for k in 0..self.bits {
                    if self.data[(k / 8) as usize] >> (k % 8) & 1 == 1 {
                        set(self.start_bit + k, 1);
                    }
                }
            }
            BitmapEncoding::Runs => {
                let mut at = self.start_bit;
                for (value, len) in runs(&self.data)? {
                    if value {
                        set(at, len);
                    }
                    at += len;
                }
            }
        }
        Ok(())
    }
}

fn put_varint(dst: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        dst.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    dst.put_u8(v as u8);
}

/// Reads one LEB128 varint of at most 10 bytes.
fn get_varint(src: &[u8], at: &mut usize) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..70).step_by(7) {
        let Some(&b) = src.get(*at) else {
            return Err(DecodeError::Invalid {
                what: "Bitmap runs",
                detail: "truncated run length".into(),
            });
        };
        *at += 1;
        if shift == 63 && b > 1 {
            break;
        }
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Invalid {
        what: "Bitmap runs",
        detail: "run length does not fit 64 bits".into(),
    })
}

/// The runs `(value, length)` of a `Runs` body (not yet checked against
/// the chunk's length).
fn runs(data: &[u8]) -> Result<Vec<(bool, u64)>, DecodeError> {
    let Some(&first) = data.first() else {
        return Err(DecodeError::Invalid {
            what: "Bitmap runs",
            detail: "empty".into(),
        });
    };
    if first > 1 {
        return Err(DecodeError::Invalid {
            what: "Bitmap runs",
            detail: format!("first value {first}, expected 0 or 1"),
        });
    }
    let mut value = first == 1;
    let mut at = 1;
    let mut out = Vec::new();
    while at < data.len() {
        let len = get_varint(data, &mut at)?;
        if len == 0 {
            return Err(DecodeError::Invalid {
                what: "Bitmap runs",
                detail: "a run of length 0".into(),
            });
        }
        out.push((value, len));
        value = !value;
    }
    Ok(out)
}

fn put_name(dst: &mut BytesMut, s: &str) {
    let bytes = s.as_bytes();
    let len = bytes.len().min(u16::MAX as usize);
    dst.put_u16(len as u16);
    dst.put_slice(&bytes[..len]);
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncated(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn get_string(
    src: &mut Cursor<&[u8]>,
    what: &'static str,
    max: usize,
) -> Result<String, DecodeError> {
    if src.remaining() < 2 {
        return Err(DecodeError::LengthMismatch {
            what,
            declared: 2,
            actual: src.remaining() as u64,
        });
    }
    let len = src.get_u16() as usize;
    if len > max {
        return Err(DecodeError::TooLong {
            what,
            len: len as u64,
            max: max as u64,
        });
    }
    if src.remaining() < len {
        return Err(DecodeError::LengthMismatch {
            what,
            declared: len as u64,
            actual: src.remaining() as u64,
        });
    }
    let start = src.position() as usize;
    let bytes = &src.get_ref()[start..start + len];
    let s = std::str::from_utf8(bytes)
        .map_err(|_| DecodeError::NotUtf8(what))?
        .to_owned();
    src.advance(len);
    Ok(s)
}

fn fixed(body: &[u8], kind_name: &'static str, len: usize) -> Result<(), DecodeError> {
    if body.len() != len {
        return Err(DecodeError::LengthMismatch {
            what: kind_name,
            declared: len as u64,
            actual: body.len() as u64,
        });
    }
    Ok(())
}

fn check_flags(flags: u32, what: &'static str) -> Result<u32, DecodeError> {
    if flags & !data_flags::KNOWN != 0 {
        return Err(DecodeError::Invalid {
            what,
            detail: format!("unknown flag bits {:#x}", flags & !data_flags::KNOWN),
        });
    }
    Ok(flags)
}

impl Frame {
    pub fn kind(&self) -> u16 {
        match self {
            Frame::Hello(_) => kind::HELLO,
            Frame::Auth { .. } => kind::AUTH,
            Frame::AuthOk => kind::AUTH_OK,
            Frame::State(_) => kind::STATE,
            Frame::SyncDone { .. } => kind::SYNC_DONE,
            Frame::Refuse { .. } => kind::REFUSE,
            Frame::Write(_) => kind::WRITE,
            Frame::Trim { .. } => kind::TRIM,
            Frame::WriteZeroes { .. } => kind::WRITE_ZEROES,
            Frame::Barrier { .. } => kind::BARRIER,
            Frame::Ack { .. } => kind::ACK,
            Frame::Ping { .. } => kind::PING,
            Frame::Pong { .. } => kind::PONG,
            Frame::Bitmap(_) => kind::BITMAP,
            Frame::VerifyRequest { .. } => kind::VERIFY_REQUEST,
            Frame::VerifyReply { .. } => kind::VERIFY_REPLY,
            Frame::OutOfSync { .. } => kind::OUT_OF_SYNC,
            Frame::Invalidate => kind::INVALIDATE,
            Frame::CsumQuery { .. } => kind::CSUM_QUERY,
            Frame::CsumReply { .. } => kind::CSUM_REPLY,
            Frame::ReadRequest { .. } => kind::READ_REQUEST,
            Frame::ReadReply { .. } => kind::READ_REPLY,
        }
    }

    /// Appends header and body.
    pub fn encode(&self, dst: &mut BytesMut) {
        let header_at = dst.len();
        FrameHeader {
            kind: self.kind(),
            length: 0,
        }
        .encode(dst);
        let body_at = dst.len();
        match self {
            Frame::Hello(h) => {
                dst.put_u16(h.min_version);
                dst.put_u16(h.max_version);
                dst.put_u64(h.features);
                put_name(dst, &h.node);
                put_name(dst, &h.peer);
                put_name(dst, &h.resource);
                dst.put_u64(h.size);
                dst.put_slice(&h.challenge);
                dst.put_slice(&h.after_sb);
            }
            Frame::Auth { mac } => dst.put_slice(mac),
            Frame::AuthOk => {}
            Frame::State(st) => {
                dst.put_u8(st.role);
                dst.put_u8(st.disk);
                dst.put_u16(st.state_flags);
                dst.put_u32(st.md_flags);
                dst.put_u64(st.current);
                dst.put_u64(st.bitmap);
                dst.put_u64(st.history[0]);
                dst.put_u64(st.history[1]);
                dst.put_u64(st.dirty_bits);
                dst.put_u64(st.token);
            }
            Frame::SyncDone { current } => dst.put_u64(*current),
            Frame::Refuse { code, message } => {
                dst.put_u16(code.to_wire());
                // A longer message would make the peer reject the whole
                // frame and so lose the refusal code; it is only prose.
                put_name(dst, truncated(message, MAX_MESSAGE));
            }
            Frame::Write(w) => {
                dst.put_u64(w.seq);
                dst.put_u64(w.offset);
                dst.put_u32(w.flags);
                dst.put_u32(w.crc);
                dst.put_slice(&w.payload);
            }
            Frame::Trim {
                seq,
                offset,
                length,
                flags,
            }
            | Frame::WriteZeroes {
                seq,
                offset,
                length,
                flags,
            } => {
                dst.put_u64(*seq);
                dst.put_u64(*offset);
                dst.put_u64(*length);
                dst.put_u32(*flags);
            }
            Frame::Barrier { seq } => dst.put_u64(*seq),
            Frame::Ack { seq, status } => {
                dst.put_u64(*seq);
                dst.put_u32(*status);
            }
            Frame::Ping { nonce } | Frame::Pong { nonce } => dst.put_u64(*nonce),
            Frame::Bitmap(c) => {
                dst.put_u64(c.total_bits);
                dst.put_u64(c.start_bit);
                dst.put_u64(c.bits);
                dst.put_u8(match c.encoding {
                    BitmapEncoding::Raw => 0,
                    BitmapEncoding::Runs => 1,
                });
                dst.put_slice(&c.data);
            }
            Frame::VerifyRequest {
                id,
                offset,
                length,
                block,
            } => {
                dst.put_u64(*id);
                dst.put_u64(*offset);
                dst.put_u32(*length);
                dst.put_u32(*block);
            }
            Frame::VerifyReply {
                id,
                status,
                digests,
            } => {
                dst.put_u64(*id);
                dst.put_u32(*status);
                dst.put_u32(digests.len() as u32);
                for d in digests {
                    dst.put_slice(d);
                }
            }
            Frame::OutOfSync { offset, length } => {
                dst.put_u64(*offset);
                dst.put_u64(*length);
            }
            Frame::Invalidate => {}
            Frame::CsumQuery {
                id,
                offset,
                length,
                block,
                alg,
            } => {
                dst.put_u64(*id);
                dst.put_u64(*offset);
                dst.put_u32(*length);
                dst.put_u32(*block);
                dst.put_u16(*alg);
            }
            Frame::CsumReply { id, alg, digests } => {
                dst.put_u64(*id);
                dst.put_u16(*alg);
                let n = digests.len().min(MAX_CSUMS as usize);
                dst.put_u32(n as u32);
                for d in &digests[..n] {
                    dst.put_u128(*d);
                }
            }
            Frame::ReadRequest { id, offset, length } => {
                dst.put_u64(*id);
                dst.put_u64(*offset);
                dst.put_u32(*length);
            }
            Frame::ReadReply { id, status, data } => {
                dst.put_u64(*id);
                dst.put_u32(*status);
                dst.put_slice(data);
            }
        }
        let length = (dst.len() - body_at) as u32;
        dst[header_at + 8..header_at + 12].copy_from_slice(&length.to_be_bytes());
    }

    /// Decodes one whole frame; `Ok(None)` if the buffer holds less than a
    /// frame (the cursor is then unchanged).
    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Frame>, DecodeError> {
        let start = src.position();
        let Some(header) = FrameHeader::decode(src)? else {
            return Ok(None);
        };
        if src.remaining() < header.length as usize {
            src.set_position(start);
            return Ok(None);
        }
        let at = src.position() as usize;
        let body = &src.get_ref()[at..at + header.length as usize];
        let frame = Frame::decode_body(header.kind, body)?;
        src.advance(header.length as usize);
        Ok(Some(frame))
    }

    /// Decodes a frame body whose header has already been read.
    pub fn decode_body(kind: u16, body: &[u8]) -> Result<Frame, DecodeError> {
        let mut src = Cursor::new(body);
        let frame = match kind {
            kind::HELLO => {
                if body.len() < 12 {
                    return Err(DecodeError::LengthMismatch {
                        what: "Hello",
                        declared: 12,
                        actual: body.len() as u64,
                    });
                }
                let min_version = src.get_u16();
                let max_version = src.get_u16();
                let features = src.get_u64();
                let node = get_string(&mut src, "Hello node name", MAX_NAME)?;
                let peer = get_string(&mut src, "Hello peer name", MAX_NAME)?;
                let resource = get_string(&mut src, "Hello resource name", MAX_NAME)?;
                if src.remaining() != 8 + CHALLENGE_LEN + 2 {
                    return Err(DecodeError::LengthMismatch {
                        what: "Hello size, challenge and policies",
                        declared: (8 + CHALLENGE_LEN + 2) as u64,
                        actual: src.remaining() as u64,
                    });
                }
                let size = src.get_u64();
                let mut challenge = [0u8; CHALLENGE_LEN];
                src.copy_to_slice(&mut challenge);
                let after_sb = [src.get_u8(), src.get_u8()];
                if min_version > max_version {
                    return Err(DecodeError::Invalid {
                        what: "Hello version range",
                        detail: format!("min {min_version} > max {max_version}"),
                    });
                }
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    features,
                    node,
                    peer,
                    resource,
                    size,
                    challenge,
                    after_sb,
                })
            }
            kind::AUTH => {
                fixed(body, "Auth", MAC_LEN)?;
                let mut mac = [0u8; MAC_LEN];
                src.copy_to_slice(&mut mac);
                Frame::Auth { mac }
            }
            kind::AUTH_OK => {
                fixed(body, "AuthOk", 0)?;
                Frame::AuthOk
            }
            kind::STATE => {
                fixed(body, "State", StateFrame::LEN)?;
                let st = StateFrame {
                    role: src.get_u8(),
                    disk: src.get_u8(),
                    state_flags: src.get_u16(),
                    md_flags: src.get_u32(),
                    current: src.get_u64(),
                    bitmap: src.get_u64(),
                    history: [src.get_u64(), src.get_u64()],
                    dirty_bits: src.get_u64(),
                    token: src.get_u64(),
                };
                if st.role > MAX_ROLE || st.disk > MAX_DISK {
                    return Err(DecodeError::Invalid {
                        what: "State",
                        detail: format!("role {} / disk state {} out of range", st.role, st.disk),
                    });
                }
                if st.state_flags & !state_flags::KNOWN != 0 {
                    return Err(DecodeError::Invalid {
                        what: "State flags",
                        detail: format!(
                            "unknown flag bits {:#x}",
                            st.state_flags & !state_flags::KNOWN
                        ),
                    });
                }
                Frame::State(st)
            }
            kind::SYNC_DONE => {
                fixed(body, "SyncDone", 8)?;
                Frame::SyncDone {
                    current: src.get_u64(),
                }
            }
            kind::REFUSE => {
                if body.len() < 2 {
                    return Err(DecodeError::LengthMismatch {
                        what: "Refuse",
                        declared: 2,
                        actual: body.len() as u64,
                    });
                }
                let code = RefuseCode::from_wire(src.get_u16());
                let message = get_string(&mut src, "Refuse message", MAX_MESSAGE)?;
                if src.has_remaining() {
                    return Err(DecodeError::LengthMismatch {
                        what: "Refuse",
                        declared: (body.len() - src.remaining()) as u64,
                        actual: body.len() as u64,
                    });
                }
                Frame::Refuse { code, message }
            }
            kind::WRITE => {
                let w = WriteRef::decode_body(body)?;
                Frame::Write(WriteFrame {
                    seq: w.seq,
                    offset: w.offset,
                    flags: w.flags,
                    crc: w.crc,
                    payload: Bytes::copy_from_slice(w.payload),
                })
            }
            kind::TRIM | kind::WRITE_ZEROES => {
                fixed(body, "Trim/WriteZeroes", 28)?;
                let seq = src.get_u64();
                let offset = src.get_u64();
                let length = src.get_u64();
                let flags = check_flags(src.get_u32(), "Trim/WriteZeroes flags")?;
                if kind == kind::TRIM && flags & data_flags::NO_HOLE != 0 {
                    return Err(DecodeError::Invalid {
                        what: "Trim/WriteZeroes flags",
                        detail: "NO_HOLE applies to WriteZeroes only".into(),
                    });
                }
                if offset.checked_add(length).is_none() {
                    return Err(DecodeError::Invalid {
                        what: "Trim/WriteZeroes range",
                        detail: format!("offset {offset} + {length} overflows"),
                    });
                }
                if kind == kind::TRIM {
                    Frame::Trim {
                        seq,
                        offset,
                        length,
                        flags,
                    }
                } else {
                    Frame::WriteZeroes {
                        seq,
                        offset,
                        length,
                        flags,
                    }
                }
            }
            kind::BARRIER => {
                fixed(body, "Barrier", 8)?;
                Frame::Barrier { seq: src.get_u64() }
            }
            kind::ACK => {
                fixed(body, "Ack", 12)?;
                Frame::Ack {
                    seq: src.get_u64(),
                    status: src.get_u32(),
                }
            }
            kind::PING => {
                fixed(body, "Ping", 8)?;
                Frame::Ping {
                    nonce: src.get_u64(),
                }
            }
            kind::PONG => {
                fixed(body, "Pong", 8)?;
                Frame::Pong {
                    nonce: src.get_u64(),
                }
            }
            kind::BITMAP => {
                if body.len() < BitmapChunk::FIXED {
                    return Err(DecodeError::LengthMismatch {
                        what: "Bitmap",
                        declared: BitmapChunk::FIXED as u64,
                        actual: body.len() as u64,
                    });
                }
                let total_bits = src.get_u64();
                let start_bit = src.get_u64();
                let bits = src.get_u64();
                let encoding = match src.get_u8() {
                    0 => BitmapEncoding::Raw,
                    1 => BitmapEncoding::Runs,
                    other => {
                        return Err(DecodeError::Invalid {
                            what: "Bitmap encoding",
                            detail: format!("unknown encoding {other}"),
                        })
                    }
                };
                if bits == 0 || bits > MAX_BITMAP_CHUNK_BITS {
                    return Err(DecodeError::Invalid {
                        what: "Bitmap",
                        detail: format!("{bits} bits in one chunk (1..={MAX_BITMAP_CHUNK_BITS})"),
                    });
                }
                if start_bit
                    .checked_add(bits)
                    .is_none_or(|end| end > total_bits)
                {
                    return Err(DecodeError::Invalid {
                        what: "Bitmap",
                        detail: format!(
                            "bits {start_bit}+{bits} past the end of a {total_bits}-bit bitmap"
                        ),
                    });
                }
                let data = &body[BitmapChunk::FIXED..];
                match encoding {
                    BitmapEncoding::Raw => {
                        fixed(data, "Bitmap raw bits", bits.div_ceil(8) as usize)?;
                        let tail = bits % 8;
                        if tail != 0 && data[data.len() - 1] >> tail != 0 {
                            return Err(DecodeError::Invalid {
                                what: "Bitmap",
                                detail: "bits set past the end of the chunk".into(),
                            });
                        }
                    }
                    BitmapEncoding::Runs => {
                        let mut sum = 0u64;
                        for (_, len) in runs(data)? {
                            sum = sum.saturating_add(len);
                        }
                        if sum != bits {
                            return Err(DecodeError::Invalid {
                                what: "Bitmap runs",
                                detail: format!("runs cover {sum} bits, the chunk {bits}"),
                            });
                        }
                    }
                }
                Frame::Bitmap(BitmapChunk {
                    total_bits,
                    start_bit,
                    bits,
                    encoding,
                    data: Bytes::copy_from_slice(data),
                })
            }
            kind::VERIFY_REQUEST => {
                fixed(body, "VerifyRequest", 24)?;
                let id = src.get_u64();
                let offset = src.get_u64();
                let length = src.get_u32();
                let block = src.get_u32();
                if length == 0 || length > MAX_VERIFY_LEN {
                    return Err(DecodeError::Invalid {
                        what: "VerifyRequest",
                        detail: format!("length {length} (1..={MAX_VERIFY_LEN})"),
                    });
                }
                if block < MIN_VERIFY_BLOCK || !block.is_power_of_two() {
                    return Err(DecodeError::Invalid {
                        what: "VerifyRequest",
                        detail: format!(
                            "block size {block} (a power of two, at least {MIN_VERIFY_BLOCK})"
                        ),
                    });
                }
                if offset.checked_add(u64::from(length)).is_none() {
                    return Err(DecodeError::Invalid {
                        what: "VerifyRequest range",
                        detail: format!("offset {offset} + {length} overflows"),
                    });
                }
                Frame::VerifyRequest {
                    id,
                    offset,
                    length,
                    block,
                }
            }
            kind::VERIFY_REPLY => {
                if body.len() < 16 {
                    return Err(DecodeError::LengthMismatch {
                        what: "VerifyReply",
                        declared: 16,
                        actual: body.len() as u64,
                    });
                }
                let id = src.get_u64();
                let status = src.get_u32();
                let count = src.get_u32() as usize;
                let max = (MAX_VERIFY_LEN / MIN_VERIFY_BLOCK) as usize;
                if count > max || (status != 0 && count != 0) {
                    return Err(DecodeError::Invalid {
                        what: "VerifyReply",
                        detail: format!("{count} digests with status {status} (at most {max})"),
                    });
                }
                fixed(&body[16..], "VerifyReply digests", count * DIGEST_LEN)?;
                let digests = body[16..]
                    .chunks_exact(DIGEST_LEN)
                    .map(|c| {
                        let mut d = [0u8; DIGEST_LEN];
                        d.copy_from_slice(c);
                        d
                    })
                    .collect();
                Frame::VerifyReply {
                    id,
                    status,
                    digests,
                }
            }
            kind::OUT_OF_SYNC => {
                fixed(body, "OutOfSync", 16)?;
                let offset = src.get_u64();
                let length = src.get_u64();
                if offset.checked_add(length).is_none() {
                    return Err(DecodeError::Invalid {
                        what: "OutOfSync range",
                        detail: format!("offset {offset} + {length} overflows"),
                    });
                }
                Frame::OutOfSync { offset, length }
            }
            kind::INVALIDATE => {
                fixed(body, "Invalidate", 0)?;
                Frame::Invalidate
            }
            kind::CSUM_QUERY => {
                fixed(body, "CsumQuery", 26)?;
                let id = src.get_u64();
                let offset = src.get_u64();
                let length = src.get_u32();
                let block = src.get_u32();
                let alg = src.get_u16();
                if alg != csum_alg::XXH3_128 {
                    return Err(DecodeError::Invalid {
                        what: "CsumQuery algorithm",
                        detail: format!("unknown algorithm {alg}"),
                    });
                }
                if !block.is_power_of_two() || block < 512 {
                    return Err(DecodeError::Invalid {
                        what: "CsumQuery block size",
                        detail: format!("{block} is not a power of two of at least 512"),
                    });
                }
                if length == 0 || length.div_ceil(block) > MAX_CSUMS {
                    return Err(DecodeError::Invalid {
                        what: "CsumQuery length",
                        detail: format!(
                            "{length} bytes: between 1 and {MAX_CSUMS} blocks of {block}"
                        ),
                    });
                }
                if offset.checked_add(u64::from(length)).is_none() {
                    return Err(DecodeError::Invalid {
                        what: "CsumQuery range",
                        detail: format!("offset {offset} + {length} overflows"),
                    });
                }
                Frame::CsumQuery {
                    id,
                    offset,
                    length,
                    block,
                    alg,
                }
            }
            kind::CSUM_REPLY => {
                if body.len() < 14 {
                    return Err(DecodeError::LengthMismatch {
                        what: "CsumReply",
                        declared: 14,
                        actual: body.len() as u64,
                    });
                }
                let id = src.get_u64();
                let alg = src.get_u16();
                let n = src.get_u32();
                if alg != csum_alg::XXH3_128 {
                    return Err(DecodeError::Invalid {
                        what: "CsumReply algorithm",
                        detail: format!("unknown algorithm {alg}"),
                    });
                }
                if n > MAX_CSUMS {
                    return Err(DecodeError::TooLong {
                        what: "CsumReply digests",
                        len: u64::from(n),
                        max: u64::from(MAX_CSUMS),
                    });
                }
                fixed(body, "CsumReply", 14 + n as usize * csum_alg::XXH3_128_LEN)?;
                let digests = (0..n).map(|_| src.get_u128()).collect();
                Frame::CsumReply { id, alg, digests }
            }
            kind::READ_REQUEST => {
                fixed(body, "ReadRequest", 20)?;
                let id = src.get_u64();
                let offset = src.get_u64();
                let length = src.get_u32();
                if length == 0 || length > MAX_READ_LEN {
                    return Err(DecodeError::Invalid {
                        what: "ReadRequest length",
                        detail: format!("{length} bytes: between 1 and {MAX_READ_LEN}"),
                    });
                }
                if offset.checked_add(u64::from(length)).is_none() {
                    return Err(DecodeError::Invalid {
                        what: "ReadRequest range",
                        detail: format!("offset {offset} + {length} overflows"),
                    });
                }
                Frame::ReadRequest { id, offset, length }
            }
            kind::READ_REPLY => {
                if body.len() < 12 {
                    return Err(DecodeError::LengthMismatch {
                        what: "ReadReply",
                        declared: 12,
                        actual: body.len() as u64,
                    });
                }
                let id = src.get_u64();
                let status = src.get_u32();
                let data = body[12..].to_vec();
                if data.len() > MAX_READ_LEN as usize {
                    return Err(DecodeError::TooLong {
                        what: "ReadReply data",
                        len: data.len() as u64,
                        max: u64::from(MAX_READ_LEN),
                    });
                }
                if status != 0 && !data.is_empty() {
                    return Err(DecodeError::Invalid {
                        what: "ReadReply",
                        detail: format!("status {status} with {} bytes of data", data.len()),
                    });
                }
                Frame::ReadReply { id, status, data }
            }
            other => {
                return Err(DecodeError::Invalid {
                    what: "frame kind",
                    detail: format!("unknown kind {other}"),
                })
            }
        };
        Ok(frame)
    }
}

/// Context string mixed into every authentication MAC, so a MAC computed
/// for some other purpose with the same secret is never accepted here.
const AUTH_CONTEXT: &[u8] = b"replblk-peer-auth-v1";

fn keyed(
    secret: &[u8],
    challenge: &[u8; CHALLENGE_LEN],
    responder: &str,
    resource: &str,
) -> Option<Hmac<Sha256>> {
    // HMAC takes keys of any length; the error case exists only for MACs
    // with fixed key sizes.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).ok()?;
    mac.update(AUTH_CONTEXT);
    mac.update(&(resource.len() as u32).to_be_bytes());
    mac.update(resource.as_bytes());
    mac.update(&(responder.len() as u32).to_be_bytes());
    mac.update(responder.as_bytes());
    mac.update(challenge);
    Some(mac)
}

/// The MAC a node named `responder` sends to prove it knows `secret`, in
/// answer to `challenge` for `resource`. Binding the responder's own name
/// means a MAC reflected back to its sender never verifies.
pub fn auth_mac(
    secret: &[u8],
    challenge: &[u8; CHALLENGE_LEN],
    responder: &str,
    resource: &str,
) -> Option<[u8; MAC_LEN]> {
    Some(
        keyed(secret, challenge, responder, resource)?
            .finalize()
            .into_bytes()
            .into(),
    )
}

/// Constant-time check of a peer's MAC.
pub fn auth_verify(
    secret: &[u8],
    challenge: &[u8; CHALLENGE_LEN],
    responder: &str,
    resource: &str,
    got: &[u8; MAC_LEN],
) -> bool {
    keyed(secret, challenge, responder, resource).is_some_and(|m| m.verify_slice(got).is_ok())
}

/// Picks the highest protocol version both ranges contain.
pub fn negotiate_version(a: (u16, u16), b: (u16, u16)) -> Option<u16> {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    (lo <= hi).then_some(hi)
}
