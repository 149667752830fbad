"""Train and evaluate the few-shot model on real CHAOS-T2 under the field's protocol.

alpnet protocol, Setting 2, 1-shot, for each requested (test group, fold): train for a wall-time budget (the
reference: SSL-ALPNet's own pipeline trained 2015 s on this machine for fold 0, test classes {2,3}), then
evaluate the fold's query scans and record per-organ Dice and the time each part took. Each run goes through the
grid runner's ``execute_run`` (``benchmarks/grid.py``), the one place benchmark runs are trained and scored.

    python benchmarks/chaos_t2_fewshot.py                                  # fold 0, {2,3}, 2015 s
    python benchmarks/chaos_t2_fewshot.py --groups 23,14 --folds 0-4 --seconds 2015
    python benchmarks/chaos_t2_fewshot.py --seconds 120 --out /tmp/smoke   # quick smoke run
    python benchmarks/chaos_t2_fewshot.py --report-only                    # rewrite the markdown from the JSON

Writes ``benchmarks/results/chaos_t2_fewshot.{json,md}`` (merged with earlier runs: one row per model variant,
group, fold, budget and Dice-term weight; the markdown adds mean ± std over the folds of each configuration run on
more than one fold) and each run's checkpoint and reports under ``--runs``. Uses only the public API.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "chaos_t2"
#: the CHAOS-T2 recipe (SGD, step schedule, no warm-up, no Dice term); each run overrides its group, fold and budget
DEFAULT_CONFIG = HERE.parent / "configs" / "experiments" / "chaos_t2_setting2_23_1shot.yaml"
REFERENCE = {"method": "SSL-ALPNet (ResNet-101, random init, superpixel self-supervision)",
             "fold": 0, "test_classes": [2, 3], "train_seconds": 2015, "iters": 1000,
             "dice": {"2": 26.1, "3": 34.5, "mean": 30.3}, "dice_untrained_mean": 9.1, "eval_seconds": 170}


def parse_list(text: str):
    if "-" in text and "," not in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(t) for t in text.split(",") if t]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--groups", default="23", help="test-class groups: 23 = {2,3} kidneys, 14 = {1,4}")
    p.add_argument("--folds", default="0")
    p.add_argument("--seconds", type=float, default=2015.0, help="training wall-time budget per run")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--mode", default="mixed", choices=["mixed", "superpixel", "labelled"])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base experiment YAML (default: %(default)s)")
    p.add_argument("--lambda-dice", type=float, default=None,
                   help="weight of the soft Dice term added to the CE (default: the base config's, 0 for CHAOS-T2)")
    p.add_argument("--runs", default="runs/bench_chaos_t2")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the markdown from the existing JSON in --out and exit (no training)")
    args = p.parse_args(argv)

    if args.report_only:
        path = Path(args.out) / "chaos_t2_fewshot.json"
        if not path.is_file():
            print(f"--report-only: no results at {path}", file=sys.stderr)
            return 2
        md = to_markdown(json.loads(path.read_text()))
        (Path(args.out) / "chaos_t2_fewshot.md").write_text(md)
        print(md)
        return 0

    import torch

    from fewshot_proto.config import apply_overrides, load_config

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from grid import execute_run, make_run

    if not Path(args.data).is_dir():
        print(f"CHAOS-T2 not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / "chaos_t2_fewshot.json"
    old = json.loads(results_path.read_text()) if results_path.exists() else {"runs": []}
    runs = [r for r in old.get("runs", [])]

    for group in args.groups.split(","):
        test = [int(c) for c in group]
        for fold in parse_list(args.folds):
            base = load_config(args.config)
            tag = "" if args.lambda_dice is None else f"_dice{args.lambda_dice:g}"
            run_dir = Path(args.runs) / f"g{group}_f{fold}{tag}"
            cfg = apply_overrides(base, {
                "data.root": args.data, "data.layout": "alpnet", "protocol.name": "alpnet", "protocol.setting": 2,
                "protocol.shots": 1, "episodes.shots": 1, "protocol.test_classes": test, "protocol.fold": fold,
                "episodes.mode": args.mode, "train.precision": args.precision, "train.max_seconds": args.seconds,
                "train.iters": 100000, "train.scheduler": "step", "train.lr_step": 1000, "train.lr_gamma": 0.95,
                "train.out": str(run_dir), "train.ckpt_every": 500,
                **({} if args.lambda_dice is None else {"train.lambda_dice": args.lambda_dice})})
            print(f"== group {test} fold {fold}: training for {args.seconds:.0f} s ({args.precision}, {args.mode})",
                  flush=True)
            # a re-run replaces the row and its run
            rec = execute_run(make_run(cfg), args.runs, "chaos_t2_fewshot", out=run_dir,
                              meta={"benchmark": "chaos_t2_fewshot", "fold": fold, "test_classes": test})
            dice = {c: 100 * v["dice"] for c, v in rec["per_class"].items()}
            row = {"model": cfg.model.name, "group": group, "fold": fold, "test_classes": test,
                   "budget_seconds": args.seconds,
                   "train_seconds": round(rec["train_wall_seconds"], 1), "iters": rec["steps"],
                   "seconds_per_iter": round(rec["seconds_per_step"], 4), "eval_seconds": round(rec["eval_seconds"], 1),
                   "precision": args.precision, "mode": args.mode, "lambda_dice": cfg.train.lambda_dice,
                   "dice": {k: round(v, 2) for k, v in dice.items()},
                   "mean_dice": round(100 * rec["mean_dice"], 2),
                   "query_scans": sorted({r["scan"] for r in rec["rows"]}), "run_id": rec["id"],
                   "cpu": rec["machine"]["cpu"]}
            print(json.dumps(row), flush=True)
            runs = [r for r in runs if not (r["fold"] == fold and _config_key(r) == _config_key(row))]
            runs.append(row)
            doc = {"reference": REFERENCE, "machine": {"threads": torch.get_num_threads(),
                                                      "python": platform.python_version(),
                                                      "torch": torch.__version__}, "runs": runs}
            results_path.write_text(json.dumps(doc, indent=1) + "\n")
            (out_dir / "chaos_t2_fewshot.md").write_text(to_markdown(doc))
    print((out_dir / "chaos_t2_fewshot.md").read_text())
    return 0


#: labels of rows written before the model split (``"<name> <prototype_head as JSON>"``) -> the registered model
#: that is the same network: the residual prototype head "f5" is ``cwpa_unet_matcher``'s matcher head, no head
#: (``null``) is ``cwpa_unet``
_OLD_MODEL_LABELS = {'cwpa_unet "f5"': "cwpa_unet_matcher", "cwpa_unet null": "cwpa_unet"}


def _model(row) -> str:
    """The row's registered model name. Old rows are mapped by ``_OLD_MODEL_LABELS``; rows written before the
    prototype head existed have no model field and were ``cwpa_unet`` (no head)."""
    name = row.get("model", "cwpa_unet")
    return _OLD_MODEL_LABELS.get(name, name)


def _lambda_dice(row) -> float:
    """The row's Dice-term weight; rows written before the term existed trained without it."""
    return row.get("lambda_dice", 0.0)


