"""Synthetic multi-organ abdominal phantoms: the built-in default dataset (DESIGN.md section 6).

Each scan is a T2-MRI-like 3-D volume of an abdomen with four labelled organs laid out and sized like CHAOS-T2
(each organ's median area per slice, as a fraction of the image, is within 20 % of CHAOS-T2's since version 3):

    1 liver (large, patient's right, upper abdomen)       2 right kidney (small, posterior, lowest)
    3 left kidney (small, posterior, a little higher)      4 spleen (medium crescent, patient's left, upper)

and unlabelled context around them: a body outline with air outside, subcutaneous fat, an abdominal-wall
muscle layer, spine, paraspinal muscles, aorta, inferior vena cava and bowel loops of varying content.

What makes it a fair test rather than a toy:

* organ appearance is consistent across scans (each organ has its own mean grey value and texture: fine
  grain with bright vessels for the liver, coarse blobs for the spleen, cortex / medullary pyramids / sinus
  for the kidneys), so a model that matches a support organ by shape, texture and context can find it again;
* grey-value distributions overlap each other and the unlabelled background (bowel loops draw their content
  from the organs' range, muscle and spine sit close to the liver), so a per-voxel intensity rule taken from
  the support organ scores poorly (``benchmarks/phantom_difficulty.py`` measures this);
* every scan has its own pose (in-plane rotation, translation, body size and aspect, fat thickness), a
  smooth elastic deformation, its own slice count and slice thickness, a smooth multiplicative bias field,
  a global gain and Rician noise;
* organs touch (the right kidney presses into the liver, the left kidney into the spleen) and occupy partly
  different z-ranges (kidneys lower than liver and spleen, with overlap), so Setting 2 still leaves training
  slices for both test groups {2, 3} and {1, 4}.

Arrays: in memory a ``Volume`` holds ``image[Z, H, W]`` float32 and ``label[Z, H, W]`` int16 with slice 0 the
most inferior, like the CHAOS-T2 files. On disk (``ensure_phantoms``) the arrays are stored as ``(H, W, Z)``
(slice axis 2, as in CHAOS-T2) with a real affine; ``Volume.affine`` is that file affine.

Generation is deterministic: the same generator state gives bit-identical arrays. ``make_phantom_dataset``
derives one independent generator per scan from ``SeedSequence(seed)``, so scan ``"k"`` is the same whatever
``n_scans`` is. Changing the generator's output requires bumping ``PHANTOM_VERSION`` (it names the cache).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import fft as sfft
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from fewshot_proto.errors import DataError
from fewshot_proto.types import Volume

__all__ = [
    "PHANTOM_VERSION",
    "LABEL_NAMES",
    "make_phantom",
    "make_phantom_dataset",
    "ensure_phantoms",
    "phantom_cache_root",
    "phantom_dir_name",
    "zscore",
]

PHANTOM_VERSION = "3"

LABEL_NAMES: Dict[int, str] = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}

LIVER, RKIDNEY, LKIDNEY, SPLEEN = 1, 2, 3, 4

_CACHE_ENV = "FEWSHOT_PROTO_CACHE"
_COMPLETE = "COMPLETE"

# Mean grey values (before bias field, gain and noise; a T2-weighted look: fat and fluid bright, muscle dark).
_GREY = {
    "fat": 0.80,
    "muscle": 0.40,
    "liver": 0.44,
    "liver_vessel": 0.72,
    "spleen": 0.60,
    "cortex": 0.64,
    "medulla": 0.48,
    "sinus": 0.80,
    "vertebra": 0.46,
    "csf": 0.95,
    "aorta": 0.12,
    "ivc": 0.36,
}

# Organ size factors (in-plane semi-axes), the kidneys' cranio-caudal profile exponent and their distance from the
# midline, set so each organ's median area per slice, as a fraction of the image, matches CHAOS-T2 in the
# SSL-ALPNet layout (the benchmark the phantoms imitate; measured on the 20 labelled scans of
# ../shared/data/chaos_t2: liver 8.2 %, kidneys 1.7 / 1.8 %, spleen 2.5 %). Version 2 had the factors at 1.0, the
# exponent at 0.55 and the kidneys 0.34 from the midline: its kidneys covered 0.55 % of a slice (liver 4.5 %,
# spleen 1.2 %). ``tests/unit/data/test_phantom.py`` checks the calibration against the real labels.
_SCALE_LIVER = 1.35
_SCALE_KIDNEY = 1.9
_SCALE_SPLEEN = 1.5
_KIDNEY_PROFILE_POWER = 0.35
_KIDNEY_X = 0.42                                 # distance of each kidney's centre from the midline


# ----------------------------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------------------------


def zscore(image: np.ndarray) -> np.ndarray:
    """Per-volume z-score over all voxels (the ``normalise: zscore`` MR default): float32, mean 0, std 1."""
    x = np.asarray(image, dtype=np.float64)
    std = float(x.std())
    if not np.isfinite(std) or std <= 0:
        raise DataError(f"cannot z-score an image with standard deviation {std}")
    return ((x - x.mean()) / std).astype(np.float32)


def _bandpass_noise(rng: np.random.Generator, shape: Tuple[int, int, int], wavelength: float,
                    rel_bandwidth: float = 0.5, anisotropy: float = 1.0, angle: float = 0.0,
                    z_corr: float = 0.0) -> np.ndarray:
    """Band-passed Gaussian noise, unit variance, float32 ``[Z, H, W]``.

    The in-plane spectrum is a Gaussian ring around ``1 / wavelength`` cycles per pixel (relative width
    ``rel_bandwidth``); ``anisotropy`` > 1 stretches the grain along ``angle`` (radians, in-plane), giving
    streaks. ``z_corr`` > 0 correlates neighbouring slices (Gaussian low-pass over z with that sigma in slices).
    """
    z, h, w = shape
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = sfft.rfft2(white, axes=(1, 2), workers=1)
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    fu = c * fx + s * fy        # along the grain direction
    fv = -s * fx + c * fy
    f = np.sqrt((fu * anisotropy) ** 2 + fv ** 2)
    f0 = 1.0 / float(wavelength)
    filt = np.exp(-0.5 * ((f - f0) / (rel_bandwidth * f0)) ** 2).astype(np.float32)
    out = sfft.irfft2(spec * filt[None], s=(h, w), axes=(1, 2), workers=1).astype(np.float32)
    if z_corr > 0 and z > 1:
        out = gaussian_filter1d(out, sigma=z_corr, axis=0, mode="nearest")
    std = out.std(axis=(1, 2), keepdims=True)
    out /= np.maximum(std, 1e-6)
    return out


def _smooth_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, u: np.ndarray, n_terms: int,
                  freq: Tuple[float, float], amp: float) -> np.ndarray:
    """Sum of ``n_terms`` random low-frequency plane waves in (x, y, u): a smooth scalar field (float32).

    ``freq`` bounds the in-plane angular frequency (radians per body unit); the z frequency is half of it.
    Each term has amplitude ``amp / sqrt(n_terms)``.
    """
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape, u.shape), dtype=np.float32)
    a = amp / math.sqrt(n_terms)
    for _ in range(n_terms):
        k = rng.uniform(*freq)
        th = rng.uniform(0, 2 * math.pi)
        kz = rng.uniform(-0.5, 0.5) * k
        ph = rng.uniform(0, 2 * math.pi)
        out += a * np.sin(k * math.cos(th) * x + k * math.sin(th) * y + kz * u + ph).astype(np.float32)
    return out


def _blob(x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, ax: np.ndarray, ay: np.ndarray,
          rot: float, harmonics: Sequence[Tuple[int, float, float]] = (), want_theta: bool = False
          ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Normalised radius ``rho`` (< 1 inside) and, if asked, polar angle of a star-shaped blob.

    ``x, y`` are ``[Z, H, W]`` coordinates; ``cx, cy, ax, ay`` are per-slice ``[Z]`` centre and semi-axes
    (semi-axis 0 means the blob is absent from that slice: rho = inf there). The outline radius is modulated by
    ``1 + sum(a * cos(k * theta + phase))`` over ``harmonics``. Only slices where the blob is present are
    computed. Returns float32 ``rho [Z, H, W]`` and ``theta [Z, H, W]`` (``None`` unless ``want_theta``).
    """
    cx, cy, ax, ay = (np.broadcast_to(np.asarray(a, np.float32), (x.shape[0],)) for a in (cx, cy, ax, ay))
    idx = np.flatnonzero((ax > 1e-4) & (ay > 1e-4))
    rho = np.full(x.shape, np.inf, dtype=np.float32)
    theta = np.zeros(x.shape, dtype=np.float32) if want_theta else None
    if idx.size == 0:
        return rho, theta
    full = idx.size == x.shape[0]
    xs = x if full else x[idx]
    ys = y if full else y[idx]
    c, s = np.float32(math.cos(rot)), np.float32(math.sin(rot))
    dx = xs - cx[idx, None, None]
    dy = ys - cy[idx, None, None]
    xr = c * dx + s * dy
    yr = c * dy - s * dx
    r = np.sqrt((xr / ax[idx, None, None]) ** 2 + (yr / ay[idx, None, None]) ** 2)
    if harmonics or want_theta:
        th = np.arctan2(yr, xr)
        if harmonics:
            mod = np.ones_like(th)
            for k, a, ph in harmonics:
                mod += np.float32(a) * np.cos(np.float32(k) * th + np.float32(ph))
            r /= mod
        if want_theta:
            theta[idx] = th
    rho[idx] = r
    return rho, theta


