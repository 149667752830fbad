"""Experiment grid runner: every (method, test group, fold, seed, setting) of a grid file is one independent run,
trained with ``fewshot_proto.engine.train`` and scored with ``evaluate`` on ``protocol_specs``; each finished run
appends one JSON line to a results store, and runs whose id is already in the store are skipped (resumable).

    python benchmarks/grid.py benchmarks/grids/chaos_t2_main.yaml --dry-run         # list runs, which are done
    python benchmarks/grid.py benchmarks/grids/chaos_t2_main.yaml --only method=alpnet --only fold=0,1
    python benchmarks/grid.py benchmarks/grids/phantom_tiny.yaml --executor submitit-local
    python benchmarks/summarise.py benchmarks/results/grid_chaos_t2_main.jsonl     # tables, tests, plots

Grid file (YAML)::

    name: chaos_t2_main             # the store is benchmarks/results/grid_<name>.jsonl
    config: ../../configs/experiments/chaos_t2_setting2_23_1shot.yaml   # optional base experiment file
    data: {root: ../../../shared/data/chaos_t2, layout: alpnet}          # optional data-section overrides
    phantoms: {n_scans: 10, size: 64}   # optional: built-in phantoms written by ensure_phantoms (sets data.root)
    set: {train.num_workers: 0}     # optional dotted overrides applied to every run
    methods:                        # row name, registry model name, dotted overrides of that row
      - {name: alpnet, model: alpnet, set: {train.lambda_cyc: 0.0}}
      - {name: unet_n1, model: unet, set: {supervised.n_labelled: 1}, budget_seconds: 240}  # supervised only
      - {name: two_stage, model: cwpa_unet, init_from: alpnet, set: {train.freeze: [encoder]}}
    reuse: [../results/grid_chaos_t2_main.jsonl]   # optional: stores whose records of the same run ids are copied
    compare: [[alpnet, two_stage]]  # optional: the pairs summarise.py tests (default: every pair of few-shot rows)
    test_groups: [[2, 3], [1, 4]]   # protocol.test_classes
    folds: [0, 1, 2, 3, 4]          # protocol.fold
    seeds: [0]                      # train.seed
    settings: [2]                   # protocol.setting
    budget_seconds: 600             # train.max_seconds of every run (the same for every few-shot method)
    size: 256                       # optional data.size
    precision: auto                 # optional train.precision
    iters: 100000                   # optional train.iters (large: the budget binds)
    slurm: {partition: gpu, timeout_min: 60}   # optional, --executor submitit: AutoExecutor slurm_* parameters

Relative paths (``config``, ``data.root``, ``reuse``) resolve against the grid file's folder. Layers, later wins:
default config (or ``config``), ``data``, ``phantoms``, grid ``set``, ``size``/``precision``/``iters``/budget, the
method's model and ``set``, then the run's test group, fold, seed and setting.

Run id: the first 12 hex digits of the SHA-256 of the canonical JSON (sorted keys, no spaces) of the resolved
``ExperimentConfig`` without the keys in :data:`ID_IGNORED_KEYS` (where files go and how the machine computes,
not what is computed), plus the phantom spec when the grid uses ``phantoms`` (its folder is ``data.root``) and the
id of the run a two-stage row starts from. Config keys added after the first stores were written
(:data:`ID_LATER_KEYS`) are left out while they hold the value that reproduces the earlier behaviour, so the
stored runs keep their ids.

Two-stage rows: ``init_from: <method>`` names an earlier method of the grid; each run of the row starts from the
final checkpoint of that method's run with the same test group, fold, seed and setting (``model.kwargs.weights``
is set to ``<runs>/<id>/checkpoint.pt``: the model's encoder, see ``ResNet34Encoder``), which must have been run
with the same ``--runs`` folder. With ``train.freeze: [encoder]`` the row trains only what sits on the encoder.

Reuse: a run whose id is already in one of the ``reuse`` stores (another grid with the same base and budget, for
the rows two grids share) is copied into this grid's store with this grid's method name instead of re-run.

Executors: ``local`` (default) runs one run after another in this process (the model is dropped after each
run); ``submitit`` submits each run as a Slurm job (``submitit.AutoExecutor``), ``submitit-local`` as a local
job (``submitit.LocalExecutor``); a job runs ``python benchmarks/grid.py GRID --run-id ID`` and appends its own
line to the store; this process waits and reports (``submitit-local`` runs one job at a time: timed runs on one
machine must not overlap; a failed job is reported and the exit status is 1).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import fcntl
import gc
import hashlib
import itertools
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from fewshot_proto.config import (ConfigError, ExperimentConfig, apply_overrides, config_to_dict, default_config,
                                  load_config)

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
RESULTS = HERE / "results"
#: dotted keys left out of the run id: where the run writes and how the machine computes, not what
ID_IGNORED_KEYS = ("train.out", "train.num_workers", "train.prefetch", "train.threads", "train.device",
                   "data.root", "data.cache_volumes", "progress")
#: dotted keys added to the config after grid stores were first written -> the value that reproduces the earlier
#: behaviour; a key holding that value is left out of the id (so the stored runs keep their ids)
ID_LATER_KEYS: Dict[str, Any] = {"train.freeze": [], "supervised.val_scans": 0, "supervised.val_every": 100,
                                 "supervised.patience": 5}
ID_LENGTH = 12
GRID_KEYS = {"name", "config", "data", "phantoms", "set", "methods", "test_groups", "folds", "seeds", "settings",
             "budget_seconds", "size", "precision", "iters", "slurm", "reuse", "compare"}
REQUIRED_KEYS = ("name", "methods", "test_groups", "folds", "seeds", "settings", "budget_seconds")
METHOD_KEYS = {"name", "model", "set", "budget_seconds", "init_from"}
FILTER_KEYS = ("id", "method", "model", "kind", "group", "fold", "seed", "setting")
EXECUTORS = ("local", "submitit", "submitit-local")
SUBMITIT_INSTALL = "pip install 'fewshot_proto[grid]' (or: pip install submitit)"


class GridError(ValueError):
    """A grid file, filter or store problem, said in one line naming the file and key."""


# --------------------------------------------------------------------------------------------------- the grid
@dataclass
class Run:
    """One (method, test group, fold, seed, setting) of a grid with its resolved config and id."""

    id: str
    method: str
    model: str
    kind: str
    group: List[int]
    fold: int
    seed: int
    setting: int
    budget: Optional[float]
    cfg: ExperimentConfig
    init_from: Optional[str] = None  # id of the run whose checkpoint this run starts from

    @property
    def group_label(self) -> str:
        return group_label(self.group)

    def describe(self) -> str:
        return (f"{self.id} {self.method} ({self.model}) group {self.group_label} fold {self.fold} seed {self.seed} "
                f"setting {self.setting}")


@dataclass
class Grid:
    path: Path
    name: str
    runs: List[Run]
    slurm: Dict[str, Any] = field(default_factory=dict)
    phantoms: Optional[Dict[str, Any]] = None
    reuse: List[Path] = field(default_factory=list)
    compare: List[List[str]] = field(default_factory=list)


def group_label(group: Sequence[int]) -> str:
    """``[2, 3]`` -> ``"2+3"`` (the value ``--only group=`` matches)."""
    return "+".join(str(int(c)) for c in group)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def id_payload(cfg: ExperimentConfig | Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, Any]:
    """The resolved config as a dict without :data:`ID_IGNORED_KEYS` (plus ``extra`` under ``"grid"``)."""
    d = copy.deepcopy(config_to_dict(cfg) if isinstance(cfg, ExperimentConfig) else dict(cfg))
    for key in ID_IGNORED_KEYS:
        section, _, leaf = key.rpartition(".")
        holder = d.get(section) if section else d
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    for key, neutral in ID_LATER_KEYS.items():
        section, _, leaf = key.rpartition(".")
        holder = d.get(section) if section else d
        if isinstance(holder, dict) and leaf in holder and holder[leaf] == neutral:
            del holder[leaf]
    if extra:
        d["grid"] = dict(extra)
    return d


def make_run(cfg: ExperimentConfig, method: Optional[str] = None) -> Run:
    """A ``Run`` of a resolved config outside a grid file (what the other benchmark scripts pass to
    :func:`execute_run`): its method is the model name unless given, its id :func:`run_id` of the config."""
    from fewshot_proto.models import get_model_class

    p = cfg.protocol
    return Run(id=run_id(cfg), method=method or cfg.model.name, model=cfg.model.name,
               kind=str(get_model_class(cfg.model.name).kind), group=[int(c) for c in p.test_classes], fold=p.fold,
               seed=cfg.train.seed, setting=p.setting, budget=cfg.train.max_seconds, cfg=cfg)


def run_id(cfg: ExperimentConfig | Mapping[str, Any], extra: Optional[Mapping[str, Any]] = None) -> str:
    """A short stable hash of the result-changing part of a resolved config (see the module docstring)."""
    return hashlib.sha256(_canonical(id_payload(cfg, extra)).encode()).hexdigest()[:ID_LENGTH]


def _model_kind(name: str, where: str) -> str:
    from fewshot_proto.models import get_model_class, list_models

    try:
        return str(get_model_class(name).kind)
    except Exception:
        raise GridError(f"{where}: unknown model {name!r}; registered models: {', '.join(list_models())}") from None


def _int_list(value: Any, where: str) -> List[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        raise GridError(f"{where}: expected a non-empty list of integers, got {value!r}")
    return list(value)


def _resolve_root(root: Any, folder: Path) -> Any:
    if isinstance(root, str) and not Path(root).is_absolute():
        return os.path.normpath(str(folder / root))
    return root


def load_grid(path: str | Path, *, write_phantoms: bool = True) -> Grid:
    """Read and expand a grid file; every error is one line naming the file and key."""
    p = Path(path)
    if not p.is_file():
        raise GridError(f"grid file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise GridError(f"grid file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{p}: a grid file is a mapping with keys {', '.join(REQUIRED_KEYS)}")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise GridError(f"{p}: unknown key(s) {unknown}; valid keys: {sorted(GRID_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise GridError(f"{p}: missing key(s) {missing}")
    name = raw["name"]
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise GridError(f"{p}: name must be a non-empty string without spaces or slashes, got {name!r}")
    folder = p.resolve().parent
    where = str(p)

    try:
        if raw.get("config") is not None:
            base = load_config(_resolve_root(str(raw["config"]), folder))
        else:
            base = default_config()
        layer: Dict[str, Any] = {}
        data = raw.get("data") or {}
        if not isinstance(data, dict):
            raise GridError(f"{p}: data must be a mapping of data-section keys, got {data!r}")
        for k, v in data.items():
            layer[f"data.{k}"] = _resolve_root(v, folder) if k == "root" else v
        phantoms = raw.get("phantoms")
        if phantoms is not None:
            if not isinstance(phantoms, dict) or set(phantoms) - {"n_scans", "size", "seed"}:
                raise GridError(f"{p}: phantoms must be a mapping with keys n_scans, size, seed; got {phantoms!r}")
            phantoms = {"n_scans": int(phantoms.get("n_scans", 20)), "size": int(phantoms.get("size", 128)),
                        "seed": int(phantoms.get("seed", 0))}
            if write_phantoms:
                from fewshot_proto.data.phantom import ensure_phantoms

                layer["data.root"] = str(ensure_phantoms(**phantoms))
            layer["data.layout"] = "alpnet"
        grid_set = raw.get("set") or {}
        if not isinstance(grid_set, dict):
            raise GridError(f"{p}: set must be a mapping of dotted keys, got {grid_set!r}")
        layer.update(grid_set)
        for key, dotted in (("size", "data.size"), ("precision", "train.precision"), ("iters", "train.iters")):
            if raw.get(key) is not None:
                layer[dotted] = raw[key]
        budget = raw["budget_seconds"]
        if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget <= 0):
            raise GridError(f"{p}: budget_seconds must be a positive number or null, got {budget!r}")
        layer["train.max_seconds"] = None if budget is None else float(budget)
        grid_cfg = apply_overrides(base, layer, where=where)
    except ConfigError as e:
        raise GridError(str(e)) from None

    groups = raw["test_groups"]
    if not isinstance(groups, list) or not groups:
        raise GridError(f"{p}: test_groups must be a non-empty list of lists of class ids")
    groups = [_int_list(g, f"{p}: test_groups[{i}]") for i, g in enumerate(groups)]
    folds = _int_list(raw["folds"], f"{p}: folds")
    seeds = _int_list(raw["seeds"], f"{p}: seeds")
    settings = _int_list(raw["settings"], f"{p}: settings")
    methods = raw["methods"]
    if not isinstance(methods, list) or not methods:
        raise GridError(f"{p}: methods must be a non-empty list of {{name, model, set}}")
    seen: Dict[str, Dict[str, Any]] = {}
    runs: List[Run] = []
    extra = {"phantoms": phantoms} if phantoms is not None else None
    for i, m in enumerate(methods):
        mw = f"{p}: methods[{i}]"
        if not isinstance(m, dict) or "name" not in m or "model" not in m:
            raise GridError(f"{mw}: a method is a mapping with name, model and optional set, got {m!r}")
        bad = sorted(set(m) - METHOD_KEYS)
        if bad:
            raise GridError(f"{mw}: unknown key(s) {bad}; valid keys: {sorted(METHOD_KEYS)}")
        if m["name"] in seen:
            raise GridError(f"{mw}: duplicate method name {m['name']!r}")
        seen[m["name"]] = m
        kind = _model_kind(str(m["model"]), f"{mw}.model")
        parent = m.get("init_from")
        if parent is not None:
            if parent not in seen or parent == m["name"]:
                raise GridError(f"{mw}.init_from: {parent!r} is not a method listed before {m['name']!r}")
            if seen[parent].get("init_from") is not None:
                raise GridError(f"{mw}.init_from: {parent!r} itself starts from another run; one stage of "
                                f"init_from only")
            if kind != "fewshot" or "model.kwargs.weights" in (m.get("set") or {}):
                raise GridError(f"{mw}.init_from: only a few-shot method without its own model.kwargs.weights "
                                f"can start from another run")
        overrides = dict(m.get("set") or {})
        if not isinstance(m.get("set") or {}, dict):
            raise GridError(f"{mw}.set: expected a mapping of dotted keys")
        if kind == "fewshot" and ("train.max_seconds" in overrides or "budget_seconds" in m):
            raise GridError(f"{mw}: few-shot methods share the grid's budget_seconds; remove train.max_seconds / "
                            f"budget_seconds from method {m['name']!r}")
        if "budget_seconds" in m:
            overrides["train.max_seconds"] = m["budget_seconds"]
        try:
            mcfg = apply_overrides(grid_cfg, {"model.name": str(m["model"]), **overrides}, where=f"{mw}.set")
            for group, fold, seed, setting in itertools.product(groups, folds, seeds, settings):
                cfg = apply_overrides(mcfg, {"protocol.test_classes": group, "protocol.fold": fold,
                                             "train.seed": seed, "protocol.setting": setting}, where=where)
                start = None
                run_extra = extra
                if parent is not None:
                    start = next(r.id for r in runs if r.method == parent and r.group == list(group)
                                 and (r.fold, r.seed, r.setting) == (fold, seed, setting))
                    run_extra = {**(extra or {}), "init_from": start}
                runs.append(Run(id=run_id(cfg, run_extra), method=str(m["name"]), model=str(m["model"]), kind=kind,
                                group=list(group), fold=fold, seed=seed, setting=setting,
                                budget=cfg.train.max_seconds, cfg=cfg, init_from=start))
        except ConfigError as e:
            raise GridError(str(e)) from None
    ids: Dict[str, Run] = {}
    for r in runs:
        if r.id in ids:
            raise GridError(f"{p}: runs {ids[r.id].describe()} and {r.describe()} resolve to the same config "
                            f"(id {r.id}); make the methods differ")
        ids[r.id] = r
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise GridError(f"{p}: slurm must be a mapping of slurm_* parameters (without the prefix), got {slurm!r}")
    reuse = raw.get("reuse") or []
    if not isinstance(reuse, list) or not all(isinstance(r, str) and r for r in reuse):
        raise GridError(f"{p}: reuse must be a list of store paths, got {reuse!r}")
    compare = read_compare(raw, p, set(seen))
    return Grid(path=p, name=name, runs=runs, slurm=slurm, phantoms=phantoms,
                reuse=[Path(_resolve_root(r, folder)) for r in reuse], compare=compare)


def read_compare(raw: Mapping[str, Any], path: Path, methods: Optional[set] = None) -> List[List[str]]:
    """The grid's ``compare`` pairs (``[]`` when absent), checked against its method names when given."""
    pairs = raw.get("compare") or []
    if not isinstance(pairs, list) or not all(isinstance(x, list) and len(x) == 2 and all(isinstance(m, str)
                                                                                         for m in x) for x in pairs):
        raise GridError(f"{path}: compare must be a list of [method, method] pairs, got {pairs!r}")
    if methods is not None:
        unknown = sorted({m for x in pairs for m in x} - methods)
        if unknown:
            raise GridError(f"{path}: compare names unknown method(s) {unknown}; methods: {sorted(methods)}")
    return [list(x) for x in pairs]


