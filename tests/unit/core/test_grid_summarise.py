"""``benchmarks/grid.py`` run ids and ``benchmarks/summarise.py`` statistics, on hand-written inputs (no training).

The run id is a hash of the resolved config without the keys that only say where files go or how the machine
computes; the summariser's mean ± sample std, Wilcoxon p-value, pair count and markdown cells are checked against
values computed by hand (or by ``scipy.stats.wilcoxon`` on the same hand-listed pairs)."""
from __future__ import annotations

import csv
import hashlib
import importlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from fewshot_proto.config import apply_overrides, config_to_dict, default_config

BENCH = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.fixture(scope="module")
def grid():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("grid")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def summ(grid):
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("summarise")
    finally:
        sys.path.remove(str(BENCH))


# ----------------------------------------------------------------------------------------------------- run id
def test_id_is_a_short_hash_of_the_canonical_config_without_the_ignored_keys(grid):
    cfg = default_config()
    d = config_to_dict(cfg)
    for section, leaf in (("train", "out"), ("train", "num_workers"), ("train", "prefetch"), ("train", "threads"),
                          ("train", "device"), ("data", "root"), ("data", "cache_volumes")):
        del d[section][leaf]
    # added after the first stores, left out at their neutral values (ID_LATER_KEYS)
    del d["train"]["freeze"]
    for leaf in ("val_scans", "val_every", "patience"):
        del d["supervised"][leaf]
    expected = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert grid.run_id(cfg) == expected
    assert len(expected) == 12 and int(expected, 16) >= 0


def test_key_order_and_ignored_keys_do_not_change_the_id(grid):
    cfg = default_config()
    rid = grid.run_id(cfg)
    reordered = {s: dict(reversed(list(v.items()))) for s, v in reversed(list(config_to_dict(cfg).items()))}
    assert list(reordered) != list(config_to_dict(cfg))
    assert grid.run_id(reordered) == rid
    moved = apply_overrides(cfg, {"train.out": "/elsewhere/run", "train.num_workers": 3, "train.prefetch": 7,
                                  "train.threads": 2, "train.device": "cpu", "data.root": "/some/data",
                                  "data.cache_volumes": 2})
    assert grid.run_id(moved) == rid
    with_progress = dict(config_to_dict(cfg), progress=True)
    assert grid.run_id(with_progress) == rid


@pytest.mark.parametrize("key,value", [
    ("train.seed", 1), ("protocol.fold", 1), ("protocol.test_classes", [1, 4]), ("protocol.setting", 1),
    ("train.lr", 1e-3), ("train.max_seconds", 600.0), ("train.iters", 2), ("data.size", 64),
    ("model.name", "alpnet"), ("model.kwargs", {"tau": 0.25}), ("supervised.n_labelled", 2),
    ("train.precision", "fp32"), ("episodes.shots", 5), ("data.layout", "alpnet"), ("train.freeze", ["encoder"]),
    ("model.kwargs", {"bag": "masked_average"}),
])
def test_a_result_changing_key_changes_the_id(grid, key, value):
    cfg = default_config()
    assert grid.run_id(apply_overrides(cfg, {key: value})) != grid.run_id(cfg)


def test_keys_added_later_keep_the_ids_of_stored_runs(grid):
    """A config written before ``train.freeze`` existed and one with its neutral value get the same id."""
    cfg = default_config()
    old = config_to_dict(cfg)
    del old["train"]["freeze"]
    for leaf in ("val_scans", "val_every", "patience"):
        del old["supervised"][leaf]
    assert grid.run_id(old) == grid.run_id(cfg)
    assert grid.ID_LATER_KEYS == {"train.freeze": [], "supervised.val_scans": 0, "supervised.val_every": 100,
                                  "supervised.patience": 5}
    assert grid.run_id(apply_overrides(cfg, {"supervised.val_scans": 1})) != grid.run_id(cfg)


def test_the_committed_store_ids_are_runs_of_the_committed_grid(grid):
    """The CHAOS-T2 records committed under benchmarks/results keep their ids: a change to the config's defaults or
    to the id recipe that would re-run days of grid must fail here first."""
    main = grid.load_grid(BENCH / "grids" / "chaos_t2_main.yaml", write_phantoms=False)
    by_id = {r.id: r for r in main.runs}
    recs = grid.read_store(BENCH / "results" / "grid_chaos_t2_main.jsonl")
    assert len(recs) >= 6
    for rec in recs:
        run = by_id[rec["id"]]
        assert (run.method, run.group, run.fold, run.seed) == (rec["method"], rec["test_group"], rec["fold"],
                                                               rec["seed"])
        assert grid.run_id(rec["config"]) == rec["id"]  # the stored config hashes to its id


