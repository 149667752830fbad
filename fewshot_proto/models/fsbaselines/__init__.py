"""The field's reference few-shot methods (issue 4, items 3-4): prototype methods on the shared ResNet-34 encoder,
fine-tune-on-support and first-order MAML on a U-Net.

Registered in ``fewshot_proto.models.MODELS`` (builder kwargs = the classes' keyword arguments, kept in
``model.config``):

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

PANet and ALPNet expose the step methods ``encode`` / ``prototypes`` / ``segment`` (the evaluator's fast path and
the engine's cyclic loss use them; ``prototypes`` returns a ``ClassPrototypes(bg, fg)`` bundle that ``segment``
accepts). ``FineTuneOnSupport`` and ``MAMLSegmenter`` only have ``forward`` and say ``supports_cyclic = False``.
learn2learn is optional: this package imports without it; building ``"maml_unet"`` without it raises
``Learn2LearnMissing`` (an ``ImportError``) whose message gives the install recipe.
"""
from __future__ import annotations

from fewshot_proto.models.fsbaselines.alpnet import ALPNet, alpnet_prototypes, local_prototypes, mask_fraction
from fewshot_proto.models.fsbaselines.common import (ADAPTATION_LOSSES, AdaptationCache, ClassPrototypes,
                                                    PrototypeSegmenter, adaptation_loss, class_score)
from fewshot_proto.models.fsbaselines.finetune import FineTuneOnSupport, read_base_checkpoint
from fewshot_proto.models.fsbaselines.maml import Learn2LearnMissing, MAMLSegmenter
from fewshot_proto.models.fsbaselines.panet import PANet, panet_prototypes

__all__ = [
    "ADAPTATION_LOSSES",
    "AdaptationCache",
    "adaptation_loss",
    "ALPNet",
    "ClassPrototypes",
    "FineTuneOnSupport",
    "Learn2LearnMissing",
    "MAMLSegmenter",
    "PANet",
    "PrototypeSegmenter",
    "alpnet_prototypes",
    "class_score",
    "local_prototypes",
    "mask_fraction",
    "panet_prototypes",
    "read_base_checkpoint",
]
