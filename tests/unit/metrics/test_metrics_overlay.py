"""PNG overlays: file size/layout, tint colours where the masks are, slice picking, support mapping."""
from __future__ import annotations

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from fewshot_proto.metrics.overlay import (  # noqa: E402
    LABEL_H,
    PANEL_GAP,
    PRED_COLOR,
    SUPPORT_COLOR,
    TITLE_H,
    TRUTH_COLOR,
    mask_contour,
    pick_slices,
    save_overlay,
    save_volume_overlays,
    to_uint8,
)

H, W = 24, 32


def _img(seed=0):
    return np.random.default_rng(seed).normal(size=(H, W)).astype(np.float32) * 50 + 100


def _box(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_to_uint8_and_contour():
    a = np.array([[2.0, 4.0], [6.0, 10.0]])
    np.testing.assert_array_equal(to_uint8(a), [[0, 64], [128, 255]])
    assert to_uint8(np.full((3, 3), 7.0)).max() == 0
    assert to_uint8(np.stack([a, a * 0])).tolist() == to_uint8(a).tolist()  # [C,H,W] -> first channel
    m = np.zeros((5, 5), dtype=bool)
    m[1:4, 1:4] = True
    c = mask_contour(m)
    assert c.sum() == 8 and not c[2, 2]


def test_save_overlay_size_and_colours(tmp_path):
    sup_mask = _box(2, 10, 2, 12)
    pred = _box(5, 15, 5, 20)
    truth = _box(8, 20, 10, 28)
    p = save_overlay(tmp_path / "sub" / "ov.png", _img(1), sup_mask, _img(2), pred, truth)
    assert p.exists() and p.stat().st_size > 0
    im = np.asarray(Image.open(p).convert("RGB")).astype(int)
    assert im.shape == (H + LABEL_H, 3 * W + 2 * PANEL_GAP, 3)

    def px(panel, y, x):
        return im[LABEL_H + y, panel * (W + PANEL_GAP) + x]

    # solid contour pixels carry the exact colour
    assert tuple(px(0, 2, 2)) == SUPPORT_COLOR
    assert tuple(px(1, 5, 5)) == PRED_COLOR
    assert tuple(px(2, 8, 10)) == TRUTH_COLOR
    # interior pixels are tinted towards the colour; outside pixels stay grey
    r, g, b = px(1, 10, 12)
    assert r > g + 40 and r > b + 40
    r, g, b = px(2, 14, 18)
    assert g > r + 40 and g > b + 40
    r, g, b = px(1, 21, 2)
    assert r == g == b
    # the label band holds text (non-black pixels)
    assert im[:LABEL_H].max() > 0


def test_save_overlay_title_scale_and_missing_truth(tmp_path):
    p = save_overlay(tmp_path / "t.png", _img(), None, _img(3), _box(1, 3, 1, 3), None, "liver z=4", scale=2)
    im = Image.open(p)
    assert im.size == (3 * 2 * W + 2 * PANEL_GAP, 2 * H + LABEL_H + TITLE_H)
    # support of another size is resized to the query size
    small = np.random.default_rng(0).random((12, 16))
    p2 = save_overlay(tmp_path / "s.png", small, small > 0.5, _img(), None, None)
    assert Image.open(p2).size == (3 * W + 2 * PANEL_GAP, H + LABEL_H)
    with pytest.raises(ValueError, match="mask shape"):
        save_overlay(tmp_path / "bad.png", _img(), None, _img(), np.zeros((3, 3)), None)


def test_pick_slices_known_answer():
    truth = np.zeros((14, 4, 4), dtype=bool)
    truth[2:11, 1:3, 1:3] = True
    truth[7] = True  # largest area
    # z-range 2..10 in 3 chunks [2,5) [5,8) [8,11): centres 3, 6, 9; plus the largest slice 7
    assert pick_slices(truth) == [3, 6, 7, 9]
    assert pick_slices(truth, max_slices=2) == [3, 7]
    assert pick_slices(np.zeros((5, 2, 2))) == [2]
    pred = np.zeros((6, 2, 2))
    pred[4] = 1
    assert pick_slices(np.zeros((6, 2, 2)), pred) == [4]


def test_save_volume_overlays_maps_query_chunks_to_supports(tmp_path):
    z = 12
    q = np.random.default_rng(0).normal(size=(z, H, W))
    truth = np.zeros((z, H, W), dtype=np.uint8)
    truth[3:12, 4:20, 4:20] = 1  # z-range 3..11, chunks [3,6) [6,9) [9,12)
    pred = truth.copy()
    sup = np.random.default_rng(1).normal(size=(3, H, W))
    sup_masks = np.zeros((3, H, W), dtype=np.uint8)
    for k in range(3):  # support mask k covers columns 8k..8k+5 only
        sup_masks[k, 2:10, 8 * k : 8 * k + 6] = 1
    paths = save_volume_overlays(tmp_path, q, pred, truth, sup, sup_masks, prefix="s1_c2_")
    # every truth slice has the same area -> the first (3) is "largest"; chunk centres 4, 7, 10
    assert [p.name for p in paths] == ["s1_c2_z003.png", "s1_c2_z004.png", "s1_c2_z007.png", "s1_c2_z010.png"]
    for p, k in zip(paths, [0, 0, 1, 2]):
        im = np.asarray(Image.open(p).convert("RGB"))
        top = LABEL_H + TITLE_H
        row = im[top + 5, :W]  # support panel, a row through every support mask
        tinted = [x for x in range(W) if not (row[x, 0] == row[x, 1] == row[x, 2])]
        assert min(tinted) == 8 * k and max(tinted) == 8 * k + 5
    got = save_volume_overlays(tmp_path / "b", q, pred, truth, sup, sup_masks, zs=[0], support_index=lambda z: 2)
    assert len(got) == 1 and got[0].exists()
    with pytest.raises(ValueError, match="out of range"):
        save_volume_overlays(tmp_path / "c", q, pred, truth, sup, sup_masks, zs=[z])
