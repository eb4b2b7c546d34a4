#!/usr/bin/env python3
"""fio-based benchmark: replblk's `repld` NBD server vs. the nbdkit file plugin.

Servers: a single `repld`, a replicated `repld` pair (Primary -> Secondary on
loopback), `qemu-storage-daemon` mirroring synchronously to an nbdkit target
(the userspace anchor for synchronous mirroring), and plain nbdkit (the
baseline).  Every server gets its own backing file(s); all backing files are
created the same way (same size, same content) before any server starts.  Each
workload is run through fio's nbd engine against every server in turn, the
order rotated by one each round so no server always runs first or last
(A B C D, B C D A, C D A B ...), for the requested number of rounds, and the
median over rounds is reported together with same-run ratios against the baseline
(nbdkit), the server processes' CPU time per I/O, and a loopback round trip.

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
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from ports import free_port

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
QMP_TIMEOUT_S = 30.0
TOOL_TIMEOUT_S = 60.0
CPU_SAMPLE_INTERVAL_S = 0.025
CLK_TCK = os.sysconf("SC_CLK_TCK")
RTT_ROUND_TRIPS = 1000
RTT_MESSAGE_BYTES = 16


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
# stop(), running(), uri() and processes() using several Daemon objects.
# processes() names the PIDs whose CPU time is measured; after_run() may add
# figures sampled after each fio run.  New servers are added in build_servers().
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

    def start(self, command_for_port, fixed_port: Optional[int] = None,
              ready: Optional[Callable[[int], bool]] = None) -> None:
        """command_for_port(port) -> argv.  Retries if the port got taken.
        With fixed_port, the daemon's port is already in its config.  The
        daemon is ready when ready(port) is true (default: the port accepts
        TCP connections)."""
        ready = ready or port_accepts
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
                if ready(port):
                    return
                time.sleep(0.05)
            if self.proc.poll() is None:
                last = f"not ready (port {port}) after {READY_TIMEOUT_S:.0f}s"
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

    def fio_env(self) -> Optional[Dict[str, str]]:
        """Extra environment for fio (TLS: HOME holding .pki/libnbd)."""
        return None

    def describe(self) -> str:
        return f"pid {self.daemon.pid}, {self.uri()}"

    def log_tail(self) -> str:
        return tail(self.daemon.log_path)

    def processes(self) -> List[Tuple[str, Optional[int]]]:
        """(role, pid) of every server process whose CPU time is measured."""
        return [(self.kind, self.daemon.pid)]

    def after_run(self) -> Dict[str, Any]:
        """Extra per-run figures sampled right after each fio run."""
        return {}


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


class TlsFiles:
    """Certificates made with the openssl CLI for a TLS run: a CA and a
    server certificate for 127.0.0.1 (NBD), self-signed certificates for
    the two nodes' peer link, and $HOME/.pki/libnbd/ca-cert.pem for fio."""

    def __init__(self, workdir: Path) -> None:
        d = workdir / "tls"
        d.mkdir(mode=0o700, exist_ok=True)
        self.dir = d
        self.home = d / "home"
        (self.home / ".pki" / "libnbd").mkdir(parents=True, exist_ok=True)

        def run(*args: str) -> None:
            r = subprocess.run(["openssl", *args], capture_output=True, text=True,
                               timeout=TOOL_TIMEOUT_S)
            if r.returncode != 0:
                raise BenchError(f"openssl {' '.join(args)}: {r.stderr}")

        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        run("req", "-x509", *ec, "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"),
            "-days", "2", "-subj", "/CN=bench CA")
        run("req", *ec, "-keyout", str(d / "server.key"), "-out", str(d / "server.csr"),
            "-subj", "/CN=localhost")
        (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                   "extendedKeyUsage=serverAuth\n")
        run("x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca.crt"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / "server.crt"),
            "-days", "2", "-extfile", str(d / "ext.cnf"))
        for node in ("alpha", "beta"):
            run("req", "-x509", *ec, "-keyout", str(d / f"{node}.key"),
                "-out", str(d / f"{node}.crt"), "-days", "2", "-subj", f"/CN={node}")
        for key in d.glob("*.key"):
            key.chmod(0o600)
        shutil.copy(d / "ca.crt", self.home / ".pki" / "libnbd" / "ca-cert.pem")

    def nbd_keys(self) -> str:
        d = self.dir
        return ("tls = \"require\"\n"
                f"tls_cert = {json.dumps(str(d / 'server.crt'))}\n"
                f"tls_key = {json.dumps(str(d / 'server.key'))}\n")

    def node_keys(self, node: str) -> str:
        d = self.dir
        return (f"tls_cert = {json.dumps(str(d / f'{node}.crt'))}\n"
                f"tls_key = {json.dumps(str(d / f'{node}.key'))}\n")


class ReplDServer(Server):
    kind = "repld"

    def __init__(self, label: str, workdir: Path, image: Path, binary: Path,
                 metrics: bool = False, tls: Optional[TlsFiles] = None) -> None:
        super().__init__(label, workdir, image)
        self.binary = binary
        self.tls = tls
        self.config_path = workdir / f"{label}.toml"
        self.metrics = metrics

    def _command(self, port: int) -> List[str]:
        metrics = (f"[metrics]\nlisten = {json.dumps(f'127.0.0.1:{free_port()}')}\n\n"
                   if self.metrics else "")
        ctl = self.workdir / f"{self.label}.ctl"
        self.config_path.write_text(
            "[nbd]\n"
            f"listen = {json.dumps(f'127.0.0.1:{port}')}\n"
            + (self.tls.nbd_keys() if self.tls else "") +
            "\n"
            f"[control]\nsocket = {json.dumps(str(ctl))}\n\n"
            f"{metrics}"
            "[[resource]]\n"
            f"name = {json.dumps(EXPORT_NAME)}\n"
            f"disk = {json.dumps(str(self.image))}\n")
        return [str(self.binary), "--config", str(self.config_path)]

    def uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        return f"{scheme}://127.0.0.1:{self.daemon.port}/{EXPORT_NAME}"

    def fio_env(self) -> Optional[Dict[str, str]]:
        return {"HOME": str(self.tls.home)} if self.tls else None

    def version(self) -> str:
        return str(self.binary)


