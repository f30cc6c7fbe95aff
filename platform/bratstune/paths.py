"""Where the embedded defaults live, resolved lazily (importing touches no disk).

`BRATSTUNE_HOME` (default `./.bratstune`) holds the MLflow SQLite store, its artifacts,
the preprocessing cache and Ray Tune results; `BRATSTUNE_CACHE` and `BRATSTUNE_DATA`
override the cache and the data folder on their own.
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The platform's working folder (absolute)."""
    return Path(os.environ.get("BRATSTUNE_HOME", ".bratstune")).expanduser().resolve()


def cache_dir() -> Path:
    """Root of the preprocessed-case cache."""
    env = os.environ.get("BRATSTUNE_CACHE")
    return Path(env).expanduser().resolve() if env else home() / "cache"


def data_dir() -> Path:
    """Default folder for generated or user cohorts."""
    env = os.environ.get("BRATSTUNE_DATA")
    return Path(env).expanduser().resolve() if env else home() / "data"


def results_dir() -> Path:
    """Default Ray Tune `storage_path` and job outputs."""
    return home() / "results"
