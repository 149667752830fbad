"""Few-shot methods against supervised baselines trained on 1, 2, 4 and all labelled scans (issue 4, item 5).

Every method is judged by the same episodes and the same metric: the alpnet protocol, Setting 2, test classes
{2, 3}, fold 0 (``protocol_specs``), scored by ``fewshot_proto.engine.evaluate`` (3-D Dice per query scan and
class, averaged over the fold's query scans). Every method trains under a wall-time budget
(``train.max_seconds``, printed at the start and stored in the results); ``--budget-scale`` multiplies all of them.
All train and evaluate at the same input size (256, as the library) and precision (``--precision``, default
``auto``: bf16 where the CPU has it natively, as the library).

Rows (``--methods`` picks a subset of the method names in brackets):

* ``cwpa_unet_matcher`` 1-shot: our model, the default config's model (``default_config().model.name``), trained
  as ``python -m fewshot_proto.train`` trains it (the default config's episodes, episode count, cosine LR and loss
  weights, including the Dice term on the phantoms) under its budget.
* ``cwpa_unet_matcher`` 5-shot: the SAME 1-shot-trained model evaluated with ``protocol.shots = 5`` (no second
  training, as is common in the field; 4 of the 5 support scans were in its training pool, but Setting 2 never
  showed it a slice containing a test class, and the query scans are never trained on).
* ``panet``, ``alpnet``: the reference prototype methods on the same ResNet-34 and the same episodes, trained
  with the PAR alignment loss and without our cyclic loss (``lambda_cyc = 0``: neither paper has one).
* ``finetune``: a U-Net pretrained (supervised) on the TRAINING classes of the fold's training scans, shown only
  Setting-2 slices (no slice containing a test class), then for every support set a copy gets a new binary head
  and is fine-tuned on the support slices (``reinit_head``); the base is never modified.
* ``maml_unet``: first-order MAML over a binary U-Net (learn2learn), trained on the same episodes, when the model
  is registered and buildable; otherwise its row says "not available: <reason>".
* ``unet``, ``resupnet``, ``mobilenet_aspp_se_unet``: supervised on the test classes of ``n`` labelled training
  scans of the fold (``supervised.n_labelled`` 1, 2, 4 and all, nested choices with selection seed 0), one model
  per ``n``; reduced widths for CPU (stated in each row).

    python benchmarks/fewshot_vs_supervised.py                       # built-in phantoms, ~80 min on 2 threads
    python benchmarks/fewshot_vs_supervised.py --methods unet,panet  # a subset (rows merge into the results)
    python benchmarks/fewshot_vs_supervised.py --resume              # skip rows already in the results
    python benchmarks/fewshot_vs_supervised.py --data ../shared/data/chaos_t2 --budget-scale 4   # real data, 256 px
    python benchmarks/fewshot_vs_supervised.py --quick --out /tmp/fvs  # smoke test: tiny phantoms, 2 steps each

Writes ``<out>/<stem>.{json,md,csv}`` and ``<out>/<stem>.png`` (Dice against labelled scans per supervised model,
few-shot methods as horizontal lines); ``<stem>`` is ``fewshot_vs_supervised`` on the built-in phantoms and
``fewshot_vs_supervised_<data folder name>`` with ``--data``. Results are written after every row, so a crash
keeps the rows finished before it; rows of an earlier run with the same setup (data, size, budget scale, mode)
are kept unless rerun; rows written before the model split name our model ``cwpa_unet`` and are read back as
``cwpa_unet_matcher`` (the same model). Checkpoints and per-method evaluation reports go to ``--runs``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
STEM = "fewshot_vs_supervised"


def _default_model() -> str:
    from fewshot_proto.config import default_config

    return default_config().model.name


#: our model: the default config's (``cwpa_unet_matcher``), the model ``python -m fewshot_proto.train`` trains
OURS = _default_model()
#: method names of rows written before the model split -> today's name of the same model (``cwpa_unet`` then was
#: the model with the matcher head, what the default run trained)
LEGACY_METHODS = {"cwpa_unet": "cwpa_unet_matcher"}

FEWSHOT_METHODS = [OURS, "panet", "alpnet", "finetune", "maml_unet"]
SUPERVISED_METHODS = ["unet", "resupnet", "mobilenet_aspp_se_unet"]
ALL_METHODS = FEWSHOT_METHODS + SUPERVISED_METHODS
LABELLED = [1, 2, 4, None]  # None: all training scans of the fold

#: Training wall-time budget in seconds per method (default run, before --budget-scale). The phantom default
#: adds up to 2 * 540 + 2 * 150 + 240 + 12 * 240 = 4500 s of training; evaluation adds a few minutes. Ours gets
#: the training cap of the library's default `train --shots 1` run (540 s), and so does ALPNet. The
#: supervised U-Nets and the fine-tuning base get 240 s: at 256 px (8 slices a batch, 0.65 s a step here) the 75 s
#: they had at 128 px gave about 110 steps, after which no supervised model predicted any foreground (Dice 0.0 for
#: every n). PANet and MAML keep 150 s.
BUDGETS: Dict[str, float] = {
    OURS: 540.0,
    "panet": 150.0,
    "alpnet": 540.0,  # the stronger prototype reference gets our budget
    "finetune": 240.0,  # pretraining of the U-Net base on the training classes
    "maml_unet": 150.0,
    "unet": 240.0,  # each of n_labelled = 1, 2, 4, all
    "resupnet": 240.0,
    "mobilenet_aspp_se_unet": 240.0,
}
#: Iteration cap per training run (the budget normally binds first).
MAX_ITERS = 100_000
QUICK_ITERS = 2

#: Builder kwargs (CPU-sized where stated). Few-shot encoders: ResNet-34 from random init, as in the library.
SUPERVISED_KWARGS: Dict[str, Dict[str, Any]] = {
    "unet": {"base_channels": 16, "norm": "batch"},
    "resupnet": {"base_channels": 16},
    "mobilenet_aspp_se_unet": {"aspp_channels": 32, "aspp_out_channels": 128,
                               "decoder_channels": [64, 32, 32, 16, 16]},
}
QUICK_SUPERVISED_KWARGS: Dict[str, Dict[str, Any]] = {
    "unet": {"base_channels": 4, "norm": "batch"},
    "resupnet": {"base_channels": 4},
    "mobilenet_aspp_se_unet": {"aspp_channels": 8, "aspp_out_channels": 16, "decoder_channels": [16, 8, 8, 8, 8]},
}
MAML_KWARGS: Dict[str, Any] = {"base_channels": 16, "inner_steps": 5, "inner_lr": 0.1}  # the model's defaults
QUICK_MAML_KWARGS: Dict[str, Any] = {"base_channels": 4, "inner_steps": 1, "inner_lr": 0.1}
#: How the CPU widths differ from the seeds' architectures (DESIGN.md section 4).
SEED_WIDTHS = {
    "unet": "paper: base_channels 64, no BN",
    "resupnet": "seed: base_channels 16",
    "mobilenet_aspp_se_unet": "seed: ASPP 5x128 -> 512, decoder 256-128-64-32-32; MobileNetV2 random init here",
}


def width_note(method: str, kwargs: Dict[str, Any]) -> str:
    """``"kwargs {...} (seed: ...)"``: the widths a row was trained with, next to the seed's."""
    return f"kwargs {json.dumps(kwargs, sort_keys=True)} ({SEED_WIDTHS.get(method, '')})"


