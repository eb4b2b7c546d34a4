//! The Primary's data path: `Replica` as the `Store` the NBD server
//! writes to. Plain writes are submitted and completed by the thread that
//! reads the peer's Ack; FUA writes and flushes wait for theirs.

use super::*;
use std::sync::atomic::AtomicI32;

/// Trims and zeroings spanning more 4 MiB extents than this go through
/// the activity log in pieces of this many extents.
const AL_PIECE_EXTENTS: u64 = 8;

impl Replica {
    pub(super) fn mark_out_of_sync(&self, offset: u64, len: u64) {
        lock(&self.oos).set_range(offset, len);
    }

    pub(super) fn current_session(&self) -> Option<Arc<Session>> {
        lock(&self.session).clone().filter(|s| s.is_alive())
    }

    pub(super) fn ack_timeout(&self) -> Duration {
        Duration::from_millis(
            self.peer
                .as_ref()
                .map_or(30_000, |p| p.timing.ack_timeout_ms),
        )
    }

    /// Runs one replicated modification: interval lock, send, local
    /// operation, wait for the peer, mark out of sync unless both did it.
    fn replicate(
        &self,
        offset: u64,
        len: u64,
        send: impl Fn(&Session) -> Option<Arc<link::Slot>>,
        local: impl FnOnce(&dyn Store) -> io::Result<()>,
    ) -> io::Result<()> {
        if self.frozen.load(Ordering::Relaxed) {
            self.wait_thawed();
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.note_app_write();
        let _inflight = InFlight(&self.inflight);
        if !self.serving.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let store = self.current_store()?;
        if self.peer.is_none() {
            // A single-node resource has nobody to be out of sync with.
            return local(&*store);
        }
        let _range = self.intervals.lock(offset, len);
        if self.disk_detached() {
            return self.remote_only(send);
        }
        // In the activity log before either copy is written; released
        // (dropped last) once the range is marked if it has to be.
        let _al = match self.al_begin(offset, len) {
            Ok(al) => al,
            Err(_) if self.disk_detached() => return self.remote_only(send),
            Err(e) => return Err(e),
        };
        let start = || {
            self.current_session()
                .and_then(|s| send(&s).map(|slot| (s, slot)))
        };
        let mut remote = start();
        // Without a peer, marked before the local write (see `submit`).
        if remote.is_none() {
            self.mark_out_of_sync(offset, len);
        }
        let result = local(&*store);
        if remote.is_none() {
            remote = start();
        }
        let (in_sync, lost) = match remote {
            Some((session, slot)) => match session.wait(&slot, self.ack_timeout()) {
                Remote::Done => (true, false),
                Remote::Failed(errno) => {
                    tracing::warn!(resource = %self.name, offset, len, errno, "peer failed a write; range marked out of sync");
                    (false, false)
                }
                Remote::Lost => (false, true),
            },
            None => (false, true),
        };
        if !in_sync || result.is_err() {
            self.mark_out_of_sync(offset, len);
        }
        if lost {
            // Not acknowledged before the peer is fenced (fencing on).
            self.hold_here()?;
        }
        if result.is_err() && self.disk_detached() {
            // The disk failed and is detached: the peer's copy is the one.
            return match in_sync {
                true => Ok(()),
                false => Err(io::Error::from_raw_os_error(libc::EIO)),
            };
        }
        result
    }
}

impl Replica {
    /// A trim or zeroing spanning more extents than one activity-log
    /// transaction should make hot at once, carried out piece by piece.
    fn modify_in_pieces(&self, op: Modify<'_>) -> io::Result<()> {
        let (offset, len) = op.range();
        let piece = AL_PIECE_EXTENTS << crate::core::actlog::EXTENT_SHIFT;
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let next = ((at / piece) + 1).saturating_mul(piece).min(end);
            match op {
                Modify::Trim { .. } => self.trim(at, next - at)?,
                Modify::WriteZeroes { may_unmap, .. } => {
                    self.write_zeroes(at, next - at, may_unmap)?
                }
                Modify::Write { buf, .. } => {
                    let from = (at - offset) as usize;
                    let to = (next - offset) as usize;
                    self.write_at(&buf[from..to], at, false)?
                }
            }
            at = next;
        }
        Ok(())
    }

    /// Whether a modification of the range is split for the activity log.
    fn spans_many_extents(&self, offset: u64, len: u64) -> bool {
        crate::core::actlog::extents(offset, len)
            .is_some_and(|(first, last)| u64::from(last - first) >= AL_PIECE_EXTENTS)
            && self.persistent().is_some_and(|p| p.enabled())
    }

    /// Sends what a burst's submissions held back.
    pub(super) fn kick(&self) {
        if let Some(s) = self.current_session() {
            s.kick();
        }
    }

