"""PNG overlays of an episode: support + its mask, query + prediction, query + ground truth (PIL + numpy only).

One PNG holds three panels side by side::

    +--------------------+   +--------------------+   +--------------------+
    | support            |   | query + prediction |   | query + truth      |   <- LABEL_H px label band
    | (grey, mask tint)  |   | (grey, red tint)   |   | (grey, green tint) |
    +--------------------+   +--------------------+   +--------------------+
      <- W*scale ->      GAP

Size: ``(3 * W * scale + 2 * PANEL_GAP) x (H * scale + LABEL_H [+ TITLE_H when a title is given])`` with
``H, W`` the query slice size (a support slice of another size is resized to it). Images are min-max scaled to
uint8 per panel; masks are drawn as a semi-transparent tint (``alpha``) plus a solid 1-pixel contour.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fewshot_proto.config import N_PART

from .report import atomic_write_bytes

__all__ = [
    "PANEL_GAP",
    "LABEL_H",
    "TITLE_H",
    "SUPPORT_COLOR",
    "PRED_COLOR",
    "TRUTH_COLOR",
    "to_uint8",
    "mask_contour",
    "tint",
    "render_overlay",
    "save_overlay",
    "pick_slices",
    "save_volume_overlays",
]

PANEL_GAP = 4
LABEL_H = 14
TITLE_H = 16
SUPPORT_COLOR: Tuple[int, int, int] = (255, 210, 0)
PRED_COLOR: Tuple[int, int, int] = (255, 40, 40)
TRUTH_COLOR: Tuple[int, int, int] = (40, 220, 40)
_BG = (0, 0, 0)
_TEXT = (255, 255, 255)


def _plane(img: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim == 3:  # [C, H, W]: grey tiled to channels (or already one channel)
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D slice [H,W] or [C,H,W]; got shape {np.shape(img)}")
    return a


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Min-max scale a 2-D slice (or ``[C,H,W]``: first channel) to uint8 ``[H, W]``; constant -> zeros."""
    a = _plane(img, "image").astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(finite, a, lo)
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _mask(m: Optional[np.ndarray], shape: Tuple[int, int], name: str) -> Optional[np.ndarray]:
    if m is None:
        return None
    a = _plane(m, name)
    if a.shape != shape:
        raise ValueError(f"{name}: mask shape {a.shape} != image shape {shape}")
    if np.issubdtype(a.dtype, np.floating):
        return a >= 0.5
    return a != 0


