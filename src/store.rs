//! Local storage behind a small trait.
//!
//! The NBD frontend (and later the replication engine) talks to a `Store`;
//! `FileStore` implements it over a regular file or block device with
//! positional reads and writes, `fdatasync`, and `fallocate` for punching
//! holes and zeroing ranges where the file system supports it. `MemStore`
//! is an in-memory fake for unit tests of code above the store.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use thiserror::Error;

/// Buffered writes to a regular file larger than this take turns in the
/// process (`FileStore::write_at`).
const LARGE_WRITE: usize = 64 * 1024;

/// Largest zero-fill buffer used when the file system cannot zero a range.
const ZERO_CHUNK: usize = 1 << 20;

/// Alignment of the buffer, offset and length of a
/// [`Store::write_direct`] (the largest logical block size in use).
pub const DIRECT_ALIGN: usize = 4096;

/// Work that completions leave for the end of a batch: typically sending
/// the replies that several completions queued on one connection, once.
pub trait Deferred: Send + Sync {
    fn run(&self);
}

/// Deferred work collected while completing a batch of requests, run
/// once per distinct item when the batch ends (or the `Batch` is
/// dropped, so nothing queued is ever forgotten).
#[derive(Default)]
pub struct Batch {
    items: Vec<Arc<dyn Deferred>>,
}

impl Batch {
    /// Schedules `item` for the end of the batch (callers defer an item
    /// once, when it goes from idle to having work).
    pub fn defer(&mut self, item: Arc<dyn Deferred>) {
        self.items.push(item);
    }

    /// Runs and forgets everything deferred so far.
    pub fn run(&mut self) {
        for item in self.items.drain(..) {
            item.run();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.run();
    }
}

/// Called exactly once with the outcome of a submitted modification. It
/// may run on another thread (the one that received the peer's
/// acknowledgement), inside `batch`.
pub type Done = Box<dyn FnOnce(io::Result<()>, &mut Batch) + Send>;

/// A modification submitted with `Store::submit`.
#[derive(Debug, Clone, Copy)]
pub enum Modify<'a> {
    Write {
        buf: &'a [u8],
        offset: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
    },
}

impl Modify<'_> {
    pub fn range(&self) -> (u64, u64) {
        match *self {
            Modify::Write { buf, offset } => (offset, buf.len() as u64),
            Modify::Trim { offset, len } | Modify::WriteZeroes { offset, len, .. } => (offset, len),
        }
    }

    /// Carries the modification out on `store`, synchronously.
    pub fn apply(&self, store: &dyn Store) -> io::Result<()> {
        match *self {
            Modify::Write { buf, offset } => store.write_at(buf, offset, false),
            Modify::Trim { offset, len } => store.trim(offset, len),
            Modify::WriteZeroes {
                offset,
                len,
                may_unmap,
            } => store.write_zeroes(offset, len, may_unmap),
        }
    }
}

