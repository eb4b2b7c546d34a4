//! The peer link: frame I/O over a TCP stream, the authenticated handshake,
//! and an established session (sending side, pending acknowledgements,
//! failure).

use crate::sync::lock;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use replblk_proto::repl::{
    self, auth_mac, auth_verify, negotiate_version, Frame, FrameHeader, Hello, RefuseCode,
    CHALLENGE_LEN, MAX_BODY,
};
use thiserror::Error;

use crate::config::PeerConfig;

#[derive(Debug, Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// We refused the peer.
    #[error("refused peer: {message}")]
    WeRefused { code: RefuseCode, message: String },
    /// The peer refused us.
    #[error("peer refused us: {message}")]
    PeerRefused { code: RefuseCode, message: String },
}

impl LinkError {
    /// Refusals are configuration problems: retrying fast cannot help.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            LinkError::WeRefused { .. } | LinkError::PeerRefused { .. }
        )
    }
}

/// Reads one frame header and its body into `body` (reused across calls,
/// so the hot path allocates nothing). Returns the frame kind.
pub fn read_raw(stream: &mut impl Read, body: &mut Vec<u8>) -> Result<u16, LinkError> {
    let mut raw = [0u8; FrameHeader::LEN];
    stream.read_exact(&mut raw)?;
    let header = FrameHeader::decode(&mut io::Cursor::new(&raw[..]))
        .map_err(|e| LinkError::Protocol(e.to_string()))?
        .ok_or_else(|| LinkError::Protocol("short frame header".into()))?;
    debug_assert!(header.length <= MAX_BODY);
    body.resize(header.length as usize, 0);
    stream.read_exact(body)?;
    Ok(header.kind)
}

/// After authentication both sides send their `State` and read the
/// peer's, within the handshake deadline.
pub fn exchange_state(
    stream: &mut TcpStream,
    mine: repl::StateFrame,
    timeout: Duration,
) -> Result<repl::StateFrame, LinkError> {
    let deadline = Instant::now() + timeout;
    write_frame(stream, &Frame::State(mine))?;
    match expect_frame(stream, "State", deadline)? {
        Frame::State(st) => Ok(st),
        other => Err(refuse(
            stream,
            RefuseCode::ProtocolError,
            format!("expected State, got frame kind {}", other.kind()),
        )),
    }
}

/// Reads one whole frame.
pub fn read_frame(stream: &mut impl Read) -> Result<Frame, LinkError> {
    let mut body = Vec::new();
    let kind = read_raw(stream, &mut body)?;
    Frame::decode_body(kind, &body).map_err(|e| LinkError::Protocol(e.to_string()))
}

/// Largest frame body accepted before the peer is authenticated (the
/// largest Hello is well under 1 KiB), so an unauthenticated peer cannot
/// make us allocate a data-sized buffer.
const MAX_HANDSHAKE_BODY: u32 = 4096;

fn read_handshake_frame(stream: &mut TcpStream, deadline: Instant) -> Result<Frame, LinkError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(LinkError::Protocol(
            "handshake did not finish in time".into(),
        ));
    }
    stream.set_read_timeout(Some(left))?;
    let mut raw = [0u8; FrameHeader::LEN];
    stream.read_exact(&mut raw)?;
    let header = FrameHeader::decode(&mut io::Cursor::new(&raw[..]))
        .map_err(|e| LinkError::Protocol(e.to_string()))?
        .ok_or_else(|| LinkError::Protocol("short frame header".into()))?;
    if header.length > MAX_HANDSHAKE_BODY {
        return Err(LinkError::Protocol(format!(
            "{}-byte frame before authentication (limit {MAX_HANDSHAKE_BODY})",
            header.length
        )));
    }
    let mut body = vec![0u8; header.length as usize];
    stream.read_exact(&mut body)?;
    Frame::decode_body(header.kind, &body).map_err(|e| LinkError::Protocol(e.to_string()))
}

/// Writes one frame built in memory (everything but bulk writes).
pub fn write_frame(stream: &mut impl Write, frame: &Frame) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(64);
    frame.encode(&mut out);
    stream.write_all(&out)
}

/// How long a writer waiting for its Ack polls the socket before it
/// sleeps in `recv`.
const SPIN: Duration = Duration::from_micros(40);

