"""tracking: MLflow at the edges.

* :mod:`.runs`: the tracking URI, experiment set-up, runs with their tags, config logging;
* :mod:`.artifacts`: the one resolver of a path / run id / ``runs:/`` / ``models:/`` -> local folder,
  and :func:`~.artifacts.localise_config` (URIs in a training config resolved before ``fit``).
"""

__all__ = ["artifacts", "runs"]
