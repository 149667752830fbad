"""Device and precision resolution (``engine.runtime``): ``Runtime`` is resolved once and passed down."""
import numpy as np
import pytest
import torch

from fewshot_proto.engine import runtime
from fewshot_proto.engine.runtime import Runtime, resolve_precision
from fewshot_proto.errors import ConfigError

CPU = torch.device("cpu")


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
    assert Runtime.resolve("cpu", "auto", threads=torch.get_num_threads()).precision == expected


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
    with Runtime.resolve("cpu", "auto", threads=torch.get_num_threads()).autocast():
        y = x @ w
    assert y.dtype == (torch.bfloat16 if resolve_precision("auto", CPU) == "bf16" else torch.float32)


def test_a_runtime_holds_only_resolved_values():
    assert Runtime() == Runtime(device=CPU, precision="fp32", channels_last=False, threads=None)
    with pytest.raises(ConfigError, match="precision must be resolved to fp32, bf16 or fp16, got 'auto'"):
        Runtime(precision="auto")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Runtime(precision="fp16")
    rt = Runtime.resolve("cpu", "bf16", channels_last=True, threads=torch.get_num_threads())
    assert (rt.device, rt.precision, rt.channels_last, rt.threads) == (CPU, "bf16", True, torch.get_num_threads())


def test_runtime_autocast_and_tensor():
    x, w = torch.randn(4, 8), torch.randn(8, 3)
    with Runtime(precision="bf16").autocast():
        assert (x @ w).dtype == torch.bfloat16
    with Runtime().autocast():
        assert (x @ w).dtype == torch.float32
    a = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    t = Runtime(channels_last=True).tensor(a, torch.float32)
    assert t.dtype == torch.float32 and t.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_array_equal(t.numpy(), a.astype(np.float32))
    assert Runtime().tensor(a[0, 0]).dtype == torch.float64  # 2-D: no memory format, dtype kept


def test_evaluate_and_predict_do_not_resolve_again(monkeypatch, phantom_dataset):
    """Given a Runtime, evaluation never re-reads the CPU flags or re-resolves precision."""
    from fewshot_proto.engine import evaluate
    from fewshot_proto.engine.evaluator import protocol_specs
    from fewshot_proto.config import ProtocolConfig
    from fewshot_proto.models import build_model

    def refuse(*_a, **_k):
        raise AssertionError("resolved again")

    monkeypatch.setattr(runtime, "resolve_precision", refuse)
    monkeypatch.setattr(runtime, "_cpu_flags", refuse)
    specs = protocol_specs(phantom_dataset, ProtocolConfig(test_classes=[2]))[:1]
    torch.manual_seed(0)
    model = build_model("panet")
    s = evaluate(model, phantom_dataset, specs, size=64, runtime=Runtime(precision="bf16"), distances=False)
    assert 0.0 <= s["mean_dice"] <= 1.0


def test_cpu_name_is_the_model_name_line(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu\n")
    real_open = open
    monkeypatch.setattr(runtime, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                            *a, **k), raising=False)
    assert runtime.cpu_name() == "AMD EPYC 9B14"


def test_cpu_features_are_the_speed_flags_present(monkeypatch, tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 amx_tile avx512f amx_bf16 avx512_vnni\n")
    real_open = open
    monkeypatch.setattr(runtime, "open", lambda path, *a, **k: real_open(info if path == "/proc/cpuinfo" else path,
                                                                            *a, **k), raising=False)
    assert runtime.cpu_features() == ["amx_bf16", "amx_tile", "avx2", "avx512f"]
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: frozenset())
    assert runtime.cpu_features() == []
