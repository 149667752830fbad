"""Training episode samplers. Each owns an ``np.random.Generator`` (``self.rng``), never the global RNGs.

- :class:`LabelledEpisodeSampler`: a training class, a support scan and a different query scan containing it,
  slices at the same relative position within the organ's (allowed) slices, binary masks of that class.
- :class:`SuperpixelEpisodeSampler`: SSL-ALPNet's self-supervision: one Felzenszwalb superpixel of a random
  slice is the pseudo-label; support and query are two independent augmentations of that slice and mask.
- :class:`MixedSampler`: picks one of several samplers per episode with fixed probabilities.

All samplers read ``self.rng`` at every draw, so a caller may replace it between episodes: the engine's one
episode stream (``fewshot_proto.engine.stream.EpisodeSource``, in a prefetch thread or DataLoader workers) draws
episode ``i`` with ``default_rng([seed, rank, i])``; :class:`MixedSampler` exposes its children as ``samplers``.
Slices are resized by ``fewshot_proto.data.transforms`` (torch), so importing this module imports torch.

Every sampler returns an :class:`~fewshot_proto.types.Episode` with float32 images ``[N, 3, size, size]``,
support masks float32 ``[S, size, size]`` in {0, 1} and query masks int64 ``[Q, size, size]``; ``meta`` records
``kind``, ``class_id``, ``support_scans``/``support_z`` (one entry per support slice), ``query_scan``,
``query_z``, ``shots``.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from fewshot_proto.data.augment import augment_pair
from fewshot_proto.data.superpixel import body_mask, superpixel_pseudolabel, superpixels
from fewshot_proto.data.transforms import prepare_slices
from fewshot_proto.errors import ProtocolError
from fewshot_proto.types import Episode, SliceIndex

from .protocol import training_slices

__all__ = ["LabelledEpisodeSampler", "SuperpixelEpisodeSampler", "MixedSampler", "SliceCache"]


def _check_rng(rng: Any, who: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{who}: rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


def _tile3(img2d: np.ndarray) -> np.ndarray:
    """``[H, W]`` -> float32 ``[3, H, W]`` (grey value repeated for ImageNet-style encoders)."""
    return np.repeat(np.asarray(img2d, dtype=np.float32)[None], 3, axis=0)


class _ByteLRU:
    """An LRU mapping bounded by the total ``nbytes`` of its values (tuples of arrays or ``None``)."""

    def __init__(self, max_bytes: float) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: "OrderedDict[Any, Tuple[Optional[np.ndarray], ...]]" = OrderedDict()
        self.nbytes = 0

    @staticmethod
    def _size(value: Tuple[Optional[np.ndarray], ...]) -> int:
        return sum(int(a.nbytes) for a in value if a is not None)

    def get(self, key: Any) -> Optional[Tuple[Optional[np.ndarray], ...]]:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Any, value: Tuple[Optional[np.ndarray], ...]) -> None:
        if key in self._items:
            self.nbytes -= self._size(self._items.pop(key))
        self._items[key] = value
        self.nbytes += self._size(value)
        while self.nbytes > self.max_bytes and self._items:
            self.nbytes -= self._size(self._items.popitem(last=False)[1])

    def __len__(self) -> int:
        return len(self._items)


def _compact_labels(lab: np.ndarray) -> np.ndarray:
    """Labels in the smallest safe integer type (uint8 for ids 0..255, else int16 when they fit) to keep caches
    small (a 256x256 label is 64 KiB in uint8 against 512 KiB as the int64 ``prepare_slices`` returns)."""
    if not lab.size:
        return lab.astype(np.uint8, copy=False)
    lo, hi = lab.min(), lab.max()
    if lo >= 0 and hi <= np.iinfo(np.uint8).max:
        return lab.astype(np.uint8, copy=False)
    if lo >= np.iinfo(np.int16).min and hi <= np.iinfo(np.int16).max:
        return lab.astype(np.int16, copy=False)
    return lab


class SliceCache:
    """Resized slices ``(scan, z) -> (grey image [size, size] float32, label [size, size] uint8 | None)`` (int16
    or wider only for label ids beyond 0..255).

    Decoding a volume costs far more than everything else in an episode (0.35 s for a CHAOS-T2 scan), and the
    dataset keeps only a few decoded volumes, so a miss on ``(scan, z)`` resizes and stores, from that one
    decode, every slice of ``wanted[scan]`` (the slices the sampler may ever draw from that scan; just ``z`` when
    the scan is not listed). Entries are evicted least-recently-used beyond ``max_mb`` megabytes.
    """

    def __init__(self, dataset: Any, size: int, wanted: Optional[Mapping[str, Iterable[int]]] = None,
                 max_mb: float = 512.0) -> None:
        self.dataset = dataset
        self.size = int(size)
        self.wanted: Dict[str, List[int]] = {}
        self.want(wanted or {})
        self._lru = _ByteLRU(float(max_mb) * 2 ** 20)
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes

    def want(self, wanted: Mapping[str, Iterable[int]]) -> "SliceCache":
        """Add slices to ``wanted`` (a cache shared by several samplers resizes what any of them may draw)."""
        for k, v in wanted.items():
            self.wanted[str(k)] = sorted(set(self.wanted.get(str(k), [])) | {int(z) for z in v})
        return self

    def get(self, scan: str, z: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        key = (str(scan), int(z))
        item = self._lru.get(key)
        if item is not None:
            self.hits += 1
            return item  # type: ignore[return-value]
        self.misses += 1
        vol = self.dataset.load(key[0])
        if not 0 <= key[1] < vol.n_slices:
            raise ProtocolError(f"dataset {getattr(self.dataset, 'name', '?')!r}: scan {key[0]!r} has "
                                f"{vol.n_slices} slices, asked for z={key[1]}")
        zs = [z for z in self.wanted.get(key[0], []) if z != key[1] and 0 <= z < vol.n_slices] + [key[1]]
        img, lab = prepare_slices(vol, zs, self.size, channels=1)
        for i, zz in enumerate(zs):  # the requested slice goes in last, so it survives any eviction
            self._lru.put((key[0], zz), (np.ascontiguousarray(img[i, 0], dtype=np.float32),
                                         None if lab is None else _compact_labels(np.asarray(lab[i]))))
        return (np.ascontiguousarray(img[-1, 0], dtype=np.float32),
                None if lab is None else _compact_labels(np.asarray(lab[-1])))


def _slice_cache(cache: Optional[SliceCache], dataset: Any, size: int, wanted: Mapping[str, Iterable[int]],
                 cache_mb: float) -> SliceCache:
    """``cache`` (checked against ``dataset`` and ``size``, with ``wanted`` added) or a new ``SliceCache``."""
    if cache is None:
        return SliceCache(dataset, size, wanted, cache_mb)
    if cache.dataset is not dataset or cache.size != int(size):
        raise ValueError(f"a shared SliceCache must hold the sampler's dataset at size {size}, got one of "
                         f"{getattr(cache.dataset, 'name', '?')!r} at size {cache.size}")
    return cache.want(wanted)


class _Augmenting:
    """Shared augmentation helper: ``augment_pair`` on one grey slice + binary mask, driven by ``self.rng``."""

    rng: np.random.Generator
    augment: bool
    augment_kwargs: Dict[str, Any]

    def _pair(self, img2d: np.ndarray, mask2d: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Augmented ``(image [3,H,W] f32, mask [H,W] uint8 0/1)``; identical geometry on image and mask."""
        m = (np.asarray(mask2d) > 0).astype(np.uint8)
        if self.augment:
            img2d, m = augment_pair(img2d, m, self.rng, **self.augment_kwargs)
            m = (np.asarray(m) > 0.5).astype(np.uint8)
        return _tile3(img2d), m


