"""Search spaces as YAML: load, validate, and turn into an Optuna define-by-run function.

A search-space file (``search_spaces/*.yaml``) declares *what* a search optimises and *how*::

    name: losses
    metric: val/dice_mean          # a metric fit() reports each epoch
    mode: max
    num_samples: 8                 # trials
    max_concurrent_trials: 2
    resources: {cpu: 1, gpu: 0}    # per trial; gpu may be fractional (0.25 = four trials per GPU)
    scheduler: {type: asha, max_t: 12, grace_period: 2, reduction_factor: 2}   # or {type: fifo}
    search: {algorithm: tpe, seed: 0, n_startup_trials: 4}                    # tpe | cmaes | random
    failure: {max_failures: 1}     # retries of a crashed trial
    base:                          # the training config every trial perturbs
      preset: unet                 # optional: a bundled preset (or a YAML path) under the keys below
      epochs: 12
    smoke: {num_samples: 2, base: {epochs: 2}}   # what --smoke-test changes (merged on the defaults)
    params:                        # dotted TrainConfig paths, sampled in this order
      loss.weights.dice:  {distribution: uniform, low: 0.0, high: 2.0}
      loss.weights.focal: {distribution: loguniform, low: 0.01, high: 5.0}
      loss.weights.focal_tversky: {distribution: categorical, choices: [0.0, 1.0]}
      loss.alpha: {distribution: uniform, low: 0.1, high: 0.9, when: "loss.weights.focal_tversky > 0"}
      _constraint: {distribution: categorical, choices: [free, one_minus_alpha]}   # "_": search-only
      loss.beta: {distribution: uniform, low: 0.1, high: 0.9,
                  when: "_constraint == free", otherwise: "1 - loss.alpha"}

Distributions (:data:`DISTRIBUTIONS`): ``uniform``/``loguniform`` (``low``, ``high``, optional
``step`` for ``uniform``), ``int``/``logint`` (``low``, ``high``, optional ``step``), ``categorical``
(``choices``: a list, or a mapping label → value for values Optuna cannot store such as lists),
``constant`` (``value``) and ``derived`` (``expr``: arithmetic over earlier parameters and the
base config, e.g. ``1 - loss.alpha``).

``when`` (``NAME OP VALUE`` with ``OP`` in ``> >= < <= == != in``) makes a parameter conditional
on earlier ones; when false the parameter is not sampled and the base config keeps its value,
unless ``otherwise`` gives a constant or an expression. The loader checks every key against the
schema (nearest-name suggestions), every parameter path against :class:`TrainConfig`, and every
reference against the parameters defined before it.
"""
from __future__ import annotations

import ast
import copy
import json
import math
import operator
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from bratstune.config_utils import check_choice, from_dict, load_yaml, suggest
from bratstune.errors import ConfigError
from bratstune.train_config import TrainConfig, load_train_config

if TYPE_CHECKING:
    import optuna

__all__ = [
    "ALGORITHMS",
    "DISTRIBUTIONS",
    "SCHEDULERS",
    "Condition",
    "FailureSpec",
    "ParamSpec",
    "ResourceSpec",
    "SchedulerSpec",
    "SearchAlgSpec",
    "SearchSpec",
    "apply_values",
    "demo_variant",
    "load_search_space",
    "load_space_file",
    "make_sampler",
]

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "categorical", "constant", "derived")
SCHEDULERS = ("asha", "fifo")
ALGORITHMS = ("tpe", "cmaes", "random")
MODES = ("max", "min")
META_PREFIX = "_"

