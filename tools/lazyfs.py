#!/usr/bin/env python3
"""A FUSE file system that forgets unsynced writes on command: a power cut
of one node, for tests (the idea of LazyFS).

    python3 tools/lazyfs.py BACKING_DIR MOUNTPOINT

Files under MOUNTPOINT are the files of BACKING_DIR. A write lands in this
process's memory, not in the backing file, until the file is fsync'ed or
fdatasync'ed (or the write itself asked for O_DSYNC, as `pwritev2` with
`RWF_DSYNC` does); reads see the unsynced writes over the backing file, as
a page cache would. On SIGUSR1 every unsynced write is forgotten: the files
read back as they were at their last sync, as after a power cut. Trims
(punched holes) are unsynced writes of zeros. Mounted with `direct_io`, so
the kernel caches nothing of its own.

After a SIGUSR1, the line `dropped N pages` is appended to
MOUNTPOINT/../lazyfs-NAME.log, NAME being the mount point's name. Unmount
with `fusermount3 -u MOUNTPOINT` (or SIGTERM this process).

With LAZYFS_DEBUG set, every write (with its flags) and fsync is logged
to stderr.

Test support only: single-threaded, one lock, page (4 KiB) granularity.
Needs `pip install mfusepy` (libfuse3 from Debian's fuse3).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Dict

import mfusepy as fuse

PAGE = 4096


class LazyFS(fuse.Operations):
    use_ns = True

    def __init__(self, root: str, log: Path) -> None:
        self.root = root
        self.log = log
        self.mutex = threading.Lock()
        # path -> {page index: bytearray(PAGE)} of unsynced pages
        self.dirty: Dict[str, Dict[int, bytearray]] = {}
        # path -> size including unsynced extensions
        self.sizes: Dict[str, int] = {}

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    # -- the power cut ---------------------------------------------------

    def cut(self) -> None:
        with self.mutex:
            n = sum(len(p) for p in self.dirty.values())
            self.dirty.clear()
            self.sizes.clear()
        with open(self.log, "a") as f:
            f.write(f"dropped {n} pages\n")

    # -- metadata ----------------------------------------------------------

    def getattr(self, path, fi=None):
        st = os.lstat(self._full(path))
        d = {k: getattr(st, k) for k in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_size",
            "st_atime", "st_mtime", "st_ctime")}
        with self.mutex:
            if path in self.sizes:
                d["st_size"] = max(d["st_size"], self.sizes[path])
        return d

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def statfs(self, path):
        st = os.statvfs(self._full(path))
        return {k: getattr(st, k) for k in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def access(self, path, amode):
        if not os.access(self._full(path), amode):
            raise fuse.FuseOSError(errno.EACCES)
        return 0

    def chmod(self, path, mode):
        return os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        return os.chown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        return os.utime(self._full(path), ns=times)

    def unlink(self, path):
        with self.mutex:
            self.dirty.pop(path, None)
            self.sizes.pop(path, None)
        return os.unlink(self._full(path))

    # With raw_fi, the ops get libfuse's fuse_file_info: `fh` is ours,
    # `flags` the open (or, for a write, the request's) flags.

    def create(self, path, mode, fi):
        fi.fh = os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)
        os.fsync(fi.fh)
        fi.direct_io = 1
        return 0

    def open(self, path, fi):
        fi.fh = os.open(self._full(path), os.O_RDWR)
        fi.direct_io = 1
        return 0

    def release(self, path, fi):
        os.close(fi.fh)
        return 0

    def truncate(self, path, length, fi=None):
        # A size change is taken as durable at once (the tests size their
        # files before they write).
        with self.mutex:
            pages = self.dirty.get(path, {})
            for idx in [i for i in pages if i * PAGE >= length]:
                del pages[idx]
            self.sizes.pop(path, None)
            with open(self._full(path), "r+b") as f:
                f.truncate(length)
                os.fsync(f.fileno())
        return 0

    # -- data --------------------------------------------------------------

    def _page(self, path: str, fd: int, idx: int) -> bytearray:
        pages = self.dirty.setdefault(path, {})
        page = pages.get(idx)
        if page is None:
            page = bytearray(os.pread(fd, PAGE, idx * PAGE).ljust(PAGE, b"\0"))
            pages[idx] = page
        return page

    def read(self, path, size, offset, fi):
        fh = fi.fh
        with self.mutex:
            end = offset + size
            limit = max(os.fstat(fh).st_size, self.sizes.get(path, 0))
            end = min(end, limit)
            if end <= offset:
                return b""
            out = bytearray(os.pread(fh, end - offset, offset).ljust(end - offset, b"\0"))
            pages = self.dirty.get(path)
            if pages:
                first, last = offset // PAGE, (end - 1) // PAGE
                for idx in range(first, last + 1):
                    page = pages.get(idx)
                    if page is None:
                        continue
                    lo = max(offset, idx * PAGE)
                    hi = min(end, (idx + 1) * PAGE)
                    out[lo - offset:hi - offset] = page[lo - idx * PAGE:hi - idx * PAGE]
            return bytes(out)

    def _write(self, path: str, fh: int, data: bytes, offset: int) -> None:
        pos = 0
        while pos < len(data):
            idx = (offset + pos) // PAGE
            within = (offset + pos) % PAGE
            n = min(PAGE - within, len(data) - pos)
            page = self._page(path, fh, idx)
            page[within:within + n] = data[pos:pos + n]
            pos += n
        end = offset + len(data)
        if end > max(os.fstat(fh).st_size, self.sizes.get(path, 0)):
            self.sizes[path] = end

    def write(self, path, data, offset, fi):
        fh = fi.fh
        if os.environ.get("LAZYFS_DEBUG"):
            print(f"write {path} {offset} {len(data)} flags={fi.flags:#x}", file=sys.stderr, flush=True)
        with self.mutex:
            self._write(path, fh, data, offset)
            if fi.flags & (os.O_DSYNC | os.O_SYNC):
                # This write is durable now; other unsynced writes, even
                # in the same pages, stay unsynced.
                os.pwrite(fh, data, offset)
                os.fsync(fh)
        return len(data)

    def fallocate(self, path, mode, offset, length, fi):
        punch = 0x02  # FALLOC_FL_PUNCH_HOLE
        if mode & punch:
            with self.mutex:
                self._write(path, fi.fh, bytes(length), offset)
        return 0

    def _sync(self, path: str, fh: int) -> None:
        pages = self.dirty.pop(path, {})
        size = self.sizes.pop(path, None)
        for idx, page in sorted(pages.items()):
            os.pwrite(fh, bytes(page), idx * PAGE)
        if size is not None and size > os.fstat(fh).st_size:
            os.ftruncate(fh, size)
        os.fsync(fh)

    def fsync(self, path, datasync, fi):
        if os.environ.get("LAZYFS_DEBUG"):
            print(f"fsync {path} dirty={len(self.dirty.get(path, {}))}", file=sys.stderr, flush=True)
        with self.mutex:
            self._sync(path, fi.fh)
        return 0

    def flush(self, path, fi):
        return 0


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    root, mount = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    log = Path(mount).parent / f"lazyfs-{Path(mount).name}.log"
    fs = LazyFS(root, log)
    # The main thread sits in libfuse's loop; a thread of its own takes
    # SIGUSR1 (blocked everywhere else) and cuts at once.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    def cutter() -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            fs.cut()

    threading.Thread(target=cutter, daemon=True).start()
    fuse.FUSE(fs, mount, foreground=True, nothreads=True, direct_io=True,
              raw_fi=True, fsname="lazyfs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
