//! The control socket `replctl` talks to: a unix socket, readable and
//! writable by root only. Each connection carries one JSON request line
//! and gets one JSON response line, except `events`, which streams one
//! JSON line per state change until the client hangs up. The messages are
//! the types in `proto`, shared with the client side in `client`;
//! documented in `docs/control.md`.

pub mod client;
pub mod proto;

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::events::Events;
use crate::repl::{ConnState, DiskState, Replica, VerbError};
use crate::server::Clients;
use proto::{
    Answer, DumpMdAnswer, EventKind, MessageAnswer, OutOfSyncAnswer, Request, Response,
    StatusAnswer, StatusEvent,
};

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Control connections served at once (each has a thread; `events` and
/// `wait-sync` hold theirs for a long time).
const MAX_CONNECTIONS: usize = 64;
/// `wait-sync` looks again at least this often.
const WAIT_TICK: Duration = Duration::from_millis(20);

/// Why a request failed; the Display is the `error` text of the answer.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("bad request: {0}")]
    BadRequest(serde_json::Error),
    #[error("reading request: {0}")]
    Read(io::Error),
    #[error("too many control connections")]
    Busy,
    #[error("no resource named {0:?}")]
    NoSuchResource(String),
    #[error("down refused: {attached} NBD client(s) attached to {resource}")]
    ClientsAttached { resource: String, attached: usize },
    #[error("this verb needs its own connection")]
    NeedsOwnConnection,
    #[error("wait-sync {resource}: {error}")]
    WaitSync { resource: String, error: VerbError },
    #[error(
        "wait-sync {resource}: timed out after {timeout_ms} ms (disk {disk:?}, peer disk {peer_disk:?}, connection {connection:?})"
    )]
    WaitSyncTimeout {
        resource: String,
        timeout_ms: u64,
        disk: DiskState,
        peer_disk: Option<DiskState>,
        connection: ConnState,
    },
    #[error("wait-sync: interrupted")]
    Interrupted,
    #[error(transparent)]
    Verb(#[from] VerbError),
}

/// What the request handlers can reach.
pub struct Context {
    pub node: String,
    pub replicas: Vec<Arc<Replica>>,
    pub clients: Clients,
    pub events: Arc<Events>,
    stopping: AtomicBool,
    active: AtomicUsize,
}

pub struct ControlServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    ctx: Arc<Context>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(
        path: &Path,
        node: String,
        replicas: Vec<Arc<Replica>>,
        clients: Clients,
        events: Arc<Events>,
    ) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "control socket {} is in use by another repld",
                    path.display()
                );
            }
            std::fs::remove_file(path)?;
        }
        // Bound and listening under a temporary name, root-only, then
        // renamed into place: whoever sees the path can connect at once
        // (a plain bind shows the path before listen(2), when a connect
        // is refused).
        let mut staged = path.as_os_str().to_owned();
        staged.push(format!(".{}.new", std::process::id()));
        let staged = PathBuf::from(staged);
        let _ = std::fs::remove_file(&staged);
        let created = UnixListener::bind(&staged)
            .map_err(|e| anyhow::anyhow!("cannot create control socket {}: {e}", path.display()))
            .and_then(|listener| {
                // Root-only: the socket changes roles and data placement.
                std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
                std::fs::rename(&staged, path)?;
                Ok(listener)
            });
        let listener = match created {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        };
        let listener = Arc::new(listener);
        let ctx = Arc::new(Context {
            node,
            replicas,
            clients,
            events,
            stopping: AtomicBool::new(false),
            active: AtomicUsize::new(0),
        });
        let (l, c) = (listener.clone(), ctx.clone());
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&l, &c))?;
        Ok(ControlServer {
            path: path.to_owned(),
            listener,
            ctx,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.ctx.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on our own listening socket wakes accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: &UnixListener, ctx: &Arc<Context>) {
    for conn in listener.incoming() {
        if ctx.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if ctx.active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            let _ = writeln!(conn, "{}", Response::error(&ControlError::Busy).to_line());
            continue;
        }
        let c = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                serve(conn, &c);
                c.active.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            ctx.active.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("cannot start a control connection thread: {e}");
        }
    }
}

fn read_request(conn: &UnixStream) -> Result<Request, ControlError> {
    let mut line = String::new();
    let reader = conn.try_clone().map_err(ControlError::Read)?;
    BufReader::new(io::Read::take(reader, MAX_REQUEST))
        .read_line(&mut line)
        .map_err(ControlError::Read)?;
    serde_json::from_str(line.trim()).map_err(ControlError::BadRequest)
}

fn serve(mut conn: UnixStream, ctx: &Context) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let response = match read_request(&conn) {
        Ok(Request::Events {}) => return stream_events(conn, ctx),
        Ok(request) => match handle(request, ctx, &conn) {
            Ok(answer) => Response::Ok(answer),
            Err(e) => Response::error(&e),
        },
        Err(e) => Response::error(&e),
    };
    let _ = writeln!(conn, "{}", response.to_line());
}

fn find<'a>(ctx: &'a Context, name: &str) -> Result<&'a Arc<Replica>, ControlError> {
    ctx.replicas
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| ControlError::NoSuchResource(name.to_owned()))
}

fn message(result: Result<String, VerbError>) -> Result<Answer, ControlError> {
    Ok(Answer::Message(MessageAnswer { message: result? }))
}

