"""The one inference path: ``evaluate`` and ``predict_volume`` both segment through these functions.

They use only the engine-facing calls of the model contract (``fewshot_proto.models.base``): the query slices of a
scan are encoded once for every class (``encode_query``, in batches), a support once per (support slices, class)
(``encode_support``, remembered by :class:`SupportCache`), and ``predict`` turns a batch of query rows and a
support state into foreground probabilities. A supervised model has ``needs_support = False``: no support is
loaded for it and its support state is the class.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, List, Optional, Sequence

import numpy as np
import torch

from fewshot_proto.engine.runtime import Runtime
from fewshot_proto.errors import ProtocolError
from fewshot_proto.models.base import Segmenter

__all__ = ["SupportCache", "check_segmenter", "check_model_classes", "encode_queries", "support_state",
           "foreground"]


def check_segmenter(model: Any) -> Segmenter:
    """``model`` if it follows the model contract, else ``TypeError`` saying what it must subclass."""
    if not isinstance(model, Segmenter):
        raise TypeError(f"{type(model).__name__} is not a fewshot_proto model: subclass "
                        f"fewshot_proto.models.base.FewShotSegmenter or SupervisedSegmenter")
    return model


def check_model_classes(model: Segmenter, class_ids: Sequence[int]) -> None:
    """Raise ``ProtocolError`` when a supervised model is asked for a class it was not trained for."""
    classes = getattr(model, "classes", None)
    if model.needs_support or classes is None:
        return
    missing = sorted({int(c) for c in class_ids} - {int(c) for c in classes})
    if missing:
        raise ProtocolError(
            f"the model segments classes {list(classes)} (the test classes it was trained on), but the episodes "
            f"ask for class(es) {missing}; evaluate it with --test-classes {','.join(map(str, classes))}"
        )


class SupportCache:
    """The last ``max_items`` support states, by key (least recently used dropped first); ``misses`` counts the
    states computed."""

    def __init__(self, max_items: int = 64) -> None:
        self._items: "OrderedDict[Hashable, Any]" = OrderedDict()
        self.max_items = max_items
        self.misses = 0

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        self.misses += 1
        value = make()
        self._items[key] = value
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
        return value


def encode_queries(model: Segmenter, query_img: torch.Tensor, runtime: Runtime, batch_size: int) -> List[torch.Tensor]:
    """``model.encode_query`` of every slice of ``query_img[Q, C, H, W]``, in batches, concatenated per level."""
    parts: List[List[torch.Tensor]] = []
    with runtime.autocast():
        for i in range(0, query_img.shape[0], batch_size):
            parts.append(model.encode_query(query_img[i:i + batch_size]))
    return [torch.cat([p[level] for p in parts]) for level in range(len(parts[0]))]


def support_state(model: Segmenter, support_img: Optional[np.ndarray], support_mask: Optional[np.ndarray],
                  class_id: int, runtime: Runtime) -> Any:
    """``model.encode_support`` of one support (numpy ``[S, C, H, W]`` image and ``[S, H, W]`` mask; ``None`` for a
    model that does not need it)."""
    s_img = s_mask = None
    if model.needs_support:
        s_img = runtime.tensor(support_img, torch.float32)
        s_mask = runtime.tensor(support_mask, torch.float32)
    with runtime.autocast():
        return model.encode_support(s_img, s_mask, int(class_id))


def foreground(model: Segmenter, query_state: List[torch.Tensor], rows: np.ndarray, state: Any, runtime: Runtime,
               batch_size: int) -> torch.Tensor:
    """Foreground probability float32 ``[len(rows), H, W]`` of query rows ``rows`` given a support state."""
    out = []
    with runtime.autocast():
        for i in range(0, len(rows), batch_size):
            r = torch.as_tensor(np.asarray(rows[i:i + batch_size]), device=query_state[0].device, dtype=torch.long)
            out.append(model.predict([t.index_select(0, r) for t in query_state], state).float())
    return torch.cat(out)
