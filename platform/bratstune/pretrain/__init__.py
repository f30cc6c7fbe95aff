"""pretrain: MAE pre-training of a ViT encoder on Ray Train, export and registration.

* :mod:`.config`: :class:`~.config.PretrainConfig`; :mod:`.data`: unlabelled volumes and crops;
* :mod:`.model`: the 3-D masked autoencoder; :mod:`.worker`: one DDP worker's loop;
* :mod:`.run`: the driver (:func:`~.run.run_mae`); :mod:`.export`: encoder file, picture, registry.

Importing this package imports nothing; import the module you need.
"""

__all__ = ["config", "data", "export", "model", "run", "worker"]
