"""HD95 / ASSD: exact answers with anisotropic spacing, empty masks, slabs, EDT vs brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fewshot_proto.metrics.distance import assd, hd95, surface, surface_distances, surface_metrics

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
    pooled HD95: 95th pct of 15 values, index 13.3 -> 4.3 vox; max: 95th pct of d(T->P), index 8.55 -> 4.55.
    ASSD pooled: 15/15 = 1 vox; mean of directed means: (0 + 1.5)/2 = 0.75 vox."""
    truth = np.zeros((1, 1, 20), dtype=bool)
    truth[0, 0, :10] = True
    pred = np.zeros_like(truth)
    pred[0, 0, :5] = True
    sp = (3.0, 5.0, 2.0)
    assert hd95(pred, truth, sp) == pytest.approx(2 * 4.3)
    assert hd95(pred, truth, sp, reduction="max") == pytest.approx(2 * 4.55)
    assert assd(pred, truth, sp) == pytest.approx(2 * 1.0)
    assert assd(pred, truth, sp, reduction="mean") == pytest.approx(2 * 0.75)
    assert surface_metrics(pred, truth, sp) == pytest.approx({"hd95": 8.6, "assd": 2.0})


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
    assert hd95(pred, truth, SPACING) == pytest.approx(np.percentile(pooled, 95))
    assert assd(pred, truth, SPACING) == pytest.approx(pooled.mean())


def test_empty_semantics_are_configurable():
    empty = np.zeros((4, 5, 5), dtype=bool)
    some = empty.copy()
    some[1, 2, 2] = True
    assert math.isnan(hd95(empty, empty))
    assert math.isnan(assd(empty, empty))
    assert hd95(empty, empty, both_empty=0.0) == 0.0
    assert hd95(some, empty) == math.inf
    assert assd(empty, some) == math.inf
    assert hd95(some, empty, one_empty=99.0) == 99.0
    assert surface_metrics(empty, some, one_empty=-1.0) == {"hd95": -1.0, "assd": -1.0}


def test_slab_restricts_distances():
    pred = np.zeros((10, 4, 4), dtype=bool)
    truth = np.zeros_like(pred)
    truth[5] = True
    pred[5] = True
    pred[1] = True  # a false positive plane outside the slab
    assert hd95(pred, truth, SPACING, percentile=100) == pytest.approx(4 * 2.5)
    assert hd95(pred, truth, SPACING, zs=slice(4, 7)) == 0.0
    assert hd95(pred, truth, SPACING, zs=[4, 5, 6]) == 0.0
    assert hd95(pred, truth, SPACING, zs=slice(0, 3)) == math.inf  # truth empty in the slab
    with pytest.raises(ValueError, match="contiguous"):
        hd95(pred, truth, SPACING, zs=[1, 5])


def test_validation_errors():
    m = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        assd(m, m[:2])
    with pytest.raises(ValueError, match="reduction"):
        hd95(m, m, reduction="mean")
    with pytest.raises(ValueError, match="method"):
        assd(m, m, method="brute")
    with pytest.raises(ValueError, match="percentile"):
        surface_metrics(m, m, percentile=120)
