"""MLflow filter strings built from user-given names: quoted, never broken or extended by a quote."""

from __future__ import annotations

import pytest

from bratstune.errors import ConfigError
from bratstune.tracking.filters import equals, literal, tag_equals


@pytest.mark.parametrize(
    "value, expected",
    [
        ("plain", "'plain'"),
        ("it's", '"it\'s"'),
        ('say "hi"', "'say \"hi\"'"),
        ("back\\slash", "'back\\slash'"),
        (3, "'3'"),
    ],
)
def test_literal_uses_the_quote_the_value_lacks(value, expected):
    assert literal(value) == expected


def test_a_value_with_both_quotes_is_refused_not_mangled():
    with pytest.raises(ConfigError, match="both ' and \""):
        literal('it\'s "x"')
    with pytest.raises(ConfigError, match="tag name"):
        tag_equals("a`b", "x")
    assert equals("name", "m") == "name = 'm'"
    assert tag_equals("mlflow.parentRunId", "abc") == "tags.`mlflow.parentRunId` = 'abc'"


@pytest.mark.mlflow
def test_names_with_quotes_find_exactly_their_runs_and_models(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from bratstune.ensemble.registry import list_models
    from bratstune.search.callback import find_trial_run
    from bratstune.search.parent_run import find_parent_run

    client = MlflowClient()
    experiment_id = client.create_experiment("filters", artifact_location=str(tmp_path / "a"))
    names = ["plain", "o'brien", "x' or tags.`search.experiment` = 'plain", 'say "hi"']
    runs = {}
    for name in names:
        run = client.create_run(experiment_id, tags={"search.experiment": name, "ray_trial_id": name})
        runs[name] = run.info.run_id
    missing = tmp_path / "no-meta"  # no bratstune_search.json: the tag lookup is used
    for name in names:
        assert find_parent_run(client, experiment_id, str(missing), name) == runs[name], name
    assert find_parent_run(client, experiment_id, str(missing), "nobody' or '1' = '1") is None
    parent = runs["plain"]
    child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent, "ray_trial_id": "t'1"}).info.run_id
    assert find_trial_run(client, experiment_id, parent, "t'1") == child

    for model in ("o'brien-gli", "plain-gli"):
        client.create_registered_model(model)
        client.create_model_version(model, source=str(tmp_path / "src"), tags={"selection.metric": "m"})
    rows = list_models("o'brien-gli", client=client)
    assert [(r["name"], r["version"]) for r in rows] == [("o'brien-gli", "1")]


@pytest.mark.mlflow
def test_listing_an_unknown_model_is_one_clear_line(mlflow_store):
    from bratstune.ensemble.registry import list_models
    from bratstune.errors import DataError

    with pytest.raises(DataError, match='no registered model "nobody\'s"'):
        list_models("nobody's")
