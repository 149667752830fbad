"""Manifests: freeze -> save -> load -> verify round trip, failures on changed data, clear load errors; CLI."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from fewshot_proto.episodes.__main__ import default_manifest_name, main, parse_int_list
from fewshot_proto.episodes.manifest import (
    fingerprint,
    freeze,
    load_manifest,
    manifest_mismatches,
    save_manifest,
    verify_manifest,
)
from fewshot_proto.errors import ProtocolError
from fewshot_proto.types import SliceIndex

IDS = [str(i) for i in range(1, 11)]


def make_index():
    rng = np.random.default_rng(0)
    index = {}
    for c in (1, 2, 3, 4):
        index[c] = {}
        for s in IDS:
            lo = int(rng.integers(0, 10))
            index[c][s] = list(range(lo, lo + int(rng.integers(3, 15))))
    return SliceIndex(index=index, n_slices={s: 30 for s in IDS}, dataset="toy")


def test_round_trip(tmp_path):
    idx = make_index()
    m = freeze(idx, protocol="alpnet", folds=range(5), n_folds=5, setting=2, test_classes=[2, 3], shots=1)
    assert len(m.episodes) == 2 * 10
    path = save_manifest(m, tmp_path / "sub" / "m.json")
    text = path.read_text()
    assert text.splitlines()[1] == '  "format": 1,'
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temporary file
    m2 = load_manifest(path)
    assert m2.to_dict() == m.to_dict()
    verify_manifest(m2, idx)  # no exception
    # stable output: saving again gives identical bytes
    save_manifest(m2, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_text() == text
    assert json.loads(text)["dataset_fingerprint"] == fingerprint(idx)


def test_same_parameters_same_manifest():
    a = freeze(make_index(), "full-volume", folds=[0, 1], test_classes=[1, 4], shots=2)
    b = freeze(make_index(), "full-volume", folds=[0, 1], test_classes=[1, 4], shots=2)
    assert a.to_dict() == b.to_dict()


def test_verify_fails_on_changed_index():
    idx = make_index()
    m = freeze(idx, "alpnet", folds=[0], test_classes=[2, 3])
    changed = copy.deepcopy(idx)
    changed.index[2]["1"] = changed.index[2]["1"][:-1]  # query scan 1 lost a slice of class 2
    problems = manifest_mismatches(m, changed)
    assert any("fingerprint" in p for p in problems)
    assert any("class 2 query '1'" in p and "query_z" in p for p in problems)
    with pytest.raises(ProtocolError, match="does not match"):
        verify_manifest(m, changed)
    # a changed scan that no episode uses still changes the fingerprint
    other = copy.deepcopy(idx)
    other.n_slices["9"] = 31
    assert [p for p in manifest_mismatches(m, other) if "fingerprint" in p]


def test_verify_reports_edited_episodes():
    idx = make_index()
    m = freeze(idx, "alpnet", folds=[1], test_classes=[2])
    m.episodes[0].support[0] = (m.episodes[0].support[0][0], [0, 0, 0])
    del m.episodes[1]
    problems = manifest_mismatches(m, idx)
    assert any("support differ" in p for p in problems)
    assert any("manifest absent" in p for p in problems)


def test_load_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ProtocolError, match=r"bad\.json.*not valid JSON"):
        load_manifest(p)
    good = freeze(make_index(), "alpnet", folds=[0], test_classes=[2]).to_dict()
    p.write_text(json.dumps({**good, "format": 99}))
    with pytest.raises(ProtocolError, match=r"bad\.json.*format 99"):
        load_manifest(p)
    d = dict(good)
    del d["episodes"], d["protocol"]
    p.write_text(json.dumps(d))
    with pytest.raises(ProtocolError, match=r"missing key.*protocol"):
        load_manifest(p)
    with pytest.raises(ProtocolError, match="does not exist"):
        load_manifest(tmp_path / "nope.json")


def test_cli_helpers():
    assert parse_int_list("0-4") == [0, 1, 2, 3, 4]
    assert parse_int_list("2,3") == [2, 3]
    assert parse_int_list("0-1,3") == [0, 1, 3]
    assert default_manifest_name("chaos_t2", "alpnet", 2, [2, 3], 1) == "chaos_t2_alpnet_setting2_23_1shot.json"
    assert default_manifest_name("d", "alpnet", 1, [1, 4], 4, folds=[0]) == "d_alpnet_setting1_14_4shot_folds0.json"


def write_alpnet_dataset(root: Path, n: int = 6, z: int = 10):
    nib = pytest.importorskip("nibabel")
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(1, n + 1):
        lab = np.zeros((16, 16, z), np.int16)  # (H, W, Z): slice axis 2
        lab[2:6, 2:6, 1:6] = 1
        lab[8:12, 8:12, 3 + i % 3:8] = 2
        img = rng.normal(size=lab.shape).astype(np.float32) + lab
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(root / f"image_{i}.nii.gz"))
        nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / f"label_{i}.nii.gz"))


def test_cli_freeze_verify_list(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fewshot_proto.data.readers")
    monkeypatch.setenv("FEWSHOT_PROTO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "toyset"
    write_alpnet_dataset(data)
    out = tmp_path / "eps" / "toy.json"
    rc = main(["freeze", "--data", str(data), "--protocol", "alpnet", "--folds", "0-2", "--n-folds", "3",
               "--setting", "2", "--test-classes", "2", "--shots", "1", "--out", str(out)])
    assert rc == 0 and out.is_file()
    m = load_manifest(out)
    assert m.dataset == "toyset" and m.folds == [0, 1, 2] and len(m.episodes) == 6
    assert main(["verify", str(out), "--data", str(data)]) == 0
    assert "OK" in capsys.readouterr().out
    # change one label file -> verify exits 1 and lists the mismatch
    nib = pytest.importorskip("nibabel")
    lab = np.asarray(nib.load(str(data / "label_1.nii.gz")).dataobj).copy()
    lab[8:12, 8:12, 9] = 2
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(data / "label_1.nii.gz"))
    assert main(["verify", str(out), "--data", str(data)]) == 1
    text = capsys.readouterr().out
    assert "MISMATCH" in text and "fingerprint" in text and "query '1'" in text
    assert main(["list", "--dir", str(out.parent)]) == 0
    assert "toy.json" in capsys.readouterr().out
    # errors: missing folder -> exit 2 with a message
    assert main(["verify", str(out), "--data", str(tmp_path / "missing")]) == 2
    assert "error" in capsys.readouterr().err
