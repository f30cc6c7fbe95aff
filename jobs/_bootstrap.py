"""Make ``bratstune`` importable for a job, however it is started.

``python jobs/x.py`` from a checkout, or ``ray job submit --working-dir . -- python jobs/x.py``
(the working dir is unpacked elsewhere and becomes the cwd): in both cases the package source is
``<repo>/platform/bratstune``, and ``platform/`` is a source root, not a package. Importing this
module puts ``<repo>/platform`` first on ``sys.path`` (so the driver runs the code it was shipped
with, even when an older ``bratstune`` is installed), and :func:`runtime_env` ships the same
package to Ray's workers as a ``py_modules`` entry (merged with the job's ``working_dir``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
PACKAGE = PLATFORM / "bratstune"

# Ray binds to the machine's external address unless told to stay on loopback (see STACK-NOTES).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

if PACKAGE.is_dir() and str(PLATFORM) not in sys.path:
    sys.path.insert(0, str(PLATFORM))


def runtime_env() -> dict:
    """``ray.init(runtime_env=...)``: ship this checkout's ``bratstune`` to every worker."""
    if not PACKAGE.is_dir():
        return {}
    return {"py_modules": [str(PACKAGE)]}
