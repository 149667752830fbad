"""Segment a new scan from one labelled scan.

    python -m fewshot_proto.predict --checkpoint CKPT --support image_8.nii.gz --support-label label_8.nii.gz \
        --classes 1,4 --query image_1.nii.gz --out pred_1.nii.gz

Support slices are chunk-matched (the field's n_part rule); the output NIfTI has the query's affine and
header, with the query's own axis order and size. Repeat --support/--support-label for k-shot.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    from fewshot_proto.config import PRECISIONS
    from fewshot_proto.train import parse_classes

    p = argparse.ArgumentParser(prog="python -m fewshot_proto.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--support", required=True, action="append", help="support image (repeat for k-shot)")
    p.add_argument("--support-label", required=True, action="append", help="support label (same order)")
    p.add_argument("--classes", required=True, type=parse_classes, help="label values to segment, e.g. 1,4")
    p.add_argument("--query", required=True, help="query image to segment")
    p.add_argument("--out", required=True, help="output label NIfTI (.nii.gz)")
    p.add_argument("--slice-axis", type=int, default=None, help="array axis holding slices (default: as trained)")
    p.add_argument("--n-part", type=int, default=3, help="support chunks (the field uses 3)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--precision", choices=PRECISIONS, default=None)
    p.add_argument("--threshold", type=float, default=0.5)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from fewshot_proto.config import ConfigError, config_from_dict
    from fewshot_proto.errors import DataError, FewShotError

    try:
        from fewshot_proto.data import read_volume, write_prediction
        from fewshot_proto.engine import model_from_checkpoint, predict_volume
        from fewshot_proto.engine.runtime import configure_threads, resolve_device

        if len(args.support) != len(args.support_label):
            raise DataError(f"{len(args.support)} --support images but {len(args.support_label)} --support-label "
                            f"files; give one label per support image")
        configure_threads()
        device = resolve_device(args.device)
        model, ckpt = model_from_checkpoint(args.checkpoint, map_location=device)
        model.to(device)
        cfg = config_from_dict(ckpt.get("config") or {}, where=f"checkpoint {args.checkpoint}")
        axis = cfg.data.slice_axis if args.slice_axis is None else args.slice_axis
        kw = dict(slice_axis=axis, normalise=cfg.data.normalise, ct_window=cfg.data.ct_window,
                  label_map=cfg.data.label_map, drop_unmapped=cfg.data.drop_unmapped)
        supports = [read_volume(img, lab, **kw) for img, lab in zip(args.support, args.support_label)]
        query = read_volume(args.query, None, **kw)
        pred = predict_volume(model, supports, query, args.classes, size=cfg.data.size, n_part=args.n_part,
                              device=device, precision=args.precision or cfg.train.precision,
                              channels_last=cfg.train.channels_last, threshold=args.threshold)
        path = write_prediction(pred, query, args.out)
    except (FewShotError, ConfigError, KeyError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    counts = {int(c): int((pred == int(c)).sum()) for c in args.classes}
    print(f"wrote {path or args.out}: voxels per class {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