FINETUNE_STEPS, FINETUNE_LR = 20, 1e-3  # 20: the model default; cost ~ 24 adaptations per evaluation


# ---------------------------------------------------------------------------------------------- helpers
def parse_methods(text: Optional[str]) -> List[str]:
    """``--methods a,b`` -> the method names in benchmark order; unknown names raise ``SystemExit``."""
    if not text:
        return list(ALL_METHODS)
    asked = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in asked if t not in ALL_METHODS]
    if bad:
        raise SystemExit(f"--methods: unknown method(s) {bad}; valid: {','.join(ALL_METHODS)}")
    return [m for m in ALL_METHODS if m in asked]


def row_id(method: str, *, shots: Optional[int] = None, n_labelled: Any = "-") -> str:
    if method in SUPERVISED_METHODS:
        return f"{method}/n={'all' if n_labelled is None else n_labelled}"
    return f"{method}/{shots}-shot"


def planned_rows(methods: Sequence[str]) -> List[str]:
    rows = []
    for m in methods:
        if m == OURS:
            rows += [row_id(m, shots=1), row_id(m, shots=5)]
        elif m in FEWSHOT_METHODS:
            rows.append(row_id(m, shots=1))
        else:
            rows += [row_id(m, n_labelled=n) for n in LABELLED]
    return rows


