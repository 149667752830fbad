"""YAML <-> dataclasses. No logic in YAML: every key maps 1:1 onto a builder argument.

An experiment file has up to six sections, each a dataclass below::

    data:       {root: null, layout: auto, size: 256, ...}        -> DataConfig
    model:      {name: cwpa_unet, kwargs: {tau: 0.5, ...}}          -> ModelConfig -> build_model(name, **kwargs)
    episodes:   {shots: 1, mode: mixed, ...}                        -> EpisodeConfig (few-shot training sampler)
    protocol:   {name: alpnet, setting: 2, test_classes: [2, 3]}   -> ProtocolConfig (evaluation)
    train:      {iters: 1000, lr: 1e-3, ...}                        -> TrainConfig
    supervised: {n_labelled: null, batch_size: 8, ...}             -> SupervisedConfig (supervised baselines)

A missing section takes its dataclass defaults.

Unknown keys raise ``ConfigError`` naming the file, the section and the valid keys. Files are read with
``yaml.safe_load``. This module is core: no torch.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

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
    normalise: str = "zscore"
    ct_window: Optional[List[float]] = None
    size: int = 256
    cache_volumes: int = 8


@dataclass
class ModelConfig:
    """``build_model(name, **kwargs)``."""

    name: str = "cwpa_unet"
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
    n_part: int = 3
    shots: int = 1


@dataclass
class TrainConfig:
    """Optimisation, checkpoints and hardware for a training run."""

    iters: int = 1000
    max_seconds: Optional[float] = None  # wall-time budget: stop early (and checkpoint) once exceeded
    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "step"  # step | cosine | none
    lr_step: int = 1000
    lr_gamma: float = 0.95
    warmup_iters: int = 0
    lambda_align: float = 1.0
    lambda_cyc: float = 0.5
    lambda_dice: float = 0.0  # soft Dice of the query's foreground, added to the CE (episodic only)
    ce_weights: Optional[List[float]] = field(default_factory=lambda: [0.1, 1.0])
    grad_clip: Optional[float] = None
    seed: int = 0
    ckpt_every: int = 200
    log_every: int = 10
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CUDA) | auto (bf16 where native, else fp32)
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    # Episodes are sampled in num_workers DataLoader worker processes (prefetch episodes each ahead), or in a
    # background thread with num_workers 0 (prefetch > 0), or in the loop itself (both 0). One worker process is
    # the default: on a 2-core CPU the thread costs more than it hides (it competes with torch's threads and for the
    # GIL): the real loop took 0.41 s per 256-px bf16 step with a worker, 0.50 s with the thread (2 threads).
    num_workers: int = 1
    prefetch: int = 2
    threads: Optional[int] = None
    out: str = "runs/default"


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


def _build(cls: type, d: Mapping[str, Any], where: str) -> Any:
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{where}.{k}")
            continue
        if not _type_ok(v, tp):
            raise ConfigError(f"{where}.{k}: value {v!r} does not match type {tp}")
        if tp is float or (typing.get_origin(tp) is typing.Union and float in typing.get_args(tp)):
            v = float(v) if isinstance(v, int) else v
        kwargs[k] = v
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any] | None, where: str = "config") -> ExperimentConfig:
    """Build an ``ExperimentConfig`` from a plain mapping, rejecting unknown keys."""
    cfg = _build(ExperimentConfig, d or {}, where)
    if cfg.data.label_map is not None:
        cfg.data.label_map = {int(k): int(v) for k, v in cfg.data.label_map.items()}
    return cfg


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path) -> ExperimentConfig:
    """Read an experiment YAML file (``yaml.safe_load``); errors name the file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    return config_from_dict(raw, where=str(p))


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def apply_overrides(cfg: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
    """Set dotted keys (``{"train.iters": 50, "protocol.test_classes": [1, 4]}``); ``None`` values are skipped."""
    d = config_to_dict(cfg)
    for key, value in overrides.items():
        if value is None:
            continue
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"override {key!r}: unknown section {p!r}")
            node = node[p]
        if parts[-1] not in node and not (len(parts) > 2 and parts[-2] == "kwargs"):
            raise ConfigError(f"override {key!r}: unknown key {parts[-1]!r}; valid: {sorted(node)}")
        node[parts[-1]] = value
    return config_from_dict(d, where="overrides")


def default_config(builtin: bool = True) -> ExperimentConfig:
    """The configuration ``python -m fewshot_proto.train`` starts from.

    ``builtin=True`` (no ``--data``): the built-in phantoms at 256x256 (the field's input size; the 128-px
    phantoms are resampled) with a budget that trains and evaluates within 10 minutes on a 2-core CPU
    (``configs/experiments/phantom_default.yaml`` is this config as YAML): 1000 episodes in ``precision="auto"``
    (bf16 where the CPU or GPU computes it natively, else fp32; 0.40-0.71 s per episode in bf16 here, by the
    hour), and a 540 s wall-time cap as a safety net for slower machines (the run then stops early, checkpoints
    and evaluates what it has). Why 256: at 128x128 a kidney of the version-2 phantoms was about one cell of the
    1/16 feature grid, and the same model scored 21.8% on the held-out kidneys there, against 33-44% at 256x256
    without the Dice term (README, "Current results").
    ``lambda_dice=1``: a soft Dice term on the query's foreground joins the CE (not in DESIGN.md's loss). The CE's
    background weight of 0.1 lets a 9% foreground probability paint a pixel, and the model over-segmented the small
    held-out kidneys (precision 16-40%); over three seeds the Dice term raised the held-out mean from 35.1% to 44.1%
    (phantoms version 2).
    ``builtin=False``: real data at 256x256, the field's alpnet protocol, Setting 2, test classes {2, 3}.
    """
    cfg = ExperimentConfig()
    if builtin:
        cfg.data.size = 256
        cfg.train.iters = 1000
        cfg.train.max_seconds = 540.0
        cfg.train.precision = "auto"
        cfg.train.optimizer = "adamw"
        cfg.train.lr = 5e-4
        cfg.train.weight_decay = 1e-4
        cfg.train.scheduler = "cosine"
        cfg.train.warmup_iters = 50
        cfg.train.lambda_dice = 1.0
        cfg.train.ckpt_every = 250
        cfg.train.out = "runs/phantom"
    else:
        cfg.data.size = 256
        cfg.train.out = "runs/experiment"
    return cfg