#: What ``--smoke-test`` changes when the file's ``smoke`` section says nothing else: a few
#: tiny CPU trials (2 epochs of 2 steps on 32³ patches, validation on 2 cases).
SMOKE_DEFAULTS: dict[str, Any] = {
    "num_samples": 2,
    "max_concurrent_trials": 2,
    "resources": {"cpu": 1, "gpu": 0},
    "scheduler": {"max_t": 2, "grace_period": 1},
    "base": {
        "data": {"patch_size": [32, 32, 32], "batch_size": 2, "num_workers": 0},
        "validation": {"overlap": 0.0, "max_cases": 2},
        "epochs": 2,
        "steps_per_epoch": 2,
        "device": "cpu",
        "amp": "off",
    },
}


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive merge of plain mappings (``over`` wins; lists are replaced, not merged)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def get_path(mapping: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``mapping["a"]["b"]`` for ``"a.b"``, or ``default``."""
    node: Any = mapping
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def set_path(mapping: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``mapping["a"]["b"] = value`` for ``"a.b"``, creating mappings on the way."""
    parts = dotted.split(".")
    node = mapping
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if not isinstance(child, Mapping) else dict(child)
            node[part] = child
        node = child
    node[parts[-1]] = value


def apply_values(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The base config with every non-meta parameter value written at its dotted path."""
    out = copy.deepcopy(dict(base))
    for name, value in values.items():
        if not name.startswith(META_PREFIX):
            set_path(out, name, copy.deepcopy(value))
    return out


# -- expressions and conditions -------------------------------------------------------------------

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}
_FUNCS = {"min": min, "max": max, "abs": abs, "round": round}
_NAME = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*")


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


@dataclass(frozen=True)
class Expression:
    """Small arithmetic expression over parameter names, e.g. ``1 - loss.alpha``.

    Allowed: numbers, dotted names, ``+ - * / **``, unary minus, ``min``, ``max``, ``abs``, ``round``.
    """

    text: str
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, where: str) -> Expression:
        try:
            tree = ast.parse(str(text), mode="eval")
        except SyntaxError:
            raise ConfigError(f"{where}: cannot parse expression {text!r} (e.g. '1 - loss.alpha')") from None
        names: list[str] = []

        def check(node: ast.AST) -> None:
            if isinstance(node, ast.Expression):
                check(node.body)
            elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
                pass
            elif isinstance(node, (ast.Name, ast.Attribute)):
                name = _dotted(node)
                if name is None:
                    raise ConfigError(f"{where}: unsupported name in {text!r}")
                names.append(name)
            elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
                check(node.left)
                check(node.right)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
                check(node.operand)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS:
                for arg in node.args:
                    check(arg)
            else:
                raise ConfigError(
                    f"{where}: unsupported syntax in expression {text!r}; use numbers, parameter names, "
                    f"+ - * / ** and {sorted(_FUNCS)}"
                )

        check(tree)
        return cls(str(text), tuple(dict.fromkeys(n for n in names if n not in _FUNCS)))

    def evaluate(self, lookup: Callable[[str], Any]) -> float:
        tree = ast.parse(self.text, mode="eval")

        def ev(node: ast.AST) -> Any:
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, (ast.Name, ast.Attribute)):
                return lookup(_dotted(node))  # type: ignore[arg-type]
            if isinstance(node, ast.BinOp):
                return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
            if isinstance(node, ast.UnaryOp):
                value = ev(node.operand)
                return -value if isinstance(node.op, ast.USub) else value
            if isinstance(node, ast.Call):
                return _FUNCS[node.func.id](*(ev(a) for a in node.args))  # type: ignore[union-attr]
            raise ConfigError(f"cannot evaluate {self.text!r}")  # pragma: no cover - parse() rejects it

        return float(ev(tree))


_COMPARE = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
            "<": operator.lt, "in": lambda a, b: a in b}
_CONDITION = re.compile(r"^\s*(?P<name>[A-Za-z_][\w.]*)\s*(?P<op>>=|<=|==|!=|>|<|\bin\b)\s*(?P<value>.+?)\s*$")


@dataclass(frozen=True)
class Condition:
    """``NAME OP VALUE``: the parameter is sampled only when it holds (VALUE read as YAML)."""

    name: str
    op: str
    value: Any
    text: str

    @classmethod
    def parse(cls, text: Any, where: str) -> Condition:
        match = _CONDITION.match(str(text))
        if not match:
            raise ConfigError(
                f"{where}: cannot read condition {text!r}; expected 'NAME OP VALUE' with OP one of "
                f"{list(_COMPARE)}, e.g. 'loss.weights.focal_tversky > 0'"
            )
        raw = match["value"]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        op = match["op"]
        if op == "in" and not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: 'in' needs a list, e.g. 'model.name in [unet, resunet]'; got {raw!r}")
        return cls(match["name"], op, value, str(text))

    def holds(self, values: Mapping[str, Any]) -> bool:
        """False when the referenced parameter was not sampled (its own condition failed)."""
        if self.name not in values:
            return False
        try:
            return bool(_COMPARE[self.op](values[self.name], self.value))
        except TypeError:
            return False


# -- parameters ------------------------------------------------------------------------------------


def _label(value: Any) -> str:
    """Optuna-storable label of a non-scalar choice: ``[encoder, middle]`` -> ``encoder+middle``."""
    if isinstance(value, (list, tuple)):
        return "+".join(str(v) for v in value) if value else "none"
    return json.dumps(value, sort_keys=True, default=str)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass(frozen=True)
class ParamSpec:
    """One searched (or fixed/derived) parameter, named by its dotted config path."""

    name: str
    distribution: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()
    labels: tuple[Any, ...] = ()  # what Optuna stores for each choice (== choices when scalar)
    value: Any = None
    expr: Expression | None = None
    when: Condition | None = None
    otherwise: Any = None  # a constant or an Expression
    has_otherwise: bool = False

    @property
    def is_meta(self) -> bool:
        """Search-only parameter (``_name``): steers conditions, never written into the config."""
        return self.name.startswith(META_PREFIX)

    @property
    def references(self) -> tuple[str, ...]:
        refs: list[str] = []
        if self.when is not None:
            refs.append(self.when.name)
        if self.expr is not None:
            refs.extend(self.expr.names)
        if isinstance(self.otherwise, Expression):
            refs.extend(self.otherwise.names)
        return tuple(refs)

    def sample(self, trial: optuna.Trial, lookup: Callable[[str], Any]) -> Any:
        """Draw this parameter from ``trial`` (Optuna's suggest API)."""
        d = self.distribution
        if d in ("uniform", "loguniform"):
            return trial.suggest_float(self.name, self.low, self.high, log=d == "loguniform", step=self.step)
        if d in ("int", "logint"):
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=d == "logint",
                                     step=int(self.step or 1))
        if d == "categorical":
            label = trial.suggest_categorical(self.name, list(self.labels))
            return copy.deepcopy(self.choices[list(self.labels).index(label)])
        if d == "constant":
            return copy.deepcopy(self.value)
        return self.expr.evaluate(lookup)  # type: ignore[union-attr]

    def fallback(self, lookup: Callable[[str], Any]) -> Any:
        return self.otherwise.evaluate(lookup) if isinstance(self.otherwise, Expression) else copy.deepcopy(self.otherwise)

    def probe_values(self) -> list[Any]:
        """Values that together exercise every edge of the distribution (for validation)."""
        if self.distribution in ("uniform", "loguniform", "int", "logint"):
            cast = int if self.distribution in ("int", "logint") else float
            return [cast(self.low), cast(self.high)]
        if self.distribution == "categorical":
            return list(self.choices)
        if self.distribution == "constant":
            return [self.value]
        return []

    def describe(self) -> dict[str, Any]:
        """Plain mapping for the resolved-space artifact."""
        out: dict[str, Any] = {"distribution": self.distribution}
        for key in ("low", "high", "step"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.distribution == "categorical":
            out["choices"] = {str(lab): ch for lab, ch in zip(self.labels, self.choices)}
        if self.distribution == "constant":
            out["value"] = self.value
        if self.expr is not None:
            out["expr"] = self.expr.text
        if self.when is not None:
            out["when"] = self.when.text
        if self.has_otherwise:
            out["otherwise"] = self.otherwise.text if isinstance(self.otherwise, Expression) else self.otherwise
        return out


_PARAM_KEYS = ("distribution", "low", "high", "step", "choices", "value", "expr", "when", "otherwise")
_REQUIRED = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "int": ("low", "high"),
    "logint": ("low", "high"),
    "categorical": ("choices",),
    "constant": ("value",),
    "derived": ("expr",),
}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return out


def parse_param(name: str, entry: Any, where: str) -> ParamSpec:
    """Validate one ``params`` entry (see the module docstring)."""
    where = f"{where}.{name}"
    if not _NAME.fullmatch(str(name)):
        raise ConfigError(f"{where}: a parameter name is a dotted config path such as 'loss.weights.dice'")
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping such as {{distribution: uniform, low: 0.0, high: 1.0}}, got {entry!r}"
        )
    for key in entry:
        if key not in _PARAM_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, _PARAM_KEYS)}; valid keys: {list(_PARAM_KEYS)}")
    if "distribution" not in entry:
        raise ConfigError(f"{where}: missing 'distribution' (one of {list(DISTRIBUTIONS)})")
    dist = str(entry["distribution"])
    if dist not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: unknown distribution '{dist}'{suggest(dist, DISTRIBUTIONS)}; expected one of {list(DISTRIBUTIONS)}"
        )
    for key in _REQUIRED[dist]:
        if key not in entry:
            raise ConfigError(f"{where}: distribution '{dist}' needs '{key}'")
    allowed = set(_REQUIRED[dist]) | {"distribution", "when", "otherwise"}
    if dist in ("uniform", "int", "logint"):
        allowed.add("step")
    extra = sorted(set(entry) - allowed)
    if extra:
        raise ConfigError(f"{where}: key(s) {extra} do not apply to distribution '{dist}' (allowed: {sorted(allowed)})")
    kwargs: dict[str, Any] = {}
    if "low" in _REQUIRED[dist]:
        low, high = _number(entry["low"], f"{where}.low"), _number(entry["high"], f"{where}.high")
        if low > high:
            raise ConfigError(f"{where}: low ({low}) must not exceed high ({high})")
        if dist in ("loguniform", "logint") and low <= 0:
            raise ConfigError(f"{where}: '{dist}' needs low > 0, got {low} (use 'uniform' to include 0)")
        if dist in ("int", "logint") and (not float(low).is_integer() or not float(high).is_integer()):
            raise ConfigError(f"{where}: '{dist}' needs integer bounds, got {low}..{high}")
        kwargs.update(low=low, high=high)
        if entry.get("step") is not None:
            step = _number(entry["step"], f"{where}.step")
            if step <= 0:
                raise ConfigError(f"{where}: step must be > 0, got {step}")
            if dist == "logint" and step != 1:
                raise ConfigError(f"{where}: 'logint' supports only step 1")
            kwargs["step"] = step
    if dist == "categorical":
        raw = entry["choices"]
        if isinstance(raw, Mapping):
            labels, choices = tuple(str(k) for k in raw), tuple(raw.values())
        elif isinstance(raw, (list, tuple)):
            choices = tuple(raw)
            labels = tuple(c if _is_scalar(c) else _label(c) for c in choices)
        else:
            raise ConfigError(f"{where}.choices: expected a list or a mapping label -> value, got {raw!r}")
        if not choices:
            raise ConfigError(f"{where}.choices: expected at least one choice")
        if len(set(map(repr, labels))) != len(labels):
            raise ConfigError(f"{where}.choices: duplicate choices {list(labels)}")
        kwargs.update(choices=choices, labels=labels)
    if dist == "constant":
        kwargs["value"] = entry["value"]
    if dist == "derived":
        kwargs["expr"] = Expression.parse(entry["expr"], f"{where}.expr")
    if entry.get("when") is not None:
        kwargs["when"] = Condition.parse(entry["when"], f"{where}.when")
    if "otherwise" in entry:
        if "when" not in entry:
            raise ConfigError(f"{where}: 'otherwise' needs a 'when' condition")
        other = entry["otherwise"]
        kwargs["otherwise"] = Expression.parse(other, f"{where}.otherwise") if isinstance(other, str) else other
        kwargs["has_otherwise"] = True
    return ParamSpec(name=str(name), distribution=dist, **kwargs)


