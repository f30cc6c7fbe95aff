"""Runs the reference implementations for the differential tests, inside .venv-ref.

Usage: ``.venv-ref/bin/python _reference_driver.py JOB.json OUT.json`` where JOB.json is
``{"cases": [{"id", "kind", "pred", "gt", "spacing", "config"}]}`` with ``pred``/``gt`` paths to
``.npy`` label volumes. ``kind``:

- ``"brats2026"``: brats-evaluation's bundled panoptica config ``config`` (``gli``, ``ped``,
  ``mets``, ``GoAT``, ...), evaluated on the numpy arrays with ``voxelspacing=spacing``;
  writes ``{group: PanopticaResult.to_dict(True)}`` and ``"__seconds__"`` (time of ``evaluate``).
  With ``"mets_parse": true`` the case also goes through the BraTS-MET parser
  (``parse_mets_results``, volume threshold 20), written under ``"__mets__"``.
- ``"surface"``: DeepMind ``surface_distance`` on the boolean masks ``pred != 0``/``gt != 0``;
  writes the robust Hausdorff distance at 95 and the neighbour-code area table for ``spacing``.

Non-finite floats are written as the strings "inf", "-inf", "nan". This file is test tooling
(it imports the reference packages, which live only in the reference venv).

Serve mode, for timing (``benchmarks/metrics_speed.py``): ``_reference_driver.py --serve`` reads one
case per line on stdin (the JSON of one entry of ``cases``) and answers each with one line
``@result {"id", "seconds"}`` (the time of ``evaluate`` alone; the package prints other lines), so that a caller can interleave its own
timings with the reference's, case by case.
"""

import json
import math
import sys
import time
import warnings
from importlib.resources import files

import numpy as np

if not hasattr(np, "Inf"):  # surface-distance 0.1 predates numpy 2
    np.Inf = np.inf


def _clean(value):
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return value


def main(job_path, out_path):
    with open(job_path) as f:
        job = json.load(f)
    evaluators = {}
    results = {}
    parse_queue = []
    warnings.simplefilter("ignore")
    for case in job["cases"]:
        pred = np.load(case["pred"])
        gt = np.load(case["gt"])
        spacing = tuple(float(s) for s in case["spacing"])
        if case["kind"] == "brats2026":
            from panoptica import Panoptica_Evaluator

            config = case["config"]
            if config not in evaluators:
                path = str(files("brats_evaluation").joinpath("configs", f"config_{config}.yaml"))
                evaluators[config] = Panoptica_Evaluator.load_from_config(path)
            start = time.perf_counter()
            groups = evaluators[config].evaluate(pred, gt, voxelspacing=spacing)
            results[case["id"]] = {k: r.to_dict(True) for k, r in groups.items()}
            results[case["id"]]["__seconds__"] = time.perf_counter() - start
            if case.get("mets_parse"):
                parse_queue.append(case["id"])
        elif case["kind"] == "surface":
            import surface_distance
            from surface_distance import lookup_tables

            sd = surface_distance.compute_surface_distances(gt != 0, pred != 0, spacing)
            results[case["id"]] = {
                "hd95": surface_distance.compute_robust_hausdorff(sd, 95),
                "table": lookup_tables.create_table_neighbour_code_to_surface_area(spacing).tolist(),
            }
        else:
            raise ValueError(f"unknown kind {case['kind']!r}")
    if parse_queue:
        _mets_parse(results, parse_queue, out_path)
    with open(out_path, "w") as f:
        json.dump(_clean(results), f)


def _mets_parse(results, ids, out_path):
    """Run brats-evaluation's BraTS-MET parser (penalised lesion-wise means) on the given cases."""
    import pandas as pd
    from brats_evaluation.metrics_parser import parse_mets_results

    summary = out_path + ".summary.json"
    csv = out_path + ".mets.csv"
    metrics = []
    for case_id in ids:
        entry = dict(results[case_id])
        entry["subject_name"] = case_id
        metrics.append(entry)
    with open(summary, "w") as f:
        json.dump({"metrics": metrics, "missings": []}, f, default=float)
    parse_mets_results(summary, 20.0, 0.1, csv)
    table = pd.read_csv(csv)
    for case_id in ids:
        row = table[table["subject_id"] == case_id].iloc[0].to_dict()
        results[case_id]["__mets__"] = {k: v for k, v in row.items() if k != "subject_id"}


SERVE_MARK = "@result "


def serve():
    """One case per stdin line -> one ``{"id", "seconds"}`` line on stdout (see the module docstring)."""
    from panoptica import Panoptica_Evaluator

    warnings.simplefilter("ignore")
    evaluators = {}
    for line in sys.stdin:
        if not line.strip():
            continue
        case = json.loads(line)
        config = case["config"]
        if config not in evaluators:
            path = str(files("brats_evaluation").joinpath("configs", f"config_{config}.yaml"))
            evaluators[config] = Panoptica_Evaluator.load_from_config(path)
        pred = np.load(case["pred"])
        gt = np.load(case["gt"])
        spacing = tuple(float(s) for s in case["spacing"])
        start = time.perf_counter()
        evaluators[config].evaluate(pred, gt, voxelspacing=spacing)
        seconds = time.perf_counter() - start
        sys.stdout.write(SERVE_MARK + json.dumps({"id": case["id"], "seconds": seconds}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        main(sys.argv[1], sys.argv[2])
