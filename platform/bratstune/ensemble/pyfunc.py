"""The MLflow ``pyfunc`` face of a packaged ensemble (:class:`EnsembleModel`).

Its only artifact is the ensemble folder of :meth:`bratstune.ensemble.package.Ensemble.save`
(safetensors weights + JSON + SHA-256 manifest); the ``bratstune`` package travels as ``code/``,
so ``mlflow.pyfunc.load_model("models:/bratstune-gli@champion")`` works in a fresh process.
Nothing is pickled: the registered model is *models-from-code*, its code file
:mod:`bratstune.integrity` verifies every file of the package against the digest recorded at
registration and only then imports this class (see :mod:`bratstune.tracking.model_package`).

Input (``model.predict``): a raw image ``numpy`` array ``(C, X, Y, Z)`` in the model's modality
order returns uint8 labels ``(X, Y, Z)`` (``model.unwrap_python_model().predict_probabilities(image)``:
the float32 probabilities on the input grid). Give its voxel-to-world matrix with it,
``model.predict({"image": image, "affine": <4x4>})`` (``predict_probabilities(image, affine=...)``),
and the image is reoriented and resampled to the model's grid and the result brought back, exactly
as for files; without one the array is taken to be on the model grid already (voxel for voxel). A
``pandas.DataFrame`` with one column per modality
(file paths) and optionally ``case_id`` and ``output`` (a ``.nii.gz`` to write) returns one row per
case with the output path and region volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.affines import voxel_sizes

from bratstune.data.case import Case, CaseData, load_case
from bratstune.data.nifti import write_nifti_atomic
from bratstune.data.preprocess import preprocess_arrays
from bratstune.ensemble.model_grid import input_grid_settings
from bratstune.ensemble.package import ARTIFACT_KEY, Ensemble
from bratstune.errors import DataError
from bratstune.inference.outputs import decode_prediction
from bratstune.inference.sliding_window import probabilities_on_grid
from bratstune.metrics.volumes import region_stats

__all__ = ["EnsembleModel"]


# No type hints on ``predict``: MLflow would build an input schema from them, which neither a raw
# volume array nor a table of file paths fits (MLflow logs a harmless warning about it).
class EnsembleModel(mlflow.pyfunc.PythonModel):
    """``pyfunc`` wrapper around :class:`bratstune.ensemble.package.Ensemble` (see the module docstring)."""

    def load_context(self, context: Any) -> None:
        self.ensemble = Ensemble.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        if isinstance(model_input, dict) and "image" in model_input:  # {"image": (C, X, Y, Z), "affine": 4x4}
            return self._predict_array(model_input["image"], probabilities=False, affine=model_input.get("affine"))
        if isinstance(model_input, np.ndarray):
            return self._predict_array(model_input, probabilities=False, affine=(params or {}).get("affine"))
        return self._predict_frame(model_input)

    def predict_probabilities(self, image: Any, affine: Any = None) -> Any:
        """Float32 mean probabilities ``(K, X, Y, Z)`` of a raw image ``(C, X, Y, Z)`` on its own grid.

        Args:
            image: channels in the model's modality order.
            affine: its 4x4 voxel-to-world matrix (mm); without it, the image must already be
                on the model grid.

        Reach it through ``mlflow.pyfunc.load_model(uri).unwrap_python_model()``.
        """
        return self._predict_array(image, probabilities=True, affine=affine)

    def _predict_array(self, image: Any, *, probabilities: bool, affine: Any = None) -> Any:
        ens = self.ensemble
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 4 or image.shape[0] != len(ens.modalities):
            raise DataError(
                None,
                f"expected a raw image of shape ({len(ens.modalities)}, X, Y, Z) with channels "
                f"{', '.join(ens.modalities)}, got {image.shape}",
            )
        if affine is not None:
            view = _array_case(image, affine, ens)
            grid, pre, _ = ens.input_probabilities(view)
            if probabilities:
                return grid
            return decode_prediction(grid, ens.scheme, ens.mode, input_grid_settings(ens.decode_settings, pre.grid))
        crop, _, bbox = preprocess_arrays(image, None, ens.preprocess, reference=ens.reference)
        grid = probabilities_on_grid(ens.probabilities(crop), bbox, image.shape[1:], mode=ens.mode)
        return grid if probabilities else ens.decode(grid)

    def _predict_frame(self, frame: Any) -> Any:
        ens = self.ensemble
        missing = [m for m in ens.modalities if m not in frame.columns]
        if missing:
            raise DataError(
                None,
                f"input table lacks column(s) {missing}; expected one file path per modality "
                f"{list(ens.modalities)} and optionally 'case_id', 'output'",
            )
        rows = []
        for i, row in frame.reset_index(drop=True).iterrows():
            case_id = str(row["case_id"]) if "case_id" in frame.columns else f"case-{i}"
            case = Case(case_id, {m: Path(row[m]) for m in ens.modalities}, None, "table", ens.challenge)
            data = load_case(case)
            seg = ens.segment(data)
            out = row.get("output") if "output" in frame.columns else None
            if out:
                write_nifti_atomic(out, seg.labels, data.affine, data.header)
            rows.append({"case_id": case_id, "output": out, **region_stats(seg.labels, ens.scheme, data.spacing)})
        return pd.DataFrame(rows)


def _array_case(image: np.ndarray, affine: Any, ens: Ensemble) -> CaseData:
    """A raw array and its affine as a loaded case (image channels in the model's order)."""
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise DataError(None, f"params 'affine': expected an invertible 4x4 voxel-to-world matrix, got {affine!r}")
    header = nib.Nifti1Header()
    header.set_data_shape(image.shape[1:])
    header.set_zooms(tuple(float(v) for v in voxel_sizes(matrix)))
    case = Case("array", {m: Path(f"{m}.nii.gz") for m in ens.modalities}, None, "array", ens.challenge)
    spacing = tuple(float(v) for v in voxel_sizes(matrix))
    return CaseData(case, image, None, matrix, header, spacing)  # type: ignore[arg-type]
