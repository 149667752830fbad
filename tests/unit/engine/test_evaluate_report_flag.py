"""``evaluate --report DIR``: rebuild ``report.html`` from an evaluation folder, without a model or data."""
from __future__ import annotations

import numpy as np

from fewshot_proto.evaluate import main
from fewshot_proto.metrics import MetricTable
from fewshot_proto.metrics.report import write_report


def test_report_is_rebuilt_from_the_folder(tmp_path, capsys):
    table = MetricTable(class_names={3: "left_kidney"})
    truth = np.zeros((3, 8, 8), bool)
    truth[1, 2:5, 2:5] = True
    pred = np.roll(truth, 1, axis=2)
    table.add_prediction(pred, truth, scan="9", class_id=3, spacing=(2.0, 1.0, 1.0), zs=[0, 1, 2])
    write_report(tmp_path, table, {"model": "m", "dataset": "d"})
    assert not (tmp_path / "report.html").exists()
    assert main(["--report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'report.html'}"
    page = (tmp_path / "report.html").read_text()
    assert "Evaluation: m on d" in page and "left_kidney" in page and f"{2 * 6 / (9 + 9):.4f}" in page


def test_report_of_a_folder_without_metrics_is_one_line(tmp_path, capsys):
    assert main(["--report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --report {tmp_path}: no metrics.json there (the folder an evaluation wrote)"]