    /// The Primary's write path at depth: the calling worker queues the
    /// frame for the peer, writes locally and returns; whichever thread
    /// learns the last of the two halves (usually the one that reads the
    /// peer's Ack) completes the request (replies to the client).
    /// No thread waits for the network, so none has to be woken per write.
    /// A lone request (`more` false, nothing else in flight) reads its own
    /// Ack (see `Session::after_submit`), until `watch` becomes readable.
    fn submit_write(&self, op: Modify<'_>, done: Done, more: bool, watch: Option<RawFd>) {
        let Some(me) = self.me.upgrade().filter(|_| self.peer.is_some()) else {
            let result = op.apply(self);
            return done(result, &mut Batch::default());
        };
        if self.frozen.load(Ordering::Relaxed) {
            self.wait_thawed();
        }
        self.inflight.fetch_add(1, Ordering::SeqCst);
        self.note_app_write();
        if !self.serving.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return done(
                Err(io::Error::from_raw_os_error(libc::EPERM)),
                &mut Batch::default(),
            );
        }
        let store = match self.current_store() {
            Ok(s) => s,
            Err(e) => {
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                return done(Err(e), &mut Batch::default());
            }
        };
        if self.disk_detached() {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return self.submit_remote_only(op, done, more, watch);
        }
        let (offset, len) = op.range();
        if self.spans_many_extents(offset, len) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            let result = self.modify_in_pieces(op);
            return done(result, &mut Batch::default());
        }
        // Held until both copies have it: overlapping writes are never in
        // flight together, so they land in the same order on both nodes.
        let range = match self.intervals.try_acquire(offset, len) {
            Some(id) => id,
            None => {
                // An overlapping write is in flight; it may be one of this
                // burst's, still held back: send those before waiting.
                self.kick();
                self.intervals.acquire(offset, len)
            }
        };
        // In the activity log before either copy is written (the frame
        // included); the reference goes once the range is marked if it
        // has to be.
        let al = match self.al_begin(offset, len) {
            Ok(al) => al,
            Err(e) => {
                self.intervals.release(range);
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                if self.disk_detached() {
                    return self.submit_remote_only(op, done, more, watch);
                }
                return done(Err(e), &mut Batch::default());
            }
        };
        // A peer without a disk gets no writes: they are marked instead.
        let peer_diskless = self.peer_diskless.load(Ordering::Relaxed);
        let session = self.current_session().filter(|_| !peer_diskless);
        let Some(session) = session else {
            // Without a peer the range is marked before the local write:
            // a session coming up meanwhile must not finish its resync
            // without it.
            self.mark_out_of_sync(offset, len);
            let result = op.apply(&*store);
            drop(al);
            if self.fencing_on() && !peer_diskless {
                // Acknowledged only once the peer is fenced.
                let r = me.clone();
                return self.hold(Box::new(move |fail| {
                    r.intervals.release(range);
                    r.inflight.fetch_sub(1, Ordering::SeqCst);
                    let result = match (fail, result) {
                        (true, _) => Err(io::Error::from_raw_os_error(libc::EIO)),
                        (false, result) => result,
                    };
                    done(result, &mut Batch::default());
                }));
            }
            self.intervals.release(range);
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return done(result, &mut Batch::default());
        };
        // The frame goes first, then the local write: the peer works on
        // it meanwhile. The request completes when both halves are known,
        // on whichever thread learns the last one.
        let local_error = Arc::new(AtomicI32::new(0));
        let finish: link::Callback = {
            let local_error = local_error.clone();
            Box::new(move |remote, local_ok, batch| {
                if let Remote::Failed(errno) = remote {
                    tracing::warn!(resource = %me.name, offset, len, errno, "peer failed a write; range marked out of sync");
                }
                if remote != Remote::Done || !local_ok {
                    me.mark_out_of_sync(offset, len);
                }
                drop(al);
                let result = if local_ok {
                    Ok(())
                } else if me.disk_detached() {
                    // The local disk failed and is detached: the peer's
                    // answer is the request's.
                    match remote {
                        Remote::Done => Ok(()),
                        Remote::Failed(_) | Remote::Lost => {
                            Err(io::Error::from_raw_os_error(libc::EIO))
                        }
                    }
                } else {
                    Err(io::Error::from_raw_os_error(
                        match local_error.load(Ordering::SeqCst) {
                            0 => libc::EIO,
                            e => e,
                        },
                    ))
                };
                if remote == Remote::Lost && me.fencing_on() {
                    // Acknowledged only once the peer is fenced.
                    let r = me.clone();
                    return me.hold(Box::new(move |fail| {
                        r.intervals.release(range);
                        r.inflight.fetch_sub(1, Ordering::SeqCst);
                        let result = match (fail, result) {
                            (true, _) => Err(io::Error::from_raw_os_error(libc::EIO)),
                            (false, result) => result,
                        };
                        done(result, &mut Batch::default());
                    }));
                }
                me.intervals.release(range);
                me.inflight.fetch_sub(1, Ordering::SeqCst);
                done(result, batch)
            })
        };
        let queue = link::Queue {
            defer: more,
            local_pending: true,
        };
        let seq = match session.submit_modify(op, Waiter::Call(finish), queue) {
            Ok(seq) => Some(seq),
            Err(Waiter::Call(finish)) => {
                // The session ended meanwhile: marked before the local
                // write, as without a peer.
                self.mark_out_of_sync(offset, len);
                let result = op.apply(&*store);
                let ok = result.is_ok();
                if let Err(e) = result {
                    local_error.store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::SeqCst);
                }
                finish(Remote::Lost, ok, &mut Batch::default());
                None
            }
            Err(_) => None,
        };
        let Some(seq) = seq else {
            return;
        };
        let result = op.apply(&*store);
        if let Err(e) = &result {
            local_error.store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::SeqCst);
        }
        let mut batch = Batch::default();
        session.local_done(seq, result.is_ok(), &mut batch);
        batch.run();
        if more {
            session.activate();
        } else {
            session.after_submit(seq, self.ack_timeout(), watch);
        }
    }
}

