//! The data path of one peer session, without I/O: what the Primary
//! sends and waits for, and what the Secondary acknowledges when.
//!
//! [`PrimaryPath`] numbers the sequenced frames (data frames and
//! barriers), pairs each one's local half (the write or flush on this
//! node) with its peer half (the `Ack`), keeps the transfer log of data
//! frames the peer applied but no acknowledged barrier made durable, and
//! says for every completed request whether its range must be marked out
//! of sync. [`SecondaryPath`] checks the numbering of what arrives,
//! batches the acknowledgements of plain writes and groups the durable
//! requests (FUA writes, barriers) behind one flush at a time.
//!
//! Both are per session and per direction: each node sends through its
//! own `PrimaryPath` (as Primary, or as a sync source that is
//! Secondary) and receives through its own `SecondaryPath`, kept across
//! role changes within the session; a new connection starts new ones
//! (sequence numbers start at 1 in each session and each direction,
//! `proto/PROTOCOL.md` §9.3). A `PrimaryPath` whose session ended stays
//! until its last request's local half completes. The
//! shells move the bytes and carry out what these say; every rule is a
//! unit test below and runs in the two-node simulator
//! (`core::sim`).

use std::collections::{BTreeSet, VecDeque};

use thiserror::Error;

/// What a sequenced frame asks of the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Write, Trim or WriteZeroes of `len` bytes at `offset`; `durable`
    /// when sent with FUA (acknowledged only once durable on the peer).
    Data {
        offset: u64,
        len: u64,
        durable: bool,
    },
    /// Acknowledged once every data frame sent before it is durable on
    /// the peer.
    Barrier,
}

impl Kind {
    /// A data frame sent without FUA.
    pub fn plain(offset: u64, len: u64) -> Kind {
        Kind::Data {
            offset,
            len,
            durable: false,
        }
    }
}

/// How the peer's half of a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Acknowledged with status 0.
    Done,
    /// The peer's storage failed with this errno value.
    Failed(u32),
    /// The session ended before the peer acknowledged it.
    Lost,
}

/// A request whose two halves are both known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion<T> {
    pub token: T,
    pub seq: u64,
    pub kind: Kind,
    /// The local half succeeded; this is the client's result.
    pub local_ok: bool,
    pub peer: Peer,
    /// The byte range `(offset, len)` to mark out of sync: a data frame
    /// whose local half failed or whose peer half failed or was lost.
    /// A peer failure alone does not fail the client's request.
    pub mark: Option<(u64, u64)>,
}

impl<T> Completion<T> {
    /// The result for the client: the local result.
    pub fn ok(&self) -> bool {
        self.local_ok
    }
}

/// What the end of a session leaves to do: see [`PrimaryPath::lost`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost<T> {
    /// Requests whose local half was already done: complete now (each
    /// data frame with its range to mark).
    pub completions: Vec<Completion<T>>,
    /// Data frames the peer applied that no acknowledged barrier made
    /// durable there: mark every range out of sync now.
    pub unstable: Vec<(u64, u64)>,
    /// Data frames lost whose local half is still running: mark every
    /// range out of sync now too, not only at their completion. A new
    /// session's resync may otherwise pass these blocks before the mark
    /// lands, and finish without them.
    pub running: Vec<(u64, u64)>,
}

/// A peer or caller broke the rules of the data path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DataPathError {
    #[error("ack for sequence number {0}, which is not in flight")]
    NotInFlight(u64),
    #[error("sequence number {got} where {expected} was due")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("sequence number {0} was applied, but it was not received or was applied already")]
    NotReceived(u64),
}

struct Entry<T> {
    token: Option<T>,
    kind: Kind,
    local: Option<bool>,
    peer: Option<Peer>,
}

/// The Primary's side of one session. `T` is the shell's token for a
/// request (its connection and cookie, say), handed back on completion.
///
/// Every operation is O(1) amortised, or O(log n) in the transfer log.
pub struct PrimaryPath<T> {
    next_seq: u64,
    /// The sequence number of `entries[0]`.
    base: u64,
    /// Requests not yet completed, by `seq - base`; completed ones are
    /// `None` until they reach the front.
    entries: VecDeque<Option<Entry<T>>>,
    pending: usize,
    awaiting_ack: usize,
    /// The transfer log: data frames acknowledged without FUA that no
    /// acknowledged barrier covers yet, `(seq, offset, len)` in order of
    /// `seq` (24 bytes each, no allocation per entry).
    unstable: VecDeque<(u64, u64, u64)>,
    /// The highest barrier the peer acknowledged with status 0: every
    /// data frame sent before it is durable on the peer.
    stable_below: u64,
    lost: bool,
}

