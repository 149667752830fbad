"""The main few-shot model: ResNet-34 encoder + CWPA at the bottleneck + U-Net decoder (DESIGN.md section 3).

    model = build_model("cwpa_unet")                       # random init; weights="imagenet" reads the hub cache
    out = model(support_img, support_mask, query_img)      # [S,3,H,W], [S,H,W], [Q,3,H,W]
    out.logits                                              # [Q, 2, H, W] (background, foreground)

Evaluation can reuse the support side across many queries::

    feats_s = model.encode(support_img)
    protos = model.prototypes(feats_s, support_mask)       # CWPAPrototypes, once per support
    logits = model.segment(model.encode(query_img), protos)

The logits are the U-Net decoder's plus, by default, the scores of a residual prototype head (ALPNet-style cosine
matching, ``models/prototype_head.py``, which explains why: without it the model scored 1.8-2.5% Dice on the
held-out kidneys of phantoms v2 at 128 px, with it 21-27% over three runs, and 47% instead of 22% on CHAOS-T2
fold 0).
``prototype_head=None`` gives DESIGN.md section 3's model exactly.

``forward`` contains no loss and no flags; the engine computes losses from ``SegOutput.aux``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.models import MODELS
from fewshot_proto.models.checks import check_episode
from fewshot_proto.models.decoders.unet import UNetDecoder
from fewshot_proto.models.encoders.base import build_encoder
from fewshot_proto.models.fsbaselines.common import ClassPrototypes
from fewshot_proto.models.prototype import CWPA
from fewshot_proto.models.prototype_head import PrototypeHead
from fewshot_proto.types import SegOutput

__all__ = ["CWPAPrototypes", "CWPAUNet", "cwpa_unet"]


class CWPAPrototypes(NamedTuple):
    """What ``CWPAUNet.prototypes`` returns for one support bag.

    local: ``[N_pro, 512]`` CWPA local foreground prototypes (F5 vectors).
    head: the residual head's ``ClassPrototypes(bg, fg)`` in its matching space, ``None`` without the head.
    """

    local: torch.Tensor
    head: Optional[ClassPrototypes]


class CWPAUNet(nn.Module):
    """ResNet-34 (dilated layer4) + correlation-weighted prototype aggregation + U-Net decoder.

    Args:
        encoder: registered encoder name (``"resnet34"``); its last two maps must share a resolution.
        weights: encoder weights: ``None`` (default), ``"imagenet"`` (local torch hub cache only) or a path.
        tau: threshold on the pooled support mask for local prototypes.
        temperature: softmax temperature of the aggregation.
        num_classes: K output channels (2: background, foreground).
        use_background: also use background local prototypes.
        in_channels: image channels (3: grey tiled to RGB).
        norm: ``"batch"`` (BatchNorm, torchvision's ResNet-34; needed for ImageNet weights) or ``"group"``
            (GroupNorm everywhere: the statistics do not depend on the episode's batch of one support and one
            query, so training and evaluation normalise alike).
        prototype_head: matching features of the residual prototype head, ``"f5"`` (default: F5 at 1/16) or
            ``"hypercolumn"`` (F3 and upsampled F5 at 1/8), or ``None`` for no head (DESIGN.md's model as
            specified).
            With a head, the decoder's 1x1 classifier starts at zero, so the untrained model is the matcher.
        head_dim: channels of the head's matching features.
        head_scaler: cosine multiplier of the head (20).
        head_guide: also give the decoder the head's coarse foreground probability (``sigmoid(score_fg -
            score_bg)`` at the matching resolution), resized and concatenated to the input of every decoder
            stage, so that the decoder can refine the head's blob with the skip features instead of re-deriving
            where the support matched from ``P_agg * F5``. Needs a head.

    Attributes:
        kind: ``"fewshot"`` (supervised baselines say ``"supervised"``).
        config: the builder kwargs; ``build_model("cwpa_unet", **model.config)`` rebuilds the architecture.
            ``config["weights"]`` is always ``None``: initial weights are not part of the architecture (a
            checkpoint's state dict replaces them) and rebuilding must not need the ImageNet file.
        init_weights: the ``weights`` argument actually used to initialise the encoder (provenance).

    Shapes: S support slices, Q query slices, (H, W) input size (a multiple of ``encoder.input_multiple``, 16),
    D = 512, (h, w) = (H/16, W/16).
    """

    kind = "fewshot"

    def __init__(
        self,
        encoder: str = "resnet34",
        weights: Union[None, str, Path] = None,
        tau: float = 0.5,
        temperature: float = 0.1,
        num_classes: int = 2,
        use_background: bool = False,
        in_channels: int = 3,
        norm: str = "batch",
        prototype_head: Optional[str] = "f5",
        head_dim: int = 256,
        head_scaler: float = 20.0,
        head_guide: bool = False,
    ) -> None:
        super().__init__()
        self.config: Dict[str, Any] = {
            "encoder": encoder,
            "weights": None,
            "tau": float(tau),
            "temperature": float(temperature),
            "num_classes": int(num_classes),
            "use_background": bool(use_background),
            "in_channels": int(in_channels),
            "norm": str(norm),
            "prototype_head": prototype_head,
            "head_dim": int(head_dim),
            "head_scaler": float(head_scaler),
            "head_guide": bool(head_guide),
        }
        self.init_weights = None if weights is None else str(weights)
        self.encoder = build_encoder(encoder, in_channels=in_channels, weights=weights, dilate_last=True, norm=norm)
        red = self.encoder.reductions
        if len(red) < 2 or red[-1] != red[-2]:
            raise ValueError(
                f"CWPAUNet: encoder {encoder!r} must return its last two feature maps at the same resolution "
                f"(reductions {red})"
            )
        self.cwpa = CWPA(tau=tau, temperature=temperature, use_background=use_background)
        d = self.encoder.out_channels[-1]
        if head_guide and prototype_head is None:
            raise ValueError("CWPAUNet: head_guide=True needs a prototype head (prototype_head is None)")
        self.head_guide = bool(head_guide)
        self.decoder = UNetDecoder(self.encoder.out_channels, in_channels=2 * d, num_classes=num_classes, norm=norm,
                                   guide_channels=1 if self.head_guide else 0)
        self.head: Optional[PrototypeHead] = None
        if prototype_head is not None:
            if num_classes != 2:
                raise ValueError(
                    f"CWPAUNet: the prototype head scores background and foreground (num_classes=2), got "
                    f"num_classes={num_classes}; use prototype_head=None"
                )
            self.head = PrototypeHead(self.encoder.out_channels, features=prototype_head, dim=head_dim,
                                      scaler=head_scaler)
            nn.init.zeros_(self.decoder.head.weight)
            nn.init.zeros_(self.decoder.head.bias)

    # ---- steps (the engine relies on these names) -------------------------------------------------------
    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x[B, C, H, W]`` -> encoder features fine to coarse ``[F1, ..., F5]`` (``ValueError`` on a bad size)."""
        self.encoder.check_input_shape(x)
        return self.encoder(x)

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> CWPAPrototypes:
        """Support features (list from ``encode``) and ``support_mask[S, H, W]`` -> ``CWPAPrototypes``."""
        local = self.cwpa.prototypes(support_feats[-1], support_mask)
        head = None if self.head is None else self.head.prototypes(support_feats, support_mask)
        return CWPAPrototypes(local=local, head=head)

    def segment(self, query_feats: List[torch.Tensor], prototypes: CWPAPrototypes) -> torch.Tensor:
        """Query features (list from ``encode``) and ``CWPAPrototypes`` -> logits ``[Q, K, H, W]``."""
        if not isinstance(prototypes, CWPAPrototypes):
            raise ValueError(
                f"CWPAUNet.segment: prototypes must be the CWPAPrototypes of CWPAUNet.prototypes, "
                f"got {type(prototypes).__name__}"
            )
        enhanced = self.cwpa(query_feats[-1], prototypes.local)  # [Q, 2D, h, w]
        if self.head is None:
            return self.decoder(enhanced, list(query_feats[:-1]))
        if prototypes.head is None:
            raise ValueError("CWPAUNet.segment: this model has a prototype head but the prototypes carry none")
        scores = self.head(query_feats, prototypes.head)  # float32 [Q, 2, h', w'] at the matching resolution
        guide = torch.sigmoid(scores[:, 1:2] - scores[:, 0:1]) if self.head_guide else None
        logits = self.decoder(enhanced, list(query_feats[:-1]), guide=guide)
        with torch.autocast(device_type=scores.device.type, enabled=False):
            up = F.interpolate(scores, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        return logits.float() + up

    # ---- the one forward ----------------------------------------------------------------------------------
    def forward(self, support_img: torch.Tensor, support_mask: torch.Tensor, query_img: torch.Tensor) -> SegOutput:
        """One episode.

        Args:
            support_img: ``[S, C, H, W]``.
            support_mask: ``[S, H, W]`` foreground mask (float; soft values allowed).
            query_img: ``[Q, C, H, W]``.

        Returns:
            ``SegOutput(logits[Q, K, H, W], aux)`` with ``aux["query_feat"]`` F5 of the query ``[Q, D, h, w]``,
            ``aux["support_feat"]`` F5 of the support ``[S, D, h, w]``, ``aux["prototypes"]`` ``[N_pro, D]`` (the
            CWPA bag), ``aux["head_prototypes"]`` (the head's ``ClassPrototypes`` or ``None``), and
            the full pyramids ``aux["query_feats"]`` / ``aux["support_feats"]`` (lists, fine to coarse) so that
            losses (cyclic consistency) can reuse them instead of re-encoding.
        """
        check_episode("CWPAUNet", support_img, support_mask, query_img)
        s = support_img.shape[0]
        feats = self.encode(torch.cat([support_img, query_img], dim=0))  # one batched pass
        support_feats = [f[:s] for f in feats]
        query_feats = [f[s:] for f in feats]
        protos = self.prototypes(support_feats, support_mask)
        logits = self.segment(query_feats, protos)
        return SegOutput(
            logits=logits,
            aux={
                "query_feat": query_feats[-1],
                "support_feat": support_feats[-1],
                "prototypes": protos.local,
                "head_prototypes": protos.head,
                "query_feats": query_feats,
                "support_feats": support_feats,
            },
        )


@MODELS.register("cwpa_unet")
def cwpa_unet(
    encoder: str = "resnet34",
    weights: Union[None, str, Path] = None,
    tau: float = 0.5,
    temperature: float = 0.1,
    num_classes: int = 2,
    use_background: bool = False,
    in_channels: int = 3,
    norm: str = "batch",
    prototype_head: Optional[str] = "f5",
    head_dim: int = 256,
    head_scaler: float = 20.0,
    head_guide: bool = False,
) -> CWPAUNet:
    """Build ``CWPAUNet`` (registered as ``"cwpa_unet"``); the kwargs are stored in ``model.config``."""
    return CWPAUNet(
        encoder=encoder,
        weights=weights,
        tau=tau,
        temperature=temperature,
        num_classes=num_classes,
        use_background=use_background,
        in_channels=in_channels,
        norm=norm,
        prototype_head=prototype_head,
        head_dim=head_dim,
        head_scaler=head_scaler,
        head_guide=head_guide,
    )
