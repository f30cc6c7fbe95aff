"""The `bratstune` console script: a thin dispatcher over `bratstune.commands.*`.

Each sub-command lives in its own module `bratstune/commands/<name>.py` exposing
`add_arguments(parser)` and `run(args) -> int`; only the module of the command being run is
imported, so `bratstune --help` stays fast and one broken command cannot break the rest.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bratstune.errors import BratstuneError

# name -> one-line help. Each name is a module `bratstune.commands.<name>` exposing
# `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, str] = {
    "synth": "write a deterministic synthetic BraTS-like cohort (NIfTI, BraTS naming)",
    "inspect": "summarise a cohort folder (naming, cases, geometry, labels) and list every problem",
    "evaluate": "BraTS lesion-wise Dice/HD95 (brats2023 or brats2026 protocol) of a prediction file or folder",
    "train": "train one model from a YAML config or a preset, tracked in MLflow",
    "presets": "list the bundled training presets (--show NAME prints one as YAML)",
    "promote": "package trained models as an ensemble, register it in MLflow, promote it to champion if it wins",
    "predict": "predict a cohort (or watch an inbox) with a registered ensemble: NIfTI + table + QC report",
    "models": "list registered models: names, versions, aliases (champion, previous) and metrics",
    "up": "start a local Ray head and MLflow server on 127.0.0.1; jobs and commands use them",
    "down": "stop the Ray head and MLflow server that `bratstune up` started (by PID)",
    "status": "show what `bratstune up` started, where it listens and whether it answers",
}


def _build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` is imported (its module loads torch, MLflow ...)."""
    parser = argparse.ArgumentParser(prog="bratstune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    selected = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(f"bratstune.commands.{name}")
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args._run(args) or 0)
    except BratstuneError as exc:
        print(f"bratstune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
