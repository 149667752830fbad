"""PANet prototype alignment on hand-made features where the answer is known."""
from __future__ import annotations

import math

import pytest
import torch

from fewshot_proto.losses import AlignmentLoss, alignment_loss

FG, BG, BOTH = [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]
SOFTPLUS_M20 = math.log1p(math.exp(-20.0))  # CE of logits (0, 20) for the right class


def _feat(cells):
    """2x2 grid of D=2 vectors given row-major -> [1, 2, 2, 2]."""
    return torch.tensor(cells).reshape(2, 2, 2).permute(2, 0, 1)[None].contiguous()


def _pred_logits(fg_cells):
    """[1, 2, 2, 2] logits whose argmax is foreground exactly on fg_cells (row-major 0/1)."""
    fg = torch.tensor(fg_cells, dtype=torch.float32).reshape(1, 2, 2)
    return torch.stack([1 - fg, fg], dim=1) * 5.0


QUERY = _feat([FG, BG, BG, FG])
QUERY_PRED = _pred_logits([1, 0, 0, 1])


def test_perfect_alignment_costs_almost_nothing():
    support = _feat([BG, FG, FG, BG])
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    # every support cell has cosine 1 with the right prototype and 0 with the other: logits (0, 20) or (20, 0)
    assert alignment_loss(QUERY, QUERY_PRED, support, mask).item() == pytest.approx(SOFTPLUS_M20, abs=1e-7)


def test_inverted_support_mask_costs_the_scaler():
    support = _feat([BG, FG, FG, BG])
    mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert alignment_loss(QUERY, QUERY_PRED, support, mask).item() == pytest.approx(20.0 + SOFTPLUS_M20, rel=1e-5)
    assert alignment_loss(QUERY, QUERY_PRED, support, mask, scaler=10.0).item() == pytest.approx(
        10.0 + math.log1p(math.exp(-10.0)), rel=1e-5
    )


def test_ambiguous_cell_costs_log2():
    # three cells right, one cell equally similar to both prototypes
    support = _feat([FG, FG, BG, BOTH])
    mask = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])
    expected = (3 * SOFTPLUS_M20 + math.log(2.0)) / 4
    assert alignment_loss(QUERY, QUERY_PRED, support, mask).item() == pytest.approx(expected, rel=1e-5)
    assert AlignmentLoss()(QUERY, QUERY_PRED, support, mask).item() == pytest.approx(expected, rel=1e-5)


def test_kshot_is_mean_over_shots():
    good, bad = _feat([BG, FG, FG, BG]), _feat([FG, BG, BG, FG])
    mask = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    both = alignment_loss(QUERY, QUERY_PRED, torch.cat([good, bad]), torch.stack([mask, mask]))
    assert both.item() == pytest.approx((SOFTPLUS_M20 + 20.0 + SOFTPLUS_M20) / 2, rel=1e-5)


def test_empty_predicted_foreground_is_skipped():
    out = alignment_loss(QUERY, _pred_logits([0, 0, 0, 0]), QUERY, torch.ones(1, 2, 2))
    assert out.item() == 0.0 and not out.requires_grad


def test_empty_support_mask_and_upsampling_are_finite_with_gradients():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 4, 4, requires_grad=True)
    s = torch.randn(3, 8, 4, 4, requires_grad=True)
    logits = torch.randn(2, 2, 32, 32, requires_grad=True)
    for mask in (torch.zeros(3, 32, 32), (torch.rand(3, 32, 32) > 0.7).float()):
        loss = alignment_loss(q, logits, s, mask)
        assert torch.isfinite(loss)
        q.grad = s.grad = None
        loss.backward()
        assert q.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
        assert logits.grad is None  # the prediction is used through a detached argmax only


def test_shape_errors():
    with pytest.raises(ValueError, match="support_mask"):
        alignment_loss(QUERY, QUERY_PRED, QUERY, torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="query_pred_logits"):
        alignment_loss(QUERY, QUERY_PRED[0], QUERY, torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        alignment_loss(QUERY, QUERY_PRED, torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
