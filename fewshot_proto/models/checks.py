"""Checks shared by the models: episode inputs of ``forward`` and constructor arguments."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_episode", "check_positive_int", "check_positive_number", "check_rate"]


def check_positive_int(name: str, value: Any, model: str) -> int:
    """Return ``value`` if it is an int >= 1, else raise ``ValueError`` naming the model and argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{model}: {name} must be a positive integer, got {value!r}")
    return value


def check_positive_number(name: str, value: Any, model: str) -> float:
    """Return ``value`` as a float if it is a real number > 0 (not a bool), else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) > 0:
        raise ValueError(f"{model}: {name} must be a positive number, got {value!r}")
    return float(value)


def check_rate(name: str, value: Any, model: str) -> float:
    """Return ``value`` as a float if it is a number in [0, 1) (a rate, fraction or probability), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{model}: {name} must be in [0, 1), got {value!r}")
    return float(value)


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