class ReplicatedPairServer(Server):
    """Two repld daemons on loopback: alpha (Primary, serves NBD) mirrors
    every write synchronously to beta (Secondary)."""

    kind = "repld-pair"

    def __init__(self, label: str, workdir: Path, binary: Path,
                 al_extents: Optional[int] = None, kind: Optional[str] = None,
                 metrics: bool = False, tls: Optional[TlsFiles] = None,
                 beta_dir: Optional[Path] = None) -> None:
        super().__init__(label, workdir, workdir / f"{label}-alpha.img")
        self.binary = binary
        self.tls = tls
        self.metrics_ports = (free_port(), free_port()) if metrics else None
        # None: the default activity log; 0: none; N: a hot set of N extents.
        self.al_extents = al_extents
        if kind:
            self.kind = kind
        # beta's disk may live elsewhere (--secondary-dir): a second disk.
        beta_dir = beta_dir or workdir
        self.beta_image = beta_dir / f"{label}-beta.img"
        self.config_path = workdir / f"{label}.toml"
        self.alpha = self.daemon
        self.beta = Daemon(f"{label}-beta", workdir)
        self.repl_ports = (free_port(), free_port())
        self.beta_nbd = free_port()
        self.ctl = workdir / f"{label}-alpha.ctl"
        self.beta_ctl = workdir / f"{label}-beta.ctl"
        # External metadata keeps the data files the same size as nbdkit's.
        self.meta = (workdir / f"{label}-alpha.md", beta_dir / f"{label}-beta.md")

    def images(self) -> List[Path]:
        return [self.image, self.beta_image]

    def _write_config(self, alpha_port: int) -> None:
        d = self.workdir
        tls = self.tls
        self.config_path.write_text(
            ("[nbd]\n" + tls.nbd_keys() + "\n" if tls else "") +
            "[replication]\nping_interval_ms = 1000\nping_timeout_ms = 5000\n\n"
            f"[nodes.alpha]\nnbd_listen = {json.dumps(f'127.0.0.1:{alpha_port}')}\n"
            f"control_socket = {json.dumps(str(self.ctl))}\n"
            f"{self._metrics_key(0)}\n"
            f"[nodes.beta]\nnbd_listen = {json.dumps(f'127.0.0.1:{self.beta_nbd}')}\n"
            f"control_socket = {json.dumps(str(self.beta_ctl))}\n"
            f"{self._metrics_key(1)}\n"
            "[[resource]]\n"
            f"name = {json.dumps(EXPORT_NAME)}\n"
            + (f"al_extents = {self.al_extents}\n" if self.al_extents is not None else "")
            + "secret = \"bench-secret\"\n\n"
            "[resource.on.alpha]\n"
            f"disk = {json.dumps(str(self.image))}\n"
            f"meta_disk = {json.dumps(str(self.meta[0]))}\n"
            f"address = {json.dumps(f'127.0.0.1:{self.repl_ports[0]}')}\n"
            + (tls.node_keys("alpha") if tls else "") + "\n"
            "[resource.on.beta]\n"
            f"disk = {json.dumps(str(self.beta_image))}\n"
            f"meta_disk = {json.dumps(str(self.meta[1]))}\n"
            f"address = {json.dumps(f'127.0.0.1:{self.repl_ports[1]}')}\n"
            + (tls.node_keys("beta") if tls else ""))

    def _metrics_key(self, i: int) -> str:
        if self.metrics_ports is None:
            return ""
        return f"metrics_listen = {json.dumps(f'127.0.0.1:{self.metrics_ports[i]}')}\n"

    def replctl(self, ctl: Path, *args: str) -> subprocess.CompletedProcess:
        replctl = self.binary.parent / "replctl"
        return subprocess.run([str(replctl), "--socket", str(ctl), *args],
                              capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)

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

    def uri(self) -> str:
        scheme = "nbds" if self.tls else "nbd"
        return f"{scheme}://127.0.0.1:{self.daemon.port}/{EXPORT_NAME}"

    def fio_env(self) -> Optional[Dict[str, str]]:
        return {"HOME": str(self.tls.home)} if self.tls else None

    def describe(self) -> str:
        return f"alpha pid {self.alpha.pid}, beta pid {self.beta.pid}, {self.uri()}"

    def version(self) -> str:
        return str(self.binary)

    def processes(self) -> List[Tuple[str, Optional[int]]]:
        return [("primary", self.alpha.pid), ("secondary", self.beta.pid)]

    def ping_rtt_us(self, ctl: Path) -> Optional[float]:
        """ping_rtt_us of r0 from `replctl status --json` (the round trip of
        the last keepalive Ping on the replication link), or None."""
        try:
            r = self.replctl(ctl, "status", "--json")
            if r.returncode != 0:
                return None
            for res in json.loads(r.stdout).get("resources", []):
                if res.get("name") == EXPORT_NAME and res.get("ping_rtt_us") is not None:
                    return float(res["ping_rtt_us"])
        except (OSError, subprocess.SubprocessError, ValueError, AttributeError, TypeError):
            pass
        return None

    def after_run(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, ctl in (("ping_rtt_us", self.ctl), ("ping_rtt_us_secondary", self.beta_ctl)):
            v = self.ping_rtt_us(ctl)
            if v is not None:
                out[key] = v
        return out

    def log_tail(self) -> str:
        return tail(self.alpha.log_path) + "\n--- beta ---\n" + tail(self.beta.log_path)


class Qmp:
    """Minimal QMP client: JSON lines over a unix socket, one command at a
    time, events skipped.  Every read has a timeout."""

    def __init__(self, path: Path, deadline: float, owner: Daemon) -> None:
        self.sock: Optional[socket.socket] = None
        last: Exception = BenchError("no attempt")
        while time.monotonic() < deadline and owner.running():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(QMP_TIMEOUT_S)
                s.connect(str(path))
                self.sock = s
                break
            except OSError as e:
                s.close()
                last = e
                time.sleep(0.05)
        if self.sock is None:
            raise BenchError(f"{owner.label}: cannot connect to QMP socket {path}: {last}\n"
                             f"--- log ---\n{tail(owner.log_path)}")
        self.label = owner.label
        self.rfile = self.sock.makefile("rb")
        self.serial = 0
        greeting = self._read()
        if "QMP" not in greeting:
            raise BenchError(f"{self.label}: unexpected QMP greeting {greeting}")
        self.execute("qmp_capabilities")

    def _read(self) -> Dict[str, Any]:
        try:
            line = self.rfile.readline(1 << 20)
        except OSError as e:  # includes socket.timeout
            raise BenchError(f"{self.label}: QMP read failed: {e}")
        if not line:
            raise BenchError(f"{self.label}: QMP connection closed")
        try:
            return json.loads(line)
        except ValueError:
            raise BenchError(f"{self.label}: unreadable QMP line {line[:200]!r}")

    def execute(self, command: str, arguments: Optional[Dict[str, Any]] = None) -> Any:
        assert self.sock is not None
        self.serial += 1
        ident = f"bench-{self.serial}"
        msg: Dict[str, Any] = {"execute": command, "id": ident}
        if arguments is not None:
            msg["arguments"] = arguments
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as e:
            raise BenchError(f"{self.label}: QMP {command}: send failed: {e}")
        for _ in range(10000):  # events may come first; bounded anyway
            r = self._read()
            if r.get("id") != ident:
                continue
            if "error" in r:
                err = r["error"]
                raise BenchError(f"{self.label}: QMP {command} failed: "
                                 f"{err.get('class')}: {err.get('desc')}")
            return r.get("return")
        raise BenchError(f"{self.label}: no QMP answer to {command}")

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.rfile.close()
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class QsdMirrorServer(Server):
    """The userspace anchor for synchronous mirroring: qemu-storage-daemon
    serves file A over NBD through a blockdev-mirror job (sync=none,
    copy-mode=write-blocking) whose target is nbdkit serving file B on
    loopback.  The export is the mirror's filter node `mtop`: a write is
    acknowledged once both A and B have it (in the page cache; see
    docs/benchmark.md for what a FLUSH covers)."""

    kind = "qsd-mirror"

    def __init__(self, label: str, workdir: Path) -> None:
        super().__init__(label, workdir, workdir / f"{label}-a.img")
        self.b_image = workdir / f"{label}-b.img"
        self.qsd = self.daemon
        self.target = Daemon(f"{label}-target", workdir)
        self.qmp_path = workdir / f"{label}.qmp"
        self.nbd_port: Optional[int] = None
        self.size = 0
        for path in (self.image, self.b_image, self.qmp_path):
            if "," in str(path):
                raise BenchError(f"{label}: qemu options cannot take a path with ',': {path}")
        if len(str(self.qmp_path).encode()) >= 100:
            raise BenchError(f"{label}: QMP socket path too long for a unix socket: "
                             f"{self.qmp_path} (use a shorter --tmpdir)")

    def images(self) -> List[Path]:
        return [self.image, self.b_image]

    def version(self) -> str:
        try:
            out = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                                 text=True, timeout=10).stdout
            return out.splitlines()[0].strip() if out else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    def _qsd_command(self, _port: int) -> List[str]:
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={self.image}",
                "--blockdev", "driver=raw,node-name=src,file=file0",
                "--chardev", f"socket,id=mon,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=mon"]

    def start(self) -> None:
        self.size = self.image.stat().st_size
        self.target.start(lambda port: ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port),
                                        "--exportname=t", "file", str(self.b_image)])
        # qsd listens on nothing until QMP says so: ready = QMP socket exists.
        try:
            self.qmp_path.unlink()
        except FileNotFoundError:
            pass
        self.qsd.start(self._qsd_command, fixed_port=0,
                       ready=lambda _port: self.qmp_path.exists())
        qmp = Qmp(self.qmp_path, time.monotonic() + READY_TIMEOUT_S, self.qsd)
        try:
            qmp.execute("blockdev-add", {
                "driver": "nbd", "node-name": "tgt",
                "server": {"type": "inet", "host": "127.0.0.1", "port": str(self.target.port)},
                "export": "t"})
            qmp.execute("blockdev-mirror", {
                "job-id": "m0", "device": "src", "target": "tgt", "sync": "none",
                "copy-mode": "write-blocking", "filter-node-name": "mtop"})
            self._wait_job_ready(qmp)
            last = ""
            for _ in range(START_ATTEMPTS):  # the port may get taken meanwhile
                port = free_port()
                try:
                    qmp.execute("nbd-server-start", {
                        "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}})
                    self.nbd_port = port
                    break
                except BenchError as e:
                    last = str(e)
            if self.nbd_port is None:
                raise BenchError(last)
            qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "mtop",
                                             "name": EXPORT_NAME, "writable": True})
        finally:
            qmp.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not port_accepts(self.nbd_port):
            if time.monotonic() > deadline or not self.running():
                raise BenchError(f"{self.label}: export not reachable on port {self.nbd_port}\n"
                                 f"{self.log_tail()}")
            time.sleep(0.05)
        self.check_mirroring()

    def _wait_job_ready(self, qmp: Qmp) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        job: Dict[str, Any] = {}
        while time.monotonic() < deadline:
            jobs = qmp.execute("query-block-jobs") or []
            job = next((j for j in jobs if j.get("device") == "m0"), {})
            if job.get("status") == "ready" and job.get("actively-synced", True):
                return
            if not job or job.get("status") in ("aborting", "concluded", "null"):
                break
            time.sleep(0.05)
        raise BenchError(f"{self.label}: mirror job not ready and actively synced: {job}\n"
                         f"{self.log_tail()}")

    def _qemu_io(self, command: str) -> None:
        cmd = ["qemu-io", "-f", "raw", self.uri(), "-c", command]
        try:
            res = run_bounded(cmd, timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.label}: timed out: {' '.join(cmd)}")
        text = (res.stdout + res.stderr).lower()
        if res.returncode != 0 or "error" in text or "failed" in text:
            raise BenchError(f"{self.label}: {' '.join(cmd)} failed (status {res.returncode}):\n"
                             f"{res.stdout}{res.stderr}")

    def check_mirroring(self) -> None:
        """Write a pattern through the export and check that file B (the
        target) has it as soon as the write is acknowledged, then write the
        original bytes back so that all servers' data stay identical."""
        length = 4096
        offset = (self.size // 2) // MiB * MiB
        with open(self.image, "rb") as f:
            original = os.pread(f.fileno(), length, offset)
        saved = self.workdir / f"{self.label}-check.bin"
        saved.write_bytes(original)
        pattern = bytes([0xA5]) * length
        if original == pattern:
            pattern = bytes([0x5A]) * length

        def both() -> Tuple[bytes, bytes]:
            with open(self.image, "rb") as a, open(self.b_image, "rb") as b:
                return os.pread(a.fileno(), length, offset), os.pread(b.fileno(), length, offset)

        self._qemu_io(f"write -P 0x{pattern[0]:02x} {offset} {length}")
        a, b = both()
        if a != pattern or b != pattern:
            raise BenchError(
                f"{self.label}: a write through nbd export {self.uri()} did not reach "
                f"{'A' if a != pattern else ''}{' and ' if a != pattern and b != pattern else ''}"
                f"{'B (the mirror target)' if b != pattern else ''} at offset {offset} by the "
                f"time it was acknowledged; is the export on the filter node mtop?\n"
                f"{self.log_tail()}")
        self._qemu_io(f"write -s {saved} {offset} {length}")
        a, b = both()
        if a != original or b != original:
            raise BenchError(f"{self.label}: could not restore the original bytes at {offset}")
        saved.unlink()

    def compare_images(self) -> None:
        """After the run: every write went through the mirror, so A == B."""
        chunk = 4 * MiB
        with open(self.image, "rb") as a, open(self.b_image, "rb") as b:
            offset = 0
            while True:
                x, y = a.read(chunk), b.read(chunk)
                if x != y:
                    n = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]),
                             min(len(x), len(y)))
                    raise BenchError(f"{self.label}: files A and B differ at byte {offset + n} "
                                     f"after the run: the mirror lost writes")
                if not x:
                    return
                offset += len(x)

    def stop(self, check: bool = True) -> None:
        try:
            self.qsd.stop(check)
        finally:
            self.target.stop(check)
        if check:
            self.compare_images()

    def running(self) -> bool:
        return self.qsd.running() and self.target.running()

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{EXPORT_NAME}"

    def describe(self) -> str:
        return (f"qsd pid {self.qsd.pid}, nbdkit target pid {self.target.pid} "
                f"on port {self.target.port}, {self.uri()}")

    def processes(self) -> List[Tuple[str, Optional[int]]]:
        return [("qsd", self.qsd.pid), ("target", self.target.pid)]

    def log_tail(self) -> str:
        return tail(self.qsd.log_path) + "\n--- nbdkit target ---\n" + tail(self.target.log_path)



