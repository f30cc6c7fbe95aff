"""Plausibility flags: does a prediction look like a brain-tumour segmentation at all?

Batch prediction flags, never refuses (a flag never stops the batch). Per case
(:func:`case_flags`, on the input grid, with the brain mask = any modality non-zero):

* **empty**: no tumour voxel;
* **whole tumour too large**: the whole tumour (``WT``, else every label) covers more than
  ``max_brain_share`` of the brain mask (the demo's champion once labelled the whole brain);
* **labels outside the brain**: more than ``max_outside_share`` of the labelled voxels (and at
  least ``min_outside_voxels``) lie where every modality is 0;
* **ET without TC** (any nested region without its parent): region probabilities said "ET" where
  the thresholded TC was absent for at least ``max_dropped_share`` of the ET voxels (and at least
  ``min_dropped_voxels``). On the label map ET lies inside TC by construction: the hierarchical
  decode drops such voxels silently, so this reads ``Segmentation.hierarchy``;
* **unusual number of components** of a region (26-connected): more than ``max_components``;
  when the model records out-of-fold statistics, more than
  ``ceil(component_factor x max(1, most components on any out-of-fold case)) + 2`` instead (the
  model's own habit: a GLI model that never predicted more than 2 WT lesions is flagged above 6,
  a MET model that predicted up to 12 above 26).

Per cohort (:func:`cohort_flags`, needs the model's out-of-fold statistics, recorded at
registration by :func:`oof_statistics`, and at least ``cohort_min_cases`` predicted cases): for each
region, the cohort's median volume and median lesion count against the out-of-fold 5-95 %
range, and the share of cases outside the out-of-fold min-max range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from bratstune.errors import ConfigError
from bratstune.labels import get_scheme
from bratstune.metrics.volumes import oof_statistics, oof_statistics_from_rows, region_stats  # noqa: F401  (re-exported)

__all__ = ["PlausibilityRules", "case_flags", "cohort_flags", "oof_statistics", "oof_statistics_from_rows"]


@dataclass(frozen=True)
class PlausibilityRules:
    """Thresholds of the plausibility flags (see the module docstring).

    Args:
        max_brain_share: largest plausible whole-tumour volume as a share of the brain mask.
        max_outside_share: largest share of labelled voxels allowed outside the brain mask.
        min_outside_voxels: fewer labelled voxels outside the brain are never flagged.
        max_dropped_share: largest share of a nested region's voxels (ET) allowed outside its parent (TC).
        min_dropped_voxels: fewer dropped voxels are never flagged.
        max_components: most 26-connected components per region without out-of-fold statistics
            (20: metastases cohorts have many lesions).
        component_factor: with out-of-fold statistics: flag above this x the out-of-fold maximum (+ 2).
        cohort_min_cases: fewest predicted cases for cohort-level flags.
        cohort_outlier_share: flag when more than this share of the cohort lies outside the
            out-of-fold min-max range of a region's volume or lesion count.
    """

    max_brain_share: float = 0.3
    max_outside_share: float = 0.01
    min_outside_voxels: int = 10
    max_dropped_share: float = 0.25
    min_dropped_voxels: int = 10
    max_components: int = 20
    component_factor: float = 2.0
    cohort_min_cases: int = 5
    cohort_outlier_share: float = 0.25

    def __post_init__(self) -> None:
        for name in ("max_brain_share", "max_outside_share", "max_dropped_share", "cohort_outlier_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"plausibility.{name}: expected a share in [0, 1], got {value!r}")
        for name in ("min_outside_voxels", "min_dropped_voxels", "max_components", "cohort_min_cases"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"plausibility.{name}: expected a non-negative integer, got {value!r}")
        if not isinstance(self.component_factor, (int, float)) or self.component_factor < 1:
            raise ConfigError(f"plausibility.component_factor: expected a number >= 1, got {self.component_factor!r}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | PlausibilityRules | None) -> PlausibilityRules:
        """Rules from a mapping (unknown keys raise ``ConfigError`` naming the valid ones)."""
        if isinstance(mapping, PlausibilityRules):
            return mapping
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(mapping or {}) - known)
        if unknown:
            raise ConfigError(f"plausibility: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(mapping or {}))


def _tumour(labels: np.ndarray, scheme: Any) -> np.ndarray:
    values = scheme.regions.get("WT") or tuple(scheme.labels)
    return np.isin(labels, values)


def _component_limit(region: str, rules: PlausibilityRules, oof: Mapping[str, Any] | None) -> int:
    seen = ((oof or {}).get("lesions") or {}).get(region) or {}
    if "max" not in seen:
        return rules.max_components
    return int(math.ceil(rules.component_factor * max(1.0, float(seen["max"])))) + 2


def case_flags(
    labels: np.ndarray,
    brain: np.ndarray,
    scheme: Any,
    *,
    stats: Mapping[str, Any] | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    hierarchy: Mapping[str, Mapping[str, Any]] | None = None,
    oof: Mapping[str, Any] | None = None,
    rules: PlausibilityRules | None = None,
) -> list[str]:
    """Plausibility flags of one prediction (empty list: plausible).

    Args:
        labels: uint8 ``(X, Y, Z)`` label map in ``scheme`` on the input grid.
        brain: bool ``(X, Y, Z)`` brain mask (any modality non-zero) on the same grid.
        scheme: label scheme (object or name).
        stats: :func:`bratstune.metrics.volumes.region_stats` of ``labels`` (computed when omitted).
        spacing: voxel size in mm (only for ``stats`` when omitted).
        hierarchy: ``Segmentation.hierarchy`` (region probabilities dropped by the decode).
        oof: the model's :func:`oof_statistics` (component limits).
        rules: thresholds; default :class:`PlausibilityRules`.
    """
    scheme = get_scheme(scheme)
    rules = rules or PlausibilityRules()
    labels, brain = np.asarray(labels), np.asarray(brain, dtype=bool)
    if labels.shape != brain.shape:
        raise ValueError(f"labels {labels.shape} and brain mask {brain.shape} differ in shape")
    labelled = labels > 0
    n_labelled = int(labelled.sum())
    if n_labelled == 0:
        return ["empty prediction (no tumour voxel)"]
    flags = []
    tumour = int(_tumour(labels, scheme).sum())
    n_brain = int(brain.sum())
    share = tumour / n_brain if n_brain else math.inf
    if share > rules.max_brain_share:
        flags.append(
            f"whole tumour covers {share:.0%} of the brain mask (plausible up to {rules.max_brain_share:.0%})"
            if n_brain
            else "tumour labelled but the brain mask is empty"
        )
    outside = int((labelled & ~brain).sum())
    if outside >= max(1, rules.min_outside_voxels) and outside > rules.max_outside_share * n_labelled:
        flags.append(f"{outside} labelled voxel(s) ({outside / n_labelled:.0%}) outside the brain mask")
    for region, info in (hierarchy or {}).items():
        predicted, dropped = int(info.get("predicted", 0)), int(info.get("dropped", 0))
        if dropped >= max(1, rules.min_dropped_voxels) and dropped > rules.max_dropped_share * predicted:
            flags.append(
                f"{region} without {info.get('parent', 'its parent')}: {dropped} of {predicted} {region} voxels "
                f"({dropped / predicted:.0%}) lie outside the predicted {info.get('parent', 'parent')}"
            )
    stats = stats if stats is not None else region_stats(labels, scheme, spacing)
    for region in scheme.regions:
        count = int(stats.get(f"lesions_{region}", 0) or 0)
        limit = _component_limit(region, rules, oof)
        if count > limit:
            flags.append(f"{count} {region} components (unusual: more than {limit})")
    return flags


def _fmt(value: float, unit: str) -> str:
    return f"{value:.1f} {unit}".strip() if unit else f"{value:g}"


def cohort_flags(
    rows: Sequence[Mapping[str, Any]],
    scheme: Any,
    oof: Mapping[str, Any] | None,
    rules: PlausibilityRules | None = None,
) -> list[str]:
    """Cohort-level flags: this batch's volumes and lesion counts against the out-of-fold statistics.

    Args:
        rows: ``predictions.csv`` rows (``volume_<R>_ml``, ``lesions_<R>``) of the predicted cases.
        scheme: label scheme.
        oof: the model's :func:`oof_statistics` (no flags without them).
        rules: thresholds (``cohort_min_cases``, ``cohort_outlier_share``).
    """
    scheme = get_scheme(scheme)
    rules = rules or PlausibilityRules()
    if not oof or len(rows) < max(1, rules.cohort_min_cases):
        return []
    flags = []
    for key, column, unit, what in (
        ("volume_ml", "volume_{}_ml", "mL", "volume"),
        ("lesions", "lesions_{}", "", "lesion count"),
    ):
        for region in scheme.regions:
            ref = (oof.get(key) or {}).get(region)
            values = [row.get(column.format(region)) for row in rows]
            values = np.asarray([float(v) for v in values if v not in (None, "")], dtype=float)
            if not ref or values.size < max(1, rules.cohort_min_cases):
                continue
            median = float(np.median(values))
            if not ref["p05"] <= median <= ref["p95"]:
                flags.append(
                    f"cohort median {region} {what} {_fmt(median, unit)} is outside the out-of-fold 5-95 % range "
                    f"{_fmt(ref['p05'], unit)}..{_fmt(ref['p95'], unit)}"
                )
            outliers = int(((values < ref["min"]) | (values > ref["max"])).sum())
            if outliers > rules.cohort_outlier_share * values.size:
                flags.append(
                    f"{outliers} of {values.size} cases ({outliers / values.size:.0%}) have a {region} {what} outside "
                    f"the out-of-fold range {_fmt(ref['min'], unit)}..{_fmt(ref['max'], unit)}"
                )
    return flags
