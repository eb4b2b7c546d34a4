#!/usr/bin/env python3
"""Power cuts of a real `repld` pair, emulated with `tools/lazyfs.py`:
each node's backing file and metadata live on a FUSE file system that
keeps unsynced writes in memory and forgets them on command, which is what
a power cut does to a page cache. (SIGKILL alone keeps the page cache, so
it never tests this.) Each cycle, under `ackcheck write` load with flushes:

- both: SIGKILL both daemons and cut both file systems at once (a power
  cut of the pair); restart both, promote, and check that every write an
  acknowledged flush covered is there;
- secondary: SIGKILL the Secondary and cut its file system while the
  Primary goes on; restart it, let it resync, and check that every
  acknowledged write is there: what the Secondary lost must have been
  marked by the Primary's transfer log.

Then, every cycle: the metadata of both nodes is readable (at most one
superblock slot torn), the pair resyncs, and the two copies are identical.
Each cycle writes its own region, so the check of a cycle cut with the
pair (flushed writes only) and of a cycle cut with the Secondary (every
acknowledged write) stay apart.

Needs root for FUSE, `pip install mfusepy`, and release binaries (`--bin`).
Network traffic stays on 127.0.0.1; every process is stopped by PID, every
mount unmounted and the work directory removed, even on failure (`--keep`
keeps it when a cycle fails).

    python3 tools/powerloss.py --cycles 50 --json powerloss.json
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
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import (WAIT_S, Failure, Node, PairDriver, end_writer, free_port,  # noqa: E402
                     same_files)

REPO_ROOT = Path(__file__).resolve().parent.parent
REGION = 512  # blocks of 4 KiB per cycle


class LazyMount:
    def __init__(self, work: Path, name: str) -> None:
        self.back = work / f"{name}-back"
        self.mnt = work / f"{name}-mnt"
        self.log = work / f"lazyfs-{name}-mnt.log"
        self.back.mkdir()
        self.mnt.mkdir()
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tools" / "lazyfs.py"), str(self.back), str(self.mnt)],
            stdout=subprocess.DEVNULL, stderr=open(self.back.parent / f"{self.mnt.name}.err", "w"))
        deadline = time.monotonic() + 20
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise Failure(f"lazyfs did not mount {self.mnt}")
            time.sleep(0.05)

    def cut(self) -> int:
        """Forgets every unsynced write; returns the pages dropped."""
        assert self.proc is not None
        before = self.log.read_text().count("\n") if self.log.exists() else 0
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while True:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if len(lines) > before:
                return int(lines[-1].split()[1])
            if time.monotonic() > deadline:
                raise Failure("lazyfs did not report the cut")
            time.sleep(0.02)

    def stop(self) -> None:
        if os.path.ismount(self.mnt):
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            deadline = time.monotonic() + 10
            while os.path.ismount(self.mnt) and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.ismount(self.mnt):
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class PowerLoss(PairDriver):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bins = Path(args.bin).resolve()
        self.work = Path(tempfile.mkdtemp(prefix="replblk-powerloss-", dir="/var/tmp"))
        self.rng = random.Random(args.seed)
        self.mounts = {n: LazyMount(self.work, n) for n in ("alpha", "beta")}
        self.nodes = {n: Node(n, self.work, self.bins) for n in ("alpha", "beta")}
        self.refusals: List[List[str]] = []
        # (log, flushed only)
        self.logs: List[Tuple[Path, bool]] = []
        self.stats = {"pair_cuts": 0, "secondary_cuts": 0, "pages_dropped": 0,
                      "acked": 0, "flushes": 0, "checked_required": 0,
                      "torn_slots": 0, "promotes_forced": 0}
        size = args.size_mib << 20
        for name, m in self.mounts.items():
            for f, n in (("disk.img", size), ("meta.md", 8 << 20)):
                with open(m.back / f, "wb") as fh:
                    fh.truncate(n)
                    os.fsync(fh.fileno())
        repl = {n: free_port() for n in self.nodes}
        text = "[replication]\nping_interval_ms = 500\nping_timeout_ms = 2000\nreconnect_max_ms = 500\n"
        for n in self.nodes.values():
            text += f'\n[nodes.{n.name}]\nnbd_listen = "127.0.0.1:{n.nbd_port}"\ncontrol_socket = "{n.ctl}"\n'
        text += '\n[[resource]]\nname = "r0"\nsecret = "powerloss"\n'
        for n in self.nodes.values():
            m = self.mounts[n.name].mnt
            text += (f'\n[resource.on.{n.name}]\ndisk = "{m / "disk.img"}"\n'
                     f'meta_disk = "{m / "meta.md"}"\naddress = "127.0.0.1:{repl[n.name]}"\n')
        for n in self.nodes.values():
            n.config.write_text(text)

    # -- helpers -----------------------------------------------------------

    def primary(self) -> Optional[Node]:
        for n in self.nodes.values():
            if n.proc and n.status().get("role") == "Primary":
                return n
        return None

    def metadata_readable(self) -> None:
        for n in self.nodes.values():
            dump = json.loads(n.ctl_run("dump-md", "r0", "--json"))
            slots = dump["metadata"]["slots"]
            ok = sum(1 for s in slots if isinstance(s, dict) and "Ok" in s)
            if ok == 0:
                raise Failure(f"{n.name}: no readable superblock slot: {dump}")
            self.stats["torn_slots"] += len(slots) - ok

    def compare(self) -> None:
        same_files(self.mounts["alpha"].mnt / "disk.img", self.mounts["beta"].mnt / "disk.img")

    def write(self, cycle: int, primary: Node) -> Tuple[subprocess.Popen, Path]:
        log = self.work / f"writes-{cycle:04d}.log"
        stop = self.work / "stop"
        if stop.exists():
            stop.unlink()
        w = subprocess.Popen(
            [str(self.bins / "ackcheck"), "write", "--uri", primary.uri(), "--log", str(log),
             "--run", str(cycle + 1), "--first-block", str(cycle * REGION), "--blocks", str(REGION),
             "--qd", "8", "--flush-every", "16", "--duration", "120", "--stop-file", str(stop),
             "--seed", str(self.rng.getrandbits(48) | 1)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return w, log

    def end_writer(self, w: subprocess.Popen, may_lose_connection: bool) -> Dict:
        return end_writer(w, self.work / "stop", may_lose_connection, self.stats)

    def verify(self, primary: Node) -> None:
        for log, flushed in self.logs:
            args = [str(self.bins / "ackcheck"), "verify", "--log", str(log), "--uri", primary.uri()]
            if flushed:
                args.append("--flushed")
            r = subprocess.run(args, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                what = "flushed" if flushed else "acknowledged"
                raise Failure(f"{what} writes missing ({log.name}): {r.stdout}{r.stderr}")
        last = json.loads(r.stdout)
        self.stats["checked_required"] += last.get("required", 0)

    def promote_after_pair_cut(self, before: str) -> Node:
        """Both came back Secondary: promote the one that was Primary (it
        holds the newest data), or else the other; forced only if both
        refuse, which is counted."""
        order = [self.nodes[before], self.nodes["beta" if before == "alpha" else "alpha"]]
        refusals = []
        for n in order:
            r = subprocess.run([str(self.bins / "replctl"), "--socket", str(n.ctl), "promote", "r0"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return n
            refusals.append(f"{n.name}: {(r.stdout + r.stderr).strip()}")
        self.stats["promotes_forced"] += 1
        self.refusals.append(refusals)
        order[0].ctl_run("promote", "r0", "--force")
        return order[0]

    # -- the run -----------------------------------------------------------

    def bootstrap(self) -> None:
        for m in self.mounts.values():
            m.start()
        self.bring_up()

    def cycle(self, i: int) -> str:
        p = self.primary()
        if p is None:
            raise Failure("no Primary at the start of a cycle")
        s = self.nodes["beta" if p.name == "alpha" else "alpha"]
        kind = self.rng.choice(["pair", "secondary"])
        w, log = self.write(i, p)
        time.sleep(self.rng.uniform(0.3, 1.0))
        if kind == "pair":
            for n in self.nodes.values():
                n.kill()
            for m in self.mounts.values():
                self.stats["pages_dropped"] += m.cut()
            self.end_writer(w, may_lose_connection=True)
            self.logs.append((log, True))
            self.stats["pair_cuts"] += 1
            for n in self.nodes.values():
                n.start()
            self.wait("the pair reconnecting", self.connected)
            p = self.promote_after_pair_cut(p.name)
        else:
            s.kill()
            self.stats["pages_dropped"] += self.mounts[s.name].cut()
            time.sleep(self.rng.uniform(0.2, 0.6))
            s.start()
            self.wait("the Secondary reconnecting", self.connected)
            time.sleep(0.3)
            self.end_writer(w, may_lose_connection=False)
            self.logs.append((log, False))
            self.stats["secondary_cuts"] += 1
        self.metadata_readable()
        self.verify(p)
        self.synced()
        self.compare()
        return kind

    def close(self) -> None:
        for n in self.nodes.values():
            try:
                n.stop()
            finally:
                n.kill()
        for m in self.mounts.values():
            m.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", default=str(REPO_ROOT / "target" / "release"))
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory of a failed run")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    # Each cycle writes its own region of the device.
    args.size_mib = max(64, (args.cycles * REGION * 4096 >> 20) + 16)
    try:
        import mfusepy  # noqa: F401
    except ImportError:
        print("powerloss: needs `pip install mfusepy`", file=sys.stderr)
        return 2
    run = PowerLoss(args)
    started = time.monotonic()
    failed = None
    done = 0
    try:
        run.bootstrap()
        for i in range(args.cycles):
            kind = run.cycle(i)
            done += 1
            print(f"cycle {i + 1}/{args.cycles}: {kind} power cut ok", flush=True)
    except (Failure, subprocess.TimeoutExpired, OSError, KeyError, ValueError) as e:
        failed = f"cycle {done + 1}: {e}"
    finally:
        run.close()
    summary = {"seed": args.seed, "cycles_done": done, "cycles": args.cycles, **run.stats,
               "promote_refusals": run.refusals[:3],
               "elapsed_s": round(time.monotonic() - started, 1), "failure": failed}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    if failed:
        print(f"powerloss FAILED (seed {args.seed}): {failed}", file=sys.stderr)
        if args.keep:
            print(f"work directory kept: {run.work}", file=sys.stderr)
            return 1
    shutil.rmtree(run.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
