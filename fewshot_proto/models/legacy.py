"""Model entries written by earlier versions, in today's names: what a checkpoint (or a fine-tune base) recorded as
``(model name, kwargs)`` is translated here, or refused with a message naming the change.

Changes in 0.2:

* ``cwpa_unet`` took ``prototype_head`` (default ``"f5"``), ``head_dim``, ``head_scaler``, ``head_guide`` and
  ``norm``. Its two variants are now two models with the same state-dict layout: ``prototype_head="f5"`` (or not
  given) is ``cwpa_unet_matcher`` (``head_dim`` -> ``matcher_dim``, ``head_scaler`` -> ``matcher_scaler``),
  ``prototype_head=None`` is ``cwpa_unet``. ``prototype_head="hypercolumn"``, ``head_guide=True`` and
  ``norm="group"`` were removed (their experiments lost): such an entry cannot be rebuilt.
* ``unet`` took ``batch_norm: bool``; it now takes ``norm: "none" | "batch"`` (the vocabulary MAML uses too).
  The same holds for a fine-tune model's ``base_kwargs`` when its base is a ``unet``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Tuple, Union

from fewshot_proto.errors import CheckpointError

__all__ = ["upgrade_model_entry", "upgrade_checkpoint"]


def _cwpa(kwargs: Mapping[str, Any], where: str) -> Tuple[str, Dict[str, Any]]:
    kw = dict(kwargs)
    head = kw.pop("prototype_head", "f5")
    removed = []
    if kw.pop("head_guide", False):
        removed.append("head_guide=True")
    norm = kw.pop("norm", "batch")
    if norm != "batch":
        removed.append(f"norm={norm!r}")
    if head not in (None, "f5"):
        removed.append(f"prototype_head={head!r}")
    if removed:
        raise CheckpointError(f"{where}: its cwpa_unet was built with {', '.join(removed)}, an option removed in 0.2 "
                              f"(the experiments that used it lost); it cannot be rebuilt")
    dim, scaler = kw.pop("head_dim", None), kw.pop("head_scaler", None)
    if head is None:
        return "cwpa_unet", kw
    if dim is not None:
        kw["matcher_dim"] = dim
    if scaler is not None:
        kw["matcher_scaler"] = scaler
    return "cwpa_unet_matcher", kw


def _unet(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    kw = dict(kwargs)
    if "batch_norm" in kw:
        kw["norm"] = "batch" if kw.pop("batch_norm") else "none"
    return kw


def upgrade_model_entry(name: str, kwargs: Mapping[str, Any], where: Union[str, Path],
                        legacy_cwpa: bool = False) -> Tuple[str, Dict[str, Any]]:
    """Today's ``(name, kwargs)`` of a model entry (a full ``model_config`` or an experiment's partial
    ``model.kwargs``). ``legacy_cwpa``: the entry was written before 0.2, so a ``cwpa_unet`` is the old model with
    its default matcher head (today's ``cwpa_unet`` entries are left alone). ``where`` names the file in errors."""
    where = str(where)
    if name == "cwpa_unet" and legacy_cwpa:
        return _cwpa(kwargs, where)
    if name == "unet":
        return name, _unet(kwargs)
    if name == "finetune" and kwargs.get("base", "unet") == "unet" and isinstance(kwargs.get("base_kwargs"), Mapping):
        return name, dict(kwargs, base_kwargs=_unet(kwargs["base_kwargs"]))
    return name, dict(kwargs)


def upgrade_checkpoint(ckpt: Dict[str, Any], path: Union[str, Path]) -> Dict[str, Any]:
    """The checkpoint dict with its model entry and its training config's ``model`` section in today's names;
    ``upgraded_from`` holds the old model name when anything changed. A ``cwpa_unet`` written before 0.2 is
    recognised by ``prototype_head`` in its full model config (today's has none)."""
    legacy_cwpa = ckpt["model_name"] == "cwpa_unet" and "prototype_head" in ckpt["model_config"]
    where = f"checkpoint {path}"
    name, config = upgrade_model_entry(ckpt["model_name"], ckpt["model_config"], where, legacy_cwpa)
    if name == ckpt["model_name"] and config == dict(ckpt["model_config"]):
        return ckpt
    out = dict(ckpt, model_name=name, model_config=config, upgraded_from=ckpt["model_name"])
    section = (ckpt.get("config") or {}).get("model")
    if section:
        run_name, run_kwargs = upgrade_model_entry(section.get("name", ""), section.get("kwargs") or {}, where,
                                                   legacy_cwpa)
        out["config"] = dict(ckpt["config"], model={"name": run_name, "kwargs": run_kwargs})
    return out
