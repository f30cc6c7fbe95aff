"""Explicit splits: nnU-Net's splits_final.json read and checked, folds from a file, case records."""

from __future__ import annotations

import json

import pytest

from bratstune.data.splits import CaseRecord, Split, load_splits, write_splits
from bratstune.errors import DataError
from bratstune.search.crossval.folds import _folds_from_file, read_gate_cases


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not JSON"),
        ("[]", "non-empty list"),
        ('{"train": [], "val": []}', "non-empty list"),
        ('[{"train": ["a"]}]', r"\[0\]: expected the keys 'train' and 'val'"),
        ('[{"train": ["a"], "val": ["b"], "test": []}]', "expected the keys"),
        ('[{"train": ["a"], "val": ["a"]}]', r"\[0\]: case\(s\) in both train and val: a"),
        ('[{"train": ["a", "a"], "val": ["b"]}]', r"\[0\]\.train: case id\(s\) listed twice: a"),
        ('[{"train": "a", "val": ["b"]}]', r"\[0\]\.train: expected a list of case-id strings"),
    ],
)
def test_bad_splits_files_name_the_file_and_the_entry(tmp_path, text, message):
    path = tmp_path / "splits_final.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        load_splits(path)
    assert str(path) in str(info.value)


def test_splits_round_trip_in_nnunet_shape(tmp_path):
    splits = [Split(("a", "b"), ("c",)), Split(("a", "c"), ("b",))]
    path = write_splits(tmp_path / "splits_final.json", splits)
    assert json.loads(path.read_text()) == [{"train": ["a", "b"], "val": ["c"]}, {"train": ["a", "c"], "val": ["b"]}]
    assert load_splits(path) == splits


IDS = ["a", "b", "c", "d", "e", "f"]


@pytest.mark.parametrize(
    "splits, gate, message",
    [
        (
            [{"train": [], "val": ["a", "x"]}, {"train": [], "val": ["b"]}],
            set(),
            r"\[0\]: case\(s\) not in the cohort: x",
        ),
        ([{"train": [], "val": ["a", "b"]}, {"train": [], "val": ["b"]}], set(), "held out by two folds"),
        ([{"train": ["c"], "val": ["a"]}, {"train": ["a"], "val": ["b"]}], set(), r"\[0\]\.train: expected exactly"),
        ([{"train": [], "val": ["a"]}, {"train": [], "val": ["b"]}], {"a"}, "both the folds and the gate"),
        ([{"train": [], "val": ["a"]}], set(), ">= 2 folds"),
    ],
)
def test_folds_from_a_splits_file_are_checked_against_the_cohort(tmp_path, splits, gate, message):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits))
    with pytest.raises(DataError, match=message):
        _folds_from_file(path, IDS, gate)


def test_folds_from_a_splits_file_and_gate_cases(tmp_path):
    path = tmp_path / "splits.json"
    path.write_text(json.dumps([{"train": ["c", "d"], "val": ["a", "b"]}, {"train": ["a", "b"], "val": ["c", "d"]}]))
    assert _folds_from_file(path, IDS, {"e", "f"}) == [[0, 1], [2, 3]]
    gate = tmp_path / "gate.json"
    gate.write_text('{"gate": ["e", "f"]}')
    assert read_gate_cases(gate) == ["e", "f"]
    gate.write_text('{"gate": "e"}')
    with pytest.raises(DataError, match="list of case ids"):
        read_gate_cases(gate)


def test_case_record_round_trip_and_what_counts_as_used(tmp_path):
    record = CaseRecord(trained=["b", "a"], selected=["c"], tuned=["a", "d"], gate=["e"], extra={"fold": 1})
    assert record.used == {"a", "b", "c", "d"}
    back = CaseRecord.from_json(record.dumps())
    assert back.trained == ["a", "b"] and back.gate == ["e"] and back.extra == {"fold": 1}
    assert CaseRecord.from_json(record.write(tmp_path / "cases.json").read_text()).to_json() == record.to_json()
    with pytest.raises(DataError, match="'tuned' must be a list"):
        CaseRecord.from_json({"tuned": "a"})


def test_train_val_from_a_splits_file_a_validation_cohort_or_a_draw(tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from bratstune.data.splits import train_val
    from bratstune.errors import ConfigError

    def case(i):
        label = np.zeros((4, 4, 4), dtype=np.uint8)
        label[: i % 4] = 1
        return SimpleNamespace(case_id=f"c{i}", label=label, spacing=(1.0, 1.0, 1.0))

    cases = [case(i) for i in range(6)]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": ["c0", "c1", "c2"], "val": ["c3"]}, {"train": [], "val": ["c0", "c1"]}]))
    data = train_val(cases, "scheme", splits=path, fold=0)
    assert [c.case_id for c in data.train] == ["c0", "c1", "c2"] and [c.case_id for c in data.val] == ["c3"]
    data = train_val(cases, "scheme", splits=path, fold=1)  # no train list: every other case trains
    assert [c.case_id for c in data.train] == ["c2", "c3", "c4", "c5"]
    with pytest.raises(DataError, match=r"--fold 2: the file has 2 fold"):
        train_val(cases, "scheme", splits=path, fold=2)
    separate = [case(10), case(11)]
    data = train_val(cases, "scheme", val_cases=separate)
    assert len(data.train) == 6 and [c.case_id for c in data.val] == ["c10", "c11"]
    with pytest.raises(DataError, match="also in the training folder: c1"):
        train_val(cases, "scheme", val_cases=[case(1)])
    with pytest.raises(ConfigError, match="either a splits file or a separate validation folder"):
        train_val(cases, "scheme", splits=path, val_cases=separate)
    drawn = train_val(cases, "scheme", val_fraction=0.5, seed=0)
    assert len(drawn.val) == 3 and not {c.case_id for c in drawn.val} & {c.case_id for c in drawn.train}
