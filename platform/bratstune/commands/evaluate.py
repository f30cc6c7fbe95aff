"""`bratstune evaluate`: BraTS lesion-wise metrics of predictions against ground truth."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from bratstune import paths
from bratstune.data.layout import discover
from bratstune.data.nifti import AFFINE_TOLERANCE, is_nifti, nifti_stem, read_volume
from bratstune.errors import ConfigError, DataError
from bratstune.inference.postprocess import PostprocessConfig, postprocess
from bratstune.labels import check_labels, scheme_for
from bratstune.metrics import lesion_wise

PROTOCOLS = ("brats2023", "brats2026")  # = bratstune.metrics.PROTOCOLS (checked by a test)
# columns of the per-case CSV, after case and region
COLUMNS = (
    "lesionwise_dice",
    "lesionwise_hd95",
    "legacy_dice",
    "legacy_hd95",
    "num_tp",
    "num_fp",
    "num_fn",
    "sensitivity",
    "specificity",
    "precision",
    "recall",
    "f1",
    "iou",
    "gt_volume",
    "pred_volume",
)
_SEG_SUFFIX = re.compile(r"[-_]seg$", re.IGNORECASE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="prediction NIfTI file, or folder of <case_id>.nii.gz files")
    parser.add_argument(
        "--gt", required=True, help="ground-truth label file, or a cohort folder (BraTS layout) / folder of label files"
    )
    parser.add_argument("--challenge", required=True, help="GLI, SSA, MEN, MET, PED (brats2026 also GoAT, MEN-RT)")
    parser.add_argument(
        "--protocol", default="brats2023", choices=PROTOCOLS, help="evaluation rules (default brats2023)"
    )
    parser.add_argument("--penalised", action="store_true", help="brats2026: BraTS-MET penalised lesion-wise means")
    parser.add_argument("--json", metavar="OUT", help="write the metrics as JSON")
    parser.add_argument("--out", metavar="DIR", help="write <case_id>.csv per case and summary.csv here")
    parser.add_argument(
        "--postprocess",
        nargs="?",
        const="",
        default=None,
        metavar="SPEC",
        help="post-process predictions first, also reporting the scores without it; SPEC like "
        "'min_size_ET=20,min_size_TC=50,min_size_WT=100' (empty: hole filling only)",
    )


def _case_key(path: Path) -> str:
    return _SEG_SUFFIX.sub("", nifti_stem(path))


def _gt_files(root: Path) -> dict[str, Path]:
    """case id → label file, from a BraTS cohort folder or a flat folder of label files."""
    try:
        cohort = discover(root, strict=False, modalities=())  # only the labels are needed
        found = {c.case_id: c.label for c in cohort.cases if c.label is not None}
    except DataError:
        found = {}
    if found:
        case_problems = [p for p in cohort.problems if p.path != root]
        if case_problems:  # e.g. a duplicate or misnamed case: never scored silently without it
            raise case_problems[0]
    if found:
        return found
    return {_case_key(p): p for p in sorted(root.rglob("*")) if p.is_file() and is_nifti(p)}


def _pred_for(case_id: str, preds: dict[str, Path]) -> Path | None:
    if case_id in preds:
        return preds[case_id]
    digits = re.search(r"(\d{5}(?:-\d{3})?|\d{4,5})$", case_id)
    if digits:  # as brats-evaluation: a prediction whose name ends with the case number
        hits = [p for k, p in preds.items() if k.endswith(digits.group(1))]
        if len(hits) == 1:
            return hits[0]
    return None


def _pairs(pred: Path, gt: Path) -> list[tuple[str, Path, Path]]:
    if not gt.exists():
        raise DataError(gt, "does not exist")
    if not pred.exists():
        raise DataError(pred, "does not exist")
    if gt.is_file():
        if not pred.is_file():
            raise DataError(pred, "is a folder but --gt is one file; give the prediction file")
        return [(_case_key(gt), pred, gt)]
    gts = _gt_files(gt)
    if not gts:
        raise DataError(gt, "no label files found (expected a BraTS cohort or <case_id>-seg.nii.gz files)")
    if pred.is_file():
        raise DataError(pred, "is one file but --gt is a folder; give a folder of predictions")
    preds = {_case_key(p): p for p in sorted(pred.rglob("*")) if p.is_file() and is_nifti(p)}
    pairs, missing = [], []
    for case_id, label in sorted(gts.items()):
        match = _pred_for(case_id, preds)
        if match is None:
            missing.append(case_id)
        else:
            pairs.append((case_id, match, label))
    if missing:
        raise DataError(
            pred,
            f"no prediction for {len(missing)} case(s): {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else ""),
        )
    return pairs


def _load(path: Path):
    arr, img = read_volume(path, dtype=None)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise DataError(path, "label volume has fractional values; expected integer labels")
        arr = arr.astype(np.int16)
    if arr.size and arr.min() < 0:
        raise DataError(path, f"negative label {arr.min()}; expected labels >= 0")
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return arr, spacing, np.asarray(img.affine)


def _parse_spec(spec: str) -> dict:
    mapping: dict = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" not in item:
            raise ConfigError(f"--postprocess item {item!r} is not key=value")
        key, value = (x.strip() for x in item.split("=", 1))
        mapping[key] = value.lower() in ("1", "true", "yes") if key.startswith("fill_holes") else int(value)
    return mapping


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.4f}")
    return str(value)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.out:  # refused before any metric is computed
        paths.output_folder(args.out)
    if args.json:
        paths.output_file(args.json, option="--json")
    pairs = _pairs(Path(args.pred), Path(args.gt))
    post = None
    scheme = scheme_for(args.challenge, 2023 if args.protocol == "brats2023" else 2025)
    if args.postprocess is not None:
        config = PostprocessConfig.from_mapping(_parse_spec(args.postprocess))
        post = (lambda labels: postprocess(labels, scheme, config), config)

    variants = ["raw"] + (["postprocessed"] if post else [])
    results: dict[str, dict[str, dict]] = {v: {} for v in variants}
    for case_id, pred_path, gt_path in pairs:
        pred, spacing, affine = _load(pred_path)
        gt, gt_spacing, gt_affine = _load(gt_path)
        if pred.shape != gt.shape:
            raise DataError(pred_path, f"shape {pred.shape} differs from the ground truth {gt_path.name} {gt.shape}")
        if not np.allclose(spacing, gt_spacing, atol=1e-3):
            raise DataError(pred_path, f"voxel spacing {spacing} differs from the ground truth's {gt_spacing}")
        if not np.allclose(affine, gt_affine, atol=AFFINE_TOLERANCE):
            raise DataError(
                pred_path,
                f"affine ({''.join(nib.aff2axcodes(affine))}) differs from the ground truth {gt_path.name}'s "
                f"({''.join(nib.aff2axcodes(gt_affine))}) by up to {np.abs(affine - gt_affine).max():.3g} mm; "
                "write the prediction on the ground truth's grid",
            )
        check_labels(gt, scheme, source=gt_path)
        check_labels(pred, scheme, source=pred_path)
        try:
            results["raw"][case_id] = lesion_wise(
                pred, gt, args.challenge, args.protocol, gt_spacing, penalised=args.penalised
            )
            if post:
                results["postprocessed"][case_id] = lesion_wise(
                    post[0](pred), gt, args.challenge, args.protocol, gt_spacing, penalised=args.penalised
                )
        except ValueError as exc:
            raise DataError(pred_path, str(exc)) from exc

    summaries = {v: _summary(results[v]) for v in variants}
    regions = list(next(iter(results["raw"].values())))
    print(
        f"{len(pairs)} case(s), protocol {args.protocol}, challenge {args.challenge.upper()} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    header = f"{'':>14}" + "".join(f"{r:>10}" for r in regions)
    print(header)
    for v in variants:
        for key, label in (("lesionwise_dice", "LW Dice"), ("lesionwise_hd95", "LW HD95"), ("legacy_dice", "Dice")):
            name = f"{label}" + (" (pp)" if v == "postprocessed" else "")
            print(f"{name:>14}" + "".join(f"{_fmt(summaries[v][r][key]):>10}" for r in regions))

    if args.out:
        _write_csvs(Path(args.out), results, summaries, regions)
    if args.json:
        _write_json(Path(args.json), args, results, summaries, post[1] if post else None)
    return 0


def _summary(per_case: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Mean over cases of each numeric metric, per region (NaN-aware; inf kept)."""
    out: dict[str, dict[str, float]] = {}
    for values in per_case.values():
        for region, metrics in values.items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    out.setdefault(region, {}).setdefault(key, []).append(float(value))  # type: ignore[arg-type]
    return {
        region: {k: (float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else float("nan")) for k, v in m.items()}
        for region, m in out.items()
    }


