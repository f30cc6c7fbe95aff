"""Label schemes of the BraTS challenges, their evaluated regions, and the region → label decode.

A segmentation is an integer volume ``(X, Y, Z)``; what each value means depends on the
challenge and the year (the *label scheme*). Models are trained on overlapping binary
*regions* (WT ⊇ TC ⊇ ET for adult glioma) and their per-region probabilities are decoded
back to disjoint labels by a hierarchy of thresholded steps.

Schemes (0 is always background):

============== ======================================= ==================================================
name           labels                                  regions
============== ======================================= ==================================================
brats2023      1 NCR, 2 ED (SNFH), 3 ET                 WT {1,2,3}, TC {1,3}, ET {3}
brats2024_gli  1 NETC, 2 SNFH, 3 ET, 4 RC               WT {1,2,3}, TC {1,3}, ET {3}, RC {4},
                                                       NETC {1}, SNFH {2}  (RC is in neither WT nor TC)
brats2024_ped  1 ET, 2 NET, 3 CC, 4 ED                  WT {1,2,3,4}, TC {1,2,3}, ET {1}, NET {2},
                                                       CC {3}, ED {4}
legacy         1 NCR/NET, 2 ED, 4 ET (BraTS 2017–2021)  WT {1,2,4}, TC {1,4}, ET {4}
msd_task01     1 ED, 2 NET, 3 ET (MSD Task01)           WT {1,2,3}, TC {2,3}, ET {3}
brats2024_men_rt 1 GTV (meningioma radiotherapy)        GTV {1}
============== ======================================= ==================================================

Decode: ``LabelScheme.decode`` is a sequence of steps ``(region, label)``, outermost first.
Step *k* selects the voxels where ``p_region >= threshold_region`` **and** that lie inside the
mask selected by its *parent* step, and paints them with ``label``; later steps overwrite
earlier ones. The parent is the previous step unless ``LabelScheme.decode_inside`` names
another region (or ``None`` = the whole volume). This handles hierarchies that are not a
single chain, e.g. paediatric tumours where the cystic component and the enhancing tumour
both lie inside the tumour core but not inside each other.
"""
from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

__all__ = [
    "CHALLENGES",
    "SCHEMES",
    "Challenge",
    "DecodeStep",
    "LabelScheme",
    "SchemeName",
    "check_labels",
    "convert_labels",
    "get_scheme",
    "label_values",
    "labels_to_regions",
    "regions_to_labels",
    "scheme_for",
]


class SchemeName(str, enum.Enum):
    """Names of the built-in label schemes (a ``str`` subclass, so YAML strings compare equal)."""

    BRATS2023 = "brats2023"
    BRATS2024_GLI = "brats2024_gli"
    BRATS2024_PED = "brats2024_ped"
    LEGACY = "legacy"
    MSD_TASK01 = "msd_task01"
    BRATS2024_MEN_RT = "brats2024_men_rt"

    def __str__(self) -> str:
        return self.value


class Challenge(str, enum.Enum):
    """Challenge tokens as they appear in BraTS 2023+ file names (``BraTS-<TOKEN>-00000-000``)."""

    GLI = "GLI"  # adult glioma (pre-treatment 2023, post-treatment 2024+)
    SSA = "SSA"  # glioma in Sub-Saharan Africa
    MEN = "MEN"  # meningioma
    MET = "MET"  # brain metastases
    PED = "PED"  # paediatric tumours
    GOAT = "GoAT"  # generalisability across tumours
    MEN_RT = "MEN-RT"  # meningioma radiotherapy planning (single GTV label)

    def __str__(self) -> str:
        return self.value


CHALLENGES: tuple[str, ...] = tuple(c.value for c in Challenge)


class DecodeStep(NamedTuple):
    """One step of the hierarchical decode: paint ``label`` where ``region`` is on inside ``inside``."""

    region: str
    label: int
    inside: str | None  # region of the parent step, None = whole volume


