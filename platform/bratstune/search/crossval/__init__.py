"""k-fold cross-validation of one config -> tuned, packaged (and optionally promoted) ensemble.

::

    from bratstune.search import crossval

    spec = crossval.CrossValSpec(folds=5, register="bratstune-gli", promote=True)
    outcome = crossval.cross_validate(best_config, Path("data/GLI"), spec)   # Ray must be initialised

One module per stage, in the order they run:

* :mod:`.spec`: :class:`CrossValSpec` (YAML / the job's flags) and the training config;
* :mod:`.folds`: the cohort preprocessed once, cut into k stratified folds;
* :mod:`.fold_trials`: one Ray Tune trial per fold (a search trial on the fold's split);
* :mod:`.oof`: out-of-fold probabilities, written by the trials, pooled by the driver;
* :mod:`.decode_tuning`: thresholds + post-processing tuned on the pooled OOF probabilities;
* :mod:`.packaging`: the fold models as one ensemble; registration and promotion;
* :mod:`.parent_run`: what the CV parent MLflow run records; :mod:`.run`: the driver.
"""

from __future__ import annotations

from bratstune.search.crossval.oof import load_oof
from bratstune.search.crossval.packaging import DEFAULT_METRIC
from bratstune.search.crossval.run import CVOutcome, cross_validate, demo_cross_validate
from bratstune.search.crossval.spec import (
    DEFAULT_THRESHOLD_SPACE,
    CrossValSpec,
    load_crossval_spec,
    resolve_config,
    smoke_config,
)

__all__ = [
    "DEFAULT_METRIC",
    "DEFAULT_THRESHOLD_SPACE",
    "CVOutcome",
    "CrossValSpec",
    "cross_validate",
    "demo_cross_validate",
    "load_crossval_spec",
    "load_oof",
    "resolve_config",
    "smoke_config",
]
