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


def _argv(case: Dict[str, Path], out, *extra: str, classes: str = "1,2", query: str = "") -> List[str]:
    """A predict command line (``--classes``: the old spelling of ``--test-classes``, still accepted)."""
    return ["--checkpoint", str(case["ckpt"]), "--support", str(case["support"]), "--support-label",
            str(case["label"]), "--query", query or str(case["query"]), "--classes", classes, "--out", str(out),
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
    real = predict_cli.predict_queries

    def spy(*args, **kwargs):
        seen.append(kwargs["n_part"])
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_cli, "predict_queries", spy)
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
    _refused(capsys, argv, tmp_path, "argument --test-classes/--classes", needle, repr(classes))


@pytest.mark.parametrize("value, needle", [("3", "invalid choice: 3"), ("-1", "invalid choice: -1"),
                                           ("x", "invalid int value: 'x'")])
def test_bad_slice_axis_is_refused(case, tmp_path, capsys, no_load, value, needle):
    line = _refused(capsys, _argv(case, tmp_path / "p.nii.gz", f"--slice-axis={value}"), tmp_path,
                    "argument --slice-axis", needle)
    assert line.startswith("error: python -m fewshot_proto.predict: argument --slice-axis: ")
    assert line.endswith(" (see --help)")
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
    parser.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=80, width=400)
    lines = [ln for ln in parser.format_help().splitlines() if ln.startswith("  --") and not ln.startswith("  --version")]
    flags = {ln.split()[0].rstrip(",") for ln in lines}
    assert flags == {"--checkpoint", "--support", "--support-label", "--test-classes", "--query", "--out",
                     "--overwrite", "--save-probabilities", "--slice-axis", "--n-part", "--device", "--precision",
                     "--threads", "--batch-size", "--threshold"}
    for ln in lines:
        assert "(default: " in ln or "(required" in ln, ln
    text = " ".join(lines)
    assert "the checkpoint's protocol.n_part, 3 when absent" in text and "(default: 0.5)" in text
    assert "--device {auto,cpu,cuda}" in text and "(default: auto)" in text


# ------------------------------------------------------------------------------- many queries: folder or files


def _labels(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj)


