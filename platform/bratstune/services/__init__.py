"""Local services for one machine: ``bratstune up`` starts a Ray head and an MLflow server on 127.0.0.1.

* :mod:`~bratstune.services.stack`: ``up`` / ``down`` / ``status`` and the ``endpoints.json`` record
  (read back, without importing Ray or MLflow, by :func:`bratstune.paths.endpoints`).
* :mod:`~bratstune.services.ray_head`, :mod:`~bratstune.services.mlflow_server`: each service.
* :mod:`~bratstune.services.processes`: process groups started, found and stopped by id.
"""
