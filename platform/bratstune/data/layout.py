"""Find the cases of a cohort folder, whatever BraTS / MSD naming it uses, and load them.

Supported naming conventions (``*.nii`` or ``*.nii.gz``; files flat in the folder or one
sub-folder per case, at any depth; macOS ``._*`` files and hidden folders are ignored):

=========== ============================================== =========================================
convention  example file names                             modality tokens → canonical
=========== ============================================== =========================================
brats2023   ``BraTS-GLI-00000-000-t1n.nii.gz`` (any         t1n, t1c, t2w, t2f, label ``seg``
            challenge token: GLI, SSA, MEN, MET, PED,
            GoAT, MEN-RT, ...) — BraTS 2023–2025
brats2021   ``BraTS2021_00000_t1ce.nii.gz``                  t1 → t1n, t1ce → t1c, t2 → t2w,
                                                           flair → t2f, label ``seg``
brats2020   ``BraTS20_Training_001_flair.nii.gz``,          as brats2021
            ``BraTS20_Validation_001_t1.nii.gz``,
            ``Brats18_2013_2_1_flair.nii.gz``,
            ``BraTS19_CBICA_AAB_1_seg.nii.gz`` (2017–2020)
msd         ``imagesTr/BRATS_001.nii.gz`` (4-D, channels    channel 0 FLAIR → t2f, 1 T1w → t1n,
            FLAIR, T1w, t1gd, T2w), ``labelsTr/...``,       2 t1gd → t1c, 3 T2w → t2w (or as
            ``imagesTs/...`` without labels                 ``dataset.json`` says)
=========== ============================================== =========================================

Images load as float32 ``(C, X, Y, Z)`` in `MODALITIES` order, labels as uint8 ``(X, Y, Z)``.
Low-level file reading and writing lives in :mod:`bratstune.data.nifti`.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bratstune.config_utils import check_choice

# loading lives with the file I/O; it is public here too, per the contract
from bratstune.data.case import MODALITIES, Case
from bratstune.data.nifti import is_nifti, nifti_stem
from bratstune.errors import DataError
from bratstune.labels import CHALLENGES, LabelScheme, get_scheme, scheme_for

logger = logging.getLogger(__name__)

__all__ = [
    "Cohort",
    "Convention",
    "default_scheme",
    "discover",
]


class Convention(str, enum.Enum):
    """Naming conventions `discover` understands."""

    BRATS2023 = "brats2023"
    BRATS2021 = "brats2021"
    BRATS2020 = "brats2020"
    MSD = "msd"

    def __str__(self) -> str:
        return self.value


# ---------------------------------------------------------------------------------- data types


@dataclass
class Cohort:
    """Result of `discover`.

    Attributes:
        root: the folder searched.
        convention: detected (or requested) naming convention, ``"unknown"`` if none was found.
        cases: complete cases, sorted by id.
        problems: incomplete/duplicate cases and folder-level problems (``strict=False`` only).
        ignored: NIfTI files that follow no naming convention, or another convention than ``convention``.
    """

    root: Path
    convention: str
    cases: list[Case]
    problems: list[DataError]
    ignored: list[Path] = field(default_factory=list)

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]

    @property
    def challenges(self) -> Counter:
        return Counter(c.challenge for c in self.cases if c.challenge)


# ---------------------------------------------------------------------------------- naming rules

_LEGACY_MODALITIES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "label"}
_NEW_MODALITIES = {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", "seg": "label"}
_MSD_CHANNELS = {"t2f": 0, "t1n": 1, "t1c": 2, "t2w": 3}  # FLAIR, T1w, t1gd, T2w
_MSD_NAMES = {
    "flair": "t2f",
    "t1w": "t1n",
    "t1": "t1n",
    "t1gd": "t1c",
    "t1ce": "t1c",
    "t1c": "t1c",
    "t2w": "t2w",
    "t2": "t2w",
}

_PATTERNS: dict[str, re.Pattern[str]] = {
    "brats2023": re.compile(
        r"^(?P<case>BraTS-(?P<challenge>[A-Za-z]+(?:-[A-Za-z]+)*)-\d+(?:-\d+)*)[-_](?P<mod>t1n|t1c|t2w|t2f|seg)$",
        re.IGNORECASE,
    ),
    "brats2021": re.compile(r"^(?P<case>BraTS2021_\d+)_(?P<mod>t1|t1ce|t2|flair|seg)$", re.IGNORECASE),
    "brats2020": re.compile(r"^(?P<case>BraTS(?:17|18|19|20)_.+?)_(?P<mod>t1|t1ce|t2|flair|seg)$", re.IGNORECASE),
    "msd": re.compile(r"^(?P<case>[A-Za-z0-9]+_\d+)$"),
}
# a BraTS 2023+ name whose case id breaks the pattern (spaces, non-ASCII, "..")
_NEAR_BRATS2023 = re.compile(r"^(?P<case>BraTS-.+?)[-_](?P<mod>t1n|t1c|t2w|t2f|seg)$", re.IGNORECASE)
_EXAMPLES = {
    "brats2023": "BraTS-GLI-00000-000-t1n.nii.gz",
    "brats2021": "BraTS2021_00000_t1.nii.gz",
    "brats2020": "BraTS20_Training_001_flair.nii.gz",
    "msd": "imagesTr/BRATS_001.nii.gz",
}
_SUFFIX_TOKENS = {  # canonical modality -> file token, for naming missing files
    "brats2023": {"t1n": "-t1n", "t1c": "-t1c", "t2w": "-t2w", "t2f": "-t2f"},
    "brats2021": {"t1n": "_t1", "t1c": "_t1ce", "t2w": "_t2", "t2f": "_flair"},
    "brats2020": {"t1n": "_t1", "t1c": "_t1ce", "t2w": "_t2", "t2f": "_flair"},
}


@dataclass(frozen=True)
class _Match:
    path: Path
    case_id: str
    modality: str  # canonical modality, "label", or for MSD "image"/"label"
    challenge: str | None = None


def _canonical_challenge(token: str) -> str:
    by_lower = {c.lower(): c for c in CHALLENGES}
    return by_lower.get(token.lower(), token)


def _match(path: Path) -> tuple[str, _Match] | None:
    stem = nifti_stem(path)
    m = _PATTERNS["brats2023"].match(stem)
    if m:
        mod = _NEW_MODALITIES[m["mod"].lower()]
        return "brats2023", _Match(path, m["case"], mod, _canonical_challenge(m["challenge"]))
    for conv in ("brats2021", "brats2020"):
        m = _PATTERNS[conv].match(stem)
        if m:
            return conv, _Match(path, m["case"], _LEGACY_MODALITIES[m["mod"].lower()])
    parent = path.parent.name.lower()
    if parent.startswith(("imagestr", "imagests", "labelstr", "labelsts")):
        m = _PATTERNS["msd"].match(stem)
        if m:
            return "msd", _Match(path, m["case"], "label" if parent.startswith("labels") else "image")
    return None


def _nifti_files(root: Path, problems: list[DataError]) -> Iterator[Path]:
    """NIfTI files under ``root``, following symbolic links to folders (a cohort of linked case
    folders is common) but never one that leads back to a folder already searched: such a link
    (a loop, or a second way to the same folder) is added to ``problems`` and not followed."""
    seen = {os.path.realpath(root)}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        keep = []
        for name in sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX"):
            folder = Path(dirpath) / name
            real = os.path.realpath(folder)
            if real in seen:
                inside = os.path.realpath(dirpath) == real or os.path.realpath(dirpath).startswith(real + os.sep)
                what = "symbolic link loop" if inside else "symbolic link to a folder already searched"
                problems.append(DataError(folder, f"{what} (points to {real}); not followed, remove the link"))
                continue
            seen.add(real)
            keep.append(name)
        dirnames[:] = keep
        for name in sorted(filenames):
            if is_nifti(name) and not name.startswith("."):
                yield Path(dirpath) / name


def _near_miss(path: Path) -> DataError | None:
    """A BraTS 2023+ file name whose case id has characters the convention does not allow."""
    m = _NEAR_BRATS2023.match(nifti_stem(path))
    if m is None:
        return None
    return DataError(
        path,
        f"case '{m['case']}': not a valid BraTS 2023+ case id (BraTS-<challenge>-<number>-<number>: ASCII "
        "letters, digits and '-' only); rename the files of this case",
    )


def _msd_channels(root: Path, image_dirs: set[Path]) -> dict[str, int]:
    """Channel order from MSD's ``dataset.json`` ("modality": {"0": "FLAIR", ...}) if present."""
    for folder in [root, *sorted({d.parent for d in image_dirs})]:
        meta = folder / "dataset.json"
        if not meta.is_file():
            continue
        try:
            modality = json.loads(meta.read_text()).get("modality", {})
            channels = {_MSD_NAMES[str(name).lower()]: int(idx) for idx, name in modality.items()}
        except (ValueError, KeyError, AttributeError, TypeError) as exc:
            logger.warning("%s: cannot read the channel order (%s); using FLAIR, T1w, t1gd, T2w", meta, exc)
            continue
        if set(channels) == set(MODALITIES):
            return channels
        logger.warning("%s: modalities %s do not map onto %s; using FLAIR, T1w, t1gd, T2w", meta, modality, MODALITIES)
    return dict(_MSD_CHANNELS)


