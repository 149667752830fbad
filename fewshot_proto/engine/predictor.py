"""``predict_volume``: segment a new scan from one (or k) labelled support scans.

The query has no labels, so the organ's z-range in the query is unknown. Support slices are chosen by the
field's rule (``n_part`` chunks of the support organ, the slice at the centre of each chunk); query slice ``z``
is assigned to a chunk by its relative position in the query volume, mapped onto the support organ's relative
z-extent (scans of the same anatomy cover similar ranges). Slices outside that extent use the nearest chunk.
Every query slice is predicted; for several classes a voxel takes the class with the highest foreground
probability among those above ``threshold``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fewshot_proto.config import N_PART
from fewshot_proto.data.transforms import prepare_slices
from fewshot_proto.engine.inference import (check_model_classes, check_segmenter, encode_queries, foreground,
                                            support_state)
from fewshot_proto.engine.runtime import Runtime
from fewshot_proto.episodes.protocol import support_slice_positions
from fewshot_proto.errors import DataError
from fewshot_proto.types import Volume

__all__ = ["SupportSet", "predict_queries", "predict_volume", "relative_chunks"]


def relative_chunks(n_query: int, support_zs: Sequence[int], n_support: int, n_part: int) -> np.ndarray:
    """Chunk index for every query slice ``0..n_query-1`` from the support organ's relative extent."""
    zs = np.asarray(sorted(support_zs), dtype=float)
    lo, hi = (zs[0] + 0.5) / n_support, (zs[-1] + 0.5) / n_support
    rel = (np.arange(n_query) + 0.5) / n_query
    pos = (rel - lo) / max(hi - lo, 1e-6)
    return np.clip(np.floor(pos * n_part), 0, n_part - 1).astype(int)


class SupportSet:
    """The support of every (class, chunk), encoded once for all queries (each state when first needed).

    The chunk rule is :func:`fewshot_proto.engine.predictor.predict_volume`'s: support slices at the centres of
    ``n_part`` chunks of the support organ; query slice ``z`` takes the chunk of its relative position, mapped onto
    the first support's relative organ extent.

    Raises:
        DataError: a support has no label, or no voxel of a class.
    """

    def __init__(self, model: torch.nn.Module, supports: Sequence[Volume], classes: Sequence[int], *, size: int,
                 n_part: int, runtime: Runtime) -> None:
        self.model, self.n_part, self.runtime = model, int(n_part), runtime
        self._images: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray]] = {}
        self._extent: Dict[int, Tuple[List[int], int]] = {}
        self._states: Dict[Tuple[int, int], object] = {}
        for c in (int(c) for c in classes):
            per_chunk: List[List[tuple]] = [[] for _ in range(self.n_part)]
            for sv in supports:
                if sv.label is None:
                    raise DataError(f"support scan {sv.id!r} ({sv.path}) has no label")
                zs = [int(z) for z in np.flatnonzero((sv.label == c).reshape(sv.n_slices, -1).any(1))]
                if not zs:
                    raise DataError(f"support scan {sv.id!r} ({sv.path}) has no voxel of class {c}; "
                                    f"classes present: {sv.classes()}")
                img, lab = prepare_slices(sv, support_slice_positions(zs, self.n_part), size)
                for k in range(self.n_part):
                    per_chunk[k].append((img[k], (lab[k] == c).astype(np.float32)))
                self._extent.setdefault(c, (zs, sv.n_slices))  # chunk assignment from the first support
            for k in range(self.n_part):
                self._images[(c, k)] = (np.stack([a for a, _ in per_chunk[k]]), np.stack([m for _, m in per_chunk[k]]))

    def chunks(self, class_id: int, n_query: int) -> np.ndarray:
        """The chunk of every slice of an ``n_query``-slice query for class ``class_id``."""
        zs, n_support = self._extent[int(class_id)]
        return relative_chunks(n_query, zs, n_support, self.n_part)

    def state(self, class_id: int, chunk: int):
        """The model's support state of (class, chunk), encoded on first use."""
        key = (int(class_id), int(chunk))
        if key not in self._states:
            img, mask = self._images[key]
            self._states[key] = support_state(self.model, img, mask, key[0], self.runtime)
        return self._states[key]


@torch.inference_mode()
def predict_queries(model: torch.nn.Module, supports: Sequence[Volume], queries: Iterable[Volume],
                    classes: Sequence[int], *, size: int, n_part: int, runtime: Optional[Runtime] = None,
                    batch_size: int = 16, threshold: float = 0.5) -> Iterator[Tuple[np.ndarray, Dict[int, np.ndarray]]]:
    """``predict_volume(model, supports, q, classes, ..., return_probs=True)`` for every ``q`` of ``queries`` (read
    one at a time), with the support encoded once for all of them: yields ``(labels [Z, H, W] int16, {class:
    foreground probability [Z, H, W] float32})`` per query."""
    model = check_segmenter(model)
    runtime = runtime or Runtime()
    model.eval()
    if not classes:
        raise ValueError("predict_queries needs at least one class")
    check_model_classes(model, classes)
    support = SupportSet(model, supports, classes, size=size, n_part=n_part, runtime=runtime)
    for query in queries:
        q_img_np, _ = prepare_slices(query, list(range(query.n_slices)), size)
        q_state = encode_queries(model, runtime.tensor(q_img_np, torch.float32), runtime, batch_size)
        h0, w0 = query.image.shape[1:]
        probs: Dict[int, np.ndarray] = {}
        for c in (int(c) for c in classes):
            chunks = support.chunks(c, query.n_slices)
            prob = torch.empty((query.n_slices, size, size), dtype=torch.float32, device=runtime.device)
            for k in range(support.n_part):
                rows = np.flatnonzero(chunks == k)
                if len(rows) == 0:
                    continue
                prob[torch.as_tensor(rows, device=runtime.device)] = foreground(
                    model, q_state, rows, support.state(c, k), runtime, batch_size)
            if (h0, w0) != (size, size):
                prob = F.interpolate(prob[:, None], size=(h0, w0), mode="bilinear", align_corners=False)[:, 0]
            probs[c] = prob.cpu().numpy()
        stack = np.stack([probs[int(c)] for c in classes])  # [C, Z, H, W]
        best = stack.argmax(0)
        labels = np.where(stack.max(0) >= threshold, np.asarray(classes, dtype=np.int16)[best], 0).astype(np.int16)
        yield labels, probs


@torch.inference_mode()
def predict_volume(model: torch.nn.Module, supports: Sequence[Volume], query: Volume, classes: Sequence[int], *,
                   size: int, n_part: int = N_PART, runtime: Optional[Runtime] = None, batch_size: int = 16,
                   threshold: float = 0.5, return_probs: bool = False):
    """Label volume ``[Z, H, W]`` (values in ``classes`` or 0) of ``query`` at its own resolution: the first (and
    only) result of :func:`predict_queries` for ``[query]``.

    ``supports``: labelled support volumes (k-shot: several). ``classes``: label values to segment; each must
    be present in every support volume; a voxel takes the class with the highest foreground probability among
    those at or above ``threshold``. ``n_part``: support chunks per organ (use the checkpoint's protocol setting).
    ``runtime``: device, precision and memory format (default ``Runtime()``: CPU, fp32). ``return_probs``: also
    return ``{class: foreground probability [Z, H, W]}``.
    """
    if not classes:
        raise ValueError("predict_volume needs at least one class")
    labels, probs = next(predict_queries(model, supports, [query], classes, size=size, n_part=n_part,
                                         runtime=runtime, batch_size=batch_size, threshold=threshold))
    return (labels, probs) if return_probs else labels
