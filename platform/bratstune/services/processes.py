"""Processes that a service runs as: one process group each, found and stopped by PID.

A service is started in a new session (``start_new_session=True``), so it and every process it
spawns share one process group whose id is the PID of the first process. Stopping it means
SIGTERM to that group, a grace period, then SIGKILL: nothing else on the machine is touched
(never ``ray stop``, never a kill by name). Before a group is signalled, one of its members must
still carry the service's marker on its command line, so a recorded id that the system has
since given to another program is left alone.

Linux reads ``/proc``; elsewhere ``ps`` answers the same questions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = [
    "free_port",
    "group_members",
    "http_get",
    "http_post_json",
    "is_alive",
    "listening_addresses",
    "peer_addresses",
    "port_in_use",
    "start_group",
    "stop_group",
    "wait_until",
]

LOOPBACK = "127.0.0.1"
_PROC = Path("/proc")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """Whether something accepts connections on ``host:port``."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """``(state, pgid)`` of a process from ``/proc/PID/stat``; ``None`` if it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[2])


def _ps_table() -> list[tuple[int, int, str, str]]:
    """``(pid, pgid, state, command line)`` of every process, from ``ps`` (no ``/proc``)."""
    out = subprocess.run(
        ["ps", "-axo", "pid=,pgid=,stat=,args="], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) >= 3:
            rows.append((int(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) > 3 else ""))
    return rows


def is_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (exited, not yet reaped)."""
    if pid <= 0:
        return False
    if _PROC.is_dir():
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not any(row[0] == pid and row[2].startswith("Z") for row in _ps_table())


def _cmdline(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def group_members(pgid: int) -> dict[int, str]:
    """Live (non-zombie) processes of process group ``pgid``: PID -> command line."""
    if pgid <= 0:
        return {}
    members: dict[int, str] = {}
    if _PROC.is_dir():
        for entry in _PROC.iterdir():
            if not entry.name.isdigit():
                continue
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in ("Z", "X"):
                members[int(entry.name)] = _cmdline(int(entry.name))
        return members
    return {pid: args for pid, group, state, args in _ps_table() if group == pgid and not state.startswith("Z")}


def start_group(
    command: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``command`` as the leader of a new session and process group, output to ``log``.

    Returns:
        The process; its ``pid`` is also the group's id.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
        )


def wait_until(check: Callable[[], bool], *, timeout: float, interval: float = 0.25) -> bool:
    """Call ``check`` until it returns true or ``timeout`` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def stop_group(pgid: int, *, marker: str, pids: Sequence[int] = (), grace: float = 10.0) -> list[int]:
    """Stop process group ``pgid`` (SIGTERM, then SIGKILL after ``grace`` seconds), by its id only.

    Args:
        pgid: the group's id, as recorded when it was started.
        marker: text that the command line of one live member must contain; otherwise the group
            is taken for already stopped and the id for reused, and nothing is signalled.
        pids: further PIDs recorded at start; any of them still alive after the group is gone
            (and still carrying ``marker``) gets SIGKILL too.
        grace: seconds between SIGTERM and SIGKILL.

    Returns:
        The recorded PIDs (``pids`` and group members) still alive at the end: empty on success.
    """
    members = group_members(pgid)
    ours = bool(members) and any(marker in args for args in members.values())
    if ours:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            if wait_until(lambda: not group_members(pgid), timeout=wait):
                break
    for pid in pids:
        if _carries(pid, marker):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(_carries(p, marker) for p in pids), timeout=5.0)
    left = {p for p in pids if _carries(p, marker)}
    if ours:
        left |= set(group_members(pgid))
    return sorted(left)


def _carries(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and (where ``/proc`` tells) its command line contains ``marker``."""
    return is_alive(pid) and (not _PROC.is_dir() or marker in _cmdline(pid))


def http_get(url: str, *, timeout: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; ``(0, reason)`` when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback URLs)
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


def http_post_json(url: str, payload: object, *, timeout: float = 5.0) -> tuple[int, object]:
    """``(status, decoded JSON body)`` of a JSON POST; ``(0, reason)`` when nothing answers."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback URLs)
            body = response.read().decode(errors="replace")
            return response.status, json.loads(body) if body else None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except (OSError, ValueError) as exc:
        return 0, str(exc)


# -- sockets of a set of processes (Linux /proc), to check that services stay on loopback ----------

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def _socket_inodes(pids: Sequence[int]) -> set[str]:
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = list((_PROC / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _address(hex_address: str, family: socket.AddressFamily) -> str:
    """``host:port`` of a ``/proc/net/tcp*`` address; an IPv4-mapped IPv6 host as its IPv4 address."""
    host_hex, port_hex = hex_address.split(":")
    raw = bytes.fromhex(host_hex)
    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is little-endian
    host = socket.inet_ntop(family, raw).removeprefix("::ffff:")
    return f"{host}:{int(port_hex, 16)}"


def _tcp_sockets(pids: Sequence[int]) -> list[tuple[str, str, str]]:
    """``(state, local, remote)`` of every TCP socket (IPv4 and IPv6) owned by one of ``pids``."""
    inodes = _socket_inodes(pids)
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[9] in inodes:
                found.append((fields[3], _address(fields[1], family), _address(fields[2], family)))
    return found


def listening_addresses(pids: Sequence[int]) -> list[str]:
    """``host:port`` of every TCP socket in LISTEN state owned by one of ``pids`` (Linux ``/proc``).

    ``0.0.0.0:PORT`` or ``:::PORT`` means a service listens on every interface, not only on 127.0.0.1.
    """
    return [local for state, local, _ in _tcp_sockets(pids) if state == _LISTEN]


def peer_addresses(pids: Sequence[int]) -> list[str]:
    """``host:port`` of the far end of every connected TCP socket owned by one of ``pids``."""
    return [remote for state, _, remote in _tcp_sockets(pids) if state != _LISTEN]
