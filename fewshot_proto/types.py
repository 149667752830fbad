"""The objects that flow through fewshot_proto (see DESIGN.md section 2).

Shape letters used everywhere in this package:

    Z  slices of a volume (the slice axis, moved to the front)
    H, W  in-plane size (of the volume for ``Volume``; of the model input for ``Episode``)
    S  support slices in an episode (k shots x n support slices per shot, stacked)
    Q  query slices in an episode
    C  image channels (3: grey value tiled for ImageNet-style encoders)
    K  classes in a model output (2 for binary few-shot: background, foreground)

This module is core: it imports only the standard library and numpy (torch appears in annotations only).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Volume", "SliceIndex", "Episode", "SegOutput", "natural_key", "safe_file_name"]


def natural_key(s: str) -> Tuple[Any, ...]:
    """Sort key that orders ``"2" < "10"`` and ``"case_2" < "case_10"`` (scan ids are sorted this way)."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s)))


def safe_file_name(name: str, fallback: str = "dataset") -> str:
    """``name`` with every run of characters other than letters, digits, ``_``, ``.`` and ``-`` replaced by ``_``
    (cache files and default run folders are named after datasets)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)) or fallback


@dataclass
class Volume:
    """One 3-D scan with its labels, slice axis first.

    Attributes:
        id: scan id (``"1"`` for ``image_1.nii.gz``; ``"hippocampus_001"`` for MSD).
        image: float32 ``[Z, H, W]``, already normalised (see ``fewshot_proto.data.normalise``).
        label: integer ``[Z, H, W]`` (uint8/int16) after label remapping, or ``None`` for an unlabelled scan.
        spacing: voxel size in mm in array order ``(z, y, x)``.
        affine: the file's 4x4 voxel-to-world matrix (for the file's own axis order, before moving the slice axis).
        slice_axis: which axis of the file's array became ``Z`` (needed to write predictions back).
        path: image file it was read from (``None`` for in-memory volumes).
        meta: anything else (label names, original dtype, NIfTI header object for writing, ...).
    """

    id: str
    image: np.ndarray
    label: Optional[np.ndarray]
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    slice_axis: int = 2
    path: Optional[Path] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3:
            raise ValueError(f"Volume {self.id!r}: image must be 3-D [Z,H,W], got shape {self.image.shape}")
        if self.label is not None and self.label.shape != self.image.shape:
            raise ValueError(
                f"Volume {self.id!r}: label shape {self.label.shape} != image shape {self.image.shape}"
            )

    @property
    def shape(self) -> Tuple[int, int, int]:
        return tuple(self.image.shape)  # type: ignore[return-value]

    @property
    def n_slices(self) -> int:
        return int(self.image.shape[0])

    def classes(self) -> List[int]:
        """Foreground label values present in this volume (sorted, 0 excluded)."""
        if self.label is None:
            return []
        return [int(c) for c in np.unique(self.label) if c != 0]


@dataclass
class SliceIndex:
    """Where each class is: ``class -> scan id -> sorted slice indices (z) containing that class``.

    Built from labels only (``fewshot_proto.data.build_slice_index``), never from image voxels, and cheap to
    serialise. All evaluation protocols are pure functions over a ``SliceIndex``.

    Attributes:
        index: ``{class: {scan_id: [z, ...]}}``; a scan without the class has no entry for it.
        n_slices: ``{scan_id: Z}`` for every scan (including scans with no foreground at all).
        dataset: a name for the dataset (used in manifests).
    """

    index: Dict[int, Dict[str, List[int]]]
    n_slices: Dict[str, int]
    dataset: str = ""

    @property
    def scan_ids(self) -> List[str]:
        """All scan ids in natural order (the order folds are cut in)."""
        return sorted(self.n_slices, key=natural_key)

    @property
    def classes(self) -> List[int]:
        return sorted(c for c, scans in self.index.items() if scans)

    def scans_with(self, cls: int) -> List[str]:
        """Scan ids containing ``cls``, in natural order."""
        return sorted(self.index.get(int(cls), {}), key=natural_key)

    def slices(self, cls: int, scan_id: str) -> List[int]:
        """Sorted slice indices of ``scan_id`` that contain ``cls`` (empty list when none)."""
        return list(self.index.get(int(cls), {}).get(str(scan_id), []))

    def slices_with_any(self, classes: Iterable[int], scan_id: str) -> List[int]:
        """Sorted slice indices of ``scan_id`` containing at least one of ``classes``."""
        zs: set = set()
        for c in classes:
            zs.update(self.slices(c, scan_id))
        return sorted(zs)

    def require_class(self, cls: int) -> None:
        """Raise ``ValueError`` naming the available classes when no scan has ``cls``."""
        if not self.scans_with(cls):
            raise ValueError(
                f"class {cls} is not present in any scan of dataset {self.dataset!r}; "
                f"available classes: {self.classes}"
            )

    def subset(self, scan_ids: Sequence[str]) -> "SliceIndex":
        """The index restricted to ``scan_ids``."""
        keep = set(map(str, scan_ids))
        return SliceIndex(
            index={c: {s: list(z) for s, z in scans.items() if s in keep} for c, scans in self.index.items()},
            n_slices={s: n for s, n in self.n_slices.items() if s in keep},
            dataset=self.dataset,
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n_slices": dict(self.n_slices),
            "index": {str(c): {s: list(map(int, z)) for s, z in scans.items()} for c, scans in self.index.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SliceIndex":
        return cls(
            index={int(c): {str(s): list(map(int, z)) for s, z in scans.items()} for c, scans in d["index"].items()},
            n_slices={str(s): int(n) for s, n in d["n_slices"].items()},
            dataset=str(d.get("dataset", "")),
        )

    def to_json(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path: Path | str) -> "SliceIndex":
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class Episode:
    """One few-shot episode, ready for a model (numpy; the engine moves it to torch).

    Attributes:
        support_img: float32 ``[S, C, H, W]``.
        support_mask: float32 ``[S, H, W]`` in {0, 1} (binary mask of ``class_id``; soft values allowed).
        query_img: float32 ``[Q, C, H, W]``.
        query_mask: int64 ``[Q, H, W]`` in {0, 1}, or ``None`` when the query is unlabelled (prediction).
        class_id: the foreground class (label value in the dataset's remapped label space; -1 for
            self-supervised superpixel episodes).
        meta: provenance: ``support_scan``, ``support_z`` (list), ``query_scan``, ``query_z`` (list),
            ``shots``, ``kind`` ("labelled" | "superpixel" | "eval"), ...
    """

    support_img: np.ndarray
    support_mask: np.ndarray
    query_img: np.ndarray
    query_mask: Optional[np.ndarray]
    class_id: int
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s, q = self.support_img, self.query_img
        if s.ndim != 4 or q.ndim != 4:
            raise ValueError(f"Episode images must be [N,C,H,W]; got support {s.shape}, query {q.shape}")
        if self.support_mask.shape != (s.shape[0],) + s.shape[2:]:
            raise ValueError(f"support_mask shape {self.support_mask.shape} does not match support_img {s.shape}")
        if self.query_mask is not None and self.query_mask.shape != (q.shape[0],) + q.shape[2:]:
            raise ValueError(f"query_mask shape {self.query_mask.shape} does not match query_img {q.shape}")
        if s.shape[1:] != q.shape[1:]:
            raise ValueError(f"support {s.shape} and query {q.shape} differ in channels or size")


@dataclass
class SegOutput:
    """What every model's ``forward`` returns (``fewshot_proto.models.base``).

    Attributes:
        logits: ``[Q, K, H, W]`` raw scores (K = 2 for binary few-shot: background, foreground).
        support_feats: the model's ``encode`` pyramid of the support, fine to coarse (``[S, D, h, w]`` last), or
            ``None`` for a model whose outputs carry no features (supervised, adapt-then-segment).
        query_feats: the same for the query (``[Q, D, h, w]`` last). The alignment loss pools the last maps; the
            cyclic loss reuses both pyramids instead of re-encoding.
        prototypes: what the model's ``prototypes`` returned for the support (its own type), or ``None``.
    """

    logits: "torch.Tensor"
    support_feats: Optional[List["torch.Tensor"]] = None
    query_feats: Optional[List["torch.Tensor"]] = None
    prototypes: Any = None
