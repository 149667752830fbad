"""The ``predict`` command line: same result as ``predict_volume``, inputs never overwritten, one-line errors.

Every refused command line is checked to fail *before* the checkpoint is loaded (``model_from_checkpoint`` is
replaced by a function that fails the test), with exit code 2, exactly one ``error: ...`` line on stderr naming
the offending value, and no file created or changed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from fewshot_proto.predict import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")

#: the query's affine: not the identity, so that "same affine as the query" means something
QUERY_AFFINE = np.array([[0.0, 0.8, 0.0, -12.0], [0.9, 0.0, 0.0, 7.5], [0.0, 0.0, 3.0, 40.0], [0.0, 0.0, 0.0, 1.0]])
CONFIG = {"data": {"size": 32, "slice_axis": 2}, "protocol": {"n_part": 2},
          "train": {"precision": "fp32", "channels_last": False}}


def _image(seed: int) -> np.ndarray:
    """A tiny ``[X, Y, Z] = [32, 32, 8]`` image (slices on file axis 2)."""
    return np.random.default_rng(seed).normal(size=(32, 32, 8)).astype(np.float32)


@pytest.fixture
def case(tmp_path, write_nifti, monkeypatch) -> Dict[str, Path]:
    """Support image + label (classes 1 and 2), a query image and a tiny checkpoint, all under ``tmp_path``."""
    import torch

    from fewshot_proto.engine.checkpoint import save_checkpoint
    from fewshot_proto.models import build_model

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI's configure_threads() reads it
    lab = np.zeros((32, 32, 8), np.uint8)
    lab[6:16, 6:16, 1:7] = 1
    lab[18:28, 18:28, 2:6] = 2
    torch.manual_seed(0)
    model = build_model("unet", base_channels=4, in_channels=3).eval()
    return {
        "support": write_nifti(tmp_path / "in" / "image_8.nii.gz", _image(0)),
        "label": write_nifti(tmp_path / "in" / "label_8.nii.gz", lab),
        "query": write_nifti(tmp_path / "in" / "image_1.nii.gz", _image(1), QUERY_AFFINE),
        "ckpt": save_checkpoint(tmp_path / "ck" / "model.pt", model=model, model_name="unet",
                                model_config=dict(model.config), step=1, config=CONFIG),
    }


def _argv(case: Dict[str, Path], out, *extra: str, classes: str = "1,2") -> List[str]:
    return ["--checkpoint", str(case["ckpt"]), "--support", str(case["support"]), "--support-label",
            str(case["label"]), "--query", str(case["query"]), "--classes", classes, "--out", str(out),
            "--device", "cpu", *extra]


def _tree(root: Path) -> Dict[str, bytes]:
    """Every file (and symlink target) under ``root`` with its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file():
            out[rel] = p.read_bytes()
        else:
            out[rel] = b"<dir>"
    return out


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading the checkpoint (patched where ``predict`` looks it up)."""
    import fewshot_proto.predict as predict_cli

    def boom(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the command line was refused")

    monkeypatch.setattr(predict_cli, "model_from_checkpoint", boom)


def _refused(capsys, argv: List[str], root: Path, *needles: str) -> str:
    """Run ``main(argv)``: exit code 2, one ``error: `` line containing every needle, nothing under ``root``
    created or changed. Returns the error line."""
    before = _tree(root)
    rc = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert _tree(root) == before
    return lines[0]


# ------------------------------------------------------------------------------------------------ the result


def test_cli_output_equals_predict_volume(case, tmp_path, capsys):
    import nibabel as nib

    from fewshot_proto.config import config_from_dict
    from fewshot_proto.data import read_volume
    from fewshot_proto.engine.checkpoint import model_from_checkpoint
    from fewshot_proto.engine.predictor import predict_volume

    out = tmp_path / "pred.nii.gz"
    assert main(_argv(case, out, "--threshold", "0.4")) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}: voxels per class {{1: ")

    cfg = config_from_dict(CONFIG)
    model, _ = model_from_checkpoint(case["ckpt"])
    kw = dict(slice_axis=2, normalise=cfg.data.normalise)
    support = read_volume(case["support"], case["label"], **kw)
    query = read_volume(case["query"], None, **kw)
    expect = predict_volume(model, [support], query, [1, 2], size=32, n_part=2, threshold=0.4)

    written = nib.load(str(out))
    q = nib.load(str(case["query"]))
    got = np.moveaxis(np.asarray(written.dataobj), 2, 0)
    assert written.shape == q.shape
    assert np.array_equal(got, expect)
    assert np.array_equal(written.affine, q.affine) and np.allclose(written.affine, QUERY_AFFINE)


def test_missing_parent_folders_of_out_are_created(case, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "pred.nii"
    assert main(_argv(case, out)) == 0
    assert out.is_file() and capsys.readouterr().err == ""


def test_n_part_defaults_to_the_checkpoints_protocol(case, tmp_path, monkeypatch):
    import fewshot_proto.predict as predict_cli
    from fewshot_proto.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint

    seen = []
    real = predict_cli.predict_volume

    def spy(*args, **kwargs):
        seen.append(kwargs["n_part"])
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_cli, "predict_volume", spy)
    assert main(_argv(case, tmp_path / "a.nii.gz")) == 0  # the checkpoint says protocol.n_part = 2
    assert main(_argv(case, tmp_path / "b.nii.gz", "--n-part", "1")) == 0  # the command line wins
    model, ck = model_from_checkpoint(case["ckpt"])
    assert load_checkpoint(case["ckpt"])["config"]["protocol"]["n_part"] == 2
    bare = save_checkpoint(tmp_path / "bare.pt", model=model, model_name="unet", model_config=ck["model_config"],
                           step=1, config={k: v for k, v in CONFIG.items() if k != "protocol"})
    argv = _argv(case, tmp_path / "c.nii.gz")
    argv[1] = str(bare)
    assert main(argv) == 0  # no protocol section: the field's 3
    assert seen == [2, 1, 3]


def test_runtime_data_errors_are_one_line(case, tmp_path, capsys):
    """Errors found after loading (here: the support has no voxel of class 3) are reported the same way."""
    line = _refused(capsys, _argv(case, tmp_path / "p.nii.gz", classes="1,3"), tmp_path, "no voxel of class 3")
    assert str(case["support"]) in line


# ---------------------------------------------------------------------------------- --out must not be an input


@pytest.mark.parametrize("target", ["query", "support", "label"])
def test_out_equal_to_an_input_is_refused(case, tmp_path, capsys, no_load, target):
    flag = {"query": "--query", "support": "--support", "label": "--support-label"}[target]
    line = _refused(capsys, _argv(case, case[target]), tmp_path, "same file as", flag, str(case[target]))
    assert line.count(str(case[target])) == 2  # names both paths (here the same spelling)


def test_out_as_another_spelling_of_the_query_is_refused(case, tmp_path, capsys, no_load, monkeypatch):
    data = case["query"].read_bytes()
    monkeypatch.chdir(tmp_path)
    for spelling in ["in/image_1.nii.gz", "in/../in/./image_1.nii.gz", str(tmp_path / "ck" / ".." / "in" /
                                                                          "image_1.nii.gz")]:
        _refused(capsys, _argv(case, spelling), tmp_path, f"--out {spelling} is the same file as --query")
    assert case["query"].read_bytes() == data


@pytest.mark.parametrize("how", ["symlink", "hardlink", "symlinked-folder"])
def test_out_linking_to_the_query_is_refused(case, tmp_path, capsys, no_load, how):
    data = case["query"].read_bytes()
    if how == "symlink":
        link = tmp_path / "link.nii.gz"
        link.symlink_to(case["query"])
    elif how == "hardlink":
        link = tmp_path / "hard.nii.gz"
        os.link(case["query"], link)
    else:
        (tmp_path / "alias").symlink_to(case["query"].parent, target_is_directory=True)
        link = tmp_path / "alias" / case["query"].name
    _refused(capsys, _argv(case, link), tmp_path, f"--out {link} is the same file as --query {case['query']}")
    assert case["query"].read_bytes() == data


def test_query_given_through_a_symlink_to_out_is_refused(case, tmp_path, capsys, no_load):
    """``--query`` is a symlink to the file ``--out`` names: writing ``--out`` would destroy the query."""
    link = tmp_path / "query_link.nii.gz"
    link.symlink_to(case["query"])
    data = case["query"].read_bytes()
    argv = _argv(case, case["query"])
    argv[argv.index("--query") + 1] = str(link)
    _refused(capsys, argv, tmp_path, f"--out {case['query']} is the same file as --query {link}")
    assert case["query"].read_bytes() == data


def test_out_equal_to_the_checkpoint_is_refused(case, tmp_path, capsys, no_load):
    _refused(capsys, _argv(case, case["ckpt"]), tmp_path, "same file as --checkpoint", str(case["ckpt"]))


# ------------------------------------------------------------------------------------------- other bad --out


@pytest.mark.parametrize("name", ["pred.png", "pred.nii.gzz", "pred", "pred.NII.GZ", "pred.nii.gz.tmp"])
def test_out_suffix_is_checked_before_inference(case, tmp_path, capsys, no_load, name):
    out = tmp_path / name
    _refused(capsys, _argv(case, out), tmp_path, f"--out {out}", "must end in .nii.gz or .nii")


@pytest.mark.parametrize("name", ["results", "pred.nii.gz"])
def test_out_that_is_a_folder_is_refused(case, tmp_path, capsys, no_load, name):
    folder = tmp_path / name
    folder.mkdir()
    line = _refused(capsys, _argv(case, folder), tmp_path, f"--out {folder} is an existing folder")
    assert line == f"error: --out {folder} is an existing folder; give a file name such as {folder / 'pred.nii.gz'}"
    assert folder.is_dir() and not any(folder.iterdir())


def test_out_under_a_regular_file_is_refused(case, tmp_path, capsys, no_load):
    out = case["query"] / "sub" / "pred.nii.gz"
    line = _refused(capsys, _argv(case, out), tmp_path, f"--out {out}", f"{case['query']} is not a folder")
    assert line == f"error: --out {out}: cannot create it, {case['query']} is not a folder"
    assert case["query"].is_file()


# ---------------------------------------------------------------------------------------- other bad arguments


@pytest.mark.parametrize("classes, needle", [
    ("0", "class 0 is the background"),
    ("1,0", "class 0 is the background"),
    ("-1", "must be positive, got -1"),
    ("1,-2", "must be positive, got -2"),
    ("1,1", "given twice: [1]"),
    ("2,1,2", "given twice: [2]"),
    ("40000", "at most 32767"),
    ("", "expected comma-separated class ids"),
    ("1,a", "expected comma-separated class ids"),
])
def test_bad_classes_are_refused(case, tmp_path, capsys, no_load, classes, needle):
    argv = _argv(case, tmp_path / "p.nii.gz", classes="1")
    argv[argv.index("--classes"):argv.index("--classes") + 2] = [f"--classes={classes}"]
    _refused(capsys, argv, tmp_path, "argument --classes", needle, repr(classes))


@pytest.mark.parametrize("value, needle", [("3", "invalid choice: 3"), ("-1", "invalid choice: -1"),
                                           ("x", "invalid int value: 'x'")])
def test_bad_slice_axis_is_refused(case, tmp_path, capsys, no_load, value, needle):
    line = _refused(capsys, _argv(case, tmp_path / "p.nii.gz", f"--slice-axis={value}"), tmp_path,
                    "argument --slice-axis", needle)
    assert line.startswith("error: argument --slice-axis: ") and line.endswith("(see python -m fewshot_proto.predict "
                                                                              "--help)")
    assert not (tmp_path / "p.nii.gz").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--n-part", "0"], "argument --n-part: expected a positive integer, got '0'"),
    (["--threshold", "1.5"], "argument --threshold: expected a number in [0, 1], got '1.5'"),
    (["--threshold", "nan"], "argument --threshold"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--support", "x.nii.gz"], "2 --support images but 1 --support-label files"),
])
def test_other_bad_arguments_are_one_line(case, tmp_path, capsys, no_load, extra, needle):
    _refused(capsys, _argv(case, tmp_path / "p.nii.gz", *extra), tmp_path, needle)


def test_missing_required_arguments_are_one_line(tmp_path, capsys, no_load):
    _refused(capsys, ["--checkpoint", "ck.pt"], tmp_path, "the following arguments are required", "--query")


def test_missing_input_file_is_refused_before_loading(case, tmp_path, capsys, no_load):
    gone = tmp_path / "in" / "image_404.nii.gz"
    argv = _argv(case, tmp_path / "p.nii.gz")
    argv[argv.index("--query") + 1] = str(gone)
    line = _refused(capsys, argv, tmp_path, f"--query {gone}: file does not exist")
    assert line == f"error: --query {gone}: file does not exist"
    assert not (tmp_path / "p.nii.gz").exists()


def test_every_flag_states_its_default():
    import argparse

    parser = build_parser()
    assert issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    # the same formatter, wide enough for one line per flag
    parser.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=60, width=400)
    lines = [ln for ln in parser.format_help().splitlines() if ln.startswith("  --")]
    flags = {ln.split()[0] for ln in lines}
    assert flags >= {"--checkpoint", "--support", "--support-label", "--classes", "--query", "--out",
                     "--slice-axis", "--n-part", "--device", "--precision", "--threshold"}
    for ln in lines:
        assert "(default: " in ln or "(required" in ln, ln
    text = " ".join(lines)
    assert "the checkpoint's protocol.n_part, 3 when absent" in text and "(default: 0.5)" in text
