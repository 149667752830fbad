"""Reports: strict JSON (NaN -> null, inf -> "inf"), CSV, markdown, terminal table, atomic writes; the
surface-distance convention and the one-empty-mask counts in every file."""
from __future__ import annotations

import csv
import json
import math

import pytest

from fewshot_proto import __version__
from fewshot_proto.metrics.aggregate import MetricRow, MetricTable
from fewshot_proto.metrics.distance import surface_distance_convention
from fewshot_proto.metrics.report import (
    FORMAT,
    dumps_strict,
    format_dice_table,
    format_summary_markdown,
    read_metrics_json,
    rows_to_csv,
    to_jsonable,
    write_report,
)

NAN = float("nan")
INF = float("inf")


def _reject_constant(name):
    raise ValueError(f"non-strict JSON constant {name}")


def _table() -> MetricTable:
    t = MetricTable(class_names={1: "liver", 4: "spleen"})
    t.add(MetricRow(scan="1", class_id=1, fold=0, dice=0.5, iou=0.4, hd95=2.0, assd=1.0, extra={"support": "9"}))
    t.add(MetricRow(scan="2", class_id=1, fold=0, dice=0.7, iou=0.5, hd95=NAN, assd=NAN, one_empty=True))
    t.add(MetricRow(scan="1", class_id=4, fold=0, dice=NAN, iou=NAN))
    t.add(MetricRow(scan="2", class_id=4, fold=0, dice=0.9, iou=0.8, hd95=1.5, assd=0.5))
    return t


def test_to_jsonable_rules():
    import numpy as np

    obj = {"a": NAN, "b": INF, "c": -INF, 3: np.float32(0.5), "d": (np.int64(2), np.array([1.0, NAN]))}
    assert to_jsonable(obj) == {"a": None, "b": "inf", "c": "-inf", "3": 0.5, "d": [2, [1.0, None]]}
    with pytest.raises(TypeError, match="cannot encode"):
        to_jsonable({"x": object()})
    json.loads(dumps_strict(obj), parse_constant=_reject_constant)


def test_write_report_files_and_round_trip(tmp_path):
    t = _table()
    meta = {"protocol": "alpnet", "setting": 1, "folds": [0], "shots": 1, "checkpoint": tmp_path / "ckpt.pt"}
    out = write_report(tmp_path / "run", t, meta)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.csv", "metrics.json", "summary.md"]

    text = out["json"].read_text()
    doc = json.loads(text, parse_constant=_reject_constant)  # strict: no NaN/Infinity tokens
    assert doc["format"] == FORMAT
    assert doc["meta"]["protocol"] == "alpnet" and doc["meta"]["package_version"] == __version__
    assert doc["meta"]["checkpoint"].endswith("ckpt.pt") and "time" in doc["meta"]
    assert len(doc["rows"]) == 4
    assert doc["rows"][1]["hd95"] is None and doc["rows"][1]["one_empty"] is True and doc["rows"][2]["dice"] is None
    assert doc["rows"][0]["one_empty"] is False
    assert doc["per_class"]["1"]["dice"]["mean"] == pytest.approx(0.6)
    # class 1 HD95: scan 1 (2.0); scan 2 has one empty mask -> left out of the mean and counted in n_empty
    assert doc["per_class"]["1"]["hd95"] == {"mean": 2.0, "std": 0.0, "n": 2, "n_valid": 1}
    assert doc["per_class"]["1"]["n_empty"] == 1 and doc["per_class"]["4"]["n_empty"] == 0 and doc["n_empty"] == 1
    assert doc["surface_distance"] == surface_distance_convention()
    assert doc["surface_distance"]["hd95"].startswith("max of the two directed 95th percentiles")
    assert doc["surface_distance"]["units"] == "mm"
    assert doc["per_class"]["4"]["dice"]["std"] == 0.0
    assert doc["overall"]["dice"]["mean"] == pytest.approx(0.75)

    back = read_metrics_json(out["json"])
    assert math.isnan(back["rows"][1]["hd95"]) and math.isnan(back["rows"][2]["dice"])
    assert back["per_class"]["1"]["hd95"]["mean"] == 2.0 and back["n_empty"] == 1
    assert back["rows"][0]["extra"] == {"support": "9"} and back["rows"][0]["fold"] == 0

    rows = list(csv.DictReader(out["csv"].open()))
    assert len(rows) == 4 and rows[0]["class_name"] == "liver" and rows[0]["support"] == "9"
    assert float(rows[0]["dice"]) == 0.5 and math.isnan(float(rows[1]["hd95"])) and math.isnan(float(rows[2]["dice"]))
    assert [r["one_empty"] for r in rows] == ["False", "True", "False", "False"]
    assert {r["surface_distance"] for r in rows} == {"hd95=max-of-directed-p95;assd=pooled-mean;mm"}

    md = out["markdown"].read_text()
    assert "| class | name | scans | n_empty | Dice (%) | IoU (%) | HD95 (mm) | ASSD (mm) |" in md
    assert "| 1 | liver | 2 | 1 | 60.00 ± 10.00 | 45.00 ± 5.00 | 2.00 ± 0.00 | 1.00 ± 0.00 |" in md
    assert "| **mean** |  | 2 | 1 | 75.00 ± 15.00 |" in md
    assert ("Surface distances (mm): HD95 = max of the two directed 95th percentiles, "
            "max(p95(d(P->T)), p95(d(T->P))) (MONAI); ASSD = mean of the directed distances of both directions "
            "pooled, (sum d(P->T) + sum d(T->P)) / (|surf P| + |surf T|) (MONAI, symmetric=True). `n_empty`: scans "
            "where exactly one of prediction and truth is empty (no distance, left out of the means; the mean row "
            "counts all classes).") in md.splitlines()
    assert "**protocol**: alpnet" in md

    # atomic writes leave no temporary files; rewriting replaces in place
    write_report(tmp_path / "run", t, meta)
    assert len(list((tmp_path / "run").iterdir())) == 3


