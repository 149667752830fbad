"""Device, precision and thread settings shared by training, evaluation and prediction."""
from __future__ import annotations

import contextlib
import functools
import os
from typing import FrozenSet, Optional

import torch

from fewshot_proto.config import PRECISIONS
from fewshot_proto.errors import ConfigError

__all__ = ["resolve_device", "resolve_precision", "native_bf16", "autocast", "configure_threads", "to_memory_format"]


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


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags from ``/proc/cpuinfo``, read once per process (``autocast(device, "auto")`` runs
    per batch in evaluation); empty where the file does not exist."""
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


def autocast(device: torch.device, precision: str = "fp32"):
    """Autocast context for ``precision`` in {"auto", "fp32", "bf16", "fp16"} (fp16 only on CUDA; ``"auto"`` as
    ``resolve_precision``)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; use bf16 on CPU")
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    raise ConfigError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")


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