impl<T> Default for PrimaryPath<T> {
    fn default() -> Self {
        PrimaryPath::new()
    }
}

impl<T> PrimaryPath<T> {
    pub fn new() -> PrimaryPath<T> {
        PrimaryPath {
            next_seq: 1,
            base: 1,
            entries: VecDeque::new(),
            pending: 0,
            awaiting_ack: 0,
            unstable: VecDeque::new(),
            stable_below: 0,
            lost: false,
        }
    }

    fn push(&mut self, token: T, kind: Kind) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        let peer = if self.lost {
            Some(Peer::Lost)
        } else {
            self.awaiting_ack += 1;
            None
        };
        self.entries.push_back(Some(Entry {
            token: Some(token),
            kind,
            local: None,
            peer,
        }));
        self.pending += 1;
        seq
    }

    /// A data frame (write, trim, write-zeroes) of `len` bytes at
    /// `offset`, sent with FUA when `durable`: returns its sequence
    /// number (1, 2, ... in each session, in the order called: call
    /// this under the lock that orders the frames on the wire). After
    /// [`lost`](Self::lost) the request's peer half is lost at once.
    pub fn submit(&mut self, token: T, offset: u64, len: u64, durable: bool) -> u64 {
        self.push(
            token,
            Kind::Data {
                offset,
                len,
                durable,
            },
        )
    }

    /// A barrier: returns its sequence number. For a client FLUSH its
    /// local half is the local flush; a barrier with nothing to do
    /// locally (the resync's, the keepalive's) reports its local half
    /// done at once.
    pub fn barrier(&mut self, token: T) -> u64 {
        self.push(token, Kind::Barrier)
    }

    fn entry(&mut self, seq: u64) -> Option<&mut Entry<T>> {
        let i = usize::try_from(seq.checked_sub(self.base)?).ok()?;
        self.entries.get_mut(i)?.as_mut()
    }

    /// The local half of `seq` finished. `None` until the peer's half is
    /// known too, and for an unknown or already finished `seq`.
    pub fn local_done(&mut self, seq: u64, ok: bool) -> Option<Completion<T>> {
        let e = self.entry(seq)?;
        if e.local.is_some() {
            return None;
        }
        e.local = Some(ok);
        if e.peer.is_some() {
            self.complete(seq)
        } else {
            None
        }
    }

    /// The peer acknowledged `seq` with `status` (0: done, else errno).
    /// An error if `seq` is not awaiting its Ack (a protocol error: end
    /// the session). A plain data frame applied by the peer joins the
    /// transfer log unless a barrier acknowledged earlier covers it (a
    /// barrier's Ack may overtake the Acks of earlier plain writes); a
    /// barrier done on the peer empties the log up to itself.
    pub fn ack(&mut self, seq: u64, status: u32) -> Result<Option<Completion<T>>, DataPathError> {
        let stable_below = self.stable_below;
        let e = self
            .entry(seq)
            .filter(|e| e.peer.is_none())
            .ok_or(DataPathError::NotInFlight(seq))?;
        e.peer = Some(if status == 0 {
            Peer::Done
        } else {
            Peer::Failed(status)
        });
        let (kind, local_known) = (e.kind, e.local.is_some());
        self.awaiting_ack -= 1;
        match (kind, status) {
            (
                Kind::Data {
                    offset,
                    len,
                    durable: false,
                },
                0,
            ) if seq > stable_below => {
                // Acks come in order but for the few a concurrent apply
                // reorders: those are inserted in their place.
                match self.unstable.back() {
                    Some(&(last, _, _)) if last > seq => {
                        let at = self.unstable.partition_point(|&(s, _, _)| s < seq);
                        self.unstable.insert(at, (seq, offset, len));
                    }
                    _ => self.unstable.push_back((seq, offset, len)),
                }
            }
            (Kind::Barrier, 0) => {
                self.stable_below = self.stable_below.max(seq);
                while self.unstable.front().is_some_and(|&(s, _, _)| s < seq) {
                    self.unstable.pop_front();
                }
            }
            _ => {}
        }
        Ok(if local_known {
            self.complete(seq)
        } else {
            None
        })
    }

    fn complete(&mut self, seq: u64) -> Option<Completion<T>> {
        let i = usize::try_from(seq - self.base).ok()?;
        let mut e = self.entries.get_mut(i)?.take()?;
        self.pending -= 1;
        while let Some(None) = self.entries.front() {
            self.entries.pop_front();
            self.base += 1;
        }
        let local_ok = e.local.unwrap_or(false);
        let peer = e.peer.unwrap_or(Peer::Lost);
        let mark = match e.kind {
            Kind::Data { offset, len, .. } if !local_ok || peer != Peer::Done => {
                Some((offset, len))
            }
            Kind::Data { .. } | Kind::Barrier => None,
        };
        Some(Completion {
            token: e.token.take()?,
            seq,
            kind: e.kind,
            local_ok,
            peer,
            mark,
        })
    }

    /// The session ended. Every request still awaiting its Ack counts as
    /// lost: those whose local half is done complete now; the others
    /// complete at their [`local_done`](Self::local_done) (still with
    /// their range to mark). Returns the completions, the transfer log's
    /// ranges (the peer's page cache may lose them) and the ranges of
    /// the lost data frames still running locally: mark both sets out of
    /// sync before the node can meet the peer again. No Ack is accepted
    /// afterwards.
    pub fn lost(&mut self) -> Lost<T> {
        self.lost = true;
        let mut done = Vec::new();
        let mut running = Vec::new();
        for i in 0..self.entries.len() {
            if let Some(e) = self.entries[i].as_mut() {
                if e.peer.is_none() {
                    e.peer = Some(Peer::Lost);
                    self.awaiting_ack -= 1;
                    if e.local.is_some() {
                        done.push(self.base + i as u64);
                    } else if let Kind::Data { offset, len, .. } = e.kind {
                        running.push((offset, len));
                    }
                }
            }
        }
        let mut completions = Vec::with_capacity(done.len());
        for seq in done {
            completions.extend(self.complete(seq));
        }
        let unstable = std::mem::take(&mut self.unstable)
            .into_iter()
            .map(|(_, offset, len)| (offset, len))
            .collect();
        Lost {
            completions,
            unstable,
            running,
        }
    }

    /// Whether [`lost`](Self::lost) was called.
    /// Whether `seq` is still waiting for a half.
    pub fn is_pending(&self, seq: u64) -> bool {
        seq.checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.entries.get(i))
            .is_some_and(|e| e.is_some())
    }

    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// Data frames in the transfer log.
    pub fn unstable_len(&self) -> usize {
        self.unstable.len()
    }

    /// Requests submitted and not completed.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Requests whose Ack has not arrived (and the session is not lost).
    pub fn awaiting_ack(&self) -> usize {
        self.awaiting_ack
    }

    /// The sequence number the next request gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
}

