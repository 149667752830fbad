"""Supervised baselines with several target classes: head sizes, ``to_binary`` / ``binary_logits`` semantics
(hand-checked on tiny tensors) and the episodic ``forward(..., class_id=)``."""
from __future__ import annotations

import math

import pytest
import torch

from fewshot_proto.models import build_model
from fewshot_proto.models.baselines import MobileNetASPPSEUNet, ResUpNet, UNet, count_parameters

SMALL = {
    "unet": dict(base_channels=4, norm="batch"),
    "resupnet": dict(base_channels=4),
    "mobilenet_aspp_se_unet": dict(aspp_channels=8, aspp_out_channels=16, decoder_channels=(16, 8, 8, 8, 8)),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_softmax_to_binary_hand_checked():
    model = UNet(base_channels=4, classes=[2, 3])  # softmax head: channels (background, class 2, class 3)
    # one pixel with logits (0, ln 2, ln 3): softmax = (1/6, 2/6, 3/6)
    logits = torch.tensor([0.0, math.log(2.0), math.log(3.0)]).reshape(1, 3, 1, 1)
    b2 = model.to_binary(logits, 2)
    # class 2: foreground = ln 2, background = logsumexp(0, ln 3) = ln 4
    torch.testing.assert_close(b2.flatten(), torch.tensor([math.log(4.0), math.log(2.0)]))
    torch.testing.assert_close(b2.softmax(1)[0, 1, 0, 0], torch.tensor(2.0 / 6.0))
    b3 = model.to_binary(logits, 3)
    torch.testing.assert_close(b3.flatten(), torch.tensor([math.log(3.0), math.log(3.0)]))
    torch.testing.assert_close(b3.softmax(1)[0, 1, 0, 0], torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"class 1 is not one of the classes .*\[2, 3\]"):
        model.to_binary(logits, 1)
    with pytest.raises(ValueError, match=r"expected logits \[B, 3, H, W\]"):
        model.to_binary(torch.zeros(1, 2, 1, 1), 2)


def test_sigmoid_to_binary_hand_checked():
    model = ResUpNet(base_channels=4, classes=[2, 3])  # sigmoid head: [0, z_2, z_3]
    logits = torch.tensor([0.0, 1.5, -2.0]).reshape(1, 3, 1, 1)
    b3 = model.to_binary(logits, 3)
    torch.testing.assert_close(b3.flatten(), torch.tensor([0.0, -2.0]))
    torch.testing.assert_close(b3.softmax(1)[0, 1], torch.sigmoid(torch.tensor([[-2.0]])))
    torch.testing.assert_close(model.to_binary(logits, 2).flatten(), torch.tensor([0.0, 1.5]))


def test_binary_model_is_unchanged():
    torch.manual_seed(0)
    model = UNet(base_channels=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model.segment_image(x)
        assert a.shape == (2, 2, 32, 32)
        assert torch.equal(model.binary_logits(x, 7), a)  # a binary model accepts any class id
        assert torch.equal(model(None, None, x, class_id=7).logits, a)
    assert model.config["classes"] is None
    # one target class = the binary head: same parameters as the default
    assert count_parameters(UNet(classes=[2])) == count_parameters(UNet()) == 31_031_810
    assert count_parameters(ResUpNet(classes=[2])) == count_parameters(ResUpNet()) == 2_033_825


@pytest.mark.parametrize("name", list(SMALL))
def test_multiclass_heads_and_episodic_forward(name):
    torch.manual_seed(0)
    model = build_model(name, classes=[2, 3], **SMALL[name]).eval()
    sigmoid = model.out_mode == "sigmoid"
    assert model.head.conv.out_channels == (2 if sigmoid else 3)
    assert model.classes == [2, 3] and model.config["classes"] == [2, 3]
    rebuilt = build_model(name, **model.config)
    assert rebuilt.classes == [2, 3]
    x = torch.randn(2, 3, 64, 64)
    s, m = torch.randn(1, 3, 64, 64), (torch.rand(1, 64, 64) > 0.5).float()
    with torch.no_grad():
        full = model.segment_image(x)
        assert full.shape == (2, 3, 64, 64)
        if sigmoid:
            assert torch.equal(full[:, 0], torch.zeros_like(full[:, 0]))
        for c, i in ((2, 1), (3, 2)):
            b = model.binary_logits(x, c)
            assert b.shape == (2, 2, 64, 64)
            assert torch.equal(b, model.to_binary(full, c))
            assert torch.equal(model(s, m, x, class_id=c).logits, b)
            # the class probability is the multi-class model's own probability of that class
            p = full.softmax(1)[:, i] if not sigmoid else torch.sigmoid(full[:, i])
            torch.testing.assert_close(b.softmax(1)[:, 1], p)
    with pytest.raises(ValueError, match="pass class_id"):
        model(s, m, x)


def test_bad_classes_raise():
    with pytest.raises(ValueError, match="classes"):
        UNet(classes=[])
    with pytest.raises(ValueError, match="distinct"):
        UNet(classes=[2, 2])
    with pytest.raises(ValueError, match="0 is background"):
        ResUpNet(classes=[0, 1])
    with pytest.raises(ValueError, match="classes"):
        MobileNetASPPSEUNet(classes="23")


@pytest.mark.parametrize("size", [64, 33])
def test_strided_pointwise_conv_equals_strided_conv(size):
    """ResUpNet's projection shortcut: same output, gradients and state dict as ``nn.Conv2d(k=1, stride=2)``."""
    from torch import nn

    from fewshot_proto.models.baselines.resupnet import StridedPointwiseConv

    torch.manual_seed(0)
    ours = StridedPointwiseConv(4, 8, stride=2)
    ref = nn.Conv2d(4, 8, kernel_size=1, stride=2)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 4, size, size)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ours(xa.contiguous(memory_format=torch.channels_last))  # the layout that crashes oneDNN's strided kernel
    yb = ref(xb)
    assert ya.shape == yb.shape == (3, 8, (size + 1) // 2, (size + 1) // 2)
    torch.testing.assert_close(ya, yb)
    ya.square().mean().backward()
    yb.square().mean().backward()
    for a, b in ((ours.weight.grad, ref.weight.grad), (ours.bias.grad, ref.bias.grad), (xa.grad, xb.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # equal up to float summation order
    assert "encoders.1.shortcut.0.weight" in ResUpNet(base_channels=4).state_dict()
