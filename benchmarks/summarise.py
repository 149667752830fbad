"""Summarise a grid store (``benchmarks/grid.py``): a markdown table, a CSV, paired Wilcoxon tests and a
label-efficiency plot, all regenerated from the store alone.

    python benchmarks/summarise.py benchmarks/results/grid_chaos_t2_main.jsonl
    python benchmarks/summarise.py benchmarks/results/grid_chaos_t2_main.jsonl --compare alpnet panet
    python benchmarks/summarise.py benchmarks/results/grid_*.jsonl       # every committed table, one command

Outputs next to the store (same stem): ``.md``, ``.csv``, ``_runs.png`` and ``_label_efficiency.png``.

* Table: per method x test group x setting, the mean ± SAMPLE standard deviation (ddof 1; "–" with one run) over
  the folds and seeds of each run's mean Dice (per organ: the run's mean over query scans; overall: the run's
  mean Dice), in %, with the number of runs.
* Paired comparison: Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, ``zero_method="wilcox"``:
  pairs with zero difference are dropped before ranking) on per-scan Dice over the (setting, fold, seed, query
  scan, class) pairs present for both methods on the same test group. Default: the ``compare`` pairs of the grid
  file ``benchmarks/grids/<grid>.yaml`` when it lists them (an ablation grid compares each row with the default
  model), else every pair of few-shot methods on each test group; ``--compare A B`` (repeatable) replaces that.
  A store with two or more test groups also gets each pair pooled over all of them (test group ``all``).
  A method that ran in two settings on the same test group gets Setting s against Setting t, paired over the
  (fold, seed, query scan, class) pairs both settings have.
* All test groups: per setting with two or more test groups, each method that ran on all of them, with its mean ±
  sample std per test group and over all its runs (CSV rows with test group ``all``).
* Over- and under-segmentation: per method, the mean ± sample std over runs of each run's mean precision and
  recall over its query scans and classes (records written before the store kept them are left out; the table
  says how many runs have them). Precision well below recall means false positives.
* Label efficiency: for each few-shot method and supervised model, the fewest labelled scans whose mean Dice
  reaches the few-shot method's mean (on means only; the paired tests say whether the difference is significant).
* Provenance and runs: one line with the number of runs, their training budgets, precisions, CPUs and package
  versions; per test group and setting, a table of every run (method, fold, seed, steps, training seconds, CPU, Dice).
* Runs plot: one panel per test group x setting; every run's mean Dice as a point (colour: fold, marker: seed)
  beside each method's mean ± sample std.
* Label-efficiency plot (stores with supervised rows): one panel per test group x setting; supervised rows by
  labelled scans (``n_labelled``; mean ± sample std over folds and seeds as error bars), few-shot methods as
  horizontal lines with a shaded ± std band.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import yaml  # noqa: E402
from grid import HERE, GridError, group_label, read_compare, read_store  # noqa: E402

DDOF = 1
ALPHA = 0.05


def mean_std(values: Sequence[float], ddof: int = DDOF) -> Tuple[float, float, int]:
    """``(mean, std with ddof, n)``; NaN values are left out; std is NaN with fewer than ``ddof + 1`` values."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), 0
    std = float(np.std(x, ddof=ddof)) if x.size > ddof else float("nan")
    return float(np.mean(x)), std, int(x.size)


def fmt_pct(mean: float, std: float) -> str:
    """``0.6213, 0.034`` -> ``"62.1 ± 3.4"`` (``"–"`` for a NaN std, ``"n/a"`` for a NaN mean)."""
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f} ± " + ("–" if math.isnan(std) else f"{100 * std:.1f}")


def _key(rec: Dict[str, Any]) -> Tuple[str, str, int]:
    return rec["method"], group_label(rec["test_group"]), int(rec["setting"])


