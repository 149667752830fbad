"""Supervised baselines (UNet, ResUpNet, MobileNet-ASPP-SE U-Net) in the episodic harness.

Parameter counts are asserted exactly for the architectures as built, with the seeds' own defaults. Where and
why they differ from the seeds' claims:

* UNet (seeds 003/004, Ronneberger): 31,030,658 for the paper's 1-channel input and 2 classes, 31,031,810
  for the harness' 3-channel input. The seed says "around 31.3 million"; the paper's network has 31.03 M
  (18 3x3 convs, 4 up-convs, 1 1x1 conv, all with biases), so the seed's figure is rounded up, not a different
  network. ``same`` padding adds no parameters. With BN (option) it is 31,037,698.
* ResUpNet (seed 000): 2,033,985 for the seed's 4-channel BraTS input (2,033,825 for 3 channels), against the
  seed's claimed ~2.75 M. The seed's per-part table does not follow from its own code: its bottleneck
  (~0.9 M claimed, 919,808 here) agrees, but its encoder blocks 16-32-64-128 hold 306,160 parameters, not
  ~1.25 M, and its decoder 808,000 rather than ~0.6 M. Counting Keras' non-trainable BN moving statistics too
  (as Keras' ``count_params`` does) adds 4,896, giving 2,038,881: still not 2.75 M. The output layer has 17
  parameters (conv1x1 16 -> 1), not ~50.
* MobileNet-ASPP-SE U-Net (seed 001): 10,014,085 in total for 3 input channels (10,012,933 for the seed's
  1-channel input), of which the MobileNetV2 encoder is 2,223,872 (2,223,296 with the 1-channel first conv)
  and the trainable rest 7,790,213. The seed claims 3,403,809 total, 2,211,072 frozen, 1,192,737 trainable.
  The frozen encoder differs by 12,224 from torchvision's ``mobilenet_v2().features`` (1-channel); the
  trainable part cannot be 1.19 M under the seed's own specification: its three dilated 3x3 ASPP branches
  (1280 -> 128) alone hold 3 x 1,474,560 parameters (ASPP total 5,081,344), and its dec5 block
  (352 -> 256 -> 256 3x3 convs) another 1.4 M (decoder total 2,707,908).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.errors import CheckpointError
from fewshot_proto.models import MODELS, list_models
from fewshot_proto.models.base import SupervisedSegmenter
from fewshot_proto.models.baselines import MobileNetASPPSEUNet, ResUpNet, UNet, count_parameters
from fewshot_proto.models.baselines.mobilenet_aspp_se import IMAGENET_FILES
from fewshot_proto.models.checks import nearest_valid_size
from fewshot_proto.types import SegOutput

NAMES = ["unet", "resupnet", "mobilenet_aspp_se_unet"]
# Narrow variants so that CPU tests stay fast (the harness' width settings).
SMALL: Dict[str, Dict[str, Any]] = {
    "unet": dict(base_channels=4, norm="batch"),
    "resupnet": dict(base_channels=4),
    "mobilenet_aspp_se_unet": dict(aspp_channels=8, aspp_out_channels=16, decoder_channels=(16, 8, 8, 8, 8)),
}
STRIDE = {"unet": 16, "resupnet": 16, "mobilenet_aspp_se_unet": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


def _episode(s: int, q: int, size: int, channels: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support_img = torch.randn(s, channels, size, size, generator=g)
    support_mask = (torch.rand(s, size, size, generator=g) > 0.5).float()
    query_img = torch.randn(q, channels, size, size, generator=g)
    return support_img, support_mask, query_img


def _random_mobilenet_weights(path: Path, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A torchvision mobilenet_v2 state dict with random weights and non-trivial BN statistics, saved to path."""
    from torchvision.models import mobilenet_v2

    torch.manual_seed(seed)
    m = mobilenet_v2(weights=None)
    state = m.state_dict()
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.normal_(0.0, 0.1)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 1.5)
    torch.save(state, path)
    return state


# -- registry and interface --------------------------------------------------------------------------------


def test_registered_by_name_with_kind_and_config():
    assert set(NAMES) <= set(list_models())
    for name in NAMES:
        assert name in MODELS
        model = MODELS.build(name, **SMALL[name])
        assert isinstance(model, SupervisedSegmenter)
        assert type(model).kind == "supervised" and type(model).needs_support is False
        assert model.total_stride == STRIDE[name]
        rebuilt = MODELS.build(name, **model.config)  # config holds the builder kwargs
        assert rebuilt.config == model.config
        assert count_parameters(rebuilt) == count_parameters(model)
    # tuples are recorded as lists (YAML/JSON-friendly), and initial weights are not architecture
    mb = MODELS.build("mobilenet_aspp_se_unet", **SMALL["mobilenet_aspp_se_unet"])
    assert mb.config["decoder_channels"] == [16, 8, 8, 8, 8] and isinstance(mb.config["decoder_channels"], list)
    assert mb.config["weights"] is None and mb.config["freeze_encoder"] is False and mb.init_weights is None
    assert {n: MODELS.get(n) for n in NAMES} == {
        "unet": UNet,
        "resupnet": ResUpNet,
        "mobilenet_aspp_se_unet": MobileNetASPPSEUNet,
    }