/// The flush [`SecondaryPath::start_flush`] asked for; hand it back to
/// [`SecondaryPath::flush_done`].
#[derive(Debug, PartialEq, Eq)]
#[must_use]
pub struct FlushTicket(u64);

/// Acknowledgements the Secondary sends at once, rather than when its
/// input is drained. Its read buffer holds about eight 4 KiB frames, and
/// at depth it was seldom drained: acks went out about every 22 writes,
/// and the two nodes took turns (a quarter of the two CPUs idle at 4 KiB
/// QD32).
pub const ACK_BATCH: usize = 8;

/// The Secondary's side of one session.
///
/// Frames are received in sequence; each data frame is applied and then
/// reported with [`applied`](Self::applied) (a barrier is "applied" at
/// once). Plain writes, and every failure, are acknowledged in batches
/// ([`take_acks`](Self::take_acks), when the shell's input is drained or
/// [`acks_due`](Self::acks_due)).
/// Durable requests (FUA writes, barriers) are acknowledged after a flush
/// that started once they and every request received before them were
/// applied: one flush at a time covers all such requests (group commit).
#[derive(Debug)]
pub struct SecondaryPath {
    expected: u64,
    /// Received, not yet applied.
    unapplied: BTreeSet<u64>,
    acks: Vec<(u64, u32)>,
    /// Durable requests applied, waiting for a flush to start.
    waiting: BTreeSet<u64>,
    /// The running flush: its ticket number and the requests it covers.
    flushing: Option<(u64, Vec<u64>)>,
    next_ticket: u64,
}

