"""``report.html``: one self-contained page per evaluation, for looking at segmentations before trusting a number.

The page is built from the evaluation's own files, so it always shows what ``metrics.json`` says:

* ``metrics.json`` (``report.write_report``): the setup (``meta``), per-class summaries and per-scan rows;
* ``gallery/index.json`` and its PNGs (:func:`write_gallery`): for every scored (scan, class), the first, middle
  and last slice of the organ and the slice with the worst Dice, each one panel with the truth's and the
  prediction's contours on the image, false positives and false negatives filled in distinct colours, shown in
  the radiological view taken from the scan's affine (:func:`radiological_view`).

:func:`write_html_report` writes ``report.html`` with every image inlined (base64), so the single file can be
mailed or archived; it needs no model and can be rebuilt from an evaluation folder at any time. A short inline
script marks the page (``data-images-loaded``, ``data-errors`` on ``<body>``) and shows a banner when an image
fails to load.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from .overlay import mask_contour, to_uint8
from .report import atomic_write_bytes

__all__ = ["FP_COLOR", "FN_COLOR", "TRUTH_CONTOUR", "PRED_CONTOUR", "axis_codes", "radiological_view",
           "gallery_slices", "slice_dice", "render_panel", "write_gallery", "build_html", "write_html_report"]

FP_COLOR: Tuple[int, int, int] = (255, 60, 60)  # predicted, not true (false positive): red fill
FN_COLOR: Tuple[int, int, int] = (60, 140, 255)  # true, not predicted (false negative): blue fill
TRUTH_CONTOUR: Tuple[int, int, int] = (60, 230, 60)  # green line
PRED_CONTOUR: Tuple[int, int, int] = (255, 220, 0)  # yellow line
GALLERY_DIR = "gallery"


# ---------------------------------------------------------------------------------------------- orientation
def axis_codes(affine: np.ndarray) -> Tuple[str, str, str]:
    """The direction each array axis of a NIfTI file increases towards in the RAS+ world: ``"R"``/``"L"``,
    ``"A"``/``"P"``, ``"S"``/``"I"`` (the world axis its column of the affine points along most)."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    codes = []
    for j in range(3):
        col = a[:, j]
        k = int(np.argmax(np.abs(col)))
        codes.append(("RL", "AP", "SI")[k][0 if col[k] > 0 else 1])
    return tuple(codes)  # type: ignore[return-value]


def radiological_view(affine: np.ndarray, slice_axis: int) -> Tuple[bool, bool, bool]:
    """How to show a slice ``[H, W]`` of a ``Volume`` (slice axis moved to the front; H, W the file's other two
    axes in order) in the radiological convention: ``(transpose, flip_rows, flip_cols)``, applied in that order.

    Columns run from the patient's right to left (the right on the viewer's left) when the plane has a left-right
    axis, else from anterior to posterior; rows run from anterior to posterior in an axial plane, else from
    superior to inferior.
    """
    codes = axis_codes(affine)
    in_plane = [j for j in range(3) if j != int(slice_axis)]
    h, w = codes[in_plane[0]], codes[in_plane[1]]

    def family(c: str) -> str:
        return {"R": "RL", "L": "RL", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}[c]

    col_family = "RL" if "RL" in (family(h), family(w)) else "AP"
    transpose = family(h) == col_family  # the column axis must be W
    row_code, col_code = (w, h) if transpose else (h, w)
    flip_cols = col_code != ("L" if col_family == "RL" else "P")  # columns increase towards L (or P)
    flip_rows = row_code != ("P" if family(row_code) == "AP" else "I")  # rows increase towards P (or I)
    return transpose, flip_rows, flip_cols


def _orient(a: np.ndarray, view: Tuple[bool, bool, bool]) -> np.ndarray:
    transpose, flip_rows, flip_cols = view
    if transpose:
        a = a.T
    if flip_rows:
        a = a[::-1]
    if flip_cols:
        a = a[:, ::-1]
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------- panels
def slice_dice(truth: np.ndarray, pred: np.ndarray) -> float:
    """Dice of one slice; NaN when both are empty."""
    t, p = np.asarray(truth, bool), np.asarray(pred, bool)
    denom = int(t.sum()) + int(p.sum())
    return float("nan") if denom == 0 else 2.0 * int((t & p).sum()) / denom


