//! The peer link loop: connecting with backoff, the authenticated
//! handshake and state exchange, and the session's role modes (the
//! Primary's receiver, the Secondary's pinger).

use super::*;
use crate::net::Stream;
use crate::tls::TlsStream;
use replblk_proto::repl::RefuseCode;

impl Replica {
    /// `State` and `SyncDone` frames from the peer (any reading thread).
    fn on_peer_frame(&self, frame: Frame) -> Result<(), LinkError> {
        match frame {
            Frame::State(st) => {
                let fx = self
                    .step(Event::PeerStateChanged {
                        role: role_from_wire(st.role),
                        disk: disk_from_wire(st.disk),
                    })
                    .map_err(LinkError::Protocol)?;
                {
                    // Under the gate, so a promote of ours either started
                    // before this (and the answer says PROMOTING) or sees
                    // the peer's announcement and is refused.
                    let mut gate = lock(&self.gate);
                    gate.peer_promoting = st.state_flags & state_flags::PROMOTING != 0;
                    if st.state_flags & state_flags::REPLY != 0 {
                        if let Some(s) = self.current_session() {
                            let answer =
                                self.build_state(gate.promoting, state_flags::ANSWER, st.token);
                            s.send_control(&Frame::State(answer));
                        }
                    }
                }
                self.effects(&fx);
                Ok(())
            }
            Frame::CsumQuery {
                id,
                offset,
                length,
                block,
                ..
            } => self.answer_csum_query(id, offset, length, block),
            Frame::SyncDone { current } => {
                // The sync's cleared bits on disk before the end is
                // recorded (see `persist_bitmap_at_sync_end`).
                let target = lock(&self.inner)
                    .node
                    .as_ref()
                    .is_some_and(|n| n.repl() == ReplState::SyncTarget);
                if target {
                    lock(&self.oos).clear_range(0, u64::MAX);
                    self.persist_bitmap_at_sync_end(true);
                }
                let fx = self
                    .step(Event::SyncDone { current })
                    .map_err(LinkError::Protocol)?;
                lock(&self.oos).clear_range(0, u64::MAX);
                self.effects(&fx);
                Ok(())
            }
            Frame::VerifyRequest {
                id,
                offset,
                length,
                block,
            } => {
                if let Some(s) = self.current_session() {
                    self.on_verify_request(&s, id, offset, length, block);
                }
                Ok(())
            }
            Frame::VerifyReply {
                id,
                status,
                digests,
            } => self.on_verify_reply(id, status, &digests),
            Frame::OutOfSync { offset, length } => {
                self.on_out_of_sync(offset, length);
                Ok(())
            }
            Frame::Invalidate => {
                self.on_invalidate_request();
                Ok(())
            }
            Frame::ReadRequest { id, offset, length } => {
                if let Some(s) = self.current_session() {
                    self.on_read_request(&s, id, offset, length);
                }
                Ok(())
            }
            Frame::ReadReply { id, status, data } => {
                self.on_read_reply(id, status, data);
                Ok(())
            }
            other => Err(LinkError::Protocol(format!(
                "unexpected frame kind {}",
                other.kind()
            ))),
        }
    }

    fn set_link_error(&self, error: String) {
        lock(&self.inner).last_error = Some(error);
    }

    /// Whether the link thread should be connecting now.
    fn wants_link(&self) -> bool {
        lock(&self.inner)
            .node
            .as_ref()
            .is_some_and(|n| n.conn() != ConnState::StandAlone)
    }

    /// Sleeps up to `d` or until woken, returning true when stopping.
    fn pause(&self, d: Duration) -> bool {
        let g = lock(&self.wake_lock);
        if self.stopping.load(Ordering::SeqCst) {
            return true;
        }
        let _ = self.wake_cv.wait_timeout(g, d);
        self.stopping.load(Ordering::SeqCst)
    }

