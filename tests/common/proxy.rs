//! A fault-injecting TCP proxy for the replication link: the dialing node
//! connects to it (`PairBuilder::dial_via`) and it forwards to the real
//! address, applying the faults set on each direction: delay, stall,
//! throttle, a flipped byte, a reset or a clean close at a byte count.
//! `cut` drops every connection; `refuse` makes new ones fail.
//!
//! Everything stays on 127.0.0.1. Threads end when their sockets close;
//! dropping the proxy closes the listener and every connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which way bytes flow: from the dialer (alpha) to the listener (beta),
/// or back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Forward,
    Back,
}

/// Faults for one direction. Byte positions count from the start of the
/// connection in that direction; one-shot faults clear once applied.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Each chunk waits this long before it is forwarded.
    pub delay: Duration,
    /// Nothing is read or forwarded (the connection stays open).
    pub stall: bool,
    /// At most this many bytes per second.
    pub throttle: Option<u64>,
    /// XOR 0xFF into the byte at this position (one shot).
    pub flip_at: Option<u64>,
    /// Forward up to this position, then reset both sides (one shot).
    pub reset_at: Option<u64>,
    /// Forward up to this position, then close both sides cleanly (one
    /// shot).
    pub close_at: Option<u64>,
}

struct Conn {
    generation: u64,
    sockets: [TcpStream; 2],
}

#[derive(Default)]
struct State {
    target: Option<SocketAddr>,
    refuse: bool,
    faults: [Faults; 2],
    conns: Vec<Conn>,
    /// Bytes forwarded per direction, by connection.
    forwarded: std::collections::BTreeMap<u64, [u64; 2]>,
    accepted: u64,
}

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    closed: Arc<AtomicBool>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn idx(d: Dir) -> usize {
    match d {
        Dir::Forward => 0,
        Dir::Back => 1,
    }
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (an OS-chosen port); forwards once a target
    /// is set.
    pub fn start() -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        listener.set_nonblocking(true).expect("nonblocking");
        let state = Arc::new(Mutex::new(State::default()));
        let closed = Arc::new(AtomicBool::new(false));
        {
            let state = state.clone();
            let closed = closed.clone();
            std::thread::spawn(move || accept_loop(listener, state, closed));
        }
        FaultProxy {
            addr,
            state,
            closed,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_target(&self, target: SocketAddr) {
        lock(&self.state).target = Some(target);
    }

    /// New connections are closed at once while set.
    pub fn refuse(&self, on: bool) {
        lock(&self.state).refuse = on;
    }

    /// Replaces the faults of one direction.
    pub fn set(&self, dir: Dir, faults: Faults) {
        lock(&self.state).faults[idx(dir)] = faults;
    }

    pub fn clear(&self) {
        let mut s = lock(&self.state);
        s.faults = Default::default();
    }

    /// Bytes forwarded in `dir` on the busiest connection (a session
    /// has a data and a control connection; byte-count faults apply to
    /// each connection's own count).
    pub fn forwarded(&self, dir: Dir) -> u64 {
        let s = lock(&self.state);
        s.forwarded.values().map(|f| f[idx(dir)]).max().unwrap_or(0)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        lock(&self.state).accepted
    }

    /// Drops every open connection.
    pub fn cut(&self) {
        let conns = {
            let mut s = lock(&self.state);
            s.forwarded.clear();
            std::mem::take(&mut s.conns)
        };
        for c in conns {
            for s in &c.sockets {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        self.cut();
    }
}

fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>, closed: Arc<AtomicBool>) {
    while !closed.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => return,
        };
        let _ = client.set_nonblocking(false);
        let (target, refuse) = {
            let s = lock(&state);
            (s.target, s.refuse)
        };
        let Some(target) = target.filter(|_| !refuse) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        for s in [&client, &server] {
            let _ = s.set_nodelay(true);
            let _ = s.set_read_timeout(Some(Duration::from_millis(20)));
        }
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let generation = {
            let mut s = lock(&state);
            s.accepted += 1;
            let (Ok(a), Ok(b)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            let generation = s.accepted;
            s.conns.push(Conn {
                generation,
                sockets: [a, b],
            });
            generation
        };
        // Set when one direction resets the connection: the other lets go
        // of its descriptors too, so the last close sends the reset.
        let dead = Arc::new(AtomicBool::new(false));
        for (dir, src, dst) in [(Dir::Forward, client, s2), (Dir::Back, server, c2)] {
            let link = Link {
                state: state.clone(),
                closed: closed.clone(),
                dead: dead.clone(),
                generation,
            };
            std::thread::spawn(move || pump(dir, src, dst, &link));
        }
    }
}

/// What both directions of one proxied connection share.
struct Link {
    state: Arc<Mutex<State>>,
    closed: Arc<AtomicBool>,
    dead: Arc<AtomicBool>,
    generation: u64,
}

/// Forwards `src` to `dst` applying the direction's faults, until either
/// side closes.
fn pump(dir: Dir, mut src: TcpStream, mut dst: TcpStream, link: &Link) {
    let state = &*link.state;
    let generation = link.generation;
    let d = idx(dir);
    let mut pos = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    // The throttle's rate, and when and at which position it started.
    let mut window: Option<(u64, Instant, u64)> = None;
    let end = |src: &TcpStream, dst: &TcpStream, reset: bool| {
        if reset {
            // No FIN: every descriptor of both sockets is closed with a
            // zero linger, which sends a reset.
            for s in [src, dst] {
                set_linger_zero(s);
            }
            lock(state).conns.retain(|c| c.generation != generation);
            link.dead.store(true, Ordering::SeqCst);
        } else {
            for s in [src, dst] {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    };
    while !link.closed.load(Ordering::SeqCst) && !link.dead.load(Ordering::SeqCst) {
        let faults = lock(state).faults[d].clone();
        if faults.stall {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        // Read no further than the next byte-count fault.
        // A position already passed when the fault was set counts as now.
        let limit = [faults.reset_at, faults.close_at]
            .into_iter()
            .flatten()
            .map(|at| at.saturating_sub(pos) as usize)
            .min();
        if limit == Some(0) {
            let reset = faults.reset_at.is_some_and(|at| at <= pos);
            {
                let mut s = lock(state);
                s.faults[d].reset_at = None;
                s.faults[d].close_at = None;
            }
            return end(&src, &dst, reset);
        }
        let want = limit.unwrap_or(buf.len()).min(buf.len());
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => return end(&src, &dst, false),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return end(&src, &dst, false),
        };
        if let Some(at) = faults.flip_at {
            if at < pos + n as u64 {
                buf[at.saturating_sub(pos) as usize] ^= 0xFF;
                lock(state).faults[d].flip_at = None;
            }
        }
        if !faults.delay.is_zero() {
            std::thread::sleep(faults.delay);
        }
        if let Some(rate) = faults.throttle.filter(|&r| r > 0) {
            // Paced from when this rate was first seen.
            let (_, since, base) = match window {
                Some(w) if w.0 == rate => w,
                _ => *window.insert((rate, Instant::now(), pos)),
            };
            let due = Duration::from_secs_f64((pos + n as u64 - base) as f64 / rate as f64);
            let elapsed = since.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        } else {
            window = None;
        }
        if dst.write_all(&buf[..n]).is_err() {
            return end(&src, &dst, false);
        }
        pos += n as u64;
        let mut s = lock(state);
        s.forwarded.entry(generation).or_default()[d] = pos;
    }
}

/// Makes the next close send a reset instead of a FIN.
fn set_linger_zero(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}
