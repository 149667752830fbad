"""dice_loss and dice_bce_loss on 2x2 masks with values worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from fewshot_proto.losses import DiceBCELoss, DiceLoss, dice_bce_loss, dice_loss

FG_PROB = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
PROBS = torch.stack([1 - FG_PROB, FG_PROB])[None]  # [1, 2, 2, 2] background, foreground
TARGET = torch.tensor([[[1, 0], [0, 0]]])  # [1, 2, 2] one foreground pixel


def test_probabilities_without_activation():
    # foreground: intersection 1, |p| 2, |g| 1 -> dice 2/3 -> loss 1/3
    fg = dice_loss(PROBS, TARGET, softmax=False)
    assert fg.item() == pytest.approx(1.0 / 3.0, abs=1e-5)
    # background: intersection 2, |p| 2, |g| 3 -> dice 4/5 -> loss 1/5; mean over channels 4/15
    both = dice_loss(PROBS, TARGET, softmax=False, include_background=True)
    assert both.item() == pytest.approx(4.0 / 15.0, abs=1e-5)
    per = dice_loss(PROBS, TARGET, softmax=False, include_background=True, reduction="none")
    assert per.shape == (1, 2)
    torch.testing.assert_close(per[0], torch.tensor([0.2, 1.0 / 3.0]), atol=1e-5, rtol=0)


def test_softmax_activation():
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3.0)  # p_fg = 3/4 everywhere
    # intersection 0.75, |p| 3, |g| 1 -> dice 1.5/4 -> loss 0.625
    assert dice_loss(logits, TARGET).item() == pytest.approx(0.625, abs=1e-5)
    # a one-hot [N,K,H,W] target gives the same
    onehot = torch.stack([1 - TARGET, TARGET], dim=1).float()
    assert dice_loss(logits, onehot).item() == pytest.approx(0.625, abs=1e-5)
    assert DiceLoss()(logits, TARGET).item() == pytest.approx(0.625, abs=1e-5)


def test_sigmoid_single_channel_and_smoothing():
    logits = torch.zeros(1, 1, 2, 2)  # p = 1/2 everywhere: intersection 0.5, |p| 2, |g| 1 -> loss 2/3
    assert dice_loss(logits, TARGET, softmax=False, sigmoid=True).item() == pytest.approx(2.0 / 3.0, abs=1e-5)
    # empty prediction on empty ground truth: (0 + s) / (0 + s) -> loss 0, no NaN
    empty = dice_loss(torch.full((1, 1, 2, 2), -1e4), torch.zeros(1, 2, 2), softmax=False, sigmoid=True)
    assert empty.item() == pytest.approx(0.0, abs=1e-6)
    # empty ground truth with a non-empty prediction -> loss ~1
    bad = dice_loss(torch.full((1, 1, 2, 2), 1e4), torch.zeros(1, 2, 2), softmax=False, sigmoid=True)
    assert bad.item() == pytest.approx(1.0, abs=1e-5)


def test_dice_bce_by_hand():
    logits = torch.zeros(1, 1, 2, 2)
    t = TARGET.float()
    expected = 0.8 * (2.0 / 3.0) + 0.2 * math.log(2.0)
    assert dice_bce_loss(logits, t).item() == pytest.approx(expected, abs=1e-5)
    assert dice_bce_loss(logits[:, 0], t).item() == pytest.approx(expected, abs=1e-5)  # [N,H,W] logits
    # pos_weight 3: BCE = (3 ln2 + 3 * ln2) / 4 = 1.5 ln2
    expected_pw = 0.8 * (2.0 / 3.0) + 0.2 * 1.5 * math.log(2.0)
    assert dice_bce_loss(logits, t, pos_weight=3.0).item() == pytest.approx(expected_pw, abs=1e-5)
    assert DiceBCELoss(pos_weight=3.0)(logits, t).item() == pytest.approx(expected_pw, abs=1e-5)
    assert dice_bce_loss(logits, t, dice_weight=0.0, bce_weight=1.0).item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_gradient_flows():
    logits = torch.zeros(2, 2, 4, 4, requires_grad=True)
    target = torch.zeros(2, 4, 4, dtype=torch.long)
    target[:, 1:3, 1:3] = 1
    dice_loss(logits, target).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "logits,target,kwargs,match",
    [
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 3, 3, dtype=torch.long), {}, "matches neither"),
        (torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 3, 3), {}, "matches neither"),
        (torch.zeros(1, 2, 2, 2), TARGET, {"sigmoid": True}, "mutually exclusive"),
        (torch.zeros(1, 1, 2, 2), TARGET, {}, "single channel"),
        (torch.zeros(1, 2, 2, 2), TARGET + 2, {}, r"in \[0, 2\)"),
        (torch.zeros(1, 2, 2, 2), TARGET, {"reduction": "avg"}, "reduction"),
    ],
)
def test_invalid_inputs(logits, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dice_loss(logits, target, **kwargs)


def test_dice_bce_shape_mismatch():
    with pytest.raises(ValueError, match="does not match"):
        dice_bce_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        dice_bce_loss(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2))
