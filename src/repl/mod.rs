//! Synchronous replication of one resource to its peer (protocol C).
//!
//! A `Replica` owns the local store, the out-of-sync bitmap and the link to
//! the peer. On the Primary it is the `Store` the NBD frontend writes to:
//! each write takes an interval lock on its range, is sent to the peer and
//! written locally at the same time, and completes only when both are done
//! (or, if the peer is lost, after the local write, with the range marked
//! out of sync). A FLUSH becomes a Barrier that the peer acknowledges only
//! when every earlier write is durable there. On the Secondary the link's
//! receiver applies frames in order and acknowledges them.

pub mod intervals;
pub mod link;

use crate::sync::lock;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BytesMut;
use replblk_proto::repl::{data_flags, kind as repl_kind, Frame, WriteRef};
use serde::Serialize;

use crate::bitmap::{DirtyBitmap, DEFAULT_GRANULARITY};
use crate::config::{PeerConfig, Role};
use crate::store::Store;
use intervals::IntervalLock;
use link::{LinkError, Remote, Session};

/// State of the link to the peer, as reported by `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConnState {
    /// No peer configured.
    StandAlone,
    /// Trying to reach (or waiting for) the peer.
    Connecting,
    /// Authenticated session established.
    Connected,
}

/// A snapshot for `replctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct ResourceStatus {
    pub name: String,
    pub role: Role,
    pub size: u64,
    pub connection: ConnState,
    pub peer: Option<String>,
    pub out_of_sync_bytes: u64,
    pub out_of_sync_blocks: u64,
    pub bitmap_granularity: u64,
    pub last_error: Option<String>,
    /// Round trip of the last keepalive Ping, while connected.
    pub ping_rtt_us: Option<u64>,
}

struct LinkState {
    conn: ConnState,
    last_error: Option<String>,
}

pub struct Replica {
    pub name: String,
    pub role: Role,
    store: Arc<dyn Store>,
    size: u64,
    peer: Option<PeerConfig>,
    oos: Mutex<DirtyBitmap>,
    intervals: IntervalLock,
    session: Mutex<Option<Arc<Session>>>,
    state: Mutex<LinkState>,
    stopping: AtomicBool,
    stop_lock: Mutex<()>,
    stop_cv: Condvar,
    listener: Option<TcpListener>,
    manager: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("resource {resource:?}: cannot listen for the peer on {addr}: {source}")]
    Bind {
        resource: String,
        addr: String,
        source: io::Error,
    },
    #[error("resource {resource:?}: cannot start the peer link thread: {source}")]
    Thread { resource: String, source: io::Error },
}

impl Replica {
    /// Wraps `store`; with a peer, binds the replication listener if this
    /// node is the one that accepts.
    pub fn new(
        name: &str,
        role: Role,
        store: Arc<dyn Store>,
        peer: Option<PeerConfig>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let size = store.size();
        let listener = match &peer {
            Some(p) if !dials(p) => {
                Some(
                    TcpListener::bind(p.local_address).map_err(|source| ReplicaError::Bind {
                        resource: name.to_owned(),
                        addr: p.local_address.to_string(),
                        source,
                    })?,
                )
            }
            _ => None,
        };
        let conn = if peer.is_some() {
            ConnState::Connecting
        } else {
            ConnState::StandAlone
        };
        Ok(Arc::new(Replica {
            name: name.to_owned(),
            role,
            store,
            size,
            peer,
            oos: Mutex::new(DirtyBitmap::new(size, DEFAULT_GRANULARITY)),
            intervals: IntervalLock::new(),
            session: Mutex::new(None),
            state: Mutex::new(LinkState {
                conn,
                last_error: None,
            }),
            stopping: AtomicBool::new(false),
            stop_lock: Mutex::new(()),
            stop_cv: Condvar::new(),
            listener,
            manager: Mutex::new(None),
        }))
    }

    /// Starts the peer link thread (no-op without a peer).
    pub fn start(self: &Arc<Self>) -> Result<(), ReplicaError> {
        if self.peer.is_none() {
            return Ok(());
        }
        let me = self.clone();
        let handle = std::thread::Builder::new()
            .name(format!("peer-{}", self.name))
            .spawn(move || me.manage_link())
            .map_err(|source| ReplicaError::Thread {
                resource: self.name.clone(),
                source,
            })?;
        *lock(&self.manager) = Some(handle);
        Ok(())
    }