@pytest.fixture
def scans(case, tmp_path, write_nifti) -> Path:
    """A folder of two queries, ``image_2`` and ``image_10`` (natural order: 2 first), and a file that is not a
    scan; ``case["query"]`` is ``image_2``'s twin elsewhere."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "image_2.nii.gz").write_bytes(case["query"].read_bytes())
    write_nifti(folder / "image_10.nii", _image(7)[:, :, :6], np.diag([1.1, 0.9, 2.5, 1.0]))
    (folder / "notes.txt").write_text("not a scan")
    return folder


def test_a_query_folder_gives_the_labels_of_single_file_runs(case, scans, tmp_path, capsys):
    import nibabel as nib

    out = tmp_path / "preds"
    assert main(_argv(case, out, query=str(scans))) == 0
    lines = capsys.readouterr().out.splitlines()
    a, b = out / "image_2_pred.nii.gz", out / "image_10_pred.nii.gz"
    assert [ln.split(":")[0] for ln in lines] == [f"wrote {a}", f"wrote {b}", f"2 predictions in {out}"]
    assert sorted(p.name for p in out.iterdir()) == ["image_10_pred.nii.gz", "image_2_pred.nii.gz"]
    for name, written in [("image_2.nii.gz", a), ("image_10.nii", b)]:
        single = tmp_path / f"single_{name}.nii.gz"
        assert main(_argv(case, single, query=str(scans / name))) == 0
        assert np.array_equal(_labels(written), _labels(single))
        assert np.array_equal(nib.load(str(written)).affine, nib.load(str(scans / name)).affine)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("how", ["repeated", "nargs"])
def test_several_query_files_write_into_the_out_folder(case, scans, tmp_path, capsys, how):
    files = [str(scans / "image_10.nii"), str(case["query"])]
    argv = _argv(case, tmp_path / "preds", query=files[0])
    argv += ["--query", files[1]] if how == "repeated" else []
    if how == "nargs":
        argv.insert(argv.index("--query") + 2, files[1])
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"2 predictions in {tmp_path / 'preds'}"
    assert out[0].startswith(f"wrote {tmp_path / 'preds' / 'image_10_pred.nii.gz'}: voxels per class {{1: ")
    assert np.array_equal(_labels(tmp_path / "preds" / "image_1_pred.nii.gz"),
                          _labels(_single(case, tmp_path)))


def _single(case, tmp_path) -> Path:
    out = tmp_path / "single.nii.gz"
    assert main(_argv(case, out)) == 0
    return out


def test_the_support_is_encoded_once_for_all_queries(case, scans, tmp_path, monkeypatch, capsys):
    import fewshot_proto.predict as predict_cli

    calls = []
    real_load = predict_cli.model_from_checkpoint

    def load(*args, **kwargs):
        model, ckpt = real_load(*args, **kwargs)
        encode = model.encode_support

        def spy(*a, **kw):
            calls.append(a[-1])  # the class id
            return encode(*a, **kw)

        model.encode_support = spy
        return model, ckpt

    monkeypatch.setattr(predict_cli, "model_from_checkpoint", load)
    assert main(_argv(case, tmp_path / "one.nii.gz")) == 0
    assert sorted(calls) == [1, 1, 2, 2]  # 2 classes x n_part 2
    calls.clear()
    assert main(_argv(case, tmp_path / "preds", query=str(scans))) == 0  # two queries, still one encoding
    assert sorted(calls) == [1, 1, 2, 2]


@pytest.mark.parametrize("mode", ["file", "folder"])
def test_saved_probabilities_equal_predict_volume(case, scans, tmp_path, capsys, mode):
    import nibabel as nib

    from fewshot_proto.config import config_from_dict
    from fewshot_proto.data import read_volume
    from fewshot_proto.engine.checkpoint import model_from_checkpoint
    from fewshot_proto.engine.predictor import predict_volume

    if mode == "file":
        out = tmp_path / "pred_1.nii.gz"
        assert main(_argv(case, out, "--save-probabilities", "--threshold", "0.3")) == 0
        label, probs = out, [tmp_path / f"pred_1_prob_class{c}.nii.gz" for c in (1, 2)]
        query_file = case["query"]
    else:
        out = tmp_path / "preds"
        assert main(_argv(case, out, "--save-probabilities", "--threshold", "0.3", query=str(scans))) == 0
        label, probs = out / "image_2_pred.nii.gz", [out / f"image_2_prob_class{c}.nii.gz" for c in (1, 2)]
        query_file = scans / "image_2.nii.gz"
    assert capsys.readouterr().out.splitlines()[0].endswith(f"; probabilities: {probs[0]}, {probs[1]}")
    model, _ = model_from_checkpoint(case["ckpt"])
    kw = dict(slice_axis=2, normalise=config_from_dict(CONFIG).data.normalise)
    support = read_volume(case["support"], case["label"], **kw)
    query = read_volume(query_file, None, **kw)
    expect, expect_probs = predict_volume(model, [support], query, [1, 2], size=32, n_part=2, threshold=0.3,
                                          return_probs=True)
    assert np.array_equal(np.moveaxis(_labels(label), 2, 0), expect)
    q = nib.load(str(query_file))
    for c, f in zip((1, 2), probs):
        img = nib.load(str(f))
        assert img.get_data_dtype() == np.float32 and img.shape == q.shape
        assert np.array_equal(img.affine, q.affine)
        assert np.array_equal(np.moveaxis(np.asarray(img.dataobj), 2, 0), expect_probs[c])


def test_an_existing_non_empty_out_folder_needs_overwrite(case, scans, tmp_path, capsys, monkeypatch):
    out = tmp_path / "preds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "image_2_pred.nii.gz").write_text("old")
    with monkeypatch.context() as m:
        m.setattr("fewshot_proto.predict.model_from_checkpoint", _boom)
        line = _refused(capsys, _argv(case, out, query=str(scans)), tmp_path)
    assert line == (f"error: --out {out} is a folder that is not empty; pass --overwrite to write into it (files of "
                    f"the same name are replaced) or choose another --out")
    assert main(_argv(case, out, "--overwrite", query=str(scans))) == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert np.array_equal(_labels(out / "image_2_pred.nii.gz"), _labels(_single(case, tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(_argv(case, empty, query=str(scans))) == 0  # an empty folder needs no --overwrite


def _boom(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the command line was refused")


def test_folder_refusals_are_one_line(case, scans, tmp_path, capsys, no_load, write_nifti):
    q = str(scans)
    f = tmp_path / "file.txt"
    f.write_text("x")
    cases = [
        (_argv(case, f, query=q), f"error: --out {f} is a file; with several queries --out is the output folder "
                                  f"(created when missing)"),
        (_argv(case, tmp_path / "p.nii.gz", query=q),
         f"error: --out {tmp_path / 'p.nii.gz'}: with several queries --out is a folder, not a file name ending in "
         f".nii.gz or .nii"),
        (_argv(case, scans, "--overwrite", query=q),
         f"error: --out {scans} is the --query folder; its predictions would be read as queries next time (choose "
         f"another --out)"),
        (_argv(case, tmp_path / "o", query=str(case["query"].parent.parent / "ck")),
         f"error: --query {tmp_path / 'ck'}: folder holds no .nii.gz or .nii file"),
        (_argv(case, tmp_path / "o", query=q) + ["--query", str(case["query"])],
         f"error: --query {scans} is a folder; give one folder or several files, not both"),
        (_argv(case, tmp_path / "o", query=str(case["query"])) + ["--query", str(case["query"])],
         f"error: --query {case['query']} is the same file as --query {case['query']}; give each query once"),
        (_argv(case, tmp_path / "o", query=str(case["query"])) + ["--query", str(tmp_path / "nope.nii")],
         f"error: --query {tmp_path / 'nope.nii'}: file does not exist"),
        (_argv(case, f / "sub", query=q), f"error: --out {f / 'sub'}: cannot create it, {f} is not a folder"),
    ]
    for argv, want in cases:
        assert _refused(capsys, argv, tmp_path) == want


def test_two_queries_with_one_output_name_are_refused(case, scans, tmp_path, capsys, no_load):
    twin = tmp_path / "other" / "image_2.nii"
    twin.parent.mkdir()
    twin.write_bytes(b"")
    out = tmp_path / "o"
    line = _refused(capsys, _argv(case, out, query=str(scans / "image_2.nii.gz")) + ["--query", str(twin)], tmp_path)
    assert line == (f"error: --query {scans / 'image_2.nii.gz'} and --query {twin} would both be written to "
                    f"{out / 'image_2_pred.nii.gz'}; rename one or predict them separately")


def test_an_output_that_is_an_input_is_refused_in_folder_mode(case, scans, tmp_path, capsys, no_load):
    """The support label is named like the prediction of a query in the --out folder: refused, nothing written."""
    argv = _argv(case, case["label"].parent, "--overwrite", query=str(case["query"]))
    argv += ["--query", str(scans / "image_10.nii")]
    lab = case["label"].parent / "image_1_pred.nii.gz"
    case["label"].rename(lab)
    argv[argv.index("--support-label") + 1] = str(lab)
    line = _refused(capsys, argv, tmp_path)
    assert line == (f"error: --out {lab.parent}: {lab} would be the same file as --support-label {lab}; refusing "
                    f"to overwrite an input (choose another --out)")


def test_a_probability_file_that_is_an_input_is_refused(case, tmp_path, capsys, no_load):
    out = case["label"].parent / "label.nii.gz"
    prob = case["label"].parent / "label_prob_class1.nii.gz"
    case["label"].rename(prob)
    argv = _argv(case, out, "--save-probabilities")
    argv[argv.index("--support-label") + 1] = str(prob)
    line = _refused(capsys, argv, tmp_path)
    assert line == (f"error: --out {prob} is the same file as --support-label {prob}; refusing to overwrite an "
                    f"input (choose another --out)")


def test_the_old_classes_spelling_is_an_alias(case, tmp_path, capsys):
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert main(_argv(case, a)) == 0  # --classes
    argv = _argv(case, b)
    argv[argv.index("--classes")] = "--test-classes"
    assert main(argv) == 0
    assert np.array_equal(_labels(a), _labels(b))
    assert build_parser().parse_args(argv).classes == [1, 2]
