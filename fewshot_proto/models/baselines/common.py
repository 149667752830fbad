"""What the supervised baselines share: the episodic interface, input checks, the output head and blocks.

The engine drives every model, few-shot or supervised, through one call::

    model(support_img[S, C, H, W], support_mask[S, H, W], query_img[Q, C, H, W]) -> SegOutput(logits[Q, 2, H, W])

A supervised baseline ignores the support (it was trained on labelled slices of its target classes and
segments the query alone); supervised training calls ``segment_image(x[B, C, H, W]) -> logits[B, 1 + K, H, W]``
directly. Every model's ``kind`` class attribute says which family it is (``"supervised"`` here,
``"fewshot"`` for prototype models), and ``model.config`` holds the builder kwargs that rebuild it
(``build_model(name, **model.config)``).

Target classes (``classes``). A model built without ``classes`` (the default) is binary: K = 1 foreground
channel whose meaning is whatever it was trained on. A model built with ``classes=[c_1, ..., c_K]`` (label
values, e.g. ``[2, 3]`` for the kidneys) segments K classes at once: ``segment_image`` returns ``1 + K``
channels, channel 0 background and channel ``i`` class ``c_i``. ``binary_logits(x, class_id)`` (and
``to_binary(logits, class_id)`` on precomputed logits) turns that into the harness' two logits
``[B, 2, H, W]`` for one class, so a single multi-class model is scored episode by episode, class by class,
exactly like a few-shot model (see ``to_binary`` for the formulas).

Output modes (``out_mode``). A binary model returns two logits per pixel (background, foreground) so that
every model shares the engine's CE/Dice losses and the evaluation code. The seeds' binary networks end in a
single channel ``z`` with a sigmoid and are trained with Dice+BCE; that parameterisation is kept as
``out_mode="sigmoid"``: the 1x1 head has one output channel and the returned logits are ``[0, z]``. Since
``softmax([0, z])[1] = sigmoid(z)``, cross-entropy on these two logits *is* BCE on ``z``, soft Dice on the
foreground softmax channel *is* soft Dice on ``sigmoid(z)``, and argmax is ``z > 0``. ``out_mode="softmax"``
uses a 1x1 head with two free output channels (Ronneberger's original two-class U-Net). With K target classes
the sigmoid head has K channels ``z_k`` (one independent sigmoid per class, one-vs-rest, trained with
Dice+BCE per class) returned as ``[0, z_1, ..., z_K]``; the softmax head has ``1 + K`` channels (one softmax
over background and the K classes, trained with CE + Dice). For K = 1 both are the binary case above. Which
loss is applied is the engine's choice; ``forward`` never computes a loss.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from fewshot_proto.models.checks import check_positive_int, check_rate  # re-exported: the baselines import them here
from fewshot_proto.types import SegOutput

__all__ = [
    "OUT_MODES",
    "SupervisedSegmenter",
    "SegHead",
    "SEBlock",
    "nearest_valid_size",
    "count_parameters",
    "check_positive_int",
    "check_rate",
    "check_classes",
]

OUT_MODES = ("sigmoid", "softmax")


def nearest_valid_size(n: int, stride: int) -> int:
    """The multiple of ``stride`` closest to ``n`` (ties go up; never below ``stride``)."""
    lower = (n // stride) * stride
    upper = lower + stride
    best = upper if (n - lower) >= (upper - n) else lower
    return max(stride, best)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def check_classes(classes: Any, model: str) -> Optional[List[int]]:
    """Return ``classes`` as a list of distinct non-zero ints (label values), or ``None``; else ``ValueError``."""
    if classes is None:
        return None
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or len(classes) == 0:
        raise ValueError(f"{model}: classes must be None or a non-empty list of label values, got {classes!r}")
    out = []
    for c in classes:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c == 0:
            raise ValueError(
                f"{model}: classes must be non-zero integer label values (0 is background), got {classes!r}"
            )
        out.append(int(c))
    if len(set(out)) != len(out):
        raise ValueError(f"{model}: classes must be distinct, got {classes!r}")
    return out


class SegHead(nn.Module):
    """1x1 convolution to class scores, always returned as ``1 + num_classes`` logits ``[B, 1 + K, H, W]``.

    ``out_mode="sigmoid"``: K output channels ``z_k`` (the seeds' sigmoid head for K = 1), returned as
    ``[0, z_1, ..., z_K]`` (channel 0 a constant zero placeholder for the background).
    ``out_mode="softmax"``: ``1 + K`` output channels, returned as they are. See the module docstring.
    """

    def __init__(self, in_channels: int, out_mode: str, num_classes: int = 1) -> None:
        super().__init__()
        if out_mode not in OUT_MODES:
            raise ValueError(f"out_mode must be one of {OUT_MODES}, got {out_mode!r}")
        check_positive_int("num_classes", num_classes, "SegHead")
        self.out_mode = out_mode
        self.num_classes = num_classes
        self.conv = nn.Conv2d(in_channels, num_classes if out_mode == "sigmoid" else 1 + num_classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, C, H, W] -> logits[B, 1 + K, H, W]``."""
        z = self.conv(x)
        if self.out_mode == "sigmoid":
            return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)
        return z


