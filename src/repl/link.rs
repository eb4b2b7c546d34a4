//! The peer link: frame I/O over a TCP stream, the authenticated handshake,
//! and an established session (sending side, pending acknowledgements,
//! failure).

use crate::sync::lock;
use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
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

/// Completion slot for one sequence number.
pub struct Slot {
    outcome: Mutex<Option<Remote>>,
    done: Condvar,
}

impl Slot {
    fn new() -> Arc<Slot> {
        Arc::new(Slot {
            outcome: Mutex::new(None),
            done: Condvar::new(),
        })
    }

    fn complete(&self, r: Remote) {
        let mut o = lock(&self.outcome);
        if o.is_none() {
            *o = Some(r);
        }
        drop(o);
        self.done.notify_all();
    }
}

struct Pending {
    alive: bool,
    slots: HashMap<u64, Arc<Slot>>,
}

struct Sender {
    stream: TcpStream,
    next_seq: u64,
}

/// An established, authenticated connection to the peer.
pub struct Session {
    sender: Mutex<Sender>,
    pending: Mutex<Pending>,
    control: TcpStream,
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
    pub peer: String,
}

impl Session {
    pub fn new(stream: &TcpStream, peer: String) -> io::Result<Session> {
        Ok(Session {
            sender: Mutex::new(Sender {
                stream: stream.try_clone()?,
                next_seq: 1,
            }),
            pending: Mutex::new(Pending {
                alive: true,
                slots: HashMap::new(),
            }),
            control: stream.try_clone()?,
            failed: AtomicBool::new(false),
            reason: Mutex::new(None),
            peer,
        })
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
            p.slots.drain().map(|(_, s)| s).collect()
        };
        for s in slots {
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
        self.send_sequenced(|stream, seq| {
            let mut head = BytesMut::with_capacity(FrameHeader::LEN + repl::WriteFrame::FIXED);
            repl::WriteRef::encode_head(&mut head, seq, offset, flags, crc, payload.len());
            write_all_vectored(stream, &mut [IoSlice::new(&head), IoSlice::new(payload)])
        })
    }

    /// Sends a frame that carries a sequence number chosen here.
    pub fn send_frame(&self, make: impl FnOnce(u64) -> Frame) -> Option<Arc<Slot>> {
        self.send_sequenced(|stream, seq| write_frame(stream, &make(seq)))
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
        let slot = lock(&self.pending).slots.remove(&seq);
        match slot {
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

    /// Waits for a slot; after `timeout` the peer counts as lost.
    pub fn wait(&self, slot: &Slot, timeout: Duration) -> Remote {
        let mut o = lock(&slot.outcome);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(r) = *o {
                return r;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                drop(o);
                self.fail(&format!("peer did not acknowledge within {timeout:?}"));
                return lock(&slot.outcome).unwrap_or(Remote::Lost);
            }
            o = slot
                .done
                .wait_timeout(o, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}