def latest(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One record per id (the last one written wins)."""
    by_id: Dict[str, Dict[str, Any]] = {}
    for r in records:
        by_id[r["id"]] = r
    return list(by_id.values())


def aggregate(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (method, test group, setting): run count and mean/std of per-run per-class and overall mean Dice."""
    cells: Dict[Tuple[str, str, int], List[Dict[str, Any]]] = defaultdict(list)
    for r in records:
        cells[_key(r)].append(r)
    out = []
    for (method, group, setting), recs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        classes = sorted({int(c) for r in recs for c in r["per_class"]})
        names = {}
        for r in recs:
            for c, v in r["per_class"].items():
                names.setdefault(int(c), v.get("name") or str(c))
        per_class = {c: mean_std([r["per_class"].get(str(c), {}).get("dice", float("nan")) for r in recs])
                     for c in classes}
        out.append({"method": method, "model": recs[0]["model"], "kind": recs[0]["kind"], "group": group,
                    "setting": setting, "n_runs": len(recs), "classes": classes, "names": names,
                    "per_class": per_class, "overall": mean_std([r["mean_dice"] for r in recs]),
                    "precision": mean_std([_run_mean(r, "precision") for r in recs]),
                    "recall": mean_std([_run_mean(r, "recall") for r in recs]),
                    "n_labelled": sorted({r.get("n_labelled") for r in recs}, key=lambda v: (v is None, v or 0))})
    return out


def _run_mean(rec: Dict[str, Any], key: str) -> float:
    """The mean of ``key`` over a run's per-scan rows (NaN when no row has it: older records, empty masks)."""
    vals = [row.get(key) for row in rec["rows"]]
    vals = [float(v) for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


ALL_GROUPS = "all"


def _scan_dice(records: List[Dict[str, Any]], method: str, group: str) -> Dict[Tuple, float]:
    """Per-scan Dice of ``method`` on test group ``group`` (:data:`ALL_GROUPS`: every test group), keyed by
    (test group, setting, fold, seed, scan, class); rows without a Dice value are left out."""
    out = {}
    for r in records:
        g = group_label(r["test_group"])
        if r["method"] == method and group in (g, ALL_GROUPS):
            for row in r["rows"]:
                if row["dice"] is not None and not math.isnan(row["dice"]):
                    out[(g, int(r["setting"]), int(r["fold"]), int(r["seed"]), str(row["scan"]),
                         int(row["class"]))] = float(row["dice"])
    return out


def _wilcoxon(sa: Dict[Tuple, float], sb: Dict[Tuple, float], res: Dict[str, Any]) -> Dict[str, Any]:
    """``res`` with ``n_pairs``, ``mean_diff`` (a - b), ``p`` and ``note`` over the keys ``sa`` and ``sb`` share."""
    from scipy.stats import wilcoxon

    keys = sorted(set(sa) & set(sb))
    x = np.array([sa[k] for k in keys])
    y = np.array([sb[k] for k in keys])
    res.update({"n_pairs": len(keys), "p": float("nan"),
                "mean_diff": float(np.mean(x - y)) if keys else float("nan"), "note": ""})
    if not keys:
        res["note"] = "no common pairs"
    elif not np.any(x != y):
        res["note"] = "all differences are zero"
    else:
        res["p"] = float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)
    return res


def paired(records: List[Dict[str, Any]], a: str, b: str, group: str) -> Dict[str, Any]:
    """Per-scan Dice of methods ``a`` and ``b`` on test group ``group`` (:data:`ALL_GROUPS`: every test group,
    pooled) over the (test group, setting, fold, seed, scan, class) keys both have, and the two-sided Wilcoxon
    signed-rank test on them."""
    return _wilcoxon(_scan_dice(records, a, group), _scan_dice(records, b, group), {"a": a, "b": b, "group": group})


def setting_comparisons(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each method that ran on one test group in two or more settings: setting ``s`` against setting ``t > s``,
    paired over the (fold, seed, scan, class) keys both settings have (the same query scans), as :func:`paired`
    does for two methods. ``a`` / ``b`` read ``"<method> (setting s)"``; ``settings`` is ``(s, t)``."""
    out = []
    cells = dict.fromkeys((r["method"], group_label(r["test_group"])) for r in records)
    for method, group in cells:
        dice = _scan_dice(records, method, group)
        settings = sorted({k[1] for k in dice})
        for s, t in itertools.combinations(settings, 2):
            sa = {k[:1] + k[2:]: v for k, v in dice.items() if k[1] == s}
            sb = {k[:1] + k[2:]: v for k, v in dice.items() if k[1] == t}
            out.append(_wilcoxon(sa, sb, {"a": f"{method} (setting {s})", "b": f"{method} (setting {t})",
                                          "group": group, "settings": (s, t)}))
    return out


def verdict(p: float, note: str = "") -> str:
    if math.isnan(p):
        return f"no test ({note})" if note else "no test"
    return f"significant at {ALPHA}" if p < ALPHA else f"not significant at {ALPHA}"


def grid_comparisons(name: str, grids_dir: Path = HERE / "grids") -> List[Tuple[str, str]]:
    """The ``compare`` pairs of the grid file ``<grids_dir>/<name>.yaml`` (``[]`` when it has none or is absent)."""
    path = grids_dir / f"{name}.yaml"
    if not path.is_file():
        return []
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise GridError(f"grid file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    return [(a, b) for a, b in read_compare(raw, path)]


def default_comparisons(records: List[Dict[str, Any]]) -> List[Tuple[str, str, str]]:
    """Every pair of few-shot methods on each test group (grid order of first appearance)."""
    by_group: Dict[str, List[str]] = defaultdict(list)
    for r in records:
        g = group_label(r["test_group"])
        if r["kind"] == "fewshot" and r["method"] not in by_group[g]:
            by_group[g].append(r["method"])
    return [(a, b, g) for g, ms in by_group.items() for a, b in itertools.combinations(ms, 2)]


def across_groups(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per setting with two or more test groups: each method that has runs on every one of them, with the mean ±
    sample std of its runs' mean Dice per test group and over all its runs (the overall row researchers quote)."""
    out = []
    for setting in sorted({int(r["setting"]) for r in records}):
        recs = [r for r in records if int(r["setting"]) == setting]
        groups = list(dict.fromkeys(group_label(r["test_group"]) for r in recs))
        if len(groups) < 2:
            continue
        methods = list(dict.fromkeys(r["method"] for r in recs))
        for m in methods:
            mine = [r for r in recs if r["method"] == m]
            if {group_label(r["test_group"]) for r in mine} != set(groups):
                continue
            out.append({"method": m, "model": mine[0]["model"], "kind": mine[0]["kind"], "setting": setting, "groups": groups,
                        "per_group": {g: mean_std([r["mean_dice"] for r in mine if group_label(r["test_group"]) == g])
                                      for g in groups},
                        "overall": mean_std([r["mean_dice"] for r in mine])})
    return out


def labels_to_match(rows: List[Dict[str, Any]]) -> List[str]:
    """Sentences: per few-shot method x supervised model of one test group, the fewest labelled scans whose mean
    Dice reaches the few-shot mean (``[]`` without supervised rows)."""
    sup: Dict[str, List[Tuple[int, float]]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "supervised" and len(r["n_labelled"]) == 1 and r["n_labelled"][0] is not None:
            sup[r["model"]].append((int(r["n_labelled"][0]), r["overall"][0]))
    out = []
    for f in (r for r in rows if r["kind"] == "fewshot"):
        target = f["overall"][0]
        for model, pts in sup.items():
            pts = sorted(pts)
            hit = next(((n, m) for n, m in pts if m >= target), None)
            if hit is not None:
                out.append(f"- `{model}` reaches `{f['method']}` ({100 * target:.1f}) with {hit[0]} labelled "
                           f"scan{'s' if hit[0] > 1 else ''} ({100 * hit[1]:.1f}).")
            else:
                best = max(pts, key=lambda t: t[1])
                out.append(f"- `{model}` does not reach `{f['method']}` ({100 * target:.1f}) with any number of "
                           f"labelled scans in the grid (best: {best[0]} scans, {100 * best[1]:.1f}).")
    return out


def run_lines(records: List[Dict[str, Any]], group: str, setting: int, classes: List[int],
              order: List[str]) -> List[str]:
    """A markdown table of every run of one test group and setting: method, fold, seed, steps, training seconds,
    CPU, per-organ and mean Dice (%), in the order of ``order`` (the methods of the summary table), then fold, seed."""
    recs = [r for r in records if group_label(r["test_group"]) == group and int(r["setting"]) == setting]
    recs.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["fold"], r["seed"]))
    lines = ["| method | fold | seed | steps | train s | CPU | " + " | ".join(str(c) for c in classes) + " | mean |",
             "|---|---:|---:|---:|---:|---|" + "---:|" * (len(classes) + 1)]
    for r in recs:
        dice = [r["per_class"].get(str(c), {}).get("dice") for c in classes]
        vals = ["" if d is None else f"{100 * d:.1f}" for d in dice]
        lines.append(f"| {r['method']} | {r['fold']} | {r['seed']} | {r['steps']} | {r['train_seconds']:.0f} | "
                     f"{cpu_label(r)} | " + " | ".join(vals) + f" | {100 * r['mean_dice']:.1f} |")
    return lines


def cpu_label(record: Dict[str, Any]) -> str:
    """The CPU a run trained on: its model name, with the speed-relevant feature flags where the record has them
    (records from before ``cpu_flags`` was stored have the name only)."""
    m = record.get("machine", {})
    if "cpu_flags" not in m:
        return str(m.get("cpu"))
    return f"{m.get('cpu')} ({' '.join(m['cpu_flags']) or 'no AVX/AMX flags'})"


def provenance(records: List[Dict[str, Any]]) -> str:
    """One sentence: the training budgets, precisions, CPUs (with how many runs each) and package versions."""
    def listed(values) -> str:
        return ", ".join(sorted({str(v) for v in values}))

    budgets = listed("none" if r.get("budget_seconds") is None else f"{float(r['budget_seconds']):g} s"
                     for r in records)
    precision = listed(r.get("precision") for r in records)
    per_cpu: Dict[str, int] = defaultdict(int)
    for r in records:
        per_cpu[cpu_label(r)] += 1
    cpus = ", ".join(f"{c} ({n} runs)" for c, n in sorted(per_cpu.items()))
    return (f"{len(records)} runs; training budget per run {budgets}; precision {precision}; CPU {cpus}; "
            f"fewshot_proto {listed(r.get('version') for r in records)}.")


def markdown(name: str, cells: List[Dict[str, Any]], tests: List[Dict[str, Any]], source: str,
             records: Optional[List[Dict[str, Any]]] = None) -> str:
    lines = [f"# Grid {name}", "", f"From `{source}` (`python benchmarks/summarise.py {source}`).", ""]
    if records:
        lines += [provenance(records), ""]
    for (group, setting), rows in itertools.groupby(cells, key=lambda c: (c["group"], c["setting"])):
        rows = list(rows)
        classes = sorted({c for r in rows for c in r["classes"]})
        names = {c: r["names"][c] for r in rows for c in r["classes"]}
        lines += [f"## Test group {group}, setting {setting}", "",
                  "Dice (%), mean ± sample std (ddof 1) over folds and seeds of each run's mean Dice; runs = folds x "
                  "seeds finished.", "",
                  "| method | model | kind | runs | " + " | ".join(f"{names[c]} ({c})" for c in classes)
                  + " | mean |",
                  "|---|---|---|---:|" + "---:|" * (len(classes) + 1)]
        for r in rows:
            labelled = ", ".join("all" if v is None else str(v) for v in r["n_labelled"])
            label = r["method"] + ("" if r["kind"] == "fewshot" else f" (n_labelled {labelled})")
            vals = [fmt_pct(*r["per_class"][c][:2]) if c in r["per_class"] else "" for c in classes]
            lines.append(f"| {label} | {r['model']} | {r['kind']} | {r['n_runs']} | " + " | ".join(vals)
                         + f" | {fmt_pct(*r['overall'][:2])} |")
        lines.append("")
        match = labels_to_match(rows)
        if match:
            lines += ["Labelled scans a supervised model needs to reach each few-shot mean (means only):", "",
                      *match, ""]
        if any(r["precision"][2] for r in rows):
            lines += ["Precision and recall (%) of the foreground, mean ± sample std over runs of each run's mean "
                      "over its query scans and classes; precision well below recall means false positives.", "",
                      "| method | runs with them | precision | recall |", "|---|---:|---:|---:|"]
            for r in rows:
                if r["precision"][2]:
                    lines.append(f"| {r['method']} | {r['precision'][2]} | {fmt_pct(*r['precision'][:2])} | "
                                 f"{fmt_pct(*r['recall'][:2])} |")
            lines.append("")
        if records:
            lines += ["Every run: Dice (%) per organ (class id) and mean; steps = training steps run (the budget or "
                      "early stopping ended them).",
                      "", *run_lines(records, group, setting, classes, [r["method"] for r in rows]), ""]
    for setting, rows in itertools.groupby(across_groups(records or []), key=lambda c: c["setting"]):
        rows = list(rows)
        groups = rows[0]["groups"]
        lines += [f"## All test groups, setting {setting}", "",
                  "Mean Dice (%), mean ± sample std (ddof 1) of each run's mean Dice: per test group (runs), and over "
                  "every run of the method (methods with runs on every test group).", "",
                  "| method | kind | " + " | ".join(f"{g} (runs)" for g in groups) + " | all runs | runs |",
                  "|---|---|" + "---:|" * (len(groups) + 2)]
        for r in rows:
            vals = [f"{fmt_pct(*r['per_group'][g][:2])} ({r['per_group'][g][2]})" for g in groups]
            lines.append(f"| {r['method']} | {r['kind']} | " + " | ".join(vals)
                         + f" | {fmt_pct(*r['overall'][:2])} | {r['overall'][2]} |")
        lines.append("")
    if tests:
        lines += ["## Paired comparisons", "",
                  "Wilcoxon signed-rank test, two-sided (`scipy.stats.wilcoxon`, zero_method `wilcox`: zero "
                  "differences are dropped), on per-scan Dice over the (setting, fold, seed, query scan, class) pairs "
                  "both methods have; test group `all` pools the pairs of every test group. Mean difference = A - B, "
                  "in Dice points (%)."
                  + (" Rows `M (setting s)` against `M (setting t)` test one method in two settings, paired over the "
                     "(fold, seed, query scan, class) pairs both settings have."
                     if any("settings" in t for t in tests) else ""), "",
                  "| test group | A | B | pairs | mean diff (%) | p | at 0.05 |", "|---|---|---|---:|---:|---:|---|"]
        for t in tests:
            p = "n/a" if math.isnan(t["p"]) else f"{t['p']:.4g}"
            d = "n/a" if math.isnan(t["mean_diff"]) else f"{100 * t['mean_diff']:+.1f}"
            lines.append(f"| {t['group']} | {t['a']} | {t['b']} | {t['n_pairs']} | {d} | {p} | "
                         f"{verdict(t['p'], t['note'])} |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: Path, cells: List[Dict[str, Any]], tests: List[Dict[str, Any]],
              across: Sequence[Dict[str, Any]] = ()) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "model", "kind", "test_group", "setting", "class_id", "class_name", "n_runs",
                    "dice_mean", "dice_std_ddof1"])
        for r in cells:
            for c in r["classes"]:
                m, s, n = r["per_class"][c]
                w.writerow([r["method"], r["model"], r["kind"], r["group"], r["setting"], c, r["names"][c], n,
                            m, s])
            m, s, n = r["overall"]
            w.writerow([r["method"], r["model"], r["kind"], r["group"], r["setting"], "mean", "", n, m, s])
        for r in across:
            m, s, n = r["overall"]
            w.writerow([r["method"], r["model"], r["kind"], ALL_GROUPS, r["setting"], "mean", "", n, m, s])
        if tests:
            w.writerow([])
            w.writerow(["comparison_a", "comparison_b", "test_group", "n_pairs", "mean_diff", "p_wilcoxon", "verdict"])
            for t in tests:
                w.writerow([t["a"], t["b"], t["group"], t["n_pairs"], t["mean_diff"], t["p"],
                            verdict(t["p"], t["note"])])


