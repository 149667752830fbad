"""Overlap metrics from voxel counts accumulated over a 3-D volume (or a z-slab of it).

How scores are computed (DESIGN.md section 5, STYLE.md example 6):

1. ``confusion(pred, truth)`` counts true positives, false positives and false negatives over the WHOLE
   ``[Z, H, W]`` volume of one (scan, class) pair, optionally restricted to a set of slices ``zs`` (for example
   the ground-truth z-slab of the ``alpnet`` protocol).
2. ``dice``/``iou``/``precision``/``recall`` reduce those counts. Per-slice scores are never averaged: a scan's
   Dice is ``2 TP / (2 TP + FP + FN)`` with TP/FP/FN summed over all its scored slices (the SSL-ALPNet
   convention). Averaging then happens across scans (``fewshot_proto.metrics.aggregate``).

Empty-mask semantics (``P`` = predicted foreground voxels, ``T`` = ground-truth foreground voxels):

    ===============================  ========  ========  ===========  ========
    case                             dice      iou       precision    recall
    ===============================  ========  ========  ===========  ========
    T empty, P empty  (tp=fp=fn=0)   empty     empty     empty        empty
    T empty, P not    (fp>0)         0.0       0.0       0.0          NaN
    T not,   P empty  (fn>0)         0.0       0.0       NaN          0.0
    both non-empty                   formula   formula   formula      formula
    ===============================  ========  ========  ===========  ========

``empty`` is a keyword argument of every score (default ``NaN``: "nothing to score", skipped by the nan-aware
aggregation; pass ``empty=1.0`` for the "perfectly predicted nothing" convention). NaN in the table means the
ratio is undefined (0/0) whatever ``empty`` is: recall has no positives to recover when the truth is empty,
precision has no predictions to judge when the prediction is empty.

Everything here is numpy only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "ZSelect",
    "ScanCounts",
    "as_mask",
    "select_z",
    "foreground_slab",
    "confusion",
    "dice",
    "iou",
    "precision",
    "recall",
]

#: How to choose slices along axis 0 (Z): ``None`` (all), a ``slice`` (``slice(z0, z1 + 1)`` for the inclusive
#: slab ``z0..z1``), a sequence/array of integer slice indices, or a boolean array of length Z.
ZSelect = Union[None, slice, Sequence[int], np.ndarray]

Number = Union[int, float, np.ndarray]


def as_mask(arr: np.ndarray, cls: Optional[int] = None, *, name: str = "mask") -> np.ndarray:
    """Binary foreground mask of ``arr`` (same shape, dtype bool).

    Args:
        arr: integer label map, bool mask, or float mask whose values are exactly 0/1.
        cls: when given, foreground is ``arr == cls``; otherwise ``arr != 0``.
        name: used in error messages.

    Raises:
        ValueError: a float array holds values other than 0 and 1 (threshold probabilities first).
    """
    a = np.asarray(arr)
    if cls is not None:
        return a == cls
    if a.dtype == bool:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if a.size and not np.all((a == 0) | (a == 1)):
            raise ValueError(
                f"{name}: float array with values other than 0/1 (e.g. probabilities); threshold it or pass "
                f"an integer label map"
            )
    return a != 0


def select_z(arr: np.ndarray, zs: ZSelect, *, name: str = "array") -> np.ndarray:
    """``arr`` restricted to the slices ``zs`` along axis 0 (a view for ``None`` and ``slice``).

    Raises:
        ValueError: an index is out of range, or a boolean selector has the wrong length.
    """
    if zs is None:
        return arr
    if isinstance(zs, slice):
        return arr[zs]
    idx = np.asarray(zs)
    n = arr.shape[0]
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise ValueError(f"{name}: boolean zs has shape {idx.shape}, expected ({n},)")
        return arr[idx]
    if idx.size == 0:
        return arr[:0]
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name}: zs must be None, a slice, integer indices or a boolean mask; got {idx.dtype}")
    if idx.min() < -n or idx.max() >= n:
        raise ValueError(f"{name}: zs index out of range for {n} slices: min {idx.min()}, max {idx.max()}")
    return arr[idx]


def foreground_slab(mask: np.ndarray) -> Optional[slice]:
    """The z-slab ``slice(first, last + 1)`` spanning every slice of ``mask[Z, ...]`` with foreground.

    Returns ``None`` when the mask is empty. Pass the result as ``zs=`` to score over the ground-truth slab
    (the ``alpnet`` protocol's convention).
    """
    m = np.asarray(mask)
    any_z = m.reshape(m.shape[0], -1).any(axis=1) if m.ndim > 1 else m.astype(bool)
    nz = np.flatnonzero(any_z)
    if nz.size == 0:
        return None
    return slice(int(nz[0]), int(nz[-1]) + 1)


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> None:
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"prediction shape {np.shape(pred)} != ground-truth shape {np.shape(truth)}")
    if np.ndim(pred) < 1:
        raise ValueError("prediction and ground truth must be arrays with at least one axis")


def confusion(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    cls: Optional[int] = None,
    zs: ZSelect = None,
) -> Tuple[int, int, int]:
    """Voxel counts ``(tp, fp, fn)`` of a prediction against the ground truth, summed over the volume.

    Args:
        pred: ``[Z, H, W]`` (any shape, matching ``truth``) bool / integer / 0-1 float mask or label map.
        truth: ``[Z, H, W]`` ground truth, same shape.
        cls: foreground is ``== cls`` in BOTH arrays when given; otherwise foreground is ``!= 0``. To compare a
            binary prediction with a multi-label ground truth, pass ``truth == c`` yourself.
        zs: slices (axis 0) to count over; see ``ZSelect``. ``None`` counts the whole volume.

    Returns:
        Python ints ``(tp, fp, fn)``.
    """
    _check_pair(pred, truth)
    p = select_z(as_mask(pred, cls, name="prediction"), zs, name="prediction")
    t = select_z(as_mask(truth, cls, name="ground truth"), zs, name="ground truth")
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    return tp, fp, fn


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _counts(tp: Number, fp: Number, fn: Number) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, p, n = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    if np.any(t < 0) or np.any(p < 0) or np.any(n < 0):
        raise ValueError(f"counts must be non-negative; got tp={tp}, fp={fp}, fn={fn}")
    return t, p, n


def _finish(value: np.ndarray, both_empty: np.ndarray, empty: float, scalar: bool) -> Union[float, np.ndarray]:
    value = np.where(both_empty, np.float64(empty), value)
    return float(value) if scalar else value


def _is_scalar(*xs: Number) -> bool:
    return all(np.ndim(x) == 0 for x in xs)


def dice(tp: Number, fp: Number, fn: Number, *, empty: float = float("nan")) -> Union[float, np.ndarray]:
    """Dice ``2 tp / (2 tp + fp + fn)``; ``empty`` when ``tp = fp = fn = 0``; 0 when only one mask is empty.

    Accepts scalars (returns a float) or broadcastable arrays (returns float64 arrays).
    """
    t, p, n = _counts(tp, fp, fn)
    val = _ratio(2 * t, 2 * t + p + n)
    return _finish(val, (t + p + n) == 0, empty, _is_scalar(tp, fp, fn))


def iou(tp: Number, fp: Number, fn: Number, *, empty: float = float("nan")) -> Union[float, np.ndarray]:
    """Intersection over union (Jaccard) ``tp / (tp + fp + fn)``; empty-mask rules as ``dice``."""
    t, p, n = _counts(tp, fp, fn)
    val = _ratio(t, t + p + n)
    return _finish(val, (t + p + n) == 0, empty, _is_scalar(tp, fp, fn))


def precision(tp: Number, fp: Number, fn: Number, *, empty: float = float("nan")) -> Union[float, np.ndarray]:
    """Precision ``tp / (tp + fp)``: ``empty`` when both masks are empty, NaN when only the prediction is
    empty (nothing predicted to judge), 0 when only the truth is empty (every prediction is wrong)."""
    t, p, n = _counts(tp, fp, fn)
    val = _ratio(t, t + p)
    return _finish(val, (t + p + n) == 0, empty, _is_scalar(tp, fp, fn))


def recall(tp: Number, fp: Number, fn: Number, *, empty: float = float("nan")) -> Union[float, np.ndarray]:
    """Recall (sensitivity) ``tp / (tp + fn)``: ``empty`` when both masks are empty, NaN when only the truth
    is empty (nothing to recover), 0 when only the prediction is empty."""
    t, p, n = _counts(tp, fp, fn)
    val = _ratio(t, t + n)
    return _finish(val, (t + p + n) == 0, empty, _is_scalar(tp, fp, fn))


@dataclass
class ScanCounts:
    """TP/FP/FN of one (scan, class) pair, accumulated over the scored slices of the 3-D volume.

    Attributes:
        scan: scan id.
        class_id: label value of the class.
        tp, fp, fn: voxel counts.
        n_slices: number of slices the counts were taken over.
        fold: evaluation fold (``None`` when not applicable).
    """

    scan: str
    class_id: int
    tp: int = 0
    fp: int = 0
    fn: int = 0
    n_slices: int = 0
    fold: Optional[int] = None

    @classmethod
    def from_masks(
        cls,
        pred: np.ndarray,
        truth: np.ndarray,
        *,
        scan: str,
        class_id: int,
        zs: ZSelect = None,
        label: Optional[int] = None,
        fold: Optional[int] = None,
    ) -> "ScanCounts":
        """Counts of ``pred[Z,H,W]`` against ``truth[Z,H,W]`` over the slices ``zs``.

        ``label`` is forwarded to ``confusion(cls=...)`` (compare ``== label`` in both arrays).
        """
        try:
            tp, fp, fn = confusion(pred, truth, cls=label, zs=zs)
        except ValueError as e:
            raise ValueError(f"scan {scan!r}, class {class_id}: {e}") from None
        n_z = int(select_z(np.arange(np.shape(pred)[0]), zs).shape[0])
        return cls(scan=str(scan), class_id=int(class_id), tp=tp, fp=fp, fn=fn, n_slices=n_z, fold=fold)

    def __add__(self, other: "ScanCounts") -> "ScanCounts":
        """Merge counts of the same (fold, scan, class) taken over disjoint slices."""
        if not isinstance(other, ScanCounts):
            return NotImplemented
        if (self.scan, self.class_id, self.fold) != (other.scan, other.class_id, other.fold):
            raise ValueError(
                f"cannot add counts of scan {other.scan!r} class {other.class_id} fold {other.fold} to "
                f"scan {self.scan!r} class {self.class_id} fold {self.fold}"
            )
        return ScanCounts(
            self.scan,
            self.class_id,
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.n_slices + other.n_slices,
            self.fold,
        )

    @property
    def is_empty(self) -> bool:
        """True when neither the prediction nor the truth has foreground."""
        return self.tp + self.fp + self.fn == 0

    def dice(self, *, empty: float = float("nan")) -> float:
        return float(dice(self.tp, self.fp, self.fn, empty=empty))

    def iou(self, *, empty: float = float("nan")) -> float:
        return float(iou(self.tp, self.fp, self.fn, empty=empty))

    def precision(self, *, empty: float = float("nan")) -> float:
        return float(precision(self.tp, self.fp, self.fn, empty=empty))

    def recall(self, *, empty: float = float("nan")) -> float:
        return float(recall(self.tp, self.fp, self.fn, empty=empty))

    def scores(self, *, empty: float = float("nan")) -> Dict[str, float]:
        """``{"dice", "iou", "precision", "recall"}`` with the same ``empty`` rule."""
        return {
            "dice": self.dice(empty=empty),
            "iou": self.iou(empty=empty),
            "precision": self.precision(empty=empty),
            "recall": self.recall(empty=empty),
        }

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
