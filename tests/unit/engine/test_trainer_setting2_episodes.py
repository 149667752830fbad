"""What episodic ``train()`` actually draws under Setting 2: every support and query slice of every episode comes
from a training scan of the fold and shows no test class, checked against the label volumes themselves (not the
SliceIndex the sampler is built from) for every ``episodes.mode`` (mixed, labelled, superpixel).

Test classes {1, 4} (liver, spleen): they show in most slices of a phantom, so a trainer that sampled Setting-1
slices would be caught within a few episodes (with {2, 3} only about one episode in six would show a kidney).
The registered few-shot model is swapped for a one-layer one: the test is about the episodes, not the network,
and a ResNet-34 step costs 0.3-1 s on a shared 2-core machine."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import pytest
import torch

import fewshot_proto.models as models_pkg
from fewshot_proto.engine import stream as stream_mod
from fewshot_proto.engine import trainer as trainer_mod
from fewshot_proto.models.base import FewShotSegmenter

pytestmark = pytest.mark.usefixtures("one_thread")

TEST_CLASSES = [1, 4]
ITERS = 8


class TinyFewShot(FewShotSegmenter):
    """A few-shot model of one 1x1 convolution over the query and its difference to the support's masked mean."""

    feature_losses = False

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 2, 1)

    @property
    def input_multiple(self) -> int:
        return 1

    def encode(self, x):
        return [x]

    def prototypes(self, feats, mask):
        return (feats[-1][:, :1] * mask[:, None]).sum() / mask.sum().clamp(min=1)

    def segment(self, feats, proto):
        q = feats[-1]
        return self.conv(torch.cat([q, q[:, :1] - proto], 1))


def _config(out, **over):
    from fewshot_proto.config import apply_overrides, default_config

    base = {"data.size": 32, "train.iters": ITERS, "train.num_workers": 0, "train.prefetch": 0,
            "train.ckpt_every": 0, "train.out": str(out), "train.device": "cpu", "train.precision": "fp32",
            "train.seed": 0, "protocol.setting": 2, "protocol.test_classes": TEST_CLASSES, "protocol.fold": 0,
            "protocol.n_folds": 5, "protocol.shots": 1}
    base.update(over)
    return apply_overrides(default_config(), base)


def _natural(ids):
    return sorted(ids, key=lambda s: (len(s), s)) if all(s.isdigit() for s in ids) else sorted(ids)


def _slices(meta: Dict[str, Any]):
    """``(role, scan, z)`` of every slice an episode was cut from (its ``meta`` provenance)."""
    assert len(meta["support_scans"]) == len(meta["support_z"]) == meta["shots"], meta
    out = [("support", str(s), int(z)) for s, z in zip(meta["support_scans"], meta["support_z"])]
    out += [("query", str(meta["query_scan"]), int(z)) for z in meta["query_z"]]
    return out


@pytest.mark.parametrize("mode", ["mixed", "labelled", "superpixel"])
def test_train_draws_setting2_episodes_from_training_scans_only(tmp_path, phantom_dataset, monkeypatch, mode):
    """Setting 2, test classes {1, 4}, fold 0 of 5 on the 20 phantoms, each ``episodes.mode``: the trainer draws one
    episode per step, and no support or query slice of any of them is from a query or support scan of the fold or
    contains a test class."""
    drawn: List[Dict[str, Any]] = []
    original = stream_mod.EpisodeSource.episode

    def recording(self, step):
        ep = original(self, step)
        drawn.append(dict(ep.meta, step=int(step)))
        return ep

    monkeypatch.setattr(stream_mod.EpisodeSource, "episode", recording)
    monkeypatch.setattr(models_pkg, "build_model", lambda name, **kw: TinyFewShot())
    monkeypatch.setattr(trainer_mod, "build_model", models_pkg.build_model, raising=False)
    res = trainer_mod.train(_config(tmp_path / "run", **{"episodes.mode": mode}), progress=False,
                            dataset=phantom_dataset)
    assert res.steps == ITERS and isinstance(res.model, TinyFewShot)
    assert sorted(m["step"] for m in drawn) == list(range(ITERS))

    # fold 0 of 5 (the documented rule): the first fifth of the naturally sorted scans are queries, the next scan
    # is the 1-shot support; training scans are all the others
    ids = _natural(list(phantom_dataset.ids))
    n_query = len(ids) // 5
    held_out = set(ids[: n_query + 1])
    train_scans = set(ids) - held_out

    violations = []
    for meta in drawn:
        assert meta["kind"] in ("labelled", "superpixel")
        if meta["kind"] == "labelled":
            assert int(meta["class_id"]) not in TEST_CLASSES, meta
        for role, scan, z in _slices(meta):
            if scan not in train_scans:
                violations.append(f"step {meta['step']}: {role} scan {scan} is held out (fold 0 query/support)")
                continue
            present = set(np.unique(phantom_dataset.load_label(scan)[z]).tolist())
            shown = sorted(present & set(TEST_CLASSES))
            if shown:
                violations.append(f"step {meta['step']} ({meta['kind']}): {role} slice {scan}:{z} shows test "
                                  f"class(es) {shown}")
    assert not violations, "\n".join(violations)
    kinds = {"mixed": {"labelled", "superpixel"}, "labelled": {"labelled"}, "superpixel": {"superpixel"}}[mode]
    assert {m["kind"] for m in drawn} == kinds  # with "mixed", both parts of the sampler were checked