/// Writes all of `bufs`, resuming after partial writes.
fn write_all_vectored(stream: &mut impl Write, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match stream.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn refuse(stream: &mut TcpStream, code: RefuseCode, message: String) -> LinkError {
    // Best effort: tell the peer why, then give up on this connection.
    let _ = write_frame(
        stream,
        &Frame::Refuse {
            code,
            message: message.clone(),
        },
    );
    LinkError::WeRefused { code, message }
}

fn expect_frame(
    stream: &mut TcpStream,
    want: &'static str,
    deadline: Instant,
) -> Result<Frame, LinkError> {
    match read_handshake_frame(stream, deadline)? {
        Frame::Refuse { code, message } => Err(LinkError::PeerRefused { code, message }),
        f => Ok(f),
    }
    .map_err(|e| match e {
        LinkError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => LinkError::Protocol(
            format!("peer closed the connection while we waited for {want}"),
        ),
        other => other,
    })
}

/// What both sides agreed on.
pub struct Agreed {
    pub version: u16,
}

/// Runs the handshake on a fresh connection. The dialer speaks first.
pub fn handshake(
    stream: &mut TcpStream,
    cfg: &PeerConfig,
    resource: &str,
    size: u64,
    dialer: bool,
) -> Result<Agreed, LinkError> {
    // One deadline for the whole exchange: a peer trickling bytes cannot
    // hold the link (and so lock the real peer out) for longer.
    let deadline = Instant::now() + Duration::from_millis(cfg.timing.connect_timeout_ms);
    let mut challenge = [0u8; CHALLENGE_LEN];
    getrandom::getrandom(&mut challenge)
        .map_err(|e| LinkError::Io(io::Error::other(format!("no randomness: {e}"))))?;
    let mine = Hello {
        min_version: repl::PROTOCOL_MIN,
        max_version: repl::PROTOCOL_MAX,
        features: repl::features::NONE,
        node: cfg.local_node.clone(),
        peer: cfg.peer_node.clone(),
        resource: resource.to_owned(),
        size,
        challenge,
    };
    if dialer {
        write_frame(stream, &Frame::Hello(mine.clone()))?;
    }
    let theirs = match expect_frame(stream, "Hello", deadline)? {
        Frame::Hello(h) => h,
        other => {
            return Err(refuse(
                stream,
                RefuseCode::ProtocolError,
                format!("expected Hello, got frame kind {}", other.kind()),
            ))
        }
    };
    let Some(version) = negotiate_version(
        (mine.min_version, mine.max_version),
        (theirs.min_version, theirs.max_version),
    ) else {
        return Err(refuse(
            stream,
            RefuseCode::VersionMismatch,
            format!(
                "no common protocol version: we speak {}..={}, peer {} speaks {}..={}",
                mine.min_version,
                mine.max_version,
                theirs.node,
                theirs.min_version,
                theirs.max_version
            ),
        ));
    };
    if theirs.resource != resource {
        return Err(refuse(
            stream,
            RefuseCode::UnknownResource,
            format!(
                "peer wants resource {:?} but this link is for {resource:?}",
                theirs.resource
            ),
        ));
    }
    if theirs.node != cfg.peer_node || theirs.peer != cfg.local_node {
        return Err(refuse(
            stream,
            RefuseCode::WrongPeer,
            format!(
                "peer says it is {:?} expecting {:?}; configured peer is {:?} and we are {:?}",
                theirs.node, theirs.peer, cfg.peer_node, cfg.local_node
            ),
        ));
    }
    if theirs.size != size {
        return Err(refuse(
            stream,
            RefuseCode::SizeMismatch,
            format!(
                "device sizes differ: {} has {} bytes, {} has {size}",
                theirs.node, theirs.size, cfg.local_node
            ),
        ));
    }
    if theirs.challenge == challenge {
        return Err(refuse(
            stream,
            RefuseCode::ProtocolError,
            "peer sent our own challenge back (reflection)".into(),
        ));
    }
    if !dialer {
        write_frame(stream, &Frame::Hello(mine))?;
    }
    let secret = cfg.secret.as_bytes();
    let mac = auth_mac(secret, &theirs.challenge, &cfg.local_node, resource)
        .ok_or_else(|| LinkError::Protocol("cannot key HMAC with the shared secret".into()))?;
    write_frame(stream, &Frame::Auth { mac })?;
    match expect_frame(stream, "Auth", deadline)? {
        Frame::Auth { mac } => {
            if !auth_verify(secret, &challenge, &cfg.peer_node, resource, &mac) {
                return Err(refuse(
                    stream,
                    RefuseCode::AuthFailed,
                    format!(
                        "authentication failed: {} does not know the shared secret of resource {resource:?}",
                        cfg.peer_node
                    ),
                ));
            }
        }
        other => {
            return Err(refuse(
                stream,
                RefuseCode::ProtocolError,
                format!("expected Auth, got frame kind {}", other.kind()),
            ))
        }
    }
    write_frame(stream, &Frame::AuthOk)?;
    match expect_frame(stream, "AuthOk", deadline)? {
        Frame::AuthOk => Ok(Agreed { version }),
        other => Err(refuse(
            stream,
            RefuseCode::ProtocolError,
            format!("expected AuthOk, got frame kind {}", other.kind()),
        )),
    }
}

/// How a replicated request ended on the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    Done,
    /// The peer's storage failed with this errno value.
    Failed(u32),
    /// The link went down before the peer acknowledged.
    Lost,
}

