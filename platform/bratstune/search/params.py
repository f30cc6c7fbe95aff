"""Parameters of a search space: distributions, conditions, derived expressions, dotted paths.

One :class:`ParamSpec` per ``params:`` entry of a search-space YAML (see
:mod:`bratstune.search.space` for the file format). Expressions and conditions are parsed with
``ast`` into a tiny whitelisted evaluator (arithmetic, comparisons, ``min``/``max``/``abs``/
``round``) -- written by hand because no maintained library offers a safe evaluator this small.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError

if TYPE_CHECKING:
    import optuna

DISTRIBUTIONS = ("uniform", "loguniform", "int", "logint", "categorical", "constant", "derived")
META_PREFIX = "_"


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


def _power(base: Any, exponent: Any) -> float:
    return float(base) ** float(exponent)  # float: an overflow raises at once instead of growing an int


_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: _power,
}
_FUNCS = {"min": min, "max": max, "abs": abs, "round": round}
#: bounds that keep an expression's cost small whatever a YAML file holds (``9**9**9`` never runs)
MAX_EXPRESSION_CHARS = 200
MAX_EXPRESSION_DEPTH = 16
MAX_EXPONENT = 8.0


def _literal_exponent(node: ast.AST) -> float | None:
    """The value of a literal exponent (``2``, ``-0.5``), else ``None``."""
    sign = 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
        node = node.operand
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return sign * float(node.value)
    return None


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

    Allowed: numbers, dotted names, ``+ - * /``, ``**`` with a literal exponent of at most
    :data:`MAX_EXPONENT` in size (``x ** 2``, ``2 ** -3``; never ``9**9**9``), unary minus, ``min``,
    ``max``, ``abs``, ``round``. At most :data:`MAX_EXPRESSION_CHARS` characters and
    :data:`MAX_EXPRESSION_DEPTH` levels of nesting, so evaluating one costs next to nothing.
    """

    text: str
    names: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, where: str) -> Expression:
        text = str(text)
        if len(text) > MAX_EXPRESSION_CHARS:
            raise ConfigError(f"{where}: expression of {len(text)} characters; at most {MAX_EXPRESSION_CHARS}")
        try:
            tree = ast.parse(text, mode="eval")
        except (SyntaxError, RecursionError, MemoryError):
            raise ConfigError(f"{where}: cannot parse expression {text!r} (e.g. '1 - loss.alpha')") from None
        names: list[str] = []

        def check(node: ast.AST, depth: int = 0) -> None:
            if depth > MAX_EXPRESSION_DEPTH:
                raise ConfigError(f"{where}: expression {text!r} nests deeper than {MAX_EXPRESSION_DEPTH} levels")
            if isinstance(node, ast.Expression):
                check(node.body, depth + 1)
            elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
                pass
            elif isinstance(node, (ast.Name, ast.Attribute)):
                name = _dotted(node)
                if name is None:
                    raise ConfigError(f"{where}: unsupported name in {text!r}")
                names.append(name)
            elif isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
                if isinstance(node.op, ast.Pow):
                    exponent = _literal_exponent(node.right)
                    if exponent is None or abs(exponent) > MAX_EXPONENT:
                        raise ConfigError(
                            f"{where}: '**' in {text!r} needs a literal exponent between -{MAX_EXPONENT:g} "
                            f"and {MAX_EXPONENT:g} (e.g. 'x ** 2')"
                        )
                check(node.left, depth + 1)
                check(node.right, depth + 1)
            elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
                check(node.operand, depth + 1)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in _FUNCS
                and not node.keywords
            ):
                for arg in node.args:
                    check(arg, depth + 1)
            else:
                raise ConfigError(
                    f"{where}: unsupported syntax in expression {text!r}; use numbers, parameter names, "
                    f"+ - * / ** (literal exponent) and {sorted(_FUNCS)}"
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

        try:
            return float(ev(tree))
        except ConfigError:
            raise
        except (ArithmeticError, TypeError, ValueError) as exc:
            raise ConfigError(f"cannot evaluate expression {self.text!r}: {exc}") from None


_COMPARE = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    "in": lambda a, b: a in b,
}
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
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=d == "logint", step=int(self.step or 1)
            )
        if d == "categorical":
            label = trial.suggest_categorical(self.name, list(self.labels))
            return copy.deepcopy(self.choices[list(self.labels).index(label)])
        if d == "constant":
            return copy.deepcopy(self.value)
        return self.expr.evaluate(lookup)  # type: ignore[union-attr]

    def fallback(self, lookup: Callable[[str], Any]) -> Any:
        return (
            self.otherwise.evaluate(lookup) if isinstance(self.otherwise, Expression) else copy.deepcopy(self.otherwise)
        )

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


def _distribution(entry: Any, where: str) -> str:
    """The entry's distribution, after checking its keys against the schema and the distribution."""
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping such as {{distribution: uniform, low: 0.0, high: 1.0}}, got {entry!r}"
        )
    for key in entry:
        if key not in _PARAM_KEYS:
            raise ConfigError(
                f"{where}: unknown key '{key}'{suggest(key, _PARAM_KEYS)}; valid keys: {list(_PARAM_KEYS)}"
            )
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
    return dist


def _bounds(entry: Mapping[str, Any], dist: str, where: str) -> dict[str, Any]:
    """``low``, ``high`` and ``step`` of a numeric distribution."""
    low, high = _number(entry["low"], f"{where}.low"), _number(entry["high"], f"{where}.high")
    if low > high:
        raise ConfigError(f"{where}: low ({low}) must not exceed high ({high})")
    if dist in ("loguniform", "logint") and low <= 0:
        raise ConfigError(f"{where}: '{dist}' needs low > 0, got {low} (use 'uniform' to include 0)")
    if dist in ("int", "logint") and (not float(low).is_integer() or not float(high).is_integer()):
        raise ConfigError(f"{where}: '{dist}' needs integer bounds, got {low}..{high}")
    kwargs: dict[str, Any] = {"low": low, "high": high}
    if entry.get("step") is not None:
        step = _number(entry["step"], f"{where}.step")
        if step <= 0:
            raise ConfigError(f"{where}: step must be > 0, got {step}")
        if dist == "logint" and step != 1:
            raise ConfigError(f"{where}: 'logint' supports only step 1")
        kwargs["step"] = step
    return kwargs


def _choices(raw: Any, where: str) -> dict[str, Any]:
    """``choices`` and the ``labels`` Optuna stores for them (a list, or a mapping label -> value)."""
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
    return {"choices": choices, "labels": labels}


def parse_param(name: str, entry: Any, where: str) -> ParamSpec:
    """Validate one ``params`` entry (see the module docstring)."""
    where = f"{where}.{name}"
    if not _NAME.fullmatch(str(name)):
        raise ConfigError(f"{where}: a parameter name is a dotted config path such as 'loss.weights.dice'")
    dist = _distribution(entry, where)
    kwargs: dict[str, Any] = {}
    if "low" in _REQUIRED[dist]:
        kwargs.update(_bounds(entry, dist, where))
    if dist == "categorical":
        kwargs.update(_choices(entry["choices"], where))
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
