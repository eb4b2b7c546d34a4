//! The Secondary's side of a session: frames applied in wire order,
//! plain writes acknowledged in batches, durable ones after a flush.
//!
//! A sync target hands large plain writes (a resync streams them at 1 MiB)
//! to a writer thread that writes them past the page cache
//! (`Store::write_direct`) while this thread reads the next frames: the
//! copy into the page cache was most of the target's CPU time, and the
//! final flush then has little left to write. The apply loop reads each
//! frame's payload to a 4 KiB aligned address, so the writer writes it
//! from there, with no copy in between. Such a write is acknowledged
//! once written, like any plain write; a barrier still waits for a flush.
//! Only writes that overlap nothing in the writer's hands go there, and
//! every other frame first waits until the writer is idle, so the result
//! is that of applying the frames one after another in wire order.

use super::*;

/// Plain writes at least this large go to the writer thread on a sync
/// target.
const OFFLOAD_MIN: usize = 64 * 1024;
/// Bytes written since the last flush up to which a durable request with
/// nothing behind it is flushed by the apply loop itself (see
/// `receive_as_secondary`).
const INLINE_FLUSH_MAX: usize = 1 << 20;

/// Writes queued for the writer thread at most (beyond the one it writes).
const OFFLOAD_DEPTH: usize = 4;
/// A sync target starts the write-back of its buffered writes each time
/// this many bytes of them were applied.
const WRITEBACK_EVERY: usize = 4 << 20;

/// A write for the writer thread: the frame's body and where its payload
/// sits in it.
struct Job {
    seq: u64,
    offset: u64,
    body: Vec<u8>,
    payload: std::ops::Range<usize>,
}

/// The ranges the writer thread holds (queued or being written).
#[derive(Default)]
struct Offload {
    ranges: Mutex<Vec<(u64, u64)>>,
    idle: Condvar,
}

