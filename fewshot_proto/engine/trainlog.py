"""The training log: ``<run>/train_log.csv`` (one row every ``train.log_every`` steps) and, when the tensorboard
package is installed, TensorBoard scalars under ``<run>/tensorboard``."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["TrainLog"]


class TrainLog:
    """``<out>/train_log.csv`` (columns: step, the task's loss terms, lr, timings) and TensorBoard scalars."""

    TIMING = ["lr", "seconds_per_step", "sample_seconds", "elapsed"]

    def __init__(self, out_dir: Path, loss_fields: Sequence[str], resume_step: Optional[int] = None) -> None:
        """A new log, or with ``resume_step`` the existing one cut to the rows of steps <= ``resume_step`` (the
        checkpoint's step: the rows an interrupted run logged after it are repeated by the resumed run)."""
        self.path = out_dir / "train_log.csv"
        self.loss_fields = list(loss_fields)
        fields = ["step", *self.loss_fields, *self.TIMING]
        kept_rows: List[Dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                kept_rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                             and int(r["step"]) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept_rows)
        os.replace(tmp, self.path)
        self.f = open(self.path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields, extrasaction="ignore")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:
            self.tb = None

    def log(self, row: Dict[str, Any]) -> None:
        self.w.writerow(row)
        self.f.flush()
        if self.tb is not None:
            for k in (*self.loss_fields, "lr"):
                if k in row and row[k] != "":
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()
