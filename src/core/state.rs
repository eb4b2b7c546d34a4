//! The node state machine: role, disk, connection and replication state,
//! with DRBD's rules. [`Node::handle`] takes one [`Event`] and returns the
//! [`Action`]s for the shells to carry out, in order, or a [`Refusal`]
//! that leaves the node unchanged. No I/O here.
//!
//! How the state maps to the persistent flags ([`Node::meta_flags`]):
//! `CONSISTENT` for Outdated, Consistent and UpToDate data; `UP_TO_DATE`
//! for UpToDate; `OUTDATED` for Outdated; `PRIMARY` while Primary;
//! `CLEAN_SHUTDOWN` after [`Event::Shutdown`]. `CRASHED_PRIMARY`,
//! `PEER_OUTDATED`, `FULL_SYNC` and unknown bits are kept as loaded and
//! changed only by the events documented below.
//!
//! Every change to [`Node::gens`] or [`Node::meta_flags`] comes with an
//! [`Action::Persist`], placed before any action that lets the outside
//! world see the change (sending state, starting a sync, dropping a link).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::split_brain::{self, Facts, Policy, Resolution, Victim};
use super::uuid::{compare, Decision, Rule, UuidView, Verdict};
use super::{flags, Generations, UUID_JUST_CREATED};

/// Which node serves I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Secondary,
}

/// How good the local copy of the data is, worst first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DiskState {
    /// No backing data.
    Diskless,
    /// A sync target, or never initialised: not a valid image.
    Inconsistent,
    /// A valid image, known to be older than the peer's.
    Outdated,
    /// A valid image; whether it is the newest is not known.
    Consistent,
    /// A valid image of the newest data.
    UpToDate,
}

impl DiskState {
    /// True for the states holding a valid image (Outdated and better).
    pub fn holds_data(self) -> bool {
        match self {
            DiskState::Outdated | DiskState::Consistent | DiskState::UpToDate => true,
            DiskState::Diskless | DiskState::Inconsistent => false,
        }
    }
}

/// The link to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConnState {
    /// Not trying to reach the peer (admin, or after split brain).
    StandAlone,
    /// Trying to reach the peer, or waiting for it.
    Connecting,
    /// Handshake done; see [`ReplState`].
    Connected,
}

/// What the connected pair is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplState {
    /// Not connected.
    Off,
    /// Connected, data in sync, writes mirrored.
    Established,
    /// Sending a resync to the peer (writes mirrored too).
    SyncSource,
    /// Receiving a resync from the peer.
    SyncTarget,
}

macro_rules! display_as_debug {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self, f)
            }
        }
    )*};
}
display_as_debug!(Role, DiskState, ConnState, ReplState);

/// What the peer reported in the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub role: Role,
    pub disk: DiskState,
    pub uuids: UuidView,
    /// The peer's operator ran `connect --discard-my-data`.
    pub discard_my_data: bool,
}

/// Something that happened; see [`Node::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Admin: become Primary. `force` accepts non-UpToDate data.
    Promote { force: bool },
    /// Admin: become Secondary. `clients`: NBD clients now attached.
    Demote { force: bool, clients: usize },
    /// Admin: StandAlone -> Connecting.
    Connect { discard_my_data: bool },
    /// Admin: -> StandAlone.
    Disconnect,
    /// The handshake with the peer is done: decide what the pair does.
    /// `local_dials`: this node opened the connection (the tie-breaker
    /// of rule 40). `local_dirty_bits`: blocks marked in the local bitmap.
    PeerConnected {
        peer: PeerInfo,
        local_dials: bool,
        local_dirty_bits: u64,
    },
    /// The connected peer's role or disk changed.
    PeerStateChanged { role: Role, disk: DiskState },
    /// The link dropped; the node keeps trying to reconnect.
    PeerLost { reason: String },
    /// The resync completed (this node was source or target). The target
    /// records it first and the source once the target confirmed: a
    /// source that cleared its bitmap UUID for a target that then crashed
    /// before recording would leave only a full sync to find the pair.
    SyncFinished,
    /// The peer says the pair is in sync at its current UUID `current`:
    /// the end of a resync this node was target of, or the peer's
    /// `new-current-uuid --clear-bitmap` on just-created metadata (skip
    /// the initial sync).
    SyncDone { current: u64 },
    /// Admin (`new-current-uuid`): start a new data generation. Allowed
    /// StandAlone; while connected only as "skip initial sync":
    /// `clear_bitmap` with both copies just created.
    NewCurrentUuid { clear_bitmap: bool },
    /// Admin (`invalidate`): discard the local data and become a full
    /// sync target of the connected, UpToDate peer.
    Invalidate,
    /// Clean shutdown.
    Shutdown,
    /// The local disk (or its metadata) failed and the shell detached it
    /// (`on_io_error = detach`): the node is Diskless from now on, and
    /// `FULL_SYNC` is set, so whatever is on that disk is never trusted
    /// again without a full resync. A resync in progress ends (the link
    /// is dropped and comes back without one); otherwise the session
    /// goes on and the peer is told.
    DiskFailed,
    /// Admin (`outdate`, run by a peer's fence handler): mark this
    /// node's data Outdated, so it cannot be promoted without `force`.
    /// Refused while Primary or connected (the connected pair knows
    /// better); Outdated, Inconsistent and Diskless stay as they are.
    Outdate,
    /// The fence-peer handler says the unconnected peer is fenced or
    /// outdated: `PEER_OUTDATED` is set (cleared by the next handshake),
    /// so this node comes back UpToDate after a restart. Ignored while
    /// connected.
    PeerFenced,
}

/// Log levels for [`Action::Log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// What the shells must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write [`Node::gens`] and [`Node::meta_flags`] to the metadata.
    Persist,
    /// Disconnect every NBD client (forced demote).
    DisconnectClients,
    /// Tear down the peer session. The node's [`ConnState`] says whether
    /// to reconnect (Connecting) or not (StandAlone).
    DropLink { reason: String },
    /// Tear down the peer session if any, and stop reconnecting until the
    /// operator runs `connect` (split brain, unrelated data, ...).
    StandAlone { reason: String },
    /// Start (or resume) a resync; `full` ignores the bitmap.
    StartSync { source: bool, full: bool },
    /// Tell the peer this node's role and disk state.
    SendState,
    /// Log `message`.
    Log { level: Level, message: String },
}

/// Why an event was refused; the node did not change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

fn refuse(message: impl Into<String>) -> Refusal {
    Refusal {
        message: message.into(),
    }
}

/// Flag bits [`Node::meta_flags`] derives from the state.
const DERIVED: u32 = flags::CONSISTENT
    | flags::UP_TO_DATE
    | flags::OUTDATED
    | flags::PRIMARY
    | flags::CLEAN_SHUTDOWN;

/// Actions collected while handling one event: logs and the like go
/// before the `Persist`, the rest after it.
#[derive(Default)]
struct Out {
    early: Vec<Action>,
    late: Vec<Action>,
}

impl Out {
    fn log(&mut self, level: Level, message: impl Into<String>) {
        self.early.push(Action::Log {
            level,
            message: message.into(),
        });
    }

    fn then(&mut self, action: Action) {
        self.late.push(action);
    }
}

/// What a successful handshake leads to.
enum Plan {
    NoSync,
    Source { full: bool },
    Target { full: bool },
}

/// One node's state for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    role: Role,
    disk: DiskState,
    conn: ConnState,
    repl: ReplState,
    /// The peer's role and disk while connected.
    peer: Option<(Role, DiskState)>,
    /// The peer's UUIDs while connected (as of the handshake, updated
    /// when a sync ends).
    peer_gens: Option<Generations>,
    gens: Generations,
    /// Persistent flags not derived from the state.
    kept_flags: u32,
    clean_shutdown: bool,
    has_peer: bool,
    discard_my_data: bool,
    last_verdict: Option<Verdict>,
    /// Automatic split-brain policies (`after-sb-0pri`, `after-sb-1pri`).
    policy: Policy,
    /// The last split brain the policies looked at, and what they decided.
    last_split_brain: Option<Resolution>,
}

impl Node {
    /// The node as `up` makes it from the superblock. Always Secondary; a
    /// node that was Primary and did not shut down cleanly gets
    /// `CRASHED_PRIMARY`, and `FULL_SYNC` too unless `ACTIVITY_LOG` was
    /// set: without the log, writes may have been in flight anywhere and
    /// nothing says where, so the sync it leads must be a full one. With
    /// it, the shell has marked the persisted bitmap and the logged
    /// extents (and written that bitmap back before anything else), so
    /// the sync it leads is bitmap-based. Both flags persist until a sync
    /// completes, so a second crash before then (as Secondary, when
    /// `PRIMARY` is no longer set) cannot turn that sync into one that
    /// copies nothing. `ACTIVITY_LOG` itself is kept as loaded until the
    /// shell sets it (`set_activity_log`). The disk: Inconsistent if the UUID is just
    /// created or `CONSISTENT` is clear; Outdated if `OUTDATED`; UpToDate
    /// if `UP_TO_DATE` and the peer was known Outdated (`PEER_OUTDATED`)
    /// or there is no peer; Consistent otherwise (a node that restarts
    /// cannot know whether the peer wrote meanwhile). Connecting if
    /// `has_peer`, else StandAlone. `CLEAN_SHUTDOWN` is cleared (so a
    /// later crash shows); the caller persists `meta_flags()` right away.
    pub fn from_meta(gens: Generations, meta_flags: u32, has_peer: bool) -> Node {
        let mut kept_flags = meta_flags & !DERIVED;
        if meta_flags & flags::PRIMARY != 0 && meta_flags & flags::CLEAN_SHUTDOWN == 0 {
            kept_flags |= flags::CRASHED_PRIMARY;
            if meta_flags & flags::ACTIVITY_LOG == 0 {
                kept_flags |= flags::FULL_SYNC;
            }
        }
        let disk = if gens.just_created() || meta_flags & flags::CONSISTENT == 0 {
            DiskState::Inconsistent
        } else if meta_flags & flags::OUTDATED != 0 {
            DiskState::Outdated
        } else if meta_flags & flags::UP_TO_DATE != 0
            && (meta_flags & flags::PEER_OUTDATED != 0 || !has_peer)
        {
            DiskState::UpToDate
        } else {
            DiskState::Consistent
        };
        Node {
            role: Role::Secondary,
            disk,
            conn: if has_peer {
                ConnState::Connecting
            } else {
                ConnState::StandAlone
            },
            repl: ReplState::Off,
            peer: None,
            peer_gens: None,
            gens,
            kept_flags,
            clean_shutdown: false,
            has_peer,
            discard_my_data: false,
            last_verdict: None,
            policy: Policy::default(),
            last_split_brain: None,
        }
    }

    /// Sets the automatic split-brain policies (default: none).
    pub fn set_split_brain_policy(&mut self, policy: Policy) {
        self.policy = policy;
    }

    pub fn split_brain_policy(&self) -> Policy {
        self.policy
    }

