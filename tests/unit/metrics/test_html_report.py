"""``metrics.html``: radiological orientation from the affine, gallery slice choice, panel colours, and the page
built from an evaluation folder (numbers equal to ``metrics.json``; rebuilt without a model)."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from fewshot_proto.metrics.html import (FN_COLOR, FP_COLOR, PRED_CONTOUR, TRUTH_CONTOUR, axis_codes,
                                        gallery_slices, radiological_view, render_panel, slice_dice,
                                        write_gallery, write_html_report)


def test_axis_codes_of_ras_and_lps_affines():
    assert axis_codes(np.eye(4)) == ("R", "A", "S")
    assert axis_codes(np.diag([-1.0, -1.0, 1.0, 1.0])) == ("L", "P", "S")
    oblique = np.array([[0.1, 0.0, -2.0, 0], [0.0, 0.9, 0.0, 0], [1.2, 0.0, 0.1, 0], [0, 0, 0, 1]])
    assert axis_codes(oblique) == ("S", "A", "L")


def _show(a, affine, slice_axis):
    t, fr, fc = radiological_view(affine, slice_axis)
    a = a.T if t else a
    a = a[::-1] if fr else a
    return a[:, ::-1] if fc else a


def test_radiological_view_puts_patient_right_left_and_anterior_top():
    # RAS+ file, axial slices (slice axis 2): H runs towards R, W towards A
    a = np.array([[1, 2], [3, 4]])  # a[1, 1] is the most right and most anterior voxel
    assert radiological_view(np.eye(4), 2) == (True, True, True)
    assert _show(a, np.eye(4), 2).tolist() == [[4, 2], [3, 1]]  # right-anterior at the top left
    # LPS file (as DICOM-derived NIfTI often are): H runs towards L, W towards P -> only a transpose
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    assert radiological_view(lps, 2) == (True, False, False)
    assert _show(a, lps, 2).tolist() == [[1, 3], [2, 4]]  # a[0, 0] (most right, most anterior) top left
    # coronal slices (slice axis 1 of a RAS file): columns right -> left, rows superior -> inferior
    assert radiological_view(np.eye(4), 1) == (True, True, True)


def test_gallery_picks_first_middle_last_and_worst():
    truth = np.zeros((7, 4, 4), bool)
    pred = np.zeros((7, 4, 4), bool)
    truth[1:6, 1:3, 1:3] = True
    pred[1:6, 1:3, 1:3] = True
    pred[4, 1:3, 1:3] = False  # slice 4 missed entirely: Dice 0
    pred[6, 0, 0] = True  # a false positive outside the organ: Dice 0 too, later
    assert slice_dice(truth[4], pred[4]) == 0.0 and np.isnan(slice_dice(truth[0], pred[0]))
    assert gallery_slices(truth, pred) == [("first", 1), ("middle", 3), ("worst", 4), ("last", 5)]
    truth[:] = False
    pred[:] = False
    pred[6, 0, 0] = True  # only a false positive: the prediction's extent, one slice with every tag
    assert gallery_slices(truth, pred) == [("first, middle, last, worst", 6)]


def test_panel_colours_fp_fn_and_contours():
    img = np.full((4, 4), 100.0)
    img[0, 0] = 0.0  # min-max scaling: 0 -> 0, 100 -> 255
    truth = np.zeros((4, 4), bool)
    pred = np.zeros((4, 4), bool)
    truth[1:3, 0:2] = True
    pred[1:3, 1:3] = True
    panel = np.asarray(render_panel(img, truth, pred, min_size=8))  # x2: 8x8, truth rows 2-5 cols 0-3,
    assert panel.shape == (8, 8, 3)                                  # prediction rows 2-5 cols 2-5
    fp_fill = tuple(int(round(0.5 * 255 + 0.5 * c)) for c in FP_COLOR)
    fn_fill = tuple(int(round(0.5 * 255 + 0.5 * c)) for c in FN_COLOR)
    assert tuple(panel[7, 7]) == (255, 255, 255)  # no mask: the grey value
    assert tuple(panel[0, 0]) == (0, 0, 0)
    assert tuple(panel[2, 0]) == TRUTH_CONTOUR  # the truth's edge, outside the prediction
    assert tuple(panel[2, 5]) == PRED_CONTOUR  # the prediction's edge, outside the truth
    assert tuple(panel[3, 4]) == fp_fill  # inside the prediction only
    assert tuple(panel[3, 1]) == fn_fill  # inside the truth only
    assert tuple(panel[2, 2]) == PRED_CONTOUR  # both edges: the prediction's is drawn last


def test_panel_keeps_the_pixel_aspect():
    img = np.random.default_rng(0).random((10, 20))
    panel = render_panel(img, np.zeros((10, 20), bool), np.zeros((10, 20), bool), pixel_mm=(2.0, 1.0), min_size=40)
    assert panel.size == (40, 40)  # 10 rows of 2 mm and 20 columns of 1 mm: a square


class _Tables(HTMLParser):
    """Cells of the per-scan table, keyed by (scan, class, metric)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells = {}
        self._row = None
        self._metric = None
        self.images = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-scan" in a:
            self._row = (a["data-scan"], int(a["data-class"]))
        if tag == "td" and self._row and "data-metric" in a:
            self._metric = a["data-metric"]
        if tag == "img":
            self.images += 1
            assert a["src"].startswith("data:image/png;base64,")

    def handle_data(self, data):
        if self._metric:
            self.cells[(*self._row, self._metric)] = data
            self._metric = None

    def handle_endtag(self, tag):
        if tag == "tr":
            self._row = None


