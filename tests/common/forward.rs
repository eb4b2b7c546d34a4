//! A TCP forwarder on 127.0.0.1 for failure tests: forwards each accepted
//! connection to an upstream address that can be changed (a node restarted
//! on a new port), and can be switched to "blackhole": from then on it
//! forwards nothing and closes nothing, on existing and new connections
//! alike, which is what a client sees of a node that lost power (no FIN,
//! no RST, just silence). Stopped (threads joined, sockets closed) when
//! dropped.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(50);

struct Shared {
    upstream: Mutex<SocketAddr>,
    blackhole: AtomicBool,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

pub struct Forwarder {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Forwarder {
    pub fn start(upstream: SocketAddr) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            blackhole: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let accept = std::thread::spawn(move || {
            while !s.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let s2 = Arc::clone(&s);
                        let t = std::thread::spawn(move || serve(client, &s2));
                        s.threads.lock().expect("lock").push(t);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(POLL),
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        });
        Forwarder {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// New connections go to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("lock") = upstream;
    }

    /// Silence: nothing forwarded, nothing closed, from now on.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let threads = std::mem::take(&mut *self.shared.threads.lock().expect("lock"));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Holds the sockets open, silent, until the proxy stops.
fn hold(s: &Shared) {
    while !s.stop.load(Ordering::SeqCst) {
        std::thread::sleep(POLL);
    }
}

fn serve(client: TcpStream, s: &Shared) {
    if s.blackhole.load(Ordering::SeqCst) {
        return hold(s);
    }
    let upstream = *s.upstream.lock().expect("lock");
    let Ok(server) = TcpStream::connect(upstream) else {
        return; // closing the client is what a refused connect looks like
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    // One direction on a scoped thread, the other here.
    std::thread::scope(|scope| {
        scope.spawn(|| pump(c2, s2, s));
        pump(server, client, s);
    });
}

/// Copies `from` to `to` until EOF, error or stop; in blackhole mode it
/// stops copying but keeps both sockets open.
fn pump(mut from: TcpStream, mut to: TcpStream, s: &Shared) {
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if s.stop.load(Ordering::SeqCst) {
            break;
        }
        if s.blackhole.load(Ordering::SeqCst) {
            return hold(s);
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.blackhole.load(Ordering::SeqCst) {
                    return hold(s);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    // A node that lost power closes nothing: neither does a silent proxy
    // when its upstream goes away.
    if s.blackhole.load(Ordering::SeqCst) {
        return hold(s);
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
