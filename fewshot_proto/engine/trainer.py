"""The training loop: episodic for few-shot models, labelled slice batches for supervised baselines.

``train(cfg)`` builds the dataset, the fold split of the protocol, the model, a *task* that says what one step
draws and which loss it computes, the optimiser and LR schedule, then runs ``cfg.train.iters`` steps with tqdm
progress, a CSV log (TensorBoard when installed) and atomic checkpoints every ``ckpt_every`` steps. The task
follows the model's ``kind``:

* ``"fewshot"`` (default): one training episode per step and its loss (:mod:`fewshot_proto.engine.episodic`);
* ``"supervised"``: one batch of labelled slices of the fold's training scans per step, the protocol's test
  classes as targets (:mod:`fewshot_proto.engine.supervised`, configured by ``cfg.supervised``).

Both share everything else here: the optimiser and schedule (:mod:`fewshot_proto.engine.optim`), the log
(:mod:`fewshot_proto.engine.trainlog`), checkpoints, DDP and the loop itself. ``resume=`` continues bit-for-bit:

* the item of step ``i`` (episode or batch) is drawn by a generator seeded with ``(seed, rank, i)``
  (:class:`~fewshot_proto.engine.stream.EpisodeSource`), so the stream after a resume is the one an
  uninterrupted run would have seen, whatever prefetching or DataLoader workers did before;
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
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from fewshot_proto.config import ExperimentConfig, config_differences, config_to_dict, save_config
from fewshot_proto.data import dataset_from_config
from fewshot_proto.engine.checkpoint import (NonFiniteCheckpointError, load_checkpoint, load_model_state,
                                             save_checkpoint, set_rng_state)
from fewshot_proto.engine.episodic import EpisodicTask, build_training_sampler
from fewshot_proto.engine.optim import build_optimizer, build_scheduler
from fewshot_proto.engine.rundir import RunFolder, open_run_folder
from fewshot_proto.engine.runtime import Runtime
from fewshot_proto.engine.supervised import SupervisedTask, supervised_model_kwargs
from fewshot_proto.engine.trainlog import TrainLog
from fewshot_proto.episodes.protocol import fold_split
from fewshot_proto.errors import ConfigError, DivergedError
from fewshot_proto.models import build_model, get_model_class
from fewshot_proto.types import safe_file_name

__all__ = ["train", "TrainResult", "model_kind", "check_resume_config", "check_run", "open_training_folder",
           "RESUMABLE_KEYS"]


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
    validation_scans: Optional[List[str]] = None  # supervised with early stopping: the held-out scans
    early_stopping: Optional[Dict[str, Any]] = None  # its state: best value and step, history, whether it stopped



def model_kind(name: str) -> str:
    """The ``kind`` of registered model ``name``: ``"fewshot"`` or ``"supervised"`` (``models.base``)."""
    return get_model_class(name).kind


#: config keys a resumed run may change: how long it runs, logging, hardware, where the data now lives and what
#: its classes are called
RESUMABLE_KEYS = ("train.iters", "train.max_seconds", "train.ckpt_every", "train.log_every", "train.num_workers",
                  "train.prefetch", "train.threads", "train.device", "train.out", "data.root", "data.layout",
                  "data.cache_volumes", "data.class_names")


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
    multiple = int(model.input_multiple)
    if cfg.data.size % multiple:
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
          overwrite: bool = False, runtime: Optional[Runtime] = None) -> TrainResult:
    """Train ``cfg.model`` on ``cfg.data`` under ``cfg.protocol``'s fold split; the model's ``kind`` picks the loop.

    Few-shot models (``kind == "fewshot"``) train on episodes (``cfg.episodes``); supervised baselines
    (``kind == "supervised"``) on batches of labelled slices of the fold's training scans with the protocol's
    test classes as targets (``cfg.supervised``; the model is built with ``classes=test_classes``).
    ``cfg.train.out``: the run folder (``None``: a new ``runs/<dataset>/version_<N>``); a folder that holds a run
    is refused unless ``resume`` is a checkpoint in it or ``overwrite`` (:func:`~fewshot_proto.engine.rundir.
    open_run_folder`). ``resume``: continue bit-for-bit from a checkpoint (:func:`check_resume_config`).
    ``stop_after`` ends the run after that many steps of this call (tests use it to simulate a kill).
    ``dataset`` overrides ``cfg.data`` (an in-memory dataset, for example). ``runtime``: the caller's resolved
    device and precision (default: resolved here from ``cfg.train``).
    """
    runtime = runtime or Runtime.from_train_config(cfg.train)
    device = runtime.device
    cfg = copy.deepcopy(cfg)
    cfg.train.precision = runtime.precision  # "auto": train, log and checkpoint the precision actually used
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
            kwargs = supervised_model_kwargs(cfg)
            model = build_model(cfg.model.name, **kwargs)
            check_run(cfg, dataset, index, model)
            task = SupervisedTask(cfg, dataset, index, list(split.train_scans), model, device=device, rank=rank)
        else:
            kwargs = dict(cfg.model.kwargs)
            model = build_model(cfg.model.name, **kwargs)
            check_run(cfg, dataset, index, model)
            sampler = build_training_sampler(cfg, dataset, index, list(split.train_scans))
            task = EpisodicTask(cfg, sampler, device, rank)
        if rank == 0 and task.labelled_scans is not None:
            (out_dir / "labelled_scans.json").write_text(json.dumps(
                {"n_labelled": len(task.labelled_scans), "selection_seed": cfg.supervised.selection_seed,
                 "fold": cfg.protocol.fold, "scans": task.labelled_scans,
                 "validation_scans": getattr(task, "validation_scans", [])}, indent=1))
        return _run(cfg, task, model, out_dir=out_dir, runtime=runtime, resume=resume, ckpt=ckpt,
                    progress=progress, stop_after=stop_after, rank=rank, world_size=world_size)
    finally:
        if folder is not None:
            folder.release()


def freeze_modules(model: torch.nn.Module, names: List[str], model_name: str) -> List[torch.nn.Module]:
    """``train.freeze``: turn off the gradients of the named submodules and return them (the loop keeps them in
    ``eval()`` mode). An unknown name is a ``ConfigError`` listing the model's top-level submodules."""
    out = []
    for name in names:
        try:
            sub = model.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"train.freeze: model {model_name} has no submodule {name!r} (its submodules: "
                              f"{children})") from None
        sub.requires_grad_(False)
        out.append(sub)
    return out


