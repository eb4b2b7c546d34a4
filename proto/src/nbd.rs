//! The NBD protocol's wire structures: fixed-newstyle handshake, option
//! haggling and the transmission phase with simple replies.
//!
//! Layouts follow `doc/proto.md` of the NBD project. All integers are
//! big-endian. Only what a server and a test client need is here; structured
//! replies and extended headers are not negotiated by replblk.

use std::io::Cursor;

use bytes::{Buf, BufMut, BytesMut};

use crate::DecodeError;

/// "NBDMAGIC": first eight bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle marker in the greeting and in every option header.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic at the start of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic at the start of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic at the start of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING: usize = 4096;

/// Handshake flags sent by the server in the greeting.
pub mod handshake_flags {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Flags the client sends right after the greeting.
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
    pub const KNOWN: u32 = FIXED_NEWSTYLE | NO_ZEROES;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const PEEK_EXPORT: u32 = 4;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`). Errors have the top bit set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types inside `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), sent with the export size.
pub mod tflags {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    pub const RESIZE: u16 = 8;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Error values carried in replies (`NBD_E*`).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Returns `Ok(None)` from the enclosing decoder when fewer than `n` bytes
/// remain, leaving the cursor untouched.
macro_rules! need {
    ($cur:expr, $n:expr) => {
        if $cur.remaining() < $n {
            return Ok(None);
        }
    };
}

fn string_from(bytes: &[u8], what: &'static str) -> Result<String, DecodeError> {
    if bytes.len() > MAX_STRING {
        return Err(DecodeError::TooLong {
            what,
            len: bytes.len() as u64,
            max: MAX_STRING as u64,
        });
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::NotUtf8(what))
}

/// The server's opening: magic, `IHAVEOPT` and the handshake flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerGreeting {
    pub flags: u16,
}

impl ServerGreeting {
    pub const LEN: usize = 18;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(NBDMAGIC);
        dst.put_u64(IHAVEOPT);
        dst.put_u16(self.flags);
    }

    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        need!(src, Self::LEN);
        let magic = src.get_u64();
        if magic != NBDMAGIC {
            return Err(DecodeError::BadMagic {
                expected: NBDMAGIC,
                got: magic,
            });
        }
        let opt_magic = src.get_u64();
        if opt_magic != IHAVEOPT {
            return Err(DecodeError::BadMagic {
                expected: IHAVEOPT,
                got: opt_magic,
            });
        }
        Ok(Some(ServerGreeting {
            flags: src.get_u16(),
        }))
    }
}

/// The client's flags, sent once after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags(pub u32);

impl ClientFlags {
    pub const LEN: usize = 4;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(self.0);
    }

    /// Unknown bits are an error: the spec requires the server to
    /// disconnect rather than guess what the client meant.
    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        need!(src, Self::LEN);
        let flags = src.get_u32();
        if flags & !client_flags::KNOWN != 0 {
            return Err(DecodeError::Invalid {
                what: "client flags",
                detail: format!("unknown bits {:#x}", flags & !client_flags::KNOWN),
            });
        }
        Ok(Some(ClientFlags(flags)))
    }

    pub fn no_zeroes(&self) -> bool {
        self.0 & client_flags::NO_ZEROES != 0
    }
}

/// The fixed part of a client option: `IHAVEOPT`, option code, data length.
/// The data follows and is read separately once its length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(IHAVEOPT);
        dst.put_u32(self.option);
        dst.put_u32(self.length);
    }

    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        need!(src, Self::LEN);
        let magic = src.get_u64();
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic {
                expected: IHAVEOPT,
                got: magic,
            });
        }
        Ok(Some(OptionHeader {
            option: src.get_u32(),
            length: src.get_u32(),
        }))
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the list
/// of information items the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(self.name.len() as u32);
        dst.put_slice(self.name.as_bytes());
        dst.put_u16(self.requests.len() as u16);
        for r in &self.requests {
            dst.put_u16(*r);
        }
    }

    /// Decodes the complete option data (its length came in the header), so
    /// a short or over-long body is an error, not "incomplete".
    pub fn decode_data(data: &[u8]) -> Result<Self, DecodeError> {
        let mut src = Cursor::new(data);
        if src.remaining() < 4 {
            return Err(DecodeError::LengthMismatch {
                what: "NBD_OPT_GO/INFO data",
                declared: 4,
                actual: data.len() as u64,
            });
        }
        let name_len = src.get_u32() as usize;
        if name_len > MAX_STRING {
            return Err(DecodeError::TooLong {
                what: "export name",
                len: name_len as u64,
                max: MAX_STRING as u64,
            });
        }
        if src.remaining() < name_len + 2 {
            return Err(DecodeError::LengthMismatch {
                what: "NBD_OPT_GO/INFO export name",
                declared: name_len as u64,
                actual: src.remaining().saturating_sub(2) as u64,
            });
        }
        let start = src.position() as usize;
        let name = string_from(&data[start..start + name_len], "export name")?;
        src.advance(name_len);
        let count = src.get_u16() as usize;
        if src.remaining() != count * 2 {
            return Err(DecodeError::LengthMismatch {
                what: "NBD_OPT_GO/INFO information requests",
                declared: (count * 2) as u64,
                actual: src.remaining() as u64,
            });
        }
        let requests = (0..count).map(|_| src.get_u16()).collect();
        Ok(InfoRequest { name, requests })
    }
}

