"""Where the embedded defaults live, resolved lazily (importing touches no disk).

`BRATSTUNE_HOME` (default `./.bratstune`) holds the MLflow SQLite store, its artifacts,
the preprocessing cache and Ray Tune results; `BRATSTUNE_CACHE` and `BRATSTUNE_DATA`
override the cache and the data folder on their own. `endpoints()` reads the addresses that
`bratstune up` recorded (`<home>/endpoints.json`) for the services it started.
"""

from __future__ import annotations

import json
import os
from collections.abc import MutableMapping
from pathlib import Path

from bratstune.errors import DataError


def home() -> Path:
    """The platform's working folder (absolute)."""
    return Path(os.environ.get("BRATSTUNE_HOME", ".bratstune")).expanduser().resolve()


def cache_dir() -> Path:
    """Root of the preprocessed-case cache."""
    env = os.environ.get("BRATSTUNE_CACHE")
    return Path(env).expanduser().resolve() if env else home() / "cache"


def data_dir() -> Path:
    """Default folder for generated or user cohorts."""
    env = os.environ.get("BRATSTUNE_DATA")
    return Path(env).expanduser().resolve() if env else home() / "data"


def results_dir() -> Path:
    """Default Ray Tune `storage_path` and job outputs."""
    return home() / "results"


# -- endpoints of `bratstune up` (a local Ray head and MLflow server) --------------------------------

ENDPOINTS_FILE = "endpoints.json"


def output_folder(path: str | Path, *, option: str = "--out") -> Path:
    """``path`` as an output folder (created); a DataError naming it when it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DataError(path, f"{option}: exists and is not a folder; give a folder (new or earlier output)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:  # a parent is a file
        raise DataError(path, f"{option}: cannot create the folder ({exc.strerror})") from None
    return path


def output_file(path: str | Path, *, option: str) -> Path:
    """``path`` as an output file (its folder created); a DataError naming it when it is a folder."""
    path = Path(path)
    if path.is_dir():
        raise DataError(path, f"{option}: is a folder; give a file name")
    output_folder(path.parent, option=option)
    return path


def endpoints_file() -> Path:
    """Where ``bratstune up`` records the addresses and PIDs of what it started."""
    return home() / ENDPOINTS_FILE


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def endpoints() -> dict[str, str]:
    """Addresses of the services ``bratstune up`` started, while they run; ``{}`` otherwise.

    Reads ``<home>/endpoints.json`` (plain JSON, no Ray or MLflow import). A service counts only
    while the process it was started as is alive, so a file left behind by a reboot is ignored; a
    shared MLflow server that ``up`` was pointed at (``external``) counts while the Ray head runs.

    Returns:
        ``{"MLFLOW_TRACKING_URI": "http://127.0.0.1:PORT", "RAY_ADDRESS": "127.0.0.1:PORT"}``, each
        key present only when its service runs. The keys are the environment variables they stand for.
    """
    try:
        recorded = json.loads(endpoints_file().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(recorded, dict):
        return {}
    ray = recorded.get("ray") if isinstance(recorded.get("ray"), dict) else {}
    found: dict[str, str] = {}
    for name, key, variable in (("mlflow", "tracking_uri", "MLFLOW_TRACKING_URI"), ("ray", "address", "RAY_ADDRESS")):
        service = recorded.get(name)
        if not isinstance(service, dict) or not isinstance(service.get(key), str):
            continue
        # a shared MLflow server that `up` did not start counts while the head it serves runs
        if _alive(service.get("pid")) or (service.get("external") and _alive(ray.get("pid"))):
            found[variable] = service[key]
    return found


def use_endpoints(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Point this process at ``bratstune up``'s services where no address is set explicitly.

    For job drivers, before ``ray.init`` and MLflow set-up: sets ``RAY_ADDRESS`` and
    ``MLFLOW_TRACKING_URI`` only where they are unset (an explicit ``--address`` passed to
    ``ray.init`` still wins), and ``RAY_AUTH_MODE=disabled`` with ``RAY_ADDRESS`` (the head runs
    without token auth). Worker processes inherit the variables.

    Args:
        environ: the environment to update (default ``os.environ``).

    Returns:
        The variables that were set (empty when nothing runs or everything was set already).
    """
    env = os.environ if environ is None else environ
    applied = {k: v for k, v in endpoints().items() if not env.get(k)}
    if "RAY_ADDRESS" in applied and not env.get("RAY_AUTH_MODE"):
        applied["RAY_AUTH_MODE"] = "disabled"
    env.update(applied)
    return applied


#: Ray rewrites 127.0.0.1 to the machine's external address and binds every interface unless this
#: is set before Ray is imported (see STACK-NOTES): a local Ray must stay on loopback.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_ray_on_loopback(environ: MutableMapping[str, str] | None = None) -> None:
    """Keep a local Ray on 127.0.0.1. Call before ``import ray``; an explicit setting wins."""
    env = os.environ if environ is None else environ
    for key, value in RAY_LOOPBACK.items():
        env.setdefault(key, value)