    /// Stops the link thread and closes the session.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        {
            let _g = lock(&self.stop_lock);
            self.stop_cv.notify_all();
        }
        if let Some(l) = &self.listener {
            // SAFETY: shutdown(2) on our own listening socket wakes accept().
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if let Some(s) = lock(&self.session).clone() {
            s.fail("shutting down");
        }
        if let Some(h) = lock(&self.manager).take() {
            let _ = h.join();
        }
    }

    pub fn status(&self) -> ResourceStatus {
        let oos = lock(&self.oos);
        let state = lock(&self.state);
        ResourceStatus {
            name: self.name.clone(),
            role: self.role,
            size: self.size,
            connection: state.conn,
            peer: self.peer.as_ref().map(|p| p.peer_node.clone()),
            out_of_sync_bytes: oos.bytes(self.size),
            out_of_sync_blocks: oos.count(),
            bitmap_granularity: oos.granularity(),
            last_error: state.last_error.clone(),
            ping_rtt_us: self.current_session().and_then(|s| s.rtt_us()),
        }
    }

    /// Out-of-sync byte runs `(offset, length)`.
    pub fn out_of_sync_runs(&self) -> Vec<(u64, u64)> {
        lock(&self.oos).runs().collect()
    }

    fn mark_out_of_sync(&self, offset: u64, len: u64) {
        lock(&self.oos).set_range(offset, len);
    }

    fn current_session(&self) -> Option<Arc<Session>> {
        lock(&self.session).clone().filter(|s| s.is_alive())
    }

    fn ack_timeout(&self) -> Duration {
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
        send: impl FnOnce(&Session) -> Option<Arc<link::Slot>>,
        local: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        if self.role == Role::Secondary {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        if self.peer.is_none() {
            // A single-node resource has nobody to be out of sync with.
            return local();
        }
        let _range = self.intervals.lock(offset, len);
        let remote = self
            .current_session()
            .and_then(|s| send(&s).map(|slot| (s, slot)));
        let result = local();
        let in_sync = match remote {
            Some((session, slot)) => match session.wait(&slot, self.ack_timeout()) {
                Remote::Done => true,
                Remote::Failed(errno) => {
                    tracing::warn!(resource = %self.name, offset, len, errno, "peer failed a write; range marked out of sync");
                    false
                }
                Remote::Lost => false,
            },
            None => false,
        };
        if !in_sync || result.is_err() {
            self.mark_out_of_sync(offset, len);
        }
        result
    }

    // ---- the peer link ------------------------------------------------

    fn set_state(&self, conn: ConnState, error: Option<String>) {
        let mut s = lock(&self.state);
        s.conn = conn;
        if error.is_some() {
            s.last_error = error;
        }
    }

    /// Sleeps up to `d`, returning early (true) when stopping.
    fn pause(&self, d: Duration) -> bool {
        let g = lock(&self.stop_lock);
        if self.stopping.load(Ordering::SeqCst) {
            return true;
        }
        let _ = self.stop_cv.wait_timeout(g, d);
        self.stopping.load(Ordering::SeqCst)
    }

    fn manage_link(self: Arc<Self>) {
        let Some(cfg) = self.peer.clone() else {
            return;
        };
        let min_backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_millis(cfg.timing.reconnect_max_ms);
        let mut backoff = min_backoff;
        let mut last_logged: Option<String> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            self.set_state(ConnState::Connecting, None);
            let attempt = self.establish(&cfg);
            match attempt {
                Ok(stream) => {
                    last_logged = None;
                    backoff = min_backoff;
                    self.run_session(&cfg, stream);
                }
                Err(e) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    let msg = e.to_string();
                    // One line per distinct failure, not per retry.
                    if last_logged.as_deref() != Some(msg.as_str()) {
                        if e.is_refusal() {
                            tracing::error!(resource = %self.name, peer = %cfg.peer_node, "peer link: {msg}");
                        } else {
                            tracing::info!(resource = %self.name, peer = %cfg.peer_node, "peer link: {msg}");
                        }
                        last_logged = Some(msg.clone());
                    }
                    self.set_state(ConnState::Connecting, Some(msg));
                    backoff = if e.is_refusal() {
                        max_backoff
                    } else {
                        (backoff * 2).min(max_backoff)
                    };
                    if self.pause(jitter(backoff)) {
                        break;
                    }
                }
            }
        }
    }

    /// Dials or accepts one connection and authenticates it.
    fn establish(&self, cfg: &PeerConfig) -> Result<TcpStream, LinkError> {
        let timeout = Duration::from_millis(cfg.timing.connect_timeout_ms);
        let (mut stream, dialer) = match &self.listener {
            None => (
                TcpStream::connect_timeout(&cfg.peer_address, timeout).map_err(|e| {
                    LinkError::Io(io::Error::new(
                        e.kind(),
                        format!(
                            "connecting to {} at {}: {e}",
                            cfg.peer_node, cfg.peer_address
                        ),
                    ))
                })?,
                true,
            ),
            Some(l) => (l.accept()?.0, false),
        };
        if self.stopping.load(Ordering::SeqCst) {
            return Err(LinkError::Protocol("shutting down".into()));
        }
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let agreed = link::handshake(&mut stream, cfg, &self.name, self.size, dialer)?;
        tracing::info!(
            resource = %self.name, peer = %cfg.peer_node,
            addr = %stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            version = agreed.version, "peer connected"
        );
        Ok(stream)
    }

    fn run_session(&self, cfg: &PeerConfig, stream: TcpStream) {
        let ping_timeout = Duration::from_millis(cfg.timing.ping_timeout_ms);
        let interval = Duration::from_millis(cfg.timing.ping_interval_ms);
        // Silence for ping_timeout on read, or a peer that stops draining
        // our writes for as long, ends the session.
        let setup = stream
            .set_read_timeout(Some(ping_timeout))
            .and_then(|_| stream.set_write_timeout(Some(ping_timeout)))
            .and_then(|_| Session::new(&stream, cfg.peer_node.clone(), ping_timeout));
        let session = match setup {
            Ok(s) => Arc::new(s),
            Err(e) => {
                self.set_state(ConnState::Connecting, Some(e.to_string()));
                return;
            }
        };
        *lock(&self.session) = Some(session.clone());
        self.set_state(ConnState::Connected, None);
        if self.stopping.load(Ordering::SeqCst) {
            session.fail("shutting down");
        }
        let reason = match self.role {
            // The Primary has no receiver thread (see `Session`): this
            // thread pings and, while waiting for each Pong, reads the link
            // if no writer is already doing so.
            Role::Primary => {
                let mut nonce = 0u64;
                while session.is_alive() {
                    if self.pause(interval) {
                        session.fail("shutting down");
                        break;
                    }
                    nonce += 1;
                    let pong = session.ping(nonce);
                    let what = format!("no answer to a ping within {ping_timeout:?}");
                    session.wait_for(&pong, ping_timeout, &what);
                }
                session.reason().unwrap_or_else(|| "shutting down".into())
            }
            Role::Secondary => std::thread::scope(|scope| {
                let pinger = session.clone();
                scope.spawn(move || {
                    let mut nonce = 0u64;
                    while pinger.is_alive() {
                        std::thread::sleep(interval);
                        nonce += 1;
                        if pinger.is_alive() {
                            pinger.ping(nonce);
                        }
                    }
                });
                let why = match self.receive_as_secondary(&session, scope) {
                    Ok(()) => "shutting down".to_owned(),
                    Err(e) => session.describe(e),
                };
                session.fail(&why);
                session.reason().unwrap_or(why)
            }),
        };
        *lock(&self.session) = None;
        tracing::warn!(resource = %self.name, peer = %cfg.peer_node, "peer disconnected: {reason}");
        self.set_state(ConnState::Connecting, Some(reason));
        let _ = stream.shutdown(Shutdown::Both);
    }

    fn receive_as_secondary<'s>(
        &'s self,
        session: &'s Arc<Session>,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<(), LinkError> {
        // Durability requests (FUA writes, barriers) go to a flusher thread
        // that fdatasyncs once per batch and then acknowledges the batch,
        // so the receiver keeps applying later writes meanwhile.
        let (to_flusher, flush_queue) = mpsc::channel::<u64>();
        let flusher_session = session.clone();
        let store = self.store.clone();
        scope.spawn(move || {
            while let Ok(first) = flush_queue.recv() {
                let mut batch = vec![first];
                batch.extend(flush_queue.try_iter());
                let status = match store.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::error!("flush on the secondary failed: {e}");
                        crate::nbd::transmission::io_errno(e)
                    }
                };
                for seq in batch {
                    flusher_session.send_control(&Frame::Ack { seq, status });
                }
            }
        });
        let mut reader = session.reader();
        let mut expected = 1u64;
        let mut body = Vec::new();
        // Acks are batched: written when no further frame is already
        // buffered, i.e. just before the receiver could block on the socket.
        let mut acks = BytesMut::with_capacity(4096);
        let result = loop {
            if reader.buffer().is_empty() && !acks.is_empty() {
                session.send_raw(&acks);
                acks.clear();
            }
            let kind = match link::read_raw(&mut *reader, &mut body) {
                Ok(k) => k,
                Err(e) => break Err(e),
            };
            if !session.is_alive() {
                break Ok(());
            }
            match self.apply(session, kind, &body, &mut expected) {
                Ok(Applied::Nothing) => {}
                Ok(Applied::Done { seq, durable: true }) => {
                    if to_flusher.send(seq).is_err() {
                        break Err(LinkError::Protocol("flusher stopped".into()));
                    }
                }
                Ok(Applied::Done {
                    seq,
                    durable: false,
                }) => Frame::Ack { seq, status: 0 }.encode(&mut acks),
                Ok(Applied::Failed { seq, status }) => Frame::Ack { seq, status }.encode(&mut acks),
                Err(e) => break Err(e),
            }
        };
        if !acks.is_empty() {
            session.send_raw(&acks);
        }
        drop(to_flusher);
        result
    }

    fn check_seq(expected: &mut u64, seq: u64) -> Result<(), LinkError> {
        if seq != *expected {
            return Err(LinkError::Protocol(format!(
                "sequence number {seq} where {} was due",
                *expected
            )));
        }
        *expected += 1;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), LinkError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(LinkError::Protocol(format!(
                "range {offset}+{len} is outside the {}-byte device",
                self.size
            ))),
        }
    }

    /// Applies one frame received by the Secondary.
    fn apply(
        &self,
        session: &Session,
        kind: u16,
        body: &[u8],
        expected: &mut u64,
    ) -> Result<Applied, LinkError> {
        let protocol = |e: replblk_proto::DecodeError| LinkError::Protocol(e.to_string());
        let (seq, durable, result) = if kind == repl_kind::WRITE {
            // The hot path: decoded in place, no copy of the payload.
            let w = WriteRef::decode_body(body).map_err(protocol)?;
            Self::check_seq(expected, w.seq)?;
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
            let r = self.store.write_at(w.payload, w.offset, false);
            (w.seq, w.flags & data_flags::FUA != 0, r)
        } else {
            match Frame::decode_body(kind, body).map_err(protocol)? {
                Frame::Trim {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::check_seq(expected, seq)?;
                    self.check_range(offset, length)?;
                    let r = self.store.trim(offset, length);
                    (seq, flags & data_flags::FUA != 0, r)
                }
                Frame::WriteZeroes {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::check_seq(expected, seq)?;
                    self.check_range(offset, length)?;
                    let r =
                        self.store
                            .write_zeroes(offset, length, flags & data_flags::NO_HOLE == 0);
                    (seq, flags & data_flags::FUA != 0, r)
                }
                Frame::Barrier { seq } => {
                    Self::check_seq(expected, seq)?;
                    (seq, true, Ok(()))
                }
                other => {
                    session.handle_control(other, "Primary")?;
                    return Ok(Applied::Nothing);
                }
            }
        };
        match result {
            Ok(()) => Ok(Applied::Done { seq, durable }),
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
    Done { seq: u64, durable: bool },
    /// The local storage failed; acknowledged with this errno.
    Failed { seq: u64, status: u32 },
}

/// Whether this node dials (its name sorts lower) or accepts.
pub fn dials(cfg: &PeerConfig) -> bool {
    cfg.local_node.as_bytes() < cfg.peer_node.as_bytes()
}

/// ±20 % so two nodes never retry in lockstep.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.8 + f64::from(nanos % 1000) / 2500.0;
    d.mul_f64(factor)
}

