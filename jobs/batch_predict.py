"""Batch prediction job: ``python jobs/batch_predict.py --cohort DIR --model models:/bratstune-gli@champion --out DIR``.

Same arguments as ``bratstune predict`` (``--workers N`` for N Ray actors, ``--watch INBOX
--interval S`` to poll, ``--address`` / ``RAY_ADDRESS`` for a cluster); exit code 1 when a case
failed (see ``failures.csv``), 2 on a usage error. Runs the same under
``ray job submit --working-dir . -- python jobs/batch_predict.py ...``.

``--smoke-test`` needs nothing else: it generates a 3-case synthetic GLI cohort and a one-member
ensemble (a tiny unet fitted for 4 steps) under ``BRATSTUNE_HOME``, then predicts the cohort with
2 Ray workers into ``<home>/results/smoke-predict/out`` (each flag given still wins).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import _bootstrap
from bratstune import paths
from bratstune.commands import predict
from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val
from bratstune.data.synthetic import generate_cohort
from bratstune.ensemble.package import Ensemble
from bratstune.labels import scheme_for
from bratstune.training.fit import fit

SMOKE_MEMBER = {
    "model": {"name": "unet", "kwargs": {"filters": [8, 16, 32], "deep_supr_num": 1}},
    "data": {"patch_size": 24, "num_workers": 0},
    "epochs": 1,
    "steps_per_epoch": 4,
    "num_threads": 1,
    "device": "cpu",
    "amp": "off",
    "challenge": "GLI",
    "validation": {"lesion_metrics": False},
}


def _smoke_inputs(work: Path) -> tuple[Path, Path]:
    """``(cohort, ensemble folder)``: 3 cases to predict, and a model trained on 4 others."""
    train, cohort = work / "train", work / "cohort"
    for folder, cases, seed, start in ((train, 4, 0, 0), (cohort, 3, 1, 100)):
        if not (folder / ".complete").is_file():
            generate_cohort(
                folder, challenge="GLI", cases=cases, shape=(32, 32, 32), anatomy="procedural", seed=seed,
                start_index=start, workers=1,
            )  # fmt: skip
            (folder / ".complete").write_text("ok\n")
    prepared = prepare_cohort(train, preprocess_config({}), cache_root=work / "cache")
    result = fit(
        SMOKE_MEMBER, split_train_val(prepared.cases, scheme_for("GLI"), val_fraction=0.25), out_dir=work / "fit"
    )
    ensemble = Ensemble.from_members(
        [result], scheme=scheme_for("GLI"), challenge="GLI", inference={"flips": False}, lineage={"smoke": "true"}
    )
    return cohort, ensemble.save(work / "ensemble")


def _with_smoke_inputs(argv: list[str]) -> list[str]:
    """``argv`` plus ``--cohort``, ``--model``, ``--out`` and ``--workers 2`` where not given."""
    work = paths.results_dir() / "smoke-predict"
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra: list[str] = []
    if not given & {"--cohort", "--watch"} or "--model" not in given:
        cohort, model = _smoke_inputs(work)
        if not given & {"--cohort", "--watch"}:
            extra += ["--cohort", str(cohort)]
        if "--model" not in given:
            extra += ["--model", str(model)]
    if "--out" not in given:
        extra += ["--out", str(work / "out")]
    if "--workers" not in given:
        extra += ["--workers", "2"]
    return [a for a in argv if a != "--smoke-test"] + extra


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    predict.add_arguments(parser)
    parser.add_argument("--smoke-test", action="store_true", help="tiny synthetic cohort and model, 2 Ray workers")
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if "--smoke-test" in argv:
        argv = _with_smoke_inputs(argv)
    args = parser.parse_args(argv)
    # N workers: Ray actors on the cluster (--address / $RAY_ADDRESS) or on a local Ray of N CPUs.
    with _bootstrap.session(ray=args.workers > 1, address=args.address, num_cpus=args.workers, log_to_driver=False):
        return predict.run(args)


if __name__ == "__main__":
    sys.exit(main())
