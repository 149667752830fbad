"""Readers on the real volumes in ../shared/data (skipped when absent). Only labels are read, plus one image."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.data.readers import AlpnetDataset, MSDDataset, open_dataset

pytestmark = pytest.mark.realdata

CHAOS_IDS = ["1", "2", "3", "5", "8", "10", "13", "15", "19", "20", "21", "22", "31", "32", "33", "34", "36", "37",
             "38", "39"]


@pytest.fixture(scope="module")
def chaos(real_data_dir):
    root = real_data_dir / "chaos_t2"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    return open_dataset(root)


@pytest.fixture(scope="module")
def hippo(real_data_dir):
    root = real_data_dir / "msd_hippocampus"
    if not root.is_dir():
        pytest.skip(f"{root} not present")
    return open_dataset(root)


def test_chaos_scans_and_classes(chaos, tmp_path_factory):
    assert isinstance(chaos, AlpnetDataset)
    assert chaos.ids == CHAOS_IDS  # natural order: 2 before 10
    si = chaos.slice_index(cache_dir=tmp_path_factory.mktemp("idx"))
    assert si.classes == [1, 2, 3, 4]
    for c in (1, 2, 3, 4):
        assert si.scans_with(c) == CHAOS_IDS
    assert all(31 <= n <= 46 for n in si.n_slices.values())


def test_chaos_one_volume(chaos):
    v = chaos.load("2")
    z = v.image.shape[0]
    assert v.image.shape == (z, 256, 256) and v.label.shape == v.image.shape
    assert v.spacing == pytest.approx((7.7, 1.25, 1.25), rel=1e-3)
    assert v.label.dtype == np.int16 and v.classes() == [1, 2, 3, 4]
    assert abs(float(v.image.mean())) < 1e-3 and abs(float(v.image.std()) - 1) < 1e-3


def test_hippocampus_scans_classes_and_names(hippo, tmp_path_factory):
    assert isinstance(hippo, MSDDataset)
    assert len(hippo.ids) == 260 and hippo.ids == sorted(hippo.ids)
    assert hippo.label_names == {1: "Anterior", 2: "Posterior"}
    si = hippo.slice_index(cache_dir=tmp_path_factory.mktemp("idx"))
    assert si.classes == [1, 2]
    assert len(si.scans_with(1)) == 260 and len(si.scans_with(2)) == 260
    v = hippo.load(hippo.ids[-1])
    assert v.spacing == pytest.approx((1.0, 1.0, 1.0)) and np.isfinite(v.image).all()