def _write_csvs(out: Path, results, summaries, regions) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for variant, per_case in results.items():
        suffix = "" if variant == "raw" else "_postprocessed"
        for case_id, values in per_case.items():
            with open(out / f"{case_id}{suffix}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(("case", "region") + COLUMNS)
                for region in regions:
                    writer.writerow((case_id, region) + tuple(values[region].get(c, "") for c in COLUMNS))
        with open(out / f"summary{suffix}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(("region",) + COLUMNS)
            for region in regions:
                writer.writerow((region,) + tuple(summaries[variant][region].get(c, "") for c in COLUMNS))


def _write_json(path: Path, args, results, summaries, config) -> None:
    """One case: ``{"protocol", "challenge", "regions": {...}}``; several: ``"cases"`` + ``"summary"``.

    Non-finite numbers are written as JSON ``NaN`` / ``Infinity`` (Python's json reads them back).
    """
    doc: dict = {"protocol": args.protocol, "challenge": args.challenge.upper()}
    raw = results["raw"]
    if len(raw) == 1:
        doc["case"] = next(iter(raw))
        doc["regions"] = next(iter(raw.values()))
    else:
        doc["cases"] = {case_id: {"regions": values} for case_id, values in raw.items()}
        doc["summary"] = summaries["raw"]
    if "postprocessed" in results:
        doc["postprocess"] = config.to_dict()
        pp = results["postprocessed"]
        doc["postprocessed"] = (
            next(iter(pp.values()))
            if len(pp) == 1
            else {"cases": {k: {"regions": v} for k, v in pp.items()}, "summary": summaries["postprocessed"]}
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
