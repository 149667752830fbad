"""The training log: ``<run>/train_log.csv`` (one row every ``train.log_every`` steps) and, when the tensorboard
package is installed (``pip install fewshot_proto[tensorboard]``), TensorBoard events under ``<run>/tensorboard``.

TensorBoard is used when installed and never required: without it every TensorBoard call here is a no-op and the
CSV log is written as always. What goes to TensorBoard:

* during training (:class:`TrainLog`): ``train/<loss term>`` and ``train/lr`` at every logged step;
* after the final evaluation (:func:`log_evaluation`, or :meth:`TrainLog.log_evaluation` /
  :meth:`TrainLog.log_images`): ``eval/dice/<class id>_<class name>`` (the class's Dice, mean over the query
  scans; ``eval/dice/<class id>`` when the class has no name) and ``eval/dice/mean`` (the mean over classes of
  those means, the report's overall Dice) at the final training step, and a few overlay images
  ``eval/overlay/<name>``.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["TrainLog", "log_evaluation", "open_tensorboard", "evaluation_scalars", "TENSORBOARD_DIR",
           "MAX_IMAGES"]

#: the run's TensorBoard folder, ``<run>/tensorboard``
TENSORBOARD_DIR = "tensorboard"
#: overlay images :func:`log_evaluation` takes from a folder at most (the first ones in name order)
MAX_IMAGES = 8

#: what ``images`` may be: ``{name: HWC uint8 array}``, or a folder of PNG files (the evaluator's ``overlays/``)
Images = Union[Mapping[str, np.ndarray], str, os.PathLike]


def open_tensorboard(out_dir: Union[str, os.PathLike]) -> Any:
    """A ``torch.utils.tensorboard.SummaryWriter`` on ``<out_dir>/tensorboard``, or ``None`` when the tensorboard
    package is not installed (TensorBoard is optional). An installed but broken tensorboard warns once and gives
    ``None`` too: logging never stops a run."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
    except ImportError:
        return None
    except Exception as e:  # e.g. a protobuf version the installed tensorboard cannot use
        warnings.warn(f"tensorboard is installed but cannot be imported ({type(e).__name__}: {e}); no TensorBoard "
                      f"events are written", RuntimeWarning, stacklevel=2)
        return None
    return SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR))


def _tag_name(name: str) -> str:
    """A class name as a TensorBoard tag component: runs of characters other than letters, digits, ``_``, ``.``,
    ``-`` and ``+`` become ``_`` (``"right kidney"`` -> ``"right_kidney"``)."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", str(name).strip()).strip("_")


def evaluation_scalars(summary: Mapping[str, Any], metric: str = "dice") -> Dict[str, float]:
    """``{tag: value}`` of an evaluation summary (what ``engine.evaluator.evaluate`` returns, or a read
    ``metrics.json``): ``eval/<metric>/<class id>_<name>`` per class (mean over scans) in class-id order, then
    ``eval/<metric>/mean`` (the overall mean over classes)."""
    per_class = summary.get("per_class") or {}
    out: Dict[str, float] = {}
    for key in sorted(per_class, key=lambda k: int(k)):
        entry = per_class[key]
        name = _tag_name(entry.get("class_name") or "")
        out[f"eval/{metric}/{int(key)}" + (f"_{name}" if name else "")] = float(entry[metric]["mean"])
    overall = (summary.get("overall") or {}).get(metric)
    if overall is not None:
        out[f"eval/{metric}/mean"] = float(overall["mean"])
    return out


def _as_hwc_uint8(tag: str, image: Any) -> np.ndarray:
    """``image`` as an ``[H, W, C]`` uint8 array (C 1, 3 or 4; a 2-D array gets C = 1); ``ValueError`` naming
    ``tag`` otherwise."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.dtype != np.uint8:
        raise ValueError(f"image {tag!r}: expected an [H, W, C] uint8 array with C 1, 3 or 4, got shape "
                         f"{tuple(np.asarray(image).shape)} dtype {np.asarray(image).dtype}")
    return arr


