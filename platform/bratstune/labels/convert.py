"""Relabel a segmentation from one label scheme to another by label meaning (tissue)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bratstune.errors import DataError
from bratstune.labels.regions import check_labels, label_values
from bratstune.labels.schemes import LabelScheme, get_scheme

# -- conversion between schemes -----------------------------------------------------------------


def conversion_table(src: LabelScheme | str, dst: LabelScheme | str) -> dict[int, int | None]:
    """Source label → destination label of the same tissue (``None`` where ``dst`` has no such tissue)."""
    src, dst = get_scheme(src), get_scheme(dst)
    by_tissue = {tissue: value for value, tissue in dst.tissues.items()}
    return {int(v): by_tissue.get(src.tissues.get(v, "")) for v in src.labels}


def convert_labels(
    seg: np.ndarray,
    src: LabelScheme | str,
    dst: LabelScheme | str,
    *,
    source: str | Path | None = None,
) -> np.ndarray:
    """Relabel a segmentation from scheme ``src`` to scheme ``dst`` by label meaning.

    Labels map by tissue: non-enhancing core (brats2023 NCR 1 ↔ legacy NCR/NET 1 ↔ MSD NET 2
    ↔ GLI-2024 NETC 1 ↔ PED NET 2), edema (2 ↔ 2 ↔ 1 ↔ SNFH 2 ↔ PED ED 4) and enhancing tumour
    (3 ↔ 4 ↔ 3 ↔ 3 ↔ PED ET 1). WT, TC and ET are therefore preserved. Tissues with no
    counterpart (GLI-2024 RC, PED CC, MEN-RT GTV) are an error only if they occur in ``seg``.

    Args:
        seg: integer labels ``(X, Y, Z)`` in ``src``.
        src: scheme of ``seg``; dst: target scheme.
        source: file name used in error messages.

    Returns:
        uint8 labels, same shape as ``seg``.

    Raises:
        DataError: ``seg`` holds values unknown to ``src``, or a value with no equivalent in ``dst``.
    """
    src, dst = get_scheme(src), get_scheme(dst)
    seg = np.asarray(seg)
    check_labels(seg, src, source=source)
    if src.name == dst.name:
        return seg.astype(np.uint8, copy=True)
    table = conversion_table(src, dst)
    present = set(label_values(seg))
    unmappable = [v for v, w in table.items() if w is None and v in present]
    if unmappable:
        what = ", ".join(f"{v} ({src.labels[v]})" for v in unmappable)
        raise DataError(
            source,
            f"label value {what} of scheme '{src.name}' has no equivalent in scheme '{dst.name}'",
        )
    lut = np.zeros(256, dtype=np.uint8)
    for v, w in table.items():
        if w is not None:
            lut[v] = w
    return lut[seg.astype(np.intp, copy=False)]
