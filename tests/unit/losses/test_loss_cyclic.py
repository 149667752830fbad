"""Cyclic consistency: the reversed episode's wiring (stub model) and gradients (real CWPAUNet)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot_proto.losses import CyclicConsistencyLoss, cyclic_consistency_loss, dice_loss
from fewshot_proto.models.base import FewShotSegmenter


class StubModel(FewShotSegmenter):
    """encode(x) -> [x]; prototypes = masked mean of channel 0; segment -> logits (0, proto * x[:, :1])."""

    def __init__(self):
        super().__init__()
        self.encode_calls = 0
        self.seen = {}

    def encode(self, x):
        self.encode_calls += 1
        return [x]

    def prototypes(self, feats, mask):
        self.seen["proto_feats"], self.seen["proto_mask"] = feats, mask
        return (feats[-1][:, 0] * mask).sum() / mask.sum()

    def segment(self, feats, protos):
        self.seen["segment_feats"] = feats
        x = feats[-1][:, :1]
        return torch.cat([torch.zeros_like(x), protos * x], dim=1)


def _data():
    s_img = torch.ones(1, 3, 2, 2)
    s_mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    q_img = torch.full((1, 3, 2, 2), 2.0)
    q_logits = torch.zeros(1, 2, 2, 2, requires_grad=True)  # soft foreground 1/2 everywhere
    return s_img, s_mask, q_img, q_logits


def test_reversed_roles_and_value_by_hand():
    m = StubModel()
    s_img, s_mask, q_img, q_logits = _data()
    loss = cyclic_consistency_loss(m, s_img, s_mask, q_img, q_logits)
    assert m.encode_calls == 1  # one batched pass over support + query
    torch.testing.assert_close(m.seen["proto_mask"], torch.full((1, 2, 2), 0.5))  # the soft query mask
    assert torch.equal(m.seen["proto_feats"][0], q_img)  # prototypes from the query
    assert torch.equal(m.seen["segment_feats"][0], s_img)  # ... segment the support
    # prototype = mean of query channel 0 = 2; support logits (0, 2) everywhere; target: one fg pixel of four
    ce_fg, ce_bg = math.log1p(math.exp(-2.0)), math.log1p(math.exp(2.0))
    assert loss.item() == pytest.approx((ce_fg + 3 * ce_bg) / 4, rel=1e-6)


def test_reuses_given_features_and_adds_dice():
    m = StubModel()
    s_img, s_mask, q_img, q_logits = _data()
    loss = cyclic_consistency_loss(m, s_img, s_mask, q_img, q_logits, query_feats=[q_img], support_feats=[s_img],
                                   dice_weight=0.5)
    assert m.encode_calls == 0
    rec = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 2.0)], dim=1)
    target = s_mask.long()
    expected = F.cross_entropy(rec, target) + 0.5 * dice_loss(rec, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    mod = CyclicConsistencyLoss(dice_weight=0.5)
    assert mod(m, s_img, s_mask, q_img, q_logits, query_feats=[q_img], support_feats=[s_img]).item() == pytest.approx(
        expected.item(), rel=1e-6
    )


def test_gradient_reaches_query_logits_unless_detached():
    s_img, s_mask, q_img, q_logits = _data()
    q_img = q_img.clone()
    q_img[0, 0, 0, 0] = 5.0  # make the prototype depend on the mask weights
    cyclic_consistency_loss(StubModel(), s_img, s_mask, q_img, q_logits).backward()
    assert q_logits.grad is not None and q_logits.grad.abs().sum() > 0
    q2 = q_logits.detach().clone().requires_grad_(True)
    loss = cyclic_consistency_loss(StubModel(), s_img, s_mask, q_img, q2, detach_query_mask=True)
    assert not loss.requires_grad


def test_real_model_gradient_reaches_parameters_and_is_finite():
    from fewshot_proto.models import build_model

    torch.manual_seed(0)
    model = build_model("cwpa_unet").train()
    assert model.feature_losses is True
    s_img = torch.randn(1, 3, 64, 64)
    s_mask = torch.zeros(1, 64, 64)
    s_mask[0, 16:40, 20:44] = 1
    q_img = torch.randn(1, 3, 64, 64)
    out = model(s_img, s_mask, q_img)
    loss = cyclic_consistency_loss(model, s_img, s_mask, q_img, out.logits,
                                   query_feats=out.query_feats, support_feats=out.support_feats)
    assert torch.isfinite(loss)
    # the pyramids of SegOutput are what the loss would compute itself (one batched pass over support + query)
    assert len(out.query_feats) == len(out.support_feats) > 1
    torch.testing.assert_close(cyclic_consistency_loss(model, s_img, s_mask, q_img, out.logits), loss)
    loss.backward()
    assert model.encoder.conv1.weight.grad.abs().sum() > 0
    assert model.decoder.head.weight.grad.abs().sum() > 0


def test_shape_errors():
    s_img, s_mask, q_img, q_logits = _data()
    with pytest.raises(ValueError, match="query_logits"):
        cyclic_consistency_loss(StubModel(), s_img, s_mask, q_img, q_logits[:, :1])
    with pytest.raises(ValueError, match="support_mask"):
        cyclic_consistency_loss(StubModel(), s_img, s_mask[0], q_img, q_logits)
