"""NIfTI readers: layouts, label handling, error messages, write-back and the on-disk SliceIndex cache."""
from __future__ import annotations

import gzip
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fewshot_proto.config import DataConfig
from fewshot_proto.data.readers import (
    AlpnetDataset,
    MSDDataset,
    dataset_from_config,
    detect_layout,
    open_dataset,
    write_prediction,
)
from fewshot_proto.errors import DataError

nib = pytest.importorskip("nibabel")

SHAPE = (6, 7, 5)  # file axes (x, y, z); slices along axis 2
AFFINE = np.array([[-0.5, 0, 0, 10.0], [0, 0.8, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])


def _label(seed: int, values=(1, 2)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8 if max(values) < 256 else np.int16)
    lab[1:3, 1:3, 1] = values[0]
    lab[3:5, 2:6, 2:4] = values[1]
    lab[rng.integers(0, 6), rng.integers(0, 7), 4] = values[0]
    return lab


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(100 + seed).normal(50, 10, SHAPE).astype(np.float32)


@pytest.fixture
def alpnet_dir(tmp_path, write_nifti):
    root = tmp_path / "alp"
    for sid in ("10", "2", "1"):
        write_nifti(root / f"image_{sid}.nii.gz", _image(int(sid)), AFFINE)
        write_nifti(root / f"label_{sid}.nii.gz", _label(int(sid)), AFFINE)
    (root / "superpix-MIDDLE_1.nii.gz").write_bytes(b"ignored")
    return root


@pytest.fixture
def msd_dir(tmp_path, write_nifti):
    root = tmp_path / "Task04"
    training = []
    for k, sid in enumerate(["hip_003", "hip_001", "hip_010"]):
        write_nifti(root / "imagesTr" / f"{sid}.nii.gz", _image(k), AFFINE)
        write_nifti(root / "labelsTr" / f"{sid}.nii.gz", _label(k), AFFINE)
        training.append({"image": f"./imagesTr/{sid}.nii.gz", "label": f"./labelsTr/{sid}.nii.gz"})
    (root / "imagesTr" / "._hip_001.nii.gz").write_bytes(b"macOS junk")
    meta = {"name": "Hip", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# ---------------------------------------------------------------------------------------------- layouts and load


def test_alpnet_ids_natural_sorted_and_load(alpnet_dir):
    ds = AlpnetDataset(alpnet_dir)
    assert ds.ids == ["1", "2", "10"]
    assert ds.name == "alp" and len(ds) == 3
    v = ds.load("2")
    assert v.image.shape == (5, 6, 7) and v.image.dtype == np.float32
    assert v.label.shape == (5, 6, 7) and v.label.dtype == np.int16
    assert abs(float(v.image.mean())) < 1e-5 and abs(float(v.image.std()) - 1.0) < 1e-4
    np.testing.assert_array_equal(v.label, np.moveaxis(_label(2), 2, 0))
    assert v.spacing == pytest.approx((3.0, 0.5, 0.8))
    np.testing.assert_allclose(v.affine, AFFINE)
    assert v.slice_axis == 2 and v.path == alpnet_dir / "image_2.nii.gz"
    assert "header" in v.meta and v.meta["label_path"] == alpnet_dir / "label_2.nii.gz"
    assert v.classes() == [1, 2]
    assert ds.load("2") is v  # LRU cache


def test_slice_axis_zero(alpnet_dir):
    v = AlpnetDataset(alpnet_dir, slice_axis=0).load("1")
    assert v.image.shape == (6, 7, 5) and v.spacing == pytest.approx((0.5, 0.8, 3.0))
    np.testing.assert_array_equal(v.label, _label(1))


def test_load_label_reads_only_the_label_file(alpnet_dir):
    ds = AlpnetDataset(alpnet_dir)
    (alpnet_dir / "image_1.nii.gz").write_bytes(b"not a nifti")
    np.testing.assert_array_equal(ds.load_label("1"), np.moveaxis(_label(1), 2, 0))
    with pytest.raises(DataError, match="image_1.nii.gz"):
        ds.load("1")


def test_msd_layout_and_label_names(msd_dir):
    ds = open_dataset(msd_dir)
    assert isinstance(ds, MSDDataset)
    assert ds.ids == ["hip_001", "hip_003", "hip_010"]
    assert ds.label_names == {1: "Anterior", 2: "Posterior"}
    v = ds.load("hip_010")
    assert v.meta["label_names"] == {1: "Anterior", 2: "Posterior"}
    np.testing.assert_array_equal(v.label, np.moveaxis(_label(2), 2, 0))


def test_msd_nnunet_channel_suffix_and_v2_labels(tmp_path, write_nifti):
    root = tmp_path / "Dataset004"
    for k, sid in enumerate(["case_2", "case_10"]):
        write_nifti(root / "imagesTr" / f"{sid}_0000.nii.gz", _image(k), AFFINE)
        write_nifti(root / "labelsTr" / f"{sid}.nii.gz", _label(k), AFFINE)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                                                   "file_ending": ".nii.gz"}))
    ds = open_dataset(root)
    assert ds.ids == ["case_2", "case_10"]
    assert ds.label_names == {1: "Anterior", 2: "Posterior"}
    assert ds.paths("case_10")[0].name == "case_10_0000.nii.gz"
    assert ds.load("case_10").image.shape == (5, 6, 7)
    # a second channel is rejected
    write_nifti(root / "imagesTr" / "case_2_0001.nii.gz", _image(0), AFFINE)
    with pytest.raises(DataError, match="case_2.*several channels"):
        open_dataset(root)


