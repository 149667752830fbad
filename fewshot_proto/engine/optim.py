"""The optimiser and learning-rate schedule of ``cfg.train`` (``optimizer``, ``lr``, ``scheduler``, warm-up)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from fewshot_proto.errors import ConfigError

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(params, t, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer``. Adam and AdamW use the fused kernel on CPU and CUDA: one pass over
    each parameter instead of about ten elementwise ops (the default on CPU is the per-tensor loop)."""
    name = t.optimizer.lower()
    fused = {"fused": True} if device is not None and device.type in ("cpu", "cuda") else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    raise ConfigError(f"train.optimizer must be sgd, adam or adamw, not {t.optimizer!r}")


def build_scheduler(opt, t):
    """The per-step LR schedule of ``train.scheduler`` (step, cosine or none), after ``train.warmup_iters`` steps
    of linear warm-up."""
    warm = max(0, int(t.warmup_iters))
    name = t.scheduler.lower()
    if name == "step":
        base = lambda i: t.lr_gamma ** (i // max(1, t.lr_step))  # noqa: E731
    elif name == "cosine":
        base = lambda i: 0.5 * (1 + math.cos(math.pi * min(i, t.iters) / max(1, t.iters)))  # noqa: E731
    elif name == "none":
        base = lambda i: 1.0  # noqa: E731
    else:
        raise ConfigError(f"train.scheduler must be step, cosine or none, not {t.scheduler!r}")
    fn = (lambda i: base(i) * min(1.0, (i + 1) / warm)) if warm else base  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)
