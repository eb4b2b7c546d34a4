#!/usr/bin/env python3
"""Real power cuts: `repld` nodes inside the small qemu VM of tools/vm,
their backing files and metadata on a virtual disk (a raw image holding an
ext4 file system, attached with virtio-blk), qemu SIGKILLed at a random
moment under `ackcheck write` load. The guest's page cache dies with qemu,
as it does in a power cut; what qemu had already handed to the image file
survives (the image is the disk).

Two variants, each cycle in its own region of the device:

- pair: both nodes run in the VM; the host writes through NBD (a qemu
  hostfwd to the Primary's port) with a flush every 16 writes, and the VM
  is killed. It boots again on the same image, both nodes start, the one
  that was Primary is promoted as an operator would (docs/operations.md,
  "Without a cluster"; a forced promote is counted), and every write an
  acknowledged flush covered must be there (`ackcheck verify --flushed`).
- secondary: the Primary runs on the host, the Secondary in the VM (the
  peer link goes through qemu's user networking: the host dials the
  guest through a hostfwd). The VM is killed under load, the Primary goes
  on alone for a while, the VM boots again and the Secondary reconnects and
  resyncs; every acknowledged write must be there (the Primary survived,
  so flushed or not), and what the Secondary lost must have been marked by
  the Primary's transfer log, or the copies would differ.

Every cycle then checks the metadata of every node that lost power as the
cut left it, before any daemon touched it (`replctl dump-md --disk`: at most
one torn superblock slot, counted), waits for the sync and compares the
two copies (SHA-256 of the backing files, in the guest and on the host).

Needs qemu-system-x86, e2fsprogs (mkfs.ext4 on the host) and release
binaries (`cargo build --release --bins`). Network traffic stays on the
host's 127.0.0.1 and inside the VM. qemu is stopped by PID, the work
directory removed, even on failure (`--keep` keeps it when a cycle fails).

    python3 tools/vm_powerloss.py --cycles 20 --json vm_powerloss.json
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from longrun import WAIT_S, Failure, Node, end_writer, free_port  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
REGION = 512  # blocks of 4 KiB per cycle
BOOT_S = 240.0  # TCG is slow; a loaded machine slower
VARIANTS = ("pair", "secondary")

# The guest's side: /init runs this. It mounts the virtual disk and then
# runs the commands the host types into the console, one a line
# ("VMPL <id> <command>"), framing each one's output and exit status.
GUEST_SCRIPT = r"""
stty -echo 2>/dev/null
export PATH=/usr/local/sbin:$PATH RUST_LOG=info
mkdir -p /data
mount -t ext4 /dev/vda /data || { echo "VMPL-FATAL mount"; exit 1; }
mkdir -p /data/logs
# start NODE: repld in the background, its log on the virtual disk (what
# reached the disk before a cut stays readable).
start() {
    rm -f /run/$1.ctl
    echo "--- boot $(cut -d' ' -f1 /proc/uptime)" >> /data/logs/$1.log
    repld --config /etc/replblk/$1.toml --node $1 >> /data/logs/$1.log 2>&1 </dev/null &
    echo $! > /run/$1.pid
    i=0
    while [ ! -S /run/$1.ctl ] && [ $i -lt 600 ]; do
        kill -0 $(cat /run/$1.pid) 2>/dev/null || { tail -n 20 /data/logs/$1.log; return 1; }
        sleep 0.1; i=$((i+1))
    done
    [ -S /run/$1.ctl ]
}
ctl() { n=$1; shift; replctl --socket /run/$n.ctl "$@"; }
echo "VMPL-READY"
while IFS= read -r line; do
    case $line in
        "VMPL "*) ;;
        *) continue ;;
    esac
    rest=${line#VMPL }
    id=${rest%% *}
    cmd=${rest#* }
    echo "VMPL-BEGIN $id"
    eval "$cmd" 2>&1
    echo "VMPL-END $id $?"
done
"""


def die_with_parent() -> None:
    """In the child before exec: SIGKILL when this script dies, however
    it dies (PR_SET_PDEATHSIG survives the exec of run.sh and qemu)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)


class FileServer:
    """Serves the work directory over HTTP on the host's 127.0.0.1, so
    the guest can fetch the writers' logs (busybox wget from 10.0.2.2)."""

    def __init__(self, root: Path) -> None:
        import functools
        import http.server

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

        handler = functools.partial(Quiet, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Guest:
    """One VM: qemu under TCG with the virtual disk and the forwards;
    commands typed into its console."""

    def __init__(self, work: Path, bins: Path, image: Path, forwards: Dict[int, int],
                 configs: Dict[str, str]) -> None:
        self.work = work
        self.image = image
        # host port -> guest port
        self.forwards = forwards
        self.dir = work / "vm"
        root = self.dir / "root"
        (root / "etc" / "replblk").mkdir(parents=True)
        (root / "test.sh").write_text(GUEST_SCRIPT)
        for name, text in configs.items():
            (root / "etc" / "replblk" / f"{name}.toml").write_text(text)
        for b in ("repld", "replctl", "ackcheck"):
            stripped = self.dir / b
            subprocess.run(["strip", "-o", str(stripped), str(bins / b)], check=True)
            subprocess.run(["bash", str(REPO_ROOT / "tools" / "vm" / "add-binary.sh"),
                            str(stripped), str(root), f"/usr/local/sbin/{b}"], check=True)
            stripped.unlink()
        self.proc: Optional[subprocess.Popen] = None
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.next_id = 0
        self.boots = 0
        self.console = open(work / "console.log", "a")

    def boot(self) -> float:
        """Boots the VM; returns the seconds until its script was ready."""
        assert self.proc is None
        fwd = ",".join(f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in self.forwards.items())
        env = dict(os.environ, REPLBLK_VM_NETDEV=fwd)
        started = time.monotonic()
        self.boots += 1
        self.console.write(f"=== boot {self.boots}\n")
        self.proc = subprocess.Popen(
            ["bash", str(REPO_ROOT / "tools" / "vm" / "run.sh"), str(self.dir),
             "-drive", f"file={self.image},format=raw,if=virtio,cache=writeback"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
            preexec_fn=die_with_parent)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc, self.lines), daemon=True).start()
        self._wait_line(lambda line: line.startswith("VMPL-READY"), BOOT_S, "the guest script")
        return time.monotonic() - started

    def _read(self, proc: subprocess.Popen, q: "queue.Queue[Optional[str]]") -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.console.write(line + "\n")
            self.console.flush()
            q.put(line)
        q.put(None)

    def _wait_line(self, check, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failure(f"VM: no {what} within {timeout:.0f}s (see console.log)")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise Failure(f"VM: qemu exited before {what}")
            if line.startswith("VMPL-FATAL"):
                raise Failure(f"VM: {line}")
            if check(line):
                return line

    def run(self, cmd: str, timeout: float = WAIT_S, check: bool = True) -> Tuple[int, str]:
        """Runs a shell command in the guest; returns (status, output)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.next_id += 1
        cid = self.next_id
        self.proc.stdin.write(f"VMPL {cid} {cmd}\n".encode())
        self.proc.stdin.flush()
        self._wait_line(lambda line: line == f"VMPL-BEGIN {cid}", timeout, f"start of `{cmd}`")
        out: List[str] = []
        end = f"VMPL-END {cid} "

        def take(line: str) -> bool:
            if line.startswith(end):
                return True
            out.append(line)
            return False

        last = self._wait_line(take, timeout, f"end of `{cmd}`")
        status = int(last[len(end):])
        text = "\n".join(out)
        if check and status != 0:
            raise Failure(f"VM: `{cmd}` exited {status}: {text}")
        return status, text

    def kill(self) -> None:
        """The power cut: SIGKILL qemu (by PID: run.sh execs it)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(WAIT_S)
            if self.proc.stdin:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
        self.proc = None

    def close(self) -> None:
        self.kill()
        self.console.close()


class HostNode(Node):
    """The Primary on the host (secondary variant); dies with this script."""

    preexec_fn = staticmethod(die_with_parent)


class GuestNode:
    """A repld inside the VM, driven through its console."""

    def __init__(self, name: str, guest: Guest, nbd_host_port: Optional[int]) -> None:
        self.name = name
        self.guest = guest
        self.nbd_host_port = nbd_host_port
        self.disk = f"/data/{name}.img"
        self.meta = f"/data/{name}.md"

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.nbd_host_port}/r0"

    def start(self) -> None:
        self.guest.run(f"start {self.name}")

    def ctl_run(self, *args: str, check: bool = True) -> str:
        status, out = self.guest.run(f"ctl {self.name} {' '.join(args)}", check=False)
        if check and status != 0:
            raise Failure(f"{self.name}: replctl {' '.join(args)}: {out}")
        return out

    def status(self) -> Dict:
        try:
            return json.loads(self.ctl_run("status", "--json"))["resources"][0]
        except (Failure, ValueError, KeyError, IndexError):
            return {}

    def dump_md_offline(self) -> Dict:
        """The metadata as it is on the disk, read without a daemon."""
        return json.loads(self.guest.run(f"replctl dump-md r0 --disk {self.disk} --meta-disk {self.meta} --json")[1])

    def checksum(self) -> str:
        return self.guest.run(f"sha256sum {self.disk}", timeout=300)[1].split()[0]


FLAG_NAMES = ["Consistent", "UpToDate", "Primary", "CrashedPrimary", "CleanShutdown",
              "PeerOutdated", "FullSync", "Outdated", "BitmapPrimary", "ActivityLog"]


def flag_names(bits: int) -> str:
    return ",".join(n for i, n in enumerate(FLAG_NAMES) if bits & (1 << i)) or "-"


def sha256_file(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


class VmPowerLoss:
    def __init__(self, args: argparse.Namespace, variant: str, work: Path) -> None:
        self.args = args
        self.variant = variant
        self.work = work
        self.bins = Path(args.bin).resolve()
        self.rng = random.Random(f"{args.seed}-{variant}")
        self.size = args.size_mib << 20
        self.logs: List[Tuple[Path, bool]] = []
        self.counted = 0
        self.writers: List[subprocess.Popen] = []
        self.files = FileServer(work)
        self.snapshot = ""
        self.stats = {"cuts": 0, "acked": 0, "flushes": 0, "acked_checked": 0,
                      "flushed_checked": 0, "lost": 0, "torn_slots": 0,
                      "promotes_forced": 0, "boots": 0, "boot_s_max": 0.0,
                      "unflushed_lost": 0, "node_flushed_checked": 0,
                      "secondary_flushed_checked": 0, "secondary_acked_lost": 0, "resync_cuts": 0,
                      "startup_cuts": 0,
                      "cut_after_s": [], "metadata": []}
        self.image = work / "vdisk.img"
        # The file system holds both nodes' files (pair) or one (secondary).
        fs_mib = 2 * (args.size_mib + 8) + 64
        with open(self.image, "wb") as f:
            f.truncate(fs_mib << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                        str(self.image)], check=True, capture_output=True)
        ping = "[replication]\nping_interval_ms = 500\nping_timeout_ms = 2000\nreconnect_max_ms = 500\n"
        if variant == "pair":
            fwd = {free_port(): 10809, free_port(): 10810}
            ports = list(fwd)
            text = ping
            for name, port in (("alpha", 10809), ("beta", 10810)):
                text += (f'\n[nodes.{name}]\nnbd_listen = "0.0.0.0:{port}"\n'
                         f'control_socket = "/run/{name}.ctl"\n')
            text += '\n[[resource]]\nname = "r0"\nsecret = "vm-powerloss"\n'
            for name, port in (("alpha", 7788), ("beta", 7789)):
                text += (f'\n[resource.on.{name}]\ndisk = "/data/{name}.img"\n'
                         f'meta_disk = "/data/{name}.md"\naddress = "127.0.0.1:{port}"\n')
            self.guest = Guest(work, self.bins, self.image, fwd, {"alpha": text, "beta": text})
            self.gnodes = {"alpha": GuestNode("alpha", self.guest, ports[0]),
                           "beta": GuestNode("beta", self.guest, ports[1])}
            self.host: Optional[HostNode] = None
        else:
            # alpha (host, Primary) dials beta (guest) through a hostfwd.
            beta_fwd = free_port()
            self.host = HostNode("alpha", work, self.bins)
            with open(self.host.disk, "wb") as f:
                f.truncate(self.size)
            with open(self.host.meta, "wb") as f:
                f.truncate(8 << 20)

            def config(alpha_addr: str, beta_addr: str) -> str:
                return (ping
                        + f'\n[nodes.alpha]\nnbd_listen = "127.0.0.1:{self.host.nbd_port}"\n'
                        f'control_socket = "{self.host.ctl}"\n'
                        '\n[nodes.beta]\nnbd_listen = ""\nunix_socket = "/run/beta.nbd"\n'
                        'control_socket = "/run/beta.ctl"\n'
                        '\n[[resource]]\nname = "r0"\nsecret = "vm-powerloss"\n'
                        f'\n[resource.on.alpha]\ndisk = "{self.host.disk}"\n'
                        f'meta_disk = "{self.host.meta}"\naddress = "{alpha_addr}"\n'
                        '\n[resource.on.beta]\ndisk = "/data/beta.img"\n'
                        f'meta_disk = "/data/beta.md"\naddress = "{beta_addr}"\n')
            self.host.config.write_text(config(f"127.0.0.1:{free_port()}", f"127.0.0.1:{beta_fwd}"))
            self.guest = Guest(work, self.bins, self.image, {beta_fwd: 7789},
                               {"beta": config("10.0.2.2:1", "10.0.2.15:7789")})
            self.gnodes = {"beta": GuestNode("beta", self.guest, None)}

    # -- helpers -------------------------------------------------------

    def nodes(self) -> List:
        return ([self.host] if self.host else []) + list(self.gnodes.values())

    def wait(self, what: str, check, timeout: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                st = {n.name: n.status() for n in self.nodes()}
                raise Failure(f"timed out waiting for {what}; status: {json.dumps(st)}")
            time.sleep(0.3)

    def connected(self) -> bool:
        return all(n.status().get("connection") == "Connected" for n in self.nodes())

    def synced(self) -> None:
        self.wait("both connected", self.connected)
        for n in self.nodes():
            n.ctl_run("wait-sync", "r0", "--timeout", str(int(WAIT_S * 3)))

    def boot(self) -> None:
        took = self.guest.boot()
        self.stats["boots"] += 1
        self.stats["boot_s_max"] = max(self.stats["boot_s_max"], round(took, 1))

    def cut(self) -> None:
        self.guest.kill()
        self.stats["cuts"] += 1

    def metadata_after_cut(self) -> None:
        """Reads every guest node's metadata as the cut left it: at most
        one slot may be torn; what the slots held is kept for the report."""
        for n in self.gnodes.values():
            md = n.dump_md_offline()["metadata"]
            seen = []
            for i, s in enumerate(md["slots"]):
                if isinstance(s, dict) and "Ok" in s:
                    sb = s["Ok"]
                    mark = "*" if md.get("active") == i else ""
                    seen.append(f"{mark}seq={sb['seq']} {flag_names(sb['flags'])}")
                else:
                    seen.append("torn: " + str(s.get("Err", s) if isinstance(s, dict) else s)[:80])
            torn = sum(1 for s in seen if s.startswith("torn"))
            if torn > 1:
                raise Failure(f"{n.name}: both superblock slots unreadable after the cut: {seen}")
            self.stats["torn_slots"] += torn
            self.stats["metadata"].append(f"{self.stats['cuts']} {n.name}: " + " | ".join(seen))

    def compare(self) -> None:
        sums = {n.name: n.checksum() for n in self.gnodes.values()}
        if self.host:
            sums[self.host.name] = sha256_file(self.host.disk)
        if len(set(sums.values())) != 1:
            raise Failure(f"the copies differ after the sync: {sums}")

    def write(self, region: int, uri: str) -> Tuple[subprocess.Popen, Path]:
        """`ackcheck write` over one region (its own run id and log), with
        a flush every 16 writes."""
        log = self.work / f"writes-{region:04d}.log"
        stop = self.work / f"stop-{region}"
        w = subprocess.Popen(
            [str(self.bins / "ackcheck"), "write", "--uri", uri, "--log", str(log),
             "--run", str(region + 1), "--first-block", str(region * REGION),
             "--blocks", str(REGION), "--qd", "8", "--flush-every", "16", "--duration", "600",
             "--stop-file", str(stop), "--seed", str(self.rng.getrandbits(48) | 1),
             "--log-each-line"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        w.stop_file = stop  # type: ignore[attr-defined]
        self.writers.append(w)
        return w, log

    def end_writer(self, w: subprocess.Popen, may_lose_connection: bool) -> Dict:
        summary = end_writer(w, w.stop_file,  # type: ignore[attr-defined]
                             may_lose_connection, self.stats)
        if summary.get("acked", 0) == 0:
            raise Failure(f"no write was acknowledged before the cut: {summary}")
        return summary

    def verify(self, uri: str) -> None:
        """Every log against the Primary, each with its own rule; only the
        logs not checked before are counted."""
        for i, (log, flushed) in enumerate(self.logs):
            args = [str(self.bins / "ackcheck"), "verify", "--log", str(log), "--uri", uri]
            if flushed:
                args.append("--flushed")
            r = subprocess.run(args, capture_output=True, text=True, timeout=600)
            try:
                res = json.loads(r.stdout)
            except ValueError:
                raise Failure(f"ackcheck verify: {r.stdout}{r.stderr}")
            if r.returncode != 0:
                self.stats["lost"] += res.get("lost", 0)
                what = "flushed" if flushed else "acknowledged"
                raise Failure(f"{what} writes missing ({log.name}): {r.stdout}{r.stderr}")
            if i >= self.counted:
                key = "flushed_checked" if flushed else "acked_checked"
                self.stats[key] += res.get("required", 0)
        self.counted = len(self.logs)

    def promote_after_cut(self, before: str) -> GuestNode:
        """Both came back Secondary: promote the one that was Primary, or
        else the other; forced only if both refuse (counted)."""
        order = [self.gnodes[before], self.gnodes["beta" if before == "alpha" else "alpha"]]
        for n in order:
            if n.guest.run(f"ctl {n.name} promote r0", check=False)[0] == 0:
                return n
        self.stats["promotes_forced"] += 1
        order[0].ctl_run("promote", "r0", "--force")
        return order[0]

    # -- the run -------------------------------------------------------

    def bootstrap(self) -> None:
        self.boot()
        mib = self.args.size_mib
        names = " ".join(self.gnodes)
        self.guest.run(f"for n in {names}; do truncate -s {mib}M /data/$n.img && "
                       "truncate -s 8M /data/$n.md || exit 1; done; sync")
        for n in self.nodes():
            n.start()
            n.ctl_run("create-md", "r0", "--force")
            n.ctl_run("up", "r0")
        self.wait("the first connect", self.connected)
        a = self.host or self.gnodes["alpha"]
        a.ctl_run("new-current-uuid", "r0", "--clear-bitmap")
        a.ctl_run("promote", "r0")
        self.primary = "alpha"
        self.wait("beta UpToDate", lambda: self.gnodes["beta"].status().get("disk") == "UpToDate")
        # The files and the metadata exist on the disk before the first cut.
        self.guest.run("sync")

    def cycle(self, i: int, last: bool) -> None:
        if self.variant == "pair":
            self.cycle_pair(i, last)
        else:
            self.cycle_secondary(i, last)

    def resyncing(self, node) -> bool:
        st = node.status()
        return st.get("replication") in ("SyncSource", "SyncTarget") or \
            st.get("out_of_sync_bytes", 0) > 0

    def cut_at_random(self, busy, snapshot: Optional[Path] = None) -> None:
        """Cuts the power 1-6 s into the load; notes whether a resync was
        still running. `snapshot`: a writer's log, copied (whole lines)
        just before the cut into `self.snapshot`."""
        after = self.rng.uniform(1.0, 6.0)
        time.sleep(after)
        if self.resyncing(busy):
            self.stats["resync_cuts"] += 1
        if snapshot is not None:
            text = snapshot.read_text()
            self.snapshot = text[:text.rfind("\n") + 1]
        self.cut()
        self.stats["cut_after_s"].append(round(after, 1))

    def unflushed_lost(self, log: Path, uri: str) -> None:
        """Acknowledged writes no flush covered may die with the page
        cache: counted (not an error), which shows the cut was real."""
        r = subprocess.run([str(self.bins / "ackcheck"), "verify", "--log", str(log), "--uri", uri],
                           capture_output=True, text=True, timeout=600)
        self.stats["unflushed_lost"] += json.loads(r.stdout).get("lost", 0)

    def verify_in_guest(self, log: Path, path: str, flushed: bool) -> Dict:
        """`ackcheck verify --file` of a guest file (as the cut left it,
        no daemon running) against a log fetched from the host."""
        self.guest.run(f"wget -q -O /tmp/check.log http://10.0.2.2:{self.files.port}/{log.name}")
        status, out = self.guest.run(
            f"ackcheck verify --log /tmp/check.log --file {path}{' --flushed' if flushed else ''}",
            timeout=300, check=False)
        try:
            res = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise Failure(f"ackcheck verify in the guest: {out}")
        if status not in (0, 1):
            raise Failure(f"ackcheck verify in the guest exited {status}: {out}")
        res["status"] = status
        return res

    def cycle_pair(self, i: int, last: bool) -> None:
        p = self.gnodes[self.primary]
        w, log = self.write(i, p.uri())
        self.cut_at_random(p)
        self.end_writer(w, may_lose_connection=True)
        self.logs.append((log, True))
        self.boot()
        self.metadata_after_cut()
        # Each node on its own kept every write an acknowledged flush
        # covered (the Primary acknowledges a flush only once the peer's
        # barrier is done), whichever is promoted.
        for n in self.gnodes.values():
            res = self.verify_in_guest(log, n.disk, flushed=True)
            if res["status"] != 0:
                self.stats["lost"] += res.get("lost", 0)
                raise Failure(f"{n.name}'s disk lost flushed writes in the cut: {res}")
            self.stats["node_flushed_checked"] += res.get("required", 0)
        for n in self.gnodes.values():
            n.start()
        # One cycle in four, the power goes again while the daemons come
        # up (metadata writes at attach and at the handshake).
        if self.rng.random() < 1 / 4:
            time.sleep(self.rng.uniform(0.0, 1.5))
            self.cut()
            self.stats["startup_cuts"] += 1
            self.boot()
            self.metadata_after_cut()
            for n in self.gnodes.values():
                n.start()
        self.wait("the pair reconnecting", self.connected)
        p = self.promote_after_cut(self.primary)
        self.primary = p.name
        self.verify(p.uri())
        self.unflushed_lost(log, p.uri())
        # One cycle in three, the next cut may come while this resync runs.
        if not last and self.rng.random() < 1 / 3:
            return
        self.synced()
        self.compare()

    def cycle_secondary(self, i: int, last: bool) -> None:
        assert self.host is not None
        primary = self.host
        # Region 2i is written while connected and left alone after the
        # cut: what the Secondary lost of it only the transfer log can
        # mark. Region 2i+1 is written while the Secondary is down and
        # while it resyncs.
        w, log = self.write(2 * i, primary.uri())
        self.cut_at_random(primary, snapshot=log)
        self.end_writer(w, may_lose_connection=False)
        self.logs.append((log, False))
        # The replies received before the cut, and every write sent (a
        # write sent after the copy may still have reached the Secondary).
        cut_log = log.with_suffix(".cut")
        rest = log.read_text()[len(self.snapshot):]
        cut_log.write_text(self.snapshot + "".join(
            line + "\n" for line in rest.splitlines() if line.startswith("I ")))
        w2, log2 = self.write(2 * i + 1, primary.uri())
        try:
            self.wait("alpha seeing its peer gone",
                      lambda: primary.status().get("connection") != "Connected")
            self.boot()
            self.metadata_after_cut()
            # The Secondary kept every write a flush acknowledged before
            # the cut covered (its barrier acks come after its fdatasync);
            # the acknowledged writes it lost must come back by the resync.
            res = self.verify_in_guest(cut_log, "/data/beta.img", flushed=True)
            if res["status"] != 0:
                self.stats["lost"] += res.get("lost", 0)
                raise Failure(f"the Secondary lost flushed writes in the cut: {res}")
            self.stats["secondary_flushed_checked"] += res.get("required", 0)
            res = self.verify_in_guest(cut_log, "/data/beta.img", flushed=False)
            self.stats["secondary_acked_lost"] += res.get("lost", 0)
            self.gnodes["beta"].start()
            self.wait("the Secondary reconnecting", self.connected)
            # One cycle in three, the power goes again during the resync.
            if self.rng.random() < 1 / 3:
                time.sleep(self.rng.uniform(0.0, 1.0))
                if self.resyncing(primary):
                    self.stats["resync_cuts"] += 1
                self.cut()
                self.boot()
                self.metadata_after_cut()
                self.gnodes["beta"].start()
                self.wait("the Secondary reconnecting", self.connected)
            time.sleep(self.rng.uniform(0.5, 2.0))
        finally:
            self.end_writer(w2, may_lose_connection=False)
        self.logs.append((log2, False))
        self.verify(primary.uri())
        self.synced()
        self.compare()

    def close(self) -> None:
        self.files.close()
        for w in self.writers:
            if w.poll() is None:
                w.kill()
                w.communicate()
        if self.host:
            try:
                self.host.stop()
            finally:
                self.host.kill()
        self.guest.close()


def run_variant(args: argparse.Namespace, variant: str, cycles: int) -> Dict:
    work = Path(tempfile.mkdtemp(prefix=f"replblk-vmpl-{variant}-", dir="/var/tmp"))
    run: Optional[VmPowerLoss] = None
    started = time.monotonic()
    failed = None
    done = 0
    try:
        run = VmPowerLoss(args, variant, work)
        run.bootstrap()
        for i in range(cycles):
            run.cycle(i, last=i == cycles - 1)
            done += 1
            counts = {k: v for k, v in run.stats.items() if isinstance(v, int)}
            print(f"{variant} cycle {i + 1}/{cycles}: power cut after "
                  f"{run.stats['cut_after_s'][-1]}s ok; so far {json.dumps(counts)}", flush=True)
    except (Failure, subprocess.TimeoutExpired, subprocess.CalledProcessError, OSError,
            KeyError, ValueError) as e:
        failed = f"cycle {done + 1}: {e}"
    finally:
        try:
            if run is not None:
                run.close()
        finally:
            if not (failed and args.keep):
                shutil.rmtree(work, ignore_errors=True)
    stats = dict(run.stats) if run else {}
    summary = {"variant": variant, "cycles_done": done, "cycles": cycles, **stats,
               "elapsed_s": round(time.monotonic() - started, 1), "failure": failed}
    if failed and args.keep:
        summary["work"] = str(work)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=2, help="cycles of each variant")
    ap.add_argument("--variant", choices=VARIANTS + ("both",), default="both")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--bin", default=str(REPO_ROOT / "target" / "release"))
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--keep", action="store_true", help="keep the work directory of a failed run")
    args = ap.parse_args()

    # SIGTERM (e.g. from `timeout`) unwinds like an error: qemu, the
    # daemons and the work directories are cleaned up on the way out.
    def terminated(signum, frame):
        raise SystemExit(f"vm_powerloss: signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    for b in ("repld", "replctl", "ackcheck"):
        if not (Path(args.bin) / b).exists():
            print(f"vm_powerloss: {Path(args.bin) / b} is missing (cargo build --release)",
                  file=sys.stderr)
            return 2
    # Each cycle writes its own region of the device.
    args.size_mib = max(32, (2 * args.cycles * REGION * 4096 >> 20) + 8)
    variants = VARIANTS if args.variant == "both" else (args.variant,)
    results = [run_variant(args, v, args.cycles) for v in variants]
    summary = {"seed": args.seed, "variants": results}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    failed = [r for r in results if r["failure"]]
    for r in failed:
        print(f"vm_powerloss FAILED ({r['variant']}, seed {args.seed}): {r['failure']}",
              file=sys.stderr)
        if "work" in r:
            print(f"work directory kept: {r['work']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
