"""Models: the model contract (``base``), encoders, prototype heads, decoders, the CWPA U-Nets and the baselines.

Every model is a ``models.base.FewShotSegmenter`` or ``SupervisedSegmenter`` (its ``kind`` says which) and is
registered by name in ``MODELS``. The zoo below is the one place names are given: importing a subpackage registers
nothing, and the modules are imported on the first ``build_model`` / ``list_models`` so that
``import fewshot_proto.models`` alone stays cheap.

    from fewshot_proto.models import build_model, list_models
    model = build_model("cwpa_unet_matcher", weights=None)

Your own model: subclass one of the two base classes and ``register_model("my_model", MyModel)``.
"""
from __future__ import annotations

import importlib
from typing import Any, List, Tuple

from fewshot_proto.registry import Registry

MODELS = Registry("model")

#: name -> (module, class): every model fewshot_proto ships
ZOO: Tuple[Tuple[str, str, str], ...] = (
    ("cwpa_unet", "fewshot_proto.models.fewshot", "CWPAUNet"),
    ("cwpa_unet_matcher", "fewshot_proto.models.fewshot", "CWPAUNetMatcher"),
    ("panet", "fewshot_proto.models.fsbaselines.panet", "PANet"),
    ("alpnet", "fewshot_proto.models.fsbaselines.alpnet", "ALPNet"),
    ("finetune", "fewshot_proto.models.fsbaselines.finetune", "FineTuneOnSupport"),
    ("maml_unet", "fewshot_proto.models.fsbaselines.maml", "MAMLSegmenter"),
    ("unet", "fewshot_proto.models.baselines.unet", "UNet"),
    ("resupnet", "fewshot_proto.models.baselines.resupnet", "ResUpNet"),
    ("mobilenet_aspp_se_unet", "fewshot_proto.models.baselines.mobilenet_aspp_se", "MobileNetASPPSEUNet"),
)
_loaded = False


def register_model(name: str, cls: Any) -> Any:
    """Register model class ``cls`` under ``name`` (a name already taken raises ``ValueError``); ``TypeError``
    unless it subclasses ``models.base.FewShotSegmenter`` or ``SupervisedSegmenter``."""
    from fewshot_proto.models.base import FewShotSegmenter, SupervisedSegmenter

    if not (isinstance(cls, type) and issubclass(cls, (FewShotSegmenter, SupervisedSegmenter))):
        raise TypeError(f"model {name!r}: {getattr(cls, '__qualname__', cls)!s} must subclass "
                        f"fewshot_proto.models.base.FewShotSegmenter or SupervisedSegmenter")
    MODELS.add(name, cls)
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for name, module, cls_name in ZOO:
        if name not in MODELS:
            register_model(name, getattr(importlib.import_module(module), cls_name))
    _loaded = True


def get_model_class(name: str) -> Any:
    """The class registered as ``name`` (its ``kind`` says which training loop it needs); unknown names raise
    ``UnknownNameError`` listing the valid ones."""
    _load_all()
    return MODELS.get(name)


def build_model(name: str, **kwargs: Any):
    """Build a registered model by name; unknown names raise ``KeyError`` listing valid names."""
    _load_all()
    return MODELS.build(name, **kwargs)


def list_models() -> List[str]:
    """Every registered model name (few-shot and supervised), sorted."""
    _load_all()
    return MODELS.names()


__all__ = ["MODELS", "ZOO", "build_model", "get_model_class", "list_models", "register_model"]
