"""Segmentation losses: Focal-Tversky, Edge, deep supervision, and a weighted compound of terms.

``CompoundLoss({"dice": 1, "focal_tversky": 1, "ce": 1, ...}, mode="region")`` sums the
weighted terms

==================  ==========================================================================
``dice``            MONAI ``DiceLoss`` on probabilities: :math:`1 - (2\\sum pt + s)/(\\sum p + \\sum t + s)`
``focal``           MONAI ``FocalLoss`` on logits: :math:`-(1 - p_t)^{\\gamma_f} \\log p_t`
``focal_tversky``   :class:`FocalTverskyLoss`: :math:`(1 - TI)^{\\gamma}`
``ce``              ``BCEWithLogitsLoss`` (region mode) / ``CrossEntropyLoss`` (label mode)
``mse``             :math:`\\mathrm{mean}\\,(p - t)^2` on probabilities
``edge``            :class:`EdgeLoss`: MSE of normalised spatial-gradient magnitudes
==================  ==========================================================================

Two modes:

* ``region`` (default): logits ``(B, R, X, Y, Z)``, one sigmoid per overlapping region
  (e.g. WT, TC, ET); target ``(B, R, X, Y, Z)`` binary (``bratstune.labels.labels_to_regions``).
* ``label``: logits ``(B, C, X, Y, Z)``, softmax over disjoint labels (channel 0 = background);
  target ``(B, 1, X, Y, Z)`` (or ``(B, X, Y, Z)``) integer labels in ``[0, C)``, one-hot
  encoded internally.

All terms are computed in float32 (safe under autocast).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from bratstune.config_utils import suggest
from bratstune.errors import ConfigError
from bratstune.training.config import LOSS_TERMS, LossConfig, check_number

__all__ = [
    "TERMS",
    "CompoundLoss",
    "EdgeLoss",
    "FocalTverskyLoss",
    "LossMode",
    "deep_supervision_loss",
    "deep_supervision_weights",
    "downsample_target",
]

TERMS: tuple[str, ...] = LOSS_TERMS


class LossMode(str, enum.Enum):
    """How logits and targets are read: overlapping sigmoid regions or disjoint softmax labels."""

    REGION = "region"
    LABEL = "label"


def _check_same_shape(input: torch.Tensor, target: torch.Tensor, who: str) -> None:
    if input.ndim < 3:
        raise ValueError(f"{who}: input must have shape (B, C, *spatial), got {tuple(input.shape)}")
    if target.shape != input.shape:
        raise ValueError(
            f"{who}: target shape {tuple(target.shape)} must equal input shape {tuple(input.shape)} "
            "(B, C, *spatial); one-hot encode integer labels first"
        )


class FocalTverskyLoss(nn.Module):
    """Focal Tversky loss (Abraham & Khan, ISBI 2019) on probabilities.

    Per channel :math:`c` (soft counts, sums over space — and over the batch when
    ``batch=True``):

    .. math::

        TP_c = \\sum p\\,t,\\quad FP_c = \\sum p\\,(1 - t),\\quad FN_c = \\sum (1 - p)\\,t

        TI_c = \\frac{TP_c + s}{TP_c + \\alpha FP_c + \\beta FN_c + s},\\qquad
        \\mathcal{L} = \\operatorname{mean}_c (1 - TI_c)^{\\gamma}

    ``alpha`` weights false positives, ``beta`` false negatives (``beta > alpha`` favours
    recall of small lesions); ``gamma = 1`` is the plain Tversky loss and
    ``alpha = beta = 0.5, gamma = 1`` the soft Dice loss. With ``batch=False`` the index is
    computed per sample and the mean runs over samples and channels.

    Args:
        alpha: false-positive weight, ``>= 0``.
        beta: false-negative weight, ``>= 0``; ``alpha + beta > 0``.
        gamma: focal exponent, ``> 0``.
        smooth: added to numerator and denominator, ``>= 0`` (an empty channel predicted
            empty scores 0 loss).
        batch: pool the counts over the batch (stable for patches with empty regions).

    Shapes:
        input: probabilities ``(B, C, *spatial)`` (apply sigmoid/softmax first).
        target: same shape, binary or soft one-hot.
        output: scalar.
    """

    def __init__(
        self, *, alpha: float = 0.3, beta: float = 0.7, gamma: float = 2.0, smooth: float = 1e-5, batch: bool = True
    ) -> None:
        super().__init__()
        self.alpha, self.beta, self.gamma = LossConfig.check_tversky(alpha, beta, gamma)
        self.smooth = check_number(smooth, "smooth", minimum=0.0)
        self.batch = bool(batch)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_same_shape(input, target, "FocalTverskyLoss")
        p, t = input.float(), target.float()
        dims = (0, *range(2, p.ndim)) if self.batch else tuple(range(2, p.ndim))
        tp = (p * t).sum(dims)
        fp = (p * (1 - t)).sum(dims)
        fn = ((1 - p) * t).sum(dims)
        ti = (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
        return (1 - ti).clamp_min(0).pow(self.gamma).mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, smooth={self.smooth}, batch={self.batch}"


def spatial_gradient_magnitude(x: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """Normalised spatial-gradient magnitude of ``x`` ``(B, C, *spatial)``, same shape, in ``[0, 1]``.

    Forward differences along each spatial axis :math:`d`, zero at the last index
    (replicate padding): :math:`g_d[i] = x[i + 1] - x[i]`. Magnitude
    :math:`G = \\sqrt{\\sum_d g_d^2 + \\delta} - \\sqrt{\\delta}` with :math:`\\delta = 10^{-12}`
    (exactly 0 where flat, finite gradient everywhere), then per sample and channel
    :math:`\\hat G = G / (\\max G + \\epsilon)`.
    """
    sq = torch.zeros_like(x)
    for axis in range(2, x.ndim):
        n = x.shape[axis]
        if n < 2:
            continue
        diff = x.narrow(axis, 1, n - 1) - x.narrow(axis, 0, n - 1)
        sq = sq + F.pad(diff, _pad_last(x.ndim, axis)) ** 2
    delta = 1e-12
    mag = torch.sqrt(sq + delta) - math.sqrt(delta)
    peak = mag.flatten(2).amax(dim=2).view(*mag.shape[:2], *([1] * (mag.ndim - 2)))
    return mag / (peak + eps)


def _pad_last(ndim: int, axis: int) -> list[int]:
    """``F.pad`` spec adding one zero at the end of ``axis`` (F.pad lists the last axis first)."""
    pad = [0] * (2 * (ndim - 2))
    pad[2 * (ndim - 1 - axis) + 1] = 1
    return pad


class EdgeLoss(nn.Module):
    """Boundary-aware loss: MSE between normalised gradient magnitudes of prediction and target.

    .. math::

        \\mathcal{L} = \\operatorname{mean}\\big(\\hat G(p) - \\hat G(t)\\big)^2

    where :math:`\\hat G` is :func:`spatial_gradient_magnitude` (forward differences,
    magnitude divided by its per-sample, per-channel maximum + ``eps``). It penalises blurred or
    misplaced region borders that overlap terms barely see.

    Args:
        eps: added to the per-channel maximum (an empty target channel has :math:`\\hat G = 0`).

    Shapes:
        input: probabilities ``(B, C, *spatial)``; target: same shape; output: scalar.
    """

    def __init__(self, *, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = check_number(eps, "eps", minimum=0.0, strict=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_same_shape(input, target, "EdgeLoss")
        g_pred = spatial_gradient_magnitude(input.float(), eps=self.eps)
        g_true = spatial_gradient_magnitude(target.float(), eps=self.eps)
        return F.mse_loss(g_pred, g_true)


class CompoundLoss(nn.Module):
    """Weighted sum of segmentation loss terms: :math:`\\mathcal{L} = \\sum_k w_k \\mathcal{L}_k`.

    Terms (see the module docstring for formulas): ``dice``, ``focal``, ``focal_tversky``,
    ``ce``, ``mse``, ``edge``. A term with weight 0 is neither constructed nor computed.

    Args:
        weights: term name -> weight ``>= 0``; at least one weight must be positive.
        mode: ``"region"`` (sigmoid per overlapping region) or ``"label"`` (softmax over
            disjoint labels); see the module docstring for the shapes.
        alpha, beta, gamma: :class:`FocalTverskyLoss` parameters (FP weight, FN weight,
            exponent).
        focal_gamma: focusing exponent of the ``focal`` term, ``>= 0`` (0 gives CE).
        smooth: Dice / Tversky smoothing constant.
        batch: pool Dice / Tversky counts over the batch (see :class:`FocalTverskyLoss`).
        include_background: label mode only — whether the probability terms (``dice``,
            ``focal_tversky``, ``mse``, ``edge``) include channel 0; ``ce`` and ``focal``
            always use all channels. Ignored in region mode (no background channel).

    Shapes:
        input: logits ``(B, C, *spatial)``.
        target: region mode ``(B, C, *spatial)`` binary; label mode ``(B, 1, *spatial)``
            or ``(B, *spatial)`` integers in ``[0, C)``.
        output: scalar.

    Notes:
        ``focal`` reduces like ``ce``: region mode mean over all elements; label mode sum over
        channels and mean over voxels, so ``focal_gamma=0`` equals ``ce`` in both modes.
        Deep-supervision outputs ``(B, S, C, ...)`` go through :func:`deep_supervision_loss`.

    Example::

        loss_fn = CompoundLoss({"focal_tversky": 1.0, "ce": 1.0}, alpha=0.3, beta=0.7, gamma=2.0)
        loss = loss_fn(logits, regions)
        parts = loss_fn.compute_terms(logits, regions)  # unweighted, for logging
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        mode: LossMode | str = LossMode.REGION,
        alpha: float = 0.3,
        beta: float = 0.7,
        gamma: float = 2.0,
        focal_gamma: float = 2.0,
        smooth: float = 1e-5,
        batch: bool = True,
        include_background: bool = False,
    ) -> None:
        super().__init__()
        # Zero-weight terms are neither built nor computed.
        self.weights = {k: v for k, v in LossConfig.check_weights(weights).items() if v > 0}
        mode_value = mode.value if isinstance(mode, LossMode) else str(mode)
        if mode_value not in [m.value for m in LossMode]:
            options = [m.value for m in LossMode]
            raise ConfigError(f"unknown loss mode '{mode}'{suggest(mode_value, options)}; expected one of {options}")
        self.mode = LossMode(mode_value)
        alpha, beta, gamma = LossConfig.check_tversky(alpha, beta, gamma)
        focal_gamma = check_number(focal_gamma, "focal_gamma", minimum=0.0)
        smooth = check_number(smooth, "smooth", minimum=0.0)
        self.include_background = bool(include_background)
        region = self.mode is LossMode.REGION

        self.terms = nn.ModuleDict()
        for name in self.weights:
            if name == "dice":
                self.terms[name] = DiceLoss(smooth_nr=smooth, smooth_dr=smooth, batch=bool(batch))
            elif name == "focal":
                self.terms[name] = FocalLoss(gamma=focal_gamma, use_softmax=not region, reduction="none")
            elif name == "focal_tversky":
                self.terms[name] = FocalTverskyLoss(alpha=alpha, beta=beta, gamma=gamma, smooth=smooth, batch=batch)
            elif name == "ce":
                self.terms[name] = nn.BCEWithLogitsLoss() if region else nn.CrossEntropyLoss()
            elif name == "mse":
                self.terms[name] = nn.MSELoss()
            elif name == "edge":
                self.terms[name] = EdgeLoss()

    def _prepare_target(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Validate shapes; return a float one-hot / region target of the input's shape."""
        if input.ndim < 3:
            raise ValueError(f"CompoundLoss: input must be logits (B, C, *spatial), got shape {tuple(input.shape)}")
        if self.mode is LossMode.REGION and input.ndim == target.ndim + 1:
            raise ValueError(
                f"CompoundLoss: input {tuple(input.shape)} has one dimension more than target {tuple(target.shape)}: "
                "stacked deep-supervision outputs (B, S, C, *spatial) go through deep_supervision_loss(loss, outputs, target)"
            )
        if self.mode is LossMode.REGION:
            if target.shape != input.shape:
                raise ValueError(
                    f"CompoundLoss(mode='region'): target shape {tuple(target.shape)} must equal input shape "
                    f"{tuple(input.shape)}, one binary channel per region (bratstune.labels.labels_to_regions); "
                    "for integer labels use mode='label'"
                )
            return target.float()
        n_classes = input.shape[1]
        if n_classes < 2:
            raise ValueError(
                f"CompoundLoss(mode='label'): softmax needs at least 2 channels, got input {tuple(input.shape)}"
            )
        if target.ndim == input.ndim - 1:
            target = target.unsqueeze(1)
        expected = (input.shape[0], 1, *input.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(
                f"CompoundLoss(mode='label'): target must hold integer labels of shape {expected} "
                f"(B, 1, *spatial) for input {tuple(input.shape)}, got {tuple(target.shape)}; "
                "for one channel per region use mode='region'; stacked deep-supervision outputs "
                "(B, S, C, *spatial) go through deep_supervision_loss"
            )
        if target.is_floating_point() and not torch.equal(target, target.round()):
            raise ValueError("CompoundLoss(mode='label'): target must hold integer labels, got fractional values")
        labels = target.long()
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= n_classes:
            raise ValueError(
                f"CompoundLoss(mode='label'): target labels must lie in [0, {n_classes - 1}] for {n_classes} "
                f"output channels, got values in [{low}, {high}]"
            )
        return F.one_hot(labels[:, 0], n_classes).movedim(-1, 1).float()

    def compute_terms(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted value of every active term, ``{name: scalar tensor}``."""
        logits = input.float()
        onehot = self._prepare_target(logits, target)
        region = self.mode is LossMode.REGION
        probs = None
        if any(n in self.terms for n in ("dice", "focal_tversky", "mse", "edge")):
            probs = torch.sigmoid(logits) if region else torch.softmax(logits, dim=1)
            if not region and not self.include_background:
                probs, prob_target = probs[:, 1:], onehot[:, 1:]
            else:
                prob_target = onehot
        out: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            if name == "ce":
                out[name] = term(logits, onehot) if region else term(logits, onehot.argmax(1))
            elif name == "focal":
                elementwise = term(logits, onehot)
                out[name] = elementwise.mean() if region else elementwise.sum(1).mean()
            else:
                out[name] = term(probs, prob_target)
        return out

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = self.compute_terms(input, target)
        return sum((self.weights[name] * value for name, value in terms.items()), torch.zeros((), device=input.device))

    def extra_repr(self) -> str:
        return f"weights={self.weights}, mode={self.mode.value!r}"


# --------------------------------------------------------------------------------------------
# deep supervision
# --------------------------------------------------------------------------------------------


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net weights :math:`w_i = 2^{-i} / \\sum_{j<n} 2^{-j}` (full resolution first)."""
    if n < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n}")
    raw = [0.5**i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def downsample_target(target: torch.Tensor, size: Sequence[int], *, mode: str = "max") -> torch.Tensor:
    """Bring ``target`` ``(B, C, *spatial)`` to spatial ``size``.

    ``mode="max"``: adaptive max pooling — a coarse voxel is in a region if any fine voxel of
    its cell is (binary region targets; thin ET rims survive). ``mode="nearest"``: nearest
    neighbour (integer label targets). Returns ``target`` unchanged when the size matches.
    """
    size = tuple(int(s) for s in size)
    if tuple(target.shape[2:]) == size:
        return target
    if mode == "max":
        pool = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}[target.ndim - 2]
        return pool(target.float(), size).to(target.dtype)
    if mode == "nearest":
        return F.interpolate(target.float(), size=size, mode="nearest").to(target.dtype)
    raise ValueError(f"downsample mode must be 'max' or 'nearest', got {mode!r}")


def deep_supervision_loss(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    outputs: torch.Tensor | Sequence[torch.Tensor],
    target: torch.Tensor,
    weights: Sequence[float] | None = None,
    *,
    downsample: str | None = None,
) -> torch.Tensor:
    """Weighted loss over deep-supervision outputs: :math:`\\sum_i w_i\\,\\mathcal{L}(o_i, t_i)`.

    Args:
        loss_fn: e.g. a :class:`CompoundLoss`.
        outputs: either a tensor ``(B, S, C, *spatial)`` — what ``bratstune.models`` ``unet``
            (MONAI DynUNet) returns in training mode, every head already upsampled to full
            size — or a sequence of ``S`` tensors ``(B, C, *spatial_i)``, full resolution first.
            A plain ``(B, C, *spatial)`` tensor of the target's rank is accepted as ``S = 1``.
        target: full-resolution target as ``loss_fn`` expects it.
        weights: ``S`` non-negative weights (normalised to sum 1); default
            :func:`deep_supervision_weights` (1, 1/2, 1/4, ... normalised).
        downsample: how the target is brought to a smaller output: ``"max"`` (regions) or
            ``"nearest"`` (labels); default ``"nearest"`` if ``loss_fn.mode`` is ``label``, else
            ``"max"``. Targets are never upsampled: outputs larger than the target are an error.

    Returns:
        Scalar loss.
    """
    first = outputs if isinstance(outputs, torch.Tensor) else outputs[0]
    if first.ndim - int(isinstance(outputs, torch.Tensor)) == target.ndim + 1:
        target = target.unsqueeze(1)  # label targets given as (B, *spatial)
    if isinstance(outputs, torch.Tensor):
        if outputs.ndim == target.ndim:
            outputs = [outputs]
        elif outputs.ndim == target.ndim + 1:
            outputs = list(outputs.unbind(dim=1))
        else:
            raise ValueError(
                f"deep_supervision_loss: outputs {tuple(outputs.shape)} must be (B, S, C, *spatial) or "
                f"(B, C, *spatial) for target {tuple(target.shape)}"
            )
    outputs = list(outputs)
    if weights is None:
        w = deep_supervision_weights(len(outputs))
    else:
        w = [check_number(v, f"deep supervision weight {i}", minimum=0.0) for i, v in enumerate(weights)]
        if len(w) != len(outputs):
            raise ValueError(f"deep_supervision_loss: {len(w)} weights for {len(outputs)} outputs")
        total = sum(w)
        if total <= 0:
            raise ValueError(f"deep_supervision_loss: weights {list(weights)} are all zero")
        w = [v / total for v in w]
    if downsample is None:
        mode = getattr(loss_fn, "mode", LossMode.REGION)
        downsample = "nearest" if LossMode(getattr(mode, "value", mode)) is LossMode.LABEL else "max"
    full = tuple(target.shape[2:])
    cache: dict[tuple[int, ...], torch.Tensor] = {}
    total_loss = torch.zeros((), device=target.device)
    for weight, out in zip(w, outputs):
        if weight == 0:
            continue
        size = tuple(out.shape[2:])
        if any(s > f for s, f in zip(size, full)):
            raise ValueError(f"deep_supervision_loss: output size {size} is larger than the target {full}")
        if size not in cache:
            cache[size] = downsample_target(target, size, mode=downsample)
        total_loss = total_loss + weight * loss_fn(out, cache[size])
    return total_loss
