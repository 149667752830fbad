"""The train and evaluate CLIs as a user meets them: run folders, resume, divergence, and one-line errors."""
from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest
import torch

from fewshot_proto import evaluate as evaluate_cli
from fewshot_proto import train as train_cli
from fewshot_proto.config import config_to_dict, default_config
from fewshot_proto.engine.checkpoint import load_checkpoint, nonfinite_tensors

pytestmark = pytest.mark.usefixtures("one_thread")

#: a run of a few episodes at 32 px on CPU, in the test process (no worker process, no thread)
TINY = ["--iters", "2", "--no-eval", "--no-progress", "--device", "cpu", "--set", "data.size=32",
        "train.num_workers=0", "train.prefetch=0", "train.precision=fp32", "train.ckpt_every=0", "train.log_every=1",
        "train.warmup_iters=0"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Ten 64x64 phantoms written as NIfTI."""
    from fewshot_proto.data.phantom import ensure_phantoms

    return ensure_phantoms(tmp_path_factory.mktemp("phantoms"), n_scans=10, size=64)


def run_train(capsys, *argv: str) -> tuple:
    rc = train_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def log_steps(folder: Path) -> List[int]:
    with open(folder / "train_log.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_running_the_same_command_twice_keeps_both_runs(tmp_path, monkeypatch, capsys, data_root):
    monkeypatch.chdir(tmp_path)
    for version in (0, 1):
        rc, out, err = run_train(capsys, "--data", data_root, *TINY)
        assert rc == 0, err
        folder = tmp_path / "runs" / data_root.name / f"version_{version}"
        assert f"out: {folder.relative_to(tmp_path)}" in out
        assert load_checkpoint(folder / "checkpoint.pt")["step"] == 2
    # the resolved config is printed at the start and saved with the run
    assert "config (saved as config.yaml in the run folder):" in out and "  train: {iters: 2," in out
    from fewshot_proto.config import load_config

    saved = load_config(tmp_path / "runs" / data_root.name / "version_1" / "config.yaml")
    assert saved.train.out == str(Path("runs") / data_root.name / "version_1")
    assert (saved.data.size, saved.train.optimizer, saved.train.precision) == (32, "adamw", "fp32")


def test_an_out_holding_a_run_is_refused_then_overwritten_on_request(tmp_path, capsys, data_root):
    out = tmp_path / "run"
    assert run_train(capsys, "--data", data_root, "--out", out, *TINY)[0] == 0
    before = (out / "checkpoint.pt").read_bytes()
    rc, _, err = run_train(capsys, "--data", data_root, "--out", out, *TINY)
    assert rc == 2
    assert one_error_line(err) == (f"error: run folder {out} already holds a run; pass --resume "
                                   f"{out / 'checkpoint.pt'} to continue it, --overwrite to replace it, or another "
                                   f"--out")
    assert (out / "checkpoint.pt").read_bytes() == before
    rc, _, err = run_train(capsys, "--data", data_root, "--out", out, "--overwrite", *TINY, "train.seed=5")
    assert rc == 0, err
    assert load_checkpoint(out / "checkpoint.pt")["config"]["train"]["seed"] == 5


def test_a_concurrent_run_into_the_same_folder_stops_at_once(tmp_path, capsys, data_root):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from fewshot_proto.engine.rundir import open_run_folder
        open_run_folder({str(out)!r}, default_parent=".")
        print("locked", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = run_train(capsys, "--data", data_root, "--out", out, *TINY)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2
    assert f"error: run folder {out} is in use by another live run (pid {holder.pid}" in one_error_line(err)
    assert not (out / "checkpoint.pt").exists()


def test_resume_through_the_cli_equals_an_uninterrupted_run(tmp_path, capsys, data_root):
    """Run A: 4 episodes. Run B: killed after 2 (``stop_after``), then ``train --resume`` to the end. The log of B
    has each step once (rows an interrupted run wrote after its checkpoint are dropped)."""
    from fewshot_proto.engine import train
    from fewshot_proto.train import build_parser, config_from_args

    argv = ["--data", str(data_root), *TINY, "--iters", "4"]
    assert run_train(capsys, *argv, "--out", tmp_path / "a")[0] == 0
    cfg = config_from_args(build_parser().parse_args([*argv, "--out", str(tmp_path / "b")]))
    train(cfg, progress=False, stop_after=2)
    with open(tmp_path / "b" / "train_log.csv", "a") as f:  # what a run killed after its checkpoint leaves
        f.write("3,9,9,9,9,9,0.1,0.1,0.1,0.1\n")
    rc, out, err = run_train(capsys, "--resume", tmp_path / "b" / "checkpoint.pt", "--no-eval", "--no-progress")
    assert rc == 0, err
    assert f"resumed from {tmp_path / 'b' / 'checkpoint.pt'}" in out
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert log_steps(tmp_path / "b") == [1, 2, 3, 4]
    assert a["config"] == {**b["config"], "train": {**b["config"]["train"], "out": str(tmp_path / "a")}}


def test_resume_refuses_changes_to_what_the_checkpoint_was_trained_on(tmp_path, capsys, data_root):
    out = tmp_path / "run"
    assert run_train(capsys, "--data", data_root, "--out", out, *TINY)[0] == 0
    ck = out / "checkpoint.pt"
    rc, _, err = run_train(capsys, "--resume", ck, "--test-classes", "1,4", "--set", "train.lr=1e-3",
                           "--no-progress")
    assert rc == 2
    assert one_error_line(err) == (
        f"error: --resume {ck}: the config changes what the checkpoint was trained on: protocol.test_classes: "
        f"[2, 3] -> [1, 4]; train.lr: 0.0005 -> 0.001; only train.iters, train.max_seconds, train.ckpt_every, "
        f"train.log_every, train.num_workers, train.prefetch, train.threads, train.device, train.out, data.root, "
        f"data.layout, data.cache_volumes, data.class_names may change on resume")
    assert load_checkpoint(ck)["step"] == 2
    # the run's length may change; the optimiser's learning rate is the saved config's
    rc, _, err = run_train(capsys, "--resume", ck, "--iters", "3", "--no-eval", "--no-progress")
    assert rc == 0, err
    ckpt = load_checkpoint(ck)
    assert ckpt["step"] == 3 and ckpt["config"]["train"]["iters"] == 3
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == ckpt["config"]["train"]["lr"] == 5e-4


def test_a_nan_learning_rate_is_refused_before_any_work(tmp_path, capsys, data_root):
    rc, _, err = run_train(capsys, "--data", data_root, "--out", tmp_path / "run", *TINY, "train.lr=.nan",
                           "train.optimizer=sgd")
    assert rc == 2
    assert one_error_line(err) == "error: --set: train.lr = nan: must be a finite number > 0"
    assert not (tmp_path / "run").exists()


def test_divergence_keeps_the_last_finite_checkpoint(tmp_path, capsys, data_root):
    """SGD with lr 1e30 blows the weights up within a few steps: the run stops with one line, and the checkpoint
    on disk is the last one whose tensors are all finite (never the broken weights)."""
    out = tmp_path / "run"
    rc, _, err = run_train(capsys, "--data", data_root, "--out", out, *TINY, "train.optimizer=sgd",
                           "train.lr=1e30", "train.ckpt_every=1", "--iters", "20")
    assert rc == 2
    line = one_error_line(err)
    assert "training stopped" in line and "Lower train.lr" in line
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert nonfinite_tensors(ckpt["model"]) == [] and nonfinite_tensors(ckpt["optimizer"]) == []
    assert f"kept {out / 'checkpoint.pt'} of step {ckpt['step']}, whose tensors are all finite" in line
    assert 1 <= ckpt["step"] < 20


@pytest.mark.parametrize("argv, message", [
    (["--set", "train.device=tpu"], "error: --set: train.device = 'tpu': must be auto, cpu or cuda[:N]"),
    (["--config", "missing.yaml"], "error: config file missing.yaml does not exist"),
    (["--max-seconds", "-1"], "error: command line: --max-seconds -1: must be >= 0 (0: no cap)"),
    (["--set", "data.size=100"], "error: data.size = 100: model 'cwpa_unet_matcher' needs a multiple of 16 (e.g. 96 or 112)"),
    (["--test-classes", "2,9"], "error: protocol.test_classes [2, 9]: class(es) [9] do not occur in dataset"),
    (["--model", "nope"], "error: unknown model 'nope'; valid names: "),
    (["--resume", "missing.pt"], "error: checkpoint missing.pt does not exist"),
    (["--set", "train.freeze=[encodr]"], "error: train.freeze: model cwpa_unet_matcher has no submodule 'encodr' "
                                         "(its submodules: encoder, cwpa, decoder, head)"),
    (["--set", "train.freeze=[encoder, encoder]"], "error: --set: train.freeze = ['encoder', 'encoder']: must be a "
                                                    "list of distinct submodule names such as [encoder]"),
    (["--model", "panet", "--set", "train.freeze=[encoder]"],
     "error: train.freeze = ['encoder']: nothing of model panet is left to train"),
])
def test_expected_failures_are_one_line(tmp_path, monkeypatch, capsys, data_root, argv, message):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_train(capsys, "--data", data_root, *TINY, *argv)
    assert rc == 2
    assert one_error_line(err).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, data_root):
    rc, _, err = run_train(capsys, "--data", data_root, "--out", tmp_path / "run", *TINY, "--device", "cuda")
    assert rc == 2
    assert one_error_line(err) == "error: device 'cuda' was requested but no CUDA GPU is available; use auto or cpu"


def test_out_that_is_a_file_is_one_line(tmp_path, capsys, data_root):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = run_train(capsys, "--data", data_root, "--out", f, *TINY)
    assert rc == 2 and one_error_line(err) == f"error: run folder {f} exists and is not a folder"


def test_a_bad_scan_that_is_never_sampled_stops_the_run_before_training(tmp_path, capsys, data_root, write_nifti):
    """A label whose shape differs from its image is found by the header check, not left to chance."""
    import shutil

    import numpy as np

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    write_nifti(root / "label_9.nii.gz", np.zeros((4, 4, 4), np.uint8))
    rc, _, err = run_train(capsys, "--data", root, "--out", tmp_path / "run", *TINY)
    assert rc == 2
    line = one_error_line(err)
    assert "1 problem(s) in 1 scan(s)" in line and f"{root / 'label_9.nii.gz'}: shape mismatch" in line
    assert not (tmp_path / "run").exists()


def test_evaluate_cli_errors_are_one_line(tmp_path, capsys, data_root):
    rc = evaluate_cli.main(["--checkpoint", str(tmp_path / "none.pt")])
    assert rc == 2 and one_error_line(capsys.readouterr().err) == f"error: checkpoint {tmp_path / 'none.pt'} " \
                                                                  f"does not exist"
    out = tmp_path / "run"
    assert run_train(capsys, "--data", data_root, "--out", out, *TINY)[0] == 0
    rc = evaluate_cli.main(["--checkpoint", str(out / "checkpoint.pt"), "--folds", "x"])
    assert rc == 2 and one_error_line(capsys.readouterr().err) == \
        "error: command line: --folds 'x': expected a range such as 0-4 or a list such as 0,2"


def test_the_default_run_is_the_dataclass_defaults():
    """``train --shots 1`` (the README's first command) runs exactly ``default_config()``."""
    from fewshot_proto.train import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["--shots", "1"]))
    assert config_to_dict(cfg) == config_to_dict(default_config())
