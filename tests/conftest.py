"""Shared pytest fixtures for fewshot_proto (keep small; add fixtures as areas need them)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: real volumes for development (read only; absent on a fresh machine -> tests using it skip)
REAL_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture
def one_thread():
    """Run the test with one torch intra-op thread (restored afterwards). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``: small models run no faster on two threads, and one
    keeps them steady when other processes share the machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """``<repo>/../shared/data`` (CHAOS-T2 and MSD hippocampus), or skip the test when it is absent."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not present")
    return REAL_DATA


def _write_nifti(path: Path | str, array: np.ndarray, affine: Optional[np.ndarray] = None) -> Path:
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)), str(path))
    return path


@pytest.fixture
def write_nifti() -> Callable[..., Path]:
    """``write_nifti(path, array, affine=None) -> path``: save ``array`` as NIfTI (dtype kept, bool -> uint8)."""
    return _write_nifti


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory) -> Path:
    """A session-private cache folder (``$FEWSHOT_PROTO_CACHE``) holding the built-in phantoms, generated once."""
    import os

    from fewshot_proto.data.phantom import ensure_phantoms

    folder = tmp_path_factory.mktemp("fewshot_cache")
    old = os.environ.get("FEWSHOT_PROTO_CACHE")
    os.environ["FEWSHOT_PROTO_CACHE"] = str(folder)
    ensure_phantoms()
    yield folder
    if old is None:
        os.environ.pop("FEWSHOT_PROTO_CACHE", None)
    else:
        os.environ["FEWSHOT_PROTO_CACHE"] = old


@pytest.fixture(scope="session")
def phantom_dataset(phantom_cache):
    """The built-in phantom dataset (``open_dataset()`` with no root), read from the session cache."""
    from fewshot_proto.data import open_dataset

    return open_dataset()
