//! The transmission phase: requests in, simple replies out, many in flight.
//!
//! A connection is served by a small pool of worker threads in a
//! leader/follower pattern: one worker at a time holds the read side and
//! reads requests. Small plain writes it submits itself and reads on (see
//! `Connection::worker`); for anything else it lets go of the read side,
//! executes the request against the store and writes the reply under the
//! write-side lock (a lone flush to a local store it serves holding the
//! read side, and a replicated store's lone write keeps it until the
//! client's next request comes while the write waits for the peer). So a
//! lone request is read, executed and answered by one
//! thread with no hand-off (lowest latency at queue depth 1), a stream of
//! small writes runs on one thread, and slow requests (reads, flushes, FUA,
//! large writes) execute up to `workers` at once, their replies going out
//! in completion order.
//!
//! Bad requests get an error reply and the connection carries on; only a
//! broken stream (bad magic, an oversized write payload, a short read) ends
//! it, and only this connection.

use crate::metrics::Op;
use crate::store::{Batch, Deferred, Modify};
use crate::sync::lock;
use std::io::{self, BufReader, Cursor, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use replblk_proto::nbd::{errno, Command, Request, SimpleReply};

use super::{Export, MAX_PAYLOAD};
use crate::net::Stream;

/// Read-side buffer: holds several small requests per syscall, but small
/// enough that reading a request header does not first copy a large write
/// payload through the buffer (payloads past it are read in place).
const READ_BUFFER: usize = 32 * 1024;

/// A worker keeps its request buffer across requests up to this size.
const KEEP_BUFFER: usize = 4 << 20;

/// Writes up to this size are run in a burst by the worker that read them
/// (see `worker`); a larger one is worth handing the read side on for, so
/// its local write and its send to the peer overlap with the next one's.
const BURST_MAX: u32 = 64 * 1024;

/// Replies up to this size may be combined with others into one send.
const COMBINE_MAX: usize = 64 * 1024;

#[derive(Default)]
struct Outgoing {
    queue: Vec<u8>,
    /// A thread is sending the queue; others only append to it.
    flushing: bool,
    /// A batch will send the queue when it ends (see `Replies::queue`).
    scheduled: bool,
}

/// Why a connection's transmission phase ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket (or the server shut it for shutdown).
    Eof,
    /// The stream could not be parsed any more, or a socket error.
    Error(String),
}

/// What a finished connection reports for its close log line.
#[derive(Debug, Clone)]
pub struct Summary {
    pub requests: u64,
    pub reason: CloseReason,
}

/// The sending side of a connection. Shared with the completions of
/// submitted writes, which may finish on another thread (the one that
/// read the peer's acknowledgement) and outlive the workers.
struct Replies {
    writer: Mutex<Stream>,
    /// Replies waiting to be sent, combined into one send.
    out: Mutex<Outgoing>,
    /// A clone used only to shut the socket, so that closing never waits
    /// for a lock that a blocked send holds.
    control: Stream,
    closing: AtomicBool,
    reason: Mutex<Option<CloseReason>>,
    /// Requests read and not yet answered.
    in_flight: AtomicUsize,
    /// Of those, flushes, FUA requests and writes larger than
    /// `BURST_MAX`: they wait for the disk or copy for a long time, and
    /// the next request behind a large write is itself most likely large
    /// (its payload takes longer to arrive than the poll lasts), so
    /// polling meanwhile only takes the CPU that completing them needs.
    slow: AtomicUsize,
    idle_lock: Mutex<()>,
    idle: Condvar,
    /// A thread waits in `wait_idle` (only then is `idle` signalled: a
    /// condvar's notify is a system call even with nobody waiting).
    idle_waiting: AtomicBool,
}