def gallery_slices(truth: np.ndarray, pred: np.ndarray) -> List[Tuple[str, int]]:
    """Which of the scored slices ``truth[N, H, W]`` / ``pred[N, H, W]`` to show: ``("first" | "middle" | "last",
    i)`` of the truth's extent (the prediction's when the truth is empty) and ``("worst", i)``, the slice with the
    lowest Dice among slices where either is non-empty; each slice once, in slice order."""
    t = np.asarray(truth, bool).reshape(len(truth), -1).any(1)
    p = np.asarray(pred, bool).reshape(len(pred), -1).any(1)
    extent = np.flatnonzero(t) if t.any() else np.flatnonzero(p)
    picks: Dict[int, List[str]] = {}
    if len(extent):
        for tag, i in (("first", extent[0]), ("middle", extent[len(extent) // 2]), ("last", extent[-1])):
            picks.setdefault(int(i), []).append(tag)
    either = np.flatnonzero(t | p)
    if len(either):
        scores = [slice_dice(truth[i], pred[i]) for i in either]
        picks.setdefault(int(either[int(np.argmin(scores))]), []).append("worst")
    return [(", ".join(tags), i) for i, tags in sorted(picks.items())]


def render_panel(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, *, view=(False, False, False),
                 pixel_mm: Tuple[float, float] = (1.0, 1.0), min_size: int = 320) -> Image.Image:
    """One RGB panel: the grey slice, false positives (``FP_COLOR``) and false negatives (``FN_COLOR``) filled
    half-transparent, the truth's contour (``TRUTH_CONTOUR``) and the prediction's (``PRED_CONTOUR``) drawn over,
    oriented by ``view`` and scaled up to at least ``min_size`` px on its longer side with the pixels'
    in-plane aspect ``pixel_mm`` (row, column) kept."""
    grey = _orient(to_uint8(image), view)
    t = _orient(np.asarray(truth, bool), view)
    p = _orient(np.asarray(pred, bool), view)
    ry, rx = (float(pixel_mm[1]), float(pixel_mm[0])) if view[0] else (float(pixel_mm[0]), float(pixel_mm[1]))
    unit = min(ry, rx)
    h, w = grey.shape
    scale = max(1.0, min_size / max(h * ry / unit, w * rx / unit))
    size = (max(1, round(w * rx / unit * scale)), max(1, round(h * ry / unit * scale)))  # PIL: (width, height)
    g = np.asarray(Image.fromarray(grey).resize(size, Image.BILINEAR))
    t = np.asarray(Image.fromarray(t.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    p = np.asarray(Image.fromarray(p.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    rgb = np.repeat(g[..., None], 3, axis=2).astype(np.float64)
    for region, color in ((p & ~t, FP_COLOR), (t & ~p, FN_COLOR)):
        rgb[region] = 0.5 * rgb[region] + 0.5 * np.asarray(color, float)
    out = np.round(rgb).astype(np.uint8)
    out[mask_contour(t)] = TRUTH_CONTOUR
    out[mask_contour(p)] = PRED_CONTOUR
    return Image.fromarray(out)


def write_gallery(out_dir: Union[str, Path], items: Sequence[Mapping[str, Any]],
                  class_names: Optional[Mapping[int, str]] = None) -> List[Dict[str, Any]]:
    """Render the gallery of an evaluation into ``<out_dir>/gallery/`` and its ``index.json``; returns the index.

    ``items``: one per scored (scan, class): ``scan``, ``class_id``, ``zs`` (the scored slice indices), ``image``
    ``[N, H, W]``, ``truth`` and ``pred`` ``[N, H, W]`` bool (the scored slices), ``affine``, ``slice_axis``,
    ``spacing`` ``(z, y, x)`` mm.
    """
    folder = Path(out_dir) / GALLERY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    names = {int(k): str(v) for k, v in (class_names or {}).items()}
    index: List[Dict[str, Any]] = []
    for it in items:
        c, scan = int(it["class_id"]), str(it["scan"])
        view = radiological_view(it["affine"], int(it["slice_axis"]))
        spacing = tuple(float(s) for s in it["spacing"])
        for tag, i in gallery_slices(it["truth"], it["pred"]):
            z = int(it["zs"][i])
            file = f"class{c}_scan{scan}_z{z}.png"
            panel = render_panel(it["image"][i], it["truth"][i], it["pred"][i], view=view, pixel_mm=spacing[1:])
            buf = _png_bytes(panel)
            atomic_write_bytes(folder / file, buf)
            index.append({"file": f"{GALLERY_DIR}/{file}", "scan": scan, "class_id": c,
                          "class_name": names.get(c, ""), "z": z, "tag": tag,
                          "slice_dice": _json_number(slice_dice(it["truth"][i], it["pred"][i])),
                          "width": panel.width, "height": panel.height})
    atomic_write_bytes(folder / "index.json", (json.dumps(index, indent=1) + "\n").encode())
    return index


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _json_number(x: float) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


# ---------------------------------------------------------------------------------------------- the page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.setup td:first-child{font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:14px} figure{margin:0;border:1px solid #ddd;padding:6px;background:#fafafa}
figcaption{font-size:12px;margin-top:4px} .legend span{display:inline-block;width:14px;height:10px;margin:0 4px 0 12px}
#broken{display:none;background:#c00;color:#fff;padding:8px;font-weight:600}
"""

_SCRIPT = """
(function(){var errors=[];
window.addEventListener('error',function(e){errors.push((e.target&&e.target.src)?'load: '+e.target.src.slice(0,40):
  String(e.message));document.body.setAttribute('data-errors',String(errors.length));},true);
window.addEventListener('load',function(){var imgs=document.images,ok=0;
  for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0){ok++;}}
  document.body.setAttribute('data-images-loaded',ok+'/'+imgs.length);
  document.body.setAttribute('data-errors',String(errors.length));
  if(ok<imgs.length){document.getElementById('broken').style.display='block';}});})();
"""


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return html.escape(x)
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return str(int(x))
    if isinstance(x, (float, np.floating)):
        return "n/a" if math.isnan(x) else ("inf" if math.isinf(x) else f"{float(x):.{digits}f}")
    return html.escape(str(x))


def _setup_rows(meta: Mapping[str, Any]) -> List[Tuple[str, Any]]:
    keys = ["checkpoint", "model", "dataset", "protocol", "setting", "fold", "folds", "shots", "test_classes",
            "precision", "episodes", "trained_steps", "iters", "train_seconds", "package_version", "time"]
    rows = [(k, meta[k]) for k in keys if k in meta and meta[k] is not None]
    timing = meta.get("timing") or {}
    if "seconds" in timing:
        rows.append(("evaluation seconds", round(float(timing["seconds"]), 2)))
    return rows


def _strip_plot(rows: Sequence[Mapping[str, Any]], classes: Sequence[Mapping[str, Any]]) -> str:
    """Inline SVG: one column per class, a dot per scan at its Dice, a bar at the class mean."""
    width, height, pad, col = 120 * max(1, len(classes)) + 60, 260, 40, 120
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="per-scan Dice by class">']
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = pad + (1 - v) * (height - 2 * pad)
        parts.append(f'<line x1="{pad}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e3e3"/>'
                     f'<text x="{pad - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{v:.2f}</text>')
    for k, c in enumerate(classes):
        cx = pad + 20 + col * k + col / 2
        vals = [float(r["dice"]) for r in rows if int(r["class_id"]) == int(c["class_id"])
                and r.get("dice") is not None and not math.isnan(float(r["dice"]))]
        for j, v in enumerate(vals):
            x = cx + (j - (len(vals) - 1) / 2) * 6
            y = pad + (1 - v) * (height - 2 * pad)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="#2a6fdb" fill-opacity="0.8"/>')
        if vals:
            y = pad + (1 - float(np.mean(vals))) * (height - 2 * pad)
            parts.append(f'<line x1="{cx - 30:.1f}" x2="{cx + 30:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="#c00" '
                         f'stroke-width="2"/>')
        name = c.get("class_name") or ""
        label = f'{int(c["class_id"])}{" " + name if name else ""}'
        parts.append(f'<text x="{cx:.1f}" y="{height - 12}" font-size="12" text-anchor="middle">'
                     f'{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def build_html(doc: Mapping[str, Any], gallery: Sequence[Mapping[str, Any]], folder: Union[str, Path]) -> str:
    """The page for ``metrics.json``'s ``doc`` and the gallery ``index`` (image files read from ``folder``)."""
    meta = doc.get("meta") or {}
    metrics = [m for m in doc.get("metrics") or ["dice", "iou", "precision", "recall", "hd95", "assd"]]
    classes = list(doc.get("classes") or [])
    rows = list(doc.get("rows") or [])
    per_class = doc.get("per_class") or {}
    model, data = meta.get("model"), meta.get("dataset")
    title = "Evaluation" + (f": {model}" if model else "") + (f" on {data}" if data else "")
    out = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
           "<div id='broken'>Some images of this report failed to load.</div>",
           f"<h1>{html.escape(title)}</h1>", "<h2>Setup</h2><table class='setup'>"]
    for k, v in _setup_rows(meta):
        out.append(f"<tr><td>{html.escape(k)}</td><td>{_fmt(v if not isinstance(v, (list, dict)) else json.dumps(v))}"
                   f"</td></tr>")
    out.append("</table>")
    convention = doc.get("surface_distance")
    if isinstance(convention, Mapping):
        out.append("<p>Surface distances (" + _fmt(convention.get("units", "")) + "):</p><ul id='convention'>")
        out += [f"<li><b>{html.escape(k)}</b>: {_fmt(convention[k])}</li>"
                for k in ("hd95", "assd", "surface", "empty") if convention.get(k)]
        out.append("</ul>")
    out.append("<h2>Per class</h2><table id='per-class'><tr><th>class</th><th>name</th><th>scans</th>"
               "<th title='scans where exactly one of prediction and truth is empty: no surface distance'>"
               "one mask empty</th>")
    out += [f"<th>{html.escape(m)} mean</th><th>{html.escape(m)} std</th>" for m in metrics]
    out.append("</tr>")
    for c in classes:
        s = per_class.get(str(c["class_id"])) or {}
        out.append(f"<tr data-class='{int(c['class_id'])}'><td>{int(c['class_id'])}</td>"
                   f"<td>{_fmt(c.get('class_name') or '')}</td><td class='num'>{_fmt(s.get('n_scans'))}</td>"
                   f"<td class='num' data-metric='n_empty'>{_fmt(s.get('n_empty'))}</td>")
        for m in metrics:
            st = s.get(m) or {}
            out.append(f"<td class='num' data-metric='{m}-mean'>{_fmt(st.get('mean'))}</td>"
                       f"<td class='num' data-metric='{m}-std'>{_fmt(st.get('std'))}</td>")
        out.append("</tr>")
    out.append("</table>")
    out.append("<h2>Per-scan Dice</h2>" + _strip_plot(rows, classes))
    out.append("<h2>Per scan</h2><table id='per-scan'><tr><th>scan</th><th>class</th><th>fold</th><th>slices</th>")
    out += [f"<th>{html.escape(m)}</th>" for m in metrics]
    out.append("</tr>")
    for r in rows:
        out.append(f"<tr data-scan='{html.escape(str(r['scan']))}' data-class='{int(r['class_id'])}'>"
                   f"<td>{_fmt(str(r['scan']))}</td><td>{int(r['class_id'])} {_fmt(r.get('class_name') or '')}</td>"
                   f"<td class='num'>{_fmt(r.get('fold'))}</td><td class='num'>{_fmt(r.get('n_slices'))}</td>")
        out += [f"<td class='num' data-metric='{m}'>{_fmt(r.get(m))}</td>" for m in metrics]
        out.append("</tr>")
    out.append("</table>")
    out.append("<h2>Slices</h2><p class='legend'>Radiological view (patient's right on the left). "
               f"<span style='background:rgb{TRUTH_CONTOUR}'></span>truth contour"
               f"<span style='background:rgb{PRED_CONTOUR}'></span>prediction contour"
               f"<span style='background:rgb{FP_COLOR}'></span>false positive"
               f"<span style='background:rgb{FN_COLOR}'></span>false negative</p><div class='gallery'>")
    folder = Path(folder)
    for g in gallery:
        data = base64.b64encode((folder / g["file"]).read_bytes()).decode("ascii")
        name = g.get("class_name") or f"class {g['class_id']}"
        d = g.get("slice_dice")
        caption = (f"{html.escape(name)}, scan {html.escape(str(g['scan']))}, slice {int(g['z'])} "
                   f"({html.escape(g['tag'])}): Dice {'n/a (both empty)' if d is None else f'{d:.3f}'}")
        out.append(f"<figure><img src='data:image/png;base64,{data}' width='{int(g['width'])}' "
                   f"height='{int(g['height'])}' alt='{caption}'><figcaption>{caption}</figcaption></figure>")
    out.append(f"</div><script>{_SCRIPT}</script></body></html>")
    return "\n".join(out)


def write_html_report(folder: Union[str, Path]) -> Path:
    """Write ``<folder>/report.html`` from ``<folder>/metrics.json`` and ``<folder>/gallery/index.json`` (an empty
    gallery when the evaluation wrote none); returns its path. No model is needed."""
    folder = Path(folder)
    doc = json.loads((folder / "metrics.json").read_text())
    index_path = folder / GALLERY_DIR / "index.json"
    gallery = json.loads(index_path.read_text()) if index_path.is_file() else []
    path = folder / "report.html"
    atomic_write_bytes(path, build_html(doc, gallery, folder).encode("utf-8"))
    return path