impl Store for Replica {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.store.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        let flags = if durable { data_flags::FUA } else { 0 };
        self.replicate(
            offset,
            buf.len() as u64,
            |s| s.send_write(offset, flags, buf),
            || self.store.write_at(buf, offset, durable),
        )
    }

    fn flush(&self) -> io::Result<()> {
        if self.role == Role::Secondary {
            return self.store.flush();
        }
        let remote = self.current_session().and_then(|s| {
            s.send_frame(|seq| Frame::Barrier { seq })
                .map(|slot| (s, slot))
        });
        let local = self.store.flush();
        if let Some((session, slot)) = remote {
            if session.wait(&slot, self.ack_timeout()) != Remote::Done {
                tracing::warn!(resource = %self.name, "flush: peer lost before the barrier was acknowledged");
            }
        }
        local
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        self.replicate(
            offset,
            len,
            |s| {
                s.send_frame(|seq| Frame::Trim {
                    seq,
                    offset,
                    length: len,
                    flags: 0,
                })
            },
            || self.store.trim(offset, len),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let flags = if may_unmap { 0 } else { data_flags::NO_HOLE };
        self.replicate(
            offset,
            len,
            |s| {
                s.send_frame(|seq| Frame::WriteZeroes {
                    seq,
                    offset,
                    length: len,
                    flags,
                })
            },
            || self.store.write_zeroes(offset, len, may_unmap),
        )
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.store.cache(offset, len)
    }
}
