//! The transmission phase: requests in, simple replies out, many in flight.
//!
//! A connection is served by a small pool of worker threads in a
//! leader/follower pattern: one worker at a time holds the read side, reads
//! one request (and its payload), lets go, executes it against the store and
//! writes the reply under the write-side lock. So a lone request is read,
//! executed and answered by one thread with no hand-off (lowest latency at
//! queue depth 1), while at depth N up to `workers` requests execute at once
//! and their replies go out in completion order.
//!
//! Bad requests get an error reply and the connection carries on; only a
//! broken stream (bad magic, an oversized write payload, a short read) ends
//! it, and only this connection.

use crate::sync::lock;
use std::io::{self, BufReader, Cursor, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use replblk_proto::nbd::{errno, Command, Request, SimpleReply};

use super::{Export, MAX_PAYLOAD};
use crate::net::Stream;

/// Read-side buffer: holds several small requests per syscall, but small
/// enough that reading a request header does not first copy a large write
/// payload through the buffer (payloads past it are read in place).
const READ_BUFFER: usize = 32 * 1024;

/// How long the reading worker polls for the next request before it
/// sleeps in `recv` (see `net::spin_until_readable`).
const SPIN: Duration = Duration::from_micros(40);

/// A worker keeps its request buffer across requests up to this size.
const KEEP_BUFFER: usize = 4 << 20;

/// Replies up to this size may be combined with others into one send.
const COMBINE_MAX: usize = 64 * 1024;

#[derive(Default)]
struct Outgoing {
    queue: Vec<u8>,
    /// A worker is sending the queue; others only append to it.
    flushing: bool,
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

struct Connection<'a> {
    export: &'a Export,
    reader: Mutex<BufReader<Stream>>,
    writer: Mutex<Stream>,
    /// Small replies waiting to be sent, combined into one send.
    out: Mutex<Outgoing>,
    closing: AtomicBool,
    reason: Mutex<Option<CloseReason>>,
    requests: AtomicU64,
    /// Requests read and not yet answered.
    in_flight: AtomicUsize,
}

impl Connection<'_> {
    /// Records the first reason and stops further reads. For errors the
    /// socket is shut so blocked readers and the client see it at once.
    fn close(&self, reason: CloseReason) {
        let mut slot = lock(&self.reason);
        if slot.is_none() {
            *slot = Some(reason.clone());
        }
        drop(slot);
        self.closing.store(true, Ordering::SeqCst);
        if matches!(reason, CloseReason::Error(_)) {
            lock(&self.writer).shutdown(Shutdown::Both);
        }
    }

    /// Reads the next request (and a write's payload into `payload`).
    /// `None` once the connection is closing.
    fn next_request(&self, payload: &mut Vec<u8>) -> Option<Request> {
        let mut reader = lock(&self.reader);
        if self.closing.load(Ordering::SeqCst) {
            return None;
        }
        // Poll only when at most the previous request is still being
        // served: that is the depth-1 case the poll is for (its reply goes
        // out while we poll for the next request), and no other worker
        // needs the CPU.
        if reader.buffer().is_empty() && self.in_flight.load(Ordering::SeqCst) <= 1 {
            crate::net::spin_until_readable(reader.get_ref().as_raw_fd(), SPIN);
        }
        let mut raw = [0u8; Request::LEN];
        if let Err(e) = reader.read_exact(&mut raw) {
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
                payload.resize(request.length as usize, 0);
                if let Err(e) = reader.read_exact(payload) {
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
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Some(request)
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
        if let Err(e) = self.send(bytes) {
            self.close(CloseReason::Error(format!("writing reply: {e}")));
        }
    }

    /// Sends a reply. Small replies completed while another worker is
    /// sending are queued and go out together in that worker's next send,
    /// so at depth N the client gets a few large sends instead of N tiny
    /// ones; a lone reply is sent at once by its own worker.
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > COMBINE_MAX {
            return lock(&self.writer).write_all(bytes);
        }
        {
            let mut out = lock(&self.out);
            out.queue.extend_from_slice(bytes);
            if out.flushing {
                return Ok(());
            }
            out.flushing = true;
        }
        let mut batch = Vec::new();
        loop {
            {
                let mut out = lock(&self.out);
                if out.queue.is_empty() {
                    out.flushing = false;
                    return Ok(());
                }
                batch.clear();
                std::mem::swap(&mut batch, &mut out.queue);
            }
            if let Err(e) = lock(&self.writer).write_all(&batch) {
                lock(&self.out).flushing = false;
                return Err(e);
            }
        }
    }

    fn worker(&self) {
        let mut buf = Vec::new();
        while let Some(req) = self.next_request(&mut buf) {
            let result = self.execute(&req, &mut buf);
            if let Err(code) = result {
                tracing::debug!(
                    command = ?req.command, offset = req.offset, length = req.length,
                    flags = req.flags, error = code, "request failed"
                );
            }
            self.reply(&req, result, &mut buf);
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            // Do not keep a 32 MiB buffer around after one large request,
            // but do keep one for the common sizes up to a few MiB (a 1 MiB
            // read needs 1 MiB plus the reply header).
            if buf.capacity() > KEEP_BUFFER {
                buf = Vec::new();
            }
        }
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
/// breaks, or the read side is shut down by the server.
pub fn serve(stream: Stream, export: &Export, workers: usize) -> io::Result<Summary> {
    let writer = stream.try_clone()?;
    let conn = Connection {
        export,
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, stream)),
        writer: Mutex::new(writer),
        out: Mutex::new(Outgoing::default()),
        closing: AtomicBool::new(false),
        reason: Mutex::new(None),
        requests: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
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
    let reason = lock(&conn.reason).take().unwrap_or(CloseReason::Eof);
    Ok(Summary {
        requests: conn.requests.load(Ordering::Relaxed),
        reason,
    })
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
