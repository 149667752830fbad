"""What PANet and ALPNet share: the prototype bundle, the multi-prototype cosine score and the model skeleton.

Both methods are non-parametric classifiers on top of an encoder: prototypes are taken from the support features
under the support mask, and every query feature vector is scored against each class's prototypes by scaled cosine
similarity. The score of class ``c`` at a query position is (SSL-ALPNet's ``MultiProtoAsConv``)::

    d_j    = scaler * cos(f_q, P_j)            for the prototypes P_j of class c
    s_c    = sum_j softmax_j(d)_j * d_j        (a soft maximum over the class's prototypes)

With a single prototype per class this is exactly PANet's ``scaler * cos(f_q, P_c)``, so one scoring function
serves both models. The two class scores ``[bg, fg]`` are computed at feature resolution and upsampled bilinearly
to the input size: they are the logits.

Shape letters: S support slices, Q query slices, D feature channels, (h, w) feature size, (H, W) input size,
N number of prototypes of one class.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.losses.ce import weighted_cross_entropy
from fewshot_proto.losses.dice import dice_bce_loss, dice_loss
from fewshot_proto.models.checks import check_episode, check_positive_number  # check_episode: re-exported
from fewshot_proto.models.encoders.base import build_encoder
from fewshot_proto.types import SegOutput

__all__ = ["ADAPTATION_LOSSES", "AdaptationCache", "adaptation_loss", "ClassPrototypes", "safe_normalize",
           "class_score", "class_scores", "check_episode", "PrototypeSegmenter"]


class ClassPrototypes(NamedTuple):
    """The prototypes of one episode: ``bg[N_bg, D]`` (background) and ``fg[N_fg, D]`` (foreground), N >= 1."""

    bg: torch.Tensor
    fg: torch.Tensor

    @property
    def counts(self) -> tuple:
        """``(N_bg, N_fg)``."""
        return int(self.bg.shape[0]), int(self.fg.shape[0])


def safe_normalize(x: torch.Tensor, dim: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """``x / max(||x||, eps)`` along ``dim`` (a zero vector stays zero, never NaN)."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def class_score(
    feat: torch.Tensor, prototypes: torch.Tensor, scaler: float = 20.0, *, eps: float = 1e-4
) -> torch.Tensor:
    """Score of one class: ``sum_j softmax_j(d) * d_j`` with ``d_j = scaler * cos(feat, prototypes[j])``.

    Args:
        feat: ``[Q, D, h, w]`` query features.
        prototypes: ``[N, D]`` the class's prototypes, ``N >= 1``.
        scaler: multiplier of the cosine similarity (20 in PANet and SSL-ALPNet).
        eps: lower bound of the vector norms in the cosine (a zero prototype scores 0).

    Returns:
        float32 ``[Q, h, w]``; for ``N == 1`` exactly ``scaler * cos(feat, prototypes[0])``.
    """
    if feat.ndim != 4 or prototypes.ndim != 2 or feat.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"class_score: expected feat [Q,D,h,w] and prototypes [N,D] with the same D, "
            f"got {tuple(feat.shape)} and {tuple(prototypes.shape)}"
        )
    if prototypes.shape[0] == 0:
        raise ValueError("class_score: a class needs at least one prototype, got none")
    with torch.autocast(device_type=feat.device.type, enabled=False):
        f = safe_normalize(feat.float(), dim=1, eps=eps)
        p = safe_normalize(prototypes.float(), dim=1, eps=eps)
        d = torch.einsum("qdhw,nd->qnhw", f, p) * float(scaler)  # [Q, N, h, w]
        if d.shape[1] == 1:
            return d[:, 0]
        return (torch.softmax(d, dim=1) * d).sum(dim=1)


