//! On-disk behaviour of `replblk::meta` against real files: create, open,
//! alternating crash-safe writes, torn and corrupt slots, and that
//! nothing outside the metadata area is ever written.

#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use replblk::core::{flags, UUID_JUST_CREATED};
use replblk::meta::{self, Location, MetaError, MetaStore, Superblock};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn file(dir: &TempDir, name: &str, len: u64) -> PathBuf {
    let path = dir.path().join(name);
    File::create(&path).unwrap().set_len(len).unwrap();
    path
}

fn read(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, off)
        .unwrap();
    buf
}

fn write(path: &Path, off: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

/// A repeating pattern that is different at every offset mod 251.
fn pattern(off: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((off + i) % 251) as u8).collect()
}

fn slot(path: &Path, md_start: u64, i: u64) -> Result<Superblock, String> {
    meta::decode(&read(path, md_start + i * 4096, 4096))
}

#[test]
fn create_then_open_internal() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 64 * MIB);
    let (store, sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let p = meta::plan(&Location::Internal, 64 * MIB, 4096).unwrap();
    assert_eq!(*store.layout(), p);
    assert_eq!(sb.seq, 1);
    assert_eq!(sb.gens.current, UUID_JUST_CREATED);
    assert_eq!((sb.gens.bitmap, sb.gens.history), (0, [0, 0]));
    assert_eq!(sb.flags, 0);
    assert_eq!(sb.data_size, p.data_size);
    assert!(sb.internal);
    // Both slots hold the same fresh superblock, at the end of the disk.
    assert_eq!(slot(&disk, p.md_start, 0).unwrap(), sb);
    assert_eq!(slot(&disk, p.md_start, 1).unwrap(), sb);
    assert_eq!(p.md_start + p.md_len, 64 * MIB);
    drop(store);

    let (store, opened) = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap();
    assert_eq!(opened, sb);
    assert_eq!(store.seq(), 1);
    assert_eq!(store.active_slot(), 0);
    assert_eq!(store.md_path(), disk.as_path());
}

#[test]
fn writes_alternate_slots_and_raise_seq() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (mut store, mut sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let start = store.layout().md_start;
    for n in 2..8u64 {
        sb.gens.current = 1000 + n;
        sb.flags ^= flags::CONSISTENT;
        store.write(&mut sb).unwrap();
        assert_eq!(sb.seq, n);
        assert_eq!(store.seq(), n);
        // seq 2 goes to B, 3 to A, ...
        let written = if n % 2 == 0 { 1 } else { 0 };
        assert_eq!(store.active_slot(), written as usize);
        assert_eq!(slot(&disk, start, written).unwrap(), sb);
        let older = slot(&disk, start, 1 - written).unwrap();
        assert_eq!(older.seq, n - 1);
        assert_eq!(
            older.gens.current,
            if n == 2 { UUID_JUST_CREATED } else { 999 + n }
        );
    }
    let (_, opened) = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap();
    assert_eq!(opened, sb);
}

#[test]
fn write_refuses_changed_names_layout_or_unknown_flags() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (mut store, sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    for bad in [
        Superblock {
            resource: "r1".into(),
            ..sb.clone()
        },
        Superblock {
            node: "beta".into(),
            ..sb.clone()
        },
        Superblock {
            data_size: sb.data_size + 4096,
            ..sb.clone()
        },
        Superblock {
            al_len: 4096,
            ..sb.clone()
        },
        Superblock {
            flags: 1 << 30,
            ..sb.clone()
        },
    ] {
        let mut bad = bad;
        let err = store.write(&mut bad).unwrap_err();
        assert!(matches!(err, MetaError::Invalid { .. }), "{err}");
        assert_eq!(bad.seq, 1);
    }
    assert_eq!(store.seq(), 1);
}

