"""Hand-computed tables for every loss term, plus argument and shape validation.

The shared tiny example (1 x 1 x 2 x 2 x 1), voxels listed as (x, y):

    logits  z = [[ln 3, ln 3], [0, -ln 3]]   ->  p = sigmoid(z) = [[0.75, 0.75], [0.5, 0.25]]
    target  t = [[1,    0   ], [1,  0    ]]

    TP = 0.75 + 0.5 = 1.25        FP = 0.75 + 0.25 = 1.0        FN = 0.25 + 0.5 = 0.75
    sum p = 2.25, sum t = 2
"""

from __future__ import annotations

import math

import pytest
import torch

from bratstune.errors import ConfigError
from bratstune.training.losses import (
    TERMS,
    CompoundLoss,
    EdgeLoss,
    FocalTverskyLoss,
    deep_supervision_loss,
    deep_supervision_weights,
    downsample_target,
)

torch.set_num_threads(1)

LN3 = math.log(3.0)
LOGITS = torch.tensor([[LN3, LN3], [0.0, -LN3]]).view(1, 1, 2, 2, 1)
PROBS = torch.sigmoid(LOGITS)
TARGET = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2, 1)
# label mode: background logit 0, tumour logit z -> softmax p(tumour) = sigmoid(z), same numbers
LABEL_LOGITS = torch.cat([torch.zeros_like(LOGITS), LOGITS], dim=1)
LABELS = TARGET.long()

# per-voxel BCE -log(p_t), p_t = (0.75, 0.25, 0.5, 0.75):  0.287682, 1.386294, 0.693147, 0.287682
HAND = {
    # 1 - 2 TP / (sum p + sum t) = 1 - 2.5 / 4.25
    "dice": 1 - 2.5 / 4.25,  # 0.411765
    # mean of (1 - p_t)^2 * -log p_t = (0.0625*0.287682 + 0.5625*1.386294 + 0.25*0.693147 + 0.0625*0.287682) / 4
    "focal": (0.0625 * -math.log(0.75) * 2 + 0.5625 * -math.log(0.25) + 0.25 * math.log(2)) / 4,  # 0.247259
    # TI = 1.25 / (1.25 + 0.3*1.0 + 0.7*0.75) = 1.25 / 2.075 = 0.602410; (1 - TI)^2 = 0.397590^2
    "focal_tversky": (1 - 1.25 / 2.075) ** 2,  # 0.158078
    # mean BCE = (0.287682 + 1.386294 + 0.693147 + 0.287682) / 4
    "ce": (2 * -math.log(0.75) + -math.log(0.25) + math.log(2)) / 4,  # 0.663701
    # mean (p - t)^2 = (0.25^2 + 0.75^2 + 0.5^2 + 0.25^2) / 4 = 0.9375 / 4
    "mse": 0.234375,
    # forward differences, 0 at the last index:
    #   p: g_x(0, y) = (0.5 - 0.75, 0.25 - 0.75) = (-0.25, -0.5); g_y(x, 0) = (0, -0.25)
    #      G = [[0.25, 0.5], [0.25, 0]] -> / max 0.5 -> [[0.5, 1], [0.5, 0]]
    #   t: g_x = 0; g_y(x, 0) = (-1, -1) -> G = [[1, 0], [1, 0]] (max 1)
    #   MSE = ((0.5 - 1)^2 + (1 - 0)^2 + (0.5 - 1)^2 + 0) / 4 = 1.5 / 4
    "edge": 0.375,
}


@pytest.mark.parametrize("term", TERMS)
def test_region_mode_terms_by_hand(term):
    loss = CompoundLoss({term: 1.0}, mode="region")
    assert loss(LOGITS, TARGET).item() == pytest.approx(HAND[term], abs=1e-5)


@pytest.mark.parametrize("term", TERMS)
def test_label_mode_terms_by_hand_without_background(term):
    # two-class softmax with logits (0, z) is the sigmoid of z: same numbers as region mode
    loss = CompoundLoss({term: 1.0}, mode="label")
    assert loss(LABEL_LOGITS, LABELS).item() == pytest.approx(HAND[term], abs=1e-5)
    assert loss(LABEL_LOGITS, LABELS[:, 0]).item() == pytest.approx(HAND[term], abs=1e-5)  # (B, *spatial)


@pytest.mark.parametrize(
    ("term", "expected"),
    [
        # background channel: p0 = (0.25, 0.25, 0.5, 0.75), t0 = (0, 1, 0, 1)
        # dice_0 = 1 - 2 * 1.0 / (1.75 + 2) = 0.466667; mean with 0.411765
        ("dice", (1 - 2.5 / 4.25 + 1 - 2.0 / 3.75) / 2),  # 0.439216
        # TP0 = 1.0, FP0 = 0.75, FN0 = 1.0: TI0 = 1 / (1 + 0.225 + 0.7) = 0.519481
        ("focal_tversky", ((1 - 1.25 / 2.075) ** 2 + (1 - 1 / 1.925) ** 2) / 2),  # 0.194487
        ("ce", HAND["ce"]),  # CE always uses every channel
    ],
)
def test_label_mode_with_background(term, expected):
    loss = CompoundLoss({term: 1.0}, mode="label", include_background=True)
    assert loss(LABEL_LOGITS, LABELS).item() == pytest.approx(expected, abs=1e-5)


