"""Supervised baselines, in the same harness as the few-shot models (DESIGN.md section 4).

Registered in ``fewshot_proto.models.MODELS`` (the builder kwargs are the classes' keyword arguments):

    ============================  =======================  ======================================
    name                          class                    seed
    ============================  =======================  ======================================
    ``"unet"``                    ``UNet``                 003/004 (Ronneberger 2015)
    ``"resupnet"``                ``ResUpNet``             000 (residual U-Net, BraTS)
    ``"mobilenet_aspp_se_unet"``  ``MobileNetASPPSEUNet``  001 (MobileNetV2 + ASPP + SE decoder)
    ============================  =======================  ======================================

Each has ``kind = "supervised"``, ``forward(support_img, support_mask, query_img, class_id=None) -> SegOutput``
that ignores the support, ``segment_image(x) -> logits[B, 1 + K, H, W]`` for supervised training (K = 1, or
``len(classes)`` when built with ``classes=[...]``: one model for several target classes),
``binary_logits(x, class_id) -> logits[B, 2, H, W]`` for the harness, and ``config`` (its kwargs).
"""
from __future__ import annotations

from fewshot_proto.models import MODELS
from fewshot_proto.models.baselines.common import SupervisedSegmenter, count_parameters, nearest_valid_size
from fewshot_proto.models.baselines.mobilenet_aspp_se import MobileNetASPPSEUNet
from fewshot_proto.models.baselines.resupnet import ResUpNet
from fewshot_proto.models.baselines.unet import UNet

BASELINES = {
    "unet": UNet,
    "resupnet": ResUpNet,
    "mobilenet_aspp_se_unet": MobileNetASPPSEUNet,
}
for _name, _cls in BASELINES.items():
    if not (_name in MODELS and MODELS.get(_name) is _cls):  # a clash with another model still raises
        MODELS.add(_name, _cls)

__all__ = [
    "BASELINES",
    "MobileNetASPPSEUNet",
    "ResUpNet",
    "SupervisedSegmenter",
    "UNet",
    "count_parameters",
    "nearest_valid_size",
]