impl Replies {
    /// Records the first reason and stops further reads. For errors the
    /// socket is shut so blocked readers, blocked senders and the client
    /// see it at once.
    fn close(&self, reason: CloseReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason.clone());
        }
        drop(slot);
        self.closing.store(true, Ordering::SeqCst);
        if matches!(reason, CloseReason::Error(_)) {
            self.control.shutdown(Shutdown::Both);
        }
    }

    /// A request was answered (or will never be).
    fn finish_one(&self) {
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && self.idle_waiting.load(Ordering::SeqCst)
        {
            let _g = lock(&self.idle_lock);
            self.idle.notify_all();
        }
    }

    /// Waits until every request read has been answered, up to `limit`.
    fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut g = lock(&self.idle_lock);
        // Set before `in_flight` is read: a request finishing after that
        // read sees the flag and signals (under the lock, so not before
        // this thread waits).
        self.idle_waiting.store(true, Ordering::SeqCst);
        while self.in_flight.load(Ordering::SeqCst) > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            g = self
                .idle
                .wait_timeout(g, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// Sends a reply now. Small replies completed while another thread is
    /// sending are queued and go out together in that thread's next send,
    /// so at depth N the client gets a few large sends instead of N tiny
    /// ones; a lone reply is sent at once by its own worker.
    fn send(&self, bytes: &[u8]) {
        if bytes.len() > COMBINE_MAX {
            let sent = lock(&self.writer).write_all(bytes);
            if let Err(e) = sent {
                self.close(CloseReason::Error(format!("writing reply: {e}")));
            }
            return;
        }
        lock(&self.out).queue.extend_from_slice(bytes);
        self.drain();
    }

    /// Queues a small reply for the end of the caller's batch. Returns
    /// true when the caller must defer a `drain` (the queue was idle).
    fn queue(&self, bytes: &[u8]) -> bool {
        let mut out = lock(&self.out);
        out.queue.extend_from_slice(bytes);
        if out.flushing || out.scheduled {
            return false;
        }
        out.scheduled = true;
        true
    }

    /// Sends whatever is queued, unless another thread already is.
    fn drain(&self) {
        let mut batch = Vec::new();
        {
            let mut out = lock(&self.out);
            out.scheduled = false;
            if out.flushing || out.queue.is_empty() {
                return;
            }
            out.flushing = true;
        }
        loop {
            {
                let mut out = lock(&self.out);
                if out.queue.is_empty() {
                    out.flushing = false;
                    return;
                }
                batch.clear();
                std::mem::swap(&mut batch, &mut out.queue);
            }
            let sent = if self.closing.load(Ordering::SeqCst)
                && lock(&self.reason)
                    .as_ref()
                    .is_some_and(|r| matches!(r, CloseReason::Error(_)))
            {
                // The socket is shut: drop replies instead of failing on each.
                Ok(())
            } else {
                lock(&self.writer).write_all(&batch)
            };
            if let Err(e) = sent {
                {
                    let mut out = lock(&self.out);
                    out.flushing = false;
                    out.queue.clear();
                }
                self.close(CloseReason::Error(format!("writing reply: {e}")));
                return;
            }
        }
    }

    /// Completes a submitted modification: queues its reply for the end
    /// of `batch`, or of the burst this thread is running on this
    /// connection (see `Burst`).
    fn complete(self: &Arc<Self>, cookie: u64, result: io::Result<()>, batch: &mut Batch) {
        let error = match result {
            Ok(()) => 0,
            Err(e) => io_errno(e),
        };
        let header = SimpleReply { error, cookie }.to_bytes();
        if BURST.with(|b| b.get()) == Arc::as_ptr(self) {
            // The burst's end sends it, with the others it completes.
            lock(&self.out).queue.extend_from_slice(&header);
        } else if self.queue(&header) {
            batch.defer(self.clone());
        }
        self.finish_one();
    }
}

thread_local! {
    /// The connection whose burst of writes this thread is running:
    /// replies completed on this thread meanwhile are sent when the
    /// burst ends, in one send.
    static BURST: std::cell::Cell<*const Replies> = const { std::cell::Cell::new(std::ptr::null()) };
}

impl Deferred for Replies {
    fn run(&self) {
        self.drain();
    }
}

struct Connection<'a> {
    export: &'a Export,
    reader: Mutex<BufReader<Stream>>,
    replies: Arc<Replies>,
    requests: AtomicU64,
    /// The reading worker's poll for the next request before it sleeps
    /// in `recv` (it adapts to how long the client takes to send it).
    spin: crate::net::SpinWindow,
}

