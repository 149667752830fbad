"""The dataset contract every reader implements, an in-memory implementation, and the SliceIndex builder.

A dataset is a lazily-read collection of labelled scans::

    ds.name                  -> str
    ds.ids                   -> list[str], natural order
    ds.load(scan_id)         -> Volume (image normalised, label remapped); decoded volumes are kept in a bounded cache
    ds.load_label(scan_id)   -> int array [Z,H,W] (no image voxels read)
    ds.label_names           -> {class id: name}
    ds.slice_index()         -> SliceIndex (readers on disk cache it and rebuild it when a file changes)
    ds.check_integrity()     -> None, or one DataError listing every problem found without reading voxels
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from fewshot_proto.errors import DataError
from fewshot_proto.types import SliceIndex, Volume, natural_key

__all__ = ["VolumeDataset", "InMemoryDataset", "build_slice_index", "slice_index_from_labels", "integrity_error",
           "LABEL_DTYPE_KINDS"]

#: numpy dtype kinds a label array may have: bool, signed / unsigned integers, and real floats (which must hold
#: integers; the NIfTI readers check the values when they decode the voxels)
LABEL_DTYPE_KINDS = "biuf"


def integrity_error(where: str, problems: Sequence[Tuple[str, str]]) -> DataError:
    """The one ``DataError`` of a failed integrity check.

    Args:
        where: the dataset (its root folder for readers on disk).
        problems: ``(scan id, "<file>: <problem>")`` pairs in the order found.

    Returns:
        ``DataError("<where>: N problem(s) in M scan(s): <file>: <problem>; <file>: <problem>; ...")``.
    """
    n_scans = len({sid for sid, _ in problems})
    text = "; ".join(msg for _, msg in problems)
    return DataError(f"{where}: {len(problems)} problem(s) in {n_scans} scan(s): {text}")


def slice_index_from_labels(labels: Iterable[tuple], dataset: str = "") -> SliceIndex:
    """Build a SliceIndex from ``(scan_id, label[Z,H,W])`` pairs, one label volume in memory at a time."""
    index: Dict[int, Dict[str, List[int]]] = {}
    n_slices: Dict[str, int] = {}
    for scan_id, label in labels:
        label = np.asarray(label)
        if label.ndim != 3:
            raise DataError(f"scan {scan_id!r}: label must be 3-D [Z,H,W], got shape {label.shape}")
        scan_id = str(scan_id)
        n_slices[scan_id] = int(label.shape[0])
        flat = label.reshape(label.shape[0], -1)
        for c in np.unique(flat):
            c = int(c)
            if c == 0:
                continue
            zs = np.flatnonzero((flat == c).any(axis=1))
            index.setdefault(c, {})[scan_id] = [int(z) for z in zs]
    if not n_slices:
        raise DataError(f"dataset {dataset!r} has no scans")
    return SliceIndex(index=index, n_slices=n_slices, dataset=dataset)


def build_slice_index(ds: "VolumeDataset") -> SliceIndex:
    """Build the SliceIndex of ``ds`` from its label files only (one volume in memory at a time)."""
    return slice_index_from_labels(((i, ds.load_label(i)) for i in ds.ids), dataset=ds.name)


class VolumeDataset:
    """Base class: subclasses implement ``ids``, ``_read(scan_id) -> Volume`` and optionally ``load_label``."""

    name: str = "dataset"
    label_names: Dict[int, str] = {}

    def __init__(self, cache_volumes: int = 8) -> None:
        self._cache: "OrderedDict[str, Volume]" = OrderedDict()
        self._cache_size = max(0, int(cache_volumes))
        self._index: Optional[SliceIndex] = None

    @property
    def ids(self) -> List[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _read(self, scan_id: str) -> Volume:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_id(self, scan_id: str) -> str:
        scan_id = str(scan_id)
        if scan_id not in self.ids:
            raise DataError(f"dataset {self.name!r} has no scan {scan_id!r}; scans: {self.ids}")
        return scan_id

    def load(self, scan_id: str) -> Volume:
        """The scan as a ``Volume`` (kept in a bounded LRU cache of decoded volumes)."""
        scan_id = self._check_id(scan_id)
        if scan_id in self._cache:
            self._cache.move_to_end(scan_id)
            return self._cache[scan_id]
        vol = self._read(scan_id)
        if self._cache_size:
            self._cache[scan_id] = vol
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vol

    def load_label(self, scan_id: str) -> np.ndarray:
        """Label volume ``[Z,H,W]`` of a scan (subclasses read only the label file)."""
        vol = self.load(scan_id)
        if vol.label is None:
            raise DataError(f"dataset {self.name!r}: scan {scan_id!r} has no label")
        return vol.label

    def check_integrity(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> None:
        """Raise one ``DataError`` listing every problem that can be found without decoding voxels.

        Call it before a run starts so that a broken scan is reported even when it would never be sampled. The
        base class has nothing cheap to check (its volumes are validated as they are read) and passes; readers
        override it. ``cache_dir`` is where readers on disk record a pass (ignored here).
        """

    def slice_index(self) -> SliceIndex:
        if self._index is None:
            self._index = build_slice_index(self)
        return self._index

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, scans={len(self)})"


class InMemoryDataset(VolumeDataset):
    """A dataset over ``Volume`` objects already in memory (tests, notebooks, generated phantoms)."""

    def __init__(self, volumes: Sequence[Volume], name: str = "in-memory",
                 label_names: Optional[Dict[int, str]] = None) -> None:
        super().__init__(cache_volumes=0)
        if not volumes:
            raise DataError(f"dataset {name!r} has no scans")
        self._vols = {str(v.id): v for v in volumes}
        if len(self._vols) != len(volumes):
            raise DataError(f"dataset {name!r}: duplicate scan ids")
        self.name = name
        self.label_names = dict(label_names or {})

    @property
    def ids(self) -> List[str]:
        return sorted(self._vols, key=natural_key)

    def _read(self, scan_id: str) -> Volume:
        return self._vols[scan_id]

    def check_integrity(self, cache_dir: Optional[Union[str, os.PathLike]] = None) -> None:
        """Check the arrays in memory: images 3-D, labels 3-D with the image's shape and an integer, bool or float
        dtype. Raises one ``DataError`` listing every problem (``Volume`` checks this when it is built, but its
        fields can be replaced afterwards). Nothing is cached (``cache_dir`` is ignored): the check is cheap."""
        problems: List[Tuple[str, str]] = []
        for sid in self.ids:
            vol = self._vols[sid]
            image = np.asarray(vol.image)
            if image.ndim != 3:
                problems.append((sid, f"scan {sid!r}: image must be 3-D [Z,H,W], got shape {image.shape}"))
            if vol.label is None:
                continue
            label = np.asarray(vol.label)
            if label.ndim != 3:
                problems.append((sid, f"scan {sid!r}: label must be 3-D [Z,H,W], got shape {label.shape}"))
            elif image.ndim == 3 and label.shape != image.shape:
                problems.append((sid, f"scan {sid!r}: label shape {label.shape} != image shape {image.shape}"))
            if label.dtype.kind not in LABEL_DTYPE_KINDS:
                problems.append((sid, f"scan {sid!r}: unsupported label dtype {label.dtype}"))
        if problems:
            raise integrity_error(f"dataset {self.name!r}", problems)
