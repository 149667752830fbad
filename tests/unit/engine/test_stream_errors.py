"""Errors raised while sampling keep their type and message, wherever the sampling runs."""
from __future__ import annotations

import numpy as np
import pytest

from fewshot_proto.engine.stream import EpisodeSource
from fewshot_proto.errors import DataError


class _Item:
    def __init__(self, value: int) -> None:
        self.meta = {"value": value}


class _FailsAtThird:
    """Draws from ``self.rng`` like a real sampler; the third item's scan is unreadable."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)
        self.calls = 0

    def sample(self):
        self.calls += 1
        value = int(self.rng.integers(1000))
        if self.calls == 3:
            raise DataError("scan 'image_7': /data/image_7.nii.gz is corrupt or truncated")
        return _Item(value)


@pytest.mark.parametrize("num_workers, prefetch", [(1, 2), (0, 2), (0, 0)])
def test_a_data_error_in_the_sampler_reaches_the_loop_as_itself(num_workers, prefetch):
    """A DataLoader worker would wrap the error in a multi-line worker traceback; the stream re-raises the
    original DataError (one line for the CLI), after yielding the items before it."""
    items = EpisodeSource(_FailsAtThird(), seed=0).stream(0, 5, prefetch=prefetch, num_workers=num_workers)
    assert next(items).meta["value"] == EpisodeSource(_FailsAtThird(), seed=0).episode(0).meta["value"]
    next(items)
    with pytest.raises(DataError) as e:
        next(items)
    assert str(e.value) == "scan 'image_7': /data/image_7.nii.gz is corrupt or truncated"
    assert type(e.value) is DataError
