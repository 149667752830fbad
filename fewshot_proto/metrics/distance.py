"""Surface-distance metrics in millimetres: HD95 and ASSD over a 3-D volume (or a contiguous z-slab).

Definitions (the medpy / nnU-Net conventions unless ``reduction`` says otherwise):

* surface of a mask ``M``: ``M XOR erode(M)``, erosion with the face-connected structuring element
  (``connectivity=1``: 6-neighbourhood in 3-D; 2 or 3 add edge/corner neighbours). Voxels outside the array
  count as background, so foreground on the array border (or on the cut faces of a slab) is surface.
* directed distances ``d(P->T)``: for every surface voxel of the prediction, the Euclidean distance in mm
  (``spacing`` = voxel size ``(z, y, x)``) to the nearest surface voxel of the truth; ``d(T->P)`` likewise.
  Computed with ``scipy.ndimage.distance_transform_edt(~surface_T, sampling=spacing)`` (exact EDT), on the
  bounding box of ``P | T`` only (exact, since every surface voxel lies inside it).
* ``hd95``: ``reduction="pooled"`` (default, medpy): 95th percentile (linear interpolation) of the
  concatenation of both directed sets; ``"max"`` (MONAI): the larger of the two directed 95th percentiles.
  ``percentile=100`` gives the classic Hausdorff distance.
* ``assd``: ``reduction="pooled"`` (default, the textbook average symmetric surface distance):
  ``(sum d(P->T) + sum d(T->P)) / (|surf P| + |surf T|)``; ``"mean"`` (medpy): mean of the two directed
  means.

Empty masks (documented in every signature):

    ===========================  ====================================
    both masks empty             ``both_empty``  (default NaN)
    exactly one mask empty       ``one_empty``   (default +inf)
    ===========================  ====================================

NaN rows are skipped by the nan-aware aggregation; +inf is kept (an undefined distance is not a small one) and
counted separately (``n_inf``) by ``fewshot_proto.metrics.aggregate``; JSON reports write it as ``"inf"``.

``method="edt"`` (default) costs time in proportion to the volume's size; ``method="kdtree"`` in proportion to the
surface sizes, so it is the faster one when the organs fill most of the volume.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .overlap import ZSelect, as_mask, select_z

__all__ = ["surface", "surface_distances", "hd95", "assd", "surface_metrics"]

_NAN = float("nan")
_INF = float("inf")


def _spacing(spacing: Sequence[float], ndim: int) -> Tuple[float, ...]:
    sp = tuple(float(s) for s in np.broadcast_to(np.asarray(spacing, dtype=np.float64), (ndim,)))
    if not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive finite numbers (z, y, x) in mm; got {spacing}")
    return sp


def _contiguous_z(arr: np.ndarray, zs: ZSelect, name: str) -> np.ndarray:
    """``select_z`` restricted to contiguous slabs (distances across a gap would be meaningless)."""
    if zs is None:
        return arr
    if isinstance(zs, slice):
        if zs.step not in (None, 1):
            raise ValueError(f"{name}: distance metrics need a contiguous slab; got slice step {zs.step}")
        return arr[zs]
    idx = np.asarray(zs)
    if idx.dtype == bool:
        if idx.shape != (arr.shape[0],):
            raise ValueError(f"{name}: boolean zs has shape {idx.shape}, expected ({arr.shape[0]},)")
        idx = np.flatnonzero(idx)
    if idx.size > 1 and not np.all(np.diff(idx) == 1):
        raise ValueError(
            f"{name}: distance metrics need a contiguous, increasing slab of slices; got zs={idx.tolist()}"
        )
    return select_z(arr, idx, name=name)


def surface(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Boolean surface voxels of ``mask`` (any dimension): ``mask XOR erode(mask)``, border counted as
    background. ``connectivity`` as in ``scipy.ndimage.generate_binary_structure``."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return m.copy()
    structure = ndimage.generate_binary_structure(m.ndim, connectivity)
    return m & ~ndimage.binary_erosion(m, structure=structure, border_value=0)


def _bbox(m: np.ndarray) -> Tuple[slice, ...]:
    out = []
    for ax in range(m.ndim):
        other = tuple(a for a in range(m.ndim) if a != ax)
        nz = np.flatnonzero(m.any(axis=other))
        out.append(slice(int(nz[0]), int(nz[-1]) + 1))
    return tuple(out)


def _prepare(
    pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], zs: ZSelect, cls: Optional[int]
) -> Tuple[np.ndarray, np.ndarray, Tuple[float, ...]]:
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"prediction shape {np.shape(pred)} != ground-truth shape {np.shape(truth)}")
    p = _contiguous_z(as_mask(pred, cls, name="prediction"), zs, "prediction")
    t = _contiguous_z(as_mask(truth, cls, name="ground truth"), zs, "ground truth")
    return p, t, _spacing(spacing, p.ndim)


def surface_distances(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    zs: ZSelect = None,
    cls: Optional[int] = None,
    connectivity: int = 1,
    method: str = "edt",
) -> Tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: ``(d(P->T), d(T->P))``.

    Args:
        pred, truth: ``[Z, H, W]`` masks / label maps of equal shape (foreground ``!= 0``, or ``== cls``).
        spacing: voxel size ``(z, y, x)`` in mm.
        zs: contiguous slab of slices to use (``slice(z0, z1 + 1)``, consecutive indices or a boolean mask);
            the slab is treated as the whole volume (its cut faces are surface).
        connectivity: erosion structuring element (1 = face neighbours).
        method: ``"edt"`` (exact Euclidean distance transform of the bounding box, default) or ``"kdtree"``
            (exact nearest-neighbour search between the surface voxel sets; faster when the masks fill a
            large part of the volume). Both give the same distances.

    Returns:
        Two float64 1-D arrays: one distance per prediction surface voxel, one per truth surface voxel. When
        either mask is empty the distances are undefined and both arrays are empty (``hd95``/``assd`` then
        apply their ``both_empty``/``one_empty`` rules).
    """
    _check_options(method=method)
    p, t, sp = _prepare(pred, truth, spacing, zs, cls)
    if not p.any() or not t.any():
        return np.zeros(0), np.zeros(0)
    box = _bbox(p | t)
    p, t = p[box], t[box]
    sp_ = surface(p, connectivity)
    st_ = surface(t, connectivity)
    if method == "kdtree":
        scale = np.asarray(sp, dtype=np.float64)
        cp = np.argwhere(sp_) * scale
        ct = np.argwhere(st_) * scale
        d_pt = cKDTree(ct).query(cp, k=1)[0]
        d_tp = cKDTree(cp).query(ct, k=1)[0]
        return np.asarray(d_pt, dtype=np.float64), np.asarray(d_tp, dtype=np.float64)
    dt_to_t = ndimage.distance_transform_edt(~st_, sampling=sp)
    dt_to_p = ndimage.distance_transform_edt(~sp_, sampling=sp)
    return dt_to_t[sp_], dt_to_p[st_]


