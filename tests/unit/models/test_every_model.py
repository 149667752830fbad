"""Every registered model, few-shot and supervised, through the same harness (issue 4, item 5):

* ``fewshot_proto.list_models()`` lists the known few-shot and supervised names;
* one tiny episode forward gives finite logits of the documented shape;
* one ``evaluate`` call on small phantoms gives finite Dice in [0, 1] for every test class and leaves the model's
  weights bit-identical (the fine-tune baseline adapts copies only; no model may learn during evaluation);
* ``python -m fewshot_proto.train --model NAME`` followed by ``python -m fewshot_proto.evaluate --checkpoint``
  works for every name (in-process through ``main(argv)`` with a tiny ``--config`` YAML).

The list of models is never hard-coded: a newly registered model is picked up automatically. It runs with its
builder defaults unless ``TINY_KWARGS`` gives it smaller widths. The fine-tune baseline needs pretrained base
weights: a tiny U-Net checkpoint is saved first and passed as ``checkpoint`` (in the YAML for the CLI,
``model.kwargs.checkpoint``). ``maml_unet`` needs learn2learn and is skipped (importorskip) without it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

import fewshot_proto
from fewshot_proto.models import build_model

FEWSHOT = {"cwpa_unet", "cwpa_unet_matcher", "panet", "alpnet", "finetune"}
SUPERVISED = {"unet", "resupnet", "mobilenet_aspp_se_unet"}
NEEDS = {"maml_unet": "learn2learn"}  # optional dependency of a registered model
TEST_CLASSES = [2, 3]
SIZE = 64  # ResNet-34 (stride 16) and MobileNetV2 (stride 32) both accept it
TINY_UNET: Dict[str, Any] = {"base_channels": 4, "norm": "batch"}
#: Small widths so every model runs in about a second; models absent here use their builder defaults.
TINY_KWARGS: Dict[str, Dict[str, Any]] = {
    "unet": {"base_channels": 4},
    "resupnet": {"base_channels": 4},
    "mobilenet_aspp_se_unet": {"aspp_channels": 8, "aspp_out_channels": 16, "decoder_channels": [16, 8, 8, 8, 8]},
    "finetune": {"base": "unet", "base_kwargs": TINY_UNET, "steps": 2, "lr": 1e-2},
    "maml_unet": {"base_channels": 4, "inner_steps": 2},
}

NAMES = fewshot_proto.list_models()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    """A freshly saved tiny binary U-Net checkpoint: the fine-tune baseline's pretrained base."""
    from fewshot_proto.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = build_model("unet", **TINY_UNET)
    path = tmp_path_factory.mktemp("finetune_base") / "unet_base.pt"
    save_checkpoint(path, model=net, model_name="unet", model_config=dict(net.config), step=0)
    return path


@pytest.fixture(scope="module")
def phantoms():
    """Ten small phantom scans (64x64, 12-16 slices) in memory; labels 1 liver, 2/3 kidneys, 4 spleen."""
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.data.phantom import LABEL_NAMES, make_phantom_dataset

    return InMemoryDataset(make_phantom_dataset(n_scans=10, size=64, n_slices_range=(12, 16)), name="phantom-64",
                           label_names=LABEL_NAMES)


def _skip_if_missing(name: str) -> None:
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])


def tiny_model_kwargs(name: str, base_checkpoint: Path) -> Dict[str, Any]:
    kwargs = dict(TINY_KWARGS.get(name, {}))
    if name == "finetune":
        kwargs["checkpoint"] = str(base_checkpoint)
    if name in SUPERVISED:
        kwargs["classes"] = list(TEST_CLASSES)
    return kwargs


def tiny_model(name: str, base_checkpoint: Path) -> torch.nn.Module:
    _skip_if_missing(name)
    torch.manual_seed(0)
    return build_model(name, **tiny_model_kwargs(name, base_checkpoint))


def _state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_list_models_has_every_family_and_each_declares_its_kind_by_its_base_class():
    from fewshot_proto.engine.trainer import model_kind
    from fewshot_proto.models import get_model_class
    from fewshot_proto.models.base import FewShotSegmenter, SupervisedSegmenter

    assert NAMES == sorted(NAMES) and len(NAMES) == len(set(NAMES))
    assert FEWSHOT | SUPERVISED | set(NEEDS) == set(NAMES)
    for name in NAMES:
        cls = get_model_class(name)
        base = FewShotSegmenter if name in FEWSHOT | set(NEEDS) else SupervisedSegmenter
        assert issubclass(cls, base) and model_kind(name) == cls.kind == base.kind, name
    assert {model_kind(n) for n in SUPERVISED} == {"supervised"}
    assert {model_kind(n) for n in FEWSHOT} == {"fewshot"}


