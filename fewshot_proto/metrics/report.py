"""Write evaluation results: ``metrics.json``, ``metrics.csv``, ``summary.md``; format terminal tables.

Encoding rules (so every file is valid, strict JSON / plain CSV):

* JSON: ``NaN`` -> ``null``; ``+inf`` -> ``"inf"``; ``-inf`` -> ``"-inf"`` (strings; no metric produces an
  infinity by default, but a caller's value still encodes); numpy scalars/arrays -> numbers/lists; tuples ->
  lists; paths -> str. Files are written with ``allow_nan=False``. ``read_metrics_json`` turns those values back
  into floats in the numeric fields (metric columns, ``mean``/``std``/``ci``).
* Surface distances: ``metrics.json`` carries ``"surface_distance"`` (how HD95/ASSD were defined, units: see
  ``distance.surface_distance_convention``) and ``n_empty`` (scans where exactly one of prediction and truth is
  empty, so HD95/ASSD are NaN) overall and per class; each row has ``one_empty``. ``metrics.csv`` has the per-row
  ``one_empty`` flag and a ``surface_distance`` column holding the convention's tag
  (``hd95=max-of-directed-p95;assd=pooled-mean;mm`` by default); ``summary.md`` states the convention in one line
  and shows ``n_empty`` per class.
* CSV: one row per (fold, scan, class); NaN as ``nan`` and infinities as ``inf``/``-inf`` (``float()`` and
  pandas parse both); a missing fold as an empty cell; ``extra`` keys become extra columns (JSON-encoded when
  not scalar).
* Human tables (``summary.md``, ``format_dice_table``): Dice/IoU/precision/recall in percent, distances in mm,
  ``mean ± std``; ``n/a`` for NaN.

Every file is written atomically (temporary file in the same directory, ``fsync``, ``os.replace``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from .aggregate import METRICS, MetricRow, MetricTable
from .distance import surface_distance_convention

__all__ = [
    "FORMAT",
    "to_jsonable",
    "dumps_strict",
    "atomic_write_text",
    "atomic_write_bytes",
    "build_meta",
    "metrics_document",
    "read_metrics_json",
    "rows_to_csv",
    "format_dice_table",
    "format_summary_markdown",
    "write_report",
]

#: Value of the ``"format"`` key of ``metrics.json``.
FORMAT = "fewshot_proto.metrics/1"

#: Keys whose values are restored to floats (``null`` -> NaN, ``"inf"`` -> inf) when reading ``metrics.json``.
_FLOAT_KEYS = frozenset(METRICS) | {"mean", "std", "ci"}

_PERCENT = {"dice", "iou", "precision", "recall"}
_LABELS = {
    "dice": "Dice (%)",
    "iou": "IoU (%)",
    "precision": "Precision (%)",
    "recall": "Recall (%)",
    "hd95": "HD95 (mm)",
    "assd": "ASSD (mm)",
}

PathLike = Union[str, "os.PathLike[str]"]


# ------------------------------------------------------------------------------------------- JSON
def _float(x: float) -> Any:
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def to_jsonable(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts (see module docstring)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _float(float(obj))
    if isinstance(obj, MetricRow):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} value {obj!r} as JSON")


def dumps_strict(obj: Any, *, indent: Optional[int] = 2) -> str:
    """Strict JSON text of ``obj`` (NaN -> null, inf -> "inf")."""
    return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def _restore(obj: Any, numeric: bool = False) -> Any:
    if isinstance(obj, dict):
        return {k: _restore(v, numeric=k in _FLOAT_KEYS) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v, numeric) for v in obj]
    if numeric:
        if obj is None:
            return float("nan")
        if obj == "inf":
            return float("inf")
        if obj == "-inf":
            return float("-inf")
    return obj


def read_metrics_json(path: PathLike) -> Dict[str, Any]:
    """Load a ``metrics.json`` and turn ``null``/``"inf"`` back into NaN/inf in the numeric fields."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read metrics JSON ({e})") from None
    return _restore(doc)


