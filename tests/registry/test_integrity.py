"""bratstune.integrity: manifests of every file, recorded digests, paths that stay inside a package."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from bratstune.errors import DataError
from bratstune.integrity import (
    MANIFEST_FILE,
    REGISTERED_META,
    IntegrityError,
    manifest_digest,
    safe_join,
    verify_manifest,
    write_manifest,
)


@pytest.fixture
def package(tmp_path):
    root = tmp_path / "pkg"
    (root / "code" / "bratstune").mkdir(parents=True)
    (root / "weights.safetensors").write_bytes(b"\x00\x01weights")
    (root / "code" / "bratstune" / "__init__.py").write_text("x = 1\n")
    (root / ".hidden").write_text("also covered\n")
    write_manifest(root)
    return root


def test_manifest_lists_every_file_and_its_digest_is_the_manifest_hash(package):
    files = json.loads((package / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == [".hidden", "code/bratstune/__init__.py", "weights.safetensors"]
    assert files["weights.safetensors"] == hashlib.sha256(b"\x00\x01weights").hexdigest()
    digest = manifest_digest(package)
    assert digest == hashlib.sha256((package / MANIFEST_FILE).read_bytes()).hexdigest()
    assert verify_manifest(package, expected=digest) == digest
    assert not list(package.parent.glob(".*tmp")), "the manifest's temp file was left behind"


def test_a_regenerated_manifest_no_longer_matches_the_recorded_digest(package):
    recorded = manifest_digest(package)
    (package / "weights.safetensors").write_bytes(b"\x00\x01swapped")
    write_manifest(package)  # self-consistent again ...
    verify_manifest(package)
    with pytest.raises(IntegrityError, match=r"manifest\.json: SHA-256 .* differs from the digest recorded"):
        verify_manifest(package, expected=recorded)  # ... but not what was registered


@pytest.mark.parametrize(
    "tamper, names",
    [
        (
            lambda p: (p / "weights.safetensors").write_bytes(b"\x00\x02weights"),
            r"weights\.safetensors: SHA-256 mismatch",
        ),
        (lambda p: (p / "python_model.pkl").write_bytes(b"\x80\x04N."), r"python_model\.pkl: not listed"),
        (lambda p: (p / "code" / "bratstune" / "__pycache__").mkdir(), None),
        (lambda p: (p / "code" / "bratstune" / "evil.py").write_text("import os\n"), r"evil\.py: not listed"),
        (lambda p: (p / ".hidden").unlink(), r"\.hidden: listed in manifest\.json but missing"),
        (lambda p: os.symlink("/etc/hostname", p / "link"), r"link: symbolic link"),
    ],
    ids=["edited", "planted-pickle", "empty-pycache-dir", "planted-module", "missing", "symlink"],
)
def test_tampered_packages_are_refused_naming_the_file(package, tamper, names):
    tamper(package)
    if names is None:  # an empty folder holds no file: nothing to run, nothing to refuse
        verify_manifest(package)
        (package / "code" / "bratstune" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\x00")
        names = r"x\.cpython-311\.pyc: not listed"
    with pytest.raises(IntegrityError, match=names) as info:
        verify_manifest(package)
    assert isinstance(info.value, DataError)  # one line naming the file, like every bad input


def test_mlflows_registered_model_meta_is_the_one_tolerated_extra(package):
    (package / REGISTERED_META).write_text("model_name: x\nmodel_version: '1'\n")
    verify_manifest(package)


@pytest.mark.parametrize("entry", ["../outside.txt", "/etc/hostname", "a/../../b", "", "..", "C:/x", "a\\..\\b"])
def test_manifest_entries_that_leave_the_package_are_refused(package, entry):
    manifest = json.loads((package / MANIFEST_FILE).read_text())
    manifest["files"][entry] = "0" * 64
    (package / MANIFEST_FILE).write_text(json.dumps(manifest))
    (package.parent / "outside.txt").write_text("secret")
    with pytest.raises(IntegrityError, match="inside the package|leads outside"):
        verify_manifest(package)


def test_safe_join_follows_symlinks_only_inside(tmp_path):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "real.txt").write_text("x")
    os.symlink(tmp_path, root / "up")
    assert safe_join(root, "real.txt") == root / "real.txt"
    with pytest.raises(IntegrityError, match="leads outside"):
        safe_join(root, "up/secret.txt")
    with pytest.raises(IntegrityError, match="not a relative path"):
        safe_join(root, 3)


def test_a_folder_without_manifest_is_refused_with_how_to_reregister(tmp_path):
    (tmp_path / "ensemble.json").write_text("{}")
    with pytest.raises(IntegrityError, match="missing model manifest.*bratstune promote"):
        verify_manifest(tmp_path)