/// Completion slot for one sequence number (or one Ping).
pub struct Slot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

#[derive(Default)]
struct SlotState {
    outcome: Option<Remote>,
    /// The previous reader passed the read side to this slot's waiter.
    read_turn: bool,
}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot {
            state: Mutex::new(SlotState::default()),
            changed: Condvar::new(),
        })
    }

    fn complete(&self, r: Remote) {
        let mut st = lock(&self.state);
        if st.outcome.is_none() {
            st.outcome = Some(r);
        }
        drop(st);
        self.changed.notify_all();
    }

    fn outcome(&self) -> Option<Remote> {
        lock(&self.state).outcome
    }

    fn give_read_turn(&self) {
        lock(&self.state).read_turn = true;
        self.changed.notify_all();
    }
}

/// What a sequenced frame in flight means for durability on the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// A data frame for this range; `durable` when sent with FUA.
    Data {
        offset: u64,
        len: u64,
        durable: bool,
    },
    /// A barrier: once acknowledged, every earlier data frame is durable.
    Barrier,
}

impl Track {
    /// A data frame sent without FUA.
    pub fn plain(offset: u64, len: u64) -> Track {
        Track::Data {
            offset,
            len,
            durable: false,
        }
    }
}

struct Pending {
    alive: bool,
    slots: HashMap<u64, Arc<Slot>>,
    tracks: HashMap<u64, Track>,
    /// Data frames the peer acknowledged as applied but that no
    /// acknowledged barrier has made durable yet: `(seq, offset, len)`.
    /// If the peer's machine crashes they may be lost there, so when the
    /// session ends they count as out of sync (DRBD's transfer log).
    unstable: Vec<(u64, u64, u64)>,
}

struct Sender {
    stream: TcpStream,
    next_seq: u64,
}

/// An established, authenticated connection to the peer.
///
/// On the Primary there is no dedicated receiver thread: a thread waiting
/// for an Ack takes the read side itself (if free), reads frames and
/// completes slots until its own is done, then passes the read side to
/// another waiter. At queue depth 1 the writer reads its own Ack, saving a
/// thread hand-off per write. The keepalive pinger reads the same way, so
/// an idle link is still read once per ping interval.
pub struct Session {
    sender: Mutex<Sender>,
    /// The sequence number the next data frame received must carry. It
    /// lives here, not in the receive loop, so the numbering continues
    /// when the roles swap within one session.
    pub expected_seq: AtomicU64,
    /// Handles `State` and `SyncDone` frames, whichever thread reads them.
    hook: Hook,
    /// Requests for the peer's `State` awaiting their `ANSWER`, by token
    /// (see `expect_state`).
    state_waiters: Mutex<HashMap<u64, Arc<Slot>>>,
    next_token: AtomicU64,
    reader: Mutex<io::BufReader<TcpStream>>,
    ping_timeout: Duration,
    pending: Mutex<Pending>,
    control: TcpStream,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    pub peer: String,
    /// The last Ping sent: its nonce, when, and its slot on the Primary.
    ping: Mutex<Option<(u64, Instant, Arc<Slot>)>>,
    /// Round trip of the last answered Ping, in microseconds (0: none yet).
    rtt_us: AtomicU64,
}

