"""Supervised baselines, in the same harness as the few-shot models (DESIGN.md section 4).

Registered in ``fewshot_proto.models.MODELS`` by ``models/__init__.py`` (importing this package registers nothing;
the builder kwargs are the classes' keyword arguments):

    ============================  =======================  ======================================
    name                          class                    seed
    ============================  =======================  ======================================
    ``"unet"``                    ``UNet``                 003/004 (Ronneberger 2015)
    ``"resupnet"``                ``ResUpNet``             000 (residual U-Net, BraTS)
    ``"mobilenet_aspp_se_unet"``  ``MobileNetASPPSEUNet``  001 (MobileNetV2 + ASPP + SE decoder)
    ============================  =======================  ======================================

Each is a ``models.base.SupervisedSegmenter``: ``forward(support_img, support_mask, query_img, class_id=None)``
ignores the support, ``segment_image(x) -> logits[B, 1 + K, H, W]`` is what supervised training calls (K = 1, or
``len(classes)`` when built with ``classes=[...]``: one model for several target classes).
"""
from __future__ import annotations

from fewshot_proto.models.baselines.common import count_parameters
from fewshot_proto.models.baselines.mobilenet_aspp_se import MobileNetASPPSEUNet
from fewshot_proto.models.baselines.resupnet import ResUpNet
from fewshot_proto.models.baselines.unet import UNet

__all__ = ["MobileNetASPPSEUNet", "ResUpNet", "UNet", "count_parameters"]
