"""(Class-weighted) cross-entropy on segmentation logits.

Shape letters: N items (query slices), K classes, (H, W) spatial size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["weighted_cross_entropy", "WeightedCrossEntropyLoss"]

Weight = Union[None, Sequence[float], torch.Tensor]


def _as_weight(weight: Weight, k: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32, device=like.device)
    if w.ndim != 1 or w.numel() != k:
        raise ValueError(
            f"weighted_cross_entropy: weight must have one entry per class (K={k}), got shape {tuple(w.shape)}"
        )
    if bool((w < 0).any()):
        raise ValueError(f"weighted_cross_entropy: class weights must be >= 0, got {w.tolist()}")
    return w


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Weight = None,
    ignore_index: int = -100,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of raw ``logits[N, K, H, W]`` against class indices ``target[N, H, W]`` (int64).

    Args:
        logits: raw scores (softmax is applied inside).
        target: class index per pixel in ``[0, K)``, or ``ignore_index``.
        weight: optional per-class weights ``[K]``. With ``reduction="mean"`` the result is the weighted mean
            ``sum_i w[y_i] * nll_i / sum_i w[y_i]`` over non-ignored pixels (PyTorch semantics).
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (``[N, H, W]``).

    Returns:
        Scalar (or ``[N, H, W]`` for ``"none"``), computed in float32.
    """
    if logits.ndim < 2 or target.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(
            f"weighted_cross_entropy: logits [N,K,...] and target [N,...] disagree: "
            f"{tuple(logits.shape)} vs {tuple(target.shape)}"
        )
    if target.dtype != torch.long:
        raise ValueError(f"weighted_cross_entropy: target must be int64 class indices, got {target.dtype}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"weighted_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    w = _as_weight(weight, logits.shape[1], logits)
    return F.cross_entropy(logits.float(), target, weight=w, ignore_index=ignore_index, reduction=reduction)


class WeightedCrossEntropyLoss(nn.Module):
    """Module form of ``weighted_cross_entropy`` (class weights stored as a buffer)."""

    def __init__(self, weight: Weight = None, ignore_index: int = -100, reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float32))
        self.ignore_index = int(ignore_index)
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return weighted_cross_entropy(logits, target, self.weight, self.ignore_index, reduction=self.reduction)
