"""Supervised training of the baselines in the shared harness: labelled-scan selection, slice batches, losses,
learning, bit-for-bit resume, data isolation from query/support scans, and the train/evaluate CLIs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot_proto.config import ConfigError, apply_overrides, default_config, save_config
from fewshot_proto.engine import evaluate, train
from fewshot_proto.engine.evaluator import protocol_specs
from fewshot_proto.engine.supervised import (
    SliceBatchSampler,
    select_labelled_scans,
    supervised_losses,
    supervised_model_kwargs,
)
from fewshot_proto.episodes.protocol import fold_split
from fewshot_proto.errors import ProtocolError
from fewshot_proto.losses import dice_bce_loss
from fewshot_proto.models import build_model

UNET_SMALL = {"base_channels": 8, "norm": "batch"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms():
    """10 small phantom scans (64x64, 12-16 slices) in memory; labels 1 liver, 2/3 kidneys, 4 spleen."""
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.data.phantom import make_phantom_dataset

    return InMemoryDataset(make_phantom_dataset(n_scans=10, size=64, n_slices_range=(12, 16)), name="phantom-64")


def sup_cfg(out, **over):
    cfg = default_config()
    base = {"data.size": 64, "train.out": str(out), "train.iters": 8, "train.ckpt_every": 4, "train.log_every": 1,
            "train.prefetch": 1, "train.device": "cpu", "train.seed": 3, "train.precision": "fp32",
            "train.num_workers": 0,
            "model.name": "unet",
            "model.kwargs": dict(UNET_SMALL), "supervised.batch_size": 4}
    base.update(over)
    return apply_overrides(cfg, base)


# -- labelled-scan rule -------------------------------------------------------------------------------------


def test_select_labelled_scans_is_seeded_and_nested():
    scans = ["10", "2", "7", "1", "13", "4", "5"]
    natural = ["1", "2", "4", "5", "7", "10", "13"]
    assert select_labelled_scans(scans, None, seed=0) == natural
    perm = np.random.default_rng(5).permutation(len(natural))
    assert select_labelled_scans(scans, 3, seed=5) == [natural[i] for i in perm[:3]]  # the documented rule
    for seed in (0, 1, 2):
        chosen = [select_labelled_scans(scans, n, seed=seed) for n in range(1, 8)]
        for a, b in zip(chosen, chosen[1:]):
            assert b[:len(a)] == a  # nested: N scans are the first N of N+1
        assert sorted(chosen[-1]) == sorted(natural)
        assert select_labelled_scans(list(reversed(scans)), 4, seed=seed) == chosen[3]  # input order irrelevant
    assert len({tuple(select_labelled_scans(scans, 3, seed=s)) for s in range(6)}) > 1  # the seed matters
    for bad in (0, 8):
        with pytest.raises(ProtocolError, match="n_labelled"):
            select_labelled_scans(scans, bad)


# -- batches and losses -------------------------------------------------------------------------------------


def test_slice_batch_sampler(phantoms):
    index = phantoms.slice_index()
    scans = ["2", "5"]
    kw = dict(size=64, batch_size=6, fg_fraction=0.5, augment=True)
    s = SliceBatchSampler(phantoms, index, scans, [4, 2], rng=np.random.default_rng(0), **kw)
    b = s.sample()
    assert b.img.shape == (6, 3, 64, 64) and b.img.dtype == np.float32
    assert b.label.shape == (6, 64, 64) and b.label.dtype == np.int64
    assert set(np.unique(b.label)) <= {0, 1, 2}
    assert set(b.meta["scans"]) <= set(scans)
    assert s.n_fg == 3
    for scan, z in zip(b.meta["scans"][:3], b.meta["z"][:3]):  # forced slices show a target class
        assert z in index.slices_with_any([4, 2], scan)
    again = SliceBatchSampler(phantoms, index, scans, [4, 2], rng=np.random.default_rng(0), **kw).sample()
    assert np.array_equal(b.img, again.img) and np.array_equal(b.label, again.label)
    # without augmentation the targets are exactly the label map re-indexed (4 -> 1, 2 -> 2, others 0)
    plain = SliceBatchSampler(phantoms, index, scans, [4, 2], rng=np.random.default_rng(1), size=64, batch_size=3,
                              fg_fraction=1.0, augment=False).sample()
    for i, (scan, z) in enumerate(zip(plain.meta["scans"], plain.meta["z"])):
        lab = phantoms.load(scan).label[z]
        expected = np.where(lab == 4, 1, np.where(lab == 2, 2, 0))
        assert np.array_equal(plain.label[i], expected)
        assert plain.label[i].max() > 0


def test_supervised_losses_match_reference_losses():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (3, 8, 8), generator=g)
    z = torch.randn(3, 1, 8, 8, generator=g)
    logits = torch.cat([torch.zeros_like(z), z], 1)
    # K = 1, sigmoid head, per-slice Dice: exactly the seeds' Dice+BCE
    t = supervised_losses(logits, target, out_mode="sigmoid", pos_weight=3.0, batch_dice=False)
    torch.testing.assert_close(t["loss"], dice_bce_loss(z, target, pos_weight=3.0))
    # softmax head: CE is F.cross_entropy with class weights [1, w, w]
    logits3 = torch.randn(3, 3, 8, 8, generator=g)
    target3 = torch.randint(0, 3, (3, 8, 8), generator=g)
    t3 = supervised_losses(logits3, target3, out_mode="softmax", pos_weight=2.0, dice_weight=0.0, ce_weight=1.0)
    torch.testing.assert_close(t3["loss"], F.cross_entropy(logits3, target3, weight=torch.tensor([1.0, 2.0, 2.0])))
    # a perfect, confident prediction has (almost) zero Dice loss, per batch or per slice
    perfect = F.one_hot(target3, 3).movedim(-1, 1).float() * 40.0
    for batch_dice in (True, False):
        d = supervised_losses(perfect, target3, out_mode="softmax", batch_dice=batch_dice)["dice"]
        assert float(d) < 1e-4
    with pytest.raises(ValueError, match="out_mode"):
        supervised_losses(logits3, target3, out_mode="logits")


def test_model_classes_follow_the_protocol(tmp_path):
    cfg = sup_cfg(tmp_path, **{"protocol.test_classes": [1, 4]})
    assert supervised_model_kwargs(cfg)["classes"] == [1, 4]
    cfg.model.kwargs["classes"] = [4, 1]
    assert supervised_model_kwargs(cfg)["classes"] == [4, 1]  # explicit order kept
    cfg.model.kwargs["classes"] = [2, 3]
    with pytest.raises(ConfigError, match="test classes"):
        supervised_model_kwargs(cfg)
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(cfg, {"supervised.n_scans": 2})


# -- training -----------------------------------------------------------------------------------------------


def test_supervised_unet_learns(tmp_path, phantoms):
    cfg = sup_cfg(tmp_path / "run", **{"train.iters": 80, "train.lr": 3e-3, "train.scheduler": "none",
                                       "train.warmup_iters": 0, "train.log_every": 10, "train.ckpt_every": 0,
                                       "train.prefetch": 2, "protocol.test_classes": [1, 4],
                                       "supervised.batch_size": 8})
    specs = protocol_specs(phantoms, cfg.protocol)
    torch.manual_seed(0)
    untrained = build_model("unet", classes=[1, 4], **UNET_SMALL)
    base = evaluate(untrained, phantoms, specs, size=64, distances=False)
    res = train(cfg, progress=False, dataset=phantoms)
    assert res.kind == "supervised" and res.steps == 80
    assert res.model.classes == [1, 4]
    first, last = np.mean(res.losses[:10]), np.mean(res.losses[-10:])
    assert last < 0.85 * first, (first, last)
    after = evaluate(res.model, phantoms, specs, size=64, distances=False)
    assert {r["class_id"] for r in after["rows"]} == {1, 4}
    assert after["mean_dice"] > base["mean_dice"] + 0.2, (base["mean_dice"], after["mean_dice"])
    log = (tmp_path / "run" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,ce,dice,lr") and len(log) == 9
    split = fold_split(phantoms.slice_index(), 0, 5, 1)
    saved = json.loads((tmp_path / "run" / "labelled_scans.json").read_text())
    assert saved["scans"] == res.labelled_scans == sorted(split.train_scans, key=int)


def test_training_reads_only_the_labelled_scans(tmp_path, phantoms, monkeypatch):
    index = phantoms.slice_index()
    split = fold_split(index, 1, 5, 1)
    seen = set()
    real_load = phantoms.load

    def spy(scan_id):
        seen.add(str(scan_id))
        return real_load(scan_id)

    monkeypatch.setattr(phantoms, "load", spy)
    res = train(sup_cfg(tmp_path, **{"protocol.fold": 1, "supervised.n_labelled": 3, "supervised.selection_seed": 4,
                                     "train.iters": 6}), progress=False, dataset=phantoms)
    assert res.labelled_scans == select_labelled_scans(split.train_scans, 3, seed=4)
    assert seen and seen <= set(res.labelled_scans)
    assert not seen & (set(split.query_scans) | set(split.support_scans))


def test_supervised_resume_is_bit_for_bit(tmp_path, phantoms):
    # ResUpNet: sigmoid head, BN and dropout 0.3, so the global torch RNG state matters too
    over = {"model.name": "resupnet", "model.kwargs": {"base_channels": 4}, "supervised.n_labelled": 3,
            "supervised.pos_weight": 2.0}
    full = train(sup_cfg(tmp_path / "a", **over), progress=False, dataset=phantoms)
    part = train(sup_cfg(tmp_path / "b", **over), progress=False, dataset=phantoms, stop_after=5)
    assert part.steps == 5
    resumed = train(sup_cfg(tmp_path / "b", **over), progress=False, dataset=phantoms,
                    resume=tmp_path / "b" / "checkpoint.pt")
    assert resumed.steps == 8
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    assert full.losses[5:] == resumed.losses
    ck = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ck["model_config"]["classes"] == [2, 3] and ck["config"]["supervised"]["n_labelled"] == 3


def test_evaluate_rejects_classes_the_model_was_not_trained_for(phantoms):
    from fewshot_proto.config import ProtocolConfig

    model = build_model("unet", classes=[2, 3], base_channels=4)
    specs = protocol_specs(phantoms, ProtocolConfig(test_classes=[1, 4]))
    with pytest.raises(ProtocolError, match=r"segments classes \[2, 3\].*\[1, 4\]"):
        evaluate(model, phantoms, specs, size=64, distances=False)


def test_cli_train_then_evaluate(tmp_path, capsys):
    from fewshot_proto import evaluate as evaluate_cli
    from fewshot_proto import train as train_cli
    from fewshot_proto.data.phantom import ensure_phantoms

    root = ensure_phantoms(tmp_path / "cache", n_scans=10, size=64)
    cfg = sup_cfg(tmp_path / "unused", **{"data.root": str(root), "model.kwargs": {"base_channels": 4},
                                          "train.iters": 3})
    save_config(cfg, tmp_path / "sup.yaml")
    out = tmp_path / "run"
    rc = train_cli.main(["--config", str(tmp_path / "sup.yaml"), "--model", "unet", "--out", str(out),
                         "--no-progress", "--test-classes", "2,3", "--fold", "0"])
    assert rc == 0
    assert "Dice" in capsys.readouterr().out
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert {r["class_id"] for r in m["rows"]} == {2, 3}
    assert (out / "eval" / "summary.md").exists()

    rc = evaluate_cli.main(["--checkpoint", str(out / "checkpoint.pt"), "--protocol", "full-volume",
                            "--out", str(tmp_path / "ev"), "--no-progress", "--no-overlays"])
    assert rc == 0
    m2 = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert m2["meta"]["model"] == "unet" and m2["meta"]["protocol"] == "full-volume"
    assert {r["class_id"] for r in m2["rows"]} == {2, 3}
    capsys.readouterr()
    rc = evaluate_cli.main(["--checkpoint", str(out / "checkpoint.pt"), "--test-classes", "1,4",
                            "--out", str(tmp_path / "ev2"), "--no-progress", "--no-overlays"])
    assert rc == 2
    assert "segments classes [2, 3]" in capsys.readouterr().err
