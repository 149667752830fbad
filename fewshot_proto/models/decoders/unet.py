"""U-Net decoder over an encoder pyramid whose last two maps share a resolution (DESIGN.md section 3).

For a 256x256 input with ``encoder_channels=(64, 64, 128, 256, 512)`` and a 1024-channel bottleneck (the CWPA
enhanced features)::

    16x16   cat(x 1024, F4 256)  -> (Conv3x3-BN-ReLU) x2 -> 256 -> ConvTranspose 2x2/2 -> 256 @ 32x32
    32x32   cat(., F3 128)       -> (Conv3x3-BN-ReLU) x2 -> 128 -> up                  -> 128 @ 64x64
    64x64   cat(., F2 64)        -> (Conv3x3-BN-ReLU) x2 ->  64 -> up                  ->  64 @ 128x128
    128x128 cat(., F1 64)        -> (Conv3x3-BN-ReLU) x2 ->  64 -> up                  ->  64 @ 256x256
    256x256 Conv1x1 -> K logits

The decoder reads only ``encoder_channels`` (the encoder contract, ``models/encoders/base.py``); any input size
the encoder accepts works (every feature map then has exactly half the size of the previous one).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ConvBNReLU", "DecoderStage", "UNetDecoder"]


class ConvBNReLU(nn.Sequential):
    """3x3 conv (no bias) -> BatchNorm -> ReLU, same padding."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class DecoderStage(nn.Module):
    """``cat(x, skip)`` -> (Conv-BN-ReLU) x2 -> ``out_channels`` -> 2x2 stride-2 transposed conv (x2 size)."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            ConvBNReLU(in_channels + skip_channels, out_channels), ConvBNReLU(out_channels, out_channels)
        )
        self.up = nn.ConvTranspose2d(out_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``x[B, in, h, w]``, ``skip[B, skip, h, w]`` -> ``[B, out, 2h, 2w]``."""
        if x.shape[-2:] != skip.shape[-2:] or x.shape[0] != skip.shape[0]:
            raise ValueError(
                f"DecoderStage: input {tuple(x.shape)} and skip {tuple(skip.shape)} differ in batch or spatial size"
            )
        return self.up(self.convs(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """U-Net decoder: one stage per skip, coarse to fine, then a 1x1 classifier (see the module docstring).

    Args:
        encoder_channels: the encoder's ``out_channels`` (fine to coarse). The last entry is the encoder's own
            bottleneck, which is not used as a skip (its replacement, of ``in_channels``, is passed to
            ``forward``); the others are the skips.
        in_channels: channels of the bottleneck tensor given to ``forward`` (1024 for CWPA-enhanced F5).
        num_classes: K output channels.
        decoder_channels: output channels of each stage, coarse to fine (one per skip).
    """

    def __init__(
        self,
        encoder_channels: Sequence[int] = (64, 64, 128, 256, 512),
        in_channels: int = 1024,
        num_classes: int = 2,
        decoder_channels: Sequence[int] = (256, 128, 64, 64),
    ) -> None:
        super().__init__()
        skips = list(encoder_channels[:-1])[::-1]  # coarse to fine: F4, F3, F2, F1
        if len(decoder_channels) != len(skips):
            raise ValueError(
                f"UNetDecoder: need one decoder channel count per skip ({len(skips)} skips from encoder_channels="
                f"{tuple(encoder_channels)}), got decoder_channels={tuple(decoder_channels)}"
            )
        if num_classes < 1:
            raise ValueError(f"UNetDecoder: num_classes must be >= 1, got {num_classes}")
        self.encoder_channels: Tuple[int, ...] = tuple(int(c) for c in encoder_channels)
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        stages = []
        prev = self.in_channels
        for skip_ch, out_ch in zip(skips, decoder_channels):
            stages.append(DecoderStage(prev, skip_ch, int(out_ch)))
            prev = int(out_ch)
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(prev, self.num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor, skips: List[torch.Tensor]) -> torch.Tensor:
        """Decode.

        Args:
            x: ``[B, in_channels, h, w]`` bottleneck (at the resolution of the coarsest skip).
            skips: encoder features fine to coarse without the bottleneck, e.g. ``[F1, F2, F3, F4]``.

        Returns:
            ``[B, K, 2^n h, 2^n w]`` logits, n = number of skips (the input size for the ResNet-34 encoder).
        """
        if len(skips) != len(self.stages):
            raise ValueError(f"UNetDecoder: expected {len(self.stages)} skip features, got {len(skips)}")
        for stage, skip in zip(self.stages, reversed(skips)):
            x = stage(x, skip)
        return self.head(x)
