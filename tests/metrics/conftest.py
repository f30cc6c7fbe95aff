"""Fixtures of the metric tests: the reference interpreter (.venv-ref) and a batch runner for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("_reference_driver.py")


def reference_python() -> Path | None:
    """The reference venv's interpreter (``REF_VENV`` env var or ``<repo>/.venv-ref``), if installed."""
    venv = Path(os.environ.get("REF_VENV", REPO_ROOT / ".venv-ref"))
    if not venv.is_absolute():
        venv = REPO_ROOT / venv
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    return python if python.exists() else None


@pytest.fixture(scope="session")
def reference_runner():
    """``run(cases, workdir) -> {case_id: result}``: one subprocess in .venv-ref for a whole batch.

    ``cases``: dicts with ``id``, ``kind``, ``pred``/``gt`` arrays, ``spacing`` and ``config``.
    Fails (never skips) when CI is set and the reference venv is missing: `make test` builds it.
    """
    python = reference_python()
    if python is None:
        message = "reference venv .venv-ref is missing: run `make ref-venv` (make test builds it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)

    def run(cases: list[dict], workdir: Path) -> dict:
        workdir.mkdir(parents=True, exist_ok=True)
        job = []
        for case in cases:
            entry = {k: v for k, v in case.items() if k not in ("pred", "gt")}
            for key in ("pred", "gt"):
                path = workdir / f"{case['id']}_{key}.npy"
                np.save(path, np.ascontiguousarray(case[key]))
                entry[key] = str(path)
            entry["spacing"] = [float(s) for s in case["spacing"]]
            job.append(entry)
        job_path = workdir / "job.json"
        out_path = workdir / "out.json"
        job_path.write_text(json.dumps({"cases": job}))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["OMP_NUM_THREADS"] = "1"
        proc = subprocess.run(
            [str(python), str(DRIVER), str(job_path), str(out_path)],
            capture_output=True,
            text=True,
            env=env,
            cwd=str(workdir),
            timeout=1800,
        )
        if proc.returncode != 0:
            raise AssertionError(f"reference driver failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        raw = json.loads(out_path.read_text())
        return _decode(raw)

    return run


def _decode(value):
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if value in ("inf", "-inf", "nan"):
        return float(value)
    return value