def test_msd_training_list_tolerates_0000_suffix(msd_dir):
    os.rename(msd_dir / "imagesTr" / "hip_003.nii.gz", msd_dir / "imagesTr" / "hip_003_0000.nii.gz")
    assert MSDDataset(msd_dir).paths("hip_003")[0].name == "hip_003_0000.nii.gz"


def test_msd_missing_listed_image(msd_dir):
    (msd_dir / "imagesTr" / "hip_003.nii.gz").unlink()
    with pytest.raises(DataError, match=r"hip_003.*imagesTr/hip_003.nii.gz.*does not exist"):
        MSDDataset(msd_dir)


def test_detect_layout(alpnet_dir, msd_dir, tmp_path):
    assert detect_layout(alpnet_dir) == "alpnet" and detect_layout(msd_dir) == "msd"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"dataset.json or imagesTr.*image_<id>.nii.gz"):
        open_dataset(tmp_path / "other")
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown layout"):
        open_dataset(alpnet_dir, layout="nnunet")


def test_open_dataset_none_uses_phantoms(alpnet_dir, monkeypatch):
    calls = []
    fake = types.ModuleType("fewshot_proto.data.phantom")

    def ensure_phantoms(cache_dir=None):
        calls.append(cache_dir)
        return alpnet_dir

    fake.ensure_phantoms = ensure_phantoms
    monkeypatch.setitem(sys.modules, "fewshot_proto.data.phantom", fake)
    ds = open_dataset(None)
    assert isinstance(ds, AlpnetDataset) and ds.name == "phantom" and calls == [None]
    ds2 = dataset_from_config(DataConfig(root=None, cache_volumes=2))
    assert ds2.name == "phantom" and ds2.ids == ["1", "2", "10"]


def test_dataset_from_config(alpnet_dir):
    cfg = DataConfig(root=str(alpnet_dir), layout="alpnet", label_map={1: 3, 2: 1}, normalise="none")
    ds = dataset_from_config(cfg)
    v = ds.load("1")
    np.testing.assert_allclose(v.image, np.moveaxis(_image(1), 2, 0), rtol=1e-6)
    assert set(np.unique(v.label)) == {0, 1, 3}


# ---------------------------------------------------------------------------------------------- labels


def test_label_map_and_unmapped(tmp_path, write_nifti):
    root = tmp_path / "ct"
    lab = _label(1, values=(200, 500)).astype(np.int16)
    lab[0, 0, 0] = 600
    lab[5, 6, 4] = 7  # a value the map does not know
    write_nifti(root / "image_1.nii.gz", _image(1), AFFINE)
    write_nifti(root / "label_1.nii.gz", lab, AFFINE)
    lm = {200: 1, 500: 2, 600: 3}
    with pytest.raises(DataError, match=r"label_1.nii.gz.*\[7\].*not in label_map"):
        AlpnetDataset(root, label_map=lm).load("1")
    v = AlpnetDataset(root, label_map=lm, drop_unmapped=True).load("1")
    out = np.moveaxis(v.label, 0, 2)
    assert out[0, 0, 0] == 3 and out[5, 6, 4] == 0
    np.testing.assert_array_equal(out == 1, lab == 200)
    np.testing.assert_array_equal(out == 2, lab == 500)
    # without a map, values beyond int16 are refused
    big = lab.astype(np.int32)
    big[0, 0, 0] = 40000
    write_nifti(root / "label_1.nii.gz", big, AFFINE)
    with pytest.raises(DataError, match=r"label_1.nii.gz: label values must lie in 0..32767"):
        AlpnetDataset(root).load_label("1")


