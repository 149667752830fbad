"""predict_volume: chunk mapping by relative position, output labels, supervised models, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fewshot_proto.engine.predictor import predict_volume, relative_chunks
from fewshot_proto.errors import DataError
from fewshot_proto.models import build_model
from fewshot_proto.types import Volume


def test_relative_chunks_map_the_support_extent_onto_the_query():
    # support organ spans slices 10..19 of 40 (slice centres at relative 0.2625..0.4875); a 20-slice query's
    # slice i sits at (i + 0.5) / 20: i <= 6 fall in the first third of that extent (or below it), i = 7 in the
    # middle third, i >= 8 in the last third (or above it)
    ch = relative_chunks(20, list(range(10, 20)), 40, 3)
    assert ch.tolist() == [0] * 7 + [1] + [2] * 12


def _vol(seed, with_label=True):
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(6, 32, 32)).astype(np.float32)
    lab = np.zeros((6, 32, 32), np.int16)
    lab[1:5, 8:16, 8:16] = 1
    lab[2:4, 20:28, 20:28] = 2
    return Volume(id=str(seed), image=img, label=lab if with_label else None)


@pytest.mark.parametrize("name,kw", [("cwpa_unet", {}), ("unet", {"base_channels": 4, "classes": [1, 2]})])
def test_predict_volume_labels_and_shape(name, kw):
    torch.manual_seed(0)
    model = build_model(name, **kw).eval()
    out, probs = predict_volume(model, [_vol(0)], _vol(1, with_label=False), [1, 2], size=32, return_probs=True)
    assert out.shape == (6, 32, 32) and out.dtype == np.int16
    assert set(np.unique(out)) <= {0, 1, 2}
    assert set(probs) == {1, 2} and all(p.shape == (6, 32, 32) for p in probs.values())
    # the label is the class with the highest probability wherever that probability passes the threshold
    stack = np.stack([probs[1], probs[2]])
    expect = np.where(stack.max(0) >= 0.5, np.array([1, 2])[stack.argmax(0)], 0)
    assert np.array_equal(out, expect)


def test_support_without_the_class_is_an_error():
    model = build_model("cwpa_unet").eval()
    with pytest.raises(DataError, match="no voxel of class 3"):
        predict_volume(model, [_vol(0)], _vol(1, with_label=False), [3], size=32)
