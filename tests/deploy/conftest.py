"""Helpers of the deploy tests (the ``procs`` fixture): free ports, liveness, listening sockets."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="session")
def procs() -> ModuleType:
    """This module: ``free_port``, ``alive``, ``listening_addresses``."""
    return sys.modules[__name__]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def listening_addresses(pids: list[int]) -> list[str]:
    """``host:port`` of every TCP socket in LISTEN state owned by one of ``pids`` (IPv4 and IPv6).

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is given as its IPv4 address.
    """
    inodes = set().union(*(_socket_inodes(p) for p in pids)) if pids else set()
    found = []
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            host_hex, port_hex = local.split(":")
            if width == 8:
                host = socket.inet_ntop(socket.AF_INET, bytes.fromhex(host_hex)[::-1])
            else:
                raw = bytes.fromhex(host_hex)
                host = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
            found.append(f"{host.removeprefix('::ffff:')}:{int(port_hex, 16)}")  # IPv4-mapped: the IPv4 address
    return found
