#!/usr/bin/env python3
"""fio-based benchmark: replblk's `repld` NBD server vs. the nbdkit file plugin.

Every server gets its own backing file; all backing files are created the same
way (same size, same content) before any server starts.  Each workload is run
through fio's nbd engine against every server in turn (A B A B ...) for the
requested number of rounds, and the median over rounds is reported together
with same-run ratios against the baseline (nbdkit).

See docs/benchmark.md for how to run it and how to read the output.
Python 3 standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPLD = REPO_ROOT / "target" / "release" / "repld"
EXPORT_NAME = "r0"
MiB = 1 << 20

# Upper bounds so that nothing can hang forever.
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
FIO_GRACE_S = 60.0
BUILD_TIMEOUT_S = 1800.0
START_ATTEMPTS = 3


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    key: str
    description: str
    rw: str
    bs: str
    iodepth: int
    extra: tuple = ()

    @property
    def direction(self) -> str:
        return "read" if "read" in self.rw else "write"


WORKLOADS: List[Workload] = [
    Workload("4k-randwrite-qd1", "4 KiB random writes, queue depth 1",
             "randwrite", "4k", 1),
    Workload("4k-randwrite-qd32", "4 KiB random writes, queue depth 32",
             "randwrite", "4k", 32),
    Workload("4k-randread-qd32", "4 KiB random reads, queue depth 32",
             "randread", "4k", 32),
    Workload("1m-seqwrite-qd8", "1 MiB sequential writes, queue depth 8",
             "write", "1M", 8),
    Workload("4k-randwrite-qd1-fsync", "4 KiB random writes, QD1, NBD FLUSH after every write",
             "randwrite", "4k", 1, ("--fsync=1",)),
]


# --------------------------------------------------------------------------
# Process helpers
# --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """Runs in the child before exec: die with SIGTERM if the bench dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort only
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:]) or "(empty log)"


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------
# Servers.  A Server is what fio talks to: it owns its backing file(s) and
# one or more daemon processes, and exposes start(), stop(), uri().
# Single-process servers only implement _command(port).  A multi-process
# setup (e.g. a replicated pair of repld daemons) overrides images(), start(),
# stop(), running() and uri() using several Daemon objects.  New servers are
# added in build_servers().
# --------------------------------------------------------------------------


