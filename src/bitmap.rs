//! The out-of-sync bitmap: one bit per block (4 KiB by default) of a
//! device, set when the peer may not have that block's current contents.
//!
//! A plain value type with no I/O. The replication engine marks ranges
//! here; the persistent on-disk bitmap and resync planning of later work
//! build on the same operations (`set_range`, `clear_range`, `merge`,
//! `count`, `runs`).

/// Default bytes per bit.
pub const DEFAULT_GRANULARITY: u64 = 4096;

/// Bytes of the on-disk bitmap written as one unit (a metadata block).
pub const PAGE_BYTES: usize = 4096;
/// Bits (blocks) per page.
pub const PAGE_BITS: u64 = PAGE_BYTES as u64 * 8;
const PAGE_WORDS: usize = PAGE_BYTES / 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    blocks: u64,
    granularity: u64,
    set: u64,
    /// One bit per page changed since the on-disk copy last took it
    /// (`take_dirty_pages`): what the lazy write-back has to write.
    changed_pages: Vec<u64>,
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
            changed_pages: vec![0; blocks.div_ceil(PAGE_BITS).div_ceil(64) as usize],
        }
    }

    /// Records that the page holding `block` changed. Every change of a
    /// bit goes through here.
    fn note_change(&mut self, block: u64) {
        let page = block / PAGE_BITS;
        self.changed_pages[(page / 64) as usize] |= 1 << (page % 64);
    }

    /// Pages of the on-disk form (`PAGE_BYTES` each; the last one may
    /// cover fewer blocks).
    pub fn pages(&self) -> u64 {
        self.blocks.div_ceil(PAGE_BITS)
    }

    /// Pages changed since the last call, ascending; the record is reset.
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.changed_pages.iter_mut().enumerate() {
            let mut bits = std::mem::take(w);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Whether `page` changed since its record was last taken.
    pub fn page_changed(&self, page: u64) -> bool {
        page < self.pages() && self.changed_pages[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// Resets the record of `page` and returns its on-disk bytes.
    pub fn take_page(&mut self, page: u64) -> Vec<u8> {
        if page < self.pages() {
            self.changed_pages[(page / 64) as usize] &= !(1 << (page % 64));
        }
        self.page_bytes(page)
    }

    /// Marks `page` as changed (a write of it failed).
    pub fn touch_page(&mut self, page: u64) {
        if page < self.pages() {
            self.changed_pages[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Marks every page as changed (the whole bitmap is to be written).
    pub fn touch_all_pages(&mut self) {
        for p in 0..self.pages() {
            self.changed_pages[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Page `page` in the on-disk form, `PAGE_BYTES` long (zero past the
    /// end of the device).
    pub fn page_bytes(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; PAGE_BYTES];
        let first = (page as usize).saturating_mul(PAGE_WORDS);
        for (i, w) in self.words.iter().skip(first).take(PAGE_WORDS).enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        out
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
                self.note_change(b);
            } else if !value && was {
                self.words[w] &= !bit;
                self.set -= 1;
                self.note_change(b);
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
    fn changed_pages_are_recorded_and_taken() {
        // Three pages: 2 full ones and a short one.
        let mut bm = DirtyBitmap::new((2 * PAGE_BITS + 10) * 4096, 4096);
        assert_eq!(bm.pages(), 3);
        assert!(bm.take_dirty_pages().is_empty());
        bm.set_range(0, 4096);
        bm.set_range((2 * PAGE_BITS + 3) * 4096, 4096);
        bm.set_range(0, 4096); // no change, nothing new
        assert!(bm.page_changed(0) && !bm.page_changed(1) && bm.page_changed(2));
        assert_eq!(bm.take_dirty_pages(), vec![0, 2]);
        assert!(bm.take_dirty_pages().is_empty());
        bm.clear_range(0, 4096);
        assert_eq!(bm.take_page(0)[0], 0);
        assert!(!bm.page_changed(0));
        let last = bm.page_bytes(2);
        assert_eq!(last.len(), PAGE_BYTES);
        assert_eq!(last[0], 1 << 3);
        // The pages laid end to end are the on-disk form.
        let bytes = bm.to_bytes();
        let pages: Vec<u8> = (0..3).flat_map(|p| bm.page_bytes(p)).collect();
        assert_eq!(&pages[..bytes.len()], &bytes[..]);
        bm.touch_all_pages();
        assert_eq!(bm.take_dirty_pages(), vec![0, 1, 2]);
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
