"""Tests for the synthetic multi-organ phantoms (fewshot_proto.data.phantom)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fewshot_proto.data.dataset import slice_index_from_labels
from fewshot_proto.data.phantom import (LABEL_NAMES, PHANTOM_VERSION, ensure_phantoms, make_phantom,
                                        make_phantom_dataset, phantom_cache_root, phantom_dir_name, zscore)

SIZE = 64


@pytest.fixture(scope="module")
def vols():
    """Eight normalised phantoms at 64 x 64 (about half a second)."""
    return make_phantom_dataset(n_scans=8, seed=0, size=SIZE)


# ---------------------------------------------------------------------------------------------------------------
# determinism
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_gives_bit_identical_arrays():
    a = make_phantom_dataset(n_scans=2, seed=3, size=48)
    b = make_phantom_dataset(n_scans=2, seed=3, size=48)
    for va, vb in zip(a, b):
        assert va.image.tobytes() == vb.image.tobytes()
        assert va.label.tobytes() == vb.label.tobytes()
        assert np.array_equal(va.affine, vb.affine)
        assert va.spacing == vb.spacing


def test_make_phantom_is_a_function_of_the_generator_state():
    a = make_phantom(np.random.default_rng(11), size=48)
    b = make_phantom(np.random.default_rng(11), size=48)
    c = make_phantom(np.random.default_rng(12), size=48)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_different_seeds_differ_and_scan_k_does_not_depend_on_n_scans():
    a = make_phantom_dataset(n_scans=3, seed=0, size=48)
    b = make_phantom_dataset(n_scans=2, seed=0, size=48)
    c = make_phantom_dataset(n_scans=1, seed=1, size=48)
    for va, vb in zip(a[:2], b):
        assert np.array_equal(va.image, vb.image) and np.array_equal(va.label, vb.label)
    assert a[0].shape != c[0].shape or not np.array_equal(a[0].label, c[0].label)
    # scans within one dataset differ (their own pose, slice count, bias, ...)
    assert len({v.n_slices for v in a}) > 1 or not np.array_equal(a[0].label, a[1].label)


# ---------------------------------------------------------------------------------------------------------------
# arrays, geometry, metadata
# ---------------------------------------------------------------------------------------------------------------


def test_shapes_dtypes_ids_and_geometry(vols):
    assert [v.id for v in vols] == [str(k) for k in range(1, 9)]
    for v in vols:
        z, h, w = v.shape
        assert (h, w) == (SIZE, SIZE) and 24 <= z <= 40
        assert v.image.dtype == np.float32 and v.label.dtype == np.int16
        assert v.label.shape == v.image.shape
        assert set(np.unique(v.label)) <= {0, 1, 2, 3, 4}
        assert np.isfinite(v.image).all()
        # normalised per volume (z-score)
        assert abs(float(v.image.mean())) < 1e-3 and abs(float(v.image.std()) - 1) < 1e-3
        assert v.meta["normalised"] == "zscore" and v.meta["phantom_version"] == PHANTOM_VERSION
        assert v.meta["label_names"] == LABEL_NAMES
        assert v.slice_axis == 2
        # affine of the file layout (H, W, Z): column norms are the zooms (y, x, z); it is not the identity
        sz, sy, sx = v.spacing
        assert all(s > 0 for s in v.spacing)
        assert np.allclose(np.linalg.norm(v.affine[:3, :3], axis=0), [sy, sx, sz])
        assert not np.allclose(v.affine, np.eye(4)) and np.abs(v.affine[:3, 3]).max() > 0
        assert 3.0 <= sz <= 12.0 and 4.0 <= sx <= 7.0  # FOV 340..420 mm over 64 pixels


def test_slice_count_range_is_respected():
    vols = make_phantom_dataset(n_scans=4, seed=2, size=40, n_slices_range=(14, 15))
    assert {v.n_slices for v in vols} <= {14, 15}
    assert all(v.classes() == [1, 2, 3, 4] for v in vols)


def test_raw_images_are_non_negative_integers_and_zscore_gives_the_normalised_image():
    raw = make_phantom(np.random.default_rng(5), size=48, normalise=False)
    norm = make_phantom(np.random.default_rng(5), size=48)
    assert raw.meta["normalised"] == "none"
    assert raw.image.min() >= 0 and raw.image.max() < 32768
    assert np.array_equal(raw.image, np.rint(raw.image))
    assert np.array_equal(raw.label, norm.label)
    np.testing.assert_allclose(zscore(raw.image), norm.image, atol=1e-5)


def test_body_outline_with_background_outside(vols):
    for v in vols:
        # the corners of every slice are air: darker than anything inside the body
        corners = v.image[:, :3, :3]
        organs = v.image[v.label > 0]
        assert corners.mean() < np.percentile(organs, 5)


def test_invalid_arguments_raise_value_error():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="size"):
        make_phantom(rng, size=16)
    with pytest.raises(ValueError, match="n_slices_range"):
        make_phantom(rng, n_slices_range=(30, 20))
    with pytest.raises(ValueError, match="Generator"):
        make_phantom(0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_scans"):
        make_phantom_dataset(n_scans=0)


# ---------------------------------------------------------------------------------------------------------------
# anatomy: classes, sizes, contact, z-layout (Setting 2)
# ---------------------------------------------------------------------------------------------------------------


def test_every_scan_has_all_four_organs(vols):
    for v in vols:
        assert v.classes() == [1, 2, 3, 4], v.id


def test_class_size_ordering(vols):
    sizes = np.array([[int((v.label == c).sum()) for c in (1, 2, 3, 4)] for v in vols])
    # the liver is the largest organ in every scan, several times any other
    assert (sizes[:, 0] > 3 * sizes[:, 1:].max(axis=1)).all()
    # the spleen is larger than the kidneys on average
    assert sizes[:, 3].mean() > sizes[:, 1].mean() and sizes[:, 3].mean() > sizes[:, 2].mean()


def _touches(label: np.ndarray, a: int, others) -> bool:
    """Some voxel of class ``a`` has an in-plane 4-neighbour of a class in ``others``."""
    m = label == a
    o = np.isin(label, list(others))
    return bool((m[:, 1:] & o[:, :-1]).any() or (m[:, :-1] & o[:, 1:]).any()
                or (m[:, :, 1:] & o[:, :, :-1]).any() or (m[:, :, :-1] & o[:, :, 1:]).any())


def test_organs_touch_in_most_scans(vols):
    n_liver = sum(_touches(v.label, 1, (2, 3, 4)) for v in vols)
    n_kidney = sum(_touches(v.label, 2, (1,)) or _touches(v.label, 3, (4,)) for v in vols)
    assert n_liver >= 0.75 * len(vols)
    assert n_kidney >= 0.75 * len(vols)


def test_kidneys_lie_lower_than_liver_and_spleen_with_overlap(vols):
    index = slice_index_from_labels(((v.id, v.label) for v in vols), dataset="phantom")
    for v in vols:
        liver, spleen = index.slices(1, v.id), index.slices(4, v.id)
        rk, lk = index.slices(2, v.id), index.slices(3, v.id)
        assert np.mean(rk) < np.mean(liver) and np.mean(lk) < np.mean(spleen)
        assert min(rk) < min(liver) and max(liver) > max(lk)
        assert set(rk) & set(liver)  # partly shared z-range (where the right kidney presses into the liver)


@pytest.mark.parametrize("test_classes", [(2, 3), (1, 4)])
def test_setting2_leaves_training_slices_for_both_test_groups(vols, test_classes):
    """Setting 2 drops every slice containing ANY test class; the other organs must keep slices."""
    index = slice_index_from_labels(((v.id, v.label) for v in vols), dataset="phantom")
    train_classes = [c for c in (1, 2, 3, 4) if c not in test_classes]
    for v in vols:
        banned = set(index.slices_with_any(test_classes, v.id))
        kept = [z for z in range(v.n_slices) if z not in banned]
        assert kept, v.id
        with_train = set(index.slices_with_any(train_classes, v.id)) - banned
        assert len(with_train) >= 2, (v.id, test_classes)


# ---------------------------------------------------------------------------------------------------------------
# difficulty: an intensity threshold taken from the support organ scores poorly
# ---------------------------------------------------------------------------------------------------------------


def _threshold_dice(vols, cls: int) -> float:
    """Benchmark (a): support = middle slice of ``cls`` in scan 1; 5th..95th percentile grey range; 3-D Dice
    over each other scan's ground-truth z-slab of the organ, averaged over scans."""
    sup = vols[0]
    zs = np.flatnonzero((sup.label == cls).any(axis=(1, 2)))
    z = zs[len(zs) // 2]
    lo, hi = np.percentile(sup.image[z][sup.label[z] == cls], [5, 95])
    out = []
    for v in vols[1:]:
        qz = np.flatnonzero((v.label == cls).any(axis=(1, 2)))
        img, gt = v.image[qz[0]:qz[-1] + 1], v.label[qz[0]:qz[-1] + 1] == cls
        pred = (img >= lo) & (img <= hi)
        out.append(2.0 * (pred & gt).sum() / (pred.sum() + gt.sum()))
    return float(np.mean(out))


@pytest.mark.parametrize("cls", [1, 2, 3, 4])
def test_intensity_threshold_predictor_scores_poorly(vols, cls):
    assert _threshold_dice(vols, cls) < 0.4


def test_organ_grey_values_overlap_the_background(vols):
    """Each organ's central grey range also covers a sizeable share of the unlabelled body tissue."""
    for cls in (1, 2, 3, 4):
        shares = []
        for v in vols:
            body = (v.label == 0) & (v.image > np.percentile(v.image, 60))  # unlabelled, inside the body
            lo, hi = np.percentile(v.image[v.label == cls], [25, 75])
            shares.append(float(((v.image >= lo) & (v.image <= hi) & body).sum()) / (v.label == cls).sum())
        # more unlabelled voxels than organ voxels fall in the organ's own inter-quartile range
        assert np.median(shares) > 1.0, (cls, shares)


# ---------------------------------------------------------------------------------------------------------------
# on-disk cache
# ---------------------------------------------------------------------------------------------------------------


def test_ensure_phantoms_writes_once_atomically(tmp_path: Path):
    import nibabel as nib

    folder = ensure_phantoms(cache_dir=tmp_path, n_scans=3, seed=4, size=48)
    assert folder == tmp_path / phantom_dir_name(3, 4, 48)
    assert folder.name == f"phantoms-v{PHANTOM_VERSION}-n3-s4-48"
    assert (folder / "COMPLETE").is_file() and (folder / "phantom.json").is_file()
    niftis = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert niftis == sorted([f"image_{i}.nii.gz" for i in "123"] + [f"label_{i}.nii.gz" for i in "123"])
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no temporary folder left behind

    raw = make_phantom_dataset(n_scans=3, seed=4, size=48, normalise=False)
    for v in raw:
        img = nib.load(str(folder / f"image_{v.id}.nii.gz"))
        lab = nib.load(str(folder / f"label_{v.id}.nii.gz"))
        assert img.shape == (48, 48, v.n_slices) and lab.shape == img.shape
        np.testing.assert_allclose(img.affine, v.affine, atol=1e-4)
        np.testing.assert_allclose(lab.affine, v.affine, atol=1e-4)
        np.testing.assert_allclose(img.header.get_zooms(), (v.spacing[1], v.spacing[2], v.spacing[0]), rtol=1e-5)
        # stored exactly: (H, W, Z) file array, slice axis 2
        assert np.array_equal(np.asarray(img.dataobj).transpose(2, 0, 1), v.image)
        assert np.array_equal(np.asarray(lab.dataobj).transpose(2, 0, 1), v.label)

    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    again = ensure_phantoms(cache_dir=tmp_path, n_scans=3, seed=4, size=48)
    assert again == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes


def test_ensure_phantoms_replaces_an_incomplete_folder(tmp_path: Path):
    stale = tmp_path / phantom_dir_name(1, 0, 40)
    stale.mkdir()
    (stale / "image_1.nii.gz").write_bytes(b"half written")
    folder = ensure_phantoms(cache_dir=tmp_path, n_scans=1, seed=0, size=40)
    assert folder == stale and (folder / "COMPLETE").is_file()
    assert (folder / "image_1.nii.gz").stat().st_size > 100
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_cache_root_from_argument_environment_or_home(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_PROTO_CACHE", str(tmp_path / "env"))
    assert phantom_cache_root() == tmp_path / "env"
    assert phantom_cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("FEWSHOT_PROTO_CACHE")
    assert phantom_cache_root() == Path.home() / ".cache" / "fewshot_proto"
    monkeypatch.setenv("FEWSHOT_PROTO_CACHE", str(tmp_path / "env"))
    folder = ensure_phantoms(n_scans=1, seed=0, size=40)
    assert folder.parent == tmp_path / "env" and os.path.isdir(folder)


def test_phantom_folder_reads_back_through_the_alpnet_reader(tmp_path: Path):
    """The SSL-ALPNet reader (z-score per volume) returns what ``make_phantom_dataset`` returns in memory."""
    from fewshot_proto.data.readers import AlpnetDataset

    folder = ensure_phantoms(cache_dir=tmp_path, n_scans=2, seed=6, size=40)
    ds = AlpnetDataset(folder)
    assert ds.ids == ["1", "2"]
    assert ds.label_names == LABEL_NAMES
    for mem in make_phantom_dataset(n_scans=2, seed=6, size=40):
        vol = ds.load(mem.id)
        assert vol.image.shape == mem.image.shape
        np.testing.assert_allclose(vol.image, mem.image, atol=1e-4)
        assert np.array_equal(vol.label, mem.label)
        np.testing.assert_allclose(vol.affine, mem.affine, atol=1e-4)
        np.testing.assert_allclose(vol.spacing, mem.spacing, rtol=1e-5)
