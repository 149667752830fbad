"""YAML <-> dataclasses: one built-in default, partial experiment files layered over it, validated at load time.

An experiment file has up to six sections, each a dataclass below::

    data:       {root: ../data/chaos_t2, size: 256, ...}           -> DataConfig
    model:      {name: cwpa_unet_matcher, kwargs: {tau: 0.5, ...}}          -> ModelConfig -> build_model(name, **kwargs)
    episodes:   {shots: 1, mode: mixed, ...}                        -> EpisodeConfig (few-shot training sampler)
    protocol:   {name: alpnet, setting: 2, test_classes: [2, 3]}   -> ProtocolConfig (evaluation)
    train:      {iters: 1000, lr: 5e-4, ...}                        -> TrainConfig
    supervised: {n_labelled: null, batch_size: 8, ...}             -> SupervisedConfig (supervised baselines)

**One source of defaults.** The dataclass defaults ARE the built-in default run (``default_config()``): a file
states only what differs from them, and every key it leaves out keeps the default (an empty file is the default
run). Layers apply in order (the default or a checkpoint's config, then a file, then command-line flags, then
``--set key=value`` overrides): :func:`build_config`. A relative ``data.root`` in a file is resolved against the
file's folder.

**Validated when built.** Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the
layer that set the value (the file, "command line", ...), the dotted key and the allowed range
(:func:`validate_config`). Files are read with ``yaml.safe_load``. This module is core: no torch.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from fewshot_proto.errors import ConfigError

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "EpisodeConfig",
    "ProtocolConfig",
    "TrainConfig",
    "SupervisedConfig",
    "ExperimentConfig",
    "load_config",
    "save_config",
    "config_from_dict",
    "config_to_dict",
    "apply_overrides",
    "build_config",
    "read_config_file",
    "parse_set",
    "dotted_to_nested",
    "validate_config",
    "config_differences",
    "default_config",
    "PRECISIONS",
]

#: values of ``train.precision`` and ``--precision`` (``"auto"``: ``engine.runtime.resolve_precision``)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class DataConfig:
    """Where volumes come from and how slices are prepared.

    root: dataset folder; ``None`` means the built-in synthetic phantoms.
    layout: ``"alpnet"`` (image_<id>/label_<id>), ``"msd"`` (imagesTr/labelsTr/dataset.json) or ``"auto"``.
    slice_axis: array axis of the file that holds slices (2 for CHAOS-T2 / SSL-ALPNet files).
    label_map: raw label value -> class id (e.g. ``{200: 1, 500: 2, 600: 3}``); unmapped non-zero values
        raise unless ``drop_unmapped`` is true, in which case they become background.
    class_names: class id -> name (e.g. ``{1: liver, 2: right_kidney, 3: left_kidney, 4: spleen}``), the names
        reports (``metrics.json``, ``summary.md``, TensorBoard tags) give the classes. The ids are the values AFTER
        ``label_map`` (the class ids training and evaluation see), not the raw values in the files. YAML keys
        may be written as strings (``"1": liver``); they are read as integers. ``None``: the names the dataset
        carries (MSD ``dataset.json["labels"]``, an SSL-ALPNet folder's ``labels.json``, the phantoms' own);
        when given, this mapping replaces those names as a whole (the config wins).
    normalise: ``"zscore"`` (MR, per volume), ``"ct"`` (window then training-set statistics) or ``"none"``.
    ct_window: (low, high) HU window for ``normalise: ct``.
    size: model input size (slices are resized to size x size).
    cache_volumes: how many decoded volumes the reader keeps in memory.
    """

    root: Optional[str] = None
    layout: str = "auto"
    slice_axis: int = 2
    label_map: Optional[Dict[int, int]] = None
    drop_unmapped: bool = False
    class_names: Optional[Dict[int, str]] = None
    normalise: str = "zscore"
    ct_window: Optional[List[float]] = None
    size: int = 256
    cache_volumes: int = 8


@dataclass
class ModelConfig:
    """``build_model(name, **kwargs)``."""

    name: str = "cwpa_unet_matcher"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EpisodeConfig:
    """Training episodes.

    mode: ``"labelled"`` (training classes of labelled scans), ``"superpixel"`` (self-supervised, SSL-ALPNet
        style) or ``"mixed"`` (superpixel with probability ``superpixel_prob``, else labelled).
    shots: support slices per episode (k-shot); n_query: query slices per episode.
    augment: affine + elastic + gamma augmentation (identical on image and mask).
    """

    mode: str = "mixed"
    shots: int = 1
    n_query: int = 1
    superpixel_prob: float = 0.5
    augment: bool = True
    superpixel_scale: float = 100.0
    min_fg_pixels: int = 16


#: chunks per organ in the field's protocol (SSL-ALPNet's ``n_part``); the default of every function that takes one
N_PART = 3


@dataclass
class ProtocolConfig:
    """Evaluation protocol (DESIGN.md section 5).

    name: ``"alpnet"`` | ``"adnet-ep1"`` | ``"full-volume"``.
    setting: 1 (test classes may appear as background in training) or 2 (training never sees a slice with any
        test class).
    test_classes: the held-out classes ({2, 3} kidneys or {1, 4} liver+spleen on abdominal MRI).
    fold / n_folds: which of the contiguous folds is the query fold.
    n_part: chunks per organ (3 in the field's protocol); shots: support scans (k-shot).
    """

    name: str = "alpnet"
    setting: int = 2
    test_classes: List[int] = field(default_factory=lambda: [2, 3])
    fold: int = 0
    n_folds: int = 5
    n_part: int = N_PART
    shots: int = 1


@dataclass
class TrainConfig:
    """Optimisation, checkpoints and hardware for a training run.

    The defaults are the library's one built-in recipe (``python -m fewshot_proto.train --shots 1``): AdamW with
    a cosine schedule after a 50-episode warm-up, CE + soft Dice + alignment + cyclic losses, 1000 episodes or a
    540 s wall-time cap, ``precision="auto"`` (bf16 where the CPU or GPU computes it natively, else fp32). The
    README's "Current results" gives the measurements behind them.

    max_seconds: wall-time budget; the run stops early (and checkpoints) once exceeded; ``None``: no cap.
    lambda_dice: weight of a soft Dice term of the query's foreground added to the CE (episodic only; not in
        DESIGN.md's loss: it stops the model over-segmenting small held-out organs).
    out: the run folder; ``None``: a new numbered folder ``runs/<dataset>/version_<N>`` for every run.
    num_workers / prefetch: episodes are sampled in ``num_workers`` DataLoader worker processes (``prefetch``
        episodes each ahead), or in a background thread with ``num_workers`` 0 (``prefetch`` > 0), or in the
        loop itself (both 0).
    freeze: submodules of the model (dotted attribute paths, e.g. ``[encoder]``) that are not trained: their
        parameters get no gradient and they stay in ``eval()`` mode (batch-norm statistics frozen). With
        ``model.kwargs.weights`` pointing at another run's checkpoint this is a two-stage recipe (train the
        encoder with one head, then freeze it and train another). ``[]``: train everything.
    """

    iters: int = 1000
    max_seconds: Optional[float] = 540.0
    optimizer: str = "adamw"  # sgd | adam | adamw
    lr: float = 5e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scheduler: str = "cosine"  # step | cosine | none
    lr_step: int = 1000
    lr_gamma: float = 0.95
    warmup_iters: int = 50
    lambda_align: float = 1.0
    lambda_cyc: float = 0.5
    lambda_dice: float = 1.0
    ce_weights: Optional[List[float]] = field(default_factory=lambda: [0.1, 1.0])
    grad_clip: Optional[float] = None
    seed: int = 0
    ckpt_every: int = 250
    log_every: int = 10
    precision: str = "auto"  # fp32 | bf16 | fp16 (CUDA) | auto (bf16 where native, else fp32)
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda[:N]
    num_workers: int = 1
    prefetch: int = 2
    threads: Optional[int] = None
    out: Optional[str] = None
    freeze: List[str] = field(default_factory=list)


@dataclass
class SupervisedConfig:
    """Supervised training of the baselines (models whose ``kind`` is ``"supervised"``); few-shot models ignore it.

    A supervised model is trained on the labelled TRAINING scans of the protocol's fold (``fold_split``: never
    the query fold, never the support scans) with the protocol's TEST classes as its targets: one model whose
    head has ``1 + len(test_classes)`` outputs (``model.classes == protocol.test_classes``). The other classes
    are background. ``protocol.setting`` does not apply (it limits what the few-shot model sees of the test
    classes; a supervised baseline is trained on them by design). ``train.*`` holds the optimiser, schedule,
    steps (one step = one batch), seed and checkpoints, as for episodic training; ``train.ce_weights``,
    ``lambda_dice``, ``lambda_align`` and ``lambda_cyc`` are episodic only.

    n_labelled: how many labelled training scans to use; ``None``: all of them. Otherwise the first
        ``n_labelled`` scans of a permutation of the fold's training scans (natural order) drawn with
        ``numpy.random.default_rng(selection_seed)``; for a fixed seed the sets are nested (the 1-scan set is
        inside the 2-scan set, ...). The chosen ids are written to ``<out>/labelled_scans.json``.
    selection_seed: seed of that permutation (independent of ``train.seed``).
    batch_size: slices per step.
    fg_fraction: share of each batch forced to slices that contain at least one target class
        (``floor(fg_fraction * batch_size + 0.5)`` slices); the rest are drawn uniformly from all slices of
        the labelled scans, so the foreground share is at least this.
    augment: random affine + elastic + gamma augmentation of every slice (``data.augment.augment_pair``).
    dice_weight, ce_weight: loss = ``dice_weight * Dice + ce_weight * CE``. The head decides the terms:
        softmax head: CE over the ``1 + K`` channels + soft Dice of the K class channels;
        sigmoid head (the seeds' ResUpNet and MobileNet): per-class BCE + per-class soft Dice of the sigmoids.
        0.8 / 0.2 are the seeds' Dice+BCE weights.
    pos_weight: weight of foreground pixels in the cross-entropy (BCE ``pos_weight``; for a softmax head the
        class weights ``[1, pos_weight, ..., pos_weight]``); ``None``: 1.
    batch_dice: Dice over the whole batch per class (sums over all slices) instead of per slice; slices
        without the class then do not each contribute a loss of ~1 for a few false-positive pixels.
    val_scans: early stopping. ``0``: off (train for ``train.iters`` or ``train.max_seconds``). Otherwise that
        many of the fold's training scans are held out for validation (the LAST entries of the selection
        permutation, so never labelled ones, and the same for every ``n_labelled``; ``n_labelled: null`` then
        means all the other training scans). Every ``val_every`` steps the model segments them (every slice, at
        ``data.size``) and their mean Dice over the test classes is computed; a higher value than the best so far
        writes ``<out>/best.pt``; after ``patience`` validations without improvement training stops, and the run
        ends with the weights of ``best.pt`` (``checkpoint.pt`` keeps the last step, for resume).
        ``train.iters`` / ``train.max_seconds`` still cap the run.
    val_every: steps between validations; patience: validations without improvement before stopping.
    """

    n_labelled: Optional[int] = None
    selection_seed: int = 0
    batch_size: int = 8
    fg_fraction: float = 0.5
    augment: bool = True
    dice_weight: float = 0.8
    ce_weight: float = 0.2
    pos_weight: Optional[float] = None
    batch_dice: bool = True
    val_scans: int = 0
    val_every: int = 100
    patience: int = 5


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    episodes: EpisodeConfig = field(default_factory=EpisodeConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)


def _type_ok(value: Any, tp: Any) -> bool:
    """A permissive structural check of ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union:
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, List, Sequence):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value) if args else True
    if origin in (dict, Dict, Mapping):
        return isinstance(value, dict)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    """``Optional[List[float]]`` -> ``"list of float or null"``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, List, Sequence):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin in (dict, Dict, Mapping):
        return "mapping"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(tp, getattr(tp, "__name__",
                                                                                                 str(tp)))


def _build(cls: type, d: Mapping[str, Any], where: str, prefix: str = "") -> Any:
    """``cls`` from mapping ``d`` (missing keys take the dataclass defaults); type errors name ``where`` and the
    dotted key."""
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'config'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown and not prefix:
        raise ConfigError(f"{where}: unknown section(s) {unknown}; valid sections: {sorted(fields)}")
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {[prefix + k for k in unknown]}; valid keys of "
                          f"{prefix.rstrip('.')!r}: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, where, f"{prefix}{k}.")
            continue
        if isinstance(v, str) and _FLOAT_TEXT.fullmatch(v.strip()) and _type_ok(1.0, tp) and not _type_ok(v, tp):
            v = float(v)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if not _type_ok(v, tp):
            raise ConfigError(f"{where}: {prefix}{k} = {v!r}: expected {_type_name(tp)}")
        if tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp)):
            v = float(v) if isinstance(v, int) else v
        kwargs[k] = v
    return cls(**kwargs)


def _merge(base: Dict[str, Any], layer: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` with ``layer``'s sections merged in key by key (a key's value is replaced whole)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in layer.items():
        if isinstance(values, Mapping) and isinstance(out.get(section), dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def build_config(layers: Sequence[Tuple[str, Mapping[str, Any]]], base: Optional[Mapping[str, Any]] = None,
                 base_where: str = "base config") -> ExperimentConfig:
    """Layer partial configs over ``base`` (default: the built-in default) and validate the result.

    ``layers``: ``(where, {section: {key: value}})`` pairs, later layers win. ``where`` names the layer in
    errors ("configs/x.yaml", "command line", ...). A value that fails validation is reported with the last layer
    that set it (or "built-in default" / ``base_where``). Inside a section ``None`` is an explicit null.
    """
    merged: Dict[str, Any] = config_to_dict(ExperimentConfig()) if base is None else _merge({}, base)
    sources: Dict[str, str] = {}
    for where, layer in layers:
        layer = layer or {}
        _build(ExperimentConfig, layer, where)  # unknown keys and wrong types, named with their layer
        merged = _merge(merged, {k: v for k, v in layer.items() if v is not None})
        for section, values in layer.items():
            for key in (values or {}):
                sources[f"{section}.{key}"] = where
    base_name = "built-in default" if base is None else base_where
    cfg = _build(ExperimentConfig, merged, base_name)
    if cfg.data.label_map is not None:
        cfg.data.label_map = {int(k): int(v) for k, v in cfg.data.label_map.items()}
    if cfg.data.class_names is not None:
        cfg.data.class_names = _int_keys(cfg.data.class_names)
    validate_config(cfg, sources=sources, default_where=base_name)
    return cfg


def _int_keys(mapping: Mapping[Any, Any]) -> Dict[Any, Any]:
    """``mapping`` with every key written as an integer (``"1"``, ``" 2 "``; YAML and JSON give strings) turned
    into that ``int``; other keys are kept as they are, for :func:`validate_config` to reject by name."""
    out: Dict[Any, Any] = {}
    for k, v in mapping.items():
        if isinstance(k, str) and re.fullmatch(r"\s*[-+]?\d+\s*", k):
            k = int(k)
        out[k] = v
    return out


def config_from_dict(d: Mapping[str, Any] | None, where: str = "config") -> ExperimentConfig:
    """An ``ExperimentConfig`` from a (partial) mapping layered over the built-in default, validated."""
    return build_config([(where, d or {})])


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_config_file(path: str | Path) -> Dict[str, Any]:
    """The partial config a YAML file states (``yaml.safe_load``; an empty file is ``{}``), keys checked, with a
    relative ``data.root`` resolved against the file's folder. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read: {e}") from None
    raw = {} if raw is None else raw
    _build(ExperimentConfig, raw, str(p))  # unknown keys and wrong types, named with the file
    data = raw.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("root"), str) and not Path(data["root"]).is_absolute():
        raw = _merge({}, raw)
        raw["data"]["root"] = os.path.normpath(str(p.resolve().parent / data["root"]))
    return raw


