"""First-order MAML for the U-Net (Finn et al., ICML 2017), built on ``learn2learn.algorithms.MAML``.

The model is a binary U-Net (``build_model("unet", ...)``, two logits ``[bg, fg]``) wrapped in
``l2l.algorithms.MAML(net, lr=inner_lr, first_order=True)``. Every forward adapts a *clone* of the base network
(learn2learn's ``clone()``) ``inner_steps`` plain gradient steps on the support (``adapt()``), then segments the
query with the clone. The base weights are only ever changed by the caller's optimiser.

How it trains: with the standard episodic trainer, unchanged. In a forward with grad enabled the clone is
connected to the base parameters by the autograd graph (``clone()`` is ``p.clone()``; an inner step is
``p' = p - inner_lr * g`` with ``g`` detached, since ``first_order=True``), so the trainer's query loss
(``episode_losses``: cross-entropy on ``out.logits``) backpropagates to the base through the identity Jacobian
of the first-order update: that gradient *is* the FOMAML meta-gradient, and ``optimizer.step()`` is the outer
(meta) update. ``first_order=False`` keeps the inner graph (``create_graph=True``): full second-order MAML, far
more memory, rarely worth it for a U-Net.

How it evaluates: the evaluator runs everything under ``torch.inference_mode()``. A forward without grad (or in
inference mode) clones the base *without* a graph (under ``no_grad``), makes the clone's tensors trainable leaves
and adapts it inside ``torch.inference_mode(False)`` + ``torch.enable_grad()`` on clones of the inputs (as
``finetune`` does), so nothing reaches the base: its state dict is bit-identical afterwards (tested). The query
is segmented in the caller's mode. Without grad and in ``eval()`` mode the clones adapted to the last
``cache_size`` support sets are kept (``AdaptationCache``: keyed by the support tensors and the base tensors'
identity and version counters), so each support chunk of an evaluation adapts once.

Inner loop: every step uses all S support slices; loss ``"dice_bce"`` (default: 0.8 soft Dice + 0.2 BCE on
``z = fg - bg``, insensitive to how small the organ is), ``"ce"`` or ``"dice"`` (the same choices as
``finetune``), in float32 with autocast off (a few large steps in bf16 are not worth the risk); the query
forward runs in the caller's autocast.

Normalisation (``norm``): MAML needs it. Without any (``norm="none"``, the plain U-Net) the inner SGD steps on a
Kaiming-initialised U-Net are badly conditioned and meta-training diverges within a few dozen steps (measured:
the base's own support loss grows while one large inner step compensates, until the inner loop blows up); with
normalisation the same runs fall steadily. Running statistics are never kept, for two reasons: (1)
learn2learn's ``clone()`` clones parameters but *shares* buffers that do not require grad, so a clone running
batch norm in train mode would write its support statistics into the base's buffers, changing the base during
evaluation; (2) running statistics would only ever be updated on the discarded clones, so the base's would be
meaningless. Hence:

* ``"instance"`` (default): the U-Net's BN layers become ``InstanceNorm2d(affine=True)`` (same ``weight`` /
  ``bias`` parameters), i.e. batch norm over a single slice: every slice is normalised with its own per-channel
  statistics, so a prediction never depends on the other slices of a batch (the evaluator's ``batch_size``);
* ``"batch"``: batch norm without running statistics (``track_running_stats=False``, no buffers), always
  normalising with the statistics of the batch it is given, in training and evaluation alike: the
  "transductive" batch norm of Finn et al.'s reference MAML (a query slice's prediction then depends on the
  other query slices of its batch);
* ``"none"``: the paper's U-Net, no normalisation (unstable, see above; kept for comparison).

    model = build_model("maml_unet", base_channels=16, inner_steps=5, inner_lr=0.05)
    out = model(support_img, support_mask, query_img)   # logits [Q, 2, H, W]

learn2learn is optional: importing this module never imports it; building the model does, and raises
:class:`Learn2LearnMissing` (an ``ImportError``) with the install recipe when it is absent.
"""
from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

import torch
from torch import nn

from fewshot_proto.errors import FewShotError
from fewshot_proto.models import build_model
from fewshot_proto.models.checks import check_positive_number
from fewshot_proto.models.fsbaselines.common import (ADAPTATION_LOSSES, AdaptationCache, Adapted, AdaptingSegmenter,
                                                    adaptation_loss)

__all__ = ["MAMLSegmenter", "Learn2LearnMissing", "import_learn2learn", "INSTALL_RECIPE", "LOSSES"]

LOSSES = ADAPTATION_LOSSES

