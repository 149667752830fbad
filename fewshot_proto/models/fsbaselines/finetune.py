"""Fine-tune-on-support: the simplest few-shot baseline (DESIGN.md section 4, "the fine-tune variant").

A segmentation network pretrained on the training classes (the *base*) is copied for every episode; the copy is
trained for a few steps on the support slices of the new class (random flips as augmentation) and then segments
the query. The base weights are never touched (learn2learn's ``clone()`` / ``adapt()`` idea, here a
``copy.deepcopy`` of the base per support set).

How it is trained: it is not, episodically. ``FineTuneOnSupport`` has no parameters of its own; its only
parameters are the base's, which are pretrained separately (for example ``unet`` trained on labelled slices of
the training classes) and loaded with ``checkpoint=<path>``. The base must be binary (two logits: background,
foreground). A multi-class pretrained network (``classes=[...]``, ``1 + K`` logits) is used with
``reinit_head=True``: the base is built binary and every checkpoint tensor whose shape does not fit (the output
layer) keeps its fresh initialisation, the classical "pretrain on the base classes, fine-tune a new binary head
and the whole network on the support" baseline. A forward in ``train()`` mode adapts a copy exactly
as in ``eval()`` mode; gradients of a loss on its output reach only that discarded copy, so running the episodic
trainer on ``finetune`` changes nothing (it is allowed so that every registered model goes through the same
harness). ``kind`` is ``"fewshot"`` because it needs the support; ``supports_cyclic = False`` because it has no
prototype steps.

Adaptation details (deterministic: the flips come from a generator seeded with ``seed`` at every call):

* the copy is adapted in ``eval()`` mode: batch-norm layers keep the base's running statistics and dropout is
  off (a handful of support slices would otherwise overwrite the statistics);
* every step uses all S support slices, each flipped left-right and/or up-down with probability 1/2;
* loss on the two logits ``[bg, fg]``: ``"dice_bce"`` (0.8 soft Dice + 0.2 BCE on ``z = fg - bg``, which is the
  foreground softmax's logit), ``"ce"`` or ``"dice"`` (soft Dice of the foreground softmax);
* optimiser: Adam (or SGD with momentum 0.9), ``steps`` steps at ``lr``, in float32 with autocast off;
* a supervised base (with ``segment_image``) is trained as ``segment_image(flipped support) -> support mask``;
  a few-shot base as the episode ``(support, support mask, flipped support) -> flipped support mask``
  (support and query made from the same slices, like SSL-ALPNet's self-supervised episodes).

It works under ``torch.inference_mode()`` (the evaluator wraps everything in it): the adaptation runs inside
``torch.inference_mode(False)`` + ``torch.enable_grad()`` on clones of the inputs; the query is then segmented
in the caller's mode. In ``eval()`` mode without grad the copies adapted to the last ``cache_size`` support sets
are kept (``AdaptationCache``: keyed by the support tensors and the base weights' identity and version counters),
so each support chunk of an evaluation adapts once, however many query scans and slice batches reuse it.

    model = build_model("finetune", base="unet", base_kwargs={"base_channels": 64}, checkpoint="unet.pt")
    out = model(support_img, support_mask, query_img)   # logits [Q, 2, H, W]
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from fewshot_proto.errors import CheckpointError
from fewshot_proto.models import build_model
from fewshot_proto.models.base import SupervisedSegmenter
from fewshot_proto.models.checks import check_positive_number
from fewshot_proto.models.fsbaselines.common import (ADAPTATION_LOSSES, AdaptationCache, Adapted, AdaptingSegmenter,
                                                    adaptation_loss)
from fewshot_proto.models.legacy import upgrade_model_entry
from fewshot_proto.models.weights import read_state_file

__all__ = ["FineTuneOnSupport", "LOSSES", "OPTIMIZERS"]

LOSSES = ADAPTATION_LOSSES
OPTIMIZERS = ("adam", "sgd")


def _flip(x: torch.Tensor, m: torch.Tensor, flips: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Flip slice ``i`` of ``x[S, C, H, W]`` and ``m[S, H, W]``: left-right if ``flips[i, 0]``, up-down if
    ``flips[i, 1]`` (``flips`` is ``[S, 2]`` of 0/1)."""
    xs, ms = [], []
    for i in range(x.shape[0]):
        dims = [d for d, f in zip((-1, -2), flips[i].tolist()) if f]
        xs.append(torch.flip(x[i], dims) if dims else x[i])
        ms.append(torch.flip(m[i], dims) if dims else m[i])
    return torch.stack(xs), torch.stack(ms)