    /// What the split-brain policies decided at the last split brain
    /// they were asked about (kept until the next one).
    pub fn last_split_brain(&self) -> Option<&Resolution> {
        self.last_split_brain.as_ref()
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Whether the shell keeps the bitmap on disk and writes through the
    /// activity log from now on (`flags::ACTIVITY_LOG`); the caller
    /// persists `meta_flags()`.
    pub fn set_activity_log(&mut self, on: bool) {
        if on {
            self.kept_flags |= flags::ACTIVITY_LOG;
        } else {
            self.kept_flags &= !flags::ACTIVITY_LOG;
        }
    }

    pub fn disk(&self) -> DiskState {
        self.disk
    }

    pub fn conn(&self) -> ConnState {
        self.conn
    }

    pub fn repl(&self) -> ReplState {
        self.repl
    }

    /// The peer's role and disk state while connected.
    pub fn peer(&self) -> Option<(Role, DiskState)> {
        self.peer
    }

    /// The peer's UUIDs while connected.
    pub fn peer_gens(&self) -> Option<Generations> {
        self.peer_gens
    }

    /// The decision of the last handshake (after `--discard-my-data`
    /// resolved a split brain, the resulting sync, with the split-brain
    /// rule).
    pub fn last_verdict(&self) -> Option<Verdict> {
        self.last_verdict
    }

    /// The operator asked to discard this node's data on split brain (set
    /// by `connect --discard-my-data`, consumed by the next handshake).
    pub fn discard_my_data(&self) -> bool {
        self.discard_my_data
    }

    pub fn gens(&self) -> Generations {
        self.gens
    }

    /// The persistent flags for the current state (see the module doc).
    pub fn meta_flags(&self) -> u32 {
        let mut f = self.kept_flags;
        match self.disk {
            DiskState::UpToDate => f |= flags::CONSISTENT | flags::UP_TO_DATE,
            DiskState::Consistent => f |= flags::CONSISTENT,
            DiskState::Outdated => f |= flags::CONSISTENT | flags::OUTDATED,
            DiskState::Inconsistent | DiskState::Diskless => {}
        }
        match self.role {
            Role::Primary => f |= flags::PRIMARY,
            Role::Secondary => {}
        }
        if self.clean_shutdown {
            f |= flags::CLEAN_SHUTDOWN;
        }
        f
    }

    /// What this node tells the peer in the handshake.
    pub fn uuid_view(&self, dirty_bits: u64) -> UuidView {
        UuidView {
            gens: self.gens,
            flags: self.meta_flags(),
            dirty_bits,
        }
    }

    /// Applies `event`. `fresh_uuid` yields random values for new current
    /// UUIDs (values naming no data or already known are skipped).
    ///
    /// New current UUIDs follow DRBD 8.4: the bitmap UUID names the
    /// latest generation of this node the peer may hold, so once it is set
    /// the current generation is already one the peer lacks and only a
    /// forced promote starts another.
    ///
    /// - `Promote`: refused if the peer is Primary (even forced), if the
    ///   disk is Diskless, or if it is not UpToDate without `force`.
    ///   Forcing logs an error, makes the disk UpToDate and always starts
    ///   a new current UUID; a forced promote while connected then drops
    ///   the link so the handshake decides with the new UUIDs. Otherwise
    ///   a new current UUID starts when no connected peer with a disk
    ///   receives the writes and the bitmap UUID is unset.
    /// - `Demote`: refused with clients attached unless `force`, which
    ///   disconnects them first.
    /// - `PeerLost`, `Disconnect` while connected, and a peer turning
    ///   Primary while this node is Primary (which also goes StandAlone):
    ///   an UpToDate Primary with an unset bitmap UUID starts a new
    ///   current UUID, the old one becoming the bitmap UUID. So does a
    ///   sync source with a set bitmap UUID, whatever its role: the
    ///   target may have adopted its current UUID at `SyncDone` before
    ///   the source recorded the end of the sync, so that UUID no longer
    ///   names a generation the peer lacks. The peer is not marked
    ///   Outdated.
    /// - `PeerConnected`: see [`compare`]; then, in order: both nodes
    ///   asked to discard their data, unrelated data, an unresolved split
    ///   brain (`--discard-my-data` on one side makes that side a
    ///   bitmap-based sync target), two Primaries, a Primary that would
    ///   be sync target, and a sync source without valid data each make
    ///   the node StandAlone. Otherwise, when both hold the same current
    ///   UUID, bitmap UUIDs are retired. No sync: both disks holding data
    ///   become UpToDate and `CRASHED_PRIMARY` is cleared. A sync target
    ///   becomes Inconsistent.
    ///   A bitmap-based sync source whose generation equals the peer's
    ///   and has no bitmap UUID takes that generation as bitmap UUID
    ///   until the sync ends.
    ///   A split brain by rule 90 (both bitmap UUIDs name the shared
    ///   generation) is resolved by `--discard-my-data` or, failing that,
    ///   by the split-brain policies ([`split_brain::resolve`]; recorded
    ///   in [`Node::last_split_brain`]) as a bitmap-based sync: the shell
    ///   merges both bitmaps first. Rule 100 only by `--discard-my-data`,
    ///   as a full sync. Both nodes having marked blocks at the same
    ///   generation (rule `BothDirtyBits`): a Primary is the source.
    /// - `Invalidate`: refused on a Primary and unless connected to an
    ///   UpToDate peer; the disk becomes Inconsistent with `FULL_SYNC`
    ///   set, and the link is dropped to reconnect (the handshake then
    ///   makes this node a full sync target).
    ///
    /// `BITMAP_PRIMARY` is set when a new generation moves the old one
    /// into an empty bitmap slot while the node is Primary (it lost its
    /// peer while Primary), cleared when that happens while Secondary and
    /// whenever the bitmap UUID is cleared.
    /// - `SyncFinished`: the target adopts the source's UUIDs
    ///   ([`Generations::adopt_peer_current`]), the source clears its
    ///   bitmap UUID; both become UpToDate, `CRASHED_PRIMARY` and
    ///   `FULL_SYNC` are cleared.
    /// - `Shutdown`: Secondary, StandAlone, `CLEAN_SHUTDOWN`.
    pub fn handle(
        &mut self,
        event: Event,
        fresh_uuid: &mut dyn FnMut() -> u64,
    ) -> Result<Vec<Action>, Refusal> {
        let before = (self.gens, self.meta_flags());
        let mut out = Out::default();
        match event {
            Event::Promote { force } => self.promote(force, fresh_uuid, &mut out)?,
            Event::Demote { force, clients } => self.demote(force, clients, &mut out)?,
            Event::Connect { discard_my_data } => self.connect(discard_my_data, &mut out)?,
            Event::Disconnect => self.disconnect(fresh_uuid, &mut out),
            Event::PeerConnected {
                peer,
                local_dials,
                local_dirty_bits,
            } => self.peer_connected(&peer, local_dials, local_dirty_bits, fresh_uuid, &mut out)?,
            Event::PeerStateChanged { role, disk } => {
                self.peer_state_changed(role, disk, fresh_uuid, &mut out)
            }
            Event::PeerLost { reason } => self.peer_lost(&reason, fresh_uuid, &mut out),
            Event::SyncFinished => self.sync_finished(&mut out)?,
            Event::SyncDone { current } => self.sync_done(current, &mut out)?,
            Event::NewCurrentUuid { clear_bitmap } => {
                self.new_current_uuid(clear_bitmap, fresh_uuid, &mut out)?
            }
            Event::Invalidate => self.invalidate(fresh_uuid, &mut out)?,
            Event::Shutdown => self.shutdown(&mut out),
            Event::DiskFailed => self.disk_failed(&mut out),
            Event::Outdate => self.outdate(&mut out)?,
            Event::PeerFenced => {
                if self.conn != ConnState::Connected {
                    self.kept_flags |= flags::PEER_OUTDATED;
                }
            }
        }
        if self.gens.bitmap == 0 {
            self.kept_flags &= !flags::BITMAP_PRIMARY;
        }
        let mut actions = out.early;
        if (self.gens, self.meta_flags()) != before {
            actions.push(Action::Persist);
        }
        actions.extend(out.late);
        Ok(actions)
    }

    // ---- events ---------------------------------------------------------

    fn promote(
        &mut self,
        force: bool,
        fresh: &mut dyn FnMut() -> u64,
        out: &mut Out,
    ) -> Result<(), Refusal> {
        match self.role {
            Role::Primary => return Ok(()),
            Role::Secondary => {}
        }
        match self.peer {
            Some((Role::Primary, _)) => return Err(refuse("promote refused: peer is Primary")),
            Some((Role::Secondary, _)) | None => {}
        }
        let forced = match self.disk {
            DiskState::UpToDate => false,
            DiskState::Consistent | DiskState::Outdated | DiskState::Inconsistent => {
                if !force {
                    return Err(refuse(format!(
                        "promote refused: local data is {}, not UpToDate (use --force)",
                        self.disk
                    )));
                }
                true
            }
            DiskState::Diskless => return Err(refuse("promote refused: no local disk")),
        };
        let peer_receives_writes = match (self.conn, self.peer) {
            (ConnState::Connected, Some((_, disk))) => disk != DiskState::Diskless,
            (ConnState::Connected, None) | (ConnState::StandAlone | ConnState::Connecting, _) => {
                false
            }
        };
        if forced {
            out.log(
                Level::Error,
                format!(
                    "promote FORCED: local data was {}, declared UpToDate by the operator",
                    self.disk
                ),
            );
        }
        if forced || (!peer_receives_writes && self.gens.bitmap == 0) {
            self.start_generation(fresh, out);
        }
        self.role = Role::Primary;
        self.disk = DiskState::UpToDate;
        out.log(Level::Info, "promoted to Primary");
        match (self.conn, forced) {
            (ConnState::Connected, true) => {
                self.end_session(ConnState::Connecting);
                out.then(Action::DropLink {
                    reason: "forced promote started a new data generation; reconnecting to decide the resync"
                        .into(),
                });
            }
            (ConnState::Connected, false) => out.then(Action::SendState),
            (ConnState::StandAlone | ConnState::Connecting, _) => {}
        }
        Ok(())
    }

    fn demote(&mut self, force: bool, clients: usize, out: &mut Out) -> Result<(), Refusal> {
        match self.role {
            Role::Secondary => return Ok(()),
            Role::Primary => {}
        }
        if clients > 0 {
            let what = if clients == 1 {
                "1 NBD client".to_string()
            } else {
                format!("{clients} NBD clients")
            };
            if !force {
                return Err(refuse(format!(
                    "demote refused: {what} attached (use --force)"
                )));
            }
            out.log(Level::Warn, format!("demote forced: disconnecting {what}"));
            out.early.push(Action::DisconnectClients);
        }
        self.role = Role::Secondary;
        out.log(Level::Info, "demoted to Secondary");
        match self.conn {
            ConnState::Connected => out.then(Action::SendState),
            ConnState::StandAlone | ConnState::Connecting => {}
        }
        Ok(())
    }

    fn connect(&mut self, discard_my_data: bool, out: &mut Out) -> Result<(), Refusal> {
        match self.conn {
            ConnState::Connected => return Err(refuse("connect refused: already connected")),
            ConnState::Connecting => {}
            ConnState::StandAlone => {
                if !self.has_peer {
                    return Err(refuse("connect refused: no peer configured"));
                }
                self.conn = ConnState::Connecting;
            }
        }
        if discard_my_data {
            out.log(
                Level::Warn,
                "connecting; on split brain this node's changes will be discarded",
            );
        } else {
            out.log(Level::Info, "connecting");
        }
        self.discard_my_data = discard_my_data;
        Ok(())
    }

    fn disconnect(&mut self, fresh: &mut dyn FnMut() -> u64, out: &mut Out) {
        match self.conn {
            ConnState::StandAlone => return,
            ConnState::Connecting => {}
            ConnState::Connected => self.lose_peer(fresh, out),
        }
        self.end_session(ConnState::StandAlone);
        self.discard_my_data = false;
        out.log(Level::Info, "disconnected: StandAlone");
        out.then(Action::DropLink {
            reason: "disconnected by the operator".into(),
        });
    }

    fn peer_connected(
        &mut self,
        peer: &PeerInfo,
        local_dials: bool,
        local_dirty_bits: u64,
        fresh: &mut dyn FnMut() -> u64,
        out: &mut Out,
    ) -> Result<(), Refusal> {
        match self.conn {
            ConnState::Connected => return Err(refuse("handshake refused: already connected")),
            ConnState::StandAlone => {
                return Err(refuse(
                    "handshake refused: this node is StandAlone (run connect)",
                ))
            }
            ConnState::Connecting => {}
        }
        if self.disk == DiskState::Diskless || peer.disk == DiskState::Diskless {
            self.connect_diskless(peer, fresh, out);
            return Ok(());
        }
        let verdict = compare(&self.uuid_view(local_dirty_bits), &peer.uuids, local_dials);
        let discard = std::mem::take(&mut self.discard_my_data);
        let mut auto = None;
        if verdict.decision == Decision::SplitBrain
            && verdict.rule == Rule::SplitBrainBitmapsEqual
            && !discard
            && !peer.discard_my_data
        {
            let facts = Facts {
                local_role: self.role,
                peer_role: peer.role,
                local_changes: local_dirty_bits,
                peer_changes: peer.uuids.dirty_bits,
                local_primary_at_split: self.meta_flags() & flags::BITMAP_PRIMARY != 0,
                peer_primary_at_split: peer.uuids.flags & flags::BITMAP_PRIMARY != 0,
                local_dials,
            };
            let resolution = split_brain::resolve(self.policy, &facts);
            match resolution.victim {
                Some(_) => out.log(
                    Level::Warn,
                    format!(
                        "split brain ({}) resolved automatically by {resolution}",
                        verdict.rule
                    ),
                ),
                None if !self.policy.is_manual() => out.log(
                    Level::Error,
                    format!(
                        "split brain ({}) not resolved by {resolution}",
                        verdict.rule
                    ),
                ),
                None => {}
            }
            auto = Some(resolution);
        }
        // The peer's real state is known now.
        self.kept_flags &= !flags::PEER_OUTDATED;
        let victim = auto.as_ref().and_then(|r| r.victim);
        if auto.is_some() {
            self.last_split_brain = auto;
        }
        match self.plan(verdict, discard, victim, peer) {
            Err(reason) => {
                self.last_verdict = Some(verdict);
                self.go_stand_alone(reason, out);
            }
            Ok((plan, decision)) => {
                self.last_verdict = Some(Verdict {
                    decision,
                    rule: verdict.rule,
                });
                if decision != verdict.decision && verdict.decision == Decision::SplitBrain {
                    let by = if victim.is_some() {
                        "the split-brain policy"
                    } else {
                        "--discard-my-data"
                    };
                    out.log(
                        Level::Warn,
                        format!(
                            "split brain ({}) resolved by {by}: this node is {}",
                            verdict.rule, decision
                        ),
                    );
                }
                self.establish(plan, verdict, peer, out);
            }
        }
        Ok(())
    }

    fn peer_state_changed(
        &mut self,
        role: Role,
        disk: DiskState,
        fresh: &mut dyn FnMut() -> u64,
        out: &mut Out,
    ) {
        match self.conn {
            ConnState::StandAlone | ConnState::Connecting => return,
            ConnState::Connected => {}
        }
        match (self.role, role) {
            (Role::Primary, Role::Primary) => {
                let reason = "the peer became Primary while this node is Primary: two Primaries are not allowed";
                self.lose_peer(fresh, out);
                self.go_stand_alone(reason.into(), out);
            }
            (Role::Primary, Role::Secondary)
            | (Role::Secondary, Role::Primary | Role::Secondary) => {
                let had_disk = self.peer.is_some_and(|p| p.1 != DiskState::Diskless);
                if had_disk && disk == DiskState::Diskless {
                    if self.repl != ReplState::Established {
                        out.log(
                            Level::Warn,
                            "the peer's disk failed during a resync: reconnecting without one",
                        );
                        self.lose_peer(fresh, out);
                        self.end_session(ConnState::Connecting);
                        out.then(Action::DropLink {
                            reason: "the peer's disk failed during a resync".into(),
                        });
                        return;
                    }
                    self.peer = Some((role, disk));
                    self.peer_disk_lost(fresh, out);
                } else {
                    self.peer = Some((role, disk));
                }
            }
        }
    }

    /// A handshake where one side has no disk: no resync (nothing to copy
    /// to or from a node without a disk); the pair runs with the one copy.
    /// Both without a disk, or two Primaries, go StandAlone.
    fn connect_diskless(&mut self, peer: &PeerInfo, fresh: &mut dyn FnMut() -> u64, out: &mut Out) {
        self.discard_my_data = false;
        if self.disk == DiskState::Diskless && peer.disk == DiskState::Diskless {
            self.go_stand_alone("cannot connect: neither node has a disk".into(), out);
            return;
        }
        if self.role == Role::Primary && peer.role == Role::Primary {
            self.go_stand_alone(
                "both nodes are Primary: two Primaries are not allowed (demote one)".into(),
                out,
            );
            return;
        }
        self.kept_flags &= !flags::PEER_OUTDATED;
        self.last_verdict = None;
        self.conn = ConnState::Connected;
        self.repl = ReplState::Established;
        self.peer_gens = Some(peer.uuids.gens);
        if self.disk == DiskState::Diskless {
            out.log(
                Level::Warn,
                format!(
                    "connected without a local disk: I/O goes to the peer (its disk {})",
                    peer.disk
                ),
            );
            self.peer = Some((peer.role, peer.disk));
            return;
        }
        // The peer's last known generation is ours or an ancestor of it:
        // no other copy can be newer than this one.
        let theirs = peer.uuids.gens.current;
        if self.disk == DiskState::Consistent
            && (self.gens.current == theirs || self.gens.contains(theirs))
        {
            self.disk = DiskState::UpToDate;
        }
        out.log(
            Level::Warn,
            "connected to a peer without a disk: no resync, this node holds the only copy",
        );
        self.peer = Some((peer.role, DiskState::Diskless));
        self.peer_disk_lost(fresh, out);
    }

    /// The connected peer has no disk (it failed, or came up without
    /// one): this node's copy is the only one written from now on. An
    /// UpToDate node starts a new generation (unless its bitmap UUID
    /// already names one the peer lacks), whatever the roles: the failed
    /// disk may lack writes it acknowledged before a flush failed, and
    /// may come back with metadata that could not record the failure,
    /// still naming the shared generation; the new one makes this node
    /// its sync source then. `FULL_SYNC` is set too: what the peer's disk
    /// holds is not known, so its resync copies everything.
    fn peer_disk_lost(&mut self, fresh: &mut dyn FnMut() -> u64, out: &mut Out) {
        if self.kept_flags & flags::FULL_SYNC == 0 {
            out.log(
                Level::Warn,
                "the peer has no disk: its copy falls behind from now on and will need a full resync",
            );
        }
        self.kept_flags |= flags::FULL_SYNC;
        if self.disk == DiskState::UpToDate && self.gens.bitmap == 0 {
            self.start_generation(fresh, out);
        }
    }

    fn disk_failed(&mut self, out: &mut Out) {
        if self.disk == DiskState::Diskless {
            return;
        }
        out.log(
            Level::Error,
            format!(
                "local disk failed ({} before): detached, the node is Diskless",
                self.disk
            ),
        );
        self.disk = DiskState::Diskless;
        self.kept_flags |= flags::FULL_SYNC;
        if self.conn == ConnState::Connected && self.repl != ReplState::Established {
            self.end_session(ConnState::Connecting);
            out.then(Action::DropLink {
                reason: "the local disk failed during a resync".into(),
            });
        }
    }

    fn peer_lost(&mut self, reason: &str, fresh: &mut dyn FnMut() -> u64, out: &mut Out) {
        match self.conn {
            // No session was established: nothing to undo.
            ConnState::StandAlone | ConnState::Connecting => {}
            ConnState::Connected => {
                out.log(Level::Warn, format!("lost the peer: {reason}"));
                self.lose_peer(fresh, out);
            }
        }
    }

    fn sync_finished(&mut self, out: &mut Out) -> Result<(), Refusal> {
        match (self.conn, self.repl) {
            (ConnState::Connected, ReplState::SyncTarget) => {
                let Some(source) = self.peer_gens else {
                    return Err(refuse(
                        "sync finished, but the sync source's UUIDs are unknown",
                    ));
                };
                self.finish_as_target(&source, out);
            }
            (ConnState::Connected, ReplState::SyncSource) => {
                self.gens.clear_bitmap_uuid();
                match self.disk {
                    DiskState::Outdated | DiskState::Consistent | DiskState::UpToDate => {
                        self.disk = DiskState::UpToDate
                    }
                    DiskState::Inconsistent | DiskState::Diskless => {}
                }
                self.in_sync(out);
            }
            (ConnState::Connected, ReplState::Established | ReplState::Off)
            | (
                ConnState::StandAlone | ConnState::Connecting,
                ReplState::Off
                | ReplState::Established
                | ReplState::SyncSource
                | ReplState::SyncTarget,
            ) => {}
        }
        Ok(())
    }

    fn sync_done(&mut self, current: u64, out: &mut Out) -> Result<(), Refusal> {
        match (self.conn, self.repl) {
            (ConnState::Connected, ReplState::SyncTarget) => {
                let Some(source) = self.peer_gens else {
                    return Err(refuse("sync done, but the sync source's UUIDs are unknown"));
                };
                if source.current != current {
                    return Err(refuse(format!(
                        "sync done at {current:016X}, but the sync source's current UUID is {:016X}",
                        source.current
                    )));
                }
                self.finish_as_target(&source, out);
            }
            (ConnState::Connected, ReplState::Established) => {
                if self.gens.current == current {
                    return Ok(());
                }
                if self.disk == DiskState::Diskless {
                    return Err(refuse(
                        "sync done refused: this node has no disk (it needs a full resync)",
                    ));
                }
                let peer_fresh = self
                    .peer_gens
                    .is_some_and(|g| g.just_created() || g.current == current);
                if !self.gens.just_created() || !peer_fresh || current == UUID_JUST_CREATED {
                    return Err(refuse(
                        "sync done refused: initial sync can be skipped only when both copies are just created",
                    ));
                }
                self.gens.current = current;
                self.gens.bitmap = 0;
                out.log(
                    Level::Warn,
                    format!("initial sync skipped: the peer declared both copies identical at {current:016X}"),
                );
                self.skip_initial_sync();
            }
            (ConnState::Connected, ReplState::SyncSource | ReplState::Off)
            | (
                ConnState::StandAlone | ConnState::Connecting,
                ReplState::Off
                | ReplState::Established
                | ReplState::SyncSource
                | ReplState::SyncTarget,
            ) => return Err(refuse("sync done refused: this node is not a sync target")),
        }
        Ok(())
    }

    fn new_current_uuid(
        &mut self,
        clear_bitmap: bool,
        fresh: &mut dyn FnMut() -> u64,
        out: &mut Out,
    ) -> Result<(), Refusal> {
        match self.conn {
            ConnState::StandAlone => {
                // As DRBD: the bitmap UUID goes to history, the old current
                // becomes the bitmap UUID. With `clear_bitmap` the shell
                // also clears the bitmap: "no changes since".
                self.gens.clear_bitmap_uuid();
                self.start_generation(fresh, out);
                Ok(())
            }
            ConnState::Connecting => Err(refuse(
                "new-current-uuid refused: the node is connecting (disconnect first)",
            )),
            ConnState::Connected => {
                let skip = clear_bitmap
                    && self.repl == ReplState::Established
                    && self.disk != DiskState::Diskless
                    && self.peer.is_some_and(|p| p.1 != DiskState::Diskless)
                    && self.gens.just_created()
                    && self.peer_gens.is_some_and(|g| g.just_created());
                if !skip {
                    return Err(refuse(
                        "new-current-uuid refused: connected (disconnect first, or use --clear-bitmap on just-created metadata to skip the initial sync)",
                    ));
                }
                self.gens.clear_bitmap_uuid();
                self.start_generation(fresh, out);
                out.log(
                    Level::Warn,
                    "initial sync skipped: both copies declared identical by the operator",
                );
                self.skip_initial_sync();
                out.then(Action::SendState);
                Ok(())
            }
        }
    }

    fn invalidate(&mut self, fresh: &mut dyn FnMut() -> u64, out: &mut Out) -> Result<(), Refusal> {
        if self.role == Role::Primary {
            return Err(refuse(
                "invalidate refused: this node is Primary (demote it first)",
            ));
        }
        match (self.conn, self.repl, self.peer) {
            (ConnState::Connected, ReplState::Established, Some((_, DiskState::UpToDate))) => {}
            (ConnState::Connected, ReplState::SyncTarget, _) if self.disk == DiskState::Inconsistent => {}
            (conn, repl, peer) => {
                return Err(refuse(format!(
                    "invalidate refused: needs a connected peer with UpToDate data (connection {conn}, {repl}, peer disk {})",
                    peer.map_or("unknown".to_string(), |p| p.1.to_string())
                )))
            }
        }
        if self.disk == DiskState::Diskless {
            return Err(refuse("invalidate refused: no local disk"));
        }
        out.log(
            Level::Warn,
            format!(
                "invalidate: local data ({}) discarded; reconnecting as full sync target",
                self.disk
            ),
        );
        self.lose_peer(fresh, out);
        self.disk = DiskState::Inconsistent;
        // Persisted: until a sync completes, every block is to be
        // fetched, even after a crash.
        self.kept_flags |= flags::FULL_SYNC;
        self.end_session(ConnState::Connecting);
        out.then(Action::DropLink {
            reason: "invalidated by the operator: reconnecting as full sync target".into(),
        });
        Ok(())
    }

    fn outdate(&mut self, out: &mut Out) -> Result<(), Refusal> {
        if self.role == Role::Primary {
            return Err(refuse("outdate refused: this node is Primary"));
        }
        if self.conn == ConnState::Connected {
            return Err(refuse(
                "outdate refused: connected to the peer (the pair decides the disk states)",
            ));
        }
        match self.disk {
            DiskState::UpToDate | DiskState::Consistent => {
                self.disk = DiskState::Outdated;
                out.log(
                    Level::Warn,
                    "data marked Outdated (by the peer's fence handler or the operator)",
                );
            }
            DiskState::Outdated | DiskState::Inconsistent | DiskState::Diskless => {}
        }
        Ok(())
    }

    /// The peer was fenced since the link was last up (`PEER_OUTDATED`).
    pub fn peer_outdated(&self) -> bool {
        self.kept_flags & flags::PEER_OUTDATED != 0
    }

    fn shutdown(&mut self, out: &mut Out) {
        self.clean_shutdown = true;
        self.role = Role::Secondary;
        self.discard_my_data = false;
        out.log(Level::Info, "clean shutdown");
        match self.conn {
            ConnState::StandAlone => {}
            ConnState::Connecting | ConnState::Connected => {
                self.end_session(ConnState::StandAlone);
                out.then(Action::DropLink {
                    reason: "shutting down".into(),
                });
            }
        }
    }

    // ---- helpers --------------------------------------------------------

    /// Checks a handshake verdict against the roles and disks; returns the
    /// plan and the decision it stands for, or why to go StandAlone.
    fn plan(
        &self,
        verdict: Verdict,
        discard: bool,
        auto: Option<Victim>,
        peer: &PeerInfo,
    ) -> Result<(Plan, Decision), String> {
        if discard && peer.discard_my_data {
            return Err(
                "both nodes asked to discard their data: use --discard-my-data on one node only"
                    .into(),
            );
        }
        if self.disk == DiskState::Diskless || peer.disk == DiskState::Diskless {
            return Err(format!(
                "cannot connect without data on both nodes (this node {}, peer {})",
                self.disk, peer.disk
            ));
        }
        let full_flag = (self.meta_flags() | peer.uuids.flags) & flags::FULL_SYNC != 0;
        // Rule 90: both bitmaps are relative to the generation the nodes
        // last shared, so their union (exchanged at connect) covers every
        // block either side changed: the victim's changes are rolled back
        // by a bitmap-based sync. Rule 100: the bitmaps are relative to
        // different generations; only a full sync is safe.
        let full = full_flag || verdict.rule != Rule::SplitBrainBitmapsEqual;
        let decision = match verdict.decision {
            Decision::Unrelated => {
                return Err(format!(
                    "unrelated data ({}): refusing to connect",
                    verdict.rule
                ))
            }
            Decision::SplitBrain => match (discard, peer.discard_my_data, auto) {
                (true, false, _) | (false, false, Some(Victim::Local)) => {
                    Decision::SyncTarget { full }
                }
                (false, true, _) | (false, false, Some(Victim::Peer)) => {
                    Decision::SyncSource { full }
                }
                (false, false, None) | (true, true, _) => {
                    let policy = match self.last_split_brain.as_ref() {
                        Some(r)
                            if verdict.rule == Rule::SplitBrainBitmapsEqual
                                && !self.policy.is_manual() =>
                        {
                            format!(" ({r})")
                        }
                        _ => String::new(),
                    };
                    return Err(format!(
                        "split brain detected ({}){policy}: both nodes keep their data; run `connect --discard-my-data` on the node whose changes should be discarded",
                        verdict.rule
                    ));
                }
            },
            d @ (Decision::NoSync | Decision::SyncSource { .. } | Decision::SyncTarget { .. }) => d,
        };
        // Both marked blocks for the other at the same generation (online
        // verify marks both): a Primary keeps its data.
        let decision = match (verdict.rule, self.role, peer.role, decision) {
            (Rule::BothDirtyBits, Role::Primary, Role::Secondary, d) if d.is_sync() => {
                Decision::SyncSource { full: d.is_full() }
            }
            (Rule::BothDirtyBits, Role::Secondary, Role::Primary, d) if d.is_sync() => {
                Decision::SyncTarget { full: d.is_full() }
            }
            (_, _, _, d) => d,
        };
        if self.role == Role::Primary && peer.role == Role::Primary {
            return Err(
                "both nodes are Primary: two Primaries are not allowed (demote one)".into(),
            );
        }
        let plan = match decision {
            Decision::NoSync => Plan::NoSync,
            Decision::SyncSource { full } => {
                if peer.role == Role::Primary {
                    return Err(format!(
                        "the peer is Primary but would become sync target ({}); demote it first",
                        verdict.rule
                    ));
                }
                if !self.disk.holds_data() {
                    return Err(format!(
                        "this node would be sync source but its data is {}",
                        self.disk
                    ));
                }
                Plan::Source { full }
            }
            Decision::SyncTarget { full } => {
                if self.role == Role::Primary {
                    return Err(format!(
                        "this node is Primary but would become sync target ({}); demote it first",
                        verdict.rule
                    ));
                }
                if !peer.disk.holds_data() {
                    return Err(format!(
                        "the peer would be sync source but its data is {}",
                        peer.disk
                    ));
                }
                Plan::Target { full }
            }
            Decision::SplitBrain | Decision::Unrelated => {
                return Err(format!("no way to connect ({})", verdict.rule))
            }
        };
        Ok((plan, decision))
    }

    fn establish(&mut self, plan: Plan, verdict: Verdict, peer: &PeerInfo, out: &mut Out) {
        self.conn = ConnState::Connected;
        let mut peer_gens = peer.uuids.gens;
        if self.gens.current == peer_gens.current {
            // The peer holds this node's current generation, so a bitmap
            // UUID names nothing the peer lacks (rules 34/36: the end of
            // a resync was not recorded). Both sides retire theirs.
            if self.gens.bitmap != 0 {
                out.log(
                    Level::Info,
                    format!(
                        "the peer holds this node's current generation: bitmap UUID {:016X} retired",
                        self.gens.bitmap
                    ),
                );
            }
            self.gens.clear_bitmap_uuid();
            peer_gens.clear_bitmap_uuid();
        }
        self.peer_gens = Some(peer_gens);
        let peer_disk = match plan {
            Plan::NoSync => {
                self.repl = ReplState::Established;
                self.kept_flags &= !flags::CRASHED_PRIMARY;
                out.log(
                    Level::Info,
                    format!("connected, no resync needed ({})", verdict.rule),
                );
                if self.disk.holds_data() && peer.disk.holds_data() {
                    self.disk = DiskState::UpToDate;
                    DiskState::UpToDate
                } else {
                    peer.disk
                }
            }
            Plan::Source { full } => {
                self.repl = ReplState::SyncSource;
                if !full && self.gens.bitmap == 0 && self.gens.current == peer_gens.current {
                    // A bitmap-based resync between equal generations
                    // (rules 34/36 after retiring, 40, dirty bits, an
                    // Inconsistent peer): the bitmap is all that says what
                    // to send, and it is in memory only. Naming the peer's
                    // generation as bitmap UUID (the one the peer holds,
                    // which the bitmap is relative to) makes a crash of
                    // this node mark every block, and the next handshake
                    // choose this node as source again (rule 36), as
                    // DRBD's sync UUID does.
                    self.gens.bitmap = self.gens.current;
                }
                out.log(
                    Level::Warn,
                    format!(
                        "connected, resync to the peer ({}, {})",
                        if full { "full" } else { "bitmap-based" },
                        verdict.rule
                    ),
                );
                out.then(Action::StartSync { source: true, full });
                // The sync source's data is the newest there is (a node
                // restarted Consistent, e.g. a crashed Primary): it is
                // UpToDate now, not only once the sync finished, so it can
                // be promoted while it brings the peer up to date.
                if self.disk == DiskState::Consistent {
                    self.disk = DiskState::UpToDate;
                }
                DiskState::Inconsistent
            }
            Plan::Target { full } => {
                self.repl = ReplState::SyncTarget;
                self.disk = DiskState::Inconsistent;
                out.log(
                    Level::Warn,
                    format!(
                        "connected, resync from the peer ({}, {}); local data Inconsistent until it completes",
                        if full { "full" } else { "bitmap-based" },
                        verdict.rule
                    ),
                );
                out.then(Action::StartSync {
                    source: false,
                    full,
                });
                peer.disk
            }
        };
        self.peer = Some((peer.role, peer_disk));
    }

    /// The target's side of a completed resync from `source`.
    fn finish_as_target(&mut self, source: &Generations, out: &mut Out) {
        self.gens.adopt_peer_current(source);
        self.disk = DiskState::UpToDate;
        self.in_sync(out);
    }

    /// Both sides, once a resync completed: identical data and UUIDs.
    fn in_sync(&mut self, out: &mut Out) {
        self.repl = ReplState::Established;
        self.kept_flags &= !(flags::CRASHED_PRIMARY | flags::FULL_SYNC);
        self.peer_gens = Some(self.gens);
        if let Some((role, _)) = self.peer {
            self.peer = Some((role, DiskState::UpToDate));
        }
        out.log(Level::Info, "resync finished: both copies UpToDate");
    }

    /// Both just-created copies declared identical at `self.gens.current`.
    fn skip_initial_sync(&mut self) {
        self.disk = DiskState::UpToDate;
        self.kept_flags &= !flags::FULL_SYNC;
        if let Some(g) = self.peer_gens.as_mut() {
            g.current = self.gens.current;
            g.bitmap = 0;
        }
        if let Some((role, _)) = self.peer {
            self.peer = Some((role, DiskState::UpToDate));
        }
    }

    /// The peer session ended while connected.
    fn lose_peer(&mut self, fresh: &mut dyn FnMut() -> u64, out: &mut Out) {
        if self.repl == ReplState::SyncSource && self.gens.bitmap != 0 && self.disk.holds_data() {
            // The target adopts this node's current UUID when it gets
            // SyncDone; this node clears its bitmap UUID only when the
            // target confirms. In between, the bitmap UUID no longer
            // makes the current generation one the peer lacks: writes
            // made under it alone would be indistinguishable from the
            // peer's, and a split brain would pass for a resync.
            out.log(
                Level::Warn,
                "peer gone during a resync this node led: new data generation (the peer may hold the old one)",
            );
            self.start_generation(fresh, out);
            self.end_session(ConnState::Connecting);
            return;
        }
        match (self.role, self.disk) {
            (Role::Primary, DiskState::UpToDate) => {
                if self.gens.bitmap == 0 {
                    out.log(
                        Level::Warn,
                        "peer gone while Primary: new data generation, changes tracked in the bitmap",
                    );
                    self.start_generation(fresh, out);
                } else {
                    // The current generation is already one the peer
                    // lacks: nothing to distinguish.
                    out.log(
                        Level::Warn,
                        format!(
                            "peer gone while Primary: changes since {:016X} are tracked in the bitmap",
                            self.gens.bitmap
                        ),
                    );
                }
            }
            (
                Role::Primary,
                DiskState::Diskless
                | DiskState::Inconsistent
                | DiskState::Outdated
                | DiskState::Consistent,
            )
            | (Role::Secondary, _) => {}
        }
        self.end_session(ConnState::Connecting);
    }

    fn go_stand_alone(&mut self, reason: String, out: &mut Out) {
        out.log(Level::Error, reason.clone());
        self.end_session(ConnState::StandAlone);
        out.then(Action::StandAlone { reason });
    }

    fn end_session(&mut self, conn: ConnState) {
        self.conn = conn;
        self.repl = ReplState::Off;
        self.peer = None;
        self.peer_gens = None;
    }

    fn start_generation(&mut self, fresh: &mut dyn FnMut() -> u64, out: &mut Out) {
        let uuid = self.fresh_uuid(fresh);
        let had_bitmap = self.gens.bitmap != 0;
        self.gens.new_current(uuid);
        if !had_bitmap && self.gens.bitmap != 0 {
            // Whether this node was Primary when it started tracking
            // changes for the peer (`discard-younger-primary`).
            match self.role {
                Role::Primary => self.kept_flags |= flags::BITMAP_PRIMARY,
                Role::Secondary => self.kept_flags &= !flags::BITMAP_PRIMARY,
            }
        }
        out.log(Level::Info, format!("new current UUID {uuid:016X}"));
    }

    /// A value from `fresh` that names data and is not yet known here.
    fn fresh_uuid(&self, fresh: &mut dyn FnMut() -> u64) -> u64 {
        let taken = |u: u64| {
            u == 0
                || u == UUID_JUST_CREATED
                || self.gens.contains(u)
                || self.peer_gens.is_some_and(|g| g.contains(u))
        };
        for _ in 0..8 {
            let u = fresh();
            if !taken(u) {
                return u;
            }
        }
        // A generator that keeps repeating itself: at most 2 + 2 * 4
        // values are taken, so a free one is close.
        (UUID_JUST_CREATED + 1..)
            .find(|u| !taken(*u))
            .unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::core::uuid::Rule;
    use crate::core::HISTORY;

    const UTD: u32 = flags::CONSISTENT | flags::UP_TO_DATE;

    fn g(current: u64, bitmap: u64, history: [u64; HISTORY]) -> Generations {
        Generations {
            current,
            bitmap,
            history,
        }
    }

    fn counter() -> impl FnMut() -> u64 {
        let mut n = 0x1000;
        move || {
            n += 1;
            n
        }
    }

    fn step(node: &mut Node, ev: Event) -> Vec<Action> {
        node.handle(ev, &mut counter()).expect("accepted")
    }

    fn refused(node: &mut Node, ev: Event) -> String {
        let before = node.clone();
        let r = node.handle(ev, &mut counter()).expect_err("refused");
        assert_eq!(*node, before, "a refusal must not change the node");
        r.message
    }

    fn info(node: &Node) -> PeerInfo {
        PeerInfo {
            role: node.role(),
            disk: node.disk(),
            uuids: node.uuid_view(0),
            discard_my_data: node.discard_my_data(),
        }
    }

    /// Runs the handshake on both nodes; returns both action lists.
    fn meet(a: &mut Node, b: &mut Node) -> (Vec<Action>, Vec<Action>) {
        let (ia, ib) = (info(a), info(b));
        let ra = step(
            a,
            Event::PeerConnected {
                peer: ib,
                local_dials: true,
                local_dirty_bits: 0,
            },
        );
        let rb = step(
            b,
            Event::PeerConnected {
                peer: ia,
                local_dials: false,
                local_dirty_bits: 0,
            },
        );
        (ra, rb)
    }

    /// A connected, UpToDate pair sharing generation 0xC1.
    fn pair() -> (Node, Node) {
        let mut a = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        let mut b = a.clone();
        meet(&mut a, &mut b);
        assert_eq!(a.disk(), DiskState::UpToDate);
        (a, b)
    }

    fn has_log(actions: &[Action], level: Level) -> bool {
        actions
            .iter()
            .any(|a| matches!(a, Action::Log { level: l, .. } if *l == level))
    }

    fn without_logs(actions: Vec<Action>) -> Vec<Action> {
        actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Log { .. }))
            .collect()
    }

