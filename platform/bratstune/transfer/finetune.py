"""Fine-tuning a source model on the target cohort, and the source-only baseline."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bratstune.errors import DataError
from bratstune.models.groups import check_group_names
from bratstune.training.config import TrainConfig, load_train_config
from bratstune.training.fit import fit, inference_settings
from bratstune.training.validate import validate
from bratstune.transfer.source import SourceModel, model_in_channels, remap_head

logger = logging.getLogger(__name__)

INIT_FILE = "source_init.pt"
TRANSFER_FILE = "transfer.json"


# -- fine-tuning --------------------------------------------------------------------------------


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if "." in key and key not in out:
            head, rest = key.split(".", 1)
            out[head] = _merge(dict(out.get(head) or {}), {rest: value})
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def finetune_config(
    source: SourceModel,
    config_overrides: Mapping[str, Any] | None,
    *,
    freeze: Sequence[str],
    init_file: Path | None,
    challenge: str | None,
) -> TrainConfig:
    """The fine-tuning config: the source's config, ``config_overrides`` (nested or dotted keys),
    ``init.encoder_from = init_file``, ``freeze`` and ``challenge``."""
    base = source.config.to_dict()
    base.pop("init", None)
    merged = _merge(base, dict(config_overrides or {}))
    merged["freeze"] = list(freeze)
    if challenge is not None:
        merged["challenge"] = challenge
    if init_file is not None:
        merged["init"] = {"encoder_from": str(init_file), "strip_prefix": "", "require_complete": False}
    config = load_train_config(merged)
    if dict(config.model.kwargs) != dict(source.config.model.kwargs) or config.model.name != source.config.model.name:
        logger.warning(
            "fine-tuning config changes the architecture (%s %s -> %s %s): unmatched tensors start fresh",
            source.config.model.name,
            dict(source.config.model.kwargs),
            config.model.name,
            dict(config.model.kwargs),
        )
    return config


def _init_model(
    source: SourceModel, target_scheme: Any, in_channels: int
) -> tuple[torch.nn.Module, dict[str, str | None]]:
    return remap_head(source.model, source.config, source.scheme, target_scheme, in_channels=in_channels)


def finetune(
    source: SourceModel,
    target_data: Any,
    config_overrides: Mapping[str, Any] | None = None,
    *,
    freeze: Sequence[str] = (),
    out_dir: Path | str,
    reporter: Any = None,
    challenge: str | None = None,
) -> Any:
    """Fine-tune ``source`` on ``target_data`` with the ``freeze`` groups fixed.

    Args:
        source: from :func:`load_source`.
        target_data: :class:`~bratstune.training.fit.TrainData` of the target cohort (its scheme may differ).
        config_overrides: nested or dotted keys over the source's config (``epochs``, ``optim.lr`` ...).
        freeze: layer groups kept fixed (``encoder``, ``middle``, ``decoder``, ``head``).
        out_dir: fit's output folder; also gets ``source_init.pt`` and ``transfer.json``.
        reporter: passed to :func:`~bratstune.training.fit.fit`.
        challenge: the target challenge (lesion-wise rules of validation).

    Returns:
        :class:`~bratstune.training.fit.FitResult`; ``result.transfer`` holds the transfer record.
    """

    check_group_names(freeze)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    in_channels = int(np.asarray(target_data.train[0].image).shape[0])
    expected = model_in_channels(source.model)
    if expected is not None and expected != in_channels:
        raise DataError(None, f"target cases have {in_channels} image channels, the source model takes {expected}")
    model, mapping = _init_model(source, target_data.scheme, in_channels)
    init_file = out / INIT_FILE
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, init_file)
    config = finetune_config(source, config_overrides, freeze=freeze, init_file=init_file, challenge=challenge)
    record = {
        "source": source.origin,
        "source_scheme": source.scheme.name,
        "target_scheme": target_data.scheme.name,
        "mapping": mapping,
        "freeze": list(freeze),
        "challenge": challenge,
        "init_file": str(init_file),
        **({"member": source.extra["member"]} if "member" in source.extra else {}),
    }
    (out / TRANSFER_FILE).write_text(json.dumps(record, indent=2))
    result = fit(config, target_data, reporter, out_dir=out)
    report = getattr(result.model, "bratstune_init_report", None)
    if report is not None and (
        report.mismatched or len(report.loaded) + len(report.interpolated) < len(model.state_dict())
    ):
        logger.warning("not every source tensor was loaded: %s", report.summary())
    result.transfer = record  # type: ignore[attr-defined]
    return result


def evaluate_source(
    source: SourceModel,
    target_data: Any,
    *,
    challenge: str | None,
    config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """``val/...`` metrics of the (head-remapped) source model on the target's validation cases."""

    if not target_data.val:
        raise DataError(None, "evaluate_source: the target data has no validation cases")
    in_channels = int(np.asarray(target_data.val[0].image).shape[0])
    model, mapping = _init_model(source, target_data.scheme, in_channels)
    config = finetune_config(source, config_overrides, freeze=(), init_file=None, challenge=challenge)
    v = config.validation
    cases = list(target_data.val)[: v.max_cases] if v.max_cases else list(target_data.val)
    metrics = validate(
        model.eval(),
        cases,
        target_data.scheme,
        inference_settings(config),
        challenge=challenge or config.challenge or "GLI",
        lesion_metrics=v.lesion_metrics,
    )
    logger.info(
        "source model on %d target validation case(s): %s",
        len(cases),
        {k: round(val, 4) for k, val in metrics.items() if k.endswith("_mean")},
    )
    return metrics
