"""Load a fault-injection module of this folder so that Ray ships it to its workers by value.

tests/ is not importable in Ray's worker processes; ``cloudpickle.register_pickle_by_value``
makes the functions of the module travel inside the pickled trainable instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_by_value(name: str) -> ModuleType:
    """``tests/reliability/<name>.py``, imported and registered with cloudpickle by value."""
    from ray import cloudpickle

    spec = importlib.util.spec_from_file_location(f"bratstune_test_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cloudpickle.register_pickle_by_value(module)
    return module
