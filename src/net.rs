//! A byte stream that is TCP, a unix-domain socket, or TLS over TCP, so
//! the NBD code and the peer link are written once for all of them. The
//! kind is chosen at the handshake; the plain kinds are the sockets
//! themselves.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
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
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one pollfd on the stack, valid for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    n != 0
}

/// Polls (without blocking) until the socket `fd` has bytes to read or
/// `limit` passes. The answer to a request on loopback or a LAN often
/// arrives within tens of microseconds, and waking a thread that went to
/// sleep costs about as much again on a virtual CPU; a short poll first
/// saves that wake-up at low queue depths.
pub fn spin_until_readable(fd: RawFd, limit: Duration) {
    let start = Instant::now();
    let mut byte = 0u8;
    while start.elapsed() < limit {
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
        std::hint::spin_loop();
    }
}
