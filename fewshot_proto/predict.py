r"""Segment a new scan from one labelled scan.

    python -m fewshot_proto.predict --checkpoint CKPT --support image_8.nii.gz --support-label label_8.nii.gz \
        --classes 1,4 --query image_1.nii.gz --out pred_1.nii.gz

Support slices are chunk-matched (the field's n_part rule); the output NIfTI has the query's affine and
header, with the query's own axis order and size. Repeat --support/--support-label for k-shot.

Settings not given on the command line (slice axis, n_part, precision, input size, normalisation) are the
checkpoint's. The command line is checked before the checkpoint is loaded: --out must end in .nii.gz or .nii,
must not be a folder and must not be (or link to) an input file; its parent folders are created when missing.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

from fewshot_proto.config import PRECISIONS, config_from_dict
from fewshot_proto.data import read_volume, write_prediction
from fewshot_proto.engine.checkpoint import model_from_checkpoint
from fewshot_proto.engine.predictor import predict_volume
from fewshot_proto.engine.runtime import Runtime, resolve_device
from fewshot_proto.errors import ConfigError, DataError, run_cli
from fewshot_proto.train import parse_classes

#: largest class id a prediction file can hold (``write_prediction`` writes int16 labels)
MAX_CLASS_ID = 32767
#: file name endings ``write_prediction`` accepts
OUT_SUFFIXES = (".nii.gz", ".nii")


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors raise :class:`ConfigError` (reported on one line by ``run_cli``)
    instead of printing the usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message} (see {self.prog} --help)")


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


def _checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(text)``, refused with "expected <expected>" unless ``ok`` holds."""
    def convert(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_probability = _checked(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")


def build_parser() -> argparse.ArgumentParser:
    """The ``predict`` command line (every flag's help states its default, or that it is required)."""
    p = _Parser(prog="python -m fewshot_proto.predict", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by training (required)")
    p.add_argument("--support", required=True, action="append",
                   help="support image NIfTI (required; repeat for k-shot)")
    p.add_argument("--support-label", required=True, action="append",
                   help="label NIfTI of each --support image, in the same order (required)")
    p.add_argument("--classes", required=True, type=parse_class_ids,
                   help="foreground label values to segment, e.g. 1,4; no 0, no repeats (required)")
    p.add_argument("--query", required=True, help="query image NIfTI to segment (required)")
    p.add_argument("--out", required=True,
                   help="output label file ending in .nii.gz or .nii; missing parent folders are created "
                        "(required; must not be an input file)")
    p.add_argument("--slice-axis", type=int, choices=(0, 1, 2), default=None,
                   help="file axis holding the slices (default: the checkpoint's data.slice_axis)")
    p.add_argument("--n-part", type=_positive_int, default=None,
                   help="support chunks per organ (default: the checkpoint's protocol.n_part, 3 when absent)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto picks CUDA when present (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision (default: the checkpoint's train.precision)")
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
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"{flag} {path}: " + ("is a folder, not a file" if p.is_dir() else "file does not exist"))
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
    parent = out_path.absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: cannot create it, {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: folder {parent} is not writable")
    return out_path


def _predict(argv: Optional[List[str]]) -> int:
    """The body of :func:`main` (its errors are reported by ``run_cli``)."""
    args = build_parser().parse_args(argv)
    if len(args.support) != len(args.support_label):
        raise ConfigError(f"{len(args.support)} --support images but {len(args.support_label)} --support-label "
                          f"files; give one label per support image")
    inputs = ([("--query", args.query)] + [("--support", s) for s in args.support]
              + [("--support-label", s) for s in args.support_label])
    out = check_paths(args.out, inputs, checkpoint=args.checkpoint)

    device = resolve_device(args.device)
    model, ckpt = model_from_checkpoint(args.checkpoint, map_location=device)
    cfg = config_from_dict(ckpt.get("config") or {}, where=f"checkpoint {args.checkpoint}")
    runtime = Runtime.resolve(str(device), args.precision or cfg.train.precision, cfg.train.channels_last)
    model.to(runtime.device)
    axis = cfg.data.slice_axis if args.slice_axis is None else args.slice_axis
    n_part = cfg.protocol.n_part if args.n_part is None else args.n_part
    kw = dict(slice_axis=axis, normalise=cfg.data.normalise, ct_window=cfg.data.ct_window,
              label_map=cfg.data.label_map, drop_unmapped=cfg.data.drop_unmapped)
    supports = [read_volume(img, lab, **kw) for img, lab in zip(args.support, args.support_label)]
    query = read_volume(args.query, None, **kw)
    pred = predict_volume(model, supports, query, args.classes, size=cfg.data.size, n_part=n_part, runtime=runtime,
                          threshold=args.threshold)
    path = write_prediction(pred, query, out)
    counts = {int(c): int((pred == int(c)).sum()) for c in args.classes}
    print(f"wrote {path}: voxels per class {counts}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; the user's errors print one ``error: ...`` line on stderr and return 2."""
    return run_cli(lambda: _predict(argv))


if __name__ == "__main__":
    sys.exit(main())