def load_config(path: str | Path) -> ExperimentConfig:
    """An experiment file layered over the built-in default (:func:`read_config_file`, :func:`build_config`)."""
    return build_config([(str(path), read_config_file(path))])


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the full resolved config (every key) as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def dotted_to_nested(overrides: Mapping[str, Any], where: str = "overrides",
                     keep_none: bool = False) -> Dict[str, Dict[str, Any]]:
    """``{"train.lr": 1e-3, "model.kwargs.tau": 0.3}`` -> ``{"train": {"lr": 1e-3}, "model": {"kwargs": {...}}}``.

    ``None`` values are skipped (a flag that was not given) unless ``keep_none`` (an explicit null). Any key must
    be ``section.key`` or ``model.kwargs.<name>``.
    """
    nested: Dict[str, Dict[str, Any]] = {}
    for key, value in overrides.items():
        if value is None and not keep_none:
            continue
        parts = str(key).split(".")
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"{where}: {key!r} is not a dotted key such as train.lr or data.size")
        if len(parts) > 2 and parts[:2] != ["model", "kwargs"]:
            raise ConfigError(f"{where}: {key!r}: only model.kwargs.<name> may have more than two parts")
        if len(parts) > 3:
            raise ConfigError(f"{where}: {key!r}: model.kwargs.<name> takes one name")
        section = nested.setdefault(parts[0], {})
        if len(parts) == 3:
            section.setdefault("kwargs", {})[parts[2]] = value
        else:
            section[parts[1]] = value
    return nested


