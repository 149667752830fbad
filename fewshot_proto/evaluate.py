"""Evaluate a checkpoint under a named protocol or a frozen episode manifest.

    python -m fewshot_proto.evaluate --checkpoint RUN/checkpoint.pt
    python -m fewshot_proto.evaluate --checkpoint CKPT --data DATA/chaos_t2 --protocol alpnet --fold 0
    python -m fewshot_proto.evaluate --checkpoint CKPT --episodes episodes/chaos_t2_alpnet_setting2_23_1shot.json

Writes metrics.json (per scan and class: dice, iou, precision, recall, hd95, assd; per-class mean/std; overall
mean), metrics.csv, summary.md and PNG overlays to --out. Data, size and protocol default to the ones the
checkpoint was trained with.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from fewshot_proto.cli import Parser, add_batch_size_arg, prog_name, run_main
from fewshot_proto.config import apply_overrides, config_from_dict
from fewshot_proto.data import dataset_from_config
from fewshot_proto.engine import evaluate, model_from_checkpoint
from fewshot_proto.engine.evaluator import protocol_specs
from fewshot_proto.engine.runtime import Runtime, resolve_device
from fewshot_proto.episodes.manifest import load_manifest
from fewshot_proto.errors import ConfigError
from fewshot_proto.metrics.html import write_html_report
from fewshot_proto.metrics.report import format_dice_table
from fewshot_proto.train import add_common_args


def build_parser() -> argparse.ArgumentParser:
    """The ``evaluate`` command line (every flag's help states its default; most default to the checkpoint's)."""
    p = Parser(prog=prog_name("fewshot_proto.evaluate", "fewshot-evaluate"), description=__doc__)
    p.add_argument("--checkpoint", metavar="CKPT",
                   help="checkpoint written by fewshot_proto.train (required, unless --report)")
    add_common_args(p, "checkpoint")
    p.add_argument("--out", metavar="DIR", help="report folder (default: eval/ next to the checkpoint)")
    p.add_argument("--folds", help="several folds, e.g. 0-4 or 0,2; overrides --fold (default: --fold only)")
    p.add_argument("--episodes", metavar="MANIFEST",
                   help="frozen episode manifest (episodes/*.json); overrides the protocol flags "
                        "(default: none, episodes built from the protocol)")
    add_batch_size_arg(p)
    p.add_argument("--no-overlays", action="store_true",
                   help="do not render the slice gallery of report.html (default: rendered)")
    p.add_argument("--report", metavar="DIR",
                   help="only rebuild DIR/report.html from an earlier evaluation's DIR/metrics.json and DIR/gallery, "
                        "without a model or data (default: evaluate)")
    return p


def parse_folds(text: Optional[str]) -> Optional[List[int]]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``, ``"0,2"`` -> ``[0, 2]``; anything else is a ``ConfigError``."""
    if not text:
        return None
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            folds = list(range(int(a), int(b) + 1))
        else:
            folds = [int(t) for t in text.split(",") if t]
    except ValueError:
        folds = []
    if not folds or min(folds) < 0:
        raise ConfigError(f"command line: --folds {text!r}: expected a range such as 0-4 or a list such as 0,2")
    return folds


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; the user's errors (bad flags included) print one ``error: ...`` line and return 2."""
    def go() -> int:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.report is None and args.checkpoint is None:
            parser.error("the following arguments are required: --checkpoint (or --report DIR)")
        return run(args)

    return run_main(go)


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.checkpoint`` (its own data, size and protocol unless overridden) and write the reports; with
    ``--report DIR`` only rebuild ``DIR/report.html``."""
    if args.report is not None:
        folder = Path(args.report)
        if not (folder / "metrics.json").is_file():
            raise ConfigError(f"--report {folder}: no metrics.json there (the folder an evaluation wrote)")
        print(f"wrote {write_html_report(folder)}")
        return 0
    if args.checkpoint is None:
        raise ConfigError("--checkpoint is required (or --report DIR to rebuild a report)")
    device = resolve_device(args.device or "auto")
    model, ckpt = model_from_checkpoint(args.checkpoint, map_location=device)
    cfg = config_from_dict(ckpt.get("config") or {}, where=f"checkpoint {args.checkpoint}")
    cfg = apply_overrides(cfg, {
        "data.root": args.data, "data.layout": args.layout, "protocol.name": args.protocol,
        "protocol.shots": args.shots, "protocol.setting": args.setting,
        "protocol.test_classes": args.test_classes, "protocol.fold": args.fold,
        "train.precision": args.precision}, where="command line")
    if args.data is not None and args.layout is None:
        cfg.data.layout = "auto"
    runtime = Runtime.resolve(str(device), cfg.train.precision, cfg.train.channels_last, args.threads)
    model.to(runtime.device)
    dataset = dataset_from_config(cfg.data)
    dataset.check_integrity()
    folds = parse_folds(args.folds)
    specs = protocol_specs(dataset, cfg.protocol, folds=folds, manifest=args.episodes)
    out = Path(args.out or Path(args.checkpoint).resolve().parent / "eval")
    p = cfg.protocol
    meta = {"checkpoint": str(args.checkpoint), "dataset": dataset.name, "protocol": p.name,
            "setting": p.setting, "folds": folds if folds is not None else [p.fold], "shots": p.shots,
            "test_classes": list(p.test_classes), "episodes": args.episodes,
            "model": ckpt["model_name"], "trained_steps": ckpt.get("step")}
    if args.episodes:  # the manifest's protocol, not the checkpoint's, is what was evaluated
        m = load_manifest(args.episodes)
        meta.update(protocol=m.protocol, setting=m.setting, folds=list(m.folds), shots=m.shots,
                    test_classes=list(m.test_classes))
    summary = evaluate(model, dataset, specs, size=cfg.data.size, runtime=runtime, batch_size=args.batch_size,
                       out_dir=out, overlays=not args.no_overlays, progress=not args.no_progress, meta=meta)
    print(format_dice_table(summary))
    t = summary["timing"]
    print(f"\n{t['query_slices']} query slices in {t['seconds']:.1f} s "
          f"({t['seconds_per_query_slice_per_class']:.3f} s per query slice per class); reports in {out} "
          f"(open {out / 'report.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