def test_label_names_follow_label_map(msd_dir):
    ds = MSDDataset(msd_dir, label_map={1: 1, 2: 1})
    assert ds.label_names == {1: "Anterior+Posterior"}
    assert set(np.unique(ds.load_label("hip_001"))) == {0, 1}


def test_float_labels(tmp_path, write_nifti):
    root = tmp_path / "f"
    lab = _label(1).astype(np.float64)
    lab[0, 0, 0] = 2.0004  # within tolerance: rounds to 2
    write_nifti(root / "image_1.nii.gz", _image(1), AFFINE)
    write_nifti(root / "label_1.nii.gz", lab, AFFINE)
    got = AlpnetDataset(root).load_label("1")
    assert got.dtype == np.int16 and got[0, 0, 0] == 2
    lab[1, 1, 1] = 0.5
    write_nifti(root / "label_1.nii.gz", lab, AFFINE)
    with pytest.raises(DataError, match=r"non-integer labels in .*label_1.nii.gz: e.g. 0.5"):
        AlpnetDataset(root).load_label("1")


# ---------------------------------------------------------------------------------------------- bad input


def _one_scan(root: Path, write_nifti, image=None, label=None, iaff=AFFINE, laff=AFFINE) -> Path:
    write_nifti(root / "image_1.nii.gz", _image(1) if image is None else image, iaff)
    write_nifti(root / "label_1.nii.gz", _label(1) if label is None else label, laff)
    return root


def test_missing_partners(tmp_path, write_nifti):
    root = _one_scan(tmp_path / "a", write_nifti)
    write_nifti(root / "image_7.nii.gz", _image(7), AFFINE)
    with pytest.raises(DataError, match=r"\['7'\].*no label.*image_7.nii.gz has no label_7.nii.gz"):
        AlpnetDataset(root)
    (root / "image_7.nii.gz").unlink()
    write_nifti(root / "label_8.nii.gz", _label(8), AFFINE)
    with pytest.raises(DataError, match=r"\['8'\].*no image.*label_8.nii.gz has no image_8.nii.gz"):
        AlpnetDataset(root)


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no image_<id>.nii.gz files in .*empty"):
        AlpnetDataset(tmp_path / "empty")


def test_shape_mismatch(tmp_path, write_nifti):
    root = _one_scan(tmp_path / "s", write_nifti, label=np.zeros((6, 7, 4), np.uint8))
    with pytest.raises(DataError, match=r"shape mismatch.*image_1.nii.gz.*\(6, 7, 5\).*label_1.nii.gz.*\(6, 7, 4\)"):
        AlpnetDataset(root).load("1")


def test_affine_mismatch(tmp_path, write_nifti):
    laff = AFFINE.copy()
    laff[0, 3] += 0.5
    root = _one_scan(tmp_path / "aff", write_nifti, laff=laff)
    with pytest.raises(DataError, match=r"affine mismatch.*label_1.nii.gz.*image_1.nii.gz"):
        AlpnetDataset(root).load("1")
    laff[0, 3] = AFFINE[0, 3] + 1e-5  # within tolerance
    _one_scan(root, write_nifti, laff=laff)
    AlpnetDataset(root).load("1")


def test_nan_image(tmp_path, write_nifti):
    img = _image(1)
    img[0, 0, 0] = np.nan
    img[1, 0, 0] = np.inf
    root = _one_scan(tmp_path / "n", write_nifti, image=img)
    with pytest.raises(DataError, match=r"image_1.nii.gz: image contains 2 NaN/inf voxels"):
        AlpnetDataset(root).load("1")