def _run(cfg: ExperimentConfig, task, model: torch.nn.Module, *, out_dir: Path,
         runtime: Runtime, resume: Optional[str | Path], ckpt: Optional[Dict[str, Any]], progress: bool,
         stop_after: Optional[int], rank: int, world_size: int) -> TrainResult:
    """The loop both tasks share: optimiser, schedule, resume, DDP, logging, checkpoints, interrupts, budget.

    ``task`` provides ``source`` (an :class:`~fewshot_proto.engine.stream.EpisodeSource`), ``wrap(model)`` (the
    module a step calls), ``losses(train_model, item) -> {"loss": ..., <terms>}``, ``loss_fields`` and
    ``describe(item)``; optionally ``early_stopping`` (an :class:`~fewshot_proto.engine.supervised.EarlyStopping`)
    and ``validate(model) -> float``: every ``early_stopping.every`` steps the model is validated (before that
    step's checkpoint, so a resumed run repeats nothing), an improvement is written to ``best.pt``, and the run
    stops after ``patience`` validations without one and ends with the best weights.
    """
    t_cfg = cfg.train
    ckpt_path = out_dir / "checkpoint.pt"
    best_path = out_dir / "best.pt"
    es = getattr(task, "early_stopping", None)
    model_config = dict(model.config)
    device = runtime.device
    model.to(device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    frozen = freeze_modules(model, t_cfg.freeze, cfg.model.name)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"train.freeze = {t_cfg.freeze}: nothing of model {cfg.model.name} is left to train")
    optimizer = build_optimizer(params, t_cfg, device)
    scheduler = build_scheduler(optimizer, t_cfg)

    start = 0
    if ckpt is not None:
        load_model_state(model, ckpt["model"], resume)
        if "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if "scheduler" in ckpt:
            scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"])
        start = int(ckpt["step"])
        if es is not None:
            es.load((ckpt.get("metrics") or {}).get("early_stopping") or {})

    train_model = task.wrap(model)
    if world_size > 1:
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
                            optimizer=optimizer, scheduler=scheduler, config=resolved,
                            metrics={"early_stopping": es.state()} if es is not None else None)
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
    if es is not None and es.stop:  # a resumed run that had already stopped early trains no further
        stop = start
    logger = (TrainLog(out_dir, loss_fields=task.loss_fields, resume_step=start if ckpt is not None else None)
              if rank == 0 else None)
    losses: List[float] = []
    step = start
    t_start = time.perf_counter()
    step_times: List[float] = []
    sample_times: List[float] = []
    bar = None
    if progress and rank == 0:
        unit = "ep" if task.kind == "fewshot" else "batch"
        bar = tqdm(total=t_cfg.iters, initial=start, desc="train", unit=unit, dynamic_ncols=True)
    model.train()
    for m in frozen:
        m.eval()  # frozen batch-norm statistics too
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
            with runtime.autocast():
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
            if es is not None and step % es.every == 0:
                model.eval()
                with runtime.autocast():
                    value = task.validate(model)
                model.train()
                for m in frozen:
                    m.eval()
                if es.update(step, value) and rank == 0:
                    save_checkpoint(best_path, model=model, model_name=cfg.model.name, model_config=model_config,
                                    step=step, config=resolved, metrics={"val_dice": value})
                if bar is not None:
                    bar.write(f"step {step}: validation Dice {value:.4f} (best {es.best:.4f} at step {es.best_step})")
            if t_cfg.ckpt_every and step % t_cfg.ckpt_every == 0 and not checkpoint(step):
                raise DivergedError(f"non-finite weights after step {step}: training stopped; {kept()}. "
                                    f"Lower train.lr")
            if es is not None and es.stop:
                break
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
    es_state = None
    if es is not None:
        es_state = {**es.state(), "stopped": es.stop, "validation_scans": list(task.validation_scans)}
        if rank == 0:
            if es.best_step is not None:  # end with the best weights (checkpoint.pt keeps the last step)
                load_model_state(model, load_checkpoint(best_path, expect_model=cfg.model.name)["model"], best_path)
            (out_dir / "validation.json").write_text(json.dumps(es_state, indent=1))
    model.eval()
    return TrainResult(out_dir=out_dir, checkpoint=ckpt_path, steps=step, losses=losses, seconds=seconds,
                       seconds_per_step=med, sample_fraction=frac, model=model, kind=task.kind,
                       labelled_scans=task.labelled_scans, validation_scans=getattr(task, "validation_scans", None),
                       early_stopping=es_state)
