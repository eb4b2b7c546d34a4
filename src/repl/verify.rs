//! Online verify (DRBD's `drbdadm verify`): this node walks the device
//! in chunks, asks the peer for the digests of each chunk's blocks,
//! compares them with its own and marks the blocks that differ out of
//! sync, on both nodes. Nothing is repaired here: the marked blocks are
//! resynced at the next connect (`disconnect` then `connect`), with the
//! Primary's copy winning (both sides marked, see `Rule::BothDirtyBits`).
//!
//! Ordering against application writes. Both digests of a chunk must
//! describe the same writes:
//! - the requester holds its interval lock on the chunk from before the
//!   request until it compared, so none of its own writes to the chunk
//!   (as Primary) is in flight or starts meanwhile;
//! - the responder takes its interval lock without waiting (it runs on
//!   the thread that reads the link); if a write of its own holds the
//!   range it answers "busy" and the requester asks again later. Under
//!   the lock no write of the responder's to the chunk is in flight: the
//!   peer has applied every earlier one;
//! - each side computes its digests on the thread that reads the link,
//!   when the request (responder) or the reply (requester) arrives: the
//!   Secondary applies the Primary's writes on that thread in wire
//!   order, so at that point it holds exactly the writes the Primary sent
//!   before the frame.

use super::*;
use crate::checksum;
use replblk_proto::repl::{MAX_VERIFY_LEN, VERIFY_BUSY};

/// Bytes compared per request.
const CHUNK: u64 = 256 * 1024;
/// How often a busy chunk is asked for again before it is skipped.
const BUSY_RETRIES: u32 = 500;
const BUSY_PAUSE: Duration = Duration::from_millis(2);

/// Where a verify is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyState {
    Running,
    /// Walked the whole device.
    Done,
    /// Stopped by the operator or by the end of the connection.
    Stopped,
    /// A read failed.
    Failed,
}

/// Online verify progress and result, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct VerifyStatus {
    pub state: VerifyState,
    /// Bytes compared so far, of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Blocks found different (marked out of sync on both nodes).
    pub out_of_sync_blocks: u64,
    pub out_of_sync_bytes: u64,
    /// Blocks not compared because application writes kept them busy.
    pub skipped_blocks: u64,
    pub elapsed_ms: u64,
    /// Why it stopped or failed.
    pub message: Option<String>,
}

/// The verify of one resource: its status and how to stop it.
#[derive(Default)]
pub(super) struct VerifyCtl {
    status: Option<VerifyStatus>,
    stop: Option<Arc<AtomicBool>>,
    thread: Option<JoinHandle<()>>,
    /// The request in flight: its id, range and block size, and the
    /// blocks found different once the reply was compared.
    pending: Option<Pending>,
    next_id: u64,
}

struct Pending {
    id: u64,
    offset: u64,
    length: u64,
    block: u64,
    outcome: Option<Outcome>,
}

enum Outcome {
    Busy,
    Failed(String),
    /// Indices of the blocks that differ.
    Differ(Vec<u64>),
}

/// Ends an `awaiting_answer` however the wait ends.
struct Answered<'a>(&'a Session);

impl Drop for Answered<'_> {
    fn drop(&mut self) {
        self.0.answered();
    }
}

fn refused(message: String) -> VerbError {
    crate::core::state::Refusal { message }.into()
}

impl Replica {
    pub(super) fn verify_status(&self) -> Option<VerifyStatus> {
        lock(&self.verify).status.clone()
    }

