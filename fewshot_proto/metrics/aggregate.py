"""Collect per-(fold, scan, class) metric rows and reduce them the way the field reports them.

Reductions (all nan-aware; ``std`` uses ``ddof=0`` by default, as ``np.nanstd`` in SSL-ALPNet):

* per class: mean and std over the rows (scans) of that class, with ``n`` (rows) and ``n_valid`` (non-NaN
  values). NaN values are skipped: nothing to score (both masks empty), a metric not computed, or a surface
  distance that is undefined because exactly one of prediction and truth is empty. Those last scans are counted
  per class as ``n_empty`` (``MetricRow.one_empty``), so they are reported rather than silently dropped.
* overall: the mean over classes of the per-class means (the field's convention: each class weighs the same,
  whatever its number of scans), with ``n_classes`` contributing a non-NaN mean; ``std`` is over classes.
* across folds: the per-class and overall means above computed fold by fold, then mean and std over folds
  (``n_folds`` valid).
* bootstrap (optional): percentile confidence intervals from resampling the (fold, scan) units with
  replacement, with a seeded ``np.random.Generator``.

This module needs numpy, and scipy through ``fewshot_proto.metrics.distance`` (``MetricTable.add_prediction``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..types import natural_key
from .distance import ASSD_CONVENTIONS, HD95_CONVENTIONS, surface_distance_convention, surface_metrics
from .overlap import ScanCounts, ZSelect

__all__ = ["METRICS", "MetricRow", "MetricTable", "nan_stats", "bootstrap_ci"]

#: Metric columns of a ``MetricRow``, in report order. Dice, IoU, precision and recall are fractions in [0, 1];
#: HD95 and ASSD are millimetres.
METRICS: Tuple[str, ...] = ("dice", "iou", "precision", "recall", "hd95", "assd")

_NAN = float("nan")


@dataclass
class MetricRow:
    """Scores of one (fold, scan, class): counts over the scored slices plus the derived metrics.

    Attributes:
        scan: query scan id.
        class_id: label value.
        class_name: human name of the class ("" when unknown).
        fold: evaluation fold (``None`` when the protocol has no folds).
        tp, fp, fn: voxel counts summed over the scored slices of the 3-D volume.
        n_slices: number of slices scored.
        dice, iou, precision, recall: fractions (see ``fewshot_proto.metrics.overlap`` for empty masks).
        hd95, assd: millimetres (``fewshot_proto.metrics.distance``; NaN when not computed or when a mask is empty).
        one_empty: the surface distances were scored and exactly one of prediction and truth was empty there
            (so ``hd95``/``assd`` are NaN); counted per class as ``n_empty``.
        extra: anything else to carry into the per-scan CSV/JSON (support scan id, slab, timing, ...).
    """

    scan: str
    class_id: int
    class_name: str = ""
    fold: Optional[int] = None
    tp: int = 0
    fp: int = 0
    fn: int = 0
    n_slices: int = 0
    dice: float = _NAN
    iou: float = _NAN
    precision: float = _NAN
    recall: float = _NAN
    hd95: float = _NAN
    assd: float = _NAN
    one_empty: bool = False
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> Tuple[Optional[int], str, int]:
        return (self.fold, self.scan, self.class_id)

    @classmethod
    def from_counts(
        cls,
        counts: ScanCounts,
        *,
        class_name: str = "",
        empty: float = _NAN,
        hd95: float = _NAN,
        assd: float = _NAN,
        one_empty: bool = False,
        extra: Optional[Mapping[str, Any]] = None,
    ) -> "MetricRow":
        """A row whose overlap scores are reduced from ``counts`` (``empty`` for both-empty masks)."""
        return cls(
            scan=counts.scan,
            class_id=counts.class_id,
            class_name=class_name,
            fold=counts.fold,
            tp=counts.tp,
            fp=counts.fp,
            fn=counts.fn,
            n_slices=counts.n_slices,
            **counts.scores(empty=empty),
            hd95=float(hd95),
            assd=float(assd),
            one_empty=bool(one_empty),
            extra=dict(extra or {}),
        )

    def to_dict(self) -> Dict[str, Any]:
        """Flat dict: the fields, with ``extra`` kept as a nested dict."""
        return asdict(self)


def nan_stats(values: Sequence[float], *, ddof: int = 0) -> Dict[str, Any]:
    """``{"mean", "std", "n", "n_valid"}`` of ``values`` skipping NaN. ``mean``/``std`` are NaN when nothing is
    valid; ``std`` is NaN when fewer than ``ddof + 1`` values are valid."""
    v = np.asarray(list(values), dtype=np.float64)
    x = v[~np.isnan(v)]
    n_valid = int(x.size)
    mean = float(np.mean(x)) if n_valid else _NAN
    with np.errstate(invalid="ignore"):  # an infinite value (a caller's choice) makes std NaN, silently
        std = float(np.std(x, ddof=ddof)) if n_valid > ddof else _NAN
    return {"mean": mean, "std": std, "n": int(v.size), "n_valid": n_valid}


def bootstrap_ci(
    values: Sequence[float],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    rng: Optional[np.random.Generator] = None,
    seed: int = 0,
) -> Tuple[float, float]:
    """Percentile bootstrap CI of the nan-mean of ``values`` (NaN skipped; ``(nan, nan)`` if none valid).

    ``rng`` wins over ``seed``; the same generator state gives the same interval.
    """
    v = np.asarray(list(values), dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (_NAN, _NAN)
    _check_boot(n_boot, level)
    g = rng if rng is not None else np.random.default_rng(seed)
    idx = g.integers(0, v.size, size=(n_boot, v.size))
    means = v[idx].mean(axis=1)
    lo, hi = np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def _check_boot(n_boot: int, level: float) -> None:
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"bootstrap level must be in (0, 1); got {level}")


def _fold_key(f: Optional[int]) -> str:
    return "none" if f is None else str(f)


class MetricTable:
    """Rows of scores, one per (fold, scan, class), and their reductions.

    Example::

        table = MetricTable(class_names={1: "liver", 4: "spleen"})
        table.add_prediction(pred_zhw, truth_zhw == 1, scan="3", class_id=1, fold=0, spacing=(7.7, 1.5, 1.5))
        summary = table.summary()           # JSON-ready dict (NaN still floats: see report.py)
        summary["per_class"]["1"]["dice"]   # {"mean": ..., "std": ..., "n": ..., "n_valid": ...}

    Args:
        class_names: ``{class_id: name}`` used when a row has no name.
        ddof: delta degrees of freedom of every std (0 = population std, the field's habit).
        hd_reduction, assd_reduction: the surface-distance convention of ``add_prediction`` (and of every caller
            that scores distances for this table), named in ``summary()["surface_distance"]``: ``"max"`` /
            ``"pooled"`` are MONAI's (default), ``"pooled"`` / ``"mean"`` medpy's (``fewshot_proto.metrics.distance``).
    """

    def __init__(
        self,
        class_names: Optional[Mapping[int, str]] = None,
        *,
        ddof: int = 0,
        hd_reduction: str = "max",
        assd_reduction: str = "pooled",
    ) -> None:
        if hd_reduction not in HD95_CONVENTIONS:
            raise ValueError(f"hd95 reduction must be 'max' or 'pooled'; got {hd_reduction!r}")
        if assd_reduction not in ASSD_CONVENTIONS:
            raise ValueError(f"assd reduction must be 'pooled' or 'mean'; got {assd_reduction!r}")
        self.class_names: Dict[int, str] = {int(k): str(v) for k, v in (class_names or {}).items()}
        self.ddof = int(ddof)
        self.hd_reduction = hd_reduction
        self.assd_reduction = assd_reduction
        self._rows: List[MetricRow] = []
        self._keys: Dict[Tuple[Optional[int], str, int], int] = {}

    # ------------------------------------------------------------------ rows
    def add(self, row: MetricRow) -> MetricRow:
        """Append ``row``; raises ``ValueError`` if its (fold, scan, class) is already present."""
        if row.key in self._keys:
            raise ValueError(
                f"duplicate metric row for fold {row.fold}, scan {row.scan!r}, class {row.class_id}: "
                f"accumulate TP/FP/FN over the whole volume first (ScanCounts.__add__), then add one row"
            )
        if not row.class_name:
            row.class_name = self.class_names.get(row.class_id, "")
        elif row.class_id not in self.class_names:
            self.class_names[row.class_id] = row.class_name
        self._keys[row.key] = len(self._rows)
        self._rows.append(row)
        return row

    def extend(self, rows: Iterable[MetricRow]) -> None:
        for r in rows:
            self.add(r)

    def add_counts(
        self,
        counts: ScanCounts,
        *,
        empty: float = _NAN,
        hd95: float = _NAN,
        assd: float = _NAN,
        class_name: str = "",
        extra: Optional[Mapping[str, Any]] = None,
    ) -> MetricRow:
        """Add a row from accumulated counts (distances given, or NaN when not computed)."""
        return self.add(
            MetricRow.from_counts(counts, class_name=class_name, empty=empty, hd95=hd95, assd=assd, extra=extra)
        )

    def add_prediction(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        *,
        scan: str,
        class_id: int,
        fold: Optional[int] = None,
        spacing: Sequence[float] = (1.0, 1.0, 1.0),
        zs: ZSelect = None,
        class_name: str = "",
        distances: bool = True,
        empty: float = _NAN,
        both_empty_distance: float = _NAN,
        one_empty_distance: float = _NAN,
        extra: Optional[Mapping[str, Any]] = None,
    ) -> MetricRow:
        """Score a binary prediction volume against a binary truth volume and add the row.

        Args:
            pred: ``[Z, H, W]`` binary prediction of ``class_id`` (bool / 0-1).
            truth: ``[Z, H, W]`` binary ground truth of ``class_id`` (pass ``label == class_id``).
            spacing: voxel size ``(z, y, x)`` mm for HD95/ASSD.
            zs: slices to score (``None`` = all; ``slice(z0, z1 + 1)`` = slab); distances need a contiguous
                slab.
            distances: compute HD95 and ASSD with the table's convention (NaN otherwise); a row whose prediction
                or truth (not both) is empty in ``zs`` gets ``one_empty_distance`` (NaN) and ``one_empty=True``.
            empty: overlap score when both masks are empty in the scored slices (see ``overlap``).
            both_empty_distance, one_empty_distance: distance values for empty masks (see ``distance``).
        """
        for name, arr in (("prediction", pred), ("ground truth", truth)):
            a = np.asarray(arr)
            if np.issubdtype(a.dtype, np.integer) and a.size and (a.max() > 1 or a.min() < 0):
                raise ValueError(
                    f"scan {scan!r}, class {class_id}: {name} holds label values other than 0/1 "
                    f"(max {a.max()}); pass a binary mask, e.g. label == {class_id}"
                )
        counts = ScanCounts.from_masks(pred, truth, scan=scan, class_id=class_id, zs=zs, fold=fold)
        h = a = _NAN
        one = False
        if distances:
            try:
                d = surface_metrics(
                    pred,
                    truth,
                    spacing,
                    zs=zs,
                    hd_reduction=self.hd_reduction,
                    assd_reduction=self.assd_reduction,
                    both_empty=both_empty_distance,
                    one_empty=one_empty_distance,
                )
            except ValueError as e:
                raise ValueError(f"scan {scan!r}, class {class_id}: {e}") from None
            h, a, one = d["hd95"], d["assd"], d["empty_masks"] == 1
        row = MetricRow.from_counts(
            counts, class_name=class_name, empty=empty, hd95=h, assd=a, one_empty=one, extra=extra
        )
        return self.add(row)

    @property
    def rows(self) -> List[MetricRow]:
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[MetricRow]:
        return iter(list(self._rows))

    def classes(self) -> List[int]:
        return sorted({r.class_id for r in self._rows})

    def folds(self) -> List[Optional[int]]:
        """Folds present, ``None`` last."""
        fs = {r.fold for r in self._rows}
        return sorted(f for f in fs if f is not None) + ([None] if None in fs else [])

    def class_name(self, class_id: int) -> str:
        return self.class_names.get(int(class_id), "")

    def select(self, *, fold: Any = "all", class_id: Optional[int] = None) -> List[MetricRow]:
        """Rows of one fold (``fold="all"`` for every fold; ``None`` is a valid fold) and/or one class."""
        return [
            r
            for r in self._rows
            if (fold == "all" or r.fold == fold) and (class_id is None or r.class_id == class_id)
        ]

    # ------------------------------------------------------------ reductions
    def per_class(
        self, metrics: Sequence[str] = METRICS, *, fold: Any = "all"
    ) -> Dict[int, Dict[str, Dict[str, Any]]]:
        """``{class_id: {metric: nan_stats}}`` over the rows (scans) of ``fold`` (default: all folds pooled)."""
        _check_metrics(metrics)
        out: Dict[int, Dict[str, Dict[str, Any]]] = {}
        for c in self.classes():
            rows = self.select(fold=fold, class_id=c)
            if not rows:
                continue
            out[c] = {
                m: nan_stats([getattr(r, m) for r in rows], ddof=self.ddof)
                for m in metrics
            }
        return out

    def overall(
        self, metrics: Sequence[str] = METRICS, *, fold: Any = "all", per_class: Optional[Mapping] = None
    ) -> Dict[str, Dict[str, Any]]:
        """``{metric: {"mean", "std", "n_classes"}}``: mean/std over classes of the per-class means."""
        pc = self.per_class(metrics, fold=fold) if per_class is None else per_class
        out: Dict[str, Dict[str, Any]] = {}
        for m in metrics:
            s = nan_stats([pc[c][m]["mean"] for c in pc], ddof=self.ddof)
            out[m] = {"mean": s["mean"], "std": s["std"], "n_classes": s["n_valid"]}
        return out

    def across_folds(self, metrics: Sequence[str] = METRICS) -> Dict[str, Any]:
        """Fold-level means, then mean/std over folds.

        Returns ``{"folds": [...], "per_class": {class_id: {metric: {"mean", "std", "n_folds"}}},
        "overall": {metric: {"mean", "std", "n_folds"}}}``.
        """
        folds = self.folds()
        per_fold_pc = {f: self.per_class(metrics, fold=f) for f in folds}
        per_fold_ov = {f: self.overall(metrics, per_class=per_fold_pc[f]) for f in folds}
        pc: Dict[int, Dict[str, Dict[str, Any]]] = {}
        for c in self.classes():
            pc[c] = {}
            for m in metrics:
                vals = [per_fold_pc[f][c][m]["mean"] for f in folds if c in per_fold_pc[f]]
                s = nan_stats(vals, ddof=self.ddof)
                pc[c][m] = {"mean": s["mean"], "std": s["std"], "n_folds": s["n_valid"]}
        ov: Dict[str, Dict[str, Any]] = {}
        for m in metrics:
            s = nan_stats([per_fold_ov[f][m]["mean"] for f in folds], ddof=self.ddof)
            ov[m] = {"mean": s["mean"], "std": s["std"], "n_folds": s["n_valid"]}
        return {"folds": folds, "per_class": pc, "overall": ov, "_per_fold": (per_fold_pc, per_fold_ov)}

    def bootstrap(
        self,
        metrics: Sequence[str] = ("dice",),
        *,
        n_boot: int = 1000,
        level: float = 0.95,
        rng: Optional[np.random.Generator] = None,
        seed: int = 0,
    ) -> Dict[str, Any]:
        """Percentile bootstrap CIs of the per-class means and of the overall mean (mean of class means).

        The resampling unit is a (fold, scan) pair, drawn with replacement; all classes of a drawn scan come
        along, so the CI reflects the correlation between classes of one scan. NaN (and any infinite) values are
        treated as missing.

        Returns ``{"level", "n_boot", "per_class": {class_id: {metric: [lo, hi]}}, "overall": {metric: [lo, hi]}}``.
        """
        _check_metrics(metrics)
        _check_boot(n_boot, level)
        g = rng if rng is not None else np.random.default_rng(seed)
        units = sorted({(r.fold, r.scan) for r in self._rows}, key=lambda u: (_fold_key(u[0]), natural_key(u[1])))
        classes = self.classes()
        u_ix = {u: i for i, u in enumerate(units)}
        c_ix = {c: j for j, c in enumerate(classes)}
        q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
        out: Dict[str, Any] = {"level": float(level), "n_boot": int(n_boot), "per_class": {}, "overall": {}}
        if not units:
            return out
        draws = g.integers(0, len(units), size=(int(n_boot), len(units)))
        for m in metrics:
            mat = np.full((len(units), len(classes)), np.nan)
            for r in self._rows:
                mat[u_ix[(r.fold, r.scan)], c_ix[r.class_id]] = getattr(r, m)
            mat[~np.isfinite(mat)] = np.nan
            sample = mat[draws]  # [n_boot, n_units, n_classes]
            valid = ~np.isnan(sample)
            cnt = valid.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cls_means = np.where(valid, sample, 0.0).sum(axis=1) / cnt  # [n_boot, n_classes], nan if cnt 0
            for c, j in c_ix.items():
                col = cls_means[:, j]
                col = col[~np.isnan(col)]
                lo_hi = np.percentile(col, q).tolist() if col.size else [_NAN, _NAN]
                out["per_class"].setdefault(c, {})[m] = [float(x) for x in lo_hi]
            okc = ~np.isnan(cls_means)
            with np.errstate(invalid="ignore", divide="ignore"):
                ov = np.where(okc, cls_means, 0.0).sum(axis=1) / okc.sum(axis=1)
            ov = ov[~np.isnan(ov)]
            out["overall"][m] = [float(x) for x in np.percentile(ov, q)] if ov.size else [_NAN, _NAN]
        return out

    def summary(
        self,
        metrics: Sequence[str] = METRICS,
        *,
        bootstrap: int = 0,
        level: float = 0.95,
        rng: Optional[np.random.Generator] = None,
        seed: int = 0,
        bootstrap_metrics: Sequence[str] = ("dice",),
    ) -> Dict[str, Any]:
        """Everything a report needs, as a dict with string keys (floats may be NaN; see report.py).

        Layout::

            {"metrics": [...], "ddof": 0,
             "surface_distance": {"hd95": "...", "assd": "...", "units": "mm", ...},  # the convention, in words
             "n_empty": 3,                                # rows with exactly one empty mask, all classes
             "classes": [{"class_id": 1, "class_name": "liver"}, ...],
             "per_class": {"1": {"class_name": "liver", "n_scans": 20, "n_empty": 1,
                                 "dice": {"mean", "std", "n", "n_valid"[, "ci"]}, ...}, ...},
             "overall": {"dice": {"mean", "std", "n_classes"[, "ci"]}, ...},
             "folds": {"0": {"per_class": {...}, "overall": {...}}, ...},          # when any row has a fold
             "across_folds": {"n_folds": 5, "per_class": {...}, "overall": {...}}  # when >= 2 folds
             "bootstrap": {"level", "n_boot", "seed"}}                            # when bootstrap > 0

        ``per_class``/``overall`` pool every row (each scan once per fold it was a query in).
        """
        _check_metrics(metrics)
        pc = self.per_class(metrics)
        ov = self.overall(metrics, per_class=pc)
        out: Dict[str, Any] = {
            "metrics": list(metrics),
            "ddof": self.ddof,
            "surface_distance": surface_distance_convention(self.hd_reduction, self.assd_reduction),
            "n_empty": sum(bool(r.one_empty) for r in self._rows),
            "classes": [{"class_id": c, "class_name": self.class_name(c)} for c in self.classes()],
            "per_class": {
                str(c): {
                    "class_name": self.class_name(c),
                    "n_scans": len(self.select(class_id=c)),
                    "n_empty": sum(bool(r.one_empty) for r in self.select(class_id=c)),
                    **pc[c],
                }
                for c in pc
            },
            "overall": ov,
        }
        folds = self.folds()
        if any(f is not None for f in folds):
            af = self.across_folds(metrics)
            per_fold_pc, per_fold_ov = af.pop("_per_fold")
            out["folds"] = {
                _fold_key(f): {
                    "per_class": {str(c): v for c, v in per_fold_pc[f].items()},
                    "overall": per_fold_ov[f],
                }
                for f in folds
            }
            if len(folds) >= 2:
                out["across_folds"] = {
                    "n_folds": len(folds),
                    "per_class": {str(c): v for c, v in af["per_class"].items()},
                    "overall": af["overall"],
                }
        if bootstrap:
            bm = [m for m in bootstrap_metrics if m in metrics]
            b = self.bootstrap(bm, n_boot=bootstrap, level=level, rng=rng, seed=seed)
            for c, d in b["per_class"].items():
                for m, ci in d.items():
                    out["per_class"][str(c)][m]["ci"] = ci
            for m, ci in b["overall"].items():
                out["overall"][m]["ci"] = ci
            out["bootstrap"] = {"level": b["level"], "n_boot": b["n_boot"], "seed": None if rng is not None else seed}
        return out


def _check_metrics(metrics: Sequence[str]) -> None:
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        raise ValueError(f"unknown metric(s) {bad}; known: {list(METRICS)}")
