"""Intensity normalisation: known answers."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.data.normalise import DEFAULT_CT_WINDOW, ct_window, dataset_stats, normalise_volume, zscore


def test_zscore_known_answer():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    out = zscore(x)
    np.testing.assert_allclose(out, (x - 2.5) / np.sqrt(1.25), rtol=1e-6)
    assert out.dtype == np.float32


def test_zscore_with_mask():
    x = np.array([0.0, 0.0, 2.0, 4.0])
    out = zscore(x, mask=x > 0)
    np.testing.assert_allclose(out, (x - 3.0) / 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="mask shape"):
        zscore(x, mask=np.ones(3, bool))


def test_zscore_constant_gives_zeros_not_nan():
    out = zscore(np.full((3, 4, 5), 7.5))
    assert np.all(out == 0) and not np.isnan(out).any()


def test_zscore_large_range_volume():
    rng = np.random.default_rng(0)
    x = (rng.random((10, 20, 20)) * 1.7e6).astype(np.float32)
    out = zscore(x)
    assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1) < 1e-4


def test_ct_window():
    np.testing.assert_array_equal(ct_window(np.array([-1000, 0, 50, 3000]), -125, 275), [-125, 0, 50, 275])
    with pytest.raises(ValueError):
        ct_window(np.zeros(2), 5, 5)


def test_dataset_stats_equals_pooled_stats():
    rng = np.random.default_rng(1)
    vols = [rng.normal(0, 300, (4, 5, 6)), rng.normal(100, 50, (3, 5, 6))]
    mean, std = dataset_stats(iter(vols), window=(-125, 275))
    pooled = np.concatenate([np.clip(v, -125, 275).ravel() for v in vols])
    assert mean == pytest.approx(pooled.mean()) and std == pytest.approx(pooled.std())
    assert dataset_stats([np.ones(5)], window=None) == (1.0, 1.0)
    with pytest.raises(ValueError):
        dataset_stats([])


def test_normalise_volume_methods():
    x = np.array([-500.0, 0.0, 100.0, 500.0])
    np.testing.assert_array_equal(normalise_volume(x, "none"), x.astype(np.float32))
    np.testing.assert_allclose(normalise_volume(x, "zscore"), zscore(x))
    np.testing.assert_allclose(normalise_volume(x, "ct", stats=(10.0, 2.0)),
                               (np.clip(x, *DEFAULT_CT_WINDOW) - 10) / 2)
    np.testing.assert_allclose(normalise_volume(x, "ct", ct_window=(0, 100), stats=(50.0, 25.0)),
                               (np.clip(x, 0, 100) - 50) / 25)
    np.testing.assert_allclose(normalise_volume(x, "ct"), zscore(np.clip(x, *DEFAULT_CT_WINDOW)))
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise_volume(x, "minmax")
    with pytest.raises(ValueError, match="CT stats"):
        normalise_volume(x, "ct", stats=(0.0, 0.0))
