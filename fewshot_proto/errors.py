"""Exceptions raised by fewshot_proto, and how the command-line tools report them.

Every message names the file (or config key) and the problem. The CLIs treat these as the *user's* errors and
print them on one line with exit code 2 (:func:`run_cli`):

* :class:`FewShotError` and its subclasses (bad data, config, protocol, checkpoint, run folder, unknown name);
* ``OSError`` (a path the user gave that is missing, unreadable, not a folder, ...).

Anything else is a bug of ours and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

__all__ = ["FewShotError", "DataError", "ProtocolError", "CheckpointError", "ConfigError", "RunFolderError",
           "DivergedError", "UnknownNameError", "USER_ERRORS", "one_line", "run_cli"]


class FewShotError(Exception):
    """Base class of fewshot_proto's own errors."""


class DataError(FewShotError, ValueError):
    """A dataset, volume or label file is missing, unreadable or inconsistent."""


class ProtocolError(FewShotError, ValueError):
    """An evaluation protocol or manifest cannot be built or does not match the data."""


class CheckpointError(FewShotError, RuntimeError):
    """A checkpoint is missing, corrupt, truncated or belongs to another model."""


class ConfigError(FewShotError, ValueError):
    """A configuration file, override or command-line value is malformed or out of range."""


class RunFolderError(FewShotError, RuntimeError):
    """A run folder cannot be used: it holds another run, is locked by a live run, or cannot be created."""


class DivergedError(FewShotError, FloatingPointError):
    """Training produced a non-finite loss or non-finite weights (the last finite checkpoint is kept)."""


class UnknownNameError(FewShotError, KeyError):
    """A registry lookup of a name that is not registered (the message lists the valid names)."""

    def __str__(self) -> str:  # KeyError's str() would quote the message
        return str(self.args[0]) if self.args else ""


#: the exception types the CLIs report as the user's error (one line, exit code 2)
USER_ERRORS = (FewShotError, OSError)


def one_line(exc: BaseException) -> str:
    """``exc``'s message on one line (continuation lines joined with ``"; "``)."""
    text = str(exc).strip() or type(exc).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI body: the user's errors (:data:`USER_ERRORS`) become ``error: <one line>`` on stderr and exit code
    2; Ctrl-C becomes ``interrupted`` and exit code 130; everything else (our bugs) propagates with its traceback."""
    try:
        return int(main() or 0)
    except USER_ERRORS as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