def _check_options(
    *, method: str = "edt", percentile: float = 95.0, hd_reduction: str = "pooled", assd_reduction: str = "pooled"
) -> None:
    if method not in ("edt", "kdtree"):
        raise ValueError(f"surface distance method must be 'edt' or 'kdtree'; got {method!r}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100]; got {percentile}")
    if hd_reduction not in ("pooled", "max"):
        raise ValueError(f"hd95 reduction must be 'pooled' or 'max'; got {hd_reduction!r}")
    if assd_reduction not in ("pooled", "mean"):
        raise ValueError(f"assd reduction must be 'pooled' or 'mean'; got {assd_reduction!r}")


def _empty_rule(p_any: bool, t_any: bool, both_empty: float, one_empty: float) -> Optional[float]:
    if not p_any and not t_any:
        return float(both_empty)
    if not p_any or not t_any:
        return float(one_empty)
    return None


def _hd(d_pt: np.ndarray, d_tp: np.ndarray, percentile: float, reduction: str) -> float:
    if reduction == "pooled":
        return float(np.percentile(np.concatenate([d_pt, d_tp]), percentile))
    if reduction == "max":
        return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))
    raise ValueError(f"hd95 reduction must be 'pooled' or 'max'; got {reduction!r}")


def _asd(d_pt: np.ndarray, d_tp: np.ndarray, reduction: str) -> float:
    if reduction == "pooled":
        return float((d_pt.sum() + d_tp.sum()) / (d_pt.size + d_tp.size))
    if reduction == "mean":
        return float((d_pt.mean() + d_tp.mean()) / 2.0)
    raise ValueError(f"assd reduction must be 'pooled' or 'mean'; got {reduction!r}")


