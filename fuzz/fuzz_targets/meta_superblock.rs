#![no_main]

//! `meta::decode` on a superblock slot read from a disk that may hold
//! anything. Raw bytes almost never carry the magic, a known version and
//! a valid crc32c, so most inputs are sealed first: the first byte picks
//! raw or sealed; sealed slots get the magic, a version byte of the input
//! and a correct checksum, so that every field check is reached.
//!
//! It must never panic; a superblock that decodes must survive `encode`
//! then `decode` unchanged, and describe areas that attach can use: no
//! overflow, the bitmap covering the data at the granularity, and an
//! activity-log ring that holds the largest hot set a config may ask for.

use libfuzzer_sys::fuzz_target;
use replblk::core::actlog;
use replblk::meta;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut slot = vec![0u8; meta::SUPERBLOCK_SIZE];
    if mode & 1 == 0 {
        let n = rest.len().min(slot.len());
        slot[..n].copy_from_slice(&rest[..n]);
    } else {
        // The fields live in the first 240 bytes; the rest is zero.
        let n = rest.len().min(240);
        slot[..n].copy_from_slice(&rest[..n]);
        slot[0..8].copy_from_slice(meta::MAGIC);
        if mode & 2 == 0 {
            let version = meta::OLDEST_VERSION + u32::from(mode >> 2) % meta::VERSION;
            slot[8..12].copy_from_slice(&version.to_le_bytes());
        }
        let crc = crc32c::crc32c(&slot[..meta::SUPERBLOCK_SIZE - 4]);
        slot[meta::SUPERBLOCK_SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
    }
    let Ok(sb) = meta::decode(&slot) else {
        return;
    };
    let again = meta::decode(&meta::encode(&sb)).expect("a re-encoded superblock decodes");
    assert_eq!(format!("{sb:?}"), format!("{again:?}"));
    assert!(sb.bitmap_offset.checked_add(sb.bitmap_len).is_some());
    assert!(sb.al_offset.checked_add(sb.al_len).is_some());
    assert!(sb.al_offset >= sb.bitmap_offset + sb.bitmap_len, "{sb:?}");
    let blocks = sb.data_size.div_ceil(u64::from(sb.granularity));
    assert!(
        sb.bitmap_len.saturating_mul(8) >= blocks,
        "bitmap too small: {sb:?}"
    );
    let ring = u32::try_from(sb.al_len / meta::BLOCK).unwrap_or(u32::MAX);
    assert!(
        actlog::max_extents(ring) >= actlog::max_extents(meta::AL_BLOCKS as u32),
        "activity-log ring of {ring} blocks: {sb:?}"
    );
});