class Setting2View:
    """A dataset with every slice that shows one of ``test_classes`` removed (the few-shot Setting 2 for training).

    Used to pretrain the fine-tune baseline's base network: it must never see a test-class slice, as the
    few-shot models under Setting 2 never do. Scan ids are kept (the fold split is by scan id). Only training
    reads it; evaluation uses the full dataset.
    """

    def __init__(self, dataset: Any, test_classes: Sequence[int]) -> None:
        self.base = dataset
        self.test_classes = [int(c) for c in test_classes]
        self.name = f"{dataset.name}-setting2-without-{'-'.join(map(str, self.test_classes))}"
        self.label_names = dict(getattr(dataset, "label_names", {}) or {})
        self._index = None
        self._cache: Dict[str, Any] = {}

    @property
    def ids(self) -> List[str]:
        return list(self.base.ids)

    def __len__(self) -> int:
        return len(self.base)

    def load(self, scan_id: str):
        from fewshot_proto.episodes.protocol import training_slices
        from fewshot_proto.errors import DataError

        scan_id = str(scan_id)
        if scan_id not in self._cache:
            vol = self.base.load(scan_id)
            # the protocol's own Setting-2 rule (the one the episode samplers use), not a second copy of it
            keep = training_slices(self.base.slice_index(), scan_id, 2, self.test_classes)
            if not keep:
                raise DataError(f"{self.name}: every slice of scan {scan_id!r} shows a test class "
                                f"{self.test_classes}; it cannot be used under Setting 2")
            self._cache[scan_id] = dataclasses.replace(vol, image=vol.image[keep], label=vol.label[keep])
        return self._cache[scan_id]

    def load_label(self, scan_id: str):
        return self.load(scan_id).label

    def slice_index(self):
        if self._index is None:
            from fewshot_proto.data.dataset import slice_index_from_labels

            self._index = slice_index_from_labels(((i, self.load_label(i)) for i in self.ids), dataset=self.name)
        return self._index


def _dice(summary: Dict[str, Any]) -> Dict[str, float]:
    return {str(c): float(v["dice"]["mean"]) for c, v in summary["per_class"].items()}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


