#!/usr/bin/env python3
"""Long-run failover check: a real `repld` pair on loopback put through
random faults under load, every cycle checked with `ackcheck`.

Each cycle starts with both nodes connected and in sync, starts an
`ackcheck write` at the current Primary (reconnecting to either node),
applies one fault while it writes, stops the writer, and checks:

- every write acknowledged so far, in this cycle or any earlier one, is on
  the Primary (`ackcheck verify` over all logs, through NBD);
- once both report the sync done, the two backing files are identical.

Faults, chosen at random (seeded):

- primary-kill: SIGKILL the Primary, promote the other node, restart the
  killed one (it comes back as Secondary and resyncs);
- secondary-kill: SIGKILL the Secondary under load, restart it;
- link-cut: the replication link goes through a proxy of this script,
  which drops every connection and refuses new ones for a while, then
  heals;
- switchover: stop the load, demote the Primary, promote the other node
  (a failback when that brings the role back to alpha).

Network traffic stays on 127.0.0.1. Every process is stopped by PID and
the work directory removed at the end, even on failure (`--keep` keeps
the directory of a failed run for inspection). Python 3 standard library
only; the binaries come from `--bin` (default target/release).

    python3 tools/longrun.py --cycles 500 --json longrun.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

from ports import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 60.0
FAULTS = ["primary-kill", "secondary-kill", "link-cut", "switchover"]


class Failure(Exception):
    pass


class Proxy:
    """A TCP forwarder for the replication link that can be cut."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.conns: List[socket.socket] = []
        self.refusing = False
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.refusing or self.closed:
                    c.close()
                    continue
            try:
                u = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            u.settimeout(None)
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.lock:
                self.conns += [c, u]
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        with self.lock:
            self.refusing = True
            conns, self.conns = self.conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def heal(self) -> None:
        with self.lock:
            self.refusing = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.sock.close()


def end_writer(w: subprocess.Popen, stop: Path, may_lose_connection: bool,
               stats: Dict, timeout: float = WAIT_S) -> Dict:
    """Stops an `ackcheck write` through its stop file and returns its
    summary; fails on I/O errors, or on a lost connection unless allowed.
    Adds its acknowledged writes and flushes to `stats`."""
    stop.write_text("")
    try:
        out, err = w.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        w.kill()
        w.communicate()
        raise Failure("the writer did not stop")
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise Failure(f"writer exit {w.returncode}: {out}{err}")
    if summary.get("failed", 0):
        raise Failure(f"the writer saw I/O errors: {summary}")
    if summary.get("lost_connections", 0) and not may_lose_connection:
        raise Failure(f"the writer lost its connection: {summary}")
    stats["acked"] += summary.get("acked", 0)
    stats["flushes"] += summary.get("flushes", 0)
    return summary


class Node:
    # Run in the child before exec (e.g. to die with the parent).
    preexec_fn = None

    def __init__(self, name: str, work: Path, bins: Path) -> None:
        self.name = name
        self.work = work
        self.bins = bins
        self.config = work / f"{name}.toml"
        self.disk = work / f"{name}.img"
        self.meta = work / f"{name}.md"
        self.ctl = work / f"{name}.ctl"
        self.log = work / f"{name}.log"
        self.nbd_port = free_port()
        self.proc: Optional[subprocess.Popen] = None

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/r0"

    def start(self) -> None:
        if self.ctl.exists():
            self.ctl.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.bins / "repld"), "--config", str(self.config),
                 "--node", self.name],
                stdout=log, stderr=log, preexec_fn=type(self).preexec_fn,
                env=dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info")))
        deadline = time.monotonic() + WAIT_S
        while not self.ctl.exists():
            if self.proc.poll() is not None:
                raise Failure(f"{self.name} exited at start: {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise Failure(f"{self.name}: no control socket within {WAIT_S}s")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(WAIT_S)
        self.proc = None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT_S)
        self.proc = None

    def ctl_run(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            [str(self.bins / "replctl"), "--socket", str(self.ctl), *args],
            capture_output=True, text=True, timeout=WAIT_S + 10)
        if check and r.returncode != 0:
            raise Failure(f"{self.name}: replctl {' '.join(args)}: {r.stdout}{r.stderr}")
        return r.stdout

    def status(self) -> Dict:
        try:
            return json.loads(self.ctl_run("status", "--json"))["resources"][0]
        except (Failure, ValueError, KeyError, IndexError, subprocess.TimeoutExpired):
            return {}