def _profile(u: np.ndarray, lo: float, hi: float, peak: float, power: float) -> np.ndarray:
    """Cranio-caudal size profile of an organ: 0 outside ``[lo, hi]``, 1 at relative position ``peak``.

    ``u`` is the per-slice anatomical height ``[Z]``; ``power`` < 1 makes the organ blunt, > 1 pointed.
    """
    t = (u - lo) / (hi - lo)
    inside = (t > 0) & (t < 1)
    tc = np.clip(t, 1e-6, 1 - 1e-6)
    g = math.log(0.5) / math.log(peak)          # t**g reaches 1/2 at t = peak
    w = np.sin(math.pi * tc ** g) ** power
    return np.where(inside, w, 0.0).astype(np.float32)


def _jit(rng: np.random.Generator, scale: float) -> float:
    return float(rng.uniform(-scale, scale))


def _harm(rng: np.random.Generator, base: Sequence[Tuple[int, float, float]], jitter: float = 0.25
          ) -> List[Tuple[int, float, float]]:
    """Organ-specific outline harmonics with a small per-scan variation of amplitude and phase."""
    return [(k, a * (1 + _jit(rng, jitter)), ph + _jit(rng, jitter)) for k, a, ph in base]


def _organ_texture(rng: np.random.Generator, mask: np.ndarray, wavelength: float, rel_bandwidth: float
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Band-passed noise on just the slices where ``mask`` ``[Z, H, W]`` has voxels.

    Returns the slice indices ``zs`` and the noise ``[len(zs), H, W]`` (see ``_bandpass_noise``).
    """
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    return zs, _bandpass_noise(rng, (len(zs),) + mask.shape[1:], wavelength, rel_bandwidth)


def _boundary(label: np.ndarray) -> np.ndarray:
    """In-plane boundary voxels between different labels (4-neighbourhood), bool ``[Z, H, W]``."""
    b = np.zeros(label.shape, dtype=bool)
    d = label[:, 1:, :] != label[:, :-1, :]
    b[:, 1:, :] |= d
    b[:, :-1, :] |= d
    d = label[:, :, 1:] != label[:, :, :-1]
    b[:, :, 1:] |= d
    b[:, :, :-1] |= d
    return b


# ----------------------------------------------------------------------------------------------------------------
# one scan
# ----------------------------------------------------------------------------------------------------------------


def make_phantom(rng: np.random.Generator, *, size: int = 128, n_slices_range: Tuple[int, int] = (24, 40),
                 scan_id: str = "0", normalise: bool = True) -> Volume:
    """Generate one synthetic abdominal scan.

    Args:
        rng: the only source of randomness (same state -> bit-identical output).
        size: in-plane size H = W in pixels (>= 32). The field of view is ~340-420 mm whatever the size, so
            the pixel spacing scales with ``1 / size``.
        n_slices_range: inclusive range of the slice count Z; every organ lies fully inside the scan.
        scan_id: the ``Volume.id``.
        normalise: return the image z-scored per volume (the ``Volume`` contract: images are normalised, like
            a reader with ``normalise: zscore`` returns them). ``False`` gives the raw MR-like grey values
            (non-negative, arbitrary per-scan gain) that ``ensure_phantoms`` writes to disk.

    Returns:
        ``Volume`` with ``image`` float32 ``[Z, H, W]``, ``label`` int16 ``[Z, H, W]`` in {0..4} (every scan has
        all four organs), ``spacing`` (z, y, x) mm, ``affine`` the 4x4 matrix of the file layout ``(H, W, Z)``,
        ``slice_axis`` 2 and ``meta`` with ``label_names``, ``phantom_version`` and ``normalised``.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"phantom {scan_id!r}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    size = int(size)
    if size < 32:
        raise ValueError(f"phantom {scan_id!r}: size must be >= 32, got {size}")
    lo_n, hi_n = (int(v) for v in n_slices_range)
    if lo_n < 12 or hi_n < lo_n:
        raise ValueError(f"phantom {scan_id!r}: n_slices_range must satisfy 12 <= low <= high, got {n_slices_range}")

    nz = int(rng.integers(lo_n, hi_n + 1))
    shape = (nz, size, size)

    # ---- acquisition geometry --------------------------------------------------------------------------------
    fov_mm = rng.uniform(340.0, 420.0)
    dxy = fov_mm / size
    u_lo = rng.uniform(-0.10, -0.02)             # anatomical height covered: organs live in ~[0.06, 0.97]
    u_hi = rng.uniform(1.00, 1.08)
    anat_len_mm = rng.uniform(170.0, 210.0)      # physical length of u in [0, 1]
    dz = anat_len_mm * (u_hi - u_lo) / (nz - 1)
    u = np.linspace(u_lo, u_hi, nz).astype(np.float32)   # per slice, slice 0 most inferior

    # ---- pose: output pixel -> canonical body coordinates ----------------------------------------------------
    half_w = size * rng.uniform(0.37, 0.44)      # body half-width in pixels
    cxp = (size - 1) / 2 + size * _jit(rng, 0.09)
    cyp = (size - 1) / 2 + size * _jit(rng, 0.07)
    rot = math.radians(_jit(rng, 20.0))
    jj = np.arange(size, dtype=np.float32)[None, None, :]
    ii = np.arange(size, dtype=np.float32)[None, :, None]
    px = (jj - cxp) / half_w
    py = (ii - cyp) / half_w
    c, s = math.cos(rot), math.sin(rot)
    uu = u[:, None, None]
    x = (c * px + s * py) * np.ones((nz, 1, 1), np.float32)
    y = (-s * px + c * py) * np.ones((nz, 1, 1), np.float32)
    # smooth elastic deformation + a slow per-slice drift (breathing / posture)
    ex = _smooth_field(rng, x, y, uu, 4, (1.5, 3.5), 0.05)
    ey = _smooth_field(rng, x, y, uu, 4, (1.5, 3.5), 0.05)
    drift = _smooth_field(rng, np.zeros_like(u), np.zeros_like(u), u * 6.0, 2, (1.0, 1.0), 0.02)
    x = x + ex + drift[:, None, None]
    y = y + ey
    del ex, ey

    # ---- body wall -------------------------------------------------------------------------------------------
    ay_body = rng.uniform(0.66, 0.78)
    back = rng.uniform(0.85, 0.95)               # flatter back
    ay_eff = np.where(y > 0, ay_body * back, ay_body)
    body_scale = 1.0 + 0.04 * np.sin(math.pi * u)[:, None, None]
    rho_body = np.sqrt(x * x + (y / ay_eff) ** 2) / body_scale
    t_fat = rng.uniform(0.04, 0.08)
    t_musc = rng.uniform(0.035, 0.055)
    body = rho_body < 1.0
    fat = body & (rho_body >= 1.0 - t_fat)
    wall = body & (rho_body >= 1.0 - t_fat - t_musc) & ~fat
    cavity = rho_body < 1.0 - t_fat - t_musc
    del rho_body, ay_eff

    ones = np.ones(nz, np.float32)
    # spine and paraspinal muscles (posterior midline), great vessels
    y_sp = ay_body * back * (1 - t_fat - t_musc) - 0.20
    vert, _ = _blob(x, y, 0 * ones, (y_sp + 0.02) * ones, 0.11 * ones, 0.10 * ones, 0.0)
    canal, _ = _blob(x, y, 0 * ones, (y_sp + 0.16) * ones, 0.045 * ones, 0.04 * ones, 0.0)
    psl, _ = _blob(x, y, -0.16 * ones, (y_sp + 0.18) * ones, 0.12 * ones, 0.09 * ones, 0.3)
    psr, _ = _blob(x, y, 0.16 * ones, (y_sp + 0.18) * ones, 0.12 * ones, 0.09 * ones, -0.3)
    aorta, _ = _blob(x, y, (0.05 + _jit(rng, 0.02)) * ones, (y_sp - 0.14) * ones, 0.045 * ones, 0.045 * ones, 0.0)
    ivc, _ = _blob(x, y, (-0.13 + _jit(rng, 0.02)) * ones, (y_sp - 0.16) * ones, 0.06 * ones, 0.045 * ones, 0.0)
    m_vert = body & (vert < 1)
    m_canal = body & (canal < 1)
    m_para = body & ((psl < 1) | (psr < 1)) & ~m_vert & ~m_canal
    m_aorta = cavity & (aorta < 1)
    m_ivc = cavity & (ivc < 1)
    del vert, canal, psl, psr, aorta, ivc
    solid = m_vert | m_canal | m_para | m_aorta | m_ivc   # organs never overlap these
    organ_space = cavity & ~solid

    # ---- organs (canonical layout: x to patient's left = image right, y posterior = image down) -------------
    sz = rng.uniform(0.9, 1.1)                   # patient size factor for organs
    sz_liv, sz_sp, sz_k = _SCALE_LIVER * sz, _SCALE_SPLEEN * sz, _SCALE_KIDNEY * sz
    # liver: big right lobe + left lobe reaching across the midline in the upper part
    lv_lo, lv_hi = 0.36 + _jit(rng, 0.03), 0.97 + _jit(rng, 0.02)
    w_liv = _profile(u, lv_lo, lv_hi, peak=0.68, power=0.35)
    t_liv = np.clip((u - lv_lo) / (lv_hi - lv_lo), 0, 1)
    cxl = (-0.42 + _jit(rng, 0.06) - 0.04 * (1 - t_liv)) * ones
    cyl = (0.00 + _jit(rng, 0.05) + 0.30 * (1 - t_liv) ** 1.5) * ones
    rho_r, _ = _blob(x, y, cxl, cyl, 0.34 * sz_liv * w_liv, 0.38 * sz_liv * w_liv, 0.15 + _jit(rng, 0.1),
                     _harm(rng, [(2, 0.10, 0.6), (3, 0.07, 1.9), (5, 0.03, 0.2)]))
    w_left = _profile(u, lv_lo + 0.40 * (lv_hi - lv_lo), lv_hi - 0.06, peak=0.5, power=0.6)
    rho_l, _ = _blob(x, y, (-0.12 + _jit(rng, 0.04)) * ones, (-0.30 + _jit(rng, 0.03)) * ones,
                     0.30 * sz_liv * w_left, 0.14 * sz_liv * w_left, -0.35 + _jit(rng, 0.1),
                     _harm(rng, [(2, 0.08, 0.0), (3, 0.05, 1.0)]))
    m_liver = organ_space & (np.minimum(rho_r, rho_l) < 1)
    del rho_r, rho_l

    # spleen: crescent against the posterior-lateral wall on the patient's left
    sp_lo, sp_hi = 0.52 + _jit(rng, 0.03), 0.92 + _jit(rng, 0.03)
    w_sp = _profile(u, sp_lo, sp_hi, peak=0.55, power=0.5)
    scx, scy = 0.55 + _jit(rng, 0.04), 0.20 + _jit(rng, 0.04)
    rho_s, _ = _blob(x, y, scx * ones, scy * ones, 0.17 * sz_sp * w_sp, 0.27 * sz_sp * w_sp, -0.55 + _jit(rng, 0.12),
                     _harm(rng, [(2, 0.06, 0.3), (3, 0.05, 2.2)]))
    rho_s2, _ = _blob(x, y, (scx - 0.16 * _SCALE_SPLEEN) * ones, (scy - 0.03) * ones, 0.11 * sz_sp * w_sp,
                      0.22 * sz_sp * w_sp, -0.55, ())
    m_spleen = organ_space & (rho_s < 1) & (rho_s2 >= 1)
    del rho_s, rho_s2

    # kidneys: bean shapes beside the spine, right one lower; cortex, medullary pyramids, sinus fat at the hilum
    kid_masks = {}
    kid_parts = {}
    for lab, side, k_lo, k_hi in ((RKIDNEY, -1.0, 0.08, 0.60), (LKIDNEY, 1.0, 0.14, 0.64)):
        k_lo += _jit(rng, 0.03)
        k_hi += _jit(rng, 0.03)
        w_k = _profile(u, k_lo, k_hi, peak=0.5, power=_KIDNEY_PROFILE_POWER)
        kcx = side * (_KIDNEY_X + _jit(rng, 0.03))
        kcy = y_sp + 0.01 + _jit(rng, 0.03)
        krot = side * (-0.45) + _jit(rng, 0.1)
        harm = _harm(rng, [(2, 0.04, 0.0), (3, 0.03, 1.0)])
        rho_k, th_k = _blob(x, y, kcx * ones, kcy * ones, 0.11 * sz_k * w_k, 0.16 * sz_k * w_k, krot, harm,
                             want_theta=True)
        # hilum notch on the medial side
        rho_n, _ = _blob(x, y, (kcx - side * 0.10 * sz_k) * ones, kcy * ones, 0.05 * sz_k * w_k, 0.06 * sz_k * w_k,
                          krot)
        m = organ_space & (rho_k < 1) & (rho_n >= 1)
        kid_masks[lab] = m
        # medial direction (-side, 0) expressed in the blob's rotated frame
        th_med = math.atan2(-math.sin(krot) * (-side), math.cos(krot) * (-side))
        sinus = m & (rho_k < 0.55) & (np.cos(th_k - np.float32(th_med)) > np.float32(math.cos(1.3)))
        pyr = m & ~sinus & (rho_k > 0.35) & (rho_k < 0.82) & (np.cos(5.0 * th_k) > 0.0)
        kid_parts[lab] = (sinus, pyr)
        del rho_k, th_k, rho_n

    # paint: liver < spleen < kidneys (kidneys press into liver and spleen, so organs touch)
    label = np.zeros(shape, dtype=np.int16)
    label[m_liver] = LIVER
    label[m_spleen] = SPLEEN
    label[kid_masks[RKIDNEY]] = RKIDNEY
    label[kid_masks[LKIDNEY]] = LKIDNEY
    for lab in (LIVER, RKIDNEY, LKIDNEY, SPLEEN):
        if not (label == lab).any():  # pragma: no cover - ranges above always place every organ in the scan
            raise DataError(f"phantom {scan_id!r}: organ {LABEL_NAMES[lab]} vanished (generator bug)")

    # liver vessels: a few bright tubes running mostly cranio-caudally through the liver
    vessel = np.zeros(shape, dtype=bool)
    for _ in range(int(rng.integers(4, 7))):
        v0x, v0y = -0.42 + _jit(rng, 0.25), 0.02 + _jit(rng, 0.25)
        vdx, vdy = _jit(rng, 0.35), _jit(rng, 0.35)
        vr = rng.uniform(0.018, 0.035)
        vcx = v0x + vdx * (u - 0.65)
        vcy = v0y + vdy * (u - 0.65)
        vessel |= (x - vcx[:, None, None]) ** 2 + (y - vcy[:, None, None]) ** 2 < vr * vr
    vessel &= label == LIVER

    # ---- grey values --------------------------------------------------------------------------------------------
    px_per_body = half_w                         # texture scales in pixels follow the anatomy's size
    sc = px_per_body / 50.0
    img = np.zeros(shape, dtype=np.float32)
    tex_fine = _bandpass_noise(rng, shape, 3.0 * sc, 0.5)
    img[fat] = _GREY["fat"] + 0.05 * tex_fine[fat]
    tex_musc = _bandpass_noise(rng, shape, 4.0 * sc, 0.4, anisotropy=3.0, angle=rng.uniform(0, math.pi))
    m_all_musc = wall | m_para
    img[m_all_musc] = _GREY["muscle"] + 0.07 * tex_musc[m_all_musc]

    # bowel loops fill the rest of the cavity: regions of random content drawn from the organs' own range,
    # separated by bright mesenteric fat, each with its own grain
    loops = _bandpass_noise(rng, shape, 22.0 * sc, 0.5, z_corr=0.8)
    n_levels = 7
    edges = np.quantile(loops[:, ::3, ::3], np.linspace(0, 1, n_levels + 1)[1:-1]).astype(np.float32)
    region = np.digitize(loops, edges)
    centres = rng.choice(np.array([0.34, 0.38, 0.41, 0.44, 0.47, 0.50, 0.54, 0.60, 0.80]), size=n_levels,
                         replace=True) + rng.uniform(-0.03, 0.03, size=n_levels)
    tex_bowel = _bandpass_noise(rng, shape, 5.0 * sc, 0.6)
    amps = rng.uniform(0.04, 0.10, size=n_levels)
    bowel_val = centres[region] + amps[region] * tex_bowel
    # mesenteric fat at region borders (where ``loops`` crosses a quantile edge)
    padded = np.concatenate([[-np.inf], edges, [np.inf]]).astype(np.float32)
    dist_edge = np.minimum(loops - padded[region], padded[region + 1] - loops)
    bowel_val = np.where(dist_edge < 0.04, _GREY["fat"] + 0.05 * tex_fine, bowel_val)
    visc = cavity & ~solid & (label == 0)
    img[visc] = bowel_val[visc]
    del loops, region, tex_bowel, bowel_val, dist_edge, padded

    img[m_vert] = _GREY["vertebra"] + 0.08 * tex_fine[m_vert]
    img[m_canal] = _GREY["csf"]
    img[m_aorta] = _GREY["aorta"]
    img[m_ivc] = _GREY["ivc"]

    # organs: textures are generated only on the slices where the organ is
    ml = label == LIVER
    zl, tex_liver = _organ_texture(rng, ml, 3.5 * sc, 0.5)
    sub = img[zl]
    sub[ml[zl]] = _GREY["liver"] + 0.07 * tex_liver[ml[zl]]
    img[zl] = sub
    img[vessel] = _GREY["liver_vessel"] + 0.03 * tex_fine[vessel]
    ms = label == SPLEEN
    zs_, tex_spleen = _organ_texture(rng, ms, 9.0 * sc, 0.45)
    sub = img[zs_]
    sub[ms[zs_]] = _GREY["spleen"] + 0.09 * tex_spleen[ms[zs_]]
    img[zs_] = sub
    mkid = (label == RKIDNEY) | (label == LKIDNEY)
    zk, tex_kid = _organ_texture(rng, mkid, 2.5 * sc, 0.5)
    kid_val = np.zeros((len(zk),) + shape[1:], np.float32)
    for lab in (RKIDNEY, LKIDNEY):
        mk = (label == lab)[zk]
        sinus, pyr = (p[zk] & mk for p in kid_parts[lab])
        cortex = mk & ~sinus & ~pyr
        kid_val[cortex] = _GREY["cortex"] + 0.05 * tex_kid[cortex]
        kid_val[pyr] = _GREY["medulla"] + 0.05 * tex_kid[pyr]
        kid_val[sinus] = _GREY["sinus"] + 0.04 * tex_fine[zk][sinus]
    sub = img[zk]
    sub[mkid[zk]] = kid_val[mkid[zk]]
    img[zk] = sub
    del tex_fine, tex_musc, tex_liver, tex_spleen, tex_kid, kid_val, sub

    # thin dark capsule where two different tissues of the labelled organs meet (chemical-shift-like line)
    organ_edge = _boundary(label) & (label > 0)
    img[organ_edge] -= 0.06

    # partial-volume blur in-plane, smooth multiplicative bias field, global gain, Rician noise
    img = gaussian_filter(img, sigma=(0.0, 0.6 * sc, 0.6 * sc), mode="nearest")
    bias = np.exp(_smooth_field(rng, px, py * np.ones((nz, 1, 1), np.float32), uu, 5, (0.8, 2.2), 0.40))
    img *= bias
    del bias
    sigma_n = rng.uniform(0.025, 0.045)
    n1 = rng.standard_normal(shape, dtype=np.float32) * sigma_n
    n2 = rng.standard_normal(shape, dtype=np.float32) * sigma_n
    img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    gain = rng.uniform(600.0, 1400.0)
    img = (img * gain).astype(np.float32)

    # ---- file geometry: arrays stored (H, W, Z); affine = small rotation about z @ diag(spacing) + shift ------
    alpha = math.radians(_jit(rng, 4.0))
    ca, sa = math.cos(alpha), math.sin(alpha)
    rotm = np.array([[ca, -sa, 0.0], [sa, ca, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotm @ np.diag([dxy, dxy, dz])
    affine[:3, 3] = [-dxy * size / 2 + _jit(rng, 20.0), -dxy * size / 2 + _jit(rng, 20.0),
                     -dz * nz / 2 + _jit(rng, 30.0)]

    image = zscore(img) if normalise else img
    return Volume(
        id=str(scan_id),
        image=image,
        label=label,
        spacing=(float(dz), float(dxy), float(dxy)),
        affine=affine,
        slice_axis=2,
        path=None,
        meta={
            "label_names": dict(LABEL_NAMES),
            "phantom_version": PHANTOM_VERSION,
            "normalised": "zscore" if normalise else "none",
            "modality": "MR",
        },
    )


def make_phantom_dataset(n_scans: int = 20, seed: int = 0, size: int = 128, *,
                         n_slices_range: Tuple[int, int] = (24, 40), normalise: bool = True) -> List[Volume]:
    """``n_scans`` phantoms with ids ``"1".."n"``; scan ``k`` uses the k-th child of ``SeedSequence(seed)``.

    Scan ``"k"`` is therefore identical whatever ``n_scans`` is, and the whole list is bit-identical for the
    same arguments. See ``make_phantom`` for the arrays.
    """
    n_scans = int(n_scans)
    if n_scans < 1:
        raise ValueError(f"n_scans must be >= 1, got {n_scans}")
    children = np.random.SeedSequence(int(seed)).spawn(n_scans)
    return [
        make_phantom(np.random.default_rng(ss), size=size, n_slices_range=n_slices_range, scan_id=str(k + 1),
                     normalise=normalise)
        for k, ss in enumerate(children)
    ]


# ----------------------------------------------------------------------------------------------------------------
# on-disk cache
# ----------------------------------------------------------------------------------------------------------------


def phantom_cache_root(cache_dir: Optional[Path | str] = None) -> Path:
    """``cache_dir`` if given, else ``$FEWSHOT_PROTO_CACHE``, else ``~/.cache/fewshot_proto``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fewshot_proto"


def phantom_dir_name(n_scans: int = 20, seed: int = 0, size: int = 128) -> str:
    """Folder name of a phantom dataset in the cache: ``phantoms-v<version>-n<n>-s<seed>-<size>``."""
    return f"phantoms-v{PHANTOM_VERSION}-n{int(n_scans)}-s{int(seed)}-{int(size)}"


def _is_complete(folder: Path) -> bool:
    return (folder / _COMPLETE).is_file()


def ensure_phantoms(cache_dir: Optional[Path | str] = None, n_scans: int = 20, seed: int = 0, size: int = 128
                    ) -> Path:
    """Write the phantom dataset once as NIfTI in the SSL-ALPNet layout and return its folder.

    Layout: ``<root>/phantoms-v<version>-n<n>-s<seed>-<size>/`` with ``image_<id>.nii.gz`` (float32, raw
    MR-like grey values) and ``label_<id>.nii.gz`` (int16), ids ``"1".."n"``, arrays ``(H, W, Z)`` (slice axis
    2, like CHAOS-T2) with each scan's affine and zooms, plus ``phantom.json`` (version, seed, label names,
    ids) and a ``COMPLETE`` marker. ``<root>`` is ``phantom_cache_root(cache_dir)``.

    The dataset is generated in a temporary sibling folder and renamed into place, so a crash or a concurrent
    process never exposes a half-written dataset; when the folder already exists with its marker this returns
    at once without touching it. A folder without the marker (left by hand) is replaced.
    """
    import nibabel as nib

    root = phantom_cache_root(cache_dir)
    final = root / phantom_dir_name(n_scans, seed, size)
    if _is_complete(final):
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the phantom cache folder {root}: {e}") from e

    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        t0 = time.perf_counter()
        vols = make_phantom_dataset(n_scans=n_scans, seed=seed, size=size, normalise=False)
        for v in vols:
            img = nib.Nifti1Image(np.ascontiguousarray(v.image.transpose(1, 2, 0)), v.affine)
            img.header.set_xyzt_units("mm")
            nib.save(img, tmp / f"image_{v.id}.nii.gz")
            lab = nib.Nifti1Image(np.ascontiguousarray(v.label.transpose(1, 2, 0)), v.affine)
            lab.header.set_xyzt_units("mm")
            nib.save(lab, tmp / f"label_{v.id}.nii.gz")
        info = {
            "generator": "fewshot_proto.data.phantom",
            "phantom_version": PHANTOM_VERSION,
            "n_scans": int(n_scans),
            "seed": int(seed),
            "size": int(size),
            "ids": [v.id for v in vols],
            "label_names": {str(k): n for k, n in LABEL_NAMES.items()},
            "slice_axis": 2,
            "modality": "MR",
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "phantom.json").write_text(json.dumps(info, indent=1))
        (tmp / _COMPLETE).write_text("ok\n")
        os.chmod(tmp, 0o755)
        if final.exists() and not _is_complete(final):
            stale = root / f".{final.name}.stale-{os.getpid()}-{time.time_ns()}"
            try:
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, final)
        except OSError:
            if _is_complete(final):       # another process finished first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
