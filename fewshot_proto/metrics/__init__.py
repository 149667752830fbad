"""Evaluation metrics: 3-D overlap counts per (scan, class), surface distances in mm, aggregation, reports.

Modules:
    overlap    ``confusion`` (TP/FP/FN over a volume or slab), ``dice``/``iou``/``precision``/``recall`` with
               explicit empty-mask semantics, ``ScanCounts``.
    distance   ``hd95``/``assd``/``surface_metrics`` in mm (scipy).
    aggregate  ``MetricRow``, ``MetricTable``: per-class mean/std over scans, mean over classes, across folds,
               bootstrap CIs.
    report     strict ``metrics.json``, ``metrics.csv``, ``summary.md``; ``format_dice_table``.
    overlay    three-panel PNG overlays (PIL).

Importing this package imports numpy and scipy (``aggregate`` computes surface distances); ``hd95``, ``assd``,
``surface_metrics``, ``save_overlay`` and ``save_volume_overlays`` are resolved on first access (``overlay``
imports PIL).
"""
from __future__ import annotations

from .aggregate import METRICS, MetricRow, MetricTable, bootstrap_ci, nan_stats
from .overlap import ScanCounts, confusion, dice, foreground_slab, iou, precision, recall
from .report import format_dice_table, format_summary_markdown, read_metrics_json, write_report

__all__ = [
    "METRICS",
    "MetricRow",
    "MetricTable",
    "ScanCounts",
    "assd",
    "bootstrap_ci",
    "confusion",
    "dice",
    "foreground_slab",
    "format_dice_table",
    "format_summary_markdown",
    "hd95",
    "iou",
    "nan_stats",
    "precision",
    "read_metrics_json",
    "recall",
    "save_overlay",
    "save_volume_overlays",
    "surface_metrics",
    "write_report",
]

_LAZY = {
    "hd95": "distance",
    "assd": "distance",
    "surface_metrics": "distance",
    "save_overlay": "overlay",
    "save_volume_overlays": "overlay",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