def test_the_phantom_spec_is_part_of_the_id(grid):
    cfg = default_config()
    assert grid.run_id(cfg, {"phantoms": {"n_scans": 10, "size": 64, "seed": 0}}) != grid.run_id(cfg)
    assert (grid.run_id(cfg, {"phantoms": {"n_scans": 10, "size": 64, "seed": 0}})
            != grid.run_id(cfg, {"phantoms": {"n_scans": 10, "size": 128, "seed": 0}}))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GRID = """name: t
data: {root: data_here, layout: alpnet}
set: {train.num_workers: 0}
methods:
  - {name: a, model: panet}
  - {name: b, model: alpnet, set: {train.lambda_cyc: 0.0}}
  - {name: u1, model: unet, set: {supervised.n_labelled: 1}, budget_seconds: 30}
test_groups: [[2, 3], [1, 4]]
folds: [0, 1]
seeds: [0, 5]
settings: [2]
budget_seconds: 10
size: 64
iters: 100
"""


def test_a_grid_expands_to_stable_distinct_runs(grid, tmp_path):
    g = grid.load_grid(_write(tmp_path / "g.yaml", GRID))
    assert len(g.runs) == 3 * 2 * 2 * 2 and len({r.id for r in g.runs}) == 24
    r = [r for r in g.runs if r.method == "b" and r.group == [1, 4] and r.fold == 1 and r.seed == 5][0]
    assert (r.cfg.model.name, r.cfg.protocol.test_classes, r.cfg.protocol.fold, r.cfg.train.seed) == (
        "alpnet", [1, 4], 1, 5)
    assert (r.cfg.train.max_seconds, r.cfg.train.iters, r.cfg.data.size, r.cfg.train.lambda_cyc) == (10.0, 100, 64, 0.0)
    assert r.cfg.data.root == str(tmp_path / "data_here") and r.kind == "fewshot"
    assert [x.cfg.train.max_seconds for x in g.runs if x.method == "u1"] == [30.0] * 8
    # the same grid with its data elsewhere and its runs written by more workers: the same ids
    moved = GRID.replace("data_here", "/other/place").replace("train.num_workers: 0", "train.num_workers: 4")
    assert [x.id for x in grid.load_grid(_write(tmp_path / "h.yaml", moved)).runs] == [x.id for x in g.runs]
    assert grid.select(g.runs, grid.parse_filters(["method=a,b", "group=1+4", "fold=0"])) == [
        x for x in g.runs if x.method in ("a", "b") and x.group == [1, 4] and x.fold == 0]


