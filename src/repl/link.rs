//! The peer link: frame I/O over a TCP stream, the authenticated handshake,
//! and an established session (sending side, pending acknowledgements,
//! failure).

use crate::sync::lock;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use replblk_proto::repl::{
    self, auth_mac, auth_verify, negotiate_version, Frame, FrameHeader, Hello, RefuseCode,
    CHALLENGE_LEN, MAX_BODY,
};
use thiserror::Error;

use crate::config::PeerConfig;
use crate::core::datapath::{Kind, Peer, PrimaryPath, SecondaryPath};
use crate::net::Stream;
use crate::store::{Batch, Modify};

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
    /// The TLS handshake failed (certificates): a configuration problem,
    /// or someone else than the peer.
    #[error("TLS: {0}")]
    Tls(String),
}

impl LinkError {
    /// Refusals are configuration problems: retrying fast cannot help.
    /// `Busy` is not one: the peer could not take the session now and a
    /// later attempt may succeed.
    pub fn is_refusal(&self) -> bool {
        match self {
            LinkError::WeRefused { code, .. } | LinkError::PeerRefused { code, .. } => {
                *code != RefuseCode::Busy
            }
            LinkError::Tls(_) => true,
            LinkError::Io(_) | LinkError::Protocol(_) => false,
        }
    }
}

/// Reads one frame header and its body into `body` (reused across calls,
/// so the hot path allocates nothing). Returns the frame kind.
pub fn read_raw(stream: &mut impl Read, body: &mut Vec<u8>) -> Result<u16, LinkError> {
    read_raw_placed(stream, body, 0, 1).map(|(kind, _)| kind)
}

/// Like `read_raw`, but the body goes to `buf[start..]`, with `start`
/// chosen so that the body's byte `at` lies on a multiple of `align` in
/// memory (a Write's payload placed for a write past the page cache).
/// Returns the frame kind and `start`; `buf` is reused across calls.
pub fn read_raw_placed(
    stream: &mut impl Read,
    buf: &mut Vec<u8>,
    at: usize,
    align: usize,
) -> Result<(u16, usize), LinkError> {
    let mut raw = [0u8; FrameHeader::LEN];
    stream.read_exact(&mut raw)?;
    let header = FrameHeader::decode(&mut io::Cursor::new(&raw[..]))
        .map_err(|e| LinkError::Protocol(e.to_string()))?
        .ok_or_else(|| LinkError::Protocol("short frame header".into()))?;
    debug_assert!(header.length <= MAX_BODY);
    let len = header.length as usize;
    // Room for any placement first, so that placing moves nothing.
    if buf.capacity() < len + align {
        buf.reserve(len + align - buf.len());
    }
    let start = (align - (buf.as_ptr() as usize + at) % align) % align;
    // Only bytes beyond the current length are zeroed.
    if buf.len() < start + len {
        buf.resize(start + len, 0);
    } else {
        buf.truncate(start + len);
    }
    stream.read_exact(&mut buf[start..])?;
    Ok((header.kind, start))
}