/// What a session does with the peer's state frames.
pub type Hook = Box<dyn Fn(Frame) -> Result<(), LinkError> + Send + Sync>;

impl Session {
    pub fn new(
        stream: &TcpStream,
        peer: String,
        ping_timeout: Duration,
        hook: Hook,
    ) -> io::Result<Session> {
        Ok(Session {
            expected_seq: AtomicU64::new(1),
            hook,
            state_waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            sender: Mutex::new(Sender {
                stream: stream.try_clone()?,
                next_seq: 1,
            }),
            // Small enough that a frame header read does not first copy a
            // large write payload through the buffer.
            reader: Mutex::new(io::BufReader::with_capacity(32 * 1024, stream.try_clone()?)),
            ping_timeout,
            pending: Mutex::new(Pending {
                alive: true,
                slots: HashMap::new(),
                tracks: HashMap::new(),
                unstable: Vec::new(),
            }),
            control: stream.try_clone()?,
            failed: AtomicBool::new(false),
            ping: Mutex::new(None),
            rtt_us: AtomicU64::new(0),
            reason: Mutex::new(None),
            peer,
        })
    }

    /// Sends a Ping and remembers when, to time its Pong; returns the slot
    /// its Pong completes.
    pub fn ping(&self, nonce: u64) -> Arc<Slot> {
        let slot = Slot::new();
        *lock(&self.ping) = Some((nonce, Instant::now(), slot.clone()));
        self.send_control(&Frame::Ping { nonce });
        slot
    }

    /// A token and the slot that the peer's `ANSWER` to it completes
    /// (after the hook handled that answer). Send a `State` with `REPLY`
    /// and the token, then `wait_for` the slot: it reads the link itself
    /// on the Primary.
    pub fn expect_state(&self) -> (u64, Arc<Slot>) {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let slot = Slot::new();
        lock(&self.state_waiters).insert(token, slot.clone());
        if !self.is_alive() {
            // `fail` may have emptied the waiters before this one came.
            self.forget_state(token);
            slot.complete(Remote::Lost);
        }
        (token, slot)
    }

    /// Drops the request `token` of `expect_state` when its wait ended
    /// without an answer; a late answer is then ignored.
    pub fn forget_state(&self, token: u64) {
        lock(&self.state_waiters).remove(&token);
    }

    /// Records the round trip if `nonce` answers the last Ping.
    pub fn pong(&self, nonce: u64) {
        if let Some((sent, at, slot)) = lock(&self.ping).as_ref() {
            if *sent == nonce {
                let us = at.elapsed().as_micros().clamp(1, u64::MAX as u128) as u64;
                self.rtt_us.store(us, Ordering::Relaxed);
                slot.complete(Remote::Done);
            }
        }
    }

    /// Round trip of the last answered Ping, if any.
    pub fn rtt_us(&self) -> Option<u64> {
        Some(self.rtt_us.load(Ordering::Relaxed)).filter(|&us| us > 0)
    }

    pub fn is_alive(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    /// Ends the session once: records why, shuts the socket (waking the
    /// receiver), and completes every pending request as `Lost`.
    pub fn fail(&self, why: &str) {
        if self.failed.swap(true, Ordering::SeqCst) {
            return;
        }
        *lock(&self.reason) = Some(why.to_owned());
        self.control.shutdown(Shutdown::Both).ok();
        let slots: Vec<_> = {
            let mut p = lock(&self.pending);
            p.alive = false;
            p.tracks.clear();
            p.slots.drain().map(|(_, s)| s).collect()
        };
        for s in slots {
            s.complete(Remote::Lost);
        }
        if let Some((_, _, slot)) = lock(&self.ping).as_ref() {
            slot.complete(Remote::Lost);
        }
        // No answer to a State request can come any more.
        let waiters: Vec<_> = lock(&self.state_waiters).drain().map(|(_, s)| s).collect();
        for s in waiters {
            s.complete(Remote::Lost);
        }
    }

    pub fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }

