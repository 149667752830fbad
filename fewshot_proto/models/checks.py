"""Checks shared by the models: episode inputs of ``forward``, input sizes and constructor arguments."""
from __future__ import annotations

import numbers
from typing import Any, List, Optional, Sequence

import torch

__all__ = ["OUT_MODES", "check_classes", "check_episode", "check_feat_mask", "check_positive_int", "check_positive_number", "check_rate",
           "nearest_valid_size"]


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


OUT_MODES = ("sigmoid", "softmax")


def nearest_valid_size(n: int, stride: int) -> int:
    """The multiple of ``stride`` closest to ``n`` (ties go up; never below ``stride``)."""
    lower = (n // stride) * stride
    upper = lower + stride
    best = upper if (n - lower) >= (upper - n) else lower
    return max(stride, best)


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


def check_feat_mask(feat: torch.Tensor, mask: torch.Tensor, who: str) -> None:
    """Raise ``ValueError`` unless ``feat`` is ``[S, D, h, w]`` and ``mask`` ``[S, H, W]`` with ``H >= h``, ``W >= w``."""
    if feat.ndim != 4 or mask.ndim != 3 or feat.shape[0] != mask.shape[0]:
        raise ValueError(
            f"{who}: expected features [S,D,h,w] and mask [S,H,W] with the same S, "
            f"got {tuple(feat.shape)} and {tuple(mask.shape)}"
        )
    if mask.shape[-2] < feat.shape[-2] or mask.shape[-1] < feat.shape[-1]:
        raise ValueError(
            f"{who}: mask {tuple(mask.shape[-2:])} is smaller than the feature map {tuple(feat.shape[-2:])}"
        )
