"""Evaluation protocols of few-shot medical segmentation, as pure functions over a ``SliceIndex`` (no I/O).

The field's de-facto standard comes from SSL-ALPNet (Ouyang et al., ECCV 2020), where it is spread over
``dataloaders/ManualAnnoDatasetv2.py`` (folds, support scans, ``get_support``), ``dataloaders/common.py``
(``ValidationDataset.part_assign``) and ``validation.py`` (which slices are scored). ADNet (Hansen et al.,
MedIA 2022) and its descendants (Q-Net, RPT, ...) use a variant ("EP1"). This module writes the rules down once.

Folds (:func:`alpnet_folds`, :func:`fold_split`)
    Scan ids are sorted in natural order and cut into ``n_folds`` contiguous folds (CHAOS-T2: 20 scans ->
    ``[0:4] [4:8] ... [16:20]``, SSL-ALPNet's ``_SEP``). When the count does not divide evenly the first
    ``len % n_folds`` folds get one scan more. For query fold ``f`` the ``k`` support scans are the ``k``
    scans that follow the fold in circular order: the first ``k`` of fold ``f+1``, and when ``k`` exceeds
    that fold's size the next ones from fold ``f+2`` (SSL-ALPNet's circular indexing does the same; here it
    is the documented rule, so 5-shot works with 4 scans per fold). Support scans are never queries and
    never trained on; the training scans are all the others. ``k`` may not exceed the number of scans
    outside the query fold (:class:`ProtocolError`).

Support slices (:func:`support_slice_positions`)
    For ``n_part`` chunks, chunk ``p`` takes the support organ's slice at relative position
    ``pct_p = (2p+1) / (2 n_part)`` of the sorted list ``zs`` of slices containing the organ
    (1/2 for ``n_part=1``; 1/6, 1/2, 5/6 for ``n_part=3``), indexed as ``zs[int(pct_p * len(zs))]``
    exactly as SSL-ALPNet's ``get_support`` (and ADNet's ``get_support_index``) do, with ``pct_p`` computed
    in floating point as ``1/(2n) + p * (1 - 1/n)/(n - 1)``. (For ``n_part <= 7`` and up to 400 slices that
    equals the exact ``floor((2p+1) * len(zs) / (2 n_part))``; the tests pin both.) Fewer organ slices than
    chunks is allowed: chunks then share slices.

Query slices and chunks (:func:`query_chunks`), per protocol (``PROTOCOLS``)
    ``alpnet``
        Every slice of the query organ's z-slab ``[zmin, zmax]`` (also slices inside the slab where the
        organ is absent), the slab being taken from the query's ground truth (SSL-ALPNet ``validation.py``
        scores ``zmin - z_margin <= z <= zmax + z_margin`` with ``z_margin = 0``). Slice ``z`` belongs to
        chunk ``int((z - zmin) // ((zmax - zmin) / n_part))`` clamped to ``[0, n_part - 1]``, chunk 0 when
        ``zmax == zmin`` (SSL-ALPNet's ``part_assign``; the float division is kept on purpose: for some
        ``n_part`` such as 6 it differs from exact arithmetic at chunk boundaries, and we match the reference).
    ``adnet-ep1``
        Only the ``C`` ground-truth-positive slices of the query organ, in order; their positions are split
        by ``np.linspace(0, C, n_part + 1).astype(int)`` and position ``j`` is in chunk ``p`` when
        ``edges[p] <= j < edges[p+1]`` (ADNet ``main_inference.py``, ``EP1``).
    ``full-volume``
        Every slice of the query scan (no ground-truth z-range leaks into the prediction). Chunks use the
        ``alpnet`` rule; slices below the slab fall into chunk 0 and above it into chunk ``n_part - 1``
        (exactly what ``part_assign``'s clamp does).

    In all three, query chunk ``p`` is segmented with support slice ``p`` of every support scan.

Settings (:func:`training_slices`)
    Setting 1: training may see test classes, as background (every slice is usable; the masks of the
    training classes are binary, so test organs are background). Setting 2: every slice that contains ANY
    test class is excluded from training. SSL-ALPNet excludes a slice when any excluded class is in it
    (``ManualAnnoDataset.__getitem__``). The ADNet line (e.g. Q-Net ``dataloaders/datasets.py``,
    ``TrainDataset.__getitem__``, which ANDs the per-class masks) drops only slices containing ALL test
    classes, so a slice showing only the left kidney still trains a "kidneys held out" model; pass
    ``exclusion="all"`` to reproduce that for comparison. Abdominal MRI (CHAOS labels 1 liver, 2 right
    kidney, 3 left kidney, 4 spleen) uses test groups {2, 3} and {1, 4} (:data:`ABDOMEN_TEST_GROUPS`).

Episodes (:func:`build_eval_episodes`)
    One :class:`EpisodeSpec` per (test class, query scan). For N-way evaluation the specs of several classes
    share the same query scans; :func:`group_by_query` groups them so an engine can load each query volume
    once and run every class on it. Query scans that do not contain the class are skipped (there is no slab
    to score; ``on_missing="error"`` raises instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from fewshot_proto.config import N_PART
from fewshot_proto.errors import ProtocolError
from fewshot_proto.registry import Registry
from fewshot_proto.types import SliceIndex, natural_key

__all__ = [
    "GENERATOR_VERSION",
    "PROTOCOLS",
    "ABDOMEN_TEST_GROUPS",
    "EpisodeSpec",
    "FoldSplit",
    "alpnet_folds",
    "fold_split",
    "support_slice_positions",
    "support_percentages",
    "part_assign",
    "query_chunks",
    "training_slices",
    "allowed_training_slices",
    "train_classes_for",
    "build_eval_episodes",
    "group_by_query",
]

#: Bump when a rule in this module changes the episodes it generates (stored in manifests).
GENERATOR_VERSION = 1

#: Test-class groups on abdominal MRI (CHAOS-T2 labels): kidneys held out, or liver + spleen held out.
ABDOMEN_TEST_GROUPS: Dict[str, Tuple[int, ...]] = {"kidneys": (2, 3), "liver_spleen": (1, 4)}


# --------------------------------------------------------------------------------------------- data types
@dataclass(frozen=True)
class FoldSplit:
    """The scans of one fold: queries, supports (the ``shots`` scans after the fold, circular), training scans."""

    query_scans: List[str]
    support_scans: List[str]
    train_scans: List[str]


@dataclass
class EpisodeSpec:
    """One evaluation episode: segment ``class_id`` in ``query_scan`` given the support slices.

    Attributes:
        dataset, protocol, fold, setting, shots, n_part: the protocol parameters it was built with.
        class_id: the test class (label value).
        support: one ``(scan_id, [z of chunk 0, ..., z of chunk n_part-1])`` per shot.
        query_scan: the query scan id.
        query_z: the query slices to predict and score, ascending.
        query_chunk: for each ``query_z``, the chunk (= which support slice of each shot to use).
    """

    dataset: str
    protocol: str
    fold: int
    setting: int
    shots: int
    class_id: int
    support: List[Tuple[str, List[int]]]
    query_scan: str
    query_z: List[int]
    query_chunk: List[int]
    n_part: int

    def __post_init__(self) -> None:
        if len(self.query_z) != len(self.query_chunk):
            raise ProtocolError(
                f"episode {self.key}: query_z has {len(self.query_z)} slices but query_chunk has "
                f"{len(self.query_chunk)}"
            )
        if len(self.support) != self.shots:
            raise ProtocolError(f"episode {self.key}: {self.shots}-shot but {len(self.support)} support scans")
        for scan, zs in self.support:
            if len(zs) != self.n_part:
                raise ProtocolError(
                    f"episode {self.key}: support scan {scan!r} has {len(zs)} slices, expected n_part={self.n_part}"
                )

    @property
    def key(self) -> Tuple[int, int, str]:
        """``(fold, class_id, query_scan)``: unique inside one manifest."""
        return (int(self.fold), int(self.class_id), str(self.query_scan))

    @property
    def support_scans(self) -> List[str]:
        return [s for s, _ in self.support]

    def chunk_slices(self, chunk: int) -> List[int]:
        """The query slices of one chunk."""
        return [z for z, c in zip(self.query_z, self.query_chunk) if c == chunk]

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready dict with a fixed key order."""
        return {
            "dataset": self.dataset,
            "protocol": self.protocol,
            "fold": int(self.fold),
            "setting": int(self.setting),
            "shots": int(self.shots),
            "n_part": int(self.n_part),
            "class_id": int(self.class_id),
            "support": [[str(s), [int(z) for z in zs]] for s, zs in self.support],
            "query_scan": str(self.query_scan),
            "query_z": [int(z) for z in self.query_z],
            "query_chunk": [int(c) for c in self.query_chunk],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EpisodeSpec":
        return cls(
            dataset=str(d["dataset"]),
            protocol=str(d["protocol"]),
            fold=int(d["fold"]),
            setting=int(d["setting"]),
            shots=int(d["shots"]),
            class_id=int(d["class_id"]),
            support=[(str(s), [int(z) for z in zs]) for s, zs in d["support"]],
            query_scan=str(d["query_scan"]),
            query_z=[int(z) for z in d["query_z"]],
            query_chunk=[int(c) for c in d["query_chunk"]],
            n_part=int(d["n_part"]),
        )


# ------------------------------------------------------------------------------------------------- folds
def alpnet_folds(scan_ids: Sequence[str], n_folds: int = 5) -> List[List[str]]:
    """Cut the natural-sorted ``scan_ids`` into ``n_folds`` contiguous folds.

    Sizes differ by at most one, larger folds first (``np.array_split``): 20 scans -> 4 x 5.

    Raises:
        ProtocolError: ``n_folds < 2`` (the support of fold f comes from fold f+1, so one fold cannot work)
            or fewer scans than folds.
    """
    ids = sorted((str(s) for s in scan_ids), key=natural_key)
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"duplicate scan ids in {ids}")
    if int(n_folds) < 2:
        raise ProtocolError(f"n_folds must be >= 2 (support scans come from the next fold), got {n_folds}")
    if len(ids) < n_folds:
        raise ProtocolError(f"{len(ids)} scans cannot be cut into {n_folds} folds: {ids}")
    base, extra = divmod(len(ids), int(n_folds))
    out, start = [], 0
    for f in range(int(n_folds)):
        size = base + (1 if f < extra else 0)
        out.append(ids[start:start + size])
        start += size
    return out


