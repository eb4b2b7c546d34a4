#!/usr/bin/env python3
"""Write a directory tree as an uncompressed newc cpio archive (the format
the Linux kernel unpacks as an initramfs).

    python3 tools/vm/cpio.py DIR OUT

Owners are root, times are zero, so the archive depends on the tree only.
Several archives concatenated are one initramfs to the kernel: the VM test
appends a small one (test script, freshly built binaries) to the cached base.
"""
import os
import stat
import sys


def header(ino, mode, nlink, size, namesize):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize, 0]
    return b"070701" + b"".join(b"%08X" % f for f in fields)


def pad(out, n):
    if n % 4:
        out.write(b"\0" * (4 - n % 4))


def entry(out, ino, name, mode, nlink, data):
    encoded = name.encode() + b"\0"
    h = header(ino, mode, nlink, len(data), len(encoded))
    out.write(h)
    out.write(encoded)
    pad(out, len(h) + len(encoded))
    out.write(data)
    pad(out, len(data))


def main():
    root, target = sys.argv[1], sys.argv[2]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            paths.append(os.path.join(dirpath, name))
    with open(target, "wb") as out:
        ino = 1
        for path in paths:
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                data = os.readlink(path).encode()
                entry(out, ino, rel, stat.S_IFLNK | 0o777, 1, data)
            elif stat.S_ISDIR(st.st_mode):
                entry(out, ino, rel, stat.S_IFDIR | 0o755, 2, b"")
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    data = f.read()
                entry(out, ino, rel, stat.S_IFREG | (st.st_mode & 0o777), 1, data)
            else:
                sys.exit(f"cpio.py: unsupported file type: {path}")
            ino += 1
        entry(out, ino, "TRAILER!!!", 0, 1, b"")


if __name__ == "__main__":
    main()