@pytest.mark.parametrize("edit,message", [
    (("budget_seconds: 10\n", ""), "missing key(s) ['budget_seconds']"),
    (("size: 64", "sise: 64"), "unknown key(s) ['sise']"),
    (("model: panet}", "model: panet, budget_seconds: 5}"), "few-shot methods share the grid's budget_seconds"),
    (("model: panet}", "model: nope}"), "methods[0].model: unknown model 'nope'"),
    (("folds: [0, 1]", "folds: [zero]"), "folds: expected a non-empty list of integers"),
    (("{train.lambda_cyc: 0.0}", "{train.lamda_cyc: 0.0}"), "methods[1].set"),
])
def test_grid_errors_are_one_line_naming_the_file(grid, tmp_path, edit, message):
    path = _write(tmp_path / "bad.yaml", GRID.replace(*edit))
    with pytest.raises(grid.GridError) as e:
        grid.load_grid(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


TWO_STAGE = GRID.replace("  - {name: u1,",
                         "  - {name: c, model: cwpa_unet, init_from: a, set: {train.freeze: [encoder]}}\n  - {name: u1,")


def test_a_two_stage_row_starts_from_the_same_cell_of_its_first_stage(grid, tmp_path):
    g = grid.load_grid(_write(tmp_path / "g.yaml", TWO_STAGE))
    firsts = {(tuple(r.group), r.fold, r.seed): r.id for r in g.runs if r.method == "a"}
    seconds = [r for r in g.runs if r.method == "c"]
    assert len(seconds) == 8 and all(r.init_from == firsts[(tuple(r.group), r.fold, r.seed)] for r in seconds)
    assert all(r.init_from is None for r in g.runs if r.method != "c")
    r = seconds[0]
    assert r.cfg.train.freeze == ["encoder"] and "weights" not in r.cfg.model.kwargs  # set when the run starts
    assert r.id == grid.run_id(r.cfg, {"init_from": r.init_from}) != grid.run_id(r.cfg)
    # the first stage's checkpoint must be in the runs folder when the second stage starts
    with pytest.raises(grid.GridError, match=rf"starts from run {r.init_from}'s checkpoint, and .* does not exist"):
        grid.start_checkpoint(r, tmp_path / "runs")
    (tmp_path / "runs" / r.init_from).mkdir(parents=True)
    (tmp_path / "runs" / r.init_from / "checkpoint.pt").write_bytes(b"x")
    assert grid.start_checkpoint(r, tmp_path / "runs") == tmp_path / "runs" / r.init_from / "checkpoint.pt"
    # order: a second stage may follow its first stage in the same batch, never precede it
    grid.check_dependencies([g.runs[0], *[x for x in seconds if x.init_from == g.runs[0].id]], set())
    with pytest.raises(grid.GridError, match="which is neither done nor selected"):
        grid.check_dependencies(seconds[:1], set())
    grid.check_dependencies(seconds[:1], {r.init_from})


@pytest.mark.parametrize("edit,message", [
    (("init_from: a,", "init_from: u1,"), "init_from: 'u1' is not a method listed before 'c'"),
    (("init_from: a,", "init_from: c,"), "init_from: 'c' is not a method listed before 'c'"),
    (("  - {name: a, model: panet}", "  - {name: a, model: panet, init_from: b}"),
     "methods[0].init_from: 'b' is not a method listed before 'a'"),
    (("model: cwpa_unet, init_from: a, set: {", "model: cwpa_unet, init_from: a, set: {model.kwargs.weights: w, "),
     "only a few-shot method without its own model.kwargs.weights"),
])
def test_two_stage_errors(grid, tmp_path, edit, message):
    path = _write(tmp_path / "bad.yaml", TWO_STAGE.replace(*edit))
    with pytest.raises(grid.GridError) as e:
        grid.load_grid(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_chained_init_from_is_refused(grid, tmp_path):
    text = TWO_STAGE.replace("  - {name: u1,", "  - {name: d, model: cwpa_unet, init_from: c}\n  - {name: u1,")
    with pytest.raises(grid.GridError, match="'c' itself starts from another run; one stage of init_from only"):
        grid.load_grid(_write(tmp_path / "g.yaml", text))


def test_reuse_copies_records_of_shared_runs_under_this_grids_names(grid, tmp_path, capsys):
    g = grid.load_grid(_write(tmp_path / "g.yaml", GRID))
    a0 = [r for r in g.runs if r.method == "a"][0]
    other = tmp_path / "other.jsonl"
    grid.append_record(other, {"id": a0.id, "grid": "main", "method": "panet", "mean_dice": 0.5})
    grid.append_record(other, {"id": "not-ours", "grid": "main", "method": "x", "mean_dice": 0.1})
    text = GRID + f"reuse: [{other.name}]\n"
    path = _write(tmp_path / "r.yaml", text)
    assert grid.load_grid(path).reuse == [other]
    store = tmp_path / "mine.jsonl"
    # the dry run lists the copy and writes nothing
    assert grid.main([str(path), "--store", str(store), "--dry-run", "--only", "method=a", "--only", "fold=0",
                      "--only", "seed=0", "--only", "group=2+3"]) == 0
    out = capsys.readouterr().out
    assert "0 already in" in out and "1 to copy from the reuse stores, 0 to run" in out
    assert f"  copy  {a0.id} a (panet)" in out and not store.exists()
    done = set()
    assert grid.reuse_records(grid.load_grid(path), store, done) == {a0.id} and done == {a0.id}
    (rec,) = grid.read_store(store)
    assert rec == {"id": a0.id, "grid": "t", "method": "a", "mean_dice": 0.5,
                   "reused_from": {"store": "other.jsonl", "grid": "main", "method": "panet"}}
    assert grid.reuse_records(grid.load_grid(path), store, done) == set()  # already done: nothing copied twice
    with pytest.raises(grid.GridError, match="reuse store .*missing.jsonl does not exist"):
        grid.reuse_records(grid.load_grid(_write(tmp_path / "m.yaml", GRID + "reuse: [missing.jsonl]\n")),
                           store, set())


def test_filters_reject_unknown_keys(grid):
    with pytest.raises(grid.GridError, match="--only 'methd=a'"):
        grid.parse_filters(["methd=a"])
    assert grid.parse_filters(["fold=0,1", "fold=3"]) == {"fold": {"0", "1", "3"}}


# ------------------------------------------------------------------------------------------------ summariser
def _rec(rid, method, kind, fold, dice2, dice3, mean, rows, model=None, n_labelled=None):
    return {"id": rid, "grid": "hand", "method": method, "model": model or method, "kind": kind,
            "test_group": [2, 3], "fold": fold, "seed": 0, "setting": 2, "n_labelled": n_labelled,
            "mean_dice": mean, "per_class": {"2": {"name": "rk", "dice": dice2}, "3": {"name": "lk", "dice": dice3}},
            "rows": [{"scan": s, "class": c, "dice": d, "hd95": 1.0, "assd": 1.0} for s, c, d in rows],
            "steps": 100 + fold, "train_seconds": 600.4, "budget_seconds": 600.0 if kind == "fewshot" else 3600.0,
            "precision": "bf16", "version": "0.2.0",
            # supervised records as stored before cpu_flags was recorded: the model name only
            "machine": {"cpu": "Hand CPU", "cpu_flags": ["amx_bf16", "avx512_bf16"]} if kind == "fewshot"
            else {"cpu": "Old CPU"}}


# per-scan Dice of methods A and B; B has no row for scan "s2" class 3 in fold 2 (so 11 common pairs, not 12),
# and one pair (fold 0, s1, class 2) has a zero difference
A_ROWS = {0: [("s1", 2, 0.40), ("s1", 3, 0.61), ("s2", 2, 0.42), ("s2", 3, 0.63)],
          1: [("s1", 2, 0.50), ("s1", 3, 0.72), ("s2", 2, 0.51), ("s2", 3, 0.74)],
          2: [("s1", 2, 0.60), ("s1", 3, 0.83), ("s2", 2, 0.62), ("s2", 3, 0.81)]}
B_ROWS = {0: [("s1", 2, 0.40), ("s1", 3, 0.20), ("s2", 2, 0.35), ("s2", 3, 0.25)],
          1: [("s1", 2, 0.45), ("s1", 3, 0.30), ("s2", 2, 0.60), ("s2", 3, 0.44)],
          2: [("s1", 2, 0.90), ("s1", 3, 0.88), ("s2", 2, 0.86)]}


@pytest.fixture
def store(tmp_path):
    recs = []
    for f, (d2, d3, m) in enumerate([(0.4, 0.6, 0.5), (0.5, 0.7, 0.6), (0.6, 0.8, 0.7)]):
        recs.append(_rec(f"a{f}", "A", "fewshot", f, d2, d3, m, A_ROWS[f]))
    for f, (d2, d3, m) in enumerate([(0.1, 0.3, 0.2), (0.3, 0.5, 0.4), (0.8, 1.0, 0.9)]):
        recs.append(_rec(f"b{f}", "B", "fewshot", f, d2, d3, m, B_ROWS[f]))
    recs.append(_rec("u1", "unet_n1", "supervised", 0, 0.2, 0.3, 0.25, [], model="unet", n_labelled=1))
    recs.append(_rec("u2", "unet_n2", "supervised", 0, 0.3, 0.5, 0.4, [], model="unet", n_labelled=2))
    recs.append(_rec("u2", "unet_n2", "supervised", 0, 0.3, 0.5, 0.45, [], model="unet", n_labelled=2))  # rewrite
    p = tmp_path / "grid_hand.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return p


def test_mean_and_sample_std(summ):
    m, s, n = summ.mean_std([0.2, 0.4, 0.9])
    assert (m, n) == (pytest.approx(0.5, abs=1e-15), 3)
    assert s == pytest.approx(math.sqrt((0.09 + 0.01 + 0.16) / 2), abs=1e-15)  # ddof 1
    assert math.isnan(summ.mean_std([0.3])[1]) and summ.mean_std([float("nan"), 0.3])[2] == 1
    assert summ.fmt_pct(0.5, 0.36055512) == "50.0 ± 36.1" and summ.fmt_pct(0.45, float("nan")) == "45.0 ± –"


def test_summary_statistics_and_tables(summ, store):
    out = summ.summarise(store)
    cells = {c["method"]: c for c in out["cells"]}
    assert [cells[k]["n_runs"] for k in ("A", "B", "unet_n1", "unet_n2")] == [3, 3, 1, 1]
    assert cells["unet_n2"]["overall"][0] == 0.45  # the later line of an id wins
    a_mean, a_std, _ = cells["A"]["overall"]
    assert a_mean == pytest.approx(0.6, abs=1e-15) and a_std == pytest.approx(0.1, abs=1e-15)

    x = [d for f in (0, 1, 2) for (s, c, d) in A_ROWS[f] if (f, s, c) != (2, "s2", 3)]
    y = [d for f in (0, 1, 2) for (s, c, d) in B_ROWS[f]]
    from scipy.stats import wilcoxon
    expected = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue
    (t,) = out["tests"]
    assert (t["a"], t["b"], t["group"], t["n_pairs"]) == ("A", "B", "2+3", 11)
    assert t["p"] == expected
    assert t["mean_diff"] == pytest.approx(float(np.mean(np.subtract(x, y))), abs=1e-15)

    md = out["md"].read_text()
    assert "mean ± sample std (ddof 1)" in md and "zero differences are dropped" in md
    assert "| A | A | fewshot | 3 | 50.0 ± 10.0 | 70.0 ± 10.0 | 60.0 ± 10.0 |" in md
    assert "| B | B | fewshot | 3 | 40.0 ± 36.1 | 60.0 ± 36.1 | 50.0 ± 36.1 |" in md
    assert "| unet_n2 (n_labelled 2) | unet | supervised | 1 | 30.0 ± – | 50.0 ± – | 45.0 ± – |" in md
    assert ("8 runs; training budget per run 3600 s, 600 s; precision bf16; CPU Hand CPU (amx_bf16 avx512_bf16) "
            "(6 runs), Old CPU (2 runs); fewshot_proto 0.2.0." in md)  # the rewritten id counts once
    runs = md.split("| method | fold | seed | steps | train s | CPU | 2 | 3 | mean |")[1].split("\n\n")[0]
    runs = runs.splitlines()
    assert runs[2:5] == ["| A | 0 | 0 | 100 | 600 | Hand CPU (amx_bf16 avx512_bf16) | 40.0 | 60.0 | 50.0 |",
                         "| A | 1 | 0 | 101 | 600 | Hand CPU (amx_bf16 avx512_bf16) | 50.0 | 70.0 | 60.0 |",
                         "| A | 2 | 0 | 102 | 600 | Hand CPU (amx_bf16 avx512_bf16) | 60.0 | 80.0 | 70.0 |"]
    assert len(runs) == 2 + 8 and runs[-1] == "| unet_n2 | 0 | 0 | 100 | 600 | Old CPU | 30.0 | 50.0 | 45.0 |"
    assert summ.cpu_label({"machine": {"cpu": "X", "cpu_flags": []}}) == "X (no AVX/AMX flags)"
    verdict = "not significant at 0.05" if expected >= 0.05 else "significant at 0.05"
    assert f"| 2+3 | A | B | 11 | {100 * t['mean_diff']:+.1f} | {expected:.4g} | {verdict} |" in md

    assert ("- `unet` does not reach `A` (60.0) with any number of labelled scans in the grid (best: 2 scans, "
            "45.0).") in md
    assert "- `unet` does not reach `B` (50.0) with any" in md
    assert summ.labels_to_match([dict(cells["B"], overall=(0.3, 0.0, 3)), cells["unet_n1"], cells["unet_n2"]]) == [
        "- `unet` reaches `B` (30.0) with 2 labelled scans (45.0)."]
    assert summ.labels_to_match([dict(cells["B"], overall=(0.2, 0.0, 3)), cells["unet_n2"], cells["unet_n1"]]) == [
        "- `unet` reaches `B` (20.0) with 1 labelled scan (25.0)."]

    with open(out["csv"], newline="") as f:
        rows = [r for r in csv.reader(f)]
    assert ["A", "A", "fewshot", "2+3", "2", "mean", "", "3", repr(a_mean), repr(a_std)] in rows
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_picks_the_pairs_and_says_not_significant(summ, store):
    out = summ.summarise(store, compare=[("A", "unet_n1")], plots=False)
    (t,) = out["tests"]
    assert (t["n_pairs"], t["note"]) == (0, "no common pairs") and math.isnan(t["p"])
    assert summ.verdict(0.2) == "not significant at 0.05" and summ.verdict(0.01) == "significant at 0.05"
    with pytest.raises(summ.GridError, match="method 'C' is not in"):
        summ.summarise(store, compare=[("A", "C")], plots=False)


def test_precision_and_recall_table_over_the_runs_that_have_them(summ, store, tmp_path):
    recs = [json.loads(line) for line in store.read_text().splitlines()]
    for r in recs:
        if r["method"] == "A" and r["fold"] < 2:  # fold 2's record is an older one, without them
            for i, row in enumerate(r["rows"]):
                row["precision"] = [0.2, 0.4][r["fold"]] + 0.1 * (i % 2)   # run means 0.25 and 0.45
                row["recall"] = 0.9 if i else float("nan")                   # NaN rows are left out
    p = tmp_path / "grid_pr.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = summ.summarise(p, plots=False)
    a = {c["method"]: c for c in out["cells"]}["A"]
    assert a["precision"][0] == pytest.approx(0.35, abs=1e-12) and a["precision"][2] == 2
    assert a["precision"][1] == pytest.approx(math.sqrt(2 * 0.1 ** 2), abs=1e-12)
    assert a["recall"][:3:2] == (pytest.approx(0.9), 2)
    md = out["md"].read_text()
    pr_table = md.split("runs with them")[1].split("\n\n")[0]
    assert "| A | 2 | 35.0 ± 14.1 | 90.0 ± 0.0 |" in pr_table and "| B | " not in pr_table
    assert "precision well below recall" not in summ.summarise(store, plots=False)["md"].read_text()


def test_summarise_tolerates_a_truncated_last_line(summ, store):
    store.write_text(store.read_text() + '{"id": "half", "meth')
    with pytest.warns(UserWarning, match="truncated last line"):
        out = summ.summarise(store, plots=False)
    assert len(out["cells"]) == 4


def test_the_committed_grids_expand(grid):
    main = grid.load_grid(BENCH / "grids" / "chaos_t2_main.yaml", write_phantoms=False)
    assert len(main.runs) == 4 * 2 * 5 and {r.method for r in main.runs} == {
        "cwpa_unet", "cwpa_unet_matcher", "alpnet", "panet"}
    t = main.runs[0].cfg.train
    assert (t.optimizer, t.scheduler, t.warmup_iters, t.lambda_dice, t.max_seconds, t.precision) == (
        "sgd", "step", 0, 0.0, 600.0, "bf16")
    assert {r.cfg.protocol.setting for r in main.runs} == {2} and main.runs[0].cfg.data.root.endswith("chaos_t2")
    tiny = grid.load_grid(BENCH / "grids" / "phantom_tiny.yaml", write_phantoms=False)
    assert [(r.method, r.cfg.train.iters, r.cfg.data.size) for r in tiny.runs] == [
        ("panet", 2, 64), ("alpnet", 2, 64), ("panet_then_cwpa", 2, 64)]
    abl = grid.load_grid(BENCH / "grids" / "chaos_t2_ablation.yaml", write_phantoms=False)
    assert len(abl.runs) == 11 * 3 and {r.fold for r in abl.runs} == {0, 1, 2}
    assert {r.group_label for r in abl.runs} == {"2+3"}
    # the rows both grids hold have the same ids, so the ablation grid copies them from the main store
    main_ids = {(r.method, r.fold): r.id for r in main.runs if r.group == [2, 3]}
    ab = {(r.method, r.fold): r for r in abl.runs}
    for f in (0, 1, 2):
        assert ab[("default", f)].id == main_ids[("cwpa_unet_matcher", f)]
        assert ab[("decoder_alone", f)].id == main_ids[("cwpa_unet", f)]
        assert ab[("matcher_alone", f)].cfg.train.lambda_cyc == ab[("default", f)].cfg.train.lambda_cyc == 0.5
        assert ab[("two_stage", f)].init_from == ab[("matcher_alone", f)].id
    assert ab[("masked_average", 0)].cfg.model.kwargs == {"bag": "masked_average"}
    assert [ab[(m, 0)].cfg.episodes.mode for m in ("default", "superpixel_only", "labelled_only")] == [
        "mixed", "superpixel", "labelled"]
    assert (ab[("no_align", 0)].cfg.train.lambda_align, ab[("no_cyc", 0)].cfg.train.lambda_cyc) == (0.0, 0.0)
    assert (ab[("dice_term", 0)].cfg.train.lambda_dice, ab[("default", 0)].cfg.train.lambda_dice) == (1.0, 0.0)
    assert (ab[("balanced_ce", 0)].cfg.train.ce_weights, ab[("default", 0)].cfg.train.ce_weights) == (
        [1.0, 1.0], [0.1, 1.0])
    assert abl.reuse == [BENCH / "results" / "grid_chaos_t2_main.jsonl"]
    s1 = grid.load_grid(BENCH / "grids" / "chaos_t2_setting1.yaml", write_phantoms=False)
    assert [(r.method, r.fold, r.setting) for r in s1.runs] == [
        ("cwpa_unet_matcher", f, s) for f in range(5) for s in (1, 2)]
    # the same run as the main grid's default-model row but for the setting; its Setting 2 rows are the main grid's
    m0 = [r for r in main.runs if r.method == "cwpa_unet_matcher" and r.group == [2, 3] and r.fold == 0][0]
    a, b = config_to_dict(s1.runs[0].cfg), config_to_dict(m0.cfg)
    assert a["protocol"].pop("setting") == 1 and b["protocol"].pop("setting") == 2 and a == b
    assert {r.id for r in s1.runs if r.setting == 2} == {
        main_ids[("cwpa_unet_matcher", f)] for f in range(5)} and s1.reuse == abl.reuse
    seeds = grid.load_grid(BENCH / "grids" / "chaos_t2_seeds.yaml", write_phantoms=False)
    sd = {(r.method, r.fold, r.seed): r.id for r in seeds.runs}
    assert len(sd) == 2 * 5 * 2 and {r.group_label for r in seeds.runs} == {"2+3"}
    for m in ("cwpa_unet_matcher", "alpnet"):
        for f in range(5):
            assert sd[(m, f, 0)] == main_ids[(m, f)] and sd[(m, f, 1)] not in main_ids.values()
    assert seeds.compare == [["cwpa_unet_matcher", "alpnet"]]
    eff = grid.load_grid(BENCH / "grids" / "chaos_t2_label_efficiency.yaml", write_phantoms=False)
    le = {(r.method, r.fold): r for r in eff.runs}
    assert len(eff.runs) == 10 * 3
    for f in (0, 1, 2):
        assert le[("cwpa_unet_matcher", f)].id == main_ids[("cwpa_unet_matcher", f)]
        assert le[("alpnet", f)].id == main_ids[("alpnet", f)]
    for name, n in (("unet_n1", 1), ("unet_n2", 2), ("unet_n4", 4), ("unet_all", None)):
        r = le[(name, 0)]
        s = r.cfg.supervised
        assert (r.kind, s.n_labelled, s.val_scans, s.val_every, s.patience) == ("supervised", n, 1, 100, 5)
        assert (r.budget, r.cfg.train.optimizer, r.cfg.train.lr, r.cfg.model.kwargs) == (
            3600.0, "adamw", 0.002, {"base_channels": 16, "norm": "batch"})
        # the MobileNetV2 row with the same n: the U-Net's recipe, stopping rule and scan selection, its own widths
        m = le[(name.replace("unet", "mnv2"), 0)]
        assert (m.model, m.budget, m.cfg.model.kwargs) == ("mobilenet_aspp_se_unet", 3600.0, {
            "aspp_channels": 32, "aspp_out_channels": 128, "decoder_channels": [64, 32, 32, 16, 16]})
        assert m.cfg.supervised == s and m.cfg.train == r.cfg.train and m.cfg.data == r.cfg.data
    assert ["unet_n1", "mnv2_n1"] in eff.compare


def test_the_grid_files_compare_pairs_are_the_default_tests(summ, grid, store, tmp_path, monkeypatch):
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "hand.yaml").write_text("name: hand\ncompare: [[B, A], [A, unet_n1], [A, absent]]\n")
    monkeypatch.setattr(summ, "grid_comparisons",
                        lambda name, grids_dir=grids, f=summ.grid_comparisons: f(name, grids_dir))
    out = summ.summarise(store, plots=False)
    # the grid's pairs, in its order and direction, without the one whose method the store does not hold yet
    assert [(t["a"], t["b"]) for t in out["tests"]] == [("B", "A"), ("A", "unet_n1")]
    a_vs_b = summ.paired(summ.latest(summ.read_store(store)), "A", "B", "2+3")
    assert out["tests"][0]["mean_diff"] == pytest.approx(-a_vs_b["mean_diff"], abs=1e-15)
    assert out["tests"][0]["p"] == a_vs_b["p"] and out["tests"][0]["n_pairs"] == 11
    (grids / "hand.yaml").write_text("name: hand\ncompare: [[A]]\n")
    with pytest.raises(summ.GridError, match=r"hand.yaml: compare must be a list of \[method, method\] pairs"):
        summ.summarise(store, plots=False)
    # a grid file whose compare names a method it does not have is refused when the grid loads
    bad = _write(tmp_path / "g.yaml", GRID + "compare: [[a, zz]]\n")
    with pytest.raises(grid.GridError, match=r"compare names unknown method\(s\) \['zz'\]"):
        grid.load_grid(bad)
    assert grid.load_grid(_write(tmp_path / "h.yaml", GRID + "compare: [[b, a]]\n")).compare == [["b", "a"]]


def test_summarise_cli_takes_several_stores(summ, store, tmp_path, capsys):
    other = tmp_path / "grid_other.jsonl"
    other.write_text(store.read_text().replace('"grid": "hand"', '"grid": "other"'))
    assert summ.main([str(store), str(other), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {store.with_suffix('.md')}" in out and f"wrote {other.with_suffix('.md')}" in out
    assert summ.main([str(store), str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err


def test_no_label_efficiency_plot_without_supervised_rows(summ, store, tmp_path):
    few = tmp_path / "grid_few.jsonl"
    few.write_text("".join(line + "\n" for line in store.read_text().splitlines()
                           if json.loads(line)["kind"] == "fewshot"))
    out = summ.summarise(few)
    assert out["png"] is None and not (tmp_path / "grid_few_label_efficiency.png").exists()
    assert out["md"].is_file()


def test_two_test_groups_get_an_all_groups_table_and_pooled_tests(summ, store, tmp_path):
    recs = [json.loads(line) for line in store.read_text().splitlines()]
    two = list(recs)
    for r in recs:
        if r["kind"] == "fewshot":  # the same runs on the liver/spleen group, Dice shifted by +0.1 (A) and -0.1 (B)
            shift = 0.1 if r["method"] == "A" else -0.1
            two.append(dict(r, id=r["id"] + "_14", test_group=[1, 4], mean_dice=r["mean_dice"] + shift,
                            rows=[dict(row, dice=row["dice"] + shift) for row in r["rows"]]))
    p = tmp_path / "grid_two.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in two))
    out = summ.summarise(p, plots=False)
    across = {r["method"]: r for r in summ.across_groups(summ.latest(two))}
    assert set(across) == {"A", "B"}  # the U-Net rows ran on 2+3 only
    m, s, n = across["A"]["overall"]  # run means 0.5 0.6 0.7 and 0.6 0.7 0.8
    assert (m, n) == (pytest.approx(0.65, abs=1e-12), 6)
    assert s == pytest.approx(math.sqrt((0.15 ** 2 * 2 + 0.05 ** 2 * 4) / 5), abs=1e-12)
    assert across["B"]["per_group"]["1+4"][0] == pytest.approx(0.4, abs=1e-12)
    md = out["md"].read_text()
    assert "| A | fewshot | 60.0 ± 10.0 (3) | 70.0 ± 10.0 (3) | 65.0 ± 10.5 | 6 |" in md
    # pooled: the 11 pairs of 2+3 and their 11 shifted copies on 1+4, each keyed by its test group
    x = [d for f in (0, 1, 2) for (s_, c, d) in A_ROWS[f] if (f, s_, c) != (2, "s2", 3)]
    y = [d for f in (0, 1, 2) for (s_, c, d) in B_ROWS[f]]
    xs, ys = x + [v + 0.1 for v in x], y + [v - 0.1 for v in y]
    from scipy.stats import wilcoxon
    pooled = [t for t in out["tests"] if t["group"] == "all"]
    assert [(t["a"], t["b"], t["n_pairs"]) for t in pooled] == [("A", "B", 22)]
    assert pooled[0]["p"] == wilcoxon(xs, ys, zero_method="wilcox", alternative="two-sided").pvalue
    assert pooled[0]["mean_diff"] == pytest.approx(float(np.mean(np.subtract(xs, ys))), abs=1e-12)
    assert [t["group"] for t in out["tests"]] == ["2+3", "1+4", "all"]
    with open(out["csv"], newline="") as f:
        rows = list(csv.reader(f))
    assert ["A", "A", "fewshot", "all", "2", "mean", "", "6", repr(m), repr(s)] in rows
    # one test group: no such table and no pooled test
    one = summ.summarise(store, plots=False)
    assert "All test groups" not in one["md"].read_text() and {t["group"] for t in one["tests"]} == {"2+3"}


def test_one_method_in_two_settings_is_tested_setting_against_setting(summ, store, tmp_path):
    recs = [json.loads(line) for line in store.read_text().splitlines()]
    # A again in Setting 1: fold 0 +0.05 on every scan, fold 1 -0.02, fold 2 missing its (s1, 2) row
    delta = {0: 0.05, 1: -0.02, 2: 0.10}
    s1 = []
    for r in recs:
        if r["method"] == "A":
            rows = [dict(row, dice=row["dice"] + delta[r["fold"]]) for row in r["rows"]
                    if (r["fold"], row["scan"], row["class"]) != (2, "s1", 2)]
            s1.append(dict(r, id=r["id"] + "_s1", setting=1, rows=rows))
    p = tmp_path / "grid_settings.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs + s1))
    out = summ.summarise(p, plots=False)
    (t,) = [t for t in out["tests"] if "settings" in t]
    x = [d + delta[f] for f in (0, 1, 2) for (sc, c, d) in A_ROWS[f] if (f, sc, c) != (2, "s1", 2)]
    y = [d for f in (0, 1, 2) for (sc, c, d) in A_ROWS[f] if (f, sc, c) != (2, "s1", 2)]
    from scipy.stats import wilcoxon
    assert (t["a"], t["b"], t["group"], t["n_pairs"], t["settings"]) == (
        "A (setting 1)", "A (setting 2)", "2+3", 11, (1, 2))
    assert t["mean_diff"] == pytest.approx((4 * 0.05 - 4 * 0.02 + 3 * 0.10) / 11, abs=1e-12)
    assert t["p"] == wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue
    # A against B stays a Setting 2 test: A's Setting 1 rows have no B partner
    (ab,) = [t for t in out["tests"] if (t["a"], t["b"]) == ("A", "B")]
    assert ab["n_pairs"] == 11
    md = out["md"].read_text()
    assert "## Test group 2+3, setting 1" in md and "test one method in two settings" in md
    assert f"| 2+3 | A (setting 1) | A (setting 2) | 11 | {100 * t['mean_diff']:+.1f} | {t['p']:.4g} |" in md
    # one setting per method: no such test and no such sentence
    one = summ.summarise(store, plots=False)
    assert all("settings" not in t and "setting" not in t["a"] for t in one["tests"])
    assert "test one method in two settings" not in one["md"].read_text()


def test_runs_figure_shows_every_run_beside_its_methods_mean_and_std(summ, store, tmp_path, capsys):
    recs = summ.latest([json.loads(line) for line in store.read_text().splitlines()])
    recs.append(dict(recs[0], id="a0_s1", seed=1, mean_dice=0.9))  # a second seed of A's fold 0
    (panel,) = summ.runs_panels(recs)
    assert (panel["group"], panel["setting"]) == ("2+3", 2)
    by = {m["method"]: m for m in panel["methods"]}
    assert list(by) == ["A", "B", "unet_n1", "unet_n2"]
    assert by["A"]["runs"] == [(0, 0, 0.5), (0, 1, 0.9), (1, 0, 0.6), (2, 0, 0.7)]
    assert by["A"]["mean"] == pytest.approx(0.675, abs=1e-12) and by["A"]["n"] == 4
    assert by["A"]["std"] == pytest.approx(math.sqrt((0.175 ** 2 + 0.225 ** 2 + 0.075 ** 2 + 0.025 ** 2) / 3),
                                           abs=1e-12)
    assert by["unet_n2"]["runs"] == [(0, 0, 0.45)] and math.isnan(by["unet_n2"]["std"])  # the rewrite wins
    out = summ.summarise(store)
    assert out["runs_png"] == tmp_path / "grid_hand_runs.png"
    assert out["runs_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summ.main([str(store)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'grid_hand_runs.png'}, {tmp_path / 'grid_hand_label_efficiency.png'}" in printed
    other = tmp_path / "grid_noplot.jsonl"
    other.write_text(store.read_text())
    assert summ.summarise(other, plots=False)["runs_png"] is None and not (tmp_path / "grid_noplot_runs.png").exists()
