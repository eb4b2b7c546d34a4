//! The sync source's resync loop, and the progress `status` shows.
//!
//! The loop walks the out-of-sync bitmap with a forward-only cursor and
//! sends each run (up to `CHUNK` bytes) while the rate controller allows
//! it, keeping several chunks in flight. Each chunk holds the interval
//! lock on its range from before it is read until the peer acknowledged
//! every frame of it: an application write to the same range waits for
//! it (or the chunk waits for the write), so a chunk never carries data
//! older than a write the peer already has, and never lands after a
//! newer one. A chunk's blocks are cleared in the bitmap as its frames
//! are acknowledged (by whichever thread reads the Acks), so the bitmap
//! stays the one record of what is left: an interrupted sync resumes
//! from it, not from the start. Bits set behind the cursor meanwhile
//! (a write that did not reach the peer) are found by the next pass.
//!
//! One read buffer serves every chunk: a frame's payload is copied into
//! the outbox, or written to the socket, before `submit_modify` returns.
//! A chunk that reads as zeroes goes as a `WriteZeroes` frame instead of
//! its data; mixed chunks are split into zero and data runs at 64 KiB.

use std::collections::VecDeque;

use super::rate::{Allow, Controller, RateSettings};
use super::*;

/// Most data one chunk carries.
pub(super) const CHUNK: u64 = 1 << 20;
/// Most device bytes one chunk's runs span (its interval).
const SPAN: u64 = 4 << 20;
/// Most runs in one chunk.
const MAX_RUNS: usize = 256;
/// Most chunks in flight.
const MAX_CHUNKS: usize = 32;
/// Largest hole one write-zeroes frame covers.
const HOLE_CHUNK: u64 = 256 << 20;
/// Zero runs shorter than this inside a chunk of data go as data.
const ZERO_SPLIT: usize = 64 * 1024;
/// A barrier every so many bytes makes what was sent durable on the
/// target: an interrupted sync then resends at most this much.
const BARRIER_EVERY: u64 = 256 << 20;
/// ...or this often while bytes were sent.
const BARRIER_INTERVAL: Duration = Duration::from_millis(500);
/// Progress events while syncing, at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// The rate shown is measured over about this long.
const RATE_WINDOW: Duration = Duration::from_secs(3);

/// `(when, done)` samples, and when the sync started, finished copying
/// (everything acknowledged, before the final barrier) and ended.
#[derive(Default)]
struct Timeline {
    samples: VecDeque<(Instant, u64)>,
    started: Option<Instant>,
    copied: Option<Instant>,
    ended: Option<Instant>,
}

/// What a sync moved and how far it got; kept as it happens, so
/// `status` never scans the bitmap.
#[derive(Default)]
pub(super) struct SyncProgress {
    active: AtomicBool,
    /// Bytes of this sync acknowledged by the peer (sent, zeroed or
    /// found equal).
    done: AtomicU64,
    /// Data bytes sent in `Write` frames by this sync.
    moved: AtomicU64,
    /// Bytes sent as `WriteZeroes` by this sync.
    zeroed: AtomicU64,
    /// Bytes found equal by checksum and not sent, this sync.
    same: AtomicU64,
    /// The same three over every sync since the resource came up.
    moved_total: AtomicU64,
    zeroed_total: AtomicU64,
    same_total: AtomicU64,
    /// Completed syncs since the resource came up.
    finished: AtomicU64,
    timeline: Mutex<Timeline>,
}

/// Progress of the current (or last) sync, in `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SyncStatus {
    /// This node is sending a resync now.
    pub active: bool,
    /// Bytes done in this sync (last sync once finished).
    pub done_bytes: u64,
    /// `done_bytes` plus what is still out of sync.
    pub total_bytes: u64,
    /// Over the last few seconds.
    pub rate_bytes_per_sec: u64,
    /// Seconds left at that rate, while active.
    pub eta_secs: Option<u64>,
    pub elapsed_ms: u64,
    /// Of which copying (until the last block was acknowledged, before
    /// the final flush on the target), once done.
    pub copy_ms: Option<u64>,
    /// Data sent in Write frames (this sync).
    pub moved_bytes: u64,
    /// Sent as write-zeroes requests instead of data (this sync).
    pub zeroed_bytes: u64,
    /// Found equal by checksum, not sent (this sync).
    pub same_bytes: u64,
    /// The same, over every sync since the resource came up.
    pub moved_bytes_total: u64,
    pub zeroed_bytes_total: u64,
    pub same_bytes_total: u64,
    /// Syncs finished since the resource came up.
    pub finished: u64,
}

