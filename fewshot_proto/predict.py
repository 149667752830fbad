r"""Segment new scans from one labelled scan.

    python -m fewshot_proto.predict --checkpoint CKPT --support image_8.nii.gz --support-label label_8.nii.gz \
        --test-classes 1,4 --query image_1.nii.gz --out pred_1.nii.gz
    python -m fewshot_proto.predict --checkpoint CKPT --support image_8.nii.gz --support-label label_8.nii.gz \
        --test-classes 1,4 --query scans/ --out preds/ --save-probabilities

Support slices are chunk-matched (the field's n_part rule); each output NIfTI has its query's affine and header,
with the query's own axis order and size. Repeat --support/--support-label for k-shot.

One --query file: --out is the label file (.nii.gz or .nii). A --query folder (every *.nii and *.nii.gz in it, in
natural order: image_2 before image_10) or several --query files: --out is a folder, created when missing, that
gets <query stem>_pred.nii.gz per query; an existing non-empty --out folder is refused unless --overwrite. The
support is encoded once for all queries. --save-probabilities also writes each class's foreground probability
(float32) as <stem>_prob_class<c> next to each label file (<stem>: the query's, or with one --query file the
--out file's).

Settings not given on the command line (slice axis, n_part, precision, input size, normalisation) are the
checkpoint's. The command line is checked before the checkpoint is loaded: no output may be (or link to) an input
file or the checkpoint, and the folders that will hold the outputs must be creatable and writable.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from fewshot_proto.cli import (Parser, add_batch_size_arg, add_device_args, checked, positive_int, prog_name,
                               run_main)
from fewshot_proto.config import config_from_dict
from fewshot_proto.data import read_volume, write_prediction, write_probability
from fewshot_proto.engine.checkpoint import model_from_checkpoint
from fewshot_proto.engine.predictor import predict_queries
from fewshot_proto.engine.runtime import Runtime, resolve_device
from fewshot_proto.errors import ConfigError, DataError
from fewshot_proto.train import parse_classes
from fewshot_proto.types import Volume, natural_key

#: largest class id a prediction file can hold (``write_prediction`` writes int16 labels)
MAX_CLASS_ID = 32767
#: file name endings ``write_prediction`` accepts (and the endings of the query files a --query folder yields)
OUT_SUFFIXES = (".nii.gz", ".nii")
#: the label file of query ``<stem>.nii.gz`` in an --out folder
PRED_SUFFIX = "_pred.nii.gz"


def parse_class_ids(text: str) -> List[int]:
    """Comma-separated foreground class ids (``"1,4"`` -> ``[1, 4]``).

    Raises:
        argparse.ArgumentTypeError: no ids, a non-integer, 0 (background), a negative id, an id above
            :data:`MAX_CLASS_ID`, or an id given twice.
    """
    ids = parse_classes(text)  # the split and int conversion of train's --test-classes
    if not ids:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids such as 1,4, got {text!r}")
    for c in ids:
        if c == 0:
            raise argparse.ArgumentTypeError(f"class 0 is the background and cannot be segmented (got {text!r}); "
                                             f"give foreground label values such as 1,4")
        if c < 0:
            raise argparse.ArgumentTypeError(f"class ids must be positive, got {c} in {text!r}")
        if c > MAX_CLASS_ID:
            raise argparse.ArgumentTypeError(f"class ids must be at most {MAX_CLASS_ID}, got {c} in {text!r}")
    dups = sorted({c for c in ids if ids.count(c) > 1})
    if dups:
        raise argparse.ArgumentTypeError(f"class ids given twice: {dups} in {text!r}")
    return ids


_probability = checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    """The ``predict`` command line (every flag's help states its default, or that it is required)."""
    p = Parser(prog=prog_name("fewshot_proto.predict", "fewshot-predict"), description=__doc__)
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint written by training (required)")
    p.add_argument("--support", required=True, action="append", metavar="IMG",
                   help="support image NIfTI (required; repeat for k-shot)")
    p.add_argument("--support-label", required=True, action="append", metavar="LBL",
                   help="label NIfTI of each --support image, in the same order (required)")
    p.add_argument("--test-classes", "--classes", dest="classes", required=True, type=parse_class_ids,
                   metavar="IDS", help="foreground label values to segment, e.g. 1,4; no 0, no repeats (required)")
    p.add_argument("--query", required=True, nargs="+", action="extend", metavar="IMG|DIR",
                   help="query image NIfTI to segment, several files, or a folder of them (every *.nii and "
                        "*.nii.gz in it, natural order) (required)")
    p.add_argument("--out", required=True, metavar="PRED|DIR",
                   help="with one --query file: the label file, ending in .nii.gz or .nii; else the output folder, "
                        "one <query stem>_pred.nii.gz per query; missing parent folders are created (required; no "
                        "output may be an input file)")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --out folder, replacing files of the same name "
                        "(default: off, such a folder is refused)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write each class's foreground probability as float32 NIfTI "
                        "<stem>_prob_class<c> next to each label file (default: off)")
    p.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                   help="file axis holding the slices (default: the checkpoint's data.slice_axis)")
    p.add_argument("--n-part", type=positive_int, default=None, metavar="N",
                   help="support chunks per organ (default: the checkpoint's protocol.n_part, 3 when absent)")
    add_device_args(p, device="%(default)s", precision="the checkpoint's train.precision", device_default="auto")
    add_batch_size_arg(p)
    p.add_argument("--threshold", type=_probability, default=0.5,
                   help="foreground probability a voxel needs to get a class (default: %(default)s)")
    return p


