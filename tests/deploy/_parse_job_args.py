"""Parse job command lines with each job's own argument parser, and stop there.

    python tests/deploy/_parse_job_args.py < [["jobs/x.py", ["--flag", "value"]], ...]

Runs every script as ``__main__`` (so it builds its parser however it does) with
``argparse.ArgumentParser.parse_args`` / ``parse_known_args`` patched: the outermost call parses
for real (an unknown flag or a bad value ends in argparse's error) and then stops the script
before it does anything. Prints one JSON object per script: ``{"script", "parsed"}`` with the
parsed namespace, or ``{"script", "error"}`` with argparse's message.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import runpy
import sys
from pathlib import Path


class Parsed(BaseException):  # not an Exception: no job's error handling may swallow it
    def __init__(self, namespace: object, extras: list[str]) -> None:
        super().__init__()
        self.namespace, self.extras = namespace, extras


_depth = 0


def _stop_after(original):
    def parse(self, *args, **kwargs):
        global _depth
        _depth += 1
        try:
            result = original(self, *args, **kwargs)
        finally:
            _depth -= 1
        if _depth == 0:
            namespace, extras = result if isinstance(result, tuple) else (result, [])
            raise Parsed(namespace, list(extras))
        return result

    return parse


def check(script: str, args: list[str]) -> dict:
    path = Path(script).resolve()
    sys.argv = [str(path), *args]
    sys.path.insert(0, str(path.parent))
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(str(path), run_name="__main__")
    except Parsed as parsed:
        if parsed.extras:
            return {"script": script, "error": f"unrecognized arguments: {' '.join(parsed.extras)}"}
        return {"script": script, "parsed": {k: str(v) for k, v in vars(parsed.namespace).items()}}
    except SystemExit as exc:
        return {"script": script, "error": errors.getvalue().strip() or f"exit {exc.code}"}
    finally:
        sys.path.remove(str(path.parent))
    return {"script": script, "error": "the script returned without parsing its arguments"}


def main() -> int:
    argparse.ArgumentParser.parse_args = _stop_after(argparse.ArgumentParser.parse_args)
    argparse.ArgumentParser.parse_known_args = _stop_after(argparse.ArgumentParser.parse_known_args)
    for script, args in json.load(sys.stdin):
        print(json.dumps(check(script, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
