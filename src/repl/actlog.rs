//! The persistent bitmap and the activity log, in the shell.
//!
//! While a resource is up with the activity log enabled, this keeps one
//! promise: every bit of the out-of-sync bitmap that is set in memory is
//! also set in the bitmap on disk, or lies in an extent that the
//! activity log on disk lists as hot. After a crash, the bitmap on disk
//! plus the logged extents therefore cover every block that may differ
//! from the peer, and only those are resynced.
//!
//! - A write (or trim, or zeroing) first makes the extents it touches
//!   hot and holds a reference on each until it completed on both nodes
//!   (or its range was marked out of sync). An extent already hot costs
//!   one compare-and-swap on a per-extent word: no lock. A cold one takes
//!   the log's lock and commits a transaction (written and synced) before
//!   the write is issued, locally or to the peer; requests that miss
//!   meanwhile queue their extents, and the next one to get the lock
//!   commits them together (group commit).
//! - An extent leaves the hot set only when nothing is in flight on it,
//!   and only after (1) a barrier made every write the peer acknowledged
//!   durable there (or, without a peer, the writes the link lost were
//!   marked), (2) its bitmap page was written and synced if it changed,
//!   (3) for external metadata, the local data was flushed (internal
//!   metadata shares the file, so the log's own sync covers it). Then the
//!   transaction that evicts it is written.
//! - Bits set outside a write (a full sync marking every block, the
//!   crash recovery itself) are written and synced before anything relies
//!   on them (`persist_bitmap`).
//! - While the node is a sync source, changed bitmap pages are also
//!   written about once a second, so an interrupted resync resumes from a
//!   recent bitmap. Clearing bits late on disk only costs resync time,
//!   except past the end of a sync (`persist_bitmap_at_sync_end`).

use super::*;
use crate::core::actlog::{ActivityLog, Candidate, EXTENT_SHIFT, MAX_UPDATES};
use crate::meta::MdArea;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU32};

/// The extent is in the hot set (on disk too).
const HOT: u32 = 1 << 31;
/// Used since the clock hand last passed.
const REFERENCED: u32 = 1 << 30;
/// Requests in flight on the extent.
const COUNT: u32 = REFERENCED - 1;

/// How often changed bitmap pages are written.
const BITMAP_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a request waits for a slot in the hot set before failing.
const SLOT_WAIT: Duration = Duration::from_secs(60);

/// Figures for `status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct AlStatus {
    /// Slots in the hot set (`al-extents`).
    pub capacity: u32,
    /// Extents hot now.
    pub active: u32,
    /// Transactions written since the resource came up.
    pub transactions: u64,
    /// Extents evicted since the resource came up.
    pub evictions: u64,
    /// Bitmap pages (4 KiB) written lazily since the resource came up.
    pub bitmap_pages_written: u64,
}

/// The metadata areas of an attached resource: the bitmap on disk and,
/// if enabled, the activity log.
pub(super) struct Persistent {
    area: MdArea,
    /// The log's table; also serialises every write of bitmap pages and
    /// transactions (page snapshots must reach the disk in the order
    /// they were taken).
    io: Mutex<Option<ActivityLog>>,
    /// Per extent of the device: `HOT`, `REFERENCED`, requests in flight.
    state: Box<[AtomicU32]>,
    wait_lock: Mutex<()>,
    wait_cv: Condvar,
    waiters: AtomicUsize,
    /// Metadata in another file: the data needs its own flush.
    external: bool,
    capacity: u32,
    active: AtomicU32,
    transactions: AtomicU64,
    evictions: AtomicU64,
    pages_written: AtomicU64,
    /// Extents requests are waiting to make hot: whoever commits next
    /// takes them all into its transaction (group commit).
    pending: Mutex<BTreeSet<u32>>,
    stop: Mutex<bool>,
    stop_cv: Condvar,
    /// Bits were set outside the write path and the activity log (online
    /// verify's differences): the bitmap writer writes the changed pages
    /// now rather than leaving them to the next occasion.
    write_asked: AtomicBool,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

/// A request's references on extents `first..=last`, released when it
/// completed.
pub(super) struct AlRef {
    p: Arc<Persistent>,
    first: u32,
    last: u32,
}

impl Drop for AlRef {
    fn drop(&mut self) {
        self.p.release(self.first, self.last + 1);
    }
}

impl Persistent {
    /// `capacity` 0: no activity log, only the bitmap area.
    pub(super) fn new(area: MdArea, size: u64, capacity: u32, external: bool) -> Persistent {
        let extents = size.div_ceil(1 << EXTENT_SHIFT) as usize;
        let log = (capacity > 0).then(|| ActivityLog::new(capacity, area.al_blocks(), 0));
        Persistent {
            area,
            io: Mutex::new(log),
            state: (0..if capacity > 0 { extents } else { 0 })
                .map(|_| AtomicU32::new(0))
                .collect(),
            wait_lock: Mutex::new(()),
            wait_cv: Condvar::new(),
            waiters: AtomicUsize::new(0),
            external,
            capacity,
            active: AtomicU32::new(0),
            transactions: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            pages_written: AtomicU64::new(0),
            pending: Mutex::new(BTreeSet::new()),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
            write_asked: AtomicBool::new(false),
            flusher: Mutex::new(None),
        }
    }

