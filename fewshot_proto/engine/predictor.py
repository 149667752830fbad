"""``predict_volume``: segment a new scan from one (or k) labelled support scans.

The query has no labels, so the organ's z-range in the query is unknown. Support slices are chosen by the
field's rule (``n_part`` chunks of the support organ, the slice at the centre of each chunk); query slice ``z``
is assigned to a chunk by its relative position in the query volume, mapped onto the support organ's relative
z-extent (scans of the same anatomy cover similar ranges). Slices outside that extent use the nearest chunk.
Every query slice is predicted; for several classes a voxel takes the class with the highest foreground
probability among those above ``threshold``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_proto.config import N_PART
from fewshot_proto.data.transforms import prepare_slices
from fewshot_proto.engine.inference import check_model_classes, check_segmenter, encode_queries, foreground, support_state
from fewshot_proto.engine.runtime import Runtime
from fewshot_proto.episodes.protocol import support_slice_positions
from fewshot_proto.errors import DataError
from fewshot_proto.types import Volume

__all__ = ["predict_volume", "relative_chunks"]


def relative_chunks(n_query: int, support_zs: Sequence[int], n_support: int, n_part: int) -> np.ndarray:
    """Chunk index for every query slice ``0..n_query-1`` from the support organ's relative extent."""
    zs = np.asarray(sorted(support_zs), dtype=float)
    lo, hi = (zs[0] + 0.5) / n_support, (zs[-1] + 0.5) / n_support
    rel = (np.arange(n_query) + 0.5) / n_query
    pos = (rel - lo) / max(hi - lo, 1e-6)
    return np.clip(np.floor(pos * n_part), 0, n_part - 1).astype(int)


@torch.inference_mode()
def predict_volume(model: torch.nn.Module, supports: Sequence[Volume], query: Volume, classes: Sequence[int], *,
                   size: int, n_part: int = N_PART, runtime: Optional[Runtime] = None, batch_size: int = 16,
                   threshold: float = 0.5, return_probs: bool = False):
    """Label volume ``[Z, H, W]`` (values in ``classes`` or 0) of ``query`` at its own resolution.

    ``supports``: labelled support volumes (k-shot: several). ``classes``: label values to segment; each must
    be present in every support volume. ``n_part``: support chunks per organ (use the checkpoint's protocol
    setting). ``runtime``: device, precision and memory format (default ``Runtime()``: CPU, fp32).
    """
    model = check_segmenter(model)
    runtime = runtime or Runtime()
    model.eval()
    if not classes:
        raise ValueError("predict_volume needs at least one class")
    check_model_classes(model, classes)
    q_img_np, _ = prepare_slices(query, list(range(query.n_slices)), size)
    q_state = encode_queries(model, runtime.tensor(q_img_np, torch.float32), runtime, batch_size)
    h0, w0 = query.image.shape[1:]
    probs: Dict[int, np.ndarray] = {}
    for c in classes:
        c = int(c)
        per_chunk_support: List[List[tuple]] = [[] for _ in range(n_part)]
        chunk_maps = []
        for sv in supports:
            if sv.label is None:
                raise DataError(f"support scan {sv.id!r} ({sv.path}) has no label")
            zs = [int(z) for z in np.flatnonzero((sv.label == c).reshape(sv.n_slices, -1).any(1))]
            if not zs:
                raise DataError(f"support scan {sv.id!r} ({sv.path}) has no voxel of class {c}; "
                                f"classes present: {sv.classes()}")
            picks = support_slice_positions(zs, n_part)
            img, lab = prepare_slices(sv, picks, size)
            for k in range(n_part):
                per_chunk_support[k].append((img[k], (lab[k] == c).astype(np.float32)))
            chunk_maps.append(relative_chunks(query.n_slices, zs, sv.n_slices, n_part))
        # with several supports, chunk assignment from the first (they agree up to anatomy variation)
        chunks = chunk_maps[0]
        prob = torch.empty((query.n_slices, size, size), dtype=torch.float32, device=runtime.device)
        for k in range(n_part):
            rows = np.flatnonzero(chunks == k)
            if len(rows) == 0:
                continue
            state = support_state(model, np.stack([a for a, _ in per_chunk_support[k]]),
                                  np.stack([m for _, m in per_chunk_support[k]]), c, runtime)
            prob[torch.as_tensor(rows, device=runtime.device)] = foreground(model, q_state, rows, state, runtime,
                                                                           batch_size)
        if (h0, w0) != (size, size):
            prob = F.interpolate(prob[:, None], size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
        probs[c] = prob.cpu().numpy()
    stack = np.stack([probs[int(c)] for c in classes])  # [C, Z, H, W]
    best = stack.argmax(0)
    out = np.where(stack.max(0) >= threshold, np.asarray(classes, dtype=np.int16)[best], 0).astype(np.int16)
    return (out, probs) if return_probs else out
