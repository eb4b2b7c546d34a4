//! Stable pages for a buffered backing store: no write copies into a
//! page while the kernel may be writing that page back.
//!
//! Buffered writes go through the page cache, and unless the disk asks
//! for stable pages (most do not: `queue/stable_writes` is 0), the kernel
//! lets a write copy into a page whose writeback is under way. The disk
//! then gets a mix of the old and the new bytes, at any byte boundary,
//! and the page is written again later. A power cut in between leaves a
//! block that holds neither write, though the old one was flushed: a
//! flushed write lost, which no disk does (a sector is written whole or
//! not at all). It needs an overwrite racing a writeback, so a block
//! rewritten while a flush runs, which is common: a database rewrites the
//! tail of its log while the previous commit's flush runs, and a
//! Secondary applies the next writes while its flusher flushes.
//!
//! This is the bookkeeping that prevents it for the writebacks the
//! process starts itself (`fdatasync` for a flush,
//! `sync_file_range` for a resync's early writeback): pure, no I/O; the
//! store's shell (`store::FileStore`) blocks where it says to wait.
//!
//! - A write registers the blocks it covers as written (since the last
//!   flush began) before it copies, and says when it is done.
//! - A writeback starts when no other one runs; it first waits for every
//!   write that began before it to finish copying (a page it reaches is
//!   then whole), and a flush (a writeback of everything) takes the
//!   written blocks with it: those are what it writes back.
//! - While a writeback runs, a write to any block written since the last
//!   flush began (the pages it may be writing back) waits for it to end;
//!   a write to other blocks goes ahead: their pages are clean, and a
//!   writeback that reaches one of them after the copy writes it whole.
//!
//! Writeback the kernel starts on its own (dirty pages older than
//! `dirty_expire_centisecs`, or past the dirty thresholds) is not seen
//! here; `docs/operations.md` says how to close that gap too
//! (`stable_writes` on the disk).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// Blocks are tracked at this size (the page size).
pub const BLOCK: u64 = 4096;

/// Blocks are tracked in chunks of this many (2 MiB), a 512-bit map
/// each: a 1 MiB write sets bits in one or two chunks.
const CHUNK_BLOCKS: u64 = 512;
const CHUNK_WORDS: usize = (CHUNK_BLOCKS / 64) as usize;

/// Past this many chunks written since the last flush began (scattered
/// 4 KiB writes: 2^16 of them, 4 MiB of maps; written in whole: 128 GiB),
/// blocks are no longer tracked: every block counts as written (so writes
/// wait for a running writeback) until the next flush.
pub const MAX_CHUNKS: usize = 1 << 16;

/// The chunk number is its own hash, spread by one multiplication.
#[derive(Default)]
struct ChunkHash(u64);

impl Hasher for ChunkHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The bits of `map` for blocks `lo..=hi` of one chunk, as (word, mask).
fn words(lo: u64, hi: u64) -> impl Iterator<Item = (usize, u64)> {
    (lo / 64..=hi / 64).map(move |w| {
        let from = lo.max(w * 64) - w * 64;
        let to = hi.min(w * 64 + 63) - w * 64;
        let mask = (u64::MAX >> (63 - to)) & (u64::MAX << from);
        (w as usize, mask)
    })
}

/// A set of blocks that may overflow into "all of them".
#[derive(Default)]
struct Blocks {
    chunks: HashMap<u64, [u64; CHUNK_WORDS], BuildHasherDefault<ChunkHash>>,
    all: bool,
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocks")
            .field("chunks", &self.chunks.len())
            .field("all", &self.all)
            .finish()
    }
}

/// The chunks `first..=last` touches, each with its first and last block
/// within the chunk.
fn spans(first: u64, last: u64) -> impl Iterator<Item = (u64, u64, u64)> {
    (first / CHUNK_BLOCKS..=last / CHUNK_BLOCKS).map(move |c| {
        let base = c * CHUNK_BLOCKS;
        let lo = first.max(base) - base;
        let hi = last.min(base + CHUNK_BLOCKS - 1) - base;
        (c, lo, hi)
    })
}

impl Blocks {
    fn hits(&self, first: u64, last: u64) -> bool {
        if self.all {
            return true;
        }
        if self.chunks.is_empty() {
            return false;
        }
        spans(first, last).any(|(c, lo, hi)| {
            self.chunks
                .get(&c)
                .is_some_and(|map| words(lo, hi).any(|(w, mask)| map[w] & mask != 0))
        })
    }

    fn add(&mut self, first: u64, last: u64) {
        if self.all {
            return;
        }
        for (c, lo, hi) in spans(first, last) {
            if self.chunks.len() >= MAX_CHUNKS && !self.chunks.contains_key(&c) {
                self.all = true;
                self.chunks = HashMap::default();
                return;
            }
            let map = self.chunks.entry(c).or_insert([0; CHUNK_WORDS]);
            for (w, mask) in words(lo, hi) {
                map[w] |= mask;
            }
        }
    }
}

