//! The NBD server's lifecycle: open the exports, bind the listeners, accept
//! connections (one thread each, with a worker pool for transmission), and
//! shut down gracefully: stop accepting, let in-flight requests finish,
//! flush every store.

use crate::sync::lock;
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::NbdConfig;
use crate::config::TlsMode;
use crate::nbd::handshake::{self, Admission, Client, Context, Outcome};
use crate::nbd::transmission::{self, CloseReason};
use crate::nbd::Exports;
use crate::net::Stream;
use crate::store::OpenError;

#[derive(Debug, Error)]
pub enum StartError {
    #[error("resource {resource:?}: {source}")]
    Open { resource: String, source: OpenError },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("unix socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    #[error("cannot start thread: {0}")]
    Thread(io::Error),
    #[error("[nbd] TLS: {0}")]
    Tls(String),
}

struct Shared {
    exports: Exports,
    admission: Arc<dyn Admission>,
    cfg: NbdConfig,
    /// The TLS config STARTTLS uses (`[nbd] tls` not `off`).
    tls: Option<Arc<rustls::ServerConfig>>,
    stopping: AtomicBool,
    /// Every open connection: a clone of its socket (to shut it at stop
    /// or on `disconnect`) and, once admitted to one, its export.
    conns: Mutex<HashMap<u64, Conn>>,
    drained: Condvar,
    next_id: AtomicU64,
}

struct Conn {
    stream: Stream,
    export: Option<String>,
    /// Who the admitted client is, to check it again when the access
    /// rules change.
    client: Option<Client>,
}

/// A handle on the server's client connections, for role changes: how
/// many clients use an export, and closing them (`demote --force`).
#[derive(Clone)]
pub struct Clients(Arc<Shared>);

impl Clients {
    /// Clients admitted to `export` (counted from their admission, in
    /// one step with the role check; see `Admission::admit`).
    pub fn attached(&self, export: &str) -> usize {
        lock(&self.0.conns)
            .values()
            .filter(|c| c.export.as_deref() == Some(export))
            .count()
    }

    /// Closes every client of `export` and waits (up to `timeout`) for
    /// their connection threads to finish; returns how many were closed.
    pub fn disconnect(&self, export: &str, timeout: Duration) -> usize {
        let mut conns = lock(&self.0.conns);
        let ids: Vec<u64> = conns
            .iter()
            .filter(|(_, c)| c.export.as_deref() == Some(export))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(c) = conns.get(id) {
                c.stream.shutdown(Shutdown::Both);
            }
        }
        let deadline = Instant::now() + timeout;
        while ids.iter().any(|id| conns.contains_key(id)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            conns = self
                .0
                .drained
                .wait_timeout(conns, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        ids.len()
    }

    /// Checks every admitted client against its export's current access
    /// rules (after a reload) and closes those no longer allowed; returns
    /// how many were closed.
    pub fn enforce_access(&self) -> usize {
        let conns = lock(&self.0.conns);
        let mut closed = 0;
        for c in conns.values() {
            let (Some(name), Some(client)) = (&c.export, &c.client) else {
                continue;
            };
            let Some(export) = self.0.exports.find(name) else {
                continue;
            };
            if let Err(why) = handshake::permit(&export.access(), client) {
                tracing::warn!(
                    peer = %c.stream.peer(), export = %name,
                    "closing client: no longer allowed: {why}"
                );
                c.stream.shutdown(Shutdown::Both);
                closed += 1;
            }
        }
        closed
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are small and latency-bound; never wait for Nagle.
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l, _) => Ok(Stream::Unix(l.accept()?.0)),
        }
    }

    /// Wakes a thread blocked in accept(): on Linux, shutting a listening
    /// socket makes accept return EINVAL.
    fn wake(&self) {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        // SAFETY: shutdown on a descriptor we own; no memory involved.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }
}

/// A running NBD server.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<Arc<Listener>>,
    accept_threads: Vec<JoinHandle<()>>,
    tcp_addr: Option<SocketAddr>,
}

