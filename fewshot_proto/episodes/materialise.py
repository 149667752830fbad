"""Turn an :class:`~fewshot_proto.episodes.protocol.EpisodeSpec` into arrays a model can take.

Used by the engine's ``evaluate``: the support set once per (class, support slices), the query slices once per
query scan (shared by every class on that scan).
"""
from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np

from fewshot_proto.data.transforms import prepare_slices
from fewshot_proto.errors import ProtocolError

from .protocol import EpisodeSpec

__all__ = ["load_support", "load_query"]


def _prepare(dataset: Any, scan: str, zs: List[int], size: int, spec: EpisodeSpec):
    vol = dataset.load(scan)
    if vol.label is None:
        raise ProtocolError(f"episode {spec.key}: scan {scan!r} of dataset {spec.dataset!r} has no label")
    bad = [z for z in zs if not 0 <= int(z) < vol.n_slices]
    if bad:
        raise ProtocolError(f"episode {spec.key}: scan {scan!r} has {vol.n_slices} slices, the episode asks for "
                            f"z={bad} (does the manifest belong to this dataset?)")
    img, lab = prepare_slices(vol, [int(z) for z in zs], int(size))
    return vol, np.asarray(img, dtype=np.float32), np.asarray(lab)


def load_support(spec: EpisodeSpec, dataset: Any, size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Support images and binary masks of ``spec.class_id``.

    Returns:
        ``img`` float32 ``[shots, n_part, 3, size, size]`` and ``mask`` float32 ``[shots, n_part, size, size]``
        in {0, 1}; ``[k, p]`` is chunk ``p``'s slice of support scan ``k``.

    Raises:
        ProtocolError: a support slice lacks the class (the episode does not belong to this data).
    """
    imgs, masks = [], []
    c = int(spec.class_id)
    for scan, zs in spec.support:
        vol, img, lab = _prepare(dataset, scan, list(zs), size, spec)
        empty = [int(z) for z in zs if not np.any(vol.label[int(z)] == c)]
        if empty:
            raise ProtocolError(f"episode {spec.key}: support scan {scan!r} has no class {c} at z={empty}")
        imgs.append(img)
        masks.append((lab == c).astype(np.float32))
    return np.stack(imgs), np.stack(masks)


def load_query(spec: EpisodeSpec, dataset: Any, size: int) -> Tuple[np.ndarray, np.ndarray, List[int]]:
    """Query slices of ``spec`` and their ground truth for ``spec.class_id``.

    Returns:
        ``img`` float32 ``[Q, 3, size, size]``, ``mask`` int64 ``[Q, size, size]`` in {0, 1} (resized with
        nearest neighbour; score at the volume's own resolution with ``vol.label[zs]`` instead), and ``zs``
        (``spec.query_z``; ``Q = len(zs)``).
    """
    zs = [int(z) for z in spec.query_z]
    _, img, lab = _prepare(dataset, spec.query_scan, zs, size, spec)
    return img, (lab == int(spec.class_id)).astype(np.int64), zs
