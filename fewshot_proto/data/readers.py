"""NIfTI datasets on disk: the SSL-ALPNet layout and the MSD / nnU-Net layout.

Two folder layouts are read:

* **SSL-ALPNet** (:class:`AlpnetDataset`; CHAOS-T2, Synapse/SABS, MS-CMRSeg as SSL-ALPNet preprocesses them)::

      root/image_<id>.nii.gz   root/label_<id>.nii.gz     (``.nii`` accepted too)
      root/labels.json         optional {"1": "liver", ...} class names (the phantoms' phantom.json works too)

  Other files (``superpix-*``, ``classmap_*.json``) are ignored.
* **MSD / nnU-Net** (:class:`MSDDataset`; Medical Segmentation Decathlon tasks)::

      root/dataset.json  root/imagesTr/<case>.nii.gz (or <case>_0000.nii.gz)  root/labelsTr/<case>.nii.gz

  The training list and the class names come from ``dataset.json`` (MSD ``{"1": "Anterior"}`` and nnU-Net v2
  ``{"Anterior": 1}`` label tables are both understood).

**Class names** (``dataset.label_names``, ``{class id: name}``, what reports call the classes): the ``label_names``
argument (``data.class_names`` in a config, through :func:`dataset_from_config`) when given, for every layout;
it replaces the names found on disk as a whole (the config wins over ``dataset.json`` / ``labels.json``). Its
ids are class ids AFTER ``label_map``. Otherwise the names on disk, carried through ``label_map`` (several raw
values mapped to one class are joined with ``+``); an SSL-ALPNet folder without ``labels.json`` (CHAOS-T2 as
SSL-ALPNet ships it) has none, and reports then show empty names.

Every reader is lazy: the constructor only lists files; ``load`` decodes one scan (kept in a bounded LRU cache),
``load_label`` decodes only the label file, and ``slice_index`` reads labels one volume at a time and caches the
result on disk (JSON), rebuilt only when a file's ``(name, size, mtime_ns)`` changes. ``check_integrity`` reads
every header (never the voxels) and raises one error listing all the broken scans; a pass is cached the same way.
A file name that is a dangling symbolic link still makes its scan part of the dataset (it is reported as broken,
never silently left out of the scan list).

Arrays: the file's ``slice_axis`` is moved to the front, so ``Volume.image`` / ``Volume.label`` are ``[Z, H, W]``
with ``H, W`` the remaining file axes in their file order, and ``Volume.spacing`` is in that array order.
:func:`write_prediction` undoes the move and writes with the scan's own affine and header.

Every problem with the files raises :class:`~fewshot_proto.errors.DataError` naming the file (or scan id) and the
cause. nibabel is imported inside functions so that importing this module stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from fewshot_proto.data.dataset import LABEL_DTYPE_KINDS, VolumeDataset, integrity_error, slice_index_from_labels
from fewshot_proto.data.normalise import DEFAULT_CT_WINDOW, NORMALISE_METHODS, dataset_stats, normalise_volume
from fewshot_proto.errors import DataError
from fewshot_proto.types import SliceIndex, Volume, natural_key, safe_file_name

__all__ = [
    "AlpnetDataset",
    "MSDDataset",
    "NiftiDataset",
    "open_dataset",
    "dataset_from_config",
    "detect_layout",
    "write_prediction",
    "default_cache_dir",
    "INDEX_FORMAT_VERSION",
]

PathLike = Union[str, os.PathLike]

#: bump when the on-disk SliceIndex cache format or the label semantics change (old caches are then ignored)
INDEX_FORMAT_VERSION = 1
#: bump when ``NiftiDataset.check_integrity`` checks more (cached passes of older checks are then ignored)
_INTEGRITY_VERSION = 1
_NII_RE = re.compile(r"(.+?)(\.nii\.gz|\.nii)")
_ALPNET_RE = re.compile(r"(image|label)_(.+?)(\.nii\.gz|\.nii)")
_LABEL_TOL = 1e-3
_AFFINE_TOL = 1e-3
_INT16_MAX = np.iinfo(np.int16).max


def default_cache_dir() -> Path:
    """Folder of cached slice indices: ``$FEWSHOT_PROTO_CACHE/index`` or ``~/.cache/fewshot_proto/index``."""
    base = os.environ.get("FEWSHOT_PROTO_CACHE")
    root = Path(base).expanduser() if base else Path.home() / ".cache" / "fewshot_proto"
    return root / "index"


# ----------------------------------------------------------------------------------------------------------------
# low-level NIfTI helpers


def _read_errors() -> Tuple[type, ...]:
    """Exception types that mean "this file is unreadable" (nibabel, gzip, truncated files)."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError

    return (OSError, EOFError, zlib.error, ValueError, ImageFileError, HeaderDataError, WrapStructError)


def _file_entry(path: Path) -> bool:
    """``path`` names a regular file or a dangling symbolic link.

    Discovery lists scans with this rather than ``is_file()`` so that a broken link keeps its scan in the dataset
    and is reported (by :func:`_open`, ``check_integrity``) instead of the scan silently disappearing.
    """
    return path.is_file() or (path.is_symlink() and not path.exists())


def _missing(path: Path) -> str:
    """``"<path>: <why it is not a readable file>"`` (missing, dangling symbolic link, not a regular file)."""
    if path.is_symlink() and not path.exists():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"{path}: broken symbolic link, its target {target} does not exist"
    if path.exists():
        return f"{path}: not a regular file"
    return f"{path}: file does not exist"


def _open(path: Path) -> Any:
    """``nibabel.load`` (header only; voxels stay on disk behind ``img.dataobj``)."""
    import nibabel as nib

    if not path.is_file():
        raise DataError(_missing(path))
    try:
        return nib.load(str(path))
    except _read_errors() as e:
        raise DataError(f"{path}: cannot read the file: {type(e).__name__}: {e} (corrupt or truncated NIfTI file?)"
                        ) from e