def mask_contour(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a 2-D bool mask (pixels with a 4-neighbour outside the mask or the image)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def tint(
    grey: np.ndarray,
    mask: Optional[np.ndarray],
    color: Tuple[int, int, int],
    *,
    alpha: float = 0.4,
    contour: bool = True,
) -> np.ndarray:
    """RGB uint8 ``[H, W, 3]`` of a uint8 grey slice with ``mask`` blended in ``color`` (``alpha``) and its
    contour drawn solid."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    rgb = np.repeat(np.asarray(grey, dtype=np.uint8)[..., None], 3, axis=2)
    if mask is None or not mask.any():
        return rgb
    col = np.asarray(color, dtype=np.float64)
    out = rgb.astype(np.float64)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * col
    if contour:
        out[mask_contour(mask)] = col
    return np.round(out).astype(np.uint8)


def _font():
    return ImageFont.load_default()


def render_overlay(
    support_img2d: np.ndarray,
    support_mask2d: Optional[np.ndarray],
    query_img2d: np.ndarray,
    pred2d: Optional[np.ndarray],
    truth2d: Optional[np.ndarray],
    title: Optional[str] = None,
    *,
    scale: int = 1,
    alpha: float = 0.4,
    labels: Sequence[str] = ("support", "query + prediction", "query + truth"),
):
    """The three-panel overlay as a ``PIL.Image`` (RGB); see the module docstring for the layout.

    Args:
        support_img2d: ``[Hs, Ws]`` (or ``[C, Hs, Ws]``) support slice.
        support_mask2d: ``[Hs, Ws]`` support mask (bool / int / float thresholded at 0.5) or ``None``.
        query_img2d: ``[H, W]`` (or ``[C, H, W]``) query slice.
        pred2d, truth2d: ``[H, W]`` masks or ``None`` (panel drawn without tint).
        title: optional text band on top.
        scale: integer nearest-neighbour upscaling of every panel.
    """
    if int(scale) < 1:
        raise ValueError(f"scale must be a positive integer; got {scale}")
    scale = int(scale)
    q = to_uint8(query_img2d)
    s = to_uint8(support_img2d)
    h, w = q.shape
    panels = [
        tint(s, _mask(support_mask2d, s.shape, "support mask"), SUPPORT_COLOR, alpha=alpha),
        tint(q, _mask(pred2d, q.shape, "prediction"), PRED_COLOR, alpha=alpha),
        tint(q, _mask(truth2d, q.shape, "truth"), TRUTH_COLOR, alpha=alpha),
    ]
    pw, ph = w * scale, h * scale
    top = (TITLE_H if title else 0) + LABEL_H
    canvas = Image.new("RGB", (3 * pw + 2 * PANEL_GAP, top + ph), _BG)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    if title:
        draw.text((2, 2), str(title), fill=_TEXT, font=font)
    for i, (rgb, label) in enumerate(zip(panels, labels)):
        im = Image.fromarray(rgb)
        if im.size != (pw, ph):
            im = im.resize((pw, ph), Image.NEAREST)
        x0 = i * (pw + PANEL_GAP)
        canvas.paste(im, (x0, top))
        draw.text((x0 + 2, top - LABEL_H + 1), str(label), fill=_TEXT, font=font)
    return canvas


def save_overlay(
    path: Union[str, Path],
    support_img2d: np.ndarray,
    support_mask2d: Optional[np.ndarray],
    query_img2d: np.ndarray,
    pred2d: Optional[np.ndarray],
    truth2d: Optional[np.ndarray],
    title: Optional[str] = None,
    *,
    scale: int = 1,
    alpha: float = 0.4,
) -> Path:
    """Write the three-panel overlay PNG to ``path`` (parent directories created; atomic replace)."""
    img = render_overlay(
        support_img2d, support_mask2d, query_img2d, pred2d, truth2d, title, scale=scale, alpha=alpha
    )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def _z_range(m: np.ndarray) -> Optional[Tuple[int, int]]:
    nz = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
    return (int(nz[0]), int(nz[-1])) if nz.size else None


def pick_slices(
    truth: Optional[np.ndarray],
    pred: Optional[np.ndarray] = None,
    *,
    n_part: int = N_PART,
    max_slices: int = 4,
) -> List[int]:
    """Representative slice indices of a ``[Z, H, W]`` case, sorted.

    The slice with the largest ground-truth area comes first in priority, then the centres of ``n_part``
    equal chunks of the ground-truth z-range (the ``alpnet`` chunks). Falls back to the prediction when the
    truth is empty (or ``None``), and to the middle slice when both are empty. At most ``max_slices``.
    """
    ref = None
    for m in (truth, pred):
        if m is not None and np.asarray(m).any():
            ref = np.asarray(m) != 0
            break
    if ref is None:
        base = truth if truth is not None else pred
        if base is None:
            raise ValueError("pick_slices needs a truth or a prediction volume")
        return [int(np.shape(base)[0]) // 2]
    if ref.ndim != 3:
        raise ValueError(f"pick_slices expects [Z,H,W] volumes; got shape {ref.shape}")
    area = ref.reshape(ref.shape[0], -1).sum(axis=1)
    picks = [int(np.argmax(area))]
    z0, z1 = _z_range(ref)  # type: ignore[misc]
    edges = np.linspace(z0, z1 + 1, max(int(n_part), 1) + 1)
    for a, b in zip(edges[:-1], edges[1:]):
        c = int(np.clip(np.floor((a + b - 1) / 2.0), z0, z1))
        if c not in picks:
            picks.append(c)
    return sorted(picks[: max(int(max_slices), 1)])


def _support_for(z: int, n_support: int, zrange: Optional[Tuple[int, int]]) -> int:
    if n_support <= 1 or zrange is None:
        return 0
    z0, z1 = zrange
    k = int(np.floor((z - z0) * n_support / (z1 - z0 + 1)))
    return int(np.clip(k, 0, n_support - 1))


def save_volume_overlays(
    out_dir: Union[str, Path],
    query_vol: np.ndarray,
    pred_vol: np.ndarray,
    truth_vol: Optional[np.ndarray],
    support_imgs: np.ndarray,
    support_masks: np.ndarray,
    *,
    zs: Optional[Sequence[int]] = None,
    support_index: Union[None, Sequence[int], Callable[[int], int]] = None,
    n_part: int = N_PART,
    max_slices: int = 4,
    prefix: str = "",
    title: Optional[str] = None,
    scale: int = 1,
    alpha: float = 0.4,
) -> List[Path]:
    """Write overlays for a few representative query slices of one (scan, class).

    Args:
        query_vol: ``[Z, H, W]`` (or ``[Z, C, H, W]``) query images.
        pred_vol: ``[Z, H, W]`` binary prediction.
        truth_vol: ``[Z, H, W]`` binary truth or ``None``.
        support_imgs: ``[S, H', W']`` (or ``[S, C, H', W']``) support slices; ``support_masks`` ``[S, H', W']``.
        zs: slices to draw (default ``pick_slices(truth_vol, pred_vol, n_part=n_part, max_slices=max_slices)``).
        support_index: which support slice goes with query slice ``z``: a sequence indexed by ``z`` or a
            callable; default: the ``alpnet`` rule, chunk ``k`` of ``S`` equal chunks of the truth z-range
            (prediction z-range without truth) uses support slice ``k``.
        prefix: file name prefix; files are ``{prefix}z{z:03d}.png``.

    Returns:
        The written paths, in ``zs`` order.
    """
    q = np.asarray(query_vol)
    p = np.asarray(pred_vol)
    if p.shape[0] != q.shape[0] or (truth_vol is not None and np.shape(truth_vol)[0] != q.shape[0]):
        raise ValueError(
            f"query {q.shape}, prediction {p.shape} and truth {None if truth_vol is None else np.shape(truth_vol)}"
            f" must have the same number of slices"
        )
    si, sm = np.asarray(support_imgs), np.asarray(support_masks)
    if si.shape[0] != sm.shape[0] or si.shape[0] == 0:
        raise ValueError(f"support images {si.shape} and masks {sm.shape} must hold the same S >= 1 slices")
    if zs is None:
        zs = pick_slices(truth_vol, p, n_part=n_part, max_slices=max_slices)
    ref = truth_vol if truth_vol is not None and np.asarray(truth_vol).any() else p
    zr = _z_range(np.asarray(ref) != 0) if np.asarray(ref).any() else None
    out: List[Path] = []
    for z in zs:
        z = int(z)
        if not 0 <= z < q.shape[0]:
            raise ValueError(f"slice {z} out of range for a query volume of {q.shape[0]} slices")
        if support_index is None:
            k = _support_for(z, si.shape[0], zr)
        elif callable(support_index):
            k = int(support_index(z))
        else:
            k = int(support_index[z])
        if not 0 <= k < si.shape[0]:
            raise ValueError(f"support index {k} for query slice {z} out of range (S={si.shape[0]})")
        t = None if truth_vol is None else np.asarray(truth_vol)[z]
        text = f"{title} z={z} support={k}" if title else f"z={z} support={k}"
        out.append(
            save_overlay(
                Path(out_dir) / f"{prefix}z{z:03d}.png", si[k], sm[k], q[z], p[z], t, text, scale=scale, alpha=alpha
            )
        )
    return out
