"""``evaluate``: the one episodic evaluation harness, for every model (few-shot and supervised).

Given a list of ``EpisodeSpec`` (from a protocol or a frozen manifest) it predicts every query slice, restacks
the predictions per (query scan, class) into a volume, and scores it in 3-D (TP/FP/FN summed over the scored
slices of the scan; HD95/ASSD in mm with the scan's voxel spacing).

No repeated work:
- the query slices of a scan are encoded ONCE for all test classes (N-way) and batched;
- support features/prototypes are computed once per (support scans, class, chunk slices), not per query slice;
- everything runs under ``torch.inference_mode``.
Models that expose ``encode / prototypes / segment`` (``CWPAUNet``) take this fast path. Supervised models
that expose ``segment_image / to_binary`` (the baselines, which ignore the support) segment every query slice
of a scan ONCE (``segment_image -> [Q, 1 + K, H, W]``) and each episode takes its class' two logits from that
with ``to_binary(logits, spec.class_id)`` (the same numbers as ``binary_logits(x, class_id)``); no support is
loaded. Any other model is called through ``forward(support_img, support_mask, query_img)`` with the chunk's
support and a batch of query slices.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_proto.engine.runtime import autocast, to_memory_format

__all__ = ["evaluate", "predict_specs", "has_fast_path", "has_image_path"]


def has_fast_path(model: torch.nn.Module) -> bool:
    return all(hasattr(model, m) for m in ("encode", "prototypes", "segment"))


def has_image_path(model: torch.nn.Module) -> bool:
    """A support-free model scored per class from one segmentation: ``segment_image`` + ``to_binary``."""
    return not has_fast_path(model) and all(hasattr(model, m) for m in ("segment_image", "to_binary"))


def _check_model_classes(model: torch.nn.Module, specs: Sequence[Any]) -> None:
    """Raise ``ProtocolError`` when the episodes ask for a class a supervised model was not trained for."""
    from fewshot_proto.errors import ProtocolError

    classes = getattr(model, "classes", None)
    if classes is None:
        return
    asked = sorted({int(s.class_id) for s in specs})
    missing = [c for c in asked if c not in set(int(c) for c in classes)]
    if missing:
        raise ProtocolError(
            f"the model segments classes {list(classes)} (the test classes it was trained on), but the episodes "
            f"ask for class(es) {missing}; evaluate it with --test-classes {','.join(map(str, classes))}"
        )


def _batched_encode(model, img: torch.Tensor, batch_size: int) -> List[torch.Tensor]:
    outs: List[List[torch.Tensor]] = []
    for i in range(0, img.shape[0], batch_size):
        outs.append(model.encode(img[i:i + batch_size]))
    return [torch.cat([o[level] for o in outs]) for level in range(len(outs[0]))]


class _SupportCache:
    """Prototypes (fast path) or prepared support tensors (generic path) per (class, support slices)."""

    def __init__(self, max_items: int = 64) -> None:
        self._items: "OrderedDict[Any, Any]" = OrderedDict()
        self.max_items = max_items
        self.misses = 0

    def get(self, key, make):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = make()
        self._items[key] = value
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value


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
                  device: torch.device, precision: str = "fp32", channels_last: bool = False,
                  batch_size: int = 16, progress: bool = False):
    """Yield ``(spec, prob[Q, H0, W0] float32 foreground probability at the volume's resolution, volume)``.

    Specs are grouped by query scan so each query scan is read and encoded once for all its classes.
    """
    from fewshot_proto.data.transforms import prepare_slices
    from fewshot_proto.episodes.materialise import load_support

    model.eval()
    fast = has_fast_path(model)
    image_path = has_image_path(model)
    if image_path:
        _check_model_classes(model, specs)
    cache = _SupportCache()
    groups: "OrderedDict[str, List[Any]]" = OrderedDict()
    for spec in specs:
        groups.setdefault(str(spec.query_scan), []).append(spec)

    iterator = groups.items()
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(list(iterator), desc="evaluate", unit="scan")

    for qscan, group in iterator:
        vol = dataset.load(qscan)
        zs_all = sorted({int(z) for s in group for z in s.query_z})
        q_img_np, _ = prepare_slices(vol, zs_all, size)
        q_img = to_memory_format(torch.from_numpy(np.ascontiguousarray(q_img_np)).to(device), channels_last)
        row_of = {z: i for i, z in enumerate(zs_all)}
        q_feats = None
        q_logits = None
        if fast:
            with autocast(device, precision):
                q_feats = _batched_encode(model, q_img, batch_size)
        elif image_path:  # [N, 1 + K, s, s]: every query slice segmented once for all classes
            with autocast(device, precision):
                q_logits = torch.cat([model.segment_image(q_img[i:i + batch_size])
                                      for i in range(0, q_img.shape[0], batch_size)])

        for spec in group:
            if image_path:
                r = torch.as_tensor([row_of[int(z)] for z in spec.query_z], device=device, dtype=torch.long)
                with autocast(device, precision):
                    logits = model.to_binary(q_logits.index_select(0, r), int(spec.class_id))
                probs = torch.softmax(logits.float(), dim=1)[:, 1]
                yield spec, _at_volume_resolution(probs, vol, size), vol
                continue

            def make_support(spec=spec):
                s_img, s_mask = load_support(spec, dataset, size)  # [shots, n_part, 3, s, s], [shots, n_part, s, s]
                s_img = torch.from_numpy(np.ascontiguousarray(s_img)).to(device)
                s_mask = torch.from_numpy(np.ascontiguousarray(s_mask)).float().to(device)
                n_part = s_img.shape[1]
                per_chunk = []
                for k in range(n_part):
                    img_k = to_memory_format(s_img[:, k], channels_last)
                    mask_k = s_mask[:, k]
                    if fast:
                        with autocast(device, precision):
                            feats = model.encode(img_k)
                            per_chunk.append(model.prototypes(feats, mask_k))
                    else:
                        per_chunk.append((img_k, mask_k))
                return per_chunk

            per_chunk = cache.get(_support_key(spec), make_support)
            rows = np.array([row_of[int(z)] for z in spec.query_z])
            chunks = np.asarray(spec.query_chunk, dtype=int)
            probs = torch.empty((len(rows), size, size), dtype=torch.float32, device=device)
            for k in np.unique(chunks):
                sel = np.flatnonzero(chunks == k)
                for i in range(0, len(sel), batch_size):
                    part = sel[i:i + batch_size]
                    r = torch.as_tensor(rows[part], device=device)
                    with autocast(device, precision):
                        if fast:
                            logits = model.segment([f.index_select(0, r) for f in q_feats], per_chunk[k])
                        else:
                            s_img_k, s_mask_k = per_chunk[k]
                            logits = model(s_img_k, s_mask_k, q_img.index_select(0, r)).logits
                    probs[torch.as_tensor(part, device=device)] = torch.softmax(logits.float(), dim=1)[:, 1]
            yield spec, _at_volume_resolution(probs, vol, size), vol


def evaluate(model: torch.nn.Module, dataset, specs: Sequence[Any], *, size: int,
             device: torch.device | str = "cpu", precision: str = "fp32", channels_last: bool = False,
             batch_size: int = 16, out_dir: Optional[str | Path] = None, overlays: bool = True,
             distances: bool = True, meta: Optional[Dict[str, Any]] = None, progress: bool = False,
             label_names: Optional[Dict[int, str]] = None) -> Dict[str, Any]:
    """Score ``model`` on ``specs``; return the summary dict (and write reports to ``out_dir`` when given).

    Returns ``{"rows": [...per (scan, class)...], "per_class": {...}, "mean_dice": float, "timing": {...}}``.
    Scoring: the predicted volume is restricted to the spec's ``query_z`` slices (the protocol decides which
    slices those are: the organ's slab for ``alpnet``, the positive slices for ``adnet-ep1``, every slice for
    ``full-volume``) and compared with ``label == class`` on the same slices.
    """
    from fewshot_proto.metrics import MetricTable
    from fewshot_proto.metrics.report import write_report

    device = torch.device(device)
    label_names = label_names or getattr(dataset, "label_names", {}) or {}
    table = MetricTable(class_names=label_names)
    overlay_items = []
    n_slices = 0
    t0 = time.perf_counter()
    for spec, prob, vol in predict_specs(model, dataset, specs, size=size, device=device, precision=precision,
                                         channels_last=channels_last, batch_size=batch_size, progress=progress):
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
        if distances:
            from fewshot_proto.metrics.distance import surface_metrics

            d = surface_metrics(pred, truth, vol.spacing, zs=slice(int(zs.min()), int(zs.max()) + 1))
            row.hd95, row.assd = float(d["hd95"]), float(d["assd"])
        row.extra["support"] = ";".join(f"{s}:{','.join(map(str, z))}" for s, z in spec.support)
        if out_dir is not None and overlays:
            overlay_items.append((spec, pred[zs], truth[zs], vol))
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
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_report(out_dir, table, meta, summary=summary)
        if overlays:
            _write_overlays(overlay_items, dataset, size, out_dir / "overlays")
    summary = dict(summary)
    summary["rows"] = [r.to_dict() for r in table.rows]
    summary["mean_dice"] = float(summary["overall"]["dice"]["mean"])
    summary["timing"] = timing
    summary["meta"] = meta
    summary["table"] = table
    return summary


def _write_overlays(items, dataset, size, out_dir: Path, per_class: int = 2) -> None:
    from fewshot_proto.metrics.overlay import save_overlay

    out_dir.mkdir(parents=True, exist_ok=True)
    done: Dict[int, int] = {}
    for spec, pred, truth, vol in items:
        c = int(spec.class_id)
        if done.get(c, 0) >= per_class:
            continue
        done[c] = done.get(c, 0) + 1
        zs = np.asarray(spec.query_z, dtype=int)
        i = int(np.argmax(truth.reshape(len(zs), -1).sum(1)))
        k = int(spec.query_chunk[i])
        s_scan, s_zs = spec.support[0]
        s_vol = dataset.load(s_scan)
        sz = int(s_zs[min(k, len(s_zs) - 1)])
        save_overlay(out_dir / f"class{c}_scan{spec.query_scan}_z{int(zs[i])}.png",
                     s_vol.image[sz], s_vol.label[sz] == c, vol.image[zs[i]], pred[i], truth[i],
                     title=f"class {c}: support {s_scan} z{sz} -> query {spec.query_scan} z{int(zs[i])}")


def protocol_specs(dataset, protocol, *, folds: Optional[Sequence[int]] = None, manifest: Optional[str] = None):
    """Episode specs for ``protocol`` (a ``ProtocolConfig``) on ``dataset``, or from a frozen manifest.

    A manifest is verified against the dataset's SliceIndex first (a changed dataset is an error, not a
    silently different benchmark).
    """
    from fewshot_proto.episodes.protocol import build_eval_episodes

    index = dataset.slice_index()
    if manifest is not None:
        from fewshot_proto.episodes.manifest import load_manifest, verify_manifest

        m = load_manifest(manifest)
        verify_manifest(m, index, source=manifest)
        return list(m.episodes)
    specs = []
    for fold in (folds if folds is not None else [protocol.fold]):
        specs.extend(build_eval_episodes(index, protocol=protocol.name, fold=int(fold), n_folds=protocol.n_folds,
                                         shots=protocol.shots, n_part=protocol.n_part,
                                         test_classes=list(protocol.test_classes), setting=protocol.setting))
    return specs
