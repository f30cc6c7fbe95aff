"""Fault injection for the search tests: a ``fit`` that fails for exactly one trial.

The first trial that calls it claims ``marker`` (atomic create) and raises every time it runs,
retries included; every other trial trains normally. Shipped to Ray workers by value
(``cloudpickle.register_pickle_by_value``), since tests/ is not importable there.
"""

from __future__ import annotations

import os
from pathlib import Path


class InjectedFailure(RuntimeError):
    pass


def fail_one_trial(config, data, reporter=None, *, marker: str, **kwargs):
    from ray import tune

    from bratstune.training.fit import fit

    trial_id = tune.get_context().get_trial_id()
    path = Path(marker)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        owner = path.read_text().strip()
        if owner == trial_id or not owner:
            raise InjectedFailure(f"injected failure in trial {trial_id} (retry)") from None
        return fit(config, data, reporter, **kwargs)
    with os.fdopen(fd, "w") as fh:
        fh.write(trial_id)
    raise InjectedFailure(f"injected failure in trial {trial_id}")
