"""The matcher head of ``cwpa_unet_matcher``: ALPNet-style cosine matching whose scores are added to the logits of the
CWPA U-Net decoder.

DESIGN.md section 3's model (``cwpa_unet``) sees the support only through ``concat(F5, P_agg * F5)`` at the
bottleneck. The softmax weights of the aggregation sum to 1 at every position, so ``P_agg`` is a mixture of
foreground prototypes everywhere and nothing in the decoder input says *how well* a position matches the support.
The matcher head gives the model a class-agnostic matching score as a starting point, and the decoder learns
corrections to it::

    logits = decoder(concat(F5, P_agg * F5), skips) + upsample(scaler * [score_bg, score_fg])

The decoder's 1x1 classifier starts at zero, so the untrained ``cwpa_unet_matcher`` *is* this matcher. How much of
the trained model's prediction is the matcher's is measured in the README ("Current results").

Matching features: a bias-free 1x1 convolution of F5 (the dilated layer4, 512 channels, 1/16 of the input) to
``dim`` channels, as SSL-ALPNet reduces its features to 256. Prototypes and scores are ALPNet's
(``heads.alp.alpnet_prototypes`` and ``heads.scores.class_scores``): local foreground / background prototypes from
``window x window`` windows whose mask fraction exceeds ``thresh`` (``window`` in ``train()`` mode,
``eval_window`` in ``eval()`` mode), plus per-slice global foreground prototypes, PANet's single masked average
when no window qualifies; the class score is the soft maximum of ``scaler * cos(f_q, P_j)`` over the class's
prototypes. Scores are computed in float32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from fewshot_proto.models.checks import check_positive_int, check_positive_number, check_rate
from fewshot_proto.models.heads.alp import alpnet_prototypes
from fewshot_proto.models.heads.scores import SCALER, ClassPrototypes, class_scores

__all__ = ["MatcherHead"]


class MatcherHead(nn.Module):
    """ALPNet-style cosine matching on projected F5 features (see the module docstring).

    Args:
        in_channels: channels of F5 (the encoder's last ``out_channels``, 512 for ResNet-34).
        dim: channels of the matching features (output of the 1x1 projection).
        scaler: cosine multiplier.
        window: local prototype window, in cells of the matching features, in ``train()`` mode.
        eval_window: the window in ``eval()`` mode (every cell a candidate with 1).
        thresh: mask fraction a window needs to give a local prototype (foreground and background).

    ``embed(feats) -> [B, dim, h, w]``; ``prototypes(feats_s, mask_s) -> ClassPrototypes``;
    ``forward(feats_q, prototypes, size=None) -> float32 [Q, 2, H, W]`` (background, foreground scores; at the
    matching resolution ``(h, w)`` without ``size``).
    """

    def __init__(self, in_channels: int, dim: int = 256, scaler: float = SCALER, window: int = 2,
                 eval_window: int = 1, thresh: float = 0.95) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("dim", dim), ("window", window),
                            ("eval_window", eval_window)):
            check_positive_int(name, value, "MatcherHead")
        self.scaler = check_positive_number("scaler", scaler, "MatcherHead")
        self.window = int(window)
        self.eval_window = int(eval_window)
        self.thresh = check_rate("thresh", thresh, "MatcherHead")
        self.proj = nn.Conv2d(int(in_channels), int(dim), kernel_size=1, bias=False)

    def embed(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Encoder pyramid (fine to coarse) -> matching features ``[B, dim, h, w]`` (from F5, the last map)."""
        return self.proj(feats[-1])

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> ClassPrototypes:
        """Support pyramid and ``support_mask[S, H, W]`` (soft allowed) -> background and foreground bags."""
        feat = self.embed(support_feats)
        window = self.window if self.training else self.eval_window
        window = min(window, int(feat.shape[-2]), int(feat.shape[-1]))
        return alpnet_prototypes(
            feat, support_mask, window=window, gate_window=self.window, fg_thresh=self.thresh, bg_thresh=self.thresh
        )

    def forward(self, query_feats: List[torch.Tensor], prototypes: ClassPrototypes,
                size: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Query pyramid and the support's bags -> float32 scores ``[Q, 2, *size]`` (background, foreground);
        ``size=None`` keeps the matching resolution ``(h, w)``."""
        return class_scores(self.embed(query_feats), prototypes, self.scaler, size)

    def extra_repr(self) -> str:
        return f"scaler={self.scaler}, window={self.window}, eval_window={self.eval_window}, thresh={self.thresh}"