    /// `verify`: starts an online verify in the background. Refused unless
    /// connected and in sync with both disks UpToDate, or while one runs.
    pub fn verify(self: &Arc<Self>) -> Result<String, VerbError> {
        self.location()?;
        {
            let inner = lock(&self.inner);
            let node = inner.node.as_ref().ok_or_else(|| self.down_error(&inner))?;
            let ok = node.conn() == ConnState::Connected
                && node.repl() == ReplState::Established
                && node.disk() == DiskState::UpToDate
                && node.peer().map(|p| p.1) == Some(DiskState::UpToDate);
            if !ok {
                return Err(refused(format!(
                    "verify refused: {} is {} / {} with disk {} (peer {}); verify needs a connected pair in sync, both UpToDate",
                    self.name,
                    node.conn(),
                    node.repl(),
                    node.disk(),
                    node.peer().map_or("unknown".to_string(), |p| p.1.to_string()),
                )));
            }
        }
        let Some(session) = self.current_session() else {
            return Err(refused(format!(
                "verify refused: {} has no connection to its peer",
                self.name
            )));
        };
        let mut ctl = lock(&self.verify);
        if ctl
            .status
            .as_ref()
            .is_some_and(|s| s.state == VerifyState::Running)
        {
            return Err(refused(format!(
                "verify refused: a verify of {} is already running (stop it with `verify --stop`)",
                self.name
            )));
        }
        if let Some(t) = ctl.thread.take() {
            // The last one has ended (its status says so); reap it.
            drop(ctl);
            let _ = t.join();
            ctl = lock(&self.verify);
        }
        let size = self.size();
        let stop = Arc::new(AtomicBool::new(false));
        ctl.stop = Some(stop.clone());
        ctl.status = Some(VerifyStatus {
            state: VerifyState::Running,
            done_bytes: 0,
            total_bytes: size,
            out_of_sync_blocks: 0,
            out_of_sync_bytes: 0,
            skipped_blocks: 0,
            elapsed_ms: 0,
            message: None,
        });
        let me = self.clone();
        let t = std::thread::Builder::new()
            .name(format!("verify-{}", self.name))
            .spawn(move || me.run_verify(&session, &stop))
            .map_err(|e| refused(format!("cannot start the verify: {e}")))?;
        ctl.thread = Some(t);
        drop(ctl);
        tracing::info!(resource = %self.name, bytes = size, "online verify started");
        self.emit_verify();
        Ok(format!(
            "{}: online verify of {size} bytes started (see `status`)",
            self.name
        ))
    }

    /// `verify --stop`.
    pub fn verify_stop(&self) -> Result<String, VerbError> {
        self.location()?;
        let (stop, thread) = {
            let mut ctl = lock(&self.verify);
            let running = ctl
                .status
                .as_ref()
                .is_some_and(|s| s.state == VerifyState::Running);
            if !running {
                return Err(refused(format!("no verify of {} is running", self.name)));
            }
            (ctl.stop.clone(), ctl.thread.take())
        };
        if let Some(s) = stop {
            s.store(true, Ordering::SeqCst);
        }
        self.verify_cv.notify_all();
        if let Some(t) = thread {
            let _ = t.join();
        }
        let st = self.verify_status();
        Ok(match st {
            Some(s) => format!(
                "{}: verify stopped after {} of {} bytes; {} blocks out of sync",
                self.name, s.done_bytes, s.total_bytes, s.out_of_sync_blocks
            ),
            None => format!("{}: verify stopped", self.name),
        })
    }

    fn emit_verify(&self) {
        self.events.emit(event_json("verify", &self.status()));
    }

