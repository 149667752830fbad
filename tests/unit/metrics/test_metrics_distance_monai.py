"""Our default HD95 and ASSD are MONAI's: ``compute_hausdorff_distance(percentile=95, directed=False)`` and
``compute_average_surface_distance(symmetric=True)`` with the voxel spacing, on random anisotropic 3-D blobs.

MONAI computes in float32 (the distances, and ``torch.quantile``'s interpolation rank ``0.95 * (n - 1)``), so the
two agree to ``TOL`` = 1e-4 mm, not to the last bit. The medpy (pooled) HD95 differs from MONAI's by much more on the same cases, so a
swap of the default convention fails here.
"""
from __future__ import annotations

import math
import warnings

import pytest

monai_metrics = pytest.importorskip("monai.metrics")  # optional: tests/conftest.py OPTIONAL_PACKAGES

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

from fewshot_proto.metrics.distance import assd, hd95, surface_distances, surface_metrics  # noqa: E402

SHAPE = (12, 40, 36)  # (z, y, x)
SPACINGS = [(7.7, 1.25, 1.25), (2.0, 0.7, 1.1)]  # (z, y, x) mm
SEEDS = [0, 1, 2, 3, 4]
TOL = 1e-4  # mm; float32 rounding in MONAI


def _blob(rng: np.random.Generator, shape=SHAPE, sigma: float = 2.0, frac: float = 0.2) -> np.ndarray:
    """Smoothed noise above its (1 - frac) quantile: a few irregular blobs, some touching the array border."""
    field = ndimage.gaussian_filter(rng.random(shape), sigma)
    return field > np.quantile(field, 1.0 - frac)


def _t(mask: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(mask[None, None].astype(np.float32))


def _monai(pred: np.ndarray, truth: np.ndarray, spacing, **kw) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about empty masks; the values are what we compare
        h = monai_metrics.compute_hausdorff_distance(
            _t(pred), _t(truth), include_background=True, percentile=95, directed=False, spacing=spacing
        )
        a = monai_metrics.compute_average_surface_distance(
            _t(pred), _t(truth), include_background=True, symmetric=True, spacing=spacing
        )
    return {"hd95": float(h[0, 0]), "assd": float(a[0, 0])}


CASES = [(seed, sp) for seed in SEEDS for sp in SPACINGS]


@pytest.mark.parametrize("seed, spacing", CASES, ids=[f"seed{s}-sp{sp[0]}" for s, sp in CASES])
def test_default_hd95_and_assd_match_monai(seed, spacing):
    rng = np.random.default_rng(seed)
    pred, truth = _blob(rng), _blob(rng)
    ref = _monai(pred, truth, spacing)
    ours = surface_metrics(pred, truth, spacing)
    assert ours["empty_masks"] == 0
    assert ours["hd95"] == pytest.approx(ref["hd95"], abs=TOL)
    assert ours["assd"] == pytest.approx(ref["assd"], abs=TOL)
    assert hd95(pred, truth, spacing, method="kdtree") == pytest.approx(ref["hd95"], abs=TOL)
    assert assd(truth, pred, spacing) == pytest.approx(ref["assd"], abs=TOL)  # symmetric


def test_pooled_convention_is_not_monai():
    """The medpy (pooled) HD95 misses MONAI's value by more than 0.1 mm (up to 1.9 mm) on every case above, so the
    MONAI test would catch a default swapped to "pooled"."""
    gaps = []
    for seed, spacing in CASES:
        rng = np.random.default_rng(seed)
        pred, truth = _blob(rng), _blob(rng)
        gaps.append(abs(hd95(pred, truth, spacing, reduction="pooled") - _monai(pred, truth, spacing)["hd95"]))
    assert min(gaps) > 0.1


@pytest.mark.parametrize("spacing", SPACINGS, ids=["sp7.7", "sp2.0"])
def test_directed_and_full_hausdorff_match_monai(spacing):
    """Each directed 95th percentile (MONAI ``directed=True``) and the classic Hausdorff distance
    (``percentile=None`` / ours 100) agree too: same surfaces, same distances."""
    rng = np.random.default_rng(11)
    pred, truth = _blob(rng, sigma=1.5, frac=0.3), _blob(rng, sigma=2.5, frac=0.15)
    d_pt, d_tp = surface_distances(pred, truth, spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a MONAI-internal deprecation warning
        refs = [monai_metrics.compute_hausdorff_distance(_t(a), _t(b), include_background=True, percentile=95,
                                                         directed=True, spacing=spacing)
                for a, b in ((pred, truth), (truth, pred))]
        ref_hd = monai_metrics.compute_hausdorff_distance(_t(pred), _t(truth), include_background=True,
                                                          spacing=spacing)
    for d, ref in zip((d_pt, d_tp), refs):
        assert np.percentile(d, 95) == pytest.approx(float(ref[0, 0]), abs=TOL)
    assert hd95(pred, truth, spacing, percentile=100) == pytest.approx(float(ref_hd[0, 0]), abs=TOL)


def test_masks_filling_the_border_match_monai():
    """Foreground on every face of the array: the outside counts as background for both implementations."""
    rng = np.random.default_rng(5)
    pred = np.ones(SHAPE, dtype=bool)
    pred[4:8, 10:30, 8:28] = False  # a hole
    truth = _blob(rng, frac=0.6)
    truth[:, 0, :] = True
    spacing = SPACINGS[0]
    ref = _monai(pred, truth, spacing)
    ours = surface_metrics(pred, truth, spacing)
    assert ours["hd95"] == pytest.approx(ref["hd95"], abs=TOL)
    assert ours["assd"] == pytest.approx(ref["assd"], abs=TOL)


def test_both_empty_is_nan_like_monai():
    empty = np.zeros(SHAPE, dtype=bool)
    ref = _monai(empty, empty, SPACINGS[0])
    assert math.isnan(ref["hd95"]) and math.isnan(ref["assd"])
    ours = surface_metrics(empty, empty, SPACINGS[0])
    assert math.isnan(ours["hd95"]) and math.isnan(ours["assd"]) and ours["empty_masks"] == 2
