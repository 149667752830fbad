"""TensorBoard (optional extra ``fewshot_proto[tensorboard]``): training curves, the final evaluation's per-class
Dice and overlay images, read back from the event files; and a no-op, CSV untouched, without the package."""
from __future__ import annotations

import csv
import io
import sys

import numpy as np
import pytest

from fewshot_proto.engine.trainlog import TrainLog, evaluation_scalars, log_evaluation

#: what ``engine.evaluator.evaluate`` returns (the parts the log reads); values exact in float32
SUMMARY = {
    "per_class": {
        "4": {"class_name": "spleen", "n_scans": 2, "dice": {"mean": 0.5, "std": 0.25, "n": 2}},
        "1": {"class_name": "liver", "n_scans": 2, "dice": {"mean": 0.875, "std": 0.0, "n": 2}},
        "2": {"class_name": "right kidney", "n_scans": 2, "dice": {"mean": 0.25, "std": 0.0, "n": 2}},
        "3": {"class_name": "", "n_scans": 2, "dice": {"mean": 0.0, "std": 0.0, "n": 2}},
    },
    "overall": {"dice": {"mean": 0.40625, "std": 0.1, "n_classes": 4}},
    "mean_dice": 0.40625,
}
EXPECTED = {"eval/dice/1_liver": 0.875, "eval/dice/2_right_kidney": 0.25, "eval/dice/3": 0.0,
            "eval/dice/4_spleen": 0.5, "eval/dice/mean": 0.40625}


@pytest.fixture
def accumulator():
    """``accumulator(run_dir)``: the run's ``tensorboard/`` events, loaded (skips without tensorboard)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def load(run_dir):
        acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        return acc

    return load


def _image(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _decode(event) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_evaluation_scalars_tags_and_values():
    assert evaluation_scalars(SUMMARY) == EXPECTED
    assert list(evaluation_scalars(SUMMARY)) == sorted(EXPECTED)  # class-id order, then the mean


def test_log_evaluation_writes_exact_scalars_and_images_at_the_final_step(tmp_path, accumulator):
    images = {"class1_scan3_z7": _image(0), "class4_scan3_z2": _image(1, 4, 9)}
    assert log_evaluation(tmp_path, 120, SUMMARY, images=images) is True
    acc = accumulator(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == sorted(EXPECTED)
    for tag, value in EXPECTED.items():
        assert [(e.step, e.value) for e in acc.Scalars(tag)] == [(120, value)], tag
    assert sorted(acc.Tags()["images"]) == ["eval/overlay/class1_scan3_z7", "eval/overlay/class4_scan3_z2"]
    for name, arr in images.items():
        (event,) = acc.Images(f"eval/overlay/{name}")
        assert (event.step, event.height, event.width) == (120, arr.shape[0], arr.shape[1])
        np.testing.assert_array_equal(_decode(event), arr)


def test_train_curves_and_evaluation_share_the_run_folder_and_the_csv_stays(tmp_path, accumulator):
    """TrainLog's training scalars, then the evaluation (overlay PNGs read from a folder, the first
    ``max_images`` in name order) in the same ``<run>/tensorboard``; ``train_log.csv`` is as before."""
    from PIL import Image

    log = TrainLog(tmp_path, loss_fields=["loss", "ce"])
    log.log({"step": 10, "loss": 1.5, "ce": 1.25, "lr": 0.5, "seconds_per_step": 0.1, "sample_seconds": 0.0,
             "elapsed": 1.0})
    log.log({"step": 20, "loss": 0.75, "ce": 0.5, "lr": 0.25, "seconds_per_step": 0.1, "sample_seconds": 0.0,
             "elapsed": 2.0})
    log.close()
    overlays = tmp_path / "eval" / "overlays"
    overlays.mkdir(parents=True)
    for k, name in enumerate(["b", "a", "c"]):
        Image.fromarray(_image(k)).save(overlays / f"{name}.png")
    assert log_evaluation(tmp_path, 20, SUMMARY, images=overlays, max_images=2) is True

    acc = accumulator(tmp_path)
    assert sorted(acc.Tags()["scalars"]) == sorted([*EXPECTED, "train/loss", "train/ce", "train/lr"])
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(10, 1.5), (20, 0.75)]
    assert [(e.step, e.value) for e in acc.Scalars("train/lr")] == [(10, 0.5), (20, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("eval/dice/mean")] == [(20, 0.40625)]
    assert sorted(acc.Tags()["images"]) == ["eval/overlay/a", "eval/overlay/b"]
    np.testing.assert_array_equal(_decode(acc.Images("eval/overlay/a")[0]), _image(1))
    with open(tmp_path / "train_log.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows == [["step", "loss", "ce", "lr", "seconds_per_step", "sample_seconds", "elapsed"],
                    ["10", "1.5", "1.25", "0.5", "0.1", "0.0", "1.0"],
                    ["20", "0.75", "0.5", "0.25", "0.1", "0.0", "2.0"]]


def test_trainlog_methods_log_evaluation_and_images(tmp_path, accumulator):
    log = TrainLog(tmp_path, loss_fields=["loss"])
    log.log_evaluation(7, SUMMARY)
    log.log_images(7, {"x": _image(3)[:, :, 0]})  # 2-D grey -> one channel
    log.close()
    acc = accumulator(tmp_path)
    assert {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]} == \
        {t: [(7, v)] for t, v in EXPECTED.items()}
    (event,) = acc.Images("eval/overlay/x")
    np.testing.assert_array_equal(_decode(event)[:, :, 0], _image(3)[:, :, 0])


def test_a_bad_image_is_a_one_line_error(tmp_path, accumulator):
    with pytest.raises(ValueError) as e:
        log_evaluation(tmp_path, 1, SUMMARY, images={"probs": np.zeros((4, 4, 3), np.float32)})
    assert str(e.value) == "image 'probs': expected an [H, W, C] uint8 array with C 1, 3 or 4, got shape (4, 4, 3) " \
                           "dtype float32"


def test_without_tensorboard_everything_is_a_no_op_but_the_csv(tmp_path, monkeypatch):
    """No tensorboard package: no ``tensorboard/`` folder, ``log_evaluation`` returns False, the TrainLog methods
    do nothing, the CSV log is written as always."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    log = TrainLog(tmp_path, loss_fields=["loss"])
    assert log.tb is None
    log.log({"step": 1, "loss": 2.0, "lr": 0.1, "seconds_per_step": 0.5, "sample_seconds": 0.0, "elapsed": 0.5})
    log.log_evaluation(1, SUMMARY)
    log.log_images(1, {"x": _image(0)})
    log.close()
    assert log_evaluation(tmp_path, 1, SUMMARY, images={"x": _image(0)}) is False
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "train_log.csv").read_text().splitlines() == [
        "step,loss,lr,seconds_per_step,sample_seconds,elapsed", "1,2.0,0.1,0.5,0.0,0.5"]
