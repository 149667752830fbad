"""Encoders: one contract (see ``base.py``), registered by name in ``ENCODERS``."""
from __future__ import annotations

from fewshot_proto.models.encoders.base import ENCODERS, Encoder, build_encoder, nearest_valid_sizes
from fewshot_proto.models.encoders.resnet import ResNet34Encoder, imagenet_weights_path

__all__ = ["ENCODERS", "Encoder", "build_encoder", "nearest_valid_sizes", "ResNet34Encoder", "imagenet_weights_path"]
