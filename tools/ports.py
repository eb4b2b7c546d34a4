"""TCP ports for the daemons the tools start.

A port released by a bind to port 0 lies in the kernel's ephemeral range
and can be handed out again at once, to another bind to port 0 or as the
source port of an outgoing connection (a peer dialling), before the daemon
binds it. The ports given out here come from below that range, each call
in a process a different one, and a port something holds is skipped.
"""

import itertools
import os
import socket


def _range() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(w) for w in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    if low > 12000:
        return range(10000, low)
    return range(min(max(high, 1024), 60000) + 1, 65536)


_PORTS = _range()
# The process id spreads tools running at once apart.
_NEXT = itertools.count((os.getpid() * 7919) % len(_PORTS))


def free_port() -> int:
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_NEXT) % len(_PORTS)]
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port in {_PORTS.start}..{_PORTS.stop - 1}")
