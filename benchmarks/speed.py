"""Speed and memory of training and evaluation on the built-in phantoms, against the project's targets.

    python benchmarks/speed.py                                   # 256x256, 1-shot, fp32 and bf16, 2 threads
    python benchmarks/speed.py --precision bf16 --steps 50 --warmup 10
    python benchmarks/speed.py --quick --out /tmp/speed          # tiny smoke run (64x64, a few steps, fp32)

One command measures, in one run, with the public API only:

1. **Training step time** per 1-shot episode: ``fewshot_proto.engine.train`` (the real loop: the episode worker
   process, autocast, channels_last, optimiser and schedule of the built-in default config) runs ``warmup + steps``
   episodes at ``--size``; the per-step times come from the run's CSV log (``log_every=1``) and the median over
   the steps after the warm-up is reported (with the quartiles: the machine is shared and noisy).
2. **Episode sampling share**: the time the loop waited for its next episode (the log's ``sample_seconds``)
   over the step time, summed over the timed steps. The sampler's own cost per episode when called directly
   (the run's episodes drawn again by a fresh sampler, no overlap with compute) is reported next to it, for
   information: the worker process hides it from the step only when a core is free for it.
3. **Achieved GFLOP/s**: FLOPs of one training step (forward + backward of the same episode loss, counted with
   ``torch.utils.flop_counter.FlopCounterMode`` on the first episodes of the run) over the median step time, and
   its ratio to a **GEMM peak** measured in the same run (square matmul, fp32 and bf16, best of several, the same
   thread count; measured before and after the other phases and the best taken).
4. **Evaluation time** through the real ``evaluate`` (alpnet protocol, Setting 2, test classes {2, 3}, fold 0,
   the model trained in step 1): seconds per query volume, per query slice (all classes) and per query slice per
   class, from the summary's ``timing`` (median over ``--eval-repeats`` calls after a first, cold, one).
5. **Peak RSS** of training and of evaluation, each in its own subprocess (``--phase train|eval``) that reports
   ``getrusage(RUSAGE_SELF).ru_maxrss`` at its end, so one phase's peak never hides in the other's. The training
   loop samples episodes in a DataLoader worker process (the default ``train.num_workers`` 1); its peak RSS
   (``RUSAGE_CHILDREN``) is reported next to the training process's. Most of it is pages shared with the parent
   at the fork (torch's libraries, the model), so the two must not simply be added.

Runs on the CPU with ``--threads`` intra-op threads (``OMP_NUM_THREADS`` is set for every process). Run it alone
on a quiet machine: the load average at start and end is recorded. Writes ``<out>.json`` and ``<out>.md``
(default ``benchmarks/results/speed``) and prints the table.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: the targets of issue 5 (2 threads, 256x256, 1-shot); key -> (precision or None for each, bound, "<=" / ">=")
TARGETS = [
    ("train_step_median_s", "bf16", 0.45, "<="),
    ("train_step_median_s", "fp32", 0.60, "<="),
    ("eval_s_per_query_slice_per_class", None, 0.06, "<="),
    ("train_peak_rss_gib", None, 1.5, "<="),
    ("gflops_fraction_of_gemm_peak", "bf16", 0.60, ">="),
    ("sample_share", None, 0.05, "<="),
]
#: SSL-ALPNet's own pipeline measured on this machine (issue 5), for context
REFERENCE = {"method": "SSL-ALPNet", "train_step_s": 2.06, "eval_s_per_query_slice": 0.63, "peak_rss_gib": 2.29}

QUICK = {"size": 32, "steps": 2, "warmup": 1, "gemm_size": 256, "gemm_repeats": 2, "eval_repeats": 0,
         "flop_episodes": 1}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="input size (data.size); the built-in default is 256")
    p.add_argument("--steps", type=int, default=30, help="timed training steps (after the warm-up); >= 20 for the "
                   "targets")
    p.add_argument("--warmup", type=int, default=20, help="training steps run before timing (the first episodes "
                   "decode and resize each training scan into the sampler's slice cache)")
    p.add_argument("--precision", default=None, help="comma-separated: fp32,bf16 (default; --quick: fp32)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (and OMP_NUM_THREADS)")
    p.add_argument("--eval-repeats", type=int, default=3, help="timed evaluate() calls after the cold one")
    p.add_argument("--gemm-size", type=int, default=4096, help="n of the n x n x n matmul of the GEMM peak")
    p.add_argument("--gemm-repeats", type=int, default=5, help="timed matmuls per dtype (best is kept)")
    p.add_argument("--flop-episodes", type=int, default=3, help="episodes whose training step FLOPs are counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "speed"), help="output prefix: writes OUT.json, OUT.md")
    p.add_argument("--workdir", default=None, help="keep run folders here (default: a temporary folder)")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run (fp32 unless --precision): " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--phase", choices=["train", "eval"], help=argparse.SUPPRESS)  # internal: one subprocess phase
    p.add_argument("--result", help=argparse.SUPPRESS)  # internal: where a phase writes its JSON
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.precisions = [s.strip() for s in (args.precision or ("fp32" if args.quick else "fp32,bf16")).split(",")
                       if s.strip()]
    bad = [s for s in args.precisions if s not in ("fp32", "bf16")]
    if bad:
        p.error(f"--precision: {bad} not supported on the CPU; use fp32 and/or bf16")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1 and --warmup >= 0")
    return args


def set_thread_env(threads: int) -> None:
    """Before torch/numpy are imported: every BLAS/OpenMP pool gets the same thread count."""
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(threads)


def peak_rss_gib(who: str = "self") -> float:
    """Peak RSS of this process (``"self"``) or of its largest finished child (``"children"``: the training
    loop's DataLoader worker), from ``getrusage``."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN).ru_maxrss
    return kib / 2 ** 20  # KiB on Linux


def bench_config(args: argparse.Namespace, precision: str, out: Path):
    """The built-in default config (model, loss, episodes) at ``--size``, 1-shot, Setting 2, test {2, 3}, fold 0."""
    from fewshot_proto.config import apply_overrides, default_config

    return apply_overrides(default_config(), {
        "data.size": args.size, "episodes.shots": 1, "protocol.shots": 1, "protocol.name": "alpnet",
        "protocol.setting": 2, "protocol.test_classes": [2, 3], "protocol.fold": 0,
        "train.iters": args.warmup + args.steps, "train.precision": precision, "train.threads": args.threads,
        "train.device": "cpu", "train.seed": args.seed, "train.ckpt_every": 0, "train.log_every": 1,
        "train.out": str(out)})


def loss_description(args: argparse.Namespace) -> str:
    """The training loss the benchmark's config trains, e.g. ``"CE + 1 x Dice + 1 x alignment + 0.5 x cyclic"``."""
    t = bench_config(args, "fp32", Path(".")).train
    terms = [f"{w:g} x {name}" for name, w in (("Dice", t.lambda_dice), ("alignment", t.lambda_align),
                                               ("cyclic", t.lambda_cyc)) if w > 0]
    return " + ".join(["CE", *terms])


def _quantiles(xs: List[float]) -> Dict[str, float]:
    import numpy as np

    a = np.asarray(xs, dtype=float)
    return {"median": float(np.median(a)), "p25": float(np.percentile(a, 25)), "p75": float(np.percentile(a, 75)),
            "min": float(a.min()), "n": int(a.size)}


# ---------------------------------------------------------------------------------------------------------------
# phases run in their own process
# ---------------------------------------------------------------------------------------------------------------


def phase_train(args: argparse.Namespace, precision: str, workdir: Path) -> Dict[str, Any]:
    """Train ``warmup + steps`` episodes with the real loop; step and wait times from its CSV log."""
    from fewshot_proto.data import open_dataset
    from fewshot_proto.engine import train

    out = workdir / f"train_{precision}"
    cfg = bench_config(args, precision, out)
    dataset = open_dataset()
    res = train(cfg, progress=False, dataset=dataset, overwrite=True)
    with open(out / "train_log.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) > args.warmup]
    if len(rows) != args.steps:
        raise RuntimeError(f"expected {args.steps} timed steps in {out / 'train_log.csv'}, found {len(rows)}")
    step_s = [float(r["seconds_per_step"]) for r in rows]
    wait_s = [float(r["sample_seconds"]) for r in rows]
    if not all(math.isfinite(v) for v in res.losses):
        raise RuntimeError(f"non-finite training loss in the {precision} run: {res.losses}")
    return {"precision": precision, "steps": res.steps, "warmup": args.warmup, "step_seconds": step_s,
            "sample_wait_seconds": wait_s, "step": _quantiles(step_s),
            "sample_share": sum(wait_s) / sum(step_s),
            "trainer_seconds_per_step": res.seconds_per_step, "trainer_sample_fraction": res.sample_fraction,
            "first_loss": res.losses[0], "last_loss": res.losses[-1], "checkpoint": str(res.checkpoint),
            "num_workers": cfg.train.num_workers, "peak_rss_gib": peak_rss_gib(),
            "worker_peak_rss_gib": peak_rss_gib("children") if cfg.train.num_workers else 0.0}


def phase_eval(args: argparse.Namespace, precision: str, workdir: Path) -> Dict[str, Any]:
    """Evaluate the model trained in the train phase (a fresh one if absent) with the real ``evaluate``."""
    import torch

    from fewshot_proto.data import open_dataset
    from fewshot_proto.engine import evaluate, model_from_checkpoint
    from fewshot_proto.engine.evaluator import protocol_specs
    from fewshot_proto.engine.runtime import Runtime
    from fewshot_proto.models import build_model

    cfg = bench_config(args, precision, workdir / f"eval_{precision}")
    runtime = Runtime.resolve(device="cpu", precision=precision, channels_last=cfg.train.channels_last,
                              threads=args.threads)
    ckpt = workdir / f"train_{precision}" / "checkpoint.pt"
    if ckpt.is_file():
        model, _ = model_from_checkpoint(ckpt)
        trained = True
    else:
        torch.manual_seed(args.seed)
        model = build_model(cfg.model.name, **cfg.model.kwargs)
        trained = False
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    dataset = open_dataset()
    specs = protocol_specs(dataset, cfg.protocol)
    volumes = len({str(s.query_scan) for s in specs})
    slices = len({(str(s.query_scan), int(z)) for s in specs for z in s.query_z})
    slice_classes = sum(len(s.query_z) for s in specs)
    classes = len({int(s.class_id) for s in specs})
    runs = []
    for i in range(1 + args.eval_repeats):  # the first call is cold (volumes read from disk); reports once
        summary = evaluate(model, dataset, specs, size=cfg.data.size, runtime=runtime,
                           out_dir=(workdir / f"eval_{precision}") if i == 0 else None)
        t = summary["timing"]
        if t["query_slices"] != slice_classes:
            raise RuntimeError(f"evaluate timed {t['query_slices']} (slice, class) pairs, the specs hold "
                               f"{slice_classes}")
        runs.append({"seconds": t["seconds"], "mean_dice": summary["mean_dice"]})
    warm = [r["seconds"] for r in runs[1:]] or [runs[0]["seconds"]]
    sec = _quantiles(warm)["median"]
    return {"precision": precision, "trained_model": trained, "episodes": len(specs), "volumes": volumes,
            "classes": classes, "query_slices": slices, "query_slice_classes": slice_classes,
            "cold_seconds": runs[0]["seconds"], "warm_seconds": warm, "seconds": sec,
            "s_per_volume": sec / volumes, "s_per_query_slice": sec / slices,
            "s_per_query_slice_per_class": sec / slice_classes,
            "cold_s_per_query_slice_per_class": runs[0]["seconds"] / slice_classes,
            "mean_dice": runs[0]["mean_dice"], "peak_rss_gib": peak_rss_gib()}


# ---------------------------------------------------------------------------------------------------------------
# measured in the parent process
# ---------------------------------------------------------------------------------------------------------------


def gemm_peak(n: int, repeats: int) -> Dict[str, float]:
    """Best-of-``repeats`` GFLOP/s of an ``n x n @ n x n`` matmul, fp32 and bf16 (2 n^3 FLOPs each)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        torch.mm(a, b)  # warm-up (kernel selection, page faults)
        best = math.inf
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2.0 * n ** 3 / best / 1e9
    return out


def count_flops_and_sampler(args: argparse.Namespace, precisions: List[str], workdir: Path) -> Dict[str, Any]:
    """FLOPs of one training step per precision, and the sampler's own cost per episode at ``--size``.

    FlopCounterMode counts by operator and shape, so the count is the same under autocast; it is counted per
    precision anyway (a precision-dependent code path would show up here).
    """
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from fewshot_proto.data import open_dataset
    from fewshot_proto.engine.episodic import build_training_sampler, episode_losses
    from fewshot_proto.engine.runtime import Runtime, configure_threads
    from fewshot_proto.engine.stream import EpisodeSource, episode_to_tensors
    from fewshot_proto.episodes.protocol import fold_split
    from fewshot_proto.models import build_model

    configure_threads(args.threads)
    cfg = bench_config(args, "fp32", workdir / "flops")
    dataset = open_dataset()
    index = dataset.slice_index()
    split = fold_split(index, cfg.protocol.fold, cfg.protocol.n_folds, cfg.protocol.shots)
    sampler = build_training_sampler(cfg, dataset, index, list(split.train_scans))
    source = EpisodeSource(sampler, seed=cfg.train.seed, rank=0)  # the episodes the training run drew first
    t = cfg.train
    device = torch.device("cpu")
    runtimes = {p: Runtime.resolve(device="cpu", precision=p, channels_last=t.channels_last, threads=args.threads)
                for p in precisions}
    torch.manual_seed(t.seed)
    model = build_model(cfg.model.name, **cfg.model.kwargs).to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    # the episodes of the training run, drawn again by a fresh sampler (same cache state as the run's prefetch
    # thread); the timed ones are those of the timed steps
    sample_s = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        source.episode(i)
        if i >= args.warmup:
            sample_s.append(time.perf_counter() - t0)
    model.train()
    flops: Dict[str, List[int]] = {p: [] for p in precisions}
    for i in range(max(1, args.flop_episodes)):
        ep = source.episode(i)
        for p in precisions:
            tensors = episode_to_tensors(ep, device, t.channels_last)
            model.zero_grad(set_to_none=True)
            with FlopCounterMode(display=False) as counter:
                with runtimes[p].autocast():
                    terms = episode_losses(model, *tensors, lambda_align=t.lambda_align, lambda_cyc=t.lambda_cyc,
                                           ce_weights=t.ce_weights, lambda_dice=t.lambda_dice)
                terms["loss"].backward()
            flops[p].append(int(counter.get_total_flops()))
    return {"flops_per_step": {p: float(np.median(v)) for p, v in flops.items()}, "flops_samples": flops,
            "sampler_seconds": _quantiles(sample_s)}


def run_phase(args: argparse.Namespace, phase: str, precision: str, workdir: Path) -> Dict[str, Any]:
    result = workdir / f"{phase}_{precision}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--precision", precision,
           "--result", str(result), "--workdir", str(workdir), "--size", str(args.size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--eval-repeats", str(args.eval_repeats),
           "--seed", str(args.seed)]
    print(f"[speed] {phase} {precision} ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=dict(os.environ), cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"phase {phase} ({precision}) failed with exit code {proc.returncode}: {' '.join(cmd)}")
    out = json.loads(result.read_text())
    out["wall_seconds"] = time.perf_counter() - t0
    return out


def collect_metrics(doc: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per (metric, precision): measured value, target and pass/fail."""
    rows = []
    target_of = {}
    for key, prec, bound, op in TARGETS:
        target_of[(key, prec)] = (bound, op)

    def add(key, prec, value, label, unit, fmt):
        bound, op = target_of.get((key, prec), target_of.get((key, None), (None, None)))
        ok = None
        if bound is not None and value is not None and math.isfinite(value):
            ok = value <= bound if op == "<=" else value >= bound
        rows.append({"metric": key, "label": label, "precision": prec, "value": value, "unit": unit, "fmt": fmt,
                     "target": None if bound is None else f"{op} {format(bound, fmt if '%' in fmt else 'g')}",
                     "pass": ok})

    for p in doc["precisions"]:
        tr, ev = doc["train"][p], doc["eval"][p]
        add("train_step_median_s", p, tr["step"]["median"], "training step, median", "s", ".3f")
        add("sample_share", p, tr["sample_share"], "episode sampling share of the step (wait)", "", ".1%")
        add("sampler_cost_share", p, doc["sampler_seconds"]["median"] / tr["step"]["median"],
            "sampler's own cost / step (no overlap, info)", "", ".1%")
        add("train_peak_rss_gib", p, tr["peak_rss_gib"], "peak RSS, training", "GiB", ".2f")
        if tr.get("num_workers"):
            add("worker_peak_rss_gib", p, tr["worker_peak_rss_gib"],
                "peak RSS, episode worker process (info; mostly pages shared with training)", "GiB", ".2f")
        add("achieved_gflops", p, doc["achieved_gflops"][p], "achieved GFLOP/s in the training step", "GFLOP/s",
            ".1f")
        add("gemm_peak_gflops", p, doc["gemm_peak_gflops"][p], "GEMM peak (measured)", "GFLOP/s", ".1f")
        add("gflops_fraction_of_gemm_peak", p, doc["gflops_fraction_of_gemm_peak"][p],
            f"achieved / {p} GEMM peak", "", ".1%")
        add("eval_s_per_volume", p, ev["s_per_volume"], "evaluation per query volume", "s", ".3f")
        add("eval_s_per_query_slice", p, ev["s_per_query_slice"], "evaluation per query slice (all classes)", "s",
            ".4f")
        add("eval_s_per_query_slice_per_class", p, ev["s_per_query_slice_per_class"],
            "evaluation per query slice per class", "s", ".4f")
        add("eval_peak_rss_gib", p, ev["peak_rss_gib"], "peak RSS, evaluation", "GiB", ".2f")
    return rows


def to_markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    lines = [f"# Speed on the built-in phantoms, {s['size']}x{s['size']}, 1-shot", "",
             f"{doc['created']} | {m['cpu_model']} ({', '.join(m['cpu_flags']) or 'no AVX flags read'}) | "
             f"{m['cores']} cores | {s['threads']} threads | torch {m['torch']} | python {m['python']} | "
             f"load average at start {m['load_start'][0]:.2f}, at end {m['load_end'][0]:.2f}", "",
             f"Training: median of {s['steps']} steps after {s['warmup']} warm-up steps (real `train` loop, default "
             f"phantom config at {s['size']} px: mixed episodes, {s.get('loss', 'CE + alignment + cyclic')} loss). "
             f"Evaluation: real "
             f"`evaluate`, alpnet protocol, Setting 2, test classes {{2, 3}}, fold 0, median of "
             f"{s['eval_repeats']} calls after a cold one (the cold one when 0). Each phase ran in its own "
             f"process (peak RSS per phase).",
             "", "| metric | precision | measured | target | pass |", "|---|---|---:|---|---|"]
    for r in doc["metrics"]:
        v = r["value"]
        val = "n/a" if v is None or not math.isfinite(v) else (format(v, r["fmt"]) + (f" {r['unit']}" if r["unit"]
                                                                                      else ""))
        ok = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['label']} | {r['precision']} | {val} | {r['target'] or ''} | {ok} |")
    lines += ["", "Quartiles of the training step (s): " + "; ".join(
        f"{p} p25 {doc['train'][p]['step']['p25']:.3f}, p75 {doc['train'][p]['step']['p75']:.3f}"
        for p in doc["precisions"]),
        "FLOPs per training step (FlopCounterMode): " + ", ".join(
            f"{p} {doc['flops_per_step'][p] / 1e9:.1f} GFLOP" for p in doc["precisions"]),
        f"Evaluation: {doc['eval'][doc['precisions'][0]]['volumes']} query volumes, "
        f"{doc['eval'][doc['precisions'][0]]['query_slices']} query slices, "
        f"{doc['eval'][doc['precisions'][0]]['query_slice_classes']} (slice, class) pairs.",
        f"Reference ({REFERENCE['method']}, same machine, from issue 5): {REFERENCE['train_step_s']} s/episode, "
        f"{REFERENCE['eval_s_per_query_slice']} s/query slice, {REFERENCE['peak_rss_gib']} GiB.", ""]
    if doc["settings"]["quick"]:
        lines.insert(1, "\n**--quick smoke run: tiny settings, the numbers are not comparable with the targets.**")
    return "\n".join(lines) + "\n"


def print_table(doc: Dict[str, Any]) -> None:
    print(f"\nspeed, {doc['settings']['size']}x{doc['settings']['size']}, {doc['settings']['threads']} threads, "
          f"load {doc['machine']['load_start'][0]:.2f} -> {doc['machine']['load_end'][0]:.2f}")
    print(f"  {'metric':<48} {'prec':<5} {'measured':>16} {'target':>9}  pass")
    for r in doc["metrics"]:
        v = r["value"]
        val = "n/a" if v is None or not math.isfinite(v) else (format(v, r["fmt"]) + (f" {r['unit']}" if r["unit"]
                                                                                      else ""))
        ok = "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        print(f"  {r['label']:<48} {r['precision']:<5} {val:>16} {r['target'] or '':>9}  {ok}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    set_thread_env(args.threads)

    if args.phase:  # a child process: one phase, one precision
        if len(args.precisions) != 1 or not args.result or not args.workdir:
            raise SystemExit("--phase needs exactly one --precision, --result and --workdir")
        fn = phase_train if args.phase == "train" else phase_eval
        out = fn(args, args.precisions[0], Path(args.workdir))
        Path(args.result).write_text(json.dumps(out, indent=1) + "\n")
        return 0

    import torch

    import fewshot_proto
    from fewshot_proto.data.phantom import ensure_phantoms
    from fewshot_proto.engine.runtime import configure_threads, cpu_features, cpu_name

    configure_threads(args.threads)
    load_start = list(os.getloadavg())
    if load_start[0] > 1.0:
        print(f"[speed] warning: load average {load_start[0]:.2f} at start; the machine is busy and the times "
              f"will be inflated", file=sys.stderr)
    ensure_phantoms()  # generated once, outside the measured processes
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fsp-speed-")
        workdir = Path(tmp.name)
    try:
        print(f"[speed] GEMM peak ({args.gemm_size}^3, {args.threads} threads) ...", flush=True)
        gemm_runs = [gemm_peak(args.gemm_size, args.gemm_repeats)]
        train_res, eval_res = {}, {}
        for p in args.precisions:
            train_res[p] = run_phase(args, "train", p, workdir)
            eval_res[p] = run_phase(args, "eval", p, workdir)
        print("[speed] FLOPs of a training step and sampler cost ...", flush=True)
        fl = count_flops_and_sampler(args, args.precisions, workdir)
        print("[speed] GEMM peak again ...", flush=True)
        gemm_runs.append(gemm_peak(args.gemm_size, args.gemm_repeats))
    finally:
        if tmp is not None:
            tmp.cleanup()
    peak = {p: max(g[p] for g in gemm_runs) for p in ("fp32", "bf16")}
    achieved = {p: fl["flops_per_step"][p] / train_res[p]["step"]["median"] / 1e9 for p in args.precisions}
    doc: Dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {"size": args.size, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                     "eval_repeats": args.eval_repeats, "gemm_size": args.gemm_size,
                     "gemm_repeats": args.gemm_repeats, "flop_episodes": args.flop_episodes, "seed": args.seed,
                     "quick": bool(args.quick), "device": "cpu", "shots": 1, "loss": loss_description(args)},
        "machine": {"cpu_model": cpu_name(), "cpu_flags": cpu_features(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "fewshot_proto": fewshot_proto.__version__, "threads": torch.get_num_threads(),
                    "load_start": load_start, "load_end": list(os.getloadavg())},
        "precisions": args.precisions,
        "gemm_peak_gflops": peak, "gemm_runs": gemm_runs,
        "flops_per_step": fl["flops_per_step"], "flops_samples": fl["flops_samples"],
        "sampler_seconds": fl["sampler_seconds"],
        "achieved_gflops": achieved,
        "gflops_fraction_of_gemm_peak": {p: achieved[p] / peak[p] for p in args.precisions},
        "train": train_res, "eval": eval_res, "targets": [list(t) for t in TARGETS], "reference": REFERENCE,
    }
    doc["metrics"] = collect_metrics(doc)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".md")
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    md_path.write_text(to_markdown(doc))
    print_table(doc)
    print(f"\nwrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
