"""Our training episodes as a learn2learn-style task set, for meta-learning code written against learn2learn.

learn2learn's ``l2l.data.Taskset`` (alias ``TaskDataset``; 0.2.0) builds classification tasks from a labelled
``MetaDataset`` through task transforms (N ways, K shots). A segmentation episode does not fit that machinery (its
"labels" are masks, and our samplers choose class, scans, slices, augmentation and superpixel pseudo-labels
themselves), so :class:`EpisodeTaskset` is not a subclass: it offers the same interface over any fewshot_proto
episode sampler:

* ``taskset[i]``: task ``i``, deterministic: the sampler driven by ``np.random.default_rng([seed, rank, i])``,
  exactly the generator of the engine's :class:`~fewshot_proto.engine.stream.EpisodeSource`, so task ``i`` of
  a task set with the trainer's sampler and seed is the episode of training step ``i``;
* ``taskset.sample()``: one task, like learn2learn's (a random index among ``num_tasks``; with
  ``num_tasks=-1`` the next task of an endless stream), drawn from the task set's own seeded generator rather
  than the module-global ``random``;
* ``len(taskset)`` = ``num_tasks`` (``-1``: endless; then ``len`` is 1, as in learn2learn), iteration over
  tasks ``0 .. num_tasks - 1`` (endless for ``-1``);
* a task is :class:`SegTask` ``(support_img, support_mask, query_img, query_mask)`` of torch tensors, float32
  ``[S, C, H, W]``, float32 ``[S, H, W]`` in {0, 1}, float32 ``[Q, C, H, W]``, int64 ``[Q, H, W]`` (what the
  trainer feeds a model), so ``X_s, y_s, X_q, y_q = taskset.sample()`` unpacks as with learn2learn.

It is a map-style dataset, so ``DataLoader(taskset, batch_size=None, num_workers=...)`` prefetches tasks.
Nothing here imports learn2learn; the module is named for what it provides (a task set), not for a dependency.

    from fewshot_proto.engine.taskset import training_taskset
    tasks = training_taskset(cfg, num_tasks=20000)          # the trainer's sampler for cfg's fold split
    maml = l2l.algorithms.MAML(net, lr=0.1, first_order=True)
    for X_s, y_s, X_q, y_q in tasks:
        learner = maml.clone(); learner.adapt(loss(learner(X_s), y_s)); loss(learner(X_q), y_q).backward()
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import torch

from fewshot_proto.data import dataset_from_config
from fewshot_proto.engine.episodic import build_training_sampler
from fewshot_proto.engine.stream import EpisodeSource
from fewshot_proto.episodes.protocol import fold_split

__all__ = ["SegTask", "EpisodeTaskset", "training_taskset"]


class SegTask(NamedTuple):
    """One segmentation task: the support set (adaptation data) and the query set (evaluation data)."""

    support_img: torch.Tensor  # float32 [S, C, H, W]
    support_mask: torch.Tensor  # float32 [S, H, W] in {0, 1}
    query_img: torch.Tensor  # float32 [Q, C, H, W]
    query_mask: torch.Tensor  # int64 [Q, H, W] in {0, 1}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"EpisodeTaskset: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class EpisodeTaskset:
    """A learn2learn-style task set over a fewshot_proto episode sampler (see the module docstring).

    Args:
        sampler: a ``LabelledEpisodeSampler``, ``SuperpixelEpisodeSampler``, ``MixedSampler`` or any object
            whose ``sample()`` draws only from its ``rng`` attribute (children in ``samplers``) and returns an
            :class:`~fewshot_proto.types.Episode` with a query mask. Its ``rng`` is replaced at every task.
        num_tasks: number of distinct tasks (``>= 1``), or ``-1`` for an endless set.
        seed: seed of the tasks (task ``i`` uses ``default_rng([seed, rank, i])``) and of ``sample()``.
        rank: the rank part of the seed (0 unless tasks must match another rank's training episodes).
        device: where the task tensors are put (default: CPU).

    Raises:
        ValueError: ``num_tasks`` is 0 or below -1, a negative seed or rank, a sampler without ``sample``.
        IndexError: ``taskset[i]`` with ``i`` outside ``[-num_tasks, num_tasks)`` (negative ``i`` counts from the
            end; an endless set accepts any ``i >= 0``).
    """

    def __init__(self, sampler: Any, num_tasks: int = -1, seed: int = 0, rank: int = 0,
                 device: Optional[torch.device | str] = None) -> None:
        if not callable(getattr(sampler, "sample", None)):
            raise ValueError(f"EpisodeTaskset: sampler must have a sample() method, got {type(sampler).__name__}")
        num_tasks = _check_int("num_tasks", num_tasks, -1)
        if num_tasks == 0:
            raise ValueError("EpisodeTaskset: num_tasks must be -1 (endless) or positive, got 0")
        self.sampler = sampler
        self.num_tasks = num_tasks
        self.seed = _check_int("seed", seed, 0)
        self.rank = _check_int("rank", rank, 0)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # sample(): its own generator (learn2learn uses the module-global `random`, which cannot be seeded per set)
        self._pick = np.random.default_rng([self.seed, self.rank, 2**32 - 1])
        self._next = 0

    # ---- episodes -----------------------------------------------------------------------------------------
    def episode(self, i: int):
        """The raw :class:`~fewshot_proto.types.Episode` of task ``i`` (numpy arrays and ``meta``)."""
        # the training stream's own rule, so task i == training step i by construction
        return EpisodeSource(self.sampler, self.seed, self.rank).episode(self._index(i))

    def _index(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"EpisodeTaskset: task index must be an integer, got {type(i).__name__}")
        i = int(i)
        if self.num_tasks == -1:
            if i < 0:
                raise IndexError(f"EpisodeTaskset: an endless task set has no task {i} (indices are >= 0)")
            return i
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(f"EpisodeTaskset: task {i} out of range for {self.num_tasks} tasks")
        return i % self.num_tasks

    def _tensors(self, ep: Any) -> SegTask:
        if ep.query_mask is None:
            raise ValueError(f"EpisodeTaskset: the sampler returned an episode without a query mask ({ep.meta})")

        def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(device=self.device, dtype=dtype)

        return SegTask(t(ep.support_img, torch.float32), t(ep.support_mask, torch.float32),
                       t(ep.query_img, torch.float32), t(ep.query_mask, torch.int64))

    # ---- the learn2learn Taskset interface ----------------------------------------------------------------
    def __getitem__(self, i: int) -> SegTask:
        """Task ``i`` as :class:`SegTask` (the same tensors at every call)."""
        return self._tensors(self.episode(i))

    def sample(self) -> SegTask:
        """One task: a random one of the ``num_tasks`` (seeded), or the next of the stream for ``num_tasks=-1``."""
        if self.num_tasks == -1:
            i = self._next
            self._next += 1
        else:
            i = int(self._pick.integers(self.num_tasks))
        return self[i]

    def __len__(self) -> int:
        return 1 if self.num_tasks == -1 else self.num_tasks

    def __iter__(self) -> Iterator[SegTask]:
        i = 0
        while self.num_tasks == -1 or i < self.num_tasks:
            yield self[i]
            i += 1

    def __repr__(self) -> str:
        return (f"EpisodeTaskset(sampler={type(self.sampler).__name__}, num_tasks={self.num_tasks}, seed={self.seed}, "
                f"rank={self.rank}, device={str(self.device)!r})")


def training_taskset(cfg: Any, *, num_tasks: int = -1, dataset: Any = None, rank: int = 0,
                     device: Optional[torch.device | str] = None) -> EpisodeTaskset:
    """The training episodes of experiment ``cfg`` as a task set (the sampler and seed ``train()`` uses).

    Builds the dataset (unless ``dataset`` is given), the protocol's fold split and the training sampler exactly
    as :func:`fewshot_proto.engine.train` does, so task ``i`` is the episode of training step ``i`` (rank
    ``rank``): test classes held out under the protocol's setting, ``cfg.episodes`` mode, shots and size.

    Args:
        cfg: an ``ExperimentConfig`` (``fewshot_proto.config.default_config()`` or ``load_config(path)``).
        num_tasks: as for :class:`EpisodeTaskset` (default endless).
        dataset: a dataset overriding ``cfg.data`` (an ``InMemoryDataset``, for example).
        rank: the rank part of the seed.
        device: where the task tensors are put.
    """
    if dataset is None:
        dataset = dataset_from_config(cfg.data)
    index = dataset.slice_index()
    split = fold_split(index, cfg.protocol.fold, cfg.protocol.n_folds, cfg.protocol.shots)
    sampler = build_training_sampler(cfg, dataset, index, list(split.train_scans))
    return EpisodeTaskset(sampler, num_tasks=num_tasks, seed=cfg.train.seed, rank=rank, device=device)
