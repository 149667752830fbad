"""Losses: pure functions plus thin ``nn.Module`` wrappers; never called inside a model's ``forward``.

* ``weighted_cross_entropy`` / ``WeightedCrossEntropyLoss``          (ce.py)
* ``dice_loss`` / ``DiceLoss``, ``dice_bce_loss`` / ``DiceBCELoss``   (dice.py)
* ``alignment_loss`` / ``AlignmentLoss`` (PANet PAR)                (alignment.py)
* ``cyclic_consistency_loss`` / ``CyclicConsistencyLoss``           (cyclic.py)
"""
from __future__ import annotations

from fewshot_proto.losses.alignment import AlignmentLoss, alignment_loss
from fewshot_proto.losses.ce import WeightedCrossEntropyLoss, weighted_cross_entropy
from fewshot_proto.losses.cyclic import CyclicConsistencyLoss, cyclic_consistency_loss
from fewshot_proto.losses.dice import DiceBCELoss, DiceLoss, dice_bce_loss, dice_loss

__all__ = [
    "weighted_cross_entropy",
    "WeightedCrossEntropyLoss",
    "dice_loss",
    "DiceLoss",
    "dice_bce_loss",
    "DiceBCELoss",
    "alignment_loss",
    "AlignmentLoss",
    "cyclic_consistency_loss",
    "CyclicConsistencyLoss",
]
