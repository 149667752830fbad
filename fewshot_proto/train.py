"""Train a model episodically, then evaluate it on the held-out classes.

    python -m fewshot_proto.train --shots 1                      # built-in phantoms, default budget (< 10 min on 2 CPU cores)
    python -m fewshot_proto.train --data ../shared/data/chaos_t2 --setting 2 --test-classes 2,3 --fold 0
    python -m fewshot_proto.train --config configs/experiments/chaos_t2_setting2_1shot.yaml
    python -m fewshot_proto.train --resume runs/phantom/checkpoint.pt

Flags override the config file (or the built-in default when no ``--config`` is given).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

from fewshot_proto.config import PRECISIONS, apply_overrides, default_config, load_config


def parse_classes(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids such as 2,3, got {text!r}") from None


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="dataset folder (absent: the built-in synthetic phantoms)")
    p.add_argument("--layout", choices=["auto", "alpnet", "msd"], help="dataset layout (default auto)")
    p.add_argument("--shots", type=int, help="support scans per episode (k-shot)")
    p.add_argument("--setting", type=int, choices=[1, 2], help="1: test classes may appear in training; "
                   "2: every training slice with any test class is dropped")
    p.add_argument("--test-classes", type=parse_classes, help="held-out classes, e.g. 2,3 or 1,4")
    p.add_argument("--fold", type=int, help="query fold of the 5-fold protocol")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto picks CUDA when present")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="autocast precision (auto: bf16 where the CPU or GPU has native bf16, else fp32)")
    p.add_argument("--out", help="output folder")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fewshot_proto.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--config", help="experiment YAML (configs/experiments/*.yaml)")
    p.add_argument("--model", help="registered model name (see fewshot_proto.list_models())")
    p.add_argument("--iters", type=int, help="training episodes")
    p.add_argument("--max-seconds", type=float,
                   help="wall-time cap on training, 0 for none (the built-in default run stops at 1000 episodes or "
                        "540 s; an explicit --iters lifts that cap)")
    p.add_argument("--seed", type=int, help="random seed")
    p.add_argument("--resume", help="checkpoint to continue from (bit-for-bit)")
    p.add_argument("--num-workers", type=int, help="DataLoader workers for episode sampling (0: a thread)")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--protocol", choices=["alpnet", "adnet-ep1", "full-volume"], help="evaluation protocol")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace):
    if args.config:
        cfg = load_config(args.config)
    elif args.resume and not args.data:
        from fewshot_proto.config import config_from_dict
        from fewshot_proto.engine.checkpoint import load_checkpoint

        cfg = config_from_dict(load_checkpoint(args.resume)["config"], where=f"checkpoint {args.resume}")
    else:
        cfg = default_config(builtin=args.data is None)
    over = {
        "data.root": args.data, "data.layout": args.layout,
        "episodes.shots": args.shots, "protocol.shots": args.shots,
        "protocol.setting": args.setting, "protocol.test_classes": args.test_classes,
        "protocol.fold": args.fold, "train.device": args.device, "train.precision": args.precision,
        "train.out": args.out,
    }
    for key in ("model", "iters", "seed", "num_workers", "threads", "protocol"):
        val = getattr(args, key, None)
        if val is None:
            continue
        over[{"model": "model.name", "iters": "train.iters", "seed": "train.seed",
              "num_workers": "train.num_workers", "threads": "train.threads", "protocol": "protocol.name"}[key]] = val
    if args.model and args.model != cfg.model.name:
        cfg.model.kwargs = {}
    cfg = apply_overrides(cfg, over)
    if args.max_seconds is not None:
        cfg.train.max_seconds = float(args.max_seconds) if args.max_seconds > 0 else None
    elif args.iters is not None and not args.config and not args.resume:
        cfg.train.max_seconds = None  # an explicit episode count: the built-in default's safety cap does not apply
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from fewshot_proto.errors import FewShotError
    from fewshot_proto.config import ConfigError

    rank, world = 0, 1
    try:
        cfg = config_from_args(args)
        rank, world = init_distributed(cfg.train.device)
        return run(cfg, resume=args.resume, evaluate_after=not args.no_eval, progress=not args.no_progress,
                   rank=rank, world_size=world)
    except (FewShotError, ConfigError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device: str):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA).

    Returns ``(rank, world_size)``; ``(0, 1)`` when not launched by torchrun.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    from fewshot_proto.engine.runtime import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def run(cfg, *, resume=None, evaluate_after: bool = True, progress: bool = True, rank: int = 0,
        world_size: int = 1) -> int:
    from fewshot_proto.data import dataset_from_config
    from fewshot_proto.engine import evaluate, train
    from fewshot_proto.engine.evaluator import protocol_specs
    from fewshot_proto.engine.runtime import resolve_device, resolve_precision
    from fewshot_proto.metrics.report import format_dice_table

    t0 = time.perf_counter()
    dataset = dataset_from_config(cfg.data)
    p = cfg.protocol
    precision = resolve_precision(cfg.train.precision, resolve_device(cfg.train.device))
    if rank == 0:
        print(f"data: {dataset.name} ({len(dataset)} scans) | model: {cfg.model.name} | {p.shots}-shot, "
              f"Setting {p.setting}, test classes {list(p.test_classes)}, fold {p.fold} | "
              f"{cfg.train.iters} episodes"
              + (f" (or {cfg.train.max_seconds:.0f} s)" if cfg.train.max_seconds else "")
              + f" at {cfg.data.size}x{cfg.data.size} in {precision}"
              + (" (auto)" if cfg.train.precision == "auto" else "") + f" | out: {cfg.train.out}"
              + (f" | {world_size} ranks" if world_size > 1 else ""))
    result = train(cfg, resume=resume, progress=progress, dataset=dataset, rank=rank, world_size=world_size)
    if rank != 0:
        return 0
    t_train = time.perf_counter() - t0
    capped = bool(cfg.train.max_seconds) and result.steps < cfg.train.iters
    print(f"trained {result.steps} episodes in {t_train:.0f} s (median {result.seconds_per_step:.3f} s/episode"
          + (f"; stopped by the {cfg.train.max_seconds:.0f} s cap" if capped else "")
          + f"); checkpoint: {result.checkpoint}")
    if not evaluate_after:
        return 0
    specs = protocol_specs(dataset, p)
    out = Path(cfg.train.out) / "eval"
    summary = evaluate(result.model, dataset, specs, size=cfg.data.size, device=resolve_device(cfg.train.device),
                       precision=precision, channels_last=cfg.train.channels_last, out_dir=out,
                       progress=progress,
                       meta={"protocol": p.name, "setting": p.setting, "fold": p.fold, "shots": p.shots,
                             "test_classes": list(p.test_classes), "checkpoint": str(result.checkpoint),
                             "train_seconds": t_train, "iters": result.steps})
    print(f"\n{p.name} protocol, fold {p.fold}, Setting {p.setting}, {p.shots}-shot "
          f"(evaluated in {summary['timing']['seconds']:.0f} s):")
    print(format_dice_table(summary))
    print(f"\nreports: {out}/metrics.json, metrics.csv, summary.md, overlays/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
