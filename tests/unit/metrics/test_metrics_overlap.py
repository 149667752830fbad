"""Overlap metrics: hand-worked counts, empty-mask table, volume (not slice-averaged) semantics."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_proto.metrics.overlap import (
    ScanCounts,
    confusion,
    dice,
    foreground_slab,
    iou,
    precision,
    recall,
)

NAN = float("nan")


def test_scores_from_known_counts():
    # tp=3, fp=1, fn=2
    assert dice(3, 1, 2) == pytest.approx(6 / 9)
    assert iou(3, 1, 2) == pytest.approx(3 / 6)
    assert precision(3, 1, 2) == pytest.approx(3 / 4)
    assert recall(3, 1, 2) == pytest.approx(3 / 5)
    assert isinstance(dice(3, 1, 2), float)


def test_scores_vectorised():
    tp, fp, fn = np.array([3, 0, 0]), np.array([1, 0, 2]), np.array([2, 0, 0])
    d = dice(tp, fp, fn)
    assert d.shape == (3,)
    np.testing.assert_allclose(d[[0, 2]], [6 / 9, 0.0])
    assert math.isnan(d[1])
    np.testing.assert_allclose(dice(tp, fp, fn, empty=1.0), [6 / 9, 1.0, 0.0])


@pytest.mark.parametrize("fn_", [dice, iou, precision, recall])
def test_both_empty_uses_empty_argument(fn_):
    assert math.isnan(fn_(0, 0, 0))
    assert fn_(0, 0, 0, empty=1.0) == 1.0


def test_truth_empty_prediction_not():
    # fp only
    assert dice(0, 5, 0) == 0.0
    assert iou(0, 5, 0) == 0.0
    assert precision(0, 5, 0) == 0.0
    assert math.isnan(recall(0, 5, 0))
    # `empty` does not change this case
    assert dice(0, 5, 0, empty=1.0) == 0.0
    assert math.isnan(recall(0, 5, 0, empty=1.0))


def test_prediction_empty_truth_not():
    assert dice(0, 0, 4) == 0.0
    assert iou(0, 0, 4) == 0.0
    assert recall(0, 0, 4) == 0.0
    assert math.isnan(precision(0, 0, 4))


def test_negative_counts_raise():
    with pytest.raises(ValueError, match="non-negative"):
        dice(-1, 0, 0)


def _tiny():
    truth = np.zeros((3, 2, 2), dtype=np.int64)
    pred = np.zeros((3, 2, 2), dtype=bool)
    truth[0] = [[1, 1], [0, 0]]
    pred[0] = [[1, 0], [1, 0]]  # tp 1, fp 1, fn 1
    truth[1] = [[1, 1], [1, 1]]
    pred[1] = [[1, 1], [1, 0]]  # tp 3, fn 1
    pred[2] = [[0, 0], [0, 1]]  # fp 1
    return pred, truth


def test_confusion_whole_volume_and_slabs():
    pred, truth = _tiny()
    assert confusion(pred, truth) == (4, 2, 2)
    assert confusion(pred, truth, zs=slice(0, 2)) == (4, 1, 2)
    assert confusion(pred, truth, zs=[2]) == (0, 1, 0)
    assert confusion(pred, truth, zs=np.array([True, False, True])) == (1, 2, 1)
    assert confusion(pred, truth, zs=[]) == (0, 0, 0)
    assert all(isinstance(x, int) for x in confusion(pred, truth))


def test_confusion_with_class_value():
    truth = np.array([[[0, 1, 2, 2]]])
    pred = np.array([[[2, 2, 2, 0]]])
    assert confusion(pred, truth, cls=2) == (1, 2, 1)
    assert confusion(pred, truth) == (2, 1, 1)  # foreground = nonzero
    assert confusion(pred.astype(np.float32) / 2, (truth == 2).astype(np.float32)) == (1, 2, 1)


def test_confusion_validation():
    pred, truth = _tiny()
    with pytest.raises(ValueError, match="shape"):
        confusion(pred[:2], truth)
    with pytest.raises(ValueError, match="threshold"):
        confusion(np.full(truth.shape, 0.7), truth)
    with pytest.raises(ValueError, match="out of range"):
        confusion(pred, truth, zs=[3])
    with pytest.raises(ValueError, match="boolean zs"):
        confusion(pred, truth, zs=np.array([True, False]))


def test_volume_dice_is_not_mean_of_slice_dice():
    """Slice 0: 1-voxel organ found exactly (slice Dice 1); slice 1: 9-voxel organ missed (slice Dice 0).
    The mean of slice Dice would be 0.5; the 3-D Dice over the volume is 2*1/(2*1+0+9) = 2/11."""
    truth = np.zeros((2, 3, 3), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[0, 1, 1] = pred[0, 1, 1] = 1
    truth[1] = 1
    per_slice = [dice(*confusion(pred[z], truth[z])) for z in range(2)]
    assert np.mean(per_slice) == pytest.approx(0.5)
    c = ScanCounts.from_masks(pred, truth, scan="7", class_id=3)
    assert (c.tp, c.fp, c.fn, c.n_slices) == (1, 0, 9, 2)
    assert c.dice() == pytest.approx(2 / 11)
    assert c.iou() == pytest.approx(1 / 10)


def test_scan_counts_accumulate_and_validate():
    pred, truth = _tiny()
    a = ScanCounts.from_masks(pred, truth, scan="1", class_id=2, zs=slice(0, 2), fold=0)
    b = ScanCounts.from_masks(pred, truth, scan="1", class_id=2, zs=[2], fold=0)
    s = a + b
    assert (s.tp, s.fp, s.fn, s.n_slices) == confusion(pred, truth) + (3,)
    assert s.scores()["dice"] == pytest.approx(dice(4, 2, 2))
    with pytest.raises(ValueError, match="cannot add"):
        a + ScanCounts("2", 2, fold=0)
    with pytest.raises(ValueError, match="scan '9', class 1"):
        ScanCounts.from_masks(pred[:1], truth, scan="9", class_id=1)
    empty = ScanCounts("3", 1, n_slices=4)
    assert empty.is_empty and math.isnan(empty.dice()) and empty.dice(empty=1.0) == 1.0


def test_foreground_slab():
    m = np.zeros((6, 2, 2), dtype=bool)
    assert foreground_slab(m) is None
    m[2, 0, 0] = m[4, 1, 1] = True
    assert foreground_slab(m) == slice(2, 5)
    pred = np.ones_like(m)
    assert confusion(pred, m, zs=foreground_slab(m)) == (2, 10, 0)
