"""The training loop: episodic for few-shot models, labelled slice batches for supervised baselines.

``train(cfg)`` builds the dataset, the fold split of the protocol, the model, a *task* that says what one step
draws and which loss it computes, the optimiser and LR schedule, then runs ``cfg.train.iters`` steps with tqdm
progress, a CSV log (TensorBoard when installed) and atomic checkpoints every ``ckpt_every`` steps. The task
follows the model's ``kind``:

* ``"fewshot"`` (default): one training episode per step (:func:`build_training_sampler`, :func:`episode_losses`);
* ``"supervised"``: one batch of labelled slices of the fold's training scans per step, the protocol's test
  classes as targets (:mod:`fewshot_proto.engine.supervised`, configured by ``cfg.supervised``).

Both share everything else here. ``resume=`` continues bit-for-bit:

* the item of step ``i`` (episode or batch) is drawn by a generator seeded with ``(seed, rank, i)``, so the
  stream after a resume is the one an uninterrupted run would have seen, whatever prefetching or DataLoader
  workers did before;
* model, optimiser, scheduler and every global RNG state are restored from the checkpoint.

A run never dies without saving: on any exception (KeyboardInterrupt included) the last completed step is
checkpointed before the exception propagates. A checkpoint is never written with a non-finite tensor: a
non-finite loss or non-finite weights stop the run with :class:`~fewshot_proto.errors.DivergedError`, keeping the
last checkpoint whose tensors are all finite. ``resume=`` refuses a config that changes what the checkpoint was
trained on (:func:`check_resume_config`). The run folder is never silently overwritten and is locked while the
run is live (:mod:`fewshot_proto.engine.rundir`).
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from fewshot_proto.config import ExperimentConfig, config_differences, config_to_dict, save_config
from fewshot_proto.engine.checkpoint import (NonFiniteCheckpointError, load_checkpoint, load_model_state,
                                             save_checkpoint, set_rng_state)
from fewshot_proto.engine.rundir import RunFolder, open_run_folder
from fewshot_proto.engine.runtime import (autocast, configure_threads, resolve_device, resolve_precision,
                                          to_memory_format)
from fewshot_proto.errors import ConfigError, DivergedError, FewShotError
from fewshot_proto.types import safe_file_name

__all__ = ["train", "TrainResult", "build_training_sampler", "episode_losses", "EpisodeSource", "model_kind",
           "check_resume_config", "check_run", "open_training_folder", "RESUMABLE_KEYS"]


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    steps: int
    losses: List[float] = field(default_factory=list)
    seconds: float = 0.0
    seconds_per_step: float = float("nan")
    sample_fraction: float = float("nan")  # share of step time spent waiting for the next episode
    model: Any = None
    kind: str = "fewshot"  # the model's kind: "fewshot" (episodic training) or "supervised" (slice batches)
    labelled_scans: Optional[List[str]] = None  # supervised: the labelled training scans used


def build_training_sampler(cfg: ExperimentConfig, dataset, index, train_scans: List[str]):
    """The training episode sampler the config asks for (labelled, superpixel or a mix)."""
    from fewshot_proto.episodes.protocol import training_slices
    from fewshot_proto.episodes.sampler import (LabelledEpisodeSampler, MixedSampler, SliceCache,
                                                SuperpixelEpisodeSampler)

    p, e = cfg.protocol, cfg.episodes
    test = [int(c) for c in p.test_classes]
    train_classes = [c for c in index.classes if c not in test]
    rng = np.random.default_rng(cfg.train.seed)
    cache = SliceCache(dataset, cfg.data.size)  # one for both parts of a mixed sampler: each slice resized once

    def labelled():
        if not train_classes:
            raise ConfigError(f"no training classes left in dataset {index.dataset!r} once test classes {test} are "
                              f"held out (classes: {index.classes})")
        return LabelledEpisodeSampler(dataset, index, train_scans, train_classes, setting=p.setting,
                                      test_classes=test, shots=e.shots, n_query=e.n_query, size=cfg.data.size,
                                      augment=e.augment, rng=rng, min_fg_pixels=e.min_fg_pixels, cache=cache)

    def superpixel():
        allowed = {s: training_slices(index, s, p.setting, test) for s in train_scans}
        return SuperpixelEpisodeSampler(dataset, train_scans, allowed, size=cfg.data.size, rng=rng,
                                        shots=e.shots, n_query=e.n_query, augment=e.augment,
                                        superpixel_kwargs={"scale": e.superpixel_scale}, cache=cache)

    if e.mode == "labelled":
        return labelled()
    if e.mode == "superpixel":
        return superpixel()
    if e.mode == "mixed":
        return MixedSampler([superpixel(), labelled()], [e.superpixel_prob, 1 - e.superpixel_prob], rng=rng)
    raise ConfigError(f"episodes.mode must be labelled, superpixel or mixed, not {e.mode!r}")


class EpisodeSource:
    """Episode ``i`` = ``sampler`` driven by ``default_rng([seed, rank, i])``: a pure function of the step.

    Iterating yields episodes for steps ``start, start+1, ...`` with a background thread keeping ``prefetch``
    episodes ready (sampling overlaps compute), or through DataLoader workers when ``num_workers > 0``.
    Any sampler that draws only from ``sampler.rng`` (children in ``sampler.samplers``) and returns an object
    with a ``meta`` dict works, e.g. the supervised ``SliceBatchSampler``.
    """

    def __init__(self, sampler, seed: int, rank: int = 0) -> None:
        self.sampler = sampler
        self.seed = int(seed)
        self.rank = int(rank)

    def episode(self, step: int):
        rng = np.random.default_rng([self.seed, self.rank, int(step)])
        return _sample_with(self.sampler, rng)

    def __getitem__(self, step: int):  # map-style dataset protocol for DataLoader workers
        t = time.perf_counter()
        try:
            ep = self.episode(step)
        except FewShotError as e:  # carried to the main process as it is (a worker would wrap it in a traceback)
            return _WorkerError(e)
        ep.meta["sample_seconds"] = time.perf_counter() - t
        return ep

    def __len__(self) -> int:  # pragma: no cover - DataLoader needs it only with automatic sampling
        return 2 ** 31

    def stream(self, start: int, stop: int, *, prefetch: int = 2, num_workers: int = 0) -> Iterator[Any]:
        """Items of steps ``start .. stop-1``; our own errors raised while sampling (``DataError``, ...) reach the
        caller with their type and message, wherever the sampling ran."""
        for item in self._stream(start, stop, prefetch=prefetch, num_workers=num_workers):
            if isinstance(item, _WorkerError):
                raise item.error
            yield item

    def _stream(self, start: int, stop: int, *, prefetch: int, num_workers: int) -> Iterator[Any]:
        if num_workers > 0:
            from torch.utils.data import DataLoader

            loader = DataLoader(self, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                                prefetch_factor=max(1, prefetch), collate_fn=_identity,
                                worker_init_fn=_worker_init, persistent_workers=False)
            yield from loader
            return
        if prefetch <= 0:
            for i in range(start, stop):
                yield self[i]
            return
        yield from _threaded(lambda i: self[i], start, stop, prefetch)


class _WorkerError:
    """One of our errors raised while sampling an item, returned instead of the item (re-raised by ``stream``)."""

    def __init__(self, error: FewShotError) -> None:
        self.error = error


def _identity(x):
    return x


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


def _sample_with(sampler, rng: np.random.Generator):
    """Draw one episode from ``sampler`` using ``rng`` (samplers keep their generator in ``.rng``)."""
    def set_rng(s):
        s.rng = rng
        for child in getattr(s, "samplers", []) or []:
            set_rng(child)

    set_rng(sampler)
    return sampler.sample()


def _threaded(fn, start: int, stop: int, prefetch: int) -> Iterator[Any]:
    q: "queue.Queue" = queue.Queue(maxsize=prefetch)
    stop_flag = threading.Event()

    def work():
        try:
            for i in range(start, stop):
                if stop_flag.is_set():
                    return
                q.put(("ok", fn(i)))
        except BaseException as e:  # surfaced in the consumer
            q.put(("err", e))

    t = threading.Thread(target=work, daemon=True, name="episode-prefetch")
    t.start()
    try:
        for _ in range(start, stop):
            kind, item = q.get()
            if kind == "err":
                raise item
            yield item
    finally:
        stop_flag.set()
        while not q.empty():
            try:
                q.get_nowait()
            except queue.Empty:  # pragma: no cover
                break


def episode_to_tensors(ep, device: torch.device, channels_last: bool):
    s_img = to_memory_format(torch.from_numpy(np.ascontiguousarray(ep.support_img)).to(device), channels_last)
    q_img = to_memory_format(torch.from_numpy(np.ascontiguousarray(ep.query_img)).to(device), channels_last)
    s_mask = torch.from_numpy(np.ascontiguousarray(ep.support_mask)).float().to(device)
    q_mask = torch.from_numpy(np.ascontiguousarray(ep.query_mask)).long().to(device)
    return s_img, s_mask, q_img, q_mask


def episode_losses(model, s_img, s_mask, q_img, q_mask, *, lambda_align: float, lambda_cyc: float,
                   ce_weights: Optional[List[float]] = None, lambda_dice: float = 0.0) -> Dict[str, torch.Tensor]:
    """Forward one episode and return the loss terms ({"loss", "ce", "dice", "align", "cyc"}; a term whose weight
    is 0 is not computed)."""
    from fewshot_proto.losses import alignment_loss, cyclic_consistency_loss, dice_loss, weighted_cross_entropy

    core = model.module if hasattr(model, "module") else model
    out = model(s_img, s_mask, q_img)
    weight = torch.tensor(ce_weights, device=out.logits.device, dtype=torch.float32) if ce_weights else None
    ce = weighted_cross_entropy(out.logits.float(), q_mask, weight=weight)
    terms = {"ce": ce}
    loss = ce
    if lambda_dice > 0:
        dl = dice_loss(out.logits.float(), q_mask, softmax=True, include_background=False)
        terms["dice"] = dl
        loss = loss + lambda_dice * dl
    if lambda_align > 0 and "query_feat" in out.aux and "support_feat" in out.aux:
        al = alignment_loss(out.aux["query_feat"], out.logits, out.aux["support_feat"], s_mask)
        terms["align"] = al
        loss = loss + lambda_align * al
    if lambda_cyc > 0 and getattr(core, "kind", "fewshot") == "fewshot" and hasattr(core, "prototypes"):
        cy = cyclic_consistency_loss(core, s_img, s_mask, q_img, out.logits,
                                     query_feats=out.aux.get("query_feats"), support_feats=out.aux.get("support_feats"))
        terms["cyc"] = cy
        loss = loss + lambda_cyc * cy
    terms["loss"] = loss
    return terms


def _build_optimizer(params, t, device: Optional[torch.device] = None) -> torch.optim.Optimizer:
    """The optimiser of ``train.optimizer``. Adam and AdamW use the fused kernel on CPU and CUDA: one pass over
    each parameter instead of about ten elementwise ops (the default on CPU is the per-tensor loop). Measured on
    this 26 M-parameter model, 256 px, fp32, 2 threads: 0.83 -> 0.78 s per step (synthetic episode)."""
    name = t.optimizer.lower()
    fused = {"fused": True} if device is not None and device.type in ("cpu", "cuda") else {}
    if name == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, **fused)
    raise ConfigError(f"train.optimizer must be sgd, adam or adamw, not {t.optimizer!r}")


def _build_scheduler(opt, t):
    warm = max(0, int(t.warmup_iters))
    name = t.scheduler.lower()
    if name == "step":
        base = lambda i: t.lr_gamma ** (i // max(1, t.lr_step))  # noqa: E731
    elif name == "cosine":
        base = lambda i: 0.5 * (1 + math.cos(math.pi * min(i, t.iters) / max(1, t.iters)))  # noqa: E731
    elif name == "none":
        base = lambda i: 1.0  # noqa: E731
    else:
        raise ConfigError(f"train.scheduler must be step, cosine or none, not {t.scheduler!r}")
    fn = (lambda i: base(i) * min(1.0, (i + 1) / warm)) if warm else base  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, fn)


class _Logger:
    """``<out>/train_log.csv`` (columns: step, the task's loss terms, lr, timings) and TensorBoard scalars."""

    TIMING = ["lr", "seconds_per_step", "sample_seconds", "elapsed"]

    def __init__(self, out_dir: Path, loss_fields: Sequence[str], resume_step: Optional[int] = None) -> None:
        """A new log, or with ``resume_step`` the existing one cut to the rows of steps <= ``resume_step`` (the
        checkpoint's step: the rows an interrupted run logged after it are repeated by the resumed run)."""
        self.path = out_dir / "train_log.csv"
        self.loss_fields = list(loss_fields)
        fields = ["step", *self.loss_fields, *self.TIMING]
        kept_rows: List[Dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                kept_rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit()
                             and int(r["step"]) <= resume_step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(kept_rows)
        os.replace(tmp, self.path)
        self.f = open(self.path, "a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=fields, extrasaction="ignore")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:
            self.tb = None

    def log(self, row: Dict[str, Any]) -> None:
        self.w.writerow(row)
        self.f.flush()
        if self.tb is not None:
            for k in (*self.loss_fields, "lr"):
                if k in row and row[k] != "":
                    self.tb.add_scalar(f"train/{k}", row[k], row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class _EpisodicTask:
    """Few-shot training: one episode per step, CE (+ Dice, + alignment, + cyclic) loss (:func:`episode_losses`)."""

    kind = "fewshot"

    def __init__(self, cfg: ExperimentConfig, sampler, device: torch.device, rank: int) -> None:
        self.t = cfg.train
        # the log's columns; "dice" only when it is trained, so runs (and resumed logs) without it keep their columns
        self.loss_fields = ["loss", "ce", *(["dice"] if self.t.lambda_dice > 0 else []), "align", "cyc"]
        self.device = device
        self.source = EpisodeSource(sampler, seed=cfg.train.seed, rank=rank)
        self.labelled_scans: Optional[List[str]] = None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward the step calls (DDP wraps this)."""
        return model

    def losses(self, train_model: torch.nn.Module, ep) -> Dict[str, torch.Tensor]:
        s_img, s_mask, q_img, q_mask = episode_to_tensors(ep, self.device, self.t.channels_last)
        return episode_losses(train_model, s_img, s_mask, q_img, q_mask, lambda_align=self.t.lambda_align,
                              lambda_cyc=self.t.lambda_cyc, ce_weights=self.t.ce_weights,
                              lambda_dice=self.t.lambda_dice)

    @staticmethod
    def describe(ep) -> str:
        return f"episode {ep.meta}"


def model_kind(name: str) -> str:
    """The ``kind`` class attribute of registered model ``name`` (``"fewshot"`` when it has none)."""
    from fewshot_proto.models import MODELS, list_models

    list_models()  # imports the modules that register models
    return str(getattr(MODELS.get(name), "kind", "fewshot"))


#: config keys a resumed run may change: how long it runs, logging, hardware and where the data now lives
RESUMABLE_KEYS = ("train.iters", "train.max_seconds", "train.ckpt_every", "train.log_every", "train.num_workers",
                  "train.prefetch", "train.threads", "train.device", "train.out", "data.root", "data.layout",
                  "data.cache_volumes")


def check_resume_config(cfg: ExperimentConfig, ckpt: Dict[str, Any], path: str | Path) -> None:
    """Raise ``ConfigError`` listing every difference between ``cfg`` and the checkpoint's config outside
    :data:`RESUMABLE_KEYS`: a resumed run trains the same model on the same protocol (test classes, setting,
    fold, shots, size, normalisation, ...) with the same recipe, so the saved config stays what happened."""
    saved = ckpt.get("config") or {}
    if not saved:
        return
    diffs = config_differences(saved, config_to_dict(cfg), ignore=RESUMABLE_KEYS)
    if diffs:
        raise ConfigError(f"--resume {path}: the config changes what the checkpoint was trained on: "
                          f"{'; '.join(diffs)}; only {', '.join(RESUMABLE_KEYS)} may change on resume")


def check_run(cfg: ExperimentConfig, dataset, index, model: torch.nn.Module) -> None:
    """Checks that need the data or the model, before any work: the protocol's class ids exist in the dataset, and
    ``data.size`` is a multiple of the model's input multiple."""
    classes = [int(c) for c in index.classes]
    missing = [int(c) for c in cfg.protocol.test_classes if int(c) not in classes]
    if missing:
        raise ConfigError(f"protocol.test_classes {list(cfg.protocol.test_classes)}: class(es) {missing} do not "
                          f"occur in dataset {index.dataset!r} (classes present: {classes})")
    multiple = getattr(model, "input_multiple", None)
    if multiple is None:
        multiple = getattr(getattr(model, "encoder", None), "input_multiple", None)
    if multiple and cfg.data.size % int(multiple):
        lower = max(int(multiple), cfg.data.size // int(multiple) * int(multiple))
        raise ConfigError(f"data.size = {cfg.data.size}: model {cfg.model.name!r} needs a multiple of {multiple} "
                          f"(e.g. {lower} or {lower + int(multiple)})")


def open_training_folder(cfg: ExperimentConfig, dataset_name: str, *, resume: Optional[str | Path] = None,
                         overwrite: bool = False, world_size: int = 1) -> RunFolder:
    """Open and lock the run folder of ``cfg`` (rank 0 only): ``cfg.train.out``, or with ``train.out: null`` a new
    ``runs/<dataset name>/version_<N>`` (:func:`~fewshot_proto.engine.rundir.open_run_folder`). A multi-process
    run needs an explicit folder: its ranks cannot agree on a new numbered one."""
    if world_size > 1 and cfg.train.out is None and resume is None:
        raise ConfigError("train.out: a multi-process run needs an explicit run folder (--out); ranks cannot agree "
                          "on a new numbered one")
    return open_run_folder(cfg.train.out, default_parent=Path("runs") / safe_file_name(dataset_name), resume=resume,
                           overwrite=overwrite)


def train(cfg: ExperimentConfig, *, resume: Optional[str | Path] = None, progress: bool = True,
          stop_after: Optional[int] = None, dataset=None, rank: int = 0, world_size: int = 1,
          overwrite: bool = False) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` under ``cfg.protocol``'s fold split; the model's ``kind`` picks the loop.

    Few-shot models (``kind == "fewshot"``) train on episodes (``cfg.episodes``); supervised baselines
    (``kind == "supervised"``) on batches of labelled slices of the fold's training scans with the protocol's
    test classes as targets (``cfg.supervised``; the model is built with ``classes=test_classes``).
    ``cfg.train.out``: the run folder (``None``: a new ``runs/<dataset>/version_<N>``); a folder that holds a run
    is refused unless ``resume`` is a checkpoint in it or ``overwrite`` (:func:`~fewshot_proto.engine.rundir.
    open_run_folder`). ``resume``: continue bit-for-bit from a checkpoint (:func:`check_resume_config`).
    ``stop_after`` ends the run after that many steps of this call (tests use it to simulate a kill).
    ``dataset`` overrides ``cfg.data`` (an in-memory dataset, for example).
    """
    from fewshot_proto.data import dataset_from_config
    from fewshot_proto.episodes.protocol import fold_split
    from fewshot_proto.models import build_model

    t_cfg = cfg.train
    configure_threads(t_cfg.threads)
    device = resolve_device(t_cfg.device)
    precision = resolve_precision(t_cfg.precision, device)
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = precision  # "auto": train, log and checkpoint the precision actually used
    ckpt = None
    if resume is not None:
        ckpt = load_checkpoint(resume, expect_model=cfg.model.name)
        check_resume_config(cfg, ckpt, resume)
    if dataset is None:
        dataset = dataset_from_config(cfg.data)
    check = getattr(dataset, "check_integrity", None)
    if check is not None:
        check()
    folder = None
    if rank == 0:
        folder = open_training_folder(cfg, dataset.name, resume=resume, overwrite=overwrite, world_size=world_size)
    try:
        out_dir = folder.path if folder is not None else Path(cfg.train.out or Path(resume).parent)
        cfg.train.out = str(out_dir)
        t_cfg = cfg.train

        torch.manual_seed(t_cfg.seed)
        np.random.seed(t_cfg.seed % (2 ** 32))
        index = dataset.slice_index()
        split = fold_split(index, cfg.protocol.fold, cfg.protocol.n_folds, cfg.protocol.shots)

        task: Any
        if model_kind(cfg.model.name) == "supervised":
            from fewshot_proto.engine.supervised import SupervisedTask, supervised_model_kwargs

            kwargs = supervised_model_kwargs(cfg)
            model = build_model(cfg.model.name, **kwargs)
            check_run(cfg, dataset, index, model)
            task = SupervisedTask(cfg, dataset, index, list(split.train_scans), model, device=device, rank=rank)
        else:
            kwargs = dict(cfg.model.kwargs)
            model = build_model(cfg.model.name, **kwargs)
            check_run(cfg, dataset, index, model)
            sampler = build_training_sampler(cfg, dataset, index, list(split.train_scans))
            task = _EpisodicTask(cfg, sampler, device, rank)
        if rank == 0 and task.labelled_scans is not None:
            (out_dir / "labelled_scans.json").write_text(json.dumps(
                {"n_labelled": len(task.labelled_scans), "selection_seed": cfg.supervised.selection_seed,
                 "fold": cfg.protocol.fold, "scans": task.labelled_scans}, indent=1))
        return _run(cfg, task, model, kwargs, out_dir=out_dir, device=device, resume=resume, ckpt=ckpt,
                    progress=progress, stop_after=stop_after, rank=rank, world_size=world_size)
    finally:
        if folder is not None:
            folder.release()


def _run(cfg: ExperimentConfig, task, model: torch.nn.Module, model_kwargs: Dict[str, Any], *, out_dir: Path,
         device: torch.device, resume: Optional[str | Path], ckpt: Optional[Dict[str, Any]], progress: bool,
         stop_after: Optional[int], rank: int, world_size: int) -> TrainResult:
    """The loop both tasks share: optimiser, schedule, resume, DDP, logging, checkpoints, interrupts, budget.

    ``task`` provides ``source`` (an :class:`EpisodeSource`), ``wrap(model)`` (the module a step calls),
    ``losses(train_model, item) -> {"loss": ..., <terms>}``, ``loss_fields`` and ``describe(item)``.
    """
    t_cfg = cfg.train
    ckpt_path = out_dir / "checkpoint.pt"
    model_config = dict(getattr(model, "config", model_kwargs))
    model.to(device)
    if t_cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _build_optimizer(params, t_cfg, device)
    scheduler = _build_scheduler(optimizer, t_cfg)

    start = 0
    if ckpt is not None:
        load_model_state(model, ckpt["model"], resume)
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])

    train_model = task.wrap(model)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        # Every parameter gets a gradient every step (the cyclic and alignment terms reuse the same weights), so DDP
        # need not walk the graph for unused ones (find_unused_parameters=True costs a graph traversal per step).
        train_model = DDP(train_model, device_ids=ids, find_unused_parameters=False)

    resolved = config_to_dict(cfg)
    if rank == 0:
        save_config(cfg, out_dir / "config.yaml")

    saved = {"step": start if ckpt is not None else None}

    def checkpoint(step: int) -> bool:
        """Save step ``step`` unless a tensor is non-finite; returns whether it was saved."""
        if rank != 0:
            return True
        try:
            save_checkpoint(ckpt_path, model=model, model_name=cfg.model.name, model_config=model_config, step=step,
                            optimizer=optimizer, scheduler=scheduler, config=resolved)
        except NonFiniteCheckpointError:
            return False
        saved["step"] = step
        return True

    def kept() -> str:
        if saved["step"] is None:
            return "no checkpoint was written"
        return f"kept {ckpt_path} of step {saved['step']}, whose tensors are all finite"

    source = task.source
    stop = t_cfg.iters if stop_after is None else min(t_cfg.iters, start + int(stop_after))
    logger = (_Logger(out_dir, loss_fields=task.loss_fields, resume_step=start if ckpt is not None else None)
              if rank == 0 else None)
    losses: List[float] = []
    step = start
    t_start = time.perf_counter()
    step_times: List[float] = []
    sample_times: List[float] = []
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        unit = "ep" if task.kind == "fewshot" else "batch"
        bar = tqdm(total=t_cfg.iters, initial=start, desc="train", unit=unit, dynamic_ncols=True)
    model.train()
    items = source.stream(start, stop, prefetch=t_cfg.prefetch, num_workers=t_cfg.num_workers)
    try:
        t_prev = time.perf_counter()
        while True:
            t_wait = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                break
            wait = time.perf_counter() - t_wait
            with autocast(device, t_cfg.precision):
                terms = task.losses(train_model, item)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                checkpoint(step)  # the weights before this step, unless they are non-finite too
                raise DivergedError(
                    f"non-finite loss {loss.item()} at step {step + 1} ({task.describe(item)}): training stopped; "
                    f"{kept()}. Lower train.lr or check the data for NaNs")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if t_cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, t_cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            now = time.perf_counter()
            step_times.append(now - t_prev)
            t_prev = now
            sample_times.append(wait)
            lv = float(loss.detach())
            losses.append(lv)
            if logger is not None and (step % max(1, t_cfg.log_every) == 0 or step == stop):
                row = {k: float(v.detach()) for k, v in terms.items()}
                row.update(step=step, lr=scheduler.get_last_lr()[0], seconds_per_step=step_times[-1],
                           sample_seconds=sample_times[-1], elapsed=now - t_start)
                logger.log(row)
            if bar is not None:
                bar.update(1)
                if step % 5 == 0:
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}",
                                    s_per_step=f"{np.median(step_times[-20:]):.2f}")
            if t_cfg.ckpt_every and step % t_cfg.ckpt_every == 0 and not checkpoint(step):
                raise DivergedError(f"non-finite weights after step {step}: training stopped; {kept()}. "
                                    f"Lower train.lr")
            if t_cfg.max_seconds is not None and now - t_start >= t_cfg.max_seconds:
                break
    except DivergedError:
        raise
    except BaseException:
        if step > start:
            checkpoint(step)
        raise
    finally:
        items.close()  # stops the prefetch thread or DataLoader worker now (a time cap stops before the stream ends)
        if bar is not None:
            bar.close()
        if logger is not None:
            logger.close()
    if not checkpoint(step):
        raise DivergedError(f"non-finite weights after step {step}: training stopped; {kept()}. Lower train.lr")
    seconds = time.perf_counter() - t_start
    med = float(np.median(step_times[1:] if len(step_times) > 1 else step_times)) if step_times else float("nan")
    frac = float(np.sum(sample_times) / max(np.sum(step_times), 1e-9)) if step_times else float("nan")
    model.eval()
    return TrainResult(out_dir=out_dir, checkpoint=ckpt_path, steps=step, losses=losses, seconds=seconds,
                       seconds_per_step=med, sample_fraction=frac, model=model, kind=task.kind,
                       labelled_scans=task.labelled_scans)