    // ---- disk failure ----------------------------------------------------

    fn lost_peer(n: &mut Node) {
        step(
            n,
            Event::PeerLost {
                reason: "gone".into(),
            },
        );
    }

    #[test]
    fn a_primary_whose_disk_fails_stays_primary_diskless_and_never_trusts_that_disk_again() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        let acts = step(&mut a, Event::DiskFailed);
        assert!(has_log(&acts, Level::Error));
        assert!(acts.contains(&Action::Persist));
        assert_eq!(a.role(), Role::Primary);
        assert_eq!(a.disk(), DiskState::Diskless);
        assert_eq!(a.conn(), ConnState::Connected, "the session goes on");
        // Persisted as neither consistent nor up to date, full sync pending.
        assert_eq!(a.meta_flags() & (flags::CONSISTENT | flags::UP_TO_DATE), 0);
        assert_ne!(a.meta_flags() & flags::FULL_SYNC, 0);
        assert!(step(&mut a, Event::DiskFailed).is_empty(), "once");
        // The peer hears of it: it holds the only copy now, in a new
        // generation, and the next sync to the failed node is full.
        let before = b.gens();
        let acts = step(
            &mut b,
            Event::PeerStateChanged {
                role: Role::Primary,
                disk: DiskState::Diskless,
            },
        );
        assert!(acts.contains(&Action::Persist));
        assert_eq!(b.gens().bitmap, before.current);
        assert_ne!(b.gens().current, before.current);
        assert_ne!(b.meta_flags() & flags::FULL_SYNC, 0);
        assert_eq!(b.peer(), Some((Role::Primary, DiskState::Diskless)));
        assert_eq!(b.disk(), DiskState::UpToDate);
        // A Diskless node cannot be promoted again, nor invalidated.
        step(
            &mut a,
            Event::Demote {
                force: false,
                clients: 0,
            },
        );
        assert!(refused(&mut a, Event::Promote { force: true }).contains("no local disk"));
    }

    #[test]
    fn a_failed_disk_comes_back_as_full_sync_target_of_the_node_that_kept_writing() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        // The Secondary's disk fails; the Primary goes on alone.
        step(&mut b, Event::DiskFailed);
        step(
            &mut a,
            Event::PeerStateChanged {
                role: Role::Secondary,
                disk: DiskState::Diskless,
            },
        );
        let a_gens = a.gens();
        assert_eq!(a_gens.bitmap, 0xC1, "the Primary tracks changes since 0xC1");
        // The failed node comes back with its disk (its metadata as the
        // failure left it: Inconsistent, FULL_SYNC) and reconnects.
        lost_peer(&mut a);
        let mut back = Node::from_meta(b.gens(), b.meta_flags(), true);
        assert_eq!(back.disk(), DiskState::Inconsistent);
        let (ra, rb) = meet(&mut a, &mut back);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: true
        }));
        assert!(rb.contains(&Action::StartSync {
            source: false,
            full: true
        }));
        // Even if the failed node's metadata could not record the failure
        // (it still says UpToDate at 0xC1), the survivor's FULL_SYNC and
        // its new generation make it the full sync source.
        lost_peer(&mut a);
        let mut stale = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        let (ra, rb) = meet(&mut a, &mut stale);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: true
        }));
        assert!(rb.contains(&Action::StartSync {
            source: false,
            full: true
        }));
        assert_eq!(stale.disk(), DiskState::Inconsistent);
        step(
            &mut stale,
            Event::SyncDone {
                current: a.gens().current,
            },
        );
        step(&mut a, Event::SyncFinished);
        assert_eq!(stale.disk(), DiskState::UpToDate);
        assert_eq!(a.meta_flags() & flags::FULL_SYNC, 0, "cleared by the sync");
        assert_eq!(stale.meta_flags() & flags::FULL_SYNC, 0);
    }

    #[test]
    fn a_diskless_node_connects_without_a_resync_and_two_diskless_nodes_do_not() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        step(&mut a, Event::DiskFailed);
        lost_peer(&mut a);
        lost_peer(&mut b);
        let b_gens = b.gens();
        let (ra, rb) = meet(&mut a, &mut b);
        assert!(!ra.iter().any(|x| matches!(x, Action::StartSync { .. })));
        assert!(!rb.iter().any(|x| matches!(x, Action::StartSync { .. })));
        assert_eq!(a.conn(), ConnState::Connected);
        assert_eq!(a.peer(), Some((Role::Secondary, DiskState::UpToDate)));
        assert_eq!(b.peer(), Some((Role::Primary, DiskState::Diskless)));
        assert_eq!(b.gens().bitmap, b_gens.current, "new generation on b");
        assert_ne!(b.meta_flags() & flags::FULL_SYNC, 0);
        // A restarted survivor (Consistent) is the only copy: UpToDate.
        lost_peer(&mut a);
        let mut restarted = Node::from_meta(b.gens(), b.meta_flags(), true);
        assert_eq!(restarted.disk(), DiskState::Consistent);
        meet(&mut a, &mut restarted);
        assert_eq!(restarted.disk(), DiskState::UpToDate);
        // Neither with a disk: StandAlone.
        lost_peer(&mut a);
        let mut c = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        step(&mut c, Event::DiskFailed);
        let (ra, _) = meet(&mut a, &mut c);
        assert!(ra.iter().any(|x| matches!(x, Action::StandAlone { .. })));
    }

    #[test]
    fn a_diskless_node_never_becomes_up_to_date_by_skipping_the_initial_sync() {
        let jc = g(UUID_JUST_CREATED, 0, [0, 0]);
        let mut a = Node::from_meta(jc, 0, true);
        let mut b = a.clone();
        step(&mut b, Event::DiskFailed);
        meet(&mut a, &mut b);
        assert_eq!(a.conn(), ConnState::Connected);
        assert!(refused(&mut a, Event::NewCurrentUuid { clear_bitmap: true }).contains("refused"));
        assert!(refused(&mut b, Event::SyncDone { current: 0x77 }).contains("no disk"));
        assert_eq!(b.disk(), DiskState::Diskless);
    }

    #[test]
    fn two_secondaries_the_survivor_starts_a_generation_when_the_peer_disk_fails() {
        let (mut a, mut b) = pair();
        step(&mut b, Event::DiskFailed);
        step(
            &mut a,
            Event::PeerStateChanged {
                role: Role::Secondary,
                disk: DiskState::Diskless,
            },
        );
        assert_eq!(a.gens().bitmap, 0xC1);
        assert_ne!(a.gens().current, 0xC1);
    }

    #[test]
    fn a_disk_failure_during_a_resync_ends_it() {
        let mut a = Node::from_meta(g(0xC2, 0xC1, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        meet(&mut a, &mut b);
        assert_eq!(b.repl(), ReplState::SyncTarget);
        let acts = step(&mut b, Event::DiskFailed);
        assert!(acts.iter().any(|x| matches!(x, Action::DropLink { .. })));
        assert_eq!(b.conn(), ConnState::Connecting);
        let acts = step(
            &mut a,
            Event::PeerStateChanged {
                role: Role::Secondary,
                disk: DiskState::Diskless,
            },
        );
        assert!(acts.iter().any(|x| matches!(x, Action::DropLink { .. })));
        assert_eq!(a.conn(), ConnState::Connecting);
    }

    // ---- from_meta ------------------------------------------------------

    #[test]
    fn from_meta_disk_states() {
        let d = |gens, f, has_peer| Node::from_meta(gens, f, has_peer).disk();
        let c1 = g(0xC1, 0, [0, 0]);
        assert_eq!(d(c1, UTD | flags::PEER_OUTDATED, true), DiskState::UpToDate);
        assert_eq!(d(c1, UTD, true), DiskState::Consistent);
        assert_eq!(d(c1, UTD, false), DiskState::UpToDate);
        assert_eq!(d(c1, flags::CONSISTENT, true), DiskState::Consistent);
        assert_eq!(
            d(c1, flags::CONSISTENT | flags::OUTDATED, true),
            DiskState::Outdated
        );
        assert_eq!(d(c1, 0, true), DiskState::Inconsistent);
        assert_eq!(d(c1, flags::OUTDATED, true), DiskState::Inconsistent);
        let jc = g(UUID_JUST_CREATED, 0, [0, 0]);
        assert_eq!(
            d(jc, UTD | flags::PEER_OUTDATED, true),
            DiskState::Inconsistent
        );
    }

    #[test]
    fn from_meta_roles_connection_and_crash() {
        let c1 = g(0xC1, 0, [0, 0]);
        let n = Node::from_meta(c1, UTD | flags::PRIMARY | flags::CLEAN_SHUTDOWN, true);
        assert_eq!(n.role(), Role::Secondary);
        assert_eq!(n.conn(), ConnState::Connecting);
        assert_eq!(
            n.meta_flags() & (flags::PRIMARY | flags::CLEAN_SHUTDOWN | flags::CRASHED_PRIMARY),
            0
        );
        let n = Node::from_meta(c1, UTD | flags::PRIMARY, false);
        assert_eq!(n.conn(), ConnState::StandAlone);
        assert_eq!(
            n.meta_flags() & flags::CRASHED_PRIMARY,
            flags::CRASHED_PRIMARY
        );
        assert_eq!(n.meta_flags() & flags::PRIMARY, 0);
        // Kept bits stay.
        let n = Node::from_meta(c1, UTD | flags::FULL_SYNC | flags::CRASHED_PRIMARY, true);
        assert_eq!(
            n.meta_flags(),
            flags::CONSISTENT | flags::FULL_SYNC | flags::CRASHED_PRIMARY
        );
    }

    // ---- promote --------------------------------------------------------

    #[test]
    fn promote_refused_when_peer_is_primary_even_forced() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        step(
            &mut b,
            Event::PeerStateChanged {
                role: Role::Primary,
                disk: DiskState::UpToDate,
            },
        );
        for force in [false, true] {
            assert_eq!(
                refused(&mut b, Event::Promote { force }),
                "promote refused: peer is Primary"
            );
        }
    }

    #[test]
    fn promote_refused_without_up_to_date_data() {
        let mut n = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        assert_eq!(
            refused(&mut n, Event::Promote { force: false }),
            "promote refused: local data is Consistent, not UpToDate (use --force)"
        );
        let mut n = Node::from_meta(
            g(0xC1, 0, [0, 0]),
            flags::CONSISTENT | flags::OUTDATED,
            true,
        );
        assert_eq!(
            refused(&mut n, Event::Promote { force: false }),
            "promote refused: local data is Outdated, not UpToDate (use --force)"
        );
    }

    #[test]
    fn promote_of_a_sync_target_refused_without_force() {
        let mut a = Node::from_meta(g(0xC2, 0xC1, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        meet(&mut a, &mut b);
        assert_eq!(b.repl(), ReplState::SyncTarget);
        assert_eq!(
            refused(&mut b, Event::Promote { force: false }),
            "promote refused: local data is Inconsistent, not UpToDate (use --force)"
        );
    }

    #[test]
    fn forced_promote_is_loud_and_starts_a_generation() {
        let mut n = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        let acts = step(&mut n, Event::Promote { force: true });
        assert!(has_log(&acts, Level::Error));
        assert_eq!(without_logs(acts), vec![Action::Persist]);
        assert_eq!(n.role(), Role::Primary);
        assert_eq!(n.disk(), DiskState::UpToDate);
        assert_eq!(n.gens().bitmap, 0xC1);
        assert_ne!(n.gens().current, 0xC1);
        assert_eq!(n.meta_flags() & flags::PRIMARY, flags::PRIMARY);
    }

    #[test]
    fn forced_promote_while_connected_renegotiates() {
        let mut a = Node::from_meta(g(0xC2, 0xC1, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        meet(&mut a, &mut b);
        let acts = without_logs(step(&mut b, Event::Promote { force: true }));
        assert!(matches!(
            acts.as_slice(),
            [Action::Persist, Action::DropLink { .. }]
        ));
        assert_eq!(b.conn(), ConnState::Connecting);
        // The source a starts a new generation too (it led a resync), one
        // other than b's, as random UUIDs are.
        a.handle(
            Event::PeerLost {
                reason: "dropped".into(),
            },
            &mut || 0x3003,
        )
        .expect("accepted");
        // Both moved on from 0xC1: split brain, not a sync either way.
        let (_, rb) = meet(&mut a, &mut b);
        assert!(rb.iter().any(|x| matches!(x, Action::StandAlone { .. })));
        assert_eq!(
            b.last_verdict().map(|v| v.decision),
            Some(Decision::SplitBrain)
        );
    }

    #[test]
    fn promote_disconnected_makes_a_new_current_uuid() {
        let mut n = Node::from_meta(g(0xC1, 0, [0, 0]), UTD | flags::PEER_OUTDATED, true);
        assert_eq!(n.disk(), DiskState::UpToDate);
        let acts = without_logs(step(&mut n, Event::Promote { force: false }));
        assert_eq!(acts, vec![Action::Persist]);
        assert_eq!(n.gens().bitmap, 0xC1);
        assert_eq!(n.gens().current, 0x1001);
    }

    #[test]
    fn promote_connected_to_up_to_date_peer_keeps_the_uuid() {
        let (mut a, _) = pair();
        let acts = without_logs(step(&mut a, Event::Promote { force: false }));
        assert_eq!(acts, vec![Action::Persist, Action::SendState]);
        assert_eq!(a.gens(), g(0xC1, 0, [0, 0]));
        assert!(step(&mut a, Event::Promote { force: false }).is_empty());
    }

    #[test]
    fn promote_refused_when_diskless() {
        let mut n = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        n.disk = DiskState::Diskless;
        assert_eq!(
            refused(&mut n, Event::Promote { force: true }),
            "promote refused: no local disk"
        );
    }

    // ---- demote ---------------------------------------------------------

    #[test]
    fn demote_refused_with_clients_unless_forced() {
        let (mut a, _) = pair();
        step(&mut a, Event::Promote { force: false });
        assert_eq!(
            refused(
                &mut a,
                Event::Demote {
                    force: false,
                    clients: 2
                }
            ),
            "demote refused: 2 NBD clients attached (use --force)"
        );
        assert_eq!(
            refused(
                &mut a,
                Event::Demote {
                    force: false,
                    clients: 1
                }
            ),
            "demote refused: 1 NBD client attached (use --force)"
        );
        let acts = without_logs(step(
            &mut a,
            Event::Demote {
                force: true,
                clients: 2,
            },
        ));
        assert_eq!(
            acts,
            vec![
                Action::DisconnectClients,
                Action::Persist,
                Action::SendState
            ]
        );
        assert_eq!(a.role(), Role::Secondary);
        assert_eq!(a.meta_flags() & flags::PRIMARY, 0);
        assert!(step(
            &mut a,
            Event::Demote {
                force: false,
                clients: 3
            }
        )
        .is_empty());
    }

    // ---- losing the peer ------------------------------------------------

    #[test]
    fn primary_losing_peer_rotates_without_outdating_it() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        step(
            &mut b,
            Event::PeerStateChanged {
                role: Role::Primary,
                disk: DiskState::UpToDate,
            },
        );
        let acts = without_logs(step(
            &mut a,
            Event::PeerLost {
                reason: "timeout".into(),
            },
        ));
        assert_eq!(acts, vec![Action::Persist]);
        assert_eq!(a.conn(), ConnState::Connecting);
        assert_eq!(a.gens().bitmap, 0xC1);
        assert_ne!(a.gens().current, 0xC1);
        assert_eq!(a.meta_flags() & flags::PEER_OUTDATED, 0);
        assert_eq!(a.peer(), None);
        // The Secondary keeps UpToDate in memory; a restart makes it Consistent.
        assert!(without_logs(step(
            &mut b,
            Event::PeerLost {
                reason: "timeout".into()
            }
        ))
        .is_empty());
        assert_eq!(b.disk(), DiskState::UpToDate);
        let b2 = Node::from_meta(b.gens(), b.meta_flags(), true);
        assert_eq!(b2.disk(), DiskState::Consistent);
        // On reconnect the Primary is bitmap-based sync source.
        let (ra, _) = meet(&mut a, &mut b);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: false
        }));
        assert_eq!(
            a.last_verdict().map(|v| v.rule),
            Some(Rule::PeerCurrentIsLocalBitmap)
        );
    }

    #[test]
    fn a_set_bitmap_uuid_means_no_new_generation_unless_forced() {
        let gens = g(0xC2, 0xC1, [0x11, 0]);
        // Promote while disconnected: the peer lacks 0xC2 already.
        let mut n = Node::from_meta(gens, UTD | flags::PEER_OUTDATED, true);
        step(&mut n, Event::Promote { force: false });
        assert_eq!(n.gens(), gens);
        // Forced: always a new generation.
        let mut f = Node::from_meta(gens, UTD, true);
        step(&mut f, Event::Promote { force: true });
        assert_eq!(f.gens(), g(0x1001, 0xC1, [0xC2, 0x11]));
        // A source losing its target mid-sync starts a new generation
        // (the target may have adopted 0xC2 at SyncDone: see
        // a_peer_lost_before_the_sync_end_was_confirmed_still_shows_split_brain)
        // but keeps its bitmap UUID.
        let mut a = Node::from_meta(gens, UTD | flags::PEER_OUTDATED, true);
        let mut b = Node::from_meta(g(0xC1, 0, [0x11, 0]), UTD, true);
        step(&mut a, Event::Promote { force: false });
        meet(&mut a, &mut b);
        assert_eq!(a.repl(), ReplState::SyncSource);
        step(
            &mut a,
            Event::PeerLost {
                reason: "cable".into(),
            },
        );
        assert_eq!(a.gens(), g(0x1001, 0xC1, [0xC2, 0x11]));
        // And the sync resumes from the same bitmap on reconnect.
        step(
            &mut b,
            Event::PeerLost {
                reason: "cable".into(),
            },
        );
        let (ra, _) = meet(&mut a, &mut b);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: false
        }));
    }

    #[test]
    fn a_missed_sync_finish_is_corrected_at_the_handshake() {
        // The target recorded the end of the resync, the source crashed
        // before doing so.
        let mut source =
            Node::from_meta(g(0xC2, 0xC1, [0x11, 0]), UTD | flags::PEER_OUTDATED, true);
        let mut target = Node::from_meta(g(0xC2, 0, [0xC1, 0x11]), UTD, true);
        let (rs, rt) = meet(&mut source, &mut target);
        assert_eq!(
            source.last_verdict().map(|v| v.rule),
            Some(Rule::LocalMissedSyncFinish)
        );
        assert_eq!(
            target.last_verdict().map(|v| v.rule),
            Some(Rule::PeerMissedSyncFinish)
        );
        assert_eq!(
            without_logs(rs),
            vec![
                Action::Persist,
                Action::StartSync {
                    source: true,
                    full: false
                }
            ]
        );
        assert!(rt.contains(&Action::StartSync {
            source: false,
            full: false
        }));
        // The source's old bitmap UUID is retired at once (the peer has
        // 0xC2); until the resync ends its bitmap is relative to 0xC2.
        assert_eq!(source.gens(), g(0xC2, 0xC2, [0xC1, 0x11]));
        // Losing the peer now starts a new generation again.
        step(&mut source, Event::Promote { force: false });
        step(
            &mut source,
            Event::PeerLost {
                reason: "cable".into(),
            },
        );
        assert_eq!(source.gens().bitmap, 0xC2);
    }

    #[test]
    fn admin_disconnect_of_primary_rotates_and_drops_link() {
        let (mut a, _) = pair();
        step(&mut a, Event::Promote { force: false });
        let acts = without_logs(step(&mut a, Event::Disconnect));
        assert!(matches!(
            acts.as_slice(),
            [Action::Persist, Action::DropLink { .. }]
        ));
        assert_eq!(a.conn(), ConnState::StandAlone);
        assert_eq!(a.gens().bitmap, 0xC1);
        assert!(step(&mut a, Event::Disconnect).is_empty());
        step(
            &mut a,
            Event::Connect {
                discard_my_data: false,
            },
        );
        assert_eq!(a.conn(), ConnState::Connecting);
        assert_eq!(
            refused(
                &mut Node::from_meta(g(0xC1, 0, [0, 0]), UTD, false),
                Event::Connect {
                    discard_my_data: false
                }
            ),
            "connect refused: no peer configured"
        );
        let (mut c, _) = pair();
        assert_eq!(
            refused(
                &mut c,
                Event::Connect {
                    discard_my_data: false
                }
            ),
            "connect refused: already connected"
        );
    }

    // ---- handshake ------------------------------------------------------

    #[test]
    fn no_sync_makes_consistent_disks_up_to_date() {
        let mut a = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        let mut b = Node::from_meta(
            g(0xC1, 0, [0, 0]),
            flags::CONSISTENT | flags::OUTDATED,
            true,
        );
        let (ra, rb) = meet(&mut a, &mut b);
        assert_eq!(without_logs(ra), vec![Action::Persist]);
        assert_eq!(without_logs(rb), vec![Action::Persist]);
        for n in [&a, &b] {
            assert_eq!(n.disk(), DiskState::UpToDate);
            assert_eq!(n.repl(), ReplState::Established);
            assert_eq!(n.peer(), Some((Role::Secondary, DiskState::UpToDate)));
            assert_eq!(n.last_verdict().map(|v| v.rule), Some(Rule::SameCurrent));
        }
    }

    #[test]
    fn sync_target_becomes_inconsistent_then_up_to_date() {
        let mut a = Node::from_meta(g(0xC2, 0xC1, [0x11, 0]), UTD | flags::CRASHED_PRIMARY, true);
        let mut b = Node::from_meta(g(0xC1, 0, [0x11, 0]), UTD | flags::FULL_SYNC, true);
        let (ra, rb) = meet(&mut a, &mut b);
        // b's FULL_SYNC flag makes it full; a, restarted Consistent, is
        // the source and UpToDate from now on.
        assert_eq!(
            without_logs(ra),
            vec![
                Action::Persist,
                Action::StartSync {
                    source: true,
                    full: true
                }
            ]
        );
        assert_eq!(a.disk(), DiskState::UpToDate);
        assert_eq!(
            without_logs(rb),
            vec![
                Action::Persist,
                Action::StartSync {
                    source: false,
                    full: true
                }
            ]
        );
        assert_eq!(b.disk(), DiskState::Inconsistent);
        assert_eq!(b.meta_flags() & flags::CONSISTENT, 0);
        assert_eq!(a.peer(), Some((Role::Secondary, DiskState::Inconsistent)));
        assert_eq!(
            (a.repl(), b.repl()),
            (ReplState::SyncSource, ReplState::SyncTarget)
        );
        // A restarted target stays Inconsistent and resumes.
        let b2 = Node::from_meta(b.gens(), b.meta_flags(), true);
        assert_eq!(b2.disk(), DiskState::Inconsistent);

        assert_eq!(
            without_logs(step(&mut a, Event::SyncFinished)),
            vec![Action::Persist]
        );
        assert_eq!(
            without_logs(step(&mut b, Event::SyncFinished)),
            vec![Action::Persist]
        );
        assert_eq!(a.gens(), b.gens());
        assert_eq!(a.gens(), g(0xC2, 0, [0xC1, 0x11]));
        for n in [&a, &b] {
            assert_eq!(n.disk(), DiskState::UpToDate);
            assert_eq!(n.repl(), ReplState::Established);
            assert_eq!(n.peer().map(|p| p.1), Some(DiskState::UpToDate));
            assert_eq!(
                n.meta_flags() & (flags::CRASHED_PRIMARY | flags::FULL_SYNC),
                0
            );
        }
        // A stale SyncFinished does nothing.
        assert!(step(&mut a, Event::SyncFinished).is_empty());
    }

    #[test]
    fn split_brain_goes_stand_alone_on_both() {
        let mut a = Node::from_meta(g(0xA2, 0xC1, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xB2, 0xC1, [0, 0]), UTD, true);
        let (ra, rb) = meet(&mut a, &mut b);
        for (n, acts) in [(&a, ra), (&b, rb)] {
            assert_eq!(n.conn(), ConnState::StandAlone);
            assert!(has_log(&acts, Level::Error));
            let reason = acts.iter().find_map(|x| match x {
                Action::StandAlone { reason } => Some(reason.clone()),
                _ => None,
            });
            assert!(reason.expect("StandAlone").contains("rule 90"));
            assert_eq!(
                n.last_verdict().map(|v| v.decision),
                Some(Decision::SplitBrain)
            );
        }
        assert_eq!(
            refused(
                &mut a,
                Event::PeerConnected {
                    peer: info(&b),
                    local_dials: true,
                    local_dirty_bits: 0
                }
            ),
            "handshake refused: this node is StandAlone (run connect)"
        );
    }

    #[test]
    fn unrelated_data_goes_stand_alone() {
        let mut a = Node::from_meta(g(0xA2, 0, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xB2, 0, [0, 0]), UTD, true);
        let (ra, _) = meet(&mut a, &mut b);
        assert!(ra
            .iter()
            .any(|x| matches!(x, Action::StandAlone { reason } if reason.contains("unrelated"))));
        assert_eq!(
            (a.conn(), b.conn()),
            (ConnState::StandAlone, ConnState::StandAlone)
        );
    }

    #[test]
    fn discard_my_data_resolves_split_brain_bitmap_based() {
        let mut a = Node::from_meta(g(0xA2, 0xC1, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xB2, 0xC1, [0, 0]), UTD, true);
        step(
            &mut b,
            Event::Connect {
                discard_my_data: true,
            },
        );
        assert!(b.discard_my_data());
        let (ra, rb) = meet(&mut a, &mut b);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: false
        }));
        assert!(rb.contains(&Action::StartSync {
            source: false,
            full: false
        }));
        assert!(!b.discard_my_data());
        assert_eq!(
            b.last_verdict().map(|v| (v.decision, v.rule)),
            Some((
                Decision::SyncTarget { full: false },
                Rule::SplitBrainBitmapsEqual
            ))
        );
        step(&mut a, Event::SyncFinished);
        step(&mut b, Event::SyncFinished);
        assert_eq!(a.gens(), b.gens());
        assert!(!b.gens().contains(0xB2));
    }

    #[test]
    fn both_discarding_is_refused() {
        let mut a = Node::from_meta(g(0xA2, 0xC1, [0, 0]), UTD, true);
        let mut b = Node::from_meta(g(0xB2, 0xC1, [0, 0]), UTD, true);
        step(
            &mut a,
            Event::Connect {
                discard_my_data: true,
            },
        );
        step(
            &mut b,
            Event::Connect {
                discard_my_data: true,
            },
        );
        let (ra, _) = meet(&mut a, &mut b);
        assert!(ra.iter().any(
            |x| matches!(x, Action::StandAlone { reason } if reason.contains("both nodes asked"))
        ));
        assert_eq!(
            (a.conn(), b.conn()),
            (ConnState::StandAlone, ConnState::StandAlone)
        );
    }

    #[test]
    fn two_primaries_are_refused() {
        let mut a = Node::from_meta(g(0xC1, 0, [0, 0]), UTD | flags::PEER_OUTDATED, true);
        let mut b = a.clone();
        step(&mut a, Event::Promote { force: false });
        step(&mut b, Event::Promote { force: false });
        // Even a discard-my-data (which would resolve the split brain).
        step(
            &mut a,
            Event::Connect {
                discard_my_data: true,
            },
        );
        let (ra, rb) = meet(&mut a, &mut b);
        for acts in [ra, rb] {
            assert!(acts.iter().any(
                |x| matches!(x, Action::StandAlone { reason } if reason.contains("both nodes are Primary"))
            ));
        }
        assert_eq!(
            (a.conn(), b.conn()),
            (ConnState::StandAlone, ConnState::StandAlone)
        );
    }

    #[test]
    fn a_primary_never_becomes_sync_target() {
        let mut behind = Node::from_meta(g(0xC1, 0, [0, 0]), UTD | flags::PEER_OUTDATED, true);
        behind.role = Role::Primary;
        let mut ahead = Node::from_meta(g(0xC2, 0xC1, [0, 0]), UTD, true);
        let (rp, ra) = meet(&mut behind, &mut ahead);
        assert!(rp.iter().any(
            |x| matches!(x, Action::StandAlone { reason } if reason.contains("this node is Primary"))
        ));
        assert!(ra.iter().any(
            |x| matches!(x, Action::StandAlone { reason } if reason.contains("the peer is Primary"))
        ));
        assert_eq!(behind.disk(), DiskState::UpToDate);
    }

    #[test]
    fn an_inconsistent_node_is_never_sync_source() {
        // Both Inconsistent, UUIDs say sync: nobody has valid data.
        let mut a = Node::from_meta(g(0xC2, 0xC1, [0, 0]), 0, true);
        let mut b = Node::from_meta(g(0xC1, 0, [0, 0]), 0, true);
        let (ra, rb) = meet(&mut a, &mut b);
        assert!(ra.iter().any(
            |x| matches!(x, Action::StandAlone { reason } if reason.contains("would be sync source"))
        ));
        assert!(rb.iter().any(
            |x| matches!(x, Action::StandAlone { reason } if reason.contains("would be sync source"))
        ));
    }

    #[test]
    fn dual_primary_race_goes_stand_alone() {
        let (mut a, _) = pair();
        step(&mut a, Event::Promote { force: false });
        let acts = without_logs(step(
            &mut a,
            Event::PeerStateChanged {
                role: Role::Primary,
                disk: DiskState::UpToDate,
            },
        ));
        assert!(matches!(
            acts.as_slice(),
            [Action::Persist, Action::StandAlone { .. }]
        ));
        assert_eq!(a.conn(), ConnState::StandAlone);
        assert_eq!(a.gens().bitmap, 0xC1);
    }

    /// Found by the simulator (`core::sim`): a crashed Primary leads a
    /// rule-40 resync; it crashed again, as Secondary, before the resync
    /// ended. Its bitmap (all blocks, kept in memory only) was gone, its
    /// superblock no longer said PRIMARY, and the shell marks every block
    /// only after a crash of a Primary or of a node with a bitmap UUID:
    /// the repeated rule-40 resync was bitmap-based with an empty bitmap,
    /// copied nothing, and both nodes called different data UpToDate.
    #[test]
    fn a_crashed_primary_that_crashes_again_still_leads_a_full_sync() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        // a crashes while Primary and comes back.
        let mut a = Node::from_meta(a.gens(), a.meta_flags(), true);
        assert_eq!(
            a.meta_flags() & (flags::CRASHED_PRIMARY | flags::FULL_SYNC),
            flags::CRASHED_PRIMARY | flags::FULL_SYNC
        );
        step(
            &mut b,
            Event::PeerLost {
                reason: "crash".into(),
            },
        );
        let (ra, _) = meet(&mut a, &mut b);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: true
        }));
        assert_eq!(
            a.last_verdict().map(|v| v.rule),
            Some(Rule::CrashedPrimaryLocal)
        );
        // a crashes again, as Secondary, before the resync ends.
        let mut a = Node::from_meta(a.gens(), a.meta_flags(), true);
        step(
            &mut b,
            Event::PeerLost {
                reason: "crash".into(),
            },
        );
        let (ra, rb) = meet(&mut a, &mut b);
        assert!(ra.contains(&Action::StartSync {
            source: true,
            full: true
        }));
        assert!(rb.contains(&Action::StartSync {
            source: false,
            full: true
        }));
        // Only a completed sync clears the flags.
        step(&mut a, Event::SyncFinished);
        assert_eq!(
            a.meta_flags() & (flags::CRASHED_PRIMARY | flags::FULL_SYNC),
            0
        );
    }

    /// Found by the simulator (`core::sim`): a Primary led a resync
    /// (rule 70) and the link dropped after the target adopted its UUIDs
    /// at `SyncDone` but before the target's confirmation reached it. Its
    /// bitmap UUID was still set, so losing the peer started no new
    /// generation; the peer, promoted alone, started one with the old
    /// current as bitmap UUID. Both wrote; on reconnect rule 70 made the
    /// peer sync source and the first Primary's writes would have been
    /// overwritten instead of a split brain being reported.
    #[test]
    fn a_peer_lost_before_the_sync_end_was_confirmed_still_shows_split_brain() {
        for source_role in [Role::Primary, Role::Secondary] {
            let mut src = Node::from_meta(g(0xC2, 0xC1, [0, 0]), UTD | flags::PEER_OUTDATED, true);
            if source_role == Role::Primary {
                step(&mut src, Event::Promote { force: false });
            }
            let mut tgt = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
            meet(&mut src, &mut tgt);
            assert_eq!(src.repl(), ReplState::SyncSource);
            // The target records the end; the link drops before the
            // source hears back.
            step(&mut tgt, Event::SyncDone { current: 0xC2 });
            assert_eq!(tgt.gens().current, 0xC2);
            for n in [&mut src, &mut tgt] {
                step(
                    n,
                    Event::PeerLost {
                        reason: "cut".into(),
                    },
                );
            }
            assert_ne!(src.gens().current, 0xC2, "{source_role}: a new generation");
            // Both write alone (the target's new UUID differs from the
            // source's, as random ones do).
            step(&mut src, Event::Promote { force: false });
            tgt.handle(Event::Promote { force: false }, &mut || 0x2002)
                .expect("promoted");
            let (ra, _) = meet(&mut src, &mut tgt);
            assert_eq!(
                src.last_verdict().map(|v| v.decision),
                Some(Decision::SplitBrain),
                "{source_role}"
            );
            assert!(ra.iter().any(|x| matches!(x, Action::StandAlone { .. })));
        }
        // Without a write on the peer, the source's data still wins.
        let mut src = Node::from_meta(g(0xC2, 0xC1, [0, 0]), UTD | flags::PEER_OUTDATED, true);
        let mut tgt = Node::from_meta(g(0xC1, 0, [0, 0]), UTD, true);
        meet(&mut src, &mut tgt);
        step(&mut tgt, Event::SyncDone { current: 0xC2 });
        for n in [&mut src, &mut tgt] {
            step(
                n,
                Event::PeerLost {
                    reason: "cut".into(),
                },
            );
        }
        meet(&mut src, &mut tgt);
        assert_eq!(src.repl(), ReplState::SyncSource);
    }

    /// Found by the simulator (`core::sim`): a bitmap-based resync
    /// between equal generations (here: the source's bitmap marks writes
    /// the peer lost from its page cache) left the source without a
    /// bitmap UUID, and the shell marks every block after a crash only
    /// for a Primary or a node with a bitmap UUID. The source crashed
    /// (as Secondary) mid-sync, came back with an empty bitmap, and the
    /// next resync (the target still Inconsistent) copied nothing.
    #[test]
    fn a_bitmap_based_source_between_equal_generations_names_a_bitmap_uuid() {
        let c1 = g(0xC1, 0, [0x11, 0]);
        let mut src = Node::from_meta(c1, UTD, true);
        let mut tgt = Node::from_meta(c1, UTD, true);
        let view = |n: &Node, bits| PeerInfo {
            uuids: n.uuid_view(bits),
            ..info(n)
        };
        let (ps, pt) = (view(&src, 3), view(&tgt, 0));
        step(
            &mut src,
            Event::PeerConnected {
                peer: pt,
                local_dials: true,
                local_dirty_bits: 3,
            },
        );
        step(
            &mut tgt,
            Event::PeerConnected {
                peer: ps,
                local_dials: false,
                local_dirty_bits: 0,
            },
        );
        assert_eq!(src.repl(), ReplState::SyncSource);
        assert_eq!(src.gens(), g(0xC1, 0xC1, [0x11, 0]));
        // The source crashes mid-sync; the bitmap UUID makes the shell
        // mark every block, and the source leads again.
        let mut src = Node::from_meta(src.gens(), src.meta_flags(), true);
        step(
            &mut tgt,
            Event::PeerLost {
                reason: "crash".into(),
            },
        );
        let (rs, _) = meet(&mut src, &mut tgt);
        assert!(rs.contains(&Action::StartSync {
            source: true,
            full: false
        }));
        assert_eq!(
            src.last_verdict().map(|v| v.rule),
            Some(Rule::LocalBitmapOnly)
        );
        // Its end leaves equal UUIDs on both.
        step(&mut tgt, Event::SyncDone { current: 0xC1 });
        step(&mut src, Event::SyncFinished);
        assert_eq!(src.gens(), tgt.gens());
        assert_eq!(src.gens(), c1);
    }

    /// With the activity log, a crashed Primary leads a bitmap-based sync
    /// (the shell marked the logged extents); a second crash before it
    /// ends keeps `CRASHED_PRIMARY` (the persisted bitmap keeps the marks).
    #[test]
    fn a_crashed_primary_with_an_activity_log_leads_a_bitmap_based_sync() {
        let (mut a, mut b) = pair();
        a.set_activity_log(true);
        step(&mut a, Event::Promote { force: false });
        assert_ne!(a.meta_flags() & flags::ACTIVITY_LOG, 0);
        for _ in 0..2 {
            let mut back = Node::from_meta(a.gens(), a.meta_flags(), true);
            assert_eq!(
                back.meta_flags() & (flags::CRASHED_PRIMARY | flags::FULL_SYNC),
                flags::CRASHED_PRIMARY
            );
            back.set_activity_log(true);
            step(
                &mut b,
                Event::PeerLost {
                    reason: "crash".into(),
                },
            );
            let (ra, _) = meet(&mut back, &mut b);
            assert!(ra.contains(&Action::StartSync {
                source: true,
                full: false
            }));
            a = back;
        }
        // Without the log the old rule holds.
        a.set_activity_log(false);
        let back = Node::from_meta(a.gens(), a.meta_flags() | flags::PRIMARY, true);
        assert_ne!(back.meta_flags() & flags::FULL_SYNC, 0);
    }

    #[test]
    fn shutdown_sets_clean_shutdown_and_clears_primary() {
        let (mut a, _) = pair();
        step(&mut a, Event::Promote { force: false });
        let acts = without_logs(step(&mut a, Event::Shutdown));
        assert!(matches!(
            acts.as_slice(),
            [Action::Persist, Action::DropLink { .. }]
        ));
        let f = a.meta_flags();
        assert_eq!(
            f & (flags::CLEAN_SHUTDOWN | flags::PRIMARY),
            flags::CLEAN_SHUTDOWN
        );
        let back = Node::from_meta(a.gens(), f, true);
        assert_eq!(
            back.meta_flags() & (flags::CLEAN_SHUTDOWN | flags::CRASHED_PRIMARY),
            0
        );
    }

    #[test]
    fn skip_initial_sync_with_new_current_uuid_and_sync_done() {
        let jc = g(UUID_JUST_CREATED, 0, [0, 0]);
        let mut a = Node::from_meta(jc, 0, true);
        let mut b = Node::from_meta(jc, 0, true);
        meet(&mut a, &mut b);
        assert_eq!(
            a.last_verdict().map(|v| v.rule),
            Some(Rule::BothJustCreated)
        );
        assert_eq!(a.disk(), DiskState::Inconsistent);
        assert!(refused(
            &mut a,
            Event::NewCurrentUuid {
                clear_bitmap: false
            }
        )
        .contains("refused"));
        let acts = without_logs(step(&mut a, Event::NewCurrentUuid { clear_bitmap: true }));
        assert_eq!(acts, vec![Action::Persist, Action::SendState]);
        assert_eq!(a.disk(), DiskState::UpToDate);
        let current = a.gens().current;
        assert_eq!(
            without_logs(step(&mut b, Event::SyncDone { current })),
            vec![Action::Persist]
        );
        assert_eq!(a.gens(), b.gens());
        assert_eq!(b.disk(), DiskState::UpToDate);
        assert_eq!(a.peer(), Some((Role::Secondary, DiskState::UpToDate)));
        // Repeating is harmless; another generation is refused.
        assert!(step(&mut b, Event::SyncDone { current }).is_empty());
        assert!(refused(&mut b, Event::SyncDone { current: 0x77 }).contains("refused"));
    }

    #[test]
    fn new_current_uuid_stand_alone() {
        let mut n = Node::from_meta(g(0xC2, 0xC1, [0x11, 0]), UTD, false);
        step(
            &mut n,
            Event::NewCurrentUuid {
                clear_bitmap: false,
            },
        );
        assert_eq!(n.gens(), g(0x1001, 0xC2, [0xC1, 0x11]));
        let mut c = Node::from_meta(g(0xC2, 0, [0, 0]), UTD, true);
        assert!(
            refused(&mut c, Event::NewCurrentUuid { clear_bitmap: true })
                .contains("disconnect first")
        );
    }

    #[test]
    fn fresh_uuids_skip_known_and_empty_values() {
        let mut n = Node::from_meta(g(0x1001, 0, [0, 0]), UTD | flags::PEER_OUTDATED, false);
        let mut vals = [0u64, UUID_JUST_CREATED, 0x1001, 0x2002].into_iter();
        n.handle(Event::Promote { force: false }, &mut || {
            vals.next().unwrap_or(0)
        })
        .expect("promoted");
        assert_eq!(n.gens().current, 0x2002);
        let mut m = Node::from_meta(g(0xC1, 0, [0, 0]), UTD | flags::PEER_OUTDATED, false);
        m.handle(Event::Promote { force: false }, &mut || 0xC1)
            .expect("promoted");
        assert_eq!(m.gens(), g(5, 0xC1, [0, 0]));
    }

    /// Meets with the given dirty bits on each side.
    fn meet_dirty(a: &mut Node, b: &mut Node, da: u64, db: u64) -> (Vec<Action>, Vec<Action>) {
        let ia = PeerInfo {
            uuids: a.uuid_view(da),
            ..info(a)
        };
        let ib = PeerInfo {
            uuids: b.uuid_view(db),
            ..info(b)
        };
        let ra = step(
            a,
            Event::PeerConnected {
                peer: ib,
                local_dials: true,
                local_dirty_bits: da,
            },
        );
        let rb = step(
            b,
            Event::PeerConnected {
                peer: ia,
                local_dials: false,
                local_dirty_bits: db,
            },
        );
        (ra, rb)
    }

    /// A pair split from a connected one: `a` was Primary when the link
    /// went, `b` promoted apart; then both demoted unless `keep` names
    /// one to stay Primary (0 for a, 1 for b).
    fn split_pair(policy: Policy, keep: Option<usize>) -> (Node, Node) {
        let (mut a, mut b) = pair();
        a.set_split_brain_policy(policy);
        b.set_split_brain_policy(policy);
        step(&mut a, Event::Promote { force: false });
        step(&mut a, Event::Disconnect);
        step(
            &mut b,
            Event::PeerLost {
                reason: "cut".into(),
            },
        );
        step(&mut b, Event::Disconnect);
        b.handle(Event::Promote { force: false }, &mut || 0x7777)
            .expect("promoted");
        assert_eq!(
            a.meta_flags() & flags::BITMAP_PRIMARY,
            flags::BITMAP_PRIMARY
        );
        assert_eq!(b.meta_flags() & flags::BITMAP_PRIMARY, 0);
        for (i, n) in [&mut a, &mut b].into_iter().enumerate() {
            if keep != Some(i) {
                step(
                    n,
                    Event::Demote {
                        force: false,
                        clients: 0,
                    },
                );
            }
            step(
                n,
                Event::Connect {
                    discard_my_data: false,
                },
            );
        }
        (a, b)
    }

    fn policy(p0: split_brain::After0Pri, p1: split_brain::After1Pri) -> Policy {
        Policy {
            after_sb_0pri: p0,
            after_sb_1pri: p1,
        }
    }

    #[test]
    fn without_a_policy_split_brain_goes_stand_alone_and_records_nothing() {
        let (mut a, mut b) = split_pair(Policy::default(), None);
        meet_dirty(&mut a, &mut b, 3, 5);
        assert_eq!(
            (a.conn(), b.conn()),
            (ConnState::StandAlone, ConnState::StandAlone)
        );
        assert_eq!(
            a.last_verdict().map(|v| v.rule),
            Some(Rule::SplitBrainBitmapsEqual)
        );
        let r = a.last_split_brain().expect("asked");
        assert_eq!(r.victim, None);
    }

    #[test]
    fn a_policy_resolves_split_brain_as_a_bitmap_based_sync_and_says_why() {
        use split_brain::{After0Pri, After1Pri, Victim};
        let p = policy(After0Pri::DiscardLeastChanges, After1Pri::Disconnect);
        let (mut a, mut b) = split_pair(p, None);
        let (ra, rb) = meet_dirty(&mut a, &mut b, 3, 5);
        assert!(
            ra.contains(&Action::StartSync {
                source: false,
                full: false
            }),
            "{ra:?}"
        );
        assert!(
            rb.contains(&Action::StartSync {
                source: true,
                full: false
            }),
            "{rb:?}"
        );
        assert_eq!(
            (a.repl(), b.repl()),
            (ReplState::SyncTarget, ReplState::SyncSource)
        );
        let r = a.last_split_brain().expect("resolved");
        assert_eq!(
            (r.victim, r.local_changes, r.peer_changes),
            (Some(Victim::Local), 3, 5)
        );
        assert!(ra.iter().any(|x| matches!(x, Action::Log { level: Level::Warn, message } if message.contains("resolved automatically") && message.contains("this node changed 3 blocks, the peer 5"))), "{ra:?}");
        assert_eq!(
            b.last_split_brain().and_then(|r| r.victim),
            Some(Victim::Peer)
        );
        // The sync ends as any other: identical UUIDs.
        step(&mut a, Event::SyncFinished);
        step(&mut b, Event::SyncFinished);
        assert_eq!(a.gens(), b.gens());
    }

    #[test]
    fn discard_younger_primary_uses_the_flag_set_at_the_split() {
        use split_brain::{After0Pri, After1Pri};
        let p = policy(After0Pri::DiscardYoungerPrimary, After1Pri::Disconnect);
        let (mut a, mut b) = split_pair(p, None);
        // b wrote far less, but was promoted after the split.
        meet_dirty(&mut a, &mut b, 500, 1);
        assert_eq!(
            (a.repl(), b.repl()),
            (ReplState::SyncSource, ReplState::SyncTarget)
        );
        // The flag goes with the bitmap UUID once the sync is done.
        step(&mut a, Event::SyncFinished);
        step(&mut b, Event::SyncFinished);
        assert_eq!(a.meta_flags() & flags::BITMAP_PRIMARY, 0);
        assert_eq!(b.meta_flags() & flags::BITMAP_PRIMARY, 0);
    }

    #[test]
    fn discard_secondary_never_makes_the_primary_a_target() {
        use split_brain::{After0Pri, After1Pri};
        let p = policy(After0Pri::Disconnect, After1Pri::DiscardSecondary);
        let (mut a, mut b) = split_pair(p, Some(1));
        meet_dirty(&mut a, &mut b, 100, 1);
        assert_eq!(
            (a.repl(), b.repl()),
            (ReplState::SyncTarget, ReplState::SyncSource)
        );
        assert_eq!(b.role(), Role::Primary);
    }

    #[test]
    fn the_manual_discard_of_a_rule_90_split_is_bitmap_based_and_rule_100_full() {
        let (mut a, mut b) = split_pair(Policy::default(), None);
        step(&mut a, Event::Disconnect);
        step(
            &mut a,
            Event::Connect {
                discard_my_data: true,
            },
        );
        let (ra, _) = meet_dirty(&mut a, &mut b, 3, 5);
        assert!(
            ra.contains(&Action::StartSync {
                source: false,
                full: false
            }),
            "{ra:?}"
        );
        // Shared only an older generation (rule 100): full.
        let mut c = Node::from_meta(g(0xA2, 0xA1, [0xC1, 0]), UTD, true);
        let mut d = Node::from_meta(g(0xB2, 0xB1, [0xC1, 0]), UTD, true);
        step(
            &mut c,
            Event::Connect {
                discard_my_data: true,
            },
        );
        let (rc, _) = meet_dirty(&mut c, &mut d, 3, 5);
        assert_eq!(
            c.last_verdict().map(|v| v.rule),
            Some(Rule::SplitBrainHistoryShared)
        );
        assert!(
            rc.contains(&Action::StartSync {
                source: false,
                full: true
            }),
            "{rc:?}"
        );
    }

    #[test]
    fn both_dirty_at_the_same_generation_the_primary_is_the_source() {
        for primary_dials in [true, false] {
            let (mut a, mut b) = pair();
            step(&mut a, Event::Disconnect);
            step(
                &mut b,
                Event::PeerLost {
                    reason: "cut".into(),
                },
            );
            step(
                &mut a,
                Event::Connect {
                    discard_my_data: false,
                },
            );
            let (p, s) = if primary_dials {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            p.role = Role::Primary;
            let (mut x, mut y) = (p.clone(), s.clone());
            let (rx, _) = if primary_dials {
                meet_dirty(&mut x, &mut y, 2, 2)
            } else {
                let (ry, rx) = meet_dirty(&mut y, &mut x, 2, 2);
                (rx, ry)
            };
            assert!(
                rx.contains(&Action::StartSync {
                    source: true,
                    full: false
                }),
                "{primary_dials}: {rx:?}"
            );
            assert_eq!(y.repl(), ReplState::SyncTarget);
            assert_eq!(x.last_verdict().map(|v| v.rule), Some(Rule::BothDirtyBits));
        }
    }

    #[test]
    fn invalidate_needs_an_uptodate_peer_and_makes_a_persistent_full_sync_target() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        assert!(refused(&mut a, Event::Invalidate).contains("Primary"));
        let acts = without_logs(step(&mut b, Event::Invalidate));
        assert!(
            matches!(acts.as_slice(), [Action::Persist, Action::DropLink { .. }]),
            "{acts:?}"
        );
        assert_eq!(
            (b.disk(), b.conn()),
            (DiskState::Inconsistent, ConnState::Connecting)
        );
        assert_eq!(
            b.meta_flags() & (flags::FULL_SYNC | flags::CONSISTENT),
            flags::FULL_SYNC
        );
        // Not connected: refused.
        assert!(refused(&mut b, Event::Invalidate).contains("connected peer"));
        // A crash before the sync keeps it full.
        let mut b = Node::from_meta(b.gens(), b.meta_flags(), true);
        step(
            &mut a,
            Event::PeerLost {
                reason: "invalidate".into(),
            },
        );
        let (ra, rb) = meet(&mut a, &mut b);
        assert!(
            ra.contains(&Action::StartSync {
                source: true,
                full: true
            }),
            "{ra:?}"
        );
        assert!(
            rb.contains(&Action::StartSync {
                source: false,
                full: true
            }),
            "{rb:?}"
        );
        step(&mut b, Event::SyncFinished);
        assert_eq!(b.meta_flags() & flags::FULL_SYNC, 0);
    }

    #[test]
    fn serde_names() {
        assert_eq!(
            serde_json::to_string(&DiskState::UpToDate).unwrap(),
            r#""UpToDate""#
        );
        assert_eq!(
            serde_json::to_string(&ConnState::StandAlone).unwrap(),
            r#""StandAlone""#
        );
        assert_eq!(
            serde_json::to_string(&ReplState::SyncTarget).unwrap(),
            r#""SyncTarget""#
        );
        assert_eq!(DiskState::Consistent.to_string(), "Consistent");
    }

    #[test]
    fn outdate_marks_an_unconnected_secondary_which_then_needs_force_to_promote() {
        let (mut a, mut b) = pair();
        let msg = refused(&mut b, Event::Outdate);
        assert!(msg.contains("connected"), "{msg}");
        step(&mut a, Event::Promote { force: false });
        step(
            &mut a,
            Event::PeerLost {
                reason: "cut".into(),
            },
        );
        step(
            &mut b,
            Event::PeerLost {
                reason: "cut".into(),
            },
        );
        let msg = refused(&mut a, Event::Outdate);
        assert!(msg.contains("Primary"), "{msg}");
        let actions = step(&mut b, Event::Outdate);
        assert!(actions.contains(&Action::Persist));
        assert_eq!(b.disk(), DiskState::Outdated);
        assert_ne!(b.meta_flags() & flags::OUTDATED, 0);
        // Idempotent.
        assert!(!step(&mut b, Event::Outdate).contains(&Action::Persist));
        let msg = refused(&mut b, Event::Promote { force: false });
        assert!(
            msg.contains("Outdated, not UpToDate (use --force)"),
            "{msg}"
        );
        // Stays Outdated across a restart.
        let again = Node::from_meta(b.gens(), b.meta_flags(), true);
        assert_eq!(again.disk(), DiskState::Outdated);
        step(&mut b, Event::Promote { force: true });
        assert_eq!(b.role(), Role::Primary);
    }

    #[test]
    fn a_fenced_peer_is_remembered_until_the_next_handshake() {
        let (mut a, mut b) = pair();
        step(&mut a, Event::Promote { force: false });
        // Ignored while connected.
        assert!(!step(&mut a, Event::PeerFenced).contains(&Action::Persist));
        step(
            &mut a,
            Event::PeerLost {
                reason: "cut".into(),
            },
        );
        step(
            &mut b,
            Event::PeerLost {
                reason: "cut".into(),
            },
        );
        assert!(step(&mut a, Event::PeerFenced).contains(&Action::Persist));
        assert!(a.peer_outdated());
        // A restart comes back UpToDate: the peer cannot have newer data.
        step(&mut a, Event::Shutdown);
        let mut a = Node::from_meta(a.gens(), a.meta_flags(), true);
        assert_eq!(a.disk(), DiskState::UpToDate);
        assert!(a.peer_outdated());
        step(&mut b, Event::Shutdown);
        let mut b = Node::from_meta(b.gens(), b.meta_flags(), true);
        meet(&mut a, &mut b);
        assert!(!a.peer_outdated());
    }
}
