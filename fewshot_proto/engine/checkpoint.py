"""Checkpoints: written atomically, loaded with ``weights_only=True``, checked against the model.

A checkpoint is a plain dict of tensors and primitive values (so ``torch.load(..., weights_only=True)`` can read
it)::

    {"format": 1, "package_version": "0.1.0", "model_name": "cwpa_unet", "model_config": {...},
     "model": state_dict, "optimizer": ..., "scheduler": ..., "step": 200,
     "rng": {"torch": ByteTensor, "numpy": {...}, "python": [...], "cuda": [...]},
     "config": resolved ExperimentConfig as a dict, "metrics": {...}}

Writing goes to a temporary file beside the target (``<name>.<pid>.<random>.tmp``, unique per writer), is
fsync'ed, then ``os.replace``d over the target, so an interrupted write never leaves a truncated checkpoint
behind and a failed write leaves the previous file as it was. A checkpoint with a NaN or infinite tensor is never
written (:class:`NonFiniteCheckpointError` naming the tensors): it could only replace good weights with broken
ones.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from fewshot_proto import __version__
from fewshot_proto.errors import CheckpointError
from fewshot_proto.models import build_model
from fewshot_proto.models.legacy import upgrade_checkpoint
from fewshot_proto.models.weights import read_torch_file

__all__ = ["save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "model_from_checkpoint",
           "nonfinite_tensors", "NonFiniteCheckpointError", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
_REQUIRED = ("format", "model_name", "model_config", "model")


class NonFiniteCheckpointError(CheckpointError):
    """``save_checkpoint`` refused to write: a model or optimiser tensor holds NaN or inf."""


def rng_state() -> Dict[str, Any]:
    """Every global RNG state the training loop depends on (torch CPU/CUDA, numpy legacy, python)."""
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(_py_state_to_list(random.getstate())),
        "numpy_legacy": _np_legacy_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_py_state_from_list(state["python"]))
    if "numpy_legacy" in state:
        s = state["numpy_legacy"]
        np.random.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(st):
    version, internal, gauss = st
    return [version, list(internal), gauss]


def _py_state_from_list(st):
    version, internal, gauss = st
    return (version, tuple(internal), gauss)


def _np_legacy_state() -> Dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def nonfinite_tensors(tree: Any, prefix: str = "") -> list:
    """Dotted names of the floating-point tensors in ``tree`` (nested dicts/lists of tensors) with a NaN or inf."""
    bad = []
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            if not bool(torch.isfinite(tree).all()):
                bad.append(prefix or "tensor")
    elif isinstance(tree, dict):
        for k, v in tree.items():
            bad += nonfinite_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            bad += nonfinite_tensors(v, f"{prefix}.{i}" if prefix else str(i))
    return bad


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, model_name: str,
                    model_config: Dict[str, Any], step: int, optimizer: Any = None, scheduler: Any = None,
                    config: Optional[Dict[str, Any]] = None, sampler_state: Optional[Dict[str, Any]] = None,
                    metrics: Optional[Dict[str, Any]] = None) -> Path:
    """Write a checkpoint atomically and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = model.module if hasattr(model, "module") else model
    payload: Dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "package_version": __version__,
        "model_name": model_name,
        "model_config": dict(model_config),
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "step": int(step),
        "rng": rng_state(),
        "config": config or {},
        "sampler": sampler_state or {},
        "metrics": metrics or {},
    }
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        payload["scheduler"] = scheduler.state_dict()
    bad = nonfinite_tensors(payload["model"], "model") + nonfinite_tensors(payload.get("optimizer"), "optimizer")
    if bad:
        raise NonFiniteCheckpointError(f"checkpoint {path} not written: {len(bad)} tensor(s) hold NaN or inf "
                                       f"(e.g. {', '.join(bad[:3])})")
    fd, tmp_name = tempfile.mkstemp(prefix=f"{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would carry over to the checkpoint
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, *, expect_model: Optional[str] = None,
                    map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; raise ``CheckpointError`` naming the file and the problem."""
    path = Path(path)
    ckpt = read_torch_file(path, "checkpoint", map_location)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in _REQUIRED):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} is not a fewshot_proto checkpoint (found {keys}; "
                              f"expected keys {list(_REQUIRED)})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {ckpt['format']}, this version reads "
                              f"{CHECKPOINT_FORMAT}")
    ckpt = upgrade_checkpoint(ckpt, path)
    if expect_model is not None and ckpt["model_name"] != expect_model:
        raise CheckpointError(f"checkpoint {path} holds model {ckpt['model_name']!r}, not {expect_model!r}")
    return ckpt


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str | Path) -> None:
    """``model.load_state_dict(state)`` with an error that lists missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state)


def model_from_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu",
                          expect_model: Optional[str] = None):
    """Rebuild the model stored in a checkpoint: returns ``(model, checkpoint_dict)``."""
    ckpt = load_checkpoint(path, expect_model=expect_model, map_location=map_location)
    try:
        model = build_model(ckpt["model_name"], **ckpt["model_config"])
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path}: {e.args[0]}") from None
    load_model_state(model, ckpt["model"], path)
    model.eval()
    return model, ckpt
