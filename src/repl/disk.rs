//! The local disk failing (`on_io_error`): the guard every local I/O goes
//! through, the detach it triggers, and I/O served by the peer once this
//! node is Diskless.
//!
//! With `on_io_error = detach` (the default) the first read, write or
//! flush error of the local store, or a metadata write error, detaches
//! the disk: the guard fails every later local operation without touching
//! the disk, the state machine makes the node Diskless (`FULL_SYNC` set,
//! the peer told), and the data path sends what it would have done
//! locally to the peer instead. The request that hit the error is retried
//! there, so the client sees no error as long as a connected peer with
//! UpToDate data acknowledges it; without one the client gets EIO.

use super::*;
use crate::config::IoErrorPolicy;
use replblk_proto::repl::{features, MAX_READ_LEN};
use std::collections::HashMap;

/// The local store of a replicated resource, seen through the failure
/// policy: once `failed` is set every operation fails with EIO without
/// reaching the disk; with `detach`, the first error sets it and tells
/// the replica (which detaches on another thread).
pub(super) struct DiskGuard {
    inner: Arc<dyn Store>,
    failed: Arc<AtomicBool>,
    detach: bool,
    replica: Weak<Replica>,
}

impl DiskGuard {
    pub(super) fn new(inner: Arc<dyn Store>, replica: &Replica) -> DiskGuard {
        DiskGuard {
            inner,
            failed: replica.disk_failed.clone(),
            detach: replica.on_io_error == IoErrorPolicy::Detach,
            replica: replica.me.clone(),
        }
    }

    fn check(&self) -> io::Result<()> {
        if self.failed.load(Ordering::Relaxed) {
            return Err(io::Error::other(
                "the local disk is detached after an I/O error",
            ));
        }
        Ok(())
    }

    /// `what` names the request, only formatted if it failed: a `format!`
    /// per request is a measurable share of a 4 KiB write's cost.
    fn outcome<T>(&self, what: impl FnOnce() -> String, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            if self.detach {
                if let Some(replica) = self.replica.upgrade() {
                    replica.local_disk_failed(format!("{}: {e}", what()));
                }
            }
        }
        r
    }
}

impl Store for DiskGuard {
    fn as_dyn(&self) -> &dyn Store {
        self
    }
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let r = self.inner.read_at(buf, offset);
        self.outcome(|| format!("read of {} bytes at {offset}", buf.len()), r)
    }
    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.check()?;
        let r = self.inner.write_at(buf, offset, durable);
        let what = if durable { "FUA write" } else { "write" };
        self.outcome(|| format!("{what} of {} bytes at {offset}", buf.len()), r)
    }
    fn flush(&self) -> io::Result<()> {
        self.check()?;
        let r = self.inner.flush();
        self.outcome(|| "flush".to_owned(), r)
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        let r = self.inner.trim(offset, len);
        self.outcome(|| format!("trim of {len} bytes at {offset}"), r)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        self.check()?;
        let r = self.inner.write_zeroes(offset, len, may_unmap);
        self.outcome(|| format!("zeroing of {len} bytes at {offset}"), r)
    }
    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.cache(offset, len)
    }
    fn reads_as_zeroes(&self, offset: u64, len: u64) -> bool {
        !self.failed.load(Ordering::Relaxed) && self.inner.reads_as_zeroes(offset, len)
    }
    fn writes_direct(&self) -> bool {
        self.inner.writes_direct()
    }
    fn start_writeback(&self, offset: u64, len: u64) {
        if !self.failed.load(Ordering::Relaxed) {
            self.inner.start_writeback(offset, len);
        }
    }
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let r = self.inner.write_direct(buf, offset);
        self.outcome(|| format!("write of {} bytes at {offset}", buf.len()), r)
    }
    fn read_bulk(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check()?;
        let r = self.inner.read_bulk(buf, offset);
        self.outcome(|| format!("read of {} bytes at {offset}", buf.len()), r)
    }
}

/// A peer's answer to a read: its status and data.
type ReadAnswer = (u32, Vec<u8>);

/// Reads this Diskless Primary asked the peer for, by id.
#[derive(Default)]
pub(super) struct RemoteReads {
    pending: Mutex<HashMap<u64, Option<ReadAnswer>>>,
    done: Condvar,
    next_id: AtomicU64,
}

