"""Fault injection for the trial-SIGKILL test: the first trial's first attempt writes its PID and waits.

The first trial that calls it claims ``marker`` (atomic create), writes ``<trial id> <pid>`` and
sleeps until the test SIGKILLs that process from outside (the bound only stops a runaway). Its retry
(same trial id, a new worker process) and every other trial train normally. Shipped to Ray workers
by value (``cloudpickle.register_pickle_by_value``), since tests/ is not importable there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def wait_to_be_killed(config, data, reporter=None, *, marker: str, **kwargs):
    from ray import tune

    from bratstune.training.fit import fit

    trial_id = tune.get_context().get_trial_id()
    path = Path(marker)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return fit(config, data, reporter, **kwargs)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{trial_id} {os.getpid()}")
    time.sleep(300)
    raise RuntimeError("the test did not kill this trial")