def test_unknown_kwargs_and_bad_values_raise():
    with pytest.raises(TypeError):
        UNet(bogus=1)
    with pytest.raises(ValueError, match="base_channels"):
        UNet(base_channels=0)
    with pytest.raises(ValueError, match="dropout"):
        ResUpNet(dropout=1.0)
    with pytest.raises(ValueError, match="out_mode"):
        ResUpNet(out_mode="logits")
    with pytest.raises(ValueError, match="decoder_channels"):
        MobileNetASPPSEUNet(decoder_channels=(8, 8, 8))


# -- parameter counts (seed-exact defaults; see the module docstring for the seeds' claims) -----------------


def _unet_formula(cin: int, base: int, depth: int, n_out: int) -> int:
    """Closed-form count of the bias-carrying Ronneberger U-Net, independent of the implementation."""
    w = [base * 2**i for i in range(depth + 1)]
    total, c = 0, cin
    for wi in w:  # contracting path + bottleneck: two 3x3 convs per level
        total += (9 * c + 1) * wi + (9 * wi + 1) * wi
        c = wi
    for i in range(depth, 0, -1):  # up-conv 2x2, then two 3x3 convs on the concatenation
        total += (4 * w[i] + 1) * w[i - 1]
        total += (9 * 2 * w[i - 1] + 1) * w[i - 1] + (9 * w[i - 1] + 1) * w[i - 1]
    return total + (w[0] + 1) * n_out


def test_unet_parameter_count():
    assert count_parameters(UNet()) == 31_031_810 == _unet_formula(3, 64, 4, 2)
    assert count_parameters(UNet(in_channels=1)) == 31_030_658 == _unet_formula(1, 64, 4, 2)
    assert count_parameters(UNet(norm="batch")) == 31_037_698
    n_conv = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in UNet(base_channels=4).modules())
    assert n_conv == 23  # the paper's 23 convolutional layers


def test_resupnet_parameter_count():
    model = ResUpNet(in_channels=4)
    assert count_parameters(model) == 2_033_985
    assert count_parameters(model.encoders) == 306_160
    assert count_parameters(model.bottleneck) == 919_808
    assert count_parameters(model.decoders) == 808_000
    assert count_parameters(model.head) == 17
    assert count_parameters(ResUpNet()) == 2_033_825


def test_mobilenet_parameter_count(tmp_path):
    model = MobileNetASPPSEUNet()
    assert count_parameters(model) == 10_014_085
    assert count_parameters(model.encoder) == 2_223_872
    assert count_parameters(model.aspp) == 5_081_344
    assert count_parameters(model.decoder) == 2_707_908
    assert count_parameters(model, trainable_only=True) == 10_014_085  # random init: nothing frozen
    grey = MobileNetASPPSEUNet(in_channels=1)
    assert count_parameters(grey) == 10_012_933
    assert count_parameters(grey.encoder) == 2_223_296
    path = tmp_path / "mnv2.pth"
    _random_mobilenet_weights(path)
    frozen = MobileNetASPPSEUNet(weights=path)
    assert count_parameters(frozen, trainable_only=True) == 10_014_085 - 2_223_872 == 7_790_213


# -- shapes, channels, sizes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("shots", [1, 5])
def test_episode_shapes_small(name, size, shots):
    torch.manual_seed(0)
    model = MODELS.build(name, **SMALL[name]).train()
    out = model(*_episode(shots, 2, size))
    assert isinstance(out, SegOutput)
    assert out.logits.shape == (2, 2, size, size)
    assert out.support_feats is None and out.query_feats is None and out.prototypes is None
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shots", [1, 5])
def test_episode_shapes_seed_default_at_64(name, shots):
    torch.manual_seed(0)
    model = MODELS.build(name).eval()
    with torch.no_grad():
        out = model(*_episode(shots, 1, 64))
    assert out.logits.shape == (1, 2, 64, 64)