# ---------------------------------------------------------------------------------- atomic files
def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (tmp file in the same directory + ``os.replace``), readable by all
    (mode 0644, not ``mkstemp``'s 0600: reports are shared)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return p


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------------------------ documents
def build_meta(meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """``meta`` plus ``package_version`` and ``time`` (UTC, ISO 8601) when absent.

    Expected keys (all optional, passed by the caller): ``protocol``, ``setting``, ``folds`` (or ``fold``),
    ``shots``, ``dataset``, ``checkpoint``, ``model``, ``seed``, ``manifest``.
    """
    out = dict(meta or {})
    out.setdefault("package_version", __version__)
    out.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return out


def metrics_document(
    table: MetricTable, summary: Mapping[str, Any], meta: Optional[Mapping[str, Any]] = None
) -> Dict[str, Any]:
    """The ``metrics.json`` content: ``{"format", "meta", <summary keys>, "rows"}`` (not yet sanitised)."""
    doc: Dict[str, Any] = {"format": FORMAT, "meta": build_meta(meta)}
    doc.update(summary)
    doc["rows"] = [r.to_dict() for r in table]
    return doc


_CSV_FIELDS = ("fold", "scan", "class_id", "class_name", "n_slices", "tp", "fp", "fn") + METRICS + ("one_empty",)
#: CSV column naming the surface-distance convention of ``hd95``/``assd`` (the same tag on every row).
_CSV_CONVENTION = "surface_distance"


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if isinstance(v, (bool, np.bool_, int, np.integer, str)):
        return str(v)
    return json.dumps(to_jsonable(v), allow_nan=False)


def rows_to_csv(rows: Iterable[MetricRow], *, surface_distance: Optional[str] = None) -> str:
    """CSV text, one line per row: the row fields (``one_empty`` as ``True``/``False``), then the
    ``surface_distance`` column (``surface_distance``, default: the tag of the default convention, or of the
    table's when ``rows`` is a ``MetricTable``), then the ``extra`` keys (union over rows, first-seen order)."""
    if surface_distance is None:
        conv = (rows.hd_reduction, rows.assd_reduction) if isinstance(rows, MetricTable) else ()
        surface_distance = surface_distance_convention(*conv)["tag"]
    rows = list(rows)
    fixed = _CSV_FIELDS + (_CSV_CONVENTION,)
    extra_keys: List[str] = []
    for r in rows:
        for k in r.extra:
            if k not in extra_keys and k not in fixed:
                extra_keys.append(k)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(list(fixed) + extra_keys)
    for r in rows:
        w.writerow([_csv_cell(getattr(r, k)) for k in _CSV_FIELDS] + [surface_distance]
                   + [_csv_cell(r.extra.get(k)) for k in extra_keys])
    return buf.getvalue()


# ------------------------------------------------------------------------------------ formatting
def _num(v: Any) -> float:
    """A stats value as float; accepts the JSON encodings (``None`` -> NaN, ``"inf"``/``"-inf"``)."""
    if v is None:
        return float("nan")
    if isinstance(v, str):
        return {"inf": float("inf"), "-inf": float("-inf")}.get(v, float("nan"))
    return float(v)


def _stat_parts(stat: Optional[Mapping[str, Any]], metric: str, digits: int = 2) -> Tuple[str, str]:
    """``(mean, std)`` strings of a stats dict ("" for a missing std)."""
    if not stat:
        return "n/a", ""
    scale = 100.0 if metric in _PERCENT else 1.0
    mean, std = _num(stat.get("mean")), _num(stat.get("std"))
    if math.isnan(mean):
        m, sd = "n/a", ""
    elif math.isinf(mean):
        m, sd = ("inf" if mean > 0 else "-inf"), ""
    else:
        m = f"{mean * scale:.{digits}f}"
        sd = "" if math.isnan(std) else f"{std * scale:.{digits}f}"
    return m, sd


def _fmt_stat(stat: Optional[Mapping[str, Any]], metric: str) -> str:
    """``"mean ± std"`` (percent for overlap scores, mm for distances), ``n/a`` when undefined."""
    m, sd = _stat_parts(stat, metric)
    return m + (f" ± {sd}" if sd else "")


def _fmt_column(stats: Sequence[Optional[Mapping[str, Any]]], metric: str) -> List[str]:
    """``_fmt_stat`` of every entry, padded so the means, the "±" and the stds line up."""
    parts = [_stat_parts(st, metric) for st in stats]
    wm = max(len(p[0]) for p in parts)
    ws = max(len(p[1]) for p in parts)
    out = []
    for m, sd in parts:
        tail = f" ± {sd.rjust(ws)}" if sd else (" " * (ws + 3) if ws else "")
        out.append(m.rjust(wm) + tail)
    return out


def _align(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if rt else c.ljust(w) for c, w, rt in zip(r, widths, right)]
        out.append("  ".join(cells).rstrip())
    return out


def format_dice_table(summary: Mapping[str, Any], *, metric: str = "dice") -> str:
    """Plain-text, aligned per-class table of one metric (default Dice, in %) for the terminal.

    Columns: class id, name, scans (valid/total), mean ± std over scans; plus mean ± std over folds when the
    summary has ``across_folds``. Last line: the mean over classes.
    """
    label = _LABELS.get(metric, metric)
    af = summary.get("across_folds")
    header = ["class", "name", "scans", label]
    if af:
        header.append(f"{label} over {af.get('n_folds', '?')} folds")
    per_class = summary.get("per_class", {})
    ov = summary.get("overall", {}).get(metric, {})
    col = _fmt_column([d.get(metric) for d in per_class.values()] + [ov], metric)
    col_f = None
    if af:
        fold_stats = [af["per_class"].get(str(c), {}).get(metric) for c in per_class] + [af["overall"].get(metric)]
        col_f = _fmt_column(fold_stats, metric)
    rows = [header]
    for i, (c, d) in enumerate(per_class.items()):
        st = d.get(metric) or {}
        r = [str(c), str(d.get("class_name", "")), f"{st.get('n_valid', 0)}/{st.get('n', 0)}", col[i]]
        if col_f:
            r.append(col_f[i])
        rows.append(r)
    last = ["mean", "", f"{ov.get('n_classes', 0)} cls", col[-1]]
    if col_f:
        last.append(col_f[-1])
    rows.append(last)
    lines = _align(rows, [False, False, True] + [True] * (len(header) - 3))
    rule = "-" * max(len(line) for line in lines)
    return "\n".join([lines[0], rule] + lines[1:-1] + [rule, lines[-1]])


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    align = "|".join("---" if i < 2 else "---:" for i in range(len(header)))
    out = ["| " + " | ".join(header) + " |", "|" + align + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def format_summary_markdown(
    summary: Mapping[str, Any],
    meta: Optional[Mapping[str, Any]] = None,
    *,
    metrics: Sequence[str] = ("dice", "iou", "hd95", "assd"),
) -> str:
    """Markdown summary: a meta line, a per-class table (rows = classes, columns = ``metrics`` as
    mean ± std over scans, last row = mean over classes), and the same over folds when available.

    With HD95 or ASSD among ``metrics``: the scans table has an ``n_empty`` column (scans where exactly one of
    prediction and truth is empty: no distance) and one line names the surface-distance convention."""
    metrics = [m for m in metrics if m in summary.get("metrics", METRICS)]
    with_distances = any(m in ("hd95", "assd") for m in metrics)
    lines = ["# Evaluation summary", ""]
    if meta:
        keys = [k for k in ("dataset", "protocol", "setting", "shots", "folds", "fold", "model", "checkpoint",
                            "package_version", "time") if k in meta]
        keys += [k for k in meta if k not in keys and isinstance(meta[k], (str, int, float))]
        for k in keys:
            v = meta[k]
            v = ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
            lines.append(f"- **{k}**: {v}")
        lines.append("")

    def table(per_class: Mapping[str, Any], overall: Mapping[str, Any], count_key: str,
              n_empty: bool = False) -> List[str]:
        header = ["class", "name", count_key] + (["n_empty"] if n_empty else []) + [_LABELS[m] for m in metrics]
        rows = []
        for c, d in per_class.items():
            name = str(summary.get("per_class", {}).get(str(c), {}).get("class_name", d.get("class_name", "")))
            first = d.get(metrics[0], {}) if metrics else {}
            n = d.get("n_scans", first.get("n_folds", first.get("n", "")))
            ne = [str(d.get("n_empty", "n/a"))] if n_empty else []
            rows.append([str(c), name, str(n)] + ne + [_fmt_stat(d.get(m), m) for m in metrics])
        first_ov = overall.get(metrics[0], {}) if metrics else {}
        n_cls = first_ov.get("n_classes", first_ov.get("n_folds", ""))
        ne = [str(summary.get("n_empty", "n/a"))] if n_empty else []
        rows.append(["**mean**", "", str(n_cls)] + ne + [_fmt_stat(overall.get(m), m) for m in metrics])
        return _md_table(header, rows)

    lines.append("Mean ± std over scans (3-D scores per scan; mean row = mean over classes of the class means).")
    lines.append("")
    lines += table(summary.get("per_class", {}), summary.get("overall", {}), "scans", n_empty=with_distances)
    af = summary.get("across_folds")
    if af:
        lines += ["", f"Mean ± std over {af.get('n_folds')} folds (of the per-fold means).", ""]
        lines += table(af.get("per_class", {}), af.get("overall", {}), "folds")
    boot = summary.get("bootstrap")
    if boot:
        lines += ["", f"Bootstrap {100 * boot['level']:.0f}% CIs ({boot['n_boot']} resamples of scans):", ""]
        for c, d in summary.get("per_class", {}).items():
            for m in metrics:
                ci = d.get(m, {}).get("ci")
                if ci is not None:
                    lines.append(f"- class {c} {d.get('class_name', '')} {m}: {_fmt_ci(ci, m)}")
        for m in metrics:
            ci = summary.get("overall", {}).get(m, {}).get("ci")
            if ci is not None:
                lines.append(f"- overall {m}: {_fmt_ci(ci, m)}")
    lines += ["", "Dice/IoU in %, distances in mm. `n/a`: nothing to score."]
    if with_distances:
        conv = summary.get("surface_distance") or {}
        lines.append(
            f"Surface distances ({conv.get('units', 'mm')}): HD95 = {conv.get('hd95', 'convention not recorded')}; "
            f"ASSD = {conv.get('assd', 'convention not recorded')}. `n_empty`: scans where exactly one of "
            "prediction and truth is empty (no distance, left out of the means; the mean row counts all classes)."
        )
    lines.append("")
    return "\n".join(lines)


def _fmt_ci(ci: Sequence[Any], metric: str) -> str:
    scale = 100.0 if metric in _PERCENT else 1.0
    vals = [_num(v) for v in ci]
    if any(math.isnan(v) for v in vals):
        return "n/a"
    return f"[{vals[0] * scale:.2f}, {vals[1] * scale:.2f}]"


# ------------------------------------------------------------------------------------- writing
def write_report(
    out_dir: PathLike,
    table: MetricTable,
    meta: Optional[Mapping[str, Any]] = None,
    *,
    summary: Optional[Mapping[str, Any]] = None,
    bootstrap: int = 0,
    seed: int = 0,
    prefix: str = "",
) -> Dict[str, Any]:
    """Write ``metrics.json``, ``metrics.csv`` and ``summary.md`` into ``out_dir`` (created if needed).

    Args:
        table: the filled ``MetricTable``.
        meta: provenance (protocol, setting, folds, shots, checkpoint, ...); ``package_version`` and ``time``
            are added when absent.
        summary: a precomputed ``table.summary()``; computed here (with ``bootstrap`` resamples and ``seed``)
            otherwise.
        prefix: file name prefix (``"fold0_"`` -> ``fold0_metrics.json``).

    Returns:
        ``{"json": Path, "csv": Path, "markdown": Path, "summary": dict, "meta": dict}``.
    """
    if len(table) == 0:
        raise ValueError(f"write_report({os.fspath(out_dir)!r}): the metric table is empty; nothing to report")
    out = Path(out_dir)
    s = dict(summary) if summary is not None else table.summary(bootstrap=bootstrap, seed=seed)
    m = build_meta(meta)
    doc = metrics_document(table, s, m)
    pj = atomic_write_text(out / f"{prefix}metrics.json", dumps_strict(doc) + "\n")
    pc = atomic_write_text(out / f"{prefix}metrics.csv", rows_to_csv(table))
    pm = atomic_write_text(out / f"{prefix}summary.md", format_summary_markdown(s, m))
    return {"json": pj, "csv": pc, "markdown": pm, "summary": s, "meta": m}
