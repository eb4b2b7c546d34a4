//! The control socket `replctl` talks to: a unix socket, readable and
//! writable by root only. Each connection carries one JSON request line
//! and gets one JSON response line, except `events`, which streams one
//! JSON line per state change until the client hangs up. Documented in
//! `docs/control.md`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::events::Events;
use crate::repl::Replica;
use crate::server::Clients;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;
/// Control connections served at once (each has a thread; `events` and
/// `wait-sync` hold theirs for a long time).
const MAX_CONNECTIONS: usize = 64;
/// How long `demote --force` and `down` wait for clients to go.
const DISCONNECT_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(tag = "verb", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    Status {
        #[serde(default)]
        resource: Option<String>,
    },
    OutOfSync {
        resource: String,
    },
    CreateMd {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    DumpMd {
        resource: String,
    },
    Up {
        resource: String,
    },
    Down {
        resource: String,
    },
    Promote {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    Demote {
        resource: String,
        #[serde(default)]
        force: bool,
    },
    Connect {
        resource: String,
        #[serde(default)]
        discard_my_data: bool,
    },
    Disconnect {
        resource: String,
    },
    NewCurrentUuid {
        resource: String,
        #[serde(default)]
        clear_bitmap: bool,
    },
    WaitSync {
        resource: String,
        /// 0 waits until synced or the client hangs up.
        #[serde(default)]
        timeout_ms: u64,
    },
    Events {},
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
        let listener = UnixListener::bind(path)
            .map_err(|e| anyhow::anyhow!("cannot create control socket {}: {e}", path.display()))?;
        // Root-only: the socket changes roles and data placement.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
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
            let busy = json!({"ok": false, "error": "too many control connections"});
            let _ = writeln!(conn, "{busy}");
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

fn serve(conn: UnixStream, ctx: &Context) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = conn
        .try_clone()
        .map(|c| BufReader::new(std::io::Read::take(c, MAX_REQUEST)).read_line(&mut line));
    let mut conn = conn;
    let request = match read {
        Ok(Ok(_)) => serde_json::from_str::<Request>(line.trim())
            .map_err(|e| json!({"ok": false, "error": format!("bad request: {e}")})),
        Ok(Err(e)) | Err(e) => Err(json!({"ok": false, "error": format!("reading request: {e}")})),
    };
    let response = match request {
        Ok(Request::Events {}) => return stream_events(conn, ctx),
        Ok(Request::WaitSync {
            resource,
            timeout_ms,
        }) => wait_sync(&conn, ctx, &resource, timeout_ms),
        Ok(r) => handle(r, ctx),
        Err(e) => e,
    };
    let _ = writeln!(conn, "{response}");
}

fn find<'a>(ctx: &'a Context, name: &str) -> Result<&'a Arc<Replica>, Value> {
    ctx.replicas
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| json!({"ok": false, "error": format!("no resource named {name:?}")}))
}

fn done(result: Result<String, String>) -> Value {
    match result {
        Ok(message) => json!({"ok": true, "message": message}),
        Err(error) => json!({"ok": false, "error": error}),
    }
}

fn handle(request: Request, ctx: &Context) -> Value {
    let with = |name: &str, f: &dyn Fn(&Arc<Replica>) -> Value| match find(ctx, name) {
        Ok(r) => f(r),
        Err(e) => e,
    };
    match request {
        Request::Status { resource } => {
            let chosen: Vec<_> = match resource {
                Some(name) => match find(ctx, &name) {
                    Ok(r) => vec![r.status()],
                    Err(e) => return e,
                },
                None => ctx.replicas.iter().map(|r| r.status()).collect(),
            };
            json!({"ok": true, "node": ctx.node, "resources": chosen})
        }
        Request::OutOfSync { resource } => with(
            &resource,
            &|r| json!({"ok": true, "resource": r.name, "runs": r.out_of_sync_runs()}),
        ),
        Request::CreateMd { resource, force } => with(&resource, &|r| done(r.create_md(force))),
        Request::DumpMd { resource } => with(&resource, &|r| match r.dump_md() {
            Ok(dump) => json!({"ok": true, "resource": r.name, "metadata": dump}),
            Err(error) => json!({"ok": false, "error": error}),
        }),
        Request::Up { resource } => with(&resource, &|r| done(r.up())),
        Request::Down { resource } => with(&resource, &|r| {
            let attached = ctx.clients.attached(&r.name);
            if attached > 0 {
                return done(Err(format!(
                    "down refused: {attached} NBD client(s) attached to {}",
                    r.name
                )));
            }
            done(r.down())
        }),
        Request::Promote { resource, force } => with(&resource, &|r| done(r.promote(force))),
        Request::Demote { resource, force } => with(&resource, &|r| {
            let attached = ctx.clients.attached(&r.name);
            let result = r.demote(force, attached, &|| {
                ctx.clients.disconnect(&r.name, DISCONNECT_WAIT)
            });
            done(result)
        }),
        Request::Connect {
            resource,
            discard_my_data,
        } => with(&resource, &|r| done(r.connect(discard_my_data))),
        Request::Disconnect { resource } => with(&resource, &|r| done(r.disconnect())),
        Request::NewCurrentUuid {
            resource,
            clear_bitmap,
        } => with(&resource, &|r| done(r.new_current_uuid(clear_bitmap))),
        Request::Events {} | Request::WaitSync { .. } => {
            json!({"ok": false, "error": "this verb needs its own connection"})
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
        let line = crate::repl::event_json("exists", &r.status());
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
fn wait_sync(conn: &UnixStream, ctx: &Context, resource: &str, timeout_ms: u64) -> Value {
    let r = match find(ctx, resource) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let deadline = (timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(timeout_ms));
    loop {
        match r.sync_state() {
            Ok(true) => return json!({"ok": true, "message": format!("{resource} is in sync")}),
            Ok(false) => {}
            Err(e) => return json!({"ok": false, "error": format!("wait-sync {resource}: {e}")}),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let s = r.status();
            return json!({"ok": false, "error": format!(
                "wait-sync {resource}: timed out after {timeout_ms} ms (disk {:?}, peer disk {:?}, connection {:?})",
                s.disk, s.peer_disk, s.connection
            )});
        }
        if ctx.stopping.load(Ordering::SeqCst) || hung_up(conn) {
            return json!({"ok": false, "error": "wait-sync: interrupted"});
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends one request to a control socket and returns the answer, or the
/// daemon's error message (`replctl` and the demo use it). `None` waits
/// for the answer indefinitely (`wait-sync`).
pub fn request(socket: &Path, req: &Value, timeout: Option<Duration>) -> Result<Value, String> {
    let mut conn = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach repld at {}: {e}", socket.display()))?;
    conn.set_read_timeout(timeout).map_err(|e| e.to_string())?;
    writeln!(conn, "{req}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let answer: Value =
        serde_json::from_str(&line).map_err(|e| format!("unreadable answer: {e}"))?;
    if answer["ok"] != json!(true) {
        return Err(answer["error"]
            .as_str()
            .unwrap_or("request failed")
            .to_owned());
    }
    Ok(answer)
}