# ---------------------------------------------------------------------------------------------- the run
class Bench:
    """State of one benchmark run: data, base config, budgets, results file; runs and records the rows."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from fewshot_proto.config import apply_overrides, default_config
        from fewshot_proto.engine.runtime import Runtime, resolve_precision

        self.args = args
        self.quick = bool(args.quick)
        self.scale = float(args.budget_scale)
        torch.set_num_threads(int(args.threads))
        self.dataset, self.data_name = self._open_data()
        self.size = int(args.size or (32 if self.quick else 256))
        self.precision = resolve_precision(args.precision, torch.device("cpu"))
        self.runs = Path(args.runs)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        stem = STEM if args.data is None else f"{STEM}_{Path(args.data).resolve().name}"
        self.paths = {ext: self.out / f"{stem}.{ext}" for ext in ("json", "md", "csv", "png")}
        self.sup_kwargs = QUICK_SUPERVISED_KWARGS if self.quick else SUPERVISED_KWARGS
        base = default_config()
        self.library_train = base.train  # what `train` does by default (apply_overrides copies)
        self.base = apply_overrides(base, {
            "data.size": self.size, "protocol.name": "alpnet", "protocol.setting": 2, "protocol.test_classes": [2, 3],
            "protocol.fold": 0, "protocol.shots": 1, "episodes.shots": 1, "train.iters": self.iters,
            "train.scheduler": "none", "train.warmup_iters": 0 if self.quick else 20, "train.ckpt_every": 0,
            "train.log_every": 10, "train.device": "cpu", "train.threads": int(args.threads),
            "train.precision": self.precision, "train.seed": 0, "train.prefetch": 1 if self.quick else 2,
            # no Dice term for the reference methods (their papers have none); ours keeps the library's (run_cwpa)
            "train.lambda_dice": 0.0})
        self.setup = {"data": self.data_name, "size": self.size, "precision": self.precision,
                      "budget_scale": self.scale, "quick": self.quick,
                      "protocol": "alpnet", "setting": 2, "test_classes": [2, 3], "fold": 0}
        # one runtime for every training run (the config's: CPU, --threads, the precision, channels_last) and the
        # same in contiguous memory for evaluation
        self.runtime = Runtime.from_train_config(self.base.train)
        self.eval_runtime = dataclasses.replace(self.runtime, channels_last=False)
        self.doc = self._load_previous()

    @property
    def iters(self) -> int:
        return QUICK_ITERS if self.quick else MAX_ITERS

    def budget(self, method: str) -> Optional[float]:
        return None if self.quick else round(BUDGETS[method] * self.scale, 1)

    def _open_data(self):
        from fewshot_proto.data import InMemoryDataset, open_dataset
        from fewshot_proto.data.phantom import LABEL_NAMES, PHANTOM_VERSION, make_phantom_dataset

        a = self.args
        if a.data is not None:
            if not Path(a.data).is_dir():
                raise SystemExit(f"dataset folder {a.data} does not exist; pass --data <folder>")
            ds = open_dataset(a.data, layout=a.layout)
            return ds, str(Path(a.data).resolve().name)
        if self.quick:  # ten small phantoms in memory: every method runs in seconds
            vols = make_phantom_dataset(n_scans=10, size=64, n_slices_range=(12, 16))
            return InMemoryDataset(vols, name="phantom-quick-10x64", label_names=LABEL_NAMES), "phantom-quick-10x64"
        ds = open_dataset()
        # the generator's version is part of the name, so rows from another phantom version never merge with these
        return ds, f"{ds.name}-v{PHANTOM_VERSION}"

    def _load_previous(self) -> Dict[str, Any]:
        p = self.paths["json"]
        fresh = {"setup": self.setup, "budgets": {}, "rows": {}}
        if not p.exists():
            return fresh
        try:
            old = json.loads(p.read_text())
        except json.JSONDecodeError:
            print(f"note: {p} is not valid JSON; starting a new results file", flush=True)
            return fresh
        if old.get("setup") != self.setup:
            print(f"note: {p} holds another setup ({old.get('setup')}); its rows are replaced by this run",
                  flush=True)
            return fresh
        old.setdefault("rows", {})
        old.setdefault("budgets", {})
        return migrate_doc(old)

    # -- bookkeeping --------------------------------------------------------------------------------------
    def budget_table(self, methods: Sequence[str]) -> List[Dict[str, Any]]:
        rows = []
        for m in methods:
            n_runs = len(LABELLED) if m in SUPERVISED_METHODS else 1
            b = self.budget(m)
            rows.append({"method": m, "train_budget_seconds": b, "runs": n_runs,
                         "total_seconds": None if b is None else round(b * n_runs, 1),
                         "iteration_cap": self.iters,
                         "what": ("pretraining of the base U-Net" if m == "finetune" else
                                  "one run per n_labelled" if m in SUPERVISED_METHODS else "episodic training")})
        return rows

    def record(self, row: Dict[str, Any]) -> None:
        self.doc["rows"][row["row"]] = row
        self.write()

    def write(self) -> None:
        import torch

        from fewshot_proto.metrics.report import atomic_write_text, dumps_strict

        self.doc["setup"] = self.setup
        self.doc["machine"] = {"threads": torch.get_num_threads(), "python": platform.python_version(),
                               "torch": torch.__version__, "platform": platform.platform()}
        rows = ordered_rows(self.doc["rows"])
        atomic_write_text(self.paths["json"], dumps_strict(self.doc, indent=1) + "\n")  # NaN -> null
        atomic_write_text(self.paths["md"], to_markdown(self.doc))
        atomic_write_text(self.paths["csv"], to_csv(rows))

    # -- one training + evaluation ------------------------------------------------------------------------
    def cfg(self, method: str, run_dir: Path, **over: Any):
        from fewshot_proto.config import apply_overrides

        o = {"model.name": method, "train.out": str(run_dir), "train.max_seconds": self.budget(method)}
        o.update(over)
        cfg = apply_overrides(self.base, {k: v for k, v in o.items() if k != "model.kwargs"})
        if "model.kwargs" in o:
            cfg.model.kwargs = dict(o["model.kwargs"])
        return cfg

    def train(self, cfg, dataset=None):
        from fewshot_proto.engine import train

        t0 = time.perf_counter()
        res = train(cfg, progress=False, dataset=dataset if dataset is not None else self.dataset,
                    overwrite=True, runtime=self.runtime)  # a re-run replaces the row and its run folder
        return res, time.perf_counter() - t0

    def evaluate(self, model, shots: int, run_dir: Path, meta: Dict[str, Any]):
        from fewshot_proto.config import apply_overrides
        from fewshot_proto.engine import evaluate
        from fewshot_proto.engine.evaluator import protocol_specs

        proto = apply_overrides(self.base, {"protocol.shots": shots}).protocol
        specs = protocol_specs(self.dataset, proto)
        t0 = time.perf_counter()
        summary = evaluate(model, self.dataset, specs, size=self.size, runtime=self.eval_runtime,
                           out_dir=run_dir / "eval",
                           overlays=False, distances=False, meta=meta)
        return summary, time.perf_counter() - t0

    def row(self, rid: str, method: str, *, family: str, shots: Optional[int], n_labelled: Any, res, t_train: float,
            summary, t_eval: float, notes: str, budget: Optional[float]) -> Dict[str, Any]:
        dice = _dice(summary)
        return {"row": rid, "method": method, "family": family, "eval_shots": shots, "n_labelled": n_labelled,
                "labelled_scans": getattr(res, "labelled_scans", None) if res is not None else None,
                "status": "ok", "train_budget_seconds": budget, "train_seconds": round(t_train, 1),
                "iters": None if res is None else int(res.steps),
                "seconds_per_iter": None if res is None or not _finite(res.seconds_per_step)
                else round(float(res.seconds_per_step), 4),
                "eval_seconds": round(t_eval, 1), "dice": {k: round(v, 4) for k, v in dice.items()},
                "mean_dice": round(float(summary["mean_dice"]), 4),
                "query_scans": sorted({r["scan"] for r in summary["rows"]}, key=lambda s: (len(s), s)),
                "notes": notes}

    def unavailable(self, rid: str, method: str, family: str, reason: str, *, shots=None, n_labelled="-",
                    status: str = "not available") -> Dict[str, Any]:
        return {"row": rid, "method": method, "family": family, "eval_shots": shots, "n_labelled": n_labelled,
                "status": f"{status}: {reason}", "train_budget_seconds": self.budget(method), "train_seconds": None,
                "iters": None, "seconds_per_iter": None, "eval_seconds": None, "dice": {}, "mean_dice": None,
                "notes": ""}

    # -- methods ------------------------------------------------------------------------------------------
    def run_cwpa(self) -> List[Dict[str, Any]]:
        m = OURS
        d = self.runs / m
        # the library's own training recipe (default_config: episode count, LR schedule, loss weights), under the
        # benchmark's wall-time budget; the other methods keep the benchmark's constant-LR setup
        lib = self.library_train
        over = {"train.lambda_cyc": lib.lambda_cyc, "train.lambda_align": lib.lambda_align,
                "train.lambda_dice": lib.lambda_dice}
        if not self.quick:
            over.update({"train.iters": lib.iters, "train.scheduler": lib.scheduler,
                         "train.warmup_iters": lib.warmup_iters})
        res, t_train = self.train(self.cfg(m, d, **over))
        out = []
        for shots in (1, 5):
            summary, t_eval = self.evaluate(res.model, shots, d / f"{shots}shot", {"benchmark": STEM, "row": shots})
            note = (f"the library's training recipe ({lib.iters} episodes or the budget, {lib.scheduler} LR, loss CE + "
                    f"{lib.lambda_dice:g} Dice + {lib.lambda_align:g} align + {lib.lambda_cyc:g} cyclic) on 1-shot "
                    "episodes (mixed superpixel/labelled)" if shots == 1 else
                    "the 1-shot-trained model above, evaluated with 5 support scans (train time not counted again)")
            out.append(self.row(row_id(m, shots=shots), m, family="few-shot", shots=shots, n_labelled="-",
                                res=res, t_train=t_train if shots == 1 else 0.0, summary=summary, t_eval=t_eval,
                                notes=note, budget=self.budget(m) if shots == 1 else None))
        return out

    def run_prototype(self, m: str) -> List[Dict[str, Any]]:
        d = self.runs / m
        res, t_train = self.train(self.cfg(m, d, **{"train.lambda_cyc": 0.0, "train.lambda_align": 1.0}))
        summary, t_eval = self.evaluate(res.model, 1, d, {"benchmark": STEM, "method": m})
        note = f"same episodes as {OURS}; PAR alignment loss on, no cyclic loss"
        return [self.row(row_id(m, shots=1), m, family="few-shot", shots=1, n_labelled="-", res=res,
                         t_train=t_train, summary=summary, t_eval=t_eval, notes=note, budget=self.budget(m))]

    def run_finetune(self) -> List[Dict[str, Any]]:
        from fewshot_proto.models import build_model

        m = "finetune"
        d = self.runs / m
        index = self.dataset.slice_index()
        test = [2, 3]
        train_classes = [c for c in index.classes if c not in test]
        view = Setting2View(self.dataset, test)
        unet_kwargs = dict(self.sup_kwargs["unet"])
        cfg = self.cfg("unet", d / "base", **{"model.kwargs": unet_kwargs, "protocol.test_classes": train_classes,
                                              "train.max_seconds": self.budget(m), "train.optimizer": "adamw",
                                              "train.lr": 2e-3})
        base_res, t_train = self.train(cfg, dataset=view)
        steps = QUICK_ITERS if self.quick else FINETUNE_STEPS
        model = build_model("finetune", base="unet", checkpoint=str(base_res.checkpoint), reinit_head=True,
                            steps=steps, lr=FINETUNE_LR)
        summary, t_eval = self.evaluate(model, 1, d, {"benchmark": STEM, "method": m})
        note = (f"base: supervised U-Net on training classes {train_classes} of the fold's training scans, "
                f"Setting-2 slices only ({base_res.steps} batches); per support chunk {steps} adaptation steps "
                f"at lr {FINETUNE_LR} with a new binary head (the evaluation time includes them); base "
                f"{width_note('unet', unet_kwargs)}")
        return [self.row(row_id(m, shots=1), m, family="few-shot", shots=1, n_labelled="-", res=base_res,
                         t_train=t_train, summary=summary, t_eval=t_eval, notes=note, budget=self.budget(m))]

    def run_maml(self) -> List[Dict[str, Any]]:
        from fewshot_proto.models import build_model, list_models

        m = "maml_unet"
        rid = row_id(m, shots=1)
        if m not in list_models():
            return [self.unavailable(rid, m, "few-shot", "maml_unet is not registered in this version of "
                                     "fewshot_proto (fewshot_proto/models/fsbaselines/maml.py missing)", shots=1)]
        kwargs: Dict[str, Any] = dict(QUICK_MAML_KWARGS if self.quick else MAML_KWARGS)
        try:
            build_model(m, **kwargs)
        except ImportError as e:  # learn2learn missing
            return [self.unavailable(rid, m, "few-shot", f"cannot build it: {type(e).__name__}: {e}", shots=1)]
        d = self.runs / m
        res, t_train = self.train(self.cfg(m, d, **{"model.kwargs": kwargs, "train.lambda_cyc": 0.0,
                                                    "train.lambda_align": 0.0}))
        summary, t_eval = self.evaluate(res.model, 1, d, {"benchmark": STEM, "method": m})
        return [self.row(rid, m, family="few-shot", shots=1, n_labelled="-", res=res, t_train=t_train,
                         summary=summary, t_eval=t_eval, budget=self.budget(m),
                         notes=f"first-order MAML (learn2learn) over a binary U-Net, same episodes as {OURS}; "
                               f"inner-loop adaptation on every support chunk (in the evaluation time); "
                               f"kwargs {json.dumps(kwargs, sort_keys=True)}")]

    def run_supervised(self, m: str, n: Optional[int]) -> Dict[str, Any]:
        from fewshot_proto.episodes.protocol import fold_split

        rid = row_id(m, n_labelled=n)
        n_train = len(fold_split(self.dataset.slice_index(), 0, self.base.protocol.n_folds, 1).train_scans)
        if n is not None and n > n_train:
            return self.unavailable(rid, m, "supervised", f"the fold has only {n_train} training scans",
                                    n_labelled=n)
        d = self.runs / m / f"n{'all' if n is None else n}"
        cfg = self.cfg(m, d, **{"model.kwargs": dict(self.sup_kwargs[m]), "supervised.n_labelled": n,
                                "supervised.selection_seed": 0, "train.optimizer": "adamw", "train.lr": 2e-3,
                                "supervised.batch_size": 4 if self.quick else 8})
        res, t_train = self.train(cfg)
        summary, t_eval = self.evaluate(res.model, 1, d, {"benchmark": STEM, "method": m, "n_labelled": n})
        label = n_train if n is None else n
        return self.row(rid, m, family="supervised", shots=None, n_labelled=label, res=res, t_train=t_train,
                        summary=summary, t_eval=t_eval, budget=self.budget(m),
                        notes=("all training scans; " if n is None else "") + width_note(m, self.sup_kwargs[m]))

    def jobs(self, methods: Sequence[str]) -> List[tuple]:
        """``(row ids, callable returning rows)`` in run order."""
        out: List[tuple] = []
        for m in methods:
            if m == OURS:
                out.append(([row_id(m, shots=1), row_id(m, shots=5)], self.run_cwpa))
            elif m in ("panet", "alpnet"):
                out.append(([row_id(m, shots=1)], lambda m=m: self.run_prototype(m)))
            elif m == "finetune":
                out.append(([row_id(m, shots=1)], self.run_finetune))
            elif m == "maml_unet":
                out.append(([row_id(m, shots=1)], self.run_maml))
            else:
                for n in LABELLED:
                    out.append(([row_id(m, n_labelled=n)], lambda m=m, n=n: [self.run_supervised(m, n)]))
        return out


def migrate_doc(doc: Dict[str, Any]) -> Dict[str, Any]:
    """An earlier results document with the method names of ``LEGACY_METHODS`` mapped to today's: row ids, the
    rows' ``method``, the budget table and the other rows' notes that name it. Modifies and returns ``doc``."""
    def name(m: Any) -> Any:
        return LEGACY_METHODS.get(m, m)

    rows = {}
    for rid, r in (doc.get("rows") or {}).items():
        method, sep, rest = str(rid).partition("/")
        if isinstance(r, dict):
            r = dict(r, method=name(r.get("method")))
            if isinstance(r.get("row"), str):
                r["row"] = f"{name(method)}{sep}{rest}"
            if isinstance(r.get("notes"), str):
                for old, new in LEGACY_METHODS.items():
                    r["notes"] = r["notes"].replace(f"same episodes as {old};", f"same episodes as {new};")
        rows[f"{name(method)}{sep}{rest}"] = r
    doc["rows"] = rows
    doc["budgets"] = [dict(b, method=name(b["method"])) if isinstance(b, dict) and "method" in b else b
                      for b in (doc.get("budgets") or [])]
    return doc


def ordered_rows(rows: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    order = {r: i for i, r in enumerate(planned_rows(ALL_METHODS))}
    return sorted(rows.values(), key=lambda r: order.get(r["row"], len(order)))


# ---------------------------------------------------------------------------------------------- outputs
CLASS_NAMES = {"1": "liver", "2": "R kidney", "3": "L kidney", "4": "spleen"}


def _classes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    return sorted({c for r in rows for c in r.get("dice", {})}, key=int)


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f}" if _finite(v) else "n/a"


def _sec(v: Any) -> str:
    return f"{float(v):.0f}" if _finite(v) else "-"


def to_markdown(doc: Dict[str, Any]) -> str:
    rows = ordered_rows(doc["rows"])
    s = doc["setup"]
    classes = _classes(rows) or [str(c) for c in s["test_classes"]]
    lines = [f"# Few-shot vs supervised: {s['data']}, {s['size']}x{s['size']}, {s.get('precision', 'fp32')}", "",
             f"Protocol: {s['protocol']}, Setting {s['setting']}, test classes "
             f"{{{','.join(map(str, s['test_classes']))}}}, fold {s['fold']}; every row scored by the same "
             f"`evaluate` on the same episodes (3-D Dice per query scan and class, mean over the fold's query "
             f"scans, in %). Budget scale {s['budget_scale']}" + (" (quick smoke mode: 2 steps per method, "
                                                                   "numbers meaningless)" if s["quick"] else "")
             + ".", "",
             "| row | family | eval shots | labelled scans | " + " | ".join(CLASS_NAMES.get(c, c) + " Dice"
                                                                     for c in classes)
             + " | mean Dice | train budget (s) | train (s) | iters | eval (s) | status | notes |",
             "|---|---|---:|---:|" + "---:|" * len(classes) + "---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['family']} | {r['eval_shots'] if r['eval_shots'] else '-'} | "
                     f"{r['n_labelled']} | " + " | ".join(_pct(r['dice'].get(c)) for c in classes)
                     + f" | {_pct(r['mean_dice'])} | {_sec(r['train_budget_seconds'])} | {_sec(r['train_seconds'])}"
                     f" | {r['iters'] if r['iters'] is not None else '-'} | {_sec(r['eval_seconds'])} | "
                     f"{r['status']} | {r.get('notes', '')} |")
    if doc.get("budgets"):
        lines += ["", "Training budgets (wall time per training run, `train.max_seconds`):", "",
                  "| method | budget (s) | runs | total (s) | iteration cap | what |", "|---|---:|---:|---:|---:|---|"]
        for b in doc["budgets"]:
            lines.append(f"| {b['method']} | {_sec(b['train_budget_seconds'])} | {b['runs']} | "
                         f"{_sec(b['total_seconds'])} | {b['iteration_cap']} | {b['what']} |")
    if doc.get("wall_seconds") is not None:
        lines += ["", f"Wall time of the last invocation: {doc['wall_seconds']:.0f} s "
                      f"({doc.get('machine', {}).get('threads', '?')} threads)."]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ["row", "method", "family", "eval_shots", "n_labelled", "class_id", "class_name", "dice",
              "train_budget_seconds", "train_seconds", "iters", "eval_seconds", "status"]


def to_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """One line per (row, class) plus one ``class_id = mean`` line per row; Dice as a fraction in [0, 1]."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    classes = _classes(rows)
    for r in rows:
        base = {k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS if k in r}
        for c in classes + ["mean"]:
            v = r["mean_dice"] if c == "mean" else r["dice"].get(c)
            w.writerow(dict(base, class_id=c, class_name=CLASS_NAMES.get(c, c if c == "mean" else ""),
                            dice="" if v is None else v))
    return buf.getvalue()


