"""Package-level contracts: light import, layered imports, README <-> CI agreement."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_import_is_light():
    code = ("import sys, fewshot_proto, fewshot_proto.types, fewshot_proto.config, fewshot_proto.registry;"
            "heavy = [m for m in ('torch', 'nibabel', 'scipy', 'skimage', 'torchvision') if m in sys.modules];"
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing fewshot_proto pulled in heavy modules: {out}"


def test_lazy_public_api():
    import fewshot_proto

    assert re.fullmatch(r"\d+\.\d+\.\d+", fewshot_proto.__version__)
    assert callable(fewshot_proto.list_models)
    with pytest.raises(AttributeError):
        fewshot_proto.not_a_thing  # noqa: B018


def test_import_layers_contract():
    exe = Path(sys.executable).with_name("lint-imports")
    exe = str(exe) if exe.exists() else shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e .[test])")
    res = subprocess.run([exe, "--config", str(ROOT / "setup.cfg")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```(?:bash|sh)\n(.+?)\n```", text, flags=re.S)[:2]


def test_readme_leads_with_two_commands_and_ci_runs_the_second():
    cmds = _readme_commands()
    assert len(cmds) == 2
    assert "fewshot_proto.train --shots 1" in cmds[0]
    assert "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert cmds[1].strip() in ci, "the README's test command and .ci/run have drifted apart"
    for c in cmds:
        assert "torch==2.14.1" in c and "torchvision==0.29.1" in c