    pub(super) fn enabled(&self) -> bool {
        self.capacity > 0
    }

    pub(super) fn status(&self) -> AlStatus {
        AlStatus {
            capacity: self.capacity,
            active: self.active.load(Ordering::Relaxed),
            transactions: self.transactions.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bitmap_pages_written: self.pages_written.load(Ordering::Relaxed),
        }
    }

    /// The lock-free path: a reference on every extent of `first..=last`
    /// if all are hot.
    fn try_hot(&self, first: u32, last: u32) -> bool {
        for e in first..=last {
            let s = &self.state[e as usize];
            let mut v = s.load(Ordering::Acquire);
            loop {
                if v & HOT == 0 {
                    self.release(first, e);
                    return false;
                }
                match s.compare_exchange_weak(
                    v,
                    (v + 1) | REFERENCED,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => break,
                    Err(now) => v = now,
                }
            }
        }
        true
    }

    fn release(&self, first: u32, end: u32) {
        let mut idle = false;
        for e in first..end {
            let prev = self.state[e as usize].fetch_sub(1, Ordering::AcqRel);
            idle |= prev & COUNT == 1;
        }
        if idle && self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = lock(&self.wait_lock);
            self.wait_cv.notify_all();
        }
    }

    fn extent_range(&self, offset: u64, len: u64) -> Option<(u32, u32)> {
        let (first, last) = crate::core::actlog::extents(offset, len)?;
        let n = self.state.len() as u32;
        if n == 0 || first >= n {
            return None;
        }
        Some((first, last.min(n - 1)))
    }

    /// Zeroes the activity-log ring and syncs (at attach, once what it
    /// held is in the bitmap on disk).
    pub(super) fn reset_log(&self) -> Result<(), meta::MetaError> {
        let _io = lock(&self.io);
        self.area.zero_al()?;
        self.area.sync()
    }

    /// Makes the whole bitmap on disk match memory: every changed page
    /// written, then synced. Only where no peer link can have cleared
    /// bits meanwhile (at attach).
    pub(super) fn persist_bitmap(
        &self,
        bitmap: &Mutex<DirtyBitmap>,
    ) -> Result<(), meta::MetaError> {
        let _io = lock(&self.io);
        let snap = self.snapshot(bitmap, None);
        self.write_snapshot(bitmap, &snap)?;
        self.area.sync()
    }

    /// The changed pages (`only`: just these, if changed) as they are
    /// now; their change records are reset. Call with `io` held.
    fn snapshot(&self, bitmap: &Mutex<DirtyBitmap>, only: Option<&[u64]>) -> Vec<(u64, Vec<u8>)> {
        Self::snapshot_of(&mut lock(bitmap), only)
    }

    fn snapshot_of(bm: &mut DirtyBitmap, only: Option<&[u64]>) -> Vec<(u64, Vec<u8>)> {
        let pages = match only {
            Some(p) => p.iter().copied().filter(|&p| bm.page_changed(p)).collect(),
            None => bm.take_dirty_pages(),
        };
        pages.into_iter().map(|p| (p, bm.take_page(p))).collect()
    }

