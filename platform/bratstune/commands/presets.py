"""``bratstune presets``: list the bundled training presets, or print one as YAML."""

from __future__ import annotations

import argparse

from bratstune.presets import describe_preset, list_presets, preset_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", metavar="NAME", help="print preset NAME as YAML (usable as a train config)")


def run(args: argparse.Namespace) -> int:
    if args.show:
        print(preset_text(args.show), end="")
        return 0
    names = list_presets()
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe_preset(name)}")
    return 0
