"""The engine's episodic loss (``engine.episodic.episode_losses``): which terms it computes and how it sums them."""
import math

import pytest
import torch
from torch import nn

from fewshot_proto.engine.episodic import episode_losses
from fewshot_proto.types import SegOutput


class _FixedLogits(nn.Module):
    """A 'model' that returns the logits it was given (no features, no prototypes: CE and Dice only)."""

    kind = "fewshot"

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, support_img, support_mask, query_img) -> SegOutput:
        return SegOutput(logits=self.logits)


def _inputs():
    s_img = torch.zeros(1, 1, 2, 2)
    s_mask = torch.zeros(1, 2, 2)
    q_img = torch.zeros(1, 1, 2, 2)
    q_mask = torch.tensor([[[1, 0], [0, 0]]])
    return s_img, s_mask, q_img, q_mask


def test_dice_term_is_absent_unless_weighted():
    model = _FixedLogits(torch.zeros(1, 2, 2, 2))
    terms = episode_losses(model, *_inputs(), lambda_align=1.0, lambda_cyc=1.0)
    assert set(terms) == {"ce", "loss"}


def test_dice_term_value_and_weight_by_hand():
    # zero logits: p(fg) = 0.5 at all 4 pixels, one foreground pixel.
    # Dice of the foreground = 2 * 0.5 / (4 * 0.5 + 1) = 1/3, so the loss is 2/3; CE = log 2 (unweighted).
    model = _FixedLogits(torch.zeros(1, 2, 2, 2))
    terms = episode_losses(model, *_inputs(), lambda_align=0.0, lambda_cyc=0.0, ce_weights=None, lambda_dice=0.5)
    assert terms["dice"].item() == pytest.approx(2 / 3, abs=1e-5)
    assert terms["ce"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert terms["loss"].item() == pytest.approx(math.log(2) + 0.5 * 2 / 3, abs=1e-5)


def test_dice_term_pushes_false_positives_down():
    # the gradient of the Dice term lowers the foreground score where the truth is background
    model = _FixedLogits(torch.zeros(1, 2, 2, 2))
    terms = episode_losses(model, *_inputs(), lambda_align=0.0, lambda_cyc=0.0, ce_weights=None, lambda_dice=1.0)
    terms["dice"].backward()
    g = model.logits.grad[0, 1]  # d loss / d foreground logit
    assert g[0, 0] < 0  # the true foreground pixel: raise its score
    assert (g.flatten()[1:] > 0).all()  # background pixels: lower theirs