def plot(doc: Dict[str, Any], path: Path) -> Optional[Path]:
    """Dice against labelled scans per supervised model, few-shot rows as horizontal lines; one panel per
    test class and one for the mean. Returns ``None`` (and says why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot written (pip install matplotlib)", flush=True)
        return None
    rows = [r for r in ordered_rows(doc["rows"]) if r["status"] == "ok"]
    panels = _classes(rows) + ["mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), sharey=True, squeeze=False)
    sup = [r for r in rows if r["family"] == "supervised"]
    few = [r for r in rows if r["family"] == "few-shot"]
    ns = sorted({int(r["n_labelled"]) for r in sup})
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))]
    for ax, c in zip(axes[0], panels):
        def val(r):
            return r["mean_dice"] if c == "mean" else r["dice"].get(c)

        for m in SUPERVISED_METHODS:
            pts = sorted((int(r["n_labelled"]), 100 * val(r)) for r in sup if r["method"] == m and _finite(val(r)))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        for i, r in enumerate(few):
            if _finite(val(r)):
                ax.axhline(100 * val(r), linestyle=styles[i % len(styles)], color=f"C{3 + i}", label=r["row"])
        if ns:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
        ax.set_xlabel("labelled training scans (supervised)")
        ax.set_title(CLASS_NAMES.get(c, "mean over test classes" if c == "mean" else c))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice (%)")
    axes[0][-1].legend(fontsize=7, loc="best")
    s = doc["setup"]
    fig.suptitle(f"Few-shot (horizontal lines) vs supervised: {s['data']} {s['size']}px, alpnet Setting 2, "
                 f"fold {s['fold']}" + (" [quick smoke run]" if s["quick"] else ""), fontsize=10)
    missing = [f"{r['row']}: {r['status']}" for r in ordered_rows(doc["rows"]) if r["status"] != "ok"]
    if missing:
        fig.text(0.01, 0.01, "; ".join(missing)[:240], fontsize=7, color="0.3")
    fig.tight_layout(rect=(0, 0.04 if missing else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="dataset folder (default: the built-in phantoms)")
    p.add_argument("--layout", default="auto", choices=["auto", "alpnet", "msd"])
    p.add_argument("--size", type=int, default=None, help="model input size (default 256 as the library, 32 with "
                                                           "--quick)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="training and evaluation precision of every method (default auto: bf16 where the CPU has "
                        "native bf16, as the library)")
    p.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(ALL_METHODS)}")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every training budget")
    p.add_argument("--out", default=str(HERE / "results"), help="results folder")
    p.add_argument("--runs", default="runs/fewshot_vs_supervised", help="checkpoints and evaluation reports")
    p.add_argument("--quick", action="store_true", help="smoke test: 10 tiny phantoms, 2 steps per method")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--resume", action="store_true", help="skip rows already in the results file with status ok")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    methods = parse_methods(args.methods)
    if args.budget_scale <= 0:
        raise SystemExit("--budget-scale must be positive")
    t_start = time.perf_counter()
    bench = Bench(args)
    budgets = bench.budget_table(methods)
    # a subset run (--methods) replaces the budgets of its methods and keeps the others' (their rows stay too)
    kept = {b["method"]: b for b in (bench.doc.get("budgets") or []) if isinstance(b, dict) and "method" in b}
    kept.update({b["method"]: b for b in budgets})
    bench.doc["budgets"] = [kept[m] for m in ALL_METHODS if m in kept]
    print(f"data: {bench.data_name} | size {bench.size} | {bench.precision} | threads {args.threads} | "
          f"budget scale {bench.scale}"
          + (" | QUICK" if bench.quick else ""))
    print(f"{'method':<24} {'budget (s)':>10} {'runs':>5} {'total (s)':>10}  what")
    for b in budgets:
        print(f"{b['method']:<24} {_sec(b['train_budget_seconds']):>10} {b['runs']:>5} "
              f"{_sec(b['total_seconds']):>10}  {b['what']}")
    total = sum(b["total_seconds"] or 0 for b in budgets)
    print(f"training budget in total: {total:.0f} s (+ evaluation)", flush=True)
    failures = 0
    for rids, fn in bench.jobs(methods):
        if args.resume and all(bench.doc["rows"].get(r, {}).get("status") == "ok" for r in rids):
            print(f"== {', '.join(rids)}: already in {bench.paths['json']}, skipped (--resume)", flush=True)
            continue
        print(f"== {', '.join(rids)}", flush=True)
        try:
            rows = fn()
        except Exception as e:  # keep going: the other rows are still worth having; the row records the error
            traceback.print_exc()
            failures += 1
            rows = [bench.unavailable(r, r.split("/")[0], "supervised" if r.split("/")[0] in SUPERVISED_METHODS
                                      else "few-shot", f"{type(e).__name__}: {e}", status="failed") for r in rids]
        for r in rows:
            bench.record(r)
            print(f"   {r['row']}: mean Dice {_pct(r['mean_dice'])} | train {_sec(r['train_seconds'])} s | "
                  f"eval {_sec(r['eval_seconds'])} s | {r['status']}", flush=True)
    bench.doc["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    bench.write()
    plot(bench.doc, bench.paths["png"])
    print(bench.paths["md"].read_text())
    print(f"wrote {', '.join(str(p) for p in bench.paths.values())} in {bench.doc['wall_seconds']:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
