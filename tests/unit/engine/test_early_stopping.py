"""Early stopping of the supervised baselines (``supervised.val_scans``): which scans are held out, the validation
Dice against hand-computed values, the patience rule, ``best.pt`` and the best weights at the end, resume, and
what the CLI prints."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fewshot_proto.config import ConfigError, apply_overrides, default_config
from fewshot_proto.engine import train
from fewshot_proto.engine.checkpoint import load_checkpoint
from fewshot_proto.engine.supervised import (EarlyStopping, SupervisedTask, select_labelled_scans,
                                             select_validation_scans, validation_dice)
from fewshot_proto.errors import ProtocolError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def phantoms():
    from fewshot_proto.data import InMemoryDataset
    from fewshot_proto.data.phantom import make_phantom_dataset

    return InMemoryDataset(make_phantom_dataset(n_scans=10, size=32, n_slices_range=(12, 13)), name="phantom-32")


def es_cfg(out, **over):
    base = {"data.size": 32, "train.out": str(out), "train.iters": 12, "train.ckpt_every": 0, "train.log_every": 1,
            "train.prefetch": 0, "train.num_workers": 0, "train.device": "cpu", "train.seed": 1,
            "train.precision": "fp32", "model.name": "unet", "model.kwargs": {"base_channels": 4, "norm": "batch"},
            "supervised.batch_size": 2, "supervised.n_labelled": 2, "supervised.val_scans": 1,
            "supervised.val_every": 2, "supervised.patience": 2, "train.max_seconds": None}
    base.update(over)
    return apply_overrides(default_config(), base)


# -- which scans ----------------------------------------------------------------------------------------------
def test_validation_scans_are_the_end_of_the_selection_permutation():
    scans = ["10", "2", "7", "1", "13", "4", "5"]
    natural = ["1", "2", "4", "5", "7", "10", "13"]
    perm = [natural[i] for i in np.random.default_rng(4).permutation(7)]
    assert select_validation_scans(scans, 2, seed=4) == perm[-2:]
    assert select_validation_scans(scans, 0, seed=4) == []
    # labelled scans: the start of the same permutation, never a validation scan, nested in n
    for n in range(1, 6):
        assert select_labelled_scans(scans, n, seed=4, val_scans=2) == perm[:n]
    assert select_labelled_scans(scans, None, seed=4, val_scans=2) == [s for s in natural if s not in perm[-2:]]
    with pytest.raises(ProtocolError, match=r"between 1 and the 7 training scans of this fold less the 2 "
                                            r"validation scan\(s\)"):
        select_labelled_scans(scans, 6, seed=4, val_scans=2)
    with pytest.raises(ProtocolError, match="val_scans must leave at least one of the 7 training scans"):
        select_validation_scans(scans, 7)


def test_config_validates_the_early_stopping_keys():
    for key, value in (("supervised.val_scans", -1), ("supervised.val_every", 0), ("supervised.patience", 0)):
        with pytest.raises(ConfigError, match=rf"{key} = {value}: must be an integer"):
            apply_overrides(default_config(), {key: value})


# -- the patience rule ------------------------------------------------------------------------------------------
def test_early_stopping_keeps_the_strict_best_and_counts_patience():
    es = EarlyStopping(every=10, patience=2)
    assert [es.update(s, v) for s, v in ((10, 0.2), (20, 0.5), (30, 0.5), (40, 0.4))] == [True, True, False, False]
    assert (es.best, es.best_step, es.bad, es.stop) == (0.5, 20, 2, True)
    again = EarlyStopping(10, 2).load(json.loads(json.dumps(es.state())))
    assert again.state() == es.state() and again.stop
    es2 = EarlyStopping(10, 2)
    es2.update(10, 0.1)
    es2.update(20, 0.0)
    assert es2.update(30, 0.3) and es2.bad == 0 and not es2.stop  # an improvement resets the count


# -- validation Dice, by hand -------------------------------------------------------------------------------------
class _Fixed(torch.nn.Module):
    """segment_image: class 1 channel wins on the left half of every slice, class 2 nowhere."""

    def segment_image(self, x):
        b, _, h, w = x.shape
        logits = torch.zeros(b, 3, h, w)
        logits[:, 1, :, : w // 2] = 1.0
        return logits


class _Cache:
    def __init__(self, labels):
        self.labels = labels

    def get(self, scan, z):
        lab = self.labels[scan][z]
        return np.zeros(lab.shape, np.float32), lab


def test_validation_dice_is_the_mean_over_scans_and_classes_of_volume_dice():
    a = np.zeros((2, 4, 4), np.uint8)
    a[0, :, :1] = 7  # class 7 (channel 1): 4 px, all inside the predicted left half (16 px over 2 slices)
    b = np.zeros((1, 4, 4), np.uint8)
    b[0, 0, :] = 9   # class 9 (channel 2): 4 px, never predicted
    cache = _Cache({"a": a, "b": b})
    got = validation_dice(_Fixed(), cache, ["a", "b"], {"a": 2, "b": 1}, [7, 9], device=torch.device("cpu"),
                          batch=1)
    # scan a: class 7 2*4/(16+4) = 0.4; class 9 absent and not predicted -> 1. scan b: class 7 absent but
    # predicted on 8 px -> 0; class 9 missed -> 0
    assert got == pytest.approx((0.4 + 1.0 + 0.0 + 0.0) / 4, abs=1e-12)


# -- in the trainer -------------------------------------------------------------------------------------------------
def test_training_stops_after_patience_and_ends_with_the_best_weights(tmp_path, phantoms, monkeypatch):
    values = iter([0.1, 0.3, 0.2, 0.3, 0.25, 0.9])  # validations at steps 2, 4, 6, 8, ...: best 0.3 at step 4
    monkeypatch.setattr(SupervisedTask, "validate", lambda self, model: next(values))
    res = train(es_cfg(tmp_path / "run"), progress=False, dataset=phantoms)
    assert res.steps == 8  # 0.2 at step 6 and 0.3 (not above 0.3) at step 8: patience 2 exhausted
    es = res.early_stopping
    assert (es["best"], es["best_step"], es["bad"], es["stopped"]) == (0.3, 4, 2, True)
    assert es["history"] == [[2, 0.1], [4, 0.3], [6, 0.2], [8, 0.3]]
    assert res.validation_scans == es["validation_scans"] and len(res.validation_scans) == 1
    assert res.validation_scans[0] not in res.labelled_scans
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    last = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (best["step"], best["metrics"]["val_dice"], last["step"]) == (4, 0.3, 8)
    assert last["metrics"]["early_stopping"]["best_step"] == 4
    own = res.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in best["model"].items())  # the run ends with best.pt's weights
    assert any(not torch.equal(own[k], v) for k, v in last["model"].items())
    assert json.loads((tmp_path / "run" / "validation.json").read_text())["best_step"] == 4
    labelled = json.loads((tmp_path / "run" / "labelled_scans.json").read_text())
    assert labelled["validation_scans"] == res.validation_scans


def test_a_resumed_run_validates_and_stops_as_an_uninterrupted_one(tmp_path, phantoms):
    cfg = es_cfg(tmp_path / "a", **{"supervised.patience": 3, "train.ckpt_every": 2})
    full = train(cfg, progress=False, dataset=phantoms)
    part = train(es_cfg(tmp_path / "b", **{"supervised.patience": 3, "train.ckpt_every": 2}), progress=False,
                 dataset=phantoms, stop_after=4)
    assert part.steps == 4
    resumed = train(es_cfg(tmp_path / "b", **{"supervised.patience": 3, "train.ckpt_every": 2}), progress=False,
                    dataset=phantoms, resume=tmp_path / "b" / "checkpoint.pt")
    assert resumed.steps == full.steps and resumed.early_stopping["history"] == full.early_stopping["history"]
    assert len(full.early_stopping["history"]) == full.steps // 2  # a real validation every 2 steps
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_says_which_weights_it_evaluates(tmp_path, capsys, monkeypatch):
    from fewshot_proto import train as train_cli
    from fewshot_proto.data.phantom import ensure_phantoms

    root = ensure_phantoms(tmp_path / "cache", n_scans=10, size=32)
    values = iter([0.5, 0.4, 0.3])
    monkeypatch.setattr(SupervisedTask, "validate", lambda self, model: next(values))
    out = tmp_path / "run"
    rc = train_cli.main(["--data", str(root), "--model", "unet", "--out", str(out), "--no-progress", "--iters", "20",
                         "--device", "cpu", "--set", "data.size=32", "train.num_workers=0", "train.prefetch=0",
                         "train.precision=fp32", "train.ckpt_every=0", "model.kwargs={base_channels: 4}",
                         "supervised.batch_size=2", "supervised.val_scans=1", "supervised.val_every=1",
                         "supervised.patience=2"])
    assert rc == 0
    text = capsys.readouterr().out
    val = json.loads((out / "labelled_scans.json").read_text())["validation_scans"][0]
    assert (f"early stopping on {val}: best validation Dice 0.5000 at step 1; stopped after 2 validations without "
            f"improvement; evaluating {out / 'best.pt'}") in text
    assert "trained 3 episodes" in text and "s cap" not in text
    meta = json.loads((out / "eval" / "metrics.json").read_text())["meta"]
    assert meta["checkpoint"] == str(out / "best.pt")
