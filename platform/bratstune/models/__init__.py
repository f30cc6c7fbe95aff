"""Architecture factory and named layer groups.

``build_model(name, in_channels, out_channels, **kw)`` builds a MONAI network by name;
``layer_groups`` / ``freeze`` / ``trainable_parameters`` work on the named groups
``encoder``, ``middle``, ``decoder``, ``head`` of every architecture. ``transunet_dec`` (in
:data:`QUERY_ARCHITECTURES`) returns a query set in training mode, trained with the Hungarian
loss of ``bratstune.training.mask_loss``; in eval mode it returns region logits like the others.
``network`` rebuilds a trained network from its saved training config (:class:`NetworkSpec`, :func:`build_network`,
:func:`load_model_weights`) without importing the training loop.
"""

from __future__ import annotations

from bratstune.models.factory import (
    ARCHITECTURES,
    architecture_options,
    build_model,
    count_parameters,
)
from bratstune.models.freeze import (
    freeze,
    frozen_parameter_names,
    set_train_mode,
    trainable_parameters,
    unfreeze,
)
from bratstune.models.groups import GROUPS, architecture_of, group_of, layer_groups, parameter_groups
from bratstune.models.network import NetworkSpec, build_network, load_model_weights, output_channels
from bratstune.models.topology import nnunet_topology
from bratstune.models.transunet import QUERY_ARCHITECTURES

__all__ = [
    "ARCHITECTURES",
    "GROUPS",
    "QUERY_ARCHITECTURES",
    "NetworkSpec",
    "architecture_of",
    "architecture_options",
    "build_model",
    "build_network",
    "count_parameters",
    "freeze",
    "frozen_parameter_names",
    "group_of",
    "layer_groups",
    "load_model_weights",
    "nnunet_topology",
    "output_channels",
    "parameter_groups",
    "set_train_mode",
    "trainable_parameters",
    "unfreeze",
]