impl Connection<'_> {
    fn close(&self, reason: CloseReason) {
        self.replies.close(reason);
    }

    /// Reads the next request (and a write's payload into `payload`).
    /// `None` once the connection is closing.
    fn read_request(
        &self,
        reader: &mut BufReader<Stream>,
        payload: &mut Vec<u8>,
    ) -> Option<Request> {
        if self.replies.closing.load(Ordering::SeqCst) {
            return None;
        }
        // Poll only when at most the previous request is still being
        // served: that is the depth-1 case the poll is for (its reply goes
        // out while we poll for the next request), and no other worker
        // needs the CPU.
        let polled = (reader.buffer().is_empty()
            && self.replies.in_flight.load(Ordering::SeqCst) <= 1
            && self.replies.slow.load(Ordering::SeqCst) == 0)
            .then(|| self.spin.poll(&[reader.get_ref().as_raw_fd()]));
        let mut raw = [0u8; Request::LEN];
        let read = reader.read_exact(&mut raw);
        if let Some(since) = polled {
            self.spin.waited(since);
        }
        if let Err(e) = read {
            let reason = match e.kind() {
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => CloseReason::Eof,
                _ => CloseReason::Error(format!("reading request: {e}")),
            };
            self.close(reason);
            return None;
        }
        let request = match Request::decode(&mut Cursor::new(&raw[..])) {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.close(CloseReason::Error("short request header".into()));
                return None;
            }
            Err(e) => {
                self.close(CloseReason::Error(format!("bad request: {e}")));
                return None;
            }
        };
        match request.command {
            Command::Write => {
                if request.length > MAX_PAYLOAD {
                    // The payload cannot be skipped cheaply; the spec allows
                    // a hard disconnect for payloads past 32 MiB.
                    self.close(CloseReason::Error(format!(
                        "write payload of {} bytes exceeds the {MAX_PAYLOAD}-byte maximum",
                        request.length
                    )));
                    return None;
                }
                if let Err(e) = read_payload(&mut *reader, payload, request.length as usize) {
                    self.close(CloseReason::Error(format!(
                        "client disconnected in the middle of a {}-byte write payload: {e}",
                        request.length
                    )));
                    return None;
                }
            }
            Command::Disc => {
                self.close(CloseReason::Disconnect);
                return None;
            }
            _ => {}
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.replies.in_flight.fetch_add(1, Ordering::SeqCst);
        // Counted before the read side is released, so the next reader
        // sees it (see the poll above).
        if is_slow(&request) {
            self.replies.slow.fetch_add(1, Ordering::SeqCst);
        }
        Some(request)
    }

    /// Whether a modification `req` asks for is carried out (no flags it
    /// does not take, a writable export, in range), rather than answered
    /// with an error by `execute`.
    fn may_modify(&self, req: &Request) -> bool {
        req.unexpected_flags() == 0
            && !self.export.read_only
            && req
                .offset
                .checked_add(u64::from(req.length))
                .is_some_and(|end| end <= self.export.store.size())
    }

    /// The modification a valid WRITE, TRIM or WRITE_ZEROES without FUA
    /// asks for: these are submitted and answered on completion, which
    /// for a replicated resource comes with the peer's acknowledgement.
    fn modification<'b>(&self, req: &Request, buf: &'b [u8]) -> Option<Modify<'b>> {
        if req.fua() || !self.may_modify(req) {
            return None;
        }
        let (offset, len) = (req.offset, u64::from(req.length));
        match req.command {
            Command::Write => Some(Modify::Write {
                buf: &buf[..req.length as usize],
                offset,
            }),
            Command::Trim => Some(Modify::Trim { offset, len }),
            Command::WriteZeroes => Some(Modify::WriteZeroes {
                offset,
                len,
                may_unmap: !req.no_hole(),
            }),
            _ => None,
        }
    }

    /// Executes a request; on success a read's data is in `buf[16..]`.
    fn execute(&self, req: &Request, buf: &mut Vec<u8>) -> Result<(), u32> {
        if req.unexpected_flags() != 0 {
            return Err(errno::EINVAL);
        }
        let store = &self.export.store;
        let size = store.size();
        let end = req.offset.checked_add(u64::from(req.length));
        let in_range = matches!(end, Some(end) if end <= size);
        let writable = || {
            if self.export.read_only {
                Err(errno::EPERM)
            } else {
                Ok(())
            }
        };
        match req.command {
            Command::Read => {
                if req.length > MAX_PAYLOAD || !in_range {
                    return Err(errno::EINVAL);
                }
                buf.resize(SimpleReply::LEN + req.length as usize, 0);
                store
                    .read_at(&mut buf[SimpleReply::LEN..], req.offset)
                    .map_err(io_errno)
            }
            Command::Write => {
                writable()?;
                if !in_range {
                    return Err(errno::ENOSPC);
                }
                store
                    .write_at(&buf[..req.length as usize], req.offset, req.fua())
                    .map_err(io_errno)
            }
            Command::Flush => store.flush().map_err(io_errno),
            Command::Trim => {
                writable()?;
                if !in_range {
                    return Err(errno::EINVAL);
                }
                store
                    .trim(req.offset, u64::from(req.length))
                    .map_err(io_errno)?;
                self.fua_flush(req)
            }
            Command::WriteZeroes => {
                writable()?;
                if !in_range {
                    return Err(errno::ENOSPC);
                }
                store
                    .write_zeroes(req.offset, u64::from(req.length), !req.no_hole())
                    .map_err(io_errno)?;
                self.fua_flush(req)
            }
            Command::Cache => {
                if !in_range {
                    return Err(errno::EINVAL);
                }
                store
                    .cache(req.offset, u64::from(req.length))
                    .map_err(io_errno)
            }
            // DISC never reaches here (the reader handles it); unknown
            // commands are answered, not fatal.
            Command::Disc | Command::Other(_) => Err(errno::EINVAL),
        }
    }

    fn fua_flush(&self, req: &Request) -> Result<(), u32> {
        if req.fua() {
            self.export.store.flush().map_err(io_errno)
        } else {
            Ok(())
        }
    }

    fn reply(&self, req: &Request, result: Result<(), u32>, buf: &mut [u8]) {
        let header = SimpleReply {
            error: result.err().unwrap_or(0),
            cookie: req.cookie,
        }
        .to_bytes();
        let bytes: &[u8] = if result.is_ok() && req.command == Command::Read {
            buf[..SimpleReply::LEN].copy_from_slice(&header);
            &buf[..SimpleReply::LEN + req.length as usize]
        } else {
            &header
        };
        self.replies.send(bytes);
    }

    /// Submits a modification; `more` when further requests are already
    /// buffered (the store then does not wait for anything inline), `watch`
    /// when the caller reads the next request itself (the store waits
    /// inline only until the client's socket is readable).
    fn submit(&self, op: Modify<'_>, cookie: u64, more: bool, watch: Option<RawFd>) {
        let replies = self.replies.clone();
        let done: crate::store::Done = match self.export.metrics {
            None => Box::new(move |result, batch| replies.complete(cookie, result, batch)),
            Some(m) => {
                let (kind, bytes) = metric_op(&op);
                let start = Instant::now();
                Box::new(move |result, batch| {
                    m.record(kind, bytes, result.is_ok(), start.elapsed());
                    replies.complete(cookie, result, batch)
                })
            }
        };
        match (more, watch) {
            (true, _) => self.export.store.submit_more(op, done),
            (false, Some(fd)) => self.export.store.submit_watching(op, done, fd),
            (false, None) => self.export.store.submit(op, done),
        }
    }

    fn serve_one(&self, req: &Request, buf: &mut Vec<u8>) {
        if let Some(op) = self.modification(req, buf) {
            return self.submit(op, req.cookie, false, None);
        }
        let start = self.export.metrics.map(|m| (m, Instant::now()));
        let result = self.execute(req, buf);
        if let Some((m, start)) = start {
            let (kind, bytes) = match req.command {
                Command::Read => (Op::Read, u64::from(req.length)),
                Command::Write => (Op::Write, u64::from(req.length)),
                Command::Trim => (Op::Trim, u64::from(req.length)),
                Command::WriteZeroes => (Op::WriteZeroes, u64::from(req.length)),
                Command::Flush => (Op::Flush, 0),
                Command::Cache => (Op::Cache, u64::from(req.length)),
                Command::Disc | Command::Other(_) => (Op::Other, 0),
            };
            m.record(kind, bytes, result.is_ok(), start.elapsed());
        }
        if is_slow(req) {
            self.replies.slow.fetch_sub(1, Ordering::SeqCst);
        }
        if let Err(code) = result {
            tracing::debug!(
                command = ?req.command, offset = req.offset, length = req.length,
                flags = req.flags, error = code, "request failed"
            );
        }
        self.reply(req, result, buf);
        self.replies.finish_one();
    }

    fn worker(&self) {
        let mut buf = Vec::new();
        let store = &*self.export.store;
        loop {
            let mut reader = lock(&self.reader);
            let Some(mut req) = self.read_request(&mut reader, &mut buf) else {
                return;
            };
            // Small plain writes are submitted with the read side held: a
            // submit does not wait, so one worker runs them to completion
            // with no hand-off to another worker per request, also when
            // the read buffer runs dry between the client's sends (the
            // burst then ends: held-back frames and replies go out, and
            // the same worker blocks for the next request). So is a
            // replicated store's lone write (below). Anything else hands
            // the read side on and is carried out below.
            let mut burst = Burst {
                store,
                replies: &self.replies,
                running: false,
            };
            loop {
                if req.length > BURST_MAX {
                    break;
                }
                let Some(op) = self.modification(&req, &buf) else {
                    break;
                };
                let buffered = !reader.buffer().is_empty();
                // A lone request on a store whose `submit` may wait for
                // the network (reading its own acknowledgement) waits only
                // until the client sends its next request, and this worker
                // reads that one too: at depth 1 one thread reads the
                // request, sends it to the peer, writes it, reads the Ack,
                // replies and reads the next request, and no other worker
                // is woken to take the read side. A TLS stream may hold the
                // next request already decrypted, where its socket shows
                // nothing: there the request goes to `serve_one`.
                if !buffered
                    && store.submit_may_wait()
                    && self.replies.in_flight.load(Ordering::SeqCst) <= 1
                {
                    if reader.get_ref().has_buffered() {
                        break;
                    }
                    // Replies a burst held back go out first.
                    burst.end();
                    let fd = reader.get_ref().as_raw_fd();
                    self.submit(op, req.cookie, false, Some(fd));
                    match self.read_request(&mut reader, &mut buf) {
                        Some(next) => req = next,
                        None => return,
                    }
                    continue;
                }
                burst.start();
                self.submit(op, req.cookie, true, None);
                if !buffered {
                    // About to block for the next request.
                    burst.end();
                }
                match self.read_request(&mut reader, &mut buf) {
                    Some(next) => req = next,
                    None => return,
                }
            }
            drop(burst);
            // A lone flush (nothing else in flight or buffered: a client
            // that waits for each reply, as `fsync` after every write does)
            // on a store that waits for nothing but its disk is served
            // with the read side held: handing it on would wake another
            // worker on the way to the disk only for it to block in
            // `recv`, and the next request would find that worker asleep
            // rather than this one polling. A request sent meanwhile waits
            // for the flush. A replicated store's flush also waits for the
            // peer, for as long as the ack timeout: it hands on.
            if req.command == Command::Flush
                && reader.buffer().is_empty()
                && !store.submit_may_wait()
                && self.replies.in_flight.load(Ordering::SeqCst) <= 1
            {
                self.serve_one(&req, &mut buf);
                continue;
            }
            drop(reader);
            self.serve_one(&req, &mut buf);
            // Do not keep a 32 MiB buffer around after one large request,
            // but do keep one for the common sizes up to a few MiB (a 1 MiB
            // read needs 1 MiB plus the reply header).
            if buf.capacity() > KEEP_BUFFER {
                buf = Vec::new();
            }
        }
    }
}

