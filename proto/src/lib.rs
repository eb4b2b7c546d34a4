//! Wire formats for replblk, and nothing else.
//!
//! This crate owns the byte layout of every message replblk sends or
//! receives: the NBD handshake and transmission structures (`nbd`), and
//! later the replication frames exchanged between peers. It has no
//! networking code, reads no clock and spawns nothing: every function takes
//! bytes and returns values (or the other way round), so each decoder can be
//! property-tested and fuzzed in isolation.
//!
//! Conventions, shared by every type here:
//! - `encode(&self, &mut BytesMut)` appends the wire form.
//! - `decode(&mut Cursor<&[u8]>) -> Result<Option<T>, DecodeError>` reads one
//!   value from the cursor. `Ok(None)` means "not enough bytes yet"; the
//!   cursor is then left where it was, so the caller can read more and retry.
//!   `Err` means the bytes can never become a valid value.

pub mod nbd;
pub mod repl;

/// CRC-32C (Castagnoli), the checksum of every `Write` payload and of
/// the on-disk metadata blocks. Computed with carry-less multiplication
/// where the CPU has it (about four times the speed of the `crc32`
/// instruction on a 1 MiB payload here), in software elsewhere.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

use thiserror::Error;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("bad magic: expected {expected:#x}, got {got:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("{what} is {len} bytes, more than the limit of {max}")]
    TooLong {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("{what}: declared length {declared} does not match the {actual} bytes present")]
    LengthMismatch {
        what: &'static str,
        declared: u64,
        actual: u64,
    },
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
}
