"""nnU-Net-style U-Net topology (kernel sizes and strides) from patch size and voxel spacing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bratstune.config_utils import to_triple
from bratstune.errors import ConfigError

__all__ = ["nnunet_topology", "to_spacing", "to_triple"]

Triple = tuple[int, int, int]


def to_spacing(value: Any) -> tuple[float, float, float]:
    """Three positive spacings (mm) from a number or a sequence."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"spacing: expected a number or three numbers (mm), got {value!r}") from None
    if len(out) != 3 or any(not v > 0 for v in out):
        raise ConfigError(f"spacing: expected three positive numbers (mm), got {value!r}")
    return out  # type: ignore[return-value]


def nnunet_topology(
    patch_size: Sequence[int] | int,
    spacing: Sequence[float] | float = (1.0, 1.0, 1.0),
    *,
    max_levels: int | None = None,
    min_size: int = 4,
) -> tuple[list[Triple], list[Triple]]:
    """Kernel sizes and strides of a U-Net, derived from patch size and spacing like nnU-Net.

    Starting from the patch, an axis is halved at the next level while (a) its current spacing
    is at most twice the finest current spacing (so anisotropic axes are pooled later) and
    (b) the halved size stays ``>= min_size`` and the size is even. The kernel of a level is
    3 along axes whose spacing is within a factor of 2 of the finest, else 1 (no in-plane
    mixing across thick slices). Pooling stops when no axis can be halved or after
    ``max_levels - 1`` downsamplings.

    Args:
        patch_size: training patch ``(X, Y, Z)``.
        spacing: voxel spacing in mm.
        max_levels: at most this many resolution levels (e.g. ``len(filters)``).
        min_size: smallest feature-map size along any pooled axis.

    Returns:
        ``(kernels, strides)``, one entry per level (DynUNet's ``kernel_size`` and
        ``strides``); ``strides[0]`` is ``(1, 1, 1)`` (the input block).
    """
    sizes = [float(s) for s in to_triple(patch_size, "patch_size")]
    spacings = list(to_spacing(spacing))
    kernels: list[Triple] = []
    strides: list[Triple] = [(1, 1, 1)]
    while max_levels is None or len(strides) < max_levels:
        finest = min(spacings)
        ratios = [s / finest for s in spacings]
        stride = tuple(2 if r <= 2 and size % 2 == 0 and size / 2 >= min_size else 1 for r, size in zip(ratios, sizes))
        if all(s == 1 for s in stride):
            break
        kernels.append(tuple(3 if r <= 2 else 1 for r in ratios))  # type: ignore[arg-type]
        strides.append(stride)  # type: ignore[arg-type]
        sizes = [size / s for size, s in zip(sizes, stride)]
        spacings = [sp * s for sp, s in zip(spacings, stride)]
    finest = min(spacings)
    kernels.append(tuple(3 if s / finest <= 2 else 1 for s in spacings))  # type: ignore[arg-type]
    return kernels, strides
