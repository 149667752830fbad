"""The prototype operations of ``fewshot_proto.models.heads`` with known answers: masked average pooling and the
bilinear adjoint (``pooling``), the prototype bundle and cosine scores (``scores``) and the matcher head of
``cwpa_unet_matcher`` (``matcher``). CWPA is tested in ``test_prototype.py``; PANet's and ALPNet's prototype bags
(``alp``) with their models in ``test_fewshot_baselines.py``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot_proto.models.heads import (SCALER, ClassPrototypes, MatcherHead, alpnet_prototypes, bilinear_adjoint,
                                        class_score, class_scores, cosine_logits, masked_average_pool)
from fewshot_proto.models.heads.scores import safe_normalize


def _naive_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    up = F.interpolate(feat, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return (up * mask[:, None]).sum(dim=(0, 2, 3)) / (mask.sum() + eps)


# ---- pooling ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("h,H", [(4, 16), (3, 7), (5, 5)])
def test_masked_average_pool_equals_upsample_then_pool(h, H):
    torch.manual_seed(0)
    feat = torch.randn(2, 6, h, h + 1)
    mask = torch.rand(2, H, H + 2)
    torch.testing.assert_close(masked_average_pool(feat, mask), _naive_pool(feat, mask), rtol=1e-5, atol=1e-6)
    per = masked_average_pool(feat, mask, pool_batch=False)
    torch.testing.assert_close(per[1], _naive_pool(feat[1:], mask[1:]), rtol=1e-5, atol=1e-6)
    assert bilinear_adjoint(mask, (h, h + 1)).shape == (2, h, h + 1)


@pytest.mark.parametrize("h,H", [(4, 16), (3, 7)])
def test_bilinear_adjoint_is_the_adjoint_of_upsampling(h, H):
    """``<upsample(f), m> == <f, A(m)>`` for every feature map and mask (the identity the pooling relies on)."""
    torch.manual_seed(1)
    feat = torch.randn(3, 5, h, h + 2)
    mask = torch.rand(3, H, H + 1)
    up = F.interpolate(feat, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    lhs = torch.einsum("ndyx,nyx->nd", up, mask)
    rhs = torch.einsum("ndij,nij->nd", feat, bilinear_adjoint(mask, (h, h + 2)))
    torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)
    # at the mask's own size upsampling is the identity, and so is its adjoint
    torch.testing.assert_close(bilinear_adjoint(mask, (H, H + 1)), mask)


def test_masked_average_pool_known_values_and_empty_mask():
    feat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    mask = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])  # the top row, at feature resolution
    assert masked_average_pool(feat, mask, eps=0.0).item() == pytest.approx(1.5)
    soft = torch.tensor([[[0.5, 0.0], [0.0, 1.0]]])  # weighted: (0.5 * 1 + 4) / 1.5 = 3
    assert masked_average_pool(feat, soft, eps=0.0).item() == pytest.approx(3.0)
    empty = masked_average_pool(torch.randn(2, 4, 2, 2), torch.zeros(2, 8, 8), pool_batch=False)
    assert torch.equal(empty, torch.zeros(2, 4))  # zero, never NaN
    with pytest.raises(ValueError, match="same N"):
        masked_average_pool(torch.randn(2, 4, 2, 2), torch.zeros(3, 8, 8))


# ---- scores ----------------------------------------------------------------------------------------------------
def test_cosine_logits_known_values_and_zero_prototype():
    e = torch.eye(3)
    feat = e[0].reshape(1, 3, 1, 1)
    out = cosine_logits(feat, torch.stack([e[0], e[1], e[0] + e[1]]))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([20.0, 0.0, 20 / math.sqrt(2)]))
    assert SCALER == 20.0
    assert cosine_logits(feat, e[:1], scaler=5.0).item() == pytest.approx(5.0)
    out = cosine_logits(torch.randn(1, 3, 2, 2), torch.zeros(1, 3))
    assert torch.equal(out, torch.zeros(1, 1, 2, 2))  # a zero prototype scores 0, not NaN


def test_safe_normalize_keeps_zero_vectors():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(safe_normalize(x, dim=1), torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_class_scores_stack_background_and_foreground_and_upsample():
    torch.manual_seed(0)
    feat = torch.randn(2, 4, 3, 3)
    protos = ClassPrototypes(bg=torch.randn(3, 4), fg=torch.randn(1, 4))
    assert protos.counts == (3, 1)
    low = class_scores(feat, protos, SCALER)
    assert low.shape == (2, 2, 3, 3) and low.dtype == torch.float32
    torch.testing.assert_close(low[:, 0], class_score(feat, protos.bg))
    torch.testing.assert_close(low[:, 1], class_score(feat, protos.fg))
    # one prototype per class: exactly the cosine logits of the two prototypes (PANet)
    single = ClassPrototypes(bg=protos.bg[:1], fg=protos.fg)
    torch.testing.assert_close(class_scores(feat, single, SCALER),
                               cosine_logits(feat, torch.cat([single.bg, single.fg])))
    high = class_scores(feat, protos, SCALER, (12, 12))
    torch.testing.assert_close(high, F.interpolate(low, size=(12, 12), mode="bilinear", align_corners=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert class_scores(feat.bfloat16(), protos, SCALER, (12, 12)).dtype == torch.float32


# ---- matcher head ----------------------------------------------------------------------------------------------
def _identity_matcher(d: int = 4, **kwargs) -> MatcherHead:
    head = MatcherHead(in_channels=d, dim=d, **kwargs)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(d).reshape(d, d, 1, 1))
    return head


def _onehot(pattern) -> torch.Tensor:
    """``pattern[h][w]`` channel indices -> one-hot features ``[1, 4, h, w]``."""
    return F.one_hot(torch.tensor(pattern), 4).permute(2, 0, 1).float().unsqueeze(0)


def test_matcher_head_projects_the_last_map_only():
    torch.manual_seed(0)
    head = MatcherHead(in_channels=8, dim=3)
    assert head.proj.weight.shape == (3, 8, 1, 1) and head.proj.bias is None
    assert sum(p.numel() for p in head.parameters()) == 8 * 3
    f5 = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(head.embed([torch.randn(2, 5, 16, 16), f5]), F.conv2d(f5, head.proj.weight))
    with pytest.raises(ValueError, match="dim"):
        MatcherHead(in_channels=8, dim=0)
    with pytest.raises(ValueError, match="thresh"):
        MatcherHead(in_channels=8, thresh=1.5)


def test_matcher_head_known_scores():
    # support: e0 on the top row (foreground), e1 on the bottom row; identity projection, eval window 1
    head = _identity_matcher().eval()
    s_feat = _onehot([[0, 0], [1, 1]])
    s_mask = torch.zeros(1, 4, 4)
    s_mask[0, :2] = 1.0
    protos = head.prototypes([s_feat], s_mask)
    # no 2x2 window of the mask reaches 0.95 (the gate uses the training window): one global fg prototype e0;
    # background: the two single cells of e1
    assert protos.counts == (2, 1)
    torch.testing.assert_close(protos.fg, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(protos.bg, torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2))
    # query e0, e1, e2, 0: foreground 20, 0, 0, 0; background 0, 20, 0, 0
    q = _onehot([[0, 1], [2, 2]])
    q[0, :, 1, 1] = 0.0
    scores = head([q], protos)
    assert scores.shape == (1, 2, 2, 2) and scores.dtype == torch.float32
    torch.testing.assert_close(scores[0, 1], torch.tensor([[20.0, 0.0], [0.0, 0.0]]), atol=1e-3, rtol=0)
    torch.testing.assert_close(scores[0, 0], torch.tensor([[0.0, 20.0], [0.0, 0.0]]), atol=1e-3, rtol=0)
    up = head([q], protos, size=(8, 8))
    torch.testing.assert_close(up, F.interpolate(scores, size=(8, 8), mode="bilinear", align_corners=False))


def test_matcher_head_window_follows_train_eval_mode():
    torch.manual_seed(0)
    head = MatcherHead(in_channels=6, dim=5)
    assert (head.window, head.eval_window, head.thresh, head.scaler) == (2, 1, 0.95, 20.0)
    feat = torch.randn(1, 6, 4, 4)
    mask = torch.zeros(1, 16, 16)
    mask[0, :8, :8] = 1.0  # exactly the top-left 2x2 cells
    with torch.no_grad():
        p_train = head.train().prototypes([feat], mask)
        p_eval = head.eval().prototypes([feat], mask)
        emb = head.embed([feat])
        ref = alpnet_prototypes(emb, mask, window=1, gate_window=2, fg_thresh=0.95, bg_thresh=0.95)
    assert p_train.counts == (3, 1 + 1)  # 2x2-cell windows: 3 background, 1 foreground (+ the global one)
    assert p_eval.counts == (12, 4 + 1)  # single cells: 12 background, 4 foreground (+ the global one)
    assert torch.equal(p_eval.bg, ref.bg) and torch.equal(p_eval.fg, ref.fg)
    # a window larger than the feature map is clamped to it (tiny inputs): on a 2x2 map under a full mask, one
    # 2x2 local foreground window + the global one; no background window -> the global background fallback
    big = MatcherHead(in_channels=6, dim=5, window=8).train()
    with torch.no_grad():
        assert big.prototypes([feat[..., :2, :2]], mask[..., :8, :8]).counts == (1, 2)