def fold_split(index: SliceIndex, fold: int, n_folds: int = 5, shots: int = 1) -> FoldSplit:
    """Query, support and training scans of ``fold`` (see the module docstring for the rule).

    Raises:
        ProtocolError: bad ``fold`` / ``shots``, or fewer than ``shots`` scans outside the query fold.
    """
    folds = alpnet_folds(index.scan_ids, n_folds)
    if not 0 <= int(fold) < n_folds:
        raise ProtocolError(f"dataset {index.dataset!r}: fold {fold} out of range 0..{n_folds - 1}")
    if int(shots) < 1:
        raise ProtocolError(f"shots must be >= 1, got {shots}")
    after = [s for k in range(1, n_folds) for s in folds[(int(fold) + k) % n_folds]]
    if shots > len(after):
        raise ProtocolError(
            f"dataset {index.dataset!r}: {shots}-shot evaluation of fold {fold} needs {shots} support scans "
            f"outside the query fold, but only {len(after)} exist; use at most {len(after)} shots"
        )
    query = list(folds[int(fold)])
    support = list(after[: int(shots)])
    excluded = set(query) | set(support)
    train = [s for s in index.scan_ids if s not in excluded]
    return FoldSplit(query_scans=query, support_scans=support, train_scans=train)


# ------------------------------------------------------------------------------------- support and query
def support_percentages(n_part: int) -> List[float]:
    """Relative positions of the support slices, computed as SSL-ALPNet does (floats)."""
    n = int(n_part)
    if n < 1:
        raise ProtocolError(f"n_part must be >= 1, got {n_part}")
    if n == 1:
        return [0.5]
    half = 1 / (n * 2)
    step = (1.0 - 1.0 / n) / (n - 1)
    return [half + step * p for p in range(n)]