impl Replica {
    /// The local disk is detached after an I/O error (`on_io_error =
    /// detach`): local I/O is not attempted any more.
    pub(super) fn disk_detached(&self) -> bool {
        self.disk_failed.load(Ordering::Relaxed)
    }

    /// Why the disk was detached, for `status`.
    pub(super) fn disk_failure(&self) -> Option<String> {
        lock(&self.disk_failure).clone()
    }

    /// A local read, write or flush failed, or a metadata write: with
    /// `detach`, the disk is detached once (the state change runs on its
    /// own thread: this may be called with data-path locks held).
    pub(super) fn local_disk_failed(&self, why: String) {
        if self.on_io_error != IoErrorPolicy::Detach || self.peer.is_none() {
            return;
        }
        if self.disk_failed.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(resource = %self.name, "local disk I/O error ({why}): detaching the disk (on_io_error = detach)");
        *lock(&self.disk_failure) = Some(why.clone());
        lock(&self.inner).last_error = Some(format!("local disk failed: {why}"));
        let Some(me) = self.me.upgrade() else { return };
        let spawned = std::thread::Builder::new()
            .name(format!("detach-{}", self.name))
            .spawn(move || me.detach_failed_disk());
        if let Err(e) = spawned {
            tracing::error!(resource = %self.name, "cannot start the detach: {e}");
        }
    }

    /// A metadata write failed: always reported (log, `last_error`);
    /// with `detach` it detaches the disk like a data error.
    pub(super) fn metadata_failed(&self, what: &str, e: &dyn std::fmt::Display) {
        tracing::error!(resource = %self.name, "{what} failed: {e}");
        lock(&self.inner).last_error = Some(format!("{what} failed: {e}"));
        self.local_disk_failed(format!("metadata: {what}: {e}"));
    }

    /// The state change of a detach: the node becomes Diskless (its
    /// metadata says so if it can still be written), the activity log
    /// and bitmap writer stop, the peer is told.
    fn detach_failed_disk(&self) {
        self.drop_persistent();
        match self.step(Event::DiskFailed) {
            Ok(fx) => self.effects(&fx),
            Err(e) => tracing::warn!(resource = %self.name, "detach: {e}"),
        }
        self.emit_if_changed();
    }

    /// The session to send application I/O on while this node is
    /// Diskless: connected, and the peer's data UpToDate.
    fn diskless_session(&self) -> Option<Arc<Session>> {
        let up_to_date = lock(&self.inner)
            .node
            .as_ref()
            .and_then(|n| n.peer())
            .is_some_and(|p| p.1 == DiskState::UpToDate);
        self.current_session().filter(|_| up_to_date)
    }

    /// A modification on a Diskless Primary: sent to the peer only and
    /// completed with its answer (EIO without a peer that has the data).
    pub(super) fn submit_remote_only(
        &self,
        op: Modify<'_>,
        done: Done,
        more: bool,
        watch: Option<RawFd>,
    ) {
        let (offset, len) = op.range();
        let Some(session) = self.diskless_session() else {
            return done(
                Err(io::Error::from_raw_os_error(libc::EIO)),
                &mut Batch::default(),
            );
        };
        let Some(me) = self.me.upgrade() else {
            return done(
                Err(io::Error::from_raw_os_error(libc::EIO)),
                &mut Batch::default(),
            );
        };
        let range = match self.intervals.try_acquire(offset, len) {
            Some(id) => id,
            None => {
                self.kick();
                self.intervals.acquire(offset, len)
            }
        };
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let finish: link::Callback = Box::new(move |remote, _local_ok, batch| {
            me.intervals.release(range);
            me.inflight.fetch_sub(1, Ordering::SeqCst);
            let result = match remote {
                Remote::Done => Ok(()),
                Remote::Failed(errno) => Err(io::Error::from_raw_os_error(errno as i32)),
                Remote::Lost => Err(io::Error::from_raw_os_error(libc::EIO)),
            };
            done(result, batch)
        });
        let queue = link::Queue {
            defer: more,
            local_pending: false,
        };
        match session.submit_modify(op, Waiter::Call(finish), queue) {
            Ok(seq) => {
                if more {
                    session.activate();
                } else {
                    session.after_submit(seq, self.ack_timeout(), watch);
                }
            }
            Err(Waiter::Call(finish)) => finish(Remote::Lost, false, &mut Batch::default()),
            Err(_) => {}
        }
    }

