"""The engine's one episode stream: item ``i`` is the sampler driven by ``default_rng([seed, rank, i])``, whatever
produces it (inline, the prefetch thread, DataLoader workers) and wherever the stream starts."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest

from fewshot_proto.engine.stream import EpisodeSource


class _Item:
    def __init__(self, img: np.ndarray, which: int) -> None:
        self.img = img
        self.meta = {"which": which}


class _Noise:
    """Draws a small array from ``self.rng`` (like a real sampler, never from a global generator)."""

    def __init__(self, scale: float) -> None:
        self.rng = np.random.default_rng(0)
        self.scale = scale

    def sample(self) -> _Item:
        return _Item(self.scale * self.rng.standard_normal((2, 3)).astype(np.float32), -1)


class _Pick:
    """A composite like ``MixedSampler``: picks a child with ``self.rng``; children are in ``samplers``."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.samplers = [_Noise(1.0), _Noise(10.0)]

    def sample(self) -> _Item:
        which = int(self.rng.integers(2))
        item = self.samplers[which].sample()
        item.meta["which"] = which
        return item


def _items(start: int, stop: int, *, seed: int = 3, rank: int = 0, **kw) -> List[_Item]:
    return list(EpisodeSource(_Pick(), seed=seed, rank=rank).stream(start, stop, **kw))


def _assert_same(a: List[_Item], b: List[_Item]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.img, y.img)
        assert x.meta["which"] == y.meta["which"]


def test_workers_thread_and_inline_give_the_same_items():
    inline = _items(0, 6, num_workers=0, prefetch=0)
    _assert_same(_items(0, 6, num_workers=0, prefetch=2), inline)  # prefetch thread
    _assert_same(_items(0, 6, num_workers=2, prefetch=2), inline)  # two DataLoader worker processes
    # item i is episode(i), drawn by a fresh generator: the stream adds nothing of its own
    _assert_same(inline, [EpisodeSource(_Pick(), seed=3).episode(i) for i in range(6)])
    assert all("sample_seconds" in it.meta for it in inline)
    assert len({float(it.img.sum()) for it in inline}) == 6  # the items differ from step to step


@pytest.mark.parametrize("num_workers, prefetch", [(0, 0), (0, 2), (2, 2)])
def test_item_i_does_not_depend_on_where_the_stream_starts(num_workers, prefetch):
    full = _items(0, 5, num_workers=num_workers, prefetch=prefetch)
    _assert_same(_items(3, 5, num_workers=num_workers, prefetch=prefetch), full[3:])


def test_seed_and_rank_change_the_items():
    ref = _items(0, 3, prefetch=0)
    for other in (_items(0, 3, seed=4, prefetch=0), _items(0, 3, rank=1, prefetch=0)):
        assert not any(np.array_equal(a.img, b.img) for a, b in zip(ref, other))