/// The data of `NBD_OPT_EXPORT_NAME`: the whole option data is the name.
pub fn decode_export_name(data: &[u8]) -> Result<String, DecodeError> {
    string_from(data, "export name")
}

/// Header of a server reply to an option; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub const LEN: usize = 20;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u64(OPTION_REPLY_MAGIC);
        dst.put_u32(self.option);
        dst.put_u32(self.reply_type);
        dst.put_u32(self.length);
    }

    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        need!(src, Self::LEN);
        let magic = src.get_u64();
        if magic != OPTION_REPLY_MAGIC {
            return Err(DecodeError::BadMagic {
                expected: OPTION_REPLY_MAGIC,
                got: magic,
            });
        }
        Ok(Some(OptionReplyHeader {
            option: src.get_u32(),
            reply_type: src.get_u32(),
            length: src.get_u32(),
        }))
    }

    pub fn is_error(&self) -> bool {
        self.reply_type & rep::ERR_BIT != 0
    }
}

/// Appends a whole option reply (header and data).
pub fn encode_option_reply(dst: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    OptionReplyHeader {
        option,
        reply_type,
        length: data.len() as u32,
    }
    .encode(dst);
    dst.put_slice(data);
}

/// The data of an `NBD_REP_SERVER` reply to `NBD_OPT_LIST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerEntry {
    pub name: String,
    pub description: String,
}

impl ServerEntry {
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(self.name.len() as u32);
        dst.put_slice(self.name.as_bytes());
        dst.put_slice(self.description.as_bytes());
    }

    pub fn decode_data(data: &[u8]) -> Result<Self, DecodeError> {
        if data.len() < 4 {
            return Err(DecodeError::LengthMismatch {
                what: "NBD_REP_SERVER data",
                declared: 4,
                actual: data.len() as u64,
            });
        }
        let mut src = Cursor::new(data);
        let name_len = src.get_u32() as usize;
        if name_len > data.len() - 4 {
            return Err(DecodeError::LengthMismatch {
                what: "NBD_REP_SERVER name",
                declared: name_len as u64,
                actual: (data.len() - 4) as u64,
            });
        }
        Ok(ServerEntry {
            name: string_from(&data[4..4 + name_len], "export name")?,
            description: string_from(&data[4 + name_len..], "export description")?,
        })
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An information type this crate does not know; clients must ignore it.
    Unknown {
        kind: u16,
        data: Vec<u8>,
    },
}

impl InfoReply {
    pub fn encode(&self, dst: &mut BytesMut) {
        match self {
            InfoReply::Export { size, flags } => {
                dst.put_u16(info::EXPORT);
                dst.put_u64(*size);
                dst.put_u16(*flags);
            }
            InfoReply::Name(name) => {
                dst.put_u16(info::NAME);
                dst.put_slice(name.as_bytes());
            }
            InfoReply::Description(text) => {
                dst.put_u16(info::DESCRIPTION);
                dst.put_slice(text.as_bytes());
            }
            InfoReply::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                dst.put_u16(info::BLOCK_SIZE);
                dst.put_u32(*minimum);
                dst.put_u32(*preferred);
                dst.put_u32(*maximum);
            }
            InfoReply::Unknown { kind, data } => {
                dst.put_u16(*kind);
                dst.put_slice(data);
            }
        }
    }

    pub fn decode_data(data: &[u8]) -> Result<Self, DecodeError> {
        let bad_len = |expected: usize| DecodeError::LengthMismatch {
            what: "NBD_REP_INFO data",
            declared: expected as u64,
            actual: data.len() as u64,
        };
        if data.len() < 2 {
            return Err(bad_len(2));
        }
        let mut src = Cursor::new(data);
        let kind = src.get_u16();
        Ok(match kind {
            info::EXPORT => {
                if data.len() != 12 {
                    return Err(bad_len(12));
                }
                InfoReply::Export {
                    size: src.get_u64(),
                    flags: src.get_u16(),
                }
            }
            info::NAME => InfoReply::Name(string_from(&data[2..], "export name")?),
            info::DESCRIPTION => {
                InfoReply::Description(string_from(&data[2..], "export description")?)
            }
            info::BLOCK_SIZE => {
                if data.len() != 14 {
                    return Err(bad_len(14));
                }
                InfoReply::BlockSize {
                    minimum: src.get_u32(),
                    preferred: src.get_u32(),
                    maximum: src.get_u32(),
                }
            }
            kind => InfoReply::Unknown {
                kind,
                data: data[2..].to_vec(),
            },
        })
    }
}

