"""Dataset integrity check: every scan's headers are checked before work starts, one error lists all problems."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from fewshot_proto.data import InMemoryDataset, VolumeDataset, open_dataset
from fewshot_proto.data.readers import AlpnetDataset, MSDDataset, _FileSet
from fewshot_proto.errors import DataError
from fewshot_proto.types import Volume

nib = pytest.importorskip("nibabel")

SHAPE = (4, 4, 3)
AFFINE = np.diag([1.5, 1.5, 4.0, 1.0])


def _img() -> np.ndarray:
    return np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)


def _lab() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:3, 1:3, 1] = 1
    return lab


def _scan(root: Path, sid: str, write_nifti, image=None, label=None, iaff=AFFINE, laff=AFFINE) -> None:
    write_nifti(root / f"image_{sid}.nii.gz", _img() if image is None else image, iaff)
    write_nifti(root / f"label_{sid}.nii.gz", _lab() if label is None else label, laff)


def _dangling(path: Path) -> Path:
    if path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(Path("gone") / path.name)
    return path


@pytest.fixture
def clean_dir(tmp_path, write_nifti) -> Path:
    root = tmp_path / "clean"
    for sid in ("1", "2", "3"):
        _scan(root, sid, write_nifti)
    return root


@pytest.fixture
def load_counter(monkeypatch):
    """Counts ``nibabel.load`` calls (``_open`` imports nibabel inside the function, so patching works)."""
    calls = []
    real = nib.load

    def counting_load(path, *a, **kw):
        calls.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(nib, "load", counting_load)
    return calls


# ---------------------------------------------------------------------------------------------- one error, all problems


def test_one_error_names_every_bad_file(tmp_path, write_nifti):
    root = tmp_path / "bad"
    _scan(root, "1", write_nifti)                                          # clean
    _scan(root, "2", write_nifti, label=np.zeros((4, 4, 2), np.uint8))     # (a) label of another shape
    _scan(root, "3", write_nifti, image=np.zeros(SHAPE + (2,), np.float32))  # (b) 4-D image
    laff = AFFINE.copy()
    laff[0, 3] = 0.5
    _scan(root, "4", write_nifti, laff=laff)                               # (c) affine mismatch
    _scan(root, "5", write_nifti)
    _dangling(root / "label_5.nii.gz")                                     # (d) broken symlink as label
    flt = _lab().astype(np.float32)
    flt[0, 0, 0] = 0.5
    _scan(root, "6", write_nifti, label=flt)                               # (e) non-integer float label
    _scan(root, "7", write_nifti, label=np.zeros(SHAPE, np.complex64))     # complex label dtype
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    _scan(root, "8", write_nifti, label=rgb)                               # RGB (structured) label dtype
    _scan(root, "9", write_nifti)
    (root / "image_9.nii.gz").write_bytes(b"\x00" * 20)                    # corrupt header
    _scan(root, "10", write_nifti)
    _dangling(root / "image_10.nii.gz")                                    # both files dangling: two problems
    _dangling(root / "label_10.nii.gz")

    ds = AlpnetDataset(root)
    assert ds.ids == [str(i) for i in range(1, 11)]  # nothing dropped, broken links included
    with pytest.raises(DataError) as info:
        ds.check_integrity(cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert msg.startswith(f"{root}: 9 problem(s) in 8 scan(s): {root / 'label_2.nii.gz'}: shape mismatch")
    p = {k: str(root / f"{k}.nii.gz") for k in
         ["image_2", "label_2", "image_3", "image_4", "label_4", "label_5", "label_7", "label_8", "image_9",
          "image_10", "label_10"]}
    expected = [
        f"{p['label_2']}: shape mismatch, image {p['image_2']} has shape (4, 4, 3) but label {p['label_2']} has "
        f"shape (4, 4, 2)",
        f"{p['image_3']}: expected a 3-D volume, got shape (4, 4, 3, 2)",
        f"{p['label_4']}: affine mismatch, label {p['label_4']} is not on the grid of image {p['image_4']} "
        f"(max abs difference 0.5)",
        f"{p['label_5']}: broken symbolic link, its target gone/label_5.nii.gz does not exist",
        f"{p['label_7']}: unsupported label dtype complex64",
        f"{p['label_8']}: unsupported label dtype [('R', 'u1'), ('G', 'u1'), ('B', 'u1')]",
        f"{p['image_9']}: cannot read the file: ImageFileError:",
        f"{p['image_10']}: broken symbolic link, its target gone/image_10.nii.gz does not exist",
        f"{p['label_10']}: broken symbolic link, its target gone/label_10.nii.gz does not exist",
    ]
    pos = [msg.find(e) for e in expected]
    assert all(i >= 0 for i in pos), [e for e, i in zip(expected, pos) if i < 0]
    assert pos == sorted(pos)  # in scan order
    # (e) label values are not in the headers: the check passes the file, decoding it still fails
    assert "label_6" not in msg and "image_1.nii.gz" not in msg and "label_1.nii.gz" not in msg
    with pytest.raises(DataError, match=r"non-integer labels in .*label_6.nii.gz: e.g. 0.5"):
        ds.load_label("6")
    # the read path says the same things about the same files
    for sid, fragment in (("2", expected[0]), ("4", expected[2])):
        with pytest.raises(DataError) as read_err:
            ds.load(sid)
        assert str(read_err.value) == f"scan {sid!r}: " + fragment.split(": ", 1)[1]
    with pytest.raises(DataError, match=r"image_3.nii.gz: expected a 3-D volume, got shape \(4, 4, 3, 2\)"):
        ds.load("3")
    with pytest.raises(DataError, match=r"label_5.nii.gz: broken symbolic link, its target gone/label_5"):
        ds.load("5")
    with pytest.raises(DataError, match=r"label_7.nii.gz: unsupported label dtype complex64"):
        ds.load_label("7")
    with pytest.raises(DataError, match=r"label_5.nii.gz: broken symbolic link"):
        ds.slice_index(cache_dir=tmp_path / "cache")
    # a failure is never cached
    assert ds.integrity_checks == 1 and not list((tmp_path / "cache").glob("*.integrity"))
    with pytest.raises(DataError, match=r"9 problem\(s\) in 8 scan\(s\)"):
        ds.check_integrity(cache_dir=tmp_path / "cache")
    assert ds.integrity_checks == 2


def test_singleton_fourth_axis_is_3d(tmp_path, write_nifti):
    root = tmp_path / "s"
    _scan(root, "1", write_nifti, image=_img()[..., None], label=_lab()[..., None])
    AlpnetDataset(root).check_integrity(cache_dir=tmp_path / "cache")


def test_affine_within_reader_tolerance_passes(tmp_path, write_nifti):
    root = tmp_path / "t"
    laff = AFFINE.copy()
    laff[0, 3] = 1e-5  # well inside the reader's 1e-3
    _scan(root, "1", write_nifti, laff=laff, label=_lab().astype(np.float64))
    ds = AlpnetDataset(root)
    ds.check_integrity(cache_dir=tmp_path / "cache")
    assert ds.load("1").label.dtype == np.int16


# ---------------------------------------------------------------------------------------------- cache


def test_clean_dataset_passes_and_the_pass_is_cached(clean_dir, tmp_path, load_counter, write_nifti):
    cache = tmp_path / "cache"
    ds = AlpnetDataset(clean_dir)
    assert ds.check_integrity(cache_dir=cache) is None
    assert ds.integrity_checks == 1 and len(load_counter) == 6  # headers of 3 images + 3 labels, once each
    (record,) = list(cache.glob("*.integrity"))
    assert json.loads(record.read_text())["passed"] is True
    assert not list(cache.glob("*.json"))  # the slice-index cache file name is not taken

    del load_counter[:]
    ds.check_integrity(cache_dir=cache)  # same object
    ds2 = AlpnetDataset(clean_dir)
    ds2.check_integrity(cache_dir=cache)  # new object: the record on disk
    assert load_counter == [] and ds.integrity_checks == 1 and ds2.integrity_checks == 0

    # a changed file (size and mtime) is checked again, by both objects; the new label is broken
    write_nifti(clean_dir / "label_2.nii.gz", np.zeros((4, 4, 5), np.uint8), AFFINE)
    for d in (ds, ds2):
        with pytest.raises(DataError, match=r"1 problem\(s\) in 1 scan\(s\): .*label_2.nii.gz: shape mismatch"):
            d.check_integrity(cache_dir=cache)
    assert len(load_counter) == 12 and ds.integrity_checks == 2 and ds2.integrity_checks == 1

    # repaired, then only touched (same bytes, new mtime): checked again, then cached again
    write_nifti(clean_dir / "label_2.nii.gz", _lab(), AFFINE)
    ds.check_integrity(cache_dir=cache)
    st = (clean_dir / "image_3.nii.gz").stat()
    os.utime(clean_dir / "image_3.nii.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    del load_counter[:]
    ds3 = AlpnetDataset(clean_dir)
    ds3.check_integrity(cache_dir=cache)
    assert ds3.integrity_checks == 1 and len(load_counter) == 6
    del load_counter[:]
    AlpnetDataset(clean_dir).check_integrity(cache_dir=cache)
    assert load_counter == []


def test_cache_default_folder_settings_and_unwritable(clean_dir, tmp_path, monkeypatch, load_counter):
    monkeypatch.setenv("FEWSHOT_PROTO_CACHE", str(tmp_path / "fpc"))
    AlpnetDataset(clean_dir).check_integrity()
    (record,) = list((tmp_path / "fpc" / "index").glob("*.integrity"))
    AlpnetDataset(clean_dir).slice_index()  # the index lives beside it, same key
    (index,) = list((tmp_path / "fpc" / "index").glob("*.json"))
    assert record.name[: -len(".integrity")] == index.name[: -len(".json")]

    del load_counter[:]
    record.write_text("{not json")  # a damaged record means: check again
    ds = AlpnetDataset(clean_dir)
    ds.check_integrity()
    assert ds.integrity_checks == 1 and len(load_counter) == 6

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    ds = AlpnetDataset(clean_dir)
    with pytest.warns(RuntimeWarning, match="could not write integrity-check cache"):
        ds.check_integrity(cache_dir=blocker / "sub")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds.check_integrity(cache_dir=blocker / "sub")  # remembered on the object
    assert ds.integrity_checks == 1


# ---------------------------------------------------------------------------------------------- broken links


def test_broken_symlinks_keep_their_scan(clean_dir, tmp_path, write_nifti):
    _dangling(clean_dir / "image_3.nii.gz")
    _dangling(clean_dir / "label_3.nii.gz")
    ds = AlpnetDataset(clean_dir)
    assert ds.ids == ["1", "2", "3"]
    with pytest.raises(DataError, match=r"2 problem\(s\) in 1 scan\(s\): .*image_3.nii.gz: broken symbolic link.*; "
                                        r".*label_3.nii.gz: broken symbolic link"):
        ds.check_integrity(cache_dir=tmp_path / "cache")
    # only the label dangling: the scan is not reported as "an image without a label" at open time
    for f in ("image_3.nii.gz", "label_3.nii.gz"):
        (clean_dir / f).unlink()
    _scan(clean_dir, "3", write_nifti)
    _dangling(clean_dir / "label_3.nii.gz")
    assert AlpnetDataset(clean_dir).ids == ["1", "2", "3"]


def test_msd_broken_symlinks_keep_their_scan(tmp_path, write_nifti):
    root = tmp_path / "Task"
    for sid in ("hip_1", "hip_2"):
        write_nifti(root / "imagesTr" / f"{sid}.nii.gz", _img(), AFFINE)
        write_nifti(root / "labelsTr" / f"{sid}.nii.gz", _lab(), AFFINE)
    _dangling(root / "imagesTr" / "hip_2.nii.gz")
    ds = MSDDataset(root)  # no dataset.json: scans from labelsTr/
    assert ds.ids == ["hip_1", "hip_2"]
    with pytest.raises(DataError, match=r"^.*Task: 1 problem\(s\) in 1 scan\(s\): .*imagesTr/hip_2.nii.gz: broken"):
        ds.check_integrity(cache_dir=tmp_path / "cache")

    training = [{"image": f"./imagesTr/{s}.nii.gz", "label": f"./labelsTr/{s}.nii.gz"} for s in ("hip_1", "hip_2")]
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "a"}, "training": training}))
    _dangling(root / "labelsTr" / "hip_1.nii.gz")
    ds = MSDDataset(root)
    assert ds.ids == ["hip_1", "hip_2"]
    with pytest.raises(DataError, match=r"2 problem\(s\) in 2 scan\(s\): .*labelsTr/hip_1.nii.gz: broken.*; "
                                        r".*imagesTr/hip_2.nii.gz: broken"):
        ds.check_integrity(cache_dir=tmp_path / "cache")
    (root / "labelsTr" / "hip_1.nii.gz").unlink()  # really missing: still an error when the dataset is opened
    with pytest.raises(DataError, match=r"label file ./labelsTr/hip_1.nii.gz listed in .* does not exist"):
        MSDDataset(root)
    # a folder named like a label file is kept and reported, not skipped
    (root / "dataset.json").unlink()
    write_nifti(root / "labelsTr" / "hip_1.nii.gz", _lab(), AFFINE)
    (root / "labelsTr" / "hip_3.nii.gz").mkdir()
    write_nifti(root / "imagesTr" / "hip_3.nii.gz", _img(), AFFINE)
    ds = MSDDataset(root)
    assert ds.ids == ["hip_1", "hip_2", "hip_3"]
    with pytest.raises(DataError, match=r"labelsTr/hip_3.nii.gz: not a regular file"):
        ds.check_integrity(cache_dir=tmp_path / "cache")
    # a dangling second channel still marks the case multi-channel
    _dangling(root / "imagesTr" / "hip_1_0001.nii.gz")
    with pytest.raises(DataError, match=r"several channels \(hip_1_0001.nii.gz"):
        MSDDataset(root)


def test_msd_clean_passes(tmp_path, write_nifti):
    root = tmp_path / "Task"
    for sid in ("hip_1", "hip_2"):
        write_nifti(root / "imagesTr" / f"{sid}_0000.nii.gz", _img(), AFFINE)
        write_nifti(root / "labelsTr" / f"{sid}.nii.gz", _lab(), AFFINE)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    ds = open_dataset(root)
    ds.check_integrity(cache_dir=tmp_path / "cache")
    assert ds.integrity_checks == 1


# ---------------------------------------------------------------------------------------------- other datasets


def test_in_memory_and_base_datasets():
    vols = [Volume(id=str(i), image=np.zeros((3, 4, 4), np.float32), label=np.zeros((3, 4, 4), np.int16))
            for i in (1, 2, 3)]
    ds = InMemoryDataset(vols, name="mem")
    ds.check_integrity()
    ds.check_integrity(cache_dir="unused")  # same signature as the readers'
    vols[0].label = np.zeros((3, 4, 5), np.int16)
    vols[1].image = np.zeros((4, 4), np.float32)
    vols[2].label = np.zeros((3, 4, 4), np.complex64)
    with pytest.raises(DataError) as info:
        ds.check_integrity()
    assert str(info.value) == (
        "dataset 'mem': 3 problem(s) in 3 scan(s): scan '1': label shape (3, 4, 5) != image shape (3, 4, 4); "
        "scan '2': image must be 3-D [Z,H,W], got shape (4, 4); scan '3': unsupported label dtype complex64")

    class Bare(VolumeDataset):
        ids = ["a"]

    assert Bare().check_integrity() is None and Bare().check_integrity(cache_dir="unused") is None


def test_file_set_without_label(tmp_path, write_nifti):
    ipath = write_nifti(tmp_path / "q" / "q.nii.gz", _img(), AFFINE)
    ds = _FileSet({"q": (ipath, None)}, cache_volumes=0)
    ds.check_integrity(cache_dir=tmp_path / "cache")
    assert ds.integrity_checks == 1
    bad = write_nifti(tmp_path / "q" / "r.nii.gz", np.zeros((4, 4), np.float32), AFFINE)
    with pytest.raises(DataError, match=r"1 problem\(s\) in 1 scan\(s\): .*r.nii.gz: expected a 3-D volume"):
        _FileSet({"r": (bad, None)}, cache_volumes=0).check_integrity(cache_dir=tmp_path / "cache")


def test_phantoms_on_disk_pass(tmp_path):
    from fewshot_proto.data.phantom import ensure_phantoms

    ds = AlpnetDataset(ensure_phantoms(cache_dir=tmp_path, n_scans=2, size=32))
    ds.check_integrity(cache_dir=tmp_path / "cache")
    assert ds.ids == ["1", "2"] and ds.integrity_checks == 1