impl Offload {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        lock(&self.ranges)
            .iter()
            .any(|&(o, l)| o < offset + len && offset < o + l)
    }

    fn wait_idle(&self) {
        let mut r = lock(&self.ranges);
        while !r.is_empty() {
            r = self.idle.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn done(&self, offset: u64, len: u64) {
        let mut r = lock(&self.ranges);
        if let Some(i) = r.iter().position(|&x| x == (offset, len)) {
            r.swap_remove(i);
        }
        if r.is_empty() {
            self.idle.notify_all();
        }
    }
}

impl Replica {
    pub(super) fn receive_as_secondary<'s>(
        &'s self,
        session: &'s Arc<Session>,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<ModeEnd, LinkError> {
        let store = self
            .current_store()
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        // Durable requests (FUA writes, barriers) wait for a flush that
        // started after they were applied (`SecondaryPath` groups them).
        // One that arrives with nothing buffered behind it, and little
        // written since the last flush, is flushed here: no hand-off, and
        // nothing waits to be applied meanwhile. Otherwise the flusher
        // thread flushes, once per group, while this loop keeps applying
        // later writes: a flush with much to write back (the Primary's
        // barrier after `transfer_log_max_age_ms` of writes) takes long
        // enough to stall the writes arriving behind it.
        let (doorbell, rung) = mpsc::sync_channel::<()>(1);
        let flusher_session = session.clone();
        let flusher_store = store.clone();
        let name = self.name.clone();
        scope.spawn(move || {
            while rung.recv().is_ok() {
                while flush_group(&flusher_session, &*flusher_store, &name) {}
            }
        });
        // A sync target's small writes (a bitmap resync of scattered
        // blocks) go through the page cache; left there, they are all
        // written back by the final barrier's flush, after the copy. This
        // thread starts their write-back as they arrive, so the disk
        // works during the copy and the final flush has little left. It is
        // given the span the writes covered since the last time (a resync
        // goes in offset order), so the kernel looks for dirty pages there
        // only, not in the whole device.
        let (writeback, kicked) = mpsc::sync_channel::<(u64, u64)>(1);
        let writeback_store = store.clone();
        scope.spawn(move || {
            while let Ok((start, end)) = kicked.recv() {
                writeback_store.start_writeback(start, end - start);
            }
        });
        let mut buffered = 0usize;
        let mut unflushed = 0usize;
        let mut span: Option<(u64, u64)> = None;
        // The writer thread for large writes (see the module comment), if
        // the store can write past the page cache.
        let offload = Arc::new(Offload::default());
        let (jobs, spares) = if store.writes_direct() {
            let (job_tx, job_rx) = mpsc::sync_channel::<Job>(OFFLOAD_DEPTH);
            let (spare_tx, spare_rx) = mpsc::channel::<Vec<u8>>();
            let (session, store, offload) = (session.clone(), store.clone(), offload.clone());
            scope
                .spawn(move || self.write_offloaded(&session, &*store, &offload, job_rx, spare_tx));
            (Some(job_tx), Some(spare_rx))
        } else {
            (None, None)
        };
        let mut reader = session.reader();
        // A frame's body is `body[start..]`: a Write's payload is read to
        // where the writer thread can write it without copying it first.
        let mut body = Vec::new();
        let mut start;
        // Frames a submitter read while this node was still Primary come
        // first.
        let stashed = session.take_stash();
        let mut stashed = stashed.into_iter();
        let result = loop {
            if reader.buffer().is_empty() {
                // Acks are batched: sent when no further frame is already
                // buffered, i.e. just before this loop could block.
                send_acks(session);
            }
            if self.role() != Role::Secondary {
                break Ok(ModeEnd::RoleChanged);
            }
            let kind = match stashed.next() {
                Some((kind, stashed_body)) => {
                    body = stashed_body;
                    start = 0;
                    kind
                }
                None => match link::read_raw_placed(
                    &mut *reader,
                    &mut body,
                    WriteFrame::FIXED,
                    crate::store::DIRECT_ALIGN,
                ) {
                    Ok((k, s)) => {
                        start = s;
                        k
                    }
                    Err(e) => break Err(e),
                },
            };
            if !session.is_alive() {
                break Ok(ModeEnd::Over(
                    session.reason().unwrap_or_else(|| "shutting down".into()),
                ));
            }
            if kind == repl_kind::WRITE && body.len() - start >= OFFLOAD_MIN {
                if let (Some(jobs), Some(spares)) = (&jobs, &spares) {
                    match self.offload_write(session, &offload, &mut body, start, jobs, spares) {
                        Ok(true) => continue,
                        Ok(false) => {}
                        Err(e) => break Err(e),
                    }
                }
            }
            // Everything else is applied after what the writer holds.
            offload.wait_idle();
            let (seq, status, durable, written) =
                match self.apply(session, &*store, kind, &body[start..]) {
                    Ok(Applied::Nothing) => continue,
                    Ok(Applied::Done {
                        seq,
                        durable,
                        written,
                    }) => (seq, 0, durable, written),
                    Ok(Applied::Failed { seq, status }) => (seq, status, false, None),
                    Err(e) => break Err(e),
                };
            let due = {
                let mut receiving = lock(&session.receiving);
                if let Err(e) = receiving.applied(seq, status, durable) {
                    break Err(LinkError::Protocol(e.to_string()));
                }
                receiving.acks_due()
            };
            if due {
                // A batch goes out though more frames are buffered.
                send_acks(session);
            }
            if let Some((start, end)) = written {
                span = Some(span.map_or((start, end), |(s, e)| (s.min(start), e.max(end))));
                buffered += (end - start) as usize;
                unflushed = unflushed.saturating_add((end - start) as usize);
                if buffered >= WRITEBACK_EVERY {
                    buffered = 0;
                    // Kept for next time if the thread is still busy.
                    if let Some(s) = span {
                        if self.sync_target() && writeback.try_send(s).is_ok() {
                            span = None;
                        }
                    }
                }
            }
            if !durable {
                continue;
            }
            // A sync target leaves every flush to the flusher: the source
            // streams data behind its periodic barriers, and a flush of
            // what a resync wrote takes long enough to stall that stream.
            let inline =
                reader.buffer().is_empty() && !self.sync_target() && unflushed <= INLINE_FLUSH_MAX;
            unflushed = 0;
            if inline {
                // Acks of earlier writes need not wait for the flush.
                send_acks(session);
                if !flush_group(session, &*store, &self.name) {
                    // A flush is running: it may have started before this
                    // request was applied, so another one must follow.
                    let _ = doorbell.try_send(());
                }
            } else {
                let _ = doorbell.try_send(());
            }
            if lock(&session.receiving).awaiting_flush() > 0 {
                let _ = doorbell.try_send(());
            }
        };
        offload.wait_idle();
        drop(jobs);
        send_acks(session);
        drop(doorbell);
        drop(writeback);
        // Nothing durable stays unacknowledged when the mode ends (the
        // flusher finishes its group; this flushes any left waiting).
        if session.is_alive() {
            while flush_group(session, &*store, &self.name) {}
        }
        result
    }

    /// Hands a plain write frame to the writer thread when this node is a
    /// sync target and the write is large, aligned, not FUA, well formed
    /// and clear of what the writer holds: true if it did (then `body` is
    /// a spare buffer), false if the frame is to be applied here.
    fn offload_write(
        &self,
        session: &Session,
        offload: &Offload,
        body: &mut Vec<u8>,
        start: usize,
        jobs: &mpsc::SyncSender<Job>,
        spares: &mpsc::Receiver<Vec<u8>>,
    ) -> Result<bool, LinkError> {
        let Ok(w) = WriteRef::decode_body(&body[start..]) else {
            return Ok(false);
        };
        let align = crate::store::DIRECT_ALIGN as u64;
        let len = w.payload.len() as u64;
        // The crc last: the one costly check, and `apply` makes it again
        // for a write refused here.
        if !self.sync_target()
            || w.flags != 0
            || !w.offset.is_multiple_of(align)
            || !len.is_multiple_of(align)
            || w.offset
                .checked_add(len)
                .is_none_or(|end| end > self.size())
            || !w.crc_ok()
        {
            // Refused or applied here, with the errors `apply` reports.
            return Ok(false);
        }
        if offload.overlaps(w.offset, len) {
            offload.wait_idle();
        }
        Self::receive(session, w.seq)?;
        let (seq, offset) = (w.seq, w.offset);
        let at = w.payload.as_ptr() as usize - body.as_ptr() as usize;
        let payload = at..at + w.payload.len();
        lock(&offload.ranges).push((offset, len));
        let spare = spares.try_recv().unwrap_or_default();
        let job = Job {
            seq,
            offset,
            body: std::mem::replace(body, spare),
            payload,
        };
        if jobs.send(job).is_err() {
            // The writer is gone (it only ends when this loop does).
            offload.done(offset, len);
            return Err(LinkError::Protocol("the resync writer stopped".into()));
        }
        Ok(true)
    }

    /// The writer thread: writes each payload past the page cache (from
    /// where the apply loop read it, aligned for that; a stashed frame's is
    /// copied to an aligned buffer first) and acknowledges it.
    fn write_offloaded(
        &self,
        session: &Session,
        store: &dyn Store,
        offload: &Offload,
        jobs: mpsc::Receiver<Job>,
        spares: mpsc::Sender<Vec<u8>>,
    ) {
        let align = crate::store::DIRECT_ALIGN;
        let mut raw: Vec<u8> = Vec::new();
        while let Ok(job) = jobs.recv() {
            let data = &job.body[job.payload.clone()];
            let n = data.len();
            // The apply loop reads payloads to aligned places; a stashed
            // frame's may lie anywhere.
            let buf = if (data.as_ptr() as usize).is_multiple_of(align) {
                data
            } else {
                if raw.len() < n + align {
                    raw = vec![0u8; n + align];
                }
                let at = raw.as_ptr().align_offset(align);
                raw[at..at + n].copy_from_slice(data);
                &raw[at..at + n]
            };
            let status = match store.write_direct(buf, job.offset) {
                Ok(()) => {
                    self.now_in_sync(job.offset, n as u64);
                    0
                }
                Err(e) => {
                    tracing::error!(resource = %self.name, seq = job.seq, "applying a replicated write failed: {e}");
                    crate::nbd::transmission::io_errno(e)
                }
            };
            let applied = lock(&session.receiving).applied(job.seq, status, false);
            offload.done(job.offset, n as u64);
            if let Err(e) = applied {
                session.fail(&e.to_string());
            }
            send_acks(session);
            let _ = spares.send(job.body);
        }
    }

    /// This node is receiving a resync.
    fn sync_target(&self) -> bool {
        lock(&self.inner)
            .node
            .as_ref()
            .is_some_and(|n| n.repl() == ReplState::SyncTarget)
    }

    /// Checks the numbering of a sequenced frame received.
    fn receive(session: &Session, seq: u64) -> Result<(), LinkError> {
        lock(&session.receiving)
            .receive(seq)
            .map_err(|e| LinkError::Protocol(e.to_string()))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), LinkError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(LinkError::Protocol(format!(
                "range {offset}+{len} is outside the {}-byte device",
                self.size()
            ))),
        }
    }

    /// The blocks `[offset, offset + len)` covers whole now hold what the
    /// peer sent: a sync target clears them from its own bitmap (which the
    /// bitmap exchange filled with the source's marks), as DRBD's target
    /// does, so an interrupted sync resumes with what is left on both
    /// sides. Partly covered blocks stay marked. (A trim is advisory: its
    /// blocks stay marked too.)
    fn now_in_sync(&self, offset: u64, len: u64) {
        let mut oos = lock(&self.oos);
        if oos.count() == 0 {
            return;
        }
        let g = oos.granularity();
        let end = offset.saturating_add(len);
        let first = offset.div_ceil(g) * g;
        // The device's last block may be partial: covered to the end counts.
        let last = if end >= self.size() { end } else { end / g * g };
        if last > first {
            oos.clear_range(first, last - first);
        }
    }

    /// Applies one frame received by the Secondary.
    fn apply(
        &self,
        session: &Session,
        store: &dyn Store,
        kind: u16,
        body: &[u8],
    ) -> Result<Applied, LinkError> {
        let protocol = |e: replblk_proto::DecodeError| LinkError::Protocol(e.to_string());
        let (seq, durable, written, result) = if kind == repl_kind::WRITE {
            // The hot path: decoded in place, no copy of the payload.
            let w = WriteRef::decode_body(body).map_err(protocol)?;
            Self::receive(session, w.seq)?;
            self.check_range(w.offset, w.payload.len() as u64)?;
            if !w.crc_ok() {
                // Nothing from this frame is written; the primary marks the
                // range out of sync when the link drops.
                return Err(LinkError::Protocol(format!(
                    "crc32c mismatch in write seq {} at offset {} ({} bytes)",
                    w.seq,
                    w.offset,
                    w.payload.len()
                )));
            }
            let r = store.write_at(w.payload, w.offset, false);
            if r.is_ok() {
                self.now_in_sync(w.offset, w.payload.len() as u64);
            }
            // In range: `check_range` above.
            let written = (w.offset, w.offset + w.payload.len() as u64);
            (w.seq, w.flags & data_flags::FUA != 0, Some(written), r)
        } else {
            match Frame::decode_body(kind, body).map_err(protocol)? {
                Frame::Trim {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::receive(session, seq)?;
                    self.check_range(offset, length)?;
                    let r = store.trim(offset, length);
                    (seq, flags & data_flags::FUA != 0, None, r)
                }
                Frame::WriteZeroes {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::receive(session, seq)?;
                    self.check_range(offset, length)?;
                    let r = store.write_zeroes(offset, length, flags & data_flags::NO_HOLE == 0);
                    if r.is_ok() {
                        self.now_in_sync(offset, length);
                    }
                    (seq, flags & data_flags::FUA != 0, None, r)
                }
                Frame::Barrier { seq } => {
                    Self::receive(session, seq)?;
                    (seq, true, None, Ok(()))
                }
                // Acks reach a Secondary that is a sync source.
                Frame::Ack { seq, status } => {
                    session.acknowledge(seq, status, &mut Batch::default())?;
                    return Ok(Applied::Nothing);
                }
                other => {
                    session.handle_control(other, "Primary")?;
                    return Ok(Applied::Nothing);
                }
            }
        };
        match result {
            Ok(()) => Ok(Applied::Done {
                seq,
                durable,
                written,
            }),
            Err(e) => {
                tracing::error!(resource = %self.name, seq, "applying a replicated write failed: {e}");
                Ok(Applied::Failed {
                    seq,
                    status: crate::nbd::transmission::io_errno(e),
                })
            }
        }
    }
}

