"""``benchmarks/chaos_t2_fewshot.py``: the over-folds summary (hand-built rows) and a smoke run on real CHAOS-T2
(skipped when ``../shared/data`` is absent)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "chaos_t2_fewshot.py"


def _bench():
    spec = importlib.util.spec_from_file_location("chaos_t2_fewshot", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(fold, r, l, group="23", budget=600.0, lambda_dice=0.0):
    return {"model": 'cwpa_unet "f5"', "group": group, "fold": fold, "test_classes": [int(c) for c in group],
            "budget_seconds": budget, "train_seconds": budget, "iters": 100, "seconds_per_iter": 0.3,
            "eval_seconds": 4.0, "precision": "bf16", "mode": "mixed", "lambda_dice": lambda_dice,
            "dice": {"2": r, "3": l}, "mean_dice": (r + l) / 2, "query_scans": ["1"]}


def test_fold_summary_pools_the_folds_of_one_configuration():
    bench = _bench()
    runs = [_row(0, 40.0, 60.0), _row(1, 60.0, 40.0), _row(2, 50.0, 50.0),
            _row(0, 10.0, 20.0, budget=2015.0),  # another budget: its own row, a single fold
            _row(3, 30.0, 30.0, lambda_dice=1.0)]  # another Dice weight: its own row
    summary = {(s["budget_seconds"], s["lambda_dice"]): s for s in bench.fold_summary(runs)}
    assert set(summary) == {(600.0, 0.0), (2015.0, 0.0), (600.0, 1.0)}
    s = summary[(600.0, 0.0)]
    assert s["folds"] == [0, 1, 2]
    # right kidney 40, 60, 50: mean 50, population std sqrt(200/3)
    assert s["dice"]["2"][0] == pytest.approx(50.0) and s["dice"]["2"][1] == pytest.approx((200 / 3) ** 0.5)
    assert s["mean"] == pytest.approx((50.0, 0.0))  # every fold's mean is 50
    assert summary[(2015.0, 0.0)]["folds"] == [0]

    md = bench.to_markdown({"reference": bench.REFERENCE, "runs": runs})
    over = md.split("## Over folds")[1]
    assert "| 0,1,2 | R kidney 50.0 ± 8.2, L kidney 50.0 ± 8.2 | 50.0 ± 0.0 |" in over
    assert "| 2015 |" not in over and "| 3 |" not in over  # single-fold configurations stay in the per-run table


def test_no_over_folds_section_for_single_folds():
    bench = _bench()
    md = bench.to_markdown({"reference": bench.REFERENCE, "runs": [_row(0, 40.0, 60.0), _row(0, 1.0, 2.0, "14")]})
    assert "## Over folds" not in md and md.count("| cwpa_unet") == 2


@pytest.mark.realdata
def test_smoke_run_on_real_chaos_t2(real_data_dir, tmp_path):
    data = real_data_dir / "chaos_t2"
    if not data.is_dir():
        pytest.skip(f"{data} not present")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(data), "--folds", "1", "--seconds", "2",
         "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=600, cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "results" / "chaos_t2_fewshot.json").read_text())
    (row,) = doc["runs"]
    assert row["fold"] == 1 and row["test_classes"] == [2, 3] and row["iters"] >= 1
    assert set(row["dice"]) == {"2", "3"} and all(0.0 <= v <= 100.0 for v in row["dice"].values())
    assert row["mean_dice"] == pytest.approx(sum(row["dice"].values()) / 2, abs=0.01)
    assert len(row["query_scans"]) >= 3
    assert (tmp_path / "runs" / "g23_f1" / "eval" / "metrics.json").is_file()
    assert "| {2,3} | 1 |" in (tmp_path / "results" / "chaos_t2_fewshot.md").read_text()


def test_report_only_rewrites_the_markdown_from_the_json(tmp_path):
    bench = _bench()
    doc = {"reference": bench.REFERENCE, "runs": [_row(1, 40.0, 60.0), _row(2, 60.0, 40.0)]}
    (tmp_path / "chaos_t2_fewshot.json").write_text(json.dumps(doc))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--report-only", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "chaos_t2_fewshot.md").read_text()
    assert md == bench.to_markdown(doc) and "| 1,2 | R kidney 50.0 ± 10.0, L kidney 50.0 ± 10.0 | 50.0 ± 0.0 |" in md
    missing = subprocess.run([sys.executable, str(SCRIPT), "--report-only", "--out", str(tmp_path / "none")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no results at" in missing.stderr