def _read_images(images: Optional[Images], limit: int) -> List[Tuple[str, np.ndarray]]:
    """``(name, HWC uint8)`` pairs of ``images``: a mapping (every entry, in its order) or a folder (its first
    ``limit`` ``*.png`` files in name order, named by their stem; a missing folder gives none)."""
    if images is None:
        return []
    if isinstance(images, Mapping):
        return [(str(k), _as_hwc_uint8(str(k), v)) for k, v in images.items()]
    folder = Path(images)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.png"))[:limit]:
        with Image.open(path) as im:
            out.append((path.stem, _as_hwc_uint8(path.name, np.asarray(im.convert("RGB")))))
    return out


def _write_evaluation(tb: Any, step: int, summary: Mapping[str, Any]) -> None:
    for tag, value in evaluation_scalars(summary).items():
        tb.add_scalar(tag, value, int(step))


def _write_images(tb: Any, step: int, images: Optional[Images], limit: int = MAX_IMAGES) -> None:
    for name, arr in _read_images(images, limit):
        tb.add_image(f"eval/overlay/{name}", arr, int(step), dataformats="HWC")


def log_evaluation(out_dir: Union[str, os.PathLike], step: int, summary: Mapping[str, Any],
                   images: Optional[Images] = None, *, max_images: int = MAX_IMAGES) -> bool:
    """Write a run's final evaluation to its TensorBoard folder ``<out_dir>/tensorboard`` (the folder
    :class:`TrainLog` wrote the training curves to), at training step ``step``.

    Scalars: :func:`evaluation_scalars` (``eval/dice/<class id>_<name>``, ``eval/dice/mean``). Images: ``images``
    as ``{name: [H, W, C] uint8 array}``, or a folder of PNG files (e.g. ``<run>/eval/gallery``, its first
    ``max_images`` in name order) -> ``eval/overlay/<name>``.

    Returns:
        whether anything was written: ``False`` (a no-op) when the tensorboard package is not installed.
    """
    tb = open_tensorboard(out_dir)
    if tb is None:
        return False
    try:
        pairs = _read_images(images, max_images)  # a bad image raises before any value is written
        _write_evaluation(tb, step, summary)
        for name, arr in pairs:
            tb.add_image(f"eval/overlay/{name}", arr, int(step), dataformats="HWC")
    finally:
        tb.close()
    return True


class TrainLog:
    """``<out>/train_log.csv`` (columns: step, the task's loss terms, lr, timings) and TensorBoard scalars."""

    TIMING = ["lr", "seconds_per_step", "sample_seconds", "elapsed"]

    def __init__(self, out_dir: Path, loss_fields: Sequence[str], resume_step: Optional[int] = None) -> None:
        """A new log, or with ``resume_step`` the existing one cut to the rows of steps <= ``resume_step`` (the
        checkpoint's step: the rows an interrupted run logged after it are repeated by the resumed run)."""
        self.path = out_dir / "train_log.csv"
        self.loss_fields = list(loss_fields)
        fields = ["step", *self.loss_fields, *self.TIMING]
        kept_rows: List[Dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                kept_rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                             and int(r["step"]) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept_rows)
        os.replace(tmp, self.path)
        self.f = open(self.path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields, extrasaction="ignore")
        self.tb = open_tensorboard(out_dir)

    def log(self, row: Dict[str, Any]) -> None:
        self.w.writerow(row)
        self.f.flush()
        if self.tb is not None:
            for k in (*self.loss_fields, "lr"):
                if k in row and row[k] != "":
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def log_evaluation(self, step: int, summary: Mapping[str, Any]) -> None:
        """The evaluation's per-class Dice (mean over scans) and overall mean as TensorBoard scalars at ``step``
        (:func:`evaluation_scalars`); a no-op without tensorboard. The CSV log is not touched."""
        if self.tb is not None:
            _write_evaluation(self.tb, step, summary)
            self.tb.flush()

    def log_images(self, step: int, images: Optional[Images], max_images: int = MAX_IMAGES) -> None:
        """Overlay images (``{name: [H, W, C] uint8}`` or a folder of PNG files) as ``eval/overlay/<name>`` at
        ``step``; a no-op without tensorboard."""
        if self.tb is not None:
            _write_images(self.tb, step, images, max_images)
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
