"""Ports for the services the tests and benchmarks start, chosen where Ray will not take them."""

from __future__ import annotations

import random
import socket

# Ray's fixed defaults: the dashboard agent (52365), GCS, dashboard, client server, Serve's
# HAProxy stats and metrics; its workers listen on 10002-19999.
RAY_PORTS = {6379, 8076, 8265, 8404, 9101, 10001, 52365}
LOWEST = 20000
# The worker ports of the nodes tests/ray_cluster.py starts, 200 a node: never handed out here.
WORKER_PORTS = range(21000, 22000)
_handed_out: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port nothing listens on, outside the kernel's ephemeral range and Ray's own ports.

    A port the kernel hands out for `bind(0)` is released before the service binds it, seconds
    later; in between Ray starts a dozen processes that bind ephemeral ports (and its dashboard
    agent's default, 52365, lies in that range), so such a pick can be taken from under it."""
    low, high = _ephemeral_range()
    taken = RAY_PORTS | _handed_out
    candidates = [
        p
        for p in range(LOWEST, 65536)
        if not low <= p <= high and p not in taken and p not in WORKER_PORTS
    ]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range")