/// A write registered with [`Stable::begin_write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTicket {
    epoch: u64,
}

/// A writeback registered with [`Stable::begin_writeback`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritebackTicket {
    epoch: u64,
    flush: bool,
}

/// The state: which blocks may have dirty pages, the running writeback,
/// and the writes still copying.
#[derive(Debug, Default)]
pub struct Stable {
    /// Written since the running flush (or the last one) began.
    written: Blocks,
    /// Written before the running flush began: what it writes back.
    flushing: Blocks,
    /// The writeback under way, if any.
    running: Option<WritebackTicket>,
    /// Bumped as each writeback begins: a write's epoch tells whether it
    /// began before a given writeback.
    epoch: u64,
    /// Writes copying, counted by the epoch they began in.
    copying: BTreeMap<u64, usize>,
}

/// The blocks `[offset, offset + len)` touches (`len` > 0).
fn blocks(offset: u64, len: u64) -> (u64, u64) {
    let last = offset.saturating_add(len - 1);
    (offset / BLOCK, last / BLOCK)
}

impl Stable {
    #[cfg(test)]
    pub fn new() -> Stable {
        Stable::default()
    }

    /// A write of `[offset, offset + len)` may copy now (`Some`, which the
    /// caller hands back to [`end_write`](Self::end_write) once the copy
    /// returned), or must wait for the running writeback to end (`None`:
    /// ask again after [`end_writeback`](Self::end_writeback)).
    pub fn begin_write(&mut self, offset: u64, len: u64) -> Option<WriteTicket> {
        if len == 0 {
            return Some(self.count_write());
        }
        let (first, last) = blocks(offset, len);
        if self.running.is_some()
            && (self.written.hits(first, last) || self.flushing.hits(first, last))
        {
            return None;
        }
        self.written.add(first, last);
        Some(self.count_write())
    }

    fn count_write(&mut self) -> WriteTicket {
        *self.copying.entry(self.epoch).or_insert(0) += 1;
        WriteTicket { epoch: self.epoch }
    }

    /// The write's copy returned. True when a writeback may now be able
    /// to go on (wake its waiter).
    pub fn end_write(&mut self, ticket: WriteTicket) -> bool {
        if let Some(n) = self.copying.get_mut(&ticket.epoch) {
            *n -= 1;
            if *n == 0 {
                self.copying.remove(&ticket.epoch);
            }
        }
        self.running.is_some_and(|r| ticket.epoch < r.epoch)
    }

    /// A writeback may begin (`Some`: then wait until
    /// [`writeback_may_go`](Self::writeback_may_go) before starting it),
    /// or another one runs (`None`: ask again once it ended). `flush`: it
    /// writes back everything (`fdatasync`), not just a range.
    pub fn begin_writeback(&mut self, flush: bool) -> Option<WritebackTicket> {
        if self.running.is_some() {
            return None;
        }
        self.epoch += 1;
        let ticket = WritebackTicket {
            epoch: self.epoch,
            flush,
        };
        if flush {
            self.flushing = std::mem::take(&mut self.written);
        }
        self.running = Some(ticket);
        Some(ticket)
    }

    /// Every write that began before the writeback has finished copying.
    pub fn writeback_may_go(&self, ticket: WritebackTicket) -> bool {
        self.copying.range(..ticket.epoch).next().is_none()
    }

    /// The writeback returned (whether or not it succeeded: the pages it
    /// reached are no longer being written). Writes that waited may go.
    pub fn end_writeback(&mut self, ticket: WritebackTicket) {
        if self.running != Some(ticket) {
            return;
        }
        self.running = None;
        if ticket.flush {
            // Written back: clean, unless written again meanwhile (those
            // are in `written`).
            self.flushing = Blocks::default();
        }
    }

