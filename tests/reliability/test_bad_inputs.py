"""The bad-input suite: every defect of ``_defects.DEFECTS`` through ``inspect``, ``evaluate``,
``train`` (tiny) and batch prediction (``bratstune predict``), by the real console entry point.

Each test copies a valid 3-case cohort, plants one defect and runs one command. It asserts:

* bad input: one clear line naming the file (or folder) and the problem, exit code 2 (``inspect``
  lists it and exits 1; a batch records the bad case in ``failures.csv``, predicts the others and
  exits 1, and refuses a folder it cannot use at all with exit 2); never a traceback (``main``
  re-raises anything that is not a ``BratstuneError``, which would fail the test);
* odd but valid data (anisotropic, flipped, int16/float64 mix, an extra unknown file, symlinked
  case folders, a read-only cohort): every command works;
* nothing is written outside the output folder (the cohort is unchanged, byte for byte and by
  mtime) and no partial or temporary file remains.

Per-file details of each error (exact wording, collected problems) are in tests/data/test_bad_input.py.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bratstune.cli import main

from ._defects import CASES, DEFECTS, make_writable

COMMANDS = ("inspect", "evaluate", "train", "predict")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + dirnames:
            st = os.lstat(Path(dirpath) / name)
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture()
def planted(request, base_cohort, tmp_path):
    """(name, kind, root, bad path, case id, prediction folder for evaluate) of a fresh defective cohort."""
    name = request.param
    kind, defect = DEFECTS[name]
    root = tmp_path / "cohort"
    shutil.copytree(base_cohort, root)
    case_id = sorted(p.name for p in root.iterdir())[1]
    preds = tmp_path / "preds"  # evaluate's predictions: the reference labels themselves
    preds.mkdir()
    bad = defect(root, case_id)
    # valid data: the labels as they are now (a folder of symlinks: unchanged, and rglob does not follow them)
    source = root if kind == "valid" and name != "symlinked-case-folders" else base_cohort
    for seg in source.rglob("*-seg.nii.gz"):
        shutil.copy(seg, preds / seg.name.replace("-seg", ""))
    yield name, kind, root, bad, case_id, preds
    make_writable(root)


def _error_lines(text: str, command: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"bratstune {command}: error:")]


def _argv(command: str, root: Path, preds: Path, out: Path, model: Path, config: Path) -> list[str]:
    if command == "inspect":
        return ["inspect", str(root), "--workers", "1"]
    if command == "evaluate":
        return ["evaluate", "--pred", str(preds), "--gt", str(root), "--challenge", "GLI", "--out", str(out)]
    if command == "train":
        return ["train", "--data", str(root), "--config", str(config), "--out", str(out), "--val-fraction", "0.34"]
    return ["predict", "--cohort", str(root), "--model", str(model), "--out", str(out)] + [
        "--no-mlflow",
        "--no-progress",
        "--no-thumbnails",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("planted", sorted(DEFECTS), indirect=True)
def test_defect(planted, command, tiny_model, train_yaml, tmp_path, capsys):
    name, kind, root, bad, case_id, preds = planted
    out = tmp_path / "out"
    before = _snapshot(root)
    code = main(_argv(command, root, preds, out, tiny_model, train_yaml))
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Traceback" not in text
    errors = _error_lines(captured.err, command)
    bad_input = kind in ("image", "label", "cohort") and not (kind == "label" and command == "predict")
    if command == "evaluate" and kind == "image":
        bad_input = False  # evaluate reads only the labels: every case is still scored

    if command == "inspect":
        assert code == (1 if bad_input else 0), text
        if bad_input:
            assert f"  - {bad}: " in captured.out or f"  - {bad}" in captured.out, captured.out
    elif command == "predict" and bad_input and bad != root:
        # a batch records the bad case and goes on
        assert code == 1, text
        with open(out / "failures.csv", newline="") as fh:
            failures = list(csv.DictReader(fh))
        assert len(failures) == 1 and str(bad) in failures[0]["reason"], failures
        assert "\n" not in failures[0]["reason"]
        others = [p.name for p in root.iterdir() if p.is_dir() and not (p == bad or p in bad.parents)]
        assert len(others) >= CASES - 1
        for other in others:  # the good cases are predicted
            assert (out / f"{other}-seg.nii.gz").is_file(), other
        assert f"FAILED {failures[0]['case_id']}: {failures[0]['reason']}" in captured.out
    elif bad_input:
        assert code == 2, text
        assert len(errors) == 1, captured.err
        assert errors[0].startswith(f"bratstune {command}: error: {bad}"), errors[0]
    else:  # valid data: the command works
        assert code == 0, text
        assert not errors
        if command == "evaluate":
            assert f"{CASES} case(s)" in captured.out
        if command == "train":
            assert (out / "best" / "model.pt").is_file()
        if command == "predict":
            assert len(list(out.glob("*-seg.nii.gz"))) == CASES
    # nothing written outside the output folder, no partial file
    if name != "read-only-input":
        assert _snapshot(root) == before, "the command changed the input folder"
    if out.exists():
        assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".bratstune-work")]


def test_extra_unknown_file_is_listed_as_ignored(base_cohort, tmp_path, capsys):
    root = tmp_path / "cohort"
    shutil.copytree(base_cohort, root)
    extra = DEFECTS["extra-unknown-file"][1](root, "BraTS-GLI-00001-000")
    assert main(["inspect", str(root), "--json"]) == 0
    assert str(extra) in capsys.readouterr().out  # listed among the ignored files, never read as a modality


# -- through the installed console script: the real stderr, the real exit code --------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, command",
    [("truncated-gzip", "train"), ("fractional-labels", "evaluate"), ("empty-cohort", "predict")],
)
def test_console_script_prints_one_line_and_no_traceback(name, command, base_cohort, tiny_model, train_yaml, tmp_path):
    root = tmp_path / "cohort"
    shutil.copytree(base_cohort, root)
    preds = tmp_path / "preds"
    preds.mkdir()
    for seg in base_cohort.rglob("*-seg.nii.gz"):
        shutil.copy(seg, preds / seg.name.replace("-seg", ""))
    bad = DEFECTS[name][1](root, "BraTS-GLI-00001-000")
    script = Path(sys.executable).parent / "bratstune"
    argv = _argv(command, root, preds, tmp_path / "out", tiny_model, train_yaml)
    done = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    (line,) = _error_lines(done.stderr, command)
    assert line.startswith(f"bratstune {command}: error: {bad}: ")


# -- invalid configuration ----------------------------------------------------------------------------------------

SPACE = """name: bad
metric: val/dice_mean
mode: max
num_samples: 2
base: {{epochs: 1, steps_per_epoch: 1}}
params:
  loss.weights.dice: {{distribution: uniform, low: 0.1, high: 1.0}}
{extra}
"""

BAD_SPACES = {
    "unknown-key": ("num_sampels: 3", "num_sampels"),
    "wrong-type": ("max_concurrent_trials: two", "max_concurrent_trials"),
    "negative-weight": ("  loss.weights.ce: {distribution: uniform, low: -1.0, high: 1.0}", "loss.weights.ce"),
    "empty-choices": ("  model.name: {distribution: categorical, choices: []}", "model.name"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_bad_search_space_names_the_key(case, tmp_path):
    from bratstune.errors import ConfigError
    from bratstune.search.space import load_search_space

    extra, key = BAD_SPACES[case]
    path = tmp_path / "space.yaml"
    path.write_text(SPACE.format(extra=extra))
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    message = str(info.value)
    assert key in message and "\n" not in message.strip(), message


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--set", "optim.lrr=1"], "did you mean 'lr'"),
        (["--set", "epochs=many"], "epochs"),
        (["--set", "optim.lr"], "optim.lr"),
    ],
    ids=["unknown-key", "bad-value", "no-value"],
)
def test_bad_set_override(argv, fragment, base_cohort, train_yaml, tmp_path, capsys):
    code = main(["train", "--data", str(base_cohort), "--config", str(train_yaml), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = _error_lines(err, "train")
    assert fragment in line


def test_model_uri_that_does_not_exist(base_cohort, tmp_path, capsys):
    for model in ("models:/no-such-model@champion", str(tmp_path / "no-such-folder")):
        code = main(["predict", "--cohort", str(base_cohort), "--model", model, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2, err
        (line,) = _error_lines(err, "predict")
        assert model.split("@")[0] in line or "no-such-model" in line, line


@pytest.mark.parametrize("command", ["predict", "train", "evaluate-out", "evaluate-json"])
def test_output_path_that_is_a_file(command, base_cohort, tiny_model, train_yaml, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("someone's notes")
    preds = tmp_path / "preds"
    preds.mkdir()
    for seg in base_cohort.rglob("*-seg.nii.gz"):
        shutil.copy(seg, preds / seg.name.replace("-seg", ""))
    if command == "evaluate-json":
        target.unlink()
        target.mkdir()  # --json naming a folder
        argv = ["evaluate", "--pred", str(preds), "--gt", str(base_cohort), "--challenge", "GLI", "--json", str(target)]
    else:
        argv = _argv(command.split("-")[0], base_cohort, preds, target, tiny_model, train_yaml)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = _error_lines(err, command.split("-")[0])
    assert str(target) in line
    if target.is_file():
        assert target.read_text() == "someone's notes"


@pytest.mark.parametrize("change", ["flipped", "shifted"])
def test_evaluate_refuses_a_prediction_on_another_grid(change, base_cohort, tmp_path, capsys):
    """Scored voxel for voxel, a prediction in another orientation or position would be silently wrong."""
    import nibabel as nib
    import numpy as np

    preds = tmp_path / "preds"
    preds.mkdir()
    for seg in base_cohort.rglob("*-seg.nii.gz"):
        shutil.copy(seg, preds / seg.name.replace("-seg", ""))
    bad = preds / "BraTS-GLI-00001-000.nii.gz"
    img = nib.load(bad)
    data, affine = np.asarray(img.dataobj), img.affine.copy()
    if change == "flipped":
        flip = np.diag([-1.0, 1.0, 1.0, 1.0])
        flip[0, 3] = data.shape[0] - 1
        data, affine = data[::-1], affine @ flip  # same anatomy, other orientation
    else:
        affine[:3, 3] += (7.5, 0.0, 0.0)  # one voxel off
    nib.save(nib.Nifti1Image(data, affine), str(bad))
    code = main(["evaluate", "--pred", str(preds), "--gt", str(base_cohort), "--challenge", "GLI"])
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = _error_lines(err, "evaluate")
    assert line.startswith(f"bratstune evaluate: error: {bad}: affine") and "ground truth's grid" in line
