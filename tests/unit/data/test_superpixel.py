"""Superpixels and superpixel pseudo-labels on a synthetic slice."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from fewshot_proto.data.superpixel import body_mask, superpixel_pseudolabel, superpixels

pytest.importorskip("skimage")


def _phantom_slice(seed=0):
    """A bright elliptic 'body' on a dark background with two organs inside and a hole-like dark vessel."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 48) / 40.0) ** 2 + ((xx - 48) / 30.0) ** 2 <= 1
    img = np.where(body, 1.0, 0.0)
    img[((yy - 35) / 10.0) ** 2 + ((xx - 40) / 12.0) ** 2 <= 1] = 2.0
    img[((yy - 62) / 8.0) ** 2 + ((xx - 58) / 8.0) ** 2 <= 1] = 0.05  # dark organ inside: a hole to fill
    img = img + rng.normal(0, 0.03, img.shape)
    return img.astype(np.float32), body


def test_superpixels_cover_the_image():
    img, _ = _phantom_slice()
    seg = superpixels(img, min_size=50)
    assert seg.shape == img.shape and seg.dtype == np.int32
    labels = np.unique(seg)
    np.testing.assert_array_equal(labels, np.arange(labels.size))  # 0..n-1, every pixel labelled
    assert labels.size >= 3
    assert np.bincount(seg.ravel()).min() >= 50
    assert superpixels(np.zeros((16, 16))).max() == 0  # constant slice: one segment


def test_body_mask_fills_holes_and_keeps_largest_component():
    img, body = _phantom_slice()
    img[2:6, 2:6] = 1.0  # small bright speck outside the body
    m = body_mask(img)
    assert m.dtype == bool and not m[2:6, 2:6].any()
    assert m[62, 58]  # the dark organ inside is filled in
    assert not (body & ~m).any()  # the whole body, blurred outwards by at most two pixels
    assert not (m & ~ndimage.binary_dilation(body, iterations=2)).any()
    assert not body_mask(np.zeros((8, 8))).any()


def test_pseudolabel_inside_body_and_reproducible():
    img, body = _phantom_slice()
    a = superpixel_pseudolabel(img, np.random.default_rng(5), min_pixels=40, min_size=50)
    b = superpixel_pseudolabel(img, np.random.default_rng(5), min_pixels=40, min_size=50)
    assert a is not None and a.dtype == bool and a.shape == img.shape
    np.testing.assert_array_equal(a, b)
    assert a.sum() >= 40 and not (a & ~body_mask(img)).any()
    picks = {superpixel_pseudolabel(img, np.random.default_rng(s), min_pixels=40, min_size=50).sum()
             for s in range(12)}
    assert len(picks) > 1  # different superpixels get drawn


def test_pseudolabel_none_when_nothing_qualifies():
    img, _ = _phantom_slice()
    assert superpixel_pseudolabel(np.zeros((32, 32), np.float32), np.random.default_rng(0)) is None
    assert superpixel_pseudolabel(img, np.random.default_rng(0), min_pixels=10**6) is None
    seg = np.zeros(img.shape, np.int32)
    body = np.zeros(img.shape, bool)
    body[:10, :10] = True
    m = superpixel_pseudolabel(img, np.random.default_rng(0), min_pixels=50, segments=seg, body=body)
    assert m is None  # the only superpixel lies mostly outside the body
    m = superpixel_pseudolabel(img, np.random.default_rng(0), min_pixels=50, segments=seg, body=body,
                               min_inside=0.0)
    np.testing.assert_array_equal(m, body)
