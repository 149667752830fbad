"""PANet (Wang, Liew, Zou, Zhou & Feng, "PANet: Few-Shot Image Semantic Segmentation with Prototype Alignment",
ICCV 2019), reimplemented on the ResNet-34 encoder shared by every model in fewshot_proto.

Method (1-way, as used for medical few-shot segmentation):

1. Support and query images go through the encoder in one batch; the features are F5 of the dilated ResNet-34
   (512 @ 1/16), used directly as PANet uses VGG conv5 features (``proj_dim`` optionally adds a bias-free 1x1
   convolution, off by default).
2. For every support slice, masked average pooling of the features *bilinearly upsampled to the mask size*
   (PANet's ``getFeatures``; computed exactly without materialising the upsampled map, see
   ``fewshot_proto.models.heads.pooling.masked_average_pool``) gives a foreground vector (under the mask) and a
   background vector (under ``1 - mask``). k-shot: the per-shot vectors are averaged (PANet's ``getPrototype``),
   so there is one foreground and one background prototype.
3. Query logits at feature resolution: ``20 * cos(f_q, P_bg)`` and ``20 * cos(f_q, P_fg)``, upsampled bilinearly to
   the input size.
4. Training adds PANet's prototype alignment regularisation (PAR); it lives in ``fewshot_proto.losses.alignment``
   and the engine applies it to the last maps of ``SegOutput.query_feats`` / ``support_feats`` (``train.lambda_align``, 1 in
   PANet). PANet has no cyclic loss and no Dice term: a faithful run sets ``train.lambda_cyc: 0`` and
   ``train.lambda_dice: 0``.

Differences from the paper: the backbone (ResNet-34 F5 at 1/16 instead of VGG-16 conv5 at 1/8) and the empty-mask
guard (an all-zero support mask gives a zero foreground prototype, i.e. a foreground logit of 0 everywhere, never
NaN; PANet's ``+1e-5`` in the denominator gives the same).

    model = build_model("panet")
    out = model(support_img, support_mask, query_img)   # logits [Q, 2, H, W]
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch

from fewshot_proto.models.fsbaselines.common import PrototypeSegmenter
from fewshot_proto.models.heads.alp import panet_prototypes
from fewshot_proto.models.heads.scores import SCALER, ClassPrototypes

__all__ = ["PANet"]


class PANet(PrototypeSegmenter):
    """PANet on the shared ResNet-34 encoder (see the module docstring).

    Args:
        encoder: registered encoder name (``"resnet34"``).
        weights: encoder weights: ``None`` (default), ``"imagenet"`` (local torch hub cache only) or a path.
        in_channels: image channels (3: grey tiled to RGB).
        proj_dim: ``None`` (default: F5 as it is, like PANet's VGG features) or the width of a 1x1 projection.
        scaler: cosine multiplier (20).

    Shapes: S support slices, Q query slices, (H, W) input (multiples of 16), D = 512 (or ``proj_dim``),
    (h, w) = (H/16, W/16). ``prototypes`` returns ``ClassPrototypes(bg[1, D], fg[1, D])``.
    Parameters: the encoder's 21,284,672 (+ ``512 * proj_dim``).
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        weights: Union[None, str, Path] = None,
        in_channels: int = 3,
        proj_dim: Optional[int] = None,
        scaler: float = SCALER,
    ) -> None:
        super().__init__("PANet", encoder, weights, in_channels, proj_dim, scaler)

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> ClassPrototypes:
        """Support features (from ``encode``) and ``support_mask[S, H, W]`` -> ``ClassPrototypes(bg[1,D], fg[1,D])``."""
        feat = self._support_inputs(support_feats, support_mask)
        return panet_prototypes(feat, support_mask)

    def extra_repr(self) -> str:
        return f"scaler={self.scaler}, feature_dim={self.feature_dim}"
