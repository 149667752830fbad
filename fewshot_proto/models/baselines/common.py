"""What the supervised baselines share besides their base class (``models.base.SupervisedSegmenter``): the output
head, the squeeze-and-excitation block and a parameter count.

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

import torch
from torch import nn

from fewshot_proto.models.checks import OUT_MODES, check_positive_int

__all__ = ["SegHead", "SEBlock", "count_parameters"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


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
