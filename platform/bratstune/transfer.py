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
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from bratstune.errors import ConfigError, DataError
from bratstune.training.config import TrainConfig, load_train_config

logger = logging.getLogger(__name__)

__all__ = [
    "FILL_ZEROS",
    "INIT_FILE",
    "SourceModel",
    "TRANSFER_FILE",
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

INIT_FILE = "source_init.pt"
TRANSFER_FILE = "transfer.json"
FILL_ZEROS = "zeros"
_RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class SourceModel:
    """The model fine-tuning starts from.

    Attributes:
        model: the network (CPU, eval mode).
        config: its resolved :class:`TrainConfig`.
        scheme: the label scheme it predicts.
        modalities: the input modalities it needs, in channel order.
        origin: where it came from (URI or folder), for lineage.
    """

    model: torch.nn.Module
    config: TrainConfig
    scheme: Any
    modalities: tuple[str, ...] = ()
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# -- loading the source -------------------------------------------------------------------------


def _scheme(value: Any) -> Any:
    from bratstune.labels import get_scheme

    return get_scheme(value) if isinstance(value, str) else value


def _model_folder(folder: Path) -> Path:
    """A folder ``load_network`` reads: the folder itself, its ``best/``, or its latest checkpoint."""
    if (folder / "config.yaml").is_file():
        return folder
    if (folder / "best" / "config.yaml").is_file():
        return folder / "best"
    checkpoints = sorted((folder / "checkpoints").glob("epoch_*")) if (folder / "checkpoints").is_dir() else []
    if checkpoints and (checkpoints[-1] / "config.yaml").is_file():
        return checkpoints[-1]
    raise DataError(folder, "not a trained model folder (expected config.yaml + model.pt, a fit output folder with "
                            "best/ or checkpoints/, or an ensemble folder with ensemble.json)")


def _folder_scheme(folder: Path, scheme_hint: Any) -> Any:
    from bratstune.config_utils import load_yaml
    from bratstune.labels import get_scheme, scheme_for

    if scheme_hint is not None:
        return _scheme(scheme_hint)
    raw = load_yaml(folder / "config.yaml") or {}
    challenge = raw.get("challenge") if isinstance(raw, Mapping) else None
    return scheme_for(challenge) if challenge else get_scheme("brats2023")


def load_source(source: str | Path, scheme_hint: Any = None, *, member: int = 0, dst: Path | None = None) -> SourceModel:
    """Load the model to fine-tune (see the module docstring).

    Args:
        source: ``models:/...`` / ``runs:/.../ensemble`` / ensemble folder, or a model folder / run id.
        scheme_hint: label scheme (name or object) of a plain model folder; default from the
            folder's ``config.yaml`` ``challenge`` (else ``brats2023``). Ensembles record theirs.
        member: which ensemble member to take.
        dst: where MLflow downloads go (default a temporary folder).

    Raises:
        DataError: nothing loadable there, or no such member.
    """
    from bratstune.data.case import MODALITIES
    from bratstune.ensemble.package import ENSEMBLE_FILE
    from bratstune.training.network import load_network
    from bratstune.ensemble.registry import load_ensemble, resolve_member_source

    text = str(source)
    local = Path(text).expanduser()
    is_ensemble = (local.is_dir() and (local / ENSEMBLE_FILE).is_file()) or text.startswith("models:/") or (
        text.startswith("runs:/") and text.rstrip("/").endswith("/ensemble"))
    if is_ensemble:
        loaded = load_ensemble(text, dst=dst)
        members = loaded.ensemble.members
        if not 0 <= member < len(members):
            raise DataError(None, f"{text}: member {member} requested, the ensemble has {len(members)} "
                                  f"({[m.name for m in members]})")
        chosen = members[member]
        logger.info("source %s: member %d (%s) of %d", loaded.label, member, chosen.name, len(members))
        return SourceModel(
            model=chosen.model.cpu().eval(), config=load_train_config(chosen.config), scheme=loaded.ensemble.scheme,
            modalities=tuple(loaded.ensemble.modalities), origin=loaded.label,
            extra={"member": chosen.name, "challenge": loaded.ensemble.challenge},
        )
    if not local.is_dir():
        if not (_RUN_ID.fullmatch(text) or text.startswith("runs:/")):
            raise DataError(local, "no such model folder, and not a models:/ URI, runs:/ URI or MLflow run id")
        local = resolve_member_source(text, dst=dst)
    folder = _model_folder(local)
    scheme = _folder_scheme(folder, scheme_hint)
    model, config = load_network(folder, scheme)
    in_channels = _in_channels(model)
    modalities = tuple(MODALITIES[:in_channels]) if in_channels is not None else tuple(MODALITIES)
    logger.info("source %s (%s, scheme %s)", folder, config.model.name, scheme.name)
    return SourceModel(model=model.cpu().eval(), config=config, scheme=scheme, modalities=modalities, origin=str(folder))


def _in_channels(model: torch.nn.Module) -> int | None:
    for param in model.parameters():
        if param.ndim == 5:
            return int(param.shape[1])
    return None


# -- head remapping -----------------------------------------------------------------------------


def channel_names(config: TrainConfig, scheme: Any) -> tuple[str, ...]:
    """Names of the output channels: region mode ``train_regions``; label mode background + labels."""
    if config.loss.mode == "region":
        return tuple(scheme.train_regions)
    from bratstune.inference.outputs import label_values

    return ("background", *(str(scheme.labels[v]) for v in label_values(scheme)))


def _head_prefixes(model: torch.nn.Module) -> list[str]:
    from bratstune.models import layer_groups

    return list(layer_groups(model).get("head", []))


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def remap_head(
    model: torch.nn.Module, config: TrainConfig, src_scheme: Any, dst_scheme: Any, *, in_channels: int | None = None
) -> tuple[torch.nn.Module, dict[str, str | None]]:
    """A network for ``dst_scheme`` initialised from ``model`` (trained for ``src_scheme``).

    Returns:
        ``(network, mapping)`` with ``mapping[target channel] = source channel or None``
        (re-initialised). When the channels are identical the input model is returned as is.

    Raises:
        DataError: a non-head tensor has a different shape in the target network.
    """
    from bratstune.training.network import build_network

    src_scheme, dst_scheme = _scheme(src_scheme), _scheme(dst_scheme)
    src_names, dst_names = channel_names(config, src_scheme), channel_names(config, dst_scheme)
    mapping = {name: (name if name in src_names else None) for name in dst_names}
    if src_names == dst_names:
        logger.info("label schemes %s -> %s: same output channels %s, head kept", src_scheme.name, dst_scheme.name,
                    list(dst_names))
        return model, mapping
    in_channels = in_channels if in_channels is not None else (_in_channels(model) or 4)
    target = build_network(config, dst_scheme, in_channels=in_channels)
    src_state, dst_state = model.state_dict(), target.state_dict()
    prefixes = _head_prefixes(target)
    head_ptrs = {t.data_ptr() for k, t in dst_state.items() if _under(k, prefixes)}
    # DynUNet also registers its deep-supervision heads as skip_layers.*.super_head (same modules)
    heads = [k for k, t in dst_state.items() if _under(k, prefixes) or t.data_ptr() in head_ptrs]
    n_src, n_dst = len(src_names), len(dst_names)
    new_state: dict[str, torch.Tensor] = {}
    rows = [(dst_names.index(d), src_names.index(s)) for d, s in mapping.items() if s is not None]
    for name, dst_tensor in dst_state.items():
        src_tensor = src_state.get(name)
        if src_tensor is None:
            raise DataError(None, f"remap_head: tensor {name} of the target network is not in the source model")
        if tuple(src_tensor.shape) == tuple(dst_tensor.shape) and not (
            name in heads and dst_tensor.ndim >= 1 and n_src == n_dst and dst_tensor.shape[0] == n_dst
        ):
            new_state[name] = src_tensor.clone()
            continue
        if name in heads and dst_tensor.ndim >= 1 and src_tensor.shape[0] == n_src and dst_tensor.shape[0] == n_dst \
                and tuple(src_tensor.shape[1:]) == tuple(dst_tensor.shape[1:]):
            out = dst_tensor.clone()
            for d, s in rows:
                out[d] = src_tensor[s]
            new_state[name] = out
            continue
        raise DataError(None, f"remap_head: {name} has shape {list(src_tensor.shape)} in the source and "
                              f"{list(dst_tensor.shape)} in the target network (only output rows can differ)")
    target.load_state_dict(new_state)
    kept = {d: s for d, s in mapping.items() if s is not None}
    fresh = [d for d, s in mapping.items() if s is None]
    dropped = [s for s in src_names if s not in dst_names]
    logger.info("label schemes %s -> %s: channels mapped by name %s; re-initialised %s; dropped %s",
                src_scheme.name, dst_scheme.name, kept, fresh or "none", dropped or "none")
    return target.eval(), mapping


# -- modalities ---------------------------------------------------------------------------------


def _cases(target: Path | str | Sequence[Any]) -> list[Any]:
    if isinstance(target, (str, Path)):
        from bratstune.data.layout import discover

        return list(discover(Path(target), modalities=()).cases)
    return list(target)


def _expected_file(case: Any, modality: str) -> Path:
    from bratstune.data.layout import _SUFFIX_TOKENS

    first = next(iter(case.images.values()), None) or case.label
    folder = Path(first).parent if first is not None else Path(".")
    name = Path(first).name if first is not None else ".nii.gz"
    ext = ".nii.gz" if name.endswith(".gz") else ".nii"
    token = _SUFFIX_TOKENS.get(case.convention, _SUFFIX_TOKENS["brats2023"])[modality]
    return folder / f"{case.case_id}{token}{ext}"


def check_modalities(
    source_modalities: Sequence[str], target_cases: Path | str | Sequence[Any], fill: Mapping[str, str] | None = None
) -> dict[str, dict[str, str]]:
    """Refuse target cases lacking a modality the source needs, unless ``fill`` covers it.

    Args:
        source_modalities: the modalities the source model takes.
        target_cases: a cohort folder or ``Case`` objects.
        fill: missing modality -> another modality to copy, or ``"zeros"``.

    Returns:
        ``{case_id: {missing modality: fill}}`` for the cases that need filling.

    Raises:
        DataError: naming the case's missing file and the ``fill`` option; or a bad ``fill``.
    """
    from bratstune.data.case import MODALITIES

    fill = dict(fill or {})
    for missing, how in fill.items():
        if missing not in MODALITIES or (how != FILL_ZEROS and how not in MODALITIES) or how == missing:
            raise ConfigError(f"fill: {missing!r}: {how!r}: expected a modality of {list(MODALITIES)} filled from "
                              f"another modality or {FILL_ZEROS!r}")
    needed: dict[str, dict[str, str]] = {}
    for case in _cases(target_cases):
        missing = [m for m in source_modalities if m not in case.images]
        if not missing:
            continue
        for m in missing:
            how = fill.get(m)
            if how is None:
                raise DataError(_expected_file(case, m), (
                    f"missing modality {m} of case '{case.case_id}': the source model needs "
                    f"{', '.join(source_modalities)}; set fill (e.g. fill: {{{m}: zeros}} or {{{m}: t1c}}) to fill it"))
            if how != FILL_ZEROS and how not in case.images:
                raise DataError(_expected_file(case, how),
                                f"fill {m} from {how}: case '{case.case_id}' has no {how} either")
        needed[case.case_id] = {m: fill[m] for m in missing}
    return needed


def fill_missing(root: Path | str, fill: Mapping[str, str], out: Path | str) -> Path:
    """A copy of the cohort at ``root`` under ``out`` (symbolic links) with missing modalities filled.

    Returns ``out`` (``root`` itself when nothing is missing).
    """
    import nibabel as nib

    from bratstune.data.case import MODALITIES
    from bratstune.data.layout import discover
    from bratstune.data.nifti import write_nifti_atomic

    root, out = Path(root), Path(out)
    cases = list(discover(root, modalities=()).cases)
    needed = check_modalities(MODALITIES, cases, fill)
    if not needed:
        return root
    for case in cases:
        files = [*case.images.values(), *([case.label] if case.label is not None else [])]
        folder = out / case.case_id
        folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            link = folder / Path(path).name
            if not link.exists():
                link.symlink_to(Path(path).resolve())
        for modality, how in needed.get(case.case_id, {}).items():
            dst = folder / _expected_file(case, modality).name
            if how == FILL_ZEROS:
                ref = nib.load(str(next(iter(case.images.values()))))
                write_nifti_atomic(dst, np.zeros(ref.shape, dtype=np.float32), ref.affine, ref.header)
            elif not dst.exists():
                dst.symlink_to(Path(case.images[how]).resolve())
            logger.info("case %s: %s filled from %s", case.case_id, modality, how)
    return out


def prepare_target(
    root: Path | str,
    source: SourceModel,
    *,
    fill: Mapping[str, str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache_root: Path | None = None,
    filled_dir: Path | None = None,
    workers: int = 1,
) -> tuple[Any, str | None]:
    """Check modalities, fill, preprocess and split the target cohort: ``(TrainData, challenge)``."""
    import tempfile

    from bratstune.data.cohort import prepare_cohort, preprocess_config, split_train_val

    root = Path(root)
    needed = check_modalities(source.modalities, root, fill)
    if needed:
        root = fill_missing(root, fill or {}, filled_dir or Path(tempfile.mkdtemp(prefix="bratstune-filled-")))
    prepared = prepare_cohort(root, preprocess_config(preprocess if preprocess is not None
                                                      else source.config.data.preprocess),
                              workers=workers, cache_root=cache_root)
    data = split_train_val(prepared.cases, prepared.scheme, val_fraction=val_fraction, seed=seed)
    return data, prepared.challenge


# -- fine-tuning --------------------------------------------------------------------------------


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if "." in key and key not in out:
            head, rest = key.split(".", 1)
            out[head] = _merge(dict(out.get(head) or {}), {rest: value})
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def finetune_config(
    source: SourceModel, config_overrides: Mapping[str, Any] | None, *, freeze: Sequence[str],
    init_file: Path | None, challenge: str | None,
) -> TrainConfig:
    """The fine-tuning config: the source's config, ``config_overrides`` (nested or dotted keys),
    ``init.encoder_from = init_file``, ``freeze`` and ``challenge``."""
    base = source.config.to_dict()
    base.pop("init", None)
    merged = _merge(base, dict(config_overrides or {}))
    merged["freeze"] = list(freeze)
    if challenge is not None:
        merged["challenge"] = challenge
    if init_file is not None:
        merged["init"] = {"encoder_from": str(init_file), "strip_prefix": "", "require_complete": False}
    config = load_train_config(merged)
    if dict(config.model.kwargs) != dict(source.config.model.kwargs) or config.model.name != source.config.model.name:
        logger.warning("fine-tuning config changes the architecture (%s %s -> %s %s): unmatched tensors start fresh",
                       source.config.model.name, dict(source.config.model.kwargs), config.model.name,
                       dict(config.model.kwargs))
    return config


def _init_model(source: SourceModel, target_scheme: Any, in_channels: int) -> tuple[torch.nn.Module, dict[str, str | None]]:
    return remap_head(source.model, source.config, source.scheme, target_scheme, in_channels=in_channels)


def finetune(
    source: SourceModel,
    target_data: Any,
    config_overrides: Mapping[str, Any] | None = None,
    *,
    freeze: Sequence[str] = (),
    out_dir: Path | str,
    reporter: Any = None,
    challenge: str | None = None,
) -> Any:
    """Fine-tune ``source`` on ``target_data`` with the ``freeze`` groups fixed.

    Args:
        source: from :func:`load_source`.
        target_data: :class:`~bratstune.training.fit.TrainData` of the target cohort (its scheme may differ).
        config_overrides: nested or dotted keys over the source's config (``epochs``, ``optim.lr`` ...).
        freeze: layer groups kept fixed (``encoder``, ``middle``, ``decoder``, ``head``).
        out_dir: fit's output folder; also gets ``source_init.pt`` and ``transfer.json``.
        reporter: passed to :func:`~bratstune.training.fit.fit`.
        challenge: the target challenge (lesion-wise rules of validation).

    Returns:
        :class:`~bratstune.training.fit.FitResult`; ``result.transfer`` holds the transfer record.
    """
    from bratstune.models.groups import check_group_names
    from bratstune.training.fit import fit

    check_group_names(freeze)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    in_channels = int(np.asarray(target_data.train[0].image).shape[0])
    expected = _in_channels(source.model)
    if expected is not None and expected != in_channels:
        raise DataError(None, f"target cases have {in_channels} image channels, the source model takes {expected}")
    model, mapping = _init_model(source, target_data.scheme, in_channels)
    init_file = out / INIT_FILE
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, init_file)
    config = finetune_config(source, config_overrides, freeze=freeze, init_file=init_file, challenge=challenge)
    record = {
        "source": source.origin, "source_scheme": source.scheme.name, "target_scheme": target_data.scheme.name,
        "mapping": mapping, "freeze": list(freeze), "challenge": challenge, "init_file": str(init_file),
        **({"member": source.extra["member"]} if "member" in source.extra else {}),
    }
    (out / TRANSFER_FILE).write_text(json.dumps(record, indent=2))
    result = fit(config, target_data, reporter, out_dir=out)
    report = getattr(result.model, "bratstune_init_report", None)
    if report is not None and (report.mismatched or len(report.loaded) + len(report.interpolated) < len(model.state_dict())):
        logger.warning("not every source tensor was loaded: %s", report.summary())
    result.transfer = record  # type: ignore[attr-defined]
    return result


def evaluate_source(
    source: SourceModel, target_data: Any, *, challenge: str | None, config_overrides: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """``val/...`` metrics of the (head-remapped) source model on the target's validation cases."""
    from bratstune.training.fit import inference_settings
    from bratstune.training.validate import validate

    if not target_data.val:
        raise DataError(None, "evaluate_source: the target data has no validation cases")
    in_channels = int(np.asarray(target_data.val[0].image).shape[0])
    model, mapping = _init_model(source, target_data.scheme, in_channels)
    config = finetune_config(source, config_overrides, freeze=(), init_file=None, challenge=challenge)
    v = config.validation
    cases = list(target_data.val)[: v.max_cases] if v.max_cases else list(target_data.val)
    metrics = validate(model.eval(), cases, target_data.scheme, inference_settings(config),
                       challenge=challenge or config.challenge or "GLI", lesion_metrics=v.lesion_metrics)
    logger.info("source model on %d target validation case(s): %s", len(cases),
                {k: round(val, 4) for k, val in metrics.items() if k.endswith("_mean")})
    return metrics