@pytest.mark.parametrize("name", NAMES)
def test_support_is_ignored_and_matches_segment_image(name):
    torch.manual_seed(0)
    model = MODELS.build(name, **SMALL[name]).eval()
    s1, m1, q = _episode(1, 2, 64, seed=1)
    s5, m5, _ = _episode(5, 2, 64, seed=2)
    with torch.no_grad():
        a = model(s1, m1, q).logits
        b = model(s5, m5, q).logits
        c = model(None, None, q).logits
        d = model.segment_image(q)
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels", [1, 4])
def test_in_channels(name, channels):
    torch.manual_seed(0)
    model = MODELS.build(name, in_channels=channels, **SMALL[name]).eval()
    with torch.no_grad():
        out = model(*_episode(1, 1, 64, channels=channels))
    assert out.logits.shape == (1, 2, 64, 64)
    with pytest.raises(ValueError, match=f"in_channels={channels}"):
        model.segment_image(torch.zeros(1, 3 if channels != 3 else 2, 64, 64))


@pytest.mark.parametrize("name", NAMES)
def test_invalid_size_suggests_nearest(name):
    model = MODELS.build(name, **SMALL[name])
    s = STRIDE[name]
    with pytest.raises(ValueError, match=f"nearest valid size: 96x{2 * s}"):
        model.segment_image(torch.zeros(1, 3, 100, 2 * s))
    with pytest.raises(ValueError, match="does not match"):
        model(torch.zeros(1, 3, 64, 64), torch.zeros(2, 64, 64), torch.zeros(1, 3, 64, 64))  # S mismatch
    with pytest.raises(ValueError, match="both"):
        model(torch.zeros(1, 3, 64, 64), None, torch.zeros(1, 3, 64, 64))


def test_nearest_valid_size():
    assert nearest_valid_size(100, 16) == 96
    assert nearest_valid_size(104, 16) == 112  # tie goes up
    assert nearest_valid_size(250, 32) == 256
    assert nearest_valid_size(5, 32) == 32


# -- output modes -------------------------------------------------------------------------------------------


def test_sigmoid_mode_is_two_logit_softmax():
    torch.manual_seed(0)
    model = ResUpNet(base_channels=4).eval()  # out_mode="sigmoid" (seed default)
    assert model.head.conv.out_channels == 1
    x = torch.randn(2, 3, 32, 32)
    target = (torch.rand(2, 32, 32) > 0.5).long()
    with torch.no_grad():
        logits = model.segment_image(x)
    z = logits[:, 1]
    assert torch.equal(logits[:, 0], torch.zeros_like(z))
    torch.testing.assert_close(logits.softmax(1)[:, 1], torch.sigmoid(z))
    ce = F.cross_entropy(logits, target)
    bce = F.binary_cross_entropy_with_logits(z, target.float())
    torch.testing.assert_close(ce, bce)
    assert UNet(base_channels=4).head.conv.out_channels == 2  # Ronneberger: two-class softmax


# -- gradients, freezing -------------------------------------------------------------------------------------


def _grad_is_informative(pname: str, grad: torch.Tensor) -> bool:
    """Non-zero gradient, with one exception: an SE block's hidden layer has only ``max(1, C // 16)`` ReLU
    units, and when all are dead at initialisation for the given input the gradients of ``fc1`` (weight, bias)
    and of ``fc2.weight`` are exactly zero (``fc2.bias`` still gets one). They are still reached (not None)."""
    return bool(grad.abs().sum() > 0) or ".fc1." in pname or pname.endswith(".fc2.weight")


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_trainable_parameter(name):
    torch.manual_seed(0)
    kwargs = dict(SMALL[name])
    kwargs.update({"resupnet": {"dropout": 0.0}, "unet": {}, "mobilenet_aspp_se_unet": {"aspp_dropout": 0.0}}[name])
    model = MODELS.build(name, **kwargs).train()
    s, m, q = _episode(1, 2, 64)
    target = (torch.rand(2, 64, 64) > 0.5).long()
    F.cross_entropy(model(s, m, q).logits, target).backward()
    for pname, p in model.named_parameters():
        assert p.requires_grad
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert _grad_is_informative(pname, p.grad), pname


