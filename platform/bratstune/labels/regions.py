"""Label checks and the conversion between label maps and per-region masks / probabilities.

* :func:`check_labels`: every value of a segmentation belongs to its scheme (else ``DataError``).
* :func:`labels_to_regions`: labels -> one boolean channel per region (training targets).
* :func:`regions_to_labels`: per-region probabilities -> disjoint labels, by the scheme's
  hierarchical decode steps (see the package docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError, DataError
from bratstune.labels.schemes import SCHEMES, LabelScheme, get_scheme

logger = logging.getLogger(__name__)


# -- checks ------------------------------------------------------------------------------------


def label_values(seg: np.ndarray) -> list[int | float]:
    """Distinct values of a segmentation, sorted (fast path for small unsigned integers).

    Non-integral values of a float array are returned as floats so that callers can report them.
    """
    arr = np.asarray(seg)
    if arr.size == 0:
        return []
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        counts = np.bincount(arr.ravel())
        return [int(v) for v in np.flatnonzero(counts)]
    values = np.unique(arr)
    out: list[int | float] = []
    for v in values.tolist():
        if isinstance(v, float) and v.is_integer():
            out.append(int(v))
        else:
            out.append(v)
    return out


def check_labels(seg: np.ndarray, scheme: LabelScheme | str, *, source: str | Path | None = None) -> None:
    """Raise unless every value of ``seg`` is 0 or a label of ``scheme``.

    Args:
        seg: integer segmentation ``(X, Y, Z)`` (any shape works).
        scheme: the expected scheme (or its name).
        source: file the segmentation came from, named in the error.

    Raises:
        DataError: ``"<source>: unknown label values [5] for scheme 'brats2023' (expected 0, 1, 2, 3)"``.
    """
    scheme = get_scheme(scheme)
    allowed = {0, *scheme.labels}
    found = label_values(seg)
    unknown = [v for v in found if v not in allowed]
    if unknown:
        expected = ", ".join(str(v) for v in sorted(allowed))
        hint = _hint_other_scheme(found, scheme)
        raise DataError(
            source,
            f"unknown label values {unknown} for scheme '{scheme.name}' (expected {expected}){hint}",
        )


def _hint_other_scheme(values: Sequence[int | float], scheme: LabelScheme) -> str:
    fits = [s.name for s in SCHEMES.values() if s.name != scheme.name and all(v == 0 or v in s.labels for v in values)]
    return f"; the values fit scheme {' or '.join(repr(f) for f in fits)}" if fits else ""


# -- regions <-> labels ------------------------------------------------------------------------


def labels_to_regions(seg: np.ndarray, scheme: LabelScheme | str, regions: Sequence[str] | None = None) -> np.ndarray:
    """One boolean channel per region: ``out[r] = seg ∈ scheme.regions[regions[r]]``.

    Args:
        seg: integer labels ``(X, Y, Z)`` (any spatial shape).
        scheme: label scheme of ``seg``.
        regions: region names, default ``scheme.train_regions``.

    Returns:
        bool array ``(R, X, Y, Z)``.
    """
    scheme = get_scheme(scheme)
    names = scheme.train_regions if regions is None else tuple(regions)
    seg = np.asarray(seg)
    out = np.empty((len(names), *seg.shape), dtype=bool)
    for i, name in enumerate(names):
        if name not in scheme.regions:
            check_choice(name, scheme.regions, f"region of scheme '{scheme.name}'")
        out[i] = np.isin(seg, scheme.regions[name])
    return out


def _thresholds(thresholds: Mapping[str, float] | float, names: Sequence[str], scheme: LabelScheme) -> dict[str, float]:
    if isinstance(thresholds, Mapping):
        for key in thresholds:
            if key not in names:
                check_choice(key, names, f"threshold region (scheme '{scheme.name}')")
        out = {n: float(thresholds.get(n, 0.5)) for n in names}
    else:
        out = {n: float(thresholds) for n in names}
    for name, value in out.items():
        if not 0.0 <= value <= 1.0 or np.isnan(value):
            raise ConfigError(f"threshold for {name} must be in [0, 1], got {value}")
    return out


def regions_to_labels(
    probs: np.ndarray,
    scheme: LabelScheme | str,
    thresholds: Mapping[str, float] | float = 0.5,
    *,
    regions: Sequence[str] | None = None,
) -> np.ndarray:
    """Decode per-region probabilities into disjoint labels, hierarchically.

    For each decode step ``(region, label)`` with parent step ``inside`` (see module docstring)::

        mask[region] = (probs[region] >= t[region]) & mask[inside]     # mask[None] = everywhere
        out[mask[region]] = label                                       # later steps overwrite

    For brats2023: WT → 2, then TC inside WT → 1, then ET inside TC → 3.

    Args:
        probs: probabilities ``(R, X, Y, Z)`` in [0, 1] (a boolean array works too); channel ``r``
            is region ``regions[r]``.
        scheme: label scheme to decode into.
        thresholds: one threshold for all regions, or region → threshold (missing regions use 0.5).
        regions: channel names of ``probs``, default ``scheme.train_regions``; must include every
            decode region (extra channels are ignored).

    Returns:
        uint8 labels ``(X, Y, Z)``.

    Raises:
        ValueError: wrong number of channels or a decode region missing.
        ConfigError: threshold for an unknown region or outside [0, 1].
    """
    scheme = get_scheme(scheme)
    names = scheme.train_regions if regions is None else tuple(regions)
    probs = np.asarray(probs)
    if probs.ndim < 2 or probs.shape[0] != len(names):
        raise ValueError(
            f"expected probabilities of shape (R={len(names)}, X, Y, Z) for regions {list(names)}, "
            f"got shape {probs.shape}"
        )
    missing = [r for r in scheme.train_regions if r not in names]
    if missing:
        raise ValueError(f"cannot decode scheme '{scheme.name}': no channel for regions {missing}; got {list(names)}")
    t = _thresholds(thresholds, names, scheme)
    out = np.zeros(probs.shape[1:], dtype=np.uint8)
    masks: dict[str, np.ndarray] = {}
    for step in scheme.decode_steps():
        mask = probs[names.index(step.region)] >= t[step.region]
        if step.inside is not None:
            mask &= masks[step.inside]
        masks[step.region] = mask
        out[mask] = step.label
    return out
