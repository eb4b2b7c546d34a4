//! Synchronous replication of one resource to its peer (protocol C), and
//! the resource's life cycle around the pure state machine in
//! `crate::core`: metadata, up/down, roles, the peer link.
//!
//! A `Replica` owns the local store, its metadata, the out-of-sync bitmap
//! and the link to the peer. Its pieces:
//!
//! - this module: the resource shell: node state, metadata, operator verbs
//!   (up/down, promote/demote, connect, ...), status and events;
//! - `datapath`: the `Store` the NBD frontend writes to on the Primary.
//!   Each write takes an interval lock on its range, is written locally
//!   and queued for the peer, and completes when the peer acknowledges it
//!   (or, if the peer is lost, with the range marked out of sync). A FLUSH
//!   becomes a Barrier that the peer acknowledges only when every earlier
//!   write is durable there;
//! - `peer`: the link loop (connect, handshake, session) and the role
//!   modes: the Primary's receiver, which completes writes from Acks;
//! - `apply`: the Secondary's in-order apply loop;
//! - `resync`: the sync source's copy loop;
//! - `link`: frame I/O, the authenticated handshake and the session
//!   (outbox, requests in flight, transfer log).
//!
//! Roles change within a session: each side runs the session in the mode
//! of its current role and switches mode when its role changes, telling
//! the peer with a `State` frame.

pub mod actlog;
mod apply;
mod datapath;
mod disk;
pub mod error;
mod exchange;
mod fence;
pub mod intervals;
pub mod link;
mod peer;
pub use peer::dials;
pub mod rate;
mod resync;
mod verify;
pub use error::VerbError;
pub use resync::SyncStatus;
pub use verify::{VerifyState, VerifyStatus};

use crate::sync::lock;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use replblk_proto::repl::{
    data_flags, kind as repl_kind, state_flags, Frame, StateFrame, WriteFrame, WriteRef,
};
use serde::Serialize;
use serde_json::Value;

use crate::bitmap::DirtyBitmap;
use crate::config::{FencingPolicy, LocalResource, MetaDisk, PeerConfig};
use crate::core::state::{Action, Event, Level, Node, PeerInfo};
pub use crate::core::state::{ConnState, DiskState, ReplState, Role};
use crate::core::uuid::{Decision, Rule, UuidView};
use crate::core::{flags as md_flags, Generations, UUID_JUST_CREATED};
use crate::events::Events;
use crate::meta::{self, Location, MetaStore, Superblock};
use crate::store::{Batch, Done, FileStore, Modify, Store};
use intervals::IntervalLock;
use link::{LinkError, Remote, Session, Track, Waiter};

/// How long a promote waits for the peer to confirm it is not promoting
/// too, and for the session to switch to the Primary's mode.
const ROLE_CHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// The Primary's receiver wakes at least this often to notice role
/// changes, shutdown and ping deadlines.
const PRIMARY_TICK: Duration = Duration::from_millis(50);

/// How long a demote waits, unless told otherwise, for its NBD clients to
/// go (`--force`) and replicated requests in flight to finish.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The sync decision last taken, as `status` reports it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct DecisionStatus {
    pub decision: Decision,
    pub rule: Rule,
    pub rule_number: u32,
    pub description: String,
}

/// Generation identifiers in hex, as `status` and `dump-md` show them.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct GenerationStatus {
    pub current: String,
    pub bitmap: String,
    pub history: Vec<String>,
}

impl From<Generations> for GenerationStatus {
    fn from(g: Generations) -> Self {
        GenerationStatus {
            current: format!("{:016X}", g.current),
            bitmap: format!("{:016X}", g.bitmap),
            history: g.history.iter().map(|h| format!("{h:016X}")).collect(),
        }
    }
}

/// A snapshot for `replctl status` (stable JSON; see docs/control.md).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    pub node: String,
    /// Attached: metadata read, disk open.
    pub up: bool,
    pub down_reason: Option<String>,
    pub role: Role,
    pub disk: DiskState,
    pub size: u64,
    pub connection: ConnState,
    pub replication: ReplState,
    pub peer: Option<String>,
    pub peer_role: Option<Role>,
    pub peer_disk: Option<DiskState>,
    pub out_of_sync_bytes: u64,
    pub out_of_sync_blocks: u64,
    pub bitmap_granularity: u64,
    pub decision: Option<DecisionStatus>,
    pub generations: Option<GenerationStatus>,
    pub last_error: Option<String>,
    /// Round trip of the last keepalive Ping, while connected.
    pub ping_rtt_us: Option<u64>,
    /// Writes the peer acknowledged but has not yet made durable (kept in
    /// the transfer log until a barrier covers them), while connected.
    #[serde(default)]
    pub unstable_writes: Option<u64>,
    /// The automatic split-brain policies configured for the resource.
    #[serde(default)]
    pub split_brain_policy: Option<crate::core::split_brain::Policy>,
    /// The last split brain the policies were asked about: what they
    /// decided and the numbers they decided on.
    #[serde(default)]
    pub split_brain: Option<crate::core::split_brain::Resolution>,
    /// Online verify: the one running, or the last one.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    /// Writes are frozen: the peer was lost and is not fenced yet.
    #[serde(default)]
    pub io_frozen: bool,
    /// The peer is known fenced or outdated since the link was last up.
    #[serde(default)]
    pub peer_fenced: bool,
    /// The activity log and the bitmap on disk, while attached with the
    /// log enabled.
    #[serde(default)]
    pub activity_log: Option<actlog::AlStatus>,
    /// The resync this node sends (or sent last): progress and bytes.
    #[serde(default)]
    pub resync: SyncStatus,
    /// The resync rate settings in force.
    #[serde(default)]
    pub resync_rate: rate::RateSettings,
    /// The I/O error that detached the local disk (`on_io_error =
    /// detach`), until the disk is attached again.
    #[serde(default)]
    pub disk_failure: Option<String>,
}

