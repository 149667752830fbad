"""MobileNet ASPP Residual SE U-Net (seed 001): a MobileNetV2 encoder, an ASPP bottleneck, SE skips and
SE-residual decoder blocks. A supervised baseline.

Data flow for a 256x256 input (channels @ resolution)::

    x ----------------------------------------- stem enc0: conv3x3 -> BN -> ReLU  ->  32 @ 256   (trainable)
    x -> mobilenet_v2.features (frozen when pretrained weights are given):
           features[1]  -> enc1   16 @ 128
           features[3]  -> enc2   24 @ 64
           features[6]  -> enc3   32 @ 32
           features[13] -> enc4   96 @ 16
           features[18] -> enc5 1280 @ 8       (1/32)
    ASPP(enc5): [conv1x1, conv3x3 d6, conv3x3 d12, conv3x3 d18] each -> BN -> ReLU,
                image pooling: GAP -> conv1x1 -> GroupNorm -> ReLU -> broadcast;
                5 x 128 = 640 -> conv1x1 -> BN -> ReLU -> 512 -> Dropout(0.5)            512 @ 8
    decoder (the seed's table):   stage  up (convT 2x2 s2)   SE(skip)    concat   ResidualBlockSE out
                                  dec5   512 -> 256          96 (enc4)   352      256 @ 16
                                  dec4   256 -> 128          32 (enc3)   160      128 @ 32
                                  dec3   128 -> 64           24 (enc2)    88       64 @ 64
                                  dec2    64 -> 32           16 (enc1)    48       32 @ 128
                                  dec1    32 -> 32           32 (enc0)    64       32 @ 256
    head: conv1x1 32 -> 1 (sigmoid logit, returned as two logits [0, z])

Resolved readings of the seed:

* The seed gives the ASPP image-pooling branch 256 channels yet a 640-channel concatenation; DESIGN.md resolves
  this to 128 per branch (5 x 128 = 640).
* ``ResidualBlockSE`` follows the seed's diagram: [conv3x3 -> BN -> ReLU] x 2 -> SE -> + shortcut (identity, or
  conv1x1 -> BN when widths differ), with no activation after the addition. Convolutions followed by BN have
  no bias; SE layers and transposed convolutions do.
* SE uses ``max(1, C // 16)`` hidden units, so the 16- and 24-channel skips get one hidden unit.
* The stem (the seed's "init_conv", trainable, full resolution) is one conv3x3 -> BN -> ReLU on the raw input;
  MobileNetV2 also reads the raw input (its first convolution is the one adapted to ``in_channels``).

Pretrained weights and freezing. ``weights=None`` (default) builds a randomly initialised, trainable encoder and
never touches the network or the disk. ``weights`` may be a path to a torchvision ``mobilenet_v2`` state dict
(``features.*`` keys; ``classifier.*`` keys are ignored) or ``"imagenet"``, which is resolved ONLY from the local
torch hub cache (``<torch.hub.get_dir()>/checkpoints/mobilenet_v2-b0353104.pth``, torchvision's IMAGENET1K_V1,
or ``mobilenet_v2-7ebf99e0.pth``, IMAGENET1K_V2); nothing is ever downloaded, and a missing file raises
``FileNotFoundError`` naming the expected path. With weights the encoder is frozen by default
(``freeze_encoder=None`` means "frozen iff weights are given"): its parameters get ``requires_grad=False`` and
it stays in eval mode (BN running statistics untouched) even when the model is put in training mode. When
``in_channels != 3`` the first convolution is replaced by one with ``in_channels`` inputs, each initialised with
the mean of the pretrained R, G, B kernels (the seed's ``w_gray = mean(w_R, w_G, w_B)``).
Note: the model does not apply ImageNet mean/std normalisation; the harness feeds z-scored grey values.

To rebuild a trained model from its checkpoint without the weights file, build with ``weights=None,
freeze_encoder=True`` and load the state dict (the state dict carries the encoder weights).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.models import mobilenet_v2

from fewshot_proto.errors import CheckpointError
from fewshot_proto.models.base import SupervisedSegmenter
from fewshot_proto.models.baselines.common import SEBlock, SegHead
from fewshot_proto.models.checks import check_positive_int, check_rate
from fewshot_proto.models.weights import read_state_file

__all__ = [
    "MobileNetASPPSEUNet",
    "ASPP",
    "ResidualBlockSE",
    "SKIP_INDICES",
    "IMAGENET_FILES",
    "resolve_mobilenet_weights",
    "load_mobilenet_features_state",
]

# features[i] whose outputs are the skips enc1..enc4, then the bottleneck enc5 (1280 @ 1/32).
SKIP_INDICES: Tuple[int, ...] = (1, 3, 6, 13, 18)
# torchvision's file names for mobilenet_v2 ImageNet weights (IMAGENET1K_V1, IMAGENET1K_V2), looked up in order.
IMAGENET_FILES: Tuple[str, ...] = ("mobilenet_v2-b0353104.pth", "mobilenet_v2-7ebf99e0.pth")

WeightsArg = Union[None, str, "os.PathLike[str]"]


def resolve_mobilenet_weights(weights: Union[str, "os.PathLike[str]"]) -> Path:
    """The local file behind ``weights`` (``"imagenet"`` or a path); never downloads.

    ``"imagenet"`` looks in ``<torch.hub.get_dir()>/checkpoints`` for the files in ``IMAGENET_FILES``.
    Raises ``FileNotFoundError`` naming the expected file(s) when nothing is there.
    """
    if isinstance(weights, str) and weights.lower() == "imagenet":
        ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
        for name in IMAGENET_FILES:
            if (ckpt_dir / name).is_file():
                return ckpt_dir / name
        expected = " or ".join(str(ckpt_dir / n) for n in IMAGENET_FILES)
        raise FileNotFoundError(
            f"MobileNetV2 ImageNet weights are not in the local torch hub cache: expected {expected}. "
            f"fewshot_proto never downloads weights; fetch the file yourself (e.g. torchvision's "
            f"mobilenet_v2(weights='IMAGENET1K_V1') on a machine with network access) or pass weights=<path>."
        )
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 weights file not found: {path}")
    return path


def load_mobilenet_features_state(path: Path, in_channels: int) -> Dict[str, torch.Tensor]:
    """Read a torchvision ``mobilenet_v2`` state dict from ``path`` as a ``features`` state dict.

    Accepts full-model keys (``features.*``; ``classifier.*`` dropped), bare ``features`` keys, or either under
    a ``"state_dict"`` entry. When the first convolution has 3 input channels and ``in_channels != 3`` it is
    adapted: every input channel gets the mean of the R, G, B kernels. Raises ``CheckpointError`` naming the
    file when it cannot be read or holds something else.
    """
    raw = read_state_file(path, "MobileNetV2 weights file").state
    if any(str(k).startswith("features.") for k in raw):
        state = {k[len("features."):]: v for k, v in raw.items() if k.startswith("features.")}
    else:
        state = dict(raw)
    key = "0.0.weight"
    if key not in state or not isinstance(state[key], torch.Tensor) or state[key].ndim != 4:
        raise CheckpointError(f"{path}: no MobileNetV2 first convolution ('features.{key}') in the state dict")
    w = state[key]
    if w.shape[1] != in_channels:
        if w.shape[1] != 3:
            raise CheckpointError(
                f"{path}: first convolution has {w.shape[1]} input channels; can adapt only 3 -> {in_channels}"
            )
        state[key] = w.mean(dim=1, keepdim=True).repeat(1, in_channels, 1, 1).contiguous()
    return state


def _conv_bn_relu(in_ch: int, out_ch: int, kernel: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


def _gn_groups(channels: int) -> int:
    """GroupNorm groups for the 1x1 pooled map: at most 32, at least two channels per group (32 for 128)."""
    return math.gcd(32, channels // 2)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3) with a GroupNorm image-pooling branch.

    ``[B, Cin, h, w] -> [B, out_channels, h, w]``. Branches: conv1x1, conv3x3 at each dilation in ``rates``
    (each -> BN -> ReLU), and global average pooling -> conv1x1 -> GroupNorm -> ReLU (GroupNorm because the
    pooled map is 1x1: BN would need a batch; ``gcd(32, branch_channels // 2)`` groups, 32 for 128 channels),
    broadcast back to ``h x w``. Their concatenation (``(2 + len(rates)) * branch_channels``) goes through
    conv1x1 -> BN -> ReLU -> Dropout.
    """

    def __init__(
        self,
        in_channels: int,
        branch_channels: int,
        out_channels: int,
        rates: Sequence[int],
        dropout: float,
    ) -> None:
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(in_channels, branch_channels, 1)])
        for r in rates:
            self.branches.append(_conv_bn_relu(in_channels, branch_channels, 3, dilation=int(r)))
        self.pool_branch = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, branch_channels, 1, bias=False),
            nn.GroupNorm(_gn_groups(branch_channels), branch_channels),
            nn.ReLU(inplace=True),
        )
        n = len(self.branches) + 1
        self.project = nn.Sequential(
            nn.Conv2d(n * branch_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        outs = [b(x) for b in self.branches]
        outs.append(self.pool_branch(x).expand(-1, -1, h, w))
        return self.project(torch.cat(outs, dim=1))


class ResidualBlockSE(nn.Module):
    """[conv3x3 -> BN -> ReLU] x 2 -> SE -> + shortcut (identity or conv1x1 -> BN).

    ``[B, Cin, H, W] -> [B, Cout, H, W]``; no activation after the addition (the seed's diagram).
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(in_channels, out_channels, 3),
            _conv_bn_relu(out_channels, out_channels, 3),
            SEBlock(out_channels, reduction),
        )
        self.shortcut: nn.Module
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class _DecoderStage(nn.Module):
    """convT 2x2 s2 (Cin -> Cout), SE on the skip, concat, ResidualBlockSE(Cout + Cskip -> Cout)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, reduction: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.skip_se = SEBlock(skip_channels, reduction)
        self.block = ResidualBlockSE(out_channels + skip_channels, out_channels, reduction)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), self.skip_se(skip)], dim=1))


