"""Shared pytest fixtures for fewshot_proto (keep small; add fixtures as areas need them).

Two suite-wide rules live here (no torch import at collection time):

* ``--require-optional`` (CI passes it): a test that skips because an optional package in
  :data:`OPTIONAL_PACKAGES` (learn2learn, tensorboard, monai, submitit) cannot be imported fails instead, so CI
  cannot go green with the MAML, TensorBoard, MONAI-agreement or grid-executor tests silently skipped. Tests
  keep calling ``pytest.importorskip("learn2learn")``; the report hooks below turn that skip into a failure,
  whichever test or module raised it.
* a test that uses ``real_data_dir`` (directly or through another fixture) must be marked ``realdata``, so that
  ``-m "not realdata"`` deselects every test that reads ../shared/data; an unmarked one errors at set-up.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
#: real volumes for development (read only; absent on a fresh machine -> tests using it skip)
REAL_DATA = REPO_ROOT.parent / "shared" / "data"

#: optional packages whose absence skips tests (``pytest.importorskip``), or fails them under --require-optional
OPTIONAL_PACKAGES = ("learn2learn", "tensorboard", "monai", "submitit")
REQUIRE_OPTIONAL = "--require-optional"
_IMPORTORSKIP = re.compile(r"could not import '(?P<name>[\w.]+)': (?P<error>.*)", re.DOTALL)


def pytest_addoption(parser):
    parser.addoption(
        REQUIRE_OPTIONAL, action="store_true", default=False,
        help=f"fail, instead of skipping, tests that need an optional package ({', '.join(OPTIONAL_PACKAGES)}) "
             "when it cannot be imported (CI passes this)")


def _optional_import_skip(report) -> Optional[re.Match]:
    """The ``importorskip`` match of a skip report whose package is in :data:`OPTIONAL_PACKAGES`, else None."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    m = _IMPORTORSKIP.search(reason)
    if m is None or m["name"].split(".")[0] not in OPTIONAL_PACKAGES:
        return None
    return m


def _apply_require_optional(config, report) -> None:
    m = _optional_import_skip(report)
    if m is None:
        return
    name, error = m["name"].split(".")[0], m["error"].strip()
    if config.getoption("require_optional"):
        report.outcome = "failed"
        report.longrepr = f"{name} is required by {REQUIRE_OPTIONAL} but is not importable: {error}"
    elif isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        path, lineno, reason = report.longrepr
        report.longrepr = (path, lineno, f"{reason} (optional; {REQUIRE_OPTIONAL} makes this a failure)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _apply_require_optional(item.config, report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield  # a module-level importorskip skips the whole module at collection
    _apply_require_optional(collector.config, report)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture is set up: a test that uses ``real_data_dir`` must carry the ``realdata`` mark."""
    if "real_data_dir" in getattr(item, "fixturenames", ()) and item.get_closest_marker("realdata") is None:
        pytest.fail(f"{item.nodeid} uses the real_data_dir fixture (../shared/data) but is not marked realdata: "
                    "add @pytest.mark.realdata to the test (or pytestmark = pytest.mark.realdata to its module)",
                    pytrace=False)


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
    """``<repo>/../shared/data`` (CHAOS-T2 and MSD hippocampus), or skip the test when it is absent.

    Every test using it, directly or through another fixture, must be marked ``realdata``
    (:func:`pytest_runtest_setup` errors otherwise; the check is a hook because this fixture is session-scoped
    and module-scoped fixtures use it, so it cannot see the requesting test)."""
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
