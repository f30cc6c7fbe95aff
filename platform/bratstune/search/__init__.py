"""search: Ray Tune + Optuna over YAML search spaces, decode (threshold) search, cross-validation.

Importing this package imports nothing heavy; import the module you need. In the order a search
runs:

* :mod:`.params`: one ``params:`` entry: distributions, conditions, derived expressions, dotted paths;
* :mod:`.sections`: the sections both kinds of space share (``search``, ``data``, ``resources``,
  ``scheduler``, ``failure``) and :func:`~.sections.make_sampler`;
* :mod:`.space`: ``kind: train`` spaces -> :class:`~.space.SearchSpec` (``load_search_space``);
* :mod:`.threshold_space`: ``kind: thresholds`` spaces -> :class:`~.threshold_space.ThresholdSpec`;
* :mod:`.data`: the cohort prepared once for every trial (:class:`~.data.DataHandle`);
* :mod:`.trial`: one trial = one ``fit(config)`` (:func:`~.trial.run_trial`);
* :mod:`.reporter`: :class:`~.reporter.MlflowReporter`, ``fit``'s epoch reporter for MLflow;
* :mod:`.callback`: the driver-side callback that closes each trial's MLflow run;
* :mod:`.tune`: the Tuner (:func:`~.tune.build_tuner`), :func:`~.tune.run_search` and resume;
* :mod:`.parent_run`: the search's MLflow parent run; :mod:`.results`: table, best config, plots,
  :class:`~.results.SearchOutcome`;
* :mod:`.thresholds`: decode search on cached probabilities (``DecodeSettings`` per trial);
  :mod:`.threshold_job`: a finished model's probabilities, the search and its MLflow run;
* :mod:`.crossval`: k folds -> out-of-fold probabilities -> decode tuning -> ensemble -> registry.
"""

__all__ = [
    "callback",
    "crossval",
    "data",
    "params",
    "parent_run",
    "reporter",
    "results",
    "sections",
    "space",
    "threshold_job",
    "threshold_space",
    "thresholds",
    "trial",
    "tune",
]
