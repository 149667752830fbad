"""Augmentation: identical geometry on images and masks, identity when off, reproducibility."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fewshot_proto.data.augment import (
    apply_coordinate_map,
    augment_pair,
    elastic_field,
    gamma_transform,
    random_coordinate_map,
)


def _disc(h=64, w=80, r=18, cy=30, cx=44):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8)


def test_identity_when_everything_off():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(32, 40)).astype(np.float32)
    mask = _disc(32, 40, 8, 16, 20)
    out, m = augment_pair(img, mask, rng, affine=False, elastic=False, gamma=False)
    np.testing.assert_array_equal(out, img)
    np.testing.assert_array_equal(m, mask)
    assert m.dtype == mask.dtype


def test_zero_range_affine_is_identity():
    img = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    out, _ = augment_pair(img, None, np.random.default_rng(1), elastic=False, gamma=False,
                          rotate=0, scale=(1, 1), shear=0, translate=0)
    np.testing.assert_allclose(out, img, atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_image_and_mask_stay_aligned(seed):
    mask = _disc()
    img = mask.astype(np.float32)
    out, m = augment_pair(img, mask, np.random.default_rng(seed), gamma=False, rotate=20, elastic_alpha=3)
    assert m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
    assert 0.7 * mask.sum() < m.sum() < 1.4 * mask.sum()  # scale range 0.9..1.1 (area 0.81..1.21)
    diff = (out > 0.5) != (m > 0)
    edge = ndimage.binary_dilation(m > 0) & ~ndimage.binary_erosion(m > 0)
    assert not (diff & ~edge).any()  # disagreements only on the mask's one-pixel border
    assert diff.sum() <= 0.05 * m.sum()


def test_stack_shares_one_transform_and_is_reproducible():
    mask = _disc()
    img = np.random.default_rng(0).normal(size=mask.shape).astype(np.float32)
    stack = np.stack([img, img * 2.0 + 1.0])
    masks = np.stack([mask, mask * 3])
    a, ma = augment_pair(stack, masks, np.random.default_rng(7), gamma=False)
    b, mb = augment_pair(stack, masks, np.random.default_rng(7), gamma=False)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
    # linear sampling commutes with x -> 2x + 1 (the fill value is each image's minimum): same geometry
    np.testing.assert_allclose(a[1], a[0] * 2.0 + 1.0, atol=1e-4)
    np.testing.assert_array_equal(ma[1], ma[0] * 3)
    single, msingle = augment_pair(img, mask, np.random.default_rng(7), gamma=False)
    np.testing.assert_array_equal(single, a[0])
    np.testing.assert_array_equal(msingle, ma[0])


def test_sampler_matches_scipy_map_coordinates():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(40, 50)).astype(np.float32)
    lab = rng.integers(0, 4, size=(40, 50)).astype(np.int16)
    coords = random_coordinate_map(img.shape, rng, rotate=25, translate=0.1)
    ours = apply_coordinate_map(img, coords, order=1, cval=-3.0)
    ref = ndimage.map_coordinates(img, coords, order=1, mode="grid-constant", cval=-3.0, prefilter=False)
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    ours0 = apply_coordinate_map(lab, coords, order=0)
    ref0 = ndimage.map_coordinates(lab, coords, order=0, mode="grid-constant", cval=0, prefilter=False)
    assert ours0.dtype == np.int16 and (ours0 != ref0).mean() < 0.002  # only exact .5 ties may differ


def test_elastic_field_statistics():
    d = elastic_field((128, 128), np.random.default_rng(0), alpha=2.0, sigma=16)
    assert d.shape == (2, 128, 128) and d.dtype == np.float32
    assert 1.0 < float(d.std()) < 3.0
    assert float(np.abs(np.diff(d[0], axis=0)).max()) < 1.0  # smooth: neighbours move together


def test_gamma_keeps_range_and_order():
    x = np.linspace(-2, 3, 50, dtype=np.float32).reshape(5, 10)
    for g in (0.7, 1.5):
        y = gamma_transform(x, g)
        assert y.min() == pytest.approx(-2) and y.max() == pytest.approx(3)
        assert np.all(np.diff(y.ravel()) >= 0)
    np.testing.assert_allclose(gamma_transform(x, 1.0), x, atol=1e-6)
    np.testing.assert_array_equal(gamma_transform(np.ones((3, 3)), 1.3), np.ones((3, 3)))


def test_bool_mask_and_bad_shapes():
    mask = _disc().astype(bool)
    _, m = augment_pair(mask.astype(np.float32), mask, np.random.default_rng(0))
    assert m.dtype == bool and m.any()
    with pytest.raises(ValueError, match="mask shape"):
        augment_pair(np.zeros((10, 10)), np.zeros((10, 11)), np.random.default_rng(0))
    with pytest.raises(ValueError, match="img must be"):
        augment_pair(np.zeros(10), None, np.random.default_rng(0))