def _config_key(row) -> tuple:
    """What a row was trained with apart from its fold: a new run replaces the row of the same key and fold, and
    ``fold_summary`` pools the folds of one key."""
    return (_model(row), row["group"], row["budget_seconds"], row.get("mode"), _lambda_dice(row))


def fold_summary(runs):
    """Cross-validation rows: runs of one (model, test group, budget, mode, Dice weight) pooled over their folds.

    Returns a list of dicts with ``folds`` (sorted fold ids), per-organ ``dice`` mean and population std over the
    folds (``{class: (mean, std)}``) and ``mean`` (mean, std) of the folds' mean Dice. Each fold counts once: ``main``
    replaces the row of the same ``_config_key`` and fold.
    """
    import statistics

    groups = {}
    for r in runs:
        groups.setdefault(_config_key(r), []).append(r)
    out = []
    for key, rows in sorted(groups.items(), key=lambda kv: tuple(str(k) for k in kv[0])):
        rows = sorted(rows, key=lambda r: r["fold"])
        organs = sorted({k for r in rows for k in r["dice"]})
        dice = {}
        for k in organs:
            vals = [r["dice"][k] for r in rows if k in r["dice"]]
            dice[k] = (statistics.fmean(vals), statistics.pstdev(vals))
        means = [r["mean_dice"] for r in rows]
        out.append({"model": key[0], "group": key[1], "test_classes": rows[0]["test_classes"],
                    "budget_seconds": key[2], "mode": key[3], "lambda_dice": key[4],
                    "folds": [r["fold"] for r in rows], "dice": dice,
                    "mean": (statistics.fmean(means), statistics.pstdev(means))})
    return out


