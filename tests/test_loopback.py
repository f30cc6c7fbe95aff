"""The Ray loopback guard: one home, set before Ray is imported, explicit settings win."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bratstune.paths import keep_ray_on_loopback

ROOT = Path(__file__).resolve().parents[1]


def test_the_guard_is_set_and_an_explicit_setting_wins():
    env: dict[str, str] = {}
    keep_ray_on_loopback(env)
    assert env == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
    keep_ray_on_loopback(env)
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_jobs_set_it_before_anything_imports_ray():
    code = (
        "import os, sys; sys.path.insert(0, 'jobs'); import _bootstrap; "
        "print(os.environ.get('RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'), 'ray' in sys.modules)"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]
