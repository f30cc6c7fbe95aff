"""Training-label dust removal (``data.label_dust``): ground-truth lesions the protocol calls small leave the targets.

The evaluation leaves lesions below the official size threshold out of its averages
(:mod:`bratstune.metrics.small_lesions`); training on them teaches the network to predict dust.
With ``data.label_dust: {enabled: true}`` :func:`fit <bratstune.training.fit.fit>` trains on
labels without them; validation still scores the original labels.

Per training region of the label scheme (``scheme.train_regions``: WT, TC, ET for BraTS 2023),
the small lesions of that region are switched off in its mask, then the masks are decoded back to
labels hierarchically (``labels.regions_to_labels``), only on the voxels that changed. So a small
whole tumour becomes background, a small enhancing lesion inside a large tumour core becomes
core (the next label outwards), and every other voxel keeps its label.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from bratstune.labels import labels_to_regions, regions_to_labels
from bratstune.metrics.small_lesions import small_lesions
from bratstune.training.config import TrainConfig
from bratstune.training.validate import lesion_challenge

logger = logging.getLogger(__name__)

__all__ = ["apply_label_dust", "remove_label_dust"]


def remove_label_dust(
    label: np.ndarray,
    scheme: Any,
    *,
    challenge: str = "GLI",
    protocol: str = "brats2023",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    min_volume: float | None = None,
) -> tuple[np.ndarray, int]:
    """``label`` without the small lesions of each training region; returns ``(labels, voxels changed)``."""
    label = np.asarray(label)
    names = scheme.train_regions
    regions = labels_to_regions(label, scheme, names)
    changed = np.zeros(label.shape, dtype=bool)
    for i, _ in enumerate(names):
        small = small_lesions(regions[i], challenge, protocol, spacing, min_volume=min_volume)
        regions[i] &= ~small
        changed |= small
    if not changed.any():
        return label, 0
    decoded = regions_to_labels(regions, scheme, regions=names)
    out = np.where(changed, decoded, label).astype(label.dtype, copy=False)
    return out, int(np.count_nonzero(out != label))


def apply_label_dust(config: TrainConfig, cases: Sequence[Any], scheme: Any) -> list[Any]:
    """The training cases with dust-free labels (in memory) when ``data.label_dust.enabled``, else as given."""
    dust = config.data.label_dust
    if not dust.enabled:
        return list(cases)
    challenge = lesion_challenge(config.challenge or "GLI")
    out, total = [], 0
    for case in cases:
        label, changed = remove_label_dust(
            case.label,
            scheme,
            challenge=challenge,
            protocol=config.validation.protocol,
            spacing=case.spacing,
            min_volume=dust.min_volume,
        )
        total += changed
        out.append(replace(case, label=label) if changed else case)
    logger.info(
        "label dust (%s, %s, %s): %d voxel(s) changed in %d of %d training case(s)",
        config.validation.protocol,
        challenge,
        "official threshold" if dust.min_volume is None else f"{dust.min_volume:g} mm³",
        total,
        sum(a is not b for a, b in zip(out, cases)),
        len(out),
    )
    return out