def to_markdown(doc) -> str:
    names = {"1": "liver", "2": "R kidney", "3": "L kidney", "4": "spleen"}
    ref = doc["reference"]
    lines = ["# CHAOS-T2, alpnet protocol, Setting 2, 1-shot", "",
             f"Reference ({ref['method']}), fold {ref['fold']}, test {{2,3}}, {ref['train_seconds']} s training: "
             f"R kidney {ref['dice']['2']}, L kidney {ref['dice']['3']}, mean {ref['dice']['mean']} Dice "
             f"(untrained {ref['dice_untrained_mean']}); evaluation {ref['eval_seconds']} s.", "",
             "Model: `cwpa_unet_matcher` (DESIGN.md's model plus an ALPNet-style matcher head whose scores are "
             "added to the decoder's logits; the default config's model) or `cwpa_unet` (DESIGN.md section 3's "
             "model exactly, no matcher head; the earlier rows). Rows written before the two were split are "
             "shown under the model they are (`cwpa_unet \"f5\"` is `cwpa_unet_matcher`; `cwpa_unet null` and "
             "rows without a model are `cwpa_unet`).", "",
             "`lambda_dice`: weight of the soft Dice term added to the CE (0: none; rows written before it existed "
             "had none).", "",
             "| model | test classes | fold | budget (s) | iters | s/iter | precision | mode | "
             "lambda_dice | per-organ Dice (%) | mean | eval (s) |",
             "|---|---|---:|---:|---:|---:|---|---|---:|---|---:|---:|"]
    for r in sorted(doc["runs"], key=lambda r: (r["group"], r["fold"], _model(r), r["budget_seconds"],
                                                _lambda_dice(r))):
        organs = ", ".join(f"{names.get(k, k)} {v:.1f}" for k, v in sorted(r["dice"].items()))
        lines.append(f"| {_model(r)} | {{{','.join(map(str, r['test_classes']))}}} | {r['fold']} | "
                     f"{r['budget_seconds']:.0f} | "
                     f"{r['iters']} | {r['seconds_per_iter']:.3f} | {r['precision']} | {r['mode']} | "
                     f"{_lambda_dice(r):g} | {organs} | "
                     f"{r['mean_dice']:.1f} | {r['eval_seconds']:.0f} |")
    summary = [row for row in fold_summary(doc["runs"]) if len(row["folds"]) > 1]
    if summary:
        lines += ["", "## Over folds", "",
                  "Mean ± std (population) over the folds listed; each fold is one training run (one seed) with its "
                  "own support and query scans.", "",
                  "| model | test classes | budget (s) | mode | lambda_dice | folds | "
                  "per-organ Dice (%) | mean |",
                  "|---|---|---:|---|---:|---|---|---:|"]
        for row in summary:
            organs = ", ".join(f"{names.get(k, k)} {m:.1f} ± {sd:.1f}" for k, (m, sd) in sorted(row["dice"].items()))
            lines.append(f"| {row['model']} | {{{','.join(map(str, row['test_classes']))}}} | "
                         f"{row['budget_seconds']:.0f} | {row['mode']} | {row['lambda_dice']:g} | "
                         f"{','.join(map(str, row['folds']))} | {organs} | "
                         f"{row['mean'][0]:.1f} ± {row['mean'][1]:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