def test_write_report_empty_table_raises(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        write_report(tmp_path, MetricTable())


def test_format_dice_table_alignment_and_values():
    text = format_dice_table(_table().summary())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["class", "name", "scans"]
    body = [ln for ln in lines if ln and ln[0] not in "-c"]
    assert [ln.split()[0] for ln in body] == ["1", "4", "mean"]
    assert "60.00 ± 10.00" in body[0] and "90.00 ±  0.00" in body[1] and "75.00 ± 15.00" in body[2]
    assert "1/2" in body[1]  # one of the two spleen scans has nothing to score
    # numbers right-aligned: the "±" sits in the same column on every row
    assert len({ln.index("±") for ln in body}) == 1


def test_across_folds_columns():
    t = _table()
    t.add(MetricRow(scan="3", class_id=1, fold=1, dice=0.9))
    t.add(MetricRow(scan="3", class_id=4, fold=1, dice=0.7))
    s = t.summary()
    text = format_dice_table(s)
    assert "over 2 folds" in text.splitlines()[0]
    md = format_summary_markdown(s, {"protocol": "alpnet"})
    assert "Mean ± std over 2 folds" in md


def test_rows_to_csv_header():
    text = rows_to_csv([MetricRow(scan="1", class_id=2, extra={"support": "3"})])
    assert text.splitlines()[0] == (
        "fold,scan,class_id,class_name,n_slices,tp,fp,fn,dice,iou,precision,recall,hd95,assd,one_empty,"
        "surface_distance,support"
    )
    assert text.splitlines()[1] == (
        ",1,2,,0,0,0,0,nan,nan,nan,nan,nan,nan,False,hd95=max-of-directed-p95;assd=pooled-mean;mm,3"
    )
    medpy = MetricTable(hd_reduction="pooled", assd_reduction="mean")
    medpy.add(MetricRow(scan="1", class_id=2))
    assert rows_to_csv(medpy).splitlines()[1].endswith(",False,hd95=pooled-p95;assd=mean-of-directed-means;mm")
    assert rows_to_csv([MetricRow(scan="1", class_id=2)], surface_distance="x").splitlines()[1].endswith(",False,x")


def test_markdown_without_distances_has_no_convention_line():
    md = format_summary_markdown(_table().summary(), metrics=("dice",))
    assert "| class | name | scans | Dice (%) |" in md
    assert "n_empty" not in md and "Surface distances" not in md
