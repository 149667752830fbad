"""The four command lines agree: --version, one-line errors for bad flags, their own name in --help, every flag's
default stated, one flag name per concept, and help texts that name only files that exist."""
from __future__ import annotations

import argparse
import glob
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

import fewshot_proto
from fewshot_proto import evaluate, predict, train
from fewshot_proto.episodes import __main__ as episodes

ROOT = Path(__file__).resolve().parents[3]
MODULES = {"train": train, "evaluate": evaluate, "predict": predict, "episodes": episodes}


def parsers() -> Dict[str, argparse.ArgumentParser]:
    """Every parser, sub-commands included (``episodes freeze`` ...)."""
    out = {}
    for name, module in MODULES.items():
        p = module.build_parser()
        out[name] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                out.update({f"{name} {sub}": sp for sub, sp in action.choices.items()})
    return out


def options(p: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings}


@pytest.mark.parametrize("name", MODULES)
def test_version_prints_the_package_version(name, capsys):
    assert MODULES[name].main(["--version"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"fewshot_proto {fewshot_proto.__version__}\n" and captured.err == ""


@pytest.mark.parametrize("name, argv, line", [
    ("train", ["--bogus"], "error: python -m fewshot_proto.train: unrecognized arguments: --bogus (see --help)"),
    ("train", ["--shots", "x"], "error: python -m fewshot_proto.train: argument --shots: invalid int value: 'x' "
                                "(see --help)"),
    ("evaluate", ["--checkpoint", "c.pt", "--bogus"],
     "error: python -m fewshot_proto.evaluate: unrecognized arguments: --bogus (see --help)"),
    ("evaluate", [], "error: python -m fewshot_proto.evaluate: the following arguments are required: --checkpoint "
                     "(or --report DIR) (see --help)"),
    ("evaluate", ["--checkpoint", "c.pt", "--batch-size", "0"],
     "error: python -m fewshot_proto.evaluate: argument --batch-size: expected a positive integer, got '0' "
     "(see --help)"),
    ("predict", ["--threads", "0"], "error: python -m fewshot_proto.predict: argument --threads: expected a positive "
                                    "integer, got '0' (see --help)"),
    ("episodes", ["freeze", "--bogus"], "error: python -m fewshot_proto.episodes: unrecognized arguments: --bogus "
                                        "(see --help)"),
    ("episodes", ["freeze", "--shots", "0"], "error: python -m fewshot_proto.episodes freeze: argument --shots: "
                                             "expected a positive integer, got '0' (see --help)"),
    ("episodes", [], "error: python -m fewshot_proto.episodes: the following arguments are required: "
                     "{freeze,verify,list} (see --help)"),
])
def test_bad_flags_are_one_line(name, argv, line, capsys):
    assert MODULES[name].main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line] and captured.out == ""


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_a_bad_choice_is_one_line(name, capsys):
    argv = (["--checkpoint", "c.pt"] if name == "evaluate" else []) + ["--device", "tpu"]
    assert MODULES[name].main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: python -m fewshot_proto.{name}: argument --device: invalid choice: 'tpu'")


@pytest.mark.parametrize("name", MODULES)
def test_help_shows_the_console_script_name_when_run_as_one(name, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"/somewhere/bin/fewshot-{name}"])
    assert MODULES[name].main(["--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: fewshot-{name} [-h] [--version]")
    monkeypatch.setattr(sys, "argv", [f"/repo/fewshot_proto/{name}.py"])  # python -m fewshot_proto.<name>
    assert MODULES[name].build_parser().prog == f"python -m fewshot_proto.{name}"


def test_the_installed_console_script_names_itself():
    script = Path(sys.executable).parent / "fewshot-episodes"
    if not script.exists():
        pytest.skip("the package is not installed with its console scripts")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: fewshot-episodes [-h] [--version]")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert out.stdout == f"fewshot_proto {fewshot_proto.__version__}\n"


@pytest.mark.parametrize("name", list(parsers()))
def test_every_flag_states_its_default(name):
    p = parsers()[name]
    p.formatter_class = lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=90, width=1000)
    lines = [ln for ln in p.format_help().split("options:", 1)[1].splitlines() if ln.startswith("  -")]
    assert lines
    for ln in lines:
        if ln.split()[0] in ("-h,", "--version"):
            continue
        assert "(default: " in ln or "(required" in ln, ln


#: flags that mean the same thing wherever they appear: same option strings, same choices
SHARED = ["checkpoint", "data", "layout", "test_classes", "classes", "shots", "setting", "fold", "folds", "protocol",
          "device", "precision", "threads", "batch_size", "no_progress", "overwrite", "out", "n_part"]


def test_one_concept_has_one_flag_name():
    seen: Dict[str, List[tuple]] = {}
    for name, p in parsers().items():
        for dest, a in options(p).items():
            if dest in SHARED:
                seen.setdefault(dest, []).append((name, tuple(a.option_strings)))
    # predict's classes are the held-out classes: --test-classes everywhere, predict keeps --classes as an alias
    assert dict(seen["classes"]) == {"predict": ("--test-classes", "--classes")}
    for dest, where in seen.items():
        if dest != "classes":
            assert {opts for _, opts in where} == {("--" + dest.replace("_", "-"),)}, where
    assert {n for n, _ in seen["device"]} == {"train", "evaluate", "predict"}
    assert {n for n, _ in seen["threads"]} == {"train", "evaluate", "predict"}
    assert {n for n, _ in seen["batch_size"]} == {"evaluate", "predict"}
    for dest in ("device", "precision", "layout"):
        choices = {tuple(options(p)[dest].choices) for p in parsers().values() if dest in options(p)}
        assert len(choices) == 1, (dest, choices)


def test_both_spellings_of_the_predict_classes_flag_parse():
    base = ["--checkpoint", "c", "--support", "s", "--support-label", "l", "--query", "q", "--out", "o.nii.gz"]
    p = predict.build_parser()
    assert p.parse_args(base + ["--classes", "1,4"]).classes == [1, 4]
    assert p.parse_args(base + ["--test-classes", "1,4"]).classes == [1, 4]


#: a path the help names: a repo-relative path with a folder part (placeholders such as RUN/ or <dataset> skipped)
PATH = re.compile(r"(?<![\w./<>-])([a-z_][\w.-]*(?:/[\w.*-]+)+/?)")


@pytest.mark.parametrize("name", list(parsers()))
def test_help_names_only_files_that_exist(name):
    text = parsers()[name].format_help()
    named = sorted({m.rstrip("/.") for m in PATH.findall(text)})
    top = {p.name for p in ROOT.iterdir()}
    for path in named:
        if path.split("/")[0] not in top:  # e.g. scans/, preds/, image_<id>/: example names, not repo files
            continue
        if any(part.split(".")[0].isupper() for part in path.split("/")):  # a placeholder: episodes/NAME.json
            continue
        assert glob.glob(str(ROOT / path)), f"{name} --help names {path}, which does not exist in the repository"
    if name == "train":
        assert "configs/experiments/chaos_t2_setting2_23_1shot.yaml" in named
        configs = re.findall(r"[\w./*-]+\.ya?ml", text)
        assert configs and all(glob.glob(str(ROOT / c)) for c in configs), configs
