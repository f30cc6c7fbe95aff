"""tracking: MLflow at the edges.

* :mod:`.runs`: the tracking URI, experiment set-up, runs with their tags, config logging;
* :mod:`.artifacts`: the one resolver of a path / run id / ``runs:/`` / ``models:/`` -> local folder
  (a registered package checked against its recorded digest before anything reads it), and
  :func:`~.artifacts.localise_config` (URIs in a training config resolved before ``fit``);
* :mod:`.model_package`: register a models-from-code package with its digest; load one verified;
* :mod:`.filters`: MLflow filter strings quoted from user-given names;
* :mod:`.outage`: logging to a run across a tracking-server outage (buffered, kept on disk, sent
  when the server returns, or reported).
"""

__all__ = ["artifacts", "filters", "model_package", "outage", "runs"]