def support_slice_positions(zs_sorted: Sequence[int], n_part: int) -> List[int]:
    """The support slice (a z value from ``zs_sorted``) for each of the ``n_part`` chunks.

    ``zs_sorted[int(pct_p * len(zs_sorted))]`` with ``pct_p`` from :func:`support_percentages`.
    Example: ``zs = range(10, 22)`` (12 slices), ``n_part=3`` -> indices 2, 6, 10 -> ``[12, 16, 20]``;
    ``n_part=1`` -> index 6 -> ``[16]``.

    Raises:
        ProtocolError: empty ``zs_sorted`` or ``n_part < 1``.
    """
    zs = [int(z) for z in zs_sorted]
    if not zs:
        raise ProtocolError("support organ has no slices")
    if any(b <= a for a, b in zip(zs, zs[1:])):
        raise ProtocolError(f"support slices must be sorted and unique, got {zs}")
    return [zs[int(p * len(zs))] for p in support_percentages(n_part)]


def part_assign(z: int, zmin: int, zmax: int, n_part: int) -> int:
    """SSL-ALPNet's chunk of slice ``z`` for an organ spanning ``[zmin, zmax]``, clamped to ``[0, n_part-1]``."""
    if zmax == zmin:
        return 0
    p = int((z - zmin) // ((zmax - zmin) / n_part))
    return min(max(p, 0), n_part - 1)


def _chunks_alpnet(query_zs: Sequence[int], n_part: int, n_slices: Optional[int]) -> Tuple[List[int], List[int]]:
    zmin, zmax = min(query_zs), max(query_zs)
    zs = list(range(zmin, zmax + 1))
    return zs, [part_assign(z, zmin, zmax, n_part) for z in zs]


def _chunks_adnet_ep1(query_zs: Sequence[int], n_part: int, n_slices: Optional[int]) -> Tuple[List[int], List[int]]:
    zs = sorted(int(z) for z in query_zs)
    edges = np.linspace(0, len(zs), n_part + 1).astype(int)
    chunks = [0] * len(zs)
    for p in range(n_part):
        for j in range(int(edges[p]), int(edges[p + 1])):
            chunks[j] = p
    return zs, chunks


def _chunks_full_volume(query_zs: Sequence[int], n_part: int, n_slices: Optional[int]) -> Tuple[List[int], List[int]]:
    if n_slices is None or int(n_slices) < 1:
        raise ProtocolError("protocol 'full-volume' needs the query scan's slice count (n_slices)")
    if max(query_zs) >= n_slices:
        raise ProtocolError(f"query organ slice {max(query_zs)} is outside a scan of {n_slices} slices")
    zmin, zmax = min(query_zs), max(query_zs)
    zs = list(range(int(n_slices)))
    return zs, [part_assign(z, zmin, zmax, n_part) for z in zs]


#: Protocol name -> ``fn(query_zs, n_part, n_slices) -> (query_z, query_chunk)``.
PROTOCOLS = Registry("protocol")
PROTOCOLS.add("alpnet", _chunks_alpnet)
PROTOCOLS.add("adnet-ep1", _chunks_adnet_ep1)
PROTOCOLS.add("full-volume", _chunks_full_volume)


def _protocol_fn(protocol: str) -> Callable[..., Tuple[List[int], List[int]]]:
    if protocol not in PROTOCOLS:
        raise ProtocolError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS.names())}")
    return PROTOCOLS.get(protocol)