    /// Sends a sequenced data frame or barrier. `build` gets the sequence
    /// number and writes the frame. `None` if the session is already down.
    fn send_sequenced(
        &self,
        track: Track,
        build: impl FnOnce(&mut TcpStream, u64) -> io::Result<()>,
    ) -> Option<Arc<Slot>> {
        let slot = Slot::new();
        let mut sender = lock(&self.sender);
        let seq = sender.next_seq;
        {
            let mut p = lock(&self.pending);
            if !p.alive {
                return None;
            }
            p.slots.insert(seq, slot.clone());
            p.tracks.insert(seq, track);
        }
        sender.next_seq += 1;
        let sent = build(&mut sender.stream, seq);
        drop(sender);
        if let Err(e) = sent {
            self.fail(&format!("sending to peer: {e}"));
        }
        Some(slot)
    }

    pub fn send_write(&self, offset: u64, flags: u32, payload: &[u8]) -> Option<Arc<Slot>> {
        let crc = crc32c::crc32c(payload);
        let track = Track::Data {
            offset,
            len: payload.len() as u64,
            durable: flags & repl::data_flags::FUA != 0,
        };
        self.send_sequenced(track, |stream, seq| {
            let mut head = BytesMut::with_capacity(FrameHeader::LEN + repl::WriteFrame::FIXED);
            repl::WriteRef::encode_head(&mut head, seq, offset, flags, crc, payload.len());
            write_all_vectored(stream, &mut [IoSlice::new(&head), IoSlice::new(payload)])
        })
    }

    /// Sends a frame that carries a sequence number chosen here.
    pub fn send_frame(&self, track: Track, make: impl FnOnce(u64) -> Frame) -> Option<Arc<Slot>> {
        self.send_sequenced(track, |stream, seq| write_frame(stream, &make(seq)))
    }

    /// Data frames acknowledged but not yet made durable by a barrier.
    pub fn unstable_count(&self) -> usize {
        lock(&self.pending).unstable.len()
    }

    /// After the session failed: the ranges of acknowledged data frames no
    /// barrier made durable (see `Pending::unstable`).
    /// No acknowledgement is accepted after this: a late one completes
    /// its request as lost, so its writer marks the range itself.
    pub fn take_unstable(&self) -> Vec<(u64, u64)> {
        let mut p = lock(&self.pending);
        p.alive = false;
        p.unstable.drain(..).map(|(_, o, l)| (o, l)).collect()
    }

    /// Sends bytes holding whole unsequenced frames (batched acks).
    pub fn send_raw(&self, bytes: &[u8]) {
        let sent = lock(&self.sender).stream.write_all(bytes);
        if let Err(e) = sent {
            self.fail(&format!("sending to peer: {e}"));
        }
    }

    /// Sends an unsequenced frame (Ack, Ping, Pong).
    pub fn send_control(&self, frame: &Frame) {
        let sent = write_frame(&mut lock(&self.sender).stream, frame);
        if let Err(e) = sent {
            self.fail(&format!("sending to peer: {e}"));
        }
    }

    /// Completes the request `seq` with the peer's answer.
    pub fn acknowledge(&self, seq: u64, status: u32) -> Result<(), LinkError> {
        let (slot, alive) = {
            let mut p = lock(&self.pending);
            let slot = p.slots.remove(&seq);
            let alive = p.alive;
            match (p.tracks.remove(&seq), status) {
                _ if !alive => {}
                (
                    Some(Track::Data {
                        offset,
                        len,
                        durable: false,
                    }),
                    0,
                ) => p.unstable.push((seq, offset, len)),
                // A barrier covers every frame sent before it.
                (Some(Track::Barrier), 0) => p.unstable.retain(|&(s, _, _)| s > seq),
                _ => {}
            }
            (slot, alive)
        };
        match slot {
            Some(s) if !alive => {
                s.complete(Remote::Lost);
                Ok(())
            }
            Some(s) => {
                s.complete(if status == 0 {
                    Remote::Done
                } else {
                    Remote::Failed(status)
                });
                Ok(())
            }
            None => Err(LinkError::Protocol(format!(
                "ack for sequence number {seq}, which is not in flight"
            ))),
        }
    }

    /// Frames the Primary receives: Acks complete slots, pings are
    /// answered, anything else ends the session.
    fn handle_incoming(&self, frame: Frame) -> Result<(), LinkError> {
        match frame {
            Frame::Ack { seq, status } => self.acknowledge(seq, status),
            other => self.handle_control(other, "Secondary"),
        }
    }