impl Default for SecondaryPath {
    fn default() -> Self {
        SecondaryPath::new()
    }
}

impl SecondaryPath {
    pub fn new() -> SecondaryPath {
        SecondaryPath {
            expected: 1,
            unapplied: BTreeSet::new(),
            acks: Vec::new(),
            waiting: BTreeSet::new(),
            flushing: None,
            next_ticket: 1,
        }
    }

    /// A sequenced frame arrived: its number must be the next one (a
    /// gap, repetition or reordering is a protocol error).
    pub fn receive(&mut self, seq: u64) -> Result<(), DataPathError> {
        if seq != self.expected {
            return Err(DataPathError::OutOfOrder {
                got: seq,
                expected: self.expected,
            });
        }
        self.expected += 1;
        self.unapplied.insert(seq);
        Ok(())
    }

    /// A received frame was applied with `status` (0 or an errno);
    /// `durable` for FUA writes and barriers.
    pub fn applied(&mut self, seq: u64, status: u32, durable: bool) -> Result<(), DataPathError> {
        if !self.unapplied.remove(&seq) {
            return Err(DataPathError::NotReceived(seq));
        }
        if status != 0 || !durable {
            self.acks.push((seq, status));
        } else {
            self.waiting.insert(seq);
        }
        Ok(())
    }

    /// The acknowledgements of plain writes and failures since the last
    /// call, in the order applied.
    pub fn take_acks(&mut self) -> Vec<(u64, u32)> {
        std::mem::take(&mut self.acks)
    }

    /// A flush to start now, when none is running and some durable
    /// request waits whose predecessors are all applied. It covers every
    /// such request.
    pub fn start_flush(&mut self) -> Option<FlushTicket> {
        if self.flushing.is_some() {
            return None;
        }
        let limit = self.unapplied.first().copied().unwrap_or(u64::MAX);
        let later = self.waiting.split_off(&limit);
        let batch = std::mem::replace(&mut self.waiting, later);
        if batch.is_empty() {
            return None;
        }
        let n = self.next_ticket;
        self.next_ticket += 1;
        self.flushing = Some((n, batch.into_iter().collect()));
        Some(FlushTicket(n))
    }

    /// The flush of `ticket` ended with `status`: the acknowledgements of
    /// the requests it covered (a ticket of another session: none).
    pub fn flush_done(&mut self, ticket: FlushTicket, status: u32) -> Vec<(u64, u32)> {
        match self.flushing.take() {
            Some((n, seqs)) if n == ticket.0 => seqs.into_iter().map(|s| (s, status)).collect(),
            other => {
                self.flushing = other;
                Vec::new()
            }
        }
    }

    /// Whether a flush is running.
    pub fn flushing(&self) -> bool {
        self.flushing.is_some()
    }

    /// Durable requests applied and waiting for a flush to start.
    pub fn awaiting_flush(&self) -> usize {
        self.waiting.len()
    }

    /// Acknowledgements waiting for [`take_acks`](Self::take_acks).
    pub fn pending_acks(&self) -> usize {
        self.acks.len()
    }

    /// Whether the waiting acknowledgements make a batch to send now,
    /// though more frames are waiting to be applied: the Primary then
    /// completes these writes (and its clients send the next ones) while
    /// the rest are applied, rather than after a whole read buffer's worth.
    pub fn acks_due(&self) -> bool {
        self.acks.len() >= ACK_BATCH
    }

    /// Frames received and not yet applied.
    pub fn unapplied(&self) -> usize {
        self.unapplied.len()
    }