/// A status as one `events` line: the status fields plus `"type"`.
pub fn event_json(kind: &str, status: &ResourceStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("type".into(), Value::String(kind.into()));
    }
    v
}

/// Mutable state of a replicated resource, behind one lock. Never held
/// while waiting on the network.
struct Inner {
    /// The state machine; `None` while the resource is down.
    node: Option<Node>,
    /// The superblock as the state machine last left it, and how many
    /// times it changed (see `MetaWriter`).
    sb: Option<Superblock>,
    sb_version: u64,
    down_reason: Option<String>,
    last_error: Option<String>,
    /// What the last emitted event said, to emit only changes.
    last_event: String,
}

pub struct Replica {
    /// This replica, for completions that outlive the submitting call.
    me: Weak<Replica>,
    pub name: String,
    local_node: String,
    disk_path: PathBuf,
    /// `None` for a single-node resource (no metadata, no roles).
    meta_loc: Option<Location>,
    cfg_size: Option<u64>,
    read_only: bool,
    /// Activity-log hot set in extents (0: none).
    al_extents: u32,
    /// The bitmap and activity-log areas while attached.
    persistent: RwLock<Option<Arc<actlog::Persistent>>>,
    peer: Option<PeerConfig>,
    events: Arc<Events>,
    store: RwLock<Option<Arc<dyn Store>>>,
    size: AtomicU64,
    /// Primary and attached: the write path is open.
    serving: AtomicBool,
    /// The state machine's role is Primary (read per frame by the
    /// session loops, so kept outside the state lock).
    primary: AtomicBool,
    /// Replicated requests between their role check and completion.
    inflight: AtomicUsize,
    inner: Mutex<Inner>,
    /// The metadata device, written outside the state lock so that a
    /// metadata fsync never holds up `status` or other verbs.
    meta: Mutex<MetaWriter>,
    /// Serialises role changes with the state exchange of a new session.
    transition: Mutex<()>,
    /// Serialises admitting NBD clients with demoting (see `admit`).
    admission: Mutex<()>,
    /// A promote announced to the peer, either way (see `promote`).
    gate: Mutex<Gate>,
    oos: Mutex<DirtyBitmap>,
    intervals: IntervalLock,
    /// Online verify: status, stop flag, the request in flight.
    verify: Mutex<verify::VerifyCtl>,
    verify_cv: Condvar,
    /// Resync rate settings (changed at run time by `resync-rate`).
    rate: Mutex<rate::RateSettings>,
    /// Checksum-based resync (`csums_alg`).
    csums: bool,
    /// Buffer for answering the peer's checksum queries.
    csum_buf: Mutex<Vec<u8>>,
    /// Application write requests, for the resync rate controller.
    app_writes: AtomicU64,
    progress: resync::SyncProgress,
    session: Mutex<Option<Arc<Session>>>,
    /// The role the session currently runs as, for promote to wait on.
    mode: Mutex<Option<Role>>,
    mode_cv: Condvar,
    stopping: AtomicBool,
    wake_lock: Mutex<()>,
    wake_cv: Condvar,
    listener: Option<TcpListener>,
    /// Connections to the listener that passed the handshake, waiting for
    /// the link loop (see `peer::accept_loop`).
    incoming: peer::Incoming,
    manager: Mutex<Option<JoinHandle<()>>>,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    /// Fencing (`core::fence`): its state, whether writes are frozen (read
    /// by every write, so kept outside the lock) and the writes held.
    fencer: Mutex<crate::core::fence::Fencer>,
    frozen: AtomicBool,
    freeze: fence::Freeze,
    /// Bytes sent as resync source (for metrics).
    resync_sent: AtomicU64,
    /// What a local disk error does (`on_io_error`).
    on_io_error: crate::config::IoErrorPolicy,
    /// The local disk is detached after an I/O error (read by every
    /// local I/O, see `disk::DiskGuard`); cleared when it is attached.
    disk_failed: Arc<AtomicBool>,
    /// The error that detached it.
    disk_failure: Mutex<Option<String>>,
    /// The connected peer has no disk: writes are not sent to it.
    peer_diskless: AtomicBool,
    /// Reads a Diskless Primary asked the peer for.
    remote_reads: disk::RemoteReads,
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
    #[error("resource {resource:?}: {message}")]
    Open { resource: String, message: String },
}

/// The open metadata and the version of the superblock it last wrote:
/// a step writes its snapshot only if no later one was written first, so
/// the metadata never goes back to an older state. Lock order: the state
/// lock (`inner`) before this one, never the other way.
#[derive(Default)]
struct MetaWriter {
    md: Option<MetaStore>,
    written: u64,
}

/// Promotes announced and not yet decided.
#[derive(Default)]
struct Gate {
    /// Ours: our State frames carry PROMOTING.
    promoting: bool,
    /// The peer's: our own promote is refused meanwhile.
    peer_promoting: bool,
}

/// What a state-machine step asks the shell to do outside the lock.
#[derive(Default)]
struct Effects {
    disconnect_clients: bool,
    drop_link: Option<String>,
    send_state: bool,
}

fn disk_to_wire(d: DiskState) -> u8 {
    match d {
        DiskState::Diskless => 0,
        DiskState::Inconsistent => 1,
        DiskState::Outdated => 2,
        DiskState::Consistent => 3,
        DiskState::UpToDate => 4,
    }
}

fn disk_from_wire(d: u8) -> DiskState {
    match d {
        1 => DiskState::Inconsistent,
        2 => DiskState::Outdated,
        3 => DiskState::Consistent,
        4 => DiskState::UpToDate,
        _ => DiskState::Diskless,
    }
}

fn role_from_wire(r: u8) -> Role {
    if r == 1 {
        Role::Primary
    } else {
        Role::Secondary
    }
}

