"""Slice preparation: resize, channel tiling, prepare_slices."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.data.transforms import prepare_slices, resize_mask, resize_slice, to_channels
from fewshot_proto.types import Volume

pytest.importorskip("torch")


def test_resize_is_noop_at_target_size():
    x = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    np.testing.assert_array_equal(resize_slice(x, 8), x)
    m = np.arange(64).reshape(8, 8).astype(np.int16)
    out = resize_mask(m, 8)
    np.testing.assert_array_equal(out, m)
    assert out.dtype == np.int16


def test_resize_bilinear_known_values():
    out = resize_slice(np.array([[0.0, 1.0], [0.0, 1.0]]), 4)
    assert out.dtype == np.float32 and out.shape == (4, 4)
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)  # half-pixel centres, no antialias


def test_resize_mask_nearest_exact():
    m = np.array([[0, 1], [2, 3]], np.uint8)
    up = resize_mask(m, 4)
    np.testing.assert_array_equal(up, np.kron(m, np.ones((2, 2), np.uint8)))
    down = resize_mask(up, 2)
    np.testing.assert_array_equal(down, m)
    big = np.zeros((10, 10), np.int16)
    big[2:8, 3:7] = 4
    assert set(np.unique(resize_mask(big, 7))) <= {0, 4}


def test_to_channels():
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = to_channels(x)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    assert all(np.array_equal(out[c], x) for c in range(3))
    assert to_channels(np.zeros((4, 2, 3)), c=1).shape == (4, 1, 2, 3)
    with pytest.raises(ValueError):
        to_channels(np.zeros(3))


def test_prepare_slices_shapes_and_values():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(5, 12, 10)).astype(np.float32)
    lab = np.zeros((5, 12, 10), np.int16)
    lab[2, 3:9, 2:8] = 2
    vol = Volume(id="a", image=img, label=lab)
    x, y = prepare_slices(vol, [2, 0, 2], 16)
    assert x.shape == (3, 3, 16, 16) and x.dtype == np.float32
    assert y.shape == (3, 16, 16) and y.dtype == np.int64
    np.testing.assert_array_equal(x[0], x[2])
    assert set(np.unique(y[0])) == {0, 2} and not y[1].any()
    x2, y2 = prepare_slices(Volume(id="b", image=img[:, :10], label=None), [1], 10)
    np.testing.assert_array_equal(x2[0, 1], img[1, :10])  # already at size: untouched
    assert y2 is None
    with pytest.raises(IndexError, match="5 slices"):
        prepare_slices(vol, [5], 16)
