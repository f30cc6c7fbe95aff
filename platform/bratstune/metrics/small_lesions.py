"""Ground-truth lesions that a protocol calls too small to score: the voxels to drop from training targets.

::

    mask = small_lesions(gt == 3, "GLI", "brats2023", spacing=(1, 1, 1))   # ET lesions <= 50 mm³

The lesions are the protocol's own:

* ``brats2023``: dilation-merged components (:func:`~bratstune.metrics.components.dilation_merged_lesions`
  with the challenge's dilation), and a lesion is small when ``voxels · voxel volume <= min_volume``
  (the challenge's :class:`~bratstune.metrics.brats2023.Rule`): exactly the lesions the evaluation
  leaves out of its averages (``counted`` is ``volume > min_volume`` there).
* ``brats2026``: plain 26-connected components, small when ``volume < min_volume`` (the penalised
  BraTS-MET rule). The protocol has no threshold of its own for the other challenges, so
  ``min_volume`` must be given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bratstune.metrics import brats2023
from bratstune.metrics.api import challenges
from bratstune.metrics.components import component_sizes, components, dilation_merged_lesions

__all__ = ["official_min_volume", "small_lesions"]


def official_min_volume(challenge: str, protocol: str = "brats2023") -> float | None:
    """The protocol's lesion size threshold (mm³) for ``challenge``; ``None`` where it has none (brats2026)."""
    if protocol == "brats2023":
        return float(brats2023.CHALLENGE_RULES[_challenge(challenge, protocol)].min_volume)
    _challenge(challenge, protocol)
    return None


def _challenge(challenge: str, protocol: str) -> str:
    name = str(challenge).strip().upper().removeprefix("BRATS-")
    known = challenges(protocol)
    if name not in known:
        raise ValueError(f"unknown challenge {challenge!r} for protocol {protocol!r}; expected one of {known}")
    return name


def small_lesions(
    mask: np.ndarray,
    challenge: str,
    protocol: str = "brats2023",
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    min_volume: float | None = None,
) -> np.ndarray:
    """Boolean mask of the voxels of ``mask`` that belong to lesions below the size threshold.

    Args:
        mask: one region of the ground truth, boolean ``(X, Y, Z)``.
        challenge: ``GLI``, ``MET`` ... (it sets the brats2023 dilation and threshold).
        protocol: ``brats2023`` or ``brats2026``.
        spacing: voxel size in mm.
        min_volume: threshold in mm³; default the protocol's (brats2026 has none: give one).

    Raises:
        ValueError: unknown protocol or challenge, or brats2026 without ``min_volume``.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    voxel = float(np.prod([float(s) for s in spacing]))
    if protocol == "brats2023":
        rule = brats2023.CHALLENGE_RULES[_challenge(challenge, protocol)]
        threshold = rule.min_volume if min_volume is None else float(min_volume)
        lesions, n = dilation_merged_lesions(mask, rule.dilation)
        small = component_sizes(lesions, mask, n) * voxel <= threshold
    elif protocol == "brats2026":
        _challenge(challenge, protocol)
        if min_volume is None:
            raise ValueError("brats2026 has no lesion size threshold of its own: give min_volume (mm³)")
        lesions, n = components(mask)
        small = component_sizes(lesions, mask, n) * voxel < float(min_volume)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; expected brats2023 or brats2026")
    small[0] = False
    return small[lesions] & mask
