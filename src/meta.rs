//! Crash-safe per-resource metadata on disk, in the spirit of DRBD's
//! meta-data: generation identifiers, persistent flags, the out-of-sync
//! bitmap and the activity log.
//!
//! # Where the metadata lives
//!
//! *External* metadata sits at offset 0 of a separate file or block
//! device, which must already exist and be large enough (nothing here
//! creates or grows files). *Internal* metadata sits at the end of the
//! backing device itself, and the usable data size shrinks accordingly.
//!
//! # The metadata area
//!
//! All offsets are relative to the start of the area and 4 KiB aligned:
//!
//! | offset                  | length       | contents                        |
//! |-------------------------|--------------|---------------------------------|
//! | 0                       | 4096         | superblock slot A               |
//! | 4096                    | 4096         | superblock slot B               |
//! | `bitmap_offset` (8192)  | `bitmap_len` | dirty bitmap                    |
//! | `al_offset`             | `al_len`     | activity log (`AL_LEN`, 128 KiB)|
//!
//! The bitmap has one bit per `granularity` bytes (a power of two, at
//! least 4096) of the usable data size, rounded up to whole 4 KiB
//! blocks. Bit `b` is bit `b % 8` of byte `b / 8` (the byte order of
//! little-endian `u64` words). The bitmap is written lazily while the
//! resource is up (pages that changed, about once a second and before an
//! activity-log extent leaves the hot set) and in full at clean shutdown.
//! The activity log is a ring of 32 blocks of 4 KiB holding transactions
//! (`crate::core::actlog` documents their format); it is zeroed on
//! creation and again each time the resource comes up, once what it held
//! has been merged into the bitmap on disk.
//!
//! ## Internal placement
//!
//! For a backing device of `L` bytes, only the whole 4 KiB blocks count
//! (`L4 = floor(L / 4096) * 4096`; a partial tail block is never used).
//! The usable size `U` is the largest multiple of 4096 such that
//! `U + 8192 + bitmap(U at 4 KiB granularity) + AL_LEN <= L4`, the area
//! starts at `md_start = U` and runs to `L4`, and the activity log takes
//! its last `AL_LEN` bytes. The bitmap space is always reserved as for a
//! 4 KiB granularity, so `md_start` depends on `L` alone: `open` and
//! `inspect` find the slots at the position computed for the current
//! length, and from then on every offset comes from the superblock, not
//! from `L`. A consequence is that internal metadata does not survive
//! resizing the backing device: after a resize the slots are looked for
//! at a different place, and `open` reports no metadata there.
//!
//! # The superblock
//!
//! Two copies alternate between slot A and slot B. Each write goes to the
//! slot not holding the newest valid copy, with a sequence number one
//! higher, followed by `fdatasync`; a torn write therefore leaves the
//! previous copy intact, and on open the valid slot with the highest
//! sequence number wins (ties go to slot A). One 4096-byte block,
//! little-endian, unused bytes zero:
//!
//! | offset | size | field                                                  |
//! |--------|------|--------------------------------------------------------|
//! | 0      | 8    | magic `b"RBLKMETA"`                                    |
//! | 8      | 4    | format version, u32 = 2 (1 is read, see below)         |
//! | 12     | 4    | flags, u32 (`crate::core::flags`; unknown bits invalid)|
//! | 16     | 8    | sequence number, u64 (≥ 1)                             |
//! | 24     | 8    | usable data size in bytes, u64                         |
//! | 32     | 8    | `gens.current`, u64                                    |
//! | 40     | 8    | `gens.bitmap`, u64                                     |
//! | 48     | 16   | `gens.history[0..2]`, u64 each, newest first           |
//! | 64     | 4    | bitmap granularity in bytes, u32                       |
//! | 68     | 1    | layout: 1 = internal, 0 = external                     |
//! | 69     | 3    | reserved, zero                                         |
//! | 72     | 8    | `bitmap_offset`, u64                                   |
//! | 80     | 8    | `bitmap_len`, u64                                      |
//! | 88     | 8    | `al_offset`, u64                                       |
//! | 96     | 8    | `al_len`, u64                                          |
//! | 104    | 1    | node name length, 0..=64                               |
//! | 105    | 64   | node name, UTF-8, zero padded                          |
//! | 169    | 1    | resource name length, 1..=64                           |
//! | 170    | 64   | resource name, UTF-8, zero padded                      |
//! | 234    | 3858 | reserved, zero                                         |
//! | 4092   | 4    | crc32c of bytes 0..4092                                |
//!
//! Changing `crate::core::HISTORY` changes this layout and needs a new
//! format version.
//!
//! # Format versions
//!
//! Version 2 has the layout of version 1 and adds the flag
//! `ACTIVITY_LOG` (bit 9): the bitmap on disk and the activity log are
//! kept up to date while the resource is up, so after a crash only they
//! are out of sync. Version 1 metadata (bitmap written at clean shutdown
//! only, activity log unused) is read as it is: a crash it recorded
//! still marks every block, and the next superblock written is version
//! 2. Builds that know only version 1 refuse version 2 metadata
//! ("unsupported format version 2").

use crate::core::le::{get_u32, get_u64, put_u32, put_u64};
use crate::faults::Op;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::core::{flags, Generations, HISTORY, UUID_JUST_CREATED};

/// Bytes in a superblock slot, and the alignment of everything else.
pub const BLOCK: u64 = 4096;
/// Bytes in a superblock.
pub const SUPERBLOCK_SIZE: usize = BLOCK as usize;
pub const MAGIC: &[u8; 8] = b"RBLKMETA";
pub const VERSION: u32 = 2;
/// The oldest format version this build reads (and upgrades).
pub const OLDEST_VERSION: u32 = 1;
/// Longest node or resource name the superblock holds, in bytes.
pub const MAX_NAME: usize = 64;
/// Default (and smallest) bitmap granularity: bytes per bit.
pub const DEFAULT_GRANULARITY: u32 = 4096;
/// Where the bitmap starts: right after the two superblock slots.
pub const BITMAP_OFFSET: u64 = 2 * BLOCK;
/// 4 KiB blocks reserved for the activity log.
pub const AL_BLOCKS: u64 = 32;
/// Bytes reserved for the activity log.
pub const AL_LEN: u64 = AL_BLOCKS * BLOCK;
/// The smallest usable data size accepted: one block.
pub const MIN_DATA: u64 = BLOCK;

// Field offsets within the superblock.
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_SEQ: usize = 16;
const OFF_DATA_SIZE: usize = 24;
const OFF_GEN_CURRENT: usize = 32;
const OFF_GEN_BITMAP: usize = 40;
const OFF_GEN_HISTORY: usize = 48;
const OFF_GRANULARITY: usize = 64;
const OFF_LAYOUT: usize = 68;
const OFF_BITMAP_OFFSET: usize = 72;
const OFF_BITMAP_LEN: usize = 80;
const OFF_AL_OFFSET: usize = 88;
const OFF_AL_LEN: usize = 96;
const OFF_NODE: usize = 104;
const OFF_RESOURCE: usize = OFF_NODE + 1 + MAX_NAME;
const OFF_CRC: usize = SUPERBLOCK_SIZE - 4;

