from __future__ import annotations

from pathlib import Path

import pytest

from fewshot_proto.config import (ConfigError, apply_overrides, config_from_dict, config_to_dict, default_config,
                                  load_config, save_config)
from fewshot_proto.registry import Registry

ROOT = Path(__file__).resolve().parents[3]


def test_registry_duplicate_and_unknown():
    r = Registry("widget")

    @r.register("a")
    def build_a(x=1):
        return ("a", x)

    assert r.build("a", x=3) == ("a", 3)
    with pytest.raises(ValueError, match="already registered"):
        r.register("a")(lambda: None)
    with pytest.raises(KeyError, match=r"unknown widget 'b'; valid names: a"):
        r.get("b")
    assert r.names() == ["a"] and "a" in r and len(r) == 1


def test_config_round_trip(tmp_path):
    cfg = default_config()
    cfg.data.label_map = {200: 1, 500: 2}
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert config_to_dict(back) == config_to_dict(cfg)
    assert back.data.label_map == {200: 1, 500: 2}


def test_config_rejects_unknown_keys_naming_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  iterz: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) \['train.iterz'\]"):
        load_config(p)
    p.write_text("train:\n  iters: five\n")
    with pytest.raises(ConfigError, match=r"train.iters.*'five'"):
        load_config(p)
    p.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides():
    cfg = apply_overrides(default_config(), {"train.iters": 7, "protocol.test_classes": [1, 4], "data.root": None,
                                             "model.kwargs.tau": 0.3})
    assert cfg.train.iters == 7 and cfg.protocol.test_classes == [1, 4] and cfg.model.kwargs == {"tau": 0.3}
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(cfg, {"train.nope": 1})
    assert config_from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_shipped_configs_load_and_state_only_what_differs_from_the_default():
    """Every shipped experiment file loads, and states no key at its built-in default value."""
    import yaml

    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert files, "configs/ ships no YAML"
    default = config_to_dict(default_config())
    for f in files:
        load_config(f)
        raw = yaml.safe_load(f.read_text()) or {}
        same = [f"{s}.{k}" for s, vals in raw.items() for k, v in vals.items()
                if k != "kwargs" and default[s][k] == v]
        assert not same, f"{f.name} restates defaults: {same}"


def test_train_cli_budget_cap_default_explicit_iters_and_max_seconds():
    """The built-in run stops at 1000 episodes or 540 s; an explicit --iters lifts the cap, --max-seconds sets it."""
    from fewshot_proto.train import build_parser, config_from_args

    def cfg_of(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    default = cfg_of("--shots", "1")
    assert (default.train.iters, default.train.max_seconds) == (1000, 540.0)
    assert (default.data.size, default.train.precision, default.train.lambda_dice) == (256, "auto", 1.0)
    more = cfg_of("--shots", "1", "--iters", "5000")
    assert (more.train.iters, more.train.max_seconds) == (5000, None)
    capped = cfg_of("--iters", "5000", "--max-seconds", "60")
    assert (capped.train.iters, capped.train.max_seconds) == (5000, 60.0)
    assert cfg_of("--max-seconds", "0").train.max_seconds is None
    shipped = cfg_of("--config", str(ROOT / "configs" / "experiments" / "phantom_alpnet.yaml"), "--iters", "10")
    assert shipped.train.max_seconds is None  # the file states no cap: it has the default's, which --iters lifts
    chaos = cfg_of("--config", str(ROOT / "configs" / "experiments" / "chaos_t2_setting2_23_1shot.yaml"))
    assert chaos.train.max_seconds is None  # the file's own choice (null)
    stated = cfg_of("--iters", "10", "--set", "train.max_seconds=30")
    assert stated.train.max_seconds == 30.0  # a cap stated by --set stays
