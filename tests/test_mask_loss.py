"""The Hungarian-matched mask loss of ``transunet_dec`` (bratstune.training.mask_loss) on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch

from bratstune.errors import ConfigError
from bratstune.training.config import LossConfig
from bratstune.training.fit import compute_loss
from bratstune.training.mask_loss import HungarianMaskLoss

LN2, LN3 = math.log(2.0), math.log(3.0)


def _two_queries() -> tuple[dict, torch.Tensor]:
    """1 sample, 2 regions (only region 0 present), 2 voxels, 2 queries.

    query 0: class logits (0, 0, 0) -> probabilities 1/3 each; mask logits (0, 0) -> sigmoid (.5, .5)
    query 1: class logits (ln 2, 0, 0) -> (1/2, 1/4, 1/4);  mask logits (ln 3, -ln 3) -> (.75, .25)
    target: region 0 = voxel 0 only; region 1 empty (not a ground-truth mask).
    """
    output = {
        "pred_logits": torch.tensor([[[0.0, 0.0, 0.0], [LN2, 0.0, 0.0]]]),
        "pred_masks": torch.tensor([[[0.0, 0.0], [LN3, -LN3]]]),
    }
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    return output, target


def test_two_query_case_equals_the_hand_computed_value():
    output, target = _two_queries()
    loss_fn = HungarianMaskLoss({"ce": 0.7, "dice": 0.3}, class_weight=0.2, no_object_weight=0.1, smooth=1.0)
    # costs for the region-0 mask (class 0):
    #   query 0: -0.2 / 3 + 0.7 ln 2 + 0.3 (1 - (2 * .5 + 1) / (1 + 1 + 1)) = -0.0667 + 0.4852 + 0.1
    #   query 1: -0.2 / 2 + 0.7 ln(4/3) + 0.3 (1 - (2 * .75 + 1) / (1 + 1 + 1)) = -0.1 + 0.2014 + 0.05
    # -> query 1 is matched; query 0 is "no object" (class 2)
    terms = loss_fn.compute_terms(output, target)
    ((queries, regions),) = terms["matches"]
    assert queries.tolist() == [1] and regions.tolist() == [0]
    cls = (LN2 + 0.1 * LN3) / (1 + 0.1)  # CE of query 1 vs class 0 (-ln 1/2) and query 0 vs no object (-ln 1/3)
    bce = math.log(4 / 3)  # mean over voxels of -ln .75 (voxel 0, target 1) and -ln .75 (voxel 1, target 0)
    dice = 1 - 2.5 / 3
    assert terms["cls"].item() == pytest.approx(cls, rel=1e-6)
    assert terms["ce"].item() == pytest.approx(bce, rel=1e-6)
    assert terms["dice"].item() == pytest.approx(dice, rel=1e-6)
    expected = 0.2 * cls + 0.7 * bce + 0.3 * dice
    assert loss_fn(output, target).item() == pytest.approx(expected, rel=1e-6)
    assert loss_fn(output, target).item() == pytest.approx(0.39738, abs=1e-5)


def test_the_loss_does_not_depend_on_the_order_of_the_queries():
    output, target = _two_queries()
    swapped = {k: v.flip(1) for k, v in output.items()}
    loss_fn = HungarianMaskLoss({"ce": 0.7, "dice": 0.3})
    assert loss_fn(swapped, target).item() == pytest.approx(loss_fn(output, target).item(), rel=1e-6)
    ((queries, _),) = loss_fn.compute_terms(swapped, target)["matches"]
    assert queries.tolist() == [0]  # the same query, now first


def test_an_empty_target_only_teaches_no_object():
    output, target = _two_queries()
    loss_fn = HungarianMaskLoss({"ce": 0.7, "dice": 0.3})
    terms = loss_fn.compute_terms(output, torch.zeros_like(target))
    assert terms["ce"].item() == 0.0 and terms["dice"].item() == 0.0
    assert terms["cls"].item() == pytest.approx((LN3 + math.log(4.0)) / 2, rel=1e-6)  # both queries vs class 2
    masks = output["pred_masks"].clone().requires_grad_(True)
    loss_fn({**output, "pred_masks": masks}, torch.zeros_like(target)).backward()
    assert masks.grad is not None and not masks.grad.any()


def test_deep_supervision_averages_the_query_sets():
    output, target = _two_queries()
    aux = {"pred_logits": torch.zeros(1, 2, 3), "pred_masks": torch.zeros(1, 2, 2)}
    loss_fn = HungarianMaskLoss({"ce": 0.7, "dice": 0.3})
    main, extra = loss_fn.single(output, target), loss_fn.single(aux, target)
    full = {**output, "aux_outputs": [aux]}
    assert loss_fn(full, target).item() == pytest.approx((main.item() + extra.item()) / 2, rel=1e-6)
    assert loss_fn(full, target, deep_supervision=False).item() == pytest.approx(main.item(), rel=1e-6)
    # fit's compute_loss hands the whole query set to the Hungarian loss
    assert compute_loss(loss_fn, full, target, deep_supervision=True).item() == pytest.approx(
        loss_fn(full, target).item()
    )


@pytest.mark.parametrize(
    ("weights", "mode", "match"),
    [
        ({"focal_tversky": 1.0, "ce": 1.0}, "region", r"terms \['ce', 'dice'\]; got \['focal_tversky'\]"),
        ({"ce": 0.7, "dice": 0.3}, "label", "set loss.mode: region"),
    ],
)
def test_config_errors(weights, mode, match):
    with pytest.raises(ConfigError, match=match):
        HungarianMaskLoss.from_config(LossConfig(weights=weights, mode=mode))


def test_bad_shapes_name_the_expected_shape():
    output, target = _two_queries()
    with pytest.raises(ValueError, match=r"target must be \(B, K, \*spatial\) = \(B, 2, 2\)"):
        HungarianMaskLoss()(output, target[:, :1])
    with pytest.raises(ValueError, match="is the model in eval mode"):
        HungarianMaskLoss()(torch.zeros(1, 2, 2), target)
