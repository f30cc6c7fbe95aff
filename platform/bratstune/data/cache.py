"""On-disk cache of preprocessed cases as ``.npy`` files, read back as memory maps.

One entry per (case file contents, preprocessing config)::

    <root>/entries/<key[:2]>/<key>/image.npy   float32 (4, x, y, z)
                                  label.npy   uint8 (x, y, z)           (only with a label)
                                  meta.json   bbox, model-grid shape, affine, spacing, fingerprint,
                                              grid map back to the input grid
    <root>/hashes.json                        memo of file digests by (path, size, mtime_ns)
    <root>/references/<config>.json           cohort histogram reference (histogram_match="cohort")

``key = sha256(sha256(bytes) of every input file, config fingerprint[, reference digest])``; the
config fingerprint holds the target spacing and orientation, so a case resampled to 2 mm and the
same case at 1 mm are two entries.
Hashing the raw (gzipped) bytes is several times cheaper than decoding the NIfTI, and the
digests are memoised so unchanged files are not even read again. An entry is written into a
temporary folder and renamed into place in one step, so trials preparing the same case at the
same time never see (or leave) a half-written entry: the first rename wins, the others discard
their copy.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bratstune import paths
from bratstune.config_utils import to_dict
from bratstune.data.case import load_case
from bratstune.data.preprocess import (
    COHORT,
    HistogramReference,
    PreprocessConfig,
    PreprocessedCase,
    preprocess_arrays,
    preprocess_case,
    replace_config,
)
from bratstune.data.resample import GridMap
from bratstune.errors import ConfigError, DataError

if TYPE_CHECKING:
    from bratstune.data.case import Case

logger = logging.getLogger(__name__)

__all__ = ["CACHE_ENV", "CaseCache", "default_cache_root", "file_digest"]

CACHE_ENV = "BRATSTUNE_CACHE"
CACHE_VERSION = 2
_CHUNK = 1 << 20


def default_cache_root() -> Path:
    """``$BRATSTUNE_CACHE``, else ``$BRATSTUNE_HOME/cache`` (``./.bratstune/cache``); resolved on call."""
    return paths.cache_dir()


def file_digest(path: str | Path) -> str:
    """sha256 hex digest of a file's raw bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