def same_files(a: Path, b: Path) -> None:
    """Raises Failure at the first MiB where the two files differ."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                raise Failure(f"the copies differ in the MiB at {off} after the sync")
            if not x:
                return
            off += len(x)


class PairDriver:
    """What both scripts do with a pair: wait for a state, bring it up
    with alpha Primary, wait for the sync. `self.nodes` maps names to
    nodes."""

    nodes: Dict[str, Node]

    def wait(self, what: str, check, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                st = {n: node.status() for n, node in self.nodes.items()}
                raise Failure(f"timed out waiting for {what}; status: {json.dumps(st)}")
            time.sleep(0.05)

    def connected(self) -> bool:
        return all(n.status().get("connection") == "Connected" for n in self.nodes.values())

    def synced(self) -> None:
        self.wait("both connected", self.connected)
        for n in self.nodes.values():
            n.ctl_run("wait-sync", "r0", "--timeout", str(int(WAIT_S)))

    def bring_up(self) -> None:
        """Starts both daemons on fresh metadata, skips the initial sync
        (identical empty disks) and promotes alpha."""
        for n in self.nodes.values():
            n.start()
            n.ctl_run("create-md", "r0", "--force")
            n.ctl_run("up", "r0")
        self.wait("the first connect", self.connected)
        a = self.nodes["alpha"]
        a.ctl_run("new-current-uuid", "r0", "--clear-bitmap")
        a.ctl_run("promote", "r0")
        self.wait("beta UpToDate", lambda: self.nodes["beta"].status().get("disk") == "UpToDate")


class Run(PairDriver):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bins = Path(args.bin).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="replblk-longrun-"))
        self.rng = random.Random(args.seed)
        self.nodes = {n: Node(n, self.work, self.bins) for n in ("alpha", "beta")}
        beta_repl = free_port()
        self.proxy = Proxy(beta_repl)
        self.logs: List[Path] = []
        self.writer: Optional[subprocess.Popen] = None
        self.counts: Dict[str, int] = {f: 0 for f in FAULTS}
        self.counts["failback"] = 0
        self.stats = {"acked": 0, "flushes": 0, "unknown": 0, "lost_connections": 0,
                      "max_reconnect_ms": 0, "resync_checks": 0}
        size = args.size_mib << 20
        for n in self.nodes.values():
            with open(n.disk, "wb") as f:
                f.truncate(size)
            with open(n.meta, "wb") as f:
                f.truncate(8 << 20)
        # alpha dials beta through the proxy; beta listens on its own port.
        for me in self.nodes.values():
            beta_addr = f"127.0.0.1:{self.proxy.port}" if me.name == "alpha" \
                else f"127.0.0.1:{beta_repl}"
            me.config.write_text(f"""
[replication]
ping_interval_ms = 500
ping_timeout_ms = 2000
reconnect_max_ms = 500

[nodes.alpha]
nbd_listen = "127.0.0.1:{self.nodes['alpha'].nbd_port}"
control_socket = "{self.nodes['alpha'].ctl}"

[nodes.beta]
nbd_listen = "127.0.0.1:{self.nodes['beta'].nbd_port}"
control_socket = "{self.nodes['beta'].ctl}"

[[resource]]
name = "r0"
secret = "longrun"

[resource.on.alpha]
disk = "{self.nodes['alpha'].disk}"
meta_disk = "{self.nodes['alpha'].meta}"
address = "127.0.0.1:{free_port()}"

