"""A ``fit`` that records where each attempt of a trial runs, for the two-node test.

Every attempt appends ``start`` (trial id, Ray node id, PID, whether it resumed from a
checkpoint) and, after each epoch has been reported to Tune (and its checkpoint persisted),
``reported`` lines to a JSON-lines file on the shared disk. An attempt on ``hold_node`` waits
after its first report, so the test's node kill always lands mid-trial (a fast machine could
otherwise finish all epochs between the report and the kill). Shipped to the Ray workers by value
(``cloudpickle.register_pickle_by_value``), since tests/ is not importable there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def _append(log: str, event: dict) -> None:
    with open(log, "a") as out:  # one short line per write: O_APPEND keeps lines whole
        out.write(json.dumps(event) + "\n")


def record_attempts(config, data, reporter=None, *, log: str, hold_node: str | None = None, **kwargs):
    import ray
    from ray import tune

    from bratstune.training.fit import fit

    trial_id = tune.get_context().get_trial_id()
    node_id = ray.get_runtime_context().get_node_id()
    where = {"trial_id": trial_id, "node_id": node_id, "pid": os.getpid()}
    _append(log, {"event": "start", "resumed": kwargs.get("resume_from") is not None, **where})

    def report(epoch):
        if reporter is not None:
            reporter(epoch)
        _append(log, {"event": "reported", "epoch": epoch.epoch, **where})
        if node_id == hold_node:
            time.sleep(300)  # the test kills this node long before; the bound only stops a runaway

    return fit(config, data, report, **kwargs)


def read_events(log: Path) -> list[dict]:
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
