"""Run folders: a new numbered folder per run, no silent overwrite, one live run per folder, stale temp files gone."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fewshot_proto.engine.rundir import RUN_FILES, open_run_folder
from fewshot_proto.errors import RunFolderError


def test_runs_without_out_get_new_numbered_folders(tmp_path):
    parent = tmp_path / "runs" / "phantom"
    names = []
    for _ in range(3):
        with open_run_folder(None, default_parent=parent) as f:
            names.append(f.path.name)
            (f.path / "checkpoint.pt").write_bytes(b"x")
    assert names == ["version_0", "version_1", "version_2"]
    (parent / "version_7").mkdir()
    with open_run_folder(None, default_parent=parent) as f:
        assert f.path.name == "version_8"  # one more than the largest, never a gap filled


def test_an_explicit_folder_holding_a_run_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    with open_run_folder(out, default_parent=tmp_path) as f:  # new: fine, and removed again while empty
        assert f.path == out
    assert not out.exists()
    out.mkdir()
    with open_run_folder(out, default_parent=tmp_path):  # an existing empty folder: fine, and kept
        pass
    assert out.is_dir()
    for name in RUN_FILES:
        (out / name).mkdir() if name in ("eval", "tensorboard") else (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError) as e:
        open_run_folder(out, default_parent=tmp_path)
    assert str(e.value) == (f"run folder {out} already holds a run; pass --resume {out / 'checkpoint.pt'} to "
                            f"continue it, --overwrite to replace it, or another --out")
    assert (out / "checkpoint.pt").read_text() == "old"
    with open_run_folder(out, default_parent=tmp_path, overwrite=True):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", "notes.txt"]  # only the run's own files went


def test_out_that_is_a_file_or_cannot_be_created_is_a_clean_error(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(RunFolderError, match=f"^run folder {f} exists and is not a folder$"):
        open_run_folder(f, default_parent=tmp_path)
    with pytest.raises(RunFolderError, match=f"^run folder {f / 'sub'} cannot be created: "):
        open_run_folder(f / "sub", default_parent=tmp_path)


def test_a_live_run_holds_the_folder_and_a_dead_one_does_not(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from fewshot_proto.engine.rundir import open_run_folder
        f = open_run_folder({str(out)!r}, default_parent={str(tmp_path)!r})
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as e:
            open_run_folder(out, default_parent=tmp_path)
        assert str(e.value) == (f"run folder {out} is in use by another live run (pid {holder.pid}, lock "
                                f"{out / '.lock'}); wait for it or choose another --out")
    finally:
        holder.kill()  # like kill -9: the kernel drops the lock with the process
        holder.wait()
    with open_run_folder(out, default_parent=tmp_path):
        pass


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    out = tmp_path / "run"
    outer = open_run_folder(out, default_parent=tmp_path)
    inner = open_run_folder(out, default_parent=tmp_path)  # the train CLI, then train() itself
    inner.release()
    code = f"from fewshot_proto.engine.rundir import open_run_folder; open_run_folder({str(out)!r}, default_parent='.')"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "is in use by another live run" in other.stderr  # still held by the outer one
    outer.release()
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / "checkpoint.pt.4242.abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = out / "data.nii.gz"
    keep.write_bytes(b"user data")
    with open_run_folder(out, default_parent=tmp_path):
        assert not stale.exists() and keep.read_bytes() == b"user data"


def test_resume_continues_in_the_checkpoint_folder_only(tmp_path):
    ck = tmp_path / "run" / "checkpoint.pt"
    ck.parent.mkdir()
    ck.write_bytes(b"x")
    with open_run_folder(None, default_parent=tmp_path / "runs", resume=ck) as f:
        assert f.path == ck.parent.resolve()
    with pytest.raises(RunFolderError, match="--resume continues in the checkpoint's folder"):
        open_run_folder(tmp_path / "elsewhere", default_parent=tmp_path, resume=ck)
    assert not Path(tmp_path / "elsewhere").exists()
