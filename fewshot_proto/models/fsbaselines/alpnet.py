"""ALPNet (Ouyang, Biffi, Chen, Kart, Qiu & Rueckert, "Self-supervision with Superpixels: Training Few-shot Medical
Image Segmentation without Annotation", ECCV 2020; the network of SSL-ALPNet), reimplemented on the ResNet-34
encoder shared by every model in fewshot_proto.

Adaptive local prototype pooling (SSL-ALPNet ``alpmodule.MultiProtoAsConv`` and ``grid_proto_fewshot``):

1. Features: F5 of the dilated ResNet-34 (512 @ 1/16) through a bias-free 1x1 convolution to ``proj_dim`` = 256
   channels (SSL-ALPNet reduces its ResNet-101's 2048 channels to 256 the same way; ``proj_dim=None`` skips it).
2. The support mask is brought to the feature grid (``frac[S, 1, h, w]``: the fraction of each cell's pixels that
   are foreground, by area pooling).
3. Local prototypes: features and ``frac`` are average-pooled with an ``L x L`` window (stride ``L``); every
   window whose pooled foreground fraction exceeds ``fg_thresh`` (0.95) gives a local foreground prototype, every
   window whose pooled background fraction (``1 - frac``) exceeds ``bg_thresh`` (0.95) a local background one.
4. Global prototypes: per support slice, the masked average of the features under ``frac``.
5. Foreground bag: if some ``window x window`` cell of ``frac`` reaches ``fg_thresh`` (SSL-ALPNet's gate, always
   evaluated with the training window), the local foreground prototypes plus the per-slice global ones
   (SSL-ALPNet's ``gridconv+``); otherwise the single global prototype averaged over the slices (``mask`` mode,
   i.e. PANet). Background bag: the local background prototypes only (SSL-ALPNet's ``gridconv``).
6. Score of each class: ``sum_j softmax_j(d) d_j`` with ``d_j = 20 cos(f_q, P_j)`` over the class's prototypes,
   at feature resolution, upsampled bilinearly to the input size (``heads.scores.class_score``).

Window sizes (adapted to stride 16). SSL-ALPNet works on 32x32 features (stride 8, 256 input) and pools with 4x4
windows in training and 2x2 windows at test time (``val_wsize=2``): windows of 32x32 and 16x16 *pixels*. On our
16x16 F5 the same pixel extents are ``window=2`` (training, module in ``train()`` mode) and ``eval_window=1``
(``eval()`` mode: every F5 cell is a candidate). The window follows ``self.training`` like dropout or batch
norm: no flag in ``forward``. The 8x8 grid of training windows per 256x256 slice is SSL-ALPNet's
``proto_grid_size = 8``.

Differences from SSL-ALPNet, all for robustness, none changing the method on ordinary inputs:

* the mask is area-pooled to the feature grid (SSL-ALPNet resizes it bilinearly, which at a 16x reduction only
  samples a few pixels per cell and can miss small organs), so "fraction of the window" is exact;
* a background bag with no local prototype falls back to the global background prototype (SSL-ALPNet would
  score the background 0 everywhere);
* in the ``gridconv+`` bag, global prototypes of support slices whose mask is empty are left out (they are zero
  vectors and would only pull the soft maximum towards 0);
* the prototype alignment loss applied by the engine is PANet's (global prototypes from the predicted query
  mask); SSL-ALPNet runs its own local-prototype classifier in reverse for that loss.

The SSL-ALPNet recipe has no cyclic loss and no Dice term: a faithful run sets ``train.lambda_cyc: 0`` and
``train.lambda_dice: 0`` (the model supports the engine's cyclic loss nevertheless).

    model = build_model("alpnet")
    out = model(support_img, support_mask, query_img)   # logits [Q, 2, H, W]
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch

from fewshot_proto.models.checks import check_positive_int, check_rate
from fewshot_proto.models.fsbaselines.common import PrototypeSegmenter
from fewshot_proto.models.heads.alp import alpnet_prototypes
from fewshot_proto.models.heads.scores import SCALER, ClassPrototypes

__all__ = ["ALPNet"]


class ALPNet(PrototypeSegmenter):
    """SSL-ALPNet's ALPNet on the shared ResNet-34 encoder (see the module docstring).

    Args:
        encoder: registered encoder name (``"resnet34"``).
        weights: encoder weights: ``None`` (default), ``"imagenet"`` (local torch hub cache only) or a path.
        in_channels: image channels (3: grey tiled to RGB).
        proj_dim: output channels of the 1x1 projection of F5 (256, as SSL-ALPNet), ``None`` for F5 as it is.
        scaler: cosine multiplier (20).
        window: local pooling window in F5 cells in ``train()`` mode (2 = 32 px, SSL-ALPNet's 4 x stride 8).
        eval_window: window in ``eval()`` mode (1 = 16 px, SSL-ALPNet's ``val_wsize=2`` x stride 8).
        fg_thresh: foreground window threshold (0.95).
        bg_thresh: background window threshold (0.95).

    Shapes: S support slices, Q query slices, (H, W) input (multiples of 16), D = ``proj_dim`` (or 512),
    (h, w) = (H/16, W/16). ``prototypes`` returns ``ClassPrototypes(bg[N_bg, D], fg[N_fg, D])``.
    Parameters: the encoder's 21,284,672 + ``512 * proj_dim`` (131,072 for 256).
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        weights: Union[None, str, Path] = None,
        in_channels: int = 3,
        proj_dim: Optional[int] = 256,
        scaler: float = SCALER,
        window: int = 2,
        eval_window: int = 1,
        fg_thresh: float = 0.95,
        bg_thresh: float = 0.95,
    ) -> None:
        super().__init__("ALPNet", encoder, weights, in_channels, proj_dim, scaler)
        self.window = check_positive_int("window", window, "ALPNet")
        self.eval_window = check_positive_int("eval_window", eval_window, "ALPNet")
        self.fg_thresh = check_rate("fg_thresh", fg_thresh, "ALPNet")
        self.bg_thresh = check_rate("bg_thresh", bg_thresh, "ALPNet")

    @property
    def current_window(self) -> int:
        """``window`` in ``train()`` mode, ``eval_window`` in ``eval()`` mode."""
        return self.window if self.training else self.eval_window

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> ClassPrototypes:
        """Support features (from ``encode``) and ``support_mask[S, H, W]`` -> ``ClassPrototypes`` bags."""
        feat = self._support_inputs(support_feats, support_mask)
        return alpnet_prototypes(
            feat,
            support_mask,
            window=self.current_window,
            gate_window=self.window,
            fg_thresh=self.fg_thresh,
            bg_thresh=self.bg_thresh,
        )

    def extra_repr(self) -> str:
        return (
            f"scaler={self.scaler}, feature_dim={self.feature_dim}, window={self.window}, "
            f"eval_window={self.eval_window}, fg_thresh={self.fg_thresh}, bg_thresh={self.bg_thresh}"
        )
