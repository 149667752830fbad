"""Known-answer unit tests for evaluator helpers, killing mutants that survived mutation testing (mutmut 3.8.1)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fewshot_proto.engine.evaluator import _at_volume_resolution, _support_key
from fewshot_proto.engine.inference import SupportCache, check_model_classes
from fewshot_proto.errors import ProtocolError


def test_support_cache_counts_misses_and_evicts_least_recent():
    assert SupportCache().max_items == 64
    cache = SupportCache(max_items=2)
    assert cache.misses == 0
    made = []

    def make(v):
        return lambda: made.append(v) or v

    assert cache.get("a", make("A")) == "A"  # miss 1
    assert cache.get("b", make("B")) == "B"  # miss 2 (cache full at 2 items: nothing evicted)
    assert cache.get("a", make("X")) == "A"  # hit: "a" becomes most recent
    assert cache.get("c", make("C")) == "C"  # miss 3: evicts the least recent, "b"
    assert cache.get("a", make("Y")) == "A"  # still cached
    assert cache.get("b", make("B2")) == "B2"  # miss 4: "b" was evicted
    assert cache.misses == 4
    assert made == ["A", "B", "C", "B2"]


def test_support_key_known_tuple():
    spec = SimpleNamespace(class_id=2, support=[("3", [4, 5]), (7, (1,))])
    assert _support_key(spec) == (2, (("3", (4, 5)), ("7", (1,))))


def test_check_model_classes():
    asked = [1, 3]
    check_model_classes(SimpleNamespace(needs_support=False, classes=None), asked)  # binary: any class
    check_model_classes(SimpleNamespace(needs_support=True, classes=[1]), asked)  # few-shot: the support says
    with pytest.raises(ProtocolError, match=r"ask for class\(es\) \[3\]; evaluate it with --test-classes 1,2$"):
        check_model_classes(SimpleNamespace(needs_support=False, classes=[1, 2]), asked)


def test_at_volume_resolution_is_half_pixel_bilinear():
    # [1, 2, 2] -> [1, 4, 4], rows [0, 1]; align_corners=False samples source x = (x + 0.5) / 2 - 0.5:
    # -0.25 -> clamp 0 -> 0; 0.25 -> 0.25; 0.75 -> 0.75; 1.25 -> clamp 1 -> 1  (align_corners=True: 0, 1/3, 2/3, 1)
    probs = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])
    out = _at_volume_resolution(probs, SimpleNamespace(image=np.zeros((1, 4, 4))), size=2)
    np.testing.assert_allclose(out[0], np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-7)
    # same size: returned unchanged
    np.testing.assert_array_equal(_at_volume_resolution(probs, SimpleNamespace(image=np.zeros((1, 2, 2))), 2), probs.numpy())


# ------------------------------------------------------------------------------------------ evaluate() itself
# Reuses the toy construction of test_evaluator_known_answer (perfect fast-path model, alpnet, fold 0, 1 shot).
from fewshot_proto.data import InMemoryDataset  # noqa: E402
from fewshot_proto.engine.evaluator import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_eval():
    from test_evaluator_known_answer import SCANS, SIZE, FastPathModel, _specs, make_volume

    ds = InMemoryDataset([make_volume(s) for s in SCANS], name="toy")
    return ds, _specs(ds, 1), FastPathModel, SIZE


def test_evaluate_timing_label_names_and_default_distances(toy_eval):
    ds, specs, model_cls, size = toy_eval
    s = evaluate(model_cls(), ds, specs, size=size, batch_size=4, label_names={1: "liver", 2: "spleen"})
    # slab lengths of the query organs: scan 1: class 1 z2..13 (12), class 2 z5..11 (7);
    # scan 2: class 1 z1..9 (9), class 2 z3..16 (14) -> 42 query slices; 2 scans, 2 classes
    t = s["timing"]
    assert t["query_slices"] == 42
    assert t == {
        "seconds": t["seconds"],
        "query_slices": 42,
        "seconds_per_query_slice_per_class": t["seconds"] / 42,
        "seconds_per_volume": t["seconds"] / 2,
        "seconds_per_volume_per_class": t["seconds"] / 4,
    }
    assert s["meta"]["timing"] == t
    assert s["classes"] == [{"class_id": 1, "class_name": "liver"}, {"class_id": 2, "class_name": "spleen"}]
    # distances are on by default: the perfect model has HD95 = ASSD = 0 mm on every row
    assert [(r["hd95"], r["assd"]) for r in s["rows"]] == [(0.0, 0.0)] * 4


def test_evaluate_without_distances_leaves_nan(toy_eval):
    ds, specs, model_cls, size = toy_eval
    s = evaluate(model_cls(), ds, specs[:1], size=size, batch_size=4, distances=False)
    # one episode is enough to score; distances off -> NaN, Dice 1.0
    (row,) = s["rows"]
    assert row["dice"] == 1.0 and np.isnan(row["hd95"]) and np.isnan(row["assd"])


def test_evaluate_with_no_episodes(toy_eval):
    ds, _, model_cls, size = toy_eval
    with pytest.raises(ValueError, match=r"^evaluate: no episodes to score$"):
        evaluate(model_cls(), ds, [], size=size)


def test_evaluate_takes_class_names_from_the_dataset():
    from test_evaluator_known_answer import SCANS, SIZE, FastPathModel, _specs, make_volume

    ds = InMemoryDataset([make_volume(s) for s in SCANS], name="toy", label_names={1: "liver", 2: "spleen"})
    s = evaluate(FastPathModel(), ds, _specs(ds, 1)[:1], size=SIZE, batch_size=4, distances=False)
    # the first spec is class 1 of query scan 1 -> its name comes from the dataset
    assert s["classes"] == [{"class_id": 1, "class_name": "liver"}]


def test_an_empty_prediction_gives_nan_distances_counted_in_n_empty(toy_eval, tmp_path):
    """A model that predicts nothing: every row has exactly one empty mask, so HD95/ASSD are NaN (never +inf),
    ``one_empty`` is set and each class counts its scans in ``n_empty``, in the summary and in metrics.json."""
    import json

    ds, specs, model_cls, size = toy_eval

    class NothingModel(model_cls):
        def segment(self, q_feats, protos):
            logits = super().segment(q_feats, protos)
            return torch.stack([logits[:, 1].abs() + 1, logits[:, 1].abs() * 0], dim=1)

    s = evaluate(NothingModel(), ds, specs, size=size, batch_size=4, out_dir=tmp_path, overlays=False)
    assert [r["dice"] for r in s["rows"]] == [0.0] * 4
    assert all(np.isnan(r["hd95"]) and np.isnan(r["assd"]) and r["one_empty"] for r in s["rows"])
    doc = json.loads((tmp_path / "metrics.json").read_text())
    assert {c: v["n_empty"] for c, v in doc["per_class"].items()} == {"1": 2, "2": 2}
    assert doc["n_empty"] == 4 and doc["per_class"]["1"]["hd95"]["mean"] is None
    assert "one mask empty" in (tmp_path / "report.html").read_text()