/// Positional block storage. All methods may be called concurrently.
pub trait Store: Send + Sync {
    /// Starts a modification without FUA; `done` gets its outcome. The
    /// caller's buffer is no longer needed when this returns, but `done`
    /// may run later on another thread (a replicated store completes
    /// when the peer acknowledges). The default runs it synchronously.
    fn submit(&self, op: Modify<'_>, done: Done) {
        let result = op.apply(self.as_dyn());
        done(result, &mut Batch::default());
    }
    /// `submit` when the caller has more requests ready: the store should
    /// not wait for anything inline and may hold back sending until
    /// `kick` (the default is `submit`).
    fn submit_more(&self, op: Modify<'_>, done: Done) {
        self.submit(op, done);
    }
    /// `submit` for a lone request whose caller reads the next one
    /// itself: what `submit` would wait for inline it waits for only until
    /// `next` (the client's socket) becomes readable, and then leaves to
    /// another thread. The default is `submit`.
    fn submit_watching(&self, op: Modify<'_>, done: Done, next: RawFd) {
        let _ = next;
        self.submit(op, done);
    }
    /// Sends what `submit_more` held back; called once after a burst.
    fn kick(&self) {}
    /// Whether `submit` (not `submit_more`) may wait for the network
    /// before it returns: a replicated store's lone request reads its
    /// own acknowledgement. The caller then lets another thread read the
    /// next request meanwhile. The default completes inline.
    fn submit_may_wait(&self) -> bool {
        false
    }
    /// `self` as a trait object (for the default `submit`).
    fn as_dyn(&self) -> &dyn Store;
    /// Usable bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`. The range is within `size()`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`; when `durable`, returns only once the data
    /// is on stable storage (FUA).
    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Tells the storage the range is unused. Contents afterwards are
    /// unspecified; failure to deallocate is not an error.
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read back as zeroes; `may_unmap` allows deallocating.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()>;
    /// Hints that the range will be read soon.
    fn cache(&self, offset: u64, len: u64) -> io::Result<()>;
    /// True only if the range is known to read as zeroes without reading
    /// it (a hole in a sparse file); false when unknown.
    fn reads_as_zeroes(&self, _offset: u64, _len: u64) -> bool {
        false
    }
    /// Whether [`write_direct`](Self::write_direct) bypasses the page
    /// cache (so large writes are worth aligning for it).
    fn writes_direct(&self) -> bool {
        false
    }
    /// Writes `buf` at `offset` like `write_at(.., false)` (same
    /// durability: a later `flush` makes it durable), bypassing the page
    /// cache where the store can. `buf`'s address, `offset` and the
    /// length are multiples of [`DIRECT_ALIGN`]; anything else, or a
    /// store that cannot, goes through `write_at`. Reads afterwards see
    /// the data either way (the kernel keeps the cache coherent).
    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset, false)
    }
    /// Reads like `read_at`, for scanning the device in bulk (resync,
    /// verify): without the kernel's readahead, which caches what it
    /// reads ahead in large folios, and 4 KiB writes at depth into a
    /// range cached that way later cost several times their usual CPU
    /// and latency (measured with nbdkit alone: 10k against 68-77k IOPS
    /// at QD32). The caller keeps the disk busy by hinting what it reads
    /// next with [`cache`](Self::cache), which caches in small pages.
    fn read_bulk(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Writes back what buffered writes left in the page cache in
    /// `[offset, offset + len)` (`sync_file_range`), so that a later
    /// `flush` has less to do; returns once that I/O is done (buffered
    /// writes into what it may be writing wait meanwhile: see
    /// `core::stable`). Durability is unchanged, only `flush` gives it.
    /// A hint: failure is not an error.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

#[derive(Debug, Error)]
pub enum OpenError {
    #[error("backing store {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("backing store {path} is neither a regular file nor a block device")]
    NotFileOrDevice { path: String },
    #[error("backing store {path} is {actual} bytes, which is not a positive multiple of 4 KiB; set `size` to a multiple of 4096 no larger than that")]
    Unaligned { path: String, actual: u64 },
    #[error("backing store {path} is {actual} bytes, smaller than the configured size {wanted}")]
    TooSmall {
        path: String,
        actual: u64,
        wanted: u64,
    },
}

/// A file or block device accessed with pread/pwrite.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    size: u64,
    is_block_device: bool,
    /// The same file opened with `O_DIRECT` for `write_direct`, on first
    /// use; `None` where the file system refuses it.
    direct: std::sync::OnceLock<Option<File>>,
    /// Set once a direct write was refused: everything goes buffered.
    direct_refused: std::sync::atomic::AtomicBool,
    /// The same file opened again for `read_bulk`, with readahead off
    /// (`POSIX_FADV_RANDOM` holds per open file), on first use.
    bulk: std::sync::OnceLock<Option<File>>,
    /// Held by a large buffered write to a regular file while it copies
    /// into the page cache (see `write_at`).
    large_writes: std::sync::Mutex<()>,
    /// Keeps buffered writes out of the pages a flush or writeback of
    /// ours may be writing (see `core::stable`).
    stable: StableGate,
}

