"""Soft Dice loss and Dice + BCE (MONAI-style: the semantics are explicit in the signature).

Dice is computed per item and per channel over the spatial dimensions,
``1 - (2 * sum(p * g) + smooth_nr) / (sum(p) + sum(g) + smooth_dr)``, then reduced. With the default smoothing an
empty prediction on an empty ground truth scores loss 0.

Shape letters: N items, K channels, (H, W) spatial size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["dice_loss", "dice_bce_loss", "DiceLoss", "DiceBCELoss"]


def _reduce(x: torch.Tensor, reduction: str, who: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"{who}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    softmax: bool = True,
    sigmoid: bool = False,
    include_background: bool = False,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
    reduction: str = "mean",
) -> torch.Tensor:
    """Soft Dice loss.

    Args:
        logits: ``[N, K, H, W]`` scores. Activation: ``softmax`` over K (default), ``sigmoid`` per channel, or
            neither (``softmax=False, sigmoid=False``: ``logits`` are already probabilities).
        target: class indices ``[N, H, W]`` (one-hot encoded to K channels; for K = 1 the indices are the 0/1
            foreground mask) or a same-shape ``[N, K, H, W]`` (one-hot or soft) target.
        softmax: apply softmax over channels (needs K >= 2).
        sigmoid: apply a sigmoid (mutually exclusive with ``softmax``).
        include_background: keep channel 0. Ignored when K = 1 (the single channel is the foreground).
        smooth_nr: added to the numerator.
        smooth_dr: added to the denominator.
        reduction: ``"mean"``/``"sum"`` over items and channels, or ``"none"`` -> ``[N, K']`` (K' = channels kept).

    Raises:
        ValueError: shape mismatch, both activations, softmax with one channel, or an unknown reduction.
    """
    if softmax and sigmoid:
        raise ValueError("dice_loss: softmax and sigmoid are mutually exclusive")
    if logits.ndim < 3:
        raise ValueError(f"dice_loss: logits must be [N,K,...], got shape {tuple(logits.shape)}")
    n, k = logits.shape[0], logits.shape[1]
    if softmax and k == 1:
        raise ValueError("dice_loss: softmax over a single channel is constant; use sigmoid=True for K=1")
    if target.shape == logits.shape:
        onehot = target.float()
    elif target.shape == (n,) + tuple(logits.shape[2:]):
        if k == 1:
            onehot = target.float().unsqueeze(1)
        else:
            t = target.long()
            if bool((t < 0).any()) or bool((t >= k).any()):
                raise ValueError(
                    f"dice_loss: target class indices must be in [0, {k}), got min {int(t.min())} max {int(t.max())}"
                )
            onehot = F.one_hot(t, k).movedim(-1, 1).float()
    else:
        raise ValueError(
            f"dice_loss: target shape {tuple(target.shape)} matches neither logits {tuple(logits.shape)} "
            f"nor [N, spatial...] = {(n,) + tuple(logits.shape[2:])}"
        )
    probs = logits.float()
    if softmax:
        probs = torch.softmax(probs, dim=1)
    elif sigmoid:
        probs = torch.sigmoid(probs)
    if not include_background and k > 1:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.ndim))
    inter = (probs * onehot).sum(dim=dims)
    denom = probs.sum(dim=dims) + onehot.sum(dim=dims)
    loss = 1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)  # [N, K']
    return _reduce(loss, reduction, "dice_loss")


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    dice_weight: float = 0.8,
    bce_weight: float = 0.2,
    pos_weight: Union[None, float, torch.Tensor] = None,
    smooth_nr: float = 1e-5,
    smooth_dr: float = 1e-5,
) -> torch.Tensor:
    """``dice_weight * Dice(sigmoid) + bce_weight * BCE-with-logits`` for binary segmentation.

    Args:
        logits: ``[N, 1, H, W]`` or ``[N, H, W]`` foreground scores.
        target: 0/1 (or soft) foreground, ``[N, H, W]`` or ``[N, 1, H, W]``.
        dice_weight: weight of the soft Dice term (mean over items).
        bce_weight: weight of the binary cross-entropy (mean over pixels).
        pos_weight: BCE weight of positive pixels (e.g. background/foreground ratio), ``None`` for 1.

    Returns:
        Scalar float32 tensor.
    """
    x = logits.unsqueeze(1) if logits.ndim == 3 else logits
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"dice_bce_loss: logits must be [N,1,H,W] or [N,H,W], got {tuple(logits.shape)}")
    t = target.unsqueeze(1) if target.ndim == 3 else target
    if t.shape != x.shape:
        raise ValueError(
            f"dice_bce_loss: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
        )
    t = t.float()
    x = x.float()
    pw: Optional[torch.Tensor] = None
    if pos_weight is not None:
        pw = torch.as_tensor(pos_weight, dtype=torch.float32, device=x.device).reshape(-1)
    bce = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw)
    dice = dice_loss(x, t, softmax=False, sigmoid=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr)
    return dice_weight * dice + bce_weight * bce


class DiceLoss(nn.Module):
    """Module form of ``dice_loss`` (stores its keyword options)."""

    def __init__(
        self,
        *,
        softmax: bool = True,
        sigmoid: bool = False,
        include_background: bool = False,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.kwargs = dict(
            softmax=softmax,
            sigmoid=sigmoid,
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            reduction=reduction,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target, **self.kwargs)


class DiceBCELoss(nn.Module):
    """Module form of ``dice_bce_loss``."""

    def __init__(
        self,
        *,
        dice_weight: float = 0.8,
        bce_weight: float = 0.2,
        pos_weight: Union[None, float, Sequence[float]] = None,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self.register_buffer(
            "pos_weight", None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
        )
        self.smooth_nr = float(smooth_nr)
        self.smooth_dr = float(smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_bce_loss(
            logits,
            target,
            dice_weight=self.dice_weight,
            bce_weight=self.bce_weight,
            pos_weight=self.pos_weight,
            smooth_nr=self.smooth_nr,
            smooth_dr=self.smooth_dr,
        )