/// A new random generation identifier (never 0 or the just-created one).
fn fresh_uuid() -> u64 {
    loop {
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_err() {
            // No randomness: time is unique enough for a generation name.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed);
            b = t.to_le_bytes();
        }
        let u = u64::from_le_bytes(b) & !1;
        if u > UUID_JUST_CREATED {
            return u;
        }
    }
}

enum ModeEnd {
    RoleChanged,
    Over(String),
}

impl Replica {
    /// Wraps resource `res` of node `node`. A single-node resource opens
    /// its store here; a replicated one binds the replication listener
    /// (if this node accepts) and is brought up by `start`.
    pub fn new(
        res: &LocalResource,
        node: &str,
        events: Arc<Events>,
    ) -> Result<Arc<Replica>, ReplicaError> {
        let peer = res.peer.clone();
        let peer_resync = peer.as_ref().map(|p| p.resync).unwrap_or_default();
        let listener = match &peer {
            Some(p) if !dials(p) => {
                Some(
                    TcpListener::bind(p.local_address).map_err(|source| ReplicaError::Bind {
                        resource: res.name.clone(),
                        addr: p.local_address.to_string(),
                        source,
                    })?,
                )
            }
            _ => None,
        };
        let meta_loc = match (&peer, &res.meta) {
            (Some(_), Some(MetaDisk::External(p))) => Some(Location::External(p.clone())),
            (Some(_), _) => Some(Location::Internal),
            (None, _) => None,
        };
        let replica = Arc::new_cyclic(|me| Replica {
            me: me.clone(),
            name: res.name.clone(),
            local_node: node.to_owned(),
            disk_path: res.disk.clone(),
            meta_loc,
            cfg_size: res.size,
            read_only: res.read_only,
            al_extents: res.al_extents,
            persistent: RwLock::new(None),
            peer,
            events,
            store: RwLock::new(None),
            size: AtomicU64::new(0),
            serving: AtomicBool::new(false),
            primary: AtomicBool::new(false),
            inflight: AtomicUsize::new(0),
            inner: Mutex::new(Inner {
                node: None,
                sb: None,
                sb_version: 0,
                down_reason: Some("not brought up yet".into()),
                last_error: None,
                last_event: String::new(),
            }),
            meta: Mutex::new(MetaWriter::default()),
            transition: Mutex::new(()),
            admission: Mutex::new(()),
            gate: Mutex::new(Gate::default()),
            oos: Mutex::new(DirtyBitmap::new(0, meta::DEFAULT_GRANULARITY as u64)),
            intervals: IntervalLock::new(),
            verify: Mutex::new(verify::VerifyCtl::default()),
            verify_cv: Condvar::new(),
            rate: Mutex::new(peer_resync.rate),
            csums: peer_resync.csums,
            csum_buf: Mutex::new(Vec::new()),
            app_writes: AtomicU64::new(0),
            progress: resync::SyncProgress::default(),
            session: Mutex::new(None),
            mode: Mutex::new(None),
            mode_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            wake_cv: Condvar::new(),
            listener,
            incoming: peer::Incoming::new(),
            manager: Mutex::new(None),
            acceptor: Mutex::new(None),
            fencer: Mutex::new(crate::core::fence::Fencer::new(false, false)),
            frozen: AtomicBool::new(false),
            freeze: fence::Freeze::default(),
            resync_sent: AtomicU64::new(0),
            on_io_error: res.on_io_error,
            disk_failed: Arc::new(AtomicBool::new(false)),
            disk_failure: Mutex::new(None),
            peer_diskless: AtomicBool::new(false),
            remote_reads: disk::RemoteReads::default(),
        });
        replica.reset_fencer(false);
        if replica.peer.is_none() {
            let store = FileStore::open(&res.disk, res.size, res.read_only).map_err(|e| {
                ReplicaError::Open {
                    resource: res.name.clone(),
                    message: e.to_string(),
                }
            })?;
            replica.size.store(store.size(), Ordering::SeqCst);
            // A single-node resource has nowhere else to go: errors are
            // passed to the client whatever `on_io_error` says.
            let store = crate::faults::wrap(&res.name, Arc::new(store));
            *replica.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
            replica.serving.store(true, Ordering::SeqCst);
            lock(&replica.inner).down_reason = None;
        }
        Ok(replica)
    }

    /// Brings a replicated resource up (a failure is logged and leaves it
    /// down, visible in `status`) and starts the peer link thread.
    pub fn start(self: &Arc<Self>) -> Result<(), ReplicaError> {
        if self.peer.is_none() {
            return Ok(());
        }
        match self.up() {
            Ok(msg) => tracing::info!(resource = %self.name, "{msg}"),
            Err(e) => tracing::error!(resource = %self.name, "resource stays down: {e}"),
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
        if self.listener.is_some() {
            let me = self.clone();
            let handle = std::thread::Builder::new()
                .name(format!("accept-{}", self.name))
                .spawn(move || me.accept_loop())
                .map_err(|source| ReplicaError::Thread {
                    resource: self.name.clone(),
                    source,
                })?;
            *lock(&self.acceptor) = Some(handle);
        }
        Ok(())
    }

    /// Stops the link thread and closes the session; then, if up, writes
    /// the metadata as a clean shutdown (a Primary comes back Secondary).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.fence(crate::core::fence::FenceEvent::Shutdown);
        self.wake();
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
        if let Some(h) = lock(&self.acceptor).take() {
            let _ = h.join();
        }
        if self.peer.is_some() {
            self.detach("daemon stopped");
        }
    }

    fn wake(&self) {
        let _g = lock(&self.wake_lock);
        self.wake_cv.notify_all();
    }