const _: () = assert!(
    HISTORY == 2,
    "superblock format 1 holds exactly two history UUIDs"
);
const _: () = assert!(OFF_GEN_HISTORY + 8 * HISTORY == OFF_GRANULARITY);
const _: () = assert!(OFF_RESOURCE + 1 + MAX_NAME <= OFF_CRC);

/// Zero-fill chunk used when initialising the metadata area.
const ZERO_CHUNK: u64 = 1 << 20;

/// Where a resource keeps its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// At the end of the backing device.
    Internal,
    /// At offset 0 of this file or block device.
    External(PathBuf),
}

/// The decoded contents of one superblock slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub seq: u64,
    pub node: String,
    pub resource: String,
    /// Usable data bytes.
    pub data_size: u64,
    pub gens: Generations,
    pub flags: u32,
    /// Data bytes per bitmap bit.
    pub granularity: u32,
    /// Relative to the start of the metadata area.
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    /// Relative to the start of the metadata area.
    pub al_offset: u64,
    pub al_len: u64,
    pub internal: bool,
}

#[derive(Debug, Error)]
pub enum MetaError {
    #[error("metadata on {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("no replblk metadata on {path} (run `replctl create-md {resource}`)")]
    NoMetadata { path: String, resource: String },
    #[error("metadata on {path} is corrupt in both slots: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("metadata on {path} belongs to resource {found:?}, not {expected:?}")]
    WrongResource {
        path: String,
        found: String,
        expected: String,
    },
    #[error(
        "metadata on {path} belongs to node {found:?}, not {expected:?} (is this the peer's disk?)"
    )]
    WrongNode {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{path} is {actual} bytes, too small for {what}: at least {needed} bytes are needed")]
    TooSmall {
        path: String,
        actual: u64,
        needed: u64,
        what: String,
    },
    #[error("valid metadata already on {path} (seq {seq}); use --force to overwrite")]
    Exists { path: String, seq: u64 },
    #[error("data device {path} now has {actual} usable bytes but its metadata records {recorded}; resizing is not supported")]
    SizeChanged {
        path: String,
        recorded: u64,
        actual: u64,
    },
    #[error("metadata on {path}: {detail}")]
    Invalid { path: String, detail: String },
}

/// The computed layout of a metadata area.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Usable data bytes (a multiple of 4096).
    pub data_size: u64,
    /// Absolute byte offset of the area in the metadata file or device.
    pub md_start: u64,
    /// Bytes in the area.
    pub md_len: u64,
    pub granularity: u32,
    /// Relative to `md_start`, like the other offsets.
    pub bitmap_offset: u64,
    pub bitmap_len: u64,
    pub al_offset: u64,
    pub al_len: u64,
    pub internal: bool,
}

impl Plan {
    /// The layout a superblock describes, for an area at `md_start`.
    fn of(sb: &Superblock, md_start: u64) -> Plan {
        Plan {
            data_size: sb.data_size,
            md_start,
            md_len: area_end(sb).unwrap_or(u64::MAX),
            granularity: sb.granularity,
            bitmap_offset: sb.bitmap_offset,
            bitmap_len: sb.bitmap_len,
            al_offset: sb.al_offset,
            al_len: sb.al_len,
            internal: sb.internal,
        }
    }

    fn same_layout(&self, sb: &Superblock) -> bool {
        self.data_size == sb.data_size
            && self.granularity == sb.granularity
            && self.bitmap_offset == sb.bitmap_offset
            && self.bitmap_len == sb.bitmap_len
            && self.al_offset == sb.al_offset
            && self.al_len == sb.al_len
            && self.internal == sb.internal
    }
}

/// Bitmap bytes covering `data_size` at `granularity`, in whole blocks.
fn bitmap_bytes(data_size: u64, granularity: u64) -> u64 {
    data_size
        .div_ceil(granularity)
        .div_ceil(8)
        .div_ceil(BLOCK)
        .saturating_mul(BLOCK)
}

fn check_granularity(granularity: u32) -> Result<(), String> {
    if granularity.is_power_of_two() && u64::from(granularity) >= BLOCK {
        Ok(())
    } else {
        Err(format!(
            "bitmap granularity {granularity} is not a power of two of at least 4096"
        ))
    }
}

/// Computes the metadata layout for a backing store of `backing_len`
/// bytes: the data device itself for internal metadata, the data device
/// the external metadata describes otherwise.
pub fn plan(location: &Location, backing_len: u64, granularity: u32) -> Result<Plan, MetaError> {
    plan_for("the backing device", location, backing_len, granularity)
}

/// `plan`, naming the backing store `label` in errors.
fn plan_for(
    label: &str,
    location: &Location,
    backing_len: u64,
    granularity: u32,
) -> Result<Plan, MetaError> {
    check_granularity(granularity).map_err(|detail| MetaError::Invalid {
        path: label.to_string(),
        detail,
    })?;
    let gran = u64::from(granularity);
    let whole = backing_len / BLOCK * BLOCK;
    match location {
        Location::Internal => {
            let fixed = BITMAP_OFFSET + AL_LEN;
            // Two superblocks, one bitmap block, the AL and one data block.
            let needed = fixed + BLOCK + MIN_DATA;
            if whole < needed {
                return Err(MetaError::TooSmall {
                    path: label.to_string(),
                    actual: backing_len,
                    needed,
                    what: format!(
                        "internal metadata (two 4 KiB superblocks, the bitmap, a {} KiB activity log) and at least {MIN_DATA} bytes of data",
                        AL_LEN / 1024
                    ),
                });
            }
            // Find the largest U with U + bitmap(U) <= room. Starting from
            // the bitmap for all of `room` is safe (the bitmap only shrinks
            // with U); then grow while the next block still fits, which
            // takes few steps since one bitmap block covers 128 MiB.
            let room = whole - fixed;
            let reserve = |u: u64| bitmap_bytes(u, BLOCK);
            let mut data = room - reserve(room);
            while data + BLOCK + reserve(data + BLOCK) <= room {
                data += BLOCK;
            }
            let md_len = whole - data;
            Ok(Plan {
                data_size: data,
                md_start: data,
                md_len,
                granularity,
                bitmap_offset: BITMAP_OFFSET,
                bitmap_len: bitmap_bytes(data, gran),
                al_offset: md_len - AL_LEN,
                al_len: AL_LEN,
                internal: true,
            })
        }
        Location::External(_) => {
            if whole < MIN_DATA {
                return Err(MetaError::TooSmall {
                    path: label.to_string(),
                    actual: backing_len,
                    needed: MIN_DATA,
                    what: "replicated data".to_string(),
                });
            }
            let bitmap_len = bitmap_bytes(whole, gran);
            let al_offset = BITMAP_OFFSET + bitmap_len;
            Ok(Plan {
                data_size: whole,
                md_start: 0,
                md_len: al_offset + AL_LEN,
                granularity,
                bitmap_offset: BITMAP_OFFSET,
                bitmap_len,
                al_offset,
                al_len: AL_LEN,
                internal: false,
            })
        }
    }
}

