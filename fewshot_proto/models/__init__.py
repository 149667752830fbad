"""Models: encoders (one contract), prototype modules, decoders, the few-shot model and the baselines.

Every model is an ``nn.Module`` with ``forward(support_img, support_mask, query_img) -> SegOutput``
(supervised baselines ignore the support) and is registered by name in ``MODELS``.

    from fewshot_proto.models import build_model, list_models
    model = build_model("cwpa_unet", weights=None)
"""
from __future__ import annotations

from typing import Any, List

from fewshot_proto.registry import Registry

MODELS = Registry("model")

# Submodules that register models; imported on first use of build_model / list_models so that
# ``import fewshot_proto.models`` alone stays cheap.
_MODEL_MODULES: List[str] = [
    "fewshot_proto.models.fewshot",
    "fewshot_proto.models.baselines",
    "fewshot_proto.models.fsbaselines",
]
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import importlib

    for m in _MODEL_MODULES:
        importlib.import_module(m)
    _loaded = True


def build_model(name: str, **kwargs: Any):
    """Build a registered model by name; unknown names raise ``KeyError`` listing valid names."""
    _load_all()
    return MODELS.build(name, **kwargs)


def list_models() -> List[str]:
    """Every registered model name (few-shot and supervised), sorted."""
    _load_all()
    return MODELS.names()


__all__ = ["MODELS", "build_model", "list_models"]