# -- the spec ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceSpec:
    """Per-trial resources: CPUs (also torch threads) and a fraction or number of GPUs."""

    cpu: float = 1.0
    gpu: float = 0.0

    def __post_init__(self) -> None:
        if self.cpu <= 0:
            raise ConfigError(f"resources.cpu: expected > 0 (fractions allowed), got {self.cpu!r}")
        if self.gpu < 0:
            raise ConfigError(f"resources.gpu: expected >= 0 (fractions allowed), got {self.gpu!r}")

    def as_tune(self) -> dict[str, float]:
        return {"cpu": float(self.cpu), "gpu": float(self.gpu)}


@dataclass(frozen=True)
class SchedulerSpec:
    """Trial scheduler: ``asha`` (early stopping) or ``fifo`` (every trial runs to the end).

    ``max_t`` (epochs; default the base config's ``epochs``), ``grace_period`` (epochs before a
    trial may be stopped) and ``reduction_factor`` (keep 1/η of the trials at each rung).
    """

    type: str = "asha"
    max_t: int | None = None
    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        check_choice(self.type, SCHEDULERS, "scheduler.type")
        if self.grace_period < 1:
            raise ConfigError(f"scheduler.grace_period: expected >= 1, got {self.grace_period!r}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"scheduler.reduction_factor: expected > 1, got {self.reduction_factor!r}")
        if self.max_t is not None and self.max_t < self.grace_period:
            raise ConfigError(
                f"scheduler: max_t ({self.max_t}) must be >= grace_period ({self.grace_period})"
            )


@dataclass(frozen=True)
class SearchAlgSpec:
    """Optuna sampler behind ``ray.tune.search.optuna.OptunaSearch``."""

    algorithm: str = "tpe"
    seed: int = 0
    n_startup_trials: int = 4

    def __post_init__(self) -> None:
        check_choice(self.algorithm, ALGORITHMS, "search.algorithm")
        if self.n_startup_trials < 0:
            raise ConfigError(f"search.n_startup_trials: expected >= 0, got {self.n_startup_trials!r}")


@dataclass(frozen=True)
class FailureSpec:
    """How often a crashed trial is retried (``ray.tune.FailureConfig(max_failures=...)``)."""

    max_failures: int = 1


@dataclass(frozen=True)
class DataSpec:
    """How the cohort is split and preprocessed before the search (once, shared by all trials)."""

    val_fraction: float = 0.25
    split_seed: int = 0
    preprocess: dict[str, Any] = field(default_factory=dict)
    share: str = "cache"  # "cache" (on-disk memmaps) or "object_store" (ray.put, no shared FS needed)

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: expected 0 < value < 1, got {self.val_fraction!r}")
        check_choice(self.share, ("cache", "object_store"), "data.share")


@dataclass(frozen=True)
class SearchSpec:
    """A validated search space (see the module docstring for the YAML)."""

    name: str
    metric: str
    mode: str
    num_samples: int
    params: tuple[ParamSpec, ...]
    base: dict[str, Any]
    max_concurrent_trials: int = 2
    resources: ResourceSpec = field(default_factory=ResourceSpec)
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    search: SearchAlgSpec = field(default_factory=SearchAlgSpec)
    failure: FailureSpec = field(default_factory=FailureSpec)
    data: DataSpec = field(default_factory=DataSpec)
    description: str = ""
    smoke: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    # -- derived views ---------------------------------------------------------------------------

    def base_config(self) -> TrainConfig:
        return load_train_config(self.base)

    @property
    def max_t(self) -> int:
        """Epochs of the longest trial (the scheduler's ``max_t``, at most the base ``epochs``)."""
        epochs = int(self.base_config().epochs)
        return min(self.scheduler.max_t or epochs, epochs)

    def lookup(self, values: Mapping[str, Any]) -> Callable[[str], Any]:
        """Name resolver for expressions: sampled values first, then the base config."""

        def find(name: str) -> Any:
            if name in values:
                return values[name]
            found = get_path(self.base, name)
            if found is None:
                found = get_path(self.base_config().to_dict(), name)
            if found is None:
                raise ConfigError(f"search space {self.name}: '{name}' is neither a parameter nor set in base")
            return found

        return find

    def define_by_run(self, trial: optuna.Trial) -> dict[str, Any]:
        """Optuna define-by-run function: samples every parameter in order, honouring ``when``.

        Returns the complete flat ``{dotted name: value}`` mapping (choices resolved to their
        values, derived and constant parameters included); Ray's ``OptunaSearch`` merges it over
        the sampled values, so it becomes the trial's config.
        """
        values: dict[str, Any] = {}
        for param in self.params:
            lookup = self.lookup(values)
            if param.when is not None and not param.when.holds(values):
                if param.has_otherwise:
                    values[param.name] = param.fallback(lookup)
                continue
            values[param.name] = param.sample(trial, lookup)
        return values

    def train_config(self, values: Mapping[str, Any]) -> TrainConfig:
        """The validated :class:`TrainConfig` of one trial's values."""
        return load_train_config(apply_values(self.base, values))

    def config_dict(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return self.train_config(values).to_dict()

    def resolved(self) -> dict[str, Any]:
        """Plain mapping of everything the search uses (logged as ``resolved_space.yaml``)."""
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "mode": self.mode,
            "num_samples": self.num_samples,
            "max_concurrent_trials": self.max_concurrent_trials,
            "resources": self.resources.as_tune(),
            "scheduler": {**self.scheduler.__dict__, "max_t": self.max_t},
            "search": dict(self.search.__dict__),
            "failure": dict(self.failure.__dict__),
            "data": dict(self.data.__dict__),
            "params": {p.name: p.describe() for p in self.params},
            "base": self.base_config().to_dict(),
            "source": str(self.source) if self.source else None,
        }

    def with_changes(self, **changes: Any) -> SearchSpec:
        """A copy with top-level fields replaced (``num_samples=8``, ``base=...``)."""
        return replace(self, **changes)

    def smoke_variant(self) -> SearchSpec:
        """The tiny CPU-only variant ``--smoke-test`` runs (``SMOKE_DEFAULTS`` + the file's ``smoke``)."""
        return _variant(self, deep_merge(SMOKE_DEFAULTS, self.smoke), "smoke")


def _variant(spec: SearchSpec, overrides: Mapping[str, Any], label: str) -> SearchSpec:
    raw = deep_merge(spec.raw, {k: v for k, v in overrides.items() if k != "base"})
    raw["base"] = deep_merge(spec.base, overrides.get("base", {}))
    raw.pop("smoke", None)
    return parse_spec(raw, source=spec.source, where=f"{spec.source or spec.name} ({label})")


def demo_variant(spec: SearchSpec, *, num_samples: int = 6, epochs: int = 4, steps_per_epoch: int = 10) -> SearchSpec:
    """The ``make demo`` search: the smoke-sized CPU network, a few trials of a few epochs, ASHA
    with grace period 1 so early stopping is visible (about 2-3 minutes on 2 cores)."""
    smoke = spec.smoke_variant()
    return _variant(smoke, {
        "num_samples": num_samples,
        "scheduler": {"type": "asha", "max_t": epochs, "grace_period": 1, "reduction_factor": 2},
        "base": {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "validation": {"max_cases": 4}},
    }, "demo")


KINDS = ("train", "thresholds")
_TOP_KEYS = ("kind", "name", "description", "metric", "mode", "num_samples", "max_concurrent_trials", "resources",
             "scheduler", "search", "failure", "data", "base", "params", "smoke")


def _load_base(raw: Any, where: str, source: Path | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}.base: expected a TrainConfig mapping, got {raw!r}")
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    candidate = Path(str(preset))
    if source is not None and not candidate.is_absolute():
        candidate = source.parent / candidate
    if str(preset).endswith((".yaml", ".yml")):
        base = load_yaml(candidate)
    else:
        from bratstune.presets import load_preset

        base = load_preset(str(preset))
    return deep_merge(base, raw)


def _section(cls: type, raw: Mapping[str, Any], key: str, where: str) -> Any:
    value = raw.get(key)
    if value is None:
        return cls()
    return from_dict(cls, value, where=f"{where}.{key}")


def _check_params(params: Sequence[ParamSpec], base: dict[str, Any], where: str) -> None:
    from bratstune.losses import TERMS

    seen: list[str] = []
    for p in params:
        if p.name in seen:
            raise ConfigError(f"{where}.params: '{p.name}' is defined twice")
        for ref in p.references:
            if ref in seen:
                continue
            if ref.startswith(META_PREFIX) or ref in [q.name for q in params]:
                raise ConfigError(
                    f"{where}.params.{p.name}: refers to '{ref}', which must be defined before it"
                    f"{suggest(ref, seen)}"
                )
            if get_path(base, ref) is None and get_path(load_train_config(base).to_dict(), ref) is None:
                raise ConfigError(
                    f"{where}.params.{p.name}: '{ref}' is not a parameter defined before it nor a base-config key"
                    f"{suggest(ref, seen)}"
                )
        seen.append(p.name)
        if p.is_meta:
            continue
        parts = p.name.split(".")
        if parts[:2] == ["data", "preprocess"]:
            raise ConfigError(
                f"{where}.params.{p.name}: preprocessing is prepared once before the search and shared by all "
                "trials; set it under data.preprocess of the space instead of searching it"
            )
        if parts[:2] == ["loss", "weights"] and (len(parts) != 3 or parts[2] not in TERMS):
            term = parts[2] if len(parts) > 2 else ""
            raise ConfigError(
                f"{where}.params.{p.name}: unknown loss term '{term}'{suggest(term, TERMS)}; expected one of {list(TERMS)}"
            )
        if parts[:2] == ["model", "kwargs"] and len(parts) >= 3:
            from bratstune.models import ARCHITECTURES, architecture_options

            known = sorted({k for arch in ARCHITECTURES for k in architecture_options(arch)})
            if parts[2] not in known:
                raise ConfigError(
                    f"{where}.params.{p.name}: no architecture has an option '{parts[2]}'{suggest(parts[2], known)}"
                )
        for value in p.probe_values():
            try:
                load_train_config(apply_values(base, {p.name: value}))
            except ConfigError as exc:
                raise ConfigError(f"{where}.params.{p.name} = {value!r}: {exc}") from None


def parse_spec(raw: Mapping[str, Any], *, source: Path | None = None, where: str | None = None) -> SearchSpec:
    """Validate a search-space mapping (what :func:`load_search_space` reads from YAML)."""
    where = where or str(source or "search space")
    raw = dict(raw)
    kind = check_choice(str(raw.get("kind", "train")), KINDS, "kind")
    if kind != "train":
        raise ConfigError(
            f"{where}: kind '{kind}' is a threshold search over cached probabilities; load it with "
            "bratstune.threshold_search.load_threshold_space (jobs/search_thresholds.py)"
        )
    for key in raw:
        if key not in _TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}'{suggest(key, _TOP_KEYS)}; valid keys: {list(_TOP_KEYS)}")
    for key in ("metric", "params"):
        if key not in raw:
            raise ConfigError(f"{where}: missing '{key}'")
    name = str(raw.get("name") or (source.stem if source else "search"))
    metric = str(raw["metric"])
    if not metric.startswith(("val/", "train/")):
        raise ConfigError(f"{where}.metric: expected a reported metric such as 'val/dice_mean', got {metric!r}")
    mode = check_choice(str(raw.get("mode", "max")), MODES, "mode")
    num_samples = int(raw.get("num_samples", 8))
    if num_samples < 1:
        raise ConfigError(f"{where}.num_samples: expected >= 1, got {num_samples}")
    concurrent = int(raw.get("max_concurrent_trials", 2))
    if concurrent < 1:
        raise ConfigError(f"{where}.max_concurrent_trials: expected >= 1, got {concurrent}")
    base = _load_base(raw.get("base"), where, source)
    try:
        base_cfg = load_train_config(base)
    except ConfigError as exc:
        raise ConfigError(f"{where}.base: {exc}") from None
    params_raw = raw["params"]
    if not isinstance(params_raw, Mapping) or not params_raw:
        raise ConfigError(f"{where}.params: expected a non-empty mapping of dotted config paths to distributions")
    params = tuple(parse_param(str(k), v, f"{where}.params") for k, v in params_raw.items())
    _check_params(params, base, where)
    smoke = raw.get("smoke") or {}
    if not isinstance(smoke, Mapping):
        raise ConfigError(f"{where}.smoke: expected a mapping, got {smoke!r}")
    spec = SearchSpec(
        name=name,
        metric=metric,
        mode=mode,
        num_samples=num_samples,
        params=params,
        base=base,
        max_concurrent_trials=concurrent,
        resources=_section(ResourceSpec, raw, "resources", where),
        scheduler=_section(SchedulerSpec, raw, "scheduler", where),
        search=_section(SearchAlgSpec, raw, "search", where),
        failure=_section(FailureSpec, raw, "failure", where),
        data=_section(DataSpec, raw, "data", where),
        description=str(raw.get("description") or ""),
        smoke=dict(smoke),
        source=source,
        raw=dict(raw),
    )
    if spec.scheduler.max_t is not None and spec.scheduler.max_t > base_cfg.epochs:
        raise ConfigError(
            f"{where}.scheduler.max_t ({spec.scheduler.max_t}) exceeds base epochs ({base_cfg.epochs}); "
            "lower max_t or raise base.epochs"
        )
    return spec