#: the only install that works for learn2learn 0.2.0 on Python 3.11 (no wheel; its shipped C sources do not
#: compile, so Cython regenerates them; --no-deps because its declared dependencies would downgrade numpy)
INSTALL_RECIPE = (
    "pip install cython wheel gym requests\n"
    "pip install --no-deps --no-build-isolation --use-pep517 --no-cache-dir "
    "--config-settings=--global-option=build_ext learn2learn==0.2.0"
)


class Learn2LearnMissing(FewShotError, ImportError):
    """learn2learn is not installed (or fails to import); the message gives the install recipe."""


def import_learn2learn() -> Any:
    """Import and return the ``learn2learn`` module.

    learn2learn imports its ``gym`` submodule unconditionally, and gym 0.26 prints a deprecation notice to
    stderr on import; that notice (about gym, which fewshot_proto never uses) is dropped, any other output of
    the import is passed on.

    Raises:
        Learn2LearnMissing: learn2learn is absent or cannot be imported (message: the install recipe).
    """
    if "learn2learn" in sys.modules and sys.modules["learn2learn"] is not None:
        return sys.modules["learn2learn"]
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            import learn2learn  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as e:
        raise Learn2LearnMissing(
            f"maml_unet needs learn2learn 0.2.0, which could not be imported ({type(e).__name__}: {e}). "
            f"It has no wheel for Python 3.11 and must be built from source with Cython; install it with:\n"
            f"{INSTALL_RECIPE}"
        ) from e
    finally:
        text = buf.getvalue()
        if text:
            kept = [ln for ln in text.splitlines() if ln.strip() and not _is_gym_notice(ln)]
            if kept:
                print("\n".join(kept), file=sys.stderr)
    return learn2learn


def _is_gym_notice(line: str) -> bool:
    return any(s in line for s in ("Gym has been unmaintained", "Gymnasium", "import gym", "migration guide"))


NORMS = ("instance", "batch", "none")


def _set_norm(net: nn.Module, norm: str) -> int:
    """Turn the batch-norm layers of ``net`` into what ``norm`` asks for, without running statistics.

    ``"batch"``: batch statistics always (running buffers removed); ``"instance"``: each replaced by an
    ``InstanceNorm2d(affine=True)`` with the same ``eps`` and parameters (per-slice statistics). Returns the
    number of layers changed.
    """
    n = 0
    for parent in list(net.modules()):
        for name, m in list(parent.named_children()):
            if not isinstance(m, nn.BatchNorm2d):
                continue
            if norm == "instance":
                inorm = nn.InstanceNorm2d(m.num_features, eps=m.eps, affine=True, track_running_stats=False)
                inorm.weight, inorm.bias = m.weight, m.bias
                setattr(parent, name, inorm)
            else:
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
                m.num_batches_tracked = None
            n += 1
    return n


def _as_leaves_(module: nn.Module) -> None:
    """Replace every parameter tensor of a learn2learn clone by a detached, trainable leaf (in place)."""
    for m in module.modules():
        for key, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[key] = p.detach().requires_grad_(True)


