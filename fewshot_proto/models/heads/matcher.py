"""Residual prototype head of ``CWPAUNet``: non-parametric cosine matching added to the decoder's logits.

Why it exists (a deviation from DESIGN.md section 3, measured on phantoms v2 at 128 px): the design's model sees
the support only through ``concat(F5, P_agg * F5)`` at the bottleneck. The softmax weights of the aggregation sum
to 1 at every position, so ``P_agg`` is a mixture of foreground prototypes everywhere and nothing in the decoder
input says *how well* a position matches the support. Trained on liver, spleen and superpixel episodes, that
model learned "body" and scored 2.5% Dice on the held-out kidneys, while ALPNet, a plain cosine matcher on the same
encoder and episodes, scored 25.9%. The head gives the model ALPNet's class-agnostic matching as a starting point
and lets the decoder learn corrections to it::

    logits = decoder(concat(F5, P_agg * F5), skips) + upsample(scaler * [score_bg, score_fg])

The decoder's 1x1 classifier starts at zero, so the untrained model *is* the prototype matcher, and whatever the
decoder learns on the training classes is added on top of a score that transfers to unseen classes.

Matching features (``features``):

* ``"f5"`` (default): a bias-free 1x1 convolution of F5 (the dilated layer4, 512 channels, 1/16 of the input) to
  ``dim`` channels, as SSL-ALPNet reduces its features to 256.
* ``"hypercolumn"``: the same projection of ``concat(F3, upsample(F5))`` at 1/8 (F3 is layer2, 128 channels). At
  128 px a v2-phantom kidney is about one F5 cell, so matching at 1/8 should paint finer blobs. Measured there
  (1500 episodes of the default config, one run each), it did not help (24.3% against 27.4% for ``"f5"``) and
  cost 17% more time per episode, hence not the default.

Prototypes and scores are ALPNet's (``fsbaselines.alpnet.alpnet_prototypes`` and ``fsbaselines.common.class_scores``):
local foreground / background prototypes from ``window x window`` windows whose mask fraction exceeds 0.95
(``window`` in ``train()`` mode, ``eval_window`` in ``eval()`` mode), plus per-slice global foreground prototypes,
PANet's single masked average when no window qualifies; the class score is the soft maximum of
``scaler * cos(f_q, P_j)`` over the class's prototypes. Scores are computed in float32.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.models.checks import check_positive_int, check_positive_number, check_rate
from fewshot_proto.models.fsbaselines.alpnet import alpnet_prototypes
from fewshot_proto.models.fsbaselines.common import ClassPrototypes, class_scores

__all__ = ["PrototypeHead", "HEAD_FEATURES"]

#: valid values of ``PrototypeHead(features=...)``
HEAD_FEATURES = ("f5", "hypercolumn")


class PrototypeHead(nn.Module):
    """ALPNet-style cosine matching on projected encoder features (see the module docstring).

    Args:
        encoder_channels: the encoder's ``out_channels``, fine to coarse (``(64, 64, 128, 256, 512)``).
        features: ``"f5"`` (F5 at 1/16) or ``"hypercolumn"`` (F3 + upsampled F5 at 1/8).
        dim: channels of the matching features (output of the 1x1 projection).
        scaler: cosine multiplier (20, as PANet and SSL-ALPNet).
        window: local prototype window, in cells of the matching features, in ``train()`` mode.
        eval_window: the window in ``eval()`` mode (every cell a candidate with 1).
        thresh: mask fraction a window needs to give a local prototype (foreground and background).

    ``embed(feats) -> [B, dim, h, w]``; ``prototypes(feats_s, mask_s) -> ClassPrototypes``;
    ``forward(feats_q, prototypes, size=None) -> float32 [Q, 2, H, W]`` (background, foreground scores; at the
    matching resolution ``(h, w)`` without ``size``).
    """

    def __init__(
        self,
        encoder_channels,
        features: str = "f5",
        dim: int = 256,
        scaler: float = 20.0,
        window: int = 2,
        eval_window: int = 1,
        thresh: float = 0.95,
    ) -> None:
        super().__init__()
        if features not in HEAD_FEATURES:
            raise ValueError(f"PrototypeHead: features must be one of {HEAD_FEATURES}, got {features!r}")
        for name, value in (("dim", dim), ("window", window), ("eval_window", eval_window)):
            check_positive_int(name, value, "PrototypeHead")
        chans = [int(c) for c in encoder_channels]
        if len(chans) < 3:
            raise ValueError(f"PrototypeHead: need at least 3 encoder feature maps, got channels {chans}")
        self.features = features
        self.scaler = check_positive_number("scaler", scaler, "PrototypeHead")
        self.window = int(window)
        self.eval_window = int(eval_window)
        self.thresh = check_rate("thresh", thresh, "PrototypeHead")
        in_ch = chans[-1] + (chans[2] if features == "hypercolumn" else 0)
        self.proj = nn.Conv2d(in_ch, int(dim), kernel_size=1, bias=False)

    def embed(self, feats: List[torch.Tensor]) -> torch.Tensor:
        """Encoder pyramid (fine to coarse) -> matching features ``[B, dim, h, w]``."""
        f5 = feats[-1]
        if self.features == "f5":
            return self.proj(f5)
        f3 = feats[2]
        up = F.interpolate(f5, size=f3.shape[-2:], mode="bilinear", align_corners=False)
        return self.proj(torch.cat([f3, up], dim=1))

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> ClassPrototypes:
        """Support pyramid and ``support_mask[S, H, W]`` (soft allowed) -> background and foreground bags."""
        feat = self.embed(support_feats)
        window = self.window if self.training else self.eval_window
        window = min(window, int(feat.shape[-2]), int(feat.shape[-1]))
        return alpnet_prototypes(
            feat, support_mask, window=window, gate_window=self.window, fg_thresh=self.thresh, bg_thresh=self.thresh
        )

    def forward(self, query_feats: List[torch.Tensor], prototypes: ClassPrototypes, size=None) -> torch.Tensor:
        """Query pyramid and the support's bags -> float32 scores ``[Q, 2, *size]`` (background, foreground);
        ``size=None`` keeps the matching resolution ``(h, w)``."""
        return class_scores(self.embed(query_feats), prototypes, self.scaler, size)

    def extra_repr(self) -> str:
        return (
            f"features={self.features!r}, scaler={self.scaler}, window={self.window}, "
            f"eval_window={self.eval_window}, thresh={self.thresh}"
        )
