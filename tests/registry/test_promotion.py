"""The promotion gate compares like with like: both models on the same held-out cases, paired.

Pure parts (bootstrap, decision rule, which cases count) are tables; the integration test uses a
real SQLite registry, real (untrained, seeded) ensembles and real NIfTI gate cases. Two decode
settings make the planted difference: threshold 0 labels the whole brain box as tumour (a poor
but non-zero lesion-wise Dice), threshold 1 labels nothing (Dice 0 on every lesion).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from bratstune.data.splits import CaseRecord
from bratstune.ensemble.gate import GateSpec, PairedDifference, decide, gate_case_ids, paired_bootstrap
from bratstune.errors import ConfigError

from .conftest import make_member


def test_paired_bootstrap_signs_the_difference_in_favour_of_the_candidate():
    rng = np.random.default_rng(0)
    champion = {f"c{i}": float(v) for i, v in enumerate(rng.uniform(0.4, 0.8, 12))}
    candidate = {c: v + 0.1 + float(rng.normal(0, 0.02)) for c, v in champion.items()}
    better = paired_bootstrap(candidate, champion, metric="dice_lesion_mean")
    assert better.mean == pytest.approx(np.mean([candidate[c] - champion[c] for c in champion]))
    assert 0.05 < better.low < better.mean < better.high < 0.15
    hd = paired_bootstrap(candidate, champion, metric="hd95_lesion_mean", mode="min")  # lower is better
    assert hd.mean == pytest.approx(-better.mean) and hd.high < 0
    same = paired_bootstrap(champion, champion)
    assert same.mean == same.low == same.high == 0.0
    assert paired_bootstrap(candidate, champion, seed=3).low == paired_bootstrap(candidate, champion, seed=3).low
    with pytest.raises(ConfigError, match="no case is scored by both"):
        paired_bootstrap({"a": 1.0}, {"b": 1.0})


def _evidence(mean: float, low: float, high: float, n: int = 5) -> PairedDifference:
    cases = [f"c{i}" for i in range(n)]
    return PairedDifference("dice_lesion_mean", "max", cases, [0.5] * n, [0.5 - mean] * n, mean, low, high, 0.95, 2000)


@pytest.mark.parametrize(
    "gate, evidence, promoted",
    [
        (GateSpec(), _evidence(0.05, 0.01, 0.09), True),
        (GateSpec(), _evidence(0.05, -0.01, 0.11), False),  # positive on average, not beyond doubt
        (GateSpec(rule="mean"), _evidence(0.05, -0.01, 0.11), True),
        (GateSpec(rule="mean", margin=0.06), _evidence(0.05, -0.01, 0.11), False),
        (GateSpec(margin=0.02), _evidence(0.05, 0.01, 0.09), False),
        (GateSpec(min_cases=6), _evidence(0.05, 0.01, 0.09, n=5), False),
        (GateSpec(), _evidence(0.0, 0.0, 0.0), False),  # a tie never promotes
    ],
)
def test_decision_rule_and_margin(gate, evidence, promoted):
    decision, reason = decide(evidence, gate)
    assert decision is promoted
    assert "held-out gate case" in reason and "interval" in reason


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"mode": "up"}, "gate.mode"),
        ({"rule": "median"}, "gate.rule"),
        ({"confidence": 1.0}, "gate.confidence"),
        ({"metric": "lesion_dice"}, "gate.metric: expected"),
    ],
)
def test_gate_spec_validation(mapping, message):
    with pytest.raises(ConfigError, match=message):
        GateSpec(**mapping)


def test_cases_either_model_trained_selected_or_tuned_on_never_count():
    candidate = CaseRecord(trained=["t1"], selected=["s1"], tuned=["u1"], gate=["g1", "g2", "g3", "t1", "x"])
    champion = CaseRecord(trained=["x"], gate=["g1"])
    ids, excluded = gate_case_ids(candidate, champion)
    assert ids == ["g1", "g2", "g3"]
    assert excluded == {"t1": "the candidate trained on it", "x": "the champion trained on it"}
    ids, _ = gate_case_ids(candidate, champion, override=["u1", "g2"])
    assert ids == ["g2"]


# -- with a registry -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gate_cohort(tmp_path_factory):
    from bratstune.data.layout import discover
    from bratstune.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("gate-cohort")
    generate_cohort(root, challenge="GLI", cases=6, shape=(32, 32, 32), anatomy="procedural", seed=11, workers=1)
    return root, sorted(c.case_id for c in discover(root).cases)


def _ensemble(seed: int, threshold: float, record: CaseRecord, root, in_sample: float):
    from bratstune.ensemble.package import Ensemble
    from bratstune.inference.sliding_window import InferenceConfig

    return Ensemble.from_members(
        [make_member(seed)],
        scheme="brats2023",
        challenge="GLI",
        inference=InferenceConfig(overlap=0.25, flips=False),
        thresholds=threshold,
        lineage={"cases": record.dumps(), "data_root": str(root)},
        metrics={"cv/in_sample/dice_lesion_mean": in_sample},  # what the old gate compared
    )


def _register(ensemble, name: str) -> tuple[str, str]:
    from bratstune.ensemble.registry import register_ensemble
    from bratstune.tracking.runs import setup_mlflow, start_run

    with start_run(run_name="register", experiment_id=setup_mlflow("promotion-test")) as run:
        version = register_ensemble(ensemble, name=name, metric="cv/in_sample/dice_lesion_mean").version
    return str(version), run.info.run_id


def _artifact(run_id: str, path: str, dst) -> str:
    import mlflow

    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst))).read_text()


@pytest.mark.mlflow
def test_the_gate_refuses_a_candidate_better_only_in_sample(mlflow_store, gate_cohort, tmp_path):
    from mlflow.tracking import MlflowClient

    from bratstune.ensemble.promotion import CHAMPION, PREVIOUS, promote

    client = MlflowClient()
    name = "bratstune-gate"
    root, ids = gate_cohort
    trained, gate = ids[:2], ids[2:]
    champion = CaseRecord(trained=trained, tuned=trained, gate=gate)
    v1, _ = _register(_ensemble(0, 0.0, champion, root, in_sample=0.10), name)
    first = promote(name, v1)
    assert first.promoted and first.reason == "no champion yet" and first.evidence is None

    # better in-sample (0.99 vs 0.10), worse on the shared held-out cases; it also trained on one gate case
    candidate = CaseRecord(trained=[*trained, gate[0]], tuned=trained, gate=gate)
    v2, run2 = _register(_ensemble(1, 1.0, candidate, root, in_sample=0.99), name)
    refused = promote(name, v2)
    assert not refused.promoted and not refused.forced
    assert refused.excluded == {gate[0]: "the candidate trained on it"}
    assert refused.evidence.cases == gate[1:] and refused.evidence.high < 0
    assert refused.value == 0.0 and refused.champion_value > 0.0
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {CHAMPION: v1}
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.decision"] == "rejected" and tags["gate.cases"] == "3"
    assert float(tags["gate.ci_high"]) < 0 and tags["gate.metric"] == "dice_lesion_mean"
    run = client.get_run(run2)
    assert run.data.metrics["gate/promoted"] == 0.0 and run.data.metrics["gate/difference"] < 0
    table = list(csv.DictReader(io.StringIO(_artifact(run2, "gate/cases.csv", tmp_path / "a"))))
    assert [row["case_id"] for row in table] == gate[1:] and all(float(r["difference"]) < 0 for r in table)

    # --force moves the alias anyway, and says so
    forced = promote(name, v2, force=True)
    assert forced.promoted and forced.forced and forced.reason.startswith("forced")
    tags = client.get_model_version(name, v2).tags
    assert tags["promotion.forced"] == "true"
    decision = json.loads(_artifact(run2, "gate/decision.json", tmp_path / "b"))
    assert decision["forced"] is True and decision["decision"] == "promoted" and decision["cases"] == 3

    # a candidate that really is better on the held-out cases wins on its own
    v3, run3 = _register(_ensemble(2, 0.0, champion, root, in_sample=0.05), name)
    won = promote(name, v3)
    assert won.promoted and not won.forced and won.evidence.low > 0
    assert {k: str(v) for k, v in client.get_registered_model(name).aliases.items()} == {CHAMPION: v3, PREVIOUS: v2}
    assert client.get_run(run3).data.metrics["gate/promoted"] == 1.0


@pytest.mark.mlflow
def test_a_version_without_case_lists_is_not_compared(mlflow_store, gate_cohort):
    from bratstune.ensemble.package import Ensemble
    from bratstune.ensemble.promotion import promote

    name = "bratstune-gate-unknown"
    root, ids = gate_cohort
    v1, _ = _register(_ensemble(0, 0.5, CaseRecord(trained=ids[:2], gate=ids[2:]), root, in_sample=0.1), name)
    assert promote(name, v1).promoted
    bare = Ensemble.from_members(
        [make_member(1)], scheme="brats2023", challenge="GLI", metrics={"cv/in_sample/dice_lesion_mean": 0.9}
    )
    v2, _ = _register(bare, name)
    result = promote(name, v2)
    assert not result.promoted and "records no case lists" in result.reason and "--force" in result.reason
