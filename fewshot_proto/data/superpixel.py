"""Superpixel pseudo-labels for self-supervised episodes (SSL-ALPNet style).

SSL-ALPNet trains without labels by drawing one superpixel of a slice as the "organ": superpixels come from
Felzenszwalb's graph segmentation (``skimage.segmentation.felzenszwalb``, per 2-D slice) and are restricted to the
body, a foreground mask made by thresholding intensities just above the background, keeping the largest connected
component and filling its holes; superpixels in the empty background are dropped.

Differences from SSL-ALPNet, and why:

* SSL-ALPNet runs felzenszwalb on raw preprocessed intensities with ``scale=1`` (so segment size is set almost
  only by ``min_size``, 400 px at 256x256, ``sigma=1``). Here each slice is first rescaled to [0, 1] (robust
  percentiles), so ``scale`` means the same on z-scored MR, CT or phantoms; ``scale=100`` on [0, 1] behaves like
  scale 100 on an 8-bit image (skimage divides scale by 255), still dominated by ``min_size`` at these sizes.
* SSL-ALPNet's body threshold is a per-dataset constant in raw units (1e-4 for CT, 50 for CHAOS-T2); here it is a
  fraction (default 5 %) of each slice's robust intensity range (1st-99th percentile) above its background level,
  taken after a light Gaussian smoothing, which works on normalised data and noisy backgrounds.

Only numpy, scipy and scikit-image.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb

__all__ = ["body_mask", "superpixels", "superpixel_pseudolabel"]


def _unit_range(img2d: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    """Rescale to [0, 1] between robust percentiles (constant image -> zeros)."""
    x = np.asarray(img2d, dtype=np.float32)
    lo, hi = np.percentile(x, [lo_pct, hi_pct])
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros_like(x)
    return np.clip((x - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0)


def body_mask(img2d: np.ndarray, threshold: Optional[float] = None, frac: float = 0.05,
              smooth: float = 1.0) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the body (non-background) in a slice.

    The slice is smoothed (Gaussian, ``smooth`` pixels, so background noise does not leak through), thresholded
    at ``threshold`` (default: ``p1 + frac * (p99 - p1)`` of the smoothed slice, i.e. just above the background
    level), reduced to its largest connected component and its holes are filled. A slice with nothing above the
    threshold gives an all-False mask.
    """
    x = np.asarray(img2d, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"body_mask expects [H,W], got shape {x.shape}")
    if smooth > 0:
        x = ndimage.gaussian_filter(x, float(smooth))
    if threshold is None:
        lo, hi = (float(v) for v in np.percentile(x, [1, 99]))
        threshold = lo + float(frac) * (hi - lo)
    fg = x > threshold
    if not fg.any():
        return fg
    lab, n = ndimage.label(fg)
    if n > 1:
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        fg = lab == int(np.argmax(sizes))
    return ndimage.binary_fill_holes(fg)


def superpixels(img2d: np.ndarray, scale: float = 100.0, sigma: float = 0.8, min_size: int = 200) -> np.ndarray:
    """Felzenszwalb superpixels of one slice: int32 ``[H, W]`` labels ``0..n-1`` covering every pixel.

    Args:
        img2d: grey slice ``[H, W]`` (any intensity range; rescaled to [0, 1] first, see module docstring).
        scale: felzenszwalb observation scale (larger: larger segments).
        sigma: Gaussian pre-smoothing width in pixels.
        min_size: minimum segment size in pixels (enforced by merging).
    """
    x = np.asarray(img2d)
    if x.ndim != 2:
        raise ValueError(f"superpixels expects [H,W], got shape {x.shape}")
    seg = felzenszwalb(_unit_range(x).astype(np.float64), scale=float(scale), sigma=float(sigma),
                       min_size=int(min_size), channel_axis=None)
    return seg.astype(np.int32, copy=False)


def superpixel_pseudolabel(
    img2d: np.ndarray,
    rng: np.random.Generator,
    min_pixels: int = 100,
    *,
    scale: float = 100.0,
    sigma: float = 0.8,
    min_size: int = 200,
    body: Optional[np.ndarray] = None,
    segments: Optional[np.ndarray] = None,
    min_inside: float = 0.5,
) -> Optional[np.ndarray]:
    """One random superpixel inside the body as a boolean ``[H, W]`` mask, or ``None`` when none qualifies.

    A superpixel qualifies when at least ``min_pixels`` of its pixels, and at least ``min_inside`` of its area,
    lie inside the body mask; the returned mask is the superpixel intersected with the body.

    Args:
        img2d: grey slice ``[H, W]``.
        rng: random generator (the only source of randomness).
        min_pixels: minimum size of the returned mask.
        scale, sigma, min_size: :func:`superpixels` parameters (ignored when ``segments`` is given).
        body: precomputed body mask (default :func:`body_mask`).
        segments: precomputed superpixel labels (default :func:`superpixels`).
        min_inside: minimum fraction of the superpixel's area inside the body.
    """
    x = np.asarray(img2d)
    seg = superpixels(x, scale, sigma, min_size) if segments is None else np.asarray(segments)
    if seg.shape != x.shape:
        raise ValueError(f"segments shape {seg.shape} != image shape {x.shape}")
    inside = body_mask(x) if body is None else np.asarray(body, dtype=bool)
    if inside.shape != x.shape:
        raise ValueError(f"body mask shape {inside.shape} != image shape {x.shape}")
    if seg.size == 0 or not inside.any():
        return None
    n = int(seg.max()) + 1
    total = np.bincount(seg.ravel(), minlength=n)
    within = np.bincount(seg[inside], minlength=n)
    ok = np.flatnonzero((within >= int(min_pixels)) & (within >= float(min_inside) * np.maximum(total, 1)))
    if ok.size == 0:
        return None
    pick = int(ok[rng.integers(ok.size)])
    return (seg == pick) & inside
