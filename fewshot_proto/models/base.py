"""The model contract (every registered model follows it; the engine relies on nothing else).

Every model is a :class:`Segmenter` of one of two kinds, each with a base class here.

**Few-shot** (:class:`FewShotSegmenter`, ``kind = "fewshot"``) segments a query from a labelled support, in three
steps so that evaluation encodes each query slice once and each support once:

* ``encode(x[B, C, H, W]) -> list[Tensor]``: the features the model matches on, fine to coarse (the encoder's
  pyramid, a projected bottleneck, or for a model that adapts a network on the support the image itself);
* ``prototypes(support_feats, support_mask[S, H, W]) -> P``: what the model keeps of a support (a tensor bag, a
  ``NamedTuple`` of bags, an adapted network); soft masks are allowed;
* ``segment(query_feats, P) -> logits[Q, 2, H, W]`` (background, foreground);
* ``forward(support_img[S, C, H, W], support_mask[S, H, W], query_img[Q, C, H, W]) -> SegOutput``, written once
  here: one batched ``encode`` of support and query, then ``prototypes`` and ``segment``. The output carries the
  features and prototypes when ``feature_losses`` is true (the engine's alignment and cyclic losses use them).

**Supervised** (:class:`SupervisedSegmenter`, ``kind = "supervised"``) segments the query alone, for the classes
it was trained on: ``segment_image(x) -> logits[B, 1 + K, H, W]`` (channel 0 background, channel ``i`` class
``classes[i - 1]``), ``to_binary(logits, class_id) -> [B, 2, H, W]`` and ``forward(support_img, support_mask,
query_img, class_id=None)``, which ignores the support.

**What the engine calls** (one inference path serves ``evaluate`` and ``predict``; both kinds implement it):

* ``needs_support``: whether a prediction depends on the support (a supervised model's does not, so no support is
  loaded for it);
* ``encode_query(x) -> list[Tensor]``: the work on query slices alone, done once per query scan for all classes
  (rows are selected with ``index_select(0, rows)`` on every tensor of the list);
* ``encode_support(support_img, support_mask, class_id) -> state``: the work on one support, done once per
  (support slices, class);
* ``predict(query_state, support_state) -> float32 [Q, H, W]``: the foreground probability;
* ``input_multiple``: input height and width must be multiples of it.

**Config.** A model's ``config`` is the keyword arguments of its constructor (defaults filled in), recorded when
the outermost ``__init__`` returns, so ``build_model(name, **model.config)`` rebuilds the architecture and no
class writes its signature twice (a subclass that adds arguments forwards ``**kwargs`` to its parent; the parent's
defaults are recorded with them). ``config["weights"]`` is always ``None``: initial weights are not architecture
(a checkpoint's state dict replaces them); the value given is kept in ``init_weights``. A class adjusts what it
records by overriding ``_resolve_config``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
from torch import nn

from fewshot_proto.models.checks import OUT_MODES, check_classes, check_episode, nearest_valid_size
from fewshot_proto.types import SegOutput

__all__ = ["Segmenter", "FewShotSegmenter", "SupervisedSegmenter", "KINDS"]

#: the values of ``Segmenter.kind``
KINDS = ("fewshot", "supervised")


def _parent_defaults(cls: type) -> Dict[str, Any]:
    """The keyword defaults of the nearest ``__init__`` above ``cls`` (what a ``**kwargs`` is forwarded to)."""
    for base in cls.__mro__[1:]:
        init = base.__dict__.get("__init__")
        if init is not None:
            return {n: p.default for n, p in inspect.signature(init).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    return {}  # pragma: no cover - object defines __init__


def _recording_init(cls: type, init):
    """Wrap ``init`` so that the outermost call stores the bound keyword arguments in ``self.config`` (a ``**kwargs``
    forwarded to the parent's ``__init__`` is recorded with the parent's defaults filled in)."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        outer = "_recording_config" not in self.__dict__
        if outer:
            self.__dict__["_recording_config"] = True
        try:
            init(self, *args, **kwargs)
        finally:
            if outer:
                del self.__dict__["_recording_config"]
        if not outer:
            return
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        config: Dict[str, Any] = {}
        for name, value in list(bound.arguments.items())[1:]:
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                config.update({k: v for k, v in _parent_defaults(cls).items() if k not in config}, **value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                raise TypeError(f"{type(self).__name__}: positional *args cannot be recorded in model.config")
            else:
                config[name] = value
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}  # YAML/JSON-friendly
        if "weights" in config:
            self.init_weights = None if config["weights"] is None else str(config["weights"])
            config["weights"] = None
        self.config = self._resolve_config(config)

    __init__._records_config = True  # type: ignore[attr-defined]
    return __init__