def surface_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    zs: ZSelect = None,
    cls: Optional[int] = None,
    percentile: float = 95.0,
    hd_reduction: str = "pooled",
    assd_reduction: str = "pooled",
    both_empty: float = _NAN,
    one_empty: float = _INF,
    connectivity: int = 1,
    method: str = "edt",
) -> Dict[str, float]:
    """``{"hd95": ..., "assd": ...}`` in mm from one pair of distance transforms (see module docstring).

    ``both_empty`` is returned for both metrics when neither mask has foreground (in the slab), ``one_empty``
    when exactly one has.
    """
    _check_options(method=method, percentile=percentile, hd_reduction=hd_reduction, assd_reduction=assd_reduction)
    p, t, _ = _prepare(pred, truth, spacing, zs, cls)
    rule = _empty_rule(bool(p.any()), bool(t.any()), both_empty, one_empty)
    if rule is not None:
        return {"hd95": rule, "assd": rule}
    d_pt, d_tp = surface_distances(p, t, spacing, connectivity=connectivity, method=method)
    return {"hd95": _hd(d_pt, d_tp, percentile, hd_reduction), "assd": _asd(d_pt, d_tp, assd_reduction)}


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    zs: ZSelect = None,
    cls: Optional[int] = None,
    percentile: float = 95.0,
    reduction: str = "pooled",
    both_empty: float = _NAN,
    one_empty: float = _INF,
    connectivity: int = 1,
    method: str = "edt",
) -> float:
    """95th-percentile Hausdorff distance in mm between the surfaces of ``pred[Z,H,W]`` and ``truth[Z,H,W]``.

    ``reduction``: ``"pooled"`` (percentile of both directed distance sets together, medpy) or ``"max"``
    (max of the two directed percentiles, MONAI). Both masks empty -> ``both_empty`` (NaN); exactly one
    empty -> ``one_empty`` (+inf).
    """
    _check_options(method=method, percentile=percentile, hd_reduction=reduction)
    p, t, _ = _prepare(pred, truth, spacing, zs, cls)
    rule = _empty_rule(bool(p.any()), bool(t.any()), both_empty, one_empty)
    if rule is not None:
        return rule
    d_pt, d_tp = surface_distances(p, t, spacing, connectivity=connectivity, method=method)
    return _hd(d_pt, d_tp, percentile, reduction)


def assd(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    zs: ZSelect = None,
    cls: Optional[int] = None,
    reduction: str = "pooled",
    both_empty: float = _NAN,
    one_empty: float = _INF,
    connectivity: int = 1,
    method: str = "edt",
) -> float:
    """Average symmetric surface distance in mm between ``pred[Z,H,W]`` and ``truth[Z,H,W]``.

    ``reduction``: ``"pooled"`` (mean over all surface voxels of both masks) or ``"mean"`` (mean of the two
    directed means, medpy). Both masks empty -> ``both_empty`` (NaN); exactly one empty -> ``one_empty``
    (+inf).
    """
    _check_options(method=method, assd_reduction=reduction)
    p, t, _ = _prepare(pred, truth, spacing, zs, cls)
    rule = _empty_rule(bool(p.any()), bool(t.any()), both_empty, one_empty)
    if rule is not None:
        return rule
    d_pt, d_tp = surface_distances(p, t, spacing, connectivity=connectivity, method=method)
    return _asd(d_pt, d_tp, reduction)