/// The longest prefix of `s` of at most `MAX_NAME` bytes that ends on a
/// character boundary.
fn clamp_name(s: &str) -> &str {
    let mut end = s.len().min(MAX_NAME);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_name(buf: &mut [u8], off: usize, name: &str) {
    let name = clamp_name(name).as_bytes();
    buf[off] = name.len() as u8;
    buf[off + 1..off + 1 + name.len()].copy_from_slice(name);
}

fn get_name(buf: &[u8], off: usize, what: &str) -> Result<String, String> {
    let len = usize::from(buf[off]);
    if len > MAX_NAME {
        return Err(format!("{what} name length {len} exceeds {MAX_NAME}"));
    }
    std::str::from_utf8(&buf[off + 1..off + 1 + len])
        .map(str::to_string)
        .map_err(|_| format!("{what} name is not UTF-8"))
}

/// Encodes a superblock. Names longer than `MAX_NAME` bytes are cut
/// short; `MetaStore` refuses them before they get here.
pub fn encode(sb: &Superblock) -> [u8; SUPERBLOCK_SIZE] {
    let mut buf = [0u8; SUPERBLOCK_SIZE];
    buf[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(MAGIC);
    put_u32(&mut buf, OFF_VERSION, VERSION);
    put_u32(&mut buf, OFF_FLAGS, sb.flags);
    put_u64(&mut buf, OFF_SEQ, sb.seq);
    put_u64(&mut buf, OFF_DATA_SIZE, sb.data_size);
    put_u64(&mut buf, OFF_GEN_CURRENT, sb.gens.current);
    put_u64(&mut buf, OFF_GEN_BITMAP, sb.gens.bitmap);
    for (i, h) in sb.gens.history.iter().enumerate() {
        put_u64(&mut buf, OFF_GEN_HISTORY + 8 * i, *h);
    }
    put_u32(&mut buf, OFF_GRANULARITY, sb.granularity);
    buf[OFF_LAYOUT] = u8::from(sb.internal);
    put_u64(&mut buf, OFF_BITMAP_OFFSET, sb.bitmap_offset);
    put_u64(&mut buf, OFF_BITMAP_LEN, sb.bitmap_len);
    put_u64(&mut buf, OFF_AL_OFFSET, sb.al_offset);
    put_u64(&mut buf, OFF_AL_LEN, sb.al_len);
    put_name(&mut buf, OFF_NODE, &sb.node);
    put_name(&mut buf, OFF_RESOURCE, &sb.resource);
    let crc = replblk_proto::crc32c(&buf[..OFF_CRC]);
    put_u32(&mut buf, OFF_CRC, crc);
    buf
}

/// Decodes and validates one superblock slot on its own: magic, version,
/// checksum, flags, names and the internal consistency of the layout.
/// Whether the layout fits the device is checked by the callers.
pub fn decode(buf: &[u8]) -> Result<Superblock, String> {
    if buf.len() < SUPERBLOCK_SIZE {
        return Err(format!(
            "short superblock ({} of {SUPERBLOCK_SIZE} bytes)",
            buf.len()
        ));
    }
    let buf = &buf[..SUPERBLOCK_SIZE];
    if &buf[OFF_MAGIC..OFF_MAGIC + 8] != MAGIC {
        return Err("bad magic (no superblock)".to_string());
    }
    let version = get_u32(buf, OFF_VERSION);
    if !(OLDEST_VERSION..=VERSION).contains(&version) {
        return Err(format!(
            "unsupported format version {version} (this build reads {OLDEST_VERSION} to {VERSION})"
        ));
    }
    let stored = get_u32(buf, OFF_CRC);
    let computed = replblk_proto::crc32c(&buf[..OFF_CRC]);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let flag_bits = get_u32(buf, OFF_FLAGS);
    let known = if version == 1 {
        flags::KNOWN & !flags::ACTIVITY_LOG
    } else {
        flags::KNOWN
    };
    if flag_bits & !known != 0 {
        return Err(format!("unknown flag bits {:#x}", flag_bits & !known));
    }
    let internal = match buf[OFF_LAYOUT] {
        0 => false,
        1 => true,
        other => return Err(format!("bad layout byte {other}")),
    };
    let mut history = [0u64; HISTORY];
    for (i, h) in history.iter_mut().enumerate() {
        *h = get_u64(buf, OFF_GEN_HISTORY + 8 * i);
    }
    let sb = Superblock {
        seq: get_u64(buf, OFF_SEQ),
        node: get_name(buf, OFF_NODE, "node")?,
        resource: get_name(buf, OFF_RESOURCE, "resource")?,
        data_size: get_u64(buf, OFF_DATA_SIZE),
        gens: Generations {
            current: get_u64(buf, OFF_GEN_CURRENT),
            bitmap: get_u64(buf, OFF_GEN_BITMAP),
            history,
        },
        flags: flag_bits,
        granularity: get_u32(buf, OFF_GRANULARITY),
        bitmap_offset: get_u64(buf, OFF_BITMAP_OFFSET),
        bitmap_len: get_u64(buf, OFF_BITMAP_LEN),
        al_offset: get_u64(buf, OFF_AL_OFFSET),
        al_len: get_u64(buf, OFF_AL_LEN),
        internal,
    };
    if sb.seq == 0 {
        return Err("sequence number 0".to_string());
    }
    if sb.resource.is_empty() {
        return Err("empty resource name".to_string());
    }
    check_layout(&sb)?;
    Ok(sb)
}

/// The end of the metadata area a superblock describes, relative to its
/// start; `None` on overflow.
fn area_end(sb: &Superblock) -> Option<u64> {
    let bitmap_end = sb.bitmap_offset.checked_add(sb.bitmap_len)?;
    let al_end = sb.al_offset.checked_add(sb.al_len)?;
    Some(bitmap_end.max(al_end))
}

fn aligned(v: u64) -> bool {
    v & (BLOCK - 1) == 0
}

/// Checks that the offsets in a superblock make sense on their own.
fn check_layout(sb: &Superblock) -> Result<(), String> {
    check_granularity(sb.granularity)?;
    if sb.data_size < MIN_DATA || !aligned(sb.data_size) {
        return Err(format!(
            "data size {} is not a positive multiple of 4096",
            sb.data_size
        ));
    }
    let aligned = [sb.bitmap_offset, sb.bitmap_len, sb.al_offset, sb.al_len]
        .iter()
        .all(|&v| aligned(v));
    if !aligned {
        return Err("bitmap or activity-log offsets are not 4 KiB aligned".to_string());
    }
    if sb.bitmap_offset < BITMAP_OFFSET {
        return Err(format!(
            "bitmap offset {} overlaps the superblock slots",
            sb.bitmap_offset
        ));
    }
    let needed = bitmap_bytes(sb.data_size, u64::from(sb.granularity));
    if sb.bitmap_len < needed {
        return Err(format!(
            "bitmap of {} bytes cannot cover {} bytes at granularity {} ({needed} needed)",
            sb.bitmap_len, sb.data_size, sb.granularity
        ));
    }
    let Some(bitmap_end) = sb.bitmap_offset.checked_add(sb.bitmap_len) else {
        return Err("bitmap area overflows".to_string());
    };
    if sb.al_offset < bitmap_end {
        return Err(format!(
            "activity log at {} overlaps the bitmap ending at {bitmap_end}",
            sb.al_offset
        ));
    }
    if sb.al_offset.checked_add(sb.al_len).is_none() {
        return Err("activity-log area overflows".to_string());
    }
    // The ring must hold the largest hot set a config may ask for
    // (`al_extents` is checked against `AL_BLOCKS`): a smaller area would
    // make the log's table larger than its ring can describe.
    if sb.al_len < AL_LEN {
        return Err(format!(
            "activity-log area of {} bytes is smaller than the {AL_LEN} bytes of the format",
            sb.al_len
        ));
    }
    Ok(())
}

/// Checks a superblock against where it was found: the configured
/// layout, and whether its areas fit the metadata device of `md_dev_len`
/// bytes (and for internal metadata, stay clear of the data).
fn check_placement(
    sb: &Superblock,
    internal: bool,
    md_start: u64,
    md_dev_len: u64,
) -> Result<(), String> {
    if sb.internal != internal {
        return Err(if sb.internal {
            "superblock describes internal metadata but external was configured".to_string()
        } else {
            "superblock describes external metadata but internal was configured".to_string()
        });
    }
    match area_end(sb).and_then(|e| e.checked_add(md_start)) {
        Some(end) if end <= md_dev_len => {}
        _ => {
            return Err(format!(
                "metadata area runs past the end of the device ({md_dev_len} bytes)"
            ))
        }
    }
    if internal && sb.data_size > md_start {
        return Err(format!(
            "data size {} overlaps the metadata at {md_start}",
            sb.data_size
        ));
    }
    Ok(())
}

/// Refuses names the superblock cannot hold.
fn check_names(node: &str, resource: &str) -> Result<(), String> {
    for (what, name) in [("node", node), ("resource", resource)] {
        if name.len() > MAX_NAME {
            return Err(format!(
                "{what} name {name:?} is longer than {MAX_NAME} bytes"
            ));
        }
    }
    if resource.is_empty() {
        return Err("the resource name is empty".to_string());
    }
    Ok(())
}

/// What `dump-md` shows: both slots as read, and which one is in use.
/// As JSON each slot is `{"Ok": {superblock}}` or `{"Err": "reason"}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inspection {
    pub md_path: String,
    pub md_start: u64,
    /// Slot A, slot B: the superblock, or why it is not valid.
    pub slots: [Result<Superblock, String>; 2],
    /// The slot `open` would use (the valid one with the highest seq).
    pub active: Option<usize>,
}

fn slot_name(i: usize) -> char {
    if i == 0 {
        'A'
    } else {
        'B'
    }
}

/// Slot A and slot B: each a valid superblock or why it is not one.
type Slots = [Result<Superblock, String>; 2];

/// The valid slot with the highest seq; ties go to slot A.
fn pick(slots: &Slots) -> Option<usize> {
    match (&slots[0], &slots[1]) {
        (Ok(a), Ok(b)) => Some(if b.seq > a.seq { 1 } else { 0 }),
        (Ok(_), Err(_)) => Some(0),
        (Err(_), Ok(_)) => Some(1),
        (Err(_), Err(_)) => None,
    }
}

/// An open metadata file or device.
struct MdDevice {
    file: File,
    path: PathBuf,
    name: String,
    len: u64,
}

impl MdDevice {
    fn open(path: &Path, write: bool) -> Result<MdDevice, MetaError> {
        let name = path.display().to_string();
        let io_err = |source| MetaError::Io {
            path: name.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err)?;
        let kind = file.metadata().map_err(io_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(MetaError::Invalid {
                path: name,
                detail: "neither a regular file nor a block device".to_string(),
            });
        }
        // Seeking to the end gives the size of block devices too.
        let len = (&file).seek(SeekFrom::End(0)).map_err(io_err)?;
        Ok(MdDevice {
            file,
            path: path.to_path_buf(),
            name,
            len,
        })
    }

    fn io(&self, source: io::Error) -> MetaError {
        MetaError::Io {
            path: self.name.clone(),
            source,
        }
    }

    /// Reads both slots of an area at `md_start`; `present[i]` tells
    /// whether slot `i` carries the magic at all.
    fn read_slots(&self, md_start: u64, internal: bool) -> Result<(Slots, [bool; 2]), MetaError> {
        let mut slots = [Err(String::new()), Err(String::new())];
        let mut present = [false; 2];
        for (i, slot) in slots.iter_mut().enumerate() {
            let off = md_start + i as u64 * BLOCK;
            let Some(buf) = self.read_slot(off)? else {
                *slot = Err(format!(
                    "lies past the end of the device ({} bytes)",
                    self.len
                ));
                continue;
            };
            present[i] = &buf[OFF_MAGIC..OFF_MAGIC + 8] == MAGIC;
            *slot = decode(&buf)
                .and_then(|sb| check_placement(&sb, internal, md_start, self.len).map(|()| sb));
        }
        Ok((slots, present))
    }

    /// The raw block at `off`, or `None` when the device ends before it.
    fn read_slot(&self, off: u64) -> Result<Option<[u8; SUPERBLOCK_SIZE]>, MetaError> {
        if off.saturating_add(BLOCK) > self.len {
            return Ok(None);
        }
        let mut buf = [0u8; SUPERBLOCK_SIZE];
        self.file
            .read_exact_at(&mut buf, off)
            .map_err(|e| self.io(e))?;
        Ok(Some(buf))
    }

    fn zero(&self, mut offset: u64, len: u64) -> Result<(), MetaError> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK) as usize;
            self.file
                .write_all_at(&zeroes[..n], offset)
                .map_err(|e| self.io(e))?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Whether two open files are the same file or block device.
fn same_file(a: &File, b: &File) -> io::Result<bool> {
    let (a, b) = (a.metadata()?, b.metadata()?);
    if a.file_type().is_block_device() && b.file_type().is_block_device() {
        return Ok(a.rdev() == b.rdev());
    }
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Opens the metadata device for `disk` and `location`, and works out
/// where the area starts and how long the data device is.
fn locate(
    disk: &Path,
    location: &Location,
    write: bool,
) -> Result<(MdDevice, u64, u64), MetaError> {
    match location {
        Location::Internal => {
            let md = MdDevice::open(disk, write)?;
            let p = plan_for(&md.name, location, md.len, DEFAULT_GRANULARITY)?;
            // The granularity does not move the area (see the module doc).
            let len = md.len;
            Ok((md, p.md_start, len))
        }
        Location::External(md_path) => {
            let data = MdDevice::open(disk, false)?;
            let md = MdDevice::open(md_path, write)?;
            if same_file(&data.file, &md.file).map_err(|e| md.io(e))? {
                return Err(MetaError::Invalid {
                    path: md.name,
                    detail: format!(
                        "external metadata must not live on the data device {} itself",
                        data.name
                    ),
                });
            }
            Ok((md, 0, data.len))
        }
    }
}

/// Open metadata: the file or device holding it and where the newest
/// superblock copy lives.
#[derive(Debug)]
pub struct MetaStore {
    file: File,
    md_path: PathBuf,
    md_name: String,
    layout: Plan,
    node: String,
    resource: String,
    /// Seq of the newest valid superblock.
    seq: u64,
    /// Slot holding it; the next write goes to the other one.
    active: usize,
}

impl MetaStore {
    /// create-md: writes a fresh superblock (gens.current =
    /// `UUID_JUST_CREATED`, other gens 0, flags 0, seq 1) into both slots
    /// and zeroes the bitmap and activity-log areas, then fdatasyncs.
    /// Refuses when either slot holds a valid superblock unless `force`.
    /// Nothing outside the metadata area is written.
    pub fn create(
        disk: &Path,
        location: &Location,
        node: &str,
        resource: &str,
        granularity: u32,
        force: bool,
    ) -> Result<(MetaStore, Superblock), MetaError> {
        let (md, _, data_len) = locate(disk, location, true)?;
        check_names(node, resource).map_err(|detail| MetaError::Invalid {
            path: md.name.clone(),
            detail,
        })?;
        let data_label = disk.display().to_string();
        let p = plan_for(&data_label, location, data_len, granularity)?;
        if p.md_start + p.md_len > md.len {
            return Err(MetaError::TooSmall {
                path: md.name,
                actual: md.len,
                needed: p.md_start + p.md_len,
                what: format!(
                    "the external metadata of a {}-byte data device at granularity {granularity}",
                    p.data_size
                ),
            });
        }
        // Any slot that decodes counts, even one laid out differently.
        let mut valid = None;
        for i in 0..2 {
            if let Some(Ok(sb)) = md.read_slot(p.md_start + i * BLOCK)?.map(|b| decode(&b)) {
                valid = valid.max(Some(sb.seq));
            }
        }
        if let (Some(seq), false) = (valid, force) {
            return Err(MetaError::Exists { path: md.name, seq });
        }
        // Wipe the old superblocks along with the areas and make that
        // durable first, so a crash part way never pairs an old
        // superblock with a fresh bitmap.
        md.zero(p.md_start, p.md_len)?;
        md.file.sync_data().map_err(|e| md.io(e))?;
        let sb = Superblock {
            seq: 1,
            node: node.to_string(),
            resource: resource.to_string(),
            data_size: p.data_size,
            gens: Generations {
                current: UUID_JUST_CREATED,
                ..Generations::default()
            },
            flags: 0,
            granularity: p.granularity,
            bitmap_offset: p.bitmap_offset,
            bitmap_len: p.bitmap_len,
            al_offset: p.al_offset,
            al_len: p.al_len,
            internal: p.internal,
        };
        let block = encode(&sb);
        for i in 0..2 {
            md.file
                .write_all_at(&block, p.md_start + i * BLOCK)
                .map_err(|e| md.io(e))?;
        }
        md.file.sync_data().map_err(|e| md.io(e))?;
        tracing::info!(
            path = %md.name,
            resource,
            data_size = p.data_size,
            md_start = p.md_start,
            "created metadata"
        );
        let store = MetaStore {
            file: md.file,
            md_path: md.path,
            md_name: md.name,
            layout: p,
            node: node.to_string(),
            resource: resource.to_string(),
            seq: 1,
            active: 0,
        };
        Ok((store, sb))
    }

    /// Opens existing metadata: reads both slots, validates them (magic,
    /// version, crc, flags, sane offsets that fit the device, then the
    /// node and resource names) and uses the valid one with the highest
    /// seq. One bad slot is logged and the other used; both bad is
    /// `Corrupt`, naming what failed in each; neither carrying the magic
    /// is `NoMetadata`. Never re-initialises anything.
    pub fn open(
        disk: &Path,
        location: &Location,
        node: &str,
        resource: &str,
    ) -> Result<(MetaStore, Superblock), MetaError> {
        let internal = matches!(location, Location::Internal);
        let (md, md_start, data_len) = locate(disk, location, true)?;
        let (slots, present) = md.read_slots(md_start, internal)?;
        let [a, b] = slots;
        let (active, sb, other) = match (a, b) {
            (Ok(a), Ok(b)) if b.seq > a.seq => (1, b, Ok(())),
            (Ok(a), Ok(_)) => (0, a, Ok(())),
            (Ok(a), Err(e)) => (0, a, Err(e)),
            (Err(e), Ok(b)) => (1, b, Err(e)),
            (Err(_), Err(_)) if !present[0] && !present[1] => {
                return Err(MetaError::NoMetadata {
                    path: md.name,
                    resource: resource.to_string(),
                })
            }
            (Err(ea), Err(eb)) => {
                return Err(MetaError::Corrupt {
                    path: md.name,
                    detail: format!(
                        "slot A (offset {md_start}): {ea}; slot B (offset {}): {eb}",
                        md_start + BLOCK
                    ),
                })
            }
        };
        if let Err(reason) = other {
            tracing::warn!(
                path = %md.name,
                "metadata slot {} (offset {}) is invalid ({reason}); using slot {} (seq {})",
                slot_name(1 - active),
                md_start + (1 - active) as u64 * BLOCK,
                slot_name(active),
                sb.seq
            );
        }
        if sb.resource != resource {
            return Err(MetaError::WrongResource {
                path: md.name,
                found: sb.resource,
                expected: resource.to_string(),
            });
        }
        if sb.node != node {
            return Err(MetaError::WrongNode {
                path: md.name,
                found: sb.node,
                expected: node.to_string(),
            });
        }
        let actual = if internal {
            md_start
        } else {
            data_len / BLOCK * BLOCK
        };
        if sb.data_size != actual {
            return Err(MetaError::SizeChanged {
                path: disk.display().to_string(),
                recorded: sb.data_size,
                actual,
            });
        }
        let store = MetaStore {
            file: md.file,
            md_path: md.path,
            md_name: md.name,
            layout: Plan::of(&sb, md_start),
            node: sb.node.clone(),
            resource: sb.resource.clone(),
            seq: sb.seq,
            active,
        };
        Ok((store, sb))
    }

    /// Crash-safe update: writes `sb` with seq = last + 1 into the slot
    /// not holding the newest valid copy, then fdatasyncs; a torn write
    /// leaves the previous copy valid. Sets `sb.seq` on success. The
    /// names and layout must be those the metadata was opened with.
    pub fn write(&mut self, sb: &mut Superblock) -> Result<(), MetaError> {
        let invalid = |detail: String| MetaError::Invalid {
            path: self.md_name.clone(),
            detail: format!("refusing to write the superblock: {detail}"),
        };
        if sb.node != self.node || sb.resource != self.resource {
            return Err(invalid(format!(
                "node/resource {:?}/{:?} differ from {:?}/{:?}",
                sb.node, sb.resource, self.node, self.resource
            )));
        }
        if !self.layout.same_layout(sb) {
            return Err(invalid("the layout cannot change".to_string()));
        }
        if sb.flags & !flags::KNOWN != 0 {
            return Err(invalid(format!(
                "unknown flag bits {:#x}",
                sb.flags & !flags::KNOWN
            )));
        }
        let next = 1 - self.active;
        let seq = self.seq + 1;
        let block = encode(&Superblock { seq, ..sb.clone() });
        let off = self.layout.md_start + next as u64 * BLOCK;
        let io = |source| MetaError::Io {
            path: self.md_name.clone(),
            source,
        };
        fault(&self.resource, Op::Write, next as u64 * BLOCK, BLOCK).map_err(io)?;
        self.file.write_all_at(&block, off).map_err(io)?;
        fault(&self.resource, Op::Flush, 0, 0).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.seq = seq;
        self.active = next;
        sb.seq = seq;
        Ok(())
    }

    /// Reads both slots for `dump-md`, validating each on its own (names
    /// are not checked). Opens the devices read-only.
    pub fn inspect(disk: &Path, location: &Location) -> Result<Inspection, MetaError> {
        let internal = matches!(location, Location::Internal);
        let (md, md_start, _) = locate(disk, location, false)?;
        let (slots, _) = md.read_slots(md_start, internal)?;
        let active = pick(&slots);
        Ok(Inspection {
            md_path: md.name,
            md_start,
            slots,
            active,
        })
    }

    fn bitmap_range(&self, offset: u64, len: usize) -> Result<u64, MetaError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.layout.bitmap_len => {
                Ok(self.layout.md_start + self.layout.bitmap_offset + offset)
            }
            _ => Err(MetaError::Invalid {
                path: self.md_name.clone(),
                detail: format!(
                    "bitmap access of {len} bytes at {offset} is outside its {} bytes",
                    self.layout.bitmap_len
                ),
            }),
        }
    }

    /// Fills `buf` from the start of the bitmap area (at most
    /// `bitmap_len` bytes).
    pub fn read_bitmap(&self, buf: &mut [u8]) -> Result<(), MetaError> {
        let at = self.bitmap_range(0, buf.len())?;
        self.file.read_exact_at(buf, at).map_err(|e| MetaError::Io {
            path: self.md_name.clone(),
            source: e,
        })
    }

    /// Writes `bytes` at `offset` within the bitmap area. Not synced;
    /// call `sync` to make it durable.
    pub fn write_bitmap(&self, offset: u64, bytes: &[u8]) -> Result<(), MetaError> {
        let at = self.bitmap_range(offset, bytes.len())?;
        fault(
            &self.resource,
            Op::Write,
            at - self.layout.md_start,
            bytes.len() as u64,
        )
        .and_then(|()| self.file.write_all_at(bytes, at))
        .map_err(|e| MetaError::Io {
            path: self.md_name.clone(),
            source: e,
        })
    }

    /// fdatasync of the metadata file or device.
    pub fn sync(&self) -> Result<(), MetaError> {
        fault(&self.resource, Op::Flush, 0, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| MetaError::Io {
                path: self.md_name.clone(),
                source: e,
            })
    }

    /// A second handle on the metadata device for the bitmap and the
    /// activity log, used without the superblock's lock.
    pub fn area(&self) -> Result<MdArea, MetaError> {
        let file = self.file.try_clone().map_err(|e| MetaError::Io {
            path: self.md_name.clone(),
            source: e,
        })?;
        Ok(MdArea {
            file,
            name: self.md_name.clone(),
            layout: self.layout,
            resource: self.resource.clone(),
        })
    }

    /// The layout in use, from the superblock.
    pub fn layout(&self) -> &Plan {
        &self.layout
    }

    pub fn md_path(&self) -> &Path {
        &self.md_path
    }

    /// Seq of the newest superblock written or read.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The slot (0 = A, 1 = B) holding the newest superblock.
    pub fn active_slot(&self) -> usize {
        self.active
    }
}

