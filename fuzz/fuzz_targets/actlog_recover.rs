#![no_main]

//! The activity log's recovery (`core::actlog::recover`, then the marking
//! of the recovered extents in the out-of-sync bitmap, as attach does
//! after a crash) on a ring built from arbitrary bytes.
//!
//! Raw bytes almost never carry a valid crc32c, so most blocks are forged:
//! their fields come from the input and the checksum is made right (then,
//! for some, a byte is flipped after it, as a torn write would leave it).
//! Other blocks are raw input bytes or zeros (never written). Whatever the
//! ring holds, recovery must not panic nor allocate beyond the ring's
//! bounds, and it may only mark extents that a valid transaction of the
//! ring names (in its changes or its context window): marking more is not
//! a lost write, but a block that fails validation must not be trusted.

use libfuzzer_sys::fuzz_target;
use replblk::bitmap::DirtyBitmap;
use replblk::core::actlog::{self, BLOCK, CONTEXT_SLOTS, EMPTY, EXTENT_SIZE, MAX_UPDATES};
use std::collections::BTreeSet;

/// Reads the input front to back; zeros once it is used up.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
    /// Mostly small values (so fields agree across blocks), sometimes any.
    fn field(&mut self, small: u32) -> u32 {
        match self.u8() {
            0..=223 => u32::from(self.u8()) % small.max(1),
            224..=239 => EMPTY,
            _ => self.u32(),
        }
    }
    /// An extent number: a few distinct small ones, `EMPTY`, or any.
    fn extent(&mut self) -> u32 {
        match self.u8() {
            0..=199 => u32::from(self.u8() % 32),
            200..=229 => EMPTY,
            _ => self.u32(),
        }
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// A block whose fields come from the input, with a correct checksum.
fn forge(input: &mut Input, ring_blocks: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK];
    b[0..4].copy_from_slice(b"RBAL");
    let format: u16 = if input.u8() < 240 {
        1
    } else {
        u16::from(input.u8())
    };
    b[4..6].copy_from_slice(&format.to_le_bytes());
    let n = if input.u8() < 240 {
        u16::from(input.u8()) % (MAX_UPDATES as u16 + 1)
    } else {
        u16::from(input.u8())
    };
    b[6..8].copy_from_slice(&n.to_le_bytes());
    let seq = if input.u8() < 240 {
        u64::from(input.u8() % 24)
    } else {
        input.u64()
    };
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    let max = actlog::max_extents(ring_blocks).max(1);
    let capacity = match input.u8() {
        0..=191 => u32::from(input.u8()) % 64 + 1,
        192..=239 => input.u32() % max + 1,
        _ => input.u32(),
    };
    put_u32(&mut b, 16, capacity);
    let ctx_start = input.field(capacity);
    put_u32(&mut b, 20, ctx_start);
    let ctx_len = match input.u8() {
        0..=191 => capacity.min(CONTEXT_SLOTS as u32),
        192..=223 => input.field(capacity.min(CONTEXT_SLOTS as u32) + 1),
        _ => input.u32(),
    };
    put_u32(&mut b, 24, ctx_len);
    for i in 0..usize::from(n).min(MAX_UPDATES) {
        put_u32(&mut b, 32 + 8 * i, input.field(capacity));
        put_u32(&mut b, 36 + 8 * i, input.extent());
    }
    for i in 0..(ctx_len as usize).min(CONTEXT_SLOTS) {
        put_u32(&mut b, 32 + 8 * MAX_UPDATES + 4 * i, input.extent());
    }
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    put_u32(&mut b, BLOCK - 4, crc);
    b
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let ring_blocks = u32::from(input.u8() % 8) + 1;
    let mut ring = Vec::with_capacity(ring_blocks as usize * BLOCK);
    for _ in 0..ring_blocks {
        let block = match input.u8() % 8 {
            0 => vec![0u8; BLOCK],
            1 => {
                // Raw bytes (magic kept, so the block counts as torn).
                let mut b = vec![0u8; BLOCK];
                b[0..4].copy_from_slice(b"RBAL");
                let len = usize::from(input.u8()) * 16;
                for byte in b[4..4 + len].iter_mut() {
                    *byte = input.u8();
                }
                b
            }
            2 => {
                // Forged, then torn: one byte changed after the checksum.
                let mut b = forge(&mut input, ring_blocks);
                let at = (input.u32() as usize) % BLOCK;
                b[at] ^= input.u8() | 1;
                b
            }
            _ => forge(&mut input, ring_blocks),
        };
        ring.extend_from_slice(&block);
    }

    let found = actlog::recover(&ring);

    // What the valid blocks of the ring name.
    let mut named = BTreeSet::new();
    let mut seqs = BTreeSet::new();
    for chunk in ring.chunks_exact(BLOCK) {
        if let Ok(d) = actlog::decode(chunk) {
            named.extend(d.updates.iter().map(|u| u.extent));
            named.extend(d.context.iter().copied());
            seqs.insert(d.seq);
        }
    }
    assert!(found.extents.windows(2).all(|w| w[0] < w[1]), "{found:?}");
    for e in &found.extents {
        assert!(*e != EMPTY, "EMPTY recovered as an extent");
        assert!(
            named.contains(e),
            "extent {e} recovered but no valid block names it"
        );
    }
    assert!(found.valid <= seqs.len());
    assert!(found.last_seq <= seqs.last().copied().unwrap_or(0));

    // Marking, on a device of fuzzed size: only blocks inside recovered
    // extents are set.
    // Up to 256 MiB: the small extent numbers above fall inside it.
    let size = u64::from(input.u32() % (1 << 16)) * 4096;
    let granularity = 4096u64 << (input.u8() % 8);
    let mut bitmap = DirtyBitmap::new(size, granularity);
    found.mark_out_of_sync(&mut bitmap);
    let extents: BTreeSet<u64> = found.extents.iter().map(|e| u64::from(*e)).collect();
    let mut at = 0;
    while let Some(block) = bitmap.next_set(at) {
        let first = block * granularity / EXTENT_SIZE;
        let last = ((block + 1) * granularity - 1) / EXTENT_SIZE;
        assert!(
            (first..=last).any(|e| extents.contains(&e)),
            "block {block} marked outside every recovered extent"
        );
        at = block + 1;
    }
    // And every recovered extent inside the device is marked.
    for e in &extents {
        let offset = e * EXTENT_SIZE;
        if offset < size {
            assert!(bitmap.is_set(offset / granularity), "extent {e} not marked");
        }
    }
});
