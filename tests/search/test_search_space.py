"""Search-space YAML: every shipped file loads; validation names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from bratstune.errors import ConfigError
from bratstune.search.params import DISTRIBUTIONS
from bratstune.search.sections import make_sampler
from bratstune.search.space import load_search_space, load_space_file, parse_spec
from bratstune.search.threshold_space import ThresholdSpec, parse_threshold_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _minimal(**changes):
    raw = {
        "name": "t",
        "metric": "val/dice_mean",
        "mode": "max",
        "num_samples": 4,
        # ce keeps a positive weight when dice draws 0 (LossConfig refuses all-zero weights)
        "base": {"epochs": 4, "loss": {"weights": {"dice": 1.0, "ce": 1.0}}},
        "params": {"loss.weights.dice": {"distribution": "uniform", "low": 0.0, "high": 2.0}},
    }
    raw.update(changes)
    return raw


def _draw(spec, n=12, seed=0):
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(spec.define_by_run(trial))
        study.tell(trial, 0.0)
    return out


def test_there_are_search_spaces():
    names = {p.stem for p in SPACES}
    assert {"losses", "tversky", "thresholds", "frozen_layers", "architectures"} <= names


@pytest.mark.parametrize("path", SPACES, ids=[p.stem for p in SPACES])
def test_every_space_loads_and_samples(path):
    spec = load_space_file(path)
    if isinstance(spec, ThresholdSpec):
        assert spec.metric and spec.params
        assert spec.smoke_variant().num_samples <= spec.num_samples
        return
    assert spec.num_samples >= 1 and spec.max_t >= spec.scheduler.grace_period
    for values in _draw(spec, n=6):
        config = spec.train_config(values)  # every draw is a valid TrainConfig
        assert config.epochs >= 1
    smoke = spec.smoke_variant()
    assert smoke.num_samples <= 4 and smoke.base_config().epochs <= 2
    assert smoke.resources.gpu == 0 and smoke.base_config().device == "cpu"
    make_sampler(spec)


def test_ray_optuna_search_accepts_the_define_by_run_function():
    from ray.tune.search.optuna import OptunaSearch

    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml")
    searcher = OptunaSearch(space=spec.define_by_run, metric=spec.metric, mode=spec.mode, sampler=make_sampler(spec))
    config = searcher.suggest("trial_1")
    assert "loss.weights.dice" in config and "loss.weights.edge" in config
    spec.train_config(config)


def test_unknown_distribution_suggests_the_closest_name():
    raw = _minimal(params={"loss.weights.dice": {"distribution": "log_uniform", "low": 0.1, "high": 1.0}})
    with pytest.raises(ConfigError, match="did you mean 'loguniform'"):
        parse_spec(raw)
    assert "loguniform" in DISTRIBUTIONS


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"metrik": "val/dice_mean"}, "did you mean 'metric'"),
        ({"params": {"loss.weights.dise": {"distribution": "uniform", "low": 0, "high": 1}}}, "did you mean 'dice'"),
        ({"params": {"optim.lrr": {"distribution": "loguniform", "low": 1e-4, "high": 1e-2}}}, "did you mean 'lr'"),
        ({"params": {"loss.weights.dice": {"distribution": "loguniform", "low": 0.0, "high": 1.0}}}, "needs low > 0"),
        ({"params": {"loss.weights.dice": {"distribution": "uniform", "low": 2, "high": 1}}}, "must not exceed"),
        ({"params": {"loss.weights.dice": {"distribution": "uniform", "low": 0, "high": 1, "hig": 2}}}, "did you mean"),
        (
            {"params": {"loss.alpha": {"distribution": "uniform", "low": 0.1, "high": 0.9, "when": "_x == 1"}}},
            "defined before",
        ),
        (
            {"params": {"loss.alpha": {"distribution": "uniform", "low": 0, "high": 1, "when": "alpha is big"}}},
            "cannot read condition",
        ),
        ({"params": {"loss.beta": {"distribution": "derived", "expr": "1 - __import__('os')"}}}, "unsupported"),
        (
            {"params": {"model.kwargs.filterz": {"distribution": "categorical", "choices": [[8, 16, 32, 64]]}}},
            "did you mean 'filters'",
        ),
        ({"scheduler": {"type": "hyperband"}}, "unknown scheduler.type"),
        ({"search": {"algorithm": "tpe2"}}, "did you mean 'tpe'"),
        ({"scheduler": {"max_t": 10}}, "exceeds base epochs"),
        ({"params": {"data.patch_size": {"distribution": "categorical", "choices": [[0, 1, 2]]}}}, "data.patch_size"),
        ({"params": {"data.preprocess.margin": {"distribution": "int", "low": 0, "high": 4}}}, "prepared once"),
    ],
)
def test_validation_errors_name_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(_minimal(**changes))


def test_conditional_tversky_parameters_only_when_the_term_is_on():
    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml")
    draws = _draw(spec, n=30)
    on = [d for d in draws if d["loss.weights.focal_tversky"] > 0]
    off = [d for d in draws if d["loss.weights.focal_tversky"] == 0]
    assert on and off
    assert all({"loss.alpha", "loss.beta", "loss.gamma"} <= set(d) for d in on)
    assert not any({"loss.alpha", "loss.beta", "loss.gamma"} & set(d) for d in off)
    config = spec.train_config(off[0])  # the base config keeps its Tversky values
    assert config.loss.weights["focal_tversky"] == 0.0


def test_constrained_tversky_variant_sets_beta_to_one_minus_alpha():
    spec = load_search_space(ROOT / "search_spaces" / "tversky.yaml")
    draws = _draw(spec, n=20)
    constrained = [d for d in draws if d["_beta"] == "one_minus_alpha"]
    free = [d for d in draws if d["_beta"] == "free"]
    assert constrained and free
    for d in constrained:
        assert d["loss.beta"] == pytest.approx(1.0 - d["loss.alpha"])
        config = spec.train_config(d)
        assert config.loss.beta == pytest.approx(1.0 - config.loss.alpha)
        assert "_beta" not in config.to_dict()  # meta parameters steer the search only


def test_categorical_labels_map_to_group_lists():
    spec = load_search_space(ROOT / "search_spaces" / "frozen_layers.yaml")
    freeze = next(p for p in spec.params if p.name == "freeze")
    assert "encoder+middle" in freeze.labels
    seen = {tuple(spec.train_config(d).freeze) for d in _draw(spec, n=30)}
    assert () in seen and any(len(s) == 2 for s in seen)


def test_base_preset_and_resolved_space_round_trip(tmp_path):
    spec = load_search_space(ROOT / "search_spaces" / "losses.yaml")
    resolved = spec.resolved()
    assert resolved["base"]["model"]["name"] == "unet"
    assert resolved["params"]["loss.alpha"]["when"] == "loss.weights.focal_tversky > 0"
    yaml.safe_dump(resolved)  # plain data, loggable as an artifact


def test_threshold_space_validation():
    raw = yaml.safe_load((ROOT / "search_spaces" / "thresholds.yaml").read_text())
    spec = parse_threshold_space(raw)
    assert spec.metric == "dice_lesion_mean" and spec.mode == "max"
    bad = dict(raw, params={"treshold.WT": {"distribution": "uniform", "low": 0.1, "high": 0.9}})
    with pytest.raises(ConfigError, match="did you mean 'thresholds.WT'"):
        parse_threshold_space(bad)
    bad = dict(raw, params={"thresholds.WT": {"distribution": "uniform", "low": 0.1, "high": 1.5}})
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        parse_threshold_space(bad)
    bad = dict(raw, params={"min_size.ET": {"distribution": "int", "low": -5, "high": 10}})
    with pytest.raises(ConfigError, match="non-negative"):
        parse_threshold_space(bad)
    with pytest.raises(ConfigError, match="threshold search"):
        parse_spec(raw)


def test_demo_variant_is_small_and_uses_asha():
    from bratstune.search.tune import demo_variant

    space = load_search_space(ROOT / "search_spaces" / "losses.yaml")
    spec = demo_variant(space)
    assert spec.num_samples == 6 and spec.scheduler.type == "asha" and spec.max_t == 4
    assert spec.base_config().epochs == 4 and spec.resources.gpu == 0
    # the demo searches the network `bratstune train` trains, not the smoke-sized one
    assert spec.base_config().model == space.base_config().model
    assert spec.base_config().data.patch_size == space.base_config().data.patch_size


# -- expressions: bounded cost ------------------------------------------------------------------


def test_a_tower_of_powers_in_yaml_fails_fast_with_one_line(tmp_path):
    import time

    path = tmp_path / "space.yaml"
    raw = _minimal(params={"loss.beta": {"distribution": "derived", "expr": "9**9**9"}})
    path.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_search_space(path)
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "params.loss.beta.expr" in message
    assert "literal exponent" in message


@pytest.mark.parametrize(
    "expr, message",
    [
        ("2 ** 100", "literal exponent"),
        ("loss.alpha ** loss.alpha", "literal exponent"),
        ("(2 ** 8) ** 9", "literal exponent"),
        ("1 + " * 80 + "1", "at most 200"),
        ("abs(" * 20 + "1" + ")" * 20, "nests deeper"),
        ("-" * 40 + "1", "nests deeper"),
        ("max(1, key=2)", "unsupported"),
        ("True + 1", "unsupported"),
    ],
)
def test_expressions_beyond_the_bounds_are_refused(expr, message):
    from bratstune.search.params import Expression

    with pytest.raises(ConfigError, match=message):
        Expression.parse(expr, "space.yaml: params.x.expr")


def test_small_powers_still_work_and_overflow_is_a_config_error():
    from bratstune.search.params import Expression

    values = {"loss.alpha": 0.3}
    assert Expression.parse("1 - loss.alpha ** 2", "e").evaluate(values.get) == pytest.approx(0.91)
    assert Expression.parse("2 ** -3", "e").evaluate(values.get) == 0.125
    with pytest.raises(ConfigError, match="cannot evaluate"):
        Expression.parse("1e300 ** 8", "e").evaluate(values.get)
    with pytest.raises(ConfigError, match="cannot evaluate"):
        Expression.parse("1 / (loss.alpha - 0.3)", "e").evaluate(values.get)