    fn run_verify(&self, session: &Arc<Session>, stop: &AtomicBool) {
        let started = Instant::now();
        let size = self.size();
        let block = lock(&self.oos).granularity();
        let mut offset = 0u64;
        let mut retries = 0u32;
        let end = loop {
            if offset >= size {
                break (VerifyState::Done, None);
            }
            if stop.load(Ordering::SeqCst) {
                break (
                    VerifyState::Stopped,
                    Some("stopped by the operator".to_string()),
                );
            }
            if !session.is_alive() || self.stopping.load(Ordering::SeqCst) {
                break (
                    VerifyState::Stopped,
                    Some(format!(
                        "the connection ended: {}",
                        session.reason().unwrap_or_else(|| "shutting down".into())
                    )),
                );
            }
            if self.repl_state() != ReplState::Established {
                break (
                    VerifyState::Stopped,
                    Some("the pair is no longer in sync (resync or disconnect)".into()),
                );
            }
            let length = CHUNK.min(size - offset).min(u64::from(MAX_VERIFY_LEN));
            match self.verify_chunk(session, stop, offset, length, block) {
                Ok(Outcome::Busy) => {
                    retries += 1;
                    if retries < BUSY_RETRIES {
                        std::thread::sleep(BUSY_PAUSE);
                        continue;
                    }
                    let blocks = length.div_ceil(block);
                    tracing::warn!(resource = %self.name, offset, length, "verify: range busy with writes, skipped");
                    self.verify_progress(|s| s.skipped_blocks += blocks);
                }
                Ok(Outcome::Differ(blocks)) => {
                    self.found_differences(session, offset, length, block, &blocks)
                }
                Ok(Outcome::Failed(why)) => break (VerifyState::Failed, Some(why)),
                Err(why) => break (VerifyState::Stopped, Some(why)),
            }
            retries = 0;
            offset += length;
            let elapsed = started.elapsed().as_millis() as u64;
            self.verify_progress(|s| {
                s.done_bytes = offset;
                s.elapsed_ms = elapsed;
            });
        };
        // The differences on disk before the verify reports its end: a
        // crash after it must not forget them (no activity log covers
        // marks set outside writes). The peer writes its own (`on_out_of_sync`).
        let found = self
            .verify_status()
            .is_some_and(|s| s.out_of_sync_blocks > 0);
        if found && !self.persist_bitmap() {
            self.write_bitmap_soon();
        }
        let elapsed = started.elapsed().as_millis() as u64;
        self.verify_progress(|s| {
            s.state = end.0;
            s.message = end.1.clone();
            s.elapsed_ms = elapsed;
        });
        if let Some(s) = self.verify_status() {
            let rate = s.done_bytes as f64 / (elapsed.max(1) as f64 / 1000.0) / (1 << 20) as f64;
            let how = match s.state {
                VerifyState::Done => "done".to_string(),
                other => format!(
                    "{} ({})",
                    serde_json::to_value(other)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    s.message.clone().unwrap_or_default()
                ),
            };
            if s.out_of_sync_blocks > 0 {
                tracing::warn!(
                    resource = %self.name,
                    "online verify {how}: {} of {} bytes compared in {elapsed} ms ({rate:.0} MiB/s); found {} blocks ({} bytes) out of sync, marked on both nodes; disconnect and connect to resync them",
                    s.done_bytes, s.total_bytes, s.out_of_sync_blocks, s.out_of_sync_bytes
                );
            } else {
                tracing::info!(
                    resource = %self.name,
                    "online verify {how}: {} of {} bytes compared in {elapsed} ms ({rate:.0} MiB/s); no differences ({} blocks skipped)",
                    s.done_bytes, s.total_bytes, s.skipped_blocks
                );
            }
        }
        self.emit_verify();
    }

    fn repl_state(&self) -> ReplState {
        lock(&self.inner)
            .node
            .as_ref()
            .map_or(ReplState::Off, |n| n.repl())
    }

    fn verify_progress(&self, f: impl FnOnce(&mut VerifyStatus)) {
        if let Some(s) = lock(&self.verify).status.as_mut() {
            f(s);
        }
    }

