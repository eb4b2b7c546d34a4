//! The out-of-sync bitmap: one bit per block (4 KiB by default) of a
//! device, set when the peer may not have that block's current contents.
//!
//! A plain value type with no I/O. Two levels: the bits themselves in
//! 64-bit words, and a summary with one bit per word that is set when the
//! word has any bit set. Finding the next set bit skips 64 clean words
//! (4096 blocks, 16 MiB at 4 KiB) per summary word read, so walking a
//! mostly clean bitmap costs what is dirty, not what is clean. Ranges are
//! set and cleared a word at a time, and the number of set bits is kept
//! as bits change, so `count` and `bytes` cost nothing.
//!
//! The resync walks the bitmap with a [`Cursor`], which only moves
//! forward: bits set behind it while it walks are found by the next pass
//! (a new cursor from block 0), never by restarting the current one.

/// Default bytes per bit.
pub const DEFAULT_GRANULARITY: u64 = 4096;

/// Bytes of the on-disk bitmap written as one unit (a metadata block).
pub const PAGE_BYTES: usize = 4096;
/// Bits (blocks) per page.
pub const PAGE_BITS: u64 = PAGE_BYTES as u64 * 8;
const PAGE_WORDS: usize = PAGE_BYTES / 8;

#[derive(Debug, Clone)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    /// Bit `i % 64` of `summary[i / 64]`: `words[i] != 0`.
    summary: Vec<u64>,
    blocks: u64,
    granularity: u64,
    set: u64,
    /// One bit per page changed since the on-disk copy last took it
    /// (`take_dirty_pages`): what the lazy write-back has to write.
    changed_pages: Vec<u64>,
}

/// Equal when they mark the same blocks of the same device: what the
/// write-back has still to write is bookkeeping, not content.
impl PartialEq for DirtyBitmap {
    fn eq(&self, other: &Self) -> bool {
        self.blocks == other.blocks
            && self.granularity == other.granularity
            && self.set == other.set
            && self.words == other.words
    }
}

impl Eq for DirtyBitmap {}