# --------------------------------------------------------------------------------------------------- filters
def parse_filters(items: Sequence[str]) -> Dict[str, set]:
    """``["method=alpnet,panet", "fold=0"]`` -> ``{"method": {"alpnet", "panet"}, "fold": {"0"}}`` (repeated keys
    join their values)."""
    out: Dict[str, set] = {}
    for item in items:
        key, eq, values = item.partition("=")
        key = key.strip()
        if not eq or key not in FILTER_KEYS or not values.strip():
            raise GridError(f"--only {item!r}: expected KEY=V[,V...] with KEY one of {', '.join(FILTER_KEYS)}")
        out.setdefault(key, set()).update(v.strip() for v in values.split(",") if v.strip())
    return out


def select(runs: Iterable[Run], filters: Mapping[str, set]) -> List[Run]:
    def value(r: Run, key: str) -> str:
        return r.group_label if key == "group" else str(getattr(r, key))

    return [r for r in runs if all(value(r, k) in v for k, v in filters.items())]


# ----------------------------------------------------------------------------------------------------- store
def default_store(name: str) -> Path:
    return RESULTS / f"grid_{name}.jsonl"


def read_store(path: str | Path) -> List[Dict[str, Any]]:
    """Every record of a JSONL store (``[]`` when absent). An unparsable LAST line without its newline (a writer
    killed mid-line) is ignored with a warning; an unparsable line elsewhere is an error naming file and line."""
    p = Path(path)
    if not p.exists():
        return []
    text = p.read_text()
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # no newline after it: a truncated final write
                warnings.warn(f"{p}: ignoring a truncated last line {i + 1} ({len(line)} characters)", stacklevel=2)
                continue
            raise GridError(f"{p}:{i + 1}: not a JSON line ({e.msg}); fix or remove that line") from None
        if not isinstance(rec, dict) or "id" not in rec:
            raise GridError(f"{p}:{i + 1}: a store line is a JSON object with an id")
        records.append(rec)
    return records


