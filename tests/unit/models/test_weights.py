"""``models.weights``: the one safe reader of weight files (checkpoints, pretrained encoders, fine-tuning bases)."""
from __future__ import annotations

import pytest
import torch

from fewshot_proto.errors import CheckpointError
from fewshot_proto.models.weights import read_state_file, read_torch_file, state_dict_of

STATE = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(2)}


@pytest.mark.parametrize("payload, name, config", [
    (STATE, None, None),
    ({"state_dict": STATE, "epoch": 3}, None, None),
    ({"model": STATE, "model_name": "unet", "model_config": {"base_channels": 4}}, "unet", {"base_channels": 4}),
])
def test_the_three_layouts_give_the_same_state(tmp_path, payload, name, config):
    path = tmp_path / "w.pt"
    torch.save(payload, path)
    got = read_state_file(path)
    assert got.model_name == name and got.model_config == config
    assert got.state.keys() == STATE.keys() and all(torch.equal(got.state[k], STATE[k]) for k in STATE)


def test_each_failure_is_one_line_naming_the_file(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(CheckpointError) as e:
        read_torch_file(missing, "base checkpoint")
    assert str(e.value) == f"base checkpoint {missing} does not exist"
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        read_torch_file(empty)
    assert str(e.value) == f"checkpoint {empty} is empty (0 bytes)"
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        read_torch_file(text)
    assert str(e.value) == f"checkpoint {text} is corrupt or truncated (not a torch.save zip archive)"
    good = tmp_path / "good.pt"
    torch.save(STATE, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=f"^checkpoint {cut} is corrupt or truncated"):
        read_torch_file(cut)


def test_a_pickled_object_is_refused_not_run(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"model": STATE, "extra": torch.nn.Linear(2, 2)}, path)  # a module: not weights-only loadable
    with pytest.raises(CheckpointError, match=f"^checkpoint {path} cannot be read safely with weights_only=True"):
        read_torch_file(path)


@pytest.mark.parametrize("obj", [[1, 2], {}, {"a": 1}, {"state_dict": {"a": "x"}}])
def test_no_state_dict_is_refused(tmp_path, obj):
    with pytest.raises(CheckpointError) as e:
        state_dict_of(obj, tmp_path / "f.pt", "weights file")
    assert str(e.value) == f"weights file {tmp_path / 'f.pt'} does not contain a state dict (a mapping of names to tensors)"


def test_finetune_reads_its_base_through_it(tmp_path):
    from fewshot_proto.models import build_model

    missing = tmp_path / "base.pt"
    with pytest.raises(CheckpointError) as e:
        build_model("finetune", base="unet", base_kwargs={"base_channels": 4}, checkpoint=str(missing))
    assert str(e.value) == f"finetune: base checkpoint {missing} does not exist"
