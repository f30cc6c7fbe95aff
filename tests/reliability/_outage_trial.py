"""Fault injection for the tracking-outage search test: trials signal their epochs through files.

Each trial's reporter writes ``<marker dir>/<trial id>-<epoch>`` after every epoch it logged, and
after its first epoch waits (bounded) until the test has killed the server (``killed`` exists),
so every trial trains epochs during the outage. Shipped to Ray workers by value
(``cloudpickle.register_pickle_by_value``), since tests/ is not importable there.
"""

from __future__ import annotations

import time
from pathlib import Path


def fit_through_outage(config, data, reporter=None, *, markers: str, **kwargs):
    from ray import tune

    from bratstune.training.fit import fit

    trial_id, folder = tune.get_context().get_trial_id(), Path(markers)

    def report(epoch):
        reporter(epoch)  # MLflow (buffered), then tune.report
        (folder / f"{trial_id}-{epoch.epoch}").write_text(str(time.time()))
        if epoch.epoch == 1:
            deadline = time.monotonic() + 300
            while not (folder / "killed").exists() and time.monotonic() < deadline:
                time.sleep(0.2)

    return fit(config, data, report, **kwargs)
