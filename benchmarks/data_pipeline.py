"""Data-pipeline speed: SliceIndex build time and training episodes per second.

    python benchmarks/data_pipeline.py [--episodes 40] [--size 256] [--data-root ../shared/data] [--out FILE]

Measures, with the public API only:

1. ``SliceIndex`` over the MSD Hippocampus training set (260 scans, labels only): *cold* = a fresh dataset object
   and an empty cache folder (every label file decoded; the OS file cache may already hold the files), *warm* =
   a fresh dataset object reading the JSON cache written by the cold run (file stats checked, no label
   decoded), *memory* = the same object asked again.
2. Training episodes per second at ``size x size`` with augmentation, for the labelled and the superpixel samplers
   (fold 0, Setting 2, test classes {2, 3}), on the built-in phantoms and on CHAOS-T2 when present. *cold* =
   ``--episodes`` episodes from a fresh sampler (volumes decoded, slices resized, superpixels computed as they
   are met), *warm* = the same episodes again (generator reset to the same seed): every slice and superpixel map
   is cached, what remains is drawing, masking and augmentation; a long training run tends to the warm rate.

Runs single-threaded (``OMP_NUM_THREADS=1`` etc. are set before numpy is imported). Prints a table and writes
``benchmarks/results/data_pipeline.json``. Real data is looked up in ``<repo>/../shared/data`` unless
``--data-root`` says otherwise; missing datasets are reported as skipped.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def bench_index(root: Path) -> Dict[str, Any]:
    from fewshot_proto.data.readers import open_dataset

    with tempfile.TemporaryDirectory(prefix="fsp-index-") as cache:
        t0 = time.perf_counter()
        ds = open_dataset(root, layout="msd")
        t_open = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = ds.slice_index(cache_dir=cache)
        t_cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds.slice_index(cache_dir=cache)
        t_mem = time.perf_counter() - t0
        ds2 = open_dataset(root, layout="msd")
        t0 = time.perf_counter()
        index2 = ds2.slice_index(cache_dir=cache)
        t_warm = time.perf_counter() - t0
        if index2.to_dict() != index.to_dict():
            raise RuntimeError("warm SliceIndex differs from the cold one")
    return {"dataset": index.dataset, "scans": len(index.scan_ids), "classes": index.classes,
            "open_seconds": t_open, "cold_seconds": t_cold, "warm_seconds": t_warm, "memory_seconds": t_mem,
            "cold_builds": int(getattr(ds, "index_builds", -1)), "warm_builds": int(getattr(ds2, "index_builds", -1))}


def _rate(sampler, n: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    for _ in range(n):
        sampler.sample()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "episodes_per_second": n / dt}


def bench_samplers(name: str, root: Optional[Path], n: int, size: int, seed: int = 0) -> List[Dict[str, Any]]:
    from fewshot_proto.data.readers import open_dataset
    from fewshot_proto.episodes.protocol import allowed_training_slices, fold_split, train_classes_for
    from fewshot_proto.episodes.sampler import LabelledEpisodeSampler, SuperpixelEpisodeSampler

    ds = open_dataset(root)
    index = ds.slice_index()
    test = [2, 3]
    split = fold_split(index, 0, 5, 1)
    rows = []
    makers = {
        "labelled": lambda: LabelledEpisodeSampler(
            ds, index, split.train_scans, train_classes_for(index, test), setting=2, test_classes=test, size=size,
            augment=True, rng=np.random.default_rng(seed)),
        "superpixel": lambda: SuperpixelEpisodeSampler(
            ds, split.train_scans, allowed_training_slices(index, split.train_scans, 2, test), size=size,
            augment=True, rng=np.random.default_rng(seed)),
    }
    for kind, make in makers.items():
        sampler = make()
        cold = _rate(sampler, n)
        sampler.rng = np.random.default_rng(seed)  # the same n episodes again: every slice is now cached
        warm = _rate(sampler, n)
        rows.append({"dataset": index.dataset, "sampler": kind, "size": size, "episodes": n,
                     "cold_episodes_per_second": cold["episodes_per_second"],
                     "warm_episodes_per_second": warm["episodes_per_second"],
                     "cold_seconds": cold["seconds"], "warm_seconds": warm["seconds"],
                     "cache_mb": sampler.cache.nbytes / 2 ** 20})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--episodes", type=int, default=40, help="episodes per timed pass")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_pipeline.json"))
    args = p.parse_args(argv)
    data_root = Path(args.data_root)

    import fewshot_proto

    result: Dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "fewshot_proto": fewshot_proto.__version__,
        "python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "threads": int(os.environ["OMP_NUM_THREADS"]),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "index": None, "samplers": [], "skipped": [],
    }

    hippo = data_root / "msd_hippocampus"
    if hippo.is_dir():
        result["index"] = bench_index(hippo)
    else:
        result["skipped"].append(f"SliceIndex benchmark: {hippo} not found")

    result["samplers"] += bench_samplers("phantom", None, args.episodes, args.size)
    chaos = data_root / "chaos_t2"
    if chaos.is_dir():
        result["samplers"] += bench_samplers("chaos_t2", chaos, args.episodes, args.size)
    else:
        result["skipped"].append(f"CHAOS-T2 sampler benchmark: {chaos} not found")
    result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    ix = result["index"]
    if ix:
        print(f"SliceIndex, {ix['dataset']} ({ix['scans']} scans, labels only):")
        print(f"  open {ix['open_seconds']:.2f} s | cold build {ix['cold_seconds']:.2f} s | warm (JSON cache) "
              f"{ix['warm_seconds']:.3f} s | in memory {ix['memory_seconds'] * 1e3:.2f} ms")
    print(f"\nTraining episodes/second at {args.size}x{args.size}, augmentation on, 1 thread, "
          f"{args.episodes} episodes per pass:")
    print(f"  {'dataset':<10} {'sampler':<11} {'cold':>7} {'warm':>7} {'cache MB':>9}")
    for r in result["samplers"]:
        print(f"  {r['dataset']:<10} {r['sampler']:<11} {r['cold_episodes_per_second']:>7.1f} "
              f"{r['warm_episodes_per_second']:>7.1f} {r['cache_mb']:>9.0f}")
    for s in result["skipped"]:
        print(f"skipped: {s}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