/// A mask of bits `lo..hi` of a word (`lo < hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    debug_assert!(lo < hi && hi <= 64);
    let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl DirtyBitmap {
    /// A clean bitmap covering `size` bytes. `granularity` must be a
    /// non-zero power of two (anything else is rounded up to one).
    pub fn new(size: u64, granularity: u64) -> DirtyBitmap {
        let granularity = granularity.max(1).next_power_of_two();
        let blocks = size.div_ceil(granularity);
        let nwords = blocks.div_ceil(64) as usize;
        DirtyBitmap {
            words: vec![0; nwords],
            summary: vec![0; nwords.div_ceil(64)],
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

    /// ORs (`value`) or clears bits `m` of word `w`, keeping the count and
    /// the summary.
    fn apply_word(&mut self, w: usize, m: u64, value: bool) {
        let old = self.words[w];
        let new = if value { old | m } else { old & !m };
        if new == old {
            return;
        }
        self.words[w] = new;
        self.note_change(w as u64 * 64);
        if value {
            self.set += u64::from((new & !old).count_ones());
        } else {
            self.set -= u64::from((old & !new).count_ones());
        }
        let (s, bit) = (w / 64, 1u64 << (w % 64));
        if new == 0 {
            self.summary[s] &= !bit;
        } else {
            self.summary[s] |= bit;
        }
    }

    fn update(&mut self, blocks: std::ops::Range<u64>, value: bool) {
        if blocks.start >= blocks.end {
            return;
        }
        let (first_w, last_w) = (blocks.start / 64, (blocks.end - 1) / 64);
        for w in first_w..=last_w {
            let lo = if w == first_w { blocks.start % 64 } else { 0 };
            let hi = if w == last_w {
                (blocks.end - 1) % 64 + 1
            } else {
                64
            };
            self.apply_word(w as usize, mask(lo, hi), value);
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
        for (w, chunk) in bytes.chunks(8).enumerate().take(self.words.len()) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            let mut m = u64::from_le_bytes(le);
            let base = w as u64 * 64;
            if base + 64 > self.blocks {
                m &= mask(0, self.blocks - base);
            }
            if m != 0 {
                self.apply_word(w, m, true);
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
        let full = self.set * self.granularity;
        if self.blocks > 0 && self.is_set(self.blocks - 1) {
            let beyond = (self.blocks * self.granularity).saturating_sub(device_size);
            full.saturating_sub(beyond.min(self.granularity - 1))
        } else {
            full
        }
    }

    /// Adds every bit of `other` (same granularity) to this bitmap.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        let n = self.words.len().min(other.words.len());
        for s in 0..other.summary.len() {
            let mut sw = other.summary[s];
            while sw != 0 {
                let w = s * 64 + sw.trailing_zeros() as usize;
                sw &= sw - 1;
                if w >= n {
                    return;
                }
                let base = w as u64 * 64;
                let mut m = other.words[w];
                if base + 64 > self.blocks {
                    m &= mask(0, self.blocks - base);
                }
                if m != 0 {
                    self.apply_word(w, m, true);
                }
            }
        }
    }

    /// The first set block at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let w = (from / 64) as usize;
        let here = self.words[w] & !((1u64 << (from % 64)) - 1);
        if here != 0 {
            return Some(w as u64 * 64 + u64::from(here.trailing_zeros()));
        }
        // The summary, from the word after `w`.
        let next = w + 1;
        let mut s = next / 64;
        if s >= self.summary.len() {
            return None;
        }
        let mut sw = self.summary[s] & !((1u64 << (next % 64)) - 1);
        loop {
            if sw != 0 {
                let word = s * 64 + sw.trailing_zeros() as usize;
                let bits = self.words[word];
                debug_assert!(bits != 0, "summary out of step with the words");
                return Some(word as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            s += 1;
            if s >= self.summary.len() {
                return None;
            }
            sw = self.summary[s];
        }
    }

    /// The first clear block at or after `from`, at most `limit` (and at
    /// most the number of blocks).
    pub fn next_clear(&self, from: u64, limit: u64) -> u64 {
        let limit = limit.min(self.blocks);
        let mut b = from;
        while b < limit {
            let w = (b / 64) as usize;
            let inv = !self.words[w] & !((1u64 << (b % 64)) - 1);
            if inv != 0 {
                return (w as u64 * 64 + u64::from(inv.trailing_zeros())).min(limit);
            }
            b = (w as u64 + 1) * 64;
        }
        limit
    }

    /// The first run of set blocks at or after block `from`, at most
    /// `max_blocks` long: `(first block, blocks)`.
    pub fn run_from(&self, from: u64, max_blocks: u64) -> Option<(u64, u64)> {
        let start = self.next_set(from)?;
        let end = self.next_clear(start, start.saturating_add(max_blocks.max(1)));
        Some((start, end - start))
    }

    /// Set blocks as byte runs `(offset, length)`, in ascending order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut cursor = Cursor::new();
        std::iter::from_fn(move || cursor.next_run(self, u64::MAX))
    }
}

/// A forward-only position in a bitmap, for walking its set runs while
/// the bitmap changes between steps (the lock is taken per step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    block: u64,
}

impl Cursor {
    /// At block 0.
    pub fn new() -> Cursor {
        Cursor { block: 0 }
    }

    /// The block the next search starts at.
    pub fn block(&self) -> u64 {
        self.block
    }

    /// Moves forward to `block` (never back).
    pub fn advance_to(&mut self, block: u64) {
        self.block = self.block.max(block);
    }

    /// The next run of set blocks at or after the cursor, at most
    /// `max_bytes` long (at least one block), as a byte range; the cursor
    /// moves past it. `None` once nothing is set from the cursor on (the
    /// cursor then stays at the end).
    pub fn next_run(&mut self, bm: &DirtyBitmap, max_bytes: u64) -> Option<(u64, u64)> {
        let max_blocks = (max_bytes / bm.granularity).max(1);
        match bm.run_from(self.block, max_blocks) {
            Some((start, n)) => {
                self.block = start + n;
                Some((start * bm.granularity, n * bm.granularity))
            }
            None => {
                self.block = bm.blocks;
                None
            }
        }
    }
}

impl Cursor {
    /// Like `next_run`, but only a run that starts before byte `end`, cut
    /// at `end`; the cursor does not move if there is none.
    pub fn next_run_before(
        &mut self,
        bm: &DirtyBitmap,
        end: u64,
        max_bytes: u64,
    ) -> Option<(u64, u64)> {
        let end_block = end.div_ceil(bm.granularity).min(bm.blocks);
        let start = bm.next_set(self.block).filter(|&b| b < end_block)?;
        let max_blocks = (max_bytes / bm.granularity).max(1);
        let stop = bm.next_clear(start, start.saturating_add(max_blocks).min(end_block));
        self.block = stop;
        Some((start * bm.granularity, (stop - start) * bm.granularity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    #[test]
    fn the_summary_finds_a_lone_bit_far_away() {
        // 1 TiB at 4 KiB: 2^28 blocks, 2^22 words, 2^16 summary words.
        let mut bm = DirtyBitmap::new(1 << 40, 4096);
        let far = (1u64 << 28) - 5;
        bm.set_range(far * 4096, 4096);
        assert_eq!(bm.next_set(0), Some(far));
        assert_eq!(bm.next_set(far + 1), None);
        bm.clear_range(far * 4096, 4096);
        assert_eq!(bm.next_set(0), None);
        assert_eq!(bm.count(), 0);
        assert!(bm.summary.iter().all(|&s| s == 0));
    }

    #[test]
    fn a_cursor_never_goes_back_and_a_new_pass_finds_what_was_set_behind() {
        let mut bm = DirtyBitmap::new(1 << 24, 4096);
        bm.set_range(0, 3 * 4096);
        bm.set_range(100 * 4096, 4096);
        let mut c = Cursor::new();
        assert_eq!(c.next_run(&bm, 8192), Some((0, 8192)));
        assert_eq!(c.next_run(&bm, 8192), Some((8192, 4096)));
        bm.clear_range(0, 3 * 4096);
        // Ahead of the cursor: seen by this pass; behind it: by the next.
        bm.set_range(50 * 4096, 4096);
        bm.set_range(4096 + 1, 1);
        assert_eq!(c.next_run(&bm, 1 << 20), Some((50 * 4096, 4096)));
        assert_eq!(c.next_run(&bm, 1 << 20), Some((100 * 4096, 4096)));
        assert_eq!(c.next_run(&bm, 1 << 20), None);
        assert_eq!(c.next_run(&bm, 1 << 20), None);
        let mut pass2 = Cursor::new();
        assert_eq!(pass2.next_run(&bm, 1 << 20), Some((4096, 4096)));
    }

    #[test]
    fn bytes_of_a_partial_last_block() {
        let mut bm = DirtyBitmap::new(10_000, 4096);
        bm.set_all();
        assert_eq!(bm.bytes(10_000), 10_000);
        bm.clear_range(8192, 1);
        assert_eq!(bm.bytes(10_000), 8192);
    }

    /// What the bitmap must behave like: one bool per block.
    #[derive(Debug, Clone)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
        SetAll,
        MergeBytes(Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        let size = 300 * 64 * 512u64;
        prop_oneof![
            8 => (0..size, 0..size / 8).prop_map(|(o, l)| Op::Set(o, l)),
            8 => (0..size, 0..size / 4).prop_map(|(o, l)| Op::Clear(o, l)),
            1 => Just(Op::SetAll),
            1 => proptest::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 0..2500)
                .prop_map(Op::MergeBytes),
        ]
    }

    proptest! {
        #[test]
        fn matches_a_plain_model(
            blocks in 1u64..(300 * 64),
            ops in proptest::collection::vec(op(), 1..40),
            starts in proptest::collection::vec(0u64..(300 * 64 + 10), 1..20),
            max in 1u64..5000,
        ) {
            let g = 512u64;
            let size = blocks * g - (blocks % 7);
            let mut bm = DirtyBitmap::new(size, g);
            let mut model = vec![false; blocks as usize];
            for op in &ops {
                match op {
                    Op::Set(o, l) | Op::Clear(o, l) => {
                        let value = matches!(op, Op::Set(..));
                        if value { bm.set_range(*o, *l) } else { bm.clear_range(*o, *l) }
                        if *l > 0 {
                            let first = o / g;
                            let last = (o + l - 1) / g;
                            for b in first..=last.min(blocks - 1) {
                                if let Some(m) = model.get_mut(b as usize) { *m = value; }
                            }
                        }
                    }
                    Op::SetAll => { bm.set_all(); model.iter_mut().for_each(|m| *m = true); }
                    Op::MergeBytes(bytes) => {
                        bm.merge_bytes(bytes);
                        for (b, m) in model.iter_mut().enumerate() {
                            if bytes.get(b / 8).is_some_and(|x| x & (1 << (b % 8)) != 0) { *m = true; }
                        }
                    }
                }
                prop_assert_eq!(bm.count(), model.iter().filter(|&&m| m).count() as u64);
            }
            for b in 0..blocks {
                prop_assert_eq!(bm.is_set(b), model[b as usize]);
            }
            for (w, &word) in bm.words.iter().enumerate() {
                prop_assert_eq!(bm.summary[w / 64] & (1 << (w % 64)) != 0, word != 0);
            }
            for &s in &starts {
                let want = (s..blocks).find(|&b| model[b as usize]);
                prop_assert_eq!(bm.next_set(s), want);
                let want_clear = (s..blocks.min(s + max)).find(|&b| !model[b as usize])
                    .unwrap_or(blocks.min(s + max).max(s));
                if s < blocks {
                    prop_assert_eq!(bm.next_clear(s, s + max), want_clear);
                }
            }
            // Runs: maximal, ascending, exactly the set blocks.
            let mut expect = Vec::new();
            let mut b = 0;
            while b < blocks {
                if model[b as usize] {
                    let s = b;
                    while b < blocks && model[b as usize] { b += 1; }
                    expect.push((s * g, (b - s) * g));
                } else { b += 1; }
            }
            prop_assert_eq!(bm.runs().collect::<Vec<_>>(), expect);
            // A cursor with a length limit covers the same blocks.
            let mut c = Cursor::new();
            let mut covered = vec![false; blocks as usize];
            while let Some((o, l)) = c.next_run(&bm, max * g) {
                prop_assert!(l <= max * g);
                for blk in o / g..(o + l) / g {
                    prop_assert!(!covered[blk as usize]);
                    covered[blk as usize] = true;
                }
            }
            prop_assert_eq!(&covered, &model);
            // Runs gathered span by span cover the same blocks too.
            let mut c = Cursor::new();
            let mut spans = vec![false; blocks as usize];
            while let Some((o, l)) = c.next_run(&bm, max * g) {
                let mut mark = |o: u64, l: u64| {
                    for blk in o / g..(o + l) / g {
                        assert!(!spans[blk as usize]);
                        spans[blk as usize] = true;
                    }
                };
                mark(o, l);
                let end = o + 3 * max * g;
                while let Some((o2, l2)) = c.next_run_before(&bm, end, max * g) {
                    prop_assert!(o2 + l2 <= end && l2 <= max * g && l2 > 0);
                    mark(o2, l2);
                }
            }
            prop_assert_eq!(&spans, &model);
            let expected_bytes: u64 = (0..blocks).filter(|&b| model[b as usize])
                .map(|b| g.min(size - b * g)).sum();
            prop_assert_eq!(bm.bytes(size), expected_bytes);
            let mut copy = DirtyBitmap::new(size, g);
            copy.merge_bytes(&bm.to_bytes());
            prop_assert_eq!(&copy, &bm);
            let mut other = DirtyBitmap::new(size, g);
            other.merge(&bm);
            prop_assert_eq!(&other, &bm);
        }
    }
}
