"""``data.class_names``: every layout's ``dataset.label_names``, the config winning over names on disk, and the
names reaching ``metrics.json`` / ``summary.md`` through the evaluator's fallback to ``dataset.label_names``."""
from __future__ import annotations

import json
import sys
import types
from typing import List

import numpy as np
import pytest
import torch

from fewshot_proto.config import DataConfig, ProtocolConfig, load_config
from fewshot_proto.data.readers import dataset_from_config, open_dataset

nib = pytest.importorskip("nibabel")

pytestmark = pytest.mark.usefixtures("one_thread")

CHAOS_NAMES = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}
SIZE = 16
#: scan id -> number of slices; class c fills box c of slices 1..Z-2
SCANS = {"1": 6, "2": 7, "3": 6, "4": 8}
BOX = {1: (slice(2, 6), slice(2, 6)), 2: (slice(9, 14), slice(8, 13))}


def _scan(n: int, label_offset: int = 0):
    """``(image, label)`` in file order ``(H, W, Z)``: grey value ``10 c + 1`` where the label is class ``c``, 1
    elsewhere (so a model that matches the support's masked mean is exactly right); stored labels are
    ``c + label_offset``."""
    lab = np.zeros((SIZE, SIZE, n), np.int16)
    for c, (r, q) in BOX.items():
        lab[r, q, 1:n - 1] = c
    img = (10.0 * lab + 1.0).astype(np.float32)
    stored = np.where(lab > 0, lab + label_offset, 0).astype(np.int16)
    return img, stored


@pytest.fixture
def alpnet_dir(tmp_path, write_nifti):
    """An SSL-ALPNet folder without ``labels.json`` (as CHAOS-T2 ships): no class names on disk."""
    root = tmp_path / "alp"
    for sid, n in SCANS.items():
        img, lab = _scan(n)
        write_nifti(root / f"image_{sid}.nii.gz", img)
        write_nifti(root / f"label_{sid}.nii.gz", lab)
    return root


@pytest.fixture
def msd_dir(tmp_path, write_nifti):
    root = tmp_path / "Task04"
    for sid in ("hip_001", "hip_002"):
        img, lab = _scan(6)
        write_nifti(root / "imagesTr" / f"{sid}.nii.gz", img)
        write_nifti(root / "labelsTr" / f"{sid}.nii.gz", lab)
    meta = {"labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "training": [{"image": f"./imagesTr/{s}.nii.gz", "label": f"./labelsTr/{s}.nii.gz"}
                         for s in ("hip_001", "hip_002")]}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_alpnet_folder_without_names_gets_them_from_the_config(alpnet_dir, tmp_path):
    assert dataset_from_config(DataConfig(root=str(alpnet_dir))).label_names == {}
    f = tmp_path / "x.yaml"
    f.write_text(f"data: {{root: {alpnet_dir}, class_names: {{'1': liver, 2: right_kidney}}}}\n")
    ds = dataset_from_config(load_config(f).data)
    assert ds.label_names == {1: "liver", 2: "right_kidney"}
    assert ds.load("1").meta["label_names"] == {1: "liver", 2: "right_kidney"}


def test_msd_config_names_win_over_dataset_json(msd_dir):
    assert dataset_from_config(DataConfig(root=str(msd_dir))).label_names == {1: "Anterior", 2: "Posterior"}
    ds = dataset_from_config(DataConfig(root=str(msd_dir), class_names={2: "tail"}))
    assert ds.label_names == {2: "tail"}  # replaced as a whole, not merged with dataset.json's


def test_class_names_name_the_values_after_label_map(tmp_path, write_nifti):
    """Files store 201/202; ``label_map`` makes them classes 1/2; ``class_names`` uses 1/2."""
    root = tmp_path / "ct"
    for sid in ("1", "2"):
        img, lab = _scan(6, label_offset=200)
        write_nifti(root / f"image_{sid}.nii.gz", img)
        write_nifti(root / f"label_{sid}.nii.gz", lab)
    cfg = DataConfig(root=str(root), label_map={201: 1, 202: 2}, class_names={1: "liver", 2: "spleen"})
    ds = dataset_from_config(cfg)
    assert ds.label_names == {1: "liver", 2: "spleen"}
    assert sorted(ds.slice_index(cache_dir=tmp_path / "cache").classes) == [1, 2]