#[test]
fn torn_write_falls_back_to_the_previous_version() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (mut store, mut sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let start = store.layout().md_start;
    sb.gens.current = 111;
    store.write(&mut sb).unwrap(); // seq 2, slot B
    let previous = sb.clone();
    sb.gens.current = 222;
    sb.flags = flags::PRIMARY;
    store.write(&mut sb).unwrap(); // seq 3, slot A
    drop(store);

    // Only the first 512-byte sector of the newest write "made it":
    // the rest of slot A still holds stale bytes.
    write(&disk, start + 512, &[0x5a; 3584]);
    let (mut store, opened) = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap();
    assert_eq!(opened, previous);
    assert_eq!(store.active_slot(), 1);

    let insp = MetaStore::inspect(&disk, &Location::Internal).unwrap();
    assert_eq!(insp.active, Some(1));
    assert!(insp.slots[0].as_ref().unwrap_err().contains("checksum"));
    assert_eq!(insp.slots[1].as_ref().unwrap(), &previous);
    let json = serde_json::to_string(&insp).unwrap();
    assert!(json.contains("checksum mismatch"), "{json}");

    // The next write repairs slot A, with a seq above both.
    let mut sb = opened;
    store.write(&mut sb).unwrap();
    assert_eq!(sb.seq, 3);
    assert_eq!(slot(&disk, start, 0).unwrap(), sb);
}

#[test]
fn corrupt_in_both_slots_names_each_reason() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (store, _) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let start = store.layout().md_start;
    drop(store);
    write(&disk, start + 100, &[0xff]);
    write(&disk, start + 4096 + 8, &3u32.to_le_bytes());
    let err = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap_err();
    assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("corrupt in both slots"), "{msg}");
    assert!(msg.contains("slot A") && msg.contains("checksum"), "{msg}");
    assert!(msg.contains("slot B") && msg.contains("version 3"), "{msg}");
    assert!(msg.contains(&disk.display().to_string()), "{msg}");
    // open never re-initialises: the bytes are still there.
    assert_eq!(read(&disk, start + 4096 + 8, 4), 3u32.to_le_bytes());
}

/// A superblock with a valid checksum whose activity-log area is one
/// block: opening it used to succeed, and bringing the resource up would
/// then hit `ActivityLog::new`'s assertion (a hot set larger than the
/// ring can describe).
#[test]
fn an_activity_log_area_smaller_than_the_format_is_corrupt() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (store, sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let start = store.layout().md_start;
    drop(store);
    let small = Superblock {
        al_len: 4096,
        ..sb.clone()
    };
    for i in 0..2 {
        write(&disk, start + i * 4096, &meta::encode(&small));
    }
    let err = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap_err();
    assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains("activity-log area of 4096 bytes"),
        "{err}"
    );
    // The layout the format writes is accepted.
    write(&disk, start, &meta::encode(&sb));
    MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap();
}

#[test]
fn no_metadata_is_reported_as_such() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let err = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap_err();
    assert!(matches!(err, MetaError::NoMetadata { .. }), "{err}");
    assert!(err.to_string().contains("replctl create-md r0"), "{err}");
    let insp = MetaStore::inspect(&disk, &Location::Internal).unwrap();
    assert_eq!(insp.active, None);
    assert!(insp.slots[0].as_ref().unwrap_err().contains("bad magic"));

    let md = file(&dir, "md.img", 0);
    let err = MetaStore::open(&disk, &Location::External(md), "alpha", "r0").unwrap_err();
    assert!(matches!(err, MetaError::NoMetadata { .. }), "{err}");
}

