"""The suite-wide rules in tests/conftest.py, each shown by a pytest subprocess on tiny test files that use a copy of
that conftest (no torch import; about a second per run):

* ``--require-optional`` turns a skip for a missing learn2learn (``pytest.importorskip``, in a test, a fixture or at
  module level) into a failure that names the import error; without the flag it stays a skip. Other skips, and
  importorskip of packages that are not listed as optional, stay skips either way.
* a test that uses ``real_data_dir`` without the ``realdata`` mark errors at set-up; a marked one runs.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, Tuple

import pytest

CONFTEST = Path(__file__).resolve().parents[2] / "conftest.py"

# learn2learn may well be installed here; ``None`` in sys.modules makes ``import learn2learn`` raise
# ModuleNotFoundError, as on a machine without it.
HIDE_L2L = 'import sys\nsys.modules["learn2learn"] = None\n'

FUNCTION_LEVEL = HIDE_L2L + '''
import pytest


def test_importorskip_in_the_test():
    pytest.importorskip("learn2learn")


@pytest.fixture(scope="module")
def l2l():
    return pytest.importorskip("learn2learn")


def test_importorskip_in_a_module_fixture(l2l):
    pass


def test_an_unrelated_skip():
    pytest.skip("not about an optional package")


def test_importorskip_of_a_package_not_listed_as_optional():
    pytest.importorskip("fewshot_proto_no_such_package")


def test_unmarked_real_data(real_data_dir):
    pass


@pytest.mark.realdata
def test_marked_real_data(real_data_dir):
    assert real_data_dir.name == "data"
'''

MODULE_LEVEL = HIDE_L2L + '''
import pytest

l2l = pytest.importorskip("learn2learn")


def test_never_runs_without_learn2learn():
    pass
'''

MESSAGE = ("learn2learn is required by --require-optional but is not importable: "
           "import of learn2learn halted; None in sys.modules")


@pytest.fixture
def project(tmp_path) -> Path:
    """``tmp_path/repo`` with the suite's conftest in ``tests/`` and ``tmp_path/shared/data`` beside it."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    shutil.copy(CONFTEST, repo / "tests" / "conftest.py")
    (repo / "pytest.ini").write_text("[pytest]\naddopts = --strict-markers\nmarkers =\n    realdata: real data\n")
    (tmp_path / "shared" / "data").mkdir(parents=True)  # the conftest's REAL_DATA: <repo>/../shared/data
    return repo


def run(repo: Path, *args: str) -> Tuple[int, Dict[str, Tuple[str, str]], str]:
    """Run pytest on ``repo/tests``; returns (exit code, {test name: (outcome, message + text)}, stdout)."""
    xml = repo / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(repo / "pytest.ini"),
         "--rootdir", str(repo), f"--junitxml={xml}", *args, "tests"],
        cwd=repo, capture_output=True, text=True, timeout=120)
    results: Dict[str, Tuple[str, str]] = {}
    for case in ET.parse(xml).iter("testcase"):
        outcome, text = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome, text = child.tag, f"{child.get('message', '')}\n{child.text or ''}"
        results[case.get("name") or case.get("classname")] = (outcome, text)
    return proc.returncode, results, proc.stdout + proc.stderr


def test_missing_learn2learn_skips_without_the_flag_and_fails_with_it(project):
    (project / "tests" / "test_tiny.py").write_text(FUNCTION_LEVEL)

    rc, got, out = run(project)
    assert rc == 1, out  # the unmarked real-data test errors
    assert {k: v[0] for k, v in got.items()} == {
        "test_importorskip_in_the_test": "skipped",
        "test_importorskip_in_a_module_fixture": "skipped",
        "test_an_unrelated_skip": "skipped",
        "test_importorskip_of_a_package_not_listed_as_optional": "skipped",
        "test_unmarked_real_data": "error",
        "test_marked_real_data": "passed",
    }, out
    assert "--require-optional makes this a failure" in got["test_importorskip_in_the_test"][1]
    assert "not marked realdata" in got["test_unmarked_real_data"][1]

    rc, got, out = run(project, "--require-optional")
    assert rc == 1, out
    assert {k: v[0] for k, v in got.items()} == {
        "test_importorskip_in_the_test": "failure",
        "test_importorskip_in_a_module_fixture": "error",  # the skip was raised while setting up the fixture
        "test_an_unrelated_skip": "skipped",
        "test_importorskip_of_a_package_not_listed_as_optional": "skipped",
        "test_unmarked_real_data": "error",
        "test_marked_real_data": "passed",
    }, out
    for name in ("test_importorskip_in_the_test", "test_importorskip_in_a_module_fixture"):
        assert MESSAGE in got[name][1], got[name]
    assert MESSAGE in out  # and it is what the terminal shows


def test_a_module_level_importorskip_fails_collection_with_the_flag(project):
    (project / "tests" / "test_module_level.py").write_text(MODULE_LEVEL)

    rc, got, out = run(project)
    assert rc in (0, 5) and "1 skipped" in out, out  # the whole module skips, as before (5: nothing ran)

    rc, got, out = run(project, "--require-optional")
    assert rc == 2 and "error" in out and MESSAGE in out, out  # a collection error stops the run


def test_ci_and_the_readme_test_command_pass_the_flag():
    repo = CONFTEST.parents[1]
    readme_test_command = (repo / "README.md").read_text().split("```bash\n")[2].split("\n```")[0]
    assert "pytest -q --require-optional tests" in readme_test_command
    assert readme_test_command.strip() in (repo / ".ci" / "run").read_text()