def load_search_space(path: str | Path) -> SearchSpec:
    """Read and validate a search-space YAML file.

    Raises:
        ConfigError: naming the file, the key and the fix (nearest valid name where one exists).
    """
    path = Path(path).resolve()
    return parse_spec(load_yaml(path), source=path, where=str(path))


def load_space_file(path: str | Path) -> Any:
    """Load any file of ``search_spaces/``: a :class:`SearchSpec` (``kind: train``, the default)
    or a ``bratstune.threshold_search.ThresholdSpec`` (``kind: thresholds``)."""
    path = Path(path).resolve()
    raw = load_yaml(path)
    if str(raw.get("kind", "train")) == "thresholds":
        from bratstune.threshold_search import parse_threshold_space

        return parse_threshold_space(raw, source=path)
    return parse_spec(raw, source=path, where=str(path))


def make_sampler(spec: SearchSpec, *, algorithm: str | None = None) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of ``spec.search`` (``algorithm`` overrides it, e.g. ``random``)."""
    import optuna

    algorithm = check_choice(algorithm or spec.search.algorithm, ALGORITHMS, "search.algorithm")
    seed = spec.search.seed
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # multivariate/group are "experimental" in Optuna, and stable
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        tpe = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.search.n_startup_trials, multivariate=True, group=True
        )
    if algorithm == "tpe":
        return tpe
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=spec.search.n_startup_trials,
                                        independent_sampler=tpe, warn_independent_sampling=False)