class Daemon:
    """One server process on a free 127.0.0.1 port, with its own log file."""

    def __init__(self, label: str, workdir: Path) -> None:
        self.label = label
        self.workdir = workdir
        self.log_path = workdir / f"{label}.log"
        self.port: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None
        self.exit_code: Optional[int] = None

    def start(self, command_for_port, fixed_port: Optional[int] = None) -> None:
        """command_for_port(port) -> argv.  Retries if the port got taken.
        With fixed_port, the daemon's port is already in its config."""
        last = ""
        for attempt in range(1, START_ATTEMPTS + 1):
            port = fixed_port if fixed_port is not None else free_port()
            cmd = command_for_port(port)
            with open(self.log_path, "ab") as log:
                log.write(f"### attempt {attempt}: {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    preexec_fn=_child_setup, cwd=self.workdir)
            self.port = port
            deadline = time.monotonic() + READY_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                if port_accepts(port):
                    return
                time.sleep(0.05)
            if self.proc.poll() is None:
                last = f"not accepting connections on port {port} after {READY_TIMEOUT_S:.0f}s"
                self.stop(check=False)
                break  # a hang is not a port race: do not retry
            last = f"exited with status {self.proc.returncode} before becoming ready"
            self.proc = None
            # Maybe something grabbed the port between free_port() and bind: retry.
        raise BenchError(f"{self.label}: {last}\n--- log {self.log_path} ---\n{tail(self.log_path)}")

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, check: bool = True) -> None:
        """SIGTERM by PID, wait (bounded), SIGKILL as a last resort.

        With check=True, anything but a clean exit (status 0) is an error."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
                self.exit_code = proc.returncode
                if check:
                    raise BenchError(f"{self.label}: did not stop within "
                                     f"{STOP_TIMEOUT_S:.0f}s of SIGTERM; killed")
                return
        self.exit_code = proc.returncode
        if check and proc.returncode != 0:
            raise BenchError(f"{self.label}: exited with status {proc.returncode} "
                             f"(expected 0 after SIGTERM)\n--- log ---\n{tail(self.log_path)}")


class Server:
    kind = "server"

    def __init__(self, label: str, workdir: Path, image: Path) -> None:
        self.label = label
        self.workdir = workdir
        self.image = image
        self.daemon = Daemon(label, workdir)

    # -- to be provided by single-process subclasses --------------------------
    def _command(self, port: int) -> List[str]:
        raise NotImplementedError

    def version(self) -> str:
        return ""

    # -- override all of these for multi-process servers ----------------------
    def images(self) -> List[Path]:
        """Backing files to create (identically) before start()."""
        return [self.image]

    def start(self) -> None:
        self.daemon.start(self._command)

    def stop(self, check: bool = True) -> None:
        self.daemon.stop(check)

    def running(self) -> bool:
        return self.daemon.running()

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.daemon.port}/{EXPORT_NAME}"

    def describe(self) -> str:
        return f"pid {self.daemon.pid}, {self.uri()}"

    def log_tail(self) -> str:
        return tail(self.daemon.log_path)


class NbdkitServer(Server):
    kind = "nbdkit"

    def _command(self, port: int) -> List[str]:
        return ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "file", f"file={self.image}"]

    def version(self) -> str:
        try:
            return subprocess.run(["nbdkit", "--version"], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"


class ReplDServer(Server):
    kind = "repld"

    def __init__(self, label: str, workdir: Path, image: Path, binary: Path) -> None:
        super().__init__(label, workdir, image)
        self.binary = binary
        self.config_path = workdir / f"{label}.toml"

    def _command(self, port: int) -> List[str]:
        self.config_path.write_text(
            "[nbd]\n"
            f"listen = {json.dumps(f'127.0.0.1:{port}')}\n"
            "\n"
            "[[resource]]\n"
            f"name = {json.dumps(EXPORT_NAME)}\n"
            f"disk = {json.dumps(str(self.image))}\n")
        return [str(self.binary), "--config", str(self.config_path)]

    def version(self) -> str:
        return str(self.binary)


class ReplicatedPairServer(Server):
    """Two repld daemons on loopback: alpha (Primary, serves NBD) mirrors
    every write synchronously to beta (Secondary)."""

    kind = "repld-pair"

    def __init__(self, label: str, workdir: Path, binary: Path) -> None:
        super().__init__(label, workdir, workdir / f"{label}-alpha.img")
        self.binary = binary
        self.beta_image = workdir / f"{label}-beta.img"
        self.config_path = workdir / f"{label}.toml"
        self.alpha = self.daemon
        self.beta = Daemon(f"{label}-beta", workdir)
        self.repl_ports = (free_port(), free_port())
        self.beta_nbd = free_port()
        self.ctl = workdir / f"{label}-alpha.ctl"
        self.beta_ctl = workdir / f"{label}-beta.ctl"
        # External metadata keeps the data files the same size as nbdkit's.
        self.meta = (workdir / f"{label}-alpha.md", workdir / f"{label}-beta.md")

    def images(self) -> List[Path]:
        return [self.image, self.beta_image]

    def _write_config(self, alpha_port: int) -> None:
        d = self.workdir
        self.config_path.write_text(
            "[replication]\nping_interval_ms = 1000\nping_timeout_ms = 5000\n\n"
            f"[nodes.alpha]\nnbd_listen = {json.dumps(f'127.0.0.1:{alpha_port}')}\n"
            f"control_socket = {json.dumps(str(self.ctl))}\n\n"
            f"[nodes.beta]\nnbd_listen = {json.dumps(f'127.0.0.1:{self.beta_nbd}')}\n"
            f"control_socket = {json.dumps(str(self.beta_ctl))}\n\n"
            "[[resource]]\n"
            f"name = {json.dumps(EXPORT_NAME)}\n"
            "secret = \"bench-secret\"\n\n"
            "[resource.on.alpha]\n"
            f"disk = {json.dumps(str(self.image))}\n"
            f"meta_disk = {json.dumps(str(self.meta[0]))}\n"
            f"address = {json.dumps(f'127.0.0.1:{self.repl_ports[0]}')}\n\n"
            "[resource.on.beta]\n"
            f"disk = {json.dumps(str(self.beta_image))}\n"
            f"meta_disk = {json.dumps(str(self.meta[1]))}\n"
            f"address = {json.dumps(f'127.0.0.1:{self.repl_ports[1]}')}\n")

    def replctl(self, ctl: Path, *args: str) -> subprocess.CompletedProcess:
        replctl = self.binary.parent / "replctl"
        return subprocess.run([str(replctl), "--socket", str(ctl), *args],
                              capture_output=True, text=True, timeout=60)

    def start(self) -> None:
        def alpha_cmd(port: int) -> List[str]:
            self._write_config(port)
            return [str(self.binary), "--config", str(self.config_path), "--node", "alpha"]

        for md in self.meta:
            with open(md, "wb") as f:
                f.truncate(8 * MiB)

        self.alpha.start(alpha_cmd)
        # beta's NBD port is fixed in the config written for alpha.
        self.beta.start(lambda _port: [str(self.binary), "--config", str(self.config_path),
                                       "--node", "beta"], fixed_port=self.beta_nbd)
        # The control socket comes up just after the NBD listener.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not (self.ctl.exists() and self.beta_ctl.exists()):
            if time.monotonic() > deadline:
                raise BenchError(f"{self.label}: no control sockets within {READY_TIMEOUT_S:.0f}s")
            time.sleep(0.02)
        # Bootstrap as an operator would: metadata on both nodes, then (the
        # images are identical copies) skip the initial sync and promote.
        for ctl in (self.ctl, self.beta_ctl):
            for verb in (["create-md", EXPORT_NAME, "--force"], ["up", EXPORT_NAME]):
                r = self.replctl(ctl, *verb)
                if r.returncode != 0:
                    raise BenchError(f"{self.label}: replctl {' '.join(verb)}: {r.stderr}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            r = self.replctl(self.ctl, "status", "--json")
            if r.returncode == 0 and '"connection":"Connected"' in r.stdout:
                for verb in (["new-current-uuid", EXPORT_NAME, "--clear-bitmap"],
                             ["promote", EXPORT_NAME]):
                    r = self.replctl(self.ctl, *verb)
                    if r.returncode != 0:
                        raise BenchError(f"{self.label}: replctl {' '.join(verb)}: {r.stderr}")
                return
            time.sleep(0.1)
        raise BenchError(f"{self.label}: alpha and beta did not connect within "
                         f"{READY_TIMEOUT_S:.0f}s\n--- alpha ---\n{tail(self.alpha.log_path)}"
                         f"\n--- beta ---\n{tail(self.beta.log_path)}")

    def stop(self, check: bool = True) -> None:
        try:
            self.alpha.stop(check)
        finally:
            self.beta.stop(check)

    def running(self) -> bool:
        return self.alpha.running() and self.beta.running()

    def describe(self) -> str:
        return f"alpha pid {self.alpha.pid}, beta pid {self.beta.pid}, {self.uri()}"

    def log_tail(self) -> str:
        return tail(self.alpha.log_path) + "\n--- beta ---\n" + tail(self.beta.log_path)


# --------------------------------------------------------------------------
# Backing files
# --------------------------------------------------------------------------


def make_images(paths: List[Path], size: int, fill: str, seed: int) -> None:
    """Create identical backing files.

    fill=random: every file is fully written with the same pseudo-random bytes
                 (random.Random(seed)), then fsync'ed.  No holes anywhere.
    fill=zero:   every file is fallocate()d (allocated, reads as zeroes).
    """
    chunk = 4 * MiB
    fds: List[int] = []
    try:
        for p in paths:
            fds.append(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        if fill == "zero":
            for fd in fds:
                os.posix_fallocate(fd, 0, size)
        else:
            rng = random.Random(seed)
            done = 0
            while done < size:
                n = min(chunk, size - done)
                buf = rng.randbytes(n)
                for fd in fds:
                    view = memoryview(buf)
                    while view:
                        w = os.write(fd, view)
                        view = view[w:]
                done += n
        for fd in fds:
            os.fsync(fd)
    finally:
        for fd in fds:
            os.close(fd)


def parse_size(text: str) -> int:
    """'1G', '256M', '1GiB', '4096' -> bytes (binary units)."""
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower()
    for suffix in ("ib", "b"):
        if t.endswith(suffix) and len(t) > len(suffix) and not t[-len(suffix) - 1].isdigit():
            t = t[:-len(suffix)]
            break
    num = t.rstrip("kmgt")
    unit = t[len(num):]
    if unit not in units or not num.isdigit():
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 256M, 1G)")
    size = int(num) * units[unit]
    if size <= 0 or size % 4096:
        raise argparse.ArgumentTypeError("size must be a positive multiple of 4096")
    return size


# --------------------------------------------------------------------------
# fio
# --------------------------------------------------------------------------


def fio_cmd(w: Workload, uri: str, runtime: int, ramp: int, out: Path) -> List[str]:
    cmd = ["fio", "--name=" + w.key, "--ioengine=nbd", "--uri=" + uri,
           "--rw=" + w.rw, "--bs=" + w.bs, "--iodepth=" + str(w.iodepth),
           "--time_based", "--runtime=" + str(runtime),
           "--output-format=json", "--output=" + str(out)]
    if ramp > 0:
        cmd.append("--ramp_time=" + str(ramp))
    cmd.extend(w.extra)
    return cmd


def _pct(d: Dict[str, Any], key: str) -> float:
    p = d.get("percentile") or {}
    v = p.get(key)
    return float(v) / 1000.0 if v is not None else float("nan")


def run_bounded(cmd: List[str], timeout: float) -> subprocess.CompletedProcess:
    """Run cmd in its own process group (fio forks a worker per job).

    On timeout or interruption the group led by this child's PID gets SIGTERM,
    then SIGKILL if it does not exit within STOP_TIMEOUT_S.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_child_setup)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.communicate(timeout=STOP_TIMEOUT_S)
                break
            except subprocess.TimeoutExpired:
                continue
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_fio(w: Workload, server: Server, runtime: int, ramp: int, workdir: Path,
            tag: str) -> Dict[str, Any]:
    out = workdir / f"fio-{tag}.json"
    cmd = fio_cmd(w, server.uri(), runtime, ramp, out)
    try:
        res = run_bounded(cmd, timeout=runtime + ramp + FIO_GRACE_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {w.key} against {server.label} timed out: {' '.join(cmd)}")
    try:
        if res.returncode != 0:
            raise BenchError(f"fio {w.key} against {server.label} failed (status {res.returncode}):\n"
                             f"{' '.join(cmd)}\n{res.stdout[-2000:]}{res.stderr[-2000:]}\n"
                             f"--- server log ---\n{server.log_tail()}")
        try:
            data = json.loads(out.read_text())
            job = data["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise BenchError(f"fio {w.key} against {server.label}: unreadable JSON output ({e})")
        if job.get("error", 0) != 0:
            raise BenchError(f"fio {w.key} against {server.label}: job error {job.get('error')}")
        d = job[w.direction]
        if d.get("total_ios", 0) <= 0:
            raise BenchError(f"fio {w.key} against {server.label}: no I/O completed")
        if not server.running():
            raise BenchError(f"{server.label} died during {w.key}\n{server.log_tail()}")
        clat = d.get("clat_ns", {})
        r = {
            "iops": float(d["iops"]),
            "mib_s": float(d["bw_bytes"]) / MiB,
            "p50_us": _pct(clat, "50.000000"),
            "p99_us": _pct(clat, "99.000000"),
            "mean_us": float(clat.get("mean", float("nan"))) / 1000.0,
            "total_ios": int(d["total_ios"]),
        }
        sync = job.get("sync") or {}
        if sync.get("total_ios", 0) > 0:
            lat = sync.get("lat_ns", {})
            r["flush_p50_us"] = _pct(lat, "50.000000")
            r["flush_p99_us"] = _pct(lat, "99.000000")
            r["flush_total"] = int(sync["total_ios"])
        return r
    finally:
        try:
            out.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

METRICS = ("iops", "mib_s", "p50_us", "p99_us", "mean_us", "flush_p50_us", "flush_p99_us")


def medians(runs: List[Dict[str, Any]]) -> Dict[str, float]:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in runs if m in r]
        if vals:
            out[m] = statistics.median(vals)
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def print_table(workloads: List[Workload], servers: List[Server], baseline: Server,
                med: Dict[str, Dict[str, Dict[str, float]]], rounds: int) -> None:
    lw = max(len("workload"), *(len(w.key) for w in workloads))
    sw = max(len("server"), *(len(s.label) for s in servers))
    hdr = (f"{'workload':<{lw}}  {'server':<{sw}}  {'IOPS':>10}  {'MiB/s':>9}  "
           f"{'p50 (us)':>10}  {'p99 (us)':>10}")
    print()
    print(f"Median over {rounds} round(s); latency = fio completion latency (clat).")
    print(hdr)
    print("-" * len(hdr))
    for w in workloads:
        for s in servers:
            m = med[w.key][s.label]
            print(f"{w.key:<{lw}}  {s.label:<{sw}}  {m['iops']:>10.0f}  {m['mib_s']:>9.1f}  "
                  f"{m['p50_us']:>10.1f}  {m['p99_us']:>10.1f}")
            if "flush_p50_us" in m:
                print(f"{'':<{lw}}  {'':<{sw}}  {'(flush latency)':>21}  "
                      f"{m['flush_p50_us']:>10.1f}  {m['flush_p99_us']:>10.1f}")
        b = med[w.key][baseline.label]
        for s in servers:
            if s is baseline:
                continue
            m = med[w.key][s.label]
            print(f"{'':<{lw}}  ratio {s.label}/{baseline.label}: "
                  f"IOPS {fmt_ratio(ratio(m['iops'], b['iops']))} (higher is better), "
                  f"p50 latency {fmt_ratio(ratio(m['p50_us'], b['p50_us']))} (lower is better)")
        print()


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def build_repld(timeout: float) -> None:
    print("+ cargo build --release --bin repld --bin replctl", flush=True)
    try:
        res = subprocess.run(["cargo", "build", "--release", "--bin", "repld", "--bin", "replctl"],
                             cwd=REPO_ROOT,
                             stdin=subprocess.DEVNULL, timeout=timeout)
    except FileNotFoundError:
        raise BenchError("cargo not found; build repld first or pass --repld PATH")
    except subprocess.TimeoutExpired:
        raise BenchError("cargo build timed out")
    if res.returncode != 0:
        raise BenchError(f"cargo build --release --bin repld failed (status {res.returncode})")


def build_servers(args: argparse.Namespace, workdir: Path) -> Tuple[List[Server], Server]:
    """Return (servers in run order, baseline).  Add new server kinds here."""
    servers: List[Server] = []
    if args.self_test_with_nbdkit:
        # Development aid: stand in a second nbdkit for "ours".
        servers.append(NbdkitServer("ours(nbdkit)", workdir, workdir / "ours.img"))
    else:
        servers.append(ReplDServer("repld", workdir, workdir / "repld.img", args.repld))
        if not args.no_pair:
            servers.append(ReplicatedPairServer("repl-pair", workdir, args.repld))
    baseline = NbdkitServer("nbdkit", workdir, workdir / "nbdkit.img")
    servers.append(baseline)
    return servers, baseline


def git_rev() -> str:
    try:
        r = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def fio_version() -> str:
    try:
        return subprocess.run(["fio", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def warn_if_tmpfs(path: Path) -> None:
    try:
        best, fstype = "", ""
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) >= len(best):
                best, fstype = parts[1], parts[2]
        if fstype in ("tmpfs", "ramfs"):
            print(f"warning: {path} is on {fstype}; results will not reflect disk I/O",
                  file=sys.stderr)
    except OSError:
        pass


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark repld against the nbdkit file plugin with fio's nbd engine.",
        epilog="See docs/benchmark.md.")
    p.add_argument("--short", action="store_true",
                   help="quick smoke run for CI: 1 s runtime + 1 s ramp, 1 round, 256 MiB images")
    p.add_argument("--rounds", type=int, help="rounds of A B alternation (default 3, --short: 1)")
    p.add_argument("--runtime", type=int, help="seconds measured per fio run (default 10, --short: 1)")
    p.add_argument("--ramp", type=int, help="fio --ramp_time seconds, not measured (default 2, --short: 1)")
    p.add_argument("--size", type=parse_size, help="backing file size (default 1G, --short: 256M)")
    p.add_argument("--fill", choices=("random", "zero"), default="random",
                   help="random: fully written with identical pseudo-random data (default); "
                        "zero: fallocated, reads as zeroes")
    p.add_argument("--seed", type=int, default=42, help="seed for --fill random (default 42)")
    p.add_argument("--workloads", help="comma-separated subset of: " +
                   ",".join(w.key for w in WORKLOADS))
    p.add_argument("--repld", type=Path, default=None,
                   help=f"repld binary (default {DEFAULT_REPLD.relative_to(REPO_ROOT)}, "
                        "which is (re)built with cargo unless --no-build)")
    p.add_argument("--no-build", action="store_true",
                   help="do not run cargo build for the default repld path")
    p.add_argument("--json", type=Path, metavar="FILE", help="write results as JSON to FILE")
    p.add_argument("--tmpdir", type=Path, default=Path("/var/tmp"),
                   help="parent of the temporary work directory (default /var/tmp; avoid tmpfs)")
    p.add_argument("--no-pair", action="store_true",
                   help="skip the replicated pair (alpha Primary -> beta Secondary on loopback)")
    p.add_argument("--self-test-with-nbdkit", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.rounds = a.rounds if a.rounds is not None else (1 if a.short else 3)
    a.runtime = a.runtime if a.runtime is not None else (1 if a.short else 10)
    a.ramp = a.ramp if a.ramp is not None else (1 if a.short else 2)
    a.size = a.size if a.size is not None else ((256 if a.short else 1024) * MiB)
    if a.rounds < 1 or a.rounds > 100:
        p.error("--rounds must be in 1..100")
    if a.runtime < 1 or a.runtime > 3600:
        p.error("--runtime must be in 1..3600")
    if a.ramp < 0 or a.ramp > 600:
        p.error("--ramp must be in 0..600")
    if a.workloads:
        known = {w.key: w for w in WORKLOADS}
        sel = [x.strip() for x in a.workloads.split(",") if x.strip()]
        bad = [x for x in sel if x not in known]
        if bad or not sel:
            p.error(f"unknown workload(s) {bad}; choose from {', '.join(known)}")
        a.workload_list = [known[x] for x in sel]
    else:
        a.workload_list = list(WORKLOADS)
    a.build = a.repld is None and not a.no_build and not a.self_test_with_nbdkit
    if a.repld is None:
        a.repld = DEFAULT_REPLD
    a.repld = a.repld.resolve()
    return a


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    # Turn SIGTERM/SIGHUP into a normal exception so every finally: runs.
    def _on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (apt-get install fio nbdkit)", file=sys.stderr)
            return 2

    try:
        if args.build:
            build_repld(BUILD_TIMEOUT_S)
        if not args.self_test_with_nbdkit and not os.access(args.repld, os.X_OK):
            raise BenchError(f"repld binary not found or not executable: {args.repld}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    args.tmpdir.mkdir(parents=True, exist_ok=True)
    warn_if_tmpfs(args.tmpdir.resolve())
    workdir = Path(tempfile.mkdtemp(prefix="replblk-bench.", dir=args.tmpdir))
    servers: List[Server] = []
    status = 0
    try:
        servers, baseline = build_servers(args, workdir)
        images = [p for s in servers for p in s.images()]
        print(f"work dir {workdir}; creating {len(images)} x {args.size // MiB} MiB "
              f"backing files (fill={args.fill})", flush=True)
        make_images(images, args.size, args.fill, args.seed)

        for s in servers:
            s.start()
            print(f"started {s.label}: {s.describe()}", flush=True)

        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {
            w.key: {s.label: [] for s in servers} for w in args.workload_list}
        total = args.rounds * len(args.workload_list) * len(servers)
        n = 0
        for rnd in range(1, args.rounds + 1):
            for w in args.workload_list:
                for s in servers:  # A B A B ...
                    n += 1
                    # Write back dirty pages left by the previous run so that no
                    # run pays for another one's writeback (matters for fsync).
                    os.sync()
                    r = run_fio(w, s, args.runtime, args.ramp, workdir, f"{rnd}-{w.key}-{n}")
                    runs[w.key][s.label].append(r)
                    print(f"[{n}/{total}] round {rnd} {w.key:<24} {s.label:<14} "
                          f"{r['iops']:>9.0f} IOPS {r['mib_s']:>8.1f} MiB/s "
                          f"p50 {r['p50_us']:>8.1f} us p99 {r['p99_us']:>9.1f} us", flush=True)

        for s in servers:
            s.stop(check=True)

        med = {w.key: {s.label: medians(runs[w.key][s.label]) for s in servers}
               for w in args.workload_list}
        print_table(args.workload_list, servers, baseline, med, args.rounds)

        if args.json:
            result = {
                "meta": {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "git": git_rev(),
                    "host": platform.node(),
                    "kernel": platform.release(),
                    "cpus": os.cpu_count(),
                    "fio": fio_version(),
                    "servers": {s.label: {"kind": s.kind, "version": s.version()} for s in servers},
                    "baseline": baseline.label,
                },
                "config": {
                    "rounds": args.rounds, "runtime_s": args.runtime, "ramp_s": args.ramp,
                    "size_bytes": args.size, "fill": args.fill, "seed": args.seed,
                    "order": "per round, per workload: " + " ".join(s.label for s in servers),
                },
                "workloads": [],
            }
            for w in args.workload_list:
                b = med[w.key][baseline.label]
                result["workloads"].append({
                    "name": w.key,
                    "description": w.description,
                    "fio": {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth, "extra": list(w.extra)},
                    "median": med[w.key],
                    "runs": runs[w.key],
                    "ratio_vs_baseline": {
                        s.label: {
                            "iops": ratio(med[w.key][s.label]["iops"], b["iops"]),
                            "p50": ratio(med[w.key][s.label]["p50_us"], b["p50_us"]),
                            "p99": ratio(med[w.key][s.label]["p99_us"], b["p99_us"]),
                        } for s in servers if s is not baseline},
                })
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt as e:
        print(f"interrupted ({str(e) or 'SIGINT'})", file=sys.stderr)
        status = 130
    finally:
        # No more interruptions: cleanup must complete.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for s in servers:
            try:
                s.stop(check=False)
            except Exception as e:  # keep cleaning up
                print(f"warning: stopping {s.label}: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
