"""Where and how a process computes: device, precision, memory format and threads, resolved once (``Runtime``).

Each entry point (``train``, the ``evaluate`` and ``predict`` CLIs) builds one :class:`Runtime` with
:meth:`Runtime.resolve` at start (``"auto"`` device and precision decided there, threads set there) and passes it
down; nothing below resolves them again.

    rt = Runtime.resolve(device="auto", precision="auto", channels_last=False, threads=None)
    with rt.autocast():
        logits = model(rt.tensor(support_img), ...)
"""
from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from typing import Any, FrozenSet, List, Optional

import numpy as np
import torch

from fewshot_proto.config import PRECISIONS
from fewshot_proto.errors import ConfigError

__all__ = ["Runtime", "cpu_name", "cpu_features", "resolve_device", "resolve_precision", "native_bf16",
           "configure_threads", "to_memory_format"]


@dataclass(frozen=True)
class Runtime:
    """A resolved device, precision (``"fp32"``, ``"bf16"`` or ``"fp16"``, never ``"auto"``), memory format and
    thread count. Build it with :meth:`resolve` (or :meth:`from_train_config`); ``Runtime()`` is CPU in fp32."""

    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    channels_last: bool = False
    threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"Runtime: precision must be resolved to fp32, bf16 or fp16, got {self.precision!r}")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 on CPU")

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", channels_last: bool = False,
                threads: Optional[int] = None) -> "Runtime":
        """Decide ``"auto"`` device and precision, set torch's thread count (:func:`configure_threads`)."""
        dev = resolve_device(device)
        return cls(device=dev, precision=resolve_precision(precision, dev), channels_last=bool(channels_last),
                   threads=configure_threads(threads))

    @classmethod
    def from_train_config(cls, t: Any) -> "Runtime":
        """From a ``TrainConfig`` (``device``, ``precision``, ``channels_last``, ``threads``)."""
        return cls.resolve(t.device, t.precision, t.channels_last, t.threads)

    def autocast(self):
        """The autocast context of ``precision`` (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def tensor(self, array: Any, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A numpy array or tensor on ``device`` (as ``dtype`` if given), channels-last when 4-D and asked for."""
        t = torch.from_numpy(np.ascontiguousarray(array)) if isinstance(array, np.ndarray) else array
        t = t.to(self.device) if dtype is None else t.to(self.device, dtype=dtype)
        return to_memory_format(t, self.channels_last)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when present, else CPU; ``"cuda"`` without a GPU raises a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but no CUDA GPU is available; use auto or cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (so bf16 autocast is faster than fp32, not emulated).

    CUDA: ``torch.cuda.is_bf16_supported()`` (Ampere and newer). CPU: the ``avx512_bf16`` or ``amx_bf16`` flag in
    ``/proc/cpuinfo`` (Linux; ``False`` where that file does not exist).
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` where that file does not exist): every
    timing is recorded with it, since speeds compare only as ratios measured on one machine."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: the feature flags that decide CPU training speed here (bf16 matmuls run natively with avx512_bf16 or amx_bf16)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_features() -> List[str]:
    """The CPU's speed-relevant feature flags (:data:`SPEED_FLAGS` it has, sorted), recorded with every timing
    beside :func:`cpu_name`: two machines with one model name can differ in them."""
    flags = _cpu_flags()
    return sorted(f for f in SPEED_FLAGS if f in flags)


def _cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where the file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the device has native bf16 (``native_bf16``), else ``"fp32"``; other values
    are checked and returned lower-cased."""
    p = str(precision).lower()
    if p not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if p == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return p


def configure_threads(threads: Optional[int] = None) -> int:
    """Set torch intra-op threads (default: the cores this process may use) and return the number used."""
    if threads is None:
        env = os.environ.get("OMP_NUM_THREADS")
        if env and env.isdigit():
            threads = int(env)
        else:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # pragma: no cover - non-Linux
                threads = os.cpu_count() or 1
    threads = max(1, int(threads))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