# ---------------------------------------------------------------------------------- discovery


def discover(
    root: str | Path,
    *,
    convention: str | None = None,
    strict: bool = True,
    modalities: Sequence[str] = MODALITIES,
) -> Cohort:
    """Find every case under ``root``.

    Args:
        root: cohort folder (searched recursively).
        convention: force a naming convention instead of detecting it (files of other
            conventions are then ignored rather than an error).
        strict: raise the first problem (True) or collect them in ``Cohort.problems`` (False).
        modalities: modalities a case must have (e.g. ``("t1c",)`` for MEN-RT).

    Returns:
        `Cohort` with complete cases sorted by id.

    Raises:
        DataError: ``root`` missing or not a folder (always); empty folder, no recognised files, mixed
            conventions, missing modality, duplicate case id or file (only when ``strict``; otherwise
            they are in ``Cohort.problems``, and a mixed folder goes on with its majority convention).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "no such folder" if not root.exists() else "not a folder")
    for m in modalities:
        check_choice(m, MODALITIES, "modality")
    if convention is not None:
        convention = check_choice(str(convention).lower(), [c.value for c in Convention], "naming convention")

    found: dict[str, list[_Match]] = defaultdict(list)
    ignored: list[Path] = []
    walk_problems: list[DataError] = []
    misnamed: dict[str, DataError] = {}
    n_files = 0
    for path in _nifti_files(root, walk_problems):
        n_files += 1
        hit = _match(path)
        if hit is not None:
            found[hit[0]].append(hit[1])
        elif (near := _near_miss(path)) is not None:
            misnamed.setdefault(str(near.problem), near)
        else:
            ignored.append(path)

    def fail(problem: DataError, conv: str = "unknown") -> Cohort:
        if strict:
            raise problem
        return Cohort(root, conv, [], [problem], ignored)

    if n_files == 0:
        anything = any(True for _ in root.iterdir())
        what = "no .nii or .nii.gz files found" if anything else "empty folder"
        return fail(DataError(root, f"{what}; expected BraTS or MSD Task01 images such as {_EXAMPLES['brats2023']}"))
    problems: list[DataError] = [*walk_problems, *misnamed.values()]
    if convention is None:
        present = sorted(found, key=lambda c: -len(found[c]))
        if not present and problems:
            return fail(problems[0])
        if not present:
            examples = ", ".join(p.name for p in ignored[:3])
            return fail(
                DataError(
                    root,
                    f"{n_files} NIfTI files but none follows a supported naming convention (found {examples}); "
                    f"expected names like {', '.join(_EXAMPLES.values())}",
                )
            )
        if len(present) > 1:
            detail = "; ".join(
                f"{c}: {len(found[c])} files, e.g. {found[c][0].path.relative_to(root)}" for c in present
            )
            problem = DataError(
                root, f"mixed naming conventions ({detail}); keep one convention per folder or pass convention="
            )
            if strict:
                raise problem
            problems.append(problem)
        convention = present[0]
    for conv, matches in found.items():
        if conv != convention:
            ignored.extend(m.path for m in matches)
    if convention == "msd":
        cases, case_problems = _assemble_msd(root, found.get("msd", []), modalities)
    else:
        cases, case_problems = _assemble_brats(convention, found.get(convention, []), modalities)
    problems.extend(case_problems)
    if not cases and not problems:
        problems.append(DataError(root, f"no {convention} files found; expected names like {_EXAMPLES[convention]}"))
    if strict and problems:
        raise problems[0]
    for p in sorted(ignored):
        logger.debug("ignored %s (no %s name)", p, convention)
    logger.debug(
        "%s: %d %s cases (%d labelled), %d problems",
        root,
        len(cases),
        convention,
        sum(c.label is not None for c in cases),
        len(problems),
    )
    return Cohort(root, convention, cases, problems, sorted(ignored))


def _assemble_brats(
    convention: str, matches: list[_Match], modalities: Sequence[str]
) -> tuple[list[Case], list[DataError]]:
    by_case: dict[str, dict[Path, list[_Match]]] = defaultdict(lambda: defaultdict(list))
    for m in matches:
        by_case[m.case_id][m.path.parent].append(m)
    cases: list[Case] = []
    problems: list[DataError] = []
    for case_id in sorted(by_case):
        folders = sorted(by_case[case_id])
        folder = folders[0]
        for other in folders[1:]:
            problems.append(
                DataError(by_case[case_id][other][0].path, f"duplicate case id '{case_id}': also in {folder}")
            )
        files: dict[str, Path] = {}
        for m in sorted(by_case[case_id][folder], key=lambda x: (x.modality, x.path.name)):
            if m.modality in files:
                problems.append(
                    DataError(
                        m.path, f"duplicate {m.modality} file for case '{case_id}': also {files[m.modality].name}"
                    )
                )
                continue
            files[m.modality] = m.path
        missing = [mod for mod in modalities if mod not in files]
        if missing:
            have = ", ".join(mod for mod in MODALITIES if mod in files) or "no image"
            ext = ".nii.gz" if all(p.name.endswith(".gz") for p in files.values()) else ".nii"
            for mod in missing:
                expected = folder / f"{case_id}{_SUFFIX_TOKENS[convention][mod]}{ext}"
                problems.append(DataError(expected, f"missing modality {mod} of case '{case_id}' (found {have})"))
            continue
        challenge = by_case[case_id][folder][0].challenge
        images = {mod: files[mod] for mod in MODALITIES if mod in files}
        cases.append(Case(case_id, images, files.get("label"), convention, challenge))
    return cases, problems


def _assemble_msd(root: Path, matches: list[_Match], modalities: Sequence[str]) -> tuple[list[Case], list[DataError]]:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    problems: list[DataError] = []
    for m in sorted(matches, key=lambda x: (x.path.parent.name.lower().endswith("ts"), str(x.path))):
        table = labels if m.modality == "label" else images
        if m.case_id in table:
            problems.append(DataError(m.path, f"duplicate case id '{m.case_id}': also {table[m.case_id]}"))
            continue
        table[m.case_id] = m.path
    for case_id, path in sorted(labels.items()):
        if case_id not in images:
            expected = path.parent.parent / path.parent.name.replace("labels", "images") / path.name
            problems.append(DataError(expected, f"missing image of case '{case_id}' (its label {path} exists)"))
    channels = _msd_channels(root, {p.parent for p in images.values()})
    cases = [
        Case(
            case_id,
            {mod: path for mod in MODALITIES if mod in modalities},
            labels.get(case_id),
            "msd",
            None,
            channel={mod: channels[mod] for mod in MODALITIES if mod in modalities},
        )
        for case_id, path in sorted(images.items())
    ]
    return cases, problems


def default_scheme(case: Case, *, year: int | None = None) -> LabelScheme:
    """Label scheme implied by a case's naming: BraTS 2017–2021 → legacy, MSD → msd_task01,
    BraTS 2023+ → :func:`bratstune.labels.scheme_for` (challenge, year); unknown challenge → brats2023."""
    if case.convention in ("brats2021", "brats2020"):
        return get_scheme("legacy")
    if case.convention == "msd":
        return get_scheme("msd_task01")
    if case.challenge and case.challenge in CHALLENGES:
        return scheme_for(case.challenge, year)
    return get_scheme("brats2023")
