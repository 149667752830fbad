"""``benchmarks/grid.py`` end to end on ``benchmarks/grids/phantom_tiny.yaml`` (10 phantoms at 64 px, 2 methods and
a two-stage row, 2 training steps each): runs land in the store, a second invocation runs nothing, ``--only`` runs a
subset, a truncated last line is tolerated, the two-stage row trains on the first stage's frozen encoder, and
``--executor submitit-local`` lands the same record through a job."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from fewshot_proto.engine import runtime

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
GRID_FILE = BENCH / "grids" / "phantom_tiny.yaml"
FIELDS = {"id", "grid", "method", "model", "kind", "test_group", "fold", "seed", "setting", "budget_seconds",
          "init_from", "n_labelled", "early_stopping", "config", "steps", "train_seconds", "seconds_per_step",
          "train_wall_seconds",
          "eval_seconds", "precision", "mean_dice", "per_class", "rows", "machine", "version", "time"}


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The grid module, with the phantom cache in a private folder (inherited by submitit jobs)."""
    old = os.environ.get("FEWSHOT_PROTO_CACHE")
    os.environ["FEWSHOT_PROTO_CACHE"] = str(tmp_path_factory.mktemp("grid_cache"))
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("grid")
    finally:
        sys.path.remove(str(BENCH))
        if old is None:
            os.environ.pop("FEWSHOT_PROTO_CACHE", None)
        else:
            os.environ["FEWSHOT_PROTO_CACHE"] = old


def _main(grid, tmp, store, *extra):
    return grid.main([str(GRID_FILE), "--store", str(store), "--runs", str(tmp / "runs"), *extra])


def test_run_resume_only_and_truncated_line(grid, tmp_path, capsys):
    store = tmp_path / "grid_phantom_tiny.jsonl"
    ids = {r.method: r.id for r in grid.load_grid(GRID_FILE).runs}
    assert sorted(ids) == ["alpnet", "panet", "panet_then_cwpa"]

    assert _main(grid, tmp_path, store) == 0
    recs = grid.read_store(store)
    assert sorted((r["method"], r["id"]) for r in recs) == sorted((m, i) for m, i in ids.items())
    for r in recs:
        assert set(r) == FIELDS, set(r) ^ FIELDS
        assert (r["steps"], r["test_group"], r["fold"], r["seed"], r["setting"], r["budget_seconds"]) == (
            2, [2, 3], 0, 0, 2, 5.0)
        assert r["kind"] == "fewshot" and r["config"]["train"]["out"] == str(tmp_path / "runs" / r["id"])
        assert r["machine"]["cpu"] == runtime.cpu_name() and r["machine"]["cpu_flags"] == runtime.cpu_features()
        assert r["init_from"] == (ids["panet"] if r["method"] == "panet_then_cwpa" else None)
        assert sorted(r["per_class"]) == ["2", "3"] and 0.0 <= r["mean_dice"] <= 1.0
        assert {(x["scan"], x["class"]) for x in r["rows"]} == {(s, c) for s in ("1", "2") for c in (2, 3)}
        assert (tmp_path / "runs" / r["id"] / "checkpoint.pt").is_file()
    out = capsys.readouterr().out
    assert "3 to run" in out and "[3/3] done in" in out and "ETA" in out

    # the two-stage run started from panet's final encoder and kept it frozen (weights and batch-norm statistics);
    # what sits on it trained
    from fewshot_proto.models.weights import read_state_file
    first = read_state_file(tmp_path / "runs" / ids["panet"] / "checkpoint.pt").state
    second = read_state_file(tmp_path / "runs" / ids["panet_then_cwpa"] / "checkpoint.pt").state
    enc = [k for k in first if k.startswith("encoder.")]
    assert enc and all(torch.equal(first[k], second[k]) for k in enc)
    assert any("running_mean" in k for k in enc)
    two = [r for r in recs if r["method"] == "panet_then_cwpa"][0]
    assert two["config"]["model"]["kwargs"]["weights"] == str(tmp_path / "runs" / ids["panet"] / "checkpoint.pt")
    assert two["config"]["train"]["freeze"] == ["encoder"]

    # resume: nothing left to run
    before = store.read_text()
    assert _main(grid, tmp_path, store) == 0
    assert "3 already in" in capsys.readouterr().out and store.read_text() == before

    # a writer killed mid-line: the dry run still sees both runs done, with a warning
    store.write_text(before + '{"id": "' + ids["panet"] + '", "met')
    with pytest.warns(UserWarning, match="truncated last line"):
        assert _main(grid, tmp_path, store, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"done  {ids['panet']} panet" in out and f"done  {ids['alpnet']} alpnet" in out

    # the second stage alone, into a fresh store, is refused before any work: its first stage is not done there
    lone = tmp_path / "lone.jsonl"
    assert _main(grid, tmp_path, lone, "--only", "method=panet_then_cwpa") == 2
    assert f"starts from run {ids['panet']}, which is neither done nor selected" in capsys.readouterr().err
    assert not lone.exists()

    # --only into a fresh store runs that subset; the next append cuts the partial line of the old store first
    sub = tmp_path / "sub.jsonl"
    assert _main(grid, tmp_path, sub, "--only", "method=alpnet", "--only", "fold=0") == 0
    assert [r["method"] for r in grid.read_store(sub)] == ["alpnet"]
    assert "1 selected" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="cutting a truncated last line"):
        grid.append_record(store, {"id": "x"})
    assert store.read_text() == before + '{"id": "x"}\n'


def test_dry_run_and_errors(grid, tmp_path, capsys):
    store = tmp_path / "s.jsonl"
    assert _main(grid, tmp_path, store, "--dry-run", "--only", "method=panet") == 0
    out = capsys.readouterr().out
    assert "1 selected, 0 already in" in out and "todo" in out and not store.exists()
    assert _main(grid, tmp_path, store, "--only", "colour=red") == 2
    assert "--only 'colour=red'" in capsys.readouterr().err


def test_missing_submitit_is_one_line_naming_the_install(grid, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(grid.GridError, match=r"pip install 'fewshot_proto\[grid\]'"):
        grid._import_submitit()


def test_submitit_local_executor_lands_the_same_record(grid, tmp_path, capsys):
    pytest.importorskip("submitit")
    store = tmp_path / "jobs.jsonl"
    assert _main(grid, tmp_path, store, "--executor", "submitit-local", "--only", "method=panet") == 0
    (rec,) = grid.read_store(store)
    (run,) = [r for r in grid.load_grid(GRID_FILE).runs if r.method == "panet"]
    assert (rec["id"], rec["method"], rec["steps"]) == (run.id, "panet", 2)
    assert set(rec) == FIELDS
    out = capsys.readouterr().out
    assert "submitting 1 job(s) to submitit-local one at a time" in out
    assert f"{run.id} panet" in out and ": done;" in out
    assert _main(grid, tmp_path, store, "--executor", "submitit-local") == 0  # resumes: panet is not submitted
    assert sorted(r["method"] for r in grid.read_store(store)) == ["alpnet", "panet", "panet_then_cwpa"]