def query_chunks(query_zs: Sequence[int], n_part: int, protocol: str = "alpnet",
                 n_slices: Optional[int] = None) -> Tuple[List[int], List[int]]:
    """Query slices to predict/score and the chunk of each, under ``protocol``.

    Args:
        query_zs: sorted slices of the query scan that contain the class (its ground truth).
        n_part: number of chunks.
        protocol: ``"alpnet"``, ``"adnet-ep1"`` or ``"full-volume"``.
        n_slices: the query scan's slice count (required by ``"full-volume"``).

    Returns:
        ``(zs, chunks)``: two lists of equal length; ``zs`` ascending.
    """
    fn = _protocol_fn(protocol)
    if int(n_part) < 1:
        raise ProtocolError(f"n_part must be >= 1, got {n_part}")
    if len(query_zs) == 0:
        raise ProtocolError("query organ has no slices")
    return fn([int(z) for z in query_zs], int(n_part), n_slices)


# ---------------------------------------------------------------------------------------------- settings
def _check_setting(setting: int) -> int:
    if int(setting) not in (1, 2):
        raise ProtocolError(f"setting must be 1 or 2, got {setting}")
    return int(setting)


def training_slices(index: SliceIndex, scan: str, setting: int, test_classes: Iterable[int],
                    train_classes: Optional[Iterable[int]] = None, exclusion: str = "any") -> List[int]:
    """Slices of ``scan`` that training may use, ascending.

    Args:
        setting: 1 keeps every slice (test classes become background); 2 drops slices with test classes.
        test_classes: the held-out classes.
        train_classes: when given, keep only slices containing at least one of them (what a labelled
            sampler can use); ``None`` keeps slices without foreground too (superpixel training).
        exclusion: ``"any"`` (correct: drop a slice containing any test class) or ``"all"`` (the ADNet-line
            code: drop only slices containing every test class). Only used in Setting 2.
    """
    setting = _check_setting(setting)
    scan = str(scan)
    if scan not in index.n_slices:
        raise ProtocolError(f"dataset {index.dataset!r} has no scan {scan!r}")
    zs = set(range(index.n_slices[scan]))
    if train_classes is not None:
        zs &= set(index.slices_with_any(train_classes, scan))
    tests = [int(c) for c in test_classes]
    if setting == 2 and tests:
        if exclusion == "any":
            zs -= set(index.slices_with_any(tests, scan))
        elif exclusion == "all":
            common = set(index.slices(tests[0], scan))
            for c in tests[1:]:
                common &= set(index.slices(c, scan))
            zs -= common
        else:
            raise ProtocolError(f"exclusion must be 'any' or 'all', got {exclusion!r}")
    return sorted(zs)


