"""Device and precision resolution (``engine.runtime``)."""
import pytest
import torch

from fewshot_proto.engine import runtime
from fewshot_proto.engine.runtime import autocast, resolve_precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def fresh_cpu_flags():
    """The flags are read once per process; these tests fake ``/proc/cpuinfo``, so each reads it afresh."""
    runtime._cpu_flags.cache_clear()
    yield
    runtime._cpu_flags.cache_clear()


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse avx512f avx512_bf16 amx_tile", "bf16"),
    ("fpu sse avx512f amx_bf16", "bf16"),
    ("fpu sse avx2 avx512f", "fp32"),
])
def test_auto_precision_follows_the_cpu_flags(monkeypatch, tmp_path, flags, expected):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr(runtime, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                            *a, **k), raising=False)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("AUTO", CPU) == expected
    assert runtime._cpu_flags.cache_info().misses == 1  # read once, however often "auto" is resolved


def test_auto_precision_without_cpuinfo_is_fp32(monkeypatch):
    def missing(*_a, **_k):
        raise FileNotFoundError("/proc/cpuinfo")

    monkeypatch.setattr(runtime, "open", missing, raising=False)
    assert resolve_precision("auto", CPU) == "fp32"


def test_explicit_precisions_pass_through_and_unknown_ones_are_named():
    assert [resolve_precision(p, CPU) for p in ("fp32", "BF16", "fp16")] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="unknown precision 'fp8'; use one of auto, fp32, bf16, fp16"):
        resolve_precision("fp8", CPU)


def test_autocast_runs_what_auto_resolves_to():
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with autocast(CPU, "auto"):
        y = x @ w
    assert y.dtype == (torch.bfloat16 if resolve_precision("auto", CPU) == "bf16" else torch.float32)
    with autocast(CPU, "bf16"):
        assert (x @ w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast(CPU, "fp16")
