"""Train a model episodically, then evaluate it on the held-out classes.

    python -m fewshot_proto.train --shots 1          # built-in phantoms, default budget (< 10 min on 2 CPU cores)
    python -m fewshot_proto.train --config configs/experiments/chaos_t2_setting2_23_1shot.yaml --fold 1
    python -m fewshot_proto.train --shots 1 --set train.lr=1e-3 data.size=128
    python -m fewshot_proto.train --resume RUN/checkpoint.pt --iters 2000

The config is the built-in default, then the --config file (which states only what differs), then the flags, then
--set KEY=VALUE overrides (any key, dotted). The resolved config is printed at the start and saved with the run.
Without --out each run gets a new folder runs/<dataset>/version_<N>; an --out that holds a run is refused unless
--resume or --overwrite. --resume refuses changes other than the run's length, logging and hardware.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import yaml

from fewshot_proto.cli import (THREADS_DEFAULT, Parser, add_data_args, add_device_args, add_progress_arg, prog_name,
                               run_main)
from fewshot_proto.config import (ExperimentConfig, build_config, config_from_dict, config_to_dict, default_config,
                                  dotted_to_nested, parse_set, read_config_file)
from fewshot_proto.data import dataset_from_config
from fewshot_proto.engine import evaluate, train
from fewshot_proto.engine.checkpoint import load_checkpoint
from fewshot_proto.engine.evaluator import protocol_specs
from fewshot_proto.engine.runtime import Runtime, resolve_device
from fewshot_proto.engine.trainer import open_training_folder
from fewshot_proto.engine.trainlog import log_evaluation
from fewshot_proto.errors import ConfigError
from fewshot_proto.metrics.report import format_dice_table


def parse_classes(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids such as 2,3, got {text!r}") from None


def _config_default(key: str, builtin: Optional[str] = None) -> str:
    """``the config's <key>; built-in default: <value>`` for a flag's help (``builtin``: how to say the value)."""
    section, name = key.split(".")
    value = getattr(getattr(default_config(), section), name) if builtin is None else builtin
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"the config's {key}; built-in default: {value}"


def add_common_args(p: argparse.ArgumentParser, source: str = "config") -> None:
    """The flags ``train`` and ``evaluate`` share. ``source``: where an absent flag's value comes from,
    ``"config"`` (train: the layered config) or ``"checkpoint"`` (evaluate: the checkpoint's saved config)."""
    if source == "config":
        default = _config_default
    else:
        def default(key: str, builtin: Optional[str] = None) -> str:
            return f"the checkpoint's {key}"
    add_data_args(p, data=default("data.root", "the synthetic phantoms"),
                  layout=default("data.layout") if source == "config" else
                  "the checkpoint's data.layout; auto when --data is given")
    p.add_argument("--shots", type=int, metavar="K",
                   help="support scans per episode, k-shot (default: "
                        + (f"{_config_default('protocol.shots')}; sets episodes.shots too" if source == "config"
                           else default("protocol.shots")) + ")")
    p.add_argument("--setting", type=int, choices=[1, 2],
                   help="1: test classes may appear in training; 2: every training slice with any test class is "
                        f"dropped (default: {default('protocol.setting')})")
    p.add_argument("--test-classes", type=parse_classes, metavar="IDS",
                   help=f"held-out classes, e.g. 2,3 or 1,4 (default: {default('protocol.test_classes')})")
    p.add_argument("--fold", type=int, metavar="K",
                   help=f"query fold of the 5-fold protocol (default: {default('protocol.fold')})")
    p.add_argument("--protocol", choices=["alpnet", "adnet-ep1", "full-volume"],
                   help=f"evaluation protocol (default: {default('protocol.name')})")
    add_device_args(p, device=default("train.device") if source == "config" else "auto",
                    precision=default("train.precision"),
                    threads=default("train.threads", f"unset, {THREADS_DEFAULT}") if source == "config" else THREADS_DEFAULT,
                    device_default=None if source == "config" else "auto")
    add_progress_arg(p)


def build_parser() -> argparse.ArgumentParser:
    """The ``train`` command line (every flag's help states its default; absent flags keep the config's value)."""
    p = Parser(prog=prog_name("fewshot_proto.train", "fewshot-train"), description=__doc__)
    add_common_args(p, "config")
    p.add_argument("--out", metavar="DIR",
                   help="run folder (default: the config's train.out, else a new runs/<dataset>/version_<N>)")
    p.add_argument("--config", metavar="FILE",
                   help="experiment YAML stating what differs from the built-in default, e.g. "
                        "configs/experiments/chaos_t2_setting2_23_1shot.yaml (default: none, the built-in default)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override any config key by its dotted path, e.g. --set train.lr=1e-3 data.size=128 "
                        "(values are read as YAML; null clears a key) (default: none)")
    p.add_argument("--model", metavar="NAME",
                   help="registered model name, see fewshot_proto.list_models() "
                        f"(default: {_config_default('model.name')})")
    p.add_argument("--iters", type=int, metavar="N",
                   help="training episodes; lifts the built-in default's time cap unless a cap is set by the "
                        f"config file, --max-seconds or --set (default: {_config_default('train.iters')})")
    p.add_argument("--max-seconds", type=float, metavar="S",
                   help="wall-time cap on training, 0 for none "
                        f"(default: {_config_default('train.max_seconds')})")
    p.add_argument("--seed", type=int, help=f"random seed (default: {_config_default('train.seed')})")
    p.add_argument("--resume", metavar="CKPT",
                   help="checkpoint to continue from, bit for bit, in its own folder (default: none, a new run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out; only the files a run writes are removed (default: off)")
    p.add_argument("--num-workers", type=int, metavar="N",
                   help="DataLoader workers for episode sampling, 0: a thread "
                        f"(default: {_config_default('train.num_workers')})")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the evaluation after training (default: evaluate the held-out classes)")
    return p


def _flag_layer(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    """The keys the command-line flags set, as a partial config (flags that were not given are absent)."""
    over = {
        "data.root": args.data, "data.layout": args.layout,
        "episodes.shots": args.shots, "protocol.shots": args.shots,
        "protocol.setting": args.setting, "protocol.test_classes": args.test_classes,
        "protocol.fold": args.fold, "train.device": args.device, "train.precision": args.precision,
        "train.out": args.out, "model.name": args.model, "train.iters": args.iters, "train.seed": args.seed,
        "train.num_workers": args.num_workers, "train.threads": args.threads, "protocol.name": args.protocol,
    }
    layer = dotted_to_nested(over, "command line")
    if args.max_seconds is not None:
        if args.max_seconds < 0:
            raise ConfigError(f"command line: --max-seconds {args.max_seconds:g}: must be >= 0 (0: no cap)")
        layer.setdefault("train", {})["max_seconds"] = float(args.max_seconds) if args.max_seconds > 0 else None
    return layer


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The run's config: the built-in default (or, with ``--resume``, the checkpoint's config), then the
    ``--config`` file, the flags and the ``--set`` overrides, validated (:func:`fewshot_proto.config.build_config`).

    Two rules beyond plain layering, both visible in the printed config: ``--model`` naming another model than
    the layers below drops their ``model.kwargs`` (they belong to that model); ``--iters`` lifts the built-in
    default's time cap unless a file, ``--max-seconds`` or ``--set`` states one (never on ``--resume``).
    """
    layers: List[Tuple[str, Dict[str, Any]]] = []
    base = None
    base_where = "built-in default"
    if args.resume:
        saved = load_checkpoint(args.resume)["config"]
        base = config_to_dict(config_from_dict(saved, where=f"checkpoint {args.resume}"))
        base["train"]["out"] = None  # the run continues in the checkpoint's folder
        base_where = f"checkpoint {args.resume}"
    if args.config:
        layers.append((str(args.config), read_config_file(args.config)))
    flags = _flag_layer(args)
    below = [(layer.get("model") or {}).get("name") for _, layer in layers] + [(base or {}).get("model", {}).get(
        "name"), ExperimentConfig().model.name]
    if args.model and args.model != next(n for n in below if n):
        flags.setdefault("model", {})["kwargs"] = {}
    layers.append(("command line", flags))
    layers.append(("--set", dotted_to_nested(parse_set(args.overrides), "--set", keep_none=True)))
    cap_stated = any("max_seconds" in (layer.get("train") or {}) for _, layer in layers)
    if args.iters is not None and not cap_stated and not args.resume:
        layers.append(("--iters (lifts the built-in time cap)", {"train": {"max_seconds": None}}))
    return build_config(layers, base=base, base_where=base_where)


def format_config(cfg: ExperimentConfig) -> str:
    """The resolved config, one line per section."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        text = yaml.safe_dump(values, default_flow_style=True, width=10 ** 6, sort_keys=False).strip()
        lines.append(f"  {section}: {text}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; the user's errors (bad flags included) print one ``error: ...`` line and return 2."""
    rank, world = 0, 1

    def body() -> int:
        nonlocal rank, world
        args = build_parser().parse_args(argv)
        cfg = config_from_args(args)
        rank, world = init_distributed(cfg.train.device)
        return run(cfg, resume=args.resume, overwrite=args.overwrite, evaluate_after=not args.no_eval,
                   progress=not args.no_progress, rank=rank, world_size=world)

    try:
        return run_main(body)
    finally:
        if world > 1:
            if dist.is_initialized():
                dist.destroy_process_group()


def init_distributed(device: str):
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on CUDA).

    Returns ``(rank, world_size)``; ``(0, 1)`` when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dev = resolve_device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def run(cfg: ExperimentConfig, *, resume: Optional[str] = None, overwrite: bool = False,
        evaluate_after: bool = True, progress: bool = True, rank: int = 0, world_size: int = 1) -> int:
    """Open (and lock) the run folder, print and train ``cfg``, then evaluate the held-out classes (rank 0)."""
    t0 = time.perf_counter()
    dataset = dataset_from_config(cfg.data)
    p = cfg.protocol
    runtime = Runtime.from_train_config(cfg.train)  # resolved once for training and evaluation
    precision = runtime.precision
    folder = None
    if rank == 0:
        folder = open_training_folder(cfg, dataset.name, resume=resume, overwrite=overwrite, world_size=world_size)
        cfg = copy.deepcopy(cfg)
        cfg.train.out = str(folder.path)
        auto = cfg.train.precision == "auto"
        cfg.train.precision = precision  # print and save what runs, as the checkpoint records it
    try:
        if rank == 0:
            print(f"data: {dataset.name} ({len(dataset)} scans) | model: {cfg.model.name} | {p.shots}-shot, "
                  f"Setting {p.setting}, test classes {list(p.test_classes)}, fold {p.fold} | "
                  f"{cfg.train.iters} episodes"
                  + (f" (or {cfg.train.max_seconds:.0f} s)" if cfg.train.max_seconds else "")
                  + f" at {cfg.data.size}x{cfg.data.size} in {precision}"
                  + (" (auto)" if auto else "") + f" | out: {cfg.train.out}"
                  + (f" | resumed from {resume}" if resume else "")
                  + (f" | {world_size} ranks" if world_size > 1 else ""))
            print("config (saved as config.yaml in the run folder):\n" + format_config(cfg), flush=True)
        result = train(cfg, resume=resume, progress=progress, dataset=dataset, rank=rank, world_size=world_size,
                       runtime=runtime)
        if rank != 0:
            return 0
        t_train = time.perf_counter() - t0
        es = result.early_stopping
        capped = bool(cfg.train.max_seconds) and result.steps < cfg.train.iters and not (es and es["stopped"])
        print(f"trained {result.steps} episodes in {t_train:.0f} s (median {result.seconds_per_step:.3f} "
              f"s/episode" + (f"; stopped by the {cfg.train.max_seconds:.0f} s cap" if capped else "")
              + f"); checkpoint: {result.checkpoint}")
        checkpoint = result.checkpoint
        if es is not None:
            how = (f"stopped after {es['patience']} validations without improvement" if es["stopped"]
                   else "did not stop early")
            if es["best_step"] is None:
                print(f"early stopping: no validation ran (every {es['every']} steps); evaluating the last weights")
            else:
                checkpoint = Path(cfg.train.out) / "best.pt"
                print(f"early stopping on {', '.join(es['validation_scans'])}: best validation Dice {es['best']:.4f} "
                      f"at step {es['best_step']}; {how}; evaluating {checkpoint}")
        if not evaluate_after:
            return 0
        specs = protocol_specs(dataset, p)
        out = Path(cfg.train.out) / "eval"
        summary = evaluate(result.model, dataset, specs, size=cfg.data.size, runtime=runtime, out_dir=out,
                           progress=progress,
                           meta={"model": cfg.model.name, "dataset": dataset.name, "protocol": p.name,
                                 "setting": p.setting, "fold": p.fold, "shots": p.shots,
                                 "test_classes": list(p.test_classes), "checkpoint": str(checkpoint),
                                 "train_seconds": t_train, "iters": result.steps})
        print(f"\n{p.name} protocol, fold {p.fold}, Setting {p.setting}, {p.shots}-shot "
              f"(evaluated in {summary['timing']['seconds']:.0f} s):")
        print(format_dice_table(summary))
        log_evaluation(cfg.train.out, result.steps, summary, images=out / "gallery")  # TensorBoard, when installed
        print(f"\nreports: {out}/report.html, metrics.json, metrics.csv, summary.md")
        return 0
    finally:
        if folder is not None:
            folder.release()


if __name__ == "__main__":
    sys.exit(main())
