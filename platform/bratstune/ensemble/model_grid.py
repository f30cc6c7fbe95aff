"""The model grid of a packaged ensemble: which spacing and orientation its members run on.

* :func:`model_grid`: when an ensemble is assembled, the grid its training cases were prepared on
  (``training_fingerprint["grid"]``, written by :func:`bratstune.data.fingerprint.training_fingerprint`)
  fills in ``preprocess.target_spacing`` / ``orientation``;
* :func:`recorded_preprocess`: on load, the grid recorded in ``ensemble.json`` (``target_spacing``,
  ``orientation``); a package written before they were recorded gets its training data's grid
  when that was one spacing and one orientation (:func:`bratstune.data.fingerprint.legacy_grid`:
  such models saw their files voxel for voxel), and is refused otherwise;
* :func:`input_grid_settings`: decode settings for the input grid (dust sizes are voxel counts
  tuned on the model grid: scaled by the ratio of voxel volumes);
* :func:`hierarchy_drops`: how much of a nested region (``ET`` in ``TC`` ...) the hierarchical
  decode dropped because its parent was not predicted there (plausibility flag "ET without TC").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bratstune.data.cohort import preprocess_config
from bratstune.data.fingerprint import legacy_grid
from bratstune.data.preprocess import replace_config
from bratstune.errors import ConfigError, DataError
from bratstune.inference.decode import DecodeSettings

logger = logging.getLogger(__name__)

__all__ = ["hierarchy_drops", "input_grid_settings", "model_grid", "recorded_preprocess"]


def model_grid(preprocess: Any, fingerprint: Mapping[str, Any]) -> Any:
    """``preprocess`` with the grid the training cases were prepared on (``training_fingerprint["grid"]``)."""
    grid = (fingerprint or {}).get("grid")
    if grid:
        spacing = tuple(float(v) for v in grid["spacing"])
        if preprocess.target_spacing is not None and not np.allclose(preprocess.target_spacing, spacing, rtol=1e-3):
            raise ConfigError(
                f"preprocess.target_spacing {list(preprocess.target_spacing)} differs from the spacing "
                f"{list(spacing)} mm the training cases were prepared at (training_fingerprint['grid'])"
            )
        return replace_config(preprocess, target_spacing=spacing, orientation=grid["orientation"])
    if preprocess.target_spacing is None:
        logger.warning(
            "the members' target spacing is unknown (no training fingerprint with a model grid): "
            "the ensemble will run every input at its own spacing"
        )
    return preprocess


def recorded_preprocess(source: Path, payload: Mapping[str, Any]) -> Any:
    """The package's preprocessing with its recorded model grid (old packages: their training data's grid)."""
    preprocess = preprocess_config(payload["preprocess"])
    if "target_spacing" in payload and "orientation" in payload:
        spacing = payload["target_spacing"]
        return replace_config(
            preprocess,
            target_spacing=None if spacing is None else tuple(float(v) for v in spacing),
            orientation=payload["orientation"],
        )
    legacy = legacy_grid(payload.get("training_fingerprint") or {})
    if legacy is None:
        raise DataError(
            source,
            "records no target_spacing / orientation and its training data does not name one grid "
            "(mixed or unknown spacings or orientations); re-package its members with this bratstune "
            "(python jobs/promote_ensemble.py or jobs/cross_validate.py) so that the package records them",
        )
    logger.warning(
        "%s predates recorded model grids: assuming its training data's %s mm %s",
        source,
        "x".join(f"{v:g}" for v in legacy[0]),
        legacy[1],
    )
    return replace_config(preprocess, target_spacing=legacy[0], orientation=legacy[1])


def input_grid_settings(settings: DecodeSettings, grid: Any) -> DecodeSettings:
    """Decode settings for the input grid: dust sizes (voxels, tuned on the model grid) scaled by voxel volume."""
    min_size = settings.postprocess.min_size
    if grid is None or not grid.resampled or not min_size:
        return settings
    ratio = float(np.prod(grid.spacing) / np.prod(grid.input_spacing))
    sizes = {region: int(math.ceil(size * ratio)) for region, size in min_size.items()}
    return replace(settings, postprocess=replace(settings.postprocess, min_size=sizes))


def hierarchy_drops(probs: np.ndarray, scheme: Any, thresholds: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per nested decode step: voxels past the region's threshold, and those outside its thresholded parent."""
    names = list(scheme.train_regions)
    masks: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, Any]] = {}
    for step in scheme.decode_steps():
        mask = probs[names.index(step.region)] >= thresholds.get(step.region, 0.5)
        if step.inside is not None:
            out[step.region] = {
                "parent": step.inside,
                "predicted": int(mask.sum()),
                "dropped": int((mask & ~masks[step.inside]).sum()),
            }
            mask &= masks[step.inside]
        masks[step.region] = mask
    return out
