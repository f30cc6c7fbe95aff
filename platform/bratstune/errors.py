"""Errors raised for bad user input: each names the file (or key) and the problem."""

from __future__ import annotations

from pathlib import Path


class BratstuneError(Exception):
    """Base class of every error the platform raises on purpose."""


class DataError(BratstuneError, ValueError):
    """A problem with an input file or folder.

    Args:
        path: the file or folder at fault.
        problem: one line saying what is wrong and, where possible, the fix.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    def __reduce__(self):  # Ray and copy.copy rebuild exceptions from these arguments
        return (type(self), (self.path, self.problem))


class ConfigError(BratstuneError, ValueError):
    """A problem with a configuration value or key (YAML, CLI `--set`, search space)."""
