"""``ray start``, for a second Ray node on this machine that stays on 127.0.0.1.

    python tests/cluster/_ray_start.py start --address=127.0.0.1:PORT --num-cpus=1 ...

Why a wrapper: Ray keeps a node on loopback only while ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``
(``ray._private.services.get_node_ip_address`` then answers 127.0.0.1, the GCS, raylet and object
manager bind to it, and ``--address=127.0.0.1:PORT`` is not rewritten to the machine's external
address). With that setting, though, ``ray start --address`` refuses to start a worker node
("Multi-node Ray clusters are not supported on Windows and OSX"): one check in
``ray/scripts/scripts.py::start`` reads ``ray_constants.ENABLE_RAY_CLUSTER``. With the variable at
``1`` instead, the node passes that check but resolves 127.0.0.1 to the external address and
talks to it (measured: ``Failed to connect to GCS at address 192.0.2.2:PORT``).

So this runs Ray's own ``ray start`` command with the variable at ``0`` everywhere, and only the
name ``ray_constants`` *inside the CLI module* sees ``ENABLE_RAY_CLUSTER = True`` (it is read
there only by that check and by a hint the head prints). Every address decision stays Ray's, made
with the loopback setting; the test checks the listening and peer addresses of every process.
"""

from __future__ import annotations

import os
import sys
import types

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: read at import

import ray._private.ray_constants as ray_constants  # noqa: E402
from ray.scripts import scripts  # noqa: E402


class _CliConstants(types.ModuleType):
    """``ray_constants`` as the CLI module sees it: the same, but multi-node allowed."""

    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name: str) -> object:
        return getattr(ray_constants, name)


scripts.ray_constants = _CliConstants("ray_constants")

if __name__ == "__main__":
    sys.exit(scripts.main())
