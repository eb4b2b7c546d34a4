//! The activity log, sans I/O: which 4 MiB extents of the device may have
//! writes in flight, recorded on disk before any write to them is issued,
//! so that after a crash only those extents (plus the persisted bitmap)
//! need a resync, not the whole device.
//!
//! # The hot set
//!
//! A table of `capacity` slots, each empty or holding one extent number.
//! An extent must be in the table (hot) before a write to it is issued;
//! making a cold extent hot may evict another one, chosen by the CLOCK
//! algorithm (an approximation of least-recently-used): the shell keeps a
//! "referenced" bit per hot extent that its write path sets, and the clock
//! hand gives each referenced extent a second chance before taking it.
//! The shell also decides whether a candidate may go at all (it may not
//! while writes to it are in flight); see [`ActivityLog::plan`].
//!
//! # Transactions
//!
//! Each change of the table is one transaction, written as one 4 KiB
//! block into a ring of `ring_blocks` blocks (the activity-log area of
//! the metadata) and made durable before the writes it covers are
//! issued. A block holds the slot changes (up to [`MAX_UPDATES`]), a
//! sequence number, and a window of [`CONTEXT_SLOTS`] consecutive slots
//! of the whole table as it is after the changes (the window advances
//! with every transaction and wraps), so that the newest
//! `ring_blocks - 1` transactions together describe every slot. On
//! recovery the valid blocks (crc32c, magic, sane fields) are replayed
//! in sequence order; a torn or corrupt block is skipped. If the valid
//! sequence numbers are not consecutive (a block in the middle went bad)
//! recovery returns every extent named anywhere in the ring instead: a
//! superset, which costs resync time but never loses a write.
//!
//! # Block format (little-endian)
//!
//! | offset | size | field                                                |
//! |--------|------|------------------------------------------------------|
//! | 0      | 4    | magic `b"RBAL"`                                      |
//! | 4      | 2    | block format, u16 = 1                                |
//! | 6      | 2    | number of slot changes `n` (≤ 64)                    |
//! | 8      | 8    | transaction sequence number, u64 (≥ 1)               |
//! | 16     | 4    | table capacity (slots), u32                          |
//! | 20     | 4    | first slot of the context window, u32                |
//! | 24     | 4    | slots in the context window, u32 (≤ 768)             |
//! | 28     | 4    | reserved, zero                                       |
//! | 32     | 512  | 64 changes: slot u32, extent u32 (`EMPTY` = freed)   |
//! | 544    | 3072 | 768 context entries: extent u32 (`EMPTY` = free)     |
//! | 3616   | 476  | reserved, zero                                       |
//! | 4092   | 4    | crc32c of bytes 0..4092                              |

use super::le::{get_u32, get_u64, put_u32, put_u64};
use std::collections::{BTreeSet, HashMap};

/// Bytes per extent: 4 MiB, as DRBD's activity log.
pub const EXTENT_SHIFT: u32 = 22;
pub const EXTENT_SIZE: u64 = 1 << EXTENT_SHIFT;
/// Bytes per transaction block.
pub const BLOCK: usize = 4096;
/// Slot changes one transaction can hold.
pub const MAX_UPDATES: usize = 64;
/// Table slots each transaction repeats.
pub const CONTEXT_SLOTS: usize = 768;
/// A free slot.
pub const EMPTY: u32 = u32::MAX;
/// The default hot-set size (DRBD's default: about 4.8 GiB).
pub const DEFAULT_EXTENTS: u32 = 1237;
/// The smallest hot set accepted (besides 0, which disables the log): a
/// request may span up to 9 extents and several are in flight at once.
pub const MIN_EXTENTS: u32 = 16;

const MAGIC: &[u8; 4] = b"RBAL";
const FORMAT: u16 = 1;
const OFF_N: usize = 6;
const OFF_SEQ: usize = 8;
const OFF_CAP: usize = 16;
const OFF_CTX_START: usize = 20;
const OFF_CTX_LEN: usize = 24;
const OFF_UPDATES: usize = 32;
const OFF_CONTEXT: usize = OFF_UPDATES + 8 * MAX_UPDATES;
const OFF_CRC: usize = BLOCK - 4;
const _: () = assert!(OFF_CONTEXT + 4 * CONTEXT_SLOTS <= OFF_CRC);

