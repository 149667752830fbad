"""Scoring query features against prototypes: the prototype bundle, the multi-prototype cosine score and cosine logits.

The score of class ``c`` at a query position is (SSL-ALPNet's ``MultiProtoAsConv``)::

    d_j    = scaler * cos(f_q, P_j)            for the prototypes P_j of class c
    s_c    = sum_j softmax_j(d)_j * d_j        (a soft maximum over the class's prototypes)

With a single prototype per class this is exactly PANet's ``scaler * cos(f_q, P_c)``, so one scoring function
serves PANet, ALPNet and the matcher head of ``cwpa_unet_matcher``. The two class scores ``[bg, fg]`` are computed
at feature resolution and upsampled bilinearly to the input size: they are the logits.

Shape letters: Q query slices, D feature channels, (h, w) feature size, N number of prototypes of one class.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["SCALER", "ClassPrototypes", "safe_normalize", "class_score", "class_scores", "cosine_logits"]

#: the cosine multiplier of PANet and SSL-ALPNet (``d = SCALER * cos``), the default of every model and loss here
SCALER = 20.0


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
    feat: torch.Tensor, prototypes: torch.Tensor, scaler: float = SCALER, *, eps: float = 1e-4
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


def cosine_logits(feat: torch.Tensor, prototypes: torch.Tensor, scaler: float = SCALER) -> torch.Tensor:
    """``scaler * cos(feat[n, :, i, j], prototypes[k])`` -> ``[N, K, h, w]``.

    ``feat`` is ``[N, D, h, w]`` and ``prototypes`` ``[K, D]``.

    A zero prototype (or feature) gives similarity 0, not NaN.
    """
    f = F.normalize(feat.float(), dim=1, eps=1e-8)
    p = F.normalize(prototypes.float(), dim=1, eps=1e-8)
    return torch.einsum("ndhw,kd->nkhw", f, p) * float(scaler)
