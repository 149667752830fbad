"""Prototype alignment regularisation (PANet's PAR), built on the models' prototype operations.

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

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.models.heads.pooling import masked_average_pool
from fewshot_proto.models.heads.scores import SCALER, cosine_logits

__all__ = ["alignment_loss", "AlignmentLoss"]


def alignment_loss(
    query_feat: torch.Tensor,
    query_pred_logits: torch.Tensor,
    support_feat: torch.Tensor,
    support_mask: torch.Tensor,
    scaler: float = SCALER,
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

    def __init__(self, scaler: float = SCALER, eps: float = 1e-5) -> None:
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
