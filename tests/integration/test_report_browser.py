"""``report.html`` of a real ``evaluate`` run, opened in headless Chromium as a person would: it renders without
script or load errors, every image loads, the per-scan table shows the numbers of ``metrics.json``, and a
screenshot is saved under the test's temp folder.

Needs a Chromium binary (Debian's ``chromium``; ``.ci/run`` installs it with apt when absent). The test skips,
saying so, only where none is found.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from typing import List

import numpy as np
import pytest
import torch

from fewshot_proto.config import ProtocolConfig
from fewshot_proto.data import InMemoryDataset
from fewshot_proto.engine import evaluate
from fewshot_proto.engine.evaluator import protocol_specs
from fewshot_proto.models.base import FewShotSegmenter
from fewshot_proto.types import Volume

pytestmark = pytest.mark.usefixtures("one_thread")


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium found (apt-get install chromium); the report's browser check cannot run here")


class ShiftedTruth(FewShotSegmenter):
    """Predicts the query's bright region shifted by two columns: Dice below 1, false positives and negatives."""

    @property
    def input_multiple(self) -> int:
        return 1

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [x[:, :1]]

    def prototypes(self, feats, mask):
        return None

    def segment(self, feats, protos) -> torch.Tensor:
        fg = torch.roll(feats[-1][:, 0] > 0.5, shifts=2, dims=2).float()
        return torch.stack([torch.zeros_like(fg), 8 * fg - 4], dim=1)


def _dataset() -> InMemoryDataset:
    vols = []
    lps = np.diag([-1.5, -1.5, 4.0, 1.0])  # in-plane 1.5 mm, 4 mm slices, an LPS file like DICOM conversions
    for i in range(5):
        lab = np.zeros((8, 32, 32), np.int16)
        lab[2:6, 8 + i:18 + i, 10:20] = 2
        vols.append(Volume(id=str(i + 1), image=(lab > 0).astype(np.float32), label=lab, spacing=(4.0, 1.5, 1.5),
                           affine=lps, slice_axis=0))
    return InMemoryDataset(vols, name="toy", label_names={2: "right_kidney"})


class _Cells(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.body = {}
        self.cells = {}
        self._row = self._metric = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "tr" and "data-scan" in a:
            self._row = (a["data-scan"], int(a["data-class"]))
        if tag == "td" and self._row and "data-metric" in a:
            self._metric = a["data-metric"]

    def handle_data(self, data):
        if self._metric:
            self.cells[(*self._row, self._metric)] = data.strip()
            self._metric = None


def test_report_renders_in_chromium_with_the_numbers_of_metrics_json(tmp_path):
    browser = _browser()
    ds = _dataset()
    specs = protocol_specs(ds, ProtocolConfig(test_classes=[2], n_folds=5, fold=0))
    out = tmp_path / "eval"
    evaluate(ShiftedTruth(), ds, specs, size=32, out_dir=out, meta={"model": "shifted_truth", "dataset": "toy"})
    report = out / "report.html"
    doc = json.loads((out / "metrics.json").read_text())
    assert 0.0 < doc["rows"][0]["dice"] < 1.0

    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Cells()
    page.feed(dom.stdout)
    n_images = len(json.loads((out / "gallery" / "index.json").read_text()))
    assert n_images > 0
    assert page.body.get("data-errors") == "0", page.body
    assert page.body.get("data-images-loaded") == f"{n_images}/{n_images}", page.body
    for r in doc["rows"]:
        for m in doc["metrics"]:
            value = r[m]
            shown = "n/a" if value is None else f"{value:.4f}"
            assert page.cells[(r["scan"], r["class_id"], m)] == shown, (r["scan"], m)

    shot = tmp_path / "report.png"
    res = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--window-size=1280,1600", f"--screenshot={shot}", report.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, res.stderr[-2000:]
