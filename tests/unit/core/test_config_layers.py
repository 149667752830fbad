"""One source of defaults: partial configs layer over the built-in default; every value is checked when built."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from fewshot_proto.config import (ConfigError, ExperimentConfig, apply_overrides, build_config, config_differences,
                                  config_to_dict, default_config, load_config, parse_set, save_config)
from fewshot_proto.train import build_parser, config_from_args

ROOT = Path(__file__).resolve().parents[3]


def cli_config(*argv: str) -> ExperimentConfig:
    return config_from_args(build_parser().parse_args(list(argv)))


def test_a_partial_config_keeps_the_built_in_recipe(tmp_path):
    """``data: {size: 128}`` changes the size and nothing else (it used to swap AdamW/cosine/Dice/bf16-auto/540 s for
    SGD/step/no Dice/fp32/no cap)."""
    f = tmp_path / "partial.yaml"
    f.write_text("data: {size: 128}\n")
    cfg = load_config(f)
    expected = config_to_dict(default_config())
    expected["data"]["size"] = 128
    assert config_to_dict(cfg) == expected
    t = cfg.train
    assert (t.optimizer, t.scheduler, t.lambda_dice, t.precision, t.max_seconds, t.lr) == \
        ("adamw", "cosine", 1.0, "auto", 540.0, 5e-4)
    assert config_to_dict(cli_config("--config", str(f))) == expected


def test_an_empty_file_is_the_default_run(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing but a comment\n")
    assert config_to_dict(load_config(f)) == config_to_dict(default_config())
    assert config_to_dict(cli_config("--config", str(f))) == config_to_dict(cli_config())


def test_relative_data_root_resolves_against_the_file(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    f = tmp_path / "exp" / "x.yaml"
    f.write_text("data: {root: ../data/chaos}\n")
    monkeypatch.chdir(ROOT)  # anywhere but the file's folder
    assert load_config(f).data.root == str(tmp_path / "data" / "chaos")
    f.write_text(f"data: {{root: {tmp_path / 'abs'}}}\n")
    assert load_config(f).data.root == str(tmp_path / "abs")


def test_shipped_chaos_config_points_at_shared_data_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(ROOT / "configs" / "experiments" / "chaos_t2_setting2_23_1shot.yaml")
    assert Path(cfg.data.root) == ROOT.parent / "shared" / "data" / "chaos_t2"


def test_set_overrides_any_key_by_its_dotted_path():
    cfg = cli_config("--set", "train.lr=1e-3", "data.size=128", "--set", "model.kwargs.tau=0.3",
                     "train.max_seconds=null", "protocol.test_classes=[1, 4]")
    assert (cfg.train.lr, cfg.data.size, cfg.model.kwargs, cfg.train.max_seconds, cfg.protocol.test_classes) == \
        (1e-3, 128, {"tau": 0.3}, None, [1, 4])
    assert cli_config("--iters", "7", "--set", "train.iters=9").train.iters == 9  # --set is the last layer
    assert parse_set(["a.b=", "c.d=x"]) == {"a.b": None, "c.d": "x"}


@pytest.mark.parametrize("item, message", [
    ("train.lr", "--set 'train.lr': expected KEY=VALUE, e.g. train.lr=1e-3"),
    ("train.nope=1", "--set: unknown key(s) ['train.nope']"),
    ("lr=1", "--set: 'lr' is not a dotted key such as train.lr or data.size"),
    ("train.lr=[1", "--set 'train.lr=[1': the value is not valid YAML"),
    ("train.lr=abc", "--set: train.lr = 'abc': expected number"),
    ("train.iters=1e3", "--set: train.iters = '1e3': expected integer"),
    ("train.ce_weights=[a]", "--set: train.ce_weights = ['a']: expected list of number or null"),
])
def test_bad_set_items_are_config_errors(item, message):
    with pytest.raises(ConfigError) as e:
        cli_config("--set", item)
    assert message in str(e.value)


@pytest.mark.parametrize("yaml_text, message", [
    ("train: {iters: -1}", "train.iters = -1: must be an integer >= 0"),
    ("train: {lr: .nan}", "train.lr = nan: must be a finite number > 0"),
    ("train: {lr: 0}", "train.lr = 0.0: must be a finite number > 0"),
    ("train: {lr: .inf}", "train.lr = inf: must be a finite number > 0"),
    ("train: {optimizer: rmsprop}", "train.optimizer = 'rmsprop': must be one of sgd, adam, adamw"),
    ("train: {scheduler: poly}", "train.scheduler = 'poly': must be one of step, cosine, none"),
    ("train: {max_seconds: -5}", "train.max_seconds = -5.0: must be a finite number > 0 or null"),
    ("train: {device: tpu}", "train.device = 'tpu': must be auto, cpu or cuda[:N]"),
    ("data: {size: 0}", "data.size = 0: must be an integer from 16 to 2048"),
    ("data: {size: 4096}", "data.size = 4096: must be an integer from 16 to 2048"),
    ("protocol: {fold: 5}", "protocol.fold = 5: must be an integer from 0 to 4"),
    ("protocol: {test_classes: [0, 2]}", "protocol.test_classes = [0, 2]: must be distinct class ids >= 1"),
    ("protocol: {setting: 3}", "protocol.setting = 3: must be 1 or 2"),
    ("episodes: {superpixel_prob: 1.5}", "episodes.superpixel_prob = 1.5: must be a finite number >= 0 and <= 1"),
    ("supervised: {batch_size: 0}", "supervised.batch_size = 0: must be an integer >= 1"),
])
def test_values_are_range_checked_when_the_file_is_loaded(tmp_path, yaml_text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text + "\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {message}" or str(e.value).startswith(f"{f}: {message}")


def test_the_error_names_the_layer_that_set_the_value(tmp_path):
    f = tmp_path / "ok.yaml"
    f.write_text("train: {lr: 0.01}\n")
    with pytest.raises(ConfigError, match=r"^--set: train.lr = -1.0: must be a finite number > 0$"):
        cli_config("--config", str(f), "--set", "train.lr=-1")
    with pytest.raises(ConfigError, match=r"^command line: train.iters = -3: must be an integer >= 0$"):
        cli_config("--config", str(f), "--iters", "-3")
    with pytest.raises(ConfigError, match=r"^overrides: train.lr = nan"):
        apply_overrides(default_config(), {"train.lr": math.nan})
    # a value left at the default is named as such when another key makes it invalid
    base = config_to_dict(apply_overrides(default_config(), {"protocol.fold": 4}))
    with pytest.raises(ConfigError, match=r"^checkpoint c.pt: protocol.fold = 4: must be an integer from 0 to 2"):
        build_config([("x.yaml", {"protocol": {"n_folds": 3}})], base=base, base_where="checkpoint c.pt")


def test_floats_written_without_a_dot_are_floats(tmp_path):
    """YAML 1.1 reads ``1e-3`` as a string; a float key takes it as the number it spells."""
    f = tmp_path / "lr.yaml"
    f.write_text("train: {lr: 1e-3, max_seconds: 2e2}\n")
    cfg = load_config(f)
    assert (cfg.train.lr, cfg.train.max_seconds) == (1e-3, 200.0)
    assert cli_config("--set", "train.lr=1e-3").train.lr == 1e-3


def test_model_flag_drops_the_kwargs_of_another_model(tmp_path):
    f = tmp_path / "m.yaml"
    f.write_text("model: {name: cwpa_unet, kwargs: {tau: 0.3}}\n")
    assert cli_config("--config", str(f)).model.kwargs == {"tau": 0.3}
    assert cli_config("--config", str(f), "--model", "cwpa_unet").model.kwargs == {"tau": 0.3}
    assert cli_config("--config", str(f), "--model", "alpnet").model.kwargs == {}


def test_config_differences_lists_changed_keys_only():
    a = config_to_dict(default_config())
    b = config_to_dict(apply_overrides(default_config(), {"train.iters": 5, "protocol.test_classes": [1, 4]}))
    assert config_differences(a, b) == ["protocol.test_classes: [2, 3] -> [1, 4]", "train.iters: 1000 -> 5"]
    assert config_differences(a, b, ignore=["train.iters"]) == ["protocol.test_classes: [2, 3] -> [1, 4]"]
    del b["train"]["lr"]  # a key an older version did not write is skipped
    assert config_differences(a, b, ignore=["train.iters", "protocol"]) == []


def test_class_names_keys_written_as_strings_are_class_ids(tmp_path):
    """YAML (and JSON) may give ``data.class_names`` keys as strings; they are read as the integers they spell."""
    f = tmp_path / "names.yaml"
    f.write_text("data: {class_names: {'1': liver, 2: right kidney, ' 4 ': spleen}}\n")
    assert load_config(f).data.class_names == {1: "liver", 2: "right kidney", 4: "spleen"}
    assert cli_config("--set", "data.class_names={'3': left_kidney}").data.class_names == {3: "left_kidney"}
    assert default_config().data.class_names is None
    saved = tmp_path / "saved.yaml"  # the run folder's config.yaml reads back the same
    save_config(load_config(f), saved)
    assert load_config(saved).data.class_names == {1: "liver", 2: "right kidney", 4: "spleen"}


@pytest.mark.parametrize("yaml_text, message", [
    ("{liver: 1}", "data.class_names = {'liver': 1}: key 'liver' is not a class id (an integer >= 0, the value "
                   "after data.label_map)"),
    ("{-1: liver}", "data.class_names = {-1: 'liver'}: key -1 is not a class id (an integer >= 0, the value "
                    "after data.label_map)"),
    ("{'-2': liver}", "data.class_names = {-2: 'liver'}: key -2 is not a class id (an integer >= 0, the value "
                      "after data.label_map)"),
    ("{1.5: liver}", "data.class_names = {1.5: 'liver'}: key 1.5 is not a class id (an integer >= 0, the value "
                     "after data.label_map)"),
    ("{1: ''}", "data.class_names = {1: ''}: the name of class 1 must be a non-empty one-line string, got ''"),
    ("{1: '  '}", "data.class_names = {1: '  '}: the name of class 1 must be a non-empty one-line string, got '  '"),
    ("{1: 7}", "data.class_names = {1: 7}: the name of class 1 must be a non-empty one-line string, got 7"),
    ("{1: null}", "data.class_names = {1: None}: the name of class 1 must be a non-empty one-line string, got None"),
    ("[liver, spleen]", "data.class_names = ['liver', 'spleen']: expected mapping or null"),
])
def test_bad_class_names_are_one_line_config_errors(tmp_path, yaml_text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(f"data: {{class_names: {yaml_text}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert str(e.value) == f"{f}: {message}"