/// The blocking side of [`crate::core::stable::Stable`]: buffered writes
/// and the writebacks the store starts wait here as it says.
#[derive(Debug, Default)]
struct StableGate {
    state: Mutex<crate::core::stable::Stable>,
    changed: std::sync::Condvar,
}

impl StableGate {
    fn wait<'a>(
        &'a self,
        guard: std::sync::MutexGuard<'a, crate::core::stable::Stable>,
    ) -> std::sync::MutexGuard<'a, crate::core::stable::Stable> {
        self.changed.wait(guard).unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `copy`, a buffered write of `[offset, offset + len)`, once no
    /// writeback may be writing the pages it copies into.
    fn write<T>(&self, offset: u64, len: u64, copy: impl FnOnce() -> T) -> T {
        let ticket = {
            let mut s = crate::sync::lock(&self.state);
            loop {
                match s.begin_write(offset, len) {
                    Some(t) => break t,
                    None => s = self.wait(s),
                }
            }
        };
        // Ended however `copy` ends, unwinding included: a ticket left
        // open would hold every later flush.
        struct Copying<'a>(&'a StableGate, crate::core::stable::WriteTicket);
        impl Drop for Copying<'_> {
            fn drop(&mut self) {
                if crate::sync::lock(&self.0.state).end_write(self.1) {
                    self.0.changed.notify_all();
                }
            }
        }
        let _copying = Copying(self, ticket);
        copy()
    }

    /// Runs `writeback` (`flush`: of everything) once no other one runs
    /// and every write that began before it has copied.
    fn writeback<T>(&self, flush: bool, writeback: impl FnOnce() -> T) -> T {
        let ticket = {
            let mut s = crate::sync::lock(&self.state);
            let ticket = loop {
                match s.begin_writeback(flush) {
                    Some(t) => break t,
                    None => s = self.wait(s),
                }
            };
            while !s.writeback_may_go(ticket) {
                s = self.wait(s);
            }
            ticket
        };
        struct Running<'a>(&'a StableGate, crate::core::stable::WritebackTicket);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                crate::sync::lock(&self.0.state).end_writeback(self.1);
                self.0.changed.notify_all();
            }
        }
        let _running = Running(self, ticket);
        writeback()
    }
}

impl FileStore {
    /// Opens an existing backing store. `size` limits the exported bytes;
    /// without it the whole store is used and must be 4 KiB aligned.
    pub fn open(path: &Path, size: Option<u64>, read_only: bool) -> Result<FileStore, OpenError> {
        let name = path.display().to_string();
        let io_err = |source| OpenError::Io {
            path: name.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err)?;
        let kind = file.metadata().map_err(io_err)?.file_type();
        let is_block_device = kind.is_block_device();
        if !kind.is_file() && !is_block_device {
            return Err(OpenError::NotFileOrDevice { path: name });
        }
        // Seeking to the end gives the size of block devices too.
        let actual = file.seek(SeekFrom::End(0)).map_err(io_err)?;
        let size = match size {
            Some(wanted) if wanted > actual => {
                return Err(OpenError::TooSmall {
                    path: name,
                    actual,
                    wanted,
                })
            }
            Some(wanted) => wanted,
            None if actual == 0 || actual % crate::config::SIZE_ALIGN != 0 => {
                return Err(OpenError::Unaligned { path: name, actual })
            }
            None => actual,
        };
        if !read_only {
            // Pages an earlier process left dirty are not in the stable-page
            // gate's map: written back now, before any write of ours could
            // meet one of them under writeback.
            file.sync_data().map_err(io_err)?;
        }
        Ok(FileStore {
            file,
            size,
            is_block_device,
            direct: std::sync::OnceLock::new(),
            direct_refused: std::sync::atomic::AtomicBool::new(false),
            bulk: std::sync::OnceLock::new(),
            large_writes: std::sync::Mutex::new(()),
            stable: StableGate::default(),
        })
    }