class CaseCache:
    """Preprocess each case once per config; later loads are memory maps (no NIfTI decode).

    Args:
        root: cache folder; default :func:`default_cache_root` (``$BRATSTUNE_CACHE`` or
            ``.bratstune/cache``), resolved when the cache is created, not at import.

    Example::

        cache = CaseCache()
        cases = cache.prepare(cohort.cases, PreprocessConfig(), workers=2)
        again = cache.load(cohort.cases[0], PreprocessConfig())   # np.memmap, milliseconds
    """

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root).absolute() if root is not None else default_cache_root()
        self._memo: dict[str, dict[str, Any]] | None = None
        self._memo_dirty = False

    def __repr__(self) -> str:
        return f"CaseCache(root={str(self.root)!r})"

    # --- keys -----------------------------------------------------------------------------
    def _input_files(self, case: Case) -> list[tuple[str, Path]]:
        files = [(f"image:{m}", Path(p)) for m, p in sorted(case.images.items())]
        if case.label is not None:
            files.append(("label", Path(case.label)))
        return files

    def _load_memo(self) -> dict[str, dict[str, Any]]:
        if self._memo is None:
            try:
                self._memo = json.loads((self.root / "hashes.json").read_text())
            except (OSError, ValueError):
                self._memo = {}
        return self._memo

    def _save_memo(self) -> None:
        if not self._memo_dirty or self._memo is None:
            return
        path = self.root / "hashes.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # merge with what other processes wrote meanwhile; a lost update only costs a re-hash
            merged = json.loads(path.read_text())
        except (OSError, ValueError):
            merged = {}
        merged.update(self._memo)
        _write_json_atomic(path, merged)
        self._memo, self._memo_dirty = merged, False

    def _digest(self, path: Path) -> str:
        try:
            st = path.stat()
        except OSError:
            raise DataError(path, "input file is missing") from None
        memo = self._load_memo()
        name = str(path.absolute())
        hit = memo.get(name)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return str(hit["sha256"])
        digest = file_digest(path)
        memo[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self._memo_dirty = True
        return digest

    def content_hash(self, case: Case) -> str:
        """sha256 over the raw bytes of the case's input files (memoised by path, size, mtime)."""
        h = hashlib.sha256()
        for role, path in self._input_files(case):
            h.update(f"{role}={self._digest(path)};".encode())
        if getattr(case, "channel", None):  # MSD 4-D files: which volume is which modality
            h.update(json.dumps(dict(case.channel), sort_keys=True).encode())
        self._save_memo()
        return h.hexdigest()

    def key(self, case: Case, config: PreprocessConfig, *, reference: HistogramReference | None = None) -> str:
        """Cache key of ``case`` under ``config`` (and the cohort histogram reference, if any)."""
        parts = [f"v{CACHE_VERSION}", self.content_hash(case), config.fingerprint()]
        if reference is not None:
            parts.append(reference.digest())
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def entry_dir(self, key: str) -> Path:
        """Folder of the entry with ``key`` (it may not exist)."""
        return self.root / "entries" / key[:2] / key

    def reference_path(self, config: PreprocessConfig) -> Path:
        """Where :meth:`prepare` keeps the cohort histogram reference for ``config``."""
        return self.root / "references" / f"{config.fingerprint()}.json"

    # --- read / write ---------------------------------------------------------------------
    def cohort_reference(self, config: PreprocessConfig) -> HistogramReference | None:
        """The cohort histogram reference :meth:`prepare` stored for ``config`` (``None`` unless it matches
        to the cohort); ``ConfigError`` when it was never prepared here."""
        return self._cohort_reference(config)

    def _cohort_reference(self, config: PreprocessConfig) -> HistogramReference | None:
        if config.histogram_match != COHORT:
            return None
        path = self.reference_path(config)
        if not path.is_file():
            raise ConfigError(
                f"histogram_match='cohort' needs a cohort reference ({path} is missing): "
                "call CaseCache.prepare(cases, config) on the training cohort first"
            )
        return HistogramReference.load(path)

    def lookup(
        self, case: Case, config: PreprocessConfig, *, reference: HistogramReference | None = None
    ) -> PreprocessedCase | None:
        """The cached entry as memory maps, or ``None`` on a miss. Never decodes NIfTI."""
        if reference is None:
            reference = self._cohort_reference(config)
        entry = self.entry_dir(self.key(case, config, reference=reference))
        try:
            meta = json.loads((entry / "meta.json").read_text())
            image = np.load(entry / "image.npy", mmap_mode="r")
            label = np.load(entry / "label.npy", mmap_mode="r") if meta["has_label"] else None
        except (OSError, ValueError, KeyError):
            return None
        return PreprocessedCase(
            case_id=case.case_id,
            image=image,
            label=label,
            bbox=tuple(slice(a, b) for a, b in meta["bbox"]),  # type: ignore[arg-type]
            original_shape=tuple(meta["original_shape"]),  # type: ignore[arg-type]
            affine=np.asarray(meta["affine"], dtype=float),
            spacing=tuple(meta["spacing"]),  # type: ignore[arg-type]
            fingerprint=meta["fingerprint"],
            config_fingerprint=meta["config_fingerprint"],
            grid=GridMap.from_dict(meta["grid"]) if meta.get("grid") else None,
        )

    def load(
        self, case: Case, config: PreprocessConfig, *, reference: HistogramReference | None = None
    ) -> PreprocessedCase:
        """Return the preprocessed case: from the cache on a hit, else preprocess and store it.

        Args:
            case: a case from :func:`bratstune.data.layout.discover`.
            config: preprocessing options.
            reference: cohort histogram reference; by default the one :meth:`prepare` stored.

        Returns:
            :class:`PreprocessedCase` whose arrays are read-only ``np.memmap`` s.
        """
        hit = self.lookup(case, config, reference=reference)
        if hit is not None:
            return hit
        if reference is None:
            reference = self._cohort_reference(config)
        self._build(case, config, reference)
        loaded = self.lookup(case, config, reference=reference)
        if loaded is None:  # pragma: no cover - only if the entry was deleted in between
            raise DataError(self.entry_dir(self.key(case, config, reference=reference)), "cache entry vanished")
        return loaded

    def _build(self, case: Case, config: PreprocessConfig, reference: HistogramReference | None) -> int:
        """Preprocess ``case`` and store it; returns bytes written (0 if another process won)."""
        key = self.key(case, config, reference=reference)
        entry = self.entry_dir(key)
        if (entry / "meta.json").is_file():
            return 0
        cached = None
        if reference is not None:
            cached = self.lookup(case, replace_config(config, histogram_match=None))
        if cached is not None:
            # Histogram matching on top of the cached, unmatched arrays: no NIfTI decode.
            image, _, _ = preprocess_arrays(
                np.asarray(cached.image),
                None,
                replace_config(config, crop_to_brain=False, normalize="none", percentile_rescale=None),
                reference=reference,
            )
            result = PreprocessedCase(**{**cached.__dict__, "image": image})
            result.config_fingerprint = config.fingerprint()
        else:
            result = preprocess_case(load_case(case), config, reference=reference)
        return self._store(key, result, config)

    def _store(self, key: str, case: PreprocessedCase, config: PreprocessConfig) -> int:
        entry = self.entry_dir(key)
        tmp_root = self.root / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tmp_root / f"{key[:16]}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
        try:
            np.save(tmp / "image.npy", np.ascontiguousarray(case.image, dtype=np.float32))
            if case.label is not None:
                np.save(tmp / "label.npy", np.ascontiguousarray(case.label, dtype=np.uint8))
            meta = {
                "version": CACHE_VERSION,
                "key": key,
                "case_id": case.case_id,
                "has_label": case.label is not None,
                "bbox": [[s.start, s.stop] for s in case.bbox],
                "original_shape": list(case.original_shape),
                "affine": np.asarray(case.affine, dtype=float).tolist(),
                "spacing": list(case.spacing),
                "fingerprint": case.fingerprint,
                "grid": case.grid.to_dict() if case.grid is not None else None,
                "config": to_dict(config),
                "config_fingerprint": config.fingerprint(),
                "created": time.time(),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            written = sum(f.stat().st_size for f in tmp.iterdir())
            entry.parent.mkdir(parents=True, exist_ok=True)
            if entry.exists() and not (entry / "meta.json").is_file():
                shutil.rmtree(entry, ignore_errors=True)  # debris of an interrupted copy
            try:
                os.rename(tmp, entry)  # atomic; fails if another process already renamed its copy
            except OSError:
                if not (entry / "meta.json").is_file():
                    raise
                logger.debug("cache entry %s was written concurrently; keeping the other copy", key[:12])
                return 0
            return written
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # --- bulk -----------------------------------------------------------------------------
    def prepare(
        self,
        cases: Iterable[Case],
        config: PreprocessConfig,
        *,
        workers: int = 1,
    ) -> list[PreprocessedCase]:
        """Fill the cache for ``cases`` (in parallel processes) and return them, in order.

        With ``histogram_match="cohort"`` the unmatched cases are prepared first, the mean
        brain-voxel quantiles of all of them become the cohort reference (stored under
        :meth:`reference_path`), then each case is matched to it.

        Args:
            cases: cases to prepare.
            config: preprocessing options.
            workers: processes decoding NIfTI at once (1 = in this process).
        """
        cases = list(cases)
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        reference = None
        if config.histogram_match == COHORT:
            base = replace_config(config, histogram_match=None)
            unmatched = self.prepare(cases, base, workers=workers)
            reference = HistogramReference.from_images([c.image for c in unmatched])
            path = self.reference_path(config)
            path.parent.mkdir(parents=True, exist_ok=True)
            reference.save(path)
            logger.info("cohort histogram reference from %d cases -> %s", len(cases), path)
        todo = [c for c in cases if self.lookup(c, config, reference=reference) is None]
        logger.info(
            "cache %s: %d/%d cases cached, preparing %d with %d worker(s)",
            self.root,
            len(cases) - len(todo),
            len(cases),
            len(todo),
            workers,
        )
        self._run(todo, config, reference, workers)
        return [self.load(c, config, reference=reference) for c in cases]

    def _run(
        self, todo: Sequence[Case], config: PreprocessConfig, reference: HistogramReference | None, workers: int
    ) -> None:
        if not todo:
            return
        start, written, done = time.perf_counter(), 0, 0

        def progress(case_id: str, nbytes: int) -> None:
            nonlocal written, done
            done += 1
            written += nbytes
            elapsed = time.perf_counter() - start
            # about ten progress lines per cohort, whatever its size
            if done != len(todo) and done % max(1, len(todo) // 10):
                return
            logger.info(
                "prepared %d/%d cases (%s) in %.1f s, %.2f s/case, %.1f MB written",
                done,
                len(todo),
                case_id,
                elapsed,
                elapsed / done,
                written / 1e6,
            )

        if workers == 1 or len(todo) == 1:
            for case in todo:
                progress(case.case_id, self._build(case, config, reference))
            return
        # spawn: safe in processes holding threads (torch, Ray); workers only import numpy/nibabel.
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
            futures = {pool.submit(_build_in_worker, str(self.root), c, config, reference): c for c in todo}
            for future in cf.as_completed(futures):
                progress(futures[future].case_id, future.result())
        self._memo = None  # workers updated the digest memo on disk


def _build_in_worker(root: str, case: Case, config: PreprocessConfig, reference: HistogramReference | None) -> int:
    return CaseCache(root)._build(case, config, reference)
