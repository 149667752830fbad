"""ResNet-34 encoder (torchvision) with an optionally dilated last stage, following the contract in ``base.py``.

Feature pyramid for a 256x256 input (``dilate_last=True``, the default)::

    F1  conv1 + bn + relu            64 @ 128x128   reduction 2
    F2  maxpool + layer1             64 @  64x64    reduction 4
    F3  layer2                      128 @  32x32    reduction 8
    F4  layer3                      256 @  16x16    reduction 16
    F5  layer4 (stride 1, dil. 2)   512 @  16x16    reduction 16

torchvision refuses ``replace_stride_with_dilation`` for BasicBlock networks, so the last stage is converted by
hand: the first block's 3x3 conv and its 1x1 downsample get stride 1, and every 3x3 conv in ``layer4`` gets
dilation 2 and padding 2 (the receptive field keeps growing while the resolution stays at 1/16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torchvision.models import resnet34

from fewshot_proto.models.encoders.base import Encoder
from fewshot_proto.models.weights import read_state_file

__all__ = ["ResNet34Encoder", "IMAGENET_FILENAME", "imagenet_weights_path"]

#: File name of torchvision's ``ResNet34_Weights.IMAGENET1K_V1`` in the torch hub cache.
IMAGENET_FILENAME = "resnet34-b627a593.pth"
_IMAGENET_URL = "https://download.pytorch.org/models/" + IMAGENET_FILENAME


def imagenet_weights_path() -> Path:
    """Where ``weights="imagenet"`` looks for the ImageNet checkpoint: ``<torch hub dir>/checkpoints/...``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILENAME


def _adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Turn a ``[64, 3, 7, 7]`` RGB kernel into ``[64, in_channels, 7, 7]``.

    The RGB weights are averaged and rescaled by ``3 / in_channels``, so a grey image repeated over the
    ``in_channels`` channels gives exactly the response the RGB network gives to that grey image tiled to RGB
    (for ``in_channels == 1`` this is the sum of the RGB kernels).
    """
    mean = weight.mean(dim=1, keepdim=True)  # [64, 1, 7, 7]
    return (mean * (3.0 / in_channels)).repeat(1, in_channels, 1, 1).contiguous()


class ResNet34Encoder(Encoder):
    """torchvision ResNet-34 as a feature-pyramid encoder (five maps, fine to coarse; see the module docstring).

    Args:
        in_channels: image channels. ``3`` is the torchvision layout; other values adapt ``conv1`` (pretrained
            RGB kernels are averaged, see ``_adapt_first_conv``).
        weights: ``None`` (random init, the default), ``"imagenet"`` (torchvision ``IMAGENET1K_V1`` read from the
            local torch hub cache only, never downloaded) or a path to a ``state_dict`` file (a torchvision
            ResNet-34 or this encoder; ``fc.*`` keys are ignored) or to a fewshot_proto checkpoint (its model's
            ``encoder.*`` weights: a two-stage recipe starts from another run's trained encoder), read with
            ``weights_only=True``.
        dilate_last: make ``layer4`` stride 1 / dilation 2 (output stride 16 instead of 32).

    Raises:
        FileNotFoundError: ``weights="imagenet"`` and the checkpoint is not in the hub cache, or the path is missing.
        ValueError: bad ``in_channels``/``weights`` or a state dict that does not fit.
    """

    def __init__(
        self,
        in_channels: int = 3,
        weights: Union[None, str, Path] = None,
        dilate_last: bool = True,
    ) -> None:
        super().__init__()
        if int(in_channels) < 1:
            raise ValueError(f"ResNet34Encoder: in_channels must be >= 1, got {in_channels}")
        self.in_channels = int(in_channels)
        self.dilate_last = bool(dilate_last)
        self.out_channels = (64, 64, 128, 256, 512)
        self.reductions = (2, 4, 8, 16, 16) if self.dilate_last else (2, 4, 8, 16, 32)

        net = resnet34(weights=None)
        state = self._read_weights(weights)
        rgb_conv1 = net.conv1
        if self.in_channels != 3:
            net.conv1 = nn.Conv2d(self.in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if state is not None:
            w = state.get("conv1.weight")
            adapt = w is not None and w.ndim == 4 and w.shape[1] == 3 and self.in_channels != 3
            if adapt:  # an RGB checkpoint for a non-RGB encoder: load into the RGB conv, then average
                state = dict(state)
                with torch.no_grad():
                    rgb_conv1.weight.copy_(state.pop("conv1.weight"))
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as e:  # size mismatches
                raise ValueError(f"ResNet34Encoder: weights {weights!s} do not fit a ResNet-34: {e}") from None
            missing = [k for k in missing if not k.startswith("fc.") and not (adapt and k == "conv1.weight")]
            if adapt:
                with torch.no_grad():
                    net.conv1.weight.copy_(_adapt_first_conv(rgb_conv1.weight, self.in_channels))
            if missing or unexpected:
                raise ValueError(
                    f"ResNet34Encoder: weights {weights!s} do not fit a ResNet-34 "
                    f"(missing keys {list(missing)[:5]}, unexpected keys {list(unexpected)[:5]})"
                )

        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if self.dilate_last:
            self._dilate_layer4()

    def _dilate_layer4(self) -> None:
        first = self.layer4[0]
        first.conv1.stride = (1, 1)
        if first.downsample is not None:
            first.downsample[0].stride = (1, 1)
        for block in self.layer4:
            for conv in (block.conv1, block.conv2):
                conv.dilation = (2, 2)
                conv.padding = (2, 2)

    @staticmethod
    def _read_weights(weights: Union[None, str, Path]) -> Optional[Dict[str, torch.Tensor]]:
        """Load a state dict for a torchvision ResNet-34 (``fc.*`` dropped), or ``None`` for random init."""
        if weights is None:
            return None
        if isinstance(weights, str) and weights.lower() == "imagenet":
            path = imagenet_weights_path()
            if not path.is_file():
                raise FileNotFoundError(
                    f"ResNet34Encoder(weights='imagenet'): {path} not found. fewshot_proto never downloads weights; "
                    f"copy torchvision's ResNet34_Weights.IMAGENET1K_V1 file ({_IMAGENET_URL}) to that path "
                    f"(or set TORCH_HOME), or pass weights=None / weights='<path to a state dict>'."
                )
        elif isinstance(weights, (str, Path)):
            path = Path(weights).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"ResNet34Encoder: weights file {path} does not exist")
        else:
            raise ValueError(f"ResNet34Encoder: weights must be None, 'imagenet' or a path, got {weights!r}")
        sf = read_state_file(path, "ResNet34Encoder: weights file")
        state = sf.state
        if sf.model_name is not None:  # a fewshot_proto checkpoint: the model's encoder
            prefix = "encoder."
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not state:
                raise ValueError(f"ResNet34Encoder: checkpoint {path} (model {sf.model_name!r}) has no encoder.* "
                                 f"weights")
        return {k: v for k, v in state.items() if not k.startswith("fc.")}

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``x[B, C, H, W]`` -> ``[F1, F2, F3, F4, F5]`` (shapes in the module docstring)."""
        f1 = self.relu(self.bn1(self.conv1(x)))
        f2 = self.layer1(self.maxpool(f1))
        f3 = self.layer2(f2)
        f4 = self.layer3(f3)
        f5 = self.layer4(f4)
        return [f1, f2, f3, f4, f5]