@dataclass(frozen=True)
class LabelScheme:
    """What the values of a segmentation mean and how regions decode back to labels.

    Args:
        name: scheme name, e.g. ``"brats2023"``.
        labels: non-zero label value → short name, e.g. ``{1: "NCR", 2: "ED", 3: "ET"}``.
        regions: evaluated region → label values it unites, e.g. ``{"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}``.
        decode: hierarchical decode steps ``(region, label)``, outermost first.
        decode_inside: region → region of the parent step (``None`` = whole volume) for steps
            whose parent is not the previous step.
        tissues: label value → tissue meaning shared across schemes (``"core"``, ``"edema"``,
            ``"enhancing"``, ``"cavity"``, ``"cyst"``, ``"gtv"``); drives :func:`convert_labels`.
        description: one line for humans.
    """

    name: str
    labels: Mapping[int, str]
    regions: Mapping[str, tuple[int, ...]]
    decode: tuple[tuple[str, int], ...]
    decode_inside: Mapping[str, str | None] = field(default_factory=dict)
    tissues: Mapping[int, str] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        where = f"label scheme '{self.name}'"
        for value in self.labels:
            if not isinstance(value, (int, np.integer)) or not 0 < int(value) < 256:
                raise ConfigError(f"{where}: label value {value!r} must be an integer in 1..255")
        for region, values in self.regions.items():
            unknown = [v for v in values if v not in self.labels]
            if unknown:
                raise ConfigError(f"{where}: region {region} uses unknown label values {unknown}")
        seen: list[str] = []
        for region, label in self.decode:
            if region not in self.regions:
                raise ConfigError(f"{where}: decode step uses unknown region {region!r}")
            if label not in self.labels:
                raise ConfigError(f"{where}: decode step {region} writes unknown label {label}")
            parent = self.decode_inside.get(region)
            if parent and parent not in seen:
                raise ConfigError(f"{where}: decode step {region} must come after its parent {parent}")
            seen.append(region)
        for region in self.decode_inside:
            if region not in seen:
                raise ConfigError(f"{where}: decode_inside names {region!r}, which is not a decode step")
        unknown_t = [v for v in self.tissues if v not in self.labels]
        if unknown_t:
            raise ConfigError(f"{where}: tissues name unknown label values {unknown_t}")

    def __hash__(self) -> int:  # mappings are not hashable; the name identifies a scheme
        return hash(self.name)

    @property
    def train_regions(self) -> tuple[str, ...]:
        """Region channels a region-mode model predicts, in decode order, e.g. ``("WT", "TC", "ET")``."""
        return tuple(region for region, _ in self.decode)

    @property
    def values(self) -> tuple[int, ...]:
        """Sorted non-zero label values, e.g. ``(1, 2, 3)``."""
        return tuple(sorted(int(v) for v in self.labels))

    @property
    def num_classes(self) -> int:
        """Number of classes of a label-mode (softmax) model: background + one per label."""
        return 1 + len(self.labels)

    def decode_steps(self) -> tuple[DecodeStep, ...]:
        """Decode steps with their parent region resolved (previous step unless overridden)."""
        steps: list[DecodeStep] = []
        previous: str | None = None
        for region, label in self.decode:
            inside = self.decode_inside[region] if region in self.decode_inside else previous
            steps.append(DecodeStep(region, int(label), inside))
            previous = region
        return tuple(steps)

    def describe(self) -> str:
        """E.g. ``"brats2023: 1 NCR, 2 ED, 3 ET"``."""
        return f"{self.name}: " + ", ".join(f"{v} {self.labels[v]}" for v in self.values)


# -- built-in schemes --------------------------------------------------------------------------

