//! A kernel pipe used to move a write's payload from a socket into the
//! page cache with `splice`: the socket's pages go into the pipe without
//! a copy, and from the pipe into the file with one. Reading the payload
//! into the process and writing it out again costs two copies.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The capacity asked for (the kernel's default ceiling for an
/// unprivileged process, `/proc/sys/fs/pipe-max-size`).
const WANT_CAPACITY: usize = 1 << 20;

/// A pipe holding at most one payload at a time.
#[derive(Debug)]
pub struct Pipe {
    read: File,
    write: OwnedFd,
    capacity: usize,
    /// Bytes in the pipe not yet moved out.
    held: usize,
}

/// How far `Pipe::fill` got.
#[derive(Debug, PartialEq, Eq)]
pub enum Filled {
    /// The whole payload is in the pipe.
    All,
    /// Only this many bytes are in the pipe: it is full (a socket's data
    /// can take more of its slots than its bytes suggest) or the socket
    /// had nothing within its timeout. The rest is still in the socket.
    Part(usize),
}

impl Pipe {
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned here.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A smaller pipe only means fewer payloads qualify.
        // SAFETY: fcntl on a descriptor owned here.
        unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, WANT_CAPACITY as libc::c_int) };
        // SAFETY: as above.
        let capacity = unsafe { libc::fcntl(fds[1], libc::F_GETPIPE_SZ) };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe {
            read,
            write,
            capacity: capacity as usize,
            held: 0,
        })
    }

    /// The largest payload the pipe can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes in the pipe.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Moves a `len`-byte payload into the (empty) pipe: `prefix` (its
    /// first bytes, already read from the socket) by copy, the rest
    /// straight from `socket`. A socket that ends first is an
    /// `UnexpectedEof` error.
    pub fn fill(&mut self, prefix: &[u8], socket: RawFd, len: usize) -> io::Result<Filled> {
        debug_assert!(self.held == 0 && prefix.len() <= len && len <= self.capacity);
        let mut at = 0;
        while at < prefix.len() {
            // SAFETY: writes from a valid slice into the pipe's write end.
            let n = unsafe {
                libc::write(
                    self.write.as_raw_fd(),
                    prefix[at..].as_ptr().cast(),
                    prefix.len() - at,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            at += n as usize;
            self.held += n as usize;
        }
        while self.held < len {
            // SAFETY: splices between two descriptors open for the call;
            // null offsets (neither end is seekable).
            let n = unsafe {
                libc::splice(
                    socket,
                    std::ptr::null_mut(),
                    self.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    len - self.held,
                    libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(Filled::Part(self.held)),
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection ended in the middle of a payload",
                ));
            }
            self.held += n as usize;
        }
        Ok(Filled::All)
    }

    /// Reads what the pipe holds into `buf` (exactly `buf.len()` bytes,
    /// no more than it holds).
    pub fn read_out(&mut self, buf: &mut [u8]) -> io::Result<()> {
        debug_assert!(buf.len() <= self.held);
        self.read.read_exact(buf)?;
        self.held -= buf.len();
        Ok(())
    }

    /// Moves `len` bytes from the pipe into `file` at `offset`.
    pub fn splice_into(&mut self, file: RawFd, offset: u64, len: usize) -> io::Result<()> {
        debug_assert!(len <= self.held);
        let mut at =
            i64::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut left = len;
        while left > 0 {
            // SAFETY: splices from the pipe into a descriptor open for the
            // call; `at` is a valid offset the kernel advances.
            let n = unsafe {
                libc::splice(
                    self.read.as_raw_fd(),
                    std::ptr::null_mut(),
                    file,
                    &mut at,
                    left,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "the file took no more of the payload",
                ));
            }
            left -= n as usize;
            self.held -= n as usize;
        }
        Ok(())
    }

    /// Discards whatever the pipe still holds (after a failed write), so
    /// the next payload starts on an empty pipe.
    pub fn clear(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 16 * 1024];
        while self.held > 0 {
            let n = self.held.min(scratch.len());
            self.read_out(&mut scratch[..n])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::FileExt;

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (tx, listener.accept().unwrap().0)
    }

    #[test]
    fn a_payload_goes_from_a_socket_through_the_pipe_into_a_file() {
        let mut pipe = Pipe::new().unwrap();
        let len = pipe.capacity().min(256 * 1024);
        let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let (mut tx, rx) = tcp_pair();
        let sender = {
            let payload = payload.clone();
            std::thread::spawn(move || tx.write_all(&payload[100..]).unwrap())
        };
        // The TCP socket blocks for data; only a full pipe would stop it.
        let filled = pipe.fill(&payload[..100], rx.as_raw_fd(), len).unwrap();
        sender.join().unwrap();
        let mut back = vec![0u8; len];
        match filled {
            Filled::All => {
                let file = tempfile::tempfile().unwrap();
                pipe.splice_into(file.as_raw_fd(), 4096, len).unwrap();
                file.read_exact_at(&mut back, 4096).unwrap();
            }
            // The socket's data took more slots than its bytes: the rest
            // is read as the server's fallback does.
            Filled::Part(n) => {
                pipe.read_out(&mut back[..n]).unwrap();
                (&rx).read_exact(&mut back[n..]).unwrap();
            }
        }
        assert_eq!(pipe.held(), 0);
        assert_eq!(back, payload);
    }

    #[test]
    fn what_a_failed_write_left_is_read_out_or_cleared() {
        let mut pipe = Pipe::new().unwrap();
        let (mut tx, rx) = tcp_pair();
        tx.write_all(&[9u8; 5000]).unwrap();
        assert_eq!(
            pipe.fill(&[1, 2, 3], rx.as_raw_fd(), 5003).unwrap(),
            Filled::All
        );
        let mut head = [0u8; 4];
        pipe.read_out(&mut head).unwrap();
        assert_eq!(head, [1, 2, 3, 9]);
        pipe.clear().unwrap();
        assert_eq!(pipe.held(), 0);
        // The pipe is empty again: a new payload reads back whole.
        tx.write_all(&[5u8; 10]).unwrap();
        assert_eq!(pipe.fill(&[], rx.as_raw_fd(), 10).unwrap(), Filled::All);
        let mut all = [0u8; 10];
        pipe.read_out(&mut all).unwrap();
        assert_eq!(all, [5u8; 10]);
    }

    #[test]
    fn a_socket_that_ends_in_the_middle_is_an_error() {
        let mut pipe = Pipe::new().unwrap();
        let (mut tx, rx) = tcp_pair();
        tx.write_all(&[1u8; 10]).unwrap();
        drop(tx);
        let e = pipe.fill(&[], rx.as_raw_fd(), 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
