"""Intensity normalisation of whole volumes (numpy only).

Two regimes, as in SSL-ALPNet:

* **MR** (``"zscore"``, the default): every volume is z-scored on its own, ``(x - mean) / std`` over all its voxels
  (or over a mask). MR intensities have no absolute unit and vary wildly between scans: the MSD hippocampus images
  range from a maximum of 112 to 1.7e6, so any global statistic would be meaningless.
* **CT** (``"ct"``): Hounsfield units are absolute, so volumes are first clipped to a window (``ct_window``, default
  the abdominal window ``(-125, 275)`` HU that SSL-ALPNet uses) and then standardised with ONE mean/std computed over
  the *training* volumes after windowing (:func:`dataset_stats`). Using training volumes only keeps test scans out of
  the statistics; the statistic is label-free, so including a test scan would leak intensities, never labels.

``"none"`` only casts to float32.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "DEFAULT_CT_WINDOW",
    "NORMALISE_METHODS",
    "zscore",
    "ct_window",
    "dataset_stats",
    "normalise_volume",
]

#: Abdominal soft-tissue window in HU used by SSL-ALPNet's CT preprocessing.
DEFAULT_CT_WINDOW: Tuple[float, float] = (-125.0, 275.0)
NORMALISE_METHODS = ("zscore", "ct", "none")
_EPS = 1e-8


def zscore(image: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """``(image - mean) / std`` with statistics over ``mask`` (all voxels when ``None``).

    Args:
        image: any-shape array (typically ``[Z, H, W]``).
        mask: boolean array of the same shape selecting the voxels the statistics are taken over.

    Returns:
        float32 array of ``image``'s shape. A constant image (std ~ 0) gives zeros, never NaN; an empty mask gives
        the image shifted to zero mean over all voxels.
    """
    x = np.asarray(image, dtype=np.float32)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != x.shape:
            raise ValueError(f"zscore: mask shape {mask.shape} != image shape {x.shape}")
        sel = x[mask]
        if sel.size == 0:
            sel = x
    else:
        sel = x
    # float64 accumulation: large volumes with large values lose precision in float32 sums
    mean = float(sel.mean(dtype=np.float64))
    std = float(sel.std(dtype=np.float64))
    out = x - np.float32(mean)
    if std > _EPS * max(1.0, abs(mean)):
        out /= np.float32(std)
    else:
        out[...] = 0.0
    return out


def ct_window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``image`` (HU) to ``[low, high]``; returns float32 of the same shape."""
    if not low < high:
        raise ValueError(f"ct_window: low ({low}) must be below high ({high})")
    return np.clip(np.asarray(image, dtype=np.float32), np.float32(low), np.float32(high))


def dataset_stats(
    images: Iterable[np.ndarray], window: Optional[Sequence[float]] = DEFAULT_CT_WINDOW
) -> Tuple[float, float]:
    """Mean and std of all voxels of ``images`` after clipping each to ``window`` (CT normalisation).

    Pass the *training* volumes only (one at a time: ``images`` may be a generator, so only one volume is in memory).
    Accumulates in float64 (sum and sum of squares), so the result does not depend on how voxels are split into
    volumes.

    Args:
        images: iterable of raw (HU) arrays of any shape.
        window: ``(low, high)`` clipping window, or ``None`` for no clipping.

    Returns:
        ``(mean, std)``; std is 1.0 when all voxels are equal (so normalisation stays finite).
    """
    n = 0
    s = 0.0
    s2 = 0.0
    for img in images:
        x = np.asarray(img, dtype=np.float64)
        if window is not None:
            x = np.clip(x, float(window[0]), float(window[1]))
        n += x.size
        s += float(x.sum())
        s2 += float(np.square(x).sum())
    if n == 0:
        raise ValueError("dataset_stats: no voxels (empty list of volumes)")
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0)
    std = float(np.sqrt(var))
    return float(mean), (std if std > _EPS else 1.0)


def normalise_volume(
    image: np.ndarray,
    method: str = "zscore",
    ct_window: Optional[Sequence[float]] = None,
    stats: Optional[Tuple[float, float]] = None,
) -> np.ndarray:
    """Normalise one volume.

    Args:
        image: raw volume, any shape.
        method: ``"zscore"`` (per volume; ``ct_window`` if given clips first), ``"ct"`` (clip to ``ct_window`` or
            :data:`DEFAULT_CT_WINDOW`, then ``(x - mean) / std`` with ``stats`` from :func:`dataset_stats`; without
            ``stats`` the clipped volume is z-scored on its own) or ``"none"`` (float32 cast only).
        ct_window: ``(low, high)`` clipping window.
        stats: ``(mean, std)`` of the training set after windowing (``"ct"`` only).

    Returns:
        float32 array of ``image``'s shape.
    """
    if method == "none":
        return np.asarray(image, dtype=np.float32)
    if method == "zscore":
        x = np.asarray(image, dtype=np.float32)
        if ct_window is not None:
            x = _clip(x, ct_window)
        return zscore(x)
    if method == "ct":
        x = _clip(np.asarray(image, dtype=np.float32), ct_window if ct_window is not None else DEFAULT_CT_WINDOW)
        if stats is None:
            return zscore(x)
        mean, std = float(stats[0]), float(stats[1])
        if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
            raise ValueError(f"normalise_volume: invalid CT stats (mean={mean}, std={std})")
        return (x - np.float32(mean)) / np.float32(std)
    raise ValueError(f"unknown normalisation {method!r}; choose one of {list(NORMALISE_METHODS)}")


def _clip(x: np.ndarray, window: Sequence[float]) -> np.ndarray:
    if len(window) != 2:
        raise ValueError(f"ct_window must be (low, high), got {window!r}")
    return ct_window(x, float(window[0]), float(window[1]))