/// The largest hot set a ring of `ring_blocks` blocks can describe: the
/// newest `ring_blocks - 1` transactions (the newest may be torn) must
/// cover every slot with their context windows.
pub fn max_extents(ring_blocks: u32) -> u32 {
    ring_blocks
        .saturating_sub(1)
        .saturating_mul(CONTEXT_SLOTS as u32)
}

/// Extents `[first, last]` touched by the byte range `[offset, offset +
/// len)`; `None` for an empty range.
pub fn extents(offset: u64, len: u64) -> Option<(u32, u32)> {
    if len == 0 {
        return None;
    }
    let first = offset >> EXTENT_SHIFT;
    let last = offset.saturating_add(len - 1) >> EXTENT_SHIFT;
    Some((
        u32::try_from(first).unwrap_or(EMPTY - 1),
        u32::try_from(last).unwrap_or(EMPTY - 1),
    ))
}

/// One slot change: `slot` now holds `extent` (or is free).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update {
    pub slot: u32,
    pub extent: u32,
}

/// What the shell says of an eviction candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    /// Taken: it may be evicted (the shell now keeps new writes off it).
    Take,
    /// Recently used: its referenced bit was cleared; a second chance.
    Referenced,
    /// In use (writes in flight, or wanted by this very request).
    Busy,
}

/// The hot set and the transaction stream.
#[derive(Debug, Clone)]
pub struct ActivityLog {
    slots: Vec<u32>,
    index: HashMap<u32, u32>,
    free: BTreeSet<u32>,
    hand: u32,
    seq: u64,
    ring_blocks: u32,
    ctx_cursor: u32,
    /// Sequence number and window cursor before the last `commit`, for
    /// `forget` to take it back.
    undo: Option<(u64, u32)>,
}

/// A transaction ready to be written.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub seq: u64,
    /// Ring position of the block (0-based).
    pub index: u32,
    pub block: Box<[u8; BLOCK]>,
}

