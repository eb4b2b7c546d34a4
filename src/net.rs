//! A byte stream that is TCP, a unix-domain socket, or TLS over TCP, so
//! the NBD code and the peer link are written once for all of them. The
//! kind is chosen at the handshake; the plain kinds are the sockets
//! themselves.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use crate::tls::TlsStream;

#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(TlsStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tls(s) => Stream::Tls(s.clone()),
        })
    }

    pub fn shutdown(&self, how: Shutdown) {
        // Errors only mean the socket is already closed.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tls(s) => {
                s.shutdown(how);
                Ok(())
            }
        };
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(timeout),
            Stream::Unix(s) => s.set_write_timeout(timeout),
            Stream::Tls(s) => s.socket().set_write_timeout(timeout),
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(timeout),
            Stream::Unix(s) => s.set_read_timeout(timeout),
            Stream::Tls(s) => s.socket().set_read_timeout(timeout),
        }
    }

    /// Whether a read would return without waiting for the socket (TLS
    /// keeps decrypted bytes of its own).
    pub fn has_buffered(&self) -> bool {
        match self {
            Stream::Tls(s) => s.has_buffered(),
            _ => false,
        }
    }

    /// `wait_readable` for this stream: true at once when bytes are
    /// already buffered inside it.
    pub fn wait_readable(&self, timeout: Duration) -> bool {
        self.has_buffered() || wait_readable(self.as_raw_fd(), timeout)
    }

    /// The TCP address of the other end, if TCP.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok(),
            Stream::Tls(s) => s.socket().peer_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Stream::Tls(s) => crate::tls::set_timeouts(s.socket(), timeout),
        }
    }

    /// Where the client is, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp:?".into()),
            Stream::Tls(s) => s
                .socket()
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tls:?".into()),
            Stream::Unix(s) => match s.peer_cred_pid() {
                Some(pid) => format!("unix:pid={pid}"),
                None => "unix".into(),
            },
        }
    }
}

trait PeerPid {
    fn peer_cred_pid(&self) -> Option<i32>;
}