/// The bitmap and activity-log areas of open metadata (see
/// `MetaStore::area`). Writes are not synced; `sync` makes them durable.
#[derive(Debug)]
pub struct MdArea {
    file: File,
    name: String,
    layout: Plan,
    /// For fault injection (`crate::faults`).
    resource: String,
}

impl MdArea {
    fn io(&self, source: io::Error) -> MetaError {
        MetaError::Io {
            path: self.name.clone(),
            source,
        }
    }

    fn outside(&self, what: &str, offset: u64, len: usize, area: u64) -> MetaError {
        MetaError::Invalid {
            path: self.name.clone(),
            detail: format!("{what} access of {len} bytes at {offset} is outside its {area} bytes"),
        }
    }

    pub fn layout(&self) -> &Plan {
        &self.layout
    }

    /// Writes `bytes` at `offset` within the bitmap area.
    pub fn write_bitmap(&self, offset: u64, bytes: &[u8]) -> Result<(), MetaError> {
        match offset.checked_add(bytes.len() as u64) {
            Some(end) if end <= self.layout.bitmap_len => {}
            _ => return Err(self.outside("bitmap", offset, bytes.len(), self.layout.bitmap_len)),
        }
        let at = self.layout.md_start + self.layout.bitmap_offset + offset;
        fault(
            &self.resource,
            Op::Write,
            self.layout.bitmap_offset + offset,
            bytes.len() as u64,
        )
        .and_then(|()| self.file.write_all_at(bytes, at))
        .map_err(|e| self.io(e))
    }

