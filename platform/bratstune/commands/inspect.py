"""`bratstune inspect DIR [--json]`: summarise a cohort folder and list every problem in it.

Prints the naming convention, the number of cases (with/without labels), the modalities, the
distinct shapes and spacings (with counts), the label values found and the label scheme guessed
from the challenge, then every problem of every case (each case is checked on its own, so one bad
file does not hide the others). Exit status: 0 clean, 1 problems found, 2 unusable arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bratstune.data.case import MODALITIES, Case, CaseReport, validate_case
from bratstune.data.layout import Convention, default_scheme, discover
from bratstune.errors import ConfigError, DataError
from bratstune.labels import LabelScheme, check_labels, get_scheme


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="cohort folder (BraTS 2017-2025 naming or MSD Task01)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--convention", choices=[c.value for c in Convention], help="force a naming convention")
    parser.add_argument("--scheme", help="check labels against this label scheme instead of guessing it")
    parser.add_argument("--year", type=int, help="challenge year used to guess the label scheme (e.g. 2024)")
    parser.add_argument("--quick", action="store_true", help="read image headers only (labels are still decoded)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="parallel file readers")


@dataclass
class CohortSummary:
    """What `summarize` reports (the `--json` output)."""

    folder: str
    convention: str
    cases: int = 0
    labelled: int = 0
    challenges: dict[str, int] = field(default_factory=dict)
    modalities: list[str] = field(default_factory=list)
    shapes: dict[str, int] = field(default_factory=dict)
    spacings: dict[str, int] = field(default_factory=dict)
    label_values: dict[str, int] = field(default_factory=dict)  # value -> number of cases holding it
    schemes: dict[str, int] = field(default_factory=dict)  # guessed scheme -> number of cases
    scheme_reason: str = ""
    ignored: list[str] = field(default_factory=list)
    problems: list[dict[str, str | None]] = field(default_factory=list)


def _fmt(values: tuple[float, ...] | tuple[int, ...]) -> str:
    return "x".join(f"{round(float(v), 4):g}" for v in values)


def _schemes(
    cases: list[Case], reports: list[CaseReport], scheme: str | None, year: int | None
) -> tuple[list[LabelScheme], str]:
    """Scheme per case: the one asked for, else guessed from naming (GLI with label 4 → post-treatment)."""
    if scheme is not None:
        chosen = get_scheme(scheme)
        return [chosen] * len(cases), "given with --scheme"
    guessed = [default_scheme(c, year=year) for c in cases]
    gli_rc = year is None and any(
        c.challenge == "GLI" and r.label_values and 4 in r.label_values for c, r in zip(cases, reports)
    )
    if gli_rc:
        post = get_scheme("brats2024_gli")
        guessed = [post if c.challenge == "GLI" else s for c, s in zip(cases, guessed)]
        return guessed, "guessed from the challenge; GLI labels hold 4 (RC), so post-treatment 2024"
    return guessed, "guessed from the challenge" if any(c.challenge for c in cases) else "guessed from the naming"


def summarize(
    folder: str | Path,
    *,
    convention: str | None = None,
    scheme: str | None = None,
    year: int | None = None,
    read_voxels: bool = True,
    workers: int = 1,
) -> CohortSummary:
    """Discover a cohort without stopping at problems, validate every case, and tally what was found.

    Raises:
        DataError: only if ``folder`` does not exist.
    """
    cohort = discover(folder, convention=convention, strict=False)
    summary = CohortSummary(folder=str(cohort.root), convention=cohort.convention)
    problems: list[DataError] = list(cohort.problems)

    def check(case: Case) -> CaseReport:
        return validate_case(case, read_voxels=read_voxels)

    if workers > 1 and len(cohort.cases) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            reports = list(pool.map(check, cohort.cases))
    else:
        reports = [check(c) for c in cohort.cases]

    schemes, reason = _schemes(cohort.cases, reports, scheme, year)
    values: Counter[int] = Counter()
    for case, report, case_scheme in zip(cohort.cases, reports, schemes):
        problems.extend(report.problems)
        if report.label_values is not None:
            values.update(report.label_values)
            try:
                check_labels(np.asarray(report.label_values), case_scheme, source=case.label)
            except DataError as exc:
                problems.append(exc)
    summary.cases = len(cohort.cases)
    summary.labelled = len(cohort.labelled)
    summary.challenges = dict(sorted(cohort.challenges.items()))
    present = {m for c in cohort.cases for m in c.images}
    summary.modalities = [m for m in MODALITIES if m in present]
    summary.shapes = dict(Counter(_fmt(r.shape) for r in reports if r.shape).most_common())
    summary.spacings = dict(Counter(_fmt(r.spacing) for r in reports if r.spacing).most_common())
    summary.label_values = {str(v): n for v, n in sorted(values.items())}
    summary.schemes = dict(Counter(s.name for s in schemes).most_common())
    summary.scheme_reason = reason
    summary.ignored = [str(p) for p in cohort.ignored]
    summary.problems = [{"path": None if p.path is None else str(p.path), "problem": p.problem} for p in problems]
    return summary


def _counts(table: dict[str, int], unit: str = "") -> str:
    return ", ".join(f"{k}{unit} ({n})" for k, n in table.items()) or "-"


def _print_text(s: CohortSummary) -> None:
    out = sys.stdout
    rows = [
        ("folder", s.folder),
        ("convention", s.convention),
        ("cases", f"{s.cases} ({s.labelled} with labels, {s.cases - s.labelled} without)"),
    ]
    if s.challenges:
        rows.append(("challenges", _counts(s.challenges)))
    rows += [
        ("modalities", ", ".join(s.modalities) or "-"),
        ("shapes", _counts(s.shapes)),
        ("spacings", _counts(s.spacings, " mm")),
        ("label values", ", ".join(f"{v} ({n} case{'s' if n != 1 else ''})" for v, n in s.label_values.items()) or "-"),
    ]
    for name in s.schemes:
        rows.append(("label scheme", f"{get_scheme(name).describe()} [{s.schemes[name]} cases; {s.scheme_reason}]"))
    if s.ignored:
        rows.append(("ignored", f"{len(s.ignored)} NIfTI files with other names, e.g. {Path(s.ignored[0]).name}"))
    rows.append(("problems", str(len(s.problems)) if s.problems else "none"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        out.write(f"{key:<{width}}  {value}\n")
    for p in s.problems:
        out.write(f"  - {p['path']}: {p['problem']}\n" if p["path"] else f"  - {p['problem']}\n")


def run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if args.scheme is not None:
        get_scheme(args.scheme)  # unknown name -> ConfigError with a suggestion, before any work
    summary = summarize(
        args.folder,
        convention=args.convention,
        scheme=args.scheme,
        year=args.year,
        read_voxels=not args.quick,
        workers=args.workers,
    )
    if args.json:
        sys.stdout.write(json.dumps(asdict(summary), indent=2) + "\n")
    else:
        _print_text(summary)
    return 1 if summary.problems else 0