    /// The `O_DIRECT` descriptor: the same open file reopened through
    /// `/proc/self/fd` (so a renamed or unlinked path does not matter).
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                match OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC | libc::O_DIRECT)
                    .open(&path)
                {
                    Ok(f) => Some(f),
                    Err(e) => {
                        tracing::debug!("no O_DIRECT descriptor for the backing store: {e}");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// The descriptor for `read_bulk`: the file reopened read-only through
    /// `/proc/self/fd`, its readahead turned off.
    fn bulk_file(&self) -> Option<&File> {
        self.bulk
            .get_or_init(|| {
                let path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(&path);
                let file = match file {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::debug!("no second descriptor for bulk reads: {e}");
                        return None;
                    }
                };
                // SAFETY: advisory syscall on the descriptor just opened.
                let rc =
                    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
                if rc != 0 {
                    tracing::debug!(
                        "readahead could not be turned off for bulk reads: {}",
                        io::Error::from_raw_os_error(rc)
                    );
                    return None;
                }
                Some(file)
            })
            .as_ref()
    }

    /// Whether `[offset, offset + len)` is one hole: `SEEK_DATA` from
    /// `offset` finds no data before its end.
    fn is_hole(&self, offset: u64, len: u64) -> bool {
        if self.is_block_device || len == 0 {
            return false;
        }
        let Ok(off) = libc::off_t::try_from(offset) else {
            return false;
        };
        // SAFETY: lseek on a descriptor we own; positional I/O elsewhere
        // never uses the file offset this moves.
        let next = unsafe { libc::lseek(self.file.as_raw_fd(), off, libc::SEEK_DATA) };
        if next < 0 {
            // ENXIO: no data at or after `offset`; anything else: unknown.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        next as u64 >= offset.saturating_add(len)
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeroes.len() as u64) as usize;
            self.stable.write(offset, n as u64, || {
                self.file.write_all_at(&zeroes[..n], offset)
            })?;
            offset += n as u64;
        }
        Ok(())
    }

    /// pwritev2 with RWF_DSYNC: the write and its durability in one call.
    fn write_dsync(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let iov = libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            };
            let off = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: `iov` points into `buf`, which outlives the call; the
            // kernel only reads from it.
            let n = unsafe { libc::pwritev2(self.file.as_raw_fd(), &iov, 1, off, libc::RWF_DSYNC) };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
                ) {
                    self.file.write_all_at(buf, offset)?;
                    return self.file.sync_data();
                }
                return Err(err);
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero));
            }
            buf = &buf[n as usize..];
            offset += n as u64;
        }
        Ok(())
    }
}

impl Store for FileStore {
    fn as_dyn(&self) -> &dyn Store {
        self
    }

