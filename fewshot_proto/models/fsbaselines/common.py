"""What the reference few-shot methods share: the prototype-segmenter skeleton of PANet and ALPNet, and the
adapt-then-segment skeleton of fine-tuning and MAML with its cache and support loss.

* :class:`PrototypeSegmenter`: encoder (+ optional 1x1 projection) and cosine scoring of query features against
  ``ClassPrototypes`` (``models.heads.scores.class_scores``); subclasses choose the prototypes.
* :class:`AdaptingSegmenter`: ``encode`` is the image itself, ``prototypes`` a network adapted on the support
  (:class:`Adapted`), ``segment`` that network on the query. Its outputs carry no features
  (``feature_losses = False``: no alignment or cyclic loss).

Shape letters: S support slices, Q query slices, D feature channels, (h, w) feature size, (H, W) input size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.models.base import FewShotSegmenter
from fewshot_proto.models.checks import check_feat_mask, check_positive_number
from fewshot_proto.models.encoders.base import build_encoder
from fewshot_proto.models.heads.scores import SCALER, ClassPrototypes, class_scores

__all__ = ["ADAPTATION_LOSSES", "Adapted", "AdaptationCache", "AdaptingSegmenter", "PrototypeSegmenter",
           "adaptation_loss"]


class PrototypeSegmenter(FewShotSegmenter):
    """Skeleton of a non-parametric prototype segmenter: encoder (+ optional 1x1 projection) and cosine scoring.

    Subclasses implement ``prototypes(support_feats, support_mask) -> ClassPrototypes`` (soft masks allowed).
    ``encode(x[B, C, H, W]) -> [feat[B, D, h, w]]`` is a one-element list (only the bottleneck is used);
    ``segment(feats, prototypes) -> logits[Q, 2, H, W]`` (background, foreground).

    Args:
        who: model name used in error messages.
        encoder: registered encoder name (``"resnet34"``, dilated last stage: F5 512 @ 1/16).
        weights: encoder weights: ``None`` (default), ``"imagenet"`` (local torch hub cache only) or a path.
        in_channels: image channels.
        proj_dim: ``None`` (use F5 as it is) or the output channels of a bias-free 1x1 convolution on F5.
        scaler: cosine multiplier.
    """

    def __init__(
        self,
        who: str,
        encoder: str = "resnet34",
        weights: Union[None, str, Path] = None,
        in_channels: int = 3,
        proj_dim: Optional[int] = None,
        scaler: float = SCALER,
    ) -> None:
        super().__init__()
        self.who = who
        if proj_dim is not None and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1):
            raise ValueError(f"{who}: proj_dim must be None or a positive integer, got {proj_dim!r}")
        self.scaler = check_positive_number("scaler", scaler, who)
        self.encoder = build_encoder(encoder, in_channels=in_channels, weights=weights, dilate_last=True)
        d = int(self.encoder.out_channels[-1])
        self.proj: nn.Module = nn.Identity() if proj_dim is None else nn.Conv2d(d, proj_dim, kernel_size=1, bias=False)
        self.feature_dim = d if proj_dim is None else int(proj_dim)

    @property
    def input_multiple(self) -> int:
        return self.encoder.input_multiple

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x[B, C, H, W]`` -> ``[feat[B, D, H/16, W/16]]`` (``ValueError`` on a bad shape or size)."""
        self.encoder.check_input_shape(x)
        return [self.proj(self.encoder(x)[-1])]

    def segment(self, query_feats: List[torch.Tensor], prototypes: ClassPrototypes) -> torch.Tensor:
        """Query features (from ``encode``) and prototypes -> float32 logits ``[Q, 2, H, W]`` (bg, fg)."""
        if not isinstance(prototypes, ClassPrototypes):
            raise ValueError(f"{self.who}.segment: prototypes must be ClassPrototypes, got {type(prototypes).__name__}")
        feat = query_feats[-1]
        stride = self.encoder.output_stride
        return class_scores(feat, prototypes, self.scaler, (int(feat.shape[-2]) * stride, int(feat.shape[-1]) * stride))

    def _support_inputs(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> torch.Tensor:
        """Check the support pair and return the bottleneck ``[S, D, h, w]``."""
        feat = support_feats[-1]
        check_feat_mask(feat, support_mask, f"{self.who}.prototypes")
        return feat


class Adapted(NamedTuple):
    """What ``AdaptingSegmenter.prototypes`` returns: the adapted network and the support it was adapted on (a
    few-shot base network needs the support again to segment)."""

    net: nn.Module
    support_img: torch.Tensor
    support_mask: torch.Tensor


class AdaptingSegmenter(FewShotSegmenter):
    """Skeleton of the adapt-then-segment methods: a network adapted on every support segments the query.

    Subclasses implement ``adapt(support_img, support_mask) -> nn.Module`` (never modifying their base),
    ``_segment_with(adapted, query_img) -> logits[Q, 2, H, W]``, ``check_input(x)`` and ``input_multiple``, and set
    ``cache_support`` and ``_cache`` (an :class:`AdaptationCache`). In ``eval()`` mode without grad the networks
    adapted to the last supports are reused.
    """

    feature_losses = False

    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``[x]``: the method adapts on, and segments, images."""
        self.check_input(x)
        return [x]

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> Adapted:
        """The network adapted on the support image ``support_feats[-1]`` and ``support_mask[S, H, W]``."""
        s_img = support_feats[-1]
        use_cache = self.cache_support and not self.training and not torch.is_grad_enabled()
        net = self._cache.get_or_adapt(self._cache_owner(), s_img, support_mask, self.adapt, use=use_cache)
        return Adapted(net=net, support_img=s_img, support_mask=support_mask.float())

    def segment(self, query_feats: List[torch.Tensor], prototypes: Adapted) -> torch.Tensor:
        """The adapted network on the query image -> logits ``[Q, 2, H, W]`` (in the caller's grad mode)."""
        if not isinstance(prototypes, Adapted):
            raise ValueError(f"{type(self).__name__}.segment: prototypes must be the Adapted of prototypes(), got "
                             f"{type(prototypes).__name__}")
        return self._segment_with(prototypes, query_feats[-1])

    def _cache_owner(self) -> nn.Module:
        """The module whose weights an adapted copy depends on (the cache checks they did not change)."""
        return self

    def train(self, mode: bool = True) -> "AdaptingSegmenter":
        """Switch mode and drop the cached adapted networks."""
        self._cache.clear()
        return super().train(mode)


class AdaptationCache:
    """A small LRU of networks adapted to a support set, for the adapt-then-segment baselines (finetune, MAML).

    The evaluator visits query scan -> class -> chunk, so one support chunk comes back once per query scan; with a
    single remembered support every chunk was re-adapted (24 adaptations for a 4-query, 2-class, 3-chunk fold where
    6 do). An entry is reused only while the owner's weights are the very tensors, at the very versions, they were
    adapted from (``data_ptr`` and ``_version`` of every parameter and buffer), and the support image and mask are
    equal element for element. ``size`` adapted copies are kept in memory (each as large as the base).
    """

    def __init__(self, size: int = 8) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cache size must be an integer >= 0, got {size!r}")
        self.size = size
        self._items: List[tuple] = []  # (fingerprint, support_img, support_mask, net), most recent last

    @staticmethod
    def fingerprint(owner: nn.Module, s_img: torch.Tensor) -> Optional[tuple]:
        """Identity and version counters of ``owner``'s tensors plus the support's shape, dtype and device."""
        try:
            weights = tuple((t.data_ptr(), t._version) for t in list(owner.parameters()) + list(owner.buffers()))
        except RuntimeError:  # tensors created under inference mode have no version counter: never cache
            return None
        return weights, tuple(s_img.shape), s_img.dtype, str(s_img.device)

    def get(self, owner: nn.Module, s_img: torch.Tensor, s_mask: torch.Tensor) -> Optional[nn.Module]:
        fp = self.fingerprint(owner, s_img)
        if fp is None:
            return None
        m = s_mask.float()
        for i, (key, img, mask, net) in enumerate(self._items):
            if key == fp and mask.shape == m.shape and torch.equal(img, s_img) and torch.equal(mask, m):
                self._items.append(self._items.pop(i))
                return net
        return None

    def get_or_adapt(self, owner: nn.Module, s_img: torch.Tensor, s_mask: torch.Tensor,
                     adapt: Callable[[torch.Tensor, torch.Tensor], nn.Module], *, use: bool) -> nn.Module:
        """The network adapted to this support: from the cache when ``use`` and present, else ``adapt(...)``
        (stored when ``use``)."""
        net = self.get(owner, s_img, s_mask) if use else None
        if net is None:
            net = adapt(s_img, s_mask)
            if use:
                self.put(owner, s_img, s_mask, net)
        return net

    def put(self, owner: nn.Module, s_img: torch.Tensor, s_mask: torch.Tensor, net: nn.Module) -> None:
        fp = self.fingerprint(owner, s_img)
        if fp is None or self.size == 0:
            return
        self._items.append((fp, s_img.clone(), s_mask.float().clone(), net))
        del self._items[:-self.size]

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: the support losses of the adapt-then-segment baselines (fine-tune, MAML)
ADAPTATION_LOSSES = ("dice_bce", "ce", "dice")


def _soft_dice(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Mean over items of ``1 - (2 sum(p g) + smooth) / (sum(p) + sum(g) + smooth)``; ``[N, H, W]`` inputs."""
    inter = (prob * target).sum(dim=(1, 2))
    denom = prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def adaptation_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of binary logits ``[N, 2, H, W]`` against ``target[N, H, W]`` in {0, 1}, in float32.

    ``"ce"``: cross-entropy; ``"dice"``: soft Dice of the foreground softmax; ``"dice_bce"``: 0.8 soft Dice + 0.2
    BCE on ``z = fg - bg`` (the foreground softmax's logit). The same values as ``losses.weighted_cross_entropy``,
    ``losses.dice_loss(softmax=True)`` and ``losses.dice_bce_loss`` (tested); written here because the models
    never import the training losses.
    """
    logits = logits.float()
    if loss == "ce":
        return F.cross_entropy(logits, target.long())
    if loss == "dice":
        return _soft_dice(torch.softmax(logits, dim=1)[:, 1], target.float())
    z = logits[:, 1] - logits[:, 0]
    t = target.float()
    return 0.8 * _soft_dice(torch.sigmoid(z), t) + 0.2 * F.binary_cross_entropy_with_logits(z, t)
