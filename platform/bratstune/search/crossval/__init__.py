"""k-fold cross-validation of one config -> tuned, packaged (and optionally promoted) ensemble.

::

    from bratstune.search import crossval

    spec = crossval.CrossValSpec(folds=5, register="bratstune-gli", promote=True)
    outcome = crossval.cross_validate(best_config, Path("data/GLI"), spec)   # Ray must be initialised

One module per stage, in the order they run:

* :mod:`.spec`: :class:`CrossValSpec` (YAML / the job's flags) and the training config;
* :mod:`.folds`: the cohort preprocessed once; a gate split kept out; k folds, each with its
  training cases and the inner validation cases that choose its epoch (never its held-out ones);
* :mod:`.fold_trials`: one Ray Tune trial per fold (a search trial on the fold's split);
* :mod:`.oof`: out-of-fold probabilities, written by the trials, pooled by the driver;
* :mod:`.crossfit` + :mod:`.decode_tuning`: thresholds + post-processing cross-fitted (fold k
  decoded with settings tuned on the others: the honest ``cv/oos/*``) and tuned on all folds
  for deployment (``cv/in_sample/*``);
* :mod:`.packaging`: the fold models as one ensemble with its case record; registration and the gate;
* :mod:`.parent_run`: what the CV parent MLflow run records; :mod:`.run`: the driver;
* :mod:`.ensemble_selection`: selection across several cross-validated configurations
  (greedy / equal / best-N, cross-fitted) and the ensemble it deploys.
"""

from __future__ import annotations

from bratstune.search.crossval.decode_tuning import crossfit_decode, threshold_spec
from bratstune.search.crossval.ensemble_selection import (
    CrossFittedSelection,
    build_selected_ensemble,
    candidates_from_cv,
    crossfit_selection,
    log_selection,
)
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
    "CrossFittedSelection",
    "CrossValSpec",
    "build_selected_ensemble",
    "candidates_from_cv",
    "cross_validate",
    "crossfit_decode",
    "crossfit_selection",
    "demo_cross_validate",
    "load_crossval_spec",
    "load_oof",
    "log_selection",
    "resolve_config",
    "smoke_config",
    "threshold_spec",
]
