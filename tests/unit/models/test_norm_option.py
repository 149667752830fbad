"""``norm="group"``: batch-independent normalisation for episodic training (same parameters as BatchNorm)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fewshot_proto.models import build_model


def test_group_norm_replaces_every_batch_norm_and_keeps_parameter_count():
    bn = build_model("cwpa_unet")
    gn = build_model("cwpa_unet", norm="group")
    assert gn.config["norm"] == "group"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert sum(p.numel() for p in gn.parameters()) == sum(p.numel() for p in bn.parameters()) == 26_034_626 + 512 * 256


def test_group_norm_output_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    m = build_model("cwpa_unet", norm="group").train()
    s, sm = torch.randn(1, 3, 64, 64), (torch.rand(1, 64, 64) > 0.5).float()
    q = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        both = m(s, sm, q).logits
        one = m(s, sm, q[:1]).logits
    torch.testing.assert_close(both[:1], one, rtol=1e-4, atol=1e-4)


def test_group_norm_refuses_pretrained_weights(tmp_path):
    with pytest.raises(ValueError, match="norm='batch'"):
        build_model("cwpa_unet", norm="group", weights=str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="norm must be"):
        build_model("cwpa_unet", norm="layer")
