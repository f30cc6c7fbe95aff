"""The packaged segmentation ensemble: members + TTA + decode settings + scheme.

An :class:`Ensemble` is everything needed to turn a case's raw NIfTI into a label map in the
challenge's scheme, with nothing left to remember at prediction time:

* member networks (fold models, or the top-N trials of a search) with their training configs
  (:class:`~bratstune.ensemble.member.Member`);
* the inference recipe (:class:`bratstune.inference.sliding_window.InferenceConfig`: sliding window, overlap,
  Gaussian blending, test-time flips / rotations), mean of probabilities;
* the decode settings (:class:`bratstune.inference.decode.DecodeSettings`: per-region thresholds and
  post-processing), the label scheme, the required modalities and the preprocessing config;
* the model grid: the voxel size (``target_spacing``, mm) and ``orientation`` the members were
  trained in. :meth:`Ensemble.segment` reorients and resamples every input to it, runs the
  members there and brings the *probabilities* back to the input grid before thresholding;
* out-of-fold statistics of predicted volumes and lesion counts
  (:func:`bratstune.predict.plausibility.oof_statistics`), for cohort-level plausibility flags;
* the training data's fingerprint (drift check), lineage (search / CV run ids, data
  fingerprint, git commit) and validation metrics.

On disk (:meth:`Ensemble.save`, :meth:`Ensemble.load`) it is a folder of plain files::

    ensemble.json                  everything above except the weights (JSON)
    members/00-<name>.safetensors  one state dict per member (safetensors: no pickle)
    histogram_reference.json       only when the preprocessing matches histograms
    manifest.json                  SHA-256 of every other file; verified on load

A file whose hash differs from the manifest, a missing file or an unexpected extra file makes
:meth:`Ensemble.load` raise :class:`~bratstune.ensemble.manifest.IntegrityError` naming the file.
Loading rebuilds each member from its saved config (:mod:`bratstune.models.network`): the training
loop is never imported.

Cross-validation (k folds -> out-of-fold probabilities -> thresholds) is *not* here: it builds
its members with ``training.fit`` and hands them to :meth:`Ensemble.from_members` (see
:mod:`bratstune.search.crossval`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from bratstune.config_utils import to_dict
from bratstune.data.cache import CaseCache
from bratstune.data.case import MODALITIES, CaseData
from bratstune.data.cohort import preprocess_config
from bratstune.data.preprocess import COHORT, HistogramReference, preprocess_case
from bratstune.ensemble.manifest import manifest_digest, verify_manifest, write_manifest
from bratstune.ensemble.member import Member
from bratstune.ensemble.model_grid import hierarchy_drops, input_grid_settings, model_grid, recorded_preprocess
from bratstune.errors import ConfigError, DataError
from bratstune.inference.decode import DecodeSettings
from bratstune.inference.outputs import decode_prediction
from bratstune.inference.postprocess import PostprocessConfig
from bratstune.inference.sliding_window import InferenceConfig, ensemble_probabilities, probabilities_on_grid
from bratstune.integrity import safe_join
from bratstune.labels import get_scheme
from bratstune.models.network import NetworkSpec, build_network, load_model_weights

logger = logging.getLogger(__name__)

__all__ = ["ARTIFACT_KEY", "ENSEMBLE_FILE", "ENSEMBLE_INFERENCE", "FORMAT_VERSION", "Ensemble", "Segmentation"]

FORMAT_VERSION = 1
ENSEMBLE_FILE = "ensemble.json"
REFERENCE_FILE = "histogram_reference.json"
MEMBERS_DIR = "members"
ARTIFACT_KEY = "ensemble"  # the package folder's key among a registered MLflow model's artifacts
#: The recipe an ensemble gets by default: test-time flips, overlap 0.5, Gaussian blending.
ENSEMBLE_INFERENCE: dict[str, Any] = {"overlap": 0.5, "flips": True}


@dataclass
class Segmentation:
    """Result of :meth:`Ensemble.segment` for one case.

    Attributes:
        labels: uint8 ``(X, Y, Z)`` on the input grid, in the ensemble's scheme.
        fingerprint: the case's intensity/geometry fingerprint (drift check).
        timings: seconds per stage: ``preprocess``, ``network``, ``postprocess``.
        bbox: the preprocessing crop on the model grid.
        hierarchy: region mode: per decode step that lies inside a parent region (``ET`` inside
            ``TC`` ...), ``{"parent", "predicted", "dropped"}``: voxels whose probability passed the
            region's threshold, and how many of them lay outside the thresholded parent (the
            hierarchical decode drops those; e.g. "ET without TC").
    """

    labels: np.ndarray
    fingerprint: dict[str, Any]
    timings: dict[str, float]
    bbox: tuple[slice, slice, slice]
    hierarchy: dict[str, dict[str, Any]] = field(default_factory=dict)


def _member(item: Any, i: int, scheme: Any, in_channels: int) -> Member:
    if isinstance(item, Member):
        return item
    if isinstance(item, (str, Path)):
        return Member.from_folder(item, scheme, in_channels=in_channels, name=f"m{i}")
    if hasattr(item, "model") and hasattr(item, "config"):
        return Member.from_fit(item, name=f"m{i}")
    raise ConfigError(
        f"ensemble member {i}: expected a Member, a model folder or a FitResult, got {type(item).__name__}"
    )


def _inference(inference: InferenceConfig | Mapping[str, Any] | None, mode: str) -> InferenceConfig:
    if isinstance(inference, InferenceConfig):
        return replace(inference, mode=mode)
    return InferenceConfig.from_mapping({**ENSEMBLE_INFERENCE, **dict(inference or {})}, mode=mode)


def _decode_settings(
    mode: str,
    scheme: Any,
    decode: DecodeSettings | Mapping[str, Any] | None,
    thresholds: Mapping[str, float] | float | None,
    postprocess: PostprocessConfig | Mapping[str, Any] | None,
) -> DecodeSettings:
    """One :class:`DecodeSettings` from ``decode`` or from ``thresholds`` + ``postprocess``."""
    if decode is not None:
        if thresholds is not None or postprocess is not None:
            raise ConfigError("give the decode settings either as decode= or as thresholds= and postprocess=")
        settings = DecodeSettings.from_mapping(decode)
    else:
        if isinstance(thresholds, (int, float)):
            thresholds = {r: float(thresholds) for r in scheme.train_regions}
        post = {} if postprocess is None else {"postprocess": postprocess}
        settings = DecodeSettings(thresholds=dict(thresholds or {}), **post)
    if mode != "region":
        return replace(settings, thresholds={})
    return settings.with_thresholds(scheme.train_regions)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60] or "member"


@dataclass
class Ensemble:
    """The packaged object (see the module docstring). Build with :meth:`from_members`."""

    members: list[Member]
    scheme: Any
    mode: str
    modalities: tuple[str, ...]
    preprocess: Any
    inference: InferenceConfig = field(default_factory=lambda: InferenceConfig.from_mapping(ENSEMBLE_INFERENCE))
    decode_settings: DecodeSettings = field(default_factory=DecodeSettings)
    challenge: str | None = None
    training_fingerprint: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reference: Any = None
    digest: str | None = None  # SHA-256 of manifest.json once saved/loaded
    oof_statistics: dict[str, Any] = field(default_factory=dict)

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
        decode: DecodeSettings | Mapping[str, Any] | None = None,
        thresholds: Mapping[str, float] | float | None = None,
        postprocess: Any = None,
        training_fingerprint: Mapping[str, Any] | None = None,
        lineage: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        reference: Any = None,
        oof_statistics: Mapping[str, Any] | None = None,
    ) -> Ensemble:
        """Assemble an ensemble and check that its members agree.

        Args:
            members: :class:`Member` objects, ``fit`` best-model folders, or ``FitResult`` objects.
            scheme: the label scheme (object or name) the members predict.
            challenge: BraTS challenge (``GLI`` ...), recorded for naming and metrics.
            modalities: required input modalities; default all four (``MODALITIES``).
            preprocess: ``PreprocessConfig`` (or mapping); default the members' ``data.preprocess``.
                Its ``target_spacing`` / ``orientation`` (the model grid) come from
                ``training_fingerprint["grid"]`` when that is recorded (the grid the training cases
                were actually prepared on); without either, inputs run at their own spacing.
            inference: sliding-window / TTA settings; a mapping (or the default) starts from
                :data:`ENSEMBLE_INFERENCE` (test-time flips, overlap 0.5).
            decode: thresholds + post-processing (``DecodeSettings`` or its nested mapping);
                or give them as ``thresholds`` and ``postprocess``.
            thresholds: per-region thresholds (region mode); one float for all; default 0.5.
            postprocess: ``PostprocessConfig`` or mapping; default none (no dust removal, holes kept).
            training_fingerprint: :func:`bratstune.data.fingerprint.training_fingerprint` of the training data.
            lineage: search / CV run ids, data fingerprint, git commit ... (strings).
            metrics: validation metrics of the ensemble (e.g. ``val/dice_mean``).
            reference: ``HistogramReference`` when the preprocessing matches histograms; for
                ``histogram_match: cohort`` (e.g. a preprocessing search's variant) default the
                cohort reference in the preprocessing cache (``CaseCache.cohort_reference``).
            oof_statistics: :func:`bratstune.predict.plausibility.oof_statistics` of the members'
                out-of-fold predictions (cohort-level plausibility flags).

        Raises:
            ConfigError: no member, members with different output modes or preprocessing, bad thresholds.
        """
        scheme = get_scheme(scheme)
        modalities = tuple(modalities or MODALITIES)
        built = [_member(item, i, scheme, len(modalities)) for i, item in enumerate(members)]
        if not built:
            raise ConfigError("an ensemble needs at least one member")
        modes = {m.spec.mode for m in built}
        if len(modes) != 1:
            raise ConfigError(f"ensemble members mix output modes {sorted(modes)}; use members of one loss.mode")
        mode = modes.pop()
        if preprocess is None:
            preps = {json.dumps(dict(m.spec.preprocess), sort_keys=True) for m in built}
            if len(preps) != 1:
                raise ConfigError(
                    f"ensemble members were trained with different data.preprocess settings: {sorted(preps)}"
                )
            preprocess = dict(built[0].spec.preprocess)
        if not hasattr(preprocess, "fingerprint"):
            preprocess = preprocess_config(preprocess)
        preprocess = model_grid(preprocess, training_fingerprint or {})
        if preprocess.histogram_match == COHORT and reference is None:
            # a search's cohort-matched variant: the reference its cache holds (ConfigError if none)
            reference = CaseCache().cohort_reference(preprocess)
        if preprocess.histogram_match is not None and reference is None:
            raise ConfigError("the preprocessing matches histograms: pass reference=HistogramReference(...)")
        names = [m.name for m in built]
        if len(set(names)) != len(names):
            built = [replace(m, name=f"{i:02d}-{m.name}") for i, m in enumerate(built)]
        return cls(
            members=built,
            scheme=scheme,
            mode=mode,
            modalities=modalities,
            preprocess=preprocess,
            inference=_inference(inference, mode),
            decode_settings=_decode_settings(mode, scheme, decode, thresholds, postprocess),
            challenge=challenge,
            training_fingerprint=dict(training_fingerprint or {}),
            lineage={str(k): str(v) for k, v in (lineage or {}).items()},
            metrics={str(k): float(v) for k, v in (metrics or {}).items()},
            reference=reference,
            oof_statistics=dict(oof_statistics or {}),
        )

    @property
    def target_spacing(self) -> tuple[float, float, float] | None:
        """Voxel size (mm) of the model grid the members run on (``None``: each input's own spacing)."""
        return self.preprocess.target_spacing

    @property
    def orientation(self) -> str:
        """Axis codes of the model grid (``"RAS"``)."""
        return str(self.preprocess.orientation)

    @property
    def thresholds(self) -> dict[str, float]:
        """Per-region thresholds (``decode_settings.thresholds``; empty in label mode)."""
        return dict(self.decode_settings.thresholds)

    @property
    def postprocess(self) -> PostprocessConfig:
        """Post-processing (``decode_settings.postprocess``)."""
        return self.decode_settings.postprocess

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
            raise DataError(
                None,
                f"case '{data.case.case_id}' lacks modality {', '.join(missing)} "
                f"(the model needs {', '.join(self.modalities)})",
            )
        index = [available.index(m) for m in self.modalities]
        image = np.asarray(data.image)
        return image if index == list(range(image.shape[0])) else image[index]

    def probabilities(self, image: np.ndarray, *, device: torch.device | str = "cpu") -> torch.Tensor:
        """Mean probabilities ``(K, x, y, z)`` of a *preprocessed* volume ``(C, x, y, z)``."""
        config = replace(self.inference, mode=self.mode, device=torch.device(device))
        roi_sizes = [m.roi_size(self.inference) for m in self.members]
        return ensemble_probabilities(self.models, image, config, roi_sizes=roi_sizes)

    def decode(self, probs: np.ndarray) -> np.ndarray:
        """Probabilities on the input grid ``(K, X, Y, Z)`` -> post-processed uint8 labels."""
        return decode_prediction(probs, self.scheme, self.mode, self.decode_settings)

    def segment(self, data: Any, *, device: torch.device | str = "cpu") -> Segmentation:
        """Label map of a loaded case (``bratstune.data.case.CaseData``) on its own grid.

        The case is reoriented and resampled to the model grid (:attr:`target_spacing`,
        :attr:`orientation`), the members run there, and their mean probabilities are brought back
        to the input grid (linear) *before* the decode; dust sizes (voxels of the model grid)
        are scaled to the input's voxel volume. A label the case may carry is ignored: labels are
        never resampled here.
        """
        t0 = time.perf_counter()
        view = CaseData(data.case, self.select_channels(data), None, data.affine, data.header, data.spacing)
        grid, pre, (t1, t2) = self.input_probabilities(view, device=device)
        settings = input_grid_settings(self.decode_settings, pre.grid)
        labels = decode_prediction(grid, self.scheme, self.mode, settings)
        hierarchy = hierarchy_drops(grid, self.scheme, settings.thresholds) if self.mode == "region" else {}
        t3 = time.perf_counter()
        timings = {"preprocess": t1 - t0, "network": t2 - t1, "postprocess": t3 - t2}
        return Segmentation(labels, dict(pre.fingerprint), timings, pre.bbox, hierarchy)

    def input_probabilities(self, view: Any, *, device: torch.device | str = "cpu") -> tuple[np.ndarray, Any, tuple]:
        """Mean probabilities ``(K, X, Y, Z)`` on the input grid of ``view`` (``CaseData`` whose image
        holds :attr:`modalities` in order), its ``PreprocessedCase`` and the times preprocessing
        and the network ended (``time.perf_counter``)."""
        pre = preprocess_case(view, self.preprocess, reference=self.reference)
        t1 = time.perf_counter()
        probs = self.probabilities(pre.image, device=device)
        t2 = time.perf_counter()
        grid = probabilities_on_grid(probs, pre.bbox, pre.original_shape, mode=self.mode, grid=pre.grid)
        return grid, pre, (t1, t2)

    # -- persistence -----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The ``ensemble.json`` payload (weights referenced by relative path)."""
        decode = self.decode_settings.to_dict()
        return {
            "format": FORMAT_VERSION,
            "kind": "bratstune-ensemble",
            "scheme": self.scheme.name,
            "challenge": self.challenge,
            "mode": self.mode,
            "modalities": list(self.modalities),
            "preprocess": to_dict(self.preprocess),
            "target_spacing": list(self.target_spacing) if self.target_spacing is not None else None,
            "orientation": self.orientation,
            "inference": self.inference.to_dict(),
            "thresholds": decode["thresholds"],
            "postprocess": decode["postprocess"],
            "members": [
                {
                    "name": m.name,
                    "weights": f"{MEMBERS_DIR}/{i:02d}-{_safe(m.name)}.safetensors",
                    "config": dict(m.config),
                    "metrics": dict(m.metrics),
                }
                for i, m in enumerate(self.members)
            ],
            "training_fingerprint": self.training_fingerprint,
            "oof_statistics": self.oof_statistics,
            "lineage": dict(self.lineage),
            "metrics": dict(self.metrics),
            "histogram_reference": REFERENCE_FILE if self.reference is not None else None,
        }

    def save(self, folder: Path | str) -> Path:
        """Write the package folder (atomically: temp folder + rename) and its manifest."""
        folder = Path(folder)
        token = f"{os.getpid()}-{uuid.uuid4().hex}"  # this writer's own temp names
        tmp = folder.with_name(f".{folder.name}.{token}.tmp")
        (tmp / MEMBERS_DIR).mkdir(parents=True)
        payload = self.to_json()
        for member, entry in zip(self.members, payload["members"]):
            state = {k: v.detach().cpu().contiguous().clone() for k, v in member.model.state_dict().items()}
            save_file(state, str(tmp / entry["weights"]), metadata={"member": member.name})
        if self.reference is not None:
            self.reference.save(tmp / REFERENCE_FILE)
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
        write_manifest(tmp)
        old = folder.with_name(f".{folder.name}.{token}.old")
        if folder.exists():
            os.replace(folder, old)  # then the new one in; the old one goes last
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        self.digest = manifest_digest(folder)
        logger.info("saved ensemble of %d member(s) to %s", len(self.members), folder)
        return folder

    @classmethod
    def load(cls, folder: Path | str) -> Ensemble:
        """Verify the manifest, then rebuild every member from its config and safetensors weights.

        Raises:
            IntegrityError: a file does not match the manifest.
            DataError: not an ensemble folder, or an unsupported format version.
        """
        folder = Path(folder)
        if not (folder / ENSEMBLE_FILE).is_file():
            raise DataError(folder, f"not a packaged ensemble (no {ENSEMBLE_FILE})")
        digest = verify_manifest(folder)
        payload = json.loads((folder / ENSEMBLE_FILE).read_text())
        if payload.get("format") != FORMAT_VERSION:
            raise DataError(
                folder / ENSEMBLE_FILE,
                f"ensemble format {payload.get('format')!r} is not supported "
                f"(this bratstune reads format {FORMAT_VERSION}); upgrade bratstune",
            )
        scheme = get_scheme(payload["scheme"])
        modalities = tuple(payload["modalities"])
        members = []
        for entry in payload["members"]:
            weights = safe_join(folder, entry["weights"], what="member weights")  # never outside the package
            if weights.suffix != ".safetensors":
                raise DataError(
                    folder / ENSEMBLE_FILE, f"member weights {entry['weights']!r}: expected a .safetensors file"
                )
            model = build_network(NetworkSpec.from_config(entry["config"]), scheme, in_channels=len(modalities))
            load_model_weights(model, weights)
            members.append(Member(entry["name"], entry["config"], model.eval(), dict(entry.get("metrics") or {})))
        reference = None
        if payload.get("histogram_reference"):
            reference = HistogramReference.load(safe_join(folder, payload["histogram_reference"], what="reference"))
        decode = {"thresholds": payload["thresholds"], "postprocess": payload["postprocess"]}
        return cls(
            members=members,
            scheme=scheme,
            mode=payload["mode"],
            modalities=modalities,
            preprocess=recorded_preprocess(folder / ENSEMBLE_FILE, payload),
            inference=InferenceConfig.from_mapping(payload["inference"], mode=payload["mode"]),
            decode_settings=DecodeSettings.from_mapping(decode),
            challenge=payload.get("challenge"),
            training_fingerprint=payload.get("training_fingerprint") or {},
            oof_statistics=dict(payload.get("oof_statistics") or {}),
            lineage=dict(payload.get("lineage") or {}),
            metrics=dict(payload.get("metrics") or {}),
            reference=reference,
            digest=digest,
        )

    def describe(self) -> str:
        roi = ", ".join("x".join(map(str, m.roi_size(self.inference))) for m in self.members)
        return (
            f"{len(self.members)} member(s) [{', '.join(m.name for m in self.members)}], {self.mode} mode, "
            f"scheme {self.scheme.name}, {len(self.inference.views())} TTA view(s), window {roi}, "
            f"overlap {self.inference.overlap}, {self.inference.blend} blending, model grid "
            f"{'x'.join(f'{v:g}' for v in self.target_spacing) + ' mm' if self.target_spacing else 'native'} "
            f"{self.orientation}"
        )