[resource.on.beta]
disk = "{self.nodes['beta'].disk}"
meta_disk = "{self.nodes['beta'].meta}"
address = "{beta_addr}"
""")

    # -- helpers ---------------------------------------------------------

    def primary(self) -> Node:
        for n in self.nodes.values():
            if n.proc and n.status().get("role") == "Primary":
                return n
        raise Failure("no Primary")

    def other(self, node: Node) -> Node:
        return self.nodes["beta" if node.name == "alpha" else "alpha"]

    def start_writer(self, cycle: int) -> None:
        log = self.work / f"writes-{cycle:05d}.log"
        self.logs.append(log)
        stop = self.work / "stop"
        if stop.exists():
            stop.unlink()
        uris = []
        for n in (self.primary(), self.other(self.primary())):
            uris += ["--uri", n.uri()]
        self.writer = subprocess.Popen(
            [str(self.bins / "ackcheck"), "write", *uris, "--log", str(log),
             "--run", str(cycle + 1), "--blocks", str(self.args.blocks),
             "--qd", "8", "--flush-every", "32", "--reconnect", str(int(WAIT_S)),
             "--duration", "120", "--stop-file", str(stop), "--seed", str(self.rng.getrandbits(48) | 1)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stop_writer(self) -> Dict:
        assert self.writer is not None
        (self.work / "stop").write_text("")
        try:
            out, err = self.writer.communicate(timeout=WAIT_S + 30)
        except subprocess.TimeoutExpired:
            self.writer.kill()
            self.writer.communicate()
            raise Failure("the writer did not stop")
        code = self.writer.returncode
        self.writer = None
        try:
            summary = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise Failure(f"writer exit {code}: {out}{err}")
        if code != 0 or summary.get("failed", 0) != 0:
            raise Failure(f"the writer saw I/O errors: {summary} {err}")
        for k in ("acked", "flushes", "unknown", "lost_connections"):
            self.stats[k] += summary.get(k, 0)
        self.stats["max_reconnect_ms"] = max(self.stats["max_reconnect_ms"],
                                             summary.get("max_reconnect_ms", 0))
        return summary

    def load(self) -> None:
        time.sleep(self.rng.uniform(0.2, 0.6))

    def verify(self) -> None:
        args = [str(self.bins / "ackcheck"), "verify"]
        for log in self.logs:
            args += ["--log", str(log)]
        r = subprocess.run(args + ["--uri", self.primary().uri()],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise Failure(f"acknowledged writes missing on the Primary: {r.stdout}{r.stderr}")
        # What passed is folded into one log, so checks stay as cheap in
        # cycle 500 as in cycle 1.
        merged = self.work / "history.log"
        args = [str(self.bins / "ackcheck"), "compact"]
        for log in self.logs:
            args += ["--log", str(log)]
        subprocess.run(args + ["--out", str(merged)], check=True, capture_output=True, timeout=600)
        for log in self.logs:
            if log != merged:
                log.unlink()
        self.logs = [merged]

    def compare(self) -> None:
        same_files(self.nodes["alpha"].disk, self.nodes["beta"].disk)
        self.stats["resync_checks"] += 1

    # -- the run -----------------------------------------------------------

    def bootstrap(self) -> None:
        self.bring_up()

    def fault(self, kind: str) -> None:
        p = self.primary()
        s = self.other(p)
        if kind == "primary-kill":
            p.kill()
            self.wait(f"{s.name} losing its peer",
                      lambda: s.status().get("connection") != "Connected")
            s.ctl_run("promote", "r0")
            self.load()
            p.start()
        elif kind == "secondary-kill":
            s.kill()
            self.load()
            s.start()
        elif kind == "link-cut":
            self.proxy.cut()
            time.sleep(self.rng.uniform(0.3, 1.5))
            self.proxy.heal()
        elif kind == "switchover":
            # A planned switch: the clients go first (demote refuses while
            # one is attached).
            self.stop_writer()
            # The server may still be closing the writer's connection: a
            # demote refused for an attached client is retried, bounded.
            deadline = time.monotonic() + 10
            while True:
                try:
                    p.ctl_run("demote", "r0")
                    break
                except Failure as e:
                    if "client" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.wait(f"{s.name} seeing {p.name} Secondary",
                      lambda: s.status().get("peer_role") == "Secondary")
            s.ctl_run("promote", "r0")
            if s.name == "alpha":
                self.counts["failback"] += 1

    def cycle(self, i: int) -> str:
        kind = self.rng.choice(FAULTS)
        self.start_writer(i)
        self.load()
        self.fault(kind)
        self.counts[kind] += 1
        if self.writer is None:
            # The fault stopped the load (switchover): resume it on the new
            # Primary for a while.
            self.start_writer(i + 1_000_000)
            self.load()
        self.load()
        self.stop_writer()
        self.verify()
        self.synced()
        self.compare()
        return kind

    def close(self) -> None:
        if self.writer is not None:
            self.writer.kill()
            self.writer.communicate()
        for n in self.nodes.values():
            try:
                n.stop()
            finally:
                n.kill()
        self.proxy.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", default=str(REPO_ROOT / "target" / "release"))
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=4096,
                    help="blocks the writer spreads its writes over")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory of a failed run")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    for b in ("repld", "replctl", "ackcheck"):
        if not (Path(args.bin) / b).exists():
            print(f"longrun: {Path(args.bin) / b} is missing (cargo build --release)", file=sys.stderr)
            return 2
    run = Run(args)
    started = time.monotonic()
    failed = None
    done = 0
    try:
        run.bootstrap()
        for i in range(args.cycles):
            kind = run.cycle(i)
            done += 1
            print(f"cycle {i + 1}/{args.cycles}: {kind} ok "
                  f"({run.stats['acked']} writes acknowledged so far)", flush=True)
    except (Failure, subprocess.TimeoutExpired, OSError) as e:
        failed = f"cycle {done + 1}: {e}"
    finally:
        run.close()
    summary = {"seed": args.seed, "cycles_done": done, "cycles": args.cycles,
               "faults": run.counts, **run.stats,
               "elapsed_s": round(time.monotonic() - started, 1), "failure": failed}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if failed:
        print(f"longrun FAILED (seed {args.seed}): {failed}", file=sys.stderr)
        if args.keep:
            print(f"work directory kept: {run.work}", file=sys.stderr)
        else:
            shutil.rmtree(run.work, ignore_errors=True)
        return 1
    shutil.rmtree(run.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
