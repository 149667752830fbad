"""Surface-distance metrics in millimetres: HD95 and ASSD over a 3-D volume (or a contiguous z-slab).

Definitions (defaults = MONAI's ``compute_hausdorff_distance(..., percentile=95, directed=False)`` and
``compute_average_surface_distance(..., symmetric=True)`` with ``spacing``; ``tests/unit/metrics`` checks the
agreement on random anisotropic volumes):

* surface of a mask ``M``: ``M AND NOT erode(M)``, erosion with the face-connected structuring element
  (``connectivity=1``: 6-neighbourhood in 3-D, scipy's default and MONAI's ``get_mask_edges``; 2 or 3 add
  edge/corner neighbours). Voxels outside the array count as background, so foreground on the array border (or
  on the cut faces of a slab) is surface.
* directed distances ``d(P->T)``: for every surface voxel of the prediction, the Euclidean distance in mm
  (``spacing`` = voxel size ``(z, y, x)``, the array's axis order) to the nearest surface voxel of the truth;
  ``d(T->P)`` likewise. Exact: ``scipy.ndimage.distance_transform_edt(~surface_T, sampling=spacing)`` on the
  bounding box of ``P | T`` (every surface voxel lies inside it), or a KD-tree (``method="kdtree"``).
* ``hd95`` (``reduction``/``hd_reduction``):

  - ``"max"`` (default, MONAI): ``max(p95(d(P->T)), p95(d(T->P)))``, the larger of the two directed 95th
    percentiles;
  - ``"pooled"`` (medpy, nnU-Net): the 95th percentile of ``d(P->T)`` and ``d(T->P)`` concatenated.

  Percentiles interpolate linearly (``numpy.percentile``, ``torch.quantile``); ``percentile=100`` gives the
  classic Hausdorff distance under either convention.
* ``assd`` (``reduction``/``assd_reduction``):

  - ``"pooled"`` (default, MONAI ``symmetric=True``: the mean of ``d(P->T)`` and ``d(T->P)`` concatenated):
    ``(sum d(P->T) + sum d(T->P)) / (|surf P| + |surf T|)``, so the larger surface weighs more;
  - ``"mean"`` (medpy): the mean of the two directed means.

Empty masks (in the scored volume or slab):

    ===========================  ==============================================================
    both masks empty             ``both_empty`` (default NaN: nothing to score, as MONAI)
    exactly one mask empty       ``one_empty`` (default NaN: undefined; MONAI gives NaN or +inf)
    ===========================  ==============================================================

The nan-aware means of ``fewshot_proto.metrics.aggregate`` skip both; ``surface_metrics`` reports which case
applied (``"empty_masks"``: 0, 1 or 2) so that the one-empty scans are counted (``n_empty``) rather than hidden.

``method="edt"`` (default) costs time in proportion to the bounding box's size; ``method="kdtree"`` in proportion to
the surface sizes. Both give the same distances.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .overlap import ZSelect, as_mask, select_z

__all__ = [
    "surface",
    "surface_distances",
    "hd95",
    "assd",
    "surface_metrics",
    "surface_distance_convention",
    "HD95_CONVENTIONS",
    "ASSD_CONVENTIONS",
]

_NAN = float("nan")


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
    """Boolean surface voxels of ``mask`` (any dimension): ``mask AND NOT erode(mask)``, outside the array counted
    as background (MONAI's ``get_mask_edges`` edges for ``connectivity=1``). ``connectivity`` as in
    ``scipy.ndimage.generate_binary_structure``."""
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
            (exact nearest-neighbour search between the surface voxel sets). Both give the same distances.

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


#: ``hd_reduction`` / ``assd_reduction`` values, default first, with the words every report uses for them.
HD95_CONVENTIONS: Dict[str, str] = {
    "max": "max of the two directed 95th percentiles, max(p95(d(P->T)), p95(d(T->P))) (MONAI)",
    "pooled": "95th percentile of the directed distances of both directions pooled (medpy)",
}
ASSD_CONVENTIONS: Dict[str, str] = {
    "pooled": "mean of the directed distances of both directions pooled, "
              "(sum d(P->T) + sum d(T->P)) / (|surf P| + |surf T|) (MONAI, symmetric=True)",
    "mean": "mean of the two directed means (medpy)",
}
_TAGS = {"max": "max-of-directed-p95", "pooled": "pooled-p95"}
_ASSD_TAGS = {"pooled": "pooled-mean", "mean": "mean-of-directed-means"}


def surface_distance_convention(hd_reduction: str = "max", assd_reduction: str = "pooled") -> Dict[str, str]:
    """The ``"surface_distance"`` entry of a report: how ``hd95``/``assd`` were defined, in words.

    Keys: ``hd95``, ``assd``, ``units`` (``"mm"``), ``surface``, ``empty``, ``tag`` (one short token for a CSV
    column, e.g. ``"hd95=max-of-directed-p95;assd=pooled-mean;mm"``).
    """
    _check_options(hd_reduction=hd_reduction, assd_reduction=assd_reduction)
    return {
        "hd95": HD95_CONVENTIONS[hd_reduction],
        "assd": ASSD_CONVENTIONS[assd_reduction],
        "units": "mm",
        "surface": "mask voxels with a face neighbour outside the mask (erosion, 6-connectivity; outside the "
                   "array is background); exact Euclidean distances with the voxel spacing",
        "empty": "exactly one of prediction and truth empty: NaN, counted in n_empty; both empty: NaN "
                 "(nothing to score); NaN is skipped by the means",
        "tag": f"hd95={_TAGS[hd_reduction]};assd={_ASSD_TAGS[assd_reduction]};mm",
    }


def _check_options(
    *, method: str = "edt", percentile: float = 95.0, hd_reduction: str = "max", assd_reduction: str = "pooled"
) -> None:
    if method not in ("edt", "kdtree"):
        raise ValueError(f"surface distance method must be 'edt' or 'kdtree'; got {method!r}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100]; got {percentile}")
    if hd_reduction not in HD95_CONVENTIONS:
        raise ValueError(f"hd95 reduction must be 'max' or 'pooled'; got {hd_reduction!r}")
    if assd_reduction not in ASSD_CONVENTIONS:
        raise ValueError(f"assd reduction must be 'pooled' or 'mean'; got {assd_reduction!r}")


def _n_empty(p: np.ndarray, t: np.ndarray) -> int:
    return int(not p.any()) + int(not t.any())


def _empty_value(n_empty: int, both_empty: float, one_empty: float) -> Optional[float]:
    return {0: None, 1: float(one_empty), 2: float(both_empty)}[n_empty]


def _hd(d_pt: np.ndarray, d_tp: np.ndarray, percentile: float, reduction: str) -> float:
    if reduction == "max":
        return float(max(np.percentile(d_pt, percentile), np.percentile(d_tp, percentile)))
    if reduction == "pooled":
        return float(np.percentile(np.concatenate([d_pt, d_tp]), percentile))
    raise ValueError(f"hd95 reduction must be 'max' or 'pooled'; got {reduction!r}")


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
    hd_reduction: str = "max",
    assd_reduction: str = "pooled",
    both_empty: float = _NAN,
    one_empty: float = _NAN,
    connectivity: int = 1,
    method: str = "edt",
) -> Dict[str, Any]:
    """``{"hd95": mm, "assd": mm, "empty_masks": 0 | 1 | 2}`` from one pair of distance transforms.

    Defaults are MONAI's definitions (see the module docstring); ``hd_reduction="pooled"`` /
    ``assd_reduction="mean"`` select medpy's. ``empty_masks`` counts the empty masks among prediction and truth
    (in the slab): 2 -> both metrics are ``both_empty`` (NaN), 1 -> ``one_empty`` (NaN).
    """
    _check_options(method=method, percentile=percentile, hd_reduction=hd_reduction, assd_reduction=assd_reduction)
    p, t, _ = _prepare(pred, truth, spacing, zs, cls)
    n_empty = _n_empty(p, t)
    value = _empty_value(n_empty, both_empty, one_empty)
    if value is not None:
        return {"hd95": value, "assd": value, "empty_masks": n_empty}
    d_pt, d_tp = surface_distances(p, t, spacing, connectivity=connectivity, method=method)
    return {"hd95": _hd(d_pt, d_tp, percentile, hd_reduction), "assd": _asd(d_pt, d_tp, assd_reduction),
            "empty_masks": 0}


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    zs: ZSelect = None,
    cls: Optional[int] = None,
    percentile: float = 95.0,
    reduction: str = "max",
    both_empty: float = _NAN,
    one_empty: float = _NAN,
    connectivity: int = 1,
    method: str = "edt",
) -> float:
    """95th-percentile Hausdorff distance in mm between the surfaces of ``pred[Z,H,W]`` and ``truth[Z,H,W]``.

    ``reduction``: ``"max"`` (default, MONAI: the larger of the two directed 95th percentiles) or ``"pooled"``
    (medpy: the 95th percentile of both directed distance sets together). Both masks empty -> ``both_empty``
    (NaN); exactly one empty -> ``one_empty`` (NaN).
    """
    _check_options(method=method, percentile=percentile, hd_reduction=reduction)
    p, t, _ = _prepare(pred, truth, spacing, zs, cls)
    value = _empty_value(_n_empty(p, t), both_empty, one_empty)
    if value is not None:
        return value
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
    one_empty: float = _NAN,
    connectivity: int = 1,
    method: str = "edt",
) -> float:
    """Average symmetric surface distance in mm between ``pred[Z,H,W]`` and ``truth[Z,H,W]``.

    ``reduction``: ``"pooled"`` (default, MONAI ``symmetric=True``: the mean over the distances of every surface
    voxel of both masks) or ``"mean"`` (medpy: the mean of the two directed means). Both masks empty ->
    ``both_empty`` (NaN); exactly one empty -> ``one_empty`` (NaN).
    """
    _check_options(method=method, assd_reduction=reduction)
    p, t, _ = _prepare(pred, truth, spacing, zs, cls)
    value = _empty_value(_n_empty(p, t), both_empty, one_empty)
    if value is not None:
        return value
    d_pt, d_tp = surface_distances(p, t, spacing, connectivity=connectivity, method=method)
    return _asd(d_pt, d_tp, reduction)
