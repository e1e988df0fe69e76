"""TCP ports for the tests' process groups and torchrun masters.

A port asked of the kernel (bind to port 0) comes from Linux's ephemeral range, and it is free
only until the socket closes: between that and the store's own bind a second or two later
(torchrun starting), any connection's local end may take it -- the gloo connections of a
distributed test in the other xdist worker make hundreds. These ports lie below the ephemeral
range instead, where only a bind that names them takes them, in a block of their own per xdist
worker, each handed out once per process (and checked free when handed out).
"""
from __future__ import annotations

import itertools
import os
import socket

_BLOCK = 500  # ports per xdist worker


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) if worker.isdigit() else 0
    top = min(_ephemeral_low(), 32768)
    lo = top - _BLOCK * (index % 16 + 1)
    if lo < 10000:  # an unusual ephemeral range: the kernel's choice, as before
        return range(0)
    return range(lo, lo + _BLOCK)


_ports = None


def free_port() -> int:
    """A port no other caller in this test run is given, free when returned."""
    global _ports
    if _ports is None:
        block = _block()
        # start where another run's pytest on this machine (its own pid) is unlikely to be
        start = os.getpid() % len(block) if len(block) else 0
        _ports = itertools.chain(block[start:], block[:start])
    for port in _ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # the block used up (or none): the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