    pub(super) fn manage_link(self: Arc<Self>) {
        let Some(cfg) = self.peer.clone() else {
            return;
        };
        let min_backoff = Duration::from_millis(100);
        let max_backoff = Duration::from_millis(cfg.timing.reconnect_max_ms);
        let mut backoff = min_backoff;
        let mut last_logged: Option<String> = None;
        while !self.stopping.load(Ordering::SeqCst) {
            if !self.wants_link() {
                if self.pause(Duration::from_secs(1)) {
                    break;
                }
                continue;
            }
            match self.establish(&cfg) {
                Ok(Some((stream, features))) => {
                    last_logged = None;
                    backoff = min_backoff;
                    self.run_session(&cfg, stream, features);
                }
                Ok(None) => {}
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
                    self.set_link_error(msg);
                    self.emit_if_changed();
                    // The first retry waits the minimum, each next one
                    // twice as long up to the cap; after a refusal, the
                    // cap at once (the peer will not change its mind
                    // quickly).
                    let delay = if e.is_refusal() { max_backoff } else { backoff };
                    backoff = (delay * 2).min(max_backoff);
                    if self.pause(jitter(delay)) {
                        break;
                    }
                }
            }
        }
    }

    /// Dials or accepts one connection, authenticates it, exchanges state
    /// and takes the sync decision. `Ok(None)`: the decision (or the
    /// operator) says not to run a session.
    fn establish(&self, cfg: &PeerConfig) -> Result<Option<(Stream, u64)>, LinkError> {
        let timeout = Duration::from_millis(cfg.timing.connect_timeout_ms);
        // The dialer connects and runs the handshakes here; the listener
        // takes a connection its acceptor already secured and
        // authenticated.
        let (dialed, accepted) = match &self.listener {
            None => (
                Some(
                    TcpStream::connect_timeout(&cfg.peer_address, timeout).map_err(|e| {
                        LinkError::Io(io::Error::new(
                            e.kind(),
                            format!(
                                "connecting to {} at {}: {e}",
                                cfg.peer_node, cfg.peer_address
                            ),
                        ))
                    })?,
                ),
                None,
            ),
            Some(_) => match self.next_incoming() {
                Some(authenticated) => (None, Some(authenticated)),
                None => return Ok(None),
            },
        };
        if self.stopping.load(Ordering::SeqCst) {
            return Err(LinkError::Protocol("shutting down".into()));
        }
        if !self.wants_link() {
            if let Some(t) = &dialed {
                let _ = t.shutdown(Shutdown::Both);
            }
            if let Some((s, _)) = &accepted {
                s.shutdown(Shutdown::Both);
            }
            return Ok(None);
        }
        let dialer = dialed.is_some();
        let (mut stream, agreed) = match (dialed, accepted) {
            (_, Some((stream, agreed))) => (stream, agreed),
            (Some(mut tcp), None) => {
                prepare(&mut tcp, timeout)?;
                let mut stream = secure(cfg, tcp, true, timeout)?;
                let agreed = link::handshake(&mut stream, cfg, &self.name, self.size(), true)?;
                (stream, agreed)
            }
            (None, None) => return Ok(None),
        };
        let _t = lock(&self.transition);
        let theirs = link::exchange_state(&mut stream, self.state_frame(0, 0), timeout)?;
        lock(&self.gate).peer_promoting = false;
        let peer = PeerInfo {
            role: role_from_wire(theirs.role),
            disk: disk_from_wire(theirs.disk),
            uuids: UuidView {
                gens: Generations {
                    current: theirs.current,
                    bitmap: theirs.bitmap,
                    history: theirs.history,
                },
                flags: theirs.md_flags,
                dirty_bits: theirs.dirty_bits,
            },
            discard_my_data: theirs.state_flags & state_flags::DISCARD_MY_DATA != 0,
        };
        let dirty = lock(&self.oos).count();
        let fx = self
            .step(Event::PeerConnected {
                peer,
                local_dials: dialer,
                local_dirty_bits: dirty,
            })
            .map_err(LinkError::Protocol)?;
        let (verdict, source, target) = {
            let inner = lock(&self.inner);
            let node = inner.node.as_ref();
            (
                node.and_then(|n| n.last_verdict()),
                node.is_some_and(|n| n.repl() == ReplState::SyncSource),
                node.is_some_and(|n| n.repl() == ReplState::SyncTarget),
            )
        };
        let full = verdict.is_some_and(|v| v.decision.is_full());
        if full {
            // Both sides know the sync is full: nothing to exchange.
            if source {
                lock(&self.oos).set_all();
                // On disk before the sync starts: a crash must not forget it.
                self.persist_bitmap();
            }
        } else if fx.drop_link.is_none() && (source || target) {
            // A bitmap-based sync covers what either side marked: both
            // send their bitmap and merge the peer's.
            let (ours, bits) = {
                let oos = lock(&self.oos);
                (oos.to_bytes(), oos.blocks())
            };
            match exchange::exchange(&stream, &ours, bits) {
                Ok(theirs) => {
                    {
                        let mut oos = lock(&self.oos);
                        let before = oos.count();
                        oos.merge_bytes(&theirs);
                        tracing::info!(
                            resource = %self.name, peer = %cfg.peer_node,
                            local_blocks = before, peer_blocks = theirs.iter().map(|b| u64::from(b.count_ones())).sum::<u64>(),
                            union_blocks = oos.count(),
                            "bitmaps exchanged: the resync covers the union of both"
                        );
                    }
                    // The peer's marks on disk too before the sync starts.
                    self.persist_bitmap();
                }
                Err(e) => {
                    let reason = format!("bitmap exchange failed: {e}");
                    let _ = self.step(Event::PeerLost {
                        reason: reason.clone(),
                    });
                    stream.shutdown(Shutdown::Both);
                    return Err(LinkError::Protocol(reason));
                }
            }
        }
        if let Some(v) = verdict {
            tracing::info!(
                resource = %self.name, peer = %cfg.peer_node,
                "sync decision: {:?} by rule {} ({:?}: {})",
                v.decision, v.rule.number(), v.rule, v.rule.describe()
            );
        }
        if let Some(reason) = fx.drop_link {
            stream.shutdown(Shutdown::Both);
            self.set_link_error(reason);
            return Ok(None);
        }
        tracing::info!(
            resource = %self.name, peer = %cfg.peer_node,
            addr = %stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            tls = matches!(stream, Stream::Tls(_)),
            version = agreed.version, "peer connected"
        );
        self.fence(crate::core::fence::FenceEvent::PeerConnected);
        Ok(Some((stream, agreed.features)))
    }

    fn run_session(self: &Arc<Self>, cfg: &PeerConfig, stream: Stream, features: u64) {
        let ping_timeout = Duration::from_millis(cfg.timing.ping_timeout_ms);
        let weak: Weak<Replica> = Arc::downgrade(self);
        let hook: link::Hook = Box::new(move |frame| match weak.upgrade() {
            Some(r) => r.on_peer_frame(frame),
            None => Ok(()),
        });
        // Silence for ping_timeout on read, or a peer that stops draining
        // our writes for as long, ends the session.
        let setup = stream
            .set_read_timeout(Some(ping_timeout))
            .and_then(|_| stream.set_write_timeout(Some(ping_timeout)))
            .and_then(|_| Session::new(&stream, cfg.peer_node.clone(), ping_timeout, hook));
        let session = match setup {
            Ok(s) => Arc::new(s),
            Err(e) => {
                let _ = self.step(Event::PeerLost {
                    reason: e.to_string(),
                });
                return;
            }
        };
        session.set_features(features);
        *lock(&self.session) = Some(session.clone());
        if self.stopping.load(Ordering::SeqCst) {
            session.fail("shutting down");
        }
        let is_source = lock(&self.inner)
            .node
            .as_ref()
            .is_some_and(|n| n.repl() == ReplState::SyncSource);
        let resync = if is_source {
            let (me, s) = (self.clone(), session.clone());
            std::thread::Builder::new()
                .name(format!("resync-{}", self.name))
                .spawn(move || me.resync(&s))
                .map_err(|e| tracing::error!(resource = %self.name, "cannot start the resync: {e}"))
                .ok()
        } else {
            None
        };
        let reason = loop {
            if !session.is_alive() {
                break session.reason().unwrap_or_else(|| "shutting down".into());
            }
            let role = self.role();
            self.set_mode(Some(role));
            // The peer may have seen an older state during the exchange.
            self.send_state(&session, 0, 0);
            let end = match role {
                Role::Primary => self.primary_mode(cfg, &session),
                Role::Secondary => self.secondary_mode(cfg, &session),
            };
            match end {
                ModeEnd::RoleChanged => continue,
                ModeEnd::Over(why) => break why,
            }
        };
        self.set_mode(None);
        lock(&self.gate).peer_promoting = false;
        session.fail(&reason);
        // The resync thread clears ranges it saw acknowledged: it must be
        // gone before those ranges are marked again below.
        if let Some(r) = resync {
            let _ = r.join();
        }
        let unstable = session.take_unstable();
        if !unstable.is_empty() {
            let bytes: u64 = unstable.iter().map(|r| r.1).sum();
            for (offset, len) in &unstable {
                self.mark_out_of_sync(*offset, *len);
            }
            tracing::info!(
                resource = %self.name, writes = unstable.len(), bytes,
                "writes the peer acknowledged but had not yet made durable are marked out of sync"
            );
        }
        *lock(&self.session) = None;
        tracing::warn!(resource = %self.name, peer = %cfg.peer_node, "peer disconnected: {reason}");
        // A daemon shutting down is not losing its peer: its metadata is
        // written as a clean shutdown instead (see `detach`).
        if self.wants_link() && !self.stopping.load(Ordering::SeqCst) {
            let _ = self.step(Event::PeerLost {
                reason: reason.clone(),
            });
            if self.role() == Role::Primary {
                self.fence(crate::core::fence::FenceEvent::PeerUnreachable);
            }
        }
        self.set_link_error(reason);
        self.emit_if_changed();
        stream.shutdown(Shutdown::Both);
    }

    /// The Primary's receiver. With more than one request in flight it
    /// reads the link and completes the requests that Acks answer,
    /// replying to their clients once per batch of Acks; with at most one,
    /// the submitter reads its own Ack (`Session::after_submit`) and this
    /// thread only looks at the link once per tick. It also pings.
    fn primary_mode(&self, cfg: &PeerConfig, session: &Session) -> ModeEnd {
        session.set_primary_reading(true);
        let end = self.receive_as_primary(cfg, session);
        session.set_primary_reading(false);
        end
    }

    fn receive_as_primary(&self, cfg: &PeerConfig, session: &Session) -> ModeEnd {
        let ping_timeout = Duration::from_millis(cfg.timing.ping_timeout_ms);
        let interval = Duration::from_millis(cfg.timing.ping_interval_ms);
        let max_age = Duration::from_millis(cfg.timing.transfer_log_max_age_ms);
        let mut next_ping = Instant::now() + interval;
        let mut nonce = 0u64;
        let mut ping: Option<(Instant, Arc<link::Slot>)> = None;
        // Since when the transfer log has held writes (see below).
        let mut unstable_since: Option<Instant> = None;
        let mut body = Vec::new();
        let mut batch = Batch::default();
        while session.is_alive() {
            if self.role() != Role::Primary {
                return ModeEnd::RoleChanged;
            }
            if self.stopping.load(Ordering::SeqCst) {
                session.fail("shutting down");
                break;
            }
            let now = Instant::now();
            if let Some((sent, slot)) = &ping {
                if slot.outcome().is_some() {
                    ping = None;
                } else if now.duration_since(*sent) > ping_timeout {
                    session.fail(&format!("no answer to a ping within {ping_timeout:?}"));
                    break;
                }
            }
            if ping.is_none() && now >= next_ping {
                next_ping = now + interval;
                nonce += 1;
                ping = Some((now, session.ping(nonce)));
                // Writes acknowledged but not yet durable on the peer are
                // kept (they count as out of sync if the link drops).
                // Client flushes clear them; without any, a barrier bounds
                // the list in size and age. Not every interval: a barrier
                // is an fdatasync on the peer, which writes back every
                // page dirty there, that the local side leaves in its page
                // cache for the kernel to write back in its own time (a
                // barrier a second cost a third of the pair's 4 KiB random
                // write rate). By the default age (30 s, the kernel's for
                // writing back a dirty page) most are written back anyway;
                // the default size (2^20 writes, 24 MiB) is about ten
                // seconds of 4 KiB random writes at full speed.
                let unstable = session.unstable_count();
                if unstable == 0 {
                    unstable_since = None;
                } else if unstable_since.is_none() {
                    unstable_since = Some(now);
                }
                let aged = unstable_since.is_some_and(|t| now.duration_since(t) >= max_age);
                if unstable > cfg.timing.transfer_log_max || aged {
                    unstable_since = None;
                    let _ = session.submit_frame(
                        Track::Barrier,
                        Waiter::Nobody,
                        link::Queue::default(),
                        |seq| Frame::Barrier { seq },
                    );
                    session.activate();
                }
            }
            let active = session.is_active();
            if !active {
                session.park(PRIMARY_TICK);
            }
            // Idle: only look (a submitter may be reading its own Ack).
            // Active: wait for the read side, a submitter hands it over
            // once its own Ack is in.
            let reader = if active {
                Some(session.reader())
            } else {
                session.try_reader()
            };
            let Some(mut reader) = reader else {
                continue;
            };
            for (kind, body) in session.take_stash() {
                let handled = Frame::decode_body(kind, &body)
                    .map_err(|e| LinkError::Protocol(e.to_string()))
                    .and_then(|frame| session.handle_incoming(frame, &mut batch));
                if let Err(e) = handled {
                    let why = session.describe(e);
                    session.fail(&why);
                }
            }

            let tick_end = Instant::now() + PRIMARY_TICK;
            while session.is_alive() {
                if reader.buffer().is_empty() {
                    // Everything read so far is handled: send the replies.
                    batch.run();
                    if active && !session.stay_active() {
                        break;
                    }
                    let wait = if active {
                        tick_end.saturating_duration_since(Instant::now())
                    } else {
                        Duration::ZERO
                    };
                    if wait.is_zero() && active {
                        break;
                    }
                    if !reader.get_ref().wait_readable(wait) {
                        break;
                    }
                }
                let handled = link::read_raw(&mut *reader, &mut body).and_then(|kind| {
                    let frame = Frame::decode_body(kind, &body)
                        .map_err(|e| LinkError::Protocol(e.to_string()))?;
                    session.handle_incoming(frame, &mut batch)
                });
                if let Err(e) = handled {
                    let why = session.describe(e);
                    session.fail(&why);
                }
            }
            batch.run();
        }
        batch.run();
        ModeEnd::Over(session.reason().unwrap_or_else(|| "shutting down".into()))
    }

    fn secondary_mode(&self, cfg: &PeerConfig, session: &Arc<Session>) -> ModeEnd {
        let interval = Duration::from_millis(cfg.timing.ping_interval_ms);
        let done = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let pinger = session.clone();
            let done = &done;
            scope.spawn(move || {
                let mut nonce = 0u64;
                while pinger.is_alive() && !done.load(Ordering::SeqCst) {
                    if self.pause(interval) || done.load(Ordering::SeqCst) {
                        break;
                    }
                    nonce += 1;
                    if pinger.is_alive() {
                        pinger.ping(nonce);
                    }
                }
            });
            let end = match self.receive_as_secondary(session, scope) {
                Ok(end) => end,
                Err(e) => {
                    let why = session.describe(e);
                    session.fail(&why);
                    ModeEnd::Over(session.reason().unwrap_or(why))
                }
            };
            done.store(true, Ordering::SeqCst);
            self.wake();
            end
        })
    }
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

