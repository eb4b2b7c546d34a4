//! The out-of-sync bitmap: one bit per block (4 KiB by default) of a
//! device, set when the peer may not have that block's current contents.
//!
//! A plain value type with no I/O. The replication engine marks ranges
//! here; the persistent on-disk bitmap and resync planning of later work
//! build on the same operations (`set_range`, `clear_range`, `merge`,
//! `count`, `runs`).

/// Default bytes per bit.
pub const DEFAULT_GRANULARITY: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    blocks: u64,
    granularity: u64,
    set: u64,
}

impl DirtyBitmap {
    /// A clean bitmap covering `size` bytes. `granularity` must be a
    /// non-zero power of two.
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        let granularity = granularity.max(1).next_power_of_two();
        let blocks = size.div_ceil(granularity);
        DirtyBitmap {
            words: vec![0; blocks.div_ceil(64) as usize],
            blocks,
            granularity,
            set: 0,
        }
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Blocks touched by `[offset, offset + len)`, clipped to the device.
    fn block_range(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        if len == 0 {
            return 0..0;
        }
        let first = offset / self.granularity;
        let last = offset.saturating_add(len - 1) / self.granularity;
        first.min(self.blocks)..(last + 1).min(self.blocks)
    }

    fn update(&mut self, blocks: std::ops::Range<u64>, value: bool) {
        for b in blocks {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            let was = self.words[w] & bit != 0;
            if value && !was {
                self.words[w] |= bit;
                self.set += 1;
            } else if !value && was {
                self.words[w] &= !bit;
                self.set -= 1;
            }
        }
    }

    /// The bits as little-endian bytes (bit `b` is bit `b % 8` of byte
    /// `b / 8`), `blocks.div_ceil(8)` long: the on-disk form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.blocks.div_ceil(8) as usize);
        out
    }

    /// Sets every bit that is set in `bytes` (the form `to_bytes` gives);
    /// bits beyond the device are ignored.
    pub fn merge_bytes(&mut self, bytes: &[u8]) {
        for (i, byte) in bytes.iter().enumerate() {
            for bit in 0..8u64 {
                let b = i as u64 * 8 + bit;
                if byte & (1 << bit) != 0 && b < self.blocks {
                    self.update(b..b + 1, true);
                }
            }
        }
    }

    /// Marks every block.
    pub fn set_all(&mut self) {
        self.update(0..self.blocks, true);
    }

    /// Marks every block the byte range touches.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        let r = self.block_range(offset, len);
        self.update(r, true);
    }

    /// Clears the blocks the byte range fully or partly covers.
    pub fn clear_range(&mut self, offset: u64, len: u64) {
        let r = self.block_range(offset, len);
        self.update(r, false);
    }

    pub fn is_set(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Number of set blocks.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Bytes covered by set blocks (the last block may be partial).
    pub fn bytes(&self, device_size: u64) -> u64 {
        self.runs()
            .map(|(off, len)| len.min(device_size.saturating_sub(off)))
            .sum()
    }

    /// Adds every bit of `other` (same geometry) to this bitmap.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for b in 0..self.blocks.min(other.blocks) {
            if other.is_set(b) && !self.is_set(b) {
                self.update(b..b + 1, true);
            }
        }
    }

    /// Set blocks as byte runs `(offset, length)`, in ascending order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut b = 0;
        std::iter::from_fn(move || {
            while b < self.blocks && !self.is_set(b) {
                // Skip clean words quickly.
                if b % 64 == 0 && self.words[(b / 64) as usize] == 0 {
                    b += 64;
                } else {
                    b += 1;
                }
            }
            if b >= self.blocks {
                return None;
            }
            let start = b;
            while b < self.blocks && self.is_set(b) {
                b += 1;
            }
            Some((start * self.granularity, (b - start) * self.granularity))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_ranges_mark_every_block_they_touch() {
        let mut bm = DirtyBitmap::new(1 << 20, 4096);
        bm.set_range(4095, 2);
        assert_eq!(bm.runs().collect::<Vec<_>>(), [(0, 8192)]);
        assert_eq!(bm.count(), 2);
        bm.set_range(4096, 1);
        assert_eq!(bm.count(), 2, "setting a set bit does not count twice");
    }

    #[test]
    fn ranges_past_the_end_are_clipped_and_empty_ranges_ignored() {
        let mut bm = DirtyBitmap::new(10_000, 4096);
        assert_eq!(bm.blocks(), 3);
        bm.set_range(8192, 1 << 30);
        bm.set_range(0, 0);
        bm.set_range(u64::MAX - 1, 10);
        assert_eq!(bm.runs().collect::<Vec<_>>(), [(8192, 4096)]);
        assert_eq!(bm.bytes(10_000), 10_000 - 8192);
    }

    #[test]
    fn runs_merge_adjacent_blocks_across_word_boundaries() {
        let mut bm = DirtyBitmap::new(1 << 30, 4096);
        bm.set_range(60 * 4096, 10 * 4096);
        bm.set_range(200 * 4096, 4096);
        let runs: Vec<_> = bm.runs().collect();
        assert_eq!(runs, [(60 * 4096, 10 * 4096), (200 * 4096, 4096)]);
        bm.clear_range(60 * 4096, 5 * 4096);
        assert_eq!(bm.runs().next(), Some((65 * 4096, 5 * 4096)));
        assert_eq!(bm.count(), 6);
    }

    #[test]
    fn merge_is_a_union() {
        let mut a = DirtyBitmap::new(1 << 20, 4096);
        let mut b = a.clone();
        a.set_range(0, 4096);
        b.set_range(0, 8192);
        b.set_range(65536, 1);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.runs().collect::<Vec<_>>(), [(0, 8192), (65536, 4096)]);
    }

    #[test]
    fn bytes_round_trip() {
        let mut a = DirtyBitmap::new(100 * 4096, 4096);
        a.set_range(0, 1);
        a.set_range(9 * 4096, 4096);
        a.set_range(99 * 4096, 4096);
        let bytes = a.to_bytes();
        assert_eq!(bytes.len(), 13);
        let mut b = DirtyBitmap::new(100 * 4096, 4096);
        b.merge_bytes(&bytes);
        assert_eq!(a, b);
        b.merge_bytes(&[0xff; 20]);
        assert_eq!(b.count(), 100);
    }
}