class Segmenter(nn.Module):
    """What both kinds share: ``kind``, the recorded ``config`` and the engine's three calls (module docstring)."""

    kind: ClassVar[str] = ""
    needs_support: ClassVar[bool] = True
    #: the ``weights`` argument actually used to initialise the model (provenance; not part of ``config``)
    init_weights: Optional[str] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_records_config", False):
            cls.__init__ = _recording_init(cls, init)  # type: ignore[method-assign]

    def __init__(self) -> None:
        super().__init__()
        self.config: Dict[str, Any] = {}

    def _resolve_config(self, config: Dict[str, Any]) -> Dict[str, Any]:
        """The config to record from the bound constructor arguments (override to normalise values)."""
        return config

    @property
    def input_multiple(self) -> int:  # pragma: no cover - every model overrides it
        raise NotImplementedError

    def encode_query(self, x: torch.Tensor) -> List[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode_support(self, support_img: Optional[torch.Tensor], support_mask: Optional[torch.Tensor],
                       class_id: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, query_state: List[torch.Tensor], support_state: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class FewShotSegmenter(Segmenter):
    """Base class of the few-shot models: subclasses implement ``encode``, ``prototypes``, ``segment`` and
    ``input_multiple`` (module docstring); ``forward`` and the engine's calls are written here once.

    Class attributes:
        feature_losses: ``True`` when ``encode`` returns features the prototype losses apply to (the alignment
            loss pools the last map; the cyclic loss calls ``prototypes`` with a soft mask and ``segment`` on the
            support). Models that adapt a network on the support say ``False``: their ``SegOutput`` holds logits
            only.
    """

    kind = "fewshot"
    needs_support = True
    feature_losses: ClassVar[bool] = True

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> Any:  # pragma: no cover
        raise NotImplementedError

    def segment(self, query_feats: List[torch.Tensor], prototypes: Any) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, support_img: torch.Tensor, support_mask: torch.Tensor, query_img: torch.Tensor) -> SegOutput:
        """One episode: ``support_img[S, C, H, W]``, ``support_mask[S, H, W]`` (float; soft values allowed),
        ``query_img[Q, C, H, W]`` -> ``SegOutput(logits[Q, 2, H, W], support_feats, query_feats, prototypes)``
        (the last three ``None`` unless ``feature_losses``)."""
        check_episode(type(self).__name__, support_img, support_mask, query_img)
        s = support_img.shape[0]
        feats = self.encode(torch.cat([support_img, query_img], dim=0))  # one batched pass
        support_feats = [f[:s] for f in feats]
        query_feats = [f[s:] for f in feats]
        protos = self.prototypes(support_feats, support_mask)
        logits = self.segment(query_feats, protos)
        if not self.feature_losses:
            return SegOutput(logits=logits)
        return SegOutput(logits=logits, support_feats=support_feats, query_feats=query_feats, prototypes=protos)

    # ---- what the engine calls --------------------------------------------------------------------------
    def encode_query(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``encode(x)``."""
        return self.encode(x)

    def encode_support(self, support_img: torch.Tensor, support_mask: torch.Tensor, class_id: int) -> Any:
        """``prototypes(encode(support_img), support_mask)`` (the class is what the mask shows)."""
        return self.prototypes(self.encode(support_img), support_mask)

    def predict(self, query_state: List[torch.Tensor], support_state: Any) -> torch.Tensor:
        """Foreground probability float32 ``[Q, H, W]``: ``softmax(segment(query_state, support_state))[:, 1]``."""
        return torch.softmax(self.segment(query_state, support_state).float(), dim=1)[:, 1]


class SupervisedSegmenter(Segmenter):
    """Base class of the supervised baselines: the episodic ``forward``, class handling and input checks.

    Subclasses set ``total_stride`` (input H and W must be multiples of it) and ``in_channels``, call
    ``_set_output(out_mode, classes)`` before building their head (``SegHead(c, out_mode, self.num_classes)``), and
    implement ``_segment(x) -> logits[B, 1 + K, H, W]``.

    Target classes (``classes``): a model built without them is binary (K = 1 foreground channel, whatever it was
    trained on); with ``classes=[c_1, ..., c_K]`` (label values) ``segment_image`` returns ``1 + K`` channels,
    channel 0 background and channel ``i`` class ``c_i``, and ``to_binary`` gives the harness' two logits of one
    class.

    Attributes:
        classes: the target label values ``[c_1, ..., c_K]``, or ``None`` for a binary model (K = 1).
        out_mode: ``"sigmoid"`` or ``"softmax"``.
    """

    kind = "supervised"
    needs_support = False
    display_name = "supervised model"

    def __init__(self) -> None:
        super().__init__()
        self.in_channels: int = 3
        self.total_stride: int = 1
        self.classes: Optional[List[int]] = None
        self.out_mode: str = "softmax"

    @property
    def input_multiple(self) -> int:
        return int(self.total_stride)

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

    def segment_image(self, x: torch.Tensor) -> torch.Tensor:
        """Plain segmentation: ``x[B, C, H, W] -> logits[B, 1 + K, H, W]`` (background, then ``classes``).

        This is what supervised training calls. Raises ``ValueError`` on a wrong channel count or a size that is
        not a multiple of ``total_stride``.
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

    def forward(self, support_img: Optional[torch.Tensor], support_mask: Optional[torch.Tensor],
                query_img: torch.Tensor, class_id: Optional[int] = None) -> SegOutput:
        """Episodic call shared with the few-shot models; the support is IGNORED.

        Args:
            support_img: ``[S, C, H, W]``, or ``None``. Checked for shape consistency only.
            support_mask: ``[S, H, W]``, or ``None``. Checked for shape consistency only.
            query_img: ``[Q, C, H, W]``.
            class_id: the episode's class. Required for a model with several ``classes`` (the binary support
                mask does not say which class it shows); optional otherwise.

        Returns:
            ``SegOutput(logits[Q, 2, H, W])``: the query segmented on its own for ``class_id``.
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
            return SegOutput(logits=self.segment_image(query_img))
        return SegOutput(logits=self.binary_logits(query_img, class_id))

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

    # ---- what the engine calls --------------------------------------------------------------------------
    def encode_query(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``[segment_image(x)]``: every query slice is segmented once, for all classes."""
        return [self.segment_image(x)]

    def encode_support(self, support_img: Optional[torch.Tensor], support_mask: Optional[torch.Tensor],
                       class_id: int) -> int:
        """The class (the support is not used); ``ValueError`` for a class the model does not segment."""
        self.channel_of(class_id)
        return int(class_id)

    def predict(self, query_state: List[torch.Tensor], support_state: int) -> torch.Tensor:
        """Foreground probability float32 ``[Q, H, W]`` of class ``support_state`` from ``encode_query``'s logits."""
        return torch.softmax(self.to_binary(query_state[-1], support_state).float(), dim=1)[:, 1]

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, in_channels={self.in_channels}, total_stride={self.total_stride}, "
                f"out_mode={self.out_mode!r}, classes={self.classes}")