def class_scores(feat: torch.Tensor, prototypes: ClassPrototypes, scaler: float, size=None) -> torch.Tensor:
    """Background and foreground ``class_score`` maps of ``feat[Q, D, h, w]``, upsampled bilinearly to ``size``:
    float32 logits ``[Q, 2, *size]`` (PANet's and ALPNet's output, and ``CWPAUNet``'s residual prototype head);
    ``size=None`` returns them at ``(h, w)`` without resampling."""
    with torch.autocast(device_type=feat.device.type, enabled=False):
        scores = torch.stack(
            [class_score(feat, prototypes.bg, scaler), class_score(feat, prototypes.fg, scaler)], dim=1
        )  # [Q, 2, h, w] float32
        if size is None:
            return scores
        return F.interpolate(scores, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


class PrototypeSegmenter(nn.Module):
    """Skeleton of a non-parametric prototype segmenter: encoder (+ optional 1x1 projection) and cosine scoring.

    Subclasses implement ``prototypes(support_feats, support_mask) -> ClassPrototypes``. The step methods follow
    ``CWPAUNet`` so the evaluator's fast path (support prototypes computed once, reused for every query) and the
    engine's cyclic loss work unchanged:

    * ``encode(x[B, C, H, W]) -> [feat[B, D, h, w]]``: a one-element list (only the bottleneck is used, so the
      evaluator caches nothing else);
    * ``prototypes(feats, mask[S, H, W]) -> ClassPrototypes`` (soft masks allowed);
    * ``segment(feats, prototypes) -> logits[Q, 2, H, W]`` (background, foreground).

    Args:
        who: model name used in error messages.
        encoder: registered encoder name (``"resnet34"``, dilated last stage: F5 512 @ 1/16).
        weights: encoder weights: ``None`` (default), ``"imagenet"`` (local torch hub cache only) or a path.
        in_channels: image channels.
        proj_dim: ``None`` (use F5 as it is) or the output channels of a bias-free 1x1 convolution on F5.
        scaler: cosine multiplier.
    """

    kind = "fewshot"
    #: ``prototypes`` accepts soft masks and ``segment`` its own output: the engine's cyclic loss works as is
    supports_cyclic = True

    def __init__(
        self,
        who: str,
        encoder: str = "resnet34",
        weights: Union[None, str, Path] = None,
        in_channels: int = 3,
        proj_dim: Optional[int] = None,
        scaler: float = 20.0,
    ) -> None:
        super().__init__()
        self.who = who
        if proj_dim is not None and (isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 1):
            raise ValueError(f"{who}: proj_dim must be None or a positive integer, got {proj_dim!r}")
        self.scaler = check_positive_number("scaler", scaler, who)
        self.init_weights = None if weights is None else str(weights)
        self.encoder = build_encoder(encoder, in_channels=in_channels, weights=weights, dilate_last=True)
        d = int(self.encoder.out_channels[-1])
        self.proj: nn.Module = nn.Identity() if proj_dim is None else nn.Conv2d(d, proj_dim, kernel_size=1, bias=False)
        self.feature_dim = d if proj_dim is None else int(proj_dim)
        self.config: Dict[str, Any] = {}

    # ---- steps --------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x[B, C, H, W]`` -> ``[feat[B, D, H/16, W/16]]`` (``ValueError`` on a bad shape or size)."""
        self.encoder.check_input_shape(x)
        return [self.proj(self.encoder(x)[-1])]

    def prototypes(self, support_feats: List[torch.Tensor], support_mask: torch.Tensor) -> ClassPrototypes:
        """Support features (from ``encode``) and ``support_mask[S, H, W]`` -> ``ClassPrototypes``."""
        raise NotImplementedError  # pragma: no cover - abstract

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
        if feat.ndim != 4 or support_mask.ndim != 3 or feat.shape[0] != support_mask.shape[0]:
            raise ValueError(
                f"{self.who}.prototypes: expected features [S,D,h,w] and mask [S,H,W] with the same S, "
                f"got {tuple(feat.shape)} and {tuple(support_mask.shape)}"
            )
        if support_mask.shape[-2] < feat.shape[-2] or support_mask.shape[-1] < feat.shape[-1]:
            raise ValueError(
                f"{self.who}.prototypes: mask {tuple(support_mask.shape[-2:])} is smaller than the feature map "
                f"{tuple(feat.shape[-2:])}"
            )
        return feat

    # ---- the one forward ----------------------------------------------------------------------------------
    def forward(self, support_img: torch.Tensor, support_mask: torch.Tensor, query_img: torch.Tensor) -> SegOutput:
        """One episode: ``support_img[S, C, H, W]``, ``support_mask[S, H, W]``, ``query_img[Q, C, H, W]``.

        Returns:
            ``SegOutput(logits[Q, 2, H, W], aux)`` with ``aux["query_feat"] [Q, D, h, w]`` and
            ``aux["support_feat"] [S, D, h, w]`` (for the engine's PANet alignment loss), ``aux["prototypes"]``
            ``[N_bg + N_fg, D]`` (background rows first, the ``SegOutput`` convention), ``aux["class_prototypes"]``
            (the ``ClassPrototypes`` bundle) and ``aux["query_feats"]`` / ``aux["support_feats"]`` (the ``encode``
            lists, so the cyclic loss does not re-encode).
        """
        check_episode(self.who, support_img, support_mask, query_img)
        s = support_img.shape[0]
        feat = self.encode(torch.cat([support_img, query_img], dim=0))[-1]  # one batched pass
        support_feats, query_feats = [feat[:s]], [feat[s:]]
        protos = self.prototypes(support_feats, support_mask)
        logits = self.segment(query_feats, protos)
        return SegOutput(
            logits=logits,
            aux={
                "query_feat": query_feats[-1],
                "support_feat": support_feats[-1],
                "prototypes": torch.cat([protos.bg, protos.fg], dim=0),
                "class_prototypes": protos,
                "query_feats": query_feats,
                "support_feats": support_feats,
            },
        )


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


def adaptation_loss(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss of binary logits ``[N, 2, H, W]`` against ``target[N, H, W]`` in {0, 1}, in float32.

    ``"ce"``: cross-entropy; ``"dice"``: soft Dice of the foreground softmax; ``"dice_bce"``: 0.8 soft Dice + 0.2
    BCE on ``z = fg - bg`` (the foreground softmax's logit).
    """
    logits = logits.float()
    if loss == "ce":
        return weighted_cross_entropy(logits, target)
    if loss == "dice":
        return dice_loss(logits, target, softmax=True, include_background=False)
    return dice_bce_loss(logits[:, 1] - logits[:, 0], target.float())