#[test]
fn create_refuses_valid_metadata_unless_forced() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (mut store, mut sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    sb.gens.current = 77;
    store.write(&mut sb).unwrap();
    store.write_bitmap(0, &[0xff; 16]).unwrap();
    drop(store);
    let err =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap_err();
    assert!(matches!(err, MetaError::Exists { seq: 2, .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");
    // Unchanged by the refusal.
    assert_eq!(
        MetaStore::open(&disk, &Location::Internal, "alpha", "r0")
            .unwrap()
            .1,
        sb
    );

    // One valid slot is enough to refuse.
    let start = meta::plan(&Location::Internal, 16 * MIB, 4096)
        .unwrap()
        .md_start;
    write(&disk, start + 4096, &[0; 4096]);
    assert!(matches!(
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false),
        Err(MetaError::Exists { seq: 1, .. })
    ));

    let (store, fresh) =
        MetaStore::create(&disk, &Location::Internal, "beta", "r9", 65536, true).unwrap();
    assert_eq!(fresh.seq, 1);
    assert_eq!(fresh.gens.current, UUID_JUST_CREATED);
    assert_eq!(fresh.granularity, 65536);
    let mut bm = vec![1u8; 16];
    store.read_bitmap(&mut bm).unwrap();
    assert_eq!(bm, vec![0; 16], "force zeroes the bitmap");
    drop(store);
    assert_eq!(
        MetaStore::open(&disk, &Location::Internal, "beta", "r9")
            .unwrap()
            .1,
        fresh
    );

    // Garbage that is not valid metadata needs no force.
    let other = file(&dir, "other.img", 16 * MIB);
    write(&other, start, b"RBLKMETA but not really");
    MetaStore::create(&other, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
}

#[test]
fn names_must_match() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let err = MetaStore::open(&disk, &Location::Internal, "alpha", "r1").unwrap_err();
    assert!(
        matches!(&err, MetaError::WrongResource { found, expected, .. } if found == "r0" && expected == "r1"),
        "{err}"
    );
    let err = MetaStore::open(&disk, &Location::Internal, "beta", "r0").unwrap_err();
    assert!(
        matches!(&err, MetaError::WrongNode { found, expected, .. } if found == "alpha" && expected == "beta"),
        "{err}"
    );
    let long = "n".repeat(65);
    let other = file(&dir, "other.img", 16 * MIB);
    let err = MetaStore::create(&other, &Location::Internal, &long, "r0", 4096, false).unwrap_err();
    assert!(err.to_string().contains("longer than 64 bytes"), "{err}");
}

#[test]
fn data_area_is_never_touched_internal() {
    let dir = TempDir::new().unwrap();
    // Not a multiple of 4 KiB: the partial tail block stays untouched too.
    let len = 8 * MIB + 1000;
    let disk = file(&dir, "disk.img", len);
    let p = meta::plan(&Location::Internal, len, 4096).unwrap();
    let data = pattern(0, p.data_size as usize);
    write(&disk, 0, &data);
    let tail_at = p.md_start + p.md_len;
    let tail = pattern(tail_at, (len - tail_at) as usize);
    write(&disk, tail_at, &tail);
    // Metadata area full of junk, like a disk that held something else.
    write(&disk, p.md_start, &vec![0xee; p.md_len as usize]);

    let (mut store, mut sb) =
        MetaStore::create(&disk, &Location::Internal, "a", "r", 4096, false).unwrap();
    for _ in 0..3 {
        store.write(&mut sb).unwrap();
    }
    store.write_bitmap(p.bitmap_len - 8, &[0xff; 8]).unwrap();
    store.sync().unwrap();
    assert_eq!(read(&disk, 0, p.data_size as usize), data);
    assert_eq!(read(&disk, tail_at, tail.len()), tail);
    // The rest of the area was zeroed.
    let area = read(&disk, p.md_start + 8192, (p.md_len - 8192) as usize);
    let bm_end = (p.bitmap_len - 8) as usize;
    assert!(area[..bm_end].iter().all(|&b| b == 0));
    assert!(area[bm_end + 8..].iter().all(|&b| b == 0));
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), len);
}

