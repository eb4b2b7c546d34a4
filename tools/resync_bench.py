#!/usr/bin/env python3
"""Resync benchmark for a replicated repld pair on loopback.

Three measurements, each on a fresh pair (two repld daemons, alpha and beta,
external metadata, backing files under --tmpdir):

  full      Full initial sync: alpha's backing file is filled with data (a
            64 MiB random pattern repeated: no holes, no zero runs), beta's is
            empty; fresh metadata on both, `promote --force` on alpha, and the
            time until `wait-sync` returns.  Sizes from --full-sizes (default
            2G,8G,32G); a size whose two files do not fit in the free space
            of --tmpdir (with a margin) is skipped and reported as such.
  scatter   Bitmap resync after a disconnect: alpha disconnected, fio writes
            --scatter-mib MiB of distinct random 4 KiB blocks through it, then
            `connect` and the time until in sync.  Bytes moved (from
            `status --json`) against bytes dirtied.  Baseline in the same
            run: the same number of distinct random 4 KiB blocks written
            with pwrite into a sparse file of the device's size, then one
            fdatasync (what the target's disk must do at least).  With
            --scatter-written, both devices and the baseline's file are
            first written through with zeroes (every block allocated, as on
            a block device) instead of sparse.
  after     Small writes after a full sync: alpha's file filled with data
            and dropped from the page cache (data written long ago),
            beta's empty; `promote --force`, `wait-sync`, then fio 4k QD32
            random writes through alpha for --runtime seconds; then both
            files dropped from the page cache and the same fio again, on
            the same pair (reference: what the sync left cached should not
            make later writes dearer).  Size --after-size; --rounds
            rounds, alternating with --baseline-repld if given.
  yield     fio 4k QD32 random writes for --runtime seconds on an in-sync pair
            (reference), then the same during a full sync (default rate
            settings); the IOPS ratio, and the sync's own rate meanwhile.
            Rounds alternate reference and sync runs (--rounds).

Every process is stopped by PID, every file removed after its run.  Results
are printed and, with --json FILE, written as JSON.  Python standard library
only; needs fio with the nbd engine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
EXPORT = "r0"
TOOL_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
META_BYTES = 64 * MiB


class BenchError(Exception):
    pass


def parse_size(text: str) -> int:
    t = text.strip().lower().rstrip("b").rstrip("i")
    mult = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}.get(t[-1:], 1)
    num = t[:-1] if t[-1:] in "kmgt" else t
    return int(num) * mult


def human(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def write_through(path: Path, size: int, chunk: bytes, drop_cache: bool = False) -> None:
    """Writes `size` bytes of `chunk` repeated and fsyncs them; with
    `drop_cache`, drops the file from the page cache afterwards."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        done = 0
        view = memoryview(chunk)
        while done < size:
            done += os.write(fd, view[:min(len(chunk), size - done)])
        os.fsync(fd)
        if drop_cache:
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def fill_data(path: Path, size: int, seed: int, drop_cache: bool = False) -> None:
    """Writes `size` bytes of a repeated 64 MiB random pattern (no zero
    runs); fsync'ed so the page cache starts from written-back data, and
    with `drop_cache` dropped from it (the writes leave it cached in large
    folios, which make later 4 KiB writes there several times dearer)."""
    write_through(path, size, random.Random(seed).randbytes(64 * MiB), drop_cache)