# --------------------------------------------------------------------------
# Backing files
# --------------------------------------------------------------------------


def make_images(paths: List[Path], size: int, fill: str, seed: int, cache: str) -> None:
    """Create identical backing files.

    fill=random: every file is fully written with the same pseudo-random bytes
                 (random.Random(seed)), then fsync'ed.  No holes anywhere.
    fill=zero:   every file is fallocate()d (allocated, reads as zeroes).

    cache=warm:  the random fill is written 4 KiB at a time and stays in the
                 page cache; the zero fill is read into it 4 KiB at a time
                 before each run (see `warm_cache`).  Either way every page
                 is cached in single-page folios before it is measured.
    cache=cold:  the random fill is written 4 MiB at a time and every file is
                 dropped from the page cache, so the first round writes into
                 pages the kernel has to allocate (see docs/benchmark.md,
                 b85, for what that costs on a virtual machine).
    Either way no file's cache holds the large folios a fill's 4 MiB writes
    make: 4 KiB random writes to those cost every server (nbdkit too) about
    five times the CPU (run b69 in docs/benchmark.md).
    """
    chunk = 4 * MiB
    piece = 4096 if cache == "warm" else chunk
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
                        w = os.write(fd, view[:piece])
                        view = view[w:]
                done += n
        for fd in fds:
            os.fsync(fd)
            if cache == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        for fd in fds:
            os.close(fd)