class MAMLSegmenter(AdaptingSegmenter):
    """First-order MAML on a binary U-Net: adapt a clone on the support, segment the query with it.

    Args:
        in_channels: image channels of the U-Net (3: grey tiled, the harness default).
        base_channels: width of the U-Net's first level (level i has ``base_channels * 2**i``); the default 16 is
            a 1/16-cost U-Net that meta-trains on a CPU.
        depth: number of poolings (inputs must be multiples of ``2**depth``).
        norm: normalisation after every 3x3 convolution: ``"instance"`` (default, per-slice statistics),
            ``"batch"`` (batch statistics, transductive) or ``"none"``; never with running statistics (see the
            module docstring).
        out_mode: the U-Net's head, ``"softmax"`` (two free logits) or ``"sigmoid"`` (``[0, z]``).
        inner_steps: adaptation steps per support set (0: the base as it is).
        inner_lr: learning rate of the inner SGD steps (learn2learn's ``MAML(lr=...)``).
        loss: inner-loop loss on the support: ``"dice_bce"`` (default), ``"ce"`` or ``"dice"``.
        first_order: ``True`` (default): FOMAML; ``False``: second-order MAML in grad mode.
        cache_support: in ``eval()`` mode without grad, keep the clones adapted to the last ``cache_size``
            support sets (an :class:`~fewshot_proto.models.fsbaselines.common.AdaptationCache`).
        cache_size: how many adapted clones to keep.

    Attributes:
        ``maml``: the ``l2l.algorithms.MAML`` wrapper whose ``module`` is the base U-Net (the only parameters);
            ``config``: the builder kwargs;
            ``adaptations``: number of adaptations run.

    Shapes: ``forward(support_img[S, C, H, W], support_mask[S, H, W], query_img[Q, C, H, W])`` ->
    ``SegOutput(logits[Q, 2, H, W])``.

    Raises:
        Learn2LearnMissing: learn2learn is not installed (the message gives the install recipe).
        ValueError: bad arguments (unknown loss or norm, non-positive ``inner_lr``, negative ``inner_steps``, ...).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 16,
        depth: int = 4,
        norm: str = "instance",
        out_mode: str = "softmax",
        inner_steps: int = 5,
        inner_lr: float = 0.1,
        loss: str = "dice_bce",
        first_order: bool = True,
        cache_support: bool = True,
        cache_size: int = 8,
    ) -> None:
        super().__init__()
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"MAMLSegmenter: inner_steps must be an integer >= 0, got {inner_steps!r}")
        check_positive_number("inner_lr", inner_lr, "MAMLSegmenter")
        if loss not in LOSSES:
            raise ValueError(f"MAMLSegmenter: loss must be one of {LOSSES}, got {loss!r}")
        if norm not in NORMS:
            raise ValueError(f"MAMLSegmenter: norm must be one of {NORMS}, got {norm!r}")
        l2l = import_learn2learn()
        net = build_model("unet", in_channels=in_channels, base_channels=base_channels, depth=depth,
                          norm="none" if norm == "none" else "batch", out_mode=out_mode, classes=None)
        _set_norm(net, norm)
        self.maml = l2l.algorithms.MAML(net, lr=float(inner_lr), first_order=bool(first_order))
        self.inner_steps = int(inner_steps)
        self.inner_lr = float(inner_lr)
        self.loss = loss
        self.first_order = bool(first_order)
        self.cache_support = bool(cache_support)
        self.adaptations = 0
        self._cache = AdaptationCache(cache_size)

    @property
    def input_multiple(self) -> int:
        return int(self.base.total_stride)

    def check_input(self, x: torch.Tensor) -> None:
        self.base.check_input(x)

    @property
    def base(self) -> nn.Module:
        """The base U-Net (``maml.module``): the meta-learned initialisation."""
        return self.maml.module

    # ---- inner loop ---------------------------------------------------------------------------------------
    def _inner_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return adaptation_loss(logits, target, self.loss)

    def _run_steps(self, learner: nn.Module, x: torch.Tensor, m: torch.Tensor) -> None:
        """``inner_steps`` learn2learn ``adapt`` steps of ``learner`` on ``(x, m)``, float32, autocast off."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            for _ in range(self.inner_steps):
                loss = self._inner_loss(learner.module.segment_image(x.float()), m)
                learner.adapt(loss)

    def adapt(self, support_img: torch.Tensor, support_mask: torch.Tensor) -> nn.Module:
        """A learn2learn clone of the base adapted ``inner_steps`` steps on the support.

        With grad enabled (meta-training) the clone stays connected to the base parameters, so a loss on its
        output gives the base the (first-order) meta-gradient. Without grad, or under ``inference_mode``, the
        clone is detached from the base and adapted inside ``inference_mode(False)`` + ``enable_grad()`` on
        copies of the inputs; its tensors are returned without grad. The base is never modified.

        Args:
            support_img: ``[S, C, H, W]`` (inference tensors allowed).
            support_mask: ``[S, H, W]`` (> 0.5 is foreground).

        Returns:
            The adapted ``l2l.algorithms.MAML`` clone (call ``clone.module.segment_image(x)``).
        """
        meta = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        if meta:
            learner = self.maml.clone()
            m = (support_mask.detach() > 0.5).long()
            self._run_steps(learner, support_img, m)
        else:
            with torch.inference_mode(False), torch.enable_grad():
                x = support_img.detach().clone()
                m = (support_mask.detach().clone() > 0.5).long()
                with torch.no_grad():  # no graph to the base; second order is useless without a meta-loss
                    learner = self.maml.clone(first_order=True)
                _as_leaves_(learner)
                self._run_steps(learner, x, m)
                for mod in learner.modules():
                    for key, p in list(mod._parameters.items()):
                        if p is not None:
                            mod._parameters[key] = p.detach()
        self.adaptations += 1
        return learner

    def _segment_with(self, adapted: Adapted, query_img: torch.Tensor) -> torch.Tensor:
        """The adapted clone's U-Net on the query; with grad enabled the logits depend on the base weights."""
        return adapted.net.module.segment_image(query_img)

    def extra_repr(self) -> str:
        return (f"inner_steps={self.inner_steps}, inner_lr={self.inner_lr}, loss={self.loss!r}, "
                f"first_order={self.first_order}")
