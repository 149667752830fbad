"""The built-in phantom dataset: deterministic, anatomically laid out, hard for trivial predictors, cached once."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.data.phantom import (LABEL_NAMES, PHANTOM_VERSION, ensure_phantoms, make_phantom,
                                        make_phantom_dataset, phantom_dir_name)


@pytest.fixture(scope="module")
def small_set():
    return make_phantom_dataset(n_scans=4, seed=3, size=64)


def test_deterministic_and_independent_of_count():
    a = make_phantom(np.random.default_rng(7), size=64)
    b = make_phantom(np.random.default_rng(7), size=64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    c = make_phantom(np.random.default_rng(8), size=64)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)
    two = make_phantom_dataset(n_scans=2, seed=3, size=64)
    three = make_phantom_dataset(n_scans=3, seed=3, size=64)
    assert np.array_equal(two[1].image, three[1].image)


def test_shapes_classes_and_sizes(small_set):
    for v in small_set:
        assert v.image.dtype == np.float32 and v.label.dtype == np.int16
        assert v.image.shape[1:] == (64, 64) and 24 <= v.image.shape[0] <= 40
        assert v.classes() == [1, 2, 3, 4]
        counts = {c: int((v.label == c).sum()) for c in LABEL_NAMES}
        assert counts[1] == max(counts.values()), counts  # liver is the largest organ
        assert not np.allclose(v.affine, np.eye(4))
        assert np.isfinite(v.image).all()


def test_organs_touch_and_setting2_leaves_training_slices(small_set):
    from scipy import ndimage

    touching = 0
    for v in small_set:
        liver = ndimage.binary_dilation(v.label == 1, iterations=1)
        touching += bool((liver & np.isin(v.label, [2, 3, 4])).any())
        per_z = {c: (v.label == c).reshape(v.n_slices, -1).any(1) for c in LABEL_NAMES}
        assert (~(per_z[2] | per_z[3]) & (per_z[1] | per_z[4])).any()  # slices free of {2,3} with training organs
        assert (~(per_z[1] | per_z[4]) & (per_z[2] | per_z[3])).any()  # slices free of {1,4} with kidneys
        kid = np.flatnonzero(per_z[2] | per_z[3])
        upper = np.flatnonzero(per_z[1] | per_z[4])
        assert kid.mean() < upper.mean()  # kidneys lower than liver and spleen
    assert touching >= len(small_set) - 1


def test_intensity_threshold_predictor_scores_low(small_set):
    """A grey-value range taken from the support organ must not segment the organ in other scans."""
    s = small_set[0]
    for c in (2, 3, 4):
        zs = np.flatnonzero((s.label == c).reshape(s.n_slices, -1).any(1))
        z = zs[len(zs) // 2]
        vals = s.image[z][s.label[z] == c]
        lo, hi = np.percentile(vals, [5, 95])
        dices = []
        for q in small_set[1:]:
            qz = np.flatnonzero((q.label == c).reshape(q.n_slices, -1).any(1))
            img, gt = q.image[qz[0]:qz[-1] + 1], q.label[qz[0]:qz[-1] + 1] == c
            pred = (img >= lo) & (img <= hi)
            dices.append(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
        assert np.mean(dices) < 0.4, (c, dices)


def test_ensure_phantoms_writes_once(tmp_path):
    import nibabel as nib

    folder = ensure_phantoms(tmp_path, n_scans=3, seed=1, size=32)
    assert folder.name == phantom_dir_name(3, 1, 32) and f"v{PHANTOM_VERSION}" in folder.name
    files = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert files == [f"{k}_{i}.nii.gz" for k in ("image", "label") for i in (1, 2, 3)]
    img = nib.load(str(folder / "image_2.nii.gz"))
    vol = make_phantom_dataset(n_scans=3, seed=1, size=32, normalise=False)[1]
    assert img.shape == (32, 32, vol.n_slices) and np.allclose(img.affine, vol.affine)
    mtime = (folder / "image_1.nii.gz").stat().st_mtime_ns
    assert ensure_phantoms(tmp_path, n_scans=3, seed=1, size=32) == folder
    assert (folder / "image_1.nii.gz").stat().st_mtime_ns == mtime
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def _median_slice_fraction(label_zhw: np.ndarray, c: int) -> float:
    """Median over the slices that contain class ``c`` of the fraction of the slice it covers."""
    per_z = (label_zhw == c).reshape(label_zhw.shape[0], -1).mean(1)
    return float(np.median(per_z[per_z > 0]))


@pytest.mark.realdata
def test_organ_sizes_match_chaos_t2(real_data_dir):
    """Version 3's size constants: each organ's median per-slice area (fraction of the image, median over scans)
    is within 20 % of CHAOS-T2's, the benchmark the phantoms imitate. Version 2's kidneys were 3x too small."""
    from fewshot_proto.data import open_dataset

    chaos = open_dataset(real_data_dir / "chaos_t2")
    assert len(chaos.ids) == 20
    real = {c: [] for c in LABEL_NAMES}
    for scan_id in chaos.ids:
        lab = chaos.load_label(scan_id)  # [Z, H, W], read from the label file only
        for c in LABEL_NAMES:
            real[c].append(_median_slice_fraction(lab, c))
    ours = {c: [] for c in LABEL_NAMES}
    for v in make_phantom_dataset(n_scans=10, seed=0, size=128):
        for c in LABEL_NAMES:
            ours[c].append(_median_slice_fraction(v.label, c))
    for c, name in LABEL_NAMES.items():
        r, o = float(np.median(real[c])), float(np.median(ours[c]))
        assert abs(o / r - 1) < 0.2, f"{name}: phantom {100 * o:.2f} % of a slice, CHAOS-T2 {100 * r:.2f} %"