impl Store for Replica {
    fn as_dyn(&self) -> &dyn Store {
        self
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Only the Primary serves: a client that slipped past a demote
        // must not read a Secondary's data, which the Primary is changing.
        if self.peer.is_some() && !self.serving.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if self.disk_detached() {
            return self.read_remote(buf, offset);
        }
        match self.current_store()?.read_at(buf, offset) {
            // Detached by this very error: the peer has the data.
            Err(_) if self.disk_detached() => self.read_remote(buf, offset),
            r => r,
        }
    }

    fn submit(&self, op: Modify<'_>, done: Done) {
        self.submit_write(op, done, false, None);
    }

    fn submit_more(&self, op: Modify<'_>, done: Done) {
        self.submit_write(op, done, true, None);
    }

    fn submit_watching(&self, op: Modify<'_>, done: Done, next: RawFd) {
        self.submit_write(op, done, false, Some(next));
    }

    fn kick(&self) {
        Replica::kick(self);
    }

    fn submit_may_wait(&self) -> bool {
        self.peer.is_some()
    }

    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        let flags = if durable { data_flags::FUA } else { 0 };
        self.replicate(
            offset,
            buf.len() as u64,
            |s| s.send_write(offset, flags, buf),
            |store| store.write_at(buf, offset, durable),
        )
    }

    fn flush(&self) -> io::Result<()> {
        let store = self.current_store()?;
        if !self.serving.load(Ordering::SeqCst) || self.peer.is_none() {
            if self.disk_detached() {
                // Nothing is written here any more: nothing to make durable.
                return Ok(());
            }
            return store.flush();
        }
        let barrier = |s: &Session| s.send_frame(Track::Barrier, |seq| Frame::Barrier { seq });
        if self.disk_detached() {
            return self.remote_only(barrier);
        }
        let peer_diskless = self.peer_diskless.load(Ordering::Relaxed);
        let remote = self
            .current_session()
            .filter(|_| !peer_diskless)
            .and_then(|s| barrier(&s).map(|slot| (s, slot)));
        let local = store.flush();
        let mut remote_ok = false;
        let lost = match remote {
            Some((session, slot)) => match session.wait(&slot, self.ack_timeout()) {
                Remote::Done => {
                    remote_ok = true;
                    false
                }
                Remote::Failed(_) => {
                    tracing::warn!(resource = %self.name, "flush: the peer failed the barrier");
                    false
                }
                Remote::Lost => {
                    tracing::warn!(resource = %self.name, "flush: peer lost before the barrier was acknowledged");
                    true
                }
            },
            None => !peer_diskless,
        };
        if lost {
            self.hold_here()?;
        }
        match local {
            // Detached by this very error: durable on the peer is enough.
            Err(_) if self.disk_detached() && remote_ok => Ok(()),
            Err(_) if self.disk_detached() => Err(io::Error::from_raw_os_error(libc::EIO)),
            r => r,
        }
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        let op = Modify::Trim { offset, len };
        if self.spans_many_extents(offset, len) {
            return self.modify_in_pieces(op);
        }
        self.replicate(offset, len, |s| s.send_modify(op), |store| op.apply(store))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let op = Modify::WriteZeroes {
            offset,
            len,
            may_unmap,
        };
        if self.spans_many_extents(offset, len) {
            return self.modify_in_pieces(op);
        }
        self.replicate(offset, len, |s| s.send_modify(op), |store| op.apply(store))
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.disk_detached() {
            // Advisory, and nothing local to warm up.
            return Ok(());
        }
        self.current_store()?.cache(offset, len)
    }
}

/// Decrements the in-flight count when a request finishes.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
