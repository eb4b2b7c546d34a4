//! The control socket `replctl` talks to: a unix socket, readable and
//! writable by root only, carrying one JSON request line and one JSON
//! response line per connection. Documented in `docs/control.md`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::repl::Replica;

/// Longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

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
}

pub struct ControlServer {
    path: PathBuf,
    listener: Arc<UnixListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    pub fn start(path: &Path, node: String, replicas: Vec<Arc<Replica>>) -> anyhow::Result<Self> {
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
        let stopping = Arc::new(AtomicBool::new(false));
        let (l, stop) = (listener.clone(), stopping.clone());
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    match conn {
                        Ok(c) => serve(c, &node, &replicas),
                        Err(e) => {
                            tracing::warn!("control socket accept failed: {e}");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_owned(),
            listener,
            stopping,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on our own listening socket wakes accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(conn: UnixStream, node: &str, replicas: &[Arc<Replica>]) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = conn.set_write_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let read = conn
        .try_clone()
        .map(|c| BufReader::new(std::io::Read::take(c, MAX_REQUEST)).read_line(&mut line));
    let response = match read {
        Ok(Ok(_)) => handle(&line, node, replicas),
        Ok(Err(e)) | Err(e) => json!({"ok": false, "error": format!("reading request: {e}")}),
    };
    let mut conn = conn;
    let _ = writeln!(conn, "{response}");
}

fn find<'a>(replicas: &'a [Arc<Replica>], name: &str) -> Result<&'a Arc<Replica>, Value> {
    replicas
        .iter()
        .find(|r| r.name == name)
        .ok_or_else(|| json!({"ok": false, "error": format!("no resource named {name:?}")}))
}

/// Answers one request line.
pub fn handle(line: &str, node: &str, replicas: &[Arc<Replica>]) -> Value {
    let request: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    match request {
        Request::Status { resource } => {
            let chosen: Vec<_> = match resource {
                Some(name) => match find(replicas, &name) {
                    Ok(r) => vec![r.status()],
                    Err(e) => return e,
                },
                None => replicas.iter().map(|r| r.status()).collect(),
            };
            json!({"ok": true, "node": node, "resources": chosen})
        }
        Request::OutOfSync { resource } => match find(replicas, &resource) {
            Ok(r) => json!({"ok": true, "resource": resource, "runs": r.out_of_sync_runs()}),
            Err(e) => e,
        },
    }
}