/// The metrics kind and byte count of a submitted modification.
fn metric_op(op: &Modify<'_>) -> (Op, u64) {
    match op {
        Modify::Write { buf, .. } => (Op::Write, buf.len() as u64),
        Modify::Trim { len, .. } => (Op::Trim, *len),
        Modify::WriteZeroes { len, .. } => (Op::WriteZeroes, *len),
    }
}

/// Flushes and FUA requests wait for the disk; a write larger than a
/// burst copies for long (see `Replies::slow`).
fn is_slow(req: &Request) -> bool {
    req.command == Command::Flush
        || req.fua()
        || (req.command == Command::Write && req.length > BURST_MAX)
}

/// A burst of `submit_more` on one worker: while it runs, replies that
/// complete on this thread are queued; when it ends, however it ends,
/// the store sends what it held back and the replies go out together.
struct Burst<'a> {
    store: &'a dyn crate::store::Store,
    replies: &'a Arc<Replies>,
    running: bool,
}

impl Burst<'_> {
    fn start(&mut self) {
        if !self.running {
            self.running = true;
            BURST.with(|b| b.set(Arc::as_ptr(self.replies)));
        }
    }

    fn end(&mut self) {
        if self.running {
            self.running = false;
            BURST.with(|b| b.set(std::ptr::null()));
            self.store.kick();
            self.replies.drain();
        }
    }
}

