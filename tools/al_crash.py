#!/usr/bin/env python3
"""Crash recovery with the activity log, measured: a replicated pair on
sparse files, fio 4 KiB random writes at queue depth 32 over a span of the
device, the Primary (or both nodes, --both) killed with SIGKILL in the
middle of it, restarted; reports what was marked out of sync, how long the
resync took, and whether the copies are identical afterwards.

    tools/al_crash.py                      # 8 GiB device, 2 GiB span, default al_extents
    tools/al_crash.py --both               # SIGKILL both nodes (alpha first)
    tools/al_crash.py --al-extents 0       # without the log: a full resync

Uses target/release/repld and replctl (build them first). Python 3
standard library and fio only. Everything runs on 127.0.0.1; every process
it starts is stopped by PID, and the work directory is removed, also on
failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import free_port

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
MiB = 1 << 20


class Pair:
    def __init__(self, work: Path, size: int, al_extents: int | None, binary: Path) -> None:
        self.work, self.bin = work, binary
        self.procs: dict[str, subprocess.Popen] = {}
        ports = [free_port() for _ in range(4)]
        self.nbd = {"alpha": ports[0], "beta": ports[1]}
        self.ctl = {n: work / f"{n}.ctl" for n in ("alpha", "beta")}
        self.disk = {n: work / f"{n}.img" for n in ("alpha", "beta")}
        for n in ("alpha", "beta"):
            with open(self.disk[n], "wb") as f:
                f.truncate(size)
            with open(work / f"{n}.md", "wb") as f:
                f.truncate(64 * MiB)
        al = f"al_extents = {al_extents}\n" if al_extents is not None else ""
        text = "[replication]\nping_interval_ms = 500\nping_timeout_ms = 3000\n"
        for n in ("alpha", "beta"):
            text += (f"\n[nodes.{n}]\nnbd_listen = \"127.0.0.1:{self.nbd[n]}\"\n"
                     f"control_socket = {json.dumps(str(self.ctl[n]))}\n")
        text += f"\n[[resource]]\nname = \"r0\"\nsecret = \"s\"\n{al}"
        for n, port in (("alpha", ports[2]), ("beta", ports[3])):
            text += (f"\n[resource.on.{n}]\ndisk = {json.dumps(str(self.disk[n]))}\n"
                     f"meta_disk = {json.dumps(str(work / f'{n}.md'))}\n"
                     f"address = \"127.0.0.1:{port}\"\n")
        self.config = work / "pair.toml"
        self.config.write_text(text)

    def start(self, node: str) -> None:
        log = open(self.work / f"{node}.log", "ab")
        self.procs[node] = subprocess.Popen(
            [str(self.bin / "repld"), "--config", str(self.config), "--node", node],
            stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not self.ctl[node].exists() or self.try_ctl(node, "status") is None:
            if time.monotonic() > deadline:
                raise SystemExit(f"{node} did not come up")
            time.sleep(0.05)

    def kill(self, node: str) -> None:
        p = self.procs.pop(node)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=20)
        self.ctl[node].unlink(missing_ok=True)

    def stop_all(self) -> None:
        for node, p in list(self.procs.items()):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            self.procs.pop(node)

    def try_ctl(self, node: str, *args: str) -> str | None:
        r = subprocess.run([str(self.bin / "replctl"), "--socket", str(self.ctl[node]), *args],
                           capture_output=True, text=True, timeout=120)
        return r.stdout if r.returncode == 0 else None

    def ctl_ok(self, node: str, *args: str) -> str:
        out = self.try_ctl(node, *args)
        if out is None:
            raise SystemExit(f"replctl {' '.join(args)} on {node} failed")
        return out

    def status(self, node: str) -> dict:
        return json.loads(self.ctl_ok(node, "status", "--json"))["resources"][0]

    def wait(self, node: str, what: str, check, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status(node)
            if check(s):
                return s
            time.sleep(0.05)
        raise SystemExit(f"{node}: {what} not reached within {timeout}s")


def identical(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 * MiB), fb.read(16 * MiB)
            if x != y:
                return False
            if not x:
                return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gib", type=int, default=8)
    p.add_argument("--span-gib", type=float, default=2.0, help="fio writes over this much")
    p.add_argument("--al-extents", type=int, default=None)
    p.add_argument("--both", action="store_true", help="kill both nodes, alpha first")
    p.add_argument("--kill-after", type=float, default=5.0, help="seconds of fio before the kill")
    p.add_argument("--tmpdir", type=Path, default=Path("/var/tmp"))
    a = p.parse_args()
    binary = ROOT / "target" / "release"
    work = Path(tempfile.mkdtemp(prefix="replblk-alcrash.", dir=a.tmpdir))
    pair = Pair(work, a.size_gib * GiB, a.al_extents, binary)
    fio = None
    try:
        for n in ("alpha", "beta"):
            pair.start(n)
            pair.ctl_ok(n, "create-md", "r0", "--force")
            pair.ctl_ok(n, "up", "r0")
        pair.wait("alpha", "connected", lambda s: s["connection"] == "Connected")
        pair.ctl_ok("alpha", "new-current-uuid", "r0", "--clear-bitmap")
        pair.ctl_ok("alpha", "promote", "r0")
        span = int(a.span_gib * GiB)
        fio = subprocess.Popen(
            ["fio", "--name=w", "--thread", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{pair.nbd['alpha']}/r0",
             "--rw=randwrite", "--bs=4k", "--iodepth=32", "--time_based", "--runtime=60",
             f"--size={span}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(a.kill_after)
        before = pair.status("alpha")
        pair.kill("alpha")
        if a.both:
            pair.kill("beta")
        fio.wait(timeout=60)
        fio = None
        if not a.both:
            pair.wait("beta", "losing alpha", lambda s: s["connection"] != "Connected")
            pair.ctl_ok("beta", "disconnect", "r0")
        pair.start("alpha")
        after = pair.status("alpha")
        oos = after["out_of_sync_bytes"]
        if a.both:
            pair.start("beta")
        else:
            pair.ctl_ok("beta", "connect", "r0")
        t0 = time.monotonic()
        pair.wait("alpha", "connected", lambda s: s["connection"] == "Connected")
        for n in ("alpha", "beta"):
            pair.ctl_ok(n, "wait-sync", "r0", "--timeout", "3600")
        resync_s = time.monotonic() - t0
        decision = pair.status("alpha")["decision"]
        pair.stop_all()
        same = identical(pair.disk["alpha"], pair.disk["beta"])
        al = before.get("activity_log") or {}
        print(json.dumps({
            "device_bytes": a.size_gib * GiB, "span_bytes": span,
            "killed": "alpha and beta" if a.both else "alpha",
            "al_capacity_extents": al.get("capacity", 0),
            "al_active_extents_before_kill": al.get("active", 0),
            "hot_set_bytes": al.get("capacity", 0) * 4 * MiB,
            "out_of_sync_bytes_after_restart": oos,
            "out_of_sync_fraction_of_device": round(oos / (a.size_gib * GiB), 4),
            "decision": decision,
            "resync_seconds": round(resync_s, 2),
            "copies_identical": same,
        }, indent=2))
        return 0 if same else 1
    finally:
        if fio is not None:
            fio.kill()
            fio.wait()
        for node in list(pair.procs):
            pair.procs[node].kill()
            pair.procs[node].wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