impl ActivityLog {
    /// An empty table of `capacity` slots whose next transaction has
    /// sequence number `last_seq + 1` and goes to the block after it.
    /// `capacity` must be at most `max_extents(ring_blocks)`.
    pub fn new(capacity: u32, ring_blocks: u32, last_seq: u64) -> ActivityLog {
        assert!(capacity > 0 && capacity <= max_extents(ring_blocks));
        ActivityLog {
            slots: vec![EMPTY; capacity as usize],
            index: HashMap::new(),
            free: (0..capacity).collect(),
            hand: 0,
            seq: last_seq,
            ring_blocks,
            ctx_cursor: 0,
            undo: None,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Extents in the hot set.
    pub fn active(&self) -> u32 {
        self.index.len() as u32
    }

    /// Sequence number of the last transaction built.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn contains(&self, extent: u32) -> bool {
        self.index.contains_key(&extent)
    }

    /// The hot extents, in slot order.
    pub fn hot(&self) -> Vec<u32> {
        self.slots.iter().copied().filter(|&e| e != EMPTY).collect()
    }

    /// The slot changes that make every extent of `wanted` hot (those
    /// already hot are skipped): free slots first, then victims found by
    /// the clock hand, asking `candidate` about each. If anything has to
    /// be evicted, up to `spare` more idle extents are evicted with it
    /// (their slots freed), so that the next misses find free slots and
    /// evictions, which cost more than a transaction, come in batches.
    /// `Err` with the victims already taken when there are not enough
    /// (the shell gives them back and waits for writes to finish).
    /// Nothing changes until `commit`; at most `MAX_UPDATES` changes are
    /// planned beyond those `wanted` needs.
    pub fn plan(
        &mut self,
        wanted: &[u32],
        spare: usize,
        mut candidate: impl FnMut(u32) -> Candidate,
    ) -> Result<Vec<Update>, Vec<u32>> {
        let mut cold: Vec<u32> = wanted
            .iter()
            .copied()
            .filter(|e| *e != EMPTY && !self.contains(*e))
            .collect();
        cold.sort_unstable();
        cold.dedup();
        let mut updates = Vec::with_capacity(cold.len());
        let mut free = self.free.iter().copied();
        let mut taken = Vec::new();
        let cap = self.capacity();
        // Two sweeps: the first may only clear referenced bits.
        let mut budget = 2 * u64::from(cap) + 1;
        for extent in cold {
            if let Some(slot) = free.next() {
                updates.push(Update { slot, extent });
                continue;
            }
            let mut found = None;
            while budget > 0 {
                budget -= 1;
                let slot = self.hand;
                self.hand = (self.hand + 1) % cap;
                let victim = self.slots[slot as usize];
                if victim == EMPTY || taken.contains(&victim) {
                    continue;
                }
                match candidate(victim) {
                    Candidate::Take => {
                        taken.push(victim);
                        found = Some(slot);
                        break;
                    }
                    Candidate::Referenced | Candidate::Busy => {}
                }
            }
            match found {
                Some(slot) => updates.push(Update { slot, extent }),
                None => return Err(taken),
            }
        }
        let mut spare = spare.min(MAX_UPDATES.saturating_sub(updates.len()));
        while !taken.is_empty() && spare > 0 && budget > 0 {
            budget -= 1;
            let slot = self.hand;
            self.hand = (self.hand + 1) % cap;
            let victim = self.slots[slot as usize];
            if victim == EMPTY || taken.contains(&victim) {
                continue;
            }
            if candidate(victim) == Candidate::Take {
                taken.push(victim);
                updates.push(Update {
                    slot,
                    extent: EMPTY,
                });
                spare -= 1;
            }
        }
        Ok(updates)
    }

    /// The extents `updates` evict.
    pub fn victims(&self, updates: &[Update]) -> Vec<u32> {
        updates
            .iter()
            .map(|u| self.slots[u.slot as usize])
            .filter(|&e| e != EMPTY)
            .collect()
    }

    /// Applies at most `MAX_UPDATES` changes to the table and builds the
    /// transaction block recording them.
    pub fn commit(&mut self, updates: &[Update]) -> Transaction {
        assert!(updates.len() <= MAX_UPDATES);
        for u in updates {
            let old = std::mem::replace(&mut self.slots[u.slot as usize], u.extent);
            if old != EMPTY {
                self.index.remove(&old);
            }
            if u.extent == EMPTY {
                self.free.insert(u.slot);
            } else {
                self.free.remove(&u.slot);
                self.index.insert(u.extent, u.slot);
            }
        }
        self.undo = Some((self.seq, self.ctx_cursor));
        self.seq += 1;
        let index = ((self.seq - 1) % u64::from(self.ring_blocks)) as u32;
        let cap = self.capacity();
        let ctx_len = cap.min(CONTEXT_SLOTS as u32);
        let ctx_start = self.ctx_cursor;
        self.ctx_cursor = (self.ctx_cursor + ctx_len) % cap;
        let mut block = Box::new([0u8; BLOCK]);
        block[0..4].copy_from_slice(MAGIC);
        block[4..6].copy_from_slice(&FORMAT.to_le_bytes());
        block[OFF_N..OFF_N + 2].copy_from_slice(&(updates.len() as u16).to_le_bytes());
        put_u64(&mut block[..], OFF_SEQ, self.seq);
        put_u32(&mut block[..], OFF_CAP, cap);
        put_u32(&mut block[..], OFF_CTX_START, ctx_start);
        put_u32(&mut block[..], OFF_CTX_LEN, ctx_len);
        for (i, u) in updates.iter().enumerate() {
            put_u32(&mut block[..], OFF_UPDATES + 8 * i, u.slot);
            put_u32(&mut block[..], OFF_UPDATES + 8 * i + 4, u.extent);
        }
        for i in 0..ctx_len {
            let slot = (ctx_start + i) % cap;
            put_u32(
                &mut block[..],
                OFF_CONTEXT + 4 * i as usize,
                self.slots[slot as usize],
            );
        }
        let crc = replblk_proto::crc32c(&block[..OFF_CRC]);
        put_u32(&mut block[..], OFF_CRC, crc);
        Transaction {
            seq: self.seq,
            index,
            block,
        }
    }

    /// Right after the `commit` whose block could not be written (with
    /// its updates and any planned ones not committed yet): what they
    /// change is no longer trusted to be hot (the block may or may not be
    /// on disk; an extent listed on disk but not hot in memory only costs
    /// resync time), so their slots become free. The failed transaction
    /// is taken back: the next one gets its sequence number, its ring
    /// block and its context window, so the ring keeps no hole. (Were the
    /// failed block skipped, the slots only its window described would be
    /// described by no block once older ones are overwritten, and an
    /// extent still hot in them would be lost to recovery.) A failed
    /// block is thus a torn newest block, which the ring allows for.
    pub fn forget(&mut self, updates: &[Update]) {
        if let Some((seq, cursor)) = self.undo.take() {
            self.seq = seq;
            self.ctx_cursor = cursor;
        }
        for u in updates {
            let old = std::mem::replace(&mut self.slots[u.slot as usize], EMPTY);
            if old != EMPTY {
                self.index.remove(&old);
            }
            self.free.insert(u.slot);
        }
    }
}

/// One decoded transaction block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub seq: u64,
    pub capacity: u32,
    pub updates: Vec<Update>,
    pub ctx_start: u32,
    pub context: Vec<u32>,
}

