#!/usr/bin/env python3
"""Online verify and split-brain resolution, measured on a repld pair.

Uses the replicated pair of tools/bench.py (two repld daemons on loopback,
identical backing files filled with random data, external metadata) and
reports, from one run:

- verify: `replctl verify` over the whole device, against two references
  measured in the same run: `cmp` of both backing files (reading and
  comparing both copies locally: no hashing, no network, no ordering),
  and a full sync of the device (which reads one copy and writes the
  other);
- split brain: both nodes write N scattered 4 KiB blocks while apart;
  the manual resolution (`connect --discard-my-data`) moves only the
  union of both sides' changes. Reported: blocks resynced (from the
  sync source's log), bytes dirtied, time to UpToDate, against a full
  sync of the same device (`invalidate`) in the same run.

    python3 tools/verify_bench.py [--size 1G] [--blocks 2048]

Numbers on a shared 2-core machine are noisy; the ratios within one run
are what matters.
"""

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def status(pair, ctl):
    r = pair.replctl(ctl, "status", "--json")
    if r.returncode != 0:
        raise bench.BenchError(f"status: {r.stderr}")
    return json.loads(r.stdout)["resources"][0]


def ok(pair, ctl, *args):
    r = pair.replctl(ctl, *args)
    if r.returncode != 0:
        raise bench.BenchError(f"replctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def wait(what, check, timeout=600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise bench.BenchError(f"{what} did not happen within {timeout:.0f}s")


def synced(pair):
    a, b = status(pair, pair.ctl), status(pair, pair.beta_ctl)
    return all(s["connection"] == "Connected" and s["replication"] == "Established"
               and s["disk"] == "UpToDate" and s["peer_disk"] == "UpToDate" for s in (a, b))


def qemu_writes(uri, offsets, pattern):
    """One qemu-io process writing 4 KiB at each offset."""
    for i in range(0, len(offsets), 500):
        cmd = ["qemu-io", "-f", "raw", uri]
        for off in offsets[i:i + 500]:
            cmd += ["-c", f"write -P {pattern} {off} 4k"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0 or "fail" in r.stdout:
            raise bench.BenchError(f"qemu-io: {r.stdout}{r.stderr}")


def nbd_uri(port):
    return f"nbd://127.0.0.1:{port}/{bench.EXPORT_NAME}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=bench.parse_size, default=1 << 30)
    p.add_argument("--blocks", type=int, default=2048,
                   help="scattered 4 KiB blocks each side writes while apart")
    p.add_argument("--repld", type=Path, default=bench.DEFAULT_REPLD)
    args = p.parse_args()
    bench.build_repld(600)
    with tempfile.TemporaryDirectory(prefix="verify-bench-", dir="/var/tmp") as d:
        work = Path(d)
        pair = bench.ReplicatedPairServer("pair", work, args.repld)
        bench.make_images(pair.images(), args.size, "random", 1, "cold")
        pair.start()
        try:
            wait("the pair in sync", lambda: synced(pair), 60)
            res = {"size": args.size}

            # Reference: compare both copies locally, byte for byte (cmp:
            # no hashing, no network, no ordering against writes).
            t0 = time.monotonic()
            subprocess.run(["cmp", str(pair.image), str(pair.beta_image)],
                           check=True, capture_output=True, timeout=600)
            res["cmp_both_s"] = time.monotonic() - t0

            for node, ctl in (("alpha", pair.ctl), ("beta", pair.beta_ctl)):
                t0 = time.monotonic()
                ok(pair, ctl, "verify", bench.EXPORT_NAME)
                wait("verify", lambda: (status(pair, ctl).get("verify") or {}).get("state")
                     not in (None, "running"))
                wall = time.monotonic() - t0
                v = status(pair, ctl)["verify"]
                if v["state"] != "done" or v["out_of_sync_blocks"] != 0:
                    raise bench.BenchError(f"verify on {node}: {v}")
                res[f"verify_{node}_s"] = wall

            # Split brain: both write scattered blocks while apart.
            blocks = args.size // 4096
            rng = random.Random(7)
            picks = rng.sample(range(blocks), 2 * args.blocks)
            a_off = sorted(b * 4096 for b in picks[:args.blocks])
            b_off = sorted(b * 4096 for b in picks[args.blocks:])
            ok(pair, pair.ctl, "disconnect", bench.EXPORT_NAME)
            wait("beta losing alpha", lambda: status(pair, pair.beta_ctl)["connection"] != "Connected")
            ok(pair, pair.beta_ctl, "disconnect", bench.EXPORT_NAME)
            ok(pair, pair.beta_ctl, "promote", bench.EXPORT_NAME)
            qemu_writes(pair.uri(), a_off, "0xaa")
            qemu_writes(nbd_uri(pair.beta_nbd), b_off, "0xbb")
            ok(pair, pair.beta_ctl, "demote", bench.EXPORT_NAME)
            t0 = time.monotonic()
            ok(pair, pair.beta_ctl, "connect", bench.EXPORT_NAME, "--discard-my-data")
            ok(pair, pair.ctl, "connect", bench.EXPORT_NAME)
            wait("the resolution", lambda: synced(pair))
            res["split_brain_resolution_s"] = time.monotonic() - t0
            log = pair.alpha.log_path.read_text(errors="replace")
            m = re.findall(r"union_blocks=(\d+)", log)
            res["resolution_blocks_moved"] = int(m[-1]) if m else None
            res["blocks_dirtied_alpha_plus_beta"] = 2 * args.blocks
            a = pair.image.read_bytes()
            b = pair.beta_image.read_bytes()
            res["copies_identical_after_resolution"] = a == b
            del a, b

            # Reference: a full sync of the same device.
            t0 = time.monotonic()
            ok(pair, pair.ctl, "invalidate-remote", bench.EXPORT_NAME)
            time.sleep(0.5)
            wait("the full sync", lambda: synced(pair))
            res["full_sync_s"] = time.monotonic() - t0
        finally:
            pair.stop(check=False)

    mib = args.size / (1 << 20)
    print(json.dumps(res, indent=2))
    print(f"verify: alpha {mib / res['verify_alpha_s']:.0f} MiB/s, beta "
          f"{mib / res['verify_beta_s']:.0f} MiB/s; cmp of both copies "
          f"{mib / res['cmp_both_s']:.0f} MiB/s, full sync {mib / res['full_sync_s']:.0f} MiB/s; "
          f"verify (alpha) / cmp {res['cmp_both_s'] / res['verify_alpha_s']:.2f}x, "
          f"verify (alpha) / full sync {res['full_sync_s'] / res['verify_alpha_s']:.2f}x")
    print(f"split brain: {res['resolution_blocks_moved']} blocks moved for "
          f"{res['blocks_dirtied_alpha_plus_beta']} dirtied "
          f"(device {args.size // 4096} blocks) in {res['split_brain_resolution_s']:.2f} s; "
          f"full sync {res['full_sync_s']:.2f} s "
          f"({res['full_sync_s'] / res['split_brain_resolution_s']:.1f}x longer)")


if __name__ == "__main__":
    main()