class MobileNetASPPSEUNet(SupervisedSegmenter):
    """MobileNetV2 encoder + ASPP + SE U-Net decoder (seed 001); ignores the support in ``forward``.

    Args:
        in_channels: image channels (default 3, grey tiled; 1 and 4 work: MobileNetV2's first conv is rebuilt).
        weights: ``None`` (random init, default), ``"imagenet"`` (local torch hub cache only) or a path to a
            torchvision ``mobilenet_v2`` state dict. See the module docstring.
        freeze_encoder: freeze MobileNetV2 (``requires_grad=False``, always in eval mode). ``None`` (default)
            means frozen iff ``weights`` is given.
        stem_channels: width of the trainable full-resolution stem enc0 (32).
        aspp_channels: channels per ASPP branch (128; five branches -> 640).
        aspp_out_channels: ASPP projection width (512).
        aspp_rates: dilation rates of the three atrous branches ((6, 12, 18)).
        aspp_dropout: dropout after the ASPP projection (0.5).
        se_reduction: SE reduction ratio r (16), on every skip and in every decoder block.
        decoder_channels: output widths of dec5..dec1 ((256, 128, 64, 32, 32)); lower them for CPU benchmarks.
        out_mode: ``"sigmoid"`` (default, the seed's one-channel head returned as ``[0, z]``) or ``"softmax"``.
        classes: target label values ``[c_1, ..., c_K]`` for one multi-class model (K sigmoid channels, or
            ``1 + K`` softmax channels), or ``None`` (default): binary. See ``common``.

    Inputs must be multiples of 32 (the bottleneck is at 1/32: 8x8 for 256x256; 2x2 for 64x64).
    Shapes: ``segment_image(x[B, C, H, W]) -> logits[B, 1 + K, H, W]`` (K = 1 without ``classes``);
    ``binary_logits(x, class_id) -> logits[B, 2, H, W]``;
    ``forward(support_img, support_mask, query_img[Q, C, H, W], class_id=None) -> SegOutput(logits[Q, 2, H, W])``.
    """

    display_name = "MobileNetASPPSEUNet"

    def __init__(
        self,
        *,
        in_channels: int = 3,
        weights: WeightsArg = None,
        freeze_encoder: Optional[bool] = None,
        stem_channels: int = 32,
        aspp_channels: int = 128,
        aspp_out_channels: int = 512,
        aspp_rates: Sequence[int] = (6, 12, 18),
        aspp_dropout: float = 0.5,
        se_reduction: int = 16,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 32),
        out_mode: str = "sigmoid",
        classes: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        name = "MobileNetASPPSEUNet"
        classes = self._set_output(out_mode, classes)
        check_positive_int("in_channels", in_channels, name)
        check_positive_int("stem_channels", stem_channels, name)
        check_positive_int("aspp_channels", aspp_channels, name)
        if aspp_channels < 2:
            raise ValueError(
                f"{name}: aspp_channels must be >= 2 (GroupNorm of the pooling branch), got {aspp_channels}"
            )
        check_positive_int("aspp_out_channels", aspp_out_channels, name)
        check_positive_int("se_reduction", se_reduction, name)
        aspp_dropout = check_rate("aspp_dropout", aspp_dropout, name)
        rates = [check_positive_int("aspp_rates[*]", r, name) for r in aspp_rates]
        dec = list(decoder_channels)
        if len(dec) != 5:
            raise ValueError(f"{name}: decoder_channels needs 5 widths (dec5..dec1), got {dec!r}")
        for c in dec:
            check_positive_int("decoder_channels[*]", c, name)
        if freeze_encoder is None:
            freeze_encoder = weights is not None
        self.in_channels = in_channels
        self.total_stride = 32

        self.encoder = self._build_encoder(in_channels, weights)
        self.encoder_frozen = bool(freeze_encoder)
        if self.encoder_frozen:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
            self.encoder.eval()

        self.stem = _conv_bn_relu(in_channels, stem_channels, 3)
        enc_channels = [self._out_channels(self.encoder[i]) for i in SKIP_INDICES]  # 16, 24, 32, 96, 1280
        self.aspp = ASPP(enc_channels[-1], aspp_channels, aspp_out_channels, rates, aspp_dropout)
        skip_channels = [enc_channels[3], enc_channels[2], enc_channels[1], enc_channels[0], stem_channels]
        stages = []
        c = aspp_out_channels
        for skip_c, out_c in zip(skip_channels, dec):
            stages.append(_DecoderStage(c, skip_c, out_c, se_reduction))
            c = out_c
        self.decoder = nn.ModuleList(stages)
        self.head = SegHead(c, out_mode, self.num_classes)

    @staticmethod
    def _out_channels(block: nn.Module) -> int:
        convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
        return int(convs[-1].out_channels)

    def _resolve_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """``freeze_encoder=None`` is recorded as what it resolved to (frozen iff weights were given)."""
        return dict(config, freeze_encoder=self.encoder_frozen)

    @staticmethod
    def _build_encoder(in_channels: int, weights: WeightsArg) -> nn.Sequential:
        """``mobilenet_v2(weights=None).features`` (19 blocks), first conv adapted, weights loaded if given."""
        features = mobilenet_v2(weights=None).features
        if in_channels != 3:
            old = features[0][0]
            features[0][0] = nn.Conv2d(
                in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
        if weights is not None:
            path = resolve_mobilenet_weights(weights)
            state = load_mobilenet_features_state(path, in_channels)
            try:
                features.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise CheckpointError(f"{path} is not a torchvision mobilenet_v2 state dict: {e}") from e
        return features

    def train(self, mode: bool = True) -> "MobileNetASPPSEUNet":
        """Like ``nn.Module.train`` but a frozen encoder always stays in eval mode (BN statistics fixed)."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def _segment(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = [self.stem(x)]  # enc0
        feats: List[torch.Tensor] = []
        h = x
        for i, block in enumerate(self.encoder):
            h = block(h)
            if i in SKIP_INDICES:
                feats.append(h)
        skips.extend(feats[:4])  # enc0..enc4
        y = self.aspp(feats[4])
        for stage, skip in zip(self.decoder, reversed(skips)):
            y = stage(y, skip)
        return self.head(y)
