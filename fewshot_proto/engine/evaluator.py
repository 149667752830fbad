"""``evaluate``: the one episodic evaluation harness, for every model (few-shot and supervised).

Given a list of ``EpisodeSpec`` (from a protocol or a frozen manifest) it predicts every query slice, restacks
the predictions per (query scan, class) into a volume, and scores it in 3-D (TP/FP/FN summed over the scored
slices of the scan; HD95/ASSD in mm with the scan's voxel spacing).

Prediction goes through the engine's one inference path (``engine.inference``): the query slices of a scan are
encoded once for all test classes, in batches; a support once per (support scans, class, chunk slices); all under
``torch.inference_mode``. A supervised model needs no support, so none is loaded for it.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fewshot_proto.data.transforms import prepare_slices
from fewshot_proto.engine.inference import (SupportCache, check_model_classes, check_segmenter, encode_queries,
                                            foreground, support_state)
from fewshot_proto.engine.runtime import Runtime
from fewshot_proto.episodes.manifest import load_manifest, verify_manifest
from fewshot_proto.episodes.materialise import load_support
from fewshot_proto.episodes.protocol import build_eval_episodes
from fewshot_proto.metrics import MetricTable
from fewshot_proto.metrics.distance import surface_metrics
from fewshot_proto.metrics.html import write_gallery, write_html_report
from fewshot_proto.metrics.report import write_report

__all__ = ["evaluate", "predict_specs", "protocol_specs"]


def _support_key(spec) -> tuple:
    return (int(spec.class_id), tuple((str(s), tuple(int(z) for z in zs)) for s, zs in spec.support))


def _at_volume_resolution(probs: torch.Tensor, vol, size: int) -> np.ndarray:
    """``probs[Q, size, size]`` -> float32 numpy ``[Q, H0, W0]`` at the volume's in-plane size (bilinear)."""
    h0, w0 = vol.image.shape[1:]
    if (h0, w0) != (size, size):
        probs = F.interpolate(probs[:, None], size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
    return probs.cpu().numpy()


@torch.inference_mode()
def predict_specs(model: torch.nn.Module, dataset, specs: Sequence[Any], *, size: int,
                  runtime: Optional[Runtime] = None, batch_size: int = 16, progress: bool = False):
    """Yield ``(spec, prob[Q, H0, W0] float32 foreground probability at the volume's resolution, volume)``.

    Specs are grouped by query scan so each query scan is read and encoded once for all its classes.
    ``runtime``: device, precision and memory format (default ``Runtime()``: CPU, fp32).
    """
    model = check_segmenter(model)
    runtime = runtime or Runtime()
    model.eval()
    check_model_classes(model, [s.class_id for s in specs])
    cache = SupportCache()
    groups: "OrderedDict[str, List[Any]]" = OrderedDict()
    for spec in specs:
        groups.setdefault(str(spec.query_scan), []).append(spec)
    iterator = groups.items()
    if progress:
        iterator = tqdm(list(iterator), desc="evaluate", unit="scan")

    for qscan, group in iterator:
        vol = dataset.load(qscan)
        zs_all = sorted({int(z) for s in group for z in s.query_z})
        q_img_np, _ = prepare_slices(vol, zs_all, size)
        q_state = encode_queries(model, runtime.tensor(q_img_np, torch.float32), runtime, batch_size)
        row_of = {z: i for i, z in enumerate(zs_all)}
        for spec in group:
            rows = np.array([row_of[int(z)] for z in spec.query_z])
            if not model.needs_support:
                state = cache.get(("class", int(spec.class_id)),
                                  lambda spec=spec: support_state(model, None, None, spec.class_id, runtime))
                probs = foreground(model, q_state, rows, state, runtime, batch_size)
                yield spec, _at_volume_resolution(probs, vol, size), vol
                continue

            def chunk_states(spec=spec):
                s_img, s_mask = load_support(spec, dataset, size)  # [shots, n_part, 3, s, s], [shots, n_part, s, s]
                return [support_state(model, s_img[:, k], s_mask[:, k], spec.class_id, runtime)
                        for k in range(s_img.shape[1])]

            states = cache.get(_support_key(spec), chunk_states)
            chunks = np.asarray(spec.query_chunk, dtype=int)
            probs = torch.empty((len(rows), size, size), dtype=torch.float32, device=runtime.device)
            for k in np.unique(chunks):
                sel = np.flatnonzero(chunks == k)
                probs[torch.as_tensor(sel, device=runtime.device)] = foreground(model, q_state, rows[sel], states[k],
                                                                               runtime, batch_size)
            yield spec, _at_volume_resolution(probs, vol, size), vol


def evaluate(model: torch.nn.Module, dataset, specs: Sequence[Any], *, size: int,
             runtime: Optional[Runtime] = None, batch_size: int = 16, out_dir: Optional[str | Path] = None,
             overlays: bool = True,
             distances: bool = True, meta: Optional[Dict[str, Any]] = None, progress: bool = False,
             label_names: Optional[Dict[int, str]] = None) -> Dict[str, Any]:
    """Score ``model`` on ``specs``; return the summary dict (and write reports to ``out_dir`` when given).

    ``out_dir``: ``metrics.json``, ``metrics.csv``, ``summary.md`` and ``report.html`` (with ``overlays``: the slice
    gallery in ``gallery/``, inlined in the page; see ``metrics.html``).

    Returns ``{"rows": [...per (scan, class)...], "per_class": {...}, "mean_dice": float, "timing": {...}}``.
    Scoring: the predicted volume is restricted to the spec's ``query_z`` slices (the protocol decides which
    slices those are: the organ's slab for ``alpnet``, the positive slices for ``adnet-ep1``, every slice for
    ``full-volume``) and compared with ``label == class`` on the same slices.
    """
    label_names = label_names or getattr(dataset, "label_names", {}) or {}
    table = MetricTable(class_names=label_names)
    gallery: List[Dict[str, Any]] = []
    n_slices = 0
    t0 = time.perf_counter()
    for spec, prob, vol in predict_specs(model, dataset, specs, size=size, runtime=runtime, batch_size=batch_size,
                                         progress=progress):
        zs = np.asarray(spec.query_z, dtype=int)
        pred = np.zeros(vol.label.shape, dtype=bool)
        pred[zs] = prob >= 0.5
        truth = vol.label == int(spec.class_id)
        n_slices += len(zs)
        # overlap over exactly the protocol's slices; surface distances over their contiguous z-extent
        # (slices in between that the protocol does not score hold no prediction)
        row = table.add_prediction(pred, truth, scan=str(spec.query_scan), class_id=int(spec.class_id),
                                   fold=int(getattr(spec, "fold", 0)), spacing=vol.spacing, zs=list(zs),
                                   distances=False)
        if distances:  # the table's convention (MONAI's by default); one empty mask -> NaN, flagged one_empty
            d = surface_metrics(pred, truth, vol.spacing, zs=slice(int(zs.min()), int(zs.max()) + 1),
                                hd_reduction=table.hd_reduction, assd_reduction=table.assd_reduction)
            row.hd95, row.assd, row.one_empty = float(d["hd95"]), float(d["assd"]), d["empty_masks"] == 1
        row.extra["support"] = ";".join(f"{s}:{','.join(map(str, z))}" for s, z in spec.support)
        if out_dir is not None and overlays:
            gallery.append({"scan": str(spec.query_scan), "class_id": int(spec.class_id), "zs": zs,
                            "image": vol.image[zs], "truth": truth[zs], "pred": pred[zs], "affine": vol.affine,
                            "slice_axis": vol.slice_axis, "spacing": vol.spacing})
    elapsed = time.perf_counter() - t0
    if len(table) == 0:
        raise ValueError("evaluate: no episodes to score")
    summary = table.summary()
    n_classes = len(table.classes()) or 1
    n_scans = len({r.scan for r in table.rows}) or 1
    timing = {
        "seconds": elapsed,
        "query_slices": n_slices,
        "seconds_per_query_slice_per_class": elapsed / max(n_slices, 1),
        "seconds_per_volume": elapsed / n_scans,
        "seconds_per_volume_per_class": elapsed / (n_scans * n_classes),
    }
    meta = dict(meta or {}, timing=timing)
    meta.setdefault("precision", (runtime or Runtime()).precision)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_report(out_dir, table, meta, summary=summary)
        if overlays:
            write_gallery(out_dir, gallery, label_names)
        write_html_report(out_dir)
    summary = dict(summary)
    summary["rows"] = [r.to_dict() for r in table.rows]
    summary["mean_dice"] = float(summary["overall"]["dice"]["mean"])
    summary["timing"] = timing
    summary["meta"] = meta
    summary["table"] = table
    return summary


def protocol_specs(dataset, protocol, *, folds: Optional[Sequence[int]] = None, manifest: Optional[str] = None):
    """Episode specs for ``protocol`` (a ``ProtocolConfig``) on ``dataset``, or from a frozen manifest.

    A manifest is verified against the dataset's SliceIndex first (a changed dataset is an error, not a
    silently different benchmark).
    """
    index = dataset.slice_index()
    if manifest is not None:
        m = load_manifest(manifest)
        verify_manifest(m, index, source=manifest)
        return list(m.episodes)
    specs = []
    for fold in (folds if folds is not None else [protocol.fold]):
        specs.extend(build_eval_episodes(index, protocol=protocol.name, fold=int(fold), n_folds=protocol.n_folds,
                                         shots=protocol.shots, n_part=protocol.n_part,
                                         test_classes=list(protocol.test_classes), setting=protocol.setting))
    return specs