    fn current_store(&self) -> io::Result<Arc<dyn Store>> {
        self.store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "resource is down"))
    }

    /// A replicated resource (as opposed to a single-node one).
    pub fn is_replicated(&self) -> bool {
        self.peer.is_some()
    }

    /// Bytes sent to the peer as resync source since the daemon started.
    pub fn resync_bytes(&self) -> u64 {
        self.resync_sent.load(Ordering::Relaxed)
    }

    /// The local role (a single-node resource always serves).
    pub fn role(&self) -> Role {
        if self.peer.is_none() || self.primary.load(Ordering::SeqCst) {
            Role::Primary
        } else {
            Role::Secondary
        }
    }

    pub fn status(&self) -> ResourceStatus {
        let inner = lock(&self.inner);
        let oos = lock(&self.oos);
        let remaining = oos.bytes(self.size());
        let node = inner.node.as_ref();
        let single = self.peer.is_none();
        let peer_state = node.and_then(|n| n.peer());
        ResourceStatus {
            name: self.name.clone(),
            node: self.local_node.clone(),
            up: single || node.is_some(),
            down_reason: inner.down_reason.clone(),
            role: if single {
                Role::Primary
            } else {
                node.map_or(Role::Secondary, |n| n.role())
            },
            disk: if single {
                DiskState::UpToDate
            } else {
                node.map_or(DiskState::Diskless, |n| n.disk())
            },
            size: self.size(),
            connection: node.map_or(ConnState::StandAlone, |n| n.conn()),
            replication: node.map_or(ReplState::Off, |n| n.repl()),
            peer: self.peer.as_ref().map(|p| p.peer_node.clone()),
            peer_role: peer_state.map(|p| p.0),
            peer_disk: peer_state.map(|p| p.1),
            out_of_sync_bytes: remaining,
            out_of_sync_blocks: oos.count(),
            bitmap_granularity: oos.granularity(),
            decision: node.and_then(|n| n.last_verdict()).map(|v| DecisionStatus {
                decision: v.decision,
                rule: v.rule,
                rule_number: v.rule.number(),
                description: v.rule.describe().to_owned(),
            }),
            generations: node.map(|n| n.gens().into()),
            last_error: inner.last_error.clone(),
            ping_rtt_us: self.current_session().and_then(|s| s.rtt_us()),
            unstable_writes: self.current_session().map(|s| s.unstable_count() as u64),
            split_brain_policy: self.peer.as_ref().map(|p| p.split_brain),
            split_brain: node.and_then(|n| n.last_split_brain()).cloned(),
            verify: self.verify_status(),
            io_frozen: self.frozen.load(Ordering::SeqCst),
            peer_fenced: lock(&self.fencer).peer_fenced(),
            activity_log: self
                .persistent()
                .filter(|p| p.enabled())
                .map(|p| p.status()),
            resync: self.sync_status(remaining),
            resync_rate: self.resync_rate(),
            disk_failure: self.disk_failure(),
        }
    }

    /// Emits a `change` event if anything `events` shows has changed.
    fn emit_if_changed(&self) {
        let status = self.status();
        let print = format!(
            "{} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {} {}",
            status.up,
            status.role,
            status.disk,
            status.connection,
            status.replication,
            status.peer_role,
            status.peer_disk,
            status.decision.as_ref().map(|d| (d.decision, d.rule)),
            status.down_reason,
            status.split_brain.as_ref().map(|r| &r.reason),
            status.io_frozen,
            status.peer_fenced,
        );
        let changed = {
            let mut inner = lock(&self.inner);
            if inner.last_event == print {
                false
            } else {
                inner.last_event = print;
                true
            }
        };
        if changed {
            self.events.emit(event_json("change", &status));
            self.fence_check_in_sync(&status);
        }
    }

    /// Out-of-sync byte runs `(offset, length)`.
    pub fn out_of_sync_runs(&self) -> Vec<(u64, u64)> {
        lock(&self.oos).runs().collect()
    }

    /// Whether `wait-sync` may return: `Ok(true)` once connected with both
    /// disks UpToDate; an error when waiting cannot help.
    pub fn sync_state(&self) -> Result<bool, VerbError> {
        let inner = lock(&self.inner);
        let Some(node) = inner.node.as_ref() else {
            if self.peer.is_none() {
                return Err(VerbError::NothingToSync);
            }
            return Err(self.down_error(&inner));
        };
        if node.conn() == ConnState::StandAlone {
            return Err(VerbError::StandAlone {
                last_error: inner.last_error.clone(),
            });
        }
        Ok(node.conn() == ConnState::Connected
            && node.repl() == ReplState::Established
            && node.disk() == DiskState::UpToDate
            && node.peer().map(|p| p.1) == Some(DiskState::UpToDate))
    }

    /// Whether this node serves the resource to NBD clients now (only a
    /// Primary does), for descriptions (`NBD_OPT_INFO`, `NBD_OPT_LIST`).
    pub fn check_admission(&self) -> Result<(), VerbError> {
        if self.peer.is_none() {
            return Ok(());
        }
        let inner = lock(&self.inner);
        let node = self.local_node.clone();
        match inner.node.as_ref() {
            None => Err(VerbError::NotServingDown {
                resource: self.name.clone(),
                node,
                reason: inner
                    .down_reason
                    .clone()
                    .unwrap_or_else(|| "not attached".into()),
            }),
            // Admitted only once the promote is complete: before, its
            // writes would be refused.
            Some(n) if n.role() == Role::Primary && self.serving.load(Ordering::SeqCst) => Ok(()),
            Some(n) if n.role() == Role::Primary => Err(VerbError::NotServingYet {
                resource: self.name.clone(),
                node,
            }),
            Some(n) => Err(VerbError::NotServingSecondary {
                resource: self.name.clone(),
                node,
                disk: n.disk(),
                primary: match n.peer() {
                    Some((Role::Primary, _)) => self.peer.as_ref().map(|p| match p.peer_nbd {
                        Some(addr) => format!("{} (nbd {addr})", p.peer_node),
                        None => p.peer_node.clone(),
                    }),
                    _ => None,
                },
            }),
        }
    }

    /// Admits an NBD client unless this node does not serve the resource
    /// (see `check_admission`). `attach` counts the client as attached; it
    /// runs under the admission lock together with the role check, and
    /// `demote` holds that lock from counting the clients to changing the
    /// role, so a demote either counts the client or the client is refused.
    pub fn admit(&self, attach: &mut dyn FnMut()) -> Result<(), VerbError> {
        let _admission = lock(&self.admission);
        self.check_admission()?;
        attach();
        Ok(())
    }

    /// Whether the state machine would take `event`, tried on a copy.
    fn dry_run(&self, event: Event) -> Result<(), VerbError> {
        let inner = lock(&self.inner);
        let node = inner.node.as_ref().ok_or_else(|| self.down_error(&inner))?;
        node.clone().handle(event, &mut fresh_uuid)?;
        Ok(())
    }

    /// `step` for an operator verb, with its failure as a `VerbError`.
    fn verb_step(&self, event: Event) -> Result<Effects, VerbError> {
        {
            let inner = lock(&self.inner);
            if inner.node.is_none() {
                return Err(self.down_error(&inner));
            }
        }
        self.step(event)
            .map_err(|message| crate::core::state::Refusal { message }.into())
    }

    fn down_error(&self, inner: &Inner) -> VerbError {
        VerbError::Down {
            resource: self.name.clone(),
            reason: inner
                .down_reason
                .clone()
                .unwrap_or_else(|| "not attached".into()),
        }
    }

    // ---- metadata and attach/detach -----------------------------------

    fn location(&self) -> Result<&Location, VerbError> {
        self.meta_loc.as_ref().ok_or_else(|| VerbError::SingleNode {
            resource: self.name.clone(),
        })
    }

    /// `create-md`: fresh metadata on a resource that is down.
    pub fn create_md(&self, force: bool) -> Result<String, VerbError> {
        let loc = self.location()?;
        let inner = lock(&self.inner);
        if inner.node.is_some() {
            return Err(VerbError::CreateMdWhileUp {
                resource: self.name.clone(),
            });
        }
        let (store, sb) = MetaStore::create(
            &self.disk_path,
            loc,
            &self.local_node,
            &self.name,
            meta::DEFAULT_GRANULARITY,
            force,
        )
        .map_err(VerbError::CreateMd)?;
        if force {
            tracing::warn!(resource = %self.name, "metadata re-created with --force: generations reset");
        }
        Ok(format!(
            "metadata written on {} (usable size {} bytes); bring it up with `replctl up {}`",
            store.md_path().display(),
            sb.data_size,
            self.name
        ))
    }

    /// `dump-md`: both superblock slots as read from disk now.
    pub fn dump_md(&self) -> Result<meta::Inspection, VerbError> {
        let loc = self.location()?;
        Ok(MetaStore::inspect(&self.disk_path, loc)?)
    }

    /// `up`: reads the metadata (never re-initialising it), opens the disk
    /// and starts connecting. The node comes up Secondary.
    pub fn up(&self) -> Result<String, VerbError> {
        let loc = self.location()?.clone();
        let result = self.attach(&loc);
        match &result {
            Ok(_) => self.wake(),
            Err(e) => lock(&self.inner).down_reason = Some(e.to_string()),
        }
        self.emit_if_changed();
        result
    }

    fn attach(&self, loc: &Location) -> Result<String, VerbError> {
        let mut inner = lock(&self.inner);
        if inner.node.is_some() {
            return Err(VerbError::AlreadyUp {
                resource: self.name.clone(),
            });
        }
        let (mut md, mut sb) = MetaStore::open(&self.disk_path, loc, &self.local_node, &self.name)?;
        let size = match self.cfg_size {
            Some(s) if s > sb.data_size => {
                return Err(VerbError::SizeTooLarge {
                    size: s,
                    usable: sb.data_size,
                    path: self.disk_path.clone(),
                })
            }
            Some(s) => s,
            None => sb.data_size,
        };
        let store = FileStore::open(&self.disk_path, Some(size), self.read_only)?;
        let mut bitmap = DirtyBitmap::new(size, u64::from(sb.granularity));
        let clean = sb.flags & md_flags::CLEAN_SHUTDOWN != 0;
        let logged = sb.flags & md_flags::ACTIVITY_LOG != 0;
        // The bitmap on disk: written at clean shutdown, and while the
        // activity log is in use kept a superset of the bits set outside
        // the logged extents (see `actlog`).
        let mut bytes = vec![0u8; bitmap.to_bytes().len()];
        md.read_bitmap(&mut bytes)?;
        bitmap.merge_bytes(&bytes);
        // Memory now matches the disk: only what changes below is written.
        bitmap.take_dirty_pages();
        let area = md.area()?;
        // A Primary's crash (or a second crash before the sync that the
        // first one started ended): writes may have been in flight in the
        // logged extents. A Secondary has no writes of its own in flight,
        // and its demote wrote the bits its writes as Primary had set.
        let crashed_primary = sb.flags & (md_flags::PRIMARY | md_flags::CRASHED_PRIMARY) != 0;
        if !clean && logged && !crashed_primary {
            tracing::info!(
                resource = %self.name,
                "metadata was not shut down cleanly, as Secondary: the bitmap on disk holds every mark"
            );
        } else if !clean && logged {
            // Writes may have been in flight in the logged extents only.
            let ring = area.read_al()?;
            let found = crate::core::actlog::recover(&ring);
            found.mark_out_of_sync(&mut bitmap);
            tracing::warn!(
                resource = %self.name,
                extents = found.extents.len(), transactions = found.valid,
                invalid_blocks = found.invalid, superset = found.superset,
                "metadata was not shut down cleanly: the {} extent(s) of the activity log are marked out of sync",
                found.extents.len()
            );
        } else if !clean && (sb.gens.bitmap != 0 || sb.flags & md_flags::PRIMARY != 0) {
            // Without the log (disabled, or metadata of format 1) nothing
            // says where writes were in flight: every block is out of sync.
            bitmap.set_all();
            tracing::warn!(
                resource = %self.name,
                "metadata was not shut down cleanly and had no activity log: every block is marked out of sync"
            );
        }
        let mut node = Node::from_meta(sb.gens, sb.flags, true);
        if let Some(p) = &self.peer {
            node.set_split_brain_policy(p.split_brain);
        }
        let persistent = Arc::new(actlog::Persistent::new(
            area,
            size,
            self.al_extents,
            matches!(loc, Location::External(_)),
        ));
        // What was recovered is in the bitmap on disk before anything
        // else happens (a second crash, log or no log, must not forget
        // it), and only then does the log start afresh.
        let oos = Mutex::new(bitmap);
        persistent.persist_bitmap(&oos)?;
        bitmap = oos.into_inner().unwrap_or_else(|p| p.into_inner());
        persistent.reset_log()?;
        node.set_activity_log(persistent.enabled());
        sb.gens = node.gens();
        sb.flags = node.meta_flags();
        md.write(&mut sb)?;
        let msg = format!(
            "{} up as Secondary: disk {:?}, current generation {:016X}, {} out-of-sync blocks",
            self.name,
            node.disk(),
            sb.gens.current,
            bitmap.count()
        );
        *lock(&self.oos) = bitmap;
        self.disk_failed.store(false, Ordering::SeqCst);
        *lock(&self.disk_failure) = None;
        let store: Arc<dyn Store> = Arc::new(disk::DiskGuard::new(
            crate::faults::wrap(&self.name, Arc::new(store)),
            self,
        ));
        self.reset_fencer(node.peer_outdated());
        self.start_bitmap_flusher(&persistent);
        *self.persistent.write().unwrap_or_else(|p| p.into_inner()) = Some(persistent);
        self.size.store(size, Ordering::SeqCst);
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(store);
        inner.node = Some(node);
        inner.sb_version += 1;
        *lock(&self.meta) = MetaWriter {
            md: Some(md),
            written: inner.sb_version,
        };
        inner.sb = Some(sb);
        inner.down_reason = None;
        inner.last_error = None;
        Ok(msg)
    }

    /// `down`: drops the link, writes the metadata as a clean shutdown and
    /// closes the disk. Refused while Primary.
    pub fn down(&self) -> Result<String, VerbError> {
        self.location()?;
        {
            let inner = lock(&self.inner);
            match inner.node.as_ref() {
                None => {
                    return Err(VerbError::AlreadyDown {
                        resource: self.name.clone(),
                    })
                }
                Some(n) if n.role() == Role::Primary => {
                    return Err(VerbError::DownWhilePrimary {
                        resource: self.name.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        self.detach("brought down by the operator");
        self.emit_if_changed();
        Ok(format!("{} is down", self.name))
    }

    /// Closes the session, records a clean shutdown, writes the bitmap and
    /// closes the disk.
    fn detach(&self, why: &str) {
        self.serving.store(false, Ordering::SeqCst);
        self.primary.store(false, Ordering::SeqCst);
        let mut guard = lock(&self.inner);
        let inner = &mut *guard;
        let Some(mut node) = inner.node.take() else {
            return;
        };
        if let Some(s) = lock(&self.session).clone() {
            s.fail(why);
        }
        if let Err(r) = node.handle(Event::Shutdown, &mut fresh_uuid) {
            tracing::warn!(resource = %self.name, "shutdown: {}", r.message);
        }
        self.drop_persistent();
        let bitmap = lock(&self.oos).to_bytes();
        let mut meta = lock(&self.meta);
        if let (Some(md), Some(sb)) = (meta.md.as_mut(), inner.sb.as_mut()) {
            sb.gens = node.gens();
            sb.flags = node.meta_flags();
            // Bitmap first: the superblock's CLEAN_SHUTDOWN vouches for it.
            let written = md
                .write_bitmap(0, &bitmap)
                .and_then(|_| md.sync())
                .and_then(|_| md.write(sb));
            if let Err(e) = written {
                tracing::error!(resource = %self.name, "writing metadata at shutdown failed: {e}");
            }
        }
        if let Ok(store) = self
            .current_store()
            .ok()
            .filter(|_| !self.disk_detached())
            .ok_or(())
        {
            if let Err(e) = store.flush() {
                tracing::error!(resource = %self.name, "flushing the disk at shutdown failed: {e}");
            }
        }
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = None;
        meta.md = None;
        drop(meta);
        inner.sb = None;
        inner.down_reason = Some(why.to_owned());
    }

    // ---- the state machine --------------------------------------------

    /// Feeds one event to the state machine; persists and logs what it
    /// asks for, and returns the effects that need the network.
    fn step(&self, event: Event) -> Result<Effects, String> {
        let mut fx = Effects::default();
        let mut snapshot = None;
        {
            let mut inner = lock(&self.inner);
            let inner = &mut *inner;
            let Some(node) = inner.node.as_mut() else {
                return Err(format!(
                    "resource {} is down: {}",
                    self.name,
                    inner.down_reason.as_deref().unwrap_or("not attached")
                ));
            };
            let before = (node.role(), node.disk());
            let actions = node.handle(event, &mut fresh_uuid).map_err(|r| r.message)?;
            // The peer always hears of a change of our role or disk.
            fx.send_state = (node.role(), node.disk()) != before;
            let mut persist = false;
            for action in actions {
                match action {
                    Action::Persist => persist = true,
                    Action::DisconnectClients => fx.disconnect_clients = true,
                    Action::DropLink { reason } => fx.drop_link = Some(reason),
                    Action::StandAlone { reason } => {
                        tracing::error!(resource = %self.name, "going StandAlone: {reason}");
                        inner.last_error = Some(reason.clone());
                        fx.drop_link = Some(reason);
                    }
                    Action::StartSync { source, full } => {
                        let what = if full { "full" } else { "bitmap-based" };
                        let dir = if source { "source" } else { "target" };
                        tracing::warn!(
                            resource = %self.name,
                            "a {what} resync is needed with this node as sync {dir}"
                        );
                    }
                    Action::SendState => fx.send_state = true,
                    Action::Log { level, message } => match level {
                        Level::Info => tracing::info!(resource = %self.name, "{message}"),
                        Level::Warn => tracing::warn!(resource = %self.name, "{message}"),
                        Level::Error => tracing::error!(resource = %self.name, "{message}"),
                    },
                }
            }
            let role = node.role();
            self.primary.store(role == Role::Primary, Ordering::SeqCst);
            self.peer_diskless.store(
                node.peer().is_some_and(|p| p.1 == DiskState::Diskless),
                Ordering::SeqCst,
            );
            if persist {
                let (gens, flags) = (node.gens(), node.meta_flags());
                if let Some(sb) = inner.sb.as_mut() {
                    sb.gens = gens;
                    sb.flags = flags;
                    inner.sb_version += 1;
                    snapshot = Some((inner.sb_version, sb.clone()));
                }
            }
            if role != Role::Primary {
                self.serving.store(false, Ordering::SeqCst);
            }
        }
        // Durable before the caller acts on the step (tells the peer,
        // answers the operator), but outside the state lock.
        if let Some((version, mut sb)) = snapshot {
            let mut meta = lock(&self.meta);
            if version > meta.written {
                if let Some(md) = meta.md.as_mut() {
                    match md.write(&mut sb) {
                        Ok(()) => meta.written = version,
                        Err(e) => {
                            drop(meta);
                            self.metadata_failed("writing metadata", &e);
                        }
                    }
                }
            }
        }
        self.emit_if_changed();
        Ok(fx)
    }

    /// Carries out the network side of `fx`.
    fn effects(&self, fx: &Effects) {
        if let Some(s) = self.current_session() {
            if let Some(reason) = &fx.drop_link {
                s.fail(reason);
            } else if fx.send_state {
                self.send_state(&s, 0, 0);
            }
        }
        self.wake();
    }

    /// Our State with `flags` and `token`; `PROMOTING` is added while a
    /// promote of ours awaits the peer's answer. Lock order: gate, then
    /// the state lock.
    fn state_frame(&self, flags: u16, token: u64) -> StateFrame {
        let promoting = lock(&self.gate).promoting;
        self.build_state(promoting, flags, token)
    }

    fn build_state(&self, promoting: bool, flags: u16, token: u64) -> StateFrame {
        let inner = lock(&self.inner);
        let dirty = lock(&self.oos).count();
        let mut st = StateFrame {
            dirty_bits: dirty,
            ..StateFrame::default()
        };
        if let Some(n) = inner.node.as_ref() {
            let g = n.gens();
            st.role = u8::from(n.role() == Role::Primary);
            st.disk = disk_to_wire(n.disk());
            st.md_flags = n.meta_flags();
            st.current = g.current;
            st.bitmap = g.bitmap;
            st.history = g.history;
            if n.discard_my_data() {
                st.state_flags |= state_flags::DISCARD_MY_DATA;
            }
        }
        st.state_flags |= flags;
        if promoting {
            st.state_flags |= state_flags::PROMOTING;
        }
        st.token = token;
        st
    }

    fn send_state(&self, session: &Session, flags: u16, token: u64) {
        session.send_control(&Frame::State(self.state_frame(flags, token)));
    }

    /// `promote`: refused if the peer is Primary or (without force) the
    /// data is not UpToDate. While connected the peer confirms first.
    pub fn promote(&self, force: bool) -> Result<String, VerbError> {
        self.location()?;
        let _t = lock(&self.transition);
        if self.role() == Role::Primary {
            return Ok(format!("{} is already Primary", self.name));
        }
        // A dry run on a copy of the state machine: a refusal needs no
        // round trip and changes nothing.
        self.dry_run(Event::Promote { force })?;
        let session = self.current_session();
        if session.is_none() {
            self.fence_before_promote(force)?;
        }
        if let Some(s) = &session {
            // Two-phase while connected: announce the promote and wait for
            // the peer's answer. A peer that answered has recorded the
            // announcement and refuses its own promote until it hears the
            // outcome; a peer that was promoting itself says so, and both
            // back off (see PROTOCOL.md 9.7).
            {
                let mut gate = lock(&self.gate);
                if gate.peer_promoting {
                    return Err(VerbError::PeerPromoting);
                }
                gate.promoting = true;
            }
            let answered = self.confirm_state(s, state_flags::PROMOTING);
            let conflict = {
                let mut gate = lock(&self.gate);
                gate.promoting = false;
                gate.peer_promoting
            };
            let peer_primary = lock(&self.inner)
                .node
                .as_ref()
                .and_then(|n| n.peer())
                .is_some_and(|p| p.0 == Role::Primary);
            if !answered || conflict || peer_primary {
                // Withdraw the announcement.
                self.send_state(s, 0, 0);
                return Err(if !answered {
                    VerbError::PeerSilent
                } else if peer_primary {
                    VerbError::PeerPrimary
                } else {
                    VerbError::PromoteRace
                });
            }
        }
        let fx = match self.verb_step(Event::Promote { force }) {
            Ok(fx) => fx,
            Err(e) => {
                // Refused after the announcement (the disk failed
                // meanwhile): withdraw it, or the peer would refuse its
                // own promotes until our next State.
                if let Some(s) = &session {
                    self.send_state(s, 0, 0);
                }
                return Err(e);
            }
        };
        self.effects(&fx);
        if session.is_some() && self.current_session().is_some() && !self.wait_mode(Role::Primary) {
            tracing::warn!(resource = %self.name, "session did not switch to Primary mode in time");
        }
        self.serving.store(true, Ordering::SeqCst);
        let forced = if force { " (forced)" } else { "" };
        Ok(format!("{} is Primary{forced}", self.name))
    }

    /// Sends our State asking for the peer's, and waits until its answer
    /// has been handled (the link fails if the peer does not answer in
    /// time).
    fn confirm_state(&self, session: &Session, flags: u16) -> bool {
        let (token, slot) = session.expect_state();
        self.send_state(session, state_flags::REPLY | flags, token);
        let what = format!("the peer did not answer a state change within {ROLE_CHANGE_TIMEOUT:?}");
        let answered = session.wait_for(&slot, ROLE_CHANGE_TIMEOUT, &what) == Remote::Done;
        session.forget_state(token);
        answered
    }

    fn set_mode(&self, mode: Option<Role>) {
        *lock(&self.mode) = mode;
        self.mode_cv.notify_all();
    }

    fn wait_mode(&self, want: Role) -> bool {
        let deadline = Instant::now() + ROLE_CHANGE_TIMEOUT;
        let mut m = lock(&self.mode);
        while *m != Some(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.current_session().is_none() {
                return false;
            }
            m = self
                .mode_cv
                .wait_timeout(m, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    /// `demote`: refused while NBD clients are attached (`clients` counts
    /// them) unless `force`, which closes them first with
    /// `disconnect_clients` (given how long it may wait for them). Refused
    /// too, staying Primary, if replicated requests are still in flight
    /// after `wait`; the role changes only once none are.
    pub fn demote(
        &self,
        force: bool,
        wait: Duration,
        clients: &dyn Fn() -> usize,
        disconnect_clients: &dyn Fn(Duration) -> usize,
    ) -> Result<String, VerbError> {
        self.location()?;
        let _t = lock(&self.transition);
        if self.role() == Role::Secondary {
            return Ok(format!("{} is already Secondary", self.name));
        }
        // Held until the role is decided: clients are admitted under this
        // lock (see `admit`), so every one admitted before is counted here
        // and none is admitted meanwhile.
        let _admission = lock(&self.admission);
        let count = clients;
        let mut clients = count();
        if clients > 0 && !force {
            // A client that has just disconnected may still be closing
            // (its last replies drained): a moment's grace, bounded.
            let until = Instant::now() + Duration::from_secs(2);
            while clients > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
                clients = count();
            }
        }
        let event = Event::Demote { force, clients };
        self.dry_run(event.clone())?;
        self.serving.store(false, Ordering::SeqCst);
        let deadline = Instant::now() + wait;
        if clients > 0 {
            let n = disconnect_clients(wait);
            tracing::warn!(resource = %self.name, "demote --force: closed {n} NBD client(s)");
        }
        while self.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let requests = self.inflight.load(Ordering::SeqCst);
        let stepped = if requests > 0 {
            Err(VerbError::InFlight {
                requests,
                waited: wait,
            })
        } else {
            // Every write this Primary acknowledged becomes durable on both
            // nodes before the role changes: a later crash of both must not
            // leave two different copies that each call themselves UpToDate.
            if let Ok(store) = self
                .current_store()
                .ok()
                .filter(|_| !self.disk_detached())
                .ok_or(())
            {
                if let Err(e) = store.flush() {
                    tracing::error!(resource = %self.name, "flush on demote failed: {e}");
                }
            }
            if let Some(session) = self.current_session() {
                if let Some(b) = session.send_frame(Track::Barrier, |seq| Frame::Barrier { seq }) {
                    if session.wait(&b, self.ack_timeout()) != Remote::Done {
                        tracing::warn!(resource = %self.name, "demote: the peer did not make the last writes durable; they are marked out of sync");
                    }
                }
            }
            // The bits this Primary's writes set (what the peer missed)
            // go to the bitmap on disk before the role changes: a crash
            // from here on is a Secondary's, and its restart trusts that
            // bitmap, not the activity log (see `attach`).
            if self.persist_bitmap() {
                self.verb_step(event)
            } else {
                Err(VerbError::BitmapUnwritten)
            }
        };
        let fx = match stepped {
            Ok(fx) => fx,
            Err(e) => {
                // Still Primary: serve again, unless the resource went down.
                if self.role() == Role::Primary {
                    self.serving.store(true, Ordering::SeqCst);
                }
                tracing::warn!(resource = %self.name, "{e}");
                return Err(e);
            }
        };
        self.effects(&fx);
        if self.current_session().is_some() && !self.wait_mode(Role::Secondary) {
            tracing::warn!(resource = %self.name, "session did not switch to Secondary mode in time");
        }
        Ok(format!("{} is Secondary", self.name))
    }

    /// `connect`: leave StandAlone and (re)connect to the peer.
    pub fn connect(&self, discard_my_data: bool) -> Result<String, VerbError> {
        self.location()?;
        let fx = self.verb_step(Event::Connect { discard_my_data })?;
        self.effects(&fx);
        Ok(format!("{} is connecting", self.name))
    }

    /// `disconnect`: drop the link and stay StandAlone.
    pub fn disconnect(&self) -> Result<String, VerbError> {
        self.location()?;
        let fx = self.verb_step(Event::Disconnect)?;
        if let Some(s) = self.current_session() {
            s.fail("disconnected by the operator");
        }
        self.effects(&fx);
        Ok(format!("{} is StandAlone", self.name))
    }

    /// `new-current-uuid [--clear-bitmap]`.
    pub fn new_current_uuid(&self, clear_bitmap: bool) -> Result<String, VerbError> {
        self.location()?;
        let _t = lock(&self.transition);
        let fx = self.verb_step(Event::NewCurrentUuid { clear_bitmap })?;
        if clear_bitmap {
            lock(&self.oos).clear_range(0, u64::MAX);
            let current = lock(&self.inner)
                .node
                .as_ref()
                .map_or(0, |n| n.gens().current);
            if let Some(s) = self.current_session() {
                s.send_control(&Frame::SyncDone { current });
                self.send_state(&s, 0, 0);
            }
        }
        self.effects(&fx);
        Ok(format!("{}: new current generation", self.name))
    }
}