/// Decodes one block; `Err` says why it is not a valid transaction (an
/// all-zero block is one that was never written).
pub fn decode(block: &[u8]) -> Result<Decoded, String> {
    if block.len() < BLOCK {
        return Err(format!("short block ({} bytes)", block.len()));
    }
    let block = &block[..BLOCK];
    if &block[0..4] != MAGIC {
        return Err("no transaction (bad magic)".into());
    }
    let stored = get_u32(block, OFF_CRC);
    let computed = replblk_proto::crc32c(&block[..OFF_CRC]);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        ));
    }
    let format = u16::from_le_bytes([block[4], block[5]]);
    if format != FORMAT {
        return Err(format!("unknown transaction format {format}"));
    }
    let n = usize::from(u16::from_le_bytes([block[OFF_N], block[OFF_N + 1]]));
    let seq = get_u64(block, OFF_SEQ);
    let capacity = get_u32(block, OFF_CAP);
    let ctx_start = get_u32(block, OFF_CTX_START);
    let ctx_len = get_u32(block, OFF_CTX_LEN);
    if n > MAX_UPDATES || seq == 0 || capacity == 0 {
        return Err(format!(
            "bad header (changes {n}, seq {seq}, capacity {capacity})"
        ));
    }
    if ctx_len as usize > CONTEXT_SLOTS || ctx_len > capacity || ctx_start >= capacity {
        return Err(format!(
            "bad context window ({ctx_len} slots at {ctx_start} of {capacity})"
        ));
    }
    let mut updates = Vec::with_capacity(n);
    for i in 0..n {
        let slot = get_u32(block, OFF_UPDATES + 8 * i);
        let extent = get_u32(block, OFF_UPDATES + 8 * i + 4);
        if slot >= capacity {
            return Err(format!("slot {slot} beyond capacity {capacity}"));
        }
        updates.push(Update { slot, extent });
    }
    let context = (0..ctx_len as usize)
        .map(|i| get_u32(block, OFF_CONTEXT + 4 * i))
        .collect();
    Ok(Decoded {
        seq,
        capacity,
        updates,
        ctx_start,
        context,
    })
}

/// What recovery found in the ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Extents that may have had writes in flight, ascending.
    pub extents: Vec<u32>,
    /// Highest valid sequence number (0: none).
    pub last_seq: u64,
    /// Valid transaction blocks.
    pub valid: usize,
    /// Blocks that carried the magic but failed validation (torn,
    /// corrupt).
    pub invalid: usize,
    /// True when the sequence had a gap and every extent named anywhere
    /// was returned.
    pub superset: bool,
}

impl Recovered {
    /// Marks every block of the recovered extents out of sync (the parts
    /// of an extent beyond the device's end are ignored).
    pub fn mark_out_of_sync(&self, bitmap: &mut crate::bitmap::DirtyBitmap) {
        for e in &self.extents {
            bitmap.set_range(u64::from(*e) << EXTENT_SHIFT, EXTENT_SIZE);
        }
    }
}