    /// Frames either role may receive besides its data: pings are
    /// answered, a refusal or anything else ends the session.
    pub fn handle_control(&self, frame: Frame, from: &str) -> Result<(), LinkError> {
        match frame {
            Frame::Ping { nonce } => {
                self.send_control(&Frame::Pong { nonce });
                Ok(())
            }
            Frame::Pong { nonce } => {
                self.pong(nonce);
                Ok(())
            }
            Frame::Refuse { code, message } => Err(LinkError::PeerRefused { code, message }),
            Frame::State(st) => {
                (self.hook)(Frame::State(st))?;
                if st.state_flags & repl::state_flags::ANSWER != 0 {
                    if let Some(slot) = lock(&self.state_waiters).remove(&st.token) {
                        slot.complete(Remote::Done);
                    }
                }
                Ok(())
            }
            f @ Frame::SyncDone { .. } => (self.hook)(f),
            other => Err(LinkError::Protocol(format!(
                "unexpected frame kind {} from a {from}",
                other.kind()
            ))),
        }
    }

    /// Says why a read from the peer failed, for logs and status.
    pub fn describe(&self, e: LinkError) -> String {
        match e {
            LinkError::Io(io)
                if matches!(
                    io.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                format!("no frame from the peer for {:?}", self.ping_timeout)
            }
            LinkError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
                "peer closed the connection".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// Reads and handles frames until `slot` completes, the deadline
    /// passes or the link fails.
    fn read_until(
        &self,
        reader: &mut io::BufReader<TcpStream>,
        slot: &Slot,
        deadline: Instant,
        what: &str,
    ) {
        while slot.outcome().is_none() && self.is_alive() {
            if Instant::now() > deadline {
                self.fail(what);
                return;
            }
            // Poll only for a lone request: with more in flight, Acks
            // keep coming and the CPU is better left to the others.
            if reader.buffer().is_empty() && lock(&self.pending).slots.len() <= 1 {
                crate::net::spin_until_readable(reader.get_ref().as_raw_fd(), SPIN);
            }
            match read_frame(reader).and_then(|f| self.handle_incoming(f)) {
                Ok(()) => {}
                Err(e) => {
                    let why = self.describe(e);
                    self.fail(&why);
                }
            }
        }
    }

    /// Hands the read side to a thread still waiting for its answer.
    fn pass_read_turn(&self) {
        let next = lock(&self.pending).slots.values().next().cloned();
        let next = next.or_else(|| {
            lock(&self.ping)
                .as_ref()
                .filter(|(_, _, s)| s.outcome().is_none())
                .map(|(_, _, s)| s.clone())
        });
        let next = next.or_else(|| lock(&self.state_waiters).values().next().cloned());
        if let Some(slot) = next {
            slot.give_read_turn();
        }
    }

    /// Waits (on the Primary) for a slot, reading the link itself when the
    /// read side is free. After `timeout` the peer counts as lost, with
    /// `what` as the reason.
    pub fn wait_for(&self, slot: &Slot, timeout: Duration, what: &str) -> Remote {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = slot.outcome() {
                return r;
            }
            if let Ok(mut reader) = self.reader.try_lock() {
                self.read_until(&mut reader, slot, deadline, what);
                drop(reader);
                self.pass_read_turn();
                return slot.outcome().unwrap_or(Remote::Lost);
            }
            // Another thread is reading; it completes our slot or passes
            // us the read side. The short bound re-checks regardless.
            let mut st = lock(&slot.state);
            if st.outcome.is_none() && !st.read_turn {
                if Instant::now() > deadline {
                    drop(st);
                    self.fail(what);
                    return slot.outcome().unwrap_or(Remote::Lost);
                }
                st = slot
                    .changed
                    .wait_timeout(st, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            st.read_turn = false;
        }
    }

    /// Waits for a replicated request's Ack.
    pub fn wait(&self, slot: &Slot, timeout: Duration) -> Remote {
        self.wait_for(
            slot,
            timeout,
            &format!("peer did not acknowledge within {timeout:?}"),
        )
    }

    /// Exclusive access to the read side (the Secondary's apply loop).
    pub fn reader(&self) -> MutexGuard<'_, io::BufReader<TcpStream>> {
        lock(&self.reader)
    }
}
