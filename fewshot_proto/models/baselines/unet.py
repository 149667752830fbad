"""Plain U-Net (Ronneberger, Fischer & Brox, MICCAI 2015), seeds 003/004: a supervised baseline.

Architecture (defaults: ``base_channels=64``, ``depth=4``)::

    level  channels   resolution   contracting path              expanding path
    0      64         H            2 x (conv3x3 + ReLU)          2 x (conv3x3 + ReLU) on concat(up, skip0)
    1      128        H/2          maxpool 2, 2 x (conv3x3+ReLU) ...
    2      256        H/4          ...
    3      512        H/8          ...                           up-conv 2x2 (1024 -> 512), concat skip3
    4      1024       H/16         bottleneck: 2 x (conv3x3+ReLU)
    head: conv1x1 64 -> 2 class logits

That is the paper's 23 convolutional layers (18 3x3, 4 up-convolutions, 1 1x1). Differences from the paper,
all deliberate:

* ``same`` padding (the paper uses unpadded convolutions and an overlap-tile strategy), so the output has the
  input's size and no cropping of skips is needed; H and W must be multiples of ``2**depth`` (16).
* Batch normalisation is an option, OFF by default (``norm="none"``): the default network is the paper's,
  parameter for parameter. With ``norm="batch"`` every 3x3 convolution is conv (no bias) -> BN -> ReLU.
* ``dropout`` (default 0, off) is applied, as in the paper, at the end of the contracting path: after the
  deepest skip level and after the bottleneck.
* Weights are drawn from N(0, 2/fan_in) (the paper's initialisation; He et al.), biases zero.
* ``base_channels`` scales the width (16 gives a 1/16-cost network for CPU benchmarks) and ``depth`` the
  number of poolings.

Output: ``out_mode="softmax"`` (default; the paper's two-class softmax) or ``"sigmoid"`` (one channel,
returned as logits ``[0, z]``); see ``fewshot_proto.models.baselines.common``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from fewshot_proto.models.base import SupervisedSegmenter
from fewshot_proto.models.baselines.common import SegHead
from fewshot_proto.models.checks import check_positive_int, check_rate

__all__ = ["UNet", "DoubleConv", "NORMS"]

#: values of ``UNet(norm=...)``: no normalisation (the paper's network) or BatchNorm after every 3x3 convolution
NORMS = ("none", "batch")


class DoubleConv(nn.Module):
    """Two 3x3 ``same`` convolutions, each followed by (optional BN and) ReLU. ``[B, Cin, H, W] -> [B, Cout, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "none") -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"DoubleConv: norm must be one of {NORMS}, got {norm!r}")
        batch = norm == "batch"
        layers: List[nn.Module] = []
        c = in_channels
        for _ in range(2):
            layers.append(nn.Conv2d(c, out_channels, kernel_size=3, padding=1, bias=not batch))
            if batch:
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU(inplace=True))
            c = out_channels
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class UNet(SupervisedSegmenter):
    """Ronneberger U-Net with ``same`` padding; ignores the support in ``forward`` (supervised baseline).

    Args:
        in_channels: image channels (3: grey tiled, the harness default; 1 and 4 work too).
        base_channels: channels of the first level; level i has ``base_channels * 2**i`` (64 -> 64..1024).
        depth: number of max-poolings (4 in the paper); inputs must be multiples of ``2**depth``.
        norm: ``"none"`` (default: the paper's network) or ``"batch"`` (BN after every 3x3 convolution).
        dropout: dropout rate at the end of the contracting path (default 0: off).
        out_mode: ``"softmax"`` (two-channel head, default) or ``"sigmoid"`` (one-channel head as ``[0, z]``).
        classes: target label values ``[c_1, ..., c_K]`` for one multi-class model (head with ``1 + K``
            channels, or K sigmoid channels), or ``None`` (default): binary. See ``common``.

    Shapes: ``segment_image(x[B, C, H, W]) -> logits[B, 1 + K, H, W]`` (K = 1 without ``classes``);
    ``binary_logits(x, class_id) -> logits[B, 2, H, W]``;
    ``forward(support_img, support_mask, query_img[Q, C, H, W], class_id=None) -> SegOutput(logits[Q, 2, H, W])``.
    """

    display_name = "UNet"

    def __init__(
        self,
        *,
        in_channels: int = 3,
        base_channels: int = 64,
        depth: int = 4,
        norm: str = "none",
        dropout: float = 0.0,
        out_mode: str = "softmax",
        classes: Optional[Sequence[int]] = None,
    ) -> None:
        super().__init__()
        classes = self._set_output(out_mode, classes)
        check_positive_int("in_channels", in_channels, "UNet")
        check_positive_int("base_channels", base_channels, "UNet")
        check_positive_int("depth", depth, "UNet")
        dropout = check_rate("dropout", dropout, "UNet")
        if norm not in NORMS:
            raise ValueError(f"UNet: norm must be one of {NORMS}, got {norm!r}")
        self.in_channels = in_channels
        self.total_stride = 2**depth

        widths = [base_channels * 2**i for i in range(depth + 1)]
        self.encoders = nn.ModuleList()
        c = in_channels
        for w in widths[:-1]:
            self.encoders.append(DoubleConv(c, w, norm))
            c = w
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1], norm)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i in range(depth, 0, -1):
            self.ups.append(nn.ConvTranspose2d(widths[i], widths[i - 1], kernel_size=2, stride=2))
            self.decoders.append(DoubleConv(2 * widths[i - 1], widths[i - 1], norm))
        self.head = SegHead(widths[0], out_mode, self.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """N(0, 2/fan_in) for every (transposed) convolution, zero biases (Ronneberger et al., section 3)."""
        for m in self.modules():
            if isinstance(m, nn.ConvTranspose2d):
                # a stride-2 2x2 transposed conv: each output pixel sees in_channels inputs (one tap)
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.in_channels))
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                continue
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def _segment(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        depth = len(self.encoders)
        for i, enc in enumerate(self.encoders):
            x = enc(x)
            if i == depth - 1:
                x = self.drop(x)
            skips.append(x)
            x = self.pool(x)
        x = self.drop(self.bottleneck(x))
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([skip, up(x)], dim=1))
        return self.head(x)