impl PeerPid for UnixStream {
    fn peer_cred_pid(&self) -> Option<i32> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes of the sizes given.
        let rc = unsafe {
            libc::getsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                &mut cred as *mut libc::ucred as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then_some(cred.pid)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(buf),
            Stream::Unix(s) => s.write_all(buf),
            // One encryption and one send for the whole buffer.
            Stream::Tls(s) => s.write_all(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tls(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tls(s) => s.as_raw_fd(),
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable (or to report an
/// error or hang-up, which a read then returns). True if it did.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    wait_any_readable(&[fd], timeout).is_some()
}

/// Waits up to `timeout` for one of `fds` (at most two) to become
/// readable (or to report an error or hang-up); the first such, in the
/// order given.
pub fn wait_any_readable(fds: &[RawFd], timeout: Duration) -> Option<usize> {
    let unused = libc::pollfd {
        fd: -1,
        events: 0,
        revents: 0,
    };
    let mut pfds = [unused; 2];
    debug_assert!(fds.len() <= pfds.len(), "at most two sockets");
    let n = fds.len().min(pfds.len());
    for (pfd, &fd) in pfds.iter_mut().zip(&fds[..n]) {
        pfd.fd = fd;
        pfd.events = libc::POLLIN;
    }
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `n` pollfds on the stack, valid for the duration of the call.
    let ready = unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, ms) };
    if ready == 0 {
        return None;
    }
    // An interrupted poll (-1) counts as readable: the caller's read
    // then tells what happened, as before.
    Some(pfds[..n].iter().position(|p| p.revents != 0).unwrap_or(0))
}

/// Polls (without blocking) until the socket `fd` has bytes to read or
/// `limit` passes. The answer to a request on loopback or a LAN often
/// arrives within tens of microseconds, and waking a thread that went to
/// sleep costs about as much again on a virtual CPU; a short poll first
/// saves that wake-up at low queue depths.
fn spin_until_readable(fds: &[RawFd], limit: Duration) {
    let start = Instant::now();
    let mut byte = 0u8;
    while start.elapsed() < limit {
        for &fd in fds {
            // SAFETY: a one-byte peek into a local; nothing is consumed.
            let n = unsafe {
                libc::recv(
                    fd,
                    &mut byte as *mut u8 as *mut libc::c_void,
                    1,
                    libc::MSG_PEEK | libc::MSG_DONTWAIT,
                )
            };
            if n != -1 || io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock {
                return;
            }
        }
        std::hint::spin_loop();
    }
}

/// How long a poll before sleeping lasts at most: the NBD read side
/// waiting for a client's next request and a Primary's submitter waiting
/// for its Ack both use it (an answer on loopback or a LAN usually comes
/// within it).
pub const POLL_MAX: Duration = Duration::from_micros(40);

/// How a [`SpinWindow`] weighs the newest wait: an eighth.
const HIT_SHIFT: u32 = 3;
/// Full scale of its hit rate.
const HIT_ONE: u32 = 1 << 16;
/// While a [`SpinWindow`] is closed, one wait in this many polls anyway.
const PROBE_EVERY: u32 = 16;

/// Whether to poll for the next bytes before sleeping, decided by how
/// often recent polls found them within the poll's length. The rate of
/// hits is a moving average over about the last eight polls, and the
/// next wait polls only while at least half were hits. A poll that misses
/// costs its whole length in CPU time and then the wake-up it was meant
/// to save, so on a machine where the answers come late (a busy or noisy
/// host, a slow client) polling stops by itself.
///
/// Only waits that polled are counted. A wait that slept can only be
/// timed until its thread runs again, which includes waking its CPU: on
/// a virtual machine whose halted CPUs take longer to wake than the poll
/// lasts, every such wait would look late though the bytes came in time,
/// and polling would never resume. So while the window is closed one
/// wait in [`PROBE_EVERY`] polls anyway, and those probes alone decide
/// whether it reopens. Kept by the one thread that reads a socket at a
/// time (relaxed atomics only so that it can sit in a shared structure).
#[derive(Debug)]
pub struct SpinWindow {
    /// Hits per `HIT_ONE`, averaged.
    hits: AtomicU32,
    /// Waits that did not poll since the last probe.
    unpolled: AtomicU32,
    max: Duration,
}

/// One wait, from [`SpinWindow::poll`] to [`SpinWindow::waited`].
#[derive(Debug, Clone, Copy)]
pub struct Wait {
    start: Instant,
    polled: bool,
}

impl SpinWindow {
    /// Polls last up to `max`; it starts out polling.
    pub fn new(max: Duration) -> SpinWindow {
        SpinWindow {
            hits: AtomicU32::new(HIT_ONE),
            unpolled: AtomicU32::new(0),
            max,
        }
    }

    /// Polls `fds` (until one of them is readable) for up to the window's
    /// length if recent waits say it is worth it (or to probe); returns
    /// the wait, for [`waited`](Self::waited).
    pub fn poll(&self, fds: &[RawFd]) -> Wait {
        let start = Instant::now();
        let polled = self.polls_next();
        if polled {
            spin_until_readable(fds, self.max);
        }
        Wait { start, polled }
    }

    /// The wait is over: the bytes are here. Only a wait that polled is
    /// counted (see the type's comment).
    pub fn waited(&self, wait: Wait) {
        if wait.polled {
            let hit = wait.start.elapsed() <= self.max;
            let rate = self.hits.load(Relaxed);
            self.hits.store(average(rate, hit), Relaxed);
        }
    }

    /// Whether the next wait polls: while the window is open, or as the
    /// closed window's probe.
    fn polls_next(&self) -> bool {
        if self.max == Duration::ZERO {
            return false;
        }
        if self.open() {
            return true;
        }
        let n = self.unpolled.load(Relaxed) + 1;
        let probe = n >= PROBE_EVERY;
        self.unpolled.store(if probe { 0 } else { n }, Relaxed);
        probe
    }

    /// Whether recent waits were mostly hits.
    fn open(&self) -> bool {
        self.max > Duration::ZERO && self.hits.load(Relaxed) >= HIT_ONE / 2
    }
}

/// The hit rate after one more wait.
fn average(rate: u32, hit: bool) -> u32 {
    let target = if hit { HIT_ONE } else { 0 };
    rate - (rate >> HIT_SHIFT) + (target >> HIT_SHIFT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(mut rate: u32, waits: &[bool]) -> u32 {
        for &hit in waits {
            rate = average(rate, hit);
        }
        rate
    }

    #[test]
    fn the_rate_stays_within_its_scale() {
        assert_eq!(after(HIT_ONE, &[true; 100]), HIT_ONE);
        assert_eq!(after(0, &[false; 100]), 0);
        assert!(after(0, &[true; 100]) <= HIT_ONE);
    }

    #[test]
    fn a_run_of_late_answers_stops_polling_and_quick_ones_resume_it() {
        let late = after(HIT_ONE, &[false; 6]);
        assert!(
            late < HIT_ONE / 2,
            "six misses in a row stop polling: {late}"
        );
        assert!(after(HIT_ONE, &[false; 5]) >= HIT_ONE / 2, "five do not");
        let back = after(late, &[true; 6]);
        assert!(back >= HIT_ONE / 2, "six quick answers resume it: {back}");
    }

    #[test]
    fn an_odd_late_answer_among_quick_ones_keeps_polling() {
        let mixed: Vec<bool> = (0..64).map(|i| i % 3 != 0).collect();
        assert!(after(HIT_ONE, &mixed) >= HIT_ONE / 2);
        let mostly_late: Vec<bool> = (0..64).map(|i| i % 3 == 0).collect();
        assert!(after(HIT_ONE, &mostly_late) < HIT_ONE / 2);
    }

    #[test]
    fn a_closed_window_does_not_poll_and_an_open_one_sees_waiting_bytes() {
        let (a, mut b) = UnixStream::pair().expect("socket pair");
        let closed = SpinWindow::new(Duration::ZERO);
        assert!(!closed.open());
        let t = Instant::now();
        closed.poll(&[a.as_raw_fd()]);
        assert!(
            t.elapsed() < Duration::from_millis(5),
            "a closed window returns at once"
        );
        b.write_all(b"x").expect("write");
        let open = SpinWindow::new(Duration::from_secs(10));
        let since = open.poll(&[a.as_raw_fd()]);
        assert!(
            since.start.elapsed() < Duration::from_secs(5),
            "bytes already there end the poll"
        );
        open.waited(since);
        assert!(open.open());
    }

    #[test]
    fn a_wait_on_two_sockets_ends_with_the_first_readable_one() {
        let (link, mut peer) = UnixStream::pair().expect("socket pair");
        let (client, mut user) = UnixStream::pair().expect("socket pair");
        let fds = [link.as_raw_fd(), client.as_raw_fd()];
        let quick = Duration::from_millis(20);
        assert_eq!(wait_any_readable(&fds, quick), None);
        user.write_all(b"r").expect("write");
        assert_eq!(wait_any_readable(&fds, quick), Some(1));
        assert_eq!(
            wait_any_readable(&fds[..1], quick),
            None,
            "only the first is watched"
        );
        // Both readable: the first wins.
        peer.write_all(b"a").expect("write");
        assert_eq!(wait_any_readable(&fds, quick), Some(0));
        // A poll on both ends as soon as either has bytes.
        let (idle, _idle_peer) = UnixStream::pair().expect("socket pair");
        let window = SpinWindow::new(Duration::from_secs(10));
        let wait = window.poll(&[idle.as_raw_fd(), client.as_raw_fd()]);
        assert!(wait.start.elapsed() < Duration::from_secs(5));
        drop(user);
        let hung_up = [idle.as_raw_fd(), client.as_raw_fd()];
        let mut byte = [0u8; 1];
        (&client).read_exact(&mut byte).expect("read");
        assert_eq!(
            wait_any_readable(&hung_up, quick),
            Some(1),
            "a hang-up counts as readable: the read tells"
        );
    }

    #[test]
    fn waits_that_slept_are_not_counted_and_probes_reopen_the_window() {
        let window = SpinWindow::new(Duration::from_millis(1));
        let late = |polled| Wait {
            start: Instant::now() - Duration::from_millis(50),
            polled,
        };
        let quick = |polled| Wait {
            start: Instant::now(),
            polled,
        };
        for _ in 0..6 {
            window.waited(late(true));
        }
        assert!(!window.open(), "six polls that missed close it");
        let rate = window.hits.load(Relaxed);
        for _ in 0..100 {
            window.waited(late(false));
        }
        for _ in 0..100 {
            window.waited(quick(false));
        }
        assert_eq!(
            window.hits.load(Relaxed),
            rate,
            "a wait that slept is not counted: its CPU's wake-up is in its time"
        );
        let probes = (0..4 * PROBE_EVERY).filter(|_| window.polls_next()).count();
        assert_eq!(probes, 4, "closed, one wait in {PROBE_EVERY} probes");
        let mut probes = 0;
        for _ in 0..10 * PROBE_EVERY {
            if window.open() {
                break;
            }
            if window.polls_next() {
                window.waited(quick(true));
                probes += 1;
            } else {
                window.waited(late(false));
            }
        }
        assert!(window.open(), "probes that hit reopen it");
        assert!(probes <= 6, "{probes} probes to reopen");
    }
}
