"""`platform/` is a source root, never a package: the standard-library `platform` module must still win."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"]).resolve()

PROBE = """
import json, platform, bratstune
print(json.dumps({"platform": platform.__file__, "system": platform.system(),
                  "machine": platform.machine(), "bratstune": bratstune.__file__}))
"""


def test_platform_folder_has_no_init():
    assert (REPO_ROOT / "platform" / "bratstune" / "__init__.py").is_file()
    assert not (REPO_ROOT / "platform" / "__init__.py").exists()


def test_stdlib_platform_wins_in_this_process():
    import platform

    assert Path(platform.__file__).resolve().parent == STDLIB
    assert platform.system()


def test_stdlib_platform_wins_from_the_repo_root():
    # `python -c` puts the current directory first on sys.path, where `platform/` lives
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["platform"]).resolve().parent == STDLIB
    assert found["system"] and found["machine"]
    assert Path(found["bratstune"]).parts[-3:] == ("platform", "bratstune", "__init__.py")
