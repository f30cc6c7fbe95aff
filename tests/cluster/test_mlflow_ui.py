"""The MLflow UI in a real browser after a smoke search against ``bratstune up``.

Headless Chromium (Debian's ``chromium``, with a fresh profile: no remembered UI mode) opens

* the link the search job printed (``#/experiments/ID?workflowType=machine_learning``): the runs
  table must show (not MLflow 3's GenAI overview), with the search's parent run and its cohort in
  the Dataset column;
* the comparison of the search's child runs (``#/compare-runs?runs=[...]``): its parallel
  coordinates plot must show the searched parameters and the objective (each trial logs it first),
  and its tables the trials, their values and ``best/<metric>``.

The assertions read the rendered DOM (``--dump-dom``); screenshots of both pages are kept in
``test-artifacts/``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = [pytest.mark.services, pytest.mark.ray, pytest.mark.mlflow, pytest.mark.slow, pytest.mark.stack]

CHROMIUM = shutil.which("chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _chromium(url: str, profile: Path, *args: str) -> str:
    command = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        f"--user-data-dir={profile}", "--window-size=1600,1200", "--virtual-time-budget=20000",
        *args, url,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _page(url: str, tmp_path: Path, screenshot: str) -> tuple[str, str]:
    """``(visible text, markup of the SVG plots)`` of ``url`` as rendered; its screenshot saved."""
    dom = _chromium(url, tmp_path / "profile-dom", "--dump-dom")
    ARTIFACTS.mkdir(exist_ok=True)
    _chromium(url, tmp_path / "profile-shot", f"--screenshot={ARTIFACTS / screenshot}")
    assert (ARTIFACTS / screenshot).stat().st_size > 10_000
    markup = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    svg = " ".join(re.findall(r"<svg.*?</svg>", markup, flags=re.S))
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", markup)).replace("&nbsp;", " ")
    return text, re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", svg))


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (`make system-packages` as root)")
def test_the_ui_opens_on_the_runs_table_and_compares_the_trials(stack, submitted_jobs, tmp_path):
    search = submitted_jobs["search_losses"]
    assert search.status == "SUCCEEDED", search.logs[-3000:]
    uri = stack["record"]["mlflow"]["tracking_uri"]
    client = MlflowClient(uri)
    best_run = client.get_run(re.search(r"\(MLflow run ([0-9a-f]{32})\)", search.logs).group(1))
    parent = client.get_run(best_run.data.tags["mlflow.parentRunId"])
    experiment_id = parent.info.experiment_id
    trials = client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50
    )
    cohort = parent.inputs.dataset_inputs[0].dataset
    objective = parent.data.params["metric"]
    searched = sorted(k.removeprefix("best.") for k in parent.data.params if k.startswith("best."))
    assert len(trials) >= 2 and cohort.name and objective and searched

    # the experiment, as the link the job printed opens it: the runs table, with the cohort
    link = re.search(r"compare the trials: (\S+)", search.logs).group(1)
    assert link == f"{uri}/#/experiments/{experiment_id}?workflowType=machine_learning"
    text, _ = _page(link, tmp_path, "mlflow-experiment-runs.png")
    for column in ("Run Name", "Created", "Dataset", "Duration"):
        assert column in text, column
    assert re.search(r"\d+ matching runs", text), text[:2000]
    assert "Token Usage" not in text and "Tokens per Trace" not in text  # not the GenAI overview
    assert parent.info.run_name in text and cohort.name in text

    # the comparison of the trials: parallel coordinates of searched parameters vs the objective
    ids = [t.info.run_id for t in trials]
    compare = (
        f"{uri}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}"
    )
    text, plot = _page(compare, tmp_path, "mlflow-compare-trials.png")
    assert f"Comparing {len(ids)} Runs" in text and "Parallel Coordinates Plot" in text
    assert objective in plot, plot[:2000]  # the objective is the plotted metric ...
    plotted = [name for name in searched if name in plot]
    assert plotted, (searched, plot[:2000])  # ... against searched parameters
    for trial in trials:
        assert trial.info.run_name in text  # each trial a column of the tables below
    assert f"best/{objective}" in text  # the value the search ranked each trial by
    assert all(name in text for name in searched if not name.startswith("_"))
    print(f"compare view: plotted parameters {plotted} against {objective}; cohort {cohort.name}")