impl Drop for Burst<'_> {
    fn drop(&mut self) {
        self.end();
    }
}

/// Maps a storage error to the NBD error values the spec allows.
pub fn io_errno(e: io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => errno::ENOSPC,
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => errno::EPERM,
        Some(libc::EINVAL) => errno::EINVAL,
        Some(libc::ENOMEM) => errno::ENOMEM,
        Some(libc::EOPNOTSUPP) => errno::ENOTSUP,
        _ => {
            tracing::error!("storage i/o error: {e}");
            errno::EIO
        }
    }
}

/// Serves requests on `stream` until the client disconnects, the stream
/// breaks, or the read side is shut down by the server. Returns once
/// every request read has been answered (or `drain` passed).
pub fn serve(
    stream: Stream,
    export: &Export,
    workers: usize,
    limits: Limits,
) -> io::Result<Summary> {
    let writer = stream.try_clone()?;
    // A client that stops reading its replies must not hold workers (or
    // a completing peer thread) in `send` for ever.
    writer.set_write_timeout(Some(limits.send_timeout))?;
    let control = stream.try_clone()?;
    let conn = Connection {
        export,
        spin: crate::net::SpinWindow::new(crate::net::POLL_MAX),
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, stream)),
        replies: Arc::new(Replies {
            writer: Mutex::new(writer),
            out: Mutex::new(Outgoing::default()),
            control,
            closing: AtomicBool::new(false),
            reason: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
            slow: AtomicUsize::new(0),
            idle_lock: Mutex::new(()),
            idle: Condvar::new(),
            idle_waiting: AtomicBool::new(false),
        }),
        requests: AtomicU64::new(0),
    };
    std::thread::scope(|scope| {
        for i in 1..workers.max(1) {
            let conn = &conn;
            let spawned = std::thread::Builder::new()
                .name(format!("nbd-worker-{i}"))
                .spawn_scoped(scope, move || conn.worker());
            if let Err(e) = spawned {
                // Fewer workers only means less parallelism.
                tracing::warn!("could not start a worker thread: {e}");
                break;
            }
        }
        conn.worker();
    });
    // Submitted writes complete when the peer answers (or the session
    // fails, at the latest after the ack timeout).
    if !conn.replies.wait_idle(limits.drain) {
        tracing::warn!(
            requests = conn.replies.in_flight.load(Ordering::SeqCst),
            "connection closed with requests still in flight"
        );
    }
    let reason = lock(&conn.replies.reason)
        .take()
        .unwrap_or(CloseReason::Eof);
    Ok(Summary {
        requests: conn.requests.load(Ordering::Relaxed),
        reason,
    })
}

