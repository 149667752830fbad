"""What the command-line tools (``train``, ``evaluate``, ``predict``, ``episodes``) share.

* :class:`Parser`: an ``ArgumentParser`` whose errors raise :class:`~fewshot_proto.errors.ConfigError`, so a bad
  flag is reported by ``run_cli`` on one line, ``error: <prog>: <problem> (see --help)``, with exit code 2 (not
  argparse's usage block); every parser has ``--version`` (``fewshot_proto <version>``, exit code 0).
* :func:`prog_name`: the name ``--help`` shows, the console script's (``fewshot-train``) when run as one, else
  ``python -m fewshot_proto.<module>``.
* ``add_*_args``: the flags several tools have, defined once so that a concept has one spelling everywhere.
* :func:`run_main`: ``run_cli`` that also turns ``--help`` / ``--version`` (argparse's ``SystemExit(0)``) into a
  return value of 0.

Importing this module is cheap (no torch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

from fewshot_proto import __version__
from fewshot_proto.config import PRECISIONS
from fewshot_proto.errors import ConfigError, run_cli

__all__ = ["Parser", "prog_name", "version_line", "run_main", "checked", "positive_int", "DEVICES", "LAYOUTS",
           "THREADS_DEFAULT", "add_device_args", "add_data_args", "add_batch_size_arg", "add_progress_arg"]

#: choices of ``--device`` (``"auto"``: CUDA when present, else CPU)
DEVICES = ("auto", "cpu", "cuda")
#: choices of ``--layout``
LAYOUTS = ("auto", "alpnet", "msd")
#: what an unset ``--threads`` means (``engine.runtime.configure_threads``)
THREADS_DEFAULT = "$OMP_NUM_THREADS, else every core this process may use"


def version_line() -> str:
    """What ``--version`` prints: ``fewshot_proto <version>``."""
    return f"fewshot_proto {__version__}"


def prog_name(module: str, script: str) -> str:
    """``script`` (e.g. ``fewshot-train``) when this process was started as that console script, else
    ``python -m <module>`` (run with ``-m``, or called from Python)."""
    name = Path(sys.argv[0] if sys.argv and sys.argv[0] else "").name
    if name in (script, f"{script}.exe", f"{script}-script.py"):
        return script
    return f"python -m {module}"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` for the CLIs: errors raise ``ConfigError("<prog>: <message> (see --help)")`` instead
    of printing the usage and exiting with 2; the description keeps its layout; ``--version`` is added unless
    ``version=False`` (sub-command parsers are built with ``version=False``)."""

    def __init__(self, *args, version: bool = True, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        if version:
            self.add_argument("--version", action="version", version=version_line(),
                              help="print the version (fewshot_proto <version>) and exit")

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def run_main(body: Callable[[], int]) -> int:
    """:func:`fewshot_proto.errors.run_cli` (the user's errors: one line, exit code 2), where ``--help`` and
    ``--version`` return 0 instead of raising ``SystemExit(0)``."""
    try:
        return run_cli(body)
    except SystemExit as e:
        if e.code is None or e.code == 0:
            return 0
        raise


def checked(cast: Callable[[str], Any], ok: Callable[[Any], bool], expected: str) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(text)``, refused with "expected <expected>, got '<text>'" unless ``ok`` holds."""
    def convert(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not ok(value):  # NaN fails every comparison, so it is refused too
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


#: an argparse ``type`` for integers >= 1
positive_int = checked(int, lambda v: v >= 1, "a positive integer")


def add_device_args(p: argparse.ArgumentParser, *, device: str, precision: str, threads: str = THREADS_DEFAULT,
                    device_default: Optional[str] = None) -> None:
    """``--device``, ``--precision`` and ``--threads``; ``device``/``precision``/``threads`` say where the default
    comes from (the help shows ``(default: <that>)``)."""
    p.add_argument("--device", choices=DEVICES, default=device_default,
                   help=f"auto picks CUDA when present (default: {device})")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="autocast precision; auto: bf16 where the CPU or GPU computes bf16 natively, else fp32 "
                        f"(default: {precision})")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help=f"torch intra-op threads (default: {threads})")


def add_data_args(p: argparse.ArgumentParser, *, data: str, layout: str, layout_default: Optional[str] = None) -> None:
    """``--data`` and ``--layout`` (the help shows where their defaults come from)."""
    p.add_argument("--data", default=None, metavar="DIR", help=f"dataset folder (default: {data})")
    p.add_argument("--layout", choices=LAYOUTS, default=layout_default,
                   help=f"dataset layout: alpnet (image_<id>/label_<id>), msd (imagesTr/labelsTr) or auto "
                        f"(default: {layout})")


def add_batch_size_arg(p: argparse.ArgumentParser, default: int = 16) -> None:
    """``--batch-size`` (query slices per forward pass)."""
    p.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                   help="query slices per forward pass (default: %(default)s)")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress``."""
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: progress bars shown)")
