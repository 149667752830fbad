"""Correlation-weighted prototype aggregation (CWPA), DESIGN.md section 3.

Three separate steps, so evaluation can compute the prototypes of a support once and reuse them for every query:

1. ``local_prototypes(feat_s, mask_s, tau)`` -> ``P[N_pro, D]``: the support mask is average-pooled to the feature
   grid; every cell whose foreground fraction exceeds ``tau`` contributes its feature vector as a prototype.
   k-shot: all S support slices go into one bag. If no cell passes anywhere in the bag (small organs), the bag is
   the single masked average of the features upsampled to the mask size, so ``N_pro >= 1`` and nothing is NaN
   (an all-zero mask gives the zero vector). ``bag="masked_average"`` (an ablation: PANet's one prototype
   instead of local ones) always uses that single masked average, so ``P_agg`` is the same vector everywhere.
2. ``correlation(feat_q, P)`` -> ``C[Q, N_pro, h, w]``: cosine similarity of mean-centred query vectors and
   mean-centred prototypes (centred over D: a Pearson correlation), computed in float32.
3. ``aggregate(C, P, temperature)`` -> ``P_agg[Q, D, h, w] = sum_j softmax_j(C / t)_j * P_j`` with the original
   (uncentred) prototypes; ``enhance(feat_q, P, t)`` -> ``cat(feat_q, P_agg * feat_q)`` ``[Q, 2D, h, w]``.

Shape letters: S support slices, Q query slices, D channels, (h, w) feature size, (H, W) mask size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.models.checks import check_feat_mask
from fewshot_proto.models.heads.pooling import masked_average_pool

__all__ = ["local_prototypes", "bag_prototypes", "correlation", "aggregate", "enhance", "CWPA", "BAGS"]

#: values of ``CWPA(bag=...)``: local prototypes (DESIGN.md section 3) or one masked average (ablation)
BAGS = ("local", "masked_average")


def local_prototypes(
    feat: torch.Tensor, mask: torch.Tensor, tau: float = 0.5, *, eps: float = 1e-5
) -> torch.Tensor:
    """Local prototypes of one support bag.

    Args:
        feat: ``[S, D, h, w]`` support bottleneck features.
        mask: ``[S, H, W]`` support mask (float, binary or soft).
        tau: a feature cell is a prototype when its average mask value is strictly above ``tau``.
        eps: added to the mask sum of the fallback masked average.

    Returns:
        ``[N_pro, D]`` with ``N_pro >= 1``: the F5 vectors of all passing cells of all S slices (row-major,
        slice by slice), or the single masked average (PANet-style: features upsampled bilinearly to ``H x W``)
        when no cell passes.
    """
    check_feat_mask(feat, mask, "local_prototypes")
    h, w = int(feat.shape[-2]), int(feat.shape[-1])
    cell = F.adaptive_avg_pool2d(mask.detach().float().unsqueeze(1), (h, w))[:, 0]  # [S, h, w]
    keep = cell > tau
    if bool(keep.any()):
        return feat.permute(0, 2, 3, 1)[keep]  # [N_pro, D]
    return masked_average_pool(feat, mask, eps=eps, pool_batch=True).unsqueeze(0)  # [1, D]


def bag_prototypes(
    feat: torch.Tensor,
    mask: torch.Tensor,
    tau: float = 0.5,
    *,
    use_background: bool = False,
    bag: str = "local",
    eps: float = 1e-5,
) -> torch.Tensor:
    """Foreground prototypes, followed by background ones (from ``1 - mask``) when ``use_background``.

    ``bag="local"``: :func:`local_prototypes` (``[N_pro, D]``); ``bag="masked_average"``: the single masked average
    of the features upsampled to the mask size (``[1, D]``, and ``[2, D]`` with the background one).
    """
    if bag == "local":
        def pool(m: torch.Tensor) -> torch.Tensor:
            return local_prototypes(feat, m, tau, eps=eps)
    elif bag == "masked_average":
        check_feat_mask(feat, mask, "bag_prototypes")

        def pool(m: torch.Tensor) -> torch.Tensor:
            return masked_average_pool(feat, m, eps=eps, pool_batch=True).unsqueeze(0)
    else:
        raise ValueError(f"bag_prototypes: bag must be one of {', '.join(BAGS)}, got {bag!r}")
    fg = pool(mask)
    if not use_background:
        return fg
    return torch.cat([fg, pool(1.0 - mask.float())], dim=0)


def correlation(query_feat: torch.Tensor, prototypes: torch.Tensor, *, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of every query vector with every prototype.

    Args:
        query_feat: ``[Q, D, h, w]``.
        prototypes: ``[N_pro, D]``.

    Returns:
        float32 ``[Q, N_pro, h, w]`` in ``[-1, 1]`` (0 where a vector is constant over D).
    """
    if query_feat.ndim != 4 or prototypes.ndim != 2 or query_feat.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"correlation: expected query_feat [Q,D,h,w] and prototypes [N,D] with the same D, "
            f"got {tuple(query_feat.shape)} and {tuple(prototypes.shape)}"
        )
    with torch.autocast(device_type=query_feat.device.type, enabled=False):
        q = query_feat.float()
        p = prototypes.float()
        q = F.normalize(q - q.mean(dim=1, keepdim=True), dim=1, eps=eps)
        p = F.normalize(p - p.mean(dim=1, keepdim=True), dim=1, eps=eps)
        return torch.einsum("qdhw,nd->qnhw", q, p)


