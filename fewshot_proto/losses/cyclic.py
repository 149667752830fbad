"""Cyclic consistency: support -> query -> support (DESIGN.md section 3).

The model has segmented the query from the support. Run it backwards: the query image with its predicted *soft*
foreground probability becomes the support, the support image becomes the query; the reconstructed support
prediction must match the real support mask. The model is used through its ``FewShotSegmenter`` steps
(``encode``, ``prototypes``, ``segment``; ``fewshot_proto.models.base``); already computed encoder features are
reused when given (no second encoder pass).

Shape letters: S support slices, Q query slices, K = 2 classes, (H, W) input size.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

from fewshot_proto.losses.ce import weighted_cross_entropy
from fewshot_proto.losses.dice import dice_loss
from fewshot_proto.models.base import FewShotSegmenter

__all__ = ["cyclic_consistency_loss", "CyclicConsistencyLoss"]


def cyclic_consistency_loss(
    model: FewShotSegmenter,
    support_img: torch.Tensor,
    support_mask: torch.Tensor,
    query_img: torch.Tensor,
    query_logits: torch.Tensor,
    *,
    query_feats: Optional[List[torch.Tensor]] = None,
    support_feats: Optional[List[torch.Tensor]] = None,
    dice_weight: float = 0.0,
    detach_query_mask: bool = False,
) -> torch.Tensor:
    """CE (plus optionally Dice) of the support reconstructed from the query's own prediction.

    Args:
        model: a ``FewShotSegmenter`` whose ``feature_losses`` is true.
        support_img: ``[S, C, H, W]`` (only encoded when ``support_feats`` is None).
        support_mask: ``[S, H, W]`` real support mask (> 0.5 is foreground).
        query_img: ``[Q, C, H, W]`` (only encoded when ``query_feats`` is None).
        query_logits: ``[Q, 2, H, W]`` the forward prediction; its softmax foreground probability ``[Q, H, W]``
            is the reversed support mask.
        query_feats: the query's encoder pyramid from the forward pass (``SegOutput.query_feats``).
        support_feats: the support's encoder pyramid (``SegOutput.support_feats``).
        dice_weight: adds ``dice_weight * dice_loss`` (foreground channel) to the CE.
        detach_query_mask: stop gradients through the soft query mask (by default they flow into the forward
            prediction, through the masked-average fallback of the prototype bag).

    Returns:
        Scalar float32 tensor.
    """
    if query_logits.ndim != 4 or query_logits.shape[1] < 2:
        raise ValueError(f"cyclic_consistency_loss: query_logits must be [Q,K>=2,H,W], got {tuple(query_logits.shape)}")
    if support_mask.ndim != 3:
        raise ValueError(f"cyclic_consistency_loss: support_mask must be [S,H,W], got {tuple(support_mask.shape)}")
    if query_feats is None and support_feats is None:
        s = support_img.shape[0]
        feats = model.encode(torch.cat([support_img, query_img], dim=0))
        support_feats, query_feats = [f[:s] for f in feats], [f[s:] for f in feats]
    else:
        if query_feats is None:
            query_feats = model.encode(query_img)
        if support_feats is None:
            support_feats = model.encode(support_img)
    soft = torch.softmax(query_logits.float(), dim=1)[:, 1]  # [Q, H, W]
    if detach_query_mask:
        soft = soft.detach()
    protos = model.prototypes(query_feats, soft)
    rec = model.segment(support_feats, protos)  # [S, K, H, W]
    if rec.shape[-2:] != support_mask.shape[-2:] or rec.shape[0] != support_mask.shape[0]:
        raise ValueError(
            f"cyclic_consistency_loss: reconstructed support logits {tuple(rec.shape)} do not match "
            f"support_mask {tuple(support_mask.shape)}"
        )
    target = (support_mask > 0.5).long()
    loss = weighted_cross_entropy(rec, target)
    if dice_weight:
        loss = loss + float(dice_weight) * dice_loss(rec, target, softmax=True, include_background=False)
    return loss


class CyclicConsistencyLoss(nn.Module):
    """Module form of ``cyclic_consistency_loss`` (stores ``dice_weight`` and ``detach_query_mask``)."""

    def __init__(self, dice_weight: float = 0.0, detach_query_mask: bool = False) -> None:
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.detach_query_mask = bool(detach_query_mask)

    def forward(
        self,
        model: FewShotSegmenter,
        support_img: torch.Tensor,
        support_mask: torch.Tensor,
        query_img: torch.Tensor,
        query_logits: torch.Tensor,
        *,
        query_feats: Optional[List[torch.Tensor]] = None,
        support_feats: Optional[List[torch.Tensor]] = None,
    ) -> torch.Tensor:
        return cyclic_consistency_loss(
            model,
            support_img,
            support_mask,
            query_img,
            query_logits,
            query_feats=query_feats,
            support_feats=support_feats,
            dice_weight=self.dice_weight,
            detach_query_mask=self.detach_query_mask,
        )