def done_ids(path: str | Path) -> set:
    return {r["id"] for r in read_store(path)}


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line under an exclusive lock, flushed and fsynced. A partial last line left by a killed
    writer is cut off first (with a warning) so the new record starts a line of its own."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    with open(p, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.seek(0)
                    data = f.read()
                    keep = data.rfind(b"\n") + 1
                    warnings.warn(f"{p}: cutting a truncated last line ({size - keep} bytes) before appending",
                                  stacklevel=2)
                    f.truncate(keep)
            f.seek(0, os.SEEK_END)
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------- one run
def _finite(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def execute_run(run: Run, runs_dir: str | Path, grid_name: str, *, out: Optional[str | Path] = None,
                meta: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train and evaluate one run in this process; return its store record (not yet appended).

    The run trains into ``out`` (default ``<runs_dir>/<id>``), replacing an earlier run there, and is evaluated
    on its protocol's episodes (reports in ``<out>/eval``, ``meta`` added to their metadata). The other benchmark
    scripts run their trainings through this function too."""
    import torch

    import fewshot_proto
    from fewshot_proto.data import dataset_from_config
    from fewshot_proto.engine import evaluate, train
    from fewshot_proto.engine.evaluator import protocol_specs
    from fewshot_proto.engine.runtime import Runtime, cpu_features, cpu_name

    out = Path(out) if out is not None else Path(runs_dir) / run.id
    overrides: Dict[str, Any] = {"train.out": str(out)}
    if run.init_from is not None:
        start = start_checkpoint(run, runs_dir)
        overrides["model.kwargs"] = {**run.cfg.model.kwargs, "weights": str(start)}
    cfg = apply_overrides(run.cfg, overrides, where="grid runner")
    runtime = Runtime.from_train_config(cfg.train)
    dataset = dataset_from_config(cfg.data)
    t0 = time.perf_counter()
    res = train(cfg, progress=False, dataset=dataset, overwrite=True, runtime=runtime)
    train_wall = time.perf_counter() - t0
    model = res.model
    model.eval()
    specs = protocol_specs(dataset, cfg.protocol)
    t1 = time.perf_counter()
    summary = evaluate(model, dataset, specs, size=cfg.data.size, runtime=runtime, out_dir=out / "eval",
                       overlays=False, meta={"grid": grid_name, "id": run.id, "method": run.method, **(meta or {})})
    eval_wall = time.perf_counter() - t1
    per_class = {c: {"name": v.get("class_name", ""), "n": v.get("n_scans"),
                     "dice": _finite(v["dice"]["mean"]), "hd95": _finite(v.get("hd95", {}).get("mean")),
                     "assd": _finite(v.get("assd", {}).get("mean"))}
                 for c, v in summary["per_class"].items()}
    rows = [{"scan": r["scan"], "class": int(r["class_id"]), "dice": _finite(r["dice"]),
             "precision": _finite(r.get("precision")), "recall": _finite(r.get("recall")),
             "hd95": _finite(r["hd95"]), "assd": _finite(r["assd"])} for r in summary["rows"]]
    record = {
        "id": run.id, "grid": grid_name, "method": run.method, "model": run.model, "kind": run.kind,
        "test_group": run.group, "fold": run.fold, "seed": run.seed, "setting": run.setting,
        "budget_seconds": run.budget, "init_from": run.init_from,
        "n_labelled": len(res.labelled_scans) if res.labelled_scans is not None else None,
        "early_stopping": res.early_stopping, "config": config_to_dict(cfg), "steps": int(res.steps),
        "train_seconds": float(res.seconds), "seconds_per_step": float(res.seconds_per_step),
        "train_wall_seconds": train_wall, "eval_seconds": eval_wall, "precision": runtime.precision,
        "mean_dice": float(summary["mean_dice"]), "per_class": per_class, "rows": rows,
        "machine": {"cpu": cpu_name(), "cpu_flags": cpu_features(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "host": platform.node()},
        "version": fewshot_proto.__version__,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    del model, res, summary
    gc.collect()
    return record


def start_checkpoint(run: Run, runs_dir: str | Path) -> Path:
    """The final checkpoint of the run ``run`` starts from (``init_from``); a one-line error when it is missing."""
    path = Path(runs_dir) / str(run.init_from) / "checkpoint.pt"
    if not path.is_file():
        raise GridError(f"run {run.id} ({run.method}) starts from run {run.init_from}'s checkpoint, and {path} does "
                        f"not exist: run {run.init_from} first, with the same --runs folder")
    return path


def reuse_records(grid: Grid, store: Path, done: set, *, write: bool = True) -> set:
    """Copy the records of this grid's not-yet-done runs found in ``grid.reuse`` stores into ``store`` (and add
    their ids to ``done``); returns the ids found (``write=False``: only find them)."""
    wanted = {r.id: r for r in grid.runs if r.id not in done}
    copied = set()
    for other in grid.reuse:
        if not wanted:
            break
        if not other.exists():
            raise GridError(f"{grid.path}: reuse store {other} does not exist")
        for rec in read_store(other):
            run = wanted.pop(rec["id"], None)
            if run is None:
                continue
            copied.add(rec["id"])
            if write:
                append_record(store, {**rec, "grid": grid.name, "method": run.method,
                                      "reused_from": {"store": other.name, "grid": rec.get("grid"),
                                                      "method": rec.get("method")}})
                done.add(rec["id"])
    return copied


def check_dependencies(todo: List[Run], done: set) -> None:
    """Every two-stage run's first stage is done or runs before it in ``todo``."""
    order = {r.id: i for i, r in enumerate(todo)}
    for i, r in enumerate(todo):
        if r.init_from is not None and r.init_from not in done and order.get(r.init_from, i) >= i:
            raise GridError(f"run {r.describe()} starts from run {r.init_from}, which is neither done nor selected; "
                            f"run it first (widen --only)")


def run_and_store(grid_path: str | Path, rid: str, runs_dir: str | Path, store: str | Path) -> int:
    """A job's body (``--run-id``): run one id of the grid and append its record (skipped when already stored)."""
    grid = load_grid(grid_path)
    match = [r for r in grid.runs if r.id == rid]
    if not match:
        raise GridError(f"{grid_path}: no run has id {rid} (the grid file changed since submission?)")
    if rid in done_ids(store):
        print(f"{rid} already in {store}; nothing to do")
        return 0
    append_record(store, execute_run(match[0], runs_dir, grid.name))
    return 0


# --------------------------------------------------------------------------------------------------- drivers
def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_local(grid: Grid, todo: List[Run], runs_dir: Path, store: Path) -> int:
    walls: List[float] = []
    for i, run in enumerate(todo):
        t0 = time.perf_counter()
        print(f"[{i + 1}/{len(todo)}] {run.describe()}", flush=True)
        record = execute_run(run, runs_dir, grid.name)
        append_record(store, record)
        walls.append(time.perf_counter() - t0)
        left = len(todo) - i - 1
        eta = sum(walls) / len(walls) * left
        print(f"[{i + 1}/{len(todo)}] done in {_fmt_seconds(walls[-1])}: mean Dice {record['mean_dice']:.4f}, "
              f"{record['steps']} steps; {left} left, ETA {_fmt_seconds(eta)}", flush=True)
    return 0


def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise GridError(f"--executor submitit needs the optional package submitit: {SUBMITIT_INSTALL}") from None
    return submitit


def run_submitit(grid: Grid, todo: List[Run], runs_dir: Path, store: Path, executor_name: str,
                 jobs_dir: Path) -> int:
    submitit = _import_submitit()
    if executor_name == "submitit-local":
        executor = submitit.LocalExecutor(folder=str(jobs_dir))
        params = {k: v for k, v in grid.slurm.items() if k in ("timeout_min", "cpus_per_task", "gpus_per_node")}
        if params:
            executor.update_parameters(**params)
    else:
        executor = submitit.AutoExecutor(folder=str(jobs_dir))
        params = {}
        for k, v in grid.slurm.items():
            key = k if k in ("timeout_min", "cpus_per_task", "gpus_per_node", "nodes", "tasks_per_node",
                             "mem_gb", "name") else (k if k.startswith("slurm_") else f"slurm_{k}")
            params[key] = v
        if params:
            executor.update_parameters(**params)
    env = dict(os.environ)

    def submit(run: Run):
        cmd = [sys.executable, str(SCRIPT), str(grid.path.resolve()), "--run-id", run.id, "--runs",
               str(runs_dir.resolve()), "--store", str(store.resolve())]
        return executor.submit(submitit.helpers.CommandFunction(cmd, cwd=str(Path.cwd()), env=env))

    # Slurm: every job at once (the cluster places them), except two-stage runs whose first stage is in this batch:
    # they are submitted when it has finished; local: one job at a time, since the runs are timed and concurrent
    # jobs on one machine would slow each other down
    sequential = executor_name == "submitit-local"
    pending = {r.id for r in todo}
    jobs = [(run, None if sequential or run.init_from in pending else submit(run)) for run in todo]
    print(f"{'submitting' if sequential else 'submitted'} {len(jobs)} job(s) to {executor_name}"
          f"{' one at a time' if sequential else ''} (logs in {jobs_dir})", flush=True)
    failed = 0
    t0 = time.perf_counter()
    later = [j for j in jobs if j[1] is None]
    jobs = [j for j in jobs if j[1] is not None] + later  # the first stages' jobs are waited for first
    for i, (run, job) in enumerate(jobs):
        try:
            (job or submit(run)).result()
            status = "done"
        except Exception as e:  # a job's failure is reported, the others still count
            failed += 1
            status = f"FAILED ({' '.join(str(e).split())[:300]})"
        left = len(jobs) - i - 1
        eta = (time.perf_counter() - t0) / (i + 1) * left
        print(f"[{i + 1}/{len(jobs)}] {run.describe()}: {status}; {left} left, ETA {_fmt_seconds(eta)}", flush=True)
    return 1 if failed else 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", help="grid YAML file")
    ap.add_argument("--only", action="append", default=[], metavar="KEY=V[,V]",
                    help=f"run a subset; KEY one of {', '.join(FILTER_KEYS)} (group as 2+3); repeatable (AND)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and which are done; run nothing")
    ap.add_argument("--runs", default=None, help="run folders (default runs/grid/<name>; each run in <id>/)")
    ap.add_argument("--store", default=None, help="results store (default benchmarks/results/grid_<name>.jsonl)")
    ap.add_argument("--executor", choices=EXECUTORS, default="local")
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)  # a submitit job's body
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        grid = load_grid(args.grid, write_phantoms=not args.dry_run)
        runs_dir = Path(args.runs) if args.runs else Path("runs") / "grid" / grid.name
        store = Path(args.store) if args.store else default_store(grid.name)
        if args.run_id:
            return run_and_store(args.grid, args.run_id, runs_dir, store)
        todo_all = select(grid.runs, parse_filters(args.only))
        done = done_ids(store)
        copied = reuse_records(grid, store, done, write=not args.dry_run)
        todo = [r for r in todo_all if r.id not in done]
        if args.dry_run:
            print(f"grid {grid.name}: {len(grid.runs)} runs, {len(todo_all)} selected, "
                  f"{sum(r.id in done for r in todo_all)} already in {store}, "
                  f"{sum(r.id in copied for r in todo)} to copy from the reuse stores, "
                  f"{sum(r.id not in copied for r in todo)} to run", flush=True)
            for r in todo_all:
                status = "done" if r.id in done else "copy" if r.id in copied else "todo"
                print(f"  {status}  {r.describe()}" + (f" (starts from {r.init_from})" if r.init_from else ""))
            return 0
        n_copied = sum(r.id in copied for r in todo_all)
        print(f"grid {grid.name}: {len(grid.runs)} runs, {len(todo_all)} selected, "
              f"{len(todo_all) - len(todo)} already in {store}"
              f"{f' ({n_copied} copied now from the reuse stores)' if n_copied else ''}, {len(todo)} to run",
              flush=True)
        if not todo:
            return 0
        check_dependencies(todo, done)
        if args.executor == "local":
            return run_local(grid, todo, runs_dir, store)
        return run_submitit(grid, todo, runs_dir, store, args.executor, runs_dir / "_submitit")
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
