"""``evaluate`` against a known answer: toy volumes whose grey values encode (class, chunk), and a few-shot model that
can only be right when the evaluator feeds query chunk ``k`` the support slice of chunk ``k``.

Construction (no resizing, no normalisation: ``InMemoryDataset`` at the model's input size of 32 px):

* in every scan, the voxels of class ``c`` in the slices of chunk ``k`` of that class' z-slab have the grey value
  ``f(c, k) = 10 c + k + 1`` (11, 12, 13 for class 1; 21, 22, 23 for class 2), background 0;
* chunk ``k`` of a slice is the field's rule (SSL-ALPNet ``part_assign``), written out here independently of the
  library: ``int((z - zmin) // ((zmax - zmin) / n_part))`` clamped to ``[0, n_part - 1]``; the support slices are
  at the chunk centres ``zs[floor((2k + 1) len(zs) / (2 n_part))]``;
* two background pixels carry a marker of where the slice came from: ``[0, 0] = 1000 + scan``, ``[0, 1] = 500 + z``.

The model takes the support's masked mean grey value (averaged over shots) and predicts foreground exactly where
the query equals it. So the Dice is 1.0 for every scan and class if and only if every query slice of chunk ``k``
was predicted from support chunk ``k`` (a slice of another chunk holds another grey value). The model also
records, from the markers and grey values, which support slices and chunk each query slice was predicted from, and
every slice it encoded.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from fewshot_proto.config import ProtocolConfig
from fewshot_proto.data import InMemoryDataset
from fewshot_proto.engine.evaluator import evaluate, protocol_specs
from fewshot_proto.models.base import FewShotSegmenter
from fewshot_proto.types import Volume

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
N_PART = 3
TEST_CLASSES = (1, 2)
#: class -> in-plane box (rows, cols) it occupies in every slice of its slab
BOX = {1: (slice(4, 12), slice(4, 12)), 2: (slice(16, 28), slice(14, 28))}
#: scan id -> (Z, {class: (zmin, zmax)}): slabs of different lengths and offsets, classes overlapping in z
SCANS: Dict[str, Tuple[int, Dict[int, Tuple[int, int]]]] = {
    "1": (16, {1: (2, 13), 2: (5, 11)}),
    "2": (18, {1: (1, 9), 2: (3, 16)}),
    "3": (14, {1: (3, 12), 2: (0, 8)}),
    "4": (17, {1: (4, 15), 2: (6, 12)}),
    "5": (15, {1: (0, 10), 2: (2, 14)}),
    "6": (16, {1: (5, 14), 2: (1, 7)}),
}
#: three folds of two scans: fold 0 queries "1", "2"; its support scans are the next ones, "3" (and "4" for 2-shot)
N_FOLDS = 3
QUERY_SCANS = ["1", "2"]
SUPPORT_SCANS = {1: ["3"], 2: ["3", "4"]}
BATCH = 4  # query slices per forward pass: small enough that every scan needs several batches


def grey(c: int, k: int) -> float:
    return float(10 * c + k + 1)


def decode(value: float) -> Tuple[int, int]:
    """Grey value -> (class, chunk)."""
    v = int(round(value)) - 1
    return v // 10, v % 10


def chunk_of(z: int, zmin: int, zmax: int, n_part: int = N_PART) -> int:
    """The field's query chunk rule (SSL-ALPNet ``part_assign``), independent of the library."""
    if zmax == zmin:
        return 0
    return min(max(int((z - zmin) // ((zmax - zmin) / n_part)), 0), n_part - 1)


def support_z(zmin: int, zmax: int, k: int, n_part: int = N_PART) -> int:
    """The support slice of chunk ``k``: the chunk centre ``zs[floor((2k+1) len / (2 n_part))]``."""
    zs = list(range(zmin, zmax + 1))
    return zs[(2 * k + 1) * len(zs) // (2 * n_part)]


def make_volume(scan: str) -> Volume:
    n, slabs = SCANS[scan]
    img = np.zeros((n, SIZE, SIZE), np.float32)
    lab = np.zeros((n, SIZE, SIZE), np.int16)
    for c, (zmin, zmax) in slabs.items():
        rows, cols = BOX[c]
        for z in range(zmin, zmax + 1):
            img[z, rows, cols] = grey(c, chunk_of(z, zmin, zmax))
            lab[z, rows, cols] = c
    # a training class that is never evaluated, with a grey value no test class has
    img[:, 28:31, 2:6], lab[:, 28:31, 2:6] = 7.0, 3
    img[:, 0, 0] = 1000 + int(scan)
    img[:, 0, 1] = 500 + np.arange(n)
    return Volume(id=scan, image=img, label=lab, spacing=(2.0, 1.0, 1.0))


@pytest.fixture(scope="module")
def toy():
    ds = InMemoryDataset([make_volume(s) for s in SCANS], name="toy")
    for s, (_, slabs) in SCANS.items():  # the construction itself: support slice k lies in the support's chunk k
        for c, (zmin, zmax) in slabs.items():
            assert [chunk_of(support_z(zmin, zmax, k), zmin, zmax) for k in range(N_PART)] == list(range(N_PART))
    return ds


# --------------------------------------------------------------------------------------------------- the model
def markers(x: torch.Tensor) -> List[Tuple[str, int]]:
    """``[N, C, H, W]`` (or ``[N, H, W]``) slices -> their ``(scan, z)`` markers."""
    g = x[:, 0] if x.dim() == 4 else x
    return [(str(int(round(float(s[0, 0]))) - 1000), int(round(float(s[0, 1]))) - 500) for s in g]


class _Log:
    """What the model saw: every encode call and, per predicted query slice, the support it was predicted from."""

    def __init__(self) -> None:
        self.encodes: List[List[Tuple[str, int]]] = []
        self.predictions: List[Dict] = []


def _prototype(s_img: torch.Tensor, s_mask: torch.Tensor):
    """Per-shot masked mean grey value, and the shots' markers."""
    g = s_img[:, 0].float()
    m = s_mask.float()
    per_shot = (g * m).sum((1, 2)) / m.sum((1, 2))
    return {"value": float(per_shot.mean()), "per_shot": [float(v) for v in per_shot], "support": markers(s_img)}


def _segment(log: _Log, q_img: torch.Tensor, proto) -> torch.Tensor:
    g = q_img[:, 0].float()
    fg = (g - proto["value"]).abs() < 0.25
    for (scan, z) in markers(q_img):
        log.predictions.append({"query": (scan, z), "support": list(proto["support"]),
                                "decoded": [decode(v) for v in proto["per_shot"]]})
    fg_logit = torch.where(fg, torch.tensor(20.0), torch.tensor(-20.0))
    return torch.stack([torch.zeros_like(fg_logit), fg_logit], dim=1)


class FastPathModel(FewShotSegmenter):
    """``encode / prototypes / segment`` (the model contract): the query slices are encoded once per scan."""

    def __init__(self) -> None:
        super().__init__()
        self.log = _Log()

    @property
    def input_multiple(self) -> int:
        return 1

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        self.log.encodes.append(markers(x))
        return [x[:, :1].clone()]

    def prototypes(self, feats: List[torch.Tensor], mask: torch.Tensor):
        return _prototype(feats[0], mask)

    def segment(self, q_feats: List[torch.Tensor], protos) -> torch.Tensor:
        return _segment(self.log, q_feats[0], protos)

    def forward(self, s_img, s_mask, q_img):  # pragma: no cover - evaluation never calls it
        raise AssertionError("evaluation must not call forward")


class ForwardOnlyModel(torch.nn.Module):
    """Only ``forward(support_img, support_mask, query_img)``: not a model of the contract."""

    def forward(self, s_img, s_mask, q_img):  # pragma: no cover - refused before any call
        raise AssertionError("must be refused")


# --------------------------------------------------------------------------------------------------- the tests
def _specs(ds, shots: int):
    return protocol_specs(ds, ProtocolConfig(name="alpnet", setting=2, test_classes=list(TEST_CLASSES), fold=0,
                                             n_folds=N_FOLDS, n_part=N_PART, shots=shots))


def test_a_model_outside_the_contract_is_refused_with_what_to_subclass(toy):
    with pytest.raises(TypeError, match="ForwardOnlyModel is not a fewshot_proto model: subclass "
                                        "fewshot_proto.models.base.FewShotSegmenter or SupervisedSegmenter"):
        evaluate(ForwardOnlyModel(), toy, _specs(toy, 1), size=SIZE)


@pytest.mark.parametrize("shots", [1, 2], ids=["1shot", "2shot"])
def test_dice_is_exactly_one_and_query_chunk_k_uses_support_slice_k(toy, shots):
    """Dice (and HD95) is exactly perfect for every query scan and class, and every query slice of chunk ``k`` was
    predicted from support slice ``k`` of every support scan (decoded from the support's markers and grey values),
    exactly once per class; 1-shot and 2-shot."""
    model = FastPathModel()
    specs = _specs(toy, shots)
    assert sorted({s.query_scan for s in specs}) == QUERY_SCANS
    assert all(s.support_scans == SUPPORT_SCANS[shots] for s in specs)

    summary = evaluate(model, toy, specs, size=SIZE, batch_size=BATCH, distances=True)

    rows = {(r["scan"], r["class_id"]): r for r in summary["rows"]}
    assert sorted(rows) == [(q, c) for q in QUERY_SCANS for c in TEST_CLASSES]
    for key, r in rows.items():
        assert r["dice"] == 1.0 and r["fp"] == 0 and r["fn"] == 0, (key, r)
        assert r["hd95"] == 0.0, (key, r)
        zmin, zmax = SCANS[key[0]][1][key[1]]
        assert r["n_slices"] == zmax - zmin + 1  # alpnet scores the query organ's whole slab
    assert summary["mean_dice"] == 1.0

    # which support each query slice was predicted from, keyed by (class decoded from the support, query slice)
    seen: Dict[Tuple[int, str, int], List[Dict]] = defaultdict(list)
    for p in model.log.predictions:
        classes = {c for c, _ in p["decoded"]}
        assert len(classes) == 1, p  # every shot of one call is the same class
        seen[(classes.pop(), *p["query"])].append(p)
    expected_keys = set()
    for q in QUERY_SCANS:
        for c in TEST_CLASSES:
            qmin, qmax = SCANS[q][1][c]
            for z in range(qmin, qmax + 1):
                expected_keys.add((c, q, z))
                calls = seen[(c, q, z)]
                assert len(calls) == 1, f"class {c} query {q} z={z} predicted {len(calls)} times"
                k = chunk_of(z, qmin, qmax)
                want = [(s, support_z(*SCANS[s][1][c], k)) for s in SUPPORT_SCANS[shots]]
                assert calls[0]["support"] == want, (c, q, z, k)
                assert calls[0]["decoded"] == [(c, k)] * shots, (c, q, z, k)
    assert set(seen) == expected_keys


@pytest.mark.parametrize("batch", [BATCH, 64], ids=["batched", "one_batch"])
def test_each_query_slice_is_encoded_once_for_all_classes(toy, batch):
    """The inference path's promise: the query slices of a scan are encoded ONCE for every test class, in batches of
    ``batch_size``; support prototypes are computed once per (class, chunk) and reused by every query scan."""
    model = FastPathModel()
    specs = _specs(toy, shots=2)
    evaluate(model, toy, specs, size=SIZE, batch_size=batch, distances=False)

    query_calls = [e for e in model.log.encodes if e[0][0] in QUERY_SCANS]
    support_calls = [e for e in model.log.encodes if e[0][0] not in QUERY_SCANS]
    for q in QUERY_SCANS:
        # the union of the two classes' slabs: both classes are scored on these slices, encoded once, not twice
        union = sorted({z for c in TEST_CLASSES for z in range(SCANS[q][1][c][0], SCANS[q][1][c][1] + 1)})
        calls = [e for e in query_calls if {s for s, _ in e} == {q}]
        encoded = Counter(z for e in calls for _, z in e)
        assert sorted(encoded) == union and set(encoded.values()) == {1}, f"query {q}: {encoded}"
        # the query volume is encoded in one pass cut into batches of `batch` slices: ceil(slices / batch) encode
        # calls (exactly one per query scan when the batch holds all its slices, as with batch=64 here)
        assert len(calls) == math.ceil(len(union) / batch), (q, len(union), batch)
    assert sum(len({s for s, _ in e}) for e in query_calls) == len(query_calls)  # no call mixes two query scans
    if batch >= 64:
        assert len(query_calls) == len(QUERY_SCANS)
    # support: one encode of the 2 shots per (class, chunk), shared by both query scans
    assert len(support_calls) == len(TEST_CLASSES) * N_PART
    assert all([s for s, _ in e] == SUPPORT_SCANS[2] for e in support_calls)