def test_compound_is_the_weighted_sum_and_terms_are_reported():
    loss = CompoundLoss({"dice": 1.0, "ce": 0.5, "edge": 0.0})
    assert set(loss.terms) == {"dice", "ce"}  # zero weight: never constructed
    parts = loss.compute_terms(LOGITS, TARGET)
    assert set(parts) == {"dice", "ce"}
    assert loss(LOGITS, TARGET).item() == pytest.approx(HAND["dice"] + 0.5 * HAND["ce"], abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # alpha weights FP (1.0), beta FN (0.75): swapping them raises the loss here
        ({"alpha": 0.7, "beta": 0.3}, (1 - 1.25 / (1.25 + 0.7 + 0.225)) ** 2),  # 0.180868
        # gamma = 1: plain Tversky
        ({"gamma": 1.0}, 1 - 1.25 / 2.075),  # 0.397590
        # alpha = beta = 0.5, gamma = 1: soft Dice = 1 - 1.25 / (1.25 + 0.875)
        ({"alpha": 0.5, "beta": 0.5, "gamma": 1.0}, HAND["dice"]),
    ],
)
def test_focal_tversky_table(kwargs, expected):
    assert FocalTverskyLoss(**kwargs)(PROBS, TARGET).item() == pytest.approx(expected, abs=1e-5)


def test_focal_tversky_batch_pooling():
    # sample 1: the example; sample 2: empty target predicted empty (TI = s / s = 1, loss 0)
    probs = torch.cat([PROBS, torch.zeros_like(PROBS)])
    target = torch.cat([TARGET, torch.zeros_like(TARGET)])
    per_sample = FocalTverskyLoss(batch=False)(probs, target).item()
    assert per_sample == pytest.approx(HAND["focal_tversky"] / 2, abs=1e-5)  # mean of (0.158078, 0)
    pooled = FocalTverskyLoss(batch=True)(probs, target).item()
    assert pooled == pytest.approx(HAND["focal_tversky"], abs=1e-5)  # the empty sample adds no counts


