"""Run folders: a fresh numbered folder per run, never a silent overwrite, one live run per folder.

* ``out=None``: a new folder ``<parent>/version_<N>`` (N one more than the largest existing), created atomically so
  two runs started at once never share one.
* An explicit folder that already holds a run (any of :data:`RUN_FILES`) is refused unless the run resumes from a
  checkpoint in that folder or ``overwrite=True``; overwriting removes only the files a run writes
  (:data:`RUN_FILES`), never anything else in the folder.
* A live run holds an exclusive ``flock`` on ``<folder>/.lock`` (released by the kernel when the process dies, so a
  ``kill -9`` leaves no stale lock); a second run into the same folder stops at once with :class:`RunFolderError`.
  The lock is re-entrant within a process (the ``train`` CLI holds it across training and the final evaluation).
* Temporary files of a killed run (``*.tmp``) are removed when the next run takes the lock.
* A folder this run created is removed again if the run ends before writing anything into it (a config or data
  error found after the folder was opened leaves no empty folder behind).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

from fewshot_proto.errors import RunFolderError

__all__ = ["RUN_FILES", "RunFolder", "open_run_folder", "holds_run", "next_version_folder"]

#: the files and folders a training run writes into its folder
RUN_FILES = ("checkpoint.pt", "best.pt", "config.yaml", "train_log.csv", "labelled_scans.json", "validation.json",
             "eval", "tensorboard")
LOCK_NAME = ".lock"
_VERSION = re.compile(r"version_(\d+)$")
#: folders locked by this process: resolved path -> (file descriptor, depth)
_HELD: Dict[str, Tuple[int, int]] = {}


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds files of an earlier run."""
    return any((folder / name).exists() for name in RUN_FILES)


def next_version_folder(parent: Path) -> Path:
    """Create and return ``parent/version_<N>``, N one more than the largest existing version (0 for the first)."""
    parent = Path(parent)
    _make_dir(parent)
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken) + 1 if taken else 0
    while True:
        folder = parent / f"version_{n}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another run took it between the listing and the mkdir
            n += 1


def _make_dir(folder: Path) -> bool:
    """Create ``folder`` (and its parents); returns whether it was created now."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run folder {folder} exists and is not a folder")
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunFolderError(f"run folder {folder} cannot be created: {e.strerror or e}") from None
    return not existed


class RunFolder:
    """A locked run folder (use as a context manager or call :meth:`release`)."""

    def __init__(self, path: Path, created: bool = False) -> None:
        self.path = Path(path)
        self.created = created  # made by this run: removed again if the run ends before writing anything
        self._key = str(self.path.resolve())
        self._locked = False

    def acquire(self) -> "RunFolder":
        held = _HELD.get(self._key)
        if held is not None:  # re-entrant within this process
            _HELD[self._key] = (held[0], held[1] + 1)
            self._locked = True
            return self
        import fcntl

        lock_path = self.path / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"run folder {self.path} is in use by another live run (pid {other}, lock "
                                 f"{lock_path}); wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD[self._key] = (fd, 1)
        self._locked = True
        self.remove_stale_temporaries()
        return self

    @property
    def is_outermost(self) -> bool:
        """Whether this process took the lock only once (checks of the folder's content run only then)."""
        return _HELD.get(self._key, (None, 0))[1] == 1

    def remove_stale_temporaries(self) -> None:
        """Delete ``*.tmp`` files left by a killed run (only called while holding the lock)."""
        for tmp in self.path.glob("*.tmp"):
            if tmp.is_file():
                tmp.unlink()

    def remove_run_files(self) -> None:
        """Delete the files of an earlier run (:data:`RUN_FILES`) and nothing else."""
        for name in RUN_FILES:
            p = self.path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    def release(self) -> None:
        if not self._locked:
            return
        self._locked = False
        fd, depth = _HELD[self._key]
        if depth > 1:
            _HELD[self._key] = (fd, depth - 1)
            return
        del _HELD[self._key]
        if self.created and [p.name for p in self.path.iterdir()] == [LOCK_NAME]:
            (self.path / LOCK_NAME).unlink()  # a run that failed before writing anything leaves no folder behind
            self.path.rmdir()
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def open_run_folder(out: Optional[str | Path], *, default_parent: str | Path, resume: Optional[str | Path] = None,
                    overwrite: bool = False) -> RunFolder:
    """Resolve, create and lock the run folder (see the module docstring); returns the locked :class:`RunFolder`.

    ``resume``: the checkpoint the run continues from; the run folder is then the checkpoint's folder (``out``
    must be ``None`` or that folder).
    """
    if resume is not None:
        ck_dir = Path(resume).resolve().parent
        if out is not None and Path(out).resolve() != ck_dir:
            raise RunFolderError(f"--resume continues in the checkpoint's folder {ck_dir}, not in {out}; drop --out "
                                 f"or copy the checkpoint there")
        folder = RunFolder(ck_dir).acquire()
        return folder
    if out is None:
        return RunFolder(next_version_folder(Path(default_parent)), created=True).acquire()
    path = Path(out)
    folder = RunFolder(path, created=_make_dir(path)).acquire()
    if folder.is_outermost and holds_run(path):
        if not overwrite:
            folder.release()
            raise RunFolderError(f"run folder {path} already holds a run; pass --resume {path / 'checkpoint.pt'} "
                                 f"to continue it, --overwrite to replace it, or another --out")
        folder.remove_run_files()
    return folder