fn bind_unix(path: &Path) -> Result<UnixListener, StartError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(StartError::SocketInUse(path.to_owned()));
        }
        // A stale socket from a daemon that did not exit cleanly.
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| StartError::Bind {
        addr: path.display().to_string(),
        source,
    })
}

impl Server {
    /// Starts serving `exports` on the listeners of `cfg`.
    pub fn start_with(
        cfg: NbdConfig,
        exports: Exports,
        admission: Arc<dyn Admission>,
    ) -> Result<Server, StartError> {
        let mut listeners = Vec::new();
        let mut tcp_addr = None;
        if let Some(addr) = cfg.listen {
            let l = TcpListener::bind(addr).map_err(|source| StartError::Bind {
                addr: addr.to_string(),
                source,
            })?;
            tcp_addr = l.local_addr().ok();
            listeners.push(Arc::new(Listener::Tcp(l)));
        }
        if let Some(path) = &cfg.unix_socket {
            listeners.push(Arc::new(Listener::Unix(bind_unix(path)?, path.clone())));
        }
        let tls = match (cfg.tls, &cfg.tls_cert, &cfg.tls_key) {
            (TlsMode::Off, _, _) => None,
            (_, Some(cert), Some(key)) => Some(
                crate::tls::nbd_server_config(cert, key, cfg.tls_ca.as_deref())
                    .map_err(StartError::Tls)?
                    .config,
            ),
            _ => return Err(StartError::Tls("tls needs tls_cert and tls_key".into())),
        };
        let shared = Arc::new(Shared {
            exports,
            admission,
            tls,
            cfg,
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            drained: Condvar::new(),
            next_id: AtomicU64::new(1),
        });
        let mut accept_threads = Vec::new();
        for listener in &listeners {
            match listener.as_ref() {
                Listener::Tcp(_) => tracing::info!(
                    "listening for NBD on tcp {}",
                    tcp_addr.map(|a| a.to_string()).unwrap_or_default()
                ),
                Listener::Unix(_, p) => tracing::info!("listening for NBD on unix {}", p.display()),
            }
            let (shared, listener) = (shared.clone(), listener.clone());
            let t = std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&shared, &listener))
                .map_err(StartError::Thread)?;
            accept_threads.push(t);
        }
        Ok(Server {
            shared,
            listeners,
            accept_threads,
            tcp_addr,
        })
    }

    /// A handle on the client connections, usable after `shutdown` too.
    pub fn clients(&self) -> Clients {
        Clients(self.shared.clone())
    }

    /// The bound TCP address (useful when configured with port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Stops accepting, lets in-flight requests finish (up to the
    /// configured timeout), then flushes every export.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.shared.stopping.store(true, Ordering::SeqCst);
        for l in &self.listeners {
            l.wake();
        }
        for t in self.accept_threads.drain(..) {
            let _ = t.join();
        }
        for l in &self.listeners {
            if let Listener::Unix(_, path) = l.as_ref() {
                let _ = std::fs::remove_file(path);
            }
        }
        let mut conns = lock(&self.shared.conns);
        // Closing only the read side ends each connection's request stream
        // while letting replies to requests already read go out.
        for c in conns.values() {
            c.stream.shutdown(Shutdown::Read);
        }
        let timeout = Duration::from_millis(self.shared.cfg.shutdown_timeout_ms);
        let deadline = Instant::now() + timeout;
        while !conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    "{} connection(s) still busy after {timeout:?}; closing them",
                    conns.len()
                );
                for c in conns.values() {
                    c.stream.shutdown(Shutdown::Both);
                }
                break;
            }
            conns = self
                .shared
                .drained
                .wait_timeout(conns, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(conns);
        let mut result = Ok(());
        for export in self.shared.exports.iter() {
            if let Err(e) = export.store.flush() {
                tracing::error!(export = %export.name, "flush at shutdown failed: {e}");
                result = Err(e);
            }
        }
        result
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &Listener) {
    loop {
        let stream = listener.accept();
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream.peer();
        if let Some(ip) = stream.peer_addr().map(|a| a.ip()) {
            // Before any byte is exchanged: an address no export admits
            // costs one accept and one close.
            let client = Client {
                addr: Some(ip),
                ..Client::default()
            };
            let welcome = shared.exports.iter().any(|e| {
                !matches!(
                    handshake::permit(&e.access(), &client),
                    Err(handshake::Refusal::Denied(_))
                )
            });
            if !welcome {
                tracing::warn!(
                    peer,
                    "refusing connection: address not allowed for any export"
                );
                stream.shutdown(Shutdown::Both);
                continue;
            }
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = lock(&shared.conns);
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            if conns.len() >= shared.cfg.max_connections {
                tracing::warn!(
                    peer,
                    "refusing connection: {} connections already open",
                    conns.len()
                );
                continue;
            }
            match stream.try_clone() {
                Ok(clone) => {
                    conns.insert(
                        id,
                        Conn {
                            stream: clone,
                            export: None,
                            client: None,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(peer, "refusing connection: {e}");
                    continue;
                }
            }
        }
        let shared2 = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || {
                serve_connection(&shared2, id, stream, &peer);
                let mut conns = lock(&shared2.conns);
                conns.remove(&id);
                shared2.drained.notify_all();
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start connection thread: {e}");
            lock(&shared.conns).remove(&id);
        }
    }
}

fn serve_connection(shared: &Shared, id: u64, mut stream: Stream, peer: &str) {
    tracing::info!(peer, "connection opened");
    let timeout = Duration::from_millis(shared.cfg.handshake_timeout_ms);
    if let Err(e) = stream.set_timeouts(Some(timeout)) {
        tracing::info!(peer, "connection closed: {e}");
        return;
    }
    // Admitted clients are counted (their export recorded) as part of the
    // admission, not after the handshake: see `Admission::admit`.
    let mut attach = |export: &crate::nbd::Export, client: &Client| {
        if let Some(c) = lock(&shared.conns).get_mut(&id) {
            c.export = Some(export.name.clone());
            c.client = Some(client.clone());
        }
    };
    let tcp = matches!(stream, Stream::Tcp(_));
    let ctx = Context {
        tls: if tcp { shared.tls.as_ref() } else { None },
        mode: if tcp { shared.cfg.tls } else { TlsMode::Off },
        client: Client {
            addr: stream.peer_addr().map(|a| a.ip()),
            tls: false,
            identity: None,
        },
    };
    let outcome = handshake::serve(
        &mut stream,
        &shared.exports,
        &*shared.admission,
        &mut attach,
        timeout,
        ctx,
    );
    let export = match outcome {
        Ok(Outcome::Transmission(export)) => export,
        Ok(Outcome::Aborted) => {
            tracing::info!(peer, "connection closed: client ended the handshake");
            return;
        }
        Err(e) => {
            tracing::warn!(peer, "connection closed: {e}");
            return;
        }
    };
    if let Err(e) = stream.set_timeouts(None) {
        tracing::info!(peer, export = %export.name, "connection closed: {e}");
        return;
    }
    let limits = transmission::Limits {
        send_timeout: Duration::from_millis(shared.cfg.send_timeout_ms),
        drain: Duration::from_millis(shared.cfg.shutdown_timeout_ms),
    };
    match transmission::serve(stream, &export, shared.cfg.workers_per_connection, limits) {
        Ok(summary) => {
            let requests = summary.requests;
            match summary.reason {
                CloseReason::Disconnect => tracing::info!(
                    peer, export = %export.name, requests, "connection closed: client disconnected"
                ),
                CloseReason::Eof => tracing::info!(
                    peer, export = %export.name, requests, "connection closed: end of stream"
                ),
                CloseReason::Error(why) => tracing::warn!(
                    peer, export = %export.name, requests, "connection closed: {why}"
                ),
            }
        }
        Err(e) => tracing::warn!(peer, export = %export.name, "connection closed: {e}"),
    }
}