def drop_cached(path: Path) -> None:
    """Writes back and drops `path` from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def written(path: Path, size: int) -> None:
    """A file of `size` zero bytes, every block written and durable (no
    holes, no unwritten extents: a block device's case), and dropped from
    the page cache, as data written long ago would be."""
    write_through(path, size, bytes(16 * MiB), drop_cache=True)


class Pair:
    """alpha and beta repld on loopback, external metadata."""

    def __init__(self, workdir: Path, binary: Path, size: int, resync: Dict[str, str]) -> None:
        self.dir = workdir
        self.binary = binary
        self.replctl_bin = binary.parent / "replctl"
        self.size = size
        self.resync = resync
        self.disks = {n: workdir / f"{n}.img" for n in ("alpha", "beta")}
        self.metas = {n: workdir / f"{n}.md" for n in ("alpha", "beta")}
        self.ctls = {n: workdir / f"{n}.ctl" for n in ("alpha", "beta")}
        self.nbd = {n: free_port() for n in ("alpha", "beta")}
        self.repl = {n: free_port() for n in ("alpha", "beta")}
        self.procs: Dict[str, subprocess.Popen] = {}
        self.config = workdir / "pair.toml"

    def write_config(self) -> None:
        text = "[replication]\nping_interval_ms = 1000\nping_timeout_ms = 10000\n"
        if self.resync:
            text += "\n[resync]\n" + "".join(f"{k} = {v}\n" for k, v in self.resync.items())
        for n in ("alpha", "beta"):
            text += (f"\n[nodes.{n}]\nnbd_listen = \"127.0.0.1:{self.nbd[n]}\"\n"
                     f"control_socket = {json.dumps(str(self.ctls[n]))}\n")
        text += f"\n[[resource]]\nname = \"{EXPORT}\"\nsecret = \"bench\"\n"
        for n in ("alpha", "beta"):
            text += (f"\n[resource.on.{n}]\ndisk = {json.dumps(str(self.disks[n]))}\n"
                     f"meta_disk = {json.dumps(str(self.metas[n]))}\n"
                     f"address = \"127.0.0.1:{self.repl[n]}\"\n")
        self.config.write_text(text)

    def start(self) -> None:
        self.write_config()
        for n in ("alpha", "beta"):
            if not self.metas[n].exists():
                sparse(self.metas[n], META_BYTES)
            log = open(self.dir / f"{n}.log", "ab")
            self.procs[n] = subprocess.Popen(
                [str(self.binary), "--config", str(self.config), "--node", n],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not all(c.exists() for c in self.ctls.values()):
            if time.monotonic() > deadline:
                raise BenchError("control sockets did not appear\n" + self.logs())
            time.sleep(0.05)

    def ctl(self, node: str, *args: str, timeout: float = TOOL_TIMEOUT_S) -> str:
        r = subprocess.run([str(self.replctl_bin), "--socket", str(self.ctls[node]), *args],
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"replctl {' '.join(args)} on {node}: {r.stdout}{r.stderr}")
        return r.stdout

    def status(self, node: str = "alpha") -> Dict[str, Any]:
        return json.loads(self.ctl(node, "status", "--json"))["resources"][0]

    def wait(self, what: str, check, timeout: float = READY_TIMEOUT_S) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if check(s):
                return s
            time.sleep(0.05)
        raise BenchError(f"{what}: not within {timeout:.0f}s\n" + self.logs())

    def bring_up(self) -> None:
        for n in ("alpha", "beta"):
            # A restarted daemon brings up the metadata it finds.
            subprocess.run([str(self.replctl_bin), "--socket", str(self.ctls[n]), "down", EXPORT],
                           capture_output=True, timeout=TOOL_TIMEOUT_S)
            self.ctl(n, "create-md", EXPORT, "--force")
            self.ctl(n, "up", EXPORT)
        self.wait("connected", lambda s: s["connection"] == "Connected")

    def stop(self) -> None:
        for n, p in list(self.procs.items()):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=STOP_TIMEOUT_S)
            del self.procs[n]

    def logs(self) -> str:
        out = ""
        for n in ("alpha", "beta"):
            try:
                lines = (self.dir / f"{n}.log").read_text(errors="replace").splitlines()
            except OSError:
                lines = []
            out += f"--- {n} ---\n" + "\n".join(lines[-20:]) + "\n"
        return out

    def remove_files(self) -> None:
        for p in list(self.disks.values()) + list(self.metas.values()):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd['alpha']}/{EXPORT}"


def fio(uri: str, args: List[str], out: Path, timeout: float) -> Dict[str, Any]:
    cmd = ["fio", "--name=w", "--ioengine=nbd", "--uri=" + uri,
           "--output-format=json", "--output=" + str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise BenchError(f"fio failed: {r.stdout}{r.stderr}")
    return json.loads(out.read_text())["jobs"][0]


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def timed(cmd: List[str]) -> float:
    t = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    return time.monotonic() - t


def reference_copy(src: Path, dst: Path) -> float:
    """Seconds for `dd` to copy src to dst durably (the disk's own pace
    for the same bytes, measured in the same run)."""
    return timed(["dd", f"if={src}", f"of={dst}", "bs=1M", "conv=fdatasync"])


def machine_baseline(src: Path, dst: Path, size: int) -> Dict[str, float]:
    """MiB/s of the machine on the sync's own file, in the same run: dd
    reads (page cache as left, and O_DIRECT), dd copies durable through
    the page cache and past it, cp + sync.  `dst` is removed after each."""
    mib = size / MiB
    out: Dict[str, float] = {}

    def rm() -> None:
        try:
            dst.unlink()
        except FileNotFoundError:
            pass

    out["dd_read_cached"] = mib / timed(["dd", f"if={src}", "of=/dev/null", "bs=1M"])
    out["dd_read_direct"] = mib / timed(["dd", f"if={src}", "of=/dev/null", "bs=1M",
                                         "iflag=direct"])
    out["dd_copy_fdatasync"] = mib / reference_copy(src, dst)
    rm()
    out["dd_copy_direct"] = mib / timed(["dd", f"if={src}", f"of={dst}", "bs=1M",
                                         "oflag=direct", "conv=fdatasync"])
    rm()
    out["cp_sync"] = mib / timed(["sh", "-c", f'cp "{src}" "{dst}" && sync -d "{dst}"'])
    rm()
    return out


def scatter_baseline(path: Path, size: int, blocks: int, seed: int, prepare) -> float:
    """Seconds to pwrite `blocks` distinct random 4 KiB blocks into a
    file of `size` bytes made by `prepare` (sparse or written), in offset
    order, then fdatasync it."""
    prepare(path, size)
    offsets = sorted(random.Random(seed).sample(range(size // 4096), blocks))
    data = random.Random(seed).randbytes(4096)
    fd = os.open(path, os.O_WRONLY)
    try:
        t = time.monotonic()
        for b in offsets:
            os.pwrite(fd, data, b * 4096)
        os.fdatasync(fd)
        return time.monotonic() - t
    finally:
        os.close(fd)
        path.unlink()


def cpu_seconds(pid: int) -> float:
    """user + sys CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu(pair: "Pair") -> Dict[str, float]:
    return {n: cpu_seconds(p.pid) for n, p in pair.procs.items()}


def bench_full(args, workdir: Path, size: int, binary: Path, reference: bool,
               holes: bool = False) -> Dict[str, Any]:
    need = GiB if holes else 2 * size + GiB
    if free_bytes(workdir) < need:
        return {"size": size, "skipped": f"needs {human(need)} free in {workdir}, "
                f"has {human(free_bytes(workdir))}"}
    pair = Pair(workdir, binary, size, {})
    try:
        t = time.monotonic()
        if holes:
            sparse(pair.disks["alpha"], size)
        else:
            fill_data(pair.disks["alpha"], size, args.seed)
        fill_s = time.monotonic() - t
        base: Dict[str, float] = {}
        if reference and not holes:
            base = machine_baseline(pair.disks["alpha"], pair.disks["beta"], size)
        sparse(pair.disks["beta"], size)
        pair.start()
        pair.bring_up()
        cpu0 = daemon_cpu(pair)
        t0 = time.monotonic()
        pair.ctl("alpha", "promote", EXPORT, "--force")
        pair.ctl("alpha", "wait-sync", EXPORT, "--timeout", str(args.sync_timeout),
                 timeout=args.sync_timeout + 30)
        wall = time.monotonic() - t0
        cpu1 = daemon_cpu(pair)
        st = pair.status().get("resync", {})
        cpu_ms = {n: (cpu1[n] - cpu0[n]) * 1000 / (size / MiB) for n in cpu0}
        return {"size": size, "binary": str(binary), "seconds": wall,
                "mib_per_s": size / MiB / wall,
                "daemon_ms": st.get("elapsed_ms"), "copy_ms": st.get("copy_ms"),
                "moved_bytes": st.get("moved_bytes"),
                "zeroed_bytes": st.get("zeroed_bytes"), "fill_seconds": fill_s,
                "cpu_ms_per_mib": cpu_ms, "baseline_mib_per_s": base,
                "dd_mib_per_s": base.get("dd_copy_fdatasync")}
    finally:
        pair.stop()
        pair.remove_files()


def bench_scatter(args, workdir: Path, binary: Path) -> Dict[str, Any]:
    size = args.scatter_size
    prepare = written if args.scatter_written else sparse
    pair = Pair(workdir, binary, size, {})
    try:
        prepare(pair.disks["alpha"], size)
        prepare(pair.disks["beta"], size)
        pair.start()
        pair.bring_up()
        pair.ctl("alpha", "new-current-uuid", EXPORT, "--clear-bitmap")
        pair.ctl("alpha", "promote", EXPORT)
        pair.ctl("alpha", "disconnect", EXPORT)
        blocks = args.scatter_mib * MiB // 4096
        fio(pair.uri(), ["--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={size}",
                         f"--number_ios={blocks}", "--randrepeat=0",
                         "--buffer_compress_percentage=0", "--refill_buffers"],
            workdir / "scatter.json", 600)
        dirtied = pair.status()["out_of_sync_bytes"]
        cpu0 = daemon_cpu(pair)
        t0 = time.monotonic()
        pair.ctl("alpha", "connect", EXPORT)
        pair.ctl("alpha", "wait-sync", EXPORT, "--timeout", str(args.sync_timeout),
                 timeout=args.sync_timeout + 30)
        wall = time.monotonic() - t0
        cpu1 = daemon_cpu(pair)
        st = pair.status().get("resync")
        base_s = scatter_baseline(workdir / "scatter-baseline.img", size, blocks, args.seed,
                                  prepare)
        out = {"device": size, "binary": str(binary), "dirtied_bytes": dirtied,
               "devices": "written" if args.scatter_written else "sparse",
               "seconds_connect_to_synced": wall, "mib_per_s_wall": dirtied / MiB / wall,
               "cpu_ms_per_mib": {n: (cpu1[n] - cpu0[n]) * 1000 / max(dirtied / MiB, 1e-9)
                                  for n in cpu0},
               "baseline_seconds": base_s,
               "baseline_mib_per_s": blocks * 4096 / MiB / base_s,
               "moved_bytes": None, "moved_ratio": None}
        if st:
            daemon_s = max(st["elapsed_ms"], 1) / 1000.0
            out.update({"moved_bytes": st["moved_bytes"], "copy_ms": st.get("copy_ms"),
                        "moved_ratio": st["moved_bytes"] / max(dirtied, 1),
                        "daemon_seconds": daemon_s, "mib_per_s_daemon": dirtied / MiB / daemon_s})
        return out
    finally:
        pair.stop()
        pair.remove_files()


def small_writes(args, pair: Pair, out: Path, ramp: int = 1) -> float:
    """IOPS of fio 4k QD32 random writes through alpha for --runtime
    seconds after `ramp`."""
    job = fio(pair.uri(), ["--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={pair.size}",
                           "--time_based", f"--runtime={args.runtime}", f"--ramp_time={ramp}",
                           "--randrepeat=0", "--norandommap"], out, args.runtime + 120)
    return job["write"]["iops"]


def bench_after(args, workdir: Path, binary: Path) -> Dict[str, Any]:
    size = args.after_size
    pair = Pair(workdir, binary, size, {})
    try:
        fill_data(pair.disks["alpha"], size, args.seed, drop_cache=True)
        sparse(pair.disks["beta"], size)
        pair.start()
        pair.bring_up()
        t0 = time.monotonic()
        pair.ctl("alpha", "promote", EXPORT, "--force")
        pair.ctl("alpha", "wait-sync", EXPORT, "--timeout", str(args.sync_timeout),
                 timeout=args.sync_timeout + 30)
        sync_s = time.monotonic() - t0
        after = small_writes(args, pair, workdir / "after.json")
        for n in ("alpha", "beta"):
            drop_cached(pair.disks[n])
        dropped = small_writes(args, pair, workdir / "after.json")
        return {"size": size, "binary": str(binary), "sync_seconds": sync_s,
                "iops_after_sync": after, "iops_cache_dropped": dropped}
    finally:
        pair.stop()
        pair.remove_files()


def bench_yield(args, workdir: Path) -> Dict[str, Any]:
    size = args.yield_size
    runs: List[Dict[str, Any]] = []
    pair = Pair(workdir, args.repld, size, {})
    try:
        fill_data(pair.disks["alpha"], size, args.seed, drop_cache=True)
        sparse(pair.disks["beta"], size)
        for rnd in range(args.rounds):
            for mode in ("reference", "during-sync"):
                pair.start()
                pair.bring_up()
                if mode == "reference":
                    pair.ctl("alpha", "new-current-uuid", EXPORT, "--clear-bitmap")
                    pair.ctl("alpha", "promote", EXPORT)
                else:
                    pair.ctl("alpha", "promote", EXPORT, "--force")
                    pair.wait("sync started", lambda s: s["resync"]["active"]
                              or s["resync"]["finished"] > 0)
                before = pair.status()["resync"]
                t0 = time.monotonic()
                iops = small_writes(args, pair, workdir / "yield.json", ramp=2)
                secs = time.monotonic() - t0
                after = pair.status()
                sync_rate = (after["resync"]["done_bytes"] - before["done_bytes"]) / secs
                runs.append({"round": rnd, "mode": mode, "iops": iops,
                             "sync_mib_per_s": sync_rate / MiB if mode != "reference" else None,
                             "sync_still_active": after["resync"]["active"],
                             "min_rate_mib": after["resync_rate"]["min_rate"] / MiB})
                pair.stop()
    finally:
        pair.stop()
        pair.remove_files()
    ref = [r["iops"] for r in runs if r["mode"] == "reference"]
    dur = [r["iops"] for r in runs if r["mode"] == "during-sync"]
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None
    return {"device": size, "runtime": args.runtime, "runs": runs,
            "iops_reference_median": med(ref), "iops_during_sync_median": med(dur),
            "ratio": (med(dur) / med(ref)) if ref and dur else None}


def git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="full,scatter,yield",
                   help="comma-separated subset of full,scatter,yield,holes,after (holes: "
                        "full sync of sparse devices, the engine's own cost per GiB; after: "
                        "small writes after a full sync)")
    p.add_argument("--full-sizes", default="2G,8G,32G")
    p.add_argument("--scatter-size", type=parse_size, default=parse_size("4G"))
    p.add_argument("--scatter-mib", type=int, default=64)
    p.add_argument("--scatter-written", action="store_true",
                   help="scatter: devices written through first (every block allocated, as "
                        "on a block device) instead of sparse files")
    p.add_argument("--yield-size", type=parse_size, default=parse_size("4G"))
    p.add_argument("--after-size", type=parse_size, default=parse_size("2G"))
    p.add_argument("--runtime", type=int, default=20, help="fio seconds per yield or after run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--sync-timeout", type=int, default=3600)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--tmpdir", type=Path, default=Path("/var/tmp"))
    p.add_argument("--repld", type=Path, default=REPO_ROOT / "target" / "release" / "repld")
    p.add_argument("--json", type=Path)
    p.add_argument("--baseline-repld", type=Path,
                   help="a repld built from an older commit, run on the same full, scatter "
                        "and after cases in the same run (its replctl must be beside it)")
    p.add_argument("--baseline-max-size", default="8G",
                   help="largest full-sync size the baseline runs (default 8G)")
    args = p.parse_args()
    if not args.repld.exists():
        print(f"no {args.repld}: run `cargo build --release` first", file=sys.stderr)
        return 2
    only = set(args.only.split(","))
    res: Dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "commit": git_rev(), "cpus": os.cpu_count()}
    workdir = Path(tempfile.mkdtemp(prefix="resync-bench-", dir=args.tmpdir))
    try:
        binaries = [("new", args.repld)]
        if args.baseline_repld:
            binaries.append(("baseline", args.baseline_repld))
        if "full" in only:
            res["full"] = []
            baseline_max = parse_size(args.baseline_max_size)
            for s in args.full_sizes.split(","):
                size = parse_size(s)
                for label, binary in binaries:
                    if label == "baseline" and size > baseline_max:
                        continue
                    r = bench_full(args, workdir, size, binary, reference=(label == "new"))
                    r["label"] = label
                    res["full"].append(r)
                    if "skipped" in r:
                        print(f"full sync {human(size)}: skipped ({r['skipped']})", flush=True)
                        break
                    extra = ""
                    if r["dd_mib_per_s"]:
                        extra = (f"; dd copy of the same file with fdatasync: "
                                 f"{r['dd_mib_per_s']:.0f} MiB/s, ratio "
                                 f"{r['mib_per_s'] / r['dd_mib_per_s']:.2f}")
                    cpu = r["cpu_ms_per_mib"]
                    extra += (f"; CPU per MiB: source {cpu.get('alpha', 0):.3f} ms, "
                              f"target {cpu.get('beta', 0):.3f} ms")
                    if r.get("copy_ms"):
                        extra += (f"; copy phase {r['copy_ms'] / 1000:.1f} s = "
                                  f"{size / MiB / (r['copy_ms'] / 1000):.0f} MiB/s, the rest is "
                                  f"the final flush on the target")
                    print(f"full sync {human(size)} [{label}]: {r['seconds']:.1f} s = "
                          f"{r['mib_per_s']:.0f} MiB/s{extra}", flush=True)
                    if r["baseline_mib_per_s"]:
                        b = r["baseline_mib_per_s"]
                        print("  baseline, same file, same run (MiB/s; sync / it): " + ", ".join(
                            f"{k} {v:.0f} ({r['mib_per_s'] / v:.2f}x)" for k, v in b.items()),
                            flush=True)
        if "holes" in only:
            # The engine alone: a sparse source reads as zeroes, so every
            # chunk goes as a write-zeroes request and no data hits a disk.
            res["holes"] = []
            for s in args.full_sizes.split(","):
                size = parse_size(s)
                r = bench_full(args, workdir, size, args.repld, reference=False, holes=True)
                res["holes"].append(r)
                print(f"full sync of a sparse {human(size)} (all write-zeroes): "
                      f"{r['seconds']:.2f} s = {r['mib_per_s']:.0f} MiB/s, "
                      f"{r['seconds'] / (size / GiB):.3f} s per GiB", flush=True)
        if "scatter" in only:
            res["scatter"] = []
            for label, binary in binaries:
                r = bench_scatter(args, workdir, binary)
                r["label"] = label
                res["scatter"].append(r)
                moved = ("" if r["moved_bytes"] is None else
                         f", moved {human(r['moved_bytes'])} ({r['moved_ratio']:.3f}x)")
                if r.get("copy_ms"):
                    moved += (f", copy phase {r['copy_ms'] / 1000:.2f} s = "
                              f"{r['dirtied_bytes'] / MiB / (r['copy_ms'] / 1000):.0f} MiB/s")
                cpu = r["cpu_ms_per_mib"]
                print(f"scattered 4K resync [{label}]: {human(r['dirtied_bytes'])} dirtied on "
                      f"{human(r['device'])} ({r['devices']}){moved}, {r['seconds_connect_to_synced']:.2f} s "
                      f"from connect = {r['mib_per_s_wall']:.0f} MiB/s; CPU per MiB: source "
                      f"{cpu.get('alpha', 0):.3f} ms, target {cpu.get('beta', 0):.3f} ms; "
                      f"baseline (same blocks: pwrite each + one fdatasync, same run) "
                      f"{r['baseline_mib_per_s']:.0f} MiB/s, ratio "
                      f"{r['mib_per_s_wall'] / r['baseline_mib_per_s']:.2f}", flush=True)
        if "after" in only:
            res["after"] = []
            for rnd in range(args.rounds):
                for label, binary in binaries:
                    r = bench_after(args, workdir, binary)
                    r.update(label=label, round=rnd)
                    res["after"].append(r)
                    print(f"after a full sync of {human(r['size'])} [{label}] round {rnd}: sync "
                          f"{r['sync_seconds']:.2f} s; 4k QD32 randwrite "
                          f"{r['iops_after_sync']:.0f} IOPS, with both files dropped from the "
                          f"cache {r['iops_cache_dropped']:.0f} IOPS (after / dropped "
                          f"{r['iops_after_sync'] / r['iops_cache_dropped']:.2f})", flush=True)
        if "yield" in only:
            r = bench_yield(args, workdir)
            res["yield"] = r
            for run in r["runs"]:
                extra = ""
                if run["sync_mib_per_s"] is not None:
                    extra = (f", sync {run['sync_mib_per_s']:.1f} MiB/s "
                             f"(min {run['min_rate_mib']:.0f}), still active: "
                             f"{run['sync_still_active']}")
                print(f"4k QD32 randwrite round {run['round']} {run['mode']}: "
                      f"{run['iops']:.0f} IOPS{extra}", flush=True)
            if r["ratio"] is not None:
                print(f"IOPS during a full sync / without: {r['ratio']:.2f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"resync_bench: {e}", file=sys.stderr)
        sys.exit(1)
