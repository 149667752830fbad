"""``python -m fewshot_proto.evaluate --episodes MANIFEST`` evaluates exactly the frozen episodes, and refuses a
manifest that no longer matches the data with exit code 2 and a one-line ``error: ...``.

The manifest is frozen with the episodes CLI under a protocol that differs in every parameter from the one the
checkpoint was trained with (adnet-ep1 / fold 1 / 2-shot / test classes {1, 4} against alpnet / fold 0 / 1-shot /
{2, 3}), so an evaluator that fell back to the checkpoint's protocol anywhere would be seen.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch

import fewshot_proto.engine.evaluator as evaluator_mod

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
FREEZE = ["--protocol", "adnet-ep1", "--folds", "1", "--setting", "2", "--test-classes", "1,4", "--shots", "2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, phantom_dataset) -> Path:
    """An untrained cwpa_unet saved with a config of the built-in phantoms at 32 px, alpnet fold 0, 1-shot, {2, 3}."""
    from fewshot_proto.config import apply_overrides, config_to_dict, default_config
    from fewshot_proto.engine.checkpoint import save_checkpoint
    from fewshot_proto.models import build_model

    cfg = apply_overrides(default_config(), {
        "data.size": SIZE, "train.device": "cpu", "train.precision": "fp32", "protocol.name": "alpnet",
        "protocol.fold": 0, "protocol.shots": 1, "protocol.test_classes": [2, 3], "protocol.setting": 2})
    assert cfg.data.root is None  # the phantoms of $FEWSHOT_PROTO_CACHE (set by the phantom_dataset fixture)
    torch.manual_seed(0)
    model = build_model(cfg.model.name, **cfg.model.kwargs)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, model=model, model_name=cfg.model.name, model_config=dict(model.config), step=0,
                    config=config_to_dict(cfg))
    return path


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, phantom_dataset) -> Path:
    from fewshot_proto.episodes.__main__ import main as episodes_main

    path = tmp_path_factory.mktemp("manifest") / "phantom_frozen.json"
    assert episodes_main(["freeze", *FREEZE, "--out", str(path)]) == 0
    return path


def _evaluate(args: List[str]) -> int:
    from fewshot_proto.evaluate import main

    return main([*args, "--no-progress", "--no-overlays"])


def _support_text(support) -> str:
    return ";".join(f"{s}:{','.join(str(int(z)) for z in zs)}" for s, zs in support)


def test_evaluate_episodes_runs_exactly_the_manifest(tmp_path, checkpoint, manifest, monkeypatch, capsys):
    """Every episode of the manifest and nothing else is evaluated: the specs reaching the evaluator are the
    manifest's (query scan and slices, chunks, support scans and slices), and metrics.json has one row per
    manifest episode with its fold, query scan, class, number of scored slices and support slices."""
    from fewshot_proto.episodes.manifest import load_manifest

    m = load_manifest(manifest)
    assert (m.protocol, m.folds, m.shots, m.test_classes, m.setting) == ("adnet-ep1", [1], 2, [1, 4], 2)
    assert m.episodes and all(len(e.support) == 2 for e in m.episodes)

    seen: List[Dict[str, Any]] = []
    real = evaluator_mod.predict_specs

    def recording(model, dataset, specs, **kw):
        seen.extend(s.to_dict() for s in specs)
        yield from real(model, dataset, specs, **kw)

    monkeypatch.setattr(evaluator_mod, "predict_specs", recording)
    out = tmp_path / "eval"
    rc = _evaluate(["--checkpoint", str(checkpoint), "--episodes", str(manifest), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert seen == [e.to_dict() for e in m.episodes]

    doc = json.loads((out / "metrics.json").read_text())
    rows = sorted((int(r["fold"]), str(r["scan"]), int(r["class_id"]), int(r["n_slices"]), r["extra"]["support"])
                  for r in doc["rows"])
    want = sorted((e.fold, e.query_scan, e.class_id, len(e.query_z), _support_text(e.support)) for e in m.episodes)
    assert rows == want
    assert doc["meta"]["episodes"] == str(manifest)


def test_evaluate_episodes_reports_the_manifest_protocol_in_meta(tmp_path, checkpoint, manifest, capsys):
    """metrics.json ``meta`` describes what was evaluated: the manifest's protocol, setting, folds, shots and test
    classes (not the checkpoint's training protocol, which the rows do not follow)."""
    out = tmp_path / "eval"
    assert _evaluate(["--checkpoint", str(checkpoint), "--episodes", str(manifest), "--out", str(out)]) == 0
    meta = json.loads((out / "metrics.json").read_text())["meta"]
    got = {k: meta.get(k) for k in ("protocol", "setting", "folds", "shots", "test_classes")}
    assert got == {"protocol": "adnet-ep1", "setting": 2, "folds": [1], "shots": 2, "test_classes": [1, 4]}


def _tamper(manifest: Path, dest: Path, how: str) -> Path:
    d = json.loads(manifest.read_text())
    if how == "fingerprint":
        d["dataset_fingerprint"] = "sha256:" + "0" * 64
    elif how == "support_slices":
        scan, zs = d["episodes"][0]["support"][0]
        d["episodes"][0]["support"][0] = [scan, [z + 1 for z in zs]]
    elif how == "query_slices":
        d["episodes"][-1]["query_z"] = [z + 1 for z in d["episodes"][-1]["query_z"]]
    else:  # pragma: no cover
        raise AssertionError(how)
    dest.write_text(json.dumps(d))
    return dest


@pytest.mark.parametrize("how", ["fingerprint", "support_slices", "query_slices"])
def test_evaluate_refuses_a_manifest_that_does_not_match_the_data(tmp_path, checkpoint, manifest, how, capsys):
    """A manifest whose fingerprint, support slices or query slices differ from what the data gives: exit code 2,
    stderr is one line ``error: manifest ... does not match the data ...`` naming what differs, no report written."""
    bad = _tamper(manifest, tmp_path / f"bad_{how}.json", how)
    out = tmp_path / "eval"
    rc = _evaluate(["--checkpoint", str(checkpoint), "--episodes", str(bad), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "manifest" in lines[0] and "does not match the data" in lines[0], err
    named = {"fingerprint": "dataset fingerprint", "support_slices": "support", "query_slices": "query_z"}[how]
    assert named in lines[0], err
    assert not (out / "metrics.json").exists()


def test_manifest_mismatch_error_names_the_manifest_file(tmp_path, checkpoint, manifest, capsys):
    """The user passed a file: the one-line error names it, so they know which manifest to re-freeze."""
    bad = _tamper(manifest, tmp_path / "stale_manifest.json", "fingerprint")
    rc = _evaluate(["--checkpoint", str(checkpoint), "--episodes", str(bad), "--out", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert rc == 2 and "stale_manifest.json" in err, err
