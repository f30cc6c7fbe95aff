"""The packaged segmentation ensemble: members + TTA + thresholds + post-processing + scheme.

An :class:`Ensemble` is everything needed to turn a case's raw NIfTI into a label map in the
challenge's scheme, with nothing left to remember at prediction time:

* member networks (fold models, or the top-N trials of a search) with their training configs;
* the inference recipe (:class:`bratstune.inference.sliding_window.InferenceConfig`: sliding window, overlap,
  Gaussian blending, test-time flips / rotations), mean of probabilities;
* per-region thresholds, post-processing (:class:`bratstune.inference.postprocess.PostprocessConfig`),
  the label scheme, the required modalities and the preprocessing config;
* the training data's fingerprint (drift check), lineage (search / CV run ids, data
  fingerprint, git commit) and validation metrics.

On disk (:meth:`Ensemble.save`, :meth:`Ensemble.load`) it is a folder of plain files::

    ensemble.json                  everything above except the weights (JSON)
    members/00-<name>.safetensors  one state dict per member (safetensors: no pickle)
    histogram_reference.json       only when the preprocessing matches histograms
    manifest.json                  SHA-256 of every other file; verified on load

A file whose hash differs from the manifest, a missing file or an unexpected extra file makes
:meth:`Ensemble.load` raise :class:`IntegrityError` naming the file.

Cross-validation (k folds -> out-of-fold probabilities -> thresholds) is *not* here: it builds
its members with ``train.fit`` and hands them to :meth:`Ensemble.from_members` (see the
``crossval`` module when it exists).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from bratstune.config_utils import to_dict
from bratstune.data.cache import file_digest
from bratstune.errors import ConfigError, DataError
from bratstune.inference.sliding_window import InferenceConfig, ensemble_probabilities, probabilities_on_grid

logger = logging.getLogger(__name__)

__all__ = [
    "ENSEMBLE_FILE",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "Ensemble",
    "IntegrityError",
    "Member",
    "Segmentation",
    "verify_manifest",
    "write_manifest",
]

FORMAT_VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
MANIFEST_FILE = "manifest.json"
REFERENCE_FILE = "histogram_reference.json"
MEMBERS_DIR = "members"


class IntegrityError(DataError):
    """A packaged ensemble file does not match its manifest (tampered, truncated or missing)."""


# -- manifest -----------------------------------------------------------------------------------




def _package_files(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST_FILE and not any(p.startswith(".") for p in path.relative_to(folder).parts):
            out.append(rel)
    return out


def write_manifest(folder: Path) -> dict[str, Any]:
    """Hash every file of ``folder`` (except the manifest and hidden files) into ``manifest.json``."""
    folder = Path(folder)
    manifest = {"algorithm": "sha256", "files": {rel: file_digest(folder / rel) for rel in _package_files(folder)}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify_manifest(folder: Path) -> str:
    """Check every file of a package against ``manifest.json``; return the manifest's SHA-256.

    Raises:
        IntegrityError: no manifest, a listed file missing or different, or an unlisted file.
    """
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    try:
        raw = path.read_bytes()
        files = dict(json.loads(raw)["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(path, f"missing or unreadable model manifest ({exc}); the package is incomplete") from None
    for rel, expected in sorted(files.items()):
        target = folder / rel
        if not target.is_file():
            raise IntegrityError(target, "listed in manifest.json but missing; the model package is incomplete")
        actual = file_digest(target)
        if actual != expected:
            raise IntegrityError(
                target,
                f"SHA-256 mismatch (manifest {expected[:12]}..., file {actual[:12]}...): the file was modified "
                "after the model was packaged; refusing to load it (re-register the model from its source)",
            )
    extra = sorted(set(_package_files(folder)) - set(files))
    if extra:
        raise IntegrityError(folder / extra[0], "not listed in manifest.json; refusing to load a modified package")
    return hashlib.sha256(raw).hexdigest()


# -- members --------------------------------------------------------------------------------------


@dataclass
class Member:
    """One trained network of the ensemble.

    Attributes:
        name: short identifier (fold name, trial id, folder name).
        config: the resolved :class:`bratstune.training.config.TrainConfig` it was trained with.
        model: the network (CPU, eval mode).
        metrics: its validation metrics (``val/...``), if known.
    """

    name: str
    config: Any
    model: torch.nn.Module
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path | str, scheme: Any, *, in_channels: int = 4, name: str | None = None) -> Member:
        """A ``fit`` best-model folder (``model.pt`` + ``config.yaml`` + ``metrics.json``)."""
        from bratstune.training.network import load_network

        folder = Path(folder)
        if not (folder / "config.yaml").is_file():
            raise DataError(folder, "not a trained model folder (expected config.yaml and model.pt, as fit's best/)")
        model, config = load_network(folder, scheme, in_channels=in_channels)
        metrics = {}
        if (folder / "metrics.json").is_file():
            metrics = {k: float(v) for k, v in json.loads((folder / "metrics.json").read_text()).items()
                       if isinstance(v, (int, float))}
        return cls(name or folder.name, config, model.cpu().eval(), metrics)

    @classmethod
    def from_fit(cls, result: Any, *, name: str) -> Member:
        """A :class:`bratstune.training.fit.FitResult` (its model holds the best weights)."""
        metrics = {k: float(v) for k, v in dict(result.best_metrics).items() if isinstance(v, (int, float))}
        return cls(name, result.config, result.model.cpu().eval(), metrics)

    def roi_size(self, inference: InferenceConfig) -> tuple[int, int, int]:
        if inference.roi_size is not None:
            return tuple(inference.roi_size)  # type: ignore[return-value]
        v = self.config.validation
        return tuple(int(s) for s in (v.roi_size or self.config.data.patch_size))  # type: ignore[return-value]


@dataclass
class Segmentation:
    """Result of :meth:`Ensemble.segment` for one case.

    Attributes:
        labels: uint8 ``(X, Y, Z)`` on the input grid, in the ensemble's scheme.
        fingerprint: the case's intensity/geometry fingerprint (drift check).
        timings: seconds per stage: ``preprocess``, ``network``, ``postprocess``.
        image: the preprocessed crop (for QC thumbnails) and its ``bbox``.
    """

    labels: np.ndarray
    fingerprint: dict[str, Any]
    timings: dict[str, float]
    bbox: tuple[slice, slice, slice]


# -- the ensemble -----------------------------------------------------------------------------------


@dataclass
class Ensemble:
    """The packaged object (see the module docstring). Build with :meth:`from_members`."""

    members: list[Member]
    scheme: Any
    mode: str
    modalities: tuple[str, ...]
    preprocess: Any
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    thresholds: dict[str, float] = field(default_factory=dict)
    postprocess: Any = None
    challenge: str | None = None
    training_fingerprint: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reference: Any = None
    digest: str | None = None  # SHA-256 of manifest.json once saved/loaded

    @classmethod
    def from_members(
        cls,
        members: Sequence[Member | Path | str | Any],
        *,
        scheme: Any,
        challenge: str | None = None,
        modalities: Sequence[str] | None = None,
        preprocess: Any = None,
        inference: InferenceConfig | Mapping[str, Any] | None = None,
        thresholds: Mapping[str, float] | float | None = None,
        postprocess: Any = None,
        training_fingerprint: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        reference: Any = None,
    ) -> Ensemble:
        """Assemble an ensemble and check that its members agree.

        Args:
            members: :class:`Member` objects, ``fit`` best-model folders, or ``FitResult`` objects.
            scheme: the label scheme (object or name) the members predict.
            challenge: BraTS challenge (``GLI`` ...), recorded for naming and metrics.
            modalities: required input modalities; default all four (``MODALITIES``).
            preprocess: ``PreprocessConfig`` (or mapping); default the members' ``data.preprocess``.
            inference: sliding-window / TTA settings.
            thresholds: per-region thresholds (region mode); one float for all; default 0.5.
            postprocess: ``PostprocessConfig`` or mapping; default none (no dust removal, holes kept).
            training_fingerprint: :func:`bratstune.predict.drift.training_fingerprint` of the training data.
            lineage: search / CV run ids, data fingerprint, git commit ... (strings).
            metrics: validation metrics of the ensemble (e.g. ``val/dice_mean``).
            reference: ``HistogramReference`` when the preprocessing matches histograms.

        Raises:
            ConfigError: no member, members with different output modes or preprocessing, bad thresholds.
        """
        from bratstune.data.layout import MODALITIES
        from bratstune.labels import get_scheme
        from bratstune.inference.postprocess import PostprocessConfig
        from bratstune.data.cohort import preprocess_config

        scheme = get_scheme(scheme)
        modalities = tuple(modalities or MODALITIES)
        built: list[Member] = []
        for i, item in enumerate(members):
            if isinstance(item, Member):
                built.append(item)
            elif isinstance(item, (str, Path)):
                built.append(Member.from_folder(item, scheme, in_channels=len(modalities), name=f"m{i}"))
            elif hasattr(item, "model") and hasattr(item, "config"):
                built.append(Member.from_fit(item, name=f"m{i}"))
            else:
                raise ConfigError(f"ensemble member {i}: expected a Member, a model folder or a FitResult, got {type(item).__name__}")
        if not built:
            raise ConfigError("an ensemble needs at least one member")
        modes = {m.config.loss.mode for m in built}
        if len(modes) != 1:
            raise ConfigError(f"ensemble members mix output modes {sorted(modes)}; use members of one loss.mode")
        preps = {json.dumps(dict(m.config.data.preprocess), sort_keys=True) for m in built}
        if preprocess is None:
            if len(preps) != 1:
                raise ConfigError(f"ensemble members were trained with different data.preprocess settings: {sorted(preps)}")
            preprocess = dict(built[0].config.data.preprocess)
        if not hasattr(preprocess, "fingerprint"):
            preprocess = preprocess_config(preprocess)
        if preprocess.histogram_match is not None and reference is None:
            raise ConfigError("the preprocessing matches histograms: pass reference=HistogramReference(...)")
        if inference is None:
            inference = InferenceConfig()
        elif not isinstance(inference, InferenceConfig):
            inference = InferenceConfig(**dict(inference))
        mode = modes.pop()
        names = [m.name for m in built]
        if len(set(names)) != len(names):
            built = [replace(m, name=f"{i:02d}-{m.name}") for i, m in enumerate(built)]
        ensemble = cls(
            members=built, scheme=scheme, mode=mode, modalities=modalities, preprocess=preprocess,
            inference=inference, thresholds={}, challenge=challenge,
            postprocess=postprocess if isinstance(postprocess, PostprocessConfig) else PostprocessConfig.from_mapping(
                postprocess if postprocess is not None else {"fill_holes_default": False}),
            training_fingerprint=dict(training_fingerprint or {}),
            lineage={str(k): str(v) for k, v in (lineage or {}).items()},
            metrics={str(k): float(v) for k, v in (metrics or {}).items()},
            reference=reference,
        )
        ensemble.thresholds = ensemble._resolve_thresholds(thresholds)
        return ensemble

    def _resolve_thresholds(self, thresholds: Mapping[str, float] | float | None) -> dict[str, float]:
        if self.mode != "region":
            return {}
        regions = self.scheme.train_regions
        if thresholds is None or isinstance(thresholds, (int, float)):
            out = {r: float(0.5 if thresholds is None else thresholds) for r in regions}
        else:
            unknown = sorted(set(thresholds) - set(regions))
            if unknown:
                raise ConfigError(f"thresholds for unknown region(s) {unknown}; the model predicts {list(regions)}")
            out = {r: float(thresholds.get(r, 0.5)) for r in regions}
        for region, value in out.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"threshold of {region}: expected a probability in [0, 1], got {value!r}")
        return out

    # -- prediction ------------------------------------------------------------------------------

    @property
    def models(self) -> list[torch.nn.Module]:
        return [m.model for m in self.members]

    def to(self, device: torch.device | str) -> Ensemble:
        for m in self.members:
            m.model.to(device).eval()
        return self

    def select_channels(self, data: Any) -> np.ndarray:
        """The image channels the members need, in ``modalities`` order (``DataError`` if one is missing)."""
        available = list(data.case.images)
        missing = [m for m in self.modalities if m not in available]
        if missing:
            raise DataError(None, f"case '{data.case.case_id}' lacks modality {', '.join(missing)} "
                            f"(the model needs {', '.join(self.modalities)})")
        index = [available.index(m) for m in self.modalities]
        image = np.asarray(data.image)
        return image if index == list(range(image.shape[0])) else image[index]

    def probabilities(self, image: np.ndarray, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mean probabilities ``(K, x, y, z)`` of a *preprocessed* volume ``(C, x, y, z)``."""
        return ensemble_probabilities(
            self.models, image, mode=self.mode, roi_sizes=[m.roi_size(self.inference) for m in self.members],
            config=self.inference, device=device,
        )

    def decode(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities on the input grid ``(K, X, Y, Z)`` -> post-processed uint8 labels."""
        from bratstune.labels import regions_to_labels
        from bratstune.inference.postprocess import postprocess
        from bratstune.training.validate import classes_to_labels

        if self.mode == "region":
            labels = regions_to_labels(probs, self.scheme, self.thresholds)
        else:
            labels = classes_to_labels(np.asarray(probs).argmax(axis=0), self.scheme)
        return postprocess(np.asarray(labels, dtype=np.uint8), self.scheme, self.postprocess)

    def segment(self, data: Any, *, device: torch.device | str = "cpu") -> Segmentation:
        """Label map of a loaded case (``bratstune.data.layout.CaseData``) on its own grid."""
        from bratstune.data.layout import CaseData
        from bratstune.data.preprocess import preprocess_case

        t0 = time.perf_counter()
        image = self.select_channels(data)
        view = CaseData(data.case, image, None, data.affine, data.header, data.spacing) if image is not data.image else data
        pre = preprocess_case(view, self.preprocess, reference=self.reference)
        t1 = time.perf_counter()
        probs = self.probabilities(pre.image, device=device)
        t2 = time.perf_counter()
        grid = probabilities_on_grid(probs, pre.bbox, pre.original_shape, mode=self.mode)
        labels = self.decode(grid)
        t3 = time.perf_counter()
        return Segmentation(labels, dict(pre.fingerprint), {"preprocess": t1 - t0, "network": t2 - t1,
                                                             "postprocess": t3 - t2}, pre.bbox)

    # -- persistence -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``ensemble.json`` payload (weights referenced by relative path)."""
        return {
            "format": FORMAT_VERSION,
            "kind": "bratstune-ensemble",
            "scheme": self.scheme.name,
            "challenge": self.challenge,
            "mode": self.mode,
            "modalities": list(self.modalities),
            "preprocess": to_dict(self.preprocess),
            "inference": to_dict(self.inference),
            "thresholds": dict(self.thresholds),
            "postprocess": self.postprocess.to_dict(),
            "members": [
                {"name": m.name, "weights": f"{MEMBERS_DIR}/{i:02d}-{_safe(m.name)}.safetensors",
                 "config": m.config.to_dict(), "metrics": dict(m.metrics)}
                for i, m in enumerate(self.members)
            ],
            "training_fingerprint": self.training_fingerprint,
            "lineage": dict(self.lineage),
            "metrics": dict(self.metrics),
            "histogram_reference": REFERENCE_FILE if self.reference is not None else None,
        }

    def save(self, folder: Path | str) -> Path:
        """Write the package folder (atomically: temp folder + rename) and its manifest."""
        from safetensors.torch import save_file

        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / MEMBERS_DIR).mkdir(parents=True)
        payload = self.to_json()
        for member, entry in zip(self.members, payload["members"]):
            state = {k: v.detach().cpu().contiguous().clone() for k, v in member.model.state_dict().items()}
            save_file(state, str(tmp / entry["weights"]), metadata={"member": member.name})
        if self.reference is not None:
            self.reference.save(tmp / REFERENCE_FILE)
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
        write_manifest(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, folder)
        self.digest = hashlib.sha256((folder / MANIFEST_FILE).read_bytes()).hexdigest()
        logger.info("saved ensemble of %d member(s) to %s", len(self.members), folder)
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> Ensemble:
        """Verify the manifest, then rebuild every member from its config and safetensors weights.

        Raises:
            IntegrityError: a file does not match the manifest.
            DataError: not an ensemble folder, or an unsupported format version.
        """
        from safetensors.torch import load_file

        from bratstune.data.preprocess import HistogramReference
        from bratstune.labels import get_scheme
        from bratstune.training.network import build_network
        from bratstune.inference.postprocess import PostprocessConfig
        from bratstune.training.config import load_train_config
        from bratstune.data.cohort import preprocess_config

        folder = Path(folder)
        if not (folder / ENSEMBLE_FILE).is_file():
            raise DataError(folder, f"not a packaged ensemble (no {ENSEMBLE_FILE})")
        digest = verify_manifest(folder)
        payload = json.loads((folder / ENSEMBLE_FILE).read_text())
        if payload.get("format") != FORMAT_VERSION:
            raise DataError(folder / ENSEMBLE_FILE, f"ensemble format {payload.get('format')!r} is not supported "
                            f"(this bratstune reads format {FORMAT_VERSION}); upgrade bratstune")
        scheme = get_scheme(payload["scheme"])
        modalities = tuple(payload["modalities"])
        members = []
        for entry in payload["members"]:
            config = load_train_config(entry["config"])
            model = build_network(config, scheme, in_channels=len(modalities))
            try:
                model.load_state_dict(load_file(str(folder / entry["weights"])), strict=True)
            except (RuntimeError, OSError) as exc:
                raise DataError(folder / entry["weights"], f"weights do not fit the member's network ({exc})") from None
            members.append(Member(entry["name"], config, model.eval(), dict(entry.get("metrics") or {})))
        reference = None
        if payload.get("histogram_reference"):
            reference = HistogramReference.load(folder / payload["histogram_reference"])
        return cls(
            members=members, scheme=scheme, mode=payload["mode"], modalities=modalities,
            preprocess=preprocess_config(payload["preprocess"]),
            inference=InferenceConfig(**payload["inference"]),
            thresholds={k: float(v) for k, v in payload["thresholds"].items()},
            postprocess=PostprocessConfig.from_mapping(payload["postprocess"]),
            challenge=payload.get("challenge"),
            training_fingerprint=payload.get("training_fingerprint") or {},
            lineage=dict(payload.get("lineage") or {}),
            metrics=dict(payload.get("metrics") or {}),
            reference=reference,
            digest=digest,
        )

    def describe(self) -> str:
        roi = ", ".join("x".join(map(str, m.roi_size(self.inference))) for m in self.members)
        return (f"{len(self.members)} member(s) [{', '.join(m.name for m in self.members)}], {self.mode} mode, "
                f"scheme {self.scheme.name}, {len(self.inference.views())} TTA view(s), window {roi}, "
                f"overlap {self.inference.overlap}, {self.inference.blend} blending")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "member"