#[test]
fn external_metadata_leaves_the_data_alone() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 4 * MIB);
    let data = pattern(0, 4 * MIB as usize);
    write(&disk, 0, &data);
    let ext = Location::External(file(&dir, "md.img", MIB));
    let (mut store, mut sb) = MetaStore::create(&disk, &ext, "alpha", "r0", 4096, false).unwrap();
    assert!(!sb.internal);
    assert_eq!(sb.data_size, 4 * MIB);
    assert_eq!(store.layout().md_start, 0);
    sb.flags = flags::CONSISTENT | flags::UP_TO_DATE;
    store.write(&mut sb).unwrap();
    store.write_bitmap(0, &[1, 2, 3]).unwrap();
    let mut bm = [0u8; 4];
    store.read_bitmap(&mut bm).unwrap();
    assert_eq!(bm, [1, 2, 3, 0]);
    drop(store);
    assert_eq!(read(&disk, 0, data.len()), data);
    let (_, opened) = MetaStore::open(&disk, &ext, "alpha", "r0").unwrap();
    assert_eq!(opened, sb);
    // Internal open of the same disk finds nothing.
    assert!(matches!(
        MetaStore::open(&disk, &Location::Internal, "alpha", "r0"),
        Err(MetaError::NoMetadata { .. })
    ));
    // Using the data device as its own external metadata is refused.
    let err = MetaStore::create(
        &disk,
        &Location::External(disk.clone()),
        "a",
        "r",
        4096,
        true,
    )
    .unwrap_err();
    assert!(err.to_string().contains("data device"), "{err}");
    assert_eq!(read(&disk, 0, data.len()), data);
}

#[test]
fn external_too_small_or_missing_is_clear() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", GIB);
    let md = file(&dir, "md.img", 160 * 1024);
    let ext = Location::External(md.clone());
    let err = MetaStore::create(&disk, &ext, "alpha", "r0", 4096, false).unwrap_err();
    let needed = 8192 + 32 * 1024 + 128 * 1024;
    assert!(
        matches!(err, MetaError::TooSmall { actual: 163_840, needed: n, .. } if n == needed),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&format!("at least {needed} bytes")), "{msg}");
    assert!(msg.contains(&md.display().to_string()), "{msg}");
    assert_eq!(
        std::fs::metadata(&md).unwrap().len(),
        160 * 1024,
        "not grown"
    );
    // A coarser granularity needs less.
    MetaStore::create(&disk, &ext, "alpha", "r0", 1 << 20, false).unwrap();

    let missing = dir.path().join("nope.img");
    let err = MetaStore::create(
        &disk,
        &Location::External(missing.clone()),
        "a",
        "r",
        4096,
        false,
    )
    .unwrap_err();
    assert!(matches!(err, MetaError::Io { .. }), "{err}");
    assert!(!missing.exists(), "not created");
}

#[test]
fn external_data_device_resize_is_detected() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 4 * MIB);
    let ext = Location::External(file(&dir, "md.img", MIB));
    MetaStore::create(&disk, &ext, "alpha", "r0", 4096, false).unwrap();
    File::options()
        .write(true)
        .open(&disk)
        .unwrap()
        .set_len(2 * MIB)
        .unwrap();
    let err = MetaStore::open(&disk, &ext, "alpha", "r0").unwrap_err();
    assert!(
        matches!(err, MetaError::SizeChanged { recorded, actual, .. } if recorded == 4 * MIB && actual == 2 * MIB),
        "{err}"
    );
}

