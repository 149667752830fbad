"""The field's reference few-shot methods: prototype methods on the shared ResNet-34 encoder, fine-tune-on-support
and first-order MAML on a U-Net.

Registered in ``fewshot_proto.models.MODELS`` by ``models/__init__.py`` (importing this package registers nothing;
builder kwargs = the classes' keyword arguments, kept in ``model.config``):

    ================  =====================  ===============================================================
    name              class                  method
    ================  =====================  ===============================================================
    ``"panet"``       ``PANet``              Wang et al., ICCV 2019: one fg / one bg prototype (masked
                                             average pooling), 20 x cosine; PAR alignment loss in the engine
    ``"alpnet"``      ``ALPNet``             Ouyang et al., ECCV 2020 (SSL-ALPNet): adaptive local
                                             prototype pooling + global prototypes, soft-max-weighted scores
    ``"finetune"``    ``FineTuneOnSupport``  a pretrained segmentation network (default ``unet``) copied and
                                             fine-tuned on the support of every episode
    ``"maml_unet"``   ``MAMLSegmenter``      Finn et al., ICML 2017, first order: a binary U-Net meta-trained
                                             by the episodic trainer with learn2learn's ``MAML``; a clone is
                                             adapted on the support of every episode (needs learn2learn)
    ================  =====================  ===============================================================

PANet and ALPNet are ``PrototypeSegmenter``s (``prototypes`` returns a ``ClassPrototypes(bg, fg)`` bundle);
``FineTuneOnSupport`` and ``MAMLSegmenter`` are ``AdaptingSegmenter``s (``prototypes`` returns the adapted network;
no feature losses). learn2learn is optional: this package imports without it; building ``"maml_unet"`` without it
raises ``Learn2LearnMissing`` (an ``ImportError``) whose message gives the install recipe.
"""
from __future__ import annotations

from fewshot_proto.models.fsbaselines.alpnet import ALPNet
from fewshot_proto.models.fsbaselines.common import (ADAPTATION_LOSSES, AdaptationCache, Adapted, AdaptingSegmenter,
                                                    PrototypeSegmenter, adaptation_loss)
from fewshot_proto.models.fsbaselines.finetune import FineTuneOnSupport
from fewshot_proto.models.fsbaselines.maml import Learn2LearnMissing, MAMLSegmenter
from fewshot_proto.models.fsbaselines.panet import PANet

__all__ = [
    "ADAPTATION_LOSSES",
    "AdaptationCache",
    "Adapted",
    "AdaptingSegmenter",
    "ALPNet",
    "FineTuneOnSupport",
    "Learn2LearnMissing",
    "MAMLSegmenter",
    "PANet",
    "PrototypeSegmenter",
    "adaptation_loss",
]