    /// Blocks in the activity-log ring.
    pub fn al_blocks(&self) -> u32 {
        u32::try_from(self.layout.al_len / BLOCK).unwrap_or(u32::MAX)
    }

    /// The whole activity-log area.
    pub fn read_al(&self) -> Result<Vec<u8>, MetaError> {
        let mut buf = vec![0u8; self.layout.al_len as usize];
        self.file
            .read_exact_at(&mut buf, self.layout.md_start + self.layout.al_offset)
            .map_err(|e| self.io(e))?;
        Ok(buf)
    }

    /// Writes one 4 KiB block of the activity-log ring.
    pub fn write_al_block(&self, index: u32, block: &[u8]) -> Result<(), MetaError> {
        let offset = u64::from(index) * BLOCK;
        if block.len() as u64 != BLOCK || offset + BLOCK > self.layout.al_len {
            return Err(self.outside("activity-log", offset, block.len(), self.layout.al_len));
        }
        let at = self.layout.md_start + self.layout.al_offset + offset;
        fault(
            &self.resource,
            Op::Write,
            self.layout.al_offset + offset,
            BLOCK,
        )
        .and_then(|()| self.file.write_all_at(block, at))
        .map_err(|e| self.io(e))
    }

    /// Zeroes the activity-log ring.
    pub fn zero_al(&self) -> Result<(), MetaError> {
        let zeroes = vec![0u8; self.layout.al_len as usize];
        fault(
            &self.resource,
            Op::Write,
            self.layout.al_offset,
            self.layout.al_len,
        )
        .and_then(|()| {
            self.file
                .write_all_at(&zeroes, self.layout.md_start + self.layout.al_offset)
        })
        .map_err(|e| self.io(e))
    }

