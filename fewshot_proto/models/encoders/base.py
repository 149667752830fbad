"""The encoder contract (every encoder in fewshot_proto follows it; decoders and prototype heads rely on nothing else).

An *encoder* is an ``nn.Module`` that turns an image batch into a pyramid of feature maps:

* ``forward(x)`` takes ``x`` of shape ``[B, C, H, W]`` (``C == encoder.in_channels``) and returns a ``list`` of
  tensors ordered **fine to coarse**: ``features[i]`` has shape
  ``[B, out_channels[i], H // reductions[i], W // reductions[i]]``. The input itself is *not* part of the list.
* ``out_channels``: ``tuple[int, ...]``, one entry per returned feature map.
* ``reductions``: ``tuple[int, ...]``, the spatial reduction factor of each feature map relative to the input
  (non-decreasing; a dilated last stage repeats the previous factor).
* ``output_stride``: the reduction of the last (coarsest) feature map, ``reductions[-1]``.
* ``input_multiple``: ``H`` and ``W`` must be multiples of this (``max(reductions)``) so that every feature map
  has exactly the stated size and a decoder can upsample back to the input size by factors of 2.
  ``check_input_shape(x)`` raises ``ValueError`` naming the nearest valid sizes otherwise.
* Pretrained weights are keyword-only and off by default (``weights=None``); an encoder never downloads.

Encoders are registered by name in ``ENCODERS`` (from the table ``ENCODER_ZOO``, on first use: importing a module
registers nothing) and built with ``build_encoder(name, **kwargs)``.

Example (ResNet-34 with a dilated last stage, 256x256 input)::

    enc = build_encoder("resnet34")
    feats = enc(torch.zeros(2, 3, 256, 256))
    [tuple(f.shape[1:]) for f in feats]
    # [(64, 128, 128), (64, 64, 64), (128, 32, 32), (256, 16, 16), (512, 16, 16)]
"""
from __future__ import annotations

import importlib
from typing import Any, List, Tuple

import torch
from torch import nn

from fewshot_proto.registry import Registry

__all__ = ["ENCODERS", "ENCODER_ZOO", "Encoder", "build_encoder", "nearest_valid_sizes"]

ENCODERS = Registry("encoder")

#: name -> (module, class) of every encoder fewshot_proto ships
ENCODER_ZOO: Tuple[Tuple[str, str, str], ...] = (
    ("resnet34", "fewshot_proto.models.encoders.resnet", "ResNet34Encoder"),
)


def nearest_valid_sizes(size: int, multiple: int) -> Tuple[int, int]:
    """The multiples of ``multiple`` just below (at least ``multiple``) and just above ``size``."""
    lower = max(multiple, (size // multiple) * multiple)
    upper = -(-size // multiple) * multiple
    return lower, max(upper, multiple)


class Encoder(nn.Module):
    """Base class implementing the bookkeeping part of the contract (see the module docstring).

    Subclasses set ``in_channels``, ``out_channels`` and ``reductions`` in ``__init__`` and implement
    ``forward(x[B, C, H, W]) -> list[Tensor]`` (fine to coarse).
    """

    in_channels: int
    out_channels: Tuple[int, ...]
    reductions: Tuple[int, ...]

    @property
    def output_stride(self) -> int:
        """Reduction factor of the coarsest feature map."""
        return int(self.reductions[-1])

    @property
    def input_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return int(max(self.reductions))

    def check_input_shape(self, x: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, H, W]`` with H, W multiples of ``input_multiple``."""
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__}: expected input [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__}: expected {self.in_channels} input channels, got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        m = self.input_multiple
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % m or w % m:
            hs, ws = nearest_valid_sizes(h, m), nearest_valid_sizes(w, m)
            raise ValueError(
                f"{type(self).__name__}: input height and width must be multiples of {m}, got {h}x{w}; "
                f"resize or pad to {hs[0] if h % m else h}x{ws[0] if w % m else w} or "
                f"{hs[1] if h % m else h}x{ws[1] if w % m else w}"
            )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError


def build_encoder(name: str, **kwargs: Any) -> Encoder:
    """Build a registered encoder; an unknown name raises ``KeyError`` listing the valid names."""
    for key, module, cls_name in ENCODER_ZOO:
        if key not in ENCODERS:
            ENCODERS.add(key, getattr(importlib.import_module(module), cls_name))
    return ENCODERS.build(name, **kwargs)
