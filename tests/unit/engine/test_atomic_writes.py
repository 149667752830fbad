"""The writers that claim to be atomic keep the previous file intact and leave no temporary file behind when a write
fails halfway (bytes already in the temporary file) or at the final rename, and the error reaches the caller:

* ``engine.checkpoint.save_checkpoint`` (also on Ctrl-C in the middle of ``torch.save``);
* ``episodes.manifest.save_manifest`` (frozen evaluation episodes);
* ``data.readers._atomic_write_text`` (the slice-index cache) and ``NiftiDataset.slice_index`` on top of it, which
  must turn a failed cache write into a warning;
* ``metrics.report.atomic_write_text`` (metrics.json, metrics.csv, summary.md).
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

import fewshot_proto.engine.checkpoint as ckmod
from fewshot_proto.engine.checkpoint import load_checkpoint, save_checkpoint
from fewshot_proto.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Boom(OSError):
    """The simulated failure (an ``OSError``: disk full, quota, I/O error)."""


def _listing(folder: pathlib.Path):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------- checkpoints
def _tiny(seed: int):
    torch.manual_seed(seed)
    return build_model("unet", base_channels=4, in_channels=3)


def _save(path, model, step):
    return save_checkpoint(path, model=model, model_name="unet", model_config=dict(model.config), step=step)


def _half_then(exc):
    """A ``torch.save`` stand-in that writes the first half of a real checkpoint to the file, then raises."""
    real = torch.save

    def fake(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        raise exc

    return fake


@pytest.mark.parametrize("exc", [Boom(28, "No space left on device (simulated)"), KeyboardInterrupt()],
                         ids=["oserror", "ctrl-c"])
def test_checkpoint_failing_halfway_keeps_the_previous_one(tmp_path, monkeypatch, exc):
    """``torch.save`` dies after writing half the bytes: the exception propagates, ``load_checkpoint`` still returns
    checkpoint A (its step and bit-identical weights), and the folder holds nothing but A's file."""
    a = _tiny(0)
    path = _save(tmp_path / "ck.pt", a, step=5)
    want = {k: v.clone() for k, v in a.state_dict().items()}
    b = _tiny(1)
    assert any(not torch.equal(want[k], v) for k, v in b.state_dict().items())

    monkeypatch.setattr(ckmod.torch, "save", _half_then(exc))
    with pytest.raises(type(exc)):
        _save(path, b, step=9)
    monkeypatch.undo()

    ck = load_checkpoint(path)
    assert ck["step"] == 5
    assert ck["model"].keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(ck["model"][k], v), k
    assert _listing(tmp_path) == ["ck.pt"], "a failed save left a temporary file behind"


def test_checkpoint_failing_at_the_rename_keeps_the_previous_one(tmp_path, monkeypatch):
    """The complete new file is written but ``os.replace`` fails: A stays, no temporary file is left."""
    path = _save(tmp_path / "ck.pt", _tiny(0), step=5)
    before = path.read_bytes()

    def no_replace(src, dst, *a, **k):
        raise Boom(5, "Input/output error (simulated)")

    monkeypatch.setattr(ckmod.os, "replace", no_replace)
    with pytest.raises(Boom):
        _save(path, _tiny(1), step=9)
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 5
    assert _listing(tmp_path) == ["ck.pt"]


def test_checkpoint_save_over_a_previous_one_leaves_one_file(tmp_path):
    """The successful path: B replaces A, and the temporary file is gone."""
    path = _save(tmp_path / "ck.pt", _tiny(0), step=5)
    _save(path, _tiny(1), step=9)
    assert load_checkpoint(path)["step"] == 9
    assert _listing(tmp_path) == ["ck.pt"]


# --------------------------------------------------------------------------------------------------- manifests
def _toy_index(n_scans=6, shift=0):
    from fewshot_proto.types import SliceIndex

    n = {str(i): 12 for i in range(1, n_scans + 1)}
    index = {c: {s: list(range(2 + c + shift, 9 + c)) for s in n} for c in (1, 2, 3)}
    return SliceIndex(index=index, n_slices=n, dataset="toy")


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_manifest_failing_write_keeps_the_previous_manifest(tmp_path, monkeypatch, where):
    """``save_manifest`` fails after writing the new text to its temporary file (at ``fsync``) or at the rename:
    the error propagates, the old manifest loads unchanged, and no temporary file is left."""
    import fewshot_proto.episodes.manifest as mmod

    a = mmod.freeze(_toy_index(), folds=[0], n_folds=3, test_classes=[2, 3])
    b = mmod.freeze(_toy_index(shift=1), folds=[0, 1], n_folds=3, test_classes=[2, 3])
    path = mmod.save_manifest(a, tmp_path / "m.json")
    before = path.read_text()

    def fail(*args, **kwargs):
        raise Boom(28, "No space left on device (simulated)")

    monkeypatch.setattr(mmod.os, where, fail)
    with pytest.raises(Boom):
        mmod.save_manifest(b, path)
    monkeypatch.undo()
    assert path.read_text() == before
    assert mmod.load_manifest(path).to_dict() == a.to_dict()
    assert _listing(tmp_path) == ["m.json"]
    mmod.save_manifest(b, path)
    assert mmod.load_manifest(path).to_dict() == b.to_dict() and _listing(tmp_path) == ["m.json"]


