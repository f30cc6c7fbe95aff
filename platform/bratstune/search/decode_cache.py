"""Fast scoring of many decode settings on the same cached cases, equal to the plain path.

The plain path (:func:`plain_case_metrics`, the definition) decodes a case's whole volume with
:meth:`~bratstune.inference.decode.DecodeSettings.decode_regions`, then scores it with
:func:`~bratstune.training.validate.region_dice` and :func:`~bratstune.metrics.lesion_wise`. A
decode search does that hundreds of times per case, and most of the work repeats.
:func:`case_metrics` returns the same values, float for float (``tests/search``), with:

* **the reference prepared once** (:class:`PreparedCase`): the GT masks of the voxel Dice, and the
  brats2023 lesions with their sizes and surfaces (:class:`~bratstune.metrics.LesionReference`,
  whose nearest-point indexes, distance maps and k-d trees then serve every configuration);
* **one box per configuration**: only the box ``B`` of ``{p_c ≥ t_c}`` over the channels and of the
  reference, grown by the lesion dilation + 1 (at least 1) and clipped to the volume, is decoded and
  scored. The box of ``{p_c ≥ t}`` comes from per-axis maxima of ``p_c`` taken once (a slice holds a
  voxel ``≥ t`` iff its maximum does), so no configuration makes a full-volume pass;
* **float16 compared as integers**: for non-negative float16 values (no NaN) the order of the bit
  patterns read as ``uint16`` is the order of the values, and ``p >= t`` (numpy casts the Python
  float ``t`` to float16) is ``bits(p) >= bits(float16(t))``, ~30× faster than float16 arithmetic;
* **a process pool** (:class:`CasePool`, ``workers > 1``): the cases are split among processes forked
  once, each keeping its cases prepared; results come back in case order.

Only on an *exact grid* (every spacing a multiple of 1/16 mm, :func:`~bratstune.metrics.nearest.exact_grid`;
1 mm, 2 mm, 0.9375 mm...): there every distance is exact, so a nearest point found in any frame
gives the same float; other spacings take the plain path.

Why the box is exact: every decoded label lies in some ``{p_c ≥ t_c}``, so outside ``B`` the label
map is 0 in both paths. Dust removal sees whole components (none reaches the margin). Hole filling
crops itself to the foreground box grown by 1 and clipped to the array: inside ``B`` that is the
same voxels as in the volume (``B`` holds that box, or reaches the volume's edge where it does).
The lesion-wise metrics need all foreground plus the dilation + 1 (their own crop rule,
``lesion_wise``); components keep their C-order numbering in any box that holds them, and the
specificity gets the whole volume's voxel count. The voxel Dice counts voxels, all inside ``B``.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bratstune.inference.decode import DecodeSettings
from bratstune.labels import get_scheme
from bratstune.metrics import LesionReference, lesion_wise
from bratstune.metrics.components import expand, region_mask
from bratstune.metrics.nearest import exact_grid
from bratstune.metrics.surface import bounding_box
from bratstune.training.validate import region_dice

__all__ = ["LESION_KEYS", "CasePool", "PreparedCase", "case_metrics", "plain_case_metrics"]

#: metric prefix -> ``lesion_wise`` key (``dice`` is the voxel Dice of ``region_dice``)
LESION_KEYS = {"dice_lesion": "lesionwise_dice", "dice": "legacy_dice", "hd95_lesion": "lesionwise_hd95"}
_FLOAT16_INF = 0x7C00  # bits of +inf; larger patterns are NaN, and 0x8000 and up are negative


def _add_lesion_rows(out: dict[str, float], result: Mapping[str, Any], scheme: Any) -> None:
    for region, row in result.items():
        if region not in scheme.regions or not isinstance(row, Mapping):
            continue
        for short, key in LESION_KEYS.items():
            if short != "dice" and key in row:
                out[f"{short}_{region}"] = float(row[key])


def plain_case_metrics(
    case: Any, scheme: Any, settings: DecodeSettings, challenge: str | None, lesion: bool
) -> dict[str, float]:
    """The definition: ``dice_<R>`` (and ``dice_lesion_<R>``, ``hd95_lesion_<R>``) of the whole volume."""
    scheme = get_scheme(scheme)
    pred = settings.decode_regions(case.probs, scheme)
    out = {f"dice_{region}": value for region, value in region_dice(pred, case.label, scheme).items()}
    if lesion and challenge:
        _add_lesion_rows(out, lesion_wise(pred, case.label, challenge, spacing=case.spacing), scheme)
    return out


class PreparedCase:
    """One case prepared for scoring many decode settings (see the module docstring).

    Args:
        case: a :class:`~bratstune.search.thresholds.CachedCase` (``probs``, ``label``, ``spacing``).
        scheme: its label scheme.
        challenge: lesion-wise rules (brats2023 protocol), ``None`` for the voxel Dice only.
    """

    def __init__(self, case: Any, scheme: Any, challenge: str | None) -> None:
        self.probs = case.probs
        self.label = case.label
        self.scheme = scheme
        probs = np.asarray(case.probs)
        label = np.asarray(case.label)
        self.shape = label.shape
        # float16 read as uint16 when every value is a non-negative number (see the module docstring)
        self.bits = None
        if probs.dtype == np.float16 and int(probs.view(np.uint16).max(initial=0)) <= _FLOAT16_INF:
            self.bits = probs.view(np.uint16)
        values = self.bits if self.bits is not None else probs
        # per channel and axis: the maximum over the other two axes (NaN ignored, as ``>=`` ignores it)
        self.profiles = [
            [np.fmax.reduce(channel, axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
            for channel in values
        ]
        self.gt_box = bounding_box(label != 0)
        self.dice_refs = {}
        for region, members in scheme.regions.items():
            mask = np.isin(label, members)
            box = bounding_box(mask) or (slice(0, 0),) * 3
            self.dice_refs[region] = (box, mask[box], int(np.count_nonzero(mask)))
        self.lesion = LesionReference(label, challenge, case.spacing) if challenge else None
        self.margin = self.lesion.rule.dilation + 1 if self.lesion is not None else 1

    def _cut(self, threshold: float) -> Any:
        """What ``p >= threshold`` compares against: the float itself, or its float16 bits."""
        return threshold if self.bits is None else np.float16(threshold).view(np.uint16)

    def box(self, thresholds: Mapping[str, float]) -> tuple[slice, slice, slice]:
        """The box ``B`` of one configuration (see the module docstring)."""
        lo = [s.start for s in self.gt_box] if self.gt_box else [None] * 3
        hi = [s.stop for s in self.gt_box] if self.gt_box else [None] * 3
        for region, profiles in zip(self.scheme.train_regions, self.profiles):
            cut = self._cut(thresholds[region])
            spans = [np.flatnonzero(profile >= cut) for profile in profiles]
            if spans[0].size == 0:
                continue  # nothing reaches the threshold in this channel
            for axis, span in enumerate(spans):
                lo[axis] = int(span[0]) if lo[axis] is None else min(lo[axis], int(span[0]))
                hi[axis] = int(span[-1]) + 1 if hi[axis] is None else max(hi[axis], int(span[-1]) + 1)
        if lo[0] is None:  # nothing predicted, no reference: any voxel scores the same
            return (slice(0, 1),) * 3
        return expand(tuple(slice(a, b) for a, b in zip(lo, hi)), self.margin, self.shape)

    def decode(self, thresholds: Mapping[str, float], box: tuple[slice, ...]) -> np.ndarray:
        """``regions_to_labels`` inside ``box``: the same steps, each channel compared once."""
        names = self.scheme.train_regions
        values = self.bits if self.bits is not None else self.probs
        out = np.zeros(tuple(s.stop - s.start for s in box), dtype=np.uint8)
        masks: dict[str, np.ndarray] = {}
        for step in self.scheme.decode_steps():
            mask = values[(names.index(step.region), *box)] >= self._cut(thresholds[step.region])
            if step.inside is not None:
                mask &= masks[step.inside]
            masks[step.region] = mask
            out[mask] = step.label
        return out

    def metrics(self, settings: DecodeSettings, lesion: bool) -> dict[str, float]:
        """What :func:`plain_case_metrics` returns for ``settings``."""
        thresholds = settings.thresholds_for(self.scheme.train_regions)
        box = self.box(thresholds)
        pred = settings.apply_postprocess(self.decode(thresholds, box), self.scheme)
        out: dict[str, float] = {}
        for region, members in self.scheme.regions.items():
            ref_box, ref_mask, ref_count = self.dice_refs[region]
            mask = region_mask(pred, members)
            tp = 0
            if ref_count:
                inner = tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(ref_box, box))
                tp = int(np.count_nonzero(mask[inner] & ref_mask))
            denominator = int(np.count_nonzero(mask)) + ref_count
            out[f"dice_{region}"] = 1.0 if denominator == 0 else 2.0 * tp / denominator
        if lesion and self.lesion is not None:
            _add_lesion_rows(out, self.lesion.evaluate(pred, box, whole_region=False), self.scheme)
        return out


def _preparable(case: Any, scheme: Any) -> bool:
    """Whether the fast path applies (else the plain path scores the case, or reports its error)."""
    probs, label = np.asarray(case.probs), np.asarray(case.label)
    return (
        probs.ndim == 4
        and probs.shape[0] == len(scheme.train_regions)
        and all(step.region in scheme.train_regions for step in scheme.decode_steps())
        and probs.shape[1:] == label.shape
        and np.issubdtype(probs.dtype, np.floating)
        and np.issubdtype(label.dtype, np.integer)
        # an exact grid: there the boxes moved around give the same floats (``metrics.nearest``)
        and exact_grid(case.spacing, tuple(n + 1 for n in label.shape))
    )


def case_metrics(
    case: Any,
    scheme: Any,
    settings: DecodeSettings,
    challenge: str | None,
    lesion: bool,
    *,
    prepare: bool | None = None,
) -> dict[str, float]:
    """:func:`plain_case_metrics`, from the case's :class:`PreparedCase` (kept on the case; rebuilt
    when ``probs`` or ``label`` is replaced by another array).

    ``prepare``: ``True`` builds the prepared case at once (a search), ``False`` never; ``None``
    (default) builds it on the second call for the same case, so that one-off scorings of fresh
    cases (e.g. ensemble blends) stay on the plain path, which is cheaper once.
    """
    scheme = get_scheme(scheme)
    if prepare is False or not _preparable(case, scheme):
        return plain_case_metrics(case, scheme, settings, challenge, lesion)
    rules = challenge if (lesion and challenge) else None
    store = vars(case).setdefault("_prepared", {})
    key = (scheme.name, rules)
    prepared = store.get(key)
    if prepared is None or prepared.probs is not case.probs or prepared.label is not case.label:
        if prepare is None and key not in store:
            store[key] = None  # seen once
            return plain_case_metrics(case, scheme, settings, challenge, lesion)
        prepared = store[key] = PreparedCase(case, scheme, rules)
    return prepared.metrics(settings, rules is not None)


# -- the process pool -------------------------------------------------------------------------------

_SHARED: dict[str, Any] = {}  # what forked workers inherit: the cases and how to score them


def _serve(connection: Any, indices: list[int]) -> None:
    """A worker: score its cases for every settings object it receives, until ``None``."""
    cases, scheme, challenge, lesion = (_SHARED[k] for k in ("cases", "scheme", "challenge", "lesion"))
    while True:
        settings = connection.recv()
        if settings is None:
            return
        try:
            reply = [(i, case_metrics(cases[i], scheme, settings, challenge, lesion, prepare=True)) for i in indices]
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which raises it
            reply = exc
        connection.send(reply)


class CasePool:
    """Score decode settings on cases split among ``workers`` processes forked once.

    Each worker keeps its share of the cases prepared (:class:`PreparedCase`) for the whole search;
    shares are balanced by voxel count. ``workers <= 1``, or a platform without ``fork``: everything
    runs in this process. Use as a context manager (the workers stop on exit).
    """

    def __init__(
        self, cases: Sequence[Any], scheme: Any, *, challenge: str | None, lesion: bool, workers: int = 1
    ) -> None:
        self.cases = list(cases)
        self.scheme = scheme
        self.challenge = challenge
        self.lesion = lesion
        self.workers: list[tuple[Any, Any]] = []
        count = min(int(workers), len(self.cases))
        if count <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            return
        context = multiprocessing.get_context("fork")
        shares: list[list[int]] = [[] for _ in range(count)]
        load = [0] * count
        for i in sorted(range(len(self.cases)), key=lambda i: -int(np.asarray(self.cases[i].label).size)):
            k = load.index(min(load))
            shares[k].append(i)
            load[k] += int(np.asarray(self.cases[i].label).size)
        _SHARED.update(cases=self.cases, scheme=scheme, challenge=challenge, lesion=lesion)
        try:
            for share in shares:
                parent, child = context.Pipe()
                process = context.Process(target=_serve, args=(child, sorted(share)), daemon=True)
                process.start()
                child.close()
                self.workers.append((process, parent))
        finally:
            _SHARED.clear()

    def metrics(self, settings: DecodeSettings) -> list[dict[str, float]]:
        """Every case's :func:`case_metrics`, in case order."""
        if not self.workers:
            return [
                case_metrics(c, self.scheme, settings, self.challenge, self.lesion, prepare=True) for c in self.cases
            ]
        for _, connection in self.workers:
            connection.send(settings)
        results: dict[int, dict[str, float]] = {}
        error: BaseException | None = None
        for process, connection in self.workers:
            try:
                reply = connection.recv()
            except EOFError:
                reply = RuntimeError(f"decode-scoring worker {process.pid} died (exit code {process.exitcode})")
            if isinstance(reply, BaseException):
                error = error or reply
            else:
                results.update(reply)
        if error is not None:
            raise error
        return [results[i] for i in range(len(self.cases))]

    def close(self) -> None:
        for process, connection in self.workers:
            try:
                connection.send(None)
                connection.close()
            except OSError:
                pass
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
        self.workers = []

    def __enter__(self) -> CasePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