def _shape3(img: Any, path: Path) -> Tuple[int, int, int]:
    """The 3-D shape of a NIfTI image; trailing singleton axes (``X,Y,Z,1``) are dropped."""
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(img.shape)}")
    return shape  # type: ignore[return-value]


def _decode(img: Any, path: Path, shape: Tuple[int, int, int], as_float32: bool) -> np.ndarray:
    """Decode the voxels of ``img`` (the only place a file's voxel data is read)."""
    try:
        if as_float32:
            arr = img.get_fdata(dtype=np.float32, caching="unchanged")
        else:
            arr = np.asanyarray(img.dataobj)
    except _read_errors() as e:
        raise DataError(f"cannot read voxels of {path}: {type(e).__name__}: {e} (corrupt or truncated file?)") from e
    return np.asarray(arr).reshape(shape)


def _check_label_dtype(dtype: Any, path: Path) -> None:
    """Raise ``DataError`` unless :func:`_cast_labels` accepts labels of ``dtype`` (bool, integers, real floats).

    Used on the decoded array and, by ``check_integrity``, on the header's ``get_data_dtype()``.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in LABEL_DTYPE_KINDS:
        raise DataError(f"{path}: unsupported label dtype {dtype} (labels must be integers, or floats holding "
                        f"integers)")


def _grid_mismatch(ipath: Path, shape: Tuple[int, ...], iaff: np.ndarray, lpath: Path, lshape: Tuple[int, ...],
                   laff: np.ndarray) -> Optional[str]:
    """Why label ``lpath`` is not on the voxel grid of image ``ipath`` (shape, then affine within
    ``_AFFINE_TOL``), or ``None`` when it is."""
    if tuple(shape) != tuple(lshape):
        return f"shape mismatch, image {ipath} has shape {tuple(shape)} but label {lpath} has shape {tuple(lshape)}"
    iaff, laff = np.asarray(iaff, dtype=np.float64), np.asarray(laff, dtype=np.float64)
    if not np.allclose(iaff, laff, atol=_AFFINE_TOL, rtol=0):
        return (f"affine mismatch, label {lpath} is not on the grid of image {ipath} "
                f"(max abs difference {float(np.abs(iaff - laff).max()):.4g})")
    return None


def _cast_labels(raw: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels from a label array of any numeric dtype (CHAOS stores float64).

    Floats are rounded; a value farther than 1e-3 from an integer raises ``DataError``.
    """
    if raw.dtype == bool:
        return raw.astype(np.uint8)
    if raw.dtype.kind in "iu":
        return raw
    _check_label_dtype(raw.dtype, path)
    if raw.size == 0:
        return raw.astype(np.int64)
    lo, hi = float(raw.min()), float(raw.max())  # NaN propagates through min/max
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"non-finite labels in {path}: {int((~np.isfinite(raw)).sum())} NaN/inf voxels")
    if -(2.0 ** 31) < lo and hi < 2.0 ** 31:
        as_int = raw.astype(np.int64)
        if np.array_equal(as_int, raw):  # common case: exact integers stored as floats
            return as_int
    r = np.rint(raw)
    bad = np.abs(raw - r) > _LABEL_TOL
    if bad.any():
        example = float(raw[bad].flat[0])
        raise DataError(f"non-integer labels in {path}: e.g. {example:g} ({int(bad.sum())} voxels)")
    if r.size and (r.min() < np.iinfo(np.int64).min / 2 or r.max() > np.iinfo(np.int64).max / 2):
        raise DataError(f"{path}: label values out of integer range")
    return r.astype(np.int64)


def _present_values(lab: np.ndarray) -> np.ndarray:
    """Sorted distinct values of an integer array (bincount when the range is small: O(n), no sort)."""
    if lab.size == 0:
        return np.zeros(0, dtype=np.int64)
    lo, hi = int(lab.min()), int(lab.max())
    if lo >= 0 and hi < (1 << 20):
        return np.flatnonzero(np.bincount(lab.ravel(), minlength=hi + 1))
    return np.unique(lab).astype(np.int64)


def _remap_labels(
    lab: np.ndarray, path: Path, label_map: Optional[Mapping[int, int]], drop_unmapped: bool
) -> np.ndarray:
    """Apply ``label_map`` (raw value -> class id) and return int16 labels.

    Without a map values pass through unchanged (they must fit int16 and be >= 0). With a map, 0 stays background
    unless the map says otherwise; unmapped non-zero values raise ``DataError`` naming them unless ``drop_unmapped``
    (then they become background).
    """
    present = _present_values(lab)
    if label_map is None:
        if present.size and (present[0] < 0 or present[-1] > _INT16_MAX):
            raise DataError(
                f"{path}: label values must lie in 0..{_INT16_MAX}, found {present[0]}..{present[-1]}; "
                f"pass a label_map to remap them"
            )
        return lab.astype(np.int16, copy=False)
    unmapped = [int(v) for v in present if v != 0 and int(v) not in label_map]
    if unmapped and not drop_unmapped:
        raise DataError(
            f"{path}: label values {unmapped} are not in label_map {dict(label_map)}; "
            f"add them to label_map or set drop_unmapped=True to make them background"
        )
    lut_values = {int(v): int(label_map.get(int(v), 0)) for v in present}
    if present.size and present[0] >= 0 and present[-1] < (1 << 20):
        lut = np.zeros(int(present[-1]) + 1, dtype=np.int16)
        for v, c in lut_values.items():
            lut[v] = c
        return lut[lab]
    out = np.zeros(lab.shape, dtype=np.int16)
    for v, c in lut_values.items():
        if c:
            out[lab == v] = c
    return out


