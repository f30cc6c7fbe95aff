"""The prediction ledger ``<out>/ledger.json``: what was predicted, from which input, with which model.

Per case: the SHA-256 of its input files, the ensemble's manifest digest, the status
(``done`` / ``failed``), the output file and its ``predictions.csv`` row. A case whose input and
model are unchanged (and whose output still exists) is skipped by the next run; a case that failed
with the same input stays failed. The file is rewritten (temp file + rename) after each case, so a
killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bratstune.data.cache import file_digest

__all__ = ["LEDGER_FILE", "Ledger"]

LEDGER_FILE = "ledger.json"


class Ledger:
    """``<out>/ledger.json``: per case, its input hash, the model digest, status and table row.

    File hashes are memoised by (path, size, mtime) so an unchanged cohort is not re-read.
    """

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LEDGER_FILE
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            data = {}
        self.cases: dict[str, dict[str, Any]] = dict(data.get("cases", {}))
        self.files: dict[str, dict[str, Any]] = dict(data.get("files", {}))

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = str(path.absolute())
        hit = self.files.get(key)
        if hit and hit["size"] == st.st_size and hit["mtime_ns"] == st.st_mtime_ns:
            return str(hit["sha256"])
        digest = file_digest(path)
        self.files[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest

    def input_hash(self, case: Any) -> str:
        h = hashlib.sha256()
        for modality, path in sorted(case.images.items()):
            h.update(f"{modality}={self.file_hash(Path(path))};".encode())
        if getattr(case, "channel", None):
            h.update(json.dumps(dict(case.channel), sort_keys=True).encode())
        return h.hexdigest()

    def is_current(self, case_id: str, input_hash: str, model: str, out: Path) -> bool:
        entry = self.cases.get(case_id)
        if not entry or entry.get("input") != input_hash or entry.get("model") != model:
            return False
        return entry.get("status") == "failed" or (out / str(entry.get("output", ""))).is_file()

    def record(self, case_id: str, entry: Mapping[str, Any]) -> None:
        self.cases[case_id] = dict(entry)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": 1, "cases": self.cases, "files": self.files}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
