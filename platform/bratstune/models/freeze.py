"""Freezing layer groups by name, with frozen normalisation statistics kept fixed.

``freeze(model, ["encoder"])`` does two things to every module under the group's prefixes
(see :mod:`bratstune.models.groups`):

1. ``requires_grad = False`` on its parameters — build the optimiser from
   :func:`trainable_parameters` so that weight decay / momentum never touch them;
2. every normalisation module with running statistics (``BatchNorm*``, ``InstanceNorm*``,
   i.e. ``torch.nn.modules.batchnorm._NormBase``) is put in eval mode **and kept there**: a
   forward pre-hook sets ``module.training = False`` before each of its forward calls, so
   ``model.train()`` in the training loop cannot make it update ``running_mean`` /
   ``running_var`` / ``num_batches_tracked`` again. :func:`set_train_mode` switches the whole
   model and re-applies eval mode to frozen norms at once (for code that inspects
   ``.training`` between forward passes). Dropout inside frozen groups is left as is.

:func:`unfreeze` undoes both. The hook is a module-level function guarded by a flag on the
module, so frozen models still ``copy.deepcopy`` and pickle (Ray, MLflow).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from bratstune.models.groups import GROUPS, check_group_names, layer_groups

__all__ = [
    "freeze",
    "frozen_parameter_names",
    "set_train_mode",
    "trainable_parameters",
    "unfreeze",
]

logger = logging.getLogger(__name__)

_FLAG = "_bratstune_frozen_norm"
_HOOKED = "_bratstune_eval_hook"


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: a frozen norm always runs in eval mode (running stats fixed)."""
    if getattr(module, _FLAG, False):
        module.training = False


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _prefixes(model: nn.Module, groups: Sequence[str]) -> list[str]:
    table = layer_groups(model)
    return [p for g in check_group_names(groups) for p in table[g]]


def freeze(model: nn.Module, groups: Sequence[str]) -> list[str]:
    """Freeze the parameters and normalisation statistics of the named layer groups.

    Args:
        model: a network from :func:`bratstune.models.build_model` (DDP-wrapped is fine).
        groups: any of ``encoder``, ``middle``, ``decoder``, ``head`` (a single string works).

    Returns:
        Names of the parameters of those groups (all now ``requires_grad=False``).

    Raises:
        ConfigError: unknown group name (with the nearest valid one).
    """
    prefixes = _prefixes(model, groups)
    frozen = []
    for name, param in model.named_parameters():
        if _under(name, prefixes):
            param.requires_grad_(False)
            frozen.append(name)
    norms = 0
    for name, module in model.named_modules():
        if isinstance(module, _NormBase) and _under(name, prefixes):
            setattr(module, _FLAG, True)
            if not getattr(module, _HOOKED, False):
                module.register_forward_pre_hook(_keep_eval)
                setattr(module, _HOOKED, True)
            module.eval()
            norms += 1
    logger.info("froze %s: %d parameter tensors, %d norm layers", list(groups), len(frozen), norms)
    return frozen


def unfreeze(model: nn.Module, groups: Sequence[str] | None = None) -> list[str]:
    """Undo :func:`freeze` for ``groups`` (default: all groups). Returns the parameter names."""
    prefixes = _prefixes(model, GROUPS if groups is None else groups)
    names = []
    for name, param in model.named_parameters():
        if _under(name, prefixes):
            param.requires_grad_(True)
            names.append(name)
    for name, module in model.named_modules():
        if getattr(module, _FLAG, False) and _under(name, prefixes):
            setattr(module, _FLAG, False)
            module.train(model.training)
    return names


def set_train_mode(model: nn.Module, mode: bool = True) -> nn.Module:
    """``model.train(mode)``, then put frozen normalisation layers back in eval mode.

    The forward pre-hook installed by :func:`freeze` already does this lazily; call this
    where the mode must be right before the next forward pass.
    """
    model.train(mode)
    for module in model.modules():
        if getattr(module, _FLAG, False):
            module.training = False
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad=True`` — what the optimiser should get."""
    return [p for p in model.parameters() if p.requires_grad]


def frozen_parameter_names(model: nn.Module) -> list[str]:
    """Names of parameters with ``requires_grad=False``."""
    return [n for n, p in model.named_parameters() if not p.requires_grad]
