"""HD95 / ASSD: exact answers with anisotropic spacing, both conventions (MONAI default, medpy pooled), empty
masks, slabs, EDT vs brute force. Agreement with MONAI itself: test_metrics_distance_monai.py."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_proto.metrics.distance import (
    assd,
    hd95,
    surface,
    surface_distance_convention,
    surface_distances,
    surface_metrics,
)

SPACING = (2.5, 0.7, 1.3)  # (z, y, x) mm


def test_parallel_planes_along_z_give_k_times_z_spacing():
    pred = np.zeros((10, 6, 7), dtype=bool)
    truth = np.zeros_like(pred)
    pred[2] = True
    truth[5] = True
    for red in ("pooled", "max"):
        assert hd95(pred, truth, SPACING, reduction=red) == pytest.approx(3 * 2.5)
    for red in ("pooled", "mean"):
        assert assd(pred, truth, SPACING, reduction=red) == pytest.approx(3 * 2.5)


def test_parallel_planes_along_x_give_k_times_x_spacing():
    pred = np.zeros((5, 6, 9), dtype=np.uint8)
    truth = np.zeros_like(pred)
    pred[:, :, 1] = 1
    truth[:, :, 5] = 1
    assert hd95(pred, truth, SPACING) == pytest.approx(4 * 1.3)
    assert assd(pred, truth, SPACING) == pytest.approx(4 * 1.3)


@pytest.mark.parametrize("method", ["edt", "kdtree"])
def test_cubes_offset_along_y_hausdorff_is_k_times_y_spacing(method):
    pred = np.zeros((10, 14, 10), dtype=bool)
    truth = np.zeros_like(pred)
    pred[2:8, 2:8, 2:8] = True
    truth[2:8, 4:10, 2:8] = True  # shifted by k=2 voxels along y
    assert hd95(pred, truth, SPACING, percentile=100, method=method) == pytest.approx(2 * 0.7)
    assert 0 < assd(pred, truth, SPACING, method=method) < 2 * 0.7


def test_identical_masks_give_zero():
    rng = np.random.default_rng(0)
    m = rng.random((6, 12, 12)) > 0.6
    assert hd95(m, m, SPACING) == 0.0
    assert assd(m, m, SPACING) == 0.0


def test_line_segments_hand_worked_percentiles():
    """Truth = 10 voxels in a row, prediction = its first 5 (every voxel is surface: 1-voxel thick).
    d(P->T) = [0]*5; d(T->P) = [0]*5 + [1, 2, 3, 4, 5] voxels (x spacing 2 mm).
    max (default, MONAI): p95 of d(P->T) = 0; p95 of d(T->P): index 0.95 * 9 = 8.55 -> 4 + 0.55 = 4.55 vox.
    pooled (medpy): 95th pct of the 15 values sorted [0]*10 + [1..5], index 0.95 * 14 = 13.3 -> 4.3 vox.
    ASSD pooled (default, MONAI): 15 / 15 = 1 vox; mean of directed means (medpy): (0 + 1.5) / 2 = 0.75 vox."""
    truth = np.zeros((1, 1, 20), dtype=bool)
    truth[0, 0, :10] = True
    pred = np.zeros_like(truth)
    pred[0, 0, :5] = True
    sp = (3.0, 5.0, 2.0)
    assert hd95(pred, truth, sp) == pytest.approx(2 * 4.55, abs=1e-12)
    assert hd95(pred, truth, sp, reduction="max") == pytest.approx(2 * 4.55, abs=1e-12)
    assert hd95(pred, truth, sp, reduction="pooled") == pytest.approx(2 * 4.3, abs=1e-12)
    assert hd95(truth, pred, sp) == pytest.approx(2 * 4.55, abs=1e-12)  # symmetric: the larger direction wins
    assert assd(pred, truth, sp) == 2 * 1.0
    assert assd(pred, truth, sp, reduction="mean") == 2 * 0.75
    assert surface_metrics(pred, truth, sp) == pytest.approx({"hd95": 9.1, "assd": 2.0, "empty_masks": 0}, abs=1e-12)
    assert surface_metrics(pred, truth, sp, hd_reduction="pooled", assd_reduction="mean") == pytest.approx(
        {"hd95": 8.6, "assd": 1.5, "empty_masks": 0}, abs=1e-12
    )


def test_directed_percentiles_differ_from_pooled_in_2d():
    """2-D, spacing (1, 1). Truth: column x=0, rows 0..3 (4 voxels); prediction: truth plus the voxel (0, 3).
    d(P->T) = [0, 0, 0, 0, 3]; d(T->P) = [0, 0, 0, 0].
    max: p95 of d(P->T), index 0.95 * 4 = 3.8 -> 0 + 0.8 * 3 = 2.4; p95 of d(T->P) = 0 -> 2.4.
    pooled: 9 values [0]*8 + [3], index 0.95 * 8 = 7.6 -> 0.6 * 3 = 1.8.
    ASSD pooled: 3 / 9 = 1/3; mean of directed means: (3/5 + 0) / 2 = 0.3."""
    truth = np.zeros((4, 4), dtype=bool)
    truth[:, 0] = True
    pred = truth.copy()
    pred[0, 3] = True
    sp = (1.0, 1.0)
    d_pt, d_tp = surface_distances(pred, truth, sp)
    assert sorted(d_pt.tolist()) == [0.0, 0.0, 0.0, 0.0, 3.0] and d_tp.tolist() == [0.0] * 4
    assert hd95(pred, truth, sp) == pytest.approx(2.4, abs=1e-12)
    assert hd95(pred, truth, sp, reduction="pooled") == pytest.approx(1.8, abs=1e-12)
    assert assd(pred, truth, sp) == pytest.approx(1.0 / 3.0, abs=1e-12)
    assert assd(pred, truth, sp, reduction="mean") == pytest.approx(0.3, abs=1e-12)


def test_surface_of_cube():
    m = np.zeros((5, 5, 5), dtype=bool)
    m[1:4, 1:4, 1:4] = True
    s = surface(m)
    assert s.sum() == 26 and not s[2, 2, 2]
    full = np.ones((3, 3, 3), dtype=bool)
    assert surface(full).sum() == 26  # the array border counts as background


@pytest.mark.parametrize("seed", [1, 2])
def test_edt_and_kdtree_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((5, 9, 8)) > 0.55
    truth = rng.random((5, 9, 8)) > 0.5
    sp = np.array(SPACING)
    cp = np.argwhere(surface(pred)) * sp
    ct = np.argwhere(surface(truth)) * sp
    d = np.sqrt(((cp[:, None, :] - ct[None, :, :]) ** 2).sum(-1))
    ref_pt, ref_tp = d.min(axis=1), d.min(axis=0)
    for method in ("edt", "kdtree"):
        d_pt, d_tp = surface_distances(pred, truth, SPACING, method=method)
        np.testing.assert_allclose(np.sort(d_pt), np.sort(ref_pt), atol=1e-9)
        np.testing.assert_allclose(np.sort(d_tp), np.sort(ref_tp), atol=1e-9)
    pooled = np.concatenate([ref_pt, ref_tp])
    directed_max = max(np.percentile(ref_pt, 95), np.percentile(ref_tp, 95))
    assert hd95(pred, truth, SPACING) == pytest.approx(directed_max, abs=1e-9)
    assert hd95(pred, truth, SPACING, reduction="pooled") == pytest.approx(np.percentile(pooled, 95), abs=1e-9)
    assert assd(pred, truth, SPACING) == pytest.approx(pooled.mean(), abs=1e-9)
    assert assd(pred, truth, SPACING, reduction="mean") == pytest.approx((ref_pt.mean() + ref_tp.mean()) / 2, abs=1e-9)


def test_empty_semantics_are_nan_and_configurable():
    empty = np.zeros((4, 5, 5), dtype=bool)
    some = empty.copy()
    some[1, 2, 2] = True
    # both empty: NaN (nothing to score, as MONAI); exactly one empty: NaN (undefined), never +inf
    for fn in (hd95, assd):
        assert math.isnan(fn(empty, empty)) and math.isnan(fn(some, empty)) and math.isnan(fn(empty, some))
    assert hd95(empty, empty, both_empty=0.0) == 0.0
    assert hd95(some, empty, one_empty=99.0) == 99.0
    assert assd(empty, some, one_empty=98.0) == 98.0
    assert surface_metrics(empty, some, one_empty=-1.0) == {"hd95": -1.0, "assd": -1.0, "empty_masks": 1}
    assert surface_metrics(some, empty, one_empty=-1.0, both_empty=-2.0) == {
        "hd95": -1.0, "assd": -1.0, "empty_masks": 1}
    assert surface_metrics(empty, empty, one_empty=-1.0, both_empty=-2.0) == {
        "hd95": -2.0, "assd": -2.0, "empty_masks": 2}
    d = surface_metrics(empty, some)
    assert math.isnan(d["hd95"]) and math.isnan(d["assd"]) and d["empty_masks"] == 1
    assert surface_metrics(some, some) == {"hd95": 0.0, "assd": 0.0, "empty_masks": 0}


def test_convention_names_the_definitions():
    c = surface_distance_convention()
    assert c == surface_distance_convention("max", "pooled")
    assert c["hd95"] == "max of the two directed 95th percentiles, max(p95(d(P->T)), p95(d(T->P))) (MONAI)"
    assert c["assd"] == ("mean of the directed distances of both directions pooled, "
                         "(sum d(P->T) + sum d(T->P)) / (|surf P| + |surf T|) (MONAI, symmetric=True)")
    assert c["units"] == "mm" and c["tag"] == "hd95=max-of-directed-p95;assd=pooled-mean;mm"
    assert set(c) == {"hd95", "assd", "units", "surface", "empty", "tag"}
    m = surface_distance_convention("pooled", "mean")
    assert m["hd95"] == "95th percentile of the directed distances of both directions pooled (medpy)"
    assert m["assd"] == "mean of the two directed means (medpy)"
    assert m["tag"] == "hd95=pooled-p95;assd=mean-of-directed-means;mm"
    with pytest.raises(ValueError, match=r"^hd95 reduction must be 'max' or 'pooled'; got 'mean'$"):
        surface_distance_convention("mean")


def test_slab_restricts_distances():
    pred = np.zeros((10, 4, 4), dtype=bool)
    truth = np.zeros_like(pred)
    truth[5] = True
    pred[5] = True
    pred[1] = True  # a false positive plane outside the slab
    assert hd95(pred, truth, SPACING, percentile=100) == pytest.approx(4 * 2.5)
    assert hd95(pred, truth, SPACING, zs=slice(4, 7)) == 0.0
    assert hd95(pred, truth, SPACING, zs=[4, 5, 6]) == 0.0
    assert math.isnan(hd95(pred, truth, SPACING, zs=slice(0, 3)))  # truth empty in the slab
    assert surface_metrics(pred, truth, SPACING, zs=slice(0, 3))["empty_masks"] == 1
    with pytest.raises(ValueError, match="contiguous"):
        hd95(pred, truth, SPACING, zs=[1, 5])


def test_validation_errors():
    m = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        assd(m, m[:2])
    with pytest.raises(ValueError, match=r"^hd95 reduction must be 'max' or 'pooled'; got 'mean'$"):
        hd95(m, m, reduction="mean")
    with pytest.raises(ValueError, match=r"^assd reduction must be 'pooled' or 'mean'; got 'max'$"):
        surface_metrics(m, m, assd_reduction="max")
    with pytest.raises(ValueError, match=r"^surface distance method must be 'edt' or 'kdtree'; got 'brute'$"):
        assd(m, m, method="brute")
    with pytest.raises(ValueError, match=r"^percentile must be in \[0, 100\]; got 120$"):
        surface_metrics(m, m, percentile=120)
