"""The manifests checked in under episodes/ still match their data (phantoms always; CHAOS-T2 when present)."""
from __future__ import annotations

from pathlib import Path

import pytest

from fewshot_proto.episodes.manifest import load_manifest, manifest_mismatches

REPO = Path(__file__).resolve().parents[3]
REAL_DATA = REPO.parent / "shared" / "data"
MANIFESTS = [
    pytest.param(p, id=p.name, marks=() if p.name.startswith("phantom_") else (pytest.mark.realdata,))
    for p in sorted((REPO / "episodes").glob("*.json"))
]


def _dataset_for(name: str):
    readers = pytest.importorskip("fewshot_proto.data.readers")
    if name == "phantom":
        return readers.open_dataset(None)
    root = REAL_DATA / name
    if not root.is_dir():
        pytest.skip(f"{root} not available")
    return readers.open_dataset(root)


@pytest.mark.parametrize("path", MANIFESTS)
def test_checked_in_manifest_verifies(path):
    m = load_manifest(path)
    assert path.name.startswith(f"{m.dataset}_{m.protocol}_setting{m.setting}_")
    assert m.folds == list(range(m.n_folds))
    ds = _dataset_for(m.dataset)
    assert manifest_mismatches(m, ds.slice_index()) == []
    # every scan is a query exactly once per class over the fold sweep
    for c in m.test_classes:
        queried = [e.query_scan for e in m.episodes if e.class_id == c]
        assert sorted(queried) == sorted(ds.slice_index().scans_with(c))
