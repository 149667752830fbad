"""How much of a trained ``cwpa_unet_matcher``'s prediction is its matcher head?

``cwpa_unet_matcher``'s logits are the CWPA U-Net decoder's plus the matcher head's upsampled scores. This script
evaluates one checkpoint three ways on the protocol it was trained for (its own config: data, fold, test classes,
size, precision):

* ``model``: the model as trained;
* ``matcher alone``: the decoder's 1x1 classifier set to zero, so the logits are the matcher's scores only (what
  the untrained model is);
* ``decoder alone``: the matcher's contribution removed (the model's ``segment`` without the added scores), i.e.
  what the CWPA decoder learned on top of the matcher.

It prints a table and writes ``benchmarks/results/matcher_share.json`` (one entry per checkpoint, keyed by its
path). Uses only the public API.

    python benchmarks/matcher_share.py runs/phantom/version_0/checkpoint.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fewshot_proto.config import config_from_dict
from fewshot_proto.data import dataset_from_config
from fewshot_proto.engine import evaluate, model_from_checkpoint
from fewshot_proto.engine.evaluator import protocol_specs
from fewshot_proto.engine.runtime import Runtime, cpu_name
from fewshot_proto.models.fewshot import CWPAUNet, CWPAUNetMatcher

RESULTS = Path(__file__).resolve().parent / "results" / "matcher_share.json"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a cwpa_unet_matcher checkpoint (train's checkpoint.pt)")
    ap.add_argument("--out", default=str(RESULTS), help="results JSON (entries of other checkpoints are kept)")
    ap.add_argument("--note", default="", help="how the checkpoint was trained (stored with the entry)")
    args = ap.parse_args(argv)

    model, ckpt = model_from_checkpoint(args.checkpoint)
    if not isinstance(model, CWPAUNetMatcher):
        print(f"error: {args.checkpoint} holds {ckpt['model_name']!r}, not cwpa_unet_matcher", file=sys.stderr)
        return 2
    cfg = config_from_dict(ckpt["config"], where=f"checkpoint {args.checkpoint}")
    runtime = Runtime.resolve("cpu", cfg.train.precision, cfg.train.channels_last, cfg.train.threads)
    dataset = dataset_from_config(cfg.data)
    specs = protocol_specs(dataset, cfg.protocol)

    def score(m) -> dict:
        t0 = time.perf_counter()
        s = evaluate(m, dataset, specs, size=cfg.data.size, runtime=runtime, distances=False)
        per = {str(c): round(100 * v["dice"]["mean"], 2) for c, v in s["per_class"].items()}
        return {"dice": per, "mean": round(100 * s["mean_dice"], 2), "seconds": round(time.perf_counter() - t0, 1)}

    rows = {"model": score(model)}
    head_w, head_b = model.decoder.head.weight.detach().clone(), model.decoder.head.bias.detach().clone()
    with torch.no_grad():
        model.decoder.head.weight.zero_()
        model.decoder.head.bias.zero_()
    rows["matcher alone"] = score(model)
    with torch.no_grad():
        model.decoder.head.weight.copy_(head_w)
        model.decoder.head.bias.copy_(head_b)

    def segment(query_feats, prototypes):  # CWPAUNet's segment on the CWPA bag: the decoder without the matcher
        return CWPAUNet.segment(model, query_feats, prototypes.local)

    model.segment = segment  # an instance attribute: predict() calls it instead of the class's
    rows["decoder alone"] = score(model)

    entry = {"checkpoint": str(args.checkpoint), "trained_steps": ckpt.get("step"), "dataset": dataset.name,
             "protocol": {"name": cfg.protocol.name, "setting": cfg.protocol.setting, "fold": cfg.protocol.fold,
                          "test_classes": list(cfg.protocol.test_classes), "shots": cfg.protocol.shots},
             "precision": runtime.precision, "cpu": cpu_name(), "note": args.note, "rows": rows}
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"entries": {}}
    doc["entries"][str(args.checkpoint)] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"{'variant':<15} {'mean Dice (%)':>14}  per class")
    for name, r in rows.items():
        print(f"{name:<15} {r['mean']:>14.2f}  {r['dice']}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
