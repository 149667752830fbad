"""``benchmarks/matcher_share.py`` on an untrained ``cwpa_unet_matcher``: its decoder's classifier is zero, so the
model and "matcher alone" score exactly the same, and "decoder alone" (constant zero logits: every pixel at
probability 0.5, predicted foreground) scores the Dice of the whole slab."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fewshot_proto.config import apply_overrides, config_to_dict, default_config
from fewshot_proto.engine.checkpoint import save_checkpoint
from fewshot_proto.models import build_model

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "matcher_share.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def _script():
    spec = importlib.util.spec_from_file_location("matcher_share", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_untrained_matcher_model_is_its_matcher(tmp_path, capsys):
    from fewshot_proto.data.phantom import ensure_phantoms

    root = ensure_phantoms(tmp_path / "ph", n_scans=10, size=64)
    cfg = apply_overrides(default_config(), {"data.root": str(root), "data.size": 64, "train.precision": "fp32"})
    torch.manual_seed(0)
    model = build_model("cwpa_unet_matcher")
    ckpt = save_checkpoint(tmp_path / "checkpoint.pt", model=model, model_name="cwpa_unet_matcher",
                           model_config=model.config, step=0, config=config_to_dict(cfg))
    out = tmp_path / "share.json"
    assert _script().main([str(ckpt), "--out", str(out), "--note", "untrained"]) == 0
    entry = json.loads(out.read_text())["entries"][str(ckpt)]
    rows = entry["rows"]
    assert rows["model"]["dice"] == rows["matcher alone"]["dice"]
    assert entry["note"] == "untrained" and entry["precision"] == "fp32" and entry["trained_steps"] == 0
    # zero logits everywhere: the decoder alone paints the whole slab, far from the matcher
    assert rows["decoder alone"]["mean"] < rows["matcher alone"]["mean"]
    assert "matcher alone" in capsys.readouterr().out


def test_refuses_another_model(tmp_path, capsys):
    model = build_model("cwpa_unet")
    ckpt = save_checkpoint(tmp_path / "c.pt", model=model, model_name="cwpa_unet", model_config=model.config, step=0,
                           config=config_to_dict(default_config()))
    assert _script().main([str(ckpt), "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {ckpt} holds 'cwpa_unet', not cwpa_unet_matcher"
    assert not (tmp_path / "x.json").exists()
