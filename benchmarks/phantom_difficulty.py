"""How hard is the built-in phantom dataset for trivial predictors? (numpy + scipy, no torch)

The field's ``alpnet`` protocol, simplified: for each organ class the support is the middle slice of the
organ in scan "1"; every other scan is a query, predicted on the slices of its ground-truth z-range of the
organ, and scored by 3-D Dice over that slab (TP/FP/FN summed over the slab), then averaged over query scans.

Predictors:
  (a) ``threshold``: label every query voxel whose grey value lies in the support organ's 5th..95th
      percentile range;
  (b) ``threshold_lcc``: (a) then keep the largest 3-D connected component (face connectivity);
  (c) ``mask_transfer``: paste the support mask at the same in-plane position on every query slice (a pure
      location prior).

A learned few-shot model must beat all three clearly for the phantoms to be a fair test. The script runs on
the z-scored images a model sees (``zscore``) and on the raw grey values written to disk (``raw``), prints a
per-class table and writes ``benchmarks/results/phantom_difficulty.json``.

    python benchmarks/phantom_difficulty.py [--n-scans 20] [--seed 0] [--size 128]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
from scipy import ndimage

from fewshot_proto.data.phantom import (LABEL_NAMES, PHANTOM_VERSION, ensure_phantoms, make_phantom_dataset,
                                        zscore)
from fewshot_proto.types import Volume

RESULTS = Path(__file__).resolve().parent / "results" / "phantom_difficulty.json"


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean arrays (1.0 when both are empty)."""
    tp = float(np.logical_and(pred, gt).sum())
    denom = float(pred.sum()) + float(gt.sum())
    return 1.0 if denom == 0 else 2.0 * tp / denom


def organ_slab(label: np.ndarray, cls: int) -> slice:
    """Slice over z from the first to the last slice containing ``cls`` (``label`` is ``[Z, H, W]``)."""
    zs = np.flatnonzero((label == cls).any(axis=(1, 2)))
    return slice(int(zs[0]), int(zs[-1]) + 1)


def support_slice(label: np.ndarray, cls: int) -> int:
    """The middle one of the slices containing ``cls``."""
    zs = np.flatnonzero((label == cls).any(axis=(1, 2)))
    return int(zs[len(zs) // 2])


def predict_threshold(s_img: np.ndarray, s_mask: np.ndarray, q_img: np.ndarray) -> np.ndarray:
    """(a) voxels of ``q_img`` ``[z, H, W]`` inside the support organ's 5th..95th percentile grey range."""
    lo, hi = np.percentile(s_img[s_mask], [5, 95])
    return (q_img >= lo) & (q_img <= hi)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component of a boolean array (empty stays empty)."""
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def predict_threshold_lcc(s_img: np.ndarray, s_mask: np.ndarray, q_img: np.ndarray) -> np.ndarray:
    """(b) threshold prediction reduced to its largest 3-D connected component."""
    return largest_component(predict_threshold(s_img, s_mask, q_img))


def predict_mask_transfer(s_img: np.ndarray, s_mask: np.ndarray, q_img: np.ndarray) -> np.ndarray:
    """(c) the support mask copied onto every query slice at the same in-plane position."""
    return np.broadcast_to(s_mask[None], q_img.shape).copy()


PREDICTORS: Dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "threshold": predict_threshold,
    "threshold_lcc": predict_threshold_lcc,
    "mask_transfer": predict_mask_transfer,
}


def evaluate(volumes: Sequence[Volume], predictors: Sequence[str] = tuple(PREDICTORS),
             support_id: str = "1") -> Dict[str, Dict[int, List[float]]]:
    """Per-scan Dice ``{predictor: {class: [dice per query scan]}}`` on ``volumes`` (images as given)."""
    by_id = {v.id: v for v in volumes}
    sup = by_id[support_id]
    out: Dict[str, Dict[int, List[float]]] = {p: {} for p in predictors}
    for cls in sorted(LABEL_NAMES):
        z = support_slice(sup.label, cls)
        s_img, s_mask = sup.image[z], sup.label[z] == cls
        for v in volumes:
            if v.id == support_id:
                continue
            sl = organ_slab(v.label, cls)
            q_img, q_gt = v.image[sl], v.label[sl] == cls
            for p in predictors:
                out[p].setdefault(cls, []).append(dice(PREDICTORS[p](s_img, s_mask, q_img), q_gt))
    return out


def summarise(per_scan: Dict[str, Dict[int, List[float]]]) -> Dict[str, Dict[str, Dict[str, float]]]:
    return {
        p: {LABEL_NAMES[c]: {"mean": float(np.mean(d)), "std": float(np.std(d)), "n": len(d)}
            for c, d in per_cls.items()}
        for p, per_cls in per_scan.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-scans", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    raw = make_phantom_dataset(n_scans=args.n_scans, seed=args.seed, size=args.size, normalise=False)
    t_gen = time.perf_counter() - t0
    normed = [Volume(id=v.id, image=zscore(v.image), label=v.label, spacing=v.spacing, affine=v.affine)
              for v in raw]

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ensure_phantoms(cache_dir=tmp, n_scans=args.n_scans, seed=args.seed, size=args.size)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        ensure_phantoms(cache_dir=tmp, n_scans=args.n_scans, seed=args.seed, size=args.size)
        t_second = time.perf_counter() - t0

    results = {}
    for name, vols in (("zscore", normed), ("raw", raw)):
        results[name] = summarise(evaluate(vols))

    print(f"phantoms v{PHANTOM_VERSION}: {args.n_scans} scans, seed {args.seed}, size {args.size}")
    print(f"generation {t_gen:.2f} s; ensure_phantoms first call {t_first:.2f} s, second {t_second * 1e3:.1f} ms")
    for name, res in results.items():
        print(f"\nimages: {name}   (mean 3-D Dice +- std over {args.n_scans - 1} query scans)")
        print(f"{'predictor':<16}" + "".join(f"{LABEL_NAMES[c]:>18}" for c in sorted(LABEL_NAMES)))
        for p, per in res.items():
            print(f"{p:<16}" + "".join(f"{per[LABEL_NAMES[c]]['mean']:>11.3f} +-{per[LABEL_NAMES[c]]['std']:.2f}"
                                       for c in sorted(LABEL_NAMES)))

    sizes = {LABEL_NAMES[c]: float(np.mean([(v.label == c).sum() for v in raw])) for c in sorted(LABEL_NAMES)}
    payload = {
        "benchmark": "phantom_difficulty",
        "phantom_version": PHANTOM_VERSION,
        "n_scans": args.n_scans,
        "seed": args.seed,
        "size": args.size,
        "protocol": "support = middle slice of the organ in scan 1; queries = other scans, slices of the "
                    "organ's GT z-range; 3-D Dice per scan, mean over scans",
        "generation_seconds": round(t_gen, 3),
        "ensure_phantoms_seconds": {"first_call": round(t_first, 3), "second_call": round(t_second, 5)},
        "mean_voxels_per_organ": sizes,
        "dice": results,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
