"""training: ``fit`` and its pieces; knows nothing of Ray, MLflow or tracking (a reporter callback).

* :mod:`.config`: :class:`~.config.TrainConfig`, typed from YAML (losses validated once, in
  :class:`~.config.LossConfig`);
* :mod:`.network`: the config's network, initial weights, frozen groups;
* :mod:`.losses`: the compound loss (Dice, focal, focal-Tversky, CE, MSE, edge), deep supervision;
* :mod:`.loader` and :mod:`.schedules`: background patch loading; optimiser and lr schedule;
* :mod:`.checkpoint`: resumable state and best-model folders;
* :mod:`.validate`: sliding-window validation with lesion-wise metrics;
* :mod:`.fit`: the one training loop; :mod:`.report`: what it reports and returns.

Importing this package imports nothing; import the module you need.
"""

__all__ = ["checkpoint", "config", "fit", "loader", "losses", "network", "report", "schedules", "validate"]