/// Handshakes on the listener side run in threads of their own, at most
/// this many at once; past it, the oldest is dropped.
const MAX_PENDING_HANDSHAKES: usize = 8;

/// Connections to the listener that passed the handshake.
pub(super) struct Incoming {
    tx: mpsc::SyncSender<(Stream, link::Agreed)>,
    rx: Mutex<mpsc::Receiver<(Stream, link::Agreed)>>,
    /// Handshakes in progress, oldest first (a clone of each socket, to
    /// drop the oldest when a new connection needs its place).
    pending: Mutex<std::collections::VecDeque<(u64, TcpStream)>>,
    next_id: AtomicU64,
    /// The last handshake failure logged (one line per distinct failure).
    last_error: Mutex<Option<String>>,
}

impl Incoming {
    pub(super) fn new() -> Incoming {
        let (tx, rx) = mpsc::sync_channel(1);
        Incoming {
            tx,
            rx: Mutex::new(rx),
            pending: Mutex::new(std::collections::VecDeque::new()),
            next_id: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }
}

/// TLS over a fresh peer connection when the config has certificates
/// (each side accepts only the certificate pinned for the other).
fn secure(
    cfg: &PeerConfig,
    stream: TcpStream,
    dialer: bool,
    timeout: Duration,
) -> Result<Stream, LinkError> {
    let Some(tls) = &cfg.tls else {
        return Ok(Stream::Tcp(stream));
    };
    let addr = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let deadline = Instant::now() + timeout;
    let made = if dialer {
        TlsStream::connect(stream, tls.client.clone(), deadline)
    } else {
        TlsStream::accept(stream, tls.server.clone(), deadline)
    };
    match made {
        Ok(s) => Ok(Stream::Tls(s)),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(LinkError::Tls(format!(
            "handshake with {addr} (expecting {}) failed: {e}",
            cfg.peer_node
        ))),
        Err(e) => Err(LinkError::Io(e)),
    }
}

/// Socket options and timeouts of a fresh peer connection.
fn prepare(stream: &mut TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))
}