/// What the Secondary did with one frame.
enum Applied {
    /// Not a data frame (ping, pong).
    Nothing,
    /// Applied; `durable` requests are acknowledged after a flush.
    /// `written`: the range `[start, end)` a plain write put in the page
    /// cache.
    Done {
        seq: u64,
        durable: bool,
        written: Option<(u64, u64)>,
    },
    /// The local storage failed; acknowledged with this errno.
    Failed { seq: u64, status: u32 },
}

/// Sends the acknowledgements of the plain writes applied so far.
fn send_acks(session: &Session) {
    let acks = lock(&session.receiving).take_acks();
    send_ack_list(session, &acks);
}

/// Sends `Ack` frames for `(seq, status)` pairs, in one send.
fn send_ack_list(session: &Session, acks: &[(u64, u32)]) {
    if acks.is_empty() {
        return;
    }
    let mut out = BytesMut::with_capacity(acks.len() * 32);
    for &(seq, status) in acks {
        Frame::Ack { seq, status }.encode(&mut out);
    }
    session.send_raw(&out);
}

/// Flushes once for every durable request applied and not yet flushed,
/// and acknowledges them. False when there was nothing to start (none
/// waiting, or another flush running).
fn flush_group(session: &Session, store: &dyn Store, name: &str) -> bool {
    let Some(ticket) = lock(&session.receiving).start_flush() else {
        return false;
    };
    let status = match store.flush() {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(resource = %name, "flush on the secondary failed: {e}");
            crate::nbd::transmission::io_errno(e)
        }
    };
    let acks = lock(&session.receiving).flush_done(ticket, status);
    send_ack_list(session, &acks);
    true
}
