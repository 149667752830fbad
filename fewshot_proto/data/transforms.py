"""Slice preparation for models: resize to the input size and tile grey values to channels.

Images are resized bilinearly (``align_corners=False``, no antialiasing, as the models' training data), label
maps with exact nearest neighbour (``"nearest-exact"``: pixel centres map onto pixel centres, so a label map
resized to its own size or by an integer factor is not shifted). Non-square slices are stretched to
``size x size`` (SSL-ALPNet crops/resamples its volumes to 256x256 in-plane beforehand).

All functions take numpy arrays and return numpy arrays; torch does the interpolation (vectorised over slices).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_proto.types import Volume

__all__ = ["resize_slice", "resize_mask", "resize_stack", "resize_mask_stack", "to_channels", "prepare_slices"]


def _interp(x: np.ndarray, size: int, mode: str) -> np.ndarray:
    """Resize ``x [N, H, W]`` (float32) to ``[N, size, size]`` with torch."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[:, None]
    kw = {"align_corners": False, "antialias": False} if mode == "bilinear" else {}
    with torch.no_grad():
        out = F.interpolate(t, size=(int(size), int(size)), mode=mode, **kw)
    return out[:, 0].numpy()


def _check_size(size: int) -> int:
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size}")
    return size


def resize_stack(imgs: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[N, H, W]`` images to float32 ``[N, size, size]`` (no-op when already that size)."""
    size = _check_size(size)
    imgs = np.asarray(imgs)
    if imgs.ndim != 3:
        raise ValueError(f"resize_stack expects [N,H,W], got shape {imgs.shape}")
    if imgs.shape[1:] == (size, size):
        return imgs.astype(np.float32, copy=False)
    if imgs.shape[0] == 0:
        return np.zeros((0, size, size), np.float32)
    return _interp(imgs, size, "bilinear")


def resize_mask_stack(masks: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of ``[N, H, W]`` label maps to ``[N, size, size]``, keeping their dtype."""
    size = _check_size(size)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"resize_mask_stack expects [N,H,W], got shape {masks.shape}")
    if masks.shape[1:] == (size, size):
        return masks
    if masks.shape[0] == 0:
        return np.zeros((0, size, size), masks.dtype)
    if masks.dtype.kind in "iub" and masks.size and (int(masks.min()) < -(2 ** 24) or int(masks.max()) > 2 ** 24):
        raise ValueError("label values beyond +-2**24 cannot be resized exactly")
    return _interp(masks.astype(np.float32), size, "nearest-exact").astype(masks.dtype)


def resize_slice(img2d: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one ``[H, W]`` slice to float32 ``[size, size]`` (no-op when already that size)."""
    img2d = np.asarray(img2d)
    if img2d.ndim != 2:
        raise ValueError(f"resize_slice expects [H,W], got shape {img2d.shape}")
    return resize_stack(img2d[None], size)[0]


def resize_mask(mask2d: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of one ``[H, W]`` label map to ``[size, size]``, keeping its dtype."""
    mask2d = np.asarray(mask2d)
    if mask2d.ndim != 2:
        raise ValueError(f"resize_mask expects [H,W], got shape {mask2d.shape}")
    return resize_mask_stack(mask2d[None], size)[0]


def to_channels(img: np.ndarray, c: int = 3) -> np.ndarray:
    """Tile a grey ``[H, W]`` slice to ``[c, H, W]`` (or ``[N, H, W]`` to ``[N, c, H, W]``), float32."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        return np.ascontiguousarray(np.broadcast_to(img[None], (int(c),) + img.shape))
    if img.ndim == 3:
        return np.ascontiguousarray(np.broadcast_to(img[:, None], (img.shape[0], int(c)) + img.shape[1:]))
    raise ValueError(f"to_channels expects [H,W] or [N,H,W], got shape {img.shape}")


def prepare_slices(
    volume: Volume, zs: Sequence[int], size: int, channels: int = 3
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Slices ``zs`` of a volume ready for a model.

    Args:
        volume: a ``Volume`` (image ``[Z, H, W]`` already normalised).
        zs: slice indices (any order, repeats allowed).
        size: model input size.
        channels: grey value tiled to this many channels.

    Returns:
        ``(img [N, channels, size, size] float32, label [N, size, size] int64)``; label is ``None`` when the
        volume is unlabelled.
    """
    idx = np.asarray(list(zs), dtype=np.int64)
    z = volume.image.shape[0]
    if idx.size and (idx.min() < -z or idx.max() >= z):
        raise IndexError(f"scan {volume.id!r} has {z} slices; asked for slices {idx.tolist()}")
    img = to_channels(resize_stack(volume.image[idx], size), channels)
    if volume.label is None:
        return img, None
    lab = resize_mask_stack(volume.label[idx], size).astype(np.int64)
    return img, lab
