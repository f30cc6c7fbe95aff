"""Label schemes of the BraTS challenges: labels, evaluated regions, decode steps (see the package docstring)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from bratstune.config_utils import check_choice
from bratstune.errors import ConfigError

logger = logging.getLogger(__name__)


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

SCHEMES: Mapping[str, LabelScheme] = {s.name: s for s in (_ADULT, _GLI_2024, _PED, _LEGACY, _MSD, _MEN_RT)}

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