@pytest.mark.parametrize("name", NAMES)
def test_config_rebuilds_the_same_architecture(name, base_checkpoint):
    """``model.config`` is the recorded constructor kwargs: ``build_model(name, **config)`` gives the same state
    layout and the same config again (``weights`` is never part of it)."""
    model = tiny_model(name, base_checkpoint)
    again = build_model(name, **model.config)
    assert again.config == model.config and model.config.get("weights") is None
    assert {k: tuple(v.shape) for k, v in again.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", NAMES)
def test_one_tiny_episode_forward(name, base_checkpoint):
    model = tiny_model(name, base_checkpoint).eval()
    g = torch.Generator().manual_seed(1)
    s_img = torch.randn(2, 3, SIZE, SIZE, generator=g)
    s_mask = torch.zeros(2, SIZE, SIZE)
    s_mask[:, 16:40, 20:44] = 1.0
    q_img = torch.randn(3, 3, SIZE, SIZE, generator=g)
    extra = {"class_id": TEST_CLASSES[0]} if name in SUPERVISED else {}  # a K-class model: which class to score
    with torch.no_grad():
        out = model(s_img, s_mask, q_img, **extra)
    assert tuple(out.logits.shape) == (3, 2, SIZE, SIZE)
    assert torch.isfinite(out.logits).all()
    if hasattr(model, "segment_image"):  # supervised: one logit per target class plus background
        with torch.no_grad():
            full = model.segment_image(q_img)
        assert tuple(full.shape) == (3, 1 + len(TEST_CLASSES), SIZE, SIZE)
        assert torch.isfinite(full).all()


@pytest.mark.parametrize("name", NAMES)
def test_one_evaluation_scores_every_test_class_and_leaves_weights_unchanged(name, base_checkpoint, phantoms):
    from fewshot_proto.config import ProtocolConfig
    from fewshot_proto.engine import evaluate
    from fewshot_proto.engine.evaluator import protocol_specs

    model = tiny_model(name, base_checkpoint).eval()
    specs = protocol_specs(phantoms, ProtocolConfig(name="alpnet", setting=2, test_classes=TEST_CLASSES, fold=0))
    query = specs[0].query_scan
    specs = [s for s in specs if s.query_scan == query]  # one query scan, both test classes
    assert {s.class_id for s in specs} == set(TEST_CLASSES)
    before = _state(model)
    summary = evaluate(model, phantoms, specs, size=SIZE, distances=False)
    assert {r["class_id"] for r in summary["rows"]} == set(TEST_CLASSES)
    for r in summary["rows"]:
        assert math.isfinite(r["dice"]) and 0.0 <= r["dice"] <= 1.0, r
    assert math.isfinite(summary["mean_dice"])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), f"{name}: {k} changed during evaluation"
    if name == "finetune":
        assert model.adaptations >= len(TEST_CLASSES)  # it did adapt (copies), yet the base is bit-identical


# ---- the CLIs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory) -> Path:
    """Ten 64x64 phantoms written as NIfTI (the CLIs read datasets from disk)."""
    from fewshot_proto.data.phantom import ensure_phantoms

    return ensure_phantoms(tmp_path_factory.mktemp("cli_phantoms"), n_scans=10, size=64)


@pytest.mark.parametrize("name", NAMES)
def test_train_then_evaluate_cli(name, tmp_path, phantom_root, base_checkpoint, capsys):
    """``train --model NAME --iters 2`` then ``evaluate --checkpoint``; the YAML carries the tiny model kwargs
    (the fine-tune base checkpoint included: ``model.kwargs.checkpoint``)."""
    from fewshot_proto import evaluate as evaluate_cli
    from fewshot_proto import train as train_cli
    from fewshot_proto.config import apply_overrides, default_config, save_config

    _skip_if_missing(name)
    kwargs = tiny_model_kwargs(name, base_checkpoint)
    kwargs.pop("classes", None)  # supervised: the trainer sets classes = protocol.test_classes
    cfg = apply_overrides(default_config(), {
        "data.root": str(phantom_root), "data.size": SIZE, "model.name": name, "train.iters": 5,
        "train.ckpt_every": 0, "train.prefetch": 0, "train.device": "cpu", "train.threads": 1,
        "train.warmup_iters": 0, "train.precision": "fp32", "train.num_workers": 0,
        "supervised.batch_size": 2,
        "protocol.test_classes": TEST_CLASSES})
    cfg.model.kwargs = kwargs
    save_config(cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    rc = train_cli.main(["--config", str(tmp_path / "tiny.yaml"), "--model", name, "--iters", "2",
                         "--out", str(out), "--no-progress", "--no-eval"])
    assert rc == 0, capsys.readouterr().err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["model_name"] == name and ck["step"] == 2
    rc = evaluate_cli.main(["--checkpoint", str(out / "checkpoint.pt"), "--out", str(tmp_path / "ev"),
                            "--no-progress", "--no-overlays"])
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m["meta"]["model"] == name
    assert {r["class_id"] for r in m["rows"]} == set(TEST_CLASSES)
    assert all(r["dice"] is not None and 0.0 <= r["dice"] <= 1.0 for r in m["rows"])


# ---- shipped configs of the reference baselines ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["panet", "alpnet"])
def test_phantom_baseline_configs_load_and_differ_from_the_default_only_where_stated(name):
    """``configs/experiments/phantom_{panet,alpnet}.yaml``: the library's phantom default with the baseline's
    model, no cyclic loss and no Dice term (neither paper has one), alignment loss kept; nothing else differs."""
    from fewshot_proto.config import config_to_dict, default_config, load_config

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(root / "configs" / "experiments" / f"phantom_{name}.yaml")
    assert cfg.model.name == name and cfg.model.kwargs == {}
    assert cfg.train.lambda_cyc == 0.0 and cfg.train.lambda_dice == 0.0 and cfg.train.lambda_align == 1.0
    expected = default_config()
    expected.model.name = name
    expected.train.lambda_cyc = expected.train.lambda_dice = 0.0
    assert config_to_dict(cfg) == config_to_dict(expected)
    build_model(cfg.model.name, **cfg.model.kwargs)  # the config builds its model