    /// The sequence number the next frame must carry.
    pub fn expected(&self) -> u64 {
        self.expected
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn marks<T>(c: &Option<Completion<T>>) -> Option<(u64, u64)> {
        c.as_ref().expect("completed").mark
    }

    // ---- Primary ------------------------------------------------------

    #[test]
    fn sequence_numbers_start_at_one_and_follow_calls() {
        let mut p = PrimaryPath::new();
        assert_eq!(p.submit('a', 0, 4096, false), 1);
        assert_eq!(p.barrier('b'), 2);
        assert_eq!(p.submit('c', 0, 4096, true), 3);
        assert_eq!(p.next_seq(), 4);
        assert_eq!((p.pending(), p.awaiting_ack()), (3, 3));
    }

    #[test]
    fn completion_needs_both_halves_in_either_order() {
        let mut p = PrimaryPath::new();
        let s1 = p.submit("one", 0, 512, false);
        let s2 = p.submit("two", 4096, 512, false);
        assert_eq!(p.local_done(s1, true), None);
        let c = p.ack(s1, 0).unwrap().expect("both known");
        assert_eq!(
            (c.token, c.seq, c.peer, c.mark),
            ("one", 1, Peer::Done, None)
        );
        assert!(c.ok());
        assert_eq!(p.ack(s2, 0).unwrap(), None);
        let c = p.local_done(s2, true).expect("both known");
        assert_eq!(c.token, "two");
        assert_eq!((p.pending(), p.awaiting_ack()), (0, 0));
        // Repeats are ignored or refused.
        assert_eq!(p.local_done(s2, true), None);
        assert_eq!(p.ack(s2, 0), Err(DataPathError::NotInFlight(2)));
    }

    #[test]
    fn ack_for_a_seq_not_in_flight_is_an_error() {
        let mut p = PrimaryPath::<()>::new();
        assert_eq!(p.ack(1, 0), Err(DataPathError::NotInFlight(1)));
        let s = p.submit((), 0, 1, false);
        assert_eq!(p.ack(s + 1, 0), Err(DataPathError::NotInFlight(2)));
        assert_eq!(p.ack(0, 0), Err(DataPathError::NotInFlight(0)));
        p.ack(s, 0).unwrap();
        assert_eq!(p.ack(s, 0), Err(DataPathError::NotInFlight(1)));
    }

    #[test]
    fn peer_failure_marks_but_does_not_fail_the_client() {
        let mut p = PrimaryPath::new();
        let s = p.submit((), 8192, 100, false);
        p.local_done(s, true);
        let c = p.ack(s, 5).unwrap();
        assert_eq!(marks(&c), Some((8192, 100)));
        let c = c.unwrap();
        assert_eq!(c.peer, Peer::Failed(5));
        assert!(c.ok());
        // A failed write is not in the transfer log.
        assert_eq!(p.unstable_len(), 0);
    }

    #[test]
    fn local_failure_marks_and_fails_the_client() {
        let mut p = PrimaryPath::new();
        let s = p.submit((), 0, 4096, false);
        p.ack(s, 0).unwrap();
        let c = p.local_done(s, false).expect("completed");
        assert!(!c.ok());
        assert_eq!(c.mark, Some((0, 4096)));
    }

    #[test]
    fn plain_acked_writes_stay_unstable_until_a_later_barrier_is_acked() {
        let mut p = PrimaryPath::new();
        let w1 = p.submit(1, 0, 4096, false);
        let fua = p.submit(2, 4096, 4096, true);
        let b = p.barrier(3);
        let w4 = p.submit(4, 8192, 4096, false);
        for s in [w1, fua, b, w4] {
            p.local_done(s, true);
        }
        p.ack(w1, 0).unwrap();
        p.ack(fua, 0).unwrap();
        p.ack(w4, 0).unwrap();
        // The FUA write is durable already: only the plain ones wait.
        assert_eq!(p.unstable_len(), 2);
        let c = p.ack(b, 0).unwrap().expect("barrier completes");
        assert_eq!((c.kind, c.mark), (Kind::Barrier, None));
        // The barrier covers w1, not w4 (sent after it).
        assert_eq!(p.unstable_len(), 1);
        assert_eq!(p.lost().unstable, vec![(8192, 4096)]);
    }

    #[test]
    fn acks_out_of_order_keep_the_transfer_log_in_sequence_order() {
        let mut p = PrimaryPath::new();
        let w: Vec<u64> = (0..4).map(|i| p.submit(i, i * 4096, 4096, false)).collect();
        let b = p.barrier(9);
        let w5 = p.submit(5, 5 * 4096, 4096, false);
        for &s in w.iter().chain([&b, &w5]) {
            p.local_done(s, true);
        }
        for s in [w[0], w[2], w5, w[3], w[1]] {
            p.ack(s, 0).unwrap();
        }
        assert_eq!(p.unstable_len(), 5);
        // The barrier covers the four writes before it, whatever order
        // their Acks came in, and not the one after it.
        p.ack(b, 0).unwrap();
        assert_eq!(p.lost().unstable, vec![(5 * 4096, 4096)]);
    }

    #[test]
    fn a_failed_barrier_covers_nothing() {
        let mut p = PrimaryPath::new();
        let w = p.submit((), 0, 4096, false);
        let b = p.barrier(());
        p.ack(w, 0).unwrap();
        p.local_done(b, true);
        let c = p.ack(b, 5).unwrap().unwrap();
        assert_eq!((c.peer, c.mark, c.ok()), (Peer::Failed(5), None, true));
        assert_eq!(p.unstable_len(), 1);
    }

    #[test]
    fn a_plain_ack_overtaken_by_a_later_barrier_ack_is_stable() {
        // The Secondary's flusher may acknowledge a barrier before its
        // receiver sent the batched Ack of an earlier plain write.
        let mut p = PrimaryPath::new();
        let w = p.submit((), 0, 4096, false);
        let b = p.barrier(());
        p.ack(b, 0).unwrap();
        p.ack(w, 0).unwrap();
        assert_eq!(p.unstable_len(), 0);
        // A write sent after the barrier is not covered.
        let w2 = p.submit((), 0, 4096, false);
        p.ack(w2, 0).unwrap();
        assert_eq!(p.unstable_len(), 1);
    }

    #[test]
    fn lost_completes_what_is_locally_done_and_the_rest_later() {
        let mut p = PrimaryPath::new();
        let done = p.submit("acked", 0, 10, false);
        let local = p.submit("local-done", 100, 10, false);
        let running = p.submit("local-running", 200, 10, true);
        let flush = p.barrier("flush");
        p.local_done(done, true);
        p.ack(done, 0).unwrap();
        p.local_done(local, true);
        p.local_done(flush, true);
        let lost = p.lost();
        assert!(p.is_lost());
        assert_eq!(lost.unstable, vec![(0, 10)]);
        let got: Vec<_> = lost
            .completions
            .iter()
            .map(|c| (c.token, c.peer, c.mark, c.ok()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("local-done", Peer::Lost, Some((100, 10)), true),
                ("flush", Peer::Lost, None, true),
            ]
        );
        assert_eq!(lost.running, vec![(200, 10)]);
        assert_eq!(p.awaiting_ack(), 0);
        assert_eq!(p.ack(running, 0), Err(DataPathError::NotInFlight(running)));
        let c = p
            .local_done(running, true)
            .expect("completes on its local half");
        assert_eq!((c.peer, c.mark), (Peer::Lost, Some((200, 10))));
        // Submitted after the end: lost at once.
        let late = p.submit("late", 300, 10, false);
        assert_eq!(p.awaiting_ack(), 0);
        let c = p.local_done(late, true).unwrap();
        assert_eq!(c.mark, Some((300, 10)));
        assert_eq!(p.pending(), 0);
        assert_eq!(p.lost().unstable, vec![]);
    }

    #[test]
    fn entries_are_reclaimed_from_the_front() {
        let mut p = PrimaryPath::new();
        let mut seqs = Vec::new();
        for i in 0..1000u64 {
            seqs.push(p.submit(i, i * 4096, 4096, false));
        }
        // Out of order: the tail first, then the head.
        for &s in seqs.iter().rev() {
            p.local_done(s, true);
            assert!(p.ack(s, 0).unwrap().is_some());
        }
        assert!(p.entries.is_empty());
        assert_eq!(p.base, 1001);
        let b = p.barrier(0);
        p.local_done(b, true);
        p.ack(b, 0).unwrap();
        assert_eq!(p.unstable_len(), 0);
    }

    // ---- Secondary ----------------------------------------------------

    #[test]
    fn receive_checks_the_numbering() {
        let mut s = SecondaryPath::new();
        assert_eq!(
            s.receive(2),
            Err(DataPathError::OutOfOrder {
                got: 2,
                expected: 1
            })
        );
        s.receive(1).unwrap();
        assert_eq!(
            s.receive(1),
            Err(DataPathError::OutOfOrder {
                got: 1,
                expected: 2
            })
        );
        s.receive(2).unwrap();
        assert_eq!(s.expected(), 3);
        assert_eq!(s.applied(3, 0, false), Err(DataPathError::NotReceived(3)));
        s.applied(1, 0, false).unwrap();
        assert_eq!(s.applied(1, 0, false), Err(DataPathError::NotReceived(1)));
    }

    #[test]
    fn plain_writes_and_failures_are_acked_in_batches() {
        let mut s = SecondaryPath::new();
        for seq in 1..=3 {
            s.receive(seq).unwrap();
        }
        s.applied(1, 0, false).unwrap();
        s.applied(2, 5, true).unwrap(); // a failed FUA write: at once
        s.applied(3, 0, false).unwrap();
        assert_eq!(s.take_acks(), vec![(1, 0), (2, 5), (3, 0)]);
        assert!(s.take_acks().is_empty());
        assert!(s.start_flush().is_none());
    }

    #[test]
    fn a_batch_of_acks_is_due_before_the_input_is_drained() {
        let mut s = SecondaryPath::new();
        let n = ACK_BATCH as u64;
        for seq in 1..=n + 2 {
            s.receive(seq).unwrap();
        }
        s.applied(1, 0, true).unwrap(); // durable: waits for a flush
        for seq in 2..=n {
            s.applied(seq, 0, false).unwrap();
            assert!(!s.acks_due(), "{} acks", s.pending_acks());
        }
        s.applied(n + 1, 0, false).unwrap();
        assert!(s.acks_due());
        assert_eq!(s.take_acks().len(), ACK_BATCH);
        assert!(!s.acks_due());
        s.applied(n + 2, 0, false).unwrap();
        assert!(!s.acks_due());
    }

    #[test]
    fn one_flush_covers_every_durable_request_before_it() {
        let mut s = SecondaryPath::new();
        for seq in 1..=4 {
            s.receive(seq).unwrap();
        }
        s.applied(1, 0, true).unwrap();
        s.applied(2, 0, false).unwrap();
        s.applied(3, 0, true).unwrap();
        let t = s.start_flush().expect("a flush");
        assert!(s.flushing());
        assert!(s.start_flush().is_none(), "one flush at a time");
        // Applied while the flush runs: waits for the next one.
        s.applied(4, 0, true).unwrap();
        assert_eq!(s.awaiting_flush(), 1);
        assert_eq!(s.flush_done(t, 0), vec![(1, 0), (3, 0)]);
        let t = s.start_flush().expect("the next flush");
        assert_eq!(s.flush_done(t, 5), vec![(4, 5)]);
        assert_eq!(s.take_acks(), vec![(2, 0)]);
    }

    #[test]
    fn a_barrier_waits_for_every_earlier_frame_to_be_applied() {
        let mut s = SecondaryPath::new();
        for seq in 1..=3 {
            s.receive(seq).unwrap();
        }
        // Applied out of order (concurrent application): the barrier (3)
        // may not be flushed before 1 is applied.
        s.applied(2, 0, false).unwrap();
        s.applied(3, 0, true).unwrap();
        assert!(s.start_flush().is_none());
        assert_eq!(s.unapplied(), 1);
        s.applied(1, 0, false).unwrap();
        let t = s.start_flush().expect("now");
        assert_eq!(s.flush_done(t, 0), vec![(3, 0)]);
    }

    #[test]
    fn a_ticket_that_is_not_the_running_flush_acknowledges_nothing() {
        let mut s = SecondaryPath::new();
        s.receive(1).unwrap();
        s.applied(1, 0, true).unwrap();
        let t = s.start_flush().unwrap();
        assert!(s.flush_done(FlushTicket(99), 0).is_empty());
        assert!(s.flushing());
        assert_eq!(s.flush_done(t, 0), vec![(1, 0)]);
        assert!(!s.flushing());
    }
}
