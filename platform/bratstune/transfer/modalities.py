"""The target cohort: modality checks, filling a missing modality, cache + train/validation split."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from bratstune.data.case import MODALITIES
from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
from bratstune.data.layout import _SUFFIX_TOKENS, discover
from bratstune.data.nifti import write_nifti_atomic
from bratstune.errors import ConfigError, DataError
from bratstune.transfer.source import SourceModel

logger = logging.getLogger(__name__)

FILL_ZEROS = "zeros"


# -- modalities ---------------------------------------------------------------------------------


def _cases(target: Path | str | Sequence[Any]) -> list[Any]:
    if isinstance(target, (str, Path)):
        return list(discover(Path(target), modalities=()).cases)
    return list(target)


def _expected_file(case: Any, modality: str) -> Path:

    first = next(iter(case.images.values()), None) or case.label
    folder = Path(first).parent if first is not None else Path(".")
    name = Path(first).name if first is not None else ".nii.gz"
    ext = ".nii.gz" if name.endswith(".gz") else ".nii"
    token = _SUFFIX_TOKENS.get(case.convention, _SUFFIX_TOKENS["brats2023"])[modality]
    return folder / f"{case.case_id}{token}{ext}"


def check_modalities(
    source_modalities: Sequence[str], target_cases: Path | str | Sequence[Any], fill: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Refuse target cases lacking a modality the source needs, unless ``fill`` covers it.

    Args:
        source_modalities: the modalities the source model takes.
        target_cases: a cohort folder or ``Case`` objects.
        fill: missing modality -> another modality to copy, or ``"zeros"``.

    Returns:
        ``{case_id: {missing modality: fill}}`` for the cases that need filling.

    Raises:
        DataError: naming the case's missing file and the ``fill`` option; or a bad ``fill``.
    """

    fill = dict(fill or {})
    for missing, how in fill.items():
        if missing not in MODALITIES or (how != FILL_ZEROS and how not in MODALITIES) or how == missing:
            raise ConfigError(
                f"fill: {missing!r}: {how!r}: expected a modality of {list(MODALITIES)} filled from "
                f"another modality or {FILL_ZEROS!r}"
            )
    needed: dict[str, dict[str, str]] = {}
    for case in _cases(target_cases):
        missing = [m for m in source_modalities if m not in case.images]
        if not missing:
            continue
        for m in missing:
            how = fill.get(m)
            if how is None:
                raise DataError(
                    _expected_file(case, m),
                    (
                        f"missing modality {m} of case '{case.case_id}': the source model needs "
                        f"{', '.join(source_modalities)}; set fill (e.g. fill: {{{m}: zeros}} or {{{m}: t1c}}) to fill it"
                    ),
                )
            if how != FILL_ZEROS and how not in case.images:
                raise DataError(
                    _expected_file(case, how), f"fill {m} from {how}: case '{case.case_id}' has no {how} either"
                )
        needed[case.case_id] = {m: fill[m] for m in missing}
    return needed


def fill_missing(root: Path | str, fill: Mapping[str, str], out: Path | str) -> Path:
    """A copy of the cohort at ``root`` under ``out`` (symbolic links) with missing modalities filled.

    Returns ``out`` (``root`` itself when nothing is missing).
    """

    root, out = Path(root), Path(out)
    cases = list(discover(root, modalities=()).cases)
    needed = check_modalities(MODALITIES, cases, fill)
    if not needed:
        return root
    for case in cases:
        files = [*case.images.values(), *([case.label] if case.label is not None else [])]
        folder = out / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            link = folder / Path(path).name
            if not link.exists():
                link.symlink_to(Path(path).resolve())
        for modality, how in needed.get(case.case_id, {}).items():
            dst = folder / _expected_file(case, modality).name
            if how == FILL_ZEROS:
                ref = nib.load(str(next(iter(case.images.values()))))
                write_nifti_atomic(dst, np.zeros(ref.shape, dtype=np.float32), ref.affine, ref.header)
            elif not dst.exists():
                dst.symlink_to(Path(case.images[how]).resolve())
            logger.info("case %s: %s filled from %s", case.case_id, modality, how)
    return out


def prepare_target(
    root: Path | str,
    source: SourceModel,
    *,
    fill: Mapping[str, str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache_root: Path | None = None,
    filled_dir: Path | None = None,
    workers: int = 1,
) -> tuple[Any, str | None]:
    """Check modalities, fill, preprocess and split the target cohort: ``(TrainData, challenge)``."""

    root = Path(root)
    needed = check_modalities(source.modalities, root, fill)
    if needed:
        root = fill_missing(root, fill or {}, filled_dir or Path(tempfile.mkdtemp(prefix="bratstune-filled-")))
    prepared = prepare_cohort(
        root,
        preprocess_config(preprocess if preprocess is not None else source.config.data.preprocess),
        workers=workers,
        cache_root=cache_root,
    )
    data = split_train_val(prepared.cases, prepared.scheme, val_fraction=val_fraction, seed=seed)
    return data, prepared.challenge