_ADULT = LabelScheme(
    name="brats2023",
    labels={1: "NCR", 2: "ED", 3: "ET"},
    regions={"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
    decode=(("WT", 2), ("TC", 1), ("ET", 3)),
    tissues={1: "core", 2: "edema", 3: "enhancing"},
    description="BraTS 2023+ adult (GLI, SSA, MEN, MET, GoAT): necrotic core, edema/SNFH, enhancing tumour",
)

# RC is decoded first and on its own (inside the whole volume); the tumour steps then
# overwrite it, so a voxel predicted both as tumour and as cavity is labelled tumour.
_GLI_2024 = LabelScheme(
    name="brats2024_gli",
    labels={1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
    regions={
        "WT": (1, 2, 3),
        "TC": (1, 3),
        "ET": (3,),
        "RC": (4,),
        "NETC": (1,),
        "SNFH": (2,),
    },
    decode=(("RC", 4), ("WT", 2), ("TC", 1), ("ET", 3)),
    decode_inside={"WT": None},
    tissues={1: "core", 2: "edema", 3: "enhancing", 4: "cavity"},
    description="BraTS 2024 post-treatment glioma: adds resection cavity (RC), which is outside WT and TC",
)

# PED: WT -> ED (4); TC inside WT -> NET (2); CC inside TC -> 3; ET inside TC (not inside CC) -> 1.
# ET is painted last, so where both CC and ET are predicted the voxel becomes ET.
_PED = LabelScheme(
    name="brats2024_ped",
    labels={1: "ET", 2: "NET", 3: "CC", 4: "ED"},
    regions={
        "WT": (1, 2, 3, 4),
        "TC": (1, 2, 3),
        "ET": (1,),
        "NET": (2,),
        "CC": (3,),
        "ED": (4,),
    },
    decode=(("WT", 4), ("TC", 2), ("CC", 3), ("ET", 1)),
    decode_inside={"ET": "TC"},
    tissues={1: "enhancing", 2: "core", 3: "cyst", 4: "edema"},
    description="BraTS 2024 paediatric: enhancing tumour, non-enhancing tumour, cystic component, edema",
)

_LEGACY = LabelScheme(
    name="legacy",
    labels={1: "NCR/NET", 2: "ED", 4: "ET"},
    regions={"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    decode=(("WT", 2), ("TC", 1), ("ET", 4)),
    tissues={1: "core", 2: "edema", 4: "enhancing"},
    description="BraTS 2017-2021: necrotic/non-enhancing core, edema, enhancing tumour (label 4)",
)

_MSD = LabelScheme(
    name="msd_task01",
    labels={1: "ED", 2: "NET", 3: "ET"},
    regions={"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    decode=(("WT", 1), ("TC", 2), ("ET", 3)),
    tissues={1: "edema", 2: "core", 3: "enhancing"},
    description="Medical Segmentation Decathlon Task01_BrainTumour: edema, non-enhancing tumour, enhancing tumour",
)

_MEN_RT = LabelScheme(
    name="brats2024_men_rt",
    labels={1: "GTV"},
    regions={"GTV": (1,)},
    decode=(("GTV", 1),),
    tissues={1: "gtv"},
    description="BraTS 2024 meningioma radiotherapy: gross tumour volume only",
)

SCHEMES: Mapping[str, LabelScheme] = {
    s.name: s for s in (_ADULT, _GLI_2024, _PED, _LEGACY, _MSD, _MEN_RT)
}

# names people use for the schemes, lower-case -> scheme name
_ALIASES: Mapping[str, str] = {
    "brats2021": "legacy",
    "brats2020": "legacy",
    "brats2019": "legacy",
    "brats2018": "legacy",
    "brats2017": "legacy",
    "msd": "msd_task01",
    "task01": "msd_task01",
    "task01_braintumour": "msd_task01",
    "adult": "brats2023",
    "brats2024_post": "brats2024_gli",
    "ped": "brats2024_ped",
    "men-rt": "brats2024_men_rt",
    "men_rt": "brats2024_men_rt",
}


def get_scheme(name: str | SchemeName | LabelScheme) -> LabelScheme:
    """Return the built-in scheme called ``name`` (case-insensitive; a `LabelScheme` passes through).

    Raises:
        ConfigError: unknown name, with the closest valid name suggested.
    """
    if isinstance(name, LabelScheme):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    check_choice(key, SCHEMES, "label scheme")
    return SCHEMES[key]


def scheme_for(challenge: str, year: int | None = None) -> LabelScheme:
    """Label scheme of a challenge in a given year.

    * ``year <= 2022`` (BraTS 2017–2021, and 2022's continuous evaluation on 2021 data) → ``legacy``.
    * GLI → ``brats2023``; GLI with ``year >= 2024`` (post-treatment) → ``brats2024_gli``.
    * SSA, MEN, MET, GoAT → ``brats2023``.
    * PED → ``brats2024_ped`` (PED 2023 used the adult labels: ``scheme_for("PED", 2023)`` → ``brats2023``).
    * MEN-RT → ``brats2024_men_rt``.
    * Legacy names: ``"BraTS2021"`` … ``"BraTS2017"``, ``"legacy"`` → ``legacy``; ``"MSD"``, ``"Task01"`` → ``msd_task01``.

    Args:
        challenge: challenge token, case-insensitive (``"gli"``, ``"GoAT"``, ``"MEN-RT"`` ...).
        year: challenge year, or None for the current rules.

    Raises:
        ConfigError: unknown challenge (closest name suggested) or implausible year.
    """
    if year is not None:
        if isinstance(year, bool) or not isinstance(year, (int, np.integer)) or not 2012 <= int(year) <= 2100:
            raise ConfigError(f"challenge year {year!r} must be an integer such as 2021 or 2024")
        year = int(year)
    token = str(challenge).strip()
    lowered = token.lower().replace("_", "-")
    if lowered in ("legacy",) or (lowered.startswith("brats") and lowered[5:].isdigit()):
        return _LEGACY
    if lowered in ("msd", "task01", "msd-task01", "task01-braintumour"):
        return _MSD
    by_lower = {c.lower(): c for c in CHALLENGES}
    if lowered not in by_lower:
        check_choice(token, list(CHALLENGES) + ["legacy", "MSD"], "challenge")
        raise ConfigError(f"unknown challenge '{token}'")  # pragma: no cover - check_choice raised
    name = by_lower[lowered]
    if year is not None and year <= 2022:
        return _LEGACY
    if name == "GLI":
        return _GLI_2024 if year is not None and year >= 2024 else _ADULT
    if name == "PED":
        return _ADULT if year == 2023 else _PED
    if name == "MEN-RT":
        return _MEN_RT
    return _ADULT


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
    fits = [
        s.name
        for s in SCHEMES.values()
        if s.name != scheme.name and all(v == 0 or v in s.labels for v in values)
    ]
    return f"; the values fit scheme {' or '.join(repr(f) for f in fits)}" if fits else ""


# -- regions <-> labels ------------------------------------------------------------------------


def labels_to_regions(
    seg: np.ndarray, scheme: LabelScheme | str, regions: Sequence[str] | None = None
) -> np.ndarray:
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


def _thresholds(
    thresholds: Mapping[str, float] | float, names: Sequence[str], scheme: LabelScheme
) -> dict[str, float]:
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