def warm_cache(paths: List[Path]) -> None:
    """Reads every page of every file 4 KiB at a time with readahead off, so
    that all of it is in the page cache, in single-page folios (as a cold
    cache's small writes would leave it), before a run.  On this kind of
    virtual machine a page the kernel allocates afresh costs far more to
    fill than one it reuses, and its cost varies with what the host has
    reclaimed: writing into uncached pages, 1 MiB writes reached 74-304
    IOPS on a pair that makes 900-1100 once they are cached (b85).  It
    also marks the pages used, so that no reclaim of idle memory takes
    them between a server's runs.  Cheap when the file is cached already."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for off in range(0, size, 4096):
                os.pread(fd, 4096, off)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
        finally:
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


def run_bounded(cmd: List[str], timeout: float,
                env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run cmd in its own process group (fio forks a worker per job).

    On timeout or interruption the group led by this child's PID gets SIGTERM,
    then SIGKILL if it does not exit within STOP_TIMEOUT_S.
    """
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_child_setup,
                            env=None if env is None else {**os.environ, **env})
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


# --------------------------------------------------------------------------
# CPU time of the server processes
# --------------------------------------------------------------------------


def cpu_ticks(pid: Optional[int]) -> Optional[int]:
    """utime + stime of a process (all its threads), in clock ticks: fields
    14 and 15 of /proc/PID/stat.  None if it cannot be read."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        fields = data[data.rindex(b")") + 2:].split()  # fields 3.. (comm may hold spaces)
        return int(fields[14 - 3]) + int(fields[15 - 3])
    except (OSError, ValueError, IndexError):
        return None


def machine_ticks() -> Dict[str, Optional[int]]:
    """From /proc/stat's cpu line (summed over CPUs): the ticks the
    hypervisor ran something else while this machine's CPUs wanted to run
    (steal), the ticks the CPUs were busy (user, nice, system, irq,
    softirq: fio, the servers, the kernel, anything else running) and
    idle (idle, iowait).  None for what cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
        if fields[0] != b"cpu":
            raise ValueError("no cpu line")
        t = [int(x) for x in fields[1:9]]
        return {STEAL: t[7], BUSY: t[0] + t[1] + t[2] + t[5] + t[6], IDLE: t[3] + t[4]}
    except (OSError, ValueError, IndexError):
        return {STEAL: None, BUSY: None, IDLE: None}


# The sampler's keys for machine_ticks(); not processes.
STEAL = "_steal"
BUSY = "_busy"
IDLE = "_idle"


