"""Decoders that read an encoder's feature pyramid (see ``models/encoders/base.py``)."""
from __future__ import annotations

from fewshot_proto.models.decoders.unet import ConvBNReLU, DecoderStage, UNetDecoder

__all__ = ["ConvBNReLU", "DecoderStage", "UNetDecoder"]
