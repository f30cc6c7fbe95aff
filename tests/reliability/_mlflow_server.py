"""A real ``mlflow server`` on 127.0.0.1 for the outage tests: started, SIGKILLed by its process group, restarted.

The server keeps its store (SQLite) and artifacts in a private folder, so a restart on the same
port serves the same runs, as a crashed and restarted deployment would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from bratstune.services.processes import free_port, group_members, http_get, start_group, wait_until


class MlflowServer:
    """``mlflow server`` with ``--backend-store-uri sqlite:///<folder>/mlflow.db`` and proxied artifacts."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"), "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        self.starts += 1
        self.process = start_group(command, log=self.folder / f"server-{self.starts}.log", env=env)
        up = wait_until(
            lambda: self.process.poll() is not None or http_get(f"{self.uri}/health") == (200, "OK"), timeout=timeout
        )
        if not up or self.process.poll() is not None:
            self.kill()
            raise RuntimeError(f"mlflow server did not start:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (a crash: no shutdown handlers run) and reap it."""
        if self.process is None:
            return
        pgid = self.process.pid
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        wait_until(lambda: not group_members(pgid), timeout=30)
        self.process = None

    def log_tail(self) -> str:
        logs = sorted(self.folder.glob("server-*.log"))
        return logs[-1].read_text(errors="replace")[-3000:] if logs else ""