    /// One request: lock the chunk, ask, wait for the compared reply.
    fn verify_chunk(
        &self,
        session: &Arc<Session>,
        stop: &AtomicBool,
        offset: u64,
        length: u64,
        block: u64,
    ) -> Result<Outcome, String> {
        let _range = self.intervals.lock(offset, length);
        let id = {
            let mut ctl = lock(&self.verify);
            ctl.next_id += 1;
            let id = ctl.next_id;
            ctl.pending = Some(Pending {
                id,
                offset,
                length,
                block,
                outcome: None,
            });
            id
        };
        // On the Primary the receiver reads the link only while something
        // awaits an answer.
        session.awaiting_answer();
        let _answered = Answered(session);
        session.send_control(&Frame::VerifyRequest {
            id,
            offset,
            length: length as u32,
            block: block as u32,
        });
        let deadline = Instant::now() + self.ack_timeout();
        let mut ctl = lock(&self.verify);
        loop {
            if let Some(p) = ctl.pending.as_mut() {
                if p.id == id {
                    if let Some(o) = p.outcome.take() {
                        ctl.pending = None;
                        return Ok(o);
                    }
                }
            }
            let gone = !session.is_alive() || stop.load(Ordering::SeqCst);
            let late = Instant::now() >= deadline;
            if gone || late {
                ctl.pending = None;
                drop(ctl);
                if late && session.is_alive() {
                    session.fail("the peer did not answer a verify request in time");
                }
                return Err(if stop.load(Ordering::SeqCst) {
                    "stopped by the operator".into()
                } else {
                    format!(
                        "the connection ended: {}",
                        session.reason().unwrap_or_else(|| "no answer".into())
                    )
                });
            }
            ctl = self
                .verify_cv
                .wait_timeout(ctl, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Marks the differing `blocks` of a chunk here and on the peer.
    fn found_differences(
        &self,
        session: &Session,
        offset: u64,
        length: u64,
        block: u64,
        blocks: &[u64],
    ) {
        if blocks.is_empty() {
            return;
        }
        let mut bytes = 0;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &b in blocks {
            let at = offset + b * block;
            let len = block.min(offset + length - at);
            bytes += len;
            match runs.last_mut() {
                Some((o, l)) if *o + *l == at => *l += len,
                _ => runs.push((at, len)),
            }
        }
        for &(o, l) in &runs {
            self.mark_out_of_sync(o, l);
            session.send_control(&Frame::OutOfSync {
                offset: o,
                length: l,
            });
            tracing::warn!(resource = %self.name, offset = o, length = l, "online verify: out of sync");
        }
        self.verify_progress(|s| {
            s.out_of_sync_blocks += blocks.len() as u64;
            s.out_of_sync_bytes += bytes;
        });
    }

    /// Reads `[offset, offset + length)` and digests its blocks.
    fn local_digests(
        &self,
        offset: u64,
        length: u64,
        block: u64,
    ) -> Result<Vec<[u8; checksum::DIGEST_LEN]>, String> {
        let store = self.current_store().map_err(|e| e.to_string())?;
        let mut buf = vec![0u8; length as usize];
        store
            .read_bulk(&mut buf, offset)
            .map_err(|e| format!("reading {length} bytes at {offset} for verify: {e}"))?;
        // Both nodes verify the device front to back: have the disk read
        // the next range meanwhile (`read_bulk` does no readahead).
        let next = offset.saturating_add(length);
        if next < store.size() {
            let _ = store.cache(next, length.min(store.size() - next));
        }
        Ok(checksum::block_digests(&buf, block as usize))
    }

    /// The peer's `VerifyRequest` (on the thread reading the link).
    pub(super) fn on_verify_request(
        &self,
        session: &Session,
        id: u64,
        offset: u64,
        length: u32,
        block: u32,
    ) {
        let reply = |status: u32, digests| {
            session.send_control(&Frame::VerifyReply {
                id,
                status,
                digests,
            })
        };
        // More requests follow at once: keep reading (on the Primary the
        // receiver would otherwise look again only at its next tick).
        session.keep_reading(Duration::from_millis(200));
        let length = u64::from(length);
        if offset.checked_add(length).is_none_or(|e| e > self.size()) {
            tracing::warn!(resource = %self.name, offset, length, "verify request past the end of the device");
            return reply(libc::EINVAL as u32, Vec::new());
        }
        // Never wait here: this thread completes the writes that hold
        // the lock.
        let Some(held) = self.intervals.try_acquire(offset, length) else {
            return reply(VERIFY_BUSY, Vec::new());
        };
        match self.local_digests(offset, length, u64::from(block)) {
            Ok(d) => reply(0, d),
            Err(e) => {
                tracing::error!(resource = %self.name, "{e}");
                reply(libc::EIO as u32, Vec::new());
            }
        }
        self.intervals.release(held);
    }

    /// The peer's `VerifyReply` (on the thread reading the link): compare
    /// with our own digests, taken now, and hand the result over.
    pub(super) fn on_verify_reply(
        &self,
        id: u64,
        status: u32,
        digests: &[[u8; checksum::DIGEST_LEN]],
    ) -> Result<(), LinkError> {
        let (offset, length, block) = {
            let ctl = lock(&self.verify);
            match ctl.pending.as_ref() {
                Some(p) if p.id == id && p.outcome.is_none() => (p.offset, p.length, p.block),
                // A reply to a request given up (verify stopped).
                _ => return Ok(()),
            }
        };
        let outcome = if status == VERIFY_BUSY {
            Outcome::Busy
        } else if status != 0 {
            Outcome::Failed(format!(
                "the peer could not read {length} bytes at {offset}: {}",
                io::Error::from_raw_os_error(status as i32)
            ))
        } else {
            match self.local_digests(offset, length, block) {
                Err(e) => Outcome::Failed(e),
                Ok(ours) => {
                    if ours.len() != digests.len() {
                        return Err(LinkError::Protocol(format!(
                            "verify reply with {} digests for {} blocks",
                            digests.len(),
                            ours.len()
                        )));
                    }
                    Outcome::Differ(
                        ours.iter()
                            .zip(digests)
                            .enumerate()
                            .filter(|(_, (a, b))| a != b)
                            .map(|(i, _)| i as u64)
                            .collect(),
                    )
                }
            }
        };
        if let Some(p) = lock(&self.verify).pending.as_mut() {
            if p.id == id {
                p.outcome = Some(outcome);
            }
        }
        self.verify_cv.notify_all();
        Ok(())
    }

    /// The peer's verify found `[offset, offset + length)` different.
    pub(super) fn on_out_of_sync(&self, offset: u64, length: u64) {
        let end = offset.saturating_add(length).min(self.size());
        if end > offset {
            self.mark_out_of_sync(offset, end - offset);
            self.write_bitmap_soon();
            tracing::warn!(resource = %self.name, offset, length, "the peer's online verify: out of sync");
        }
    }
}

impl Replica {
    /// `invalidate`: this node's data is discarded and fetched whole from
    /// the peer. Needs the connected peer UpToDate and this node
    /// Secondary; the link is re-established and the handshake makes
    /// this node a full sync target (`FULL_SYNC` persists until the sync
    /// completes, so a crash meanwhile does not shorten it).
    pub fn invalidate(&self) -> Result<String, VerbError> {
        self.location()?;
        let _t = lock(&self.transition);
        self.stop_verify_quietly();
        let fx = self.verb_step(Event::Invalidate)?;
        lock(&self.oos).set_all();
        self.effects(&fx);
        Ok(format!(
            "{}: local data invalidated; a full sync from the peer follows",
            self.name
        ))
    }

    /// `invalidate-remote`: asks the peer to invalidate its data (it
    /// becomes a full sync target of this node). Needs this node UpToDate
    /// and connected, the peer Secondary.
    pub fn invalidate_remote(&self) -> Result<String, VerbError> {
        self.location()?;
        {
            let inner = lock(&self.inner);
            let node = inner.node.as_ref().ok_or_else(|| self.down_error(&inner))?;
            let ok = node.conn() == ConnState::Connected
                && node.repl() == ReplState::Established
                && node.disk() == DiskState::UpToDate;
            if !ok {
                return Err(refused(format!(
                    "invalidate-remote refused: needs this node connected and UpToDate (connection {}, {}, disk {})",
                    node.conn(),
                    node.repl(),
                    node.disk()
                )));
            }
            if node.peer().is_some_and(|p| p.0 == Role::Primary) {
                return Err(refused(
                    "invalidate-remote refused: the peer is Primary (demote it first)".into(),
                ));
            }
        }
        let Some(s) = self.current_session() else {
            return Err(refused(
                "invalidate-remote refused: no connection to the peer".into(),
            ));
        };
        s.send_control(&Frame::Invalidate);
        s.activate();
        Ok(format!(
            "{}: asked the peer to invalidate its data; a full sync to it follows",
            self.name
        ))
    }

    /// The peer's `invalidate-remote` (on the thread reading the link):
    /// invalidate here, unless the state machine refuses (logged).
    pub(super) fn on_invalidate_request(&self) {
        tracing::warn!(resource = %self.name, "the peer asks this node to invalidate its data");
        self.stop_verify_quietly();
        match self.step(Event::Invalidate) {
            Ok(fx) => {
                lock(&self.oos).set_all();
                self.effects(&fx);
            }
            Err(e) => tracing::error!(resource = %self.name, "the peer's invalidate-remote: {e}"),
        }
    }

    /// Asks a running verify to stop, without waiting for it.
    fn stop_verify_quietly(&self) {
        if let Some(s) = lock(&self.verify).stop.as_ref() {
            s.store(true, Ordering::SeqCst);
        }
        self.verify_cv.notify_all();
    }
}