    /// Whether a writeback is under way.
    #[cfg(test)]
    pub fn writeback_running(&self) -> bool {
        self.running.is_some()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const K4: u64 = BLOCK;

    #[test]
    fn without_a_writeback_every_write_goes_ahead() {
        let mut s = Stable::new();
        let a = s.begin_write(0, K4).expect("goes");
        let b = s.begin_write(0, K4).expect("goes");
        assert!(!s.end_write(a));
        assert!(!s.end_write(b));
    }

    #[test]
    fn a_flush_waits_for_the_writes_that_began_before_it() {
        let mut s = Stable::new();
        let w = s.begin_write(0, K4).unwrap();
        let f = s.begin_writeback(true).unwrap();
        assert!(!s.writeback_may_go(f));
        // A write to a clean block during the flush does not hold it up.
        let other = s.begin_write(10 * K4, K4).unwrap();
        assert!(!s.writeback_may_go(f));
        assert!(s.end_write(w), "the flush's waiter is woken");
        assert!(s.writeback_may_go(f));
        assert!(!s.end_write(other));
        s.end_writeback(f);
    }

    #[test]
    fn while_a_flush_runs_a_written_block_waits_and_a_clean_one_goes() {
        let mut s = Stable::new();
        let w = s.begin_write(4 * K4, 2 * K4).unwrap();
        s.end_write(w);
        let f = s.begin_writeback(true).unwrap();
        assert!(s.writeback_may_go(f));
        // Blocks 4 and 5 may be under writeback.
        assert_eq!(s.begin_write(5 * K4, K4), None);
        assert_eq!(s.begin_write(3 * K4, 2 * K4), None, "overlaps block 4");
        assert_eq!(s.begin_write(5 * K4 + 100, 10), None, "inside block 5");
        // Block 7 is clean; once written it too may be written back by
        // the running flush, so a second write to it waits.
        let c = s.begin_write(7 * K4, K4).unwrap();
        s.end_write(c);
        assert_eq!(s.begin_write(7 * K4, K4), None);
        s.end_writeback(f);
        // After the flush: block 4 is clean; block 7, written during the
        // flush, is dirty again, which matters only to the next one.
        assert!(s.begin_write(4 * K4, K4).is_some());
        assert!(s.begin_write(7 * K4, K4).is_some());
    }

    #[test]
    fn one_writeback_at_a_time() {
        let mut s = Stable::new();
        let f = s.begin_writeback(true).unwrap();
        assert_eq!(s.begin_writeback(true), None);
        assert_eq!(s.begin_writeback(false), None);
        s.end_writeback(f);
        let g = s.begin_writeback(false).unwrap();
        assert!(s.writeback_running());
        s.end_writeback(g);
        assert!(!s.writeback_running());
    }

    #[test]
    fn a_ranged_writeback_holds_back_writes_to_written_blocks_and_cleans_nothing() {
        let mut s = Stable::new();
        let w = s.begin_write(0, K4).unwrap();
        s.end_write(w);
        let r = s.begin_writeback(false).unwrap();
        assert_eq!(s.begin_write(0, K4), None);
        s.end_writeback(r);
        let w = s.begin_write(0, K4).unwrap();
        s.end_write(w);
        // Still written: a flush now holds it back.
        let f = s.begin_writeback(true).unwrap();
        assert_eq!(s.begin_write(0, K4), None);
        s.end_writeback(f);
    }

    #[test]
    fn past_the_tracking_limit_every_block_counts_as_written_until_a_flush() {
        let mut s = Stable::new();
        // One block in each of MAX_CHUNKS + 1 chunks.
        for c in 0..=MAX_CHUNKS as u64 {
            let w = s.begin_write(c * CHUNK_BLOCKS * K4, K4).unwrap();
            s.end_write(w);
        }
        let far = (MAX_CHUNKS as u64 + 10) * CHUNK_BLOCKS * K4;
        let f = s.begin_writeback(false).unwrap();
        assert_eq!(s.begin_write(far, K4), None, "untracked: assumed written");
        s.end_writeback(f);
        let f = s.begin_writeback(true).unwrap();
        assert_eq!(s.begin_write(far, K4), None);
        s.end_writeback(f);
        let f = s.begin_writeback(true).unwrap();
        assert!(
            s.begin_write(far, K4).is_some(),
            "tracked again after a flush"
        );
        s.end_writeback(f);
    }

    #[test]
    fn blocks_are_told_apart_within_and_across_chunks() {
        let mut b = Blocks::default();
        b.add(63, 64);
        b.add(511, 513);
        b.add(2000, 2000);
        for hit in [63, 64, 511, 512, 513, 2000] {
            assert!(b.hits(hit, hit), "block {hit}");
        }
        for miss in [0, 62, 65, 127, 510, 514, 1999, 2001, 1 << 40] {
            assert!(!b.hits(miss, miss), "block {miss}");
        }
        assert!(b.hits(0, 63));
        assert!(!b.hits(65, 510));
        assert!(b.hits(65, 511));
        assert!(!b.hits(514, 1999));
        assert!(b.hits(0, 1 << 40));
        // A range spanning many chunks sets every bit of it.
        let mut b = Blocks::default();
        b.add(100, 100 + 3 * CHUNK_BLOCKS);
        assert!((100..=100 + 3 * CHUNK_BLOCKS).all(|x| b.hits(x, x)));
        assert!(!b.hits(99, 99));
        assert!(!b.hits(101 + 3 * CHUNK_BLOCKS, 101 + 3 * CHUNK_BLOCKS));
    }

    #[test]
    fn a_stale_ticket_ends_nothing() {
        let mut s = Stable::new();
        let f = s.begin_writeback(true).unwrap();
        s.end_writeback(f);
        let g = s.begin_writeback(true).unwrap();
        s.end_writeback(f);
        assert!(s.writeback_running());
        s.end_writeback(g);
        assert!(!s.writeback_running());
    }
}