def test_tversky_half_half_matches_monai_dice():
    from monai.losses import DiceLoss

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 3, 6, 5, 4, generator=gen)
    target = (torch.rand(2, 3, 6, 5, 4, generator=gen) > 0.6).float()
    ours = FocalTverskyLoss(alpha=0.5, beta=0.5, gamma=1.0, batch=False)(probs, target)
    assert ours.item() == pytest.approx(DiceLoss()(probs, target).item(), abs=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
    for mode, x, t in (("region", LOGITS, TARGET), ("label", LABEL_LOGITS, LABELS)):
        focal = CompoundLoss({"focal": 1.0}, mode=mode, focal_gamma=0.0)(x, t)
        assert focal.item() == pytest.approx(HAND["ce"], abs=1e-5)


def test_edge_loss_perfect_and_flat():
    assert EdgeLoss()(TARGET, TARGET).item() == pytest.approx(0.0, abs=1e-10)
    flat = torch.full((1, 1, 3, 3, 3), 0.5, requires_grad=True)
    loss = EdgeLoss()(flat, torch.zeros(1, 1, 3, 3, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(flat.grad).all()


def test_gradients_are_finite_for_every_term_and_half_precision_input():
    x = LOGITS.clone().to(torch.bfloat16).requires_grad_(True)
    loss = CompoundLoss({t: 1.0 for t in TERMS})(x, TARGET)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(x.grad.float()).all()


# ---------------------------------------------------------------- deep supervision


def test_deep_supervision_weights():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_deep_supervision_stacked_outputs():
    # each head's "loss" is the mean of its output: heads 1, 2, 4 -> (4*1 + 2*2 + 1*4) / 7 = 12/7
    outputs = torch.stack([torch.full((1, 1, 2, 2, 1), v) for v in (1.0, 2.0, 4.0)], dim=1)
    loss = deep_supervision_loss(lambda o, t: o.mean(), outputs, TARGET)
    assert loss.item() == pytest.approx(12 / 7)
    assert deep_supervision_loss(lambda o, t: o.mean(), outputs, TARGET, [1, 0, 1]).item() == pytest.approx(2.5)


def test_deep_supervision_list_downsamples_target():
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, 1, 2, 3] = 1  # one voxel: survives max pooling to 2^3 at (0, 1, 1)
    seen = []
    outputs = [torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 2, 2, 2)]
    deep_supervision_loss(lambda o, t: seen.append(t) or o.sum(), outputs, target)
    assert seen[0] is target
    expected = torch.zeros(1, 1, 2, 2, 2)
    expected[0, 0, 0, 1, 1] = 1
    assert torch.equal(seen[1], expected)


def test_deep_supervision_with_compound_loss_in_label_mode_uses_nearest():
    loss_fn = CompoundLoss({"ce": 1.0}, mode="label")
    labels = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outputs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    value = deep_supervision_loss(loss_fn, outputs, labels)
    small = downsample_target(labels, (4, 4, 4), mode="nearest")
    assert small.dtype == labels.dtype and set(small.unique().tolist()) <= {0, 1, 2}
    expected = (2 * loss_fn(outputs[0], labels) + loss_fn(outputs[1], small)) / 3
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("outputs", "weights", "match"),
    [
        (torch.zeros(1, 2, 1, 2, 2, 1), [1.0], "1 weights for 2 outputs"),
        (torch.zeros(1, 2, 1, 2, 2, 1), [0.0, 0.0], "all zero"),
        (torch.zeros(1, 2, 1, 2, 2, 1), [1.0, -1.0], "must be >= 0"),
        ([torch.zeros(1, 1, 4, 4, 2)], None, "larger than the target"),
        (torch.zeros(2, 2), None, "must be \\(B, S, C, \\*spatial\\)"),
    ],
)
def test_deep_supervision_bad_arguments(outputs, weights, match):
    with pytest.raises(ValueError, match=match):
        deep_supervision_loss(lambda o, t: o.sum(), outputs, TARGET, weights)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("weights", "kwargs", "match"),
    [
        ({"dice": -1.0}, {}, "loss.weights.dice must be >= 0, got -1.0"),
        ({"dice": 0.0, "ce": 0}, {}, "all loss weights are zero"),
        ({}, {}, "all loss weights are zero"),
        ({"focal_tverski": 1.0}, {}, "unknown loss term 'focal_tverski' \\(did you mean 'focal_tversky'\\?\\)"),
        ({"tversky": 1.0}, {}, "did you mean 'focal_tversky'"),
        ({"dice": "1"}, {}, "loss.weights.dice must be a number, got '1'"),
        ({"dice": float("nan")}, {}, "must be finite"),
        ([("dice", 1.0)], {}, "must be a mapping"),
        ({"dice": 1.0}, {"alpha": 0.0, "beta": 0.0}, "alpha \\+ beta must be > 0"),
        ({"dice": 1.0}, {"alpha": -0.1}, "alpha .* must be >= 0, got -0.1"),
        ({"dice": 1.0}, {"gamma": 0.0}, "gamma .* must be > 0, got 0.0"),
        ({"dice": 1.0}, {"gamma": -1.0}, "gamma .* must be > 0"),
        ({"dice": 1.0}, {"focal_gamma": -2.0}, "focal_gamma must be >= 0"),
        ({"dice": 1.0}, {"smooth": -1e-5}, "smooth must be >= 0"),
        ({"dice": 1.0}, {"mode": "regions"}, "unknown loss mode 'regions' \\(did you mean 'region'\\?\\)"),
    ],
)
def test_bad_arguments(weights, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CompoundLoss(weights, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"alpha": 0.0, "beta": 0.0}, "alpha \\+ beta"), ({"gamma": 0}, "gamma"), ({"smooth": -1}, "smooth")],
)
def test_focal_tversky_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        FocalTverskyLoss(**kwargs)


@pytest.mark.parametrize(
    ("mode", "input", "target", "match"),
    [
        (
            "region",
            torch.zeros(1, 3, 4, 4, 4),
            torch.zeros(1, 1, 4, 4, 4),
            "target shape \\(1, 1, 4, 4, 4\\) must equal input shape \\(1, 3, 4, 4, 4\\).*mode='label'",
        ),
        ("region", torch.zeros(3, 4), torch.zeros(3, 4), "logits \\(B, C, \\*spatial\\)"),
        (
            "label",
            torch.zeros(1, 3, 4, 4, 4),
            torch.zeros(1, 3, 4, 4, 4),
            "integer labels of shape \\(1, 1, 4, 4, 4\\).*got \\(1, 3, 4, 4, 4\\)",
        ),
        ("label", torch.zeros(1, 3, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 3), "must lie in \\[0, 2\\].*\\[3, 3\\]"),
        ("label", torch.zeros(1, 3, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 0.5), "fractional"),
        ("label", torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4), "at least 2 channels"),
        ("region", torch.zeros(1, 2, 3, 4, 4, 4), torch.zeros(1, 3, 4, 4, 4), "deep_supervision_loss"),
    ],
)
def test_shape_mismatch_messages(mode, input, target, match):
    with pytest.raises(ValueError, match=match):
        CompoundLoss({"dice": 1.0, "ce": 1.0}, mode=mode)(input, target)


@pytest.mark.parametrize("cls", [FocalTverskyLoss, EdgeLoss])
def test_term_shape_mismatch(cls):
    with pytest.raises(ValueError, match="must equal input shape"):
        cls()(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))
