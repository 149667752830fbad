"""Known-answer tests that kill mutants which survived mutation testing (mutmut 3.8.1) of
``metrics/overlap.py``, ``metrics/distance.py`` and ``metrics/aggregate.py``.

Every expected number is worked out by hand in the comment next to it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_proto.metrics.aggregate import MetricRow, MetricTable, bootstrap_ci, nan_stats
from fewshot_proto.metrics.distance import (
    assd,
    hd95,
    surface,
    surface_distance_convention,
    surface_distances,
    surface_metrics,
)
from fewshot_proto.metrics.overlap import (
    ScanCounts,
    as_mask,
    confusion,
    dice,
    foreground_slab,
    iou,
    precision,
    recall,
    select_z,
)


class RowRng:
    """Stand-in for ``np.random.Generator``: ``integers(low, high, size=(n_boot, n))`` returns a draw matrix
    whose row k repeats the single index ``low + k % (high - low)`` (numpy's ``integers(n)`` == ``integers(0, n)``
    convention is kept). Bootstrap mean k is then the value of unit k, so percentiles are hand-computable."""

    def __init__(self, fixed=None):
        self.fixed = fixed  # when set, every draw is this index

    def integers(self, low, high=None, size=None):
        if high is None:
            low, high = 0, low
        n_boot, n = size
        if self.fixed is not None:
            return np.full((n_boot, n), self.fixed, dtype=np.int64)
        rows = low + np.arange(n_boot) % (high - low)
        return np.repeat(rows, n).reshape(n_boot, n)


# ------------------------------------------------------------------------------------------- overlap.py
def test_as_mask_rejects_float32_probabilities():
    # float32 is a floating dtype too: 0.5 is not 0/1 -> ValueError (mutant: issubdtype(dtype, None) only
    # matched float64)
    with pytest.raises(ValueError):
        as_mask(np.array([0.0, 0.5], dtype=np.float32))


def test_select_z_accepts_most_negative_index():
    # n = 3: index -3 is the first slice (valid Python indexing) -> [10]
    assert select_z(np.array([10, 11, 12]), [-3]).tolist() == [10]


def test_foreground_slab_two_d_and_long_slab():
    # 2-D mask [Z=3, W=2], foreground only at z=1 -> slice(1, 2)
    assert foreground_slab(np.array([[0, 0], [0, 1], [0, 0]])) == slice(1, 2)
    # 1-D mask, foreground at z=1,2,3 -> slice(1, 4) (last foreground slice 3, plus one)
    assert foreground_slab(np.array([0, 1, 1, 1, 0])) == slice(1, 4)


def test_confusion_on_one_d_arrays():
    # pred [1,0,1], truth [1,1,0]: tp = 1 (index 0), fp = 1 (index 2), fn = 1 (index 1)
    assert confusion(np.array([1, 0, 1]), np.array([1, 1, 0])) == (1, 1, 1)


def test_confusion_cls_applies_to_prediction_label_map():
    # label 2 only: pred==2 at {0}, truth==2 at {0,1}: tp 1, fp 0, fn 1 (pred label 1 at index 2 ignored;
    # with cls ignored for pred, index 2 would be a false positive)
    assert confusion(np.array([2, 0, 1]), np.array([2, 2, 0]), cls=2) == (1, 0, 1)


def test_ratio_with_unit_denominator():
    # precision = tp / (tp + fp) = 1 / (1 + 0) = 1.0 (denominator exactly 1)
    assert precision(1, 0, 5) == 1.0
    # iou = 1 / (1 + 0 + 0) = 1.0
    assert iou(1, 0, 0) == 1.0


def test_scalar_tp_with_array_fp_broadcasts():
    # dice(1, [0, 2], 0) = [2/(2+0), 2/(2+2)] = [1.0, 0.5]
    np.testing.assert_array_equal(dice(1, np.array([0, 2]), 0), [1.0, 0.5])


@pytest.mark.parametrize("fn_", [dice, iou, precision, recall])
def test_array_in_any_position_gives_array(fn_):
    # tp=[1,1], fp=0, fn=0 -> every metric is 1/1 = 1.0 per element (an array, not a float)
    np.testing.assert_array_equal(fn_(np.array([1, 1]), 0, 0), [1.0, 1.0])
    # tp=1, fp=[0,0], fn=0 -> [1.0, 1.0] (recall = 1/(1+0), precision = 1/(1+0))
    np.testing.assert_array_equal(fn_(1, np.array([0, 0]), 0), [1.0, 1.0])
    # tp=1, fp=0, fn=[0,0] -> [1.0, 1.0]
    np.testing.assert_array_equal(fn_(1, 0, np.array([0, 0])), [1.0, 1.0])
    # scalars in -> a Python float out: 1/1 = 1.0
    out = fn_(1, 0, 0)
    assert isinstance(out, float) and out == 1.0


def test_negative_counts_rejected_in_each_position():
    with pytest.raises(ValueError):
        dice(1, -1, 0)
    with pytest.raises(ValueError):
        dice(1, 0, -1)


@pytest.mark.parametrize("fn_", [dice, iou, precision, recall])
def test_one_fp_one_fn_is_zero_not_empty(fn_):
    # tp=0, fp=1, fn=1: not both-empty (0+1+1 = 2 != 0), so every score is 0/positive = 0.0, not ``empty``
    assert fn_(0, 1, 1, empty=1.0) == 0.0


def test_scan_counts_from_masks_label_and_fold():
    pred = np.array([[2, 1, 0]])
    truth = np.array([[2, 2, 0]])
    c = ScanCounts.from_masks(pred, truth, scan="s", class_id=2, label=2, fold=3)
    # label 2: pred {0}, truth {0,1} -> tp 1, fp 0, fn 1 (pred label 1 at index 1 is not class 2)
    assert (c.tp, c.fp, c.fn, c.n_slices, c.fold) == (1, 0, 1, 1, 3)


def test_scan_counts_add():
    a = ScanCounts("s", 1, tp=1, fp=2, fn=3, n_slices=1, fold=0)
    b = ScanCounts("s", 1, tp=10, fp=20, fn=30, n_slices=2, fold=0)
    # element-wise sums: tp 11, fp 22, fn 33, n_slices 3; identity fields kept
    assert a + b == ScanCounts("s", 1, tp=11, fp=22, fn=33, n_slices=3, fold=0)


def test_scan_counts_empty_rule_forwarded():
    c = ScanCounts("s", 1)  # tp = fp = fn = 0: both masks empty -> every score is ``empty`` = 1.0
    assert c.iou(empty=1.0) == 1.0
    assert c.precision(empty=1.0) == 1.0
    assert c.recall(empty=1.0) == 1.0
    assert c.scores(empty=1.0) == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0}
    assert c.to_dict() == {"scan": "s", "class_id": 1, "tp": 0, "fp": 0, "fn": 0, "n_slices": 0, "fold": None}


# ------------------------------------------------------------------------------------------ distance.py
# 2-D "plus": centre (1,1) and its four face neighbours. With connectivity 1 (cross) the centre is interior,
# so the surface is the 4 arms; with connectivity 2 (full 3x3) the centre has background diagonals -> 5.
PLUS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
CENTRE = np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)


def test_surface_connectivity_two():
    assert int(surface(PLUS, connectivity=1).sum()) == 4
    assert int(surface(PLUS, connectivity=2).sum()) == 5


def test_distances_connectivity_forwarded():
    # conn 1: d(P->T) = 4 arms at 1 mm, d(T->P) = centre to nearest arm 1 mm -> pooled ASSD 5/5 = 1.0,
    #         pooled 0th percentile = 1.0
    # conn 2: P surface also has the centre (0 mm): d(P->T) = [1,1,1,1,0], d(T->P) = [0] -> ASSD 4/6 = 2/3,
    #         0th percentile = 0.0
    sp = (1.0, 1.0)
    assert assd(PLUS, CENTRE, sp) == 1.0
    assert assd(PLUS, CENTRE, sp, connectivity=2) == pytest.approx(2.0 / 3.0, abs=1e-12)
    assert hd95(PLUS, CENTRE, sp, percentile=0.0) == 1.0
    assert hd95(PLUS, CENTRE, sp, percentile=0.0, connectivity=2) == 0.0
    assert surface_metrics(PLUS, CENTRE, sp)["assd"] == 1.0  # default connectivity is 1
    assert surface_metrics(PLUS, CENTRE, sp, connectivity=2)["assd"] == pytest.approx(2.0 / 3.0, abs=1e-12)


def test_percentile_bounds():
    # percentile 0.5 (in [0, 1)) is legal: distances are all 1.0 here -> 1.0
    assert hd95(PLUS, CENTRE, (1.0, 1.0), percentile=0.5) == 1.0
    with pytest.raises(ValueError):
        hd95(PLUS, CENTRE, (1.0, 1.0), percentile=100.5)


def test_options_validated_even_when_masks_empty():
    e = np.zeros((2, 2), dtype=bool)
    for kw in ({"method": "bogus"}, {"percentile": 150.0}, {"reduction": "bogus"}):
        with pytest.raises(ValueError):
            hd95(e, e, (1.0, 1.0), **kw)
    for kw in ({"method": "bogus"}, {"reduction": "bogus"}):
        with pytest.raises(ValueError):
            assd(e, e, (1.0, 1.0), **kw)
    for kw in ({"method": "bogus"}, {"hd_reduction": "bogus"}, {"assd_reduction": "bogus"}):
        with pytest.raises(ValueError):
            surface_metrics(e, e, (1.0, 1.0), **kw)


def _slab_pair():
    # [Z=3, H=1, W=5]; every voxel is surface (H = 1). pred at (0,0,0) and (2,0,4); truth at (0,0,2).
    pred = np.zeros((3, 1, 5), dtype=bool)
    truth = np.zeros((3, 1, 5), dtype=bool)
    pred[0, 0, 0] = pred[2, 0, 4] = True
    truth[0, 0, 2] = True
    return pred, truth


@pytest.mark.parametrize(
    "zs", [slice(0, 2), slice(0, 2, 1), np.array([True, True, False]), [0, 1]], ids=["slice", "step1", "bool", "idx"]
)
def test_distance_slab_selection(zs):
    # slab z in {0,1}: pred (0,0,0), truth (0,0,2) -> both directed distances 2 mm -> HD95 = ASSD = 2.0
    # (the whole volume would add pred (2,0,4) at sqrt(8) mm)
    pred, truth = _slab_pair()
    assert hd95(pred, truth, zs=zs) == 2.0
    assert assd(pred, truth, zs=zs) == 2.0
    d_pt, d_tp = surface_distances(pred, truth, zs=zs)
    assert d_pt.tolist() == [2.0] and d_tp.tolist() == [2.0]


def test_distance_slab_rejects_bad_selectors():
    pred, truth = _slab_pair()
    with pytest.raises(ValueError):
        hd95(pred, truth, zs=slice(0, 3, 2))  # step 2: not contiguous
    with pytest.raises(ValueError):
        hd95(pred, truth, zs=np.array([True, True]))  # 2 flags for 3 slices


def _label_pair():
    # [1, 1, 10] label maps. label 2: pred x=0, truth x=2 (2 mm apart). label 1: pred x=9, truth x=5.
    pred = np.zeros((1, 1, 10), dtype=np.int64)
    truth = np.zeros((1, 1, 10), dtype=np.int64)
    pred[0, 0, 0], pred[0, 0, 9] = 2, 1
    truth[0, 0, 2], truth[0, 0, 5] = 2, 1
    return pred, truth


def test_distance_cls_selects_label():
    # cls=2: single voxels 2 mm apart -> d(P->T) = d(T->P) = [2] -> HD95 = ASSD = 2.0
    # (cls ignored: foreground {0,9} vs {2,5} -> distances [2,4,2,4], ASSD 3.0)
    pred, truth = _label_pair()
    assert hd95(pred, truth, cls=2) == 2.0
    assert assd(pred, truth, cls=2) == 2.0
    assert surface_metrics(pred, truth, cls=2) == {"hd95": 2.0, "assd": 2.0, "empty_masks": 0}
    d_pt, d_tp = surface_distances(pred, truth, cls=2)
    assert d_pt.tolist() == [2.0] and d_tp.tolist() == [2.0]


def test_surface_distances_one_empty_gives_empty_arrays():
    pred, truth = _slab_pair()
    d_pt, d_tp = surface_distances(np.zeros_like(pred), truth)
    assert d_pt.size == 0 and d_tp.size == 0
    d_pt, d_tp = surface_distances(np.zeros_like(pred), np.zeros_like(truth))
    assert d_pt.size == 0 and d_tp.size == 0


# ----------------------------------------------------------------------------------------- aggregate.py
def test_nan_stats_std_needs_more_than_ddof_values():
    # 2 valid values, ddof 2: n_valid (2) is not > ddof (2) -> std NaN (numpy would give inf); mean (1+3)/2 = 2
    s = nan_stats([1.0, 3.0], ddof=2)
    assert s["mean"] == 2.0 and math.isnan(s["std"])


def test_bootstrap_ci_percentiles_known():
    # 201 values 0..200; RowRng makes bootstrap mean k = value k, so the means are 0..200.
    # level 0.95 -> percentiles 2.5 and 97.5 -> positions 0.025*200 = 5 and 0.975*200 = 195 -> (5.0, 195.0)
    assert bootstrap_ci(np.arange(201.0), n_boot=201, rng=RowRng()) == pytest.approx((5.0, 195.0), abs=1e-9)
    # defaults: n_boot 1000, seed 0 -> identical to an explicit default_rng(0)
    v = [0.1, 0.5, 0.9, 0.3]
    assert bootstrap_ci(v) == bootstrap_ci(v, n_boot=1000, rng=np.random.default_rng(0))


def test_bootstrap_checks():
    # n_boot = 1 is legal; every draw (RowRng row 0) picks value 0 -> mean 7.0 -> (7.0, 7.0)
    assert bootstrap_ci([7.0, 9.0], n_boot=1, rng=RowRng()) == (7.0, 7.0)
    for level in (0.0, 1.0):
        with pytest.raises(ValueError):
            bootstrap_ci([7.0, 9.0], level=level)


def _counts(scan="s", cls=1, fold=None):
    return ScanCounts(scan, cls, tp=1, fp=2, fn=3, n_slices=1, fold=fold)


def test_metric_row_from_counts_fields():
    r = MetricRow.from_counts(_counts(), class_name="liver")
    # dice = 2*1/(2+2+3) = 2/7; the counts are copied
    assert (r.class_name, r.tp, r.fp, r.fn) == ("liver", 1, 2, 3)
    assert r.dice == pytest.approx(2.0 / 7.0, abs=1e-15)
    assert MetricRow.from_counts(_counts()).class_name == ""


def test_table_class_names():
    t = MetricTable()
    r = t.add_counts(_counts("a", 1))
    assert r.class_name == ""  # unknown class, no name given
    assert t.class_name(99) == ""
    t.add_counts(_counts("a", 2), class_name="liver")
    assert t.class_name(2) == "liver"  # a named row registers its class name
    assert t.rows[1].class_name == "liver"


def test_add_prediction_integer_masks_and_options():
    t = MetricTable()
    pred = np.zeros((1, 1, 5), dtype=np.int64)
    truth = np.zeros((1, 1, 5), dtype=np.int64)
    pred[0, 0, 0] = 1
    truth[0, 0, 2] = 1
    # int 0/1 masks are binary masks; z spacing irrelevant (one slice), x spacing 1 -> voxels 2 mm apart
    # spacing (1, 1, 3): x spacing 3 mm -> 6 mm. dice 0 (no overlap).
    r = t.add_prediction(pred, truth, scan="a", class_id=1, fold=3, spacing=(1.0, 1.0, 3.0), class_name="liver")
    assert (r.fold, r.class_name, r.hd95, r.assd, r.dice) == (3, "liver", 6.0, 6.0, 0.0)
    # one mask empty -> one_empty_distance (flagged); both empty -> both_empty_distance (not flagged)
    r = t.add_prediction(np.zeros_like(pred), truth, scan="b", class_id=1, one_empty_distance=99.0)
    assert (r.hd95, r.assd, r.one_empty) == (99.0, 99.0, True)
    r = t.add_prediction(np.zeros_like(pred), np.zeros_like(truth), scan="c", class_id=1, both_empty_distance=0.0)
    assert (r.hd95, r.assd, r.one_empty) == (0.0, 0.0, False)
    with pytest.raises(ValueError):
        t.add_prediction(pred * 2, truth, scan="d", class_id=1)  # label value 2 is not binary


def test_add_prediction_uses_the_table_convention():
    # the line segments of test_metrics_distance (truth x 0..9, prediction x 0..4, x spacing 2 mm):
    # MONAI (default) HD95 9.1 / ASSD 2.0; medpy pooled HD95 8.6 / mean-of-means ASSD 1.5
    truth = np.zeros((1, 1, 20), dtype=bool)
    truth[0, 0, :10] = True
    pred = np.zeros_like(truth)
    pred[0, 0, :5] = True
    sp = (3.0, 5.0, 2.0)
    r = MetricTable().add_prediction(pred, truth, scan="a", class_id=1, spacing=sp)
    assert (r.hd95, r.assd) == (pytest.approx(9.1, abs=1e-12), 2.0)
    t = MetricTable(hd_reduction="pooled", assd_reduction="mean")
    r = t.add_prediction(pred, truth, scan="a", class_id=1, spacing=sp)
    assert (r.hd95, r.assd) == (pytest.approx(8.6, abs=1e-12), 1.5)


def _fold_table(**kw):
    t = MetricTable(**kw)
    # class 1: fold 0 scans a (dice .2), b (dice .4); fold 1 scan c (dice .8). class 2: fold 1 scan c (dice .6)
    t.add(MetricRow("a", 1, fold=0, dice=0.2))
    t.add(MetricRow("b", 1, fold=0, dice=0.4))
    t.add(MetricRow("c", 1, fold=1, dice=0.8))
    t.add(MetricRow("c", 2, fold=1, dice=0.6))
    return t


def test_per_class_skips_absent_class_and_uses_ddof():
    t = _fold_table(ddof=1)
    # fold 0 has class 1 only; fold 1 has classes 1 and 2 (class 1 is checked first and present in both)
    assert sorted(t.per_class(["dice"], fold=1)) == [1, 2]
    t2 = MetricTable(ddof=1)
    t2.add(MetricRow("a", 2, fold=0, dice=0.5))
    t2.add(MetricRow("a", 1, fold=1, dice=0.5))
    # fold 0: class 1 absent (skipped), class 2 present -> {2}
    assert list(t2.per_class(["dice"], fold=0)) == [2]
    # fold 0, class 1, ddof 1: std of (.2, .4) = sqrt(((.1)^2 + (.1)^2) / 1) = sqrt(.02)
    assert t.per_class(["dice"], fold=0)[1]["dice"]["std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)


def test_overall_fold_and_ddof():
    t = _fold_table(ddof=1)
    # fold 1: class means 0.8 and 0.6 -> mean 0.7, std (ddof 1) = sqrt((.1^2 + .1^2)/1) = sqrt(.02)
    ov = t.overall(["dice"], fold=1)["dice"]
    assert ov["mean"] == pytest.approx(0.7, abs=1e-12)
    assert ov["std"] == pytest.approx(math.sqrt(0.02), abs=1e-12)
    assert ov["n_classes"] == 2


def test_across_folds_keys_and_ddof():
    t = _fold_table(ddof=1)
    af = t.across_folds(["dice"])
    # class 1: fold means 0.3 (fold 0) and 0.8 (fold 1) -> mean 0.55, std ddof1 = sqrt(2 * 0.25^2) = 0.25*sqrt(2)
    pc1 = af["per_class"][1]["dice"]
    assert set(pc1) == {"mean", "std", "n_folds"}
    assert pc1["mean"] == pytest.approx(0.55, abs=1e-12)
    assert pc1["std"] == pytest.approx(0.25 * math.sqrt(2), abs=1e-12)
    assert pc1["n_folds"] == 2
    # overall per fold: fold 0 = 0.3, fold 1 = (0.8 + 0.6)/2 = 0.7 -> mean 0.5, std ddof1 = 0.2*sqrt(2)
    ov = af["overall"]["dice"]
    assert set(ov) == {"mean", "std", "n_folds"}
    assert ov["mean"] == pytest.approx(0.5, abs=1e-12)
    assert ov["std"] == pytest.approx(0.2 * math.sqrt(2), abs=1e-12)


def test_folds_none_last_and_summary_keys():
    t = MetricTable(class_names={1: "liver"})
    t.add(MetricRow("a", 1, fold=0, dice=0.2))
    t.add(MetricRow("a", 1, fold=None, dice=0.6))
    assert t.folds() == [0, None]
    s = t.summary(["dice"])
    assert set(s) == {"metrics", "ddof", "surface_distance", "n_empty", "classes", "per_class", "overall", "folds",
                      "across_folds"}
    assert s["metrics"] == ["dice"] and s["ddof"] == 0 and s["n_empty"] == 0
    assert s["surface_distance"] == surface_distance_convention("max", "pooled")
    assert set(s["per_class"]["1"]) == {"class_name", "n_scans", "n_empty", "dice"}
    assert s["classes"] == [{"class_id": 1, "class_name": "liver"}]
    assert set(s["folds"]) == {"0", "none"}
    assert list(s["folds"]["0"]["per_class"]) == ["1"]
    # only the requested metric appears in every block: fold 0 class 1 dice mean 0.2
    assert list(s["folds"]["0"]["per_class"]["1"]) == ["dice"]
    assert s["folds"]["0"]["per_class"]["1"]["dice"]["mean"] == 0.2
    assert list(s["overall"]) == ["dice"]
    assert s["overall"]["dice"]["mean"] == pytest.approx(0.4, abs=1e-12)  # (0.2 + 0.6) / 2
    assert "ci" not in s["overall"]["dice"]  # no bootstrap by default


def _boot_table():
    t = MetricTable()
    for k in range(201):  # class 1: unit k has dice k/200; class 2 NaN everywhere
        t.add(MetricRow(str(k), 1, dice=k / 200))
        t.add(MetricRow(str(k), 2, dice=float("nan")))
    return t


def test_table_bootstrap_known_percentiles():
    t = _boot_table()
    b = t.bootstrap(["dice"], n_boot=201, rng=RowRng())
    # RowRng: replicate k draws unit k (natural order "0".."200") -> class-1 means k/200, k = 0..200;
    # percentiles 2.5/97.5 -> positions 5 and 195 -> 0.025 and 0.975. Class 2 is all NaN -> [nan, nan].
    assert b["per_class"][1]["dice"] == pytest.approx([0.025, 0.975], abs=1e-12)
    assert all(math.isnan(x) for x in b["per_class"][2]["dice"])
    # overall = mean of the valid class means = class 1 only -> same interval
    assert b["overall"]["dice"] == pytest.approx([0.025, 0.975], abs=1e-12)
    assert (b["level"], b["n_boot"]) == (0.95, 201)


def test_table_bootstrap_overall_divides_by_class_count():
    t = MetricTable()
    t.add(MetricRow("a", 1, dice=0.2))
    t.add(MetricRow("a", 2, dice=0.6))
    # one unit; every replicate = unit a -> class means .2 and .6 -> overall (.2 + .6) / 2 = 0.4
    assert t.bootstrap(["dice"], n_boot=3, rng=RowRng())["overall"]["dice"] == pytest.approx([0.4, 0.4], abs=1e-12)
    nan_only = MetricTable()
    nan_only.add(MetricRow("a", 1, dice=float("nan")))
    assert all(math.isnan(x) for x in nan_only.bootstrap(["dice"], n_boot=3, rng=RowRng())["overall"]["dice"])


def test_table_bootstrap_unit_order():
    # units sorted by (fold, natural scan order): (0,"2"), (0,"10"), (1,"1")
    t = MetricTable()
    t.add(MetricRow("10", 1, fold=0, dice=0.1))
    t.add(MetricRow("2", 1, fold=0, dice=0.2))
    t.add(MetricRow("1", 1, fold=1, dice=0.5))
    for ix, val in ((0, 0.2), (1, 0.1), (2, 0.5)):
        ci = t.bootstrap(["dice"], n_boot=2, rng=RowRng(fixed=ix))["per_class"][1]["dice"]
        assert ci == pytest.approx([val, val], abs=1e-12)


def test_table_bootstrap_defaults_and_seed():
    t = _fold_table()
    d = t.bootstrap()
    assert (d["level"], d["n_boot"]) == (0.95, 1000)
    assert d == t.bootstrap(["dice"], n_boot=1000, rng=np.random.default_rng(0))


def test_summary_bootstrap_forwarding():
    t = _fold_table()
    s = t.summary(["dice", "iou"], bootstrap=50, level=0.5, seed=5, bootstrap_metrics=("iou", "dice"))
    b = t.bootstrap(["iou", "dice"], n_boot=50, level=0.5, rng=np.random.default_rng(5))
    assert s["bootstrap"] == {"level": 0.5, "n_boot": 50, "seed": 5}
    assert s["overall"]["dice"]["ci"] == b["overall"]["dice"]
    assert s["per_class"]["1"]["dice"]["ci"] == b["per_class"][1]["dice"]
    # default seed 0
    s0 = t.summary(["dice"], bootstrap=50)
    assert s0["bootstrap"]["seed"] == 0
    assert s0["overall"]["dice"]["ci"] == t.bootstrap(["dice"], n_boot=50, rng=np.random.default_rng(0))["overall"]["dice"]
    # a given generator wins and the seed is reported as None. _boot_table-style known answer: one unit per
    # fold... here units (0,a),(0,b),(1,c); RowRng fixed 0 -> every replicate is unit (0,a):
    # class 1 mean 0.2, class 2 absent (NaN) -> overall 0.2
    sr = t.summary(["dice"], bootstrap=4, rng=RowRng(fixed=0))
    assert sr["bootstrap"]["seed"] is None
    assert sr["overall"]["dice"]["ci"] == pytest.approx([0.2, 0.2], abs=1e-12)


# ------------------------------------------------------------------------------ second round (after re-run)
def test_counts_are_not_kept_in_narrow_integer_dtypes():
    # uint8 counts: precision = 200 / (200 + 100) = 2/3 (a uint8 sum would wrap 300 -> 44)
    assert precision(np.uint8(200), np.uint8(100), 0) == pytest.approx(2.0 / 3.0, abs=1e-12)


def test_truth_surface_uses_connectivity():
    # mirror of test_distances_connectivity_forwarded with pred/truth swapped: conn 2 -> ASSD 4/6 = 2/3
    assert assd(CENTRE, PLUS, (1.0, 1.0), connectivity=2) == pytest.approx(2.0 / 3.0, abs=1e-12)


def test_surface_is_boolean_for_integer_masks():
    s = surface(PLUS.astype(np.int64))
    assert s.dtype == bool and int(s.sum()) == 4


def test_empty_masks_still_validate_percentile_above_100():
    e = np.zeros((2, 2), dtype=bool)
    with pytest.raises(ValueError):
        hd95(e, e, (1.0, 1.0), percentile=100.5)


def test_bootstrap_default_n_boot_and_seed_on_continuous_values():
    # 12 spread-out values: any change of n_boot or seed moves the percentile interpolation
    v = [float(3 ** k) for k in range(12)]
    assert bootstrap_ci(v) == bootstrap_ci(v, n_boot=1000, seed=0)
    assert bootstrap_ci(v) == bootstrap_ci(v, rng=np.random.default_rng(0))
    t = MetricTable()
    for k, x in enumerate(v):
        t.add(MetricRow(str(k), 1, dice=x))
    assert t.bootstrap() == t.bootstrap(["dice"], n_boot=1000, rng=np.random.default_rng(0))


def test_table_bootstrap_natural_order_within_a_fold():
    # 12 units of fold 0, scans "1".."12" with dice k/100; natural order puts scan k at position k-1, so a
    # replicate that always draws position ix has class mean (ix + 1)/100
    t = MetricTable()
    for k in range(12, 0, -1):
        t.add(MetricRow(str(k), 1, fold=0, dice=k / 100))
    for ix in range(12):
        ci = t.bootstrap(["dice"], n_boot=1, rng=RowRng(fixed=ix))["per_class"][1]["dice"]
        assert ci == pytest.approx([(ix + 1) / 100] * 2, abs=1e-12)


def test_extend_and_across_folds_summary_keys():
    t = MetricTable()
    t.extend([MetricRow("a", 1, fold=0, dice=0.2), MetricRow("b", 1, fold=1, dice=0.6)])
    assert len(t) == 2
    s = t.summary(["dice"])
    # two folds -> across_folds block keyed by class id string; fold means .2 and .6 -> mean .4
    assert list(s["across_folds"]["per_class"]) == ["1"]
    assert s["across_folds"]["per_class"]["1"]["dice"]["mean"] == pytest.approx(0.4, abs=1e-12)


def test_summary_bootstrap_metrics_forwarded():
    t = _fold_table()
    s = t.summary(["dice", "iou"], bootstrap=20, bootstrap_metrics=("iou",))
    b = t.bootstrap(["iou"], n_boot=20, rng=np.random.default_rng(0))
    assert s["overall"]["iou"]["ci"] == b["overall"]["iou"]
    assert "ci" not in s["overall"]["dice"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: as_mask(np.array([0.5])), r"^mask: float array"),
        (lambda: select_z(np.arange(3), [9]), r"^array: zs index out of range"),
        (lambda: select_z(np.arange(3), [0.5]), r"^array: zs must be None, a slice"),
        (lambda: confusion(np.array([0.5]), np.array([1])), r"^prediction: float array"),
        (lambda: confusion(np.array([1]), np.array([0.5])), r"^ground truth: float array"),
        (lambda: confusion(np.arange(3), np.arange(3), zs=[9]), r"^prediction: zs index out of range"),
        (lambda: confusion(np.array(1), np.array(1)), r"^prediction and ground truth must be arrays with at least"),
        (lambda: confusion(np.zeros(2), np.zeros(3)), r"^prediction shape \(2,\) != ground-truth shape \(3,\)$"),
        (lambda: hd95(np.zeros(2), np.zeros(3)), r"^prediction shape \(2,\) != ground-truth shape \(3,\)$"),
        (lambda: hd95(np.array([0.5, 1]), np.array([1, 1])), r"^prediction: float array"),
        (lambda: hd95(np.array([1, 1]), np.array([0.5, 1])), r"^ground truth: float array"),
        (lambda: hd95(np.ones(3), np.ones(3), zs=[0, 2]), r"^prediction: distance metrics need a contiguous"),
        (lambda: hd95(np.ones(3), np.ones(3), zs=[5]), r"^prediction: zs index out of range"),
        (lambda: hd95(np.ones(3), np.ones(3), zs=slice(0, 3, 2)), r"^prediction: distance metrics need a contiguous slab"),
        (lambda: hd95(np.ones((3, 2)), np.ones((3, 2)), zs=np.array([True])),
         r"^prediction: boolean zs has shape \(1,\), expected \(3,\)$"),
        (lambda: assd(np.ones(3), np.ones(3), reduction="x"), r"^assd reduction must be 'pooled' or 'mean'"),
        (lambda: bootstrap_ci([1.0], n_boot=0), r"^n_boot must be >= 1"),
    ],
)
def test_error_messages_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_add_prediction_error_messages():
    t = MetricTable()
    two = np.array([[[2, 0]]])
    zero = np.zeros((1, 1, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=r"^scan 'a', class 1: prediction holds label values"):
        t.add_prediction(two, zero, scan="a", class_id=1)
    with pytest.raises(ValueError, match=r"^scan 'a', class 1: ground truth holds label values"):
        t.add_prediction(zero, two, scan="a", class_id=1)
    ones = np.ones((3, 1, 1), dtype=bool)
    with pytest.raises(ValueError, match=r"^scan 'a', class 1: prediction: distance metrics need a contiguous"):
        t.add_prediction(ones, ones, scan="a", class_id=1, zs=[0, 2])
