"""MLflow search filters built from names a user gave, quoted so that no name can break or extend them.

MLflow's filter grammar (``search_runs``, ``search_model_versions``...) has no escape sequence:
a string literal is whatever lies between a pair of single or double quotes, taken as it is
(checked on MLflow 3.17: ``tags.k = "it's"`` matches ``it's``; backslashes are literal). So a
value is quoted with the quote character it does not contain, and a value holding both cannot be
written as a literal at all: :func:`literal` refuses it rather than build a filter that means
something else (``x' or tags.k = 'y`` would otherwise match other runs).
"""

from __future__ import annotations

import re

from bratstune.errors import ConfigError

__all__ = ["equals", "literal", "tag_equals"]

_TAG_NAME = re.compile(r"[A-Za-z0-9_.\-/ :]+")


def literal(value: object) -> str:
    """``value`` as an MLflow filter string literal: ``'value'``, or ``"value"`` if it holds a ``'``.

    Raises:
        ConfigError: the value holds both quote characters (MLflow cannot match it exactly).
    """
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    raise ConfigError(
        f"{text!r}: a name holding both ' and \" cannot be searched for in MLflow (its filters have "
        "no escape sequence); choose a name without one of them"
    )


def equals(attribute: str, value: object) -> str:
    """``attribute = <literal>``, e.g. ``equals("name", "bratstune-gli")`` -> ``name = 'bratstune-gli'``."""
    return f"{attribute} = {literal(value)}"


def tag_equals(tag: str, value: object) -> str:
    """``tags.`tag` = <literal>`` (the tag name back-quoted, so dots and dashes are safe).

    Raises:
        ConfigError: a tag name outside letters, digits and ``_ . - / : space``.
    """
    if not _TAG_NAME.fullmatch(tag):
        raise ConfigError(f"tag name {tag!r}: expected letters, digits and _ . - / : or space")
    return f"tags.`{tag}` = {literal(value)}"