def _stat(path: Path, root: Path) -> List[Any]:
    try:
        st = path.stat()
    except OSError as e:
        if path.is_symlink():
            raise DataError(_missing(path)) from e
        raise DataError(f"{path}: cannot stat file ({e}); was it removed after the dataset was opened?") from e
    try:
        name = str(path.relative_to(root))
    except ValueError:
        name = str(path)
    return [name, int(st.st_size), int(st.st_mtime_ns)]


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------------------------
# datasets


class NiftiDataset(VolumeDataset):
    """Common machinery of the NIfTI readers; subclasses only discover files and class names.

    Args:
        root: dataset folder.
        slice_axis: file array axis holding the slices (2 for CHAOS-T2 / SSL-ALPNet files).
        label_map: raw label value -> class id (e.g. ``{200: 1, 500: 2, 600: 3}``).
        drop_unmapped: with a ``label_map``, unmapped non-zero values become background instead of raising.
        normalise: ``"zscore"`` (per volume, MR), ``"ct"`` (window + dataset statistics) or ``"none"``.
        ct_window: ``(low, high)`` clipping window (``"ct"`` defaults to ``(-125, 275)`` HU).
        ct_stats: ``(mean, std)`` of the training volumes after windowing for ``"ct"``; when not given it is
            computed over all scans at the first ``load`` (call :meth:`compute_ct_stats` with the training ids to
            keep test scans out of it).
        cache_volumes: decoded volumes kept in memory (LRU).
        name: dataset name (default: the folder name).
        label_names: ``{class id: name}`` replacing the names found on disk as a whole (``dataset.json``,
            ``labels.json``); ids are class ids after ``label_map``. ``None``: the names on disk, mapped through
            ``label_map``.
    """

    layout = "nifti"

    def __init__(
        self,
        root: PathLike,
        slice_axis: int = 2,
        label_map: Optional[Mapping[int, int]] = None,
        drop_unmapped: bool = False,
        normalise: str = "zscore",
        ct_window: Optional[Sequence[float]] = None,
        cache_volumes: int = 8,
        name: Optional[str] = None,
        *,
        ct_stats: Optional[Tuple[float, float]] = None,
        label_names: Optional[Mapping[int, str]] = None,
    ) -> None:
        super().__init__(cache_volumes=cache_volumes)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist or is not a folder")
        if int(slice_axis) not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis!r}")
        if normalise not in NORMALISE_METHODS:
            raise ValueError(f"normalise must be one of {list(NORMALISE_METHODS)}, got {normalise!r}")
        if ct_window is not None and (len(ct_window) != 2 or not float(ct_window[0]) < float(ct_window[1])):
            raise ValueError(f"ct_window must be (low, high) with low < high, got {ct_window!r}")
        self.slice_axis = int(slice_axis)
        self.label_map: Optional[Dict[int, int]] = (
            None if label_map is None else {int(k): int(v) for k, v in label_map.items()}
        )
        if self.label_map is not None:
            bad = {k: v for k, v in self.label_map.items() if not 0 <= v <= _INT16_MAX}
            if bad:
                raise ValueError(f"label_map targets must lie in 0..{_INT16_MAX}, got {bad}")
        self.drop_unmapped = bool(drop_unmapped)
        self.normalise = normalise
        self.ct_window: Optional[Tuple[float, float]] = (
            None if ct_window is None else (float(ct_window[0]), float(ct_window[1]))
        )
        self.ct_stats: Optional[Tuple[float, float]] = None if ct_stats is None else (
            float(ct_stats[0]), float(ct_stats[1]))
        self.name = str(name) if name else self.root.name
        self._files: Dict[str, Tuple[Path, Path]] = self._discover()
        self._ids: List[str] = sorted(self._files, key=natural_key)
        raw_names = self._raw_label_names()
        if label_names is not None:
            self.label_names = {int(k): str(v) for k, v in label_names.items()}
        else:
            self.label_names = self._mapped_names(raw_names)
        self._index_fp: Optional[List[List[Any]]] = None
        #: how many times this object built its SliceIndex from label files (cache hits do not count)
        self.index_builds = 0
        self._integrity_fp: Optional[List[List[Any]]] = None
        #: how many times this object read the headers in ``check_integrity`` (cached passes do not count)
        self.integrity_checks = 0

    # -- to be provided by subclasses ---------------------------------------------------------------------------
    def _discover(self) -> Dict[str, Tuple[Path, Path]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _raw_label_names(self) -> Dict[int, str]:
        return {}

    def _extra_files(self) -> List[Path]:
        """Files besides images and labels whose change invalidates the cached index (e.g. dataset.json)."""
        return []

    # -- public API ---------------------------------------------------------------------------------------------
    @property
    def ids(self) -> List[str]:
        return list(self._ids)

    def paths(self, scan_id: str) -> Tuple[Path, Path]:
        """``(image path, label path)`` of a scan."""
        return self._files[self._check_id(scan_id)]

    def _check_id(self, scan_id: str) -> str:
        scan_id = str(scan_id)
        if scan_id not in self._files:
            shown = self._ids if len(self._ids) <= 30 else self._ids[:30] + ["..."]
            raise DataError(f"dataset {self.name!r} ({self.root}) has no scan {scan_id!r}; scans: {shown}")
        return scan_id

    def read_raw_image(self, scan_id: str) -> np.ndarray:
        """The image voxels as stored (float32, file axis order, not normalised); NaN/inf raise ``DataError``."""
        ipath, _ = self.paths(scan_id)
        img = _open(ipath)
        return self._raw_from(img, ipath, _shape3(img, ipath))

    def load_label(self, scan_id: str) -> np.ndarray:
        """Remapped int16 labels ``[Z, H, W]`` of a scan, read from the label file only."""
        scan_id = self._check_id(scan_id)
        if scan_id in self._cache:
            return self._cache[scan_id].label  # type: ignore[return-value]
        _, lpath = self._files[scan_id]
        lab = _open(lpath)
        label = self._label_from(lab, lpath, _shape3(lab, lpath))
        return np.ascontiguousarray(np.moveaxis(label, self.slice_axis, 0))

    def compute_ct_stats(self, ids: Optional[Iterable[str]] = None) -> Tuple[float, float]:
        """Set (and return) the CT ``(mean, std)`` from the windowed raw voxels of ``ids`` (default: all scans).

        Pass the training scan ids so test scans do not contribute. Clears the decoded-volume cache.
        """
        ids = self.ids if ids is None else [self._check_id(i) for i in ids]
        window = self.ct_window if self.ct_window is not None else DEFAULT_CT_WINDOW
        self.ct_stats = dataset_stats((self.read_raw_image(i) for i in ids), window)
        self._cache.clear()
        return self.ct_stats

    def slice_index(self, cache_dir: Optional[PathLike] = None) -> SliceIndex:
        """``SliceIndex`` built from the label files, cached in memory and as JSON in ``cache_dir``.

        The cache file is keyed by a hash of the folder and the reader settings that change labels (slice axis,
        label map, drop_unmapped, name) and stores every file's ``(name, size, mtime_ns)``; any change rebuilds
        the index (one label volume in memory at a time). ``cache_dir`` defaults to :func:`default_cache_dir`.
        An unwritable cache folder only produces a warning.
        """
        fp = self._fingerprint()
        if self._index is not None and self._index_fp == fp:
            return self._index
        key = self._cache_key()
        cpath = self._cache_path(cache_dir, key, ".json")
        index = self._read_index_cache(cpath, key, fp)
        if index is None:
            index = slice_index_from_labels(((i, self.load_label(i)) for i in self._ids), dataset=self.name)
            self.index_builds += 1
            payload = {"format": INDEX_FORMAT_VERSION, "key": key, "settings": self._cache_settings(),
                       "fingerprint": fp, "index": index.to_dict()}
            try:
                _atomic_write_text(cpath, json.dumps(payload))
            except OSError as e:
                warnings.warn(f"could not write slice-index cache {cpath}: {e}", RuntimeWarning, stacklevel=2)
        self._index, self._index_fp = index, fp
        return index

    def check_integrity(self, cache_dir: Optional[PathLike] = None) -> None:
        """Check every scan's image and label from their headers (voxels are never read); raise one ``DataError``
        listing all the problems.

        Checks, per scan: both files exist and their headers can be read (a dangling symbolic link or a corrupt
        header is reported with the file), image and label are 3-D (a trailing axis of length 1 is allowed, as
        when reading), their shapes agree, their affines agree within the tolerance the reader uses, and the
        label's dtype is one the reader accepts (bool, integers, real floats). Label *values* are only seen when
        the voxels are decoded: non-integer floats, NaN or unmapped values are still reported by ``load`` /
        ``load_label`` / ``slice_index``, and so is voxel data truncated behind an intact header.

        The error reads ``"<root>: N problem(s) in M scan(s): <file>: <problem>; <file>: <problem>; ..."``.

        A pass is remembered on this object and recorded next to the slice-index cache (``cache_dir``, default
        :func:`default_cache_dir`) under the same key and file fingerprint, so later calls (also from new objects)
        only ``stat`` the files until one of them changes (size or mtime). Failures are never cached. An
        unwritable cache folder only produces a warning.
        """
        try:
            fp: Optional[List[List[Any]]] = self._fingerprint()
        except DataError:
            fp = None  # a file vanished or is a dangling link: the checks below name it; nothing is cached
        if fp is not None and self._integrity_fp == fp:
            return
        key = self._cache_key()
        cpath = self._cache_path(cache_dir, key, ".integrity")
        if fp is not None and self._read_integrity_cache(cpath, key, fp):
            self._integrity_fp = fp
            return
        self.integrity_checks += 1
        problems: List[Tuple[str, str]] = []
        for sid in self._ids:
            problems.extend((sid, msg) for msg in self._scan_problems(*self._files[sid]))
        if problems:
            raise integrity_error(str(self.root), problems)
        if fp is None:
            return
        payload = {"format": INDEX_FORMAT_VERSION, "check": _INTEGRITY_VERSION, "key": key,
                   "settings": self._cache_settings(), "fingerprint": fp, "passed": True}
        try:
            _atomic_write_text(cpath, json.dumps(payload))
        except OSError as e:
            warnings.warn(f"could not write integrity-check cache {cpath}: {e}", RuntimeWarning, stacklevel=2)
        self._integrity_fp = fp

    # -- internals ----------------------------------------------------------------------------------------------
    def _read(self, scan_id: str) -> Volume:
        ipath, lpath = self._files[scan_id]
        return self._read_files(scan_id, ipath, lpath)

    @staticmethod
    def _scan_problems(ipath: Path, lpath: Optional[Path]) -> List[str]:
        """The ``"<file>: <problem>"`` messages of one scan, from its headers only (see :meth:`check_integrity`);
        the same helpers and wording as the read path (``_open``, ``_shape3``, ``_grid_mismatch``)."""
        problems: List[str] = []
        heads: List[Optional[Tuple[Tuple[int, int, int], np.ndarray]]] = []
        for path, is_label in ((ipath, False), (lpath, True)):
            heads.append(None)
            if path is None:  # an image without a label (read_volume)
                continue
            try:
                img = _open(path)  # a header nibabel cannot parse fails here, before affine and dtype are used
            except DataError as e:
                problems.append(str(e))
                continue
            try:
                heads[-1] = (_shape3(img, path), np.asarray(img.affine, dtype=np.float64))
            except DataError as e:
                problems.append(str(e))
            if is_label:
                try:
                    _check_label_dtype(img.get_data_dtype(), path)
                except DataError as e:
                    problems.append(str(e))
        if lpath is not None and heads[0] is not None and heads[1] is not None:
            why = _grid_mismatch(ipath, heads[0][0], heads[0][1], lpath, heads[1][0], heads[1][1])
            if why is not None:
                problems.append(f"{lpath}: {why}")
        return problems

    def _read_files(self, scan_id: str, ipath: Path, lpath: Optional[Path]) -> Volume:
        """Read one image (and its label unless ``lpath`` is None) into a normalised ``Volume``."""
        img = _open(ipath)
        shape = _shape3(img, ipath)
        aff = np.asarray(img.affine, dtype=np.float64)
        if lpath is None:
            return self._volume(scan_id, img, ipath, shape, aff, None, None)
        lab = _open(lpath)
        lshape = _shape3(lab, lpath)
        why = _grid_mismatch(ipath, shape, aff, lpath, lshape, np.asarray(lab.affine, dtype=np.float64))
        if why is not None:
            raise DataError(f"scan {scan_id!r}: {why}")
        return self._volume(scan_id, img, ipath, shape, aff, self._label_from(lab, lpath, shape), lpath)

    def _volume(self, scan_id: str, img: Any, ipath: Path, shape: Tuple[int, int, int], aff: np.ndarray,
                label: Optional[np.ndarray], lpath: Optional[Path]) -> Volume:
        raw = self._raw_from(img, ipath, shape)
        if self.normalise == "ct" and self.ct_stats is None:
            self.compute_ct_stats()
        image = normalise_volume(raw, self.normalise, ct_window=self.ct_window, stats=self.ct_stats)
        ax = self.slice_axis
        order = [ax] + [a for a in range(3) if a != ax]
        zooms = img.header.get_zooms()
        spacing = tuple(float(zooms[a]) if a < len(zooms) else 1.0 for a in order)
        meta = {
            "dataset": self.name,
            "label_names": dict(self.label_names),
            "header": img.header.copy(),
            "label_path": lpath,
            "file_shape": shape,
            "raw_dtype": str(img.get_data_dtype()),
        }
        return Volume(
            id=scan_id,
            image=np.ascontiguousarray(np.moveaxis(image, ax, 0)),
            label=None if label is None else np.ascontiguousarray(np.moveaxis(label, ax, 0)),
            spacing=spacing,  # type: ignore[arg-type]
            affine=aff,
            slice_axis=ax,
            path=ipath,
            meta=meta,
        )

    def _raw_from(self, img: Any, path: Path, shape: Tuple[int, int, int]) -> np.ndarray:
        raw = _decode(img, path, shape, as_float32=True)
        finite = np.isfinite(raw)
        if not finite.all():
            raise DataError(f"{path}: image contains {int((~finite).sum())} NaN/inf voxels")
        return raw

    def _label_from(self, lab: Any, path: Path, shape: Tuple[int, int, int]) -> np.ndarray:
        raw = _decode(lab, path, shape, as_float32=False)
        return _remap_labels(_cast_labels(raw, path), path, self.label_map, self.drop_unmapped)

    def _mapped_names(self, raw_names: Mapping[int, str]) -> Dict[int, str]:
        """Class names after ``label_map`` (several raw values mapped to one class are joined with '+')."""
        if self.label_map is None:
            return {int(k): v for k, v in sorted(raw_names.items()) if int(k) != 0}
        out: Dict[int, List[str]] = {}
        for raw, cls in sorted(self.label_map.items()):
            if cls != 0 and raw in raw_names:
                out.setdefault(cls, []).append(raw_names[raw])
        return {c: "+".join(n) for c, n in sorted(out.items())}

    def _fingerprint(self) -> List[List[Any]]:
        fp = []
        for i in self._ids:
            for p in self._files[i]:
                if p is not None:  # _FileSet: an image without a label
                    fp.append(_stat(p, self.root))
        for p in self._extra_files():
            if p.exists():
                fp.append(_stat(p, self.root))
        return fp

    def _cache_settings(self) -> Dict[str, Any]:
        return {
            "format": INDEX_FORMAT_VERSION,
            "reader": type(self).__name__,
            "root": str(self.root.resolve()),
            "name": self.name,
            "slice_axis": self.slice_axis,
            "label_map": None if self.label_map is None else sorted(self.label_map.items()),
            "drop_unmapped": self.drop_unmapped,
        }

    def _cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self._cache_settings(), sort_keys=True).encode()).hexdigest()

    def _cache_path(self, cache_dir: Optional[PathLike], key: str, suffix: str) -> Path:
        """``<cache_dir>/<name>-<key[:16]><suffix>`` (``.json``: the SliceIndex, ``.integrity``: a passed check)."""
        cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return cdir / f"{safe_file_name(self.name)}-{key[:16]}{suffix}"

    @staticmethod
    def _read_integrity_cache(cpath: Path, key: str, fp: List[List[Any]]) -> bool:
        """Whether ``cpath`` records a passed check of these files (same key, check version and fingerprint)."""
        if not cpath.is_file():
            return False
        try:
            payload = json.loads(cpath.read_text())
            return (payload.get("format") == INDEX_FORMAT_VERSION and payload.get("check") == _INTEGRITY_VERSION
                    and payload.get("key") == key and payload.get("fingerprint") == fp
                    and payload.get("passed") is True)
        except (OSError, ValueError, AttributeError):
            return False  # unreadable or stale record: check again

    @staticmethod
    def _read_index_cache(cpath: Path, key: str, fp: List[List[Any]]) -> Optional[SliceIndex]:
        if not cpath.is_file():
            return None
        try:
            payload = json.loads(cpath.read_text())
            if payload.get("format") != INDEX_FORMAT_VERSION or payload.get("key") != key:
                return None
            if payload.get("fingerprint") != fp:
                return None
            return SliceIndex.from_dict(payload["index"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # unreadable or stale cache: rebuild

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, name={self.name!r}, scans={len(self)})"


class AlpnetDataset(NiftiDataset):
    """SSL-ALPNet layout: ``image_<id>.nii.gz`` + ``label_<id>.nii.gz`` in one folder (ids natural-sorted).

    An optional ``labels.json`` (``{"1": "liver", ...}``; or ``label_names`` in the phantoms' ``phantom.json``)
    in the folder gives class names; ``label_names`` (``data.class_names``) replaces them, and is the way to
    name the classes of a folder without one (CHAOS-T2 as SSL-ALPNet ships it). See :class:`NiftiDataset` for
    the arguments.
    """

    layout = "alpnet"

    def _discover(self) -> Dict[str, Tuple[Path, Path]]:
        found: Dict[str, Dict[str, Path]] = {"image": {}, "label": {}}
        for p in self.root.iterdir():
            if p.name.startswith("."):
                continue
            m = _ALPNET_RE.fullmatch(p.name)
            if m is None or not _file_entry(p):  # a dangling link stays: check_integrity / load report it
                continue
            kind, sid = m.group(1), m.group(2)
            if sid in found[kind]:
                raise DataError(
                    f"{self.root}: scan id {sid!r} has two {kind} files: {found[kind][sid].name} and {p.name}"
                )
            found[kind][sid] = p
        images, labels = found["image"], found["label"]
        if not images:
            extra = f" (found {len(labels)} label_<id> files)" if labels else ""
            raise DataError(f"no image_<id>.nii.gz files in {self.root}{extra}")
        no_label = sorted(set(images) - set(labels), key=natural_key)
        if no_label:
            sid = no_label[0]
            raise DataError(
                f"{self.root}: scan id(s) {no_label} have an image but no label file; e.g. "
                f"{images[sid].name} has no label_{sid}.nii.gz"
            )
        no_image = sorted(set(labels) - set(images), key=natural_key)
        if no_image:
            sid = no_image[0]
            raise DataError(
                f"{self.root}: scan id(s) {no_image} have a label but no image file; e.g. "
                f"{labels[sid].name} has no image_{sid}.nii.gz"
            )
        return {sid: (images[sid], labels[sid]) for sid in images}

    def _raw_label_names(self) -> Dict[int, str]:
        """Names from ``labels.json`` (``{"1": "liver"}``) or ``phantom.json["label_names"]`` when present."""
        for fname, key in (("labels.json", None), ("phantom.json", "label_names")):
            path = self.root / fname
            if not path.is_file():
                continue
            try:
                raw = json.loads(path.read_text())
                if key is not None:
                    raw = raw.get(key) or {}
                return {int(k): str(v) for k, v in raw.items()}
            except (ValueError, AttributeError, TypeError) as e:
                raise DataError(f"{path}: expected class names as {{\"1\": \"name\", ...}}: {e}") from e
        return {}

    def _extra_files(self) -> List[Path]:
        return [self.root / "labels.json"]


class MSDDataset(NiftiDataset):
    """Medical Segmentation Decathlon / nnU-Net layout: ``imagesTr/``, ``labelsTr/``, ``dataset.json``.

    Scan ids are the label file names without extension (``hippocampus_001``). The training list comes from
    ``dataset.json["training"]`` when present, else from ``labelsTr/``; an image may carry nnU-Net's ``_0000``
    channel suffix (multi-channel cases are rejected). Class names come from ``dataset.json["labels"]`` unless
    ``label_names`` (``data.class_names``) is given, in which case those win. See :class:`NiftiDataset` for the
    arguments.
    """

    layout = "msd"

    def _dataset_json(self) -> Dict[str, Any]:
        path = self.root / "dataset.json"
        if not path.is_file():
            return {}
        try:
            meta = json.loads(path.read_text())
        except ValueError as e:
            raise DataError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(meta, dict):
            raise DataError(f"{path}: expected a JSON object at the top level")
        return meta

    def _image_for(self, sid: str, listed: Optional[Path]) -> Optional[Path]:
        """The image file of ``sid``: the listed path, or ``imagesTr/<sid>[_0000].nii[.gz]``."""
        imdir = self.root / "imagesTr"
        candidates = [listed] if listed is not None else []
        candidates += [imdir / f"{sid}{ext}" for ext in (".nii.gz", ".nii")]
        candidates += [imdir / f"{sid}_0000{ext}" for ext in (".nii.gz", ".nii")]
        for c in candidates:
            if c is not None and _file_entry(c):
                return c
        return None

    def _check_single_channel(self, sid: str) -> None:
        for ext in (".nii.gz", ".nii"):
            second = self.root / "imagesTr" / f"{sid}_0001{ext}"
            if os.path.lexists(second):
                raise DataError(
                    f"{self.root}: case {sid!r} has several channels ({second.name} ...); fewshot_proto reads "
                    f"single-channel 3-D volumes only"
                )

    def _discover(self) -> Dict[str, Tuple[Path, Path]]:
        meta = self._dataset_json()
        self._meta = meta
        ldir = self.root / "labelsTr"
        out: Dict[str, Tuple[Path, Path]] = {}
        training = meta.get("training")
        if isinstance(training, list) and training:
            djson = self.root / "dataset.json"
            for k, entry in enumerate(training):
                if not isinstance(entry, dict) or "label" not in entry or "image" not in entry:
                    raise DataError(f"{djson}: training entry {k} is not {{'image': ..., 'label': ...}}: {entry!r}")
                lpath = Path(os.path.normpath(self.root / str(entry["label"])))
                m = _NII_RE.fullmatch(lpath.name)
                if m is None:
                    raise DataError(f"{djson}: training entry {k}: label {entry['label']} is not a .nii/.nii.gz file")
                sid = m.group(1)
                if not _file_entry(lpath):  # a dangling link stays: check_integrity / load report it
                    raise DataError(
                        f"scan {sid!r}: label file {entry['label']} listed in {djson} does not exist")
                listed = Path(os.path.normpath(self.root / str(entry["image"])))
                ipath = self._image_for(sid, listed)
                if ipath is None:
                    raise DataError(
                        f"scan {sid!r}: image file {entry['image']} listed in {djson} does not exist "
                        f"(also looked for imagesTr/{sid}_0000.nii.gz)"
                    )
                self._check_single_channel(sid)
                if sid in out:
                    raise DataError(f"{djson}: scan {sid!r} is listed twice in 'training'")
                out[sid] = (ipath, lpath)
        else:
            if not ldir.is_dir():
                raise DataError(
                    f"{self.root}: no labelsTr/ folder (the MSD layout is imagesTr/, labelsTr/, dataset.json)")
            for lpath in sorted(ldir.iterdir()):
                m = _NII_RE.fullmatch(lpath.name)
                if lpath.name.startswith(".") or m is None:
                    continue
                sid = m.group(1)
                ipath = self._image_for(sid, None)
                if ipath is None:
                    raise DataError(
                        f"scan {sid!r}: label {lpath} has no image imagesTr/{sid}.nii.gz "
                        f"(or imagesTr/{sid}_0000.nii.gz)"
                    )
                self._check_single_channel(sid)
                out[sid] = (ipath, lpath)
            imdir = self.root / "imagesTr"
            if imdir.is_dir():
                used = {p for p, _ in out.values()}
                for ipath in sorted(imdir.iterdir()):
                    m = _NII_RE.fullmatch(ipath.name)
                    if ipath.name.startswith(".") or m is None or ipath in used:
                        continue
                    sid = re.sub(r"_\d{4}$", "", m.group(1))
                    if sid not in out:
                        raise DataError(f"scan {sid!r}: image {ipath} has no label labelsTr/{sid}.nii.gz")
        if not out:
            raise DataError(
                f"no labelled scans in {self.root}: dataset.json has no 'training' list and labelsTr/ holds no "
                f".nii.gz files"
            )
        return out

    def _raw_label_names(self) -> Dict[int, str]:
        labels = getattr(self, "_meta", {}).get("labels") or {}
        out: Dict[int, str] = {}
        if not isinstance(labels, dict):
            return out
        for k, v in labels.items():
            if isinstance(k, str) and k.strip().lstrip("-").isdigit():
                out[int(k)] = str(v)  # MSD: {"1": "Anterior"}
            elif isinstance(v, int) and not isinstance(v, bool):
                out[int(v)] = str(k)  # nnU-Net v2: {"Anterior": 1}
        return out

    def _extra_files(self) -> List[Path]:
        return [self.root / "dataset.json"]


# ----------------------------------------------------------------------------------------------------------------
# entry points


def detect_layout(root: PathLike) -> str:
    """``"msd"`` when ``root`` has ``dataset.json`` or ``imagesTr/``; ``"alpnet"`` when it has ``image_*.nii*``."""
    root = Path(root)
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
        return "msd"
    if any(_ALPNET_RE.fullmatch(p.name) and p.name.startswith("image_") for p in root.iterdir()):
        return "alpnet"
    raise DataError(
        f"cannot tell the layout of {root}: looked for dataset.json or imagesTr/ (MSD / nnU-Net layout) and for "
        f"image_<id>.nii.gz files (SSL-ALPNet layout), found neither"
    )


_LAYOUTS = {"alpnet": AlpnetDataset, "msd": MSDDataset}


def open_dataset(root: Optional[PathLike] = None, layout: str = "auto", **kw: Any) -> NiftiDataset:
    """Open a dataset folder; ``root=None`` opens the built-in synthetic phantoms (generated on first use).

    Args:
        root: dataset folder or ``None``.
        layout: ``"auto"`` (detect), ``"alpnet"`` or ``"msd"``.
        **kw: reader arguments (see :class:`NiftiDataset`).
    """
    if layout not in ("auto", *_LAYOUTS):
        raise ValueError(f"unknown layout {layout!r}; choose one of {['auto', *_LAYOUTS]}")
    if root is None:
        if layout == "msd":
            raise ValueError("the built-in phantoms use the SSL-ALPNet layout; layout='msd' needs a root folder")
        from fewshot_proto.data.phantom import ensure_phantoms

        kw.setdefault("name", "phantom")
        return AlpnetDataset(ensure_phantoms(), **kw)
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist or is not a folder")
    if layout == "auto":
        layout = detect_layout(root)
    return _LAYOUTS[layout](root, **kw)


def dataset_from_config(cfg: Any) -> NiftiDataset:
    """``open_dataset`` with the fields of a :class:`~fewshot_proto.config.DataConfig`.

    ``cfg.class_names`` (when not ``None``) becomes the dataset's ``label_names`` for every layout, replacing the
    names on disk (``dataset.json``, ``labels.json``, the phantoms' ``phantom.json``): the config wins."""
    class_names = getattr(cfg, "class_names", None)
    return open_dataset(
        cfg.root,
        cfg.layout,
        slice_axis=cfg.slice_axis,
        label_map=cfg.label_map,
        drop_unmapped=cfg.drop_unmapped,
        normalise=cfg.normalise,
        ct_window=None if cfg.ct_window is None else tuple(cfg.ct_window),
        cache_volumes=cfg.cache_volumes,
        label_names=None if class_names is None else {int(k): str(v) for k, v in class_names.items()},
    )


class _FileSet(NiftiDataset):
    """A NiftiDataset over explicitly named files (used by :func:`read_volume`)."""

    layout = "files"

    def __init__(self, files: Dict[str, Tuple[Path, Optional[Path]]], **kw: Any) -> None:
        self._given = files
        first = next(iter(files.values()))[0]
        super().__init__(first.parent, **kw)

    def _discover(self) -> Dict[str, Tuple[Path, Path]]:
        return self._given  # type: ignore[return-value]

    def _read(self, scan_id: str) -> Volume:
        ipath, lpath = self._files[scan_id]
        return self._read_files(scan_id, ipath, lpath)


def read_volume(image: PathLike, label: Optional[PathLike] = None, *, slice_axis: int = 2,
                label_map: Optional[Mapping[int, int]] = None, drop_unmapped: bool = False,
                normalise: str = "zscore", ct_window: Optional[Sequence[float]] = None,
                ct_stats: Optional[Tuple[float, float]] = None) -> Volume:
    """Read one NIfTI image (and optionally its label) with the same checks and normalisation as the datasets.

    The returned ``Volume`` has ``label=None`` when no label is given (a query to segment). Errors name the file.
    """
    ipath = Path(image).expanduser()
    lpath = None if label is None else Path(label).expanduser()
    for p in (ipath, lpath):
        if p is not None and not p.is_file():
            raise DataError(f"{p}: file does not exist")
    scan_id = re.sub(r"\.nii(\.gz)?$", "", ipath.name)
    ds = _FileSet({scan_id: (ipath, lpath)}, slice_axis=slice_axis, label_map=label_map,
                  drop_unmapped=drop_unmapped, normalise=normalise, ct_window=ct_window, cache_volumes=0,
                  ct_stats=ct_stats)
    if normalise == "ct" and ct_stats is None:
        raise DataError(f"{ipath}: normalise='ct' needs the training set's ct_stats (mean, std) for a single file")
    return ds.load(scan_id)


def write_prediction(pred_zhw: np.ndarray, like: Volume, out_path: PathLike) -> Path:
    """Write a label prediction ``[Z, H, W]`` as NIfTI on the grid of the scan ``like`` came from.

    The slice axis is moved back to ``like.slice_axis``; the file gets ``like.affine`` and a copy of the scan's
    header (``like.meta["header"]`` when present) with the data type set to uint8 (labels 0..255) or int16.
    Written to a temporary file in the target folder and renamed, so a crash never leaves a half-written file.

    Returns:
        the written path.
    """
    pred = np.asarray(pred_zhw)
    if pred.shape != like.image.shape:
        raise ValueError(f"prediction shape {pred.shape} != shape {like.image.shape} of scan {like.id!r}")
    if pred.dtype.kind not in "biu":
        raise ValueError(f"prediction for scan {like.id!r} must hold integer labels, got dtype {pred.dtype}")
    lo, hi = (int(pred.min()), int(pred.max())) if pred.size else (0, 0)
    if lo < 0 or hi > _INT16_MAX:
        raise ValueError(f"prediction labels for scan {like.id!r} must lie in 0..{_INT16_MAX}, got {lo}..{hi}")
    dtype = np.uint8 if hi <= 255 else np.int16
    return _write_like(pred.astype(dtype), like, out_path, cal=(0, hi), intent="label")


def write_probability(prob_zhw: np.ndarray, like: Volume, out_path: PathLike) -> Path:
    """Write a probability map ``[Z, H, W]`` (values in [0, 1]) as float32 NIfTI on the grid of the scan ``like``
    came from, as :func:`write_prediction` writes labels (``cal_min``/``cal_max`` 0 and 1, no intent)."""
    prob = np.asarray(prob_zhw, dtype=np.float32)
    if prob.shape != like.image.shape:
        raise ValueError(f"probability shape {prob.shape} != shape {like.image.shape} of scan {like.id!r}")
    return _write_like(prob, like, out_path, cal=(0.0, 1.0), intent="none")


def _write_like(arr_zhw: np.ndarray, like: Volume, out_path: PathLike, *, cal, intent: str) -> Path:
    """``arr_zhw`` with the slice axis moved back, ``like``'s affine and a copy of its header (the array's data
    type, no scaling, ``cal``, ``intent``), written to a temporary file beside ``out_path`` and renamed."""
    import nibabel as nib

    out = Path(out_path)
    if not (out.name.endswith(".nii.gz") or out.name.endswith(".nii")):
        raise ValueError(f"{out}: prediction files must end in .nii.gz or .nii")
    arr = np.ascontiguousarray(np.moveaxis(arr_zhw, 0, like.slice_axis))
    src = like.meta.get("header")
    if isinstance(src, nib.Nifti2Header):
        hdr, cls = src.copy(), nib.Nifti2Image
    elif isinstance(src, nib.Nifti1Header):
        hdr, cls = src.copy(), nib.Nifti1Image
    elif src is not None:
        hdr, cls = nib.Nifti1Header.from_header(src), nib.Nifti1Image
    else:
        hdr, cls = nib.Nifti1Header(), nib.Nifti1Image
    hdr.set_data_dtype(arr.dtype)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"], hdr["cal_max"] = cal
    hdr.set_intent(intent)
    img = cls(arr, np.asarray(like.affine, dtype=np.float64), header=hdr)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
    try:
        nib.save(img, str(tmp))
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
