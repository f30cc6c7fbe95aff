"""Logging to a run across a tracking-server outage: buffered, flushed when it returns, or reported lost.

MLflow's client retries a dead ``http(s)://`` server for about 5 minutes per call and then raises,
so a trial that logs its epochs directly stalls for minutes and then fails when the server goes
away. A :class:`RunBuffer` keeps what is to be logged to one run (metrics, artifact folders, tags,
the final status) in order and sends it with **quick requests** (no client retries, a short
timeout): while the server is unreachable, every call returns at once and training goes on; the
next call that finds it back sends the backlog, oldest first. While anything is queued it is also
kept on disk (``spool``: a JSON file, artifact folders copied next to it), because Tune may end a
trial's process before the server returns; :func:`replay_unsent` sends such files later (a search
does at its end). :meth:`RunBuffer.close` waits a bounded time for the server and then *reports*
what could not be sent (an ERROR log line with the counts and the file): nothing is dropped
silently.

A request that the server *answers* with an error (a rejected value) is not an outage: the item
is dropped with a warning and counted in :attr:`RunBuffer.rejected`. Local stores (SQLite, files)
have no outage: their errors propagate as before.

Written here because MLflow has no client-side buffering; its async logging
(``log_batch(..., synchronous=False)``) queues in a thread whose failures surface only later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from bratstune.errors import ConfigError
from bratstune.tracking.runs import check_reachable

logger = logging.getLogger(__name__)

__all__ = [
    "RunBuffer",
    "is_server",
    "quick_requests",
    "replay_unsent",
    "server_reachable",
    "wait_for_server",
    "write_json_atomic",
]

#: MLflow client settings while a buffer sends: no retries, seconds per request.
QUICK_REQUESTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
#: Seconds :meth:`RunBuffer.close` waits for a server that is down (``$BRATSTUNE_MLFLOW_FLUSH_TIMEOUT_S``).
DEFAULT_FLUSH_TIMEOUT_S = 120.0
#: File :meth:`RunBuffer.close` writes what it could not send to.
UNSENT_FILE = "mlflow-unsent.json"
_BATCH = 1000  # MLflow's limit on metrics per log_batch


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_reachable(uri: str, timeout: float = 2.0) -> bool:
    """Whether a tracking URI answers (always ``True`` for local stores)."""
    try:
        check_reachable(uri, timeout=timeout)
    except ConfigError:
        return False
    return True


def wait_for_server(uri: str, timeout: float, *, what: str = "MLflow") -> bool:
    """Wait up to ``timeout`` s for ``uri`` to answer, logging once that it is waiting."""
    deadline, warned = time.monotonic() + timeout, False
    while not server_reachable(uri):
        if time.monotonic() >= deadline:
            return False
        if not warned:
            logger.warning("%s tracking server %s is unreachable; waiting up to %.0f s for it", what, uri, timeout)
            warned = True
        time.sleep(1.0)
    return True


@contextlib.contextmanager
def quick_requests(uri: str) -> Iterator[None]:
    """MLflow client calls inside fail at once on a dead server (no retries, 10-s timeout).

    MLflow reads these settings from the environment at every request. They are process-wide
    for the duration, which is why only single-threaded logging code uses this.
    """
    if not is_server(uri):
        yield
        return
    saved = {key: os.environ.get(key) for key in QUICK_REQUESTS}
    os.environ.update(QUICK_REQUESTS)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def flush_timeout() -> float:
    raw = os.environ.get("BRATSTUNE_MLFLOW_FLUSH_TIMEOUT_S", "")
    try:
        return max(0.0, float(raw)) if raw else DEFAULT_FLUSH_TIMEOUT_S
    except ValueError:
        raise ConfigError(f"BRATSTUNE_MLFLOW_FLUSH_TIMEOUT_S={raw!r} is not a number of seconds") from None


@dataclass
class _Item:
    kind: str  # "metrics" | "artifacts" | "tag" | "terminated"
    payload: Any


@dataclass
class RunBuffer:
    """What is to be logged to one run, sent in order, kept while the server is down.

    Args:
        run_id: the run.
        uri: its tracking URI (only ``http(s)://`` servers are buffered across outages).
        client: defaults to ``MlflowClient(uri)``.
        spool: JSON file that holds the queue while it is not empty (removed once it is sent).

    Every ``log_*`` / ``set_*`` call queues its item and tries :meth:`flush` at once: with the
    server up, the item is sent before the call returns, as an unbuffered client would.
    """

    run_id: str
    uri: str
    client: MlflowClient | None = None
    spool: Path | None = None
    pending: list[_Item] = field(default_factory=list)
    sent: int = 0
    rejected: int = 0
    outages: int = 0
    _down: bool = False

    def __post_init__(self) -> None:
        self.client = self.client or MlflowClient(self.uri)
        self.spool = Path(self.spool) if self.spool is not None else None
        if self.spool is not None and not self.pending and self.spool.is_file():
            # an earlier attempt of the same trial was killed during an outage: its queue comes first
            try:
                run_id, _, items = _read_spool(self.spool)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                aside = self.spool.with_name(self.spool.name + ".unreadable")
                self.spool.replace(aside)
                logger.error("%s: not a readable MLflow spool (%s); moved to %s", self.spool, exc, aside)
                run_id, items = None, []
            if run_id == self.run_id:
                self.pending = items
                logger.info("run %s: %s kept by an earlier attempt (%s)", run_id, _describe(self.counts), self.spool)

    @classmethod
    def from_spool(cls, path: str | Path) -> RunBuffer:
        """The queue a buffer kept in ``path`` (see :attr:`spool`), ready to be sent."""
        run_id, uri, items = _read_spool(Path(path))
        buffer = cls(run_id, uri, pending=items)
        buffer.spool = Path(path)
        return buffer

    # --- queueing ------------------------------------------------------------------------------

    def log_metrics(self, metrics: Sequence[Metric]) -> None:
        for start in range(0, len(metrics), _BATCH):
            self.pending.append(_Item("metrics", list(metrics[start : start + _BATCH])))
        self.flush()

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        """Upload a folder; while queued, only its latest version counts (a newer best model replaces it)."""
        self.pending = [i for i in self.pending if not (i.kind == "artifacts" and i.payload[1] == artifact_path)]
        self.pending.append(_Item("artifacts", (str(local_dir), artifact_path)))
        self.flush()

    def set_tag(self, key: str, value: str) -> None:
        self.pending.append(_Item("tag", (key, str(value))))
        self.flush()

    def set_terminated(self, status: str) -> None:
        self.pending.append(_Item("terminated", status))
        self.flush()

    @property
    def counts(self) -> dict[str, int]:
        """Items still queued, by kind (metrics counted one by one)."""
        out = {"metrics": 0, "artifacts": 0, "tags": 0, "status": 0}
        for item in self.pending:
            if item.kind == "metrics":
                out["metrics"] += len(item.payload)
            else:
                out[{"artifacts": "artifacts", "tag": "tags", "terminated": "status"}[item.kind]] += 1
        return out

    # --- sending -------------------------------------------------------------------------------

    def _send(self, item: _Item) -> None:
        client = self.client
        if item.kind == "metrics":
            client.log_batch(self.run_id, metrics=item.payload)
        elif item.kind == "artifacts":
            local_dir, artifact_path = item.payload
            if Path(local_dir).is_dir():  # gone: a newer one was queued, or the trial's folder was removed
                client.log_artifacts(self.run_id, local_dir, artifact_path)
        elif item.kind == "tag":
            client.set_tag(self.run_id, *item.payload)
        else:
            client.set_terminated(self.run_id, status=item.payload)

    def flush(self) -> bool:
        """Send the queue, oldest first; ``True`` when it is empty.

        Stops at the first item that fails while the server does not answer (an outage: the item
        and everything after it stay queued, and in :attr:`spool`). Raises for local stores, as
        the client would.
        """
        with quick_requests(self.uri):
            while self.pending:
                item = self.pending[0]
                try:
                    self._send(item)
                except Exception as exc:
                    if not is_server(self.uri):
                        raise
                    if not server_reachable(self.uri):
                        if not self._down:
                            self._down, self.outages = True, self.outages + 1
                            logger.warning(
                                "MLflow tracking server %s is unreachable; buffering what run %s logs "
                                "(%s) and sending it when it returns",
                                self.uri,
                                self.run_id,
                                _describe(self.counts),
                            )
                        self._persist()
                        return False
                    self.rejected += 1
                    logger.warning("MLflow refused %s for run %s (dropped): %s", item.kind, self.run_id, exc)
                else:
                    self.sent += 1
                self.pending.pop(0)
        self._persist()
        if self._down:
            self._down = False
            logger.info("MLflow tracking server %s is back; run %s is up to date", self.uri, self.run_id)
        return True

    def close(self, timeout: float | None = None) -> dict[str, int]:
        """Flush, waiting up to ``timeout`` s (default :func:`flush_timeout`) for a server that is down.

        Returns:
            The items that could **not** be sent, by kind (all zero on success). When some
            remain, they are logged as an ERROR naming :attr:`spool`, where they are kept.
        """
        timeout = flush_timeout() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while not self.flush():
            if time.monotonic() >= deadline:
                break
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
        lost = self.counts
        if self.pending:
            logger.error(
                "MLflow tracking server %s stayed unreachable for %.0f s: %s of run %s were not logged%s",
                self.uri,
                timeout,
                _describe(lost),
                self.run_id,
                f"; they are kept in {self.spool}" if self.spool else "",
            )
        return lost

    def _persist(self) -> None:
        """Mirror the queue into :attr:`spool` (temp file, then rename); remove it once empty."""
        if self.spool is None:
            return
        copies = self.spool.with_name(self.spool.stem + "-artifacts")
        if not self.pending:
            if self.spool.exists():
                self.spool.unlink()
                shutil.rmtree(copies, ignore_errors=True)
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        items = []
        for item in self.pending:
            payload: Any = item.payload
            if item.kind == "metrics":
                payload = [{"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step} for m in payload]
            elif item.kind == "artifacts":
                local_dir, artifact_path = payload
                copy = copies / artifact_path
                if Path(local_dir).is_dir() and Path(local_dir).resolve() != copy.resolve():
                    # the trial's folder (and its best model) goes when the trial ends
                    tmp = copy.with_name(copy.name + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    shutil.copytree(local_dir, tmp)
                    shutil.rmtree(copy, ignore_errors=True)
                    tmp.rename(copy)
                payload = [str(copy), artifact_path]
            items.append({"kind": item.kind, "payload": payload})
        write_json_atomic(self.spool, {"run_id": self.run_id, "tracking_uri": self.uri, "items": items})


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``: a temp file named after this process, then a rename (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def _read_spool(path: Path) -> tuple[str, str, list[_Item]]:
    """``(run_id, tracking_uri, items)`` of a spool file written by :meth:`RunBuffer._persist`."""
    data = json.loads(path.read_text())
    items = []
    for item in data["items"]:
        payload = item["payload"]
        if item["kind"] == "metrics":
            payload = [Metric(m["key"], m["value"], m["timestamp"], m["step"]) for m in payload]
        elif item["kind"] in ("artifacts", "tag"):
            payload = tuple(payload)
        items.append(_Item(item["kind"], payload))
    return data["run_id"], data["tracking_uri"], items


def replay_unsent(folder: str | Path, timeout: float | None = None) -> dict[str, int]:
    """Send every queue kept in ``folder/*.json`` (:attr:`RunBuffer.spool`); what is still lost, by kind.

    Each file is removed once its queue is sent; a file that cannot be sent within ``timeout``
    stays, and :meth:`RunBuffer.close` says so.
    """
    lost = {"metrics": 0, "artifacts": 0, "tags": 0, "status": 0}
    folder = Path(folder)
    if not folder.is_dir():
        return lost
    for path in sorted(folder.glob("*.json")):
        try:
            buffer = RunBuffer.from_spool(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("%s: not a readable MLflow spool (%s); left as it is", path, exc)
            continue
        logger.info("sending what run %s could not log during an outage (%s)", buffer.run_id, path)
        for kind, n in buffer.close(timeout).items():
            lost[kind] += n
    return lost


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n) or "nothing"
