//! Synchronous replication of one resource to its peer (protocol C), and
//! the resource's life cycle around the pure state machine in
//! `crate::core`: metadata, up/down, roles, the peer link.
//!
//! A `Replica` owns the local store, its metadata, the out-of-sync bitmap
//! and the link to the peer. On the Primary it is the `Store` the NBD
//! frontend writes to: each write takes an interval lock on its range, is
//! sent to the peer and written locally at the same time, and completes
//! only when both are done (or, if the peer is lost, after the local
//! write, with the range marked out of sync). A FLUSH becomes a Barrier
//! that the peer acknowledges only when every earlier write is durable
//! there. On the Secondary the link's receiver applies frames in order and
//! acknowledges them.
//!
//! Roles change within a session: each side runs the session in the mode
//! of its current role (the Primary has no receiver thread, the Secondary
//! runs the apply loop) and switches mode when its role changes, telling
//! the peer with a `State` frame.

pub mod error;
pub mod intervals;
pub mod link;
pub use error::VerbError;

use crate::sync::lock;
use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use replblk_proto::repl::{
    data_flags, kind as repl_kind, state_flags, Frame, StateFrame, WriteRef,
};
use serde::Serialize;
use serde_json::Value;

use crate::bitmap::DirtyBitmap;
use crate::config::{LocalResource, MetaDisk, PeerConfig};
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
/// Acknowledged writes kept until a barrier makes them durable on the
/// peer (about 24 bytes each) before the keepalive thread sends one.
const UNSTABLE_CAP: usize = 65536;

/// The Primary's receiver wakes at least this often to notice role
/// changes, shutdown and ping deadlines.
const PRIMARY_TICK: Duration = Duration::from_millis(50);

/// Durable requests (FUA writes, barriers) queued for the Secondary's
/// flusher at most; past this the receiver waits (back-pressure).
const FLUSH_QUEUE: usize = 4096;
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
    session: Mutex<Option<Arc<Session>>>,
    /// The role the session currently runs as, for promote to wait on.
    mode: Mutex<Option<Role>>,
    mode_cv: Condvar,
    stopping: AtomicBool,
    wake_lock: Mutex<()>,
    wake_cv: Condvar,
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

