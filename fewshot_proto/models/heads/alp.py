"""PANet's and ALPNet's prototype bags from support features and a (soft) support mask.

* ``panet_prototypes``: one foreground and one background prototype, the per-shot masked averages of the features
  upsampled to the mask (PANet's ``getFeatures`` / ``getPrototype``), averaged over the shots.
* ``alpnet_prototypes``: SSL-ALPNet's adaptive local prototype pooling: window-pooled local prototypes where a
  window is (almost) all foreground or all background, plus per-slice global foreground prototypes, with PANet's
  single masked average as the fallback (see ``fewshot_proto.models.fsbaselines.alpnet`` for the method).

Both return ``ClassPrototypes(bg, fg)`` for ``scores.class_scores``.

Shape letters: S support slices, D feature channels, (h, w) feature size, (H, W) mask size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot_proto.models.heads.pooling import masked_average_pool
from fewshot_proto.models.heads.scores import ClassPrototypes

__all__ = ["mask_fraction", "local_prototypes", "alpnet_prototypes", "panet_prototypes"]


def panet_prototypes(feat: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-5) -> ClassPrototypes:
    """PANet's prototypes: per-shot masked averages (features upsampled to the mask), averaged over the shots.

    Args:
        feat: ``[S, D, h, w]`` support features.
        mask: ``[S, H, W]`` foreground mask (binary or soft); the background mask is ``1 - mask``.
        eps: added to every mask sum (an empty mask gives a zero vector).

    Returns:
        ``ClassPrototypes(bg[1, D], fg[1, D])``.
    """
    m = mask.float()
    fg = masked_average_pool(feat, m, eps=eps, pool_batch=False).mean(dim=0, keepdim=True)  # [1, D]
    bg = masked_average_pool(feat, 1.0 - m, eps=eps, pool_batch=False).mean(dim=0, keepdim=True)
    return ClassPrototypes(bg=bg, fg=fg)


def mask_fraction(mask: torch.Tensor, size: tuple) -> torch.Tensor:
    """``mask[S, H, W]`` -> ``frac[S, 1, h, w]``: the mean mask value of the pixels of every feature cell."""
    return F.adaptive_avg_pool2d(mask.float().unsqueeze(1), (int(size[0]), int(size[1])))


def local_prototypes(feat: torch.Tensor, frac: torch.Tensor, window: int, thresh: float) -> torch.Tensor:
    """Window-pooled feature vectors of the windows whose pooled ``frac`` is strictly above ``thresh``.

    Args:
        feat: ``[S, D, h, w]``.
        frac: ``[S, 1, h, w]`` per-cell class fraction (``mask_fraction``).
        window: ``L``: non-overlapping ``L x L`` windows (stride ``L``; trailing cells that do not fill a window
            are dropped, as ``nn.AvgPool2d`` does in SSL-ALPNet).
        thresh: selection threshold on the pooled fraction.

    Returns:
        ``[N, D]`` (``N`` may be 0), slice by slice in row-major window order.
    """
    h, w = int(feat.shape[-2]), int(feat.shape[-1])
    if window > h or window > w:
        raise ValueError(
            f"local_prototypes: pooling window {window} does not fit the {h}x{w} feature map; "
            f"use larger inputs or a smaller window"
        )
    pf = F.avg_pool2d(feat, window)  # [S, D, h', w']
    pm = F.avg_pool2d(frac, window)[:, 0]  # [S, h', w']
    return pf.permute(0, 2, 3, 1)[pm > thresh]


def _global(feat: torch.Tensor, frac: torch.Tensor, eps: float) -> tuple:
    """Per-slice masked averages ``[S, D]`` and mask sums ``[S]``."""
    den = frac.sum(dim=(1, 2, 3))  # [S]
    num = torch.einsum("sdhw,shw->sd", feat, frac[:, 0].to(feat.dtype))
    return num / (den + eps).to(num.dtype)[:, None], den


def alpnet_prototypes(
    feat: torch.Tensor,
    mask: torch.Tensor,
    *,
    window: int,
    gate_window: int,
    fg_thresh: float = 0.95,
    bg_thresh: float = 0.95,
    eps: float = 1e-5,
) -> ClassPrototypes:
    """ALPNet's background and foreground prototype bags (steps 2-5 of the module docstring).

    Args:
        feat: ``[S, D, h, w]`` support features.
        mask: ``[S, H, W]`` foreground mask (binary or soft), H and W multiples of h and w.
        window: local pooling window in feature cells.
        gate_window: window of the foreground gate (SSL-ALPNet: the training window, also at test time).
        fg_thresh: selection threshold of local foreground windows (and of the gate).
        bg_thresh: selection threshold of local background windows.
        eps: added to the mask sums of the global prototypes.

    Returns:
        ``ClassPrototypes(bg[N_bg, D], fg[N_fg, D])`` with ``N_bg, N_fg >= 1``.
    """
    frac = mask_fraction(mask, feat.shape[-2:])  # [S, 1, h, w]
    g_fg, den_fg = _global(feat, frac, eps)
    # the gate window is clamped to the feature map (tiny inputs); the local windows are not (they raise)
    gate_w = min(int(gate_window), int(feat.shape[-2]), int(feat.shape[-1]))
    gate = bool((F.avg_pool2d(frac, gate_w).amax() >= fg_thresh).item())
    if gate:
        local_fg = local_prototypes(feat, frac, window, fg_thresh)
        fg = torch.cat([local_fg, g_fg[den_fg > 0]], dim=0)
    else:
        fg = g_fg.mean(dim=0, keepdim=True)
    bg = local_prototypes(feat, 1.0 - frac, window, bg_thresh)
    if bg.shape[0] == 0:
        g_bg, _ = _global(feat, 1.0 - frac, eps)
        bg = g_bg.mean(dim=0, keepdim=True)
    return ClassPrototypes(bg=bg, fg=fg)
