"""What every job shares: ``bratstune`` importable, one Ray/MLflow session, one error tail.

``python jobs/x.py`` from a checkout, or ``ray job submit --working-dir . -- python jobs/x.py``
(the working dir is unpacked elsewhere and becomes the cwd): in both cases the package source is
``<repo>/platform/bratstune``, and ``platform/`` is a source root, not a package. Importing this
module puts ``<repo>/platform`` first on ``sys.path`` (so the driver runs the code it was shipped
with, even when an older ``bratstune`` is installed) and keeps Ray on loopback; import it before
anything that imports ``ray``. Then, in a job::

    @_bootstrap.error_tail                     # BratstuneError -> "<job>: error: ..." on stderr, exit 2
    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        with _bootstrap.session(experiment="bratstune-search", address=args.address, num_cpus=args.num_cpus) as s:
            outcome = run_search(spec, data, experiment_id=s.experiment_id)

:func:`session` joins the cluster at ``--address`` / ``$RAY_ADDRESS`` / the head ``bratstune up``
started, or starts a local Ray (only
then with resource options such as ``num_cpus``: Ray refuses them when joining a cluster), ships
this checkout's ``bratstune`` to the workers (:func:`runtime_env`), sets up MLflow in the driver
(schema once, absolute artifact location) and shuts Ray down when the job ends.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
PACKAGE = PLATFORM / "bratstune"

if PACKAGE.is_dir() and str(PLATFORM) not in sys.path:
    sys.path.insert(0, str(PLATFORM))

# Importable only now that platform/ is on sys.path.
from bratstune import paths  # noqa: E402

# Ray binds to the machine's external address unless told to stay on loopback (STACK-NOTES); it
# reads this when it is imported, so it is set before anything below imports ray.
paths.keep_ray_on_loopback()

from bratstune.errors import BratstuneError  # noqa: E402
from bratstune.tracking import runs as tracking  # noqa: E402

__all__ = ["ROOT", "Session", "error_tail", "fail", "runtime_env", "session"]


def runtime_env() -> dict:
    """``ray.init(runtime_env=...)``: ship this checkout's ``bratstune`` to every worker."""
    if not PACKAGE.is_dir():
        return {}
    return {"py_modules": [str(PACKAGE)]}


@dataclass(frozen=True)
class Session:
    """What :func:`session` set up.

    Attributes:
        address: the Ray cluster joined (``None``: a local Ray was started, or no Ray).
        experiment_id: the MLflow experiment (``None`` without ``experiment``).
        tracking_uri: the MLflow store (``$MLFLOW_TRACKING_URI`` or the embedded SQLite store).
    """

    address: str | None
    experiment_id: str | None
    tracking_uri: str


@contextlib.contextmanager
def session(
    *, experiment: str | None = None, ray: bool = True, address: str | None = None, **local: Any
) -> Iterator[Session]:
    """Ray (joined or started here) and MLflow for one job; Ray is shut down when the block ends.

    Args:
        experiment: MLflow experiment set up in the driver (``tracking.setup_mlflow``); ``None``: none.
        ray: start or join Ray (``False``: MLflow only).
        address: Ray address; default ``$RAY_ADDRESS``; neither: start a local Ray.
        **local: ``ray.init`` options used only when starting a local Ray (``num_cpus``,
            ``_temp_dir``, ``log_to_driver`` ...); ``None`` values are left out.
    """
    # `bratstune up`'s Ray head and MLflow server, where no address is set explicitly.
    paths.use_endpoints()
    if experiment:  # an unreachable MLflow server: one line in seconds, before Ray starts
        tracking.check_reachable(tracking.tracking_uri())
    started = False
    if ray:
        # Deferred: importing Ray takes seconds, which jobs without Ray and --help should not pay.
        import ray as ray_  # noqa: PLC0415

        address = address or os.environ.get("RAY_ADDRESS") or None
        options: dict[str, Any] = {"address": address, "runtime_env": runtime_env()}
        if not address:
            options.update({"include_dashboard": False, **{k: v for k, v in local.items() if v is not None}})
        ray_.init(**options)
        started = True
    try:
        experiment_id = tracking.setup_mlflow(experiment) if experiment else None
        yield Session(address if ray else None, experiment_id, tracking.tracking_uri())
    finally:
        if started and ray_.is_initialized():
            ray_.shutdown()


def fail(exc: BaseException, job: str | None = None) -> int:
    """The error tail of every job: ``<job>: error: <message>`` as one line on stderr; returns 2.

    The same shape and exit code as an argparse usage error.
    """
    job = job or os.path.basename(sys.argv[0]) or "job"
    message = " ".join(str(exc).split())
    print(f"{job}: error: {message}", file=sys.stderr)
    return 2


def error_tail(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a job's ``main``: a :class:`~bratstune.errors.BratstuneError` becomes :func:`fail`."""

    @functools.wraps(main)
    def guarded(*args: Any, **kwargs: Any) -> int:
        try:
            return main(*args, **kwargs)
        except BratstuneError as exc:
            return fail(exc)

    return guarded