def allowed_training_slices(index: SliceIndex, scans: Iterable[str], setting: int, test_classes: Iterable[int],
                            train_classes: Optional[Iterable[int]] = None,
                            exclusion: str = "any") -> Dict[str, List[int]]:
    """:func:`training_slices` for several scans: ``{scan: [z, ...]}`` (scans left with no slice are dropped)."""
    tests = list(test_classes)
    trains = None if train_classes is None else list(train_classes)
    out = {}
    for s in scans:
        zs = training_slices(index, s, setting, tests, trains, exclusion)
        if zs:
            out[str(s)] = zs
    return out


def train_classes_for(index: SliceIndex, test_classes: Iterable[int]) -> List[int]:
    """Every class of ``index`` that is not a test class."""
    tests = {int(c) for c in test_classes}
    return [c for c in index.classes if c not in tests]


# ---------------------------------------------------------------------------------------------- episodes
def build_eval_episodes(index: SliceIndex, protocol: str = "alpnet", fold: int = 0, n_folds: int = 5,
                        shots: int = 1, n_part: int = N_PART, test_classes: Sequence[int] = (2, 3),
                        setting: int = 2, on_missing: str = "skip") -> List[EpisodeSpec]:
    """Evaluation episodes of one fold: one :class:`EpisodeSpec` per (test class, query scan).

    Ordered by class, then query scan (natural order). ``setting`` does not change evaluation episodes (it
    governs training) but is recorded in each spec.

    Args:
        on_missing: what to do with a query scan lacking the class: ``"skip"`` it or raise (``"error"``).

    Raises:
        ProtocolError: unknown protocol, bad parameters, a test class no scan has, a support scan lacking
            the class, too few scans for ``n_folds`` / ``shots``. Messages name the dataset, class and scan.
    """
    _protocol_fn(protocol)
    setting = _check_setting(setting)
    if int(n_part) < 1:
        raise ProtocolError(f"n_part must be >= 1, got {n_part}")
    if on_missing not in ("skip", "error"):
        raise ProtocolError(f"on_missing must be 'skip' or 'error', got {on_missing!r}")
    classes = [int(c) for c in test_classes]
    if not classes:
        raise ProtocolError(f"dataset {index.dataset!r}: no test classes given")
    if len(set(classes)) != len(classes):
        raise ProtocolError(f"dataset {index.dataset!r}: duplicate test classes {classes}")
    for c in classes:
        if not index.scans_with(c):
            raise ProtocolError(
                f"dataset {index.dataset!r}: test class {c} is not present in any scan; "
                f"available classes: {index.classes}"
            )
    split = fold_split(index, fold, n_folds, shots)
    specs: List[EpisodeSpec] = []
    for c in classes:
        support = []
        for s in split.support_scans:
            zs = index.slices(c, s)
            if not zs:
                raise ProtocolError(
                    f"dataset {index.dataset!r}: support scan {s!r} (a support of fold {fold}) has no slice "
                    f"with class {c}; fold {fold} cannot be evaluated for class {c}"
                )
            support.append((s, support_slice_positions(zs, n_part)))
        for q in split.query_scans:
            zs = index.slices(c, q)
            if not zs:
                if on_missing == "error":
                    raise ProtocolError(f"dataset {index.dataset!r}: query scan {q!r} has no slice with class {c}")
                continue
            qz, qc = query_chunks(zs, n_part, protocol, index.n_slices[q])
            specs.append(EpisodeSpec(
                dataset=index.dataset, protocol=protocol, fold=int(fold), setting=setting, shots=int(shots),
                class_id=c, support=[(s, list(z)) for s, z in support], query_scan=q, query_z=qz,
                query_chunk=qc, n_part=int(n_part),
            ))
    return specs


def group_by_query(specs: Iterable[EpisodeSpec]) -> Dict[Tuple[int, str], List[EpisodeSpec]]:
    """Group specs by ``(fold, query_scan)`` (first-seen order) for N-way evaluation.

    Each group holds the specs of every test class on that query scan: load the query volume once, run one
    binary episode per class (or stack the classes' supports for a multi-way model), and resolve overlaps
    per voxel (e.g. argmax over the classes' foreground scores) before scoring.
    """
    out: Dict[Tuple[int, str], List[EpisodeSpec]] = {}
    for s in specs:
        out.setdefault((int(s.fold), str(s.query_scan)), []).append(s)
    return out
