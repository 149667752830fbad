"""ResNet-34 encoder: the contract (shapes, reductions), dilation, weights handling, input-size check."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fewshot_proto.models.encoders import ENCODERS, ResNet34Encoder, build_encoder, nearest_valid_sizes
from fewshot_proto.models.encoders.base import ENCODER_ZOO


@pytest.fixture(scope="module")
def enc() -> ResNet34Encoder:
    torch.manual_seed(0)
    return build_encoder("resnet34").eval()


def test_registry_lists_resnet34(enc):
    assert "resnet34" in ENCODERS.names()
    assert ("resnet34", "fewshot_proto.models.encoders.resnet", "ResNet34Encoder") in ENCODER_ZOO
    assert ENCODERS.get("resnet34") is ResNet34Encoder and isinstance(enc, ResNet34Encoder)
    with pytest.raises(KeyError, match="resnet34"):
        build_encoder("resnet999")


def test_importing_the_encoder_module_registers_nothing():
    """A fresh interpreter: the zoo is registered on the first ``build_encoder``, not on import."""
    code = (
        "import fewshot_proto.models.encoders.resnet\n"
        "from fewshot_proto.models.encoders import ENCODERS, build_encoder\n"
        "assert 'resnet34' not in ENCODERS, ENCODERS.names()\n"
        "try:\n"
        "    build_encoder('resnet999')\n"
        "except KeyError as e:\n"
        "    assert 'resnet34' in str(e), e\n"
        "assert 'resnet34' in ENCODERS\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_feature_shapes_256(enc):
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 256, 256))
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 128, 128), (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 16, 16)
    ]
    assert enc.out_channels == (64, 64, 128, 256, 512)
    assert enc.reductions == (2, 4, 8, 16, 16)
    assert enc.output_stride == 16 and enc.input_multiple == 16


def test_contract_matches_shapes_at_64(enc):
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        feats = enc(x)
    for f, c, r in zip(feats, enc.out_channels, enc.reductions):
        assert tuple(f.shape) == (2, c, 64 // r, 96 // r)


def test_layer4_is_dilated_not_strided(enc):
    first = enc.layer4[0]
    assert first.conv1.stride == (1, 1) and first.downsample[0].stride == (1, 1)
    for block in enc.layer4:
        for conv in (block.conv1, block.conv2):
            assert conv.dilation == (2, 2) and conv.padding == (2, 2)


def test_undilated_variant_has_stride_32():
    e = ResNet34Encoder(dilate_last=False).eval()
    with torch.no_grad():
        f5 = e(torch.randn(1, 3, 64, 64))[-1]
    assert tuple(f5.shape) == (1, 512, 2, 2) and e.output_stride == 32


def test_parameter_count_is_torchvision_resnet34_without_fc(enc):
    # torchvision resnet34: 21,797,672 parameters, of which fc holds 512*1000 + 1000 = 513,000.
    assert sum(p.numel() for p in enc.parameters()) == 21_797_672 - 513_000


def test_invalid_input_size_suggests_valid_sizes(enc):
    with pytest.raises(ValueError, match=r"multiples of 16.*96x96 or 112x112"):
        enc.check_input_shape(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ValueError, match="input channels"):
        enc.check_input_shape(torch.zeros(1, 1, 64, 64))
    assert nearest_valid_sizes(100, 32) == (96, 128)
    assert nearest_valid_sizes(5, 16) == (16, 16)


def test_imagenet_weights_missing_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="resnet34-b627a593.pth"):
        ResNet34Encoder(weights="imagenet")


def test_weights_from_path_roundtrip_and_one_channel_adaptation(tmp_path, enc):
    from torchvision.models import resnet34

    torch.manual_seed(1)
    tv = resnet34(weights=None)
    path = tmp_path / "r34.pth"
    torch.save(tv.state_dict(), path)
    e3 = ResNet34Encoder(weights=path)
    assert torch.equal(e3.layer3[2].conv2.weight, tv.layer3[2].conv2.weight)
    # 1-channel: a grey image gives the same features as the RGB encoder on the grey image tiled to RGB.
    e1 = ResNet34Encoder(in_channels=1, weights=path).eval()
    e3.eval()
    g = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        f1, f3 = e1(g)[-1], e3(g.repeat(1, 3, 1, 1))[-1]
    torch.testing.assert_close(f1, f3, rtol=1e-4, atol=1e-4)
    # the encoder's own state dict (1 channel) loads back as well
    p1 = tmp_path / "e1.pth"
    torch.save(e1.state_dict(), p1)
    assert torch.equal(ResNet34Encoder(in_channels=1, weights=p1).conv1.weight, e1.conv1.weight)


def test_bad_weights_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ResNet34Encoder(weights=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="do not fit"):
        ResNet34Encoder(weights=bad)


def test_weights_from_a_fewshot_proto_checkpoint_take_its_encoder(tmp_path):
    """A two-stage recipe starts a model from another run's checkpoint: the encoder.* weights of that model."""
    from fewshot_proto.engine.checkpoint import save_checkpoint
    from fewshot_proto.models import build_model

    torch.manual_seed(3)
    first = build_model("alpnet")
    with torch.no_grad():
        first.encoder.bn1.running_mean.add_(0.5)  # batch-norm statistics travel with the weights
    path = save_checkpoint(tmp_path / "checkpoint.pt", model=first, model_name="alpnet",
                           model_config=dict(first.config), step=1)
    second = build_model("cwpa_unet", weights=path)
    for k, v in first.encoder.state_dict().items():
        assert torch.equal(second.encoder.state_dict()[k], v), k
    assert second.config["weights"] is None and second.init_weights == str(path)
    # a checkpoint of a model without an encoder.* part is refused by name
    lone = build_model("alpnet")
    bad = tmp_path / "other.pt"
    torch.save({"model": {"proj.weight": lone.proj.weight.detach()}, "model_name": "x", "model_config": {}}, bad)
    with pytest.raises(ValueError, match=r"checkpoint .*other.pt \(model 'x'\) has no encoder.\* weights"):
        ResNet34Encoder(weights=bad)
