"""The promotion gate: move the alias ``champion`` to a registered version only when it wins.

:func:`promote` gives a version the alias ``champion`` only when it beats the current champion on
the recorded validation metric (strictly; ``mode`` max or min), or when ``force=True`` (tagged
``promotion.forced=true`` and logged as a warning); the replaced champion gets the alias
``previous``. Every decision is tagged on the candidate version (``promotion.decision``,
``promotion.reason``, ``promotion.time``, ``promotion.forced``, ``promotion.compared_to``).

The values compared are the ``metric.<name>`` tags written at registration
(:func:`bratstune.ensemble.registry.register_ensemble`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bratstune.errors import BratstuneError, ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CHAMPION", "PREVIOUS", "Promotion", "PromotionError", "promote", "promotion_summary"]

CHAMPION = "champion"
PREVIOUS = "previous"


class PromotionError(BratstuneError):
    """The promotion gate cannot decide (no recorded metric, unknown version ...)."""


@dataclass
class Promotion:
    """Outcome of :func:`promote`."""

    name: str
    version: str
    promoted: bool
    forced: bool
    reason: str
    metric: str
    value: float | None
    champion_version: str | None = None
    champion_value: float | None = None
    previous_version: str | None = None


def _alias_version(client: Any, name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _recorded(version: Any, metric: str) -> float | None:
    raw = (version.tags or {}).get(f"metric.{metric}")
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _decide(result: Promotion, champion: Any, *, mode: str, force: bool) -> None:
    """Set ``result.promoted`` and ``result.reason`` (the champion is another version)."""
    name, metric, value, champion_value = result.name, result.metric, result.value, result.champion_value
    if champion is None:
        result.promoted, result.reason = True, "no champion yet"
    elif champion_value is None and not force:
        raise PromotionError(
            f"the champion ({name} version {champion.version}) has no recorded {metric!r}; "
            "compare on a metric both versions record, or use --force"
        )
    elif (
        champion_value is not None
        and value is not None
        and (value > champion_value if mode == "max" else value < champion_value)
    ):
        result.promoted = True
        result.reason = f"{metric} {value:.4f} beats the champion's {champion_value:.4f} (v{champion.version})"
    elif force:
        result.promoted = True
        result.reason = f"forced: {metric} {value} does not beat the champion's {champion_value} (v{champion.version})"
    else:
        result.reason = (
            f"{metric} {value:.4f} does not beat the champion's {champion_value:.4f} "
            f"(v{champion.version}, mode {mode}); champion unchanged"
        )


def _record(client: Any, result: Promotion, champion: Any, *, force: bool) -> None:
    """Tag the decision on the candidate; move the aliases when it was promoted."""
    name, version = result.name, result.version
    tags = {
        "promotion.decision": "promoted" if result.promoted else "rejected",
        "promotion.reason": result.reason,
        "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "promotion.forced": str(bool(force and result.promoted)).lower(),
        "promotion.compared_to": result.champion_version or "",
    }
    for key, tag in tags.items():
        client.set_model_version_tag(name, version, key, tag[:5000])
    if not result.promoted:
        logger.info("%s version %s not promoted: %s", name, version, result.reason)
        return
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(champion.version))
        result.previous_version = str(champion.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    if force:
        logger.warning("FORCED promotion of %s version %s to %s: %s", name, version, CHAMPION, result.reason)
    else:
        logger.info("promoted %s version %s to %s: %s", name, version, CHAMPION, result.reason)


def promote(
    name: str,
    version: str | int,
    *,
    metric: str,
    mode: str = "max",
    force: bool = False,
    client: Any = None,
) -> Promotion:
    """Give ``version`` the alias ``champion`` if it beats the current champion on ``metric``.

    The comparison uses the ``metric.<metric>`` tags recorded at registration; a tie does not
    promote. With ``force`` the alias moves regardless (tag ``promotion.forced=true``, warning
    logged). The replaced champion gets the alias ``previous``.

    Raises:
        PromotionError: the candidate has no recorded ``metric``, or the champion lacks it
            (without ``force``).
    """
    if mode not in ("max", "min"):
        raise ConfigError(f"mode: expected 'max' or 'min', got {mode!r}")
    client = client if client is not None else MlflowClient()
    version = str(version)
    value = _recorded(client.get_model_version(name, version), metric)
    if value is None and not force:
        raise PromotionError(
            f"{name} version {version} has no recorded {metric!r} (tag metric.{metric}); "
            "register it with that metric or use --force"
        )
    champion = _alias_version(client, name, CHAMPION)
    result = Promotion(name, version, False, bool(force), "", metric, value)
    if champion is not None:
        result.champion_version = str(champion.version)
        result.champion_value = _recorded(champion, metric)
        if result.champion_version == version:
            result.reason = f"version {version} already is the champion"
            return result
    _decide(result, champion, mode=mode, force=force)
    _record(client, result, champion, force=force)
    return result


def promotion_summary(p: Promotion) -> str:
    """One line for logs and the CLI."""
    state = "PROMOTED" if p.promoted else "kept champion"
    return json.dumps(
        {
            "decision": state,
            "name": p.name,
            "version": p.version,
            "forced": p.forced,
            "reason": p.reason,
            "previous": p.previous_version,
        }
    )