    /// fdatasync of the metadata file or device.
    pub fn sync(&self) -> Result<(), MetaError> {
        fault(&self.resource, Op::Flush, 0, 0)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| self.io(e))
    }
}

/// An injected metadata fault (tests only; see `crate::faults`).
fn fault(resource: &str, op: Op, offset: u64, len: u64) -> io::Result<()> {
    crate::faults::check(resource, crate::faults::Target::Meta, op, offset, len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn sample() -> Superblock {
        let p = plan(&Location::Internal, GIB, 4096).unwrap();
        Superblock {
            seq: 7,
            node: "alpha-ü".to_string(),
            resource: "r0".to_string(),
            data_size: p.data_size,
            gens: Generations {
                current: 0x1234_5678_9abc_def1,
                bitmap: 42,
                history: [3, 5],
            },
            flags: flags::CONSISTENT | flags::UP_TO_DATE | flags::PEER_OUTDATED,
            granularity: p.granularity,
            bitmap_offset: p.bitmap_offset,
            bitmap_len: p.bitmap_len,
            al_offset: p.al_offset,
            al_len: p.al_len,
            internal: true,
        }
    }

    /// Recomputes the checksum after a test tampered with the fields.
    fn reseal(buf: &mut [u8; SUPERBLOCK_SIZE]) {
        let crc = replblk_proto::crc32c(&buf[..OFF_CRC]);
        put_u32(buf, OFF_CRC, crc);
    }

    #[test]
    fn encode_decode_round_trip() {
        let sb = sample();
        let buf = encode(&sb);
        assert_eq!(decode(&buf).unwrap(), sb);
        assert_eq!(&buf[..8], b"RBLKMETA");
        assert_eq!(get_u32(&buf, 8), 2);
        assert!(buf[OFF_RESOURCE + 1 + MAX_NAME..OFF_CRC]
            .iter()
            .all(|&b| b == 0));
        let ext = Superblock {
            internal: false,
            node: String::new(),
            resource: "x".repeat(MAX_NAME),
            ..sb
        };
        assert_eq!(decode(&encode(&ext)).unwrap(), ext);
    }

    #[test]
    fn field_offsets_match_the_documented_table() {
        let sb = sample();
        let buf = encode(&sb);
        assert_eq!(get_u64(&buf, 16), 7);
        assert_eq!(get_u64(&buf, 24), sb.data_size);
        assert_eq!(get_u64(&buf, 32), sb.gens.current);
        assert_eq!(get_u64(&buf, 40), 42);
        assert_eq!(get_u64(&buf, 48), 3);
        assert_eq!(get_u64(&buf, 56), 5);
        assert_eq!(get_u32(&buf, 64), 4096);
        assert_eq!(buf[68], 1);
        assert_eq!(get_u64(&buf, 72), 8192);
        assert_eq!(buf[104] as usize, "alpha-ü".len());
        assert_eq!(&buf[105..105 + buf[104] as usize], "alpha-ü".as_bytes());
        assert_eq!(buf[169], 2);
        assert_eq!(&buf[170..172], b"r0");
        assert_eq!(get_u32(&buf, 4092), crc32c::crc32c(&buf[..4092]));
    }

    #[test]
    fn each_validation_failure_is_named() {
        let good = encode(&sample());
        let check = |buf: &[u8], want: &str| {
            let err = decode(buf).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        };
        check(&good[..100], "short");
        check(&[0u8; SUPERBLOCK_SIZE], "bad magic");

        let mut b = good;
        b[0] ^= 1;
        check(&b, "bad magic");

        let mut b = good;
        put_u32(&mut b, OFF_VERSION, 3);
        reseal(&mut b);
        check(&b, "version 3");
        let mut b = good;
        put_u32(&mut b, OFF_VERSION, 0);
        reseal(&mut b);
        check(&b, "version 0");

        // Version 1 is read, without the flag it did not have.
        let mut b = good;
        put_u32(&mut b, OFF_VERSION, 1);
        reseal(&mut b);
        assert_eq!(decode(&b).unwrap(), sample());
        let al = Superblock {
            flags: flags::CONSISTENT | flags::ACTIVITY_LOG,
            ..sample()
        };
        let mut b = encode(&al);
        assert_eq!(decode(&b).unwrap(), al);
        put_u32(&mut b, OFF_VERSION, 1);
        reseal(&mut b);
        check(&b, "unknown flag bits 0x200");

        let mut b = good;
        b[OFF_GEN_BITMAP] ^= 0x10;
        check(&b, "checksum");
        let mut b = good;
        b[3000] = 1;
        check(&b, "checksum");

        let bad_flags = Superblock {
            flags: flags::CONSISTENT | 1 << 20,
            ..sample()
        };
        check(&encode(&bad_flags), "unknown flag bits 0x100000");

        let mut b = good;
        b[OFF_NODE] = 65;
        reseal(&mut b);
        check(&b, "node name length 65");
        let mut b = good;
        b[OFF_RESOURCE + 1] = 0xff;
        reseal(&mut b);
        check(&b, "resource name is not UTF-8");
        let mut b = good;
        b[OFF_RESOURCE] = 0;
        reseal(&mut b);
        check(&b, "empty resource name");

        let mut b = good;
        b[OFF_LAYOUT] = 2;
        reseal(&mut b);
        check(&b, "layout byte");

        let mut b = good;
        put_u64(&mut b, OFF_SEQ, 0);
        reseal(&mut b);
        check(&b, "sequence number 0");
    }

    #[test]
    fn insane_layouts_are_rejected() {
        let check = |sb: Superblock, want: &str| {
            let err = decode(&encode(&sb)).unwrap_err();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        };
        check(
            Superblock {
                granularity: 6000,
                ..sample()
            },
            "granularity",
        );
        check(
            Superblock {
                granularity: 2048,
                ..sample()
            },
            "granularity",
        );
        check(
            Superblock {
                data_size: 4097,
                ..sample()
            },
            "data size",
        );
        check(
            Superblock {
                bitmap_offset: 4096,
                ..sample()
            },
            "overlaps the superblock",
        );
        check(
            Superblock {
                bitmap_offset: 8193,
                ..sample()
            },
            "aligned",
        );
        check(
            Superblock {
                bitmap_len: 0,
                ..sample()
            },
            "cannot cover",
        );
        let sb = sample();
        check(
            Superblock {
                al_offset: sb.bitmap_offset,
                ..sample()
            },
            "overlaps the bitmap",
        );
        check(
            Superblock {
                al_offset: u64::MAX / BLOCK * BLOCK,
                al_len: BLOCK * 2,
                ..sample()
            },
            "overflows",
        );
        check(
            Superblock {
                al_len: BLOCK,
                ..sample()
            },
            "activity-log area of 4096 bytes is smaller",
        );
    }

    #[test]
    fn placement_is_checked_against_the_device() {
        let sb = sample();
        let p = plan(&Location::Internal, GIB, 4096).unwrap();
        assert_eq!(check_placement(&sb, true, p.md_start, GIB), Ok(()));
        let err = check_placement(&sb, false, p.md_start, GIB).unwrap_err();
        assert!(err.contains("external was configured"), "{err}");
        let err = check_placement(&sb, true, p.md_start, GIB - 4096).unwrap_err();
        assert!(err.contains("past the end"), "{err}");
        let err = check_placement(&sb, true, p.md_start - 4096, GIB).unwrap_err();
        assert!(err.contains("overlaps the metadata"), "{err}");
    }

    /// The properties every internal plan must have.
    fn check_internal(len: u64) -> Plan {
        let p = plan(&Location::Internal, len, 4096).unwrap();
        let whole = len / BLOCK * BLOCK;
        assert_eq!(p.data_size % BLOCK, 0);
        assert_eq!(p.md_start, p.data_size);
        assert_eq!(p.md_start + p.md_len, whole, "len {len}");
        assert!(p.data_size + p.md_len <= len);
        assert!(p.data_size >= MIN_DATA);
        assert!(p.bitmap_len * 8 * 4096 >= p.data_size);
        assert_eq!(p.bitmap_len, bitmap_bytes(p.data_size, 4096));
        assert!(p.bitmap_offset + p.bitmap_len <= p.al_offset);
        assert_eq!(p.al_offset + p.al_len, p.md_len);
        assert_eq!(p.al_len, AL_LEN);
        // Maximal: one more data block would not leave room for its bitmap.
        let bigger = p.data_size + BLOCK;
        let needed = u128::from(bigger)
            + u128::from(BITMAP_OFFSET + AL_LEN)
            + u128::from(bitmap_bytes(bigger, 4096));
        assert!(needed > u128::from(whole));
        // Deterministic, and the position does not depend on granularity.
        assert_eq!(plan(&Location::Internal, len, 4096).unwrap(), p);
        for g in [8192u32, 65536, 1 << 20, 1 << 31] {
            let q = plan(&Location::Internal, len, g).unwrap();
            assert_eq!(
                (q.md_start, q.md_len, q.al_offset),
                (p.md_start, p.md_len, p.al_offset)
            );
            assert!(q.bitmap_len * 8 * u64::from(g) >= q.data_size);
            assert!(q.bitmap_offset + q.bitmap_len <= q.al_offset);
        }
        let sb = Superblock {
            seq: 1,
            node: String::new(),
            resource: "r".to_string(),
            data_size: p.data_size,
            gens: Generations::default(),
            flags: 0,
            granularity: p.granularity,
            bitmap_offset: p.bitmap_offset,
            bitmap_len: p.bitmap_len,
            al_offset: p.al_offset,
            al_len: p.al_len,
            internal: true,
        };
        assert_eq!(check_layout(&sb), Ok(()));
        assert_eq!(check_placement(&sb, true, p.md_start, len), Ok(()));
        assert_eq!(Plan::of(&sb, p.md_start), p);
        p
    }

    #[test]
    fn internal_layout_math() {
        let min = BITMAP_OFFSET + BLOCK + AL_LEN + MIN_DATA;
        assert_eq!(min, 147_456);
        let p = check_internal(min);
        assert_eq!(p.data_size, 4096);
        assert_eq!(check_internal(min + 4095).data_size, 4096);
        assert_eq!(check_internal(min + 4096).data_size, 8192);
        let p = check_internal(GIB);
        // 1 GiB: 32 KiB of bitmap at 4 KiB granularity.
        assert_eq!(p.bitmap_len, 32 * 1024);
        assert_eq!(p.md_len, 8192 + 32 * 1024 + AL_LEN);
        assert_eq!(p.data_size, GIB - p.md_len);
        check_internal(GIB + 123);
        check_internal(1 << 40);
        check_internal((1 << 40) + 5 * 4096 + 17);
        check_internal(1 << 50);
        check_internal(u64::MAX);
        // Around the point where one bitmap block stops being enough.
        let fixed = BITMAP_OFFSET + AL_LEN;
        let edge = 128 * 1024 * 1024 + fixed + BLOCK;
        for len in (edge - 8 * BLOCK..edge + 8 * BLOCK).step_by(1000) {
            check_internal(len);
        }
        // Data sizes must never go down as the device grows.
        let mut last = 0;
        for len in (edge - 8 * BLOCK..edge + 8 * BLOCK).step_by(4096) {
            let d = check_internal(len).data_size;
            assert!(d >= last);
            last = d;
        }
    }

    #[test]
    fn too_small_devices_are_refused_clearly() {
        for len in [0, 4096, 147_455] {
            let err = plan(&Location::Internal, len, 4096).unwrap_err();
            assert!(
                matches!(
                    err,
                    MetaError::TooSmall {
                        needed: 147_456,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("at least 147456 bytes"), "{err}");
        }
        let ext = Location::External(PathBuf::from("/dev/md"));
        let err = plan(&ext, 4095, 4096).unwrap_err();
        assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
    }

    #[test]
    fn external_layout_math() {
        let ext = Location::External(PathBuf::from("/dev/md"));
        let p = plan(&ext, GIB + 100, 4096).unwrap();
        assert_eq!(p.data_size, GIB);
        assert_eq!(p.md_start, 0);
        assert_eq!(p.bitmap_len, 32 * 1024);
        assert_eq!(p.al_offset, 8192 + 32 * 1024);
        assert_eq!(p.md_len, p.al_offset + AL_LEN);
        assert!(!p.internal);
        let q = plan(&ext, GIB, 1 << 20).unwrap();
        assert_eq!(q.bitmap_len, 4096);
        assert_eq!(q.md_len, 8192 + 4096 + AL_LEN);
    }

    #[test]
    fn bad_granularity_is_refused() {
        for g in [0, 512, 4095, 12288] {
            let err = plan(&Location::Internal, GIB, g).unwrap_err();
            assert!(err.to_string().contains("granularity"), "{err}");
        }
    }

    #[test]
    fn long_names_are_clamped_on_char_boundaries_and_refused_by_checks() {
        let name = "é".repeat(40); // 80 bytes
        assert_eq!(clamp_name(&name).len(), 64);
        let odd = format!("a{}", "é".repeat(40));
        assert_eq!(clamp_name(&odd).len(), 63);
        assert!(check_names(&name, "r0").is_err());
        assert!(check_names("a", &name).is_err());
        assert!(check_names("a", "").is_err());
        assert!(check_names("", "r0").is_ok());
    }

    #[test]
    fn pick_prefers_the_highest_valid_seq() {
        let at = |seq| Ok(Superblock { seq, ..sample() });
        let bad = || Err("x".to_string());
        assert_eq!(pick(&[at(1), at(1)]), Some(0));
        assert_eq!(pick(&[at(1), at(2)]), Some(1));
        assert_eq!(pick(&[at(3), at(2)]), Some(0));
        assert_eq!(pick(&[bad(), at(2)]), Some(1));
        assert_eq!(pick(&[at(5), bad()]), Some(0));
        assert_eq!(pick(&[bad(), bad()]), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Hostile disk contents: decoding never panics, and whatever it
        /// accepts encodes back to the same bytes.
        #[test]
        fn decode_of_arbitrary_bytes_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000)
        ) {
            if let Ok(sb) = decode(&bytes) {
                proptest::prop_assert_eq!(&encode(&sb)[..], &bytes[..SUPERBLOCK_SIZE]);
            }
        }

        /// A valid superblock with any single byte changed is rejected.
        #[test]
        fn any_one_changed_byte_is_caught(at in 0usize..SUPERBLOCK_SIZE, xor in 1u8..=255) {
            let mut buf = encode(&sample());
            buf[at] ^= xor;
            proptest::prop_assert!(decode(&buf).is_err());
        }
    }
}
