"""Patch augmentation: TorchIO transforms built from a typed, YAML-friendly config.

:func:`build_augment` returns a ``tio.Compose`` that takes and returns
``{"image": float tensor (C, X, Y, Z), "label": integer tensor (1, X, Y, Z)}``; the label is a
``LabelMap`` for TorchIO, so spatial transforms resample it with nearest-neighbour
interpolation and intensity transforms leave it alone. Randomness comes from torch's RNG
(:class:`bratstune.data.sampling.PatchDataset` seeds it per sample).

Example YAML (every key optional)::

    augment:
      flip_prob: 0.5
      affine_prob: 0.2
      rotation_degrees: 15
      scale_range: [0.85, 1.15]
      elastic_prob: 0.05    # slow on CPU: about 0.3 s per 48^3 patch (affine: 0.02 s)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torchio as tio
from torchio.transforms.augmentation import RandomTransform
from torchio.transforms.intensity_transform import IntensityTransform

from bratstune.config_utils import from_dict
from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["AugmentConfig", "RandomIntensityScale", "augment_config", "build_augment"]

KEYS = ("image", "label")
LABEL_KEYS = ("label",)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation options; probabilities are per patch.

    Args:
        enabled: ``False`` gives an identity transform.
        flip_prob: probability of the flip step; inside it each of ``flip_axes`` flips with
            probability 0.5.
        flip_axes: spatial axes (0, 1, 2) that may be flipped.
        affine_prob: probability of a random rotation + scaling.
        rotation_degrees: rotations drawn from ``U(-d, d)`` per axis.
        scale_range: isotropic zoom drawn from ``U(lo, hi)``.
        elastic_prob: probability of a random elastic deformation (slow on CPU: keep low).
        elastic_control_points: control points per axis of the B-spline grid (>= 5).
        elastic_max_displacement: largest displacement in mm (voxels at 1 mm).
        noise_prob: probability of additive Gaussian noise.
        noise_std: noise standard deviation drawn from ``U(0, noise_std)`` (z-score units).
        intensity_scale_prob: probability of multiplying each channel by a random factor.
        intensity_scale_range: the factor's range ``(lo, hi)``.
        gamma_prob: probability of a random gamma ``sign(x) |x|^γ``.
        gamma_log_range: ``log γ`` drawn from ``U(lo, hi)``.
    """

    enabled: bool = True
    flip_prob: float = 0.5
    flip_axes: tuple[int, ...] = (0, 1, 2)
    affine_prob: float = 0.2
    rotation_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.15)
    elastic_prob: float = 0.05
    elastic_control_points: int = 7
    elastic_max_displacement: float = 5.0
    noise_prob: float = 0.15
    noise_std: float = 0.1
    intensity_scale_prob: float = 0.15
    intensity_scale_range: tuple[float, float] = (0.9, 1.1)
    gamma_prob: float = 0.15
    gamma_log_range: tuple[float, float] = (-0.3, 0.3)

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name.endswith("_prob"):
                value = getattr(self, f.name)
                if not 0.0 <= float(value) <= 1.0:
                    raise ConfigError(f"augment.{f.name}: expected a probability in [0, 1], got {value!r}")
        for name in ("scale_range", "intensity_scale_range", "gamma_log_range"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"augment.{name}: expected (lo, hi) with lo <= hi, got {(lo, hi)!r}")
        for name in ("scale_range", "intensity_scale_range"):
            if getattr(self, name)[0] <= 0:
                raise ConfigError(f"augment.{name}: expected positive factors, got {getattr(self, name)!r}")
        if not set(self.flip_axes) <= {0, 1, 2}:
            raise ConfigError(f"augment.flip_axes: expected axes among 0, 1, 2, got {self.flip_axes!r}")
        if self.rotation_degrees < 0 or self.noise_std < 0 or self.elastic_max_displacement < 0:
            raise ConfigError("augment: rotation_degrees, noise_std and elastic_max_displacement must be >= 0")
        if self.elastic_control_points < 5:
            raise ConfigError(f"augment.elastic_control_points: expected >= 5, got {self.elastic_control_points}")


def augment_config(mapping: Mapping[str, Any] | None, *, where: str = "augment") -> AugmentConfig:
    """:class:`AugmentConfig` from a YAML mapping (unknown keys get a suggestion)."""
    return from_dict(AugmentConfig, mapping, where=where)


class RandomIntensityScale(RandomTransform, IntensityTransform):
    """Multiply each channel of every intensity image by a factor drawn from ``U(lo, hi)``.

    Args:
        scale: ``(lo, hi)`` factor range.
        **kwargs: see ``tio.Transform`` (``p``, ``include``, ``label_keys`` ...).
    """

    def __init__(self, scale: tuple[float, float] = (0.9, 1.1), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale_range = self._parse_range(scale, "scale", min_constraint=0)
        self.args_names = ["scale_range"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        lo, hi = self.scale_range
        for image in self.get_images_dict(subject).values():
            factors = torch.empty(image.data.shape[0]).uniform_(lo, hi)
            image.set_data(image.data * factors.view(-1, 1, 1, 1).to(image.data.dtype))
        return subject


def build_augment(config: AugmentConfig | Mapping[str, Any] | None = None) -> tio.Compose:
    """Build the augmentation pipeline.

    Order: flip, affine (rotation + zoom), elastic, then intensity (scale, gamma, noise).

    Args:
        config: :class:`AugmentConfig`, a mapping for :func:`augment_config`, or ``None`` for defaults.

    Returns:
        ``tio.Compose`` taking ``{"image": (C, X, Y, Z), "label": (1, X, Y, Z)}`` tensors.
        Returned tensors may change dtype (TorchIO resamples in float): cast back if needed.
    """
    if config is None or isinstance(config, Mapping):
        config = augment_config(config)
    common: dict[str, Any] = {"include": list(KEYS), "label_keys": list(LABEL_KEYS)}
    steps: list[tio.Transform] = []
    if config.enabled:
        if config.flip_prob > 0 and config.flip_axes:
            steps.append(
                tio.RandomFlip(axes=tuple(config.flip_axes), flip_probability=0.5, p=config.flip_prob, **common)
            )
        if config.affine_prob > 0:
            steps.append(
                tio.RandomAffine(
                    scales=tuple(config.scale_range),
                    degrees=config.rotation_degrees,
                    isotropic=True,
                    default_pad_value=0.0,
                    p=config.affine_prob,
                    **common,
                )
            )
        if config.elastic_prob > 0:
            steps.append(
                tio.RandomElasticDeformation(
                    num_control_points=config.elastic_control_points,
                    max_displacement=config.elastic_max_displacement,
                    p=config.elastic_prob,
                    **common,
                )
            )
        if config.intensity_scale_prob > 0:
            steps.append(
                RandomIntensityScale(tuple(config.intensity_scale_range), p=config.intensity_scale_prob, **common)
            )
        if config.gamma_prob > 0:
            steps.append(tio.RandomGamma(log_gamma=tuple(config.gamma_log_range), p=config.gamma_prob, **common))
        if config.noise_prob > 0 and config.noise_std > 0:
            steps.append(tio.RandomNoise(std=(0.0, config.noise_std), p=config.noise_prob, **common))
    logger.debug("augmentation: %s", [type(s).__name__ for s in steps])
    return tio.Compose(steps, **common)