class CpuSampler:
    """Samples the CPU ticks of some processes, and the machine's steal,
    busy and idle time, every CPU_SAMPLE_INTERVAL_S (wall-clock stamped, to
    line up with fio's report), from start() until stop(), in a background
    thread."""

    def __init__(self, pids: List[Tuple[str, Optional[int]]]) -> None:
        self.pids = pids
        self.samples: List[Tuple[float, Dict[str, Optional[int]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def _sample(self) -> None:
        ticks = {role: cpu_ticks(pid) for role, pid in self.pids}
        ticks.update(machine_ticks())
        self.samples.append((time.time(), ticks))

    def _loop(self) -> None:
        # Bounded by stop(); the count bound is a safety net (about 3 hours).
        for _ in range(500000):
            if self._stop.wait(CPU_SAMPLE_INTERVAL_S):
                return
            self._sample()

    def start(self) -> None:
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()

    def ticks_at(self, role: str, t: float) -> Optional[float]:
        """Ticks of `role` at wall time t, interpolated between samples."""
        pts = [(ts, v[role]) for ts, v in self.samples if v.get(role) is not None]
        if not pts:
            return None
        times = [ts for ts, _ in pts]
        i = bisect_left(times, t)
        if i <= 0:
            return float(pts[0][1])
        if i >= len(pts):
            return float(pts[-1][1])
        (t0, v0), (t1, v1) = pts[i - 1], pts[i]
        return v0 + (v1 - v0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1.0)

    def window(self, role: str, start: float, end: float) -> Optional[float]:
        """CPU seconds used by `role` between wall times start and end."""
        a, b = self.ticks_at(role, start), self.ticks_at(role, end)
        return None if a is None or b is None else max(0.0, b - a) / CLK_TCK

    def whole(self, role: str) -> Optional[float]:
        """CPU seconds used by `role` between the first and last sample."""
        first, last = self.samples[0][1].get(role), self.samples[-1][1].get(role)
        return None if first is None or last is None else (last - first) / CLK_TCK


def cpu_figures(sampler: CpuSampler, data: Dict[str, Any], job: Dict[str, Any],
                ios: int) -> Dict[str, Any]:
    """CPU microseconds per I/O of each server process over fio's measured
    window (after --ramp_time; fio's total_ios counts only that window).

    fio reports when it finished (timestamp_ms, wall clock) and how long the
    measured part lasted (job_runtime, ms): the window is [end - runtime, end],
    and the CPU ticks at both ends are interpolated from the samples.  If fio
    did not report both, the whole fio run is used (which over-counts by the
    ramp) and cpu_window says so."""
    roles = [role for role, _ in sampler.pids]
    out: Dict[str, Any] = {"cpu_s_whole_run": {r: sampler.whole(r) for r in roles}}
    end = float(data.get("timestamp_ms", 0)) / 1000.0
    runtime = float(job.get("job_runtime", 0)) / 1000.0
    first, last = sampler.samples[0][0], sampler.samples[-1][0]
    if runtime > 0 and first - 0.5 <= end - runtime and end <= last + 0.5:
        secs = {r: sampler.window(r, end - runtime, end) for r in roles}
        steal, busy, idle = (sampler.window(k, end - runtime, end) for k in (STEAL, BUSY, IDLE))
        out["cpu_window"] = "measured"
    else:
        secs = dict(out["cpu_s_whole_run"])
        steal, busy, idle = (sampler.whole(k) for k in (STEAL, BUSY, IDLE))
        runtime = last - first
        out["cpu_window"] = "whole-run"
    if runtime > 0:
        cpu_time = runtime * (os.cpu_count() or 1)
        if steal is not None:
            # Of the machine's CPU time in the window, the share the
            # hypervisor gave to others: what makes a round slow that no
            # server controls.
            out["steal_pct"] = 100.0 * steal / cpu_time
        if idle is not None:
            # Idle CPUs with a client waiting: the run was bound by latency
            # (a pipeline's hand-offs, the kernel's stalls), not by CPU.
            out["idle_pct"] = 100.0 * idle / cpu_time
    if busy is not None and ios > 0:
        # Everything the machine spent per I/O (fio and the kernel's socket
        # and page cache work included): on a machine whose CPUs are all
        # busy, this is what bounds IOPS.
        out["host_cpu_us_per_io"] = busy * 1e6 / ios
    if any(v is None for v in secs.values()) or ios <= 0:
        return out
    parts = {r: secs[r] * 1e6 / ios for r in roles}
    out["cpu_s"] = secs
    out["cpu_parts_us_per_io"] = parts
    out["cpu_us_per_io"] = sum(parts.values())
    return out


def run_fio(w: Workload, server: Server, runtime: int, ramp: int, workdir: Path,
            tag: str) -> Dict[str, Any]:
    out = workdir / f"fio-{tag}.json"
    cmd = fio_cmd(w, server.uri(), runtime, ramp, out)
    sampler = CpuSampler(server.processes())
    sampler.start()
    try:
        res = run_bounded(cmd, timeout=runtime + ramp + FIO_GRACE_S, env=server.fio_env())
    except subprocess.TimeoutExpired:
        raise BenchError(f"fio {w.key} against {server.label} timed out: {' '.join(cmd)}")
    finally:
        sampler.stop()
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
        ios = sum(int((job.get(k) or {}).get("total_ios", 0)) for k in ("read", "write"))
        r["total_ios_rw"] = ios
        r.update(cpu_figures(sampler, data, job, ios))
        r.update(server.after_run())
        return r
    finally:
        try:
            out.unlink()
        except OSError:
            pass


# --------------------------------------------------------------------------
# Loopback round trip
# --------------------------------------------------------------------------

_ECHO_SERVER = r"""
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
srv.bind(("127.0.0.1", 0))
srv.listen(1)
srv.settimeout(30)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(4096)
for _ in range(10000000):
    n = conn.recv_into(buf)
    if not n:
        break
    conn.sendall(memoryview(buf)[:n])
"""


def loopback_rtt_us(round_trips: int = RTT_ROUND_TRIPS, size: int = RTT_MESSAGE_BYTES,
                    warmup: int = 50) -> float:
    """Median round trip of `size`-byte messages over TCP on 127.0.0.1
    between this process and an echo server in a child Python process
    (TCP_NODELAY on both ends), in microseconds."""
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_SERVER], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_child_setup)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        line = proc.stdout.readline().strip() if ready else b""
        if not line.isdigit():
            raise BenchError(f"loopback echo server did not start: "
                             f"{proc.stderr.read(2000) if proc.poll() is not None else 'timeout'}")
        msg = bytes(range(size))
        buf = bytearray(size)
        times: List[int] = []
        with socket.create_connection(("127.0.0.1", int(line)), timeout=10) as c:
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            view = memoryview(buf)
            for i in range(warmup + round_trips):
                t0 = time.perf_counter_ns()
                c.sendall(msg)
                got = 0
                while got < size:  # bounded: each recv has a timeout, stops at EOF
                    n = c.recv_into(view[got:])
                    if n == 0:
                        raise BenchError("loopback echo server closed the connection")
                    got += n
                t1 = time.perf_counter_ns()
                if i >= warmup:
                    times.append(t1 - t0)
        return statistics.median(times) / 1000.0
    except OSError as e:
        raise BenchError(f"loopback round trip measurement failed: {e}")
    finally:
        try:  # it exits at EOF; after a failure it may still wait in accept()
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

METRICS = ("iops", "mib_s", "p50_us", "p99_us", "mean_us", "flush_p50_us", "flush_p99_us",
           "cpu_us_per_io", "host_cpu_us_per_io", "ping_rtt_us", "ping_rtt_us_secondary",
           "steal_pct", "idle_pct")


def medians(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Median over rounds of each metric separately (so the median CPU/IO
    total need not equal the sum of the parts' medians with >2 rounds)."""
    out: Dict[str, Any] = {}
    for m in METRICS:
        vals = [r[m] for r in runs if m in r]
        if vals:
            out[m] = statistics.median(vals)
    parts = [r["cpu_parts_us_per_io"] for r in runs if "cpu_parts_us_per_io" in r]
    if parts:
        out["cpu_parts_us_per_io"] = {role: statistics.median(p[role] for p in parts)
                                      for role in parts[0]}
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b == 0 or a != a or b != b:
        return None
    return a / b


def fmt_ratio(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def fmt_num(x: Optional[float], width: int, prec: int = 1) -> str:
    return f"{'n/a':>{width}}" if x is None or x != x else f"{x:>{width}.{prec}f}"


def ratios(m: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Optional[float]]:
    return {"iops": ratio(m.get("iops"), b.get("iops")),
            "p50": ratio(m.get("p50_us"), b.get("p50_us")),
            "p99": ratio(m.get("p99_us"), b.get("p99_us")),
            "cpu_per_io": ratio(m.get("cpu_us_per_io"), b.get("cpu_us_per_io")),
            "host_cpu_per_io": ratio(m.get("host_cpu_us_per_io"), b.get("host_cpu_us_per_io"))}


def find_kind(servers: List[Server], kind: str) -> Optional[Server]:
    return next((s for s in servers if s.kind == kind), None)


def comparisons(servers: List[Server], baseline: Server) -> List[Tuple[Server, Server]]:
    """(server, reference) pairs for the ratio lines: every server against
    the baseline, and the replicated pair also against qsd-mirror."""
    out = [(s, baseline) for s in servers if s is not baseline]
    pair, qsd = find_kind(servers, "repld-pair"), find_kind(servers, "qsd-mirror")
    if pair and qsd:
        out.append((pair, qsd))
    # Metrics on against the same server with metrics off.
    by_label = {s.label: s for s in servers}
    for s in servers:
        if s.label.endswith("+metrics") and s.label[: -len("+metrics")] in by_label:
            out.append((s, by_label[s.label[: -len("+metrics")]]))
    noal = find_kind(servers, "repld-pair-noal")
    if noal:
        # The activity log's cost: each logged pair against the pair without.
        for s in servers:
            if s.kind in ("repld-pair", "repld-pair-al-small"):
                out.append((s, noal))
    return out


def print_table(res: Dict[str, Any]) -> None:
    workloads: List[Workload] = res["workloads"]
    servers: List[Server] = res["servers"]
    med = res["median"]
    lw = max(len("workload"), *(len(w.key) for w in workloads))
    sw = max(len("server"), *(len(s.label) for s in servers))
    hdr = (f"{'workload':<{lw}}  {'server':<{sw}}  {'IOPS':>10}  {'MiB/s':>9}  "
           f"{'p50 (us)':>10}  {'p99 (us)':>10}  {'CPU/IO (us)':>11}  {'host CPU/IO':>11}  "
           f"{'steal %':>7}  {'idle %':>6}  CPU split (us/IO)")
    print()
    print(f"fill={res['fill']}: median over {res['rounds']} round(s); latency = fio completion "
          f"latency (clat); CPU/IO = user+system CPU time of the server process(es) per "
          f"read/write fio completed; host CPU/IO = the whole machine's busy CPU time "
          f"(fio and the kernel included) per read/write; steal = share of the machine's "
          f"CPU time the hypervisor gave to others during the run; idle = share its CPUs "
          f"were idle.")
    print(hdr)
    print("-" * len(hdr))
    for w in workloads:
        for s in servers:
            m = med[w.key][s.label]
            parts = m.get("cpu_parts_us_per_io") or {}
            split = " + ".join(f"{role} {v:.1f}" for role, v in parts.items()) if len(parts) > 1 else ""
            print(f"{w.key:<{lw}}  {s.label:<{sw}}  {m['iops']:>10.0f}  {m['mib_s']:>9.1f}  "
                  f"{fmt_num(m.get('p50_us'), 10)}  {fmt_num(m.get('p99_us'), 10)}  "
                  f"{fmt_num(m.get('cpu_us_per_io'), 11)}  "
                  f"{fmt_num(m.get('host_cpu_us_per_io'), 11)}  {fmt_num(m.get('steal_pct'), 7)}  "
                  f"{fmt_num(m.get('idle_pct'), 6)}  {split}".rstrip())
            if "flush_p50_us" in m:
                print(f"{'':<{lw}}  {'':<{sw}}  {'(flush latency)':>21}  "
                      f"{fmt_num(m['flush_p50_us'], 10)}  {fmt_num(m['flush_p99_us'], 10)}")
        for s, ref in comparisons(servers, res["baseline"]):
            r = ratios(med[w.key][s.label], med[w.key][ref.label])
            print(f"{'':<{lw}}  ratio {s.label}/{ref.label}: "
                  f"IOPS {fmt_ratio(r['iops'])} (higher is better), "
                  f"p50 latency {fmt_ratio(r['p50'])}, CPU/IO {fmt_ratio(r['cpu_per_io'])}, "
                  f"host CPU/IO {fmt_ratio(r['host_cpu_per_io'])} (lower is better)")
            print(f"{'':<{lw}}    IOPS by round: {round_ratios(res['runs'][w.key], s, ref)}")
        print()


def round_ratios(runs: Dict[str, List[Dict[str, Any]]], s: Server, ref: Server) -> str:
    """Each round's IOPS ratio of s to ref (the two ran minutes apart at most,
    so a round's ratio is the fair comparison on a machine whose speed moves),
    with the share of CPU time stolen by the hypervisor during each run."""
    out = []
    for a, b in zip(runs[s.label], runs[ref.label]):
        steal = (f" (steal {a['steal_pct']:.0f}%/{b['steal_pct']:.0f}%)"
                 if "steal_pct" in a and "steal_pct" in b else "")
        out.append(f"{fmt_ratio(ratio(a.get('iops'), b.get('iops')))}{steal}")
    return ", ".join(out)


def qd1_report(res: Dict[str, Any]) -> Dict[str, Any]:
    """Round trips measured in this run, and for every QD1 workload the p50
    that replication adds: repl-pair - repld (and qsd-mirror - nbdkit),
    checked against the target  pair p50 <= single p50 + 1 round trip + 10 us
    with the loopback TCP round trip."""
    servers: List[Server] = res["servers"]
    med = res["median"]
    rtts = res["tcp_rtt_samples_us"]
    rtt = statistics.median(rtts) if rtts else None
    single, pair = find_kind(servers, "repld"), find_kind(servers, "repld-pair")
    qsd, base = find_kind(servers, "qsd-mirror"), res["baseline"]
    two_disks = find_kind(servers, "repld-pair-2disk")
    out: Dict[str, Any] = {"tcp_rtt_us": rtt, "tcp_rtt_samples_us": rtts,
                           "tcp_round_trips": RTT_ROUND_TRIPS,
                           "tcp_message_bytes": RTT_MESSAGE_BYTES, "workloads": {}}
    if pair:
        pings = [r["ping_rtt_us"] for w in res["workloads"]
                 for r in res["runs"][w.key][pair.label] if "ping_rtt_us" in r]
        out["pair_ping_rtt_us"] = statistics.median(pings) if pings else None
    for w in res["workloads"]:
        if w.iodepth != 1:
            continue
        e: Dict[str, Any] = {}
        for key, a, b in (("pair_minus_single", pair, single),
                          ("pair_2disk_minus_single", two_disks, single),
                          ("qsd_minus_nbdkit", qsd, base)):
            if a is None or b is None or a is b:
                continue
            ma, mb = med[w.key][a.label], med[w.key][b.label]
            d: Dict[str, Any] = {"servers": [a.label, b.label],
                                 "p50_us": [ma.get("p50_us"), mb.get("p50_us")],
                                 "added_p50_us": (ma["p50_us"] - mb["p50_us"])}
            if "flush_p50_us" in ma and "flush_p50_us" in mb:
                d["flush_p50_us"] = [ma["flush_p50_us"], mb["flush_p50_us"]]
                d["added_flush_p50_us"] = ma["flush_p50_us"] - mb["flush_p50_us"]
                if key != "qsd_minus_nbdkit" and rtt is not None:
                    d["flush_bound_us"] = rtt + 20.0
                    d["flush_target_met"] = d["added_flush_p50_us"] <= rtt + 20.0
            if key != "qsd_minus_nbdkit":
                d["ping_rtt_us"] = ma.get("ping_rtt_us")
                if rtt is not None:
                    d["bound_us"] = rtt + 10.0
                    d["target_met"] = d["added_p50_us"] <= rtt + 10.0
            e[key] = d
        out["workloads"][w.key] = e
    return out


def print_qd1(rep: Dict[str, Any], res: Dict[str, Any]) -> None:
    rtts = rep["tcp_rtt_samples_us"]
    print("Loopback round trip, measured in this run:")
    if rtts:
        print(f"  TCP ping-pong on 127.0.0.1 (Python, {RTT_MESSAGE_BYTES} B messages, median of "
              f"{RTT_ROUND_TRIPS} round trips, once before each workload): {rep['tcp_rtt_us']:.1f} us "
              f"(median of {len(rtts)} samples, {min(rtts):.1f}-{max(rtts):.1f})")
    if rep.get("pair_ping_rtt_us") is not None:
        print(f"  repl-pair keepalive ping_rtt_us (Primary, replctl status after each run; the "
              f"last Ping was sent during the run, under load): median {rep['pair_ping_rtt_us']:.1f} us")
    lw = max([len(k) for k in rep["workloads"]] + [8])
    for key, e in rep["workloads"].items():
        first = True
        for d in e.values():
            a, b = d["servers"]
            lab = key if first else ""
            first = False
            line = (f"  {lab:<{lw}}  p50 {a} - {b} = {d['added_p50_us']:.1f} us "
                    f"({d['p50_us'][0]:.1f} - {d['p50_us'][1]:.1f})")
            if "bound_us" in d:
                line += (f"; target <= 1 round trip + 10 us = {d['bound_us']:.1f} us: "
                         f"{'met' if d['target_met'] else 'NOT met'}")
            if d.get("ping_rtt_us") is not None:
                line += f"; ping_rtt_us during these runs {d['ping_rtt_us']:.0f}"
            print(line)
            if "added_flush_p50_us" in d:
                line = (f"  {'':<{lw}}  flush (fio sync) p50 {a} - {b} = "
                        f"{d['added_flush_p50_us']:.1f} us "
                        f"({d['flush_p50_us'][0]:.1f} - {d['flush_p50_us'][1]:.1f})")
                if "flush_bound_us" in d:
                    line += (f"; target <= 1 round trip + 20 us = {d['flush_bound_us']:.1f} us: "
                             f"{'met' if d['flush_target_met'] else 'NOT met'}")
                print(line)
    if any("bound_us" in d for e in rep["workloads"].values() for d in e.values()):
        print("  (QD1 p50 differences; the target for repl-pair is: pair p50 <= single p50 + "
              "1 round trip + 10 us, with the TCP ping-pong round trip above)")
    print()


def fill_json(res: Dict[str, Any], rep: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    servers: List[Server] = res["servers"]
    baseline: Server = res["baseline"]
    med = res["median"]
    out: Dict[str, Any] = {
        "config": {
            "rounds": args.rounds, "runtime_s": args.runtime, "ramp_s": args.ramp,
            "size_bytes": args.size, "fill": res["fill"], "cache": args.cache, "seed": args.seed,
            "order": "per round, per workload: " + " ".join(s.label for s in servers),
            "cpu": "utime+stime of each server process over fio's measured window "
                   f"(after the ramp), {CPU_SAMPLE_INTERVAL_S * 1000:.0f} ms samples, "
                   f"CLK_TCK {CLK_TCK}, divided by fio's read+write total_ios",
        },
        "loopback": {k: v for k, v in rep.items() if k != "workloads"},
        "workloads": [],
    }
    for w in res["workloads"]:
        b = med[w.key][baseline.label]
        entry = {
            "name": w.key,
            "description": w.description,
            "fio": {"rw": w.rw, "bs": w.bs, "iodepth": w.iodepth, "extra": list(w.extra)},
            "median": med[w.key],
            "runs": res["runs"][w.key],
            "ratio_vs_baseline": {s.label: ratios(med[w.key][s.label], b)
                                  for s in servers if s is not baseline},
        }
        for s, ref in comparisons(servers, baseline):
            if ref is not baseline:
                entry.setdefault(f"ratio_vs_{ref.kind.replace('-', '_')}", {})[s.label] = \
                    ratios(med[w.key][s.label], med[w.key][ref.label])
        if w.key in rep["workloads"]:
            entry["qd1_added_latency"] = rep["workloads"][w.key]
        out["workloads"].append(entry)
    return out


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


def build_servers(args: argparse.Namespace, workdir: Path,
                  beta_dir: Optional[Path] = None) -> Tuple[List[Server], Server]:
    """Return (servers in run order, baseline).  Add new server kinds here."""
    servers: List[Server] = []
    if args.self_test_with_nbdkit:
        # Development aid: stand in a second nbdkit for "ours".
        servers.append(NbdkitServer("ours(nbdkit)", workdir, workdir / "ours.img"))
    else:
        tls = TlsFiles(workdir) if args.tls else None
        ref = args.compare_repld
        # Alternating in each round: ours, the reference binary, ours over TLS.
        servers.append(ReplDServer("repld", workdir, workdir / "repld.img", args.repld))
        if ref:
            servers.append(ReplDServer("repld-ref", workdir, workdir / "repld-ref.img", ref))
        if tls:
            servers.append(ReplDServer("repld-tls", workdir, workdir / "repld-tls.img",
                                       args.repld, tls=tls))
        if args.metrics:
            servers.append(ReplDServer("repld+metrics", workdir, workdir / "repld-m.img",
                                       args.repld, metrics=True))
        if not args.no_pair:
            servers.append(ReplicatedPairServer("repl-pair", workdir, args.repld))
            if beta_dir:
                # The same pair with the Secondary's disk elsewhere: on one
                # machine, what a pair of machines (a disk each) would see.
                servers.append(ReplicatedPairServer("pair-2disk", workdir, args.repld,
                                                    kind="repld-pair-2disk",
                                                    beta_dir=beta_dir))
            if ref:
                servers.append(ReplicatedPairServer("repl-pair-ref", workdir, ref))
            if tls:
                servers.append(ReplicatedPairServer("repl-pair-tls", workdir, args.repld,
                                                    tls=tls))
            if args.metrics:
                servers.append(ReplicatedPairServer("repl-pair+metrics", workdir, args.repld,
                                                    metrics=True))
            if args.al_compare:
                # The same pair without the activity log (the reference for
                # its cost), and with a hot set far smaller than the device
                # (random writes then mostly miss it).
                servers.append(ReplicatedPairServer("pair-noal", workdir, args.repld, 0,
                                                    kind="repld-pair-noal"))
                if args.al_small:
                    servers.append(ReplicatedPairServer(
                        f"pair-al{args.al_small}", workdir, args.repld, args.al_small,
                        kind="repld-pair-al-small"))
    if not args.no_qsd:
        servers.append(QsdMirrorServer("qsd-mirror", workdir))
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
    p.add_argument("--fill", choices=("random", "zero", "both"), default="random",
                   help="random: fully written with identical pseudo-random data (default); "
                        "zero: fallocated, reads as zeroes; both: the whole run once per fill "
                        "(random first), one table each")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="warm (default): every backing file wholly in the page cache before "
                        "every run; cold: dropped from it once, after the fill (see make_images)")
    p.add_argument("--seed", type=int, default=42, help="seed for --fill random (default 42)")
    p.add_argument("--workloads", help="comma-separated subset of: " +
                   ",".join(w.key for w in WORKLOADS))
    p.add_argument("--repld", type=Path, default=None,
                   help=f"repld binary (default {DEFAULT_REPLD.relative_to(REPO_ROOT)}, "
                        "which is (re)built with cargo unless --no-build)")
    p.add_argument("--compare-repld", type=Path, default=None, metavar="PATH",
                   help="also run this repld binary (e.g. main's) as repld-ref / repl-pair-ref, "
                        "alternating with ours in every round")
    p.add_argument("--tls", action="store_true",
                   help="also run repld-tls / repl-pair-tls: NBD over TLS (fio via nbds://) and "
                        "the peer link over TLS; certificates made with the openssl CLI")
    p.add_argument("--no-build", action="store_true",
                   help="do not run cargo build for the default repld path")
    p.add_argument("--json", type=Path, metavar="FILE", help="write results as JSON to FILE")
    p.add_argument("--tmpdir", type=Path, default=Path("/var/tmp"),
                   help="parent of the temporary work directory (default /var/tmp; avoid tmpfs)")
    p.add_argument("--no-pair", action="store_true",
                   help="skip the replicated pair (alpha Primary -> beta Secondary on loopback)")
    p.add_argument("--al-compare", action="store_true",
                   help="also run the pair without the activity log (pair-noal, the reference "
                        "for the log's cost) and with a small hot set (pair-alN, see --al-small)")
    p.add_argument("--al-small", type=int, default=16,
                   help="hot set in 4 MiB extents of the small-log pair (default 16 = 64 MiB; "
                        "0: no such pair)")
    p.add_argument("--secondary-dir", type=Path, default=None, metavar="DIR",
                   help="also run pair-2disk: the pair with the Secondary's disk and metadata "
                        "in a temporary directory under DIR (another disk, or a tmpfs standing "
                        "in for one), so that the two nodes' flushes do not queue on one disk")
    p.add_argument("--no-qsd", action="store_true",
                   help="skip qsd-mirror (qemu-storage-daemon mirroring synchronously to nbdkit)")
    p.add_argument("--metrics", action="store_true",
                   help="also run repld and the pair with Prometheus metrics on "
                        "(repld+metrics, repl-pair+metrics), to compare with metrics off")
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
    if a.al_small != 0 and not 16 <= a.al_small <= 23808:
        p.error("--al-small must be 0 or in 16..23808")
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
    if a.compare_repld is not None:
        a.compare_repld = a.compare_repld.resolve()
    return a


def run_matrix(args: argparse.Namespace, fill: str) -> Dict[str, Any]:
    """One complete run for one --fill: fresh work directory, backing files
    and servers; every round x workload x server; servers stopped and the
    work directory removed (also on failure or interruption)."""
    args.tmpdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="replblk-bench.", dir=args.tmpdir))
    beta_dir: Optional[Path] = None
    servers: List[Server] = []
    try:
        if args.secondary_dir:
            beta_dir = Path(tempfile.mkdtemp(prefix="replblk-bench-beta.",
                                             dir=args.secondary_dir))
        servers, baseline = build_servers(args, workdir, beta_dir)
        images = [p for s in servers for p in s.images()]
        print(f"work dir {workdir}; creating {len(images)} x {args.size // MiB} MiB "
              f"backing files (fill={fill})", flush=True)
        make_images(images, args.size, fill, args.seed, args.cache)

        for s in servers:
            s.start()
            print(f"started {s.label}: {s.describe()}", flush=True)

        runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {
            w.key: {s.label: [] for s in servers} for w in args.workload_list}
        rtts: List[float] = []
        total = args.rounds * len(args.workload_list) * len(servers)
        n = 0
        for rnd in range(1, args.rounds + 1):
            for w in args.workload_list:
                rtt = loopback_rtt_us()
                rtts.append(rtt)
                print(f"round {rnd} {w.key}: loopback TCP round trip {rtt:.1f} us", flush=True)
                # A B C D, then B C D A, ...: a run's position in the round
                # (right after file creation or after another workload, or
                # after a slow server) is not always the same server's.
                shift = (rnd - 1) % len(servers)
                for s in servers[shift:] + servers[:shift]:
                    n += 1
                    # Write back dirty pages left by the previous run so that no
                    # run pays for another one's writeback (matters for fsync).
                    os.sync()
                    if args.cache == "warm":
                        warm_cache(s.images())
                    r = run_fio(w, s, args.runtime, args.ramp, workdir, f"{rnd}-{w.key}-{n}")
                    runs[w.key][s.label].append(r)
                    print(f"[{n}/{total}] round {rnd} {w.key:<24} {s.label:<14} "
                          f"{r['iops']:>9.0f} IOPS {r['mib_s']:>8.1f} MiB/s "
                          f"p50 {r['p50_us']:>8.1f} us p99 {r['p99_us']:>9.1f} us "
                          f"CPU/IO {fmt_num(r.get('cpu_us_per_io'), 6)} us "
                          f"host {fmt_num(r.get('host_cpu_us_per_io'), 6)} us "
                          f"steal {fmt_num(r.get('steal_pct'), 4)}% "
                          f"idle {fmt_num(r.get('idle_pct'), 4)}%", flush=True)

        for s in servers:
            s.stop(check=True)

        return {
            "fill": fill, "rounds": args.rounds, "workloads": args.workload_list,
            "servers": servers, "baseline": baseline, "runs": runs, "tcp_rtt_samples_us": rtts,
            "median": {w.key: {s.label: medians(runs[w.key][s.label]) for s in servers}
                       for w in args.workload_list},
        }
    finally:
        # No interruptions while cleaning up: it must complete.
        old = {sig: signal.signal(sig, signal.SIG_IGN)
               for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for s in servers:
            try:
                s.stop(check=False)
            except Exception as e:  # keep cleaning up
                print(f"warning: stopping {s.label}: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        if beta_dir:
            shutil.rmtree(beta_dir, ignore_errors=True)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)

    # Turn SIGTERM/SIGHUP into a normal exception so every finally: runs.
    def _on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    tools = {"fio": "fio", "nbdkit": "nbdkit"}
    if not args.no_qsd:
        tools.update({"qemu-storage-daemon": "qemu-utils", "qemu-io": "qemu-utils"})
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            print(f"error: {tool} not found (apt-get install {package}"
                  f"{'; or --no-qsd' if package == 'qemu-utils' else ''})", file=sys.stderr)
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
    fills = ["random", "zero"] if args.fill == "both" else [args.fill]
    results: List[Tuple[Dict[str, Any], Dict[str, Any]]] = []
    try:
        for fill in fills:
            res = run_matrix(args, fill)
            rep = qd1_report(res)
            results.append((res, rep))
            print_table(res)
            print_qd1(rep, res)
        if len(results) > 1:
            print("Both tables are above (one per --fill); compare ratios within a table.")

        if args.json:
            servers, baseline = results[0][0]["servers"], results[0][0]["baseline"]
            result: Dict[str, Any] = {
                "meta": {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "git": git_rev(),
                    "host": platform.node(),
                    "kernel": platform.release(),
                    "cpus": os.cpu_count(),
                    "fio": fio_version(),
                    "servers": {s.label: {"kind": s.kind, "version": s.version(),
                                          "processes": [role for role, _ in s.processes()]}
                                for s in servers},
                    "baseline": baseline.label,
                },
            }
            per_fill = {res["fill"]: fill_json(res, rep, args) for res, rep in results}
            if len(per_fill) == 1:
                result.update(next(iter(per_fill.values())))
            else:
                result["config"] = dict(per_fill["random"]["config"], fill="both")
                result["fills"] = per_fill
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
            print(f"wrote {args.json}")
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"interrupted ({str(e) or 'SIGINT'})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
