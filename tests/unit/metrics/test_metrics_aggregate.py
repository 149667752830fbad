"""Aggregation: nan-aware per-class stats, mean over classes, across folds, one-empty-mask counts, bootstrap."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_proto.metrics.aggregate import MetricRow, MetricTable, bootstrap_ci, nan_stats
from fewshot_proto.metrics.overlap import ScanCounts

NAN = float("nan")


def _table(**kw) -> MetricTable:
    t = MetricTable(class_names={1: "liver", 2: "kidney"}, **kw)
    # scan b: exactly one mask empty -> no distance (NaN), flagged one_empty
    for scan, d, h, one in [("a", 0.5, 1.0, False), ("b", 0.7, NAN, True), ("c", NAN, 3.0, False)]:
        t.add(MetricRow(scan=scan, class_id=1, dice=d, hd95=h, one_empty=one))
    for scan, d in [("a", 0.2), ("b", 0.4)]:
        t.add(MetricRow(scan=scan, class_id=2, dice=d, hd95=2.0))
    return t


def test_nan_stats_known_values():
    s = nan_stats([0.5, NAN, 0.7])
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert set(s) == {"mean", "std", "n", "n_valid"} and (s["n"], s["n_valid"]) == (3, 2)
    assert nan_stats([0.5, 0.7], ddof=1)["std"] == pytest.approx(math.sqrt(0.02))
    s = nan_stats([NAN, NAN])
    assert math.isnan(s["mean"]) and s["n_valid"] == 0
    # an infinity only comes from a caller's explicit choice: mean inf, std NaN (no warning)
    s = nan_stats([1.0, float("inf"), 3.0])
    assert s["mean"] == float("inf") and math.isnan(s["std"]) and s["n_valid"] == 3


def test_per_class_and_overall():
    t = _table()
    pc = t.per_class(("dice", "hd95"))
    assert pc[1]["dice"]["mean"] == pytest.approx(0.6)
    assert pc[1]["dice"]["std"] == pytest.approx(0.1)
    assert pc[1]["dice"]["n_valid"] == 2 and pc[1]["dice"]["n"] == 3
    assert pc[2]["dice"]["mean"] == pytest.approx(0.3)
    # hd95 of class 1: scans a (1.0) and c (3.0); b has one empty mask (NaN) -> mean 2.0 over 2 valid of 3
    assert pc[1]["hd95"] == {"mean": 2.0, "std": 1.0, "n": 3, "n_valid": 2}
    ov = t.overall(("dice",))
    assert ov["dice"]["mean"] == pytest.approx(0.45)  # mean of class means, not of the 4 valid rows (0.45 too)
    assert ov["dice"]["std"] == pytest.approx(0.15)
    assert ov["dice"]["n_classes"] == 2
    assert t.overall(("hd95",))["hd95"] == {"mean": 2.0, "std": 0.0, "n_classes": 2}  # class means 2.0 and 2.0


def test_summary_counts_one_empty_scans_and_names_the_convention():
    s = _table().summary(("dice", "hd95"))
    assert s["n_empty"] == 1
    assert s["per_class"]["1"]["n_empty"] == 1 and s["per_class"]["2"]["n_empty"] == 0
    assert s["per_class"]["1"]["hd95"]["mean"] == 2.0  # finite: the one-empty scan is left out, not +inf
    assert s["surface_distance"]["tag"] == "hd95=max-of-directed-p95;assd=pooled-mean;mm"
    medpy = MetricTable(hd_reduction="pooled", assd_reduction="mean")
    medpy.add(MetricRow(scan="a", class_id=1))
    assert medpy.summary()["surface_distance"]["tag"] == "hd95=pooled-p95;assd=mean-of-directed-means;mm"
    with pytest.raises(ValueError, match=r"^hd95 reduction must be 'max' or 'pooled'; got 'mean'$"):
        MetricTable(hd_reduction="mean")
    with pytest.raises(ValueError, match=r"^assd reduction must be 'pooled' or 'mean'; got 'max'$"):
        MetricTable(assd_reduction="max")


def test_overall_weights_classes_equally():
    t = MetricTable()
    for i in range(3):
        t.add(MetricRow(scan=str(i), class_id=1, dice=0.9))
    t.add(MetricRow(scan="0", class_id=2, dice=0.3))
    assert t.overall(("dice",))["dice"]["mean"] == pytest.approx(0.6)  # not (0.9*3 + 0.3) / 4 = 0.75


def test_across_folds_and_summary_layout():
    t = MetricTable(class_names={1: "liver"})
    t.add(MetricRow(scan="1", class_id=1, fold=0, dice=0.5))
    t.add(MetricRow(scan="2", class_id=1, fold=0, dice=0.7))
    t.add(MetricRow(scan="3", class_id=1, fold=1, dice=0.9))
    af = t.across_folds(("dice",))
    assert af["folds"] == [0, 1]
    assert af["per_class"][1]["dice"]["mean"] == pytest.approx(0.75)
    assert af["per_class"][1]["dice"]["std"] == pytest.approx(0.15)
    assert af["overall"]["dice"]["n_folds"] == 2
    s = t.summary()
    assert s["per_class"]["1"]["dice"]["mean"] == pytest.approx(0.7)  # pooled over scans
    assert s["per_class"]["1"]["class_name"] == "liver" and s["per_class"]["1"]["n_scans"] == 3
    assert s["folds"]["0"]["per_class"]["1"]["dice"]["mean"] == pytest.approx(0.6)
    assert s["folds"]["1"]["overall"]["dice"]["mean"] == pytest.approx(0.9)
    assert s["across_folds"]["overall"]["dice"]["mean"] == pytest.approx(0.75)
    assert "folds" not in _table().summary()


def test_duplicate_rows_rejected():
    t = MetricTable()
    t.add(MetricRow(scan="1", class_id=1, fold=0))
    t.add(MetricRow(scan="1", class_id=1, fold=1))
    with pytest.raises(ValueError, match="duplicate"):
        t.add(MetricRow(scan="1", class_id=1, fold=0))


def test_add_prediction_uses_volume_counts_and_distances():
    truth = np.zeros((4, 6, 6), dtype=bool)
    pred = np.zeros_like(truth)
    truth[1:3, 1:4, 1:4] = True  # 18 voxels
    pred[1:3, 1:4, 1:3] = True  # 12 voxels, all inside
    t = MetricTable(class_names={3: "spleen"})
    r = t.add_prediction(pred, truth, scan="5", class_id=3, fold=2, spacing=(3.0, 1.0, 1.0), extra={"support": "1"})
    assert (r.tp, r.fp, r.fn, r.n_slices) == (12, 0, 6, 4)
    assert r.dice == pytest.approx(24 / 30) and r.recall == pytest.approx(12 / 18) and r.precision == 1.0
    assert r.class_name == "spleen" and r.extra == {"support": "1"}
    assert r.hd95 == pytest.approx(1.0) and 0 < r.assd < 1.0 and r.one_empty is False
    r2 = t.add_prediction(pred, truth, scan="6", class_id=3, zs=slice(3, 4), distances=False)
    assert math.isnan(r2.dice) and math.isnan(r2.hd95) and r2.n_slices == 1
    r3 = t.add_prediction(pred, truth, scan="7", class_id=3, zs=slice(3, 4), empty=1.0)
    assert r3.dice == 1.0 and math.isnan(r3.hd95) and r3.one_empty is False  # both empty: not counted
    r4 = t.add_prediction(np.zeros_like(pred), truth, scan="9", class_id=3)
    assert math.isnan(r4.hd95) and math.isnan(r4.assd) and r4.one_empty is True and r4.dice == 0.0
    r5 = t.add_prediction(np.zeros_like(pred), truth, scan="10", class_id=3, distances=False)
    assert r5.one_empty is False  # no distances scored, nothing to flag
    assert t.summary()["per_class"]["3"]["n_empty"] == 1
    with pytest.raises(ValueError, match="label == 3"):
        t.add_prediction(pred, truth.astype(np.int64) * 3, scan="8", class_id=3)


def test_row_from_counts():
    r = MetricRow.from_counts(ScanCounts("9", 4, tp=3, fp=1, fn=2, n_slices=5, fold=1), class_name="x")
    assert (r.scan, r.class_id, r.fold, r.n_slices) == ("9", 4, 1, 5)
    assert r.dice == pytest.approx(6 / 9) and r.iou == pytest.approx(0.5)


def test_bootstrap_is_seeded_and_sensible():
    vals = [0.2, 0.4, 0.6, 0.8, NAN]
    a = bootstrap_ci(vals, n_boot=500, seed=3)
    b = bootstrap_ci(vals, n_boot=500, rng=np.random.default_rng(3))
    assert a == b
    assert 0.2 <= a[0] < 0.5 < a[1] <= 0.8
    assert bootstrap_ci([0.7, 0.7, 0.7]) == (pytest.approx(0.7), pytest.approx(0.7))
    assert all(math.isnan(x) for x in bootstrap_ci([NAN]))
    t = _table()
    s1 = t.summary(bootstrap=200, seed=1)
    s2 = t.summary(bootstrap=200, seed=1)
    ci = s1["per_class"]["1"]["dice"]["ci"]
    assert ci == s2["per_class"]["1"]["dice"]["ci"]
    assert 0.5 <= ci[0] <= 0.6 <= ci[1] <= 0.7
    lo, hi = s1["overall"]["dice"]["ci"]
    assert lo <= 0.45 <= hi
    assert s1["bootstrap"] == {"level": 0.95, "n_boot": 200, "seed": 1}


def test_unknown_metric_and_bad_bootstrap():
    with pytest.raises(ValueError, match="unknown metric"):
        _table().per_class(("hausdorff",))
    with pytest.raises(ValueError, match="level"):
        bootstrap_ci([1.0], level=1.5)
