"""Input checks shared by every episodic model's ``forward``."""
from __future__ import annotations

import torch

__all__ = ["check_episode"]


def check_episode(who: str, support_img: torch.Tensor, support_mask: torch.Tensor, query_img: torch.Tensor) -> None:
    """Raise ``ValueError`` unless the images are ``[N, C, H, W]`` alike and the mask is ``[S, H, W]``."""
    for name, t in (("support_img", support_img), ("support_mask", support_mask), ("query_img", query_img)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{who}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if support_img.ndim != 4 or query_img.ndim != 4:
        raise ValueError(
            f"{who}: images must be [N,C,H,W]; got support {tuple(support_img.shape)}, query {tuple(query_img.shape)}"
        )
    if support_img.shape[0] < 1 or query_img.shape[0] < 1:
        raise ValueError(
            f"{who}: need at least one support and one query slice; got support {tuple(support_img.shape)}, "
            f"query {tuple(query_img.shape)}"
        )
    if support_img.shape[1:] != query_img.shape[1:]:
        raise ValueError(
            f"{who}: support {tuple(support_img.shape)} and query {tuple(query_img.shape)} differ in channels or size"
        )
    if tuple(support_mask.shape) != (support_img.shape[0],) + tuple(support_img.shape[2:]):
        raise ValueError(
            f"{who}: support_mask {tuple(support_mask.shape)} does not match support_img "
            f"{tuple(support_img.shape)} (expected [S,H,W])"
        )
