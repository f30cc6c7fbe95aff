"""The `bratstune` console script: a thin dispatcher over `bratstune.commands.*`.

Each sub-command lives in its own module `bratstune/commands/<name>.py` exposing
`HELP: str`, `add_arguments(parser)` and `run(args) -> int`; modules are imported
lazily so that `bratstune --help` stays fast and one broken command cannot break the rest.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from bratstune.errors import BratstuneError

# name -> module under bratstune.commands
COMMANDS: dict[str, str] = {
    "synth": "synth",
    "inspect": "inspect",
    "evaluate": "evaluate",
    "train": "train",
    "presets": "presets",
    "promote": "promote",
    "predict": "predict",
    "models": "models",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bratstune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(f"bratstune.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bratstune.commands.{module}":
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=getattr(mod, "HELP", ""), description=getattr(mod, "HELP", ""))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
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