def test_phantom_names_and_config_override(alpnet_dir, monkeypatch):
    """The phantoms name their classes (``phantom.json``); ``data.class_names`` replaces those too."""
    from fewshot_proto.data.phantom import LABEL_NAMES

    (alpnet_dir / "phantom.json").write_text(json.dumps({"label_names": {str(k): v for k, v in
                                                                         LABEL_NAMES.items()}}))
    fake = types.ModuleType("fewshot_proto.data.phantom")
    fake.ensure_phantoms = lambda cache_dir=None: alpnet_dir
    monkeypatch.setitem(sys.modules, "fewshot_proto.data.phantom", fake)
    assert dataset_from_config(DataConfig(root=None)).label_names == LABEL_NAMES
    assert dataset_from_config(DataConfig(root=None, class_names={1: "a"})).label_names == {1: "a"}
    assert open_dataset(None, label_names={2: "b"}).label_names == {2: "b"}


@pytest.mark.parametrize("name", ["chaos_t2_setting1_14_1shot", "chaos_t2_setting1_14_5shot",
                                  "chaos_t2_setting1_23_1shot", "chaos_t2_setting1_23_5shot",
                                  "chaos_t2_setting2_14_1shot", "chaos_t2_setting2_14_5shot",
                                  "chaos_t2_setting2_23_1shot", "chaos_t2_setting2_23_5shot"])
def test_shipped_chaos_configs_name_the_four_organs(name):
    """CHAOS-T2 in the SSL-ALPNet layout: 1 liver, 2 right kidney, 3 left kidney, 4 spleen
    (../shared/data/README.md)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    assert load_config(root / "configs" / "experiments" / f"{name}.yaml").data.class_names == CHAOS_NAMES


# ------------------------------------------------------------------------------ names reach the reports
def _match_model():
    """A few-shot model that predicts foreground where the query equals the support's masked mean grey value."""
    from fewshot_proto.models.base import FewShotSegmenter

    class Model(FewShotSegmenter):
        @property
        def input_multiple(self) -> int:
            return 1

        def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
            return [x[:, :1].clone()]

        def prototypes(self, feats, mask):
            g, m = feats[0][:, 0].float(), mask.float()
            return float(((g * m).sum((1, 2)) / m.sum((1, 2))).mean())

        def segment(self, q_feats, proto) -> torch.Tensor:
            fg = (q_feats[0][:, 0].float() - proto).abs() < 0.25
            logit = torch.where(fg, torch.tensor(20.0), torch.tensor(-20.0))
            return torch.stack([torch.zeros_like(logit), logit], dim=1)

        def forward(self, s_img, s_mask, q_img):  # pragma: no cover - evaluation never calls it
            raise AssertionError

    return Model()


def test_evaluate_reports_the_config_names_in_metrics_json_and_summary(alpnet_dir, tmp_path):
    from fewshot_proto.engine.evaluator import evaluate, protocol_specs
    from fewshot_proto.metrics.report import read_metrics_json

    f = tmp_path / "x.yaml"
    f.write_text(f"data: {{root: {alpnet_dir}, size: {SIZE}, normalise: none, "
                 f"class_names: {{'1': liver, '2': right kidney}}}}\n")
    cfg = load_config(f)
    ds = dataset_from_config(cfg.data)
    specs = protocol_specs(ds, ProtocolConfig(test_classes=[1, 2], n_folds=2))
    out = tmp_path / "eval"
    summary = evaluate(_match_model(), ds, specs, size=SIZE, out_dir=out, overlays=False, distances=False)
    assert summary["mean_dice"] == 1.0
    doc = read_metrics_json(out / "metrics.json")
    assert doc["classes"] == [{"class_id": 1, "class_name": "liver"}, {"class_id": 2, "class_name": "right kidney"}]
    assert {k: v["class_name"] for k, v in doc["per_class"].items()} == {"1": "liver", "2": "right kidney"}
    assert sorted({(r["class_id"], r["class_name"]) for r in doc["rows"]}) == [(1, "liver"), (2, "right kidney")]
    rows = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [r.split(" | ")[:3] for r in rows] == [["| 1", "liver", "2"], ["| 2", "right kidney", "2"]]
