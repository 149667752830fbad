"""Supervised training of the baselines in the same harness as the few-shot models.

``fewshot_proto.engine.train`` dispatches here when the model's ``kind`` is ``"supervised"`` (U-Net,
ResUpNet, MobileNetV2-ASPP-SE U-Net). The question this answers: how many labelled scans does a supervised
network need to match a one-shot model? So, for the protocol's fold:

* **Scans**: only the labelled TRAINING scans of the fold (``fold_split(...).train_scans``: never the query
  fold, never the support scans). ``supervised.n_labelled`` of them, chosen by :func:`select_labelled_scans`
  (a seeded permutation, nested in N), or all.
* **Targets**: the protocol's TEST classes, with ONE model for all of them: the model is built with
  ``classes=test_classes`` (head with ``1 + K`` softmax channels, or K sigmoid channels) and the evaluator
  scores it class by class through ``model.to_binary`` / ``binary_logits``. Every other label is background.
  ``protocol.setting`` does not apply here (it restricts what the few-shot model sees of the test classes).
* **Steps**: one step is a batch of ``supervised.batch_size`` slices (:class:`SliceBatchSampler`), a share
  ``fg_fraction`` of them forced to contain a target class, each augmented with ``augment_pair``. Step ``i``
  is drawn with ``default_rng([train.seed, rank, i])`` through the engine's one episode stream
  (:class:`~fewshot_proto.engine.stream.EpisodeSource`: prefetch thread or DataLoader workers), so resume is
  bit-for-bit exactly as for episodic training.
* **Loss** (:func:`supervised_losses`): ``dice_weight * Dice + ce_weight * CE``, softmax CE + Dice for a
  softmax head, per-class Dice + BCE (the seeds' 0.8 / 0.2, optional ``pos_weight``) for a sigmoid head.
* **Early stopping** (``supervised.val_scans`` > 0): held-out training scans (:func:`select_validation_scans`)
  are segmented every ``val_every`` steps (:func:`validation_dice`); the trainer keeps the best weights in
  ``best.pt`` and stops after ``patience`` validations without improvement (:class:`EarlyStopping`).

Optimiser, schedule, checkpoints, logging, interrupt handling and the wall-time budget are the trainer's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewshot_proto.config import ConfigError, ExperimentConfig
from fewshot_proto.data.augment import augment_pair
from fewshot_proto.data.transforms import to_channels
from fewshot_proto.engine.runtime import to_memory_format
from fewshot_proto.engine.stream import EpisodeSource
from fewshot_proto.episodes.sampler import SliceCache
from fewshot_proto.errors import DataError, ProtocolError
from fewshot_proto.losses import dice_loss, weighted_cross_entropy
from fewshot_proto.types import natural_key

__all__ = [
    "select_labelled_scans",
    "select_validation_scans",
    "validation_dice",
    "EarlyStopping",
    "SliceBatch",
    "SliceBatchSampler",
    "supervised_losses",
    "supervised_model_kwargs",
    "ImageSegmenter",
    "SupervisedTask",
]


def _permuted(train_scans: Sequence[str], seed: int) -> Tuple[List[str], List[str]]:
    """``train_scans`` in natural order, and in the order of ``default_rng(seed).permutation``."""
    scans = sorted((str(s) for s in train_scans), key=natural_key)
    if not scans:
        raise ProtocolError("supervised training: the fold leaves no training scans")
    perm = np.random.default_rng(int(seed)).permutation(len(scans))
    return scans, [scans[int(i)] for i in perm]


def select_validation_scans(train_scans: Sequence[str], val_scans: int, seed: int = 0) -> List[str]:
    """The ``val_scans`` training scans held out for early stopping: the LAST ``val_scans`` entries of the
    selection permutation (:func:`select_labelled_scans`), so they are never labelled and do not depend on
    ``n_labelled``. ``[]`` for 0; a ``ProtocolError`` when they would leave no scan to train on."""
    scans, order = _permuted(train_scans, seed)
    v = int(val_scans)
    if v == 0:
        return []
    if not 1 <= v < len(scans):
        raise ProtocolError(f"supervised.val_scans must leave at least one of the {len(scans)} training scans of "
                            f"this fold to train on, got {val_scans!r}")
    return order[len(order) - v:]


def select_labelled_scans(train_scans: Sequence[str], n_labelled: Optional[int], seed: int = 0,
                          val_scans: int = 0) -> List[str]:
    """The labelled scans a supervised baseline trains on.

    Rule: sort ``train_scans`` in natural order; ``n_labelled=None`` returns them all (in that order) but the
    ``val_scans`` validation scans; otherwise return the first ``n_labelled`` entries of
    ``numpy.random.default_rng(seed).permutation`` of that list (in permutation order). For a fixed ``seed`` and
    training set the choices are nested: the N-scan set is the first N of the (N+1)-scan set. The validation
    scans are the last ``val_scans`` entries of the same permutation (:func:`select_validation_scans`).

    Raises:
        ProtocolError: ``n_labelled`` is not in ``1..len(train_scans) - val_scans``, or there are no training scans.
    """
    scans, order = _permuted(train_scans, seed)
    held = set(select_validation_scans(train_scans, val_scans, seed))
    if n_labelled is None:
        return [s for s in scans if s not in held]
    n = int(n_labelled)
    room = len(scans) - len(held)
    if isinstance(n_labelled, bool) or not 1 <= n <= room:
        extra = f" less the {len(held)} validation scan(s)" if held else ""
        raise ProtocolError(
            f"supervised.n_labelled must be between 1 and the {len(scans)} training scans of this fold{extra} "
            f"({scans}), got {n_labelled!r}"
        )
    return order[:n]


@torch.no_grad()
def validation_dice(model: nn.Module, cache: SliceCache, scans: Sequence[str], n_slices: Mapping[str, int],
                    classes: Sequence[int], *, device: torch.device, channels: int = 3, batch: int = 16,
                    channels_last: bool = False) -> float:
    """Mean Dice over ``scans`` x ``classes`` of the model's argmax segmentation of every slice, at the cache's size.

    Per scan and class the Dice is computed over the whole volume (``2|P∩G| / (|P| + |G|)``; 1 when both are
    empty, so a scan without the class counts only when the model finds it there). ``model.segment_image`` gives
    ``[B, 1 + K, H, W]`` logits for ``classes`` (channel ``i`` is ``classes[i - 1]``); the caller puts the model in
    ``eval()`` mode.
    """
    scores = []
    for scan in scans:
        inter = np.zeros(len(classes))
        size_p = np.zeros(len(classes))
        size_g = np.zeros(len(classes))
        zs = list(range(int(n_slices[scan])))
        for i in range(0, len(zs), batch):
            imgs, labs = [], []
            for z in zs[i:i + batch]:
                img, lab = cache.get(scan, z)
                if lab is None:
                    raise DataError(f"validation scan {scan!r} has no label map")
                imgs.append(to_channels(img, channels))
                labs.append(np.asarray(lab))
            x = to_memory_format(torch.from_numpy(np.stack(imgs).astype(np.float32)).to(device), channels_last)
            pred = model.segment_image(x).float().argmax(dim=1).cpu().numpy()  # [B, H, W] in 0..K
            gt = np.stack(labs)
            for k, c in enumerate(classes):
                p, g = pred == k + 1, gt == c
                inter[k] += np.logical_and(p, g).sum()
                size_p[k] += p.sum()
                size_g[k] += g.sum()
        for k in range(len(classes)):
            denom = size_p[k] + size_g[k]
            scores.append(1.0 if denom == 0 else 2.0 * inter[k] / denom)
    return float(np.mean(scores))


class EarlyStopping:
    """Best-so-far tracking of a validation score (higher is better) with patience.

    ``update(step, value) -> bool`` records one validation and returns whether it improved on the best (strictly);
    ``stop`` is true after ``patience`` validations in a row without improvement. ``state()`` / ``load(state)``
    carry it through a checkpoint, so a resumed run stops where an uninterrupted one would.
    """

    def __init__(self, every: int, patience: int) -> None:
        self.every = int(every)
        self.patience = int(patience)
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.bad = 0
        self.history: List[Tuple[int, float]] = []

    def update(self, step: int, value: float) -> bool:
        self.history.append((int(step), float(value)))
        if self.best is None or value > self.best:
            self.best, self.best_step, self.bad = float(value), int(step), 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.bad >= self.patience

    def state(self) -> Dict[str, Any]:
        return {"every": self.every, "patience": self.patience, "best": self.best, "best_step": self.best_step,
                "bad": self.bad, "history": [list(h) for h in self.history]}

    def load(self, state: Mapping[str, Any]) -> "EarlyStopping":
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_step = None if state.get("best_step") is None else int(state["best_step"])
        self.bad = int(state.get("bad", 0))
        self.history = [(int(a), float(b)) for a, b in state.get("history", [])]
        return self


@dataclass
class SliceBatch:
    """One supervised training step.

    Attributes:
        img: ``[B, C, size, size]`` float32 (grey value tiled to C channels).
        label: ``[B, size, size]`` int64 target index: 0 background, ``i`` for ``classes[i - 1]``.
        meta: ``kind``, ``scans``, ``z`` (one per slice), ``n_fg_forced``, ``classes``.
    """

    img: np.ndarray
    label: np.ndarray
    meta: Dict[str, Any] = field(default_factory=dict)


class SliceBatchSampler:
    """Batches of labelled slices from ``scans`` with target indices for ``classes``; draws only from ``self.rng``.

    Per batch: the first ``floor(fg_fraction * batch_size + 0.5)`` slices are drawn uniformly from the slices
    containing at least one of ``classes``, the others uniformly from all slices of ``scans`` (so at least
    that share shows a target class). Each slice is augmented independently (``augment_pair``: the label map
    undergoes the identical geometry with nearest-neighbour sampling) and its labels are mapped to target
    indices (``classes[i - 1] -> i``, everything else 0).

    Args:
        dataset: ``load(scan) -> Volume`` (labelled).
        index: its SliceIndex (slice counts and where each class is).
        scans: the labelled scans to use.
        classes: target label values (non-empty, distinct).
        size: output size; batch_size: slices per batch; fg_fraction: in [0, 1].
        augment: apply ``augment_pair`` with ``augment_kwargs``.
        rng: the sampler's generator (the engine replaces it for every step).
        channels: channels the grey value is tiled to (3, the models' default ``in_channels``).
        cache_mb: memory for the cache of resized slices (``episodes.sampler.SliceCache``).
    """

    def __init__(self, dataset: Any, index: Any, scans: Sequence[str], classes: Sequence[int], *, size: int,
                 batch_size: int = 8, fg_fraction: float = 0.5, augment: bool = True,
                 rng: np.random.Generator, augment_kwargs: Optional[Mapping[str, Any]] = None,
                 channels: int = 3, cache_mb: float = 512.0) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"SliceBatchSampler: rng must be a numpy.random.Generator, got {type(rng).__name__}")
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"supervised.batch_size must be >= 1, got {batch_size!r}")
        if not 0.0 <= float(fg_fraction) <= 1.0:
            raise ValueError(f"supervised.fg_fraction must be in [0, 1], got {fg_fraction!r}")
        self.rng = rng
        self.classes = [int(c) for c in classes]
        if not self.classes or len(set(self.classes)) != len(self.classes) or 0 in self.classes:
            raise ValueError(f"SliceBatchSampler: classes must be distinct non-zero label values, got {classes!r}")
        self.scans = [str(s) for s in scans]
        unknown = [s for s in self.scans if s not in index.n_slices]
        if unknown:
            raise ProtocolError(f"dataset {index.dataset!r} has no scan(s) {unknown}")
        self.size, self.batch_size, self.channels = int(size), int(batch_size), int(channels)
        self.fg_fraction = float(fg_fraction)
        self.augment = bool(augment)
        self.augment_kwargs = dict(augment_kwargs or {})
        self.all_slices: List[Tuple[str, int]] = [(s, z) for s in self.scans for z in range(int(index.n_slices[s]))]
        self.fg_slices: List[Tuple[str, int]] = [(s, int(z)) for s in self.scans
                                                 for z in index.slices_with_any(self.classes, s)]
        if not self.all_slices:
            raise ProtocolError(f"dataset {index.dataset!r}: scans {self.scans} have no slices")
        if not self.fg_slices:
            raise ProtocolError(
                f"dataset {index.dataset!r}: no slice of the labelled scans {self.scans} contains any of the target "
                f"classes {self.classes} (classes present in the dataset: {index.classes})"
            )
        self.n_fg = int(np.floor(self.fg_fraction * self.batch_size + 0.5))
        wanted = {s: list(range(int(index.n_slices[s]))) for s in self.scans}
        self.cache = SliceCache(dataset, self.size, wanted, cache_mb)

    def encode(self, label: np.ndarray) -> np.ndarray:
        """Label values ``[H, W]`` -> target indices int64 (``classes[i - 1] -> i``, others 0)."""
        out = np.zeros(label.shape, dtype=np.int64)
        for i, c in enumerate(self.classes, start=1):
            out[label == c] = i
        return out

    def sample(self) -> SliceBatch:
        """One batch (see the class docstring)."""
        rng = self.rng
        picks = []
        for i in range(self.batch_size):
            pool = self.fg_slices if i < self.n_fg else self.all_slices
            picks.append(pool[int(rng.integers(len(pool)))])
        imgs, labels = [], []
        for scan, z in picks:
            img, lab = self.cache.get(scan, z)
            if lab is None:
                raise DataError(f"scan {scan!r} has no label map; supervised training needs labelled scans")
            if self.augment:
                img, lab = augment_pair(img, lab, rng, **self.augment_kwargs)
            imgs.append(to_channels(img, self.channels))
            labels.append(self.encode(np.asarray(lab)))
        return SliceBatch(
            img=np.stack(imgs).astype(np.float32, copy=False), label=np.stack(labels),
            meta={"kind": "supervised", "scans": [s for s, _ in picks], "z": [int(z) for _, z in picks],
                  "n_fg_forced": self.n_fg, "classes": list(self.classes)},
        )


def supervised_losses(logits: torch.Tensor, target: torch.Tensor, *, out_mode: str, dice_weight: float = 0.8,
                      ce_weight: float = 0.2, pos_weight: Optional[float] = None,
                      batch_dice: bool = True) -> Dict[str, torch.Tensor]:
    """Loss terms of a supervised batch: ``{"loss", "ce", "dice"}`` with ``loss = dice_weight*dice + ce_weight*ce``.

    Args:
        logits: ``[N, 1 + K, H, W]`` from ``segment_image`` (channel 0 background, ``i`` class ``i``).
        target: ``[N, H, W]`` int64 indices in ``0..K``.
        out_mode: ``"softmax"``: ``ce`` = cross-entropy over the ``1 + K`` channels (class weights
            ``[1, pos_weight, ...]`` when given), ``dice`` = soft Dice of the K class channels of the softmax.
            ``"sigmoid"`` (channel 0 is the constant 0 of a sigmoid head): ``ce`` = BCE of each class channel
            against ``target == i`` (``pos_weight`` on positives), ``dice`` = soft Dice of ``sigmoid(z_i)``;
            both averaged over classes. For K = 1 this is exactly ``losses.dice_bce_loss``.
        batch_dice: Dice per class over the whole batch (True) or per slice, then averaged (False).
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
        raise ValueError(f"supervised_losses: logits [N, 1+K, H, W] and target [N, H, W] expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    x = logits.float()
    n, k1, h, w = x.shape
    target = target.long()
    if out_mode == "softmax":
        weight = None if pos_weight is None else [1.0] + [float(pos_weight)] * (k1 - 1)
        ce = weighted_cross_entropy(x, target, weight=weight)
        if batch_dice:  # the batch as one item: [1, 1+K, N, H*W]
            dice = dice_loss(x.permute(1, 0, 2, 3).reshape(1, k1, n, h * w), target.reshape(1, n, h * w),
                             softmax=True, include_background=False)
        else:
            dice = dice_loss(x, target, softmax=True, include_background=False)
    elif out_mode == "sigmoid":
        z = x[:, 1:]  # [N, K, H, W]
        onehot = F.one_hot(target, k1).movedim(-1, 1)[:, 1:].float()
        pw = None if pos_weight is None else torch.tensor([float(pos_weight)], device=z.device)
        ce = F.binary_cross_entropy_with_logits(z, onehot, pos_weight=pw)
        if batch_dice:  # one item per class: [K, 1, N, H*W]
            zz = z.permute(1, 0, 2, 3).reshape(k1 - 1, 1, n, h * w)
            tt = onehot.permute(1, 0, 2, 3).reshape(k1 - 1, 1, n, h * w)
        else:  # one item per (slice, class)
            zz, tt = z.reshape(n * (k1 - 1), 1, h, w), onehot.reshape(n * (k1 - 1), 1, h, w)
        dice = dice_loss(zz, tt, softmax=False, sigmoid=True)
    else:
        raise ValueError(f"supervised_losses: out_mode must be 'softmax' or 'sigmoid', got {out_mode!r}")
    return {"loss": float(dice_weight) * dice + float(ce_weight) * ce, "ce": ce, "dice": dice}


def supervised_model_kwargs(cfg: ExperimentConfig) -> Dict[str, Any]:
    """``cfg.model.kwargs`` with ``classes`` set to the protocol's test classes (the supervised targets).

    An explicit ``model.kwargs.classes`` must list the same classes (its order is kept: it fixes the channel
    order); anything else raises ``ConfigError``.
    """
    kwargs = dict(cfg.model.kwargs)
    test = [int(c) for c in cfg.protocol.test_classes]
    if not test:
        raise ConfigError("protocol.test_classes is empty: a supervised baseline needs target classes")
    given = kwargs.get("classes")
    if given is not None:
        if sorted(int(c) for c in given) != sorted(test):
            raise ConfigError(
                f"model.kwargs.classes {list(given)} must be the protocol's test classes {test} (a supervised "
                f"baseline is trained on the classes it is evaluated on); drop model.kwargs.classes to use them"
            )
        kwargs["classes"] = [int(c) for c in given]
    else:
        kwargs["classes"] = test
    return kwargs


class ImageSegmenter(nn.Module):
    """``forward(x) = model.segment_image(x)``: the module a supervised step calls (and DDP wraps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[B, C, H, W] -> logits[B, 1 + K, H, W]``."""
        return self.model.segment_image(x)


class SupervisedTask:
    """The trainer's task for supervised baselines: labelled slice batches and :func:`supervised_losses`.

    Attributes:
        labelled_scans: the scans chosen by :func:`select_labelled_scans` (recorded by the trainer).
        source: an :class:`~fewshot_proto.engine.stream.EpisodeSource` over a :class:`SliceBatchSampler`.
    """

    kind = "supervised"
    loss_fields = ["loss", "ce", "dice"]

    def __init__(self, cfg: ExperimentConfig, dataset: Any, index: Any, train_scans: Sequence[str],
                 model: nn.Module, *, device: torch.device, rank: int = 0) -> None:
        s = cfg.supervised
        classes = getattr(model, "classes", None)
        if not classes:
            raise ValueError(f"model {cfg.model.name!r} has no target classes; build it with "
                             f"supervised_model_kwargs(cfg)")
        self.cfg = cfg
        self.device = device
        self.channels_last = bool(cfg.train.channels_last)
        self.out_mode = str(getattr(model, "out_mode", "softmax"))
        self.classes = [int(c) for c in classes]
        self.labelled_scans = select_labelled_scans(train_scans, s.n_labelled, s.selection_seed, s.val_scans)
        self.validation_scans = select_validation_scans(train_scans, s.val_scans, s.selection_seed)
        missing = [c for c in self.classes if not any(index.slices(c, sc) for sc in self.labelled_scans)]
        if missing:
            raise ProtocolError(
                f"dataset {index.dataset!r}: target class(es) {missing} appear in none of the labelled training "
                f"scans {self.labelled_scans} (n_labelled={s.n_labelled}, selection_seed={s.selection_seed}); "
                f"use more scans or another selection_seed"
            )
        sampler = SliceBatchSampler(dataset, index, self.labelled_scans, self.classes, size=cfg.data.size,
                                    batch_size=s.batch_size, fg_fraction=s.fg_fraction, augment=s.augment,
                                    rng=np.random.default_rng(cfg.train.seed),
                                    channels=int(getattr(model, "in_channels", 3)))
        self.sampler = sampler
        self.source = EpisodeSource(sampler, seed=cfg.train.seed, rank=rank)
        self.early_stopping = EarlyStopping(s.val_every, s.patience) if self.validation_scans else None
        self._val_n_slices = {sc: int(index.n_slices[sc]) for sc in self.validation_scans}
        self._val_cache = (SliceCache(dataset, cfg.data.size, {sc: range(n) for sc, n in self._val_n_slices.items()})
                           if self.validation_scans else None)
        self._channels = int(getattr(model, "in_channels", 3))

    def validate(self, model: nn.Module) -> float:
        """:func:`validation_dice` of ``model`` (in ``eval()`` mode) on the validation scans."""
        return validation_dice(model, self._val_cache, self.validation_scans, self._val_n_slices, self.classes,
                               device=self.device, channels=self._channels, channels_last=self.channels_last)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module a step calls: :class:`ImageSegmenter` (so DDP sees ``segment_image``)."""
        return ImageSegmenter(model)

    def losses(self, train_model: nn.Module, batch: SliceBatch) -> Dict[str, torch.Tensor]:
        """Forward one batch and return ``{"loss", "ce", "dice"}``."""
        img = to_memory_format(torch.from_numpy(np.ascontiguousarray(batch.img)).to(self.device), self.channels_last)
        target = torch.from_numpy(np.ascontiguousarray(batch.label)).to(self.device)
        s = self.cfg.supervised
        return supervised_losses(train_model(img), target, out_mode=self.out_mode, dice_weight=s.dice_weight,
                                 ce_weight=s.ce_weight, pos_weight=s.pos_weight, batch_dice=s.batch_dice)

    @staticmethod
    def describe(batch: SliceBatch) -> str:
        return "batch of slices " + ", ".join(f"{s}:{z}" for s, z in zip(batch.meta["scans"], batch.meta["z"]))
