"""Prototype alignment regularisation (PANet's PAR) and the masked average pooling it is built on.

PAR (Wang et al., ICCV 2019, "PANet"): after the model has segmented the query, turn the roles around. Prototypes
are taken from the *query* features under the model's own (argmax, detached) query prediction, and they must
segment the *support* image by non-parametric cosine matching; the cross-entropy against the real support mask
is the loss. Semantics follow PANet's ``alignLoss``:

* foreground and background query prototypes are masked averages over all query slices together;
* if the predicted query foreground is empty the loss is skipped (a zero that carries no gradient);
* distances are ``cosine_similarity * scaler`` (``scaler=20``), upsampled bilinearly to the mask size;
* the cross-entropy is averaged over support pixels (every shot weighs the same).

Shape letters: Q query slices, S support slices, D feature channels, (h, w) feature size, (H, W) mask size.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_average_pool", "bilinear_adjoint", "cosine_logits", "alignment_loss", "AlignmentLoss"]


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


def cosine_logits(feat: torch.Tensor, prototypes: torch.Tensor, scaler: float = 20.0) -> torch.Tensor:
    """``scaler * cos(feat[n, :, i, j], prototypes[k])`` -> ``[N, K, h, w]``.

    ``feat`` is ``[N, D, h, w]`` and ``prototypes`` ``[K, D]``.

    A zero prototype (or feature) gives similarity 0, not NaN.
    """
    f = F.normalize(feat.float(), dim=1, eps=1e-8)
    p = F.normalize(prototypes.float(), dim=1, eps=1e-8)
    return torch.einsum("ndhw,kd->nkhw", f, p) * float(scaler)


def alignment_loss(
    query_feat: torch.Tensor,
    query_pred_logits: torch.Tensor,
    support_feat: torch.Tensor,
    support_mask: torch.Tensor,
    scaler: float = 20.0,
    *,
    eps: float = 1e-5,
) -> torch.Tensor:
    """PANet prototype alignment loss (query -> support), see the module docstring.

    Args:
        query_feat: ``[Q, D, h, w]`` query bottleneck features (gradients flow into them).
        query_pred_logits: ``[Q, 2, H, W]`` the model's query logits (background, foreground); only their argmax
            is used, detached.
        support_feat: ``[S, D, h', w']`` support bottleneck features.
        support_mask: ``[S, H', W']`` support foreground mask (values > 0.5 are foreground).
        scaler: multiplier of the cosine similarity (PANet's ``dist_scalar``).
        eps: added to mask sums in the masked average pooling.

    Returns:
        Scalar tensor. Zero (without grad) when the predicted query foreground is empty.
    """
    if query_feat.ndim != 4 or support_feat.ndim != 4:
        raise ValueError(
            f"alignment_loss: features must be [N,D,h,w]; got query {tuple(query_feat.shape)}, "
            f"support {tuple(support_feat.shape)}"
        )
    if query_pred_logits.ndim != 4 or query_pred_logits.shape[0] != query_feat.shape[0]:
        raise ValueError(
            f"alignment_loss: query_pred_logits must be [Q,K,H,W] with Q={query_feat.shape[0]}, "
            f"got {tuple(query_pred_logits.shape)}"
        )
    if support_mask.ndim != 3 or support_mask.shape[0] != support_feat.shape[0]:
        raise ValueError(
            f"alignment_loss: support_mask must be [S,H,W] with S={support_feat.shape[0]}, "
            f"got {tuple(support_mask.shape)}"
        )
    if query_feat.shape[1] != support_feat.shape[1]:
        raise ValueError(
            f"alignment_loss: query and support features differ in channels "
            f"({query_feat.shape[1]} vs {support_feat.shape[1]})"
        )
    with torch.no_grad():
        pred = query_pred_logits.detach().argmax(dim=1)  # [Q, H, W]
        fg = (pred == 1).float()
        bg = (pred == 0).float()
    if fg.sum() == 0:  # PANet skips the way when nothing was predicted as foreground
        return query_feat.new_zeros((), dtype=torch.float32)
    protos = torch.stack(
        [masked_average_pool(query_feat, bg, eps=eps), masked_average_pool(query_feat, fg, eps=eps)]
    )  # [2, D]
    logits = cosine_logits(support_feat, protos, scaler)  # [S, 2, h', w']
    logits = F.interpolate(logits, size=support_mask.shape[-2:], mode="bilinear", align_corners=False)
    target = (support_mask > 0.5).long()
    return F.cross_entropy(logits, target)


class AlignmentLoss(nn.Module):
    """Module form of ``alignment_loss`` (stores ``scaler`` and ``eps``)."""

    def __init__(self, scaler: float = 20.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.scaler = float(scaler)
        self.eps = float(eps)

    def forward(
        self,
        query_feat: torch.Tensor,
        query_pred_logits: torch.Tensor,
        support_feat: torch.Tensor,
        support_mask: torch.Tensor,
    ) -> torch.Tensor:
        return alignment_loss(query_feat, query_pred_logits, support_feat, support_mask, self.scaler, eps=self.eps)
