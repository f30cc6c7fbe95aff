"""Decode settings: per-region thresholds + post-processing, the one home of that concept.

Probabilities become a label map in two steps, and both are tuned together (threshold search,
cross-validation) and then travel with the model (ensemble package, registry, prediction)::

    labels = postprocess(regions_to_labels(probs, scheme, thresholds), scheme, postprocess)

:class:`DecodeSettings` holds both and converts between the shapes that the rest of the code
uses:

* nested YAML / JSON (``thresholds.yaml`` of cross-validation, ``best_postprocess.yaml`` of a
  threshold search, the ensemble package)::

      thresholds: {WT: 0.45, TC: 0.5, ET: 0.4}
      postprocess: {min_size: {WT: 100, ET: 20}, fill_holes: false}

* flat search values (one Optuna trial): ``{"thresholds.WT": 0.45, "min_size.ET": 20,
  "fill_holes": false}`` (:meth:`DecodeSettings.from_values`).

Ranges are checked here and nowhere else: a threshold must lie in ``[0, 1]`` and a minimum size
must be a non-negative integer (:class:`~bratstune.inference.postprocess.PostprocessConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bratstune.errors import ConfigError, DataError
from bratstune.inference.postprocess import PostprocessConfig, postprocess
from bratstune.labels import get_scheme, regions_to_labels

__all__ = ["DEFAULT_POSTPROCESS", "DEFAULT_THRESHOLD", "DecodeSettings"]

DEFAULT_THRESHOLD = 0.5
#: The default dust removal (voxels per region) that search objectives are scored after: BraTS
#: teams remove small components because every false-positive lesion costs a whole lesion-wise
#: Dice of 0 (and an HD95 of 374 mm). For the WT/TC/ET schemes (GLI, SSA, PED, MEN, MET).
DEFAULT_POSTPROCESS: dict[str, Any] = {"min_size": {"WT": 100, "TC": 50, "ET": 20}, "fill_holes": False}
_NO_POSTPROCESS = PostprocessConfig(fill_holes_default=False)


def _check_threshold(region: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"threshold of {region}: expected a probability in [0, 1], got {value!r}") from None
    if math.isnan(number) or not 0.0 <= number <= 1.0:
        raise ConfigError(f"threshold of {region}: expected a probability in [0, 1], got {value!r}")
    return number


@dataclass(frozen=True)
class DecodeSettings:
    """How region probabilities become a post-processed label map.

    Args:
        thresholds: region -> threshold in ``[0, 1]`` (region mode); regions not listed use
            :data:`DEFAULT_THRESHOLD`. Ignored for label-mode (softmax) models.
        postprocess: dust removal and hole filling; the default removes nothing and fills no hole.
    """

    thresholds: Mapping[str, float] = field(default_factory=dict)
    postprocess: PostprocessConfig = field(default_factory=lambda: _NO_POSTPROCESS)

    def __post_init__(self) -> None:
        checked = {str(r).upper(): _check_threshold(str(r), v) for r, v in dict(self.thresholds).items()}
        object.__setattr__(self, "thresholds", checked)
        if not isinstance(self.postprocess, PostprocessConfig):
            object.__setattr__(self, "postprocess", PostprocessConfig.from_mapping(self.postprocess))

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | DecodeSettings | None) -> DecodeSettings:
        """From the nested shape ``{thresholds: {...}, postprocess: {...}}`` (both keys optional).

        Raises:
            ConfigError: an unknown key, a threshold outside ``[0, 1]`` or a bad minimum size.
        """
        if isinstance(mapping, DecodeSettings):
            return mapping
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - {"thresholds", "postprocess"})
        if unknown:
            raise ConfigError(f"decode settings: unknown key(s) {unknown}; expected 'thresholds' and 'postprocess'")
        thresholds = mapping.get("thresholds") or {}
        if not isinstance(thresholds, Mapping):
            raise ConfigError(f"decode settings: 'thresholds' must map region -> probability, got {thresholds!r}")
        post = mapping.get("postprocess")
        return cls(
            thresholds=dict(thresholds), postprocess=PostprocessConfig.from_mapping(post) if post else _NO_POSTPROCESS
        )

    @classmethod
    def from_values(cls, values: Mapping[str, Any], regions: Sequence[str]) -> DecodeSettings:
        """From one search trial's flat values (``thresholds.<R>``, ``min_size.<R>``, ``fill_holes``).

        Every region in ``regions`` gets a threshold (:data:`DEFAULT_THRESHOLD` when absent).
        """
        thresholds = {r: values.get(f"thresholds.{r}", DEFAULT_THRESHOLD) for r in regions}
        min_size = {k.split(".", 1)[1]: int(v) for k, v in values.items() if k.startswith("min_size.")}
        post = PostprocessConfig(min_size=min_size, fill_holes_default=bool(values.get("fill_holes", False)))
        return cls(thresholds=thresholds, postprocess=post)

    @classmethod
    def load(cls, path: str | Path) -> DecodeSettings:
        """Read a YAML file of the nested shape (e.g. ``thresholds.yaml``).

        Raises:
            DataError: the file is missing or not YAML.
            ConfigError: its contents are not valid decode settings.
        """
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(path, f"cannot read decode settings ({exc})") from None
        if raw is not None and not isinstance(raw, Mapping):
            raise DataError(path, "expected a mapping with 'thresholds' and 'postprocess'")
        return cls.from_mapping(raw)

    # -- use ------------------------------------------------------------------------------------

    def thresholds_for(self, regions: Sequence[str]) -> dict[str, float]:
        """One threshold per region of ``regions``.

        Raises:
            ConfigError: a threshold names a region that the model does not predict.
        """
        unknown = sorted(set(self.thresholds) - set(regions))
        if unknown:
            raise ConfigError(f"thresholds for unknown region(s) {unknown}; the model predicts {list(regions)}")
        return {r: float(self.thresholds.get(r, DEFAULT_THRESHOLD)) for r in regions}

    def with_thresholds(self, regions: Sequence[str]) -> DecodeSettings:
        """A copy with every region of ``regions`` given an explicit threshold."""
        return replace(self, thresholds=self.thresholds_for(regions))

    def decode_regions(self, probs: np.ndarray, scheme: Any) -> np.ndarray:
        """Region probabilities ``(R, X, Y, Z)`` (``scheme.train_regions``) -> uint8 labels ``(X, Y, Z)``."""
        scheme = get_scheme(scheme)
        labels = regions_to_labels(probs, scheme, self.thresholds_for(scheme.train_regions))
        return self.apply_postprocess(labels, scheme)

    def apply_postprocess(self, labels: np.ndarray, scheme: Any) -> np.ndarray:
        """Dust removal and hole filling of a label map (unchanged when there is nothing to do)."""
        if (
            not self.postprocess.min_size
            and not self.postprocess.fill_holes_default
            and not any(self.postprocess.fill_holes.values())
        ):
            return np.asarray(labels, dtype=np.uint8)
        return postprocess(np.asarray(labels, dtype=np.uint8), get_scheme(scheme), self.postprocess)

    def to_dict(self) -> dict[str, Any]:
        """The nested YAML/JSON shape that :meth:`from_mapping` reads back."""
        return {"thresholds": dict(self.thresholds), "postprocess": self.postprocess.to_dict()}

    def to_values(self) -> dict[str, Any]:
        """The flat search-value shape that :meth:`from_values` reads back."""
        out: dict[str, Any] = {f"thresholds.{r}": v for r, v in self.thresholds.items()}
        out.update({f"min_size.{r}": int(v) for r, v in self.postprocess.min_size.items()})
        out["fill_holes"] = bool(self.postprocess.fill_holes_default)
        return out

    def save(self, path: str | Path) -> Path:
        """Write the nested shape as YAML (temp file, then rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        tmp.replace(path)
        return path
