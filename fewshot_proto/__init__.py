"""fewshot_proto: few-shot, episodic segmentation of 3-D medical volumes.

Importing the package is cheap: no torch work, no data, no network. Heavy modules are imported on first use.

Public API (lazy):
    build_model(name, **kwargs), list_models()        -- fewshot_proto.models
    Volume, SliceIndex, Episode, SegOutput            -- fewshot_proto.types
"""
from __future__ import annotations

__version__ = "0.2.0"

__all__ = ["__version__", "build_model", "list_models", "Volume", "SliceIndex", "Episode", "SegOutput"]

_LAZY = {
    "build_model": ("fewshot_proto.models", "build_model"),
    "list_models": ("fewshot_proto.models", "list_models"),
    "Volume": ("fewshot_proto.types", "Volume"),
    "SliceIndex": ("fewshot_proto.types", "SliceIndex"),
    "Episode": ("fewshot_proto.types", "Episode"),
    "SegOutput": ("fewshot_proto.types", "SegOutput"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fewshot_proto' has no attribute {name!r}")