    fn reads_as_zeroes(&self, offset: u64, len: u64) -> bool {
        self.is_hole(offset, len)
    }
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64, durable: bool) -> io::Result<()> {
        self.stable.write(offset, buf.len() as u64, || {
            if durable {
                self.write_dsync(buf, offset)
            } else if buf.len() > LARGE_WRITE && !self.is_block_device {
                // The file system copies one buffered write to a file at a
                // time under the inode's lock, and a writer that finds it
                // held spins while the holder runs: for the whole copy of a
                // large write, on a CPU the client needs. Taking turns here
                // first, waiters sleep instead.
                let _turn = crate::sync::lock(&self.large_writes);
                self.file.write_all_at(buf, offset)
            } else {
                self.file.write_all_at(buf, offset)
            }
        })
    }

    fn flush(&self) -> io::Result<()> {
        self.stable.writeback(true, || self.file.sync_data())
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // Waits for the I/O too, so that the writes held back meanwhile
        // know when it ended.
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        self.stable.writeback(false, || {
            // SAFETY: sync_file_range on our own open descriptor; no
            // pointers are passed.
            unsafe { libc::sync_file_range(self.file.as_raw_fd(), off, len, flags) }
        });
    }

    fn writes_direct(&self) -> bool {
        !self
            .direct_refused
            .load(std::sync::atomic::Ordering::Relaxed)
            && self.direct_file().is_some()
    }

    fn write_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let aligned = (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
            && buf.len().is_multiple_of(DIRECT_ALIGN)
            && offset.is_multiple_of(DIRECT_ALIGN as u64);
        let file = match self.direct_file() {
            Some(f)
                if aligned
                    && !self
                        .direct_refused
                        .load(std::sync::atomic::Ordering::Relaxed) =>
            {
                f
            }
            _ => return self.file.write_all_at(buf, offset),
        };
        match file.write_all_at(buf, offset) {
            Ok(()) => Ok(()),
            // A device with a larger logical block, or a file system that
            // opens O_DIRECT but refuses the write: buffered from now on.
            // (A partly done direct write is simply written again.)
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct_refused
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!("direct write refused ({e}): writing through the page cache");
                self.file.write_all_at(buf, offset)
            }
            Err(e) => Err(e),
        }
    }

    fn read_bulk(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bulk_file()
            .unwrap_or(&self.file)
            .read_exact_at(buf, offset)
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Deallocation is advisory: a file system or device without it
        // still gives a correct (if not thin) result.
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Punching a hole reads back as zeroes on files, and on block
        // devices the kernel zeroes (or fails) rather than discarding.
        if may_unmap
            && self
                .fallocate(
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
                .is_ok()
        {
            return Ok(());
        }
        let zero_range = if self.is_block_device {
            libc::FALLOC_FL_ZERO_RANGE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(zero_range, offset, len).is_ok() {
            return Ok(());
        }
        self.write_zero_bytes(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        // (To posix_fadvise a length of 0 means to the end of the file.)
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: advisory syscall on our own descriptor.
        let rc = unsafe {
            libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    }
}

/// An in-memory store for unit tests of the layers above.
#[derive(Debug)]
pub struct MemStore {
    data: Mutex<Vec<u8>>,
}

impl MemStore {
    pub fn new(size: usize) -> MemStore {
        MemStore {
            data: Mutex::new(vec![0; size]),
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        match start.checked_add(len) {
            Some(end) if end <= self.lock().len() => Ok(start..end),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        }
    }
}

impl Store for MemStore {
    fn as_dyn(&self) -> &dyn Store {
        self
    }
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, _durable: bool) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        self.lock()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }
    fn cache(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(len: u64) -> (tempfile::NamedTempFile, FileStore) {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(len).expect("set_len");
        let store = FileStore::open(f.path(), None, false).expect("open");
        (f, store)
    }

    #[test]
    fn bulk_reads_see_what_was_written_cached_or_not() {
        let (f, s) = temp_file(4 << 20);
        let data: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        s.write_at(&data, 1 << 20, false).expect("write");
        let mut back = vec![0u8; 1 << 20];
        s.read_bulk(&mut back, 1 << 20).expect("read_bulk, cached");
        assert!(back == data, "cached data read back");
        s.flush().expect("flush");
        // SAFETY: advisory syscall on the temp file's descriptor.
        unsafe { libc::posix_fadvise(f.as_file().as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        // A hint for the next part, as the resync gives; none of length 0.
        s.cache(3 << 20, 4096).expect("hint");
        s.cache(3 << 20, 0).expect("empty hint");
        let mut part = vec![0u8; 4096 + 17];
        s.read_bulk(&mut part, (1 << 20) + 5)
            .expect("read_bulk, unaligned");
        assert!(
            part[..] == data[5..5 + 4096 + 17],
            "uncached, unaligned read back"
        );
    }

    #[test]
    fn large_and_small_writes_from_many_threads_all_land() {
        let (_f, s) = temp_file(16 << 20);
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let s = &s;
                scope.spawn(move || {
                    // A large write (which takes turns) and small ones (which
                    // do not) in each thread's own MiB.
                    let base = u64::from(t) << 20;
                    s.write_at(&[t + 1; 1 << 20], base, false).expect("large");
                    for i in 0..4u64 {
                        s.write_at(&[t + 101; 4096], base + i * 8192, false)
                            .expect("small");
                    }
                });
            }
        });
        for t in 0..8u8 {
            let mut back = vec![0u8; 1 << 20];
            s.read_at(&mut back, u64::from(t) << 20).expect("read");
            for (i, block) in back.chunks(4096).enumerate() {
                let want = if i % 2 == 0 && i < 8 { t + 101 } else { t + 1 };
                assert!(block.iter().all(|&b| b == want), "thread {t}, block {i}");
            }
        }
    }

    #[test]
    fn writes_flushes_and_writebacks_from_many_threads_all_land() {
        // Writers rewrite their own blocks over and over (two blocks a
        // write, every tenth round durable) while other threads flush and
        // write back: the stable-page gate holds some writes back and lets them
        // go again, nothing waits for ever, and the last write to each
        // block is what reads back.
        use std::sync::atomic::{AtomicUsize, Ordering};
        const WRITERS: u64 = 4;
        const BLOCKS: u64 = 16;
        const ROUNDS: u64 = 100;
        let (_f, s) = temp_file(WRITERS * BLOCKS * 4096);
        let done = AtomicUsize::new(0);
        let pattern = |t: u64, round: u64| (t * 64 + round % 61 + 1) as u8;
        std::thread::scope(|scope| {
            for t in 0..WRITERS {
                let (s, done) = (&s, &done);
                scope.spawn(move || {
                    let base = t * BLOCKS * 4096;
                    for round in 0..ROUNDS {
                        let byte = pattern(t, round);
                        for b in (0..BLOCKS).step_by(2) {
                            s.write_at(&[byte; 2 * 4096], base + b * 4096, round % 10 == 0)
                                .expect("write");
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
            for f in 0..2 {
                let (s, done) = (&s, &done);
                scope.spawn(move || {
                    // Bounded: the writers end after ROUNDS.
                    for _ in 0..100_000 {
                        if done.load(Ordering::SeqCst) == WRITERS as usize {
                            break;
                        }
                        if f == 0 {
                            s.flush().expect("flush");
                        } else {
                            s.start_writeback(0, WRITERS * BLOCKS * 4096);
                        }
                    }
                });
            }
        });
        s.flush().expect("flush");
        for t in 0..WRITERS {
            let mut back = vec![0u8; (BLOCKS * 4096) as usize];
            s.read_at(&mut back, t * BLOCKS * 4096).expect("read");
            let want = pattern(t, ROUNDS - 1);
            assert!(back.iter().all(|&b| b == want), "writer {t}");
        }
    }

    #[test]
    fn holes_are_known_to_read_as_zeroes_and_data_is_not() {
        let (_f, s) = temp_file(8 << 20);
        assert!(
            s.reads_as_zeroes(0, 8 << 20),
            "a fresh sparse file is one hole"
        );
        s.write_at(&[1u8; 4096], 4 << 20, false).expect("write");
        assert!(s.reads_as_zeroes(0, 4 << 20));
        assert!(!s.reads_as_zeroes(0, (4 << 20) + 1));
        assert!(!s.reads_as_zeroes(4 << 20, 4096));
        // Past the written block, up to the end: a hole again (file systems
        // may round the data up to their block size).
        assert!(s.reads_as_zeroes(5 << 20, 3 << 20));
        assert!(
            !MemStore::new(4096).reads_as_zeroes(0, 4096),
            "unknown is not zero"
        );
    }

    #[test]
    fn file_store_round_trips_unaligned_writes() {
        let (_f, s) = temp_file(1 << 20);
        s.write_at(b"hello", 4093, false).expect("write");
        s.write_at(b"world", 70_000, true).expect("fua write");
        let mut buf = [0u8; 5];
        s.read_at(&mut buf, 4093).expect("read");
        assert_eq!(&buf, b"hello");
        s.read_at(&mut buf, 70_000).expect("read");
        assert_eq!(&buf, b"world");
        s.flush().expect("flush");
    }

    /// `len` bytes of `byte` at a `DIRECT_ALIGN`ed address.
    fn aligned(len: usize, byte: u8) -> (Vec<u8>, usize) {
        let v = vec![byte; len + DIRECT_ALIGN];
        let at = v.as_ptr().align_offset(DIRECT_ALIGN);
        (v, at)
    }

    #[test]
    fn direct_writes_replace_cached_data_and_read_back() {
        let (_f, s) = temp_file(1 << 20);
        // Cached (and dirty) pages of the range first.
        s.write_at(&[1u8; 65536], 0, false).expect("write");
        let mut buf = vec![0u8; 65536];
        s.read_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 1));
        let (v, at) = aligned(65536, 2);
        s.write_direct(&v[at..at + 65536], 0).expect("direct write");
        s.read_at(&mut buf, 0).expect("read");
        assert!(
            buf.iter().all(|&b| b == 2),
            "a read after a direct write sees it"
        );
        // Unaligned address, offset or length: written all the same.
        s.write_direct(&v[at + 1..at + 4097], 8192)
            .expect("unaligned buf");
        s.write_direct(&v[at..at + 100], 4096 * 3 + 7)
            .expect("unaligned offset");
        let mut small = vec![0u8; 4096];
        s.read_at(&mut small, 8192).expect("read");
        assert!(small.iter().all(|&b| b == 2));
        s.read_at(&mut small[..100], 4096 * 3 + 7).expect("read");
        assert!(small[..100].iter().all(|&b| b == 2));
        s.flush().expect("flush");
        let mut tail = vec![9u8; 4096];
        s.read_at(&mut tail, 65536).expect("read");
        assert!(
            tail.iter().all(|&b| b == 0),
            "nothing written past the ranges"
        );
    }

    #[test]
    fn write_zeroes_reads_back_as_zeroes_with_and_without_unmap() {
        let (_f, s) = temp_file(1 << 20);
        s.write_at(&[0xaa; 65536], 0, false).expect("write");
        s.write_zeroes(100, 5000, true).expect("zero");
        s.write_zeroes(20_000, 3, false).expect("zero");
        let mut buf = vec![0u8; 65536];
        s.read_at(&mut buf, 0).expect("read");
        assert!(buf[..100].iter().all(|&b| b == 0xaa));
        assert!(buf[100..5100].iter().all(|&b| b == 0));
        assert!(buf[5100..20_000].iter().all(|&b| b == 0xaa));
        assert!(buf[20_000..20_003].iter().all(|&b| b == 0));
        assert!(buf[20_003..].iter().all(|&b| b == 0xaa));
    }

    #[test]
    fn trim_keeps_the_size() {
        let (f, s) = temp_file(1 << 20);
        s.trim(4096, 65536).expect("trim");
        assert_eq!(f.as_file().metadata().expect("meta").len(), 1 << 20);
    }

    #[test]
    fn unaligned_backing_file_is_refused_without_size() {
        let f = tempfile::NamedTempFile::new().expect("temp file");
        f.as_file().set_len(5000).expect("set_len");
        let err = FileStore::open(f.path(), None, false).unwrap_err();
        assert!(err.to_string().contains("multiple of 4 KiB"), "{err}");
        let s = FileStore::open(f.path(), Some(4096), false).expect("explicit size");
        assert_eq!(s.size(), 4096);
        let err = FileStore::open(f.path(), Some(8192), false).unwrap_err();
        assert!(err.to_string().contains("smaller"), "{err}");
    }

    #[test]
    fn missing_backing_file_names_the_path() {
        let err = FileStore::open(Path::new("/nonexistent/replblk.img"), None, false).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/replblk.img"),
            "{err}"
        );
    }
}