    /// A synchronous modification or flush on a Diskless Primary: `send`
    /// queues it on the peer's session; the peer's answer is the result.
    /// The caller holds the range's interval lock.
    pub(super) fn remote_only(
        &self,
        send: impl Fn(&Session) -> Option<Arc<link::Slot>>,
    ) -> io::Result<()> {
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        let session = self.diskless_session().ok_or_else(eio)?;
        let slot = send(&session).ok_or_else(eio)?;
        match session.wait(&slot, self.ack_timeout()) {
            Remote::Done => Ok(()),
            Remote::Failed(errno) => Err(io::Error::from_raw_os_error(errno as i32)),
            Remote::Lost => Err(eio()),
        }
    }

    /// Reads `buf` from the peer (a Diskless Primary, or one whose local
    /// read just failed), in pieces of at most `MAX_READ_LEN`.
    pub(super) fn read_remote(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let eio = || io::Error::from_raw_os_error(libc::EIO);
        let session = self
            .diskless_session()
            .filter(|s| s.has_feature(features::READS))
            .ok_or_else(eio)?;
        let mut at = 0usize;
        while at < buf.len() {
            let n = (buf.len() - at).min(MAX_READ_LEN as usize);
            let data = self.read_piece(&session, offset + at as u64, n as u32)?;
            if data.len() != n {
                tracing::error!(resource = %self.name, "the peer answered a read of {n} bytes with {}", data.len());
                return Err(eio());
            }
            buf[at..at + n].copy_from_slice(&data);
            at += n;
        }
        Ok(())
    }

    fn read_piece(&self, session: &Session, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        let reads = &self.remote_reads;
        let id = reads.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        lock(&reads.pending).insert(id, None);
        // On the Primary the receiver reads the link only while something
        // awaits an answer.
        session.awaiting_answer();
        session.send_control(&Frame::ReadRequest { id, offset, length });
        let deadline = Instant::now() + self.ack_timeout();
        let mut pending = lock(&reads.pending);
        let result = loop {
            if let Some(Some(_)) = pending.get(&id) {
                let Some(Some((status, data))) = pending.remove(&id) else {
                    unreachable!("checked above")
                };
                break if status == 0 {
                    Ok(data)
                } else {
                    Err(io::Error::from_raw_os_error(status as i32))
                };
            }
            if !session.is_alive() {
                pending.remove(&id);
                break Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if Instant::now() >= deadline {
                pending.remove(&id);
                drop(pending);
                session.fail("the peer did not answer a read request in time");
                session.answered();
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            pending = reads
                .done
                .wait_timeout(pending, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(pending);
        session.answered();
        result
    }

    /// The peer's `ReadReply` (on the thread reading the link).
    pub(super) fn on_read_reply(&self, id: u64, status: u32, data: Vec<u8>) {
        let reads = &self.remote_reads;
        let mut pending = lock(&reads.pending);
        // A reply to a request given up is dropped.
        if let Some(slot) = pending.get_mut(&id) {
            *slot = Some((status, data));
            reads.done.notify_all();
        }
    }

    /// The peer's `ReadRequest` (on the thread reading the link, so after
    /// every write sent before it is applied): answered from the local
    /// disk if its data is UpToDate, else with EIO.
    pub(super) fn on_read_request(&self, session: &Session, id: u64, offset: u64, length: u32) {
        let len = u64::from(length);
        let status = if offset.checked_add(len).is_none_or(|e| e > self.size()) {
            tracing::warn!(resource = %self.name, offset, length, "read request past the end of the device");
            libc::EINVAL as u32
        } else if self.disk() != DiskState::UpToDate || self.disk_detached() {
            libc::EIO as u32
        } else {
            let mut data = vec![0u8; length as usize];
            match self
                .current_store()
                .and_then(|s| s.read_at(&mut data, offset))
            {
                Ok(()) => {
                    return session.send_control(&Frame::ReadReply {
                        id,
                        status: 0,
                        data,
                    })
                }
                Err(e) => {
                    tracing::error!(resource = %self.name, offset, length, "reading for the peer failed: {e}");
                    libc::EIO as u32
                }
            }
        };
        session.send_control(&Frame::ReadReply {
            id,
            status,
            data: Vec::new(),
        });
    }

    /// The local disk state.
    fn disk(&self) -> DiskState {
        lock(&self.inner)
            .node
            .as_ref()
            .map_or(DiskState::Diskless, |n| n.disk())
    }
}
