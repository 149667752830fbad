"""Command line for frozen evaluation episodes (also installed as ``fewshot-episodes``).

    python -m fewshot_proto.episodes freeze [--data DIR] [--layout auto|alpnet|msd] --protocol alpnet \\
        --folds 0-4 --setting 2 --test-classes 2,3 --shots 1 [--n-part 3] [--n-folds 5] [--out episodes/NAME.json]
    python -m fewshot_proto.episodes verify FILE [--data DIR] [--layout ...]
    python -m fewshot_proto.episodes list [--dir episodes]

Without ``--data`` the built-in synthetic phantoms are used. ``freeze`` writes one manifest holding every
requested fold (default name: ``episodes/<dataset>_<protocol>_setting<S>_<classes>_<k>shot.json``).
``verify`` exits with 0 when the manifest matches the data, 1 with the list of mismatches when it does not,
and 2 when the manifest or the data cannot be read. ``list`` prints the protocols and the manifests in a folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from fewshot_proto.cli import LAYOUTS, Parser, positive_int, prog_name, run_main
from fewshot_proto.config import N_PART
from fewshot_proto.data.readers import open_dataset
from fewshot_proto.errors import ProtocolError

from .manifest import freeze, load_manifest, manifest_mismatches, save_manifest
from .protocol import PROTOCOLS

__all__ = ["main", "parse_int_list", "default_manifest_name"]


def parse_int_list(text: str) -> List[int]:
    """``"0-4"`` -> ``[0, 1, 2, 3, 4]``; ``"2,3"`` -> ``[2, 3]``; ``"0-1,3"`` -> ``[0, 1, 3]``."""
    out: List[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                a, b = int(lo), int(hi)
                if a < 0 or b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer list or range: {text!r} (use e.g. 0-4 or 2,3)")
    if not out:
        raise argparse.ArgumentTypeError(f"empty integer list: {text!r}")
    return out


def default_manifest_name(dataset: str, protocol: str, setting: int, test_classes: Sequence[int], shots: int,
                          n_part: int = N_PART, folds: Optional[Sequence[int]] = None, n_folds: int = 5) -> str:
    """``<dataset>_<protocol>_setting<S>_<classes>_<k>shot[_<n>part][_folds<..>].json``."""
    sep = "" if all(0 <= int(c) < 10 for c in test_classes) else "-"
    name = f"{dataset}_{protocol}_setting{int(setting)}_{sep.join(str(int(c)) for c in test_classes)}_{int(shots)}shot"
    if int(n_part) != N_PART:
        name += f"_{int(n_part)}part"
    if folds is not None and sorted(int(f) for f in folds) != list(range(int(n_folds))):
        name += "_folds" + "-".join(str(int(f)) for f in folds)
    if int(n_folds) != 5:
        name += f"_of{int(n_folds)}"
    return name + ".json"


def _open(data: Optional[str], layout: str):
    return open_dataset(data, layout)


def _cmd_freeze(args: argparse.Namespace) -> int:
    ds = _open(args.data, args.layout)
    index = ds.slice_index()
    folds = args.folds if args.folds is not None else list(range(args.n_folds))
    m = freeze(index, protocol=args.protocol, folds=folds, n_folds=args.n_folds, setting=args.setting,
               test_classes=args.test_classes, shots=args.shots, n_part=args.n_part)
    out = Path(args.out) if args.out else Path("episodes") / default_manifest_name(
        index.dataset, args.protocol, args.setting, args.test_classes, args.shots, args.n_part, folds, args.n_folds)
    save_manifest(m, out)
    print(f"wrote {out}: {m.summary()}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    m = load_manifest(args.file)
    ds = _open(args.data, args.layout)
    problems = manifest_mismatches(m, ds.slice_index())
    if problems:
        print(f"MISMATCH {args.file} ({m.summary()}):")
        for p in problems:
            print(f"  - {p}")
        return 1
    print(f"OK {args.file}: {m.summary()}")
    return 0


def _default_dir() -> Path:
    here = Path("episodes")
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[2] / "episodes"


def _cmd_list(args: argparse.Namespace) -> int:
    print("protocols: " + ", ".join(PROTOCOLS.names()))
    folder = Path(args.dir) if args.dir else _default_dir()
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        print(f"no manifests in {folder}")
        return 0
    print(f"manifests in {folder}:")
    for f in files:
        try:
            print(f"  {f.name}: {load_manifest(f).summary()}")
        except ProtocolError as e:
            print(f"  {f.name}: unreadable ({e})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``episodes`` command line (every flag's help states its default)."""
    p = Parser(prog=prog_name("fewshot_proto.episodes", "fewshot-episodes"), description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{freeze,verify,list}")

    def data_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", default=None, metavar="DIR",
                        help="dataset folder (default: the built-in synthetic phantoms)")
        sp.add_argument("--layout", default="auto", choices=LAYOUTS, help="dataset layout (default: %(default)s)")

    f = sub.add_parser("freeze", help="build the episodes of a protocol and write them to a manifest",
                       description="Build the episodes of a protocol and write them to one manifest.", version=False)
    data_args(f)
    f.add_argument("--protocol", default="alpnet", choices=PROTOCOLS.names(), help="protocol (default: %(default)s)")
    f.add_argument("--folds", type=parse_int_list, default=None,
                   help="query folds, e.g. 0-4 or 0,2 (default: all --n-folds folds)")
    f.add_argument("--n-folds", type=positive_int, default=5, metavar="N",
                   help="folds the scans are cut into (default: %(default)s)")
    f.add_argument("--setting", type=int, default=2, choices=[1, 2],
                   help="1: test classes may appear in training; 2: every training slice with any test class is "
                        "dropped (default: %(default)s)")
    f.add_argument("--test-classes", type=parse_int_list, default=[2, 3], metavar="IDS",
                   help="held-out classes, e.g. 2,3 or 1,4 (default: 2,3)")
    f.add_argument("--shots", type=positive_int, default=1, metavar="K",
                   help="support scans per episode, k-shot (default: %(default)s)")
    f.add_argument("--n-part", type=positive_int, default=N_PART, metavar="N",
                   help="support chunks per organ (default: %(default)s)")
    f.add_argument("--out", default=None, metavar="FILE",
                   help="manifest to write (default: episodes/<dataset>_<protocol>_setting<S>_<classes>_<k>shot.json)")
    f.set_defaults(func=_cmd_freeze)

    v = sub.add_parser("verify", help="check a manifest against the data (exit 1 listing mismatches)",
                       description="Check a manifest against the data: exit code 0 when it matches, 1 listing the "
                                   "mismatches when it does not.", version=False)
    v.add_argument("file", metavar="FILE", help="manifest to check (required)")
    data_args(v)
    v.set_defaults(func=_cmd_verify)

    ls = sub.add_parser("list", help="list protocols and the manifests of a folder",
                        description="List the protocols and the manifests of a folder.", version=False)
    ls.add_argument("--dir", default=None, metavar="DIR",
                    help="folder of manifests (default: ./episodes, else the repository's episodes/)")
    ls.set_defaults(func=_cmd_list)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (the user's errors, bad flags included: one ``error: ...`` line, 2)."""
    def body() -> int:
        args = build_parser().parse_args(None if argv is None else list(argv))
        return args.func(args)

    return run_main(body)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