#[test]
fn external_metadata_file_truncated_is_corrupt() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 4 * MIB);
    let md = file(&dir, "md.img", MIB);
    let ext = Location::External(md.clone());
    MetaStore::create(&disk, &ext, "alpha", "r0", 4096, false).unwrap();
    File::options()
        .write(true)
        .open(&md)
        .unwrap()
        .set_len(16 * 1024)
        .unwrap();
    let err = MetaStore::open(&disk, &ext, "alpha", "r0").unwrap_err();
    assert!(matches!(err, MetaError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn one_gib_internal_and_tiny_devices() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "big.img", GIB);
    let (store, sb) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let p = *store.layout();
    assert_eq!(p.bitmap_len, 32 * 1024);
    assert_eq!(sb.data_size + p.md_len, GIB);
    assert!(sb.bitmap_len * 8 * 4096 >= sb.data_size);
    let mut bm = vec![0xffu8; p.bitmap_len as usize];
    store.read_bitmap(&mut bm).unwrap();
    assert!(bm.iter().all(|&b| b == 0));
    let mut too_big = vec![0u8; p.bitmap_len as usize + 1];
    assert!(store.read_bitmap(&mut too_big).is_err());
    assert!(store.write_bitmap(p.bitmap_len - 1, &[0, 0]).is_err());
    drop(store);
    assert_eq!(
        MetaStore::open(&disk, &Location::Internal, "alpha", "r0")
            .unwrap()
            .1,
        sb
    );

    let smallest = file(&dir, "smallest.img", 147_456);
    let (_, sb) = MetaStore::create(&smallest, &Location::Internal, "a", "r", 4096, false).unwrap();
    assert_eq!(sb.data_size, 4096);

    let tiny = file(&dir, "tiny.img", 147_455);
    let err = MetaStore::create(&tiny, &Location::Internal, "a", "r", 4096, false).unwrap_err();
    assert!(matches!(err, MetaError::TooSmall { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("tiny.img") && msg.contains("at least 147456 bytes"),
        "{msg}"
    );
    assert!(read(&tiny, 0, 147_455).iter().all(|&b| b == 0));
}

/// Rewrites the superblock at `off` as format version 1.
fn as_version_1(path: &Path, off: u64) {
    let mut block = read(path, off, 4096);
    block[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc32c::crc32c(&block[..4092]);
    block[4092..].copy_from_slice(&crc.to_le_bytes());
    write(path, off, &block);
}

#[test]
fn format_1_metadata_is_read_and_upgraded_on_the_next_write() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 16 * MIB);
    let (store, _) =
        MetaStore::create(&disk, &Location::Internal, "alpha", "r0", 4096, false).unwrap();
    let start = store.layout().md_start;
    drop(store);
    for i in 0..2 {
        as_version_1(&disk, start + i * 4096);
        assert_eq!(read(&disk, start + i * 4096 + 8, 4), 1u32.to_le_bytes());
    }
    let (mut store, mut sb) = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap();
    assert_eq!(sb.flags & flags::ACTIVITY_LOG, 0);
    sb.flags |= flags::ACTIVITY_LOG;
    store.write(&mut sb).unwrap();
    let written = start + store.active_slot() as u64 * 4096;
    assert_eq!(read(&disk, written + 8, 4), meta::VERSION.to_le_bytes());
    assert_eq!(meta::VERSION, 2);
    let (_, again) = MetaStore::open(&disk, &Location::Internal, "alpha", "r0").unwrap();
    assert_eq!(again.flags & flags::ACTIVITY_LOG, flags::ACTIVITY_LOG);
}

#[test]
fn the_activity_log_area_is_written_read_and_zeroed_in_place() {
    let dir = TempDir::new().unwrap();
    let disk = file(&dir, "disk.img", 64 * MIB);
    let md = file(&dir, "md", 4 * MIB);
    let ext = Location::External(md.clone());
    let (store, _) = MetaStore::create(&disk, &ext, "alpha", "r0", 4096, false).unwrap();
    let p = *store.layout();
    let area = store.area().unwrap();
    assert_eq!(area.al_blocks(), 32);
    assert!(area.read_al().unwrap().iter().all(|&b| b == 0));
    let block = pattern(7, 4096);
    area.write_al_block(31, &block).unwrap();
    area.sync().unwrap();
    assert_eq!(read(&md, p.al_offset + 31 * 4096, 4096), block);
    assert_eq!(&area.read_al().unwrap()[31 * 4096..], &block[..]);
    // Outside the ring, or not a whole block: refused, nothing written.
    let err = area.write_al_block(32, &block).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(area.write_al_block(0, &block[..100]).is_err());
    let err = area.write_bitmap(p.bitmap_len, &[1]).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    area.zero_al().unwrap();
    assert!(read(&md, p.al_offset, p.al_len as usize)
        .iter()
        .all(|&b| b == 0));
    // The data device is never touched.
    assert!(read(&disk, 0, 64 * MIB as usize).iter().all(|&b| b == 0));
}