# ---------------------------------------------------------------------------------------- slice-index cache
def _half_write_text(self, data, *args, **kwargs):
    with open(self, "w") as f:
        f.write(data[: len(data) // 2])
    raise Boom(28, "No space left on device (simulated)")


def test_readers_atomic_write_text_failing_halfway_keeps_the_old_text(tmp_path, monkeypatch):
    """``_atomic_write_text`` (the slice-index cache writer) dies after half the text reached the temporary file, or
    at the rename: the old file is unchanged, no temporary file is left, the error propagates."""
    from fewshot_proto.data import readers

    path = tmp_path / "cache.json"
    readers._atomic_write_text(path, '{"old": 1}')
    assert _listing(tmp_path) == ["cache.json"]

    monkeypatch.setattr(pathlib.Path, "write_text", _half_write_text)
    with pytest.raises(Boom):
        readers._atomic_write_text(path, '{"new": 2, "padding": "' + "x" * 1000 + '"}')
    monkeypatch.undo()
    assert path.read_text() == '{"old": 1}' and _listing(tmp_path) == ["cache.json"]

    def no_replace(src, dst, *a, **k):
        raise Boom(5, "Input/output error (simulated)")

    monkeypatch.setattr(readers.os, "replace", no_replace)
    with pytest.raises(Boom):
        readers._atomic_write_text(path, '{"new": 2}')
    monkeypatch.undo()
    assert path.read_text() == '{"old": 1}' and _listing(tmp_path) == ["cache.json"]


def test_slice_index_cache_write_failure_is_a_warning_and_leaves_nothing(tmp_path, monkeypatch, write_nifti):
    """A dataset whose slice-index cache cannot be written still returns the right index (with a RuntimeWarning),
    leaves no partial file in the cache folder, and the next dataset writes exactly one cache file."""
    from fewshot_proto.data.readers import open_dataset

    root = tmp_path / "data"
    for i in (1, 2):
        lab = np.zeros((6, 8, 5), np.uint8)  # (H, W, Z): slice axis 2
        lab[2:5, 2:6, i:i + 2] = 1
        write_nifti(root / f"image_{i}.nii.gz", np.random.default_rng(i).random((6, 8, 5)).astype(np.float32))
        write_nifti(root / f"label_{i}.nii.gz", lab)
    cache = tmp_path / "cache"

    monkeypatch.setattr(pathlib.Path, "write_text", _half_write_text)
    with pytest.warns(RuntimeWarning, match="slice-index cache"):
        index = open_dataset(root, "alpnet").slice_index(cache_dir=cache)
    monkeypatch.undo()
    assert index.index == {1: {"1": [1, 2], "2": [2, 3]}}
    assert not cache.exists() or _listing(cache) == []

    again = open_dataset(root, "alpnet").slice_index(cache_dir=cache)
    assert again.index == index.index
    files = _listing(cache)
    assert len(files) == 1 and files[0].endswith(".json") and not files[0].startswith("."), files


# ----------------------------------------------------------------------------------------------------- reports
@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_report_atomic_write_failing_keeps_the_previous_file(tmp_path, monkeypatch, where):
    """``metrics.report.atomic_write_text`` fails after writing (``fsync``) or at the rename: old text kept, no
    temporary file."""
    import fewshot_proto.metrics.report as rmod

    path = rmod.atomic_write_text(tmp_path / "metrics.json", '{"old": 1}\n')

    def fail(*args, **kwargs):
        raise Boom(28, "No space left on device (simulated)")

    monkeypatch.setattr(rmod.os, where, fail)
    with pytest.raises(Boom):
        rmod.atomic_write_text(path, '{"new": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"old": 1}\n' and _listing(tmp_path) == ["metrics.json"]
