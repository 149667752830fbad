"""Checkpoints of the main model written before the split into ``cwpa_unet`` / ``cwpa_unet_matcher`` (0.1.x) load
as today's models, or fail with a message naming the removed option.

``tests/unit/models/legacy/cwpa_unet_layout_3e15b09.json`` was written by the 0.1.0 code (commit 3e15b09): the
``model_config`` and the state-dict layout (names and shapes) of ``cwpa_unet`` with its default
``prototype_head="f5"`` ("matcher") and with ``prototype_head=None`` ("plain"), and the default run config. The
tests rebuild such checkpoints tensor by tensor in the 0.1 format and load them with today's code.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fewshot_proto.config import config_from_dict, default_config
from fewshot_proto.engine.checkpoint import load_checkpoint, model_from_checkpoint
from fewshot_proto.engine.trainer import check_resume_config
from fewshot_proto.errors import CheckpointError
from fewshot_proto.models.fewshot import CWPAUNet, CWPAUNetMatcher

LAYOUT = json.loads((Path(__file__).parents[1] / "models" / "legacy" / "cwpa_unet_layout_3e15b09.json").read_text())


def _legacy_checkpoint(path: Path, variant: str, **config_changes) -> dict:
    """A 0.1 checkpoint of ``variant`` ("matcher" or "plain") with seeded random tensors of the recorded layout."""
    g = torch.Generator().manual_seed(0)
    entry = LAYOUT[variant]
    state = {}
    for key, shape in entry["state"].items():
        if entry["dtypes"].get(key) == "torch.int64":
            state[key] = torch.tensor(7, dtype=torch.int64).reshape(shape)
        else:
            state[key] = torch.randn(shape, generator=g) * 0.01
    run_config = json.loads(json.dumps(LAYOUT["config"]))
    run_config["model"] = {"name": "cwpa_unet", "kwargs": {} if variant == "matcher" else {"prototype_head": None}}
    payload = {"format": 1, "package_version": "0.1.0", "model_name": "cwpa_unet",
               "model_config": dict(entry["model_config"], **config_changes), "model": state, "step": 1000,
               "config": run_config, "sampler": {}, "metrics": {}}
    torch.save(payload, path)
    return state


@pytest.mark.parametrize("variant, cls, name", [("matcher", CWPAUNetMatcher, "cwpa_unet_matcher"),
                                                ("plain", CWPAUNet, "cwpa_unet")])
def test_a_01_checkpoint_loads_as_todays_model_with_its_weights(tmp_path, variant, cls, name):
    path = tmp_path / f"{variant}.pt"
    state = _legacy_checkpoint(path, variant)
    model, ckpt = model_from_checkpoint(path)
    assert type(model) is cls and ckpt["model_name"] == name and ckpt["upgraded_from"] == "cwpa_unet"
    assert model.config == dict(cls().config)  # 0.1's defaults are today's defaults
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # the run config inside names today's model, so resuming it with the default config is allowed
    assert ckpt["config"]["model"] == {"name": name, "kwargs": {}}
    cfg = config_from_dict(ckpt["config"])
    assert cfg.model.name == name
    if variant == "matcher":
        check_resume_config(default_config(), ckpt, path)  # no ConfigError: the default run is this model
    assert load_checkpoint(path, expect_model=name)["model_name"] == name


def test_head_dim_and_scaler_become_the_matchers_arguments(tmp_path):
    path = tmp_path / "m.pt"
    entry = dict(LAYOUT["matcher"]["model_config"], head_scaler=10.0)
    assert entry["head_dim"] == 256
    _legacy_checkpoint(path, "matcher", head_scaler=10.0)
    model, _ = model_from_checkpoint(path)
    assert model.config["matcher_dim"] == 256 and model.config["matcher_scaler"] == 10.0
    assert model.head.scaler == 10.0


@pytest.mark.parametrize("change, named", [({"head_guide": True}, "head_guide=True"),
                                           ({"norm": "group"}, "norm='group'"),
                                           ({"prototype_head": "hypercolumn"}, "prototype_head='hypercolumn'")])
def test_a_checkpoint_of_a_removed_option_fails_naming_it(tmp_path, change, named):
    path = tmp_path / "old.pt"
    _legacy_checkpoint(path, "matcher", **change)
    with pytest.raises(CheckpointError) as e:
        model_from_checkpoint(path)
    assert str(e.value) == (f"checkpoint {path}: its cwpa_unet was built with {named}, an option removed in 0.2 "
                            f"(the experiments that used it lost); it cannot be rebuilt")


def test_todays_checkpoints_are_not_rewritten(tmp_path):
    from fewshot_proto.engine.checkpoint import save_checkpoint
    from fewshot_proto.models import build_model

    model = build_model("cwpa_unet")
    path = save_checkpoint(tmp_path / "new.pt", model=model, model_name="cwpa_unet", model_config=model.config,
                           step=0)
    ckpt = load_checkpoint(path)
    assert ckpt["model_name"] == "cwpa_unet" and "upgraded_from" not in ckpt
    assert ckpt["model_config"] == model.config


@pytest.mark.parametrize("batch_norm, norm", [(True, "batch"), (False, "none")])
def test_a_01_unet_with_batch_norm_loads_with_todays_norm(tmp_path, batch_norm, norm):
    """0.1's ``unet(batch_norm=...)`` is today's ``unet(norm=...)``, for the model itself and as a fine-tune base."""
    from fewshot_proto.models import build_model

    torch.manual_seed(0)
    today = build_model("unet", base_channels=4, norm=norm)
    old_config = {k: v for k, v in today.config.items() if k != "norm"}
    old_config["batch_norm"] = batch_norm
    state = {k: v.clone() for k, v in today.state_dict().items()}
    path = tmp_path / "unet.pt"
    torch.save({"format": 1, "package_version": "0.1.0", "model_name": "unet", "model_config": old_config,
                "model": state, "step": 5, "config": {"model": {"name": "unet", "kwargs": {"batch_norm": batch_norm}}}},
               path)
    model, ckpt = model_from_checkpoint(path)
    assert model.config == today.config and ckpt["upgraded_from"] == "unet"
    assert ckpt["config"]["model"] == {"name": "unet", "kwargs": {"norm": norm}}
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    ft = build_model("finetune", base="unet", checkpoint=str(path), steps=0)
    assert ft.config["base_kwargs"] == today.config
    assert all(torch.equal(ft.base.state_dict()[k], state[k]) for k in state)