/// Rebuilds the hot set from the ring's blocks (`ring` is the whole
/// activity-log area, a multiple of `BLOCK` bytes).
pub fn recover(ring: &[u8]) -> Recovered {
    let mut blocks = Vec::new();
    let mut invalid = 0;
    // No log this ring could hold has more slots than its blocks can
    // describe: a larger capacity is corruption (and replaying it would
    // allocate a table of up to 2^32 slots).
    let max_capacity = max_extents((ring.len() / BLOCK).try_into().unwrap_or(u32::MAX));
    for chunk in ring.chunks_exact(BLOCK) {
        match decode(chunk) {
            Ok(d) if d.capacity <= max_capacity => blocks.push(d),
            _ if &chunk[0..4] == MAGIC => invalid += 1,
            _ => {}
        }
    }
    blocks.sort_by_key(|d| d.seq);
    blocks.dedup_by_key(|d| d.seq);
    let last_seq = blocks.last().map_or(0, |d| d.seq);
    let capacity = blocks.last().map_or(0, |d| d.capacity);
    let consecutive = blocks.windows(2).all(|w| w[1].seq == w[0].seq + 1)
        && blocks.iter().all(|d| d.capacity == capacity);
    // Exact replay needs every transaction since the table was empty, or
    // enough recent ones for their windows to cover every slot.
    let covered = blocks.first().is_some_and(|d| d.seq == 1)
        || blocks.iter().map(|d| d.context.len() as u64).sum::<u64>() >= u64::from(capacity);
    let mut set = BTreeSet::new();
    let superset = !(blocks.is_empty() || consecutive && covered);
    if superset {
        for d in &blocks {
            set.extend(d.updates.iter().map(|u| u.extent));
            set.extend(d.context.iter().copied());
        }
    } else if !blocks.is_empty() {
        let mut table = vec![EMPTY; capacity as usize];
        for d in &blocks {
            for u in &d.updates {
                table[u.slot as usize] = u.extent;
            }
            for (i, e) in d.context.iter().enumerate() {
                table[(d.ctx_start as usize + i) % capacity as usize] = *e;
            }
        }
        set.extend(table);
    }
    set.remove(&EMPTY);
    Recovered {
        extents: set.into_iter().collect(),
        last_seq,
        valid: blocks.len(),
        invalid,
        superset,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const RING: u32 = 32;

    /// A ring in memory and a log writing into it.
    struct Disk {
        ring: Vec<u8>,
        al: ActivityLog,
        busy: HashSet<u32>,
        referenced: HashSet<u32>,
        spare: usize,
    }

    impl Disk {
        fn new(capacity: u32) -> Disk {
            Disk {
                ring: vec![0; RING as usize * BLOCK],
                al: ActivityLog::new(capacity, RING, 0),
                busy: HashSet::new(),
                referenced: HashSet::new(),
                spare: 0,
            }
        }

        fn write(&mut self, t: &Transaction) {
            let at = t.index as usize * BLOCK;
            self.ring[at..at + BLOCK].copy_from_slice(&t.block[..]);
        }

        /// Makes `wanted` hot, one transaction per `MAX_UPDATES` changes.
        fn activate(&mut self, wanted: &[u32]) -> Result<Vec<u32>, Vec<u32>> {
            let (busy, referenced) = (&self.busy, &mut self.referenced);
            let updates = self.al.plan(wanted, self.spare, |e| {
                if busy.contains(&e) || wanted.contains(&e) {
                    Candidate::Busy
                } else if referenced.remove(&e) {
                    Candidate::Referenced
                } else {
                    Candidate::Take
                }
            })?;
            let victims = self.al.victims(&updates);
            for chunk in updates.chunks(MAX_UPDATES) {
                let t = self.al.commit(chunk);
                self.write(&t);
            }
            for e in wanted {
                self.referenced.insert(*e);
            }
            Ok(victims)
        }

        fn hot_sorted(&self) -> Vec<u32> {
            let mut h = self.al.hot();
            h.sort_unstable();
            h
        }
    }

    #[test]
    fn extent_ranges() {
        assert_eq!(extents(0, 0), None);
        assert_eq!(extents(0, 1), Some((0, 0)));
        assert_eq!(extents(EXTENT_SIZE - 1, 2), Some((0, 1)));
        assert_eq!(extents(EXTENT_SIZE, EXTENT_SIZE), Some((1, 1)));
        assert_eq!(extents(5 * EXTENT_SIZE + 7, 32 << 20), Some((5, 13)));
        assert_eq!(max_extents(32), 31 * 768);
        assert_eq!(max_extents(0), 0);
    }

    #[test]
    fn free_slots_fill_first_then_the_clock_evicts_unreferenced_extents() {
        let mut d = Disk::new(16);
        for e in 0..16 {
            assert_eq!(d.activate(&[e * 10]).unwrap(), Vec::<u32>::new());
        }
        assert_eq!(d.al.active(), 16);
        // Everything was just used: the first sweep only clears the bits;
        // the second takes the first slot.
        assert_eq!(d.activate(&[999]).unwrap(), vec![0]);
        // Extent 10 is used again (its bit set), 20 is in flight: the
        // clock passes both and takes 30.
        d.referenced.clear();
        d.referenced.insert(10);
        d.busy.insert(20);
        assert_eq!(d.activate(&[1000]).unwrap(), vec![30]);
        assert!(d.al.contains(10) && d.al.contains(20) && !d.al.contains(30));
        // Already hot: no change, no transaction.
        let seq = d.al.seq();
        assert_eq!(d.activate(&[10, 1000]).unwrap(), Vec::<u32>::new());
        assert_eq!(d.al.seq(), seq);
    }

    #[test]
    fn evictions_free_spare_slots_in_the_same_transaction() {
        let mut d = Disk::new(16);
        d.spare = 3;
        // Filling free slots evicts nothing, so frees nothing extra.
        for e in 0..16 {
            assert!(d.activate(&[e]).unwrap().is_empty());
        }
        d.referenced.clear();
        let seq = d.al.seq();
        let victims = d.activate(&[100]).unwrap();
        assert_eq!(victims.len(), 4, "one for 100 and three spare: {victims:?}");
        assert_eq!(d.al.seq(), seq + 1, "in one transaction");
        assert_eq!(d.al.active(), 13);
        // The next three misses use the freed slots: no eviction.
        for e in 101..104 {
            assert!(d.activate(&[e]).unwrap().is_empty());
        }
        assert_eq!(d.al.active(), 16);
        assert_eq!(recover(&d.ring).extents, d.hot_sorted());
        // Busy extents are never spare victims.
        d.referenced.clear();
        for e in 0..16 {
            d.busy.insert(e);
        }
        let victims = d.activate(&[200]).unwrap();
        assert!(victims.iter().all(|v| *v >= 100), "{victims:?}");
    }

    #[test]
    fn no_victim_when_every_extent_is_busy() {
        let mut d = Disk::new(16);
        for e in 0..16 {
            d.activate(&[e]).unwrap();
            d.busy.insert(e);
        }
        assert_eq!(d.activate(&[100]).unwrap_err(), Vec::<u32>::new());
        d.busy.remove(&7);
        d.busy.remove(&9);
        // Two wanted, one free candidate... then both.
        d.busy.insert(9);
        let err = d.activate(&[100, 101]).unwrap_err();
        assert_eq!(err, vec![7], "the victim taken is handed back");
        d.busy.remove(&9);
        let mut v = d.activate(&[100, 101]).unwrap();
        v.sort_unstable();
        assert_eq!(v, vec![7, 9]);
    }

    #[test]
    fn recovery_rebuilds_the_hot_set_exactly() {
        let mut d = Disk::new(40);
        let mut rng = 0x1234_5678u64;
        for _ in 0..500 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let e = (rng >> 33) as u32 % 200;
            d.activate(&[e]).unwrap();
            let r = recover(&d.ring);
            assert!(!r.superset);
            assert_eq!(r.extents, d.hot_sorted());
            assert_eq!(r.last_seq, d.al.seq());
        }
    }

    #[test]
    fn large_tables_are_covered_by_the_rotating_context() {
        // 2000 slots need 3 context windows; after many transactions the
        // ring holds only the last 32, which still describe every slot.
        let mut d = Disk::new(2000);
        for e in 0..2000 {
            d.activate(&[e]).unwrap();
        }
        for e in 5000..5100 {
            d.activate(&[e]).unwrap();
        }
        let r = recover(&d.ring);
        assert!(!r.superset);
        assert_eq!(r.extents, d.hot_sorted());
        assert_eq!(r.valid, RING as usize);
    }

    #[test]
    fn a_torn_newest_block_leaves_the_previous_state() {
        let mut d = Disk::new(16);
        for e in 0..10 {
            d.activate(&[e]).unwrap();
        }
        let before = d.hot_sorted();
        let saved = d.ring.clone();
        d.activate(&[77]).unwrap();
        // Torn: only the first half of the newest block reached the disk.
        let idx = ((d.al.seq() - 1) % u64::from(RING)) as usize * BLOCK;
        let mut torn = saved.clone();
        torn[idx..idx + BLOCK / 2].copy_from_slice(&d.ring[idx..idx + BLOCK / 2]);
        let r = recover(&torn);
        assert_eq!(r.extents, before);
        assert_eq!(r.invalid, 1);
        assert_eq!(r.last_seq, d.al.seq() - 1);
        // A flipped bit anywhere is a crc mismatch, the block is ignored.
        let mut flipped = d.ring.clone();
        flipped[idx + 3000] ^= 0x40;
        assert_eq!(recover(&flipped).extents, before);
        assert!(decode(&flipped[idx..idx + BLOCK])
            .unwrap_err()
            .contains("checksum"));
    }

    #[test]
    fn a_gap_in_the_sequence_returns_a_superset() {
        let mut d = Disk::new(16);
        for e in 0..40 {
            d.activate(&[e]).unwrap();
        }
        let hot = d.hot_sorted();
        // Corrupt a block in the middle of the ring.
        let newest = ((d.al.seq() - 1) % u64::from(RING)) as usize;
        let mid = (newest + RING as usize - 5) % RING as usize * BLOCK;
        d.ring[mid + 100] ^= 1;
        let r = recover(&d.ring);
        assert!(r.superset);
        for e in &hot {
            assert!(r.extents.contains(e), "{e} lost");
        }
    }

    #[test]
    fn an_empty_or_zeroed_ring_has_nothing() {
        let r = recover(&vec![0u8; RING as usize * BLOCK]);
        assert_eq!(
            r,
            Recovered {
                extents: vec![],
                last_seq: 0,
                valid: 0,
                invalid: 0,
                superset: false
            }
        );
    }

    #[test]
    fn a_failed_write_forgets_what_it_changed() {
        let mut d = Disk::new(16);
        d.activate(&[1, 2]).unwrap();
        let updates = d.al.plan(&[3], 0, |_| Candidate::Take).unwrap();
        let _t = d.al.commit(&updates);
        d.al.forget(&updates);
        assert!(!d.al.contains(3));
        assert_eq!(d.hot_sorted(), vec![1, 2]);
        // The next transaction takes the failed one's place.
        d.activate(&[4]).unwrap();
        assert_eq!(d.al.seq(), 2);
        assert_eq!(recover(&d.ring).extents, vec![1, 2, 4]);
    }

    #[test]
    fn hostile_blocks_are_rejected_not_trusted() {
        let mut d = Disk::new(16);
        d.activate(&[5]).unwrap();
        let good: Vec<u8> = d.ring[..BLOCK].to_vec();
        let reseal = |b: &mut Vec<u8>| {
            let crc = replblk_proto::crc32c(&b[..OFF_CRC]);
            put_u32(b, OFF_CRC, crc);
        };
        let mut b = good.clone();
        put_u32(&mut b, OFF_UPDATES, 99);
        reseal(&mut b);
        assert!(decode(&b).unwrap_err().contains("beyond capacity"));
        let mut b = good.clone();
        put_u32(&mut b, OFF_CTX_LEN, 5000);
        reseal(&mut b);
        assert!(decode(&b).unwrap_err().contains("context"));
        let mut b = good.clone();
        b[OFF_N] = 200;
        reseal(&mut b);
        assert!(decode(&b).unwrap_err().contains("header"));
        assert!(decode(&good[..100]).unwrap_err().contains("short"));
    }

    /// Found by the `actlog_recover` fuzz target: a block with a valid
    /// checksum claiming a table of 2^32 - 1 slots made recovery allocate
    /// 16 GiB. A capacity the ring cannot describe is corruption.
    #[test]
    fn a_capacity_beyond_the_ring_is_rejected() {
        let mut d = Disk::new(16);
        d.activate(&[5]).unwrap();
        let mut ring = d.ring.clone();
        put_u32(&mut ring, OFF_CAP, u32::MAX);
        let crc = replblk_proto::crc32c(&ring[..OFF_CRC]);
        put_u32(&mut ring, OFF_CRC, crc);
        // The block itself is well formed...
        assert_eq!(decode(&ring[..BLOCK]).unwrap().capacity, u32::MAX);
        // ...but no ring of RING blocks holds such a log.
        let r = recover(&ring);
        assert_eq!((r.valid, r.invalid), (0, 1));
        assert!(r.extents.is_empty());
        // The largest capacity the ring describes is still accepted.
        put_u32(&mut ring, OFF_CAP, max_extents(RING));
        let crc = replblk_proto::crc32c(&ring[..OFF_CRC]);
        put_u32(&mut ring, OFF_CRC, crc);
        let r = recover(&ring);
        assert_eq!((r.valid, r.invalid), (1, 0));
        assert_eq!(r.extents, vec![5]);
    }

    #[test]
    fn marking_stays_inside_the_recovered_extents_and_the_device() {
        let r = Recovered {
            extents: vec![1, 3, EMPTY - 1],
            last_seq: 1,
            valid: 1,
            invalid: 0,
            superset: false,
        };
        // A device of 3.5 extents: extent 3 is half inside, EMPTY - 1 beyond.
        let size = 3 * EXTENT_SIZE + EXTENT_SIZE / 2;
        let mut bm = crate::bitmap::DirtyBitmap::new(size, 4096);
        r.mark_out_of_sync(&mut bm);
        let per = EXTENT_SIZE / 4096;
        assert_eq!(bm.count(), per + per / 2);
        assert!(!bm.is_set(per - 1) && bm.is_set(per) && bm.is_set(2 * per - 1));
        assert!(!bm.is_set(2 * per) && bm.is_set(3 * per));
    }

    /// Found by the `actlog_crash` fuzz target: a transaction whose write
    /// failed (and never reached the disk) left a hole in the ring. Its
    /// context window was the only one left describing some slots once
    /// the transactions that filled them were overwritten, so an extent
    /// still hot in memory (writes kept going to it) was named by no block
    /// and a crash lost it from recovery.
    #[test]
    fn a_failed_transaction_leaves_no_hole_in_the_ring() {
        // Two windows of 768 slots cover the table; a ring of 3 blocks.
        let cap = 2 * CONTEXT_SLOTS as u32;
        let mut ring = vec![0u8; 3 * BLOCK];
        let mut al = ActivityLog::new(cap, 3, 0);
        let write = |ring: &mut Vec<u8>, t: &Transaction| {
            let at = t.index as usize * BLOCK;
            ring[at..at + BLOCK].copy_from_slice(&t.block[..]);
        };
        // Extent 7 goes into slot 0; window 0..768.
        let t = al.commit(&[Update { slot: 0, extent: 7 }]);
        write(&mut ring, &t);
        // Window 768..1536.
        let t = al.commit(&[Update { slot: 5, extent: 8 }]);
        write(&mut ring, &t);
        // Window 0..768 again, but the write fails: nothing on disk.
        let failed = [Update { slot: 6, extent: 9 }];
        let _lost = al.commit(&failed);
        al.forget(&failed);
        assert!(al.contains(7));
        // The next transaction overwrites the first block; 7 stays hot.
        let t = al.commit(&[Update {
            slot: 10,
            extent: 11,
        }]);
        write(&mut ring, &t);
        assert!(al.contains(7));
        let r = recover(&ring);
        assert!(r.extents.contains(&7), "hot extent 7 lost: {r:?}");
        for e in al.hot() {
            assert!(r.extents.contains(&e), "hot extent {e} lost: {r:?}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4200)) {
            let _ = decode(&bytes);
            let _ = recover(&bytes);
        }
    }
}