def aggregate(corr: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``P_agg[Q, D, h, w] = sum_j softmax_j(corr / temperature) * prototypes[j]`` (float32).

    Args:
        corr: ``[Q, N_pro, h, w]`` from ``correlation``.
        prototypes: ``[N_pro, D]`` original (uncentred) prototypes.
        temperature: softmax temperature ``t > 0`` (smaller is sharper).
    """
    if temperature <= 0:
        raise ValueError(f"aggregate: temperature must be > 0, got {temperature}")
    with torch.autocast(device_type=corr.device.type, enabled=False):
        weights = torch.softmax(corr.float() / float(temperature), dim=1)
        return torch.einsum("qnhw,nd->qdhw", weights, prototypes.float())


def enhance(query_feat: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Enhanced query features ``cat(F_q, P_agg * F_q)`` -> ``[Q, 2D, h, w]`` in ``query_feat``'s dtype."""
    p_agg = aggregate(correlation(query_feat, prototypes), prototypes, temperature).to(query_feat.dtype)
    return torch.cat([query_feat, p_agg * query_feat], dim=1)


class CWPA(nn.Module):
    """Thin module over the CWPA functions (no parameters).

    Args:
        tau: cell threshold for local prototypes.
        temperature: softmax temperature of the aggregation.
        use_background: also put background local prototypes (cells of ``1 - mask`` above ``tau``) in the bag.
        bag: ``"local"`` (DESIGN.md section 3) or ``"masked_average"`` (one masked-average prototype: the
            ablation that removes the local prototypes; ``tau`` is then unused).
        eps: numerical guard of the fallback masked average.

    ``prototypes(feat_s, mask_s) -> [N_pro, D]``; ``forward(feat_q, prototypes) -> [Q, 2D, h, w]``.
    """

    def __init__(
        self, tau: float = 0.5, temperature: float = 0.1, use_background: bool = False, bag: str = "local",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if bag not in BAGS:
            raise ValueError(f"CWPA: bag must be one of {', '.join(BAGS)}, got {bag!r}")
        self.bag = bag
        if not 0.0 <= tau < 1.0:
            raise ValueError(f"CWPA: tau must be in [0, 1), got {tau}")
        if temperature <= 0:
            raise ValueError(f"CWPA: temperature must be > 0, got {temperature}")
        self.tau = float(tau)
        self.temperature = float(temperature)
        self.use_background = bool(use_background)
        self.eps = float(eps)

    def prototypes(self, support_feat: torch.Tensor, support_mask: torch.Tensor) -> torch.Tensor:
        """``support_feat[S, D, h, w]``, ``support_mask[S, H, W]`` -> ``[N_pro, D]``."""
        return bag_prototypes(
            support_feat, support_mask, self.tau, use_background=self.use_background, bag=self.bag, eps=self.eps
        )

    def forward(self, query_feat: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``query_feat[Q, D, h, w]``, ``prototypes[N_pro, D]`` -> enhanced ``[Q, 2D, h, w]``."""
        return enhance(query_feat, prototypes, self.temperature)

    def extra_repr(self) -> str:
        return (f"tau={self.tau}, temperature={self.temperature}, use_background={self.use_background}, "
                f"bag={self.bag!r}")
