"""ResUpNet (seed 000): a residual U-Net, 16-32-64-128 with a 256-channel bottleneck at 1/16.

Built from the seed's Keras code (its sections 7.1-7.3), which is the consistent reading of its prose::

    residual_block(c_out, stride):   x -> conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN (+ shortcut) -> ReLU -> Dropout
                                     shortcut = x, or conv1x1(stride) -> BN when the stride or width changes
                                     (computed by StridedPointwiseConv)
    upconv_block(c_out):             x -> convT2x2 stride 2 -> BN -> ReLU -> concat(skip) -> residual_block(c_out, 1)

    enc1 = residual_block(16, 1)      H       (skip 1)
    enc2 = residual_block(32, 2)      H/2     (skip 2)
    enc3 = residual_block(64, 2)      H/4     (skip 3)
    enc4 = residual_block(128, 2)     H/8     (skip 4)
    bott = residual_block(256, 2)     H/16
    dec1..dec4 = upconv_block(128, 64, 32, 16) with skips 4..1
    head: conv1x1 16 -> 1 (sigmoid logit, returned as two logits [0, z])

Conventions kept from the seed's code: every convolution has a bias (Keras' default), BN after every
convolution except the output layer (the seed's section 2.6 prose adds a BN before the sigmoid; its code does
not, and the code is followed), dropout 0.3 after every residual block, encoder and decoder alike. The
encoder's first block has a projection shortcut because the width changes (input channels -> 16). The
seed's optimisation settings (Dice+BCE, Adam 1e-4, L2 1e-5 on convolution kernels) belong to the engine
and its configs, not to the model.

``in_channels`` defaults to 3 (grey tiled, the harness' input); the seed's 4 is BraTS-specific (T1, T1ce, T2,
FLAIR). ``base_channels`` scales the width (level i has ``base_channels * 2**i``).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from fewshot_proto.models.base import SupervisedSegmenter
from fewshot_proto.models.baselines.common import SegHead
from fewshot_proto.models.checks import check_positive_int, check_rate

__all__ = ["ResUpNet", "ResidualBlock", "UpConvBlock", "StridedPointwiseConv"]


class StridedPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with stride ``s``, computed as "every s-th pixel, then a stride-1 1x1 convolution".

    The output is identical to ``nn.Conv2d(cin, cout, 1, stride=s)`` (a 1x1 kernel with no padding reads the
    pixels at multiples of ``s``; ``ceil(H / s)`` of them either way) and so are the parameters and their
    state-dict names (``weight``, ``bias``). Why: oneDNN's CPU kernel for the weight gradient of a strided 1x1
    convolution on channels_last (NHWC) inputs with fewer input channels than its channel block (e.g. 4 or 8)
    writes past its workspace (uxlfoundation/oneDNN issue #6035): segfaults or heap corruption were observed
    here with torch 2.14.1 for narrow ResUpNets (``base_channels`` 4 or 8) at 64x64, and wrong weight
    gradients are reported elsewhere. A stride-1 1x1 convolution does not take that code path.
    ``[B, Cin, H, W] -> [B, Cout, ceil(H/s), ceil(W/s)]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=1)
        self.subsample = int(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.subsample > 1:
            x = x[:, :, :: self.subsample, :: self.subsample]
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", subsample={self.subsample}"


class ResidualBlock(nn.Module):
    """Two-convolution residual block with a projection shortcut when stride or width changes.

    ``[B, Cin, H, W] -> [B, Cout, H/stride, W/stride]``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                StridedPointwiseConv(in_channels, out_channels, stride=stride),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.drop(self.relu(y + self.shortcut(x)))


class UpConvBlock(nn.Module):
    """2x2 stride-2 transposed conv -> BN -> ReLU, concat the skip, residual block.

    ``x[B, Cin, h, w], skip[B, Cskip, 2h, 2w] -> [B, Cout, 2h, 2w]``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.block = ResidualBlock(out_channels + skip_channels, out_channels, stride=1, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.up(x)))
        return self.block(torch.cat([x, skip], dim=1))


class ResUpNet(SupervisedSegmenter):
    """Residual U-Net of seed 000; ignores the support in ``forward`` (supervised baseline).

    Args:
        in_channels: image channels (default 3; the seed's BraTS setting is 4; 1 works too).
        base_channels: width of the first level (16 in the seed); levels are ``base * (1, 2, 4, 8)`` and the
            bottleneck ``base * 16``.
        dropout: dropout after every residual block (0.3 in the seed).
        out_mode: ``"sigmoid"`` (default, the seed's one-channel sigmoid head, returned as logits ``[0, z]``)
            or ``"softmax"`` (two-channel head).
        classes: target label values ``[c_1, ..., c_K]`` for one multi-class model (K sigmoid channels, or
            ``1 + K`` softmax channels), or ``None`` (default): binary. See ``common``.

    Inputs must be multiples of 16 (four stride-2 convolutions).
    Shapes: ``segment_image(x[B, C, H, W]) -> logits[B, 1 + K, H, W]`` (K = 1 without ``classes``);
    ``binary_logits(x, class_id) -> logits[B, 2, H, W]``;
    ``forward(support_img, support_mask, query_img[Q, C, H, W], class_id=None) -> SegOutput(logits[Q, 2, H, W])``.
    """

    display_name = "ResUpNet"

    def __init__(
        self,
        *,
        in_channels: int = 3,
        base_channels: int = 16,
        dropout: float = 0.3,
        out_mode: str = "sigmoid",
        classes: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        classes = self._set_output(out_mode, classes)
        check_positive_int("in_channels", in_channels, "ResUpNet")
        check_positive_int("base_channels", base_channels, "ResUpNet")
        dropout = check_rate("dropout", dropout, "ResUpNet")
        self.in_channels = in_channels
        self.total_stride = 16

        widths = [base_channels * 2**i for i in range(5)]  # 16, 32, 64, 128, 256
        self.encoders = nn.ModuleList(
            [ResidualBlock(in_channels, widths[0], stride=1, dropout=dropout)]
            + [ResidualBlock(widths[i - 1], widths[i], stride=2, dropout=dropout) for i in range(1, 4)]
        )
        self.bottleneck = ResidualBlock(widths[3], widths[4], stride=2, dropout=dropout)
        self.decoders = nn.ModuleList(
            [UpConvBlock(widths[i + 1], widths[i], widths[i], dropout) for i in range(3, -1, -1)]
        )
        self.head = SegHead(widths[0], out_mode, self.num_classes)

    def _segment(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
        x = self.bottleneck(x)
        for dec, skip in zip(self.decoders, reversed(skips)):
            x = dec(x, skip)
        return self.head(x)
