"""Hungarian-matched mask loss of the 3D-TransUNet decoder-only variant (``transunet_dec``).

The network predicts ``N`` queries, each with class logits :math:`c_q \\in R^{K+1}` (``K``
regions + "no object", the last) and mask logits :math:`M_q` over the patch
(:mod:`bratstune.models.query_decoder`). For sample ``b`` the ground-truth masks are its
**non-empty** region channels :math:`T_g` (``g = 1..G_b``, class :math:`r_g`; region targets
``(B, K, X, Y, Z)`` as ``bratstune.labels.labels_to_regions`` makes them). Following
Mask2Former / 3D-TransUNet, each ground-truth mask is matched to one query by minimising

.. math::

    C_{qg} = -\\lambda_{cls}\\, \\operatorname{softmax}(c_q)_{r_g}
             + \\lambda_{ce}\\, \\overline{\\mathrm{BCE}}(M_q, T_g)
             + \\lambda_{dice}\\, \\Big(1 - \\frac{2 \\sum_x \\sigma(M_q) T_g + 1}{\\sum_x \\sigma(M_q) + \\sum_x T_g + 1}\\Big)

with ``scipy.optimize.linear_sum_assignment`` (:math:`\\overline{\\mathrm{BCE}}` = mean over
voxels of the binary cross-entropy with logits). With the matching :math:`\\hat\\sigma`:

* :math:`L_{cls}`: cross-entropy of every query's class logits against its matched region, or
  "no object" for unmatched queries, weighted ``no_object_weight`` for the latter (weighted mean
  over all ``B N`` queries, as ``torch.nn.functional.cross_entropy(weight=...)``);
* :math:`L_{ce}`, :math:`L_{dice}`: the BCE and Dice terms above, averaged over matched pairs
  (0 when no sample of the batch has a region);
* :math:`L = \\lambda_{cls} L_{cls} + \\lambda_{ce} L_{ce} + \\lambda_{dice} L_{dice}`.

The paper weights CE and Dice 0.7 / 0.3 (``loss.weights: {ce: 0.7, dice: 0.3}`` in the
``transunet_dec`` presets); :math:`\\lambda_{cls}` = ``class_weight`` (0.2: the authors' code
weighs class : mask terms 2 : 10). With deep supervision the loss is the mean of :math:`L` over
the final query set and the ``aux_outputs`` of earlier layers, each matched on its own.

Written by hand: MONAI has no set-prediction (Hungarian) loss; scipy provides the assignment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from bratstune.errors import ConfigError
from bratstune.training.config import LossConfig, check_number

__all__ = ["MASK_LOSS_TERMS", "HungarianMaskLoss"]

#: the ``loss.weights`` terms the Hungarian loss understands (mask BCE and mask Dice)
MASK_LOSS_TERMS = ("ce", "dice")

Match = tuple[torch.Tensor, torch.Tensor]  # (query indices, region indices) of one sample


class HungarianMaskLoss(nn.Module):
    """Set-prediction loss of query masks against region masks (see the module docstring).

    Args:
        weights: ``{"ce": w_ce, "dice": w_dice}`` (``loss.weights``; missing terms weigh 0).
        class_weight: :math:`\\lambda_{cls}`, ``>= 0``.
        no_object_weight: class-CE weight of unmatched ("no object") queries, ``>= 0``.
        smooth: Dice smoothing (1 as in the authors' code).

    Shapes:
        output: ``{"pred_logits": (B, N, K + 1), "pred_masks": (B, N, X, Y, Z), "aux_outputs":
        [same, ...]}`` (what ``transunet_dec`` returns in training mode).
        target: ``(B, K, X, Y, Z)`` binary region masks.
        Returns a scalar.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        class_weight: float = 0.2,
        no_object_weight: float = 0.1,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        weights = dict(weights) if weights is not None else {"ce": 0.7, "dice": 0.3}
        extra = sorted(name for name, value in weights.items() if name not in MASK_LOSS_TERMS and value > 0)
        if extra:
            raise ConfigError(
                f"loss.weights: transunet_dec trains with a Hungarian-matched mask loss of the terms "
                f"{list(MASK_LOSS_TERMS)}; got {extra} (e.g. loss.weights: {{ce: 0.7, dice: 0.3}})"
            )
        self.ce_weight = check_number(weights.get("ce", 0.0), "loss.weights.ce", minimum=0.0)
        self.dice_weight = check_number(weights.get("dice", 0.0), "loss.weights.dice", minimum=0.0)
        if self.ce_weight + self.dice_weight <= 0:
            raise ConfigError("loss.weights: give ce or dice a positive weight for transunet_dec")
        self.class_weight = check_number(class_weight, "class_weight", minimum=0.0)
        self.no_object_weight = check_number(no_object_weight, "no_object_weight", minimum=0.0)
        self.smooth = check_number(smooth, "smooth", minimum=0.0)

    @classmethod
    def from_config(cls, loss: LossConfig, **kwargs: Any) -> HungarianMaskLoss:
        """The loss of a training config's ``loss`` section (region mode only)."""
        if loss.mode != "region":
            raise ConfigError(
                f"loss.mode: transunet_dec predicts region masks; set loss.mode: region (got {loss.mode!r})"
            )
        return cls(loss.weights, **kwargs)

    # -- matching ---------------------------------------------------------------------------------

    def _pair_costs(self, masks: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCE and Dice costs ``(N, G)`` between mask logits ``(N, V)`` and binary targets ``(G, V)``."""
        voxels = masks.shape[1]
        pos, neg = F.softplus(-masks), F.softplus(masks)  # BCE against 1 and against 0
        ce = (pos @ targets.T + neg @ (1 - targets).T) / voxels
        probs = torch.sigmoid(masks)
        dice = 1 - (2 * probs @ targets.T + self.smooth) / (
            probs.sum(-1)[:, None] + targets.sum(-1)[None, :] + self.smooth
        )
        return ce, dice

    @torch.no_grad()
    def match(self, class_logits: torch.Tensor, mask_logits: torch.Tensor, target: torch.Tensor) -> list[Match]:
        """Per sample, ``(query indices, region indices)`` of the minimum-cost assignment."""
        matches = []
        for b in range(class_logits.shape[0]):
            present = torch.nonzero(target[b].flatten(1).any(dim=1)).flatten()
            if present.numel() == 0:
                empty = torch.zeros(0, dtype=torch.long)
                matches.append((empty, empty))
                continue
            probs = torch.softmax(class_logits[b].float(), dim=-1)
            tgt = target[b, present].flatten(1).float()
            ce, dice = self._pair_costs(mask_logits[b].flatten(1).float(), tgt)
            cost = -self.class_weight * probs[:, present] + self.ce_weight * ce + self.dice_weight * dice
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.long), present.cpu()[torch.as_tensor(cols)]))
        return matches

    # -- loss -------------------------------------------------------------------------------------

    def compute_terms(self, output: Mapping[str, Any], target: torch.Tensor) -> dict[str, Any]:
        """Unweighted ``cls``, ``ce``, ``dice`` of one query set, and the ``matches``."""
        class_logits, mask_logits = output["pred_logits"].float(), output["pred_masks"].float()
        self._check(class_logits, mask_logits, target)
        matches = self.match(class_logits, mask_logits, target)
        batch, queries, classes = class_logits.shape
        labels = torch.full((batch, queries), classes - 1, dtype=torch.long, device=class_logits.device)
        b_idx = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matches)]).to(class_logits.device)
        q_idx = torch.cat([q for q, _ in matches]).to(class_logits.device)
        r_idx = torch.cat([r for _, r in matches]).to(class_logits.device)
        labels[b_idx, q_idx] = r_idx
        class_weights = torch.ones(classes, device=class_logits.device)
        class_weights[-1] = self.no_object_weight
        cls = F.cross_entropy(class_logits.transpose(1, 2), labels, weight=class_weights)
        if q_idx.numel() == 0:
            zero = mask_logits.sum() * 0.0  # keeps the graph
            return {"cls": cls, "ce": zero, "dice": zero, "matches": matches}
        src = mask_logits[b_idx, q_idx].flatten(1)
        tgt = target[b_idx, r_idx].flatten(1).float()
        ce = F.binary_cross_entropy_with_logits(src, tgt, reduction="none").mean(dim=1).mean()
        probs = torch.sigmoid(src)
        dice = 1 - (2 * (probs * tgt).sum(-1) + self.smooth) / (probs.sum(-1) + tgt.sum(-1) + self.smooth)
        return {"cls": cls, "ce": ce, "dice": dice.mean(), "matches": matches}

    def single(self, output: Mapping[str, Any], target: torch.Tensor) -> torch.Tensor:
        """:math:`L` of one query set."""
        terms = self.compute_terms(output, target)
        return self.class_weight * terms["cls"] + self.ce_weight * terms["ce"] + self.dice_weight * terms["dice"]

    def forward(
        self, output: Mapping[str, Any], target: torch.Tensor, *, deep_supervision: bool = True
    ) -> torch.Tensor:
        if not isinstance(output, Mapping) or "pred_logits" not in output or "pred_masks" not in output:
            raise ValueError(
                "HungarianMaskLoss: expected the training-mode output of transunet_dec "
                "({'pred_logits', 'pred_masks', 'aux_outputs'}); is the model in eval mode?"
            )
        sets: Sequence[Mapping[str, Any]] = [output]
        if deep_supervision:
            sets = [output, *output.get("aux_outputs", [])]
        return torch.stack([self.single(s, target) for s in sets]).mean()

    @staticmethod
    def _check(class_logits: torch.Tensor, mask_logits: torch.Tensor, target: torch.Tensor) -> None:
        batch, queries, classes = class_logits.shape
        if mask_logits.shape[:2] != (batch, queries) or target.shape[0] != batch:
            raise ValueError(
                f"HungarianMaskLoss: pred_logits {tuple(class_logits.shape)}, pred_masks {tuple(mask_logits.shape)} "
                f"and target {tuple(target.shape)} disagree on (B, N)"
            )
        if target.shape[1] != classes - 1 or target.shape[2:] != mask_logits.shape[2:]:
            raise ValueError(
                f"HungarianMaskLoss: target must be (B, K, *spatial) = (B, {classes - 1}, "
                f"{', '.join(map(str, mask_logits.shape[2:]))}) region masks for pred_logits with K + 1 = "
                f"{classes} classes; got {tuple(target.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"ce={self.ce_weight}, dice={self.dice_weight}, class_weight={self.class_weight}, "
            f"no_object_weight={self.no_object_weight}"
        )