@pytest.mark.parametrize("channels", [3, 1])
def test_mobilenet_frozen_with_weights(tmp_path, channels):
    path = tmp_path / "mnv2.pth"
    state = _random_mobilenet_weights(path)
    torch.manual_seed(1)
    model = MobileNetASPPSEUNet(in_channels=channels, weights=path, aspp_dropout=0.0, **{
        k: v for k, v in SMALL["mobilenet_aspp_se_unet"].items()
    })
    # initial weights are provenance, not architecture: config records None, init_weights the path
    assert model.config["weights"] is None and model.init_weights == str(path)
    assert model.config["freeze_encoder"] is True
    # weights loaded; first conv averaged over R, G, B when the input is grey
    w0 = state["features.0.0.weight"]
    expected_w0 = w0 if channels == 3 else w0.mean(dim=1, keepdim=True)
    torch.testing.assert_close(model.encoder[0][0].weight, expected_w0)
    torch.testing.assert_close(model.encoder[18][1].running_mean, state["features.18.1.running_mean"])

    model.train()
    assert model.training and not model.encoder.training
    assert all(not mod.training for mod in model.encoder.modules())
    assert all(not p.requires_grad for p in model.encoder.parameters())
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    s, m, q = _episode(1, 2, 64, channels=channels)
    target = (torch.rand(2, 64, 64) > 0.5).long()
    F.cross_entropy(model(s, m, q).logits, target).backward()
    for pname, p in model.named_parameters():
        if pname.startswith("encoder."):
            assert p.grad is None, pname
        else:
            assert p.grad is not None and _grad_is_informative(pname, p.grad), pname
    after = model.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN statistics untouched in train mode
    # rebuilt from its config (weights None, freeze_encoder recorded as resolved): frozen, and the state dict
    # carries the encoder weights
    twin = MobileNetASPPSEUNet(**model.config)
    assert twin.init_weights is None and twin.encoder_frozen
    assert all(not p.requires_grad for p in twin.encoder.parameters())
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(twin.eval()(s, m, q).logits, model.eval()(s, m, q).logits)


def test_mobilenet_weights_resolution(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        MobileNetASPPSEUNet(weights=missing)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        MobileNetASPPSEUNet(weights=bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.0.weight": torch.zeros(32, 3, 3, 3)}, wrong)
    with pytest.raises(CheckpointError, match="wrong.pth"):
        MobileNetASPPSEUNet(weights=wrong)

    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(FileNotFoundError, match=IMAGENET_FILES[0]):
            MobileNetASPPSEUNet(weights="imagenet")
        ckpt = tmp_path / "hub" / "checkpoints"
        ckpt.mkdir(parents=True)
        state = _random_mobilenet_weights(ckpt / IMAGENET_FILES[0], seed=3)
        model = MobileNetASPPSEUNet(weights="imagenet")
        assert model.encoder_frozen
        torch.testing.assert_close(model.encoder[0][0].weight, state["features.0.0.weight"])
    finally:
        torch.hub.set_dir(old_hub)
    # explicit opt-out: pretrained but trainable
    unfrozen = MobileNetASPPSEUNet(weights=tmp_path / "hub" / "checkpoints" / IMAGENET_FILES[0], freeze_encoder=False)
    assert all(p.requires_grad for p in unfrozen.encoder.parameters())
    assert unfrozen.train().encoder.training


# -- determinism and checkpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_eval_determinism_and_state_dict_round_trip(name):
    torch.manual_seed(0)
    model = MODELS.build(name, **SMALL[name])
    s, m, q = _episode(1, 2, 64)
    model.train()
    with torch.no_grad():
        model(s, m, q)  # move BN running statistics away from their initial values
    model.eval()
    with torch.no_grad():
        a = model(s, m, q).logits
        b = model(s, m, q).logits
    assert torch.equal(a, b)

    buf = io.BytesIO()
    torch.save({"config": model.config, "state_dict": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    torch.manual_seed(123)  # different initialisation before loading
    clone = MODELS.build(name, **ckpt["config"])
    clone.load_state_dict(ckpt["state_dict"], strict=True)
    clone.eval()
    with torch.no_grad():
        c = clone(s, m, q).logits
    assert torch.equal(a, c)


def test_unet_initialisation_is_he_normal():
    torch.manual_seed(0)
    model = UNet(base_channels=16)
    w = model.encoders[1].block[0].weight  # 3x3 conv 16 -> 32: fan_in = 144
    assert math.isclose(float(w.detach().std()), math.sqrt(2 / 144), rel_tol=0.1)
    assert float(model.encoders[1].block[0].bias.detach().abs().sum()) == 0.0
    up = model.ups[0]  # 2x2 transposed conv 256 -> 128: each output sees 256 inputs
    assert math.isclose(float(up.weight.detach().std()), math.sqrt(2 / 256), rel_tol=0.1)


def test_unet_norm_vocabulary():
    from fewshot_proto.models.baselines.unet import NORMS

    assert NORMS == ("none", "batch")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in UNet(base_channels=4).modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in UNet(base_channels=4, norm="batch").modules()) == 18
    with pytest.raises(ValueError, match=r"^UNet: norm must be one of \('none', 'batch'\), got 'instance'$"):
        UNet(norm="instance")