    /// Marks the pages of a snapshot that was not written as changed, so
    /// that they are written later from memory.
    fn retouch(&self, bitmap: &Mutex<DirtyBitmap>, snap: &[(u64, Vec<u8>)]) {
        let mut bm = lock(bitmap);
        for (p, _) in snap {
            bm.touch_page(*p);
        }
    }

    /// Writes a snapshot (not synced). Call with `io` held.
    fn write_snapshot(
        &self,
        bitmap: &Mutex<DirtyBitmap>,
        snap: &[(u64, Vec<u8>)],
    ) -> Result<(), meta::MetaError> {
        for (i, (page, bytes)) in snap.iter().enumerate() {
            let at = *page * crate::bitmap::PAGE_BYTES as u64;
            let len = (self.area.layout().bitmap_len.saturating_sub(at) as usize).min(bytes.len());
            if let Err(e) = self.area.write_bitmap(at, &bytes[..len]) {
                self.retouch(bitmap, &snap[i..]);
                return Err(e);
            }
        }
        self.pages_written
            .fetch_add(snap.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Wakes the bitmap writer to write the changed pages (see
    /// `write_asked`).
    fn ask_write(&self) {
        self.write_asked.store(true, Ordering::SeqCst);
        let _stop = lock(&self.stop);
        self.stop_cv.notify_all();
    }

    fn stop_flusher(&self) {
        *lock(&self.stop) = true;
        self.stop_cv.notify_all();
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
    }
}

impl Replica {
    /// The persistent areas of the attached resource.
    pub(super) fn persistent(&self) -> Option<Arc<Persistent>> {
        self.persistent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Before a modification of `[offset, offset + len)` is issued:
    /// references on its extents, committing them to the activity log
    /// first if they are not hot. `Ok(None)` when there is no log.
    pub(super) fn al_begin(&self, offset: u64, len: u64) -> io::Result<Option<AlRef>> {
        let Some(p) = self.persistent().filter(|p| p.enabled()) else {
            return Ok(None);
        };
        let Some((first, last)) = p.extent_range(offset, len) else {
            return Ok(None);
        };
        if !p.try_hot(first, last) {
            self.al_activate(&p, first, last)?;
        }
        Ok(Some(AlRef { p, first, last }))
    }

    /// The slow path of `al_begin`: one transaction making every extent
    /// of `first..=last` hot, evicting idle ones if the set is full.
    /// Requests waiting meanwhile add theirs to `pending`, and the one
    /// that gets the lock commits them all in one transaction.
    fn al_activate(&self, p: &Arc<Persistent>, first: u32, last: u32) -> io::Result<()> {
        let deadline = Instant::now() + SLOT_WAIT;
        lock(&p.pending).extend(first..=last);
        loop {
            {
                let mut io = lock(&p.io);
                // Someone else may have made them hot meanwhile.
                if p.try_hot(first, last) {
                    return Ok(());
                }
                let Some(log) = io.as_mut() else {
                    return Ok(());
                };
                // At most a quarter of the hot set per group: a set much
                // smaller than the queue depth would only thrash.
                let mut group: BTreeSet<u32> = {
                    let mut pending = lock(&p.pending);
                    let limit = (p.capacity / 4) as usize;
                    let rest = pending.iter().nth(limit).copied();
                    let tail = rest.map(|r| pending.split_off(&r)).unwrap_or_default();
                    std::mem::replace(&mut *pending, tail)
                };
                group.extend(first..=last);
                let mut planned = Err(Vec::new());
                // Evictions come in batches of a sixteenth of the set: the
                // barrier and flushes they need are paid once per batch.
                let spare = (p.capacity / 16) as usize;
                for attempt in 0..2 {
                    if attempt == 1 {
                        // Not room for the whole group: this request's own
                        // extents only; the others wait for their turn.
                        if let Err(taken) = &planned {
                            for v in taken {
                                p.state[*v as usize].store(HOT, Ordering::Release);
                            }
                        }
                        let others = group.iter().filter(|e| !(first..=last).contains(*e));
                        lock(&p.pending).extend(others);
                        group = (first..=last).collect();
                    }
                    let wanted: Vec<u32> = group.iter().copied().collect();
                    planned = log.plan(&wanted, spare, |victim| {
                        if group.contains(&victim) {
                            return Candidate::Busy;
                        }
                        let s = &p.state[victim as usize];
                        let v = s.load(Ordering::Acquire);
                        if v & COUNT != 0 {
                            Candidate::Busy
                        } else if v & REFERENCED != 0 {
                            s.fetch_and(!REFERENCED, Ordering::AcqRel);
                            Candidate::Referenced
                        } else if s
                            .compare_exchange(v, 0, Ordering::AcqRel, Ordering::Acquire)
                            .is_ok()
                        {
                            // Cold from now on: a write to it waits for this
                            // lock and commits it again.
                            Candidate::Take
                        } else {
                            Candidate::Busy
                        }
                    });
                    if planned.is_ok() {
                        break;
                    }
                }
                match planned {
                    Ok(updates) => {
                        let victims = log.victims(&updates);
                        if !victims.is_empty() {
                            if let Err(e) = self.al_make_evictable(p, &victims) {
                                for v in &victims {
                                    p.state[*v as usize].store(HOT, Ordering::Release);
                                }
                                return Err(e);
                            }
                        }
                        for (i, chunk) in updates.chunks(MAX_UPDATES).enumerate() {
                            let t = log.commit(chunk);
                            let written = p
                                .area
                                .write_al_block(t.index, &t.block[..])
                                .and_then(|_| p.area.sync());
                            if let Err(e) = written {
                                // Neither these changes nor the ones not
                                // yet written count as hot.
                                log.forget(&updates[i * MAX_UPDATES..]);
                                p.active.store(log.active(), Ordering::Relaxed);
                                drop(io);
                                self.metadata_failed("writing the activity log", &e);
                                return Err(io::Error::from_raw_os_error(libc::EIO));
                            }
                            p.transactions.fetch_add(1, Ordering::Relaxed);
                        }
                        p.evictions
                            .fetch_add(victims.len() as u64, Ordering::Relaxed);
                        p.active.store(log.active(), Ordering::Relaxed);
                        // Hot now; the other requests of the group take
                        // their references when they get the lock.
                        for &e in &group {
                            let s = &p.state[e as usize];
                            if s.load(Ordering::Acquire) & HOT == 0 {
                                s.store(HOT | REFERENCED, Ordering::Release);
                            }
                        }
                        for e in first..=last {
                            p.state[e as usize].fetch_add(1, Ordering::AcqRel);
                        }
                        return Ok(());
                    }
                    Err(taken) => {
                        for v in taken {
                            p.state[v as usize].store(HOT, Ordering::Release);
                        }
                    }
                }
            }
            // Every slot is busy: wait for a request to finish. Writes
            // held back in this burst are sent first, or they would
            // never finish.
            if Instant::now() >= deadline {
                tracing::error!(resource = %self.name, capacity = p.capacity, "no activity-log slot became free within {SLOT_WAIT:?}");
                return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT));
            }
            self.kick();
            p.waiters.fetch_add(1, Ordering::SeqCst);
            {
                let g = lock(&p.wait_lock);
                let _ = p
                    .wait_cv
                    .wait_timeout(g, Duration::from_millis(10))
                    .unwrap_or_else(|e| e.into_inner());
            }
            p.waiters.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Writes changed bitmap pages (`only`: just these) so that no bit is
    /// cleared on disk before the write that cleared it (a resync write)
    /// is durable on the peer: the pages are copied first, then a barrier
    /// makes everything the peer acknowledged so far durable there, then
    /// the copy is written and synced. `barrier`: send the barrier even if
    /// no page changed. `Ok(false)`: the link failed meanwhile and what it
    /// lost is not marked yet; nothing was written (the pages stay marked
    /// changed). Call with the log's lock held.
    fn write_bitmap_pages(
        &self,
        p: &Persistent,
        only: Option<&[u64]>,
        barrier: bool,
    ) -> Result<bool, meta::MetaError> {
        let (snap, session) = {
            // Under the session slot's lock: a link that failed is let go
            // only after what it lost is marked, and none starts meanwhile.
            // Lock order: the bitmap, then the session slot (as `status`).
            let mut bm = lock(&self.oos);
            let slot = lock(&self.session);
            if slot.as_ref().is_some_and(|s| !s.is_alive()) {
                return Ok(false);
            }
            (Persistent::snapshot_of(&mut bm, only), slot.clone())
        };
        // Only writes the peer acknowledged and no barrier made durable
        // yet need one (a node that sent none has nothing to wait for).
        let needed = |s: &Arc<Session>| (barrier || !snap.is_empty()) && s.unstable_count() > 0;
        if let Some(s) = session.filter(needed) {
            let stable = s
                .send_frame(Track::Barrier, |seq| Frame::Barrier { seq })
                .is_some_and(|b| s.wait(&b, self.ack_timeout()) == Remote::Done);
            if !stable {
                p.retouch(&self.oos, &snap);
                return Ok(false);
            }
        }
        if !snap.is_empty() {
            p.write_snapshot(&self.oos, &snap)?;
            p.area.sync()?;
        }
        Ok(true)
    }

    /// A sync target's changed bitmap pages: a snapshot, then the local
    /// data flushed (every write whose bits the snapshot cleared was
    /// applied before it), then the pages. False if the local flush
    /// failed (the pages are left for the next write).
    fn write_target_bitmap_pages(&self, p: &Persistent) -> Result<bool, meta::MetaError> {
        let snap = Persistent::snapshot_of(&mut lock(&self.oos), None);
        if snap.is_empty() {
            return Ok(true);
        }
        let flushed = self.current_store().and_then(|s| s.flush());
        if let Err(e) = flushed {
            p.retouch(&self.oos, &snap);
            tracing::warn!(resource = %self.name, "flushing before a bitmap write failed: {e}");
            return Ok(false);
        }
        p.write_snapshot(&self.oos, &snap)?;
        p.area.sync()?;
        Ok(true)
    }

    /// What must hold before `victims` leave the hot set (see the module
    /// doc). Called with the log's lock held.
    fn al_make_evictable(&self, p: &Persistent, victims: &[u32]) -> io::Result<()> {
        // (3) Local data durable (internal metadata: the syncs that follow).
        if p.external {
            self.current_store()?.flush()?;
        }
        // (1) and (2): a barrier covering every write to the victims (none
        // is in flight), then their bitmap pages.
        let g = lock(&self.oos).granularity();
        let mut pages: Vec<u64> = victims
            .iter()
            .map(|&e| ((u64::from(e) << EXTENT_SHIFT) / g) / crate::bitmap::PAGE_BITS)
            .collect();
        pages.sort_unstable();
        pages.dedup();
        let deadline = Instant::now() + self.ack_timeout() + Duration::from_secs(5);
        loop {
            match self.write_bitmap_pages(p, Some(&pages), true) {
                Ok(true) => return Ok(()),
                Ok(false) if Instant::now() < deadline => {
                    // The link failed: wait until its losses are marked.
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(false) => return Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
                Err(e) => {
                    self.metadata_failed("writing the bitmap", &e);
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
            }
        }
    }

    /// Writes the bitmap's changed pages and syncs, when bits were set
    /// outside the write path (a full sync marking every block), or
    /// before a demote (bits a Primary's writes set, whose only other
    /// record is the activity log). False if the pages could not be
    /// written because the link did not settle; a metadata write that
    /// failed is handled as the disk's failure and counts as done (no
    /// disk, no bitmap to keep).
    pub(super) fn persist_bitmap(&self) -> bool {
        let Some(p) = self.persistent() else {
            return true;
        };
        let _io = lock(&p.io);
        let deadline = Instant::now() + self.ack_timeout() + Duration::from_secs(5);
        loop {
            match self.write_bitmap_pages(&p, None, false) {
                Ok(true) => return true,
                Ok(false) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(false) => {
                    tracing::warn!(resource = %self.name, "the bitmap could not be written: the link did not settle");
                    return false;
                }
                Err(e) => {
                    self.metadata_failed("writing the bitmap", &e);
                    return true;
                }
            }
        }
    }

    /// At the end of a sync, before its state step records the end: the
    /// bits the sync cleared are cleared on disk too (a target's pages
    /// after a local flush). Otherwise they would outlive the recorded end
    /// until the next periodic write, and a crash meanwhile would bring
    /// them back as marks at the same generation, which decide the next
    /// sync's direction (`Rule::LocalDirtyBits`): a former target would
    /// become the source, and with marks on both nodes (a transfer log's)
    /// the dialing node would yield its real marks to stale ones.
    ///
    /// One attempt, no waiting for a failed link to settle: false when the
    /// link failed meanwhile (a source then does not record the end; the
    /// next handshake sees the sync unfinished). A write error is logged
    /// and reported in `status`; the end is recorded all the same.
    pub(super) fn persist_bitmap_at_sync_end(&self, target: bool) -> bool {
        let Some(p) = self.persistent() else {
            return true;
        };
        let _io = lock(&p.io);
        let written = if target {
            // The end is recorded even if the flush failed (logged).
            self.write_target_bitmap_pages(&p).map(|_| true)
        } else {
            self.write_bitmap_pages(&p, None, false)
        };
        written.unwrap_or_else(|e| {
            tracing::error!(resource = %self.name, "writing the bitmap failed: {e}");
            lock(&self.inner).last_error = Some(format!("writing the bitmap failed: {e}"));
            true
        })
    }

    /// Has the bitmap writer write the changed pages soon, without waiting
    /// here: for marks set outside the write path that no activity log
    /// covers (online verify's differences, found here or by the peer).
    /// Until they are on disk a crash would forget them, and the blocks
    /// would stay different until the next verify. Safe on the peer's
    /// receive thread: the write may wait for a barrier's ack, which that
    /// thread delivers.
    pub(super) fn write_bitmap_soon(&self) {
        if let Some(p) = self.persistent() {
            p.ask_write();
        }
    }

    /// Starts the bitmap writer: the periodic write of changed pages while
    /// this node syncs (with an activity log), and the writes asked for by
    /// `write_bitmap_soon`.
    pub(super) fn start_bitmap_flusher(&self, p: &Arc<Persistent>) {
        let weak = self.me.clone();
        let pp = p.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("bitmap-{}", self.name))
            .spawn(move || {
                let mut was_source = false;
                // An asked-for write not done yet (the link did not settle,
                // or a sync target's local flush failed).
                let mut asked = false;
                loop {
                    {
                        let stop = lock(&pp.stop);
                        if *stop {
                            return;
                        }
                        let (stop, _) = pp
                            .stop_cv
                            .wait_timeout_while(stop, BITMAP_FLUSH_INTERVAL, |stop| {
                                !*stop && !pp.write_asked.load(Ordering::SeqCst)
                            })
                            .unwrap_or_else(|e| e.into_inner());
                        if *stop {
                            return;
                        }
                    }
                    asked |= pp.write_asked.swap(false, Ordering::SeqCst);
                    let Some(r) = weak.upgrade() else { return };
                    // Only a resync clears bits; bits set by writes are covered
                    // by the log (and written when their extent leaves it). So
                    // pages are written while this node is a sync source, and
                    // once more when it stops being one.
                    // A sync target clears bits too, as the sync's data lands
                    // (`apply::now_in_sync`): its pages are written likewise,
                    // after a local flush made that data durable.
                    let repl = lock(&r.inner).node.as_ref().map(|n| n.repl());
                    let source = pp.enabled() && repl == Some(ReplState::SyncSource);
                    let target = pp.enabled() && repl == Some(ReplState::SyncTarget);
                    if !source && !target && !was_source && !asked {
                        continue;
                    }
                    was_source = source || target;
                    let _io = lock(&pp.io);
                    let written = if target {
                        r.write_target_bitmap_pages(&pp)
                    } else {
                        r.write_bitmap_pages(&pp, None, false)
                    };
                    match written {
                        Ok(true) if asked => {
                            asked = false;
                            tracing::info!(resource = %r.name, "bitmap written: the marks of an online verify are on disk");
                        }
                        // Not written: asked-for pages are tried again.
                        Ok(_) => {}
                        Err(e) => {
                            // Handled as the disk's failure: no bitmap to keep.
                            asked = false;
                            r.metadata_failed("writing changed bitmap pages", &e);
                        }
                    }
                }
            });
        match spawned {
            Ok(h) => *lock(&p.flusher) = Some(h),
            Err(e) => tracing::warn!(resource = %self.name, "cannot start the bitmap writer: {e}"),
        }
    }

    /// Stops the bitmap writer and forgets the areas (at detach; the
    /// caller writes the whole bitmap).
    pub(super) fn drop_persistent(&self) {
        let p = self
            .persistent
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(p) = p {
            p.stop_flusher();
        }
    }
}