def test_report_numbers_are_those_of_metrics_json_and_rebuild_without_a_model(tmp_path):
    from fewshot_proto.metrics import MetricTable
    from fewshot_proto.metrics.report import write_report

    rng = np.random.default_rng(1)
    table = MetricTable(class_names={2: "right_kidney"})
    items = []
    for scan in ("1", "2"):
        truth = np.zeros((5, 16, 16), bool)
        truth[1:4, 4:10, 5:11] = True
        pred = np.roll(truth, int(rng.integers(1, 3)), axis=2)
        table.add_prediction(pred, truth, scan=scan, class_id=2, spacing=(3.0, 1.0, 1.0), zs=list(range(5)))
        items.append({"scan": scan, "class_id": 2, "zs": np.arange(5), "image": rng.random((5, 16, 16)),
                      "truth": truth, "pred": pred, "affine": np.eye(4), "slice_axis": 0,
                      "spacing": (3.0, 1.0, 1.0)})
    write_report(tmp_path, table, {"model": "toy", "dataset": "toy", "protocol": "alpnet"})
    index = write_gallery(tmp_path, items, {2: "right_kidney"})
    # every scored slice 1..3 has the same Dice: the first of them is the worst
    assert [(g["scan"], g["z"], g["tag"]) for g in index] == [
        ("1", 1, "first, worst"), ("1", 2, "middle"), ("1", 3, "last"),
        ("2", 1, "first, worst"), ("2", 2, "middle"), ("2", 3, "last")]
    assert all((tmp_path / g["file"]).is_file() and g["class_name"] == "right_kidney" for g in index)
    path = write_html_report(tmp_path)
    page = path.read_text()
    doc = json.loads((tmp_path / "metrics.json").read_text())
    parser = _Tables()
    parser.feed(page)
    assert parser.images == len(index) > 0
    for r in doc["rows"]:
        for m in ("dice", "iou", "precision", "recall"):
            assert parser.cells[(r["scan"], r["class_id"], m)] == f"{r[m]:.4f}"
    assert "Evaluation: toy on toy" in page and "right_kidney, scan 1, slice" in page
    # rebuilt later from the folder alone: the same page
    (tmp_path / "report.html").unlink()
    assert write_html_report(tmp_path).read_text() == page
    assert re.search(r"<script>.*data-images-loaded", page, flags=re.S)


def test_report_without_gallery(tmp_path):
    from fewshot_proto.metrics import MetricTable
    from fewshot_proto.metrics.report import write_report

    table = MetricTable()
    truth = np.zeros((2, 4, 4), bool)
    truth[0, 1, 1] = True
    table.add_prediction(truth, truth, scan="7", class_id=1, spacing=(1, 1, 1), zs=[0, 1])
    write_report(tmp_path, table, {})
    page = write_html_report(tmp_path).read_text()
    assert "<img " not in page and "1.0000" in page


def test_missing_metrics_json_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        write_html_report(tmp_path)


def test_reports_are_readable_by_everyone(tmp_path):
    import stat

    from fewshot_proto.metrics.report import atomic_write_text

    path = atomic_write_text(tmp_path / "r.html", "<p>x</p>")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and path.read_text() == "<p>x</p>"
