"""Checkpoints: atomic round trip, weights_only loading, clear errors for bad files."""
from __future__ import annotations

import argparse

import pytest
import torch

from fewshot_proto.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from fewshot_proto.errors import CheckpointError
from fewshot_proto.models import build_model


def _tiny():
    torch.manual_seed(0)
    return build_model("unet", base_channels=4, in_channels=3)


def _save(tmp_path, model, name="unet", **kw):
    return save_checkpoint(tmp_path / "ck.pt", model=model, model_name=name, model_config=dict(model.config),
                           step=5, **kw)


def test_round_trip_rebuilds_identical_model(tmp_path):
    model = _tiny().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = _save(tmp_path, model, optimizer=opt, config={"train": {"iters": 5}})
    assert not path.with_name(path.name + ".tmp").exists()
    again, ckpt = model_from_checkpoint(path)
    assert ckpt["step"] == 5 and ckpt["config"] == {"train": {"iters": 5}}
    x = torch.randn(1, 3, 32, 32)
    s = torch.zeros(1, 3, 32, 32)
    m = torch.zeros(1, 32, 32)
    torch.testing.assert_close(model(s, m, x).logits, again(s, m, x).logits, rtol=0, atol=0)


def test_weights_only_refuses_foreign_objects(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"format": 1, "model_name": "unet", "model_config": {}, "model": {}, "x": argparse.Namespace(a=1)}, p)
    with pytest.raises(CheckpointError, match=r"evil.pt.*weights_only"):
        load_checkpoint(p)


@pytest.mark.parametrize("content, cause", [(b"", "empty"), (b"not a checkpoint at all", "corrupt")])
def test_garbage_files(tmp_path, content, cause):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad.pt.*{cause}"):
        load_checkpoint(p)


def test_truncated_checkpoint(tmp_path):
    path = _save(tmp_path, _tiny())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"ck.pt is corrupt or truncated"):
        load_checkpoint(path)


def test_missing_and_wrong_model(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    path = _save(tmp_path, _tiny())
    with pytest.raises(CheckpointError, match=r"holds model 'unet', not 'cwpa_unet'"):
        load_checkpoint(path, expect_model="cwpa_unet")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a fewshot_proto checkpoint"):
        load_checkpoint(other)


def test_shape_mismatch_is_reported(tmp_path):
    path = _save(tmp_path, _tiny())
    ck = torch.load(path, weights_only=True)
    ck["model_config"] = dict(ck["model_config"], base_channels=8)
    torch.save(ck, path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        model_from_checkpoint(path)


def test_a_checkpoint_with_nan_or_inf_is_never_written(tmp_path):
    """Saving non-finite weights (or optimiser state) raises, names the tensors, and leaves the previous checkpoint
    byte for byte as it was, with no temporary file beside it."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model=model, model_name="m", model_config={}, step=1, optimizer=opt)
    before = path.read_bytes()
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
        model.bias[0] = float("inf")
    with pytest.raises(CheckpointError) as e:
        save_checkpoint(path, model=model, model_name="m", model_config={}, step=2, optimizer=opt)
    assert str(e.value) == (f"checkpoint {path} not written: 2 tensor(s) hold NaN or inf (e.g. model.weight, "
                            f"model.bias)")
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    opt.state[model.weight]["momentum_buffer"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) hold NaN or inf \(e.g. optimizer.state.0"):
        save_checkpoint(path, model=model, model_name="m", model_config={}, step=2, optimizer=opt)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]