/// Decrements the in-flight count when a request finishes.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
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
            session: Mutex::new(None),
            mode: Mutex::new(None),
            mode_cv: Condvar::new(),
            stopping: AtomicBool::new(false),
            wake_lock: Mutex::new(()),
            wake_cv: Condvar::new(),
            listener,
            manager: Mutex::new(None),
        });
        if replica.peer.is_none() {
            let store = FileStore::open(&res.disk, res.size, res.read_only).map_err(|e| {
                ReplicaError::Open {
                    resource: res.name.clone(),
                    message: e.to_string(),
                }
            })?;
            replica.size.store(store.size(), Ordering::SeqCst);
            *replica.store.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(store));
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
        Ok(())
    }

    /// Stops the link thread and closes the session; then, if up, writes
    /// the metadata as a clean shutdown (a Primary comes back Secondary).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
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
            out_of_sync_bytes: oos.bytes(self.size()),
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
        }
    }

    /// Emits a `change` event if anything `events` shows has changed.
    fn emit_if_changed(&self) {
        let status = self.status();
        let print = format!(
            "{} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            status.up,
            status.role,
            status.disk,
            status.connection,
            status.replication,
            status.peer_role,
            status.peer_disk,
            status.decision.as_ref().map(|d| (d.decision, d.rule)),
            status.down_reason,
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
            Some(n) if n.role() == Role::Primary => Ok(()),
            Some(n) => Err(VerbError::NotServingSecondary {
                resource: self.name.clone(),
                node,
                disk: n.disk(),
                primary: match n.peer() {
                    Some((Role::Primary, _)) => self.peer.as_ref().map(|p| p.peer_node.clone()),
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
        if clean {
            let mut bytes = vec![0u8; bitmap.to_bytes().len()];
            md.read_bitmap(&mut bytes)?;
            bitmap.merge_bytes(&bytes);
        } else if sb.gens.bitmap != 0 || sb.flags & md_flags::PRIMARY != 0 {
            // The bitmap is written at clean shutdown only (the activity
            // log that bounds a crash's damage comes later): after a crash
            // every block counts as out of sync.
            bitmap.set_all();
            tracing::warn!(
                resource = %self.name,
                "metadata was not shut down cleanly: every block is marked out of sync"
            );
        }
        let node = Node::from_meta(sb.gens, sb.flags, true);
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
        self.size.store(size, Ordering::SeqCst);
        *self.store.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(store));
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
        if let Ok(store) = self.current_store() {
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
                            tracing::error!(resource = %self.name, "writing metadata failed: {e}");
                            lock(&self.inner).last_error =
                                Some(format!("writing metadata failed: {e}"));
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
        let fx = self.verb_step(Event::Promote { force })?;
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
        let clients = clients();
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
            self.verb_step(event)
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
        if let Ok(store) = self.current_store() {
            if let Err(e) = store.flush() {
                tracing::error!(resource = %self.name, "flush on demote failed: {e}");
            }
        }
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
            Frame::SyncDone { current } => {
                let fx = self
                    .step(Event::SyncDone { current })
                    .map_err(LinkError::Protocol)?;
                lock(&self.oos).clear_range(0, u64::MAX);
                self.effects(&fx);
                Ok(())
            }
            other => Err(LinkError::Protocol(format!(
                "unexpected frame kind {}",
                other.kind()
            ))),
        }
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
        local: impl FnOnce(&dyn Store) -> io::Result<()>,
    ) -> io::Result<()> {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let _inflight = InFlight(&self.inflight);
        if !self.serving.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let store = self.current_store()?;
        if self.peer.is_none() {
            // A single-node resource has nobody to be out of sync with.
            return local(&*store);
        }
        let _range = self.intervals.lock(offset, len);
        let remote = self
            .current_session()
            .and_then(|s| send(&s).map(|slot| (s, slot)));
        let result = local(&*store);
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

    fn manage_link(self: Arc<Self>) {
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
                Ok(Some(stream)) => {
                    last_logged = None;
                    backoff = min_backoff;
                    self.run_session(&cfg, stream);
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

    /// Dials or accepts one connection, authenticates it, exchanges state
    /// and takes the sync decision. `Ok(None)`: the decision (or the
    /// operator) says not to run a session.
    fn establish(&self, cfg: &PeerConfig) -> Result<Option<TcpStream>, LinkError> {
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
        if !self.wants_link() {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(None);
        }
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let size = self.size();
        let agreed = link::handshake(&mut stream, cfg, &self.name, size, dialer)?;
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
        let (verdict, source) = {
            let inner = lock(&self.inner);
            let node = inner.node.as_ref();
            (
                node.and_then(|n| n.last_verdict()),
                node.is_some_and(|n| n.repl() == ReplState::SyncSource),
            )
        };
        let full = verdict.is_some_and(|v| v.decision.is_full());
        if source && (full || theirs.dirty_bits > 0) {
            // A full sync, or a target with changes of its own (which only
            // it knows the blocks of): send every block.
            lock(&self.oos).set_all();
        }
        if let Some(v) = verdict {
            tracing::info!(
                resource = %self.name, peer = %cfg.peer_node,
                "sync decision: {:?} by rule {} ({:?}: {})",
                v.decision, v.rule.number(), v.rule, v.rule.describe()
            );
        }
        if let Some(reason) = fx.drop_link {
            let _ = stream.shutdown(Shutdown::Both);
            self.set_link_error(reason);
            return Ok(None);
        }
        tracing::info!(
            resource = %self.name, peer = %cfg.peer_node,
            addr = %stream.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            version = agreed.version, "peer connected"
        );
        Ok(Some(stream))
    }

    fn run_session(self: &Arc<Self>, cfg: &PeerConfig, stream: TcpStream) {
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
        }
        self.set_link_error(reason);
        self.emit_if_changed();
        let _ = stream.shutdown(Shutdown::Both);
    }

    /// Sends every out-of-sync block to the peer (this node is the sync
    /// source), clearing each range once the peer acknowledged it, then
    /// tells the peer it is in sync and, once it confirmed, records the
    /// end of the sync. Application writes keep flowing meanwhile: the
    /// interval lock orders each resync chunk against them.
    ///
    /// This is the plain version: no rate control, no progress report
    /// (the resync issue adds those).
    fn resync(&self, session: &Arc<Session>) {
        const CHUNK: u64 = 256 * 1024;
        let started = Instant::now();
        let total = lock(&self.oos).count();
        tracing::info!(resource = %self.name, peer = %session.peer, blocks = total, "resync started");
        loop {
            if !session.is_alive() || self.stopping.load(Ordering::SeqCst) {
                return;
            }
            let next = lock(&self.oos).runs().next();
            let Some((offset, len)) = next else {
                break;
            };
            let len = len.min(CHUNK);
            let _range = self.intervals.lock(offset, len);
            let mut buf = vec![0u8; len as usize];
            let read = self
                .current_store()
                .and_then(|store| store.read_at(&mut buf, offset));
            if let Err(e) = read {
                tracing::error!(resource = %self.name, offset, "resync: reading the local disk failed: {e}");
                session.fail(&format!("resync read failed: {e}"));
                return;
            }
            let Some(slot) = session.send_write(offset, 0, &buf) else {
                return;
            };
            if session.wait(&slot, self.ack_timeout()) != Remote::Done {
                return;
            }
            lock(&self.oos).clear_range(offset, len);
        }
        // Durable on the target before it may call itself UpToDate.
        let Some(barrier) = session.send_frame(Track::Barrier, |seq| Frame::Barrier { seq }) else {
            return;
        };
        if session.wait(&barrier, self.ack_timeout()) != Remote::Done {
            return;
        }
        let current = lock(&self.inner)
            .node
            .as_ref()
            .map_or(0, |n| n.gens().current);
        session.send_control(&Frame::SyncDone { current });
        // The target records the end first; its answer confirms it.
        if !self.confirm_state(session, 0) {
            return;
        }
        match self.step(Event::SyncFinished) {
            Ok(fx) => self.effects(&fx),
            Err(e) => {
                tracing::warn!(resource = %self.name, "resync finished, but: {e}");
                return;
            }
        }
        tracing::info!(
            resource = %self.name, peer = %session.peer, blocks = total,
            elapsed_ms = started.elapsed().as_millis() as u64, "resync finished"
        );
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
        let mut next_ping = Instant::now() + interval;
        let mut nonce = 0u64;
        let mut ping: Option<(Instant, Arc<link::Slot>)> = None;
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
                // the list. Not every interval: a barrier is an fdatasync
                // on the peer, which would force write-back that the local
                // side does not do.
                if session.unstable_count() > UNSTABLE_CAP {
                    let _ = session
                        .submit_frame(Track::Barrier, Waiter::Nobody, |seq| Frame::Barrier { seq });
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
            let fd = reader.get_ref().as_raw_fd();
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
                    if !crate::net::wait_readable(fd, wait) {
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

    fn receive_as_secondary<'s>(
        &'s self,
        session: &'s Arc<Session>,
        scope: &'s std::thread::Scope<'s, '_>,
    ) -> Result<ModeEnd, LinkError> {
        let store = self
            .current_store()
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        // Durability requests (FUA writes, barriers) that arrive while
        // more frames are already buffered go to a flusher thread that
        // fdatasyncs once per batch and then acknowledges the batch, so the
        // receiver keeps applying later writes meanwhile. One that arrives
        // with nothing behind it is flushed here: no hand-off, and nothing
        // waits to be applied (see `durable_here`).
        let (to_flusher, flush_queue) = mpsc::sync_channel::<u64>(FLUSH_QUEUE);
        let flusher_session = session.clone();
        let flusher_store = store.clone();
        scope.spawn(move || {
            while let Ok(first) = flush_queue.recv() {
                let mut batch = vec![first];
                batch.extend(flush_queue.try_iter());
                let status = match flusher_store.flush() {
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
        // Frames a submitter read while this node was still Primary.
        for (kind, body) in session.take_stash() {
            match self.apply(session, &*store, kind, &body)? {
                Applied::Nothing => {}
                Applied::Done { seq, .. } => {
                    // Durable or not: flush before acknowledging, rarely.
                    let status = match store.flush() {
                        Ok(()) => 0,
                        Err(e) => crate::nbd::transmission::io_errno(e),
                    };
                    session.send_control(&Frame::Ack { seq, status });
                }
                Applied::Failed { seq, status } => {
                    session.send_control(&Frame::Ack { seq, status })
                }
            }
        }
        let mut body = Vec::new();
        // Acks are batched: written when no further frame is already
        // buffered, i.e. just before the receiver could block on the socket.
        let mut acks = BytesMut::with_capacity(4096);
        let result = loop {
            if reader.buffer().is_empty() && !acks.is_empty() {
                session.send_raw(&acks);
                acks.clear();
            }
            if self.role() != Role::Secondary {
                break Ok(ModeEnd::RoleChanged);
            }
            let kind = match link::read_raw(&mut *reader, &mut body) {
                Ok(k) => k,
                Err(e) => break Err(e),
            };
            if !session.is_alive() {
                break Ok(ModeEnd::Over(
                    session.reason().unwrap_or_else(|| "shutting down".into()),
                ));
            }
            match self.apply(session, &*store, kind, &body) {
                Ok(Applied::Nothing) => {}
                Ok(Applied::Done { seq, durable: true }) if reader.buffer().is_empty() => {
                    // Acks of earlier writes need not wait for the flush.
                    if !acks.is_empty() {
                        session.send_raw(&acks);
                        acks.clear();
                    }
                    let status = match store.flush() {
                        Ok(()) => 0,
                        Err(e) => {
                            tracing::error!(resource = %self.name, "flush on the secondary failed: {e}");
                            crate::nbd::transmission::io_errno(e)
                        }
                    };
                    Frame::Ack { seq, status }.encode(&mut acks);
                }
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

    fn check_seq(session: &Session, seq: u64) -> Result<(), LinkError> {
        let expected = session.expected_seq.load(Ordering::Relaxed);
        if seq != expected {
            return Err(LinkError::Protocol(format!(
                "sequence number {seq} where {expected} was due"
            )));
        }
        session.expected_seq.store(expected + 1, Ordering::Relaxed);
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), LinkError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size() => Ok(()),
            _ => Err(LinkError::Protocol(format!(
                "range {offset}+{len} is outside the {}-byte device",
                self.size()
            ))),
        }
    }

    /// Applies one frame received by the Secondary.
    fn apply(
        &self,
        session: &Session,
        store: &dyn Store,
        kind: u16,
        body: &[u8],
    ) -> Result<Applied, LinkError> {
        let protocol = |e: replblk_proto::DecodeError| LinkError::Protocol(e.to_string());
        let (seq, durable, result) = if kind == repl_kind::WRITE {
            // The hot path: decoded in place, no copy of the payload.
            let w = WriteRef::decode_body(body).map_err(protocol)?;
            Self::check_seq(session, w.seq)?;
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
            let r = store.write_at(w.payload, w.offset, false);
            (w.seq, w.flags & data_flags::FUA != 0, r)
        } else {
            match Frame::decode_body(kind, body).map_err(protocol)? {
                Frame::Trim {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::check_seq(session, seq)?;
                    self.check_range(offset, length)?;
                    let r = store.trim(offset, length);
                    (seq, flags & data_flags::FUA != 0, r)
                }
                Frame::WriteZeroes {
                    seq,
                    offset,
                    length,
                    flags,
                } => {
                    Self::check_seq(session, seq)?;
                    self.check_range(offset, length)?;
                    let r = store.write_zeroes(offset, length, flags & data_flags::NO_HOLE == 0);
                    (seq, flags & data_flags::FUA != 0, r)
                }
                Frame::Barrier { seq } => {
                    Self::check_seq(session, seq)?;
                    (seq, true, Ok(()))
                }
                // Acks reach a Secondary that is a sync source.
                Frame::Ack { seq, status } => {
                    session.acknowledge(seq, status, &mut Batch::default())?;
                    return Ok(Applied::Nothing);
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
    fn as_dyn(&self) -> &dyn Store {
        self
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // Only the Primary serves: a client that slipped past a demote
        // must not read a Secondary's data, which the Primary is changing.
        if self.peer.is_some() && !self.serving.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.current_store()?.read_at(buf, offset)
    }

    /// The Primary's write path at depth: the calling worker writes
    /// locally, queues the frame for the peer and returns; the thread that
    /// reads the peer's Ack completes the request (replies to the client).
    /// No thread waits for the network, so none has to be woken per write.
    fn submit(&self, op: Modify<'_>, done: Done) {
        let Some(me) = self.me.upgrade().filter(|_| self.peer.is_some()) else {
            let result = op.apply(self);
            return done(result, &mut Batch::default());
        };
        self.inflight.fetch_add(1, Ordering::SeqCst);
        if !self.serving.load(Ordering::SeqCst) {
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return done(
                Err(io::Error::from_raw_os_error(libc::EPERM)),
                &mut Batch::default(),
            );
        }
        let store = match self.current_store() {
            Ok(s) => s,
            Err(e) => {
                self.inflight.fetch_sub(1, Ordering::SeqCst);
                return done(Err(e), &mut Batch::default());
            }
        };
        let (offset, len) = op.range();
        // Held until both copies have it: overlapping writes are never in
        // flight together, so they land in the same order on both nodes.
        let range = self.intervals.acquire(offset, len);
        if let Err(e) = op.apply(&*store) {
            self.mark_out_of_sync(offset, len);
            self.intervals.release(range);
            self.inflight.fetch_sub(1, Ordering::SeqCst);
            return done(Err(e), &mut Batch::default());
        }
        let finish: link::Callback = Box::new(move |remote, batch| {
            if remote != Remote::Done {
                if let Remote::Failed(errno) = remote {
                    tracing::warn!(resource = %me.name, offset, len, errno, "peer failed a write; range marked out of sync");
                }
                me.mark_out_of_sync(offset, len);
            }
            me.intervals.release(range);
            me.inflight.fetch_sub(1, Ordering::SeqCst);
            done(Ok(()), batch);
        });
        let track = Track::plain(offset, len);
        let session = self.current_session();
        let queued = match &session {
            None => Err(Waiter::Call(finish)),
            Some(s) => match op {
                Modify::Write { buf, offset } => {
                    s.submit_write(offset, 0, buf, track, Waiter::Call(finish))
                }
                Modify::Trim { offset, len } => {
                    s.submit_frame(track, Waiter::Call(finish), |seq| Frame::Trim {
                        seq,
                        offset,
                        length: len,
                        flags: 0,
                    })
                }
                Modify::WriteZeroes {
                    offset,
                    len,
                    may_unmap,
                } => s.submit_frame(track, Waiter::Call(finish), |seq| Frame::WriteZeroes {
                    seq,
                    offset,
                    length: len,
                    flags: if may_unmap { 0 } else { data_flags::NO_HOLE },
                }),
            },
        };
        match (queued, session) {
            (Ok(seq), Some(s)) => s.after_submit(seq, self.ack_timeout()),
            (Err(Waiter::Call(finish)), _) => {
                // No peer: the local write stands, the range is out of sync.
                finish(Remote::Lost, &mut Batch::default());
            }
            _ => {}
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        let flags = if durable { data_flags::FUA } else { 0 };
        self.replicate(
            offset,
            buf.len() as u64,
            |s| s.send_write(offset, flags, buf),
            |store| store.write_at(buf, offset, durable),
        )
    }

    fn flush(&self) -> io::Result<()> {
        let store = self.current_store()?;
        if !self.serving.load(Ordering::SeqCst) || self.peer.is_none() {
            return store.flush();
        }
        let remote = self.current_session().and_then(|s| {
            s.send_frame(Track::Barrier, |seq| Frame::Barrier { seq })
                .map(|slot| (s, slot))
        });
        let local = store.flush();
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
                s.send_frame(Track::plain(offset, len), |seq| Frame::Trim {
                    seq,
                    offset,
                    length: len,
                    flags: 0,
                })
            },
            |store| store.trim(offset, len),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        let flags = if may_unmap { 0 } else { data_flags::NO_HOLE };
        self.replicate(
            offset,
            len,
            |s| {
                s.send_frame(Track::plain(offset, len), |seq| Frame::WriteZeroes {
                    seq,
                    offset,
                    length: len,
                    flags,
                })
            },
            |store| store.write_zeroes(offset, len, may_unmap),
        )
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        self.current_store()?.cache(offset, len)
    }
}