def plot(path: Path, records: List[Dict[str, Any]], name: str) -> Optional[Path]:
    """The label-efficiency figure; ``None`` (nothing written) when the store has no supervised record (a figure of
    few-shot lines over an invented x axis would say nothing)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(group_label(r["test_group"]), int(r["setting"])) for r in records
                     if r["kind"] == "supervised" and r.get("n_labelled") is not None})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (group, setting) in zip(axes[0], panels):
        recs = [r for r in records if group_label(r["test_group"]) == group and int(r["setting"]) == setting]
        sup: Dict[str, Dict[int, List[float]]] = defaultdict(lambda: defaultdict(list))
        for r in recs:
            if r["kind"] == "supervised" and r.get("n_labelled") is not None:
                sup[r["model"]][int(r["n_labelled"])].append(r["mean_dice"])
        xs_all = sorted({n for d in sup.values() for n in d})
        for model, d in sorted(sup.items()):
            xs = sorted(d)
            stats = [mean_std(d[x]) for x in xs]
            ax.errorbar(xs, [100 * s[0] for s in stats], yerr=[0 if math.isnan(s[1]) else 100 * s[1] for s in stats],
                        marker="o", capsize=3, label=f"{model} (supervised)")
        few: Dict[str, List[float]] = defaultdict(list)
        for r in recs:
            if r["kind"] == "fewshot":
                few[r["method"]].append(r["mean_dice"])
        lo, hi = min(xs_all), max(xs_all)
        for i, (method, vals) in enumerate(sorted(few.items())):
            m, s, n = mean_std(vals)
            color = f"C{(len(sup) + i) % 10}"
            ax.hlines(100 * m, lo, hi, colors=color, linestyles="--", label=f"{method} (few-shot, {n} runs)")
            if not math.isnan(s):
                ax.fill_between([lo, hi], 100 * (m - s), 100 * (m + s), color=color, alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.set_xlabel("labelled training scans")
        ax.set_ylabel("mean Dice (%)")
        ax.set_title(f"{name}: test group {group}, setting {setting}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle("mean ± sample std over folds and seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def runs_panels(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """What the runs figure draws: per test group x setting (the tables' order), each method (alphabetical, as in
    the tables) with every run's ``(fold, seed, mean Dice)`` and the mean, sample std and count of those."""
    panels = []
    for group, setting in sorted({(group_label(r["test_group"]), int(r["setting"])) for r in records}):
        recs = [r for r in records if group_label(r["test_group"]) == group and int(r["setting"]) == setting]
        methods = []
        for m in sorted({r["method"] for r in recs}):
            runs = sorted((int(r["fold"]), int(r["seed"]), float(r["mean_dice"])) for r in recs if r["method"] == m)
            mean, std, n = mean_std([d for _, _, d in runs])
            methods.append({"method": m, "runs": runs, "mean": mean, "std": std, "n": n})
        panels.append({"group": group, "setting": setting, "methods": methods})
    return panels


