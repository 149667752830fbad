"""The CWPA U-Nets: ResNet-34 encoder + correlation-weighted prototype aggregation at the bottleneck + U-Net decoder.

Two registered models, so that a name says what a model is:

* ``cwpa_unet`` (:class:`CWPAUNet`): DESIGN.md section 3's model exactly. The support reaches the prediction only
  through the CWPA-enhanced bottleneck ``concat(F5, P_agg * F5)`` that the U-Net decoder turns into logits.
* ``cwpa_unet_matcher`` (:class:`CWPAUNetMatcher`): the same network plus a matcher head
  (``heads.matcher.MatcherHead``: ALPNet-style cosine matching of projected F5 features) whose scores are added to
  the decoder's logits. The decoder's 1x1 classifier starts at zero, so the untrained model is the matcher and the
  decoder learns corrections to it. The README's "Current results" say how the two compare and which one the
  default run trains.

    model = build_model("cwpa_unet_matcher")                # random init; weights="imagenet" reads the hub cache
    out = model(support_img, support_mask, query_img)      # [S,3,H,W], [S,H,W], [Q,3,H,W]
    out.logits                                              # [Q, 2, H, W] (background, foreground)

Evaluation reuses the support side across many queries (``models.base`` contract)::

    protos = model.prototypes(model.encode(support_img), support_mask)   # once per support
    logits = model.segment(model.encode(query_img), protos)

Shapes: S support slices, Q query slices, (H, W) input size (a multiple of ``encoder.input_multiple``, 16),
D = 512, (h, w) = (H/16, W/16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.models.base import FewShotSegmenter
from fewshot_proto.models.decoders.unet import UNetDecoder
from fewshot_proto.models.encoders.base import build_encoder
from fewshot_proto.models.heads.cwpa import CWPA
from fewshot_proto.models.heads.matcher import MatcherHead
from fewshot_proto.models.heads.scores import SCALER, ClassPrototypes

__all__ = ["CWPAUNet", "CWPAUNetMatcher", "MatcherPrototypes"]


class CWPAUNet(FewShotSegmenter):
    """ResNet-34 (dilated layer4) + correlation-weighted prototype aggregation + U-Net decoder (DESIGN.md section 3).

    Args:
        encoder: registered encoder name (``"resnet34"``); its last two maps must share a resolution.
        weights: encoder weights: ``None`` (default), ``"imagenet"`` (local torch hub cache only) or a path.
        tau: threshold on the pooled support mask for local prototypes.
        temperature: softmax temperature of the aggregation.
        num_classes: K output channels (2: background, foreground).
        use_background: also use background local prototypes.
        in_channels: image channels (3: grey tiled to RGB).
        bag: ``"local"`` (DESIGN.md section 3: the support's F5 cells above ``tau``) or ``"masked_average"`` (one
            masked-average prototype, PANet's; an ablation of the local prototypes).

    ``prototypes`` returns the CWPA bag ``[N_pro, D]`` of local foreground prototypes (F5 vectors).
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        weights: Union[None, str, Path] = None,
        tau: float = 0.5,
        temperature: float = 0.1,
        num_classes: int = 2,
        use_background: bool = False,
        in_channels: int = 3,
        bag: str = "local",
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(encoder, in_channels=in_channels, weights=weights, dilate_last=True)
        red = self.encoder.reductions
        if len(red) < 2 or red[-1] != red[-2]:
            raise ValueError(
                f"{type(self).__name__}: encoder {encoder!r} must return its last two feature maps at the same "
                f"resolution (reductions {red})"
            )
        self.cwpa = CWPA(tau=tau, temperature=temperature, use_background=use_background, bag=bag)
        d = self.encoder.out_channels[-1]
        self.decoder = UNetDecoder(self.encoder.out_channels, in_channels=2 * d, num_classes=num_classes)

    @property
    def input_multiple(self) -> int:
        return self.encoder.input_multiple

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x[B, C, H, W]`` -> encoder features fine to coarse ``[F1, ..., F5]`` (``ValueError`` on a bad size)."""
        self.encoder.check_input_shape(x)
        return self.encoder(x)

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> torch.Tensor:
        """Support pyramid and ``support_mask[S, H, W]`` -> the CWPA bag ``[N_pro, D]``."""
        return self.cwpa.prototypes(support_feats[-1], support_mask)

    def segment(self, query_feats: List[torch.Tensor], prototypes: torch.Tensor) -> torch.Tensor:
        """Query pyramid and the CWPA bag -> logits ``[Q, K, H, W]``."""
        if not isinstance(prototypes, torch.Tensor):
            raise ValueError(f"{type(self).__name__}.segment: prototypes must be the [N_pro, D] bag of "
                             f"prototypes(), got {type(prototypes).__name__}")
        return self._decode(query_feats, prototypes)

    def _decode(self, query_feats: List[torch.Tensor], bag: torch.Tensor) -> torch.Tensor:
        enhanced = self.cwpa(query_feats[-1], bag)  # [Q, 2D, h, w]
        return self.decoder(enhanced, list(query_feats[:-1]))


class MatcherPrototypes(NamedTuple):
    """What ``CWPAUNetMatcher.prototypes`` returns for one support.

    local: ``[N_pro, D]`` the CWPA bag (F5 vectors).
    matcher: the matcher head's ``ClassPrototypes(bg, fg)`` in its matching space.
    """

    local: torch.Tensor
    matcher: ClassPrototypes


class CWPAUNetMatcher(CWPAUNet):
    """``CWPAUNet`` plus a matcher head whose scores are added to the decoder's logits (module docstring).

    Args:
        matcher_dim: channels of the matcher's projected F5 features.
        matcher_scaler: cosine multiplier of the matcher.
        cwpa_kwargs: ``CWPAUNet``'s arguments (``num_classes`` must be 2: the head scores background and
            foreground).

    The decoder's 1x1 classifier starts at zero, so the untrained model is the matcher.
    """

    def __init__(self, matcher_dim: int = 256, matcher_scaler: float = SCALER, **cwpa_kwargs: Any) -> None:
        if cwpa_kwargs.get("num_classes", 2) != 2:
            raise ValueError(f"CWPAUNetMatcher: the matcher scores background and foreground, so num_classes must be "
                             f"2, got {cwpa_kwargs['num_classes']}")
        super().__init__(**cwpa_kwargs)
        self.head = MatcherHead(self.encoder.out_channels[-1], dim=matcher_dim, scaler=matcher_scaler)
        nn.init.zeros_(self.decoder.head.weight)
        nn.init.zeros_(self.decoder.head.bias)

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> MatcherPrototypes:
        """Support pyramid and ``support_mask[S, H, W]`` -> the CWPA bag and the matcher's class bags."""
        return MatcherPrototypes(local=self.cwpa.prototypes(support_feats[-1], support_mask),
                                 matcher=self.head.prototypes(support_feats, support_mask))

    def segment(self, query_feats: List[torch.Tensor], prototypes: MatcherPrototypes) -> torch.Tensor:
        """Query pyramid and ``MatcherPrototypes`` -> float32 logits ``[Q, 2, H, W]`` (decoder + matcher)."""
        if not isinstance(prototypes, MatcherPrototypes):
            raise ValueError(f"{type(self).__name__}.segment: prototypes must be the MatcherPrototypes of "
                             f"prototypes(), got {type(prototypes).__name__}")
        logits = self._decode(query_feats, prototypes.local)
        scores = self.head(query_feats, prototypes.matcher)  # float32 [Q, 2, h, w]
        with torch.autocast(device_type=scores.device.type, enabled=False):
            up = F.interpolate(scores, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return logits.float() + up
