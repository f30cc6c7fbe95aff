"""Test-time views: flips and in-plane rotations of a volume, and their inverses.

* ``flips``: every subset of the three spatial axes flipped (8 views, identity included);
* ``rotate90``: in-plane (first two spatial axes, the axial plane of a BraTS volume) rotations by
  90 and 270 degrees (180 is already the X+Y flip). Rotations swap the in-plane axes, so they
  assume isotropic in-plane spacing (true for BraTS).

A prediction made on ``apply_view(x, v)`` is brought back to ``x``'s grid by ``invert_view``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

__all__ = ["View", "apply_view", "invert_view", "tta_views"]


@dataclass(frozen=True)
class View:
    """One test-time view: flip ``flips`` (spatial axes 0..2), then rotate by ``k`` x 90 degrees in-plane."""

    flips: tuple[int, ...] = ()
    k: int = 0

    @property
    def name(self) -> str:
        flip = "".join("XYZ"[a] for a in self.flips) or "-"
        return f"flip[{flip}]rot{90 * self.k}"


def tta_views(*, flips: bool = True, rotate90: bool = False) -> list[View]:
    """The test-time views, identity first (``flips``: 8, ``rotate90``: +2)."""
    views = [View()]
    if flips:
        for n in (1, 2, 3):
            views.extend(View(tuple(c)) for c in itertools.combinations((0, 1, 2), n))
    if rotate90:
        views.extend([View((), 1), View((), 3)])
    return views


def apply_view(volume: torch.Tensor, view: View) -> torch.Tensor:
    """Transform a batch ``(B, C, X, Y, Z)``: flip, then rotate in the X-Y plane."""
    out = volume
    if view.flips:
        out = torch.flip(out, dims=[2 + a for a in view.flips])
    if view.k:
        out = torch.rot90(out, view.k, dims=(2, 3))
    return out


def invert_view(volume: torch.Tensor, view: View) -> torch.Tensor:
    """Undo :func:`apply_view` on a prediction ``(B, K, ...)``."""
    out = volume
    if view.k:
        out = torch.rot90(out, -view.k, dims=(2, 3))
    if view.flips:
        out = torch.flip(out, dims=[2 + a for a in view.flips])
    return out
