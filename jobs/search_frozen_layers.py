"""Search which layer groups to freeze while fine-tuning, and the learning rate
(``search_spaces/frozen_layers.yaml``); same options as ``jobs/search_losses.py``.

    python jobs/search_frozen_layers.py --smoke-test
    ray job submit --working-dir . -- python jobs/search_frozen_layers.py --data /data/BraTS-PED
"""

from __future__ import annotations

import sys

import _bootstrap
from search_losses import main as _search_main

DEFAULT_SPACE = _bootstrap.ROOT / "search_spaces" / "frozen_layers.yaml"


def main(argv: list[str] | None = None) -> int:
    return _search_main(argv, default_space=DEFAULT_SPACE, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