class FineTuneOnSupport(AdaptingSegmenter):
    """Adapt a copy of a pretrained segmentation network on the support, then segment the query with it.

    Args:
        base: registered model name of the network to adapt (``"unet"`` by default; any supervised baseline, or a
            few-shot model).
        base_kwargs: builder kwargs of the base. ``None``: the ``model_config`` stored in ``checkpoint`` when it
            is a fewshot_proto checkpoint, else the base's defaults.
        steps: adaptation steps per support set (0: the base as it is).
        lr: learning rate of the adaptation.
        checkpoint: path to pretrained base weights (read with ``weights_only=True``; a fewshot_proto checkpoint
            of the base model, ``{"state_dict": ...}`` or a bare state dict). ``None``: the base's initialisation.
        reinit_head: build the base binary (``classes=None`` when ``base_kwargs`` has ``classes``) and leave the
            checkpoint tensors whose shapes do not fit (the output layer of a multi-class network) at their
            initialisation; their names are in ``reinitialised``.
        loss: ``"dice_bce"`` (default), ``"ce"`` or ``"dice"``.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (momentum 0.9).
        flips: random left-right / up-down flips of the support at every step.
        seed: seed of the flip generator (re-seeded at every call: same support -> same adapted copy).
        cache_support: in ``eval()`` mode without grad, keep the copies adapted to the last ``cache_size``
            support sets (an :class:`~fewshot_proto.models.fsbaselines.common.AdaptationCache`).
        cache_size: how many adapted copies to keep (each as large as the base).

    Attributes:
        ``base``: the pretrained network (the only parameters; never modified by ``forward``); ``config``: builder
            kwargs (``base_kwargs`` as resolved; ``checkpoint`` always ``None``: a fewshot_proto checkpoint of this
            model holds the base weights in its state dict);
            ``init_checkpoint``: the checkpoint actually read; ``reinitialised``: base state keys not taken from
            it (``reinit_head``); ``adaptations``: number of adaptations run.

    Shapes: ``forward(support_img[S, C, H, W], support_mask[S, H, W], query_img[Q, C, H, W])`` ->
    ``SegOutput(logits[Q, 2, H, W])``.

    Raises:
        ValueError: bad arguments (unknown loss or optimiser, non-positive lr, negative steps, ``base="finetune"``),
            or a multi-class base without ``reinit_head``.
        CheckpointError: an unreadable checkpoint, one of another model, or weights that do not fit the base.
    """

    def __init__(
        self,
        base: str = "unet",
        base_kwargs: Optional[Dict[str, Any]] = None,
        steps: int = 20,
        lr: float = 1e-3,
        checkpoint: Union[None, str, Path] = None,
        loss: str = "dice_bce",
        optimizer: str = "adam",
        flips: bool = True,
        seed: int = 0,
        cache_support: bool = True,
        reinit_head: bool = False,
        cache_size: int = 8,
    ) -> None:
        super().__init__()
        if not isinstance(base, str) or base == "finetune":
            raise ValueError(f"FineTuneOnSupport: base must be the name of another registered model, got {base!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"FineTuneOnSupport: steps must be an integer >= 0, got {steps!r}")
        check_positive_number("lr", lr, "FineTuneOnSupport")
        if loss not in LOSSES:
            raise ValueError(f"FineTuneOnSupport: loss must be one of {LOSSES}, got {loss!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"FineTuneOnSupport: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"FineTuneOnSupport: seed must be an integer, got {seed!r}")
        if base_kwargs is not None and not isinstance(base_kwargs, Mapping):
            raise ValueError(f"FineTuneOnSupport: base_kwargs must be a mapping or None, got {base_kwargs!r}")

        state = None
        if checkpoint is not None:
            state, ck_name, ck_config = read_state_file(checkpoint, "finetune: base checkpoint")
            if ck_name is not None and ck_config is not None:  # written by an earlier version: today's names
                ck_name, ck_config = upgrade_model_entry(ck_name, ck_config, f"finetune: base checkpoint {checkpoint}",
                                                         legacy_cwpa="prototype_head" in ck_config)
            if ck_name is not None and ck_name != base:
                raise CheckpointError(
                    f"finetune: checkpoint {checkpoint} holds model {ck_name!r}, not the base {base!r}"
                )
            if base_kwargs is None and ck_config is not None:
                base_kwargs = ck_config
        kwargs = dict(base_kwargs or {})
        if reinit_head and kwargs.get("classes") is not None:
            kwargs["classes"] = None
        self.base = build_model(base, **kwargs)
        classes = getattr(self.base, "classes", None)
        if classes is not None and len(classes) > 1:
            raise ValueError(
                f"FineTuneOnSupport: base {base!r} segments {len(classes)} classes {list(classes)}; fine-tuning needs "
                f"a binary base: pass reinit_head=True to build it binary and re-initialise its output layer"
            )
        self.reinitialised: List[str] = []
        if state is not None:
            self._load_base(state, checkpoint, partial=bool(reinit_head))
        self._resolved_base_kwargs = dict(getattr(self.base, "config", None) or base_kwargs or {})
        self.init_checkpoint = None if checkpoint is None else str(checkpoint)
        self.steps = int(steps)
        self.lr = float(lr)
        self.loss = loss
        self.optimizer = optimizer
        self.flips = bool(flips)
        self.seed = int(seed)
        self.cache_support = bool(cache_support)
        self.adaptations = 0
        self._cache = AdaptationCache(cache_size)

    def _resolve_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """``base_kwargs`` as the base was built; ``checkpoint`` ``None`` (this model's state dict holds the base)."""
        return dict(config, base_kwargs=self._resolved_base_kwargs, checkpoint=None)

    @property
    def input_multiple(self) -> int:
        return int(self.base.input_multiple)

    def check_input(self, x: torch.Tensor) -> None:
        """A supervised base checks channels and size here; a few-shot base checks them in its own ``encode``."""
        if isinstance(self.base, SupervisedSegmenter):
            self.base.check_input(x)

    def _cache_owner(self) -> nn.Module:
        return self.base

    def _load_base(self, state: Dict[str, torch.Tensor], path: Union[str, Path], partial: bool) -> None:
        """Load ``state`` into the base; ``partial``: skip (and record) tensors whose shapes do not fit."""
        own = self.base.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or (shapes and not partial):
            raise CheckpointError(
                f"finetune: checkpoint {path} does not fit base {type(self.base).__name__} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatches {shapes[:3]}); "
                f"pass the base_kwargs it was trained with"
                + ("" if partial else " (or reinit_head=True for a multi-class checkpoint)")
            )
        if partial and len(shapes) == len(own):
            raise CheckpointError(f"finetune: no tensor of checkpoint {path} fits base {type(self.base).__name__}")
        self.base.load_state_dict({k: (own[k] if k in shapes else v) for k, v in state.items()})
        self.reinitialised = list(shapes)

    # ---- adaptation ---------------------------------------------------------------------------------------
    @staticmethod
    def _logits(net: nn.Module, s_img: torch.Tensor, s_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x[B, C, H, W]`` -> logits ``[B, 2, H, W]`` of ``net`` (a few-shot net gets the support too)."""
        if hasattr(net, "segment_image"):
            return net.segment_image(x)
        return net(s_img, s_mask, x).logits

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return adaptation_loss(logits, target, self.loss)

    def adapt(self, support_img: torch.Tensor, support_mask: torch.Tensor) -> nn.Module:
        """A copy of ``base`` trained ``steps`` steps on the support (``base`` itself is not modified).

        Args:
            support_img: ``[S, C, H, W]`` (inference tensors allowed).
            support_mask: ``[S, H, W]`` (> 0.5 is foreground).

        Returns:
            The adapted copy, in ``eval()`` mode. Only the base's trainable parameters are adapted; in the copy they
            require grad only if grad mode was on at the call (parameters frozen in the base stay frozen).
        """
        outer_grad = torch.is_grad_enabled()
        with torch.inference_mode(False), torch.enable_grad():
            x = support_img.detach().clone()
            m_soft = support_mask.detach().clone().float()
            m = (m_soft > 0.5).long()
            net = copy.deepcopy(self.base)
            net.eval()
            # parameters the base freezes (e.g. a pretrained MobileNetV2 encoder) stay frozen in the copy
            params = [p for p in net.parameters() if p.requires_grad]
            for p in net.parameters():
                p.grad = None
            if self.steps > 0 and params:
                if self.optimizer == "adam":
                    opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=self.lr)
                else:
                    opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9)
                g = torch.Generator().manual_seed(self.seed)
                with torch.autocast(device_type=x.device.type, enabled=False):
                    for _ in range(self.steps):
                        flips = torch.randint(0, 2, (x.shape[0], 2), generator=g)
                        if self.flips:
                            xi, mi = _flip(x, m, flips)
                        else:
                            xi, mi = x, m
                        loss = self._loss(self._logits(net, x, m_soft, xi), mi)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
            for p in params:
                p.grad = None
                p.requires_grad_(outer_grad)
        self.adaptations += 1
        return net

    def _segment_with(self, adapted: Adapted, query_img: torch.Tensor) -> torch.Tensor:
        """The adapted copy on the query (in the caller's grad / inference mode)."""
        return self._logits(adapted.net, adapted.support_img, adapted.support_mask, query_img)

    def extra_repr(self) -> str:
        return (
            f"steps={self.steps}, lr={self.lr}, loss={self.loss!r}, optimizer={self.optimizer!r}, "
            f"flips={self.flips}, seed={self.seed}, init_checkpoint={self.init_checkpoint!r}"
        )