/// Carries out one request (`conn` is watched for a hang-up by verbs that
/// wait).
fn handle(request: Request, ctx: &Context, conn: &UnixStream) -> Result<Answer, ControlError> {
    match request {
        Request::Status { resource } => {
            let resources = match resource {
                Some(name) => vec![find(ctx, &name)?.status()],
                None => ctx.replicas.iter().map(|r| r.status()).collect(),
            };
            Ok(Answer::Status(StatusAnswer {
                node: ctx.node.clone(),
                resources,
            }))
        }
        Request::OutOfSync { resource } => {
            let r = find(ctx, &resource)?;
            Ok(Answer::OutOfSync(OutOfSyncAnswer {
                resource: r.name.clone(),
                runs: r.out_of_sync_runs(),
            }))
        }
        Request::CreateMd { resource, force } => message(find(ctx, &resource)?.create_md(force)),
        Request::DumpMd { resource } => {
            let r = find(ctx, &resource)?;
            Ok(Answer::DumpMd(Box::new(DumpMdAnswer {
                resource: r.name.clone(),
                metadata: r.dump_md()?,
            })))
        }
        Request::Up { resource } => message(find(ctx, &resource)?.up()),
        Request::Down { resource } => {
            let r = find(ctx, &resource)?;
            let attached = ctx.clients.attached(&r.name);
            if attached > 0 {
                return Err(ControlError::ClientsAttached {
                    resource: r.name.clone(),
                    attached,
                });
            }
            message(r.down())
        }
        Request::Promote { resource, force } => message(find(ctx, &resource)?.promote(force)),
        Request::Demote {
            resource,
            force,
            timeout_ms,
        } => {
            let r = find(ctx, &resource)?;
            let wait = timeout_ms.map_or(crate::repl::DRAIN_TIMEOUT, Duration::from_millis);
            message(
                r.demote(force, wait, &|| ctx.clients.attached(&r.name), &|wait| {
                    ctx.clients.disconnect(&r.name, wait)
                }),
            )
        }
        Request::Connect {
            resource,
            discard_my_data,
        } => message(find(ctx, &resource)?.connect(discard_my_data)),
        Request::Disconnect { resource } => message(find(ctx, &resource)?.disconnect()),
        Request::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => message(find(ctx, &resource)?.new_current_uuid(clear_bitmap)),
        Request::WaitSync {
            resource,
            timeout_ms,
        } => wait_sync(conn, ctx, &resource, timeout_ms),
        Request::Verify { resource, stop } => {
            let r = find(ctx, &resource)?;
            message(if stop { r.verify_stop() } else { r.verify() })
        }
        Request::Invalidate { resource } => message(find(ctx, &resource)?.invalidate()),
        Request::InvalidateRemote { resource } => {
            message(find(ctx, &resource)?.invalidate_remote())
        }
        Request::Outdate { resource } => message(find(ctx, &resource)?.outdate()),
        Request::ResumeIo { resource } => message(find(ctx, &resource)?.resume_io()),
        Request::Events {} => Err(ControlError::NeedsOwnConnection),
        Request::ResyncRate {
            resource,
            max_rate_mib,
            min_rate_mib,
            fill_target_kib,
            plan_ahead_ms,
        } => {
            let mib = |v: u64| v.saturating_mul(1 << 20);
            message(find(ctx, &resource)?.set_resync_rate(
                max_rate_mib.map(mib),
                min_rate_mib.map(mib),
                fill_target_kib.map(|k| k.saturating_mul(1024)),
                plan_ahead_ms,
            ))
        }
    }
}

/// True once the client closed its end (or the socket failed).
fn hung_up(conn: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a non-blocking peek into a local one-byte buffer.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0 || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
}

/// `events`: one line per existing resource (`"type":"exists"`), then
/// one per change until the client or the daemon goes away.
fn stream_events(mut conn: UnixStream, ctx: &Context) {
    let rx = ctx.events.subscribe();
    let _ = conn.set_write_timeout(Some(Duration::from_secs(30)));
    for r in &ctx.replicas {
        let event = StatusEvent {
            kind: EventKind::Exists,
            status: r.status(),
        };
        let line = serde_json::to_string(&event).unwrap_or_default();
        if writeln!(conn, "{line}").is_err() {
            return;
        }
    }
    let _ = conn.flush();
    while !ctx.stopping.load(Ordering::SeqCst) {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(event) => {
                if writeln!(conn, "{event}").is_err() {
                    return;
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if hung_up(&conn) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// `wait-sync`: answers once the resource is connected with both disks
/// UpToDate, or fails at the timeout, when the link is StandAlone (split
/// brain, refusal) or when the resource is down.
fn wait_sync(
    conn: &UnixStream,
    ctx: &Context,
    resource: &str,
    timeout_ms: u64,
) -> Result<Answer, ControlError> {
    let r = find(ctx, resource)?;
    let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
    // Woken by every state change (what `events` streams), so the answer
    // goes as soon as the sync ends, not at the next tick; the tick stays
    // for the deadline, a client that hung up, and shutdown.
    let changes = ctx.events.subscribe();
    loop {
        match r.sync_state() {
            Ok(true) => {
                return Ok(Answer::Message(MessageAnswer {
                    message: format!("{resource} is in sync"),
                }))
            }
            Ok(false) => {}
            Err(error) => {
                return Err(ControlError::WaitSync {
                    resource: resource.to_owned(),
                    error,
                })
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let s = r.status();
            return Err(ControlError::WaitSyncTimeout {
                resource: resource.to_owned(),
                timeout_ms,
                disk: s.disk,
                peer_disk: s.peer_disk,
                connection: s.connection,
            });
        }
        if ctx.stopping.load(Ordering::SeqCst) || hung_up(conn) {
            return Err(ControlError::Interrupted);
        }
        match changes.recv_timeout(WAIT_TICK) {
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            // Dropped for falling behind: the tick alone, then.
            Err(RecvTimeoutError::Disconnected) => std::thread::sleep(WAIT_TICK),
        }
    }
}
