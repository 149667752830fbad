"""The field's reference few-shot methods, reimplemented on the shared ResNet-34 encoder (issue 4, item 3).

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
    ================  =====================  ===============================================================

PANet and ALPNet expose the step methods ``encode`` / ``prototypes`` / ``segment`` (the evaluator's fast path and
the engine's cyclic loss use them; ``prototypes`` returns a ``ClassPrototypes(bg, fg)`` bundle that ``segment``
accepts). ``FineTuneOnSupport`` only has ``forward`` and says ``supports_cyclic = False``.
"""
from __future__ import annotations

from fewshot_proto.models.fsbaselines.alpnet import ALPNet, alpnet_prototypes, local_prototypes, mask_fraction
from fewshot_proto.models.fsbaselines.common import ClassPrototypes, PrototypeSegmenter, class_score
from fewshot_proto.models.fsbaselines.finetune import FineTuneOnSupport, read_base_checkpoint
from fewshot_proto.models.fsbaselines.panet import PANet, panet_prototypes

__all__ = [
    "ALPNet",
    "ClassPrototypes",
    "FineTuneOnSupport",
    "PANet",
    "PrototypeSegmenter",
    "alpnet_prototypes",
    "class_score",
    "local_prototypes",
    "mask_fraction",
    "panet_prototypes",
    "read_base_checkpoint",
]