def test_dimensionality(tmp_path, write_nifti):
    root = _one_scan(tmp_path / "d2", write_nifti, image=np.zeros((6, 7), np.float32))
    with pytest.raises(DataError, match=r"image_1.nii.gz: expected a 3-D volume, got shape \(6, 7\)"):
        AlpnetDataset(root).load("1")
    root = _one_scan(tmp_path / "d4", write_nifti, image=np.zeros(SHAPE + (2,), np.float32))
    with pytest.raises(DataError, match=r"image_1.nii.gz: expected a 3-D volume, got shape \(6, 7, 5, 2\)"):
        AlpnetDataset(root).load("1")
    # a 4-D file with one channel is a 3-D volume
    root = _one_scan(tmp_path / "d41", write_nifti, image=_image(1)[..., None])
    assert AlpnetDataset(root).load("1").image.shape == (5, 6, 7)


def test_corrupt_and_truncated_files(tmp_path, write_nifti):
    # truncated inside the voxel data (header intact): detected when the voxels are decoded
    big = np.random.default_rng(0).integers(0, 3, (40, 40, 20)).astype(np.uint8)
    root = _one_scan(tmp_path / "big", write_nifti, image=big.astype(np.float32), label=big)
    data = (root / "label_1.nii.gz").read_bytes()
    (root / "label_1.nii.gz").write_bytes(data[: len(data) // 2])
    ds = AlpnetDataset(root)
    with pytest.raises(DataError, match=r"cannot read voxels of .*label_1.nii.gz.*(corrupt|truncated)"):
        ds.load_label("1")
    with pytest.raises(DataError, match=r"label_1.nii.gz"):
        ds.slice_index(cache_dir=tmp_path / "cache")

    root = _one_scan(tmp_path / "c", write_nifti)
    data = (root / "label_1.nii.gz").read_bytes()
    (root / "label_1.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"label_1.nii.gz.*(corrupt|truncated)"):
        AlpnetDataset(root).load_label("1")
    (root / "label_1.nii.gz").write_bytes(b"\x00" * 20)
    with pytest.raises(DataError, match=r"label_1.nii.gz"):
        AlpnetDataset(root).load_label("1")
    # valid gzip stream holding a truncated NIfTI
    raw = gzip.decompress(data)
    (root / "label_1.nii.gz").write_bytes(gzip.compress(raw[: len(raw) - 40]))
    with pytest.raises(DataError, match=r"label_1.nii.gz"):
        AlpnetDataset(root).load_label("1")


def test_unknown_id(alpnet_dir):
    ds = AlpnetDataset(alpnet_dir)
    with pytest.raises(DataError, match=r"no scan '3'"):
        ds.load("3")
    with pytest.raises(DataError, match=r"no scan '3'"):
        ds.load_label("3")


def test_bad_arguments(alpnet_dir):
    with pytest.raises(ValueError, match="slice_axis"):
        AlpnetDataset(alpnet_dir, slice_axis=3)
    with pytest.raises(ValueError, match="normalise"):
        AlpnetDataset(alpnet_dir, normalise="minmax")


# ---------------------------------------------------------------------------------------------- normalisation


def test_ct_normalisation_uses_dataset_stats(alpnet_dir):
    ds = AlpnetDataset(alpnet_dir, normalise="ct", ct_window=(40, 60))
    mean, std = ds.compute_ct_stats(["1", "2"])
    raw = np.concatenate([np.clip(_image(i), 40, 60).ravel() for i in (1, 2)]).astype(np.float64)
    assert mean == pytest.approx(raw.mean(), rel=1e-6) and std == pytest.approx(raw.std(), rel=1e-5)
    v = ds.load("10")
    expect = (np.clip(np.moveaxis(_image(10), 2, 0), 40, 60) - mean) / std
    np.testing.assert_allclose(v.image, expect, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- write_prediction


@pytest.mark.parametrize("axis", [2, 0])
def test_write_prediction_round_trip(alpnet_dir, tmp_path, axis):
    ds = AlpnetDataset(alpnet_dir, slice_axis=axis)
    v = ds.load("2")
    pred = (v.label > 0).astype(np.int64) * 3
    out = write_prediction(pred, v, tmp_path / "pred" / "pred_2.nii.gz")
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["pred_2.nii.gz"]
    img = nib.load(str(out))
    src = nib.load(str(alpnet_dir / "image_2.nii.gz"))
    assert img.shape == SHAPE and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-6)
    assert img.header.get_zooms() == src.header.get_zooms()
    assert int(img.header["qform_code"]) == int(src.header["qform_code"])
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.moveaxis(pred, 0, axis))
    # reading the prediction back as a label of the same scan gives the same array
    np.testing.assert_array_equal(ds._label_from(img, out, SHAPE).astype(np.int64), np.moveaxis(pred, 0, axis))


def test_write_prediction_large_labels_and_errors(alpnet_dir, tmp_path):
    v = AlpnetDataset(alpnet_dir).load("1")
    pred = np.zeros(v.image.shape, np.int32)
    pred[0, 0, 0] = 300
    out = write_prediction(pred, v, tmp_path / "p.nii")
    assert nib.load(str(out)).get_data_dtype() == np.int16
    with pytest.raises(ValueError, match="shape"):
        write_prediction(pred[:2], v, tmp_path / "q.nii.gz")
    with pytest.raises(ValueError, match="integer labels"):
        write_prediction(pred.astype(np.float32), v, tmp_path / "q.nii.gz")
    with pytest.raises(ValueError, match=".nii.gz or .nii"):
        write_prediction(pred, v, tmp_path / "q.png")


# ---------------------------------------------------------------------------------------------- SliceIndex cache


def test_slice_index_content(alpnet_dir, tmp_path):
    si = AlpnetDataset(alpnet_dir).slice_index(cache_dir=tmp_path / "cache")
    assert si.scan_ids == ["1", "2", "10"] and si.classes == [1, 2]
    assert si.n_slices == {"1": 5, "2": 5, "10": 5}
    for sid in si.scan_ids:
        lab = np.moveaxis(_label(int(sid)), 2, 0)
        for c in (1, 2):
            assert si.slices(c, sid) == [int(z) for z in np.flatnonzero((lab == c).any(axis=(1, 2)))]


def test_slice_index_cache_hit_and_invalidation(alpnet_dir, tmp_path, write_nifti):
    cache = tmp_path / "cache"
    ds = AlpnetDataset(alpnet_dir)
    si = ds.slice_index(cache_dir=cache)
    assert ds.index_builds == 1
    (cfile,) = list(cache.glob("*.json"))
    mtime = cfile.stat().st_mtime_ns

    ds2 = AlpnetDataset(alpnet_dir)  # fresh object: served from disk, nothing rebuilt or rewritten
    assert ds2.slice_index(cache_dir=cache).to_dict() == si.to_dict()
    assert ds2.index_builds == 0 and cfile.stat().st_mtime_ns == mtime
    assert ds2.slice_index(cache_dir=cache) is ds2.slice_index(cache_dir=cache)

    # rewrite a label: class 2 disappears from scan 1
    lab = _label(1)
    lab[lab == 2] = 0
    write_nifti(alpnet_dir / "label_1.nii.gz", lab, AFFINE)
    si3 = ds2.slice_index(cache_dir=cache)  # the same object notices the change
    assert ds2.index_builds == 1 and "1" not in si3.scans_with(2)
    ds4 = AlpnetDataset(alpnet_dir)
    assert ds4.slice_index(cache_dir=cache).to_dict() == si3.to_dict() and ds4.index_builds == 0

    # touching a file (same bytes, new mtime) also invalidates
    st = (alpnet_dir / "label_2.nii.gz").stat()
    os.utime(alpnet_dir / "label_2.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ds5 = AlpnetDataset(alpnet_dir)
    ds5.slice_index(cache_dir=cache)
    assert ds5.index_builds == 1


def test_slice_index_cache_keyed_by_settings(alpnet_dir, tmp_path):
    cache = tmp_path / "cache"
    a = AlpnetDataset(alpnet_dir)
    a.slice_index(cache_dir=cache)
    b = AlpnetDataset(alpnet_dir, label_map={1: 1}, drop_unmapped=True)
    si = b.slice_index(cache_dir=cache)
    assert b.index_builds == 1 and si.classes == [1]
    assert len(list(cache.glob("*.json"))) == 2


def test_slice_index_default_cache_dir_and_corrupt_cache(alpnet_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_PROTO_CACHE", str(tmp_path / "fpc"))
    ds = AlpnetDataset(alpnet_dir)
    ds.slice_index()
    (cfile,) = list((tmp_path / "fpc" / "index").glob("*.json"))
    cfile.write_text("{not json")
    ds2 = AlpnetDataset(alpnet_dir)
    assert ds2.slice_index().classes == [1, 2] and ds2.index_builds == 1