def parse_set(items: Sequence[str], where: str = "--set") -> Dict[str, Any]:
    """``["train.lr=1e-3", "data.size=128"]`` -> ``{"train.lr": 0.001, "data.size": 128}`` (values read as YAML;
    ``key=null`` or ``key=`` gives ``None``, an explicit null: layer the result with ``dotted_to_nested(...,
    keep_none=True)`` and :func:`build_config`)."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where} {item!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"{where} {item!r}: the value is not valid YAML") from None
    return out


def apply_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any],
                    where: str = "overrides") -> ExperimentConfig:
    """A new config: ``cfg`` with dotted keys set (``{"train.iters": 50, "protocol.test_classes": [1, 4]}``),
    validated. ``None`` values are skipped (an argument that was not given). ``cfg`` is never mutated."""
    nested = dotted_to_nested(overrides, where)
    base = config_to_dict(cfg)
    kwargs = nested.get("model", {}).get("kwargs")
    if kwargs is not None:
        nested["model"]["kwargs"] = {**base["model"]["kwargs"], **kwargs}
    return build_config([(where, nested)], base=base)


def default_config() -> ExperimentConfig:
    """The configuration ``python -m fewshot_proto.train`` starts from: the dataclass defaults, i.e. the built-in
    phantoms at 256x256, alpnet protocol fold 0, Setting 2, test classes {2, 3}, 1-shot, and the training recipe of
    :class:`TrainConfig`. ``--data DIR`` swaps only ``data.root``; an experiment file states what else differs."""
    return ExperimentConfig()


# ------------------------------------------------------------------------------------------------ validation
#: the choices of string-valued keys
CHOICES: Dict[str, Tuple[str, ...]] = {
    "data.layout": ("auto", "alpnet", "msd"),
    "data.normalise": ("zscore", "ct", "none"),
    "episodes.mode": ("labelled", "superpixel", "mixed"),
    "protocol.name": ("alpnet", "adnet-ep1", "full-volume"),
    "train.optimizer": ("sgd", "adam", "adamw"),
    "train.scheduler": ("step", "cosine", "none"),
    "train.precision": PRECISIONS,
}
#: the largest ``data.size`` accepted (a 2048x2048 slice already needs gigabytes of activations)
MAX_SIZE = 2048


def validate_config(cfg: ExperimentConfig, *, sources: Optional[Mapping[str, str]] = None,
                    default_where: str = "built-in default") -> None:
    """Range-check every value; raise ``ConfigError`` "<where>: <key> = <value>: <allowed range>".

    ``sources`` maps a dotted key to the layer that set it (for the message); keys not in it are named with
    ``default_where``. Checks that need the data (class ids present) or the model (input multiple) run where
    those are known (``engine.trainer.check_run``).
    """
    sources = sources or {}

    def fail(key: str, value: Any, rule: str) -> None:
        raise ConfigError(f"{sources.get(key, default_where)}: {key} = {value!r}: {rule}")

    def finite(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def positive_int(key: str, value: Any, minimum: int = 1) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            fail(key, value, f"must be an integer >= {minimum}")

    def number(key: str, value: Any, *, low: float = 0.0, strict: bool = False, high: Optional[float] = None,
               optional: bool = False) -> None:
        if value is None and optional:
            return
        ok = finite(value) and (value > low if strict else value >= low) and (high is None or value <= high)
        if not ok:
            rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            fail(key, value, f"must be a finite number {rng}" + (" or null" if optional else ""))

    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if str(value).lower() not in choices:
            fail(key, value, f"must be one of {', '.join(choices)}")

    d, e, p, t, s = cfg.data, cfg.episodes, cfg.protocol, cfg.train, cfg.supervised
    if d.slice_axis not in (0, 1, 2):
        fail("data.slice_axis", d.slice_axis, "must be 0, 1 or 2")
    if not isinstance(d.size, int) or not 16 <= d.size <= MAX_SIZE:
        fail("data.size", d.size, f"must be an integer from 16 to {MAX_SIZE} (a multiple of the model's input "
                                  f"multiple, 16 for the ResNet-34 models)")
    if d.ct_window is not None and (len(d.ct_window) != 2 or not all(finite(v) for v in d.ct_window)
                                    or d.ct_window[0] >= d.ct_window[1]):
        fail("data.ct_window", d.ct_window, "must be [low, high] with low < high, or null")
    positive_int("data.cache_volumes", d.cache_volumes, 0)
    if d.label_map is not None and any(k < 0 or v < 0 for k, v in d.label_map.items()):
        fail("data.label_map", d.label_map, "raw values and class ids must be >= 0")
    if d.class_names is not None:
        for k, v in d.class_names.items():
            if not isinstance(k, int) or isinstance(k, bool) or k < 0:
                fail("data.class_names", d.class_names, f"key {k!r} is not a class id (an integer >= 0, the value "
                                                        f"after data.label_map)")
            if not isinstance(v, str) or not v.strip() or "\n" in v:
                fail("data.class_names", d.class_names, f"the name of class {k} must be a non-empty one-line "
                                                        f"string, got {v!r}")
    if d.root is not None and not str(d.root).strip():
        fail("data.root", d.root, "must be a folder path or null (the built-in phantoms)")

    if not isinstance(cfg.model.name, str) or not cfg.model.name:
        fail("model.name", cfg.model.name, "must be a registered model name (fewshot_proto.list_models())")

    positive_int("episodes.shots", e.shots)
    positive_int("episodes.n_query", e.n_query)
    number("episodes.superpixel_prob", e.superpixel_prob, high=1.0)
    number("episodes.superpixel_scale", e.superpixel_scale, strict=True)
    positive_int("episodes.min_fg_pixels", e.min_fg_pixels, 0)

    if p.setting not in (1, 2):
        fail("protocol.setting", p.setting, "must be 1 or 2")
    tc = list(p.test_classes)
    if not tc or any(c < 1 for c in tc) or len(set(tc)) != len(tc):
        fail("protocol.test_classes", tc, "must be distinct class ids >= 1 (0 is background)")
    positive_int("protocol.n_folds", p.n_folds, 2)
    if not isinstance(p.fold, int) or not 0 <= p.fold < p.n_folds:
        fail("protocol.fold", p.fold, f"must be an integer from 0 to {p.n_folds - 1} (protocol.n_folds - 1)")
    positive_int("protocol.n_part", p.n_part)
    positive_int("protocol.shots", p.shots)

    positive_int("train.iters", t.iters, 0)
    number("train.max_seconds", t.max_seconds, strict=True, optional=True)
    number("train.lr", t.lr, strict=True)
    number("train.momentum", t.momentum, high=1.0)
    number("train.weight_decay", t.weight_decay)
    positive_int("train.lr_step", t.lr_step)
    number("train.lr_gamma", t.lr_gamma, strict=True, high=1.0)
    positive_int("train.warmup_iters", t.warmup_iters, 0)
    for name in ("lambda_align", "lambda_cyc", "lambda_dice"):
        number(f"train.{name}", getattr(t, name))
    if t.ce_weights is not None and (len(t.ce_weights) != 2 or not all(finite(w) and w >= 0 for w in t.ce_weights)
                                     or not any(w > 0 for w in t.ce_weights)):
        fail("train.ce_weights", t.ce_weights, "must be [background, foreground] weights >= 0 (not both 0), or null")
    number("train.grad_clip", t.grad_clip, strict=True, optional=True)
    positive_int("train.seed", t.seed, 0)
    positive_int("train.ckpt_every", t.ckpt_every, 0)
    positive_int("train.log_every", t.log_every)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(t.device)):
        fail("train.device", t.device, "must be auto, cpu or cuda[:N]")
    positive_int("train.num_workers", t.num_workers, 0)
    positive_int("train.prefetch", t.prefetch, 0)
    if t.threads is not None:
        positive_int("train.threads", t.threads)
    if t.out is not None and not str(t.out).strip():
        fail("train.out", t.out, "must be a folder path or null (a new numbered folder per run)")
    if not all(isinstance(m, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", m)
               for m in t.freeze) or len(set(t.freeze)) != len(t.freeze):
        fail("train.freeze", t.freeze, "must be a list of distinct submodule names such as [encoder]")

    if s.n_labelled is not None:
        positive_int("supervised.n_labelled", s.n_labelled)
    positive_int("supervised.selection_seed", s.selection_seed, 0)
    positive_int("supervised.batch_size", s.batch_size)
    number("supervised.fg_fraction", s.fg_fraction, high=1.0)
    number("supervised.dice_weight", s.dice_weight)
    number("supervised.ce_weight", s.ce_weight)
    number("supervised.pos_weight", s.pos_weight, strict=True, optional=True)
    positive_int("supervised.val_scans", s.val_scans, 0)
    positive_int("supervised.val_every", s.val_every)
    positive_int("supervised.patience", s.patience)


def config_differences(a: Mapping[str, Any], b: Mapping[str, Any], *, ignore: Sequence[str] = ()) -> List[str]:
    """``["train.lr: 0.0005 -> 0.001", ...]`` for every dotted key whose value differs between two config dicts
    (keys missing on one side are skipped: configs written by older versions lack newer keys)."""
    out = []
    for section in sorted(set(a) & set(b)):
        sa, sb = a[section] or {}, b[section] or {}
        for key in sorted(set(sa) & set(sb)):
            dotted = f"{section}.{key}"
            if dotted in ignore or section in ignore:
                continue
            if sa[key] != sb[key]:
                out.append(f"{dotted}: {sa[key]!r} -> {sb[key]!r}")
    return out
