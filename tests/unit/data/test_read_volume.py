from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.data import read_volume, write_prediction
from fewshot_proto.errors import DataError


def test_read_volume_with_and_without_label(tmp_path, write_nifti):
    aff = np.diag([1.5, 1.5, 5.0, 1.0])
    img = np.random.default_rng(0).normal(10, 3, size=(8, 6, 4)).astype(np.float32)
    lab = np.zeros((8, 6, 4), np.float64)
    lab[2:4, 1:3, 1] = 2.0
    write_nifti(tmp_path / "q.nii.gz", img, aff)
    write_nifti(tmp_path / "q_lab.nii.gz", lab, aff)
    v = read_volume(tmp_path / "q.nii.gz", tmp_path / "q_lab.nii.gz")
    assert v.id == "q" and v.image.shape == (4, 8, 6) and v.spacing == (5.0, 1.5, 1.5)
    assert v.label.dtype == np.int16 and v.classes() == [2]
    assert abs(float(v.image.mean())) < 1e-5  # z-scored
    q = read_volume(tmp_path / "q.nii.gz")
    assert q.label is None and q.image.shape == (4, 8, 6)
    out = write_prediction((v.label == 2).astype(np.int16), q, tmp_path / "pred.nii.gz")
    import nibabel as nib

    back = nib.load(str(out))
    assert back.shape == (8, 6, 4) and np.allclose(back.affine, aff)
    assert np.array_equal(np.asarray(back.dataobj) > 0, lab > 0)


def test_read_volume_errors_name_the_file(tmp_path, write_nifti):
    with pytest.raises(DataError, match=r"missing.nii.gz: file does not exist"):
        read_volume(tmp_path / "missing.nii.gz")
    write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 3), np.float32))
    write_nifti(tmp_path / "b.nii.gz", np.zeros((4, 5, 3), np.float32))
    with pytest.raises(DataError, match=r"shape mismatch.*a.nii.gz"):
        read_volume(tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