class LabelledEpisodeSampler(_Augmenting):
    """Episodes from ground-truth labels of the training scans.

    Per episode: a training class ``c`` (uniform over the classes usable under the setting), a query scan and
    ``shots`` support scans, all containing ``c`` in allowed slices, with the query scan different from every
    support scan (support scans are distinct while enough scans exist, else drawn with replacement). One
    relative position ``u ~ U[0, 1)`` picks, in each scan, the slice ``zs[int(u * len(zs))]`` of the sorted
    allowed slices containing ``c`` (the organ's z-range restricted to what the setting allows). With
    ``n_query > 1`` the query slices are the ``n_query`` consecutive allowed slices centred there.

    Setting 1: every slice is allowed and test classes are background in the binary masks. Setting 2: slices
    containing any test class are never used (:func:`~fewshot_proto.episodes.protocol.training_slices`).

    Args:
        dataset: the dataset (``load(scan) -> Volume``).
        index: its SliceIndex.
        train_scans: scans training may use (from ``fold_split``).
        train_classes: classes to sample; must not overlap ``test_classes``.
        setting, test_classes: see the protocol module.
        shots, n_query: support and query slices per episode.
        size: output size (slices are resized to ``size x size``).
        augment: apply ``fewshot_proto.data.augment.augment_pair`` to each image independently.
        rng: the sampler's generator.
        min_fg_pixels: re-draw (up to ``max_tries`` times) an episode whose support or query masks end up with
            fewer foreground pixels than this after resizing and augmentation.
        augment_kwargs: passed to ``augment_pair``.
        cache_mb: memory for the sampler's cache of resized slices (:class:`SliceCache`).
        cache: a :class:`SliceCache` of this ``dataset`` at this ``size`` to use instead of a new one (``cache_mb`` is
            then ignored); ``MixedSampler``'s parts share one, so a slice is decoded, resized and stored once.
    """

    def __init__(self, dataset: Any, index: SliceIndex, train_scans: Sequence[str], train_classes: Sequence[int], *,
                 setting: int, test_classes: Sequence[int], shots: int = 1, n_query: int = 1, size: int = 256,
                 augment: bool = True, rng: np.random.Generator, min_fg_pixels: int = 1, max_tries: int = 20,
                 augment_kwargs: Optional[Mapping[str, Any]] = None, cache_mb: float = 512.0,
                 cache: Optional[SliceCache] = None) -> None:
        self.rng = _check_rng(rng, "LabelledEpisodeSampler")
        if int(shots) < 1 or int(n_query) < 1:
            raise ValueError(f"shots and n_query must be >= 1, got shots={shots}, n_query={n_query}")
        self.dataset, self.index = dataset, index
        self.setting = int(setting)
        self.test_classes = [int(c) for c in test_classes]
        self.train_classes = [int(c) for c in train_classes]
        clash = sorted(set(self.train_classes) & set(self.test_classes))
        if clash:
            raise ProtocolError(f"dataset {index.dataset!r}: classes {clash} are both training and test classes")
        self.train_scans = [str(s) for s in train_scans]
        unknown = [s for s in self.train_scans if s not in index.n_slices]
        if unknown:
            raise ProtocolError(f"dataset {index.dataset!r} has no scan(s) {unknown}")
        self.shots, self.n_query, self.size = int(shots), int(n_query), int(size)
        self.augment = bool(augment)
        self.augment_kwargs = dict(augment_kwargs or {})
        self.min_fg_pixels, self.max_tries = int(min_fg_pixels), max(1, int(max_tries))
        # class -> scan -> allowed slices containing the class (ascending)
        self.candidates: Dict[int, Dict[str, List[int]]] = {}
        for c in self.train_classes:
            per_scan = {}
            for s in self.train_scans:
                zs = training_slices(index, s, self.setting, self.test_classes, train_classes=[c])
                if zs:
                    per_scan[s] = zs
            if len(per_scan) >= 2:
                self.candidates[c] = per_scan
        if not self.candidates:
            raise ProtocolError(
                f"dataset {index.dataset!r}: no training class among {self.train_classes} appears in allowed slices "
                f"of at least two training scans (setting {self.setting}, test classes {self.test_classes}, "
                f"{len(self.train_scans)} training scans)"
            )
        self.classes = sorted(self.candidates)
        wanted: Dict[str, set] = {}
        for per_scan in self.candidates.values():
            for s, zs in per_scan.items():
                wanted.setdefault(s, set()).update(zs)
        self.cache = _slice_cache(cache, dataset, self.size, wanted, cache_mb)

    def _draw(self) -> Tuple[int, List[Tuple[str, int]], str, List[int]]:
        rng = self.rng
        c = int(self.classes[rng.integers(len(self.classes))])
        scans = list(self.candidates[c])
        q = scans[rng.integers(len(scans))]
        others = [s for s in scans if s != q]
        pick = rng.choice(len(others), size=self.shots, replace=len(others) < self.shots)
        u = float(rng.random())
        support = []
        for i in pick:
            zs = self.candidates[c][others[int(i)]]
            support.append((others[int(i)], zs[min(int(u * len(zs)), len(zs) - 1)]))
        qz_all = self.candidates[c][q]
        centre = min(int(u * len(qz_all)), len(qz_all) - 1)
        start = min(max(centre - (self.n_query - 1) // 2, 0), max(len(qz_all) - self.n_query, 0))
        qz = [qz_all[min(start + j, len(qz_all) - 1)] for j in range(self.n_query)]
        return c, support, q, qz

    def sample(self) -> Episode:
        """One labelled episode (see the class docstring)."""
        for attempt in range(self.max_tries):
            c, support, q, qz = self._draw()
            s_img, s_mask, q_img, q_mask = [], [], [], []
            for scan, z in support:
                img, lab = self.cache.get(scan, z)
                a, m = self._pair(img, lab == c)
                s_img.append(a)
                s_mask.append(m)
            for z in qz:
                img, lab = self.cache.get(q, z)
                a, m = self._pair(img, lab == c)
                q_img.append(a)
                q_mask.append(m)
            fg = min(int(m.sum()) for m in s_mask + q_mask)
            if fg >= self.min_fg_pixels or attempt == self.max_tries - 1:
                break
        return Episode(
            support_img=np.stack(s_img), support_mask=np.stack(s_mask).astype(np.float32),
            query_img=np.stack(q_img), query_mask=np.stack(q_mask).astype(np.int64), class_id=int(c),
            meta={"kind": "labelled", "class_id": int(c), "setting": self.setting, "shots": self.shots,
                  "support_scans": [s for s, _ in support], "support_z": [int(z) for _, z in support],
                  "support_scan": support[0][0], "query_scan": q, "query_z": [int(z) for z in qz],
                  "tries": attempt + 1},
        )


class SuperpixelEpisodeSampler(_Augmenting):
    """SSL-ALPNet-style self-supervised episodes from superpixel pseudo-labels.

    Per episode: a scan (uniform over scans with allowed slices), a slice (uniform over its allowed slices),
    Felzenszwalb superpixels of the resized slice and one random superpixel as the pseudo-label
    (``fewshot_proto.data.superpixel.superpixel_pseudolabel``). The ``shots`` support images and ``n_query``
    query images are independent augmentations of that slice and mask. Slices where no usable superpixel is
    found are re-drawn (up to ``max_tries``).

    Args:
        dataset: the dataset (labels are not used, only images).
        scans: scans training may use.
        allowed_slices: ``{scan: [z, ...]}`` usable slices (Setting 2: without test classes); ``None`` allows
            every slice of every scan.
        size, rng, shots, n_query, augment, augment_kwargs: as for the labelled sampler.
        cache_mb: memory for the cache of resized slices, and as much again for cached superpixels.
        cache: a shared :class:`SliceCache` (as for ``LabelledEpisodeSampler``); the superpixel cache stays own.
        superpixel_kwargs: ``scale``, ``sigma``, ``min_size`` go to ``superpixels`` (Felzenszwalb; its result and
            the body mask are cached per slice), the rest (``min_pixels``, ``min_inside``) to
            ``superpixel_pseudolabel``.
    """

    def __init__(self, dataset: Any, scans: Sequence[str], allowed_slices: Optional[Mapping[str, Sequence[int]]] = None,
                 *, size: int = 256, rng: np.random.Generator, shots: int = 1, n_query: int = 1, augment: bool = True,
                 superpixel_kwargs: Optional[Mapping[str, Any]] = None, max_tries: int = 20,
                 augment_kwargs: Optional[Mapping[str, Any]] = None, cache_mb: float = 512.0,
                 cache: Optional[SliceCache] = None) -> None:
        self.rng = _check_rng(rng, "SuperpixelEpisodeSampler")
        if int(shots) < 1 or int(n_query) < 1:
            raise ValueError(f"shots and n_query must be >= 1, got shots={shots}, n_query={n_query}")
        self.dataset = dataset
        self.size, self.shots, self.n_query = int(size), int(shots), int(n_query)
        self.augment = bool(augment)
        self.augment_kwargs = dict(augment_kwargs or {})
        self.superpixel_kwargs = dict(superpixel_kwargs or {})
        seg_keys = ("scale", "sigma", "min_size")
        self._seg_kwargs = {k: v for k, v in self.superpixel_kwargs.items() if k in seg_keys}
        self._pick_kwargs = {k: v for k, v in self.superpixel_kwargs.items() if k not in seg_keys}
        self._seg_cache = _ByteLRU(float(cache_mb) * 2 ** 20)
        self.max_tries = max(1, int(max_tries))
        name = getattr(dataset, "name", "?")
        self.slices: Dict[str, List[int]] = {}
        for s in scans:
            s = str(s)
            if allowed_slices is None:
                zs = list(range(self._n_slices(s)))
            else:
                zs = sorted(int(z) for z in allowed_slices.get(s, []))
            if zs:
                self.slices[s] = zs
        if not self.slices:
            raise ProtocolError(f"dataset {name!r}: no allowed slice in any of the {len(scans)} training scans")
        self.scans = list(self.slices)
        self.cache = _slice_cache(cache, dataset, self.size, self.slices, cache_mb)

    def _segments(self, scan: str, z: int, img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Felzenszwalb superpixels and body mask of a slice (deterministic, so cached per slice)."""
        key = (scan, z)
        item = self._seg_cache.get(key)
        if item is not None:
            return item  # type: ignore[return-value]
        seg = superpixels(img, **self._seg_kwargs)
        if seg.size and seg.max() <= np.iinfo(np.int16).max:
            seg = seg.astype(np.int16)
        item = (seg, body_mask(img))
        self._seg_cache.put(key, item)
        return item

    def _n_slices(self, scan: str) -> int:
        index = self.dataset.slice_index() if hasattr(self.dataset, "slice_index") else None
        if index is not None and scan in index.n_slices:
            return int(index.n_slices[scan])
        return int(self.dataset.load(scan).n_slices)

    def sample(self) -> Episode:
        """One superpixel episode (see the class docstring)."""
        rng = self.rng
        scan, z = "", -1
        mask = None
        for attempt in range(self.max_tries):
            scan = self.scans[rng.integers(len(self.scans))]
            zs = self.slices[scan]
            z = int(zs[rng.integers(len(zs))])
            img, _ = self.cache.get(scan, z)
            segments, body = self._segments(scan, z, img)
            mask = superpixel_pseudolabel(img, rng, segments=segments, body=body, **self._pick_kwargs)
            if mask is not None and np.any(mask):
                break
        if mask is None or not np.any(mask):
            raise ProtocolError(
                f"dataset {getattr(self.dataset, 'name', '?')!r}: no usable superpixel found in {self.max_tries} "
                f"random slices (last: scan {scan!r} z={z}); check the images or superpixel_kwargs"
            )
        pairs = [self._pair(img, mask) for _ in range(self.shots + self.n_query)]
        s, q = pairs[: self.shots], pairs[self.shots:]
        return Episode(
            support_img=np.stack([a for a, _ in s]), support_mask=np.stack([m for _, m in s]).astype(np.float32),
            query_img=np.stack([a for a, _ in q]), query_mask=np.stack([m for _, m in q]).astype(np.int64),
            class_id=-1,
            meta={"kind": "superpixel", "class_id": -1, "shots": self.shots, "support_scans": [scan] * self.shots,
                  "support_z": [z] * self.shots, "support_scan": scan, "query_scan": scan,
                  "query_z": [z] * self.n_query, "tries": attempt + 1},
        )


class MixedSampler:
    """Draws each episode from ``samplers[i]`` with probability ``probs[i]`` (chosen with ``self.rng``)."""

    def __init__(self, samplers: Sequence[Any], probs: Sequence[float], rng: np.random.Generator) -> None:
        self.rng = _check_rng(rng, "MixedSampler")
        if len(samplers) == 0 or len(samplers) != len(probs):
            raise ValueError(f"MixedSampler needs one probability per sampler, got {len(samplers)} samplers and "
                             f"{len(probs)} probabilities")
        p = np.asarray(probs, dtype=float)
        if (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
            raise ValueError(f"MixedSampler probabilities must be >= 0 with a positive sum, got {list(probs)}")
        self.samplers = list(samplers)
        self.probs = p / p.sum()

    def sample(self) -> Episode:
        i = int(self.rng.choice(len(self.samplers), p=self.probs))
        ep = self.samplers[i].sample()
        ep.meta["sampler"] = i
        return ep
