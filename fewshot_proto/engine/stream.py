"""The one episode stream of the engine: item ``i`` is a pure function of ``(seed, rank, i)``.

:class:`EpisodeSource` drives any sampler (episodic or supervised) with ``np.random.default_rng([seed, rank, i])``
for item ``i``, so the items of a run do not depend on how they were produced (inline, by a prefetch thread or
by DataLoader workers) nor on where the stream started (a resumed run sees what an uninterrupted one would
have). :func:`episode_to_tensors` puts an episode's arrays on the training device.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from fewshot_proto.engine.runtime import to_memory_format
from fewshot_proto.errors import FewShotError

__all__ = ["EpisodeSource", "sample_with", "episode_to_tensors"]


class EpisodeSource:
    """Episode ``i`` = ``sampler`` driven by ``default_rng([seed, rank, i])``: a pure function of the step.

    Iterating yields episodes for steps ``start, start+1, ...`` with a background thread keeping ``prefetch``
    episodes ready (sampling overlaps compute), or through DataLoader workers when ``num_workers > 0``.
    Any sampler that draws only from ``sampler.rng`` (children in ``sampler.samplers``) and returns an object
    with a ``meta`` dict works, e.g. the supervised ``SliceBatchSampler``.
    """

    def __init__(self, sampler, seed: int, rank: int = 0) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)

    def episode(self, step: int):
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        return sample_with(self.sampler, rng)

    def __getitem__(self, step: int):  # map-style dataset protocol for DataLoader workers
        t = time.perf_counter()
        try:
            ep = self.episode(step)
        except FewShotError as e:  # carried to the main process as it is (a worker would wrap it in a traceback)
            return _WorkerError(e)
        ep.meta["sample_seconds"] = time.perf_counter() - t
        return ep

    def __len__(self) -> int:  # pragma: no cover - DataLoader needs it only with automatic sampling
        return 2 ** 31

    def stream(self, start: int, stop: int, *, prefetch: int = 2, num_workers: int = 0) -> Iterator[Any]:
        """Items of steps ``start .. stop-1``; our own errors raised while sampling (``DataError``, ...) reach the
        caller with their type and message, wherever the sampling ran."""
        for item in self._stream(start, stop, prefetch=prefetch, num_workers=num_workers):
            if isinstance(item, _WorkerError):
                raise item.error
            yield item

    def _stream(self, start: int, stop: int, *, prefetch: int, num_workers: int) -> Iterator[Any]:
        if num_workers > 0:
            loader = DataLoader(self, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                prefetch_factor=max(1, prefetch), collate_fn=_identity,
                                worker_init_fn=_worker_init, persistent_workers=False)
            yield from loader
            return
        if prefetch <= 0:
            for i in range(start, stop):
                yield self[i]
            return
        yield from _threaded(lambda i: self[i], start, stop, prefetch)


class _WorkerError:
    """One of our errors raised while sampling an item, returned instead of the item (re-raised by ``stream``)."""

    def __init__(self, error: FewShotError) -> None:
        self.error = error


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def sample_with(sampler, rng: np.random.Generator):
    """Draw one episode from ``sampler`` using ``rng`` (samplers keep their generator in ``.rng``)."""
    def set_rng(s):
        s.rng = rng
        for child in getattr(s, "samplers", []) or []:
            set_rng(child)

    set_rng(sampler)
    return sampler.sample()


def _threaded(fn, start: int, stop: int, prefetch: int) -> Iterator[Any]:
    q: "queue.Queue" = queue.Queue(maxsize=prefetch)
    stop_flag = threading.Event()

    def work():
        try:
            for i in range(start, stop):
                if stop_flag.is_set():
                    return
                q.put(("ok", fn(i)))
        except BaseException as e:  # surfaced in the consumer
            q.put(("err", e))

    t = threading.Thread(target=work, daemon=True, name="episode-prefetch")
    t.start()
    try:
        for _ in range(start, stop):
            kind, item = q.get()
            if kind == "err":
                raise item
            yield item
    finally:
        stop_flag.set()
        while not q.empty():
            try:
                q.get_nowait()
            except queue.Empty:  # pragma: no cover
                break


def episode_to_tensors(ep, device: torch.device, channels_last: bool):
    s_img = to_memory_format(torch.from_numpy(np.ascontiguousarray(ep.support_img)).to(device), channels_last)
    q_img = to_memory_format(torch.from_numpy(np.ascontiguousarray(ep.query_img)).to(device), channels_last)
    s_mask = torch.from_numpy(np.ascontiguousarray(ep.support_mask)).float().to(device)
    q_mask = torch.from_numpy(np.ascontiguousarray(ep.query_mask)).long().to(device)
    return s_img, s_mask, q_img, q_mask
