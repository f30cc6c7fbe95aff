"""Laptop and cluster run the same stack: pyproject, requirements.lock, the Makefile and the images agree.

* every dependency of pyproject (and of its dev extra) is pinned in the lock, at a version its
  specifier admits; torch is pinned at the Makefile's ``TORCH_SPEC`` version;
* the Makefile's venv and ``deploy/docker/Dockerfile`` install from the lock (torch first, same
  version; the same atlas wheel), on the lock's Python;
* the MLflow server image runs the clients' MLflow version;
* this venv holds exactly the locked versions (what ``make venv`` installed).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
SERVER_LOCK = ROOT / "deploy" / "mlflow" / "requirements.lock"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
MAKEFILE = ROOT / "Makefile"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, _, version = line.partition("==")
            assert version, f"{path.name}: {line!r} is not pinned with =="
            pins[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
    return pins


def _make_variable(name: str) -> str:
    match = re.search(rf"^{name} \?= *(.+)$", MAKEFILE.read_text(), re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1).strip()


def _docker_arg(name: str) -> str:
    match = re.search(rf'^ARG {name}="?([^"\n]+)"?$', DOCKERFILE.read_text(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}"
    return match.group(1)


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]


def test_every_pyproject_dependency_is_pinned_in_the_lock():
    pins = _pins(LOCK)
    for requirement in _pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock: sh deploy/lock.sh"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"{requirement} vs {name}=={pins[name]}"


def test_torch_python_and_atlas_agree_between_makefile_dockerfile_and_lock():
    torch_spec = _make_variable("TORCH_SPEC")
    assert torch_spec == _docker_arg("TORCH_SPEC")
    assert torch_spec == f"torch=={_pins(LOCK)['torch']}"
    assert _make_variable("ATLAS_SPEC") == _docker_arg("ATLAS_SPEC")
    python = re.search(r"^FROM python:(\d+\.\d+)", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    assert f"--python-version {python}" in (ROOT / "deploy" / "lock.sh").read_text()


def test_venv_and_image_install_from_the_lock():
    recipe = MAKEFILE.read_text().split("$(STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "requirements.lock" in recipe.splitlines()[0], "the venv is rebuilt when the lock changes"
    steps = [line.strip() for line in recipe.splitlines()[1:]]
    torch_step = next(i for i, s in enumerate(steps) if "$(TORCH_SPEC)" in s)
    lock_step = next(i for i, s in enumerate(steps) if "-r requirements.lock" in s)
    assert torch_step < lock_step
    assert any("--no-deps -e ." in s for s in steps[lock_step:]), "bratstune itself adds no unlocked package"
    docker = DOCKERFILE.read_text()
    assert "COPY requirements.lock" in docker
    assert docker.index("${TORCH_SPEC}") < docker.index("pip install --no-deps -r requirements.lock")
    assert "pip install --no-deps ." in docker


def test_mlflow_server_image_runs_the_clients_mlflow():
    client, server = _pins(LOCK), _pins(SERVER_LOCK)
    for name in ("mlflow", "psycopg", "psycopg-binary"):
        assert server[name] == client[name], name
    assert {"flask-wtf", "boto3"} <= set(server)  # basic auth, S3 artifacts
    compose = yaml.safe_load((ROOT / "deploy" / "mlflow" / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["image"].endswith(f":{client['mlflow']}")
    manifests = yaml.safe_load_all((ROOT / "deploy" / "mlflow" / "k8s" / "mlflow.yaml").read_text())
    deployment = next(doc for doc in manifests if doc["kind"] == "Deployment")
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.endswith(f":{client['mlflow']}"), image


def test_this_venv_holds_exactly_the_locked_versions():
    mismatched = []
    for name, pinned in _pins(LOCK).items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            mismatched.append(f"{name}: not installed (locked {pinned})")
            continue
        if Version(installed).public != Version(pinned).public:  # torch 2.13.0+cpu is torch 2.13.0
            mismatched.append(f"{name}: {installed} installed, {pinned} locked")
    if mismatched:
        pytest.fail("run `make venv`:\n" + "\n".join(mismatched))


def test_readme_capacity_tables_are_the_models_output(capsys):
    """deploy/README.md quotes ``python deploy/capacity.py`` verbatim: change one, rerun the other."""
    spec = importlib.util.spec_from_file_location("bratstune_deploy_capacity", ROOT / "deploy" / "capacity.py")
    capacity = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = capacity  # its dataclass looks its module up there
    spec.loader.exec_module(capacity)
    assert capacity.main([]) == 0
    printed = capsys.readouterr().out.strip()
    readme = (ROOT / "deploy" / "README.md").read_text()
    quoted = readme.split("<!-- capacity:begin", 1)[1].split("```\n", 1)[1].split("\n```", 1)[0]
    assert quoted.strip() == printed
    search = capacity.Search()
    assert (search.trials, search.folds, search.patch, search.epochs, search.gpus) == (32, 5, 128, 300, 8)
    # ASHA's expected work: every trial to 30 epochs, a third to 90, a ninth to 270, a 27th to 300
    assert capacity.asha_epochs(search) == pytest.approx(32 * 30 + 32 / 3 * 60 + 32 / 9 * 180 + 32 / 27 * 30)