impl SyncProgress {
    fn start(&self) {
        for c in [&self.done, &self.moved, &self.zeroed, &self.same] {
            c.store(0, Ordering::SeqCst);
        }
        let now = Instant::now();
        *lock(&self.timeline) = Timeline {
            samples: VecDeque::from([(now, 0)]),
            started: Some(now),
            copied: None,
            ended: None,
        };
        self.active.store(true, Ordering::SeqCst);
    }

    fn copied(&self) {
        lock(&self.timeline).copied = Some(Instant::now());
    }

    fn stop(&self) {
        lock(&self.timeline).ended = Some(Instant::now());
        self.active.store(false, Ordering::SeqCst);
    }

    fn sample(&self) {
        let now = Instant::now();
        let done = self.done.load(Ordering::Relaxed);
        let mut t = lock(&self.timeline);
        t.samples.push_back((now, done));
        while t.samples.len() > 2 && now.duration_since(t.samples[0].0) > RATE_WINDOW {
            t.samples.pop_front();
        }
    }

    fn add(&self, kind: Sent, bytes: u64) {
        let (this, total) = match kind {
            Sent::Data => (&self.moved, &self.moved_total),
            Sent::Zeroes => (&self.zeroed, &self.zeroed_total),
            Sent::Same => (&self.same, &self.same_total),
        };
        this.fetch_add(bytes, Ordering::Relaxed);
        total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The status, given the bytes still out of sync.
    pub(super) fn status(&self, remaining: u64) -> SyncStatus {
        let active = self.active.load(Ordering::SeqCst);
        let done = self.done.load(Ordering::Relaxed);
        let (rate, elapsed_ms, copy_ms) = {
            let t = lock(&self.timeline);
            let rate = match (t.samples.front(), t.samples.back()) {
                (Some(&(t0, d0)), Some(&(t1, d1))) if t1 > t0 => {
                    ((d1 - d0) as f64 / t1.duration_since(t0).as_secs_f64()) as u64
                }
                _ => 0,
            };
            let ms = |until: Instant| {
                t.started
                    .map_or(0, |s| until.saturating_duration_since(s).as_millis() as u64)
            };
            (
                rate,
                ms(t.ended.unwrap_or_else(Instant::now)),
                t.copied.map(ms),
            )
        };
        SyncStatus {
            active,
            done_bytes: done,
            total_bytes: done + remaining,
            rate_bytes_per_sec: rate,
            eta_secs: (active && rate > 0).then(|| remaining.div_ceil(rate)),
            elapsed_ms,
            copy_ms,
            moved_bytes: self.moved.load(Ordering::Relaxed),
            zeroed_bytes: self.zeroed.load(Ordering::Relaxed),
            same_bytes: self.same.load(Ordering::Relaxed),
            moved_bytes_total: self.moved_total.load(Ordering::Relaxed),
            zeroed_bytes_total: self.zeroed_total.load(Ordering::Relaxed),
            same_bytes_total: self.same_total.load(Ordering::Relaxed),
            finished: self.finished.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    Data,
    Zeroes,
    /// Equal on both sides by checksum: nothing sent.
    Same,
}

/// One chunk in flight: its interval, how many of its frames are still
/// unanswered, and its length.
struct Chunk {
    interval: u64,
    frames: u32,
    len: u64,
}

/// One frame in flight: its range, what it carried, its chunk.
struct FrameEntry {
    offset: u64,
    len: u64,
    sent: Sent,
    chunk: usize,
}

#[derive(Default)]
struct FlightState {
    chunks: Vec<Option<Chunk>>,
    free_chunks: Vec<usize>,
    frames: Vec<Option<FrameEntry>>,
    free_frames: Vec<usize>,
    /// Bytes of chunks not fully answered.
    bytes: u64,
    /// A frame was failed by the peer's storage or lost with the link.
    failed: Option<Remote>,
    /// The peer's answers to checksum queries, not yet looked at.
    replies: VecDeque<(u64, Vec<u128>)>,
}

/// The resync's requests in flight; answers arrive through `Notify` on
/// the thread that reads the peer's Acks.
struct Flight {
    replica: Weak<Replica>,
    state: Mutex<FlightState>,
    changed: Condvar,
}

fn slot<T>(slab: &mut Vec<Option<T>>, free: &mut Vec<usize>, v: T) -> usize {
    match free.pop() {
        Some(i) => {
            slab[i] = Some(v);
            i
        }
        None => {
            slab.push(Some(v));
            slab.len() - 1
        }
    }
}

impl Flight {
    fn begin_chunk(&self, interval: u64, len: u64) -> usize {
        let mut st = lock(&self.state);
        let st = &mut *st;
        st.bytes += len;
        slot(
            &mut st.chunks,
            &mut st.free_chunks,
            Chunk {
                interval,
                frames: 1,
                len,
            },
        )
    }

    fn add_frame(&self, chunk: usize, offset: u64, len: u64, sent: Sent) -> u64 {
        let mut st = lock(&self.state);
        let st = &mut *st;
        if let Some(c) = st.chunks[chunk].as_mut() {
            c.frames += 1;
        }
        slot(
            &mut st.frames,
            &mut st.free_frames,
            FrameEntry {
                offset,
                len,
                sent,
                chunk,
            },
        ) as u64
    }

    /// Drops one reference to `chunk` (a frame answered, or the
    /// submitter done with it); the last releases its interval.
    fn put_chunk(&self, st: &mut FlightState, chunk: usize, replica: &Replica) {
        let last = match st.chunks[chunk].as_mut() {
            Some(c) => {
                c.frames -= 1;
                c.frames == 0
            }
            None => false,
        };
        if last {
            if let Some(c) = st.chunks[chunk].take() {
                st.bytes -= c.len;
                st.free_chunks.push(chunk);
                replica.intervals.release(c.interval);
            }
            self.changed.notify_all();
        }
    }

    /// One more reference to `chunk` (a checksum query in flight).
    fn hold(&self, chunk: usize) {
        if let Some(c) = lock(&self.state).chunks[chunk].as_mut() {
            c.frames += 1;
        }
    }

    fn take_replies(&self) -> VecDeque<(u64, Vec<u128>)> {
        std::mem::take(&mut lock(&self.state).replies)
    }

    fn end_submit(&self, chunk: usize, replica: &Replica) {
        let mut st = lock(&self.state);
        self.put_chunk(&mut st, chunk, replica);
    }

    fn in_flight(&self) -> u64 {
        lock(&self.state).bytes
    }

    /// Chunks not fully answered.
    fn chunks(&self) -> usize {
        let st = lock(&self.state);
        st.chunks.len() - st.free_chunks.len()
    }

    fn failed(&self) -> Option<Remote> {
        lock(&self.state).failed
    }

    /// Waits until less than `below` bytes are in flight, or `max`.
    fn wait_below(&self, below: u64, max: Duration) {
        let st = lock(&self.state);
        if st.bytes >= below.max(1) {
            let _ = self.changed.wait_timeout(st, max);
        }
    }
}

impl link::Notify for Flight {
    fn notify(&self, tag: u64, r: Remote, _batch: &mut Batch) {
        let Some(replica) = self.replica.upgrade() else {
            return;
        };
        let mut st = lock(&self.state);
        let st = &mut *st;
        let Some(f) = st.frames.get_mut(tag as usize).and_then(Option::take) else {
            return;
        };
        st.free_frames.push(tag as usize);
        if r == Remote::Done {
            // Cleared before the interval is released: a write that waits
            // for this range and then fails to reach the peer marks it
            // again after this.
            lock(&replica.oos).clear_range(f.offset, f.len);
            replica.progress.done.fetch_add(f.len, Ordering::Relaxed);
            replica.progress.add(f.sent, f.len);
            replica.resync_sent.fetch_add(f.len, Ordering::Relaxed);
        } else if st.failed.is_none() {
            st.failed = Some(r);
        }
        self.put_chunk(st, f.chunk, &replica);
    }
}

/// Where a chunk's frames go.
#[derive(Clone, Copy)]
struct Out<'a> {
    session: &'a Session,
    flight: &'a Flight,
    notify: &'a Arc<dyn link::Notify>,
}

impl link::CsumSink for Flight {
    fn reply(&self, id: u64, digests: Vec<u128>) {
        lock(&self.state).replies.push_back((id, digests));
        self.changed.notify_all();
    }
}

/// The digest of one block for checksum-based resync.
fn digest(block: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(block)
}

/// Largest range a peer may ask checksums for at once.
const CSUM_QUERY_MAX: u64 = 32 << 20;

/// Splits `buf` (the data of `[offset, offset + len)`) into runs that
/// are all zeroes (at least `ZERO_SPLIT` long, or the whole buffer) and
/// runs of data: `(offset within buf, len, zero)`.
fn split_zeroes(buf: &[u8], out: &mut Vec<(usize, usize, bool)>) {
    out.clear();
    let is_zero = |b: &[u8]| {
        let (pre, mid, post) = unsafe_free_align(b);
        pre.iter().all(|&x| x == 0) && mid.iter().all(|&x| x == 0) && post.iter().all(|&x| x == 0)
    };
    if is_zero(buf) {
        out.push((0, buf.len(), true));
        return;
    }
    let step = ZERO_SPLIT.min(buf.len());
    let mut start = 0;
    let mut pos = 0;
    let mut zero_start: Option<usize> = None;
    while pos < buf.len() {
        let end = (pos + step).min(buf.len());
        let z = end - pos == step && is_zero(&buf[pos..end]);
        match (z, zero_start) {
            (true, None) => zero_start = Some(pos),
            (false, Some(zs)) => {
                if zs > start {
                    out.push((start, zs - start, false));
                }
                out.push((zs, pos - zs, true));
                start = pos;
                zero_start = None;
            }
            _ => {}
        }
        pos = end;
    }
    match zero_start {
        Some(zs) => {
            if zs > start {
                out.push((start, zs - start, false));
            }
            out.push((zs, buf.len() - zs, true));
        }
        None => out.push((start, buf.len() - start, false)),
    }
}

/// `b` as a byte prefix, a run of u64 words and a byte suffix, for a
/// zero test that reads eight bytes at a time.
fn unsafe_free_align(b: &[u8]) -> (&[u8], &[u64], &[u8]) {
    // SAFETY: every bit pattern is a valid u64; align_to keeps the
    // middle slice aligned and in bounds.
    unsafe { b.align_to::<u64>() }
}

impl Replica {
    /// The resync progress as `status` shows it.
    pub(super) fn sync_status(&self, remaining: u64) -> SyncStatus {
        self.progress.status(remaining)
    }

    /// The rate settings in force.
    pub fn resync_rate(&self) -> RateSettings {
        *lock(&self.rate)
    }

    /// `resync-rate`: changes the rate settings of the running daemon
    /// (a sync under way follows within one chunk).
    pub fn set_resync_rate(
        &self,
        max_rate: Option<u64>,
        min_rate: Option<u64>,
        fill_target: Option<u64>,
        plan_ahead_ms: Option<u64>,
    ) -> Result<String, VerbError> {
        self.location()?;
        let mut r = lock(&self.rate);
        let mut new = *r;
        if let Some(v) = max_rate {
            new.max_rate = v;
        }
        if let Some(v) = min_rate {
            new.min_rate = v;
        }
        if let Some(v) = fill_target {
            new.fill_target = v;
        }
        if let Some(v) = plan_ahead_ms {
            new.plan_ahead_ms = v;
        }
        new.check()
            .map_err(|message| VerbError::BadRequest { message })?;
        *r = new;
        drop(r);
        let mib = |v: u64| v as f64 / (1u64 << 20) as f64;
        let max = if new.max_rate == 0 {
            "unlimited".to_owned()
        } else {
            format!("{:.0} MiB/s", mib(new.max_rate))
        };
        tracing::info!(resource = %self.name, ?new, "resync rate changed");
        Ok(format!(
            "{}: resync rate at most {max}, at least {:.0} MiB/s while the application writes, {} KiB in flight, plan ahead {} ms",
            self.name,
            mib(new.min_rate),
            new.fill_target / 1024,
            new.plan_ahead_ms
        ))
    }

    /// Answers the peer's `CsumQuery` (this node is its sync target):
    /// the digests of our blocks, read after every earlier frame was
    /// applied (this runs on the thread that applies them, in order).
    pub(super) fn answer_csum_query(
        &self,
        id: u64,
        offset: u64,
        length: u32,
        block: u32,
    ) -> Result<(), LinkError> {
        let len = u64::from(length);
        if len > CSUM_QUERY_MAX || offset.checked_add(len).is_none_or(|end| end > self.size()) {
            return Err(LinkError::Protocol(format!(
                "checksum query for {offset}+{len} is outside the {}-byte device or over {CSUM_QUERY_MAX} bytes",
                self.size()
            )));
        }
        let Some(session) = self.current_session() else {
            return Ok(());
        };
        let mut buf = lock(&self.csum_buf);
        buf.resize(len as usize, 0);
        let digests = match self
            .current_store()
            .and_then(|s| s.read_bulk(&mut buf, offset))
        {
            Ok(()) => buf.chunks(block as usize).map(digest).collect(),
            Err(e) => {
                // No digests: the source sends the data.
                tracing::warn!(resource = %self.name, offset, "reading blocks to checksum failed: {e}");
                Vec::new()
            }
        };
        drop(buf);
        session.send_control(&Frame::CsumReply {
            id,
            alg: replblk_proto::repl::csum_alg::XXH3_128,
            digests,
        });
        Ok(())
    }

    /// Handles the peer's checksum replies: blocks whose digests match
    /// ours are cleared without sending them, the others are sent. False
    /// if the session must end.
    fn take_csum_replies(
        &self,
        out: &Out<'_>,
        store: &dyn Store,
        queries: &mut std::collections::HashMap<u64, (u64, u64, usize)>,
        buf: &mut [u8],
        parts: &mut Vec<(usize, usize, bool)>,
    ) -> bool {
        let (session, flight) = (out.session, out.flight);
        let gran = lock(&self.oos).granularity() as usize;
        for (id, digests) in flight.take_replies() {
            let Some((offset, len, chunk)) = queries.remove(&id) else {
                session.fail(&format!(
                    "the peer answered checksum query {id}, which was not asked"
                ));
                return false;
            };
            let data = &mut buf[..len as usize];
            if let Err(e) = store.read_bulk(data, offset) {
                flight.end_submit(chunk, self);
                session.fail(&format!("resync read failed: {e}"));
                return false;
            }
            let data = &buf[..len as usize];
            let blocks = data.len().div_ceil(gran);
            let usable = digests.len() == blocks;
            let mut i = 0;
            while i < blocks {
                let same = |i: usize| {
                    usable
                        && digest(&data[i * gran..((i + 1) * gran).min(data.len())]) == digests[i]
                };
                let run_same = same(i);
                let mut j = i + 1;
                while j < blocks && same(j) == run_same {
                    j += 1;
                }
                let (at, end) = (i * gran, (j * gran).min(data.len()));
                let off = offset + at as u64;
                let n = (end - at) as u64;
                if run_same {
                    lock(&self.oos).clear_range(off, n);
                    self.progress.done.fetch_add(n, Ordering::Relaxed);
                    self.progress.add(Sent::Same, n);
                } else {
                    self.send_run(out, chunk, off, &data[at..end], parts);
                }
                i = j;
            }
            flight.end_submit(chunk, self);
            session.kick();
        }
        true
    }

    /// If the next run (up to `HOLE_CHUNK`) is a hole in the local store,
    /// sends it as one write-zeroes frame, moves the cursor past it and
    /// returns true. Checked again under the interval: a write that
    /// completed before it was taken has filled the hole.
    fn send_hole(
        &self,
        out: &Out<'_>,
        store: &dyn Store,
        cursor: &mut crate::bitmap::Cursor,
        size: u64,
    ) -> bool {
        let (gran, next) = {
            let bm = lock(&self.oos);
            let g = bm.granularity();
            (g, bm.run_from(cursor.block(), HOLE_CHUNK / g))
        };
        let Some((block, n)) = next else {
            return false;
        };
        let offset = block * gran;
        let len = (n * gran).min(size.saturating_sub(offset));
        if len == 0 || !store.reads_as_zeroes(offset, len) {
            return false;
        }
        let interval = self.intervals.acquire(offset, len);
        if !store.reads_as_zeroes(offset, len) {
            self.intervals.release(interval);
            return false;
        }
        cursor.advance_to(block + n);
        let chunk = out.flight.begin_chunk(interval, len);
        let tag = out.flight.add_frame(chunk, offset, len, Sent::Zeroes);
        let op = Modify::WriteZeroes {
            offset,
            len,
            may_unmap: true,
        };
        let waiter = Waiter::Note(out.notify.clone(), tag);
        if let Err(Waiter::Note(n, tag)) =
            out.session
                .submit_modify(op, waiter, link::Queue::default())
        {
            n.notify(tag, Remote::Lost, &mut Batch::default());
        }
        out.flight.end_submit(chunk, self);
        true
    }

    /// Queues the frames of one run read into `data` for chunk `chunk`:
    /// zero runs as write-zeroes, the rest as data (held back until
    /// `kick`).
    fn send_run(
        &self,
        out: &Out<'_>,
        chunk: usize,
        run_off: u64,
        data: &[u8],
        parts: &mut Vec<(usize, usize, bool)>,
    ) {
        let Out {
            session,
            flight,
            notify,
        } = *out;
        split_zeroes(data, parts);
        for &(pos, n, zero) in parts.iter() {
            let off = run_off + pos as u64;
            let sent = if zero { Sent::Zeroes } else { Sent::Data };
            let tag = flight.add_frame(chunk, off, n as u64, sent);
            let op = if zero {
                Modify::WriteZeroes {
                    offset: off,
                    len: n as u64,
                    may_unmap: true,
                }
            } else {
                Modify::Write {
                    buf: &data[pos..pos + n],
                    offset: off,
                }
            };
            let waiter = Waiter::Note(notify.clone(), tag);
            if let Err(Waiter::Note(n, tag)) = session.submit_modify(
                op,
                waiter,
                link::Queue {
                    defer: true,
                    local_pending: false,
                },
            ) {
                // The session is down: the frame was never sent.
                n.notify(tag, Remote::Lost, &mut Batch::default());
            }
        }
    }

    /// Counts an application write for the rate controller.
    pub(super) fn note_app_write(&self) {
        self.app_writes.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends every out-of-sync block to the peer (this node is the sync
    /// source), then tells the peer it is in sync and, once it
    /// confirmed, records the end of the sync. Application writes keep
    /// flowing meanwhile (see the module comment).
    pub(super) fn resync(&self, session: &Arc<Session>) {
        let total = lock(&self.oos).count();
        self.progress.start();
        tracing::info!(resource = %self.name, peer = %session.peer, blocks = total, "resync started");
        let flight = Arc::new(Flight {
            replica: self.me.clone(),
            state: Mutex::new(FlightState::default()),
            changed: Condvar::new(),
        });
        let copied = self.copy_out_of_sync(session, &flight);
        // Nothing of ours may still be answered once this returns: the
        // session's end marks ranges again after it (see `run_session`).
        while flight.in_flight() > 0 {
            flight.wait_below(1, Duration::from_millis(100));
        }
        if !copied {
            self.progress.stop();
            self.emit_progress();
            return;
        }
        self.progress.copied();
        if !self.finish_sync(session) {
            self.progress.stop();
            self.emit_progress();
            return;
        }
        let st = self.progress.status(0);
        tracing::info!(
            resource = %self.name, peer = %session.peer, blocks = total,
            moved = st.moved_bytes, zeroed = st.zeroed_bytes, same = st.same_bytes,
            elapsed_ms = st.elapsed_ms, copy_ms = st.copy_ms.unwrap_or(0),
            mib_per_sec = format!("{:.1}", st.done_bytes as f64 / (1u64 << 20) as f64 / (st.elapsed_ms.max(1) as f64 / 1000.0)),
            "resync finished"
        );
        self.emit_progress();
    }

    /// The end of a sync whose blocks are all acknowledged: a barrier,
    /// `SyncDone`, the target's confirmation, then our own state step.
    fn finish_sync(&self, session: &Arc<Session>) -> bool {
        // Durable on the target before it may call itself UpToDate. The
        // flush may write back gigabytes: pings, not this wait, tell a
        // dead peer from a slow disk.
        let Some(barrier) = session.send_frame(Track::Barrier, |seq| Frame::Barrier { seq }) else {
            return false;
        };
        if session.wait(&barrier, self.ack_timeout() * 10) != Remote::Done {
            return false;
        }
        let current = lock(&self.inner)
            .node
            .as_ref()
            .map_or(0, |n| n.gens().current);
        session.send_control(&Frame::SyncDone { current });
        // The target records the end first; its answer confirms it.
        if !self.confirm_state(session, 0) {
            return false;
        }
        // The bits the sync cleared, on disk before the end is recorded.
        if !self.persist_bitmap_at_sync_end(false) {
            return false;
        }
        // Ended before the state says so: whoever sees the pair in sync
        // sees the sync's final figures.
        self.progress.finished.fetch_add(1, Ordering::Relaxed);
        self.progress.stop();
        match self.step(Event::SyncFinished) {
            Ok(fx) => {
                self.effects(&fx);
                true
            }
            Err(e) => {
                tracing::warn!(resource = %self.name, "resync finished, but: {e}");
                false
            }
        }
    }

    fn emit_progress(&self) {
        self.events.emit(event_json("progress", &self.status()));
    }

    /// The copy passes; true once nothing is out of sync and nothing in
    /// flight, false if the session or the daemon is ending.
    fn copy_out_of_sync(&self, session: &Arc<Session>, flight: &Arc<Flight>) -> bool {
        let csums = self.csums && session.has_feature(replblk_proto::repl::features::CSUMS);
        if self.csums && !csums {
            tracing::warn!(resource = %self.name, "the peer does not answer checksum queries: sending every out-of-sync block");
        }
        if csums {
            let sink: Arc<dyn link::CsumSink> = flight.clone();
            session.set_csum_sink(Some(sink));
        }
        let mut queries = std::collections::HashMap::new();
        let done = self.copy_passes(session, flight, csums, &mut queries);
        // Queries the peer will not answer now hold their chunks no more.
        for (_, (_, _, chunk)) in queries.drain() {
            flight.end_submit(chunk, self);
        }
        if csums {
            session.set_csum_sink(None);
        }
        done
    }

    fn copy_passes(
        &self,
        session: &Arc<Session>,
        flight: &Arc<Flight>,
        csums: bool,
        queries: &mut std::collections::HashMap<u64, (u64, u64, usize)>,
    ) -> bool {
        let mut next_query = 0u64;
        let store = match self.current_store() {
            Ok(s) => s,
            Err(e) => {
                session.fail(&format!("resync: {e}"));
                return false;
            }
        };
        let notify: Arc<dyn link::Notify> = flight.clone();
        let out = Out {
            session,
            flight,
            notify: &notify,
        };
        let mut buf = vec![0u8; CHUNK as usize];
        let mut parts = Vec::with_capacity(16);
        let mut runs: Vec<(u64, u64)> = Vec::with_capacity(MAX_RUNS);
        let mut ctl = Controller::new(Instant::now(), self.app_writes.load(Ordering::Relaxed));
        let mut cursor = crate::bitmap::Cursor::new();
        let mut since_barrier = 0u64;
        let mut last_barrier = Instant::now();
        let mut last_progress = Instant::now();
        let size = self.size();
        let gran = lock(&self.oos).granularity();
        loop {
            if !session.is_alive() || self.stopping.load(Ordering::SeqCst) {
                return false;
            }
            if csums && !self.take_csum_replies(&out, &*store, queries, &mut buf, &mut parts) {
                return false;
            }
            if let Some(r) = flight.failed() {
                let why = match r {
                    Remote::Failed(errno) => {
                        format!("the peer could not write resync data (errno {errno})")
                    }
                    _ => "resync data lost with the link".to_owned(),
                };
                session.fail(&why);
                return false;
            }
            let now = Instant::now();
            if now.duration_since(last_progress) >= PROGRESS_EVERY {
                last_progress = now;
                self.progress.sample();
                self.emit_progress();
            }
            if since_barrier >= BARRIER_EVERY
                || (since_barrier > 0 && now.duration_since(last_barrier) >= BARRIER_INTERVAL)
            {
                // Bounds what a link cut makes the next sync resend.
                let _ = session.submit_frame(
                    Track::Barrier,
                    Waiter::Nobody,
                    link::Queue::default(),
                    |seq| Frame::Barrier { seq },
                );
                session.activate();
                since_barrier = 0;
                last_barrier = now;
            }
            if flight.chunks() >= MAX_CHUNKS {
                flight.wait_below(flight.in_flight(), Duration::from_millis(5));
                continue;
            }
            let settings = *lock(&self.rate);
            let app = self.app_writes.load(Ordering::Relaxed);
            let room = match ctl.allow(&settings, CHUNK, flight.in_flight(), app, now) {
                Allow::Send(n) => n,
                Allow::Wait(d) => {
                    let in_flight = flight.in_flight();
                    if in_flight > 0 {
                        // Woken early by an acknowledgement.
                        flight.wait_below(in_flight, d);
                    } else {
                        std::thread::sleep(d);
                    }
                    continue;
                }
            };
            // A run the store knows to be a hole goes as one write-zeroes
            // frame of up to `HOLE_CHUNK`, without reading it.
            if !csums && self.send_hole(&out, &*store, &mut cursor, size) {
                since_barrier += CHUNK;
                continue;
            }
            // A chunk: the runs within one span of the device, up to
            // `room` bytes of them, under one interval.
            runs.clear();
            let ahead = {
                let bm = lock(&self.oos);
                if let Some(first) = cursor.next_run(&bm, room) {
                    let span_end = first.0.saturating_add(SPAN).min(size);
                    let mut bytes = first.1;
                    runs.push(first);
                    while bytes < room && runs.len() < MAX_RUNS {
                        match cursor.next_run_before(&bm, span_end, room - bytes) {
                            Some(r) => {
                                bytes += r.1;
                                runs.push(r);
                            }
                            None => break,
                        }
                    }
                }
                // The run the next chunk starts with (the cursor is a
                // copy; the bitmap may change before then).
                let mut peek = cursor;
                peek.next_run(&bm, CHUNK)
            };
            // `read_bulk` does no readahead: the disk reads the next run
            // while this chunk is read and sent.
            if let Some((off, len)) = ahead.filter(|_| !runs.is_empty()) {
                let len = len.min(size.saturating_sub(off));
                if !store.reads_as_zeroes(off, len) {
                    let _ = store.cache(off, len);
                }
            }
            let (Some(&(offset, _)), Some(&(last_off, last_len))) = (runs.first(), runs.last())
            else {
                // End of a pass: what is still set was set behind the
                // cursor, or is in flight.
                if flight.in_flight() > 0 {
                    flight.wait_below(1, Duration::from_millis(100));
                    continue;
                }
                if lock(&self.oos).count() == 0 {
                    return true;
                }
                cursor = crate::bitmap::Cursor::new();
                continue;
            };
            let span = (last_off + last_len).min(size) - offset;
            let interval = self.intervals.acquire(offset, span);
            let mut len = 0u64;
            let mut at = 0usize;
            for r in runs.iter_mut() {
                r.1 = r.1.min(size.saturating_sub(r.0));
                if csums {
                    len += r.1;
                    continue;
                }
                let data = &mut buf[at..at + r.1 as usize];
                if let Err(e) = store.read_bulk(data, r.0) {
                    self.intervals.release(interval);
                    tracing::error!(resource = %self.name, offset = r.0, "resync: reading the local disk failed: {e}");
                    session.fail(&format!("resync read failed: {e}"));
                    return false;
                }
                at += r.1 as usize;
                len += r.1;
            }
            let chunk = flight.begin_chunk(interval, len);
            if csums {
                // Ask for the target's digests; the data follows (or not)
                // when they come.
                for &(run_off, run_len) in &runs {
                    next_query += 1;
                    flight.hold(chunk);
                    queries.insert(next_query, (run_off, run_len, chunk));
                    session.send_control(&Frame::CsumQuery {
                        id: next_query,
                        offset: run_off,
                        length: run_len as u32,
                        block: gran as u32,
                        alg: replblk_proto::repl::csum_alg::XXH3_128,
                    });
                }
            } else {
                let mut at = 0usize;
                for &(run_off, run_len) in &runs {
                    let data = &buf[at..at + run_len as usize];
                    at += run_len as usize;
                    self.send_run(&out, chunk, run_off, data, &mut parts);
                }
                session.kick();
            }
            flight.end_submit(chunk, self);
            session.activate();
            since_barrier += len;
            ctl.spent(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(buf: &[u8]) -> Vec<(usize, usize, bool)> {
        let mut out = Vec::new();
        split_zeroes(buf, &mut out);
        out
    }

    #[test]
    fn zero_runs_are_split_out_at_64k() {
        let mut buf = vec![0u8; 1 << 20];
        assert_eq!(split(&buf), [(0, 1 << 20, true)]);
        buf[5] = 1;
        buf[200 * 1024] = 1;
        assert_eq!(
            split(&buf),
            [
                (0, 64 * 1024, false),
                (64 * 1024, 128 * 1024, true),
                (192 * 1024, 64 * 1024, false),
                (256 * 1024, (1 << 20) - 256 * 1024, true),
            ]
        );
        let small = [0u8, 0, 1];
        assert_eq!(split(&small), [(0, 3, false)]);
        let mut tail = vec![7u8; 100 * 1024];
        tail[64 * 1024..].fill(0);
        // The tail is shorter than the split size: sent as data.
        assert_eq!(split(&tail), [(0, 100 * 1024, false)]);
    }
}