/// Time limits of the transmission phase.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A reply that cannot be sent for this long ends the connection.
    pub send_timeout: Duration,
    /// How long a closing connection waits for its requests in flight.
    pub drain: Duration,
}

/// Bytes of a write payload read (and so allocated) at a time: a client
/// that announces a large write and stalls costs what it sent, not what
/// it announced.
const PAYLOAD_STEP: usize = 1 << 20;

/// Reads a `len`-byte payload into `buf[..len]`, growing `buf` as the
/// bytes arrive. What `buf` already holds is overwritten, not cleared
/// first: zero-filling a 1 MiB buffer per write costs as much as a
/// tenth of serving it.
fn read_payload(reader: &mut impl Read, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    let mut start = 0;
    while start < len {
        let end = (start + PAYLOAD_STEP).min(len);
        if buf.len() < end {
            buf.resize(end, 0);
        }
        reader.read_exact(&mut buf[start..end])?;
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_map_to_spec_values() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert_eq!(io_errno(e(libc::EDQUOT)), errno::ENOSPC);
        assert_eq!(io_errno(e(libc::EROFS)), errno::EPERM);
        assert_eq!(io_errno(e(libc::EIO)), errno::EIO);
        assert_eq!(
            io_errno(io::Error::from(io::ErrorKind::UnexpectedEof)),
            errno::EIO
        );
    }
}
