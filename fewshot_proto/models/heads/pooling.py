"""Masked average pooling of features bilinearly upsampled to the mask's size (PANet's ``getFeatures``), computed
without materialising the upsampled map, and the adjoint of bilinear upsampling it is built on.

Shape letters: N items (slices), D feature channels, (h, w) feature size, (H, W) mask size.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["bilinear_adjoint", "masked_average_pool"]


def _interp_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """``R[n_in, n_out]`` with ``linear_upsample(f)[y] = sum_i f[i] R[i, y]`` (``align_corners=False``)."""
    eye = torch.eye(n_in, device=device, dtype=torch.float32).unsqueeze(0)  # [1, n_in(C), n_in(L)]
    if n_in == n_out:
        return eye[0]
    return F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[0]


def bilinear_adjoint(mask: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Adjoint of bilinear upsampling from ``size`` to the mask's size, applied to ``mask``.

    For any ``feat[N, D, h, w]``:
    ``sum_{y,x} upsample_bilinear(feat, (H, W))[n, :, y, x] * mask[n, y, x] == sum_{i,j} feat[n, :, i, j] * A[n, i, j]``
    with ``A = bilinear_adjoint(mask, (h, w))``. This gives PANet's "upsample features, then pool under the mask"
    without materialising ``[N, D, H, W]`` (512x256x256 floats per slice).

    Args:
        mask: ``[N, H, W]`` (float, soft values allowed).
        size: ``(h, w)`` of the feature map.

    Returns:
        float32 ``[N, h, w]``.
    """
    h, w = int(size[0]), int(size[1])
    H, W = int(mask.shape[-2]), int(mask.shape[-1])
    r_h = _interp_matrix(h, H, mask.device)  # [h, H]
    r_w = _interp_matrix(w, W, mask.device)  # [w, W]
    return torch.einsum("iy,nyx,jx->nij", r_h, mask.float(), r_w)


def masked_average_pool(
    feat: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-5, pool_batch: bool = True
) -> torch.Tensor:
    """Masked average of ``feat`` bilinearly upsampled to the mask's resolution (PANet's ``getFeatures``).

    ``sum(upsample(feat) * mask) / (sum(mask) + eps)``, computed exactly but cheaply through
    ``bilinear_adjoint``. An all-zero mask gives a zero vector (never NaN).

    Args:
        feat: ``[N, D, h, w]``.
        mask: ``[N, H, W]`` weights (binary or soft).
        eps: added to the mask sum.
        pool_batch: ``True`` -> one vector ``[D]`` pooled over all N items; ``False`` -> ``[N, D]``.

    Returns:
        ``[D]`` or ``[N, D]`` in ``feat``'s dtype.
    """
    if feat.ndim != 4 or mask.ndim != 3 or feat.shape[0] != mask.shape[0]:
        raise ValueError(
            f"masked_average_pool: expected feat [N,D,h,w] and mask [N,H,W] with the same N, "
            f"got {tuple(feat.shape)} and {tuple(mask.shape)}"
        )
    weights = bilinear_adjoint(mask, feat.shape[-2:])  # [N, h, w] float32
    mask_sum = mask.float().sum(dim=(-2, -1))  # [N]
    if pool_batch:
        num = torch.einsum("ndij,nij->d", feat, weights.to(feat.dtype))
        return num / (mask_sum.sum() + eps).to(num.dtype)
    num = torch.einsum("ndij,nij->nd", feat, weights.to(feat.dtype))
    return num / (mask_sum + eps).to(num.dtype)[:, None]