class SEBlock(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): ``x * sigmoid(W2 relu(W1 gap(x)))``.

    The hidden width is ``max(1, channels // reduction)`` (so 16 or 24 channels with ``r = 16`` keep one
    hidden unit). Both fully connected layers have biases. ``[B, C, H, W] -> [B, C, H, W]``.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s


class SupervisedSegmenter(nn.Module):
    """Base class of the supervised baselines: the episodic ``forward``, class handling and input checks.

    Subclasses set ``total_stride`` (input H and W must be multiples of it), ``in_channels`` and ``config``,
    call ``_set_output(out_mode, classes)`` before building their head (``SegHead(c, out_mode,
    self.num_classes)``), and implement ``_segment(x) -> logits[B, 1 + K, H, W]``.

    Class attributes:
        kind: ``"supervised"`` (few-shot models say ``"fewshot"``); the engine uses it to choose the training
            loop (plain labelled batches vs episodes).

    Attributes:
        classes: the target label values ``[c_1, ..., c_K]``, or ``None`` for a binary model (K = 1).
        out_mode: ``"sigmoid"`` or ``"softmax"``.
    """

    kind = "supervised"
    display_name = "supervised model"

    def __init__(self) -> None:
        super().__init__()
        self.config: Dict[str, Any] = {}
        self.in_channels: int = 3
        self.total_stride: int = 1
        self.classes: Optional[List[int]] = None
        self.out_mode: str = "softmax"

    def _set_output(self, out_mode: str, classes: Any) -> Optional[List[int]]:
        """Validate and store ``out_mode`` and ``classes``; returns the checked classes (list or ``None``)."""
        if out_mode not in OUT_MODES:
            raise ValueError(f"{self.display_name}: out_mode must be one of {OUT_MODES}, got {out_mode!r}")
        self.out_mode = out_mode
        self.classes = check_classes(classes, self.display_name)
        return None if self.classes is None else list(self.classes)

    @property
    def num_classes(self) -> int:
        """K, the number of foreground channels (1 for a binary model)."""
        return 1 if self.classes is None else len(self.classes)

    def channel_of(self, class_id: int) -> int:
        """The logit channel (1..K) of label value ``class_id``.

        A binary model built without ``classes`` has one foreground channel and accepts any ``class_id``
        (it segments whatever it was trained on). Raises ``ValueError`` for a class the model was not built for.
        """
        if self.classes is None:
            return 1
        try:
            return 1 + self.classes.index(int(class_id))
        except ValueError:
            raise ValueError(
                f"{self.display_name}: class {class_id} is not one of the classes this model segments "
                f"{self.classes}"
            ) from None

    # -- checks ---------------------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor, what: str = "input") -> None:
        """Raise ``ValueError`` unless ``x`` is ``[B, in_channels, H, W]`` with H, W multiples of the stride.

        The message suggests the nearest valid size (resize or pad the slices to it).
        """
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.display_name}: {what} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 4:
            raise ValueError(f"{self.display_name}: {what} must be [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.display_name}: {what} has {x.shape[1]} channels but the model was built with "
                f"in_channels={self.in_channels}"
            )
        h, w = int(x.shape[2]), int(x.shape[3])
        s = self.total_stride
        if h % s or w % s or h < s or w < s:
            raise ValueError(
                f"{self.display_name}: {what} size {h}x{w} is not a multiple of the network's total stride {s}; "
                f"nearest valid size: {nearest_valid_size(h, s)}x{nearest_valid_size(w, s)} (resize or pad the slices)"
            )

    # -- the two entry points -------------------------------------------------------------------------------
    def segment_image(self, x: torch.Tensor) -> torch.Tensor:
        """Plain segmentation: ``x[B, C, H, W] -> logits[B, 1 + K, H, W]`` (background, then ``classes``).

        K = 1 for a binary model (``[B, 2, H, W]``: background, foreground). This is what supervised training
        calls. Raises ``ValueError`` on a wrong channel count or a size that is not a multiple of
        ``total_stride``.
        """
        self.check_input(x)
        return self._segment(x)

    def to_binary(self, logits: torch.Tensor, class_id: int) -> torch.Tensor:
        """Two logits ``[B, 2, H, W]`` (rest, class ``class_id``) from ``segment_image``'s ``[B, 1 + K, H, W]``.

        softmax head: foreground = the class channel ``l_i``, background = ``logsumexp`` of all other channels
            (background and the other classes), so ``softmax([bg, fg])[1] = exp(l_i) / sum_j exp(l_j)``: the
            class probability of the K+1-way softmax, unchanged.
        sigmoid head: ``[0, z_i]``, so ``softmax([0, z_i])[1] = sigmoid(z_i)``: the class' own sigmoid.
        For a binary model (K = 1) the logits are returned as they are. Raises ``ValueError`` for a class the
        model was not built for.
        """
        i = self.channel_of(class_id)
        if logits.ndim != 4 or logits.shape[1] != 1 + self.num_classes:
            raise ValueError(
                f"{self.display_name}: expected logits [B, {1 + self.num_classes}, H, W], got {tuple(logits.shape)}"
            )
        if self.num_classes == 1:
            return logits
        fg = logits[:, i:i + 1]
        if self.out_mode == "sigmoid":
            return torch.cat([torch.zeros_like(fg), fg], dim=1)
        rest = torch.cat([logits[:, :i], logits[:, i + 1:]], dim=1)
        return torch.cat([torch.logsumexp(rest, dim=1, keepdim=True), fg], dim=1)

    def binary_logits(self, x: torch.Tensor, class_id: int) -> torch.Tensor:
        """``x[B, C, H, W] -> logits[B, 2, H, W]`` for one class: ``to_binary(segment_image(x), class_id)``."""
        return self.to_binary(self.segment_image(x), class_id)

    def forward(
        self,
        support_img: Optional[torch.Tensor],
        support_mask: Optional[torch.Tensor],
        query_img: torch.Tensor,
        class_id: Optional[int] = None,
    ) -> SegOutput:
        """Episodic call shared with the few-shot models; the support is IGNORED.

        Args:
            support_img: ``[S, C, H, W]``, or ``None``. Checked for shape consistency only.
            support_mask: ``[S, H, W]``, or ``None``. Checked for shape consistency only.
            query_img: ``[Q, C, H, W]``.
            class_id: the episode's class. Required for a model with several ``classes`` (the binary support
                mask does not say which class it shows); optional otherwise.

        Returns:
            ``SegOutput(logits[Q, 2, H, W], aux={})``: the query segmented on its own for ``class_id``.
        """
        if (support_img is None) != (support_mask is None):
            raise ValueError(f"{self.display_name}: give both support_img and support_mask, or neither")
        if support_img is not None:
            self._check_support(support_img, support_mask, query_img)
        if class_id is None:
            if self.num_classes > 1:
                raise ValueError(
                    f"{self.display_name}: this model segments classes {self.classes}; pass class_id= to forward "
                    f"(or call binary_logits(x, class_id) / segment_image(x))"
                )
            return SegOutput(logits=self.segment_image(query_img), aux={})
        return SegOutput(logits=self.binary_logits(query_img, class_id), aux={})

    def _check_support(self, support_img: torch.Tensor, support_mask: torch.Tensor, query_img: torch.Tensor) -> None:
        if support_img.ndim != 4 or support_mask.ndim != 3:
            raise ValueError(
                f"{self.display_name}: support_img must be [S, C, H, W] and support_mask [S, H, W]; got "
                f"{tuple(support_img.shape)} and {tuple(support_mask.shape)}"
            )
        expected: Tuple[int, ...] = (support_img.shape[0],) + tuple(support_img.shape[2:])
        if tuple(support_mask.shape) != expected:
            raise ValueError(
                f"{self.display_name}: support_mask shape {tuple(support_mask.shape)} does not match "
                f"support_img {tuple(support_img.shape)}"
            )
        if query_img.ndim == 4 and tuple(support_img.shape[1:]) != tuple(query_img.shape[1:]):
            raise ValueError(
                f"{self.display_name}: support {tuple(support_img.shape)} and query {tuple(query_img.shape)} "
                f"differ in channels or size"
            )

    def _segment(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, in_channels={self.in_channels}, total_stride={self.total_stride}, "
                f"out_mode={self.out_mode!r}, classes={self.classes}")