/// After authentication both sides send their `State` and read the
/// peer's, within the handshake deadline.
pub fn exchange_state(
    stream: &mut Stream,
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

fn read_handshake_frame(stream: &mut Stream, deadline: Instant) -> Result<Frame, LinkError> {
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

pub(super) fn refuse(stream: &mut Stream, code: RefuseCode, message: String) -> LinkError {
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
    stream: &mut Stream,
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
    /// Feature bits both sides offered.
    pub features: u64,
}

/// Runs the handshake on a fresh connection. The dialer speaks first.
pub fn handshake(
    stream: &mut Stream,
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
        features: repl::features::KNOWN,
        node: cfg.local_node.clone(),
        peer: cfg.peer_node.clone(),
        resource: resource.to_owned(),
        size,
        challenge,
        after_sb: cfg.split_brain.codes(),
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
    if theirs.after_sb != mine.after_sb {
        let name0 = |c: u8| {
            crate::core::split_brain::After0Pri::from_code(c).map_or("unknown", |p| p.name())
        };
        let name1 = |c: u8| {
            crate::core::split_brain::After1Pri::from_code(c).map_or("unknown", |p| p.name())
        };
        return Err(refuse(
            stream,
            RefuseCode::ConfigMismatch,
            format!(
                "split-brain policies differ: {} has after_sb_0pri {} and after_sb_1pri {}, {} has {} and {}",
                theirs.node,
                name0(theirs.after_sb[0]),
                name1(theirs.after_sb[1]),
                cfg.local_node,
                name0(mine.after_sb[0]),
                name1(mine.after_sb[1]),
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
    let secret = cfg.secret.0.as_bytes();
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
        Frame::AuthOk => Ok(Agreed {
            version,
            features: repl::features::KNOWN & theirs.features,
        }),
        other => Err(refuse(
            stream,
            RefuseCode::ProtocolError,
            format!("expected AuthOk, got frame kind {}", other.kind()),
        )),
    }
}

/// How a replicated request ended on the peer: the data path's own
/// answer (`Done`, `Failed(errno)`, or `Lost` when the link went down
/// before the peer acknowledged).
pub type Remote = Peer;

/// Completion slot for one sequence number (or one Ping), for a thread
/// that waits for the answer.
pub struct Slot {
    outcome: Mutex<Option<Remote>>,
    changed: Condvar,
    /// The sequence number it answers (0: not a sequenced frame).
    seq: AtomicU64,
}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot {
            outcome: Mutex::new(None),
            changed: Condvar::new(),
            seq: AtomicU64::new(0),
        })
    }

    fn complete(&self, r: Remote) {
        let mut st = lock(&self.outcome);
        if st.is_none() {
            *st = Some(r);
        }
        drop(st);
        self.changed.notify_all();
    }

    pub fn outcome(&self) -> Option<Remote> {
        *lock(&self.outcome)
    }
}

/// What runs when both halves of a submitted frame are known: the peer's
/// answer (or `Lost`) and whether the local half succeeded; on the thread
/// that learned the last of them, inside its batch.
pub type Callback = Box<dyn FnOnce(Remote, bool, &mut Batch) + Send>;

/// Who learns the answer to a sequenced frame.
pub enum Waiter {
    /// A thread blocked in `wait`.
    Slot(Arc<Slot>),
    /// A submitted request, completed by whoever reads the answer.
    Call(Callback),
    /// Nobody (a barrier sent only to bound the transfer log).
    Nobody,
    /// A long-lived receiver of many answers, told which one by a tag
    /// (the resync's requests in flight: no allocation per request).
    Note(Arc<dyn Notify>, u64),
}

/// Receives the answers of requests submitted with `Waiter::Note`.
pub trait Notify: Send + Sync {
    fn notify(&self, tag: u64, r: Remote, batch: &mut Batch);
}

impl Waiter {
    fn complete(self, r: Remote, local_ok: bool, batch: &mut Batch) {
        match self {
            Waiter::Slot(s) => s.complete(r),
            Waiter::Call(f) => f(r, local_ok, batch),
            Waiter::Nobody => {}
            Waiter::Note(n, tag) => n.notify(tag, r, batch),
        }
    }
}

/// What a sequenced frame in flight means for durability on the peer:
/// a data frame (durable when sent with FUA) or a barrier.
pub type Track = Kind;

/// Frames waiting to be sent. Whoever finds nobody sending sends the
/// whole queue, in as few writes as it takes; meanwhile others append, so
/// under load many frames go out per system call (DRBD's sender batches
/// the same way).
struct Outbox {
    buf: BytesMut,
    sending: bool,
    /// Threads waiting for the send turn (see `Session::turn`).
    waiting: usize,
}

/// Bytes queued in the outbox past which submitters wait for the send
/// turn instead of appending.
const OUTBOX_MAX: usize = 8 << 20;

/// Bytes a burst's submissions hold back before they are sent anyway,
/// so the peer starts on the first writes while the rest are written
/// locally.
const DEFER_MAX: usize = 32 * 1024;

/// How a sequenced frame is queued.
#[derive(Clone, Copy, Default)]
pub struct Queue {
    /// Held back until `kick` (or `DEFER_MAX` bytes are queued): the
    /// caller has more frames to queue.
    pub defer: bool,
    /// The caller does the local half after queuing and reports it with
    /// `local_done`; the request completes when both halves are known.
    pub local_pending: bool,
}

/// Payloads at least this large are written straight from the caller's
/// buffer (after what is queued ahead of them) instead of copied, unless
/// another thread is sending at that moment.
const DIRECT_PAYLOAD: usize = 64 * 1024;

/// An established, authenticated connection to the peer.
///
/// Sending: every thread appends frames to one outbox; sequence numbers
/// are assigned there, so they follow wire order. Receiving: one thread
/// per role reads the link (the Primary's receiver, the Secondary's apply
/// loop) and completes what the frames answer; nobody else reads.
pub struct Session {
    outbox: Mutex<Outbox>,
    /// Signalled when the send turn is given up.
    turn: Condvar,
    writer: Mutex<Stream>,
    /// What this node receives: numbering, acks to send, flush groups
    /// (`core::datapath`). Kept here, not in the receive loop, so it
    /// continues when the roles swap within one session.
    pub receiving: Mutex<SecondaryPath>,
    /// Handles `State` and `SyncDone` frames, whichever thread reads them.
    hook: Hook,
    /// Requests for the peer's `State` awaiting their `ANSWER`, by token
    /// (see `expect_state`).
    state_waiters: Mutex<HashMap<u64, Arc<Slot>>>,
    next_token: AtomicU64,
    reader: Mutex<io::BufReader<Stream>>,
    ping_timeout: Duration,
    /// What this node sends: sequence numbers, requests awaiting their
    /// Acks, the transfer log (`core::datapath`).
    sending: Mutex<PrimaryPath<Waiter>>,
    /// What the end of the session left to mark out of sync: writes the
    /// peer applied but no barrier made durable, and writes lost in
    /// flight.
    lost_marks: Mutex<Vec<(u64, u64)>>,
    control: Stream,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    pub peer: String,
    /// The last Ping sent: its nonce, when, and its slot.
    ping: Mutex<Option<(u64, Instant, Arc<Slot>)>>,
    /// Round trip of the last answered Ping, in microseconds (0: none yet).
    rtt_us: AtomicU64,
    /// The Primary's receiver reads the link (more than one request is in
    /// flight); when clear, a lone request's submitter reads its own Ack.
    active: AtomicBool,
    park: Mutex<()>,
    park_cv: Condvar,
    /// Frames (kind, body) a submitter read that are the receiver's.
    stash: Mutex<Vec<(u16, Vec<u8>)>>,
    /// The Primary's receiver runs, so a submitter may read the link.
    primary_reading: AtomicBool,
    /// Unsequenced requests awaiting the peer's answer (online verify):
    /// the Primary's receiver keeps reading while there are any.
    awaiting: AtomicUsize,
    /// The receiver also keeps reading until this many milliseconds
    /// after `created` (the peer is sending requests, see `keep_reading`).
    linger_ms: AtomicU64,
    created: Instant,
    /// Feature bits agreed in the handshake.
    features: AtomicU64,
    /// Where the peer's `CsumReply` frames go (the resync in progress).
    csum_sink: Mutex<Option<Arc<dyn CsumSink>>>,
    /// A lone request's submitter polls for its Ack before it sleeps
    /// (see `read_own`; it adapts to how long the Acks take).
    spin: crate::net::SpinWindow,
}

/// Takes the peer's answers to `CsumQuery`.
pub trait CsumSink: Send + Sync {
    fn reply(&self, id: u64, digests: Vec<u128>);
}

/// What a session does with the peer's state frames.
pub type Hook = Box<dyn Fn(Frame) -> Result<(), LinkError> + Send + Sync>;

impl Session {
    pub fn new(
        stream: &Stream,
        peer: String,
        ping_timeout: Duration,
        hook: Hook,
    ) -> io::Result<Session> {
        Ok(Session {
            spin: crate::net::SpinWindow::new(crate::net::POLL_MAX),
            receiving: Mutex::new(SecondaryPath::new()),
            hook,
            state_waiters: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            outbox: Mutex::new(Outbox {
                buf: BytesMut::with_capacity(64 * 1024),
                sending: false,
                waiting: 0,
            }),
            turn: Condvar::new(),
            writer: Mutex::new(stream.try_clone()?),
            // Small enough that a frame header read does not first copy a
            // large write payload through the buffer.
            reader: Mutex::new(io::BufReader::with_capacity(32 * 1024, stream.try_clone()?)),
            ping_timeout,
            sending: Mutex::new(PrimaryPath::new()),
            lost_marks: Mutex::new(Vec::new()),
            control: stream.try_clone()?,
            failed: AtomicBool::new(false),
            ping: Mutex::new(None),
            rtt_us: AtomicU64::new(0),
            reason: Mutex::new(None),
            peer,
            active: AtomicBool::new(false),
            park: Mutex::new(()),
            park_cv: Condvar::new(),
            stash: Mutex::new(Vec::new()),
            primary_reading: AtomicBool::new(false),
            awaiting: AtomicUsize::new(0),
            linger_ms: AtomicU64::new(0),
            created: Instant::now(),
            features: AtomicU64::new(0),
            csum_sink: Mutex::new(None),
        })
    }

    /// On the Primary, after queuing request `seq`: at queue depth 1 the
    /// submitter reads the link itself until `seq` is answered (one thread
    /// from request to reply, no wake-up); at depth, it leaves the Acks to
    /// the receiver and returns at once. With `watch` (the client's socket,
    /// whose next request the submitter reads itself), it reads only until
    /// that socket becomes readable, and then leaves its Ack to the
    /// receiver too.
    pub fn after_submit(&self, seq: u64, timeout: Duration, watch: Option<RawFd>) {
        if self.primary_reading.load(Ordering::SeqCst)
            && !self.active.load(Ordering::SeqCst)
            && self.in_flight() == 1
        {
            if let Ok(mut reader) = self.reader.try_lock() {
                self.read_own(&mut reader, seq, timeout, watch);
                return;
            }
        }
        self.activate();
    }

    /// An unsequenced request now awaits the peer's answer: the
    /// receiver reads the link until `answered`.
    pub fn awaiting_answer(&self) {
        self.awaiting.fetch_add(1, Ordering::SeqCst);
        self.activate();
    }

    /// The answer announced by `awaiting_answer` came (or is given up).
    pub fn answered(&self) {
        let _ = self
            .awaiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// The peer sends requests that this node answers (online verify):
    /// the receiver keeps reading for `d` more, so the next one is not
    /// left until its next tick.
    pub fn keep_reading(&self, d: Duration) {
        let until = (self.created.elapsed() + d).as_millis() as u64;
        self.linger_ms.fetch_max(until, Ordering::Relaxed);
        self.activate();
    }

    /// Records the feature bits agreed in the handshake.
    pub fn set_features(&self, features: u64) {
        self.features.store(features, Ordering::SeqCst);
    }

    /// Whether both sides offered `feature` (a `repl::features` bit).
    pub fn has_feature(&self, feature: u64) -> bool {
        self.features.load(Ordering::SeqCst) & feature == feature
    }

    /// Sends the peer's `CsumReply` frames to `sink` (or nowhere).
    pub fn set_csum_sink(&self, sink: Option<Arc<dyn CsumSink>>) {
        *lock(&self.csum_sink) = sink;
    }

    /// Wakes the receiver to read the link.
    pub fn activate(&self) {
        if !self.active.swap(true, Ordering::SeqCst) {
            let _g = lock(&self.park);
            self.park_cv.notify_all();
        }
    }

    /// Whether the receiver should be reading, clearing the flag when
    /// nothing is in flight (re-checked after clearing, so a request
    /// submitted meanwhile is never left unread).
    pub fn stay_active(&self) -> bool {
        let busy = || {
            self.in_flight() > 0
                || self.awaiting.load(Ordering::SeqCst) > 0
                || (self.linger_ms.load(Ordering::Relaxed) > 0
                    && self.created.elapsed().as_millis() as u64
                        <= self.linger_ms.load(Ordering::Relaxed))
        };
        if busy() {
            return true;
        }
        self.active.store(false, Ordering::SeqCst);
        if busy() {
            self.active.store(true, Ordering::SeqCst);
            return true;
        }
        false
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    /// Parks the idle receiver until activated or `tick` passes.
    pub fn park(&self, tick: Duration) {
        let g = lock(&self.park);
        if !self.active.load(Ordering::SeqCst) && self.is_alive() {
            let _ = self.park_cv.wait_timeout(g, tick);
        }
    }

    /// Frames (kind, body) a submitter read for the receiver.
    pub fn take_stash(&self) -> Vec<(u16, Vec<u8>)> {
        std::mem::take(&mut *lock(&self.stash))
    }

    /// The Primary's receiver starts or stops: submitters may read their
    /// own Acks only while it runs.
    pub fn set_primary_reading(&self, on: bool) {
        self.primary_reading.store(on, Ordering::SeqCst);
    }

    /// Reads frames until `seq` is answered: Acks and Pongs are handled
    /// here, anything else (a `State` whose handling may write metadata)
    /// is left to the receiver, and so is the rest once `watch` becomes
    /// readable.
    fn read_own(
        &self,
        reader: &mut io::BufReader<Stream>,
        seq: u64,
        timeout: Duration,
        watch: Option<RawFd>,
    ) {
        let deadline = Instant::now() + timeout;
        let fd = reader.get_ref().as_raw_fd();
        let both = [fd, watch.unwrap_or(fd)];
        let fds = if watch.is_some() {
            &both[..]
        } else {
            &both[..1]
        };
        let mut batch = Batch::default();
        let mut body = Vec::new();
        let mut spun = false;
        let mut polled = None;
        while self.is_alive() && lock(&self.sending).is_pending(seq) {
            // Another request went out meanwhile: the receiver is awake
            // and takes over (ours included) once we let go.
            if self.active.load(Ordering::SeqCst) && reader.buffer().is_empty() {
                break;
            }
            if reader.buffer().is_empty() {
                batch.run();
                if !spun {
                    polled = Some(self.spin.poll(fds));
                    spun = true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.fail(&format!("peer did not acknowledge within {timeout:?}"));
                    break;
                }
                let ready = match reader.get_ref().has_buffered() {
                    true => Some(0),
                    false => {
                        crate::net::wait_any_readable(fds, left.min(Duration::from_millis(50)))
                    }
                };
                match ready {
                    None => continue,
                    Some(0) => {}
                    Some(_) => {
                        // The client's next request is in: its reader
                        // must not wait for this Ack, the receiver reads it.
                        self.activate();
                        break;
                    }
                }
            }
            let kind = match read_raw(reader, &mut body) {
                Ok(kind) => kind,
                Err(e) => {
                    let why = self.describe(e);
                    self.fail(&why);
                    break;
                }
            };
            if let Some(since) = polled.take() {
                self.spin.waited(since);
            }
            if kind != repl::kind::ACK {
                // Not ours to handle: the receiver takes it (and whatever
                // follows) from here.
                lock(&self.stash).push((kind, std::mem::take(&mut body)));
                self.activate();
                break;
            }
            let handled = match Frame::decode_body(kind, &body) {
                Ok(Frame::Ack { seq, status }) => self.acknowledge(seq, status, &mut batch),
                Ok(_) => Ok(()),
                Err(e) => Err(LinkError::Protocol(e.to_string())),
            };
            if let Err(e) = handled {
                let why = self.describe(e);
                self.fail(&why);
            }
        }
        batch.run();
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
    /// reader), and completes every pending request as `Lost`.
    pub fn fail(&self, why: &str) {
        if self.failed.swap(true, Ordering::SeqCst) {
            return;
        }
        *lock(&self.reason) = Some(why.to_owned());
        self.control.shutdown(Shutdown::Both);
        self.lose_in_flight();
        if let Some((_, _, slot)) = lock(&self.ping).as_ref() {
            slot.complete(Remote::Lost);
        }
        // No answer to a State request can come any more.
        let waiters: Vec<_> = lock(&self.state_waiters).drain().map(|(_, s)| s).collect();
        for s in waiters {
            s.complete(Remote::Lost);
        }
        self.active.store(true, Ordering::SeqCst);
        let _g = lock(&self.park);
        self.park_cv.notify_all();
    }

    pub fn reason(&self) -> Option<String> {
        lock(&self.reason).clone()
    }

    /// Ends the sending side: every request in flight completes as
    /// lost; what must be marked out of sync is kept for `take_unstable`.
    fn lose_in_flight(&self) {
        let lost = {
            let mut p = lock(&self.sending);
            if p.is_lost() {
                return;
            }
            p.lost()
        };
        {
            let mut marks = lock(&self.lost_marks);
            marks.extend(lost.unstable);
            marks.extend(lost.running);
        }
        let mut batch = Batch::default();
        for c in lost.completions {
            c.token.complete(Remote::Lost, c.local_ok, &mut batch);
        }
        batch.run();
    }

    /// Requests in flight (sequenced frames not yet completed).
    pub fn in_flight(&self) -> usize {
        lock(&self.sending).pending()
    }

    /// Queues a sequenced frame: `head` gets the sequence number and
    /// encodes the frame (for a write, all but the payload, which
    /// follows). Gives the waiter back if the session is already down.
    fn send_sequenced(
        &self,
        track: Track,
        waiter: Waiter,
        head: impl FnOnce(&mut BytesMut, u64),
        payload: &[u8],
        queue: Queue,
    ) -> Result<u64, Waiter> {
        let Queue {
            defer,
            local_pending,
        } = queue;
        let mut ob = lock(&self.outbox);
        let direct = payload.len() >= DIRECT_PAYLOAD;
        // A large payload waits for the send turn rather than being
        // copied into the outbox; so does anything once the outbox is full
        // (a peer slower than the clients must slow them down, not grow
        // the queue). The number is taken after the wait, so numbers still
        // follow wire order.
        while (direct || ob.buf.len() >= OUTBOX_MAX) && ob.sending && self.is_alive() {
            ob.waiting += 1;
            ob = self
                .turn
                .wait_timeout(ob, Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            ob.waiting -= 1;
        }
        let seq = {
            let mut p = lock(&self.sending);
            if p.is_lost() {
                return Err(waiter);
            }
            if let Waiter::Slot(slot) = &waiter {
                slot.seq.store(p.next_seq(), Ordering::Relaxed);
            }
            // Numbered under the outbox lock: numbers follow wire order.
            let seq = match track {
                Track::Data {
                    offset,
                    len,
                    durable,
                } => p.submit(waiter, offset, len, durable),
                Track::Barrier => p.barrier(waiter),
            };
            // Unless the caller reports its local half later (`local_done`),
            // it did it before or does it while it waits: the request
            // completes with the peer's answer.
            if !local_pending {
                let _ = p.local_done(seq, true);
            }
            seq
        };
        if direct && !ob.sending {
            // A large payload is written from the caller's buffer, after
            // whatever is queued ahead of it, in one writev: no copy.
            ob.sending = true;
            let queued = std::mem::take(&mut ob.buf);
            drop(ob);
            let mut h = BytesMut::with_capacity(64);
            head(&mut h, seq);
            let sent = write_all_vectored(
                &mut *lock(&self.writer),
                &mut [
                    IoSlice::new(&queued),
                    IoSlice::new(&h),
                    IoSlice::new(payload),
                ],
            );
            self.sent(sent);
        } else {
            head(&mut ob.buf, seq);
            ob.buf.extend_from_slice(payload);
            // Deferred: the caller has more to queue and `kick`s after
            // (unless the outbox is full).
            if ob.sending || (defer && ob.buf.len() < DEFER_MAX) {
                return Ok(seq);
            }
            ob.sending = true;
            drop(ob);
            self.sent(Ok(()));
        }
        Ok(seq)
    }

    /// Sends what deferred submissions queued, unless another thread is
    /// sending already (it sends them too).
    pub fn kick(&self) {
        let mut ob = lock(&self.outbox);
        if ob.sending || ob.buf.is_empty() {
            return;
        }
        ob.sending = true;
        drop(ob);
        self.sent(Ok(()));
    }

    /// Queues unsequenced bytes (acks, pings, state) and sends them
    /// unless another thread is sending already.
    fn send_unsequenced(&self, encode: impl FnOnce(&mut BytesMut)) {
        let mut ob = lock(&self.outbox);
        encode(&mut ob.buf);
        if ob.sending {
            return;
        }
        ob.sending = true;
        drop(ob);
        self.sent(Ok(()));
    }

    /// Called by the thread that holds the send turn: reports a failed
    /// write, else sends whatever was queued meanwhile until the outbox
    /// is empty, then gives up the turn.
    fn sent(&self, mut result: io::Result<()>) {
        let mut chunk = BytesMut::new();
        loop {
            if let Err(e) = result {
                let mut ob = lock(&self.outbox);
                ob.buf.clear();
                ob.sending = false;
                if ob.waiting > 0 {
                    self.turn.notify_all();
                }
                drop(ob);
                self.fail(&format!("sending to peer: {e}"));
                return;
            }
            {
                let mut ob = lock(&self.outbox);
                if ob.buf.is_empty() {
                    ob.sending = false;
                    if ob.waiting > 0 {
                        self.turn.notify_all();
                    }
                    // Keep a moderate buffer for the next batch.
                    if chunk.capacity() > ob.buf.capacity() && chunk.capacity() <= 1 << 20 {
                        chunk.clear();
                        std::mem::swap(&mut chunk, &mut ob.buf);
                    }
                    return;
                }
                chunk.clear();
                std::mem::swap(&mut chunk, &mut ob.buf);
            }
            result = if self.failed.load(Ordering::SeqCst) {
                Err(io::Error::new(io::ErrorKind::NotConnected, "session ended"))
            } else {
                lock(&self.writer).write_all(&chunk)
            };
        }
    }

    /// Sends a data frame for the resync or a durable write; returns the
    /// slot its Ack completes, or `None` if the session is down.
    pub fn send_write(&self, offset: u64, flags: u32, payload: &[u8]) -> Option<Arc<Slot>> {
        let slot = Slot::new();
        self.submit_write(
            offset,
            flags,
            payload,
            Waiter::Slot(slot.clone()),
            Queue::default(),
        )
        .ok()
        .map(|_| slot)
    }

    /// Queues a data frame whose Ack completes `waiter`.
    fn submit_write(
        &self,
        offset: u64,
        flags: u32,
        payload: &[u8],
        waiter: Waiter,
        queue: Queue,
    ) -> Result<u64, Waiter> {
        let track = Track::Data {
            offset,
            len: payload.len() as u64,
            durable: flags & repl::data_flags::FUA != 0,
        };
        let crc = replblk_proto::crc32c(payload);
        self.send_sequenced(
            track,
            waiter,
            |buf, seq| repl::WriteRef::encode_head(buf, seq, offset, flags, crc, payload.len()),
            payload,
            queue,
        )
    }

    /// Queues the frame of a modification without FUA (write, trim,
    /// write-zeroes) whose Ack completes `waiter`; `defer` holds it back
    /// until `kick`.
    pub fn submit_modify(
        &self,
        op: Modify<'_>,
        waiter: Waiter,
        queue: Queue,
    ) -> Result<u64, Waiter> {
        let (offset, len) = op.range();
        let track = Track::plain(offset, len);
        match op {
            Modify::Write { buf, .. } => self.submit_write(offset, 0, buf, waiter, queue),
            Modify::Trim { .. } => self.submit_frame(track, waiter, queue, |seq| Frame::Trim {
                seq,
                offset,
                length: len,
                flags: 0,
            }),
            Modify::WriteZeroes { may_unmap, .. } => {
                let flags = if may_unmap {
                    0
                } else {
                    repl::data_flags::NO_HOLE
                };
                self.submit_frame(track, waiter, queue, |seq| Frame::WriteZeroes {
                    seq,
                    offset,
                    length: len,
                    flags,
                })
            }
        }
    }

    /// `submit_modify` for a thread that waits: returns the slot the Ack
    /// completes, or `None` if the session is down.
    pub fn send_modify(&self, op: Modify<'_>) -> Option<Arc<Slot>> {
        let slot = Slot::new();
        self.submit_modify(op, Waiter::Slot(slot.clone()), Queue::default())
            .ok()
            .map(|_| slot)
    }

    /// Queues a frame built here with its sequence number.
    pub fn submit_frame(
        &self,
        track: Track,
        waiter: Waiter,
        queue: Queue,
        make: impl FnOnce(u64) -> Frame,
    ) -> Result<u64, Waiter> {
        self.send_sequenced(track, waiter, |buf, seq| make(seq).encode(buf), &[], queue)
    }

    /// Sends a frame that carries a sequence number chosen here; returns
    /// the slot its Ack completes, or `None` if the session is down.
    pub fn send_frame(&self, track: Track, make: impl FnOnce(u64) -> Frame) -> Option<Arc<Slot>> {
        let slot = Slot::new();
        self.submit_frame(track, Waiter::Slot(slot.clone()), Queue::default(), make)
            .ok()
            .map(|_| slot)
    }

    /// Data frames acknowledged but not yet made durable by a barrier.
    pub fn unstable_count(&self) -> usize {
        lock(&self.sending).unstable_len()
    }

    /// After the session failed: the ranges to mark out of sync, the
    /// transfer log (acknowledged data frames no barrier made durable)
    /// and writes lost in flight.
    pub fn take_unstable(&self) -> Vec<(u64, u64)> {
        self.lose_in_flight();
        std::mem::take(&mut *lock(&self.lost_marks))
    }

    /// Sends bytes holding whole unsequenced frames (batched acks).
    pub fn send_raw(&self, bytes: &[u8]) {
        self.send_unsequenced(|buf| buf.extend_from_slice(bytes));
    }

    /// Sends an unsequenced frame (Ack, Ping, Pong, State).
    pub fn send_control(&self, frame: &Frame) {
        self.send_unsequenced(|buf| frame.encode(buf));
    }

    /// Completes the request `seq` with the peer's answer; callbacks run
    /// inside `batch`.
    pub fn acknowledge(&self, seq: u64, status: u32, batch: &mut Batch) -> Result<(), LinkError> {
        let done = lock(&self.sending)
            .ack(seq, status)
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        if let Some(c) = done {
            c.token.complete(c.peer, c.local_ok, batch);
        }
        Ok(())
    }

    /// The local half of `seq` (submitted with `local_pending`) finished:
    /// completes the request if the peer's half is known already.
    pub fn local_done(&self, seq: u64, ok: bool, batch: &mut Batch) {
        let done = lock(&self.sending).local_done(seq, ok);
        if let Some(c) = done {
            c.token.complete(c.peer, c.local_ok, batch);
        }
    }

    /// Frames the Primary receives: Acks complete requests (inside
    /// `batch`), pings are answered, anything else ends the session.
    pub fn handle_incoming(&self, frame: Frame, batch: &mut Batch) -> Result<(), LinkError> {
        match frame {
            Frame::Ack { seq, status } => self.acknowledge(seq, status, batch),
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
            f @ (Frame::SyncDone { .. }
            | Frame::VerifyRequest { .. }
            | Frame::VerifyReply { .. }
            | Frame::OutOfSync { .. }
            | Frame::Invalidate
            | Frame::ReadRequest { .. }
            | Frame::ReadReply { .. }
            | Frame::CsumQuery { .. }) => (self.hook)(f),
            Frame::CsumReply { id, digests, .. } => {
                let sink = lock(&self.csum_sink).clone();
                match sink {
                    Some(s) => {
                        s.reply(id, digests);
                        Ok(())
                    }
                    None => Err(LinkError::Protocol(format!(
                        "a checksum reply ({id}) when no checksum query is waiting"
                    ))),
                }
            }
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

    /// Waits for a slot, which the thread reading the link completes.
    /// After `timeout` the peer counts as lost, with `what` as the reason.
    pub fn wait_for(&self, slot: &Slot, timeout: Duration, what: &str) -> Remote {
        let seq = slot.seq.load(Ordering::Relaxed);
        if slot.outcome().is_some() {
            return self.await_slot(slot, timeout, what);
        }
        if seq != 0 {
            self.after_submit(seq, timeout, None);
            return self.await_slot(slot, timeout, what);
        }
        // An answer to a `State` is not counted in flight: without this
        // the Primary's receiver would read what is there, find nothing in
        // flight, park, and read the answer only at its next tick.
        self.awaiting_answer();
        let outcome = self.await_slot(slot, timeout, what);
        self.answered();
        outcome
    }

    fn await_slot(&self, slot: &Slot, timeout: Duration, what: &str) -> Remote {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&slot.outcome);
        loop {
            if let Some(r) = *st {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                self.fail(what);
                return slot.outcome().unwrap_or(Remote::Lost);
            }
            st = slot
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
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

    /// Forgets a `State` request whose answer is no longer awaited.
    pub fn forget_state(&self, token: u64) {
        lock(&self.state_waiters).remove(&token);
    }

    /// The read side, unless a submitter is reading its own Ack.
    pub fn try_reader(&self) -> Option<MutexGuard<'_, io::BufReader<Stream>>> {
        self.reader.try_lock().ok()
    }

    /// Exclusive access to the read side (the Secondary's apply loop).
    pub fn reader(&self) -> MutexGuard<'_, io::BufReader<Stream>> {
        lock(&self.reader)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use replblk_proto::repl::{WriteFrame, WriteRef};

    /// Frames of several sizes read one after another into one reused
    /// buffer: each Write's payload starts on a 4 KiB boundary and reads
    /// back whole, and the other frames decode as sent.
    #[test]
    fn placed_frames_put_each_payload_on_the_boundary_and_read_back_whole() {
        let sizes = [4096usize, 1 << 20, 12288, 64 << 10, 4096, 2 << 20];
        let mut wire = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
            let frame = Frame::Write(WriteFrame::new(i as u64, 0, 0, Bytes::from(payload)));
            let mut out = BytesMut::new();
            frame.encode(&mut out);
            wire.extend_from_slice(&out);
            write_frame(
                &mut wire,
                &Frame::Barrier {
                    seq: 100 + i as u64,
                },
            )
            .unwrap();
        }
        let mut stream = io::Cursor::new(wire);
        let mut buf = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let (kind, start) =
                read_raw_placed(&mut stream, &mut buf, WriteFrame::FIXED, 4096).unwrap();
            assert_eq!(kind, repl::kind::WRITE);
            let w = WriteRef::decode_body(&buf[start..]).unwrap();
            assert_eq!((w.seq, w.payload.len()), (i as u64, n));
            assert_eq!(w.payload.as_ptr() as usize % 4096, 0, "frame {i}");
            assert!(w.crc_ok(), "frame {i}");
            let (kind, start) =
                read_raw_placed(&mut stream, &mut buf, WriteFrame::FIXED, 4096).unwrap();
            assert_eq!(
                Frame::decode_body(kind, &buf[start..]).unwrap(),
                Frame::Barrier {
                    seq: 100 + i as u64
                }
            );
        }
    }
}
