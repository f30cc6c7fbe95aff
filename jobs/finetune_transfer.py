"""Fine-tune a registered model (or a run's checkpoint / a best-model folder) on a target cohort.

With ``--space`` (e.g. ``search_spaces/frozen_layers.yaml``) every ``freeze`` choice of the space
is a trial of a Ray Tune grid (MLflow child runs, table on the parent as in
``jobs/transfer_study.py``); without it one fine-tuning run with ``--freeze``.

    python jobs/finetune_transfer.py --source models:/bratstune-gli@champion --target-data DIR \
        --target-challenge SSA --space search_spaces/frozen_layers.yaml
    python jobs/finetune_transfer.py --smoke-test --freeze decoder
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import _bootstrap
import transfer_study as study
from bratstune.config_utils import load_yaml
from bratstune.errors import ConfigError
from bratstune.transfer import finetune, load_source, prepare_target


def _space_variants(space: str) -> list[str]:
    """Install the ``freeze`` choices of ``space`` as the study's variants; their names."""
    choices = ((load_yaml(Path(space)).get("params") or {}).get("freeze") or {}).get("choices") or {}
    if not choices:
        raise ConfigError(f"{space}: no params.freeze.choices")
    study.FREEZE_VARIANTS.clear()
    study.FREEZE_VARIANTS.update({str(k): list(v or []) for k, v in choices.items()})
    return [f"finetune_{k}" for k in choices]


@_bootstrap.error_tail
def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = study.build_parser(__doc__.splitlines()[0])
    parser.add_argument("--space", default=None, help="search space YAML whose 'freeze' choices become trials")
    parser.add_argument("--freeze", action="append", default=[], help="layer group to freeze (without --space)")
    args = parser.parse_args(argv)
    if args.smoke_test and not args.target_challenge:
        args.target_challenge = "SSA"
    if args.space:
        study.run_variants(args, _space_variants(args.space), title="finetune-transfer")
        return 0
    # a single fine-tuning run, in process (no Ray, no MLflow)
    work = Path(args.out or study.default_out("finetune")).resolve()
    source, target, overrides = study.study_inputs(args, work)
    model = load_source(source, args.scheme_hint, member=args.member)
    data, challenge = prepare_target(
        target,
        model,
        fill=study.parse_fill(args.fill) or None,
        val_fraction=args.val_fraction,
        cache_root=work / "cache",
        filled_dir=work / "filled",
    )
    result = finetune(
        model,
        data,
        overrides,
        freeze=args.freeze,
        out_dir=work / "finetune",
        challenge=args.target_challenge or challenge,
    )
    val = {k: v for k, v in result.best_metrics.items() if k.startswith("val/")}
    print(json.dumps({"best_dir": str(result.best_dir), "transfer": result.transfer, "metrics": val}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
