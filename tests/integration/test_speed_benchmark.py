"""Smoke test of ``benchmarks/speed.py --quick``: the whole pipeline runs (GEMM peak, training and evaluation
subprocesses, FLOP counting) and writes a consistent JSON + markdown report.

The numbers of a quick run say nothing about the targets (tiny images, two steps, a shared machine); what is
checked is that every measured quantity is present, finite, positive and consistent with the others.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_speed_quick_writes_consistent_report(tmp_path, phantom_cache):
    out = tmp_path / "speed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick", "--threads", "1",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    doc = json.loads((tmp_path / "speed.json").read_text())
    md = (tmp_path / "speed.md").read_text()

    s = doc["settings"]
    assert s["quick"] and s["size"] == 32 and s["threads"] == 1 and doc["precisions"] == ["fp32"]
    assert doc["machine"]["threads"] == 1 and doc["machine"]["torch"]

    tr, ev = doc["train"]["fp32"], doc["eval"]["fp32"]
    # training: the timed steps are the ones after the warm-up, read from the run's log
    assert tr["steps"] == s["warmup"] + s["steps"] and len(tr["step_seconds"]) == s["steps"]
    assert all(_positive(t) for t in tr["step_seconds"])
    assert min(tr["step_seconds"]) <= tr["step"]["median"] <= max(tr["step_seconds"])
    assert 0 <= tr["sample_share"] < 1 and _positive(tr["peak_rss_gib"])
    assert (tmp_path / "work" / "train_fp32" / "checkpoint.pt").is_file()
    # evaluation of the trained model: per-slice figures are the same seconds over the counted slices
    assert ev["trained_model"] and ev["volumes"] >= 1 and ev["query_slice_classes"] >= ev["query_slices"] >= 1
    assert math.isclose(ev["s_per_query_slice_per_class"] * ev["query_slice_classes"], ev["seconds"])
    assert math.isclose(ev["s_per_volume"] * ev["volumes"], ev["seconds"])
    assert _positive(ev["seconds"]) and _positive(ev["peak_rss_gib"]) and 0 <= ev["mean_dice"] <= 1
    # FLOPs, GEMM peak and their ratio
    assert _positive(doc["flops_per_step"]["fp32"])
    assert _positive(doc["gemm_peak_gflops"]["fp32"]) and _positive(doc["gemm_peak_gflops"]["bf16"])
    assert math.isclose(doc["achieved_gflops"]["fp32"],
                        doc["flops_per_step"]["fp32"] / tr["step"]["median"] / 1e9)
    assert math.isclose(doc["gflops_fraction_of_gemm_peak"]["fp32"],
                        doc["achieved_gflops"]["fp32"] / doc["gemm_peak_gflops"]["fp32"])
    assert _positive(doc["sampler_seconds"]["median"])

    # every metric row is finite; targeted rows carry a verdict that matches value and bound
    rows = {(r["metric"], r["precision"]): r for r in doc["metrics"]}
    for r in rows.values():
        assert math.isfinite(r["value"]) and r["value"] >= 0, r
    step = rows[("train_step_median_s", "fp32")]
    assert step["target"] == "<= 0.6" and step["pass"] == (step["value"] <= 0.6)
    rss = rows[("train_peak_rss_gib", "fp32")]
    assert rss["pass"] == (rss["value"] <= 1.5)
    assert rows[("eval_peak_rss_gib", "fp32")]["pass"] is None  # no target: informational

    assert "| metric | precision | measured | target | pass |" in md and "--quick smoke run" in md
    assert "training step, median" in proc.stdout
