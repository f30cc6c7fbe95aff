"""Fine-tune a trained segmenter on another cohort (domain shift, another label scheme).

Steps::

    source = load_source("models:/bratstune-gli@champion")          # or a fit out_dir / best/ / checkpoint
    check_modalities(source.modalities, target_root, fill=None)     # DataError naming the missing file
    data, challenge = prepare_target(target_root, source)           # cache + train/val split
    result = finetune(source, data, {"epochs": 10}, freeze=["decoder"], out_dir=out, challenge="SSA")

* :func:`load_source` — a registered ensemble (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
  ``runs:/ID/ensemble``, an ensemble folder; member ``member``), a ``fit`` output folder, a
  best-model folder, a checkpoint folder, or an MLflow run id (its ``best_model``).
* :func:`remap_head` — when the target scheme differs, output channels are matched **by name**
  (region mode: ``train_regions``; label mode: ``background`` + label names): every non-head
  tensor is copied, head rows (dim 0 of the output convolutions, deep-supervision heads too) are
  copied for mapped channels, unmapped channels keep a fresh initialisation. The mapping
  ``{target channel: source channel | None}`` is logged and written to ``transfer.json``.
* :func:`check_modalities` — a target case without a modality the source needs is refused
  unless ``fill`` says how to make it (``{"t1n": "t1c"}`` copies another modality,
  ``{"t1n": "zeros"}`` writes a zero volume); :func:`fill_missing` materialises the filled cohort.
* :func:`finetune` — the (remapped) source weights go to ``out_dir/source_init.pt`` and become
  ``init.encoder_from`` (which loads every tensor whose name and shape match, not only the
  encoder); ``freeze`` groups stay fixed bit for bit; validation uses the target challenge's
  lesion-wise rules.
* :func:`evaluate_source` — the "source model without fine-tuning" baseline on the target's
  validation split.
"""

from bratstune.transfer.finetune import INIT_FILE, TRANSFER_FILE, evaluate_source, finetune, finetune_config
from bratstune.transfer.modalities import FILL_ZEROS, check_modalities, fill_missing, prepare_target
from bratstune.transfer.source import SourceModel, channel_names, load_source, remap_head

__all__ = [
    "FILL_ZEROS",
    "INIT_FILE",
    "TRANSFER_FILE",
    "SourceModel",
    "channel_names",
    "check_modalities",
    "evaluate_source",
    "fill_missing",
    "finetune",
    "finetune_config",
    "load_source",
    "prepare_target",
    "remap_head",
]