impl Replica {
    /// The listener's acceptor: every connection gets its handshake in a
    /// thread of its own (bounded by the connect timeout), so connections
    /// that stall, trickle or speak garbage cannot keep the real peer
    /// waiting behind them. The first that authenticates is handed to the
    /// link loop.
    pub(super) fn accept_loop(self: Arc<Self>) {
        let (Some(listener), Some(cfg)) = (&self.listener, self.peer.clone()) else {
            return;
        };
        let timeout = Duration::from_millis(cfg.timing.connect_timeout_ms);
        loop {
            let accepted = listener.accept();
            if self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let mut stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(resource = %self.name, "accepting a peer connection failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let id = self.incoming.next_id.fetch_add(1, Ordering::Relaxed);
            {
                let mut pending = lock(&self.incoming.pending);
                if pending.len() >= MAX_PENDING_HANDSHAKES {
                    // The oldest gives way: a real peer's handshake takes a
                    // round trip or two, a stalled one holds its place
                    // until the timeout.
                    if let Some((_, oldest)) = pending.pop_front() {
                        let _ = oldest.shutdown(Shutdown::Both);
                        drop(pending);
                        self.incoming_failed(
                            format!("{MAX_PENDING_HANDSHAKES} handshakes in progress: the oldest was dropped"),
                            false,
                        );
                        pending = lock(&self.incoming.pending);
                    }
                }
                match stream.try_clone() {
                    Ok(clone) => pending.push_back((id, clone)),
                    Err(_) => continue,
                }
            }
            let me = self.clone();
            let cfg = cfg.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("handshake-{}", self.name))
                .spawn(move || {
                    let result = prepare(&mut stream, timeout)
                        .map_err(LinkError::Io)
                        .and_then(|()| secure(&cfg, stream, false, timeout))
                        .and_then(|mut stream| {
                            link::handshake(&mut stream, &cfg, &me.name, me.size(), false)
                                .map(|agreed| (stream, agreed))
                        });
                    lock(&me.incoming.pending).retain(|(i, _)| *i != id);
                    match result {
                        Ok((stream, agreed)) => {
                            // One waits at most; a newer one is refused
                            // as busy (the peer dials again).
                            match me.incoming.tx.try_send((stream, agreed)) {
                                Ok(()) => me.wake(),
                                Err(mpsc::TrySendError::Full((mut stream, _))) => {
                                    let e = link::refuse(
                                        &mut stream,
                                        RefuseCode::Busy,
                                        "a session or an earlier connection from this peer is already being served; try again".into(),
                                    );
                                    stream.shutdown(Shutdown::Both);
                                    me.incoming_failed(e.to_string(), false);
                                }
                                Err(mpsc::TrySendError::Disconnected(_)) => {}
                            }
                        }
                        Err(e) => {
                            let refusal = e.is_refusal();
                            me.incoming_failed(e.to_string(), refusal)
                        }
                    }
                });
            if spawned.is_err() {
                lock(&self.incoming.pending).retain(|(i, _)| *i != id);
            }
        }
    }

    /// Logs a failed incoming handshake once per distinct failure (a
    /// refusal as an error, like the dialer's) and shows it in status.
    fn incoming_failed(&self, msg: String, refusal: bool) {
        let mut last = lock(&self.incoming.last_error);
        if last.as_deref() != Some(msg.as_str()) {
            let peer = self.peer.as_ref().map_or("", |p| p.peer_node.as_str());
            if refusal {
                tracing::error!(resource = %self.name, peer, "peer link: {msg}");
            } else {
                tracing::info!(resource = %self.name, peer, "peer link: {msg}");
            }
            *last = Some(msg.clone());
        }
        drop(last);
        self.set_link_error(msg);
        self.emit_if_changed();
    }

    /// Waits for an authenticated incoming connection; `None` when the
    /// link is no longer wanted or the node is stopping.
    fn next_incoming(&self) -> Option<(Stream, link::Agreed)> {
        let rx = lock(&self.incoming.rx);
        loop {
            if self.stopping.load(Ordering::SeqCst) || !self.wants_link() {
                return None;
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(got) => {
                    *lock(&self.incoming.last_error) = None;
                    return Some(got);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }
}
