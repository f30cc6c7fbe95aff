"""Helpers of the deploy tests (the ``procs`` fixture): free ports, liveness, listening sockets."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bratstune.services import processes


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


def listening_addresses(pids: list[int]) -> list[str]:
    """``host:port`` of every TCP socket in LISTEN state owned by one of ``pids`` (IPv4 and IPv6).

    An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) is given as its IPv4 address.
    """
    return processes.listening_addresses(pids)