def plot_runs(path: Path, records: List[Dict[str, Any]], name: str) -> Path:
    """Every run's mean Dice as a point (colour: fold, marker: seed) beside its method's mean ± sample std, one
    panel per test group x setting: the spread the mean ± std in the tables summarises."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    panels = runs_panels(records)
    folds = sorted({f for p in panels for m in p["methods"] for f, _, _ in m["runs"]})
    seeds = sorted({s for p in panels for m in p["methods"] for _, s, _ in m["runs"]})
    markers = "osD^vP*X"
    width = max(len(p["methods"]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.5, 0.9 * width + 2.5) * len(panels), 4.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for x, m in enumerate(panel["methods"]):
            for f, s, d in m["runs"]:
                dx = 0.3 * ((folds.index(f) + 0.5) / len(folds) - 0.5) + 0.04 * (seeds.index(s) - (len(seeds) - 1) / 2)
                ax.scatter(x - 0.12 + dx, 100 * d, s=22, color=f"C{folds.index(f) % 10}",
                           marker=markers[seeds.index(s) % len(markers)], alpha=0.85, zorder=3)
            yerr = 0 if math.isnan(m["std"]) else 100 * m["std"]
            ax.errorbar(x + 0.22, 100 * m["mean"], yerr=yerr, fmt="_", color="black", markersize=14, capsize=4,
                        zorder=4)
        ax.set_xticks(range(len(panel["methods"])))
        ax.set_xticklabels([f"{m['method']}\n({m['n']} runs)" for m in panel["methods"]], rotation=30, ha="right",
                           fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("mean Dice (%) of a run")
        ax.set_title(f"{name}: test group {panel['group']}, setting {panel['setting']}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", linestyle="", label=f"fold {f}")
               for i, f in enumerate(folds)]
    if len(seeds) > 1:
        handles += [Line2D([], [], color="grey", marker=markers[i % len(markers)], linestyle="", label=f"seed {s}")
                    for i, s in enumerate(seeds)]
    handles.append(Line2D([], [], color="black", marker="_", markersize=12, label="mean ± sample std"))
    axes[0][-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("each point is one run (its mean Dice over query scans and organs)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summarise(store: str | Path, compare: Sequence[Tuple[str, str]] = (), out_stem: Optional[Path] = None,
              plots: bool = True) -> Dict[str, Any]:
    store = Path(store)
    if not store.exists():
        raise GridError(f"store {store} does not exist")
    records = latest(read_store(store))
    if not records:
        raise GridError(f"store {store} holds no records")
    name = records[0].get("grid") or store.stem.removeprefix("grid_")
    cells = aggregate(records)
    groups = list(dict.fromkeys(group_label(r["test_group"]) for r in records))
    methods = {r["method"] for r in records}
    if not compare:  # the grid file's pairs, for those of its methods the store holds so far
        compare = [(a, b) for a, b in grid_comparisons(name) if a in methods and b in methods]
    for a, b in compare:
        for m in (a, b):
            if m not in methods:
                raise GridError(f"--compare: method {m!r} is not in {store} (methods: {', '.join(sorted(methods))})")
    pairs = [(a, b, g) for a, b in compare for g in groups] if compare else default_comparisons(records)
    if len(groups) > 1:  # the same pairs pooled over every test group
        pairs += [(a, b, ALL_GROUPS) for a, b in dict.fromkeys((a, b) for a, b, _ in pairs)]
    tests = [paired(records, a, b, g) for a, b, g in pairs] + setting_comparisons(records)
    stem = out_stem or store.with_suffix("")
    md_path, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md_path.write_text(markdown(name, cells, tests, str(store), records))
    write_csv(csv_path, cells, tests, across_groups(records))
    png = plot(Path(f"{stem}_label_efficiency.png"), records, name) if plots else None
    runs_png = plot_runs(Path(f"{stem}_runs.png"), records, name) if plots else None
    return {"cells": cells, "tests": tests, "md": md_path, "csv": csv_path, "png": png, "runs_png": runs_png}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", nargs="+", help="grid results store(s) (.jsonl); each gets its own tables")
    ap.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                    help="paired Wilcoxon test between methods A and B on every test group (repeatable; replaces "
                         "the default: every pair of few-shot methods)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    for store in args.store:
        try:
            out = summarise(store, [tuple(c) for c in args.compare], plots=not args.no_plot)
        except GridError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(out["md"].read_text())
        print(f"wrote {out['md']}, {out['csv']}" + "".join(f", {out[k]}" for k in ("runs_png", "png") if out[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
