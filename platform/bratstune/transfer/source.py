"""The source of a transfer: a trained model from the registry, a run or a folder, and its head remapped by channel name.

See :mod:`bratstune.transfer` for the whole workflow.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bratstune.config_utils import load_yaml
from bratstune.data.case import MODALITIES
from bratstune.ensemble.package import ENSEMBLE_FILE
from bratstune.ensemble.registry import load_ensemble, resolve_member_source
from bratstune.errors import DataError
from bratstune.inference.outputs import label_values
from bratstune.labels import get_scheme, scheme_for
from bratstune.models import layer_groups
from bratstune.training.config import TrainConfig, load_train_config
from bratstune.training.network import build_network, load_network

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class SourceModel:
    """The model fine-tuning starts from.

    Attributes:
        model: the network (CPU, eval mode).
        config: its resolved :class:`TrainConfig`.
        scheme: the label scheme it predicts.
        modalities: the input modalities it needs, in channel order.
        origin: where it came from (URI or folder), for lineage.
    """

    model: torch.nn.Module
    config: TrainConfig
    scheme: Any
    modalities: tuple[str, ...] = ()
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- loading the source -------------------------------------------------------------------------


def _scheme(value: Any) -> Any:

    return get_scheme(value) if isinstance(value, str) else value


def _model_folder(folder: Path) -> Path:
    """A folder ``load_network`` reads: the folder itself, its ``best/``, or its latest checkpoint."""
    if (folder / "config.yaml").is_file():
        return folder
    if (folder / "best" / "config.yaml").is_file():
        return folder / "best"
    checkpoints = sorted((folder / "checkpoints").glob("epoch_*")) if (folder / "checkpoints").is_dir() else []
    if checkpoints and (checkpoints[-1] / "config.yaml").is_file():
        return checkpoints[-1]
    raise DataError(
        folder,
        "not a trained model folder (expected config.yaml + model.pt, a fit output folder with "
        "best/ or checkpoints/, or an ensemble folder with ensemble.json)",
    )


def _folder_scheme(folder: Path, scheme_hint: Any) -> Any:

    if scheme_hint is not None:
        return _scheme(scheme_hint)
    raw = load_yaml(folder / "config.yaml") or {}
    challenge = raw.get("challenge") if isinstance(raw, Mapping) else None
    return scheme_for(challenge) if challenge else get_scheme("brats2023")


def load_source(
    source: str | Path, scheme_hint: Any = None, *, member: int = 0, dst: Path | None = None
) -> SourceModel:
    """Load the model to fine-tune (see the module docstring).

    Args:
        source: ``models:/...`` / ``runs:/.../ensemble`` / ensemble folder, or a model folder / run id.
        scheme_hint: label scheme (name or object) of a plain model folder; default from the
            folder's ``config.yaml`` ``challenge`` (else ``brats2023``). Ensembles record theirs.
        member: which ensemble member to take.
        dst: where MLflow downloads go (default a temporary folder).

    Raises:
        DataError: nothing loadable there, or no such member.
    """

    text = str(source)
    local = Path(text).expanduser()
    is_ensemble = (
        (local.is_dir() and (local / ENSEMBLE_FILE).is_file())
        or text.startswith("models:/")
        or (text.startswith("runs:/") and text.rstrip("/").endswith("/ensemble"))
    )
    if is_ensemble:
        loaded = load_ensemble(text, dst=dst)
        members = loaded.ensemble.members
        if not 0 <= member < len(members):
            raise DataError(
                None,
                f"{text}: member {member} requested, the ensemble has {len(members)} ({[m.name for m in members]})",
            )
        chosen = members[member]
        logger.info("source %s: member %d (%s) of %d", loaded.label, member, chosen.name, len(members))
        return SourceModel(
            model=chosen.model.cpu().eval(),
            config=load_train_config(chosen.config),
            scheme=loaded.ensemble.scheme,
            modalities=tuple(loaded.ensemble.modalities),
            origin=loaded.label,
            extra={"member": chosen.name, "challenge": loaded.ensemble.challenge},
        )
    if not local.is_dir():
        if not (_RUN_ID.fullmatch(text) or text.startswith("runs:/")):
            raise DataError(local, "no such model folder, and not a models:/ URI, runs:/ URI or MLflow run id")
        local = resolve_member_source(text, dst=dst)
    folder = _model_folder(local)
    scheme = _folder_scheme(folder, scheme_hint)
    model, config = load_network(folder, scheme)
    in_channels = model_in_channels(model)
    modalities = tuple(MODALITIES[:in_channels]) if in_channels is not None else tuple(MODALITIES)
    logger.info("source %s (%s, scheme %s)", folder, config.model.name, scheme.name)
    return SourceModel(
        model=model.cpu().eval(), config=config, scheme=scheme, modalities=modalities, origin=str(folder)
    )


def model_in_channels(model: torch.nn.Module) -> int | None:
    for param in model.parameters():
        if param.ndim == 5:
            return int(param.shape[1])
    return None


# -- head remapping -----------------------------------------------------------------------------


def channel_names(config: TrainConfig, scheme: Any) -> tuple[str, ...]:
    """Names of the output channels: region mode ``train_regions``; label mode background + labels."""
    if config.loss.mode == "region":
        return tuple(scheme.train_regions)

    return ("background", *(str(scheme.labels[v]) for v in label_values(scheme)))


def _head_prefixes(model: torch.nn.Module) -> list[str]:

    return list(layer_groups(model).get("head", []))


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def remap_head(
    model: torch.nn.Module, config: TrainConfig, src_scheme: Any, dst_scheme: Any, *, in_channels: int | None = None
) -> tuple[torch.nn.Module, dict[str, str | None]]:
    """A network for ``dst_scheme`` initialised from ``model`` (trained for ``src_scheme``).

    Returns:
        ``(network, mapping)`` with ``mapping[target channel] = source channel or None``
        (re-initialised). When the channels are identical the input model is returned as is.

    Raises:
        DataError: a non-head tensor has a different shape in the target network.
    """

    src_scheme, dst_scheme = _scheme(src_scheme), _scheme(dst_scheme)
    src_names, dst_names = channel_names(config, src_scheme), channel_names(config, dst_scheme)
    mapping = {name: (name if name in src_names else None) for name in dst_names}
    if src_names == dst_names:
        logger.info(
            "label schemes %s -> %s: same output channels %s, head kept",
            src_scheme.name,
            dst_scheme.name,
            list(dst_names),
        )
        return model, mapping
    in_channels = in_channels if in_channels is not None else (model_in_channels(model) or 4)
    target = build_network(config, dst_scheme, in_channels=in_channels)
    src_state, dst_state = model.state_dict(), target.state_dict()
    prefixes = _head_prefixes(target)
    head_ptrs = {t.data_ptr() for k, t in dst_state.items() if _under(k, prefixes)}
    # DynUNet also registers its deep-supervision heads as skip_layers.*.super_head (same modules)
    heads = [k for k, t in dst_state.items() if _under(k, prefixes) or t.data_ptr() in head_ptrs]
    n_src, n_dst = len(src_names), len(dst_names)
    new_state: dict[str, torch.Tensor] = {}
    rows = [(dst_names.index(d), src_names.index(s)) for d, s in mapping.items() if s is not None]
    for name, dst_tensor in dst_state.items():
        src_tensor = src_state.get(name)
        if src_tensor is None:
            raise DataError(None, f"remap_head: tensor {name} of the target network is not in the source model")
        if tuple(src_tensor.shape) == tuple(dst_tensor.shape) and not (
            name in heads and dst_tensor.ndim >= 1 and n_src == n_dst and dst_tensor.shape[0] == n_dst
        ):
            new_state[name] = src_tensor.clone()
            continue
        if (
            name in heads
            and dst_tensor.ndim >= 1
            and src_tensor.shape[0] == n_src
            and dst_tensor.shape[0] == n_dst
            and tuple(src_tensor.shape[1:]) == tuple(dst_tensor.shape[1:])
        ):
            out = dst_tensor.clone()
            for d, s in rows:
                out[d] = src_tensor[s]
            new_state[name] = out
            continue
        raise DataError(
            None,
            f"remap_head: {name} has shape {list(src_tensor.shape)} in the source and "
            f"{list(dst_tensor.shape)} in the target network (only output rows can differ)",
        )
    target.load_state_dict(new_state)
    kept = {d: s for d, s in mapping.items() if s is not None}
    fresh = [d for d, s in mapping.items() if s is None]
    dropped = [s for s in src_names if s not in dst_names]
    logger.info(
        "label schemes %s -> %s: channels mapped by name %s; re-initialised %s; dropped %s",
        src_scheme.name,
        dst_scheme.name,
        kept,
        fresh or "none",
        dropped or "none",
    )
    return target.eval(), mapping