def _same_file(a: Path, b: Path) -> bool:
    """Whether paths ``a`` and ``b`` name one file: equal resolved paths (symlinks followed, ``..`` removed), or
    ``os.path.samefile`` when both exist (hard links, other spellings of the path)."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: fall through to samefile
        pass
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_paths(out: str, inputs: Sequence[Tuple[str, str]], checkpoint: Optional[str] = None) -> Path:
    """Refuse an ``--out`` that cannot be written or would destroy an input; return it as a ``Path``.

    ``inputs``: ``(flag, path)`` pairs (``("--query", "image_1.nii.gz")``, ...); each must be an existing file.
    ``--out`` must not be one of them (nor the checkpoint), not even through a symlink or a hard link, must not be
    an existing folder, must end in one of :data:`OUT_SUFFIXES`, and its nearest existing ancestor must be a
    writable folder (missing parent folders are created when the prediction is written).

    Raises:
        DataError: an input file does not exist.
        ConfigError: any problem with ``--out`` (the message names ``--out`` and, if it clashes, the input).
    """
    for flag, path in inputs:
        check_paths_inputs(flag, path)
    out_path = Path(out).expanduser()
    if out_path.is_dir():
        raise ConfigError(f"--out {out} is an existing folder; give a file name such as {out_path / 'pred.nii.gz'}")
    named = list(inputs) + ([("--checkpoint", checkpoint)] if checkpoint is not None else [])
    for flag, path in named:
        if _same_file(out_path, Path(path).expanduser()):
            raise ConfigError(f"--out {out} is the same file as {flag} {path}; refusing to overwrite an input "
                              f"(choose another --out)")
    if not out_path.name.endswith(OUT_SUFFIXES):
        raise ConfigError(f"--out {out}: prediction files must end in {' or '.join(OUT_SUFFIXES)}")
    _writable_ancestor(out, out_path.absolute().parent)
    return out_path


def nifti_stem(path: Path) -> str:
    """``image_1`` for ``image_1.nii.gz`` or ``image_1.nii``."""
    name = Path(path).name
    for suffix in OUT_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def find_queries(values: Sequence[str]) -> Tuple[List[Path], Optional[Path]]:
    """The query files of ``--query``: one folder (every ``*.nii`` / ``*.nii.gz`` file in it, in natural order)
    or files (in the order given). Returns ``(files, folder)`` (``folder`` is ``None`` unless a folder was given).

    Raises:
        DataError: a file does not exist, a folder holds no NIfTI file, a folder is given with other values.
        ConfigError: the same file is given twice.
    """
    paths = [Path(v).expanduser() for v in values]
    folders = [(v, p) for v, p in zip(values, paths) if p.is_dir()]
    if folders and len(values) > 1:
        raise DataError(f"--query {folders[0][0]} is a folder; give one folder or several files, not both")
    if folders:
        folder = paths[0]
        files = sorted((f for f in folder.iterdir() if f.name.endswith(OUT_SUFFIXES) and f.is_file()),
                       key=lambda f: natural_key(f.name))
        if not files:
            raise DataError(f"--query {values[0]}: folder holds no .nii.gz or .nii file")
        return files, folder
    for v, p in zip(values, paths):
        if not p.is_file():
            raise DataError(f"--query {v}: file does not exist")
    for i, p in enumerate(paths):
        for q in paths[:i]:
            if _same_file(p, q):
                raise ConfigError(f"--query {values[i]} is the same file as --query {q}; give each query once")
    return paths, None


def probability_paths(label_path: Path, classes: Sequence[int], stem: Optional[str] = None) -> List[Path]:
    """``<stem>_prob_class<c>`` next to ``label_path`` for every class, with the label file's ending (``stem``:
    the label file's own by default)."""
    suffix = ".nii.gz" if label_path.name.endswith(".nii.gz") else ".nii"
    stem = nifti_stem(label_path) if stem is None else stem
    return [label_path.with_name(f"{stem}_prob_class{int(c)}{suffix}") for c in classes]


