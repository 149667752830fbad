"""CWPA steps (``fewshot_proto.models.heads.cwpa``) on hand-made tensors: local prototypes, fallback, correlation,
aggregation, enhancement. The masked average pooling it falls back on is tested in ``test_heads.py``."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewshot_proto.models.heads import CWPA
from fewshot_proto.models.heads.cwpa import aggregate, bag_prototypes, correlation, enhance, local_prototypes


def _naive_pool(feat: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    up = F.interpolate(feat, size=mask.shape[-2:], mode="bilinear", align_corners=False)
    return (up * mask[:, None]).sum(dim=(0, 2, 3)) / (mask.sum() + eps)


def test_local_prototypes_pick_cells_above_tau():
    feat = torch.arange(8.0).reshape(1, 2, 2, 2)  # D=2, 2x2 grid; cell (i,j) vector = feat[0,:,i,j]
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1  # cell (0,0): fraction 1
    mask[0, 0, 2] = 1  # cell (0,1): fraction 1/4
    mask[0, 2:, 2:] = 1
    mask[0, 3, 3] = 0  # cell (1,1): fraction 3/4
    p = local_prototypes(feat, mask, tau=0.5)
    assert torch.equal(p, torch.tensor([[0.0, 4.0], [3.0, 7.0]]))
    # tau is strict: a cell at exactly 0.75 does not pass tau=0.75
    assert torch.equal(local_prototypes(feat, mask, tau=0.75), torch.tensor([[0.0, 4.0]]))


def test_kshot_pools_all_slices_into_one_bag():
    feat = torch.randn(3, 5, 4, 4)
    mask = torch.zeros(3, 16, 16)
    mask[0, :8, :8] = 1  # 4 cells
    mask[2, :4, :] = 1  # 4 cells
    p = local_prototypes(feat, mask, tau=0.5)
    assert p.shape == (8, 5)
    assert torch.equal(p[:4], feat[0, :, :2, :2].permute(1, 2, 0).reshape(4, 5))
    assert torch.equal(p[4:], feat[2, :, 0, :].T)


def test_fallback_for_one_pixel_mask_is_masked_average():
    torch.manual_seed(0)
    feat = torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 16, 16)
    mask[0, 9, 5] = 1
    p = local_prototypes(feat, mask, tau=0.5)
    assert p.shape == (1, 4)
    torch.testing.assert_close(p[0], _naive_pool(feat, mask), rtol=1e-5, atol=1e-6)


def test_empty_mask_gives_one_finite_zero_prototype_and_finite_enhancement():
    feat = torch.randn(2, 4, 4, 4)
    p = local_prototypes(feat, torch.zeros(2, 16, 16))
    assert p.shape == (1, 4) and torch.equal(p, torch.zeros(1, 4))
    out = enhance(torch.randn(1, 4, 4, 4), p)
    assert torch.isfinite(out).all()


def test_fallback_is_differentiable_in_a_soft_mask():
    feat = torch.randn(1, 3, 2, 2)
    mask = torch.full((1, 8, 8), 0.1, requires_grad=True)  # no cell above tau -> fallback
    local_prototypes(feat, mask, tau=0.5).sum().backward()
    assert mask.grad is not None and torch.isfinite(mask.grad).all() and mask.grad.abs().sum() > 0


def test_correlation_is_pearson():
    protos = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    q = torch.tensor([10.0, 20.0, 30.0]).reshape(1, 3, 1, 1)  # affine image of protos[0]
    c = correlation(q, protos)[0, :, 0, 0]
    torch.testing.assert_close(c, torch.tensor([1.0, -1.0, 0.0]))
    # a general pair against numpy-style Pearson
    a, b = torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([2.0, 1.0, 0.0, 3.0])
    ac, bc = a - a.mean(), b - b.mean()
    r = float((ac * bc).sum() / (ac.norm() * bc.norm()))
    torch.testing.assert_close(correlation(a.reshape(1, 4, 1, 1), b[None])[0, 0, 0, 0], torch.tensor(r))


def test_aggregate_softmax_with_temperature_uses_original_prototypes():
    protos = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    corr = torch.tensor([0.3, 0.1]).reshape(1, 2, 1, 1)
    w0 = 1.0 / (1.0 + math.exp(-(0.3 - 0.1) / 0.1))
    expected = w0 * protos[0] + (1 - w0) * protos[1]
    torch.testing.assert_close(aggregate(corr, protos, 0.1)[0, :, 0, 0], expected)
    with pytest.raises(ValueError, match="temperature"):
        aggregate(corr, protos, 0.0)


def test_enhance_is_concat_of_feature_and_modulated_feature():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 3, 3)
    protos = torch.randn(5, 8)
    out = enhance(q, protos, 0.1)
    assert out.shape == (2, 16, 3, 3)
    assert torch.equal(out[:, :8], q)
    p_agg = aggregate(correlation(q, protos), protos, 0.1)
    torch.testing.assert_close(out[:, 8:], p_agg * q)
    # a single prototype: the softmax weight is 1 everywhere
    torch.testing.assert_close(enhance(q, protos[:1])[:, 8:], protos[0].reshape(1, 8, 1, 1) * q)


def test_cwpa_module_background_option_and_validation():
    feat = torch.randn(1, 4, 4, 4)
    mask = torch.zeros(1, 16, 16)
    mask[0, :8, :8] = 1  # 4 fg cells, 12 bg cells
    assert CWPA().prototypes(feat, mask).shape == (4, 4)
    both = CWPA(use_background=True).prototypes(feat, mask)
    assert both.shape == (16, 4)  # foreground cells first, then background ones
    assert torch.equal(both, torch.cat([local_prototypes(feat, mask), local_prototypes(feat, 1.0 - mask)]))
    assert torch.equal(bag_prototypes(feat, mask, use_background=True), both)
    assert torch.equal(bag_prototypes(feat, mask), CWPA().prototypes(feat, mask))
    assert CWPA()(torch.randn(3, 4, 4, 4), CWPA().prototypes(feat, mask)).shape == (3, 8, 4, 4)
    with pytest.raises(ValueError, match="tau"):
        CWPA(tau=1.5)
    with pytest.raises(ValueError, match="same S"):
        local_prototypes(feat, torch.zeros(2, 16, 16))


def test_masked_average_bag_is_one_prototype_whatever_the_mask():
    """The ablation's bag: PANet's masked average of the features upsampled to the mask (hand-computed here),
    even where local cells would pass tau; with the background option the background average follows."""
    feat = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    mask = torch.zeros(2, 4, 4)
    mask[0, :2, :2] = 1  # slice 0: the top-left cell exactly (4 pixels)
    up = F.interpolate(feat, size=(4, 4), mode="bilinear", align_corners=False)  # [2, 3, 4, 4]
    expected = (up * mask.unsqueeze(1)).sum(dim=(0, 2, 3)) / (mask.sum() + 1e-5)
    fg = bag_prototypes(feat, mask, bag="masked_average")
    assert fg.shape == (1, 3)
    torch.testing.assert_close(fg[0], expected)
    assert local_prototypes(feat, mask).shape == (1, 3) and not torch.allclose(local_prototypes(feat, mask), fg)
    both = CWPA(bag="masked_average", use_background=True).prototypes(feat, mask)
    bg = (up * (1 - mask).unsqueeze(1)).sum(dim=(0, 2, 3)) / ((1 - mask).sum() + 1e-5)
    torch.testing.assert_close(both, torch.stack([expected, bg]))
    # one prototype: the aggregated prototype is that vector at every position
    q = torch.randn(2, 3, 2, 2)
    out = CWPA(bag="masked_average")(q, fg)
    torch.testing.assert_close(out[:, 3:], fg[0].reshape(1, 3, 1, 1) * q)
    with pytest.raises(ValueError, match="CWPA: bag must be one of local, masked_average, got 'mean'"):
        CWPA(bag="mean")
    with pytest.raises(ValueError, match="bag_prototypes: bag must be one of"):
        bag_prototypes(feat, mask, bag="mean")
    assert "bag='masked_average'" in repr(CWPA(bag="masked_average"))


def test_cwpa_unet_records_and_uses_the_bag():
    from fewshot_proto.models import build_model

    torch.manual_seed(0)
    model = build_model("cwpa_unet_matcher", bag="masked_average").eval()
    assert model.config["bag"] == "masked_average" and model.cwpa.bag == "masked_average"
    assert build_model("cwpa_unet").config["bag"] == "local"
    img = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 64, 64)
    mask[0, 8:56, 8:56] = 1
    with torch.no_grad():
        protos = model.prototypes(model.encode(img), mask)
    assert protos.local.shape == (1, 512)