/// The server's answer to `NBD_OPT_EXPORT_NAME`: size, transmission flags and
/// (unless the client set `NO_ZEROES`) 124 bytes of zeroes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportNameReply {
    pub size: u64,
    pub flags: u16,
}

impl ExportNameReply {
    pub const LEN: usize = 10;
    pub const ZEROES: usize = 124;

    pub fn encode(&self, dst: &mut BytesMut, no_zeroes: bool) {
        dst.put_u64(self.size);
        dst.put_u16(self.flags);
        if !no_zeroes {
            dst.put_bytes(0, Self::ZEROES);
        }
    }

    pub fn decode(src: &mut Cursor<&[u8]>, no_zeroes: bool) -> Result<Option<Self>, DecodeError> {
        let len = if no_zeroes {
            Self::LEN
        } else {
            Self::LEN + Self::ZEROES
        };
        need!(src, len);
        let reply = ExportNameReply {
            size: src.get_u64(),
            flags: src.get_u16(),
        };
        if !no_zeroes {
            src.advance(Self::ZEROES);
        }
        Ok(Some(reply))
    }
}

/// The command of a request, with unknown codes kept so the server can
/// answer `EINVAL` instead of guessing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    Other(u16),
}

impl Command {
    pub fn from_wire(code: u16) -> Self {
        match code {
            cmd::READ => Command::Read,
            cmd::WRITE => Command::Write,
            cmd::DISC => Command::Disc,
            cmd::FLUSH => Command::Flush,
            cmd::TRIM => Command::Trim,
            cmd::CACHE => Command::Cache,
            cmd::WRITE_ZEROES => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => cmd::READ,
            Command::Write => cmd::WRITE,
            Command::Disc => cmd::DISC,
            Command::Flush => cmd::FLUSH,
            Command::Trim => cmd::TRIM,
            Command::Cache => cmd::CACHE,
            Command::WriteZeroes => cmd::WRITE_ZEROES,
            Command::Other(code) => code,
        }
    }

    /// Flags documented as applicable to this command; any other flag is
    /// answered with `EINVAL`.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Command::Write => cmd_flags::FUA,
            Command::Trim => cmd_flags::FUA,
            Command::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE,
            Command::Read | Command::Disc | Command::Flush | Command::Cache => 0,
            Command::Other(_) => 0,
        }
    }
}

/// A transmission-phase request header. For `Write`, `length` bytes of
/// payload follow on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub const LEN: usize = 28;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_u32(REQUEST_MAGIC);
        dst.put_u16(self.flags);
        dst.put_u16(self.command.to_wire());
        dst.put_u64(self.cookie);
        dst.put_u64(self.offset);
        dst.put_u32(self.length);
    }

    /// Decodes the header only. A wrong magic is fatal for the connection
    /// (the stream can no longer be parsed); unknown commands and flags are
    /// not errors here, the server answers them with `EINVAL`.
    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        need!(src, Self::LEN);
        let magic = src.get_u32();
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic {
                expected: REQUEST_MAGIC as u64,
                got: magic as u64,
            });
        }
        Ok(Some(Request {
            flags: src.get_u16(),
            command: Command::from_wire(src.get_u16()),
            cookie: src.get_u64(),
            offset: src.get_u64(),
            length: src.get_u32(),
        }))
    }

    /// Flags set on this request that its command does not accept.
    pub fn unexpected_flags(&self) -> u16 {
        self.flags & !self.command.allowed_flags()
    }

    pub fn fua(&self) -> bool {
        self.flags & cmd_flags::FUA != 0
    }

    pub fn no_hole(&self) -> bool {
        self.flags & cmd_flags::NO_HOLE != 0
    }
}

/// A simple reply header. For a successful `Read`, the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub const LEN: usize = 16;

    pub fn encode(&self, dst: &mut BytesMut) {
        dst.put_slice(&self.to_bytes());
    }

    /// The header as a fixed array, for servers that write it in place in
    /// front of read data.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }

    pub fn decode(src: &mut Cursor<&[u8]>) -> Result<Option<Self>, DecodeError> {
        need!(src, Self::LEN);
        let magic = src.get_u32();
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(DecodeError::BadMagic {
                expected: SIMPLE_REPLY_MAGIC as u64,
                got: magic as u64,
            });
        }
        Ok(Some(SimpleReply {
            error: src.get_u32(),
            cookie: src.get_u64(),
        }))
    }
}