def _writable_ancestor(out: str, path: Path) -> None:
    """Refuse ``path`` (named ``--out out`` in messages) unless its nearest existing ancestor is a writable
    folder (the missing folders below it are created when the outputs are written)."""
    parent = path.absolute()
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: cannot create it, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: folder {parent} is not writable")


def check_out_folder(out: str, queries: Sequence[Path], inputs: Sequence[Tuple[str, str]],
                     classes: Sequence[int], *, checkpoint: Optional[str] = None, query_folder: Optional[Path] = None,
                     overwrite: bool = False, probabilities: bool = False) -> List[Tuple[Path, List[Path]]]:
    """Check ``--out`` as the folder of several predictions; return ``(label file, probability files)`` per query.

    Refused (``ConfigError`` naming ``--out``): an existing file; a name ending in .nii.gz or .nii that is not a
    folder yet; an existing non-empty folder without ``overwrite``; the ``--query`` folder itself (its predictions
    would be read as queries by the next run); a folder that cannot be created or written; two queries with one
    output name; any output file that is (or links to) an input or the checkpoint.
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file; with several queries --out is the output folder (created when "
                          f"missing)")
    if not path.exists() and path.name.endswith(OUT_SUFFIXES):
        raise ConfigError(f"--out {out}: with several queries --out is a folder, not a file name ending in "
                          f"{' or '.join(OUT_SUFFIXES)}")
    if query_folder is not None and _same_file(path, query_folder):
        raise ConfigError(f"--out {out} is the --query folder; its predictions would be read as queries next time "
                          f"(choose another --out)")
    if path.is_dir() and not overwrite and any(path.iterdir()):
        raise ConfigError(f"--out {out} is a folder that is not empty; pass --overwrite to write into it (files of "
                          f"the same name are replaced) or choose another --out")
    _writable_ancestor(out, path)
    named = [(flag, Path(p).expanduser()) for flag, p in inputs]
    named += [("--query", q) for q in queries]
    if checkpoint is not None:
        named.append(("--checkpoint", Path(checkpoint).expanduser()))
    plan: List[Tuple[Path, List[Path]]] = []
    owner: Dict[str, Path] = {}
    for q in queries:
        stem = nifti_stem(q)
        label = path / f"{stem}{PRED_SUFFIX}"
        outputs = [label] + (probability_paths(label, classes, stem) if probabilities else [])
        for f in outputs:
            if f.name in owner:
                raise ConfigError(f"--query {owner[f.name]} and --query {q} would both be written to {f}; rename "
                                  f"one or predict them separately")
            owner[f.name] = q
            for flag, src in named:
                if _same_file(f, src):
                    raise ConfigError(f"--out {out}: {f} would be the same file as {flag} {src}; refusing to "
                                      f"overwrite an input (choose another --out)")
        plan.append((label, outputs[1:]))
    return plan


def _predict(argv: Optional[List[str]]) -> int:
    """The body of :func:`main` (its errors are reported by ``run_cli``)."""
    args = build_parser().parse_args(argv)
    if len(args.support) != len(args.support_label):
        raise ConfigError(f"{len(args.support)} --support images but {len(args.support_label)} --support-label "
                          f"files; give one label per support image")
    supports_in = [("--support", s) for s in args.support] + [("--support-label", s) for s in args.support_label]
    query_paths, folder = find_queries(args.query)
    if folder is None and len(query_paths) == 1:  # one query file: --out is the label file
        out = check_paths(args.out, [("--query", args.query[0])] + supports_in, checkpoint=args.checkpoint)
        probs = probability_paths(out, args.classes) if args.save_probabilities else []
        for f in probs:
            check_paths(str(f), [("--query", args.query[0])] + supports_in, checkpoint=args.checkpoint)
        plan = [(out, probs)]
    else:
        for flag, path in supports_in:  # inputs must exist (check_paths checks them for one query)
            check_paths_inputs(flag, path)
        plan = check_out_folder(args.out, query_paths, supports_in, args.classes, checkpoint=args.checkpoint,
                                query_folder=folder, overwrite=args.overwrite, probabilities=args.save_probabilities)

    device = resolve_device(args.device)
    model, ckpt = model_from_checkpoint(args.checkpoint, map_location=device)
    cfg = config_from_dict(ckpt.get("config") or {}, where=f"checkpoint {args.checkpoint}")
    runtime = Runtime.resolve(str(device), args.precision or cfg.train.precision, cfg.train.channels_last,
                              args.threads)
    model.to(runtime.device)
    axis = cfg.data.slice_axis if args.slice_axis is None else args.slice_axis
    n_part = cfg.protocol.n_part if args.n_part is None else args.n_part
    kw = dict(slice_axis=axis, normalise=cfg.data.normalise, ct_window=cfg.data.ct_window,
              label_map=cfg.data.label_map, drop_unmapped=cfg.data.drop_unmapped)
    supports = [read_volume(img, lab, **kw) for img, lab in zip(args.support, args.support_label)]
    read: List[Volume] = []

    def queries() -> Iterator[Volume]:
        for q in query_paths:
            read.append(read_volume(str(q), None, **kw))
            yield read[-1]

    results = predict_queries(model, supports, queries(), args.classes, size=cfg.data.size, n_part=n_part,
                              runtime=runtime, batch_size=args.batch_size, threshold=args.threshold)
    for (label_path, prob_paths), (pred, probs) in zip(plan, results):
        query = read.pop()
        path = write_prediction(pred, query, label_path)
        for c, f in zip(args.classes, prob_paths):
            write_probability(probs[int(c)], query, f)
        counts = {int(c): int((pred == int(c)).sum()) for c in args.classes}
        print(f"wrote {path}: voxels per class {counts}"
              + (f"; probabilities: {', '.join(str(f) for f in prob_paths)}" if prob_paths else ""), flush=True)
    if len(plan) > 1:
        print(f"{len(plan)} predictions in {args.out}")
    return 0


def check_paths_inputs(flag: str, path: str) -> None:
    """Refuse an input path that is not an existing file (``DataError`` naming the flag)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{flag} {path}: " + ("is a folder, not a file" if p.is_dir() else "file does not exist"))


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; the user's errors (bad flags included) print one ``error: ...`` line on stderr and
    return 2."""
    return run_main(lambda: _predict(argv))


if __name__ == "__main__":
    sys.exit(main())
