"""weighted_cross_entropy on logits whose softmax is known by hand."""
from __future__ import annotations

import math

import pytest
import torch

from fewshot_proto.losses import WeightedCrossEntropyLoss, weighted_cross_entropy

# two pixels: logits (0, 0) -> p = (1/2, 1/2); logits (0, ln 3) -> p = (1/4, 3/4)
LOGITS = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])  # [1, 2, 1, 2]
TARGET = torch.tensor([[[0, 1]]])  # [1, 1, 2]


def test_mean_ce_by_hand():
    expected = (math.log(2.0) + math.log(4.0 / 3.0)) / 2
    assert weighted_cross_entropy(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_class_weights_give_weighted_mean():
    expected = (1.0 * math.log(2.0) + 3.0 * math.log(4.0 / 3.0)) / (1.0 + 3.0)
    assert weighted_cross_entropy(LOGITS, TARGET, weight=[1.0, 3.0]).item() == pytest.approx(expected, rel=1e-6)
    mod = WeightedCrossEntropyLoss(weight=[1.0, 3.0])
    assert mod(LOGITS, TARGET).item() == pytest.approx(expected, rel=1e-6)


def test_ignore_index_and_reductions():
    t = torch.tensor([[[0, 255]]])
    assert weighted_cross_entropy(LOGITS, t, ignore_index=255).item() == pytest.approx(math.log(2.0), rel=1e-6)
    none = weighted_cross_entropy(LOGITS, TARGET, reduction="none")
    assert none.shape == (1, 1, 2)
    torch.testing.assert_close(none[0, 0], torch.tensor([math.log(2.0), math.log(4.0 / 3.0)]))
    s = weighted_cross_entropy(LOGITS, TARGET, reduction="sum").item()
    assert s == pytest.approx(math.log(2.0) + math.log(4.0 / 3.0), rel=1e-6)


def test_bf16_logits_are_computed_in_float32():
    out = weighted_cross_entropy(LOGITS.bfloat16(), TARGET)
    assert out.dtype == torch.float32 and math.isfinite(out.item())


@pytest.mark.parametrize(
    "logits,target,kwargs,match",
    [
        (LOGITS, torch.tensor([[0, 1]]), {}, "disagree"),
        (LOGITS, TARGET.float(), {}, "int64"),
        (LOGITS, TARGET, {"weight": [1.0, 2.0, 3.0]}, "one entry per class"),
        (LOGITS, TARGET, {"weight": [1.0, -1.0]}, ">= 0"),
        (LOGITS, TARGET, {"reduction": "avg"}, "reduction"),
    ],
)
def test_invalid_inputs(logits, target, kwargs, match):
    with pytest.raises(ValueError, match=match):
        weighted_cross_entropy(logits, target, **kwargs)
